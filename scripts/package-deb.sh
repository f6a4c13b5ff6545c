#!/usr/bin/env bash
# Build the Debian package of stateshift from a built binary, with dpkg-deb (no other
# tool needed): the binary, the systemd unit, the example configuration, the Heat
# templates, the scripts the templates and the cutover use, the monitoring kit, manual
# pages and shell completions, each in its FHS place.
#
#   scripts/package-deb.sh [BINARY] [OUTDIR]
#     BINARY  default target/release/stateshift (cargo build --release first)
#     OUTDIR  default target/debian
# Prints the path of the .deb. Install with `apt install ./stateshift_*.deb`; then
# put the configuration in /etc/stateshift/stateshift.yaml (the example is in
# /usr/share/doc/stateshift/examples/) and `systemctl enable --now stateshift`.
set -euo pipefail

HERE=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$HERE/target/release/stateshift}
OUT=${2:-$HERE/target/debian}
[ -x "$BIN" ] || { echo "package-deb: $BIN is not an executable (cargo build --release first)" >&2; exit 2; }

VERSION=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$HERE/Cargo.toml" | head -n 1)
ARCH=$(dpkg --print-architecture)
ROOT=$(mktemp -d)
trap 'rm -rf "$ROOT"' EXIT

install -D -m 0755 "$BIN" "$ROOT/usr/bin/stateshift"
strip --strip-debug "$ROOT/usr/bin/stateshift" 2>/dev/null || true

# The unit of deploy/, with the packaged binary. It waits for a configuration.
install -d "$ROOT/lib/systemd/system"
sed -e 's#/usr/local/bin/stateshift#/usr/bin/stateshift#' \
    -e 's#^\[Unit\]$#[Unit]\nConditionPathExists=/etc/stateshift/stateshift.yaml#' \
    "$HERE/deploy/stateshift.service" > "$ROOT/lib/systemd/system/stateshift.service"

DOC=$ROOT/usr/share/doc/stateshift
install -D -m 0644 "$HERE/config/stateshift.example.yaml" "$DOC/examples/stateshift.yaml"
install -m 0644 "$HERE/README.md" "$HERE/ARCHITECTURE.md" "$HERE/RELIABILITY.md" "$DOC/"
cat > "$DOC/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: stateshift
Files: *
Copyright: the stateshift authors
License: see the project's repository
EOF

SHARE=$ROOT/usr/share/stateshift
install -d "$SHARE/heat-templates" "$SHARE/scripts" "$SHARE/deploy"
cp -r "$HERE/heat-templates/." "$SHARE/heat-templates/"
install -m 0755 "$HERE/scripts/configure-cyclops.sh" "$SHARE/scripts/"
cp -r "$HERE/deploy/prometheus" "$HERE/deploy/grafana" "$HERE/deploy/zabbix" "$SHARE/deploy/"

install -d "$ROOT/usr/share/man/man1"
"$BIN" man --dir "$ROOT/usr/share/man/man1"
gzip -9n "$ROOT"/usr/share/man/man1/*.1

install -d "$ROOT/usr/share/bash-completion/completions" \
  "$ROOT/usr/share/zsh/vendor-completions" "$ROOT/usr/share/fish/vendor_completions.d"
"$BIN" completions bash > "$ROOT/usr/share/bash-completion/completions/stateshift"
"$BIN" completions zsh > "$ROOT/usr/share/zsh/vendor-completions/_stateshift"
"$BIN" completions fish > "$ROOT/usr/share/fish/vendor_completions.d/stateshift.fish"

install -d "$ROOT/DEBIAN"
SIZE=$(du -sk --exclude=DEBIAN "$ROOT" | cut -f1)
cat > "$ROOT/DEBIAN/control" <<EOF
Package: stateshift
Version: $VERSION
Architecture: $ARCH
Maintainer: stateshift developers <stateshift@localhost>
Installed-Size: $SIZE
Depends: libc6, openssh-client, adduser
Recommends: influxdb-client
Section: admin
Priority: optional
Homepage: https://github.com/stateshift/stateshift
Description: move a live InfluxDB service to a fresh instance, losing nothing
 stateshift is a service orchestrator: it watches the load of the InfluxDB VM of a
 service (Zabbix), predicts it (GM(1,1)), and when it will cross a threshold (or on
 request) creates a new stack through OpenStack Heat, moves every point there while
 the service keeps writing, verifies it and deletes the old stack.
EOF

cat > "$ROOT/DEBIAN/postinst" <<'EOF'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
  if ! getent passwd stateshift >/dev/null; then
    adduser --system --group --home /var/lib/stateshift --no-create-home \
      --gecos "stateshift service orchestrator" stateshift >/dev/null
  fi
  install -d -m 0750 -o root -g stateshift /etc/stateshift
  if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null || true; fi
  if [ ! -e /etc/stateshift/stateshift.yaml ]; then
    echo "stateshift: put the configuration in /etc/stateshift/stateshift.yaml (example: /usr/share/doc/stateshift/examples/stateshift.yaml), check it with 'stateshift config check', then 'systemctl enable --now stateshift'"
  fi
fi
EOF
cat > "$ROOT/DEBIAN/prerm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
  systemctl stop stateshift.service >/dev/null 2>&1 || true
fi
EOF
cat > "$ROOT/DEBIAN/postrm" <<'EOF'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null || true; fi
EOF
chmod 0755 "$ROOT/DEBIAN/postinst" "$ROOT/DEBIAN/prerm" "$ROOT/DEBIAN/postrm"

mkdir -p "$OUT"
DEB="$OUT/stateshift_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group --build "$ROOT" "$DEB" >/dev/null
echo "$DEB"
