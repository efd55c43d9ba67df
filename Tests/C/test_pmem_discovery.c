/*
 * test_pmem_discovery.c - the one host NVDIMM discovery (ABI 1.2): npt_host_pmem_discover_sysfs on
 * the sysfs fixtures (every numbering and persistence-domain case, bad input), the same function
 * through the npt_host_api table a plugin gets, and the KVM plugin, which must report exactly what
 * that discovery finds (it no longer reads sysfs itself).
 *
 * Usage: test_pmem_discovery SAMPLE_SO KVM_SO FIXTURES_SYSFS MODE
 *   MODE core             the public call and the host table on every fixture, and bad input
 *   MODE kvm:NAME         the KVM plugin's host_pmem_count/get with its argument nd-root=FIXTURES_SYSFS/NAME
 *                         (a fixture; "none": a directory that does not exist, so the plugin's file region)
 *   MODE kvm-old:NAME     the same, but the plugin gets a host table of ABI 1.1's size: it must not read
 *                         the 1.2 member, and falls back to its file region
 *   MODE args             the KVM plugin's arguments through npt_plugin_load_with: each unknown key and bad
 *                         value refused with the plugin's reason in npt_last_error(), nothing registered;
 *                         good ones accepted
 * The plugin modes call the plugin's npt_plugin_init themselves (acting as the loader: the symbol the
 * header declares) with the core's host table, whose set_error they replace to see the plugin's
 * messages; no /dev/kvm is needed.
 * Prints "c-test test_pmem_discovery MODE: N passed, M failed"; exits 1 if M > 0.
 */
#define _GNU_SOURCE
#include <nptkit.h>

#include <dlfcn.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "check.h"
#include "sample_backend.h"

#define CHECK_ERR_MENTIONS(word) \
    check_at(strstr(npt_last_error(), (word)) != NULL, "npt_last_error() mentions \"" word "\"", CHECK_FILE, __LINE__)

enum { MAXR = 32, MAXT = 64 };

struct discovery {
    npt_status status;
    size_t nr, nt;
    npt_sysfs_pmem_region r[MAXR];
    npt_flush_target t[MAXT];
};

typedef npt_status (*discover_fn)(const char *, npt_sysfs_pmem_region *, size_t, size_t *, npt_flush_target *, size_t,
                                  size_t *);

static struct discovery discover_with(discover_fn f, const char *root) {
    struct discovery d;
    memset(&d, 0, sizeof d);
    d.status = f(root, d.r, MAXR, &d.nr, d.t, MAXT, &d.nt);
    return d;
}

static void path_join(char *out, size_t n, const char *a, const char *b) { snprintf(out, n, "%s/%s", a, b); }

/* ------------------------------------------------------------------------ */
/* MODE core                                                                  */
/* ------------------------------------------------------------------------ */
static void test_fixtures(const char *fixtures) {
    char root[4096];

    /* domains: every persistence_domain case (Tests/Fixtures/sysfs/README.md). */
    path_join(root, sizeof root, fixtures, "domains");
    struct discovery d = discover_with(npt_host_pmem_discover_sysfs, root);
    CHECK_OK(d.status);
    CHECK_EQ(d.nr, 8);
    CHECK_EQ(d.nt, 6);
    static const uint32_t domain[8] = {NPT_PMEM_DOMAIN_MEDIA, NPT_PMEM_DOMAIN_MEDIA, NPT_PMEM_DOMAIN_MEMORY_CONTROLLER,
                                       NPT_PMEM_DOMAIN_CPU_CACHE, NPT_PMEM_DOMAIN_MEDIA, NPT_PMEM_DOMAIN_CPU_CACHE,
                                       NPT_PMEM_DOMAIN_MEDIA, NPT_PMEM_DOMAIN_MEDIA};
    static const int needs[8] = {1, 1, 0, 0, 0, 0, 1, 1};
    static const int deep_flush[8] = {1, 1, 1, 1, 0, -1, 1, 1};
    static const uint32_t targets[8] = {1, 1, 1, 1, 0, 0, 1, 1};
    static const uint32_t controller[8] = {0x0, 0x100, 0x0, 0x0, 0, 0, 0x0, 0x0}; /* of the target, if any */
    uint32_t next = 0;
    for (size_t i = 0; i < 8 && i < d.nr; i++) {
        const npt_sysfs_pmem_region *r = &d.r[i];
        CHECK_EQ(r->id, i);
        CHECK_EQ(r->base, UINT64_C(0x100000000) + i * UINT64_C(0x40000000));
        CHECK_EQ(r->length, UINT64_C(1) << 30);
        CHECK_EQ(r->persistence_domain, domain[i]);
        CHECK_EQ(r->needs_wpq_flush, needs[i]);
        CHECK_EQ((int64_t)r->deep_flush, (int64_t)deep_flush[i]);
        CHECK_EQ(r->flush_target_count, targets[i]);
        CHECK_EQ(r->first_target, next);
        CHECK_EQ(r->reserved, 0);
        if (r->flush_target_count == 1 && r->first_target < MAXT) {
            CHECK_EQ(d.t[r->first_target].controller, controller[i]);
            CHECK_EQ(d.t[r->first_target].address, 0);
        }
        next += r->flush_target_count;
    }
    /* region7: flush hints on a DIMM without an NFIT handle: one controller (key 0), one target. */
    CHECK_EQ(d.r[7].controller_count, 1);
    /* region4 (deep_flush 0) on nmem0: one controller, no target. */
    CHECK_EQ(d.r[4].controller_count, 1);

    /* numbering: N of regionN, 0 included; not regions: region01, region, region-1, past UInt32,
     * a plain file, a dangling symlink. */
    path_join(root, sizeof root, fixtures, "numbering");
    d = discover_with(npt_host_pmem_discover_sysfs, root);
    CHECK_OK(d.status);
    CHECK_EQ(d.nr, 5);
    CHECK_EQ(d.nt, 0);
    static const uint32_t ids[5] = {0, 7, 9, 12, UINT32_C(4294967295)};
    static const uint64_t bases[5] = {UINT64_C(0x100000000), UINT64_C(0x200000000), UINT64_C(0x900000000),
                                      UINT64_C(0x300000000), UINT64_C(0x400000000)};
    for (size_t i = 0; i < 5 && i < d.nr; i++) {
        CHECK_EQ(d.r[i].id, ids[i]);
        CHECK_EQ(d.r[i].base, bases[i]);
        CHECK_EQ(d.r[i].length, 4096);
        CHECK_EQ((int64_t)d.r[i].deep_flush, -1);
    }

    /* wpq: shaped like real sysfs (symlinks); region0 over two controllers. */
    path_join(root, sizeof root, fixtures, "wpq/bus/nd/devices");
    d = discover_with(npt_host_pmem_discover_sysfs, root);
    CHECK_OK(d.status);
    CHECK_EQ(d.nr, 3);
    CHECK_EQ(d.nt, 3);
    CHECK(d.nr == 3 && d.r[0].id == 0 && d.r[1].id == 1 && d.r[2].id == 10);
    CHECK(d.r[0].flush_target_count == 2 && d.r[0].controller_count == 2 && d.r[0].needs_wpq_flush == 1);
    CHECK(d.t[0].controller == 0x0 && d.t[1].controller == 0x100 && d.t[2].controller == 0x1000);
    CHECK(d.r[2].needs_wpq_flush == 0 && d.r[2].deep_flush == 0 && d.r[2].flush_target_count == 0);

    /* adr: memory_controller and cpu_cache: no WPQ flushing. */
    path_join(root, sizeof root, fixtures, "adr");
    d = discover_with(npt_host_pmem_discover_sysfs, root);
    CHECK_OK(d.status);
    CHECK(d.nr == 2 && d.r[0].needs_wpq_flush == 0 && d.r[1].needs_wpq_flush == 0);
    CHECK(d.r[0].persistence_domain == NPT_PMEM_DOMAIN_MEMORY_CONTROLLER &&
          d.r[1].persistence_domain == NPT_PMEM_DOMAIN_CPU_CACHE);
}

static void test_bad_input(const char *fixtures) {
    char root[4096], broken[4096], missing[4096];
    path_join(root, sizeof root, fixtures, "domains");
    path_join(broken, sizeof broken, fixtures, "broken");
    path_join(missing, sizeof missing, fixtures, "no-such-dir");
    npt_sysfs_pmem_region r[MAXR];
    npt_flush_target t[MAXT];
    size_t nr = 99, nt = 99;

    CHECK_ST(npt_host_pmem_discover_sysfs(root, r, MAXR, NULL, t, MAXT, &nt), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ERR_MENTIONS("region_count");
    CHECK_ST(npt_host_pmem_discover_sysfs(root, r, MAXR, &nr, t, MAXT, NULL), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ERR_MENTIONS("target_count");
    CHECK_ST(npt_host_pmem_discover_sysfs(root, NULL, 1, &nr, t, MAXT, &nt), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ERR_MENTIONS("regions");
    CHECK_ST(npt_host_pmem_discover_sysfs(root, r, MAXR, &nr, NULL, 2, &nt), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ERR_MENTIONS("targets");
    CHECK_ST(npt_host_pmem_discover_sysfs("", r, MAXR, &nr, t, MAXT, &nt), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ERR_MENTIONS("root is empty");
    CHECK_ST(npt_host_pmem_discover_sysfs(missing, r, MAXR, &nr, t, MAXT, &nt), NPT_ERR_NOT_FOUND);
    CHECK_ERR_MENTIONS("no-such-dir");
    CHECK_ST(npt_host_pmem_discover_sysfs(broken, r, MAXR, &nr, t, MAXT, &nt), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ERR_MENTIONS("region0/resource");
    CHECK_ERR_MENTIONS("0xZZZ");

    /* Too small: the counts are set, nothing is written. Asking the counts with no arrays. */
    memset(r, 0xEE, sizeof r);
    memset(t, 0xEE, sizeof t);
    nr = nt = 0;
    CHECK_ST(npt_host_pmem_discover_sysfs(root, r, 7, &nr, t, MAXT, &nt), NPT_ERR_BUFFER_TOO_SMALL);
    CHECK_EQ(nr, 8);
    CHECK_EQ(nt, 6);
    CHECK_EQ(r[0].id, 0xEEEEEEEEu);
    CHECK_ST(npt_host_pmem_discover_sysfs(root, r, MAXR, &nr, t, 5, &nt), NPT_ERR_BUFFER_TOO_SMALL);
    CHECK_EQ(t[0].controller, 0xEEEEEEEEu);
    nr = nt = 0;
    CHECK_ST(npt_host_pmem_discover_sysfs(root, NULL, 0, &nr, NULL, 0, &nt), NPT_ERR_BUFFER_TOO_SMALL);
    CHECK(nr == 8 && nt == 6);
    /* Exactly enough room. */
    CHECK_OK(npt_host_pmem_discover_sysfs(root, r, 8, &nr, t, 6, &nt));
    CHECK_EQ(r[7].id, 7);

    /* NULL root: the live host's /sys/bus/nd/devices (present only where libnvdimm is loaded). */
    struct stat st;
    int live = stat("/sys/bus/nd/devices", &st) == 0 && S_ISDIR(st.st_mode);
    CHECK_ST(npt_host_pmem_discover_sysfs(NULL, r, MAXR, &nr, t, MAXT, &nt), live ? NPT_OK : NPT_ERR_NOT_FOUND);
    if (!live) CHECK_ERR_MENTIONS("/sys/bus/nd/devices");
}

/* The same discovery through the table a plugin gets. */
static void test_host_table(const npt_host_api *host, const char *fixtures) {
    CHECK(host != NULL);
    if (!host) return;
    CHECK_EQ(host->abi_version, NPT_ABI_VERSION);
    CHECK(host->size >= offsetof(npt_host_api, last_error) + sizeof host->last_error);
    CHECK(host->host_pmem_discover_sysfs != NULL);
    CHECK(host->last_error != NULL);
    if (!host->host_pmem_discover_sysfs || !host->last_error) return;
    const char *names[] = {"domains", "numbering", "wpq/bus/nd/devices", "adr"};
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        char root[4096];
        path_join(root, sizeof root, fixtures, names[i]);
        struct discovery a = discover_with(npt_host_pmem_discover_sysfs, root);
        struct discovery b = discover_with(host->host_pmem_discover_sysfs, root);
        CHECK_OK(b.status);
        CHECK(a.nr == b.nr && a.nt == b.nt);
        CHECK(memcmp(a.r, b.r, sizeof a.r) == 0);
        CHECK(memcmp(a.t, b.t, sizeof a.t) == 0);
    }
    char broken[4096];
    path_join(broken, sizeof broken, fixtures, "broken");
    size_t nr = 0, nt = 0;
    CHECK_ST(host->host_pmem_discover_sysfs(broken, NULL, 0, &nr, NULL, 0, &nt), NPT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(host->last_error(), "region0/resource") != NULL);
    CHECK(strcmp(host->last_error(), npt_last_error()) == 0);
}

/* ------------------------------------------------------------------------ */
/* MODE kvm:NAME, kvm-old:NAME                                                */
/* ------------------------------------------------------------------------ */
/* What the plugin said through set_error (the test's host table). */
static char plugin_message[1024];
static void capture_error(const char *message) { snprintf(plugin_message, sizeof plugin_message, "%s", message ? message : ""); }

/* Calls the KVM plugin's npt_plugin_init (interface 2) with `host` and the arguments. */
static npt_status kvm_init(void *lib, const npt_host_api *host, const npt_plugin_arg *args, size_t argc,
                           const npt_backend_ops **ops) {
    npt_plugin_init_fn init = NULL;
    void *sym = dlsym(lib, NPT_PLUGIN_INIT_SYMBOL);
    memcpy(&init, &sym, sizeof init);
    CHECK(init != NULL);
    CHECK(dlsym(lib, NPT_PLUGIN_ENTRY_SYMBOL) == NULL); /* the KVM plugin is interface 2 only */
    if (!init) return NPT_ERR_PLUGIN;
    npt_plugin_info info;
    memset(&info, 0, sizeof info);
    info.size = sizeof info;
    info.abi_version = NPT_ABI_VERSION;
    info.host = host;
    info.path = "libnptkit-kvm.so";
    info.argc = argc;
    info.args = args;
    return init(&info, ops);
}

static void test_kvm(const npt_host_api *host, const char *kvm_so, const char *fixtures, const char *name, int old_host) {
    char root[4096];
    path_join(root, sizeof root, fixtures, name);
    void *lib = dlopen(kvm_so, RTLD_NOW | RTLD_LOCAL);
    CHECK(lib != NULL);
    if (!lib) { fprintf(stderr, "dlopen %s: %s\n", kvm_so, dlerror()); return; }
    if (!host) return;

    /* The core's table with the test's error channel; an older core's table is shorter: copy only
     * the 1.1 part and say so in `size`. */
    static npt_host_api mine, old;
    mine = *host;
    mine.set_error = capture_error;
    memset(&old, 0xA5, sizeof old); /* what lies past an old table: garbage, never to be called */
    memcpy(&old, host, offsetof(npt_host_api, host_pmem_discover_sysfs));
    old.size = (uint32_t)offsetof(npt_host_api, host_pmem_discover_sysfs);
    const npt_backend_ops *ops = NULL;
    npt_plugin_arg arg = {"nd-root", root};
    CHECK_OK(kvm_init(lib, old_host ? &old : &mine, &arg, 1, &ops));
    CHECK(ops != NULL && ops->host_pmem_count != NULL && ops->host_pmem_get != NULL);
    if (!ops || !ops->host_pmem_count || !ops->host_pmem_get) return;

    size_t n = 0;
    struct discovery d = discover_with(npt_host_pmem_discover_sysfs, root);
    plugin_message[0] = 0;
    npt_status s = ops->host_pmem_count(ops->backend_data, &n);
    if (d.status == NPT_ERR_INVALID_ARGUMENT && !old_host) {
        /* A malformed tree: the plugin refuses with the core's detail, through set_error. */
        CHECK_ST(s, NPT_ERR_INVALID_ARGUMENT);
        CHECK(strstr(plugin_message, "region0/resource") != NULL);
        printf("kvm plugin on %s: %s\n", name, plugin_message);
        return;
    }
    CHECK_OK(s);
    if (d.status != NPT_OK || d.nr == 0 || old_host) {
        /* No tree, no region in it, or a core without the discovery: the plugin's file region, id 1. */
        CHECK_EQ(n, 1);
        npt_host_pmem_region r;
        memset(&r, 0, sizeof r);
        r.size = sizeof r;
        npt_flush_target t[4];
        CHECK_OK(ops->host_pmem_get(ops->backend_data, 0, &r, t, 4));
        CHECK_EQ(r.id, 1);
        CHECK_EQ(r.base, 0);
        CHECK(r.length > 0);
        CHECK_EQ(r.flush_target_count, 1);
        CHECK_EQ(r.needs_wpq_flush, 1);
        printf("kvm plugin on %s%s: its file region (id %u, %" PRIu64 " bytes)\n", name, old_host ? " (ABI 1.1 host)" : "",
               r.id, r.length);
        return;
    }
    /* Real regions: exactly what the core's discovery found, region by region. */
    CHECK_EQ(n, d.nr);
    for (size_t i = 0; i < n && i < d.nr; i++) {
        npt_host_pmem_region r;
        memset(&r, 0, sizeof r);
        r.size = sizeof r;
        npt_flush_target t[MAXT];
        memset(t, 0, sizeof t);
        CHECK_OK(ops->host_pmem_get(ops->backend_data, i, &r, t, MAXT));
        const npt_sysfs_pmem_region *c = &d.r[i];
        CHECK_EQ(r.id, c->id); /* N of regionN: the plugin used to say N + 1 */
        CHECK_EQ(r.base, c->base);
        CHECK_EQ(r.length, c->length);
        CHECK_EQ(r.controller_count, c->controller_count);
        CHECK_EQ(r.flush_target_count, c->flush_target_count);
        CHECK_EQ(r.needs_wpq_flush, c->needs_wpq_flush); /* it used to say 1 whatever persistence_domain read */
        for (uint32_t k = 0; k < r.flush_target_count && c->first_target + k < MAXT; k++) {
            CHECK_EQ(t[k].controller, d.t[c->first_target + k].controller);
            CHECK_EQ(t[k].address, 0);
        }
        /* Room for none: the count is still given, nothing written. */
        npt_flush_target none = {0xEEEEEEEEu, 0, 0};
        CHECK_OK(ops->host_pmem_get(ops->backend_data, i, &r, &none, 0));
        CHECK_EQ(none.controller, 0xEEEEEEEEu);
        printf("kvm plugin on %s: region %u base %#" PRIx64 " needs_wpq_flush %d targets %u\n", name, r.id, r.base,
               r.needs_wpq_flush, r.flush_target_count);
    }
    npt_host_pmem_region past;
    memset(&past, 0, sizeof past);
    past.size = sizeof past;
    CHECK_ST(ops->host_pmem_get(ops->backend_data, n, &past, NULL, 0), NPT_ERR_NOT_FOUND);
}

/* ------------------------------------------------------------------------ */
/* MODE args: the KVM plugin's arguments through the core                     */
/* ------------------------------------------------------------------------ */
static size_t backends(npt_context *ctx) {
    size_t n = 0;
    CHECK_OK(npt_backend_count(ctx, &n));
    return n;
}

static void refused(npt_context *ctx, const char *kvm_so, const char *key, const char *value, const char *mention) {
    size_t before = backends(ctx);
    /* A good argument first: the bad one is refused whatever comes before it. */
    npt_plugin_arg a[] = {{strcmp(key, "pmem-dir") ? "pmem-dir" : "pmem-size", strcmp(key, "pmem-dir") ? "/tmp" : "4096"}, {key, value}};
    const char *name = "untouched";
    CHECK_ST(npt_plugin_load_with(ctx, kvm_so, a, 2, &name), NPT_ERR_INVALID_ARGUMENT);
    int says = strstr(npt_last_error(), mention) != NULL;
    check_at(says, "npt_last_error() names the argument", CHECK_FILE, __LINE__);
    if (!says) fprintf(stderr, "  %s=%s: npt_last_error() = %s\n", key, value, npt_last_error());
    CHECK_EQ(backends(ctx), before); /* nothing registered */
    CHECK(strcmp(name, "untouched") == 0);
    printf("refused %s=%s: %s\n", key, value, npt_last_error());
}

static void test_args(const char *kvm_so, const char *fixtures) {
    npt_context *ctx = NULL;
    CHECK_OK(npt_context_create(&ctx));
    refused(ctx, kvm_so, "bogus", "1", "unknown argument 'bogus'");
    refused(ctx, kvm_so, "pmem-size", "4097", "pmem-size=4097");
    refused(ctx, kvm_so, "pmem-size", "0", "pmem-size=0");
    refused(ctx, kvm_so, "pmem-size", "lots", "pmem-size=lots");
    refused(ctx, kvm_so, "pmem-needs-flush", "yes", "pmem-needs-flush=yes");
    refused(ctx, kvm_so, "pmem-dir", "/nonexistent/nptkit", "pmem-dir=/nonexistent/nptkit");
    refused(ctx, kvm_so, "nd-root", "relative/path", "nd-root=relative/path");
    /* The same key twice is the core's refusal (before the plugin is asked). */
    npt_plugin_arg twice[] = {{"pmem-size", "4096"}, {"pmem-size", "8192"}};
    CHECK_ST(npt_plugin_load_with(ctx, kvm_so, twice, 2, NULL), NPT_ERR_INVALID_ARGUMENT);
    /* Every argument the plugin documents, with good values: loaded and registered as "kvm". */
    char root[4096];
    path_join(root, sizeof root, fixtures, "none");
    npt_plugin_arg good[] = {{"pmem-dir", "/tmp"}, {"pmem-size", "0x200000"}, {"nd-root", root}, {"pmem-needs-flush", "0"}};
    const char *name = NULL;
    size_t before = backends(ctx);
    CHECK_OK(npt_plugin_load_with(ctx, kvm_so, good, 4, &name));
    CHECK(name != NULL && strcmp(name, "kvm") == 0);
    CHECK_EQ(backends(ctx), before + 1);
    CHECK_OK(npt_context_destroy(ctx));
}

int main(int argc, char **argv) {
    if (argc != 5) {
        fprintf(stderr, "usage: %s SAMPLE_SO KVM_SO FIXTURES_SYSFS MODE\n", argv[0]);
        return 2;
    }
    const char *sample = argv[1], *kvm_so = argv[2], *fixtures = argv[3], *mode = argv[4];
    (void)skipped;
    npt_context *ctx = NULL;
    CHECK_OK(npt_context_create(&ctx));
    const char *name = NULL;
    CHECK_OK(npt_plugin_load(ctx, sample, &name));
    void *lib = dlopen(sample, RTLD_NOW | RTLD_NOLOAD);
    sample_backend_host_fn get_host = NULL;
    if (lib) {
        void *sym = dlsym(lib, "sample_backend_host");
        memcpy(&get_host, &sym, sizeof get_host);
    }
    CHECK(get_host != NULL);
    const npt_host_api *host = get_host ? get_host() : NULL;

    if (strcmp(mode, "core") == 0) {
        test_fixtures(fixtures);
        test_bad_input(fixtures);
        test_host_table(host, fixtures);
    } else if (strncmp(mode, "kvm:", 4) == 0) {
        test_kvm(host, kvm_so, fixtures, mode + 4, 0);
    } else if (strncmp(mode, "kvm-old:", 8) == 0) {
        test_kvm(host, kvm_so, fixtures, mode + 8, 1);
    } else if (strcmp(mode, "args") == 0) {
        test_args(kvm_so, fixtures);
    } else {
        fprintf(stderr, "unknown mode %s\n", mode);
        return 2;
    }
    printf("c-test test_pmem_discovery %s: %d passed, %d failed\n", mode, passed, failed);
    return failed ? 1 : 0;
}
