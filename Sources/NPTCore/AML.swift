/// A small encoder for ACPI Machine Language (ACPI 6.x chapter 20, "ACPI Machine Language (AML)
/// Specification"): the objects a definition block needs to declare devices with named values
/// (Scope, Device, Name, integers, strings) and the table around them. It writes the same encodings
/// ACPICA's `iasl` chooses for these objects, so `iasl -d` decodes the result and compiling the
/// decoded source gives the same AML body back.
package enum AML {
    /// A 4-character name segment (§20.2.2 NameSeg: a lead character `A`-`Z` or `_`, then three of
    /// `A`-`Z`, `0`-`9`, `_`). Shorter names are padded with `_`, as ASL does.
    package static func nameSeg(_ name: String) throws(NPTError) -> [UInt8] {
        var b = Array(name.utf8)
        guard !b.isEmpty, b.count <= 4 else { throw .invalid("AML name \"\(name)\" is not 1 to 4 characters") }
        func lead(_ c: UInt8) -> Bool { (c >= UInt8(ascii: "A") && c <= UInt8(ascii: "Z")) || c == UInt8(ascii: "_") }
        func rest(_ c: UInt8) -> Bool { lead(c) || (c >= UInt8(ascii: "0") && c <= UInt8(ascii: "9")) }
        guard lead(b[0]), b.dropFirst().allSatisfy(rest) else {
            throw .invalid("AML name \"\(name)\" is not a NameSeg (A-Z or _, then A-Z, 0-9 or _)")
        }
        while b.count < 4 { b.append(UInt8(ascii: "_")) }
        return b
    }

    /// PkgLength (§20.2.4) for a package whose contents after the PkgLength are `contentLength`
    /// bytes. The encoded value counts the PkgLength bytes themselves: one byte up to 63, else a lead
    /// byte (bits 7-6: how many bytes follow, bits 3-0: the low nibble) and 1-3 more bytes.
    package static func pkgLength(contentLength: Int) throws(NPTError) -> [UInt8] {
        if contentLength + 1 <= 0x3F { return [UInt8(contentLength + 1)] }
        for extra in 1...3 {
            let total = contentLength + 1 + extra
            if total < 1 << (4 + 8 * extra) {
                var out = [UInt8(extra << 6) | UInt8(total & 0xF)]
                for i in 0..<extra { out.append(UInt8(truncatingIfNeeded: total >> (4 + 8 * i))) }
                return out
            }
        }
        throw .invalid("AML package of \(contentLength) bytes is longer than a PkgLength can say (2^28 - 1)")
    }

    /// An integer constant (§20.2.3 ComputationalData / ConstObj): ZeroOp, OneOp, OnesOp for
    /// 0xFFFFFFFFFFFFFFFF, else the smallest of BytePrefix, WordPrefix, DWordPrefix, QWordPrefix.
    package static func integer(_ v: UInt64) -> [UInt8] {
        func le(_ prefix: UInt8, _ n: Int) -> [UInt8] {
            [prefix] + (0..<n).map { UInt8(truncatingIfNeeded: v >> (8 * UInt64($0))) }
        }
        switch v {
        case 0: return [0x00]
        case 1: return [0x01]
        case .max: return [0xFF]
        case ...0xFF: return le(0x0A, 1)
        case ...0xFFFF: return le(0x0B, 2)
        case ...0xFFFF_FFFF: return le(0x0C, 4)
        default: return le(0x0E, 8)
        }
    }

    /// A string constant (§20.2.3 String: StringPrefix, ASCII characters 0x01-0x7F, NUL).
    package static func string(_ s: String) throws(NPTError) -> [UInt8] {
        let b = Array(s.utf8)
        guard b.allSatisfy({ $0 >= 0x01 && $0 <= 0x7F }) else { throw .invalid("AML string \"\(s)\" is not ASCII without NUL") }
        return [0x0D] + b + [0x00]
    }

    /// Name (NameSeg, DataObject) (§20.2.5.1 DefName).
    package static func name(_ seg: String, _ value: [UInt8]) throws(NPTError) -> [UInt8] {
        [0x08] + (try nameSeg(seg)) + value
    }

    /// Device (NameSeg) { body } (§20.2.5.2 DefDevice: ExtOpPrefix 0x5B, DeviceOp 0x82).
    package static func device(_ seg: String, _ body: [UInt8]) throws(NPTError) -> [UInt8] {
        let content = (try nameSeg(seg)) + body
        return [0x5B, 0x82] + (try pkgLength(contentLength: content.count)) + content
    }

    /// Scope (\SEG) { body } for a name in the root (§20.2.5.1 DefScope, RootChar `\`).
    package static func rootScope(_ seg: String, _ body: [UInt8]) throws(NPTError) -> [UInt8] {
        let content = [UInt8(ascii: "\\")] + (try nameSeg(seg)) + body
        return [0x10] + (try pkgLength(contentLength: content.count)) + content
    }

    /// A definition block (§5.2.11: the 36-byte system description table header of §5.2.6, then
    /// `body`), with the length and checksum filled in. Revision 2 or more makes AML integers 64-bit.
    package static func definitionBlock(signature: String, revision: UInt8 = 2, oemID: String = "NPTKIT",
                                       oemTableID: String, oemRevision: UInt32 = 1, creatorID: String = "NPTK",
                                       creatorRevision: UInt32 = 1, body: [UInt8]) -> [UInt8] {
        func fixed(_ s: String, _ n: Int) -> [UInt8] {
            let b = Array(s.utf8.prefix(n))
            return b + [UInt8](repeating: 0x20, count: n - b.count)
        }
        func le32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (8 * UInt32($0))) } }
        var out = fixed(signature, 4) + le32(UInt32(truncatingIfNeeded: 36 + body.count)) + [revision, 0]
        out += fixed(oemID, 6) + fixed(oemTableID, 8) + le32(oemRevision) + fixed(creatorID, 4) + le32(creatorRevision)
        out += body
        out[9] = 0 &- out.reduce(UInt8(0), &+)
        return out
    }
}
