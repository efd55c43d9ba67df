/* Internal to libnptkit (not installed, not exported: the version script exports only npt_). */
#ifndef NPTKIT_INTERNAL_H
#define NPTKIT_INTERNAL_H
/* The name of the symbol at `address` (dladdr), or NULL: how the call tracer names a callback. */
const char *nptkit_internal_symbol_name(const void *address);
/* The file of the object (libnptkit.so, or the executable holding the core) this code is in. */
const char *nptkit_internal_object_path(void);
#endif
