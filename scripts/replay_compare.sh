#!/usr/bin/env bash
# Replays a demo trace (Tests/Fixtures/npttrace) and compares the output with the recorded run's:
# every section must be the same, with 'replay' in place of the recorded backend's name (column
# widths aside), except the crash checker's line and columns (a persistence model is not part of a
# recording) and the privileged section's time columns (requested/entered/left at, others stopped
# for: the core's clock, not the backend's). Its vCPUs, handler counts, heartbeats and probes are
# compared (the order of the coordinator's monitor is replayed: lock turns, trace 1.2).
# usage: replay_compare.sh BIN TRACE RECORDED_OUTPUT BACKEND [demo options...]
set -euo pipefail
bin=$1 trace=$2 recorded=$3 backend=$4; shift 4
out=$(mktemp)
"$bin/nptkit-cli" demo --backend replay --trace "$trace" "$@" > "$out"
norm() { sed -e "s/replay/$backend/g" "$1" \
    | sed -E '/^--- Privileged mode/,/^--- Virtualized NVDIMM/ s/^( +[0-9]+ +[0-9]+ +)[0-9.]+ us +[0-9.]+ us +[0-9.]+ us +[0-9.]+ us/\1(time) (time) (time) (time)/' \
    | grep -v -e '^Crash checker' -e '^Each trapped guest flush' -e '^durable records survive' -e '^the WPQ, so the fenced' -e '^the power failure and are lost' | tr -s ' -' \
    | sed -E '/^ needs/ s/ (lost|survived) (-|[0-9]+) (-|[0-9].*)$/ \1 (crash checker)/'; }
if ! diff <(norm "$recorded") <(norm "$out") > "$out.diff"; then
    echo "replay of $trace: output differs from the recorded run's:" >&2; cat "$out.diff" >&2; exit 1
fi
echo "replay of $trace: the recorded run's output ($(wc -l < "$out") lines)"
rm -f "$out" "$out.diff"
