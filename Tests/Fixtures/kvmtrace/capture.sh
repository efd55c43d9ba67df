#!/bin/sh
# Records the real kernel-trace fixtures of this directory (README.md): runs gen_guest under the
# kvm tracepoints, through tracefs (`trace` and `trace_pipe`), perf and trace-cmd. Needs root,
# /dev/kvm, cc; perf (Debian linux-perf) and trace-cmd (Debian trace-cmd) where installed.
# Uses its own tracefs instance (instances/nptkit-fixtures) filtered to the generator's pid, so
# the global buffer and other users' KVM runs are untouched. Output goes to OUTDIR (default: here).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here}
T=/sys/kernel/tracing
[ -d $T/events ] || mount -t tracefs nodev $T
cc -O2 -Wall -o /tmp/nptkit-gen_guest "$here/gen_guest.c"
I=$T/instances/nptkit-fixtures
mkdir -p $I
trap 'if [ -d $I ]; then echo 0 > $I/tracing_on; echo 0 > $I/events/kvm/enable; rmdir $I 2>/dev/null || true; fi' EXIT
echo 0 > $I/tracing_on
echo > $I/trace
echo 1 > $I/events/kvm/enable
# 1. /sys/kernel/tracing/trace: the generator filters events to its own pid before exec'ing itself.
sh -c "echo \$\$ > $I/set_event_pid; echo 1 > $I/tracing_on; exec /tmp/nptkit-gen_guest" > /dev/null
echo 0 > $I/tracing_on
cat $I/trace > "$out/tracefs-trace.txt"
# 2. trace_pipe (the same lines without the header), read while the generator runs.
echo > $I/trace
cat $I/trace_pipe > "$out/tracefs-trace_pipe.txt" &
reader=$!
sh -c "echo \$\$ > $I/set_event_pid; echo 1 > $I/tracing_on; exec /tmp/nptkit-gen_guest" > /dev/null
sleep 1
echo 0 > $I/tracing_on
kill $reader
# 3. perf record + perf script (perf filters by the command itself).
if command -v perf > /dev/null; then
    perf record -q -o /tmp/nptkit-perf.data -e 'kvm:*' /tmp/nptkit-gen_guest > /dev/null
    perf script -i /tmp/nptkit-perf.data > "$out/perf-script.txt" 2> /dev/null
fi
# 4. trace-cmd: `trace-cmd record` cannot run here (it writes /proc/sys/kernel/ftrace_enabled and
# set_ftrace_filter, both refused: EPERM), so the events are enabled by hand in the instance and
# `trace-cmd extract` reads its buffers into a trace.dat, which `trace-cmd report` prints (each line
# then starts with the instance name). trace-cmd extract removes the instance afterwards.
if command -v trace-cmd > /dev/null; then
    echo > $I/trace
    sh -c "echo \$\$ > $I/set_event_pid; echo 1 > $I/tracing_on; exec /tmp/nptkit-gen_guest" > /dev/null
    echo 0 > $I/tracing_on
    trace-cmd extract -B nptkit-fixtures -o /tmp/nptkit-trace.dat > /dev/null 2>&1
    trace-cmd report -i /tmp/nptkit-trace.dat > "$out/trace-cmd-report.txt"
fi
