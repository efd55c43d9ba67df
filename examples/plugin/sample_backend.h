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

/* The sample's host persistent memory: region 7, 1 GiB at 0x40000000, interleaved over controllers
 * 0 and 1 whose physical flush hints are 0xFED00000 and 0xFED01000; its WPQs are outside the
 * persistence domain (needs_wpq_flush = 1). */
#define SAMPLE_PMEM_REGION 7u
#define SAMPLE_PMEM_BASE UINT64_C(0x40000000)
#define SAMPLE_PMEM_LENGTH (UINT64_C(1) << 30)
#define SAMPLE_PMEM_CONTROLLERS 2
#define SAMPLE_PMEM_HINT0 UINT64_C(0xFED00000)
#define SAMPLE_PMEM_HINT1 UINT64_C(0xFED01000)

/* sample_backend_fail_pmem: the next call of each selected operation fails with NPT_ERR_BACKEND. */
#define SAMPLE_FAIL_ATTACH (1u << 0)
#define SAMPLE_FAIL_DEFINE_FLUSH_HINT (1u << 1)
#define SAMPLE_FAIL_PHYSICAL_FLUSH (1u << 2)
#define SAMPLE_FAIL_FENCE (1u << 3)

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
    /* Persistent memory (NPT_CAP_PERSISTENT_MEMORY): one host region, SAMPLE_PMEM_REGION. */
    uint64_t pmem_attaches;                  /* successful attach_pmem calls */
    uint64_t last_attach_gpa, last_attach_size, last_attach_region_offset, last_attach_host_offset;
    uint32_t last_attach_region;
    uint32_t flush_hint_trapped;             /* `trapped` of the last define_flush_hint_page */
    uint64_t flush_hint_defines;             /* successful define_flush_hint_page calls */
    uint64_t flush_hint_gpa, flush_hint_host_offset;
    uint64_t physical_flushes;               /* successful physical_flush calls, all controllers */
    uint64_t controller_flushes[SAMPLE_PMEM_CONTROLLERS];  /* per controller key (0, 1) */
    uint64_t controller_flush_address[SAMPLE_PMEM_CONTROLLERS]; /* address of its last flush */
    uint64_t fences;                         /* vcpu_fence calls */
    uint64_t completed_trapped_writes;       /* vcpu_complete_trapped_write calls */
    uint64_t pmem_failures;                  /* calls failed on purpose (sample_backend_fail_pmem) */
};

typedef void (*sample_backend_counters_fn)(struct sample_counters *out);
typedef void (*sample_backend_set_script_fn)(const npt_exit *exits, size_t n);
typedef void (*sample_backend_fail_pmem_fn)(uint32_t ops);
typedef const npt_host_api *(*sample_backend_host_fn)(void);

/* The npt_host_api table the core gave npt_plugin_entry (NULL before): lets a test call the core's
 * services as a plugin does (e.g. host_pmem_discover_sysfs, ABI 1.2). */
const npt_host_api *sample_backend_host(void);

/* Copies the counters. */
void sample_backend_counters(struct sample_counters *out);
/* Replaces the script: the next vcpu_run calls (of any vCPU) return exits[0], exits[1], ... in
 * order; when it is used up, vcpu_run fails with NPT_ERR_STATE. The exits are copied. */
void sample_backend_set_script(const npt_exit *exits, size_t n);
/* Makes the next call of each operation in `ops` (SAMPLE_FAIL_*) fail with NPT_ERR_BACKEND; 0
 * clears what has not failed yet. */
void sample_backend_fail_pmem(uint32_t ops);

#endif
