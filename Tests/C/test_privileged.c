/* The privileged-mode C ABI: region description and its bad input, entering from vCPU threads
 * driven with npt_vcpu_run, the holder, RSM from the guest, leaving when not held, statistics, a
 * vCPU's view (npt_vcpu_privileged_view) and its bad input. */
#include <nptkit.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

static int passed, failed;
#define CHECK(cond) do { if (cond) passed++; else { failed++; fprintf(stderr, "%s:%d: CHECK failed: %s (%s)\n", __FILE__, __LINE__, #cond, npt_last_error()); } } while (0)

static void emit(uint8_t *buf, size_t *off, uint8_t op, uint8_t a, uint8_t b, int32_t imm) {
    buf[*off] = op; buf[*off + 1] = a; buf[*off + 2] = b; buf[*off + 3] = 0;
    memcpy(buf + *off + 4, &imm, 4);
    *off += 8;
}

#define RAM (4u << 20)
#define REGION 0x80000000ull
#define CODE 0x1000ull

static atomic_int done;
typedef struct { npt_vcpu *cpu; int ios; int other; } worker;

static void *drive(void *arg) {
    worker *w = arg;
    npt_exit e = { .size = sizeof e };
    while (!atomic_load(&done)) {
        if (npt_vcpu_run(w->cpu, &e) != NPT_OK) { w->other++; break; }
        if (e.reason == NPT_EXIT_IO && e.io_port == 9) w->ios++;
        else if (e.reason != NPT_EXIT_BUDGET) w->other++;
    }
    return NULL;
}

int main(void) {
    npt_context *ctx; npt_vm *vm;
    npt_vm_config cfg = { sizeof cfg, NPT_MBEC_EXACT, NULL, RAM, NPT_PERM_READ | NPT_PERM_WRITE, 2000, NULL };
    CHECK(npt_context_create(&ctx) == NPT_OK);
    CHECK(npt_vm_create(ctx, &cfg, &vm) == NPT_OK);

    /* Guest: a self-loop at CODE (paging off). Region: OUT r0 (the vCPU index), port 9; RSM. */
    uint8_t code[64]; size_t n = 0;
    emit(code, &n, 0x05, 3, 0, 1);          /* ADDI r3, 1 */
    emit(code, &n, 0x08, 0, 0, -16);        /* JMP back */
    CHECK(npt_vm_write_memory(vm, CODE, code, n) == NPT_OK);
    /* Paging is off: every address is user-mode (Intel SDM), so under MBEC the loop needs UX. */
    CHECK(npt_policy_set(vm, CODE, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_UX) == NPT_OK);
    uint8_t handler[64]; size_t h = 0;
    emit(handler, &h, 0x0F, 0, 0, 9);       /* OUT r0, 9 */
    emit(handler, &h, 0x13, 0, 0, 0);       /* RSM */

    /* Bad regions: each refused, nothing changed. */
    npt_region r = { sizeof r, 0, REGION, 0x10000, handler, h, 0, 0 };
    npt_region bad = r; bad.gpa = 0x2000;                         /* overlaps RAM */
    CHECK(npt_region_set(vm, &bad) == NPT_ERR_OVERLAP);
    CHECK(strstr(npt_last_error(), "RAM") != NULL);
    bad = r; bad.length = 0;                                      /* zero-length */
    CHECK(npt_region_set(vm, &bad) == NPT_ERR_INVALID_ARGUMENT);
    bad = r; bad.gpa = REGION + 0x800;                            /* misaligned */
    CHECK(npt_region_set(vm, &bad) == NPT_ERR_MISALIGNED);
    bad = r; bad.length = 0x1800;
    CHECK(npt_region_set(vm, &bad) == NPT_ERR_MISALIGNED);
    bad = r; bad.contents = NULL;
    CHECK(npt_region_set(vm, &bad) == NPT_ERR_INVALID_ARGUMENT);
    bad = r; bad.entry_offset = 0x10000;
    CHECK(npt_region_set(vm, &bad) == NPT_ERR_INVALID_ARGUMENT);
    bad = r; bad.size = 4;
    CHECK(npt_region_set(vm, &bad) == NPT_ERR_INVALID_ARGUMENT);
    CHECK(npt_region_set(vm, NULL) == NPT_ERR_INVALID_ARGUMENT);
    npt_translation t = { sizeof t, 0, 0, 0, 0 };
    CHECK(npt_hierarchy_translate(vm, NPT_HIERARCHY_SUPERVISOR, REGION, &t) == NPT_OK && t.level == 0);

    npt_vcpu *cpus[3];
    for (uint32_t i = 0; i < 3; i++) {
        CHECK(npt_vcpu_create(vm, i, &cpus[i]) == NPT_OK);
        npt_regs regs; memset(&regs, 0, sizeof regs); regs.size = sizeof regs;
        regs.rip = CODE; regs.gpr[0] = 0;
        CHECK(npt_vcpu_set_regs(cpus[i], &regs) == NPT_OK);
    }
    CHECK(npt_vcpu_raise_privileged(cpus[0]) == NPT_ERR_STATE);   /* no region yet */
    CHECK(npt_region_set(vm, &r) == NPT_OK);
    CHECK(npt_vcpu_leave_privileged(cpus[1]) == NPT_ERR_STATE);   /* not in the mode */
    int64_t holder = 7;
    CHECK(npt_vm_privileged_holder(vm, &holder) == NPT_OK && holder == -1);
    /* npt_vcpu_privileged_view (ABI 1.6): bad input refused, nothing written */
    npt_privileged_view pv;
    memset(&pv, 0x5A, sizeof pv);
    pv.size = sizeof pv;
    CHECK(npt_vcpu_privileged_view(cpus[0], &pv) == NPT_OK && pv.holder == -1 && pv.requests == 0 && pv.entries == 0 &&
          pv.failures == 0 && pv.deferred_interrupts == 0 && pv.reserved == 0);
    CHECK(npt_vcpu_privileged_view(cpus[0], NULL) == NPT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(npt_last_error(), "view") != NULL);
    CHECK(npt_vcpu_privileged_view(NULL, &pv) == NPT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(npt_last_error(), "vcpu is NULL") != NULL);
    memset(&pv, 0x5A, sizeof pv);
    pv.size = 8; /* below the first published size */
    CHECK(npt_vcpu_privileged_view(cpus[0], &pv) == NPT_ERR_INVALID_ARGUMENT);
    CHECK(strstr(npt_last_error(), "view->size is 8") != NULL);
    CHECK(pv.holder == (int64_t)0x5A5A5A5A5A5A5A5Aull && pv.entries == 0x5A5A5A5A5A5A5A5Aull);
    struct { npt_privileged_view v; uint64_t future[2]; } newer; /* a newer program's larger view */
    memset(&newer, 0x5A, sizeof newer);
    newer.v.size = sizeof newer;
    CHECK(npt_vcpu_privileged_view(cpus[0], &newer.v) == NPT_OK && newer.v.holder == -1 && newer.v.size == sizeof newer &&
          newer.future[0] == 0x5A5A5A5A5A5A5A5Aull && newer.future[1] == 0x5A5A5A5A5A5A5A5Aull);
    CHECK(npt_vm_set_stop_timeout(vm, 0) == NPT_ERR_INVALID_ARGUMENT);
    CHECK(npt_vm_set_stop_timeout(vm, 5000000000ull) == NPT_OK);

    /* Three vCPU threads; requests raised from this thread. */
    pthread_t th[3]; worker w[3];
    for (int i = 0; i < 3; i++) { w[i] = (worker){ cpus[i], 0, 0 }; pthread_create(&th[i], NULL, drive, &w[i]); }
    const int requests = 30;
    for (int k = 0; k < requests; k++) CHECK(npt_vcpu_raise_privileged(cpus[k % 3]) == NPT_OK);
    npt_privileged_stats ps = { .size = sizeof ps };
    for (int spins = 0; spins < 20000; spins++) {
        CHECK(npt_vm_get_privileged_stats(vm, &ps) == NPT_OK);
        /* Every request entered, and the last holder has left (a vCPU abandoned inside the mode
         * would keep the others stopped, as a real SMM handler that never returns would). */
        if (ps.entries >= (uint64_t)requests && npt_vm_privileged_holder(vm, &holder) == NPT_OK && holder == -1) break;
        struct timespec ts = { 0, 1000000 }; nanosleep(&ts, NULL);
    }
    atomic_store(&done, 1);
    for (int i = 0; i < 3; i++) pthread_join(th[i], NULL);
    CHECK(ps.requests == (uint64_t)requests);
    CHECK(ps.entries == (uint64_t)requests);
    CHECK(ps.failures == 0);
    CHECK(ps.outside_while_visible == 0);
    CHECK(w[0].ios + w[1].ios + w[2].ios == requests);        /* each entry ran the handler once */
    CHECK(w[0].ios == 10 && w[1].ios == 10 && w[2].ios == 10); /* on the requesting vCPU */
    CHECK(w[0].other + w[1].other + w[2].other == 0);
    CHECK(npt_vm_privileged_holder(vm, &holder) == NPT_OK && holder == -1);
    CHECK(npt_hierarchy_translate(vm, NPT_HIERARCHY_SUPERVISOR, REGION, &t) == NPT_OK && t.level == 0);
    /* The view from each vCPU: the same counts as the VM-wide statistics, no holder. */
    for (int i = 0; i < 3; i++) {
        memset(&pv, 0, sizeof pv);
        pv.size = sizeof pv;
        CHECK(npt_vcpu_privileged_view(cpus[i], &pv) == NPT_OK && pv.holder == -1 && pv.requests == ps.requests &&
              pv.entries == ps.entries && pv.failures == ps.failures && pv.deferred_interrupts == ps.deferred_interrupts);
    }

    /* A destroyed vCPU is an unknown vCPU. */
    CHECK(npt_vcpu_destroy(cpus[2]) == NPT_OK);
    CHECK(npt_vcpu_raise_privileged(cpus[2]) == NPT_ERR_BAD_HANDLE);
    CHECK(npt_vcpu_privileged_view(cpus[2], &pv) == NPT_ERR_BAD_HANDLE);
    int deferred = -1;
    CHECK(npt_vcpu_raise_interrupt(cpus[2], 32, &deferred) == NPT_ERR_BAD_HANDLE && deferred == -1);

    CHECK(npt_vm_destroy(vm) == NPT_OK);
    CHECK(npt_context_destroy(ctx) == NPT_OK);
    printf("c-test test_privileged: %d passed, %d failed\n", passed, failed);
    return failed != 0;
}
