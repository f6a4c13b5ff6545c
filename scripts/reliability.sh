#!/usr/bin/env bash
# Re-run the proof behind RELIABILITY.md: the fault matrix, the crash matrix, the Heat
# faults, the soak, the security checks and the cloud path on VMs (the lab), on the real
# parts this script starts, and print one line per test with the writer's figures
# (acknowledged / found / lost; the lab's as `LAB |` lines).
#   scripts/reliability.sh            # everything (about 35 minutes on 2 cores)
#   scripts/reliability.sh 'faults::' # a subset: a nextest name filter (regex)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/zabbix.sh up
scripts/vmlab.sh up
scripts/openstack.sh up
filter="${1:-faults::|heat_migration::|soak::|security::|orchestrator::a_|zabbix::a_zabbix_answering|zabbix::the_poller_backs_off|zabbix::real_zabbix_readings|migration::|lab::}"
out="${RELIABILITY_LOG:-target/reliability.log}"
mkdir -p "$(dirname "$out")"
# --no-capture runs the tests one at a time, so the figures are not skewed by each other.
cargo nextest run --locked --no-fail-fast --no-capture -E "test(/${filter}/)" 2>&1 | tee "$out" \
  | grep -E '^(RELIABILITY \||LAB \||  *#|  *[0-9]+  |20 migrations| *(PASS|FAIL) )' || true
echo
echo "summary:"
grep -E '^ *(PASS|FAIL) ' "$out" | awk '{print $1}' | sort | uniq -c
grep -qE '^ *FAIL ' "$out" && exit 1 || exit 0
