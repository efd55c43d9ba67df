/* fuzz_common.h - shared by the libFuzzer targets in Tests/Fuzz (scripts/fuzz.sh builds and runs them).
 * A target fails (abort) when the library breaks a promise of include/nptkit.h: a status outside
 * npt_status, an empty npt_last_error() after a failure, a success that must not be. Crashes, hangs,
 * leaks and memory errors are the fuzzer's and AddressSanitizer's to find. */
#ifndef NPTKIT_FUZZ_COMMON_H
#define NPTKIT_FUZZ_COMMON_H
#include <nptkit.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define FUZZ_ASSERT(c)                                                                          \
    do {                                                                                        \
        if (!(c)) {                                                                             \
            fprintf(stderr, "fuzz: broken promise at %s:%d: %s (last error: %s)\n", __FILE__, __LINE__, #c, \
                    npt_last_error());                                                          \
            abort();                                                                            \
        }                                                                                       \
    } while (0)

/* Every status is an npt_status, and a failure says why. */
static inline npt_status checked(npt_status s) {
    FUZZ_ASSERT(s <= 0 && s >= NPT_ERR_GUARANTEE);
    if (s != NPT_OK) FUZZ_ASSERT(npt_last_error()[0] != 0);
    return s;
}

/* A reader over the fuzzer's bytes: past the end it gives zeros. */
typedef struct { const uint8_t *p; size_t n, i; } input;
static inline uint8_t in_u8(input *in) { return in->i < in->n ? in->p[in->i++] : 0; }
static inline uint16_t in_u16(input *in) { return (uint16_t)(in_u8(in) | (in_u8(in) << 8)); }
static inline uint32_t in_u32(input *in) { return (uint32_t)in_u16(in) | ((uint32_t)in_u16(in) << 16); }
static inline uint64_t in_u64(input *in) { return (uint64_t)in_u32(in) | ((uint64_t)in_u32(in) << 32); }
static inline int in_done(const input *in) { return in->i >= in->n; }

/* An address or size with a bias towards the edges that matter (page sizes, RAM, 48 bits, 2^64). */
static inline uint64_t in_addr(input *in) {
    static const uint64_t edges[] = { 0, 0x1000, 0x2000, 0x200000, 0x40000000, 0x100000, 0xFFF, 0x1FFFFF,
                                      UINT64_C(1) << 48, (UINT64_C(1) << 48) - 0x1000, UINT64_MAX, UINT64_MAX - 0xFFF,
                                      UINT64_C(1) << 63, 0x80000000, 0x100000000, 0x7FFFFFFFFFFFFFFF };
    uint8_t k = in_u8(in);
    if (k < 0x80) return edges[k % (sizeof edges / sizeof edges[0])] + (uint64_t)(in_u8(in) % 3) * 0x1000;
    if (k < 0xC0) return (uint64_t)in_u16(in) << 12;
    return in_u64(in);
}
static inline size_t in_size(input *in, size_t small_max) {
    uint8_t k = in_u8(in);
    if (k < 0xE0) return small_max ? in_u16(in) % (small_max + 1) : 0;
    static const size_t huge[] = { SIZE_MAX, (size_t)1 << 63, ((size_t)1 << 63) + 1, (size_t)1 << 48, SIZE_MAX - 7 };
    return huge[k % (sizeof huge / sizeof huge[0])];
}
#endif
