#!/usr/bin/env bash
# Measure the orchestrator daemon at rest: resident memory (VmRSS, VmHWM) and CPU time per
# poll cycle, polling the real Zabbix of scripts/zabbix.sh every second for DURATION
# seconds (default 120: the CPU clock ticks every 10 ms, so a long run resolves a poll). CPU time is the daemon's user+system time from /proc, so network
# waits are not counted.
#   scripts/zabbix.sh up && cargo build --release && scripts/measure-daemon.sh [DURATION]
set -euo pipefail
cd "$(dirname "$0")/.."
dur=${1:-120}
env_file=${STATESHIFT_ZABBIX_DIR:-/tmp/stateshift-zabbix}/env
[ -f "$env_file" ] || { echo "$env_file missing: run scripts/zabbix.sh up first" >&2; exit 2; }
# shellcheck disable=SC1090
. "$env_file"
bin=${STATESHIFT_BIN:-target/release/stateshift}
[ -x "$bin" ] || { echo "$bin missing: run cargo build --release first" >&2; exit 2; }
dir=$(mktemp -d /tmp/ss-measure.XXXXXX)
trap 'kill "$pid" 2>/dev/null || true; rm -rf "$dir"' EXIT
printf '%s' "$ZBX_PASSWORD" > "$dir/zbx.pw"; chmod 600 "$dir/zbx.pw"
cat > "$dir/c.yaml" <<YAML
service: {name: measure}
source: {influx_url: "http://127.0.0.1:1"}
target: {influx_url: "http://127.0.0.1:2"}
migration: {work_dir: "$dir/state"}
monitor:
  kind: zabbix
  poll_interval: 1s
  threshold: 1000000000
  zabbix: {url: "$ZBX_API_URL", username: "$ZBX_USER", password_file: "$dir/zbx.pw", host: "$ZBX_HOST", key: "$ZBX_ITEM_KEY"}
api: {listen: "127.0.0.1:0"}
YAML
"$bin" daemon -c "$dir/c.yaml" 2>"$dir/log" &
pid=$!
sleep 2
ticks0=$(awk '{print $14+$15}' "/proc/$pid/stat")
sleep "$dur"
ticks1=$(awk '{print $14+$15}' "/proc/$pid/stat")
hz=$(getconf CLK_TCK)
rss=$(awk '/VmRSS/{print $2}' "/proc/$pid/status")
hwm=$(awk '/VmHWM/{print $2}' "/proc/$pid/status")
awk -v t0="$ticks0" -v t1="$ticks1" -v hz="$hz" -v d="$dur" -v rss="$rss" -v hwm="$hwm" 'BEGIN {
  printf "daemon polling Zabbix every 1 s for %d s\n", d;
  printf "RSS %.1f MB (peak %.1f MB)\n", rss/1024, hwm/1024;
  printf "CPU %.3f ms per poll cycle (%.0f ms over %d polls; resolution %.0f ms)\n", (t1-t0)*1000/hz/d, (t1-t0)*1000/hz, d, 1000/hz }'
