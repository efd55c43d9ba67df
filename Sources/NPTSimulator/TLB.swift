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

    /// Drops every entry of `tag` whose guest-physical page lies in `range`.
    mutating func flush(tag: UInt32, range: GPARange) {
        for i in entries.indices where entries[i].valid && entries[i].tag == tag {
            let p = entries[i].gpaPage
            if p + 0x1000 > range.start.raw && p < range.end { entries[i].valid = false }
        }
    }
}
