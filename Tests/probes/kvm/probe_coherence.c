/*
 * probe_coherence.c - (issue 13) two VMs on one guest memory: can the VMM learn that the guest wrote
 * a page table while its vCPU ran in the other VM, and what is the cheapest way to make the first
 * VM's shadow MMU drop the stale translation? (probe_twovm.c part 2 found the incoherence.)
 *
 * Setup as probe_twovm.c part 2: VM A's vCPU reads linear 0x14000 at CPL 3 (native; GPA 0x14000,
 * byte 0xAA) and stops at an MMIO read of 0x13000 (no memslot in A); VM B's vCPU (CPL 0, emulated)
 * rewrites the PTE of 0x14000 to GPA 0x15000 (byte 0xBB) and executes INVLPG; A reads 0x14000
 * again. B's memslots have KVM_MEM_LOG_DIRTY_PAGES.
 *  1. Does KVM_GET_DIRTY_LOG on B show the page-table page (0x4000, its own memslot) as written?
 *  2. Which of these, done on A between the two reads, makes A see 0xBB:
 *     (a) an unused memslot (0x3F000) deleted and re-created, SLOT_ZAP_ALL on (known: yes);
 *     (b) the same memslot moved to another GPA and back (KVM_MR_MOVE), SLOT_ZAP_ALL on;
 *     (c) the memslot holding the page-table page deleted and re-created, SLOT_ZAP_ALL off;
 *     (d) the page-table page's memslot: KVM_MEM_LOG_DIRTY_PAGES set and cleared (flags only);
 *     (e) nothing (known: no).
 *  3. Costs (p10/p50/p90 of N): KVM_GET_DIRTY_LOG of a one-page memslot and of a 448-page memslot
 *     (with and without dirty pages), (a), (b), one move of (b), (c).
 * Run: cc -O2 -Wall -o probe_coherence probe_coherence.c && ./probe_coherence [N]   (N = 1000)
 */
#include "kvmprobe.h"

static int N = 1000;
static uint8_t *mem;

BLOB(u_coh, "mov 0x14000, %ebx\n mov 0x13000, %eax\n mov 0x14000, %ecx\n mov 0x13000, %eax\n jmp .\n")
BLOB(k_coh, "movq $0x15007, 0x40a0\n invlpg 0x14000\n mov 0x14000, %eax\n out %al, $0xE1\n hlt\n")

static void log_slots(struct vm *vm, int on) {
    for (int p = 0; p < G_SMALL_PAGES; p++)
        if (vm->pmode[p]) set_slot(vm, (uint32_t)p, (uint64_t)p << 12, 0x1000, vm->mem + ((size_t)p << 12), on ? KVM_MEM_LOG_DIRTY_PAGES : 0);
    set_slot(vm, G_BIG_SLOT, G_SMALL_PAGES << 12, G_RAM - (G_SMALL_PAGES << 12), vm->mem + (G_SMALL_PAGES << 12), on ? KVM_MEM_LOG_DIRTY_PAGES : 0);
}
static uint64_t dirty_bits(struct vm *vm, uint32_t slot) {
    uint64_t bm[64] = {0};
    struct kvm_dirty_log d = {.slot = slot, .dirty_bitmap = bm};
    if (ioctl(vm->fd, KVM_GET_DIRTY_LOG, &d) < 0) DIE("KVM_GET_DIRTY_LOG slot %u", slot);
    uint64_t any = 0;
    for (int i = 0; i < 64; i++) any |= bm[i];
    return any;
}
static void disable_zap_all(struct vm *vm) {
    struct kvm_enable_cap eq = {.cap = KVM_CAP_DISABLE_QUIRKS2, .args = {KVM_X86_QUIRK_SLOT_ZAP_ALL}};
    if (ioctl(vm->fd, KVM_ENABLE_CAP, &eq) < 0) DIE("DISABLE_QUIRKS2");
}
static void move_slot(struct vm *vm, uint32_t slot, uint64_t gpa, void *host) {
    set_slot(vm, slot, gpa, 0x1000, host, 0);
}

static void coherence(int how) {
    static const char *hows[] = {"(a) unused memslot deleted+re-created, ZAP_ALL on", "(b) unused memslot moved and back, ZAP_ALL on",
                                 "(c) page-table page's memslot deleted+re-created, ZAP_ALL off",
                                 "(d) page-table page's memslot: LOG_DIRTY set+cleared, ZAP_ALL off", "(e) nothing"};
    memset(mem, 0, G_RAM);
    struct vm a = vm_create_on(mem), b = vm_create_on(mem);
    if (how == 2 || how == 3) disable_zap_all(&a);
    guest_build(&a);
    put_code(&a, G_UCODE, u_coh_s, u_coh_e);
    put_code(&a, G_KCODE, k_coh_s, k_coh_e);
    page_mode(&a, 0x13000, 0);
    log_slots(&b, 1);
    mem[0x14000] = 0xAA;
    mem[0x15000] = 0xBB;
    struct vcpu va = vcpu_create(&a, 0), vb = vcpu_create(&b, 0);
    vcpu_longmode(&va, 3, G_UCODE, G_USTACK_TOP);
    vcpu_longmode(&vb, 0, G_KCODE, G_KSTACK_TOP);
    int rc = vcpu_run_timeout(&va, 300);
    struct kvm_regs r;
    ioctl(va.fd, KVM_GET_REGS, &r);
    memset(va.run->mmio.data, 0, 8);
    uint64_t before[G_SMALL_PAGES];
    for (int p = 0; p < G_SMALL_PAGES; p++) before[p] = dirty_bits(&b, (uint32_t)p); /* clear */
    (void)before;
    rc = vcpu_run_timeout(&vb, 300);
    int bsaw = rc == KVM_EXIT_IO ? io_val(&vb) : -1;
    char dirty[256] = "";
    for (int p = 0; p < G_SMALL_PAGES; p++)
        if (dirty_bits(&b, (uint32_t)p)) snprintf(dirty + strlen(dirty), sizeof dirty - strlen(dirty), " %#x", p << 12);
    if (dirty_bits(&b, G_BIG_SLOT)) snprintf(dirty + strlen(dirty), sizeof dirty - strlen(dirty), " (big slot)");
    if (how == 0) { page_mode(&a, 0x3F000, 0); page_mode(&a, 0x3F000, 1); }
    if (how == 1) { move_slot(&a, 0x3F, 0x3F000000ull, mem + 0x3F000); move_slot(&a, 0x3F, 0x3F000, mem + 0x3F000); }
    if (how == 2) { page_mode(&a, G_PT, 0); page_mode(&a, G_PT, 1); }
    if (how == 3) {
        set_slot(&a, G_PT >> 12, G_PT, 0x1000, mem + G_PT, KVM_MEM_LOG_DIRTY_PAGES);
        set_slot(&a, G_PT >> 12, G_PT, 0x1000, mem + G_PT, 0);
    }
    rc = vcpu_run_timeout(&va, 300);
    ioctl(va.fd, KVM_GET_REGS, &r);
    int got = (int)(r.rcx & 0xff);
    printf("  %-66s B read %#x; B's dirty log:%s; A again %#x => %s\n", hows[how], bsaw, dirty, got,
           got == 0xBB ? "new translation" : got == 0xAA ? "OLD translation" : "?");
    vcpu_destroy(&va); vcpu_destroy(&vb);
    vm_destroy(&a, 0); vm_destroy(&b, 0);
}

BLOB(k_wr, "1: movq $1, 0x40000\n out %al, $0xE0\n jmp 1b\n")

static void costs(void) {
    memset(mem, 0, G_RAM);
    struct vm vm = vm_create_on(mem);
    guest_build(&vm);
    put_code(&vm, G_KCODE, k_wr_s, k_wr_e);
    log_slots(&vm, 1);
    struct vcpu v = vcpu_create(&vm, 0);
    vcpu_longmode(&v, 0, G_KCODE, G_KSTACK_TOP);
    uint64_t *t = calloc((size_t)N, 8);
    uint64_t bm[64];
    struct kvm_dirty_log d = {.dirty_bitmap = bm};
    d.slot = 0x20;
    for (int i = 0; i < N; i++) { uint64_t t0 = now_ns(); ioctl(vm.fd, KVM_GET_DIRTY_LOG, &d); t[i] = now_ns() - t0; }
    report_us("KVM_GET_DIRTY_LOG, one-page memslot, clean", t, (size_t)N);
    d.slot = G_BIG_SLOT;
    for (int i = 0; i < N; i++) { uint64_t t0 = now_ns(); ioctl(vm.fd, KVM_GET_DIRTY_LOG, &d); t[i] = now_ns() - t0; }
    report_us("KVM_GET_DIRTY_LOG, 448-page memslot, clean", t, (size_t)N);
    for (int i = 0; i < N; i++) {
        vcpu_run(&v); /* one emulated store to 0x40000 (big slot) */
        uint64_t t0 = now_ns(); ioctl(vm.fd, KVM_GET_DIRTY_LOG, &d); t[i] = now_ns() - t0;
    }
    report_us("KVM_GET_DIRTY_LOG, 448-page memslot, 1 page dirty", t, (size_t)N);
    log_slots(&vm, 0);
    for (int i = 0; i < N; i++) {
        uint64_t t0 = now_ns();
        page_mode(&vm, 0x3F000, 0); page_mode(&vm, 0x3F000, 1);
        t[i] = now_ns() - t0;
        vcpu_run(&v);
    }
    report_us("(a) unused memslot deleted+re-created (ZAP_ALL on)", t, (size_t)N);
    for (int i = 0; i < N; i++) {
        uint64_t t0 = now_ns();
        move_slot(&vm, 0x3F, 0x3F000000ull, mem + 0x3F000);
        t[i] = now_ns() - t0;
        move_slot(&vm, 0x3F, 0x3F000, mem + 0x3F000);
        vcpu_run(&v);
    }
    report_us("(b) one move of an unused memslot (ZAP_ALL on)", t, (size_t)N);
    vcpu_destroy(&v);
    vm_destroy(&vm, 0);
    vm = vm_create_on(mem);
    disable_zap_all(&vm);
    guest_build(&vm);
    put_code(&vm, G_KCODE, k_wr_s, k_wr_e);
    v = vcpu_create(&vm, 0);
    vcpu_longmode(&v, 0, G_KCODE, G_KSTACK_TOP);
    for (int i = 0; i < N; i++) {
        uint64_t t0 = now_ns();
        page_mode(&vm, G_PT, 0); page_mode(&vm, G_PT, 1);
        t[i] = now_ns() - t0;
        vcpu_run(&v);
    }
    report_us("(c) page-table page's memslot deleted+re-created (ZAP_ALL off)", t, (size_t)N);
    free(t);
    vcpu_destroy(&v);
    vm_destroy(&vm, 0);
}

int main(int argc, char **argv) {
    if (argc > 1) N = atoi(argv[1]);
    mem = mmap(NULL, G_RAM, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    char la[128];
    loadavg(la, sizeof la);
    printf("probe_coherence (loadavg %s)\n[1,2] B writes a PTE at CPL 0 and INVLPGs; what A sees after\n", la);
    for (int how = 0; how < 5; how++) coherence(how);
    printf("[3] costs, N = %d\n", N);
    costs();
    return 0;
}
