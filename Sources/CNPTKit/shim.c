/* CNPTKit: vends include/nptkit.h to Swift, and the few libc calls Swift cannot import cleanly. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stddef.h>
#include "nptkit_internal.h"

const char *nptkit_internal_symbol_name(const void *address) {
    Dl_info info;
    if (address == NULL || dladdr(address, &info) == 0) return NULL;
    return info.dli_sname;
}

const char *nptkit_internal_object_path(void) {
    Dl_info info;
    if (dladdr((const void *)&nptkit_internal_object_path, &info) == 0) return NULL;
    return info.dli_fname;
}
