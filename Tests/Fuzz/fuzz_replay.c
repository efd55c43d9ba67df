/* fuzz_replay.c - the trace replay backend (libnptkit-replay.so) and the core behind it, fed a
 * trace whose records are the fuzzer's. The input is a run of records as a block's payload holds
 * them (kind, delta_ns, length, body: docs/trace-format.md), then one byte, the MBEC mode of the
 * run (0-2; a record cut short is not framed, so that byte never is); this target frames them into a valid
 * trace (header, one block with its checksum, the end record), so the mutations reach what the
 * reader's checksums would otherwise stop: the replay's matching of the core's calls with records
 * of any kind, in any order, with any values. Then it runs, on "replay", the runs the seeds were
 * recorded from: `run` (VM, memory, policy, a vCPU, registers, exits handled the way a VMM does,
 * statistics, destroy), then `privileged` (a region, a request, the entry and the return: lock
 * turns). Every call must answer a status of npt_status and, when it fails, say why
 * (fuzz_common.h); a crash, hang, leak or memory error is a finding.
 *
 * Environment: NPT_FUZZ_REPLAY_PLUGIN (required), the plugin to load (scripts/fuzz.sh passes its
 * instrumented build); NPT_FUZZ_REPLAY_SEEDS=DIR writes the seeds instead (the two runs recorded
 * on the simulator in each MBEC mode, as payloads) and exits.
 *
 * Every input is a session of its own (session=fuzz-N, wait-ms=0: one thread, nothing to wait for).
 * A session that stops short of its trace would make the process exit with status 1 (the plugin's
 * end-of-process report); this target's own exit handler, installed after the plugin's and so run
 * before it, ends the process with status 0 instead: stopping short is what these traces do. */
#define _GNU_SOURCE
#include "fuzz_common.h"
#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

enum { OP_MOVI = 0x01, OP_JMPR = 0x09, OP_HLT = 0x0E, OP_OUT = 0x0F };
#define CODE 0x1000u
#define NOEXEC 0x3000u

static const char *plugin;
static unsigned long sessions;
static int verbose;

/* checked(), and with NPT_FUZZ_REPLAY_VERBOSE set, each failure printed (to see how far an input
 * gets: a seed replays to its end). */
static npt_status ck(npt_status s, const char *call) {
    checked(s);
    if (verbose && s != NPT_OK) fprintf(stderr, "fuzz_replay: %s: %d: %s\n", call, (int)s, npt_last_error());
    return s;
}
#define CK(x) ck((x), #x)

static void emit(uint8_t *buf, size_t *off, uint8_t op, uint8_t a, int32_t imm) {
    uint32_t u = (uint32_t)imm;
    uint8_t *p = buf + *off;
    p[0] = op; p[1] = a; p[2] = 0; p[3] = 0;
    p[4] = (uint8_t)u; p[5] = (uint8_t)(u >> 8); p[6] = (uint8_t)(u >> 16); p[7] = (uint8_t)(u >> 24);
    *off += 8;
}

/* A VM of 1 MiB, RAM readable and writable, on `backend` in MBEC `mode`, recorded to `record` if
 * not NULL; `steps`: max_steps_per_run (0: no budget). NULL if it was not made. */
static npt_vm *make_vm(npt_context *ctx, const char *backend, const char *record, uint32_t mode, uint64_t steps) {
    npt_vm_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.size = sizeof cfg;
    cfg.mbec_mode = mode;
    cfg.backend = backend;
    cfg.ram_size = 1u << 20;
    cfg.default_perms = NPT_PERM_READ | NPT_PERM_WRITE;
    cfg.max_steps_per_run = steps;
    cfg.record_path = record;
    npt_vm *vm = NULL;
    return CK(npt_vm_create(ctx, &cfg, &vm)) == NPT_OK ? vm : NULL;
}

/* The run (test_record_replay.c's): two OUTs, a jump to a page that is not executable (an MBEC
 * violation; the VMM moves rip to the HLT), the HLT; then statistics and destroy. On `backend`,
 * recorded to `record` if not NULL. Each call's status is checked, none is required to succeed. */
static void run(npt_context *ctx, const char *backend, const char *record, uint32_t mode) {
    npt_vm *vm = make_vm(ctx, backend, record, mode, 0);
    if (!vm) return;
    uint8_t prog[64];
    size_t off = 0;
    emit(prog, &off, OP_MOVI, 0, 11);
    emit(prog, &off, OP_OUT, 0, 1);
    emit(prog, &off, OP_MOVI, 0, 22);
    emit(prog, &off, OP_OUT, 0, 2);
    emit(prog, &off, OP_MOVI, 2, NOEXEC);
    emit(prog, &off, OP_JMPR, 2, 0);
    const uint64_t hlt = CODE + off;
    emit(prog, &off, OP_HLT, 0, 0);
    CK(npt_vm_write_memory(vm, CODE, prog, off));
    CK(npt_policy_set(vm, CODE, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_UX));
    CK(npt_policy_set(vm, NOEXEC, 0x1000, NPT_PAGE_4K, NPT_PERM_READ));
    npt_vcpu *cpu = NULL;
    if (CK(npt_vcpu_create(vm, 0, &cpu)) == NPT_OK) {
        npt_regs r;
        memset(&r, 0, sizeof r);
        r.size = sizeof r;
        r.rflags = 2;
        r.rip = CODE;
        CK(npt_vcpu_set_regs(cpu, &r));
        for (int i = 0; i < 8; i++) {
            npt_exit e;
            memset(&e, 0, sizeof e);
            e.size = sizeof e;
            if (CK(npt_vcpu_run(cpu, &e)) != NPT_OK) break;
            if (e.reason == NPT_EXIT_IO) continue;
            if (CK(npt_vcpu_get_regs(cpu, &r)) != NPT_OK) break;
            if (e.reason != NPT_EXIT_MBEC_VIOLATION) break;
            r.rip = hlt;
            if (CK(npt_vcpu_set_regs(cpu, &r)) != NPT_OK) break;
        }
        uint8_t back[16];
        CK(npt_vm_read_memory(vm, CODE, back, sizeof back));
        npt_backend_stat bs[16];
        size_t count = 0;
        CK(npt_vcpu_backend_stats(cpu, bs, 16, &count));
        CK(npt_vcpu_destroy(cpu));
    }
    npt_stats st;
    memset(&st, 0, sizeof st);
    st.size = sizeof st;
    CK(npt_vm_get_stats(vm, &st));
    npt_backend_stat bs[16];
    size_t count = 0;
    CK(npt_vm_backend_stats(vm, bs, 16, &count));
    CK(npt_vm_destroy(vm));
}

/* The privileged mode on one vCPU (test_privileged.c's, one thread): a guest loop, a region whose
 * handler OUTs on port 9 and returns (RSM), a request raised by the VMM, runs until the handler's
 * OUT and a few more (the return), the holder and the statistics. On a backend with the mode (the
 * replay has it for a trace with lock turns): every acquisition of the coordinator's monitor is a
 * lock turn the replay matches with the trace. */
static void privileged(npt_context *ctx, const char *backend, const char *record, uint32_t mode) {
    npt_vm *vm = make_vm(ctx, backend, record, mode, 2000);
    if (!vm) return;
    uint8_t code[16], handler[16];
    size_t n = 0, h = 0;
    emit(code, &n, 0x05, 3, 1);   /* ADDI r3, 1 */
    emit(code, &n, 0x08, 0, -16); /* JMP back */
    emit(handler, &h, OP_OUT, 0, 9);
    emit(handler, &h, 0x13, 0, 0); /* RSM */
    CK(npt_vm_write_memory(vm, CODE, code, n));
    CK(npt_policy_set(vm, CODE, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_UX));
    npt_vcpu *cpu = NULL;
    if (CK(npt_vcpu_create(vm, 0, &cpu)) == NPT_OK) {
        npt_regs r;
        memset(&r, 0, sizeof r);
        r.size = sizeof r;
        r.rip = CODE;
        CK(npt_vcpu_set_regs(cpu, &r));
        npt_region region = { sizeof region, 0, 0x80000000ull, 0x10000, handler, h, 0, 0 };
        CK(npt_region_set(vm, &region));
        CK(npt_vcpu_raise_privileged(cpu));
        int outs = 0;
        for (int i = 0; i < 8 && outs < 1; i++) {
            npt_exit e;
            memset(&e, 0, sizeof e);
            e.size = sizeof e;
            if (CK(npt_vcpu_run(cpu, &e)) != NPT_OK) break;
            if (e.reason == NPT_EXIT_IO && e.io_port == 9) outs++;
        }
        npt_exit e;
        memset(&e, 0, sizeof e);
        e.size = sizeof e;
        CK(npt_vcpu_run(cpu, &e));
        int64_t holder = 0;
        CK(npt_vm_privileged_holder(vm, &holder));
        npt_privileged_stats ps;
        memset(&ps, 0, sizeof ps);
        ps.size = sizeof ps;
        CK(npt_vm_get_privileged_stats(vm, &ps));
        CK(npt_vcpu_destroy(cpu));
    }
    CK(npt_vm_destroy(vm));
}

/* CRC-32C (Castagnoli, reflected), bitwise: the trace's block and header checksum. */
static uint32_t crc32c(uint32_t crc, const uint8_t *p, size_t n) {
    crc = ~crc;
    while (n--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++) crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1)));
    }
    return ~crc;
}

static void put32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }

/* A LEB128 at p[*i] (at most 10 bytes), or -1 past `n`. */
static int varint(const uint8_t *p, size_t n, size_t *i, uint64_t *v) {
    *v = 0;
    for (int k = 0; k < 10; k++) {
        if (*i >= n) return -1;
        uint8_t b = p[(*i)++];
        *v |= (uint64_t)(b & 0x7F) << (7 * k);
        if (!(b & 0x80)) return 0;
    }
    return -1;
}

/* The records an exit-path record (kind 0x27) stands for: exit, decision, and the hierarchy and
 * exit controls its parts byte names (after the vCPU number); 1 when its body is too short to tell
 * (the reader refuses it anyway). */
static uint32_t expanded_count(const uint8_t *body, size_t len) {
    size_t j = 0;
    uint64_t vcpu;
    if (varint(body, len, &j, &vcpu) || j >= len) return 1;
    uint8_t parts = body[j];
    return 2u + (parts & 1u) + ((parts >> 1) & 1u);
}

/* The whole records at the start of `data` (up to an end record or a frame cut short), framed as a
 * trace (version 1.3, with the header flag that allows exit-path records) into `out` (size: at
 * least n + 64); returns the trace's length. The end record counts the records the reader returns
 * (an exit-path record counts as the records it stands for). */
static size_t frame(const uint8_t *data, size_t n, uint8_t *out) {
    size_t i = 0, whole = 0;
    uint32_t count = 0, frames = 0;
    while (i < n && frames < 1000000) {
        if (data[i] == 0x7F) break;
        size_t j = i + 1;
        uint64_t delta, len;
        if (varint(data, n, &j, &delta) || varint(data, n, &j, &len) || len > n - j) break;
        count += data[i] == 0x27 ? expanded_count(data + j, (size_t)len) : 1u;
        i = j + len;
        whole = i;
        frames++;
    }
    uint8_t *h = out;
    memcpy(h, "NPTTRACE", 8);
    h[8] = 1; h[9] = 0;  /* major 1 */
    h[10] = 3; h[11] = 0; /* minor 3 */
    put32(h + 12, 1);     /* flags: compact exit paths */
    put32(h + 16, crc32c(0, h, 16));
    uint8_t *b = out + 20;
    memcpy(b + 20, data, whole);
    size_t p = 20 + whole;
    /* end: kind 0x7F, delta 0, length, count as a varint */
    uint8_t endBody[10];
    size_t el = 0;
    uint64_t c = count;
    do { endBody[el++] = (uint8_t)((c & 0x7F) | (c >= 0x80 ? 0x80 : 0)); c >>= 7; } while (c);
    b[p++] = 0x7F; b[p++] = 0; b[p++] = (uint8_t)el;
    memcpy(b + p, endBody, el);
    p += el;
    put32(b, (uint32_t)(p - 20));
    put64(b + 8, 0);
    put32(b + 16, frames + 1);
    uint32_t crc = crc32c(0, b, 4);
    crc = crc32c(crc, b + 8, p - 8);
    put32(b + 4, crc);
    return 20 + p;
}

static void quiet_exit(void) { _exit(0); }

/* The payloads of every block of the trace at `path`, the end record left out. */
static size_t payloads(const char *path, uint8_t *out, size_t cap) {
    if (cap < 1) return 0;
    cap -= 1; /* room for the mode byte */
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    uint8_t hdr[20], bh[20];
    size_t n = 0;
    if (fread(hdr, 1, 20, f) == 20) {
        while (fread(bh, 1, 20, f) == 20) {
            uint32_t len = (uint32_t)bh[0] | (uint32_t)bh[1] << 8 | (uint32_t)bh[2] << 16 | (uint32_t)bh[3] << 24;
            if (len > cap - n || fread(out + n, 1, len, f) != len) break;
            n += len;
        }
    }
    fclose(f);
    /* drop the end record: the last record of the last block */
    size_t i = 0, last = n;
    while (i < n) {
        size_t j = i + 1;
        uint64_t d, len;
        if (varint(out, n, &j, &d) || varint(out, n, &j, &len) || len > n - j) break;
        if (out[i] == 0x7F) { last = i; break; }
        i = j + len;
    }
    return last;
}

static void write_seeds(const char *dir) {
    static const uint32_t modes[] = { NPT_MBEC_EXACT, NPT_MBEC_LAZY, NPT_MBEC_VIOLATION_ONLY };
    static uint8_t buf[1 << 20];
    for (size_t k = 0; k < 3; k++) {
        char tmp[4096], seed[4096];
        snprintf(tmp, sizeof tmp, "%s/.seed-%d.trace", dir, (int)getpid());
        snprintf(seed, sizeof seed, "%s/recorded-mode-%u", dir, modes[k]);
        npt_context *ctx = NULL;
        if (npt_context_create(&ctx) != NPT_OK) exit(1);
        char tmp2[4096];
        snprintf(tmp2, sizeof tmp2, "%s.priv", tmp);
        run(ctx, "sim", tmp, modes[k]);
        npt_context_destroy(ctx);
        if (npt_context_create(&ctx) != NPT_OK) exit(1);
        privileged(ctx, "sim", tmp2, modes[k]);
        npt_context_destroy(ctx);
        /* The two recordings' payloads one after the other: one pass, the second VM's records
         * after the first's (each file numbers its VM 0; without a vm-select both stay VM 0). */
        size_t n = payloads(tmp, buf, sizeof buf);
        n += payloads(tmp2, buf + n, sizeof buf - n);
        unlink(tmp);
        unlink(tmp2);
        buf[n++] = (uint8_t)modes[k];
        FILE *f = fopen(seed, "wb");
        if (!f || fwrite(buf, 1, n, f) != n || fclose(f)) { fprintf(stderr, "cannot write %s\n", seed); exit(1); }
        printf("%s: %zu bytes\n", seed, n);
    }
    exit(0);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc; (void)argv;
    const char *seeds = getenv("NPT_FUZZ_REPLAY_SEEDS");
    if (seeds) write_seeds(seeds);
    verbose = getenv("NPT_FUZZ_REPLAY_VERBOSE") != NULL;
    plugin = getenv("NPT_FUZZ_REPLAY_PLUGIN");
    if (!plugin) { fprintf(stderr, "fuzz_replay: set NPT_FUZZ_REPLAY_PLUGIN to libnptkit-replay.so\n"); exit(2); }
    /* A session keeps its trace open for the life of the process (the plugin's sessions are never
     * freed): one descriptor an input. */
    struct rlimit l;
    if (getrlimit(RLIMIT_NOFILE, &l) == 0) { l.rlim_cur = l.rlim_max; setrlimit(RLIMIT_NOFILE, &l); }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1 || size > (1u << 20)) return 0;
    const uint32_t mode = data[size - 1] % 3;
    uint8_t *trace = malloc(size + 64);
    FUZZ_ASSERT(trace != NULL);
    size_t n = frame(data, size, trace);
    int fd = memfd_create("fuzz-replay.trace", MFD_CLOEXEC);
    FUZZ_ASSERT(fd >= 0);
    FUZZ_ASSERT(write(fd, trace, n) == (ssize_t)n);
    free(trace);
    char path[64], session[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    snprintf(session, sizeof session, "fuzz-%lu", ++sessions);
    npt_context *ctx = NULL;
    FUZZ_ASSERT(npt_context_create(&ctx) == NPT_OK);
    npt_plugin_arg args[3] = {{"trace", path}, {"session", session}, {"wait-ms", "0"}};
    const char *name = NULL;
    if (checked(npt_plugin_load_with(ctx, plugin, args, 3, &name)) == NPT_OK) {
        static int installed;
        if (!installed) { installed = 1; atexit(quiet_exit); }
        FUZZ_ASSERT(name != NULL && strcmp(name, "replay") == 0);
        run(ctx, "replay", NULL, mode);
        privileged(ctx, "replay", NULL, mode);
    }
    FUZZ_ASSERT(npt_context_destroy(ctx) == NPT_OK);
    close(fd);
    return 0;
}
