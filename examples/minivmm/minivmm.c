/* minivmm.c - a QEMU-style VMM on NPTKit: its own vCPU loop (npt_vcpu_run_raw + npt_handle_exit),
 * one thread per vCPU, a guest under an MBEC policy that writes an NVDIMM and flushes it through the
 * virtual flush hint (the core traps and propagates each flush), privileged-mode requests served by a
 * handler in the special region, and a report of what happened.
 *
 * Build (installed library):  cc -std=c11 minivmm.c $(pkg-config --cflags --libs nptkit) -pthread -o minivmm
 * Run:                        ./minivmm [VCPUS]
 *
 * The KVM plugin is loaded by its bare name (the library finds it in its plugin directory); the guest
 * below is written in the simulator's ISA (docs/guest-isa.md), so it runs on the built-in simulator;
 * the plugin's load (or why it failed) is reported. Exit status 0 only if every flush and every
 * privileged-mode request was served and no exit was left unexplained. */
#include <nptkit.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define RAM (16u << 20)
#define CODE 0x1000ull
#define NVDIMM_GPA 0x40000000ull
#define REGION 0x80000000ull
#define ROUNDS 8
#define PORT_DONE 1
#define PORT_PRIV 9

static void emit(uint8_t *p, size_t *off, uint8_t op, uint8_t a, uint8_t b, int32_t imm) {
    uint32_t u = (uint32_t)imm;
    uint8_t ins[8] = {op, a, b, 0, (uint8_t)u, (uint8_t)(u >> 8), (uint8_t)(u >> 16), (uint8_t)(u >> 24)};
    memcpy(p + *off, ins, 8);
    *off += 8;
}
/* ra = a 64-bit constant (MOVI takes a sign-extended 32-bit immediate, MOVHI the high half). */
static void load64(uint8_t *p, size_t *off, uint8_t a, uint64_t v) {
    emit(p, off, 0x01, a, 0, (int32_t)(uint32_t)v);
    emit(p, off, 0x02, a, 0, (int32_t)(uint32_t)(v >> 32));
}

typedef struct {
    npt_vcpu *cpu;
    uint32_t index;
    unsigned exits, resumed, privileged_runs, unexpected;
    int rounds_done;
} vcpu_thread;

static atomic_int stop;

static void *vcpu_loop(void *arg) {
    vcpu_thread *t = arg;
    npt_exit e;
    memset(&e, 0, sizeof e);
    e.size = sizeof e;
    while (!atomic_load(&stop)) {
        if (npt_vcpu_run_raw(t->cpu, &e) != NPT_OK) { t->unexpected++; fprintf(stderr, "vcpu %u: %s\n", t->index, npt_last_error()); break; }
        t->exits++;
        uint32_t action = 0;
        if (npt_handle_exit(t->cpu, &e, &action) != NPT_OK) { t->unexpected++; fprintf(stderr, "vcpu %u: %s\n", t->index, npt_last_error()); break; }
        if (action == NPT_ACTION_RESUME) { t->resumed++; continue; }
        if (action == NPT_ACTION_REPORT_VIOLATION) { t->unexpected++; fprintf(stderr, "vcpu %u: MBEC violation at %#llx\n", t->index, (unsigned long long)e.gpa); break; }
        /* NPT_ACTION_TOOL: ours to handle, as QEMU's loop handles KVM_EXIT_IO. */
        if (e.reason == NPT_EXIT_IO && e.io_port == PORT_DONE) t->rounds_done = (int)e.io_value;
        else if (e.reason == NPT_EXIT_IO && e.io_port == PORT_PRIV) t->privileged_runs++;
        else if (e.reason != NPT_EXIT_BUDGET && e.reason != NPT_EXIT_KICKED) { t->unexpected++; fprintf(stderr, "vcpu %u: exit %u\n", t->index, e.reason); break; }
    }
    return NULL;
}

#define TRY(call) do { npt_status s_ = (call); if (s_ != NPT_OK) { fprintf(stderr, "minivmm: %s: %s\n", #call, npt_last_error()); return 1; } } while (0)

int main(int argc, char **argv) {
    unsigned nvcpus = argc > 1 ? (unsigned)atoi(argv[1]) : 2;
    if (nvcpus < 1 || nvcpus > 16) { fprintf(stderr, "usage: %s [VCPUS 1-16]\n", argv[0]); return 2; }
    printf("minivmm: libnptkit ABI %u.%u (built against %u.%u)\n", npt_abi_version() >> 16, npt_abi_version() & 0xffff,
           NPT_ABI_VERSION_MAJOR, NPT_ABI_VERSION_MINOR);
    npt_context *ctx;
    TRY(npt_context_create(&ctx));
    const char *kvm = NULL;
    if (npt_plugin_load(ctx, "libnptkit-kvm.so", &kvm) == NPT_OK) printf("plugin: loaded backend '%s' from the plugin directory\n", kvm);
    else printf("plugin: not loaded (%s)\n", npt_last_error());

    npt_vm_config cfg = {sizeof cfg, NPT_MBEC_EXACT, "sim", RAM, NPT_PERM_READ | NPT_PERM_WRITE, 5000, NULL};
    npt_vm *vm;
    TRY(npt_vm_create(ctx, &cfg, &vm));
    printf("vm: backend 'sim' (the guest is simulator-ISA code), MBEC exact, %u vCPUs\n", nvcpus);

    /* NVDIMM: the first host region backs 1 MiB at NVDIMM_GPA; the core allocates the vFHA. */
    npt_host_pmem_region hr;
    memset(&hr, 0, sizeof hr);
    hr.size = sizeof hr;
    TRY(npt_vm_host_pmem_get(vm, 0, &hr));
    npt_nvdimm nd = {sizeof nd, hr.id, NVDIMM_GPA, 1u << 20, 0};
    TRY(npt_vm_add_nvdimm(vm, &nd));
    npt_flush_hint_info fh;
    memset(&fh, 0, sizeof fh);
    fh.size = sizeof fh;
    TRY(npt_vm_get_flush_hint(vm, &fh));
    printf("nvdimm: host region %u, vFHA %#llx, %s, %u physical flush hint(s)\n", hr.id, (unsigned long long)fh.vfha,
           fh.trapped ? "trapped" : "not trapped", fh.target_count);

    /* Guest (paging off, CPL 0): ROUNDS times { store a record, CLWB, SFENCE, write the vFHA };
     * then OUT the round count on PORT_DONE and spin. r0 = the vCPU's index. */
    uint8_t code[512];
    size_t n = 0;
    load64(code, &n, 2, NVDIMM_GPA);
    load64(code, &n, 4, fh.vfha);
    emit(code, &n, 0x01, 5, 0, ROUNDS);  /* r5 = ROUNDS */
    emit(code, &n, 0x01, 3, 0, 0);       /* r3 = 0 */
    const size_t loop = n;
    emit(code, &n, 0x05, 3, 0, 1);       /* ADDI r3, 1 */
    emit(code, &n, 0x07, 2, 3, 0);       /* STORE [r2], r3 (each vCPU its own line: r2 += 64 * index below) */
    emit(code, &n, 0x14, 2, 0, 0);       /* CLWB [r2] */
    emit(code, &n, 0x15, 0, 0, 0);       /* SFENCE */
    emit(code, &n, 0x07, 4, 3, 0);       /* STORE [vFHA], r3: the flush */
    emit(code, &n, 0x05, 5, 0, -1);      /* ADDI r5, -1 */
    emit(code, &n, 0x0B, 5, 0, (int32_t)(loop - (n + 8))); /* JNZ r5, loop */
    emit(code, &n, 0x0F, 3, 0, PORT_DONE);
    emit(code, &n, 0x08, 0, 0, -8);      /* spin */
    TRY(npt_vm_write_memory(vm, CODE, code, n));
    /* The MBEC policy: the code page executable (paging off: user-mode addresses, so Xu), data not. */
    TRY(npt_policy_set(vm, CODE, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_UX));

    /* The privileged mode's handler: report on PORT_PRIV, RSM. */
    uint8_t handler[16];
    size_t h = 0;
    emit(handler, &h, 0x0F, 0, 0, PORT_PRIV);
    emit(handler, &h, 0x13, 0, 0, 0);
    npt_region region = {sizeof region, 0, REGION, 0x1000, handler, h, 0, 0};
    TRY(npt_region_set(vm, &region));

    vcpu_thread th[16];
    pthread_t tid[16];
    for (unsigned i = 0; i < nvcpus; i++) {
        memset(&th[i], 0, sizeof th[i]);
        th[i].index = i;
        TRY(npt_vcpu_create(vm, i, &th[i].cpu));
        npt_regs r;
        memset(&r, 0, sizeof r);
        r.size = sizeof r;
        r.rip = CODE;
        r.gpr[0] = i;
        TRY(npt_vcpu_set_regs(th[i].cpu, &r));
        pthread_create(&tid[i], NULL, vcpu_loop, &th[i]);
    }
    const unsigned requests = 3 * nvcpus;
    for (unsigned k = 0; k < requests; k++) TRY(npt_vcpu_raise_privileged(th[k % nvcpus].cpu));
    npt_privileged_stats ps;
    memset(&ps, 0, sizeof ps);
    ps.size = sizeof ps;
    for (int spins = 0; spins < 20000; spins++) {
        int64_t holder = 0;
        TRY(npt_vm_get_privileged_stats(vm, &ps));
        int all_done = ps.entries >= requests && npt_vm_privileged_holder(vm, &holder) == NPT_OK && holder == -1;
        for (unsigned i = 0; i < nvcpus; i++) all_done = all_done && th[i].rounds_done == ROUNDS;
        if (all_done) break;
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
    }
    atomic_store(&stop, 1);
    for (unsigned i = 0; i < nvcpus; i++) pthread_join(tid[i], NULL);

    npt_flush_stats fs;
    memset(&fs, 0, sizeof fs);
    fs.size = sizeof fs;
    TRY(npt_vm_get_flush_stats(vm, &fs));
    unsigned unexpected = 0, privileged_runs = 0;
    for (unsigned i = 0; i < nvcpus; i++) {
        printf("vcpu %u: %u exits (%u resumed by the core), %d rounds, privileged handler ran %u times\n", i, th[i].exits,
               th[i].resumed, th[i].rounds_done, th[i].privileged_runs);
        unexpected += th[i].unexpected;
        privileged_runs += th[i].privileged_runs;
    }
    printf("privileged mode: %llu requests, %llu entries, %llu failures\n", (unsigned long long)ps.requests,
           (unsigned long long)ps.entries, (unsigned long long)ps.failures);
    printf("nvdimm flushes: %llu guest flushes, %llu physical flushes, %llu coalesced\n",
           (unsigned long long)fs.guest_flushes, (unsigned long long)fs.physical_flushes, (unsigned long long)fs.coalesced);
    int ok = unexpected == 0 && ps.entries == requests && ps.failures == 0 && privileged_runs == requests &&
             fs.guest_flushes == (uint64_t)ROUNDS * nvcpus;
    for (unsigned i = 0; i < nvcpus; i++) { ok = ok && th[i].rounds_done == ROUNDS; TRY(npt_vcpu_destroy(th[i].cpu)); }
    TRY(npt_vm_destroy(vm));
    TRY(npt_context_destroy(ctx));
    printf("minivmm: %s\n", ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
}
