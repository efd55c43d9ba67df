/*
 * priv.S - the KVM plugin's privileged-mode (SMM-like) test guest, 16-bit real mode (GNU as).
 * Build: sh build.sh (writes priv_guest.h). Two flat images (the privileged-mode scenario's
 * protocol, ../include/scenario_protocol.h: ports PRIV_PORT_*):
 *
 * priv_guest (.text, loaded at GPA BASE = 0x1000, run by every vCPU; real mode, CS = DS = 0):
 *   the test sets bx = 0x2000 + 4 * index (the vCPU's heartbeat counter) and rip = 0x1000.
 *   Loop: add 1 to the 32-bit counter at (bx); probe the region: read the dword at 0xA000:0000
 *   (GPA 0xA0000, the region's first bytes); if it is not 0xFFFFFFFF (what an unbacked GPA reads
 *   as on the KVM backend) OUT the value to port 0x11 (a leak: must never happen); every 64
 *   iterations OUT the probe's low byte to port 0x10 (the heartbeat: 0xFF).
 *
 * priv_guest_region (section .region: the region's contents, at GPA REGION = 0xA0000 = legacy SMRAM; entered with CS = 0xA000,
 *   ip = 0, like SMM's real-mode-like entry state; eax = the vCPU's index):
 *   OUT eax to port 0x20 (entered); SS:SP = the region's top; sum the heartbeats at 0x2000..0x200F; spin; sum again;
 *   OUT the difference to port 0x21 (must be 0: the others are stopped); add 1 to its entry
 *   counter (in the region, offset region_count = 0x800) and OUT it to port 0x22; RSM.
 *   The region's first dword is the magic 0x4D4D5324 ("$SMM") that a probe must never see.
 */
#include "../include/scenario_protocol.h"
    .globl BASE, HEARTBEATS, REGION, REGION_MAGIC, rsm_outside, ud_handler, region_entry, region_count
    .set BASE, 0x1000
    .set HEARTBEATS, 0x2000
    .set REGION, 0xA0000
    .set REGION_SEG, REGION >> 4
    .set REGION_MAGIC, 0x4D4D5324       /* "$SMM": the region's first dword, which a probe must never read */
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
    out %eax, $PRIV_PORT_LEAK         /* the region leaked to a vCPU outside the mode */
2:  testb $PRIV_HEARTBEAT_EVERY - 1, (%bx)
    jnz 1b
    out %al, $PRIV_PORT_HEARTBEAT     /* heartbeat */
    jmp 1b

    .org 0x100
rsm_outside:                          /* GPA 0x1100: RSM outside the mode (#UD) */
    rsm
    hlt
    .org 0x110
ud_handler:                           /* GPA 0x1110: a real-mode #UD handler (IVT[6] = 0:0x1110) */
    mov $6, %al
    out %al, $0x23
    hlt
    .org 0x1000

    .section .region, "ax"
    .code16
priv_region:                          /* GPA 0xA0000, CS = 0xA000, ip = 0 */
    .long REGION_MAGIC
    .org 0x8                          /* entry_offset 8 */
region_entry:
    out %eax, $PRIV_PORT_ENTERED      /* entered (eax = the vCPU's index) */
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
    out %eax, $PRIV_PORT_MOVED        /* how much the heartbeats moved: must be 0 */
    addl $1, %es:region_count - priv_region
    mov %es:region_count - priv_region, %eax
    out %eax, $PRIV_PORT_COUNT        /* entry count */
    rsm
    .org 0x800
region_count:
    .long 0
    .org 0x1000
