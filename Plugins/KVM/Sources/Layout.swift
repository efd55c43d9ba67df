// MBEC on KVM: one memslot layout per shadow hierarchy.
//
// In the layout of hierarchy H, exactly the RAM and NVDIMM pages that H lets the guest execute are
// mapped: those H also lets the guest write in ordinary memslots, the others in KVM_MEM_READONLY
// ones. The pages H does not let the guest execute are left out (the RAM memslot is split around
// them; an NVDIMM range keeps one memslot per executable run of its file mapping, Pmem.swift). On
// this KVM CPL 0 code (and 32-bit and real-mode code) is emulated and 64-bit CPL 3 code runs
// natively (docs/kvm-on-this-machine.md); either way:
//  - a data access to a page left out arrives as KVM_EXIT_MMIO; the backend checks it against H's
//    R/W (hierarchy_translate) and completes it from the backing memory (RAM, or an NVDIMM range's
//    file mapping; reads fill
//    run->mmio.data, writes store) if permitted, else reports NPT_EXIT_EPT_VIOLATION
//    (NPT_EPTQ_READ or NPT_EPTQ_WRITE | the page's permissions) for the core to decide;
//  - a write to an executable, non-writable page (a READONLY memslot) also exits as KVM_EXIT_MMIO
//    (is_write) and is reported the same way;
//  - an instruction fetch from a page left out fails emulation (KVM_EXIT_INTERNAL_ERROR); the
//    backend reports it as NPT_EXIT_EPT_VIOLATION for the core to decide.
// Memslots belong to the VM (this KVM has no multiple address spaces), so each layout lives in a
// KVM VM of its own, a view (Views.swift): a hierarchy switch moves the vCPU to the other view.
import CKVM
import CNPTKit
import Synchronization
import SystemPackage

struct MappedRange: Hashable, Sendable {
    var gpa: UInt64
    var size: UInt64
    /// KVM_MEM_READONLY (executable but not writable in the layout's hierarchy). Part of the
    /// identity: KVM cannot change a memslot's flags in place, so the diff deletes and re-creates.
    var readonly = false

    /// `ranges` with the 4 KiB pages `pages` (sorted) cut out.
    static func subtracting(_ pages: [UInt64], from ranges: [MappedRange]) -> [MappedRange] {
        guard !pages.isEmpty else { return ranges }
        var out: [MappedRange] = []
        for r in ranges {
            var start = r.gpa
            let end = r.gpa + r.size
            for p in pages where p + 0x1000 > start && p < end {
                if p > start { out.append(MappedRange(gpa: start, size: p - start, readonly: r.readonly)) }
                start = p + 0x1000
            }
            if start < end { out.append(MappedRange(gpa: start, size: end - start, readonly: r.readonly)) }
        }
        return out
    }
}

/// Which layout a vCPU needs: its hierarchy's, minus `hidden` pages (the guest's IDT pages while the
/// escalation exit is armed, Escalation.swift).
struct LayoutKey: Hashable, Sendable, CustomStringConvertible {
    var hierarchy: UInt32
    /// Guest-physical pages (4 KiB aligned, sorted) left out even where the hierarchy executes them.
    var hidden: [UInt64] = []
    /// A run of a vCPU with the escalation exit armed (hidden then holds the IDT's pages).
    var guarded = false
    var description: String { hidden.isEmpty ? "hierarchy \(hierarchy)" : "hierarchy \(hierarchy) without \(hidden.map(hex))" }
}

struct LayoutState: Sendable {
    /// The views (Views.swift), the one for each key, and the clock of their last entries.
    var views: [KVMView] = []
    var byKey: [ViewKey: KVMView] = [:]
    var nextID = 1
    var clock: UInt64 = 0
    /// Layouts computed from the core's leaves, per hierarchy (emptied when the policy changes).
    var cache: [UInt32: LayoutPlan] = [:]
    /// Scratch for KVM_GET_DIRTY_LOG bitmaps.
    var bitmap: [UInt64] = []
}

/// What a hierarchy's layout maps: its executable RAM ranges, and its executable ranges beyond RAM
/// (of which the NVDIMM ranges' runs are taken; the vFHA, also there, keeps its own memslot).
struct LayoutPlan: Sendable {
    var ram: [MappedRange]
    var beyond: [MappedRange]
}

final class LeafCollector {
    var ranges: [MappedRange] = []
    var beyond: [MappedRange] = []
    let ramSize: UInt64
    init(ramSize: UInt64) { self.ramSize = ramSize }
    func add(_ gpa: UInt64, _ size: UInt64, _ perms: UInt64) {
        // X (bit 2) in this hierarchy; W (bit 1) decides the memslot's READONLY flag. RAM and the
        // rest (NVDIMM ranges, the vFHA) are collected apart: install lays out RAM from memory and
        // the NVDIMM ranges from their file mappings (Pmem.swift).
        guard perms & 0x4 != 0 else { return }
        let readonly = perms & 0x2 == 0
        if gpa < ramSize {
            Self.append(&ranges, gpa, min(gpa + size, ramSize), readonly)
        }
        if gpa + size > ramSize {
            Self.append(&beyond, max(gpa, ramSize), gpa + size, readonly)
        }
    }

    private static func append(_ ranges: inout [MappedRange], _ gpa: UInt64, _ end: UInt64, _ readonly: Bool) {
        if let last = ranges.last, last.gpa + last.size == gpa, last.readonly == readonly {
            ranges[ranges.count - 1].size = end - last.gpa
        } else {
            ranges.append(MappedRange(gpa: gpa, size: end - gpa, readonly: readonly))
        }
    }
}

extension KVMVM {
    /// The executable ranges of `hierarchy` (read-only where it does not permit writes), from the core (nil without a host table or VM handle).
    func executableRanges(_ hierarchy: UInt32) -> LayoutPlan? {
        guard let leaves = host.pointee.hierarchy_leaves, let handle else { return nil }
        let c = LeafCollector(ramSize: UInt64(memory.size))
        let s = withExtendedLifetime(c) {
            leaves(handle, hierarchy, { gpa, size, perms, ud in
                Unmanaged<LeafCollector>.fromOpaque(ud!).takeUnretainedValue().add(gpa, size, perms)
            }, Unmanaged.passUnretained(c).toOpaque())
        }
        return s == NPT_OK ? LayoutPlan(ram: c.ranges, beyond: c.beyond) : nil
    }

    /// Installs `v`'s layout (its key's hierarchy, minus the hidden pages, plus the region where the
    /// key says so), changing only the memslots that differ: deletions first (memslots may not
    /// overlap), a READONLY flag is part of a range's identity. Writable memslots of a view where CPL 0
    /// code may run log the pages written (Views.swift, coherence).
    func installLayout(_ v: KVMView, _ key: ViewKey, _ st: inout LayoutState) throws(Errno) {
        let hierarchy = key.layout.hierarchy
        let plan: LayoutPlan
        if let c = st.cache[hierarchy] {
            plan = c
        } else if let r = executableRanges(hierarchy) {
            plan = r
            st.cache[hierarchy] = r
        } else if handle == nil {
            return   // a VM created straight from the ops has no core and so no policy: all RAM stays mapped
        } else {
            // The core could not list the hierarchy: refuse to run rather than run without MBEC.
            throw Errno.ioError
        }
        let want = MappedRange.subtracting(key.layout.hidden, from: plan.ram)
        let wantSet = Set(want)
        var updates: UInt64 = 0
        for (slot, r) in v.slots.sorted(by: { $0.key < $1.key }) where !wantSet.contains(r) {
            try v.vm.setUserMemoryRegion(slot: slot, gpa: r.gpa, size: 0, host: nil)
            v.slots[slot] = nil
            updates += 1
        }
        let have = Set(v.slots.values)
        var next: UInt32 = 0
        for r in want where !have.contains(r) {
            while v.slots[next] != nil { next += 1 }
            let flags = r.readonly ? kvmMemReadonly : (v.logging ? kvmMemLogDirty : 0)
            try v.vm.setUserMemoryRegion(slot: next, flags: flags, gpa: r.gpa, size: r.size, host: memory.base + Int(r.gpa))
            v.slots[next] = r
            updates += 1
        }
        // The NVDIMM ranges' runs (their own memslot ids; never overlapping RAM).
        updates += try syncPmemRuns(v, MappedRange.subtracting(key.layout.hidden, from: plan.beyond))
        updates += try syncRegionSlot(v, want: key.region)
        if updates > 0 {
            stats.add(.layoutInstalls)
            stats.add(.memslotUpdates, updates)
            stats.set(.memslotUpdatesLastInstall, updates)
        }
    }

    /// What `hierarchy` permits at `gpa` (NPT_PERM_* bits as hierarchy_translate reports them: R bit 0,
    /// W bit 1, X bit 2; 0 if not present), or nil without a core (a VM created straight from the
    /// ops has no policy: everything is permitted).
    func permissions(_ hierarchy: UInt32, _ gpa: UInt64) -> UInt64? {
        guard let tr = host.pointee.hierarchy_translate, let handle else { return nil }
        var t = npt_translation()
        t.size = UInt32(MemoryLayout<npt_translation>.size)
        guard tr(handle, hierarchy, gpa, &t) == NPT_OK, t.level != 0 else { return 0 }
        return t.perms
    }

    /// Whether `gpa` is mapped in view `v`'s layout (RAM, or a run of an NVDIMM range).
    func isMapped(_ gpa: UInt64, in v: KVMView) -> Bool {
        layout.withLock { _ in v.maps(page: gpa >> 12) }
    }

    /// The translation of linear `va` through 4-level paging at `cr3`, and whether it is a user-mode
    /// address (U/S = 1 at every level); nil if not present.
    func translateWithMode(_ va: UInt64, cr3: UInt64) -> (UInt64, Bool)? {
        var table = cr3 & 0x000F_FFFF_FFFF_F000
        var user = true
        for level in stride(from: 3, through: 0, by: -1) {
            let at = table + ((va >> (12 + 9 * UInt64(level))) & 0x1FF) * 8
            guard memory.contains(at, 8) else { return nil }
            let e = memory.base.load(fromByteOffset: Int(at), as: UInt64.self)
            guard e & 1 != 0 else { return nil }
            user = user && e & 4 != 0
            let frame = e & 0x000F_FFFF_FFFF_F000
            if level == 0 || (level <= 2 && e & 0x80 != 0) {
                let pageMask: UInt64 = (1 << (12 + 9 * UInt64(level))) - 1
                return ((frame & ~pageMask) | (va & pageMask), user)
            }
            table = frame
        }
        return nil
    }

    /// The guest-physical pages of the page tables a walk of `va` at `cr3` reads (4-level paging).
    func walkedTables(_ va: UInt64, cr3: UInt64) -> [UInt64] {
        var out: [UInt64] = []
        var table = cr3 & 0x000F_FFFF_FFFF_F000
        for level in stride(from: 3, through: 0, by: -1) {
            out.append(table)
            let at = table + ((va >> (12 + 9 * UInt64(level))) & 0x1FF) * 8
            guard memory.contains(at, 8) else { break }
            let e = memory.base.load(fromByteOffset: Int(at), as: UInt64.self)
            guard e & 1 != 0, level > 0, !(level <= 2 && e & 0x80 != 0) else { break }
            table = e & 0x000F_FFFF_FFFF_F000
        }
        return out
    }

    /// Guest-physical address of linear `va` through the guest's 4-level page tables at `cr3`
    /// (nil if not present). With paging off the linear address is the physical one.
    func translate(_ va: UInt64, cr0: UInt64, cr3: UInt64) -> UInt64? {
        guard cr0 & cr0PG != 0 else { return va }
        var table = cr3 & 0x000F_FFFF_FFFF_F000
        for level in stride(from: 3, through: 0, by: -1) {
            let index = (va >> (12 + 9 * UInt64(level))) & 0x1FF
            let at = table + index * 8
            guard memory.contains(at, 8) else { return nil }
            let e = memory.base.load(fromByteOffset: Int(at), as: UInt64.self)
            guard e & 1 != 0 else { return nil }
            let frame = e & 0x000F_FFFF_FFFF_F000
            if level == 0 || (level <= 2 && e & 0x80 != 0) {
                let pageMask: UInt64 = (1 << (12 + 9 * UInt64(level))) - 1
                return (frame & ~pageMask) | (va & pageMask)
            }
            table = frame
        }
        return nil
    }
}
