/*
 * probe_exit.c - (question B1) exit round trips on this KVM.
 *
 *  1. CPL 0 `1: out %al, $0xE0; jmp 1b`: raw KVM_RUN loop;
 *  2. the same + KVM_GET_REGS + KVM_GET_SREGS after each exit;
 *  3. the same reading the state from kvm_run->s.regs (KVM_CAP_SYNC_REGS, kvm_valid_regs =
 *     REGS|SREGS|EVENTS), and 3b. also writing it back (kvm_dirty_regs = REGS) each time;
 *  4. CPL 3 `out`: with IOPL 0 (expected #GP) and with RFLAGS.IOPL = 3 set by KVM_SET_REGS;
 *  5. CPL 3 MMIO round trip: `1: mov (0x13000), %eax; jmp 1b` with the page 0x13000 (a user page
 *     in the guest page tables) without memslot: one KVM_EXIT_MMIO per iteration; 6. the same at
 *     CPL 0.
 *  7. CPL 3 `1: int3; jmp 1b` with the IDT page without memslot: every KVM_RUN ends in
 *     KVM_EXIT_SHUTDOWN (the plugin's escalation exit); 8. CPL 3 fetch from a page without
 *     memslot: every KVM_RUN ends in an emulation failure (the plugin's fetch violation, e.g. the
 *     return to user mode in the supervisor layout). Both are the exits of a hierarchy switch.
 *  9. CPL 3 MMIO write: `1: movl %eax, (0x13000); jmp 1b` with the page a KVM_MEM_READONLY memslot
 *     (an exit that leaves native user mode with no layout involved: the benchmark's CPL 3 exit
 *     round trip, issue 13); 10. CPL 3 `out` with IOPL 0 and the TSS's I/O permission bitmap
 *     allowing the port (architecturally permitted: does this KVM exit with KVM_EXIT_IO?), and
 *     10b. a loop of it timed.
 * Each: N round trips (default 5000) after 50 warm-up ones; p10/p50/p90 of the wall time of one
 * KVM_RUN (+ the reads), and the load average.
 * Run: cc -O2 -Wall -o probe_exit probe_exit.c && ./probe_exit [N]
 */
#include "kvmprobe.h"

BLOB(g_outloop, "1: out %al, $0xE0\n jmp 1b\n")
BLOB(g_mmioloop, "1: mov 0x13000, %eax\n jmp 1b\n")
BLOB(u_out, "out %al, $0xE0\n jmp .\n")
BLOB(u_int3loop, "1: int3\n jmp 1b\n")
BLOB(u_fetchout, "mov $0x13000, %eax\n jmp *%rax\n")
BLOB(u_mmiowrite, "1: movl %eax, 0x13000\n jmp 1b\n")

static int N = 5000;
static void io_bitmap(struct vm *vm);
static void io_bitmap_tr(struct vcpu *v);

static void loop(const char *label, const uint8_t *s, const uint8_t *e, int cpl, int mode) {
    struct vm vm = vm_create();
    guest_build(&vm);
    put_code(&vm, cpl ? G_UCODE : G_KCODE, s, e);
    if (mode >= 5) page_mode(&vm, 0x13000, 0);
    if (mode == 7) page_mode(&vm, G_IDT, 0);
    if (mode == 9) page_mode(&vm, 0x13000, 2);
    if (mode == 10) io_bitmap(&vm);
    struct vcpu v = vcpu_create(&vm, 0);
    vcpu_longmode(&v, cpl, cpl ? G_UCODE : G_KCODE, cpl ? G_USTACK_TOP : G_KSTACK_TOP);
    if (mode == 10) io_bitmap_tr(&v);
    if (mode == 3 || mode == 4) v.run->kvm_valid_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS;
    uint64_t *t = calloc((size_t)N, 8);
    struct kvm_regs r; struct kvm_sregs sr;
    uint64_t sink = 0;
    for (int i = -50; i < N; i++) {
        uint64_t t0 = now_ns();
        int rc = vcpu_run(&v);
        int want = mode == 7 ? KVM_EXIT_SHUTDOWN : mode == 8 ? KVM_EXIT_INTERNAL_ERROR : mode == 9 ? KVM_EXIT_MMIO : mode == 10 ? KVM_EXIT_IO : mode >= 5 ? KVM_EXIT_MMIO : KVM_EXIT_IO;
        if (rc != want) { print_exit(&v, rc, "  unexpected: "); print_state(&v, "    "); break; }
        if (mode == 9 && !v.run->mmio.is_write) { printf("  unexpected: MMIO read\n"); break; }
        if (mode == 5 || mode == 6) memset(v.run->mmio.data, 0, 8);
        if (mode == 2) { ioctl(v.fd, KVM_GET_REGS, &r); ioctl(v.fd, KVM_GET_SREGS, &sr); sink += r.rip + sr.cr3; }
        if (mode == 3) sink += v.run->s.regs.regs.rip + v.run->s.regs.sregs.cr3 + v.run->s.regs.events.exception.nr;
        if (mode == 4) { sink += v.run->s.regs.regs.rip + v.run->s.regs.sregs.cr3; v.run->s.regs.regs.rbx++; v.run->kvm_dirty_regs = KVM_SYNC_X86_REGS; }
        if (i >= 0) t[i] = now_ns() - t0;
    }
    if (mode == 4) {
        ioctl(v.fd, KVM_GET_REGS, &r);
        printf("  (3b check: rbx written back through sync regs = %llu, expected %d: the last write is applied at the next KVM_RUN)\n", r.rbx, N + 49);
    }
    report_us(label, t, (size_t)N);
    free(t);
    (void)sink;
    vcpu_destroy(&v);
    vm_destroy(&vm, 1);
}

/* The TSS's I/O permission bitmap (at TSS + 104, 8 KiB + the terminating byte): every port allowed
 * at CPL 3 with IOPL 0; the TSS descriptor's and TR's limit to match. */
#define IOBM_LIMIT (104 + 8192)
static void io_bitmap(struct vm *vm) {
    *(uint16_t *)(vm->mem + G_TSS + 102) = 104;
    memset(vm->mem + G_TSS + 104, 0, 8192);
    vm->mem[G_TSS + IOBM_LIMIT] = 0xff;
    uint64_t lim = IOBM_LIMIT;
    q(vm, G_GDT)[7] = (lim & 0xffff) | ((uint64_t)(G_TSS & 0xffffff) << 16) | (0x8bull << 40) | (((lim >> 16) & 0xf) << 48);
}
static void io_bitmap_tr(struct vcpu *v) {
    struct kvm_sregs sr;
    if (ioctl(v->fd, KVM_GET_SREGS, &sr) < 0) DIE("KVM_GET_SREGS");
    sr.tr.limit = IOBM_LIMIT;
    if (ioctl(v->fd, KVM_SET_SREGS, &sr) < 0) DIE("KVM_SET_SREGS");
}

/* iopl 1: RFLAGS.IOPL = 3 set by KVM_SET_REGS; iopl 2: IOPL 0 and the I/O bitmap allowing the port. */
static void cpl3_out(int iopl) {
    struct vm vm = vm_create();
    guest_build(&vm);
    if (iopl == 2) io_bitmap(&vm);
    put_code(&vm, G_UCODE, u_out_s, u_out_e);
    struct vcpu v = vcpu_create(&vm, 0);
    vcpu_longmode(&v, 3, G_UCODE, G_USTACK_TOP);
    if (iopl == 2) io_bitmap_tr(&v);
    if (iopl == 1) {
        struct kvm_regs r;
        ioctl(v.fd, KVM_GET_REGS, &r);
        r.rflags |= 0x3000;
        ioctl(v.fd, KVM_SET_REGS, &r);
        ioctl(v.fd, KVM_GET_REGS, &r);
        printf("  (rflags read back after KVM_SET_REGS with IOPL 3: %#llx)\n", r.rflags);
    }
    int rc = vcpu_run_timeout(&v, 300);
    struct kvm_regs r;
    ioctl(v.fd, KVM_GET_REGS, &r);
    if (is_out(&v, rc, PORT_EXC)) {
        printf("  CPL 3 out, %s: guest stub %d ran; ", iopl == 2 ? "IOPL 0, I/O bitmap allows" : iopl ? "IOPL 3" : "IOPL 0", io_val(&v));
        print_frame(read_frame(&vm, r.rsp, io_val(&v)), io_val(&v), "");
    } else {
        print_exit(&v, rc, iopl == 2 ? "  CPL 3 out, IOPL 0, I/O bitmap allows: " : iopl ? "  CPL 3 out, IOPL 3: " : "  CPL 3 out, IOPL 0: ");
        print_state(&v, "    ");
    }
    vcpu_destroy(&v);
    vm_destroy(&vm, 1);
}

int main(int argc, char **argv) {
    if (argc > 1) N = atoi(argv[1]);
    int kvm = kvm_open();
    char la[128];
    loadavg(la, sizeof la);
    printf("probe_exit (KVM_CAP_SYNC_REGS = %d; loadavg %s)\n", cap(kvm, KVM_CAP_SYNC_REGS), la);
    loop("1. CPL 0 OUT, raw KVM_RUN", g_outloop_s, g_outloop_e, 0, 1);
    loop("2. CPL 0 OUT + KVM_GET_REGS + KVM_GET_SREGS", g_outloop_s, g_outloop_e, 0, 2);
    loop("3. CPL 0 OUT, state via SYNC_REGS (REGS|SREGS|EVENTS)", g_outloop_s, g_outloop_e, 0, 3);
    loop("3b. same + REGS written back (kvm_dirty_regs)", g_outloop_s, g_outloop_e, 0, 4);
    cpl3_out(0);
    cpl3_out(1);
    loop("5. CPL 3 MMIO read (no memslot), raw KVM_RUN", g_mmioloop_s, g_mmioloop_e, 3, 5);
    loop("6. CPL 0 MMIO read (no memslot), raw KVM_RUN", g_mmioloop_s, g_mmioloop_e, 0, 6);
    loop("7. CPL 3 INT3, IDT page without memslot: KVM_EXIT_SHUTDOWN", u_int3loop_s, u_int3loop_e, 3, 7);
    loop("8. CPL 3 fetch from a page without memslot: emulation failure", u_fetchout_s, u_fetchout_e, 3, 8);
    loop("9. CPL 3 MMIO write to a KVM_MEM_READONLY page, raw KVM_RUN", u_mmiowrite_s, u_mmiowrite_e, 3, 9);
    loop("9b. CPL 0 OUT again (same run, for the ratio)", g_outloop_s, g_outloop_e, 0, 1);
    printf("10.\n");
    cpl3_out(2);
    loop("10b. CPL 3 OUT allowed by the TSS I/O bitmap, raw KVM_RUN", g_outloop_s, g_outloop_e, 3, 10);
    return 0;
}
