/* CFFI: the system's libffi (pkg-config libffi), used by `nptkit-cli replay-calls` to re-execute
 * recorded npt_ calls (ffi_call) and to stand in for the callbacks a C caller passed (ffi_closure).
 * libffi's type descriptors are mutable C globals, which Swift 6 refuses to touch: these return
 * their addresses. */
#include <ffi.h>

static inline ffi_type *nptffi_void(void) { return &ffi_type_void; }
static inline ffi_type *nptffi_uint32(void) { return &ffi_type_uint32; }
static inline ffi_type *nptffi_sint32(void) { return &ffi_type_sint32; }
static inline ffi_type *nptffi_uint64(void) { return &ffi_type_uint64; }
static inline ffi_type *nptffi_sint64(void) { return &ffi_type_sint64; }
static inline ffi_type *nptffi_pointer(void) { return &ffi_type_pointer; }
