/*
 * test_api.c - the C ABI of libnptkit.so (include/nptkit.h), exercised from C.
 *
 * Build: cc -std=c11 -Wall -Wextra -Werror -pedantic -pthread -Iinclude Tests/C/test_api.c \
 *           -L$BIN -lnptkit -Wl,-rpath,$BIN -o test_api
 * Prints one line "c-test test_api: N passed, M failed" at the end; exits 1 if M > 0.
 */
#define _POSIX_C_SOURCE 200809L
#include <nptkit.h>

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ------------------------------------------------------------------------ */
/* Assertions                                                                 */
/* ------------------------------------------------------------------------ */
static int passed, failed;

static void check(int ok, const char *what, int line) {
    if (ok) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL test_api.c:%d: %s\n", line, what);
    }
}

static void check_status(npt_status got, npt_status want, const char *call, int line) {
    if (got == want) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL test_api.c:%d: %s\n    expected %s\n    got      %s\n    last error: %s\n", line, call,
                npt_status_string(want), npt_status_string(got), npt_last_error());
    }
}

static void check_status2(npt_status got, npt_status a, npt_status b, const char *call, int line) {
    if (got == a || got == b) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL test_api.c:%d: %s\n    expected %s or %s\n    got      %s\n", line, call,
                npt_status_string(a), npt_status_string(b), npt_status_string(got));
    }
}

static void check_u64(uint64_t got, uint64_t want, const char *what, int line) {
    if (got == want) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL test_api.c:%d: %s == %#" PRIx64 ", expected %#" PRIx64 "\n", line, what, got, want);
    }
}

#define CHECK(cond) check(!!(cond), #cond, __LINE__)
#define CHECK_ST(call, want) check_status((call), (want), #call, __LINE__)
#define CHECK_ST2(call, a, b) check_status2((call), (a), (b), #call, __LINE__)
#define CHECK_OK(call) check_status((call), NPT_OK, #call, __LINE__)
#define CHECK_EQ(got, want) check_u64((uint64_t)(got), (uint64_t)(want), #got, __LINE__)
/* The detail of the last failure names the offending argument. */
#define CHECK_ERR_MENTIONS(word) check(strstr(npt_last_error(), (word)) != NULL, "npt_last_error() mentions \"" word "\"", __LINE__)

/* ------------------------------------------------------------------------ */
/* Helpers                                                                    */
/* ------------------------------------------------------------------------ */
#define R NPT_PERM_READ
#define W NPT_PERM_WRITE
#define SX NPT_PERM_SX
#define UX NPT_PERM_UX
#define X_BIT (UINT64_C(1) << 2) /* the one execute bit of a hierarchy */
#define K4 UINT64_C(0x1000)
#define M1 (UINT64_C(1) << 20)
#define M2 (UINT64_C(1) << 21)

static npt_vm_config vm_config(const char *backend, uint64_t ram, uint64_t default_perms, uint32_t mode) {
    npt_vm_config c;
    memset(&c, 0, sizeof c);
    c.size = sizeof c;
    c.mbec_mode = mode;
    c.backend = backend;
    c.ram_size = ram;
    c.default_perms = default_perms;
    return c;
}

static npt_vm *make_vm(npt_context *ctx, uint64_t ram, uint64_t default_perms, uint32_t mode, uint64_t budget) {
    npt_vm_config c = vm_config(NULL, ram, default_perms, mode);
    c.max_steps_per_run = budget;
    npt_vm *vm = NULL;
    npt_status s = npt_vm_create(ctx, &c, &vm);
    check_status(s, NPT_OK, "make_vm: npt_vm_create", __LINE__);
    return s == NPT_OK ? vm : NULL;
}

static uint64_t policy_at(npt_vm *vm, uint64_t gpa) {
    uint64_t p = UINT64_C(0xdeadbeef);
    npt_status s = npt_policy_get(vm, gpa, &p);
    if (s != NPT_OK) {
        fprintf(stderr, "    npt_policy_get(%#" PRIx64 ") failed: %s\n", gpa, npt_status_string(s));
        return UINT64_C(0xdeadbeef);
    }
    return p;
}

static npt_translation translate(npt_vm *vm, uint32_t h, uint64_t gpa) {
    npt_translation t;
    memset(&t, 0xAB, sizeof t);
    t.size = sizeof t;
    npt_status s = npt_hierarchy_translate(vm, h, gpa, &t);
    if (s != NPT_OK) {
        fprintf(stderr, "    npt_hierarchy_translate(%u, %#" PRIx64 ") failed: %s\n", h, gpa, npt_status_string(s));
        memset(&t, 0, sizeof t);
    }
    return t;
}

static npt_stats stats_of(npt_vm *vm) {
    npt_stats st;
    memset(&st, 0, sizeof st);
    st.size = sizeof st;
    check_status(npt_vm_get_stats(vm, &st), NPT_OK, "npt_vm_get_stats", __LINE__);
    return st;
}

static npt_regs regs_init(void) {
    npt_regs r;
    memset(&r, 0, sizeof r);
    r.size = sizeof r;
    r.rflags = 2;
    return r;
}

static npt_exit exit_init(void) {
    npt_exit e;
    memset(&e, 0, sizeof e);
    e.size = sizeof e;
    return e;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* ---- the guest ISA (docs/guest-isa.md) ---------------------------------- */
enum {
    OP_NOP = 0x00, OP_MOVI = 0x01, OP_MOVHI = 0x02, OP_MOV = 0x03, OP_ADD = 0x04, OP_ADDI = 0x05,
    OP_LOAD = 0x06, OP_STORE = 0x07, OP_JMP = 0x08, OP_JMPR = 0x09, OP_JZ = 0x0A, OP_JNZ = 0x0B,
    OP_SYSCALL = 0x0C, OP_SYSRET = 0x0D, OP_HLT = 0x0E, OP_OUT = 0x0F, OP_MOVCR3 = 0x10,
    OP_IRET = 0x11, OP_SUB = 0x12, OP_RSM = 0x13,
    OP_INVALID = 0x7F
};

/* One 8-byte instruction: opcode, a, b, 0, imm32 little-endian. */
static void emit(uint8_t *buf, size_t *off, uint8_t op, uint8_t a, uint8_t b, int32_t imm) {
    uint32_t u = (uint32_t)imm;
    uint8_t *p = buf + *off;
    p[0] = op;
    p[1] = a;
    p[2] = b;
    p[3] = 0;
    p[4] = (uint8_t)u;
    p[5] = (uint8_t)(u >> 8);
    p[6] = (uint8_t)(u >> 16);
    p[7] = (uint8_t)(u >> 24);
    *off += 8;
}

/* ---- guest page tables (4-level, built by hand in guest memory) --------- */
#define PTE_P (UINT64_C(1) << 0)
#define PTE_RW (UINT64_C(1) << 1)
#define PTE_US (UINT64_C(1) << 2)
#define PTE_ADDR UINT64_C(0x000FFFFFFFFFF000)

static uint64_t pt_next; /* bump allocator for table pages */

static uint64_t pt_alloc(npt_vm *vm) {
    static const uint8_t zero[4096];
    uint64_t p = pt_next;
    pt_next += K4;
    check_status(npt_vm_write_memory(vm, p, zero, sizeof zero), NPT_OK, "pt_alloc: zero a table page", __LINE__);
    return p;
}

static uint64_t read_u64(npt_vm *vm, uint64_t gpa) {
    uint8_t b[8];
    uint64_t v = 0;
    if (npt_vm_read_memory(vm, gpa, b, 8) != NPT_OK) return 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | b[i];
    return v;
}

static void write_u64(npt_vm *vm, uint64_t gpa, uint64_t v) {
    uint8_t b[8];
    for (int i = 0; i < 8; i++) b[i] = (uint8_t)(v >> (8 * i));
    check_status(npt_vm_write_memory(vm, gpa, b, 8), NPT_OK, "write_u64", __LINE__);
}

/* Maps 4 KiB page `gva` -> `gpa` with leaf flags `flags` (P is added). Intermediate entries are
 * P|RW|US, so the leaf's U/S alone decides whether `gva` is a user-mode address. */
static void map4k(npt_vm *vm, uint64_t cr3_gpa, uint64_t gva, uint64_t gpa, uint64_t flags) {
    uint64_t table = cr3_gpa & PTE_ADDR;
    for (int level = 4; level > 1; level--) {
        uint64_t slot = table + ((gva >> (12 + 9 * (level - 1))) & 511) * 8;
        uint64_t e = read_u64(vm, slot);
        if (!(e & PTE_P)) {
            e = pt_alloc(vm) | PTE_P | PTE_RW | PTE_US;
            write_u64(vm, slot, e);
        }
        table = e & PTE_ADDR;
    }
    write_u64(vm, table + ((gva >> 12) & 511) * 8, (gpa & PTE_ADDR) | flags | PTE_P);
}

/* ------------------------------------------------------------------------ */
/* Status strings, version, last error                                       */
/* ------------------------------------------------------------------------ */
static void test_status_and_version(void) {
    CHECK_EQ(npt_abi_version(), NPT_ABI_VERSION);
    CHECK_EQ(NPT_ABI_MAJOR(npt_abi_version()), NPT_ABI_VERSION_MAJOR);

    const char *names[15];
    for (int i = 0; i < 15; i++) {
        names[i] = npt_status_string((npt_status)-i);
        CHECK(names[i] != NULL && names[i][0] != '\0');
    }
    int distinct = 1;
    for (int i = 0; i < 15; i++)
        for (int j = i + 1; j < 15; j++)
            if (names[i] && names[j] && strcmp(names[i], names[j]) == 0) distinct = 0;
    CHECK(distinct);
    CHECK(strstr(npt_status_string(NPT_ERR_MISALIGNED), "MISALIGNED") != NULL);
    CHECK(npt_status_string((npt_status)-1000) != NULL);
    CHECK(npt_status_string((npt_status)42) != NULL);
    CHECK(npt_last_error() != NULL);
}

/* ------------------------------------------------------------------------ */
/* Context and backends                                                      */
/* ------------------------------------------------------------------------ */
static void test_backends(void) {
    CHECK_ST(npt_context_create(NULL), NPT_ERR_INVALID_ARGUMENT);
    npt_context *ctx = NULL;
    CHECK_OK(npt_context_create(&ctx));
    if (!ctx) return;

    size_t n = 0;
    CHECK_OK(npt_backend_count(ctx, &n));
    CHECK(n >= 1);
    CHECK_ST(npt_backend_count(ctx, NULL), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_backend_count(NULL, &n), NPT_ERR_INVALID_ARGUMENT);

    int found_sim = 0, defaults = 0;
    for (size_t i = 0; i < n; i++) {
        npt_backend_info info;
        memset(&info, 0, sizeof info);
        info.size = sizeof info;
        CHECK_OK(npt_backend_get(ctx, i, &info));
        CHECK(info.name != NULL);
        CHECK(info.description != NULL);
        CHECK_EQ(info.size, sizeof info);
        defaults += info.is_default != 0;
        if (info.name && strcmp(info.name, "sim") == 0) {
            found_sim = 1;
            CHECK(info.is_default == 1);
            CHECK(info.is_plugin == 0);
            CHECK((info.capabilities & (NPT_CAP_MBEC_EMULATION | NPT_CAP_RUN)) ==
                  (NPT_CAP_MBEC_EMULATION | NPT_CAP_RUN));
            CHECK_EQ(NPT_ABI_MAJOR(info.abi_version), NPT_ABI_VERSION_MAJOR);
        }
    }
    CHECK(found_sim);
    CHECK_EQ(defaults, 1);

    npt_backend_info info;
    memset(&info, 0, sizeof info);
    info.size = sizeof info;
    CHECK_ST(npt_backend_get(ctx, n, &info), NPT_ERR_NOT_FOUND);
    CHECK_ST(npt_backend_get(ctx, 0, NULL), NPT_ERR_INVALID_ARGUMENT);
    info.size = 4; /* a struct too small for even the first version */
    CHECK_ST(npt_backend_get(ctx, 0, &info), NPT_ERR_INVALID_ARGUMENT);

    CHECK_ST(npt_backend_set_default(ctx, "no-such-backend"), NPT_ERR_NOT_FOUND);
    CHECK_ERR_MENTIONS("no-such-backend");
    CHECK_ST(npt_backend_set_default(ctx, NULL), NPT_ERR_INVALID_ARGUMENT);
    CHECK_OK(npt_backend_set_default(ctx, "sim"));

    CHECK_OK(npt_context_destroy(ctx));
    /* handles are never reused: the destroyed context is refused */
    CHECK_ST(npt_backend_count(ctx, &n), NPT_ERR_BAD_HANDLE);
    CHECK_ST(npt_context_destroy(ctx), NPT_ERR_BAD_HANDLE);
    CHECK_ST(npt_context_destroy(NULL), NPT_ERR_INVALID_ARGUMENT);
}

/* ------------------------------------------------------------------------ */
/* VM creation                                                               */
/* ------------------------------------------------------------------------ */
static void test_vm_create(npt_context *ctx) {
    npt_vm_config c = vm_config(NULL, 4 * M1, R | W, NPT_MBEC_EXACT);
    npt_vm *a = NULL, *b = NULL;
    CHECK_OK(npt_vm_create(ctx, &c, &a));
    CHECK(a != NULL);
    c.backend = "sim";
    CHECK_OK(npt_vm_create(ctx, &c, &b));
    CHECK(b != NULL && b != a);

    static int sentinel_storage;
    npt_vm *const sentinel = (npt_vm *)(void *)&sentinel_storage;
    npt_vm *out = sentinel;
    c.backend = "no-such-backend";
    CHECK_ST(npt_vm_create(ctx, &c, &out), NPT_ERR_NOT_FOUND);
    CHECK(out == sentinel);
    CHECK_ERR_MENTIONS("no-such-backend");

    c = vm_config(NULL, 4 * M1, R | W, NPT_MBEC_EXACT);
    CHECK_ST(npt_vm_create(ctx, NULL, &out), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ERR_MENTIONS("config");
    CHECK_ST(npt_vm_create(ctx, &c, NULL), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_vm_create(NULL, &c, &out), NPT_ERR_INVALID_ARGUMENT);

    c.size = 0;
    CHECK_ST(npt_vm_create(ctx, &c, &out), NPT_ERR_INVALID_ARGUMENT);
    c.size = sizeof c;

    c.ram_size = 0;
    CHECK_ST2(npt_vm_create(ctx, &c, &out), NPT_ERR_INVALID_ARGUMENT, NPT_ERR_MISALIGNED);
    CHECK_ERR_MENTIONS("ram_size");
    c.ram_size = 4 * M1 + 1;
    CHECK_ST2(npt_vm_create(ctx, &c, &out), NPT_ERR_INVALID_ARGUMENT, NPT_ERR_MISALIGNED);
    c.ram_size = 4096 * 3 + 2048;
    CHECK_ST2(npt_vm_create(ctx, &c, &out), NPT_ERR_INVALID_ARGUMENT, NPT_ERR_MISALIGNED);
    c.ram_size = 4 * M1;

    c.mbec_mode = 7;
    CHECK_ST(npt_vm_create(ctx, &c, &out), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ERR_MENTIONS("mbec_mode");
    c.mbec_mode = NPT_MBEC_EXACT;
    c.default_perms = UINT64_C(1) << 5; /* not an NPT_PERM_* bit */
    CHECK_ST(npt_vm_create(ctx, &c, &out), NPT_ERR_INVALID_ARGUMENT);
    CHECK(out == sentinel);

    /* a 4 KiB guest is the smallest one */
    c = vm_config(NULL, K4, R | W | SX, NPT_MBEC_LAZY);
    npt_vm *tiny = NULL;
    CHECK_OK(npt_vm_create(ctx, &c, &tiny));
    CHECK_EQ(policy_at(tiny, 0), R | W | SX);
    if (tiny) CHECK_OK(npt_vm_destroy(tiny));

    if (a) CHECK_OK(npt_vm_destroy(a));
    if (b) CHECK_OK(npt_vm_destroy(b));
}

/* ------------------------------------------------------------------------ */
/* Guest memory                                                              */
/* ------------------------------------------------------------------------ */
static void test_memory(npt_context *ctx) {
    npt_vm *vm = make_vm(ctx, M1, R | W, NPT_MBEC_EXACT, 0);
    if (!vm) return;
    uint8_t out[64], in[64];
    for (int i = 0; i < 64; i++) out[i] = (uint8_t)(i * 7 + 1);
    CHECK_OK(npt_vm_write_memory(vm, 0x1234, out, sizeof out));
    memset(in, 0, sizeof in);
    CHECK_OK(npt_vm_read_memory(vm, 0x1234, in, sizeof in));
    CHECK(memcmp(in, out, sizeof in) == 0);
    /* the last bytes of RAM are reachable, one more is not */
    CHECK_OK(npt_vm_write_memory(vm, M1 - 8, out, 8));
    CHECK_OK(npt_vm_read_memory(vm, M1 - 8, in, 8));
    CHECK(memcmp(in, out, 8) == 0);
    CHECK_ST(npt_vm_write_memory(vm, M1 - 8, out, 9), NPT_ERR_OUT_OF_RANGE);
    CHECK_ST(npt_vm_read_memory(vm, M1, in, 1), NPT_ERR_OUT_OF_RANGE);
    CHECK_ST(npt_vm_write_memory(vm, UINT64_MAX - 3, out, 16), NPT_ERR_OUT_OF_RANGE); /* gpa + len wraps */
    CHECK_ST(npt_vm_read_memory(vm, UINT64_MAX - 3, in, 16), NPT_ERR_OUT_OF_RANGE);
    CHECK_ST(npt_vm_write_memory(vm, 0, NULL, 8), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_vm_read_memory(vm, 0, NULL, 8), NPT_ERR_INVALID_ARGUMENT);
    /* a failed write changed nothing */
    CHECK_OK(npt_vm_read_memory(vm, M1 - 8, in, 8));
    CHECK(memcmp(in, out, 8) == 0);
    CHECK_OK(npt_vm_destroy(vm));
}

/* ------------------------------------------------------------------------ */
/* Policy                                                                    */
/* ------------------------------------------------------------------------ */
static void test_policy(npt_context *ctx) {
    const uint64_t ram = 4 * M1;
    npt_vm *vm = make_vm(ctx, ram, R | W, NPT_MBEC_EXACT, 0);
    if (!vm) return;

    CHECK_EQ(policy_at(vm, 0x5000), R | W);
    CHECK_OK(npt_policy_set(vm, 0x5000, K4, NPT_PAGE_4K, R | SX));
    CHECK_EQ(policy_at(vm, 0x5000), R | SX);
    CHECK_EQ(policy_at(vm, 0x5fff), R | SX);
    CHECK_EQ(policy_at(vm, 0x4000), R | W);
    CHECK_EQ(policy_at(vm, 0x6000), R | W);
    CHECK_OK(npt_policy_set(vm, M2, M2, NPT_PAGE_2M, R | UX));
    CHECK_EQ(policy_at(vm, M2), R | UX);
    CHECK_EQ(policy_at(vm, 2 * M2 - K4), R | UX);
    CHECK_OK(npt_policy_set(vm, 0x8000, 3 * K4, NPT_PAGE_4K, NPT_PERM_ALL));
    CHECK_EQ(policy_at(vm, 0xA000), NPT_PERM_ALL);
    CHECK_EQ(policy_at(vm, 0xB000), R | W);

    /* each bad request fails and changes nothing */
    npt_stats before = stats_of(vm);
    CHECK_ST(npt_policy_set(vm, 0x5800, K4, NPT_PAGE_4K, R), NPT_ERR_MISALIGNED);
    CHECK_ERR_MENTIONS("gpa");
    CHECK_ST(npt_policy_set(vm, K4, M2, NPT_PAGE_2M, R), NPT_ERR_MISALIGNED); /* gpa not 2 MiB aligned */
    CHECK_ST(npt_policy_set(vm, 0x5000, 0x1800, NPT_PAGE_4K, R), NPT_ERR_MISALIGNED);
    CHECK_ERR_MENTIONS("size");
    CHECK_ST(npt_policy_set(vm, 0x5000, 0, NPT_PAGE_4K, R), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ERR_MENTIONS("size");
    CHECK_ST(npt_policy_set(vm, 0x5000, K4, 8192, R), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ERR_MENTIONS("page_size");
    CHECK_ST(npt_policy_set(vm, 0x5000, K4, 0, R), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_policy_set(vm, 0x5000, K4, NPT_PAGE_4K, R | (UINT64_C(1) << 3)), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ERR_MENTIONS("perms");
    CHECK_ST(npt_policy_set(vm, 0x5000, K4, NPT_PAGE_4K, UINT64_C(1) << 63), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_policy_set(vm, ram - K4, 2 * K4, NPT_PAGE_4K, R), NPT_ERR_OUT_OF_RANGE);
    CHECK_ST(npt_policy_set(vm, ram, K4, NPT_PAGE_4K, R), NPT_ERR_OUT_OF_RANGE);
    CHECK_ST(npt_policy_set(vm, UINT64_C(0xFFFFFFFFFFFFF000), 2 * K4, NPT_PAGE_4K, R), NPT_ERR_OUT_OF_RANGE);
    CHECK_ST(npt_policy_set(NULL, 0x5000, K4, NPT_PAGE_4K, R), NPT_ERR_INVALID_ARGUMENT);
    CHECK_EQ(policy_at(vm, 0x5000), R | SX);
    CHECK_EQ(policy_at(vm, ram - K4), R | UX); /* inside the 2 MiB range set above */
    CHECK_EQ(policy_at(vm, K4), R | W);
    npt_stats after = stats_of(vm);
    CHECK_EQ(after.policy_updates, before.policy_updates);

    uint64_t p = 0;
    CHECK_ST(npt_policy_get(vm, ram, &p), NPT_ERR_OUT_OF_RANGE);
    CHECK_ST(npt_policy_get(vm, 0, NULL), NPT_ERR_INVALID_ARGUMENT);

    /* npt_policy_set_ranges: all or nothing */
    npt_policy_range rs[2] = {
        {0x10000, 2 * K4, NPT_PAGE_4K, R | SX},
        {0x11000, K4, NPT_PAGE_4K, R | UX}, /* overlaps the first */
    };
    CHECK_ST(npt_policy_set_ranges(vm, rs, 2), NPT_ERR_OVERLAP);
    CHECK_EQ(policy_at(vm, 0x10000), R | W);
    CHECK_EQ(policy_at(vm, 0x11000), R | W);
    /* overlap detected whatever the order */
    npt_policy_range rev[2] = {rs[1], rs[0]};
    CHECK_ST(npt_policy_set_ranges(vm, rev, 2), NPT_ERR_OVERLAP);
    CHECK_EQ(policy_at(vm, 0x11000), R | W);

    npt_policy_range good_bad[2] = {
        {0x10000, K4, NPT_PAGE_4K, R | SX},
        {0x12800, K4, NPT_PAGE_4K, R | UX}, /* misaligned */
    };
    CHECK_ST(npt_policy_set_ranges(vm, good_bad, 2), NPT_ERR_MISALIGNED);
    CHECK_ERR_MENTIONS("gpa");
    CHECK_EQ(policy_at(vm, 0x10000), R | W);
    good_bad[1].gpa = ram; /* past RAM */
    CHECK_ST(npt_policy_set_ranges(vm, good_bad, 2), NPT_ERR_OUT_OF_RANGE);
    CHECK_EQ(policy_at(vm, 0x10000), R | W);
    good_bad[1].gpa = 0x12000;
    good_bad[1].page_size = 12345;
    CHECK_ST(npt_policy_set_ranges(vm, good_bad, 2), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ERR_MENTIONS("page_size");
    CHECK_EQ(policy_at(vm, 0x10000), R | W);
    good_bad[1].page_size = NPT_PAGE_4K;
    good_bad[1].perms = UINT64_C(1) << 11;
    CHECK_ST(npt_policy_set_ranges(vm, good_bad, 2), NPT_ERR_INVALID_ARGUMENT);
    CHECK_EQ(policy_at(vm, 0x10000), R | W);
    CHECK_EQ(policy_at(vm, 0x12000), R | W);

    good_bad[1].perms = R | UX;
    CHECK_OK(npt_policy_set_ranges(vm, good_bad, 2));
    CHECK_EQ(policy_at(vm, 0x10000), R | SX);
    CHECK_EQ(policy_at(vm, 0x12000), R | UX);
    CHECK_EQ(policy_at(vm, 0x11000), R | W);
    CHECK_ST(npt_policy_set_ranges(vm, NULL, 1), NPT_ERR_INVALID_ARGUMENT);

    CHECK_OK(npt_vm_destroy(vm));
}

/* ------------------------------------------------------------------------ */
/* Shadow hierarchies                                                        */
/* ------------------------------------------------------------------------ */
struct leaf {
    uint64_t gpa, size, perms;
};
struct leaves {
    struct leaf items[4096];
    size_t n;
    int overflow;
};

static void collect_leaf(uint64_t gpa, uint64_t size, uint64_t perms, void *user_data) {
    struct leaves *l = user_data;
    if (l->n == sizeof l->items / sizeof l->items[0]) {
        l->overflow = 1;
        return;
    }
    l->items[l->n].gpa = gpa;
    l->items[l->n].size = size;
    l->items[l->n].perms = perms;
    l->n++;
}

/* Leaves in ascending, non-overlapping order, sizes of a leaf, aligned; returns the total size. */
static uint64_t check_leaves(const struct leaves *l, int line) {
    uint64_t total = 0, end = 0;
    int ordered = 1, shaped = 1;
    for (size_t i = 0; i < l->n; i++) {
        const struct leaf *f = &l->items[i];
        if (f->size != NPT_PAGE_4K && f->size != NPT_PAGE_2M && f->size != NPT_PAGE_1G) shaped = 0;
        if (f->size && f->gpa % f->size != 0) shaped = 0;
        if (i > 0 && f->gpa < end) ordered = 0;
        end = f->gpa + f->size;
        total += f->size;
    }
    check(!l->overflow, "leaf list fits", line);
    check(ordered, "leaves come in ascending GPA order and do not overlap", line);
    check(shaped, "every leaf is a 4K/2M/1G page aligned to its size", line);
    return total;
}

static const struct leaf *leaf_at(const struct leaves *l, uint64_t gpa) {
    for (size_t i = 0; i < l->n; i++)
        if (gpa >= l->items[i].gpa && gpa - l->items[i].gpa < l->items[i].size) return &l->items[i];
    return NULL;
}

static void check_translation_shape(npt_translation t, uint64_t gpa, int line) {
    if (t.level == 0) return;
    uint64_t want = t.level == 1 ? NPT_PAGE_4K : t.level == 2 ? NPT_PAGE_2M : t.level == 3 ? NPT_PAGE_1G : 0;
    check(t.level <= 3, "translation level is 0..3", line);
    check(t.page_size == want, "translation page_size matches its level", line);
    (void)gpa;
}

static void test_hierarchies(npt_context *ctx) {
    const uint64_t ram = 4 * M1;
    npt_vm *vm = make_vm(ctx, ram, R | W, NPT_MBEC_EXACT, 0);
    if (!vm) return;
    static struct leaves l;

    /* before any policy: every page R|W in both hierarchies, leaves cover RAM exactly once */
    for (uint32_t h = 0; h < NPT_HIERARCHY_COUNT; h++) {
        memset(&l, 0, sizeof l);
        CHECK_OK(npt_hierarchy_leaves(vm, h, collect_leaf, &l));
        CHECK_EQ(check_leaves(&l, __LINE__), ram);
        CHECK(l.n > 0 && l.items[0].gpa == 0);
        int all_rw = 1;
        for (size_t i = 0; i < l.n; i++) all_rw &= l.items[i].perms == (R | W);
        CHECK(all_rw);
    }

    const uint64_t A = 0x10000, B = 0x11000, C = 0x12000, D = 0x30000;
    CHECK_OK(npt_policy_set(vm, A, K4, NPT_PAGE_4K, R | SX));
    CHECK_OK(npt_policy_set(vm, B, K4, NPT_PAGE_4K, R | UX));
    CHECK_OK(npt_policy_set(vm, C, K4, NPT_PAGE_4K, 0));

    npt_translation t = translate(vm, NPT_HIERARCHY_SUPERVISOR, A);
    CHECK(t.level >= 1);
    CHECK((t.perms & X_BIT) != 0);
    CHECK((t.perms & R) != 0);
    CHECK((t.perms & W) == 0);
    check_translation_shape(t, A, __LINE__);
    CHECK_EQ(t.size, sizeof t);
    t = translate(vm, NPT_HIERARCHY_USER, A);
    CHECK(t.level >= 1);
    CHECK((t.perms & X_BIT) == 0);
    CHECK((t.perms & R) != 0);

    t = translate(vm, NPT_HIERARCHY_SUPERVISOR, B);
    CHECK(t.level >= 1);
    CHECK((t.perms & X_BIT) == 0);
    t = translate(vm, NPT_HIERARCHY_USER, B);
    CHECK(t.level >= 1);
    CHECK((t.perms & X_BIT) != 0);
    CHECK((t.perms & R) != 0);
    check_translation_shape(t, B, __LINE__);

    CHECK_EQ(translate(vm, NPT_HIERARCHY_SUPERVISOR, C).level, 0);
    CHECK_EQ(translate(vm, NPT_HIERARCHY_USER, C).level, 0);
    CHECK_EQ(translate(vm, NPT_HIERARCHY_USER, C + 0x800).level, 0);

    t = translate(vm, NPT_HIERARCHY_SUPERVISOR, D);
    CHECK(t.level >= 1);
    CHECK_EQ(t.perms, R | W);
    check_translation_shape(t, D, __LINE__);
    /* the same guest page is backed by the same host memory in both hierarchies */
    CHECK_EQ(translate(vm, NPT_HIERARCHY_USER, A).host_offset, translate(vm, NPT_HIERARCHY_SUPERVISOR, A).host_offset);

    npt_translation bad;
    memset(&bad, 0, sizeof bad);
    bad.size = sizeof bad;
    CHECK_ST(npt_hierarchy_translate(vm, 2, A, &bad), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ERR_MENTIONS("hierarchy");
    CHECK_ST(npt_hierarchy_translate(vm, NPT_HIERARCHY_SUPERVISOR, A, NULL), NPT_ERR_INVALID_ARGUMENT);
    bad.size = 0;
    CHECK_ST(npt_hierarchy_translate(vm, NPT_HIERARCHY_SUPERVISOR, A, &bad), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_hierarchy_leaves(vm, 2, collect_leaf, &l), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_hierarchy_leaves(vm, NPT_HIERARCHY_USER, NULL, &l), NPT_ERR_INVALID_ARGUMENT);

    /* leaves after the policy: the page without permissions is not present, X follows the mode */
    for (uint32_t h = 0; h < NPT_HIERARCHY_COUNT; h++) {
        memset(&l, 0, sizeof l);
        CHECK_OK(npt_hierarchy_leaves(vm, h, collect_leaf, &l));
        CHECK_EQ(check_leaves(&l, __LINE__), ram - K4);
        CHECK(leaf_at(&l, C) == NULL);
        const struct leaf *fa = leaf_at(&l, A), *fb = leaf_at(&l, B);
        CHECK(fa != NULL && fb != NULL);
        if (fa && fb) {
            CHECK_EQ(fa->size, K4);
            CHECK_EQ(fa->perms & X_BIT, h == NPT_HIERARCHY_SUPERVISOR ? X_BIT : 0);
            CHECK_EQ(fb->perms & X_BIT, h == NPT_HIERARCHY_USER ? X_BIT : 0);
        }
    }

    /* stats: the policy calls were counted; both hierarchies need at least the tables of one */
    npt_stats s0 = stats_of(vm);
    CHECK(s0.policy_updates >= 3);
    CHECK(s0.shadow_nodes >= s0.shadow_nodes_single);
    CHECK(s0.shadow_nodes_single >= 1);
    CHECK_OK(npt_policy_set(vm, D, K4, NPT_PAGE_4K, R | SX));
    npt_stats s1 = stats_of(vm);
    CHECK(s1.policy_updates > s0.policy_updates);
    CHECK(s1.invalidations > s0.invalidations);
    CHECK(s1.shadow_nodes >= s1.shadow_nodes_single);
    npt_stats small;
    memset(&small, 0, sizeof small);
    CHECK_ST(npt_vm_get_stats(vm, &small), NPT_ERR_INVALID_ARGUMENT); /* size 0 */
    CHECK_ST(npt_vm_get_stats(vm, NULL), NPT_ERR_INVALID_ARGUMENT);

    CHECK_OK(npt_vm_destroy(vm));
}

/* ------------------------------------------------------------------------ */
/* Handles                                                                   */
/* ------------------------------------------------------------------------ */
static void test_handles(void) {
    npt_context *ctx = NULL;
    CHECK_OK(npt_context_create(&ctx));
    if (!ctx) return;
    npt_vm *vm = make_vm(ctx, M1, R | W, NPT_MBEC_EXACT, 0);
    if (!vm) return;

    CHECK_ST(npt_context_destroy(ctx), NPT_ERR_BUSY);
    size_t n = 0;
    CHECK_OK(npt_backend_count(ctx, &n)); /* still alive */

    npt_vcpu *c0 = NULL, *c1 = NULL;
    CHECK_OK(npt_vcpu_create(vm, 0, &c0));
    CHECK_ST(npt_vcpu_create(NULL, 0, &c1), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_vcpu_create(vm, 0, NULL), NPT_ERR_INVALID_ARGUMENT);
    static int sentinel_storage;
    npt_vcpu *const sentinel = (npt_vcpu *)(void *)&sentinel_storage;
    npt_vcpu *dup = sentinel;
    CHECK_ST(npt_vcpu_create(vm, 0, &dup), NPT_ERR_EXISTS);
    CHECK(dup == sentinel);
    CHECK_OK(npt_vcpu_create(vm, 1, &c1));

    /* a destroyed vCPU's handle is refused; its index is free again */
    CHECK_OK(npt_vcpu_destroy(c1));
    npt_regs r = regs_init();
    CHECK_ST(npt_vcpu_get_regs(c1, &r), NPT_ERR_BAD_HANDLE);
    CHECK_ST(npt_vcpu_destroy(c1), NPT_ERR_BAD_HANDLE);
    npt_vcpu *c1b = NULL;
    CHECK_OK(npt_vcpu_create(vm, 1, &c1b));
    CHECK(c1b != c1);

    /* never-created handles, and handles of another type */
    static int forged_storage;
    npt_vm *forged = (npt_vm *)(void *)&forged_storage;
    uint64_t p = 0;
    CHECK_ST(npt_policy_get(forged, 0, &p), NPT_ERR_BAD_HANDLE);
    CHECK_ST(npt_policy_get((npt_vm *)(void *)c0, 0, &p), NPT_ERR_BAD_HANDLE);
    CHECK_ST(npt_vcpu_get_regs((npt_vcpu *)(void *)vm, &r), NPT_ERR_BAD_HANDLE);
    CHECK_ST(npt_backend_count((npt_context *)(void *)vm, &n), NPT_ERR_BAD_HANDLE);

    /* NULL handles */
    CHECK_ST(npt_policy_get(NULL, 0, &p), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ERR_MENTIONS("vm");
    CHECK_ST(npt_vm_destroy(NULL), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_vcpu_destroy(NULL), NPT_ERR_INVALID_ARGUMENT);
    npt_exit e = exit_init();
    CHECK_ST(npt_vcpu_run(NULL, &e), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_vcpu_run_raw(NULL, &e), NPT_ERR_INVALID_ARGUMENT);
    uint32_t action = 0;
    CHECK_ST(npt_handle_exit(NULL, &e, &action), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_vcpu_get_regs(c0, NULL), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_vcpu_set_regs(c0, NULL), NPT_ERR_INVALID_ARGUMENT);
    r.size = 0;
    CHECK_ST(npt_vcpu_set_regs(c0, &r), NPT_ERR_INVALID_ARGUMENT);

    /* destroying the VM destroys its vCPUs: their handles become bad too */
    CHECK_OK(npt_vm_destroy(vm));
    CHECK_ST(npt_policy_get(vm, 0, &p), NPT_ERR_BAD_HANDLE);
    CHECK_ST(npt_policy_set(vm, 0, K4, NPT_PAGE_4K, R), NPT_ERR_BAD_HANDLE);
    npt_stats st;
    memset(&st, 0, sizeof st);
    st.size = sizeof st;
    CHECK_ST(npt_vm_get_stats(vm, &st), NPT_ERR_BAD_HANDLE);
    CHECK_ST(npt_vm_destroy(vm), NPT_ERR_BAD_HANDLE);
    r = regs_init();
    CHECK_ST(npt_vcpu_get_regs(c0, &r), NPT_ERR_BAD_HANDLE);
    CHECK_ST(npt_vcpu_run(c1b, &e), NPT_ERR_BAD_HANDLE);
    npt_vcpu *late = NULL;
    CHECK_ST(npt_vcpu_create(vm, 2, &late), NPT_ERR_BAD_HANDLE);

    CHECK_OK(npt_context_destroy(ctx));
}

/* ------------------------------------------------------------------------ */
/* Running guest code, paging off                                            */
/* ------------------------------------------------------------------------ */
static void test_run_paging_off(npt_context *ctx) {
    npt_vm *vm = make_vm(ctx, M1, R | W, NPT_MBEC_EXACT, 0);
    if (!vm) return;
    const uint64_t code = 0x1000, ro = 0x9000;
    uint8_t prog[128];
    size_t off = 0;
    emit(prog, &off, OP_MOVI, 0, 0, 42);
    emit(prog, &off, OP_OUT, 0, 0, 1);
    emit(prog, &off, OP_HLT, 0, 0, 0);
    const uint64_t ud_at = code + off;
    emit(prog, &off, OP_INVALID, 0, 0, 0);
    const uint64_t store_at = code + off;
    emit(prog, &off, OP_MOVI, 3, 0, (int32_t)ro);
    emit(prog, &off, OP_STORE, 3, 0, 0x10); /* [r3 + 0x10] = r0: a write to a read-only page */
    CHECK_OK(npt_vm_write_memory(vm, code, prog, off));
    /* With paging off every linear address is a user-mode address (Intel SDM), so under MBEC the
     * user-execute bit governs these fetches, also at CPL 0: R|SX alone does not run (checked
     * below), R|UX does. */
    CHECK_OK(npt_policy_set(vm, code, K4, NPT_PAGE_4K, R | SX));
    CHECK_OK(npt_policy_set(vm, ro, K4, NPT_PAGE_4K, R));

    npt_vcpu *cpu = NULL;
    CHECK_OK(npt_vcpu_create(vm, 0, &cpu));
    if (!cpu) return;
    npt_regs r = regs_init();
    r.cpl = 0;
    r.cr0 = 0;
    r.rip = code;
    r.gpr[5] = UINT64_C(0x1122334455667788);
    CHECK_OK(npt_vcpu_set_regs(cpu, &r));
    npt_regs g = regs_init();
    CHECK_OK(npt_vcpu_get_regs(cpu, &g));
    CHECK_EQ(g.rip, code);
    CHECK_EQ(g.gpr[5], UINT64_C(0x1122334455667788));
    CHECK_EQ(g.cpl, 0);
    CHECK_EQ(g.size, sizeof g);

    npt_exit e = exit_init();
    CHECK_OK(npt_vcpu_run(cpu, &e));
    CHECK_EQ(e.reason, NPT_EXIT_MBEC_VIOLATION);
    CHECK_EQ(e.gpa, code);
    CHECK((e.qualification & NPT_EPTQ_FETCH) != 0);
    CHECK((e.qualification & NPT_EPTQ_USER_LINEAR) != 0); /* paging off: a user-mode address */
    CHECK((e.qualification & NPT_EPTQ_GLA_WRITABLE) != 0); /* ... writable, not execute-disable */
    CHECK((e.qualification & NPT_EPTQ_GLA_NX) == 0);
    CHECK((e.qualification & NPT_EPTQ_EXECUTABLE) != 0 && (e.qualification & NPT_EPTQ_UEXECUTABLE) == 0);
    CHECK_OK(npt_policy_set(vm, code, K4, NPT_PAGE_4K, R | UX));
    CHECK_OK(npt_vcpu_set_regs(cpu, &r));
    e = exit_init();
    CHECK_OK(npt_vcpu_run(cpu, &e));
    CHECK_EQ(e.reason, NPT_EXIT_IO);
    CHECK_EQ(e.io_port, 1);
    CHECK_EQ(e.io_value, 42);
    CHECK_EQ(e.size, sizeof e);
    e = exit_init();
    CHECK_OK(npt_vcpu_run(cpu, &e));
    CHECK_EQ(e.reason, NPT_EXIT_HALT);
    CHECK_EQ(e.cpl, 0);
    CHECK_OK(npt_vcpu_get_regs(cpu, &g));
    CHECK_EQ(g.gpr[0], 42);

    /* an unknown opcode with no guest fault handler: #UD (vector 6) comes to the VMM */
    g.rip = ud_at;
    CHECK_OK(npt_vcpu_set_regs(cpu, &g));
    e = exit_init();
    CHECK_OK(npt_vcpu_run(cpu, &e));
    CHECK_EQ(e.reason, NPT_EXIT_GUEST_FAULT);
    CHECK_EQ(e.vector, 6);

    /* a data write to a page the policy makes read-only: no hierarchy permits it, reported */
    npt_stats s0 = stats_of(vm);
    g.rip = store_at;
    CHECK_OK(npt_vcpu_set_regs(cpu, &g));
    e = exit_init();
    CHECK_OK(npt_vcpu_run(cpu, &e));
    CHECK_EQ(e.reason, NPT_EXIT_MBEC_VIOLATION);
    CHECK_EQ(e.gpa, ro + 0x10);
    CHECK((e.qualification & NPT_EPTQ_WRITE) != 0);
    CHECK((e.qualification & NPT_EPTQ_FETCH) == 0);
    CHECK((e.qualification & NPT_EPTQ_READABLE) != 0);
    CHECK((e.qualification & NPT_EPTQ_WRITABLE) == 0);
    npt_stats s1 = stats_of(vm);
    CHECK_EQ(s1.violations_reported, s0.violations_reported + 1);
    CHECK(s1.instructions > 0);

    e = exit_init();
    e.size = 0;
    CHECK_ST(npt_vcpu_run(cpu, &e), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_vcpu_run(cpu, NULL), NPT_ERR_INVALID_ARGUMENT);

    CHECK_OK(npt_vm_destroy(vm));

    /* the instruction budget */
    vm = make_vm(ctx, M1, R | W | UX, NPT_MBEC_EXACT, 100);
    if (!vm) return;
    off = 0;
    emit(prog, &off, OP_JMP, 0, 0, -8); /* jumps to itself */
    CHECK_OK(npt_vm_write_memory(vm, code, prog, off));
    CHECK_OK(npt_vcpu_create(vm, 0, &cpu));
    r = regs_init();
    r.rip = code;
    CHECK_OK(npt_vcpu_set_regs(cpu, &r));
    e = exit_init();
    CHECK_OK(npt_vcpu_run(cpu, &e));
    CHECK_EQ(e.reason, NPT_EXIT_BUDGET);
    CHECK_EQ(e.rip, code);
    CHECK_OK(npt_vm_destroy(vm));
}

/* ------------------------------------------------------------------------ */
/* MBEC through the C ABI: paging on, a kernel and a user process            */
/* ------------------------------------------------------------------------ */
#define KCODE_GVA UINT64_C(0x400000) /* supervisor-mode address (U/S = 0) */
#define UCODE_GVA UINT64_C(0x800000) /* user-mode address */
#define FORBID_GVA UINT64_C(0x801000) /* user-mode address of a supervisor-execute-only page */
#define KCODE_GPA UINT64_C(0x200000)
#define UCODE_GPA UINT64_C(0x201000)
#define FORBID_GPA UINT64_C(0x202000)
#define PT_BASE UINT64_C(0x100000)

struct guest {
    npt_vm *vm;
    npt_vcpu *cpu;
};

/*
 * user (cpl 3, R|UX):  MOVI r0,11; OUT r0,1; SYSCALL; MOVI r0,33; OUT r0,1; MOVI r2,FORBID; JMPR r2
 * kernel (R|SX):       MOVI r0,22; OUT r0,2; SYSRET
 * FORBID (R|SX, mapped user): HLT  (must never run: hardware MBEC refuses a user-mode fetch)
 * Expected: IO(1,11) IO(2,22) IO(1,33) MBEC_VIOLATION at FORBID_GPA.
 */
static struct guest build_mbec_guest(npt_context *ctx, uint32_t mode) {
    struct guest gs = {NULL, NULL};
    gs.vm = make_vm(ctx, 4 * M1, R | W, mode, 1000000);
    if (!gs.vm) return gs;
    npt_vm *vm = gs.vm;

    uint8_t user[64], kern[64], forbid[8];
    size_t u = 0, k = 0, f = 0;
    emit(user, &u, OP_MOVI, 0, 0, 11);
    emit(user, &u, OP_OUT, 0, 0, 1);
    emit(user, &u, OP_SYSCALL, 0, 0, 0);
    emit(user, &u, OP_MOVI, 0, 0, 33);
    emit(user, &u, OP_OUT, 0, 0, 1);
    emit(user, &u, OP_MOVI, 2, 0, (int32_t)FORBID_GVA);
    emit(user, &u, OP_JMPR, 2, 0, 0);
    emit(kern, &k, OP_MOVI, 0, 0, 22);
    emit(kern, &k, OP_OUT, 0, 0, 2);
    emit(kern, &k, OP_SYSRET, 0, 0, 0);
    emit(forbid, &f, OP_HLT, 0, 0, 0);
    CHECK_OK(npt_vm_write_memory(vm, UCODE_GPA, user, u));
    CHECK_OK(npt_vm_write_memory(vm, KCODE_GPA, kern, k));
    CHECK_OK(npt_vm_write_memory(vm, FORBID_GPA, forbid, f));

    pt_next = PT_BASE;
    uint64_t cr3 = pt_alloc(vm);
    map4k(vm, cr3, KCODE_GVA, KCODE_GPA, PTE_RW);
    map4k(vm, cr3, UCODE_GVA, UCODE_GPA, PTE_RW | PTE_US);
    map4k(vm, cr3, FORBID_GVA, FORBID_GPA, PTE_RW | PTE_US);

    CHECK_OK(npt_policy_set(vm, KCODE_GPA, K4, NPT_PAGE_4K, R | SX));
    CHECK_OK(npt_policy_set(vm, UCODE_GPA, K4, NPT_PAGE_4K, R | UX));
    CHECK_OK(npt_policy_set(vm, FORBID_GPA, K4, NPT_PAGE_4K, R | SX));

    CHECK_OK(npt_vcpu_create(vm, 0, &gs.cpu));
    if (!gs.cpu) return gs;
    npt_regs r = regs_init();
    r.cpl = 3;
    r.rip = UCODE_GVA;
    r.cr0 = 1u << 31;
    r.cr3 = cr3;
    r.cr4 = NPT_CR4_SMEP;
    r.efer = NPT_EFER_NXE;
    r.lstar = KCODE_GVA;
    CHECK_OK(npt_vcpu_set_regs(gs.cpu, &r));
    return gs;
}

static void check_final_violation(const npt_exit *e, int line) {
    check(e->reason == NPT_EXIT_MBEC_VIOLATION, "final exit is NPT_EXIT_MBEC_VIOLATION", line);
    check_u64(e->gpa, FORBID_GPA, "violation gpa", line);
    check((e->qualification & NPT_EPTQ_FETCH) != 0, "qualification has NPT_EPTQ_FETCH", line);
    check((e->qualification & NPT_EPTQ_USER_LINEAR) != 0, "qualification has NPT_EPTQ_USER_LINEAR", line);
    check((e->qualification & NPT_EPTQ_UEXECUTABLE) == 0, "qualification lacks NPT_EPTQ_UEXECUTABLE", line);
    check((e->qualification & NPT_EPTQ_EXECUTABLE) != 0, "qualification has NPT_EPTQ_EXECUTABLE (policy SX)", line);
    check((e->qualification & NPT_EPTQ_READABLE) != 0, "qualification has NPT_EPTQ_READABLE", line);
    check((e->qualification & (NPT_EPTQ_READ | NPT_EPTQ_WRITE | NPT_EPTQ_WRITABLE)) == 0,
          "qualification: not a data access, not writable", line);
    check_u64(e->cpl, 3, "violation cpl", line);
    check_u64(e->rip, FORBID_GVA, "violation rip", line);
    if (e->qualification & NPT_EPTQ_GLA_VALID) check_u64(e->gva, FORBID_GVA, "violation gva", line);
}

struct run_log {
    uint64_t io[8];
    uint32_t io_port[8], io_cpl[8], io_hier[8];
    size_t n_io;
    npt_exit last;
};

/* npt_vcpu_run until something other than IO; IO exits are logged. */
static void run_library_loop(npt_vcpu *cpu, struct run_log *log) {
    memset(log, 0, sizeof *log);
    for (int i = 0; i < 16; i++) {
        npt_exit e = exit_init();
        npt_status s = npt_vcpu_run(cpu, &e);
        check_status(s, NPT_OK, "npt_vcpu_run", __LINE__);
        if (s != NPT_OK) return;
        log->last = e;
        if (e.reason != NPT_EXIT_IO) return;
        if (log->n_io < 8) {
            log->io[log->n_io] = e.io_value;
            log->io_port[log->n_io] = e.io_port;
            log->io_cpl[log->n_io] = e.cpl;
            log->io_hier[log->n_io] = e.hierarchy;
            log->n_io++;
        }
    }
}

static void test_mbec_exact(npt_context *ctx) {
    struct guest gs = build_mbec_guest(ctx, NPT_MBEC_EXACT);
    if (!gs.cpu) return;
    struct run_log log;
    run_library_loop(gs.cpu, &log);
    CHECK_EQ(log.n_io, 3);
    CHECK_EQ(log.io[0], 11);
    CHECK_EQ(log.io_port[0], 1);
    CHECK_EQ(log.io_cpl[0], 3);
    CHECK_EQ(log.io_hier[0], NPT_HIERARCHY_USER);
    CHECK_EQ(log.io[1], 22);
    CHECK_EQ(log.io_port[1], 2);
    CHECK_EQ(log.io_cpl[1], 0);
    CHECK_EQ(log.io_hier[1], NPT_HIERARCHY_SUPERVISOR);
    CHECK_EQ(log.io[2], 33);
    CHECK_EQ(log.io_cpl[2], 3);
    CHECK_EQ(log.io_hier[2], NPT_HIERARCHY_USER); /* exact mode: user hierarchy after SYSRET */
    check_final_violation(&log.last, __LINE__);

    npt_stats st = stats_of(gs.vm);
    CHECK_EQ(st.exits_escalation, 1);
    CHECK_EQ(st.exits_return_to_user, 1);
    CHECK(st.hierarchy_switches >= 2);
    CHECK_EQ(st.violations_reported, 1);
    CHECK(st.exits_total >= 6);
    CHECK(st.instructions >= 9);

    /* the forbidden page never ran: the vCPU is still at cpl 3 at its first instruction */
    npt_regs r = regs_init();
    CHECK_OK(npt_vcpu_get_regs(gs.cpu, &r));
    CHECK_EQ(r.cpl, 3);
    CHECK_EQ(r.rip, FORBID_GVA);
    CHECK_OK(npt_vm_destroy(gs.vm));
}

static void test_mbec_raw(npt_context *ctx) {
    struct guest gs = build_mbec_guest(ctx, NPT_MBEC_EXACT);
    if (!gs.cpu) return;
    uint64_t io[8];
    size_t n_io = 0;
    int saw_escalation = 0, saw_return = 0, io_tool = 1, raw_exits = 0, reported = 0;
    uint32_t raw_final = 0;
    npt_exit e = exit_init();
    for (int i = 0; i < 32 && !reported; i++) {
        e = exit_init();
        npt_status s = npt_vcpu_run_raw(gs.cpu, &e);
        CHECK_OK(s);
        if (s != NPT_OK) break;
        raw_exits++;
        uint32_t raw_reason = e.reason;
        uint32_t action = 99;
        CHECK_OK(npt_handle_exit(gs.cpu, &e, &action));
        switch (raw_reason) {
        case NPT_EXIT_ESCALATION:
            saw_escalation++;
            CHECK_EQ(action, NPT_ACTION_RESUME);
            break;
        case NPT_EXIT_RETURN_TO_USER:
            saw_return++;
            CHECK_EQ(action, NPT_ACTION_RESUME);
            break;
        case NPT_EXIT_IO:
            if (action != NPT_ACTION_TOOL) io_tool = 0;
            if (n_io < 8) io[n_io++] = e.io_value;
            break;
        default:
            if (action == NPT_ACTION_REPORT_VIOLATION) {
                reported = 1;
                raw_final = raw_reason;
            } else if (action != NPT_ACTION_RESUME) {
                fprintf(stderr, "    raw loop: unexpected exit %u, action %u\n", raw_reason, action);
                i = 1000;
            }
        }
    }
    CHECK(saw_escalation >= 1);
    CHECK(saw_return >= 1);
    CHECK(io_tool);
    CHECK(reported);
    CHECK_EQ(raw_final, NPT_EXIT_EPT_VIOLATION);
    check_final_violation(&e, __LINE__); /* npt_handle_exit rewrote the exit as the VM sees it */
    CHECK_EQ(n_io, 3);
    CHECK(n_io == 3 && io[0] == 11 && io[1] == 22 && io[2] == 33); /* what npt_vcpu_run saw */
    CHECK(raw_exits >= 6);

    npt_stats st = stats_of(gs.vm);
    CHECK(st.exits_escalation >= 1);
    CHECK(st.hierarchy_switches >= 1);
    CHECK_EQ(st.violations_reported, 1);

    /* npt_handle_exit refuses a reason it does not know */
    npt_exit bogus = exit_init();
    bogus.reason = 999;
    uint32_t action = 0;
    CHECK_ST(npt_handle_exit(gs.cpu, &bogus, &action), NPT_ERR_INVALID_ARGUMENT);
    CHECK_ST(npt_handle_exit(gs.cpu, &bogus, NULL), NPT_ERR_INVALID_ARGUMENT);
    CHECK_OK(npt_vm_destroy(gs.vm));
}

static void test_mbec_lazy(npt_context *ctx) {
    struct guest gs = build_mbec_guest(ctx, NPT_MBEC_LAZY);
    if (!gs.cpu) return;
    struct run_log log;
    run_library_loop(gs.cpu, &log);
    CHECK_EQ(log.n_io, 3);
    CHECK(log.n_io == 3 && log.io[0] == 11 && log.io[1] == 22 && log.io[2] == 33);
    check_final_violation(&log.last, __LINE__);
    npt_stats st = stats_of(gs.vm);
    CHECK_EQ(st.exits_escalation, 1);
    CHECK_EQ(st.exits_return_to_user, 0); /* lazy: the core does not ask for this exit */
    /* The user hierarchy is exposed from the start (npt_vcpu_set_regs at CPL 3); after the system
     * call the supervisor one stays until the user code's first fetch: one switch by violation,
     * one reported violation. */
    CHECK_EQ(st.exits_ept_violation, 2);
    CHECK_EQ(st.violations_reported, 1);
    CHECK_OK(npt_vm_destroy(gs.vm));
}

/* ------------------------------------------------------------------------ */
/* Threads: per-thread last error; one runner per vCPU; busy VM              */
/* ------------------------------------------------------------------------ */
struct err_probe {
    int empty_at_start, failed_as_expected, mentions_vm;
};

static void *last_error_thread(void *arg) {
    struct err_probe *p = arg;
    p->empty_at_start = npt_last_error()[0] == '\0';
    p->failed_as_expected = npt_policy_set(NULL, 0, K4, NPT_PAGE_4K, R) == NPT_ERR_INVALID_ARGUMENT;
    p->mentions_vm = strstr(npt_last_error(), "vm") != NULL;
    return NULL;
}

struct runner {
    npt_vcpu *cpu;
    npt_status status;
    npt_exit exit;
};

static void *run_thread(void *arg) {
    struct runner *r = arg;
    r->exit = exit_init();
    r->status = npt_vcpu_run(r->cpu, &r->exit);
    return NULL;
}

static void test_threads(npt_context *ctx) {
    /* npt_last_error is per thread */
    npt_vm *vm = make_vm(ctx, M1, R | W, NPT_MBEC_EXACT, 0);
    if (!vm) return;
    CHECK_ST(npt_policy_set(vm, 0x800, K4, NPT_PAGE_4K, R), NPT_ERR_MISALIGNED);
    char mine[512];
    snprintf(mine, sizeof mine, "%s", npt_last_error());
    struct err_probe probe = {0, 0, 0};
    pthread_t th;
    CHECK(pthread_create(&th, NULL, last_error_thread, &probe) == 0);
    pthread_join(th, NULL);
    CHECK(probe.empty_at_start);
    CHECK(probe.failed_as_expected);
    CHECK(probe.mentions_vm);
    CHECK(strcmp(mine, npt_last_error()) == 0);
    CHECK(strstr(mine, "gpa") != NULL);
    CHECK_OK(npt_vm_destroy(vm));

    /* A guest that marks `started`, then spins until the host sets `stop`, then halts. */
    vm = make_vm(ctx, M1, R | W, NPT_MBEC_EXACT, 50000000);
    if (!vm) return;
    const uint64_t code = 0x3000, flags = 0x4000;
    uint8_t prog[64];
    size_t off = 0;
    emit(prog, &off, OP_MOVI, 1, 0, (int32_t)flags);
    emit(prog, &off, OP_MOVI, 0, 0, 1);
    emit(prog, &off, OP_STORE, 1, 0, 0);   /* started = 1 */
    emit(prog, &off, OP_LOAD, 0, 1, 8);    /* loop: r0 = stop */
    emit(prog, &off, OP_JZ, 0, 0, -16);    /* while r0 == 0 */
    emit(prog, &off, OP_HLT, 0, 0, 0);
    CHECK_OK(npt_vm_write_memory(vm, code, prog, off));
    CHECK_OK(npt_policy_set(vm, code, K4, NPT_PAGE_4K, R | UX)); /* paging off: Xu governs */
    npt_vcpu *cpu = NULL;
    CHECK_OK(npt_vcpu_create(vm, 0, &cpu));
    if (!cpu) return;
    npt_regs r = regs_init();
    r.rip = code;
    CHECK_OK(npt_vcpu_set_regs(cpu, &r));

    struct runner run = {cpu, NPT_OK, exit_init()};
    CHECK(pthread_create(&th, NULL, run_thread, &run) == 0);
    uint64_t started = 0;
    for (int i = 0; i < 10000 && started == 0; i++) {
        started = read_u64(vm, flags);
        if (!started) sleep_ms(1);
    }
    CHECK_EQ(started, 1);
    if (started) {
        /* the vCPU is inside npt_vcpu_run on the other thread until we set `stop` */
        npt_exit e = exit_init();
        CHECK_ST(npt_vcpu_run(cpu, &e), NPT_ERR_BUSY);
        CHECK_ST(npt_vm_destroy(vm), NPT_ERR_BUSY);
        uint64_t p = 0;
        CHECK_OK(npt_policy_get(vm, code, &p)); /* the VM still answers */
        CHECK_EQ(p, R | UX);
    }
    write_u64(vm, flags + 8, 1);
    pthread_join(th, NULL);
    CHECK_OK(run.status);
    CHECK_EQ(run.exit.reason, NPT_EXIT_HALT);
    CHECK_OK(npt_vm_destroy(vm));
}

int main(void) {
    test_status_and_version();
    test_backends();

    npt_context *ctx = NULL;
    CHECK_OK(npt_context_create(&ctx));
    if (ctx) {
        test_vm_create(ctx);
        test_memory(ctx);
        test_policy(ctx);
        test_hierarchies(ctx);
        test_run_paging_off(ctx);
        test_mbec_exact(ctx);
        test_mbec_raw(ctx);
        test_mbec_lazy(ctx);
        test_threads(ctx);
        /* every VM above was destroyed, even those whose creation failed never counted */
        CHECK_OK(npt_context_destroy(ctx));
    }
    test_handles();

    printf("c-test test_api: %d passed, %d failed\n", passed, failed);
    return failed > 0 ? 1 : 0;
}
