#!/usr/bin/env bash
# `stateshift bench` with the source's host on a core of its own (docs/benchmarks.md,
# stop 32): the source's influxd and sshd (and the sessions it forks, which inherit it) on
# CPU 0, everything else (the target's influxd and sshd, stateshift and its ssh clients,
# any other process of this machine found at the start) on CPU 1. That is roughly two
# one-core VMs, where `stateshift bench` alone shares both cores between everything. The
# bench process and its writer start on CPU 0; its migration subprocess and ssh clients are
# moved to CPU 1 as they appear (polled every 50 ms). Arguments go to `stateshift bench`.
# Every process of the machine is moved: run it on a machine doing nothing else. Each
# one's affinity is given back at the end (processes started during the run keep theirs).
# Needs 2+ CPUs, taskset (util-linux); STATESHIFT_BIN (default target/release/stateshift);
# do not pass --dir (the script watches /tmp/stateshift-bench).
set -euo pipefail
BIN=${STATESHIFT_BIN:-target/release/stateshift}
DIR=/tmp/stateshift-bench
[ "$(nproc)" -ge 2 ] || { echo "needs two CPUs" >&2; exit 2; }
# CPU lists (`taskset -c`), not masks: a mask of 64 CPUs or more overflows the shell's
# arithmetic.
pin() { taskset -a -c -p "$1" "$2" >/dev/null 2>&1 || true; }
declare -A was
for p in $(ps -eo pid=); do
  [ "$p" != $$ ] && [ -r /proc/"$p"/exe ] 2>/dev/null || continue
  list=$(taskset -c -p "$p" 2>/dev/null | sed 's/.*: //') || continue
  [ -n "$list" ] && was[$p]=$list
done
restore() { for p in "${!was[@]}"; do pin "${was[$p]}" "$p"; done; }
trap restore EXIT
for p in "${!was[@]}"; do pin 1 "$p"; done
taskset -c 0 "$BIN" bench --dir "$DIR" "$@" &
B=$!
while kill -0 "$B" 2>/dev/null; do
  for p in $(pgrep -f "$DIR/source/" || true); do pin 0 "$p"; done
  for p in $(pgrep -f "$DIR/target/" || true) $(pgrep -x ssh || true) $(pgrep -f "stateshift migrate" || true); do
    pin 1 "$p"
  done
  sleep 0.05
done
wait "$B"
