/* test_frozen_abi.c - compiled against each frozen published header (Tests/C/abi/1.N/nptkit.h) and
 * run against the current library: a program built for an older ABI must keep working. It also
 * checks the growth rules (include/nptkit.h): a struct from a newer program (a larger size) is
 * accepted and written only up to the library's own size (the caller's bytes past it untouched);
 * a size below the first published one is refused. */
#include <nptkit.h>
#include <stdio.h>
#include <string.h>

static int passed, failed;
#define CHECK(c) do { if (c) passed++; else { failed++; fprintf(stderr, "test_frozen_abi (%u.%u):%d: %s (%s)\n", \
    NPT_ABI_VERSION_MAJOR, NPT_ABI_VERSION_MINOR, __LINE__, #c, npt_last_error()); } } while (0)

/* A struct as a newer header would make it: the known one and 16 more bytes. */
typedef struct { npt_translation t; uint64_t future[2]; } newer_translation;

int main(void) {
    npt_context *ctx = NULL;
    npt_vm *vm = NULL;
    npt_vcpu *cpu = NULL;
    CHECK(npt_abi_version() >> 16 == NPT_ABI_VERSION_MAJOR);
    CHECK((npt_abi_version() & 0xffff) + 1 > NPT_ABI_VERSION_MINOR);
    CHECK(npt_context_create(&ctx) == NPT_OK);
    npt_backend_info info;
    memset(&info, 0, sizeof info);
    info.size = sizeof info;
    CHECK(npt_backend_get(ctx, 0, &info) == NPT_OK && info.name != NULL && strcmp(info.name, "sim") == 0);
    npt_vm_config cfg = {sizeof cfg, NPT_MBEC_EXACT, NULL, 16u << 20, NPT_PERM_READ | NPT_PERM_WRITE, 100
#if NPT_ABI_VERSION_MINOR >= 4
                         , NULL /* record_path (1.4) */
#endif
    };
    CHECK(npt_vm_create(ctx, &cfg, &vm) == NPT_OK);
    CHECK(npt_policy_set(vm, 0x1000, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_SX) == NPT_OK);
    uint64_t perms = 0;
    CHECK(npt_policy_get(vm, 0x1000, &perms) == NPT_OK && perms == (NPT_PERM_READ | NPT_PERM_SX));
    npt_translation t = {sizeof t, 0, 0, 0, 0};
    CHECK(npt_hierarchy_translate(vm, NPT_HIERARCHY_SUPERVISOR, 0x1000, &t) == NPT_OK && t.level == 1 && t.size == sizeof t);

    /* Growth: a newer caller's larger struct; the bytes past what the library knows stay the caller's. */
    newer_translation nt;
    memset(&nt, 0xAB, sizeof nt);
    nt.t.size = sizeof nt;
    CHECK(npt_hierarchy_translate(vm, NPT_HIERARCHY_SUPERVISOR, 0x1000, &nt.t) == NPT_OK && nt.t.level == 1);
    CHECK(nt.t.size == sizeof nt && nt.future[0] == 0xABABABABABABABABull && nt.future[1] == 0xABABABABABABABABull);
    /* Below the first published size: refused, nothing written. */
    npt_translation small;
    memset(&small, 0x5A, sizeof small);
    small.size = 8;
    CHECK(npt_hierarchy_translate(vm, NPT_HIERARCHY_SUPERVISOR, 0x1000, &small) == NPT_ERR_INVALID_ARGUMENT);
    CHECK(small.level == 0x5A5A5A5Au);
    npt_vm_config bigger[2];
    memset(bigger, 0, sizeof bigger);
    bigger[0] = cfg;
    bigger[0].size = sizeof bigger; /* a newer program's config: its extra members are 0 */
    npt_vm *vm2 = NULL;
    CHECK(npt_vm_create(ctx, &bigger[0], &vm2) == NPT_OK);
    CHECK(vm2 == NULL || npt_vm_destroy(vm2) == NPT_OK);

    CHECK(npt_vcpu_create(vm, 0, &cpu) == NPT_OK);
    npt_regs r;
    memset(&r, 0, sizeof r);
    r.size = sizeof r;
    CHECK(npt_vcpu_get_regs(cpu, &r) == NPT_OK && r.size == sizeof r);
    npt_stats st;
    memset(&st, 0, sizeof st);
    st.size = sizeof st;
    CHECK(npt_vm_get_stats(vm, &st) == NPT_OK && st.policy_updates >= 1);
#if NPT_ABI_VERSION_MINOR >= 1
    npt_host_pmem_region hr;
    memset(&hr, 0, sizeof hr);
    hr.size = sizeof hr;
    CHECK(npt_vm_host_pmem_get(vm, 0, &hr) == NPT_OK && hr.length > 0);
    npt_nvdimm nd = {sizeof nd, hr.id, 0x40000000ull, 1u << 20, 0};
    CHECK(npt_vm_add_nvdimm(vm, &nd) == NPT_OK);
    npt_flush_stats fs;
    memset(&fs, 0, sizeof fs);
    fs.size = sizeof fs;
    CHECK(npt_vm_get_flush_stats(vm, &fs) == NPT_OK);
#endif
#if NPT_ABI_VERSION_MINOR >= 2
    uint64_t missing = 1;
    CHECK(npt_mbec_mode_check(ctx, NULL, NPT_MBEC_VIOLATION_ONLY, &missing) == NPT_OK && missing == 0);
#endif
    CHECK(npt_vcpu_destroy(cpu) == NPT_OK);
    CHECK(npt_vm_destroy(vm) == NPT_OK);
    CHECK(npt_context_destroy(ctx) == NPT_OK);
    printf("c-test test_frozen_abi (header %u.%u): %d passed, %d failed\n", NPT_ABI_VERSION_MAJOR, NPT_ABI_VERSION_MINOR, passed, failed);
    return failed != 0;
}
