/*
 * probe_entry.c - (question A3) which CPL 3 instructions reach CPL 0 on this KVM, and which of
 * them do so without reading the IDT (so that leaving the IDT page out of the user layout would
 * not see them).
 *
 * Kernel entry points, each OUTs its own port and halts: LSTAR 0xB000 (port 0xE1), CSTAR 0xB100
 * (0xE2), SYSENTER_EIP 0xB200 (0xE3, SYSENTER_CS 0x10, ESP 0xA000), a 64-bit call gate at GDT
 * selector 0x4b (DPL 3) to 0xB300 (0xE4); IDT vector v -> stub v (port 0xEF, al = v); all IDT
 * gates DPL 3. Each user instruction runs from CPL 3 in 64-bit mode (and a few in 32-bit
 * compatibility mode, CS 0x23), once with everything mapped and once with the IDT page without a
 * memslot. Printed: the exit; for a kernel OUT, the CS (CPL) it ran at and, for a stub, the frame.
 * Last two rows: SYSCALL (compat and 64-bit) with EFER.SCE cleared through KVM_SET_SREGS.
 * Run: cc -O2 -Wall -o probe_entry probe_entry.c && ./probe_entry
 */
#include "kvmprobe.h"

BLOB(k_entries, ".org 0x000\n out %al, $0xE1\n hlt\n"
                ".org 0x100\n out %al, $0xE2\n hlt\n"
                ".org 0x200\n out %al, $0xE3\n hlt\n"
                ".org 0x300\n out %al, $0xE4\n hlt\n")
BLOB(u_syscall, "syscall\n jmp .\n")
BLOB(u_sysenter, "sysenter\n jmp .\n")
BLOB(u_int80, "int $0x80\n jmp .\n")
BLOB(u_int3, "int3\n jmp .\n")
BLOB(u_intn3, "int $3\n jmp .\n")
BLOB(u_int1, ".byte 0xf1\n jmp .\n")
BLOB(u_into, ".byte 0xce\n jmp .\n")
BLOB(u_lcall, "lcall *1f(%rip)\n jmp .\n1: .long 0\n .word 0x4b\n")
BLOB(u_ljmp, "ljmp *1f(%rip)\n jmp .\n1: .long 0\n .word 0x4b\n")
BLOB(u_iretq, "pushq $0x18\n pushq $0xA000\n pushq $2\n pushq $0x10\n pushq $0xB300\n iretq\n jmp .\n")
BLOB(u_sysret, "sysretq\n jmp .\n")
BLOB(u32_syscall, ".code32\n syscall\n jmp .\n.code64\n")
BLOB(u32_int80, ".code32\n int $0x80\n jmp .\n.code64\n")
BLOB(u32_sysenter, ".code32\n sysenter\n jmp .\n.code64\n")
BLOB(u32_lcall, ".code32\n lcall $0x4b, $0\n jmp .\n.code64\n")
BLOB(u32_int3, ".code32\n int3\n jmp .\n.code64\n")

static const struct { const char *name; const uint8_t *s, *e; int compat; } ins[] = {
    {"syscall", u_syscall_s, u_syscall_e, 0},         {"sysenter", u_sysenter_s, u_sysenter_e, 0},
    {"int $0x80 (gate DPL 3)", u_int80_s, u_int80_e, 0}, {"int3", u_int3_s, u_int3_e, 0},
    {"int $3 (CD 03)", u_intn3_s, u_intn3_e, 0},      {"int1 (F1)", u_int1_s, u_int1_e, 0},
    {"into (CE)", u_into_s, u_into_e, 0},             {"lcall via call gate 0x4b", u_lcall_s, u_lcall_e, 0},
    {"ljmp via call gate 0x4b", u_ljmp_s, u_ljmp_e, 0}, {"iretq to CS 0x10", u_iretq_s, u_iretq_e, 0},
    {"sysretq", u_sysret_s, u_sysret_e, 0},
    {"compat: syscall", u32_syscall_s, u32_syscall_e, 1}, {"compat: int $0x80", u32_int80_s, u32_int80_e, 1},
    {"compat: sysenter", u32_sysenter_s, u32_sysenter_e, 1}, {"compat: lcall via call gate", u32_lcall_s, u32_lcall_e, 1},
    {"compat: int3", u32_int3_s, u32_int3_e, 1},
    {"compat: syscall, EFER.SCE=0", u32_syscall_s, u32_syscall_e, 2},
    {"syscall, EFER.SCE=0", u_syscall_s, u_syscall_e, 3},
};

static void one(int i, int idt_absent) {
    struct vm vm = vm_create();
    guest_build(&vm);
    put_code(&vm, G_KCODE, k_entries_s, k_entries_e);
    put_code(&vm, G_UCODE, ins[i].s, ins[i].e);
    /* 64-bit call gate at 0x48: target 0xB300, selector 0x10, type 0xC, DPL 3, P */
    uint64_t tgt = G_KCODE + 0x300;
    q(&vm, G_GDT)[9] = (tgt & 0xffff) | ((uint64_t)SEL_KCS << 16) | (0xECull << 40) | (((tgt >> 16) & 0xffff) << 48);
    q(&vm, G_GDT)[10] = tgt >> 32;
    struct vcpu v = vcpu_create(&vm, 0);
    vcpu_longmode(&v, 3, G_UCODE, G_USTACK_TOP);
    set_msr(&v, MSR_CSTAR, G_KCODE + 0x100);
    set_msr(&v, MSR_SYSENTER_CS, SEL_KCS);
    set_msr(&v, MSR_SYSENTER_ESP, G_KSTACK_TOP);
    set_msr(&v, MSR_SYSENTER_EIP, G_KCODE + 0x200);
    if (ins[i].compat) {
        struct kvm_sregs s;
        ioctl(v.fd, KVM_GET_SREGS, &s);
        if (ins[i].compat != 3) { s.cs = seg_code(SEL_UCS32, 3); s.cs.l = 0; s.cs.db = 1; }
        if (ins[i].compat >= 2) s.efer &= ~1ull; /* EFER.SCE off */
        ioctl(v.fd, KVM_SET_SREGS, &s);
    }
    if (idt_absent) page_mode(&vm, G_IDT, 0);
    int rc = vcpu_run_timeout(&v, 300);
    struct kvm_regs r; struct kvm_sregs s;
    ioctl(v.fd, KVM_GET_REGS, &r);
    ioctl(v.fd, KVM_GET_SREGS, &s);
    printf("  %-28s %-10s ", ins[i].name, idt_absent ? "IDT absent" : "mapped");
    if (rc == KVM_EXIT_IO && v.run->io.port != PORT_EXC) {
        printf("kernel entry port %#x reached, CS %#x (CPL %u) rip %#llx rsp %#llx rcx %#llx r11 %#llx%s\n", v.run->io.port,
               s.cs.selector, s.cs.dpl, r.rip, r.rsp, r.rcx, r.r11, idt_absent ? "  <== reached without the IDT" : "");
    } else if (is_out(&v, rc, PORT_EXC)) {
        int vec = io_val(&v);
        printf("stub %d ran (CS %#x); ", vec, s.cs.selector);
        print_frame(read_frame(&vm, r.rsp, vec), vec, "");
    } else {
        print_exit(&v, rc, "");
        print_state(&v, "      ");
    }
    vcpu_destroy(&v);
    vm_destroy(&vm, 1);
}

int main(void) {
    char la[128];
    loadavg(la, sizeof la);
    printf("probe_entry: CPL 3 -> CPL 0 entry paths (loadavg %s)\n", la);
    for (size_t i = 0; i < sizeof ins / sizeof *ins; i++) {
        one((int)i, 0);
        one((int)i, 1);
    }
    return 0;
}
