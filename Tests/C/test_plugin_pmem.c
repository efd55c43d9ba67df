/*
 * test_plugin_pmem.c - persistent memory (virtualized NVDIMM WPQ flushing, ABI 1.1) through
 * backends written in C: the sample plugin (examples/plugin/sample_backend.c) and ops tables
 * registered here with npt_backend_register, complete, shorter (an older header) or missing an
 * operation.
 *
 * Usage: test_plugin_pmem SAMPLE_SO
 * Prints one line "c-test test_plugin_pmem: N passed, M failed" at the end; exits 1 if M > 0.
 */
#define _GNU_SOURCE /* RTLD_NOLOAD */
#include <nptkit.h>

#include <dlfcn.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sample_backend.h"

/* ------------------------------------------------------------------------ */
/* Assertions                                                                 */
/* ------------------------------------------------------------------------ */
static int passed, failed;

static void check(int ok, const char *what, int line) {
    if (ok) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL test_plugin_pmem.c:%d: %s\n", line, what);
    }
}

static void check_status(npt_status got, npt_status want, const char *call, int line) {
    if (got == want) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL test_plugin_pmem.c:%d: %s\n    expected %s\n    got      %s\n    last error: %s\n",
                line, call, npt_status_string(want), npt_status_string(got), npt_last_error());
    }
}

static void check_u64(uint64_t got, uint64_t want, const char *what, int line) {
    if (got == want) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL test_plugin_pmem.c:%d: %s == %#" PRIx64 ", expected %#" PRIx64 "\n", line, what, got,
                want);
    }
}

#define CHECK(cond) check(!!(cond), #cond, __LINE__)
#define CHECK_ST(call, want) check_status((call), (want), #call, __LINE__)
#define CHECK_OK(call) check_status((call), NPT_OK, #call, __LINE__)
#define CHECK_EQ(got, want) check_u64((uint64_t)(got), (uint64_t)(want), #got, __LINE__)
#define CHECK_ERR_MENTIONS(word) \
    check(strstr(npt_last_error(), (word)) != NULL, "npt_last_error() mentions \"" word "\"", __LINE__)

#define K4 UINT64_C(0x1000)
#define M1 (UINT64_C(1) << 20)
#define M2 (UINT64_C(1) << 21)
#define NV_GPA (UINT64_C(4) << 30) /* 4 GiB: outside RAM */

/* ------------------------------------------------------------------------ */
/* Helpers                                                                    */
/* ------------------------------------------------------------------------ */
static int backend_caps(npt_context *ctx, const char *name, uint64_t *caps) {
    size_t n = 0;
    check_status(npt_backend_count(ctx, &n), NPT_OK, "npt_backend_count", __LINE__);
    for (size_t i = 0; i < n; i++) {
        npt_backend_info info;
        memset(&info, 0, sizeof info);
        info.size = sizeof info;
        if (npt_backend_get(ctx, i, &info) == NPT_OK && info.name && strcmp(info.name, name) == 0) {
            *caps = info.capabilities;
            return 1;
        }
    }
    return 0;
}

static npt_vm *make_vm(npt_context *ctx, const char *backend, uint64_t ram) {
    npt_vm_config c;
    memset(&c, 0, sizeof c);
    c.size = sizeof c;
    c.mbec_mode = NPT_MBEC_EXACT;
    c.backend = backend;
    c.ram_size = ram;
    c.default_perms = NPT_PERM_READ | NPT_PERM_WRITE;
    npt_vm *vm = NULL;
    npt_status s = npt_vm_create(ctx, &c, &vm);
    check_status(s, NPT_OK, "make_vm: npt_vm_create", __LINE__);
    return s == NPT_OK ? vm : NULL;
}

static npt_nvdimm nvdimm(uint32_t region, uint64_t gpa, uint64_t length, uint64_t offset) {
    npt_nvdimm n;
    memset(&n, 0, sizeof n);
    n.size = sizeof n;
    n.host_region = region;
    n.gpa = gpa;
    n.length = length;
    n.region_offset = offset;
    return n;
}

static npt_exit exit_init(void) {
    npt_exit e;
    memset(&e, 0, sizeof e);
    e.size = sizeof e;
    return e;
}

static npt_exit scripted(uint32_t reason, uint64_t gpa, uint64_t qualification) {
    npt_exit e = exit_init();
    e.reason = reason;
    e.gpa = gpa;
    e.qualification = qualification;
    return e;
}

static npt_flush_hint_info flush_hint_info(void) {
    npt_flush_hint_info i;
    memset(&i, 0, sizeof i);
    i.size = sizeof i;
    return i;
}

static npt_flush_stats flush_stats(npt_vm *vm) {
    npt_flush_stats f;
    memset(&f, 0, sizeof f);
    f.size = sizeof f;
    check_status(npt_vm_get_flush_stats(vm, &f), NPT_OK, "npt_vm_get_flush_stats", __LINE__);
    return f;
}

static npt_translation translate(npt_vm *vm, uint32_t hierarchy, uint64_t gpa) {
    npt_translation t;
    memset(&t, 0, sizeof t);
    t.size = sizeof t;
    check_status(npt_hierarchy_translate(vm, hierarchy, gpa, &t), NPT_OK, "npt_hierarchy_translate", __LINE__);
    return t;
}

/* dlsym returns an object pointer; copying its bytes is the ISO C way to get a function pointer. */
static void *plugin_symbol(void *lib, const char *name, void *fn_out, size_t fn_size) {
    void *sym = lib ? dlsym(lib, name) : NULL;
    if (sym) memcpy(fn_out, &sym, fn_size);
    return sym;
}

/* A guest write to the vFHA, as the hardware reports it (write to a read-only page). */
#define FLUSH_WRITE (NPT_EPTQ_WRITE | NPT_EPTQ_READABLE | NPT_EPTQ_GLA_VALID | NPT_EPTQ_GLA_TRANSL)

/* ------------------------------------------------------------------------ */
/* The sample plugin                                                          */
/* ------------------------------------------------------------------------ */
static void test_sample(const char *path) {
    npt_context *ctx = NULL;
    CHECK_OK(npt_context_create(&ctx));
    if (!ctx) return;
    const char *name = NULL;
    CHECK_OK(npt_plugin_load(ctx, path, &name));
    uint64_t caps = 0;
    CHECK(backend_caps(ctx, SAMPLE_BACKEND_NAME, &caps));
    CHECK((caps & NPT_CAP_PERSISTENT_MEMORY) != 0); /* the sample has every required operation */

    void *lib = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    CHECK(lib != NULL);
    sample_backend_counters_fn counters = NULL;
    sample_backend_set_script_fn set_script = NULL;
    sample_backend_fail_pmem_fn fail_pmem = NULL;
    CHECK(plugin_symbol(lib, "sample_backend_counters", &counters, sizeof counters) != NULL);
    CHECK(plugin_symbol(lib, "sample_backend_set_script", &set_script, sizeof set_script) != NULL);
    CHECK(plugin_symbol(lib, "sample_backend_fail_pmem", &fail_pmem, sizeof fail_pmem) != NULL);
    npt_vm *vm = (counters && set_script && fail_pmem) ? make_vm(ctx, SAMPLE_BACKEND_NAME, M1) : NULL;
    if (!vm) {
        if (lib) dlclose(lib);
        CHECK_OK(npt_context_destroy(ctx));
        return;
    }

    /* host discovery: region 7 with its 2 flush targets */
    size_t count = 0;
    CHECK_OK(npt_vm_host_pmem_count(vm, &count));
    CHECK_EQ(count, 1);
    npt_host_pmem_region r;
    memset(&r, 0, sizeof r);
    r.size = sizeof r;
    CHECK_OK(npt_vm_host_pmem_get(vm, 0, &r));
    CHECK_EQ(r.id, SAMPLE_PMEM_REGION);
    CHECK_EQ(r.base, SAMPLE_PMEM_BASE);
    CHECK_EQ(r.length, SAMPLE_PMEM_LENGTH);
    CHECK_EQ(r.controller_count, 2);
    CHECK_EQ(r.flush_target_count, 2);
    CHECK_EQ(r.needs_wpq_flush, 1);
    CHECK_ST(npt_vm_host_pmem_get(vm, 1, &r), NPT_ERR_NOT_FOUND);

    /* no NVDIMM range yet: no vFHA */
    npt_flush_hint_info fh = flush_hint_info();
    CHECK_ST(npt_vm_get_flush_hint(vm, &fh), NPT_ERR_STATE);
    CHECK_ST(npt_vm_power_failure(vm), NPT_ERR_STATE);

    /* the core checks before asking the backend */
    struct sample_counters c0, c1;
    counters(&c0);
    npt_nvdimm bad = nvdimm(SAMPLE_PMEM_REGION, NV_GPA, M2, SAMPLE_PMEM_LENGTH - K4);
    CHECK_ST(npt_vm_add_nvdimm(vm, &bad), NPT_ERR_OUT_OF_RANGE);
    bad = nvdimm(3, NV_GPA, M2, 0);
    CHECK_ST(npt_vm_add_nvdimm(vm, &bad), NPT_ERR_NOT_FOUND);
    counters(&c1);
    CHECK_EQ(c1.pmem_attaches, c0.pmem_attaches);

    /* a failing backend changes nothing: attach fails, then the flush hint page fails */
    npt_nvdimm n = nvdimm(SAMPLE_PMEM_REGION, NV_GPA, M2, 0);
    fail_pmem(SAMPLE_FAIL_ATTACH);
    CHECK_ST(npt_vm_add_nvdimm(vm, &n), NPT_ERR_BACKEND);
    CHECK_ERR_MENTIONS("attach_pmem");
    CHECK_ST(npt_vm_get_flush_hint(vm, &fh), NPT_ERR_STATE);
    fail_pmem(SAMPLE_FAIL_DEFINE_FLUSH_HINT);
    CHECK_ST(npt_vm_add_nvdimm(vm, &n), NPT_ERR_BACKEND);
    CHECK_ERR_MENTIONS("define_flush_hint_page");
    CHECK_ST(npt_vm_get_flush_hint(vm, &fh), NPT_ERR_STATE);
    CHECK_EQ(translate(vm, NPT_HIERARCHY_SUPERVISOR, NV_GPA).level, 0); /* not mapped */
    counters(&c1);
    CHECK_EQ(c1.pmem_failures, c0.pmem_failures + 2);
    CHECK_EQ(c1.pmem_attaches, c0.pmem_attaches + 1); /* the second try attached, then the page failed */
    CHECK_EQ(c1.flush_hint_defines, c0.flush_hint_defines);

    /* the same range again works: nothing was left reserved */
    CHECK_OK(npt_vm_add_nvdimm(vm, &n));
    counters(&c0);
    CHECK_EQ(c0.pmem_attaches, c1.pmem_attaches + 1);
    CHECK_EQ(c0.last_attach_gpa, NV_GPA);
    CHECK_EQ(c0.last_attach_size, M2);
    CHECK_EQ(c0.last_attach_region, SAMPLE_PMEM_REGION);
    CHECK_EQ(c0.last_attach_region_offset, 0);
    npt_translation t = translate(vm, NPT_HIERARCHY_SUPERVISOR, NV_GPA + K4);
    CHECK(t.level != 0);
    /* the hierarchies point where the backend was told (host_offset is the leaf's) */
    CHECK_EQ(t.host_offset + ((NV_GPA + K4) & (t.page_size - 1)), c0.last_attach_host_offset + K4);

    fh = flush_hint_info();
    CHECK_OK(npt_vm_get_flush_hint(vm, &fh));
    CHECK_EQ(fh.trapped, 1);
    CHECK_EQ(fh.target_count, 2);
    CHECK_EQ(fh.nvdimm_count, 1);
    CHECK(fh.vfha != 0 && (fh.vfha & (K4 - 1)) == 0);
    CHECK(fh.vfha >= NV_GPA + M2 || fh.vfha + K4 <= NV_GPA);
    CHECK_EQ(c0.flush_hint_defines, c1.flush_hint_defines + 1);
    CHECK_EQ(c0.flush_hint_gpa, fh.vfha);
    CHECK_EQ(c0.flush_hint_trapped, 1);
    t = translate(vm, NPT_HIERARCHY_USER, fh.vfha);
    CHECK(t.level != 0);
    CHECK_EQ(t.host_offset, c0.flush_hint_host_offset);
    CHECK_EQ(t.perms & NPT_PERM_WRITE, 0); /* trapped: read-only in every hierarchy */
    for (size_t i = 0; i < 2; i++) {
        uint32_t region = 0, controller = 99;
        uint64_t address = 0;
        CHECK_OK(npt_vm_get_flush_target(vm, i, &region, &controller, &address));
        CHECK_EQ(region, SAMPLE_PMEM_REGION);
        CHECK_EQ(controller, i);
        CHECK_EQ(address, i == 0 ? SAMPLE_PMEM_HINT0 : SAMPLE_PMEM_HINT1);
    }
    size_t needed = 0;
    CHECK_ST(npt_vm_get_nfit(vm, NULL, 0, &needed), NPT_ERR_BUFFER_TOO_SMALL);
    CHECK(needed > 36);

    /* a guest flush: a write violation at the vFHA, then HLT */
    npt_vcpu *cpu = NULL;
    CHECK_OK(npt_vcpu_create(vm, 0, &cpu));
    if (cpu) {
        npt_exit s1[2] = {scripted(NPT_EXIT_EPT_VIOLATION, fh.vfha + 8, FLUSH_WRITE), scripted(NPT_EXIT_HALT, 0, 0)};
        set_script(s1, 2);
        npt_flush_stats f0 = flush_stats(vm);
        counters(&c0);
        npt_exit e = exit_init();
        CHECK_OK(npt_vcpu_run(cpu, &e));
        CHECK_EQ(e.reason, NPT_EXIT_HALT);
        counters(&c1);
        CHECK_EQ(c1.runs, c0.runs + 2);
        CHECK_EQ(c1.fences, c0.fences + 1);
        CHECK_EQ(c1.physical_flushes, c0.physical_flushes + 2);
        CHECK_EQ(c1.controller_flushes[0], c0.controller_flushes[0] + 1);
        CHECK_EQ(c1.controller_flushes[1], c0.controller_flushes[1] + 1);
        CHECK_EQ(c1.controller_flush_address[0], SAMPLE_PMEM_HINT0);
        CHECK_EQ(c1.controller_flush_address[1], SAMPLE_PMEM_HINT1);
        CHECK_EQ(c1.completed_trapped_writes, c0.completed_trapped_writes + 1);
        npt_flush_stats f1 = flush_stats(vm);
        CHECK_EQ(f1.guest_flushes, f0.guest_flushes + 1);
        CHECK_EQ(f1.exits, f0.exits + 1);
        CHECK_EQ(f1.physical_flushes, f0.physical_flushes + 2);
        CHECK_EQ(f1.coalesced, f0.coalesced);
        CHECK_EQ(f1.untrapped_writes, 0); /* the sample cannot count them (NULL) */

        /* the QEMU-style loop: the raw exit, then npt_handle_exit does the flush and says resume */
        npt_exit s2[1] = {scripted(NPT_EXIT_EPT_VIOLATION, fh.vfha, FLUSH_WRITE)};
        set_script(s2, 1);
        e = exit_init();
        CHECK_OK(npt_vcpu_run_raw(cpu, &e));
        CHECK_EQ(e.reason, NPT_EXIT_EPT_VIOLATION);
        uint32_t action = 99;
        CHECK_OK(npt_handle_exit(cpu, &e, &action));
        CHECK_EQ(action, NPT_ACTION_RESUME);
        counters(&c0);
        CHECK_EQ(c0.fences, c1.fences + 1);
        CHECK_EQ(c0.physical_flushes, c1.physical_flushes + 2);
        CHECK_EQ(c0.completed_trapped_writes, c1.completed_trapped_writes + 1);
        CHECK_EQ(flush_stats(vm).guest_flushes, f1.guest_flushes + 1);

        /* a failing physical flush fails the run; the guest's write is not completed */
        f1 = flush_stats(vm);
        fail_pmem(SAMPLE_FAIL_PHYSICAL_FLUSH);
        set_script(s1, 2);
        e = exit_init();
        CHECK_ST(npt_vcpu_run(cpu, &e), NPT_ERR_BACKEND);
        CHECK_ERR_MENTIONS("physical_flush");
        counters(&c1);
        CHECK_EQ(c1.completed_trapped_writes, c0.completed_trapped_writes);
        npt_flush_stats f2 = flush_stats(vm);
        CHECK_EQ(f2.exits, f1.exits + 1);
        CHECK_EQ(f2.guest_flushes, f1.guest_flushes);
        /* and a failing fence: no physical flush at all */
        fail_pmem(SAMPLE_FAIL_FENCE);
        set_script(s1, 2);
        e = exit_init();
        CHECK_ST(npt_vcpu_run(cpu, &e), NPT_ERR_BACKEND);
        counters(&c0);
        CHECK_EQ(c0.physical_flushes, c1.physical_flushes);
        CHECK_EQ(c0.fences, c1.fences);
        CHECK_EQ(flush_stats(vm).guest_flushes, f1.guest_flushes);
    }

    /* the trap decision follows the options: NEVER maps the page writable, AUTO traps again */
    counters(&c0);
    CHECK_OK(npt_vm_set_flush_options(vm, NPT_FLUSH_TRAP_NEVER, 1));
    counters(&c1);
    CHECK_EQ(c1.flush_hint_defines, c0.flush_hint_defines + 1);
    CHECK_EQ(c1.flush_hint_trapped, 0);
    fh = flush_hint_info();
    CHECK_OK(npt_vm_get_flush_hint(vm, &fh));
    CHECK_EQ(fh.trapped, 0);
    CHECK((translate(vm, NPT_HIERARCHY_SUPERVISOR, fh.vfha).perms & NPT_PERM_WRITE) != 0);
    /* a failing flush hint page leaves the options as they were */
    fail_pmem(SAMPLE_FAIL_DEFINE_FLUSH_HINT);
    CHECK_ST(npt_vm_set_flush_options(vm, NPT_FLUSH_TRAP_AUTO, 1), NPT_ERR_BACKEND);
    fh = flush_hint_info();
    CHECK_OK(npt_vm_get_flush_hint(vm, &fh));
    CHECK_EQ(fh.trapped, 0);
    CHECK_OK(npt_vm_set_flush_options(vm, NPT_FLUSH_TRAP_AUTO, 1));
    counters(&c0);
    CHECK_EQ(c0.flush_hint_trapped, 1);
    fh = flush_hint_info();
    CHECK_OK(npt_vm_get_flush_hint(vm, &fh));
    CHECK_EQ(fh.trapped, 1);

    /* a second range of the same region: same vFHA, same 2 targets */
    npt_nvdimm n2 = nvdimm(SAMPLE_PMEM_REGION, NV_GPA + 2 * M2, M2, M2);
    CHECK_OK(npt_vm_add_nvdimm(vm, &n2));
    npt_flush_hint_info fh2 = flush_hint_info();
    CHECK_OK(npt_vm_get_flush_hint(vm, &fh2));
    CHECK_EQ(fh2.vfha, fh.vfha);
    CHECK_EQ(fh2.target_count, 2);
    CHECK_EQ(fh2.nvdimm_count, 2);
    npt_nvdimm again = nvdimm(SAMPLE_PMEM_REGION, NV_GPA + 8 * M2, M2, 0); /* host part already backing */
    CHECK_ST(npt_vm_add_nvdimm(vm, &again), NPT_ERR_OVERLAP);

    /* the sample does not model a power failure (power_failure is NULL) */
    CHECK_ST(npt_vm_power_failure(vm), NPT_ERR_UNSUPPORTED);

    set_script(NULL, 0);
    fail_pmem(0);
    CHECK_OK(npt_vm_destroy(vm));
    dlclose(lib);
    CHECK_OK(npt_context_destroy(ctx));
}

/* ------------------------------------------------------------------------ */
/* Ops tables registered from C                                               */
/* ------------------------------------------------------------------------ */
static struct {
    uint8_t ram[64 * 1024];
    int vcpu;
    int pmem_calls;      /* any persistent-memory operation */
    int attaches, defines, power_failures;
    uint64_t untrapped;
} cb;

static npt_status cb_vm_create(void *backend_data, npt_vm *vm, const npt_vm_config *config, void **vm_data) {
    (void)backend_data;
    (void)vm;
    if (config->ram_size > sizeof cb.ram) return NPT_ERR_OUT_OF_RANGE;
    *vm_data = &cb;
    return NPT_OK;
}
static void cb_vm_destroy(void *vm_data) { (void)vm_data; }
static npt_status cb_write(void *vm_data, uint64_t gpa, const void *data, size_t len) {
    (void)vm_data;
    if (gpa > sizeof cb.ram || len > sizeof cb.ram - gpa) return NPT_ERR_OUT_OF_RANGE;
    memcpy(cb.ram + gpa, data, len);
    return NPT_OK;
}
static npt_status cb_read(void *vm_data, uint64_t gpa, void *data, size_t len) {
    (void)vm_data;
    if (gpa > sizeof cb.ram || len > sizeof cb.ram - gpa) return NPT_ERR_OUT_OF_RANGE;
    memcpy(data, cb.ram + gpa, len);
    return NPT_OK;
}
static npt_status cb_invalidate(void *vm_data, uint32_t h, uint64_t gpa, uint64_t size) {
    (void)vm_data;
    (void)h;
    (void)gpa;
    (void)size;
    return NPT_OK;
}
static npt_status cb_pmem_count(void *backend_data, size_t *count) {
    (void)backend_data;
    cb.pmem_calls++;
    *count = 1;
    return NPT_OK;
}
/* Region 2: 256 MiB, three controllers of which two have flush hints, WPQs in the persistence
 * domain (no flushing needed). The targets come in descending controller order: the core sorts. */
static npt_status cb_pmem_get(void *backend_data, size_t index, npt_host_pmem_region *region,
                              npt_flush_target *targets, size_t targets_cap) {
    (void)backend_data;
    cb.pmem_calls++;
    if (index != 0) return NPT_ERR_NOT_FOUND;
    region->id = 2;
    region->base = UINT64_C(0x100000000);
    region->length = UINT64_C(256) << 20;
    region->controller_count = 3;
    region->flush_target_count = 2;
    region->needs_wpq_flush = 0;
    const npt_flush_target t[2] = {{9, 0, UINT64_C(0xFEE09000)}, {4, 0, UINT64_C(0xFEE04000)}};
    for (size_t i = 0; i < 2 && i < targets_cap; i++) targets[i] = t[i];
    return NPT_OK;
}
static npt_status cb_attach(void *vm_data, uint64_t gpa, uint64_t size, uint32_t region, uint64_t region_offset,
                            uint64_t host_offset) {
    (void)vm_data;
    (void)gpa;
    (void)size;
    (void)region;
    (void)region_offset;
    (void)host_offset;
    cb.pmem_calls++;
    cb.attaches++;
    return NPT_OK;
}
static npt_status cb_define(void *vm_data, uint64_t gpa, uint64_t host_offset, int trapped) {
    (void)vm_data;
    (void)gpa;
    (void)host_offset;
    (void)trapped;
    cb.pmem_calls++;
    cb.defines++;
    return NPT_OK;
}
static npt_status cb_flush(void *vm_data, uint32_t region, uint32_t controller, uint64_t address) {
    (void)vm_data;
    (void)region;
    (void)controller;
    (void)address;
    cb.pmem_calls++;
    return NPT_OK;
}
static npt_status cb_fence(void *vcpu_data) {
    (void)vcpu_data;
    cb.pmem_calls++;
    return NPT_OK;
}
static npt_status cb_complete(void *vcpu_data) {
    (void)vcpu_data;
    cb.pmem_calls++;
    return NPT_OK;
}
static uint64_t cb_untrapped(void *vm_data) {
    (void)vm_data;
    cb.pmem_calls++;
    return cb.untrapped;
}
static npt_status cb_power_failure(void *vm_data) {
    (void)vm_data;
    cb.pmem_calls++;
    cb.power_failures++;
    return NPT_OK;
}

#define CB_CAPS (NPT_CAP_MBEC_EMULATION | NPT_CAP_EXIT_ON_ESCALATE | NPT_CAP_EXIT_ON_RETURN | NPT_CAP_LINEAR_MODE_INFO | \
                 NPT_CAP_PERSISTENT_MEMORY)

static const npt_backend_ops full_ops = {
    .abi_version = NPT_ABI_VERSION,
    .size = sizeof(npt_backend_ops),
    .name = "c-pmem",
    .description = "every persistent-memory operation",
    .capabilities = CB_CAPS,
    .backend_data = &cb,
    .vm_create = cb_vm_create,
    .vm_destroy = cb_vm_destroy,
    .memory_write = cb_write,
    .memory_read = cb_read,
    .invalidate = cb_invalidate,
    .host_pmem_count = cb_pmem_count,
    .host_pmem_get = cb_pmem_get,
    .attach_pmem = cb_attach,
    .define_flush_hint_page = cb_define,
    .physical_flush = cb_flush,
    .vcpu_fence = cb_fence,
    .vcpu_complete_trapped_write = cb_complete,
    .untrapped_flush_hint_writes = cb_untrapped,
    .power_failure = cb_power_failure,
};

/* Registers a copy of full_ops named `name` with `size` (and physical_flush dropped when
 * `no_flush`); returns its capabilities as npt_backend_get reports them. */
static uint64_t register_variant(npt_context *ctx, npt_backend_ops *slot, const char *name, uint32_t size,
                                 int no_flush) {
    *slot = full_ops;
    slot->name = name;
    slot->size = size;
    if (no_flush) slot->physical_flush = NULL;
    check_status(npt_backend_register(ctx, slot), NPT_OK, name, __LINE__);
    uint64_t caps = 0;
    check(backend_caps(ctx, name, &caps), "the variant is registered", __LINE__);
    return caps;
}

/* A VM of a backend without persistent memory: it works, and the NVDIMM calls are refused before
 * the backend is asked anything. */
static void check_without_pmem(npt_context *ctx, const char *name) {
    npt_vm *vm = make_vm(ctx, name, 16 * K4);
    if (!vm) return;
    int calls = cb.pmem_calls;
    uint8_t b = 0x5A, back = 0;
    CHECK_OK(npt_vm_write_memory(vm, 0x200, &b, 1));
    CHECK_OK(npt_vm_read_memory(vm, 0x200, &back, 1));
    CHECK_EQ(back, 0x5A);
    CHECK_OK(npt_policy_set(vm, 0x1000, K4, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_SX));
    npt_nvdimm n = nvdimm(2, NV_GPA, M2, 0);
    CHECK_ST(npt_vm_add_nvdimm(vm, &n), NPT_ERR_UNSUPPORTED);
    check(strstr(npt_last_error(), name) != NULL, "npt_last_error() names the backend", __LINE__);
    size_t count = 99;
    CHECK_ST(npt_vm_host_pmem_count(vm, &count), NPT_ERR_UNSUPPORTED);
    CHECK_EQ(count, 99);
    npt_flush_hint_info fh = flush_hint_info();
    CHECK_ST(npt_vm_get_flush_hint(vm, &fh), NPT_ERR_STATE);
    CHECK_EQ(cb.pmem_calls, calls);
    CHECK_OK(npt_vm_destroy(vm));
}

static void test_registered(void) {
    npt_context *ctx = NULL;
    CHECK_OK(npt_context_create(&ctx));
    if (!ctx) return;

    /* every operation: the capability stays, and the optional ones are used */
    CHECK_OK(npt_backend_register(ctx, &full_ops));
    uint64_t caps = 0;
    CHECK(backend_caps(ctx, "c-pmem", &caps));
    CHECK_EQ(caps, CB_CAPS);
    npt_vm *vm = make_vm(ctx, "c-pmem", 16 * K4);
    if (vm) {
        npt_host_pmem_region r;
        memset(&r, 0, sizeof r);
        r.size = sizeof r;
        CHECK_OK(npt_vm_host_pmem_get(vm, 0, &r));
        CHECK_EQ(r.id, 2);
        CHECK_EQ(r.flush_target_count, 2);
        CHECK_EQ(r.controller_count, 2); /* the core knows only the controllers with a flush hint */
        CHECK_EQ(r.needs_wpq_flush, 0);
        npt_nvdimm n = nvdimm(2, NV_GPA, M2, 0);
        CHECK_OK(npt_vm_add_nvdimm(vm, &n));
        CHECK_EQ(cb.attaches, 1);
        CHECK_EQ(cb.defines, 1);
        npt_flush_hint_info fh = flush_hint_info();
        CHECK_OK(npt_vm_get_flush_hint(vm, &fh));
        CHECK_EQ(fh.trapped, 0); /* no WPQ flushing needed: guest writes cost no exit */
        CHECK_EQ(fh.target_count, 2);
        uint32_t region = 0, controller = 0;
        uint64_t address = 0;
        CHECK_OK(npt_vm_get_flush_target(vm, 0, &region, &controller, &address));
        CHECK_EQ(controller, 4); /* sorted by controller */
        CHECK_EQ(address, UINT64_C(0xFEE04000));
        cb.untrapped = 5;
        CHECK_EQ(flush_stats(vm).untrapped_writes, 5);
        CHECK_OK(npt_vm_power_failure(vm));
        CHECK_EQ(cb.power_failures, 1);
        CHECK_OK(npt_vm_destroy(vm));
    }

    /* required operations there, optional ones past `size`: the capability stays; a power
     * failure is unsupported and untrapped writes read 0 */
    static npt_backend_ops no_optional;
    caps = register_variant(ctx, &no_optional, "c-pmem-required",
                            (uint32_t)offsetof(npt_backend_ops, untrapped_flush_hint_writes), 0);
    CHECK_EQ(caps, CB_CAPS);
    vm = make_vm(ctx, "c-pmem-required", 16 * K4);
    if (vm) {
        npt_nvdimm n = nvdimm(2, NV_GPA, M2, 0);
        CHECK_OK(npt_vm_add_nvdimm(vm, &n));
        cb.untrapped = 7;
        CHECK_EQ(flush_stats(vm).untrapped_writes, 0);
        int pf = cb.power_failures;
        CHECK_ST(npt_vm_power_failure(vm), NPT_ERR_UNSUPPORTED);
        CHECK_EQ(cb.power_failures, pf);
        CHECK_OK(npt_vm_destroy(vm));
    }

    /* a table of the older header: it stops before the persistent-memory members (whose pointers
     * this copy still holds): it registers and works, without the capability */
    static npt_backend_ops older;
    caps = register_variant(ctx, &older, "c-pmem-older", (uint32_t)offsetof(npt_backend_ops, host_pmem_count), 0);
    CHECK_EQ(caps, CB_CAPS & ~NPT_CAP_PERSISTENT_MEMORY);
    check_without_pmem(ctx, "c-pmem-older");

    /* attach_pmem but no physical_flush: the capability goes */
    static npt_backend_ops no_flush;
    caps = register_variant(ctx, &no_flush, "c-pmem-noflush", sizeof(npt_backend_ops), 1);
    CHECK_EQ(caps, CB_CAPS & ~NPT_CAP_PERSISTENT_MEMORY);
    check_without_pmem(ctx, "c-pmem-noflush");

    /* a size that ends inside physical_flush covers only half of it: not there either */
    static npt_backend_ops half;
    caps = register_variant(ctx, &half, "c-pmem-half", (uint32_t)(offsetof(npt_backend_ops, physical_flush) + 4), 0);
    CHECK_EQ(caps, CB_CAPS & ~NPT_CAP_PERSISTENT_MEMORY);
    check_without_pmem(ctx, "c-pmem-half");

    CHECK_OK(npt_context_destroy(ctx));
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s SAMPLE_SO\n", argv[0]);
        return 2;
    }
    CHECK(sizeof(npt_flush_target) == 16);
    CHECK(offsetof(npt_backend_ops, host_pmem_count) > offsetof(npt_backend_ops, define_region));
    test_sample(argv[1]);
    test_registered();
    printf("c-test test_plugin_pmem: %d passed, %d failed\n", passed, failed);
    return failed > 0 ? 1 : 0;
}
