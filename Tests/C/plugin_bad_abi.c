/*
 * plugin_bad_abi.c - a plugin built for the next ABI major version: its entry accepts the host
 * and returns an ops table whose abi_version is (NPT_ABI_VERSION_MAJOR + 1) << 16. The core must
 * refuse it with NPT_ERR_ABI_MISMATCH and must not register it.
 */
#include <nptkit.h>

static npt_status never_called(void *backend_data, npt_vm *vm, const npt_vm_config *config, void **vm_data) {
    (void)backend_data;
    (void)vm;
    (void)config;
    (void)vm_data;
    return NPT_ERR_BACKEND;
}

static const npt_backend_ops future_ops = {
    .abi_version = (NPT_ABI_VERSION_MAJOR + 1u) << 16,
    .size = sizeof(npt_backend_ops),
    .name = "badabi",
    .description = "built for an ABI major version that does not exist yet",
    .capabilities = NPT_CAP_MBEC_EMULATION | NPT_CAP_RUN,
    .vm_create = never_called,
};

__attribute__((visibility("default")))
npt_status npt_plugin_entry(const npt_host_api *host, const npt_backend_ops **ops) {
    (void)host;
    if (ops == NULL) return NPT_ERR_INVALID_ARGUMENT;
    *ops = &future_ops;
    return NPT_OK;
}
