#!/usr/bin/env bash
# Installs NPTKit as a C library: scripts/install.sh --prefix DIR [--configuration release|debug]
#
#   DIR/lib/libnptkit.so.1.M.0        SONAME libnptkit.so.1, symbol versions NPTKIT_1.0 .. NPTKIT_1.M
#   DIR/lib/libnptkit.so.1, libnptkit.so -> it
#   DIR/lib/nptkit/plugins/libnptkit-kvm.so   (npt_plugin_load finds it by its bare name)
#   DIR/lib/pkgconfig/nptkit.pc       pkg-config --cflags --libs nptkit
#   DIR/include/nptkit.h, nptkit_sim.h
#   DIR/bin/nptkit-cli
#
# The library is linked in its own scratch directory (.build/install-CONFIG) with the SONAME and a
# version script generated from the header (scripts/gen-call-table.py --version-script), which
# exports the npt_ functions only. The library needs the Swift runtime of the toolchain that built
# it (its RUNPATH names the toolchain's runtime directory).
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=""
config=release
while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) prefix="$2"; shift 2 ;;
        --prefix=*) prefix="${1#--prefix=}"; shift ;;
        --configuration|-c) config="$2"; shift 2 ;;
        *) echo "usage: $0 --prefix DIR [--configuration release|debug]" >&2; exit 2 ;;
    esac
done
[ -n "$prefix" ] || { echo "usage: $0 --prefix DIR [--configuration release|debug]" >&2; exit 2; }
mkdir -p "$prefix"
prefix="$(cd "$prefix" && pwd)"

major=$(sed -n 's/^#define NPT_ABI_VERSION_MAJOR \([0-9]*\)u.*/\1/p' include/nptkit.h)
minor=$(sed -n 's/^#define NPT_ABI_VERSION_MINOR \([0-9]*\)u.*/\1/p' include/nptkit.h)
version="$major.$minor.0"
scratch=".build/install-$config"
mkdir -p "$scratch"
python3 scripts/gen-call-table.py --version-script "$scratch/nptkit.map"

echo "install: building ($config) into $scratch"
swift build -c "$config" --scratch-path "$scratch" --product nptkit \
    -Xlinker "-soname=libnptkit.so.$major" -Xlinker "--version-script=$PWD/$scratch/nptkit.map"
swift build -c "$config" --scratch-path "$scratch" --product nptkit-kvm
swift build -c "$config" --scratch-path "$scratch" --product nptkit-cli
bin="$(swift build -c "$config" --scratch-path "$scratch" --show-bin-path)"

install -d "$prefix/lib/nptkit/plugins" "$prefix/lib/pkgconfig" "$prefix/include" "$prefix/bin"
install -m 755 "$bin/libnptkit.so" "$prefix/lib/libnptkit.so.$version"
ln -sf "libnptkit.so.$version" "$prefix/lib/libnptkit.so.$major"
ln -sf "libnptkit.so.$major" "$prefix/lib/libnptkit.so"
install -m 755 "$bin/libnptkit-kvm.so" "$prefix/lib/nptkit/plugins/libnptkit-kvm.so"
install -m 644 include/nptkit.h include/nptkit_sim.h "$prefix/include/"
install -m 755 "$bin/nptkit-cli" "$prefix/bin/nptkit-cli"
cat > "$prefix/lib/pkgconfig/nptkit.pc" <<PC
prefix=$prefix
libdir=\${prefix}/lib
includedir=\${prefix}/include
plugindir=\${libdir}/nptkit/plugins

Name: nptkit
Description: NPTKit: emulated MBEC, a privileged mode with a secure global view, virtualized NVDIMM flushing (C ABI)
Version: $version
Cflags: -I\${includedir}
Libs: -L\${libdir} -lnptkit -Wl,-rpath,\${libdir}
Libs.private: -ldl -lpthread
PC
echo "install: libnptkit.so.$version (SONAME libnptkit.so.$major), the KVM plugin, nptkit.pc, the headers and nptkit-cli in $prefix"
