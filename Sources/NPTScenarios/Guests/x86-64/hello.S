/*
 * hello.S - the KVM plugin's test guest (GNU as). Build: sh build.sh (writes hello_guest.h).
 *
 * A flat image loaded at guest-physical BASE = 0x1000 (the test writes it there with
 * npt_vm_write_memory). It carries its own page tables, so the host only points CR3 at them:
 *   0x1000 PML4    entry 0 -> PDPT
 *   0x2000 PDPT    entry 0 -> PD
 *   0x3000 PD      entry 0: a 2 MiB page identity-mapping [0, 2 MiB), supervisor, R/W, executable
 *   0x4000 long_entry  (64-bit, CPL 0): prints "hello" one byte per OUT to port 0xE9, then HLT
 *   0x4100 real_entry  (16-bit real mode, CS = 0): prints "R" to port 0xE9, then HLT
 *   0x4200 spin_entry  (64-bit): an endless loop, for kick tests
 *   0x4300 data_entry  (64-bit): prints the byte at 0x6000 ("D"), stores "W" at 0x6001, HLT
 *   0x4400 selfwrite_entry (64-bit): stores 0xCC over the byte at 0x4480 (its own code page, an
 *              int3 over a nop), prints "S", HLT (for the R/W tests: the page made R|SX)
 *   0x5000 nx_entry    (64-bit, a page of its own): prints "X", HLT (for fetch-violation tests)
 *   0x6000 data        "D" (a page of its own: a data page for the MBEC tests)
 * Entry points for npt_vcpu_set_regs (Plugins/KVM/README.md, "Conventions"):
 *   long mode: cr0 = PG|PE (|WP|NE|ET|MP), cr3 = 0x1000, cr4 = PAE, efer = LME|LMA, cpl 0,
 *              rip = 0x4000 (or 0x4200), rsp = 0x8000
 *   real mode: cr0 = 0, rip = 0x4100
 */
    .globl BASE, CR3, long_entry, real_entry, spin_entry, data_entry, selfwrite_entry, selfwrite_target
    .globl nx_entry, data
    .set BASE, 0x1000
    .text
    .set CR3, pml4
pml4:
    .quad BASE + 0x1000 + 0x7         /* present | writable | user -> PDPT */
    .org 0x1000
pdpt:
    .quad BASE + 0x2000 + 0x7         /* -> PD */
    .org 0x2000
pd:
    .quad 0x0 + 0x83                  /* present | writable | 2 MiB page at 0 */
    .org 0x3000

    .code64
long_entry:                           /* GPA 0x4000 */
    lea msg(%rip), %rsi
    mov $5, %ecx
1:  lodsb
    out %al, $0xE9
    loop 1b
    hlt
msg:
    .ascii "hello"

    .org 0x3100
    .code16
real_entry:                           /* GPA 0x4100 */
    mov $'R', %al
    out %al, $0xE9
    hlt

    .org 0x3200
    .code64
spin_entry:                           /* GPA 0x4200 */
    jmp spin_entry

    .org 0x3300
data_entry:                           /* GPA 0x4300 */
    movb 0x6000, %al
    out %al, $0xE9
    movb $'W', 0x6001
    hlt

    .org 0x3400
selfwrite_entry:                      /* GPA 0x4400 */
    movb $0xCC, 0x4480
    mov $'S', %al
    out %al, $0xE9
    hlt
    .org 0x3480
selfwrite_target:                     /* GPA 0x4480 */
    nop

    .org 0x4000
nx_entry:                             /* GPA 0x5000 */
    mov $'X', %al
    out %al, $0xE9
    hlt

    .org 0x5000
data:                                 /* GPA 0x6000 */
    .ascii "D"
