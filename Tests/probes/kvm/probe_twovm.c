/*
 * probe_twovm.c - (question B2) one VM per hierarchy over the same guest memory, the vCPU
 * "moved" between them on a switch.
 *
 * Part 1, ioctl costs: p50 of N calls each of the vCPU state ioctls a move would use (GET/SET
 *   REGS, SREGS, VCPU_EVENTS, XSAVE2/XSAVE, XCRS, DEBUGREGS, 10 MSRs, the TSC offset attribute).
 * Part 2, coherence of the two VMs' MMUs: VMs A and B on one host mapping, a CPL 0 guest moved
 *   A -> B -> A with full state copies: in A it reads linear 0x14000 (GPA 0x14000, byte 0xAA); in
 *   B it rewrites the PTE of 0x14000 to GPA 0x15000 (byte 0xBB) and flushes (INVLPG, or a CR3
 *   reload), reads (B sees 0xBB?); back in A it reads 0x14000 again: 0xBB is coherent, 0xAA
 *   means A still uses the translation it had cached (its shadow page tables).
 * Part 3, the switch loop: VM U (IDT page and kernel code pages 0x8000/0xB000 without memslot)
 *   and VM S (user code page 0x10000 without memslot), one vCPU each, same CPUID; user loop of
 *   INT3 system calls whose handler OUTs and IRETQs; the INT3's delivery fails in U
 *   (KVM_EXIT_SHUTDOWN) -> state moved to S with #BP injected; the first user fetch after the
 *   IRETQ fails in S (KVM_EXIT_INTERNAL_ERROR) -> state moved to U. Two moves per call.
 *   (a) state through SYNC_REGS only (src kvm_valid_regs = REGS|SREGS|EVENTS, copied into dst
 *       run->s.regs, dst kvm_dirty_regs set: no extra ioctl);
 *   (b) (a) + KVM_GET_XSAVE2/KVM_SET_XSAVE + GET/SET_XCRS + GET/SET_DEBUGREGS + 10 MSRs.
 *   (d) (a) + a zap of the destination VM's MMU per move (an unused memslot deleted and
 *       re-created, SLOT_ZAP_ALL on): what part 2 shows coherence needs on this KVM.
 *   All with the TSC offsets of the two vCPUs equalized once (KVM_VCPU_TSC_OFFSET), and (c)
 *   = (a) without that. The guest appends RDTSC values (user mode: native, handler: emulated) to
 *   an array in shared memory; the probe checks that they increase.
 * Run: cc -O2 -Wall -o probe_twovm probe_twovm.c && ./probe_twovm [N]   (N = 2000)
 */
#include "kvmprobe.h"
#include <x86intrin.h>

#ifndef KVM_VCPU_TSC_OFFSET
#define KVM_VCPU_TSC_OFFSET 0 /* upstream: attribute of group KVM_VCPU_TSC_CTRL */
#endif

static int N = 2000;
static uint8_t *mem;

/* ---------- Part 1 ---------- */
static const uint32_t msr10[10] = {MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SFMASK, MSR_KERNEL_GS_BASE,
                                   MSR_SYSENTER_CS, MSR_SYSENTER_ESP, MSR_SYSENTER_EIP, MSR_PAT, 0x1d9 /* DEBUGCTL */};
struct msrs10 { struct kvm_msrs h; struct kvm_msr_entry e[10]; };
static void msrs_prep(struct msrs10 *m) {
    memset(m, 0, sizeof *m);
    m->h.nmsrs = 10;
    for (int i = 0; i < 10; i++) m->e[i].index = msr10[i];
}
static int xsave_size;

BLOB(k_halt, "out %al, $0xE0\n hlt\n")

static void part1(void) {
    printf("[1] vCPU state ioctls, p50 of %d calls each\n", N);
    struct vm vm = vm_create();
    guest_build(&vm);
    put_code(&vm, G_KCODE, k_halt_s, k_halt_e);
    struct vcpu v = vcpu_create(&vm, 0);
    vcpu_longmode(&v, 0, G_KCODE, G_KSTACK_TOP);
    vcpu_run(&v);
    struct kvm_regs r; struct kvm_sregs s; struct kvm_vcpu_events e; struct kvm_xcrs x; struct kvm_debugregs d;
    struct msrs10 m;
    void *xs = calloc(1, (size_t)xsave_size);
    uint64_t off = 0;
    struct kvm_device_attr ta = {.group = KVM_VCPU_TSC_CTRL, .attr = KVM_VCPU_TSC_OFFSET, .addr = (uint64_t)(uintptr_t)&off};
    int has_tsc_attr = ioctl(v.fd, KVM_HAS_DEVICE_ATTR, &ta) == 0;
    ioctl(v.fd, KVM_GET_REGS, &r); ioctl(v.fd, KVM_GET_SREGS, &s); ioctl(v.fd, KVM_GET_VCPU_EVENTS, &e);
    ioctl(v.fd, KVM_GET_XCRS, &x); ioctl(v.fd, KVM_GET_DEBUGREGS, &d);
    msrs_prep(&m);
    printf("  KVM_GET_MSRS of 10 MSRs returned %d; KVM_VCPU_TSC_OFFSET attribute: %s\n", ioctl(v.fd, KVM_GET_MSRS, &m),
           has_tsc_attr ? "available" : strerror(errno));
    struct { const char *n; unsigned long req; void *arg; } ops[] = {
        {"KVM_GET_REGS", KVM_GET_REGS, &r}, {"KVM_SET_REGS", KVM_SET_REGS, &r},
        {"KVM_GET_SREGS", KVM_GET_SREGS, &s}, {"KVM_SET_SREGS", KVM_SET_SREGS, &s},
        {"KVM_GET_VCPU_EVENTS", KVM_GET_VCPU_EVENTS, &e}, {"KVM_SET_VCPU_EVENTS", KVM_SET_VCPU_EVENTS, &e},
        {"KVM_GET_XSAVE2", KVM_GET_XSAVE2, xs}, {"KVM_SET_XSAVE", KVM_SET_XSAVE, xs},
        {"KVM_GET_XCRS", KVM_GET_XCRS, &x}, {"KVM_SET_XCRS", KVM_SET_XCRS, &x},
        {"KVM_GET_DEBUGREGS", KVM_GET_DEBUGREGS, &d}, {"KVM_SET_DEBUGREGS", KVM_SET_DEBUGREGS, &d},
        {"KVM_GET_MSRS (10)", KVM_GET_MSRS, &m}, {"KVM_SET_MSRS (10)", KVM_SET_MSRS, &m},
        {"KVM_GET_DEVICE_ATTR (TSC offset)", KVM_GET_DEVICE_ATTR, &ta}, {"KVM_SET_DEVICE_ATTR (TSC offset)", KVM_SET_DEVICE_ATTR, &ta},
    };
    uint64_t *t = calloc((size_t)N, 8);
    for (int i = 0; i < N; i++) { uint64_t t0 = now_ns(); getppid(); t[i] = now_ns() - t0; }
    report_us("getppid() (a plain system call, for reference)", t, (size_t)N);
    for (int i = 0; i < N; i++) { uint64_t t0 = now_ns(); ioctl(vm.fd, KVM_CHECK_EXTENSION, KVM_CAP_SYNC_REGS); t[i] = now_ns() - t0; }
    report_us("KVM_CHECK_EXTENSION on the VM fd (no vCPU load)", t, (size_t)N);
    for (size_t o = 0; o < sizeof ops / sizeof *ops; o++) {
        if (!has_tsc_attr && o >= 14) break;
        int bad = 0;
        for (int i = 0; i < N; i++) {
            uint64_t t0 = now_ns();
            if (ioctl(v.fd, ops[o].req, ops[o].arg) < 0) bad = errno;
            t[i] = now_ns() - t0;
        }
        if (bad) printf("  %s failed: %s\n", ops[o].n, strerror(bad));
        report_us(ops[o].n, t, (size_t)N);
    }
    free(t);
    free(xs);
    vcpu_destroy(&v);
    vm_destroy(&vm, 1);
}

/* ---------- state moves ---------- */
static void full_state_move(struct vcpu *src, struct vcpu *dst) {
    struct kvm_regs r; struct kvm_sregs s; struct kvm_vcpu_events e;
    ioctl(src->fd, KVM_GET_REGS, &r); ioctl(src->fd, KVM_GET_SREGS, &s); ioctl(src->fd, KVM_GET_VCPU_EVENTS, &e);
    if (ioctl(dst->fd, KVM_SET_SREGS, &s) < 0) DIE("SET_SREGS");
    if (ioctl(dst->fd, KVM_SET_REGS, &r) < 0) DIE("SET_REGS");
    if (ioctl(dst->fd, KVM_SET_VCPU_EVENTS, &e) < 0) DIE("SET_VCPU_EVENTS");
}

/* ---------- Part 2 ---------- */
/* A at CPL 3 (native): reads linear 0x14000 into ebx, then an MMIO exit (0x13000 has no memslot
 * in A), then reads 0x14000 into ecx, MMIO exit. B at CPL 0 (emulated), between the two: PTE of
 * 0x14000 -> GPA 0x15000, then INVLPG or a CR3 reload. */
BLOB(u_coh, "mov 0x14000, %ebx\n mov 0x13000, %eax\n mov 0x14000, %ecx\n mov 0x13000, %eax\n jmp .\n")
BLOB(k_coh, "movq $0x15007, 0x40a0\n"
            "test %r15, %r15\n jnz 1f\n invlpg 0x14000\n jmp 2f\n1: mov %cr3, %rax\n mov %rax, %cr3\n2:"
            "mov 0x14000, %eax\n out %al, $0xE1\n hlt\n")

static void part2(void) {
    printf("[2] MMU coherence between two VMs on the same memory\n");
    static const char *hows[] = {
        "INVLPG in B; A resumed as is",
        "CR3 reload in B; A resumed as is",
        "no flush in B (PTE changed by the host); A resumed as is",
        "INVLPG in B; A: KVM_SET_SREGS+REGS of its own state",
        "INVLPG in B; A: KVM_SET_SREGS with CR4.PGE toggled, then back",
        "INVLPG in B; A: KVM_SET_SREGS with CR3 = 0x2000, then back",
        "INVLPG in B; A: memslot of the PT page (0x4000) deleted+re-created",
        "INVLPG in B; A: an unrelated memslot (0x1F000) deleted+re-created",
        "same, A with SLOT_ZAP_ALL disabled",
        "INVLPG in B; A: mprotect(PROT_READ) + back of the PT page in the host",
    };
    for (int how = 0; how < (int)(sizeof hows / sizeof *hows); how++) {
        memset(mem, 0, G_RAM);
        struct vm a = vm_create_on(mem), b = vm_create_on(mem);
        if (how == 8) {
            struct kvm_enable_cap eq = {.cap = KVM_CAP_DISABLE_QUIRKS2, .args = {KVM_X86_QUIRK_SLOT_ZAP_ALL}};
            if (ioctl(a.fd, KVM_ENABLE_CAP, &eq) < 0) DIE("DISABLE_QUIRKS2");
        }
        guest_build(&a);
        put_code(&a, G_UCODE, u_coh_s, u_coh_e);
        put_code(&a, G_KCODE, k_coh_s, k_coh_e);
        page_mode(&a, 0x13000, 0);
        mem[0x14000] = 0xAA;
        mem[0x15000] = 0xBB;
        struct vcpu va = vcpu_create(&a, 0), vb = vcpu_create(&b, 0);
        vcpu_longmode(&va, 3, G_UCODE, G_USTACK_TOP);
        vcpu_longmode(&vb, 0, G_KCODE, G_KSTACK_TOP);
        struct kvm_regs r;
        struct kvm_sregs ss;
        ioctl(vb.fd, KVM_GET_REGS, &r);
        r.r15 = how == 1;
        ioctl(vb.fd, KVM_SET_REGS, &r);
        int rc = vcpu_run_timeout(&va, 300);
        ioctl(va.fd, KVM_GET_REGS, &r);
        printf("  %-70s A(CPL 3) %#llx;", hows[how], r.rbx & 0xff);
        memset(va.run->mmio.data, 0, 8);
        if (how == 2) *q(&a, 0x40a0) = 0x15007;
        else {
            rc = vcpu_run_timeout(&vb, 300);
            printf(" B(CPL 0) %#x;", rc == KVM_EXIT_IO ? io_val(&vb) : -1);
        }
        ioctl(va.fd, KVM_GET_SREGS, &ss);
        ioctl(va.fd, KVM_GET_REGS, &r);
        if (how == 3) { ioctl(va.fd, KVM_SET_SREGS, &ss); ioctl(va.fd, KVM_SET_REGS, &r); }
        if (how == 4 || how == 5) {
            struct kvm_sregs t2 = ss;
            if (how == 4) t2.cr4 ^= 0x80; else t2.cr3 = 0x2000;
            if (ioctl(va.fd, KVM_SET_SREGS, &t2) < 0) printf(" [SET_SREGS: %s]", strerror(errno));
            ioctl(va.fd, KVM_SET_SREGS, &ss);
        }
        if (how == 6) { page_mode(&a, G_PT, 0); page_mode(&a, G_PT, 1); }
        if (how == 7 || how == 8) { page_mode(&a, 0x1F000, 0); page_mode(&a, 0x1F000, 1); }
        if (how == 9) { mprotect(mem + G_PT, 0x1000, PROT_READ); mprotect(mem + G_PT, 0x1000, PROT_READ | PROT_WRITE); }
        for (int k = 0; k < 3; k++) { /* a KVM_SET_SREGS that changes CR3/CR4 drops the pending MMIO read: re-executed */
            rc = vcpu_run_timeout(&va, 300);
            ioctl(va.fd, KVM_GET_REGS, &r);
            if (rc != KVM_EXIT_MMIO || r.rip != G_UCODE + 7) break;
            memset(va.run->mmio.data, 0, 8);
            if (k == 0) printf(" [MMIO at 0x10007 again: re-executed]");
        }
        int got = (int)(r.rcx & 0xff);
        printf(" A again %#x => %s\n", got, got == 0xBB ? "new translation" : got == 0xAA ? "OLD translation" : "?");
        if (rc != KVM_EXIT_MMIO || (got != 0xAA && got != 0xBB)) { print_exit(&va, rc, "    "); print_state(&va, "    "); }
        vcpu_destroy(&va); vcpu_destroy(&vb);
        vm_destroy(&a, 0); vm_destroy(&b, 0);
    }
}

/* ---------- Part 3 ---------- */
BLOB(u_tsc, "1: rdtsc\n shl $32, %rdx\n or %rdx, %rax\n mov %rax, (%rdi)\n add $8, %rdi\n int3\n inc %rbx\n jmp 1b\n")
BLOB(k_tsc, "rdtsc\n shl $32, %rdx\n or %rdx, %rax\n mov %rax, (%rdi)\n add $8, %rdi\n out %al, $0xE0\n iretq\n")
#define TSC_ARRAY 0x14000ull /* user pages 0x14000-0x1FFFF: 6144 entries */

struct side { struct vm vm; struct vcpu v; };
static void side_make(struct side *sd, int user_layout) {
    sd->vm = vm_create_on(mem);
    sd->v = vcpu_create(&sd->vm, 0);
    vcpu_longmode(&sd->v, 3, G_UCODE, G_USTACK_TOP);
    if (user_layout) { page_mode(&sd->vm, G_IDT, 0); page_mode(&sd->vm, G_STUBS, 0); page_mode(&sd->vm, G_KCODE, 0); }
    else page_mode(&sd->vm, G_UCODE, 0);
    sd->v.run->kvm_valid_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS;
}
static void move(struct side *src, struct side *dst, int full, int inject_bp) {
    if (full == 2) { /* coherence: zap dst's shadow MMU (SLOT_ZAP_ALL quirk on) by toggling an unused memslot */
        page_mode(&dst->vm, 0x3F000, 0);
        page_mode(&dst->vm, 0x3F000, 1);
    }
    memcpy(&dst->v.run->s.regs, &src->v.run->s.regs, sizeof(struct kvm_sync_regs));
    if (inject_bp) {
        struct kvm_vcpu_events *e = &dst->v.run->s.regs.events;
        e->exception.injected = 1; e->exception.nr = 3; e->exception.has_error_code = 0; e->exception.pending = 0;
    }
    dst->v.run->kvm_dirty_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS;
    if (full == 1) {
        static uint8_t xs[16384];
        struct kvm_xcrs x; struct kvm_debugregs d; struct msrs10 m;
        if (ioctl(src->v.fd, KVM_GET_XSAVE2, xs) < 0) DIE("GET_XSAVE2");
        if (ioctl(dst->v.fd, KVM_SET_XSAVE, xs) < 0) DIE("SET_XSAVE");
        ioctl(src->v.fd, KVM_GET_XCRS, &x); if (ioctl(dst->v.fd, KVM_SET_XCRS, &x) < 0) DIE("SET_XCRS");
        ioctl(src->v.fd, KVM_GET_DEBUGREGS, &d); if (ioctl(dst->v.fd, KVM_SET_DEBUGREGS, &d) < 0) DIE("SET_DEBUGREGS");
        msrs_prep(&m);
        if (ioctl(src->v.fd, KVM_GET_MSRS, &m) != 10) DIE("GET_MSRS");
        if (ioctl(dst->v.fd, KVM_SET_MSRS, &m) != 10) DIE("SET_MSRS");
    }
}
static void part3(int full, int sync_tsc) {
    memset(mem, 0, G_RAM);
    struct side U, S;
    side_make(&U, 1);
    guest_build(&U.vm); /* writes the shared memory: both VMs see it */
    page_mode(&U.vm, G_IDT, 0); page_mode(&U.vm, G_STUBS, 0); page_mode(&U.vm, G_KCODE, 0); /* pmode reset by memset? no: kept */
    put_code(&U.vm, G_UCODE, u_tsc_s, u_tsc_e);
    put_code(&U.vm, G_KCODE, k_tsc_s, k_tsc_e);
    idt_gate(&U.vm, 3, G_KCODE, 3, SEL_KCS);
    /* S created a little later: its TSC offset differs unless equalized */
    struct timespec ts = {0, 20 * 1000 * 1000};
    nanosleep(&ts, NULL);
    side_make(&S, 0);
    struct kvm_regs r;
    ioctl(U.v.fd, KVM_GET_REGS, &r);
    r.rdi = TSC_ARRAY;
    ioctl(U.v.fd, KVM_SET_REGS, &r);
    uint64_t offs[2] = {0, 0};
    struct kvm_device_attr ta = {.group = KVM_VCPU_TSC_CTRL, .attr = KVM_VCPU_TSC_OFFSET};
    ta.addr = (uint64_t)(uintptr_t)&offs[0]; ioctl(U.v.fd, KVM_GET_DEVICE_ATTR, &ta);
    ta.addr = (uint64_t)(uintptr_t)&offs[1]; ioctl(S.v.fd, KVM_GET_DEVICE_ATTR, &ta);
    if (sync_tsc) {
        ta.addr = (uint64_t)(uintptr_t)&offs[0];
        if (ioctl(S.v.fd, KVM_SET_DEVICE_ATTR, &ta) < 0) printf("  KVM_SET_DEVICE_ATTR(TSC offset): %s\n", strerror(errno));
    }
    struct side *cur = &U;
    uint64_t host_tsc0 = __rdtsc();
    uint64_t *t = calloc((size_t)N, 8);
    int calls = 0, warm = 20, moves = 0;
    uint64_t last = 0;
    while (calls < N + warm) {
        int rc = vcpu_run_timeout(&cur->v, 1000);
        if (rc == KVM_EXIT_IO && cur->v.run->io.port == 0xE0) {
            uint64_t now = now_ns();
            if (calls >= warm) t[calls - warm] = now - last;
            if (calls == warm - 1) moves = 0;
            last = now;
            calls++;
        } else if (rc == KVM_EXIT_SHUTDOWN && cur == &U) {
            move(&U, &S, full, 1); cur = &S; moves++;
        } else if (rc == KVM_EXIT_INTERNAL_ERROR && cur == &S) {
            move(&S, &U, full, 0); cur = &U; moves++;
        } else {
            print_exit(&cur->v, rc, "  unexpected: ");
            print_state(&cur->v, "    ");
            break;
        }
    }
    uint64_t host_tsc1 = __rdtsc();
    ioctl(cur->v.fd, KVM_GET_REGS, &r);
    /* TSC check */
    uint64_t *arr = (uint64_t *)(mem + TSC_ARRAY);
    size_t n = (size_t)(r.rdi - TSC_ARRAY) / 8, back = 0;
    int64_t worst = 0;
    for (size_t i = 1; i < n; i++)
        if (arr[i] < arr[i - 1]) { back++; if ((int64_t)(arr[i] - arr[i - 1]) < worst) worst = (int64_t)(arr[i] - arr[i - 1]); }
    char label[160];
    snprintf(label, sizeof label, "(%c) %s%s: per call (2 moves)", full == 2 ? 'd' : full ? 'b' : sync_tsc ? 'a' : 'c',
             full == 2 ? "SYNC_REGS + zap (memslot toggle)" : full ? "SYNC_REGS + XSAVE/XCRS/DEBUGREGS/10 MSRs" : "SYNC_REGS only",
             sync_tsc ? "" : ", TSC offsets not equalized");
    printf("  %s: %d calls, guest rbx %llu, %.2f moves/call; TSC offsets U %#llx S %#llx%s; guest TSC values %zu, decreasing steps %zu (worst %lld)\n",
           label, calls - warm, r.rbx, (double)moves / (calls - warm), (unsigned long long)offs[0], (unsigned long long)offs[1],
           sync_tsc ? " (S set to U's)" : "", n, back, (long long)worst);
    printf("      host RDTSC before/after the loop %llu / %llu; guest first/last %llu / %llu (%s)\n", (unsigned long long)host_tsc0,
           (unsigned long long)host_tsc1, (unsigned long long)arr[0], (unsigned long long)arr[n ? n - 1 : 0],
           arr[0] >= host_tsc0 && arr[n ? n - 1 : 0] <= host_tsc1 ? "guest TSC = host TSC" : "guest TSC offset from host");
    report_us(label, t, (size_t)(calls - warm));
    free(t);
    vcpu_destroy(&U.v); vcpu_destroy(&S.v);
    vm_destroy(&U.vm, 0); vm_destroy(&S.vm, 0);
}

int main(int argc, char **argv) {
    if (argc > 1) N = atoi(argv[1]);
    int kvm = kvm_open();
    xsave_size = cap(kvm, KVM_CAP_XSAVE2);
    if (xsave_size < (int)sizeof(struct kvm_xsave)) xsave_size = sizeof(struct kvm_xsave);
    close(kvm);
    mem = mmap(NULL, G_RAM, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    char la[128];
    loadavg(la, sizeof la);
    printf("probe_twovm (KVM_CAP_XSAVE2 size %d; loadavg %s)\n", xsave_size, la);
    part1();
    part2();
    printf("[3] switch loop, N = %d system calls\n", N);
    part3(0, 1);
    part3(1, 1);
    part3(0, 0);
    part3(2, 1);
    return 0;
}
