#!/usr/bin/env bash
# The guest NFIT as ACPICA decodes it: `nptkit-cli nfit` writes the table of a simulator VM with two
# NVDIMM ranges, `iasl -d` disassembles it, and every field that matters to a guest kernel is
# checked against what the CLI says it configured: signature, checksum, each SPA range (persistent
# memory, base, length), the memory-device map tying a virtual DIMM handle to it, and that DIMM's
# Flush Hint Address subtable naming the vFHA.
# Usage: check_guest_nfit.sh BIN_DIR (the directory holding nptkit-cli)
set -euo pipefail
bin="${1:?usage: $0 BIN_DIR}"
command -v iasl >/dev/null || { echo "nfit: iasl (acpica-tools) is not installed"; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=0
bad() { echo "nfit: FAILED $*"; failed=$((failed + 1)); }

for platform in needs-flush adr; do
    before=$failed
    "$bin/nptkit-cli" nfit --platform "$platform" --out "$work/nfit.aml" > "$work/cli.txt"
    (cd "$work" && iasl -d nfit.aml) > "$work/iasl.txt" 2>&1 || { cat "$work/iasl.txt"; bad "iasl -d exited non-zero ($platform)"; continue; }
    dsl="$work/nfit.dsl"
    [ -s "$dsl" ] || { bad "iasl wrote no nfit.dsl ($platform)"; continue; }

    vfha=$(sed -n 's/^vFHA: \(0x[0-9a-f]*\).*/\1/p' "$work/cli.txt")
    [ -n "$vfha" ] || { bad "the CLI printed no vFHA ($platform)"; continue; }
    vfha16=$(printf '%016X' "$vfha")
    checksum=$(sed -n 's/.*checksum 0x\([0-9a-f]*\) .*/\1/p' "$work/cli.txt")
    length=$(sed -n 's/.*length \([0-9]*\) bytes.*/\1/p' "$work/cli.txt")

    grep -q 'Signature : "NFIT"' "$dsl" || bad "signature ($platform)"
    grep -q "Table Length : $(printf '%08X' "$length")" "$dsl" || bad "table length $length ($platform)"
    grep -q "Checksum : $(printf '%02X' "0x$checksum")\$" "$dsl" || bad "checksum 0x$checksum ($platform): $(grep 'Checksum :' "$dsl")"
    if grep -qi "incorrect checksum\|error" "$dsl" "$work/iasl.txt"; then
        bad "iasl reports a problem ($platform): $(grep -hi 'incorrect checksum\|error' "$dsl" "$work/iasl.txt" | head -3)"
    fi

    # Expected, from the CLI's table (SPA range, base, length, handle, flush hint).
    : > "$work/expected"
    rows=0
    while read -r idx base len handle hint _; do
        rows=$((rows + 1))
        [ "$hint" = "$vfha" ] || bad "range $idx: the CLI lists flush hint $hint, not the vFHA $vfha ($platform)"
        printf 'spa %04X 66F0D379-B4F3-4074-AC43-0D3318B78CDB %016X %016X\n' "$idx" "$base" "$len" >> "$work/expected"
        printf 'map %08X %04X\n' "$handle" "$idx" >> "$work/expected"
        printf 'hint %08X 0001 %s\n' "$handle" "$vfha16" >> "$work/expected"
    done < <(grep -E '^  [0-9]+ +0x[0-9a-f]+ +0x[0-9a-f]+ +0x[0-9a-f]+ +0x' "$work/cli.txt")
    [ "$rows" = 2 ] || bad "the CLI listed $rows NVDIMM ranges, expected 2 ($platform)"

    # Decoded, subtable by subtable.
    awk -F' : ' '
        function val(s) { split(s, a, " "); return a[1] }
        function name(s) { sub(/^\[[^]]*\] */, "", s); sub(/ *$/, "", s); return s }
        function emit() {
            if (type == "0000") print "spa", f["Range Index"], f["Region Type GUID"], f["Address Range Base"], f["Address Range Length"]
            if (type == "0001") print "map", f["Device Handle"], f["Range Index"]
            if (type == "0006") print "hint", f["Device Handle"], f["Hint Count"], hints
        }
        /Subtable Type :/ { emit(); type = val($2); delete f; hints = ""; next }
        /^Raw Table Data/ { emit(); type = ""; next }
        NF == 2 && type != "" {
            n = name($1)
            if (n == "Hint Address") hints = hints (hints == "" ? "" : ",") val($2); else f[n] = val($2)
        }
    ' "$dsl" > "$work/decoded"
    if ! diff <(sort "$work/expected") <(sort "$work/decoded") > "$work/diff"; then
        bad "decoded subtables differ from what the CLI configured ($platform; < expected, > decoded):"
        cat "$work/diff"
    elif [ "$failed" = "$before" ]; then
        echo "nfit: ok     $platform: iasl decodes NFIT, $length bytes, checksum $(printf '%02X' "0x$checksum") accepted, $rows SPA ranges (persistent memory), $rows memory-device maps, $rows Flush Hint Address subtables (Subtable Type : 0006) naming the vFHA $vfha16"
    fi
done

[ "$failed" = 0 ] || { echo "nfit: $failed check(s) failed"; exit 1; }
