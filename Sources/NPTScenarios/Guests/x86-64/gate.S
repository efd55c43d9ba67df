/*
 * gate.S - two vCPUs in different MBEC hierarchies in one VM, for the KVM plugin's layout gate
 * (GNU as; sh build.sh writes gate_guest.h).
 *
 * A flat image loaded at guest-physical 0x1000, identity-mapped by its own page tables. No GDT,
 * IDT or stack: the host sets the segments (npt_vcpu_set_regs, the plugin's long-mode convention)
 * and neither loop takes an exception.
 *   vCPU 0, CPL 0, rip = 0x5000: counts in rbx and OUTs the count to port 0x10, forever.
 *   vCPU 1, CPL 3, rip = 0x6000: increments the quadword at 0x7000 (a user OUT takes #GP on this
 *     KVM, so its progress is in memory) until the host writes non-zero at 0x7008, then jumps to
 *     0x5000: a kernel page the guest's page tables let user mode at (U/S = 1), so only the MBEC
 *     policy (R|SX there) keeps it out. Should it run there at CPL 3 it writes 0xBAD at 0x7010
 *     before its OUT faults.
 * Pages (guest page-table U/S in brackets):
 *   0x1000 PML4, 0x2000 PDPT, 0x3000 PD, 0x4000 PT   [S]
 *   0x5000 kernel code                               [U]
 *   0x6000 user code                                 [U]
 *   0x7000 data: user counter, go flag, marker       [U]
 */
    .globl BASE, CR3, kernel, user, data, END, PORT
    .set BASE, 0x1000
    .set END, 0x8000
    .set PORT, 0x10                     /* vCPU 0's count */
    .text
    .set CR3, pml4
pml4:
    .quad 0x2000 + 7
    .org 0x2000 - BASE
    .quad 0x3000 + 7
    .org 0x3000 - BASE
    .quad 0x4000 + 7
    .org 0x4000 - BASE
    .quad 0
    .quad 0x1000 + 3, 0x2000 + 3, 0x3000 + 3, 0x4000 + 3
    .quad 0x5000 + 7, 0x6000 + 7, 0x7000 + 7

    .org 0x5000 - BASE
kernel:
    mov %cs, %eax
    and $3, %eax
    jz 1f
    movq $0xBAD, 0x7010
1:  inc %rbx
    mov %ebx, %eax
    out %eax, $PORT
    jmp 1b

    .org 0x6000 - BASE
user:
    incq 0x7000
    cmpq $0, 0x7008
    je user
    mov $0x5000, %eax
    jmp *%rax

    .org 0x7000 - BASE
data:
    .quad 0, 0, 0
    .org END - BASE
