/// Address spaces. Three distinct types so that a guest-virtual address can never be passed where a
/// guest-physical one is expected.

/// A guest-virtual (linear) address.
package struct GVA: Hashable, Comparable, Sendable, CustomStringConvertible {
    package var raw: UInt64
    @inlinable package init(_ raw: UInt64) { self.raw = raw }
    package static func < (a: GVA, b: GVA) -> Bool { a.raw < b.raw }
    package var pageNumber: GuestVirtualPage { GuestVirtualPage(raw >> 12) }
    package var description: String { "gva:" + hex(raw) }
}

/// A guest-physical address.
package struct GPA: Hashable, Comparable, Sendable, CustomStringConvertible {
    package var raw: UInt64
    @inlinable package init(_ raw: UInt64) { self.raw = raw }
    package static func < (a: GPA, b: GPA) -> Bool { a.raw < b.raw }
    package var frame: GuestFrame { GuestFrame(raw >> 12) }
    package func advanced(by n: UInt64) -> GPA { GPA(raw &+ n) }
    package var description: String { "gpa:" + hex(raw) }
}

/// A host-physical address (in the simulator: an offset into the VM's backing memory).
package struct HPA: Hashable, Comparable, Sendable, CustomStringConvertible {
    package var raw: UInt64
    @inlinable package init(_ raw: UInt64) { self.raw = raw }
    package static func < (a: HPA, b: HPA) -> Bool { a.raw < b.raw }
    package var description: String { "hpa:" + hex(raw) }
}

/// Page numbers of each space.
package struct GuestVirtualPage: Hashable, Sendable { package var raw: UInt64; package init(_ r: UInt64) { raw = r } }
package struct GuestFrame: Hashable, Sendable {
    package var raw: UInt64
    package init(_ r: UInt64) { raw = r }
    package var address: GPA { GPA(raw << 12) }
}
package struct HostFrame: Hashable, Sendable { package var raw: UInt64; package init(_ r: UInt64) { raw = r } }

/// The three leaf sizes of 4-level x86-64 paging and EPT.
package enum PageSize: UInt64, Sendable, CaseIterable, CustomStringConvertible {
    case size4K = 0x1000
    case size2M = 0x20_0000
    case size1G = 0x4000_0000

    package var bytes: UInt64 { rawValue }
    /// The table level whose entries map this size: 1 = PT, 2 = PD, 3 = PDPT.
    package var level: Int {
        switch self { case .size4K: 1; case .size2M: 2; case .size1G: 3 }
    }
    package init?(bytes: UInt64) { self.init(rawValue: bytes) }
    package var description: String {
        switch self { case .size4K: "4K"; case .size2M: "2M"; case .size1G: "1G" }
    }
}

/// A half-open range of guest-physical addresses.
package struct GPARange: Hashable, Sendable, CustomStringConvertible {
    package var start: GPA
    package var size: UInt64
    package init(start: GPA, size: UInt64) { self.start = start; self.size = size }
    package var end: UInt64 { start.raw &+ size }
    package func contains(_ a: GPA) -> Bool { a.raw >= start.raw && a.raw < end }
    package func overlaps(_ o: GPARange) -> Bool { start.raw < o.end && o.start.raw < end }
    package var description: String { "[\(hex(start.raw)), \(hex(end)))" }
}

@inlinable package func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
