/*
 * rawbench.c - the raw KVM loops `nptkit-cli bench --only kvm` measures the library against.
 *
 * Each function sets up its own VM(s) on /dev/kvm with plain ioctls (no plugin code), runs the same
 * guest code the benchmark runs through npt_vcpu_run (Sources/NPTScenarios/Guests/x86-64/smp.S), and
 * returns per-iteration wall times. The CLI links this target (it is not part of any backend), so
 * each ratio the benchmark prints is taken between the library and this code in the same process
 * and run:
 *  - rawkvm_exit_loop: a CPL 0 `out; jmp` loop, a store to a KVM_MEM_READONLY page (an MMIO exit),
 *    or the `out; jmp` loop at CPL 3 (the port allowed by the TSS's I/O permission bitmap: an exit
 *    that leaves native user mode, as both exits of a hierarchy switch do on this KVM), one sample
 *    per KVM_RUN;
 *  - rawkvm_syscalls: the guest kernel's user process making INT3 system calls (Guest/smp.S), on
 *    `threads` vCPUs at once, one sample per call (the time between two OUTs of vCPU 0): in one VM
 *    with everything mapped (one exit per call), or in two VMs sharing the guest memory, one per
 *    hierarchy (the user VM without the IDT/GDT page and the kernel code pages, the kernel VM without
 *    the user code page), the vCPU moved between them as the plugin does: three exits per call (the
 *    INT3's delivery stops with KVM_EXIT_SHUTDOWN in the user VM; the first user fetch after the
 *    IRETQ fails in the kernel VM; the OUT), its registers, system registers and events copied in
 *    kvm_run (SYNC_REGS), the lost #BP re-injected there, and with `carry` also what the plugin
 *    carries and checks on this KVM: XSAVE (read from the source, written where it differs), XCR0
 *    (read from the kernel VM on a move into the user VM while CR4.OSXSAVE is set: the plugin's rule;
 *    the smp guest leaves it clear), the kernel VM's dirty log of the page-table memslot.
 * Return: the number of samples, or -errno.
 */
#define _GNU_SOURCE
#include "rawkvm.h"
#include "../NPTScenarios/Guests/x86-64/smp_guest.h"
#include <linux/kvm.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define RB_RAM (2u << 20)
#define CR4_OSXSAVE (UINT64_C(1) << 18)
#define RB_WARM 50

static uint64_t rb_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

struct rb_world {
    int kvm;
    uint8_t *mem;
    struct kvm_cpuid2 *cpuid;
    int xsave_size;
    int u, s;           /* VM fds (u < 0: one VM) */
    uint32_t s_pt_slot; /* the kernel VM's memslot holding the page tables */
};

struct rb_cpu {
    int fd;
    struct kvm_run *run;
    size_t runsz;
    uint8_t *xsave; /* what KVM holds (valid when known) */
    int xsave_known;
    struct kvm_xcrs xcrs;
    int xcrs_known;
};

static int rb_slot(int vm, uint32_t slot, uint64_t gpa, uint64_t size, void *host, uint32_t flags) {
    struct kvm_userspace_memory_region r = {.slot = slot, .flags = flags, .guest_phys_addr = gpa, .memory_size = size,
                                            .userspace_addr = (uint64_t)(uintptr_t)host};
    return ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r);
}

/* A VM on the world's memory with the pages `except` (sorted) left out; `readonly` one page mapped
 * KVM_MEM_READONLY (0: none). */
static int rb_vm(struct rb_world *w, const uint64_t *except, int n, uint64_t readonly, uint32_t flags, uint32_t *pt_slot) {
    int vm = ioctl(w->kvm, KVM_CREATE_VM, 0);
    if (vm < 0) return -errno;
    uint64_t start = 0;
    uint32_t slot = 0;
    for (int i = 0; i <= n; i++) {
        uint64_t end = i < n ? except[i] : RB_RAM;
        if (end > start) {
            if (pt_slot && start <= 0x1000 && 0x1000 < end) *pt_slot = slot;
            if (rb_slot(vm, slot++, start, end - start, w->mem + start, flags) < 0) { int e = errno; close(vm); return -e; }
        }
        if (i < n) start = except[i] + 0x1000;
    }
    if (readonly && rb_slot(vm, slot++, readonly, 0x1000, w->mem + readonly, KVM_MEM_READONLY) < 0) {
        int e = errno;
        close(vm);
        return -e;
    }
    return vm;
}

static int rb_world_init(struct rb_world *w) {
    memset(w, 0, sizeof *w);
    w->u = w->s = -1;
    w->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (w->kvm < 0) return -errno;
    w->mem = mmap(NULL, RB_RAM, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (w->mem == MAP_FAILED) { w->mem = NULL; return -errno; }
    memcpy(w->mem + SMP_GUEST_BASE, smp_guest, sizeof smp_guest);
    w->cpuid = calloc(1, sizeof *w->cpuid + 256 * sizeof(struct kvm_cpuid_entry2));
    if (!w->cpuid) return -ENOMEM;
    w->cpuid->nent = 256;
    if (ioctl(w->kvm, KVM_GET_SUPPORTED_CPUID, w->cpuid) < 0) return -errno;
    for (uint32_t i = 0; i < w->cpuid->nent; i++) /* as the plugin: KVM's paravirtual features hidden */
        if (w->cpuid->entries[i].function == 0x40000001) w->cpuid->entries[i].eax = 0;
    w->xsave_size = ioctl(w->kvm, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE2);
    if (w->xsave_size < 4096) w->xsave_size = 4096;
    return 0;
}

static void rb_world_free(struct rb_world *w) {
    if (w->u >= 0) close(w->u);
    if (w->s >= 0) close(w->s);
    if (w->mem) munmap(w->mem, RB_RAM);
    free(w->cpuid);
    if (w->kvm >= 0) close(w->kvm);
}

static int rb_cpu(struct rb_world *w, int vm, int id, struct rb_cpu *c) {
    memset(c, 0, sizeof *c);
    c->fd = ioctl(vm, KVM_CREATE_VCPU, id);
    if (c->fd < 0) return -errno;
    int sz = ioctl(w->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (sz <= 0) return -errno;
    c->runsz = (size_t)sz;
    c->run = mmap(NULL, c->runsz, PROT_READ | PROT_WRITE, MAP_SHARED, c->fd, 0);
    if (c->run == MAP_FAILED) { c->run = NULL; return -errno; }
    if (ioctl(c->fd, KVM_SET_CPUID2, w->cpuid) < 0) return -errno;
    c->run->kvm_valid_regs = (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS);
    c->xsave = calloc(1, (size_t)w->xsave_size);
    return c->xsave ? 0 : -ENOMEM;
}

static void rb_cpu_free(struct rb_cpu *c) {
    if (c->run) munmap(c->run, c->runsz);
    if (c->fd > 0) close(c->fd);
    free(c->xsave);
}

/* 64-bit mode at CPL 0 (what the plugin's set_regs gives), rip, rdi, r14. */
static int rb_longmode(struct rb_cpu *c, uint64_t rip, uint64_t rdi, uint64_t r14) {
    struct kvm_sregs s;
    if (ioctl(c->fd, KVM_GET_SREGS, &s) < 0) return -errno;
    struct kvm_segment cs = {.selector = 0x10, .limit = 0xffffffff, .present = 1, .s = 1, .g = 1, .type = 0xb, .l = 1};
    struct kvm_segment ds = {.selector = 0x18, .limit = 0xffffffff, .present = 1, .s = 1, .g = 1, .type = 3, .db = 1};
    s.cs = cs;
    s.ds = s.es = s.fs = s.gs = s.ss = ds;
    s.cr0 = 0x80010033; s.cr3 = SMP_GUEST_CR3; s.cr4 = 0x20; s.efer = 0x500;
    if (ioctl(c->fd, KVM_SET_SREGS, &s) < 0) return -errno;
    struct kvm_regs r;
    memset(&r, 0, sizeof r);
    r.rip = rip; r.rflags = 2; r.rsp = 0x8000; r.rdi = rdi; r.r14 = r14;
    if (ioctl(c->fd, KVM_SET_REGS, &r) < 0) return -errno;
    return 0;
}

int rawkvm_exit_loop(int n, int kind, uint64_t *samples) {
    if (kind < RAWKVM_EXIT_OUT || kind > RAWKVM_EXIT_USER_OUT) return -EINVAL;
    int mmio = kind == RAWKVM_EXIT_MMIO;
    struct rb_world w;
    struct rb_cpu c;
    memset(&c, 0, sizeof c);
    int rc = rb_world_init(&w);
    if (rc == 0) {
        static const uint64_t ro[] = {0xD000};
        w.s = rb_vm(&w, ro, mmio ? 1 : 0, mmio ? 0xD000 : 0, 0, NULL);
        rc = w.s < 0 ? w.s : rb_cpu(&w, w.s, 0, &c);
    }
    /* the user loop: entered at CPL 0 (UOUTENTRY loads the system tables and its TSS), its first
     * OUT among the warm-up exits */
    uint64_t entry = kind == RAWKVM_EXIT_MMIO ? SMP_GUEST_MMIOLOOP : kind == RAWKVM_EXIT_USER_OUT ? SMP_GUEST_UOUTENTRY : SMP_GUEST_OUTLOOP;
    if (rc == 0) rc = rb_longmode(&c, entry, 0, 0);
    for (int i = -RB_WARM; rc == 0 && i < n; i++) {
        uint64_t t0 = rb_now();
        if (ioctl(c.fd, KVM_RUN, 0) < 0) { rc = -errno; break; }
        uint64_t t1 = rb_now();
        int ok = mmio ? c.run->exit_reason == KVM_EXIT_MMIO && c.run->mmio.is_write
                      : c.run->exit_reason == KVM_EXIT_IO && c.run->io.port == 0xE9
                        && (kind != RAWKVM_EXIT_USER_OUT || c.run->s.regs.sregs.cs.dpl == 3);
        if (!ok) { rc = -EPROTO; break; }
        if (i >= 0) samples[i] = t1 - t0;
    }
    rb_cpu_free(&c);
    rb_world_free(&w);
    return rc < 0 ? rc : n;
}

struct rb_worker {
    struct rb_world *w;
    int id, calls, carry;
    uint64_t *samples; /* per call, may be NULL */
    int result;
    uint64_t done_at;
};

/* The state a move carries (see the header): sync regs always; with `carry`, the dirty log, XSAVE and
 * (with CR4.OSXSAVE) XCR0, as the plugin carries them (Plugins/KVM/Sources/Views.swift, `carry`). */
static int rb_move(struct rb_world *w, struct rb_cpu *src, struct rb_cpu *dst, int to_user, int carry) {
    if (carry) {
        if (to_user) { /* the kernel VM's page-table memslot: written? (the plugin reads it on a move into the user view) */
            uint64_t bm[8];
            struct kvm_dirty_log d = {.slot = w->s_pt_slot, .dirty_bitmap = bm};
            if (ioctl(w->s, KVM_GET_DIRTY_LOG, &d) < 0) return -errno;
        }
        uint8_t *img = alloca((size_t)w->xsave_size);
        if (ioctl(src->fd, KVM_GET_XSAVE2, img) < 0) return -errno;
        if (!dst->xsave_known || memcmp(img, dst->xsave, (size_t)w->xsave_size) != 0) {
            memcpy(dst->xsave, img, (size_t)w->xsave_size);
            if (ioctl(dst->fd, KVM_SET_XSAVE, dst->xsave) < 0) return -errno;
            dst->xsave_known = 1;
        }
        if (to_user && (src->run->s.regs.sregs.cr4 & CR4_OSXSAVE)) { /* XCR0 is seen at CPL 3 only with OSXSAVE */
            struct kvm_xcrs x;
            if (ioctl(src->fd, KVM_GET_XCRS, &x) < 0) return -errno;
            if (!dst->xcrs_known || memcmp(&x, &dst->xcrs, sizeof x) != 0) {
                if (ioctl(dst->fd, KVM_SET_XCRS, &x) < 0) return -errno;
                dst->xcrs = x;
                dst->xcrs_known = 1;
            }
        }
    }
    dst->run->s.regs = src->run->s.regs;
    dst->run->kvm_dirty_regs = (KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS);
    return 0;
}

static void *rb_worker_run(void *arg) {
    struct rb_worker *k = arg;
    struct rb_world *w = k->w;
    struct rb_cpu cu, cs;
    memset(&cu, 0, sizeof cu);
    memset(&cs, 0, sizeof cs);
    int rc = rb_cpu(w, w->s, k->id, &cs);
    if (rc == 0 && w->u >= 0) rc = rb_cpu(w, w->u, k->id, &cu);
    if (rc == 0) rc = rb_longmode(&cs, SMP_GUEST_CODE, (uint64_t)k->id, UINT64_C(1) << 40);
    struct rb_cpu *cur = &cs;
    int calls = -RB_WARM;
    uint64_t last = 0;
    while (rc == 0 && calls < k->calls) {
        if (ioctl(cur->fd, KVM_RUN, 0) < 0) { rc = -errno; break; }
        struct kvm_run *r = cur->run;
        if (r->exit_reason == KVM_EXIT_IO && r->io.port == 0xE9) {
            uint64_t now = rb_now();
            if (calls >= 0 && k->samples) k->samples[calls] = now - last;
            last = now;
            calls++;
            continue;
        }
        if (w->u < 0) { rc = -EPROTO; break; }
        if (cur == &cs && r->exit_reason == KVM_EXIT_INTERNAL_ERROR && r->s.regs.sregs.cs.dpl == 3) {
            /* the user's first fetch in the kernel VM: into the user VM, the events' sentinel set */
            rc = rb_move(w, &cs, &cu, 1, k->carry);
            struct kvm_vcpu_events *e = &cu.run->s.regs.events;
            if (!e->exception.injected && !e->exception.pending) e->exception.nr = 0xff;
            cur = &cu;
        } else if (cur == &cu && r->exit_reason == KVM_EXIT_SHUTDOWN && r->s.regs.events.exception.nr != 0xff) {
            /* the INT3 could not read its gate: into the kernel VM, the #BP re-injected */
            uint8_t nr = r->s.regs.events.exception.nr;
            rc = rb_move(w, &cu, &cs, 0, k->carry);
            struct kvm_vcpu_events *e = &cs.run->s.regs.events;
            e->exception.injected = 1;
            e->exception.pending = 0;
            e->exception.nr = nr;
            e->exception.has_error_code = 0;
            cur = &cs;
        } else {
            rc = -EPROTO;
        }
    }
    k->done_at = rb_now();
    k->result = rc < 0 ? rc : k->calls;
    rb_cpu_free(&cu);
    rb_cpu_free(&cs);
    return NULL;
}

int rawkvm_syscalls(int threads, int calls, int twovm, int carry, uint64_t *samples, uint64_t *wall_ns) {
    if (threads < 1 || threads > 2) return -EINVAL;
    struct rb_world w;
    int rc = rb_world_init(&w);
    if (rc == 0) {
        if (twovm) {
            static const uint64_t user_out[] = {SMP_GUEST_SYSTEM, SMP_GUEST_CODE, SMP_GUEST_KFUNC};
            static const uint64_t kernel_out[] = {SMP_GUEST_USER};
            w.u = rb_vm(&w, user_out, 3, 0, 0, NULL);
            w.s = rb_vm(&w, kernel_out, 1, 0, KVM_MEM_LOG_DIRTY_PAGES, &w.s_pt_slot);
            if (w.u < 0) rc = w.u;
            else if (w.s < 0) rc = w.s;
        } else {
            w.s = rb_vm(&w, NULL, 0, 0, 0, NULL);
            if (w.s < 0) rc = w.s;
        }
    }
    struct rb_worker k[2];
    pthread_t t[2];
    int started = 0;
    uint64_t t0 = rb_now();
    for (int i = 0; rc == 0 && i < threads; i++) {
        k[i] = (struct rb_worker){.w = &w, .id = i, .calls = calls, .carry = carry, .samples = i == 0 ? samples : NULL};
        if (pthread_create(&t[i], NULL, rb_worker_run, &k[i]) != 0) rc = -EAGAIN;
        else started++;
    }
    uint64_t end = t0;
    for (int i = 0; i < started; i++) {
        pthread_join(t[i], NULL);
        if (k[i].result < 0 && rc == 0) rc = k[i].result;
        if (k[i].done_at > end) end = k[i].done_at;
    }
    if (wall_ns) *wall_ns = end - t0;
    rb_world_free(&w);
    return rc < 0 ? rc : calls;
}
