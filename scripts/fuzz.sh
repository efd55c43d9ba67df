#!/usr/bin/env bash
# libFuzzer targets for every parser of outside input and for the C ABI (Tests/Fuzz):
#   nfit   an ACPI NFIT binary (npt_sim_set_platform, the VM and guest tables built on it)
#   sysfs  a libnvdimm sysfs tree (npt_host_pmem_discover_sysfs)
#   guest  a guest image: memory, registers and policy run on the simulator (both loops)
#   abi    sequences of C ABI calls with random arguments, sizes up to SIZE_MAX and handles
#   trace     an NPTKit binary trace (NPTTrace.TraceReader) and the what-if model over its exits
#   kvmtrace  kernel KVM tracepoint text (NPTTrace.KernelTraceParser, the what-if exit stream) and
#             a what-if policy file (WhatIfPolicy.parse)
#   replay    the replay backend (libnptkit-replay.so) and the core behind it, on traces whose
#             records are the fuzzer's, framed with valid checksums (Tests/Fuzz/fuzz_replay.c)
#
# Usage: bash scripts/fuzz.sh TARGET|all SECONDS [libFuzzer options...]
#
# Builds libnptkit.so instrumented for coverage and AddressSanitizer (swift build -c release
# --sanitize fuzzer --sanitize address, into .build-fuzz/: an uninstrumented library gives the fuzzer
# no feedback) and the target with the Swift toolchain's clang (-fsanitize=fuzzer,address,undefined),
# The trace targets are Swift (NPTTrace is a Swift module, not behind the C ABI): NPTTrace's sources
# are compiled once into a static library with swiftc -sanitize=fuzzer,address (.cache/fuzz/npttrace,
# rebuilt when a source changes) and each entry (Tests/Fuzz/fuzz_TARGET.swift, an
# @_cdecl("LLVMFuzzerTestOneInput") function) is linked against it by swiftc with the same flags.
# Then runs the target for SECONDS on a working corpus (.cache/fuzz/TARGET) seeded from the committed
# one (Tests/Fuzz/corpus/TARGET). A finding is written to .cache/fuzz/TARGET-artifacts/ and fails the
# run. Prints, per target, "fuzz TARGET: E executions in S s (R/s), corpus C, no finding".
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
bash scripts/stale-headers.sh
if [ $# -lt 2 ]; then
    echo "usage: $0 nfit|sysfs|guest|abi|trace|kvmtrace|replay|all SECONDS [libFuzzer options...]" >&2
    exit 2
fi
TARGET="$1"
SECS="$2"
shift 2
TARGETS=(nfit sysfs guest abi trace kvmtrace replay)
if [ "$TARGET" = all ]; then set -- "$@"; else
    case " ${TARGETS[*]} " in *" $TARGET "*) TARGETS=("$TARGET") ;; *) echo "unknown target $TARGET" >&2; exit 2 ;; esac
fi

SWIFT_BIN="$(dirname "$(readlink -f "$(command -v swift)")")"
CL="$SWIFT_BIN/clang"
is_swift() { [ "$1" = trace ] || [ "$1" = kvmtrace ]; }
OUT="$ROOT/.cache/fuzz"
mkdir -p "$OUT"
need_c=0
need_swift=0
for t in "${TARGETS[@]}"; do if is_swift "$t"; then need_swift=1; else need_c=1; fi; done
if [ "$need_c" = 1 ]; then
    SCRATCH="$ROOT/.build-fuzz"
    SAN=(-c release --sanitize fuzzer --sanitize address)
    echo "== fuzz: swift build ${SAN[*]} --product nptkit (into .build-fuzz)"
    swift build --product nptkit --scratch-path "$SCRATCH" "${SAN[@]}"
    case " ${TARGETS[*]} " in *" replay "*)
        echo "== fuzz: swift build ${SAN[*]} --product nptkit-replay (into .build-fuzz)"
        swift build --product nptkit-replay --scratch-path "$SCRATCH" "${SAN[@]}" ;;
    esac
    BIN="$(swift build --scratch-path "$SCRATCH" "${SAN[@]}" --show-bin-path)"
fi
# -package-name: NPTTrace's API is `package` (the one product is libnptkit.so); the entries are of the same package.
SWIFTC_FUZZ=(swiftc -swift-version 6 -O -g -sanitize=fuzzer,address -parse-as-library -use-ld=lld -package-name nptkit)
TRACE_LIB="$OUT/npttrace"
if [ "$need_swift" = 1 ]; then
    if [ ! -f "$TRACE_LIB/libNPTTrace.a" ] || [ -n "$(find "$ROOT/Sources/NPTTrace" "$ROOT/Sources/CNPTTraceFast" -newer "$TRACE_LIB/libNPTTrace.a" -name '*.swift' -o -newer "$TRACE_LIB/libNPTTrace.a" -name '*.[ch]')" ]; then
        echo "== fuzz: swiftc -sanitize=fuzzer,address: NPTTrace (and its C helpers, CNPTTraceFast) as a static library (into .cache/fuzz/npttrace)"
        mkdir -p "$TRACE_LIB/cmodule"
        # The C target as SwiftPM vends it: a module map over its public header, its code built by clang.
        printf 'module CNPTTraceFast {\n    header "%s"\n    export *\n}\n' "$ROOT/Sources/CNPTTraceFast/include/nptrace_fast.h" \
            > "$TRACE_LIB/cmodule/module.modulemap"
        "$CL" -std=c11 -O2 -g -fsanitize=fuzzer-no-link,address -I"$ROOT/Sources/CNPTTraceFast/include" \
            -c "$ROOT/Sources/CNPTTraceFast/crc32c.c" -o "$TRACE_LIB/crc32c.o"
        "${SWIFTC_FUZZ[@]}" -I "$TRACE_LIB/cmodule" -module-name NPTTrace -emit-module -emit-module-path "$TRACE_LIB/NPTTrace.swiftmodule" \
            -emit-library -static -o "$TRACE_LIB/libNPTTrace.a.tmp" "$ROOT"/Sources/NPTTrace/*.swift
        ar rs "$TRACE_LIB/libNPTTrace.a.tmp" "$TRACE_LIB/crc32c.o" 2>/dev/null
        mv "$TRACE_LIB/libNPTTrace.a.tmp" "$TRACE_LIB/libNPTTrace.a"
    fi
fi

status=0
for t in "${TARGETS[@]}"; do
    exe="$OUT/fuzz_$t"
    if is_swift "$t"; then
        "${SWIFTC_FUZZ[@]}" -I "$TRACE_LIB" -I "$TRACE_LIB/cmodule" -L "$TRACE_LIB" -lNPTTrace "$ROOT/Tests/Fuzz/fuzz_$t.swift" -o "$exe"
    else
        "$CL" -std=c11 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -fuse-ld=bfd \
            -I"$ROOT/include" "$ROOT/Tests/Fuzz/fuzz_$t.c" -L"$BIN" -lnptkit -Wl,-rpath,"$BIN" -o "$exe"
    fi
    work="$OUT/$t"
    art="$OUT/$t-artifacts"
    mkdir -p "$work" "$art"
    seeds="$ROOT/Tests/Fuzz/corpus/$t"
    [ -d "$seeds" ] && cp -n "$seeds"/* "$work"/ 2>/dev/null || true
    log="$OUT/$t-$$.log"   # one per run: runs of one target may overlap
    dict=()
    [ -s "$ROOT/Tests/Fuzz/$t.dict" ] && dict=(-dict="$ROOT/Tests/Fuzz/$t.dict")
    rc=0
    SWIFT_BACKTRACE=enable=no ASAN_OPTIONS="detect_leaks=1:allocator_may_return_null=1" \
        NPT_FUZZ_REPLAY_PLUGIN="${BIN:-}/libnptkit-replay.so" \
        "$exe" "$work" -max_total_time="$SECS" -print_final_stats=1 -timeout=10 -rss_limit_mb=4096 \
        -artifact_prefix="$art/" "${dict[@]}" "$@" > "$log" 2>&1 || rc=$?
    execs=$(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}' | tail -1)
    rate=$(grep -E '^stat::average_exec_per_sec' "$log" | awk '{print $2}' | tail -1)
    corpus=$(ls "$work" | wc -l)
    if [ "$rc" -eq 0 ]; then
        echo "fuzz $t: ${execs:-?} executions in $SECS s (${rate:-?}/s), corpus $corpus, no finding"
    else
        status=1
        grep -E "ERROR|SUMMARY|broken promise|Test unit written" "$log" | head -20
        echo "fuzz $t: FINDING (exit $rc) after ${execs:-?} executions; log $log, input in $art/"
    fi
done
exit $status
