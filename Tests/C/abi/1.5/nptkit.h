/*
 * nptkit.h - the public C ABI of NPTKit (libnptkit.so).
 *
 * NPTKit implements memory-virtualization controls that hypervisors need and
 * hardware does not always give; this ABI covers emulated mode-based execute
 * control (MBEC) over pluggable backends, a privileged mode with a secure
 * global view, and (since ABI 1.1) virtualized NVDIMM write-pending-queue
 * flushing, with (since 1.2) the guest's NVDIMM SSDT and the host NVDIMM
 * discovery offered to plugins.
 *
 * Conventions
 *  - Every call returns npt_status (NPT_OK == 0, errors are negative).
 *    npt_status_string() names a status; npt_last_error() returns the detail of
 *    the last failed call made *on the calling thread* (which argument, which
 *    range). A failed call changes nothing.
 *  - Handles are opaque. A handle that was destroyed, or never created, is
 *    refused with NPT_ERR_BAD_HANDLE (handles are never reused).
 *  - Structs that may grow start with `size`: set it to sizeof(the struct) you
 *    were compiled with. Growth rules (1.3): the library accepts any size from the
 *    struct's first published size upward (a smaller one: NPT_ERR_INVALID_ARGUMENT);
 *    it reads only the caller's bytes and takes members past them as 0, and writes
 *    outputs only up to the caller's size (bytes past what it knows stay the
 *    caller's). A new member is only ever appended, and no struct has implicit
 *    padding (reserved members say where it is). npt_backend_ops and npt_host_api
 *    keep abi_version before size, as published in 1.0. Structs without `size`
 *    (npt_policy_range, npt_flush_target, ...) never grow.
 *  - Call tracing: with NPTKIT_CALL_TRACE=FILE in the environment (read at the first
 *    call) every npt_ call is recorded for `nptkit-cli replay-calls FILE`.
 *  - Ownership: every create has its destroy. Strings the library returns are
 *    owned by the library and stay valid until the owning context is destroyed.
 *  - Thread safety: unless a function says otherwise it may be called from any
 *    thread, also on the same handle from several threads at once. One thread at a
 *    time drives a vCPU (npt_vcpu_run, _run_raw, _get_regs, _set_regs,
 *    npt_handle_exit, npt_vcpu_inject_fault, npt_vcpu_leave_privileged); a second
 *    one meanwhile gets NPT_ERR_BUSY.
 *  - Handle lifetime. Create, destroy and run race freely from any thread:
 *     * a destroy happens completely or not at all, exactly once: of two destroys
 *       of one handle one succeeds and the other gets NPT_ERR_BAD_HANDLE; a
 *       destroy that fails (NPT_ERR_BUSY) destroyed nothing;
 *     * a destroy waits (up to 5 s, then NPT_ERR_BUSY) for calls in flight on the
 *       same object to return, except runs: while a thread drives a vCPU (a run in
 *       progress) npt_vcpu_destroy and npt_vm_destroy answer NPT_ERR_BUSY at once;
 *     * a call made while a destroy of its object is in progress gets NPT_ERR_BUSY,
 *       after it NPT_ERR_BAD_HANDLE: a run that overlaps a destroy either finished
 *       before it or is refused;
 *     * creates hold their parent: npt_context_destroy waits for an npt_vm_create
 *       in flight on the context (then refuses if the VM exists), npt_vm_destroy
 *       for an npt_vcpu_create in flight on the VM (then destroys that vCPU too);
 *     * a backend's operations on an object are never called after its destroy
 *       operation, and each destroy operation is called once.
 *    Tested with threads (Tests/C/test_robustness.c) under AddressSanitizer and
 *    ThreadSanitizer (scripts/sanitize.sh).
 *  - Bounds: at most 1024 vCPUs per VM; every loop that waits on a backend is
 *    bounded (npt_vcpu_run gives up with NPT_ERR_BACKEND on a backend that keeps
 *    returning NPT_EXIT_KICKED unasked; a backend's undefined exit reason or
 *    hierarchy is NPT_ERR_BACKEND, not the caller's error); size_t arguments are
 *    read as the unsigned values they are, up to SIZE_MAX.
 */
#ifndef NPTKIT_H
#define NPTKIT_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ABI version: major changes break compatibility; minor ones only add. */
#define NPT_ABI_VERSION_MAJOR 1u
#define NPT_ABI_VERSION_MINOR 5u /* 1.1: virtualized NVDIMM WPQ flushing;
                                    1.2: MBEC guarantees per mode (NPT_MBEC_VIOLATION_ONLY, NPT_ERR_GUARANTEE,
                                    npt_mbec_mode_check), qualification bits 10-11, policies on NVDIMM
                                    ranges; guest NVDIMM SSDT, host NVDIMM discovery from sysfs (also for
                                    plugins);
                                    1.3: guest ISAs (npt_backend_ops.guest_isa, npt_vm_guest_isa); plugin
                                    interface 2 (npt_plugin_init with key/value arguments,
                                    npt_plugin_load_with, npt_host_api.set_error, explicit
                                    privileged-mode enter/leave and statistics operations,
                                    npt_vm_backend_stats, npt_vcpu_backend_stats);
                                    1.4: recording (npt_vm_config.record_path) and the core's answer to
                                    each exit told to the backend (npt_backend_ops.vcpu_exit_decided), for
                                    the trace replay backend;
                                    1.5: the order of the privileged-mode coordinator's lock acquisitions
                                    told to a backend that orders them (npt_backend_ops.vm_lock_turn), so
                                    the trace replay backend replays the privileged mode */
#define NPT_ABI_VERSION 0x10005u /* (NPT_ABI_VERSION_MAJOR << 16) | NPT_ABI_VERSION_MINOR */
#define NPT_ABI_MAJOR(v) ((uint32_t)(v) >> 16)

/* ------------------------------------------------------------------------ */
/* Status                                                                     */
/* ------------------------------------------------------------------------ */
typedef enum npt_status {
    NPT_OK = 0,
    NPT_ERR_INVALID_ARGUMENT = -1, /* NULL pointer, bad flag, bad struct size */
    NPT_ERR_BAD_HANDLE = -2,       /* destroyed or unknown handle */
    NPT_ERR_MISALIGNED = -3,       /* address/size not aligned to the page size */
    NPT_ERR_OVERLAP = -4,          /* ranges in one request overlap */
    NPT_ERR_OUT_OF_RANGE = -5,     /* address outside guest memory */
    NPT_ERR_NOT_FOUND = -6,        /* unknown backend name, no such item */
    NPT_ERR_UNSUPPORTED = -7,      /* the backend cannot do this */
    NPT_ERR_ABI_MISMATCH = -8,     /* plugin or struct of another ABI major */
    NPT_ERR_PLUGIN = -9,           /* file is not a loadable NPTKit plugin */
    NPT_ERR_BUSY = -10,            /* object in use (e.g. vCPU running) */
    NPT_ERR_EXISTS = -11,          /* name or index already taken */
    NPT_ERR_BACKEND = -12,         /* the backend reported a failure */
    NPT_ERR_BUFFER_TOO_SMALL = -13,
    NPT_ERR_STATE = -14,           /* call not valid in the current state */
    NPT_ERR_GUARANTEE = -15        /* (ABI 1.2) the backend cannot give what the requested mode promises;
                                      npt_last_error() names the missing capability and the modes it can keep */
} npt_status;

/* Static string naming `status` ("NPT_ERR_MISALIGNED: ..."). Never NULL. */
const char *npt_status_string(npt_status status);

/* Detail of the last failed call on this thread, "" if none. Valid until the
 * next NPTKit call on this thread. Never NULL. */
const char *npt_last_error(void);

/* NPT_ABI_VERSION of the library actually loaded. */
uint32_t npt_abi_version(void);

/* ------------------------------------------------------------------------ */
/* Permissions: Intel EPT bit positions                                       */
/* ------------------------------------------------------------------------ */
#define NPT_PERM_READ  ((uint64_t)0x1)
#define NPT_PERM_WRITE ((uint64_t)0x2)
#define NPT_PERM_SX    ((uint64_t)0x4)  /* supervisor-mode execute (X with MBEC) */
#define NPT_PERM_UX    ((uint64_t)0x400) /* user-mode execute (MBEC) */
#define NPT_PERM_ALL   ((uint64_t)0x407) /* NPT_PERM_READ | NPT_PERM_WRITE | NPT_PERM_SX | NPT_PERM_UX */

#define NPT_PAGE_4K ((uint64_t)0x1000)
#define NPT_PAGE_2M ((uint64_t)0x200000)
#define NPT_PAGE_1G ((uint64_t)0x40000000)

/* ------------------------------------------------------------------------ */
/* Handles                                                                    */
/* ------------------------------------------------------------------------ */
typedef struct npt_context npt_context;
typedef struct npt_vm npt_vm;
typedef struct npt_vcpu npt_vcpu;

/* ------------------------------------------------------------------------ */
/* Context and backends                                                       */
/* ------------------------------------------------------------------------ */
/* A context owns a backend registry; the built-in simulator ("sim") is
 * registered in every context and is the default. */
npt_status npt_context_create(npt_context **out);
/* Fails with NPT_ERR_BUSY while VMs created from it are alive; waits for an npt_vm_create in flight
 * on it first (so no VM outlives its context). NPT_ERR_STATE from inside a backend operation. */
npt_status npt_context_destroy(npt_context *ctx);

#define NPT_CAP_MBEC_EMULATION    ((uint64_t)0x1) /* can expose a hierarchy per vCPU */
#define NPT_CAP_EXIT_ON_ESCALATE  ((uint64_t)0x2) /* exits on user->supervisor */
#define NPT_CAP_EXIT_ON_RETURN    ((uint64_t)0x4) /* exits on supervisor->user */
#define NPT_CAP_LINEAR_MODE_INFO  ((uint64_t)0x8) /* violation reports the U/S of the linear address */
#define NPT_CAP_RUN               ((uint64_t)0x10) /* runs guest code */
#define NPT_CAP_PRIVILEGED_MODE   ((uint64_t)0x20) /* can stop vCPUs and back the privileged-mode region */
#define NPT_CAP_PERSISTENT_MEMORY ((uint64_t)0x40) /* backs NVDIMM ranges, traps vFHA writes, writes physical
                                                        flush hints (ABI 1.1; an npt_backend_ops backend keeps
                                                        it only if its table has every operation it needs,
                                                        see npt_backend_ops) */

/* (ABI 1.3) Guest instruction sets: what a backend's vCPUs execute. */
#define NPT_GUEST_ISA_UNKNOWN 0u /* not said (a backend table older than ABI 1.3) */
#define NPT_GUEST_ISA_SIM     1u /* the simulator's 32-bit-instruction ISA (docs/guest-isa.md) */
#define NPT_GUEST_ISA_X86_64  2u /* x86-64 (the KVM backend) */
#define NPT_GUEST_ISA_NONE    3u /* runs no guest code (trace replay: recorded exits) */

typedef struct npt_backend_info {
    uint32_t size;            /* in: sizeof(npt_backend_info) */
    uint32_t abi_version;     /* ABI the backend was built for */
    const char *name;         /* owned by the context */
    const char *description;  /* owned by the context */
    uint64_t capabilities;    /* NPT_CAP_* */
    int is_default;
    int is_plugin;
} npt_backend_info;

npt_status npt_backend_count(const npt_context *ctx, size_t *count);
/* (ABI 1.3) The guest ISA (NPT_GUEST_ISA_*) of the backend that runs `vm`. NPT_ERR_BAD_HANDLE once
 * the VM is destroyed. */
npt_status npt_vm_guest_isa(npt_vm *vm, uint32_t *isa);
npt_status npt_backend_get(const npt_context *ctx, size_t index, npt_backend_info *info);
/* Makes `name` the default backend for VMs created with backend == NULL. */
npt_status npt_backend_set_default(npt_context *ctx, const char *name);
/* (ABI 1.2) Whether backend `name` (NULL: the default) can keep the guarantee of MBEC mode `mode`:
 * NPT_OK, or NPT_ERR_GUARANTEE with npt_last_error() naming what it lacks. *missing (may be NULL)
 * receives the NPT_CAP_* bits the mode needs and the backend lacks (0 when NPT_OK). */
npt_status npt_mbec_mode_check(const npt_context *ctx, const char *name, uint32_t mode, uint64_t *missing);

/* ------------------------------------------------------------------------ */
/* VM                                                                         */
/* ------------------------------------------------------------------------ */
/* MBEC emulation modes and what each guarantees. A guarantee is earned: npt_vm_create refuses a mode
 * whose needs the backend's capabilities do not meet with NPT_ERR_GUARANTEE (npt_last_error() names
 * the missing capability and the modes the backend can keep); npt_mbec_mode_check asks beforehand.
 * In every mode: a page executes only if the policy makes it executable in some mode (Xs or Xu),
 * reads and writes obey R and W exactly, and a violation is reported with the qualification hardware
 * MBEC would give. What differs is which privilege level's execute bit governs a fetch. */
typedef enum npt_mbec_mode {
    /* Needs NPT_CAP_EXIT_ON_ESCALATE, NPT_CAP_EXIT_ON_RETURN and NPT_CAP_LINEAR_MODE_INFO. The core
     * exposes the supervisor hierarchy on every user-to-supervisor transition and the user one on
     * every return (each exit armed only while the policy needs it), and a fetch violation picks the
     * hierarchy by the linear address's U/S. Identical to hardware MBEC for a guest with CR4.SMEP = 1;
     * with SMEP off a supervisor fetch from a user-mode address is governed by Xs, not Xu (README). */
    NPT_MBEC_EXACT = 0,
    /* Needs NPT_CAP_EXIT_ON_ESCALATE. The patent's minimum: every entry to the kernel exposes the
     * supervisor hierarchy first, so kernel code never runs a user-execute-only page (ret2dir, also
     * through the IDT, is stopped); after a return to user mode the supervisor hierarchy stays
     * exposed until a violation switches, so until then user code may run a page that is
     * supervisor-execute-only but mapped at a user-mode address (README, gap class 1). */
    NPT_MBEC_LAZY = 1,
    /* (ABI 1.2) Needs only NPT_CAP_MBEC_EMULATION: a weaker, named guarantee for backends without a
     * privilege-change exit. The hierarchy changes only on a fetch violation (by CPL). Stops: code
     * in pages executable in no mode; user code jumping to supervisor-only code while the user
     * hierarchy is exposed; the kernel jumping to user-only code after it has run any of its own
     * supervisor-only code since the last entry. Does NOT stop: kernel code entered straight from user
     * mode running user-execute-only pages (an attacker with a kernel data write points an IDT gate
     * or the system-call entry's page-table entry at a user page: ret2dir through the IDT), and
     * user code run straight after a return executing supervisor-execute-only pages at user-mode
     * addresses, each until the first fetch of a page the exposed hierarchy does not make
     * executable. */
    NPT_MBEC_VIOLATION_ONLY = 2
} npt_mbec_mode;

typedef struct npt_vm_config {
    uint32_t size;            /* sizeof(npt_vm_config) */
    uint32_t mbec_mode;       /* npt_mbec_mode */
    const char *backend;      /* NULL: the context's default */
    uint64_t ram_size;        /* guest RAM at GPA 0, multiple of 4 KiB, > 0 */
    uint64_t default_perms;   /* policy of RAM before any npt_policy_set */
    uint64_t max_steps_per_run; /* simulator: instruction budget per run, 0 = none */
    /* (ABI 1.4) NULL: no recording. Else the path of an NPTKit trace (docs/trace-format.md) to which
     * every call between the core and the VM's backend is recorded, whatever the backend (the
     * recording layer of the core; the backend does nothing for it): what the backend reported and
     * what the core decided. The trace is finished (end record, fsync) by npt_vm_destroy. A path
     * that cannot be created fails npt_vm_create with NPT_ERR_INVALID_ARGUMENT. Until the VM exists
     * the trace is written beside the path under a name of its own ("<path>.partial-<pid>-<n>") and
     * then renamed to it: a create that fails leaves no file, and a file already at the path
     * unchanged. */
    const char *record_path;
} npt_vm_config;

npt_status npt_vm_create(npt_context *ctx, const npt_vm_config *config, npt_vm **out);
/* Destroys the VM and its vCPUs, all or nothing, once (see "Handle lifetime"). NPT_ERR_BUSY if a
 * thread drives one of its vCPUs (a run in progress): then nothing is destroyed, every vCPU still
 * works. Waits for other calls in flight on the VM (an npt_vcpu_create among them: its vCPU is
 * destroyed with the VM). A second destroy gets NPT_ERR_BAD_HANDLE. NPT_ERR_STATE from inside a
 * backend operation. */
npt_status npt_vm_destroy(npt_vm *vm);

/* Guest physical memory access (host side, no permission checks). len may be anything up to
 * SIZE_MAX: a range past guest memory is NPT_ERR_OUT_OF_RANGE. */
npt_status npt_vm_write_memory(npt_vm *vm, uint64_t gpa, const void *data, size_t len);
npt_status npt_vm_read_memory(npt_vm *vm, uint64_t gpa, void *data, size_t len);

/* ------------------------------------------------------------------------ */
/* MBEC policy                                                                */
/* ------------------------------------------------------------------------ */
typedef struct npt_policy_range {
    uint64_t gpa;       /* aligned to page_size */
    uint64_t size;      /* multiple of page_size, > 0 */
    uint64_t page_size; /* NPT_PAGE_4K, NPT_PAGE_2M or NPT_PAGE_1G */
    uint64_t perms;     /* NPT_PERM_* only */
} npt_policy_range;

/* Sets the policy of one range. Only the affected shadow entries change; the
 * backend is told which translations to invalidate. */
npt_status npt_policy_set(npt_vm *vm, uint64_t gpa, uint64_t size, uint64_t page_size, uint64_t perms);
/* Applies `count` ranges atomically: all or nothing. Ranges must not overlap
 * each other (NPT_ERR_OVERLAP). */
npt_status npt_policy_set_ranges(npt_vm *vm, const npt_policy_range *ranges, size_t count);
npt_status npt_policy_get(npt_vm *vm, uint64_t gpa, uint64_t *perms);

/* ------------------------------------------------------------------------ */
/* Shadow hierarchies (what a backend exposes)                                */
/* ------------------------------------------------------------------------ */
#define NPT_HIERARCHY_SUPERVISOR 0u /* X bit = supervisor-execute */
#define NPT_HIERARCHY_USER       1u /* X bit = user-execute */
#define NPT_HIERARCHY_COUNT      2u

typedef struct npt_translation {
    uint32_t size;        /* sizeof(npt_translation) */
    uint32_t level;       /* 1 = 4 KiB leaf, 2 = 2 MiB leaf, 3 = 1 GiB leaf, 0 = not present */
    uint64_t page_size;
    uint64_t host_offset; /* offset of the page in the VM's backing memory */
    uint64_t perms;       /* effective R/W/X (X in bit 2) after ANDing every level */
} npt_translation;

npt_status npt_hierarchy_translate(npt_vm *vm, uint32_t hierarchy, uint64_t gpa, npt_translation *out);

/* Calls `cb` once per present leaf of `hierarchy`, in GPA order, with the
 * effective permissions; adjacent leaves are not merged. */
typedef void (*npt_leaf_cb)(uint64_t gpa, uint64_t size, uint64_t perms, void *user_data);
npt_status npt_hierarchy_leaves(npt_vm *vm, uint32_t hierarchy, npt_leaf_cb cb, void *user_data);

/* ------------------------------------------------------------------------ */
/* vCPUs, running and exits                                                   */
/* ------------------------------------------------------------------------ */
typedef struct npt_regs {
    uint32_t size;      /* sizeof(npt_regs) */
    uint32_t cpl;       /* 0 = supervisor, 3 = user */
    uint64_t rip;
    uint64_t rflags;
    uint64_t gpr[16];   /* rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8..r15 */
    uint64_t cr0, cr2, cr3, cr4, efer;
    uint64_t lstar;     /* system-call entry point */
    uint64_t fault_handler; /* guest handler for faults (simulator IDT analogue), 0 = exit */
} npt_regs;

#define NPT_CR4_SMEP ((uint64_t)0x100000)
#define NPT_CR4_SMAP ((uint64_t)0x200000)
#define NPT_EFER_NXE ((uint64_t)0x800)

typedef enum npt_exit_reason {
    NPT_EXIT_NONE = 0,
    NPT_EXIT_HALT = 1,            /* guest executed HLT */
    NPT_EXIT_IO = 2,              /* guest wrote `io_value` to port `io_port` */
    NPT_EXIT_MBEC_VIOLATION = 3,  /* a violation no hierarchy permits: report it to the VM */
    NPT_EXIT_GUEST_FAULT = 4,     /* guest fault with no guest handler (vector in `vector`) */
    NPT_EXIT_BUDGET = 5,          /* max_steps_per_run reached */
    NPT_EXIT_ESCALATION = 6,      /* raw only: user -> supervisor transition */
    NPT_EXIT_RETURN_TO_USER = 7,  /* raw only: supervisor -> user transition */
    NPT_EXIT_EPT_VIOLATION = 8,   /* raw only: nested violation, not yet decided */
    NPT_EXIT_INTERNAL_ERROR = 9,
    NPT_EXIT_KICKED = 10,         /* raw only: the core asked the vCPU to leave run (stop, request) */
    NPT_EXIT_LEAVE_MODE = 11,     /* raw only: the guest executed RSM */
    NPT_EXIT_PRIVILEGED_FAILED = 12 /* an enter-mode request failed: vCPU `vector` did not stop in time;
                                       npt_last_error() says more; the view is unchanged */
} npt_exit_reason;

/* EPT-violation exit qualification bits (Intel SDM, table "Exit Qualification
 * for EPT Violations"). */
#define NPT_EPTQ_READ         ((uint64_t)0x1)  /* access was a data read */
#define NPT_EPTQ_WRITE        ((uint64_t)0x2)  /* access was a data write */
#define NPT_EPTQ_FETCH        ((uint64_t)0x4)  /* access was an instruction fetch */
#define NPT_EPTQ_READABLE     ((uint64_t)0x8)  /* entry permitted read */
#define NPT_EPTQ_WRITABLE     ((uint64_t)0x10)  /* entry permitted write */
#define NPT_EPTQ_EXECUTABLE   ((uint64_t)0x20)  /* entry permitted (supervisor) execute */
#define NPT_EPTQ_UEXECUTABLE  ((uint64_t)0x40)  /* entry permitted user execute (MBEC) */
#define NPT_EPTQ_GLA_VALID    ((uint64_t)0x80)
#define NPT_EPTQ_GLA_TRANSL   ((uint64_t)0x100)
#define NPT_EPTQ_USER_LINEAR  ((uint64_t)0x200)  /* with GLA_TRANSL: a user-mode linear address (U/S = 1 at
                                                     every level; every address with paging off) */
#define NPT_EPTQ_GLA_WRITABLE ((uint64_t)0x400) /* with GLA_TRANSL: guest paging maps it writable (1.2) */
#define NPT_EPTQ_GLA_NX       ((uint64_t)0x800) /* with GLA_TRANSL: guest paging maps it execute-disable (1.2) */

typedef struct npt_exit {
    uint32_t size;         /* sizeof(npt_exit) */
    uint32_t reason;       /* npt_exit_reason */
    uint64_t gpa;
    uint64_t gva;
    uint64_t qualification;/* NPT_EPTQ_* for violations; error code for faults */
    uint32_t vector;       /* fault vector for NPT_EXIT_GUEST_FAULT */
    uint32_t cpl;          /* CPL at the exit */
    uint32_t hierarchy;    /* hierarchy exposed at the exit */
    uint32_t io_port;
    uint64_t io_value;
    uint64_t rip;
} npt_exit;

/* index: any value not taken in the VM (NPT_ERR_EXISTS); at most 1024 vCPUs per VM at once
 * (NPT_ERR_OUT_OF_RANGE; a destroyed vCPU's place is free again). */
npt_status npt_vcpu_create(npt_vm *vm, uint32_t index, npt_vcpu **out);
/* All or nothing, once: NPT_ERR_BUSY while a thread drives the vCPU (a run in progress) or while it
 * holds the privileged mode; the backend's vcpu_destroy is called once and nothing of the vCPU after
 * it. A second destroy gets NPT_ERR_BAD_HANDLE. NPT_ERR_STATE from inside a backend operation. */
npt_status npt_vcpu_destroy(npt_vcpu *vcpu);
npt_status npt_vcpu_get_regs(npt_vcpu *vcpu, npt_regs *regs);
npt_status npt_vcpu_set_regs(npt_vcpu *vcpu, const npt_regs *regs);

/* Library loop: runs until an exit the core does not handle itself (halt, IO,
 * a violation to report, a guest fault, the budget). Escalation, return and
 * violations that a hierarchy switch resolves never come back. Refused
 * (NPT_ERR_BUSY, then NPT_ERR_BAD_HANDLE) once a destroy of the vCPU has begun.
 * A backend that returns NPT_EXIT_KICKED 10,000 times in a row without a kick
 * from the core, or an exit reason or hierarchy the ABI does not define, ends
 * the run with NPT_ERR_BACKEND. */
npt_status npt_vcpu_run(npt_vcpu *vcpu, npt_exit *exit);

/* QEMU-style loop: npt_vcpu_run_raw returns every exit, including
 * ESCALATION, RETURN_TO_USER and EPT_VIOLATION; the tool then asks the core
 * what to do with npt_handle_exit, which applies the decision (e.g. exposes
 * another hierarchy) and says what the tool must do next. */
npt_status npt_vcpu_run_raw(npt_vcpu *vcpu, npt_exit *exit);

typedef enum npt_action {
    NPT_ACTION_RESUME = 0,        /* core handled it: run again */
    NPT_ACTION_REPORT_VIOLATION = 1, /* nothing permits the access: report it to the VM */
    NPT_ACTION_TOOL = 2           /* not an MBEC exit: the tool handles it (IO, HLT, ...) */
} npt_action;

/* Takes only the exit the last npt_vcpu_run_raw on this vCPU returned, once (same reason and gpa):
 * any other (an escalation that never happened, a leave-mode outside the mode, an exit decided
 * twice) is refused with NPT_ERR_STATE and changes nothing. */
npt_status npt_handle_exit(npt_vcpu *vcpu, npt_exit *exit, uint32_t *action);

/* Delivers fault `vector` to the guest's fault handler (as the VMM would
 * inject an exception after a reported violation). */
npt_status npt_vcpu_inject_fault(npt_vcpu *vcpu, uint32_t vector, uint64_t error_code, uint64_t address);

/* ------------------------------------------------------------------------ */
/* Privileged mode (SMM-like) with a secure global view                       */
/* ------------------------------------------------------------------------ */
/* A special region (outside RAM) holds the mode's code. It is part of the VM's one global memory
 * view only while one vCPU is in the mode: an enter-mode request stops every other vCPU (their
 * npt_vcpu_run calls park inside the library), then adds the region to every shadow hierarchy, then
 * the vCPU enters at the region's entry point (CPL 0, paging off, r0 = its index). RSM (guest
 * instruction 0x13, or npt_vcpu_leave_privileged) removes the region, invalidates every translation
 * to it, restores the vCPU's state and resumes the others. Requests are served in arrival order. */
typedef struct npt_region {
    uint32_t size;          /* sizeof(npt_region) */
    uint32_t reserved;
    uint64_t gpa;           /* 4 KiB aligned, outside guest RAM */
    uint64_t length;        /* multiple of 4 KiB, at most 1 GiB */
    const void *contents;   /* copied; may be NULL when contents_len is 0 */
    size_t contents_len;    /* at most length (any larger value, up to SIZE_MAX, is NPT_ERR_INVALID_ARGUMENT) */
    uint64_t entry_offset;  /* 8-byte aligned offset of the entry point */
    uint64_t perms;         /* policy of the region's pages while visible; 0 = R|W|SX|UX. The mode runs
                               with paging off, where every linear address is a user-mode address
                               (SDM), so under MBEC its code needs UX (1.2; 1.1's default R|W|SX made
                               the handler run only because the emulation used Xs there) */
} npt_region;

npt_status npt_region_set(npt_vm *vm, const npt_region *region);
/* The enter-mode interrupt for `vcpu`. Any thread; the vCPU's thread serves it in npt_vcpu_run. */
npt_status npt_vcpu_raise_privileged(npt_vcpu *vcpu);
/* Another interrupt: delivered to the guest now, or, if the vCPU is stopped, after it resumes
 * (*deferred = 1). */
npt_status npt_vcpu_raise_interrupt(npt_vcpu *vcpu, uint32_t vector, int *deferred);
/* RSM from the VMM. NPT_ERR_STATE if the vCPU is not in the mode. */
npt_status npt_vcpu_leave_privileged(npt_vcpu *vcpu);
/* Index of the vCPU in the mode, or -1. */
npt_status npt_vm_privileged_holder(npt_vm *vm, int64_t *index);
/* How long an entry waits for the other vCPUs to stop (default 1 s; > 0; UINT64_MAX: no bound). */
npt_status npt_vm_set_stop_timeout(npt_vm *vm, uint64_t nanoseconds);

typedef struct npt_privileged_stats {
    uint32_t size;                   /* sizeof(npt_privileged_stats) */
    uint32_t reserved;
    uint64_t requests;
    uint64_t entries;
    uint64_t failures;               /* a vCPU did not stop in time */
    uint64_t deferred_interrupts;
    uint64_t entry_latency_total_ns; /* from the request to the entry */
    uint64_t entry_latency_max_ns;
    uint64_t stopped_total_ns;       /* from the stop request to the others' resumption */
    uint64_t outside_while_visible;  /* simulator check: instructions run by a vCPU outside the mode
                                        while the region was visible (the invariant: 0) */
} npt_privileged_stats;

npt_status npt_vm_get_privileged_stats(npt_vm *vm, npt_privileged_stats *stats);

/* ------------------------------------------------------------------------ */
/* Virtualized NVDIMM write-pending-queue flushing (ABI 1.1)                  */
/* ------------------------------------------------------------------------ */
/* A VM's NVDIMM ranges are guest-physical ranges backed by the host's persistent memory. A store
 * reaches the media only through the protocol: store, CLWB of its line, SFENCE, then a write to a
 * flush hint address, which drains the memory controllers' write-pending queues (WPQs). Each VM
 * gets one virtual flush hint address (vFHA): a 4 KiB page outside its RAM and NVDIMM ranges,
 * allocated with the first NVDIMM range, named in the guest's NFIT as the flush hint of every
 * virtual DIMM, and tied to the physical flush hints of exactly the memory controllers behind the
 * host regions that back the VM's NVDIMM ranges.
 *  - Where a backing host region needs WPQ flushing, the vFHA is read-only in every shadow
 *    hierarchy: a guest write to it exits (NPT_EXIT_EPT_VIOLATION with NPT_EPTQ_WRITE). The core
 *    handles that exit itself (npt_vcpu_run never returns it; with npt_vcpu_run_raw,
 *    npt_handle_exit answers NPT_ACTION_RESUME): it fences the vCPU's earlier stores, writes each
 *    associated physical flush hint once, completes the guest's write and resumes the vCPU.
 *  - Where none does (the WPQs are in the persistence domain, e.g. ADR), the vFHA is writable and
 *    guest writes to it cost no exit.
 *  - Concurrent guest flushes are coalesced per physical flush hint (see npt_vm_set_flush_options).
 * Only backends with NPT_CAP_PERSISTENT_MEMORY (the simulator, and npt_backend_ops backends that
 * implement the persistent-memory operations) can do this; on others every call
 * below that needs the backend fails with NPT_ERR_UNSUPPORTED. Calls on one VM are serialized by
 * the VM and may be made from any thread, also while its vCPUs run. */

/* One persistent-memory region of the host, as the VM's backend discovers it. */
typedef struct npt_host_pmem_region {
    uint32_t size;               /* sizeof(npt_host_pmem_region) */
    uint32_t id;                 /* what npt_nvdimm.host_region names */
    uint64_t base, length;       /* system-physical range */
    uint32_t controller_count;   /* memory controllers behind it */
    uint32_t flush_target_count; /* physical flush hints (one per controller that has one) */
    int needs_wpq_flush;         /* 1: data is durable only once a flush hint drained the WPQs */
    uint32_t reserved;           /* 0 (explicit tail padding, 1.3; the size was always 40) */
} npt_host_pmem_region;

/* Number of host persistent-memory regions (sorted by id; index them with npt_vm_host_pmem_get).
 * NPT_ERR_UNSUPPORTED if the VM's backend has no persistent memory. */
npt_status npt_vm_host_pmem_count(npt_vm *vm, size_t *count);
/* NPT_ERR_NOT_FOUND if index >= the count. */
npt_status npt_vm_host_pmem_get(npt_vm *vm, size_t index, npt_host_pmem_region *out);

typedef struct npt_nvdimm {
    uint32_t size;          /* sizeof(npt_nvdimm) */
    uint32_t host_region;   /* npt_host_pmem_region.id */
    uint64_t gpa;           /* 4 KiB aligned */
    uint64_t length;        /* multiple of 4 KiB, > 0 */
    uint64_t region_offset; /* 4 KiB aligned offset into the host region */
} npt_nvdimm;

/* Adds an NVDIMM range to the VM, with the policy config->default_perms; the first one also
 * allocates the vFHA. All or nothing. The VM sees what the host region's media holds.
 * NPT_ERR_MISALIGNED: gpa, length or region_offset not 4 KiB aligned;
 * NPT_ERR_OVERLAP: overlaps RAM, the privileged-mode region, another NVDIMM range or the vFHA, or
 *   that part of the host region already backs an NVDIMM range (of any VM);
 * NPT_ERR_NOT_FOUND: no host region host_region;
 * NPT_ERR_OUT_OF_RANGE: past the host region's end or the 48-bit guest-physical space, or more than
 *   64 ranges;
 * NPT_ERR_UNSUPPORTED: the backend has no persistent memory;
 * NPT_ERR_INVALID_ARGUMENT: NULL, bad size, length 0. */
npt_status npt_vm_add_nvdimm(npt_vm *vm, const npt_nvdimm *nvdimm);

typedef struct npt_flush_hint_info {
    uint32_t size;          /* sizeof(npt_flush_hint_info) */
    uint32_t trapped;       /* 1: guest writes to the vFHA exit */
    uint64_t vfha;          /* guest-physical, 4 KiB aligned */
    uint32_t target_count;  /* physical flush hints a guest flush is propagated to */
    uint32_t nvdimm_count;  /* the VM's NVDIMM ranges */
} npt_flush_hint_info;

/* NPT_ERR_STATE when the VM has no NVDIMM range (hence no vFHA). */
npt_status npt_vm_get_flush_hint(npt_vm *vm, npt_flush_hint_info *info);
/* Physical flush hint `index` (< target_count): the host region, the memory controller's key and the
 * flush hint address (0 where the host does not give one). No out pointer may be NULL.
 * NPT_ERR_STATE without an NVDIMM range, NPT_ERR_NOT_FOUND if index >= target_count. */
npt_status npt_vm_get_flush_target(npt_vm *vm, size_t index, uint32_t *host_region, uint32_t *controller,
                                   uint64_t *address);

#define NPT_FLUSH_TRAP_AUTO   0u /* trap exactly when the host needs WPQ flushing (the default) */
#define NPT_FLUSH_TRAP_ALWAYS 1u /* trap even where it is not needed (to measure the trap path) */
#define NPT_FLUSH_TRAP_NEVER  2u /* deliberately unsafe where flushing is needed: guest flushes do
                                    nothing and data is lost at a power failure; for crash tests */

/* trap: NPT_FLUSH_TRAP_*; coalesce != 0: a physical flush that starts after a guest's write
 * satisfies that guest's flush, so concurrent guest flushes share physical flushes (the default);
 * 0: every guest flush makes its own. Valid before the first NVDIMM range too; the vFHA's mapping
 * follows at once (translations to it are invalidated). NPT_ERR_INVALID_ARGUMENT for another trap. */
npt_status npt_vm_set_flush_options(npt_vm *vm, uint32_t trap, int coalesce);

/* The guest's NFIT (ACPI table, header included, checksum valid): per NVDIMM range a
 * persistent-memory SPA range structure, a memory-device map of one virtual DIMM, and that DIMM's
 * flush hint structure naming the vFHA. Always sets *needed (which must not be NULL) to the table's
 * length; copies the table into buf when buf_len >= *needed, else returns NPT_ERR_BUFFER_TOO_SMALL
 * and writes nothing to buf (buf may be NULL with buf_len 0 to ask the size). NPT_ERR_STATE when
 * the VM has no NVDIMM range. */
npt_status npt_vm_get_nfit(npt_vm *vm, void *buf, size_t buf_len, size_t *needed);

typedef struct npt_flush_stats {
    uint32_t size;              /* sizeof(npt_flush_stats) */
    uint32_t reserved;
    uint64_t guest_flushes;     /* guest writes to the trapped vFHA the core handled */
    uint64_t exits;             /* exits taken for the vFHA (a failed flush counts here only) */
    uint64_t physical_flushes;  /* physical flush hint writes */
    uint64_t coalesced;         /* (guest flush, flush hint) pairs met by another vCPU's physical flush */
    uint64_t untrapped_writes;  /* guest writes to the vFHA that cost no exit (where the backend counts them) */
    uint64_t flush_ns_total;    /* time spent handling guest flushes, exit to resume */
} npt_flush_stats;

npt_status npt_vm_get_flush_stats(npt_vm *vm, npt_flush_stats *stats);

/* A power failure of the host's persistent memory, for backends that model one (the simulator, and
 * npt_backend_ops backends with power_failure; NPT_ERR_UNSUPPORTED otherwise): caches and lines in flight are lost, the WPQs drain (if they are
 * in the persistence domain) or are lost. It hits the whole simulated host, so every VM of the
 * context's "sim" backend. Afterwards npt_vm_read_memory on an NVDIMM range returns what reached
 * the media. NPT_ERR_STATE when the VM has no NVDIMM range. Do not call it while the VM's vCPUs
 * run. */
npt_status npt_vm_power_failure(npt_vm *vm);

/* The simulator's own configuration (npt_sim_set_platform) is in nptkit_sim.h, included at the end. */

/* ------------------------------------------------------------------------ */
/* Statistics                                                                 */
/* ------------------------------------------------------------------------ */
typedef struct npt_stats {
    uint32_t size;                 /* sizeof(npt_stats) */
    uint32_t reserved;
    uint64_t exits_total;          /* every exit the backend took */
    uint64_t exits_escalation;
    uint64_t exits_return_to_user;
    uint64_t exits_ept_violation;
    uint64_t hierarchy_switches;
    uint64_t violations_reported;
    uint64_t policy_updates;
    uint64_t invalidations;        /* INVEPT-analogue requests sent to the backend */
    uint64_t instructions;         /* guest instructions retired (if known) */
    uint64_t tlb_hits;
    uint64_t tlb_misses;
    uint64_t shadow_nodes;         /* distinct table pages across all hierarchies */
    uint64_t shadow_nodes_single;  /* table pages of the supervisor hierarchy alone */
} npt_stats;

npt_status npt_vm_get_stats(npt_vm *vm, npt_stats *stats);

/* ------------------------------------------------------------------------ */
/* Backends as a table of function pointers                                   */
/* ------------------------------------------------------------------------ */
/* Exit controls a backend is asked to configure per vCPU. */
#define NPT_EXITCTL_ESCALATION 0x1u
#define NPT_EXITCTL_RETURN     0x2u

typedef struct npt_host_api npt_host_api;

/* (ABI 1.3) A privileged-mode entry as the core tells it to a backend (vcpu_enter_privileged). */
typedef struct npt_privileged_entry {
    uint32_t size;        /* sizeof(npt_privileged_entry) */
    uint32_t vcpu_index;
    uint64_t region_gpa;  /* the special region, now in the view */
    uint64_t region_size;
    uint64_t entry_rip;   /* region_gpa + the region's entry offset */
} npt_privileged_entry;

/* (ABI 1.3) One statistic of a backend: npt_backend_ops.vm_stats / vcpu_stats, npt_vm_backend_stats. */
typedef struct npt_backend_stat {
    const char *name;     /* static, owned by the backend */
    uint64_t value;
} npt_backend_stat;

/* A physical flush hint of a host persistent-memory region, as a backend reports it
 * (npt_backend_ops.host_pmem_get) and as the core asks the backend to write it (physical_flush). */
typedef struct npt_flush_target {
    uint32_t controller; /* memory controller's key (e.g. the NFIT device handle's controller bits) */
    uint32_t reserved;   /* 0 */
    uint64_t address;    /* system-physical flush hint address; 0 where the host does not give one */
} npt_flush_target;

/* A backend: the mechanism. Every member may be NULL except name and the
 * version fields; a NULL operation makes the core report NPT_ERR_UNSUPPORTED.
 * `backend_data` is the pointer given with the ops; `vm_data`/`vcpu_data` are
 * what vm_create/vcpu_create returned. The core reads only the members that
 * `size` covers whole: a table built against an older header (a smaller size)
 * has none of the later members, as if they were NULL.
 *
 * Persistent memory (ABI 1.1, the members after define_region): the core keeps
 * NPT_CAP_PERSISTENT_MEMORY of `capabilities` only when the table has all of
 * host_pmem_count, host_pmem_get, attach_pmem, define_flush_hint_page,
 * physical_flush, vcpu_fence and vcpu_complete_trapped_write (untrapped_flush_hint_writes
 * and power_failure are optional); otherwise it drops the bit and refuses the NVDIMM
 * calls on the backend's VMs with NPT_ERR_UNSUPPORTED before asking the backend
 * anything. The core decides (which host offsets, whether the vFHA traps, which
 * flush hints a guest flush writes); the backend only does. A status other than
 * NPT_OK from these operations fails the NPTKit call that needed it with that
 * status (NPT_ERR_BACKEND if it is not an npt_status), and the core undoes its
 * own part of the call. */
typedef struct npt_backend_ops {
    uint32_t abi_version;  /* NPT_ABI_VERSION the backend was built against */
    uint32_t size;         /* sizeof(npt_backend_ops) */
    const char *name;
    const char *description;
    uint64_t capabilities; /* NPT_CAP_* */
    void *backend_data;

    npt_status (*vm_create)(void *backend_data, npt_vm *vm, const npt_vm_config *config, void **vm_data);
    void (*vm_destroy)(void *vm_data);
    /* Memory: the core asks the backend to hold guest memory. */
    npt_status (*memory_write)(void *vm_data, uint64_t gpa, const void *data, size_t len);
    npt_status (*memory_read)(void *vm_data, uint64_t gpa, void *data, size_t len);
    npt_status (*vcpu_create)(void *vm_data, uint32_t index, void **vcpu_data);
    void (*vcpu_destroy)(void *vcpu_data);
    npt_status (*vcpu_get_regs)(void *vcpu_data, npt_regs *regs);
    npt_status (*vcpu_set_regs)(void *vcpu_data, const npt_regs *regs);
    /* Expose `hierarchy` to the vCPU (the core decided which). */
    npt_status (*vcpu_set_hierarchy)(void *vcpu_data, uint32_t hierarchy);
    /* NPT_EXITCTL_* */
    npt_status (*vcpu_set_exit_controls)(void *vcpu_data, uint32_t controls);
    /* INVEPT analogue: translations of [gpa, gpa+size) in `hierarchy` changed. */
    npt_status (*invalidate)(void *vm_data, uint32_t hierarchy, uint64_t gpa, uint64_t size);
    /* Run until the next exit; fill `exit`. */
    npt_status (*vcpu_run)(void *vcpu_data, npt_exit *exit);
    npt_status (*vcpu_inject_fault)(void *vcpu_data, uint32_t vector, uint64_t error_code, uint64_t address);
    /* Make a vcpu_run in progress (or the next one) return NPT_EXIT_KICKED soon. Any thread. */
    void (*vcpu_kick)(void *vcpu_data);
    /* Back the privileged-mode region [gpa, gpa+size) at `host_offset` of the backing memory
     * (what npt_hierarchy_translate reports for its pages), filled with `contents`. */
    npt_status (*define_region)(void *vm_data, uint64_t gpa, uint64_t size, uint64_t host_offset,
                                const void *contents, size_t contents_len);

    /* ---- ABI 1.1: persistent memory (NPT_CAP_PERSISTENT_MEMORY) ---- */
    /* Host discovery: the number of host persistent-memory regions, and region `index` (< the count)
     * with up to `targets_cap` of its flush targets (controller key, physical flush hint address).
     * The core sets region->size to sizeof(npt_host_pmem_region) and zeroes the rest; the backend
     * fills id, base, length, controller_count, flush_target_count (all of the region's targets, even
     * if more than targets_cap) and needs_wpq_flush, and writes min(flush_target_count, targets_cap)
     * targets (at most one per controller); the core asks again with room for all of them when
     * flush_target_count > targets_cap. Region ids must be distinct. The core asks once per VM, when
     * it first needs them, and uses the answer for the VM's life. The controllers behind a region are,
     * for the core, the distinct controllers of its flush targets: it has no key for a controller
     * without a flush hint, so npt_vm_host_pmem_get reports controller_count as the number of those
     * distinct controllers (the backend's controller_count must not be smaller: NPT_ERR_BACKEND). */
    npt_status (*host_pmem_count)(void *backend_data, size_t *count);
    npt_status (*host_pmem_get)(void *backend_data, size_t index, npt_host_pmem_region *region,
                                npt_flush_target *targets, size_t targets_cap);
    /* Back [gpa, gpa+size) with host region `region` (an id) from `region_offset`; the hierarchies
     * point at `host_offset` (what npt_hierarchy_translate reports for its pages). The core has checked
     * alignment, bounds and overlaps. If a later step of the same npt_vm_add_nvdimm fails, the core
     * forgets the range without a call (it never maps it): a backend must then accept attach_pmem
     * again for the same gpa, which replaces the earlier one. */
    npt_status (*attach_pmem)(void *vm_data, uint64_t gpa, uint64_t size, uint32_t region, uint64_t region_offset,
                              uint64_t host_offset);
    /* The vFHA page: mapped to `host_offset` (a scratch page), read-only when `trapped` (a guest write
     * exits as NPT_EXIT_EPT_VIOLATION with NPT_EPTQ_WRITE, or the backend's MMIO-write exit reported
     * that way), read-write otherwise. Called again whenever the decision changes
     * (npt_vm_set_flush_options, another NVDIMM range), also to restore the previous one when a later
     * step fails. */
    npt_status (*define_flush_hint_page)(void *vm_data, uint64_t gpa, uint64_t host_offset, int trapped);
    /* Write one physical flush hint (drain controller `controller`'s WPQ): one of the targets
     * host_pmem_get gave for host region `region`. Any thread; concurrent calls for one target are
     * serialized by the core, calls for different targets are not. */
    npt_status (*physical_flush)(void *vm_data, uint32_t region, uint32_t controller, uint64_t address);
    /* Every earlier store / write-back of the vCPU reaches the controllers (SFENCE's guarantee).
     * Called on the vCPU's thread, after its trapped vFHA write exited, before any physical_flush
     * for it. */
    npt_status (*vcpu_fence)(void *vcpu_data);
    /* Complete the guest instruction whose write to the trapped page exited (the write is dropped):
     * the next vcpu_run resumes after it. */
    npt_status (*vcpu_complete_trapped_write)(void *vcpu_data);
    /* Guest writes to the vFHA that cost no exit, if the backend can count them (may be NULL: 0).
     * Reported as npt_flush_stats.untrapped_writes. */
    uint64_t (*untrapped_flush_hint_writes)(void *vm_data);
    /* A power failure of the host's persistent memory, if the backend models one (may be NULL:
     * npt_vm_power_failure answers NPT_ERR_UNSUPPORTED). */
    npt_status (*power_failure)(void *vm_data);

    /* ---- ABI 1.3 ---- */
    /* The instruction set its vCPUs run (NPT_GUEST_ISA_*): which guest image a scenario or a VMM
     * loads. A table without this member (an older size) or with 0 is NPT_GUEST_ISA_UNKNOWN. */
    uint64_t guest_isa;
    /* The privileged mode, said explicitly (NPT_CAP_PRIVILEGED_MODE). The core has decided that the
     * vCPU enters the mode now: every other vCPU is stopped outside guest code and the region is in
     * the view (the hierarchy the core exposes next maps it). The backend saves whatever it needs to
     * give the vCPU back its interrupted state exactly (the core keeps the npt_regs it read) and puts
     * it in the mode's entry state: CPL 0, paging off, rip = entry->entry_rip, gpr[0] = the vCPU's
     * index (on x86-64: 16-bit real mode, CS base entry_rip & ~0xFFFF, as SMM enters at SMBASE). A
     * table without it: the core writes that state with vcpu_set_regs (the backend cannot tell an
     * entry from any other register write). */
    npt_status (*vcpu_enter_privileged)(void *vcpu_data, const npt_privileged_entry *entry);
    /* The vCPU leaves the mode (its RSM was reported as NPT_EXIT_LEAVE_MODE, or the core undoes an
     * entry that failed half-way): the backend restores what it saved at entry; the core then writes
     * the npt_regs it saved with vcpu_set_regs. Called before the region leaves the view. */
    npt_status (*vcpu_leave_privileged)(void *vcpu_data);
    /* Statistics the backend keeps (its own counters: exits by its own reasons, memslot changes,
     * layout switches...), as name/value pairs: *count (never NULL) is set to how many there are;
     * when cap < *count return NPT_ERR_BUFFER_TOO_SMALL and write nothing. Names are static strings
     * (valid while the backend is registered), lower_case_with_underscores, stable between calls.
     * The core answers npt_vm_backend_stats / npt_vcpu_backend_stats with them (NULL: none). */
    npt_status (*vm_stats)(void *vm_data, npt_backend_stat *stats, size_t cap, size_t *count);
    npt_status (*vcpu_stats)(void *vcpu_data, npt_backend_stat *stats, size_t cap, size_t *count);

    /* ---- ABI 1.4 ---- */
    /* Optional (NULL, or a table older than 1.4: not called). The core's answer to an exit of this
     * vCPU, once it has applied it (the hierarchy exposed, the flush done...): `action` is the
     * npt_action npt_handle_exit returns (NPT_ACTION_RESUME also for the exits npt_vcpu_run handles
     * itself), `exit` the exit as the core rewrote it for the VMM (an MBEC violation's qualification).
     * On the vCPU's thread, after every decided exit of npt_vcpu_run and of npt_handle_exit. A backend
     * that runs guest code has nothing to do with it; the trace replay backend compares it with the
     * recorded answer. A status other than NPT_OK fails the npt_vcpu_run / npt_handle_exit call. */
    npt_status (*vcpu_exit_decided)(void *vcpu_data, uint32_t action, const npt_exit *exit);

    /* ---- ABI 1.5 ---- */
    /* Optional (NULL, or a table older than 1.5: not called, and the acquisitions cost the core one
     * check each). A backend with it orders the acquisitions of the VM's privileged-mode coordinator
     * lock (the trace replay backend makes each wait for its recorded turn; nothing else needs it).
     * Called by the core once the VM has a privileged-mode region, for every acquisition of that lock
     * except the VMM's setup calls (vCPU creation and destruction, npt_vm_set_stop_timeout): at
     * `site` (NPT_LOCK_SITE_*), on behalf of vCPU `vcpu` (its index; -1: a read by the VMM), twice:
     *   phase NPT_LOCK_TURN_WAIT: before the core takes the lock, holding no lock of its own (a
     *     vCPU's sites are on its own thread, inside npt_vcpu_run / npt_vcpu_run_raw /
     *     npt_handle_exit / npt_vcpu_leave_privileged); the backend may block here until it is this
     *     acquisition's turn. *value is 0 and not read back.
     *   phase NPT_LOCK_TURN_TAKEN: right after the core took the lock, which it holds; the backend
     *     must not block.
     *     *value holds the outcome the core saw (NPT_LOCK_SITE_ENTRY_WAKE: 1 when the entering vCPU's
     *     wait for the others to stop timed out, else 0); the backend may replace it with the outcome
     *     to use (a recorded one). NPT_ERR_BUSY: not this thread's turn after all (another thread
     *     acting for the same party took it): the core releases the lock and starts again at WAIT.
     * While the backend orders the acquisitions, a condition wait of the coordinator becomes "release
     * the lock, WAIT, take it, TAKEN" (the backend, not a signal, decides when the thread goes on).
     * Any other status fails the NPTKit call that needed the lock with that status (npt_vcpu_run,
     * npt_vcpu_raise_privileged, npt_vcpu_leave_privileged; the reads, npt_vcpu_raise_interrupt and
     * a vCPU's return from guest code take the lock anyway and the backend's next operation is
     * expected to fail); an entry whose turn failed
     * releases the stopped vCPUs as a timed-out entry does (nobody entered). Any thread. */
    npt_status (*vm_lock_turn)(void *vm_data, uint32_t phase, uint32_t site, int64_t vcpu, uint64_t *value);
} npt_backend_ops;

/* (ABI 1.5) Phases and sites of npt_backend_ops.vm_lock_turn (docs/replay-privileged-mode.md). */
#define NPT_LOCK_TURN_WAIT  0u
#define NPT_LOCK_TURN_TAKEN 1u
#define NPT_LOCK_SITE_RAISE           0u /* npt_vcpu_raise_privileged for `vcpu`, from any thread */
#define NPT_LOCK_SITE_INTERRUPT       1u /* another interrupt for `vcpu` (deferred while it is stopped) */
#define NPT_LOCK_SITE_CHECKPOINT      2u /* `vcpu`'s thread before it runs guest code */
#define NPT_LOCK_SITE_CHECKPOINT_WAKE 3u /* `vcpu`'s thread woken while parked (stopped, or waiting to enter) */
#define NPT_LOCK_SITE_LEFT_GUEST      4u /* `vcpu`'s thread back from guest code */
#define NPT_LOCK_SITE_ENTRY_RELOCK    5u /* the entering `vcpu`'s thread, after it kicked the vCPUs in guest code */
#define NPT_LOCK_SITE_ENTRY_WAKE      6u /* the entering `vcpu`'s thread woken while it waits for the others */
#define NPT_LOCK_SITE_LEAVE           7u /* `vcpu` leaves the mode (RSM) */
#define NPT_LOCK_SITE_READ            8u /* a read by the VMM (vcpu -1): statistics, holder */
#define NPT_LOCK_SITE_VCPU_READ       9u /* a read on `vcpu`'s own thread (does it hold the mode) */

/* Registers a backend in `ctx`. The ops table must stay valid until the
 * context is destroyed. NPT_ERR_ABI_MISMATCH if its major version differs,
 * NPT_ERR_EXISTS if the name is taken, NPT_ERR_INVALID_ARGUMENT if capabilities
 * has a bit no NPT_CAP_* defines.
 * The core calls the operations while it holds locks of the VM they serve: from
 * inside one, only npt_policy_get, npt_hierarchy_translate, npt_hierarchy_leaves
 * and npt_vm_get_stats may be called on that VM (they see the policy being
 * applied); any other call on it, and any destroy, gets NPT_ERR_STATE. An exit
 * reason or hierarchy outside the enums from vcpu_run is NPT_ERR_BACKEND. */
npt_status npt_backend_register(npt_context *ctx, const npt_backend_ops *ops);

/* ------------------------------------------------------------------------ */
/* ABI 1.2: guest NVDIMM tables and the one host NVDIMM discovery             */
/* ------------------------------------------------------------------------ */
/* The SSDT a VMM gives the guest beside the NFIT of npt_vm_get_nfit: in \_SB, the NVDIMM root
 * device NVDR (_HID "ACPI0012", the device Linux's nfit driver binds to; ACPI 6.0 section 9.20) with
 * one child NVxx per virtual DIMM whose _ADR is that DIMM's NFIT device handle. Both tables come from
 * one description of the VM's DIMMs, so their handles agree (the rules: Sources/NPTCore/GuestNVDIMM.swift).
 * The same contract as npt_vm_get_nfit: *needed (not NULL) is always set to the table's length; the
 * table is copied when buf_len >= *needed, else NPT_ERR_BUFFER_TOO_SMALL and nothing is written (buf
 * may be NULL with buf_len 0 to ask the size); NPT_ERR_INVALID_ARGUMENT for a NULL buf with a
 * non-zero buf_len; NPT_ERR_STATE when the VM has no NVDIMM range; NPT_ERR_BAD_HANDLE. */
npt_status npt_vm_get_nvdimm_ssdt(npt_vm *vm, void *buf, size_t buf_len, size_t *needed);

/* Persistence domains: where a power failure stops losing data (Linux's persistence_domain). */
#define NPT_PMEM_DOMAIN_MEDIA             0u /* none named (absent, empty or unknown): WPQs are lost */
#define NPT_PMEM_DOMAIN_MEMORY_CONTROLLER 1u /* "memory_controller": ADR drains the WPQs */
#define NPT_PMEM_DOMAIN_CPU_CACHE         2u /* "cpu_cache": the CPU caches are flushed too */

/* One libnvdimm region of a sysfs tree. A fixed layout (no size field): it never grows; a later ABI
 * would add another struct and call. */
typedef struct npt_sysfs_pmem_region {
    uint32_t id;                 /* N of the directory ROOT/regionN (the one numbering rule; 0 included) */
    uint32_t persistence_domain; /* NPT_PMEM_DOMAIN_* read from regionN/persistence_domain */
    uint64_t base, length;       /* regionN/resource, regionN/size */
    uint32_t controller_count;   /* distinct memory controllers (NFIT handle bits 8-27) of its DIMMs; a region
                                    with flush hints whose DIMMs have no NFIT handle counts one, key 0 */
    uint32_t flush_target_count; /* when deep_flush reads 1: one per controller (address 0: a physical flush
                                    writes "1" to ROOT/regionN/deep_flush); else 0 */
    uint32_t first_target;       /* its targets are targets[first_target .. first_target + flush_target_count) */
    int32_t deep_flush;          /* -1: no deep_flush file; else what it reads, 0 or 1 */
    int32_t needs_wpq_flush;     /* 1: flush targets and NPT_PMEM_DOMAIN_MEDIA (NPTKit's rule) */
    uint32_t reserved;           /* 0 */
} npt_sysfs_pmem_region;

/* Host NVDIMM discovery from a libnvdimm sysfs tree: the code the core uses for itself, offered to
 * plugins as npt_host_api.host_pmem_discover_sysfs (the KVM plugin uses it). root: the directory
 * holding regionN, nmemN (NULL: "/sys/bus/nd/devices"). Fills regions (sorted by id) and their flush
 * targets in one snapshot. region_count and target_count (neither may be NULL) are always set to
 * what the tree holds; if regions_cap or targets_cap is smaller, NPT_ERR_BUFFER_TOO_SMALL and nothing
 * is written (ask again with room: the tree may have changed meanwhile). regions (targets) may be
 * NULL only with regions_cap (targets_cap) 0. NPT_ERR_INVALID_ARGUMENT: NULL counts, NULL array with a
 * capacity, an empty root, or a malformed file in a region (npt_last_error names it and its content);
 * NPT_ERR_NOT_FOUND: root is not a readable directory. Any thread. */
npt_status npt_host_pmem_discover_sysfs(const char *root, npt_sysfs_pmem_region *regions, size_t regions_cap,
                                        size_t *region_count, npt_flush_target *targets, size_t targets_cap,
                                        size_t *target_count);

/* What the core offers a plugin (plugins do not link libnptkit.so: they get
 * this table, as SQLite extensions get sqlite3_api_routines). A member added by a later minor ABI
 * exists only when `size` covers it: a plugin checks
 * host->size >= offsetof(npt_host_api, member) + sizeof(host->member) before reading it. */
struct npt_host_api {
    uint32_t abi_version;
    uint32_t size;
    npt_status (*hierarchy_translate)(npt_vm *vm, uint32_t hierarchy, uint64_t gpa, npt_translation *out);
    npt_status (*hierarchy_leaves)(npt_vm *vm, uint32_t hierarchy, npt_leaf_cb cb, void *user_data);
    const char *(*status_string)(npt_status status);
    /* ---- ABI 1.2 ---- */
    /* npt_host_pmem_discover_sysfs: the one host NVDIMM discovery. */
    npt_status (*host_pmem_discover_sysfs)(const char *root, npt_sysfs_pmem_region *regions, size_t regions_cap,
                                           size_t *region_count, npt_flush_target *targets, size_t targets_cap,
                                           size_t *target_count);
    /* npt_last_error: the detail of the last failed call of this table on the calling thread. */
    const char *(*last_error)(void);
    /* ---- ABI 1.3 ---- */
    /* The error channel. A plugin's init or operation that fails says why here, on the calling
     * thread, before it returns its status: the core puts the message (copied) in npt_last_error()
     * of the NPTKit call that failed ("backend 'kvm' vcpu_run: <message>"). A message set by an
     * operation that then returns NPT_OK is dropped. */
    void (*set_error)(const char *message);
};

/* Plugin interface 1 (ABI 1.0): the symbol a plugin .so exports. It checks host->abi_version, and
 * returns its ops table in *ops. It takes no configuration: such a plugin is loaded with no arguments
 * (npt_plugin_load_with refuses arguments for it). */
#define NPT_PLUGIN_ENTRY_SYMBOL "npt_plugin_entry"
typedef npt_status (*npt_plugin_entry_fn)(const npt_host_api *host, const npt_backend_ops **ops);

/* Plugin interface 2 (ABI 1.3), as qemu-plugin.h's qemu_plugin_install and sqlite3ext.h's
 * extension entry: the plugin gets the host table and the caller's key/value arguments. */
typedef struct npt_plugin_arg {
    const char *key;      /* not NULL, not empty, no '=' */
    const char *value;    /* not NULL (may be empty) */
} npt_plugin_arg;

typedef struct npt_plugin_info {
    uint32_t size;              /* sizeof(npt_plugin_info) as the core was built: read members it covers */
    uint32_t abi_version;       /* the core's NPT_ABI_VERSION */
    const npt_host_api *host;   /* valid while the plugin is loaded */
    const char *path;           /* the file the core loaded; valid during the call */
    size_t argc;
    const npt_plugin_arg *args; /* valid during the call only: copy what you keep */
} npt_plugin_info;

/* The entry of a plugin of interface 2 (preferred to npt_plugin_entry when a .so exports both). It
 * checks NPT_ABI_MAJOR(info->abi_version) (NPT_ERR_ABI_MISMATCH for another major), parses every
 * argument and refuses one it does not know or cannot use (NPT_ERR_INVALID_ARGUMENT), explaining why
 * through info->host->set_error (the core makes it npt_last_error() of the load), and only then
 * returns its ops table in *ops. Called once per load, on the loading thread. */
#define NPT_PLUGIN_INIT_SYMBOL "npt_plugin_init"
typedef npt_status (*npt_plugin_init_fn)(const npt_plugin_info *info, const npt_backend_ops **ops);

/* A bare file name (no '/', e.g. "libnptkit-kvm.so") is looked up first in the plugin directory of
 * the installed library, LIBDIR/nptkit/plugins (`pkg-config --variable=plugindir nptkit`), then in
 * the library's own directory; a name found in neither goes to dlopen() as it is. */
/* dlopen()s `path` (RTLD_NOW | RTLD_LOCAL), calls its entry and registers the backend. On success
 * *name (may be NULL) receives the backend's name (owned by the context). A library is never
 * dlclose()d (its code may hold runtime state: a Swift image cannot be unloaded), also when it is
 * refused. NPT_ERR_PLUGIN: not loadable, or no entry symbol; NPT_ERR_ABI_MISMATCH: another ABI major
 * version; a plugin's own refusal keeps its status, and npt_last_error() carries its message. */
npt_status npt_plugin_load(npt_context *ctx, const char *path, const char **name);

/* (ABI 1.3) npt_plugin_load with arguments for the plugin (args may be NULL when argc is 0).
 * NPT_ERR_INVALID_ARGUMENT: a NULL key or value, an empty key, a key with '=', a key given twice,
 * or arguments for a plugin of interface 1 (which cannot take any); argc above 4096 (up to SIZE_MAX:
 * refused with its value). Nothing is registered when the plugin refuses. Both loads hold the
 * context: npt_context_destroy waits for a load in flight. */
npt_status npt_plugin_load_with(npt_context *ctx, const char *path, const npt_plugin_arg *args, size_t argc,
                                const char **name);

/* (ABI 1.3) The backend's own statistics for `vm` / `vcpu` (npt_backend_ops.vm_stats / vcpu_stats;
 * the simulator's are built in): *count (not NULL) is always set to how many there are; they are
 * copied when cap >= *count, else NPT_ERR_BUFFER_TOO_SMALL and nothing is written (stats may be NULL
 * with cap 0 to ask the count). Names stay valid while the context lives. A backend without them:
 * *count = 0, NPT_OK. Any thread, also while the vCPU runs; the backend's vm_stats / vcpu_stats is
 * never called after the object's destroy (NPT_ERR_BAD_HANDLE, or NPT_ERR_BUSY while a destroy is in
 * progress). cap may be anything up to SIZE_MAX. A backend that asks for room for more than 4096 or
 * reports more than it had room for: NPT_ERR_BACKEND. */
npt_status npt_vm_backend_stats(npt_vm *vm, npt_backend_stat *stats, size_t cap, size_t *count);
npt_status npt_vcpu_backend_stats(npt_vcpu *vcpu, npt_backend_stat *stats, size_t cap, size_t *count);

#ifdef __cplusplus
}
#endif

/* The built-in simulator's own configuration. */
#include "nptkit_sim.h"
#endif /* NPTKIT_H */
