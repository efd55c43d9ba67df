/*
 * ckvm.h - the parts of <linux/kvm.h> Swift cannot use directly.
 *
 * Swift imports the KVM structs (kvm_regs, kvm_sregs, kvm_segment, kvm_userspace_memory_region,
 * kvm_cpuid2, kvm_msrs, kvm_run) from <linux/kvm.h>, but not the ioctl request numbers (they are
 * _IO/_IOW/_IOWR function-like macros), not the variadic ioctl(2), and not the anonymous unions of
 * struct kvm_run in a stable shape. This header gives each of those a plain C name.
 */
#ifndef CKVM_H
#define CKVM_H

#include <linux/kvm.h>
#include <pthread.h>
#include <stdint.h>

/* ioctl request numbers */
static inline unsigned long ckvm_req_get_api_version(void) { return KVM_GET_API_VERSION; }
static inline unsigned long ckvm_req_create_vm(void) { return KVM_CREATE_VM; }
static inline unsigned long ckvm_req_check_extension(void) { return KVM_CHECK_EXTENSION; }
static inline unsigned long ckvm_req_get_vcpu_mmap_size(void) { return KVM_GET_VCPU_MMAP_SIZE; }
static inline unsigned long ckvm_req_get_supported_cpuid(void) { return KVM_GET_SUPPORTED_CPUID; }
static inline unsigned long ckvm_req_set_user_memory_region(void) { return KVM_SET_USER_MEMORY_REGION; }
static inline unsigned long ckvm_req_create_vcpu(void) { return KVM_CREATE_VCPU; }
static inline unsigned long ckvm_req_run(void) { return KVM_RUN; }
static inline unsigned long ckvm_req_get_regs(void) { return KVM_GET_REGS; }
static inline unsigned long ckvm_req_set_regs(void) { return KVM_SET_REGS; }
static inline unsigned long ckvm_req_get_sregs(void) { return KVM_GET_SREGS; }
static inline unsigned long ckvm_req_set_sregs(void) { return KVM_SET_SREGS; }
static inline unsigned long ckvm_req_get_msrs(void) { return KVM_GET_MSRS; }
static inline unsigned long ckvm_req_set_msrs(void) { return KVM_SET_MSRS; }
static inline unsigned long ckvm_req_set_cpuid2(void) { return KVM_SET_CPUID2; }
static inline unsigned long ckvm_req_get_vcpu_events(void) { return KVM_GET_VCPU_EVENTS; }
static inline unsigned long ckvm_req_set_vcpu_events(void) { return KVM_SET_VCPU_EVENTS; }

static inline unsigned long ckvm_req_get_xsave2(void) { return KVM_GET_XSAVE2; }
static inline unsigned long ckvm_req_set_xsave(void) { return KVM_SET_XSAVE; }
static inline unsigned long ckvm_req_get_xcrs(void) { return KVM_GET_XCRS; }
static inline unsigned long ckvm_req_set_xcrs(void) { return KVM_SET_XCRS; }
static inline unsigned long ckvm_req_get_debugregs(void) { return KVM_GET_DEBUGREGS; }
static inline unsigned long ckvm_req_set_debugregs(void) { return KVM_SET_DEBUGREGS; }
static inline unsigned long ckvm_req_get_dirty_log(void) { return KVM_GET_DIRTY_LOG; }
static inline unsigned long ckvm_req_enable_cap(void) { return KVM_ENABLE_CAP; }
static inline unsigned long ckvm_req_get_msr_index_list(void) { return KVM_GET_MSR_INDEX_LIST; }
static inline unsigned long ckvm_req_get_stats_fd(void) { return KVM_GET_STATS_FD; }

/* Non-variadic ioctl(2). Return what ioctl returns; errno is set on -1. */
int ckvm_ioctl(int fd, unsigned long req, void *arg);
int ckvm_ioctl_int(int fd, unsigned long req, unsigned long arg);

/* struct kvm_run accessors (its exit data is an anonymous union). */
static inline uint32_t ckvm_run_exit_reason(const struct kvm_run *r) { return r->exit_reason; }
static inline void ckvm_run_set_immediate_exit(struct kvm_run *r, uint8_t v) {
    __atomic_store_n(&r->immediate_exit, v, __ATOMIC_SEQ_CST);
}
static inline uint8_t ckvm_run_immediate_exit(const struct kvm_run *r) {
    return __atomic_load_n(&r->immediate_exit, __ATOMIC_SEQ_CST);
}
static inline uint8_t ckvm_run_io_direction(const struct kvm_run *r) { return r->io.direction; }
static inline uint8_t ckvm_run_io_size(const struct kvm_run *r) { return r->io.size; }
static inline uint16_t ckvm_run_io_port(const struct kvm_run *r) { return r->io.port; }
static inline uint32_t ckvm_run_io_count(const struct kvm_run *r) { return r->io.count; }
static inline uint64_t ckvm_run_io_data_offset(const struct kvm_run *r) { return r->io.data_offset; }
static inline uint64_t ckvm_run_mmio_phys_addr(const struct kvm_run *r) { return r->mmio.phys_addr; }
static inline uint32_t ckvm_run_mmio_len(const struct kvm_run *r) { return r->mmio.len; }
static inline uint8_t ckvm_run_mmio_is_write(const struct kvm_run *r) { return r->mmio.is_write; }
static inline uint8_t *ckvm_run_mmio_data(struct kvm_run *r) { return r->mmio.data; }
static inline uint32_t ckvm_run_internal_suberror(const struct kvm_run *r) { return r->internal.suberror; }
static inline uint32_t ckvm_run_internal_ndata(const struct kvm_run *r) { return r->internal.ndata; }
static inline uint64_t ckvm_run_internal_data(const struct kvm_run *r, uint32_t i) {
    return i < 16 ? r->internal.data[i] : 0;
}
static inline uint64_t ckvm_run_fail_entry_reason(const struct kvm_run *r) {
    return r->fail_entry.hardware_entry_failure_reason;
}
/* KVM_CAP_SYNC_REGS: the vCPU's registers, system registers and events live in kvm_run->s.regs.
 * With kvm_valid_regs set, KVM stores them there at the end of every KVM_RUN (no KVM_GET_* ioctl);
 * the bits in kvm_dirty_regs make the next KVM_RUN load them from there first (no KVM_SET_*). */
static inline struct kvm_sync_regs *ckvm_run_sync(struct kvm_run *r) { return &r->s.regs; }
static inline uint64_t ckvm_sync_all(void) { return KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS; }
static inline uint64_t ckvm_sync_regs_bit(void) { return KVM_SYNC_X86_REGS; }
static inline uint64_t ckvm_sync_sregs_bit(void) { return KVM_SYNC_X86_SREGS; }
static inline uint64_t ckvm_sync_events_bit(void) { return KVM_SYNC_X86_EVENTS; }
static inline void ckvm_run_set_valid_regs(struct kvm_run *r, uint64_t bits) { r->kvm_valid_regs = bits; }
static inline void ckvm_run_mark_dirty(struct kvm_run *r, uint64_t bits) { r->kvm_dirty_regs |= bits; }
static inline uint64_t ckvm_run_dirty_regs(const struct kvm_run *r) { return r->kvm_dirty_regs; }
static inline uint32_t ckvm_run_exception(const struct kvm_run *r) { return r->ex.exception; }
static inline uint32_t ckvm_run_exception_error_code(const struct kvm_run *r) { return r->ex.error_code; }

/* The signal that kicks a vCPU thread out of KVM_RUN. Its handler does nothing; it is installed
 * once (without SA_RESTART, so KVM_RUN returns EINTR). Returns the signal number. */
int ckvm_kick_signal_install(void);
/* pthread_kill(thread, the kick signal); returns its result. */
int ckvm_kick_thread(pthread_t thread);

/* The host table (npt_host_api) of the plugin load whose operation this thread is in: each
 * operation sets it on entry (its VM, vCPU or backend data knows its load), and the plugin's error
 * messages go to that table's set_error. Thread-local. */
void ckvm_set_current_host(const void *host);
const void *ckvm_current_host(void);

/* The escalation-exit probe (escalation_probe.c): whether leaving the IDT page out of the user
 * layout stops every CPL 3 -> CPL 0 transition on this KVM, and how. */
struct ckvm_escalation_probe {
    int usable;       /* 1: every entry path tried stops at CPL 3 before CPL 0 */
    int mechanism;    /* 1: KVM_EXIT_SHUTDOWN, the event lost (identified by a sentinel, re-injected);
                         2: KVM_EXIT_INTERNAL_ERROR / KVM_INTERNAL_ERROR_DELIVERY_EV, KVM keeps the event */
    char reason[240]; /* what was found, or why it is not usable */
    int cpl3_debugregs; /* 1: the guest's DR0-3/DR7 act on CPL 3 code (or could not be shown not to) */
};
int ckvm_probe_escalation(struct ckvm_escalation_probe *out);

#endif
