#!/usr/bin/env python3
"""What a paced sequential read of cold data does to fsync latency on the same disk
(docs/benchmarks.md, stop 43).

A probe appends 300 bytes and fdatasyncs at most 1,000 times a second, as InfluxDB's WAL
does for each write, for SECONDS; beside it, unless RATE is 0, a reader reads a file of
SIZE_MB MiB that is not in the page cache, 32 KiB at a time (as a shard's tar stream
does), paced to RATE MB/s. Prints the probe's latency figures. Both files are made in
DIR and deleted at the end. The disk's readahead (/sys/block/DEV/queue/read_ahead_kb)
is left as it is: run it once per value to compare.

Usage: scripts/measure-read-stall.py [SECONDS=30] [RATE_MB_S=40] [DIR=/var/tmp] [SIZE_MB=2000]
"""
import multiprocessing as mp
import os
import sys
import time


def reader(path, rate, stop_at):
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    t0, n = time.monotonic(), 0
    while time.monotonic() < stop_at:
        b = os.read(fd, 32768)
        if not b:  # wrapped: the file's start is cached by now, so drop it again
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.lseek(fd, 0, os.SEEK_SET)
            continue
        n += len(b)
        ahead = n / rate - (time.monotonic() - t0)
        if ahead > 0:
            time.sleep(ahead)
    os.close(fd)
    print(f"reader: {n / 1e6:.0f} MB in {time.monotonic() - t0:.1f} s")


def probe(path, stop_at, out):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    lat, nxt = [], time.monotonic()
    while time.monotonic() < stop_at:
        t = time.monotonic()
        os.write(fd, b"x" * 300)
        os.fdatasync(fd)
        lat.append(time.monotonic() - t)
        nxt += 0.001
        d = nxt - time.monotonic()
        if d > 0:
            time.sleep(d)
    os.close(fd)
    out.put(lat)


def main():
    a = sys.argv[1:]
    seconds = float(a[0]) if len(a) > 0 else 30.0
    rate = float(a[1]) * 1e6 if len(a) > 1 else 40e6
    d = a[2] if len(a) > 2 else "/var/tmp"
    size_mb = int(a[3]) if len(a) > 3 else 2000
    big, wal = os.path.join(d, "read-stall.big"), os.path.join(d, "read-stall.wal")
    try:
        if rate > 0:
            with open(big, "wb") as f:
                for _ in range(size_mb):
                    f.write(os.urandom(1 << 20))
                f.flush()
                os.fsync(f.fileno())
        stop_at = time.monotonic() + seconds
        q = mp.Queue()
        w = mp.Process(target=probe, args=(wal, stop_at, q))
        w.start()
        r = None
        if rate > 0:
            r = mp.Process(target=reader, args=(big, rate, stop_at))
            r.start()
        lat = sorted(q.get())
        w.join()
        if r:
            r.join()
    finally:
        for p in (big, wal):
            if os.path.exists(p):
                os.unlink(p)
    ms = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000
    print(
        f"fdatasync probe, {len(lat)} writes: p50 {ms(.5):.2f} p99 {ms(.99):.2f} "
        f"p99.9 {ms(.999):.2f} max {lat[-1] * 1000:.2f} ms; over 50 ms: "
        f"{sum(1 for x in lat if x > 0.05)}"
    )


if __name__ == "__main__":
    main()
