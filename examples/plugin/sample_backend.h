/*
 * sample_backend.h - the extra functions the sample backend plugin exports, next to
 * npt_plugin_entry, so that a test (or you, while learning) can script it and watch what the core
 * asks of it. A real backend needs none of this: only npt_plugin_entry.
 *
 * Find them with dlsym() on the plugin's handle (dlopen() of the same path returns the handle the
 * core already holds).
 */
#ifndef NPTKIT_SAMPLE_BACKEND_H
#define NPTKIT_SAMPLE_BACKEND_H

#include <stddef.h>
#include <stdint.h>
#include <nptkit.h>

#define SAMPLE_BACKEND_NAME "sample"
#define SAMPLE_HIERARCHY_LOG 64

/* Everything the core has asked of the backend since the plugin was loaded (all VMs together). */
struct sample_counters {
    uint64_t vm_creates, vm_destroys;
    uint64_t memory_writes, memory_reads;
    uint64_t vcpu_creates, vcpu_destroys;
    uint64_t get_regs, set_regs;
    uint64_t set_exit_controls;
    uint32_t last_exit_controls;             /* NPT_EXITCTL_* of the last call */
    uint32_t reserved;
    uint64_t invalidations;                  /* calls of the invalidate op */
    uint64_t invalidated_hierarchies;        /* bit h set: hierarchy h was invalidated at least once */
    uint64_t last_invalidate_gpa, last_invalidate_size;
    uint64_t runs;                           /* calls of vcpu_run, scripted exits handed out */
    uint64_t set_hierarchy;                  /* calls of vcpu_set_hierarchy */
    uint32_t hierarchy_log[SAMPLE_HIERARCHY_LOG]; /* call i is in [i % SAMPLE_HIERARCHY_LOG] */
    uint64_t inject_fault;                   /* calls of vcpu_inject_fault (always unsupported) */
};

typedef void (*sample_backend_counters_fn)(struct sample_counters *out);
typedef void (*sample_backend_set_script_fn)(const npt_exit *exits, size_t n);

/* Copies the counters. */
void sample_backend_counters(struct sample_counters *out);
/* Replaces the script: the next vcpu_run calls (of any vCPU) return exits[0], exits[1], ... in
 * order; when it is used up, vcpu_run fails with NPT_ERR_STATE. The exits are copied. */
void sample_backend_set_script(const npt_exit *exits, size_t n);

#endif
