/* test_calltrace.c - a program whose calls are traced (NPTKIT_CALL_TRACE) and replayed
 * (nptkit-cli replay-calls): one call of nearly every kind of parameter the table knows (handles
 * made and passed, strings in and out, input structs with pointer members, in/out structs, input
 * and output buffers, arrays in and out, a callback, output scalars) and calls that fail (their
 * status and npt_last_error() are compared too), then THREADS threads at once, each with a VM of its
 * own and enough calls to fill its trace buffer at least once (the records reach the file in
 * per-thread blocks; replay-calls puts them back in call order by their sequence numbers and must
 * see THREADS + 1 recorded threads). Tests/C/run.sh runs it traced, replays the trace, then replays
 * mutated copies.
 *
 * The workload itself checks what it can (a failing check exits non-zero before the replay). */
#include <nptkit.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>

static int failures;
#define CHECK(c) do { if (!(c)) { failures++; fprintf(stderr, "test_calltrace:%d: %s (%s)\n", __LINE__, #c, npt_last_error()); } } while (0)

#define THREADS 4
#define THREAD_CALLS 700 /* policy_set + policy_get pairs: ~90 KiB of records per thread (its buffer: 64 KiB) */
static atomic_int thread_failures;

/* A VM of its own; pages made R, R|W, R|Xs, R|W|Xu in turn and read back. */
static void *worker(void *arg) {
    npt_context *ctx = arg;
    npt_vm_config cfg = {sizeof cfg, NPT_MBEC_EXACT, "sim", 16u << 20, NPT_PERM_READ | NPT_PERM_WRITE, 1000, NULL};
    npt_vm *vm = NULL;
    if (npt_vm_create(ctx, &cfg, &vm) != NPT_OK) { atomic_fetch_add(&thread_failures, 1); return NULL; }
    static const uint64_t kinds[4] = {NPT_PERM_READ, NPT_PERM_READ | NPT_PERM_WRITE, NPT_PERM_READ | NPT_PERM_SX,
                                      NPT_PERM_READ | NPT_PERM_WRITE | NPT_PERM_UX};
    for (uint64_t i = 0; i < THREAD_CALLS; i++) {
        uint64_t gpa = (i % 1024) << 12, want = kinds[i % 4], got = 0;
        if (npt_policy_set(vm, gpa, 0x1000, NPT_PAGE_4K, want) != NPT_OK || npt_policy_get(vm, gpa, &got) != NPT_OK ||
            got != want)
            atomic_fetch_add(&thread_failures, 1);
    }
    if (npt_vm_destroy(vm) != NPT_OK) atomic_fetch_add(&thread_failures, 1);
    return NULL;
}

static unsigned leaves;
static void on_leaf(uint64_t gpa, uint64_t size, uint64_t perms, void *user) {
    (void)gpa; (void)size; (void)perms;
    ++*(unsigned *)user;
}

/* One sim-ISA instruction: opcode, a, b, 0, imm32 (docs/guest-isa.md). */
static void emit(uint8_t *p, size_t *off, uint8_t op, uint8_t a, int32_t imm) {
    uint32_t u = (uint32_t)imm;
    uint8_t ins[8] = {op, a, 0, 0, (uint8_t)u, (uint8_t)(u >> 8), (uint8_t)(u >> 16), (uint8_t)(u >> 24)};
    memcpy(p + *off, ins, 8);
    *off += 8;
}

int main(void) {
    npt_context *ctx = NULL;
    npt_vm *vm = NULL;
    npt_vcpu *cpu = NULL;
    CHECK(npt_abi_version() >> 16 == 1);
    CHECK(npt_context_create(&ctx) == NPT_OK);
    size_t n = 0;
    CHECK(npt_backend_count(ctx, &n) == NPT_OK && n >= 1);
    npt_backend_info info;
    memset(&info, 0, sizeof info);
    info.size = sizeof info;
    CHECK(npt_backend_get(ctx, 0, &info) == NPT_OK);
    CHECK(npt_backend_get(ctx, 99, &info) == NPT_ERR_NOT_FOUND);
    CHECK(npt_backend_set_default(ctx, "no-such-backend") == NPT_ERR_NOT_FOUND);
    uint64_t missing = 7;
    CHECK(npt_mbec_mode_check(ctx, "sim", NPT_MBEC_EXACT, &missing) == NPT_OK && missing == 0);
    (void)npt_status_string(NPT_ERR_MISALIGNED);

    npt_sim_platform plat = {sizeof plat, 0, 0, NULL, 0};
    CHECK(npt_sim_set_platform(ctx, &plat) == NPT_OK);
    npt_vm_config cfg = {sizeof cfg, NPT_MBEC_EXACT, "sim", 16u << 20, NPT_PERM_READ | NPT_PERM_WRITE, 1000, NULL};
    CHECK(npt_vm_create(ctx, &cfg, &vm) == NPT_OK);
    npt_vm_config bad = cfg;
    bad.ram_size = 12345;
    npt_vm *none = NULL;
    CHECK(npt_vm_create(ctx, &bad, &none) != NPT_OK);

    /* Memory and policy. */
    uint8_t prog[64];
    size_t off = 0;
    emit(prog, &off, 0x01, 0, 42); /* MOVI r0, 42 */
    emit(prog, &off, 0x0F, 0, 1);  /* OUT 1, r0 */
    emit(prog, &off, 0x0E, 0, 0);  /* HLT */
    CHECK(npt_vm_write_memory(vm, 0x1000, prog, off) == NPT_OK);
    uint8_t back[64] = {0};
    CHECK(npt_vm_read_memory(vm, 0x1000, back, off) == NPT_OK && memcmp(back, prog, off) == 0);
    CHECK(npt_policy_set(vm, 0x1000, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_SX | NPT_PERM_UX) == NPT_OK);
    CHECK(npt_policy_set(vm, 0x1001, 0x1000, NPT_PAGE_4K, NPT_PERM_READ) == NPT_ERR_MISALIGNED);
    npt_policy_range ranges[2] = {{0x4000, 0x1000, NPT_PAGE_4K, NPT_PERM_READ}, {0x6000, 0x2000, NPT_PAGE_4K, NPT_PERM_ALL}};
    CHECK(npt_policy_set_ranges(vm, ranges, 2) == NPT_OK);
    ranges[1].gpa = 0x4000;
    CHECK(npt_policy_set_ranges(vm, ranges, 2) == NPT_ERR_OVERLAP);
    for (uint64_t g = 0; g < 0x8000; g += 0x1000) {
        uint64_t perms = 0;
        CHECK(npt_policy_get(vm, g, &perms) == NPT_OK);
    }
    uint64_t perms = 0;
    CHECK(npt_policy_get(vm, 1ull << 40, &perms) == NPT_ERR_OUT_OF_RANGE);
    npt_translation tr = {sizeof tr, 0, 0, 0, 0};
    CHECK(npt_hierarchy_translate(vm, NPT_HIERARCHY_USER, 0x1000, &tr) == NPT_OK);
    CHECK(npt_hierarchy_leaves(vm, NPT_HIERARCHY_SUPERVISOR, on_leaf, &leaves) == NPT_OK && leaves > 0);

    /* A vCPU runs the guest: the library loop, then the QEMU-style one. */
    CHECK(npt_vcpu_create(vm, 0, &cpu) == NPT_OK);
    npt_regs r;
    memset(&r, 0, sizeof r);
    r.size = sizeof r;
    CHECK(npt_vcpu_get_regs(cpu, &r) == NPT_OK);
    r.rip = 0x1000;
    r.cpl = 0;
    CHECK(npt_vcpu_set_regs(cpu, &r) == NPT_OK);
    npt_exit e;
    memset(&e, 0, sizeof e);
    e.size = sizeof e;
    CHECK(npt_vcpu_run(cpu, &e) == NPT_OK && e.reason == NPT_EXIT_IO && e.io_value == 42);
    uint32_t action = 99;
    for (int i = 0; i < 4; i++) {
        CHECK(npt_vcpu_run_raw(cpu, &e) == NPT_OK);
        CHECK(npt_handle_exit(cpu, &e, &action) == NPT_OK);
        if (e.reason == NPT_EXIT_HALT) break;
    }
    npt_stats st;
    memset(&st, 0, sizeof st);
    st.size = sizeof st;
    CHECK(npt_vm_get_stats(vm, &st) == NPT_OK && st.exits_total > 0);
    npt_backend_stat stats[64];
    size_t count = 0;
    CHECK(npt_vm_backend_stats(vm, NULL, 0, &count) == (count ? NPT_ERR_BUFFER_TOO_SMALL : NPT_OK));
    CHECK(npt_vcpu_backend_stats(cpu, stats, 64, &count) == NPT_OK);
    uint32_t isa = 0;
    CHECK(npt_vm_guest_isa(vm, &isa) == NPT_OK && isa == NPT_GUEST_ISA_SIM);

    /* Privileged mode: a region with contents (a pointer member of an input struct). */
    uint8_t handler[16];
    off = 0;
    emit(handler, &off, 0x13, 0, 0); /* RSM */
    npt_region reg = {sizeof reg, 0, 0x40000000ull, 0x1000, handler, off, 0, 0};
    CHECK(npt_region_set(vm, &reg) == NPT_OK);
    int64_t holder = 5;
    CHECK(npt_vm_privileged_holder(vm, &holder) == NPT_OK && holder == -1);
    CHECK(npt_vcpu_leave_privileged(cpu) == NPT_ERR_STATE);

    /* NVDIMM: discovery, a range, the NFIT asked for its size then copied. */
    size_t regions = 0;
    CHECK(npt_vm_host_pmem_count(vm, &regions) == NPT_OK && regions > 0);
    npt_host_pmem_region hr;
    memset(&hr, 0, sizeof hr);
    hr.size = sizeof hr;
    CHECK(npt_vm_host_pmem_get(vm, 0, &hr) == NPT_OK);
    npt_nvdimm nd = {sizeof nd, hr.id, 0x100000000ull, 2u << 20, 0};
    CHECK(npt_vm_add_nvdimm(vm, &nd) == NPT_OK);
    npt_flush_hint_info fh;
    memset(&fh, 0, sizeof fh);
    fh.size = sizeof fh;
    CHECK(npt_vm_get_flush_hint(vm, &fh) == NPT_OK);
    size_t needed = 0;
    CHECK(npt_vm_get_nfit(vm, NULL, 0, &needed) == NPT_ERR_BUFFER_TOO_SMALL && needed > 0);
    uint8_t nfit[4096];
    CHECK(needed <= sizeof nfit && npt_vm_get_nfit(vm, nfit, sizeof nfit, &needed) == NPT_OK);

    CHECK(npt_vcpu_destroy(cpu) == NPT_OK);
    CHECK(npt_vcpu_destroy(cpu) == NPT_ERR_BAD_HANDLE);
    CHECK(npt_vm_destroy(vm) == NPT_OK);
    CHECK(npt_policy_get(vm, 0, &perms) == NPT_ERR_BAD_HANDLE);

    /* Threads at once (their records interleave in the file by block). */
    pthread_t tid[THREADS];
    for (int i = 0; i < THREADS; i++) CHECK(pthread_create(&tid[i], NULL, worker, ctx) == 0);
    for (int i = 0; i < THREADS; i++) pthread_join(tid[i], NULL);
    CHECK(atomic_load(&thread_failures) == 0);
    CHECK(npt_context_destroy(ctx) == NPT_OK);
    printf("test_calltrace: %s (%u leaves)\n", failures ? "FAILED" : "ok", leaves);
    return failures != 0;
}
