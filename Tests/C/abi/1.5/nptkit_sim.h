/*
 * nptkit_sim.h - the configuration of NPTKit's built-in simulator backend ("sim").
 *
 * Everything else in the C ABI is backend-neutral (include/nptkit.h); what only the simulator has
 * is here. nptkit.h includes this header, so a program includes nptkit.h alone.
 */
#ifndef NPTKIT_SIM_H
#define NPTKIT_SIM_H

#include "nptkit.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The simulator's host platform (the context's built-in simulator, the backend "sim").
 *  - nfit NULL: the standard platform: 3 memory controllers; region 1 = 1 GiB interleaved over 2
 *    controllers, region 2 = 512 MiB on a third. Its WPQs are outside the persistence domain (WPQ
 *    flushing needed) unless wpq_drains_on_power_loss is set.
 *  - nfit != NULL: the platform the NFIT binary (nfit_len bytes, e.g. an iasl-compiled .aml)
 *    describes: a region per persistent-memory SPA range, interleaved over its DIMMs' controllers,
 *    with their flush hints; the persistence domain is the NFIT's unless wpq_drains_on_power_loss
 *    is set, which puts the WPQs in it. A malformed table gives NPT_ERR_INVALID_ARGUMENT and
 *    npt_last_error() says what and at which offset; so does an NFIT without persistent memory.
 * flush_latency_ns: the time each physical flush hint write takes (spent by the flushing thread).
 * The new platform starts with empty media. VMs created from now on use it; a VM that exists keeps
 * the platform it was created with, so set the platform before creating VMs.
 * NPT_ERR_BUSY while a VM has NVDIMM ranges on the current platform. Default: the standard
 * platform, WPQ flushing needed, no latency. */
typedef struct npt_sim_platform {
    uint32_t size;                 /* sizeof(npt_sim_platform) */
    int wpq_drains_on_power_loss;  /* 1: the WPQs are in the persistence domain (ADR) */
    uint64_t flush_latency_ns;
    const void *nfit;              /* NULL: the standard platform; copied, need not outlive the call. Its
                                      persistent-memory SPA ranges must be non-empty, 4 KiB aligned, not
                                      wrap past 2^64 and not overlap (else NPT_ERR_INVALID_ARGUMENT) */
    size_t nfit_len;
} npt_sim_platform;

npt_status npt_sim_set_platform(npt_context *ctx, const npt_sim_platform *platform);

#ifdef __cplusplus
}
#endif
#endif /* NPTKIT_SIM_H */
