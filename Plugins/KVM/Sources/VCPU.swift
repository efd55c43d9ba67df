// A vCPU of the KVM backend: registers, running, exits, kicks.
import CKVM
import CNPTKit
import Synchronization
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

// x86 bits
let cr0PE: UInt64 = 1 << 0
let cr0PG: UInt64 = 1 << 31
let cr4PAE: UInt64 = 1 << 5
let eferLME: UInt64 = 1 << 8
let eferLMA: UInt64 = 1 << 10
let msrLSTAR: UInt32 = 0xC000_0082

/// Selectors of the flat long-mode segments the plugin loads (Linux's layout; a guest that reloads
/// segments must have a GDT with these descriptors: 0x10 64-bit code DPL 0, 0x18 data DPL 0,
/// 0x2b data DPL 3, 0x33 64-bit code DPL 3).
let kernelCS: UInt16 = 0x10, kernelDS: UInt16 = 0x18, userDS: UInt16 = 0x2b, userCS: UInt16 = 0x33

enum CPUMode: Equatable { case real, long(cpl: UInt32) }

/// What vcpu_kick needs from another thread: the thread inside vcpu_run, and the kvm_run of the
/// KVM vCPU it runs (or will run) next.
struct RunnerState: @unchecked Sendable {
    var thread: pthread_t?
    var run: UnsafeMutablePointer<kvm_run>
}

final class KVMVCPU: @unchecked Sendable {
    let vm: KVMVM
    let index: UInt32
    // Driven by one thread at a time (the core serializes calls on a vCPU).
    /// This vCPU's KVM vCPU in each view it entered (by view id), the one it runs in now, and the one
    /// holding the state only CPL 0 code changes (Views.swift).
    var cpus: [Int: ViewCPU]
    var current: ViewCPU
    var owner: ViewCPU
    var cpu: KVMVirtualCPU { current.cpu }
    var hierarchy: UInt32 = NPT_HIERARCHY_SUPERVISOR
    var exitControls: UInt32 = 0
    /// The segments last loaded by set_regs (nil: KVM's reset state).
    var mode: CPUMode?
    /// For vcpu_kick (any thread).
    let runner: Mutex<RunnerState>
    /// The last exit was a guest write to the trapped vFHA (Pmem.swift); KVM completes it on the
    /// next KVM_RUN.
    var trappedWritePending = false
    /// The escalation exit (Escalation.swift): a guarded view runs with EFER.SCE clear in KVM; the
    /// guest's own value; the guest's event or SYSCALL to perform in the supervisor view; an
    /// injected fault that is itself the escalation (reported by the next run).
    var guestSCE = false
    var sceHidden: Bool { current.view.guarded && guestSCE }
    var pendingEntry: PendingEntry?
    var escalationNow = false
    /// The privileged mode, as the core said it (vcpu_enter_privileged until vcpu_leave_privileged;
    /// Region.swift): only then does a run use the view with the region, and only then is an RSM the
    /// leave exit. The full system state the entry replaced, restored by the leave.
    var privileged = false
    var privilegedSaved: kvm_sregs?
    /// vcpu_stats (Stats.swift).
    let stats = Counters<VCPUStatistic>()

    init(vm: KVMVM, first: ViewCPU, index: UInt32) {
        self.vm = vm; self.index = index
        cpus = [first.view.id: first]
        current = first
        owner = first
        runner = Mutex(RunnerState(thread: nil, run: first.cpu.run))
    }

    /// The vCPU behind `vcpu_data`; its load's host receives this thread's errors from now on.
    static func from(_ p: UnsafeMutableRawPointer?) -> KVMVCPU {
        let v = Unmanaged<KVMVCPU>.fromOpaque(p!).takeUnretainedValue()
        ckvm_set_current_host(v.vm.plugin.host)
        return v
    }

    /// KVM finishes an I/O or MMIO instruction pending in `c` (a KVM_RUN with immediate_exit: KVM
    /// completes it and returns EINTR without running the guest; the registers land in kvm_run).
    /// Under the runner lock, so that a kick meanwhile is not lost when immediate_exit is restored.
    func completePending(_ c: ViewCPU) {
        guard c.completionPending else { return }
        c.completionPending = false
        runner.withLock { _ in
            let prev = ckvm_run_immediate_exit(c.cpu.run)
            ckvm_run_set_immediate_exit(c.cpu.run, 1)
            c.runs &+= 1
            try? c.cpu.runOnce()
            ckvm_run_set_immediate_exit(c.cpu.run, prev)
        }
    }

    // MARK: registers

    func getRegs(_ out: UnsafeMutablePointer<npt_regs>?) -> npt_status {
        guard let out, out.pointee.size >= UInt32(MemoryLayout<npt_regs>.size) else {
            return fail(NPT_ERR_INVALID_ARGUMENT, "vcpu_get_regs: NULL or short npt_regs")
        }
        do {
            let r = try cpu.regs
            let s = try cpu.sregs
            var n = npt_regs()
            n.size = out.pointee.size
            n.rip = r.rip
            n.rflags = r.rflags
            let g: [UInt64] = [r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi,
                               r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15]
            withUnsafeMutableBytes(of: &n.gpr) { b in
                for i in 0..<16 { b.storeBytes(of: g[i], toByteOffset: i * 8, as: UInt64.self) }
            }
            n.cr0 = s.cr0; n.cr2 = s.cr2; n.cr3 = s.cr3; n.cr4 = s.cr4; n.efer = s.efer | (sceHidden ? eferSCE : 0)
            n.cpl = s.cr0 & cr0PE == 0 ? 0 : UInt32(s.cs.dpl)
            n.lstar = try owner.cpu.msr(msrLSTAR)
            n.fault_handler = 0
            out.pointee = n
            return NPT_OK
        } catch {
            return fail(error, "vcpu_get_regs")
        }
    }

    /// The convention (Plugins/KVM/README.md): cr0.PG set means 64-bit long mode, set up by the
    /// plugin (flat 64-bit segments for regs->cpl, CR0.PE, CR4.PAE, EFER.LME|LMA; the page tables at
    /// regs->cr3 come from the guest image); cr0.PE clear means 16-bit real mode with CS = DS = ... = 0.
    /// Protected mode without paging is refused. Segments are reloaded only when the mode or the CPL
    /// changes, so get_regs followed by set_regs changes nothing.
    func setRegs(_ p: UnsafePointer<npt_regs>?) -> npt_status {
        guard let p, p.pointee.size >= UInt32(MemoryLayout<npt_regs>.size) else {
            return fail(NPT_ERR_INVALID_ARGUMENT, "vcpu_set_regs: NULL or short npt_regs")
        }
        let n = p.pointee
        let want: CPUMode
        if n.cr0 & cr0PG != 0 {
            guard n.cpl == 0 || n.cpl == 3 else { return fail(NPT_ERR_INVALID_ARGUMENT, "vcpu_set_regs: cpl \(n.cpl)") }
            want = .long(cpl: n.cpl)
        } else if n.cr0 & cr0PE == 0 {
            guard n.cpl == 0 else { return fail(NPT_ERR_INVALID_ARGUMENT, "vcpu_set_regs: real mode has cpl 0, not \(n.cpl)") }
            want = .real
        } else {
            return fail(NPT_ERR_UNSUPPORTED, "vcpu_set_regs: protected mode without paging is not supported (cr0 \(hex(n.cr0)))")
        }
        completePending(current)
        do {
            var s = try cpu.sregs
            switch want {
            case .long(let cpl):
                s.cr0 = n.cr0 | cr0PE
                s.cr3 = n.cr3
                s.cr4 = n.cr4 | cr4PAE
                s.efer = n.efer | eferLME | eferLMA
                if mode != want {
                    let user = cpl == 3
                    s.cs = flatSegment(user ? userCS : kernelCS, code: true, dpl: UInt8(cpl))
                    let d = flatSegment(user ? userDS : kernelDS, code: false, dpl: UInt8(cpl))
                    s.ds = d; s.es = d; s.fs = d; s.gs = d; s.ss = d
                }
            case .real:
                s.cr0 = n.cr0
                s.cr3 = n.cr3
                s.cr4 = n.cr4
                s.efer = n.efer & ~(eferLME | eferLMA)
                if mode != want {
                    s.cs = realSegment(code: true)
                    let d = realSegment(code: false)
                    s.ds = d; s.es = d; s.fs = d; s.gs = d; s.ss = d
                }
            }
            s.cr2 = n.cr2
            if current.view.guarded {
                // The guarded view keeps EFER.SCE clear (Escalation.swift); the guest's value is kept.
                guestSCE = s.efer & eferSCE != 0
                s.efer &= ~eferSCE
            }
            try cpu.setSregs(s)
            var r = kvm_regs()
            let g = withUnsafeBytes(of: n.gpr) { b in (0..<16).map { b.load(fromByteOffset: $0 * 8, as: UInt64.self) } }
            r.rax = g[0]; r.rcx = g[1]; r.rdx = g[2]; r.rbx = g[3]; r.rsp = g[4]; r.rbp = g[5]; r.rsi = g[6]; r.rdi = g[7]
            r.r8 = g[8]; r.r9 = g[9]; r.r10 = g[10]; r.r11 = g[11]; r.r12 = g[12]; r.r13 = g[13]; r.r14 = g[14]; r.r15 = g[15]
            r.rip = n.rip
            r.rflags = n.rflags | 2
            try cpu.setRegs(r)
            if case .long = want { try owner.cpu.setMSR(msrLSTAR, n.lstar) }
            mode = want
            // The state is the caller's now: nothing of the escalation exit's is pending.
            pendingEntry = nil
            escalationNow = false
            return NPT_OK
        } catch {
            return fail(error, "vcpu_set_regs")
        }
    }

    // MARK: hierarchy and exit controls

    func setHierarchy(_ h: UInt32) -> npt_status {
        guard h < NPT_HIERARCHY_COUNT else { return fail(NPT_ERR_INVALID_ARGUMENT, "vcpu_set_hierarchy: \(h)") }
        // Installed (as a memslot layout of the VM) right before the next KVM_RUN.
        hierarchy = h
        return NPT_OK
    }

    /// The escalation exit is the guarded user layout (Escalation.swift), where this KVM allows it;
    /// there is no exit on a return to user mode (NPT_CAP_EXIT_ON_RETURN is not advertised).
    func setExitControls(_ c: UInt32) -> npt_status {
        if c & exitControlReturn != 0 {
            return fail(NPT_ERR_UNSUPPORTED, "vcpu_set_exit_controls: KVM has no exit on a return to user mode")
        }
        if c & exitControlEscalation != 0 && !escalationSupport.usable {
            return fail(NPT_ERR_UNSUPPORTED, "vcpu_set_exit_controls: no escalation exit on this KVM: \(escalationSupport.reason)")
        }
        exitControls = c
        return NPT_OK
    }

    // MARK: running

    func kick() {
        runner.withLock { st in
            ckvm_run_set_immediate_exit(st.run, 1)
            if let t = st.thread { _ = ckvm_kick_thread(t) }
        }
    }

    func run(_ e: UnsafeMutablePointer<npt_exit>?) -> npt_status {
        guard let e, e.pointee.size >= UInt32(MemoryLayout<npt_exit>.size) else {
            return fail(NPT_ERR_INVALID_ARGUMENT, "vcpu_run: NULL or short npt_exit")
        }
        runner.withLock { $0.thread = pthread_self() }
        defer { runner.withLock { $0.thread = nil } }
        var x = npt_exit()
        x.size = e.pointee.size
        trappedWritePending = false
        if escalationNow {
            // An exception injected at CPL 3 while the escalation exit was armed: its delivery is
            // the escalation; it is delivered once the supervisor view is entered.
            escalationNow = false
            x.reason = NPT_EXIT_ESCALATION.rawValue
            return finish(&x, e)
        }
        while true {
            // The view this run needs (a move when the hierarchy, the guarded IDT pages or the
            // region's presence changed), then what the escalation exit needs in it.
            do {
                try prepareRun()
            } catch {
                switch error {
                case .kvm(let errno): return fail(errno, "vcpu_run: entering the view")
                case .escalation(let why): return fail(NPT_ERR_STATE, "vcpu_run: cannot arm the escalation exit: \(why)")
                }
            }
            let c = current
            let run = c.cpu.run
            let ranGuarded = c.view.guarded
            c.runs &+= 1
            stats.add(.kvmRuns)
            c.view.runs.add(1, ordering: .relaxed)
            c.view.inside.add(1, ordering: .relaxed)
            var failure: Errno?
            do { try c.cpu.runOnce() } catch { failure = error }
            c.view.inside.subtract(1, ordering: .relaxed)
            if let failure {
                if failure == .interrupted || failure == .resourceTemporarilyUnavailable {
                    // immediate_exit or the kick signal (or another signal): leave run.
                    ckvm_run_set_immediate_exit(run, 0)
                    x.reason = NPT_EXIT_KICKED.rawValue
                    return finish(&x, e)
                }
                return fail(failure, "vcpu_run: KVM_RUN")
            }
            let reason = ckvm_run_exit_reason(run)
            c.completionPending = Int32(reason) == KVM_EXIT_IO || Int32(reason) == KVM_EXIT_MMIO
            if c.cpu.sync.pointee.sregs.cr0 & cr0PG != 0 && !c.view.ptUsed.load(ordering: .relaxed) {
                c.view.ptUsed.store(true, ordering: .releasing)   // a guest that turned paging on inside the run
            }
            // In a guarded view, an event from CPL 3 that could not read its gate (a SHUTDOWN, or
            // DELIVERY_EV on a stock KVM) is the escalation (Escalation.swift).
            if ranGuarded && (Int32(reason) == KVM_EXIT_SHUTDOWN
                              || (Int32(reason) == KVM_EXIT_INTERNAL_ERROR
                                  && ckvm_run_internal_suberror(run) == UInt32(KVM_INTERNAL_ERROR_DELIVERY_EV))),
               let p = escalation(shutdown: Int32(reason) == KVM_EXIT_SHUTDOWN) {
                pendingEntry = p
                x.reason = NPT_EXIT_ESCALATION.rawValue
                return finish(&x, e)
            }
            switch Int32(reason) {
            case KVM_EXIT_IO:
                let size = Int(ckvm_run_io_size(run))
                let data = UnsafeMutableRawPointer(run) + Int(ckvm_run_io_data_offset(run))
                if ckvm_run_io_direction(run) == UInt8(KVM_EXIT_IO_OUT) {
                    var v: UInt64 = 0
                    withUnsafeMutableBytes(of: &v) { $0.baseAddress!.copyMemory(from: data, byteCount: min(size, 8)) }
                    x.reason = NPT_EXIT_IO.rawValue
                    x.io_port = UInt32(ckvm_run_io_port(run))
                    x.io_value = v
                    return finish(&x, e)
                }
                // IN: no device answers; the guest reads all ones (an open bus) and runs on.
                data.initializeMemory(as: UInt8.self, repeating: 0xFF, count: size * Int(ckvm_run_io_count(run)))
                continue
            case KVM_EXIT_HLT:
                x.reason = NPT_EXIT_HALT.rawValue
                return finish(&x, e)
            case KVM_EXIT_INTR:
                ckvm_run_set_immediate_exit(run, 0)
                x.reason = NPT_EXIT_KICKED.rawValue
                return finish(&x, e)
            case KVM_EXIT_MMIO:
                let gpa = ckvm_run_mmio_phys_addr(run)
                let len = Int(ckvm_run_mmio_len(run))
                let isWrite = ckvm_run_mmio_is_write(run) != 0
                if isWrite, vm.isTrappedFlushHint(gpa) {
                    // A guest write to the read-only vFHA (Pmem.swift): the core's flush exit.
                    trappedWritePending = true
                    x.reason = NPT_EXIT_EPT_VIOLATION.rawValue
                    x.gpa = gpa
                    x.qualification = eptqWrite | eptqReadable
                    return finish(&x, e)
                }
                let data = UnsafeMutableRawPointer(ckvm_run_mmio_data(run)!)
                if len <= 8, let (at, q) = dataViolation(gpa, len, isWrite) {
                    // A data access to RAM the exposed hierarchy does not permit (a page left out of
                    // the layout, or a write to a READONLY memslot): the core decides. KVM still
                    // holds the access as pending MMIO: a read resumed later reads all ones, a write
                    // is dropped.
                    if !isWrite { data.initializeMemory(as: UInt8.self, repeating: 0xFF, count: len) }
                    x.reason = NPT_EXIT_EPT_VIOLATION.rawValue
                    x.gpa = at
                    x.qualification = q
                    return finish(&x, e)
                }
                if len <= 8, vm.withBacking(gpa, len, { mem in
                    // A permitted data access to a RAM or NVDIMM page the exposed layout leaves out:
                    // complete it from the backing memory (RAM, or the NVDIMM range's file mapping).
                    if isWrite { mem.copyMemory(from: data, byteCount: len) } else { data.copyMemory(from: mem, byteCount: len) }
                }) {
                    let ram = vm.memory.contains(gpa, len)
                    vm.stats.add(ram ? .mmioCompletedRAM : .mmioCompletedNVDIMM)
                    if isWrite && ram { vm.hostWrote(gpa, len, from: c.view) }   // not in KVM's dirty log
                    continue
                }
                x.reason = NPT_EXIT_INTERNAL_ERROR.rawValue
                x.gpa = ckvm_run_mmio_phys_addr(run)
                x.qualification = UInt64(reason) << 32 | UInt64(ckvm_run_mmio_is_write(run))
                return finish(&x, e)
            case KVM_EXIT_INTERNAL_ERROR:
                if ckvm_run_internal_suberror(run) == UInt32(KVM_INTERNAL_ERROR_EMULATION),
                   let gpa = fetchViolation() {
                    x.reason = NPT_EXIT_EPT_VIOLATION.rawValue
                    x.gpa = gpa
                    x.qualification = fetchQualification(gpa)
                    return finish(&x, e)
                }
                x.reason = NPT_EXIT_INTERNAL_ERROR.rawValue
                x.qualification = UInt64(reason) << 32 | UInt64(ckvm_run_internal_suberror(run))
                x.gpa = ckvm_run_internal_ndata(run) > 0 ? ckvm_run_internal_data(run, 0) : 0
                return finish(&x, e)
            default:
                // SHUTDOWN (triple fault), FAIL_ENTRY, EXCEPTION, ...: the KVM exit reason is in
                // qualification bits 63:32.
                x.reason = NPT_EXIT_INTERNAL_ERROR.rawValue
                x.qualification = UInt64(reason) << 32
                if Int32(reason) == KVM_EXIT_FAIL_ENTRY { x.gpa = ckvm_run_fail_entry_reason(run) }
                return finish(&x, e)
            }
        }
    }

    /// An emulation failure at a rip whose page the exposed layout leaves out: an instruction fetch
    /// the hierarchy does not permit. Returns the faulting page's guest-physical address.
    private func fetchViolation() -> UInt64? {
        guard let r = try? cpu.regs, let s = try? cpu.sregs else { return nil }
        let linear = s.cr0 & cr0PE == 0 ? s.cs.base &+ r.rip : r.rip
        guard let gpa = vm.translate(linear, cr0: s.cr0, cr3: s.cr3),
              vm.memory.contains(gpa, 1) || vm.isPmem(gpa, 1), !vm.isMapped(gpa, in: current.view) else { return nil }
        return gpa & ~0xFFF
    }

    /// A data access of `len` bytes at `gpa` (RAM or one NVDIMM range) that the exposed hierarchy does not permit:
    /// the first address not permitted and the qualification (NPT_EPTQ_READ or NPT_EPTQ_WRITE | what
    /// the hierarchy permits there: READABLE, WRITABLE, and its X as EXECUTABLE in the supervisor
    /// hierarchy or UEXECUTABLE in the user one). nil: permitted (or neither, or no core).
    private func dataViolation(_ gpa: UInt64, _ len: Int, _ isWrite: Bool) -> (UInt64, UInt64)? {
        guard len > 0, vm.memory.contains(gpa, len) || vm.isPmem(gpa, len) else { return nil }
        let last = gpa + UInt64(len) - 1
        for at in last & ~0xFFF != gpa & ~0xFFF ? [gpa, last & ~0xFFF] : [gpa] {
            guard let p = vm.permissions(hierarchy, at) else { return nil }
            if p & (isWrite ? 2 : 1) != 0 { continue }
            var q: UInt64 = isWrite ? 1 << 1 : 1 << 0               // NPT_EPTQ_WRITE / NPT_EPTQ_READ
            if p & 1 != 0 { q |= 1 << 3 }                           // NPT_EPTQ_READABLE
            if p & 2 != 0 { q |= 1 << 4 }                           // NPT_EPTQ_WRITABLE
            if p & 4 != 0 { q |= hierarchy == NPT_HIERARCHY_SUPERVISOR ? 1 << 5 : 1 << 6 } // (U)EXECUTABLE
            return (at, q)
        }
        return nil
    }

    /// NPT_EPTQ_FETCH plus what the exposed hierarchy permits at `gpa` (read, write; never execute).
    private func fetchQualification(_ gpa: UInt64) -> UInt64 {
        var q: UInt64 = 1 << 2                                  // NPT_EPTQ_FETCH
        if let tr = vm.host.pointee.hierarchy_translate, let handle = vm.handle {
            var t = npt_translation()
            t.size = UInt32(MemoryLayout<npt_translation>.size)
            if tr(handle, hierarchy, gpa, &t) == NPT_OK {
                if t.perms & 1 != 0 { q |= 1 << 3 }             // NPT_EPTQ_READABLE
                if t.perms & 2 != 0 { q |= 1 << 4 }             // NPT_EPTQ_WRITABLE
            }
        }
        return q
    }

    /// Adds the state common to every exit (rip, CPL, exposed hierarchy; from kvm_run, no ioctl) and
    /// hands it to the core.
    private func finish(_ x: inout npt_exit, _ e: UnsafeMutablePointer<npt_exit>) -> npt_status {
        let sync = cpu.sync
        x.rip = sync.pointee.regs.rip
        x.cpl = sync.pointee.sregs.cr0 & cr0PE == 0 ? 0 : UInt32(sync.pointee.sregs.cs.dpl)
        x.hierarchy = hierarchy
        e.pointee = x
        return NPT_OK
    }
}

func flatSegment(_ selector: UInt16, code: Bool, dpl: UInt8) -> kvm_segment {
    var s = kvm_segment()
    s.selector = selector
    s.base = 0
    s.limit = 0xFFFF_FFFF
    s.present = 1
    s.dpl = dpl
    s.s = 1
    s.g = 1
    if code { s.type = 0xB; s.l = 1; s.db = 0 } else { s.type = 0x3; s.db = 1 }
    return s
}

func realSegment(code: Bool) -> kvm_segment {
    var s = kvm_segment()
    s.selector = 0
    s.base = 0
    s.limit = 0xFFFF
    s.present = 1
    s.s = 1
    s.type = code ? 0xB : 0x3
    return s
}
