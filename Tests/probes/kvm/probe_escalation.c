/*
 * probe_escalation.c - cost per system call of the ways to expose the right memslot layout
 * ("hierarchy") on a CPL 3 -> 0 -> 3 round trip on this KVM (questions A, conclusion).
 *
 * Guest: a user loop `1: int3; inc %rbx; jmp 1b` (INT3 is the system call); the handler at
 * 0xB000 is `out %al, $0xE0; iretq` (one OUT exit per call in every variant: the baseline).
 * Layouts (memslots of single pages; everything else always mapped):
 *   S (supervisor): kernel code pages 0x8000 (stubs) and 0xB000 mapped, user code 0x10000 absent
 *   U (user)      : user code mapped, kernel code pages absent; in V2/V3 the IDT page 0x7000 too
 * Variants:
 *   V0 baseline : everything mapped, no switch (1 exit per call: the OUT)
 *   V1 lazy     : the current plugin scheme: the first CPL 0 fetch (handler) fails emulation in U
 *                 (KVM_EXIT_INTERNAL_ERROR) -> install S, run; the first CPL 3 fetch fails in S ->
 *                 install U, run
 *   V2 IDT+lazy : the INT3's delivery fails in U (IDT page absent) -> KVM_EXIT_SHUTDOWN, nothing
 *                 changed -> install S, re-inject #BP (KVM_SET_VCPU_EVENTS, exception.injected,
 *                 rip already past the int3), run; return as V1
 *   V3 IDT+HWBP : escalation as V2, plus a hardware breakpoint (KVM_SET_GUEST_DEBUG, DR0) armed
 *                 on the handler's IRETQ while S is installed: KVM_EXIT_DEBUG before the IRETQ ->
 *                 the VMM reads the IRETQ frame (rip, cs) from the kernel stack; a return to
 *                 CPL 3 whose target page is in S would have that page taken out of S (never the
 *                 case here: the user code page is not in S), disarm, run: the IRETQ runs under S
 *                 (its own page must be fetched) and the first user fetch fails as in V1 ->
 *                 install U. (Installing U at the breakpoint instead makes the IRETQ's own fetch
 *                 fail: one more exit and switch.)
 *   V4 = V2 done the way docs/kvm-escalation.md's recipe says: state through SYNC_REGS, a sentinel
 *                 0xFF in exception.nr written (kvm_dirty_regs = EVENTS) whenever U is entered,
 *                 the lost event read from run->s.regs.events after the SHUTDOWN and re-injected
 *                 through the same dirty events (no vCPU ioctl at all).
 * Each variant runs with KVM's SLOT_ZAP_ALL quirk on (default) and off (KVM_CAP_DISABLE_QUIRKS2).
 * For each: N calls, the wall time of each call (OUT exit to OUT exit), p10/p50/p90, exits and
 * memslot updates per call, and a check that the guest's rbx counted every call.
 * Run: cc -O2 -Wall -o probe_escalation probe_escalation.c && ./probe_escalation [N]  (N = 2000)
 */
#include "kvmprobe.h"

BLOB(u_loop, "1: int3\n inc %rbx\n jmp 1b\n")
BLOB(k_sys, "out %al, $0xE0\n iretq\n")
#define IRETQ_AT (G_KCODE + 2)

static struct vm vm;
static struct vcpu v;
static int slot_ops;
static void setpage(uint64_t gpa, int mode) {
    if (vm.pmode[gpa >> 12] != mode) { page_mode(&vm, gpa, mode); slot_ops++; }
}
static void install(int sup, int idt_trick) {
    if (sup) { /* order: add before delete does not matter for a stopped vCPU */
        setpage(G_STUBS, 1); setpage(G_KCODE, 1); setpage(G_IDT, 1); setpage(G_UCODE, 0);
    } else {
        setpage(G_UCODE, 1); setpage(G_STUBS, 0); setpage(G_KCODE, 0); if (idt_trick) setpage(G_IDT, 0);
    }
}
static void hwbp(int arm) {
    struct kvm_guest_debug d;
    memset(&d, 0, sizeof d);
    d.control = arm ? KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP : 0;
    d.arch.debugreg[0] = IRETQ_AT;
    d.arch.debugreg[7] = arm ? 0x401 : 0;
    if (ioctl(v.fd, KVM_SET_GUEST_DEBUG, &d) < 0) DIE("KVM_SET_GUEST_DEBUG");
}

static void variant(int var, int N, int noquirk) {
    static const char *names[] = {"V0 baseline (no layouts)", "V1 lazy (fetch faults)", "V2 IDT absent in U + lazy return",
                                  "V3 IDT absent in U + HW BP on IRETQ", "V4 = V2 via SYNC_REGS + sentinel (the recipe)"};
    vm = vm_create();
    if (noquirk) {
        struct kvm_enable_cap eq = {.cap = KVM_CAP_DISABLE_QUIRKS2, .args = {KVM_X86_QUIRK_SLOT_ZAP_ALL}};
        if (ioctl(vm.fd, KVM_ENABLE_CAP, &eq) < 0) DIE("DISABLE_QUIRKS2");
    }
    guest_build(&vm);
    put_code(&vm, G_UCODE, u_loop_s, u_loop_e);
    put_code(&vm, G_KCODE, k_sys_s, k_sys_e);
    idt_gate(&vm, 3, G_KCODE, 3, SEL_KCS);
    v = vcpu_create(&vm, 0);
    vcpu_longmode(&v, 3, G_UCODE, G_USTACK_TOP);
    int sup = 0;
    if (var) install(0, var >= 2);
    long identified = 0;
    if (var == 4) {
        v.run->kvm_valid_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS;
        struct kvm_vcpu_events e0;
        ioctl(v.fd, KVM_GET_VCPU_EVENTS, &e0);
        e0.exception.nr = 0xFF; e0.exception.injected = 0; e0.exception.pending = 0; e0.flags = 0;
        v.run->s.regs.events = e0;
        v.run->kvm_dirty_regs = KVM_SYNC_X86_EVENTS;
    }
    slot_ops = 0;
    uint64_t *t = calloc((size_t)N, 8);
    long exits = 0, shut = 0, ierr = 0, dbg = 0, switches = 0;
    int calls = 0, warm = 20; /* the first calls fault pages in: not counted */
    uint64_t last = 0;
    struct kvm_vcpu_events bp;
    memset(&bp, 0, sizeof bp);
    bp.exception.injected = 1; bp.exception.nr = 3; /* flags 0: NMI, SIPI, shadow, SMM untouched */
    while (calls < N + warm) {
        int rc = vcpu_run_timeout(&v, 1000);
        exits++;
        if (rc == KVM_EXIT_IO && v.run->io.port == 0xE0) {
            uint64_t now = now_ns();
            if (calls >= warm && last) t[calls - warm] = now - last;
            if (calls == warm - 1) { exits = shut = ierr = dbg = switches = identified = 0; slot_ops = 0; }
            last = now;
            calls++;
        } else if (rc == KVM_EXIT_SHUTDOWN && var == 4 && !sup) {
            shut++;
            struct kvm_vcpu_events *e = &v.run->s.regs.events;
            if (e->exception.nr == 0xFF) { print_exit(&v, rc, "  SHUTDOWN without an exception (sentinel kept): "); break; }
            identified += e->exception.nr == 3;
            install(1, 1); sup = 1; switches++;
            e->exception.injected = 1; e->exception.pending = 0; e->flags = 0; /* nr, has_error_code, error_code as found */
            v.run->kvm_dirty_regs = KVM_SYNC_X86_EVENTS;
        } else if (rc == KVM_EXIT_SHUTDOWN && var >= 2 && !sup) {
            shut++;
            install(1, 1); sup = 1; switches++;
            if (ioctl(v.fd, KVM_SET_VCPU_EVENTS, &bp) < 0) DIE("KVM_SET_VCPU_EVENTS");
            if (var == 3) hwbp(1);
        } else if (rc == KVM_EXIT_INTERNAL_ERROR && v.run->internal.suberror == 1 && var >= 1) {
            ierr++;
            install(!sup, var >= 2); sup = !sup; switches++;
            if (var == 4 && !sup) { /* entering U: the sentinel */
                struct kvm_vcpu_events *e = &v.run->s.regs.events;
                e->exception.nr = 0xFF; e->exception.injected = 0; e->exception.pending = 0; e->exception.has_error_code = 0;
                e->flags = 0;
                v.run->kvm_dirty_regs = KVM_SYNC_X86_EVENTS;
            }
        } else if (rc == KVM_EXIT_DEBUG && var == 3 && sup) {
            dbg++;
            struct kvm_regs rr;
            ioctl(v.fd, KVM_GET_REGS, &rr);
            uint64_t *fr = (uint64_t *)(vm.mem + rr.rsp); /* identity-mapped kernel stack */
            if ((fr[1] & 3) == 3 && vm.pmode[(fr[0] >> 12) & 0x3f] && (fr[0] >> 12) < 0x40) setpage(fr[0] & ~0xfffull, 0);
            hwbp(0);
        } else {
            print_exit(&v, rc, "  unexpected: ");
            print_state(&v, "    ");
            break;
        }
    }
    struct kvm_regs r;
    ioctl(v.fd, KVM_GET_REGS, &r);
    int n = calls - warm;
    printf("%s%s: %d calls, guest rbx %llu; per call: %.2f exits (%.2f SHUTDOWN, %.2f INTERNAL_ERROR, %.2f DEBUG), %.2f switches, %.2f memslot updates\n",
           names[var], noquirk ? " [SLOT_ZAP_ALL off]" : "", n, r.rbx, (double)exits / n, (double)shut / n, (double)ierr / n, (double)dbg / n, (double)switches / n,
           (double)slot_ops / n);
    if (var == 4) printf("  V4: SHUTDOWNs identified as #BP through the sentinel: %ld of %ld\n", identified, shut);
    if (n > 10) report_us("wall time per call", t, (size_t)n);
    free(t);
    vcpu_destroy(&v);
    vm_destroy(&vm, 1);
}

int main(int argc, char **argv) {
    int N = argc > 1 ? atoi(argv[1]) : 2000;
    char la[128];
    loadavg(la, sizeof la);
    printf("probe_escalation (loadavg %s)\n", la);
    for (int noquirk = 0; noquirk < 2; noquirk++)
        for (int var = noquirk; var < 5; var++) variant(var, N, noquirk);
    return 0;
}
