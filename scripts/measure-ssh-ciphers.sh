#!/usr/bin/env bash
# What each SSH cipher costs per byte, on both ends (docs/benchmarks.md, stop 32): an sshd
# of its own on 127.0.0.9 and a client send SIZE bytes (default 2 GB) through one session,
# RUNS times (default 3) for each cipher, interleaved. Prints the user and system CPU
# seconds of the client (`ssh`) and of the server's session process (`sshd`), and the
# wall time. As root (sshd's /run/sshd); needs openssh-server and openssh-client
# (scripts/setup.sh), GNU time.
set -euo pipefail
SIZE=${SIZE:-2000000000}
RUNS=${RUNS:-3}
CIPHERS=${CIPHERS:-chacha20-poly1305@openssh.com aes128-gcm@openssh.com}
W=$(mktemp -d /tmp/stateshift-ciphers.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.9",0)); print(s.getsockname()[1])')
ssh-keygen -q -t ed25519 -N '' -f "$W/host"
ssh-keygen -q -t ed25519 -N '' -f "$W/client"
cp "$W/client.pub" "$W/authorized_keys"
cat > "$W/sshd_config" <<CONF
ListenAddress 127.0.0.9:$PORT
HostKey $W/host
AuthorizedKeysFile $W/authorized_keys
PidFile $W/sshd.pid
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
CONF
mkdir -p /run/sshd
/usr/sbin/sshd -D -e -f "$W/sshd_config" 2> "$W/sshd.log" &
SSHD=$!
trap 'kill $SSHD 2>/dev/null || true; wait $SSHD 2>/dev/null || true; rm -rf "$W"' EXIT
for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.9/"$PORT") 2>/dev/null && break; sleep 0.1; done
echo "$SIZE bytes through one SSH session, $RUNS runs per cipher (CPU seconds)"
for run in $(seq "$RUNS"); do
  for c in $CIPHERS; do
    # The remote command prints its parent's (the sshd session's) CPU ticks once the
    # stream has ended.
    server=$(head -c "$SIZE" /dev/zero | /usr/bin/time -o "$W/time" -f '%U %S %e' \
      ssh -i "$W/client" -p "$PORT" -c "$c" -o StrictHostKeyChecking=no \
        -o UserKnownHostsFile=/dev/null -o LogLevel=error -F /dev/null 127.0.0.9 \
        'cat > /dev/null; cat /proc/$PPID/stat' | awk -v hz="$(getconf CLK_TCK)" '{ printf "%.2f %.2f", $14/hz, $15/hz }')
    read -r cu cs wall < "$W/time"
    read -r su ss <<< "$server"
    printf '%-32s ssh user %5s sys %5s | sshd user %5s sys %5s | wall %5s s\n' "$c" "$cu" "$cs" "$su" "$ss" "$wall"
  done
done
