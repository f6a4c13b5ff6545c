#!/bin/sh
# mmdebstrap --customize-hook of the lab image (scripts/vmlab.sh image): $1 = the new root.
#
# What a Debian cloud image with InfluxDB, the Zabbix agent and cloud-init baked in holds,
# and nothing else: cloud-init finds its NoCloud seed and renders the network config it
# carries (the lab's stand-in for Neutron's metadata), no SSH host key and no machine id
# are shared between VMs, and no service that the boot must configure first (InfluxDB,
# the Zabbix agent, the Cyclops stand-ins) starts on its own.
set -eu
R="$1"
LAB=$(dirname "$(readlink -f "$0")")

echo lab > "$R/etc/hostname"
printf '127.0.0.1 localhost\n' > "$R/etc/hosts"
chroot "$R" systemctl enable systemd-networkd.service

cat > "$R/etc/cloud/cloud.cfg.d/05_stateshift_lab.cfg" <<'CC'
# The lab is a NoCloud cloud: seed on a disk labelled cidata (user-data, meta-data,
# network-config), written by the lab's Nova stand-in from what Heat rendered.
datasource_list: [ NoCloud, None ]
# The host name Nova gives resolves (sudo and others look it up), as on Debian's cloud images.
manage_etc_hosts: true
CC

# Debian's locale-gen ignores its argument, so cloud-init's locale module (default
# en_US.UTF-8) fails on a minbase system unless the locale is already generated.
sed -i 's/^# *en_US.UTF-8 UTF-8/en_US.UTF-8 UTF-8/' "$R/etc/locale.gen"
chroot "$R" locale-gen >/dev/null
echo 'LANG=en_US.UTF-8' > "$R/etc/default/locale"

# Every VM makes its own identity at first boot.
: > "$R/etc/machine-id"
rm -f "$R/var/lib/dbus/machine-id" "$R"/etc/ssh/ssh_host_*

# Installed, not running: the boot script configures them (auth, bind addresses, the
# Zabbix server) and then enables them. A stock image that lacks them gets them from apt
# in the same script.
chroot "$R" systemctl disable influxdb.service zabbix-agent.service >/dev/null 2>&1 || true

# The Cyclops stand-ins (tests/lab writers that read the real Cyclops configuration files
# and keep a ledger of every acknowledged point), installed as a Cyclops image would hold
# Cyclops: under /opt/cyclops, units cyclops-udr, cyclops-rc, cyclops-billing, not enabled.
install -d "$R/opt/cyclops/udr" "$R/opt/cyclops/rc" "$R/opt/cyclops/billing" "$R/var/lib/cyclops"
install -m 0755 "$LAB/cyclops-standin/standin.py" "$R/opt/cyclops/standin.py"
install -m 0644 "$LAB/cyclops-standin/udr-configuration.txt" "$R/opt/cyclops/udr/configuration.txt"
install -m 0644 "$LAB/cyclops-standin/udr-config.js" "$R/opt/cyclops/udr/config.js"
install -m 0644 "$LAB/cyclops-standin/rc-configuration.txt" "$R/opt/cyclops/rc/configuration.txt"
install -m 0644 "$LAB/cyclops-standin/billing-configuration.txt" "$R/opt/cyclops/billing/configuration.txt"
for svc in udr rc billing; do
  sed "s/@SVC@/$svc/g" "$LAB/cyclops-standin/cyclops.service.in" > "$R/etc/systemd/system/cyclops-$svc.service"
done

# A serial console that shows the boot, and a journal that survives for the lab's logs.
install -d "$R/var/log/journal"
