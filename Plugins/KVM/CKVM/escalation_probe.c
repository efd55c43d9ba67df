/*
 * escalation_probe.c - the KVM backend's probe for its escalation exit (NPT_CAP_EXIT_ON_ESCALATE).
 *
 * The backend sees a user-to-supervisor transition by leaving the guest's IDT page out of the
 * memslot layout of the user hierarchy (docs/kvm-escalation.md): an event delivered from CPL 3 then
 * cannot read its gate and stops in the VMM before any CPL 0 instruction runs. That is only an
 * exit on *every* transition if no entry path reaches CPL 0 without the IDT. This probe checks it
 * on the running KVM, once per process, with a small guest whose IDT page has no memslot, EFER.SCE
 * cleared (as the backend keeps it while the user layout is installed) and the other entry MSRs
 * set: an event must stop with the vCPU still at CPL 3 (KVM_EXIT_SHUTDOWN with the lost event
 * identifiable from KVM_GET_VCPU_EVENTS against a sentinel, or KVM_EXIT_INTERNAL_ERROR with
 * suberror KVM_INTERNAL_ERROR_DELIVERY_EV where KVM keeps the event), and SYSCALL (64-bit and
 * compatibility mode), SYSENTER, a call gate and INT n must not reach CPL 0 without such a stop.
 * A re-injected #BP must then reach the guest's handler with the native frame.
 *
 * Measured facts this rests on (Tests/probes/kvm/, docs/kvm-on-this-machine.md): on the build
 * machine's PVM-flavoured KVM every case stops with KVM_EXIT_SHUTDOWN; a stock VMX/SVM KVM since
 * Linux 6.14 gives DELIVERY_EV instead (from KVM's source, not measured). Anything else (an older
 * KVM that mis-emulates, an Intel host where SYSENTER reaches CPL 0, a call gate that works) makes
 * the probe refuse, with the reason.
 */
#define _GNU_SOURCE
#include "ckvm.h"
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#ifndef KVM_INTERNAL_ERROR_DELIVERY_EV
#define KVM_INTERNAL_ERROR_DELIVERY_EV 3
#endif

enum {
    RAM = 2u << 20, PML4 = 0x1000, PDPT = 0x2000, PD = 0x3000, PT = 0x4000, GDT = 0x5000, TSS = 0x6000,
    IDT = 0x7000, STUBS = 0x8000, KSTACK_TOP = 0xA000, KCODE = 0xB000, UCODE = 0x10000, USTACK_TOP = 0x12000,
    MARK = 0x20000 /* a user page with no memslot: reaching it is an MMIO exit at CPL 3 */
};
#define MSR_STAR 0xC0000081u
#define MSR_LSTAR 0xC0000082u
#define MSR_CSTAR 0xC0000083u
#define MSR_SFMASK 0xC0000084u
#define MSR_SYSENTER_CS 0x174u
#define MSR_SYSENTER_ESP 0x175u
#define MSR_SYSENTER_EIP 0x176u

struct probe {
    int kvm, vm, cpu;
    struct kvm_run *run;
    size_t runsz;
    uint8_t *mem;
};

static int set_slot(struct probe *p, uint32_t slot, uint64_t gpa, uint64_t size) {
    struct kvm_userspace_memory_region r = {.slot = slot, .guest_phys_addr = gpa, .memory_size = size,
                                            .userspace_addr = size ? (uint64_t)(uintptr_t)(p->mem + gpa) : 0};
    return ioctl(p->vm, KVM_SET_USER_MEMORY_REGION, &r);
}

static int set_msr(struct probe *p, uint32_t index, uint64_t value) {
    uint64_t buf[(sizeof(struct kvm_msrs) + sizeof(struct kvm_msr_entry)) / 8 + 1];
    memset(buf, 0, sizeof buf);
    struct kvm_msrs *m = (struct kvm_msrs *)buf;
    m->nmsrs = 1;
    m->entries[0].index = index;
    m->entries[0].data = value;
    return ioctl(p->cpu, KVM_SET_MSRS, m) == 1 ? 0 : -1;
}

static struct kvm_segment seg(uint16_t sel, int code, int dpl, int l) {
    struct kvm_segment s;
    memset(&s, 0, sizeof s);
    s.selector = sel; s.limit = 0xffffffff; s.present = 1; s.s = 1; s.g = 1; s.dpl = (uint8_t)dpl;
    s.type = code ? 0xb : 3;
    s.l = (uint8_t)(code && l);
    s.db = (uint8_t)!(code && l);
    return s;
}

static void build(struct probe *p) {
    uint8_t *m = p->mem;
    memset(m, 0, 0x21000);
    uint64_t *q = (uint64_t *)m;
    q[PML4 / 8] = PDPT | 7;
    q[PDPT / 8] = PD | 7;
    q[PD / 8] = PT | 7;
    for (uint64_t pg = 1; pg < 512; pg++) q[PT / 8 + pg] = (pg << 12) | 3 | (pg >= 0x10 && pg <= 0x20 ? 4 : 0);
    uint64_t *gdt = (uint64_t *)(m + GDT);
    gdt[2] = 0x00af9a000000ffffull; /* 0x10 kernel CS */
    gdt[3] = 0x00cf92000000ffffull; /* 0x18 kernel DS */
    gdt[4] = 0x00cffa000000ffffull; /* 0x20 user CS32 (0x23) */
    gdt[5] = 0x00cff2000000ffffull; /* 0x28 user DS (0x2b) */
    gdt[6] = 0x00affa000000ffffull; /* 0x30 user CS64 (0x33) */
    gdt[7] = 103 | ((uint64_t)TSS << 16) | (0x8bull << 40); /* 0x38 TSS */
    /* 0x48: a 64-bit call gate, DPL 3, to KCODE + 0x300 */
    uint64_t cg = KCODE + 0x300;
    gdt[9] = (cg & 0xffff) | (0x10ull << 16) | (0xecull << 40) | (((cg >> 16) & 0xffff) << 48);
    gdt[10] = cg >> 32;
    *(uint64_t *)(m + TSS + 4) = KSTACK_TOP;
    *(uint16_t *)(m + TSS + 102) = 104;
    for (int v = 0; v < 256; v++) {
        uint8_t *s = m + STUBS + 16 * v;
        int i = 0, err = v == 8 || (v >= 10 && v <= 14) || v == 17 || v == 21;
        s[i++] = 0xb0; s[i++] = (uint8_t)v; s[i++] = 0xe6; s[i++] = 0xef; /* mov $v,%al; out %al,$0xef */
        if (err) { s[i++] = 0x48; s[i++] = 0x83; s[i++] = 0xc4; s[i++] = 0x08; }
        s[i++] = 0x48; s[i++] = 0xcf;                                     /* iretq */
        uint64_t h = STUBS + 16 * (uint64_t)v;
        uint64_t *g = (uint64_t *)(m + IDT + 16 * v);
        g[0] = (h & 0xffff) | (0x10ull << 16) | (0xeeull << 40) | (((h >> 16) & 0xffff) << 48);
        g[1] = 0;
    }
    for (int k = 0; k < 4; k++) { /* kernel entries: out %al,$0xe1+k; hlt */
        uint8_t *c = m + KCODE + 0x100 * k;
        c[0] = 0xe6; c[1] = (uint8_t)(0xe1 + k); c[2] = 0xf4;
    }
}

/* The case's user code: the instruction, then a read of MARK (reached only if the instruction
 * neither faulted nor left CPL 3), then a loop. */
static void user_code(struct probe *p, const uint8_t *insn, size_t n, int compat) {
    uint8_t *c = p->mem + UCODE;
    memset(c, 0xcc, 64);
    memcpy(c, insn, n);
    size_t i = n;
    c[i++] = 0xa0; /* mov moffs, %al */
    uint64_t a = MARK;
    memcpy(c + i, &a, compat ? 4 : 8);
    i += compat ? 4 : 8;
    c[i++] = 0xeb; c[i++] = 0xfe;
}

static int user_state(struct probe *p, int compat) {
    struct kvm_sregs s;
    if (ioctl(p->cpu, KVM_GET_SREGS, &s) < 0) return -1;
    s.cs = seg(compat ? 0x23 : 0x33, 1, 3, !compat);
    s.ds = s.es = s.fs = s.gs = s.ss = seg(0x2b, 0, 3, 0);
    memset(&s.tr, 0, sizeof s.tr);
    s.tr.selector = 0x38; s.tr.base = TSS; s.tr.limit = 103; s.tr.type = 11; s.tr.present = 1;
    memset(&s.ldt, 0, sizeof s.ldt);
    s.ldt.type = 2; s.ldt.present = 1; s.ldt.limit = 0xffff; s.ldt.unusable = 1;
    s.gdt.base = GDT; s.gdt.limit = 0x5f;
    s.idt.base = IDT; s.idt.limit = 256 * 16 - 1;
    s.cr0 = 0x80010033; s.cr3 = PML4; s.cr4 = 0x20 | 0x200 | 0x400;
    s.efer = 0xd00; /* LME LMA NXE; SCE clear, as the backend keeps it in the user layout */
    if (ioctl(p->cpu, KVM_SET_SREGS, &s) < 0) return -1;
    struct kvm_regs r;
    memset(&r, 0, sizeof r);
    r.rip = UCODE; r.rsp = USTACK_TOP; r.rflags = 0x2;
    if (ioctl(p->cpu, KVM_SET_REGS, &r) < 0) return -1;
    struct kvm_vcpu_events e;
    if (ioctl(p->cpu, KVM_GET_VCPU_EVENTS, &e) < 0) return -1;
    memset(&e.exception, 0, sizeof e.exception);
    e.exception.nr = 0xff; /* the sentinel: a lost exception overwrites it */
    e.flags = 0;
    return ioctl(p->cpu, KVM_SET_VCPU_EVENTS, &e);
}

/* KVM_RUN with a watchdog: a guest that ran past the bound is stopped by the kick signal. */
/* `done` is atomic: the watchdog thread reads it while the running thread sets it (volatile is no
 * synchronization; ThreadSanitizer reported the race). */
struct watchdog { pthread_t target; _Atomic int done; struct kvm_run *run; };
static void *watch(void *arg) {
    struct watchdog *w = arg;
    for (int i = 0; i < 100 && !atomic_load(&w->done); i++) {
        struct timespec ts = {0, 10 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    if (!atomic_load(&w->done)) { ckvm_run_set_immediate_exit(w->run, 1); ckvm_kick_thread(w->target); }
    return NULL;
}
static int run_bounded(struct probe *p) {
    struct watchdog w = {pthread_self(), 0, p->run};
    pthread_t t;
    int have = pthread_create(&t, NULL, watch, &w) == 0;
    int rc = ioctl(p->cpu, KVM_RUN, 0);
    int err = errno;
    atomic_store(&w.done, 1);
    if (have) pthread_join(t, NULL);
    ckvm_run_set_immediate_exit(p->run, 0);
    return rc < 0 ? -err : (int)p->run->exit_reason;
}

/* What one case did. 1: stopped at CPL 3 before any delivery (the escalation exit); 2: did not
 * leave CPL 3 (fell through to MARK); 0: anything else (reached CPL 0, delivered, hung), with the
 * text in `why`. `mech` gets 1 (SHUTDOWN) or 2 (DELIVERY_EV); `lost` the exception KVM_GET_VCPU_EVENTS
 * shows after a SHUTDOWN (0xff: none). */
static int one(struct probe *p, const char *name, const uint8_t *insn, size_t n, int compat, int *mech, int *lost,
               char *why, size_t wn) {
    user_code(p, insn, n, compat);
    if (user_state(p, compat) < 0) { snprintf(why, wn, "%s: cannot set the vCPU state (%s)", name, strerror(errno)); return 0; }
    int rc = run_bounded(p);
    struct kvm_sregs s;
    if (ioctl(p->cpu, KVM_GET_SREGS, &s) < 0) { snprintf(why, wn, "%s: KVM_GET_SREGS failed", name); return 0; }
    *lost = 0xff;
    if (rc == KVM_EXIT_SHUTDOWN && s.cs.dpl == 3) {
        struct kvm_vcpu_events e;
        if (ioctl(p->cpu, KVM_GET_VCPU_EVENTS, &e) < 0) { snprintf(why, wn, "%s: KVM_GET_VCPU_EVENTS failed", name); return 0; }
        *lost = e.exception.nr;
        *mech = 1;
        return 1;
    }
    if (rc == KVM_EXIT_INTERNAL_ERROR && p->run->internal.suberror == KVM_INTERNAL_ERROR_DELIVERY_EV && s.cs.dpl == 3) {
        *mech = 2;
        return 1;
    }
    if (rc == KVM_EXIT_MMIO && p->run->mmio.phys_addr == MARK && s.cs.dpl == 3) return 2;
    if (rc == KVM_EXIT_IO) {
        snprintf(why, wn, "%s reaches CPL %u (port %#x) without an exit", name, s.cs.dpl, p->run->io.port);
        return 0;
    }
    snprintf(why, wn, "%s: unexpected outcome (KVM_RUN %d, CPL %u)", name, rc, s.cs.dpl);
    return 0;
}

int ckvm_probe_escalation(struct ckvm_escalation_probe *out) {
    memset(out, 0, sizeof *out);
    struct probe p = {-1, -1, -1, NULL, 0, NULL};
    int ok = 0;
    char *why = out->reason;
    const size_t wn = sizeof out->reason;
    ckvm_kick_signal_install();
    p.kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (p.kvm < 0) { snprintf(why, wn, "cannot open /dev/kvm: %s", strerror(errno)); return 0; }
    p.vm = ioctl(p.kvm, KVM_CREATE_VM, 0);
    p.mem = mmap(NULL, RAM, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (p.vm < 0 || p.mem == MAP_FAILED) { snprintf(why, wn, "cannot create a probe VM: %s", strerror(errno)); goto out; }
    build(&p);
    /* RAM minus the IDT page (as in the user layout) and minus MARK */
    if (set_slot(&p, 0, 0, IDT) < 0 || set_slot(&p, 1, IDT + 0x1000, MARK - IDT - 0x1000) < 0 ||
        set_slot(&p, 2, MARK + 0x1000, RAM - MARK - 0x1000) < 0) {
        snprintf(why, wn, "KVM_SET_USER_MEMORY_REGION: %s", strerror(errno)); goto out;
    }
    p.cpu = ioctl(p.vm, KVM_CREATE_VCPU, 0);
    int sz = ioctl(p.kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (p.cpu < 0 || sz <= 0) { snprintf(why, wn, "cannot create a probe vCPU: %s", strerror(errno)); goto out; }
    p.runsz = (size_t)sz;
    p.run = mmap(NULL, p.runsz, PROT_READ | PROT_WRITE, MAP_SHARED, p.cpu, 0);
    if (p.run == MAP_FAILED) { p.run = NULL; snprintf(why, wn, "mmap kvm_run: %s", strerror(errno)); goto out; }
    {
        struct kvm_cpuid2 *c = calloc(1, sizeof *c + 256 * sizeof(struct kvm_cpuid_entry2));
        if (!c) goto out;
        c->nent = 256;
        int e = ioctl(p.kvm, KVM_GET_SUPPORTED_CPUID, c) < 0 || ioctl(p.cpu, KVM_SET_CPUID2, c) < 0;
        free(c);
        if (e) { snprintf(why, wn, "cannot set the probe vCPU's CPUID: %s", strerror(errno)); goto out; }
    }
    if (set_msr(&p, MSR_STAR, (0x23ull << 48) | (0x10ull << 32)) || set_msr(&p, MSR_LSTAR, KCODE) ||
        set_msr(&p, MSR_CSTAR, KCODE + 0x100) || set_msr(&p, MSR_SFMASK, 0x700) ||
        set_msr(&p, MSR_SYSENTER_CS, 0x10) || set_msr(&p, MSR_SYSENTER_ESP, KSTACK_TOP) ||
        set_msr(&p, MSR_SYSENTER_EIP, KCODE + 0x200)) {
        snprintf(why, wn, "cannot set the system-call MSRs"); goto out;
    }
    {
        static const struct { const char *name; uint8_t insn[8]; size_t n; int compat; int event; } cases[] = {
            {"INT3 at CPL 3", {0xcc}, 1, 0, 3},
            {"UD2 at CPL 3", {0x0f, 0x0b}, 2, 0, 6},
            {"INT $0x80 at CPL 3", {0xcd, 0x80}, 2, 0, -1},
            {"64-bit SYSCALL", {0x0f, 0x05}, 2, 0, -1},
            {"compatibility-mode SYSCALL", {0x0f, 0x05}, 2, 1, -1},
            {"64-bit SYSENTER", {0x0f, 0x34}, 2, 0, -1},
            {"compatibility-mode SYSENTER", {0x0f, 0x34}, 2, 1, -1},
            {"a far call through a DPL-3 call gate", {0x9a, 0, 0, 0, 0, 0x4b, 0}, 7, 1, -1},
        };
        int mech = 0, first = 0;
        for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
            int m = 0, lost = 0xff;
            int r = one(&p, cases[i].name, cases[i].insn, cases[i].n, cases[i].compat, &m, &lost, why, wn);
            if (r == 0) goto out;
            if (r == 1) {
                if (!first) { mech = m; first = 1; }
                if (m != mech) { snprintf(why, wn, "%s stops differently from the first case", cases[i].name); goto out; }
                if (m == 1 && cases[i].event >= 0 && lost != cases[i].event) {
                    snprintf(why, wn, "%s: the lost event is not identifiable (exception %d after the stop, expected %d)",
                             cases[i].name, lost, cases[i].event);
                    goto out;
                }
                if (m == 1 && lost == 0xff) {
                    snprintf(why, wn, "%s: stopped but the lost event cannot be identified", cases[i].name);
                    goto out;
                }
            } else if (cases[i].event >= 0) {
                snprintf(why, wn, "%s did not fault", cases[i].name);
                goto out;
            }
        }
        if (!mech) { snprintf(why, wn, "no event stopped"); goto out; }
        out->mechanism = mech;
        /* The re-delivery: after a SHUTDOWN, the IDT page mapped again and the lost #BP re-injected,
         * the guest's handler runs at CPL 0 with the frame of a native delivery (rip past the INT3). */
        {
            int m = 0, lost = 0xff;
            static const uint8_t int3[] = {0xcc};
            if (one(&p, "INT3 (re-delivery)", int3, 1, 0, &m, &lost, why, wn) != 1 || (m == 1 && lost != 3)) goto out;
            if (set_slot(&p, 3, IDT, 0x1000) < 0) { snprintf(why, wn, "re-delivery: cannot map the IDT page"); goto out; }
            int rc = 0;
            if (m == 1) { /* KVM dropped the event: inject it again */
                struct kvm_vcpu_events e;
                ioctl(p.cpu, KVM_GET_VCPU_EVENTS, &e);
                memset(&e.exception, 0, sizeof e.exception);
                e.exception.injected = 1;
                e.exception.nr = 3;
                e.flags = 0;
                if (ioctl(p.cpu, KVM_SET_VCPU_EVENTS, &e) < 0) rc = -1;
            }
            if (rc == 0) rc = run_bounded(&p);
            struct kvm_regs r;
            struct kvm_sregs s;
            ioctl(p.cpu, KVM_GET_REGS, &r);
            ioctl(p.cpu, KVM_GET_SREGS, &s);
            uint64_t frame_rip = r.rsp + 8 <= RAM ? *(uint64_t *)(p.mem + r.rsp) : 0;
            uint64_t frame_cs = r.rsp + 16 <= RAM ? *(uint64_t *)(p.mem + r.rsp + 8) : 0;
            if (rc != KVM_EXIT_IO || p.run->io.port != 0xef || s.cs.dpl != 0 || frame_rip != UCODE + 1 || frame_cs != 0x33) {
                snprintf(why, wn, "re-injecting the lost #BP did not give the native delivery (KVM_RUN %d, CPL %u, frame rip %#llx cs %#llx)",
                         rc, s.cs.dpl, (unsigned long long)frame_rip, (unsigned long long)frame_cs);
                goto out;
            }
        }
        /* Do the guest's own debug registers act at CPL 3? (A two-VM switch must then carry DR0-3/DR7
         * into the user layout's VM.) DR0 = an execute breakpoint on the read of MARK: honoured, the
         * #DB reaches its stub (the IDT page is mapped again); ignored, the read exits as MMIO. */
        {
            static const uint8_t nop[] = {0x90};
            user_code(&p, nop, 1, 0);
            struct kvm_debugregs d;
            memset(&d, 0, sizeof d);
            int rc = -1;
            if (user_state(&p, 0) == 0 && ioctl(p.cpu, KVM_GET_DEBUGREGS, &d) == 0) {
                d.db[0] = UCODE + 1;
                d.dr7 = 0x401; /* L0, execute, length 1 */
                if (ioctl(p.cpu, KVM_SET_DEBUGREGS, &d) == 0) rc = run_bounded(&p);
            }
            out->cpl3_debugregs = !(rc == KVM_EXIT_MMIO && p.run->mmio.phys_addr == MARK);
        }
        ok = 1;
        out->usable = 1;
        snprintf(why, wn, "every entry path from CPL 3 stops before CPL 0 (%s)",
                 mech == 1 ? "KVM_EXIT_SHUTDOWN, event re-injected" : "KVM_INTERNAL_ERROR_DELIVERY_EV, event kept by KVM");
    }
out:
    if (p.run) munmap(p.run, p.runsz);
    if (p.cpu >= 0) close(p.cpu);
    if (p.vm >= 0) close(p.vm);
    if (p.mem && p.mem != MAP_FAILED) munmap(p.mem, RAM);
    if (p.kvm >= 0) close(p.kvm);
    return ok;
}
