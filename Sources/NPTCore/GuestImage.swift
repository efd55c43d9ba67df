/// A sparse guest-physical memory image, and a builder of x86-64 4-level guest page tables in it.
/// Used to prepare guests (demo, tests, benchmarks) and as the memory of the reference model.
package struct GuestImage: Sendable {
    package private(set) var pages: [UInt64: [UInt8]] = [:]
    package init() {}

    package func read64(_ gpa: UInt64) -> UInt64 {
        guard let p = pages[gpa >> 12] else { return 0 }
        let o = Int(gpa & 0xFFF)
        var v: UInt64 = 0
        for i in 0..<8 where o + i < 4096 { v |= UInt64(p[o + i]) << (8 * UInt64(i)) }
        return v
    }

    package mutating func write64(_ gpa: UInt64, _ v: UInt64) {
        let o = Int(gpa & 0xFFF)
        var p = pages[gpa >> 12] ?? [UInt8](repeating: 0, count: 4096)
        for i in 0..<8 where o + i < 4096 { p[o + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) }
        pages[gpa >> 12] = p
    }

    package mutating func write(_ gpa: UInt64, _ bytes: [UInt8]) {
        var off = 0
        while off < bytes.count {
            let a = gpa + UInt64(off)
            let o = Int(a & 0xFFF)
            let n = min(4096 - o, bytes.count - off)
            var p = pages[a >> 12] ?? [UInt8](repeating: 0, count: 4096)
            p.replaceSubrange(o..<(o + n), with: bytes[off..<(off + n)])
            pages[a >> 12] = p
            off += n
        }
    }

    /// Copies every page into a VM.
    package func load(into vm: VirtualMachine) throws(NPTError) {
        for (frame, bytes) in pages.sorted(by: { $0.key < $1.key }) {
            try vm.writeMemory(GPA(frame << 12), bytes: bytes)
        }
    }
}

/// x86-64 guest paging entry bits.
package struct GuestPTE: OptionSet, Sendable {
    package var rawValue: UInt64
    package init(rawValue: UInt64) { self.rawValue = rawValue }
    package static let present = GuestPTE(rawValue: 1 << 0)
    package static let writable = GuestPTE(rawValue: 1 << 1)
    package static let user = GuestPTE(rawValue: 1 << 2)
    package static let large = GuestPTE(rawValue: 1 << 7)
    package static let noExecute = GuestPTE(rawValue: 1 << 63)
}

/// Builds guest page tables in a `GuestImage`, taking table pages from a bump allocator.
/// Intermediate entries are present, writable and user, so the leaf decides (as operating systems do).
package struct GuestPageTableBuilder: Sendable {
    package let cr3: UInt64
    private var next: UInt64
    private let limit: UInt64
    /// Guest-physical pages used for tables.
    package private(set) var tablePages: [UInt64] = []

    package init(image: inout GuestImage, tableArea: GPARange) {
        cr3 = tableArea.start.raw
        next = tableArea.start.raw + 0x1000
        limit = tableArea.end
        tablePages = [cr3]
        image.write(cr3, [UInt8](repeating: 0, count: 4096))
    }

    package enum BuildError: Error { case outOfTablePages, misaligned }

    /// Maps the 4 KiB page (or 2 MiB page if `flags` has `.large`) at `gva` to `gpa`. The leaf gets
    /// exactly `flags`: leave out `.present` to write a not-present entry.
    package mutating func map(_ image: inout GuestImage, gva: UInt64, gpa: UInt64, flags: GuestPTE) throws(BuildError) {
        let large = flags.contains(.large)
        let leafLevel = large ? 2 : 1
        let align: UInt64 = large ? 0x20_0000 : 0x1000
        guard gva % align == 0, gpa % align == 0 else { throw .misaligned }
        var table = cr3
        var level = 4
        while level > leafLevel {
            let idx = (gva >> (12 + 9 * UInt64(level - 1))) & 511
            let ea = table + idx * 8
            var e = image.read64(ea)
            if e & 1 == 0 {
                guard next + 0x1000 <= limit else { throw .outOfTablePages }
                let t = next
                next += 0x1000
                tablePages.append(t)
                image.write(t, [UInt8](repeating: 0, count: 4096))
                e = t | GuestPTE([.present, .writable, .user]).rawValue
                image.write64(ea, e)
            }
            table = e & 0x000F_FFFF_FFFF_F000
            level -= 1
        }
        let idx = (gva >> (12 + 9 * UInt64(leafLevel - 1))) & 511
        image.write64(table + idx * 8, gpa | flags.rawValue)
    }
}
