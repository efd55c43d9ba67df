/*
 * kernel.S - a tiny guest kernel with a user process, for the KVM plugin's MBEC tests (GNU as).
 * Build: sh build.sh (writes kernel_guest.h next to hello_guest.h).
 *
 * A flat image loaded at guest-physical KERNEL_BASE = 0x1000, 4 KiB pages, identity-mapped by its
 * own page tables (VA == GPA). The host starts it in 64-bit mode at CPL 0 with
 *   cr0 = PG|PE|..., cr3 = 0x1000, cr4 = PAE, efer = LME|LMA, rip = 0x6000, rsp = 0x8000,
 *   r14 = K (number of "write" system calls the user process makes),
 *   r15 = probe: 0 none, 1 the user process jumps into a kernel page, 2 the kernel jumps into a
 *         user page, 3 the kernel writes 0xCC to its own code page at KCODE + 0xF00 (all after
 *         the K system calls).
 *
 * System calls enter the kernel through INT3 (vector 3, an interrupt gate of DPL 3) and return
 * with IRETQ. On this machine's KVM a user-mode SYSCALL loads RIP = LSTAR but stays at CPL 3,
 * INT n (n != 3) raises #UD, and SYSENTER raises #UD (AMD, long mode); exception delivery (INT3,
 * #UD, #PF, ...) from CPL 3 does switch to CPL 0 through the IDT and the TSS's RSP0 (see
 * Plugins/KVM/README.md, "User mode on this machine's KVM").
 *   eax = 1  write: the kernel OUTs the byte in dil to port 0xE9
 *   eax = 60 exit:  the kernel HLTs (probe 2: it jumps to the user page instead; probe 3: it
 *                   writes to KCODE + 0xF00 first)
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
    .set KERNEL_BASE, 0x1000
    .set GDT, 0x5000
    .set TSS, 0x5100
    .set IDT, 0x5200
    .set DESC, 0x5400
    .set KCODE, 0x6000
    .set KSYS, 0x6100
    .set KFAULT, 0x6200
    .set KSTUBS, 0x6300
    .set KSTACK_TOP, 0x8000
    .set KFUNC, 0x8000
    .set USER, 0x9000
    .set USTACK_TOP, 0xB000

    .text
pml4:                                   /* 0x1000 */
    .quad 0x2000 + 7
    .org 0x2000 - KERNEL_BASE
pdpt:
    .quad 0x3000 + 7
    .org 0x3000 - KERNEL_BASE
pd:
    .quad 0x4000 + 7
    .org 0x4000 - KERNEL_BASE
pt:                                     /* P|W = 3 (supervisor), P|W|U = 7 (user) */
    .quad 0                             /* 0x0000 not mapped */
    .quad 0x1000 + 3, 0x2000 + 3, 0x3000 + 3, 0x4000 + 3
    .quad 0x5000 + 3, 0x6000 + 3, 0x7000 + 3
    .quad 0x8000 + 7, 0x9000 + 7, 0xA000 + 7

    .org GDT - KERNEL_BASE
gdt:
    .quad 0
    .quad 0x00af9a000000ffff            /* 0x08 */
    .quad 0x00af9a000000ffff            /* 0x10 kernel CS */
    .quad 0x00cf92000000ffff            /* 0x18 kernel DS/SS */
    .quad 0x00cffa000000ffff            /* 0x20 user CS (32-bit) */
    .quad 0x00cff2000000ffff            /* 0x28 user DS/SS: 0x2b */
    .quad 0x00affa000000ffff            /* 0x30 user CS: 0x33 */
    .quad 103 | (TSS << 16) | (0x89 << 40) /* 0x38 TSS (available 64-bit TSS) */
    .quad 0

    .org TSS - KERNEL_BASE
tss:
    .long 0
    .quad KSTACK_TOP                    /* RSP0 */
    .org TSS + 102 - KERNEL_BASE
    .word 104                           /* no I/O bitmap */

    .macro gate h, attr
    .quad ((\h) & 0xffff) | (0x10 << 16) | ((\attr) << 40) | ((((\h) >> 16) & 0xffff) << 48)
    .quad 0
    .endm
    .org IDT - KERNEL_BASE
idt:
    .set v, 0
    .rept 32
    .if v == 3
    gate KSYS, 0xee                     /* INT3: the system call, DPL 3 */
    .else
    gate KSTUBS+16*v, 0x8e
    .endif
    .set v, v + 1
    .endr

    .org DESC - KERNEL_BASE
gdtr:
    .word 0x47
    .quad GDT
idtr:
    .word 32 * 16 - 1
    .quad IDT

    .code64
    .org KCODE - KERNEL_BASE
kentry:
    lgdt DESC
    lidt DESC + 10
    mov $0x38, %ax
    ltr %ax
    mov $KSTACK_TOP, %rsp
    pushq $0x2b                         /* SS */
    pushq $USTACK_TOP                   /* RSP */
    pushq $0x2                          /* RFLAGS */
    pushq $0x33                         /* CS */
    pushq $USER                         /* RIP */
    iretq

    .org KSYS - KERNEL_BASE
ksys:                                   /* INT3 from the user process */
    cmp $1, %eax
    jne 1f
    mov %edi, %eax
    out %al, $0xE9
    iretq
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
4:  movb $0xCC, KCODE + 0xF00           /* probe 3: the kernel writes its own code page */
    hlt
    jmp .
3:  mov $0xff, %al
    out %al, $0xEF
    hlt
    jmp .

    .org KFAULT - KERNEL_BASE
kfault:
    pop %rax
    out %al, $0xEF
1:  hlt
    jmp 1b

    .org KSTUBS - KERNEL_BASE
    .set v, 0
    .rept 32
    .balign 16
    pushq $v
    jmp kfault
    .set v, v + 1
    .endr

    .org KFUNC - KERNEL_BASE
kfunc:
    mov $'K', %al
    out %al, $0xE9
    hlt
    jmp .

    .org USER - KERNEL_BASE
user:
    mov $'0', %bl
    mov %r14, %r12
1:  test %r12, %r12
    jz 2f
    movzbl %bl, %edi
    mov $1, %eax
    int3                                /* write(bl) */
    inc %bl
    cmp $'9' + 1, %bl
    jne 3f
    mov $'0', %bl
3:  dec %r12
    jmp 1b
2:  cmp $1, %r15
    jne 4f
    mov $KFUNC, %eax                    /* probe 1: the user process runs a kernel page */
    jmp *%rax
4:  mov $60, %eax
    int3                                /* exit */
    jmp .
