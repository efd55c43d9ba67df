#!/usr/bin/env bash
# Fetches the Debian kernel that `linux-image-amd64` currently depends on, with the modules the
# NVDIMM boot test needs, into a cache directory, and prints that directory.
#
# Usage: fetch_kernel.sh CACHE_ROOT
#   CACHE_ROOT/<package>_<version>/vmlinuz       the kernel image
#   CACHE_ROOT/<package>_<version>/modules/      nfit and every module it needs (uncompressed .ko)
#   CACHE_ROOT/<package>_<version>/load-order    module names, dependencies first
#   CACHE_ROOT/<package>_<version>/config        the kernel's build configuration (for the record)
# The package is fetched with `apt-get download` and unpacked with `dpkg-deb -x` (nothing is
# installed: /boot, the initramfs hooks and the host's modules are untouched); apt verifies it
# against the signed archive index. A cached directory is reused. The package lists are refreshed
# (as root) only when apt knows no linux-image-amd64.
set -euo pipefail
root="${1:?usage: $0 CACHE_ROOT}"
log() { echo "fetch_kernel: $*" >&2; }
die() { log "$*"; exit 1; }
command -v apt-cache >/dev/null && command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null ||
    die "needs apt-cache, apt-get and dpkg-deb (a Debian system)"

# The metapackage's dependency names the kernel Debian ships now.
find_pkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }'; }
pkg="$(find_pkg)"
if [ -z "$pkg" ] && [ "$(id -u)" = 0 ]; then
    log "apt knows no linux-image-amd64: apt-get update"
    apt-get update -qq >&2 || true
    pkg="$(find_pkg)"
fi
[ -n "$pkg" ] || die "apt-cache knows no linux-image-amd64 (run apt-get update as root)"
version="$(apt-cache policy "$pkg" | awk '/Candidate:/ { print $2; exit }')"
[ -n "$version" ] && [ "$version" != "(none)" ] || die "no candidate version of $pkg"
dir="$root/${pkg}_${version}"
if [ -f "$dir/complete" ]; then
    echo "$dir"
    exit 0
fi

mkdir -p "$root"
tmp="$(mktemp -d "$root/.fetch.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
log "downloading $pkg $version"
(cd "$tmp" && apt-get download "$pkg=$version") > "$tmp/apt.log" 2>&1 || { cat "$tmp/apt.log" >&2; die "apt-get download $pkg=$version failed"; }
deb="$(ls "$tmp"/*.deb)"
dpkg-deb -x "$deb" "$tmp/x"
kver="${pkg#linux-image-}"
kernel="$tmp/x/boot/vmlinuz-$kver"
[ -f "$kernel" ] || die "$deb has no boot/vmlinuz-$kver"
moddir="$(ls -d "$tmp"/x/lib/modules/*/kernel 2>/dev/null | head -1)"
[ -n "$moddir" ] || die "$deb has no lib/modules/*/kernel"

mkdir -p "$tmp/out/modules"
# One module, uncompressed, into out/modules/NAME.ko.
extract() {
    local name="$1" f
    f="$(find "$moddir" \( -name "$name.ko" -o -name "$name.ko.xz" -o -name "$name.ko.zst" -o -name "$name.ko.gz" \) | head -1)"
    [ -n "$f" ] || die "$pkg has no module $name"
    case "$f" in
        *.ko) cp "$f" "$tmp/out/modules/$name.ko" ;;
        *.xz) xz -dc "$f" > "$tmp/out/modules/$name.ko" ;;   # busybox insmod may not decompress
        *.zst) command -v zstd >/dev/null || die "$f is zstd-compressed and zstd is not installed"
               zstd -qdc "$f" > "$tmp/out/modules/$name.ko" ;;
        *.gz) gzip -dc "$f" > "$tmp/out/modules/$name.ko" ;;
    esac
}
# Its dependencies, from the depends= field of its .modinfo section.
depends() { tr '\0' '\n' < "$tmp/out/modules/$1.ko" | sed -n 's/^depends=//p' | head -1 | tr ',' ' '; }
# Depth-first: dependencies before the module that needs them.
order=()
visit() {
    local m="$1" d
    for d in "${order[@]:-}"; do [ "$d" = "$m" ] && return 0; done
    extract "$m"
    for d in $(depends "$m"); do visit "$d"; done
    order+=("$m")
}
for m in nfit nd_pmem; do visit "$m"; done
printf '%s\n' "${order[@]}" > "$tmp/out/load-order"
cp "$kernel" "$tmp/out/vmlinuz"
cp "$tmp/x/boot/config-$kver" "$tmp/out/config" 2>/dev/null || true
echo "$pkg $version" > "$tmp/out/complete"
rm -rf "$dir"
mv "$tmp/out" "$dir"
log "cached $pkg $version in $dir (modules: ${order[*]})"
echo "$dir"
