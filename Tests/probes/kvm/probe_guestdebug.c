/*
 * probe_guestdebug.c - (question A4) KVM_SET_GUEST_DEBUG on this KVM.
 *
 * 1. KVM_GUESTDBG_ENABLE|USE_SW_BP, user code `int3`: the exit (KVM_EXIT_DEBUG? exception, pc,
 *    rip), then the #BP re-delivered to the guest with KVM_SET_VCPU_EVENTS (exception.injected,
 *    nr 3), with rip as KVM left it and with rip + 1: the frame the guest's handler sees.
 *    Cost: a user loop `1: int3; jmp 1b` where every KVM_EXIT_DEBUG is answered by rip += 1 and
 *    KVM_RUN (p10/p50/p90 of N round trips).
 * 2. KVM_GUESTDBG_USE_HW_BP with DR0 = a linear address (execute, len 1) in user code (CPL 3,
 *    native) and at the kernel stub's IRETQ (CPL 0, emulated): exit? pc, dr6; continue with
 *    RFLAGS.RF set. Cost per exit at the IRETQ (a user loop of INT3 system calls, one HW-BP exit
 *    per call).
 * 3. KVM_GUESTDBG_SINGLESTEP at CPL 3 and at CPL 0: the pc of 5 successive KVM_RUNs.
 * Run: cc -O2 -Wall -o probe_guestdebug probe_guestdebug.c && ./probe_guestdebug [N]   (N = 2000)
 */
#include "kvmprobe.h"

BLOB(u_int3once, "int3\n nop\n jmp .\n")
BLOB(u_int3loop, "1: int3\n jmp 1b\n")
/* user code for the HW BP at CPL 3: the breakpoint is at the 3rd instruction (offset 4) */
BLOB(u_hw, "nop\n nop\n nop\n nop\n inc %rbx\n inc %rbx\n int3\n jmp .\n")
BLOB(u_steps, "inc %rbx\n inc %rbx\n inc %rbx\n inc %rbx\n inc %rbx\n inc %rbx\n int3\n jmp .\n")
/* the kernel's INT3 handler for the loop: returns at once (CPL 0, emulated) */
BLOB(k_ret, "iretq\n")
BLOB(k_steps, "inc %rbx\n inc %rbx\n inc %rbx\n inc %rbx\n inc %rbx\n inc %rbx\n out %al, $0xE0\n hlt\n")

static int N = 2000;

static struct vm vm;
static struct vcpu v;
static void fresh(const uint8_t *s, const uint8_t *e, int cpl) {
    vm = vm_create();
    guest_build(&vm);
    put_code(&vm, cpl ? G_UCODE : G_KCODE, s, e);
    v = vcpu_create(&vm, 0);
    vcpu_longmode(&v, cpl, cpl ? G_UCODE : G_KCODE, cpl ? G_USTACK_TOP : G_KSTACK_TOP);
}
static void done(void) { vcpu_destroy(&v); vm_destroy(&vm, 1); }
static int guest_debug(uint32_t control, uint64_t dr0, uint64_t dr7) {
    struct kvm_guest_debug d;
    memset(&d, 0, sizeof d);
    d.control = control;
    d.arch.debugreg[0] = dr0;
    d.arch.debugreg[7] = dr7;
    int r = ioctl(v.fd, KVM_SET_GUEST_DEBUG, &d);
    if (r < 0) printf("  KVM_SET_GUEST_DEBUG(%#x): %s\n", control, strerror(errno));
    return r;
}
static uint64_t rip_of(void) { struct kvm_regs r; ioctl(v.fd, KVM_GET_REGS, &r); return r.rip; }
static void set_rip(uint64_t rip, uint64_t rflags_or) {
    struct kvm_regs r;
    ioctl(v.fd, KVM_GET_REGS, &r);
    r.rip = rip;
    r.rflags |= rflags_or;
    ioctl(v.fd, KVM_SET_REGS, &r);
}
static void inject_bp(void) {
    struct kvm_vcpu_events e;
    ioctl(v.fd, KVM_GET_VCPU_EVENTS, &e);
    e.exception.injected = 1; e.exception.nr = 3; e.exception.has_error_code = 0; e.flags = 0;
    if (ioctl(v.fd, KVM_SET_VCPU_EVENTS, &e) < 0) printf("  KVM_SET_VCPU_EVENTS: %s\n", strerror(errno));
}
static void show_delivery(int rc, const char *pfx) {
    if (is_out(&v, rc, PORT_EXC)) {
        struct kvm_regs r;
        ioctl(v.fd, KVM_GET_REGS, &r);
        int vec = io_val(&v);
        printf("%sguest handler ran: stub %d; ", pfx, vec);
        print_frame(read_frame(&vm, r.rsp, vec), vec, "");
    } else {
        print_exit(&v, rc, pfx);
        print_state(&v, pfx);
    }
}

static void sw_bp(void) {
    printf("[1] KVM_GUESTDBG_ENABLE|USE_SW_BP, user int3 at 0x10000\n");
    for (int variant = 0; variant < 2; variant++) {
        fresh(u_int3once_s, u_int3once_e, 3);
        guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP, 0, 0);
        int rc = vcpu_run_timeout(&v, 300);
        if (variant == 0) {
            print_exit(&v, rc, "  first exit: ");
            print_state(&v, "    ");
        }
        if (rc != KVM_EXIT_DEBUG) { done(); break; }
        uint64_t rip = rip_of();
        guest_debug(0, 0, 0);
        if (variant == 1) set_rip(rip + 1, 0);
        inject_bp();
        rc = vcpu_run_timeout(&v, 300);
        show_delivery(rc, variant ? "  re-injected #BP with rip + 1: " : "  re-injected #BP, rip as left: ");
        done();
    }
    /* int3 at CPL 0 (emulated) */
    BLOB(k_int3, "int3\n hlt\n")
    fresh(k_int3_s, k_int3_e, 0);
    guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP, 0, 0);
    int rc0 = vcpu_run_timeout(&v, 300);
    print_exit(&v, rc0, "  int3 at CPL 0 (0xb000): ");
    print_state(&v, "    ");
    done();
    /* cost */
    fresh(u_int3loop_s, u_int3loop_e, 3);
    guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_SW_BP, 0, 0);
    uint64_t *t = calloc((size_t)N, 8);
    struct kvm_regs r;
    int bad = 0;
    for (int i = 0; i < N; i++) {
        uint64_t t0 = now_ns();
        int rc = vcpu_run_timeout(&v, 300);
        if (rc != KVM_EXIT_DEBUG) { bad++; print_exit(&v, rc, "  loop: "); break; }
        ioctl(v.fd, KVM_GET_REGS, &r);
        r.rip += 1;
        ioctl(v.fd, KVM_SET_REGS, &r);
        t[i] = now_ns() - t0;
    }
    if (!bad) report_us("SW_BP exit round trip (KVM_RUN + GET/SET_REGS)", t, (size_t)N);
    free(t);
    done();
}

static void hw_bp(void) {
    printf("[2] KVM_GUESTDBG_ENABLE|USE_HW_BP, DR0 execute breakpoint\n");
    /* CPL 3 */
    fresh(u_hw_s, u_hw_e, 3);
    guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP, G_UCODE + 4, 0x1 | 0x400);
    int rc = vcpu_run_timeout(&v, 300);
    print_exit(&v, rc, "  CPL 3, DR0 = 0x10004: ");
    print_state(&v, "    ");
    if (rc == KVM_EXIT_DEBUG) {
        set_rip(rip_of(), 0x10000); /* RF */
        rc = vcpu_run_timeout(&v, 300);
        print_exit(&v, rc, "    continued with RF: ");
        struct kvm_regs r;
        ioctl(v.fd, KVM_GET_REGS, &r);
        printf("    rbx %llu (2 = both incs ran)\n", r.rbx);
    }
    done();
    /* CPL 0: breakpoint at stub 3's iretq (0x8030 + 4); three ways to continue past it */
    uint64_t iret = G_STUBS + 16 * 3 + 4;
    for (int how = 0; how < 3; how++) {
        static const char *hows[] = {"RFLAGS.RF set", "BP disarmed, SINGLESTEP", "BP disarmed (control = 0)"};
        fresh(u_int3once_s, u_int3once_e, 3);
        guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP, iret, 0x1 | 0x400);
        rc = vcpu_run_timeout(&v, 300);
        if (how == 0) print_exit(&v, rc, "  (stub OUT) ");
        rc = vcpu_run_timeout(&v, 300);
        if (how == 0) {
            print_exit(&v, rc, "  CPL 0, DR0 = stub 3's iretq: ");
            print_state(&v, "    ");
        }
        if (rc == KVM_EXIT_DEBUG) {
            if (how == 0) set_rip(rip_of(), 0x10000);
            if (how == 1) guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP, 0, 0);
            if (how == 2) guest_debug(0, 0, 0);
            rc = vcpu_run_timeout(&v, 300);
            printf("    continue, %s: ", hows[how]);
            print_exit(&v, rc, "");
            print_state(&v, "      ");
        }
        done();
    }
    /* cost of a HW BP exit at CPL 0: kernel loop `1: inc %rbx; nop; jmp 1b`, DR0 on the inc and
     * DR1 on the nop, only one armed at a time: every KVM_RUN stops at the other one
     * (KVM_EXIT_DEBUG, then KVM_SET_GUEST_DEBUG to swap). */
    BLOB(k_bploop, "1: inc %rbx\n nop\n jmp 1b\n")
    fresh(k_bploop_s, k_bploop_e, 0);
    uint64_t *t = calloc((size_t)N, 8);
    int ok = 1;
    for (int i = 0; i < N && ok; i++) {
        uint64_t t0 = now_ns();
        struct kvm_guest_debug d;
        memset(&d, 0, sizeof d);
        d.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
        d.arch.debugreg[0] = G_KCODE; d.arch.debugreg[1] = G_KCODE + 3;
        d.arch.debugreg[7] = 0x400 | ((i & 1) ? 0x4 : 0x1);
        ioctl(v.fd, KVM_SET_GUEST_DEBUG, &d);
        rc = vcpu_run_timeout(&v, 300);
        if (rc != KVM_EXIT_DEBUG) { ok = 0; print_exit(&v, rc, "  loop: "); break; }
        t[i] = now_ns() - t0;
    }
    struct kvm_regs r;
    ioctl(v.fd, KVM_GET_REGS, &r);
    printf("  loop: rbx = %llu after %d exits (expect about %d)\n", r.rbx, N, N / 2);
    if (ok) report_us("HW_BP exit round trip at CPL 0 (SET_GUEST_DEBUG + KVM_RUN)", t, (size_t)N);
    free(t);
    done();
}

static void single_step(void) {
    printf("[3] KVM_GUESTDBG_ENABLE|SINGLESTEP\n");
    for (int cpl = 3; cpl >= 0; cpl -= 3) {
        if (cpl) fresh(u_steps_s, u_steps_e, 3); else fresh(k_steps_s, k_steps_e, 0);
        guest_debug(KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP, 0, 0);
        printf("  CPL %d:", cpl);
        for (int i = 0; i < 5; i++) {
            int rc = vcpu_run_timeout(&v, 300);
            if (rc == KVM_EXIT_DEBUG)
                printf(" [DEBUG exc %u pc %#llx dr6 %#llx]", v.run->debug.arch.exception, v.run->debug.arch.pc, v.run->debug.arch.dr6);
            else { printf(" [%s rip %#llx]", rc < 0 ? strerror(-rc) : exit_name((uint32_t)rc), (unsigned long long)rip_of()); break; }
        }
        struct kvm_regs r;
        ioctl(v.fd, KVM_GET_REGS, &r);
        printf(" -> rbx %llu\n", r.rbx);
        done();
    }
}

int main(int argc, char **argv) {
    if (argc > 1) N = atoi(argv[1]);
    char la[128];
    loadavg(la, sizeof la);
    printf("probe_guestdebug (loadavg %s)\n", la);
    sw_bp();
    hw_bp();
    single_step();
    return 0;
}
