// vcpu_inject_fault of the KVM backend: an exception queued in the vCPU's events (the synchronized
// copy in kvm_run, written back by the next KVM_RUN like KVM_SET_VCPU_EVENTS would), delivered by
// KVM through the guest's own IDT (or real-mode IVT) at that KVM_RUN.
//
//  - exception.injected = 1, nr = vector; has_error_code only for the vectors that push one in
//    protected/long mode (8, 10-14, 17, 21; never in real mode), error_code its low 32 bits. #VE
//    (20) pushes no error code (SDM Vol. 3, 6.15 and 26.5.7: its information would go to the #VE
//    information area, which this backend does not set up): error_code is ignored for it.
//  - #PF (14): CR2 = address (the system registers, also synchronized) with the exception; the other vectors
//    ignore address.
//  - Refused: vector >= 32 (NPT_ERR_INVALID_ARGUMENT); vector 2 (NMI is not an exception: KVM's
//    KVM_SET_VCPU_EVENTS refuses it, NPT_ERR_UNSUPPORTED); a vCPU whose last exit was
//    KVM_EXIT_SHUTDOWN (a triple fault: nothing can be delivered, NPT_ERR_STATE; the core then
//    reports the fault to the VMM instead, as for RSM outside the mode in long mode without an
//    IDT); a vCPU that already has an exception queued (NPT_ERR_BUSY).
//  - After a data violation that exited as KVM_EXIT_MMIO, KVM completes the pending access at the
//    next KVM_RUN before it delivers the exception: the guest sees the fault with rip after the
//    instruction (a trap, not a fault). After a fetch violation (an emulation failure at the
//    fetched page) rip is the faulting instruction's, as on hardware.
import CKVM
import CNPTKit
import SystemPackage

/// Exceptions that push an error code in protected and long mode (SDM Vol. 3, Table 6-1; the
/// set VM entry checks: 26.2.1.3).
let vectorsWithErrorCode: Set<UInt32> = [8, 10, 11, 12, 13, 14, 17, 21]
let vectorNMI: UInt32 = 2
let vectorPF: UInt32 = 14

extension KVMVCPU {
    func injectFault(_ vector: UInt32, _ errorCode: UInt64, _ address: UInt64) -> npt_status {
        guard vector < 32 else {
            return fail(NPT_ERR_INVALID_ARGUMENT, "vcpu_inject_fault: vector \(vector) is not an exception vector (0-31)")
        }
        guard vector != vectorNMI else {
            return fail(NPT_ERR_UNSUPPORTED, "vcpu_inject_fault: vector 2 (NMI) is not an exception; KVM_SET_VCPU_EVENTS refuses it")
        }
        if Int32(ckvm_run_exit_reason(cpu.run)) == KVM_EXIT_SHUTDOWN {
            return fail(NPT_ERR_STATE, "vcpu_inject_fault: the vCPU triple-faulted (KVM_EXIT_SHUTDOWN); set its registers first")
        }
        do {
            let s = try cpu.sregs
            if guarded, s.cs.dpl == 3, s.cr0 & cr0PE != 0 {
                // Delivered from CPL 3 while the escalation exit is armed: that is an escalation.
                // The next run reports it; the exception is delivered under the supervisor layout.
                if pendingEntry != nil || escalationNow {
                    return fail(NPT_ERR_BUSY, "vcpu_inject_fault: an exception is already queued")
                }
                if vector == vectorPF {
                    var s2 = s
                    s2.cr2 = address
                    try cpu.setSregs(s2)
                }
                let hasError = vectorsWithErrorCode.contains(vector)
                pendingEntry = .reinject(nr: UInt8(vector), hasErrorCode: hasError,
                                         errorCode: hasError ? UInt32(truncatingIfNeeded: errorCode) : 0)
                escalationNow = true
                return NPT_OK
            }
            var ev = try cpu.events
            if ev.exception.injected != 0 || ev.exception.pending != 0 {
                return fail(NPT_ERR_BUSY, "vcpu_inject_fault: exception \(ev.exception.nr) is already queued")
            }
            if vector == vectorPF {
                var s2 = s
                s2.cr2 = address
                try cpu.setSregs(s2)
            }
            let protected = s.cr0 & cr0PE != 0
            ev.flags = 0                    // leave NMI pending, SIPI, interrupt shadow, SMM as they are
            ev.exception.injected = 1
            ev.exception.pending = 0
            ev.exception.nr = UInt8(vector)
            ev.exception.has_error_code = protected && vectorsWithErrorCode.contains(vector) ? 1 : 0
            ev.exception.error_code = ev.exception.has_error_code != 0 ? UInt32(truncatingIfNeeded: errorCode) : 0
            ev.exception_has_payload = 0
            ev.exception_payload = 0
            try cpu.setEvents(ev)
            return NPT_OK
        } catch {
            return fail(error, "vcpu_inject_fault: KVM_GET/SET_VCPU_EVENTS")
        }
    }
}
