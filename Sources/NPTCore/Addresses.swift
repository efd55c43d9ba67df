/// Address spaces. Three distinct types so that a guest-virtual address can never be passed where a
/// guest-physical one is expected.

/// A guest-virtual (linear) address.
public struct GVA: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var raw: UInt64
    @inlinable public init(_ raw: UInt64) { self.raw = raw }
    public static func < (a: GVA, b: GVA) -> Bool { a.raw < b.raw }
    public var pageNumber: GuestVirtualPage { GuestVirtualPage(raw >> 12) }
    public var description: String { "gva:" + hex(raw) }
}

/// A guest-physical address.
public struct GPA: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var raw: UInt64
    @inlinable public init(_ raw: UInt64) { self.raw = raw }
    public static func < (a: GPA, b: GPA) -> Bool { a.raw < b.raw }
    public var frame: GuestFrame { GuestFrame(raw >> 12) }
    public func advanced(by n: UInt64) -> GPA { GPA(raw &+ n) }
    public var description: String { "gpa:" + hex(raw) }
}

/// A host-physical address (in the simulator: an offset into the VM's backing memory).
public struct HPA: Hashable, Comparable, Sendable, CustomStringConvertible {
    public var raw: UInt64
    @inlinable public init(_ raw: UInt64) { self.raw = raw }
    public static func < (a: HPA, b: HPA) -> Bool { a.raw < b.raw }
    public var description: String { "hpa:" + hex(raw) }
}

/// Page numbers of each space.
public struct GuestVirtualPage: Hashable, Sendable { public var raw: UInt64; public init(_ r: UInt64) { raw = r } }
public struct GuestFrame: Hashable, Sendable {
    public var raw: UInt64
    public init(_ r: UInt64) { raw = r }
    public var address: GPA { GPA(raw << 12) }
}
public struct HostFrame: Hashable, Sendable { public var raw: UInt64; public init(_ r: UInt64) { raw = r } }

/// The three leaf sizes of 4-level x86-64 paging and EPT.
public enum PageSize: UInt64, Sendable, CaseIterable, CustomStringConvertible {
    case size4K = 0x1000
    case size2M = 0x20_0000
    case size1G = 0x4000_0000

    public var bytes: UInt64 { rawValue }
    /// The table level whose entries map this size: 1 = PT, 2 = PD, 3 = PDPT.
    public var level: Int {
        switch self { case .size4K: 1; case .size2M: 2; case .size1G: 3 }
    }
    public init?(bytes: UInt64) { self.init(rawValue: bytes) }
    public var description: String {
        switch self { case .size4K: "4K"; case .size2M: "2M"; case .size1G: "1G" }
    }
}

/// A half-open range of guest-physical addresses.
public struct GPARange: Hashable, Sendable, CustomStringConvertible {
    public var start: GPA
    public var size: UInt64
    public init(start: GPA, size: UInt64) { self.start = start; self.size = size }
    public var end: UInt64 { start.raw &+ size }
    public func contains(_ a: GPA) -> Bool { a.raw >= start.raw && a.raw < end }
    public func overlaps(_ o: GPARange) -> Bool { start.raw < o.end && o.start.raw < end }
    public var description: String { "[\(hex(start.raw)), \(hex(end)))" }
}

@inlinable public func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16) }
