#!/usr/bin/env python3
"""A trace to lay beside a benchmark (docs/benchmarks.md, stop 43): every 20 ms for
SECONDS, one line in OUT with the wall time, the kernel's I/O and memory pressure
totals (/proc/pressure: "some" and "full" stall, microseconds since boot), Dirty and
Writeback (KiB), the counters of vda and of every loop device in use (/proc/diskstats:
reads completed, ms reading, writes completed, ms writing, I/Os in flight, ms doing I/O),
and every thread of the processes named NAME (default influxd) that is in
uninterruptible sleep, as pid/tid:wchan. Every 2 s a line starting with '#' names those
processes. Costs a few % of one core with two servers of ~60 threads each.

Usage: scripts/sample-pressure.py SECONDS OUT [NAME]
"""
import glob
import sys
import time


def read(p):
    try:
        with open(p) as f:
            return f.read()
    except OSError:
        return ""


def pressure(kind):
    tot = [int(x.split("=")[1]) for x in read(f"/proc/pressure/{kind}").split() if x.startswith("total=")]
    return tot + [0] * (2 - len(tot))


def dirty():
    d = {}
    for line in read("/proc/meminfo").splitlines():
        k, v = line.split(":", 1)
        if k in ("Dirty", "Writeback"):
            d[k] = int(v.split()[0])
    return d.get("Dirty", 0), d.get("Writeback", 0)


def disks():
    r = {}
    for line in read("/proc/diskstats").splitlines():
        f = line.split()
        if f[2] == "vda" or (f[2].startswith("loop") and int(f[3]) + int(f[7]) > 0):
            r[f[2]] = (f[3], f[6], f[7], f[10], f[11], f[12])
    return r


def main():
    seconds, out = float(sys.argv[1]), open(sys.argv[2], "w", buffering=1 << 16)
    name = sys.argv[3] if len(sys.argv) > 3 else "influxd"
    pids, scanned, end = [], 0.0, time.time() + seconds
    while time.time() < end:
        now = time.time()
        if now - scanned > 2:
            pids = [c.split("/")[2] for c in glob.glob("/proc/[0-9]*/comm") if read(c).strip() == name]
            names = " | ".join(f"{p}={read(f'/proc/{p}/cmdline').replace(chr(0), ' ').strip()}" for p in pids)
            out.write(f"# {now:.3f} {name}: {names}\n")
            scanned = now
        io, mem = pressure("io"), pressure("memory")
        dr, wb = dirty()
        blocked = []
        for pid in pids:
            for t in glob.glob(f"/proc/{pid}/task/*"):
                st = read(t + "/stat")
                if st and st[st.rfind(")") + 2] == "D":
                    blocked.append(f"{pid}/{t.rsplit('/', 1)[1]}:{read(t + '/wchan')}")
        out.write(
            f"{now:.3f} io={io[0]},{io[1]} mem={mem[0]},{mem[1]} dirty={dr} wb={wb} "
            + " ".join(f"{k}={','.join(v)}" for k, v in disks().items())
            + (" D=" + ";".join(blocked) if blocked else "")
            + "\n"
        )
        time.sleep(max(0.0, 0.02 - (time.time() - now)))
    out.close()


if __name__ == "__main__":
    main()
