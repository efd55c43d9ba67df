#!/usr/bin/env bash
# The negative controls of the NVDIMM boot test: writes a copy of a guest NFIT with one defect and
# a correct checksum (so that only the defect differs; Linux only warns about a bad checksum).
#
# Usage: corrupt_nfit.sh KIND IN OUT
#   fha-length        the first Flush Hint Address structure says length 16 (one address needs 24;
#                     breaks rule T2 of Sources/NPTCore/GuestNVDIMM.swift)
#   handle-mismatch   the first DIMM's device handle, in its memory-device map and its flush hint
#                     structure, becomes one no SSDT device has as _ADR (0xF0F; breaks T8)
#   no-control-region every NVDIMM Control Region structure removed and the maps' control region
#                     index set to 0: the table as NPTKit wrote it before control regions (breaks
#                     T4 and T5; the kernel oopses on it)
set -euo pipefail
kind="${1:?usage: $0 KIND IN OUT}"
in="${2:?usage: $0 KIND IN OUT}"
out="${3:?usage: $0 KIND IN OUT}"
die() { echo "corrupt_nfit: $*" >&2; exit 1; }

u16() { od -An -tu2 -j "$2" -N2 "$1" | tr -d ' \n'; }
put() { # put FILE OFFSET WIDTH VALUE: little-endian
    local f="$1" o="$2" w="$3" v="$4" i s=""
    for ((i = 0; i < w; i++)); do s+="$(printf '\\x%02x' $(((v >> (8 * i)) & 255)))"; done
    printf "$s" | dd of="$f" bs=1 seek="$o" conv=notrunc status=none
}
fix_checksum() {
    local f="$1" sum
    put "$f" 9 1 0
    sum=$(od -An -tu1 -v "$f" | tr -s ' ' '\n' | awk '{ s += $1 } END { print s % 256 }')
    put "$f" 9 1 $(((256 - sum) % 256))
}
# Offsets and types of the structures, "offset type length" per line.
structures() {
    local f="$1" o=40 n t l
    n=$(stat -c %s "$f")
    while [ "$o" -lt "$n" ]; do
        t=$(u16 "$f" "$o"); l=$(u16 "$f" $((o + 2)))
        [ "$l" -ge 4 ] || die "structure at offset $o has length $l"
        echo "$o $t $l"
        o=$((o + l))
    done
}

[ "$(head -c 4 "$in")" = NFIT ] || die "$in is not an NFIT"
case "$kind" in
    fha-length)
        cp "$in" "$out"
        o=$(structures "$in" | awk '$2 == 6 { print $1; exit }')
        [ -n "$o" ] || die "$in has no flush hint address structure"
        [ "$(u16 "$in" $((o + 2)))" -ge 24 ] || die "the flush hint structure at $o is already short"
        put "$out" $((o + 2)) 2 16
        ;;
    handle-mismatch)
        cp "$in" "$out"
        m=$(structures "$in" | awk '$2 == 1 { print $1; exit }')
        [ -n "$m" ] || die "$in has no memory-device map"
        old=$(od -An -tu4 -j $((m + 4)) -N4 "$in" | tr -d ' \n')
        new=$((0xF0F))
        [ "$old" != "$new" ] || die "the first DIMM already has handle $new"
        while read -r o t _; do
            if { [ "$t" = 1 ] || [ "$t" = 6 ]; } && [ "$(od -An -tu4 -j $((o + 4)) -N4 "$in" | tr -d ' \n')" = "$old" ]; then
                put "$out" $((o + 4)) 4 "$new"
            fi
        done < <(structures "$in")
        ;;
    no-control-region)
        head -c 40 "$in" > "$out"
        while read -r o t l; do
            [ "$t" = 4 ] && continue
            tail -c +$((o + 1)) "$in" | head -c "$l" >> "$out"
        done < <(structures "$in")
        put "$out" 4 4 "$(stat -c %s "$out")"
        while read -r o t _; do
            [ "$t" = 1 ] && put "$out" $((o + 14)) 2 0
        done < <(structures "$out")
        ;;
    *) die "unknown kind $kind (fha-length, handle-mismatch, no-control-region)" ;;
esac
fix_checksum "$out"
