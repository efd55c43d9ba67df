/*
 * nptkit.h - the public C ABI of NPTKit (libnptkit.so).
 *
 * NPTKit implements memory-virtualization controls that hypervisors need and
 * hardware does not always give; this ABI covers emulated mode-based execute
 * control (MBEC) over pluggable backends.
 *
 * Conventions
 *  - Every call returns npt_status (NPT_OK == 0, errors are negative).
 *    npt_status_string() names a status; npt_last_error() returns the detail of
 *    the last failed call made *on the calling thread* (which argument, which
 *    range). A failed call changes nothing.
 *  - Handles are opaque. A handle that was destroyed, or never created, is
 *    refused with NPT_ERR_BAD_HANDLE (handles are never reused).
 *  - Structs that may grow start with `size`: set it to sizeof(the struct) you
 *    were compiled with. The library reads or writes only that many bytes.
 *  - Ownership: every create has its destroy. Strings the library returns are
 *    owned by the library and stay valid until the owning context is destroyed.
 *  - Thread safety: unless a function says otherwise it may be called from any
 *    thread. Calls on one VM are serialized by the VM; npt_vcpu_run on one vCPU
 *    must not be called from two threads at once (NPT_ERR_BUSY).
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
#define NPT_ABI_VERSION_MINOR 0u
#define NPT_ABI_VERSION ((NPT_ABI_VERSION_MAJOR << 16) | NPT_ABI_VERSION_MINOR)
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
    NPT_ERR_STATE = -14            /* call not valid in the current state */
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
#define NPT_PERM_READ  (UINT64_C(1) << 0)
#define NPT_PERM_WRITE (UINT64_C(1) << 1)
#define NPT_PERM_SX    (UINT64_C(1) << 2)  /* supervisor-mode execute (X with MBEC) */
#define NPT_PERM_UX    (UINT64_C(1) << 10) /* user-mode execute (MBEC) */
#define NPT_PERM_ALL   (NPT_PERM_READ | NPT_PERM_WRITE | NPT_PERM_SX | NPT_PERM_UX)

#define NPT_PAGE_4K (UINT64_C(1) << 12)
#define NPT_PAGE_2M (UINT64_C(1) << 21)
#define NPT_PAGE_1G (UINT64_C(1) << 30)

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
/* Fails with NPT_ERR_BUSY while VMs created from it are alive. */
npt_status npt_context_destroy(npt_context *ctx);

#define NPT_CAP_MBEC_EMULATION    (UINT64_C(1) << 0) /* can expose a hierarchy per vCPU */
#define NPT_CAP_EXIT_ON_ESCALATE  (UINT64_C(1) << 1) /* exits on user->supervisor */
#define NPT_CAP_EXIT_ON_RETURN    (UINT64_C(1) << 2) /* exits on supervisor->user */
#define NPT_CAP_LINEAR_MODE_INFO  (UINT64_C(1) << 3) /* violation reports the U/S of the linear address */
#define NPT_CAP_RUN               (UINT64_C(1) << 4) /* runs guest code */
#define NPT_CAP_PRIVILEGED_MODE   (UINT64_C(1) << 5) /* can stop vCPUs and back the privileged-mode region */

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
npt_status npt_backend_get(const npt_context *ctx, size_t index, npt_backend_info *info);
/* Makes `name` the default backend for VMs created with backend == NULL. */
npt_status npt_backend_set_default(npt_context *ctx, const char *name);

/* ------------------------------------------------------------------------ */
/* VM                                                                         */
/* ------------------------------------------------------------------------ */
typedef enum npt_mbec_mode {
    /* Exit on every return to user mode and expose the user hierarchy, and use
     * the linear address's U/S to pick the hierarchy on a violation: matches
     * hardware MBEC whenever the guest runs with SMEP on. */
    NPT_MBEC_EXACT = 0,
    /* The patent's minimum: exit only on escalation; the supervisor hierarchy
     * stays exposed after a return to user mode until a violation switches. */
    NPT_MBEC_LAZY = 1
} npt_mbec_mode;

typedef struct npt_vm_config {
    uint32_t size;            /* sizeof(npt_vm_config) */
    uint32_t mbec_mode;       /* npt_mbec_mode */
    const char *backend;      /* NULL: the context's default */
    uint64_t ram_size;        /* guest RAM at GPA 0, multiple of 4 KiB, > 0 */
    uint64_t default_perms;   /* policy of RAM before any npt_policy_set */
    uint64_t max_steps_per_run; /* simulator: instruction budget per run, 0 = none */
} npt_vm_config;

npt_status npt_vm_create(npt_context *ctx, const npt_vm_config *config, npt_vm **out);
/* Destroys the VM and its vCPUs. NPT_ERR_BUSY if a vCPU is running. */
npt_status npt_vm_destroy(npt_vm *vm);

/* Guest physical memory access (host side, no permission checks). */
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

#define NPT_CR4_SMEP (UINT64_C(1) << 20)
#define NPT_CR4_SMAP (UINT64_C(1) << 21)
#define NPT_EFER_NXE (UINT64_C(1) << 11)

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
#define NPT_EPTQ_READ         (UINT64_C(1) << 0)  /* access was a data read */
#define NPT_EPTQ_WRITE        (UINT64_C(1) << 1)  /* access was a data write */
#define NPT_EPTQ_FETCH        (UINT64_C(1) << 2)  /* access was an instruction fetch */
#define NPT_EPTQ_READABLE     (UINT64_C(1) << 3)  /* entry permitted read */
#define NPT_EPTQ_WRITABLE     (UINT64_C(1) << 4)  /* entry permitted write */
#define NPT_EPTQ_EXECUTABLE   (UINT64_C(1) << 5)  /* entry permitted (supervisor) execute */
#define NPT_EPTQ_UEXECUTABLE  (UINT64_C(1) << 6)  /* entry permitted user execute (MBEC) */
#define NPT_EPTQ_GLA_VALID    (UINT64_C(1) << 7)
#define NPT_EPTQ_GLA_TRANSL   (UINT64_C(1) << 8)
#define NPT_EPTQ_USER_LINEAR  (UINT64_C(1) << 9)  /* U/S of the linear address was user */

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

npt_status npt_vcpu_create(npt_vm *vm, uint32_t index, npt_vcpu **out);
npt_status npt_vcpu_destroy(npt_vcpu *vcpu);
npt_status npt_vcpu_get_regs(npt_vcpu *vcpu, npt_regs *regs);
npt_status npt_vcpu_set_regs(npt_vcpu *vcpu, const npt_regs *regs);

/* Library loop: runs until an exit the core does not handle itself (halt, IO,
 * a violation to report, a guest fault, the budget). Escalation, return and
 * violations that a hierarchy switch resolves never come back. */
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
    size_t contents_len;    /* at most length */
    uint64_t entry_offset;  /* 8-byte aligned offset of the entry point */
    uint64_t perms;         /* policy of the region's pages while visible; 0 = R|W|SX */
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
/* How long an entry waits for the other vCPUs to stop (default 1 s). */
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
#define NPT_EXITCTL_ESCALATION (1u << 0)
#define NPT_EXITCTL_RETURN     (1u << 1)

typedef struct npt_host_api npt_host_api;

/* A backend: the mechanism. Every member may be NULL except name and the
 * version fields; a NULL operation makes the core report NPT_ERR_UNSUPPORTED.
 * `backend_data` is the pointer given with the ops; `vm_data`/`vcpu_data` are
 * what vm_create/vcpu_create returned. */
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
} npt_backend_ops;

/* Registers a backend in `ctx`. The ops table must stay valid until the
 * context is destroyed. NPT_ERR_ABI_MISMATCH if its major version differs,
 * NPT_ERR_EXISTS if the name is taken. */
npt_status npt_backend_register(npt_context *ctx, const npt_backend_ops *ops);

/* What the core offers a plugin (plugins do not link libnptkit.so: they get
 * this table, as SQLite extensions get sqlite3_api_routines). */
struct npt_host_api {
    uint32_t abi_version;
    uint32_t size;
    npt_status (*hierarchy_translate)(npt_vm *vm, uint32_t hierarchy, uint64_t gpa, npt_translation *out);
    npt_status (*hierarchy_leaves)(npt_vm *vm, uint32_t hierarchy, npt_leaf_cb cb, void *user_data);
    const char *(*status_string)(npt_status status);
};

/* The one symbol a plugin .so exports. It checks host->abi_version, and
 * returns its ops table in *ops. */
#define NPT_PLUGIN_ENTRY_SYMBOL "npt_plugin_entry"
typedef npt_status (*npt_plugin_entry_fn)(const npt_host_api *host, const npt_backend_ops **ops);

/* dlopen()s `path`, calls its entry and registers the backend. On success
 * *name (may be NULL) receives the backend's name (owned by the context).
 * NPT_ERR_PLUGIN: not loadable or no entry symbol; NPT_ERR_ABI_MISMATCH:
 * another ABI major version. */
npt_status npt_plugin_load(npt_context *ctx, const char *path, const char **name);

#ifdef __cplusplus
}
#endif
#endif /* NPTKIT_H */
