/* client.c - the README's C example: a VM on the default backend (the built-in simulator), one
 * page of kernel code, and what each shadow hierarchy exposes for it.
 * Build: cc -std=c11 -Iinclude examples/client.c -L$BIN -lnptkit -Wl,-rpath,$BIN */
#include <nptkit.h>
#include <stdio.h>

int main(void) {
    npt_context *ctx;
    npt_vm *vm;
    npt_translation sup = {sizeof sup, 0, 0, 0, 0}, user = {sizeof user, 0, 0, 0, 0};
    npt_vm_config cfg = {sizeof cfg, NPT_MBEC_EXACT, NULL, 64 << 20, NPT_PERM_READ | NPT_PERM_WRITE, 0, NULL};
    if (npt_context_create(&ctx) || npt_vm_create(ctx, &cfg, &vm)) { puts(npt_last_error()); return 1; }
    if (npt_policy_set(vm, 0x100000, 0x1000, NPT_PAGE_4K, NPT_PERM_READ | NPT_PERM_SX) || /* kernel code */
        npt_hierarchy_translate(vm, NPT_HIERARCHY_SUPERVISOR, 0x100000, &sup) ||
        npt_hierarchy_translate(vm, NPT_HIERARCHY_USER, 0x100000, &user)) { puts(npt_last_error()); return 1; }
    printf("supervisor hierarchy: perms %#llx\n", (unsigned long long)sup.perms); /* R|X */
    printf("user hierarchy:       perms %#llx\n", (unsigned long long)user.perms); /* R only: no X */
    npt_vm_destroy(vm);
    return npt_context_destroy(ctx);
}
