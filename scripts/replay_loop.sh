#!/usr/bin/env bash
# Records the demo N times on BACKEND (sim or kvm) and replays each recording, comparing the output
# with the recorded run's (scripts/replay_compare.sh: the privileged section included, its time
# columns masked). Every run has its own thread interleaving, so each recording has another order of
# the privileged-mode coordinator's lock; each must replay. On kvm the runs alternate lazy and
# violation-only. Prints the failures; the exit status is 1 if any.
# usage: replay_loop.sh BIN N BACKEND
set -uo pipefail
bin=$1 n=$2 backend=$3
dir=$(mktemp -d)
f=0
for i in $(seq 1 "$n"); do
    a=(--syscalls 3)
    [ "$backend" = kvm ] && [ $((i % 2)) = 0 ] && a+=(--mode violation-only)
    if ! "$bin/nptkit-cli" demo --backend "$backend" "${a[@]}" --record "$dir/t" > "$dir/out" 2> "$dir/err"; then
        f=$((f + 1)); echo "run $i: the recording failed:"; head -3 "$dir/err"; continue
    fi
    if ! bash "$(dirname "$0")/replay_compare.sh" "$bin" "$dir/t" "$dir/out" "$backend" "${a[@]}" > /dev/null 2> "$dir/err"; then
        f=$((f + 1)); echo "run $i: the replay failed (trace kept in $dir/fail-$i):"; head -30 "$dir/err"
        cp "$dir/t" "$dir/fail-$i"; cp "$dir/out" "$dir/fail-$i.out"
    fi
done
echo "replay_loop $backend: $n recordings, $f failed"
[ "$f" = 0 ] && rm -rf "$dir"
[ "$f" = 0 ]
