#!/usr/bin/env bash
# The whole test suite, from a fresh Debian machine as root:
#   installs InfluxDB 1.x and OpenSSH (scripts/setup.sh), checks formatting and lints,
#   then runs the unit and integration tests (which start their own servers on
#   loopback addresses).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/zabbix.sh up      # a real Zabbix 6.0 on loopback, for the monitor's tests
scripts/openstack.sh up   # real Keystone + Heat (Zed) on loopback, for the Heat provider's tests
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --locked --no-fail-fast
else
  cargo test --locked --no-fail-fast
fi
