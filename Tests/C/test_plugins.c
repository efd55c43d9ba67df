/*
 * test_plugins.c - backends given to libnptkit.so from C: plugins loaded with npt_plugin_load and
 * ops tables registered with npt_backend_register.
 *
 * Usage: test_plugins SAMPLE_SO BAD_ABI_SO NO_ENTRY_SO SAMPLE_INTERFACE_1_SO
 *   SAMPLE_SO    examples/plugin/sample_backend.c built as libnptkit-sample.so
 *   BAD_ABI_SO   Tests/C/plugin_bad_abi.c  (ops for ABI major + 1)
 *   NO_ENTRY_SO  Tests/C/plugin_no_entry.c (a shared library without npt_plugin_entry)
 * Prints one line "c-test test_plugins: N passed, M failed" at the end; exits 1 if M > 0.
 */
#define _GNU_SOURCE /* RTLD_NOLOAD, mkstemp */
#include <nptkit.h>

#include <dlfcn.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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
        fprintf(stderr, "FAIL test_plugins.c:%d: %s\n", line, what);
    }
}

static void check_status(npt_status got, npt_status want, const char *call, int line) {
    if (got == want) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL test_plugins.c:%d: %s\n    expected %s\n    got      %s\n    last error: %s\n", line,
                call, npt_status_string(want), npt_status_string(got), npt_last_error());
    }
}

static void check_status2(npt_status got, npt_status a, npt_status b, const char *call, int line) {
    if (got == a || got == b) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL test_plugins.c:%d: %s\n    expected %s or %s\n    got      %s\n", line, call,
                npt_status_string(a), npt_status_string(b), npt_status_string(got));
    }
}

static void check_u64(uint64_t got, uint64_t want, const char *what, int line) {
    if (got == want) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL test_plugins.c:%d: %s == %#" PRIx64 ", expected %#" PRIx64 "\n", line, what, got, want);
    }
}

#define CHECK(cond) check(!!(cond), #cond, __LINE__)
#define CHECK_ST(call, want) check_status((call), (want), #call, __LINE__)
#define CHECK_ST2(call, a, b) check_status2((call), (a), (b), #call, __LINE__)
#define CHECK_OK(call) check_status((call), NPT_OK, #call, __LINE__)
#define CHECK_EQ(got, want) check_u64((uint64_t)(got), (uint64_t)(want), #got, __LINE__)

#define R NPT_PERM_READ
#define W NPT_PERM_WRITE
#define SX NPT_PERM_SX
#define UX NPT_PERM_UX
#define K4 UINT64_C(0x1000)
#define M1 (UINT64_C(1) << 20)

/* ------------------------------------------------------------------------ */
/* Helpers                                                                    */
/* ------------------------------------------------------------------------ */
static size_t backend_count(npt_context *ctx) {
    size_t n = 0;
    check_status(npt_backend_count(ctx, &n), NPT_OK, "npt_backend_count", __LINE__);
    return n;
}

/* Finds backend `name`; returns 1 and fills *out if it is registered. */
static int find_backend(npt_context *ctx, const char *name, npt_backend_info *out) {
    size_t n = backend_count(ctx);
    for (size_t i = 0; i < n; i++) {
        npt_backend_info info;
        memset(&info, 0, sizeof info);
        info.size = sizeof info;
        if (npt_backend_get(ctx, i, &info) != NPT_OK) continue;
        if (info.name && strcmp(info.name, name) == 0) {
            if (out) *out = info;
            return 1;
        }
    }
    return 0;
}

static npt_vm *make_vm(npt_context *ctx, const char *backend, uint64_t ram, uint32_t mode) {
    npt_vm_config c;
    memset(&c, 0, sizeof c);
    c.size = sizeof c;
    c.mbec_mode = mode;
    c.backend = backend;
    c.ram_size = ram;
    c.default_perms = R | W;
    npt_vm *vm = NULL;
    npt_status s = npt_vm_create(ctx, &c, &vm);
    check_status(s, NPT_OK, "make_vm: npt_vm_create", __LINE__);
    return s == NPT_OK ? vm : NULL;
}

static npt_exit exit_init(void) {
    npt_exit e;
    memset(&e, 0, sizeof e);
    e.size = sizeof e;
    return e;
}

static npt_exit scripted(uint32_t reason, uint32_t cpl, uint64_t gpa, uint64_t qualification) {
    npt_exit e = exit_init();
    e.reason = reason;
    e.cpl = cpl;
    e.gpa = gpa;
    e.gva = gpa + UINT64_C(0x7f0000000000);
    e.qualification = qualification;
    return e;
}

static npt_stats stats_of(npt_vm *vm) {
    npt_stats st;
    memset(&st, 0, sizeof st);
    st.size = sizeof st;
    check_status(npt_vm_get_stats(vm, &st), NPT_OK, "npt_vm_get_stats", __LINE__);
    return st;
}

/* dlsym returns an object pointer; copying its bytes is the ISO C way to get a function pointer. */
static void *plugin_symbol(void *lib, const char *name, void *fn_out, size_t fn_size) {
    void *sym = lib ? dlsym(lib, name) : NULL;
    if (sym) memcpy(fn_out, &sym, fn_size);
    return sym;
}

/* ------------------------------------------------------------------------ */
/* (a) the sample plugin                                                     */
/* ------------------------------------------------------------------------ */
static void test_sample_plugin(npt_context *ctx, const char *path) {
    size_t before = backend_count(ctx);
    const char *name = NULL;
    CHECK_OK(npt_plugin_load(ctx, path, &name));
    CHECK(name != NULL && strcmp(name, SAMPLE_BACKEND_NAME) == 0);
    CHECK_EQ(backend_count(ctx), before + 1);

    npt_backend_info info;
    memset(&info, 0, sizeof info);
    CHECK(find_backend(ctx, SAMPLE_BACKEND_NAME, &info));
    CHECK_EQ(info.is_plugin, 1);
    CHECK_EQ(info.is_default, 0);
    CHECK_EQ(info.abi_version, NPT_ABI_VERSION);
    CHECK((info.capabilities & (NPT_CAP_MBEC_EMULATION | NPT_CAP_RUN | NPT_CAP_LINEAR_MODE_INFO)) ==
          (NPT_CAP_MBEC_EMULATION | NPT_CAP_RUN | NPT_CAP_LINEAR_MODE_INFO));
    CHECK((info.capabilities & NPT_CAP_PRIVILEGED_MODE) == 0);
    CHECK(info.description != NULL && strstr(info.description, "sample") != NULL);
    {
        npt_vm *svm = make_vm(ctx, SAMPLE_BACKEND_NAME, 16 * K4, NPT_MBEC_LAZY);
        uint32_t isa = 99;
        if (svm) {
            CHECK_OK(npt_vm_guest_isa(svm, &isa));
            CHECK_EQ(isa, NPT_GUEST_ISA_NONE); /* it plays scripted exits */
            CHECK_OK(npt_vm_destroy(svm));
        }
    }

    /* loading it again: the name is taken; nothing changes */
    const char *again = "unchanged";
    CHECK_ST(npt_plugin_load(ctx, path, &again), NPT_ERR_EXISTS);
    CHECK(strcmp(again, "unchanged") == 0);
    CHECK_EQ(backend_count(ctx), before + 1);
    CHECK_ST(npt_plugin_load(ctx, path, NULL), NPT_ERR_EXISTS); /* name may be NULL */

    /* the core dlopen()ed it: RTLD_NOLOAD finds it, and gives the core's copy */
    void *lib = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    CHECK(lib != NULL);
    sample_backend_counters_fn counters = NULL;
    sample_backend_set_script_fn set_script = NULL;
    CHECK(plugin_symbol(lib, "sample_backend_counters", &counters, sizeof counters) != NULL);
    CHECK(plugin_symbol(lib, "sample_backend_set_script", &set_script, sizeof set_script) != NULL);
    if (!counters || !set_script) {
        if (lib) dlclose(lib);
        return;
    }
    /* the plugin's entry itself refuses a host of another ABI major version */
    npt_plugin_entry_fn entry = NULL;
    CHECK(plugin_symbol(lib, NPT_PLUGIN_ENTRY_SYMBOL, &entry, sizeof entry) != NULL);
    if (entry) {
        npt_host_api future_host;
        memset(&future_host, 0, sizeof future_host);
        future_host.abi_version = (NPT_ABI_VERSION_MAJOR + 1u) << 16;
        future_host.size = sizeof future_host;
        const npt_backend_ops *ops = NULL;
        CHECK_ST(entry(&future_host, &ops), NPT_ERR_ABI_MISMATCH);
        CHECK(ops == NULL);
        CHECK_ST(entry(NULL, &ops), NPT_ERR_INVALID_ARGUMENT);
    }

    struct sample_counters c0, c1;
    counters(&c0);

    npt_vm *vm = make_vm(ctx, SAMPLE_BACKEND_NAME, M1, NPT_MBEC_EXACT);
    if (!vm) {
        dlclose(lib);
        return;
    }
    counters(&c1);
    CHECK_EQ(c1.vm_creates, c0.vm_creates + 1);

    /* guest memory lives in the plugin */
    uint8_t out[32], in[32];
    for (int i = 0; i < 32; i++) out[i] = (uint8_t)(0xA0 + i);
    CHECK_OK(npt_vm_write_memory(vm, 0x3000, out, sizeof out));
    memset(in, 0, sizeof in);
    CHECK_OK(npt_vm_read_memory(vm, 0x3000, in, sizeof in));
    CHECK(memcmp(in, out, sizeof in) == 0);
    CHECK_OK(npt_vm_read_memory(vm, M1 - 4, in, 4));
    CHECK_ST(npt_vm_read_memory(vm, M1 - 4, in, 8), NPT_ERR_OUT_OF_RANGE);
    counters(&c0);
    CHECK_EQ(c0.memory_writes, c1.memory_writes + 1);
    CHECK_EQ(c0.memory_reads, c1.memory_reads + 2);

    /* a policy change reaches the plugin as an invalidation of the changed range */
    CHECK_OK(npt_policy_set(vm, 0x5000, K4, NPT_PAGE_4K, R | UX));
    counters(&c1);
    CHECK(c1.invalidations > c0.invalidations);
    CHECK(c1.last_invalidate_gpa <= 0x5000 && c1.last_invalidate_gpa + c1.last_invalidate_size >= 0x6000);
    CHECK_OK(npt_policy_set(vm, 0x6000, K4, NPT_PAGE_4K, R));
    npt_translation t;
    memset(&t, 0, sizeof t);
    t.size = sizeof t;
    CHECK_OK(npt_hierarchy_translate(vm, NPT_HIERARCHY_USER, 0x5000, &t));
    CHECK((t.perms & (UINT64_C(1) << 2)) != 0);

    /* vCPUs: the core arms only the exits the policy needs for the exposed hierarchy: none at
     * creation (supervisor hierarchy, and the policy has no supervisor-execute-only page, so no
     * return exit), the escalation exit once the user hierarchy is exposed (the policy has a
     * user-execute-only page, 0x5000) */
    npt_vcpu *cpu = NULL;
    CHECK_OK(npt_vcpu_create(vm, 0, &cpu));
    if (!cpu) {
        dlclose(lib);
        return;
    }
    counters(&c0);
    CHECK_EQ(c0.vcpu_creates, c1.vcpu_creates + 1);
    CHECK_EQ(c0.last_exit_controls, 0);

    npt_regs r;
    memset(&r, 0, sizeof r);
    r.size = sizeof r;
    r.cr0 = UINT64_C(1) << 31; /* paging on (with paging off no exit is ever needed) */
    r.cpl = 3;
    r.rip = UINT64_C(0x7f0000005000);
    r.gpr[7] = 77;
    CHECK_OK(npt_vcpu_set_regs(cpu, &r));
    npt_regs g;
    memset(&g, 0, sizeof g);
    g.size = sizeof g;
    CHECK_OK(npt_vcpu_get_regs(cpu, &g));
    CHECK_EQ(g.rip, r.rip);
    CHECK_EQ(g.gpr[7], 77);
    CHECK_EQ(g.cpl, 3);
    counters(&c1);
    CHECK(c1.set_regs > c0.set_regs);
    CHECK(c1.get_regs > c0.get_regs);
    CHECK_EQ(c1.last_exit_controls, NPT_EXITCTL_ESCALATION);

    /* scripted run 1: escalation, a user fetch the user hierarchy permits, halt */
    const uint64_t fetch_user = NPT_EPTQ_FETCH | NPT_EPTQ_GLA_VALID | NPT_EPTQ_GLA_TRANSL | NPT_EPTQ_USER_LINEAR;
    npt_exit s1[3] = {
        scripted(NPT_EXIT_ESCALATION, 0, 0, 0),
        scripted(NPT_EXIT_EPT_VIOLATION, 3, 0x5010, fetch_user),
        scripted(NPT_EXIT_HALT, 0, 0, 0),
    };
    set_script(s1, 3);
    npt_stats st0 = stats_of(vm);
    counters(&c0);
    npt_exit e = exit_init();
    CHECK_OK(npt_vcpu_run(cpu, &e));
    CHECK_EQ(e.reason, NPT_EXIT_HALT);
    counters(&c1);
    CHECK_EQ(c1.runs, c0.runs + 3);
    CHECK_EQ(c1.set_hierarchy, c0.set_hierarchy + 2);
    if (c1.set_hierarchy == c0.set_hierarchy + 2) {
        CHECK_EQ(c1.hierarchy_log[c0.set_hierarchy % SAMPLE_HIERARCHY_LOG], NPT_HIERARCHY_SUPERVISOR);
        CHECK_EQ(c1.hierarchy_log[(c0.set_hierarchy + 1) % SAMPLE_HIERARCHY_LOG], NPT_HIERARCHY_USER);
    }
    CHECK_EQ(e.hierarchy, NPT_HIERARCHY_USER); /* what the plugin exposed at the exit */
    npt_stats st1 = stats_of(vm);
    CHECK_EQ(st1.exits_escalation, st0.exits_escalation + 1);
    CHECK_EQ(st1.exits_ept_violation, st0.exits_ept_violation + 1);
    CHECK_EQ(st1.hierarchy_switches, st0.hierarchy_switches + 2);
    CHECK_EQ(st1.violations_reported, st0.violations_reported);
    CHECK_EQ(st1.exits_total, st0.exits_total + 3);

    /* scripted run 2: a user fetch of a page that is R only: reported, as hardware MBEC would */
    npt_exit s2[1] = {scripted(NPT_EXIT_EPT_VIOLATION, 3, 0x6008, fetch_user)};
    set_script(s2, 1);
    e = exit_init();
    CHECK_OK(npt_vcpu_run(cpu, &e));
    CHECK_EQ(e.reason, NPT_EXIT_MBEC_VIOLATION);
    CHECK_EQ(e.gpa, 0x6008);
    CHECK((e.qualification & NPT_EPTQ_FETCH) != 0);
    CHECK((e.qualification & NPT_EPTQ_USER_LINEAR) != 0);
    CHECK((e.qualification & NPT_EPTQ_READABLE) != 0);
    CHECK((e.qualification & (NPT_EPTQ_EXECUTABLE | NPT_EPTQ_UEXECUTABLE | NPT_EPTQ_WRITABLE)) == 0);
    CHECK_EQ(stats_of(vm).violations_reported, st1.violations_reported + 1);

    /* scripted run 3: a supervisor-mode fetch of the R|UX page (U/S = 0): not permitted either */
    npt_exit s3[1] = {scripted(NPT_EXIT_EPT_VIOLATION, 0, 0x5000, NPT_EPTQ_FETCH | NPT_EPTQ_GLA_VALID | NPT_EPTQ_GLA_TRANSL)};
    set_script(s3, 1);
    e = exit_init();
    CHECK_OK(npt_vcpu_run(cpu, &e));
    CHECK_EQ(e.reason, NPT_EXIT_MBEC_VIOLATION);
    CHECK((e.qualification & NPT_EPTQ_UEXECUTABLE) != 0);
    CHECK((e.qualification & (NPT_EPTQ_EXECUTABLE | NPT_EPTQ_USER_LINEAR)) == 0);

    /* an exit that is not MBEC business comes back as is */
    npt_exit io = scripted(NPT_EXIT_IO, 3, 0, 0);
    io.io_port = 7;
    io.io_value = 99;
    set_script(&io, 1);
    e = exit_init();
    CHECK_OK(npt_vcpu_run(cpu, &e));
    CHECK_EQ(e.reason, NPT_EXIT_IO);
    CHECK_EQ(e.io_port, 7);
    CHECK_EQ(e.io_value, 99);

    /* the QEMU-style loop on a plugin: the raw escalation, then the core's decision */
    npt_exit esc = scripted(NPT_EXIT_ESCALATION, 0, 0, 0);
    set_script(&esc, 1);
    counters(&c0);
    e = exit_init();
    CHECK_OK(npt_vcpu_run_raw(cpu, &e));
    CHECK_EQ(e.reason, NPT_EXIT_ESCALATION);
    uint32_t action = 99;
    CHECK_OK(npt_handle_exit(cpu, &e, &action));
    CHECK_EQ(action, NPT_ACTION_RESUME);
    counters(&c1);
    CHECK_EQ(c1.set_hierarchy, c0.set_hierarchy + 1);
    CHECK_EQ(c1.hierarchy_log[c0.set_hierarchy % SAMPLE_HIERARCHY_LOG], NPT_HIERARCHY_SUPERVISOR);

    /* the script is used up: the plugin's failure comes back as an error, not an exit */
    e = exit_init();
    CHECK_ST2(npt_vcpu_run(cpu, &e), NPT_ERR_STATE, NPT_ERR_BACKEND);
    CHECK(npt_last_error()[0] != '\0');

    /* what the plugin cannot do */
    CHECK_ST(npt_vcpu_inject_fault(cpu, 14, 0, 0), NPT_ERR_UNSUPPORTED);
    static const uint8_t code[8];
    npt_region region;
    memset(&region, 0, sizeof region);
    region.size = sizeof region;
    region.gpa = UINT64_C(1) << 32;
    region.length = K4;
    region.contents = code;
    region.contents_len = sizeof code;
    CHECK_ST(npt_region_set(vm, &region), NPT_ERR_UNSUPPORTED);

    counters(&c0);
    CHECK_OK(npt_vm_destroy(vm));
    counters(&c1);
    CHECK_EQ(c1.vm_destroys, c0.vm_destroys + 1);
    CHECK_EQ(c1.vcpu_destroys, c0.vcpu_destroys + 1);
    set_script(NULL, 0);
    dlclose(lib); /* drops our reference only: the core keeps its own */
}

/* ------------------------------------------------------------------------ */
/* (b)-(e) plugins that must be refused                                      */
/* ------------------------------------------------------------------------ */
static void test_refused_plugins(npt_context *ctx, const char *bad_abi, const char *no_entry) {
    size_t before = backend_count(ctx);
    const char *name = "unchanged";

    CHECK_ST(npt_plugin_load(ctx, bad_abi, &name), NPT_ERR_ABI_MISMATCH);
    CHECK(strcmp(name, "unchanged") == 0);
    CHECK(npt_last_error()[0] != '\0');
    CHECK(!find_backend(ctx, "badabi", NULL));
    CHECK_EQ(backend_count(ctx), before);

    CHECK_ST(npt_plugin_load(ctx, no_entry, &name), NPT_ERR_PLUGIN);
    CHECK(strstr(npt_last_error(), NPT_PLUGIN_ENTRY_SYMBOL) != NULL);
    CHECK(strcmp(name, "unchanged") == 0);

    char text[] = "/tmp/nptkit-not-a-plugin-XXXXXX";
    int fd = mkstemp(text);
    CHECK(fd >= 0);
    if (fd >= 0) {
        static const char body[] = "this is a text file, not an ELF shared object\n";
        CHECK(write(fd, body, sizeof body - 1) == (ssize_t)(sizeof body - 1));
        close(fd);
        CHECK_ST(npt_plugin_load(ctx, text, &name), NPT_ERR_PLUGIN);
        CHECK(npt_last_error()[0] != '\0');
        unlink(text);
    }

    CHECK_ST2(npt_plugin_load(ctx, "/nonexistent/nptkit/libnptkit-nothing.so", &name), NPT_ERR_PLUGIN,
              NPT_ERR_NOT_FOUND);
    CHECK_ST(npt_plugin_load(ctx, "/tmp", &name), NPT_ERR_PLUGIN); /* a directory */
    CHECK_ST(npt_plugin_load(ctx, NULL, &name), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_plugin_load(NULL, no_entry, &name), NPT_ERR_INVALID_ARGUMENT);
    CHECK(strcmp(name, "unchanged") == 0);
    CHECK_EQ(backend_count(ctx), before);
}

/* ------------------------------------------------------------------------ */
/* npt_backend_register: a tiny backend written right here                   */
/* ------------------------------------------------------------------------ */
static struct {
    uint8_t ram[64 * 1024];
    uint64_t ram_size;
    int vm_creates, vm_destroys, invalidations, set_hierarchy, runs;
    int vcpu;
} inl;

static npt_status inl_vm_create(void *backend_data, npt_vm *vm, const npt_vm_config *config, void **vm_data) {
    (void)vm;
    if (config->ram_size > sizeof inl.ram) return NPT_ERR_OUT_OF_RANGE;
    check(backend_data == &inl, "backend_data is the pointer given with the ops", __LINE__);
    check(config->size >= sizeof *config, "vm_create gets a full npt_vm_config", __LINE__);
    memset(inl.ram, 0, sizeof inl.ram);
    inl.ram_size = config->ram_size;
    inl.vm_creates++;
    *vm_data = &inl;
    return NPT_OK;
}
static void inl_vm_destroy(void *vm_data) {
    (void)vm_data;
    inl.vm_destroys++;
}
static npt_status inl_write(void *vm_data, uint64_t gpa, const void *data, size_t len) {
    (void)vm_data;
    if (gpa > inl.ram_size || len > inl.ram_size - gpa) return NPT_ERR_OUT_OF_RANGE;
    memcpy(inl.ram + gpa, data, len);
    return NPT_OK;
}
static npt_status inl_read(void *vm_data, uint64_t gpa, void *data, size_t len) {
    (void)vm_data;
    if (gpa > inl.ram_size || len > inl.ram_size - gpa) return NPT_ERR_OUT_OF_RANGE;
    memcpy(data, inl.ram + gpa, len);
    return NPT_OK;
}
static npt_status inl_vcpu_create(void *vm_data, uint32_t index, void **vcpu_data) {
    (void)vm_data;
    (void)index;
    *vcpu_data = &inl.vcpu;
    return NPT_OK;
}
static void inl_vcpu_destroy(void *vcpu_data) { (void)vcpu_data; }
static npt_status inl_set_hierarchy(void *vcpu_data, uint32_t h) {
    (void)vcpu_data;
    (void)h;
    inl.set_hierarchy++;
    return NPT_OK;
}
static npt_status inl_exit_controls(void *vcpu_data, uint32_t c) {
    (void)vcpu_data;
    (void)c;
    return NPT_OK;
}
static npt_status inl_invalidate(void *vm_data, uint32_t h, uint64_t gpa, uint64_t size) {
    (void)vm_data;
    (void)h;
    (void)gpa;
    (void)size;
    inl.invalidations++;
    return NPT_OK;
}
static npt_status inl_run(void *vcpu_data, npt_exit *exit) {
    (void)vcpu_data;
    inl.runs++;
    exit->reason = NPT_EXIT_HALT;
    return NPT_OK;
}

#define INLINE_CAPS (NPT_CAP_MBEC_EMULATION | NPT_CAP_EXIT_ON_ESCALATE | NPT_CAP_EXIT_ON_RETURN)

/* No vcpu_run, no get/set regs: the core must answer NPT_ERR_UNSUPPORTED for those. */
static const npt_backend_ops inline_ops = {
    .abi_version = NPT_ABI_VERSION,
    .size = sizeof(npt_backend_ops),
    .name = "c-inline",
    .description = "registered from C by test_plugins",
    .capabilities = INLINE_CAPS,
    .backend_data = &inl,
    .vm_create = inl_vm_create,
    .vm_destroy = inl_vm_destroy,
    .memory_write = inl_write,
    .memory_read = inl_read,
    .vcpu_create = inl_vcpu_create,
    .vcpu_destroy = inl_vcpu_destroy,
    .vcpu_set_hierarchy = inl_set_hierarchy,
    .vcpu_set_exit_controls = inl_exit_controls,
    .invalidate = inl_invalidate,
};

static void test_register(npt_context *ctx) {
    size_t before = backend_count(ctx);
    CHECK_OK(npt_backend_register(ctx, &inline_ops));
    CHECK_EQ(backend_count(ctx), before + 1);
    npt_backend_info info;
    memset(&info, 0, sizeof info);
    CHECK(find_backend(ctx, "c-inline", &info));
    CHECK_EQ(info.is_plugin, 0);
    CHECK_EQ(info.capabilities, INLINE_CAPS);
    CHECK(info.description != NULL && strcmp(info.description, inline_ops.description) == 0);

    CHECK_ST(npt_backend_register(ctx, &inline_ops), NPT_ERR_EXISTS);
    static npt_backend_ops taken; /* ops tables handed to the core are static: they must outlive ctx */
    taken = inline_ops;
    taken.name = "sim";
    CHECK_ST(npt_backend_register(ctx, &taken), NPT_ERR_EXISTS);

    static npt_backend_ops future;
    future = inline_ops;
    future.name = "c-future";
    future.abi_version = (NPT_ABI_VERSION_MAJOR + 1u) << 16;
    CHECK_ST(npt_backend_register(ctx, &future), NPT_ERR_ABI_MISMATCH);
    CHECK(!find_backend(ctx, "c-future", NULL));
    static npt_backend_ops past;
    past = inline_ops;
    past.name = "c-past";
    past.abi_version = 0; /* major 0 */
    CHECK_ST(npt_backend_register(ctx, &past), NPT_ERR_ABI_MISMATCH);
    static npt_backend_ops newer_minor;
    newer_minor = inline_ops;
    newer_minor.name = "c-newer-minor";
    newer_minor.abi_version = NPT_ABI_VERSION + 5; /* same major, later minor: compatible */
    CHECK_OK(npt_backend_register(ctx, &newer_minor));
    static npt_backend_ops nameless;
    nameless = inline_ops;
    nameless.name = NULL;
    CHECK_ST(npt_backend_register(ctx, &nameless), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_backend_register(ctx, NULL), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_backend_register(NULL, &inline_ops), NPT_ERR_INVALID_ARGUMENT);
    CHECK_EQ(backend_count(ctx), before + 2);

    /* a VM on it, chosen as the default backend */
    CHECK_OK(npt_backend_set_default(ctx, "c-inline"));
    CHECK(find_backend(ctx, "c-inline", &info) && info.is_default == 1);
    /* Exact mode needs NPT_CAP_LINEAR_MODE_INFO, which this table lacks: refused up front, naming it. */
    {
        npt_vm_config c;
        memset(&c, 0, sizeof c);
        c.size = sizeof c;
        c.mbec_mode = NPT_MBEC_EXACT;
        c.ram_size = 16 * K4;
        c.default_perms = R | W;
        npt_vm *refused = NULL;
        CHECK_ST(npt_vm_create(ctx, &c, &refused), NPT_ERR_GUARANTEE);
        CHECK(refused == NULL);
        CHECK(strstr(npt_last_error(), "NPT_CAP_LINEAR_MODE_INFO") != NULL);
        uint64_t missing = 0;
        CHECK_ST(npt_mbec_mode_check(ctx, NULL, NPT_MBEC_EXACT, &missing), NPT_ERR_GUARANTEE);
        CHECK_EQ(missing, NPT_CAP_LINEAR_MODE_INFO);
        CHECK_OK(npt_mbec_mode_check(ctx, NULL, NPT_MBEC_LAZY, &missing));
        CHECK_EQ(missing, 0);
        CHECK_ST(npt_mbec_mode_check(ctx, NULL, 7, &missing), NPT_ERR_INVALID_ARGUMENT);
        CHECK_ST(npt_mbec_mode_check(NULL, NULL, NPT_MBEC_LAZY, &missing), NPT_ERR_INVALID_ARGUMENT);
        CHECK_ST(npt_mbec_mode_check(ctx, "nope", NPT_MBEC_LAZY, &missing), NPT_ERR_NOT_FOUND);
    }
    npt_vm *vm = make_vm(ctx, NULL, 16 * K4, NPT_MBEC_LAZY);
    CHECK_EQ(inl.vm_creates, 1);
    CHECK_OK(npt_backend_set_default(ctx, "sim"));
    if (!vm) return;

    const char msg[] = "through the ops table";
    char back[sizeof msg];
    CHECK_OK(npt_vm_write_memory(vm, 0x100, msg, sizeof msg));
    CHECK(memcmp(inl.ram + 0x100, msg, sizeof msg) == 0);
    CHECK_OK(npt_vm_read_memory(vm, 0x100, back, sizeof back));
    CHECK(memcmp(back, msg, sizeof msg) == 0);

    int inv = inl.invalidations;
    CHECK_OK(npt_policy_set(vm, 0x2000, K4, NPT_PAGE_4K, R | SX));
    CHECK(inl.invalidations > inv);

    npt_vcpu *cpu = NULL;
    CHECK_OK(npt_vcpu_create(vm, 0, &cpu));
    if (cpu) {
        npt_exit e = exit_init();
        CHECK_ST(npt_vcpu_run(cpu, &e), NPT_ERR_UNSUPPORTED);
        CHECK_ST(npt_vcpu_run_raw(cpu, &e), NPT_ERR_UNSUPPORTED);
        npt_regs r;
        memset(&r, 0, sizeof r);
        r.size = sizeof r;
        CHECK_ST(npt_vcpu_get_regs(cpu, &r), NPT_ERR_UNSUPPORTED);
        CHECK_ST(npt_vcpu_inject_fault(cpu, 14, 0, 0), NPT_ERR_UNSUPPORTED);
    }
    CHECK_OK(npt_vm_destroy(vm));
    CHECK_EQ(inl.vm_destroys, 1);

    /* An ops table from an older minor version is shorter: the core reads only `size` bytes, so
     * an operation past that is unsupported even though this struct has a pointer there. */
    static npt_backend_ops shorter;
    shorter = inline_ops;
    shorter.name = "c-short";
    shorter.size = (uint32_t)offsetof(npt_backend_ops, vcpu_run);
    shorter.vcpu_run = inl_run;
    CHECK_OK(npt_backend_register(ctx, &shorter));
    vm = make_vm(ctx, "c-short", 16 * K4, NPT_MBEC_LAZY);
    if (!vm) return;
    CHECK_OK(npt_vcpu_create(vm, 0, &cpu));
    if (cpu) {
        npt_exit e = exit_init();
        CHECK_ST(npt_vcpu_run(cpu, &e), NPT_ERR_UNSUPPORTED);
        CHECK_EQ(inl.runs, 0);
    }
    /* (ABI 1.3) a table that ends before guest_isa says nothing about its ISA */
    uint32_t isa = 99;
    CHECK_OK(npt_vm_guest_isa(vm, &isa));
    CHECK_EQ(isa, NPT_GUEST_ISA_UNKNOWN);
    CHECK_OK(npt_vm_destroy(vm));

    /* guest_isa as the table gives it: the full inline table says x86-64; NULL and bad handles */
    static npt_backend_ops x86;
    x86 = inline_ops;
    x86.name = "c-x86";
    x86.guest_isa = NPT_GUEST_ISA_X86_64;
    CHECK_OK(npt_backend_register(ctx, &x86));
    vm = make_vm(ctx, "c-x86", 16 * K4, NPT_MBEC_LAZY);
    if (!vm) return;
    isa = 99;
    CHECK_OK(npt_vm_guest_isa(vm, &isa));
    CHECK_EQ(isa, NPT_GUEST_ISA_X86_64);
    CHECK_ST(npt_vm_guest_isa(vm, NULL), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_vm_guest_isa(NULL, &isa), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_vm_guest_isa((npt_vm *)(uintptr_t)0x1234, &isa), NPT_ERR_BAD_HANDLE);
    CHECK_OK(npt_vm_destroy(vm));
    vm = make_vm(ctx, "sim", 16 * K4, NPT_MBEC_LAZY);
    if (!vm) return;
    CHECK_OK(npt_vm_guest_isa(vm, &isa));
    CHECK_EQ(isa, NPT_GUEST_ISA_SIM);
    CHECK_OK(npt_vm_destroy(vm));
}

/* ------------------------------------------------------------------------ */
/* (f) plugin interface 2: arguments, the error channel, backend statistics  */
/* ------------------------------------------------------------------------ */
static void test_interface2(npt_context *ctx, const char *sample, const char *sample_v1) {
    size_t before = backend_count(ctx);
    const char *name = "unchanged";

    /* arguments reach the plugin: a second instance of the sample under its own name */
    npt_plugin_arg args[2] = {{"name", "sample-two"}, {"description", "the second sample"}};
    CHECK_OK(npt_plugin_load_with(ctx, sample, args, 2, &name));
    CHECK(name != NULL && strcmp(name, "sample-two") == 0);
    npt_backend_info info;
    memset(&info, 0, sizeof info);
    CHECK(find_backend(ctx, "sample-two", &info));
    CHECK(info.description != NULL && strcmp(info.description, "the second sample") == 0);
    CHECK_EQ(backend_count(ctx), before + 1);

    /* the plugin refuses what it does not know, and says why through the error channel */
    name = "unchanged";
    npt_plugin_arg unknown[1] = {{"colour", "blue"}};
    CHECK_ST(npt_plugin_load_with(ctx, sample, unknown, 1, &name), NPT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(npt_last_error(), "unknown argument") != NULL);
    CHECK(strstr(npt_last_error(), "refused to load") != NULL);
    npt_plugin_arg empty_name[1] = {{"name", ""}};
    CHECK_ST(npt_plugin_load_with(ctx, sample, empty_name, 1, &name), NPT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(npt_last_error(), "name must be") != NULL);
    /* the core refuses malformed arguments before loading anything */
    npt_plugin_arg twice[2] = {{"name", "a"}, {"name", "b"}};
    CHECK_ST(npt_plugin_load_with(ctx, sample, twice, 2, &name), NPT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(npt_last_error(), "twice") != NULL);
    npt_plugin_arg eq[1] = {{"na=me", "x"}};
    CHECK_ST(npt_plugin_load_with(ctx, sample, eq, 1, &name), NPT_ERR_INVALID_ARGUMENT);
    npt_plugin_arg nokey[1] = {{"", "x"}};
    CHECK_ST(npt_plugin_load_with(ctx, sample, nokey, 1, &name), NPT_ERR_INVALID_ARGUMENT);
    npt_plugin_arg nullkey[1] = {{NULL, "x"}};
    CHECK_ST(npt_plugin_load_with(ctx, sample, nullkey, 1, &name), NPT_ERR_INVALID_ARGUMENT);
    npt_plugin_arg nullvalue[1] = {{"name", NULL}};
    CHECK_ST(npt_plugin_load_with(ctx, sample, nullvalue, 1, &name), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_plugin_load_with(ctx, sample, NULL, 1, &name), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_plugin_load_with(ctx, NULL, NULL, 0, &name), NPT_ERR_INVALID_ARGUMENT);
    /* an interface-1 plugin takes no arguments; without any it loads through either call */
    npt_plugin_arg renamed[1] = {{"name", "sample-v1"}};
    CHECK_ST(npt_plugin_load_with(ctx, sample_v1, renamed, 1, &name), NPT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(npt_last_error(), "interface 1") != NULL);
    CHECK(strcmp(name, "unchanged") == 0);
    CHECK_EQ(backend_count(ctx), before + 1);
    npt_context *other = NULL;
    CHECK_OK(npt_context_create(&other));
    if (other) {
        CHECK_OK(npt_plugin_load_with(other, sample_v1, NULL, 0, &name));
        CHECK(name != NULL && strcmp(name, SAMPLE_BACKEND_NAME) == 0);
        CHECK_OK(npt_context_destroy(other));
    }

    /* statistics through the ops table; the count asked first, then the pairs */
    npt_vm *vm = make_vm(ctx, "sample-two", 16 * K4, NPT_MBEC_LAZY);
    if (!vm) return;
    size_t count = 99;
    CHECK_ST(npt_vm_backend_stats(vm, NULL, 0, &count), NPT_ERR_BUFFER_TOO_SMALL);
    CHECK_EQ(count, 2);
    npt_backend_stat st[4];
    memset(st, 0xAB, sizeof st);
    CHECK_ST(npt_vm_backend_stats(vm, st, 1, &count), NPT_ERR_BUFFER_TOO_SMALL);
    CHECK_EQ(st[0].value, UINT64_C(0xABABABABABABABAB)); /* nothing written */
    CHECK_OK(npt_vm_backend_stats(vm, st, 4, &count));
    CHECK_EQ(count, 2);
    CHECK(st[0].name != NULL && strcmp(st[0].name, "ram_bytes") == 0);
    CHECK_EQ(st[0].value, 16 * K4);
    CHECK_ST(npt_vm_backend_stats(vm, st, 4, NULL), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_vm_backend_stats(vm, NULL, 4, &count), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_vm_backend_stats(NULL, st, 4, &count), NPT_ERR_INVALID_ARGUMENT);

    npt_vcpu *cpu = NULL;
    CHECK_OK(npt_vcpu_create(vm, 0, &cpu));
    void *lib = dlopen(sample, RTLD_NOW | RTLD_NOLOAD);
    sample_backend_set_script_fn set_script = NULL;
    CHECK(plugin_symbol(lib, "sample_backend_set_script", &set_script, sizeof set_script) != NULL);
    if (cpu && set_script) {
        npt_exit halt = scripted(NPT_EXIT_HALT, 0, 0, 0);
        set_script(&halt, 1);
        npt_exit e = exit_init();
        CHECK_OK(npt_vcpu_run(cpu, &e));
        CHECK_EQ(e.reason, NPT_EXIT_HALT);
        CHECK_OK(npt_vcpu_backend_stats(cpu, st, 4, &count));
        CHECK_EQ(count, 2);
        CHECK(st[0].name != NULL && strcmp(st[0].name, "scripted_exits") == 0);
        CHECK_EQ(st[0].value, 1);
        /* the error channel on an operation: the script is exhausted, and the plugin says so */
        e = exit_init();
        CHECK_ST(npt_vcpu_run(cpu, &e), NPT_ERR_STATE);
        CHECK(strstr(npt_last_error(), "script is exhausted") != NULL);
        CHECK(strstr(npt_last_error(), "sample-two") != NULL);
        set_script(NULL, 0);
    }
    if (lib) dlclose(lib);
    CHECK_OK(npt_vm_destroy(vm));

    /* the simulator's own statistics */
    vm = make_vm(ctx, "sim", 16 * K4, NPT_MBEC_LAZY);
    if (!vm) return;
    CHECK_OK(npt_vm_backend_stats(vm, st, 4, &count));
    int found = 0;
    for (size_t i = 0; i < count; i++) found |= strcmp(st[i].name, "outside_while_visible") == 0 && st[i].value == 0;
    CHECK(found);
    CHECK_OK(npt_vm_destroy(vm));
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s SAMPLE_SO BAD_ABI_SO NO_ENTRY_SO SAMPLE_INTERFACE_1_SO\n", argv[0]);
        return 2;
    }
    npt_context *ctx = NULL;
    CHECK_OK(npt_context_create(&ctx));
    if (ctx) {
        test_sample_plugin(ctx, argv[1]);
        test_refused_plugins(ctx, argv[2], argv[3]);
        test_register(ctx);
        test_interface2(ctx, argv[1], argv[4]);
        CHECK_OK(npt_context_destroy(ctx));
    }

    /* a plugin is per context: a second context loads the same .so again */
    ctx = NULL;
    CHECK_OK(npt_context_create(&ctx));
    if (ctx) {
        const char *name = NULL;
        CHECK_OK(npt_plugin_load(ctx, argv[1], &name));
        CHECK(name != NULL && strcmp(name, SAMPLE_BACKEND_NAME) == 0);
        CHECK(!find_backend(ctx, "c-inline", NULL));
        CHECK_OK(npt_context_destroy(ctx));
    }

    printf("c-test test_plugins: %d passed, %d failed\n", passed, failed);
    return failed > 0 ? 1 : 0;
}
