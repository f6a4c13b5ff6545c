#!/usr/bin/env bash
# Does InfluxDB's own compaction change the values a server answers? (RELIABILITY.md,
# "Soak"; stop 42.) Copies the InfluxDB files of a stopped local stack (STACK_DIR, e.g.
# a stack kept by the soak test with SOAK_KEEP=dir: dir/local/stacks/<stack>), starts
# Debian's influxd on the copy (127.0.98.9, nothing else touched), reads every point of
# MEASUREMENT in DATABASE (default cyclops / cyclops_usage), then writes WRITES small
# points in a series of their own (default 3), each followed by a shard backup, which
# makes InfluxDB write its cache out as one more TSM file, as a migration's target does
# with the replay and the read-back. When a shard then has enough files, InfluxDB
# compacts it by itself. The script waits for the files to change (at most 60 s), reads
# every point again, and prints how many points of the other series changed value.
# The points written carry the current time: they add files to the shard of the current
# time only, so a stack whose data has no current shard shows no compaction there.
# Bounded (every request and backup has a timeout); the copy and its server are removed
# at the end. The stack must be stopped (a kept copy is), and 127.0.98.9 free.
set -euo pipefail
STACK_DIR=${1:?usage: influx-compaction-check.sh STACK_DIR [DATABASE] [MEASUREMENT]}
DB=${2:-cyclops}
M=${3:-cyclops_usage}
WRITES=${WRITES:-3}
IP=127.0.98.9
[ -d "$STACK_DIR/vm/data" ] || { echo "no $STACK_DIR/vm/data: not a local stack's directory" >&2; exit 2; }
work=$(mktemp -d /tmp/stateshift-compaction.XXXXXX)
server=
trap '[ -z "$server" ] || { kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; }; rm -rf "$work"' EXIT
cp -a "$STACK_DIR/vm/data" "$STACK_DIR/vm/wal" "$STACK_DIR/vm/meta" "$work/"
cat > "$work/influxdb.conf" <<EOF
reporting-disabled = true
bind-address = "$IP:8088"
[meta]
  dir = "$work/meta"
[data]
  dir = "$work/data"
  wal-dir = "$work/wal"
  query-log-enabled = false
[http]
  bind-address = "$IP:8086"
  log-enabled = false
[logging]
  level = "info"
[monitor]
  store-enabled = false
[subscriber]
  enabled = false
EOF
influxd run -config "$work/influxdb.conf" > "$work/influxd.log" 2>&1 &
server=$!
for _ in $(seq 1 150); do curl -sf -m 2 "http://$IP:8086/ping" && break; sleep 0.2; done
curl -sf -m 2 "http://$IP:8086/ping" || { echo "influxd did not start: $work/influxd.log" >&2; tail "$work/influxd.log" >&2; exit 1; }
files() { find "$work/data/$DB" -name '*.tsm' -printf '%P\n' | sort; }
points() {
  curl -sf -m 120 "http://$IP:8086/query" --data-urlencode "db=$DB" --data-urlencode "epoch=ns" \
    --data-urlencode "q=SELECT * FROM \"$M\" GROUP BY *" |
    python3 -c '
import json, sys
for s in json.load(sys.stdin)["results"][0].get("series", []):
    tags = ",".join(f"{k}={v}" for k, v in sorted((s.get("tags") or {}).items()))
    for row in s["values"]:
        print(tags, *row)' | sort
}
files > "$work/files.before"
points > "$work/points.before"
echo "before: $(wc -l < "$work/points.before") points of $DB.$M in $(wc -l < "$work/files.before") TSM files"
for k in $(seq 1 "$WRITES"); do
  curl -sf -m 10 -XPOST "http://$IP:8086/write?db=$DB" \
    --data-binary "$M,host=compaction-check value=$k.5 $(date +%s%N)"
  timeout 120 influxd backup -portable -host "$IP:8088" -database "$DB" "$work/backup-$k" > /dev/null 2>&1
  rm -rf "$work/backup-$k"
done
files > "$work/files.written"
for _ in $(seq 1 60); do
  sleep 1
  files > "$work/files.now"
  # Changed, and every compaction begun has ended.
  began=$(grep -c 'msg="TSM compaction (start)"' "$work/influxd.log" || true)
  ended=$(grep -c 'msg="TSM compaction (end)"' "$work/influxd.log" || true)
  if ! cmp -s "$work/files.now" "$work/files.written" && [ "$began" = "$ended" ]; then
    break
  fi
done
sleep 2
files > "$work/files.after"
points | grep -v 'host=compaction-check' > "$work/points.after" || true
echo "after $WRITES writes, each followed by a shard backup, and InfluxDB's own compactions:"
grep -o 'msg="Beginning compaction".*tsm1_files_n=[0-9]*' "$work/influxd.log" |
  sed 's/.*tsm1_level=\([0-9]*\).*tsm1_strategy=\([a-z]*\).*tsm1_files_n=\([0-9]*\)/  compaction: level \1 (\2), \3 files/' || true
echo "  files now: $(tr '\n' ' ' < "$work/files.after")"
python3 - "$work/points.before" "$work/points.after" <<'PY'
import sys
def read(path):
    out = {}
    for line in open(path):
        tags, time, *fields = line.split()
        out[(tags, time)] = fields
    return out
before, after = read(sys.argv[1]), read(sys.argv[2])
changed = [k for k in before if k in after and before[k] != after[k]]
gone = [k for k in before if k not in after]
print(f"points whose fields changed: {len(changed)}; points gone: {len(gone)} (of {len(before)})")
for k in changed[:5]:
    print("  ", *k, "before", *before[k], "after", *after[k])
PY
