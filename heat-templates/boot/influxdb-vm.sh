#!/bin/sh
# The InfluxDB VM's boot: user_data of heat-templates/influxdb.yaml, with Heat's values in
# place of its placeholders. Ends with InfluxDB 1.x on the Debian image:
#   - HTTP API on every address, port @@HTTP_PORT@@, auth-enabled, one admin user (created
#     while the API listened on loopback only, so nobody else can make the first admin);
#   - backup/restore RPC on 127.0.0.1:8088 only (stateshift runs dump and restore on the VM);
#   - [subscriber] write-concurrency = 1: forwarded writes keep their order, which
#     stateshift's capture relies on when this instance is migrated again;
#   - a Zabbix agent (active checks) reporting as @@ZABBIX_HOST@@;
# and tells the stack's WaitCondition (boot/lib.sh).
set -u

# --- what Heat rendered (secrets go to root-only files, never to a command line)
SIGNAL_URL='@@SIGNAL_URL@@'
SIGNAL_TOKEN='@@SIGNAL_TOKEN@@'
HTTP_PORT='@@HTTP_PORT@@'
SSH_PORT='@@SSH_PORT@@'
ADMIN_USER='@@ADMIN_USER@@'
ZABBIX_SERVER='@@ZABBIX_SERVER@@'
ZABBIX_HOST='@@ZABBIX_HOST@@'
ZABBIX_METADATA='@@ZABBIX_METADATA@@'
ZABBIX_REFRESH='@@ZABBIX_REFRESH@@'
SETTINGS='@@SETTINGS@@'

@@BOOT_LIB@@

if [ "${1:-}" = report ]; then
  check() {
    # The final configuration answers: the API on its public bind, auth enforced, the
    # admin accepted, ordered subscriptions.
    addr=$(ip -4 -o addr show scope global | awk '{print $4}' | cut -d/ -f1 | head -1)
    code=$(curl -s -o /dev/null -w '%{http_code}' -m 5 "http://$addr:$HTTP_PORT/ping")
    [ "$code" = 204 ] || { echo "InfluxDB does not answer on $addr:$HTTP_PORT (HTTP $code)"; return 1; }
    code=$(curl -s -o /dev/null -w '%{http_code}' -m 5 -G "http://$addr:$HTTP_PORT/query" --data-urlencode 'q=SHOW USERS')
    [ "$code" = 401 ] || { echo "InfluxDB answers without credentials (HTTP $code): auth is not enabled"; return 1; }
    code=$(curl -s -o /dev/null -w '%{http_code}' -m 5 -K "$BOOT_SECRETS/influxdb-admin.curl" -G "http://$addr:$HTTP_PORT/query" --data-urlencode 'q=SHOW USERS')
    [ "$code" = 200 ] || { echo "the admin user is refused (HTTP $code)"; return 1; }
    grep -q '^INFLUXDB_SUBSCRIBER_WRITE_CONCURRENCY=1$' /etc/default/influxdb || { echo "subscriber write-concurrency is not 1"; return 1; }
    systemctl is-active --quiet zabbix-agent || { echo "zabbix-agent is not running"; return 1; }
    for u in influxdb zabbix-agent; do
      systemctl is-enabled --quiet "$u" || { echo "$u is not enabled: it would not start after a reboot"; return 1; }
    done
  }
  report
  exit 0
fi

boot_start
umask 077
cat > "$BOOT_SECRETS/influxdb-admin.password" <<'STATESHIFT_SECRET_EOF'
@@ADMIN_PASSWORD@@
STATESHIFT_SECRET_EOF
pw=$(head -n 1 "$BOOT_SECRETS/influxdb-admin.password")
# curl reads the credentials from a file (-K), not from its command line.
printf 'user = "%s:%s"\n' "$ADMIN_USER" "$pw" > "$BOOT_SECRETS/influxdb-admin.curl"
printf 'CREATE USER "%s" WITH PASSWORD '"'"'%s'"'"' WITH ALL PRIVILEGES' "$ADMIN_USER" "$pw" > "$BOOT_SECRETS/create-admin.q"
unset pw

step "installing InfluxDB and the Zabbix agent" install_missing influxdb influxdb-client zabbix-agent curl python3

if [ "$SSH_PORT" != 22 ]; then
  printf 'Port %s\n' "$SSH_PORT" > /etc/ssh/sshd_config.d/stateshift.conf
  step "moving sshd to port $SSH_PORT" systemctl restart ssh
fi

# Settings go to /etc/default/influxdb (the Debian unit's EnvironmentFile) as InfluxDB's
# own INFLUXDB_<SECTION>_<KEY> overrides: nothing is edited in influxdb.conf.
influx_env() { # BIND-ADDRESS
  {
    echo "# written by stateshift's boot (heat-templates/boot/influxdb-vm.sh)"
    echo "INFLUXDB_HTTP_BIND_ADDRESS=$1"
    echo "INFLUXDB_HTTP_AUTH_ENABLED=true"
    echo "INFLUXDB_BIND_ADDRESS=127.0.0.1:8088"
    echo "INFLUXDB_SUBSCRIBER_WRITE_CONCURRENCY=1"
    # A deep forwarding queue: a migration starts when this VM is loaded, and a write the
    # subscriber drops for a full queue stops the migration (safely, but it stops).
    echo "INFLUXDB_SUBSCRIBER_WRITE_BUFFER_SIZE=20000"
    # No _internal statistics database: Zabbix watches this VM, and the statistics cost
    # a write every 10 s (the capture forwards them for its drain proof if they exist).
    echo "INFLUXDB_MONITOR_STORE_ENABLED=false"
    printf '%s' "$SETTINGS" | tr ',' '\n' | sed '/^$/d'
  } > /etc/default/influxdb
  chmod 0644 /etc/default/influxdb
}
# Operator settings: INFLUXDB_<SECTION>_<KEY>=value, comma-separated.
for kv in $(printf '%s' "$SETTINGS" | tr ',' ' '); do
  printf '%s' "$kv" | grep -Eq '^INFLUXDB_[A-Z0-9_]+=[^[:space:]]*$' \
    || fail "influxdb_settings: '$kv' is not INFLUXDB_<SECTION>_<KEY>=value"
done

wait_ping() { # ADDRESS
  for _ in $(seq 1 90); do
    [ "$(curl -s -o /dev/null -w '%{http_code}' -m 2 "http://$1/ping")" = 204 ] && return 0
    systemctl is-failed --quiet influxdb && break
    sleep 1
  done
  echo "InfluxDB did not answer on $1:"
  journalctl -u influxdb -n 8 --no-pager -o cat 2>&1 | grep -v '^$' | tail -n 8
  return 1
}

# 1. Loopback only, until the admin exists.
influx_env "127.0.0.1:$HTTP_PORT"
step "starting InfluxDB on loopback" systemctl restart influxdb
step "waiting for InfluxDB on loopback" wait_ping "127.0.0.1:$HTTP_PORT"
if ! curl -sf -o /dev/null -m 10 -K "$BOOT_SECRETS/influxdb-admin.curl" -G "http://127.0.0.1:$HTTP_PORT/query" --data-urlencode 'q=SHOW USERS'; then
  step "creating the admin user $ADMIN_USER" curl -sSf -o /dev/null -m 10 -XPOST \
    "http://127.0.0.1:$HTTP_PORT/query" --data-urlencode "q@$BOOT_SECRETS/create-admin.q"
fi
rm -f "$BOOT_SECRETS/create-admin.q"
# 2. Every address, auth enforced.
influx_env ":$HTTP_PORT"
step "enabling InfluxDB" enable_units influxdb
step "restarting InfluxDB on every address" systemctl restart influxdb
step "waiting for InfluxDB" wait_ping "127.0.0.1:$HTTP_PORT"

step "configuring the Zabbix agent" zabbix_agent "$ZABBIX_SERVER" "$ZABBIX_HOST" "$ZABBIX_METADATA" "$ZABBIX_REFRESH"
log "setup done; the report tells Heat once cloud-init has finished"
