/* scenario_protocol.h - what the guests of Sources/NPTScenarios say to their driver: port numbers,
 * system-call numbers, values and parameter registers, one protocol per scenario and the same for
 * every guest ISA. The x86-64 guests include it (build.sh runs the C preprocessor on them); Swift
 * imports it through the CScenarioGuests module (the simulator's images and the drivers).
 *
 * Registers are named by number in x86-64 order: r0 rax, r1 rcx, r3 rbx, r6 rsi, r7 rdi, r9 ...
 * r15 (the simulator's r0 ... r15 are numbered the same). An OUT's value is 8 bytes on the
 * simulator and 4 (OUT %eax) on x86-64, whose images lie below 4 GiB.
 * Plain integer literals only: the assembler reads this file too. */
#ifndef SCENARIO_PROTOCOL_H
#define SCENARIO_PROTOCOL_H

/* HVCI-like MBEC (HVCIScenario.swift): a kernel, a user process making HVCI_REG_CALLS "write" system
 * calls, then (HVCI_REG_ATTACKS = 1) two attacks: the user process jumps to the driver page at its
 * user-mode address (resuming, after the fault, at the address in HVCI_REG_RESUME), then asks the
 * kernel (HVCI_SYS_EXPLOIT) to jump to the user JIT page through its kernel alias; then it exits.
 * A fault the guest kernel takes (the #VE the VMM injects after a reported violation) is reported
 * as its vector then its rip, and the user process resumes at HVCI_REG_RESUME. A payload (the
 * driver page, the JIT page) that runs reports HVCI_PWNED. */
#define HVCI_PORT_PRINT 0xE9        /* value: the write call's argument: k for the k-th call, 1-based */
#define HVCI_PORT_PWNED 0xEA        /* value: HVCI_PWNED */
#define HVCI_PORT_FAULT_RIP 0xEE    /* value: the faulting instruction's address (after the vector) */
#define HVCI_PORT_FAULT_VECTOR 0xEF /* value: the vector of the fault the guest kernel took */
#define HVCI_PWNED 0xBAD
#define HVCI_SYS_WRITE 1            /* r0 = 1: print r7 */
#define HVCI_SYS_EXPLOIT 2          /* r0 = 2: the kernel jumps to the user JIT page's kernel alias */
#define HVCI_SYS_PWNED 3            /* r0 = 3: a payload running in user mode reports itself */
#define HVCI_SYS_EXIT 60            /* r0 = 60: the kernel halts */
#define HVCI_REG_CALLS 14           /* entry: the number of write calls */
#define HVCI_REG_ATTACKS 15         /* entry: 1 makes the two attacks after the calls, 0 not */
#define HVCI_REG_RESUME 9           /* set by the user process: where its fault handler resumes it */
#define HVCI_REG_ARG 7              /* the write call's argument */
#define HVCI_REG_SYSCALL 0          /* the system-call number */

/* Privileged mode (PrivilegedScenario.swift): every vCPU runs a loop that adds 1 to its heartbeat
 * (at PRIV_REG_HEARTBEAT), probes the region once (a read of its first bytes) and OUTs the value
 * on PRIV_PORT_LEAK unless it read all ones; every PRIV_HEARTBEAT_EVERY iterations it OUTs the
 * probe's value on PRIV_PORT_HEARTBEAT. The region's handler (entered with r0 = the vCPU's index)
 * reports it, sums every heartbeat, spins, sums again, reports the difference (0 when no other vCPU
 * ran), adds 1 to its entry count in region memory, reports the count, and leaves with RSM. */
#define PRIV_PORT_HEARTBEAT 0x10
#define PRIV_PORT_LEAK 0x11
#define PRIV_PORT_ENTERED 0x20      /* value: r0 at entry, the vCPU's index */
#define PRIV_PORT_MOVED 0x21        /* value: how much the heartbeats moved while the handler ran */
#define PRIV_PORT_COUNT 0x22        /* value: the handler's entry count */
#define PRIV_HEARTBEAT_EVERY 64
#define PRIV_REG_HEARTBEAT 3        /* entry: the guest-physical address of the vCPU's heartbeat */

/* NVDIMM durability (NVDIMMScenario.swift): records {NVDIMM_RECORD_MAGIC, i} (16 bytes) at
 * NVDIMM_REG_AREA + NVDIMM_RECORD_STRIDE * i for i = 0 .. count - 1, each made durable by store,
 * write-back, SFENCE and a write to the virtual flush hint (NVDIMM_REG_VFHA), then announced; the
 * image's tail entry then writes record count, only stored, and record count + 1, stored, written
 * back and fenced but not flushed. Then HLT. */
#define NVDIMM_PORT_DURABLE 0xE9    /* value: i (its low byte on x86-64) */
#define NVDIMM_PORT_STORED_ONLY 0xE7
#define NVDIMM_PORT_FENCED_ONLY 0xE8
#define NVDIMM_RECORD_MAGIC 0x4e56444d4d2d4b56 /* "VK-MMDVN" little-endian */
#define NVDIMM_RECORD_STRIDE 64
#define NVDIMM_REG_COUNT 1          /* rcx */
#define NVDIMM_REG_VFHA 6           /* rsi */
#define NVDIMM_REG_AREA 7           /* rdi */

#endif
