/*
 * probe_revoke.c - (question B4) is a memslot deletion synchronous for a vCPU that is running
 * inside KVM_RUN on another thread?
 *
 * A vCPU thread runs a guest loop that touches page P = 0x14000 and then increments a counter in
 * another (always mapped) page: `1: <access P>; inc %rbx; mov %rbx, 0x12008; jmp 1b`, with the
 * access a read, a write, or a call into P (fetch; P holds `ret`), at CPL 3 (native) or CPL 0
 * (emulated). The main thread waits until the counter moves, deletes P's memslot, and reads the
 * counter (c1) right after KVM_SET_USER_MEMORY_REGION returns. The vCPU must then stop at P
 * (KVM_EXIT_MMIO for data, an emulation failure for a fetch); the counter it left (c2) shows how
 * many loop iterations completed after the deletion returned: c2 - c1 <= 1 (the iteration in
 * flight, which touched P before the deletion) means the revocation was synchronous. Also
 * printed: when the vCPU's KVM_RUN returned relative to the deletion's return (negative =
 * before), and the deletion's duration. TRIALS (default 50) per case. Build with -lpthread.
 * Run: cc -O2 -Wall -o probe_revoke probe_revoke.c -lpthread && ./probe_revoke [TRIALS]
 */
#include "kvmprobe.h"
#include <pthread.h>
#include <stdatomic.h>

BLOB(g_rd, "1: mov 0x14000, %eax\n inc %rbx\n mov %rbx, 0x12008\n jmp 1b\n")
BLOB(g_wr, "1: mov %eax, 0x14000\n inc %rbx\n mov %rbx, 0x12008\n jmp 1b\n")
BLOB(g_fx, "mov $0x14000, %r12d\n1: call *%r12\n inc %rbx\n mov %rbx, 0x12008\n jmp 1b\n")

static struct vm vm;
static struct vcpu v;
static atomic_int phase; /* 0 idle, 1 run, 2 exited (main inspects), 3 quit */
static atomic_ullong exit_ns;
static int last_rc;

static void *vcpu_thread(void *arg) {
    (void)arg;
    for (;;) {
        while (atomic_load(&phase) == 0 || atomic_load(&phase) == 2) ;
        if (atomic_load(&phase) == 3) return NULL;
        int rc = vcpu_run(&v);
        atomic_store(&exit_ns, now_ns());
        last_rc = rc;
        atomic_store(&phase, 2);
    }
}

static void one_case(const char *label, const uint8_t *s, const uint8_t *e, int cpl, int trials) {
    vm = vm_create();
    guest_build(&vm);
    put_code(&vm, cpl ? G_UCODE : G_KCODE, s, e);
    vm.mem[0x14000] = 0xc3;
    v = vcpu_create(&vm, 0);
    vcpu_longmode(&v, cpl, cpl ? G_UCODE : G_KCODE, cpl ? G_USTACK_TOP : G_KSTACK_TOP);
    volatile uint64_t *ctr = (volatile uint64_t *)(vm.mem + 0x12008);
    atomic_store(&phase, 0);
    pthread_t th;
    pthread_create(&th, NULL, vcpu_thread, NULL);
    int late = 0, maxd = 0, stopped_at_p = 0;
    uint64_t *tdel = calloc((size_t)trials, 8);
    int64_t *rel = calloc((size_t)trials, 8);
    for (int i = 0; i < trials; i++) {
        uint64_t start = *ctr;
        atomic_store(&phase, 1);
        uint64_t deadline = now_ns() + 2000000000ull;
        while (*ctr < start + 1000 && now_ns() < deadline) ;
        if (atomic_load(&phase) == 2) { print_exit(&v, last_rc, "  vCPU stopped early: "); break; }
        uint64_t t0 = now_ns();
        page_mode(&vm, 0x14000, 0);
        uint64_t t1 = now_ns();
        uint64_t c1 = *ctr;
        while (atomic_load(&phase) != 2 && now_ns() < deadline) ;
        if (atomic_load(&phase) != 2) { printf("  trial %d: the vCPU did not stop within 2 s after the deletion\n", i); late++; break; }
        uint64_t c2 = *ctr;
        int d = (int)(c2 - c1);
        if (d > maxd) maxd = d;
        if (d > 1) late++;
        tdel[i] = t1 - t0;
        rel[i] = (int64_t)atomic_load(&exit_ns) - (int64_t)t1;
        struct kvm_regs r;
        ioctl(v.fd, KVM_GET_REGS, &r);
        int at_p = (last_rc == KVM_EXIT_MMIO && v.run->mmio.phys_addr == 0x14000) ||
                   (last_rc == KVM_EXIT_INTERNAL_ERROR && r.rip == 0x14000);
        stopped_at_p += at_p;
        if (i == 0) { print_exit(&v, last_rc, "  first trial's exit: "); }
        if (!at_p) { print_exit(&v, last_rc, "  unexpected exit: "); print_state(&v, "    "); break; }
        page_mode(&vm, 0x14000, 1);
        if (last_rc == KVM_EXIT_MMIO) memset(v.run->mmio.data, 0, 8);
        atomic_store(&phase, 0);
    }
    atomic_store(&phase, 3);
    pthread_join(th, NULL);
    int n = stopped_at_p;
    int64_t relmin = 0, relmax = 0;
    for (int i = 0; i < n; i++) { if (i == 0 || rel[i] < relmin) relmin = rel[i]; if (i == 0 || rel[i] > relmax) relmax = rel[i]; }
    printf("  %-18s %d trials stopped at P; iterations completed after the deletion returned: max %d (trials with > 1: %d); "
           "vCPU exit relative to the deletion's return: %+.1f .. %+.1f us\n", label, n, maxd, late, relmin / 1e3, relmax / 1e3);
    if (n > 2) report_us("    KVM_SET_USER_MEMORY_REGION (delete) while the vCPU runs", tdel, (size_t)n);
    free(tdel); free(rel);
    vcpu_destroy(&v);
    vm_destroy(&vm, 1);
}

int main(int argc, char **argv) {
    int trials = argc > 1 ? atoi(argv[1]) : 50;
    char la[128];
    loadavg(la, sizeof la);
    printf("probe_revoke: memslot deletion while the vCPU runs on another thread (loadavg %s)\n", la);
    one_case("CPL 3 read", g_rd_s, g_rd_e, 3, trials);
    one_case("CPL 3 write", g_wr_s, g_wr_e, 3, trials);
    one_case("CPL 3 fetch", g_fx_s, g_fx_e, 3, trials);
    one_case("CPL 0 read", g_rd_s, g_rd_e, 0, trials);
    one_case("CPL 0 write", g_wr_s, g_wr_e, 0, trials);
    one_case("CPL 0 fetch", g_fx_s, g_fx_e, 0, trials);
    return 0;
}
