import NPTCore

/// A 4-way set-associative TLB of combined (guest + nested) translations, tagged by the hierarchy
/// that produced the nested part, so a hierarchy switch needs no flush (like VPID/EPTP tagging).
///
/// Only translations that passed the guest paging checks (and whose accessed flags are set) are
/// cached. A guest store to one of its own paging-structure frames drops the entries whose walk
/// read that frame: hardware may keep using such entries until the guest flushes them (SDM 4.10),
/// and may also drop them at any time, so this stays within the architecture while keeping the
/// simulator deterministic against a model without a TLB.
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
        /// Guest-physical address of the paging-structure entry that maps the page (where the dirty
        /// flag lives), .max with paging off.
        var leaf: UInt64 = .max
        /// The leaf's dirty flag is set (a write needs no update).
        var dirty = false

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
    /// A 4096-bit filter of the frames that entries' walks read (false positives allowed).
    var tableFilter = [UInt64](repeating: 0, count: 64)

    @inline(__always) static func filterBit(_ frame: UInt64) -> (Int, UInt64) {
        let h = (frame &* 0x9E37_79B9_7F4A_7C15) >> 52
        return (Int(h >> 6), 1 << (h & 63))
    }
    @inline(__always) mutating func markTable(_ frame: UInt64) {
        guard frame != .max else { return }
        let (w, b) = TLB.filterBit(frame)
        tableFilter[w] |= b
    }
    /// A guest store to `frame`: drops every entry whose walk read it.
    @inline(__always) mutating func storeTo(frame: UInt64) {
        let (w, b) = TLB.filterBit(frame)
        guard tableFilter[w] & b != 0 else { return }
        for i in entries.indices where entries[i].valid {
            let e = entries[i]
            if e.walk.0 == frame || e.walk.1 == frame || e.walk.2 == frame || e.walk.3 == frame { entries[i].valid = false }
        }
        rebuildFilter()
    }
    private mutating func rebuildFilter() {
        for i in tableFilter.indices { tableFilter[i] = 0 }
        for e in entries where e.valid {
            markTable(e.walk.0); markTable(e.walk.1); markTable(e.walk.2); markTable(e.walk.3)
        }
    }

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
        markTable(e.walk.0); markTable(e.walk.1); markTable(e.walk.2); markTable(e.walk.3)
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

    mutating func flushAll() {
        for i in entries.indices { entries[i].valid = false }
        for i in tableFilter.indices { tableFilter[i] = 0 }
    }

    /// Records that the leaf of the entry for (`vpn`, `tag`) is now dirty.
    mutating func setDirty(vpn: UInt64, tag: UInt32) {
        let base = TLB.set(vpn, tag) * TLB.ways
        for i in base..<(base + TLB.ways) where entries[i].valid && entries[i].vpn == vpn && entries[i].tag == tag {
            entries[i].dirty = true
        }
    }

    /// Drops every entry of `tag` whose page, or one of whose guest paging structures, lies in `range`.
    mutating func flush(tag: UInt32, range: GPARange) {
        let lo = range.start.raw >> 12, hi = (range.end + 0xFFF) >> 12
        for i in entries.indices where entries[i].valid && entries[i].tag == tag {
            if entries[i].depends(onFramesIn: lo, hi) { entries[i].valid = false }
        }
    }
}
