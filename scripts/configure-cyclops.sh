#!/usr/bin/env bash
# Repoint the Cyclops micro-services of RCBaaS to a new InfluxDB, and restart them.
#
#   configure-cyclops.sh [--restart] TARGET_URL [CYCLOPS_DIR]
#
# Rewrites, under CYCLOPS_DIR (default: $CYCLOPS_DIR or /opt/cyclops), the InfluxDB URL in
# every Cyclops configuration file that names one (the RCBaaS paper's script edits three
# files, one per micro-service; the billing service has its own in later Cyclops):
#   udr/configuration.txt      InfluxDBURL=...   (or InfluxDbUrl==..., older Cyclops)
#   rc/configuration.txt       InfluxDBURL=...
#   billing/configuration.txt  InfluxDbUrl==http://host:port/db/billing_service/series
#   udr/config.js              every url: '...' line (the dashboard's data sources)
# Only scheme://host:port changes: a path after it (/db/NAME/series), quotes, spacing and
# the rest of each file stay. udr and rc are required; billing and config.js are rewritten
# when present. Each file is replaced atomically (temp file + rename, permissions kept).
# Idempotent.
#
# --restart: then restart the services so they use the new URL (a Cyclops service reads
# its configuration once, at start): $CYCLOPS_RESTART if set (a shell command), else
# `systemctl restart` of each installed unit among cyclops-udr, cyclops-rc,
# cyclops-billing, which must all be active afterwards. Without --restart nothing is
# restarted and the writers keep writing to the old InfluxDB.
#
# Exit 2 on bad arguments, 1 on a missing file or line or a failed restart.
set -euo pipefail

usage() { echo "usage: $0 [--restart] TARGET_URL [CYCLOPS_DIR]" >&2; exit 2; }
restart=0
if [ "${1:-}" = --restart ]; then restart=1; shift; fi
[ $# -ge 1 ] && [ $# -le 2 ] || usage
url=${1%/}
dir=${2:-${CYCLOPS_DIR:-/opt/cyclops}}
case "$url" in
  http://?*|https://?*) ;;
  *) echo "$0: TARGET_URL must be an http(s) URL, got '$1'" >&2; exit 2 ;;
esac
case "$url" in
  *[[:space:]\'\"\\\|\&\;\#]*) echo "$0: TARGET_URL contains characters not allowed in a URL: '$1'" >&2; exit 2 ;;
esac

required=("$dir/udr/configuration.txt" "$dir/rc/configuration.txt")
optional=("$dir/billing/configuration.txt")
file_js="$dir/udr/config.js"
for f in "${required[@]}"; do
  [ -f "$f" ] || { echo "$0: $f: no such file (is $dir the Cyclops directory?)" >&2; exit 1; }
done
txt=("${required[@]}")
for f in "${optional[@]}"; do [ -f "$f" ] && txt+=("$f"); done

rewrite() { # FILE SED-SCRIPT
  local f=$1 script=$2 tmp
  tmp=$(mktemp "$f.XXXXXX")
  sed -E "$script" "$f" > "$tmp"
  chmod --reference="$f" "$tmp"
  chown --reference="$f" "$tmp" 2>/dev/null || true
  mv -f "$tmp" "$f"
}

# The key, any case (InfluxDBURL, InfluxDbUrl), then = or ==.
key='^([[:space:]]*[Ii][Nn][Ff][Ll][Uu][Xx][Dd][Bb][Uu][Rr][Ll][[:space:]]*==?[[:space:]]*)'
for f in "${txt[@]}"; do
  grep -Eq "${key}https?://" "$f" || { echo "$0: $f: no InfluxDBURL= (or InfluxDbUrl==) line with a URL" >&2; exit 1; }
  rewrite "$f" "s#${key}https?://[^/[:space:]]*#\\1${url}#"
  echo "repointed $f"
done
if [ -f "$file_js" ]; then
  grep -qE '^[[:space:]]*url[[:space:]]*:' "$file_js" || { echo "$0: $file_js: no url: line" >&2; exit 1; }
  # scheme://host:port only: keep indentation, quotes, any path and a trailing comma.
  rewrite "$file_js" "s#^([[:space:]]*url[[:space:]]*:[[:space:]]*)(['\"])https?://[^/'\"]*#\\1\\2${url}#"
  echo "repointed $file_js"
fi

if [ "$restart" = 1 ]; then
  if [ -n "${CYCLOPS_RESTART:-}" ]; then
    sh -c "$CYCLOPS_RESTART" || { echo "$0: restart command failed: $CYCLOPS_RESTART" >&2; exit 1; }
  else
    units=()
    for u in cyclops-udr cyclops-rc cyclops-billing; do
      systemctl cat "$u.service" >/dev/null 2>&1 && units+=("$u")
    done
    [ ${#units[@]} -gt 0 ] || { echo "$0: --restart: no cyclops-udr, cyclops-rc or cyclops-billing unit is installed" >&2; exit 1; }
    systemctl restart "${units[@]}" || { echo "$0: systemctl restart ${units[*]} failed" >&2; exit 1; }
    for u in "${units[@]}"; do
      systemctl is-active --quiet "$u" || { echo "$0: $u is not active after the restart" >&2; exit 1; }
    done
    echo "restarted ${units[*]}"
  fi
fi
echo "cyclops now writes to $url"
