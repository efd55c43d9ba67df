// Views: one KVM VM per memslot layout the guest's vCPUs need, all on the same guest memory.
//
// A shadow hierarchy is exposed to a vCPU as a memslot layout (Layout.swift). KVM's memslots belong
// to a VM and this KVM has one address space, so one VM can show one layout at a time; changing it
// costs memslot updates (10-60 µs each, and every deletion empties KVM's shadow MMU) and keeps
// vCPUs of different hierarchies from running at the same time. So each layout (a `ViewKey`: the
// hierarchy, the IDT pages a guarded user layout leaves out, whether the privileged-mode region is
// mapped) gets its own KVM VM, a *view*, created the first time a vCPU needs it, with the same
// guest RAM (one host mapping), NVDIMM file mappings, vFHA page and CPUID. Each guest vCPU has a
// KVM vCPU in every view it has entered (`ViewCPU`); a hierarchy switch *moves* the vCPU's state
// from one to the other, and vCPUs in different views run concurrently. Layouts change only when
// the policy does (invalidate: every view's layout is brought up to date at once, synchronously for
// running vCPUs, as before).
//
// What a move carries (docs/kvm-on-this-machine.md, "Two VMs"):
//  - every move: general registers, RIP, RFLAGS; segment registers with their caches, GDTR/IDTR,
//    LDTR, TR, CR0/2/3/4/8, EFER, APIC base, the pending-interrupt bitmap; pending and injected
//    exceptions, interrupts and NMIs, NMI masking, the interrupt shadow, SMM and triple-fault state
//    (KVM_CAP_SYNC_REGS: copied in kvm_run, no ioctl); the x87/SSE/AVX/AVX-512 state and MXCSR
//    (KVM_GET_XSAVE2 from the source, KVM_SET_XSAVE into the destination only if it differs from
//    what the destination holds);
//  - state only CPL 0 code changes (the MSRs of KVM_GET_MSR_INDEX_LIST that can be written back,
//    KERNEL_GS_BASE among them, XCR0, DR0-3/6/7) lives in the view where CPL 0 code last ran (the
//    vCPU's `owner`); it is copied (KVM_GET/SET_MSRS, _XCRS, _DEBUGREGS) when the vCPU moves into
//    another view where CPL 0 code may run. A guarded user view (the escalation exit armed: no
//    event from CPL 3 reaches CPL 0 there, Escalation.swift) runs only CPL 3 code, so it gets only
//    what CPL 3 observes: XCR0 (XGETBV, and which XSAVE features fault) on every move into it
//    while CR4.OSXSAVE is set (one KVM_GET_XCRS of the owner, a set only when it changed; without
//    OSXSAVE both fault whatever XCR0 holds), and DR0-3/DR7 where the guest's
//    debug registers act at CPL 3 (escalation_probe.c checks; not on this KVM). DR6, which a #DB
//    at CPL 3 changes, is copied out with that escalation;
//  - TSC: guest TSC = host TSC in every VM here (the offsets are 0 and this KVM ignores
//    KVM_VCPU_TSC_OFFSET at CPL 3: Tests/probes/kvm/probe_vcpustate.c); TSC_AUX is neither
//    advertised nor honoured (RDTSCP reads 0 whatever KVM holds);
//  - not carried: the MP state (no in-kernel irqchip: vCPUs are always runnable), a LAPIC (none),
//    nested state (none here). KVM's paravirtual features (kvmclock, steal time, async PF, PV EOI)
//    are hidden in CPUID and refused (KVM_CAP_ENFORCE_PV_FEATURE_CPUID): their per-vCPU state
//    would be split between views (steal time counted twice).
// A move never happens with an I/O or MMIO completion pending in KVM: such a source is first run
// with immediate_exit (KVM completes the instruction and returns).
//
// Coherence of the views' MMUs. This KVM shadows the guest's page tables (tdp_mmu=N) and the
// views' shadow MMUs do not see each other's page-table writes (probe_twovm.c, B2): a PTE the
// kernel changes in the supervisor view (and flushes there) stays stale in the user view. A view
// must drop its shadow pages when another view wrote a page table it may have shadowed:
//  - the views where CPL 0 code may run (all but the guarded user views) log the pages written
//    (KVM_MEM_LOG_DIRTY_PAGES on their writable memslots; emulated stores are logged too,
//    probe_coherence.c);
//  - a guarded user view runs only CPL 3 code, whose CR3 is fixed while it is there: its page
//    tables are the pages of the user-reachable part of the trees of the CR3s it ran with (a walk
//    through U/S = 1 entries: only user-mode translations can be shadowed there), tracked until
//    its next zap. A view where CPL 0 code may run can switch CR3 inside a run: its set is
//    unknown, so any write by another view to a page it maps counts;
//  - when a vCPU moves into a view, the dirty logs of the other logging views are read (only the
//    memslots holding the view's page tables when the set is known: 0.5-0.9 µs each) and any
//    page-table page written marks the views that hold it; a marked view is zapped before the vCPU
//    enters it: one move of a small memslot, with KVM's SLOT_ZAP_ALL quirk on (26 µs, and the
//    guest's working set faults in again). Stores the plugin completes itself (MMIO) and the VMM's
//    memory_write count as writes too. A view entered only with paging off has no shadow of guest
//    page tables and is never zapped;
//  - the guarded views' own writes to page tables are the accessed/dirty bits KVM's shadow MMU
//    sets: a stale copy of those elsewhere is harmless (a later write faults and sets them again),
//    so they are not logged. (User mode cannot write page tables: the escalation exit assumes it.)
//  - vCPUs already inside a view keep their translations until they enter it again (as a
//    processor's TLB keeps them until the guest's flush, which needs CPL 0: a move).
import CKVM
import CNPTKit
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

let cr4OSXSAVE: UInt64 = 1 << 18
/// KVM_X86_QUIRK_SLOT_ZAP_ALL (KVM_CAP_DISABLE_QUIRKS2).
let slotZapAllQuirk: UInt64 = 0x80
/// KVM_MEM_LOG_DIRTY_PAGES.
let kvmMemLogDirty: UInt32 = 1 << 0
/// The memslot ids of the views' own slots (RAM layouts use ids from 0, NVDIMM runs from
/// pmemFirstSlot, the region regionSlot).
let zapSlot: UInt32 = 29998
let flushHintSlot: UInt32 = 29999
/// The zap memslot moves between these two guest-physical pages (a 4 KiB read-only page of zeros:
/// a guest read there gets zeros instead of an MMIO exit; nothing else is mapped that high).
let zapGPAs: (UInt64, UInt64) = (0x7FFF_FFFF_E000, 0x7FFF_FFFF_F000)
/// At most this many guarded views are kept per VM (their keys follow the guest's IDT pages); the
/// least recently entered one without occupants is retired beyond it.
let maxGuardedViews = 4

/// The layout a run needs.
struct ViewKey: Hashable, Sendable, CustomStringConvertible {
    var layout: LayoutKey
    /// The privileged-mode region's memslot is mapped (Region.swift).
    var region = false
    var description: String { region ? "\(layout) with the privileged-mode region" : layout.description }
}

/// One KVM VM showing one layout. Its memslot and coherence state is guarded by the owning
/// KVMVM's `layout` mutex.
final class KVMView: @unchecked Sendable {
    let id: Int
    let vm: KVMVirtualMachine
    /// nil: the VM as created, all RAM mapped (before the core's first policy, or without a core).
    var key: ViewKey?
    var guarded: Bool { key?.layout.guarded ?? false }
    /// Views where CPL 0 code may run log the pages written (coherence).
    var logging: Bool { !guarded }
    /// KVM memslot id -> the RAM range it maps now.
    var slots: [UInt32: MappedRange] = [:]
    /// KVM memslot id -> the NVDIMM run it maps now (Pmem.swift).
    var pmemRuns: [UInt32: MappedRange] = [:]
    /// The region's memslot is mapped here (written under `layout`; read by vCPU threads).
    let regionLive = Atomic<Bool>(false)
    var regionMapped: Bool {
        get { regionLive.load(ordering: .acquiring) }
        set { regionLive.store(newValue, ordering: .releasing) }
    }
    var flushHintMapped = false
    let zapPage: GuestMemory
    var zapAt = zapGPAs.0
    /// KVM's SLOT_ZAP_ALL quirk is disabled in this VM (KVM_CAP_DISABLE_QUIRKS2): deleting a memslot
    /// drops only that memslot's translations and shadow pages, not the whole shadow MMU.
    var quirkOff = false
    // coherence
    /// Pages another view (or the plugin, or the VMM) wrote that this view may hold a stale shadow
    /// of as page tables: its shadows of them are dropped before a vCPU next moves in.
    var stalePages = Set<UInt64>()
    /// A vCPU ran here with paging on since the last zap: KVM may hold shadows of guest page tables.
    let ptUsed = Atomic<Bool>(false)
    /// The page-table pages (gpa >> 12) the view may have shadowed (guarded views), or unknown.
    var ptPages = Set<UInt64>()
    var ptUnknown = false
    var walkedRoots = Set<UInt64>()
    /// The vCPUs in this view (index -> CR3, 0 with paging off).
    var occupants: [UInt32: UInt64] = [:]
    /// KVM_RUNs in this view, and their count at the last full read of its dirty log.
    let runs = Atomic<UInt64>(0)
    var runsAtHarvest: UInt64 = .max
    /// vCPUs inside KVM_RUN in this view now.
    let inside = Atomic<Int>(0)
    /// Where the region's memslot was created.
    var regionGPA: UInt64 = 0
    var lastEntered: UInt64 = 0
    /// Retired: no longer handed out; vCPUs drop their vCPU of it at their next move.
    let retired = Atomic<Bool>(false)
    var isRetired: Bool { retired.load(ordering: .acquiring) }

    /// A view on a new KVM VM (no memslot yet). With KVM's SLOT_ZAP_ALL quirk disabled where KVM
    /// allows it (a memslot deletion then drops only that memslot's translations: the privileged-mode
    /// region's removal and a coherence zap leave the rest of the working set mapped); without, a
    /// zap moves a small memslot of its own, which empties the whole shadow MMU.
    init(id: Int, vm: KVMVirtualMachine, key: ViewKey?) throws(Errno) {
        self.id = id; self.vm = vm; self.key = key
        zapPage = try GuestMemory(size: 4096)
        if let q = try? vm.checkExtension(Int32(KVM_CAP_DISABLE_QUIRKS2)), UInt64(q) & slotZapAllQuirk != 0,
           (try? vm.enableCap(UInt32(KVM_CAP_DISABLE_QUIRKS2), slotZapAllQuirk)) != nil {
            quirkOff = true
        } else {
            try vm.setUserMemoryRegion(slot: zapSlot, flags: kvmMemReadonly, gpa: zapAt, size: 4096, host: zapPage.base)
        }
    }

    /// Whether this view maps guest-physical page `page` (gpa >> 12) in a RAM or NVDIMM memslot.
    func maps(page: UInt64) -> Bool {
        let gpa = page << 12
        return slots.values.contains { gpa >= $0.gpa && gpa - $0.gpa < $0.size }
            || pmemRuns.values.contains { gpa >= $0.gpa && gpa - $0.gpa < $0.size }
    }

    /// Empties KVM's whole shadow MMU of this view (with SLOT_ZAP_ALL, KVM's default quirk): a move of
    /// the view's small memslot (Tests/probes/kvm/probe_coherence.c (b)).
    func zapAll() throws(Errno) {
        let to = zapAt == zapGPAs.0 ? zapGPAs.1 : zapGPAs.0
        try vm.setUserMemoryRegion(slot: zapSlot, flags: kvmMemReadonly, gpa: to, size: 4096, host: zapPage.base)
        zapAt = to
    }
}

/// The size of a KVM_GET_XSAVE2 buffer (KVM_CAP_XSAVE2; at least the 4 KiB of struct kvm_xsave).
let xsaveSize: Int = {
    guard let s = try? KVMSystem(), let n = try? s.checkExtension(Int32(KVM_CAP_XSAVE2)) else { return 4096 }
    return max(4096, Int(n))
}()

/// A guest vCPU's KVM vCPU in one view, with what the plugin knows of its state beyond SYNC_REGS.
final class ViewCPU {
    let view: KVMView
    let cpu: KVMVirtualCPU
    /// The view's key as this vCPU last saw it under `layout` (nil: not entered yet): a run whose key
    /// is this one needs no move (the primary view adopts its key once, under the lock).
    var key: ViewKey?
    /// The CR3 the vCPU entered the view with (the page tables the view's set was told about).
    var enteredCR3: UInt64 = 0
    /// The last exit was KVM_EXIT_IO or KVM_EXIT_MMIO: KVM finishes the instruction at the next
    /// KVM_RUN (and writes its registers then).
    var completionPending = false
    /// KVM_RUNs of this vCPU; the cached state below is what KVM holds as long as it has not run
    /// since (`...At` = runs when read or written).
    var runs: UInt64 = 0
    let xsave: UnsafeMutableRawPointer
    var xsaveAt: UInt64 = .max
    var xcrs = kvm_xcrs()
    var xcrsAt: UInt64 = .max
    var debugRegs = kvm_debugregs()
    var debugRegsAt: UInt64 = .max
    /// The copyable MSRs' values (for `msrList`).
    var msrValues: [UInt64] = []
    var msrList: [UInt32] = []
    var msrsAt: UInt64 = .max

    init(view: KVMView, cpu: KVMVirtualCPU) {
        self.view = view; self.cpu = cpu
        xsave = UnsafeMutableRawPointer.allocate(byteCount: xsaveSize, alignment: 64)
        xsave.initializeMemory(as: UInt8.self, repeating: 0, count: xsaveSize)
    }
    deinit { xsave.deallocate() }

    /// KVM finishes a pending I/O or MMIO instruction: a KVM_RUN with immediate_exit (KVM completes
    /// it, then returns EINTR without running the guest; the registers are stored in kvm_run).
    func completePending() {
        guard completionPending else { return }
        completionPending = false
        let prev = ckvm_run_immediate_exit(cpu.run)
        ckvm_run_set_immediate_exit(cpu.run, 1)
        runs &+= 1
        try? cpu.runOnce()
        ckvm_run_set_immediate_exit(cpu.run, prev)
    }

    func readXSAVE() throws(Errno) {
        if xsaveAt == runs { return }
        try cpu.getXSAVE(into: xsave)
        xsaveAt = runs
    }
    func readXCRS() throws(Errno) -> kvm_xcrs {
        if xcrsAt != runs { xcrs = try cpu.xcrs; xcrsAt = runs }
        return xcrs
    }
    func readDebugRegs() throws(Errno) -> kvm_debugregs {
        if debugRegsAt != runs { debugRegs = try cpu.debugRegs; debugRegsAt = runs }
        return debugRegs
    }
    func writeXCRS(_ x: kvm_xcrs) throws(Errno) {
        if xcrsAt == runs && bytesEqual(xcrs, x) { return }
        try cpu.setXCRS(x)
        xcrs = x; xcrsAt = runs
    }
    func writeDebugRegs(_ d: kvm_debugregs) throws(Errno) {
        if debugRegsAt == runs && bytesEqual(debugRegs, d) { return }
        try cpu.setDebugRegs(d)
        debugRegs = d; debugRegsAt = runs
    }
}

func bytesEqual<T>(_ a: T, _ b: T) -> Bool {
    withUnsafeBytes(of: a) { x in withUnsafeBytes(of: b) { y in memcmp(x.baseAddress!, y.baseAddress!, x.count) == 0 } }
}

/// The MSRs a move copies between views where CPL 0 code runs: KVM_GET_MSR_INDEX_LIST without the
/// TSC (its offset is the VM's, and host writes resynchronize it), KVM's paravirtual MSRs (hidden)
/// and those KVM refuses to read or write back (learned at the first copy, process-wide).
let copyableMSRs = Mutex<[UInt32]?>(nil)

func initialCopyableMSRs(_ system: KVMSystem) -> [UInt32] {
    let all = (try? system.msrIndexList()) ?? []
    return all.filter { m in
        m != 0x10 && m != 0x11 && m != 0x12 && (m & 0xFFFF_FF00) != 0x4B56_4D00
    }
}

extension KVMVM {
    // MARK: views (under `layout`)

    /// The view for `key`, created if needed (the first layout a VM without one adopts it).
    func view(for key: ViewKey, _ st: inout LayoutState) throws(Errno) -> KVMView {
        st.clock &+= 1
        if let v = st.byKey[key], !v.isRetired { v.lastEntered = st.clock; return v }
        if primary.key == nil && !key.layout.guarded && !key.region {
            try installLayout(primary, key, &st)
            primary.key = key
            st.byKey[key] = primary
            primary.lastEntered = st.clock
            return primary
        }
        if key.layout.guarded {
            let guardedViews = st.views.filter { $0.guarded && !$0.isRetired }
            if guardedViews.count >= maxGuardedViews,
               let old = guardedViews.filter({ $0.occupants.isEmpty }).min(by: { $0.lastEntered < $1.lastEntered }) {
                old.retired.store(true, ordering: .releasing)
                if let k = old.key { st.byKey[k] = nil }
                st.views.removeAll { $0 === old }
            }
        }
        let v = try KVMView(id: st.nextID, vm: try system.createVM(), key: key)
        st.nextID += 1
        v.lastEntered = st.clock
        try installLayout(v, key, &st)
        try addFlushHintSlot(v)
        st.views.append(v)
        st.byKey[key] = v
        stats.add(.viewsCreated)
        return v
    }

    /// Brings every view's layout up to date (after an invalidate or an NVDIMM attachment).
    func refreshViews(_ st: inout LayoutState) throws(Errno) {
        for v in st.views { if let k = v.key { try installLayout(v, k, &st) } }
        layoutDirty.store(false, ordering: .releasing)
    }

    // MARK: coherence (under `layout`)

    /// A vCPU (`index`, CR3 `cr3` if its paging is on) moves from `old` into `v`: the other views'
    /// page-table writes are collected and `v` is zapped if it may hold a stale shadow of one.
    func enter(_ v: KVMView, leaving old: KVMView?, index: UInt32, cr3: UInt64?, cr4: UInt64, efer: UInt64,
               _ st: inout LayoutState) throws(Errno) {
        if let old { old.occupants[index] = nil }
        try harvest(for: v, &st)
        var added = Set<UInt64>()
        if !v.stalePages.isEmpty {
            let stale = v.stalePages
            v.stalePages = []
            if v.ptUsed.load(ordering: .acquiring) {
                if v.quirkOff {
                    // Only the written pages' shadows go (the memslots holding them are recreated);
                    // the page tables may now link new tables: walk the roots again.
                    try zapPages(v, stale, &st)
                    let roots = v.walkedRoots
                    v.walkedRoots = []
                    for root in roots { added.formUnion(track(root, in: v, cr4: cr4, efer: efer)) }
                } else {
                    try v.zapAll()
                    v.ptUsed.store(false, ordering: .releasing)
                    v.ptPages = []
                    v.walkedRoots = []
                    v.ptUnknown = false
                    for (_, root) in v.occupants where root != 0 { added.formUnion(track(root, in: v, cr4: cr4, efer: efer)) }
                }
                stats.add(.viewZaps)
            }
        }
        v.occupants[index] = cr3 ?? 0
        if let cr3 { added.formUnion(track(cr3, in: v, cr4: cr4, efer: efer)) }
        // Pages new to `v`'s set were not shadowed by it: what was written to them before is no
        // concern of `v`'s (read now, for the other views' sake, and not held against `v`).
        if !added.isEmpty { try harvest(for: v, pages: added, markingIt: false, &st) }
    }

    /// `v` may now shadow the page tables of `cr3`: guarded views record the user-reachable tables.
    /// Returns the pages added to its set.
    private func track(_ cr3: UInt64, in v: KVMView, cr4: UInt64, efer: UInt64) -> Set<UInt64> {
        v.ptUsed.store(true, ordering: .releasing)
        guard v.guarded else { v.ptUnknown = true; return [] }
        if v.ptUnknown { return [] }
        let root = cr3 & 0x000F_FFFF_FFFF_F000
        if v.walkedRoots.contains(root) { return [] }
        // 4-level paging only (CR4.LA57 = bit 12; long mode, EFER.LMA); anything else: unknown.
        guard cr4 & (1 << 12) == 0, efer & eferLMA != 0, let pages = userTables(root) else { v.ptUnknown = true; return [] }
        v.walkedRoots.insert(root)
        let added = pages.subtracting(v.ptPages)
        v.ptPages.formUnion(added)
        return added
    }

    /// The pages (gpa >> 12) of the 4-level tree at `root` that a CPL 3 access can walk: the PML4
    /// and the tables reached through entries with P = 1 and U/S = 1 (nil: a table outside RAM).
    func userTables(_ root: UInt64) -> Set<UInt64>? {
        var out: Set<UInt64> = [root >> 12]
        var level: [UInt64] = [root]
        for depth in 0..<3 {
            var next: [UInt64] = []
            for table in level {
                guard memory.contains(table, 4096) else { return nil }
                for i in 0..<512 {
                    let e = memory.base.load(fromByteOffset: Int(table) + 8 * i, as: UInt64.self)
                    guard e & 1 != 0, e & 4 != 0 else { continue }
                    if depth > 0 && e & 0x80 != 0 { continue }   // a 1 GiB or 2 MiB page: no table below
                    let t = e & 0x000F_FFFF_FFFF_F000
                    guard memory.contains(t, 4096) else { return nil }
                    if out.insert(t >> 12).inserted { next.append(t) }
                }
            }
            level = next
        }
        return out
    }

    /// Reads the dirty logs of the views other than `v` that log (all their memslots, or, when `v`'s
    /// page tables are known, those holding them; or those holding `pages`) and marks the views that
    /// hold a written page (`v` itself only if `markingIt`).
    private func harvest(for v: KVMView, pages: Set<UInt64>? = nil, markingIt: Bool = true, _ st: inout LayoutState) throws(Errno) {
        let targets: Set<UInt64>? = pages ?? (v.guarded && !v.ptUnknown ? v.ptPages : nil)
        for x in st.views where x !== v && x.logging && !x.isRetired {
            let runs = x.runs.load(ordering: .acquiring)
            let full = targets == nil
            if full && runs == x.runsAtHarvest { continue }   // nothing ran there since
            var written: [UInt64] = []
            func read(_ slot: UInt32, _ r: MappedRange) throws(Errno) { written += try readDirtyLog(x, slot, r, &st) }
            for (slot, r) in x.slots where !r.readonly {
                if let targets, !targets.contains(where: { $0 >= r.gpa >> 12 && $0 < (r.gpa + r.size) >> 12 }) { continue }
                try read(slot, r)
            }
            if full {
                for (slot, r) in x.pmemRuns where !r.readonly { try read(slot, r) }
                x.runsAtHarvest = runs
            }
            if !written.isEmpty { distribute(written, from: x, sparing: markingIt ? nil : v, &st) }
        }
    }

    /// Pages written by view `x` (nil: by the plugin or the VMM): the views that may hold a shadow
    /// of one of them as a page table are marked for a zap.
    func distribute(_ pages: [UInt64], from x: KVMView?, sparing spared: KVMView? = nil, _ st: inout LayoutState) {
        for w in st.views where w !== x && w !== spared && w.ptUsed.load(ordering: .acquiring) {
            if w.guarded && !w.ptUnknown {
                for p in pages where w.ptPages.contains(p) { w.stalePages.insert(p) }
            } else {
                for p in pages where w.maps(page: p) { w.stalePages.insert(p) }
            }
        }
    }

    /// Drops view `v`'s shadows of `pages` (SLOT_ZAP_ALL off): each memslot holding one is deleted and
    /// created again (KVM zaps the shadow pages of the memslot's pages and its translations; probe_coherence.c
    /// (c)). The pages `v` itself wrote there and nobody read yet are read from its dirty log first.
    private func zapPages(_ v: KVMView, _ pages: Set<UInt64>, _ st: inout LayoutState) throws(Errno) {
        func holds(_ r: MappedRange) -> Bool { pages.contains { $0 >= r.gpa >> 12 && $0 < (r.gpa + r.size) >> 12 } }
        for (slot, r) in v.slots.sorted(by: { $0.key < $1.key }) where holds(r) {
            let logged = v.logging && !r.readonly
            if logged {
                let written = try readDirtyLog(v, slot, r, &st)
                if !written.isEmpty { distribute(written, from: v, &st) }
            }
            let flags = r.readonly ? kvmMemReadonly : (logged ? kvmMemLogDirty : 0)
            try v.vm.setUserMemoryRegion(slot: slot, gpa: r.gpa, size: 0, host: nil)
            try v.vm.setUserMemoryRegion(slot: slot, flags: flags, gpa: r.gpa, size: r.size, host: memory.base + Int(r.gpa))
        }
        for (slot, r) in v.pmemRuns.sorted(by: { $0.key < $1.key }) where holds(r) {
            let logged = v.logging && !r.readonly
            if logged {
                let written = try readDirtyLog(v, slot, r, &st)
                if !written.isEmpty { distribute(written, from: v, &st) }
            }
            try recreatePmemRun(v, slot, r, flags: r.readonly ? kvmMemReadonly : (logged ? kvmMemLogDirty : 0))
        }
    }

    /// KVM_GET_DIRTY_LOG of view `x`'s memslot `slot` (mapping `r`): the pages (gpa >> 12) written.
    func readDirtyLog(_ x: KVMView, _ slot: UInt32, _ r: MappedRange, _ st: inout LayoutState) throws(Errno) -> [UInt64] {
        let pages = Int(r.size >> 12)
        let words = (pages + 63) / 64
        if st.bitmap.count < words { st.bitmap = [UInt64](repeating: 0, count: words) }
        var failure: Errno?
        st.bitmap.withUnsafeMutableBytes { b in
            do throws(Errno) { try x.vm.dirtyLog(slot: slot, into: b.baseAddress!) } catch { failure = error }
        }
        if let failure { throw failure }
        stats.add(.dirtyLogReads)
        var written: [UInt64] = []
        for w in 0..<words where st.bitmap[w] != 0 {
            var bits = st.bitmap[w]
            while bits != 0 {
                written.append((r.gpa >> 12) + UInt64(w * 64 + bits.trailingZeroBitCount))
                bits &= bits - 1
            }
        }
        return written
    }

    /// RAM written outside KVM (an MMIO store the plugin completed in view `x`, or the VMM's
    /// memory_write): it may be a page table of another view.
    func hostWrote(_ gpa: UInt64, _ len: Int, from x: KVMView?) {
        guard len > 0, memory.contains(gpa, len) else { return }
        let pages = Array((gpa >> 12)...((gpa + UInt64(len) - 1) >> 12))
        layout.withLock { st in distribute(pages, from: x, &st) }
    }
}

/// Why a run could not be prepared.
enum RunError: Error {
    case kvm(Errno)
    case escalation(EscalationError)
}

extension KVMVCPU {
    /// Before a KVM_RUN: the views' layouts up to date, the vCPU in the view its run needs, and what
    /// the escalation exit needs there.
    func prepareRun() throws(RunError) {
        if vm.handle != nil {
            let layout: LayoutKey
            do { layout = try layoutKey() } catch { throw .escalation(error) }
            // The region only for a vCPU the core put in the mode (fails closed: the hierarchies alone never map it).
            let key = ViewKey(layout: layout, region: privileged && vm.regionDefined.load(ordering: .acquiring) && vm.regionWanted(hierarchy))
            do {
                if vm.layoutDirty.load(ordering: .acquiring) {
                    try vm.layout.withLock { (st) throws(Errno) in try vm.refreshViews(&st) }
                }
                if key != current.key || current.view.isRetired {
                    try move(to: key)
                } else {
                    // Paging turned on, or another CR3 set by the VMM, without a move: the view is told
                    // (its page-table set, Views.swift), as at a move.
                    let c = current
                    let s = c.cpu.sync.pointee.sregs
                    if s.cr0 & cr0PG != 0 && (!c.view.ptUsed.load(ordering: .acquiring) || (c.view.guarded && s.cr3 != c.enteredCR3)) {
                        try vm.layout.withLock { (st) throws(Errno) in
                            try vm.enter(c.view, leaving: nil, index: index, cr3: s.cr3, cr4: s.cr4, efer: s.efer, &st)
                        }
                        c.enteredCR3 = s.cr3
                    }
                }
                // The region's view lost its memslot to a revocation: back before the run.
                if key.region && !current.view.regionMapped {
                    _ = try vm.layout.withLock { (st) throws(Errno) -> UInt64 in try vm.syncRegionSlot(current.view, want: true) }
                }
            } catch {
                throw .kvm(error)
            }
        }
        do { try afterMove() } catch { throw .kvm(error) }
    }

    /// Moves this vCPU into the view for `key` (Views.swift: what is carried, and the coherence check).
    func move(to key: ViewKey) throws(Errno) {
        let t0 = monotonicNanos()
        let zaps0 = vm.stats[.viewZaps], views0 = vm.stats[.viewsCreated]
        var steady = true
        defer {
            if steady && vm.stats[.viewZaps] == zaps0 && vm.stats[.viewsCreated] == views0 {
                vm.stats.add(.steadyMoves)
                vm.stats.add(.steadyMoveNanos, monotonicNanos() &- t0)
            }
        }
        let src = current
        completePending(src)
        let s = src.cpu.sync.pointee.sregs
        let paging = s.cr0 & cr0PG != 0
        let dstView = try vm.layout.withLock { (st) throws(Errno) -> KVMView in
            let v = try vm.view(for: key, &st)
            try vm.enter(v, leaving: src.view, index: index, cr3: paging ? s.cr3 : nil, cr4: s.cr4, efer: s.efer, &st)
            return v
        }
        for (id, c) in cpus where c.view.isRetired && c !== src { cpus[id] = nil }
        let dst: ViewCPU
        if let c = cpus[dstView.id] {
            dst = c
        } else {
            steady = false
            dst = try vm.makeViewCPU(dstView, index)
            cpus[dstView.id] = dst
            try copyCPL0State(from: owner, to: dst)   // a new KVM vCPU starts from KVM's reset values
        }
        if dst !== src { try carry(from: src, to: dst) }
        dst.key = key
        dst.enteredCR3 = s.cr3
        current = dst
        runner.withLock { st in
            // A kick that landed in the old kvm_run applies to the next run.
            if ckvm_run_immediate_exit(st.run) != 0 {
                ckvm_run_set_immediate_exit(st.run, 0)
                ckvm_run_set_immediate_exit(dst.cpu.run, 1)
            }
            st.run = dst.cpu.run
        }
        if src.view.isRetired { cpus[src.view.id] = nil }
        if dst !== src { vm.stats.add(.viewMoves); stats.add(.viewMoves) }
        let wasRegion = src.key?.region ?? false
        if key.region != wasRegion {
            vm.stats.add(key.region ? .regionEntryMoveNanos : .regionLeaveMoveNanos, monotonicNanos() &- t0)
        }
    }

    /// The state a move carries (Views.swift).
    private func carry(from src: ViewCPU, to dst: ViewCPU) throws(Errno) {
        // Registers, system registers, events: kvm_run to kvm_run, loaded by dst's next KVM_RUN.
        dst.cpu.sync.pointee = src.cpu.sync.pointee
        var efer = dst.cpu.sync.pointee.sregs.efer
        if dst.view.guarded {
            if !src.view.guarded { guestSCE = efer & eferSCE != 0 }
            efer &= ~eferSCE
        } else if src.view.guarded && guestSCE {
            efer |= eferSCE
        }
        dst.cpu.sync.pointee.sregs.efer = efer
        ckvm_run_mark_dirty(dst.cpu.run, ckvm_sync_all())
        // x87/SSE/AVX state: read from the source, written only where it differs.
        try src.readXSAVE()
        if dst.xsaveAt != dst.runs || memcmp(dst.xsave, src.xsave, xsaveSize) != 0 {
            dst.xsave.copyMemory(from: src.xsave, byteCount: xsaveSize)
            try dst.cpu.setXSAVE(from: dst.xsave)
        }
        dst.xsaveAt = dst.runs
        // What only CPL 0 code changes lives in the owner (the last view where CPL 0 code ran).
        if !src.view.guarded { owner = src }
        if dst.view.guarded {
            // XCR0 is seen at CPL 3 only with CR4.OSXSAVE (XGETBV, and which XSAVE features fault);
            // without it both #UD whatever XCR0 holds.
            if dst.cpu.sync.pointee.sregs.cr4 & cr4OSXSAVE != 0 { try dst.writeXCRS(try owner.readXCRS()) }
            if escalationSupport.cpl3DebugRegs { try dst.writeDebugRegs(try owner.readDebugRegs()) }
        } else if dst !== owner {
            try copyCPL0State(from: owner, to: dst)
            owner = dst
        }
        // A #DB at CPL 3 in the guarded view updated DR6 there before its delivery stopped.
        if src.view.guarded, case .reinject(nr: 1, _, _)? = pendingEntry {
            var d = try dst.readDebugRegs()
            d.dr6 = try src.readDebugRegs().dr6
            try dst.writeDebugRegs(d)
        }
    }

    /// MSRs, XCR0 and debug registers from `o` into `d`: read from `o` (unless it has not run since
    /// the last read), written into `d` only where they differ from what `d` holds.
    func copyCPL0State(from o: ViewCPU, to d: ViewCPU) throws(Errno) {
        guard o !== d else { return }
        var list = copyableMSRs.withLock { l in
            if l == nil { l = initialCopyableMSRs(vm.system) }
            return l!
        }
        // KVM stops at the first MSR it cannot read or write back: that one is dropped for good.
        while !list.isEmpty {
            if o.msrsAt != o.runs || o.msrList != list {
                let values = try o.cpu.msrs(list)
                if values.count < list.count {
                    let bad = list[values.count]
                    list.removeAll { $0 == bad }
                    copyableMSRs.withLock { $0?.removeAll { $0 == bad } }
                    continue
                }
                o.msrValues = values; o.msrList = list; o.msrsAt = o.runs
            }
            if d.msrsAt == d.runs && d.msrList == list && d.msrValues == o.msrValues { break }
            let n = try d.cpu.setMSRs(list, o.msrValues)
            if n < list.count {
                let bad = list[n]
                list.removeAll { $0 == bad }
                copyableMSRs.withLock { $0?.removeAll { $0 == bad } }
                continue
            }
            d.msrValues = o.msrValues; d.msrList = list; d.msrsAt = d.runs
            break
        }
        try d.writeXCRS(try o.readXCRS())
        try d.writeDebugRegs(try o.readDebugRegs())
    }
}
