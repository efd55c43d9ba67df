import NPTCore

/// A direct-mapped TLB of combined (guest + nested) translations, tagged by the hierarchy that
/// produced the nested part, so a hierarchy switch needs no flush (like VPID/EPTP tagging).
struct TLB {
    struct Entry {
        var valid = false
        var tag: UInt32 = 0
        var vpn: UInt64 = 0
        var gpaPage: UInt64 = 0      // guest-physical page base (4 KiB granularity)
        var hostPage: UInt64 = 0     // offset in backing memory
        var guestUser = false        // U/S = 1 at every level: a user-mode linear address
        var guestWritable = false    // R/W = 1 at every level
        var guestNX = false          // XD somewhere (and NXE on)
        var nested: ShadowPermissions = []
        /// Guest-physical frames of the guest paging structures this walk read. A combined
        /// translation depends on their nested permissions too, so an invalidation of any of them
        /// drops it (hardware avoids the question: INVEPT has no per-address form).
        var walk: (UInt64, UInt64, UInt64, UInt64) = (.max, .max, .max, .max)

        func depends(onFramesIn lo: UInt64, _ hi: UInt64) -> Bool {
            func inRange(_ f: UInt64) -> Bool { f != .max && f >= lo && f < hi }
            return inRange(gpaPage >> 12) || inRange(walk.0) || inRange(walk.1) || inRange(walk.2) || inRange(walk.3)
        }
    }
    static let sets = 256
    var entries = [Entry](repeating: Entry(), count: TLB.sets * HierarchyID.allCases.count)
    var hits: UInt64 = 0
    var misses: UInt64 = 0

    @inline(__always) static func slot(_ vpn: UInt64, _ tag: UInt32) -> Int {
        Int(tag) * sets + Int(vpn & UInt64(sets - 1))
    }

    @inline(__always) mutating func lookup(vpn: UInt64, tag: UInt32) -> Entry? {
        let e = entries[TLB.slot(vpn, tag)]
        if e.valid && e.vpn == vpn && e.tag == tag { hits += 1; return e }
        misses += 1
        return nil
    }

    mutating func insert(_ e: Entry) { entries[TLB.slot(e.vpn, e.tag)] = e }

    mutating func flushAll() { for i in entries.indices { entries[i].valid = false } }

    /// Drops every entry of `tag` whose page, or one of whose guest paging structures, lies in `range`.
    mutating func flush(tag: UInt32, range: GPARange) {
        let lo = range.start.raw >> 12, hi = (range.end + 0xFFF) >> 12
        for i in entries.indices where entries[i].valid && entries[i].tag == tag {
            if entries[i].depends(onFramesIn: lo, hi) { entries[i].valid = false }
        }
    }
}
