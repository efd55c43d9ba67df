/*
 * probe_vcpustate.c - (issue 13) vCPU state a two-VM switch must carry that CPL 3 code can observe,
 * and the tools for carrying it.
 *
 * 1. The guest's own debug registers at CPL 3 (native): DR0 = an instruction of user code, DR7 =
 *    L0 (execute), set with KVM_SET_DEBUGREGS (no KVM_SET_GUEST_DEBUG): does the user code get a #DB
 *    (the stub of vector 1 OUTs 1 on 0xEF)? A data watchpoint (DR1, write, len 4) too.
 * 2. XCR0 at CPL 3: XGETBV (ecx 0) in user code returns what KVM_SET_XCRS set?
 * 3. KVM_VCPU_TSC_OFFSET: read, set to a value, the guest's RDTSC (CPL 3) moves with it.
 * 4. MSR filter on writes of TSC_AUX: KVM_EXIT_X86_WRMSR at CPL 0; the VMM applies it with
 *    KVM_SET_MSRS; the guest's RDTSCP at CPL 3 then reads it in ecx.
 * 5. Costs of the ioctls a move would add (p50 of N): KVM_GET_XCRS, KVM_GET_DEBUGREGS,
 *    KVM_GET_XSAVE2 + memcmp, KVM_GET_MSRS of the index list.
 * Run: cc -O2 -Wall -o probe_vcpustate probe_vcpustate.c && ./probe_vcpustate [N]   (N = 1000)
 */
#include "kvmprobe.h"

#ifndef KVM_VCPU_TSC_OFFSET
#define KVM_VCPU_TSC_OFFSET 0
#endif

static int N = 1000;

BLOB(u_dr, "nop\n nop\n nop\n nop\n inc %rbx\n movl $1, 0x12000\n int3\n jmp .\n")
BLOB(u_xgetbv, "xor %ecx, %ecx\n xgetbv\n int3\n jmp .\n")
BLOB(u_rdtsc, "rdtsc\n shl $32, %rdx\n or %rdx, %rax\n mov %rax, %rbx\n rdtscp\n mov %rcx, %r12\n int3\n jmp .\n")
BLOB(k_wrtscaux, "mov $0xC0000103, %ecx\n mov $0x77, %eax\n xor %edx, %edx\n wrmsr\n out %al, $0xE0\n hlt\n")

static struct vm vm;
static struct vcpu v;
static void fresh(const uint8_t *s, const uint8_t *e, int cpl) {
    vm = vm_create();
    guest_build(&vm);
    put_code(&vm, cpl ? G_UCODE : G_KCODE, s, e);
    v = vcpu_create(&vm, 0);
    vcpu_longmode(&v, cpl, cpl ? G_UCODE : G_KCODE, cpl ? G_USTACK_TOP : G_KSTACK_TOP);
}
static void done(void) { vcpu_destroy(&v); vm_destroy(&vm, 1); }

static void debugregs(void) {
    for (int watch = 0; watch < 2; watch++) {
        fresh(u_dr_s, u_dr_e, 3);
        struct kvm_debugregs d;
        memset(&d, 0, sizeof d);
        if (ioctl(v.fd, KVM_GET_DEBUGREGS, &d) < 0) DIE("GET_DEBUGREGS");
        if (watch) { d.db[1] = 0x12000; d.dr7 = 0x400 | (1 << 2) | (0xdull << 20); } /* L1, R/W1 = 01 write, LEN1 = 11 (4 bytes) */
        else { d.db[0] = G_UCODE + 4; d.dr7 = 0x400 | 1; }                       /* L0, execute */
        if (ioctl(v.fd, KVM_SET_DEBUGREGS, &d) < 0) DIE("SET_DEBUGREGS");
        int rc = vcpu_run_timeout(&v, 300);
        struct kvm_regs r;
        ioctl(v.fd, KVM_GET_REGS, &r);
        struct kvm_debugregs back;
        ioctl(v.fd, KVM_GET_DEBUGREGS, &back);
        if (is_out(&v, rc, PORT_EXC)) {
            int vec = io_val(&v);
            struct frame f = read_frame(&vm, r.rsp, vec);
            printf("  [1] guest %s at CPL 3: vector %d delivered, frame rip %#llx, rbx %llu, dr6 %#llx\n",
                   watch ? "DR1 write watchpoint" : "DR0 execute breakpoint", vec, (unsigned long long)f.rip, r.rbx,
                   (unsigned long long)back.dr6);
        } else {
            print_exit(&v, rc, watch ? "  [1] DR1 watchpoint: " : "  [1] DR0 breakpoint: ");
        }
        done();
    }
}

static void xcr0(void) {
    fresh(u_xgetbv_s, u_xgetbv_e, 3);
    struct kvm_xcrs x;
    memset(&x, 0, sizeof x);
    if (ioctl(v.fd, KVM_GET_XCRS, &x) < 0) DIE("GET_XCRS");
    uint64_t was = x.xcrs[0].value;
    struct kvm_sregs s;
    ioctl(v.fd, KVM_GET_SREGS, &s);
    s.cr4 |= 1 << 18; /* OSXSAVE */
    ioctl(v.fd, KVM_SET_SREGS, &s);
    x.nr_xcrs = 1; x.xcrs[0].xcr = 0; x.xcrs[0].value = 3;
    int set = ioctl(v.fd, KVM_SET_XCRS, &x);
    int rc = vcpu_run_timeout(&v, 300);
    struct kvm_regs r;
    ioctl(v.fd, KVM_GET_REGS, &r);
    printf("  [2] XCR0 was %#llx, set to 3 (%s); CPL 3 XGETBV -> eax %#llx edx %#llx (exit: %s, vector %d)\n",
           (unsigned long long)was, set < 0 ? strerror(errno) : "ok", r.rax & 0xffffffff, r.rdx & 0xffffffff,
           exit_name((uint32_t)(rc < 0 ? 0 : rc)), rc == KVM_EXIT_IO ? io_val(&v) : -1);
    done();
}

static void tsc(void) {
    fresh(u_rdtsc_s, u_rdtsc_e, 3);
    uint64_t off = 0;
    struct kvm_device_attr ta = {.group = KVM_VCPU_TSC_CTRL, .attr = KVM_VCPU_TSC_OFFSET, .addr = (uint64_t)(uintptr_t)&off};
    int g = ioctl(v.fd, KVM_GET_DEVICE_ATTR, &ta);
    uint64_t was = off;
    off = was + (1ull << 40);
    int s = ioctl(v.fd, KVM_SET_DEVICE_ATTR, &ta);
    uint64_t h0 = __builtin_ia32_rdtsc();
    int rc = vcpu_run_timeout(&v, 300);
    uint64_t h1 = __builtin_ia32_rdtsc();
    struct kvm_regs r;
    ioctl(v.fd, KVM_GET_REGS, &r);
    printf("  [3] TSC offset attribute: get %s (%#llx), set +2^40 %s; guest RDTSC - host RDTSC = %lld .. %lld (2^40 = %lld); exit %s\n",
           g < 0 ? strerror(errno) : "ok", (unsigned long long)was, s < 0 ? strerror(errno) : "ok", (long long)(r.rbx - h1),
           (long long)(r.rbx - h0), 1ll << 40, exit_name((uint32_t)(rc < 0 ? 0 : rc)));
    done();
}

static void tscaux_filter(void) {
    vm = vm_create();
    guest_build(&vm);
    put_code(&vm, G_KCODE, k_wrtscaux_s, k_wrtscaux_e);
    put_code(&vm, G_UCODE, u_rdtsc_s, u_rdtsc_e);
    struct kvm_enable_cap c = {.cap = KVM_CAP_X86_USER_SPACE_MSR, .args = {KVM_MSR_EXIT_REASON_FILTER}};
    if (ioctl(vm.fd, KVM_ENABLE_CAP, &c) < 0) DIE("USER_SPACE_MSR");
    static uint8_t deny[1] = {0};
    struct kvm_msr_filter f;
    memset(&f, 0, sizeof f);
    f.flags = KVM_MSR_FILTER_DEFAULT_ALLOW;
    f.ranges[0] = (struct kvm_msr_filter_range){.flags = KVM_MSR_FILTER_WRITE, .nmsrs = 1, .base = 0xC0000103, .bitmap = deny};
    if (ioctl(vm.fd, KVM_X86_SET_MSR_FILTER, &f) < 0) DIE("SET_MSR_FILTER");
    v = vcpu_create(&vm, 0);
    vcpu_longmode(&v, 0, G_KCODE, G_KSTACK_TOP);
    int rc = vcpu_run_timeout(&v, 300);
    printf("  [4] CPL 0 wrmsr TSC_AUX with a write filter: ");
    print_exit(&v, rc, "");
    if (rc == KVM_EXIT_X86_WRMSR) {
        int ok = set_msr(&v, 0xC0000103, v.run->msr.data) == 1;
        v.run->msr.error = 0;
        rc = vcpu_run_timeout(&v, 300);
        printf("      applied with KVM_SET_MSRS (%s), then: ", ok ? "ok" : "failed");
        print_exit(&v, rc, "");
        vcpu_longmode(&v, 3, G_UCODE, G_USTACK_TOP);
        rc = vcpu_run_timeout(&v, 300);
        struct kvm_regs r;
        ioctl(v.fd, KVM_GET_REGS, &r);
        printf("      CPL 3 RDTSCP ecx = %#llx (exit %s vector %d)\n", r.r12, exit_name((uint32_t)(rc < 0 ? 0 : rc)),
               rc == KVM_EXIT_IO ? io_val(&v) : -1);
    }
    done();
}

static void costs(void) {
    fresh(u_rdtsc_s, u_rdtsc_e, 3);
    vcpu_run_timeout(&v, 300);
    uint64_t *t = calloc((size_t)N, 8);
    struct kvm_xcrs x; struct kvm_debugregs d;
    int kvm = kvm_open();
    int xsz = cap(kvm, KVM_CAP_XSAVE2);
    if (xsz < 4096) xsz = 4096;
    uint8_t *xs = calloc(1, (size_t)xsz), *xs2 = calloc(1, (size_t)xsz);
    for (int i = 0; i < N; i++) { uint64_t t0 = now_ns(); ioctl(v.fd, KVM_GET_XCRS, &x); t[i] = now_ns() - t0; }
    report_us("KVM_GET_XCRS", t, (size_t)N);
    for (int i = 0; i < N; i++) { uint64_t t0 = now_ns(); ioctl(v.fd, KVM_GET_DEBUGREGS, &d); t[i] = now_ns() - t0; }
    report_us("KVM_GET_DEBUGREGS", t, (size_t)N);
    volatile int sink = 0;
    for (int i = 0; i < N; i++) {
        uint64_t t0 = now_ns();
        ioctl(v.fd, KVM_GET_XSAVE2, xs);
        sink += memcmp(xs, xs2, (size_t)xsz);
        t[i] = now_ns() - t0;
        memcpy(xs2, xs, (size_t)xsz);
    }
    report_us("KVM_GET_XSAVE2 + memcmp with the last image", t, (size_t)N);
    struct kvm_msr_list probe = {.nmsrs = 0};
    ioctl(kvm, KVM_GET_MSR_INDEX_LIST, &probe);
    struct kvm_msr_list *l = calloc(1, sizeof *l + probe.nmsrs * 4);
    l->nmsrs = probe.nmsrs;
    ioctl(kvm, KVM_GET_MSR_INDEX_LIST, l);
    struct kvm_msrs *m = calloc(1, sizeof *m + l->nmsrs * sizeof(struct kvm_msr_entry));
    int got = 0;
    for (int i = 0; i < N; i++) {
        m->nmsrs = l->nmsrs;
        for (uint32_t k = 0; k < l->nmsrs; k++) m->entries[k].index = l->indices[k];
        uint64_t t0 = now_ns();
        got = ioctl(v.fd, KVM_GET_MSRS, m);
        t[i] = now_ns() - t0;
    }
    char lab[96];
    snprintf(lab, sizeof lab, "KVM_GET_MSRS of the index list (%u MSRs, %d read)", l->nmsrs, got);
    report_us(lab, t, (size_t)N);
    (void)sink;
    close(kvm);
    done();
}

int main(int argc, char **argv) {
    if (argc > 1) N = atoi(argv[1]);
    char la[128];
    loadavg(la, sizeof la);
    printf("probe_vcpustate (loadavg %s)\n", la);
    debugregs();
    xcr0();
    tsc();
    tscaux_filter();
    costs();
    return 0;
}
