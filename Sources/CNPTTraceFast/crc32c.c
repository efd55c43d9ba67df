#include "nptrace_fast.h"
#include <string.h>

#if defined(__x86_64__)
#include <cpuid.h>

int nptrace_crc32c_hw_available(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    return (c >> 20) & 1;
}

__attribute__((target("sse4.2")))
uint32_t nptrace_crc32c_hw(uint32_t crc, const void *p, size_t n) {
    const unsigned char *b = p;
    uint64_t c = crc;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, b, 8);
        c = __builtin_ia32_crc32di(c, v);
        b += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n > 0) {
        c32 = __builtin_ia32_crc32qi(c32, *b++);
        n--;
    }
    return c32;
}
#else
int nptrace_crc32c_hw_available(void) { return 0; }
uint32_t nptrace_crc32c_hw(uint32_t crc, const void *p, size_t n) { (void)p; (void)n; return crc; }
#endif
