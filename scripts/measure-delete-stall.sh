#!/usr/bin/env bash
# What deleting a big file does to the fsync latency of the file system it is on
# (docs/benchmarks.md, stop 35). Writes SIZE_MB MiB (default 4000) of zeros to a file in
# DIR (default /tmp), syncs it to disk, then, while a probe appends 4 KiB and fsyncs
# every 10 ms (as InfluxDB's WAL does for each write), deletes it. Prints the slowest
# fsync of each second: before the delete, then after it. On ext4 mounted with online
# `discard` (see `findmnt -T DIR`), the delete's TRIMs hold the journal and every fsync
# waits. Bounded: PROBE_SECS (default 40) of probing; both files are removed at the end
# and the probe is stopped if the script is.
set -euo pipefail
DIR=${1:-/tmp}
SIZE_MB=${SIZE_MB:-4000}
PROBE_SECS=${PROBE_SECS:-40}
big=$(mktemp "$DIR/stateshift-delete-stall.XXXXXX")
probe=$(mktemp "$DIR/stateshift-delete-probe.XXXXXX")
probe_pid=
trap '[ -z "$probe_pid" ] || kill "$probe_pid" 2>/dev/null || true; rm -f "$big" "$probe"' EXIT
echo "file system: $(findmnt -n -o SOURCE,FSTYPE,OPTIONS -T "$DIR")"
dd if=/dev/zero of="$big" bs=1M count="$SIZE_MB" status=none
sync
sleep 3
python3 - "$probe" "$PROBE_SECS" <<'EOF' &
import os, sys, time
path, secs = sys.argv[1], float(sys.argv[2])
fd = os.open(path, os.O_WRONLY | os.O_APPEND)
t0 = time.monotonic()
worst = {}
while time.monotonic() < t0 + secs:
    t = time.monotonic()
    os.write(fd, b"x" * 4096)
    os.fsync(fd)
    s = int(t - t0)
    worst[s] = max(worst.get(s, 0.0), (time.monotonic() - t) * 1000)
    time.sleep(0.01)
os.close(fd)
print("slowest fsync per second, ms (the delete at about second 2):")
print(" ".join(f"{s}:{ms:.0f}" for s, ms in sorted(worst.items())))
EOF
probe_pid=$!
sleep 2
rm -f "$big"
echo "deleted $SIZE_MB MiB"
wait
