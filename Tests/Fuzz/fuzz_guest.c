/* libFuzzer target: a guest image from outside: the bytes of guest memory (code, page tables, data),
 * the register state and the MBEC policy, run on the simulator through both loops (npt_vcpu_run, and
 * npt_vcpu_run_raw with npt_handle_exit), with the privileged mode, an NVDIMM range and faults
 * injected on the way. The simulator's decoder and two-dimensional page walk, and the core's
 * decisions on every exit they produce, see whatever the guest does. */
#include "fuzz_common.h"

#define RAM (1u << 20)
#define REGION UINT64_C(0x40000000)

static npt_context *ctx;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!ctx) FUZZ_ASSERT(npt_context_create(&ctx) == NPT_OK);
    input in = { data, size, 0 };
    uint8_t flags = in_u8(&in);
    npt_vm_config cfg = { sizeof cfg, (uint32_t)(flags % 3), NULL, RAM, NPT_PERM_READ | NPT_PERM_WRITE | NPT_PERM_SX | NPT_PERM_UX,
                          50 + in_u8(&in) * 2u };
    npt_vm *vm;
    FUZZ_ASSERT(checked(npt_vm_create(ctx, &cfg, &vm)) == NPT_OK);
    /* Policy: up to 8 ranges of the first 256 pages. */
    for (int i = 0, n = in_u8(&in) % 9; i < n; i++) {
        uint64_t page = in_u8(&in), perms = in_u16(&in) & 0x407;
        checked(npt_policy_set(vm, page << 12, 0x1000 * (1 + in_u8(&in) % 4), NPT_PAGE_4K, perms));
    }
    if (flags & 0x10) {
        uint8_t handler[64];
        for (size_t i = 0; i < sizeof handler; i++) handler[i] = in_u8(&in);
        npt_region r = { sizeof r, 0, REGION, 0x2000, handler, sizeof handler, 0, 0 };
        checked(npt_region_set(vm, &r));
    }
    if (flags & 0x20) {
        npt_nvdimm d = { sizeof d, 1, UINT64_C(0x80000000), 0x200000, 0 };
        checked(npt_vm_add_nvdimm(vm, &d));
    }
    npt_regs regs;
    memset(&regs, 0, sizeof regs);
    regs.size = sizeof regs;
    regs.cpl = (in_u8(&in) & 1) ? 3 : 0;
    regs.rip = (uint64_t)in_u16(&in) << 3;
    regs.cr0 = (in_u8(&in) & 1) ? (UINT64_C(1) << 31) | (UINT64_C(1) << 16) : 0;
    regs.cr3 = ((uint64_t)in_u8(&in) << 12) & (RAM - 1);
    regs.cr4 = (uint64_t)(in_u8(&in) & 3) << 20;
    regs.efer = (in_u8(&in) & 1) ? NPT_EFER_NXE : 0;
    regs.lstar = (uint64_t)in_u16(&in) << 3;
    regs.fault_handler = (uint64_t)in_u16(&in) << 3;
    for (int i = 0; i < 16; i++) regs.gpr[i] = in_addr(&in);
    /* The rest is guest memory, from address 0, repeated into the page-table area too. */
    size_t rest = in.n - in.i;
    if (rest > RAM / 2) rest = RAM / 2;
    if (rest) {
        checked(npt_vm_write_memory(vm, 0, in.p + in.i, rest));
        checked(npt_vm_write_memory(vm, RAM / 2, in.p + in.i, rest));
    }
    npt_vcpu *cpu;
    FUZZ_ASSERT(checked(npt_vcpu_create(vm, 0, &cpu)) == NPT_OK);
    if (checked(npt_vcpu_set_regs(cpu, &regs)) == NPT_OK) {
        for (int k = 0; k < 8; k++) {
            npt_exit e = { .size = sizeof e };
            npt_status s;
            if (k % 3 == 2) {
                s = checked(npt_vcpu_run_raw(cpu, &e));
                if (s == NPT_OK) {
                    uint32_t action = 99;
                    if (checked(npt_handle_exit(cpu, &e, &action)) == NPT_OK) FUZZ_ASSERT(action <= NPT_ACTION_TOOL);
                }
            } else {
                s = checked(npt_vcpu_run(cpu, &e));
            }
            if (s != NPT_OK) break;
            FUZZ_ASSERT(e.reason <= NPT_EXIT_PRIVILEGED_FAILED);
            if (e.reason == NPT_EXIT_MBEC_VIOLATION || e.reason == NPT_EXIT_GUEST_FAULT)
                checked(npt_vcpu_inject_fault(cpu, e.vector % 32, e.qualification, e.gva));
            if (k == 4 && (flags & 0x10)) checked(npt_vcpu_raise_privileged(cpu));
        }
    }
    npt_stats st = { .size = sizeof st };
    FUZZ_ASSERT(checked(npt_vm_get_stats(vm, &st)) == NPT_OK);
    FUZZ_ASSERT(checked(npt_vm_destroy(vm)) == NPT_OK);
    return 0;
}
