#!/usr/bin/env bash
# Runs every test of NPTKit: the Swift tests (unit, property, differential, scenario, trace format) and the C
# programs compiled against libnptkit.so (API, plugins, the C example, one under AddressSanitizer, programs built
# against the frozen published headers Tests/C/abi/1.N, call tracing and replay), the installed library (scripts/install.sh, pkg-config,
# examples/minivmm),
# the sanitizer jobs (scripts/sanitize.sh asan, tsan), short fuzz runs of every target
# (scripts/fuzz.sh all 20; NPTKIT_FUZZ_SECONDS changes the time), the guest NVDIMM tables through
# iasl and through a real Linux kernel booted in QEMU, and the demo 100 times in a row.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/stale-headers.sh
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

echo "== the installed library (scripts/install.sh into a temporary prefix; every example built with pkg-config alone)"
PREFIX="$(mktemp -d /tmp/nptkit-prefix.XXXXXX)"
bash scripts/install.sh --prefix "$PREFIX" --configuration debug > /tmp/nptkit-install.log 2>&1 \
    || { tail -20 /tmp/nptkit-install.log >&2; echo "install failed" >&2; exit 1; }
export PKG_CONFIG_PATH="$PREFIX/lib/pkgconfig"
want="$(sed -n 's/^#define NPT_ABI_VERSION_MAJOR \([0-9]*\)u.*/\1/p' include/nptkit.h).$(sed -n 's/^#define NPT_ABI_VERSION_MINOR \([0-9]*\)u.*/\1/p' include/nptkit.h).0"
[ "$(pkg-config --modversion nptkit)" = "$want" ] || { echo "pkg-config --modversion nptkit: not $want" >&2; exit 1; }
readelf -d "$PREFIX/lib/libnptkit.so" | grep -q "Library soname: \[libnptkit.so.1\]" || { echo "no SONAME libnptkit.so.1" >&2; exit 1; }
# Every symbol the library defines for others is an npt_ function of a version node NPTKIT_1.N.
bad_syms=$(readelf --dyn-syms -W "$PREFIX/lib/libnptkit.so" | awk '$5 == "GLOBAL" && $7 != "UND" && $7 != "ABS" {print $8}' | grep -Ev '^npt_[a-z0-9_]+@@NPTKIT_1\.[0-9]+$' || true)
[ -z "$bad_syms" ] || { echo "exported beyond npt_@@NPTKIT_1.N: $bad_syms" >&2; exit 1; }
nodes=$(readelf --dyn-syms -W "$PREFIX/lib/libnptkit.so" | grep -o '@@NPTKIT_1\.[0-9]*' | sort -u | tr '\n' ' ')
cc -std=c11 -Wall -Wextra -Werror -pedantic examples/client.c $(pkg-config --cflags --libs nptkit) -o "$PREFIX/client"
cc -std=c11 -Wall -Wextra -Werror -pedantic examples/minivmm/minivmm.c $(pkg-config --cflags --libs nptkit) -pthread -o "$PREFIX/bin/minivmm"
cc -std=c11 -Wall -Wextra -Werror -pedantic -shared -fPIC examples/plugin/sample_backend.c $(pkg-config --cflags nptkit) \
    -pthread -o "$PREFIX/libnptkit-sample.so"
readelf -d "$PREFIX/client" | grep -q "NEEDED.*\[libnptkit.so.1\]" || { echo "client does not need libnptkit.so.1" >&2; exit 1; }
NPTKIT_CALL_TRACE="$PREFIX/client.trace" "$PREFIX/client" > /dev/null
"$PREFIX/bin/nptkit-cli" replay-calls "$PREFIX/client.trace" | grep -q "replayed, 0 mismatches$" \
    || { echo "the installed CLI did not replay the client's trace" >&2; exit 1; }
# minivmm checks what its guests did itself (exit 1 otherwise); the lines say which path it took.
minivmm_run() { # LOG ARGS...: runs the installed minivmm (from /, so nothing of the tree is found by accident)
    local log="$1"; shift
    (cd / && "$PREFIX/bin/minivmm" "$@") > "$log" 2>&1 || { cat "$log" >&2; echo "minivmm $* failed" >&2; exit 1; }
    grep -q "^minivmm: ok$" "$log" || { cat "$log" >&2; echo "minivmm $*: no 'minivmm: ok'" >&2; exit 1; }
}
minivmm_expect() { # LOG REGEX
    grep -Eq "$2" "$1" || { cat "$1" >&2; echo "minivmm: no line matching: $2" >&2; exit 1; }
}
minivmm_run /tmp/nptkit-minivmm.log 2
minivmm_expect /tmp/nptkit-minivmm.log "^plugin: loaded backend 'kvm' from the plugin directory$"
if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
    # x86-64 guests on KVM: the HVCI guest's two attacks reported and injected as #VE (the guest kernel saw
    # them at the driver page and at the JIT page's alias), none ran; every NVDIMM record flushed through
    # the trapped vFHA (an exit and an msync each) and read back; every privileged-mode request served,
    # with no heartbeat moving in the handler and no probe reading the region.
    minivmm_expect /tmp/nptkit-minivmm.log "^vm: backend 'kvm', guest ISA x86-64, MBEC lazy"
    minivmm_expect /tmp/nptkit-minivmm.log "^mbec: 4 write calls printed; 2 violations reported \(gpa 0x8000, 0xc000\), each injected as #VE; the guest kernel saw vector 20 at 0x8000, vector 20 at 0xd000; attacks that ran guest code: 0$"
    minivmm_expect /tmp/nptkit-minivmm.log "^nvdimm: 16 records made durable: 16 guest flushes, 16 flush exits, 16 physical flushes; 16 of 16 records read back$"
    minivmm_expect /tmp/nptkit-minivmm.log "^privileged mode: 6 requests, 6 entries, 0 failures; the handler ran 6 times, saw the heartbeats move 0 times; the region leaked to a probe 0 times$"
else
    minivmm_expect /tmp/nptkit-minivmm.log "^backend: the simulator \(no VM on 'kvm'"
fi
sed 's/^/  /' /tmp/nptkit-minivmm.log
# The simulator path: asked for, and with the plugin absent.
minivmm_run /tmp/nptkit-minivmm-sim.log 2 --backend sim
minivmm_expect /tmp/nptkit-minivmm-sim.log "^backend: the simulator \(--backend sim\)$"
minivmm_run /tmp/nptkit-minivmm-noplugin.log 3 --plugin libnptkit-absent.so
minivmm_expect /tmp/nptkit-minivmm-noplugin.log "^plugin: not loaded \(.*libnptkit-absent.so"
minivmm_expect /tmp/nptkit-minivmm-noplugin.log "^backend: the simulator \(no KVM plugin\)$"
for log in /tmp/nptkit-minivmm-sim.log /tmp/nptkit-minivmm-noplugin.log; do
    minivmm_expect "$log" "^vm: backend 'sim', guest ISA sim, MBEC exact"
    minivmm_expect "$log" "^privileged mode: ([0-9]+) requests, \1 entries, 0 failures$"
done
# /dev/kvm unusable (bound to /dev/null in a mount namespace of its own, where that is allowed): the
# plugin loads, its VM is refused, the simulator runs.
if [ -e /dev/kvm ] && unshare -m true 2>/dev/null; then
    unshare -m sh -c 'mount --bind /dev/null /dev/kvm && cd / && exec "$0" 2' "$PREFIX/bin/minivmm" > /tmp/nptkit-minivmm-nokvm.log 2>&1 \
        || { cat /tmp/nptkit-minivmm-nokvm.log >&2; echo "minivmm without a usable /dev/kvm failed" >&2; exit 1; }
    minivmm_expect /tmp/nptkit-minivmm-nokvm.log "^backend: the simulator \(no VM on 'kvm': "
    minivmm_expect /tmp/nptkit-minivmm-nokvm.log "^minivmm: ok$"
    echo "minivmm: the KVM path, --backend sim, no plugin, /dev/kvm unusable: ok"
else
    echo "minivmm: the KVM path, --backend sim, no plugin: ok (/dev/kvm unusable: SKIPPED, no mount namespace here)"
fi
echo "install: ok (SONAME libnptkit.so.1, version nodes ${nodes}nptkit.pc $want, examples built with pkg-config, minivmm ran from $PREFIX)"
rm -rf "$PREFIX"

echo "== Promela model of the privileged-mode protocol (spin)"
bash Tests/Promela/check.sh

echo "== guest NFIT decoded by ACPICA (iasl -d)"
bash Tests/NFIT/check_guest_nfit.sh "$(swift build --show-bin-path)"

echo "== a real Linux kernel reads the guest NFIT and SSDT (Debian's kernel in QEMU, TCG)"
bash Tests/Linux/boot_nvdimm.sh "$(swift build --show-bin-path)"

echo "== main job smoke run (nptkit demo)"
"$(swift build --show-bin-path)/nptkit-cli" demo > /tmp/nptkit-demo.log
grep -q "Attacks that ran guest code: 0" /tmp/nptkit-demo.log
# Issue 9's attack in every mode: stopped in exact and lazy, refused without the exits they need, run only
# in violation-only mode (the gap it names).
demo_expect() { grep -Eq "$1" /tmp/nptkit-demo.log || { echo "demo: no line matching: $1" >&2; exit 1; }; }
demo_expect "^  sim +exact +stopped: MBEC violation "
demo_expect "^  sim +lazy +stopped: MBEC violation "
demo_expect "^  sim +violation-only +RAN the JIT bytes at cpl 0"
demo_expect "^  sim without privilege-change exits +exact +refused up front \(NPT_ERR_GUARANTEE\)"
demo_expect "^  sim without privilege-change exits +lazy +refused up front \(NPT_ERR_GUARANTEE\)"
demo_expect "^Every mode kept its promise: yes"
# HVCI-like MBEC: both attacks stopped, each a #VE the guest kernel saw at the address the attack fetched.
demo_expect "^  1 +user runs a supervisor-only page +3 +0x800000 +0x300000 +driver page +fetch +R-Xs-- "
demo_expect "^  2 +kernel runs a user page +0 +0xffff800000240000 +0x240000 +user JIT page +fetch +RW--Xu "
demo_expect "^Attacks that ran guest code: 0   Faults the guest kernel saw: vector 20 at 0x800000, vector 20 at 0xffff800000240000$"
# Privileged mode: every request served, no probe read the region, nothing ran outside the mode while it was visible.
demo_expect "^Entries ([1-9][0-9]*) of \1 requests, failures 0; reads of the region from outside the mode: [1-9][0-9]* blocked, 0 succeeded$"
demo_expect "^Instructions run outside the mode while the region was visible: 0; the region in no hierarchy afterwards: yes$"
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

echo "== trace replay (libnptkit-replay.so): the committed KVM runs, and a sim run recorded now"
# Recorded on this machine's KVM (Tests/Fixtures/npttrace); replayed without /dev/kvm: every decision of
# the core compared with the recorded one, the output the recorded run's (the privileged section included, its
# time columns masked: lock turns, trace 1.2; exit paths compact, trace 1.3).
bin="$(swift build --show-bin-path)"
bash scripts/replay_compare.sh "$bin" Tests/Fixtures/npttrace/kvm-demo-lazy.trace Tests/Fixtures/npttrace/kvm-demo-lazy.out kvm --syscalls 3
bash scripts/replay_compare.sh "$bin" Tests/Fixtures/npttrace/kvm-demo-violation-only.trace \
    Tests/Fixtures/npttrace/kvm-demo-violation-only.out kvm --syscalls 3 --mode violation-only
# The same demo recorded before exit paths were compact (trace 1.2: every exit path as separate records).
bash scripts/replay_compare.sh "$bin" Tests/Fixtures/npttrace/kvm-demo-lazy-1.2.trace Tests/Fixtures/npttrace/kvm-demo-lazy-1.2.out kvm --syscalls 3
"$bin/nptkit-cli" demo --syscalls 3 --record /tmp/nptkit-sim-demo.trace > /tmp/nptkit-sim-demo.out
bash scripts/replay_compare.sh "$bin" /tmp/nptkit-sim-demo.trace /tmp/nptkit-sim-demo.out sim --syscalls 3
# Ten more sim recordings, each with its own thread interleaving (its own order of the privileged-mode
# lock), each replayed and compared (scripts/replay_loop.sh; 200 in a row in the README).
bash scripts/replay_loop.sh "$bin" 10 sim
# A replay asked for another run (more system calls than recorded) diverges: non-zero exit, the event named.
if "$bin/nptkit-cli" demo --backend replay --trace Tests/Fixtures/npttrace/kvm-demo-lazy.trace --syscalls 4 > /dev/null 2> /tmp/nptkit-replay.err; then
    echo "replay: a different run was not refused" >&2; exit 1
fi
grep -q "diverged at event [0-9]* (byte offset" /tmp/nptkit-replay.err || { cat /tmp/nptkit-replay.err >&2; exit 1; }
echo "replay: ok"

echo "== what-if on real kernel traces (nptkit-cli whatif, Tests/Fixtures/kvmtrace)"
# The four captures of one guest run (tracefs trace and trace_pipe, perf script, trace-cmd report) give the
# same estimate: 13 exits, 4 user->kernel and 4 kernel->user changes; exact mode adds 4 escalation and
# 4 return exits and 8 hierarchy switches.
for f in tracefs-trace tracefs-trace_pipe perf-script trace-cmd-report; do
    "$(swift build --show-bin-path)/nptkit-cli" whatif "Tests/Fixtures/kvmtrace/$f.txt" \
        --policy Tests/Fixtures/kvmtrace/gen_guest.policy > /tmp/nptkit-whatif.log
    grep -Eq "^  total +13 +4 +4 +4 +4 +0 +8 +0 +0 +0 " /tmp/nptkit-whatif.log \
        || { echo "whatif $f: unexpected estimate" >&2; cat /tmp/nptkit-whatif.log >&2; exit 1; }
done
# Bad input: a malformed line is refused with its line number and a non-zero exit status.
printf '# x\n  a-1 [000] .... 1.000001: kvm_exit: reason HLT rip zz\n' > /tmp/nptkit-whatif-bad.txt
if "$(swift build --show-bin-path)/nptkit-cli" whatif /tmp/nptkit-whatif-bad.txt \
        --policy Tests/Fixtures/kvmtrace/gen_guest.policy > /tmp/nptkit-whatif.log 2>&1; then
    echo "whatif accepted a malformed line" >&2; exit 1
fi
grep -q "line 2: kvm_exit: rip" /tmp/nptkit-whatif.log || { echo "whatif: no line number in the error" >&2; cat /tmp/nptkit-whatif.log >&2; exit 1; }
echo "whatif: ok"

echo "== NPTKit trace format: the committed 1.0 trace reads; a corrupted copy is refused at its block (nptkit-cli trace-dump)"
"$(swift build --show-bin-path)/nptkit-cli" trace-dump Tests/Fixtures/npttrace/golden-1.0.trace > /tmp/nptkit-trace-dump.log
grep -q "^#27 @354 7001 ns: end (27 records)$" /tmp/nptkit-trace-dump.log || { echo "trace-dump: golden trace misread" >&2; exit 1; }
cp Tests/Fixtures/npttrace/golden-1.0.trace /tmp/nptkit-golden-corrupt.trace
printf '\377' | dd of=/tmp/nptkit-golden-corrupt.trace bs=1 seek=100 conv=notrunc status=none
if "$(swift build --show-bin-path)/nptkit-cli" trace-dump /tmp/nptkit-golden-corrupt.trace > /tmp/nptkit-trace-dump.log; then
    echo "trace-dump accepted a corrupted trace" >&2; exit 1
fi
grep -q "^error: trace: corrupt at byte offset 20: checksum mismatch" /tmp/nptkit-trace-dump.log \
    || { echo "trace-dump: wrong error" >&2; cat /tmp/nptkit-trace-dump.log >&2; exit 1; }
! grep -q "^#" /tmp/nptkit-trace-dump.log || { echo "trace-dump printed records of a corrupted block" >&2; exit 1; }
# A 1.3 trace's exit-path records are printed as the records they stand for, and counted.
"$(swift build --show-bin-path)/nptkit-cli" trace-dump Tests/Fixtures/npttrace/kvm-demo-lazy.trace > /tmp/nptkit-trace-dump.log
head -1 /tmp/nptkit-trace-dump.log | grep -q "^NPTKit trace 1.3:" \
    && grep -q "^(416 exit-path records, each shown as the 2 to 4 records it stands for" /tmp/nptkit-trace-dump.log \
    || { echo "trace-dump: the 1.3 KVM trace misread" >&2; tail -3 /tmp/nptkit-trace-dump.log >&2; exit 1; }
echo "trace-dump: ok"

echo "== smoke run on the KVM backend plugin (nptkit demo --backend kvm)"
if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
    "$(swift build --show-bin-path)/nptkit-cli" demo --backend kvm > /tmp/nptkit-demo-kvm.log
    kvm_expect() {
        grep -Eq "$1" /tmp/nptkit-demo-kvm.log || { echo "demo --backend kvm: no line matching: $1" >&2; exit 1; }
    }
    # MBEC (the same scenario code as the simulator's, hvci.S): both attacks stopped as MBEC violations
    # (user -> driver page 0x8000, kernel -> the JIT page 0xc000 through its alias 0xd000), 2 exits per call (lazy).
    kvm_expect "^  1 +user runs a supervisor-only page +3 +- +0x8000 +driver page +fetch +R-Xs-- "
    kvm_expect "^  2 +kernel runs a user page +0 +- +0xc000 +user JIT page +fetch +RW--Xu "
    kvm_expect "^Attacks that ran guest code: 0   Faults the guest kernel saw: vector 20 at 0x8000, vector 20 at 0xd000$"
    kvm_expect "^Exits per system-call round trip: 2\.00 "
    # Issue 9's attack (ret2dir through the IDT): refused in exact mode, stopped in lazy mode by the
    # escalation exit, run in violation-only mode (its named gap).
    kvm_expect "^  kvm +exact +refused up front \(NPT_ERR_GUARANTEE\): no EXIT_ON_RETURN"
    kvm_expect "^  kvm +lazy +stopped: MBEC violation at 0xc000, cpl 0, rip 0xb000, RW--Xu \(1 escalation exit\)$"
    kvm_expect "^  kvm +violation-only +RAN the JIT bytes at cpl 0"
    kvm_expect "^  kvm without privilege-change exits +lazy +refused up front \(NPT_ERR_GUARANTEE\): no EXIT_ON_ESCALATE$"
    kvm_expect "^Every mode kept its promise: yes"
    # Privileged mode: every request served, no probe read the region, no heartbeat moved while it was visible.
    kvm_expect "^Entries ([1-9][0-9]*) of \1 requests, failures 0; reads of the region from outside the mode: [1-9][0-9]* blocked, 0 succeeded$"
    kvm_expect "^Heartbeats that moved while the region was visible: 0;"
    # NVDIMM: one exit and one msync per record where the host file needs flushing, none where it does not;
    # every record read back; no power cut modelled (said, not claimed).
    kvm_expect "^  needs flushing \(region 1\) +yes +4 +4 +4 +0 +4 +4/4 +- "
    kvm_expect "^  needs no flushing \(region 1\) +no +0 +0 +0 +- +4 +4/4 +- "
    kvm_expect "^Power failure: not modelled by backend 'kvm'"
    echo "demo --backend kvm: ok"
else
    echo "demo --backend kvm: SKIPPED (/dev/kvm cannot be opened for reading and writing here)"
fi
