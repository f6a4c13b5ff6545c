#!/usr/bin/env bash
# Measure the orchestrator daemon at rest: resident memory (VmRSS, VmHWM) and CPU time per
# poll cycle, polling the real Zabbix of scripts/zabbix.sh every second for DURATION
# seconds (default 120). CPU time is what the scheduler ran the daemon's threads for
# (/proc/PID/task/*/schedstat, in nanoseconds), so network waits are not counted; the
# user+system ticks of /proc/PID/stat (10 ms each) are printed beside it, as before.
#   scripts/zabbix.sh up && cargo build --release && scripts/measure-daemon.sh [DURATION]
# KEEPALIVE=1 puts a forwarder that keeps connections alive (as Apache or nginx in front
# of a production Zabbix frontend do) between the daemon and the test frontend, whose
# `php -S` closes every connection: the daemon then opens one connection, not one a poll.
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
pid='' fwd=''
trap 'kill $pid $fwd 2>/dev/null || true; rm -rf "$dir"' EXIT
url=$ZBX_API_URL
if [ "${KEEPALIVE:-0}" = 1 ]; then
  cat > "$dir/fwd.py" <<'PY'
import http.client, http.server, sys, urllib.parse
up = urllib.parse.urlsplit(sys.argv[1])
class Fwd(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive unless the client closes
    def log_message(self, *a): pass
    def setup(self):
        super().setup()
        with open(sys.argv[2], "a") as f: f.write("connection\n")
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        c = http.client.HTTPConnection(up.hostname, up.port, timeout=10)
        c.request("POST", up.path, body, {"Content-Type": self.headers.get("Content-Type", "application/json")})
        r = c.getresponse(); data = r.read(); c.close()
        self.send_response(r.status)
        self.send_header("Content-Type", r.getheader("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers(); self.wfile.write(data)
s = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Fwd)
print(s.server_address[1], flush=True)
s.serve_forever()
PY
  python3 "$dir/fwd.py" "$ZBX_API_URL" "$dir/fwd.conns" > "$dir/fwd.port" &
  fwd=$!
  for _ in $(seq 50); do [ -s "$dir/fwd.port" ] && break; sleep 0.1; done
  [ -s "$dir/fwd.port" ] && kill -0 "$fwd" 2>/dev/null || { echo "the keep-alive forwarder did not start (python3?)" >&2; exit 1; }
  url="http://127.0.0.1:$(cat "$dir/fwd.port")/api_jsonrpc.php"
fi
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
  zabbix: {url: "$url", username: "$ZBX_USER", password_file: "$dir/zbx.pw", host: "$ZBX_HOST", key: "$ZBX_ITEM_KEY"}
api: {listen: "127.0.0.1:0"}
YAML
"$bin" daemon -c "$dir/c.yaml" 2>"$dir/log" &
pid=$!
sleep 2
# Every thread's time on a CPU, in ns, and the thread ids it came from: a thread that
# ends in between takes its time with it, so the precise figure needs the same threads.
ran() { cat /proc/"$pid"/task/*/schedstat 2>/dev/null | awk '{s += $1} END {printf "%d", s}'; }
# The readings the daemon took, by freshness, from its /metrics: a run whose polls
# failed measures a daemon backing off, not polling.
readings() {
  local api
  api=$(ss -ltnpH 2>/dev/null | awk -v p="pid=$pid," 'index($0, p) {print $4; exit}')
  [ -n "$api" ] && curl -sf "http://$api/metrics" | awk '/^stateshift_readings_total/ {
    split($1, a, "\""); n[a[2]] += $2 } END { for (k in n) printf "%s %d ", k, n[k] }'
}
threads() { ls /proc/"$pid"/task | sort | tr '\n' ' '; }
ticks0=$(awk '{print $14+$15}' "/proc/$pid/stat"); ns0=$(ran); tids0=$(threads); r0=$(readings || true)
sleep "$dur"
ticks1=$(awk '{print $14+$15}' "/proc/$pid/stat"); ns1=$(ran); tids1=$(threads); r1=$(readings || true)
kill -0 "$pid" 2>/dev/null || { echo "the daemon ended during the run: $(tail -3 "$dir/log")" >&2; exit 1; }
hz=$(getconf CLK_TCK)
rss=$(awk '/VmRSS/{print $2}' "/proc/$pid/status")
hwm=$(awk '/VmHWM/{print $2}' "/proc/$pid/status")
same=$([ "$tids0" = "$tids1" ] && echo yes || echo no)
awk -v t0="$ticks0" -v t1="$ticks1" -v n0="$ns0" -v n1="$ns1" -v same="$same" -v hz="$hz" -v d="$dur" -v rss="$rss" -v hwm="$hwm" 'BEGIN {
  printf "daemon polling Zabbix every 1 s for %d s\n", d;
  printf "RSS %.1f MB (peak %.1f MB)\n", rss/1024, hwm/1024;
  if (same == "yes")
    printf "CPU %.3f ms per poll cycle (%.1f ms on a CPU over %d s, from the threads'"'"' schedstat)\n", (n1-n0)/1e6/d, (n1-n0)/1e6, d;
  else
    printf "CPU per poll cycle: no precise figure (the daemon'"'"'s threads changed during the run)\n";
  printf "CPU %.3f ms per poll cycle by the tick count (%.0f ms over %d s; resolution %.0f ms)\n", (t1-t0)*1000/hz/d, (t1-t0)*1000/hz, d, 1000/hz }'
if [ -n "$fwd" ]; then
  echo "through a keep-alive forwarder: the daemon opened $(grep -c . "$dir/fwd.conns" 2>/dev/null || echo 0) connection(s) in the whole run (its first 2 s included)"
fi
echo "readings by freshness (the daemon's /metrics), at the start: ${r0:-none}; at the end: ${r1:-none}"
