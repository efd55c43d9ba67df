#!/usr/bin/env bash
# Runs every test of NPTKit: the Swift tests (unit, property, differential, scenario) and the C
# programs compiled against libnptkit.so (API, plugins, the C example, one under AddressSanitizer).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== swift build (libnptkit.so, nptkit-cli, tests)"
swift build
swift build --build-tests

echo "== swift test"
swift test --skip-build

echo "== C tests against libnptkit.so"
bash Tests/C/run.sh "$(swift build --show-bin-path)"

echo "== Promela model of the privileged-mode protocol (spin)"
bash Tests/Promela/check.sh

echo "== guest NFIT decoded by ACPICA (iasl -d)"
bash Tests/NFIT/check_guest_nfit.sh "$(swift build --show-bin-path)"

echo "== main job smoke run (nptkit demo)"
"$(swift build --show-bin-path)/nptkit-cli" demo > /tmp/nptkit-demo.log
grep -q "Attacks that ran guest code: 0" /tmp/nptkit-demo.log
# NVDIMM section: no loss where the protocol is honoured (trapped flushes; ADR), losses found with traps off.
grep -Eq "^Crash checker: 0 losses with trapped flushes on the platform that needs WPQ flushing, 0 on ADR, [1-9][0-9]* with traps disabled there$" /tmp/nptkit-demo.log
echo "demo: ok"
