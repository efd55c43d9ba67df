/* check.h - the shared checking harness of the KVM C tests (one copy instead of one per file).
 * Counts checks; a failure prints the file, line, what failed, and for a status the last error. */
#ifndef NPTKIT_TESTS_CHECK_H
#define NPTKIT_TESTS_CHECK_H
#include <nptkit.h>
#include <inttypes.h>
#include <stdio.h>

static int passed, failed, skipped;

static void check_at(int ok, const char *what, const char *file, int line) {
    if (ok) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL %s:%d: %s\n", file, line, what);
    }
}
static void check_status_at(npt_status got, npt_status want, const char *call, const char *file, int line) {
    if (got == want) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL %s:%d: %s\n    expected %s\n    got      %s\n    last error: %s\n", file, line, call,
                npt_status_string(want), npt_status_string(got), npt_last_error());
    }
}
static void check_u64_at(uint64_t got, uint64_t want, const char *what, const char *file, int line) {
    if (got == want) {
        passed++;
    } else {
        failed++;
        fprintf(stderr, "FAIL %s:%d: %s == %#" PRIx64 ", expected %#" PRIx64 "\n", file, line, what, got, want);
    }
}
#define CHECK_FILE (__builtin_strrchr(__FILE__, '/') ? __builtin_strrchr(__FILE__, '/') + 1 : __FILE__)
#define CHECK(c) check_at(!!(c), #c, CHECK_FILE, __LINE__)
#define CHECK_ST(call, want) check_status_at((call), (want), #call, CHECK_FILE, __LINE__)
#define CHECK_OK(call) check_status_at((call), NPT_OK, #call, CHECK_FILE, __LINE__)
#define CHECK_EQ(got, want) check_u64_at((uint64_t)(got), (uint64_t)(want), #got, CHECK_FILE, __LINE__)

/* The backend's statistic `name` of `vm` (npt_vm_backend_stats); a missing name fails the test (0). */
static inline uint64_t backend_stat(npt_vm *vm, const char *name) {
    npt_backend_stat st[64];
    size_t n = 0;
    npt_status s = npt_vm_backend_stats(vm, st, 64, &n);
    check_status_at(s, NPT_OK, "npt_vm_backend_stats", __FILE__, __LINE__);
    for (size_t i = 0; s == NPT_OK && i < n && i < 64; i++)
        if (__builtin_strcmp(st[i].name, name) == 0) return st[i].value;
    fprintf(stderr, "the backend reports no statistic %s\n", name);
    check_at(0, "a statistic the backend documents is present", __FILE__, __LINE__);
    return 0;
}
#endif
