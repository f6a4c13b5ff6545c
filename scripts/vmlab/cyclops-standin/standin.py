#!/usr/bin/python3
"""A stand-in for one Cyclops micro-service (udr, rc or billing) in stateshift's VM lab.

It writes usage records to the InfluxDB that the service's real configuration file names
(the file configure-cyclops.sh rewrites at cutover), as Cyclops does, and keeps a ledger of
every point InfluxDB acknowledged with 204, so a test can prove that none was lost.
The configuration is read once, at start: like Cyclops, it moves to a new InfluxDB only
when it is restarted after its file was rewritten.

    standin.py SERVICE            SERVICE: udr | rc | billing

Files (DIR = /opt/cyclops, STATE = /var/lib/cyclops):
    DIR/SERVICE/configuration.txt  `Key=Value` (udr, rc) or `Key==Value` (billing); the keys
                                   InfluxDBURL / InfluxDbUrl, InfluxDBUsername /
                                   InfluxDbUsername, InfluxDBPassword / InfluxDbPassword,
                                   InfluxDBDatabaseName (else the URL's /db/NAME, else
                                   SERVICE_service)
    /etc/default/cyclops-standin   RATE=points per second (default 20), MAX_SECONDS (10800)
    STATE/SERVICE.ledger           one line per acknowledged point: URL <TAB> line protocol
    STATE/SERVICE.stats            JSON: url, acked, failed requests, started, last ack

Points: measurement `usage`, tags svc and instance, fields value (float) and seq (integer);
10 % carry a timestamp days old, 10 % overwrite a point acknowledged at least a second
earlier with a new value. Bounded: it stops by itself after MAX_SECONDS.
"""
import base64
import json
import os
import random
import re
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

DIR = os.environ.get("CYCLOPS_DIR", "/opt/cyclops")
STATE = os.environ.get("CYCLOPS_STATE", "/var/lib/cyclops")
KEYS = {
    "url": ("influxdburl",),
    "user": ("influxdbusername",),
    "password": ("influxdbpassword",),
    "db": ("influxdbdatabasename",),
}


def read_config(svc):
    path = os.path.join(DIR, svc, "configuration.txt")
    conf = {}
    with open(path) as f:
        for raw in f:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            m = re.match(r"^([A-Za-z]+)\s*==?\s*(.*)$", line)
            if not m:
                continue
            key, value = m.group(1).lower(), m.group(2).strip()
            for name, aliases in KEYS.items():
                if key in aliases:
                    conf[name] = value
    if "url" not in conf:
        sys.exit("%s: no InfluxDBURL / InfluxDbUrl line" % path)
    u = urllib.parse.urlsplit(conf["url"])
    base = "%s://%s" % (u.scheme, u.netloc)
    db = conf.get("db")
    if not db:
        m = re.match(r"^/db/([^/]+)", u.path)
        db = m.group(1) if m else "%s_service" % svc
    return base, db, conf.get("user") or "", conf.get("password") or ""


def defaults():
    out = {"RATE": "20", "MAX_SECONDS": "10800"}
    try:
        with open("/etc/default/cyclops-standin") as f:
            for line in f:
                k, _, v = line.strip().partition("=")
                if k in out and v:
                    out[k] = v
    except FileNotFoundError:
        pass
    return float(out["RATE"]), float(out["MAX_SECONDS"])


def main():
    if len(sys.argv) != 2 or sys.argv[1] not in ("udr", "rc", "billing"):
        sys.exit("usage: standin.py udr|rc|billing")
    svc = sys.argv[1]
    base, db, user, password = read_config(svc)
    rate, max_seconds = defaults()
    os.makedirs(STATE, exist_ok=True)
    ledger = open(os.path.join(STATE, svc + ".ledger"), "a", buffering=1)
    stats_path = os.path.join(STATE, svc + ".stats")
    try:
        with open(stats_path) as f:
            stats = json.load(f)
    except (FileNotFoundError, ValueError):
        stats = {"acked": 0, "failed_requests": 0, "seq": 0}
    stats.update({"url": base, "db": db, "started": time.time()})
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    url = "%s/write?db=%s&precision=ns" % (base, urllib.parse.quote(db))
    headers = {"Content-Type": "text/plain"}
    if user:
        token = base64.b64encode(("%s:%s" % (user, password)).encode()).decode()
        headers["Authorization"] = "Basic " + token
    acked = []  # (ts, instance, ack time) of points that may be overwritten
    rng = random.Random()
    started = time.monotonic()
    per_tick = max(1, int(round(rate / 10.0)))
    while not stop and time.monotonic() - started < max_seconds:
        tick = time.monotonic()
        now_ns = time.time_ns()
        lines = []
        for _ in range(per_tick):
            stats["seq"] += 1
            r = rng.random()
            old = [a for a in acked if time.time() - a[2] >= 1.0]
            if r < 0.1 and old:
                ts, inst, _ = rng.choice(old)
            elif r < 0.2:
                ts, inst = now_ns - rng.randint(1, 5) * 86_400_000_000_000 - rng.randint(0, 10**9), rng.randint(0, 9)
            else:
                ts, inst = now_ns + len(lines), rng.randint(0, 9)
            value = round(rng.uniform(0, 1000), 3)
            lines.append((ts, inst, "usage,svc=%s,instance=i%d value=%s,seq=%di %d" % (svc, inst, value, stats["seq"], ts)))
        body = "\n".join(l for _, _, l in lines).encode()
        try:
            req = urllib.request.Request(url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=10) as resp:
                ok = resp.status == 204
        except (urllib.error.URLError, OSError) as e:
            ok = False
            print("write to %s failed: %s" % (base, e), file=sys.stderr, flush=True)
        if ok:
            t = time.time()
            for ts, inst, line in lines:
                ledger.write("%s\t%s\n" % (base, line))
                acked.append((ts, inst, t))
            del acked[:-2000]
            stats["acked"] += len(lines)
            stats["last_ack"] = t
        else:
            stats["failed_requests"] += 1
        tmp = stats_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(stats, f)
        os.replace(tmp, stats_path)
        time.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))
    ledger.close()


if __name__ == "__main__":
    main()
