/*
 * test_robustness.c - no crash, no hang, no lost state: one test per row of issue 11, each run as
 * its own process (`test_robustness ROW`; `test_robustness list` names them), against
 * include/nptkit.h and libnptkit.so only, with a fault-injecting backend of its own ("faulty",
 * registered with npt_backend_register) that records every operation on an object after its
 * destroy and every second destroy, instead of relying on a sanitizer to see them.
 *
 * Build: cc -std=c11 -Wall -Wextra -Werror -pedantic -pthread -Iinclude Tests/C/test_robustness.c \
 *           -L$BIN -lnptkit -Wl,-rpath,$BIN -o test_robustness
 * Each run prints "c-test test_robustness ROW: N passed, M failed" and exits 1 if M > 0.
 */
#define _POSIX_C_SOURCE 200809L
#include "check.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define R NPT_PERM_READ
#define W NPT_PERM_WRITE
#define UX NPT_PERM_UX
#define SX NPT_PERM_SX

static void nap_us(long us) {
    struct timespec ts = { us / 1000000, (us % 1000000) * 1000 };
    nanosleep(&ts, NULL);
}
static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* ------------------------------------------------------------------------ */
/* The fault-injecting backend                                                */
/* ------------------------------------------------------------------------ */
#define ALIVE 0x11115555u
#define DEAD 0xDEADDEADu
enum run_mode { RUN_HALT, RUN_SLOW_HALT, RUN_KICKED_FOREVER, RUN_BAD_REASON, RUN_BAD_HIERARCHY, RUN_RSM_FOREVER };

typedef struct fvm { _Atomic unsigned magic; npt_vm *handle; _Atomic int destroys; } fvm;
typedef struct fvcpu { _Atomic unsigned magic; fvm *vm; _Atomic int destroys; _Atomic int kicked; } fvcpu;

static _Atomic int run_mode = RUN_HALT;
/* Operations that reached an object after its destroy, and destroys beyond the first. */
static _Atomic int after_destroy, double_destroys, runs;
static _Atomic long run_calls;
/* Slow operations widen the windows a race needs: a destroy that takes a while, creates that are
 * in progress (flagged) until the test thread has acted. */
static _Atomic int slow_vcpu_destroy, slow_create, in_create;
static _Atomic int destroy_started;
/* Row 9: what the backend's invalidate saw when it called the public API on its own VM. */
static _Atomic int reentry_mode;
static _Atomic int reentry_get_status = 99, reentry_set_status = 99, reentry_destroy_status = 99, reentry_stats_status = 99;
static _Atomic uint64_t reentry_perms;

static void touch_vm(fvm *v) { if (atomic_load(&v->magic) != ALIVE) atomic_fetch_add(&after_destroy, 1); }
static void touch_cpu(fvcpu *c) {
    if (atomic_load(&c->magic) != ALIVE) atomic_fetch_add(&after_destroy, 1);
    touch_vm(c->vm);
}

/* Objects are freed only at exit (so that a late call is counted, not a crash). */
static pthread_mutex_t kept_lock = PTHREAD_MUTEX_INITIALIZER;
static void **kept;
static size_t kept_count, kept_cap;
static void *keep(size_t size) {
    void *p = calloc(1, size);
    pthread_mutex_lock(&kept_lock);
    if (kept_count == kept_cap) {
        kept_cap = kept_cap ? 2 * kept_cap : 256;
        kept = realloc(kept, kept_cap * sizeof *kept);
    }
    kept[kept_count++] = p;
    pthread_mutex_unlock(&kept_lock);
    return p;
}
static void free_kept(void) {
    for (size_t i = 0; i < kept_count; i++) free(kept[i]);
    free(kept);
}
static npt_status f_vm_create(void *bd, npt_vm *vm, const npt_vm_config *cfg, void **out) {
    (void)bd; (void)cfg;
    if (atomic_load(&slow_create)) {
        atomic_store(&in_create, 1);
        nap_us(2000);
    }
    fvm *v = keep(sizeof *v);
    atomic_store(&v->magic, ALIVE);
    v->handle = vm;
    *out = v;
    return NPT_OK;
}
static void f_vm_destroy(void *d) {
    fvm *v = d;
    if (atomic_fetch_add(&v->destroys, 1) > 0) atomic_fetch_add(&double_destroys, 1);
    atomic_store(&v->magic, DEAD);
}
static npt_status f_vcpu_create(void *d, uint32_t index, void **out) {
    (void)index;
    fvm *v = d;
    touch_vm(v);
    if (atomic_load(&slow_create)) {
        atomic_store(&in_create, 1);
        nap_us(2000);
        touch_vm(v); /* the VM must still be alive at the end of the create */
    }
    fvcpu *c = keep(sizeof *c);
    atomic_store(&c->magic, ALIVE);
    c->vm = v;
    *out = c;
    return NPT_OK;
}
static void f_vcpu_destroy(void *d) {
    fvcpu *c = d;
    if (atomic_load(&slow_vcpu_destroy)) { atomic_store(&destroy_started, 1); nap_us(300); }
    if (atomic_fetch_add(&c->destroys, 1) > 0) atomic_fetch_add(&double_destroys, 1);
    atomic_store(&c->magic, DEAD);
}
static npt_status f_mem(void *d, uint64_t gpa, const void *p, size_t n) { (void)gpa; (void)p; (void)n; touch_vm(d); return NPT_OK; }
static npt_status f_memr(void *d, uint64_t gpa, void *p, size_t n) { (void)gpa; memset(p, 0, n); touch_vm(d); return NPT_OK; }
static npt_status f_get_regs(void *d, npt_regs *r) { touch_cpu(d); uint32_t s = r->size; memset(r, 0, s); r->size = s; return NPT_OK; }
static npt_status f_set_regs(void *d, const npt_regs *r) { (void)r; touch_cpu(d); return NPT_OK; }
static npt_status f_set_h(void *d, uint32_t h) { (void)h; touch_cpu(d); return NPT_OK; }
static npt_status f_set_ctl(void *d, uint32_t c) { (void)c; touch_cpu(d); return NPT_OK; }
static npt_status f_invalidate(void *d, uint32_t h, uint64_t gpa, uint64_t size) {
    (void)h; (void)size;
    fvm *v = d;
    touch_vm(v);
    if (atomic_load(&reentry_mode)) {
        uint64_t perms = 0;
        atomic_store(&reentry_get_status, npt_policy_get(v->handle, gpa, &perms));
        atomic_store(&reentry_perms, perms);
        atomic_store(&reentry_set_status, npt_policy_set(v->handle, 0, 0x1000, NPT_PAGE_4K, R));
        atomic_store(&reentry_destroy_status, npt_vm_destroy(v->handle));
        size_t n = 0;
        atomic_store(&reentry_stats_status, npt_vm_backend_stats(v->handle, NULL, 0, &n));
    }
    return NPT_OK;
}
static npt_status f_run(void *d, npt_exit *e) {
    fvcpu *c = d;
    touch_cpu(c);
    atomic_fetch_add(&run_calls, 1);
    uint32_t s = e->size;
    memset(e, 0, s);
    e->size = s;
    switch (atomic_load(&run_mode)) {
    case RUN_SLOW_HALT:
        atomic_fetch_add(&runs, 1);
        for (int i = 0; i < 20 && !atomic_exchange(&c->kicked, 0); i++) nap_us(50);
        touch_cpu(c); /* still alive at the end of the run? */
        e->reason = NPT_EXIT_HALT;
        break;
    case RUN_KICKED_FOREVER: e->reason = NPT_EXIT_KICKED; break;
    case RUN_RSM_FOREVER: e->reason = NPT_EXIT_LEAVE_MODE; e->rip = 0x1000; break; /* the core injects #UD, resumes */
    case RUN_BAD_REASON: e->reason = 999; break;
    case RUN_BAD_HIERARCHY: e->reason = NPT_EXIT_HALT; e->hierarchy = 7; break;
    default: e->reason = NPT_EXIT_HALT; break;
    }
    return NPT_OK;
}
/* Backend statistics (ABI 1.3): one each; row 10's backend asks for room it cannot be given. */
static _Atomic int huge_stats;
static npt_status f_stats(npt_backend_stat *st, size_t cap, size_t *count, const char *name) {
    *count = atomic_load(&huge_stats) ? SIZE_MAX : 1;
    if (cap < *count) return NPT_ERR_BUFFER_TOO_SMALL;
    st[0].name = name;
    st[0].value = 1;
    return NPT_OK;
}
static npt_status f_vm_stats(void *d, npt_backend_stat *st, size_t cap, size_t *count) { touch_vm(d); return f_stats(st, cap, count, "vm_calls"); }
static npt_status f_vcpu_stats(void *d, npt_backend_stat *st, size_t cap, size_t *count) { touch_cpu(d); return f_stats(st, cap, count, "vcpu_calls"); }
static npt_status f_inject(void *d, uint32_t v, uint64_t e, uint64_t a) { (void)v; (void)e; (void)a; touch_cpu(d); return NPT_OK; }
static void f_kick(void *d) { fvcpu *c = d; touch_cpu(c); atomic_store(&c->kicked, 1); }

static npt_backend_ops faulty_ops(void) {
    npt_backend_ops o;
    memset(&o, 0, sizeof o);
    o.abi_version = NPT_ABI_VERSION;
    o.size = sizeof o;
    o.name = "faulty";
    o.description = "test_robustness: counts calls after destroy";
    o.capabilities = NPT_CAP_MBEC_EMULATION | NPT_CAP_RUN;
    o.vm_create = f_vm_create; o.vm_destroy = f_vm_destroy;
    o.memory_write = f_mem; o.memory_read = f_memr;
    o.vcpu_create = f_vcpu_create; o.vcpu_destroy = f_vcpu_destroy;
    o.vcpu_get_regs = f_get_regs; o.vcpu_set_regs = f_set_regs;
    o.vcpu_set_hierarchy = f_set_h; o.vcpu_set_exit_controls = f_set_ctl;
    o.invalidate = f_invalidate; o.vcpu_run = f_run; o.vcpu_inject_fault = f_inject; o.vcpu_kick = f_kick;
    o.vm_stats = f_vm_stats; o.vcpu_stats = f_vcpu_stats;
    return o;
}
static npt_backend_ops ops_storage;

static npt_context *new_context(void) {
    npt_context *ctx = NULL;
    CHECK_OK(npt_context_create(&ctx));
    ops_storage = faulty_ops();
    CHECK_OK(npt_backend_register(ctx, &ops_storage));
    return ctx;
}
static npt_vm *new_vm(npt_context *ctx, const char *backend, uint64_t ram) {
    npt_vm_config cfg = { sizeof cfg, backend && strcmp(backend, "faulty") == 0 ? NPT_MBEC_VIOLATION_ONLY : NPT_MBEC_EXACT,
                          backend, ram, R | W, 0, NULL };
    npt_vm *vm = NULL;
    CHECK_OK(npt_vm_create(ctx, &cfg, &vm));
    return vm;
}
static npt_exit exit_init(void) { npt_exit e; memset(&e, 0, sizeof e); e.size = sizeof e; return e; }

/* Simulator guest code (docs/guest-isa.md): 8 bytes an instruction. */
static void emit(uint8_t *buf, size_t *off, uint8_t op, uint8_t a, uint8_t b, int32_t imm) {
    buf[*off] = op; buf[*off + 1] = a; buf[*off + 2] = b; buf[*off + 3] = 0;
    memcpy(buf + *off + 4, &imm, 4);
    *off += 8;
}
#define OP_ADDI 0x05
#define OP_JMP 0x08
#define OP_HLT 0x0E
#define OP_OUT 0x0F
#define OP_RSM 0x13
#define CODE 0x1000u
#define REGION UINT64_C(0x40000000)

/* A sim VM whose vCPUs loop at CODE (paging off: user-mode addresses, so R|UX), with a region whose
 * handler writes r0 to port 9 and executes RSM. */
static npt_vm *privileged_vm(npt_context *ctx, uint64_t steps) {
    npt_vm_config cfg = { sizeof cfg, NPT_MBEC_EXACT, NULL, 4u << 20, R | W, steps, NULL };
    npt_vm *vm = NULL;
    CHECK_OK(npt_vm_create(ctx, &cfg, &vm));
    uint8_t code[32]; size_t n = 0;
    emit(code, &n, OP_ADDI, 3, 0, 1);
    emit(code, &n, OP_JMP, 0, 0, -16);
    CHECK_OK(npt_vm_write_memory(vm, CODE, code, n));
    CHECK_OK(npt_policy_set(vm, CODE, 0x1000, NPT_PAGE_4K, R | UX));
    uint8_t handler[32]; size_t h = 0;
    emit(handler, &h, OP_OUT, 0, 0, 9);
    emit(handler, &h, OP_RSM, 0, 0, 0);
    npt_region r = { sizeof r, 0, REGION, 0x10000, handler, h, 0, 0 };
    CHECK_OK(npt_region_set(vm, &r));
    return vm;
}
static void start_at_code(npt_vcpu *c) {
    npt_regs regs; memset(&regs, 0, sizeof regs); regs.size = sizeof regs;
    regs.rip = CODE;
    CHECK_OK(npt_vcpu_set_regs(c, &regs));
}

/* ------------------------------------------------------------------------ */
/* Rows                                                                       */
/* ------------------------------------------------------------------------ */

/* Row 1: one vCPU enters and leaves the mode 12 times; each entry runs the handler (OUT 9) and its
 * RSM leaves; no entry fails, the vCPU ends outside the mode. */
static void row1(void) {
    npt_context *ctx = new_context();
    npt_vm *vm = privileged_vm(ctx, 5000);
    npt_vcpu *c;
    CHECK_OK(npt_vcpu_create(vm, 0, &c));
    start_at_code(c);
    int outs = 0, errors = 0;
    for (int k = 0; k < 12; k++) {
        CHECK_OK(npt_vcpu_raise_privileged(c));
        for (int tries = 0; tries < 10; tries++) {
            npt_exit e = exit_init();
            npt_status s = npt_vcpu_run(c, &e);
            if (s != NPT_OK) { errors++; fprintf(stderr, "    entry %d: %s\n", k + 1, npt_last_error()); break; }
            if (e.reason == NPT_EXIT_IO && e.io_port == 9) { outs++; break; }
        }
        int64_t holder = 7;
        CHECK_OK(npt_vm_privileged_holder(vm, &holder));
        npt_exit e = exit_init();
        CHECK_OK(npt_vcpu_run(c, &e)); /* the handler's RSM, then the loop's budget */
        CHECK_OK(npt_vm_privileged_holder(vm, &holder));
        CHECK_EQ(holder, (uint64_t)-1);
    }
    CHECK_EQ(outs, 12);
    CHECK_EQ(errors, 0);
    npt_privileged_stats ps = { .size = sizeof ps };
    CHECK_OK(npt_vm_get_privileged_stats(vm, &ps));
    CHECK_EQ(ps.entries, 12);
    CHECK_EQ(ps.failures, 0);
    CHECK_OK(npt_vm_destroy(vm));
    CHECK_OK(npt_context_destroy(ctx));
}

/* Row 2: 257 vCPUs (slots past 127 and 255) enter the mode and run; a 2-vCPU VM recreates one vCPU
 * 300 times (its slot is reused); more than the limit is refused with a status. */
static void row2(void) {
    npt_context *ctx = new_context();
    npt_vm *vm = privileged_vm(ctx, 200);
    enum { N = 257 };
    static npt_vcpu *cpus[N];
    for (uint32_t i = 0; i < N; i++) {
        CHECK_OK(npt_vcpu_create(vm, i, &cpus[i]));
        start_at_code(cpus[i]);
    }
    /* The highest slots run first, then slot 128 and 256 enter the mode (one thread drives all:
     * an entry waits for the others, whose threads are outside guest code, so it is immediate). */
    uint32_t order[] = { 256, 255, 128, 127, 0 };
    for (size_t k = 0; k < sizeof order / sizeof order[0]; k++) {
        npt_exit e = exit_init();
        CHECK_OK(npt_vcpu_run(cpus[order[k]], &e));
        CHECK_EQ(e.reason, NPT_EXIT_BUDGET);
    }
    uint32_t enter[] = { 128, 256 };
    for (size_t k = 0; k < 2; k++) {
        CHECK_OK(npt_vcpu_raise_privileged(cpus[enter[k]]));
        npt_exit e = exit_init();
        CHECK_OK(npt_vcpu_run(cpus[enter[k]], &e));
        CHECK(e.reason == NPT_EXIT_IO && e.io_value == enter[k]);
        e = exit_init();
        CHECK_OK(npt_vcpu_run(cpus[enter[k]], &e)); /* RSM */
    }
    npt_privileged_stats ps = { .size = sizeof ps };
    CHECK_OK(npt_vm_get_privileged_stats(vm, &ps));
    CHECK_EQ(ps.entries, 2);
    CHECK_OK(npt_vm_destroy(vm));

    /* The limit: 1024 vCPUs per VM, the next refused, nothing changed. */
    vm = new_vm(ctx, NULL, 1u << 20);
    static npt_vcpu *many[1025];
    int made = 0;
    for (uint32_t i = 0; i < 1024; i++) made += npt_vcpu_create(vm, i * 7, &many[i]) == NPT_OK;
    CHECK_EQ(made, 1024);
    CHECK_ST(npt_vcpu_create(vm, 99999, &many[1024]), NPT_ERR_OUT_OF_RANGE);
    CHECK(strstr(npt_last_error(), "1024") != NULL);
    CHECK_OK(npt_vcpu_destroy(many[3]));
    CHECK_OK(npt_vcpu_create(vm, 99999, &many[1024]));
    CHECK_OK(npt_vm_destroy(vm));

    /* Recreating one vCPU 300 times in a 2-vCPU VM, with the mode used on the way. */
    vm = privileged_vm(ctx, 200);
    npt_vcpu *a, *b;
    CHECK_OK(npt_vcpu_create(vm, 0, &a));
    start_at_code(a);
    int ok = 0;
    for (int k = 0; k < 300; k++) {
        if (npt_vcpu_create(vm, 1, &b) != NPT_OK) continue;
        start_at_code(b);
        npt_exit e = exit_init();
        if (npt_vcpu_run(b, &e) == NPT_OK && e.reason == NPT_EXIT_BUDGET) ok++;
        if (k % 50 == 0) {
            CHECK_OK(npt_vcpu_raise_privileged(b));
            e = exit_init();
            CHECK_OK(npt_vcpu_run(b, &e));
            e = exit_init();
            CHECK_OK(npt_vcpu_run(b, &e));
        }
        CHECK_OK(npt_vcpu_destroy(b));
    }
    CHECK_EQ(ok, 300);
    CHECK_OK(npt_vm_destroy(vm));
    CHECK_OK(npt_context_destroy(ctx));
}

/* Rows 3 and 4: npt_vcpu_run racing npt_vcpu_destroy and npt_vm_destroy. A run either finishes
 * before the destroy or is refused; the backend's vCPU is never used after its destroy; a VM
 * destroy that answers BUSY destroyed nothing (every vCPU still runs). */
typedef struct { npt_vcpu *cpu; _Atomic int stop; int ok, refused, other; } runner;
static void *run_loop(void *arg) {
    runner *r = arg;
    while (!atomic_load(&r->stop)) {
        npt_exit e = exit_init();
        npt_status s = npt_vcpu_run(r->cpu, &e);
        if (s == NPT_OK) r->ok++;
        else if (s == NPT_ERR_BAD_HANDLE) { r->refused++; break; }
        else if (s == NPT_ERR_BUSY) r->refused++;
        else { r->other++; fprintf(stderr, "    run: %s\n", npt_last_error()); break; }
        nap_us(20);
    }
    return NULL;
}
/* Reads a vCPU's backend statistics (ABI 1.3) and its view of the privileged mode (ABI 1.6) until
 * it is destroyed: the backend's vcpu_stats must never run after its vcpu_destroy (touch_cpu counts
 * it), and a view of a destroyed vCPU is refused. */
typedef struct { npt_vcpu *cpu; _Atomic int stop; int ok, other; } stats_racer;
static void *stats_loop(void *arg) {
    stats_racer *r = arg;
    while (!atomic_load(&r->stop)) {
        npt_backend_stat st[2];
        size_t n = 0;
        npt_status s = npt_vcpu_backend_stats(r->cpu, st, 2, &n);
        if (s == NPT_OK) r->ok++;
        else if (s == NPT_ERR_BAD_HANDLE) break;
        else if (s != NPT_ERR_BUSY) { r->other++; fprintf(stderr, "    stats: %s\n", npt_last_error()); break; }
        npt_privileged_view v;
        memset(&v, 0, sizeof v);
        v.size = sizeof v;
        s = npt_vcpu_privileged_view(r->cpu, &v);
        if (s == NPT_OK && v.holder == -1 && v.requests == 0) r->ok++;
        else if (s == NPT_ERR_BAD_HANDLE) break;
        else if (s != NPT_ERR_BUSY) { r->other++; fprintf(stderr, "    view: %s (holder %" PRId64 ")\n", npt_last_error(), v.holder); break; }
    }
    return NULL;
}
static void row3(void) {
    atomic_store(&run_mode, RUN_SLOW_HALT);
    npt_context *ctx = new_context();
    int destroyed = 0, busy = 0;
    for (int k = 0; k < 200; k++) {
        npt_vm *vm = new_vm(ctx, "faulty", 1u << 20);
        npt_vcpu *c;
        CHECK_OK(npt_vcpu_create(vm, 0, &c));
        runner r = { c, 0, 0, 0, 0 };
        stats_racer sr = { c, 0, 0, 0 };
        pthread_t t, ts;
        pthread_create(&t, NULL, run_loop, &r);
        pthread_create(&ts, NULL, stats_loop, &sr);
        nap_us(k % 7 * 100);
        npt_status s = NPT_ERR_BUSY;
        for (int tries = 0; tries < 100000 && s == NPT_ERR_BUSY; tries++) {
            s = npt_vcpu_destroy(c);
            if (s == NPT_ERR_BUSY) busy++;
        }
        CHECK_OK(s);
        destroyed++;
        atomic_store(&r.stop, 1);
        atomic_store(&sr.stop, 1);
        pthread_join(t, NULL);
        pthread_join(ts, NULL);
        CHECK_EQ(r.other, 0);
        CHECK_EQ(sr.other, 0);
        npt_exit e = exit_init();
        CHECK_ST(npt_vcpu_run(c, &e), NPT_ERR_BAD_HANDLE);
        size_t n = 0;
        CHECK_ST(npt_vcpu_backend_stats(c, NULL, 0, &n), NPT_ERR_BAD_HANDLE);
        npt_privileged_view v;
        memset(&v, 0, sizeof v);
        v.size = sizeof v;
        CHECK_ST(npt_vcpu_privileged_view(c, &v), NPT_ERR_BAD_HANDLE);
        CHECK_OK(npt_vm_destroy(vm));
        CHECK_ST(npt_vm_backend_stats(vm, NULL, 0, &n), NPT_ERR_BAD_HANDLE);
        uint32_t isa = 0;
        CHECK_ST(npt_vm_guest_isa(vm, &isa), NPT_ERR_BAD_HANDLE);
    }
    CHECK_EQ(atomic_load(&after_destroy), 0);
    CHECK_EQ(atomic_load(&double_destroys), 0);
    printf("    row 3: %d destroys raced runs (%d BUSY answers while a run was in progress)\n", destroyed, busy);
    CHECK_OK(npt_context_destroy(ctx));
    atomic_store(&run_mode, RUN_HALT);
}
/* The runner starts its run exactly when the backend destroys the VM's first vCPU: a VM destroy
 * that had checked the vCPUs before destroying them meets a run started meanwhile. */
typedef struct { npt_vcpu *cpu; npt_status st; } late_runner;
static void *late_run(void *arg) {
    late_runner *r = arg;
    while (!atomic_load(&destroy_started)) {}
    npt_exit e = exit_init();
    r->st = npt_vcpu_run(r->cpu, &e);
    return NULL;
}
static void row4(void) {
    atomic_store(&run_mode, RUN_SLOW_HALT);
    atomic_store(&slow_vcpu_destroy, 1);
    npt_context *ctx = new_context();
    int busy_seen = 0;
    for (int k = 0; k < 20; k++) {
        npt_vm *vm = new_vm(ctx, "faulty", 1u << 20);
        npt_vcpu *c[3];
        for (uint32_t i = 0; i < 3; i++) CHECK_OK(npt_vcpu_create(vm, i, &c[i]));
        atomic_store(&destroy_started, 0);
        late_runner r = { c[2], 99 };
        pthread_t t;
        pthread_create(&t, NULL, late_run, &r);
        npt_status s = npt_vm_destroy(vm);
        atomic_store(&destroy_started, 1);
        pthread_join(t, NULL);
        if (s == NPT_ERR_BUSY) {
            busy_seen++;
            /* A failed destroy changes nothing: every vCPU still answers, the backend saw no destroy. */
            for (int i = 0; i < 3; i++) {
                npt_regs regs = { .size = sizeof regs };
                CHECK_OK(npt_vcpu_get_regs(c[i], &regs));
            }
            CHECK_OK(npt_vm_destroy(vm));
        } else {
            CHECK_OK(s);
            /* The run overlapped the destroy: refused (it cannot have finished before it). */
            CHECK(r.st == NPT_ERR_BUSY || r.st == NPT_ERR_BAD_HANDLE);
        }
        for (int i = 0; i < 3; i++) {
            npt_exit e = exit_init();
            CHECK_ST(npt_vcpu_run(c[i], &e), NPT_ERR_BAD_HANDLE);
        }
        CHECK_EQ(atomic_load(&after_destroy), 0);
    }
    printf("    row 4: 20 VM destroys met a run started while they destroyed vCPUs: %d answered BUSY\n", busy_seen);
    CHECK_EQ(atomic_load(&double_destroys), 0);
    CHECK_OK(npt_context_destroy(ctx));
    atomic_store(&run_mode, RUN_HALT);
    atomic_store(&slow_vcpu_destroy, 0);
}

/* Row 5: two threads destroy the same handle at once: exactly one succeeds, the backend's destroy
 * runs once, and the context counts the VM once. */
typedef struct { npt_vm *vm; npt_vcpu *cpu; _Atomic int *go; npt_status st; } destroyer;
static void *destroy_vm_thread(void *arg) {
    destroyer *d = arg;
    while (!atomic_load(d->go)) {}
    d->st = d->vm ? npt_vm_destroy(d->vm) : npt_vcpu_destroy(d->cpu);
    return NULL;
}
static void row5(void) {
    npt_context *ctx = new_context();
    for (int k = 0; k < 300; k++) {
        npt_vm *vm = new_vm(ctx, "faulty", 1u << 20);
        npt_vm *other = new_vm(ctx, "faulty", 1u << 20);
        npt_vcpu *c;
        CHECK_OK(npt_vcpu_create(vm, 0, &c));
        _Atomic int go = 0;
        destroyer a = { NULL, c, &go, 0 }, b = { NULL, c, &go, 0 };
        pthread_t ta, tb;
        pthread_create(&ta, NULL, destroy_vm_thread, &a);
        pthread_create(&tb, NULL, destroy_vm_thread, &b);
        atomic_store(&go, 1);
        pthread_join(ta, NULL);
        pthread_join(tb, NULL);
        CHECK((a.st == NPT_OK) + (b.st == NPT_OK) == 1);
        go = 0;
        destroyer x = { vm, NULL, &go, 0 }, y = { vm, NULL, &go, 0 };
        pthread_create(&ta, NULL, destroy_vm_thread, &x);
        pthread_create(&tb, NULL, destroy_vm_thread, &y);
        atomic_store(&go, 1);
        pthread_join(ta, NULL);
        pthread_join(tb, NULL);
        CHECK((x.st == NPT_OK) + (y.st == NPT_OK) == 1);
        CHECK(x.st == NPT_ERR_BAD_HANDLE || y.st == NPT_ERR_BAD_HANDLE);
        /* `other` is still alive: the context must refuse to die. */
        CHECK_ST(npt_context_destroy(ctx), NPT_ERR_BUSY);
        CHECK_OK(npt_vm_destroy(other));
    }
    CHECK_EQ(atomic_load(&double_destroys), 0);
    CHECK_EQ(atomic_load(&after_destroy), 0);
    CHECK_OK(npt_context_destroy(ctx));
}

/* Row 6: npt_context_destroy racing npt_vm_create: never both succeed. The backend's vm_create is
 * slow and flags that it is in progress; the context destroy comes then (and, every other round,
 * before the create starts). */
typedef struct { npt_context *ctx; _Atomic int *go; npt_status st; npt_vm *vm; } creator;
static void *create_thread(void *arg) {
    creator *c = arg;
    while (!atomic_load(c->go)) {}
    npt_vm_config cfg = { sizeof cfg, NPT_MBEC_VIOLATION_ONLY, "faulty", 1u << 20, R | W, 0, NULL };
    c->st = npt_vm_create(c->ctx, &cfg, &c->vm);
    return NULL;
}
static void row6(void) {
    int both = 0, creates = 0, ctx_first = 0;
    atomic_store(&slow_create, 1);
    for (int k = 0; k < 100; k++) {
        npt_context *ctx = new_context();
        _Atomic int go = 0;
        creator cr = { ctx, &go, 0, NULL };
        atomic_store(&in_create, 0);
        pthread_t t;
        pthread_create(&t, NULL, create_thread, &cr);
        atomic_store(&go, 1);
        if (k % 2 == 0) while (!atomic_load(&in_create)) {}
        npt_status d = npt_context_destroy(ctx);
        pthread_join(t, NULL);
        if (d == NPT_OK && cr.st == NPT_OK) both++;
        if (cr.st == NPT_OK) {
            creates++;
            CHECK_ST(d, NPT_ERR_BUSY);
            CHECK_OK(npt_vm_destroy(cr.vm));
            CHECK_OK(npt_context_destroy(ctx));
        } else {
            ctx_first++;
            CHECK_OK(d);
            CHECK(cr.st == NPT_ERR_BAD_HANDLE || cr.st == NPT_ERR_BUSY);
        }
    }
    atomic_store(&slow_create, 0);
    CHECK_EQ(both, 0);
    CHECK(creates > 0);
    printf("    row 6: 100 races: %d creates first, %d destroys first, %d both succeeded\n", creates, ctx_first, both);
}

/* Row 7: 10,000 vCPU create/destroy cycles in one VM: memory does not grow with the cycles. */
static long rss_kb(void) {
    FILE *f = fopen("/proc/self/statm", "r");
    long pages = 0, resident = 0;
    if (f) { if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0; fclose(f); }
    return resident * (sysconf(_SC_PAGESIZE) / 1024);
}
static void row7(void) {
    npt_context *ctx = new_context();
    npt_vm *vm = privileged_vm(ctx, 100);
    npt_vcpu *keep;
    CHECK_OK(npt_vcpu_create(vm, 0, &keep));
    long base = 0;
    for (int k = 0; k < 10000; k++) {
        if (k == 1000) base = rss_kb();
        npt_vcpu *c;
        CHECK_OK(npt_vcpu_create(vm, 1, &c));
        start_at_code(c);
        npt_exit e = exit_init();
        CHECK_OK(npt_vcpu_run(c, &e));
        CHECK_OK(npt_vcpu_destroy(c));
    }
    long grown = rss_kb() - base;
    printf("    row 7: resident memory grew by %ld KiB over 9,000 cycles (%.2f KiB a cycle)\n", grown, grown / 9000.0);
    CHECK(grown < 9000); /* under 1 KiB a cycle (it was about 41 KB) */
    CHECK_OK(npt_vm_destroy(vm));
    CHECK_OK(npt_context_destroy(ctx));
}

/* Row 8: npt_vm_get_stats while a vCPU runs (the ThreadSanitizer job sees any race). */
static void *stats_reader(void *arg) {
    npt_vm *vm = arg;
    for (int i = 0; i < 2000; i++) {
        npt_stats s = { .size = sizeof s };
        if (npt_vm_get_stats(vm, &s) != NPT_OK) break;
    }
    return NULL;
}
static void row8(void) {
    npt_context *ctx = new_context();
    npt_vm *vm = privileged_vm(ctx, 20000);
    npt_vcpu *c;
    CHECK_OK(npt_vcpu_create(vm, 0, &c));
    start_at_code(c);
    pthread_t t;
    pthread_create(&t, NULL, stats_reader, vm);
    for (int i = 0; i < 20; i++) {
        npt_exit e = exit_init();
        CHECK_OK(npt_vcpu_run(c, &e));
    }
    pthread_join(t, NULL);
    npt_stats s = { .size = sizeof s };
    CHECK_OK(npt_vm_get_stats(vm, &s));
    CHECK(s.instructions >= 20 * 20000);
    CHECK_OK(npt_vm_destroy(vm));
    CHECK_OK(npt_context_destroy(ctx));
}

/* Row 9: a backend operation calling the public API on its own VM: the read-only calls answer (the
 * policy being applied), others are refused with NPT_ERR_STATE; no abort, no deadlock. */
static void row9(void) {
    npt_context *ctx = new_context();
    npt_vm *vm = new_vm(ctx, "faulty", 1u << 20);
    CHECK_OK(npt_policy_set(vm, 0x2000, 0x1000, NPT_PAGE_4K, R | W | SX));
    atomic_store(&reentry_mode, 1);
    CHECK_OK(npt_policy_set(vm, 0x2000, 0x1000, NPT_PAGE_4K, R)); /* drops W and SX: invalidate */
    atomic_store(&reentry_mode, 0);
    CHECK_EQ(atomic_load(&reentry_get_status), NPT_OK);
    CHECK_EQ(atomic_load(&reentry_perms), R);
    CHECK_EQ(atomic_load(&reentry_set_status), NPT_ERR_STATE);
    CHECK_EQ(atomic_load(&reentry_destroy_status), NPT_ERR_STATE);
    CHECK_EQ(atomic_load(&reentry_stats_status), NPT_ERR_STATE); /* ABI 1.3's statistics too */
    uint64_t p = 0;
    CHECK_OK(npt_policy_get(vm, 0, &p));
    CHECK_EQ(p, R | W); /* the refused npt_policy_set changed nothing */
    CHECK_OK(npt_vm_destroy(vm));
    CHECK_OK(npt_context_destroy(ctx));
}

/* Row 10: a backend returning an exit reason or hierarchy the ABI does not define: NPT_ERR_BACKEND. */
static void row10(void) {
    npt_context *ctx = new_context();
    npt_vm *vm = new_vm(ctx, "faulty", 1u << 20);
    npt_vcpu *c;
    CHECK_OK(npt_vcpu_create(vm, 0, &c));
    npt_exit e = exit_init();
    atomic_store(&run_mode, RUN_BAD_REASON);
    CHECK_ST(npt_vcpu_run(c, &e), NPT_ERR_BACKEND);
    CHECK(strstr(npt_last_error(), "999") != NULL);
    CHECK_ST(npt_vcpu_run_raw(c, &e), NPT_ERR_BACKEND);
    atomic_store(&run_mode, RUN_BAD_HIERARCHY);
    CHECK_ST(npt_vcpu_run(c, &e), NPT_ERR_BACKEND);
    CHECK(strstr(npt_last_error(), "hierarchy") != NULL);
    atomic_store(&run_mode, RUN_HALT);
    /* A backend's statistics asking for room for SIZE_MAX: the backend's fault, not the caller's. */
    npt_backend_stat st[4];
    size_t count = 0;
    atomic_store(&huge_stats, 1);
    CHECK_ST(npt_vcpu_backend_stats(c, st, 4, &count), NPT_ERR_BACKEND);
    CHECK(strstr(npt_last_error(), "18446744073709551615") != NULL);
    CHECK_ST(npt_vm_backend_stats(vm, st, 4, &count), NPT_ERR_BACKEND);
    atomic_store(&huge_stats, 0);
    CHECK_OK(npt_vcpu_backend_stats(c, st, 4, &count));
    CHECK_EQ(count, 1);
    CHECK_OK(npt_vcpu_run(c, &e));
    CHECK_EQ(e.reason, NPT_EXIT_HALT);
    CHECK_OK(npt_vm_destroy(vm));
    CHECK_OK(npt_context_destroy(ctx));
}

/* Row 11: many VMs at once: the address space a VM reserves follows its memory. */
static void row11(void) {
    npt_context *ctx = new_context();
    enum { N = 3000 };
    static npt_vm *vms[N];
    int made = 0;
    for (int i = 0; i < N; i++) {
        npt_vm_config cfg = { sizeof cfg, NPT_MBEC_EXACT, NULL, 1u << 20, R | W, 0, NULL };
        npt_status s = npt_vm_create(ctx, &cfg, &vms[i]);
        if (s != NPT_OK) { fprintf(stderr, "    VM %d: %s\n", i + 1, npt_last_error()); break; }
        made++;
    }
    CHECK_EQ(made, N);
    for (int i = 0; i < made; i++) CHECK_OK(npt_vm_destroy(vms[i]));
    CHECK_OK(npt_context_destroy(ctx));
}

/* Row 13: a backend that returns "kicked" forever: npt_vcpu_run ends with NPT_ERR_BACKEND. */
static void row13(void) {
    npt_context *ctx = new_context();
    npt_vm *vm = new_vm(ctx, "faulty", 1u << 20);
    npt_vcpu *c;
    CHECK_OK(npt_vcpu_create(vm, 0, &c));
    atomic_store(&run_mode, RUN_KICKED_FOREVER);
    atomic_store(&run_calls, 0);
    npt_exit e = exit_init();
    double t0 = now_s();
    CHECK_ST(npt_vcpu_run(c, &e), NPT_ERR_BACKEND);
    CHECK(strstr(npt_last_error(), "KICKED") != NULL);
    CHECK(now_s() - t0 < 10.0);
    CHECK(atomic_load(&run_calls) <= 10000);
    /* The same exit at the same rip, resumed by the core each time (an RSM outside the mode whose #UD
     * the backend never delivers): also bounded. */
    atomic_store(&run_mode, RUN_RSM_FOREVER);
    atomic_store(&run_calls, 0);
    t0 = now_s();
    CHECK_ST(npt_vcpu_run(c, &e), NPT_ERR_BACKEND);
    CHECK(strstr(npt_last_error(), "without progress") != NULL);
    CHECK(now_s() - t0 < 10.0);
    CHECK(atomic_load(&run_calls) <= 10000);
    atomic_store(&run_mode, RUN_HALT);
    CHECK_OK(npt_vcpu_run(c, &e));
    CHECK_OK(npt_vm_destroy(vm));
    CHECK_OK(npt_context_destroy(ctx));
}

/* Row 14: memory access lengths of 2^63 and up: NPT_ERR_OUT_OF_RANGE, nothing read or written. */
static void row14(void) {
    npt_context *ctx = new_context();
    npt_vm *vm = new_vm(ctx, NULL, 1u << 20);
    uint8_t buf[16] = { 0 };
    size_t lens[] = { SIZE_MAX, (size_t)1 << 63, ((size_t)1 << 63) + 5, (size_t)1 << 48 };
    for (size_t i = 0; i < sizeof lens / sizeof lens[0]; i++) {
        CHECK_ST(npt_vm_read_memory(vm, 0, buf, lens[i]), NPT_ERR_OUT_OF_RANGE);
        CHECK(strstr(npt_last_error(), "-") == NULL); /* no negative length in the message */
        CHECK_ST(npt_vm_write_memory(vm, 0, buf, lens[i]), NPT_ERR_OUT_OF_RANGE);
    }
    CHECK_OK(npt_vm_destroy(vm));
    CHECK_OK(npt_context_destroy(ctx));
}

/* Row 15: npt_vcpu_create racing npt_vm_destroy: no vCPU handle outlives its VM; the backend never
 * creates a vCPU of a destroyed VM. */
typedef struct { npt_vm *vm; _Atomic int *go; npt_status st; npt_vcpu *cpu; } vcreator;
static void *vcpu_create_thread(void *arg) {
    vcreator *c = arg;
    while (!atomic_load(c->go)) {}
    c->st = npt_vcpu_create(c->vm, 0, &c->cpu);
    return NULL;
}
static void row15(void) {
    npt_context *ctx = new_context();
    int outlived = 0, created = 0;
    atomic_store(&slow_create, 1);
    for (int k = 0; k < 100; k++) {
        npt_vm *vm = new_vm(ctx, "faulty", 1u << 20);
        _Atomic int go = 0;
        vcreator cr = { vm, &go, 0, NULL };
        atomic_store(&in_create, 0);
        pthread_t t;
        pthread_create(&t, NULL, vcpu_create_thread, &cr);
        atomic_store(&go, 1);
        if (k % 2 == 0) while (!atomic_load(&in_create)) {}
        npt_status d;
        while ((d = npt_vm_destroy(vm)) == NPT_ERR_BUSY) {}
        pthread_join(t, NULL);
        CHECK_OK(d);
        if (cr.st == NPT_OK) {
            created++;
            npt_regs regs = { .size = sizeof regs };
            if (npt_vcpu_get_regs(cr.cpu, &regs) != NPT_ERR_BAD_HANDLE) outlived++;
            CHECK_ST(npt_vcpu_destroy(cr.cpu), NPT_ERR_BAD_HANDLE);
        }
    }
    atomic_store(&slow_create, 0);
    CHECK_EQ(outlived, 0);
    CHECK(created > 0);
    CHECK_EQ(atomic_load(&after_destroy), 0);
    printf("    row 15: 100 races, %d creates before the destroy, %d vCPU handles outlived their VM\n", created, outlived);
    CHECK_OK(npt_context_destroy(ctx));
}

/* Row 16: an NFIT whose SPA ranges wrap past 2^64, overlap, are unaligned or empty is refused. */
static uint8_t *nfit_with_spa(uint64_t base, uint64_t len, int second, uint64_t base2, uint64_t len2, size_t *n) {
    static uint8_t t[40 + 2 * (56 + 48)];
    memset(t, 0, sizeof t);
    int count = second ? 2 : 1;
    size_t total = 40 + (size_t)count * (56 + 48);
    memcpy(t, "NFIT", 4);
    uint32_t l = (uint32_t)total;
    memcpy(t + 4, &l, 4);
    t[8] = 1;
    static const uint8_t guid[16] = { 0x79, 0xD3, 0xF0, 0x66, 0xF3, 0xB4, 0x74, 0x40, 0xAC, 0x43, 0x0D, 0x33, 0x18, 0xB7, 0x8C, 0xDB };
    for (int k = 0; k < count; k++) {
        uint8_t *s = t + 40 + k * 56;
        uint16_t type = 0, slen = 56, idx = (uint16_t)(k + 1);
        memcpy(s, &type, 2); memcpy(s + 2, &slen, 2); memcpy(s + 4, &idx, 2);
        memcpy(s + 16, guid, 16);
        uint64_t b = k ? base2 : base, ln = k ? len2 : len;
        memcpy(s + 32, &b, 8); memcpy(s + 40, &ln, 8);
        uint64_t attr = 0x8008; /* WB | NV */
        memcpy(s + 48, &attr, 8);
        /* A memory-device map: one DIMM (controller k + 1) backs the range. */
        uint8_t *m = t + 40 + count * 56 + k * 48;
        uint16_t mtype = 1, mlen = 48;
        uint32_t handle = (uint32_t)(k + 1) << 8;
        memcpy(m, &mtype, 2); memcpy(m + 2, &mlen, 2); memcpy(m + 4, &handle, 4);
        memcpy(m + 12, &idx, 2);
        memcpy(m + 16, &ln, 8);
    }
    uint8_t sum = 0;
    for (size_t i = 0; i < total; i++) sum = (uint8_t)(sum + t[i]);
    t[9] = (uint8_t)(0 - sum);
    *n = total;
    return t;
}
static void row16(void) {
    npt_context *ctx = new_context();
    struct { uint64_t b, l; int two; uint64_t b2, l2; const char *what; } bad[] = {
        { UINT64_C(0xFFFFFFFFC0000000), UINT64_C(0x80000000), 0, 0, 0, "wraps past 2^64" },
        { UINT64_C(0x100000000), 0, 0, 0, 0, "size 0" },
        { UINT64_C(0x100000800), UINT64_C(0x200000), 0, 0, 0, "unaligned base" },
        { UINT64_C(0x100000000), UINT64_C(0x40000000), 1, UINT64_C(0x120000000), UINT64_C(0x40000000), "overlapping" },
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        size_t n;
        uint8_t *t = nfit_with_spa(bad[i].b, bad[i].l, bad[i].two, bad[i].b2, bad[i].l2, &n);
        npt_sim_platform p = { sizeof p, 0, 0, t, n };
        npt_status s = npt_sim_set_platform(ctx, &p);
        if (s != NPT_ERR_INVALID_ARGUMENT) fprintf(stderr, "    NFIT %s: %s\n", bad[i].what, npt_status_string(s));
        CHECK_ST(s, NPT_ERR_INVALID_ARGUMENT);
    }
    /* A valid one near the end of the space is accepted and usable. */
    size_t n;
    uint8_t *t = nfit_with_spa(UINT64_C(0xFFFFFFFF00000000), UINT64_C(0x40000000), 0, 0, 0, &n);
    npt_sim_platform p = { sizeof p, 0, 0, t, n };
    CHECK_OK(npt_sim_set_platform(ctx, &p));
    npt_vm *vm = new_vm(ctx, NULL, 1u << 20);
    npt_nvdimm d = { sizeof d, 1, UINT64_C(0x100000000), 0x200000, 0x40000000 - 0x200000 };
    CHECK_OK(npt_vm_add_nvdimm(vm, &d));
    d.gpa = UINT64_C(0x200000000); d.region_offset = 0x40000000 - 0x1000; d.length = 0x2000;
    CHECK_ST(npt_vm_add_nvdimm(vm, &d), NPT_ERR_OUT_OF_RANGE);
    CHECK_OK(npt_vm_destroy(vm));
    CHECK_OK(npt_context_destroy(ctx));
}

/* Row 17: the largest stop timeout, then an entry: no overflow, the entry happens. */
static void row17(void) {
    npt_context *ctx = new_context();
    npt_vm *vm = privileged_vm(ctx, 100);
    npt_vcpu *c, *d;
    CHECK_OK(npt_vcpu_create(vm, 0, &c));
    CHECK_OK(npt_vcpu_create(vm, 1, &d));
    start_at_code(c);
    start_at_code(d);
    CHECK_OK(npt_vm_set_stop_timeout(vm, UINT64_MAX));
    CHECK_OK(npt_vcpu_raise_privileged(c));
    npt_exit e = exit_init();
    CHECK_OK(npt_vcpu_run(c, &e));
    CHECK(e.reason == NPT_EXIT_IO && e.io_port == 9);
    CHECK_OK(npt_vcpu_run(c, &e));
    CHECK_OK(npt_vm_destroy(vm));
    CHECK_OK(npt_context_destroy(ctx));
}

/* Row 18: npt_region_set with contents_len of 2^63 and up is refused and changes nothing. */
static void row18(void) {
    npt_context *ctx = new_context();
    npt_vm *vm = privileged_vm(ctx, 100);
    uint8_t handler[8] = { OP_RSM };
    size_t lens[] = { SIZE_MAX, (size_t)1 << 63 };
    for (int withp = 0; withp < 2; withp++)
        for (size_t i = 0; i < 2; i++) {
            npt_region r = { sizeof r, 0, REGION + 0x100000, 0x1000, withp ? handler : NULL, lens[i], 0, 0 };
            CHECK_ST(npt_region_set(vm, &r), NPT_ERR_INVALID_ARGUMENT);
            CHECK(strstr(npt_last_error(), "contents_len") != NULL);
        }
    /* The fuzzer's finding (Tests/Fuzz/corpus/abi/regression-region-contents-len-huge): a region
     * length as large as the contents_len (up to 2^64 - 1) let a huge contents_len through to the
     * copy, which trapped. */
    uint64_t lengths[] = { UINT64_MAX, (uint64_t)1 << 63, (UINT64_C(1) << 30) + 0x1000 };
    size_t clens[] = { SIZE_MAX, (size_t)1 << 63, ((size_t)1 << 30) + 1 };
    for (size_t i = 0; i < 3; i++) {
        npt_region r = { sizeof r, 0, REGION + 0x100000, lengths[i], handler, clens[i], 0, 0 };
        CHECK_ST(npt_region_set(vm, &r), NPT_ERR_OUT_OF_RANGE);
        CHECK(strstr(npt_last_error(), "contents_len") != NULL);
    }
    /* The region is still the one privileged_vm defined: an entry runs its handler. */
    npt_vcpu *c;
    CHECK_OK(npt_vcpu_create(vm, 0, &c));
    start_at_code(c);
    CHECK_OK(npt_vcpu_raise_privileged(c));
    npt_exit e = exit_init();
    CHECK_OK(npt_vcpu_run(c, &e));
    CHECK(e.reason == NPT_EXIT_IO && e.io_port == 9);
    CHECK_OK(npt_vm_destroy(vm));
    CHECK_OK(npt_context_destroy(ctx));
}

/* Row 19: other size_t arguments of 2^63 and up: refused with a message that names the value. */
static void row19(void) {
    npt_context *ctx = new_context();
    npt_vm *vm = new_vm(ctx, NULL, 1u << 20);
    size_t big = (size_t)1 << 63;
    npt_policy_range pr = { 0, 0x1000, NPT_PAGE_4K, R };
    CHECK_ST(npt_policy_set_ranges(vm, &pr, big), NPT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(npt_last_error(), "9223372036854775808") != NULL);
    npt_backend_info bi = { .size = sizeof bi };
    CHECK_ST(npt_backend_get(ctx, SIZE_MAX, &bi), NPT_ERR_NOT_FOUND);
    CHECK(strstr(npt_last_error(), "18446744073709551615") != NULL);
    npt_host_pmem_region hr = { .size = sizeof hr };
    CHECK_ST(npt_vm_host_pmem_get(vm, SIZE_MAX, &hr), NPT_ERR_NOT_FOUND);
    CHECK(strstr(npt_last_error(), "18446744073709551615") != NULL);
    size_t needed = 0;
    CHECK_ST(npt_vm_get_nfit(vm, NULL, SIZE_MAX, &needed), NPT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(npt_last_error(), "18446744073709551615") != NULL);
    CHECK_ST(npt_vm_get_nvdimm_ssdt(vm, NULL, big, &needed), NPT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(npt_last_error(), "9223372036854775808") != NULL);
    size_t rc, tc;
    CHECK_ST(npt_host_pmem_discover_sysfs("/nonexistent", NULL, SIZE_MAX, &rc, NULL, 0, &tc), NPT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(npt_last_error(), "18446744073709551615") != NULL);
    /* ABI 1.3's size_t arguments. */
    size_t count = 0;
    CHECK_ST(npt_vm_backend_stats(vm, NULL, SIZE_MAX, &count), NPT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(npt_last_error(), "18446744073709551615") != NULL);
    CHECK_ST(npt_plugin_load_with(ctx, "/nonexistent.so", NULL, big, NULL), NPT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(npt_last_error(), "9223372036854775808") != NULL);
    CHECK_OK(npt_vm_destroy(vm));
    CHECK_OK(npt_context_destroy(ctx));
}

/* Row 20: npt_handle_exit given an exit that never happened is refused (NPT_ERR_STATE) and changes
 * nothing; a backend table with undefined capability bits is refused. */
static void row20(void) {
    npt_context *ctx = new_context();
    npt_vm *vm = privileged_vm(ctx, 100);
    npt_vcpu *c;
    CHECK_OK(npt_vcpu_create(vm, 0, &c));
    start_at_code(c);
    uint32_t action = 99;
    npt_exit e = exit_init();
    e.reason = NPT_EXIT_ESCALATION;
    CHECK_ST(npt_handle_exit(c, &e, &action), NPT_ERR_STATE);
    CHECK_EQ(action, 99);
    e.reason = NPT_EXIT_LEAVE_MODE;
    CHECK_ST(npt_handle_exit(c, &e, &action), NPT_ERR_STATE);
    npt_stats st = { .size = sizeof st };
    CHECK_OK(npt_vm_get_stats(vm, &st));
    CHECK_EQ(st.exits_escalation, 0);
    CHECK_EQ(st.hierarchy_switches, 1); /* only the set_regs switch to the user hierarchy */
    /* A real raw exit is decided once; a second time it is refused. */
    e = exit_init();
    CHECK_OK(npt_vcpu_run_raw(c, &e));
    CHECK_EQ(e.reason, NPT_EXIT_BUDGET);
    npt_exit copy = e;
    CHECK_OK(npt_handle_exit(c, &e, &action));
    CHECK_EQ(action, NPT_ACTION_TOOL);
    CHECK_ST(npt_handle_exit(c, &copy, &action), NPT_ERR_STATE);
    /* A raw exit decided as another one is refused. */
    e = exit_init();
    CHECK_OK(npt_vcpu_run_raw(c, &e));
    e.reason = NPT_EXIT_ESCALATION;
    CHECK_ST(npt_handle_exit(c, &e, &action), NPT_ERR_STATE);
    CHECK_OK(npt_vm_destroy(vm));

    npt_backend_ops o = faulty_ops();
    o.name = "undefined-bits";
    o.capabilities |= UINT64_C(1) << 40;
    CHECK_ST(npt_backend_register(ctx, &o), NPT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(npt_last_error(), "capabilities") != NULL);
    size_t count = 0;
    CHECK_OK(npt_backend_count(ctx, &count));
    CHECK_EQ(count, 2); /* sim and faulty */
    CHECK_OK(npt_context_destroy(ctx));
}

/* ------------------------------------------------------------------------ */
static const struct { const char *name; void (*fn)(void); } rows[] = {
    { "1", row1 }, { "2", row2 }, { "3", row3 }, { "4", row4 }, { "5", row5 }, { "6", row6 },
    { "7", row7 }, { "8", row8 }, { "9", row9 }, { "10", row10 }, { "11", row11 }, { "13", row13 },
    { "14", row14 }, { "15", row15 }, { "16", row16 }, { "17", row17 }, { "18", row18 }, { "19", row19 },
    { "20", row20 },
};

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s ROW|list\n", argv[0]); return 2; }
    if (strcmp(argv[1], "list") == 0) {
        for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) printf("%s\n", rows[i].name);
        return 0;
    }
    for (size_t i = 0; i < sizeof rows / sizeof rows[0]; i++) {
        if (strcmp(argv[1], rows[i].name) != 0) continue;
        rows[i].fn();
        free_kept();
        printf("c-test test_robustness %s: %d passed, %d failed\n", argv[1], passed, failed + skipped);
        return failed != 0;
    }
    fprintf(stderr, "no row %s\n", argv[1]);
    return 2;
}
