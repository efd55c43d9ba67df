/*
 * gen_guest.c - the guest run that produced the real kernel-trace fixtures in this directory
 * (Tests/Fixtures/kvmtrace/README.md). A small 64-bit guest on /dev/kvm (the scaffolding of
 * Tests/probes/kvm/kvmprobe.h: identity paging, Linux selectors, TSS, IDT stubs that OUT their
 * vector on port 0xEF) that makes, in this order:
 *   CPL 0 (kernel code 0xB000): OUT 0xE0 (a port-I/O exit), a read of GPA 0x14000 (no memslot: MMIO),
 *        then IRETQ to user mode;
 *   CPL 3 (user code 0x10000), 3 times: a read of 0x13000 (no memslot: MMIO read), a write to
 *        0x15000 (a KVM_MEM_READONLY memslot: MMIO write), INT3 (delivered to the kernel stub at
 *        0x8030, which OUTs vector 3 on port 0xEF at CPL 0 and IRETQs back);
 *   then a jump to 0x16000, a page without memslot: the fetch fails (KVM_EXIT_INTERNAL_ERROR,
 *        what the KVM plugin reports as an EPT violation); the host maps the page (UD2 there) and
 *        resumes: #UD is delivered to the stub of vector 6 (OUT at CPL 0); the host stops.
 * Every address is below 0x100000 (identity map): kernel code is below 0x10000, user code at
 * 0x10000-0x1FFFF. Build: cc -O2 -Wall -o gen_guest gen_guest.c ; run as root.
 */
#include "../../probes/kvm/kvmprobe.h"

BLOB(k_entry, "out %al, $0xE0\n mov 0x14000, %eax\n"
              "pushq $0x2b\n pushq $0x12000\n pushq $0x202\n pushq $0x33\n pushq $0x10000\n iretq\n")
BLOB(u_main, "mov $3, %ecx\n"
             "1: mov 0x13000, %eax\n movl $0x55, 0x15000\n int3\n dec %ecx\n jnz 1b\n"
             "mov $0x16000, %eax\n jmp *%rax\n")
BLOB(u_late, "ud2\n")

static int step(struct vcpu *v, const char *what) {
    int rc = vcpu_run_timeout(v, 2000);
    print_exit(v, rc, what);
    if (rc == KVM_EXIT_MMIO && !v->run->mmio.is_write) memset(v->run->mmio.data, 0x11, 8);
    return rc;
}

int main(void) {
    struct vm vm = vm_create();
    guest_build(&vm);
    put_code(&vm, G_KCODE, k_entry_s, k_entry_e);
    put_code(&vm, G_UCODE, u_main_s, u_main_e);
    put_code(&vm, 0x16000, u_late_s, u_late_e);
    page_mode(&vm, 0x13000, 0);
    page_mode(&vm, 0x14000, 0);
    page_mode(&vm, 0x15000, 2);
    page_mode(&vm, 0x16000, 0);
    struct vcpu v = vcpu_create(&vm, 0);
    vcpu_longmode(&v, 0, G_KCODE, G_KSTACK_TOP);
    int rc = 0;
    for (int i = 0; i < 40; i++) {
        rc = step(&v, "exit: ");
        if (rc == KVM_EXIT_INTERNAL_ERROR) {
            page_mode(&vm, 0x16000, 1); /* the "hierarchy switch": the page is mapped, the fetch retried */
            continue;
        }
        if (rc == KVM_EXIT_IO && v.run->io.port == PORT_EXC && io_val(&v) == 6) break;
        if (rc < 0 || rc == KVM_EXIT_SHUTDOWN || rc == KVM_EXIT_HLT) break;
    }
    vcpu_destroy(&v);
    vm_destroy(&vm, 1);
    return rc == KVM_EXIT_IO ? 0 : 1;
}
