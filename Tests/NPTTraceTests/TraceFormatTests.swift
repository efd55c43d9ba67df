import Testing
#if canImport(Glibc)
import Glibc
#endif
@testable import NPTTrace

/// A deterministic generator (SplitMix64) so failures reproduce.
struct Rng {
    var s: UInt64
    mutating func next() -> UInt64 {
        s &+= 0x9E37_79B9_7F4A_7C15
        var z = s
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    mutating func below(_ n: UInt64) -> UInt64 { next() % n }
    /// Values of every size: small, 32-bit, full 64-bit, and 0.
    mutating func value() -> UInt64 {
        switch below(4) {
        case 0: return below(300)
        case 1: return next() & 0xFFFF_FFFF
        case 2: return next()
        default: return 0
        }
    }
    mutating func u32() -> UInt32 { UInt32(truncatingIfNeeded: value()) }
    mutating func bytes(_ max: UInt64) -> [UInt8] { (0..<below(max + 1)).map { _ in UInt8(truncatingIfNeeded: next()) } }
}

func randomExit(_ r: inout Rng) -> TraceExit {
    TraceExit(reason: TraceExitReason(rawValue: UInt32(r.below(14))), gpa: r.value(), gva: r.value(), qualification: r.value(),
              vector: r.u32(), cpl: r.below(2) == 0 ? 0 : 3, hierarchy: UInt32(r.below(2)), ioPort: r.u32(), ioValue: r.value(),
              rip: r.value())
}

func randomRegs(_ r: inout Rng) -> TraceRegs {
    var g = TraceRegs()
    for i in 0..<TraceRegs.fieldCount where r.below(2) == 0 { g.setField(i, i == 0 ? r.below(4) : r.value()) }
    return g
}

/// One random record of every kind the format has (the end record excluded: finish() writes it).
/// `minor`: the kinds of that version only (the 1.1 golden trace's generator must stay as it was).
func randomRecord(_ r: inout Rng, minor: UInt16 = TraceFormat.minor) -> TraceRecord {
    let v = UInt32(r.below(64))
    switch r.below(36) {
    case 0: return .meta(key: "key\(r.below(10))", value: "välue \(r.next())")
    case 1: return .vmCreate(TraceVMConfig(mbecMode: UInt32(r.below(3)), ramSize: r.value(), defaultPerms: r.value(), maxStepsPerRun: r.value(), backend: "kvm"))
    case 2: return .vmDestroy
    case 3: return .vcpuCreate(vcpu: v)
    case 4: return .vcpuDestroy(vcpu: v)
    case 5: return .policySet(gpa: r.value(), size: r.value(), pageSize: 4096, perms: r.value())
    case 6: return .memoryWrite(gpa: r.value(), data: r.bytes(40))
    case 7, 8, 9: return .exit(vcpu: v, randomExit(&r))
    case 10: return .regsRead(vcpu: v, randomRegs(&r))
    case 11: return .memoryRead(gpa: r.value(), data: r.bytes(16))
    case 12:
        return .hostPMemRegion(TraceHostPMemRegion(index: r.u32(), id: r.u32(), base: r.value(), length: r.value(), controllerCount: r.u32(),
                                                   needsWPQFlush: r.below(2) == 0,
                                                   targets: (0..<r.below(4)).map { _ in .init(controller: r.u32(), address: r.value()) }))
    case 13: return .status(kind: UInt8(r.below(256)), status: Int32(truncatingIfNeeded: Int64(bitPattern: r.next())))
    case 14: return .hierarchy(vcpu: v, hierarchy: UInt32(r.below(2)))
    case 15: return .exitControls(vcpu: v, controls: UInt32(r.below(4)))
    case 16: return .invalidate(hierarchy: UInt32(r.below(2)), gpa: r.value(), size: r.value())
    case 17: return .injectFault(vcpu: v, vector: UInt32(r.below(32)), errorCode: r.value(), address: r.value())
    case 18: return .kick(vcpu: v)
    case 19, 20: return .decision(vcpu: v, action: TraceAction(rawValue: UInt8(r.below(3)))!, exit: randomExit(&r))
    case 21: return .regsWritten(vcpu: v, randomRegs(&r))
    case 22: return .privileged(vcpu: v, step: TracePrivilegedStep(rawValue: UInt8(r.below(8)))!, gpa: r.value(), length: r.value())
    case 23: return .defineRegion(gpa: r.value(), size: r.value(), hostOffset: r.value(), contents: r.bytes(64))
    case 24:
        switch r.below(5) {
        case 0: return .attachPMem(gpa: r.value(), size: r.value(), region: r.u32(), regionOffset: r.value(), hostOffset: r.value())
        case 1: return .flushHintPage(gpa: r.value(), hostOffset: r.value(), trapped: r.below(2) == 0)
        case 2: return .physicalFlush(region: r.u32(), controller: r.u32(), address: r.value())
        case 3: return .fence(vcpu: v)
        default: return .trappedWriteCompleted(vcpu: v)
        }
    // 1.1
    case 26: return .memoryDigest(gpa: r.value(), length: r.value(), crc: r.u32())
    case 27: return r.below(2) == 0 ? .powerFailure : .vmSelect(vm: r.u32())
    case 28: return .note(key: "note\(r.below(5))", values: (0..<r.below(6)).map { _ in r.value() })
    case 29: return .backendInfo(TraceBackendInfo(name: "b\(r.below(9))", capabilities: r.value(), guestISA: UInt32(r.below(4)),
                                                  abiVersion: r.u32(), description: "ünïcode \(r.next())"))
    case 30: return .backendStats(vcpu: r.below(2) == 0 ? nil : v, stats: (0..<r.below(5)).map { i in TraceStat(name: "stat_\(i)", value: r.value()) })
    case 31: return r.below(2) == 0 ? .untrappedWrites(count: r.value()) : .hostPMemCount(count: r.u32())
    case 32: return .failure(vcpu: r.below(3) == 0 ? nil : r.u32(), kind: UInt8(r.below(256)),
                             status: Int32(truncatingIfNeeded: Int64(bitPattern: r.next())), message: "why \(r.below(1000))")
    case 33: return .privilegedEnter(vcpu: v, regionGPA: r.value(), regionSize: r.value(), entryRIP: r.value())
    // 1.2
    case 34 where minor >= 2:
        return .lockTurn(vcpu: r.below(4) == 0 ? nil : v, site: TraceLockSite(rawValue: UInt8(r.below(10)))!, value: r.below(2))
    default: return .exit(vcpu: v, TraceExit(reason: .io, ioPort: 0xE0, ioValue: r.below(256), rip: 0x10000 + r.below(64)))
    }
}

/// Writes `records` (timestamps increasing by random steps) and returns the bytes and the events.
func writeTrace(_ records: [TraceRecord], seed: UInt64 = 1, blockPayload: Int = 512,
                minor: UInt16 = TraceFormat.minor) throws -> ([UInt8], [TraceEvent]) {
    let sink = MemoryTraceSink()
    let w = try TraceWriter(sink: sink, blockPayload: blockPayload, minor: minor)
    var r = Rng(s: seed)
    var t: UInt64 = 1_700_000_000_000_000_000
    var events: [TraceEvent] = []
    for (i, rec) in records.enumerated() {
        t += r.below(3) == 0 ? 0 : r.below(100_000)
        try w.append(rec, at: t)
        events.append(TraceEvent(index: UInt64(i), offset: 0, timestamp: t, record: rec))
    }
    try w.finish()
    return (sink.bytes, events)
}

func readAll(_ bytes: [UInt8]) throws(TraceError) -> [TraceEvent] {
    let r = try TraceReader(bytes: bytes)
    var out: [TraceEvent] = []
    while let e = try r.next() { out.append(e) }
    return out
}

/// The record sequence of the 1.1 golden trace: every kind the random generator makes, then
/// records whose body needs a 2- and 3-byte length and one larger than a block's target.
func golden11Records() -> [TraceRecord] {
    var r = Rng(s: 0x1_1)
    var recs = (0..<1500).map { _ in randomRecord(&r, minor: 1) }
    recs.insert(.memoryWrite(gpa: 0x1000, data: (0..<200).map { UInt8(truncatingIfNeeded: $0) }), at: 700)
    recs.insert(.memoryRead(gpa: 0x2000, data: (0..<3000).map { UInt8(truncatingIfNeeded: $0 &* 7) }), at: 900)
    recs.insert(.defineRegion(gpa: 0x4000_0000, size: 1 << 20, hostOffset: 0, contents: (0..<20_000).map { UInt8(truncatingIfNeeded: $0 >> 3) }), at: 1100)
    return recs
}

/// Every block's start offset, walking the block headers (the test's own reading of the layout).
func blockOffsets(_ b: [UInt8]) -> [Int] {
    var out: [Int] = []
    var at = TraceFormat.headerSize
    while at + 20 <= b.count {
        out.append(at)
        let len = Int(b[at]) | Int(b[at + 1]) << 8 | Int(b[at + 2]) << 16 | Int(b[at + 3]) << 24
        at += 20 + len
    }
    return out
}

@Suite struct TraceFormatTests {
    /// The published check values (RFC 3720 B.4 and the CRC catalogue's "123456789"), and both
    /// fast paths (the crc32 instruction where this CPU has it, slicing-by-8) equal to the bytewise
    /// definition at every length and alignment, chained.
    @Test func crc32cMatchesTheStandardAndTheBytewiseDefinition() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
        #expect(CRC32C.checksum([UInt8](repeating: 0xFF, count: 32)) == 0x62A8_AB43)
        #expect(CRC32C.checksum((0..<32).map { UInt8($0) }) == 0x46DD_794E)
        var r = Rng(s: 32)
        let data = r.bytes(300) + (0..<300).map { _ in UInt8(truncatingIfNeeded: r.next()) }
        data.withUnsafeBytes { b in
            for offset in 0..<9 {
                for length in 0..<(b.count - offset) where length < 80 || length % 37 == 0 {
                    let part = UnsafeRawBufferPointer(rebasing: b[offset..<offset + length])
                    let seed = UInt32(truncatingIfNeeded: r.next())
                    let reference = CRC32C.bytewise(seed, part)
                    #expect(CRC32C.update(seed, part) == reference, "offset \(offset) length \(length)")
                    #expect(CRC32C.sliced(seed, part) == reference, "offset \(offset) length \(length)")
                }
            }
            let whole = CRC32C.update(0, b)
            let split = CRC32C.update(CRC32C.update(0, UnsafeRawBufferPointer(rebasing: b[0..<13])), UnsafeRawBufferPointer(rebasing: b[13...]))
            #expect(whole == split && whole == CRC32C.bytewise(0, b))
        }
    }

    @Test func randomRecordsRoundTrip() throws {
        var r = Rng(s: 42)
        let records = (0..<5000).map { _ in randomRecord(&r) }
        let (bytes, written) = try writeTrace(records)
        let read = try readAll(bytes)
        #expect(read.count == written.count + 1)
        for (a, b) in zip(written, read) {
            #expect(a.record == b.record, "record \(a.index)")
            #expect(a.timestamp == b.timestamp, "record \(a.index)")
            #expect(a.index == b.index)
        }
        #expect(read.last?.record == .end(recordCount: UInt64(records.count)))
        #expect(blockOffsets(bytes).count > 10, "the 512-byte blocks split the trace")
    }

    /// The recording layer's hot path (`appendExitPath`) writes exactly the bytes `append` writes
    /// for the same record, interleaved with every other kind (the exit state is shared).
    @Test func theExitPathWritesTheBytesAppendWrites() throws {
        var r = Rng(s: 99)
        let records = (0..<6000).map { _ in randomRecord(&r) }
        let (expected, _) = try writeTrace(records)
        let sink = MemoryTraceSink()
        let w = try TraceWriter(sink: sink, blockPayload: 512)
        var tr = Rng(s: 1)
        var t: UInt64 = 1_700_000_000_000_000_000
        var fast = 0
        for rec in records {
            t += tr.below(3) == 0 ? 0 : tr.below(100_000)
            switch rec {
            case .exit(let v, let e): try w.appendExitPath(.exit, vcpu: v, exit: e, at: t); fast += 1
            case .hierarchy(let v, let h): try w.appendExitPath(.hierarchy, vcpu: v, value: h, exit: TraceExit(), at: t); fast += 1
            case .exitControls(let v, let c): try w.appendExitPath(.exitControls, vcpu: v, value: c, exit: TraceExit(), at: t); fast += 1
            case .decision(let v, let a, let e): try w.appendExitPath(.decision, vcpu: v, action: a.rawValue, exit: e, at: t); fast += 1
            default: try w.append(rec, at: t)
            }
        }
        try w.finish()
        #expect(fast > 500, "the generator makes exit-path records (\(fast))")
        let firstDifference = zip(sink.bytes, expected).enumerated().first { $0.element.0 != $0.element.1 }?.offset
        #expect(sink.bytes.count == expected.count && firstDifference == nil,
                "\(sink.bytes.count) bytes vs \(expected.count); first difference at \(firstDifference.map(String.init) ?? "none")")
        #expect(ExitPathRecord.allCases.map(\.rawValue) == [RecordKind.exit, RecordKind.hierarchy, RecordKind.exitControls, RecordKind.decision])
    }

    @Test func everyRecordKindRoundTripsAlone() throws {
        var r = Rng(s: 7)
        var seen = Set<UInt8>()
        for _ in 0..<2000 {
            let rec = randomRecord(&r)
            seen.insert(rec.kind)
            let (bytes, _) = try writeTrace([rec])
            let read = try readAll(bytes)
            #expect(read.map(\.record) == [rec, .end(recordCount: 1)])
        }
        // The exit-path record stands for records of other kinds (CompactExitPathTests).
        #expect(seen == RecordKind.known.subtracting([RecordKind.end, RecordKind.exitPath]), "the generator covers every kind")
    }

    @Test func exitsAreCompact() throws {
        // A syscall-like stream: IO exits with a rip that moves a little, on one vCPU.
        var recs: [TraceRecord] = []
        for i in 0..<10_000 {
            recs.append(.exit(vcpu: 0, TraceExit(reason: i % 2 == 0 ? .escalation : .returnToUser, cpl: i % 2 == 0 ? 3 : 0,
                                               hierarchy: UInt32(i % 2), rip: 0xffff_ffff_8100_0000 + UInt64(i % 7) * 16)))
        }
        let (bytes, _) = try writeTrace(recs, blockPayload: TraceFormat.defaultBlockPayload)
        let perRecord = Double(bytes.count) / Double(recs.count)
        // kind 1, time delta 1-3, length 1, vcpu 1, reason 1, mask 1, rip delta 1-2, cpl 1, hierarchy 1
        #expect(perRecord < 11, "\(perRecord) bytes per exit")
    }

    @Test func largeTraceStreamsThroughAFile() throws {
        let path = "/tmp/npttrace-test-\(getpidValue()).trace"
        defer { unlinkFile(path) }
        let w = try TraceWriter(path: path)
        var r = Rng(s: 99)
        var t: UInt64 = 0
        let n = 300_000
        for i in 0..<n {
            t += 1 + r.below(1000)
            try w.append(.exit(vcpu: UInt32(i % 4), TraceExit(reason: .io, ioPort: 0xE0, ioValue: UInt64(i), rip: 0x1000 + r.below(4096))), at: t)
        }
        try w.finish()
        let reader = try TraceReader(path: path)
        var count = 0
        var last: UInt64 = 0
        while let e = try reader.next() {
            if case .exit(let v, let x) = e.record {
                #expect(v == UInt32(count % 4) && x.ioValue == UInt64(count))
                count += 1
            }
            #expect(e.timestamp >= last)
            last = e.timestamp
        }
        #expect(count == n)
        #expect(last == t)
    }

    @Test func everyTruncationPointIsAnErrorAtTheRightOffset() throws {
        var r = Rng(s: 3)
        let (bytes, _) = try writeTrace((0..<300).map { _ in randomRecord(&r) }, blockPayload: 300)
        let blocks = blockOffsets(bytes)
        #expect(blocks.count > 5)
        for cut in 0..<bytes.count {
            let prefix = Array(bytes[0..<cut])
            var got: TraceError?
            var yielded = 0
            do {
                let reader = try TraceReader(bytes: prefix)
                while try reader.next() != nil { yielded += 1 }
            } catch { got = error }
            guard let e = got else { Issue.record("a trace cut at \(cut) of \(bytes.count) bytes was accepted"); continue }
            if cut < TraceFormat.headerSize {
                #expect(e.offset == 0 && (e.kind == .truncated || e.kind == .badMagic), "cut \(cut): \(e)")
            } else if blocks.contains(cut) || cut == TraceFormat.headerSize {
                #expect(e.kind == .truncated && e.offset == UInt64(cut), "cut \(cut): \(e)")
            } else {
                let block = blocks.last { $0 < cut }!
                #expect(e.kind == .truncated && e.offset == UInt64(block), "cut \(cut): \(e)")
            }
        }
    }

    @Test func randomCorruptionIsAnErrorInTheCorruptedBlock() throws {
        var r = Rng(s: 5)
        let (bytes, written) = try writeTrace((0..<400).map { _ in randomRecord(&r) }, blockPayload: 400)
        let blocks = blockOffsets(bytes)
        for trial in 0..<3000 {
            var b = bytes
            let at = Int(r.below(UInt64(b.count)))
            let flips = 1 + Int(r.below(3))
            var first = at
            for k in 0..<flips {
                let i = min(b.count - 1, at + k * Int(r.below(40)))
                first = min(first, i)
                b[i] ^= UInt8(1 + r.below(255))
            }
            // Two flips of one byte may cancel: the first byte that differs is the corruption.
            guard let changed = zip(b, bytes).enumerated().first(where: { $0.element.0 != $0.element.1 })?.offset else { continue }
            first = changed
            var got: TraceError?
            var read: [TraceEvent] = []
            do {
                let reader = try TraceReader(bytes: b)
                while let e = try reader.next() { read.append(e) }
            } catch { got = error }
            guard let e = got else { Issue.record("trial \(trial): corruption at \(first) accepted"); continue }
            if first < TraceFormat.headerSize {
                #expect(e.offset <= 12, "trial \(trial): header byte \(first): \(e)")
            } else {
                let block = blocks.last { $0 <= first }!
                #expect(e.offset == UInt64(block), "trial \(trial): byte \(first) is in the block at \(block): \(e)")
                // Nothing of the corrupted block or after it was returned, and everything before it was, unchanged.
                #expect(read.allSatisfy { $0.offset < UInt64(block) })
                for (x, y) in zip(read, written) { #expect(x.record == y.record) }
            }
        }
    }

    @Test func unknownVersionIsRefused() throws {
        var (bytes, _) = try writeTrace([.vmDestroy])
        bytes[8] = 2
        #expect(throws: TraceError(.unsupportedVersion, at: 8, "major version 2; this reader reads version 1.x")) { try readAll(bytes) }
        bytes[8] = 1
        bytes[0] = UInt8(ascii: "X")
        #expect(throws: TraceError.self) { try readAll(bytes) }
        do { _ = try readAll(bytes); Issue.record("accepted") } catch { #expect(error.kind == .badMagic && error.offset == 0) }
    }

    @Test func aNewerMinorIsReadAndItsUnknownRecordsSkipped() throws {
        // A writer of minor 3 with a record kind 0x60 this reader does not know (built by hand: kind, delta, length, payload).
        let sink = MemoryTraceSink()
        let w = try TraceWriter(sink: sink, blockPayload: 1 << 16, minor: 3)
        try w.append(.vcpuCreate(vcpu: 0), at: 10)
        try w.append(.kick(vcpu: 0), at: 20)
        try w.finish()
        var b = sink.bytes
        let block = TraceFormat.headerSize
        // Splice an unknown record after the first one: re-encode the block by hand.
        var payload = Array(b[(block + 20)...])
        let firstLen = 3 + Int(payload[2])
        payload.insert(contentsOf: [0x60, 5, 3, 0xAA, 0xBB, 0xCC], at: firstLen)
        var enc = ByteEncoder()
        enc.u32(UInt32(payload.count)); enc.u32(0); enc.u64(10); enc.u32(4)
        var h = enc.bytes
        // the end record counts the unknown one too
        let endAt = payload.count - 4
        #expect(payload[endAt] == RecordKind.end)
        payload[endAt + 3] = 3
        var crc = h.withUnsafeBytes { CRC32C.update(0, UnsafeRawBufferPointer(rebasing: $0[0..<4])) }
        crc = h.withUnsafeBytes { CRC32C.update(crc, UnsafeRawBufferPointer(rebasing: $0[8..<20])) }
        crc = payload.withUnsafeBytes { CRC32C.update(crc, $0) }
        for i in 0..<4 { h[4 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
        b = Array(b[0..<block]) + h + payload
        let reader = try TraceReader(bytes: b)
        #expect(reader.minor == 3)
        var recs: [TraceRecord] = []
        var times: [UInt64] = []
        while let e = try reader.next() { recs.append(e.record); times.append(e.timestamp) }
        #expect(recs == [.vcpuCreate(vcpu: 0), .kick(vcpu: 0), .end(recordCount: 3)])
        #expect(times == [10, 25, 25], "the skipped record's delta (5) still counts: 10, then 10 + 5 + 10")
        #expect(reader.skippedUnknown == 1)
    }

    @Test func outOfOrderTimestampsAreRefused() throws {
        // By the writer:
        let w = try TraceWriter(sink: MemoryTraceSink())
        try w.append(.kick(vcpu: 0), at: 100)
        #expect(throws: TraceError.self) { try w.append(.kick(vcpu: 0), at: 99) }
        // By the reader: a block whose base timestamp is before the previous block's last record.
        let sink = MemoryTraceSink()
        let w2 = try TraceWriter(sink: sink, blockPayload: 64)
        try w2.append(.kick(vcpu: 0), at: 1000)
        try w2.flush()
        try w2.append(.kick(vcpu: 1), at: 2000)
        try w2.finish()
        var b = sink.bytes
        let blocks = blockOffsets(b)
        #expect(blocks.count == 2)
        let second = blocks[1]
        b[second + 8] = 0xE8; b[second + 9] = 0x03 // base 1000 -> still fine (equal)
        b[second + 8] = 0x10; b[second + 9] = 0x00 // base 16: before 1000
        var enc = ByteEncoder()
        let len = Int(b[second]) | Int(b[second + 1]) << 8
        var crc = b.withUnsafeBytes { CRC32C.update(0, UnsafeRawBufferPointer(rebasing: $0[second..<second + 4])) }
        crc = b.withUnsafeBytes { CRC32C.update(crc, UnsafeRawBufferPointer(rebasing: $0[second + 8..<second + 20 + len])) }
        enc.u32(crc)
        for i in 0..<4 { b[second + 4 + i] = enc.bytes[i] }
        do { _ = try readAll(b); Issue.record("accepted") } catch {
            #expect(error.kind == .outOfOrder && error.offset == UInt64(second), "\(error)")
        }
    }

    @Test func errorsAreStickyAndNothingIsReturnedPastThem() throws {
        var r = Rng(s: 11)
        let (bytes, _) = try writeTrace((0..<100).map { _ in randomRecord(&r) }, blockPayload: 200)
        var b = bytes
        let blocks = blockOffsets(b)
        b[blocks[2] + 25] ^= 0x40
        let reader = try TraceReader(bytes: b)
        var n = 0
        var first: TraceError?
        while true {
            do { guard try reader.next() != nil else { break }; n += 1 } catch { first = error; break }
        }
        #expect(first?.offset == UInt64(blocks[2]))
        #expect(throws: TraceError.self) { _ = try reader.next() }
        #expect(n > 0)
    }

    @Test func dataAfterTheEndRecordIsRefused() throws {
        let (bytes, _) = try writeTrace([.vmDestroy])
        do { _ = try readAll(bytes + bytes[TraceFormat.headerSize...]); Issue.record("accepted") } catch {
            #expect(error.kind == .corrupt && error.offset == UInt64(bytes.count), "\(error)")
        }
    }

    @Test func divergenceNamesTheEventBothDecisionsAndTheContext() throws {
        var checker = DecisionChecker(context: 3)
        let evs = (0..<5).map { TraceEvent(index: UInt64($0), offset: UInt64(100 + $0), timestamp: UInt64($0), record: .kick(vcpu: UInt32($0))) }
        for e in evs.prefix(4) { checker.observe(e) }
        let recorded = TraceEvent(index: 7, offset: 300, timestamp: 9, record: .hierarchy(vcpu: 0, hierarchy: 0))
        let same = checker.check(recorded: recorded, replayed: .hierarchy(vcpu: 0, hierarchy: 0))
        #expect(same == nil)
        let flipped = checker.check(recorded: recorded, replayed: .hierarchy(vcpu: 0, hierarchy: 1))
        let d = try #require(flipped)
        #expect(d.recorded?.index == 7)
        #expect(d.context.map(\.index) == [2, 3, 7])
        #expect(d.description.contains("replay diverged at event 7 (byte offset 300"))
        #expect(d.description.contains("recorded: hierarchy vcpu 0: supervisor"))
        #expect(d.description.contains("replayed: hierarchy vcpu 0: user"))
    }
}

/// A committed trace of version 1.0 (Tests/Fixtures/npttrace/golden-1.0.trace): the writer must keep
/// producing exactly these bytes, and the reader must keep reading them, so a change of the format
/// shows here. Regenerate (only for a deliberate, versioned change) with NPTTRACE_WRITE_GOLDEN=1.
/// Lock turns (1.2): every site round-trips, for a vCPU and for the VMM, with its value; the
/// header says this version's minor (1.2 or later); a site this version does not define is refused with its offset.
@Suite struct LockTurnRecordTests {
    @Test func everySiteRoundTrips() throws {
        var recs: [TraceRecord] = []
        for site in TraceLockSite.allCases {
            recs.append(.lockTurn(vcpu: site == .read ? nil : 7, site: site, value: site == .entryWake ? 1 : 0))
        }
        recs.append(.lockTurn(vcpu: UInt32.max, site: .checkpoint, value: UInt64.max))
        let (bytes, events) = try writeTrace(recs)
        #expect(bytes[10] == UInt8(TraceFormat.minor) && bytes[11] == 0 && TraceFormat.minor >= 2)
        let read = try readAll(bytes)
        #expect(read.map(\.record) == events.map(\.record) + [.end(recordCount: UInt64(events.count))])
        #expect(TraceRecord.lockTurn(vcpu: nil, site: .read, value: 0).description == "lock-turn vmm: read")
        #expect(TraceRecord.lockTurn(vcpu: 2, site: .entryWake, value: 1).description == "lock-turn vcpu 2: entry-wake value 1")
        #expect(TraceLockSite.allCases.map(\.party) == [1, 2, 0, 0, 0, 0, 0, 0, 3, 0])
    }

    @Test func anUndefinedSiteIsRefused() throws {
        let (good, _) = try writeTrace([.lockTurn(vcpu: 1, site: .leave, value: 0)])
        // The record: kind 0x33, delta, length 3, scope 2 (vCPU 1), site 7, value 0. Make the site 10.
        var bad = good
        let at = try #require((TraceFormat.headerSize..<bad.count - 5).first { bad[$0] == 0x33 && bad[$0 + 3] == 2 && bad[$0 + 4] == 7 })
        bad[at + 4] = 10
        fixBlockCRC(&bad)
        #expect(throws: TraceError.self) { _ = try readAll(bad) }
        do { _ = try readAll(bad) } catch { #expect("\(error)".contains("unknown lock-turn site 10"), "\(error)") }
    }
}

/// Recomputes the CRC of every block of `b` (length, then CRC over length, base and count, payload).
func fixBlockCRC(_ b: inout [UInt8]) {
    for at in blockOffsets(b) {
        let len = Int(b[at]) | Int(b[at + 1]) << 8 | Int(b[at + 2]) << 16 | Int(b[at + 3]) << 24
        var crc = b.withUnsafeBytes { CRC32C.update(0, UnsafeRawBufferPointer(rebasing: $0[at..<at + 4])) }
        crc = b.withUnsafeBytes { CRC32C.update(crc, UnsafeRawBufferPointer(rebasing: $0[at + 8..<at + 20 + len])) }
        for i in 0..<4 { b[at + 4 + i] = UInt8(truncatingIfNeeded: crc >> (8 * UInt32(i))) }
    }
}

@Suite struct GoldenTraceTests {
    static func records() -> [(UInt64, TraceRecord)] {
        var regs = TraceRegs()
        regs.cpl = 3; regs.rip = 0x10004; regs.rflags = 0x202; regs.gpr[4] = 0x12000; regs.cr0 = 0x8001_0033; regs.cr3 = 0x1000
        regs.cr4 = 0x30_0020; regs.efer = 0xd01; regs.lstar = 0xb000
        return [
            (1000, .meta(key: "backend", value: "sim")),
            (1000, .meta(key: "clock", value: "CLOCK_MONOTONIC")),
            (1100, .vmCreate(TraceVMConfig(mbecMode: 0, ramSize: 64 << 20, defaultPerms: 3, maxStepsPerRun: 0, backend: "sim"))),
            (1200, .policySet(gpa: 0xb000, size: 0x1000, pageSize: 0x1000, perms: 0x5)),
            (1300, .memoryWrite(gpa: 0x10000, data: [0x90, 0x90, 0xf4])),
            (1400, .vcpuCreate(vcpu: 0)),
            (1500, .exitControls(vcpu: 0, controls: 3)),
            (2000, .exit(vcpu: 0, TraceExit(reason: .escalation, cpl: 3, hierarchy: 1, rip: 0x10004))),
            (2010, .regsRead(vcpu: 0, regs)),
            (2020, .hierarchy(vcpu: 0, hierarchy: 0)),
            (2030, .decision(vcpu: 0, action: .resume, exit: TraceExit(reason: .escalation, cpl: 3, hierarchy: 1, rip: 0x10004))),
            (3000, .exit(vcpu: 0, TraceExit(reason: .eptViolation, gpa: 0x9000, gva: 0x9000, qualification: 0x384, cpl: 0, hierarchy: 0, rip: 0x9000))),
            (3010, .decision(vcpu: 0, action: .reportViolation, exit: TraceExit(reason: .mbecViolation, gpa: 0x9000, gva: 0x9000, qualification: 0x384, rip: 0x9000))),
            (3020, .injectFault(vcpu: 0, vector: 20, errorCode: 0, address: 0x9000)),
            (4000, .invalidate(hierarchy: 1, gpa: 0xb000, size: 0x1000)),
            (5000, .privileged(vcpu: 0, step: .requested, gpa: 0, length: 0)),
            (5001, .kick(vcpu: 1)),
            (5002, .privileged(vcpu: 1, step: .stopAcknowledged, gpa: 0, length: 0)),
            (5003, .privileged(vcpu: 0, step: .regionMapped, gpa: 0x4000_0000, length: 0x10000)),
            (6000, .hostPMemRegion(TraceHostPMemRegion(index: 0, id: 1, base: 0x1_0000_0000, length: 1 << 30, controllerCount: 2,
                                                       needsWPQFlush: true, targets: [.init(controller: 0, address: 0xfed0_0000),
                                                                                      .init(controller: 1, address: 0xfed0_1000)]))),
            (6100, .flushHintPage(gpa: 0x8020_0000, hostOffset: 0x400_0000, trapped: true)),
            (6200, .fence(vcpu: 0)),
            (6300, .physicalFlush(region: 1, controller: 0, address: 0xfed0_0000)),
            (6400, .trappedWriteCompleted(vcpu: 0)),
            (6500, .status(kind: RecordKind.physicalFlush, status: -12)),
            (7000, .vcpuDestroy(vcpu: 0)),
            (7001, .vmDestroy),
        ]
    }

    /// Tests/Fixtures/npttrace/golden-1.1.trace was written by the writer before it encoded in place
    /// (commit b7055ea: a frame array and a scratch array a record, two writes a block): the
    /// in-place writer must produce the same bytes for every record kind, long bodies and blocks
    /// split at the target included.
    @Test func golden11TraceIsWrittenByteForByte() throws {
        let path = fixturesDirectory() + "/npttrace/golden-1.1.trace"
        // Written as minor 1 (a 1.2 writer still writes a 1.1 trace byte for byte when asked for it).
        let (bytes, events) = try writeTrace(golden11Records(), seed: 0x11, blockPayload: 512, minor: 1)
        let src = try FileTraceSource(path: path)
        var golden = [UInt8](repeating: 0, count: 1 << 20)
        let n = try golden.withUnsafeMutableBytes { try src.read(into: $0) }
        golden = Array(golden[0..<n])
        #expect(golden.count == bytes.count)
        #expect(golden == bytes, "the writer's bytes changed: a format change needs a new version")
        let read = try readAll(golden)
        #expect(read.map(\.record) == events.map(\.record) + [.end(recordCount: UInt64(events.count))])
        #expect(blockOffsets(golden).count > 20)
    }

    @Test func goldenTraceReadsAndWritesTheSameBytes() throws {
        let path = fixturesDirectory() + "/npttrace/golden-1.0.trace"
        let sink = MemoryTraceSink()
        // A writer of a later minor still writes a 1.0 trace byte for byte when asked for minor 0.
        let w = try TraceWriter(sink: sink, blockPayload: 256, minor: 0)
        for (t, r) in GoldenTraceTests.records() { try w.append(r, at: t) }
        try w.finish()
        if readTextFile("/proc/self/environ")?.contains("NPTTRACE_WRITE_GOLDEN=1") == true {
            let f = try FileTraceSink(path: path)
            try sink.bytes.withUnsafeBytes { try f.write($0) }
            try f.close()
        }
        let src = try FileTraceSource(path: path)
        var golden = [UInt8](repeating: 0, count: 1 << 16)
        let n = try golden.withUnsafeMutableBytes { try src.read(into: $0) }
        golden = Array(golden[0..<n])
        #expect(golden == sink.bytes, "the writer's bytes changed: a format change needs a new version")
        let read = try readAll(golden)
        #expect(read.map(\.record) == GoldenTraceTests.records().map(\.1) + [.end(recordCount: 27)])
        #expect(read.map(\.timestamp) == GoldenTraceTests.records().map(\.0) + [7001])
        #expect(blockOffsets(golden).count >= 2)
    }
}

/// The recorder's clock: the TSC only where it can stand for CLOCK_MONOTONIC, and then in step with it.
@Suite struct TraceClockTests {
    @Test func theTSCIsUsedOnlyWhenInvariantAndTheKernelsClocksource() {
        let both: [Substring] = ["fpu", "constant_tsc", "nonstop_tsc", "rdtscp"]
#if arch(x86_64)
        #expect(TSCClock.usable(cpuFlags: both, clocksource: "tsc"))
#else
        #expect(!TSCClock.usable(cpuFlags: both, clocksource: "tsc"))
#endif
        #expect(!TSCClock.usable(cpuFlags: ["fpu", "constant_tsc"], clocksource: "tsc"), "not invariant across C-states")
        #expect(!TSCClock.usable(cpuFlags: ["nonstop_tsc"], clocksource: "tsc"), "rate changes with the P-state")
        #expect(!TSCClock.usable(cpuFlags: both, clocksource: "kvm-clock"), "the kernel does not trust it")
        #expect(!TSCClock.usable(cpuFlags: [], clocksource: ""))
        // This machine's answer agrees with what the kernel says.
        let flags = TSCClock.cpuFlags(), source = TSCClock.clocksource()
        #expect((TraceClock.tsc != nil) == TSCClock.usable(cpuFlags: flags, clocksource: source), "\(source)")
    }

    /// Over 50 ms of sleep, `TraceClock.now()` advances as CLOCK_MONOTONIC does (within 0.5% and
    /// the reads' own spread), and it never goes backwards.
    @Test func nowKeepsStepWithClockMonotonic() {
        func together() -> (now: UInt64, mono: UInt64) {
            var best = (UInt64(0), UInt64(0)), width = UInt64.max
            for _ in 0..<20 {
                let a = TraceClock.monotonicNanoseconds(), n = TraceClock.now(), b = TraceClock.monotonicNanoseconds()
                if b - a < width { width = b - a; best = (n, a / 2 + b / 2) }
            }
            return best
        }
        let x = together()
        usleep(50_000)
        let y = together()
        let dNow = Double(y.now - x.now), dMono = Double(y.mono - x.mono)
        #expect(dMono >= 50e6)
        #expect(abs(dNow - dMono) <= dMono * 0.005 + 20_000, "TraceClock \(dNow) ns, CLOCK_MONOTONIC \(dMono) ns (\(TraceClock.name))")
        var last = TraceClock.now(), backwards = 0
        for _ in 0..<100_000 {
            let t = TraceClock.now()
            if t < last { backwards += 1 }
            last = t
        }
        #expect(backwards == 0)
        if let t = TraceClock.tsc { #expect(t.calibrationNs >= 2_000_000 && t.megahertz > 100, "\(TraceClock.name)") }
    }
}
