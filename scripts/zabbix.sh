#!/usr/bin/env bash
# A real Zabbix 6.0 for stateshift's integration tests, on loopback only, without systemd.
#
#   scripts/zabbix.sh up       install (Debian bookworm packages) and start everything; idempotent
#   scripts/zabbix.sh down     stop everything this script started (state is kept; `clean` wipes it)
#   scripts/zabbix.sh clean    down + delete the state directory
#   scripts/zabbix.sh status   one line per part; exit 0 only when all run
#   scripts/zabbix.sh agent-stop|agent-start|api-stop|api-start   (used by the tests)
#
# What `up` runs (as root; the daemons drop to the users postgres and zabbix):
#   PostgreSQL 15, a private cluster   127.0.0.1:$PGPORT  (data in $DIR/pgdata; not the system cluster)
#   zabbix_server                      127.0.0.1:$SERVER_PORT
#   zabbix_agentd (passive checks)     127.0.0.1:$AGENT_PORT
#   the frontend's JSON-RPC API        http://127.0.0.1:$API_PORT/api_jsonrpc.php  (php -S)
# and, through the API: a host "$ZBX_HOST" on that agent with the item
# system.cpu.load[percpu,avg1] polled every 1 s, an API user for the tests (random password)
# and a second user that only the wrong-password test logs in as (five bad logins lock an
# account for 30 s; that must never be the tests' main user).
#
# State lives in $STATESHIFT_ZABBIX_DIR (default /tmp/stateshift-zabbix); `up` writes
# $DIR/env (KEY='value' lines: ZBX_API_URL, ZBX_USER, ZBX_PASSWORD, ZBX_HOST, ...).
# Ports can be moved with STATESHIFT_ZABBIX_{PG,SERVER,AGENT,API}_PORT.
set -euo pipefail

DIR=${STATESHIFT_ZABBIX_DIR:-/tmp/stateshift-zabbix}
PGPORT=${STATESHIFT_ZABBIX_PG_PORT:-25432}
SERVER_PORT=${STATESHIFT_ZABBIX_SERVER_PORT:-25051}
AGENT_PORT=${STATESHIFT_ZABBIX_AGENT_PORT:-25050}
API_PORT=${STATESHIFT_ZABBIX_API_PORT:-25080}
ZBX_HOST=stateshift-load
LAB_LOAD_DELAY=${STATESHIFT_ZABBIX_LAB_LOAD_DELAY:-2s}
HERE=$(cd "$(dirname "$0")" && pwd)
ITEM_KEY='system.cpu.load[percpu,avg1]'
API_USER=stateshift
LOCKOUT_USER=stateshift-lockout
PGBIN=/usr/lib/postgresql/15/bin
WEBROOT=/usr/share/zabbix
FRONT_CONF=/etc/zabbix/zabbix.conf.php   # Debian patches the frontend to read this absolute path
API="http://127.0.0.1:${API_PORT}/api_jsonrpc.php"
PKGS=(zabbix-server-pgsql zabbix-frontend-php zabbix-agent
      php8.2-cgi php-cli php-pgsql php-gd php-bcmath php-mbstring php-xml php-ldap
      postgresql-15 curl jq iproute2)

T0=$(date +%s.%N)
log() { printf '[zabbix.sh %5.1fs] %s\n' "$(awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN{print a-b}')" "$*"; }
die() { echo "zabbix.sh: ERROR: $*" >&2; exit 1; }

# pid_alive PIDFILE [COMM-PATTERN]: the recorded process runs (and is what we started,
# not a reused pid)
pid_alive() {
  [ -s "$1" ] || return 1
  local pid; pid=$(head -1 "$1")
  kill -0 "$pid" 2>/dev/null || return 1
  [ -z "${2:-}" ] && return 0
  # shellcheck disable=SC2254
  case "$(cat /proc/"$pid"/comm 2>/dev/null)" in $2) return 0 ;; *) return 1 ;; esac
}
port_busy() { [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]; }
pg() { runuser -u postgres -- "$@"; }

# stop_pid NAME PIDFILE COMM [group]: SIGTERM the recorded pid (or its process group, for
# php -S and its workers), wait up to 15 s, then SIGKILL; leaves a pid alone whose command
# is not COMM (pid reused by something else).
stop_pid() {
  local name=$1 f=$2 comm=$3 group=${4:-} pid target
  [ -s "$f" ] || return 0
  pid=$(head -1 "$f")
  if ! kill -0 "$pid" 2>/dev/null; then rm -f "$f"; return 0; fi
  # shellcheck disable=SC2254
  case "$(cat /proc/"$pid"/comm 2>/dev/null)" in $comm) ;; *)
    log "$name: pid $pid is '$(cat /proc/"$pid"/comm 2>/dev/null)', not $comm: left alone"; rm -f "$f"; return 0 ;;
  esac
  target=$pid; [ -n "$group" ] && target=-$pid
  kill -TERM -- "$target" 2>/dev/null || true
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL -- "$target" 2>/dev/null || true; sleep 0.2; fi
  rm -f "$f"; log "$name stopped (pid $pid)"
}

# ------------------------------------------------------------------ packages
install_packages() {
  local missing=() p st
  for p in "${PKGS[@]}"; do
    st=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$st" = "install ok installed" ] || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && { log "packages already installed"; return 0; }
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Debian's maintainer scripts would start postgresql and the zabbix daemons on every
  # interface: deny every service start while we install, and remove the policy only if
  # it is ours.
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; made_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get -o DPkg::Lock::Timeout=300 update -q >"$DIR/log/apt.log" 2>&1 || { tail -5 "$DIR/log/apt.log"; die "apt-get update failed (log: $DIR/log/apt.log)"; }
  # php8.2-cgi as the SAPI and 'libapache2-mod-php8.2-' keep apache2 out.
  local ok=0
  for try in 1 2 3; do
    if apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends \
         "${missing[@]}" libapache2-mod-php8.2- >>"$DIR/log/apt.log" 2>&1; then ok=1; break; fi
    log "apt-get install failed (try $try), retrying in 5 s"; sleep 5
  done
  if [ "$made_policy" = 1 ]; then rm -f "$policy"; trap - EXIT; fi
  [ "$ok" = 1 ] || { tail -5 "$DIR/log/apt.log"; die "apt-get install failed (log: $DIR/log/apt.log)"; }
  log "packages installed ($(grep -E '^(Need to get|Fetched)' "$DIR/log/apt.log" | tail -1))"
}

# ------------------------------------------------------------------ PostgreSQL
PGDATA="$DIR/pgdata"
psql_su() { pg psql -X -q -h "$DIR/run" -p "$PGPORT" -U postgres -v ON_ERROR_STOP=1 "$@"; }

start_postgres() {
  if [ ! -s "$PGDATA/PG_VERSION" ]; then
    rm -rf "$PGDATA"; mkdir -p "$PGDATA"; chown postgres:postgres "$PGDATA"; chmod 700 "$PGDATA"
    pg "$PGBIN/initdb" -D "$PGDATA" -U postgres --auth-local=peer --auth-host=scram-sha-256 \
       -E UTF8 --locale=C.UTF-8 >"$DIR/log/initdb.log" 2>&1 || { cat "$DIR/log/initdb.log"; die initdb; }
    cat >>"$PGDATA/postgresql.conf" <<EOF
# --- stateshift zabbix.sh: throwaway test cluster, loopback only, durability off for speed
listen_addresses = '127.0.0.1'
port = $PGPORT
unix_socket_directories = '$DIR/run'
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 64MB
max_connections = 80
EOF
    log "initdb done"
  fi
  if pg "$PGBIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then return 0; fi
  port_busy "$PGPORT" && die "port $PGPORT is busy but our PostgreSQL is not running (set STATESHIFT_ZABBIX_PG_PORT)"
  pg "$PGBIN/pg_ctl" -D "$PGDATA" -l "$DIR/log/postgresql.log" -w -t 60 start >/dev/null \
    || { tail -5 "$DIR/log/postgresql.log"; die "postgresql did not start"; }
  log "postgresql started on 127.0.0.1:$PGPORT"
}

init_database() {
  if [ "$(psql_su -tAc "select 1 from pg_roles where rolname='zabbix'")" != 1 ]; then
    psql_su -c "create role zabbix login password 'zabbix'"
  fi
  if [ "$(psql_su -tAc "select 1 from pg_database where datname='zabbix'")" != 1 ]; then
    psql_su -c "create database zabbix owner zabbix encoding 'UTF8' template template0"
  fi
  local n
  n=$(psql_su -d zabbix -tAc "select count(*) from users" 2>/dev/null || true)
  [[ "$n" =~ ^[1-9] ]] && return 0   # data.sql is one transaction: users > 0 <=> import finished
  log "importing the Zabbix 6.0 schema and data"
  psql_su -d zabbix -c 'drop owned by zabbix' >/dev/null
  local d=/usr/share/zabbix-server-pgsql
  # as superuser with FK triggers off (faster), objects owned by zabbix through SET ROLE
  { echo 'set session_replication_role = replica; set role zabbix;'
    zcat "$d/schema.sql.gz" "$d/images.sql.gz" "$d/data.sql.gz"; } \
    | psql_su -d zabbix >"$DIR/log/schema.log" 2>&1 || { tail "$DIR/log/schema.log"; die "schema import failed"; }
  log "schema imported"
}

# ------------------------------------------------------------------ zabbix_server
SRV_PID="$DIR/run/zabbix_server.pid"
write_server_conf() {
  cat >"$DIR/etc/zabbix_server.conf" <<EOF
ListenIP=127.0.0.1
ListenPort=$SERVER_PORT
SourceIP=127.0.0.1
LogType=file
LogFile=$DIR/log/zabbix_server.log
LogFileSize=0
PidFile=$SRV_PID
SocketDir=$DIR/run
DBHost=127.0.0.1
DBPort=$PGPORT
DBName=zabbix
DBUser=zabbix
DBPassword=zabbix
User=zabbix
# re-read the configuration every 2 s (default 60) so API-made items are polled at once
CacheUpdateFrequency=2
# few processes: a 2-core test machine
StartPollers=2
StartPollersUnreachable=1
StartPreprocessors=1
StartHistoryPollers=1
StartDBSyncers=1
StartTrappers=2
StartPingers=0
StartDiscoverers=0
StartHTTPPollers=0
StartAlerters=1
StartLLDProcessors=1
StartODBCPollers=0
StartProxyPollers=0
StartReportWriters=0
CacheSize=16M
HistoryCacheSize=8M
HistoryIndexCacheSize=2M
TrendCacheSize=2M
ValueCacheSize=8M
Timeout=3
# an agent the tests stopped is polled again 1 s after it failed, so values resume quickly
UnreachablePeriod=45
UnreachableDelay=1
UnavailableDelay=5
StatsAllowedIP=127.0.0.1
EOF
}
start_server() {
  pid_alive "$SRV_PID" "zabbix_server" && return 0
  port_busy "$SERVER_PORT" && die "port $SERVER_PORT is busy but our zabbix_server is not running (set STATESHIFT_ZABBIX_SERVER_PORT)"
  write_server_conf
  /usr/sbin/zabbix_server -c "$DIR/etc/zabbix_server.conf"
  for _ in $(seq 1 80); do pid_alive "$SRV_PID" "zabbix_server" && port_busy "$SERVER_PORT" && break; sleep 0.25; done
  pid_alive "$SRV_PID" "zabbix_server" || { tail -20 "$DIR/log/zabbix_server.log"; die "zabbix_server did not start"; }
  log "zabbix_server started (pid $(head -1 "$SRV_PID"), 127.0.0.1:$SERVER_PORT)"
}

# ------------------------------------------------------------------ zabbix_agentd
AG_PID="$DIR/run/zabbix_agentd.pid"
start_agent() {
  pid_alive "$AG_PID" "zabbix_agentd" && return 0
  port_busy "$AGENT_PORT" && die "port $AGENT_PORT is busy but our zabbix_agentd is not running (set STATESHIFT_ZABBIX_AGENT_PORT)"
  cat >"$DIR/etc/zabbix_agentd.conf" <<EOF
PidFile=$AG_PID
LogType=file
LogFile=$DIR/log/zabbix_agentd.log
LogFileSize=0
ListenIP=127.0.0.1
ListenPort=$AGENT_PORT
SourceIP=127.0.0.1
# passive checks only (no ServerActive)
Server=127.0.0.1
Hostname=$ZBX_HOST
StartAgents=2
Timeout=3
User=zabbix
EOF
  /usr/sbin/zabbix_agentd -c "$DIR/etc/zabbix_agentd.conf"
  for _ in $(seq 1 40); do pid_alive "$AG_PID" "zabbix_agentd" && port_busy "$AGENT_PORT" && break; sleep 0.25; done
  pid_alive "$AG_PID" "zabbix_agentd" && port_busy "$AGENT_PORT" || { tail -20 "$DIR/log/zabbix_agentd.log"; die "zabbix_agentd did not start"; }
  log "zabbix_agentd started (pid $(head -1 "$AG_PID"), 127.0.0.1:$AGENT_PORT)"
}
stop_agent() { stop_pid zabbix_agentd "$AG_PID" zabbix_agentd; }

# ------------------------------------------------------------------ API (php -S)
WEB_PID="$DIR/run/php-api.pid"
write_frontend_conf() {
  cat >"$DIR/etc/zabbix.conf.php" <<EOF
<?php
// Written by stateshift scripts/zabbix.sh (skips the setup wizard).
\$DB['TYPE']            = 'POSTGRESQL';
\$DB['SERVER']          = '127.0.0.1';
\$DB['PORT']            = '$PGPORT';
\$DB['DATABASE']        = 'zabbix';
\$DB['USER']            = 'zabbix';
\$DB['PASSWORD']        = 'zabbix';
\$DB['SCHEMA']          = '';
\$DB['ENCRYPTION']      = false;
\$DB['KEY_FILE']        = '';
\$DB['CERT_FILE']       = '';
\$DB['CA_FILE']         = '';
\$DB['VERIFY_HOST']     = false;
\$DB['CIPHER_LIST']     = '';
\$DB['VAULT_URL']       = '';
\$DB['VAULT_DB_PATH']   = '';
\$DB['VAULT_TOKEN']     = '';
\$DB['DOUBLE_IEEE754']  = true;
\$ZBX_SERVER            = '127.0.0.1';
\$ZBX_SERVER_PORT       = '$SERVER_PORT';
\$ZBX_SERVER_NAME       = 'stateshift-test';
\$IMAGE_FORMAT_DEFAULT  = IMAGE_FORMAT_PNG;
EOF
  chmod 644 "$DIR/etc/zabbix.conf.php"
  if [ -e "$FRONT_CONF" ] || [ -L "$FRONT_CONF" ]; then
    [ "$(readlink "$FRONT_CONF" || true)" = "$DIR/etc/zabbix.conf.php" ] && return 0
    # a link left by an earlier run of this script (elsewhere, or to a deleted dir) is ours to replace
    if [ -L "$FRONT_CONF" ] && { [ ! -e "$FRONT_CONF" ] || grep -q 'stateshift scripts/zabbix.sh' "$FRONT_CONF"; }; then
      rm -f "$FRONT_CONF"
    else
      die "$FRONT_CONF exists and is not ours (expected a symlink to $DIR/etc/zabbix.conf.php); refusing to overwrite"
    fi
  fi
  mkdir -p "$(dirname "$FRONT_CONF")"
  ln -s "$DIR/etc/zabbix.conf.php" "$FRONT_CONF"
}
rpc() {  # rpc METHOD PARAMS_JSON [AUTH] -> the whole JSON-RPC response
  local body
  body=$(jq -cn --arg m "$1" --argjson p "$2" --arg a "${3:-}" \
        '{jsonrpc:"2.0",method:$m,params:$p,id:1} + (if $a=="" then {} else {auth:$a} end)')
  curl -sS -m 30 -H 'Content-Type: application/json-rpc' -d "$body" "$API"
}
rpc_ok() {  # like rpc, but dies on an error and prints .result
  local r; r=$(rpc "$@") || die "$1: no answer from $API"
  if ! echo "$r" | jq -e 'has("result")' >/dev/null 2>&1; then die "$1: $r"; fi
  echo "$r" | jq -c .result
}
wait_api() {
  local v=""
  for _ in $(seq 1 120); do
    v=$(rpc apiinfo.version '[]' 2>/dev/null | jq -r '.result // empty' 2>/dev/null || true)
    [ -n "$v" ] && break; sleep 0.25
  done
  [ -n "$v" ] || { tail "$DIR/log/php-api.log"; die "API not answering at $API"; }
  echo "$v"
}
start_api() {
  write_frontend_conf
  if ! pid_alive "$WEB_PID" "php*"; then
    port_busy "$API_PORT" && die "port $API_PORT is busy but our php -S is not running (set STATESHIFT_ZABBIX_API_PORT)"
    # Own session (setsid: pid = process group, so stop kills the workers too), as user
    # zabbix, 4 workers so parallel tests are not served one at a time.
    PHP_CLI_SERVER_WORKERS=4 setsid setpriv --reuid=zabbix --regid=zabbix --init-groups \
        php -S "127.0.0.1:$API_PORT" -t "$WEBROOT" \
        -d memory_limit=256M -d opcache.enable_cli=1 -d post_max_size=16M -d max_execution_time=300 \
        -d date.timezone=UTC >"$DIR/log/php-api.log" 2>&1 </dev/null &
    echo $! >"$WEB_PID"
  fi
  local v; v=$(wait_api)
  log "API up at $API (pid $(head -1 "$WEB_PID"), apiinfo.version $v)"
}
stop_api() { stop_pid "php -S" "$WEB_PID" "php*" group; }

# ------------------------------------------------------------------ host, item, users
secret() { head -c 18 /dev/urandom | base64 | tr -d '/+=' ; }

ensure_user() {  # ensure_user NAME PASSWORD TOKEN: a Super admin in "Zabbix administrators"
  local name=$1 pw=$2 tok=$3 uid
  uid=$(rpc_ok user.get "$(jq -cn --arg u "$name" '{output:["userid"],filter:{username:[$u]}}')" "$tok" | jq -r '.[0].userid // empty')
  if [ -z "$uid" ]; then
    local gid
    gid=$(rpc_ok usergroup.get '{"output":["usrgrpid"],"filter":{"name":["Zabbix administrators"]}}' "$tok" | jq -r '.[0].usrgrpid')
    rpc_ok user.create "$(jq -cn --arg u "$name" --arg p "$pw" --arg g "$gid" \
        '{username:$u,passwd:$p,roleid:"3",usrgrps:[{usrgrpid:$g}]}')" "$tok" >/dev/null
    log "user $name created"
  fi
}

# What an operator does once for stateshift's VMs (deploy/zabbix/): import the template and
# make the auto-registration action that adds every agent whose HostMetadata contains
# stateshift-influxdb, in group "stateshift", linked to the template. The tests sample the
# load every $LAB_LOAD_DELAY (the template's macro, 30s by default). Returns 0 when it
# created something.
autoregistration() {
  local tok=$1 tid gid aid made=1
  local src; src=$(cat "$HERE/../deploy/zabbix/stateshift-influxdb-vm.yaml")
  tid=$(rpc_ok template.get '{"output":["templateid"],"filter":{"host":["stateshift InfluxDB VM"]}}' "$tok" | jq -r '.[0].templateid // empty')
  if [ -z "$tid" ]; then
    rpc_ok configuration.import "$(jq -cn --arg s "$src" '{format:"yaml",source:$s,rules:{
        groups:{createMissing:true},
        templates:{createMissing:true,updateExisting:true},
        items:{createMissing:true,updateExisting:true},
        triggers:{createMissing:true,updateExisting:true}}}')" "$tok" >/dev/null
    tid=$(rpc_ok template.get '{"output":["templateid"],"filter":{"host":["stateshift InfluxDB VM"]}}' "$tok" | jq -r '.[0].templateid')
    log "template 'stateshift InfluxDB VM' imported (templateid $tid)"
    made=0
  fi
  local mid; mid=$(rpc_ok usermacro.get "$(jq -cn --arg t "$tid" '{output:["hostmacroid","value"],hostids:[$t],filter:{macro:"{$STATESHIFT.LOAD.DELAY}"}}')" "$tok")
  if [ "$(echo "$mid" | jq -r '.[0].value')" != "$LAB_LOAD_DELAY" ]; then
    rpc_ok usermacro.update "$(echo "$mid" | jq -c --arg v "$LAB_LOAD_DELAY" '{hostmacroid:.[0].hostmacroid,value:$v}')" "$tok" >/dev/null
    made=0
  fi
  gid=$(rpc_ok hostgroup.get '{"output":["groupid"],"filter":{"name":["stateshift"]}}' "$tok" | jq -r '.[0].groupid // empty')
  [ -n "$gid" ] || gid=$(rpc_ok hostgroup.create '{"name":"stateshift"}' "$tok" | jq -r '.groupids[0]')
  aid=$(rpc_ok action.get '{"output":["actionid"],"filter":{"name":["stateshift: register InfluxDB VMs"]}}' "$tok" | jq -r '.[0].actionid // empty')
  if [ -z "$aid" ]; then
    rpc_ok action.create "$(jq -cn --arg g "$gid" --arg t "$tid" '{name:"stateshift: register InfluxDB VMs",
        eventsource:2, status:0,
        filter:{evaltype:0, conditions:[{conditiontype:24, operator:2, value:"stateshift-influxdb"}]},
        operations:[{operationtype:2}, {operationtype:4, opgroup:[{groupid:$g}]},
                    {operationtype:6, optemplate:[{templateid:$t}]}]}')" "$tok" >/dev/null
    log "auto-registration action created (HostMetadata contains stateshift-influxdb)"
    made=0
  fi
  return $made
}

configure() {
  local tok; tok=$(rpc_ok user.login '{"username":"Admin","password":"zabbix"}' | jq -r .)
  # The stock host "Zabbix server" polls an agent on 127.0.0.1:10050 (~100 items of noise).
  local zs; zs=$(rpc_ok host.get '{"output":["hostid","status"],"filter":{"host":["Zabbix server"]}}' "$tok")
  if [ "$(echo "$zs" | jq -r '.[0].status // "1"')" = 0 ]; then
    rpc_ok host.update "$(echo "$zs" | jq -c '{hostid:.[0].hostid,status:1}')" "$tok" >/dev/null
    log "disabled the stock host 'Zabbix server'"
  fi
  local hostid ifid itemid created=0
  hostid=$(rpc_ok host.get "$(jq -cn --arg h "$ZBX_HOST" '{output:["hostid"],filter:{host:[$h]}}')" "$tok" | jq -r '.[0].hostid // empty')
  if [ -z "$hostid" ]; then
    local gid
    gid=$(rpc_ok hostgroup.get '{"output":["groupid"],"filter":{"name":["Linux servers"]}}' "$tok" | jq -r '.[0].groupid')
    hostid=$(rpc_ok host.create "$(jq -cn --arg h "$ZBX_HOST" --arg g "$gid" --arg p "$AGENT_PORT" \
       '{host:$h,groups:[{groupid:$g}],interfaces:[{type:1,main:1,useip:1,ip:"127.0.0.1",dns:"",port:$p}]}')" "$tok" \
       | jq -r '.hostids[0]')
    log "host $ZBX_HOST created (hostid $hostid)"
  fi
  ifid=$(rpc_ok hostinterface.get "$(jq -cn --arg h "$hostid" '{output:["interfaceid"],hostids:[$h],filter:{type:1,main:1}}')" "$tok" | jq -r '.[0].interfaceid')
  itemid=$(rpc_ok item.get "$(jq -cn --arg h "$hostid" --arg k "$ITEM_KEY" '{output:["itemid"],hostids:[$h],filter:{key_:[$k]}}')" "$tok" | jq -r '.[0].itemid // empty')
  if [ -z "$itemid" ]; then
    itemid=$(rpc_ok item.create "$(jq -cn --arg h "$hostid" --arg i "$ifid" --arg k "$ITEM_KEY" \
       '{name:"CPU load per CPU, avg1",key_:$k,hostid:$h,interfaceid:$i,type:0,value_type:0,delay:"1s",history:"1d",trends:"0"}')" "$tok" \
       | jq -r '.itemids[0]')
    created=1
    log "item $ITEM_KEY created (itemid $itemid, every 1 s)"
  fi
  [ -s "$DIR/state/api-password" ] || secret >"$DIR/state/api-password"
  [ -s "$DIR/state/lockout-password" ] || secret >"$DIR/state/lockout-password"
  chmod 600 "$DIR/state/api-password" "$DIR/state/lockout-password"
  ensure_user "$API_USER" "$(cat "$DIR/state/api-password")" "$tok"
  ensure_user "$LOCKOUT_USER" "$(cat "$DIR/state/lockout-password")" "$tok"
  autoregistration "$tok" && created=1
  # the server picks the new item up now instead of at the next configuration sync
  [ "$created" = 1 ] && { /usr/sbin/zabbix_server -c "$DIR/etc/zabbix_server.conf" -R config_cache_reload >/dev/null 2>&1 || true; }

  local tmp="$DIR/env.tmp"
  ( umask 077
    cat >"$tmp" <<EOF
# written by scripts/zabbix.sh up; KEY='value' lines, shell-sourceable
ZBX_API_URL='$API'
ZBX_USER='$API_USER'
ZBX_PASSWORD='$(cat "$DIR/state/api-password")'
ZBX_LOCKOUT_USER='$LOCKOUT_USER'
ZBX_HOST='$ZBX_HOST'
ZBX_HOSTID='$hostid'
ZBX_ITEM_KEY='$ITEM_KEY'
ZBX_ITEMID='$itemid'
ZBX_ITEM_DELAY='1s'
ZBX_AGENT_PORT='$AGENT_PORT'
ZBX_SERVER_PORT='$SERVER_PORT'
ZBX_PG_PORT='$PGPORT'
ZBX_DIR='$DIR'
EOF
  )
  mv -f "$tmp" "$DIR/env"

  # ready = a value collected after this `up` started
  local since h=""; since=${T0%.*}
  for _ in $(seq 1 120); do
    h=$(rpc_ok history.get "$(jq -cn --arg i "$itemid" --argjson t "$since" \
        '{output:["clock","value"],history:0,itemids:[$i],time_from:$t,sortfield:"clock",sortorder:"DESC",limit:1}')" "$tok")
    [ "$(echo "$h" | jq length)" -gt 0 ] && break; sleep 0.5
  done
  rpc user.logout '[]' "$tok" >/dev/null || true
  [ "$(echo "$h" | jq length)" -gt 0 ] || die "no value for $ITEM_KEY after 60 s (see $DIR/log/zabbix_server.log)"
  log "first value: $(echo "$h" | jq -c '.[0]')"
}

# ------------------------------------------------------------------ commands
need_root() { [ "$(id -u)" = 0 ] || die "run as root (apt-get; the daemons drop to postgres/zabbix)"; }
prepare_dirs() {
  mkdir -p "$DIR"/{etc,log,run,state}
  # postgres and zabbix write logs, pid files and sockets here
  chmod 755 "$DIR" "$DIR/etc"; chmod 1777 "$DIR/log" "$DIR/run"; chmod 700 "$DIR/state"
}

cmd_up() {
  need_root; prepare_dirs
  install_packages
  id zabbix >/dev/null 2>&1 || die "user zabbix missing (zabbix-server-pgsql creates it)"
  start_postgres
  init_database
  start_server
  start_agent
  start_api
  configure
  log "READY: $API host=$ZBX_HOST key=$ITEM_KEY (env: $DIR/env)"
}

cmd_down() {
  stop_api
  stop_agent
  stop_pid zabbix_server "$SRV_PID" zabbix_server
  if [ -s "$PGDATA/postmaster.pid" ] && pg "$PGBIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
    pg "$PGBIN/pg_ctl" -D "$PGDATA" -m fast -w -t 60 stop >/dev/null && log "postgresql stopped"
  fi
  if [ -L "$FRONT_CONF" ] && [ "$(readlink "$FRONT_CONF")" = "$DIR/etc/zabbix.conf.php" ]; then
    rm -f "$FRONT_CONF"
  fi
  rm -f "$DIR/env"
  log "down"
}

cmd_status() {
  local bad=0
  line() { printf '%-15s %s\n' "$1" "$2"; }
  if [ -d "$PGDATA" ] && pg "$PGBIN/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then line postgresql "running (127.0.0.1:$PGPORT)"; else line postgresql stopped; bad=1; fi
  if pid_alive "$SRV_PID" "zabbix_server"; then line zabbix_server "running (pid $(head -1 "$SRV_PID"), 127.0.0.1:$SERVER_PORT)"; else line zabbix_server stopped; bad=1; fi
  if pid_alive "$AG_PID" "zabbix_agentd"; then line zabbix_agentd "running (pid $(head -1 "$AG_PID"), 127.0.0.1:$AGENT_PORT)"; else line zabbix_agentd stopped; bad=1; fi
  if pid_alive "$WEB_PID" "php*"; then line api "running (pid $(head -1 "$WEB_PID"), $API)"; else line api stopped; bad=1; fi
  if [ -s "$DIR/env" ]; then line env "$DIR/env"; else line env missing; bad=1; fi
  return $bad
}

case ${1:-} in
  up) cmd_up ;;
  down) cmd_down ;;
  clean) cmd_down; rm -rf "$DIR"; log "removed $DIR" ;;
  status) cmd_status ;;
  agent-stop) stop_agent ;;
  agent-start) need_root; prepare_dirs; start_agent ;;
  api-stop) stop_api ;;
  api-start) need_root; prepare_dirs; start_api ;;
  *) echo "usage: $0 up|down|clean|status|agent-stop|agent-start|api-stop|api-start" >&2; exit 2 ;;
esac
