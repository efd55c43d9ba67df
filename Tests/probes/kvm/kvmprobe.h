/*
 * kvmprobe.h - shared, header-only scaffolding for the standalone KVM probes in this directory
 * (Tests/probes/kvm). Every probe is one C file that includes only this header and system
 * headers and builds with `cc -O2 -Wall -o X X.c` (-lpthread where it says so).
 *
 * It builds, from the host, a small 64-bit guest with 4 KiB identity paging, a GDT with Linux's
 * selectors, a 64-bit TSS, a 256-entry IDT whose stubs report their vector by OUT, and (per probe)
 * user and kernel code copied from byte blobs assembled into the probe binary itself (top-level
 * asm in a non-executable section of the host program, copied to guest memory at run time).
 *
 * Guest-physical layout (identity mapped; each page below 0x40000 is its own memslot, slot id =
 * page number, so a probe can remove a single page from the "layout" or make it READONLY):
 *   0x1000 PML4  0x2000 PDPT  0x3000 PD  0x4000 PT (maps 0..2 MiB with 4 KiB pages)
 *   0x5000 GDT   0x6000 TSS (RSP0 = 0xA000)   0x7000 IDT (256 gates, DPL 3, selector 0x10)
 *   0x8000 exception stubs: stub v at 0x8000 + 16 v:  mov $v,%al; out %al,$0xEF;
 *          [add $8,%rsp if v pushes an error code]; iretq
 *   0x9000 kernel stack page (top 0xA000 = TSS.RSP0)
 *   0xB000 kernel code page (probe specific; LSTAR points here)
 *   0xC000 kernel data page
 *   0x10000 user code page, 0x11000 user stack page (top 0x12000), 0x12000 user data page
 *   0x13000-0x1FFFF more user pages; 0x40000-0x1FFFFF one big slot (slot 100)
 * Pages 0x10000-0x1FFFF are user pages (U/S = 1 in the PTE), all others supervisor.
 * Linear 0x400000 and above are not mapped (PD entry 2 not present): a user read there is #PF.
 * GDT: 0x10 kernel CS (64-bit), 0x18 kernel DS, 0x20 user CS32, 0x2b user DS, 0x33 user CS64,
 *      0x38 TSS (16 bytes), 0x48 spare (call gate probe).
 */
#ifndef KVMPROBE_H
#define KVMPROBE_H
#define _GNU_SOURCE
#pragma GCC diagnostic ignored "-Wunused-function"
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* ---- constants missing from Debian's (6.1) <linux/kvm.h>; values from upstream uapi ---- */
#ifndef KVM_CAP_USER_MEMORY2
#define KVM_CAP_USER_MEMORY2 231
#endif
#ifndef KVM_CAP_MEMORY_FAULT_INFO
#define KVM_CAP_MEMORY_FAULT_INFO 232
#endif
#ifndef KVM_CAP_MEMORY_ATTRIBUTES
#define KVM_CAP_MEMORY_ATTRIBUTES 233
#endif
#ifndef KVM_CAP_GUEST_MEMFD
#define KVM_CAP_GUEST_MEMFD 234
#endif
#ifndef KVM_CAP_VM_TYPES
#define KVM_CAP_VM_TYPES 235
#endif
#ifndef KVM_CAP_PRE_FAULT_MEMORY
#define KVM_CAP_PRE_FAULT_MEMORY 236
#endif
#ifndef KVM_EXIT_MEMORY_FAULT
#define KVM_EXIT_MEMORY_FAULT 39
#endif
#ifndef KVM_X86_QUIRK_SLOT_ZAP_ALL
#define KVM_X86_QUIRK_SLOT_ZAP_ALL (1 << 7)
#endif
struct kp_memory_attributes { uint64_t address, size, attributes, flags; };
#ifndef KVM_SET_MEMORY_ATTRIBUTES
#define KVM_SET_MEMORY_ATTRIBUTES _IOW(KVMIO, 0xd2, struct kp_memory_attributes)
#endif

/* ---- guest layout ---- */
#define G_PML4 0x1000
#define G_PDPT 0x2000
#define G_PD 0x3000
#define G_PT 0x4000
#define G_GDT 0x5000
#define G_TSS 0x6000
#define G_IDT 0x7000
#define G_STUBS 0x8000
#define G_KSTACK 0x9000
#define G_KSTACK_TOP 0xA000
#define G_KCODE 0xB000
#define G_KDATA 0xC000
#define G_UCODE 0x10000
#define G_USTACK 0x11000
#define G_USTACK_TOP 0x12000
#define G_UDATA 0x12000
#define G_RAM (2u << 20)
#define G_SMALL_PAGES 0x40   /* pages 0..0x3F are one memslot each */
#define G_BIG_SLOT 100
#define SEL_KCS 0x10
#define SEL_KDS 0x18
#define SEL_UCS32 0x23
#define SEL_UDS 0x2b
#define SEL_UCS 0x33
#define SEL_TSS 0x38
#define PORT_EXC 0xEF   /* exception stubs: al = vector */
#define PORT_DONE 0xE0  /* probe code: "done" / "syscall" marker */

#define MSR_EFER 0xC0000080
#define MSR_STAR 0xC0000081
#define MSR_LSTAR 0xC0000082
#define MSR_CSTAR 0xC0000083
#define MSR_SFMASK 0xC0000084
#define MSR_FS_BASE 0xC0000100
#define MSR_GS_BASE 0xC0000101
#define MSR_KERNEL_GS_BASE 0xC0000102
#define MSR_TSC_AUX 0xC0000103
#define MSR_TSC 0x10
#define MSR_SYSENTER_CS 0x174
#define MSR_SYSENTER_ESP 0x175
#define MSR_SYSENTER_EIP 0x176
#define MSR_PAT 0x277

static inline int has_errcode(int v) { return v == 8 || (v >= 10 && v <= 14) || v == 17 || v == 21 || v == 29 || v == 30; }

#define DIE(...) do { fprintf(stderr, "probe: " __VA_ARGS__); fprintf(stderr, " (%s)\n", strerror(errno)); exit(2); } while (0)

static const char *exit_name(uint32_t r) {
    static const char *n[] = {"UNKNOWN", "EXCEPTION", "IO", "HYPERCALL", "DEBUG", "HLT", "MMIO", "IRQ_WINDOW_OPEN",
                              "SHUTDOWN", "FAIL_ENTRY", "INTR", "SET_TPR", "TPR_ACCESS", "S390_SIEIC", "S390_RESET", "DCR",
                              "NMI", "INTERNAL_ERROR", "OSI", "PAPR_HCALL", "S390_UCONTROL", "WATCHDOG", "S390_TSCH", "EPR",
                              "SYSTEM_EVENT", "S390_STSI", "IOAPIC_EOI", "HYPERV", "ARM_NISV", "X86_RDMSR", "X86_WRMSR",
                              "DIRTY_RING_FULL", "AP_RESET_HOLD", "X86_BUS_LOCK", "XEN", "RISCV_SBI", "RISCV_CSR", "NOTIFY",
                              "LOONGARCH_IOCSR", "MEMORY_FAULT"};
    return r < sizeof n / sizeof *n ? n[r] : "?";
}

/* ---- timing ---- */
static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}
static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}
static void loadavg(char *buf, size_t n) {
    FILE *f = fopen("/proc/loadavg", "r");
    buf[0] = 0;
    if (f) { if (!fgets(buf, (int)n, f)) buf[0] = 0; fclose(f); }
    char *nl = strchr(buf, '\n'); if (nl) *nl = 0;
}
/* prints "label: n=N p10 X p50 Y p90 Z us (load ...)"; sorts v */
static void report_us(const char *label, uint64_t *v, size_t n) {
    char la[128];
    qsort(v, n, sizeof *v, cmp_u64);
    loadavg(la, sizeof la);
    printf("  %-58s n=%zu p10 %.2f p50 %.2f p90 %.2f us  (loadavg %s)\n", label, n, v[n / 10] / 1e3, v[n / 2] / 1e3,
           v[n * 9 / 10] / 1e3, la);
}

/* ---- VM / vCPU ---- */
struct vm { int kvm, fd; uint8_t *mem; uint8_t pmode[0x40]; /* per small page: 0 absent, 1 mapped, 2 READONLY */ };
struct vcpu { int fd; struct kvm_run *run; int runsz; };

static int kvm_open(void) {
    int k = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (k < 0) DIE("open /dev/kvm");
    return k;
}
static int cap(int fd, long c) { return ioctl(fd, KVM_CHECK_EXTENSION, c); }

static void set_slot(struct vm *vm, uint32_t slot, uint64_t gpa, uint64_t size, void *host, uint32_t flags) {
    struct kvm_userspace_memory_region r = {.slot = slot, .flags = flags, .guest_phys_addr = gpa,
                                            .memory_size = size, .userspace_addr = (uint64_t)(uintptr_t)host};
    if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &r) < 0) DIE("KVM_SET_USER_MEMORY_REGION slot %u gpa %#lx size %#lx flags %u", slot, (unsigned long)gpa, (unsigned long)size, flags);
}
/* page below 0x40000: mode 0 = absent, 1 = normal, 2 = READONLY */
static void page_mode(struct vm *vm, uint64_t gpa, int mode) {
    uint32_t slot = (uint32_t)(gpa >> 12);
    if (vm->pmode[slot] == mode) return;
    if (vm->pmode[slot]) set_slot(vm, slot, gpa & ~0xfffull, 0, vm->mem + (gpa & ~0xfffull), 0);
    vm->pmode[slot] = (uint8_t)mode;
    if (mode) set_slot(vm, slot, gpa & ~0xfffull, 0x1000, vm->mem + (gpa & ~0xfffull), mode == 2 ? KVM_MEM_READONLY : 0);
}

/* A VM on host memory `mem` (G_RAM bytes; allocated if NULL). */
static struct vm vm_create_on(uint8_t *mem) {
    struct vm vm = {.kvm = kvm_open()};
    if (ioctl(vm.kvm, KVM_GET_API_VERSION, 0) != 12) DIE("api version");
    vm.fd = ioctl(vm.kvm, KVM_CREATE_VM, 0);
    if (vm.fd < 0) DIE("KVM_CREATE_VM");
    if (!mem) {
        mem = mmap(NULL, G_RAM, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED) DIE("mmap");
    }
    vm.mem = mem;
    for (int p = 0; p < G_SMALL_PAGES; p++) vm.pmode[p] = 1;
    for (int p = 0; p < G_SMALL_PAGES; p++) set_slot(&vm, (uint32_t)p, (uint64_t)p << 12, 0x1000, mem + ((size_t)p << 12), 0);
    set_slot(&vm, G_BIG_SLOT, G_SMALL_PAGES << 12, G_RAM - (G_SMALL_PAGES << 12), mem + (G_SMALL_PAGES << 12), 0);
    return vm;
}
static struct vm vm_create(void) { return vm_create_on(NULL); }
static void vm_destroy(struct vm *vm, int free_mem) {
    close(vm->fd);
    close(vm->kvm);
    if (free_mem) munmap(vm->mem, G_RAM);
}

static struct kvm_cpuid2 *supported_cpuid(int kvm) {
    int n = 256;
    struct kvm_cpuid2 *c = calloc(1, sizeof *c + n * sizeof(struct kvm_cpuid_entry2));
    c->nent = n;
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, c) < 0) DIE("KVM_GET_SUPPORTED_CPUID");
    return c;
}
static struct vcpu vcpu_create(struct vm *vm, int id) {
    struct vcpu v;
    v.fd = ioctl(vm->fd, KVM_CREATE_VCPU, id);
    if (v.fd < 0) DIE("KVM_CREATE_VCPU");
    v.runsz = ioctl(vm->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    v.run = mmap(NULL, (size_t)v.runsz, PROT_READ | PROT_WRITE, MAP_SHARED, v.fd, 0);
    if (v.run == MAP_FAILED) DIE("mmap kvm_run");
    struct kvm_cpuid2 *c = supported_cpuid(vm->kvm);
    if (ioctl(v.fd, KVM_SET_CPUID2, c) < 0) DIE("KVM_SET_CPUID2");
    free(c);
    return v;
}
static void vcpu_destroy(struct vcpu *v) {
    munmap(v->run, (size_t)v->runsz);
    close(v->fd);
}

static uint64_t get_msr(struct vcpu *v, uint32_t idx) {
    struct { struct kvm_msrs h; struct kvm_msr_entry e; } m = {.h = {.nmsrs = 1}, .e = {.index = idx}};
    if (ioctl(v->fd, KVM_GET_MSRS, &m) != 1) return ~0ull;
    return m.e.data;
}
static int set_msr(struct vcpu *v, uint32_t idx, uint64_t val) {
    struct { struct kvm_msrs h; struct kvm_msr_entry e; } m = {.h = {.nmsrs = 1}, .e = {.index = idx, .data = val}};
    return ioctl(v->fd, KVM_SET_MSRS, &m);
}

/* ---- guest image ---- */
static inline uint64_t *q(struct vm *vm, uint64_t gpa) { return (uint64_t *)(vm->mem + gpa); }
static void idt_gate(struct vm *vm, int v, uint64_t handler, int dpl, int sel) {
    uint64_t *g = q(vm, G_IDT + 16 * (uint64_t)v);
    g[0] = (handler & 0xffff) | ((uint64_t)sel << 16) | ((uint64_t)(0x8e | dpl << 5) << 40) | (((handler >> 16) & 0xffff) << 48);
    g[1] = handler >> 32;
}
/* Writes page tables, GDT, TSS, IDT and the stubs. */
static void guest_build(struct vm *vm) {
    memset(vm->mem, 0, G_SMALL_PAGES << 12);
    *q(vm, G_PML4) = G_PDPT | 7;
    *q(vm, G_PDPT) = G_PD | 7;
    *q(vm, G_PD) = G_PT | 7;
    for (uint64_t p = 1; p < 512; p++) *q(vm, G_PT + 8 * p) = (p << 12) | 3 | ((p >= 0x10 && p < 0x20) ? 4 : 0);
    uint64_t *gdt = q(vm, G_GDT);
    gdt[2] = 0x00af9a000000ffffull; /* 0x10 */
    gdt[3] = 0x00cf92000000ffffull; /* 0x18 */
    gdt[4] = 0x00cffa000000ffffull; /* 0x20 user CS32 */
    gdt[5] = 0x00cff2000000ffffull; /* 0x28 user DS */
    gdt[6] = 0x00affa000000ffffull; /* 0x30 user CS64 */
    gdt[7] = 103 | ((uint64_t)(G_TSS & 0xffffff) << 16) | (0x8bull << 40); /* 0x38 TSS, busy */
    gdt[8] = 0;
    *(uint64_t *)(vm->mem + G_TSS + 4) = G_KSTACK_TOP; /* RSP0 */
    *(uint16_t *)(vm->mem + G_TSS + 102) = 104;           /* no I/O bitmap */
    for (int v = 0; v < 256; v++) {
        uint8_t *s = vm->mem + G_STUBS + 16 * v;
        int i = 0;
        s[i++] = 0xb0; s[i++] = (uint8_t)v;      /* mov $v,%al */
        s[i++] = 0xe6; s[i++] = PORT_EXC;         /* out %al,$0xEF */
        if (has_errcode(v)) { s[i++] = 0x48; s[i++] = 0x83; s[i++] = 0xc4; s[i++] = 0x08; } /* add $8,%rsp */
        s[i++] = 0x48; s[i++] = 0xcf;             /* iretq */
        idt_gate(vm, v, G_STUBS + 16 * (uint64_t)v, 3, SEL_KCS);
    }
}
/* Guest code blob assembled into the probe binary (GNU as syntax; a read-only data section, never
 * executed by the host): BLOB(name, "insn\n" ...) defines name_s[] .. name_e[]. */
#define BLOB(name, code) \
    __asm__(".pushsection .rodata.blob_" #name ",\"a\"\n" #name "_s:\n" code "\n" #name "_e:\n.popsection\n"); \
    extern const uint8_t name##_s[] __asm__(#name "_s"), name##_e[] __asm__(#name "_e");
static void put_code(struct vm *vm, uint64_t gpa, const uint8_t *start, const uint8_t *end) {
    memcpy(vm->mem + gpa, start, (size_t)(end - start));
}

static struct kvm_segment seg_code(int sel, int dpl) {
    return (struct kvm_segment){.selector = (uint16_t)sel, .type = 0xb, .s = 1, .l = 1, .present = 1, .g = 1, .dpl = (uint8_t)dpl, .limit = 0xffffffff};
}
static struct kvm_segment seg_data(int sel, int dpl) {
    return (struct kvm_segment){.selector = (uint16_t)sel, .type = 3, .s = 1, .db = 1, .present = 1, .g = 1, .dpl = (uint8_t)dpl, .limit = 0xffffffff};
}
/* Long mode at CPL `cpl` (0 or 3), GDTR/IDTR/TR set, SCE on; rip/rsp as given, rflags 0x202 (IF). */
static void vcpu_longmode(struct vcpu *v, int cpl, uint64_t rip, uint64_t rsp) {
    struct kvm_sregs s;
    if (ioctl(v->fd, KVM_GET_SREGS, &s) < 0) DIE("KVM_GET_SREGS");
    s.cs = cpl ? seg_code(SEL_UCS, 3) : seg_code(SEL_KCS, 0);
    s.ds = s.es = s.fs = s.gs = s.ss = cpl ? seg_data(SEL_UDS, 3) : seg_data(SEL_KDS, 0);
    s.tr = (struct kvm_segment){.selector = SEL_TSS, .base = G_TSS, .limit = 103, .type = 11, .present = 1};
    s.ldt = (struct kvm_segment){.selector = 0, .type = 2, .present = 1, .limit = 0xffff, .unusable = 1};
    s.gdt.base = G_GDT; s.gdt.limit = 0x5f;
    s.idt.base = G_IDT; s.idt.limit = 256 * 16 - 1;
    s.cr0 = 0x80010033; s.cr3 = G_PML4; s.cr4 = 0x20 | 0x200 | 0x400; s.efer = 0xd01; /* SCE LME LMA NXE */
    if (ioctl(v->fd, KVM_SET_SREGS, &s) < 0) DIE("KVM_SET_SREGS");
    struct kvm_regs r = {.rip = rip, .rsp = rsp, .rflags = 0x202};
    if (ioctl(v->fd, KVM_SET_REGS, &r) < 0) DIE("KVM_SET_REGS");
    set_msr(v, MSR_STAR, (0x23ull << 48) | (0x10ull << 32));
    set_msr(v, MSR_LSTAR, G_KCODE);
    set_msr(v, MSR_SFMASK, 0x700);
}

static int vcpu_run(struct vcpu *v) {
    int r = ioctl(v->fd, KVM_RUN, 0);
    return r < 0 ? -errno : (int)v->run->exit_reason;
}

/* KVM_RUN with a timeout (SIGALRM without SA_RESTART): returns -EINTR if the guest ran that long */
#include <signal.h>
#include <sys/time.h>
static void kp_on_alarm(int s) { (void)s; }
static int vcpu_run_timeout(struct vcpu *v, int ms) {
    static int installed;
    if (!installed) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = kp_on_alarm;
        sigaction(SIGALRM, &sa, NULL);
        installed = 1;
    }
    struct itimerval it = {.it_value = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000}};
    setitimer(ITIMER_REAL, &it, NULL);
    int rc = vcpu_run(v);
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, NULL);
    return rc;
}

/* ---- state printing ---- */
static void print_events(struct vcpu *v, const char *pfx) {
    struct kvm_vcpu_events e;
    memset(&e, 0, sizeof e);
    if (ioctl(v->fd, KVM_GET_VCPU_EVENTS, &e) < 0) { printf("%sKVM_GET_VCPU_EVENTS failed: %s\n", pfx, strerror(errno)); return; }
    printf("%sevents: exception inj %u nr %u has_err %u err %#x pending %u | interrupt inj %u nr %u soft %u shadow %u | nmi inj %u pend %u masked %u | flags %#x\n",
           pfx, e.exception.injected, e.exception.nr, e.exception.has_error_code, e.exception.error_code, e.exception.pending,
           e.interrupt.injected, e.interrupt.nr, e.interrupt.soft, e.interrupt.shadow, e.nmi.injected, e.nmi.pending, e.nmi.masked, e.flags);
}
static void print_state(struct vcpu *v, const char *pfx) {
    struct kvm_regs r; struct kvm_sregs s;
    ioctl(v->fd, KVM_GET_REGS, &r);
    ioctl(v->fd, KVM_GET_SREGS, &s);
    printf("%srip %#llx rsp %#llx rflags %#llx rax %#llx | cs %#x (dpl %u) ss %#x cr2 %#llx\n", pfx, r.rip, r.rsp, r.rflags, r.rax,
           s.cs.selector, s.cs.dpl, s.ss.selector, s.cr2);
    print_events(v, pfx);
}
/* one-line description of the last exit */
static void print_exit(struct vcpu *v, int rc, const char *pfx) {
    struct kvm_run *run = v->run;
    if (rc < 0) { printf("%sKVM_RUN error %d (%s)\n", pfx, rc, strerror(-rc)); return; }
    printf("%sexit %s (%d)", pfx, exit_name((uint32_t)rc), rc);
    switch (rc) {
    case KVM_EXIT_IO:
        printf(" port %#x dir %s size %u data %#x", run->io.port, run->io.direction ? "out" : "in", run->io.size,
               *(uint8_t *)((uint8_t *)run + run->io.data_offset));
        break;
    case KVM_EXIT_MMIO:
        printf(" gpa %#llx len %u is_write %u", run->mmio.phys_addr, run->mmio.len, run->mmio.is_write);
        break;
    case KVM_EXIT_INTERNAL_ERROR:
        printf(" suberror %u ndata %u data", run->internal.suberror, run->internal.ndata);
        for (uint32_t i = 0; i < run->internal.ndata && i < 16; i++) printf(" %#llx", run->internal.data[i]);
        break;
    case KVM_EXIT_FAIL_ENTRY:
        printf(" hw reason %#llx cpu %u", run->fail_entry.hardware_entry_failure_reason, run->fail_entry.cpu);
        break;
    case KVM_EXIT_DEBUG:
        printf(" exception %u pc %#llx dr6 %#llx dr7 %#llx", run->debug.arch.exception, run->debug.arch.pc, run->debug.arch.dr6,
               run->debug.arch.dr7);
        break;
    case KVM_EXIT_X86_RDMSR: case KVM_EXIT_X86_WRMSR:
        printf(" msr %#x data %#llx reason %u", run->msr.index, run->msr.data, run->msr.reason);
        break;
    case KVM_EXIT_MEMORY_FAULT: {
        uint64_t *m = (uint64_t *)&run->hypercall; /* union: memory_fault { flags, gpa, size } */
        printf(" flags %#lx gpa %#lx size %#lx", (unsigned long)m[0], (unsigned long)m[1], (unsigned long)m[2]);
        break;
    }
    }
    printf("\n");
}
static int io_val(struct vcpu *v) { return *(uint8_t *)((uint8_t *)v->run + v->run->io.data_offset); }
static int is_out(struct vcpu *v, int rc, int port) { return rc == KVM_EXIT_IO && v->run->io.direction == KVM_EXIT_IO_OUT && v->run->io.port == port; }

/* Reads the exception frame the stub at `rsp` sits on (after an OUT from stub v). */
struct frame { uint64_t err, rip, cs, rflags, rsp, ss; };
static struct frame read_frame(struct vm *vm, uint64_t rsp, int v) {
    struct frame f = {0};
    uint64_t *p = (uint64_t *)(vm->mem + rsp);
    if (rsp + 48 > G_RAM) return f;
    if (has_errcode(v)) f.err = *p++;
    f.rip = p[0]; f.cs = p[1]; f.rflags = p[2]; f.rsp = p[3]; f.ss = p[4];
    return f;
}
static void print_frame(struct frame f, int v, const char *pfx) {
    printf("%sframe: vector %d err %#llx rip %#llx cs %#llx rflags %#llx rsp %#llx ss %#llx\n", pfx, v,
           has_errcode(v) ? (unsigned long long)f.err : 0ull, (unsigned long long)f.rip, (unsigned long long)f.cs,
           (unsigned long long)f.rflags, (unsigned long long)f.rsp, (unsigned long long)f.ss);
}

/* ---- vCPU statistics (KVM_GET_STATS_FD) ---- */
struct kp_stats { int fd; struct kvm_stats_header h; struct kvm_stats_desc *d; size_t dsz; };
static struct kp_stats stats_open(int vcpufd) {
    struct kp_stats s = {.fd = ioctl(vcpufd, KVM_GET_STATS_FD, NULL)};
    if (s.fd < 0) return s;
    if (pread(s.fd, &s.h, sizeof s.h, 0) != sizeof s.h) { s.fd = -1; return s; }
    s.dsz = sizeof(struct kvm_stats_desc) + s.h.name_size;
    s.d = malloc(s.dsz * s.h.num_desc);
    if (pread(s.fd, s.d, s.dsz * s.h.num_desc, s.h.desc_offset) < 0) s.fd = -1;
    return s;
}
static uint64_t stat_get(struct kp_stats *s, const char *name) {
    if (s->fd < 0) return ~0ull;
    for (uint32_t i = 0; i < s->h.num_desc; i++) {
        struct kvm_stats_desc *d = (void *)((char *)s->d + i * s->dsz);
        if (!strcmp(d->name, name)) {
            uint64_t val = 0;
            if (pread(s->fd, &val, 8, s->h.data_offset + d->offset) != 8) return ~0ull;
            return val;
        }
    }
    return ~0ull;
}
#endif
