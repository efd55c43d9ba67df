/*
 * test_backend_swap.c - one scenario description, two backends (issue 5).
 *
 * Usage: test_backend_swap KVM_SO
 *
 * The scenarios of the earlier issues (a kernel with a user process making system calls under an
 * MBEC policy, with two probes; durable records in an NVDIMM range; a power cut) are described once
 * (the guest-physical layout of Plugins/KVM/Guest/kernel.S and pmem.S, the policy, K, N, the probes)
 * and run through the C ABI on backend "sim" and on backend "kvm" by the same functions,
 * run_scenario() and run_pmem_scenario(). They differ only in the guest image they load and
 * in the registers each backend needs:
 *   - "kvm": Plugins/KVM/Guest/kernel_guest.h / pmem_guest.h (x86-64), long mode set up as
 *     test_kvm.c does;
 *   - "sim": the same programs written in the simulator's ISA (docs/guest-isa.md), encoded below by
 *     a tiny emitter and laid out at the same addresses, under the same page tables (the bytes of
 *     the x86 images' page-table pages, so the U/S layout is identical by construction).
 * Then the observable outcomes are compared: the bytes printed on port 0xE9, the final exit reason,
 * the number of violations reported, and for an MBEC violation its gpa, rip, cpl and the access /
 * permission bits of its qualification;
 * for the NVDIMM (three hosts: needs WPQ flushing; does not (sim: wpq_drains_on_power_loss, kvm:
 * NPTKIT_KVM_PMEM_NEEDS_FLUSH=0); needs it but NPT_FLUSH_TRAP_NEVER, a crash test): the flush
 * statistics and the records read back with npt_vm_read_memory, and what survives
 * npt_vm_power_failure.
 *
 * Documented differences (real limits of the KVM backend, Plugins/KVM/README.md), asserted as such:
 *   - KVM supports NPT_MBEC_LAZY only, so both backends run lazy;
 *   - the write-back instruction: CLWB on sim, CLFLUSHOPT on kvm (this KVM's emulator lacks CLWB);
 *   - physical flushes per guest flush = the number of flush targets behind the NVDIMM range (sim's
 *     standard region 1 is interleaved over 2 controllers, kvm's file region has 1);
 *   - untrapped vFHA writes are counted by sim (N) but not by kvm (0);
 *   - the linear-address bits of a violation's qualification (GLA_VALID, GLA_TRANSL, USER_LINEAR):
 *     sim reports them, kvm has no NPT_CAP_LINEAR_MODE_INFO (0); the access and permission bits
 *     (READ, WRITE, FETCH, READABLE, WRITABLE, EXECUTABLE, UEXECUTABLE) are compared;
 *   - power cut: sim models one (the flushed records survive; in the crash test, the same guest with
 *     the vFHA never trapped on a host that needs flushing, none do); kvm answers NPT_ERR_UNSUPPORTED;
 *   - how the MBEC exits are taken (sim exits on escalation; kvm sees EPT violations on the first
 *     fetch in the other mode) is not observable to the guest: the stats are printed, not compared.
 *
 * Without a usable /dev/kvm the sim half still runs, the kvm half is SKIPPED with the reason and
 * the program exits 77. Prints "c-test test_backend_swap: N passed, M failed, K skipped".
 */
#define _GNU_SOURCE
#include <nptkit.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "../../Plugins/KVM/Guest/kernel_guest.h"
#include "../../Plugins/KVM/Guest/pmem_guest.h"

static int passed, failed, skipped;

static void check(int ok, const char *what, int line) {
    if (ok) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL test_backend_swap.c:%d: %s\n", line, what);
    }
}
static void check_status(npt_status got, npt_status want, const char *call, int line) {
    if (got == want) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL test_backend_swap.c:%d: %s\n    expected %s\n    got      %s\n    last error: %s\n", line,
                call, npt_status_string(want), npt_status_string(got), npt_last_error());
    }
}
static void check_u64(uint64_t got, uint64_t want, const char *what, int line) {
    if (got == want) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL test_backend_swap.c:%d: %s == %#" PRIx64 ", expected %#" PRIx64 "\n", line, what, got,
                want);
    }
}
#define CHECK(c) check(!!(c), #c, __LINE__)
#define CHECK_ST(call, want) check_status((call), (want), #call, __LINE__)
#define CHECK_OK(call) check_status((call), NPT_OK, #call, __LINE__)
#define CHECK_EQ(got, want) check_u64((uint64_t)(got), (uint64_t)(want), #got, __LINE__)

/* ------------------------------------------------------------------------ */
/* The scenario description: shared by both backends.                        */
/* ------------------------------------------------------------------------ */
#define RAM (UINT64_C(2) << 20)
#define PORT_PRINT 0xE9
#define PORT_FAULT 0xEF     /* the kernel's "unexpected fault" port (kernel.S) */
#define SYS_WRITE 1
#define SYS_EXIT 60
#define K_CALLS 12          /* "write" system calls: prints "012345678901" */
enum { PROBE_NONE = 0, PROBE_USER_RUNS_KERNEL = 1, PROBE_KERNEL_RUNS_USER = 2 };

/* Guest-physical layout (kernel.S) */
#define G_TABLES KERNEL_GUEST_BASE  /* 0x1000 PML4, 0x2000 PDPT, 0x3000 PD, 0x4000 PT: [S] */
#define G_SYSTEM KERNEL_GUEST_SYSTEM /* 0x5000 GDT/TSS/IDT (x86 only) */
#define G_KCODE KERNEL_GUEST_CODE   /* 0x6000 kernel code, entry */
#define G_KSYS (G_KCODE + 0x100)    /* system call entry */
#define G_KFAULT (G_KCODE + 0x200)  /* fault handler */
#define G_KSTACK KERNEL_GUEST_STACK /* 0x7000 */
#define G_KFUNC KERNEL_GUEST_KFUNC  /* 0x8000 kernel-only code the guest maps U/S = 1 */
#define G_USER KERNEL_GUEST_USER    /* 0x9000 user code */
#define G_USTACK KERNEL_GUEST_USTACK /* 0xA000 */

/* The MBEC policy (test_kvm.c's kernel_vm): page tables, system tables and the kernel stack R|W|SX|UX
 * (a KVM requirement, README "What does not"), kernel code R|SX, kfunc R|SX, user code R|UX, user
 * stack R|W; the rest of RAM the default R|W|SX|UX. */
static const struct { uint64_t gpa, size, perms; } kernel_policy[] = {
    {G_TABLES, G_KCODE - G_TABLES, NPT_PERM_ALL},
    {G_KCODE, 0x1000, NPT_PERM_READ | NPT_PERM_SX},
    {G_KSTACK, 0x1000, NPT_PERM_ALL},
    {G_KFUNC, 0x1000, NPT_PERM_READ | NPT_PERM_SX},
    {G_USER, 0x1000, NPT_PERM_READ | NPT_PERM_UX},
    {G_USTACK, 0x1000, NPT_PERM_READ | NPT_PERM_WRITE},
};

/* NVDIMM scenario (pmem.S): page tables at 0x10000 identity-mapping [0, 2 MiB) and [1 GiB, 2 GiB)
 * with 2 MiB pages; N records {MAGIC, i} at NVD_GPA + 64 i, each made durable by store, write-back,
 * SFENCE, vFHA write, then OUT i. */
#define NVD_GPA UINT64_C(0x40000000)
#define NVD_LEN (UINT64_C(2) << 20)
#define PMEM_N 16
#define PMEM_MAGIC PMEM_GUEST_MAGIC
#define PMEM_TABLES_LEN 0x4000u /* the page-table pages of pmem.S's image */

/* ------------------------------------------------------------------------ */
/* The simulator's guest: the same programs in its ISA (docs/guest-isa.md).  */
/* ------------------------------------------------------------------------ */
enum {
    OP_MOVI = 0x01, OP_MOVHI = 0x02, OP_MOV = 0x03, OP_ADD = 0x04, OP_ADDI = 0x05, OP_STORE = 0x07,
    OP_JMP = 0x08, OP_JMPR = 0x09, OP_JZ = 0x0A, OP_JNZ = 0x0B, OP_SYSCALL = 0x0C, OP_SYSRET = 0x0D,
    OP_HLT = 0x0E, OP_OUT = 0x0F, OP_IRET = 0x11, OP_SUB = 0x12, OP_CLWB = 0x14, OP_SFENCE = 0x15
};
/* Register numbers = x86's: r0 rax, r1 rcx, r3 rbx, r6 rsi, r7 rdi, r12, r13, r14, r15 */

/* The emitter: 8-byte instructions at guest-physical (= linear: identity-mapped) address `pc`. */
typedef struct {
    uint8_t *mem;  /* image buffer, mem[0] is guest-physical `base` */
    uint64_t base;
    uint64_t pc;
} asm_t;
static void emit(asm_t *a, uint8_t op, uint8_t ra, uint8_t rb, int32_t imm) {
    uint8_t *p = a->mem + (a->pc - a->base);
    uint32_t u = (uint32_t)imm;
    p[0] = op; p[1] = ra; p[2] = rb; p[3] = 0;
    p[4] = (uint8_t)u; p[5] = (uint8_t)(u >> 8); p[6] = (uint8_t)(u >> 16); p[7] = (uint8_t)(u >> 24);
    a->pc += 8;
}
static int32_t rel(const asm_t *a, uint64_t target) { return (int32_t)(int64_t)(target - (a->pc + 8)); }
static void org(asm_t *a, uint64_t pc) { a->pc = pc; }
static void load64(asm_t *a, uint8_t r, uint64_t v) {
    emit(a, OP_MOVI, r, 0, (int32_t)(uint32_t)v);
    emit(a, OP_MOVHI, r, 0, (int32_t)(uint32_t)(v >> 32));
}

/* kernel.S in the simulator's ISA, same addresses and behaviour. img covers [G_TABLES, G_USTACK + 0x1000). */
#define SIM_KERNEL_LEN (G_USTACK + 0x1000 - G_TABLES)
static void sim_kernel_image(uint8_t *img) {
    memset(img, 0, SIM_KERNEL_LEN);
    /* the page tables: kernel.S's own (same U/S layout: [S] up to 0x7000, [U] 0x8000..0xA000) */
    memcpy(img, kernel_guest, G_SYSTEM - G_TABLES);
    asm_t a = {img, G_TABLES, 0};
    uint64_t l1, l2, l3;

    /* kentry: drop to the user process (IRET a: rip = ra, cpl = 3) */
    org(&a, G_KCODE);
    emit(&a, OP_MOVI, 0, 0, (int32_t)G_USER);
    emit(&a, OP_IRET, 0, 0, 0);

    /* ksys (lstar): r0 = 1 write: OUT the byte in r7; r0 = 60 exit: HLT (probe 2: jump to the user
     * page); else OUT 0xff to PORT_FAULT and HLT. SYSCALL put the return rip in r1. */
    org(&a, G_KSYS);
    emit(&a, OP_MOV, 11, 0, 0);
    emit(&a, OP_ADDI, 11, 0, -SYS_WRITE);
    l1 = a.pc; emit(&a, OP_JNZ, 11, 0, 0);                       /* -> not write */
    emit(&a, OP_OUT, 7, 0, PORT_PRINT);
    emit(&a, OP_SYSRET, 0, 0, 0);
    uint64_t notwrite = a.pc;
    emit(&a, OP_MOV, 11, 0, 0);
    emit(&a, OP_ADDI, 11, 0, -SYS_EXIT);
    l2 = a.pc; emit(&a, OP_JNZ, 11, 0, 0);                       /* -> bad call */
    emit(&a, OP_MOV, 11, 15, 0);
    emit(&a, OP_ADDI, 11, 0, -PROBE_KERNEL_RUNS_USER);
    l3 = a.pc; emit(&a, OP_JZ, 11, 0, 0);                        /* -> probe 2 */
    emit(&a, OP_HLT, 0, 0, 0);
    emit(&a, OP_JMP, 0, 0, -8);
    uint64_t probe2 = a.pc;
    emit(&a, OP_MOVI, 0, 0, (int32_t)G_USER);                    /* the kernel runs a user page */
    emit(&a, OP_JMPR, 0, 0, 0);
    uint64_t bad = a.pc;
    emit(&a, OP_MOVI, 0, 0, 0xff);
    emit(&a, OP_OUT, 0, 0, PORT_FAULT);
    emit(&a, OP_HLT, 0, 0, 0);
    emit(&a, OP_JMP, 0, 0, -8);
    { asm_t f = a; f.pc = l1; emit(&f, OP_JNZ, 11, 0, rel(&f, notwrite)); }
    { asm_t f = a; f.pc = l2; emit(&f, OP_JNZ, 11, 0, rel(&f, bad)); }
    { asm_t f = a; f.pc = l3; emit(&f, OP_JZ, 11, 0, rel(&f, probe2)); }

    /* kfault (fault_handler): OUT the vector (r13) to PORT_FAULT, HLT */
    org(&a, G_KFAULT);
    emit(&a, OP_OUT, 13, 0, PORT_FAULT);
    emit(&a, OP_HLT, 0, 0, 0);
    emit(&a, OP_JMP, 0, 0, -16);

    /* kfunc: print 'K', HLT */
    org(&a, G_KFUNC);
    emit(&a, OP_MOVI, 0, 0, 'K');
    emit(&a, OP_OUT, 0, 0, PORT_PRINT);
    emit(&a, OP_HLT, 0, 0, 0);
    emit(&a, OP_JMP, 0, 0, -8);

    /* user: r14 "write" calls of '0', '1', ... '9', '0', ...; then probe 1 or exit */
    org(&a, G_USER);
    emit(&a, OP_MOVI, 3, 0, '0');                                /* bl */
    emit(&a, OP_MOV, 12, 14, 0);
    uint64_t loop = a.pc;
    uint64_t jdone = a.pc; emit(&a, OP_JZ, 12, 0, 0);            /* -> done */
    emit(&a, OP_MOV, 7, 3, 0);
    emit(&a, OP_MOVI, 0, 0, SYS_WRITE);
    emit(&a, OP_SYSCALL, 0, 0, 0);                               /* write(bl) */
    emit(&a, OP_ADDI, 3, 0, 1);
    emit(&a, OP_MOV, 11, 3, 0);
    emit(&a, OP_ADDI, 11, 0, -('9' + 1));
    emit(&a, OP_JNZ, 11, 0, 8);                                  /* skip the wrap */
    emit(&a, OP_MOVI, 3, 0, '0');
    emit(&a, OP_ADDI, 12, 0, -1);
    emit(&a, OP_JMP, 0, 0, rel(&a, loop));
    uint64_t done = a.pc;
    { asm_t f = a; f.pc = jdone; emit(&f, OP_JZ, 12, 0, rel(&f, done)); }
    emit(&a, OP_MOV, 11, 15, 0);
    emit(&a, OP_ADDI, 11, 0, -PROBE_USER_RUNS_KERNEL);
    emit(&a, OP_JNZ, 11, 0, 16);                                 /* -> exit */
    emit(&a, OP_MOVI, 0, 0, (int32_t)G_KFUNC);                   /* the user process runs a kernel page */
    emit(&a, OP_JMPR, 0, 0, 0);
    emit(&a, OP_MOVI, 0, 0, SYS_EXIT);
    emit(&a, OP_SYSCALL, 0, 0, 0);                               /* exit */
    emit(&a, OP_JMP, 0, 0, -8);
}

/* pmem.S's loop in the simulator's ISA at PMEM_GUEST_CLWB_ENTRY, under pmem.S's page tables.
 * r7 = NVDIMM base, r6 = vFHA, r1 = N (pmem.S's rdi, rsi, rcx). */
#define SIM_PMEM_LEN (PMEM_GUEST_CLWB_ENTRY + 0x1000 - PMEM_GUEST_BASE)
static void sim_pmem_image(uint8_t *img) {
    memset(img, 0, SIM_PMEM_LEN);
    memcpy(img, pmem_guest, PMEM_TABLES_LEN);
    asm_t a = {img, PMEM_GUEST_BASE, PMEM_GUEST_CLWB_ENTRY};
    emit(&a, OP_MOVI, 3, 0, 0);                                  /* i */
    emit(&a, OP_MOV, 2, 7, 0);                                   /* the record's line */
    load64(&a, 0, PMEM_MAGIC);
    emit(&a, OP_MOVI, 4, 0, 1);
    uint64_t loop = a.pc;
    emit(&a, OP_STORE, 2, 0, 0);
    emit(&a, OP_STORE, 2, 3, 8);
    emit(&a, OP_CLWB, 2, 0, 0);
    emit(&a, OP_SFENCE, 0, 0, 0);
    emit(&a, OP_STORE, 6, 4, 0);                                 /* the flush hint write */
    emit(&a, OP_OUT, 3, 0, PORT_PRINT);
    emit(&a, OP_ADDI, 3, 0, 1);
    emit(&a, OP_ADDI, 2, 0, 64);
    emit(&a, OP_MOV, 5, 3, 0);
    emit(&a, OP_SUB, 5, 1, 0);
    emit(&a, OP_JNZ, 5, 0, rel(&a, loop));
    emit(&a, OP_HLT, 0, 0, 0);
}

/* ------------------------------------------------------------------------ */
/* Per backend: the image and the registers. Nothing else differs.           */
/* ------------------------------------------------------------------------ */
#define CR0_LONG (UINT64_C(0x80000001) | 0x10 | 0x20 | 0x10000 | 0x2) /* PG|PE|ET|NE|WP|MP */
#define CR0_PG UINT64_C(0x80000000)

static int is_kvm(const char *backend) { return strcmp(backend, "kvm") == 0; }

static void base_regs(const char *backend, npt_regs *r, uint64_t rip, uint64_t cr3) {
    memset(r, 0, sizeof *r);
    r->size = sizeof *r;
    r->cpl = 0;
    r->rip = rip;
    r->rflags = 2;
    r->cr3 = cr3;
    if (is_kvm(backend)) { /* as test_kvm.c: 64-bit long mode, the guest loads its GDT/IDT/TSS */
        r->gpr[4] = 0x8000; /* rsp */
        r->cr0 = CR0_LONG;
        r->cr4 = 0x20;      /* PAE */
        r->efer = 0x500;    /* LME|LMA */
    } else {                /* the simulator: paging, the system call entry, the fault handler */
        r->cr0 = CR0_PG;
        r->lstar = G_KSYS;
        r->fault_handler = G_KFAULT;
    }
}

static npt_status load_kernel_image(npt_vm *vm, const char *backend) {
    if (is_kvm(backend)) return npt_vm_write_memory(vm, KERNEL_GUEST_BASE, kernel_guest, sizeof kernel_guest);
    static uint8_t img[SIM_KERNEL_LEN];
    sim_kernel_image(img);
    return npt_vm_write_memory(vm, G_TABLES, img, sizeof img);
}

/* Returns the entry point of the flush loop. */
static uint64_t load_pmem_image(npt_vm *vm, const char *backend) {
    if (is_kvm(backend)) {
        CHECK_OK(npt_vm_write_memory(vm, PMEM_GUEST_BASE, pmem_guest, sizeof pmem_guest));
        return PMEM_GUEST_CLFLUSHOPT_ENTRY; /* CLWB is not emulated by this KVM (README) */
    }
    static uint8_t img[SIM_PMEM_LEN];
    sim_pmem_image(img);
    CHECK_OK(npt_vm_write_memory(vm, PMEM_GUEST_BASE, img, sizeof img));
    return PMEM_GUEST_CLWB_ENTRY;
}

/* ------------------------------------------------------------------------ */
/* Running the scenarios                                                      */
/* ------------------------------------------------------------------------ */
typedef struct {
    int ran;
    char printed[64];
    size_t len;
    npt_exit last;
    npt_stats stats;
} kernel_outcome;

static npt_vm *make_vm(npt_context *ctx, const char *backend) {
    npt_vm_config cfg = {0};
    cfg.size = sizeof cfg;
    cfg.mbec_mode = NPT_MBEC_LAZY; /* the only mode the KVM backend has */
    cfg.backend = backend;
    cfg.ram_size = RAM;
    cfg.default_perms = NPT_PERM_ALL;
    cfg.max_steps_per_run = is_kvm(backend) ? 0 : 1000000; /* sim: never spin forever */
    npt_vm *vm = NULL;
    CHECK_OK(npt_vm_create(ctx, &cfg, &vm));
    return vm;
}

/* Runs to the first exit that is not a byte on PORT_PRINT, collecting the bytes. */
static npt_exit run_collect(npt_vcpu *v, char *out, size_t cap, size_t *len) {
    npt_exit e;
    *len = 0;
    for (int i = 0; i < 100000; i++) {
        memset(&e, 0, sizeof e);
        e.size = sizeof e;
        npt_status s = npt_vcpu_run(v, &e);
        if (s != NPT_OK) {
            fprintf(stderr, "npt_vcpu_run: %s: %s\n", npt_status_string(s), npt_last_error());
            e.reason = NPT_EXIT_NONE;
            break;
        }
        if (e.reason == NPT_EXIT_IO && e.io_port == PORT_PRINT) {
            if (*len + 1 < cap) out[(*len)++] = (char)e.io_value;
            continue;
        }
        break;
    }
    out[*len] = 0;
    if (e.reason == NPT_EXIT_IO && e.io_port == PORT_FAULT)
        fprintf(stderr, "test_backend_swap: the guest kernel took an unexpected fault %#" PRIx64 " at rip %#" PRIx64 "\n",
                e.io_value, e.rip);
    return e;
}

/* The kernel scenario: K "write" system calls, then `probe`, on `backend`. */
static void run_scenario(npt_context *ctx, const char *backend, uint64_t probe, uint64_t k, kernel_outcome *o) {
    memset(o, 0, sizeof *o);
    npt_vm *vm = make_vm(ctx, backend);
    if (!vm) return;
    CHECK_OK(load_kernel_image(vm, backend));
    for (size_t i = 0; i < sizeof kernel_policy / sizeof kernel_policy[0]; i++)
        CHECK_OK(npt_policy_set(vm, kernel_policy[i].gpa, kernel_policy[i].size, NPT_PAGE_4K, kernel_policy[i].perms));
    npt_vcpu *v = NULL;
    CHECK_OK(npt_vcpu_create(vm, 0, &v));
    if (v) {
        npt_regs r;
        base_regs(backend, &r, G_KCODE, KERNEL_GUEST_CR3);
        r.gpr[14] = k;
        r.gpr[15] = probe;
        CHECK_OK(npt_vcpu_set_regs(v, &r));
        o->last = run_collect(v, o->printed, sizeof o->printed, &o->len);
        o->stats.size = sizeof o->stats;
        CHECK_OK(npt_vm_get_stats(vm, &o->stats));
        o->ran = 1;
        npt_vcpu_destroy(v);
    }
    CHECK_OK(npt_vm_destroy(vm));
}

typedef struct {
    int ran;
    uint64_t entry;
    char printed[PMEM_N + 1]; /* OUT i, low bytes, as '0' + i for the table */
    size_t len;
    npt_exit last;
    npt_flush_hint_info fh;
    npt_flush_stats st;
    int records_good;          /* records {MAGIC, i} read back after the run */
    npt_status power;          /* npt_vm_power_failure */
    int records_after_power;   /* records read back after the power cut (if modelled) */
} pmem_outcome;

static int count_records(npt_vm *vm) {
    uint64_t rec[PMEM_N * 8];
    memset(rec, 0, sizeof rec);
    if (npt_vm_read_memory(vm, NVD_GPA, rec, sizeof rec) != NPT_OK) return -1;
    int good = 0;
    for (int i = 0; i < PMEM_N; i++) good += rec[8 * i] == PMEM_MAGIC && rec[8 * i + 1] == (uint64_t)i;
    return good;
}

/* The NVDIMM scenario: N durable records at NVD_GPA (backed by host region 1 at region_offset),
 * then a power cut. trap: NPT_FLUSH_TRAP_AUTO, or NPT_FLUSH_TRAP_NEVER for the crash test (the guest's
 * flushes do nothing where the host needs them: the records are not durable). Whether the host needs WPQ flushing is set up per backend by the caller (sim:
 * the platform; kvm: NPTKIT_KVM_PMEM_NEEDS_FLUSH). */
static void run_pmem_scenario(npt_context *ctx, const char *backend, uint32_t trap, uint64_t region_offset,
                              pmem_outcome *o) {
    memset(o, 0, sizeof *o);
    npt_vm *vm = make_vm(ctx, backend);
    if (!vm) return;
    CHECK_OK(npt_vm_set_flush_options(vm, trap, 1));
    npt_nvdimm d = {0};
    d.size = sizeof d;
    d.host_region = 1;
    d.gpa = NVD_GPA;
    d.length = NVD_LEN;
    d.region_offset = region_offset;
    CHECK_OK(npt_vm_add_nvdimm(vm, &d));
    o->fh.size = sizeof o->fh;
    CHECK_OK(npt_vm_get_flush_hint(vm, &o->fh));
    CHECK(o->fh.vfha >= NVD_GPA + NVD_LEN && o->fh.vfha < UINT64_C(0x80000000)); /* mapped by the page tables */
    /* the records start empty (npt_vm_write_memory does not write NVDIMM ranges; the kvm backing
     * file outlives VMs, hence a fresh part of the host region per run) */
    CHECK_EQ(count_records(vm), 0);
    o->entry = load_pmem_image(vm, backend);
    npt_vcpu *v = NULL;
    CHECK_OK(npt_vcpu_create(vm, 0, &v));
    if (v) {
        npt_regs r;
        base_regs(backend, &r, o->entry, PMEM_GUEST_CR3);
        r.gpr[7] = NVD_GPA;   /* rdi */
        r.gpr[6] = o->fh.vfha; /* rsi */
        r.gpr[1] = PMEM_N;    /* rcx */
        CHECK_OK(npt_vcpu_set_regs(v, &r));
        char raw[64];
        size_t n = 0;
        o->last = run_collect(v, raw, sizeof raw, &n);
        for (size_t i = 0; i < n && i < PMEM_N; i++) o->printed[i] = (char)('0' + (uint8_t)raw[i] % 10);
        o->len = n;
        int in_order = 1;
        for (size_t i = 0; i < n; i++) in_order &= (uint8_t)raw[i] == (uint8_t)i;
        CHECK(in_order);
        o->st.size = sizeof o->st;
        CHECK_OK(npt_vm_get_flush_stats(vm, &o->st));
        o->records_good = count_records(vm);
        o->power = npt_vm_power_failure(vm);
        o->records_after_power = o->power == NPT_OK ? count_records(vm) : -1;
        o->ran = 1;
        npt_vcpu_destroy(v);
    }
    CHECK_OK(npt_vm_destroy(vm));
}

/* ------------------------------------------------------------------------ */
/* Comparisons and the table                                                  */
/* ------------------------------------------------------------------------ */
static const char *reason_name(uint32_t r) {
    switch (r) {
    case NPT_EXIT_HALT: return "HALT";
    case NPT_EXIT_IO: return "IO";
    case NPT_EXIT_MBEC_VIOLATION: return "MBEC_VIOLATION";
    case NPT_EXIT_GUEST_FAULT: return "GUEST_FAULT";
    case NPT_EXIT_BUDGET: return "BUDGET";
    case NPT_EXIT_INTERNAL_ERROR: return "INTERNAL_ERROR";
    case NPT_EXIT_NONE: return "NONE";
    default: return "other";
    }
}

/* The access and permission bits of a violation's qualification, which the core computes the same
 * way on every backend (the permissions are the page's policy). The linear-address bits (GLA_VALID,
 * GLA_TRANSL, USER_LINEAR) need NPT_CAP_LINEAR_MODE_INFO, which KVM lacks: asserted separately. */
#define QMASK                                                                                               \
    (NPT_EPTQ_READ | NPT_EPTQ_WRITE | NPT_EPTQ_FETCH | NPT_EPTQ_READABLE | NPT_EPTQ_WRITABLE | NPT_EPTQ_EXECUTABLE | \
     NPT_EPTQ_UEXECUTABLE)
#define QLINEAR (NPT_EPTQ_GLA_VALID | NPT_EPTQ_GLA_TRANSL | NPT_EPTQ_USER_LINEAR)

static void print_kernel_row(const char *backend, uint64_t probe, const kernel_outcome *o) {
    if (!o->ran) {
        printf("  %-4s probe %" PRIu64 " | (not run)\n", backend, probe);
        return;
    }
    const npt_exit *e = &o->last;
    printf("  %-4s probe %" PRIu64 " | printed %-14s | %-14s", backend, probe, o->printed, reason_name(e->reason));
    if (e->reason == NPT_EXIT_MBEC_VIOLATION)
        printf(" gpa %#7" PRIx64 " rip %#7" PRIx64 " cpl %u q&mask %#5" PRIx64 " (q %#" PRIx64 ")", e->gpa, e->rip, e->cpl,
               e->qualification & QMASK, e->qualification);
    else
        printf(" cpl %u", e->cpl);
    printf(" | stats: %" PRIu64 " exits, %" PRIu64 " EPT violations, %" PRIu64 " switches\n", o->stats.exits_total,
           o->stats.exits_ept_violation, o->stats.hierarchy_switches);
}

/* What the scenario description says must happen, whatever the backend. */
static void expect_kernel(const char *backend, uint64_t probe, const kernel_outcome *o) {
    CHECK(o->ran);
    if (!o->ran) return;
    const npt_exit *e = &o->last;
    if (strcmp(o->printed, "012345678901") != 0)
        fprintf(stderr, "FAIL %s probe %" PRIu64 ": printed \"%s\"\n", backend, probe, o->printed);
    CHECK(strcmp(o->printed, "012345678901") == 0);
    CHECK_EQ(o->stats.violations_reported, probe == PROBE_NONE ? 0 : 1);
    switch (probe) {
    case PROBE_NONE:
        CHECK_EQ(e->reason, NPT_EXIT_HALT);
        CHECK_EQ(e->cpl, 0);
        break;
    case PROBE_USER_RUNS_KERNEL:
        CHECK_EQ(e->reason, NPT_EXIT_MBEC_VIOLATION);
        CHECK_EQ(e->gpa, G_KFUNC);
        CHECK_EQ(e->rip, G_KFUNC);
        CHECK_EQ(e->cpl, 3);
        CHECK_EQ(e->qualification & QMASK, NPT_EPTQ_FETCH | NPT_EPTQ_READABLE | NPT_EPTQ_EXECUTABLE);
        break;
    case PROBE_KERNEL_RUNS_USER:
        CHECK_EQ(e->reason, NPT_EXIT_MBEC_VIOLATION);
        CHECK_EQ(e->gpa, G_USER);
        CHECK_EQ(e->rip, G_USER);
        CHECK_EQ(e->cpl, 0);
        CHECK_EQ(e->qualification & QMASK, NPT_EPTQ_FETCH | NPT_EPTQ_READABLE | NPT_EPTQ_UEXECUTABLE);
        break;
    }
    if (e->reason == NPT_EXIT_MBEC_VIOLATION) {
        /* documented difference: only sim reports the linear address's U/S (both probed pages are
         * U/S = 1 in the guest's page tables); kvm has no NPT_CAP_LINEAR_MODE_INFO */
        if (is_kvm(backend))
            CHECK_EQ(e->qualification & QLINEAR, 0);
        else
            CHECK_EQ(e->qualification & NPT_EPTQ_USER_LINEAR, NPT_EPTQ_USER_LINEAR);
    }
}

/* The swap: the two backends' outcomes are equal. */
static void compare_kernel(uint64_t probe, const kernel_outcome *s, const kernel_outcome *k) {
    if (!s->ran || !k->ran) return;
    int violation = s->last.reason == NPT_EXIT_MBEC_VIOLATION;
    int same = strcmp(s->printed, k->printed) == 0 && s->last.reason == k->last.reason && s->last.cpl == k->last.cpl &&
               s->stats.violations_reported == k->stats.violations_reported &&
               (!violation || (s->last.gpa == k->last.gpa && s->last.rip == k->last.rip &&
                               (s->last.qualification & QMASK) == (k->last.qualification & QMASK)));
    CHECK(strcmp(s->printed, k->printed) == 0);
    CHECK_EQ(s->last.reason, k->last.reason);
    CHECK_EQ(s->last.cpl, k->last.cpl);
    CHECK_EQ(s->stats.violations_reported, k->stats.violations_reported);
    if (violation) {
        CHECK_EQ(s->last.gpa, k->last.gpa);
        CHECK_EQ(s->last.rip, k->last.rip);
        CHECK_EQ(s->last.qualification & QMASK, k->last.qualification & QMASK);
    }
    printf("  probe %" PRIu64 ": sim and kvm %s (printed bytes, exit reason, cpl%s)\n", probe, same ? "agree" : "DIFFER",
           violation ? ", violation gpa, rip, qualification's access and permission bits" : "");
}

static void print_pmem_row(const char *backend, const char *host, const pmem_outcome *o) {
    if (!o->ran) {
        printf("  %-4s %-31s | (not run)\n", backend, host);
        return;
    }
    printf("  %-4s %-31s | %-10s | vFHA %s | printed %-16s | %-4s | guest flushes %2" PRIu64 ", exits %2" PRIu64
           ", physical %2" PRIu64 " (%u target(s)), untrapped %2" PRIu64 " | records %2d/%d | power cut: %s",
           backend, host, o->entry == PMEM_GUEST_CLWB_ENTRY ? "CLWB" : "CLFLUSHOPT", o->fh.trapped ? "trapped  " : "untrapped",
           o->printed, reason_name(o->last.reason), o->st.guest_flushes, o->st.exits, o->st.physical_flushes,
           o->fh.target_count, o->st.untrapped_writes, o->records_good, PMEM_N, npt_status_string(o->power));
    if (o->power == NPT_OK) printf(", %d/%d records survive", o->records_after_power, PMEM_N);
    printf("\n");
}

/* needs_flush: the host needs WPQ flushing; crash: the vFHA is deliberately never trapped there. */
static void expect_pmem(const char *backend, int needs_flush, int crash, const pmem_outcome *o) {
    CHECK(o->ran);
    if (!o->ran) return;
    int trapped = needs_flush && !crash;
    uint64_t want = trapped ? PMEM_N : 0;
    CHECK_EQ(o->last.reason, NPT_EXIT_HALT);
    CHECK_EQ(o->len, PMEM_N);
    CHECK_EQ(o->fh.trapped, trapped);
    CHECK_EQ(o->fh.nvdimm_count, 1);
    CHECK_EQ(o->st.guest_flushes, want);
    CHECK_EQ(o->st.exits, want);
    /* each guest flush writes every physical flush hint behind the range once (coalescing needs
     * several vCPUs) */
    CHECK_EQ(o->st.physical_flushes, want * o->fh.target_count);
    CHECK_EQ(o->records_good, PMEM_N);
    if (is_kvm(backend)) {
        /* documented limits: CLFLUSHOPT (no CLWB), untrapped writes not counted, no power cut */
        CHECK_EQ(o->entry, PMEM_GUEST_CLFLUSHOPT_ENTRY);
        CHECK_EQ(o->fh.target_count, 1);
        CHECK_EQ(o->st.untrapped_writes, 0);
        CHECK_ST(o->power, NPT_ERR_UNSUPPORTED);
    } else {
        CHECK_EQ(o->entry, PMEM_GUEST_CLWB_ENTRY);
        CHECK_EQ(o->fh.target_count, 2); /* the standard platform's region 1: 2 controllers */
        CHECK_EQ(o->st.untrapped_writes, trapped ? 0 : PMEM_N);
        CHECK_OK(o->power);
        /* durable records survive the cut; in the crash test they sat in the WPQs, outside the
         * persistence domain, and are lost */
        CHECK_EQ(o->records_after_power, crash ? 0 : PMEM_N);
    }
}

static void compare_pmem(const pmem_outcome *s, const pmem_outcome *k) {
    if (!s->ran || !k->ran) return;
    CHECK(strcmp(s->printed, k->printed) == 0);
    CHECK_EQ(s->last.reason, k->last.reason);
    CHECK_EQ(s->fh.trapped, k->fh.trapped);
    CHECK_EQ(s->st.guest_flushes, k->st.guest_flushes);
    CHECK_EQ(s->st.exits, k->st.exits);
    CHECK_EQ(s->st.physical_flushes / s->fh.target_count, k->st.physical_flushes / k->fh.target_count);
    CHECK_EQ(s->records_good, k->records_good);
}

static int set_sim_platform(npt_context *ctx, int adr) {
    npt_sim_platform p;
    memset(&p, 0, sizeof p);
    p.size = sizeof p;
    p.wpq_drains_on_power_loss = adr;
    npt_status s = npt_sim_set_platform(ctx, &p);
    CHECK_OK(s);
    return s == NPT_OK;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s libnptkit-kvm.so\n", argv[0]);
        return 2;
    }
    npt_context *ctx = NULL;
    CHECK_OK(npt_context_create(&ctx));
    if (!ctx) return 1;
    const char *name = NULL;
    CHECK_OK(npt_plugin_load(ctx, argv[1], &name));
    CHECK(name && strcmp(name, "kvm") == 0);

    /* the sim guest's page tables are the x86 images' own */
    static uint8_t img[SIM_KERNEL_LEN];
    sim_kernel_image(img);
    CHECK(memcmp(img, kernel_guest, G_SYSTEM - G_TABLES) == 0);

    const char *kvm_skip = NULL;
    char why[256];
    int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        snprintf(why, sizeof why, "/dev/kvm cannot be opened (%s)", strerror(errno));
        kvm_skip = why;
        /* the plugin says so too */
        npt_vm_config cfg = {0};
        cfg.size = sizeof cfg;
        cfg.mbec_mode = NPT_MBEC_LAZY;
        cfg.backend = "kvm";
        cfg.ram_size = RAM;
        cfg.default_perms = NPT_PERM_ALL;
        npt_vm *vm = NULL;
        CHECK_ST(npt_vm_create(ctx, &cfg, &vm), NPT_ERR_UNSUPPORTED);
    } else {
        close(fd);
    }

    /* the kernel with a user process: K system calls, then each probe */
    kernel_outcome ko[2][3];
    const char *backends[2] = {"sim", "kvm"};
    for (int b = 0; b < 2; b++)
        for (uint64_t p = 0; p < 3; p++) {
            if (b == 1 && kvm_skip) {
                memset(&ko[b][p], 0, sizeof ko[b][p]);
                continue;
            }
            run_scenario(ctx, backends[b], p, K_CALLS, &ko[b][p]);
            expect_kernel(backends[b], p, &ko[b][p]);
        }
    printf("test_backend_swap: kernel + user process, %d write system calls, MBEC policy, NPT_MBEC_LAZY:\n", K_CALLS);
    for (uint64_t p = 0; p < 3; p++)
        for (int b = 0; b < 2; b++) print_kernel_row(backends[b], p, &ko[b][p]);
    if (!kvm_skip)
        for (uint64_t p = 0; p < 3; p++) compare_kernel(p, &ko[0][p], &ko[1][p]);

    /* the NVDIMM: a host that needs WPQ flushing; one whose WPQs are in the persistence domain; the
     * first again with the vFHA never trapped (crash test) */
#define PMEM_CONFIGS 3
    pmem_outcome po[2][PMEM_CONFIGS];
    const char *hosts[PMEM_CONFIGS] = {"needs WPQ flush", "no flush (ADR/NEEDS_FLUSH=0)", "needs flush, TRAP_NEVER (crash)"};
    for (int c = 0; c < PMEM_CONFIGS; c++) {
        int needs_flush = c != 1, crash = c == 2;
        uint32_t trap = crash ? NPT_FLUSH_TRAP_NEVER : NPT_FLUSH_TRAP_AUTO;
        /* sim: the platform (a new one starts with empty media); kvm: the plugin's environment */
        memset(&po[0][c], 0, sizeof po[0][c]);
        memset(&po[1][c], 0, sizeof po[1][c]);
        if (set_sim_platform(ctx, !needs_flush)) {
            run_pmem_scenario(ctx, "sim", trap, (uint64_t)c * NVD_LEN, &po[0][c]);
            expect_pmem("sim", needs_flush, crash, &po[0][c]);
        }
        if (!kvm_skip) {
            setenv("NPTKIT_KVM_PMEM_NEEDS_FLUSH", needs_flush ? "1" : "0", 1);
            run_pmem_scenario(ctx, "kvm", trap, (uint64_t)c * NVD_LEN, &po[1][c]);
            expect_pmem("kvm", needs_flush, crash, &po[1][c]);
        }
    }
    set_sim_platform(ctx, 0);
    printf("test_backend_swap: NVDIMM, %d durable records (store, write-back, SFENCE, vFHA write):\n", PMEM_N);
    for (int c = 0; c < PMEM_CONFIGS; c++)
        for (int b = 0; b < 2; b++) print_pmem_row(backends[b], hosts[c], &po[b][c]);
    if (!kvm_skip) {
        for (int c = 0; c < PMEM_CONFIGS; c++) compare_pmem(&po[0][c], &po[1][c]);
        printf("test_backend_swap: documented differences asserted (not equality): write-back CLWB (sim) vs CLFLUSHOPT "
               "(kvm: CLWB not emulated); physical flushes = guest flushes x targets (sim 2, kvm 1); untrapped vFHA "
               "writes counted by sim only; USER_LINEAR/GLA qualification bits from sim only; power cut modelled by sim only (kvm: NPT_ERR_UNSUPPORTED: what survives it, all records, or none in the "
               "crash test, is seen on sim only); MBEC stats "
               "(exits, switches) differ by mechanism and are not compared\n");
    } else {
        printf("test_backend_swap: SKIPPED the kvm half: %s (the sim half ran)\n", kvm_skip);
        skipped++;
    }

    CHECK_OK(npt_context_destroy(ctx));
    printf("c-test test_backend_swap: %d passed, %d failed, %d skipped\n", passed, failed, skipped);
    if (failed) return 1;
    return skipped ? 77 : 0;
}
