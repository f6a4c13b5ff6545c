#!/usr/bin/env bash
# What each aggregate of verification costs InfluxDB 1.6 (docs/benchmarks.md): one
# measurement, 50 series, N points (default 3,000,000) of 4 fields, on a server of its own
# at 127.0.0.9; each query three times. Needs influxd (scripts/setup.sh), python3, bc.
# The last lines ask verify's six aggregates as six queries, as `verify.parallel_queries`
# does, one at a time and two at once, with the CPU time influxd spent on them.
set -euo pipefail
N=${N:-3000000}
W=$(mktemp -d /tmp/stateshift-aggx.XXXXXX); D=$W/data; mkdir -p "$D"
cat > "$W/influxdb.conf" <<CONF
bind-address = "127.0.0.9:8088"
[meta]
  dir = "$D/meta"
[data]
  dir = "$D/data"
  wal-dir = "$D/wal"
  query-log-enabled = false
[http]
  bind-address = "127.0.0.9:8086"
  log-enabled = false
[monitor]
  store-enabled = false
CONF
influxd -config "$W/influxdb.conf" > "$W/influxd.log" 2>&1 &
PID=$!
trap 'kill $PID; wait $PID 2>/dev/null; rm -rf "$W"' EXIT
for i in $(seq 50); do curl -s -o /dev/null http://127.0.0.9:8086/ping && break; sleep 0.2; done
curl -s -XPOST http://127.0.0.9:8086/query --data-urlencode 'q=CREATE DATABASE x' >/dev/null
python3 - "$N" <<'PY'
import sys, urllib.request, random
n=int(sys.argv[1]); start=1_700_000_000_000_000_000; step=10_000_000_000
units=["kWh","GB","s","req"]
buf=[]
for i in range(n):
    s=i%50
    t=start+(i//50)*step+s
    buf.append(f'usage,host=h{s:03},region={"eu" if s%2 else "us"} value={random.random()*100:.6f},count={i%100000}i,unit="{units[i%4]}",ok={"true" if i%3 else "false"} {t}')
    if len(buf)==20000:
        urllib.request.urlopen(urllib.request.Request("http://127.0.0.9:8086/write?db=x", data="\n".join(buf).encode())).read(); buf=[]
if buf: urllib.request.urlopen(urllib.request.Request("http://127.0.0.9:8086/write?db=x", data="\n".join(buf).encode())).read()
PY
# Flush the cache into TSM as a migrated shard would be.
sleep 2
q() { local t0 t1; t0=$(date +%s.%N); curl -s -o /dev/null -G http://127.0.0.9:8086/query --data-urlencode db=x --data-urlencode "q=$1"; t1=$(date +%s.%N); echo "$(echo "$t1 - $t0" | bc)"; }
ALL="time >= -9223372036854775806 AND time <= 9223372036854775806"
for name in "COUNT 4 fields|SELECT COUNT(value),COUNT(count),COUNT(unit),COUNT(ok) FROM usage WHERE $ALL GROUP BY *" \
            "SUM 2 numeric|SELECT SUM(value),SUM(count) FROM usage WHERE $ALL GROUP BY *" \
            "COUNT 4 + SUM 2 (what verify asks)|SELECT COUNT(value),COUNT(count),COUNT(unit),COUNT(ok),SUM(value),SUM(count) FROM usage WHERE $ALL GROUP BY *" \
            "COUNT value only|SELECT COUNT(value) FROM usage WHERE $ALL GROUP BY *" \
            "SUM value only|SELECT SUM(value) FROM usage WHERE $ALL GROUP BY *" \
            "raw read value, no aggregate (LIMIT 1 per series)|SELECT value FROM usage WHERE $ALL GROUP BY * LIMIT 1"; do
  label=${name%%|*}; query=${name#*|}
  r=(); for k in 1 2 3; do r+=("$(q "$query")"); done
  echo "$label: ${r[*]} s"
done

# One query per aggregate, N at once (verify.parallel_queries = N); CPU from /proc.
cpu() { awk '{print $14+$15}' "/proc/$PID/stat"; }
hz=$(getconf CLK_TCK)
split() {
  local n=$1 c0 t0 t1 ps=() i=0
  c0=$(cpu); t0=$(date +%s.%N)
  for a in "COUNT(value)" "COUNT(count)" "COUNT(unit)" "COUNT(ok)" "SUM(value)" "SUM(count)"; do
    q "SELECT $a FROM usage WHERE $ALL GROUP BY *" >/dev/null & ps+=($!)
    i=$((i + 1)); if (( i % n == 0 )); then wait "${ps[@]}"; ps=(); fi
  done
  if (( ${#ps[@]} )); then wait "${ps[@]}"; fi
  t1=$(date +%s.%N)
  echo "$(echo "$t1 - $t0" | bc) s (influxd CPU $(echo "scale=2; ($(cpu) - $c0) / $hz" | bc) s)"
}
for n in 1 2; do
  r=(); for k in 1 2 3; do r+=("$(split "$n")"); done
  echo "verify's 6 aggregates as 6 queries, $n at once: ${r[0]}, ${r[1]}, ${r[2]}"
done
