/*
 * pmem.S - the KVM plugin's NVDIMM test guest (GNU as). Build: sh build.sh (writes pmem_guest.h).
 *
 * A flat image loaded at guest-physical PMEM_BASE = 0x10000 (the test writes it there with
 * npt_vm_write_memory), with its own page tables (CR3 = 0x10000):
 *   0x10000 PML4   entry 0 -> PDPT
 *   0x11000 PDPT   entry 0 -> PD0, entry 1 -> PD1
 *   0x12000 PD0    a 2 MiB page identity-mapping [0, 2 MiB) (RAM: code, stack)
 *   0x13000 PD1    512 2 MiB pages identity-mapping [1 GiB, 2 GiB) (the NVDIMM range and the vFHA)
 *   0x14000 pmem_clwb        the loop below, writing back with CLWB        (66 0F AE /6)
 *   0x14100 pmem_clflushopt  the same with CLFLUSHOPT                      (66 0F AE /7)
 *   0x14200 pmem_clflush     the same with CLFLUSH                         (0F AE /7)
 *   0x14300 pmem_jump        jumps to rdi (the NVDIMM range): a fetch from it
 * Inputs (set by the test): rdi = the NVDIMM range's guest-physical base, rsi = the vFHA,
 * rcx = N (> 0). For i = 0 .. N-1 the guest writes the 16-byte record {PMEM_MAGIC, i} to the
 * 64-byte line rdi + 64 * i, writes the line back, SFENCEs, writes 1 to the vFHA (the flush: it
 * exits where the vFHA is trapped) and OUTs i (low byte) to port 0xE9. Then HLT.
 * Long mode at CPL 0 as for hello.S: cr0 = PG|PE|..., cr3 = 0x10000, cr4 = PAE, efer = LME|LMA,
 * rsp = 0x8000.
 */
    .set PMEM_BASE, 0x10000
    .set PMEM_MAGIC, 0x4e56444d4d2d4b56   /* "VK-MMDVN" little-endian: "NVDMM-KV" read as a number */
    .text
pml4:
    .quad PMEM_BASE + 0x1000 + 0x7     /* -> PDPT */
    .org 0x1000
pdpt:
    .quad PMEM_BASE + 0x2000 + 0x7     /* [0, 1 GiB) -> PD0 */
    .quad PMEM_BASE + 0x3000 + 0x7     /* [1 GiB, 2 GiB) -> PD1 */
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

    .macro PMEM_LOOP flush
    xor %ebx, %ebx                     /* i */
1:  mov %rbx, %rdx
    shl $6, %rdx
    add %rdi, %rdx                     /* the record's line */
    movabs $PMEM_MAGIC, %rax
    mov %rax, (%rdx)
    mov %rbx, 8(%rdx)
    \flush (%rdx)
    sfence
    movl $1, (%rsi)                    /* the flush hint write */
    mov %bl, %al
    out %al, $0xE9
    inc %rbx
    cmp %rcx, %rbx
    jb 1b
    hlt
    .endm

    .code64
    .org 0x4000
pmem_clwb:                             /* GPA 0x14000 */
    PMEM_LOOP clwb
    .org 0x4100
pmem_clflushopt:                       /* GPA 0x14100 */
    PMEM_LOOP clflushopt
    .org 0x4200
pmem_clflush:                          /* GPA 0x14200 */
    PMEM_LOOP clflush
    .org 0x4300
pmem_jump:                             /* GPA 0x14300 */
    jmp *%rdi
