// libFuzzer target `trace`: the NPTKit binary trace reader (NPTTrace.TraceReader) on any bytes, and
// the what-if model over the exits it yields (the path of `nptkit-cli whatif` on an NPTKit trace).
// Built by scripts/fuzz.sh with swiftc -sanitize=fuzzer,address against NPTTrace's sources (a Swift
// module, not behind the C ABI).
//
// Input: one mode byte, then the trace. Mode bit 0 set: the harness first rewrites the header's and
// every block's CRC-32C so that they match (random bytes almost never pass a checksum; this lets the
// fuzzer reach the record decoder behind it). Mode bit 0 clear: the bytes as they are.
//
// Promises checked (a broken one aborts, which libFuzzer reports as a finding): every error carries a
// byte offset inside the input; the first error is sticky (the next call throws it again, nothing
// after it is returned); timestamps never go backwards; the reader stops (bounded by the input).
import NPTTrace

@inline(__always) private func check(_ ok: Bool, _ what: @autoclosure () -> String) {
    if !ok { fatalError("fuzz trace: broken promise: \(what())") }
}

private func le32(_ b: [UInt8], _ i: Int) -> UInt32 {
    UInt32(b[i]) | UInt32(b[i + 1]) << 8 | UInt32(b[i + 2]) << 16 | UInt32(b[i + 3]) << 24
}
private func put32(_ b: inout [UInt8], _ i: Int, _ v: UInt32) {
    for k in 0..<4 { b[i + k] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(k))) }
}
private func crc(_ b: [UInt8], _ r: Range<Int>, _ seed: UInt32 = 0) -> UInt32 {
    b.withUnsafeBytes { CRC32C.update(seed, UnsafeRawBufferPointer(rebasing: $0[r])) }
}

/// Makes the header's and each block's checksum match (a block's length is clamped to what is left).
private func repairChecksums(_ b: inout [UInt8]) {
    let h = TraceFormat.headerSize, bh = TraceFormat.blockHeaderSize
    guard b.count >= h else { return }
    put32(&b, 16, crc(b, 0..<16))
    var at = h
    while b.count - at >= bh {
        let left = b.count - at - bh
        let length = min(Int(le32(b, at)), left)
        put32(&b, at, UInt32(length))
        var c = crc(b, at..<at + 4)
        c = crc(b, at + 8..<at + bh, c)
        c = crc(b, at + bh..<at + bh + length, c)
        put32(&b, at + 4, c)
        at += bh + length
    }
}

private let policy: WhatIfPolicy = {
    var p = WhatIfPolicy()
    p.ranges = [.init(start: 0x1000, end: 0x2000, perms: permR | permXs), .init(start: 0x2000, end: 0x3000, perms: permR | permXu)]
    return p
}()

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzTrace(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    guard let data, size > 0 else { return 0 }
    var bytes = Array(UnsafeBufferPointer(start: data + 1, count: size - 1))
    if data[0] & 1 != 0 { repairChecksums(&bytes) }
    let total = UInt64(bytes.count)
    let reader: TraceReader
    do throws(TraceError) {
        reader = try TraceReader(source: MemoryTraceSource(bytes))
    } catch {
        check(error.offset <= total, "header error at byte \(error.offset) of \(total): \(error)")
        return 0
    }
    var model = WhatIfModel(policy: policy, mode: data[0] & 2 == 0 ? .exact : .lazy)
    var last: UInt64 = 0
    var records = 0
    do throws(TraceError) {
        while let ev = try reader.next() {
            records += 1
            check(records <= bytes.count, "more records (\(records)) than bytes (\(bytes.count))")
            check(ev.timestamp >= last, "timestamp \(ev.timestamp) after \(last)")
            last = ev.timestamp
            if case .exit(let v, let x) = ev.record {
                var e = WhatIfExit(timestamp: ev.timestamp, rip: x.rip, cpl: x.cpl)
                if x.qualification & 4 != 0 { e.fetchGPA = x.gpa } else { e.dataGPA = x.gpa }
                model.feed(vcpu: "vcpu \(v)", e)
            }
        }
        // After the end: nil again, never a record.
        check((try reader.next()) == nil, "a record after the end")
    } catch {
        check(error.offset <= total, "error at byte \(error.offset) of \(total): \(error)")
        do throws(TraceError) {
            _ = try reader.next()
            check(false, "the error \(error) was not sticky")
        } catch let again {
            check(again == error, "a second error \(again) after \(error)")
        }
    }
    _ = model.total
    return 0
}
