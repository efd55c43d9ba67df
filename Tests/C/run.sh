#!/usr/bin/env bash
# Builds and runs the C programs against libnptkit.so.
#
# Usage: bash Tests/C/run.sh BIN_DIR      (BIN_DIR holds libnptkit.so: `swift build --show-bin-path`)
#
# The KVM backend plugin (BIN_DIR/libnptkit-kvm.so, built by `swift build`) is tested by
# Tests/C/test_kvm.c; its guest runs are SKIPPED (counted on the last line) where /dev/kvm cannot
# be opened. Tests/C/test_backend_swap.c runs the same scenarios on "sim" and "kvm" and compares
# them (its kvm half is SKIPPED the same way; the sim half always runs).
# Tests/C/test_kvm_privileged.c runs the privileged mode on it (vCPU threads, Guests/x86-64/priv.S).
# Every Sources/NPTScenarios/Guests/x86-64/NAME_guest.h is checked against its NAME.S (the one generator,
# build.sh, run into a scratch directory) when `as`, `objcopy` and `nm` are installed.
#
# Everything is built with  cc -std=c11 -Wall -Wextra -Werror -pedantic  into BIN_DIR/ctests/:
#   libnptkit-sample.so   examples/plugin/sample_backend.c  (plugins: -shared -fPIC, no -lnptkit)
#   libnptkit-badabi.so   Tests/C/plugin_bad_abi.c
#   libnptkit-noentry.so  Tests/C/plugin_no_entry.c
#   test_api, test_plugins, test_plugin_pmem, test_pmem_discovery, test_kvm, test_backend_swap,
#   test_privileged, test_nvdimm, test_robustness (issue 11's rows, one process each), test_record_replay,
#   client (examples/client.c),
#   test_api-asan and test_nvdimm-asan (AddressSanitizer + LSan),
#   test_frozen_abi-1.N (against each frozen header Tests/C/abi/1.N), test_calltrace (traced, then
#   replayed by nptkit-cli replay-calls, also from copies with one result changed: mutate_calltrace.py)
# and include/nptkit.h is compiled alone as C11 and as C++17 (syntax only).
# Each program prints its own summary line; the last line is "c-tests: N passed, M failed, K skipped", where
# N counts the programs and checks that passed. Exits non-zero if anything failed.
set -euo pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 BIN_DIR" >&2
    exit 2
fi
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BIN="$(cd "$1" && pwd)"
OUT="$BIN/ctests"
CC="${CC:-cc}"
CXX="${CXX:-c++}"
CFLAGS=(-std=c11 -Wall -Wextra -Werror -pedantic -g -I"$ROOT/include" -I"$ROOT/examples/plugin")
LINK=(-L"$BIN" -lnptkit -Wl,-rpath,"$BIN")
TIMEOUT=()
command -v timeout >/dev/null && TIMEOUT=(timeout 600)

if [ ! -f "$BIN/libnptkit.so" ]; then
    echo "run.sh: $BIN/libnptkit.so does not exist (build it with swift build first)" >&2
    echo "c-tests: 0 passed, 1 failed"
    exit 1
fi
mkdir -p "$OUT"

ok=0
bad=0
skip=0
pass() { ok=$((ok + 1)); }
fail() { bad=$((bad + 1)); echo "c-test $1: FAILED${2:+ ($2)}"; }

# build NAME CMD... : runs the compiler, reports a failure by name.
build() {
    local name="$1"
    shift
    if "$@"; then return 0; fi
    fail "$name" "does not compile"
    return 1
}

# run NAME CMD... : runs a test program; it prints its own summary line.
run() {
    local name="$1" rc=0
    shift
    "${TIMEOUT[@]}" "$@" || rc=$?
    if [ "$rc" -eq 0 ]; then pass; else fail "$name" "exit status $rc"; fi
}

echo "-- building plugins and C programs into $OUT"
plugins_ok=1
build libnptkit-sample.so "$CC" "${CFLAGS[@]}" -shared -fPIC "$ROOT/examples/plugin/sample_backend.c" \
    -o "$OUT/libnptkit-sample.so" -pthread || plugins_ok=0
build libnptkit-sample1.so "$CC" "${CFLAGS[@]}" -shared -fPIC -DSAMPLE_INTERFACE_1_ONLY \
    "$ROOT/examples/plugin/sample_backend.c" -o "$OUT/libnptkit-sample1.so" -pthread || plugins_ok=0
build libnptkit-badabi.so "$CC" "${CFLAGS[@]}" -shared -fPIC "$ROOT/Tests/C/plugin_bad_abi.c" \
    -o "$OUT/libnptkit-badabi.so" || plugins_ok=0
build libnptkit-noentry.so "$CC" "${CFLAGS[@]}" -shared -fPIC "$ROOT/Tests/C/plugin_no_entry.c" \
    -o "$OUT/libnptkit-noentry.so" || plugins_ok=0
# A plugin must not depend on the core: it gets the npt_host_api table instead.
if [ "$plugins_ok" = 1 ]; then
    if readelf -d "$OUT/libnptkit-sample.so" 2>/dev/null | grep -q 'libnptkit\.so'; then
        fail plugin-deps "libnptkit-sample.so links libnptkit.so"
    else
        echo "c-test plugin-deps: ok (the sample plugin does not link libnptkit.so)"
        pass
    fi
fi

echo "-- test_api"
if build test_api "$CC" "${CFLAGS[@]}" -pthread "$ROOT/Tests/C/test_api.c" "${LINK[@]}" -o "$OUT/test_api"; then
    run test_api "$OUT/test_api"
fi

echo "-- test_plugins"
if [ "$plugins_ok" = 1 ] &&
    build test_plugins "$CC" "${CFLAGS[@]}" "$ROOT/Tests/C/test_plugins.c" "${LINK[@]}" -ldl -o "$OUT/test_plugins"; then
    run test_plugins "$OUT/test_plugins" "$OUT/libnptkit-sample.so" "$OUT/libnptkit-badabi.so" "$OUT/libnptkit-noentry.so" \
        "$OUT/libnptkit-sample1.so"
elif [ "$plugins_ok" != 1 ]; then
    fail test_plugins "a plugin did not compile"
fi

echo "-- test_plugin_pmem"
if [ "$plugins_ok" = 1 ] &&
    build test_plugin_pmem "$CC" "${CFLAGS[@]}" "$ROOT/Tests/C/test_plugin_pmem.c" "${LINK[@]}" -ldl -o "$OUT/test_plugin_pmem"; then
    run test_plugin_pmem "$OUT/test_plugin_pmem" "$OUT/libnptkit-sample.so"
elif [ "$plugins_ok" != 1 ]; then
    fail test_plugin_pmem "a plugin did not compile"
fi

# The one host NVDIMM discovery (ABI 1.2): the public call and the host table on the sysfs
# fixtures ("core"), then the KVM plugin on each fixture (its argument nd-root), one process each: it
# must report what the core's discovery finds. "none" is a missing tree (the plugin's file region),
# "broken" a malformed one, kvm-old a host table of ABI 1.1's size; "args": the plugin's arguments
# refused or accepted through npt_plugin_load_with. No /dev/kvm needed.
echo "-- test_pmem_discovery"
if [ "$plugins_ok" = 1 ] && [ -f "$BIN/libnptkit-kvm.so" ] &&
    build test_pmem_discovery "$CC" "${CFLAGS[@]}" "$ROOT/Tests/C/test_pmem_discovery.c" "${LINK[@]}" -ldl \
        -o "$OUT/test_pmem_discovery"; then
    for mode in core kvm:domains kvm:numbering kvm:wpq/bus/nd/devices kvm:adr kvm:none kvm:broken kvm-old:domains args; do
        run "test_pmem_discovery $mode" "$OUT/test_pmem_discovery" "$OUT/libnptkit-sample.so" "$BIN/libnptkit-kvm.so" \
            "$ROOT/Tests/Fixtures/sysfs" "$mode"
    done
elif [ "$plugins_ok" != 1 ] || [ ! -f "$BIN/libnptkit-kvm.so" ]; then
    fail test_pmem_discovery "a plugin did not compile or libnptkit-kvm.so does not exist"
fi

echo "-- test_kvm (the KVM backend plugin)"
if [ ! -f "$BIN/libnptkit-kvm.so" ]; then
    fail test_kvm "$BIN/libnptkit-kvm.so does not exist"
else
    if readelf -d "$BIN/libnptkit-kvm.so" 2>/dev/null | grep -q 'libnptkit\.so'; then
        fail plugin-deps-kvm "libnptkit-kvm.so links libnptkit.so"
    else
        echo "c-test plugin-deps-kvm: ok (libnptkit-kvm.so does not link libnptkit.so)"
        pass
    fi
    if build test_kvm "$CC" "${CFLAGS[@]}" -pthread "$ROOT/Tests/C/test_kvm.c" "${LINK[@]}" -ldl -o "$OUT/test_kvm"; then
        rc=0
        "${TIMEOUT[@]}" "$OUT/test_kvm" "$BIN/libnptkit-kvm.so" || rc=$?
        if [ "$rc" -eq 0 ]; then
            pass
        elif [ "$rc" -eq 77 ]; then
            echo "c-test test_kvm: SKIPPED in part (no usable /dev/kvm; see its output above)"
            skip=$((skip + 1))
        else
            fail test_kvm "exit status $rc"
        fi
        # Bad input: /dev/kvm without permission. Run the same program as an unprivileged user
        # (root here, /dev/kvm is root-only): every guest run must be SKIPPED with the reason, VM
        # creation must fail with NPT_ERR_UNSUPPORTED (checked inside), nothing may fail.
        if [ "$(id -u)" = 0 ] && command -v setpriv >/dev/null && id nobody >/dev/null 2>&1 &&
            [ "$(stat -c %a /dev/kvm 2>/dev/null)" = 600 ] &&
            setpriv --reuid=nobody --regid="$(id -g nobody)" --clear-groups \
                sh -c "test -x '$OUT/test_kvm' && test -r '$BIN/libnptkit-kvm.so' && test -r '$BIN/libnptkit.so'"; then
            rc=0
            eacces=$("${TIMEOUT[@]}" setpriv --reuid=nobody --regid="$(id -g nobody)" --clear-groups \
                "$OUT/test_kvm" "$BIN/libnptkit-kvm.so" 2>&1) || rc=$?
            if [ "$rc" -eq 77 ] && echo "$eacces" | grep -q "cannot be opened (Permission denied)" &&
                echo "$eacces" | grep -q " 0 failed"; then
                echo "c-test kvm-eacces: ok (as nobody: $(echo "$eacces" | grep -m1 SKIPPED))"
                pass
            else
                echo "$eacces" | tail -5
                fail kvm-eacces "as nobody: exit $rc, expected 77 with the permission error"
            fi
        else
            echo "c-test kvm-eacces: SKIPPED (needs root, setpriv, a user nobody who can run the build, and a root-only /dev/kvm)"
            skip=$((skip + 1))
        fi
    fi
fi
# The x86-64 guest images (Sources/NPTScenarios/Guests/x86-64): the committed NAME_guest.h must be
# what the one generator makes of NAME.S today.
GUESTS="$ROOT/Sources/NPTScenarios/Guests/x86-64"
if command -v as >/dev/null && command -v objcopy >/dev/null && command -v nm >/dev/null; then
    rm -rf "$OUT/guests"
    if sh "$GUESTS/build.sh" "$OUT/guests"; then
        for src in "$GUESTS"/*.S; do
            h="$(basename "$src" .S)_guest.h"
            if diff -q "$OUT/guests/$h" "$GUESTS/$h" >/dev/null 2>&1; then
                echo "c-test guest-bytes $h: ok (matches $(basename "$src"))"
                pass
            else
                fail "guest-bytes $h" "Sources/NPTScenarios/Guests/x86-64/$h does not match $(basename "$src") (run build.sh)"
            fi
        done
    else
        fail guest-bytes "build.sh failed"
    fi
else
    echo "c-test guest-bytes: SKIPPED (no as/objcopy/nm to re-assemble the guests)"
    skip=$((skip + 1))
fi

echo "-- test_backend_swap (the same scenarios on sim and kvm)"
if [ ! -f "$BIN/libnptkit-kvm.so" ]; then
    fail test_backend_swap "$BIN/libnptkit-kvm.so does not exist"
elif build test_backend_swap "$CC" "${CFLAGS[@]}" -pthread "$ROOT/Tests/C/test_backend_swap.c" "${LINK[@]}" -ldl \
    -o "$OUT/test_backend_swap"; then
    rc=0
    "${TIMEOUT[@]}" "$OUT/test_backend_swap" "$BIN/libnptkit-kvm.so" || rc=$?
    if [ "$rc" -eq 0 ]; then
        pass
    elif [ "$rc" -eq 77 ]; then
        echo "c-test test_backend_swap: SKIPPED in part (the kvm half: no usable /dev/kvm; the sim half ran, see above)"
        skip=$((skip + 1))
    else
        fail test_backend_swap "exit status $rc"
    fi
fi

echo "-- test_kvm_privileged (the privileged mode on the KVM backend plugin)"
if [ -f "$BIN/libnptkit-kvm.so" ] &&
    build test_kvm_privileged "$CC" "${CFLAGS[@]}" -pthread "$ROOT/Tests/C/test_kvm_privileged.c" "${LINK[@]}" -ldl \
        -o "$OUT/test_kvm_privileged"; then
    rc=0
    "${TIMEOUT[@]}" "$OUT/test_kvm_privileged" "$BIN/libnptkit-kvm.so" || rc=$?
    if [ "$rc" -eq 0 ]; then
        pass
    elif [ "$rc" -eq 77 ]; then
        echo "c-test test_kvm_privileged: SKIPPED (no usable /dev/kvm; see its output above)"
        skip=$((skip + 1))
    else
        fail test_kvm_privileged "exit status $rc"
    fi
fi
# Issue 11's rows, each its own process (a crash or hang in one names its row): races between
# destroy, run and create, limits, a misbehaving backend, size_t arguments of 2^63 and up.
echo "-- test_robustness (one process per row)"
if build test_robustness "$CC" "${CFLAGS[@]}" -I"$ROOT/Tests/C" -pthread "$ROOT/Tests/C/test_robustness.c" "${LINK[@]}" \
    -o "$OUT/test_robustness"; then
    for row in $("$OUT/test_robustness" list); do
        run "test_robustness $row" "$OUT/test_robustness" "$row"
    done
fi

echo "-- test_privileged"
if build test_privileged "$CC" "${CFLAGS[@]}" -pthread "$ROOT/Tests/C/test_privileged.c" "${LINK[@]}" -o "$OUT/test_privileged"; then
    run test_privileged "$OUT/test_privileged"
fi

# Recording through npt_vm_config.record_path and the replay of that trace by libnptkit-replay.so
# (npt_plugin_load_with): same outcome; a bad record_path refused with no VM made; another run diverges.
echo "-- test_record_replay"
if [ ! -f "$BIN/libnptkit-replay.so" ]; then
    fail test_record_replay "$BIN/libnptkit-replay.so does not exist"
elif build test_record_replay "$CC" "${CFLAGS[@]}" "$ROOT/Tests/C/test_record_replay.c" "${LINK[@]}" -o "$OUT/test_record_replay"; then
    run test_record_replay "$OUT/test_record_replay" "$BIN/libnptkit-replay.so" "$OUT"
fi

# test_nvdimm reads the NFIT fixture by the absolute path given here (run.sh may be started from
# any directory).
NFIT_FIXTURE="$ROOT/Tests/Fixtures/nfit/nfit.aml"
echo "-- test_nvdimm"
if build test_nvdimm "$CC" "${CFLAGS[@]}" "$ROOT/Tests/C/test_nvdimm.c" "${LINK[@]}" -o "$OUT/test_nvdimm"; then
    run test_nvdimm "$OUT/test_nvdimm" "$NFIT_FIXTURE"
fi

echo "-- examples/client.c"
if build client "$CC" "${CFLAGS[@]}" "$ROOT/examples/client.c" "${LINK[@]}" -o "$OUT/client"; then
    rc=0
    "${TIMEOUT[@]}" "$OUT/client" || rc=$?
    if [ "$rc" -eq 0 ]; then
        echo "c-test client: ok"
        pass
    else
        fail client "exit status $rc"
    fi
fi

# test_api under AddressSanitizer, with LeakSanitizer on. With the Swift runtime of this toolchain
# (6.3.1) LSan reports nothing, so there is no suppression file: a leak report is a real leak of
# libnptkit (or of the test) and fails this step. If a future runtime needs one, suppress only
# frames inside libswiftCore's metadata caches (never libnptkit's or the test's allocations).
echo "-- test_api under AddressSanitizer"
if build test_api-asan "$CC" "${CFLAGS[@]}" -pthread -fsanitize=address -fno-omit-frame-pointer \
    "$ROOT/Tests/C/test_api.c" "${LINK[@]}" -o "$OUT/test_api-asan"; then
    ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:exitcode=23" run test_api-asan "$OUT/test_api-asan"
fi
echo "-- test_nvdimm under AddressSanitizer"
if build test_nvdimm-asan "$CC" "${CFLAGS[@]}" -fsanitize=address -fno-omit-frame-pointer \
    "$ROOT/Tests/C/test_nvdimm.c" "${LINK[@]}" -o "$OUT/test_nvdimm-asan"; then
    ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:exitcode=23" run test_nvdimm-asan "$OUT/test_nvdimm-asan" "$NFIT_FIXTURE"
fi

# The call-trace signature table must be what the generator makes of the header today, and its
# layouts what a C compiler gives (scripts/gen-call-table.py).
echo "-- call table against include/nptkit.h"
if python3 "$ROOT/scripts/gen-call-table.py" --check; then pass; else fail call-table "Sources/NPTKit/CallTable.generated.swift differs from the header"; fi
python3 "$ROOT/scripts/gen-call-table.py" --c-check "$OUT/calltable_layout.c"
if build calltable-layout "$CC" -std=c11 -Wall -Wextra -Werror -pedantic -I"$ROOT/include" "$OUT/calltable_layout.c" \
    "${LINK[@]}" -o "$OUT/calltable_layout"; then
    run calltable-layout "$OUT/calltable_layout"
    echo "c-test calltable-layout: ok (every size, offset and signature of the table agrees with the compiler)"
fi

# Programs built against the frozen published headers (Tests/C/abi/1.N) run against this library.
echo "-- test_frozen_abi against every published header"
for abi in "$ROOT"/Tests/C/abi/*/; do
    v="$(basename "$abi")"
    if build "test_frozen_abi-$v" "$CC" -std=c11 -Wall -Wextra -Werror -pedantic -g -I"$abi" "$ROOT/Tests/C/test_frozen_abi.c" \
        "${LINK[@]}" -o "$OUT/test_frozen_abi-$v"; then
        run "test_frozen_abi-$v" "$OUT/test_frozen_abi-$v"
    fi
done

# Call tracing: a traced run replays with 0 mismatches; a trace with one result changed (a status, an
# output) makes replay-calls name that call and fail.
echo "-- test_calltrace (NPTKIT_CALL_TRACE, nptkit-cli replay-calls)"
if [ -x "$BIN/nptkit-cli" ] && build test_calltrace "$CC" "${CFLAGS[@]}" "$ROOT/Tests/C/test_calltrace.c" "${LINK[@]}" \
    -pthread -o "$OUT/test_calltrace"; then
    rm -f "$OUT/calltrace.trace"
    run test_calltrace env NPTKIT_CALL_TRACE="$OUT/calltrace.trace" "$OUT/test_calltrace"
    # The main thread and test_calltrace's 4 workers (THREADS): 5 recorded threads.
    if "$BIN/nptkit-cli" replay-calls "$OUT/calltrace.trace" > "$OUT/replay.log" 2>&1 &&
        grep -q "(5 recorded threads) replayed, 0 mismatches$" "$OUT/replay.log"; then
        echo "c-test replay-calls: ok ($(cat "$OUT/replay.log"))"
        pass
    else
        cat "$OUT/replay.log"
        fail replay-calls "the trace did not replay with 0 mismatches"
    fi
    for mode in status output; do
        call=$(python3 "$ROOT/Tests/C/mutate_calltrace.py" "$OUT/calltrace.trace" "$OUT/calltrace-$mode.trace" npt_policy_get 3 "$mode")
        rc=0
        "$BIN/nptkit-cli" replay-calls "$OUT/calltrace-$mode.trace" > "$OUT/replay-$mode.log" 2>&1 || rc=$?
        if [ "$rc" -eq 1 ] && grep -q "^replay-calls: MISMATCH at call #$call: npt_policy_get(" "$OUT/replay-$mode.log"; then
            echo "c-test replay-calls-$mode: ok ($(cat "$OUT/replay-$mode.log"))"
            pass
        else
            cat "$OUT/replay-$mode.log"
            fail "replay-calls-$mode" "exit $rc; expected the mismatch at call #$call"
        fi
    done
elif [ ! -x "$BIN/nptkit-cli" ]; then
    fail test_calltrace "$BIN/nptkit-cli does not exist"
fi

echo "-- include/nptkit.h alone, as C11, C99 and C++17"
if printf '#include <nptkit.h>\nint main(void) { return (int)npt_abi_version() != (int)NPT_ABI_VERSION; }\n' |
    "$CC" -std=c11 -Wall -Wextra -Werror -pedantic -I"$ROOT/include" -x c -fsyntax-only -; then
    echo "c-test header-c11: ok"
    pass
else
    fail header-c11 "does not compile"
fi
if printf '#include <nptkit.h>\nint main(void) { npt_sim_platform p = {sizeof p, 0, 0, 0, 0}; return (int)p.size == 0; }\n' |
    "$CC" -std=c99 -Wall -Wextra -Werror -pedantic -I"$ROOT/include" -x c -fsyntax-only -; then
    echo "c-test header-c99: ok"
    pass
else
    fail header-c99 "does not compile"
fi
if printf '#include <nptkit.h>\nstatic_assert(NPT_ABI_VERSION_MAJOR == 1u, "");\nint main() { npt_exit e{}; e.size = sizeof e; npt_flush_stats f{}; f.size = sizeof f; npt_sim_platform p{}; p.size = sizeof p; npt_flush_target t{}; npt_backend_ops o{}; o.size = sizeof o; o.physical_flush = nullptr; npt_sysfs_pmem_region r{}; npt_host_api h{}; h.host_pmem_discover_sysfs = npt_host_pmem_discover_sysfs; return npt_status_string(NPT_OK) == nullptr || t.address != 0 || r.id != 0 || h.last_error != nullptr; }\n' |
    "$CXX" -std=c++17 -Wall -Wextra -Werror -pedantic -I"$ROOT/include" -x c++ -fsyntax-only -; then
    echo "c-test header-cxx17: ok"
    pass
else
    fail header-cxx17 "does not compile"
fi

echo "c-tests: $ok passed, $bad failed, $skip skipped"
[ "$bad" -eq 0 ]
