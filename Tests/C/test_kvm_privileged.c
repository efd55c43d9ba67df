/*
 * test_kvm_privileged.c - the privileged mode (SMM-like, global view) on the KVM backend plugin,
 * with real vCPU threads running the real-mode guest Sources/NPTScenarios/Guests/x86-64/priv.S.
 *
 * Usage: test_kvm_privileged KVM_SO [REQUESTS [VCPUS]]   (defaults 60, 3; VCPUS 2 or 3)
 * Always run: the plugin loads and advertises NPT_CAP_PRIVILEGED_MODE.
 * Needs a usable /dev/kvm (else SKIPPED with the reason, exit 77):
 *  - kick latency: a vCPU thread runs the loop through the plugin's ops; another thread kicks it;
 *    the time from vcpu_kick to vcpu_run returning NPT_EXIT_KICKED (median, max of 200);
 *  - a VM on "kvm" (NPT_MBEC_LAZY, RAM 0xA0000 = 640 KiB, RAM R|W, the loop's code page R|W|SX),
 *    the region at 0xA0000 (legacy SMRAM, 4 KiB, entry offset 8), nvcpu vCPU threads in
 *    npt_vcpu_run, REQUESTS enter-mode requests from the main thread (one at a time, then bursts
 *    that race on every vCPU): every request is served once (npt_vm_get_privileged_stats), the
 *    handler never sees a heartbeat move, a vCPU outside the mode never reads the region's bytes
 *    (its probe reads all ones), the handler's entry counter counts every entry, and after the
 *    last RSM the region is absent from every hierarchy and no vCPU holds the mode; the plugin was
 *    told of each entry and leave exactly once and saw each RSM (its statistics privileged_entries,
 *    privileged_leaves, rsm_exits, region_unbacked_reads through npt_vm_backend_stats);
 *  - a long-mode vCPU (hello.S at CPL 0, paging on) enters the mode (16-bit real mode in the
 *    region), RSMs, and its full state comes back: same registers, and it goes on to print
 *    "hello" with 64-bit code and halt;
 *  - RSM outside the mode (real mode): KVM raises #UD itself, delivered to the guest's IVT handler;
 *    (long mode without an IDT): a triple fault (NPT_EXIT_INTERNAL_ERROR, KVM_EXIT_SHUTDOWN), as on
 *    hardware: the plugin takes an RSM for the leave exit only from a vCPU the core put in the mode;
 *  - fails closed: the same plugin registered through a table without vcpu_enter_privileged (so the
 *    core writes the entry state with set_regs, the old way a backend had to guess from): the region
 *    stays out of the vCPU's view, the handler never runs, and the vCPU goes on after the leave.
 * Prints "c-test test_kvm_privileged: N passed, M failed, K skipped".
 */
#define _GNU_SOURCE
#include <nptkit.h>

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../../Sources/NPTScenarios/Guests/x86-64/hello_guest.h"
#include "../../Sources/NPTScenarios/Guests/x86-64/priv_guest.h"

#include "check.h"

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}
static void sleep_us(long us) {
    struct timespec ts = {us / 1000000, (us % 1000000) * 1000};
    nanosleep(&ts, NULL);
}
static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

#define RAM UINT64_C(0xA0000)
#define MAXVCPU 3
static uint32_t nvcpu = 3;
#define MAXREQ 4096

static const npt_backend_ops *entry_ops;


static void real_regs(npt_regs *r, uint64_t rip, uint32_t index) {
    memset(r, 0, sizeof *r);
    r->size = sizeof *r;
    r->rip = rip;
    r->rflags = 2;
    r->gpr[3] = PRIV_GUEST_HEARTBEATS + 4 * index; /* bx */
    r->gpr[4] = 0x8000;                              /* sp (unused) */
}

/* ------------------------------------------------------------------------ */
/* Kick latency through the plugin's ops (no core in between).              */
struct kick_run {
    const npt_backend_ops *o;
    void *vc;
    atomic_int stop;
    atomic_uint_fast64_t kicked_at; /* set by the kicker, 0 when served */
    uint64_t lat[256];
    atomic_int n;
    int errors;
};

static void *kick_runner(void *arg) {
    struct kick_run *k = arg;
    npt_exit e;
    while (!atomic_load(&k->stop)) {
        memset(&e, 0, sizeof e);
        e.size = sizeof e;
        if (k->o->vcpu_run(k->vc, &e) != NPT_OK) { k->errors++; break; }
        if (e.reason == NPT_EXIT_KICKED) {
            uint64_t t = atomic_exchange(&k->kicked_at, 0);
            if (t) {
                int i = atomic_load(&k->n);
                if (i < 256) k->lat[i] = now_ns() - t;
                atomic_store(&k->n, i + 1);
            }
        } else if (e.reason != NPT_EXIT_IO) {
            k->errors++;
            fprintf(stderr, "kick runner: exit %u at %#" PRIx64 " (q %#" PRIx64 ", gpa %#" PRIx64 ")\n", e.reason, e.rip,
                    e.qualification, e.gpa);
            break;
        }
    }
    return NULL;
}

static void test_kick_latency(void) {
    const npt_backend_ops *o = entry_ops;
    if (!o) return;
    npt_vm_config cfg = {0};
    cfg.size = sizeof cfg;
    cfg.mbec_mode = NPT_MBEC_LAZY;
    cfg.ram_size = 0x100000; /* the probe at 0xA0000 reads RAM here: all ones */
    cfg.default_perms = NPT_PERM_ALL;
    void *vm = NULL;
    CHECK_OK(o->vm_create(o->backend_data, NULL, &cfg, &vm));
    if (!vm) return;
    uint8_t ones[4096];
    memset(ones, 0xFF, sizeof ones);
    CHECK_OK(o->memory_write(vm, PRIV_GUEST_REGION, ones, sizeof ones));
    CHECK_OK(o->memory_write(vm, PRIV_GUEST_BASE, priv_guest, sizeof priv_guest));
    static struct kick_run k;
    memset(&k, 0, sizeof k);
    k.o = o;
    CHECK_OK(o->vcpu_create(vm, 0, &k.vc));
    if (k.vc) {
        npt_regs r;
        real_regs(&r, PRIV_GUEST_BASE, 0);
        CHECK_OK(o->vcpu_set_regs(k.vc, &r));
        pthread_t t;
        pthread_create(&t, NULL, kick_runner, &k);
        sleep_us(20000);
        int want = 200;
        for (int i = 0; i < want && !k.errors; i++) {
            atomic_store(&k.kicked_at, now_ns());
            o->vcpu_kick(k.vc);
            uint64_t deadline = now_ns() + 1000000000u;
            while (atomic_load(&k.n) <= i && now_ns() < deadline) sleep_us(50);
            if (atomic_load(&k.n) <= i) { fprintf(stderr, "kick %d not served in 1 s\n", i); break; }
            sleep_us(500 + (i % 7) * 100); /* kick at varying points of the loop */
        }
        atomic_store(&k.stop, 1);
        pthread_join(t, NULL);
        int n = atomic_load(&k.n);
        CHECK_EQ(n, want);
        CHECK_EQ(k.errors, 0);
        if (n > 0) {
            if (n > 256) n = 256;
            qsort(k.lat, (size_t)n, sizeof k.lat[0], cmp_u64);
            printf("test_kvm_privileged: kick to NPT_EXIT_KICKED (vcpu_kick -> vcpu_run returns), %d kicks: median %.1f us, "
                   "p90 %.1f us, max %.1f us\n", n, k.lat[n / 2] / 1000.0, k.lat[n * 9 / 10] / 1000.0, k.lat[n - 1] / 1000.0);
        }
        o->vcpu_destroy(k.vc);
    }
    o->vm_destroy(vm);
}

/* ------------------------------------------------------------------------ */
/* The mode with nvcpu vCPU threads.                                          */
struct vstate {
    npt_vcpu *v;
    uint32_t index;
    pthread_t thread;
    uint64_t heartbeats, leaks, moved_bad, errors, entries_seen, wrong_index;
    uint64_t last_count;
};
static struct vstate cpus[MAXVCPU];
static atomic_int stop_all;
static atomic_uint_fast64_t served;        /* handler OUTs of its entry count */
static atomic_uint_fast64_t max_count;     /* the largest entry count the handler reported */
static uint64_t raised_at[MAXVCPU][MAXREQ];  /* per vCPU, in order (requests are served in order) */
static atomic_uint raised_n[MAXVCPU], entered_n[MAXVCPU];
static uint64_t latency[MAXREQ];
static atomic_uint latency_n;

static void *vcpu_thread(void *arg) {
    struct vstate *s = arg;
    npt_exit e;
    while (!atomic_load(&stop_all)) {
        memset(&e, 0, sizeof e);
        e.size = sizeof e;
        npt_status st = npt_vcpu_run(s->v, &e);
        if (st != NPT_OK) {
            fprintf(stderr, "vCPU %u: npt_vcpu_run: %s: %s\n", s->index, npt_status_string(st), npt_last_error());
            s->errors++;
            break;
        }
        if (e.reason != NPT_EXIT_IO) {
            fprintf(stderr, "vCPU %u: exit %u at %#" PRIx64 " (q %#" PRIx64 ", gpa %#" PRIx64 ")\n", s->index, e.reason, e.rip,
                    e.qualification, e.gpa);
            s->errors++;
            break;
        }
        switch (e.io_port) {
        case 0x10:
            s->heartbeats++;
            if ((e.io_value & 0xFF) != 0xFF) s->leaks++; /* the probe's low byte */
            break;
        case 0x11:
            s->leaks++;
            break;
        case 0x20: { /* entered */
            uint64_t t = now_ns();
            unsigned k = atomic_fetch_add(&entered_n[s->index], 1);
            if (k < MAXREQ) {
                unsigned j = atomic_fetch_add(&latency_n, 1);
                if (j < MAXREQ) latency[j] = t - raised_at[s->index][k];
            }
            if ((uint32_t)e.io_value != s->index) s->wrong_index++;
            s->entries_seen++;
            break;
        }
        case 0x21:
            if ((uint32_t)e.io_value != 0) s->moved_bad++;
            break;
        case 0x22: {
            uint64_t c = (uint32_t)e.io_value, m = atomic_load(&max_count);
            while (c > m && !atomic_compare_exchange_weak(&max_count, &m, c)) {}
            s->last_count = c;
            atomic_fetch_add(&served, 1);
            break;
        }
        default:
            fprintf(stderr, "vCPU %u: OUT %#x = %#" PRIx64 "\n", s->index, e.io_port, e.io_value);
            s->errors++;
        }
    }
    return NULL;
}

static int raise_on(uint32_t i) {
    unsigned k = atomic_load(&raised_n[i]);
    if (k < MAXREQ) raised_at[i][k] = now_ns();
    atomic_store(&raised_n[i], k + 1);
    npt_status s = npt_vcpu_raise_privileged(cpus[i].v);
    if (s != NPT_OK) fprintf(stderr, "raise %u: %s: %s\n", i, npt_status_string(s), npt_last_error());
    return s == NPT_OK;
}

static int wait_served(uint64_t n, uint64_t timeout_ns) {
    uint64_t deadline = now_ns() + timeout_ns;
    while (atomic_load(&served) < n && now_ns() < deadline) sleep_us(200);
    return atomic_load(&served) >= n;
}

/* A VM of `backend` (RAM 0xA0000 R|W, lazy) with priv.S's loop at its base; NULL if refused. */
static npt_vm *priv_vm(npt_context *ctx, const char *backend) {
    npt_vm_config cfg = {0};
    cfg.size = sizeof cfg;
    cfg.mbec_mode = NPT_MBEC_LAZY;
    cfg.backend = backend;
    cfg.ram_size = RAM;
    cfg.default_perms = NPT_PERM_READ | NPT_PERM_WRITE;
    npt_vm *vm = NULL;
    CHECK_OK(npt_vm_create(ctx, &cfg, &vm));
    if (!vm) return NULL;
    /* real mode (paging off): every address is user-mode, so the loop needs UX under MBEC */
    CHECK_OK(npt_policy_set(vm, PRIV_GUEST_BASE, 0x1000, 0x1000, NPT_PERM_READ | NPT_PERM_WRITE | NPT_PERM_UX));
    CHECK_OK(npt_vm_write_memory(vm, PRIV_GUEST_BASE, priv_guest, sizeof priv_guest));
    return vm;
}

static void test_mode(npt_context *ctx, int requests) {
    npt_vm *vm = priv_vm(ctx, "kvm");
    if (!vm) return;

    /* a region inside RAM is refused by the core; the real one at 0xA0000 */
    npt_region reg;
    memset(&reg, 0, sizeof reg);
    reg.size = sizeof reg;
    reg.gpa = 0x90000;
    reg.length = 0x1000;
    CHECK_ST(npt_region_set(vm, &reg), NPT_ERR_OVERLAP);
    reg.gpa = PRIV_GUEST_REGION;
    reg.length = sizeof priv_guest_region;
    reg.contents = priv_guest_region;
    reg.contents_len = sizeof priv_guest_region;
    reg.entry_offset = PRIV_GUEST_REGION_ENTRY;
    reg.perms = 0; /* R|W|SX|UX */
    CHECK_OK(npt_region_set(vm, &reg));
    npt_translation tr;
    for (uint32_t h = 0; h < NPT_HIERARCHY_COUNT; h++) {
        memset(&tr, 0, sizeof tr);
        tr.size = sizeof tr;
        CHECK_OK(npt_hierarchy_translate(vm, h, PRIV_GUEST_REGION, &tr));
        CHECK_EQ(tr.perms, 0); /* absent before any entry */
    }


    for (uint32_t i = 0; i < nvcpu; i++) {
        cpus[i].index = i;
        CHECK_OK(npt_vcpu_create(vm, i, &cpus[i].v));
        if (!cpus[i].v) return;
        npt_regs r;
        real_regs(&r, PRIV_GUEST_BASE, i);
        CHECK_OK(npt_vcpu_set_regs(cpus[i].v, &r));
    }
    for (uint32_t i = 0; i < nvcpu; i++) pthread_create(&cpus[i].thread, NULL, vcpu_thread, &cpus[i]);
    sleep_us(50000);

    /* one at a time, rotating over the vCPUs */
    int single = requests / 2, total = 0, ok = 1;
    for (int k = 0; k < single && ok; k++) {
        if (!raise_on((uint32_t)k % nvcpu)) { ok = 0; break; }
        total++;
        if (!wait_served((uint64_t)total, 5000000000u)) {
            fprintf(stderr, "request %d not served in 5 s\n", k);
            ok = 0;
        }
        sleep_us(2000); /* let the heartbeats move between entries */
    }
    /* bursts: every vCPU at once (the requests race; they are serialized) */
    for (int k = 0; ok && total + (int)nvcpu <= requests; k++) {
        for (uint32_t i = 0; i < nvcpu; i++) {
            if (!raise_on(i)) ok = 0;
            else total++;
        }
        if (!wait_served((uint64_t)total, 10000000000u)) {
            fprintf(stderr, "burst %d not served in 10 s (%" PRIu64 " of %d)\n", k, (uint64_t)atomic_load(&served), total);
            ok = 0;
        }
        sleep_us(2000);
    }
    CHECK(ok);
    sleep_us(20000);
    atomic_store(&stop_all, 1);
    for (uint32_t i = 0; i < nvcpu; i++) pthread_join(cpus[i].thread, NULL);

    npt_privileged_stats st;
    memset(&st, 0, sizeof st);
    st.size = sizeof st;
    CHECK_OK(npt_vm_get_privileged_stats(vm, &st));
    CHECK_EQ(st.requests, (uint64_t)total);
    CHECK_EQ(st.entries, (uint64_t)total);
    CHECK_EQ(st.failures, 0);
    CHECK_EQ(atomic_load(&served), (uint64_t)total);
    CHECK_EQ(atomic_load(&max_count), (uint64_t)total); /* the handler's own counter */
    uint64_t hb = 0, leaks = 0, moved = 0, errors = 0, wrong = 0, seen = 0;
    for (uint32_t i = 0; i < nvcpu; i++) {
        CHECK(cpus[i].heartbeats > 0);
        hb += cpus[i].heartbeats;
        leaks += cpus[i].leaks;
        moved += cpus[i].moved_bad;
        errors += cpus[i].errors;
        wrong += cpus[i].wrong_index;
        seen += cpus[i].entries_seen;
        CHECK_EQ(cpus[i].entries_seen, atomic_load(&raised_n[i]));
    }
    CHECK_EQ(leaks, 0);
    CHECK_EQ(moved, 0);
    CHECK_EQ(errors, 0);
    CHECK_EQ(wrong, 0);
    CHECK_EQ(seen, (uint64_t)total);
    int64_t holder = 7;
    CHECK_OK(npt_vm_privileged_holder(vm, &holder));
    CHECK_EQ((uint64_t)holder, (uint64_t)-1);
    for (uint32_t h = 0; h < NPT_HIERARCHY_COUNT; h++) {
        memset(&tr, 0, sizeof tr);
        tr.size = sizeof tr;
        CHECK_OK(npt_hierarchy_translate(vm, h, PRIV_GUEST_REGION, &tr));
        CHECK_EQ(tr.perms, 0); /* absent after the last RSM */
    }
    uint32_t beats[MAXVCPU] = {0};
    CHECK_OK(npt_vm_read_memory(vm, PRIV_GUEST_HEARTBEATS, beats, sizeof beats));
    uint64_t adds = backend_stat(vm, "privileged_entries"), removes = backend_stat(vm, "privileged_leaves");
    uint64_t unbacked = backend_stat(vm, "region_unbacked_reads");
    CHECK_EQ(adds, (uint64_t)total);
    CHECK_EQ(removes, (uint64_t)total);
    CHECK_EQ(backend_stat(vm, "rsm_exits"), (uint64_t)total);
    CHECK(unbacked > 0);
    for (uint32_t i = 0; i < nvcpu; i++) {
        npt_backend_stat st[16];
        size_t n = 0;
        CHECK_OK(npt_vcpu_backend_stats(cpus[i].v, st, 16, &n));
        for (size_t k = 0; k < n && k < 16; k++)
            if (strcmp(st[k].name, "in_privileged_mode") == 0) CHECK_EQ(st[k].value, 0);
    }
    unsigned n = atomic_load(&latency_n);
    if (n > MAXREQ) n = MAXREQ;
    qsort(latency, n, sizeof latency[0], cmp_u64);
    printf("test_kvm_privileged: %u vCPU threads, %d requests (%d one at a time, %d in bursts of %u): %" PRIu64
           " entries, %" PRIu64 " failures; heartbeats in RAM %u %u %u, heartbeat OUTs %" PRIu64
           "; handler saw a heartbeat move %" PRIu64 " times; region leaked to a probe %" PRIu64
           " times (probes answered all ones: %" PRIu64 ")\n",
           nvcpu, total, single, total - single, nvcpu, st.entries, st.failures, beats[0], beats[1], beats[2], hb, moved,
           leaks, unbacked);
    printf("test_kvm_privileged: region memslot: %" PRIu64 " adds, %" PRIu64 " removes for %d entries\n", adds, removes,
           total);
    if (st.entries && n)
        printf("test_kvm_privileged: entry latency (raise -> handler's first OUT seen by the VMM): median %.1f us, p90 %.1f us, "
               "max %.1f us (n %u); core stats (raise -> entry): mean %.1f us, max %.1f us; others stopped %.1f us per entry\n",
               latency[n / 2] / 1000.0, latency[n * 9 / 10] / 1000.0, latency[n - 1] / 1000.0, n,
               st.entry_latency_total_ns / 1000.0 / (double)st.entries, st.entry_latency_max_ns / 1000.0,
               st.stopped_total_ns / 1000.0 / (double)st.entries);
    CHECK_OK(npt_vm_destroy(vm));
}

/* ------------------------------------------------------------------------ */
/* A long-mode vCPU through the mode and back; RSM outside the mode.          */
#define CR0_LONG (UINT64_C(0x80000001) | 0x10 | 0x20 | 0x10000 | 0x2) /* PG|PE|ET|NE|WP|MP */

static npt_exit run1(npt_vcpu *v) {
    npt_exit e;
    memset(&e, 0, sizeof e);
    e.size = sizeof e;
    npt_status s = npt_vcpu_run(v, &e);
    if (s != NPT_OK) {
        fprintf(stderr, "npt_vcpu_run: %s: %s\n", npt_status_string(s), npt_last_error());
        e.reason = NPT_EXIT_NONE;
    }
    return e;
}

/* The privileged-mode region of priv.S at 0xA0000 (legacy SMRAM), entry offset 8, R|W|SX|UX. */
static void set_priv_region(npt_vm *vm) {
    npt_region reg;
    memset(&reg, 0, sizeof reg);
    reg.size = sizeof reg;
    reg.gpa = PRIV_GUEST_REGION;
    reg.length = sizeof priv_guest_region;
    reg.contents = priv_guest_region;
    reg.contents_len = sizeof priv_guest_region;
    reg.entry_offset = PRIV_GUEST_REGION_ENTRY;
    CHECK_OK(npt_region_set(vm, &reg));
}

static void test_long_mode_round_trip(npt_context *ctx) {
    npt_vm_config cfg = {0};
    cfg.size = sizeof cfg;
    cfg.mbec_mode = NPT_MBEC_LAZY;
    cfg.backend = "kvm";
    cfg.ram_size = RAM;
    cfg.default_perms = NPT_PERM_ALL;
    npt_vm *vm = NULL;
    CHECK_OK(npt_vm_create(ctx, &cfg, &vm));
    if (!vm) return;
    CHECK_OK(npt_vm_write_memory(vm, HELLO_GUEST_BASE, hello_guest, sizeof hello_guest));
    set_priv_region(vm);
    npt_vcpu *v = NULL;
    CHECK_OK(npt_vcpu_create(vm, 0, &v));
    if (!v) return;
    npt_regs r, back;
    memset(&r, 0, sizeof r);
    r.size = sizeof r;
    r.rip = HELLO_GUEST_LONG_ENTRY;
    r.rflags = 2;
    r.gpr[4] = 0x8000;
    r.gpr[12] = 0x1234567890abcdefULL; /* r12: must survive */
    r.cr0 = CR0_LONG;
    r.cr3 = HELLO_GUEST_CR3;
    r.cr4 = 0x20;
    r.efer = 0x500;
    r.lstar = 0xffffffff81000000ULL;
    CHECK_OK(npt_vcpu_set_regs(v, &r));
    CHECK_OK(npt_vcpu_raise_privileged(v));
    /* the entry happens at the run's first checkpoint: the handler's OUTs come first */
    npt_exit e = run1(v);
    CHECK_EQ(e.reason, NPT_EXIT_IO);
    CHECK_EQ(e.io_port, 0x20);
    CHECK_EQ(e.io_value, 0); /* eax = the vCPU's index */
    CHECK_EQ(e.cpl, 0);
    int64_t holder = -1;
    CHECK_OK(npt_vm_privileged_holder(vm, &holder));
    CHECK_EQ(holder, 0);
    memset(&back, 0, sizeof back);
    back.size = sizeof back;
    CHECK_OK(npt_vcpu_get_regs(v, &back));
    CHECK_EQ(back.cr0 & 1, 0);                           /* real mode in the region */
    CHECK_EQ(back.rip, PRIV_GUEST_REGION + PRIV_GUEST_REGION_ENTRY + 3); /* linear, after the OUT */
    e = run1(v);
    CHECK_EQ(e.reason, NPT_EXIT_IO);
    CHECK_EQ(e.io_port, 0x21);
    e = run1(v);
    CHECK_EQ(e.reason, NPT_EXIT_IO);
    CHECK_EQ(e.io_port, 0x22);
    /* RSM: restored; the next exits are the 64-bit code's */
    char out[16];
    size_t n = 0;
    for (int i = 0; i < 16; i++) {
        e = run1(v);
        if (e.reason == NPT_EXIT_IO && e.io_port == 0xE9 && n + 1 < sizeof out) { out[n++] = (char)e.io_value; continue; }
        break;
    }
    out[n] = 0;
    CHECK(strcmp(out, "hello") == 0);
    CHECK_EQ(e.reason, NPT_EXIT_HALT);
    CHECK_OK(npt_vm_privileged_holder(vm, &holder));
    CHECK_EQ((uint64_t)holder, (uint64_t)-1);
    memset(&back, 0, sizeof back);
    back.size = sizeof back;
    CHECK_OK(npt_vcpu_get_regs(v, &back));
    CHECK_EQ(back.cr0, CR0_LONG);
    CHECK_EQ(back.cr3, HELLO_GUEST_CR3);
    CHECK_EQ(back.efer & 0x500, 0x500);
    CHECK_EQ(back.cpl, 0);
    CHECK_EQ(back.gpr[12], 0x1234567890abcdefULL);
    CHECK_EQ(back.lstar, 0xffffffff81000000ULL);
    printf("test_kvm_privileged: long-mode vCPU through the mode and back: printed \"%s\", halted at %#" PRIx64
           ", cr0 %#" PRIx64 " efer %#" PRIx64 "\n", out, e.rip, back.cr0, back.efer);

    /* RSM outside the mode, real mode: KVM itself raises #UD, delivered through the guest's IVT
       (IVT[6] = 0:0x1110, a handler that OUTs 6 to port 0x23 and halts) */
    CHECK_OK(npt_vm_write_memory(vm, 0x1000, priv_guest, 0x200));
    uint16_t ivt6[2] = {PRIV_GUEST_UD_HANDLER, 0};
    CHECK_OK(npt_vm_write_memory(vm, 6 * 4, ivt6, sizeof ivt6));
    memset(&r, 0, sizeof r);
    r.size = sizeof r;
    r.rip = PRIV_GUEST_RSM_OUTSIDE;
    r.rflags = 2;
    r.gpr[4] = 0x7000;
    CHECK_OK(npt_vcpu_set_regs(v, &r));
    e = run1(v);
    CHECK_EQ(e.reason, NPT_EXIT_IO);
    CHECK_EQ(e.io_port, 0x23);
    CHECK_EQ(e.io_value, 6);
    e = run1(v);
    CHECK_EQ(e.reason, NPT_EXIT_HALT);
    CHECK_OK(npt_vm_privileged_holder(vm, &holder));
    CHECK_EQ((uint64_t)holder, (uint64_t)-1);
    printf("test_kvm_privileged: RSM outside the mode (real mode): the guest's own #UD handler ran (OUT 0x23 = %" PRIu64
           "), the mode was not touched\n", (uint64_t)6);

    /* RSM outside the mode, long mode without an IDT: the #UD triple-faults, as on hardware; the
       plugin takes an RSM for the leave exit only from a vCPU the core put in the mode, so the VMM
       gets the triple fault (NPT_EXIT_INTERNAL_ERROR, KVM_EXIT_SHUTDOWN in qualification bits
       63:32) at the RSM, and the plugin refuses to inject into the triple-faulted vCPU */
    const uint8_t rsm[] = {0x0F, 0xAA};
    CHECK_OK(npt_vm_write_memory(vm, HELLO_GUEST_BASE, hello_guest, sizeof hello_guest)); /* its page tables again */
    CHECK_OK(npt_vm_write_memory(vm, 0x6100, rsm, sizeof rsm));
    memset(&r, 0, sizeof r);
    r.size = sizeof r;
    r.rip = 0x6100;
    r.rflags = 2;
    r.gpr[4] = 0x8000;
    r.cr0 = CR0_LONG;
    r.cr3 = HELLO_GUEST_CR3;
    r.cr4 = 0x20;
    r.efer = 0x500;
    CHECK_OK(npt_vcpu_set_regs(v, &r));
    e = run1(v);
    CHECK_EQ(e.reason, NPT_EXIT_INTERNAL_ERROR);
    CHECK_EQ(e.qualification >> 32, 8); /* KVM_EXIT_SHUTDOWN */
    CHECK_EQ(e.rip, 0x6100);
    CHECK_ST(npt_vcpu_inject_fault(v, 6, 0, 0), NPT_ERR_STATE);
    printf("test_kvm_privileged: RSM outside the mode (long mode, no IDT): exit %u vector %u at %#" PRIx64
           " (qualification %#" PRIx64 ", gpa %#" PRIx64 ")\n", e.reason, e.vector, e.rip, e.qualification, e.gpa);
    CHECK_OK(npt_vm_destroy(vm));
}

/* ------------------------------------------------------------------------ */
/* Fails closed: the KVM plugin's table registered without vcpu_enter_privileged / _leave_privileged
 * (as a table built against ABI 1.2 would be: the core then writes the entry state with set_regs and
 * adds the region to the hierarchies, and a backend could only guess that the mode began). The
 * plugin maps the region for a vCPU only once it was told: here the handler never runs, its magic
 * is never read, no entry is counted, and after the leave the vCPU goes on with its loop. */
static void test_fails_closed(npt_context *ctx) {
    if (!entry_ops) return;
    static npt_backend_ops blind;
    blind = *entry_ops;
    blind.name = "kvm-no-enter-op";
    blind.vcpu_enter_privileged = NULL;
    blind.vcpu_leave_privileged = NULL;
    CHECK_OK(npt_backend_register(ctx, &blind));
    npt_vm *vm = priv_vm(ctx, blind.name);
    if (!vm) return;
    set_priv_region(vm);
    npt_vcpu *v = NULL;
    CHECK_OK(npt_vcpu_create(vm, 0, &v));
    if (!v) return;
    npt_regs r;
    real_regs(&r, PRIV_GUEST_BASE, 0);
    CHECK_OK(npt_vcpu_set_regs(v, &r));
    npt_exit e = run1(v);
    CHECK(e.reason == NPT_EXIT_IO && e.io_port == 0x10); /* the loop runs: a heartbeat */
    CHECK_OK(npt_vcpu_raise_privileged(v));
    /* The core enters (the region is in the hierarchies now); the plugin, not told, keeps it out of
       the view: the fetch at the entry finds nothing, and whatever the vCPU does it is not the handler. */
    int handler = 0, leaked = 0, exits = 0;
    npt_exit last;
    memset(&last, 0, sizeof last);
    for (; exits < 64; exits++) {
        e = run1(v);
        if (e.reason == NPT_EXIT_IO && (e.io_port == 0x20 || e.io_port == 0x21 || e.io_port == 0x22)) handler = 1;
        if (e.reason == NPT_EXIT_IO && e.io_port == 0x11) leaked = 1;
        if (e.reason != NPT_EXIT_IO) { last = e; break; }
    }
    int64_t holder = -2;
    CHECK_OK(npt_vm_privileged_holder(vm, &holder));
    printf("test_kvm_privileged: fails closed: a table without the enter op: the core holds the mode for vCPU %" PRId64
           ", the vCPU stopped with exit %u (qualification %#" PRIx64 ", gpa %#" PRIx64 ", rip %#" PRIx64
           ") after %d I/O exits; handler ran: %s, region read: %s; plugin's privileged_entries %" PRIu64 "\n", holder,
           last.reason, last.qualification, last.gpa, last.rip, exits, handler ? "YES" : "no", leaked ? "YES" : "no",
           backend_stat(vm, "privileged_entries"));
    CHECK_EQ((uint64_t)holder, 0);
    CHECK(!handler);
    CHECK(!leaked);
    CHECK(last.reason != NPT_EXIT_NONE && last.reason != NPT_EXIT_LEAVE_MODE);
    CHECK_EQ(backend_stat(vm, "privileged_entries"), 0);
    CHECK_EQ(backend_stat(vm, "rsm_exits"), 0);
    /* the VMM ends the mode; the vCPU is back in its loop */
    CHECK_OK(npt_vcpu_leave_privileged(v));
    CHECK_OK(npt_vm_privileged_holder(vm, &holder));
    CHECK_EQ((uint64_t)holder, (uint64_t)-1);
    e = run1(v);
    CHECK(e.reason == NPT_EXIT_IO && e.io_port == 0x10);
    CHECK_OK(npt_vcpu_destroy(v));
    CHECK_OK(npt_vm_destroy(vm));
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s libnptkit-kvm.so [requests]\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *so = argv[1];
    int requests = argc > 2 ? atoi(argv[2]) : 60;
    if (requests < 2 || requests > MAXREQ / 2) requests = 60;
    if (argc > 3 && (atoi(argv[3]) == 2 || atoi(argv[3]) == 3)) nvcpu = (uint32_t)atoi(argv[3]);

    npt_context *ctx = NULL;
    CHECK_OK(npt_context_create(&ctx));
    const char *name = NULL;
    CHECK_OK(npt_plugin_load(ctx, so, &name));
    CHECK(name && strcmp(name, "kvm") == 0);
    size_t nb = 0;
    CHECK_OK(npt_backend_count(ctx, &nb));
    int found = 0;
    for (size_t i = 0; i < nb; i++) {
        npt_backend_info info;
        memset(&info, 0, sizeof info);
        info.size = sizeof info;
        CHECK_OK(npt_backend_get(ctx, i, &info));
        if (strcmp(info.name, "kvm") == 0) {
            found = 1;
            CHECK(info.capabilities & NPT_CAP_PRIVILEGED_MODE);
        }
    }
    CHECK(found);
    void *lib = dlopen(so, RTLD_NOW | RTLD_NOLOAD);
    CHECK(lib != NULL);
    if (lib) {
        npt_plugin_init_fn init = (npt_plugin_init_fn)(uintptr_t)dlsym(lib, NPT_PLUGIN_INIT_SYMBOL);
        /* the plugin's own ops table (for the kick measurement without the core, and the table
           without the enter op): a second load, with a host table of the same functions the loader
           gives */
        static npt_host_api host;
        host.abi_version = NPT_ABI_VERSION;
        host.size = sizeof host;
        host.hierarchy_translate = npt_hierarchy_translate;
        host.hierarchy_leaves = npt_hierarchy_leaves;
        host.status_string = npt_status_string;
        npt_plugin_info info = {0};
        info.size = sizeof info;
        info.abi_version = NPT_ABI_VERSION;
        info.host = &host;
        info.path = so;
        CHECK(init != NULL);
        if (init) CHECK_OK(init(&info, &entry_ops));
    }

    int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        int err = errno;
        printf("test_kvm_privileged: SKIPPED: /dev/kvm cannot be opened (%s)\n", strerror(err));
        skipped++;
    } else {
        close(fd);
        test_kick_latency();
        test_long_mode_round_trip(ctx);
        test_mode(ctx, requests);
        test_fails_closed(ctx);
    }
    CHECK_OK(npt_context_destroy(ctx));
    printf("c-test test_kvm_privileged: %d passed, %d failed, %d skipped\n", passed, failed, skipped);
    if (failed) return 1;
    return skipped ? 77 : 0;
}
