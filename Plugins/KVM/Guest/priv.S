/*
 * priv.S - the KVM plugin's privileged-mode (SMM-like) test guest, 16-bit real mode (GNU as).
 * Build: sh build.sh (also writes priv_guest.h). Two flat images:
 *
 * priv_loop (loaded at GPA 0x1000, run by every vCPU; real mode, CS = DS = 0):
 *   the test sets bx = 0x2000 + 4 * index (the vCPU's heartbeat counter) and rip = 0x1000.
 *   Loop: add 1 to the 32-bit counter at (bx); probe the region: read the dword at 0xA000:0000
 *   (GPA 0xA0000, the region's first bytes); if it is not 0xFFFFFFFF (what an unbacked GPA reads
 *   as on the KVM backend) OUT the value to port 0x11 (a leak: must never happen); every 64
 *   iterations OUT the probe's low byte to port 0x10 (the heartbeat: 0xFF).
 *
 * priv_region (the region's contents, at GPA 0xA0000 = legacy SMRAM; entered with CS = 0xA000,
 *   ip = 0, like SMM's real-mode-like entry state; eax = the vCPU's index):
 *   OUT eax to port 0x20 (entered); SS:SP = the region's top; sum the heartbeats at 0x2000..0x200F; spin; sum again;
 *   OUT the difference to port 0x21 (must be 0: the others are stopped); add 1 to its entry
 *   counter (in the region, offset 0x800) and OUT it to port 0x22; RSM.
 *   The region's first dword is the magic 0x4D4D5324 ("$SMM") that a probe must never see.
 */
    .set PRIV_LOOP_BASE, 0x1000
    .set HEARTBEATS, 0x2000
    .set REGION_SEG, 0xA000
    .text
    .code16
priv_loop:                            /* GPA 0x1000 */
    xor %ax, %ax
    mov %ax, %ds
    mov $REGION_SEG, %ax
    mov %ax, %es
1:  addl $1, (%bx)
    mov %es:0, %eax                   /* the probe */
    cmp $0xFFFFFFFF, %eax
    je 2f
    out %eax, $0x11                   /* the region leaked to a vCPU outside the mode */
2:  testb $0x3F, (%bx)
    jnz 1b
    out %al, $0x10                    /* heartbeat */
    jmp 1b

    .org 0x100
priv_rsm_outside:                     /* GPA 0x1100: RSM outside the mode (#UD) */
    rsm
    hlt
    .org 0x110
priv_ud_handler:                      /* GPA 0x1110: a real-mode #UD handler (IVT[6] = 0:0x1110) */
    mov $6, %al
    out %al, $0x23
    hlt

    .org 0x1000
priv_region:                          /* GPA 0xA0000, CS = 0xA000, ip = 0 */
    .long 0x4D4D5324                  /* "$SMM": the magic a probe must never read */
    .org 0x1008                       /* entry_offset 8 */
region_entry:
    out %eax, $0x20                   /* entered (eax = the vCPU's index) */
    xor %ax, %ax
    mov %ax, %ds
    mov $REGION_SEG, %ax
    mov %ax, %es
    mov %ax, %ss                      /* its own stack: the region's top (the KVM plugin's RSM */
    mov $0x1000, %sp                  /* detection pushes an exception frame there) */
    mov HEARTBEATS, %edx
    add HEARTBEATS + 4, %edx
    add HEARTBEATS + 8, %edx
    add HEARTBEATS + 12, %edx
    mov $200, %cx                     /* spin: others would move their heartbeats meanwhile */
3:  loop 3b
    mov HEARTBEATS, %eax
    add HEARTBEATS + 4, %eax
    add HEARTBEATS + 8, %eax
    add HEARTBEATS + 12, %eax
    sub %edx, %eax
    out %eax, $0x21                   /* how much the heartbeats moved: must be 0 */
    addl $1, %es:0x800
    mov %es:0x800, %eax
    out %eax, $0x22                   /* entry count */
    rsm
    .org 0x1800
entries:
    .long 0
    .org 0x2000
