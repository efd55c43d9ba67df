/* test_record_replay.c - recording through the C ABI (npt_vm_config.record_path, ABI 1.4) and the
 * replay of that trace by libnptkit-replay.so loaded with npt_plugin_load_with:
 *   - a run on the simulator recorded to a trace replays, on the "replay" backend, with the same
 *     exits, registers and statistics;
 *   - a record_path that cannot be created fails npt_vm_create with NPT_ERR_INVALID_ARGUMENT and a
 *     message naming the path, and creates no VM (the context can be destroyed at once);
 *   - a create that fails after its recording started (an unknown backend; a record_path that is a
 *     directory) leaves no file behind and an existing file at record_path unchanged;
 *   - a replay of another run (the guest's bytes changed) fails at the VMM's memory write, naming
 *     the event and the field that differs, and every later call fails too;
 *   - two vCPU threads and the VMM's thread recorded at once (one recorder written by three
 *     threads: its exit paths held back under its lock, the VMM's records written meanwhile)
 *     replay with the same output per vCPU;
 *   - the privileged mode with two vCPU threads that each stop on their own observation
 *     (npt_vcpu_privileged_view, ABI 1.6: a lock turn of that vCPU) while the VMM's thread raises
 *     the requests and waits on the VM-wide statistics (turns of the VMM): replayed, each thread
 *     makes the same number of runs, sees the same views and serves the same requests.
 * usage: test_record_replay REPLAY_PLUGIN SCRATCH_DIR
 *        test_record_replay --threads-only SCRATCH_DIR   (the threaded recordings alone, no replay:
 *                                                        the sanitizer rows of sanitize.sh) */
#include "check.h"
#include <dirent.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* Files in `dir` whose name contains `part`. */
static int count_files(const char *dir, const char *part) {
    DIR *d = opendir(dir);
    if (!d) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) n += strstr(e->d_name, part) != NULL;
    closedir(d);
    return n;
}

enum { OP_MOVI = 0x01, OP_JMPR = 0x09, OP_HLT = 0x0E, OP_OUT = 0x0F };

/* One 8-byte instruction of the simulator's ISA (docs/guest-isa.md). */
static void emit(uint8_t *buf, size_t *off, uint8_t op, uint8_t a, int32_t imm) {
    uint32_t u = (uint32_t)imm;
    uint8_t *p = buf + *off;
    p[0] = op; p[1] = a; p[2] = 0; p[3] = 0;
    p[4] = (uint8_t)u; p[5] = (uint8_t)(u >> 8); p[6] = (uint8_t)(u >> 16); p[7] = (uint8_t)(u >> 24);
    *off += 8;
}

#define CODE 0x1000u
#define STEPS 2000 /* instructions a run: the privileged run's loops come back to their threads */
#define NOEXEC 0x3000u /* readable, not executable: a fetch there is an MBEC violation */

struct outcome {
    uint32_t reasons[8];
    uint64_t values[8];
    size_t n;
    uint64_t violation_gpa, r0_at_halt;
    npt_stats st;
};

/* A VM of this file's runs (exact mode, 1 MiB, read-write by default) on `backend`, recorded to
 * `record` (NULL: not recorded); NULL, said on stderr, if it cannot be made. */
static npt_vm *make_vm(npt_context *ctx, const char *backend, const char *record, const char *what) {
    npt_vm_config cfg = {0};
    cfg.size = sizeof cfg;
    cfg.mbec_mode = NPT_MBEC_EXACT;
    cfg.backend = backend;
    cfg.ram_size = 1u << 20;
    cfg.default_perms = NPT_PERM_READ | NPT_PERM_WRITE;
    cfg.record_path = record;
    cfg.max_steps_per_run = STEPS;
    npt_vm *vm = NULL;
    if (npt_vm_create(ctx, &cfg, &vm) != NPT_OK) { fprintf(stderr, "    %s npt_vm_create: %s\n", what, npt_last_error()); return NULL; }
    return vm;
}

/* The run: OUT 11 on port 1, OUT `second` on port 2, a jump to NOEXEC (reported), then the VMM moves
 * rip to the HLT. `record`: the trace to record to (NULL: none). Returns 0 if every call worked. */
static int run(npt_context *ctx, const char *backend, const char *record, int32_t second, struct outcome *o) {
    memset(o, 0, sizeof *o);
    npt_vm *vm = make_vm(ctx, backend, record, "run");
    if (!vm) return -1;
    uint8_t prog[64];
    size_t off = 0;
    emit(prog, &off, OP_MOVI, 0, 11);
    emit(prog, &off, OP_OUT, 0, 1);
    emit(prog, &off, OP_MOVI, 0, second);
    emit(prog, &off, OP_OUT, 0, 2);
    emit(prog, &off, OP_MOVI, 2, NOEXEC);
    emit(prog, &off, OP_JMPR, 2, 0);
    const uint64_t hlt = CODE + off;
    emit(prog, &off, OP_HLT, 0, 0);
    npt_vcpu *cpu = NULL;
    int bad = 0;
    /* Paging off: every fetch is a user-mode one (the user-execute bit governs it). */
    if (npt_vm_write_memory(vm, CODE, prog, off) || npt_policy_set(vm, CODE, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_UX) ||
        npt_policy_set(vm, NOEXEC, 0x1000, NPT_PAGE_4K, NPT_PERM_READ) || npt_vcpu_create(vm, 0, &cpu)) {
        fprintf(stderr, "    setup: %s\n", npt_last_error());
        bad = 1;
    }
    npt_regs r;
    memset(&r, 0, sizeof r);
    r.size = sizeof r;
    r.rflags = 2;
    r.rip = CODE;
    if (!bad && npt_vcpu_set_regs(cpu, &r)) bad = 1;
    for (int i = 0; !bad && i < 8; i++) {
        npt_exit e;
        memset(&e, 0, sizeof e);
        e.size = sizeof e;
        if (npt_vcpu_run(cpu, &e)) { fprintf(stderr, "    npt_vcpu_run: %s\n", npt_last_error()); bad = 1; break; }
        o->reasons[o->n] = e.reason;
        o->values[o->n++] = e.reason == NPT_EXIT_IO ? e.io_value : e.gpa;
        if (e.reason == NPT_EXIT_MBEC_VIOLATION) {
            o->violation_gpa = e.gpa;
            if (npt_vcpu_get_regs(cpu, &r)) { bad = 1; break; }
            r.rip = hlt;
            if (npt_vcpu_set_regs(cpu, &r)) { bad = 1; break; }
        } else if (e.reason != NPT_EXIT_IO) {
            if (npt_vcpu_get_regs(cpu, &r)) { bad = 1; break; }
            o->r0_at_halt = r.gpr[0];
            break;
        }
    }
    o->st.size = sizeof o->st;
    if (!bad && npt_vm_get_stats(vm, &o->st)) bad = 1;
    if (npt_vm_destroy(vm)) bad = 1;
    return bad ? -1 : 0;
}

enum { OP_ADDI = 0x05, OP_JNZ = 0x0B, SMP_OUTS = 40, SMP_VMM_CALLS = 30 };

/* One vCPU of `smp`, driven by a thread of its own: the values it OUT on port 1. */
struct smp_cpu {
    npt_vcpu *cpu;
    uint64_t outs[SMP_OUTS + 8];
    size_t n;
    int bad, halted;
};

static void *smp_drive(void *p) {
    struct smp_cpu *c = p;
    for (int i = 0; i < 4 * SMP_OUTS; i++) {
        npt_exit e;
        memset(&e, 0, sizeof e);
        e.size = sizeof e;
        if (npt_vcpu_run(c->cpu, &e)) { fprintf(stderr, "    smp npt_vcpu_run: %s\n", npt_last_error()); c->bad = 1; return NULL; }
        if (e.reason == NPT_EXIT_IO) { if (c->n < SMP_OUTS + 8) c->outs[c->n++] = e.io_value; continue; }
        c->halted = e.reason == NPT_EXIT_HALT;
        return NULL;
    }
    return NULL;
}

/* Two vCPUs, each on its own thread: vCPU k OUTs k * 1000 + i on port 1 for i < SMP_OUTS, then
 * halts. Meanwhile the VMM's thread reads the VM's backend statistics and flips the policy of a
 * page no vCPU uses (an invalidation of both hierarchies each time), SMP_VMM_CALLS times each:
 * records of another thread written while the vCPUs run (whether one falls between a vCPU's exit
 * and its decision is up to the scheduler; RecorderOrderTests makes those cases on purpose).
 * `record`: the trace (NULL: none). Returns 0 if every call worked. */
static int smp(npt_context *ctx, const char *backend, const char *record, struct smp_cpu cpus[2]) {
    npt_vm *vm = make_vm(ctx, backend, record, "smp");
    if (!vm) return -1;
    int bad = 0;
    for (uint32_t k = 0; k < 2 && !bad; k++) {
        uint8_t prog[64];
        size_t off = 0;
        emit(prog, &off, OP_MOVI, 1, SMP_OUTS);
        emit(prog, &off, OP_MOVI, 0, (int32_t)(k * 1000));
        const size_t loop = off;
        emit(prog, &off, OP_OUT, 0, 1);
        emit(prog, &off, OP_ADDI, 0, 1);
        emit(prog, &off, OP_ADDI, 1, -1);
        emit(prog, &off, OP_JNZ, 1, (int32_t)loop - (int32_t)(off + 8));
        emit(prog, &off, OP_HLT, 0, 0);
        const uint64_t origin = CODE * (k + 1);
        memset(&cpus[k], 0, sizeof cpus[k]);
        npt_regs r;
        memset(&r, 0, sizeof r);
        r.size = sizeof r;
        r.rflags = 2;
        r.rip = origin;
        if (npt_vm_write_memory(vm, origin, prog, off) || npt_vcpu_create(vm, k, &cpus[k].cpu) || npt_vcpu_set_regs(cpus[k].cpu, &r)) {
            fprintf(stderr, "    smp setup: %s\n", npt_last_error());
            bad = 1;
        }
    }
    if (!bad && npt_policy_set(vm, CODE, 2 * 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_UX)) bad = 1;
    pthread_t t[2];
    int started = 0;
    for (; !bad && started < 2; started++) {
        if (pthread_create(&t[started], NULL, smp_drive, &cpus[started])) { bad = 1; break; }
    }
    for (int i = 0; !bad && i < SMP_VMM_CALLS; i++) {
        npt_backend_stat bs[16];
        size_t count = 0;
        if (npt_vm_backend_stats(vm, bs, 16, &count) ||
            npt_policy_set(vm, NOEXEC, 0x1000, NPT_PAGE_4K, i % 2 ? NPT_PERM_READ : NPT_PERM_READ | NPT_PERM_WRITE)) {
            fprintf(stderr, "    smp VMM call %d: %s\n", i, npt_last_error());
            bad = 1;
        }
        sched_yield();
    }
    for (int k = 0; k < started; k++) pthread_join(t[k], NULL);
    for (int k = 0; k < 2; k++) bad |= cpus[k].bad || !cpus[k].halted;
    if (npt_vm_destroy(vm)) bad = 1;
    return bad ? -1 : 0;
}

/* Each vCPU OUT its own values, in order, whatever the interleaving. */
static void check_smp(const struct smp_cpu cpus[2]) {
    for (uint32_t k = 0; k < 2; k++) {
        CHECK_EQ(cpus[k].n, SMP_OUTS);
        int ordered = cpus[k].n == SMP_OUTS;
        for (size_t i = 0; ordered && i < SMP_OUTS; i++) ordered = cpus[k].outs[i] == k * 1000 + i;
        CHECK(ordered);
    }
}

enum { OP_JMP = 0x08, OP_RSM = 0x13, PM_PORT = 9, PM_REQUESTS = 8, PM_MAX_RUNS = 200000 };
#define PM_REGION 0x80000000ull

/* One vCPU of `pm`: what its thread saw. */
struct pm_cpu {
    npt_vcpu *cpu;
    uint32_t index;
    uint64_t runs, entered, views, view_sum; /* runs made; handler OUTs (entries on it); views taken, a digest of them */
    npt_privileged_view last;
    int bad;
};

/* A vCPU thread of `pm`: runs its vCPU, and after each exit looks at the privileged mode through
 * its own view; stops once every request was served and no vCPU is in the mode. */
static void *pm_drive(void *p) {
    struct pm_cpu *c = p;
    while (c->runs < PM_MAX_RUNS) {
        npt_exit e;
        memset(&e, 0, sizeof e);
        e.size = sizeof e;
        if (npt_vcpu_run(c->cpu, &e)) { fprintf(stderr, "    pm npt_vcpu_run: %s\n", npt_last_error()); c->bad = 1; return NULL; }
        c->runs++;
        if (e.reason == NPT_EXIT_IO && e.io_port == PM_PORT) c->entered += e.io_value == c->index;
        else if (e.reason != NPT_EXIT_BUDGET) { fprintf(stderr, "    pm vCPU %u: exit %u\n", c->index, e.reason); c->bad = 1; return NULL; }
        npt_privileged_view v;
        memset(&v, 0, sizeof v);
        v.size = sizeof v;
        if (npt_vcpu_privileged_view(c->cpu, &v)) { fprintf(stderr, "    pm view: %s\n", npt_last_error()); c->bad = 1; return NULL; }
        c->views++;
        c->view_sum = c->view_sum * 31 + (uint64_t)(v.holder + 1) * 1000003 + v.requests * 1009 + v.entries * 17 + v.failures;
        c->last = v;
        if (v.entries + v.failures >= PM_REQUESTS && v.holder == -1) return NULL;
    }
    fprintf(stderr, "    pm vCPU %u: not done after %d runs\n", c->index, PM_MAX_RUNS);
    c->bad = 1;
    return NULL;
}

/* The privileged mode with two vCPU threads (a self-loop each; the region's handler OUTs the vCPU's
 * index on PM_PORT, then RSM) while this thread raises PM_REQUESTS enter-mode requests, alternately
 * on each vCPU, each once the one before was served (polled with npt_vm_get_privileged_stats: turns
 * of the VMM). `record`: the trace (NULL: none). Returns 0 if every call worked. */
static int pm(npt_context *ctx, const char *backend, const char *record, struct pm_cpu cpus[2]) {
    npt_vm *vm = make_vm(ctx, backend, record, "pm");
    if (!vm) return -1;
    uint8_t loop[16], handler[16];
    size_t lo = 0, ho = 0;
    emit(loop, &lo, OP_ADDI, 3, 1);
    emit(loop, &lo, OP_JMP, 0, -16);
    emit(handler, &ho, OP_OUT, 0, PM_PORT); /* r0: the vCPU's index, as the core enters it */
    emit(handler, &ho, OP_RSM, 0, 0);
    npt_region reg;
    memset(&reg, 0, sizeof reg);
    reg.size = sizeof reg;
    reg.gpa = PM_REGION;
    reg.length = 0x10000;
    reg.contents = handler;
    reg.contents_len = ho;
    int bad = npt_vm_write_memory(vm, CODE, loop, lo) || npt_policy_set(vm, CODE, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_UX) ||
              npt_region_set(vm, &reg) || npt_vm_set_stop_timeout(vm, UINT64_C(5000000000));
    for (uint32_t k = 0; k < 2 && !bad; k++) {
        memset(&cpus[k], 0, sizeof cpus[k]);
        cpus[k].index = k;
        npt_regs r;
        memset(&r, 0, sizeof r);
        r.size = sizeof r;
        r.rflags = 2;
        r.rip = CODE;
        if (npt_vcpu_create(vm, k, &cpus[k].cpu) || npt_vcpu_set_regs(cpus[k].cpu, &r)) bad = 1;
    }
    if (bad) fprintf(stderr, "    pm setup: %s\n", npt_last_error());
    /* A view refused for its size is no turn: it is made only while recording, so a turn it took
     * would be one the replay waits for and no thread takes. */
    npt_privileged_view small = {.size = 8};
    if (!bad && record && npt_vcpu_privileged_view(cpus[0].cpu, &small) != NPT_ERR_INVALID_ARGUMENT) bad = 1;
    pthread_t t[2];
    int started = 0;
    for (; !bad && started < 2; started++) {
        if (pthread_create(&t[started], NULL, pm_drive, &cpus[started])) { bad = 1; break; }
    }
    for (uint64_t k = 0; !bad && k < PM_REQUESTS; k++) {
        if (npt_vcpu_raise_privileged(cpus[k % 2].cpu)) { fprintf(stderr, "    pm raise: %s\n", npt_last_error()); bad = 1; break; }
        npt_privileged_stats st;
        for (int polls = 0;; polls++) {
            memset(&st, 0, sizeof st);
            st.size = sizeof st;
            if (npt_vm_get_privileged_stats(vm, &st)) { bad = 1; break; }
            if (st.entries + st.failures > k) break;
            if (polls > 50000) { fprintf(stderr, "    pm: request %" PRIu64 " not served\n", k); bad = 1; break; }
            sched_yield();
        }
    }
    for (int k = 0; k < started; k++) pthread_join(t[k], NULL);
    for (int k = 0; k < 2; k++) bad |= cpus[k].bad;
    if (npt_vm_destroy(vm)) bad = 1;
    return bad ? -1 : 0;
}

/* Each request served once, on the vCPU it was raised on; each thread stopped on a final view. */
static void check_pm(const struct pm_cpu cpus[2]) {
    for (uint32_t k = 0; k < 2; k++) {
        CHECK_EQ(cpus[k].entered, PM_REQUESTS / 2);
        CHECK(cpus[k].last.holder == -1 && cpus[k].last.requests == PM_REQUESTS && cpus[k].last.entries == PM_REQUESTS &&
              cpus[k].last.failures == 0);
        CHECK(cpus[k].views == cpus[k].runs && cpus[k].runs > PM_REQUESTS / 2);
    }
}

/* A context with the replay plugin loaded (npt_plugin_load_with) to replay `trace` in a session of
 * its own (a context registers one backend per name). */
static npt_context *replay_context(const char *plugin, const char *trace, const char *session) {
    npt_context *c = NULL;
    CHECK_OK(npt_context_create(&c));
    npt_plugin_arg a[2] = {{"trace", trace}, {"session", session}};
    const char *name = NULL;
    CHECK_OK(npt_plugin_load_with(c, plugin, a, 2, &name));
    CHECK(name != NULL && strcmp(name, "replay") == 0);
    return c;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "--threads-only") == 0) {
        char t[4096];
        snprintf(t, sizeof t, "%s/record-threads-%ld.trace", argv[2], (long)getpid());
        npt_context *ctx = NULL;
        CHECK_OK(npt_context_create(&ctx));
        for (int round = 0; round < 5; round++) {
            struct smp_cpu cpus[2];
            CHECK(smp(ctx, "sim", t, cpus) == 0);
            check_smp(cpus);
            CHECK(access(t, R_OK) == 0);
            struct pm_cpu pcpus[2];
            CHECK(pm(ctx, "sim", t, pcpus) == 0);
            check_pm(pcpus);
        }
        CHECK_OK(npt_context_destroy(ctx));
        unlink(t);
        printf("test_record_replay --threads-only: %d passed, %d failed, %d skipped\n", passed, failed, skipped);
        return failed ? 1 : 0;
    }
    if (argc != 3) { fprintf(stderr, "usage: %s REPLAY_PLUGIN SCRATCH_DIR\n", argv[0]); return 2; }
    char trace[4096], other[4096];
    snprintf(trace, sizeof trace, "%s/record-replay-%ld.trace", argv[2], (long)getpid());
    snprintf(other, sizeof other, "%s/no-such-dir-%ld/x.trace", argv[2], (long)getpid());

    /* Recorded on sim through the C ABI. */
    npt_context *ctx = NULL;
    CHECK_OK(npt_context_create(&ctx));
    struct outcome rec, plain;
    CHECK(run(ctx, "sim", trace, 22, &rec) == 0);
    CHECK(run(ctx, "sim", NULL, 22, &plain) == 0);
    CHECK_EQ(rec.n, 4); /* IO 11, IO 22, the violation, HLT */
    CHECK(rec.n == 4 && rec.values[0] == 11 && rec.values[1] == 22 && rec.reasons[2] == NPT_EXIT_MBEC_VIOLATION &&
          rec.reasons[3] == NPT_EXIT_HALT);
    CHECK_EQ(rec.violation_gpa, NOEXEC);
    CHECK_EQ(rec.r0_at_halt, 22);
    CHECK(memcmp(&rec, &plain, sizeof rec) == 0); /* recording changes nothing the VMM sees */
    CHECK(access(trace, R_OK) == 0);

    /* A bad record_path: a clear error, no VM. */
    npt_vm_config cfg = {0};
    cfg.size = sizeof cfg;
    cfg.mbec_mode = NPT_MBEC_EXACT;
    cfg.ram_size = 1u << 20;
    cfg.default_perms = NPT_PERM_READ | NPT_PERM_WRITE;
    cfg.max_steps_per_run = STEPS; /* as make_vm: the replay of `trace` below gets that far */
    cfg.record_path = other;
    npt_vm *vm = NULL;
    CHECK_ST(npt_vm_create(ctx, &cfg, &vm), NPT_ERR_INVALID_ARGUMENT);
    CHECK(vm == NULL);
    CHECK(strstr(npt_last_error(), "cannot record to") != NULL && strstr(npt_last_error(), other) != NULL);

    /* A create that fails once its recording has started: nothing left behind, nothing changed. */
    char kept[4096], fresh[4096], mark[64];
    snprintf(kept, sizeof kept, "%s/record-replay-%ld-kept.trace", argv[2], (long)getpid());
    snprintf(fresh, sizeof fresh, "%s/record-replay-%ld-fresh.trace", argv[2], (long)getpid());
    snprintf(mark, sizeof mark, "record-replay-%ld-", (long)getpid());
    FILE *f = fopen(kept, "w");
    CHECK(f != NULL);
    if (f) { fputs("not a trace: must survive", f); fclose(f); }
    cfg.backend = "no-such-backend";
    cfg.record_path = kept;
    CHECK(npt_vm_create(ctx, &cfg, &vm) != NPT_OK);
    CHECK(vm == NULL);
    char back[64] = {0};
    f = fopen(kept, "r");
    CHECK(f != NULL);
    if (f) { CHECK(fgets(back, sizeof back, f) != NULL); fclose(f); }
    CHECK(strcmp(back, "not a trace: must survive") == 0);
    cfg.record_path = fresh;
    CHECK(npt_vm_create(ctx, &cfg, &vm) != NPT_OK);
    CHECK(access(fresh, F_OK) != 0);
    cfg.backend = NULL;
    cfg.record_path = argv[2]; /* a directory: the VM is made, the rename fails, the VM is destroyed */
    CHECK_ST(npt_vm_create(ctx, &cfg, &vm), NPT_ERR_INVALID_ARGUMENT);
    CHECK(vm == NULL);
    CHECK(strstr(npt_last_error(), "cannot record to") != NULL && strstr(npt_last_error(), argv[2]) != NULL);
    CHECK_EQ(count_files(argv[2], ".partial-"), 0);
    CHECK_EQ(count_files(argv[2], mark), 1); /* kept only */
    unlink(kept);
    CHECK_OK(npt_context_destroy(ctx)); /* NPT_ERR_BUSY if a VM had been created */

    /* Replayed: the plugin loaded with arguments, the same run on "replay". */
    npt_context *rctx = replay_context(argv[1], trace, "c-replay");
    struct outcome rep;
    CHECK(run(rctx, "replay", NULL, 22, &rep) == 0);
    CHECK(memcmp(&rep, &rec, sizeof rep) == 0);
    CHECK_EQ(rep.st.instructions, rec.st.instructions); /* the simulator's count, from the trace */
    CHECK(rec.st.instructions > 0);

    /* Another run against the same trace (the guest's second OUT changed): the memory write
     * diverges, naming the event and the digest that differs; every later call fails too (a
     * context of its own: a context registers one backend per name). */
    CHECK_OK(npt_context_destroy(rctx));
    rctx = replay_context(argv[1], trace, "c-replay-other");
    cfg.record_path = NULL;
    cfg.backend = "replay";
    CHECK_OK(npt_vm_create(rctx, &cfg, &vm));
    uint8_t prog[16];
    size_t off = 0;
    emit(prog, &off, OP_MOVI, 0, 11);
    emit(prog, &off, OP_OUT, 0, 3);
    if (vm) {
        CHECK_ST(npt_vm_write_memory(vm, CODE, prog, off), NPT_ERR_STATE);
        const char *m = npt_last_error();
        CHECK(strstr(m, "diverged at event ") != NULL);
        CHECK(strstr(m, "differs in: length 0x38 -> 0x10, crc ") != NULL);
        if (!strstr(m, "differs in:")) fprintf(stderr, "    message: %s\n", m);
        /* the policy update's invalidation fails with the same divergence; the policy is unchanged */
        CHECK(npt_policy_set(vm, CODE, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_UX) != NPT_OK);
        CHECK(strstr(npt_last_error(), "diverged at event ") != NULL && strstr(npt_last_error(), "policy unchanged") != NULL);
        npt_vm_destroy(vm);
    }
    /* The second session stopped short of its trace: its end-of-process report would make this
     * program's status 1. That report is tested by ReplayTests (a child process); here the
     * status must stay this program's own: the session already failed, so nothing more is said. */
    CHECK_OK(npt_context_destroy(rctx));
    unlink(trace);

    /* Two vCPU threads and the VMM's thread, recorded on sim, then replayed with the same threads:
     * the same values from each vCPU, every call answered. */
    char smp_trace[4096];
    snprintf(smp_trace, sizeof smp_trace, "%s/record-replay-%ld-smp.trace", argv[2], (long)getpid());
    CHECK_OK(npt_context_create(&ctx));
    struct smp_cpu srec[2], srep[2];
    CHECK(smp(ctx, "sim", smp_trace, srec) == 0);
    check_smp(srec);
    CHECK_OK(npt_context_destroy(ctx));
    rctx = replay_context(argv[1], smp_trace, "c-replay-smp");
    CHECK(smp(rctx, "replay", NULL, srep) == 0);
    check_smp(srep);
    CHECK_OK(npt_context_destroy(rctx));
    unlink(smp_trace);

    /* The privileged mode, vCPU threads deciding on their own views: replayed, each thread makes
     * the same runs and sees the same views, in the same order. */
    char pm_trace[4096];
    snprintf(pm_trace, sizeof pm_trace, "%s/record-replay-%ld-pm.trace", argv[2], (long)getpid());
    CHECK_OK(npt_context_create(&ctx));
    struct pm_cpu prec[2], prep[2];
    CHECK(pm(ctx, "sim", pm_trace, prec) == 0);
    check_pm(prec);
    CHECK_OK(npt_context_destroy(ctx));
    rctx = replay_context(argv[1], pm_trace, "c-replay-pm");
    CHECK(pm(rctx, "replay", NULL, prep) == 0);
    check_pm(prep);
    for (int k = 0; k < 2; k++) {
        CHECK_EQ(prep[k].runs, prec[k].runs);
        CHECK_EQ(prep[k].view_sum, prec[k].view_sum);
    }
    CHECK_OK(npt_context_destroy(rctx));
    unlink(pm_trace);
    printf("test_record_replay: %d passed, %d failed, %d skipped\n", passed, failed, skipped);
    return failed ? 1 : 0;
}
