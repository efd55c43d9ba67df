/*
 * hvci.S - the HVCI-like MBEC scenario's x86-64 guest (GNU as through the C preprocessor; the
 * protocol is HVCI_* of ../include/scenario_protocol.h, which the simulator's image of the same
 * scenario follows too). Sources/NPTScenarios/HVCIScenario.swift drives it.
 *
 * A flat image loaded at guest-physical BASE = 0x1000, 4 KiB pages, identity-mapped by its own page
 * tables, plus JIT_ALIAS. The host starts it in 64-bit mode at CPL 0 with rip = CODE, rsp =
 * KSTACK_TOP, cr3 = CR3, r14 = K, r15 = attacks (0 or 1). The kernel loads its GDT, IDT and TSS
 * (system.inc) and drops to the user process, which makes K "write" system calls (INT3: on this
 * machine's KVM a user-mode SYSCALL does not reach CPL 0; the kernel OUTs rdi = 1 .. K on
 * HVCI_PORT_PRINT), then, with r15 = 1, the two attacks:
 *   1. r9 = AFTER1; jump to DRIVER: a kernel page the guest's page tables map U/S = 1, so only the
 *      MBEC policy (R|SX) keeps user mode out;
 *   2. r9 = AFTER2; the system call HVCI_SYS_EXPLOIT: the kernel jumps to JIT_ALIAS, a supervisor-
 *      mode alias (the kernel's direct map) of the user's JIT page (R|W|UX: user-execute only);
 * then the exit call: the kernel halts. A fault the kernel takes (the #VE the VMM injects after a
 * reported violation, or any other) goes to kfault: OUT its vector on HVCI_PORT_FAULT_VECTOR, OUT
 * the exception frame's rip on HVCI_PORT_FAULT_RIP, then IRETQ to the user process at r9.
 * The payload at DRIVER and at JIT (what a successful attack runs): at CPL 0, OUT HVCI_PWNED on
 * HVCI_PORT_PWNED and HLT; at CPL 3 (a user OUT takes #GP on this machine's KVM: Plugins/KVM/README.md)
 * the system call HVCI_SYS_PWNED, whose kernel does the same.
 * The entry attack (issue 9's ret2dir through the IDT) needs two kernel data writes, made by the
 * driver from the image's description: the PTE of ALIAS_SLOT (in the page table PT) made a
 * supervisor-mode alias of JIT, and IDT vector 3 (the system call, at IDT) pointed at ALIAS_SLOT.
 *
 * Pages (guest page-table U/S in brackets):
 *   0x1000 PML4, 0x2000 PDPT, 0x3000 PD, 0x4000 PT    [S] page tables
 *   0x5000 GDT, TSS, IDT                              [S] system tables
 *   0x6000 kernel code                                [S]
 *   0x7000 kernel stack (top 0x8000 = TSS.RSP0)       [S]
 *   0x8000 DRIVER: the payload                        [U]
 *   0x9000 user code                                  [U]
 *   0xA000 user stack (top 0xB000)                    [U]
 *   0xB000 ALIAS_SLOT: not mapped
 *   0xC000 JIT: the payload                           [U]
 *   0xD000 JIT_ALIAS -> frame 0xC000                  [S]
 */
#include "../include/scenario_protocol.h"
#include "system.inc"
    .globl BASE, CR3, PT, SYSTEM, IDT, CODE, KSTACK_TOP, DRIVER, USER, USTACK, ALIAS_SLOT, JIT, JIT_ALIAS, END
    .set BASE, 0x1000
    .set PT, 0x4000
    .set SYSTEM, 0x5000
    .set IDT, SYSTEM + 0x200
    .set CODE, 0x6000                   /* kernel code; the entry point */
    .set KSYS, CODE + 0x100
    .set KFAULT, CODE + 0x200
    .set KSTUBS, CODE + 0x300
    .set KSTACK_TOP, 0x8000
    .set DRIVER, 0x8000
    .set USER, 0x9000
    .set AFTER1, USER + 0x100
    .set AFTER2, USER + 0x200
    .set USTACK, 0xA000
    .set USTACK_TOP, USTACK + 0x1000
    .set ALIAS_SLOT, 0xB000
    .set JIT, 0xC000
    .set JIT_ALIAS, 0xD000
    .set END, 0xE000

    .text
    .set CR3, pml4
    PAGE_TABLE_CHAIN BASE, PT
    .quad 0                             /* 0x0000 not mapped */
    .quad 0x1000 + 3, 0x2000 + 3, 0x3000 + 3, 0x4000 + 3
    .quad SYSTEM + 3, CODE + 3, 0x7000 + 3
    .quad DRIVER + 7, USER + 7, USTACK + 7
    .quad 0                             /* ALIAS_SLOT */
    .quad JIT + 7
    .quad JIT + 3                       /* JIT_ALIAS: the kernel's direct map of the JIT page */

    SYSTEM_PAGE SYSTEM, BASE, KSTACK_TOP, KSYS, KSTUBS

    KERNEL_ENTRY CODE, BASE, SYSTEM, KSTACK_TOP, USTACK_TOP, USER

    .org KSYS - BASE
ksys:                                   /* INT3 from the user process: eax = the call */
    cmp $HVCI_SYS_WRITE, %eax
    jne 1f
    mov %edi, %eax
    out %eax, $HVCI_PORT_PRINT
    iretq
1:  cmp $HVCI_SYS_EXPLOIT, %eax
    jne 2f
    mov $JIT_ALIAS, %eax                /* attack 2: the kernel runs the user's JIT page */
    jmp *%rax
2:  cmp $HVCI_SYS_PWNED, %eax
    je 3f
    hlt                                 /* HVCI_SYS_EXIT (and anything else) */
    jmp .
3:  mov $HVCI_PWNED, %eax               /* a payload ran in user mode */
    out %eax, $HVCI_PORT_PWNED
    hlt
    jmp .

    .org KFAULT - BASE
kfault:                                 /* a fault: report it, resume the user process at r9 */
    pop %rax                            /* the vector, pushed by its stub */
    out %eax, $HVCI_PORT_FAULT_VECTOR
    mov (%rsp), %rax                    /* the exception frame's rip */
    out %eax, $HVCI_PORT_FAULT_RIP
    mov $KSTACK_TOP, %rsp
    IRET_TO_USER USTACK_TOP, %r9

    .org KSTUBS - BASE
    .set v, 0
    .rept 32
    .balign 16
    .if v == 8 || (v >= 10 && v <= 14) || v == 17 || v == 21 || v == 29 || v == 30
    add $8, %rsp                        /* the error code */
    .endif
    pushq $v
    jmp kfault
    .set v, v + 1
    .endr

    .macro PAYLOAD
    mov %cs, %eax
    test $3, %al
    jnz 1f
    mov $HVCI_PWNED, %eax
    out %eax, $HVCI_PORT_PWNED
    hlt
    jmp .
1:  mov $HVCI_SYS_PWNED, %eax
    int3
    jmp .
    .endm

    .org DRIVER - BASE
driver:
    PAYLOAD

    .org USER - BASE
user:
    mov $1, %edi
1:  cmp %r14, %rdi
    ja 2f
    mov $HVCI_SYS_WRITE, %eax
    int3                                /* write(rdi) */
    inc %edi
    jmp 1b
2:  test %r15, %r15
    jz after2
    mov $AFTER1, %r9d
    mov $DRIVER, %eax                   /* attack 1: the user process runs the driver page */
    jmp *%rax
    .org AFTER1 - BASE
after1:
    mov $AFTER2, %r9d
    mov $HVCI_SYS_EXPLOIT, %eax
    int3                                /* attack 2, inside the kernel */
    jmp .
    .org AFTER2 - BASE
after2:
    mov $HVCI_SYS_EXIT, %eax
    int3                                /* exit */
    jmp .

    .org JIT - BASE
jit:
    PAYLOAD
    .org END - BASE
