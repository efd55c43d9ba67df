/*
 * pmem.S - the KVM plugin's NVDIMM test guest (GNU as). Build: sh build.sh (writes pmem_guest.h).
 *
 * A flat image loaded at guest-physical BASE = 0x10000 (the test writes it there with
 * npt_vm_write_memory), with its own page tables (CR3 = 0x10000):
 *   0x10000 PML4   entry 0 -> PDPT
 *   0x11000 PDPT   entry 0 -> PD0, entry 1 -> PD1
 *   0x12000 PD0    a 2 MiB page identity-mapping [0, 2 MiB) (RAM: code, stack)
 *   0x13000 PD1    512 2 MiB pages identity-mapping [1 GiB, 2 GiB) (the NVDIMM range and the vFHA)
 *   0x14000 clwb_entry       the loop below, writing back with CLWB        (66 0F AE /6)
 *   0x14100 clflushopt_entry the same with CLFLUSHOPT                      (66 0F AE /7)
 *   0x14200 clflush_entry    the same with CLFLUSH                         (0F AE /7)
 *   0x14300 jump_entry       jumps to rdi (the NVDIMM range): a fetch from it
 *   0x14400 tail_entry       the CLFLUSHOPT loop, then the NVDIMM scenario's tail: record N only
 *                            stored (OUT N on NVDIMM_PORT_STORED_ONLY), record N + 1 stored, written
 *                            back and fenced but not flushed (OUT N + 1 on NVDIMM_PORT_FENCED_ONLY)
 * Inputs (set by the test; the NVDIMM scenario's protocol, ../include/scenario_protocol.h): rdi = the
 * NVDIMM range's guest-physical base, rsi = the vFHA,
 * rcx = N (> 0). For i = 0 .. N-1 the guest writes the 16-byte record {MAGIC, i} to the
 * 64-byte line rdi + 64 * i, writes the line back, SFENCEs, writes 1 to the vFHA (the flush: it
 * exits where the vFHA is trapped) and OUTs i (low byte) to port 0xE9. Then HLT.
 * Long mode at CPL 0 as for hello.S: cr0 = PG|PE|..., cr3 = 0x10000, cr4 = PAE, efer = LME|LMA,
 * rsp = 0x8000.
 */
#include "../include/scenario_protocol.h"
    .globl BASE, CR3, MAGIC, clwb_entry, clflushopt_entry, clflush_entry, jump_entry, tail_entry
    .set BASE, 0x10000
    .set MAGIC, NVDIMM_RECORD_MAGIC
    .text
    .set CR3, pml4
pml4:
    .quad BASE + 0x1000 + 0x7          /* -> PDPT */
    .org 0x1000
pdpt:
    .quad BASE + 0x2000 + 0x7          /* [0, 1 GiB) -> PD0 */
    .quad BASE + 0x3000 + 0x7          /* [1 GiB, 2 GiB) -> PD1 */
    .org 0x2000
pd0:
    .quad 0x0 + 0x83                   /* present | writable | 2 MiB page at 0 */
    .org 0x3000
pd1:
    .set i, 0
    .rept 512
    .quad 0x40000000 + i * 0x200000 + 0x83
    .set i, i + 1
    .endr

    /* RECORD i: the record {MAGIC, i} stored to its line rdi + 64 i, whose address stays in rdx */
    .macro RECORD i
    mov \i, %rdx
    shl $6, %rdx
    add %rdi, %rdx                     /* the record's line */
    movabs $MAGIC, %rax
    mov %rax, (%rdx)
    mov \i, 8(%rdx)
    .endm

    .macro PMEM_LOOP flush
    xor %ebx, %ebx                     /* i */
1:  RECORD %rbx
    \flush (%rdx)
    sfence
    movl $1, (%rsi)                    /* the flush hint write */
    mov %bl, %al
    out %al, $NVDIMM_PORT_DURABLE
    inc %rbx
    cmp %rcx, %rbx
    jb 1b
    .endm

    /* LOOP_ENTRY name, flush: the records at `name`, written back with `flush`, then HLT */
    .macro LOOP_ENTRY name, flush
\name:
    PMEM_LOOP \flush
    hlt
    .endm

    .code64
    .org 0x4000
    LOOP_ENTRY clwb_entry, clwb              /* GPA 0x14000 */
    .org 0x4100
    LOOP_ENTRY clflushopt_entry, clflushopt  /* GPA 0x14100 */
    .org 0x4200
    LOOP_ENTRY clflush_entry, clflush        /* GPA 0x14200 */
    .org 0x4300
jump_entry:                            /* GPA 0x14300 */
    jmp *%rdi
    .org 0x4400
tail_entry:                            /* GPA 0x14400 */
    PMEM_LOOP clflushopt
    RECORD %rcx                        /* record N: stored only */
    mov %cl, %al
    out %al, $NVDIMM_PORT_STORED_ONLY
    inc %rcx
    RECORD %rcx                        /* record N + 1: stored, written back, fenced; no flush */
    clflushopt (%rdx)
    sfence
    mov %cl, %al
    out %al, $NVDIMM_PORT_FENCED_ONLY
    hlt
