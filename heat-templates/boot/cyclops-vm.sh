#!/bin/sh
# The Cyclops VM's boot: user_data of heat-templates/rcbaas.yaml, with Heat's values in
# place of its placeholders. The image holds Cyclops under @@CYCLOPS_DIR@@ (units cyclops-udr, cyclops-rc,
# cyclops-billing). The boot gives Cyclops its InfluxDB credentials, installs
# configure-cyclops.sh (the same script stateshift runs over SSH at cutover), points Cyclops
# at the service's InfluxDB with it and starts the services, sets up the Zabbix agent,
# and tells the stack's WaitCondition (boot/lib.sh).
set -u

SIGNAL_URL='@@SIGNAL_URL@@'
SIGNAL_TOKEN='@@SIGNAL_TOKEN@@'
CYCLOPS_DIR='@@CYCLOPS_DIR@@'
INFLUXDB_URL='@@INFLUXDB_URL@@'
INFLUXDB_USER='@@INFLUXDB_USER@@'
ZABBIX_SERVER='@@ZABBIX_SERVER@@'
ZABBIX_HOST='@@ZABBIX_HOST@@'
ZABBIX_REFRESH='@@ZABBIX_REFRESH@@'

@@BOOT_LIB@@

UNITS="cyclops-udr cyclops-rc cyclops-billing"

if [ "${1:-}" = report ]; then
  check() {
    # Started at every boot: enabled, generated (a generator's links) or static (no
    # [Install]: pulled in by another unit, or not at all; the boot warned). `--quiet`
    # would also pass enabled-runtime, which a reboot forgets, and other states.
    for u in $UNITS; do
      systemctl cat "$u.service" >/dev/null 2>&1 || continue
      systemctl is-active --quiet "$u" || { echo "$u is not running: $(journalctl -u "$u" -n 3 --no-pager -o cat | tr '\n' ' ')"; return 1; }
      case $(systemctl is-enabled "$u" 2>/dev/null) in
        enabled|generated|static) ;;
        *) echo "$u is not enabled ($(systemctl is-enabled "$u" 2>&1)): it would not start after a reboot"; return 1 ;;
      esac
    done
    systemctl is-active --quiet zabbix-agent || { echo "zabbix-agent is not running"; return 1; }
    systemctl is-enabled --quiet zabbix-agent || { echo "zabbix-agent is not enabled: it would not start after a reboot"; return 1; }
  }
  report
  exit 0
fi

boot_start
umask 077
cat > "$BOOT_SECRETS/influxdb.password" <<'STATESHIFT_SECRET_EOF'
@@INFLUXDB_PASSWORD@@
STATESHIFT_SECRET_EOF

install -d -m 0755 /opt/stateshift/scripts
cat > /opt/stateshift/scripts/configure-cyclops.sh <<'STATESHIFT_FILE_EOF'
@@CONFIGURE_CYCLOPS@@
STATESHIFT_FILE_EOF
chmod 0755 /opt/stateshift/scripts/configure-cyclops.sh

step "installing the Zabbix agent" install_missing zabbix-agent curl python3

# Cyclops's credentials: the user/password keys of each service's configuration file
# (InfluxDBUsername=, InfluxDBPassword= in udr and rc; InfluxDbUsername==, ... in billing).
credentials() {
  python3 - "$CYCLOPS_DIR" "$INFLUXDB_USER" "$BOOT_SECRETS/influxdb.password" <<'PY'
import os, re, sys
d, user, pwfile = sys.argv[1:]
pw = open(pwfile).readline().rstrip("\n")
done = 0
for svc in ("udr", "rc", "billing"):
    p = os.path.join(d, svc, "configuration.txt")
    if not os.path.exists(p):
        continue
    out = []
    for line in open(p):
        m = re.match(r"^(\s*)(InfluxD[Bb](Username|Password))(\s*==?\s*)(.*)$", line.rstrip("\n"))
        if m:
            value = user if m.group(3) == "Username" else pw
            line = "%s%s%s%s\n" % (m.group(1), m.group(2), m.group(4), value)
        out.append(line)
    tmp = p + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(out)
    st = os.stat(p)
    os.chmod(tmp, 0o640)
    os.chown(tmp, st.st_uid, st.st_gid)
    os.replace(tmp, p)
    done += 1
if not done:
    sys.exit("no Cyclops configuration.txt under %s" % d)
PY
}
step "giving Cyclops its InfluxDB credentials" credentials
for u in $UNITS; do
  systemctl cat "$u.service" >/dev/null 2>&1 || continue
  step "enabling $u" enable_units "$u"
  [ "$(systemctl is-enabled "$u" 2>/dev/null)" != static ] ||
    log "warning: $u.service has no [Install] section: after a reboot it starts only if another unit of the image pulls it in"
done
step "pointing Cyclops at $INFLUXDB_URL and starting it" \
  /opt/stateshift/scripts/configure-cyclops.sh --restart "$INFLUXDB_URL" "$CYCLOPS_DIR"
step "configuring the Zabbix agent" zabbix_agent "$ZABBIX_SERVER" "$ZABBIX_HOST" stateshift-cyclops "$ZABBIX_REFRESH"
log "setup done; the report tells Heat once cloud-init has finished"
