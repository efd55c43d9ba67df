/*
 * sample_backend.c - an NPTKit backend written in C, loaded as a plugin.
 *
 * Build:  cc -std=c11 -shared -fPIC -I include examples/plugin/sample_backend.c \
 *            -o libnptkit-sample.so -lpthread
 * Load:   npt_plugin_load(ctx, "./libnptkit-sample.so", &name)   (name == "sample"), or with
 *         arguments (plugin interface 2, npt_plugin_init):
 *           npt_plugin_arg a[] = {{"name", "sample-two"}};
 *           npt_plugin_load_with(ctx, "./libnptkit-sample.so", a, 1, &name)
 *
 * What a backend is (include/nptkit.h, "Backends as a table of function pointers"): the
 * mechanism, never the policy. The core decides which shadow hierarchy a vCPU must see and tells
 * the backend through vcpu_set_hierarchy; it tells it which translations changed through
 * invalidate; it asks it to run a vCPU and decides what to do with each exit.
 *
 * This backend holds real guest memory (a calloc'd buffer of config->ram_size bytes) and real
 * register files, but it does not execute guest code: vcpu_run plays a script of exits set with
 * sample_backend_set_script(). That is enough to drive the core's decisions from C, and it keeps
 * the example short. A backend that runs code (KVM, a simulator) fills the same npt_exit.
 *
 * Rules a plugin follows:
 *  - it does not link libnptkit.so: whatever it needs from the core comes in the npt_host_api
 *    table given to npt_plugin_init / npt_plugin_entry (kept in `host` below);
 *  - its entry checks the host's ABI major version and refuses another one, and refuses an
 *    argument it does not know, saying why through host->set_error (the core's error channel:
 *    the message becomes npt_last_error() of the call that failed, also for operations);
 *  - the ops table it returns stays valid for as long as the plugin is loaded (it is static).
 *
 * Persistent memory (NPT_CAP_PERSISTENT_MEMORY, ABI 1.1): the backend reports one host region
 * (SAMPLE_PMEM_REGION, two memory controllers with a flush hint each, WPQs outside the persistence
 * domain) and records what the core asks: the NVDIMM ranges it backs, the vFHA page and whether it
 * traps, each physical flush hint write, each fence and each completed trapped write. It has no
 * media: NVDIMM ranges hold no data here (memory_read/memory_write refuse them) and power_failure
 * stays NULL (unsupported). A guest flush is a scripted NPT_EXIT_EPT_VIOLATION with NPT_EPTQ_WRITE
 * at the vFHA; the core answers it with vcpu_fence, one physical_flush per controller and
 * vcpu_complete_trapped_write, then runs the vCPU again.
 *
 * Threads: the core serializes calls on one vCPU, but different vCPUs and VMs may be driven from
 * different threads, and invalidate may come from any thread. One mutex guards the shared
 * counters, the script and the persistent-memory records; memory accesses are per VM and need no
 * lock for this example.
 */
#include <nptkit.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "sample_backend.h"

#define EXPORT __attribute__((visibility("default")))

static const npt_host_api *host; /* the core's functions (the error channel; tests read it) */

/* Says why an operation fails, through the core's error channel (ABI 1.3) when the host has one. */
static void say(const char *message) {
    if (host != NULL && host->size >= offsetof(npt_host_api, set_error) + sizeof host->set_error && host->set_error)
        host->set_error(message);
}

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct sample_counters counters;
static npt_exit *script;
static size_t script_len, script_pos;
static uint32_t fail_pmem; /* SAMPLE_FAIL_*: the next call of these fails */

#define COUNT(stmt)                  \
    do {                             \
        pthread_mutex_lock(&lock);   \
        stmt;                        \
        pthread_mutex_unlock(&lock); \
    } while (0)

#define SAMPLE_MAX_NVDIMMS 64 /* the core's limit per VM */

struct sample_nvdimm {
    uint64_t gpa, size, region_offset, host_offset;
};

struct sample_vm {
    uint8_t *ram;
    uint64_t ram_size;
    /* persistent memory (under `lock`) */
    struct sample_nvdimm nvdimms[SAMPLE_MAX_NVDIMMS];
    size_t nvdimm_count;
    int flush_hint_defined, flush_hint_trapped;
    uint64_t flush_hint_gpa, flush_hint_host_offset;
};

struct sample_vcpu {
    struct sample_vm *vm;
    uint32_t index;
    uint32_t hierarchy;     /* what the core last exposed: NPT_HIERARCHY_* */
    uint32_t exit_controls; /* NPT_EXITCTL_* */
    int trapped_write;      /* the last exit was a write to the trapped vFHA, not yet completed */
    uint64_t runs;          /* exits this vCPU played (under `lock`) */
    npt_regs regs;
};

/* Takes `op` out of fail_pmem; returns 1 if this call must fail. Called with `lock` held. */
static int failing(uint32_t op) {
    if ((fail_pmem & op) == 0) return 0;
    fail_pmem &= ~op;
    counters.pmem_failures++;
    say("failure injected by sample_backend_fail_pmem");
    return 1;
}

/* ---- VMs and memory ---------------------------------------------------- */

static npt_status sample_vm_create(void *backend_data, npt_vm *vm, const npt_vm_config *config, void **vm_data) {
    (void)backend_data;
    (void)vm; /* the core's handle: what host->hierarchy_translate would take */
    if (config == NULL || vm_data == NULL || config->ram_size == 0) return NPT_ERR_INVALID_ARGUMENT;
    if (config->ram_size > SIZE_MAX) return NPT_ERR_OUT_OF_RANGE;
    struct sample_vm *v = calloc(1, sizeof *v);
    if (v == NULL) return NPT_ERR_BACKEND;
    v->ram = calloc(1, (size_t)config->ram_size);
    if (v->ram == NULL) {
        free(v);
        return NPT_ERR_BACKEND;
    }
    v->ram_size = config->ram_size;
    *vm_data = v;
    COUNT(counters.vm_creates++);
    return NPT_OK;
}

static void sample_vm_destroy(void *vm_data) {
    struct sample_vm *v = vm_data;
    if (v == NULL) return;
    free(v->ram);
    free(v);
    COUNT(counters.vm_destroys++);
}

/* [gpa, gpa + len) inside guest RAM, without overflowing. */
static int in_ram(const struct sample_vm *v, uint64_t gpa, size_t len) {
    return gpa <= v->ram_size && (uint64_t)len <= v->ram_size - gpa;
}

static npt_status sample_memory_write(void *vm_data, uint64_t gpa, const void *data, size_t len) {
    struct sample_vm *v = vm_data;
    if (data == NULL && len > 0) return NPT_ERR_INVALID_ARGUMENT;
    if (!in_ram(v, gpa, len)) return NPT_ERR_OUT_OF_RANGE;
    if (len > 0) memcpy(v->ram + gpa, data, len);
    COUNT(counters.memory_writes++);
    return NPT_OK;
}

static npt_status sample_memory_read(void *vm_data, uint64_t gpa, void *data, size_t len) {
    struct sample_vm *v = vm_data;
    if (data == NULL && len > 0) return NPT_ERR_INVALID_ARGUMENT;
    if (!in_ram(v, gpa, len)) return NPT_ERR_OUT_OF_RANGE;
    if (len > 0) memcpy(data, v->ram + gpa, len);
    COUNT(counters.memory_reads++);
    return NPT_OK;
}

/* INVEPT analogue. A backend with a TLB or with per-hierarchy mappings drops the translations of
 * [gpa, gpa + size) in `hierarchy` here; this one has none, so it only counts. */
static npt_status sample_invalidate(void *vm_data, uint32_t hierarchy, uint64_t gpa, uint64_t size) {
    (void)vm_data;
    if (hierarchy >= NPT_HIERARCHY_COUNT) return NPT_ERR_INVALID_ARGUMENT;
    COUNT(counters.invalidations++; counters.invalidated_hierarchies |= UINT64_C(1) << hierarchy;
          counters.last_invalidate_gpa = gpa; counters.last_invalidate_size = size);
    return NPT_OK;
}

/* ---- vCPUs --------------------------------------------------------------- */

static npt_status sample_vcpu_create(void *vm_data, uint32_t index, void **vcpu_data) {
    if (vcpu_data == NULL) return NPT_ERR_INVALID_ARGUMENT;
    struct sample_vcpu *c = calloc(1, sizeof *c);
    if (c == NULL) return NPT_ERR_BACKEND;
    c->vm = vm_data;
    c->index = index;
    c->hierarchy = NPT_HIERARCHY_SUPERVISOR;
    c->regs.size = sizeof c->regs;
    c->regs.rflags = 2;
    *vcpu_data = c;
    COUNT(counters.vcpu_creates++);
    return NPT_OK;
}

static void sample_vcpu_destroy(void *vcpu_data) {
    free(vcpu_data);
    COUNT(counters.vcpu_destroys++);
}

static npt_status sample_vcpu_get_regs(void *vcpu_data, npt_regs *regs) {
    struct sample_vcpu *c = vcpu_data;
    if (regs == NULL || regs->size < sizeof *regs) return NPT_ERR_INVALID_ARGUMENT;
    *regs = c->regs;
    COUNT(counters.get_regs++);
    return NPT_OK;
}

static npt_status sample_vcpu_set_regs(void *vcpu_data, const npt_regs *regs) {
    struct sample_vcpu *c = vcpu_data;
    if (regs == NULL || regs->size < sizeof *regs) return NPT_ERR_INVALID_ARGUMENT;
    if (regs->cpl != 0 && regs->cpl != 3) return NPT_ERR_INVALID_ARGUMENT;
    c->regs = *regs;
    c->regs.size = sizeof c->regs;
    COUNT(counters.set_regs++);
    return NPT_OK;
}

/* The core decided which hierarchy this vCPU must see; a hardware backend would load the root of
 * that hierarchy (an EPTP) here. */
static npt_status sample_vcpu_set_hierarchy(void *vcpu_data, uint32_t hierarchy) {
    struct sample_vcpu *c = vcpu_data;
    if (hierarchy >= NPT_HIERARCHY_COUNT) return NPT_ERR_INVALID_ARGUMENT;
    c->hierarchy = hierarchy;
    COUNT(counters.hierarchy_log[counters.set_hierarchy % SAMPLE_HIERARCHY_LOG] = hierarchy;
          counters.set_hierarchy++);
    return NPT_OK;
}

static npt_status sample_vcpu_set_exit_controls(void *vcpu_data, uint32_t controls) {
    struct sample_vcpu *c = vcpu_data;
    if (controls & ~(uint32_t)(NPT_EXITCTL_ESCALATION | NPT_EXITCTL_RETURN)) return NPT_ERR_INVALID_ARGUMENT;
    c->exit_controls = controls;
    COUNT(counters.set_exit_controls++; counters.last_exit_controls = controls);
    return NPT_OK;
}

/* "Runs" the vCPU: hands out the next scripted exit. The exit reports what the hardware would:
 * the hierarchy exposed at the exit and the instruction pointer; the CPL of the scripted exit
 * becomes the vCPU's CPL (the guest got there). */
static npt_status sample_vcpu_run(void *vcpu_data, npt_exit *exit) {
    struct sample_vcpu *c = vcpu_data;
    if (exit == NULL || exit->size < sizeof *exit) return NPT_ERR_INVALID_ARGUMENT;
    npt_exit next;
    int have = 0;
    pthread_mutex_lock(&lock);
    if (script_pos < script_len) {
        next = script[script_pos++];
        have = 1;
        counters.runs++;
    }
    pthread_mutex_unlock(&lock);
    if (!have) { /* nothing left to play */
        say("the exit script is exhausted (sample_backend_set_script)");
        return NPT_ERR_STATE;
    }
    COUNT(c->runs++);
    /* A write to the vFHA while it traps: the guest instruction stays pending until the core
     * completes it (vcpu_complete_trapped_write). */
    pthread_mutex_lock(&lock);
    c->trapped_write = next.reason == NPT_EXIT_EPT_VIOLATION && (next.qualification & NPT_EPTQ_WRITE) != 0 &&
                       c->vm->flush_hint_defined && c->vm->flush_hint_trapped &&
                       (next.gpa & ~UINT64_C(0xFFF)) == c->vm->flush_hint_gpa;
    pthread_mutex_unlock(&lock);
    if (next.cpl == 0 || next.cpl == 3) c->regs.cpl = next.cpl;
    next.size = exit->size;
    next.cpl = c->regs.cpl;
    next.hierarchy = c->hierarchy;
    if (next.rip == 0) next.rip = c->regs.rip;
    *exit = next;
    return NPT_OK;
}

/* Injecting an exception needs a guest that runs; this backend has none. */
static npt_status sample_vcpu_inject_fault(void *vcpu_data, uint32_t vector, uint64_t error_code, uint64_t address) {
    (void)vcpu_data;
    (void)vector;
    (void)error_code;
    (void)address;
    COUNT(counters.inject_fault++);
    return NPT_ERR_UNSUPPORTED;
}

/* ---- persistent memory ---------------------------------------------------- */

static const npt_flush_target sample_targets[SAMPLE_PMEM_CONTROLLERS] = {
    {0, 0, SAMPLE_PMEM_HINT0},
    {1, 0, SAMPLE_PMEM_HINT1},
};

/* Host discovery. A KVM backend reads the host's NFIT (or sysfs) here. */
static npt_status sample_host_pmem_count(void *backend_data, size_t *count) {
    (void)backend_data;
    if (count == NULL) return NPT_ERR_INVALID_ARGUMENT;
    *count = 1;
    return NPT_OK;
}

static npt_status sample_host_pmem_get(void *backend_data, size_t index, npt_host_pmem_region *region,
                                       npt_flush_target *targets, size_t targets_cap) {
    (void)backend_data;
    if (region == NULL || region->size < sizeof *region) return NPT_ERR_INVALID_ARGUMENT;
    if (targets == NULL && targets_cap > 0) return NPT_ERR_INVALID_ARGUMENT;
    if (index != 0) return NPT_ERR_NOT_FOUND;
    region->id = SAMPLE_PMEM_REGION;
    region->base = SAMPLE_PMEM_BASE;
    region->length = SAMPLE_PMEM_LENGTH;
    region->controller_count = SAMPLE_PMEM_CONTROLLERS;
    region->flush_target_count = SAMPLE_PMEM_CONTROLLERS;
    region->needs_wpq_flush = 1;
    for (size_t i = 0; i < SAMPLE_PMEM_CONTROLLERS && i < targets_cap; i++) targets[i] = sample_targets[i];
    return NPT_OK;
}

/* The core picked host_offset; a hardware backend maps the host region's pages there (mmap of the
 * device DAX or of /dev/mem at SAMPLE_PMEM_BASE + region_offset into the VM's memory slot). */
static npt_status sample_attach_pmem(void *vm_data, uint64_t gpa, uint64_t size, uint32_t region,
                                     uint64_t region_offset, uint64_t host_offset) {
    struct sample_vm *v = vm_data;
    if (region != SAMPLE_PMEM_REGION) return NPT_ERR_NOT_FOUND;
    if (size == 0 || region_offset > SAMPLE_PMEM_LENGTH || size > SAMPLE_PMEM_LENGTH - region_offset)
        return NPT_ERR_OUT_OF_RANGE;
    npt_status st = NPT_OK;
    pthread_mutex_lock(&lock);
    size_t i = 0;
    while (i < v->nvdimm_count && v->nvdimms[i].gpa != gpa) i++; /* again after a failed add: replace */
    if (failing(SAMPLE_FAIL_ATTACH)) {
        st = NPT_ERR_BACKEND;
    } else if (i == SAMPLE_MAX_NVDIMMS) {
        st = NPT_ERR_OUT_OF_RANGE;
    } else {
        struct sample_nvdimm n = {gpa, size, region_offset, host_offset};
        v->nvdimms[i] = n;
        if (i == v->nvdimm_count) v->nvdimm_count++;
        counters.pmem_attaches++;
        counters.last_attach_gpa = gpa;
        counters.last_attach_size = size;
        counters.last_attach_region = region;
        counters.last_attach_region_offset = region_offset;
        counters.last_attach_host_offset = host_offset;
    }
    pthread_mutex_unlock(&lock);
    return st;
}

/* The vFHA: a hardware backend maps the scratch page at host_offset, read-only when trapped. */
static npt_status sample_define_flush_hint_page(void *vm_data, uint64_t gpa, uint64_t host_offset, int trapped) {
    struct sample_vm *v = vm_data;
    if ((gpa | host_offset) & UINT64_C(0xFFF)) return NPT_ERR_MISALIGNED;
    npt_status st = NPT_OK;
    pthread_mutex_lock(&lock);
    if (failing(SAMPLE_FAIL_DEFINE_FLUSH_HINT)) {
        st = NPT_ERR_BACKEND;
    } else {
        v->flush_hint_defined = 1;
        v->flush_hint_trapped = trapped != 0;
        v->flush_hint_gpa = gpa;
        v->flush_hint_host_offset = host_offset;
        counters.flush_hint_defines++;
        counters.flush_hint_trapped = trapped != 0;
        counters.flush_hint_gpa = gpa;
        counters.flush_hint_host_offset = host_offset;
    }
    pthread_mutex_unlock(&lock);
    return st;
}

/* A hardware backend writes the flush hint (a store to the mapped address, then SFENCE). */
static npt_status sample_physical_flush(void *vm_data, uint32_t region, uint32_t controller, uint64_t address) {
    (void)vm_data;
    if (region != SAMPLE_PMEM_REGION) return NPT_ERR_NOT_FOUND;
    if (controller >= SAMPLE_PMEM_CONTROLLERS || address != sample_targets[controller].address)
        return NPT_ERR_INVALID_ARGUMENT;
    npt_status st = NPT_OK;
    pthread_mutex_lock(&lock);
    if (failing(SAMPLE_FAIL_PHYSICAL_FLUSH)) {
        st = NPT_ERR_BACKEND;
    } else {
        counters.physical_flushes++;
        counters.controller_flushes[controller]++;
        counters.controller_flush_address[controller] = address;
    }
    pthread_mutex_unlock(&lock);
    return st;
}

/* On hardware the vCPU's stores are already ordered by the VM exit; a backend that buffers them
 * (a simulator) drains them here. */
static npt_status sample_vcpu_fence(void *vcpu_data) {
    (void)vcpu_data;
    npt_status st = NPT_OK;
    pthread_mutex_lock(&lock);
    if (failing(SAMPLE_FAIL_FENCE)) st = NPT_ERR_BACKEND;
    else counters.fences++;
    pthread_mutex_unlock(&lock);
    return st;
}

/* A hardware backend skips the faulting instruction (advances RIP by its length). */
static npt_status sample_vcpu_complete_trapped_write(void *vcpu_data) {
    struct sample_vcpu *c = vcpu_data;
    npt_status st = NPT_OK;
    pthread_mutex_lock(&lock);
    if (!c->trapped_write) {
        st = NPT_ERR_STATE; /* the last exit was not a write to the trapped vFHA */
    } else {
        c->trapped_write = 0;
        counters.completed_trapped_writes++;
    }
    pthread_mutex_unlock(&lock);
    return st;
}

/* ---- the ops table and the entry ---------------------------------------- */

/* ---- statistics (ABI 1.3) ---------------------------------------------- */

static npt_status give_stats(const npt_backend_stat *have, size_t n, npt_backend_stat *stats, size_t cap,
                             size_t *count) {
    if (count == NULL) return NPT_ERR_INVALID_ARGUMENT;
    *count = n;
    if (cap < n) return NPT_ERR_BUFFER_TOO_SMALL;
    if (stats == NULL) return NPT_ERR_INVALID_ARGUMENT;
    memcpy(stats, have, n * sizeof *have);
    return NPT_OK;
}

static npt_status sample_vm_stats(void *vm_data, npt_backend_stat *stats, size_t cap, size_t *count) {
    struct sample_vm *v = vm_data;
    npt_backend_stat have[2] = {{"ram_bytes", v->ram_size}, {"nvdimm_ranges", 0}};
    COUNT(have[1].value = v->nvdimm_count);
    return give_stats(have, 2, stats, cap, count);
}

static npt_status sample_vcpu_stats(void *vcpu_data, npt_backend_stat *stats, size_t cap, size_t *count) {
    struct sample_vcpu *c = vcpu_data;
    npt_backend_stat have[2] = {{"scripted_exits", 0}, {"hierarchy", 0}};
    COUNT(have[0].value = c->runs; have[1].value = c->hierarchy);
    return give_stats(have, 2, stats, cap, count);
}

static const npt_backend_ops sample_ops = {
    .abi_version = NPT_ABI_VERSION,
    .size = sizeof(npt_backend_ops),
    .name = SAMPLE_BACKEND_NAME,
    .description = "sample C backend: calloc'd guest memory, scripted exits",
    /* It can expose a hierarchy per vCPU, reports both transitions and the U/S of the linear
     * address in its (scripted) violations, and "runs". It cannot back a privileged-mode region:
     * define_region and vcpu_kick stay NULL, and the core answers NPT_ERR_UNSUPPORTED for them.
     * It has persistent memory (every required operation below is there); power_failure and
     * untrapped_flush_hint_writes stay NULL. */
    .capabilities = NPT_CAP_MBEC_EMULATION | NPT_CAP_EXIT_ON_ESCALATE | NPT_CAP_EXIT_ON_RETURN |
                    NPT_CAP_LINEAR_MODE_INFO | NPT_CAP_RUN | NPT_CAP_PERSISTENT_MEMORY,
    .backend_data = NULL,
    .vm_create = sample_vm_create,
    .vm_destroy = sample_vm_destroy,
    .memory_write = sample_memory_write,
    .memory_read = sample_memory_read,
    .vcpu_create = sample_vcpu_create,
    .vcpu_destroy = sample_vcpu_destroy,
    .vcpu_get_regs = sample_vcpu_get_regs,
    .vcpu_set_regs = sample_vcpu_set_regs,
    .vcpu_set_hierarchy = sample_vcpu_set_hierarchy,
    .vcpu_set_exit_controls = sample_vcpu_set_exit_controls,
    .invalidate = sample_invalidate,
    .vcpu_run = sample_vcpu_run,
    .vcpu_inject_fault = sample_vcpu_inject_fault,
    .vcpu_kick = NULL,
    .define_region = NULL,
    .host_pmem_count = sample_host_pmem_count,
    .host_pmem_get = sample_host_pmem_get,
    .attach_pmem = sample_attach_pmem,
    .define_flush_hint_page = sample_define_flush_hint_page,
    .physical_flush = sample_physical_flush,
    .vcpu_fence = sample_vcpu_fence,
    .vcpu_complete_trapped_write = sample_vcpu_complete_trapped_write,
    .untrapped_flush_hint_writes = NULL,
    .power_failure = NULL,
    /* It executes nothing: its exits are a script. */
    .guest_isa = NPT_GUEST_ISA_NONE,
    /* No privileged mode (NPT_CAP_PRIVILEGED_MODE is not claimed): no enter/leave. */
    .vm_stats = sample_vm_stats,
    .vcpu_stats = sample_vcpu_stats,
};

/* ---- the entries --------------------------------------------------------- */

#ifndef SAMPLE_INTERFACE_1_ONLY
struct sample_table { npt_backend_ops ops; struct sample_table *next; };
static struct sample_table *tables;
static pthread_mutex_t tables_lock = PTHREAD_MUTEX_INITIALIZER;

static char *copy_string(const char *s) {
    size_t n = strlen(s) + 1;
    char *p = malloc(n);
    if (p != NULL) memcpy(p, s, n);
    return p;
}

/* Plugin interface 2 (ABI 1.3): arguments name=NAME (register under another name, e.g. to load it
 * twice) and description=TEXT; any other key is refused. Each load gets its own ops table (never
 * freed: the core keeps using it while the context lives). */
EXPORT npt_status npt_plugin_init(const npt_plugin_info *info, const npt_backend_ops **ops) {
    if (info == NULL || ops == NULL || info->size < offsetof(npt_plugin_info, args) + sizeof info->args)
        return NPT_ERR_INVALID_ARGUMENT;
    if (NPT_ABI_MAJOR(info->abi_version) != NPT_ABI_VERSION_MAJOR) return NPT_ERR_ABI_MISMATCH;
    host = info->host;
    const char *name = SAMPLE_BACKEND_NAME, *description = sample_ops.description;
    for (size_t i = 0; i < info->argc; i++) {
        const npt_plugin_arg *a = &info->args[i];
        if (strcmp(a->key, "name") == 0) {
            if (a->value[0] == '\0' || strlen(a->value) > 63) {
                say("sample: name must be 1 to 63 characters");
                return NPT_ERR_INVALID_ARGUMENT;
            }
            name = a->value;
        } else if (strcmp(a->key, "description") == 0) {
            description = a->value;
        } else {
            say("sample: unknown argument (it takes name and description)");
            return NPT_ERR_INVALID_ARGUMENT;
        }
    }
    /* A plugin is never unloaded, so its tables live as long as the process: one per name and
     * description, kept in a list (loading the same configuration again reuses its table, so
     * repeated loads do not grow memory, and the tables stay reachable: no leak). */
    pthread_mutex_lock(&tables_lock);
    for (struct sample_table *t = tables; t != NULL; t = t->next) {
        if (strcmp(t->ops.name, name) == 0 && strcmp(t->ops.description, description) == 0) {
            *ops = &t->ops;
            pthread_mutex_unlock(&tables_lock);
            return NPT_OK;
        }
    }
    struct sample_table *mine = malloc(sizeof *mine);
    char *n = copy_string(name), *d = copy_string(description);
    if (mine == NULL || n == NULL || d == NULL) {
        pthread_mutex_unlock(&tables_lock);
        free(mine), free(n), free(d);
        say("sample: out of memory");
        return NPT_ERR_BACKEND;
    }
    mine->ops = sample_ops;
    mine->ops.name = n;
    mine->ops.description = d;
    mine->next = tables;
    tables = mine;
    *ops = &mine->ops;
    pthread_mutex_unlock(&tables_lock);
    return NPT_OK;
}
#endif

/* Plugin interface 1: no arguments. */
EXPORT npt_status npt_plugin_entry(const npt_host_api *h, const npt_backend_ops **ops) {
    if (h == NULL || ops == NULL) return NPT_ERR_INVALID_ARGUMENT;
    if (NPT_ABI_MAJOR(h->abi_version) != NPT_ABI_VERSION_MAJOR) return NPT_ERR_ABI_MISMATCH;
    host = h;
    *ops = &sample_ops;
    return NPT_OK;
}

/* ---- extras for tests (see sample_backend.h) ------------------------------ */

EXPORT void sample_backend_counters(struct sample_counters *out) {
    if (out == NULL) return;
    COUNT(*out = counters);
}

EXPORT void sample_backend_set_script(const npt_exit *exits, size_t n) {
    npt_exit *copy = NULL;
    if (n > 0 && exits != NULL) {
        copy = malloc(n * sizeof *copy);
        if (copy == NULL) n = 0;
        else memcpy(copy, exits, n * sizeof *copy);
    } else {
        n = 0;
    }
    pthread_mutex_lock(&lock);
    npt_exit *old = script;
    script = copy;
    script_len = n;
    script_pos = 0;
    pthread_mutex_unlock(&lock);
    free(old);
}

EXPORT void sample_backend_fail_pmem(uint32_t ops) { COUNT(fail_pmem = ops); }

EXPORT const npt_host_api *sample_backend_host(void) { return host; }
