#!/usr/bin/env bash
# Runs every test of NPTKit: the Swift tests (unit, property, differential, scenario) and the C
# programs compiled against libnptkit.so (API, plugins, the C example, one under AddressSanitizer),
# the sanitizer jobs (scripts/sanitize.sh asan, tsan), short fuzz runs of every target
# (scripts/fuzz.sh all 20; NPTKIT_FUZZ_SECONDS changes the time), the guest NVDIMM tables through
# iasl and through a real Linux kernel booted in QEMU, and the demo 100 times in a row.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== swift build (libnptkit.so, nptkit-cli, tests)"
swift build
swift build --build-tests

echo "== swift test"
swift test --skip-build

echo "== C tests against libnptkit.so"
bash Tests/C/run.sh "$(swift build --show-bin-path)"

echo "== sanitizers: libnptkit.so under AddressSanitizer, the C tests under ASan+UBSan+LSan"
bash scripts/sanitize.sh asan

echo "== sanitizers: libnptkit.so and the KVM plugin under ThreadSanitizer (TSan-visible locks), racing C tests"
bash scripts/sanitize.sh tsan

echo "== fuzzing: every target for a short fixed time on a coverage-instrumented library (long runs: scripts/fuzz.sh TARGET SECONDS)"
bash scripts/fuzz.sh all "${NPTKIT_FUZZ_SECONDS:-20}"

echo "== Promela model of the privileged-mode protocol (spin)"
bash Tests/Promela/check.sh

echo "== guest NFIT decoded by ACPICA (iasl -d)"
bash Tests/NFIT/check_guest_nfit.sh "$(swift build --show-bin-path)"

echo "== a real Linux kernel reads the guest NFIT and SSDT (Debian's kernel in QEMU, TCG)"
bash Tests/Linux/boot_nvdimm.sh "$(swift build --show-bin-path)"

echo "== main job smoke run (nptkit demo)"
"$(swift build --show-bin-path)/nptkit-cli" demo > /tmp/nptkit-demo.log
grep -q "Attacks that ran guest code: 0" /tmp/nptkit-demo.log
# NVDIMM section: no loss where the protocol is honoured (trapped flushes; ADR), losses found with traps off.
grep -Eq "^Crash checker: 0 losses with trapped flushes on the platform that needs WPQ flushing, 0 on ADR, [1-9][0-9]* with traps disabled there$" /tmp/nptkit-demo.log
echo "demo: ok"
# The demo hung now and then (1 run in 30 to 400: an entry failed and a vCPU stayed in the mode):
# it must complete many runs in a row, each within a bound (1,000 in a row: README).
runs="${NPTKIT_DEMO_RUNS:-100}"
for i in $(seq 1 "$runs"); do
    if ! timeout 60 "$(swift build --show-bin-path)/nptkit-cli" demo > /tmp/nptkit-demo-loop.log 2>&1; then
        echo "demo run $i of $runs failed or hung:" >&2
        tail -20 /tmp/nptkit-demo-loop.log >&2
        exit 1
    fi
done
echo "demo: $runs runs in a row: ok"

echo "== smoke run on the KVM backend plugin (nptkit demo --backend kvm)"
if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
    "$(swift build --show-bin-path)/nptkit-cli" demo --backend kvm > /tmp/nptkit-demo-kvm.log
    kvm_expect() {
        grep -Eq "$1" /tmp/nptkit-demo-kvm.log || { echo "demo --backend kvm: no line matching: $1" >&2; exit 1; }
    }
    # MBEC: both attacks stopped as MBEC violations (user -> kernel page 0x8000, kernel -> user page 0x9000), 2 exits per call (lazy).
    kvm_expect "^  1 +user runs a supervisor-only page +3 +0x8000 +fetch +R-Xs-- "
    kvm_expect "^  2 +kernel runs a user page +0 +0x9000 +fetch +R---Xu "
    kvm_expect "^Attacks that ran guest code: 0   Faults the guest kernel saw: vector 20 at 0x8000, vector 20 at 0x9000$"
    kvm_expect "^Exits per system-call round trip: 2\.00 "
    # Privileged mode: every request served, no probe read the region, no heartbeat moved while it was visible.
    kvm_expect "^Entries ([1-9][0-9]*) of \1 requests, failures 0; reads of the region from outside the mode: [1-9][0-9]* blocked, 0 succeeded$"
    kvm_expect "^Heartbeats that moved while the region was visible: 0;"
    # NVDIMM: one exit and one msync per record where the host file needs flushing, none where it does not.
    kvm_expect "^  needs flushing +yes +4 +4 +4 +4 +4/4$"
    kvm_expect "^  needs no flushing +no +0 +0 +0 +4 +4/4$"
    echo "demo --backend kvm: ok"
else
    echo "demo --backend kvm: SKIPPED (/dev/kvm cannot be opened for reading and writing here)"
fi
