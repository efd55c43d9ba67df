// The binary trace format's constants, its checksum and its integer encodings
// (docs/trace-format.md describes every byte).

public enum TraceFormat {
    /// "NPTTRACE".
    public static let magic: [UInt8] = Array("NPTTRACE".utf8)
    public static let major: UInt16 = 1
    /// Minor versions only add record kinds or trailing fields; a reader of this major reads every minor.
    public static let minor: UInt16 = 0
    /// magic (8) + major (2) + minor (2) + flags (4) + CRC-32C of bytes 0..<16 (4).
    public static let headerSize = 20
    /// length (4) + CRC-32C (4) + base timestamp (8) + record count (4).
    public static let blockHeaderSize = 20
    /// The largest block payload a reader accepts (a writer never writes more).
    public static let maxBlockPayload = 1 << 20
    /// The block payload a writer aims for before it starts a new block.
    public static let defaultBlockPayload = 64 << 10
}

/// An error reading or writing a trace, with the byte offset it concerns.
public struct TraceError: Error, Hashable, Sendable, CustomStringConvertible {
    public enum Kind: String, Sendable {
        case badMagic = "not an NPTKit trace"
        case unsupportedVersion = "unsupported version"
        case truncated = "truncated"
        case corrupt = "corrupt"
        case outOfOrder = "timestamps out of order"
        case invalidRecord = "invalid record"
        case io = "I/O error"
        case finished = "trace already finished"
    }
    public var kind: Kind
    /// Byte offset in the trace: of the header, of the block, or of the record concerned.
    public var offset: UInt64
    public var message: String
    public init(_ kind: Kind, at offset: UInt64, _ message: String) {
        self.kind = kind; self.offset = offset; self.message = message
    }
    public var description: String { "trace: \(kind.rawValue) at byte offset \(offset): \(message)" }
}

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the checksum of iSCSI, ext4 and Btrfs.
public enum CRC32C {
    static let table: [UInt32] = (0..<256).map { i -> UInt32 in
        var c = UInt32(i)
        for _ in 0..<8 { c = (c & 1) != 0 ? (c >> 1) ^ 0x82F6_3B78 : c >> 1 }
        return c
    }
    /// Continues `crc` (start with 0) over `bytes`.
    public static func update(_ crc: UInt32, _ bytes: UnsafeRawBufferPointer) -> UInt32 {
        var c = ~crc
        table.withUnsafeBufferPointer { t in
            for b in bytes { c = t[Int((c ^ UInt32(b)) & 0xFF)] ^ (c >> 8) }
        }
        return ~c
    }
    public static func checksum(_ bytes: [UInt8]) -> UInt32 {
        bytes.withUnsafeBytes { update(0, $0) }
    }
}

/// Appends the encodings of docs/trace-format.md to a byte array.
struct ByteEncoder {
    var bytes: [UInt8] = []
    init(capacity: Int = 64) { bytes.reserveCapacity(capacity) }
    mutating func u8(_ v: UInt8) { bytes.append(v) }
    mutating func u16(_ v: UInt16) { bytes.append(UInt8(v & 0xFF)); bytes.append(UInt8(v >> 8)) }
    mutating func u32(_ v: UInt32) { for i in 0..<4 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * UInt32(i)))) } }
    mutating func u64(_ v: UInt64) { for i in 0..<8 { bytes.append(UInt8(truncatingIfNeeded: v >> (8 * UInt64(i)))) } }
    /// LEB128: 7 bits a byte, least significant first, bit 7 set on every byte but the last.
    mutating func varint(_ v: UInt64) {
        var v = v
        while v >= 0x80 { bytes.append(UInt8(truncatingIfNeeded: v) | 0x80); v >>= 7 }
        bytes.append(UInt8(v))
    }
    /// Zigzag: 0, -1, 1, -2, ... as 0, 1, 2, 3, ..., then LEB128.
    mutating func signed(_ v: Int64) { varint(UInt64(bitPattern: (v << 1) ^ (v >> 63))) }
    mutating func data(_ d: [UInt8]) { varint(UInt64(d.count)); bytes.append(contentsOf: d) }
    mutating func string(_ s: String) { data(Array(s.utf8)) }
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
