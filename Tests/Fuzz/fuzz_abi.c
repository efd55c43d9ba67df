/* libFuzzer target: sequences of C ABI calls with random arguments: sizes up to SIZE_MAX, addresses
 * at every edge, unknown enums, NULL, destroyed and forged handles, calls in any order. The input is
 * a program: each byte picks a call, the following bytes its arguments. Every call must answer with
 * an npt_status (and a reason when it fails); nothing may crash, hang, leak or touch memory it was
 * not given. Buffers handed to the library are as large as the length passed with them, except
 * lengths of 2^48 and more, which no guest memory reaches (the library must refuse those). */
#include "fuzz_common.h"

#define NVM 3
#define NCPU 6
#define BUF 8192

static uint8_t buf[BUF];
static npt_vm *vms[NVM];
static npt_vcpu *cpus[NCPU];
static npt_vm *dead_vm;
static npt_vcpu *dead_cpu;

static npt_vm *pick_vm(input *in) {
    uint8_t k = in_u8(in) % (NVM + 3);
    if (k < NVM) return vms[k];
    if (k == NVM) return dead_vm;
    if (k == NVM + 1) return (npt_vm *)(uintptr_t)0x4E5000000010u; /* forged: a handle-looking value */
    return NULL;
}
static npt_vcpu *pick_cpu(input *in) {
    uint8_t k = in_u8(in) % (NCPU + 3);
    if (k < NCPU) return cpus[k];
    if (k == NCPU) return dead_cpu;
    if (k == NCPU + 1) return (npt_vcpu *)(uintptr_t)0x4E5000000020u;
    return NULL;
}
/* A length for a buffer of BUF bytes: within it, or huge. */
static size_t buf_len(input *in) { return in_size(in, BUF); }

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    npt_context *ctx;
    FUZZ_ASSERT(npt_context_create(&ctx) == NPT_OK);
    memset(vms, 0, sizeof vms);
    memset(cpus, 0, sizeof cpus);
    input in = { data, size, 0 };
    for (int step = 0; step < 64 && !in_done(&in); step++) {
        uint8_t op = in_u8(&in) % 30;
        switch (op) {
        case 0: { /* vm_create */
            uint8_t slot = in_u8(&in) % NVM;
            if (vms[slot]) break;
            /* A budget always (without one a looping guest runs until it exits, as documented). */
            npt_vm_config cfg = { sizeof cfg, in_u8(&in) % 4, NULL, in_addr(&in), in_u16(&in) & 0x7FF, 1 + in_u16(&in) % 4096 };
            if (in_u8(&in) & 1) cfg.ram_size = (uint64_t)(1 + in_u8(&in) % 16) << 20;
            if (in_u8(&in) == 7) cfg.size = in_u8(&in);
            checked(npt_vm_create(ctx, &cfg, &vms[slot]));
            break;
        }
        case 1: { /* vm_destroy */
            npt_vm *vm = pick_vm(&in);
            npt_status s = checked(npt_vm_destroy(vm));
            if (s == NPT_OK) {
                int known = 0;
                for (int i = 0; i < NVM; i++)
                    if (vms[i] == vm) { vms[i] = NULL; known = 1; }
                FUZZ_ASSERT(known); /* only a live handle of ours can be destroyed */
                dead_vm = vm;
                for (int i = 0; i < NCPU; i++) cpus[i] = NULL; /* forget the vCPU handles (some died with it) */
                FUZZ_ASSERT(npt_vm_destroy(vm) == NPT_ERR_BAD_HANDLE);
            }
            break;
        }
        case 2: { /* vcpu_create */
            uint8_t slot = in_u8(&in) % NCPU;
            if (cpus[slot]) break;
            checked(npt_vcpu_create(pick_vm(&in), in_u8(&in) % 8, &cpus[slot]));
            break;
        }
        case 3: { /* vcpu_destroy */
            npt_vcpu *c = pick_cpu(&in);
            if (checked(npt_vcpu_destroy(c)) == NPT_OK) {
                for (int i = 0; i < NCPU; i++)
                    if (cpus[i] == c) cpus[i] = NULL;
                dead_cpu = c;
                FUZZ_ASSERT(npt_vcpu_destroy(c) == NPT_ERR_BAD_HANDLE);
            }
            break;
        }
        case 4: checked(npt_policy_set(pick_vm(&in), in_addr(&in), in_addr(&in), in_addr(&in), in_u16(&in) & 0xFFF)); break;
        case 5: {
            npt_policy_range r[8];
            size_t n = in_u8(&in) % 9;
            for (size_t i = 0; i < n; i++) r[i] = (npt_policy_range){ in_addr(&in), in_addr(&in), in_addr(&in), in_u16(&in) & 0x407 };
            size_t count = in_u8(&in) >= 0xF0 ? in_size(&in, 0) : n;
            if (count > n && count < ((size_t)1 << 48)) count = n; /* never more than the array holds */
            checked(npt_policy_set_ranges(pick_vm(&in), n ? r : NULL, count));
            break;
        }
        case 6: { uint64_t p; checked(npt_policy_get(pick_vm(&in), in_addr(&in), (in_u8(&in) & 7) ? &p : NULL)); break; }
        case 7: {
            npt_translation t = { .size = sizeof t };
            if (in_u8(&in) == 3) t.size = in_u8(&in);
            checked(npt_hierarchy_translate(pick_vm(&in), in_u8(&in) % 3, in_addr(&in), &t));
            break;
        }
        case 8: {
            size_t len = buf_len(&in);
            checked(npt_vm_write_memory(pick_vm(&in), in_addr(&in), (in_u8(&in) & 7) ? buf : NULL, len));
            break;
        }
        case 9: {
            size_t len = buf_len(&in);
            checked(npt_vm_read_memory(pick_vm(&in), in_addr(&in), (in_u8(&in) & 7) ? buf : NULL, len));
            break;
        }
        case 10: {
            npt_regs r;
            memset(&r, 0, sizeof r);
            r.size = sizeof r;
            r.cpl = in_u8(&in) % 5;
            r.rip = in_addr(&in);
            r.cr0 = in_u8(&in) & 1 ? UINT64_C(1) << 31 : 0;
            r.cr3 = in_addr(&in);
            r.fault_handler = in_addr(&in);
            checked(npt_vcpu_set_regs(pick_cpu(&in), &r));
            break;
        }
        case 11: { npt_regs r = { .size = sizeof r }; checked(npt_vcpu_get_regs(pick_cpu(&in), &r)); break; }
        case 12: case 13: {
            npt_exit e = { .size = sizeof e };
            npt_status s = checked(npt_vcpu_run(pick_cpu(&in), &e));
            if (s == NPT_OK) FUZZ_ASSERT(e.reason <= NPT_EXIT_PRIVILEGED_FAILED);
            break;
        }
        case 14: {
            npt_vcpu *c = pick_cpu(&in);
            npt_exit e = { .size = sizeof e };
            if (checked(npt_vcpu_run_raw(c, &e)) == NPT_OK) {
                uint32_t a;
                if (in_u8(&in) & 1) e.reason = in_u8(&in) % 14;
                checked(npt_handle_exit(c, &e, &a));
            }
            break;
        }
        case 15: {
            npt_exit e = { .size = sizeof e };
            e.reason = in_u16(&in) % 16;
            e.hierarchy = in_u8(&in) % 3;
            e.gpa = in_addr(&in);
            uint32_t a;
            checked(npt_handle_exit(pick_cpu(&in), &e, &a));
            break;
        }
        case 16: checked(npt_vcpu_inject_fault(pick_cpu(&in), in_u8(&in) % 40, in_u64(&in), in_addr(&in))); break;
        case 17: {
            uint8_t code[64];
            for (size_t i = 0; i < sizeof code; i++) code[i] = in_u8(&in);
            size_t len = in_u8(&in) >= 0xF0 ? in_size(&in, 0) : in_u8(&in) % 65;
            npt_region r = { sizeof r, 0, in_addr(&in), in_addr(&in), (in_u8(&in) & 7) ? code : NULL, len, in_addr(&in), in_u16(&in) & 0x407 };
            if (r.contents_len > sizeof code && r.contents_len < ((size_t)1 << 48)) r.contents_len = sizeof code;
            checked(npt_region_set(pick_vm(&in), &r));
            break;
        }
        case 18: checked(npt_vcpu_raise_privileged(pick_cpu(&in))); break;
        case 19: checked(npt_vcpu_leave_privileged(pick_cpu(&in))); break;
        case 20: { int d; checked(npt_vcpu_raise_interrupt(pick_cpu(&in), in_u16(&in) % 300, &d)); break; }
        case 21: checked(npt_vm_set_stop_timeout(pick_vm(&in), (in_u8(&in) & 1) ? UINT64_MAX : in_u32(&in) % 2000000)); break;
        case 22: {
            npt_nvdimm d = { sizeof d, in_u8(&in) % 4, in_addr(&in), in_addr(&in), in_addr(&in) };
            checked(npt_vm_add_nvdimm(pick_vm(&in), &d));
            break;
        }
        case 23: {
            size_t needed, len = buf_len(&in);
            checked(npt_vm_get_nfit(pick_vm(&in), (in_u8(&in) & 7) ? buf : NULL, len, (in_u8(&in) & 7) ? &needed : NULL));
            break;
        }
        case 24: {
            size_t needed, len = buf_len(&in);
            checked(npt_vm_get_nvdimm_ssdt(pick_vm(&in), (in_u8(&in) & 7) ? buf : NULL, len, &needed));
            break;
        }
        case 25: checked(npt_vm_set_flush_options(pick_vm(&in), in_u8(&in) % 4, in_u8(&in) & 1)); break;
        case 26: {
            uint32_t r, c;
            uint64_t a;
            checked(npt_vm_get_flush_target(pick_vm(&in), in_size(&in, 4), &r, &c, &a));
            break;
        }
        case 27: {
            npt_host_pmem_region r = { .size = sizeof r };
            checked(npt_vm_host_pmem_get(pick_vm(&in), in_size(&in, 4), &r));
            break;
        }
        case 28: { npt_stats s = { .size = sizeof s }; checked(npt_vm_get_stats(pick_vm(&in), &s)); break; }
        case 29: {
            npt_backend_info b = { .size = sizeof b };
            checked(npt_backend_get(ctx, in_size(&in, 3), &b));
            int64_t h;
            checked(npt_vm_privileged_holder(pick_vm(&in), &h));
            /* ABI 1.6: a vCPU's view, with a bad size or a NULL struct now and then */
            npt_privileged_view v;
            memset(&v, 0, sizeof v);
            v.size = (in_u8(&in) & 7) ? sizeof v : in_u8(&in) % 64;
            if (checked(npt_vcpu_privileged_view(pick_cpu(&in), (in_u8(&in) & 7) ? &v : NULL)) == NPT_OK)
                FUZZ_ASSERT(v.holder >= -1 && v.entries + v.failures <= v.requests && v.size >= 48);
            break;
        }
        }
    }
    for (int i = 0; i < NVM; i++)
        if (vms[i]) FUZZ_ASSERT(checked(npt_vm_destroy(vms[i])) == NPT_OK);
    FUZZ_ASSERT(checked(npt_context_destroy(ctx)) == NPT_OK);
    return 0;
}
