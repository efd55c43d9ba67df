// What NPTTrace needs of the CPU that Swift cannot say: the time stamp counter and the SSE4.2
// crc32 instruction (CRC-32C). Each has a portable fallback in Swift (TraceClock, CRC32C).
#ifndef NPTRACE_FAST_H
#define NPTRACE_FAST_H
#include <stddef.h>
#include <stdint.h>

/// The time stamp counter (RDTSC; not serialising: a timestamp may be taken a few dozen cycles
/// early or late). 0 off x86-64, where TraceClock never calls it.
static inline uint64_t nptrace_rdtsc(void) {
#if defined(__x86_64__)
    uint32_t lo, hi;
    __asm__ __volatile__("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
#else
    return 0;
#endif
}

/// 1 where this CPU has SSE4.2 (CPUID.1:ECX bit 20: the crc32 instruction), else 0.
int nptrace_crc32c_hw_available(void);

/// Continues the CRC-32C register `crc` (the inverted form: the caller inverts before and after)
/// over `n` bytes with the crc32 instruction. Only where nptrace_crc32c_hw_available() is 1.
uint32_t nptrace_crc32c_hw(uint32_t crc, const void *p, size_t n);

#endif
