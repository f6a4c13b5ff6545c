# stateshift boot library: embedded by Heat (str_replace) into the user_data of every VM
# the templates boot (boot/influxdb-vm.sh, boot/cyclops-vm.sh, ../deploy/boot/so-vm.sh).
#
# Readiness: Heat marks a server ACTIVE long before its boot has configured anything, so
# every template waits on an OS::Heat::WaitCondition, and the VM signals it from here:
#   - the user_data script copies itself to /usr/local/sbin/stateshift-boot (0700) and starts
#     `stateshift-boot report` as a transient unit, then does its setup; a failing step
#     records its reason (`step`, `fail`) and the script exits non-zero;
#   - `report` waits until cloud-init has finished, then signals FAILURE with the recorded
#     reason or cloud-init's own errors, or runs the VM's `check` (the service answers
#     with its final configuration) and signals SUCCESS with the VM's SSH host keys as the
#     signal's data, which the template publishes as the output ssh_host_keys; the
#     orchestrator pins them instead of trusting a key on first contact.
# The signal's URL and token come from the WaitConditionHandle through Heat; they are
# written to root-only files and never appear on a command line.

BOOT_STATE=/var/lib/stateshift-boot
BOOT_SECRETS=/etc/stateshift-boot

log() { printf 'stateshift-boot: %s\n' "$*" >&2; }

# fail REASON: record why the boot failed (the report sends it to Heat) and stop.
fail() {
  mkdir -p "$BOOT_STATE"
  printf '%s\n' "$*" | tail -c 1500 > "$BOOT_STATE/failed"
  log "FAILED: $*"
  exit 1
}

# step WHAT CMD...: run CMD; on failure fail with WHAT and the end of its output.
step() {
  what=$1; shift
  log "$what"
  if ! out=$("$@" 2>&1); then
    fail "$what: $(printf '%s' "$out" | tail -c 900 | tr '\n' ' ')"
  fi
}

# signal STATUS REASON DATA: tell the WaitCondition (retried: Heat may be busy).
signal() {
  body=$(python3 -c 'import json, sys; print(json.dumps({"status": sys.argv[1], "reason": sys.argv[2][:1000], "data": sys.argv[3], "id": "ssh_host_keys"}))' "$1" "$2" "$3")
  printf '%s' "$body" > "$BOOT_STATE/signal.json"
  curl -sS -o /dev/null --retry 20 --retry-delay 3 --retry-all-errors -m 20 -X POST \
    -H @"$BOOT_SECRETS/signal-header" -H 'Content-Type: application/json' \
    --data-binary @"$BOOT_STATE/signal.json" "$(cat "$BOOT_SECRETS/signal-url")"
}

host_keys() {
  for f in /etc/ssh/ssh_host_ed25519_key.pub /etc/ssh/ssh_host_ecdsa_key.pub /etc/ssh/ssh_host_rsa_key.pub; do
    [ -s "$f" ] && cut -d' ' -f1,2 "$f"
  done
}

# The second half of the boot: runs as the unit stateshift-boot-report.
report() {
  cloud-init status --wait >/dev/null 2>&1 || true
  if [ -s "$BOOT_STATE/failed" ]; then
    signal FAILURE "boot failed: $(cat "$BOOT_STATE/failed")" ""
    return
  fi
  st=$(cloud-init status --long 2>&1 || true)
  case "$st" in
    *"status: done"*) ;;
    *) signal FAILURE "cloud-init did not finish cleanly: $(printf '%s' "$st" | tr '\n' ' ' | tail -c 900)" ""; return ;;
  esac
  if ! why=$(check 2>&1); then
    signal FAILURE "not ready: $(printf '%s' "$why" | tr '\n' ' ' | tail -c 900)" ""
    return
  fi
  log "ready; signalling Heat"
  signal SUCCESS "ready" "$(host_keys)"
}

# boot_start: store the signal credentials, install the report, start it.
boot_start() {
  umask 077
  mkdir -p "$BOOT_STATE" "$BOOT_SECRETS"
  rm -f "$BOOT_STATE/failed"
  printf 'X-Auth-Token: %s\n' "$SIGNAL_TOKEN" > "$BOOT_SECRETS/signal-header"
  printf '%s\n' "$SIGNAL_URL" > "$BOOT_SECRETS/signal-url"
  install -m 0700 "$0" /usr/local/sbin/stateshift-boot
  systemd-run --no-block --unit=stateshift-boot-report /usr/local/sbin/stateshift-boot report
}

# install_missing PKG...: a stock image gets the packages a stateshift image bakes in;
# no service starts before it is configured.
install_missing() {
  missing=""
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing="$missing $p"
  done
  [ -z "$missing" ] && return 0
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod 0755 /usr/sbin/policy-rc.d
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive apt-get update -q && \
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing
  rc=$?
  rm -f /usr/sbin/policy-rc.d
  return $rc
}

# enable_units UNIT...: start at every boot (starting it now is the caller's). Native
# units only: no SysV rc.d links (Perl; ignored beside a unit file) and no daemon-reload
# (the next boot reads the links): 0.3 s instead of 30 s under TCG (docs/benchmarks.md).
enable_units() {
  SYSTEMCTL_SKIP_SYSV=1 systemctl enable --no-reload "$@"
}

# zabbix_agent SERVER HOSTNAME METADATA REFRESH: active checks only (the agent connects to
# the server; the server needs no route to the VM). HostMetadata lets a Zabbix
# auto-registration action add the host and link its template.
zabbix_agent() {
  conf=/etc/zabbix/zabbix_agentd.conf
  sed -i -e '/^Server=/d' -e '/^ServerActive=/d' -e '/^Hostname=/d' -e '/^HostMetadata=/d' \
    -e '/^RefreshActiveChecks=/d' -e '/^StartAgents=/d' "$conf"
  mkdir -p /etc/zabbix/zabbix_agentd.conf.d
  printf 'ServerActive=%s\nHostname=%s\nHostMetadata=%s\nRefreshActiveChecks=%s\nStartAgents=0\n' \
    "$1" "$2" "$3" "$4" > /etc/zabbix/zabbix_agentd.conf.d/stateshift.conf
  chmod 0644 /etc/zabbix/zabbix_agentd.conf.d/stateshift.conf
  grep -q '^Include=/etc/zabbix/zabbix_agentd.conf.d/' "$conf" \
    || echo 'Include=/etc/zabbix/zabbix_agentd.conf.d/*.conf' >> "$conf"
  enable_units zabbix-agent && systemctl restart zabbix-agent
}
