/* rawkvm.h - raw KVM loops (plain /dev/kvm ioctls, no NPTKit code) that `nptkit-cli bench --only kvm`
 * measures the library against, in the same process and run (rawbench.c says what each does). */
#ifndef RAWKVM_H
#define RAWKVM_H
#include <stdint.h>

/* What rawkvm_exit_loop's guest loops on. */
enum {
    RAWKVM_EXIT_OUT = 0,      /* CPL 0 `out; jmp` */
    RAWKVM_EXIT_MMIO = 1,     /* CPL 0 store to a KVM_MEM_READONLY memslot */
    RAWKVM_EXIT_USER_OUT = 2, /* CPL 3 `out; jmp`, the port allowed by the TSS's I/O bitmap */
};
/* n exits of the loop `kind` (RAWKVM_EXIT_*) of the smp guest; one sample each (ns).
 * Returns the number of samples, or -errno. */
int rawkvm_exit_loop(int n, int kind, uint64_t *samples);
/* The smp guest's user processes making `calls` INT3 system calls on `threads` vCPUs, in one VM or
 * (twovm) two VMs one per hierarchy, the vCPU moved as the plugin moves it (carry: with what the plugin
 * carries). One sample per call of vCPU 0 (ns); *wall_ns the whole run. Returns samples, or -errno. */
int rawkvm_syscalls(int threads, int calls, int twovm, int carry, uint64_t *samples, uint64_t *wall_ns);
#endif
