/* The KVM plugin's test guests (Plugins/KVM/Guest: assembly source, build.sh, committed bytes),
 * for the CLI's KVM benchmark and `demo --backend kvm`. */
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
/* priv.S (16-bit real mode, no page tables: cr3 0): the loop every vCPU runs (returned; bx = heartbeats
 * + 4 * index), and the privileged-mode region's contents (*region, at legacy SMRAM 0xA0000, entered at
 * *entry_offset; the handler's entry counter at region + *count_offset). Loop OUTs: 0x10 heartbeat (the
 * probe's low byte), 0x11 leak; handler OUTs: 0x20 entered (index), 0x21 heartbeats moved, 0x22 count. */
nptk_guest nptk_guest_priv(uint64_t *heartbeats, nptk_guest *region, uint64_t *entry_offset, uint64_t *count_offset);
#endif
