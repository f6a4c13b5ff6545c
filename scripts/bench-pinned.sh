#!/usr/bin/env bash
# `stateshift bench` with the source's host on a core of its own (docs/benchmarks.md,
# stop 32): the source's influxd and sshd (and the sessions it forks, which inherit it) on
# CPU 0, everything else (the target's influxd and sshd, stateshift and its ssh clients,
# any other process of this machine found at the start) on CPU 1. That is roughly two
# one-core VMs, where `stateshift bench` alone shares both cores between everything. The
# bench process and its writer start on CPU 0; its migration subprocess and ssh clients are
# moved to CPU 1 as they appear (polled every 50 ms). Arguments go to `stateshift bench`.
# Needs 2+ CPUs, taskset (util-linux); STATESHIFT_BIN (default target/release/stateshift).
set -euo pipefail
BIN=${STATESHIFT_BIN:-target/release/stateshift}
DIR=/tmp/stateshift-bench
[ "$(nproc)" -ge 2 ] || { echo "needs two CPUs" >&2; exit 2; }
others=$(ps -eo pid= | while read -r p; do
  [ "$p" != $$ ] && [ -r /proc/"$p"/exe ] 2>/dev/null && echo "$p"; done || true)
pin() { taskset -a -p "$1" "$2" >/dev/null 2>&1 || true; }
for p in $others; do pin 2 "$p"; done
restore() { for p in $others; do pin "$(printf '%x' $(( (1 << $(nproc)) - 1 )))" "$p"; done; }
trap restore EXIT
taskset 1 "$BIN" bench --dir "$DIR" "$@" &
B=$!
while kill -0 "$B" 2>/dev/null; do
  for p in $(pgrep -f "$DIR/source/" || true); do pin 1 "$p"; done
  for p in $(pgrep -f "$DIR/target/" || true) $(pgrep -x ssh || true) $(pgrep -f "stateshift migrate" || true); do
    pin 2 "$p"
  done
  sleep 0.05
done
wait "$B"
