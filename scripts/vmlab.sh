#!/usr/bin/env bash
# The VM lab: real Debian VMs under QEMU that the real Heat creates from stateshift's
# templates (through the Nova/Neutron/Cinder stand-ins in scripts/vmlab/heat_plugin, which
# scripts/openstack.sh installs), on a private network in a network namespace.
#
#   scripts/vmlab.sh image    build the lab image if it is not cached (mmdebstrap; ~1 min)
#   scripts/vmlab.sh up       image + the lab network; idempotent
#   scripts/vmlab.sh down     stop every lab VM and forwarder, delete the network namespace
#   scripts/vmlab.sh status   one line per part; exit 0 only when the lab is up
#   scripts/vmlab.sh vms      the running VMs (id, address, name)
#   scripts/vmlab.sh stop-vms stop every lab VM (their stacks stay in Heat)
#   scripts/vmlab.sh keypair NAME PUBKEY-FILE   register a "Nova key pair" for key_name
#
# The network ("the tenant network"): namespace $NETNS, bridge br0 with $GW/24; each VM's
# NIC is a tap on br0 with the fixed IP its Neutron port got (192.168.77.10-250). Nothing of
# it is visible outside the namespace. Inside it, the cloud's services answer where a VM
# on a real cloud would reach them, through socat forwarders to the host's loopback
# (unix sockets in between, so nothing listens outside loopback and the namespace):
#   $GW:25500 and 127.0.0.1:25500   Keystone          $GW:28004 and 127.0.0.1:28004  Heat
#   $GW:25051                       Zabbix server     $GW:25080 and 127.0.0.1:25080  Zabbix API
# A process run in the namespace (`ip netns exec $NETNS ...`, or a test thread that
# entered it) sees the same loopback endpoints as the host, plus the VMs.
#
# The image: Debian bookworm from Debian's packages (kernel, cloud-init, sshd, InfluxDB,
# zabbix-agent, the Cyclops stand-ins), cached in $CACHE keyed by the hash of what built
# it; rebuilt when absent or when the recipe changed. VMs boot it on copy-on-write
# overlays, with KVM when a timed probe shows it works and TCG (software emulation)
# otherwise (`STATESHIFT_VMLAB_ACCEL=kvm|tcg` forces one).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${STATESHIFT_VMLAB_DIR:-/tmp/stateshift-vmlab}
CACHE=${STATESHIFT_VMLAB_CACHE:-/var/cache/stateshift-vmlab}
NETNS=${STATESHIFT_VMLAB_NETNS:-stateshift-lab}
IMAGE_NAME=debian-12-stateshift-lab
GW=192.168.77.1
FORWARDS=("25500:both" "28004:both" "25051:gw" "25080:both")
PKGS=(qemu-system-x86 qemu-utils mmdebstrap genisoimage socat e2fsprogs iproute2 nftables)
INCLUDE=systemd-sysv,udev,dbus,linux-image-cloud-amd64,initramfs-tools,zstd,cloud-init,openssh-server,influxdb,influxdb-client,zabbix-agent,curl,iproute2,netbase,sudo,ca-certificates,procps,openssl,e2fsprogs,python3,less

T0=$(date +%s.%N)
log() { printf '[vmlab.sh %5.1fs] %s\n' "$(awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN{print a-b}')" "$*"; }
die() { echo "vmlab.sh: ERROR: $*" >&2; exit 1; }

install_pkgs() {
  local need=() p
  for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || need+=("$p")
  done
  [ ${#need[@]} -eq 0 ] && return 0
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-cache policy qemu-system-x86 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    apt-get -o DPkg::Lock::Timeout=600 update -qq
  fi
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

# The cache key: everything that decides what the image holds.
image_key() {
  { echo "$INCLUDE"; cat "$HERE/vmlab/customize.sh" "$HERE"/vmlab/cyclops-standin/*; } | sha256sum | cut -c1-16
}

image_dir() { echo "$CACHE/images/$IMAGE_NAME-$(image_key)"; }

build_image() {
  local out; out=$(image_dir)
  if [ -s "$out/disk.img" ] && [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ]; then
    ln -sfn "$out" "$CACHE/images/$IMAGE_NAME"
    log "image cached: $out"
    return 0
  fi
  install_pkgs
  local work; work=$(mktemp -d "$CACHE/build.XXXXXX")
  # A RETURN trap outlives the function that set it: it fires again when the caller
  # returns, where `work` is unset (`set -u` then failed `up` on every fresh machine).
  trap 'rm -rf "${work:-}"; trap - RETURN' RETURN
  log "building $IMAGE_NAME with mmdebstrap (Debian bookworm; about a minute)"
  mmdebstrap --quiet --mode=root --variant=minbase --include="$INCLUDE" \
    --essential-hook='echo "/dev/vda / ext4 rw,errors=remount-ro 0 1" > "$1/etc/fstab"' \
    --essential-hook='mkdir -p "$1/etc/initramfs-tools/conf.d" && echo FSTYPE=ext4 > "$1/etc/initramfs-tools/conf.d/fstype"' \
    --customize-hook="\"$HERE/vmlab/customize.sh\" \"\$1\"" \
    bookworm "$work/root" >"$work/mmdebstrap.log" 2>&1 \
    || { tail -30 "$work/mmdebstrap.log" >&2; die "mmdebstrap failed"; }
  cp "$work"/root/boot/vmlinuz-* "$work/vmlinuz"
  cp "$work"/root/boot/initrd.img-* "$work/initrd.img"
  # A raw ext4 file system, no partition table: the kernel and initrd go to QEMU directly,
  # and cloud-init's resizefs grows it to the flavor's disk at first boot.
  mkfs.ext4 -q -F -L lab-root -d "$work/root" "$work/disk.img" 3G
  rm -rf "$work/root"
  mkdir -p "$out"
  mv "$work/vmlinuz" "$work/initrd.img" "$work/disk.img" "$out/"
  ln -sfn "$out" "$CACHE/images/$IMAGE_NAME"
  # Older images of this name go: the cache holds one recipe's image.
  find "$CACHE/images" -maxdepth 1 -name "$IMAGE_NAME-*" ! -path "$out" -exec rm -rf {} +
  log "image built: $out ($(du -sh --apparent-size "$out/disk.img" | cut -f1) apparent, $(du -sh "$out/disk.img" | cut -f1) on disk)"
}

# KVM only when a guest really runs under it: /dev/kvm here may be a nested hypervisor on
# which a normal guest hangs at boot. The probe boots the lab kernel (no root disk) and
# waits for its first console lines.
probe_accel() {
  case "${STATESHIFT_VMLAB_ACCEL:-auto}" in
    kvm|tcg) echo "$STATESHIFT_VMLAB_ACCEL"; return ;;
  esac
  if [ ! -w /dev/kvm ]; then echo tcg; return; fi
  local img out
  img=$(image_dir)
  out=$(timeout 15 qemu-system-x86_64 -enable-kvm -cpu host -m 256 -nographic -no-reboot \
          -kernel "$img/vmlinuz" -append "console=ttyS0 panic=-1 quiet=0" 2>/dev/null | head -c 65536 || true)
  if printf '%s' "$out" | grep -q 'Linux version'; then echo kvm; else echo tcg; fi
}

fwd_pid() { echo "$DIR/run/fwd-$1.pid"; }
alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_forwarder() { # NAME PIDFILE CMD...
  local name=$1 pf=$2; shift 2
  alive "$pf" && return 0
  setsid "$@" </dev/null >>"$DIR/logs/fwd-$name.log" 2>&1 &
  echo $! >"$pf"
}

net_up() {
  if ! ip netns list | grep -qw "$NETNS"; then
    ip netns add "$NETNS"
  fi
  local ns=(ip netns exec "$NETNS")
  "${ns[@]}" ip link set lo up
  if ! "${ns[@]}" ip link show br0 >/dev/null 2>&1; then
    "${ns[@]}" ip link add br0 type bridge
    "${ns[@]}" ip addr add "$GW/24" dev br0
  fi
  "${ns[@]}" ip link set br0 up
  mkdir -p "$DIR/run/fwd"
  local f port where sock
  for f in "${FORWARDS[@]}"; do
    port=${f%%:*}; where=${f##*:}
    sock=$DIR/run/fwd/$port.sock
    start_forwarder "host-$port" "$(fwd_pid "host-$port")" \
      socat "UNIX-LISTEN:$sock,fork,unlink-early,mode=600" "TCP:127.0.0.1:$port"
    start_forwarder "gw-$port" "$(fwd_pid "gw-$port")" \
      ip netns exec "$NETNS" socat "TCP-LISTEN:$port,bind=$GW,fork,reuseaddr" "UNIX-CONNECT:$sock"
    if [ "$where" = both ]; then
      start_forwarder "lo-$port" "$(fwd_pid "lo-$port")" \
        ip netns exec "$NETNS" socat "TCP-LISTEN:$port,bind=127.0.0.1,fork,reuseaddr" "UNIX-CONNECT:$sock"
    fi
  done
}

write_state() {
  local accel=$1 tmp=$DIR/lab.json.tmp
  cat >"$tmp" <<EOF
{
  "netns": "$NETNS",
  "bridge": "br0",
  "gateway": "$GW",
  "prefix": 24,
  "first_ip": 10,
  "last_ip": 250,
  "accel": "$accel",
  "images": {"$IMAGE_NAME": "$CACHE/images/$IMAGE_NAME"},
  "dir": "$DIR"
}
EOF
  mv -f "$tmp" "$DIR/lab.json"
}

stop_vms() {
  local pf pid
  for pf in "$DIR"/vms/*/qemu.pid; do
    [ -s "$pf" ] || continue
    pid=$(cat "$pf")
    kill "$pid" 2>/dev/null || true
  done
  sleep 0.5
  for pf in "$DIR"/vms/*/qemu.pid; do
    [ -s "$pf" ] || continue
    kill -9 "$(cat "$pf")" 2>/dev/null || true
  done
}

up() {
  [ "$(id -u)" = 0 ] || die "run as root (network namespace, taps, Debian packages)"
  mkdir -p "$DIR"/{run,logs,vms,ports,volumes,keypairs} "$CACHE/images"
  install_pkgs
  build_image
  net_up
  local accel; accel=$(probe_accel)
  write_state "$accel"
  log "ready: netns $NETNS, gateway $GW, accel $accel, image $(readlink -f "$CACHE/images/$IMAGE_NAME")"
}

down() {
  stop_vms
  local pf
  for pf in "$DIR"/run/fwd-*.pid; do
    [ -s "$pf" ] || continue
    kill "$(cat "$pf")" 2>/dev/null || true
    rm -f "$pf"
  done
  if ip netns list | grep -qw "$NETNS"; then ip netns delete "$NETNS"; fi
  rm -rf "$DIR"/vms/* "$DIR"/ports/* "$DIR"/volumes/* "$DIR/lab.json"
  log "down"
}

status() {
  local rc=0
  if [ -f "$DIR/lab.json" ] && ip netns list | grep -qw "$NETNS"; then
    echo "network: $NETNS up ($(ip netns exec "$NETNS" ip -br addr show br0 | awk '{print $3}'))"
  else echo "network: down"; rc=1; fi
  local img; img=$(image_dir)
  if [ -s "$img/disk.img" ]; then echo "image:   $img"; else echo "image:   not built"; rc=1; fi
  echo "vms:     $(vms | grep -c . || true) running"
  return $rc
}

vms() {
  local d
  for d in "$DIR"/vms/*/; do
    [ -s "$d/qemu.pid" ] && kill -0 "$(cat "$d/qemu.pid")" 2>/dev/null || continue
    printf '%s %s %s\n' "$(basename "$d")" "$(cat "$d/ip" 2>/dev/null)" "$(cat "$d/name" 2>/dev/null)"
  done
}

keypair() {
  [ $# -eq 2 ] || die "usage: $0 keypair NAME PUBKEY-FILE"
  [[ $1 =~ ^[A-Za-z0-9._-]+$ ]] || die "key pair name '$1': letters, digits, '.', '_', '-' only"
  grep -qE '^(ssh-ed25519|ssh-rsa|ecdsa-sha2-[a-z0-9-]+) [A-Za-z0-9+/=]+' "$2" || die "$2: not an OpenSSH public key"
  mkdir -p "$DIR/keypairs"
  install -m 0644 "$2" "$DIR/keypairs/$1.pub"
}

case "${1:-}" in
  image) mkdir -p "$CACHE/images"; build_image ;;
  up) up ;;
  down) down ;;
  status) status ;;
  vms) vms ;;
  stop-vms) stop_vms ;;
  keypair) shift; keypair "$@" ;;
  *) echo "usage: $0 image|up|down|status|vms|stop-vms|keypair NAME PUBKEY-FILE" >&2; exit 2 ;;
esac
