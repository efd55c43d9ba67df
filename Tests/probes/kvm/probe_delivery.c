/*
 * probe_delivery.c - (question A1/A2) event delivery from CPL 3 when one of the kernel's
 * structures is missing from the current memslot layout, and what userspace can do afterwards.
 *
 * For each event (INT3, UD2, user #PF at an unmapped linear address, #GP from a user HLT, #DE,
 * an external interrupt queued with KVM_INTERRUPT (no in-kernel irqchip), #UD and #PF queued with
 * KVM_SET_VCPU_EVENTS (exception.injected = 1), a single-step #DB (RFLAGS.TF), INT1, an NMI
 * queued with KVM_NMI) and each layout (baseline: all mapped; the IDT,
 * GDT, TSS, kernel stack (TSS.RSP0) or handler code page without memslot, or in a KVM_MEM_READONLY
 * memslot) it creates a fresh VM, starts the vCPU at CPL 3 at the event's instruction, and prints
 * the first exit (reason, suberror, internal.data[], the MMIO address), the vCPU state after it
 * (rip, rsp, CS/CPL, CR2) and KVM_GET_VCPU_EVENTS. Delivered = the stub of the vector OUTs it on
 * port 0xEF at CPL 0; then the exception frame on the kernel stack is printed.
 * Where delivery did not happen, three recoveries are tried, each on a fresh run of the case:
 *   as-is   : the page is put back (memslot re-created) and KVM_RUN again, nothing else;
 *   reinject: the page is put back, the event re-queued with KVM_SET_VCPU_EVENTS (same vector and
 *             error code, CR2 for #PF; interrupt.injected for the interrupt, nmi.injected for
 *             the NMI), rip left as KVM left it;
 *   reset   : the page is put back, KVM_SET_SREGS/KVM_SET_REGS to the state before the first run
 *             (the instruction re-executes; queued events are queued again).
 * and the frame the guest then sees is compared with the baseline frame (vector, error code, CR2,
 * rip, cs, rflags, rsp, ss).
 * Run: cc -O2 -Wall -o probe_delivery probe_delivery.c && ./probe_delivery [-v]
 */
#include "kvmprobe.h"

BLOB(u_int3, "int3\n jmp .\n")
BLOB(u_ud2, "ud2\n jmp .\n")
BLOB(u_pf, "mov 0x400000, %rax\n jmp .\n")
BLOB(u_gp, "hlt\n jmp .\n")
BLOB(u_de, "xor %ecx, %ecx\n xor %edx, %edx\n div %ecx\n jmp .\n")
BLOB(u_spin, "jmp .\n")
BLOB(u_tf, "pushfq\n orq $0x100, (%rsp)\n popfq\n nop\n nop\n jmp .\n")
BLOB(u_int1, ".byte 0xf1\n jmp .\n")
BLOB(u_segload, "mov $0x2b, %eax\n mov %eax, %ds\n mov %eax, %es\n int3\n jmp .\n")

enum { EV_INT3, EV_UD2, EV_PF, EV_GP, EV_DE, EV_EXTINT, EV_INJ_UD, EV_INJ_PF, EV_TF, EV_INT1, EV_NMI, NEV };
static const struct { const char *name; const uint8_t *s, *e; int vector; } evs[NEV] = {
    {"INT3", u_int3_s, u_int3_e, 3},       {"UD2", u_ud2_s, u_ud2_e, 6},
    {"user #PF", u_pf_s, u_pf_e, 14},      {"#GP (user hlt)", u_gp_s, u_gp_e, 13},
    {"#DE", u_de_s, u_de_e, 0},            {"KVM_INTERRUPT 0x20", u_spin_s, u_spin_e, 0x20},
    {"injected #UD", u_spin_s, u_spin_e, 6}, {"injected #PF err 4", u_spin_s, u_spin_e, 14},
    {"#DB single-step (TF)", u_tf_s, u_tf_e, 1}, {"INT1 (icebp, F1)", u_int1_s, u_int1_e, 1},
    {"KVM_NMI", u_spin_s, u_spin_e, 2},
};
#define NST 10
static const struct { const char *name; uint64_t gpa; int mode; } sts[NST] = {
    {"baseline", 0, 1},
    {"IDT absent", G_IDT, 0},           {"IDT readonly", G_IDT, 2},
    {"GDT absent", G_GDT, 0},           {"GDT readonly", G_GDT, 2},
    {"TSS absent", G_TSS, 0},           {"TSS readonly", G_TSS, 2},
    {"kstack absent", G_KSTACK, 0},     {"kstack readonly", G_KSTACK, 2},
    {"handler code absent", G_STUBS, 0},
};
static int verbose;

struct result { int delivered; struct frame f; uint64_t cr2, dr6; };
static struct result base[NEV];
/* summary: per (event, layout): first exit, then the outcome of as-is / reinject / reset */
static char summ[NEV][NST][4][16];
static int last_rc_for_summary;

static void queue_event(struct vcpu *v, int ev) {
    if (ev == EV_NMI) {
        if (ioctl(v->fd, KVM_NMI) < 0) printf("    KVM_NMI: %s\n", strerror(errno));
    } else if (ev == EV_EXTINT) {
        struct kvm_interrupt irq = {.irq = 0x20};
        if (ioctl(v->fd, KVM_INTERRUPT, &irq) < 0) printf("    KVM_INTERRUPT: %s\n", strerror(errno));
    } else if (ev == EV_INJ_UD || ev == EV_INJ_PF) {
        struct kvm_vcpu_events e;
        ioctl(v->fd, KVM_GET_VCPU_EVENTS, &e);
        e.exception.injected = 1;
        e.exception.nr = (uint8_t)evs[ev].vector;
        e.exception.has_error_code = ev == EV_INJ_PF;
        e.exception.error_code = ev == EV_INJ_PF ? 4 : 0;
        e.flags = 0;
        if (ev == EV_INJ_PF) {
            struct kvm_sregs s;
            ioctl(v->fd, KVM_GET_SREGS, &s);
            s.cr2 = 0xdead000;
            ioctl(v->fd, KVM_SET_SREGS, &s);
        }
        if (ioctl(v->fd, KVM_SET_VCPU_EVENTS, &e) < 0) printf("    KVM_SET_VCPU_EVENTS: %s\n", strerror(errno));
    }
}
/* re-queue the event the baseline delivered (vector, error code, CR2) */
static void reinject(struct vcpu *v, int ev) {
    struct kvm_vcpu_events e;
    ioctl(v->fd, KVM_GET_VCPU_EVENTS, &e);
    if (evs[ev].vector == 2) {
        e.nmi.injected = 1;
    } else if (evs[ev].vector >= 32) {
        e.interrupt.injected = 1;
        e.interrupt.nr = (uint8_t)evs[ev].vector;
        e.interrupt.soft = 0;
    } else {
        e.exception.injected = 1;
        e.exception.nr = (uint8_t)evs[ev].vector;
        e.exception.has_error_code = (uint8_t)has_errcode(evs[ev].vector);
        e.exception.error_code = (uint32_t)base[ev].f.err;
    }
    e.flags = 0;
    if (evs[ev].vector == 14) {
        struct kvm_sregs s;
        ioctl(v->fd, KVM_GET_SREGS, &s);
        s.cr2 = base[ev].cr2;
        ioctl(v->fd, KVM_SET_SREGS, &s);
    }
    if (ioctl(v->fd, KVM_SET_VCPU_EVENTS, &e) < 0) printf("      KVM_SET_VCPU_EVENTS: %s\n", strerror(errno));
}

/* Runs once; if it is the stub's OUT, fills r. Prints the exit (and the state if verbose or failed). */
static int run_and_report(struct vm *vm, struct vcpu *v, int ev, const char *pfx, struct result *r) {
    int rc = vcpu_run_timeout(v, 300);
    last_rc_for_summary = rc;
    memset(r, 0, sizeof *r);
    if (is_out(v, rc, PORT_EXC)) {
        struct kvm_regs regs; struct kvm_sregs s;
        ioctl(v->fd, KVM_GET_REGS, &regs);
        ioctl(v->fd, KVM_GET_SREGS, &s);
        int vec = io_val(v);
        r->delivered = vec == evs[ev].vector;
        r->f = read_frame(vm, regs.rsp, vec);
        r->cr2 = s.cr2;
        printf("%sdelivered: stub %d OUT at cs %#x; ", pfx, vec, s.cs.selector);
        print_frame(r->f, vec, "");
        if (vec == 14) printf("%s  cr2 %#llx\n", pfx, (unsigned long long)s.cr2);
        if (vec == 1) {
            struct kvm_debugregs d;
            ioctl(v->fd, KVM_GET_DEBUGREGS, &d);
            r->dr6 = d.dr6;
            printf("%s  dr6 %#llx\n", pfx, (unsigned long long)d.dr6);
        }
        return rc;
    }
    print_exit(v, rc, pfx);
    char p2[192];
    snprintf(p2, sizeof p2, "%s  ", pfx);
    print_state(v, p2);
    return rc;
}
static int compare(int ev, struct result *r, const char *pfx) {
    if (!r->delivered) return 0;
    struct frame a = base[ev].f, b = r->f;
    int same = a.err == b.err && a.rip == b.rip && a.cs == b.cs && a.rflags == b.rflags && a.rsp == b.rsp && a.ss == b.ss &&
               (evs[ev].vector != 14 || base[ev].cr2 == r->cr2) && (evs[ev].vector != 1 || base[ev].dr6 == r->dr6);
    printf("%s=> %s the baseline frame%s\n", pfx, same ? "SAME as" : "DIFFERS from",
           evs[ev].vector == 14 ? " (and CR2)" : evs[ev].vector == 1 ? " (and DR6)" : "");
    return same ? 1 : 2;
}
static void note(int ev, int st, int k, int cmp) {
    const char *o = cmp == 1 ? "same" : cmp == 2 ? "DIFFERENT" : last_rc_for_summary == -EINTR ? "lost" :
                    last_rc_for_summary >= 0 ? exit_name((uint32_t)last_rc_for_summary) : "error";
    snprintf(summ[ev][st][k], sizeof summ[ev][st][k], "%s", o);
}

struct vcase { struct vm vm; struct vcpu v; struct kvm_regs r0; struct kvm_sregs s0; };
static void case_start(struct vcase *c, int ev, int st) {
    c->vm = vm_create();
    guest_build(&c->vm);
    put_code(&c->vm, G_UCODE, evs[ev].s, evs[ev].e);
    c->v = vcpu_create(&c->vm, 0);
    vcpu_longmode(&c->v, 3, G_UCODE, G_USTACK_TOP);
    ioctl(c->v.fd, KVM_GET_REGS, &c->r0);
    ioctl(c->v.fd, KVM_GET_SREGS, &c->s0);
    if (sts[st].mode != 1) page_mode(&c->vm, sts[st].gpa, sts[st].mode);
    queue_event(&c->v, ev);
}
static void case_end(struct vcase *c) {
    vcpu_destroy(&c->v);
    vm_destroy(&c->vm, 1);
}

/* Are the exception/interrupt fields KVM_GET_VCPU_EVENTS shows after a SHUTDOWN those of the lost
 * event, or left over from an earlier one? Two sequences on one vCPU: (1) a user #PF delivered
 * normally, then an external interrupt whose delivery fails (IDT absent); (2) an external
 * interrupt delivered normally, then an INT3 whose delivery fails. */
static void stale_fields(void) {
    printf("[stale event fields after SHUTDOWN]\n");
    for (int seq = 0; seq < 2; seq++) {
        struct vcase c;
        case_start(&c, seq == 0 ? EV_PF : EV_EXTINT, 0);
        struct result r;
        run_and_report(&c.vm, &c.v, seq == 0 ? EV_PF : EV_EXTINT, seq == 0 ? "  (1) #PF:   " : "  (2) irq:   ", &r);
        page_mode(&c.vm, G_IDT, 0);
        put_code(&c.vm, G_UCODE, seq == 0 ? u_spin_s : u_int3_s, seq == 0 ? u_spin_e : u_int3_e);
        ioctl(c.v.fd, KVM_SET_SREGS, &c.s0);
        ioctl(c.v.fd, KVM_SET_REGS, &c.r0);
        if (seq == 0) queue_event(&c.v, EV_EXTINT);
        run_and_report(&c.vm, &c.v, seq == 0 ? EV_EXTINT : EV_INT3, seq == 0 ? "  (1) then irq, IDT absent: " : "  (2) then INT3, IDT absent: ", &r);
        case_end(&c);
    }
}
/* Is a failure to reach a structure turned into a guest-visible nested fault (#NP/#DF) or
 * directly into a shutdown?  (a) INT3 through a not-present gate (architectural #NP(0x1a));
 * (b) INT3 with the kernel stack page absent while #DF has its own IST stack (TSS.IST1) in a
 * mapped page; (c) the GDT's kernel CS accessed bit after a delivery with the GDT in a READONLY
 * memslot vs a normal one. */
static void nested(void) {
    struct vcase c;
    struct result r;
    printf("[nested faults]\n");
    case_start(&c, EV_INT3, 0);
    q(&c.vm, G_IDT + 16 * 3)[0] &= ~(1ull << 47); /* gate 3 not present */
    run_and_report(&c.vm, &c.v, EV_INT3, "  (a) INT3, gate 3 not present: ", &r);
    case_end(&c);
    case_start(&c, EV_INT3, 0);
    q(&c.vm, G_IDT + 16 * 8)[0] |= 1ull << 32;                /* #DF on IST1 */
    *(uint64_t *)(c.vm.mem + G_TSS + 36) = G_KDATA + 0x1000; /* TSS.IST1 */
    page_mode(&c.vm, G_KSTACK, 0);
    run_and_report(&c.vm, &c.v, EV_INT3, "  (b) INT3, kstack absent, #DF on IST1 (mapped): ", &r);
    case_end(&c);
    /* (d) what user code itself needs: segment loads with the GDT page absent; then INT3 with the
     * GDT, TSS and kernel stack all absent and only the IDT present (expected: SHUTDOWN) */
    case_start(&c, EV_INT3, 0);
    put_code(&c.vm, G_UCODE, u_segload_s, u_segload_e);
    page_mode(&c.vm, G_GDT, 0);
    run_and_report(&c.vm, &c.v, EV_INT3, "  (d) user mov to DS/ES (0x2b) with the GDT absent, then int3: ", &r);
    case_end(&c);
    case_start(&c, EV_INT3, 0);
    put_code(&c.vm, G_UCODE, u_segload_s, u_segload_e);
    page_mode(&c.vm, G_GDT, 0); page_mode(&c.vm, G_TSS, 0); page_mode(&c.vm, G_KSTACK, 0); page_mode(&c.vm, G_IDT, 0);
    run_and_report(&c.vm, &c.v, EV_INT3, "  (e) the same with IDT, GDT, TSS, kernel stack all absent: ", &r);
    case_end(&c);
    for (int ro = 0; ro < 2; ro++) {
        case_start(&c, EV_INT3, 0);
        if (ro) page_mode(&c.vm, G_GDT, 2);
        uint64_t before = *q(&c.vm, G_GDT + 0x10);
        run_and_report(&c.vm, &c.v, EV_INT3, ro ? "  (c) GDT READONLY: " : "  (c) GDT normal:   ", &r);
        printf("      GDT[0x10] before %#llx after %#llx (accessed bit %s)\n", (unsigned long long)before,
               (unsigned long long)*q(&c.vm, G_GDT + 0x10), (*q(&c.vm, G_GDT + 0x10) >> 40) & 1 ? "set" : "clear");
        case_end(&c);
    }
}

/* Telling which event a SHUTDOWN lost: before the run, a sentinel 0xFF in exception.nr
 * (injected = pending = 0; interrupt and NMI fields untouched) through KVM_SET_VCPU_EVENTS or
 * through SYNC_REGS (kvm_dirty_regs = EVENTS); after the SHUTDOWN, exception.nr != 0xFF names a
 * lost exception, while 0xFF means the lost event was one the VMM queued itself (KVM_INTERRUPT,
 * KVM_NMI). Also: an NMI (KVM_NMI) delivered at CPL 3 with the IDT absent. */
static void sentinel(void) {
    printf("[sentinel in exception.nr]\n");
    {   /* pitfall check: KVM_INTERRUPT, then SYNC_REGS events written from a copy taken before it */
        struct vcase k;
        case_start(&k, EV_INJ_UD, 0); /* spins; undo its queued #UD first */
        struct kvm_vcpu_events e;
        ioctl(k.v.fd, KVM_GET_VCPU_EVENTS, &e);
        e.exception.injected = 0; e.flags = 0;
        ioctl(k.v.fd, KVM_SET_VCPU_EVENTS, &e);
        ioctl(k.v.fd, KVM_GET_VCPU_EVENTS, &e); /* the copy: no interrupt queued */
        queue_event(&k.v, EV_EXTINT);
        k.v.run->s.regs.events = e;
        k.v.run->kvm_dirty_regs = KVM_SYNC_X86_EVENTS;
        struct result r;
        run_and_report(&k.vm, &k.v, EV_EXTINT, "  KVM_INTERRUPT then dirty SYNC_REGS events from an older copy: ", &r);
        case_end(&k);
    }
    for (int c = 0; c < 5; c++) {
        static const char *names[] = {"INT3, sentinel by SET_VCPU_EVENTS", "KVM_INTERRUPT 0x20, sentinel by SET_VCPU_EVENTS",
                                      "user #PF, sentinel by SYNC_REGS", "KVM_INTERRUPT 0x20, sentinel by SYNC_REGS",
                                      "KVM_NMI, sentinel by SET_VCPU_EVENTS"};
        int ev = c == 0 ? EV_INT3 : c == 2 ? EV_PF : EV_EXTINT;
        struct vcase k;
        case_start(&k, c == 4 ? EV_INJ_UD : ev, 1); /* the KVM_NMI case spins (EV_INJ_UD's code) */
        struct kvm_vcpu_events e;
        ioctl(k.v.fd, KVM_GET_VCPU_EVENTS, &e);
        e.exception.nr = 0xFF; e.exception.injected = 0; e.exception.pending = 0; e.exception.has_error_code = 0;
        e.flags = 0;
        if (c == 2 || c == 3) {
            k.v.run->s.regs.events = e;
            k.v.run->kvm_dirty_regs = KVM_SYNC_X86_EVENTS;
        } else {
            int r = ioctl(k.v.fd, KVM_SET_VCPU_EVENTS, &e);
            if (r < 0) printf("  %s: KVM_SET_VCPU_EVENTS with nr 0xFF: %s\n", names[c], strerror(errno));
        }
        if (c == 4) printf("  KVM_NMI: %s\n", ioctl(k.v.fd, KVM_NMI) < 0 ? strerror(errno) : "ok");
        if (c != 2 && c != 3) print_events(&k.v, "    before the run: ");
        struct result r;
        char pfx[96];
        snprintf(pfx, sizeof pfx, "  %s: ", names[c]);
        run_and_report(&k.vm, &k.v, ev, pfx, &r);
        case_end(&k);
    }
}

int main(int argc, char **argv) {
    verbose = argc > 1 && !strcmp(argv[1], "-v");
    char la[128];
    loadavg(la, sizeof la);
    printf("probe_delivery: events at CPL 3 with a kernel structure missing from the layout (loadavg %s)\n", la);
    for (int ev = 0; ev < NEV; ev++) {
        for (int st = 0; st < NST; st++) {
            struct vcase c;
            struct result r;
            printf("[%s | %s]\n", evs[ev].name, sts[st].name);
            case_start(&c, ev, st);
            int rc = run_and_report(&c.vm, &c.v, ev, "  first: ", &r);
            if (st == 0) {
                base[ev] = r;
                case_end(&c);
                continue;
            }
            note(ev, st, 0, compare(ev, &r, "  "));
            if (r.delivered) { case_end(&c); continue; }
            /* as-is */
            page_mode(&c.vm, sts[st].gpa, 1);
            rc = run_and_report(&c.vm, &c.v, ev, "  as-is:    ", &r);
            note(ev, st, 1, compare(ev, &r, "    "));
            case_end(&c);
            /* reinject */
            case_start(&c, ev, st);
            rc = vcpu_run_timeout(&c.v, 300);
            page_mode(&c.vm, sts[st].gpa, 1);
            reinject(&c.v, ev);
            rc = run_and_report(&c.vm, &c.v, ev, "  reinject: ", &r);
            note(ev, st, 2, compare(ev, &r, "    "));
            case_end(&c);
            /* reset */
            case_start(&c, ev, st);
            rc = vcpu_run_timeout(&c.v, 300);
            page_mode(&c.vm, sts[st].gpa, 1);
            ioctl(c.v.fd, KVM_SET_SREGS, &c.s0);
            ioctl(c.v.fd, KVM_SET_REGS, &c.r0);
            queue_event(&c.v, ev);
            rc = run_and_report(&c.vm, &c.v, ev, "  reset:    ", &r);
            note(ev, st, 3, compare(ev, &r, "    "));
            case_end(&c);
            (void)rc;
        }
    }
    stale_fields();
    sentinel();
    nested();
    printf("[summary] first = the first exit with the layout (same = delivered with the baseline frame); then what the\n"
           "guest saw after the page was put back: as-is / reinject / reset (same, DIFFERENT frame, lost = ran on\n"
           "without the event for 300 ms, or the exit)\n");
    for (int ev = 0; ev < NEV; ev++)
        for (int st = 1; st < NST; st++)
            printf("  %-22s %-20s first %-15s as-is %-10s reinject %-10s reset %s\n", evs[ev].name, sts[st].name, summ[ev][st][0],
                   summ[ev][st][1][0] ? summ[ev][st][1] : "-", summ[ev][st][2][0] ? summ[ev][st][2] : "-",
                   summ[ev][st][3][0] ? summ[ev][st][3] : "-");
    return 0;
}
