// The KVM backend's escalation exit (NPT_CAP_EXIT_ON_ESCALATE): an exit on every user-to-supervisor
// transition, which KVM does not have.
//
// While the core has the escalation exit armed for a vCPU in the user hierarchy, the plugin:
//  - leaves the guest's IDT page(s) out of the user hierarchy's memslot layout (the layout key
//    carries them, Layout.swift): every event delivered from CPL 3 (an exception, INT3/INT n, an
//    exception the VMM queues) then cannot read its gate and stops in the VMM before any CPL 0
//    instruction runs;
//  - keeps EFER.SCE clear in KVM (the guest's value is kept by the plugin and reported by get_regs):
//    SYSCALL, which does not read the IDT, raises #UD instead, which stops the same way; the
//    plugin then performs the SYSCALL itself once the supervisor layout is installed;
//  - reports the stop to the core as NPT_EXIT_ESCALATION; the core exposes the supervisor hierarchy
//    and, before the next KVM_RUN, the plugin delivers the event again (or performs the SYSCALL):
//    the guest sees exactly what a native delivery gives (measured for 11 kinds of events,
//    Tests/probes/kvm/probe_delivery.c).
// How the stop shows depends on the KVM (`escalationSupport`, probed once per process by
// escalation_probe.c, which also checks that no other entry path reaches CPL 0 on this host):
//  - this machine's KVM: KVM_EXIT_SHUTDOWN with the vCPU untouched at CPL 3 and the event lost; the
//    plugin writes a sentinel (exception 0xFF) into the vCPU's events before each such run, and
//    after the stop the exception KVM_GET_VCPU_EVENTS shows is the lost one; the plugin re-injects it;
//  - a stock VMX/SVM KVM since Linux 6.14 (from its source, not measured here):
//    KVM_EXIT_INTERNAL_ERROR / KVM_INTERNAL_ERROR_DELIVERY_EV, the event still queued by KVM.
// Where the probe fails (a path that reaches CPL 0 without a stop, an event the plugin cannot
// identify) the backend does not advertise the capability, and the core refuses the modes that
// need it (NPT_ERR_GUARANTEE) instead of running them with a weaker guarantee.
//
// Assumption (stated in Plugins/KVM/README.md): user mode cannot write the page tables that map the
// IDT (a guest whose user mode can write its kernel's page tables has no kernel left to protect).
import CKVM
import CNPTKit
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

let eferSCE: UInt64 = 1 << 0
let exitControlEscalation: UInt32 = 1 << 0   // NPT_EXITCTL_ESCALATION
let exitControlReturn: UInt32 = 1 << 1       // NPT_EXITCTL_RETURN
let msrSTAR: UInt32 = 0xC000_0081
let msrCSTAR: UInt32 = 0xC000_0083
let msrSFMASK: UInt32 = 0xC000_0084
let exceptionSentinel: UInt8 = 0xFF

/// Whether (and how) this KVM gives the escalation exit; probed once per process.
struct EscalationSupport: Sendable {
    /// 0: not usable; 1: KVM_EXIT_SHUTDOWN + sentinel + re-injection; 2: DELIVERY_EV (event kept).
    let mechanism: Int32
    let reason: String
    /// The guest's DR0-3/DR7 act on CPL 3 code: a guarded view needs them (Views.swift).
    let cpl3DebugRegs: Bool
    var usable: Bool { mechanism != 0 }
}

let escalationSupport: EscalationSupport = {
    var p = ckvm_escalation_probe()
    let ok = ckvm_probe_escalation(&p) != 0
    let reason = withUnsafeBytes(of: &p.reason) { b in
        String(decoding: b.prefix { $0 != 0 }, as: UTF8.self)
    }
    return EscalationSupport(mechanism: ok ? p.mechanism : 0, reason: reason, cpl3DebugRegs: p.cpl3_debugregs != 0)
}()

/// Why the escalation exit could not be armed for a run.
enum EscalationError: Error, CustomStringConvertible {
    case kvm(Errno)
    case idtOutsideRAM(UInt64)
    case idtOnUserPage(UInt64, UInt64, UInt64)
    case idtOnPageTable(UInt64, UInt64, UInt64)
    var description: String {
        switch self {
        case .kvm(let e): "\(e) (errno \(e.rawValue))"
        case .idtOutsideRAM(let g): "the guest's IDT maps to \(hex(g)), outside RAM: it cannot be left out of the user layout"
        case .idtOnUserPage(let g, let b, let l):
            "the guest's IDT [\(hex(b)), +\(hex(l + 1))) covers gpa \(hex(g)), which its page tables let user mode reach: leaving it out would stop the guest (give it an IDT of its own with LIDT, or use mbec_mode violation-only)"
        case .idtOnPageTable(let g, let b, let l):
            "the guest's IDT [\(hex(b)), +\(hex(l + 1))) covers gpa \(hex(g)), a page table the CPU walks for it"
        }
    }
}

/// What the plugin does before the next KVM_RUN under the supervisor layout after an escalation.
enum PendingEntry: Equatable {
    /// Deliver this exception again (KVM lost it at the stop).
    case reinject(nr: UInt8, hasErrorCode: Bool, errorCode: UInt32)
    /// The stop was SYSCALL's #UD (EFER.SCE hidden): perform the SYSCALL.
    case syscall(compat: Bool)
    /// KVM kept the event (DELIVERY_EV): nothing to do.
    case kept
}

extension KVMVCPU {
    /// The escalation exit is armed and the user hierarchy exposed: the run needs the guarded layout.
    var guarded: Bool {
        exitControls & exitControlEscalation != 0 && hierarchy == NPT_HIERARCHY_USER && escalationSupport.usable
    }

    /// The guest's view of its system registers (EFER.SCE as the guest set it).
    func guestSregs() throws(Errno) -> kvm_sregs {
        var s = try cpu.sregs
        if sceHidden { s.efer |= eferSCE }
        return s
    }

    /// The layout this run needs: the exposed hierarchy's, and while the escalation exit is armed in
    /// the user hierarchy (long mode with paging), the guarded one without the guest's IDT pages. A
    /// guarded layout runs in a view of its own (Views.swift) where EFER.SCE is kept clear and the
    /// events carry the sentinel (afterMove).
    func layoutKey() throws(EscalationError) -> LayoutKey {
        guard guarded else { return LayoutKey(hierarchy: hierarchy) }
        let s = cpu.sync.pointee.sregs
        guard s.cr0 & cr0PG != 0, s.efer & eferLMA != 0 else { return LayoutKey(hierarchy: hierarchy) }
        // The IDT's pages, as the guest's page tables map them now. A page the tables do not map
        // holds no gate a delivery could read (it faults, and the fault's delivery stops here too);
        // a page mapped outside RAM (an NVDIMM range, the region) cannot be left out: refused.
        // A page user mode can reach (U/S = 1), or a page table the CPU walks for the IDT, cannot be
        // left out: the guest would stop working (user code or data there, or no walk at all). Such
        // a guest (one without an IDT of its own: KVM's reset IDTR covers 0-0xffff) cannot have the
        // escalation exit.
        var hidden: [UInt64] = []
        let limit = UInt64(s.idt.limit)
        var va = s.idt.base & ~0xFFF
        while va <= s.idt.base &+ limit {
            if let (gpa, user) = vm.translateWithMode(va, cr3: s.cr3) {
                guard vm.memory.contains(gpa & ~0xFFF, 0x1000) else { throw EscalationError.idtOutsideRAM(gpa) }
                if user { throw EscalationError.idtOnUserPage(gpa & ~0xFFF, s.idt.base, limit) }
                if !hidden.contains(gpa & ~0xFFF) { hidden.append(gpa & ~0xFFF) }
            }
            if va > UInt64.max - 0x1000 { break }
            va += 0x1000
        }
        hidden.sort()
        for t in vm.walkedTables(s.idt.base, cr3: s.cr3) where hidden.contains(t) {
            throw EscalationError.idtOnPageTable(t, s.idt.base, limit)
        }
        return LayoutKey(hierarchy: hierarchy, hidden: hidden, guarded: true)
    }

    /// In the view the run needs: outside a guarded view, a pending re-delivery (or SYSCALL) is done;
    /// in one, the events carry the sentinel (mechanism 1: a lost exception overwrites it).
    func afterMove() throws(Errno) {
        if !current.view.guarded {
            if let p = pendingEntry {
                pendingEntry = nil
                try deliver(p)
            }
            return
        }
        if escalationSupport.mechanism == 1 {
            var ev = try cpu.events
            if ev.exception.injected == 0 && ev.exception.pending == 0 && ev.exception.nr != exceptionSentinel {
                ev.exception.nr = exceptionSentinel
                ev.exception.has_error_code = 0
                ev.exception.error_code = 0
                try cpu.setEvents(ev)
            }
        }
    }

    /// After a KVM_EXIT_SHUTDOWN or an internal error in a guarded run: the escalation it was, if
    /// any (the pending re-delivery is recorded).
    func escalation(shutdown: Bool) -> PendingEntry? {
        guard let s = try? cpu.sregs, s.cs.dpl == 3, var ev = try? cpu.events else { return nil }
        let run = cpu.run
        let p: PendingEntry
        if shutdown {
            guard escalationSupport.mechanism == 1, ev.exception.nr != exceptionSentinel else { return nil }
            p = .reinject(nr: ev.exception.nr, hasErrorCode: ev.exception.has_error_code != 0, errorCode: ev.exception.error_code)
        } else {
            guard ckvm_run_internal_suberror(run) == UInt32(KVM_INTERNAL_ERROR_DELIVERY_EV) else { return nil }
            p = .kept
        }
        // SYSCALL with EFER.SCE hidden raised the #UD: the plugin performs the SYSCALL instead.
        let nr = ev.exception.nr
        if nr == 6, sceHidden, let r = try? cpu.regs, let gpa = vm.translate(r.rip, cr0: s.cr0, cr3: s.cr3),
           vm.peek(gpa, 2) == [0x0F, 0x05] {
            if !shutdown {
                ev.exception.injected = 0
                ev.exception.pending = 0
                _ = try? cpu.setEvents(ev)
            }
            return .syscall(compat: s.cs.l == 0)
        }
        return p
    }

    private func deliver(_ p: PendingEntry) throws(Errno) {
        switch p {
        case .kept:
            return
        case .reinject(let nr, let hasError, let error):
            var ev = try cpu.events
            ev.exception.injected = 1
            ev.exception.pending = 0
            ev.exception.nr = nr
            ev.exception.has_error_code = hasError ? 1 : 0
            ev.exception.error_code = hasError ? error : 0
            ev.exception_has_payload = 0
            ev.exception_payload = 0
            try cpu.setEvents(ev)
        case .syscall(let compat):
            // SDM Vol. 2, SYSCALL (long mode, 64-bit or compatibility mode): RCX = the next rip,
            // R11 = RFLAGS, RFLAGS &= ~SFMASK (and RF), CS = STAR[47:32] (flat 64-bit, DPL 0),
            // SS = STAR[47:32] + 8, RIP = LSTAR (64-bit) or CSTAR (compatibility mode).
            var r = try cpu.regs
            var s = try cpu.sregs
            let star = try owner.cpu.msr(msrSTAR)
            let target = try owner.cpu.msr(compat ? msrCSTAR : msrLSTAR)
            let mask = try owner.cpu.msr(msrSFMASK)
            let rf: UInt64 = 1 << 16
            r.rcx = r.rip &+ 2
            r.r11 = r.rflags & ~rf
            r.rflags = (r.rflags & ~mask & ~rf) | 2
            r.rip = target
            let sel = UInt16(truncatingIfNeeded: (star >> 32) & 0xFFFC)
            var cs = flatSegment(sel, code: true, dpl: 0)
            cs.type = 0xB
            var ss = flatSegment(sel &+ 8, code: false, dpl: 0)
            ss.type = 0x3
            s.cs = cs
            s.ss = ss
            try cpu.setSregs(s)
            try cpu.setRegs(r)
            mode = .long(cpl: 0)
        }
    }
}
