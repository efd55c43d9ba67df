/*
 * test_nvdimm.c - virtualized NVDIMM write-pending-queue flushing through the C ABI only
 * (include/nptkit.h, ABI 1.1): host discovery, NVDIMM ranges and the vFHA, a guest that makes one
 * record durable (store, CLWB, SFENCE, a write to the vFHA) and leaves a second one unflushed, the
 * flush statistics, a power failure, the raw exit loop, the guest's NFIT, the simulator's platform
 * (standard, ADR, from an NFIT binary), bad input, and a C backend that claims the capability.
 *
 * Build: cc -std=c11 -Wall -Wextra -Werror -pedantic -Iinclude Tests/C/test_nvdimm.c \
 *           -L$BIN -lnptkit -Wl,-rpath,$BIN -o test_nvdimm
 * Usage: test_nvdimm [NFIT_AML]   (default Tests/Fixtures/nfit/nfit.aml, relative to the current
 *        directory; run.sh passes the absolute path)
 * Prints one line "c-test test_nvdimm: N passed, M failed" at the end; exits 1 if M > 0.
 */
#include <nptkit.h>

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------ */
/* Assertions                                                                 */
/* ------------------------------------------------------------------------ */
static int passed, failed;

static void check(int ok, const char *what, int line) {
    if (ok) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL test_nvdimm.c:%d: %s\n    last error: %s\n", line, what, npt_last_error());
    }
}

static void check_status(npt_status got, npt_status want, const char *call, int line) {
    if (got == want) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL test_nvdimm.c:%d: %s\n    expected %s\n    got      %s\n    last error: %s\n", line, call,
                npt_status_string(want), npt_status_string(got), npt_last_error());
    }
}

static void check_u64(uint64_t got, uint64_t want, const char *what, int line) {
    if (got == want) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL test_nvdimm.c:%d: %s == %#" PRIx64 ", expected %#" PRIx64 "\n", line, what, got, want);
    }
}

#define CHECK(cond) check(!!(cond), #cond, __LINE__)
#define CHECK_ST(call, want) check_status((call), (want), #call, __LINE__)
#define CHECK_OK(call) check_status((call), NPT_OK, #call, __LINE__)
#define CHECK_EQ(got, want) check_u64((uint64_t)(got), (uint64_t)(want), #got, __LINE__)
#define CHECK_ERR_MENTIONS(word) check(strstr(npt_last_error(), (word)) != NULL, "npt_last_error() mentions \"" word "\"", __LINE__)

/* ------------------------------------------------------------------------ */
/* The guest                                                                  */
/* ------------------------------------------------------------------------ */
#define R NPT_PERM_READ
#define W NPT_PERM_WRITE
#define SX NPT_PERM_SX
#define UX NPT_PERM_UX
#define K4 UINT64_C(0x1000)
#define M2 (UINT64_C(1) << 21)
#define RAM (UINT64_C(4) << 20)
#define NV_GPA UINT64_C(0x100000000)
#define NV_LEN M2
#define CODE UINT64_C(0x1000)
#define REC1 (NV_GPA)          /* its own 64-byte line */
#define REC2 (NV_GPA + 64)     /* another line */
#define VAL1 UINT64_C(0xD00D000000000001)
#define VAL2 UINT64_C(0xD00D000000000002)
#define PORT_DURABLE 0x50

enum { OP_MOVI = 0x01, OP_MOVHI = 0x02, OP_STORE = 0x07, OP_HLT = 0x0E, OP_OUT = 0x0F, OP_CLWB = 0x14, OP_SFENCE = 0x15 };

typedef struct { uint8_t bytes[512]; size_t len; } program;

/* byte0 opcode, byte1 a, byte2 b, byte3 0, bytes4..7 imm32 little-endian */
static void emit(program *p, uint8_t op, uint8_t a, uint8_t b, int32_t imm) {
    uint32_t u = (uint32_t)imm;
    uint8_t *o = p->bytes + p->len;
    o[0] = op; o[1] = a; o[2] = b; o[3] = 0;
    for (int i = 0; i < 4; i++) o[4 + i] = (uint8_t)(u >> (8 * i));
    p->len += 8;
}

/* MOVI sign-extends its imm; MOVHI then replaces the upper 32 bits. */
static void load64(program *p, uint8_t r, uint64_t v) {
    emit(p, OP_MOVI, r, 0, (int32_t)(uint32_t)v);
    emit(p, OP_MOVHI, r, 0, (int32_t)(uint32_t)(v >> 32));
}

/* r3 = vFHA. Record 1: store, CLWB, SFENCE, store to the vFHA (the guest's flush), OUT. Record 2:
 * stored only. HLT. */
static program flush_program(uint64_t vfha) {
    program p;
    memset(&p, 0, sizeof p);
    load64(&p, 3, vfha);
    load64(&p, 1, VAL1);
    load64(&p, 2, REC1);
    emit(&p, OP_STORE, 2, 1, 0);
    emit(&p, OP_CLWB, 2, 0, 0);
    emit(&p, OP_SFENCE, 0, 0, 0);
    emit(&p, OP_STORE, 3, 1, 0);
    emit(&p, OP_MOVI, 4, 0, 1);
    emit(&p, OP_OUT, 4, 0, PORT_DURABLE);
    load64(&p, 1, VAL2);
    load64(&p, 2, REC2);
    emit(&p, OP_STORE, 2, 1, 0);
    emit(&p, OP_HLT, 0, 0, 0);
    return p;
}

static uint64_t read_u64(npt_vm *vm, uint64_t gpa) {
    uint8_t b[8];
    npt_status s = npt_vm_read_memory(vm, gpa, b, 8);
    if (s != NPT_OK) {
        fprintf(stderr, "    npt_vm_read_memory(%#" PRIx64 ") failed: %s\n", gpa, npt_status_string(s));
        return UINT64_C(0xdeadbeefdeadbeef);
    }
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)b[i] << (8 * i);
    return v;
}

static npt_vm *make_vm(npt_context *ctx, const char *backend, uint32_t mode) {
    npt_vm_config c;
    memset(&c, 0, sizeof c);
    c.size = sizeof c;
    c.mbec_mode = mode;
    c.backend = backend;
    c.ram_size = RAM;
    c.default_perms = R | W;
    npt_vm *vm = NULL;
    check_status(npt_vm_create(ctx, &c, &vm), NPT_OK, "make_vm: npt_vm_create", __LINE__);
    return vm;
}

static npt_nvdimm nvdimm(uint32_t region, uint64_t gpa, uint64_t length, uint64_t offset) {
    npt_nvdimm n;
    memset(&n, 0, sizeof n);
    n.size = sizeof n;
    n.host_region = region;
    n.gpa = gpa;
    n.length = length;
    n.region_offset = offset;
    return n;
}

static npt_flush_hint_info flush_hint(npt_vm *vm) {
    npt_flush_hint_info i;
    memset(&i, 0, sizeof i);
    i.size = sizeof i;
    check_status(npt_vm_get_flush_hint(vm, &i), NPT_OK, "flush_hint: npt_vm_get_flush_hint", __LINE__);
    return i;
}

static npt_flush_stats flush_stats(npt_vm *vm) {
    npt_flush_stats s;
    memset(&s, 0xAB, sizeof s);
    s.size = sizeof s;
    check_status(npt_vm_get_flush_stats(vm, &s), NPT_OK, "flush_stats: npt_vm_get_flush_stats", __LINE__);
    return s;
}

/* A VM of ctx (standard-like platform) with the NVDIMM on region 1, the guest loaded at CODE (its
 * page R|UX: paging is off, where every address is user-mode and Xu governs), and vCPU 0 at CODE
 * with paging off. */
static npt_vm *setup(npt_context *ctx, npt_vcpu **cpu, npt_flush_hint_info *info) {
    npt_vm *vm = make_vm(ctx, NULL, NPT_MBEC_EXACT);
    *cpu = NULL;
    if (!vm) return NULL;
    npt_nvdimm n = nvdimm(1, NV_GPA, NV_LEN, 0);
    CHECK_OK(npt_vm_add_nvdimm(vm, &n));
    *info = flush_hint(vm);
    CHECK_OK(npt_policy_set(vm, CODE, K4, NPT_PAGE_4K, R | UX));
    program p = flush_program(info->vfha);
    CHECK_OK(npt_vm_write_memory(vm, CODE, p.bytes, p.len));
    CHECK_OK(npt_vcpu_create(vm, 0, cpu));
    npt_regs r;
    memset(&r, 0, sizeof r);
    r.size = sizeof r;
    CHECK_OK(npt_vcpu_get_regs(*cpu, &r));
    r.rip = CODE;
    r.cpl = 0;
    r.cr0 = 0; /* paging off: linear = guest-physical */
    CHECK_OK(npt_vcpu_set_regs(*cpu, &r));
    return vm;
}

/* npt_vcpu_run until HLT; returns how many IO exits it saw (-1 on another exit or an error). */
static int run_to_halt(npt_vcpu *cpu) {
    int ios = 0;
    for (int guard = 0; guard < 16; guard++) {
        npt_exit e;
        memset(&e, 0, sizeof e);
        e.size = sizeof e;
        npt_status s = npt_vcpu_run(cpu, &e);
        if (s != NPT_OK) {
            fprintf(stderr, "    npt_vcpu_run: %s (%s)\n", npt_status_string(s), npt_last_error());
            return -1;
        }
        if (e.reason == NPT_EXIT_HALT) return ios;
        if (e.reason == NPT_EXIT_IO && e.io_port == PORT_DURABLE && e.io_value == 1) { ios++; continue; }
        fprintf(stderr, "    unexpected exit %u at rip %#" PRIx64 " gpa %#" PRIx64 "\n", e.reason, e.rip, e.gpa);
        return -1;
    }
    return -1;
}

/* ------------------------------------------------------------------------ */
/* The standard platform: WPQ flushing needed                                 */
/* ------------------------------------------------------------------------ */
static void test_discovery_and_flush(void) {
    npt_context *ctx = NULL;
    CHECK_OK(npt_context_create(&ctx));
    if (!ctx) return;

    /* The simulator advertises the capability. */
    size_t nb = 0;
    CHECK_OK(npt_backend_count(ctx, &nb));
    int sim_has_cap = 0;
    for (size_t i = 0; i < nb; i++) {
        npt_backend_info bi;
        memset(&bi, 0, sizeof bi);
        bi.size = sizeof bi;
        if (npt_backend_get(ctx, i, &bi) == NPT_OK && strcmp(bi.name, "sim") == 0)
            sim_has_cap = (bi.capabilities & NPT_CAP_PERSISTENT_MEMORY) != 0;
    }
    CHECK(sim_has_cap);

    npt_vm *vm = make_vm(ctx, NULL, NPT_MBEC_EXACT);
    if (!vm) { npt_context_destroy(ctx); return; }

    size_t count = 0;
    CHECK_OK(npt_vm_host_pmem_count(vm, &count));
    CHECK_EQ(count, 2);
    npt_host_pmem_region r[2];
    for (size_t i = 0; i < 2; i++) {
        memset(&r[i], 0, sizeof r[i]);
        r[i].size = sizeof r[i];
        CHECK_OK(npt_vm_host_pmem_get(vm, i, &r[i]));
        CHECK_EQ(r[i].size, sizeof r[i]);
    }
    CHECK_EQ(r[0].id, 1);
    CHECK_EQ(r[0].length, UINT64_C(1) << 30);
    CHECK_EQ(r[0].controller_count, 2);
    CHECK_EQ(r[0].flush_target_count, 2);
    CHECK_EQ(r[0].needs_wpq_flush, 1);
    CHECK_EQ(r[1].id, 2);
    CHECK_EQ(r[1].length, UINT64_C(512) << 20);
    CHECK_EQ(r[1].controller_count, 1);
    CHECK_EQ(r[1].needs_wpq_flush, 1);
    CHECK(r[0].base + r[0].length <= r[1].base || r[1].base + r[1].length <= r[0].base);
    npt_host_pmem_region past;
    memset(&past, 0x5A, sizeof past);
    past.size = sizeof past;
    CHECK_ST(npt_vm_host_pmem_get(vm, 2, &past), NPT_ERR_NOT_FOUND);
    CHECK_EQ(past.id, 0x5A5A5A5Au); /* a failed call writes nothing */

    /* No NVDIMM yet: no flush hint, no NFIT, nothing to fail. */
    npt_flush_hint_info info;
    memset(&info, 0, sizeof info);
    info.size = sizeof info;
    CHECK_ST(npt_vm_get_flush_hint(vm, &info), NPT_ERR_STATE);
    size_t needed = 0;
    CHECK_ST(npt_vm_get_nfit(vm, NULL, 0, &needed), NPT_ERR_STATE);
    CHECK_ST(npt_vm_get_nvdimm_ssdt(vm, NULL, 0, &needed), NPT_ERR_STATE);
    CHECK_ERR_MENTIONS("no NVDIMM range");
    CHECK_ST(npt_vm_power_failure(vm), NPT_ERR_STATE);
    uint32_t hr = 0, ctl = 0;
    uint64_t addr = 0;
    CHECK_ST(npt_vm_get_flush_target(vm, 0, &hr, &ctl, &addr), NPT_ERR_STATE);
    CHECK_OK(npt_vm_destroy(vm));

    npt_vcpu *cpu = NULL;
    vm = setup(ctx, &cpu, &info);
    if (!vm || !cpu) { if (vm) npt_vm_destroy(vm); npt_context_destroy(ctx); return; }
    CHECK_EQ(info.size, sizeof info);
    CHECK_EQ(info.trapped, 1);
    CHECK_EQ(info.vfha % K4, 0);
    CHECK(info.vfha >= RAM);
    CHECK(info.vfha + K4 <= NV_GPA || info.vfha >= NV_GPA + NV_LEN);
    CHECK_EQ(info.target_count, 2);
    CHECK_EQ(info.nvdimm_count, 1);
    /* The vFHA is read-only in both hierarchies while it traps. */
    for (uint32_t h = 0; h < NPT_HIERARCHY_COUNT; h++) {
        npt_translation t;
        memset(&t, 0, sizeof t);
        t.size = sizeof t;
        CHECK_OK(npt_hierarchy_translate(vm, h, info.vfha, &t));
        CHECK_EQ(t.perms, R);
    }
    /* The two controllers behind region 1, each with its physical flush hint. */
    uint32_t ctls[2] = {0, 0};
    for (size_t i = 0; i < 2; i++) {
        hr = 0; addr = 0;
        CHECK_OK(npt_vm_get_flush_target(vm, i, &hr, &ctls[i], &addr));
        CHECK_EQ(hr, 1);
        CHECK(addr != 0);
    }
    CHECK(ctls[0] != ctls[1]);
    CHECK_ST(npt_vm_get_flush_target(vm, 2, &hr, &ctl, &addr), NPT_ERR_NOT_FOUND);
    CHECK_ST(npt_vm_get_flush_target(vm, 0, NULL, &ctl, &addr), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_vm_get_flush_target(vm, 0, &hr, NULL, &addr), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_vm_get_flush_target(vm, 0, &hr, &ctl, NULL), NPT_ERR_INVALID_ARGUMENT);

    npt_flush_stats s0 = flush_stats(vm);
    CHECK_EQ(s0.exits, 0);
    CHECK_EQ(s0.reserved, 0);

    CHECK_EQ(run_to_halt(cpu), 1);
    npt_flush_stats s = flush_stats(vm);
    CHECK_EQ(s.size, sizeof s);
    CHECK_EQ(s.guest_flushes, 1);
    CHECK_EQ(s.exits, 1);
    CHECK_EQ(s.physical_flushes, 2); /* region 1 is interleaved over two controllers */
    CHECK_EQ(s.coalesced, 0);
    CHECK_EQ(s.untrapped_writes, 0);
    /* Before the power failure the guest's view holds both records. */
    CHECK_EQ(read_u64(vm, REC1), VAL1);
    CHECK_EQ(read_u64(vm, REC2), VAL2);

    CHECK_OK(npt_vm_power_failure(vm));
    CHECK_EQ(read_u64(vm, REC1), VAL1); /* made durable */
    CHECK_EQ(read_u64(vm, REC2), 0);    /* only stored: lost */

    CHECK_OK(npt_vm_destroy(vm));
    CHECK_OK(npt_context_destroy(ctx));
}

/* ------------------------------------------------------------------------ */
/* ADR platform: no WPQ flushing needed, no exit                              */
/* ------------------------------------------------------------------------ */
static npt_sim_platform sim_platform(int drains, const void *nfit, size_t nfit_len) {
    npt_sim_platform p;
    memset(&p, 0, sizeof p);
    p.size = sizeof p;
    p.wpq_drains_on_power_loss = drains;
    p.nfit = nfit;
    p.nfit_len = nfit_len;
    return p;
}

static void test_adr_platform(void) {
    npt_context *ctx = NULL;
    CHECK_OK(npt_context_create(&ctx));
    if (!ctx) return;
    npt_sim_platform p = sim_platform(1, NULL, 0);
    CHECK_OK(npt_sim_set_platform(ctx, &p));

    npt_vcpu *cpu = NULL;
    npt_flush_hint_info info;
    npt_vm *vm = setup(ctx, &cpu, &info);
    if (!vm || !cpu) { if (vm) npt_vm_destroy(vm); npt_context_destroy(ctx); return; }
    size_t count = 0;
    CHECK_OK(npt_vm_host_pmem_count(vm, &count));
    CHECK_EQ(count, 2);
    npt_host_pmem_region r;
    memset(&r, 0, sizeof r);
    r.size = sizeof r;
    CHECK_OK(npt_vm_host_pmem_get(vm, 0, &r));
    CHECK_EQ(r.needs_wpq_flush, 0);
    CHECK_EQ(r.flush_target_count, 2); /* the hints exist; they are just not needed */

    CHECK_EQ(info.trapped, 0);
    npt_translation t;
    memset(&t, 0, sizeof t);
    t.size = sizeof t;
    CHECK_OK(npt_hierarchy_translate(vm, NPT_HIERARCHY_SUPERVISOR, info.vfha, &t));
    CHECK_EQ(t.perms, R | W);

    CHECK_EQ(run_to_halt(cpu), 1);
    npt_flush_stats s = flush_stats(vm);
    CHECK_EQ(s.exits, 0);
    CHECK_EQ(s.guest_flushes, 0);
    CHECK_EQ(s.physical_flushes, 0);
    CHECK_EQ(s.untrapped_writes, 1);

    CHECK_OK(npt_vm_power_failure(vm));
    CHECK_EQ(read_u64(vm, REC1), VAL1); /* the WPQ drains at the power failure */
    CHECK_EQ(read_u64(vm, REC2), 0);    /* never written back: still lost */

    CHECK_OK(npt_vm_destroy(vm));
    CHECK_OK(npt_context_destroy(ctx));
}

/* ------------------------------------------------------------------------ */
/* Flush options: NEVER loses the record where flushing is needed; ALWAYS      */
/* traps where it is not                                                      */
/* ------------------------------------------------------------------------ */
static void test_flush_options(void) {
    npt_context *ctx = NULL;
    CHECK_OK(npt_context_create(&ctx));
    if (!ctx) return;
    npt_vcpu *cpu = NULL;
    npt_flush_hint_info info;
    npt_vm *vm = setup(ctx, &cpu, &info);
    if (vm && cpu) {
        CHECK_ST(npt_vm_set_flush_options(vm, 3, 1), NPT_ERR_INVALID_ARGUMENT);
        CHECK_ERR_MENTIONS("trap");
        CHECK_EQ(flush_hint(vm).trapped, 1);
        CHECK_OK(npt_vm_set_flush_options(vm, NPT_FLUSH_TRAP_NEVER, 1));
        CHECK_EQ(flush_hint(vm).trapped, 0);
        CHECK_EQ(run_to_halt(cpu), 1);
        npt_flush_stats s = flush_stats(vm);
        CHECK_EQ(s.exits, 0);
        CHECK_EQ(s.untrapped_writes, 1);
        CHECK_OK(npt_vm_power_failure(vm));
        CHECK_EQ(read_u64(vm, REC1), 0); /* deliberately unsafe: the guest's flush did nothing */
        CHECK_OK(npt_vm_set_flush_options(vm, NPT_FLUSH_TRAP_AUTO, 0));
        CHECK_EQ(flush_hint(vm).trapped, 1);
    }
    if (vm) CHECK_OK(npt_vm_destroy(vm));
    CHECK_OK(npt_context_destroy(ctx));

    CHECK_OK(npt_context_create(&ctx));
    if (!ctx) return;
    npt_sim_platform p = sim_platform(1, NULL, 0);
    CHECK_OK(npt_sim_set_platform(ctx, &p));
    vm = make_vm(ctx, NULL, NPT_MBEC_EXACT);
    if (vm) {
        /* Valid before the first NVDIMM range too. */
        CHECK_OK(npt_vm_set_flush_options(vm, NPT_FLUSH_TRAP_ALWAYS, 1));
        npt_nvdimm n = nvdimm(2, NV_GPA, NV_LEN, 0);
        CHECK_OK(npt_vm_add_nvdimm(vm, &n));
        npt_flush_hint_info i = flush_hint(vm);
        CHECK_EQ(i.trapped, 1);
        CHECK_EQ(i.target_count, 1);
        CHECK_OK(npt_vm_destroy(vm));
    }
    CHECK_OK(npt_context_destroy(ctx));
}

/* ------------------------------------------------------------------------ */
/* The raw loop: the vFHA write comes back as an EPT violation                */
/* ------------------------------------------------------------------------ */
static void test_raw_loop(void) {
    npt_context *ctx = NULL;
    CHECK_OK(npt_context_create(&ctx));
    if (!ctx) return;
    npt_vcpu *cpu = NULL;
    npt_flush_hint_info info;
    npt_vm *vm = setup(ctx, &cpu, &info);
    if (!vm || !cpu) { if (vm) npt_vm_destroy(vm); npt_context_destroy(ctx); return; }

    int vfha_exits = 0, vfha_resumed = 0, halted = 0, ios = 0, other = 0;
    for (int guard = 0; guard < 64 && !halted; guard++) {
        npt_exit e;
        memset(&e, 0, sizeof e);
        e.size = sizeof e;
        npt_status st = npt_vcpu_run_raw(cpu, &e);
        if (st != NPT_OK) { CHECK_OK(st); break; }
        uint32_t action = 99;
        int is_vfha = e.reason == NPT_EXIT_EPT_VIOLATION && (e.gpa & ~(K4 - 1)) == info.vfha;
        if (is_vfha) {
            vfha_exits++;
            CHECK(e.qualification & NPT_EPTQ_WRITE);
            /* Not flushed yet: the exit itself did nothing. */
            npt_flush_stats before = flush_stats(vm);
            CHECK_EQ(before.physical_flushes, 0);
        }
        CHECK_OK(npt_handle_exit(cpu, &e, &action));
        if (is_vfha) {
            if (action == NPT_ACTION_RESUME) vfha_resumed++;
            npt_flush_stats after = flush_stats(vm);
            CHECK_EQ(after.physical_flushes, 2);
            CHECK_EQ(after.guest_flushes, 1);
        } else if (e.reason == NPT_EXIT_HALT) {
            CHECK_EQ(action, NPT_ACTION_TOOL);
            halted = 1;
        } else if (e.reason == NPT_EXIT_IO) {
            CHECK_EQ(action, NPT_ACTION_TOOL);
            ios++;
        } else if (action != NPT_ACTION_RESUME) {
            other++;
            fprintf(stderr, "    raw loop: exit %u, action %u\n", e.reason, action);
        }
    }
    CHECK_EQ(vfha_exits, 1);
    CHECK_EQ(vfha_resumed, 1);
    CHECK_EQ(ios, 1);
    CHECK(halted);
    CHECK_EQ(other, 0);
    npt_flush_stats s = flush_stats(vm);
    CHECK_EQ(s.exits, 1);
    CHECK_EQ(s.untrapped_writes, 0);
    CHECK_OK(npt_vm_power_failure(vm));
    CHECK_EQ(read_u64(vm, REC1), VAL1);
    CHECK_EQ(read_u64(vm, REC2), 0);
    CHECK_OK(npt_vm_destroy(vm));
    CHECK_OK(npt_context_destroy(ctx));
}

/* ------------------------------------------------------------------------ */
/* The guest's NFIT                                                           */
/* ------------------------------------------------------------------------ */
static uint32_t le32(const uint8_t *p) { return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24; }
static uint16_t le16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint64_t le64(const uint8_t *p) { return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32; }

static void test_guest_nfit(void) {
    npt_context *ctx = NULL;
    CHECK_OK(npt_context_create(&ctx));
    if (!ctx) return;
    npt_vcpu *cpu = NULL;
    npt_flush_hint_info info;
    npt_vm *vm = setup(ctx, &cpu, &info);
    if (!vm) { npt_context_destroy(ctx); return; }

    size_t needed = 0;
    CHECK_ST(npt_vm_get_nfit(vm, NULL, 0, &needed), NPT_ERR_BUFFER_TOO_SMALL);
    CHECK(needed > 40);
    CHECK_ST(npt_vm_get_nfit(vm, NULL, 16, &needed), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_vm_get_nfit(vm, NULL, 0, NULL), NPT_ERR_INVALID_ARGUMENT);
    uint8_t *buf = malloc(needed + 8);
    if (!buf) { CHECK(buf != NULL); npt_vm_destroy(vm); npt_context_destroy(ctx); return; }
    memset(buf, 0xEE, needed + 8);
    size_t again = 0;
    CHECK_ST(npt_vm_get_nfit(vm, buf, needed - 1, &again), NPT_ERR_BUFFER_TOO_SMALL);
    CHECK_EQ(again, needed);
    CHECK_EQ(buf[0], 0xEE); /* too small: nothing copied */

    again = 0;
    CHECK_OK(npt_vm_get_nfit(vm, buf, needed + 8, &again));
    CHECK_EQ(again, needed);
    CHECK(memcmp(buf, "NFIT", 4) == 0);
    CHECK_EQ(le32(buf + 4), needed);
    CHECK_EQ(buf[needed], 0xEE); /* nothing past the table */
    uint8_t sum = 0;
    for (size_t i = 0; i < needed; i++) sum = (uint8_t)(sum + buf[i]);
    CHECK_EQ(sum, 0);

    /* Sub-structures from offset 40 (36-byte header + 4 reserved). */
    int spa_ok = 0, hint_has_vfha = 0, walked = 1;
    for (size_t o = 40; o < needed;) {
        uint16_t type = le16(buf + o), len = le16(buf + o + 2);
        if (len < 4 || o + len > needed) { walked = 0; break; }
        if (type == 0 && len == 56 && le64(buf + o + 32) == NV_GPA && le64(buf + o + 40) == NV_LEN) spa_ok = 1;
        if (type == 6 && len >= 16) {
            uint16_t n = le16(buf + o + 8);
            for (uint16_t k = 0; k < n && 16u + 8u * k + 8u <= len; k++)
                if (le64(buf + o + 16 + 8 * k) == info.vfha) hint_has_vfha = 1;
        }
        o += len;
    }
    CHECK(walked);
    CHECK(spa_ok);
    CHECK(hint_has_vfha);
    free(buf);
    CHECK_OK(npt_vm_destroy(vm));
    CHECK_OK(npt_context_destroy(ctx));
}

/* ------------------------------------------------------------------------ */
/* The guest's SSDT (ABI 1.2): the NVDIMM root device and one child per DIMM   */
/* ------------------------------------------------------------------------ */
/* The AML integer at p (ZeroOp, OneOp, Byte/Word/DWord/QWordPrefix); *len gets its size, 0 if none. */
static uint64_t aml_integer(const uint8_t *p, size_t *len) {
    switch (p[0]) {
    case 0x00: *len = 1; return 0;
    case 0x01: *len = 1; return 1;
    case 0x0A: *len = 2; return p[1];
    case 0x0B: *len = 3; return le16(p + 1);
    case 0x0C: *len = 5; return le32(p + 1);
    case 0x0E: *len = 9; return le64(p + 1);
    default: *len = 0; return 0;
    }
}

static void test_guest_ssdt(void) {
    npt_context *ctx = NULL;
    CHECK_OK(npt_context_create(&ctx));
    if (!ctx) return;
    npt_vcpu *cpu = NULL;
    npt_flush_hint_info info;
    npt_vm *vm = setup(ctx, &cpu, &info);
    if (!vm) { npt_context_destroy(ctx); return; }
    /* A second DIMM, so that the children's handles can be told apart. */
    npt_nvdimm two = nvdimm(2, NV_GPA + 0x40000000, NV_LEN, 0);
    CHECK_OK(npt_vm_add_nvdimm(vm, &two));

    size_t needed = 0;
    CHECK_ST(npt_vm_get_nvdimm_ssdt(vm, NULL, 0, &needed), NPT_ERR_BUFFER_TOO_SMALL);
    CHECK(needed > 36);
    CHECK_ST(npt_vm_get_nvdimm_ssdt(vm, NULL, 16, &needed), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ERR_MENTIONS("buf is NULL");
    CHECK_ST(npt_vm_get_nvdimm_ssdt(vm, NULL, 0, NULL), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ERR_MENTIONS("needed");
    CHECK_ST(npt_vm_get_nvdimm_ssdt(NULL, NULL, 0, &needed), NPT_ERR_INVALID_ARGUMENT);
    uint8_t *buf = malloc(needed + 8);
    if (!buf) { CHECK(buf != NULL); npt_vm_destroy(vm); npt_context_destroy(ctx); return; }
    memset(buf, 0xEE, needed + 8);
    size_t again = 0;
    CHECK_ST(npt_vm_get_nvdimm_ssdt(vm, buf, needed - 1, &again), NPT_ERR_BUFFER_TOO_SMALL);
    CHECK_EQ(again, needed);
    CHECK_EQ(buf[0], 0xEE); /* too small: nothing copied */
    CHECK_ERR_MENTIONS("SSDT");
    again = 0;
    CHECK_OK(npt_vm_get_nvdimm_ssdt(vm, buf, needed + 8, &again));
    CHECK_EQ(again, needed);
    CHECK(memcmp(buf, "SSDT", 4) == 0);
    CHECK_EQ(le32(buf + 4), needed);
    CHECK_EQ(buf[8], 2); /* revision 2: 64-bit AML integers */
    CHECK_EQ(buf[needed], 0xEE);
    uint8_t sum = 0;
    for (size_t i = 0; i < needed; i++) sum = (uint8_t)(sum + buf[i]);
    CHECK_EQ(sum, 0);
    /* The root device's _HID, then each child's _ADR: Name (_ADR, integer). */
    int hid = 0;
    for (size_t o = 36; o + 13 <= needed; o++)
        if (memcmp(buf + o, "_HID\x0D" "ACPI0012", 13) == 0) hid = 1;
    CHECK(hid);
    uint64_t adr[8];
    size_t nadr = 0;
    for (size_t o = 36; o + 6 <= needed && nadr < 8; o++) {
        if (buf[o] == 0x08 && memcmp(buf + o + 1, "_ADR", 4) == 0) {
            size_t len = 0;
            adr[nadr] = aml_integer(buf + o + 5, &len);
            if (len) nadr++;
        }
    }
    CHECK_EQ(nadr, 2);

    /* The handles agree with the NFIT's memory-device maps (type 1, handle at +4). */
    size_t nfit_len = 0;
    CHECK_ST(npt_vm_get_nfit(vm, NULL, 0, &nfit_len), NPT_ERR_BUFFER_TOO_SMALL);
    uint8_t *nfit = malloc(nfit_len);
    if (nfit) {
        CHECK_OK(npt_vm_get_nfit(vm, nfit, nfit_len, &nfit_len));
        size_t maps = 0, dcrs = 0, caps = 0;
        for (size_t o = 40; o + 4 <= nfit_len;) {
            uint16_t type = le16(nfit + o), len = le16(nfit + o + 2);
            if (len < 4) break;
            if (type == 1) {
                CHECK(maps < nadr && le32(nfit + o + 4) == adr[maps]);
                CHECK(le16(nfit + o + 14) != 0); /* each map names a control region */
                maps++;
            }
            if (type == 4) { CHECK_EQ(len, 80); dcrs++; }
            if (type == 7) { CHECK_EQ(len, 16); CHECK_EQ(nfit[o + 4], 1); CHECK_EQ(le32(nfit + o + 8), 0); caps++; }
            o += len;
        }
        CHECK_EQ(maps, 2);
        CHECK_EQ(dcrs, 2);
        CHECK_EQ(caps, 1); /* the standard platform needs WPQ flushing: no capability bit */
        free(nfit);
    }
    free(buf);
    CHECK_OK(npt_vm_destroy(vm));
    CHECK_ST(npt_vm_get_nvdimm_ssdt(vm, NULL, 0, &needed), NPT_ERR_BAD_HANDLE);
    CHECK_OK(npt_context_destroy(ctx));
}

/* ------------------------------------------------------------------------ */
/* npt_sim_set_platform with an NFIT binary                                   */
/* ------------------------------------------------------------------------ */
static uint8_t *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    uint8_t *buf = NULL;
    size_t cap = 0, n = 0;
    for (;;) {
        if (n == cap) {
            cap = cap ? cap * 2 : 4096;
            uint8_t *b = realloc(buf, cap);
            if (!b) { free(buf); fclose(f); return NULL; }
            buf = b;
        }
        size_t got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) break;
    }
    fclose(f);
    *len = n;
    return buf;
}

static void test_nfit_platform(const char *fixture) {
    size_t len = 0;
    uint8_t *aml = read_file(fixture, &len);
    check(aml != NULL, "the NFIT fixture is readable", __LINE__);
    if (!aml) { fprintf(stderr, "    cannot read %s\n", fixture); return; }
    CHECK(len > 40 && memcmp(aml, "NFIT", 4) == 0);

    npt_context *ctx = NULL;
    CHECK_OK(npt_context_create(&ctx));
    if (!ctx) { free(aml); return; }

    /* Bad input first: each leaves the standard platform in place. */
    CHECK_ST(npt_sim_set_platform(ctx, NULL), NPT_ERR_INVALID_ARGUMENT);
    npt_sim_platform p = sim_platform(0, aml, len);
    p.size = 4;
    CHECK_ST(npt_sim_set_platform(ctx, &p), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ERR_MENTIONS("size");
    p = sim_platform(0, aml, 0);
    CHECK_ST(npt_sim_set_platform(ctx, &p), NPT_ERR_INVALID_ARGUMENT);
    p = sim_platform(0, NULL, 16);
    CHECK_ST(npt_sim_set_platform(ctx, &p), NPT_ERR_INVALID_ARGUMENT);
    uint8_t *bad = malloc(len);
    if (bad) {
        memcpy(bad, aml, len);
        bad[60] ^= 0x40; /* inside the first SPA range: the checksum no longer holds */
        p = sim_platform(0, bad, len);
        CHECK_ST(npt_sim_set_platform(ctx, &p), NPT_ERR_INVALID_ARGUMENT);
        CHECK_ERR_MENTIONS("NFIT");
        CHECK_ERR_MENTIONS("checksum");
        p = sim_platform(0, aml, 20); /* truncated below the header */
        CHECK_ST(npt_sim_set_platform(ctx, &p), NPT_ERR_INVALID_ARGUMENT);
        CHECK_ERR_MENTIONS("NFIT");
        free(bad);
    }
    CHECK_ST(npt_sim_set_platform(NULL, &p), NPT_ERR_INVALID_ARGUMENT);

    /* `old` is created on the standard platform and has asked nothing yet. */
    npt_vm *old = make_vm(ctx, NULL, NPT_MBEC_EXACT);

    p = sim_platform(0, aml, len);
    CHECK_OK(npt_sim_set_platform(ctx, &p));
    if (old) {
        /* A VM keeps the platform it was created on: discovery, backing and flush targets agree. */
        npt_host_pmem_region r;
        memset(&r, 0, sizeof r);
        r.size = sizeof r;
        CHECK_OK(npt_vm_host_pmem_get(old, 0, &r));
        CHECK_EQ(r.length, UINT64_C(1) << 30);
        npt_nvdimm n = nvdimm(1, NV_GPA, NV_LEN, UINT64_C(3) << 30); /* inside the NFIT's region 1 only */
        CHECK_ST(npt_vm_add_nvdimm(old, &n), NPT_ERR_OUT_OF_RANGE);
        n = nvdimm(1, NV_GPA, NV_LEN, 0);
        CHECK_OK(npt_vm_add_nvdimm(old, &n));
        uint32_t hr = 0, ctl = 0;
        uint64_t addr = 0;
        CHECK_OK(npt_vm_get_flush_target(old, 0, &hr, &ctl, &addr));
        CHECK(addr != 0 && addr != UINT64_C(0xC0000000));
        CHECK_OK(npt_vm_destroy(old));
    }
    npt_vm *vm = make_vm(ctx, NULL, NPT_MBEC_EXACT);
    if (vm) {
        size_t count = 0;
        CHECK_OK(npt_vm_host_pmem_count(vm, &count));
        CHECK_EQ(count, 2);
        npt_host_pmem_region r;
        memset(&r, 0, sizeof r);
        r.size = sizeof r;
        CHECK_OK(npt_vm_host_pmem_get(vm, 0, &r));
        CHECK_EQ(r.id, 1);
        CHECK_EQ(r.base, UINT64_C(0x240000000));
        CHECK_EQ(r.length, UINT64_C(0x100000000));
        CHECK_EQ(r.controller_count, 2);
        CHECK_EQ(r.flush_target_count, 2);
        CHECK_EQ(r.needs_wpq_flush, 1);
        CHECK_OK(npt_vm_host_pmem_get(vm, 1, &r));
        CHECK_EQ(r.id, 2);
        CHECK_EQ(r.base, UINT64_C(0x340000000));
        CHECK_EQ(r.controller_count, 1);

        npt_nvdimm n = nvdimm(1, NV_GPA, NV_LEN, 0);
        CHECK_OK(npt_vm_add_nvdimm(vm, &n));
        npt_flush_hint_info i = flush_hint(vm);
        CHECK_EQ(i.trapped, 1);
        CHECK_EQ(i.target_count, 2);
        uint32_t hr = 0, ctl = 0;
        uint64_t addr = 0;
        CHECK_OK(npt_vm_get_flush_target(vm, 0, &hr, &ctl, &addr));
        CHECK_EQ(addr, UINT64_C(0xC0000000));
        CHECK_OK(npt_vm_get_flush_target(vm, 1, &hr, &ctl, &addr));
        CHECK_EQ(addr, UINT64_C(0xC0010000));

        /* A VM with NVDIMM ranges on the current platform: the platform stays. */
        npt_sim_platform std = sim_platform(0, NULL, 0);
        CHECK_ST(npt_sim_set_platform(ctx, &std), NPT_ERR_BUSY);
        CHECK_OK(npt_vm_destroy(vm));
        CHECK_OK(npt_sim_set_platform(ctx, &std));
    }

    /* The same NFIT with the WPQs declared inside the persistence domain. */
    p = sim_platform(1, aml, len);
    CHECK_OK(npt_sim_set_platform(ctx, &p));
    vm = make_vm(ctx, NULL, NPT_MBEC_EXACT);
    if (vm) {
        npt_host_pmem_region r;
        memset(&r, 0, sizeof r);
        r.size = sizeof r;
        CHECK_OK(npt_vm_host_pmem_get(vm, 0, &r));
        CHECK_EQ(r.base, UINT64_C(0x240000000));
        CHECK_EQ(r.needs_wpq_flush, 0);
        npt_nvdimm n = nvdimm(2, NV_GPA, NV_LEN, 0);
        CHECK_OK(npt_vm_add_nvdimm(vm, &n));
        CHECK_EQ(flush_hint(vm).trapped, 0);
        CHECK_OK(npt_vm_destroy(vm));
    }
    CHECK_OK(npt_context_destroy(ctx));
    free(aml);
}

/* ------------------------------------------------------------------------ */
/* Bad input: each refused with its status, the VM unchanged                  */
/* ------------------------------------------------------------------------ */
static void expect_unchanged(npt_vm *vm, uint64_t vfha, int line) {
    npt_flush_hint_info i;
    memset(&i, 0, sizeof i);
    i.size = sizeof i;
    check_status(npt_vm_get_flush_hint(vm, &i), NPT_OK, "expect_unchanged: npt_vm_get_flush_hint", line);
    check_u64(i.nvdimm_count, 1, "nvdimm_count after a refused call", line);
    check_u64(i.vfha, vfha, "vfha after a refused call", line);
    check_u64(i.target_count, 2, "target_count after a refused call", line);
}

static void test_bad_input(void) {
    npt_context *ctx = NULL;
    CHECK_OK(npt_context_create(&ctx));
    if (!ctx) return;
    npt_vm *vm = make_vm(ctx, NULL, NPT_MBEC_EXACT);
    if (!vm) { npt_context_destroy(ctx); return; }
    npt_nvdimm good = nvdimm(1, NV_GPA, NV_LEN, 0);

    /* NULL handles and pointers */
    CHECK_ST(npt_vm_add_nvdimm(NULL, &good), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ERR_MENTIONS("vm");
    CHECK_ST(npt_vm_add_nvdimm(vm, NULL), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ERR_MENTIONS("nvdimm");
    size_t count = 0;
    CHECK_ST(npt_vm_host_pmem_count(NULL, &count), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_vm_host_pmem_count(vm, NULL), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_vm_host_pmem_get(vm, 0, NULL), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ERR_MENTIONS("out");
    CHECK_ST(npt_vm_get_flush_hint(vm, NULL), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ERR_MENTIONS("info");
    CHECK_ST(npt_vm_get_flush_stats(vm, NULL), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_vm_get_flush_hint(NULL, NULL), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_vm_power_failure(NULL), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_vm_set_flush_options(NULL, NPT_FLUSH_TRAP_AUTO, 1), NPT_ERR_INVALID_ARGUMENT);

    /* bad struct sizes */
    npt_nvdimm small = good;
    small.size = 8;
    CHECK_ST(npt_vm_add_nvdimm(vm, &small), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ERR_MENTIONS("nvdimm->size");
    npt_host_pmem_region r;
    memset(&r, 0, sizeof r);
    r.size = 4;
    CHECK_ST(npt_vm_host_pmem_get(vm, 0, &r), NPT_ERR_INVALID_ARGUMENT);
    npt_flush_stats fs;
    memset(&fs, 0, sizeof fs);
    fs.size = 8;
    CHECK_ST(npt_vm_get_flush_stats(vm, &fs), NPT_ERR_INVALID_ARGUMENT);

    /* nothing was added by any of that */
    npt_flush_hint_info i;
    memset(&i, 0, sizeof i);
    i.size = sizeof i;
    CHECK_ST(npt_vm_get_flush_hint(vm, &i), NPT_ERR_STATE);

    CHECK_OK(npt_vm_add_nvdimm(vm, &good));
    npt_flush_hint_info base = flush_hint(vm);
    CHECK_EQ(base.nvdimm_count, 1);

    npt_flush_hint_info tiny;
    memset(&tiny, 0, sizeof tiny);
    tiny.size = 4;
    CHECK_ST(npt_vm_get_flush_hint(vm, &tiny), NPT_ERR_INVALID_ARGUMENT);

    npt_nvdimm n = nvdimm(2, NV_GPA + 0x40000000 + 0x800, NV_LEN, 0);
    CHECK_ST(npt_vm_add_nvdimm(vm, &n), NPT_ERR_MISALIGNED);
    CHECK_ERR_MENTIONS("gpa");
    expect_unchanged(vm, base.vfha, __LINE__);
    n = nvdimm(2, NV_GPA + 0x40000000, NV_LEN + 0x10, 0);
    CHECK_ST(npt_vm_add_nvdimm(vm, &n), NPT_ERR_MISALIGNED);
    expect_unchanged(vm, base.vfha, __LINE__);
    n = nvdimm(2, NV_GPA + 0x40000000, NV_LEN, 0x200);
    CHECK_ST(npt_vm_add_nvdimm(vm, &n), NPT_ERR_MISALIGNED);
    expect_unchanged(vm, base.vfha, __LINE__);
    n = nvdimm(2, 0x200000, NV_LEN, 0); /* inside RAM */
    CHECK_ST(npt_vm_add_nvdimm(vm, &n), NPT_ERR_OVERLAP);
    expect_unchanged(vm, base.vfha, __LINE__);
    n = nvdimm(2, NV_GPA + M2 / 2, NV_LEN, 0); /* over the first NVDIMM range */
    CHECK_ST(npt_vm_add_nvdimm(vm, &n), NPT_ERR_OVERLAP);
    expect_unchanged(vm, base.vfha, __LINE__);
    n = nvdimm(2, base.vfha, K4, 0); /* over the vFHA */
    CHECK_ST(npt_vm_add_nvdimm(vm, &n), NPT_ERR_OVERLAP);
    expect_unchanged(vm, base.vfha, __LINE__);
    n = nvdimm(1, NV_GPA + 0x40000000, NV_LEN, M2 / 2); /* host region 1 range already backs the first */
    CHECK_ST(npt_vm_add_nvdimm(vm, &n), NPT_ERR_OVERLAP);
    expect_unchanged(vm, base.vfha, __LINE__);
    n = nvdimm(7, NV_GPA + 0x40000000, NV_LEN, 0);
    CHECK_ST(npt_vm_add_nvdimm(vm, &n), NPT_ERR_NOT_FOUND);
    CHECK_ERR_MENTIONS("7");
    expect_unchanged(vm, base.vfha, __LINE__);
    n = nvdimm(2, NV_GPA + 0x40000000, NV_LEN, (UINT64_C(512) << 20) - M2 / 2); /* past region 2's end */
    CHECK_ST(npt_vm_add_nvdimm(vm, &n), NPT_ERR_OUT_OF_RANGE);
    expect_unchanged(vm, base.vfha, __LINE__);
    n = nvdimm(2, UINT64_C(1) << 48, NV_LEN, 0); /* past the 48-bit guest-physical space */
    CHECK_ST(npt_vm_add_nvdimm(vm, &n), NPT_ERR_OUT_OF_RANGE);
    expect_unchanged(vm, base.vfha, __LINE__);
    n = nvdimm(2, NV_GPA + 0x40000000, 0, 0);
    CHECK_ST(npt_vm_add_nvdimm(vm, &n), NPT_ERR_INVALID_ARGUMENT);
    expect_unchanged(vm, base.vfha, __LINE__);
    CHECK_ST(npt_vm_set_flush_options(vm, 7, 1), NPT_ERR_INVALID_ARGUMENT);
    CHECK_EQ(flush_hint(vm).trapped, 1);

    /* A second, valid range on region 2 adds its controller; the vFHA stays. */
    n = nvdimm(2, NV_GPA + 0x40000000, NV_LEN, 0);
    CHECK_OK(npt_vm_add_nvdimm(vm, &n));
    npt_flush_hint_info two = flush_hint(vm);
    CHECK_EQ(two.nvdimm_count, 2);
    CHECK_EQ(two.vfha, base.vfha);
    CHECK_EQ(two.target_count, 3);

    /* A destroyed VM's handle is refused by every call. */
    CHECK_OK(npt_vm_destroy(vm));
    CHECK_ST(npt_vm_add_nvdimm(vm, &good), NPT_ERR_BAD_HANDLE);
    CHECK_ST(npt_vm_host_pmem_count(vm, &count), NPT_ERR_BAD_HANDLE);
    memset(&i, 0, sizeof i);
    i.size = sizeof i;
    CHECK_ST(npt_vm_get_flush_hint(vm, &i), NPT_ERR_BAD_HANDLE);
    CHECK_ST(npt_vm_power_failure(vm), NPT_ERR_BAD_HANDLE);
    size_t needed = 0;
    CHECK_ST(npt_vm_get_nfit(vm, NULL, 0, &needed), NPT_ERR_BAD_HANDLE);
    CHECK_ST(npt_vm_set_flush_options(vm, NPT_FLUSH_TRAP_AUTO, 1), NPT_ERR_BAD_HANDLE);
    memset(&fs, 0, sizeof fs);
    fs.size = sizeof fs;
    CHECK_ST(npt_vm_get_flush_stats(vm, &fs), NPT_ERR_BAD_HANDLE);
    CHECK_OK(npt_context_destroy(ctx));
    npt_sim_platform p = sim_platform(0, NULL, 0);
    CHECK_ST(npt_sim_set_platform(ctx, &p), NPT_ERR_BAD_HANDLE);
}

/* ------------------------------------------------------------------------ */
/* A C backend that claims NPT_CAP_PERSISTENT_MEMORY                          */
/* ------------------------------------------------------------------------ */
static struct { uint8_t ram[64 * 1024]; int vcpu; } cb;

static npt_status cb_vm_create(void *backend_data, npt_vm *vm, const npt_vm_config *config, void **vm_data) {
    (void)backend_data;
    (void)vm;
    (void)config; /* memory past cb.ram is refused by memory_read/memory_write */
    *vm_data = &cb;
    return NPT_OK;
}
static void cb_vm_destroy(void *vm_data) { (void)vm_data; }
static npt_status cb_write(void *vm_data, uint64_t gpa, const void *data, size_t len) {
    (void)vm_data;
    if (gpa > sizeof cb.ram || len > sizeof cb.ram - gpa) return NPT_ERR_OUT_OF_RANGE;
    memcpy(cb.ram + gpa, data, len);
    return NPT_OK;
}
static npt_status cb_read(void *vm_data, uint64_t gpa, void *data, size_t len) {
    (void)vm_data;
    if (gpa > sizeof cb.ram || len > sizeof cb.ram - gpa) return NPT_ERR_OUT_OF_RANGE;
    memcpy(data, cb.ram + gpa, len);
    return NPT_OK;
}
static npt_status cb_invalidate(void *vm_data, uint32_t h, uint64_t gpa, uint64_t size) {
    (void)vm_data;
    (void)h;
    (void)gpa;
    (void)size;
    return NPT_OK;
}

#define CB_CAPS (NPT_CAP_MBEC_EMULATION | NPT_CAP_EXIT_ON_ESCALATE | NPT_CAP_EXIT_ON_RETURN | NPT_CAP_LINEAR_MODE_INFO | \
                 NPT_CAP_PERSISTENT_MEMORY)

static const npt_backend_ops claiming_ops = {
    .abi_version = NPT_ABI_VERSION,
    .size = sizeof(npt_backend_ops),
    .name = "c-claims-pmem",
    .description = "claims NPT_CAP_PERSISTENT_MEMORY without the operations",
    .capabilities = CB_CAPS,
    .backend_data = &cb,
    .vm_create = cb_vm_create,
    .vm_destroy = cb_vm_destroy,
    .memory_write = cb_write,
    .memory_read = cb_read,
    .invalidate = cb_invalidate,
};

static void test_c_backend(void) {
    npt_context *ctx = NULL;
    CHECK_OK(npt_context_create(&ctx));
    if (!ctx) return;
    CHECK_OK(npt_backend_register(ctx, &claiming_ops));
    size_t nb = 0;
    CHECK_OK(npt_backend_count(ctx, &nb));
    int found = 0;
    for (size_t i = 0; i < nb; i++) {
        npt_backend_info bi;
        memset(&bi, 0, sizeof bi);
        bi.size = sizeof bi;
        if (npt_backend_get(ctx, i, &bi) == NPT_OK && strcmp(bi.name, "c-claims-pmem") == 0) {
            found = 1;
            /* The core drops the bit: the table has none of the persistent-memory operations. */
            CHECK_EQ(bi.capabilities, CB_CAPS & ~NPT_CAP_PERSISTENT_MEMORY);
        }
    }
    CHECK(found);

    npt_vm *vm = make_vm(ctx, "c-claims-pmem", NPT_MBEC_EXACT);
    if (vm) {
        npt_nvdimm n = nvdimm(1, NV_GPA, NV_LEN, 0);
        CHECK_ST(npt_vm_add_nvdimm(vm, &n), NPT_ERR_UNSUPPORTED);
        CHECK_ERR_MENTIONS("c-claims-pmem");
        size_t count = 99;
        CHECK_ST(npt_vm_host_pmem_count(vm, &count), NPT_ERR_UNSUPPORTED);
        CHECK_EQ(count, 99);
        npt_flush_hint_info i;
        memset(&i, 0, sizeof i);
        i.size = sizeof i;
        CHECK_ST(npt_vm_get_flush_hint(vm, &i), NPT_ERR_STATE);
        CHECK_ST(npt_vm_power_failure(vm), NPT_ERR_STATE);
        /* Its memory still works. */
        uint8_t b = 0x5C, back = 0;
        CHECK_OK(npt_vm_write_memory(vm, 0x100, &b, 1));
        CHECK_OK(npt_vm_read_memory(vm, 0x100, &back, 1));
        CHECK_EQ(back, 0x5C);
        CHECK_OK(npt_vm_destroy(vm));
    }
    /* The context's simulator is still there: npt_sim_set_platform finds it by name. */
    npt_sim_platform p = sim_platform(1, NULL, 0);
    CHECK_OK(npt_sim_set_platform(ctx, &p));
    CHECK_OK(npt_context_destroy(ctx));
}

int main(int argc, char **argv) {
    const char *fixture = argc > 1 ? argv[1] : "Tests/Fixtures/nfit/nfit.aml";
    CHECK_EQ(npt_abi_version(), NPT_ABI_VERSION);
    CHECK(NPT_ABI_VERSION_MINOR >= 2u);
    CHECK(npt_abi_version() >= ((UINT32_C(1) << 16) | 2u)); /* these calls need ABI 1.1, the SSDT 1.2 */

    test_discovery_and_flush();
    test_adr_platform();
    test_flush_options();
    test_raw_loop();
    test_guest_nfit();
    test_guest_ssdt();
    test_nfit_platform(fixture);
    test_bad_input();
    test_c_backend();

    printf("c-test test_nvdimm: %d passed, %d failed\n", passed, failed);
    return failed > 0 ? 1 : 0;
}
