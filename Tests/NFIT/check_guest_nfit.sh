#!/usr/bin/env bash
# The guest NVDIMM tables as ACPICA decodes them: `nptkit-cli nfit` writes the NFIT and the SSDT of a
# simulator VM with two NVDIMM ranges, for both host platforms; `iasl -d` disassembles them, and
# every field that matters to a guest kernel is checked against what the CLI says it configured:
# signature, checksum, each SPA range (persistent memory, base, length), the memory-device map tying
# a virtual DIMM handle to it and to its own control region, that control region (no block windows,
# byte-addressable format), the DIMM's Flush Hint Address subtable naming the vFHA, and the platform
# capabilities (0 where the host needs WPQ flushing, bit 1 on ADR). The SSDT must declare the
# ACPI0012 root device with one child per handle (_ADR = handle), and recompiling what iasl decoded
# must give the same AML. iasl only warns (exit status 0) on a bad checksum or a malformed subtable,
# so its output is searched for warnings; a control (a flush hint structure 8 bytes short) checks
# that this search finds them.
# Usage: check_guest_nfit.sh BIN_DIR (the directory holding nptkit-cli)
set -euo pipefail
bin="${1:?usage: $0 BIN_DIR}"
here="$(cd "$(dirname "$0")" && pwd)"
command -v iasl >/dev/null || { echo "nfit: iasl (acpica-tools) is not installed"; exit 1; }
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=0
bad() { echo "nfit: FAILED $*"; failed=$((failed + 1)); }
# What iasl says when a table is not what it should be (it still exits 0).
complaints='Incorrect checksum|Unknown NFIT subtable|\*\*\*\*|Warning|Error|Invalid|terminates early|Remark'

for platform in needs-flush adr; do
    before=$failed
    "$bin/nptkit-cli" nfit --platform "$platform" --out "$work/nfit.aml" --ssdt "$work/ssdt.aml" > "$work/cli.txt"
    rm -f "$work"/*.dsl
    (cd "$work" && iasl -d nfit.aml ssdt.aml) > "$work/iasl.txt" 2>&1 || { cat "$work/iasl.txt"; bad "iasl -d exited non-zero ($platform)"; continue; }
    dsl="$work/nfit.dsl"
    [ -s "$dsl" ] && [ -s "$work/ssdt.dsl" ] || { bad "iasl wrote no nfit.dsl or ssdt.dsl ($platform)"; continue; }
    if grep -Eqi "$complaints" "$work/iasl.txt" "$dsl" "$work/ssdt.dsl"; then
        bad "iasl complains ($platform): $(grep -Ehi "$complaints" "$work/iasl.txt" "$dsl" "$work/ssdt.dsl" | head -3)"
    fi

    vfha=$(sed -n 's/^vFHA: \(0x[0-9a-f]*\).*/\1/p' "$work/cli.txt")
    [ -n "$vfha" ] || { bad "the CLI printed no vFHA ($platform)"; continue; }
    vfha16=$(printf '%016X' "$vfha")
    checksum=$(sed -n 's/^Table: .*checksum 0x\([0-9a-f]*\) .*/\1/p' "$work/cli.txt")
    length=$(sed -n 's/^Table: .*length \([0-9]*\) bytes.*/\1/p' "$work/cli.txt")
    grep -q '^Rules T1-T8 (GuestNVDIMM): all hold$' "$work/cli.txt" || bad "the CLI reports broken rules ($platform): $(grep '^Rules' "$work/cli.txt")"

    grep -q 'Signature : "NFIT"' "$dsl" || bad "signature ($platform)"
    grep -q "Table Length : $(printf '%08X' "$length")" "$dsl" || bad "table length $length ($platform)"
    grep -q "Checksum : $(printf '%02X' "0x$checksum")\$" "$dsl" || bad "checksum 0x$checksum ($platform): $(grep 'Checksum :' "$dsl")"

    # Expected, from the CLI's table (SPA range, base, length, handle, control region, flush hint).
    : > "$work/expected"
    rows=0
    handles=()
    while read -r idx base len handle dcr hint _; do
        rows=$((rows + 1))
        handles+=("$handle")
        [ "$hint" = "$vfha" ] || bad "range $idx: the CLI lists flush hint $hint, not the vFHA $vfha ($platform)"
        [ "$dcr" != 0 ] || bad "range $idx: control region index 0 ($platform)"
        printf 'spa %04X 66F0D379-B4F3-4074-AC43-0D3318B78CDB %016X %016X\n' "$idx" "$base" "$len" >> "$work/expected"
        printf 'map %08X %04X %04X\n' "$handle" "$idx" "$dcr" >> "$work/expected"
        printf 'dcr %04X 0000 0301\n' "$dcr" >> "$work/expected"
        printf 'hint %08X 0001 %s\n' "$handle" "$vfha16" >> "$work/expected"
    done < <(grep -E '^  [0-9]+ +0x[0-9a-f]+ +0x[0-9a-f]+ +0x[0-9a-f]+ +[0-9]+ +0x' "$work/cli.txt")
    [ "$rows" = 2 ] || bad "the CLI listed $rows NVDIMM ranges, expected 2 ($platform)"
    case "$platform" in needs-flush) caps=00000000 ;; adr) caps=00000002 ;; esac
    echo "caps 01 $caps" >> "$work/expected"

    # Decoded, subtable by subtable.
    awk -F' : ' '
        function val(s) { split(s, a, " "); return a[1] }
        function name(s) { sub(/^\[[^]]*\] */, "", s); sub(/ *$/, "", s); return s }
        function emit() {
            if (type == "0000") print "spa", f["Range Index"], f["Region Type GUID"], f["Address Range Base"], f["Address Range Length"]
            if (type == "0001") print "map", f["Device Handle"], f["Range Index"], f["Control Region Index"]
            if (type == "0004") print "dcr", f["Region Index"], f["Window Count"], f["Code"]
            if (type == "0006") print "hint", f["Device Handle"], f["Hint Count"], hints
            if (type == "0007") print "caps", f["Highest Capability"], f["Capabilities (decoded below)"]
            if (type != "" && type !~ /^000[01467]$/) print "unexpected subtable", type
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
    fi

    # The SSDT: the root device and one child per handle, and the same AML when compiled again.
    ssdt="$work/ssdt.dsl"
    grep -q 'DefinitionBlock ("", "SSDT", 2, "NPTKIT", "NPTKNVDM"' "$ssdt" || bad "SSDT header ($platform): $(grep DefinitionBlock "$ssdt")"
    grep -q 'Device (NVDR)' "$ssdt" && grep -q 'Name (_HID, "ACPI0012"' "$ssdt" || bad "no ACPI0012 root device NVDR in the SSDT ($platform)"
    got=$(awk '/Device \(NV[0-9A-F][0-9A-F]\)/ { dev = $2 } /Name \(_ADR, / { v = $3; sub(/\).*/, "", v); print dev, v }' "$ssdt" |
        sed 's/(//; s/)//' | while read -r dev v; do
            case "$v" in Zero) v=0 ;; One) v=1 ;; esac
            printf '%s %d\n' "$dev" "$v"
        done)
    want=$(i=0; for h in "${handles[@]}"; do printf 'NV%02X %d\n' "$i" "$h"; i=$((i + 1)); done)
    [ "$got" = "$want" ] || bad "SSDT children ($platform): got [$(echo $got)], expected [$(echo $want)]"
    (cd "$work" && iasl -p rebuilt ssdt.dsl) > "$work/iasl-c.txt" 2>&1 || bad "iasl cannot compile the decoded SSDT ($platform)"
    grep -q '0 Errors, 0 Warnings, 0 Remarks' "$work/iasl-c.txt" || bad "recompiling the SSDT ($platform): $(grep -E 'Errors|Warning' "$work/iasl-c.txt" | head -2)"
    cmp -s <(tail -c +37 "$work/ssdt.aml") <(tail -c +37 "$work/rebuilt.aml") || bad "the recompiled SSDT's AML differs from the original ($platform)"

    if [ "$failed" = "$before" ]; then
        echo "nfit: ok     $platform: iasl decodes NFIT, $length bytes, checksum $(printf '%02X' "0x$checksum") accepted, no warning; $rows SPA ranges (persistent memory), $rows memory-device maps each naming its own NVDIMM Control Region (Subtable Type : 0004, no windows, code 0301), $rows Flush Hint Address subtables naming the vFHA $vfha16, Platform Capabilities $caps"
        echo "nfit: ok     $platform: iasl decodes the SSDT, no warning: \\_SB.NVDR (_HID ACPI0012) with $(echo "$want" | tr '\n' ' ')(child, _ADR); recompiled: the same AML"
    fi
done

# The control: a table with a flush hint structure 8 bytes short must draw a complaint.
"$bin/nptkit-cli" nfit --out "$work/good.aml" > /dev/null
bash "$here/../Linux/corrupt_nfit.sh" fha-length "$work/good.aml" "$work/short.aml"
(cd "$work" && iasl -d short.aml) > "$work/iasl-short.txt" 2>&1 || true
if grep -Eqi "$complaints" "$work/iasl-short.txt" "$work/short.dsl" 2>/dev/null; then
    echo "nfit: ok     control: a flush hint structure of length 16 draws \"$(grep -Ehio "$complaints" "$work/iasl-short.txt" "$work/short.dsl" | head -1)\" from iasl, as the search requires"
else
    bad "control: iasl said nothing about a flush hint structure of length 16: the search for complaints cannot fail"
fi

[ "$failed" = 0 ] || { echo "nfit: $failed check(s) failed"; exit 1; }
