/*
 * kernel.S - a tiny guest kernel with a user process, for the KVM plugin's MBEC tests (GNU as).
 * Build: sh build.sh (writes kernel_guest.h; its macros KERNEL_GUEST_<SYMBOL> are the global symbols).
 *
 * A flat image loaded at guest-physical BASE = 0x1000, 4 KiB pages, identity-mapped by its
 * own page tables (VA == GPA). The host starts it in 64-bit mode at CPL 0 with
 *   cr0 = PG|PE|..., cr3 = 0x1000, cr4 = PAE, efer = LME|LMA, rip = 0x6000, rsp = 0x8000,
 *   r14 = K (number of "write" system calls the user process makes),
 *   r15 = probe: 0 none, 1 the user process jumps into a kernel page, 2 the kernel jumps into a
 *         user page, 3 the kernel writes 0xCC to its own code page at CODE + 0xF00 (all after
 *         the K system calls).
 *
 * System calls enter the kernel through INT3 (vector 3, an interrupt gate of DPL 3) and return
 * with IRETQ. On this machine's KVM a user-mode SYSCALL loads RIP = LSTAR but stays at CPL 3,
 * INT n (n != 3) raises #UD, and SYSENTER raises #UD (AMD, long mode); exception delivery (INT3,
 * #UD, #PF, ...) from CPL 3 does switch to CPL 0 through the IDT and the TSS's RSP0 (see
 * Plugins/KVM/README.md, "User mode on this machine's KVM").
 *   eax = 1  write: the kernel OUTs the byte in dil to port 0xE9
 *   eax = 60 exit:  the kernel HLTs (probe 2: it jumps to the user page instead; probe 3: it
 *                   writes to CODE + 0xF00 first)
 * A fault the kernel does not expect OUTs its vector to port 0xEF and HLTs.
 *
 * Pages (guest page-table U/S in brackets):
 *   0x1000 PML4, 0x2000 PDPT, 0x3000 PD, 0x4000 PT          [S] page tables
 *   0x5000 GDT (Linux selectors, TSS at 0x38), TSS, IDT    [S] system tables
 *   0x6000 kernel code                                     [S]
 *   0x7000 kernel stack (top 0x8000 = TSS.RSP0)            [S]
 *   0x8000 kfunc: kernel code that prints "K" and HLTs      [U] (a mis-mapped kernel page: the
 *          guest's page tables let user mode at it; only the MBEC policy keeps user mode out)
 *   0x9000 user code                                       [U]
 *   0xA000 user stack (top 0xB000)                         [U]
 */
#include "system.inc"
    .globl BASE, CR3, SYSTEM, CODE, STACK, KFUNC, USER, USTACK, END
    .set BASE, 0x1000
    .set SYSTEM, 0x5000                 /* GDT, TSS, IDT */
    .set CODE, 0x6000                   /* kernel code; the entry point */
    .set KSYS, CODE + 0x100
    .set KFAULT, CODE + 0x200
    .set KSTUBS, CODE + 0x300
    .set STACK, 0x7000                  /* kernel stack page */
    .set KSTACK_TOP, STACK + 0x1000
    .set KFUNC, 0x8000                  /* kernel code the guest's page tables map U/S = 1 */
    .set USER, 0x9000                   /* user code */
    .set USTACK, 0xA000                 /* user stack */
    .set USTACK_TOP, USTACK + 0x1000
    .set END, 0xB000

    .text
    .set CR3, pml4
    PAGE_TABLE_CHAIN BASE, 0x4000
    .quad 0                             /* 0x0000 not mapped */
    .quad 0x1000 + 3, 0x2000 + 3, 0x3000 + 3, 0x4000 + 3
    .quad 0x5000 + 3, 0x6000 + 3, 0x7000 + 3
    .quad 0x8000 + 7, 0x9000 + 7, 0xA000 + 7

    SYSTEM_PAGE SYSTEM, BASE, KSTACK_TOP, KSYS, KSTUBS

    KERNEL_ENTRY CODE, BASE, SYSTEM, KSTACK_TOP, USTACK_TOP, USER

    SYSCALL_WRITE BASE, KSYS
1:  cmp $60, %eax
    jne 3f
    cmp $2, %r15
    jae 2f                              /* (jae, not je: the HLT stays at 0x6116) */
    hlt
    jmp .
2:  cmp $3, %r15
    je 4f
    mov $USER, %eax                     /* probe 2: the kernel runs a user page */
    jmp *%rax
4:  movb $0xCC, CODE + 0xF00           /* probe 3: the kernel writes its own code page */
    hlt
    jmp .
3:  mov $0xff, %al
    out %al, $0xEF
    hlt
    jmp .

    FAULT_STUBS BASE, KFAULT, KSTUBS

    KFUNC_AND_USER_LOOP BASE, KFUNC, USER
4:  mov $60, %eax
    int3                                /* exit */
    jmp .
