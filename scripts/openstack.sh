#!/usr/bin/env bash
# A real OpenStack Keystone + Heat (Debian bookworm "Zed" packages) for stateshift's
# integration tests, on loopback only, without systemd, Nova, Neutron, RabbitMQ or MySQL.
#
#   scripts/openstack.sh up       install the packages if needed, configure, start; idempotent
#   scripts/openstack.sh down     stop what this script started (state is kept; `clean` wipes it)
#   scripts/openstack.sh clean    down + delete the state directory
#   scripts/openstack.sh status   one line per part; exit 0 only when both answer
#
# What `up` runs (as root):
#   keystone   uwsgi (single-threaded workers: sqlite), fernet tokens  http://127.0.0.1:$KS_PORT/v3
#   heat-all   heat-api + heat-engine in one process, transport_url = fake://
#                                                                      http://127.0.0.1:$HEAT_PORT/v1/<project>
# both on sqlite (WAL) under the state directory; and, through Keystone's API: a project
# and user "demo" (random password) with the member and heat_stack_owner roles, the
# orchestration service with public/internal/admin endpoints in RegionOne, and an
# application credential of demo's for the app-credential tests.
#
# State lives in $STATESHIFT_OPENSTACK_DIR (default /tmp/stateshift-openstack); `up` writes
# $DIR/env (KEY='value' lines, mode 0600): OS_AUTH_URL, OS_REGION_NAME, OS_INTERFACE,
# OS_USERNAME, OS_PASSWORD, OS_PROJECT_NAME, OS_USER_DOMAIN_NAME, OS_PROJECT_DOMAIN_NAME,
# OS_APPLICATION_CREDENTIAL_ID, OS_APPLICATION_CREDENTIAL_SECRET, OS_PROJECT_ID, HEAT_URL.
# Ports can be moved with STATESHIFT_OPENSTACK_{KS,HEAT}_PORT.
#
# Heat validates every request's token with Keystone (token_cache_time = -1), so a token
# revoked in Keystone is refused at once: the re-authentication tests rely on it.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
DIR=${STATESHIFT_OPENSTACK_DIR:-/tmp/stateshift-openstack}
KS_PORT=${STATESHIFT_OPENSTACK_KS_PORT:-25500}
HEAT_PORT=${STATESHIFT_OPENSTACK_HEAT_PORT:-28004}
KS_PROCS=2
KS_URL=http://127.0.0.1:$KS_PORT
HEAT_BASE=http://127.0.0.1:$HEAT_PORT
REGION=RegionOne
# The VM lab (scripts/vmlab.sh): its network's gateway, where VMs reach Keystone and Heat.
# Keystone's catalog also lists Heat there under region $LAB_REGION, for an orchestrator
# that runs in a lab VM (deploy/so-stack.yaml in the lab).
LAB_GW=192.168.77.1
LAB_REGION=LabNet
LAB_DIR=${STATESHIFT_VMLAB_DIR:-/tmp/stateshift-vmlab}
PY=/usr/bin/python3   # Debian's: the OpenStack libraries live there, not in a pyenv/venv python
PKGS=(keystone heat-api heat-engine uwsgi-core uwsgi-plugin-python3 python3-keystoneclient curl iproute2)

T0=$(date +%s.%N)
log() { printf '[openstack.sh %5.1fs] %s\n' "$(awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN{print a-b}')" "$*"; }
die() { echo "openstack.sh: ERROR: $*" >&2; exit 1; }

# pid_alive PIDFILE COMM-PATTERN: the recorded process runs and is what we started
pid_alive() {
  [ -s "$1" ] || return 1
  local pid; pid=$(head -1 "$1")
  kill -0 "$pid" 2>/dev/null || return 1
  # shellcheck disable=SC2254
  case "$(cat /proc/"$pid"/comm 2>/dev/null)" in $2) return 0 ;; *) return 1 ;; esac
}
http_code() { curl -s -m 3 -o /dev/null -w '%{http_code}' "$1" 2>/dev/null || true; }
wait_http() { # URL CODE-REGEX TIMEOUT-S PIDFILE COMM LOG
  local end=$(( $(date +%s) + $3 ))
  until [[ $(http_code "$1") =~ $2 ]]; do
    pid_alive "$4" "$5" || { tail -20 "$6" >&2 || true; die "$5 died while starting (log: $6)"; }
    [ "$(date +%s)" -lt "$end" ] || { tail -20 "$6" >&2 || true; die "timeout waiting for $1 (log: $6)"; }
    sleep 0.2
  done
}
port_busy() { [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]; }

# stop_pid NAME PIDFILE COMM: SIGTERM the recorded pid (heat-all's API thread ignores it:
# short grace, then SIGKILL); leaves alone a pid whose command is not ours.
stop_pid() {
  local name=$1 pf=$2 comm=$3 pid
  if pid_alive "$pf" "$comm"; then
    pid=$(head -1 "$pf")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 15); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; sleep 0.2; fi
    log "stopped $name (pid $pid)"
  fi
  rm -f "$pf"
}

installed() {
  local st
  st=$(dpkg-query -W -f='${Status}\n' "${PKGS[@]}" 2>/dev/null | grep -c '^install ok installed$' || true)
  [ "$st" -eq ${#PKGS[@]} ]
}

install_pkgs() {
  installed && return 0
  log "installing ${PKGS[*]} (Debian OpenStack Zed; ~150 s from scratch)"
  # Debian's maintainer scripts would start keystone on 0.0.0.0:5000 and heat on :8004:
  # deny every service start while we install; remove the policy only if we made it.
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; made_policy=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  printf '%s\n' \
    'keystone keystone/configure_db boolean false' \
    'keystone keystone/create-admin-tenant boolean false' \
    'keystone keystone/register-endpoint boolean false' \
    'heat-common heat/configure_db boolean false' \
    'heat-api heat/register-endpoint boolean false' | debconf-set-selections
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-cache policy keystone 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    apt-get -o DPkg::Lock::Timeout=600 update -qq >"$DIR/logs/apt-update.log" 2>&1 || true
  fi
  local ok=0
  for _ in 1 2 3 4 5 6; do   # another job may hold the lists lock, which Lock::Timeout does not cover
    if apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends "${PKGS[@]}" \
         >"$DIR/logs/apt.log" 2>&1; then ok=1; break; fi
    grep -qiE 'lock|interrupted' "$DIR/logs/apt.log" || break
    sleep 10
  done
  if [ "$made_policy" = 1 ]; then rm -f "$policy"; trap - EXIT; fi
  [ "$ok" = 1 ] || { tail -20 "$DIR/logs/apt.log" >&2; die "apt-get install failed (log: $DIR/logs/apt.log)"; }
  log "packages installed"
}

# Random passwords, made once and kept (mode 0600) so `up` stays idempotent.
secrets() {
  local f=$DIR/secrets
  if [ ! -s "$f" ]; then
    (umask 077
     gen() { head -c 18 /dev/urandom | base64 | tr -d '/+=' ; }
     { echo "ADMIN_PW=$(gen)"; echo "HEAT_PW=$(gen)"; echo "DOMADMIN_PW=$(gen)"; echo "DEMO_PW=$(gen)"
       echo "AUTH_KEY=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"; } >"$f")
  fi
  # shellcheck disable=SC1090
  . "$f"
}

write_configs() {
  (umask 077
  cat >"$DIR/keystone/keystone.conf" <<EOF
[DEFAULT]
log_dir = $DIR/logs
log_file = keystone.log
[database]
connection = sqlite:///$DIR/keystone/keystone.db
[fernet_tokens]
key_repository = $DIR/keystone/fernet-keys
[fernet_receipts]
key_repository = $DIR/keystone/fernet-keys
[credential]
key_repository = $DIR/keystone/credential-keys
[catalog]
driver = sql
[token]
expiration = 86400
EOF
  cp /etc/heat/api-paste.ini "$DIR/heat/api-paste.ini"
  cat >"$DIR/heat/heat.conf" <<EOF
[DEFAULT]
log_dir = $DIR/logs
log_file = heat.log
use_stderr = false
transport_url = fake://
num_engine_workers = 1
region_name_for_services = $REGION
stack_user_domain_name = heat
stack_domain_admin = heat_domain_admin
stack_domain_admin_password = $DOMADMIN_PW
deferred_auth_method = trusts
auth_encryption_key = $AUTH_KEY
heat_metadata_server_url = http://127.0.0.1:$HEAT_PORT
heat_waitcondition_server_url = http://127.0.0.1:$HEAT_PORT/v1/waitcondition
# The VM lab's Nova/Neutron/Cinder (scripts/vmlab/heat_plugin), and hidden parameters and
# resource properties encrypted at rest, as a production Heat should have them.
plugin_dirs = $DIR/heat/plugins
encrypt_parameters_and_properties = true
[heat_all]
enabled_services = engine,api
[heat_api]
bind_host = 127.0.0.1
bind_port = $HEAT_PORT
workers = 1
[database]
connection = sqlite:///$DIR/heat/heat.db
[paste_deploy]
api_paste_config = $DIR/heat/api-paste.ini
[keystone_authtoken]
www_authenticate_uri = $KS_URL/v3
auth_url = $KS_URL
auth_type = password
username = heat
password = $HEAT_PW
project_name = service
user_domain_name = Default
project_domain_name = Default
region_name = $REGION
token_cache_time = -1
[trustee]
auth_type = password
auth_url = $KS_URL
username = heat
password = $HEAT_PW
user_domain_name = Default
[clients_keystone]
auth_uri = $KS_URL
[ec2authtoken]
auth_uri = $KS_URL/v3
[clients]
endpoint_type = public
[clients_heat]
# The signal URL a WaitConditionHandle hands to a VM: Heat as the lab's VMs reach it
# (the lab network's gateway forwards to this loopback port; scripts/vmlab.sh).
url = http://$LAB_GW:$HEAT_PORT/v1/%(tenant_id)s
[oslo_messaging_notifications]
driver = noop
EOF
  )
}

wal() { $PY -c "import sqlite3,sys; sqlite3.connect(sys.argv[1]).execute('pragma journal_mode=WAL')" "$1"; }

keystone_db() {
  [ -f "$DIR/keystone/.bootstrapped" ] && return 0
  local KM=(keystone-manage --config-file "$DIR/keystone/keystone.conf")
  "${KM[@]}" db_sync 2>>"$DIR/logs/manage.err"
  wal "$DIR/keystone/keystone.db"
  "${KM[@]}" fernet_setup --keystone-user root --keystone-group root 2>>"$DIR/logs/manage.err"
  "${KM[@]}" credential_setup --keystone-user root --keystone-group root 2>>"$DIR/logs/manage.err"
  "${KM[@]}" bootstrap --bootstrap-password "$ADMIN_PW" --bootstrap-region-id "$REGION" \
    --bootstrap-admin-url "$KS_URL/v3" --bootstrap-internal-url "$KS_URL/v3" \
    --bootstrap-public-url "$KS_URL/v3" 2>>"$DIR/logs/manage.err"
  touch "$DIR/keystone/.bootstrapped"
  log "keystone db_sync + fernet + bootstrap done"
}

start_keystone() {
  local pf=$DIR/run/keystone.pid
  if pid_alive "$pf" 'uwsgi*' && [ "$(http_code "$KS_URL/v3")" = 200 ]; then log "keystone already up"; return; fi
  stop_pid keystone "$pf" 'uwsgi*'
  port_busy "$KS_PORT" && die "port 127.0.0.1:$KS_PORT is taken by a process this script did not start"
  # --add-header 'Connection: close': uwsgi's http-socket has no keep-alive; say so, so
  # pooling clients do not reuse a connection uwsgi is about to drop.
  OS_KEYSTONE_CONFIG_FILES=$DIR/keystone/keystone.conf setsid /usr/bin/uwsgi --plugins python3 \
    --http-socket "127.0.0.1:$KS_PORT" --wsgi-file /usr/bin/keystone-wsgi-public \
    --master --processes "$KS_PROCS" --threads 1 --lazy-apps --die-on-term --buffer-size 65535 \
    --add-header 'Connection: close' --pidfile "$pf" \
    --logto "$DIR/logs/keystone-uwsgi.log" </dev/null >/dev/null 2>&1 &
  for _ in $(seq 1 50); do [ -s "$pf" ] && break; sleep 0.1; done
  wait_http "$KS_URL/v3" '^200$' 120 "$pf" 'uwsgi*' "$DIR/logs/keystone-uwsgi.log"
  log "keystone up on $KS_URL/v3 (pid $(cat "$pf"))"
}

# Users, roles, the orchestration endpoints and the application credential, through
# Keystone's API (python-keystoneclient). Idempotent; prints KEY=value lines.
register() {
  cat >"$DIR/ks_setup.py" <<'EOF'
import os, sys
from keystoneauth1.identity import v3
from keystoneauth1 import session
from keystoneauth1 import exceptions as ksa_exc
from keystoneclient.v3 import client
ks_url, heat_url, region, cred_file, lab_heat_url, lab_region = sys.argv[1:]
admin_pw, heat_pw, domadmin_pw, demo_pw = (os.environ[k] for k in ("ADMIN_PW", "HEAT_PW", "DOMADMIN_PW", "DEMO_PW"))
admin = session.Session(auth=v3.Password(auth_url=ks_url + "/v3", username="admin", password=admin_pw,
                        project_name="admin", user_domain_id="default", project_domain_id="default"))
ks = client.Client(session=admin)
default = ks.domains.get("default")
def one(lst, create, **kw):
    found = list(lst)
    return found[0] if found else create(**kw)
def project(name): return one(ks.projects.list(name=name, domain=default), ks.projects.create, name=name, domain=default)
def user(name, pw, dom):
    u = one(ks.users.list(name=name, domain=dom), ks.users.create, name=name, password=pw, domain=dom)
    ks.users.update(u, password=pw)
    return u
roles = {r: one(ks.roles.list(name=r), ks.roles.create, name=r)
         for r in ("admin", "member", "reader", "heat_stack_owner", "heat_stack_user")}
service, demo = project("service"), project("demo")
heat = user("heat", heat_pw, default)
ks.roles.grant(roles["admin"], user=heat, project=service)
demo_u = user("demo", demo_pw, default)
ks.roles.grant(roles["member"], user=demo_u, project=demo)
ks.roles.grant(roles["heat_stack_owner"], user=demo_u, project=demo)
heat_dom = one(ks.domains.list(name="heat"), ks.domains.create, name="heat", description="Heat stack users")
ks.roles.grant(roles["admin"], user=user("heat_domain_admin", domadmin_pw, heat_dom), domain=heat_dom)
svc = one(ks.services.list(type="orchestration"), ks.services.create, name="heat", type="orchestration")
if not [r for r in ks.regions.list() if r.id == lab_region]:
    ks.regions.create(id=lab_region, description="the stateshift VM lab's network")
for reg, url in ((region, heat_url), (lab_region, lab_heat_url)):
    have = {e.interface for e in ks.endpoints.list(service=svc) if e.region == reg}
    for iface in ("public", "internal", "admin"):
        if iface not in have:
            ks.endpoints.create(service=svc, interface=iface, region=reg, url=url + "/v1/%(tenant_id)s")

# The application credential: demo's own (a user creates it with a token of theirs).
demo_sess = session.Session(auth=v3.Password(auth_url=ks_url + "/v3", username="demo", password=demo_pw,
                            project_name="demo", user_domain_id="default", project_domain_id="default"))
dks = client.Client(session=demo_sess)
cred = {}
try:
    for line in open(cred_file):
        k, _, v = line.strip().partition("=")
        cred[k] = v
except FileNotFoundError:
    pass
def works(c):
    if not c.get("id"):
        return False
    try:
        s = session.Session(auth=v3.ApplicationCredential(auth_url=ks_url + "/v3",
            application_credential_id=c["id"], application_credential_secret=c["secret"]))
        s.get_token()
        return True
    except ksa_exc.Unauthorized:
        return False
if not works(cred):
    for old in dks.application_credentials.list(user=demo_u.id, name="stateshift-tests"):
        dks.application_credentials.delete(old)
    ac = dks.application_credentials.create(name="stateshift-tests", user=demo_u.id,
                                            description="stateshift integration tests")
    cred = {"id": ac.id, "secret": ac.secret}
    fd = os.open(cred_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("id=%s\nsecret=%s\n" % (cred["id"], cred["secret"]))
print("OS_PROJECT_ID=%s" % demo.id)
print("OS_APPLICATION_CREDENTIAL_ID=%s" % cred["id"])
EOF
  # passwords through the environment, not argv (which `ps` shows)
  ADMIN_PW=$ADMIN_PW HEAT_PW=$HEAT_PW DOMADMIN_PW=$DOMADMIN_PW DEMO_PW=$DEMO_PW \
    $PY "$DIR/ks_setup.py" "$KS_URL" "$HEAT_BASE" "$REGION" "$DIR/appcred" \
      "http://$LAB_GW:$HEAT_PORT" "$LAB_REGION" \
      >"$DIR/register.out" 2>>"$DIR/logs/register.err" \
    || { tail -20 "$DIR/logs/register.err" >&2; die "registration through Keystone's API failed"; }
}

heat_db() {
  [ -f "$DIR/heat/.synced" ] && return 0
  heat-manage --config-file "$DIR/heat/heat.conf" db_sync >"$DIR/logs/heat-manage.log" 2>&1
  wal "$DIR/heat/heat.db"
  touch "$DIR/heat/.synced"
  log "heat db_sync done"
}

# The lab's resource plugin; returns 0 when it changed (heat-all must then restart).
install_plugin() {
  local src=$HERE/vmlab/heat_plugin/stateshift_lab.py dst=$DIR/heat/plugins/stateshift_lab.py
  mkdir -p "$DIR/heat/plugins"
  cmp -s "$src" "$dst" && return 1
  install -m 0644 "$src" "$dst"
  return 0
}

start_heat() {
  local pf=$DIR/run/heat.pid changed=0
  install_plugin && changed=1
  if [ "$changed" = 0 ] && pid_alive "$pf" 'heat-all*' && [ "$(http_code "$HEAT_BASE/")" = 300 ] \
     && cmp -s "$DIR/heat/heat.conf" "$DIR/run/heat.conf.running"; then log "heat already up"; return; fi
  stop_pid heat "$pf" 'heat-all*'
  port_busy "$HEAT_PORT" && die "port 127.0.0.1:$HEAT_PORT is taken by a process this script did not start"
  STATESHIFT_VMLAB_DIR=$LAB_DIR setsid /usr/bin/heat-all --config-file "$DIR/heat/heat.conf" \
    </dev/null >"$DIR/logs/heat-all.out" 2>&1 &
  echo $! >"$pf"
  cp "$DIR/heat/heat.conf" "$DIR/run/heat.conf.running"
  wait_http "$HEAT_BASE/" '^300$' 120 "$pf" 'heat-all*' "$DIR/logs/heat.log"
  log "heat-all up on $HEAT_BASE (pid $(cat "$pf"))"
}

write_env() {
  local project_id appcred_id appcred_secret
  project_id=$(sed -n 's/^OS_PROJECT_ID=//p' "$DIR/register.out")
  appcred_id=$(sed -n 's/^id=//p' "$DIR/appcred")
  appcred_secret=$(sed -n 's/^secret=//p' "$DIR/appcred")
  (umask 077
  cat >"$DIR/env.tmp" <<EOF
# written by scripts/openstack.sh up; secrets: keep this file 0600
OPENSTACK_DIR='$DIR'
OS_AUTH_URL='$KS_URL/v3'
OS_REGION_NAME='$REGION'
OS_INTERFACE='public'
OS_USERNAME='demo'
OS_PASSWORD='$DEMO_PW'
OS_PROJECT_NAME='demo'
OS_PROJECT_ID='$project_id'
OS_USER_DOMAIN_NAME='Default'
OS_PROJECT_DOMAIN_NAME='Default'
OS_APPLICATION_CREDENTIAL_ID='$appcred_id'
OS_APPLICATION_CREDENTIAL_SECRET='$appcred_secret'
HEAT_URL='$HEAT_BASE/v1/$project_id'
EOF
  mv -f "$DIR/env.tmp" "$DIR/env")
}

up() {
  [ "$(id -u)" = 0 ] || die "run as root (installs Debian packages)"
  mkdir -p "$DIR"/{keystone,heat,logs,run}
  chmod 700 "$DIR"
  install_pkgs
  [ -x $PY ] || die "$PY missing"
  secrets
  write_configs
  keystone_db
  start_keystone
  heat_db &     # overlaps with the registration through Keystone
  local hdb=$!
  register
  wait "$hdb" || die "heat-manage db_sync failed (log: $DIR/logs/heat-manage.log)"
  start_heat
  write_env
  log "ready: env in $DIR/env (keystone $KS_URL/v3, heat $HEAT_BASE/v1/<project_id>)"
}

down() {
  stop_pid heat "$DIR/run/heat.pid" 'heat-all*'
  stop_pid keystone "$DIR/run/keystone.pid" 'uwsgi*'
  rm -f "$DIR/env"
}

status() {
  local rc=0
  if pid_alive "$DIR/run/keystone.pid" 'uwsgi*' && [ "$(http_code "$KS_URL/v3")" = 200 ]; then
    echo "keystone: running (pid $(cat "$DIR/run/keystone.pid")) $KS_URL/v3"
  else echo "keystone: stopped"; rc=1; fi
  if pid_alive "$DIR/run/heat.pid" 'heat-all*' && [ "$(http_code "$HEAT_BASE/")" = 300 ]; then
    echo "heat:     running (pid $(cat "$DIR/run/heat.pid")) $HEAT_BASE"
  else echo "heat:     stopped"; rc=1; fi
  [ -f "$DIR/env" ] && echo "env:      $DIR/env" || echo "env:      missing (run: $0 up)"
  return $rc
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  clean) down; rm -rf "$DIR"; log "wiped $DIR" ;;
  status) status ;;
  *) echo "usage: $0 up|down|clean|status" >&2; exit 2 ;;
esac
