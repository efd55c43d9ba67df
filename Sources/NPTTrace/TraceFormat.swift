// The binary trace format's constants, its checksum and its integer encodings
// (docs/trace-format.md describes every byte).

import CNPTTraceFast

package enum TraceFormat {
    /// "NPTTRACE".
    package static let magic: [UInt8] = Array("NPTTRACE".utf8)
    package static let major: UInt16 = 1
    /// Minor versions only add record kinds or trailing fields; a reader of this major reads every minor.
    /// 1.1: vm-select, memory digests, power failure, notes, backend identities and statistics,
    /// untrapped flush-hint writes, host region counts, failures with their message, privileged entries.
    /// 1.2: lock turns (the order of the privileged-mode coordinator's monitor acquisitions).
    /// 1.3: the header flag `compactExitPaths` and the exit-path record it allows.
    package static let minor: UInt16 = 3
    /// Header flag: the trace may hold exit-path records (RecordKind.exitPath), which a reader must
    /// expand; a reader that does not know the flag refuses the trace rather than skip them.
    package static let compactExitPaths: UInt32 = 1
    /// The header flags this version reads (a reader refuses any other bit).
    package static let knownFlags: UInt32 = compactExitPaths
    /// magic (8) + major (2) + minor (2) + flags (4) + CRC-32C of bytes 0..<16 (4).
    package static let headerSize = 20
    /// length (4) + CRC-32C (4) + base timestamp (8) + record count (4).
    package static let blockHeaderSize = 20
    /// The largest block payload a reader accepts (a writer never writes more).
    package static let maxBlockPayload = 1 << 20
    /// The block payload a writer aims for before it starts a new block.
    package static let defaultBlockPayload = 64 << 10
}

/// An error reading or writing a trace, with the byte offset it concerns.
package struct TraceError: Error, Hashable, Sendable, CustomStringConvertible {
    package enum Kind: String, Sendable {
        case badMagic = "not an NPTKit trace"
        case unsupportedVersion = "unsupported version"
        case truncated = "truncated"
        case corrupt = "corrupt"
        case outOfOrder = "timestamps out of order"
        case invalidRecord = "invalid record"
        case io = "I/O error"
        case finished = "trace already finished"
    }
    package var kind: Kind
    /// Byte offset in the trace: of the header, of the block, or of the record concerned.
    package var offset: UInt64
    package var message: String
    package init(_ kind: Kind, at offset: UInt64, _ message: String) {
        self.kind = kind; self.offset = offset; self.message = message
    }
    package var description: String { "trace: \(kind.rawValue) at byte offset \(offset): \(message)" }
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of iSCSI, ext4 and Btrfs.
/// With the SSE4.2 crc32 instruction where the CPU has it (8 bytes an instruction), else
/// slicing-by-8 (`sliced`: eight bytes a step through eight tables, table k being a byte followed
/// by k zero bytes); both give the values of the bytewise definition (`bytewise`; tested).
package enum CRC32C {
    static let hardware = nptrace_crc32c_hw_available() != 0
    /// Continues `crc` (start with 0) over `bytes`.
    package static func update(_ crc: UInt32, _ bytes: UnsafeRawBufferPointer) -> UInt32 {
        guard hardware, let p = bytes.baseAddress else { return sliced(crc, bytes) }
        return ~nptrace_crc32c_hw(~crc, p, bytes.count)
    }
    /// 8 x 256 entries; entries 0..<256 are the bytewise table.
    static let tables: [UInt32] = {
        var t = [UInt32](repeating: 0, count: 8 * 256)
        for i in 0..<256 {
            var c = UInt32(i)
            for _ in 0..<8 { c = (c & 1) != 0 ? (c >> 1) ^ 0x82F6_3B78 : c >> 1 }
            t[i] = c
        }
        for k in 1..<8 {
            for i in 0..<256 { t[k * 256 + i] = (t[(k - 1) * 256 + i] >> 8) ^ t[Int(t[(k - 1) * 256 + i] & 0xFF)] }
        }
        return t
    }()
    /// Slicing-by-8 (where the CPU has no crc32 instruction).
    package static func sliced(_ crc: UInt32, _ bytes: UnsafeRawBufferPointer) -> UInt32 {
        guard var p = bytes.baseAddress else { return crc }
        var n = bytes.count
        var c = ~crc
        tables.withUnsafeBufferPointer { t in
            let t = t.baseAddress!
            while n >= 8 {
                let lo = UInt32(littleEndian: p.loadUnaligned(as: UInt32.self)) ^ c
                let hi = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 4, as: UInt32.self))
                c = t[7 * 256 + Int(lo & 0xFF)] ^ t[6 * 256 + Int((lo >> 8) & 0xFF)]
                    ^ t[5 * 256 + Int((lo >> 16) & 0xFF)] ^ t[4 * 256 + Int(lo >> 24)]
                    ^ t[3 * 256 + Int(hi & 0xFF)] ^ t[2 * 256 + Int((hi >> 8) & 0xFF)]
                    ^ t[1 * 256 + Int((hi >> 16) & 0xFF)] ^ t[Int(hi >> 24)]
                p += 8; n -= 8
            }
            while n > 0 { c = t[Int((c ^ UInt32(p.load(as: UInt8.self))) & 0xFF)] ^ (c >> 8); p += 1; n -= 1 }
        }
        return ~c
    }
    /// The definition, a byte a step (the reference `update` is tested against).
    package static func bytewise(_ crc: UInt32, _ bytes: UnsafeRawBufferPointer) -> UInt32 {
        var c = ~crc
        tables.withUnsafeBufferPointer { t in
            for b in bytes { c = t[Int((c ^ UInt32(b)) & 0xFF)] ^ (c >> 8) }
        }
        return ~c
    }
    package static func checksum(_ bytes: [UInt8]) -> UInt32 {
        bytes.withUnsafeBytes { update(0, $0) }
    }
}

/// The writer's block: its 20-byte header, then the payload, in one allocation the writer owns,
/// encoded in place (no array, no allocation a record; the header is filled by `seal`). Grows
/// (doubling) only for a record larger than what is left; never shrinks.
struct BlockBuffer: ~Copyable {
    var base: UnsafeMutablePointer<UInt8>
    /// Bytes used, the header's included.
    var count = TraceFormat.blockHeaderSize
    var capacity: Int
    init(capacity: Int) {
        self.capacity = max(capacity, TraceFormat.blockHeaderSize + 64)
        base = .allocate(capacity: self.capacity)
    }
    deinit { base.deallocate() }
    var payloadCount: Int { count - TraceFormat.blockHeaderSize }

    @inline(__always) mutating func reserve(_ n: Int) { if count &+ n > capacity { grow(count + n) } }
    @inline(never) mutating func grow(_ needed: Int) {
        var c = capacity
        while c < needed { c *= 2 }
        let b = UnsafeMutablePointer<UInt8>.allocate(capacity: c)
        b.update(from: base, count: count)
        base.deallocate()
        base = b; capacity = c
    }
    @inline(__always) mutating func u8(_ v: UInt8) { reserve(1); base[count] = v; count &+= 1 }
    /// LEB128: 7 bits a byte, least significant first, bit 7 set on every byte but the last.
    @inline(__always) mutating func varint(_ v: UInt64) {
        reserve(10)
        var v = v, p = count
        while v >= 0x80 { base[p] = UInt8(truncatingIfNeeded: v) | 0x80; v >>= 7; p &+= 1 }
        base[p] = UInt8(truncatingIfNeeded: v)
        count = p &+ 1
    }
    /// Zigzag: 0, -1, 1, -2, ... as 0, 1, 2, 3, ..., then LEB128.
    @inline(__always) mutating func signed(_ v: Int64) { varint(UInt64(bitPattern: (v << 1) ^ (v >> 63))) }
    mutating func data(_ d: UnsafeRawBufferPointer) {
        varint(UInt64(d.count))
        reserve(d.count)
        if let s = d.baseAddress { (base + count).update(from: s.assumingMemoryBound(to: UInt8.self), count: d.count) }
        count += d.count
    }
    mutating func data(_ d: [UInt8]) { d.withUnsafeBytes { data($0) } }
    mutating func string(_ s: String) {
        var s = s
        s.withUTF8 { data(UnsafeRawBufferPointer($0)) }
    }
    /// Moves the `n` bytes at `from` by `by` bytes towards the end (room for a longer length field).
    mutating func shift(from: Int, _ n: Int, by: Int) {
        reserve(by)
        UnsafeMutableRawPointer(base + from + by).copyMemory(from: base + from, byteCount: n) // memmove: may overlap
        count += by
    }
    @inline(__always) func putLE32(_ v: UInt32, at: Int) { for i in 0..<4 { base[at + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(i))) } }
    @inline(__always) func putLE64(_ v: UInt64, at: Int) { putLE32(UInt32(truncatingIfNeeded: v), at: at); putLE32(UInt32(truncatingIfNeeded: v >> 32), at: at + 4) }
    /// Fills the header (length, CRC-32C, base timestamp, record count): the block's bytes.
    func seal(base ts: UInt64, records: UInt32) -> UnsafeRawBufferPointer {
        putLE32(UInt32(payloadCount), at: 0)
        putLE64(ts, at: 8)
        putLE32(records, at: 16)
        let raw = UnsafeRawPointer(base)
        var crc = CRC32C.update(0, UnsafeRawBufferPointer(start: raw, count: 4))
        crc = CRC32C.update(crc, UnsafeRawBufferPointer(start: raw + 8, count: count - 8))
        putLE32(crc, at: 4)
        return UnsafeRawBufferPointer(start: raw, count: count)
    }
}

/// Appends fixed-size little-endian integers to a byte array (the trace header; tests that build
/// blocks by hand). Records are encoded in place by `BlockBuffer`.
struct ByteEncoder {
    var bytes: [UInt8] = []
    init(capacity: Int = 64) { bytes.reserveCapacity(capacity) }
    mutating func u8(_ v: UInt8) { bytes.append(v) }
    mutating func u16(_ v: UInt16) { bytes.append(UInt8(v & 0xFF)); bytes.append(UInt8(v >> 8)) }
    mutating func u32(_ v: UInt32) { for i in 0..<4 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * UInt32(i)))) } }
    mutating func u64(_ v: UInt64) { for i in 0..<8 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * UInt64(i)))) } }
}

/// Reads the encodings of docs/trace-format.md from verified block bytes; every error names the
/// byte offset in the trace of the record being decoded.
struct ByteDecoder {
    let base: UnsafeRawBufferPointer
    var pos: Int
    let end: Int
    /// Offset in the trace of the record (for errors).
    let recordOffset: UInt64
    /// The record's number and kind, for errors (the message is built only on failure).
    let recordIndex: UInt64
    let kind: UInt8?

    func fail(_ m: String) -> TraceError {
        TraceError(.invalidRecord, at: recordOffset, "record \(recordIndex)\(kind.map { " (kind \(hex(UInt64($0))))" } ?? ""): \(m)")
    }
    var remaining: Int { end - pos }
    mutating func u8() throws(TraceError) -> UInt8 {
        guard pos < end else { throw fail("ends inside a field") }
        let b = base[pos]; pos += 1
        return b
    }
    mutating func varint() throws(TraceError) -> UInt64 {
        var v: UInt64 = 0
        var shift: UInt64 = 0
        while true {
            guard pos < end else { throw fail("ends inside a varint") }
            let b = base[pos]; pos += 1
            if shift == 63 && b > 1 { throw fail("varint overflows 64 bits") }
            v |= UInt64(b & 0x7F) << shift
            if b < 0x80 { return v }
            shift += 7
            if shift > 63 { throw fail("varint longer than 10 bytes") }
        }
    }
    mutating func u32v() throws(TraceError) -> UInt32 {
        let v = try varint()
        guard v <= UInt64(UInt32.max) else { throw fail("value \(v) does not fit 32 bits") }
        return UInt32(v)
    }
    mutating func signed() throws(TraceError) -> Int64 {
        let z = try varint()
        return Int64(bitPattern: (z >> 1) ^ (0 &- (z & 1)))
    }
    mutating func data() throws(TraceError) -> [UInt8] {
        let n = try varint()
        guard n <= UInt64(remaining) else { throw fail("a \(n)-byte field with \(remaining) bytes left in the record") }
        let out = Array(UnsafeRawBufferPointer(rebasing: base[pos..<pos + Int(n)]))
        pos += Int(n)
        return out
    }
    mutating func string() throws(TraceError) -> String {
        let d = try data()
        guard let s = String(validating: d, as: UTF8.self) else { throw fail("a string that is not UTF-8") }
        return s
    }
}

@inline(__always) func readLE32(_ p: UnsafeRawBufferPointer, _ at: Int) -> UInt32 {
    UInt32(p[at]) | UInt32(p[at + 1]) << 8 | UInt32(p[at + 2]) << 16 | UInt32(p[at + 3]) << 24
}
@inline(__always) func readLE64(_ p: UnsafeRawBufferPointer, _ at: Int) -> UInt64 {
    UInt64(readLE32(p, at)) | UInt64(readLE32(p, at + 4)) << 32
}
