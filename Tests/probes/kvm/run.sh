#!/bin/sh
# Builds and runs every KVM probe in this directory (Tests/probes/kvm) and prints their results.
# Needs root (or access to /dev/kvm), cc. Each probe is one C file including kvmprobe.h;
# guest code is assembled into the probe binary (top-level asm), so no extra build step.
# Usage: sh run.sh [OUTDIR]   (binaries go to OUTDIR, default a temporary directory)
# Takes about half a minute on the 2-core build machine (23 s on 2026-11-29); loops are short.
set -e
cd "$(dirname "$0")"
out=${1:-$(mktemp -d /tmp/kvmprobes.XXXXXX)}
mkdir -p "$out"
probes="probe_caps probe_native probe_delivery probe_entry probe_guestdebug probe_msr probe_return probe_escalation probe_exit probe_twovm probe_memslot probe_revoke probe_flushstats probe_coherence probe_vcpustate"
for p in $probes; do
    extra=""
    [ "$p" = probe_revoke ] && extra="-lpthread"
    cc -O2 -Wall -o "$out/$p" "$p.c" $extra
done
echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ) $(uname -r) load: $(cat /proc/loadavg) cpus: $(nproc)"
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    echo "SKIPPED: /dev/kvm not usable"
    exit 77
fi
for p in $probes; do
    echo
    echo "===== $p"
    "$out/$p" || echo "($p exited with $?)"
done
