#!/usr/bin/env bash
# Model-checks privileged_mode.pml with spin: the protocol must pass (safety for 2 and 3 CPUs,
# liveness under weak fairness), and each deliberately broken variant must be rejected.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
passed=0; failed=0

verify() { # name, expect (pass|fail), mode (safety|liveness), spin -D flags...
    local name="$1" expect="$2" mode="$3"; shift 3
    rm -f pan pan.* ./*.trail
    spin "$@" -a "$here/privileged_mode.pml" >/dev/null
    if [ "$mode" = safety ]; then
        gcc -O2 -DSAFETY -DNOCLAIM -o pan pan.c 2>/dev/null
        ./pan -m100000 > out.txt 2>&1 || true
    else
        gcc -O2 -DNFAIR=3 -o pan pan.c 2>/dev/null
        ./pan -a -f -m100000 -N served > out.txt 2>&1 || true
    fi
    local errors states
    errors=$(sed -n 's/.*errors: \([0-9]*\).*/\1/p' out.txt | head -1)
    states=$(sed -n 's/^ *\([0-9.e+]*\) states, stored.*/\1/p' out.txt | head -1)
    local result=pass
    [ "${errors:-1}" = 0 ] || result=fail
    if [ "$result" = "$expect" ]; then
        passed=$((passed + 1)); echo "spin: ok     $name ($mode): $result as expected, errors ${errors:-?}, states ${states:-?}"
    else
        failed=$((failed + 1)); echo "spin: FAILED $name ($mode): expected $expect, got $result"; grep -E "assertion|acceptance|error" out.txt | head -5
    fi
}

verify "protocol, 2 CPUs, 3 requests" pass safety -DN=2 -DR=3
verify "protocol, 3 CPUs, 3 requests" pass safety -DN=3 -DR=3
verify "protocol, 3 CPUs, 3 requests" pass liveness -DN=3 -DR=3
verify "broken: map before the others stopped" fail safety -DN=2 -DR=2 -DMAP_BEFORE_STOPPED
verify "broken: resume before unmap" fail safety -DN=2 -DR=2 -DRESUME_BEFORE_UNMAP
verify "broken: no flush on leave" fail safety -DN=2 -DR=2 -DNO_FLUSH
echo "spin: $passed passed, $failed failed"
[ "$failed" = 0 ]
