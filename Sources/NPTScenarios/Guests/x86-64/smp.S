/*
 * smp.S - a tiny guest kernel for two vCPUs, each with a user process, for the KVM plugin's tests
 * of vCPUs in different hierarchies (issue 13) and of page-table coherence between its views
 * (GNU as). Build: sh build.sh (writes smp_guest.h beside it).
 *
 * A flat image loaded at guest-physical BASE = 0x1000, 4 KiB pages, identity-mapped by its own
 * page tables (VA == GPA, except the window page 0xC000). Every vCPU starts in 64-bit mode at CPL 0
 * with cr0 = PG|PE|..., cr3 = 0x1000, cr4 = PAE, efer = LME|LMA, rip = 0x6000 and
 *   rdi = its index (0 or 1: its TSS, kernel stack and user stack),
 *   r14 = K (number of "write" system calls its user process makes),
 *   r15 = probe: 0 none, 1 the user process jumps into a kernel page (0x8000), 2 the kernel jumps
 *         into the user page (on "exit"), 4 the page-table coherence probe (below).
 *
 * System calls enter the kernel through INT3 (a DPL-3 interrupt gate; this KVM's user-mode SYSCALL
 * does not reach CPL 0, kernel.S) and return with IRETQ:
 *   eax = 1  write: the kernel OUTs the byte in dil to port 0xE9
 *   eax = 2  remap: the PTE of the window page 0xC000 is pointed at 0xD000 (byte 'N'), INVLPG
 *   eax = 3  remap back: the PTE points at 0xB000 again (byte 'O'), and CR3 is reloaded with its own
 *            value (a flush no KVM statistic shows: Tests/probes/kvm/probe_flushstats.c)
 *   eax = 60 exit: the kernel HLTs (probe 2: it jumps to the user page instead)
 * A fault the kernel does not expect OUTs its vector to port 0xEF and HLTs.
 * Entries 0x6080 (`1: out %al, $0xE9; jmp 1b`) and 0x6090 (`1: movl %eax, 0xD000; jmp 1b`) are bare
 * CPL 0 loops for exit round trips (the benchmark, `nptkit-cli bench --only kvm`). Entry UOUTENTRY
 * (0x6600, CPL 0, vCPU 0 only) loads the system tables with the TSS TSSIO, whose I/O permission
 * bitmap allows port 0xE9 alone, and drops to UOUTLOOP (0x9800, CPL 3, IOPL 0): `1: out %al, $0xE9;
 * jmp 1b`, the same exit taken from user mode (this KVM exits with KVM_EXIT_IO for it, leaving
 * native user mode: Tests/probes/kvm/probe_exit.c 10; without the bitmap it is a #GP).
 *
 * Coherence probe (r15 = 4), after the K calls: the user process writes the byte at 0xC000, remaps,
 * writes it again, remaps back, writes it again: "ONO" when every view sees the kernel's page-table
 * changes at once (a view with a stale shadow of the page table prints "OOO" or "ONN").
 *
 * Pages (guest page-table U/S in brackets):
 *   0x1000 PML4, 0x2000 PDPT, 0x3000 PD, 0x4000 PT              [S] page tables
 *   0x5000 GDT (TSS descriptors 0x38, 0x48, 0x58), TSS0, TSS1, IDT, TSSIO [S] system tables
 *   0x6000 kernel code                                          [S]
 *   0x7000 kernel stacks (tops 0x7800 vCPU 0, 0x8000 vCPU 1)    [S]
 *   0x8000 kfunc: kernel code the guest's page tables map U/S = 1 (kernel.S's mis-mapped page) [U]
 *   0x9000 user code                                            [U]
 *   0xA000 user stacks (tops 0xA800, 0xB000)                    [U]
 *   0xB000 data 'O', 0xC000 the window (-> 0xB000 or 0xD000), 0xD000 data 'N'   [U]
 */
#include "system.inc"
    .globl BASE, CR3, SYSTEM, CODE, STACK, KFUNC, USER, USTACK, DATA, EXIT_HLT, OUTLOOP, MMIOLOOP, END
    .globl UOUTENTRY, UOUTLOOP
    .set BASE, 0x1000
    .set CR3, 0x1000                    /* pml4 */
    .set SYSTEM, 0x5000                 /* GDT, TSS0, TSS1, IDT */
    .set CODE, 0x6000                   /* kernel code; the entry point (rdi = vCPU index) */
    .set STACK, 0x7000                  /* kernel stacks */
    .set USTACK, 0xA000                 /* user stacks */
    .set DATA, 0xB000                   /* 0xB000 'O', 0xC000 the window, 0xD000 'N' */
    .set END, 0xE000
    .set PT, 0x4000
    .set GDT, 0x5000
    .set TSS0, 0x5100
    .set TSS1, 0x5180
    .set IDT, 0x5200
    .set DESC, 0x5400
    .set TSSIO, 0x5500                  /* a TSS with an I/O permission bitmap (UOUTENTRY) */
    .set KCODE, 0x6000
    .set OUTLOOP, 0x6080
    .set MMIOLOOP, 0x6090
    .set UOUTENTRY, 0x6600
    .set KSYS, 0x6100
    .set KFAULT, 0x6200
    .set KSTUBS, 0x6300
    .set KFUNC, 0x8000
    .set USER, 0x9000
    .set UOUTLOOP, 0x9800
    .set WINDOW, 0xC000

    .text
pml4:                                   /* 0x1000 */
    .quad 0x2000 + 7
    .org 0x2000 - BASE
pdpt:
    .quad 0x3000 + 7
    .org 0x3000 - BASE
pd:
    .quad 0x4000 + 7
    .org PT - BASE
pt:                                     /* P|W = 3 (supervisor), P|W|U = 7 (user) */
    .quad 0                             /* 0x0000 not mapped */
    .quad 0x1000 + 3, 0x2000 + 3, 0x3000 + 3, 0x4000 + 3
    .quad 0x5000 + 3, 0x6000 + 3, 0x7000 + 3
    .quad 0x8000 + 7, 0x9000 + 7, 0xA000 + 7, 0xB000 + 7
    .quad 0xB000 + 7                    /* 0xC000: the window, onto 0xB000 */
    .quad 0xD000 + 7

    .org GDT - BASE
gdt:
    .quad 0
    .quad 0x00af9a000000ffff            /* 0x08 */
    .quad 0x00af9a000000ffff            /* 0x10 kernel CS */
    .quad 0x00cf92000000ffff            /* 0x18 kernel DS/SS */
    .quad 0x00cffa000000ffff            /* 0x20 user CS (32-bit) */
    .quad 0x00cff2000000ffff            /* 0x28 user DS/SS: 0x2b */
    .quad 0x00affa000000ffff            /* 0x30 user CS: 0x33 */
    .quad 103 | (TSS0 << 16) | (0x89 << 40) /* 0x38 TSS of vCPU 0 (available 64-bit TSS) */
    .quad 0
    .quad 103 | (TSS1 << 16) | (0x89 << 40) /* 0x48 TSS of vCPU 1 */
    .quad 0
    .quad 136 | (TSSIO << 16) | (0x89 << 40) /* 0x58 TSSIO: limit 104 + 32 bitmap bytes + the terminator */
    .quad 0

    .org TSS0 - BASE
    .long 0
    .quad 0x7800                        /* RSP0 */
    .org TSS0 + 102 - BASE
    .word 104                           /* no I/O bitmap */
    .org TSS1 - BASE
    .long 0
    .quad 0x8000                        /* RSP0 */
    .org TSS1 + 102 - BASE
    .word 104

    .org IDT - BASE
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

    .org DESC - BASE
gdtr:
    .word 0x67
    .quad GDT
idtr:
    .word 32 * 16 - 1
    .quad IDT

    .org TSSIO - BASE
    .long 0
    .quad 0x7800                        /* RSP0 */
    .org TSSIO + 102 - BASE
    .word 104                           /* the I/O permission bitmap at +104: ports 0-255 */
    .rept 29
    .byte 0xff                          /* ports 0x00-0xE7: not allowed */
    .endr
    .byte 0xfd                          /* 0xE8-0xEF: only 0xE9 allowed (bit clear) */
    .byte 0xff, 0xff                    /* 0xF0-0xFF */
    .byte 0xff                          /* the terminating byte */

    .code64
    .org KCODE - BASE
kentry:
    lgdt DESC
    lidt DESC + 10
    mov %edi, %eax                      /* TR = 0x38 + 16 * index */
    shl $4, %eax
    add $0x38, %eax
    andb $0xFD, GDT + 5(%eax)           /* available again (busy after an earlier entry): re-entrant */
    ltr %ax
    mov %edi, %eax                      /* kernel stack: 0x7800 + 0x800 * index */
    shl $11, %eax
    add $0x7800, %eax
    mov %rax, %rsp
    mov %edi, %ecx                      /* user stack: 0xA800 + 0x800 * index */
    shl $11, %ecx
    add $0xA800, %ecx
    pushq $0x2b                         /* SS */
    push %rcx                           /* RSP */
    pushq $0x2                          /* RFLAGS */
    pushq $0x33                         /* CS */
    pushq $USER                         /* RIP */
    iretq

    /* Two CPL 0 loops for exit round trips (the benchmark's; no GDT/IDT needed): an OUT, and a
     * store to 0xD000 (an MMIO exit where that page is a KVM_MEM_READONLY memslot). */
    .org OUTLOOP - BASE
outloop:
    out %al, $0xE9
    jmp outloop
    .org MMIOLOOP - BASE
mmioloop:
    movl %eax, 0xD000
    jmp mmioloop

    SYSCALL_WRITE BASE, KSYS
1:  cmp $2, %eax
    jne 2f
    movq $0xD000 + 7, PT + 8 * (WINDOW >> 12)
    invlpg WINDOW
    iretq
2:  cmp $3, %eax
    jne 3f
    movq $0xB000 + 7, PT + 8 * (WINDOW >> 12)
    mov %cr3, %rax
    mov %rax, %cr3
    iretq
3:  cmp $60, %eax
    jne 5f
    cmp $2, %r15
    je 4f
EXIT_HLT:                               /* the kernel's HLT on "exit" */
    hlt
    jmp .
4:  mov $USER, %eax                     /* probe 2: the kernel runs a user page */
    jmp *%rax
5:  mov $0xff, %al
    out %al, $0xEF
    hlt
    jmp .

    FAULT_STUBS BASE, KFAULT, KSTUBS

    /* CPL 3 exit round trips: TSSIO, then the user-mode OUT loop (vCPU 0's kernel stack). */
    .org UOUTENTRY - BASE
uoutentry:
    lgdt DESC
    lidt DESC + 10
    andb $0xFD, GDT + 0x58 + 5          /* available again (busy after an earlier entry) */
    mov $0x58, %eax
    ltr %ax
    mov $0x7800, %esp
    IRET_TO_USER 0xA800, $UOUTLOOP

    KFUNC_AND_USER_LOOP BASE, KFUNC, USER
4:  cmp $4, %r15
    jne 5f
    movzbl WINDOW, %edi                 /* coherence probe: 'O' */
    mov $1, %eax
    int3
    mov $2, %eax                        /* remap (INVLPG) */
    int3
    movzbl WINDOW, %edi                 /* 'N' */
    mov $1, %eax
    int3
    mov $3, %eax                        /* remap back (CR3 reload) */
    int3
    movzbl WINDOW, %edi                 /* 'O' */
    mov $1, %eax
    int3
5:  mov $60, %eax
    int3                                /* exit */
    jmp .

    .org UOUTLOOP - BASE
uoutloop:                               /* CPL 3, port 0xE9 allowed by TSSIO's bitmap */
    out %al, $0xE9
    jmp uoutloop

    .org 0xB000 - BASE
    .byte 'O'
    .org 0xD000 - BASE
    .byte 'N'
    .org 0xE000 - BASE
