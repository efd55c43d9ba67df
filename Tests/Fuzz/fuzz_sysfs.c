/* libFuzzer target: a libnvdimm sysfs tree from outside (/sys/bus/nd/devices, or a tree given to
 * nptkit-cli host-pmem --sysfs) through npt_host_pmem_discover_sysfs. The input is a list of
 * entries, each naming a directory and a file from the names the discovery reads (and some it must
 * ignore) and giving the file's bytes; the tree is written to a fresh directory under /dev/shm (or
 * TMPDIR) and discovered, with room for everything and then with too little. */
#define _XOPEN_SOURCE 700
#include "fuzz_common.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *dirs[] = { "region0", "region1", "region7", "region4294967295", "region01", "region-1", "regionX",
                              "nmem0", "nmem1", "nmem2", "region2", "namespace0.0", "btt0.0", "ndbus0" };
static const char *files[] = { "resource", "size", "deep_flush", "persistence_domain", "mappings", "mapping0",
                               "mapping1", "mapping2", "nfit/handle", "nfit", "devtype", "uevent", "mapping99" };
static char base[256];

static int rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb; (void)flag; (void)ftw;
    return remove(path);
}

static void write_file(const char *path, const uint8_t *bytes, size_t n) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return;
    while (n > 0) {
        ssize_t w = write(fd, bytes, n);
        if (w <= 0) break;
        bytes += w;
        n -= (size_t)w;
    }
    close(fd);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (!base[0]) {
        const char *tmp = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : (getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
        snprintf(base, sizeof base, "%s/nptkit-fuzz-sysfs-%d", tmp, (int)getpid());
    }
    nftw(base, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    FUZZ_ASSERT(mkdir(base, 0755) == 0 || errno == EEXIST);
    input in = { data, size, 0 };
    char path[512];
    for (int k = 0; k < 24 && !in_done(&in); k++) {
        uint8_t sel = in_u8(&in);
        const char *d = dirs[(sel >> 4) % (sizeof dirs / sizeof dirs[0])];
        const char *f = files[(sel & 15) % (sizeof files / sizeof files[0])];
        size_t len = in_u8(&in) % 64;
        if (len > in.n - in.i) len = in.n - in.i;
        const uint8_t *content = in.p + in.i;
        in.i += len;
        snprintf(path, sizeof path, "%s/%s", base, d);
        mkdir(path, 0755);
        if (strncmp(f, "nfit/", 5) == 0) {
            snprintf(path, sizeof path, "%s/%s/nfit", base, d);
            mkdir(path, 0755);
        }
        snprintf(path, sizeof path, "%s/%s/%s", base, d, f);
        write_file(path, content, len);
    }
    npt_sysfs_pmem_region regions[32];
    npt_flush_target targets[128];
    size_t rc = 0, tc = 0;
    npt_status s = checked(npt_host_pmem_discover_sysfs(base, regions, 32, &rc, targets, 128, &tc));
    if (s == NPT_OK) {
        FUZZ_ASSERT(rc <= 32 && tc <= 128);
        for (size_t i = 0; i < rc; i++) {
            FUZZ_ASSERT(regions[i].first_target + regions[i].flush_target_count <= tc);
            if (i > 0) FUZZ_ASSERT(regions[i - 1].id < regions[i].id);
        }
        if (rc > 0) {
            size_t rc2 = 0, tc2 = 0;
            FUZZ_ASSERT(checked(npt_host_pmem_discover_sysfs(base, regions, rc - 1, &rc2, targets, 128, &tc2)) ==
                        NPT_ERR_BUFFER_TOO_SMALL);
        }
    } else {
        FUZZ_ASSERT(s == NPT_ERR_INVALID_ARGUMENT || s == NPT_ERR_BUFFER_TOO_SMALL || s == NPT_ERR_NOT_FOUND);
    }
    return 0;
}
