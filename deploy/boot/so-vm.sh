#!/bin/sh
# The orchestrator VM's boot: user_data of deploy/so-stack.yaml, with Heat's values in
# place of its placeholders. It
#   - mounts the state volume (a Cinder volume, formatted on first use) on
#     /var/lib/stateshift: the journal, spool and API certificate outlive the VM, so a
#     replaced VM (image or flavor change) picks up where the old one stopped;
#   - writes the secrets, each to its own 0600 file owned by the stateshift user (they come
#     only through this user_data, never through a software config), the config
#     /etc/stateshift/stateshift.yaml, and known_hosts with the SSH host keys the InfluxDB
#     and Cyclops stacks reported (pinned; new InfluxDB VMs' keys come from their stacks);
#   - makes the API's TLS certificate (on the volume) for the VM's fixed IP and the stack's
#     api_names, again only when those change, installs the stateshift binary (checksum
#     verified) and its unit, and starts the daemon;
#   - tells the stack's WaitCondition (boot/lib.sh), with the VM's SSH host keys and the
#     API certificate as data.
# Upgrading the binary later: `sudo stateshift-upgrade URL SHA256` on the VM (installed here).
set -u

SIGNAL_URL='@@SIGNAL_URL@@'
SIGNAL_TOKEN='@@SIGNAL_TOKEN@@'
VOLUME_ID='@@VOLUME_ID@@'
SO_HOST='@@SO_HOST@@'
API_PORT='@@API_PORT@@'
API_NAMES='@@API_NAMES@@'
BIN_URL='@@STATESHIFT_URL@@'
BIN_SHA256='@@STATESHIFT_SHA256@@'
INFLUXDB_HOST='@@INFLUXDB_HOST@@'
CYCLOPS_HOST='@@CYCLOPS_HOST@@'

@@BOOT_LIB@@

STATE=/var/lib/stateshift
ETC=/etc/stateshift

if [ "${1:-}" = report ]; then
  check() {
    mountpoint -q "$STATE" || { echo "the state volume is not mounted on $STATE"; return 1; }
    systemctl is-enabled --quiet stateshift || { echo "stateshift is not enabled: it would not start after a reboot"; return 1; }
    for _ in $(seq 1 60); do
      code=$(curl -s -o /dev/null -w '%{http_code}' -m 5 --cacert "$STATE/tls/api.crt" "https://$SO_HOST:$API_PORT/healthz")
      # 503: the daemon answers, and waits for an operator (a migration failed past
      # cutover, journaled on the state volume); the VM itself is ready.
      case "$code" in 200|503) return 0 ;; esac
      systemctl is-failed --quiet stateshift && break
      sleep 2
    done
    echo "the daemon's API does not answer on https://$SO_HOST:$API_PORT/healthz (HTTP $code): $(journalctl -u stateshift -n 5 --no-pager -o cat | tr '\n' ' ')"
    return 1
  }
  report
  # The API's certificate, for clients to trust (the stack's output api_certificate).
  python3 -c 'import json, sys; print(json.dumps({"status": "SUCCESS", "reason": "api certificate", "data": open(sys.argv[1]).read(), "id": "api_certificate"}))' \
    "$STATE/tls/api.crt" > "$BOOT_STATE/signal-cert.json"
  [ -s "$BOOT_STATE/failed" ] || curl -sS -o /dev/null --retry 20 --retry-delay 3 --retry-all-errors -m 20 -X POST \
    -H @"$BOOT_SECRETS/signal-header" -H 'Content-Type: application/json' \
    --data-binary @"$BOOT_STATE/signal-cert.json" "$(cat "$BOOT_SECRETS/signal-url")"
  exit 0
fi

boot_start
umask 077
step "installing what the orchestrator needs" install_missing openssh-client curl ca-certificates openssl python3 e2fsprogs
getent passwd stateshift >/dev/null || step "adding the stateshift user" \
  useradd --system --home-dir "$STATE" --shell /usr/sbin/nologin stateshift

# --- the state volume
state_volume() {
  dev=/dev/disk/by-id/virtio-$(printf '%s' "$VOLUME_ID" | cut -c1-20)
  for _ in $(seq 1 300); do [ -b "$dev" ] && break; sleep 1; done
  [ -b "$dev" ] || { echo "volume $VOLUME_ID did not appear as $dev"; return 1; }
  if ! blkid -p "$dev" >/dev/null 2>&1; then
    mkfs.ext4 -q -L stateshift-state "$dev" || return 1
  fi
  uuid=$(blkid -s UUID -o value "$dev")
  mkdir -p "$STATE"
  sed -i '\|[[:space:]]/var/lib/stateshift[[:space:]]|d' /etc/fstab
  echo "UUID=$uuid $STATE ext4 defaults,nofail,x-systemd.device-timeout=300 0 2" >> /etc/fstab
  mountpoint -q "$STATE" || mount "$STATE" || return 1
  chown stateshift:stateshift "$STATE" && chmod 0700 "$STATE"
}
step "mounting the state volume $VOLUME_ID on $STATE" state_volume

# --- secrets and config (quoted here-documents: nothing in them is expanded)
install -d -m 0700 "$ETC"
cat > "$ETC/id_ssh" <<'STATESHIFT_SECRET_EOF'
@@SSH_PRIVATE_KEY@@
STATESHIFT_SECRET_EOF
cat > "$ETC/influxdb-admin.password" <<'STATESHIFT_SECRET_EOF'
@@INFLUXDB_ADMIN_PASSWORD@@
STATESHIFT_SECRET_EOF
cat > "$ETC/influx-users.yaml" <<'STATESHIFT_SECRET_EOF'
@@INFLUXDB_USER_PASSWORDS@@
STATESHIFT_SECRET_EOF
cat > "$ETC/heat.secret" <<'STATESHIFT_SECRET_EOF'
@@HEAT_SECRET@@
STATESHIFT_SECRET_EOF
cat > "$ETC/zabbix.password" <<'STATESHIFT_SECRET_EOF'
@@ZABBIX_PASSWORD@@
STATESHIFT_SECRET_EOF
cat > "$ETC/api.token" <<'STATESHIFT_SECRET_EOF'
@@API_TOKEN@@
STATESHIFT_SECRET_EOF
cat > "$ETC/stateshift.yaml" <<'STATESHIFT_FILE_EOF'
@@CONFIG@@
STATESHIFT_FILE_EOF
# Heat environment for the target stacks (may be empty).
install -d -m 0755 /opt/stateshift/heat-templates/boot /opt/stateshift/scripts
cat > /opt/stateshift/heat-templates/target-environment.yaml <<'STATESHIFT_FILE_EOF'
@@TARGET_ENVIRONMENT@@
STATESHIFT_FILE_EOF
cat > /opt/stateshift/heat-templates/influxdb.yaml <<'STATESHIFT_FILE_EOF'
@@TEMPLATE_INFLUXDB@@
STATESHIFT_FILE_EOF
cat > /opt/stateshift/heat-templates/boot/influxdb-vm.sh <<'STATESHIFT_FILE_EOF'
@@TEMPLATE_INFLUXDB_BOOT@@
STATESHIFT_FILE_EOF
cat > /opt/stateshift/heat-templates/boot/lib.sh <<'STATESHIFT_FILE_EOF'
@@TEMPLATE_BOOT_LIB@@
STATESHIFT_FILE_EOF
chmod -R a+rX /opt/stateshift

# known_hosts: the keys the InfluxDB and Cyclops stacks reported (their ssh_host_keys
# outputs: a WaitCondition's data, or plain key lines).
known_hosts() {
  cat > "$BOOT_SECRETS/keys-influxdb" <<'STATESHIFT_FILE_EOF'
@@INFLUXDB_SSH_HOST_KEYS@@
STATESHIFT_FILE_EOF
  cat > "$BOOT_SECRETS/keys-cyclops" <<'STATESHIFT_FILE_EOF'
@@CYCLOPS_SSH_HOST_KEYS@@
STATESHIFT_FILE_EOF
  python3 - "$INFLUXDB_HOST" "$BOOT_SECRETS/keys-influxdb" "$CYCLOPS_HOST" "$BOOT_SECRETS/keys-cyclops" <<'PY' > "$ETC/known_hosts"
import json, re, sys
args = sys.argv[1:]
for host, path in zip(args[0::2], args[1::2]):
    text = open(path).read().strip()
    if text.startswith("{"):
        data = json.loads(text)
        text = data.get("ssh_host_keys") or "\n".join(v for v in data.values() if isinstance(v, str))
    keys = [l.split()[:2] for l in text.splitlines() if l.strip()]
    if not keys:
        sys.exit("no SSH host key given for %s" % host)
    for k in keys:
        if len(k) != 2 or not re.match(r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-[a-z0-9]+)$", k[0]):
            sys.exit("not an SSH public key for %s: %r" % (host, " ".join(k)))
        print(host, k[0], k[1])
PY
}
step "pinning the InfluxDB and Cyclops VMs' SSH host keys" known_hosts
chown -R stateshift:stateshift "$ETC"
chmod 0600 "$ETC"/*

# --- the API's certificate, kept on the volume: made once for the names it must hold
# (the VM's fixed IP and the stack's api_names), and again when those change.
api_sans() {
  python3 - "$SO_HOST" "$API_NAMES" <<'PY'
import ipaddress, re, sys
sans = ["IP:" + sys.argv[1]]
label = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
for n in re.split(r"[,\s]+", sys.argv[2].strip()):
    if not n:
        continue
    try:
        sans.append("IP:" + str(ipaddress.ip_address(n)))
    except ValueError:
        if len(n) > 253 or re.fullmatch(r"[0-9.]+", n) or not re.fullmatch(rf"{label}(\.{label})*", n):
            sys.exit(f"api_names: {n} is neither a DNS name nor an IP address")
        sans.append("DNS:" + n)
print(",".join(sans))
PY
}
api_cert() {
  sans=$(api_sans 2>&1) || { echo "$sans"; return 1; }
  crt=$STATE/tls/api.crt key=$STATE/tls/api.key names=$STATE/tls/api.names
  if [ -s "$crt" ] && [ -s "$key" ]; then
    # A certificate made before its names were recorded had the fixed IP alone.
    [ -s "$names" ] || printf 'IP:%s\n' "$SO_HOST" > "$names"
    [ "$(cat "$names")" = "$sans" ] && return 0
    echo "the API's certificate names $(cat "$names"); making one for $sans"
  fi
  install -d -m 0700 -o stateshift -g stateshift "$STATE/tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 3650 \
    -subj "/CN=stateshift $SO_HOST" -addext "subjectAltName=$sans" \
    -addext 'basicConstraints=critical,CA:FALSE' -addext 'extendedKeyUsage=serverAuth' \
    -keyout "$key.new" -out "$crt.new" 2>&1 || return 1
  mv "$key.new" "$key" && mv "$crt.new" "$crt" && printf '%s\n' "$sans" > "$names"
  chown stateshift:stateshift "$key" "$crt" "$names"
  chmod 0600 "$key"
}
step "making the API's TLS certificate" api_cert

# --- the binary, its unit and the upgrade helper
cat > /usr/local/sbin/stateshift-upgrade <<'STATESHIFT_FILE_EOF'
#!/bin/sh
# stateshift-upgrade URL SHA256: install another stateshift binary (checksum verified).
# The daemon stops at a safe point first (a running migration finishes; systemd waits up to
# the unit's TimeoutStopSec), then starts on the new binary and settles anything left
# unfinished from its journal.
set -eu
[ $# -eq 2 ] || { echo "usage: $0 URL SHA256" >&2; exit 2; }
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
curl -fsSL --retry 5 -o "$tmp" "$1"
echo "$2  $tmp" | sha256sum -c --quiet
chmod 0755 "$tmp"
"$tmp" --version >/dev/null
systemctl stop stateshift
install -m 0755 "$tmp" /usr/local/bin/stateshift
systemctl start stateshift
echo "stateshift upgraded: $(/usr/local/bin/stateshift --version)"
STATESHIFT_FILE_EOF
chmod 0755 /usr/local/sbin/stateshift-upgrade
cat > /etc/systemd/system/stateshift.service <<'STATESHIFT_FILE_EOF'
@@UNIT@@
STATESHIFT_FILE_EOF
chmod 0644 /etc/systemd/system/stateshift.service
install_binary() {
  tmp=$(mktemp)
  curl -fsSL --retry 5 -o "$tmp" "$BIN_URL" || return 1
  echo "$BIN_SHA256  $tmp" | sha256sum -c --quiet || { rm -f "$tmp"; echo "checksum mismatch"; return 1; }
  install -m 0755 "$tmp" /usr/local/bin/stateshift && rm -f "$tmp"
}
step "installing stateshift from $BIN_URL" install_binary
step "checking the configuration" runuser -u stateshift -- /usr/local/bin/stateshift config check -c "$ETC/stateshift.yaml"
# The unit file was just written (and may differ from a previous boot's): one reload.
start_daemon() {
  systemctl daemon-reload && enable_units stateshift.service && systemctl start stateshift.service
}
step "starting the daemon" start_daemon
log "setup done; the report tells Heat once cloud-init has finished and the API answers"
