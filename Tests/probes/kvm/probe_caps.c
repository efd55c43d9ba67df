/*
 * probe_caps.c - KVM capabilities that matter for the escalation exit and the faster switches.
 *
 * Measures: KVM_CHECK_EXTENSION (on /dev/kvm and on a VM fd) for SYNC_REGS, MSR filter / user-space
 * MSR exits, DISABLE_QUIRKS2, XSAVE2, EXCEPTION_PAYLOAD, memory attributes, VM types, multiple
 * address spaces, guest debug, ...; KVM_CREATE_VM for types 0..5; KVM_ENABLE_CAP of
 * KVM_CAP_X86_USER_SPACE_MSR and KVM_CAP_DISABLE_QUIRKS2(SLOT_ZAP_ALL) on a fresh VM;
 * KVM_GET_SUPPORTED_MEMORY_ATTRIBUTES; KVM_GET_MSR_INDEX_LIST size.
 * Run: cc -O2 -Wall -o probe_caps probe_caps.c && ./probe_caps
 */
#include "kvmprobe.h"

#ifndef KVM_CAP_X86_GUEST_MODE
#define KVM_CAP_X86_GUEST_MODE 238 /* upstream uapi */
#endif
#ifndef KVM_GET_SUPPORTED_MEMORY_ATTRIBUTES
#define KVM_GET_SUPPORTED_MEMORY_ATTRIBUTES _IOR(KVMIO, 0xd2, uint64_t) /* removed upstream later */
#endif

int main(void) {
    int kvm = kvm_open();
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0) DIE("KVM_CREATE_VM");
    struct { const char *n; long c; } caps[] = {
        {"KVM_CAP_SYNC_REGS", KVM_CAP_SYNC_REGS},
        {"KVM_CAP_X86_USER_SPACE_MSR", KVM_CAP_X86_USER_SPACE_MSR},
        {"KVM_CAP_X86_MSR_FILTER", KVM_CAP_X86_MSR_FILTER},
        {"KVM_CAP_DISABLE_QUIRKS", KVM_CAP_DISABLE_QUIRKS},
        {"KVM_CAP_DISABLE_QUIRKS2", KVM_CAP_DISABLE_QUIRKS2},
        {"KVM_CAP_XSAVE", KVM_CAP_XSAVE},
        {"KVM_CAP_XSAVE2", KVM_CAP_XSAVE2},
        {"KVM_CAP_XCRS", KVM_CAP_XCRS},
        {"KVM_CAP_EXCEPTION_PAYLOAD", KVM_CAP_EXCEPTION_PAYLOAD},
        {"KVM_CAP_SET_GUEST_DEBUG", KVM_CAP_SET_GUEST_DEBUG},
        {"KVM_CAP_SET_GUEST_DEBUG2", KVM_CAP_SET_GUEST_DEBUG2},
        {"KVM_CAP_DEBUGREGS", KVM_CAP_DEBUGREGS},
        {"KVM_CAP_VCPU_EVENTS", KVM_CAP_VCPU_EVENTS},
        {"KVM_CAP_X86_ROBUST_SINGLESTEP", KVM_CAP_X86_ROBUST_SINGLESTEP},
        {"KVM_CAP_MULTI_ADDRESS_SPACE", KVM_CAP_MULTI_ADDRESS_SPACE},
        {"KVM_CAP_X86_SMM", KVM_CAP_X86_SMM},
        {"KVM_CAP_USER_MEMORY2", KVM_CAP_USER_MEMORY2},
        {"KVM_CAP_MEMORY_FAULT_INFO", KVM_CAP_MEMORY_FAULT_INFO},
        {"KVM_CAP_MEMORY_ATTRIBUTES", KVM_CAP_MEMORY_ATTRIBUTES},
        {"KVM_CAP_GUEST_MEMFD", KVM_CAP_GUEST_MEMFD},
        {"KVM_CAP_VM_TYPES", KVM_CAP_VM_TYPES},
        {"KVM_CAP_PRE_FAULT_MEMORY", KVM_CAP_PRE_FAULT_MEMORY},
        {"KVM_CAP_READONLY_MEM", KVM_CAP_READONLY_MEM},
        {"KVM_CAP_NR_MEMSLOTS", KVM_CAP_NR_MEMSLOTS},
        {"KVM_CAP_IMMEDIATE_EXIT", KVM_CAP_IMMEDIATE_EXIT},
        {"KVM_CAP_TSC_CONTROL", KVM_CAP_TSC_CONTROL},
        {"KVM_CAP_GET_TSC_KHZ", KVM_CAP_GET_TSC_KHZ},
        {"KVM_CAP_VCPU_ATTRIBUTES", KVM_CAP_VCPU_ATTRIBUTES},
        {"KVM_CAP_IRQCHIP", KVM_CAP_IRQCHIP},
        {"KVM_CAP_SPLIT_IRQCHIP", KVM_CAP_SPLIT_IRQCHIP},
        {"KVM_CAP_X86_TRIPLE_FAULT_EVENT", KVM_CAP_X86_TRIPLE_FAULT_EVENT},
        {"KVM_CAP_X86_NOTIFY_VMEXIT", KVM_CAP_X86_NOTIFY_VMEXIT},
        {"KVM_CAP_EXIT_HYPERCALL", KVM_CAP_EXIT_HYPERCALL},
        {"KVM_CAP_X86_DISABLE_EXITS", KVM_CAP_X86_DISABLE_EXITS},
        {"KVM_CAP_X86_BUS_LOCK_EXIT", KVM_CAP_X86_BUS_LOCK_EXIT},
        {"KVM_CAP_DIRTY_LOG_RING", KVM_CAP_DIRTY_LOG_RING},
        {"KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2},
        {"KVM_CAP_X86_GUEST_MODE", KVM_CAP_X86_GUEST_MODE},
        {"KVM_CAP_NESTED_STATE", KVM_CAP_NESTED_STATE},
        {"KVM_CAP_HYPERV_ENFORCE_CPUID", KVM_CAP_HYPERV_ENFORCE_CPUID},
        {"KVM_CAP_PMU_CAPABILITY", KVM_CAP_PMU_CAPABILITY},
    };
    printf("probe_caps: KVM_CHECK_EXTENSION on /dev/kvm | on the VM fd\n");
    for (size_t i = 0; i < sizeof caps / sizeof *caps; i++)
        printf("  %-36s %4d | %d\n", caps[i].n, cap(kvm, caps[i].c), cap(vm, caps[i].c));
    printf("  (KVM_X86_QUIRK_SLOT_ZAP_ALL = %#x is %s in DISABLE_QUIRKS2's mask)\n", KVM_X86_QUIRK_SLOT_ZAP_ALL,
           (cap(vm, KVM_CAP_DISABLE_QUIRKS2) & KVM_X86_QUIRK_SLOT_ZAP_ALL) ? "set" : "NOT set");

    printf("KVM_CREATE_VM by type:");
    for (int t = 0; t <= 5; t++) {
        int f = ioctl(kvm, KVM_CREATE_VM, t);
        printf(" %d:%s", t, f >= 0 ? "ok" : strerror(errno));
        if (f >= 0) close(f);
    }
    printf("\n");

    struct kvm_enable_cap ec = {.cap = KVM_CAP_X86_USER_SPACE_MSR, .args = {KVM_MSR_EXIT_REASON_FILTER | KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_INVAL}};
    int r = ioctl(vm, KVM_ENABLE_CAP, &ec);
    printf("KVM_ENABLE_CAP(X86_USER_SPACE_MSR, FILTER|UNKNOWN|INVAL): %s\n", r < 0 ? strerror(errno) : "ok");
    struct kvm_enable_cap eq = {.cap = KVM_CAP_DISABLE_QUIRKS2, .args = {KVM_X86_QUIRK_SLOT_ZAP_ALL}};
    r = ioctl(vm, KVM_ENABLE_CAP, &eq);
    printf("KVM_ENABLE_CAP(DISABLE_QUIRKS2, SLOT_ZAP_ALL): %s\n", r < 0 ? strerror(errno) : "ok");
    uint64_t attrs = 0;
    r = ioctl(vm, KVM_GET_SUPPORTED_MEMORY_ATTRIBUTES, &attrs);
    printf("KVM_GET_SUPPORTED_MEMORY_ATTRIBUTES: %s (attrs %#llx)\n", r < 0 ? strerror(errno) : "ok", (unsigned long long)attrs);
    struct kp_memory_attributes ma = {.address = 0, .size = 0x1000, .attributes = 0};
    r = ioctl(vm, KVM_SET_MEMORY_ATTRIBUTES, &ma);
    printf("KVM_SET_MEMORY_ATTRIBUTES(0, 4 KiB, 0): %s\n", r < 0 ? strerror(errno) : "ok");

    struct kvm_msr_list ml = {.nmsrs = 0};
    ioctl(kvm, KVM_GET_MSR_INDEX_LIST, &ml);
    printf("KVM_GET_MSR_INDEX_LIST: %u MSRs\n", ml.nmsrs);
    struct kvm_msr_list *l = calloc(1, sizeof *l + ml.nmsrs * 4);
    l->nmsrs = ml.nmsrs;
    if (ioctl(kvm, KVM_GET_MSR_INDEX_LIST, l) == 0) {
        printf("  ");
        for (uint32_t i = 0; i < l->nmsrs; i++) printf("%#x%s", l->indices[i], i + 1 < l->nmsrs ? " " : "\n");
    }
    printf("KVM_GET_VCPU_MMAP_SIZE %d, KVM_CAP_XSAVE2 size %d bytes\n", ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0), cap(vm, KVM_CAP_XSAVE2));
    return 0;
}
