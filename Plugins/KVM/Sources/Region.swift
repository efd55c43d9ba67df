// The privileged mode (SMM-like) on KVM: the special region as a memslot the core's decisions add
// and remove, the entering vCPU's state, RSM.
//
// This KVM has no SMM (KVM_CAP_X86_SMM = 0) and no multiple address spaces, so the mode is built
// from the ordinary pieces:
//  - define_region: the region's backing is anonymous shared memory of its size, filled with the
//    contents; the core's leaves for the region's pages carry host_offset = the region window
//    (the first 1 GiB boundary past RAM), which the plugin checks.
//  - the memslot: before each KVM_RUN the plugin asks the core (hierarchy_translate, a snapshot
//    read) whether the exposed hierarchy maps the region executable at the region's host offset;
//    if so, the run's view (Views.swift) is the one of the hierarchy's layout *with* memslot
//    `regionSlot` mapping the region's GPA range to the backing, if not the one without. Entering
//    and leaving the mode are moves of the vCPU between two KVM VMs, no memslot update (the
//    region's view is created, with its memslot, at the first entry): a memslot update waits for
//    an SRCU grace period, which took 0.5-2 ms here while other work loaded the machine (11-17 µs
//    when it was quiet), a move does not. Only the vCPU in the mode ever runs in that view, which is
//    the mode's global view: the core adds the region to a hierarchy only while every other vCPU is
//    parked outside KVM_RUN and removes it before any resumes; those vCPUs' views never map it at
//    all. An invalidate that covers the region while a vCPU runs in a view that maps it deletes the
//    memslot there at once (a revocation).
//  - reads of the region's window while it is absent (a vCPU outside the mode probing it) arrive
//    as KVM_EXIT_MMIO outside RAM: the plugin answers all ones (an open bus) and drops writes, and
//    the guest runs on. Data accesses to the window while the region is present but the exposed
//    hierarchy does not execute it are completed from the backing. Other MMIO outside RAM is still
//    NPT_EXIT_INTERNAL_ERROR.
//  - entry and leave are told, never inferred (ABI 1.3): vcpu_enter_privileged saves the vCPU's full
//    KVM state (KVM_GET_SREGS: segments, GDT, IDT, control registers, EFER; the core keeps the
//    npt_regs) and puts it in the mode's entry state; only from then until vcpu_leave_privileged does
//    a run of this vCPU use the view with the region (and complete data accesses to the region's
//    window from its backing), and only then is an RSM the leave exit. A vCPU the core did not put in
//    the mode runs in a view without the region whatever the hierarchies say: it fails closed.
//    SMM enters in a real-mode-like state with CS = SMBASE >> 4; the plugin does the same: 16-bit real
//    mode, CS selector = (rip & ~0xFFFF) >> 4, base rip & ~0xFFFF, ip = rip & 0xFFFF, the other
//    segments 0 (so the region must lie below 1 MiB), CR0.PE/PG/EM/TS, CR4 and EFER cleared as SMM
//    clears them, rax = the vCPU's index. vcpu_leave_privileged restores the saved state (the core then
//    writes its npt_regs with set_regs): npt_regs alone cannot restore a long-mode vCPU's segments and
//    descriptor tables, nor undo the segments a real-mode handler loaded.
//  - RSM (0F AA) does not run on this KVM (no SMM): its emulator raises #UD, delivered (emulated)
//    through the real-mode IVT. In the mode the plugin sets the IDT base to an unbacked GPA
//    (regionIVT): the delivery pushes FLAGS, CS, IP on the handler's stack (SS:SP: the handler must
//    have a stack, as real SMM code must), fails to read the IVT, and KVM makes it a triple fault:
//    KVM_EXIT_SHUTDOWN with rip at the RSM (measured here). On a stock VMX/SVM KVM the failed
//    delivery may show as KVM_EXIT_INTERNAL_ERROR (emulation failure, or DELIVERY_EV since Linux
//    6.14; from KVM's source, not measured): accepted too. Such a stop of a vCPU in the mode whose
//    bytes at the linear rip are 0F AA is reported as NPT_EXIT_LEAVE_MODE; outside the mode it is
//    what it is (a triple fault: NPT_EXIT_INTERNAL_ERROR), as an RSM outside SMM is a #UD.
//  - In real mode set up by set_regs npt_regs.rip is the linear address (CS.base + ip); with
//    CS = 0 (the plugin's real-mode convention) that is ip. KVM's reset state is left as it was.
import CKVM
import CNPTKit
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// The KVM memslot id of the region (the layouts allocate from 0 upward).
let regionSlot: UInt32 = 0x7000
/// The IDT base inside the mode: a GPA no memslot maps (below 4 GiB, above any RAM a real-mode
/// region can go with; an NVDIMM range placed here would break RSM detection).
let regionIVT: UInt64 = 0xFFFF_0000

struct RegionState: @unchecked Sendable {
    var gpa: UInt64 = 0
    var size: UInt64 = 0
    var hostOffset: UInt64 = 0
    var backing: GuestMemory?

    func contains(_ gpa: UInt64, _ len: UInt64 = 1) -> Bool {
        backing != nil && gpa >= self.gpa && gpa - self.gpa < size && len <= size - (gpa - self.gpa)
    }
}

extension KVMVM {
    func defineRegion(_ gpa: UInt64, _ size: UInt64, _ hostOffset: UInt64, _ contents: UnsafeRawPointer?,
                      _ len: Int) -> npt_status {
        guard size > 0, size % 4096 == 0, gpa % 4096 == 0, size <= UInt64(Int.max) else {
            return fail(NPT_ERR_INVALID_ARGUMENT, "define_region: [\(hex(gpa)), +\(hex(size))) is not page aligned")
        }
        guard gpa >= UInt64(memory.size) else {
            return fail(NPT_ERR_OVERLAP, "define_region: \(hex(gpa)) is inside guest RAM (\(hex(UInt64(memory.size))))")
        }
        guard len == 0 || (contents != nil && UInt64(len) <= size) else {
            return fail(NPT_ERR_INVALID_ARGUMENT, "define_region: contents (\(len) bytes) NULL or larger than the region")
        }
        do {
            let b = try GuestMemory(size: Int(size))
            if len > 0 { b.base.copyMemory(from: contents!, byteCount: len) }
            try layout.withLock { (lst) throws(Errno) in
                for v in lst.views where v.regionMapped { _ = try syncRegionSlot(v, want: false) }
                region.withLock { st in
                    st.gpa = gpa; st.size = size; st.hostOffset = hostOffset; st.backing = b
                }
                for v in lst.views where v.key?.region == true { _ = try syncRegionSlot(v, want: true) }
            }
            regionDefined.store(true, ordering: .releasing)
            return NPT_OK
        } catch {
            return fail(error, "define_region")
        }
    }

    /// invalidate, then: an invalidate that covers the region removes its memslot at once from a view
    /// a vCPU is running in (a revocation; the core itself removes the region only while its
    /// holder is stopped, and the region's view is left as it is then).
    func invalidateWithRegion(_ hierarchy: UInt32, _ gpa: UInt64, _ size: UInt64) -> npt_status {
        let s = invalidate(hierarchy, gpa, size)
        do {
            try layout.withLock { (lst) throws(Errno) in
                let (defined, start, length) = region.withLock { ($0.backing != nil, $0.gpa, $0.size) }
                guard defined, gpa < start + length, start < gpa &+ size || gpa &+ size < gpa else { return }
                for v in lst.views where v.regionMapped && v.inside.load(ordering: .acquiring) > 0 {
                    _ = try syncRegionSlot(v, want: false)
                }
            }
        } catch {
            return fail(error, "invalidate: removing the privileged-mode region's memslot")
        }
        return s
    }

    /// Whether the run of a vCPU exposing `hierarchy` needs the region: the hierarchy maps the
    /// region's first page executable at the region's host offset (a snapshot read of the core's).
    func regionWanted(_ hierarchy: UInt32) -> Bool {
        let (defined, gpa, hostOffset) = region.withLock { ($0.backing != nil, $0.gpa, $0.hostOffset) }
        guard defined else { return false }
        return regionPerms(hierarchy, gpa, hostOffset) & 0x4 != 0
    }

    /// Under `layout`: the region's memslot in view `v` mapped (if defined) or not. Returns the
    /// memslot updates made.
    func syncRegionSlot(_ v: KVMView, want: Bool) throws(Errno) -> UInt64 {
        try region.withLock { (st) throws(Errno) -> UInt64 in
            let mapped = want && st.backing != nil
            if mapped == v.regionMapped { return 0 }
            if mapped, let b = st.backing {
                try v.vm.setUserMemoryRegion(slot: regionSlot, gpa: st.gpa, size: st.size, host: b.base)
                v.regionGPA = st.gpa
            } else {
                try v.vm.setUserMemoryRegion(slot: regionSlot, gpa: v.regionGPA, size: 0, host: nil)
            }
            v.regionMapped = mapped
            return 1
        }
    }

    /// Whether `hierarchy` maps the region's first page at the region's host offset, with its
    /// permissions (0 if absent). A snapshot read of the core (no lock of the core's is taken).
    private func regionPerms(_ hierarchy: UInt32, _ gpa: UInt64, _ hostOffset: UInt64) -> UInt64 {
        guard let tr = host.pointee.hierarchy_translate, let handle else { return 0 }
        var t = npt_translation()
        t.size = UInt32(MemoryLayout<npt_translation>.size)
        guard tr(handle, hierarchy, gpa, &t) == NPT_OK, t.perms != 0, t.host_offset == hostOffset else { return 0 }
        return t.perms
    }

    /// A data access to the region's window that exited as MMIO: completed from the backing if the
    /// vCPU is in the mode (`inMode`, as the core said) and the exposed hierarchy maps the region,
    /// else a read gives all ones and a write is dropped. Returns false if `gpa` is not in the window.
    func completeRegionMMIO(_ run: UnsafeMutablePointer<kvm_run>, _ hierarchy: UInt32, inMode: Bool) -> Bool {
        let gpa = ckvm_run_mmio_phys_addr(run)
        let len = Int(ckvm_run_mmio_len(run))
        let (inside, base, start, host) = region.withLock { st in
            (st.contains(gpa, UInt64(len)), st.backing?.base, st.gpa, st.hostOffset)
        }
        guard inside, len <= 8, let base else { return false }
        let data = UnsafeMutableRawPointer(ckvm_run_mmio_data(run)!)
        let perms = inMode ? regionPerms(hierarchy, start, host) : 0
        let write = ckvm_run_mmio_is_write(run) != 0
        let mem = base + Int(gpa - start)
        if write {
            if perms & 0x2 != 0 { mem.copyMemory(from: data, byteCount: len) }
        } else if perms & 0x1 != 0 {
            data.copyMemory(from: mem, byteCount: len)
        } else {
            data.initializeMemory(as: UInt8.self, repeating: 0xFF, count: len)
            stats.add(.regionUnbackedReads)
        }
        return true
    }

    /// Reads `n` bytes at guest-physical `gpa` from RAM or the region's backing.
    func peek(_ gpa: UInt64, _ n: Int) -> [UInt8]? {
        if memory.contains(gpa, n) { return (0..<n).map { memory.base.load(fromByteOffset: Int(gpa) + $0, as: UInt8.self) } }
        return region.withLock { st in
            guard st.contains(gpa, UInt64(n)), let b = st.backing else { return nil }
            return (0..<n).map { b.base.load(fromByteOffset: Int(gpa - st.gpa) + $0, as: UInt8.self) }
        }
    }
}

extension KVMVCPU {
    /// get_regs; in real mode rip is reported as the linear address (CS.base + ip).
    func getRegsWithRegion(_ out: UnsafeMutablePointer<npt_regs>?) -> npt_status {
        if vm.region.withLock({ $0.backing != nil }) { completePending(current) }
        let s = getRegs(out)
        guard s == NPT_OK, let out, mode == .real, out.pointee.cr0 & cr0PE == 0, let sr = try? cpu.sregs else { return s }
        out.pointee.rip = sr.cs.base &+ out.pointee.rip
        return s
    }

    /// vcpu_enter_privileged: the core has stopped the others and put the region in the view. Saves
    /// the full system state and enters 16-bit real mode at the entry (CS = its 64 KiB segment).
    func enterPrivileged(_ e: UnsafePointer<npt_privileged_entry>?) -> npt_status {
        guard let e, e.pointee.size >= UInt32(MemoryLayout<npt_privileged_entry>.size) else {
            return fail(NPT_ERR_INVALID_ARGUMENT, "vcpu_enter_privileged: NULL or short npt_privileged_entry")
        }
        let entry = e.pointee
        guard !privileged else { return fail(NPT_ERR_STATE, "vcpu_enter_privileged: vCPU \(index) is in the mode already") }
        let (defined, start, size) = vm.region.withLock { ($0.backing != nil, $0.gpa, $0.size) }
        guard defined, entry.region_gpa == start, entry.region_size == size, entry.entry_rip >= start,
              entry.entry_rip - start < size else {
            return fail(NPT_ERR_STATE, "vcpu_enter_privileged: [\(hex(entry.region_gpa)), +\(hex(entry.region_size))) at \(hex(entry.entry_rip)) is not the region define_region backs")
        }
        guard entry.entry_rip < 0x10_0000 else {
            return fail(NPT_ERR_UNSUPPORTED, "vcpu_enter_privileged: the entry \(hex(entry.entry_rip)) is above 1 MiB (the mode runs in real mode)")
        }
        completePending(current)
        do {
            let old = try cpu.sregs
            var s = old
            s.cr0 = old.cr0 & ~(cr0PE | cr0PG | 1 << 2 | 1 << 3)   // SMM clears PE, EM, TS, PG
            s.cr4 = 0
            s.efer = 0
            let segBase = entry.entry_rip & ~0xFFFF
            s.cs = realSegment(code: true)
            s.cs.selector = UInt16(segBase >> 4)
            s.cs.base = segBase
            let d = realSegment(code: false)
            s.ds = d; s.es = d; s.fs = d; s.gs = d; s.ss = d
            // The IVT at an unbacked GPA: KVM delivers a real-mode exception by pushing FLAGS, CS, IP
            // on the handler's stack, then reading the IVT; that read fails, KVM makes it a triple
            // fault: KVM_EXIT_SHUTDOWN with rip at the faulting instruction. That is how RSM shows
            // (its #UD, runWithRegion). (SMM code, too, runs without an IDT until it sets one.)
            s.idt.base = regionIVT; s.idt.limit = 0x3FF
            var r = try cpu.regs
            try cpu.setSregs(s)
            r.rax = UInt64(entry.vcpu_index)
            r.rip = entry.entry_rip - segBase
            r.rflags = 2
            try cpu.setRegs(r)
            mode = .real
            pendingEntry = nil
            escalationNow = false
            privilegedSaved = old
            privileged = true
            stats.add(.privilegedEntries)
            stats.set(.inPrivilegedMode, 1)
            vm.stats.add(.privilegedEntries)
            return NPT_OK
        } catch {
            return fail(error, "vcpu_enter_privileged")
        }
    }

    /// vcpu_leave_privileged (before the region leaves the view): the saved system state back; the
    /// core then writes the npt_regs it saved (set_regs).
    func leavePrivileged() -> npt_status {
        guard privileged, let saved = privilegedSaved else {
            return fail(NPT_ERR_STATE, "vcpu_leave_privileged: vCPU \(index) is not in the mode")
        }
        completePending(current)
        do {
            try cpu.setSregs(saved)
        } catch {
            return fail(error, "vcpu_leave_privileged")
        }
        mode = saved.cr0 & cr0PG != 0 ? .long(cpl: UInt32(saved.cs.dpl)) : saved.cr0 & cr0PE == 0 ? .real : nil
        privileged = false
        privilegedSaved = nil
        stats.set(.inPrivilegedMode, 0)
        vm.stats.add(.privilegedLeaves)
        return NPT_OK
    }

    /// set_regs; in real mode with a CS other than 0 (inside the region, or a real-mode state the mode
    /// restored) `npt_regs.rip` is linear (CS.base + ip), as get_regs reports it.
    func setRegsWithRegion(_ p: UnsafePointer<npt_regs>?) -> npt_status {
        guard let p, p.pointee.size >= UInt32(MemoryLayout<npt_regs>.size) else { return setRegs(p) }
        completePending(current)
        let n = p.pointee
        if mode == .real, n.cr0 & cr0PE == 0, let sr = try? cpu.sregs, sr.cs.base != 0, sr.cr0 & cr0PE == 0 {
            guard n.rip >= sr.cs.base, n.rip - sr.cs.base <= 0xFFFF else {
                return fail(NPT_ERR_UNSUPPORTED, "vcpu_set_regs: rip \(hex(n.rip)) is outside CS (base \(hex(sr.cs.base)))")
            }
            var m = n
            m.rip = n.rip - sr.cs.base
            return setRegs(&m)
        }
        return setRegs(p)
    }

    /// vcpu_run with the region: the run of a vCPU in the mode enters the view that maps the region
    /// when the exposed hierarchy maps it (Views.swift; its presence cannot change during one vcpu_run: the core adds
    /// or removes it only while this vCPU's thread is outside vcpu_run); probes of the region's
    /// window are answered; RSM is reported as NPT_EXIT_LEAVE_MODE.
    func runWithRegion(_ e: UnsafeMutablePointer<npt_exit>?) -> npt_status {
        while true {
            let s = run(e)
            guard s == NPT_OK, let e, e.pointee.reason == NPT_EXIT_INTERNAL_ERROR.rawValue else { return s }
            let kvmReason = Int32(truncatingIfNeeded: e.pointee.qualification >> 32)
            if kvmReason == KVM_EXIT_MMIO, vm.completeRegionMMIO(cpu.run, hierarchy, inMode: privileged) { continue }
            // RSM without SMM, only for a vCPU in the mode: measured on this machine,
            // KVM_EXIT_SHUTDOWN with rip at the RSM (the emulator raises #UD, which it cannot deliver
            // in this state); an emulation failure or an undeliverable event (KVM_EXIT_INTERNAL_ERROR,
            // suberror 1 or 3: a stock KVM, not measured) is accepted too.
            let suberror = e.pointee.qualification & 0xFFFF_FFFF
            let undeliverable = kvmReason == KVM_EXIT_INTERNAL_ERROR
                && (suberror == UInt64(KVM_INTERNAL_ERROR_EMULATION) || suberror == UInt64(KVM_INTERNAL_ERROR_DELIVERY_EV))
            if privileged, undeliverable || kvmReason == KVM_EXIT_SHUTDOWN, let r = try? cpu.regs, let sr = try? cpu.sregs {
                let linear = sr.cr0 & cr0PE == 0 ? sr.cs.base &+ r.rip : r.rip
                if let gpa = vm.translate(linear, cr0: sr.cr0, cr3: sr.cr3), vm.peek(gpa, 2) == [0x0F, 0xAA] {
                    e.pointee.reason = NPT_EXIT_LEAVE_MODE.rawValue
                    e.pointee.qualification = 0
                    e.pointee.gpa = 0
                    e.pointee.rip = linear
                    vm.stats.add(.rsmExits)
                }
            }
            return s
        }
    }
}
