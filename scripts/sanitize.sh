#!/usr/bin/env bash
# Sanitizer jobs of the test command (scripts/test.sh) and of CI (.ci/run).
#
#   bash scripts/sanitize.sh asan   libnptkit.so built with AddressSanitizer (swift build --sanitize
#                                   address, .build-asan/), the C tests and the C sample plugin with
#                                   AddressSanitizer + UndefinedBehaviorSanitizer + LeakSanitizer.
#                                   (swiftc has no -sanitize=undefined on Linux; Swift code traps on
#                                   overflow and out-of-bounds access by itself.)
#   bash scripts/sanitize.sh tsan   libnptkit.so and the KVM plugin built with ThreadSanitizer
#                                   (.build-tsan/), with NPTKIT_TSAN_LOCKS: the core's locks are pthread
#                                   mutexes there (NPTMutex), because TSan reports false races inside
#                                   Synchronization.Mutex on Linux; the C tests that race threads, and
#                                   the KVM plugin loaded into the TSan process.
#
# The C programs are built with the Swift toolchain's clang, whose sanitizer runtimes match the ones
# swiftc instrumented the library for. Prints "sanitize-MODE: N passed, M failed"; exits 1 on a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
bash scripts/stale-headers.sh
MODE="${1:-}"
case "$MODE" in asan|tsan) ;; *) echo "usage: $0 asan|tsan" >&2; exit 2 ;; esac

SWIFT_BIN="$(dirname "$(readlink -f "$(command -v swift)")")"
CL="$SWIFT_BIN/clang"
[ -x "$CL" ] || CL=clang
TIMEOUT=()
command -v timeout >/dev/null && TIMEOUT=(timeout 900)

ok=0
bad=0
pass() { ok=$((ok + 1)); echo "sanitize-$MODE $1: ok"; }
fail() { bad=$((bad + 1)); echo "sanitize-$MODE $1: FAILED${2:+ ($2)}"; }
run() {
    local name="$1" rc=0 out
    shift
    out="$("${TIMEOUT[@]}" "$@" 2>&1)" || rc=$?
    if [ "$rc" -eq 0 ] && ! grep -q "WARNING: ThreadSanitizer\|ERROR: AddressSanitizer\|runtime error:\|ERROR: LeakSanitizer" <<<"$out"; then
        pass "$name"
    else
        echo "$out" | tail -60
        fail "$name" "exit status $rc"
    fi
}

SCRATCH="$ROOT/.build-$MODE"
if [ "$MODE" = asan ]; then
    SAN=(--sanitize address)
    CSAN=(-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer)
    export ASAN_OPTIONS="detect_leaks=1:abort_on_error=0:exitcode=23:strict_string_checks=1"
    export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
else
    SAN=(--sanitize thread -Xswiftc -DNPTKIT_TSAN_LOCKS)
    CSAN=(-fsanitize=thread)
    export TSAN_OPTIONS="halt_on_error=1:exitcode=66:second_deadlock_stack=1"
fi

echo "== $MODE: swift build ${SAN[*]} (libnptkit.so, libnptkit-kvm.so) into $SCRATCH"
t0=$SECONDS
swift build --product nptkit --scratch-path "$SCRATCH" "${SAN[@]}"
swift build --product nptkit-kvm --scratch-path "$SCRATCH" "${SAN[@]}"
BIN="$(swift build --scratch-path "$SCRATCH" "${SAN[@]}" --show-bin-path)"
echo "built in $((SECONDS - t0)) s"
OUT="$BIN/sanitize-ctests"
mkdir -p "$OUT"
CFLAGS=(-std=c11 -Wall -Wextra -Werror -pedantic -g -O1 -pthread -I"$ROOT/include" -I"$ROOT/examples/plugin" -I"$ROOT/Tests/C"
        "${CSAN[@]}" -fuse-ld=bfd)
LINK=(-L"$BIN" -lnptkit -Wl,-rpath,"$BIN")
# The TSan runtime intercepts libdispatch (which libnptkit.so's Swift runtime loads): link it by name.
SWIFT_LIB="$SWIFT_BIN/../lib/swift/linux"
[ "$MODE" = tsan ] && LINK+=(-L"$SWIFT_LIB" -ldispatch -lBlocksRuntime -Wl,-rpath,"$SWIFT_LIB")

cbuild() { # NAME SOURCE [extra...]
    local name="$1" src="$2"
    shift 2
    if "$CL" "${CFLAGS[@]}" "$src" "$@" -o "$OUT/$name"; then return 0; fi
    fail "$name" "does not compile"
    return 1
}

# test_plugins with the sample plugin (built before), its interface-1 build, and the two broken ones.
test_plugins_built() {
    cbuild libnptkit-sample1.so "$ROOT/examples/plugin/sample_backend.c" -shared -fPIC -DSAMPLE_INTERFACE_1_ONLY &&
        cbuild libnptkit-badabi.so "$ROOT/Tests/C/plugin_bad_abi.c" -shared -fPIC &&
        cbuild libnptkit-noentry.so "$ROOT/Tests/C/plugin_no_entry.c" -shared -fPIC &&
        cbuild test_plugins "$ROOT/Tests/C/test_plugins.c" "${LINK[@]}" -ldl
}
run_test_plugins() {
    run test_plugins "$OUT/test_plugins" "$OUT/libnptkit-sample.so" "$OUT/libnptkit-badabi.so" "$OUT/libnptkit-noentry.so" \
        "$OUT/libnptkit-sample1.so"
}

t0=$SECONDS
if [ "$MODE" = asan ]; then
    cbuild libnptkit-sample.so "$ROOT/examples/plugin/sample_backend.c" -shared -fPIC && sample=1 || sample=0
    cbuild test_api "$ROOT/Tests/C/test_api.c" "${LINK[@]}" && run test_api "$OUT/test_api"
    # One recorder written by two vCPU threads and the VMM's thread (no replay: the plugin is not built here).
    cbuild test_record_replay "$ROOT/Tests/C/test_record_replay.c" "${LINK[@]}" &&
        run "test_record_replay --threads-only" "$OUT/test_record_replay" --threads-only "$OUT"
    cbuild test_nvdimm "$ROOT/Tests/C/test_nvdimm.c" "${LINK[@]}" &&
        run test_nvdimm "$OUT/test_nvdimm" "$ROOT/Tests/Fixtures/nfit/nfit.aml"
    cbuild test_privileged "$ROOT/Tests/C/test_privileged.c" "${LINK[@]}" && run test_privileged "$OUT/test_privileged"
    if [ "$sample" = 1 ] && test_plugins_built; then run_test_plugins; fi
    cbuild client "$ROOT/examples/client.c" "${LINK[@]}" && run client "$OUT/client"
    if cbuild test_robustness "$ROOT/Tests/C/test_robustness.c" "${LINK[@]}"; then
        for row in $("$OUT/test_robustness" list); do
            if [ "$row" = 7 ]; then
                # Row 7 measures resident memory: ASan's quarantine would hold every freed block.
                ASAN_OPTIONS="$ASAN_OPTIONS:quarantine_size_mb=0:thread_local_quarantine_size_kb=0" \
                    run "test_robustness $row" "$OUT/test_robustness" "$row"
            else
                run "test_robustness $row" "$OUT/test_robustness" "$row"
            fi
        done
    fi
else
    # The rows where threads race (TSan sees a data race even where no check fails), the privileged
    # mode's vCPU threads, the API, NVDIMM and plugin tests, and the KVM plugin loaded into this
    # process (its host discovery on a fixture: no /dev/kvm needed).
    if cbuild test_robustness "$ROOT/Tests/C/test_robustness.c" "${LINK[@]}"; then
        for row in 1 3 4 5 6 8 9 15; do run "test_robustness $row" "$OUT/test_robustness" "$row"; done
    fi
    cbuild test_privileged "$ROOT/Tests/C/test_privileged.c" "${LINK[@]}" && run test_privileged "$OUT/test_privileged"
    cbuild test_api "$ROOT/Tests/C/test_api.c" "${LINK[@]}" && run test_api "$OUT/test_api"
    # One recorder written by two vCPU threads and the VMM's thread (no replay: the plugin is not built here).
    cbuild test_record_replay "$ROOT/Tests/C/test_record_replay.c" "${LINK[@]}" &&
        run "test_record_replay --threads-only" "$OUT/test_record_replay" --threads-only "$OUT"
    cbuild test_nvdimm "$ROOT/Tests/C/test_nvdimm.c" "${LINK[@]}" &&
        run test_nvdimm "$OUT/test_nvdimm" "$ROOT/Tests/Fixtures/nfit/nfit.aml"
    if cbuild libnptkit-sample.so "$ROOT/examples/plugin/sample_backend.c" -shared -fPIC && test_plugins_built; then
        run_test_plugins
    fi
    if cbuild test_pmem_discovery "$ROOT/Tests/C/test_pmem_discovery.c" "${LINK[@]}" -ldl; then
        run "test_pmem_discovery kvm:domains (KVM plugin under TSan)" "$OUT/test_pmem_discovery" "$OUT/libnptkit-sample.so" \
            "$BIN/libnptkit-kvm.so" "$ROOT/Tests/Fixtures/sysfs" kvm:domains
    fi
fi
echo "ran in $((SECONDS - t0)) s"
echo "sanitize-$MODE: $ok passed, $bad failed"
[ "$bad" -eq 0 ]
