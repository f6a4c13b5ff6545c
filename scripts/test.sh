#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine as root:
#   installs InfluxDB 1.x, OpenSSH, promtool and headless Chromium (scripts/setup.sh), starts a real Zabbix 6.0 and a
#   real Keystone + Heat on loopback and the VM lab (Debian VMs under QEMU that Heat
#   creates, on a network namespace), checks formatting and lints, then runs the unit and
#   integration tests (which start their own InfluxDB and sshd servers on loopback
#   addresses, and boot lab VMs through Heat). Lab VMs left by a failed run are stopped at
#   the end.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/zabbix.sh up      # a real Zabbix 6.0 on loopback, for the monitor's tests
scripts/vmlab.sh up       # the VM lab: image (built once, cached), network, forwarders
scripts/openstack.sh up   # real Keystone + Heat (Zed) on loopback, with the lab's plugin
trap 'scripts/vmlab.sh vms | grep -q . && { echo "test.sh: stopping leftover lab VMs"; scripts/vmlab.sh stop-vms; } || true' EXIT
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --locked --no-fail-fast
else
  cargo test --locked --no-fail-fast
fi
