/* The KVM plugin's test guests (Plugins/KVM/Guest: assembly source, build.sh, committed bytes),
 * for the CLI's KVM benchmark. */
#ifndef CKVMGUESTS_H
#define CKVMGUESTS_H
#include <stddef.h>
#include <stdint.h>

typedef struct nptk_guest {
    const unsigned char *bytes;
    size_t length;
    uint64_t base;   /* guest-physical address of bytes[0] */
    uint64_t cr3;    /* its page tables */
} nptk_guest;

/* hello.S: long-mode entry prints "hello" on port 0xE9 and halts. */
nptk_guest nptk_guest_hello(uint64_t *long_entry);
/* kernel.S: GDT/IDT/TSS, a user process making r14 "write" system calls (INT3), probe in r15. */
nptk_guest nptk_guest_kernel(uint64_t *entry, uint64_t *kernel_code, uint64_t *kernel_stack, uint64_t *kfunc,
                             uint64_t *user_code, uint64_t *user_stack);
/* pmem.S: rdi = NVDIMM gpa, rsi = vFHA, rcx = records; store, CLFLUSHOPT, SFENCE, vFHA write, OUT. */
nptk_guest nptk_guest_pmem(uint64_t *clflushopt_entry);
#endif
