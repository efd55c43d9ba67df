/*
 * probe_return.c - (question A6) can the VMM get an exit on a CPL 0 -> CPL 3 return?
 *
 * A CPL 0 guest returns to user code at 0x10000 (which executes int3: the guest's stub 3 then
 * OUTs 3 on port 0xEF, proof that user mode ran) with IRETQ (frame SS 0x2b, RSP 0x12000,
 * RFLAGS 0x202, CS 0x33, RIP 0x10000) or with SYSRETQ (RCX 0x10000, R11 0x202, STAR selects CS
 * 0x33 / SS 0x2b), in these layouts / settings:
 *   mapped             : everything has a memslot
 *   GDT absent         : the GDT page has no memslot (IRETQ must read the CS/SS descriptors)
 *   user code absent   : the user code page has no memslot (the lazy scheme: first user fetch)
 *   HW BP on the return: KVM_SET_GUEST_DEBUG, DR0 = the IRETQ/SYSRETQ linear address
 *   SINGLESTEP         : KVM_GUESTDBG_SINGLESTEP set while the return executes
 * Printed: the first exit, the vCPU state after it (rip, CS/CPL) and events.
 * Run: cc -O2 -Wall -o probe_return probe_return.c && ./probe_return
 */
#include "kvmprobe.h"

BLOB(k_iret, "pushq $0x2b\n pushq $0x12000\n pushq $0x202\n pushq $0x33\n pushq $0x10000\n iretq\n")
BLOB(k_sysret, "mov $0x10000, %rcx\n mov $0x202, %r11\n sysretq\n")
BLOB(u_mark, "int3\n jmp .\n")

int main(void) {
    char la[128];
    loadavg(la, sizeof la);
    printf("probe_return: exits on a CPL 0 -> 3 return (loadavg %s)\n", la);
    const char *how[] = {"mapped", "GDT absent", "user code absent", "HW BP on the return", "SINGLESTEP"};
    for (int insn = 0; insn < 2; insn++) {
        for (int h = 0; h < 5; h++) {
            struct vm vm = vm_create();
            guest_build(&vm);
            const uint8_t *s = insn ? k_sysret_s : k_iret_s, *e = insn ? k_sysret_e : k_iret_e;
            put_code(&vm, G_KCODE, s, e);
            put_code(&vm, G_UCODE, u_mark_s, u_mark_e);
            uint64_t ret_at = G_KCODE + (uint64_t)(e - s) - (insn ? 3 : 2); /* sysretq 48 0f 07, iretq 48 cf */
            struct vcpu v = vcpu_create(&vm, 0);
            vcpu_longmode(&v, 0, G_KCODE, G_KSTACK_TOP);
            if (h == 1) page_mode(&vm, G_GDT, 0);
            if (h == 2) page_mode(&vm, G_UCODE, 0);
            if (h == 3 || h == 4) {
                struct kvm_guest_debug d;
                memset(&d, 0, sizeof d);
                d.control = KVM_GUESTDBG_ENABLE | (h == 3 ? KVM_GUESTDBG_USE_HW_BP : 0);
                d.arch.debugreg[0] = ret_at;
                d.arch.debugreg[7] = h == 3 ? 0x401 : 0;
                if (ioctl(v.fd, KVM_SET_GUEST_DEBUG, &d) < 0) printf("  KVM_SET_GUEST_DEBUG: %s\n", strerror(errno));
            }
            printf("[%s | %s] (return instruction at %#llx)\n", insn ? "SYSRETQ" : "IRETQ", how[h], (unsigned long long)ret_at);
            for (int n = 0; n < (h == 4 ? 8 : 1); n++) {
                if (h == 4) {
                    struct kvm_guest_debug d;
                    memset(&d, 0, sizeof d);
                    d.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
                    ioctl(v.fd, KVM_SET_GUEST_DEBUG, &d);
                }
                int rc = vcpu_run_timeout(&v, 300);
                print_exit(&v, rc, "  ");
                print_state(&v, "    ");
                if (rc != KVM_EXIT_DEBUG) break;
            }
            vcpu_destroy(&v);
            vm_destroy(&vm, 1);
        }
    }
    return 0;
}
