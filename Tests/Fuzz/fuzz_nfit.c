/* libFuzzer target: an ACPI NFIT binary from outside (a host's table, a file given to nptkit-cli
 * host-pmem --nfit) through npt_sim_set_platform: the NFIT parser, the platform built from it, and a
 * VM on that platform with NVDIMM ranges on every region, its guest NFIT and SSDT. */
#include "fuzz_common.h"

static npt_context *ctx;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!ctx) FUZZ_ASSERT(npt_context_create(&ctx) == NPT_OK);
    npt_sim_platform p = { sizeof p, size > 0 && (data[0] & 1), 0, data, size };
    if (size == 0) p.nfit = NULL;
    npt_status s = checked(npt_sim_set_platform(ctx, &p));
    if (s != NPT_OK) return 0;
    npt_vm_config cfg = { sizeof cfg, NPT_MBEC_EXACT, NULL, 1u << 20, NPT_PERM_READ | NPT_PERM_WRITE, 0 };
    npt_vm *vm;
    FUZZ_ASSERT(checked(npt_vm_create(ctx, &cfg, &vm)) == NPT_OK);
    size_t count = 0;
    FUZZ_ASSERT(checked(npt_vm_host_pmem_count(vm, &count)) == NPT_OK);
    FUZZ_ASSERT(count > 0);
    uint64_t gpa = UINT64_C(0x100000000);
    for (size_t i = 0; i < count && i < 8; i++) {
        npt_host_pmem_region r = { .size = sizeof r };
        FUZZ_ASSERT(checked(npt_vm_host_pmem_get(vm, i, &r)) == NPT_OK);
        FUZZ_ASSERT(r.length > 0 && r.base + r.length - 1 >= r.base); /* the platform refused wrapping ranges */
        uint64_t len = r.length < 0x200000 ? r.length : 0x200000;
        npt_nvdimm d = { sizeof d, r.id, gpa, len, r.length - len };
        if (checked(npt_vm_add_nvdimm(vm, &d)) == NPT_OK) gpa += UINT64_C(0x40000000);
    }
    uint8_t buf[8192];
    size_t needed = 0;
    checked(npt_vm_get_nfit(vm, buf, sizeof buf, &needed));
    checked(npt_vm_get_nvdimm_ssdt(vm, buf, sizeof buf, &needed));
    npt_flush_hint_info fh = { .size = sizeof fh };
    if (checked(npt_vm_get_flush_hint(vm, &fh)) == NPT_OK) {
        for (uint32_t t = 0; t < fh.target_count; t++) {
            uint32_t region, controller;
            uint64_t address;
            FUZZ_ASSERT(checked(npt_vm_get_flush_target(vm, t, &region, &controller, &address)) == NPT_OK);
        }
    }
    FUZZ_ASSERT(checked(npt_vm_destroy(vm)) == NPT_OK);
    return 0;
}
