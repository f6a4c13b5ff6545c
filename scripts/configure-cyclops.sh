#!/usr/bin/env bash
# Repoint the Cyclops micro-services of RCBaaS to a new InfluxDB.
#
#   configure-cyclops.sh TARGET_URL [CYCLOPS_DIR]
#
# Rewrites `InfluxDBURL=` in udr/ and rc/ configuration.txt and every `url:` line of
# udr/config.js under CYCLOPS_DIR (default: $CYCLOPS_DIR or /opt/cyclops), atomically
# (temp file + rename, permissions kept), then restarts the services if a restart
# command is given in $CYCLOPS_RESTART. Idempotent. Exit 2 on bad arguments, 1 on a
# missing file.
set -euo pipefail

usage() { echo "usage: $0 TARGET_URL [CYCLOPS_DIR]" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || usage
url=$1
dir=${2:-${CYCLOPS_DIR:-/opt/cyclops}}
case "$url" in
  http://?*|https://?*) ;;
  *) echo "$0: TARGET_URL must be an http(s) URL, got '$url'" >&2; exit 2 ;;
esac
case "$url" in
  *[[:space:]\'\"\\\|\&\;]*) echo "$0: TARGET_URL contains characters not allowed in a URL: '$url'" >&2; exit 2 ;;
esac

files_txt=("$dir/udr/configuration.txt" "$dir/rc/configuration.txt")
file_js="$dir/udr/config.js"
for f in "${files_txt[@]}" "$file_js"; do
  [ -f "$f" ] || { echo "$0: $f: no such file (is $dir the Cyclops directory?)" >&2; exit 1; }
done

rewrite() { # FILE SED-SCRIPT
  local f=$1 script=$2 tmp
  tmp=$(mktemp "$f.XXXXXX")
  sed -E "$script" "$f" > "$tmp"
  chmod --reference="$f" "$tmp"
  mv -f "$tmp" "$f"
}

for f in "${files_txt[@]}"; do
  grep -q '^[[:space:]]*InfluxDBURL[[:space:]]*=' "$f" || { echo "$0: $f: no InfluxDBURL= line" >&2; exit 1; }
  rewrite "$f" "s|^([[:space:]]*InfluxDBURL[[:space:]]*=[[:space:]]*).*$|\\1$url|"
done
grep -qE '^[[:space:]]*url[[:space:]]*:' "$file_js" || { echo "$0: $file_js: no url: line" >&2; exit 1; }
# Replace scheme://host:port only: keep indentation, quotes, any path and a trailing comma.
rewrite "$file_js" "s#^([[:space:]]*url[[:space:]]*:[[:space:]]*)(['\"])https?://[^/'\"]*#\\1\\2${url%/}#"

if [ -n "${CYCLOPS_RESTART:-}" ]; then
  sh -c "$CYCLOPS_RESTART"
fi
echo "cyclops now writes to $url"
