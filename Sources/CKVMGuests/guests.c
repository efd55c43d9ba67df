#include "ckvmguests.h"
#include "../../Sources/NPTScenarios/Guests/x86-64/hello_guest.h"
#include "../../Sources/NPTScenarios/Guests/x86-64/kernel_guest.h"
#include "../../Sources/NPTScenarios/Guests/x86-64/pmem_guest.h"
#include "../../Sources/NPTScenarios/Guests/x86-64/priv_guest.h"

nptk_guest nptk_guest_hello(uint64_t *long_entry) {
    *long_entry = HELLO_GUEST_LONG_ENTRY;
    return (nptk_guest){hello_guest, sizeof hello_guest, HELLO_GUEST_BASE, HELLO_GUEST_CR3};
}

nptk_guest nptk_guest_kernel(uint64_t *entry, uint64_t *kernel_code, uint64_t *kernel_stack, uint64_t *kfunc,
                             uint64_t *user_code, uint64_t *user_stack) {
    *entry = KERNEL_GUEST_CODE;
    *kernel_code = KERNEL_GUEST_CODE;
    *kernel_stack = KERNEL_GUEST_STACK;
    *kfunc = KERNEL_GUEST_KFUNC;
    *user_code = KERNEL_GUEST_USER;
    *user_stack = KERNEL_GUEST_USTACK;
    return (nptk_guest){kernel_guest, sizeof kernel_guest, KERNEL_GUEST_BASE, KERNEL_GUEST_CR3};
}

nptk_guest nptk_guest_pmem(uint64_t *clflushopt_entry) {
    *clflushopt_entry = PMEM_GUEST_CLFLUSHOPT_ENTRY;
    return (nptk_guest){pmem_guest, sizeof pmem_guest, PMEM_GUEST_BASE, PMEM_GUEST_CR3};
}

nptk_guest nptk_guest_priv(uint64_t *heartbeats, nptk_guest *region, uint64_t *entry_offset, uint64_t *count_offset) {
    *heartbeats = PRIV_GUEST_HEARTBEATS;
    *region = (nptk_guest){priv_guest_region, sizeof priv_guest_region, PRIV_GUEST_REGION, 0};
    *entry_offset = PRIV_GUEST_REGION_ENTRY;
    *count_offset = PRIV_GUEST_REGION_COUNT;
    return (nptk_guest){priv_guest, sizeof priv_guest, PRIV_GUEST_BASE, 0};
}
