/*
 * probe_memslot.c - (question B3) alternatives to memslot layouts, and the cost of memslot changes.
 *
 * 1. mprotect() of a guest page in the host mapping after the guest has used it: PROT_NONE then a
 *    guest read, write, or fetch at CPL 3 (native) and at CPL 0 (emulated); PROT_READ then a
 *    write. Printed: KVM_RUN's return (errno), exit_reason, the KVM_EXIT_MEMORY_FAULT fields
 *    (flags, gpa, size), rip; then whether the guest continues once the protection is restored.
 * 2. Cost of deleting and re-creating one 4 KiB memslot, and what the guest pays afterwards: a
 *    CPL 3 loop reads W = 256 pages (1 MiB, one read per page, then int3); per round: delete
 *    slot, create slot (each timed), run the loop (timed) and the vCPU stats pf_taken/pf_fixed
 *    delta (the pages that faulted in again). With KVM's SLOT_ZAP_ALL quirk on (default) and off
 *    (KVM_CAP_DISABLE_QUIRKS2), with 64 + 1 memslots and with 512 one-page memslots. Reference
 *    rounds without a slot change give the warm loop time. ROUNDS (default 200) each.
 * Run: cc -O2 -Wall -o probe_memslot probe_memslot.c && ./probe_memslot [ROUNDS]
 */
#include "kvmprobe.h"

BLOB(u_rd, "1: mov 0x14000, %eax\n int3\n jmp 1b\n")
BLOB(u_wr, "1: mov %eax, 0x14000\n int3\n jmp 1b\n")
BLOB(u_fx, "1: mov $0x14000, %eax\n call *%rax\n int3\n jmp 1b\n")
BLOB(k_rd, "1: mov 0x14000, %eax\n out %al, $0xE0\n jmp 1b\n")
BLOB(k_wr, "1: mov %eax, 0x14000\n out %al, $0xE0\n jmp 1b\n")
BLOB(k_fx, "1: mov $0x14000, %eax\n call *%rax\n out %al, $0xE0\n jmp 1b\n")
BLOB(u_ws, "1: mov $0x40000, %rsi\n2: mov (%rsi), %eax\n add $0x1000, %rsi\n cmp $0x140000, %rsi\n jb 2b\n int3\n jmp 1b\n")

static void mprot_case(const char *label, const uint8_t *s, const uint8_t *e, int cpl, int prot) {
    struct vm vm = vm_create();
    guest_build(&vm);
    put_code(&vm, cpl ? G_UCODE : G_KCODE, s, e);
    vm.mem[0x14000] = 0xc3; /* ret, for the fetch case */
    struct vcpu v = vcpu_create(&vm, 0);
    vcpu_longmode(&v, cpl, cpl ? G_UCODE : G_KCODE, cpl ? G_USTACK_TOP : G_KSTACK_TOP);
    int rc = vcpu_run_timeout(&v, 300); /* warm: one pass with the page accessible */
    int warm_ok = rc == KVM_EXIT_IO;
    mprotect(vm.mem + 0x14000, 0x1000, prot);
    rc = vcpu_run_timeout(&v, 300);
    int err = rc < 0 ? -rc : 0;
    struct kvm_regs r;
    ioctl(v.fd, KVM_GET_REGS, &r);
    uint64_t *mf = (uint64_t *)&v.run->hypercall;
    printf("  %-30s %s: rip %#llx%s, KVM_RUN %s, exit_reason %u (%s)", label, prot == PROT_NONE ? "PROT_NONE" : "PROT_READ", r.rip,
           warm_ok ? "" : " (warm-up run failed)", err ? strerror(err) : "ok", v.run->exit_reason, exit_name(v.run->exit_reason));
    if (v.run->exit_reason == KVM_EXIT_MEMORY_FAULT) printf(" flags %#lx gpa %#lx size %#lx\n", (unsigned long)mf[0], (unsigned long)mf[1], (unsigned long)mf[2]);
    else if (!err) print_exit(&v, rc, ":");
    else printf("\n");
    mprotect(vm.mem + 0x14000, 0x1000, PROT_READ | PROT_WRITE);
    rc = vcpu_run_timeout(&v, 300);
    printf("  %-30s   after restoring PROT_READ|WRITE: ", "");
    print_exit(&v, rc, "");
    vcpu_destroy(&v);
    vm_destroy(&vm, 1);
}

static void slot_cost(int rounds, int noquirk, int many) {
    struct vm vm = vm_create();
    if (noquirk) {
        struct kvm_enable_cap eq = {.cap = KVM_CAP_DISABLE_QUIRKS2, .args = {KVM_X86_QUIRK_SLOT_ZAP_ALL}};
        if (ioctl(vm.fd, KVM_ENABLE_CAP, &eq) < 0) DIE("DISABLE_QUIRKS2");
    }
    if (many) { /* replace the big slot by one slot per page */
        set_slot(&vm, G_BIG_SLOT, G_SMALL_PAGES << 12, 0, vm.mem + (G_SMALL_PAGES << 12), 0);
        for (uint32_t p = G_SMALL_PAGES; p < G_RAM >> 12; p++) set_slot(&vm, 1000 + p, (uint64_t)p << 12, 0x1000, vm.mem + ((size_t)p << 12), 0);
    }
    guest_build(&vm);
    for (uint64_t p = 0x40; p < 512; p++) *q(&vm, G_PT + 8 * p) |= 4; /* user pages */
    put_code(&vm, G_UCODE, u_ws_s, u_ws_e);
    struct vcpu v = vcpu_create(&vm, 0);
    vcpu_longmode(&v, 3, G_UCODE, G_USTACK_TOP);
    struct kp_stats st = stats_open(v.fd);
    uint64_t *tdel = calloc((size_t)rounds, 8), *tadd = calloc((size_t)rounds, 8), *trun = calloc((size_t)rounds, 8),
             *twarm = calloc((size_t)rounds, 8);
    uint64_t faults = 0, fixed = 0;
    for (int i = 0; i < 3; i++) { vcpu_run(&v); vcpu_run(&v); } /* warm: loop + stub OUT */
    for (int i = 0; i < rounds; i++) {
        /* reference: a warm pass */
        uint64_t t0 = now_ns();
        int rc = vcpu_run(&v);
        if (!is_out(&v, rc, PORT_EXC)) { print_exit(&v, rc, "  unexpected: "); break; }
        twarm[i] = now_ns() - t0;
        /* toggle the slot of page 0x1F000 (not touched by the loop) */
        t0 = now_ns();
        page_mode(&vm, 0x1F000, 0);
        uint64_t t1 = now_ns();
        page_mode(&vm, 0x1F000, 1);
        uint64_t t2 = now_ns();
        tdel[i] = t1 - t0; tadd[i] = t2 - t1;
        uint64_t f0 = stat_get(&st, "pf_taken"), x0 = stat_get(&st, "pf_fixed");
        t0 = now_ns();
        rc = vcpu_run(&v);
        if (!is_out(&v, rc, PORT_EXC)) { print_exit(&v, rc, "  unexpected: "); break; }
        trun[i] = now_ns() - t0;
        faults += stat_get(&st, "pf_taken") - f0;
        fixed += stat_get(&st, "pf_fixed") - x0;
    }
    char hdr[128];
    snprintf(hdr, sizeof hdr, "SLOT_ZAP_ALL %s, %s", noquirk ? "off" : "on ", many ? "512 one-page slots + 64" : "64 one-page slots + 1");
    printf("  [%s] per round: pf_taken %.1f, pf_fixed %.1f after the toggle (W = 256 pages read)\n", hdr, (double)faults / rounds,
           (double)fixed / rounds);
    char l[160];
    snprintf(l, sizeof l, "%s: delete one slot", hdr); report_us(l, tdel, (size_t)rounds);
    snprintf(l, sizeof l, "%s: create one slot", hdr); report_us(l, tadd, (size_t)rounds);
    snprintf(l, sizeof l, "%s: loop run, warm", hdr); report_us(l, twarm, (size_t)rounds);
    snprintf(l, sizeof l, "%s: loop run after the toggle", hdr); report_us(l, trun, (size_t)rounds);
    printf("      => (p50 after - p50 warm) / pf_fixed per round = %.2f us per refaulted page\n",
           fixed ? (double)((int64_t)trun[rounds / 2] - (int64_t)twarm[rounds / 2]) / 1e3 / ((double)fixed / rounds) : 0.0);
    free(tdel); free(tadd); free(trun); free(twarm);
    vcpu_destroy(&v);
    vm_destroy(&vm, 1);
}

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 200;
    char la[128];
    loadavg(la, sizeof la);
    printf("probe_memslot (loadavg %s)\n[1] mprotect() of the page 0x14000 in the host mapping, after the guest used it\n", la);
    mprot_case("CPL 3 read", u_rd_s, u_rd_e, 3, PROT_NONE);
    mprot_case("CPL 3 write", u_wr_s, u_wr_e, 3, PROT_NONE);
    mprot_case("CPL 3 fetch", u_fx_s, u_fx_e, 3, PROT_NONE);
    mprot_case("CPL 3 write", u_wr_s, u_wr_e, 3, PROT_READ);
    mprot_case("CPL 0 read", k_rd_s, k_rd_e, 0, PROT_NONE);
    mprot_case("CPL 0 write", k_wr_s, k_wr_e, 0, PROT_NONE);
    mprot_case("CPL 0 fetch", k_fx_s, k_fx_e, 0, PROT_NONE);
    mprot_case("CPL 0 write", k_wr_s, k_wr_e, 0, PROT_READ);
    printf("[2] one memslot deleted and re-created, then a CPL 3 pass over 256 pages (%d rounds)\n", rounds);
    slot_cost(rounds, 0, 0);
    slot_cost(rounds, 1, 0);
    slot_cost(rounds, 0, 1);
    slot_cost(rounds, 1, 1);
    return 0;
}
