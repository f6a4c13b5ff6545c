#!/usr/bin/env bash
# Install what stateshift's demo and tests need on a fresh Debian (bookworm) machine, as
# root: InfluxDB 1.x, OpenSSH and python3 from Debian, promtool and headless Chromium for the tests,
# and a Rust toolchain check. Idempotent.
# The servers themselves are started by the demo and the tests, each on its own
# loopback address, never by this script and never as system services.
set -euo pipefail

need=()
command -v influxd >/dev/null 2>&1 || need+=(influxdb)
command -v influx >/dev/null 2>&1 || need+=(influxdb-client)
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null 2>&1 || need+=(openssh-client)
command -v curl >/dev/null 2>&1 || need+=(curl)
[ -x /usr/bin/python3 ] || need+=(python3)   # the target's host digests its shards read back (verify.read_back_on_host), as a Debian VM does
command -v promtool >/dev/null 2>&1 || need+=(prometheus)   # promtool checks deploy/prometheus (tests); its server is never started
command -v chromium >/dev/null 2>&1 || need+=(chromium)       # the status page's browser test (headless)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)

if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}"
  # Debian's maintainer scripts would start influxd/sshd on every interface: forbid that.
  policy=/usr/sbin/policy-rc.d
  had_policy=0; [ -e "$policy" ] && had_policy=1
  if [ "$had_policy" = 0 ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  if [ "$had_policy" = 0 ]; then rm -f "$policy"; fi
fi
mkdir -p /run/sshd   # sshd's privilege-separation directory

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust (https://rustup.rs) and re-run" >&2
  exit 1
fi
echo "setup: ok ($(influxd version 2>/dev/null | head -1); $(ssh -V 2>&1))"
