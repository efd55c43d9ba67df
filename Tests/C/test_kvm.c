/*
 * test_kvm.c - the KVM backend plugin (libnptkit-kvm.so, Plugins/KVM) through the real plugin
 * loader, running a real x86-64 guest (Sources/NPTScenarios/Guests/x86-64/hello.S) through /dev/kvm.
 *
 * Usage: test_kvm KVM_SO
 * Always run: the plugin's npt_plugin_init (interface 2; it exports no npt_plugin_entry) refuses a host
 * of another ABI major, returns a well-formed ops table, and npt_plugin_load registers it as "kvm".
 * Needs a usable /dev/kvm: guest runs (long mode and real mode), the printed bytes and the HALT,
 * register round trips, out-of-range memory access refused (by the core and by the plugin itself),
 * kicks; persistent memory (Sources/NPTScenarios/Guests/x86-64/pmem.S: N flushes of records into an NVDIMM range
 * backed by the plugin's file, exactly N trapped vFHA exits and msyncs, none with the plugin
 * argument pmem-needs-flush=0; timings printed). The plugin's counters are read by name through
 * npt_vm_backend_stats. Without /dev/kvm (missing, EACCES) those are SKIPPED with the reason, vm_create must fail
 * with NPT_ERR_UNSUPPORTED, and the program exits 77.
 * Prints "c-test test_kvm: N passed, M failed, K skipped"; exits 1 if M > 0, 77 if K > 0, else 0.
 */
#define _GNU_SOURCE
#include <nptkit.h>

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../../Sources/NPTScenarios/Guests/x86-64/hello_guest.h"
#include "../../Sources/NPTScenarios/Guests/x86-64/pmem_guest.h"
#include "../../Sources/NPTScenarios/Guests/x86-64/kernel_guest.h"
#include "../../Sources/NPTScenarios/Guests/x86-64/gate_guest.h"
#include "../../Sources/NPTScenarios/Guests/x86-64/smp_guest.h"
#include <stdatomic.h>

#include "check.h"

#define RAM (UINT64_C(2) << 20)
#define CR0_LONG (UINT64_C(0x80000001) | 0x10 | 0x20 | 0x10000 | 0x2) /* PG|PE|ET|NE|WP|MP */

static void long_mode_regs(npt_regs *r, uint64_t rip) {
    memset(r, 0, sizeof *r);
    r->size = sizeof *r;
    r->cpl = 0;
    r->rip = rip;
    r->rflags = 2;
    r->gpr[4] = 0x8000; /* rsp */
    r->cr0 = CR0_LONG;
    r->cr3 = HELLO_GUEST_CR3;
    r->cr4 = 0x20;      /* PAE */
    r->efer = 0x500;    /* LME|LMA */
}

/* A VM on backend "kvm" in MBEC mode `mode`; NULL after a failed check. */
static npt_vm *kvm_vm_mode(npt_context *ctx, uint64_t ram, uint64_t default_perms, uint32_t mode) {
    npt_vm_config cfg = {0};
    cfg.size = sizeof cfg;
    cfg.mbec_mode = mode;
    cfg.backend = "kvm";
    cfg.ram_size = ram;
    cfg.default_perms = default_perms;
    npt_vm *vm = NULL;
    CHECK_OK(npt_vm_create(ctx, &cfg, &vm));
    return vm;
}

/* A lazy-mode VM on backend "kvm" (most test VMs of this file are one); NULL after a failed check. */
static npt_vm *kvm_vm(npt_context *ctx, uint64_t ram, uint64_t default_perms) {
    npt_vm_config cfg = {0};
    cfg.size = sizeof cfg;
    cfg.mbec_mode = NPT_MBEC_LAZY;
    cfg.backend = "kvm";
    cfg.ram_size = ram;
    cfg.default_perms = default_perms;
    npt_vm *vm = NULL;
    CHECK_OK(npt_vm_create(ctx, &cfg, &vm));
    return vm;
}

/* Runs until HALT, collecting the bytes written to port 0xE9. Returns the last exit. */
static npt_exit run_to_halt(npt_vcpu *v, char *out, size_t cap, size_t *len) {
    npt_exit e;
    *len = 0;
    for (int i = 0; i < 64; i++) {
        memset(&e, 0, sizeof e);
        e.size = sizeof e;
        npt_status s = npt_vcpu_run(v, &e);
        if (s != NPT_OK) {
            fprintf(stderr, "npt_vcpu_run: %s: %s\n", npt_status_string(s), npt_last_error());
            e.reason = NPT_EXIT_NONE;
            return e;
        }
        if (e.reason == NPT_EXIT_IO && e.io_port == 0xE9) {
            if (*len + 1 < cap) out[(*len)++] = (char)e.io_value;
            continue;
        }
        break;
    }
    out[*len] = 0;
    return e;
}

/* ------------------------------------------------------------------------ */
static const npt_backend_ops *entry_ops; /* the table from a direct call of npt_plugin_init */

/* Layout installs, memslot updates in total and in the last install. */
static void layout_stats(npt_vm *vm, uint64_t *installs, uint64_t *updates, uint64_t *last) {
    *installs = backend_stat(vm, "layout_installs");
    *updates = backend_stat(vm, "memslot_updates");
    *last = backend_stat(vm, "memslot_updates_last_install");
}
/* Physical flushes (msync) and their time. */
static void pmem_stats(npt_vm *vm, uint64_t *flushes, uint64_t *nanos) {
    *flushes = backend_stat(vm, "physical_flushes");
    *nanos = backend_stat(vm, "physical_flush_ns");
}
/* Data accesses the plugin completed after an MMIO exit, RAM and NVDIMM. */
static void mmio_stats(npt_vm *vm, uint64_t *ram, uint64_t *nvdimm) {
    *ram = backend_stat(vm, "mmio_completed_ram");
    *nvdimm = backend_stat(vm, "mmio_completed_nvdimm");
}
/* Views created, moves between them, zaps, dirty-log reads. */
static void view_stats(npt_vm *vm, uint64_t *views, uint64_t *moves, uint64_t *zaps, uint64_t *reads) {
    *views = backend_stat(vm, "views_created");
    *moves = backend_stat(vm, "view_moves");
    *zaps = backend_stat(vm, "view_zaps");
    *reads = backend_stat(vm, "dirty_log_reads");
}

static npt_status fake_translate(npt_vm *vm, uint32_t h, uint64_t gpa, npt_translation *out) {
    (void)vm; (void)h; (void)gpa; (void)out;
    return NPT_ERR_UNSUPPORTED;
}
static npt_status fake_leaves(npt_vm *vm, uint32_t h, npt_leaf_cb cb, void *ud) {
    (void)vm; (void)h; (void)cb; (void)ud;
    return NPT_ERR_UNSUPPORTED;
}
static const char *fake_status_string(npt_status s) { (void)s; return "fake"; }

static void test_entry(const char *so) {
    void *lib = dlopen(so, RTLD_NOW | RTLD_LOCAL);
    CHECK(lib != NULL);
    if (!lib) {
        fprintf(stderr, "dlopen %s: %s\n", so, dlerror());
        return;
    }
    CHECK(dlsym(lib, NPT_PLUGIN_ENTRY_SYMBOL) == NULL); /* interface 2 only */
    npt_plugin_init_fn init = (npt_plugin_init_fn)(uintptr_t)dlsym(lib, NPT_PLUGIN_INIT_SYMBOL);
    CHECK(init != NULL);
    if (!init) return;
    static npt_host_api host; /* the plugin keeps it: it must outlive the load */
    host.size = sizeof host;
    host.hierarchy_translate = fake_translate;
    host.hierarchy_leaves = fake_leaves;
    host.status_string = fake_status_string;
    host.abi_version = NPT_ABI_VERSION;
    npt_plugin_info info = {0};
    info.size = sizeof info;
    info.host = &host;
    info.path = so;
    const npt_backend_ops *ops = NULL;

    /* a core of another major is refused, and nothing is returned */
    info.abi_version = (UINT32_C(2) << 16) | 0;
    CHECK_ST(init(&info, &ops), NPT_ERR_ABI_MISMATCH);
    CHECK(ops == NULL);
    info.abi_version = 0; /* major 0 */
    CHECK_ST(init(&info, &ops), NPT_ERR_ABI_MISMATCH);
    CHECK_ST(init(NULL, &ops), NPT_ERR_INVALID_ARGUMENT);
    info.abi_version = NPT_ABI_VERSION;
    info.host = NULL;
    CHECK_ST(init(&info, &ops), NPT_ERR_INVALID_ARGUMENT);
    info.host = &host;

    /* the table of the right major */
    CHECK_OK(init(&info, &ops));
    CHECK(ops != NULL);
    if (!ops) return;
    CHECK(strcmp(ops->name, "kvm") == 0);
    CHECK_EQ(NPT_ABI_MAJOR(ops->abi_version), NPT_ABI_VERSION_MAJOR);
    CHECK_EQ(ops->size, sizeof(npt_backend_ops));
    CHECK_EQ(ops->capabilities & (NPT_CAP_RUN | NPT_CAP_MBEC_EMULATION), NPT_CAP_RUN | NPT_CAP_MBEC_EMULATION);
    CHECK(ops->vm_create && ops->vcpu_run && ops->vcpu_kick && ops->memory_read && ops->memory_write);
    CHECK(ops->vcpu_enter_privileged && ops->vcpu_leave_privileged && ops->vm_stats && ops->vcpu_stats);
    entry_ops = ops;
    /* the library stays loaded (npt_plugin_load opens it again) */
}

/* The plugin itself refuses out-of-range accesses (the core checks too, so call it directly). */
static void test_ops_memory(void) {
    const npt_backend_ops *o = entry_ops;
    npt_vm_config cfg = {0};
    cfg.size = sizeof cfg;
    cfg.mbec_mode = NPT_MBEC_LAZY;
    cfg.ram_size = 64 * 1024;
    cfg.default_perms = NPT_PERM_ALL;
    void *vm = NULL;
    CHECK_OK(o->vm_create(o->backend_data, NULL, &cfg, &vm));
    if (!vm) return;
    uint8_t buf[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16}, back[16] = {0};
    CHECK_OK(o->memory_write(vm, cfg.ram_size - 16, buf, 16));
    CHECK_OK(o->memory_read(vm, cfg.ram_size - 16, back, 16));
    CHECK(memcmp(buf, back, 16) == 0);
    CHECK_ST(o->memory_write(vm, cfg.ram_size - 8, buf, 16), NPT_ERR_OUT_OF_RANGE);
    CHECK_ST(o->memory_read(vm, cfg.ram_size, back, 1), NPT_ERR_OUT_OF_RANGE);
    CHECK_ST(o->memory_read(vm, UINT64_MAX - 3, back, 8), NPT_ERR_OUT_OF_RANGE); /* wraps */
    CHECK_OK(o->memory_read(vm, cfg.ram_size, back, 0));
    cfg.ram_size = 1000; /* not a multiple of 4 KiB */
    void *bad = NULL;
    CHECK_ST(o->vm_create(o->backend_data, NULL, &cfg, &bad), NPT_ERR_INVALID_ARGUMENT);

    /* a kick before run: the next run returns KICKED at once; the one after runs the guest */
    void *vc = NULL;
    CHECK_OK(o->vcpu_create(vm, 0, &vc));
    if (vc) {
        npt_regs r;
        memset(&r, 0, sizeof r);
        r.size = sizeof r;
        r.rip = 0x100;
        r.rflags = 2;
        const uint8_t code[] = {0xB0, 'k', 0xE6, 0xE9, 0xF4}; /* mov al,'k'; out 0xE9,al; hlt */
        CHECK_OK(o->memory_write(vm, 0x100, code, sizeof code));
        CHECK_OK(o->vcpu_set_regs(vc, &r));
        o->vcpu_kick(vc);
        npt_exit e;
        memset(&e, 0, sizeof e);
        e.size = sizeof e;
        CHECK_OK(o->vcpu_run(vc, &e));
        CHECK_EQ(e.reason, NPT_EXIT_KICKED);
        CHECK_OK(o->vcpu_run(vc, &e));
        CHECK_EQ(e.reason, NPT_EXIT_IO);
        CHECK_EQ(e.io_value, 'k');
        CHECK_OK(o->vcpu_run(vc, &e));
        CHECK_EQ(e.reason, NPT_EXIT_HALT);
        /* vcpu_inject_fault (Inject.swift) refuses what is not an exception vector, and NMI */
        CHECK(o->vcpu_inject_fault != NULL);
        if (o->vcpu_inject_fault) {
            CHECK_ST(o->vcpu_inject_fault(vc, 32, 0, 0), NPT_ERR_INVALID_ARGUMENT);
            CHECK_ST(o->vcpu_inject_fault(vc, 255, 0, 0), NPT_ERR_INVALID_ARGUMENT);
            CHECK_ST(o->vcpu_inject_fault(vc, 2, 0, 0), NPT_ERR_UNSUPPORTED);
        }
        o->vcpu_destroy(vc);
    }
    o->vm_destroy(vm);
}

struct kicker {
    npt_vcpu *vcpu;
    const npt_backend_ops *ops;
    void *data;
};

static void *kick_later(void *arg) {
    struct kicker *k = arg;
    struct timespec ts = {0, 50 * 1000 * 1000};
    nanosleep(&ts, NULL);
    k->ops->vcpu_kick(k->data);
    return NULL;
}

static void test_guest(npt_context *ctx) {
    npt_vm *vm = kvm_vm(ctx, RAM, NPT_PERM_ALL);
    if (!vm) return;
    uint32_t isa = 0;
    CHECK_OK(npt_vm_guest_isa(vm, &isa));
    CHECK_EQ(isa, NPT_GUEST_ISA_X86_64);

    /* out of range through the core */
    uint8_t b[8] = {0};
    CHECK_ST(npt_vm_write_memory(vm, RAM - 4, b, 8), NPT_ERR_OUT_OF_RANGE);
    CHECK_ST(npt_vm_read_memory(vm, RAM, b, 1), NPT_ERR_OUT_OF_RANGE);

    CHECK_OK(npt_vm_write_memory(vm, HELLO_GUEST_BASE, hello_guest, sizeof hello_guest));
    uint8_t back[sizeof hello_guest];
    CHECK_OK(npt_vm_read_memory(vm, HELLO_GUEST_BASE, back, sizeof back));
    CHECK(memcmp(back, hello_guest, sizeof back) == 0);

    /* 64-bit long mode at CPL 0 */
    npt_vcpu *v = NULL;
    CHECK_OK(npt_vcpu_create(vm, 0, &v));
    if (v) {
        npt_regs r;
        long_mode_regs(&r, HELLO_GUEST_LONG_ENTRY);
        r.lstar = 0xFFFF800000001000u;
        CHECK_OK(npt_vcpu_set_regs(v, &r));
        npt_regs g;
        memset(&g, 0, sizeof g);
        g.size = sizeof g;
        CHECK_OK(npt_vcpu_get_regs(v, &g));
        CHECK_EQ(g.rip, HELLO_GUEST_LONG_ENTRY);
        CHECK_EQ(g.gpr[4], 0x8000);
        CHECK_EQ(g.cr3, HELLO_GUEST_CR3);
        CHECK_EQ(g.cr0 & UINT64_C(0x80000001), UINT64_C(0x80000001));
        CHECK_EQ(g.efer & 0x500, 0x500);
        CHECK_EQ(g.cpl, 0);
        CHECK_EQ(g.lstar, 0xFFFF800000001000u);
        /* get then set changes nothing */
        CHECK_OK(npt_vcpu_set_regs(v, &g));
        npt_regs g2;
        memset(&g2, 0, sizeof g2);
        g2.size = sizeof g2;
        CHECK_OK(npt_vcpu_get_regs(v, &g2));
        CHECK(memcmp(&g, &g2, sizeof g) == 0);

        char out[32];
        size_t len;
        npt_exit e = run_to_halt(v, out, sizeof out, &len);
        printf("test_kvm: long-mode guest printed \"%s\", then exit %u at rip %#" PRIx64 "\n", out, e.reason, e.rip);
        CHECK(strcmp(out, "hello") == 0);
        CHECK_EQ(e.reason, NPT_EXIT_HALT);
        CHECK_EQ(e.cpl, 0);
        CHECK_EQ(e.rip, HELLO_GUEST_LONG_ENTRY + 0x12); /* after the HLT */
        CHECK_OK(npt_vcpu_get_regs(v, &g));
        CHECK_EQ(g.gpr[1], 0);                                 /* rcx: the loop ran out */
        CHECK_EQ(g.gpr[6], HELLO_GUEST_LONG_ENTRY + 0x12 + 5); /* rsi: past "hello" */
        npt_vcpu_destroy(v);
    }

    /* 16-bit real mode (cr0 = 0) on a second vCPU */
    npt_vcpu *rv = NULL;
    CHECK_OK(npt_vcpu_create(vm, 1, &rv));
    if (rv) {
        npt_regs r;
        memset(&r, 0, sizeof r);
        r.size = sizeof r;
        r.rip = HELLO_GUEST_REAL_ENTRY;
        r.rflags = 2;
        CHECK_OK(npt_vcpu_set_regs(rv, &r));
        char out[32];
        size_t len;
        npt_exit e = run_to_halt(rv, out, sizeof out, &len);
        printf("test_kvm: real-mode guest printed \"%s\", then exit %u\n", out, e.reason);
        CHECK(strcmp(out, "R") == 0);
        CHECK_EQ(e.reason, NPT_EXIT_HALT);
        npt_vcpu_destroy(rv);
    }
    CHECK_OK(npt_vm_destroy(vm));
}

/* MBEC on KVM: a page the exposed hierarchy may not execute is left out of the VM's memslot
 * layout. Data accesses to it still work (completed from the backing memory); a fetch from it is
 * an EPT violation the core decides on. */
static void test_mbec(npt_context *ctx) {
    npt_vm *vm = kvm_vm(ctx, RAM, NPT_PERM_ALL);
    if (!vm) return;
    CHECK_OK(npt_vm_write_memory(vm, HELLO_GUEST_BASE, hello_guest, sizeof hello_guest));
    /* the data page: read/write, executable nowhere; the nx page: executable in user mode only */
    CHECK_OK(npt_policy_set(vm, HELLO_GUEST_DATA, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_WRITE));
    CHECK_OK(npt_policy_set(vm, HELLO_GUEST_NX_ENTRY, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_UX));
    npt_vcpu *v = NULL;
    CHECK_OK(npt_vcpu_create(vm, 0, &v));
    if (v) {
        uint64_t sw0 = 0, up0 = 0, last = 0, sw1 = 0, up1 = 0;
        layout_stats(vm, &sw0, &up0, &last);
        npt_regs r;
        long_mode_regs(&r, HELLO_GUEST_DATA_ENTRY);
        CHECK_OK(npt_vcpu_set_regs(v, &r));
        char out[32];
        size_t len;
        npt_exit e = run_to_halt(v, out, sizeof out, &len);
        printf("test_kvm: MBEC: data page read through the layout gap gave \"%s\", exit %u\n", out, e.reason);
        CHECK(strcmp(out, "D") == 0);
        CHECK_EQ(e.reason, NPT_EXIT_HALT);
        uint8_t w = 0;
        CHECK_OK(npt_vm_read_memory(vm, HELLO_GUEST_DATA + 1, &w, 1));
        CHECK_EQ(w, 'W');
        {
            layout_stats(vm, &sw1, &up1, &last);
            printf("test_kvm: MBEC: %" PRIu64 " layout switch(es), %" PRIu64 " memslot update(s), last switch %" PRIu64 "\n",
                   sw1 - sw0, up1 - up0, last);
            /* all RAM -> [0, 0x5000) + [0x7000, RAM): delete 1 slot, create 2 */
            CHECK_EQ(sw1 - sw0, 1);
            CHECK_EQ(last, 3);
        }

        /* a fetch from the page supervisor mode may not execute: raw, then decided by the core */
        long_mode_regs(&r, HELLO_GUEST_NX_ENTRY);
        CHECK_OK(npt_vcpu_set_regs(v, &r));
        memset(&e, 0, sizeof e);
        e.size = sizeof e;
        CHECK_OK(npt_vcpu_run_raw(v, &e));
        printf("test_kvm: MBEC: fetch at %#" PRIx64 ": raw exit %u gpa %#" PRIx64 " q %#" PRIx64 "\n", e.rip, e.reason,
               e.gpa, e.qualification);
        CHECK_EQ(e.reason, NPT_EXIT_EPT_VIOLATION);
        CHECK_EQ(e.gpa, HELLO_GUEST_NX_ENTRY);
        CHECK_EQ(e.qualification & (NPT_EPTQ_FETCH | NPT_EPTQ_READABLE | NPT_EPTQ_WRITABLE),
                 NPT_EPTQ_FETCH | NPT_EPTQ_READABLE);
        CHECK_EQ(e.hierarchy, NPT_HIERARCHY_SUPERVISOR);
        uint32_t action = 99;
        CHECK_OK(npt_handle_exit(v, &e, &action));
        CHECK_EQ(action, NPT_ACTION_REPORT_VIOLATION);
        CHECK_EQ(e.reason, NPT_EXIT_MBEC_VIOLATION);
        /* the library loop reports it too, and the guest printed nothing */
        memset(&e, 0, sizeof e);
        e.size = sizeof e;
        CHECK_OK(npt_vcpu_run(v, &e));
        CHECK_EQ(e.reason, NPT_EXIT_MBEC_VIOLATION);
        CHECK_EQ(e.gpa, HELLO_GUEST_NX_ENTRY);

        /* the policy now lets supervisor mode execute it: the layout follows (invalidate) */
        CHECK_OK(npt_policy_set(vm, HELLO_GUEST_NX_ENTRY, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_SX));
        e = run_to_halt(v, out, sizeof out, &len);
        CHECK(strcmp(out, "X") == 0);
        CHECK_EQ(e.reason, NPT_EXIT_HALT);
        npt_vcpu_destroy(v);
    }
    CHECK_OK(npt_vm_destroy(vm));
}

/* R/W policy on KVM: in each hierarchy's layout an executable page without W is a KVM_MEM_READONLY
 * memslot (a guest write exits as MMIO), and a data access to a page left out (not executable) is
 * checked against the hierarchy's R/W before the plugin completes it. A refused access is a raw
 * NPT_EXIT_EPT_VIOLATION (gpa = the accessed address, READ or WRITE | the page's permissions) that
 * the core reports as NPT_EXIT_MBEC_VIOLATION, as EPT (and the simulator) does. Each case runs on
 * a fresh vCPU: KVM keeps the refused access pending (Plugins/KVM/README.md). */
static npt_vcpu *rw_vcpu(npt_vm *vm, uint32_t index, uint64_t rip) {
    npt_vcpu *v = NULL;
    CHECK_OK(npt_vcpu_create(vm, index, &v));
    if (!v) return NULL;
    npt_regs r;
    long_mode_regs(&r, rip);
    CHECK_OK(npt_vcpu_set_regs(v, &r));
    return v;
}

static void test_mbec_rw(npt_context *ctx) {
    npt_vm *vm = kvm_vm(ctx, RAM, NPT_PERM_ALL);
    if (!vm) return;
    CHECK_OK(npt_vm_write_memory(vm, HELLO_GUEST_BASE, hello_guest, sizeof hello_guest));
    /* the code page 0x4000: R|SX (kernel code); the data page: R|W, executable nowhere. Page tables
     * (0x1000-0x3fff) and the stack page (0x7000) stay R|W|SX|UX. */
    const uint64_t code = HELLO_GUEST_LONG_ENTRY;
    CHECK_OK(npt_policy_set(vm, code, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_SX));
    CHECK_OK(npt_policy_set(vm, HELLO_GUEST_DATA, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_WRITE));
    char out[32];
    size_t len;
    npt_exit e;

    /* (1) a write to its own code page (R|SX): raw EPT violation at the written byte, then the core */
    uint64_t sw0 = 0, up0 = 0, last = 0, sw1 = 0, up1 = 0;
    layout_stats(vm, &sw0, &up0, &last);
    npt_vcpu *v = rw_vcpu(vm, 0, HELLO_GUEST_SELFWRITE_ENTRY);
    if (v) {
        memset(&e, 0, sizeof e);
        e.size = sizeof e;
        CHECK_OK(npt_vcpu_run_raw(v, &e));
        printf("test_kvm: R/W: write to the R|SX code page: raw exit %u gpa %#" PRIx64 " q %#" PRIx64 " rip %#" PRIx64 "\n",
               e.reason, e.gpa, e.qualification, e.rip);
        CHECK_EQ(e.reason, NPT_EXIT_EPT_VIOLATION);
        CHECK_EQ(e.gpa, HELLO_GUEST_SELFWRITE_TARGET);
        CHECK_EQ(e.qualification & 0x7f, NPT_EPTQ_WRITE | NPT_EPTQ_READABLE | NPT_EPTQ_EXECUTABLE);
        uint32_t action = 99;
        CHECK_OK(npt_handle_exit(v, &e, &action));
        printf("test_kvm: R/W: the core: action %u exit %u gpa %#" PRIx64 " q %#" PRIx64 "\n", action, e.reason, e.gpa,
               e.qualification);
        CHECK_EQ(action, NPT_ACTION_REPORT_VIOLATION);
        CHECK_EQ(e.reason, NPT_EXIT_MBEC_VIOLATION);
        CHECK_EQ(e.gpa, HELLO_GUEST_SELFWRITE_TARGET);
        CHECK(e.qualification & NPT_EPTQ_WRITE);
        CHECK_EQ(e.qualification & (NPT_EPTQ_READABLE | NPT_EPTQ_WRITABLE | NPT_EPTQ_EXECUTABLE),
                 NPT_EPTQ_READABLE | NPT_EPTQ_EXECUTABLE);
        uint8_t b = 0;
        CHECK_OK(npt_vm_read_memory(vm, HELLO_GUEST_SELFWRITE_TARGET, &b, 1));
        CHECK_EQ(b, 0x90); /* the nop is still there */
        {
            layout_stats(vm, &sw1, &up1, &last);
            printf("test_kvm: R/W: %" PRIu64 " layout switch(es), last switch %" PRIu64 " memslot update(s)\n", sw1 - sw0, last);
            /* all RAM -> [0, 0x4000) + [0x4000, 0x5000) READONLY + [0x5000, 0x6000) + [0x7000, RAM):
             * delete 1 slot, create 4 */
            CHECK_EQ(sw1 - sw0, 1);
            CHECK_EQ(last, 5);
        }
        npt_vcpu_destroy(v);
    }
    /* the same through the library loop */
    v = rw_vcpu(vm, 1, HELLO_GUEST_SELFWRITE_ENTRY);
    if (v) {
        e = run_to_halt(v, out, sizeof out, &len);
        CHECK_EQ(e.reason, NPT_EXIT_MBEC_VIOLATION);
        CHECK_EQ(e.gpa, HELLO_GUEST_SELFWRITE_TARGET);
        CHECK_EQ(len, 0);
        npt_vcpu_destroy(v);
    }

    /* (2) reads and writes a R|W data page (not executable): completed through the MMIO path */
    v = rw_vcpu(vm, 2, HELLO_GUEST_DATA_ENTRY);
    if (v) {
        e = run_to_halt(v, out, sizeof out, &len);
        printf("test_kvm: R/W: R|W data page: printed \"%s\", exit %u\n", out, e.reason);
        CHECK(strcmp(out, "D") == 0);
        CHECK_EQ(e.reason, NPT_EXIT_HALT);
        uint8_t w = 0;
        CHECK_OK(npt_vm_read_memory(vm, HELLO_GUEST_DATA + 1, &w, 1));
        CHECK_EQ(w, 'W');
        npt_vcpu_destroy(v);
    }

    /* (3) the data page made R only: the read succeeds ("D"), the write is the violation */
    const uint8_t zero = 0;
    CHECK_OK(npt_vm_write_memory(vm, HELLO_GUEST_DATA + 1, &zero, 1));
    CHECK_OK(npt_policy_set(vm, HELLO_GUEST_DATA, 0x1000, NPT_PAGE_4K, NPT_PERM_READ));
    v = rw_vcpu(vm, 3, HELLO_GUEST_DATA_ENTRY);
    if (v) {
        e = run_to_halt(v, out, sizeof out, &len);
        printf("test_kvm: R/W: R-only data page: printed \"%s\", exit %u gpa %#" PRIx64 " q %#" PRIx64 "\n", out, e.reason,
               e.gpa, e.qualification);
        CHECK(strcmp(out, "D") == 0);
        CHECK_EQ(e.reason, NPT_EXIT_MBEC_VIOLATION);
        CHECK_EQ(e.gpa, HELLO_GUEST_DATA + 1);
        CHECK(e.qualification & NPT_EPTQ_WRITE);
        CHECK_EQ(e.qualification & (NPT_EPTQ_READABLE | NPT_EPTQ_WRITABLE | NPT_EPTQ_EXECUTABLE | NPT_EPTQ_UEXECUTABLE),
                 NPT_EPTQ_READABLE);
        uint8_t w = 1;
        CHECK_OK(npt_vm_read_memory(vm, HELLO_GUEST_DATA + 1, &w, 1));
        CHECK_EQ(w, 0);
        npt_vcpu_destroy(v);
    }

    /* (4) the data page with no access: the read is the violation (READ) */
    CHECK_OK(npt_policy_set(vm, HELLO_GUEST_DATA, 0x1000, NPT_PAGE_4K, 0));
    v = rw_vcpu(vm, 4, HELLO_GUEST_DATA_ENTRY);
    if (v) {
        e = run_to_halt(v, out, sizeof out, &len);
        printf("test_kvm: R/W: no-access data page: printed \"%s\", exit %u gpa %#" PRIx64 " q %#" PRIx64 "\n", out, e.reason,
               e.gpa, e.qualification);
        CHECK_EQ(len, 0);
        CHECK_EQ(e.reason, NPT_EXIT_MBEC_VIOLATION);
        CHECK_EQ(e.gpa, HELLO_GUEST_DATA);
        CHECK(e.qualification & NPT_EPTQ_READ);
        CHECK(!(e.qualification & NPT_EPTQ_WRITE));
        npt_vcpu_destroy(v);
    }

    /* (5) the code page made writable: its READONLY memslot is re-created writable and the write
     * lands (the guest patches its nop and prints "S") */
    CHECK_OK(npt_policy_set(vm, code, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_WRITE | NPT_PERM_SX));
    v = rw_vcpu(vm, 5, HELLO_GUEST_SELFWRITE_ENTRY);
    if (v) {
        e = run_to_halt(v, out, sizeof out, &len);
        printf("test_kvm: R/W: R|W|SX code page: printed \"%s\", exit %u\n", out, e.reason);
        CHECK(strcmp(out, "S") == 0);
        CHECK_EQ(e.reason, NPT_EXIT_HALT);
        uint8_t b = 0;
        CHECK_OK(npt_vm_read_memory(vm, HELLO_GUEST_SELFWRITE_TARGET, &b, 1));
        CHECK_EQ(b, 0xCC);
        npt_vcpu_destroy(v);
    }
    CHECK_OK(npt_vm_destroy(vm));
}

/* ------------------------------------------------------------------------ */
/* A guest kernel with a user process (Sources/NPTScenarios/Guests/x86-64/kernel.S): system calls through INT3,
 * the MBEC policy of the simulator's HVCI scenario (kernel code R|SX, user code R|UX, data R|W),
 * and two attacks. This KVM cannot exit on a change of privilege, so in lazy mode the escalation
 * (user -> kernel) and the return (kernel -> user) are both seen as EPT violations on the first
 * fetch in the other mode, which a hierarchy switch resolves. */
#define KGUEST_EXIT_HLT 0x6116u /* the kernel's HLT on "exit" (kernel.S, ksys) */
#define KGUEST_K1 20
#define KGUEST_K2 220
/* The pages the CPU itself reads and writes (page tables, GDT/TSS/IDT, kernel stack) must be in
 * the memslot layout of both hierarchies, i.e. executable in both: on this KVM a page walk to a page
 * left out of the layout ends in a triple fault (KVM_EXIT_SHUTDOWN at the first instruction), and an
 * IRETQ popping from a kernel stack left out fails emulation (internal error, suberror 1), unlike
 * an ordinary data access, which the plugin completes (measured; see Plugins/KVM/README.md). */
#define KGUEST_TABLES_PERMS NPT_PERM_ALL
enum { KPROBE_NONE = 0, KPROBE_USER_RUNS_KERNEL = 1, KPROBE_KERNEL_RUNS_USER = 2 };

static npt_vm *kernel_vm_mode(npt_context *ctx, int mbec, uint32_t mode) {
    npt_vm *vm = kvm_vm_mode(ctx, RAM, NPT_PERM_ALL, mode);
    if (!vm) return NULL;
    CHECK_OK(npt_vm_write_memory(vm, KERNEL_GUEST_BASE, kernel_guest, sizeof kernel_guest));
    if (mbec) {
        const uint64_t rw = NPT_PERM_READ | NPT_PERM_WRITE;
        CHECK_OK(npt_policy_set(vm, KERNEL_GUEST_BASE, KERNEL_GUEST_CODE - KERNEL_GUEST_BASE, NPT_PAGE_4K, KGUEST_TABLES_PERMS));
        CHECK_OK(npt_policy_set(vm, KERNEL_GUEST_CODE, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_SX));
        CHECK_OK(npt_policy_set(vm, KERNEL_GUEST_STACK, 0x1000, NPT_PAGE_4K, KGUEST_TABLES_PERMS));
        CHECK_OK(npt_policy_set(vm, KERNEL_GUEST_KFUNC, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_SX));
        CHECK_OK(npt_policy_set(vm, KERNEL_GUEST_USER, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_UX));
        CHECK_OK(npt_policy_set(vm, KERNEL_GUEST_USTACK, 0x1000, NPT_PAGE_4K, rw));
    }
    return vm;
}

static npt_vm *kernel_vm(npt_context *ctx, int mbec) { return kernel_vm_mode(ctx, mbec, NPT_MBEC_LAZY); }

/* Starts the kernel on vCPU 0 with K system calls and the probe; runs to the first exit that is
 * not a byte on port 0xE9. */
static npt_exit kernel_run(npt_vm *vm, uint64_t k, uint64_t probe, char *out, size_t cap, size_t *len,
                           double *seconds) {
    npt_exit e;
    memset(&e, 0, sizeof e);
    e.size = sizeof e;
    e.reason = NPT_EXIT_NONE;
    *len = 0;
    npt_vcpu *v = NULL;
    CHECK_OK(npt_vcpu_create(vm, 0, &v));
    if (!v) return e;
    npt_regs r;
    long_mode_regs(&r, KERNEL_GUEST_CODE);
    r.cr3 = KERNEL_GUEST_CR3;
    r.gpr[14] = k;
    r.gpr[15] = probe;
    CHECK_OK(npt_vcpu_set_regs(v, &r));
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        memset(&e, 0, sizeof e);
        e.size = sizeof e;
        npt_status s = npt_vcpu_run(v, &e);
        if (s != NPT_OK) {
            fprintf(stderr, "npt_vcpu_run: %s: %s\n", npt_status_string(s), npt_last_error());
            e.reason = NPT_EXIT_NONE;
            break;
        }
        if (e.reason == NPT_EXIT_IO && e.io_port == 0xE9) {
            if (*len + 1 < cap) out[(*len)++] = (char)e.io_value;
            continue;
        }
        break;
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    out[*len] = 0;
    if (seconds) *seconds = (double)(t1.tv_sec - t0.tv_sec) + (double)(t1.tv_nsec - t0.tv_nsec) / 1e9;
    if (e.reason == NPT_EXIT_IO && e.io_port == 0xEF)
        fprintf(stderr, "test_kvm: the guest kernel took an unexpected fault, vector %" PRIu64 " (rip %#" PRIx64 ")\n",
                e.io_value, e.rip);
    npt_vcpu_destroy(v);
    return e;
}

static npt_stats kernel_stats(npt_vm *vm) {
    npt_stats st;
    memset(&st, 0, sizeof st);
    st.size = sizeof st;
    CHECK_OK(npt_vm_get_stats(vm, &st));
    return st;
}

/* Bad input: a guest image too large for the VM's memory is refused whole, with the range named,
 * and nothing of it is written. */
static void test_image_too_large(npt_context *ctx) {
    npt_vm *vm = kvm_vm(ctx, 0x8000, NPT_PERM_ALL); /* 32 KiB: the guest kernel's image ends at KERNEL_GUEST_END */
    if (!vm) return;
    CHECK(KERNEL_GUEST_BASE + sizeof kernel_guest > 0x8000);
    CHECK_ST(npt_vm_write_memory(vm, KERNEL_GUEST_BASE, kernel_guest, sizeof kernel_guest), NPT_ERR_OUT_OF_RANGE);
    CHECK(strstr(npt_last_error(), "outside guest RAM") != NULL);
    unsigned char first[16];
    memset(first, 0xAA, sizeof first);
    CHECK_OK(npt_vm_read_memory(vm, KERNEL_GUEST_BASE, first, sizeof first));
    int untouched = 1;
    for (size_t i = 0; i < sizeof first; i++) untouched &= first[i] == 0;
    CHECK(untouched);
    CHECK_OK(npt_vm_destroy(vm));
}

/* The memslot updates of a hierarchy switch depend on the policy's shape, not the guest's size:
 * the same guest and policy in 2 MiB and in 1 GiB of RAM cost the same updates per switch. */
static void test_switch_cost_independent_of_size(npt_context *ctx) {
    double per[2] = {0, 0};
    const uint64_t sizes[2] = {RAM, UINT64_C(1) << 30};
    for (int i = 0; i < 2; i++) {
        npt_vm *vm = kvm_vm(ctx, sizes[i], NPT_PERM_ALL);
        if (!vm) return;
        CHECK_OK(npt_vm_write_memory(vm, KERNEL_GUEST_BASE, kernel_guest, sizeof kernel_guest));
        CHECK_OK(npt_policy_set(vm, KERNEL_GUEST_CODE, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_SX));
        CHECK_OK(npt_policy_set(vm, KERNEL_GUEST_KFUNC, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_SX));
        CHECK_OK(npt_policy_set(vm, KERNEL_GUEST_USER, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_UX));
        CHECK_OK(npt_policy_set(vm, KERNEL_GUEST_USTACK, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_WRITE));
        uint64_t sw0 = 0, up0 = 0, last = 0, sw1 = 0, up1 = 0;
        layout_stats(vm, &sw0, &up0, &last);
        char out[64];
        size_t len = 0;
        npt_exit e = kernel_run(vm, 4, KPROBE_NONE, out, sizeof out, &len, NULL);
        CHECK_EQ(e.reason, NPT_EXIT_HALT);
        layout_stats(vm, &sw1, &up1, &last);
        CHECK(sw1 > sw0);
        if (sw1 > sw0) per[i] = (double)(up1 - up0) / (double)(sw1 - sw0);
        CHECK_OK(npt_vm_destroy(vm));
    }
    printf("test_kvm: memslot updates per hierarchy switch: %.2f with 2 MiB of RAM, %.2f with 1 GiB\n", per[0], per[1]);
    CHECK(per[0] > 0 && per[0] == per[1]);
}

static void test_kernel(npt_context *ctx) {
    char out[4096];
    size_t len;
    /* (a) K system calls, then exit: the kernel halts */
    npt_vm *vm = kernel_vm(ctx, 1);
    if (!vm) return;
    npt_exit e = kernel_run(vm, 12, KPROBE_NONE, out, sizeof out, &len, NULL);
    npt_stats st = kernel_stats(vm);
    printf("test_kvm: kernel: user process printed \"%s\" through 12 system calls, exit %u cpl %u; "
           "%" PRIu64 " exits, %" PRIu64 " EPT violations, %" PRIu64 " hierarchy switches, %" PRIu64 " violations\n",
           out, e.reason, e.cpl, st.exits_total, st.exits_ept_violation, st.hierarchy_switches, st.violations_reported);
    CHECK(strcmp(out, "012345678901") == 0);
    CHECK_EQ(e.reason, NPT_EXIT_HALT);
    CHECK_EQ(e.cpl, 0);
    CHECK_EQ(e.rip, KGUEST_EXIT_HLT + 1);
    /* per system call: the INT3 from CPL 3 cannot read its gate (the IDT page is out of the user
     * layout while the escalation exit is armed): an escalation exit, the supervisor hierarchy
     * exposed, the #BP delivered again; after the IRETQ the user's first fetch (cpl 3, supervisor
     * hierarchy) is an EPT violation resolved by a switch (lazy mode: no exit on the return).
     * Plus the first user fetch after the kernel's start, and the exit system call's escalation. */
    CHECK_EQ(st.exits_escalation, 12 + 1);
    CHECK_EQ(st.exits_ept_violation, 12 + 1);
    CHECK_EQ(st.hierarchy_switches, 2 * 12 + 2);
    CHECK_EQ(st.violations_reported, 0);
    CHECK_OK(npt_vm_destroy(vm));

    /* (b) the user process jumps into kernel code (mapped U/S = 1 by the guest's page tables) */
    vm = kernel_vm(ctx, 1);
    if (!vm) return;
    e = kernel_run(vm, 2, KPROBE_USER_RUNS_KERNEL, out, sizeof out, &len, NULL);
    printf("test_kvm: kernel: user jump into kernel code: printed \"%s\", exit %u gpa %#" PRIx64 " q %#" PRIx64
           " cpl %u rip %#" PRIx64 "\n", out, e.reason, e.gpa, e.qualification, e.cpl, e.rip);
    CHECK(strcmp(out, "01") == 0);
    CHECK_EQ(e.reason, NPT_EXIT_MBEC_VIOLATION);
    CHECK_EQ(e.gpa, KERNEL_GUEST_KFUNC);
    CHECK_EQ(e.rip, KERNEL_GUEST_KFUNC);
    CHECK_EQ(e.cpl, 3);
    CHECK_EQ(e.qualification & (NPT_EPTQ_FETCH | NPT_EPTQ_READ | NPT_EPTQ_WRITE), NPT_EPTQ_FETCH);
    CHECK_EQ(e.qualification & (NPT_EPTQ_EXECUTABLE | NPT_EPTQ_UEXECUTABLE), NPT_EPTQ_EXECUTABLE);
    CHECK_EQ(kernel_stats(vm).violations_reported, 1);
    CHECK_OK(npt_vm_destroy(vm));

    /* (c) the kernel jumps into the user process's code */
    vm = kernel_vm(ctx, 1);
    if (!vm) return;
    e = kernel_run(vm, 2, KPROBE_KERNEL_RUNS_USER, out, sizeof out, &len, NULL);
    printf("test_kvm: kernel: kernel jump into user code: printed \"%s\", exit %u gpa %#" PRIx64 " q %#" PRIx64
           " cpl %u rip %#" PRIx64 "\n", out, e.reason, e.gpa, e.qualification, e.cpl, e.rip);
    CHECK(strcmp(out, "01") == 0);
    CHECK_EQ(e.reason, NPT_EXIT_MBEC_VIOLATION);
    CHECK_EQ(e.gpa, KERNEL_GUEST_USER);
    CHECK_EQ(e.rip, KERNEL_GUEST_USER);
    CHECK_EQ(e.cpl, 0);
    CHECK_EQ(e.qualification & (NPT_EPTQ_FETCH | NPT_EPTQ_READ | NPT_EPTQ_WRITE), NPT_EPTQ_FETCH);
    CHECK_EQ(e.qualification & (NPT_EPTQ_EXECUTABLE | NPT_EPTQ_UEXECUTABLE), NPT_EPTQ_UEXECUTABLE);
    CHECK_OK(npt_vm_destroy(vm));

    /* cost of a system call round trip: runs with K1 and K2 calls, without a policy (everything
     * R|W|SX|UX: no switches) and with the MBEC policy */
    const uint64_t k1 = KGUEST_K1, k2 = KGUEST_K2;
    for (int mbec = 0; mbec <= 1; mbec++) {
        double sec[2] = {0, 0};
        uint64_t exits[2] = {0, 0}, switches[2] = {0, 0};
        for (int i = 0; i < 2; i++) {
            vm = kernel_vm(ctx, mbec);
            if (!vm) return;
            e = kernel_run(vm, i ? k2 : k1, KPROBE_NONE, out, sizeof out, &len, &sec[i]);
            CHECK_EQ(e.reason, NPT_EXIT_HALT);
            CHECK_EQ(len, i ? k2 : k1);
            st = kernel_stats(vm);
            exits[i] = st.exits_total;
            switches[i] = st.hierarchy_switches;
            CHECK_OK(npt_vm_destroy(vm));
        }
        double n = (double)(k2 - k1);
        printf("test_kvm: kernel: system call round trip (%s, K = %" PRIu64 " vs %" PRIu64 "): %.2f exits, "
               "%.2f hierarchy switches, %.1f us each\n", mbec ? "MBEC policy" : "no policy", k1, k2,
               (double)(exits[1] - exits[0]) / n, (double)(switches[1] - switches[0]) / n, (sec[1] - sec[0]) / n * 1e6);
        CHECK_EQ(switches[1] - switches[0], mbec ? 2 * (k2 - k1) : 0);
    }
}

/* ------------------------------------------------------------------------ */
/* Fault injection (Plugins/KVM/Sources/Inject.swift): after an MBEC violation the VMM injects #VE
 * (vector 20) with npt_vcpu_inject_fault; the next KVM_RUN delivers it through the guest kernel's
 * IDT, and its vector-20 stub (kernel.S: pushq $20; jmp kfault; pop %rax; out %al, $0xEF) reports
 * it. The exception frame on the kernel stack shows where and at which privilege it was taken. */
#define KGUEST_VE 20u
#define KGUEST_PF 14u

/* Runs v until an exit that is not a byte on port 0xE9. */
static npt_exit kernel_continue(npt_vcpu *v, char *out, size_t cap, size_t *len) {
    npt_exit e;
    for (;;) {
        memset(&e, 0, sizeof e);
        e.size = sizeof e;
        npt_status s = npt_vcpu_run(v, &e);
        if (s != NPT_OK) {
            fprintf(stderr, "npt_vcpu_run: %s: %s\n", npt_status_string(s), npt_last_error());
            e.reason = NPT_EXIT_NONE;
            return e;
        }
        if (e.reason == NPT_EXIT_IO && e.io_port == 0xE9) {
            if (*len + 1 < cap) out[(*len)++] = (char)e.io_value;
            continue;
        }
        return e;
    }
}

/* After the stub's OUT: frame[0..4] = the exception frame above the pushed vector (popped into rax):
 * [error code,] RIP, CS, RFLAGS, RSP, SS. */
static int kernel_frame(npt_vm *vm, npt_vcpu *v, uint64_t *frame, size_t n) {
    npt_regs r;
    memset(&r, 0, sizeof r);
    r.size = sizeof r;
    if (npt_vcpu_get_regs(v, &r) != NPT_OK) return 0;
    return npt_vm_read_memory(vm, r.gpr[4], frame, n * sizeof *frame) == NPT_OK;
}

/* Issue 9, finding 1: ret2dir through the IDT. An attacker with a kernel data write makes two guest
 * memory writes: a PTE making linear 0xB000 a supervisor-mode alias of the user page 0x9000 (R|UX by
 * the policy: user-execute only), and IDT vector 3 (the guest's system call) pointed at 0xB800,
 * where the user's "JIT" bytes print 'P' and halt. The user process's next system call enters the
 * kernel straight at the alias.
 *  - lazy mode (escalation exit: the INT3 from CPL 3 stops before delivery because the IDT page is
 *    out of the user layout; the supervisor hierarchy is exposed first): the kernel's first fetch at
 *    0xB800 is an MBEC violation (gpa in the R|UX page, cpl 0): stopped, as hardware MBEC would.
 *  - violation-only mode (no escalation exit, the weaker named guarantee): the bytes run at CPL 0
 *    under the user hierarchy: the documented hole of that mode. */
static void test_ret2dir_idt(npt_context *ctx, uint32_t mode) {
    npt_vm *vm = kernel_vm_mode(ctx, 1, mode);
    if (!vm) return;
    const uint64_t alias_pte = 0x4000 + 8 * 0xB, alias = 0x9000 | 3; /* P|W, U/S = 0: supervisor-mode */
    const uint64_t h = 0xB800;
    uint64_t gate[2] = {(h & 0xffff) | (0x10ull << 16) | (0xeeull << 40) | (((h >> 16) & 0xffff) << 48), 0};
    const uint8_t jit[] = {0xb0, 'P', 0xe6, 0xe9, 0xf4, 0xeb, 0xfe}; /* mov $'P',%al; out %al,$0xe9; hlt */
    CHECK_OK(npt_vm_write_memory(vm, alias_pte, &alias, sizeof alias));
    CHECK_OK(npt_vm_write_memory(vm, 0x5200 + 3 * 16, gate, sizeof gate));
    CHECK_OK(npt_vm_write_memory(vm, 0x9800, jit, sizeof jit));
    char out[64];
    size_t len = 0;
    npt_exit e = kernel_run(vm, 2, KPROBE_NONE, out, sizeof out, &len, NULL);
    npt_stats st = kernel_stats(vm);
    printf("test_kvm: ret2dir through the IDT, mode %s: exit %u cpl %u rip %#" PRIx64 " gpa %#" PRIx64 " hierarchy %u, "
           "printed \"%s\", %" PRIu64 " escalation exits\n", mode == NPT_MBEC_LAZY ? "lazy" : "violation-only", e.reason,
           e.cpl, e.rip, e.gpa, e.hierarchy, out, st.exits_escalation);
    if (mode == NPT_MBEC_LAZY) {
        CHECK_EQ(e.reason, NPT_EXIT_MBEC_VIOLATION);
        CHECK_EQ(e.cpl, 0);
        CHECK_EQ(e.rip, h);
        CHECK_EQ(e.gpa & ~0xfffull, KERNEL_GUEST_USER);
        CHECK((e.qualification & NPT_EPTQ_FETCH) != 0);
        /* the qualification hardware MBEC gives: R|UX page, not supervisor-executable */
        CHECK((e.qualification & NPT_EPTQ_UEXECUTABLE) != 0);
        CHECK((e.qualification & NPT_EPTQ_EXECUTABLE) == 0);
        CHECK(strchr(out, 'P') == NULL);
        CHECK_EQ(st.exits_escalation, 1);
    } else {
        /* the JIT bytes ran in the kernel: the hole violation-only mode names */
        CHECK(strchr(out, 'P') != NULL);
        CHECK_EQ(e.reason, NPT_EXIT_HALT);
        CHECK_EQ(e.cpl, 0);
        CHECK_EQ(e.hierarchy, NPT_HIERARCHY_USER);
        CHECK_EQ(st.exits_escalation, 0);
    }
    CHECK_OK(npt_vm_destroy(vm));
}

/* A guest whose IDT covers a page user mode can reach cannot have the escalation exit (leaving the
 * page out of the user layout would stop the guest): the run is refused (NPT_ERR_STATE) rather than
 * run with the exit unarmed. The gate guest has no IDT of its own (KVM's reset IDTR: base 0, limit
 * 0xffff, over its own user code and data). */
static void test_escalation_needs_an_idt(npt_context *ctx) {
    npt_vm *vm = kvm_vm(ctx, RAM, NPT_PERM_ALL);
    if (!vm) return;
    CHECK_OK(npt_vm_write_memory(vm, GATE_GUEST_BASE, gate_guest, sizeof gate_guest));
    CHECK_OK(npt_policy_set(vm, GATE_GUEST_KERNEL, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_SX));
    CHECK_OK(npt_policy_set(vm, GATE_GUEST_USER, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_UX));
    npt_vcpu *v = NULL;
    CHECK_OK(npt_vcpu_create(vm, 0, &v));
    if (v) {
        npt_regs r;
        long_mode_regs(&r, GATE_GUEST_USER);
        r.cr3 = GATE_GUEST_CR3;
        r.cpl = 3;
        CHECK_OK(npt_vcpu_set_regs(v, &r));
        npt_exit e;
        memset(&e, 0, sizeof e);
        e.size = sizeof e;
        CHECK_ST(npt_vcpu_run(v, &e), NPT_ERR_STATE);
    }
    CHECK_OK(npt_vm_destroy(vm));
}

static void test_inject(npt_context *ctx) {
    static const struct { uint64_t probe; uint64_t gpa; uint32_t cpl; uint64_t cs; const char *what; } probes[] = {
        {KPROBE_USER_RUNS_KERNEL, KERNEL_GUEST_KFUNC, 3, 0x33, "user jump into kernel code"},
        {KPROBE_KERNEL_RUNS_USER, KERNEL_GUEST_USER, 0, 0x10, "kernel jump into user code"},
    };
    for (size_t i = 0; i < sizeof probes / sizeof probes[0]; i++) {
        npt_vm *vm = kernel_vm(ctx, 1);
        if (!vm) return;
        npt_vcpu *v = NULL;
        CHECK_OK(npt_vcpu_create(vm, 0, &v));
        if (!v) { npt_vm_destroy(vm); return; }
        npt_regs r;
        long_mode_regs(&r, KERNEL_GUEST_CODE);
        r.cr3 = KERNEL_GUEST_CR3;
        r.gpr[14] = 2;
        r.gpr[15] = probes[i].probe;
        CHECK_OK(npt_vcpu_set_regs(v, &r));
        char out[64];
        size_t len = 0;
        npt_exit e = kernel_continue(v, out, sizeof out, &len);
        CHECK_EQ(e.reason, NPT_EXIT_MBEC_VIOLATION);
        CHECK_EQ(e.gpa, probes[i].gpa);
        CHECK_EQ(e.cpl, probes[i].cpl);
        CHECK_OK(npt_vcpu_inject_fault(v, KGUEST_VE, e.qualification, e.gpa));
        npt_exit f = kernel_continue(v, out, sizeof out, &len);
        out[len] = 0;
        uint64_t frame[5] = {0};
        int have = kernel_frame(vm, v, frame, 5);
        printf("test_kvm: inject: %s: violation at %#" PRIx64 " cpl %u; #VE injected; the guest kernel's "
               "stub reported vector %" PRIu64 " on port %#x (exit %u, cpl %u, rip %#" PRIx64 "); "
               "frame rip %#" PRIx64 " cs %#" PRIx64 " rflags %#" PRIx64 " rsp %#" PRIx64 " ss %#" PRIx64 "\n",
               probes[i].what, e.gpa, e.cpl, f.io_value, f.io_port, f.reason, f.cpl, f.rip,
               frame[0], frame[1], frame[2], frame[3], frame[4]);
        CHECK_EQ(f.reason, NPT_EXIT_IO);
        CHECK_EQ(f.io_port, 0xEF);
        CHECK_EQ(f.io_value, KGUEST_VE);
        CHECK_EQ(f.cpl, 0);
        CHECK(have);
        CHECK_EQ(frame[0], probes[i].gpa);     /* #VE is a fault: the frame's rip is the violating fetch */
        CHECK_EQ(frame[1], probes[i].cs);      /* taken at the violating cpl */
        CHECK_EQ(frame[1] & 3, probes[i].cpl);
        CHECK(strcmp(out, "01") == 0);         /* nothing printed after the violation */
        /* the stub halts */
        e = kernel_continue(v, out, sizeof out, &len);
        CHECK_EQ(e.reason, NPT_EXIT_HALT);
        CHECK_EQ(kernel_stats(vm).violations_reported, 1);
        CHECK_ST(npt_vcpu_inject_fault(v, 32, 0, 0), NPT_ERR_INVALID_ARGUMENT);
        npt_vcpu_destroy(v);
        CHECK_OK(npt_vm_destroy(vm));
    }

    /* #PF: CR2 = address, the error code on the frame */
    npt_vm *vm = kernel_vm(ctx, 1);
    if (!vm) return;
    npt_vcpu *v = NULL;
    CHECK_OK(npt_vcpu_create(vm, 0, &v));
    if (!v) { npt_vm_destroy(vm); return; }
    npt_regs r;
    long_mode_regs(&r, KERNEL_GUEST_CODE);
    r.cr3 = KERNEL_GUEST_CR3;
    r.gpr[14] = 2;
    r.gpr[15] = KPROBE_USER_RUNS_KERNEL;
    CHECK_OK(npt_vcpu_set_regs(v, &r));
    char out[64];
    size_t len = 0;
    npt_exit e = kernel_continue(v, out, sizeof out, &len);
    CHECK_EQ(e.reason, NPT_EXIT_MBEC_VIOLATION);
    const uint64_t cr2 = UINT64_C(0xdead0000), code = 0x15; /* P | U | I (a user instruction fetch) */
    CHECK_OK(npt_vcpu_inject_fault(v, KGUEST_PF, code, cr2));
    npt_exit f = kernel_continue(v, out, sizeof out, &len);
    uint64_t frame[3] = {0};
    int have = kernel_frame(vm, v, frame, 3);
    memset(&r, 0, sizeof r);
    r.size = sizeof r;
    CHECK_OK(npt_vcpu_get_regs(v, &r));
    printf("test_kvm: inject: #PF after the user's violation: stub reported vector %" PRIu64 "; cr2 %#" PRIx64
           ", frame error code %#" PRIx64 " rip %#" PRIx64 " cs %#" PRIx64 "\n", f.io_value, r.cr2, frame[0], frame[1], frame[2]);
    CHECK_EQ(f.reason, NPT_EXIT_IO);
    CHECK_EQ(f.io_port, 0xEF);
    CHECK_EQ(f.io_value, KGUEST_PF);
    CHECK_EQ(r.cr2, cr2);
    CHECK(have);
    CHECK_EQ(frame[0], code);
    CHECK_EQ(frame[1], KERNEL_GUEST_KFUNC);
    CHECK_EQ(frame[2], 0x33);
    npt_vcpu_destroy(v);
    CHECK_OK(npt_vm_destroy(vm));
}

/* ------------------------------------------------------------------------ */
/* vCPUs of different hierarchies (Plugins/KVM/Sources/Views.swift): two vCPU threads in one VM on
 * Guest/gate.S, vCPU 0 in kernel-only code (R|SX) at CPL 0, vCPU 1 in user-only code (R|UX) at CPL 3.
 * Memslots are per KVM VM, so each hierarchy's layout is a KVM VM of its own (a view) and the two run
 * at the same time (they used to take turns at a per-VM layout gate; the gate and its statistics are
 * gone). */
struct gate_cpu {
    npt_vcpu *v;
    atomic_int stop;
    atomic_int done;
    atomic_ullong outs;   /* vCPU 0: the last count OUT to GATE_GUEST_PORT */
    atomic_ullong kicked; /* runs that returned NPT_EXIT_KICKED */
    npt_status status;
    npt_exit last;
};

static void *gate_thread(void *arg) {
    struct gate_cpu *c = arg;
    for (;;) {
        npt_exit e;
        memset(&e, 0, sizeof e);
        e.size = sizeof e;
        npt_status s = npt_vcpu_run(c->v, &e);
        if (s != NPT_OK) { c->status = s; break; }
        if (e.reason == NPT_EXIT_KICKED) { atomic_fetch_add(&c->kicked, 1); continue; }
        if (e.reason == NPT_EXIT_IO && e.io_port == GATE_GUEST_PORT) {
            atomic_store(&c->outs, (unsigned long long)e.io_value);
            if (atomic_load(&c->stop)) { c->last = e; break; }
            continue;
        }
        c->last = e;
        break;
    }
    atomic_store(&c->done, 1);
    return NULL;
}

static uint64_t gate_user_count(npt_vm *vm) {
    uint64_t n = 0;
    npt_vm_read_memory(vm, GATE_GUEST_DATA, &n, sizeof n);
    return n;
}

/* Polls until cond() holds or `seconds` pass. */
#define GATE_POLL(cond, seconds) do { \
        double t_end_ = now_s() + (seconds); \
        while (!(cond) && now_s() < t_end_) usleep(1000); \
    } while (0)

static double now_s(void);

static void test_gate(npt_context *ctx) {
    uint64_t sw0, sw1, up, last, nv0, mv0, zp0, lr0, nv1, mv1, zp1, lr1;

    /* A single vCPU through the guest kernel's 12 system calls: each call moves it from the user
     * view to the supervisor view and back (26 moves), no memslot is updated after the two views'
     * layouts are installed, nothing waits. */
    {
        char out[256];
        size_t len;
        npt_vm *vm = kernel_vm(ctx, 1);
        if (!vm) return;
        layout_stats(vm, &sw0, &up, &last);
        uint64_t up0 = up;
        view_stats(vm, &nv0, &mv0, &zp0, &lr0);
        npt_exit e = kernel_run(vm, 12, KPROBE_NONE, out, sizeof out, &len, NULL);
        layout_stats(vm, &sw1, &up, &last);
        view_stats(vm, &nv1, &mv1, &zp1, &lr1);
        CHECK_EQ(e.reason, NPT_EXIT_HALT);
        printf("test_kvm: views: one vCPU, 12 system calls: %" PRIu64 " moves between views, %" PRIu64 " views created, %"
               PRIu64 " layout installs (%" PRIu64 " memslot updates), %" PRIu64 " zaps, %" PRIu64
               " dirty-log reads\n", mv1 - mv0, nv1 - nv0, sw1 - sw0, up - up0, zp1 - zp0, lr1 - lr0);
        CHECK(mv1 - mv0 >= 26);
        CHECK(sw1 - sw0 <= 2);      /* the supervisor layout (adopted by the VM's first KVM VM), the user view's */
        CHECK_EQ(zp1 - zp0, 0);     /* the kernel writes no page table */
        CHECK_OK(npt_vm_destroy(vm));
    }

    /* violation-only mode: the gate guest has no IDT (see test_escalation_needs_an_idt) */
    npt_vm *vm = kvm_vm_mode(ctx, RAM, NPT_PERM_ALL, NPT_MBEC_VIOLATION_ONLY);
    if (!vm) return;
    CHECK_OK(npt_vm_write_memory(vm, GATE_GUEST_BASE, gate_guest, sizeof gate_guest));
    /* page tables in both hierarchies (see KGUEST_TABLES_PERMS), kernel code R|SX, user code R|UX,
     * data R|W (executable nowhere: every access is completed by the plugin through an MMIO exit) */
    CHECK_OK(npt_policy_set(vm, GATE_GUEST_BASE, GATE_GUEST_KERNEL - GATE_GUEST_BASE, NPT_PAGE_4K, NPT_PERM_ALL));
    CHECK_OK(npt_policy_set(vm, GATE_GUEST_KERNEL, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_SX));
    CHECK_OK(npt_policy_set(vm, GATE_GUEST_USER, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_UX));
    CHECK_OK(npt_policy_set(vm, GATE_GUEST_DATA, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_WRITE));
    struct gate_cpu c[2];
    memset(c, 0, sizeof c);
    for (int i = 0; i < 2; i++) {
        CHECK_OK(npt_vcpu_create(vm, (uint32_t)i, &c[i].v));
        if (!c[i].v) { npt_vm_destroy(vm); return; }
        npt_regs r;
        long_mode_regs(&r, i ? GATE_GUEST_USER : GATE_GUEST_KERNEL);
        r.cr3 = GATE_GUEST_CR3;
        r.cpl = i ? 3 : 0;
        CHECK_OK(npt_vcpu_set_regs(c[i].v, &r));
    }
    layout_stats(vm, &sw0, &up, &last);
    view_stats(vm, &nv0, &mv0, &zp0, &lr0);
    double t0 = now_s();
    pthread_t t[2];
    for (int i = 0; i < 2; i++) pthread_create(&t[i], NULL, gate_thread, &c[i]);

    /* both make progress, concurrently: over each of 5 windows both counters advance */
    int rounds = 0;
    uint64_t a = 0, b = 0;
    for (int i = 0; i < 5; i++) {
        uint64_t a0 = atomic_load(&c[0].outs), b0 = gate_user_count(vm);
        GATE_POLL(atomic_load(&c[0].outs) > a0 && gate_user_count(vm) > b0, 10.0);
        a = atomic_load(&c[0].outs);
        b = gate_user_count(vm);
        if (a > a0 && b > b0) rounds++;
        if (atomic_load(&c[0].done) || atomic_load(&c[1].done)) break;
    }
    double t1 = now_s();
    CHECK_EQ(rounds, 5);
    CHECK(!atomic_load(&c[0].done) && !atomic_load(&c[1].done));
    printf("test_kvm: gate: 2 vCPUs (CPL 0 R|SX, CPL 3 R|UX) in %.3f s: kernel %" PRIu64 " OUTs, user %" PRIu64
           " iterations, both advancing in %d of 5 windows\n", t1 - t0, a, b, rounds);

    /* the rate of both over a fixed 0.5 s (the cost of sharing the VM's memslots) */
    {
        uint64_t a0 = atomic_load(&c[0].outs), b0 = gate_user_count(vm);
        uint64_t sw_a, sw_b;
        layout_stats(vm, &sw_a, &up, &last);
        double ta = now_s();
        usleep(500 * 1000);
        double tb = now_s();
        uint64_t a1 = atomic_load(&c[0].outs), b1 = gate_user_count(vm);
        layout_stats(vm, &sw_b, &up, &last);
        printf("test_kvm: gate: over %.3f s: kernel %.0f OUTs/s, user %.0f iterations/s, %.0f layout switches/s, "
               "\n", tb - ta, (double)(a1 - a0) / (tb - ta), (double)(b1 - b0) / (tb - ta), (double)(sw_b - sw_a) / (tb - ta));
        CHECK(a1 > a0 && b1 > b0);
    }

    /* the probe: the user vCPU jumps into the kernel page while the kernel vCPU runs */
    uint64_t go = 1;
    uint64_t a_probe = atomic_load(&c[0].outs);
    CHECK_OK(npt_vm_write_memory(vm, GATE_GUEST_DATA + 8, &go, sizeof go));
    GATE_POLL(atomic_load(&c[1].done), 20.0);
    CHECK(atomic_load(&c[1].done));
    uint64_t a_user_exit = atomic_load(&c[0].outs);
    /* the kernel vCPU goes on after the user's violation */
    GATE_POLL(atomic_load(&c[0].outs) > a_user_exit + 10, 10.0);
    uint64_t a_after = atomic_load(&c[0].outs);
    atomic_store(&c[0].stop, 1);
    GATE_POLL(atomic_load(&c[0].done), 20.0);
    CHECK(atomic_load(&c[0].done));
    double t2 = now_s();
    if (!atomic_load(&c[0].done) || !atomic_load(&c[1].done)) {
        fprintf(stderr, "test_kvm: gate: a vCPU thread did not finish; leaving the VM\n");
        return;
    }
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    layout_stats(vm, &sw1, &up, &last);
    npt_exit e = c[1].last;
    uint64_t marker = 1;
    CHECK_OK(npt_vm_read_memory(vm, GATE_GUEST_DATA + 0x10, &marker, sizeof marker));
    printf("test_kvm: gate: user probe into the kernel page: exit %u gpa %#" PRIx64 " cpl %u rip %#" PRIx64
           " q %#" PRIx64 "; kernel OUTs %" PRIu64 " at the probe, %" PRIu64 " at the user's exit, %" PRIu64
           " after; marker %#" PRIx64 "\n", e.reason, e.gpa, e.cpl, e.rip, e.qualification, a_probe,
           a_user_exit, a_after, marker);
    CHECK_OK(c[0].status);
    CHECK_OK(c[1].status);
    CHECK_EQ(e.reason, NPT_EXIT_MBEC_VIOLATION);
    CHECK_EQ(e.gpa, GATE_GUEST_KERNEL);
    CHECK_EQ(e.rip, GATE_GUEST_KERNEL);
    CHECK_EQ(e.cpl, 3);
    CHECK_EQ(marker, 0);                    /* it never executed at the kernel page */
    CHECK(a_after > a_user_exit);           /* the kernel vCPU was running around it */
    CHECK_EQ(c[0].last.reason, NPT_EXIT_IO);
    view_stats(vm, &nv1, &mv1, &zp1, &lr1);
    printf("test_kvm: views: the two vCPUs: %" PRIu64 " views created, %" PRIu64 " moves, %" PRIu64 " zaps\n", nv1 - nv0,
           mv1 - mv0, zp1 - zp0);
    double secs = t2 - t0;
    printf("test_kvm: gate: %.3f s, %" PRIu64 " layout installs, kicked runs: kernel %llu user %llu\n", secs, sw1 - sw0,
           (unsigned long long)atomic_load(&c[0].kicked), (unsigned long long)atomic_load(&c[1].kicked));
    for (int i = 0; i < 2; i++) CHECK_OK(npt_vcpu_destroy(c[i].v));
    CHECK_OK(npt_vm_destroy(vm));
}

/* A kick from another thread while the guest spins (through the plugin's ops directly: the C ABI
 * has no public kick; the core kicks for the privileged mode). */
static void test_kick_thread(void) {
    const npt_backend_ops *o = entry_ops;
    npt_vm_config cfg = {0};
    cfg.size = sizeof cfg;
    cfg.mbec_mode = NPT_MBEC_LAZY;
    cfg.ram_size = RAM;
    cfg.default_perms = NPT_PERM_ALL;
    void *vm = NULL, *vc = NULL;
    CHECK_OK(o->vm_create(o->backend_data, NULL, &cfg, &vm));
    if (!vm) return;
    CHECK_OK(o->memory_write(vm, HELLO_GUEST_BASE, hello_guest, sizeof hello_guest));
    CHECK_OK(o->vcpu_create(vm, 0, &vc));
    if (vc) {
        npt_regs r;
        long_mode_regs(&r, HELLO_GUEST_SPIN_ENTRY);
        CHECK_OK(o->vcpu_set_regs(vc, &r));
        struct kicker k = {NULL, o, vc};
        pthread_t t;
        pthread_create(&t, NULL, kick_later, &k);
        npt_exit e;
        memset(&e, 0, sizeof e);
        e.size = sizeof e;
        CHECK_OK(o->vcpu_run(vc, &e));
        pthread_join(t, NULL);
        printf("test_kvm: a spinning guest was kicked: exit %u at rip %#" PRIx64 "\n", e.reason, e.rip);
        CHECK_EQ(e.reason, NPT_EXIT_KICKED);
        CHECK_EQ(e.rip, HELLO_GUEST_SPIN_ENTRY);
        o->vcpu_destroy(vc);
    }
    o->vm_destroy(vm);
}

/* ------------------------------------------------------------------------ */
/* Persistent memory on KVM (Plugins/KVM/Sources/Pmem.swift): an NVDIMM range backed by the plugin's
 * file, the vFHA a KVM_MEM_READONLY memslot when the host needs WPQ flushing. */
#define NVD_GPA UINT64_C(0x40000000)
#define NVD_LEN (UINT64_C(2) << 20)
#define PMEM_N 64


/* ------------------------------------------------------------------------ */
/* Views (Plugins/KVM/Sources/Views.swift) on Guest/smp.S: a kernel for two vCPUs, each with a user
 * process making system calls through INT3, under the HVCI-like policy (kernel code R|SX, user code
 * R|UX, everything else R|W|SX|UX: page tables, system tables, stacks and data in both layouts). */
static npt_vm *smp_vm(npt_context *ctx, uint32_t mode) {
    npt_vm *vm = kvm_vm_mode(ctx, RAM, NPT_PERM_ALL, mode);
    if (!vm) return NULL;
    CHECK_OK(npt_vm_write_memory(vm, SMP_GUEST_BASE, smp_guest, sizeof smp_guest));
    CHECK_OK(npt_policy_set(vm, SMP_GUEST_CODE, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_SX));
    CHECK_OK(npt_policy_set(vm, SMP_GUEST_KFUNC, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_SX));
    CHECK_OK(npt_policy_set(vm, SMP_GUEST_USER, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_UX));
    return vm;
}

struct smp_cpu {
    npt_vm *vm;
    uint32_t index;
    uint64_t calls, probe;
    char out[1024];
    size_t len;
    npt_exit last;
    npt_status status;
    atomic_ullong progress; /* system calls seen so far (bytes on port 0xE9) */
    atomic_ullong other_mid; /* the other vCPU's progress when this one was half way */
    struct smp_cpu *other;
};

static void *smp_thread(void *arg) {
    struct smp_cpu *c = arg;
    npt_vcpu *v = NULL;
    c->status = npt_vcpu_create(c->vm, c->index, &v);
    if (c->status != NPT_OK) return NULL;
    npt_regs r;
    long_mode_regs(&r, SMP_GUEST_CODE);
    r.cr3 = SMP_GUEST_CR3;
    r.gpr[7] = c->index;   /* rdi */
    r.gpr[14] = c->calls;
    r.gpr[15] = c->probe;
    c->status = npt_vcpu_set_regs(v, &r);
    while (c->status == NPT_OK) {
        npt_exit e;
        memset(&e, 0, sizeof e);
        e.size = sizeof e;
        c->status = npt_vcpu_run(v, &e);
        if (c->status != NPT_OK) break;
        if (e.reason == NPT_EXIT_IO && e.io_port == 0xE9) {
            if (c->len + 1 < sizeof c->out) c->out[c->len++] = (char)e.io_value;
            unsigned long long n = atomic_fetch_add(&c->progress, 1) + 1;
            if (c->other && n == c->calls / 2) atomic_store(&c->other_mid, atomic_load(&c->other->progress));
            continue;
        }
        c->last = e;
        break;
    }
    c->out[c->len] = 0;
    if (v) npt_vcpu_destroy(v);
    return NULL;
}

/* The guest kernel changes a user page's translation while its vCPU is in the supervisor view
 * (INVLPG, then a CR3 reload no KVM statistic shows): the user view, whose shadow MMU cached the
 * old translation, must see each change when the vCPU comes back (the plugin reads the supervisor
 * view's dirty log and zaps the user view's shadow MMU when a page table of it was written). Lazy
 * mode (a guarded user view, page tables tracked) and violation-only mode (no guarded view). */
static void test_views_coherence(npt_context *ctx, uint32_t mode) {
    npt_vm *vm = smp_vm(ctx, mode);
    if (!vm) return;
    uint64_t nv0 = 0, mv0 = 0, zp0 = 0, lr0 = 0, nv1 = 0, mv1 = 0, zp1 = 0, lr1 = 0;
    view_stats(vm, &nv0, &mv0, &zp0, &lr0);
    struct smp_cpu c;
    memset(&c, 0, sizeof c);
    c.vm = vm; c.index = 0; c.calls = 3; c.probe = 4;
    smp_thread(&c);
    view_stats(vm, &nv1, &mv1, &zp1, &lr1);
    printf("test_kvm: views: page-table coherence (%s): printed \"%s\", exit %u rip %#" PRIx64 "; %" PRIu64 " moves, %"
           PRIu64 " zaps, %" PRIu64 " dirty-log reads\n", mode == NPT_MBEC_LAZY ? "lazy" : "violation-only", c.out,
           c.last.reason, c.last.rip, mv1 - mv0, zp1 - zp0, lr1 - lr0);
    CHECK_OK(c.status);
    CHECK(strcmp(c.out, "012ONO") == 0);
    CHECK_EQ(c.last.reason, NPT_EXIT_HALT);
    CHECK_EQ(c.last.rip, SMP_GUEST_EXIT_HLT + 1);
    CHECK(zp1 - zp0 >= 2); /* the two page-table changes */
    CHECK_OK(npt_vm_destroy(vm));
}

/* The benchmark's CPL 3 exit (nptkit-cli bench --only kvm): smp.S's UOUTENTRY loads a TSS whose I/O
 * permission bitmap allows port 0xE9 and drops to a user-mode `out; jmp` loop (IOPL 0). Without a
 * policy every run ends in an OUT exit reported from CPL 3 (KVM honours the guest's bitmap: without
 * it the OUT is a #GP, which the guest's stub would report on port 0xEF), with no move between views. */
static void test_user_port(npt_context *ctx) {
    npt_vm *vm = kvm_vm(ctx, RAM, NPT_PERM_ALL);
    if (!vm) return;
    CHECK_OK(npt_vm_write_memory(vm, SMP_GUEST_BASE, smp_guest, sizeof smp_guest));
    npt_vcpu *v = NULL;
    CHECK_OK(npt_vcpu_create(vm, 0, &v));
    npt_regs r;
    long_mode_regs(&r, SMP_GUEST_UOUTENTRY);
    r.cr3 = SMP_GUEST_CR3;
    CHECK_OK(npt_vcpu_set_regs(v, &r));
    uint64_t mv0 = backend_stat(vm, "view_moves");
    int user_outs = 0;
    npt_exit e;
    for (int i = 0; i < 20; i++) {
        memset(&e, 0, sizeof e);
        e.size = sizeof e;
        if (npt_vcpu_run(v, &e) != NPT_OK) break;
        if (e.reason != NPT_EXIT_IO || e.io_port != 0xE9 || e.cpl != 3) break;
        if (e.rip < SMP_GUEST_UOUTLOOP || e.rip > SMP_GUEST_UOUTLOOP + 4) break;
        user_outs++;
    }
    printf("test_kvm: user-mode OUT (TSS I/O bitmap): %d of 20 runs exited at CPL 3 on port 0xE9; last exit %u port %#x"
           " cpl %u rip %#" PRIx64 "\n", user_outs, e.reason, e.io_port, e.cpl, e.rip);
    CHECK_EQ(user_outs, 20);
    CHECK_EQ(backend_stat(vm, "view_moves") - mv0, 0);
    CHECK_OK(npt_vm_destroy(vm));
}

/* Two vCPUs in different hierarchies at the same time, each making system calls (every call moves
 * it from the user view to the supervisor view and back): what each prints is exactly its own, the
 * MBEC violations are reported exactly (vCPU 0's user process jumps into a supervisor-only page,
 * vCPU 1's kernel jumps into a user-only page), and they ran together: each was half way while the
 * other had made calls and had calls left. */
static void test_views_concurrent(npt_context *ctx) {
    npt_vm *vm = smp_vm(ctx, NPT_MBEC_LAZY);
    if (!vm) return;
    uint64_t nv0 = 0, mv0 = 0, zp0 = 0, lr0 = 0, nv1 = 0, mv1 = 0, zp1 = 0, lr1 = 0;
    view_stats(vm, &nv0, &mv0, &zp0, &lr0);
    static struct smp_cpu c[2];
    memset(c, 0, sizeof c);
    const uint64_t calls = 300;
    for (int i = 0; i < 2; i++) {
        c[i].vm = vm;
        c[i].index = (uint32_t)i;
        c[i].calls = calls;
        c[i].probe = i == 0 ? KPROBE_USER_RUNS_KERNEL : KPROBE_KERNEL_RUNS_USER;
        c[i].other = &c[1 - i];
    }
    double t0 = now_s();
    pthread_t t[2];
    for (int i = 0; i < 2; i++) pthread_create(&t[i], NULL, smp_thread, &c[i]);
    for (int i = 0; i < 2; i++) pthread_join(t[i], NULL);
    double t1 = now_s();
    view_stats(vm, &nv1, &mv1, &zp1, &lr1);
    for (int i = 0; i < 2; i++) {
        printf("test_kvm: views: vCPU %d: %zu bytes printed, exit %u gpa %#" PRIx64 " cpl %u rip %#" PRIx64 " q %#" PRIx64
               "; the other vCPU had made %llu calls when it was half way\n", i, c[i].len, c[i].last.reason, c[i].last.gpa,
               c[i].last.cpl, c[i].last.rip, c[i].last.qualification, (unsigned long long)atomic_load(&c[i].other_mid));
        CHECK_OK(c[i].status);
        CHECK_EQ(c[i].len, calls);
        int in_order = 1;
        for (size_t k = 0; k < c[i].len; k++) in_order &= c[i].out[k] == (char)('0' + k % 10);
        CHECK(in_order);
    }
    printf("test_kvm: views: 2 vCPUs x %" PRIu64 " system calls in %.3f s: %" PRIu64 " moves, %" PRIu64 " views created, %"
           PRIu64 " zaps\n", calls, t1 - t0, mv1 - mv0, nv1 - nv0, zp1 - zp0);
    /* vCPU 0: the user process runs a supervisor-only page (mapped U/S = 1 by the guest) */
    CHECK_EQ(c[0].last.reason, NPT_EXIT_MBEC_VIOLATION);
    CHECK_EQ(c[0].last.gpa, SMP_GUEST_KFUNC);
    CHECK_EQ(c[0].last.rip, SMP_GUEST_KFUNC);
    CHECK_EQ(c[0].last.cpl, 3);
    CHECK_EQ(c[0].last.qualification & 0x7f, NPT_EPTQ_FETCH | NPT_EPTQ_READABLE | NPT_EPTQ_EXECUTABLE);
    /* vCPU 1: the kernel runs the user-only page */
    CHECK_EQ(c[1].last.reason, NPT_EXIT_MBEC_VIOLATION);
    CHECK_EQ(c[1].last.gpa, SMP_GUEST_USER);
    CHECK_EQ(c[1].last.rip, SMP_GUEST_USER);
    CHECK_EQ(c[1].last.cpl, 0);
    CHECK_EQ(c[1].last.qualification & 0x7f, NPT_EPTQ_FETCH | NPT_EPTQ_READABLE | NPT_EPTQ_UEXECUTABLE);
    CHECK(mv1 - mv0 >= 4 * calls);
    /* they overlapped: each was half way while the other had started and not finished */
    int overlapped = 0;
    for (int i = 0; i < 2; i++) {
        unsigned long long m = atomic_load(&c[i].other_mid);
        overlapped |= m > 0 && m < calls;
    }
    CHECK(overlapped);
    npt_stats st = kernel_stats(vm);
    printf("test_kvm: views: the VM: %" PRIu64 " exits, %" PRIu64 " escalations, %" PRIu64 " EPT violations, %" PRIu64
           " violations reported\n", st.exits_total, st.exits_escalation, st.exits_ept_violation, st.violations_reported);
    CHECK_EQ(st.violations_reported, 2);
    CHECK_OK(npt_vm_destroy(vm));
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The ops directly: attaching again at the same gpa replaces the attachment; memory_read serves
 * NVDIMM gpas; completing a trapped write without one is a state error. */
static void test_ops_pmem(void) {
    const npt_backend_ops *o = entry_ops;
    CHECK(o->host_pmem_count && o->host_pmem_get && o->attach_pmem && o->define_flush_hint_page &&
          o->physical_flush && o->vcpu_fence && o->vcpu_complete_trapped_write);
    CHECK(o->power_failure == NULL);
    CHECK(o->capabilities & NPT_CAP_PERSISTENT_MEMORY);
    npt_vm_config cfg = {0};
    cfg.size = sizeof cfg;
    cfg.mbec_mode = NPT_MBEC_LAZY;
    cfg.ram_size = RAM;
    cfg.default_perms = NPT_PERM_ALL;
    void *vm = NULL, *vc = NULL;
    CHECK_OK(o->vm_create(o->backend_data, NULL, &cfg, &vm));
    if (!vm) return;
    size_t n = 0;
    CHECK_OK(o->host_pmem_count(o->backend_data, &n));
    CHECK_EQ(n, 1);
    CHECK_OK(o->attach_pmem(vm, NVD_GPA, 0x2000, 1, 0x1000, 0));
    CHECK_OK(o->memory_write(vm, NVD_GPA + 0x1000, "abc", 4));
    /* again at the same gpa, one page further into the file: replaces the first */
    CHECK_OK(o->attach_pmem(vm, NVD_GPA, 0x1000, 1, 0x2000, 0));
    char buf[4] = {0};
    CHECK_OK(o->memory_read(vm, NVD_GPA, buf, 4));
    CHECK(strcmp(buf, "abc") == 0);
    CHECK_ST(o->memory_read(vm, NVD_GPA + 0x1000, buf, 4), NPT_ERR_OUT_OF_RANGE);
    CHECK_ST(o->attach_pmem(vm, NVD_GPA, 0x1000, 99, 0, 0), NPT_ERR_NOT_FOUND);
    CHECK_OK(o->define_flush_hint_page(vm, NVD_GPA + NVD_LEN, 0, 1));
    CHECK_OK(o->define_flush_hint_page(vm, NVD_GPA + NVD_LEN, 0, 0));
    CHECK_OK(o->physical_flush(vm, 1, 0, 0));
    CHECK_OK(o->vcpu_create(vm, 0, &vc));
    if (vc) {
        CHECK_OK(o->vcpu_fence(vc));
        CHECK_ST(o->vcpu_complete_trapped_write(vc), NPT_ERR_STATE);
        o->vcpu_destroy(vc);
    }
    o->vm_destroy(vm);
}

/* Runs the pmem guest at `entry`: N iterations of store, write-back, SFENCE, vFHA write, OUT i.
 * Returns the exit that ended the run; *outs = the OUTs seen (in order 0, 1, ...). */
static npt_exit run_pmem(npt_vcpu *v, uint64_t entry, uint64_t vfha, uint64_t n, uint64_t *outs, double *secs) {
    npt_regs r;
    long_mode_regs(&r, entry);
    r.cr3 = PMEM_GUEST_CR3;
    r.gpr[7] = NVD_GPA; /* rdi */
    r.gpr[6] = vfha;    /* rsi */
    r.gpr[1] = n;       /* rcx */
    npt_exit e;
    memset(&e, 0, sizeof e);
    *outs = 0;
    if (npt_vcpu_set_regs(v, &r) != NPT_OK) return e;
    double t0 = now_s();
    for (;;) {
        memset(&e, 0, sizeof e);
        e.size = sizeof e;
        npt_status s = npt_vcpu_run(v, &e);
        if (s != NPT_OK) {
            fprintf(stderr, "npt_vcpu_run: %s: %s\n", npt_status_string(s), npt_last_error());
            e.reason = NPT_EXIT_NONE;
            break;
        }
        if (e.reason == NPT_EXIT_IO && e.io_port == 0xE9 && (e.io_value & 0xFF) == (*outs & 0xFF)) {
            ++*outs;
            continue;
        }
        break;
    }
    *secs = now_s() - t0;
    return e;
}

/* needs_flush: the plugin argument pmem-needs-flush of ctx's load (checked below). */
static void test_pmem(npt_context *ctx, int needs_flush) {
    npt_vm *vm = kvm_vm(ctx, RAM, NPT_PERM_ALL);
    if (!vm) return;
    size_t n = 0;
    CHECK_OK(npt_vm_host_pmem_count(vm, &n));
    CHECK_EQ(n, 1);
    npt_host_pmem_region hr;
    memset(&hr, 0, sizeof hr);
    hr.size = sizeof hr;
    CHECK_OK(npt_vm_host_pmem_get(vm, 0, &hr));
    CHECK_EQ(hr.id, 1);
    CHECK_EQ(hr.base, 0);
    CHECK_EQ(hr.length, UINT64_C(64) << 20);
    CHECK_EQ(hr.flush_target_count, 1);
    CHECK_EQ(hr.controller_count, 1);
    CHECK_EQ(hr.needs_wpq_flush, needs_flush);
    npt_nvdimm d = {0};
    d.size = sizeof d;
    d.host_region = 1;
    d.gpa = NVD_GPA;
    d.length = NVD_LEN;
    d.region_offset = 0;
    CHECK_OK(npt_vm_add_nvdimm(vm, &d));
    npt_flush_hint_info fh;
    memset(&fh, 0, sizeof fh);
    fh.size = sizeof fh;
    CHECK_OK(npt_vm_get_flush_hint(vm, &fh));
    CHECK_EQ(fh.trapped, needs_flush);
    CHECK_EQ(fh.target_count, 1);
    CHECK_EQ(fh.nvdimm_count, 1);
    CHECK(fh.vfha >= NVD_GPA + NVD_LEN && fh.vfha < UINT64_C(0x80000000)); /* mapped by pmem.S's PD1 */
    if (!needs_flush) {
        /* a load of its own (pmem-needs-flush=0) has a backing file of its own: none of the first
         * load's records is in it */
        uint64_t rec[2] = {1, 1};
        CHECK_OK(npt_vm_read_memory(vm, NVD_GPA + 64 * (PMEM_N - 1), rec, sizeof rec));
        CHECK_EQ(rec[0], 0);
        CHECK_EQ(rec[1], 0);
    }
    CHECK_OK(npt_vm_write_memory(vm, PMEM_GUEST_BASE, pmem_guest, sizeof pmem_guest));
    npt_vcpu *v = NULL;
    CHECK_OK(npt_vcpu_create(vm, 0, &v));
    if (v) {
        /* CLWB first; the write-back instruction KVM's emulator does not know is reported */
        static const struct { uint64_t entry; const char *name; } flushes[] = {
            {PMEM_GUEST_CLWB_ENTRY, "CLWB"}, {PMEM_GUEST_CLFLUSHOPT_ENTRY, "CLFLUSHOPT"}, {PMEM_GUEST_CLFLUSH_ENTRY, "CLFLUSH"}};
        npt_exit e;
        memset(&e, 0, sizeof e);
        uint64_t outs = 0, pf0 = 0, pns0 = 0, pf1 = 0, pns1 = 0, sw0 = 0, up0 = 0, sw1 = 0, up1 = 0, last = 0;
        uint64_t mr0 = 0, mn0 = 0, mr1 = 0, mn1 = 0;
        double secs = 0;
        const char *used = NULL;
        mmio_stats(vm, &mr0, &mn0);
        npt_flush_stats st0;
        memset(&st0, 0, sizeof st0);
        st0.size = sizeof st0;
        for (size_t k = 0; k < sizeof flushes / sizeof flushes[0] && !used; k++) {
            CHECK_OK(npt_vm_get_flush_stats(vm, &st0));
            pmem_stats(vm, &pf0, &pns0);
            layout_stats(vm, &sw0, &up0, &last);
            e = run_pmem(v, flushes[k].entry, fh.vfha, PMEM_N, &outs, &secs);
            if (e.reason == NPT_EXIT_HALT && outs == PMEM_N) {
                used = flushes[k].name;
            } else {
                printf("test_kvm: pmem: %s: the guest stopped after %" PRIu64 " iterations: exit %u rip %#" PRIx64
                       " q %#" PRIx64 " gpa %#" PRIx64 " (not emulated by this KVM?)\n",
                       flushes[k].name, outs, e.reason, e.rip, e.qualification, e.gpa);
            }
        }
        CHECK(used != NULL);
        if (used) {
            npt_flush_stats st;
            memset(&st, 0, sizeof st);
            st.size = sizeof st;
            CHECK_OK(npt_vm_get_flush_stats(vm, &st));
            pmem_stats(vm, &pf1, &pns1);
            layout_stats(vm, &sw1, &up1, &last);
            {
                /* default_perms NPT_PERM_ALL: the NVDIMM range stays mapped (executable and writable
                 * in the exposed hierarchy): not one of its accesses exits as MMIO */
                mmio_stats(vm, &mr1, &mn1);
                printf("test_kvm: pmem (default_perms ALL): %" PRIu64 " NVDIMM MMIO completion(s)\n", mn1 - mn0);
                CHECK_EQ(mn1 - mn0, 0);
            }
            uint64_t gf = st.guest_flushes - st0.guest_flushes, ex = st.exits - st0.exits;
            uint64_t pf = st.physical_flushes - st0.physical_flushes, ns = st.flush_ns_total - st0.flush_ns_total;
            uint64_t want = needs_flush ? PMEM_N : 0;
            CHECK_EQ(gf, want);
            CHECK_EQ(ex, want);
            CHECK_EQ(pf, want);
            CHECK_EQ(st.untrapped_writes, 0); /* KVM cannot count them */
            CHECK_EQ(pf1 - pf0, want);
            printf("test_kvm: pmem (%s, vFHA %s at %#" PRIx64 "): %d iterations with %s: %" PRIu64
                   " flush exit(s), %" PRIu64 " physical flush(es) (msync)\n",
                   needs_flush ? "needs_wpq_flush 1" : "pmem-needs-flush=0", fh.trapped ? "trapped" : "not trapped",
                   fh.vfha, PMEM_N, used, ex, pf);
            printf("test_kvm: pmem timing (%s): wall %.1f us per iteration",
                   fh.trapped ? "trapped" : "untrapped", secs * 1e6 / PMEM_N);
            if (gf) printf(", guest flush %.1f us (flush_ns_total / guest_flushes), msync %.1f us each",
                           ns / 1e3 / gf, pf1 > pf0 ? (pns1 - pns0) / 1e3 / (pf1 - pf0) : 0.0);
            printf("; %" PRIu64 " layout switch(es), %" PRIu64 " memslot update(s) during the run\n", sw1 - sw0, up1 - up0);
            /* the records, read back through the core (npt_vm_read_memory serves NVDIMM ranges) */
            uint64_t rec[PMEM_N * 8];
            CHECK_OK(npt_vm_read_memory(vm, NVD_GPA, rec, sizeof rec));
            int good = 0;
            for (int i = 0; i < PMEM_N; i++) good += rec[8 * i] == PMEM_GUEST_MAGIC && rec[8 * i + 1] == (uint64_t)i;
            CHECK_EQ(good, PMEM_N);
        }
        npt_vcpu_destroy(v);
    }
    CHECK_OK(npt_vm_destroy(vm));
}

/* default_perms R|W (not NPT_PERM_ALL): the NVDIMM range is executable in no hierarchy, so the
 * layouts leave it out. (1) The pmem guest's stores exit as MMIO and are completed from the range's
 * file mapping: its records become durable (flush exits, msyncs, the records read back). (2) A jump
 * into the range is an instruction fetch the hierarchy refuses: NPT_EXIT_MBEC_VIOLATION at that gpa
 * with NPT_EPTQ_FETCH, as for a RAM page. RAM is made R|W|SX|UX (the guest's code, tables, stack). */
#define NVX_OFFSET (UINT64_C(8) << 20) /* a part of the backing file no other test writes */
static void test_pmem_nx(npt_context *ctx) {
    npt_vm *vm = kvm_vm(ctx, RAM, NPT_PERM_READ | NPT_PERM_WRITE);
    if (!vm) return;
    CHECK_OK(npt_policy_set(vm, 0, RAM, NPT_PAGE_4K, NPT_PERM_ALL));
    npt_nvdimm d = {0};
    d.size = sizeof d;
    d.host_region = 1;
    d.gpa = NVD_GPA;
    d.length = NVD_LEN;
    d.region_offset = NVX_OFFSET;
    CHECK_OK(npt_vm_add_nvdimm(vm, &d));
    npt_flush_hint_info fh;
    memset(&fh, 0, sizeof fh);
    fh.size = sizeof fh;
    CHECK_OK(npt_vm_get_flush_hint(vm, &fh));
    CHECK_EQ(fh.trapped, 1);
    npt_translation t;
    memset(&t, 0, sizeof t);
    t.size = sizeof t;
    CHECK_OK(npt_hierarchy_translate(vm, NPT_HIERARCHY_SUPERVISOR, NVD_GPA, &t));
    printf("test_kvm: pmem R|W: the NVDIMM range's permissions in the supervisor hierarchy: %#" PRIx64 "\n", t.perms);
    CHECK_EQ(t.perms & (NPT_PERM_READ | NPT_PERM_WRITE | NPT_PERM_SX), NPT_PERM_READ | NPT_PERM_WRITE);
    uint64_t rec[PMEM_N * 8];
    CHECK_OK(npt_vm_read_memory(vm, NVD_GPA, rec, sizeof rec));
    int zero = 0;
    for (int i = 0; i < PMEM_N * 8; i++) zero += rec[i] == 0;
    CHECK_EQ(zero, PMEM_N * 8); /* nothing there before this guest runs */
    CHECK_OK(npt_vm_write_memory(vm, PMEM_GUEST_BASE, pmem_guest, sizeof pmem_guest));
    npt_vcpu *v = NULL;
    CHECK_OK(npt_vcpu_create(vm, 0, &v));
    if (v) {
        npt_flush_stats st0, st;
        memset(&st0, 0, sizeof st0);
        st0.size = sizeof st0;
        memset(&st, 0, sizeof st);
        st.size = sizeof st;
        uint64_t outs = 0, mr0 = 0, mn0 = 0, mr1 = 0, mn1 = 0, sw0 = 0, up0 = 0, sw1 = 0, up1 = 0, last = 0;
        double secs = 0;
        CHECK_OK(npt_vm_get_flush_stats(vm, &st0));
        mmio_stats(vm, &mr0, &mn0);
        layout_stats(vm, &sw0, &up0, &last);
        /* CLFLUSHOPT: KVM's emulator treats it as a no-op (the store before it already reached the file) */
        npt_exit e = run_pmem(v, PMEM_GUEST_CLFLUSHOPT_ENTRY, fh.vfha, PMEM_N, &outs, &secs);
        mmio_stats(vm, &mr1, &mn1);
        layout_stats(vm, &sw1, &up1, &last);
        CHECK_OK(npt_vm_get_flush_stats(vm, &st));
        printf("test_kvm: pmem R|W (NVDIMM range not mapped): %" PRIu64 " iterations with CLFLUSHOPT, exit %u rip %#" PRIx64
               " gpa %#" PRIx64 "; %" PRIu64 " flush exit(s), %" PRIu64 " physical flush(es), %" PRIu64
               " NVDIMM MMIO completion(s); wall %.1f us per iteration; %" PRIu64 " layout switch(es), %" PRIu64
               " memslot update(s)\n",
               outs, e.reason, e.rip, e.gpa, st.exits - st0.exits, st.physical_flushes - st0.physical_flushes, mn1 - mn0,
               secs * 1e6 / PMEM_N, sw1 - sw0, up1 - up0);
        CHECK_EQ(e.reason, NPT_EXIT_HALT);
        CHECK_EQ(outs, PMEM_N);
        CHECK_EQ(st.guest_flushes - st0.guest_flushes, PMEM_N);
        CHECK_EQ(st.exits - st0.exits, PMEM_N);
        CHECK_EQ(st.physical_flushes - st0.physical_flushes, PMEM_N);
        CHECK(mn1 - mn0 >= 2 * PMEM_N); /* two 8-byte stores per record */
        /* the first install (all RAM stays one memslot): the NVDIMM range's memslot deleted */
        CHECK_EQ(up1 - up0, 1);
        CHECK_OK(npt_vm_read_memory(vm, NVD_GPA, rec, sizeof rec));
        int good = 0;
        for (int i = 0; i < PMEM_N; i++) good += rec[8 * i] == PMEM_GUEST_MAGIC && rec[8 * i + 1] == (uint64_t)i;
        CHECK_EQ(good, PMEM_N);

        /* (2) a fetch from the NVDIMM range: raw, then through the core */
        npt_regs r;
        long_mode_regs(&r, PMEM_GUEST_JUMP_ENTRY);
        r.cr3 = PMEM_GUEST_CR3;
        r.gpr[7] = NVD_GPA + 0x40; /* rdi */
        CHECK_OK(npt_vcpu_set_regs(v, &r));
        memset(&e, 0, sizeof e);
        e.size = sizeof e;
        CHECK_OK(npt_vcpu_run_raw(v, &e));
        printf("test_kvm: pmem R|W: jump into the NVDIMM range: raw exit %u gpa %#" PRIx64 " q %#" PRIx64 " rip %#" PRIx64 "\n",
               e.reason, e.gpa, e.qualification, e.rip);
        CHECK_EQ(e.reason, NPT_EXIT_EPT_VIOLATION);
        CHECK_EQ(e.gpa, NVD_GPA);
        CHECK_EQ(e.qualification & 0x7f, NPT_EPTQ_FETCH | NPT_EPTQ_READABLE | NPT_EPTQ_WRITABLE);
        uint32_t action = 99;
        CHECK_OK(npt_handle_exit(v, &e, &action));
        printf("test_kvm: pmem R|W: the core: action %u exit %u gpa %#" PRIx64 " q %#" PRIx64 "\n", action, e.reason, e.gpa,
               e.qualification);
        CHECK_EQ(action, NPT_ACTION_REPORT_VIOLATION);
        CHECK_EQ(e.reason, NPT_EXIT_MBEC_VIOLATION);
        CHECK_EQ(e.gpa, NVD_GPA);
        CHECK(e.qualification & NPT_EPTQ_FETCH);
        /* the library loop: the same violation */
        CHECK_OK(npt_vcpu_set_regs(v, &r));
        e = run_pmem(v, PMEM_GUEST_JUMP_ENTRY, fh.vfha, 1, &outs, &secs);
        CHECK_EQ(e.reason, NPT_EXIT_MBEC_VIOLATION);
        CHECK_EQ(e.gpa, NVD_GPA);
        CHECK(e.qualification & NPT_EPTQ_FETCH);

        /* a fetch from a later page of the range: the violation names that page */
        long_mode_regs(&r, PMEM_GUEST_JUMP_ENTRY);
        r.cr3 = PMEM_GUEST_CR3;
        r.gpr[7] = NVD_GPA + 0x1010;
        CHECK_OK(npt_vcpu_set_regs(v, &r));
        memset(&e, 0, sizeof e);
        e.size = sizeof e;
        CHECK_OK(npt_vcpu_run(v, &e));
        printf("test_kvm: pmem R|W: jump into the NVDIMM range's second page (library loop): exit %u gpa %#" PRIx64 " q %#" PRIx64 "\n",
               e.reason, e.gpa, e.qualification);
        CHECK_EQ(e.reason, NPT_EXIT_MBEC_VIOLATION);
        CHECK_EQ(e.gpa, NVD_GPA + 0x1000);
        CHECK(e.qualification & NPT_EPTQ_FETCH);
        npt_vcpu_destroy(v);
    }
    CHECK_OK(npt_vm_destroy(vm));
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s libnptkit-kvm.so\n", argv[0]);
        return 2;
    }
    const char *so = argv[1];
    test_entry(so);

    npt_context *ctx = NULL;
    CHECK_OK(npt_context_create(&ctx));
    const char *name = NULL;
    CHECK_OK(npt_plugin_load(ctx, so, &name));
    CHECK(name && strcmp(name, "kvm") == 0);
    size_t n = 0;
    CHECK_OK(npt_backend_count(ctx, &n));
    int found = 0;
    for (size_t i = 0; i < n; i++) {
        npt_backend_info info;
        memset(&info, 0, sizeof info);
        info.size = sizeof info;
        CHECK_OK(npt_backend_get(ctx, i, &info));
        if (strcmp(info.name, "kvm") == 0) {
            found = 1;
            CHECK(info.is_plugin);
            CHECK(info.capabilities & NPT_CAP_RUN);
            CHECK(!(info.capabilities & NPT_CAP_EXIT_ON_RETURN));
        }
    }
    CHECK(found);

    int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        int err = errno;
        printf("test_kvm: SKIPPED guest runs: /dev/kvm cannot be opened (%s)\n", strerror(err));
        skipped++;
        npt_vm_config cfg = {0};
        cfg.size = sizeof cfg;
        cfg.mbec_mode = NPT_MBEC_LAZY;
        cfg.backend = "kvm";
        cfg.ram_size = RAM;
        cfg.default_perms = NPT_PERM_ALL;
        npt_vm *vm = NULL;
        /* Without /dev/kvm the plugin's probe cannot show its escalation exit: lazy mode is refused
         * as a guarantee it cannot keep, naming why; violation-only mode reaches the backend,
         * which cannot open /dev/kvm. */
        CHECK_ST(npt_vm_create(ctx, &cfg, &vm), NPT_ERR_GUARANTEE);
        CHECK(strstr(npt_last_error(), "cannot open /dev/kvm") != NULL);
        cfg.mbec_mode = NPT_MBEC_VIOLATION_ONLY;
        CHECK_ST(npt_vm_create(ctx, &cfg, &vm), NPT_ERR_UNSUPPORTED);
    } else {
        close(fd);
        if (entry_ops) {
            test_ops_memory();
            test_kick_thread();
        }
        /* exact MBEC needs exits on return to user mode, which the KVM backend lacks: refused as a
         * guarantee it cannot keep, naming the capability */
        npt_vm_config cfg = {0};
        cfg.size = sizeof cfg;
        cfg.mbec_mode = NPT_MBEC_EXACT;
        cfg.backend = "kvm";
        cfg.ram_size = RAM;
        cfg.default_perms = NPT_PERM_ALL;
        npt_vm *vm = NULL;
        CHECK_ST(npt_vm_create(ctx, &cfg, &vm), NPT_ERR_GUARANTEE);
        CHECK(strstr(npt_last_error(), "NPT_CAP_EXIT_ON_RETURN") != NULL);
        test_guest(ctx);
        test_mbec(ctx);
        test_mbec_rw(ctx);
        if (entry_ops) test_ops_pmem();
        test_pmem(ctx, 1);
        {
            /* A host region that claims ADR: a load of its own with pmem-needs-flush=0. */
            npt_context *adr = NULL;
            CHECK_OK(npt_context_create(&adr));
            npt_plugin_arg arg = {"pmem-needs-flush", "0"};
            CHECK_OK(npt_plugin_load_with(adr, so, &arg, 1, NULL));
            test_pmem(adr, 0);
            CHECK_OK(npt_context_destroy(adr));
        }
        test_pmem_nx(ctx);
        test_kernel(ctx);
        test_ret2dir_idt(ctx, NPT_MBEC_LAZY);
        test_ret2dir_idt(ctx, NPT_MBEC_VIOLATION_ONLY);
        test_escalation_needs_an_idt(ctx);
        test_inject(ctx);
        test_switch_cost_independent_of_size(ctx);
        test_image_too_large(ctx);
        test_gate(ctx);
        test_views_coherence(ctx, NPT_MBEC_LAZY);
        test_views_coherence(ctx, NPT_MBEC_VIOLATION_ONLY);
        test_views_concurrent(ctx);
        test_user_port(ctx);
    }
    CHECK_OK(npt_context_destroy(ctx));
    printf("c-test test_kvm: %d passed, %d failed, %d skipped\n", passed, failed, skipped);
    if (failed) return 1;
    return skipped ? 77 : 0;
}
