/* minivmm.c - a QEMU-style VMM on NPTKit: its own vCPU loop (npt_vcpu_run_raw + npt_handle_exit),
 * one thread per vCPU, guests under an MBEC policy, NVDIMM writes made durable through the virtual
 * flush hint (the core traps and propagates each flush), privileged-mode requests served by a handler
 * in the special region, and a report of what happened, which it checks.
 *
 * Build (installed library):  cc -std=c11 minivmm.c $(pkg-config --cflags --libs nptkit) -pthread -o minivmm
 * Run:                        ./minivmm [VCPUS] [--backend auto|kvm|sim] [--plugin NAME]
 *
 * It loads the KVM plugin (NAME, default "libnptkit-kvm.so": a bare name the library looks up in its
 * plugin directory). With --backend auto (the default) it runs x86-64 guests on KVM when the plugin
 * loaded and a VM on it can be made whose guest ISA (npt_vm_guest_isa) is x86-64 (/dev/kvm usable),
 * else the simulator's guest; --backend kvm insists on KVM (exit 1 without it), --backend sim skips it.
 *
 *  - KVM: the scenarios' committed x86-64 guest images, included below by their path in the NPTKit
 *    source tree (the only thing minivmm takes from outside the installed prefix; a VMM would load
 *    its own firmware and kernels instead). VM 1 (MBEC lazy, 2 MiB): vCPU 0 runs hvci.S, a kernel and
 *    a user process under the HVCI-like policy (kernel code and driver R|Xs, user code R|Xu, JIT page
 *    R|W|Xu); its two attacks (user runs the driver page, kernel runs the JIT page) are reported as
 *    MBEC violations, each injected as #VE, which the guest kernel reports; vCPU 1 runs pmem.S, which
 *    stores records into an NVDIMM backed by the plugin's file and flushes each through the vFHA (an
 *    exit, an msync). VM 2 (MBEC lazy, 640 KiB): priv.S on every vCPU (real mode: a heartbeat loop
 *    that probes the region), privileged-mode requests from the main thread served by the region's
 *    handler at 0xA0000 (legacy SMRAM), which checks that no other vCPU ran while it did.
 *  - sim: one VM, a guest in the simulator's ISA (docs/guest-isa.md) on every vCPU that writes an
 *    NVDIMM and flushes it through the vFHA under an MBEC policy, and privileged-mode requests served
 *    by a handler in the region.
 * Exit status 0 only if everything the guests were to do happened, and nothing else did. */
#define _POSIX_C_SOURCE 200809L /* alarm, nanosleep */
#include <nptkit.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../../Sources/NPTScenarios/Guests/include/scenario_protocol.h"
#include "../../Sources/NPTScenarios/Guests/x86-64/hvci_guest.h"
#include "../../Sources/NPTScenarios/Guests/x86-64/pmem_guest.h"
#include "../../Sources/NPTScenarios/Guests/x86-64/priv_guest.h"

#define MAXVCPU 16
#define NVDIMM_GPA 0x40000000ull
#define VECTOR_VE 20u /* x86's virtualization exception: what the VMM injects after a reported violation */

/* ------------------------------------------------------------------------ */
/* The vCPU threads: one loop for every guest                               */

enum guest { GUEST_SIM, GUEST_HVCI, GUEST_PMEM, GUEST_PRIV };

typedef struct {
    npt_vcpu *cpu;
    uint32_t index;
    enum guest guest;
    unsigned exits, resumed, unexpected;
    int halted;
    /* GUEST_SIM */
    int rounds_done;
    unsigned privileged_runs;
    /* GUEST_HVCI */
    unsigned printed, print_errors, violations, faults, pwned;
    uint64_t violation_gpa[2], fault_vector[2], fault_rip[2];
    /* GUEST_PMEM */
    unsigned durable;
    /* GUEST_PRIV */
    unsigned heartbeats, leaks, moved, entries, wrong_index;
} vcpu_thread;

static atomic_int stop;
static atomic_uint served; /* privileged-mode handler runs seen (every guest reports one per entry) */

static void unexpected(vcpu_thread *t, const char *what, const npt_exit *e) {
    t->unexpected++;
    fprintf(stderr, "vcpu %u: %s (exit %u, port %#x value %#llx, gpa %#llx, rip %#llx)\n", t->index, what, e->reason,
            e->io_port, (unsigned long long)e->io_value, (unsigned long long)e->gpa, (unsigned long long)e->rip);
}

#define PORT_DONE 1 /* the simulator guest's ports */
#define PORT_PRIV 9

/* An OUT of the guest (NPT_ACTION_TOOL: ours to handle, as QEMU's loop handles KVM_EXIT_IO). */
static void on_io(vcpu_thread *t, const npt_exit *e) {
    uint32_t v = (uint32_t)e->io_value;
    switch (t->guest) {
    case GUEST_SIM:
        if (e->io_port == PORT_DONE) t->rounds_done = (int)e->io_value;
        else if (e->io_port == PORT_PRIV) { t->privileged_runs++; atomic_fetch_add(&served, 1); }
        else unexpected(t, "OUT on an unknown port", e);
        return;
    case GUEST_HVCI:
        if (e->io_port == HVCI_PORT_PRINT) { t->printed++; if (v != t->printed) t->print_errors++; }
        else if (e->io_port == HVCI_PORT_FAULT_VECTOR) { if (t->faults < 2) t->fault_vector[t->faults] = v; }
        else if (e->io_port == HVCI_PORT_FAULT_RIP) { if (t->faults < 2) t->fault_rip[t->faults] = v; t->faults++; }
        else if (e->io_port == HVCI_PORT_PWNED) t->pwned++;
        else unexpected(t, "OUT on an unknown port", e);
        return;
    case GUEST_PMEM:
        if (e->io_port == NVDIMM_PORT_DURABLE && (v & 0xFF) == (t->durable & 0xFF)) t->durable++;
        else unexpected(t, "OUT out of order or on an unknown port", e);
        return;
    case GUEST_PRIV:
        switch (e->io_port) {
        case PRIV_PORT_HEARTBEAT: t->heartbeats++; if ((v & 0xFF) != 0xFF) t->leaks++; return; /* the probe's low byte */
        case PRIV_PORT_LEAK: t->leaks++; return;
        case PRIV_PORT_ENTERED: t->entries++; if (v != t->index) t->wrong_index++; return;
        case PRIV_PORT_MOVED: if (v != 0) t->moved++; return;
        case PRIV_PORT_COUNT: atomic_fetch_add(&served, 1); return;
        default: unexpected(t, "OUT on an unknown port", e); return;
        }
    }
}

static void *vcpu_loop(void *arg) {
    vcpu_thread *t = arg;
    npt_exit e;
    memset(&e, 0, sizeof e);
    e.size = sizeof e;
    while (!atomic_load(&stop)) {
        if (npt_vcpu_run_raw(t->cpu, &e) != NPT_OK) { unexpected(t, npt_last_error(), &e); break; }
        t->exits++;
        uint32_t action = 0;
        if (npt_handle_exit(t->cpu, &e, &action) != NPT_OK) { unexpected(t, npt_last_error(), &e); break; }
        if (action == NPT_ACTION_RESUME) { t->resumed++; continue; }
        if (action == NPT_ACTION_REPORT_VIOLATION) {
            /* The HVCI guest's attacks: report the violation to the guest as #VE, as a VMM would. */
            if (t->guest != GUEST_HVCI || t->violations >= 2) { unexpected(t, "MBEC violation", &e); break; }
            t->violation_gpa[t->violations++] = e.gpa;
            if (npt_vcpu_inject_fault(t->cpu, VECTOR_VE, e.qualification, e.gva) != NPT_OK) { unexpected(t, npt_last_error(), &e); break; }
            continue;
        }
        if (e.reason == NPT_EXIT_IO) on_io(t, &e);
        else if (e.reason == NPT_EXIT_HALT && (t->guest == GUEST_HVCI || t->guest == GUEST_PMEM)) { t->halted = 1; break; }
        else if (e.reason != NPT_EXIT_BUDGET && e.reason != NPT_EXIT_KICKED) { unexpected(t, "exit", &e); break; }
        if (t->unexpected) break;
    }
    return NULL;
}

#define TRY(call) do { npt_status s_ = (call); if (s_ != NPT_OK) { fprintf(stderr, "minivmm: %s: %s\n", #call, npt_last_error()); return 0; } } while (0)

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000};
    nanosleep(&ts, NULL);
}

static npt_vcpu *new_vcpu(npt_vm *vm, vcpu_thread *t, uint32_t index, enum guest g, const npt_regs *r) {
    memset(t, 0, sizeof *t);
    t->index = index;
    t->guest = g;
    if (npt_vcpu_create(vm, index, &t->cpu) != NPT_OK || npt_vcpu_set_regs(t->cpu, r) != NPT_OK) {
        fprintf(stderr, "minivmm: vCPU %u: %s\n", index, npt_last_error());
        return NULL;
    }
    return t->cpu;
}

/* Serves `requests` privileged-mode requests, rotating over the vCPUs, one at a time (each waits for
 * the handler's report, at most 5 s). */
static int raise_requests(vcpu_thread *th, unsigned n, unsigned requests) {
    for (unsigned k = 0; k < requests; k++) {
        TRY(npt_vcpu_raise_privileged(th[k % n].cpu));
        for (int spins = 0; spins < 5000 && atomic_load(&served) < k + 1; spins++) sleep_ms(1);
        if (atomic_load(&served) < k + 1) { fprintf(stderr, "minivmm: request %u not served in 5 s\n", k + 1); return 0; }
    }
    return 1;
}

static int check_privileged(npt_vm *vm, unsigned requests, npt_privileged_stats *ps) {
    memset(ps, 0, sizeof *ps);
    ps->size = sizeof *ps;
    TRY(npt_vm_get_privileged_stats(vm, ps));
    int64_t holder = 0;
    TRY(npt_vm_privileged_holder(vm, &holder));
    return ps->requests == requests && ps->entries == requests && ps->failures == 0 && holder == -1 &&
           atomic_load(&served) == requests;
}

/* An NVDIMM of `length` bytes at NVDIMM_GPA backed by the VM's first host region; its flush hint. */
static int add_nvdimm(npt_vm *vm, uint64_t length, npt_host_pmem_region *hr, npt_flush_hint_info *fh) {
    memset(hr, 0, sizeof *hr);
    hr->size = sizeof *hr;
    TRY(npt_vm_host_pmem_get(vm, 0, hr));
    npt_nvdimm nd = {sizeof nd, hr->id, NVDIMM_GPA, length, 0};
    TRY(npt_vm_add_nvdimm(vm, &nd));
    memset(fh, 0, sizeof *fh);
    fh->size = sizeof *fh;
    TRY(npt_vm_get_flush_hint(vm, fh));
    return 1;
}

/* Registers at `rip`, everything else 0 (rflags' reserved bit 1 set): paging off. */
static npt_regs start_regs(uint64_t rip) {
    npt_regs r;
    memset(&r, 0, sizeof r);
    r.size = sizeof r;
    r.rip = rip;
    r.rflags = 2;
    return r;
}

static npt_regs long_mode(uint64_t rip, uint64_t cr3, uint64_t rsp) {
    npt_regs r = start_regs(rip);
    r.gpr[4] = rsp;
    r.cr0 = 0x80010033; /* PG|WP|NE|ET|MP|PE */
    r.cr3 = cr3;
    r.cr4 = 0x20;       /* PAE (no SMEP: the HVCI guest's user pages are MBEC's to guard) */
    r.efer = 0x500;     /* LME|LMA */
    return r;
}

/* ------------------------------------------------------------------------ */
/* KVM: x86-64 guests                                                        */

#define HVCI_CALLS 4
#define PMEM_RECORDS 16
#define PRIV_MAXVCPU 4 /* priv.S's handler sums the heartbeats of 4 vCPUs (0x2000..0x200F) */

/* VM 1: the HVCI guest (MBEC) on vCPU 0, the NVDIMM guest on vCPU 1. `vm` is made by the caller. */
static int run_kvm_mbec_nvdimm(npt_vm *vm) {
    TRY(npt_vm_write_memory(vm, HVCI_GUEST_BASE, hvci_guest, sizeof hvci_guest));
    /* hvci.S's policy (HVCIScenario's HVCIX86 image): what each page may run, and in which mode */
    struct { uint64_t gpa, perms; } policy[] = {
        {HVCI_GUEST_CODE, NPT_PERM_READ | NPT_PERM_SX},   {HVCI_GUEST_DRIVER, NPT_PERM_READ | NPT_PERM_SX},
        {HVCI_GUEST_USER, NPT_PERM_READ | NPT_PERM_UX},   {HVCI_GUEST_USTACK, NPT_PERM_READ | NPT_PERM_WRITE},
        {HVCI_GUEST_JIT, NPT_PERM_READ | NPT_PERM_WRITE | NPT_PERM_UX}};
    for (size_t i = 0; i < sizeof policy / sizeof policy[0]; i++)
        TRY(npt_policy_set(vm, policy[i].gpa, 0x1000, NPT_PAGE_4K, policy[i].perms));

    npt_host_pmem_region hr;
    npt_flush_hint_info fh;
    if (!add_nvdimm(vm, 2u << 20, &hr, &fh)) return 0;
    TRY(npt_vm_write_memory(vm, PMEM_GUEST_BASE, pmem_guest, sizeof pmem_guest));
    printf("nvdimm: host region %u (needs WPQ flushing: %s), vFHA %#llx, %s\n", hr.id, hr.needs_wpq_flush ? "yes" : "no",
           (unsigned long long)fh.vfha, fh.trapped ? "trapped" : "not trapped");

    vcpu_thread th[2];
    npt_regs r = long_mode(HVCI_GUEST_CODE, HVCI_GUEST_CR3, HVCI_GUEST_KSTACK_TOP);
    r.gpr[HVCI_REG_CALLS] = HVCI_CALLS;
    r.gpr[HVCI_REG_ATTACKS] = 1;
    if (!new_vcpu(vm, &th[0], 0, GUEST_HVCI, &r)) return 0;
    r = long_mode(PMEM_GUEST_CLFLUSHOPT_ENTRY, PMEM_GUEST_CR3, 0x20000); /* CLFLUSHOPT: KVM emulates it */
    r.gpr[NVDIMM_REG_AREA] = NVDIMM_GPA;
    r.gpr[NVDIMM_REG_VFHA] = fh.vfha;
    r.gpr[NVDIMM_REG_COUNT] = PMEM_RECORDS;
    if (!new_vcpu(vm, &th[1], 1, GUEST_PMEM, &r)) return 0;
    pthread_t tid[2];
    for (int i = 0; i < 2; i++) pthread_create(&tid[i], NULL, vcpu_loop, &th[i]);
    for (int i = 0; i < 2; i++) pthread_join(tid[i], NULL); /* both guests end with HLT */

    npt_flush_stats fs;
    memset(&fs, 0, sizeof fs);
    fs.size = sizeof fs;
    TRY(npt_vm_get_flush_stats(vm, &fs));
    uint64_t rec[PMEM_RECORDS * 8];
    TRY(npt_vm_read_memory(vm, NVDIMM_GPA, rec, sizeof rec));
    unsigned good = 0;
    for (unsigned i = 0; i < PMEM_RECORDS; i++) good += rec[8 * i] == PMEM_GUEST_MAGIC && rec[8 * i + 1] == i;
    vcpu_thread *h = &th[0], *p = &th[1];
    for (int i = 0; i < 2; i++)
        printf("vcpu %u (%s): %u exits (%u resumed by the core), %s\n", th[i].index, i ? "pmem.S" : "hvci.S", th[i].exits,
               th[i].resumed, th[i].halted ? "halted" : "did not halt");
    printf("mbec: %u write calls printed; %u violations reported (gpa %#llx, %#llx), each injected as #VE; the guest kernel saw "
           "vector %llu at %#llx, vector %llu at %#llx; attacks that ran guest code: %u\n",
           h->printed, h->violations, (unsigned long long)h->violation_gpa[0], (unsigned long long)h->violation_gpa[1],
           (unsigned long long)h->fault_vector[0], (unsigned long long)h->fault_rip[0], (unsigned long long)h->fault_vector[1],
           (unsigned long long)h->fault_rip[1], h->pwned);
    printf("nvdimm: %u records made durable: %llu guest flushes, %llu flush exits, %llu physical flushes; %u of %u records read back\n",
           p->durable, (unsigned long long)fs.guest_flushes, (unsigned long long)fs.exits,
           (unsigned long long)fs.physical_flushes, good, PMEM_RECORDS);
    for (int i = 0; i < 2; i++) TRY(npt_vcpu_destroy(th[i].cpu));
    /* Attack 1: user mode runs the driver page (gpa = its address); attack 2: the kernel runs the JIT
     * page through its alias (the violation names the JIT frame; the guest's fault, the alias). */
    int mbec_ok = h->halted && !h->unexpected && h->printed == HVCI_CALLS && !h->print_errors && h->violations == 2 &&
                  h->violation_gpa[0] == HVCI_GUEST_DRIVER && h->violation_gpa[1] == HVCI_GUEST_JIT && h->faults == 2 &&
                  h->fault_vector[0] == VECTOR_VE && h->fault_rip[0] == HVCI_GUEST_DRIVER && h->fault_vector[1] == VECTOR_VE &&
                  h->fault_rip[1] == HVCI_GUEST_JIT_ALIAS && h->pwned == 0;
    uint64_t want = hr.needs_wpq_flush ? PMEM_RECORDS : 0;
    int nvdimm_ok = p->halted && !p->unexpected && p->durable == PMEM_RECORDS && good == PMEM_RECORDS && fh.trapped &&
                    fs.guest_flushes == want && fs.exits == want && fs.physical_flushes == want && hr.needs_wpq_flush;
    if (!mbec_ok) fprintf(stderr, "minivmm: the HVCI guest did not do what it should\n");
    if (!nvdimm_ok) fprintf(stderr, "minivmm: the NVDIMM guest's flushes are not what they should be\n");
    return mbec_ok && nvdimm_ok;
}

/* VM 2: priv.S on every vCPU, privileged-mode requests served by the region's handler. */
static int run_kvm_privileged(npt_context *ctx, unsigned nvcpus) {
    npt_vm_config cfg = {sizeof cfg, NPT_MBEC_LAZY, "kvm", PRIV_GUEST_REGION, NPT_PERM_READ | NPT_PERM_WRITE, 0, NULL};
    npt_vm *vm;
    TRY(npt_vm_create(ctx, &cfg, &vm));
    /* real mode (paging off): every address is a user-mode one, so the loop's page needs Xu */
    TRY(npt_policy_set(vm, PRIV_GUEST_BASE, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_WRITE | NPT_PERM_UX));
    TRY(npt_vm_write_memory(vm, PRIV_GUEST_BASE, priv_guest, sizeof priv_guest));
    npt_region region = {sizeof region, 0, PRIV_GUEST_REGION, sizeof priv_guest_region, priv_guest_region,
                         sizeof priv_guest_region, PRIV_GUEST_REGION_ENTRY, 0};
    TRY(npt_region_set(vm, &region));
    printf("vm 2: backend 'kvm', MBEC lazy, priv.S (real mode) on %u vCPUs, the region at %#x\n", nvcpus, PRIV_GUEST_REGION);

    vcpu_thread th[PRIV_MAXVCPU];
    pthread_t tid[PRIV_MAXVCPU];
    for (unsigned i = 0; i < nvcpus; i++) {
        npt_regs r = start_regs(PRIV_GUEST_BASE);
        r.gpr[PRIV_REG_HEARTBEAT] = PRIV_GUEST_HEARTBEATS + 4 * i;
        if (!new_vcpu(vm, &th[i], i, GUEST_PRIV, &r)) return 0;
    }
    atomic_store(&stop, 0);
    atomic_store(&served, 0);
    for (unsigned i = 0; i < nvcpus; i++) pthread_create(&tid[i], NULL, vcpu_loop, &th[i]);
    const unsigned requests = 3 * nvcpus;
    sleep_ms(20); /* the heartbeats move */
    int raised = raise_requests(th, nvcpus, requests);
    for (int spins = 0; spins < 5000; spins++) { /* every vCPU ran its loop (at most 5 s) */
        unsigned beating = 0;
        for (unsigned i = 0; i < nvcpus; i++) beating += th[i].heartbeats > 0;
        if (beating == nvcpus) break;
        sleep_ms(1);
    }
    atomic_store(&stop, 1);
    for (unsigned i = 0; i < nvcpus; i++) pthread_join(tid[i], NULL);

    npt_privileged_stats ps;
    int ok = raised && check_privileged(vm, requests, &ps);
    unsigned entries = 0, leaks = 0, moved = 0, wrong = 0;
    for (unsigned i = 0; i < nvcpus; i++) {
        printf("vcpu %u (priv.S): %u exits (%u resumed by the core), %u heartbeats, handler entered %u times\n", i, th[i].exits,
               th[i].resumed, th[i].heartbeats, th[i].entries);
        ok = ok && !th[i].unexpected && th[i].heartbeats > 0;
        entries += th[i].entries;
        leaks += th[i].leaks;
        moved += th[i].moved;
        wrong += th[i].wrong_index;
        TRY(npt_vcpu_destroy(th[i].cpu));
    }
    printf("privileged mode: %llu requests, %llu entries, %llu failures; the handler ran %u times, saw the heartbeats move "
           "%u times; the region leaked to a probe %u times\n",
           (unsigned long long)ps.requests, (unsigned long long)ps.entries, (unsigned long long)ps.failures, entries, moved, leaks);
    ok = ok && entries == requests && moved == 0 && leaks == 0 && wrong == 0;
    TRY(npt_vm_destroy(vm));
    if (!ok) fprintf(stderr, "minivmm: the privileged mode did not serve every request as it should\n");
    return ok;
}

/* ------------------------------------------------------------------------ */
/* The simulator: a guest in its ISA                                         */

#define SIM_RAM (16u << 20)
#define SIM_CODE 0x1000ull
#define SIM_REGION 0x80000000ull
#define ROUNDS 8

static void emit(uint8_t *p, size_t *off, uint8_t op, uint8_t a, uint8_t b, int32_t imm) {
    uint32_t u = (uint32_t)imm;
    uint8_t ins[8] = {op, a, b, 0, (uint8_t)u, (uint8_t)(u >> 8), (uint8_t)(u >> 16), (uint8_t)(u >> 24)};
    memcpy(p + *off, ins, 8);
    *off += 8;
}
/* ra = a 64-bit constant (MOVI takes a sign-extended 32-bit immediate, MOVHI the high half). */
static void load64(uint8_t *p, size_t *off, uint8_t a, uint64_t v) {
    emit(p, off, 0x01, a, 0, (int32_t)(uint32_t)v);
    emit(p, off, 0x02, a, 0, (int32_t)(uint32_t)(v >> 32));
}

static int run_sim(npt_context *ctx, unsigned nvcpus) {
    npt_vm_config cfg = {sizeof cfg, NPT_MBEC_EXACT, "sim", SIM_RAM, NPT_PERM_READ | NPT_PERM_WRITE, 5000, NULL};
    npt_vm *vm;
    TRY(npt_vm_create(ctx, &cfg, &vm));
    uint32_t isa = 0;
    TRY(npt_vm_guest_isa(vm, &isa));
    printf("vm: backend 'sim', guest ISA %s, MBEC exact, %u vCPUs\n", isa == NPT_GUEST_ISA_SIM ? "sim" : "?", nvcpus);

    /* NVDIMM: the first host region backs 1 MiB at NVDIMM_GPA; the core allocates the vFHA. */
    npt_host_pmem_region hr;
    npt_flush_hint_info fh;
    if (!add_nvdimm(vm, 1u << 20, &hr, &fh)) return 0;
    printf("nvdimm: host region %u, vFHA %#llx, %s, %u physical flush hint(s)\n", hr.id, (unsigned long long)fh.vfha,
           fh.trapped ? "trapped" : "not trapped", fh.target_count);

    /* Guest (paging off, CPL 0): ROUNDS times { store a record, CLWB, SFENCE, write the vFHA };
     * then OUT the round count on PORT_DONE and spin. r0 = the vCPU's index. */
    uint8_t code[512];
    size_t n = 0;
    load64(code, &n, 2, NVDIMM_GPA);
    load64(code, &n, 4, fh.vfha);
    emit(code, &n, 0x01, 5, 0, ROUNDS);  /* r5 = ROUNDS */
    emit(code, &n, 0x01, 3, 0, 0);       /* r3 = 0 */
    const size_t loop = n;
    emit(code, &n, 0x05, 3, 0, 1);       /* ADDI r3, 1 */
    emit(code, &n, 0x07, 2, 3, 0);       /* STORE [r2], r3 */
    emit(code, &n, 0x14, 2, 0, 0);       /* CLWB [r2] */
    emit(code, &n, 0x15, 0, 0, 0);       /* SFENCE */
    emit(code, &n, 0x07, 4, 3, 0);       /* STORE [vFHA], r3: the flush */
    emit(code, &n, 0x05, 5, 0, -1);      /* ADDI r5, -1 */
    emit(code, &n, 0x0B, 5, 0, (int32_t)(loop - (n + 8))); /* JNZ r5, loop */
    emit(code, &n, 0x0F, 3, 0, PORT_DONE);
    emit(code, &n, 0x08, 0, 0, -8);      /* spin */
    TRY(npt_vm_write_memory(vm, SIM_CODE, code, n));
    /* The MBEC policy: the code page executable (paging off: user-mode addresses, so Xu), data not. */
    TRY(npt_policy_set(vm, SIM_CODE, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_UX));

    /* The privileged mode's handler: report on PORT_PRIV, RSM. */
    uint8_t handler[16];
    size_t h = 0;
    emit(handler, &h, 0x0F, 0, 0, PORT_PRIV);
    emit(handler, &h, 0x13, 0, 0, 0);
    npt_region region = {sizeof region, 0, SIM_REGION, 0x1000, handler, h, 0, 0};
    TRY(npt_region_set(vm, &region));

    vcpu_thread th[MAXVCPU];
    pthread_t tid[MAXVCPU];
    for (unsigned i = 0; i < nvcpus; i++) {
        npt_regs r = start_regs(SIM_CODE);
        r.gpr[0] = i;
        if (!new_vcpu(vm, &th[i], i, GUEST_SIM, &r)) return 0;
    }
    atomic_store(&stop, 0);
    atomic_store(&served, 0);
    for (unsigned i = 0; i < nvcpus; i++) pthread_create(&tid[i], NULL, vcpu_loop, &th[i]);
    const unsigned requests = 3 * nvcpus;
    int raised = raise_requests(th, nvcpus, requests);
    for (int spins = 0; spins < 20000; spins++) {
        int all_done = 1;
        for (unsigned i = 0; i < nvcpus; i++) all_done = all_done && th[i].rounds_done == ROUNDS;
        if (all_done) break;
        sleep_ms(1);
    }
    atomic_store(&stop, 1);
    for (unsigned i = 0; i < nvcpus; i++) pthread_join(tid[i], NULL);

    npt_flush_stats fs;
    memset(&fs, 0, sizeof fs);
    fs.size = sizeof fs;
    TRY(npt_vm_get_flush_stats(vm, &fs));
    npt_privileged_stats ps;
    int ok = raised && check_privileged(vm, requests, &ps);
    unsigned privileged_runs = 0;
    for (unsigned i = 0; i < nvcpus; i++) {
        printf("vcpu %u: %u exits (%u resumed by the core), %d rounds, privileged handler ran %u times\n", i, th[i].exits,
               th[i].resumed, th[i].rounds_done, th[i].privileged_runs);
        ok = ok && !th[i].unexpected && th[i].rounds_done == ROUNDS;
        privileged_runs += th[i].privileged_runs;
        TRY(npt_vcpu_destroy(th[i].cpu));
    }
    printf("privileged mode: %llu requests, %llu entries, %llu failures\n", (unsigned long long)ps.requests,
           (unsigned long long)ps.entries, (unsigned long long)ps.failures);
    printf("nvdimm flushes: %llu guest flushes, %llu physical flushes, %llu coalesced\n",
           (unsigned long long)fs.guest_flushes, (unsigned long long)fs.physical_flushes, (unsigned long long)fs.coalesced);
    ok = ok && privileged_runs == requests && fs.guest_flushes == (uint64_t)ROUNDS * nvcpus;
    TRY(npt_vm_destroy(vm));
    return ok;
}

/* ------------------------------------------------------------------------ */

int main(int argc, char **argv) {
    unsigned nvcpus = 2;
    const char *backend = "auto", *plugin = "libnptkit-kvm.so";
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--backend") == 0 && i + 1 < argc) backend = argv[++i];
        else if (strcmp(argv[i], "--plugin") == 0 && i + 1 < argc) plugin = argv[++i];
        else if (argv[i][0] >= '0' && argv[i][0] <= '9') nvcpus = (unsigned)atoi(argv[i]);
        else nvcpus = 0;
    }
    if (nvcpus < 1 || nvcpus > MAXVCPU ||
        (strcmp(backend, "auto") != 0 && strcmp(backend, "kvm") != 0 && strcmp(backend, "sim") != 0)) {
        fprintf(stderr, "usage: %s [VCPUS 1-%d] [--backend auto|kvm|sim] [--plugin NAME]\n", argv[0], MAXVCPU);
        return 2;
    }
    alarm(120); /* a guest that never exits again cannot hang the test command */
    printf("minivmm: libnptkit ABI %u.%u (built against %u.%u)\n", npt_abi_version() >> 16, npt_abi_version() & 0xffff,
           NPT_ABI_VERSION_MAJOR, NPT_ABI_VERSION_MINOR);
    npt_context *ctx;
    if (npt_context_create(&ctx) != NPT_OK) { fprintf(stderr, "minivmm: %s\n", npt_last_error()); return 1; }
    /* The plugin's NVDIMM host region: a 4 MiB file (its default is 64 MiB). */
    npt_plugin_arg parg = {"pmem-size", "0x400000"};
    const char *kvm = NULL;
    if (npt_plugin_load_with(ctx, plugin, &parg, 1, &kvm) == NPT_OK)
        printf("plugin: loaded backend '%s' from %s\n", kvm, strchr(plugin, '/') ? plugin : "the plugin directory");
    else
        printf("plugin: not loaded (%s)\n", npt_last_error());

    /* KVM when the plugin loaded, a VM can be made on it and it runs x86-64 code. */
    npt_vm *vm = NULL;
    if (strcmp(backend, "sim") == 0) {
        printf("backend: the simulator (--backend sim)\n");
    } else if (!kvm) {
        printf("backend: the simulator (no KVM plugin)\n");
    } else {
        npt_vm_config cfg = {sizeof cfg, NPT_MBEC_LAZY, kvm, 2u << 20, NPT_PERM_ALL, 0, NULL};
        uint32_t isa = 0;
        if (npt_vm_create(ctx, &cfg, &vm) != NPT_OK) {
            printf("backend: the simulator (no VM on '%s': %s)\n", kvm, npt_last_error());
            vm = NULL;
        } else if (npt_vm_guest_isa(vm, &isa) != NPT_OK || isa != NPT_GUEST_ISA_X86_64) {
            printf("backend: the simulator ('%s' runs guest ISA %u, not x86-64)\n", kvm, isa);
            npt_vm_destroy(vm);
            vm = NULL;
        }
    }
    if (!vm && strcmp(backend, "kvm") == 0) {
        fprintf(stderr, "minivmm: --backend kvm: KVM is not usable here\n");
        return 1;
    }
    int ok;
    if (vm) {
        unsigned pv = nvcpus < PRIV_MAXVCPU ? nvcpus : PRIV_MAXVCPU;
        printf("vm: backend 'kvm', guest ISA x86-64, MBEC lazy; vm 1: hvci.S on vCPU 0, pmem.S on vCPU 1\n");
        ok = run_kvm_mbec_nvdimm(vm);
        if (npt_vm_destroy(vm) != NPT_OK) ok = 0;
        ok = run_kvm_privileged(ctx, pv) && ok;
    } else {
        ok = run_sim(ctx, nvcpus);
    }
    if (npt_context_destroy(ctx) != NPT_OK) ok = 0;
    printf("minivmm: %s\n", ok ? "ok" : "FAILED");
    return ok ? 0 : 1;
}
