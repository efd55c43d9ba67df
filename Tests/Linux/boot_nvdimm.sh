#!/usr/bin/env bash
# A real Linux kernel reads the guest NVDIMM tables NPTKit writes.
#
# Boots Debian's current kernel (linux-image-amd64's dependency, fetched and cached by
# fetch_kernel.sh under .cache/linux) in QEMU (TCG: this machine's KVM cannot boot Linux) with a
# busybox initramfs, the guest NFIT and SSDT of `nptkit-cli nfit --out --ssdt` as -acpitable, for
# both simulated host platforms (needs-flush, adr). The guest loads libnvdimm, nfit, nd_btt,
# nd_pmem and reports (Tests/Linux/guest_init) what the kernel made of them. Checked against what
# the CLI says it configured:
#   - the modules load (insmod status 0) and the guest reaches its last line (then powers off);
#   - one region per SPA range, with the range's base and size;
#   - one nmem per DIMM handle; each region's mapping names the nmem of its range's handle;
#   - deep_flush reads 1 where the range has a flush hint, and a write of 1 to it succeeds;
#   - persistence_domain: absent where the host needs WPQ flushing, memory_controller on ADR;
#   - the vFHA page is claimed by the NVDIMM bus (/proc/iomem "<vFHA page> : ndbus0");
#   - no oops, BUG, WARNING or call trace in the kernel log.
# Then three negative controls (corrupt_nfit.sh: fha-length, handle-mismatch, no-control-region),
# each of which must FAIL some of those checks: a check that cannot fail proves nothing.
#
# Usage: boot_nvdimm.sh BIN_DIR   (the directory holding nptkit-cli)
# Logs: BIN_DIR/boot_nvdimm/<name>.log (the whole console), <name>.report (the checks).
# SKIPPED (exit 0) only when qemu-system-x86_64 is missing and cannot be installed here.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
BIN="$(cd "${1:?usage: $0 BIN_DIR}" && pwd)"
HERE="$ROOT/Tests/Linux"
OUT="$BIN/boot_nvdimm"
BOOT_TIMEOUT="${BOOT_TIMEOUT:-90}"
mkdir -p "$OUT"
say() { echo "boot_nvdimm: $*"; }

# --- what the test needs: qemu, a static busybox, the kernel -----------------------------------
apt_install() {   # apt_install PACKAGE...: as root with apt only; returns apt's status
    [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" > "$OUT/apt.log" 2>&1 ||
        { apt-get update -qq >> "$OUT/apt.log" 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >> "$OUT/apt.log" 2>&1; }
}
if ! command -v qemu-system-x86_64 >/dev/null; then
    apt_rc=0
    apt_install qemu-system-x86 || apt_rc=$?
    if ! command -v qemu-system-x86_64 >/dev/null; then
        if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
            why="qemu-system-x86_64 is not installed, and this user cannot install it (not root, or no apt-get)"
        elif [ "$apt_rc" != 0 ]; then
            why="qemu-system-x86_64 is not installed, and apt-get install qemu-system-x86 failed: $(tail -1 "$OUT/apt.log")"
        else
            why="apt-get installed qemu-system-x86, but no qemu-system-x86_64 is on PATH ($PATH)"
        fi
        say "SKIPPED ($why)"
        exit 0
    fi
fi
busybox="$(command -v busybox || true)"
if [ -z "$busybox" ] || ldd "$busybox" >/dev/null 2>&1; then
    apt_install busybox-static || { say "FAILED: no static busybox (install busybox-static)"; exit 1; }
    busybox="$(command -v busybox)"
    ! ldd "$busybox" >/dev/null 2>&1 || { say "FAILED: $busybox is not statically linked (install busybox-static)"; exit 1; }
fi
kdir="$(bash "$HERE/fetch_kernel.sh" "$ROOT/.cache/linux")" || { say "FAILED: cannot fetch the kernel"; exit 1; }
say "kernel $(cat "$kdir/complete"), modules $(tr '\n' ' ' < "$kdir/load-order"), $(qemu-system-x86_64 --version | head -1)"

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/rd/bin" "$work/rd/proc" "$work/rd/sys" "$work/rd/dev" "$work/rd/lib/modules"
cp "$busybox" "$work/rd/bin/busybox"
cp "$kdir"/modules/*.ko "$kdir/load-order" "$work/rd/lib/modules/"
cp "$HERE/guest_init" "$work/rd/init"
chmod 755 "$work/rd/init"
(cd "$work/rd" && find . | "$busybox" cpio -o -H newc -R 0:0 2> /dev/null | gzip -1 > "$work/initrd.gz")

# --- one boot ------------------------------------------------------------------------------------
# boot NAME NFIT SSDT: the console into OUT/NAME.log; prints the wall time in seconds.
boot() {
    local name="$1" t0 t1 rc=0
    t0=$(date +%s%N)
    timeout "$BOOT_TIMEOUT" qemu-system-x86_64 -machine pc -accel tcg -m 1G -smp 1 -nographic -no-reboot -nic none \
        -kernel "$kdir/vmlinuz" -initrd "$work/initrd.gz" -append "console=ttyS0 panic=-1 quiet" \
        -acpitable file="$2" -acpitable file="$3" < /dev/null > "$OUT/$name.log" 2>&1 || rc=$?
    t1=$(date +%s%N)
    echo "qemu-exit $rc" >> "$OUT/$name.log"
    awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", (b - a) / 1e9 }'
}

# --- the checks ----------------------------------------------------------------------------------
# check NAME PLATFORM CLI_TXT: compares OUT/NAME.log with what the CLI configured; writes
# OUT/NAME.report (one line per failed check, "ok ..." lines otherwise); returns the failures.
check() {
    local name="$1" platform="$2" cli="$3" log="$OUT/$1.log" rep="$OUT/$1.report"
    local n=0 report="" guest dmesg
    bad() { n=$((n + 1)); report+="FAIL $*"$'\n'; }
    good() { report+="ok   $*"$'\n'; }
    guest="$(tr -d '\r' < "$log" | sed -n '/@@NPT-BEGIN@@/,/^@@NPT-DMESG@@/p')"
    dmesg="$(tr -d '\r' < "$log" | sed -n '/^@@NPT-DMESG@@/,/^@@NPT-\(END\|TIMEOUT\)@@/p')"
    tr -d '\r' < "$log" | grep -q '^@@NPT-END@@$' || bad "the guest did not reach its end marker ($(tail -1 "$log"))"
    grep -q '^qemu-exit 0$' "$log" || bad "qemu: $(grep '^qemu-exit' "$log") (124: timeout)"
    local ins
    ins="$(grep '^insmod ' <<< "$guest" || true)"
    if [ -z "$ins" ] || grep -qv 'rc=0$' <<< "$ins"; then bad "modules: $(tr '\n' ';' <<< "$ins")"; else good "modules: $(tr '\n' ' ' <<< "$ins")"; fi

    local vfha rows expect_pd
    vfha="$(sed -n 's/^vFHA: \(0x[0-9a-f]*\).*/\1/p' "$cli")"
    rows="$(grep -E '^  [0-9]+ +0x[0-9a-f]+ +0x[0-9a-f]+ +0x[0-9a-f]+ +[0-9]+ +' "$cli")"
    case "$platform" in needs-flush) expect_pd="<absent>" ;; adr) expect_pd="memory_controller" ;; esac
    local nranges handles nregions nnmems
    nranges=$(grep -c . <<< "$rows")
    nregions=$(grep -c '^region ' <<< "$guest" || true)
    [ "$nregions" = "$nranges" ] && good "$nregions regions for $nranges SPA ranges" || bad "$nregions regions for $nranges SPA ranges"
    handles="$(awk '{ print $4 }' <<< "$rows" | sort -u)"
    nnmems=$(grep -c '^nmem ' <<< "$guest" || true)
    local got_handles
    got_handles="$(sed -n 's/^nmem .* handle=\([^ ]*\).*/\1/p' <<< "$guest" | while read -r h; do printf '0x%x\n' "$h"; done | sort -u)"
    [ "$got_handles" = "$handles" ] && [ "$nnmems" = "$(grep -c . <<< "$handles")" ] &&
        good "$nnmems nmems, handles $(tr '\n' ' ' <<< "$got_handles")" ||
        bad "nmems: $nnmems with handles [$(tr '\n' ' ' <<< "$got_handles")], expected [$(tr '\n' ' ' <<< "$handles")]"
    local idx base len handle dcr hint line nmem nhandle df pd wr
    while read -r idx base len handle dcr hint _; do
        line="$(grep -E "^region region[0-9]+ resource=$(printf '%#x' "$base") size=$((len)) " <<< "$guest" || true)"
        if [ -z "$line" ]; then bad "SPA range $idx ($base, $len): no region"; continue; fi
        local r="${line#region }"; r="${r%% *}"
        nmem="$(sed -n 's/.* mapping0=\(nmem[0-9]*\),.*/\1/p' <<< "$line")"
        nhandle="$(sed -n "s/^nmem $nmem handle=\([^ ]*\).*/\1/p" <<< "$guest")"
        [ -n "$nhandle" ] && [ "$((nhandle))" = "$((handle))" ] && good "$r = SPA range $idx, on $nmem (handle $nhandle)" ||
            bad "$r (SPA range $idx): mapping0 names '${nmem:-none}' with handle '${nhandle:-none}', expected handle $handle"
        df="$(sed -n 's/.* deep_flush=\([^ ]*\).*/\1/p' <<< "$line")"
        if [ "$hint" != "-" ]; then
            [ "$df" = 1 ] && good "$r deep_flush=1 (flush hint $hint)" || bad "$r deep_flush=$df, expected 1 (flush hint $hint)"
            wr="$(sed -n "s/^deep_flush_write $r rc=\(.*\)/\1/p" <<< "$guest")"
            [ "$wr" = 0 ] && good "$r: echo 1 > deep_flush accepted" || bad "$r: write to deep_flush: rc=${wr:-not tried}"
        fi
        pd="$(sed -n 's/.* persistence_domain=\(.*\)$/\1/p' <<< "$line")"
        [ "$pd" = "$expect_pd" ] && good "$r persistence_domain=$pd ($platform)" || bad "$r persistence_domain=$pd, expected $expect_pd ($platform)"
    done <<< "$rows"
    local page
    page="$(printf '%x-%x : ndbus0' $((vfha & ~0xfff)) $(((vfha & ~0xfff) + 0xfff)))"
    grep -q "^iomem $page\$" <<< "$guest" && good "flush hint page claimed: $page" || bad "no '$page' in /proc/iomem"
    local oops
    oops="$(grep -E 'BUG:|Oops|WARNING:|Call Trace|general protection|Kernel panic' <<< "$dmesg" | head -3 || true)"
    [ -z "$oops" ] && good "no oops, BUG, WARNING or call trace" || bad "kernel log: $(tr '\n' ';' <<< "$oops")"
    printf '%s' "$report" > "$rep"
    return "$n"
}

# Kernel lines worth showing: kernel_lines NAME all (nfit's view of the tables, its debug lines
# included) or kernel_lines NAME errors (what went wrong).
kernel_lines() {
    local what='ACPI: (NFIT|SSDT) |nfit ACPI0012|nd_pmem|pmem[0-9]|BUG:|RIP:|Oops'
    [ "$2" = errors ] && what='ACPI: (NFIT|SSDT) |error|fail|not found|disabling|BUG:|RIP:|Oops'
    tr -d '\r' < "$OUT/$1.log" | sed -n '/^@@NPT-DMESG@@/,/^@@NPT-\(END\|TIMEOUT\)@@/p' |
        grep -E "$what" | grep -vE 'changing (numa|target) node|Reserving|MMCONFIG|tsc:' | head -20 || true
}

failed=0
for platform in needs-flush adr; do
    cli="$work/cli-$platform.txt"
    "$BIN/nptkit-cli" nfit --platform "$platform" --out "$work/nfit-$platform.aml" --ssdt "$work/ssdt-$platform.aml" > "$cli"
    secs="$(boot "$platform" "$work/nfit-$platform.aml" "$work/ssdt-$platform.aml")"
    if check "$platform" "$platform" "$cli"; then
        say "ok     $platform: $(grep -c '^ok' "$OUT/$platform.report") checks pass, boot ${secs} s"
        sed 's/^/         /' "$OUT/$platform.report"
        say "       the guest kernel printed:"
        kernel_lines "$platform" all | sed 's/^/         /'
    else
        failed=$((failed + 1))
        say "FAILED $platform (boot ${secs} s; console in $OUT/$platform.log):"
        sed 's/^/         /' "$OUT/$platform.report"
        kernel_lines "$platform" errors | sed 's/^/         /'
    fi
done

# The negative controls, on the needs-flush tables.
for kind in fha-length handle-mismatch no-control-region; do
    name="control-$kind"
    bash "$HERE/corrupt_nfit.sh" "$kind" "$work/nfit-needs-flush.aml" "$work/$name.aml"
    secs="$(boot "$name" "$work/$name.aml" "$work/ssdt-needs-flush.aml")"
    rc=0
    check "$name" needs-flush "$work/cli-needs-flush.txt" || rc=$?
    if [ "$rc" -gt 0 ]; then
        say "ok     control $kind: the checks FAIL as they must ($rc failed; boot ${secs} s):"
        grep '^FAIL' "$OUT/$name.report" | sed 's/^/         /'
        kernel_lines "$name" errors | sed 's/^/         /'
    else
        failed=$((failed + 1))
        say "FAILED control $kind: every check passed on a broken table (boot ${secs} s; $OUT/$name.log)"
    fi
done

[ "$failed" = 0 ] || { say "$failed failure(s)"; exit 1; }
say "all boots as expected (logs in $OUT)"
