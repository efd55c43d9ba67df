/*
 * probe_native.c - which guest code runs natively and which through KVM's instruction emulator.
 *
 * Measures: wall time of a `dec %rcx; jnz` loop at CPL 3 (64-bit), at CPL 3 in compatibility mode
 * (32-bit code segment), and at CPL 0 (64-bit), with the vCPU's KVM_GET_STATS_FD counters
 * (insn_emulation, exits, ...) before/after, and the number of KVM_RUN returns.
 * Run: cc -O2 -Wall -o probe_native probe_native.c && ./probe_native   (root, /dev/kvm)
 */
#include "kvmprobe.h"

/* CPL 3, 64-bit: 10^7 iterations then int3 (vector 3 -> stub OUTs 3 on 0xEF) */
BLOB(u64loop, "mov $10000000, %ecx\n1: dec %rcx\n jnz 1b\n int3\n")
/* CPL 3, 32-bit compatibility mode: 10^5 iterations then int3 */
BLOB(u32loop, ".code32\n mov $100000, %ecx\n1: dec %ecx\n jnz 1b\n int3\n.code64\n")
/* CPL 0: 10^5 iterations then out to 0xE0 */
BLOB(k64loop, "mov $100000, %ecx\n1: dec %rcx\n jnz 1b\n out %al, $0xE0\n hlt\n")

static const char *names[] = {"insn_emulation", "insn_emulation_fail", "exits", "io_exits", "mmio_exits", "pf_taken",
                              "pf_guest", "exception_exits", "irq_exits", "halt_exits", "signal_exits", "request_irq_exits",
                              "hypercalls", "nmi_window_exits", "l1d_flush", "host_state_reload", "fpu_reload",
                              "insn_emulation", NULL};

static void one(const char *label, int cpl, int cs32, const uint8_t *s, const uint8_t *e, uint64_t iters) {
    struct vm vm = vm_create();
    guest_build(&vm);
    uint64_t at = cpl ? G_UCODE : G_KCODE;
    put_code(&vm, at, s, e);
    struct vcpu v = vcpu_create(&vm, 0);
    vcpu_longmode(&v, cpl, at, cpl ? G_USTACK_TOP : G_KSTACK_TOP);
    if (cs32) {
        struct kvm_sregs sr;
        ioctl(v.fd, KVM_GET_SREGS, &sr);
        sr.cs = seg_code(SEL_UCS32, 3);
        sr.cs.l = 0; sr.cs.db = 1;
        ioctl(v.fd, KVM_SET_SREGS, &sr);
    }
    struct kp_stats st = stats_open(v.fd);
    uint64_t before[32], after[32];
    for (int i = 0; names[i]; i++) before[i] = stat_get(&st, names[i]);
    int runs = 0, rc;
    uint64_t t0 = now_ns();
    for (;;) {
        rc = vcpu_run(&v);
        runs++;
        if (rc != KVM_EXIT_INTR && rc != -EINTR) break;
    }
    uint64_t t1 = now_ns();
    for (int i = 0; names[i]; i++) after[i] = stat_get(&st, names[i]);
    char la[128];
    loadavg(la, sizeof la);
    printf("%s: %llu iterations (%llu instructions) in %.3f ms = %.1f ns/instruction; KVM_RUN calls %d (loadavg %s)\n", label,
           (unsigned long long)iters, (unsigned long long)(2 * iters), (t1 - t0) / 1e6, (double)(t1 - t0) / (2.0 * iters), runs, la);
    print_exit(&v, rc, "  last ");
    printf("  stats delta:");
    for (int i = 0; names[i] && i < 17; i++)
        if (before[i] != ~0ull) printf(" %s=%llu", names[i], (unsigned long long)(after[i] - before[i]));
    printf("\n");
    vcpu_destroy(&v);
    vm_destroy(&vm, 1);
}

int main(void) {
    printf("probe_native: is guest code emulated? (stats from KVM_GET_STATS_FD)\n");
    one("CPL 3, 64-bit  ", 3, 0, u64loop_s, u64loop_e, 10000000);
    one("CPL 3, 32-bit  ", 3, 1, u32loop_s, u32loop_e, 100000);
    one("CPL 0, 64-bit  ", 0, 0, k64loop_s, k64loop_e, 100000);
    /* list every stat name once, for reference */
    struct vm vm = vm_create();
    struct vcpu v = vcpu_create(&vm, 0);
    struct kp_stats st = stats_open(v.fd);
    printf("vCPU stat names:");
    for (uint32_t i = 0; st.fd >= 0 && i < st.h.num_desc; i++) printf(" %s", ((struct kvm_stats_desc *)((char *)st.d + i * st.dsz))->name);
    printf("\n");
    return 0;
}
