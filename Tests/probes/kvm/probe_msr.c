/*
 * probe_msr.c - (question A5) can the guest's reads and writes of LSTAR / STAR / CSTAR / SFMASK /
 * EFER be trapped to userspace (KVM_CAP_X86_USER_SPACE_MSR + KVM_X86_SET_MSR_FILTER)?
 *
 * The VM enables KVM_CAP_X86_USER_SPACE_MSR (KVM_MSR_EXIT_REASON_FILTER) and installs a filter
 * (default allow) that denies reads and writes of those five MSRs. A CPL 0 guest then does
 * wrmsr LSTAR, rdmsr LSTAR, wrmsr CSTAR, rdmsr STAR, rdmsr EFER, wrmsr EFER (same value),
 * rdmsr SFMASK and OUTs. Every exit is printed (KVM_EXIT_X86_RDMSR/WRMSR: index, data, reason);
 * the VMM answers reads with 0x1234000 + index & 0xff and accepts writes (msr.error = 0).
 * Then: wrmsr at CPL 3 (expected #GP, native), KVM_GET_MSRS of LSTAR from userspace (not
 * filtered: shows the value the guest's trapped write did NOT reach), and the cost of a
 * trapped rdmsr round trip (p10/p50/p90 of N).
 * Run: cc -O2 -Wall -o probe_msr probe_msr.c && ./probe_msr [N]   (N = 2000)
 */
#include "kvmprobe.h"

BLOB(k_msr, "mov $0xC0000082, %ecx\n mov $0xB800, %eax\n xor %edx, %edx\n wrmsr\n"
            "rdmsr\n mov %rax, %r8\n"
            "mov $0xC0000083, %ecx\n mov $0xB900, %eax\n xor %edx, %edx\n wrmsr\n"
            "mov $0xC0000081, %ecx\n rdmsr\n mov %rax, %r9\n"
            "mov $0xC0000080, %ecx\n rdmsr\n mov %rax, %r10\n wrmsr\n"
            "mov $0xC0000084, %ecx\n rdmsr\n mov %rax, %r11\n"
            "out %al, $0xE0\n"
            "1: mov $0xC0000082, %ecx\n rdmsr\n jmp 1b\n")
BLOB(u_wrmsr, "mov $0xC0000082, %ecx\n wrmsr\n jmp .\n")

int main(int argc, char **argv) {
    int N = argc > 1 ? atoi(argv[1]) : 2000;
    char la[128];
    loadavg(la, sizeof la);
    printf("probe_msr (loadavg %s)\n", la);
    struct vm vm = vm_create();
    guest_build(&vm);
    put_code(&vm, G_KCODE, k_msr_s, k_msr_e);
    struct kvm_enable_cap ec = {.cap = KVM_CAP_X86_USER_SPACE_MSR, .args = {KVM_MSR_EXIT_REASON_FILTER}};
    printf("  KVM_ENABLE_CAP(X86_USER_SPACE_MSR, FILTER): %s\n", ioctl(vm.fd, KVM_ENABLE_CAP, &ec) < 0 ? strerror(errno) : "ok");
    static uint8_t deny[1] = {0}; /* bitmap bit 0 = 0: deny the one MSR of the range */
    struct kvm_msr_filter f;
    memset(&f, 0, sizeof f);
    f.flags = KVM_MSR_FILTER_DEFAULT_ALLOW;
    uint32_t msrs[] = {MSR_EFER, MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SFMASK};
    for (int i = 0; i < 5; i++)
        f.ranges[i] = (struct kvm_msr_filter_range){.flags = KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE, .nmsrs = 1, .base = msrs[i], .bitmap = deny};
    printf("  KVM_X86_SET_MSR_FILTER(deny EFER STAR LSTAR CSTAR SFMASK): %s\n", ioctl(vm.fd, KVM_X86_SET_MSR_FILTER, &f) < 0 ? strerror(errno) : "ok");
    struct vcpu v = vcpu_create(&vm, 0);
    vcpu_longmode(&v, 0, G_KCODE, G_KSTACK_TOP);
    printf("  (host KVM_SET_MSRS of LSTAR/STAR/SFMASK before the run: not filtered, LSTAR reads back %#llx)\n",
           (unsigned long long)get_msr(&v, MSR_LSTAR));
    int rc;
    for (int i = 0; i < 12; i++) {
        rc = vcpu_run_timeout(&v, 300);
        print_exit(&v, rc, "  ");
        if (rc == KVM_EXIT_X86_RDMSR) { v.run->msr.data = 0x1234000 + (v.run->msr.index & 0xff); v.run->msr.error = 0; }
        else if (rc == KVM_EXIT_X86_WRMSR) v.run->msr.error = 0;
        else break;
    }
    struct kvm_regs r;
    ioctl(v.fd, KVM_GET_REGS, &r);
    printf("  guest read: LSTAR %#llx STAR %#llx EFER %#llx SFMASK %#llx; host KVM_GET_MSRS LSTAR %#llx CSTAR %#llx\n", r.r8, r.r9,
           r.r10, r.r11, (unsigned long long)get_msr(&v, MSR_LSTAR), (unsigned long long)get_msr(&v, MSR_CSTAR));
    /* cost of a trapped rdmsr (the loop after the OUT) */
    uint64_t *t = calloc((size_t)N, 8);
    int ok = 1;
    for (int i = 0; i < N; i++) {
        uint64_t t0 = now_ns();
        rc = vcpu_run_timeout(&v, 300);
        if (rc != KVM_EXIT_X86_RDMSR) { ok = 0; print_exit(&v, rc, "  loop: "); break; }
        v.run->msr.data = 0; v.run->msr.error = 0;
        t[i] = now_ns() - t0;
    }
    if (ok) report_us("trapped rdmsr LSTAR at CPL 0, exit round trip", t, (size_t)N);
    free(t);
    vcpu_destroy(&v);
    /* CPL 3 wrmsr */
    struct vcpu u = vcpu_create(&vm, 1);
    put_code(&vm, G_UCODE, u_wrmsr_s, u_wrmsr_e);
    vcpu_longmode(&u, 3, G_UCODE, G_USTACK_TOP);
    rc = vcpu_run_timeout(&u, 300);
    if (is_out(&u, rc, PORT_EXC)) {
        ioctl(u.fd, KVM_GET_REGS, &r);
        printf("  wrmsr LSTAR at CPL 3: guest stub %d ran; ", io_val(&u));
        print_frame(read_frame(&vm, r.rsp, io_val(&u)), io_val(&u), "");
    } else print_exit(&u, rc, "  wrmsr LSTAR at CPL 3: ");
    vcpu_destroy(&u);
    vm_destroy(&vm, 1);
    return 0;
}
