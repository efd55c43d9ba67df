import NPTCore

/// A 4-way set-associative TLB of combined (guest + nested) translations, tagged by the hierarchy
/// that produced the nested part, so a hierarchy switch needs no flush (like VPID/EPTP tagging).
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
    static let sets = 64
    static let ways = 4
    /// Entries per hierarchy tag.
    static let capacity = sets * ways
    var entries = [Entry](repeating: Entry(), count: TLB.capacity * HierarchyID.allCases.count)
    var victim = [UInt8](repeating: 0, count: TLB.sets * HierarchyID.allCases.count)
    var hits: UInt64 = 0
    var misses: UInt64 = 0

    @inline(__always) static func set(_ vpn: UInt64, _ tag: UInt32) -> Int {
        Int(tag) * sets + Int((vpn ^ (vpn >> 6) ^ (vpn >> 12)) & UInt64(sets - 1))
    }

    @inline(__always) mutating func lookup(vpn: UInt64, tag: UInt32) -> Entry? {
        let base = TLB.set(vpn, tag) * TLB.ways
        for i in base..<(base + TLB.ways) {
            let e = entries[i]
            if e.valid && e.vpn == vpn && e.tag == tag { hits += 1; return e }
        }
        misses += 1
        return nil
    }

    /// Inserts into a free way, or replaces round-robin.
    mutating func insert(_ e: Entry) {
        let set = TLB.set(e.vpn, e.tag)
        let base = set * TLB.ways
        for i in base..<(base + TLB.ways) where !entries[i].valid || entries[i].vpn == e.vpn {
            entries[i] = e
            return
        }
        let w = Int(victim[set])
        victim[set] = UInt8((w + 1) % TLB.ways)
        entries[base + w] = e
    }

    mutating func flushAll() { for i in entries.indices { entries[i].valid = false } }

    /// Drops every entry of `tag` whose page, or one of whose guest paging structures, lies in `range`.
    mutating func flush(tag: UInt32, range: GPARange) {
        let lo = range.start.raw >> 12, hi = (range.end + 0xFFF) >> 12
        for i in entries.indices where entries[i].valid && entries[i].tag == tag {
            if entries[i].depends(onFramesIn: lo, hi) { entries[i].valid = false }
        }
    }
}
