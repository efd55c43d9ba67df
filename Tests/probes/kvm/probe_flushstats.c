/*
 * probe_flushstats.c - (issue 13, two-VM coherence) can the VMM see, without a vCPU ioctl, that the
 * guest flushed its TLB or wrote a page table while a vCPU ran?
 *
 * A CPL 0 guest (emulated here) runs one of the snippets below and OUTs; every vCPU statistic and
 * every VM statistic (KVM_GET_STATS_FD, read with pread: no vCPU load) that changed across the run
 * is printed, next to the same for a snippet that does nothing of the kind. SYNC_REGS CR3 before and
 * after is printed too. Each snippet is preceded by a warm-up OUT (the first KVM_RUN of a vCPU
 * creates its MMU root and flushes), and the statistics are compared over the second KVM_RUN.
 *   none            out
 *   invlpg          invlpg 0x14000
 *   cr3-same        mov %cr3,%rax; mov %rax,%cr3
 *   cr3-other       cr3 = a copy of the PML4 at 0x3E000, then back
 *   cr4-pge         cr4 ^= PGE, then back
 *   pte-write       rewrite the PTE of 0x14000 (no flush)
 *   data-write      two ordinary stores (kernel data page, user page): no page table
 *   pte-write+inv   rewrite the PTE of 0x14000, invlpg
 * Run: cc -O2 -Wall -o probe_flushstats probe_flushstats.c && ./probe_flushstats
 */
#include "kvmprobe.h"

BLOB(k_none, "out %al, $0xE0\n out %al, $0xE0\n hlt\n")
BLOB(k_invlpg, "out %al, $0xE0\n invlpg 0x14000\n out %al, $0xE0\n hlt\n")
BLOB(k_cr3same, "out %al, $0xE0\n mov %cr3, %rax\n mov %rax, %cr3\n out %al, $0xE0\n hlt\n")
BLOB(k_cr3other, "out %al, $0xE0\n mov %cr3, %rbx\n mov $0x3E000, %rax\n mov %rax, %cr3\n mov %rbx, %cr3\n out %al, $0xE0\n hlt\n")
BLOB(k_cr4pge, "out %al, $0xE0\n mov %cr4, %rax\n xor $0x80, %rax\n mov %rax, %cr4\n xor $0x80, %rax\n mov %rax, %cr4\n out %al, $0xE0\n hlt\n")
BLOB(k_ptew, "out %al, $0xE0\n movq $0x15007, 0x40a0\n out %al, $0xE0\n hlt\n")
BLOB(k_dataw, "out %al, $0xE0\n movq $0x15007, 0xC000\n movq $1, 0x14008\n out %al, $0xE0\n hlt\n")
BLOB(k_ptewinv, "out %al, $0xE0\n movq $0x15007, 0x40a0\n invlpg 0x14000\n out %al, $0xE0\n hlt\n")

static struct kp_stats vst, mst;
static uint64_t vbefore[512], mbefore[512];

static void snap(struct kp_stats *s, uint64_t *out) {
    for (uint32_t i = 0; s->fd >= 0 && i < s->h.num_desc && i < 512; i++) {
        struct kvm_stats_desc *d = (void *)((char *)s->d + i * s->dsz);
        uint64_t v = 0;
        if (pread(s->fd, &v, 8, s->h.data_offset + d->offset) != 8) v = ~0ull;
        out[i] = v;
    }
}
static void diff(const char *what, struct kp_stats *s, uint64_t *before) {
    uint64_t now[512];
    snap(s, now);
    printf(" %s:", what);
    for (uint32_t i = 0; s->fd >= 0 && i < s->h.num_desc && i < 512; i++) {
        struct kvm_stats_desc *d = (void *)((char *)s->d + i * s->dsz);
        if (now[i] != before[i] && strcmp(d->name, "halt_wait_ns") && strncmp(d->name, "halt_wait_hist", 14) &&
            strncmp(d->name, "halt_poll", 9))
            printf(" %s+%lld", d->name, (long long)(now[i] - before[i]));
    }
}

static void one(const char *label, const uint8_t *s, const uint8_t *e) {
    struct vm vm = vm_create();
    guest_build(&vm);
    memcpy(vm.mem + 0x3E000, vm.mem + G_PML4, 0x1000); /* a second PML4 sharing the lower tables */
    vm.mem[0x14000] = 0xAA;
    vm.mem[0x15000] = 0xBB;
    struct vcpu v = vcpu_create(&vm, 0);
    int rc;
    put_code(&vm, G_KCODE, s, e);
    vcpu_longmode(&v, 0, G_KCODE, G_KSTACK_TOP);
    v.run->kvm_valid_regs = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS;
    /* warm-up: up to the first OUT */
    rc = vcpu_run_timeout(&v, 300);
    if (!is_out(&v, rc, 0xE0)) { print_exit(&v, rc, "  unexpected "); return; }
    vst = stats_open(v.fd);
    mst = stats_open(vm.fd);
    snap(&vst, vbefore);
    snap(&mst, mbefore);
    uint64_t cr3a = v.run->s.regs.sregs.cr3;
    rc = vcpu_run_timeout(&v, 300);
    printf("  %-14s exit %s port %#x; cr3 %#llx -> %#llx;", label, exit_name((uint32_t)(rc < 0 ? 0 : rc)),
           rc == KVM_EXIT_IO ? v.run->io.port : 0, (unsigned long long)cr3a, (unsigned long long)v.run->s.regs.sregs.cr3);
    diff("vcpu", &vst, vbefore);
    diff("| vm", &mst, mbefore);
    printf("\n");
    vcpu_destroy(&v);
    vm_destroy(&vm, 1);
}

int main(void) {
    char la[128];
    loadavg(la, sizeof la);
    printf("probe_flushstats (loadavg %s): statistics that changed over one KVM_RUN\n", la);
    one("none", k_none_s, k_none_e);
    one("invlpg", k_invlpg_s, k_invlpg_e);
    one("cr3-same", k_cr3same_s, k_cr3same_e);
    one("cr3-other", k_cr3other_s, k_cr3other_e);
    one("cr4-pge", k_cr4pge_s, k_cr4pge_e);
    one("pte-write", k_ptew_s, k_ptew_e);
    one("data-write", k_dataw_s, k_dataw_e);
    one("pte-write+inv", k_ptewinv_s, k_ptewinv_e);
    return 0;
}
