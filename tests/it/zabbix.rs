//! Against the real Zabbix 6.0 that `scripts/zabbix.sh up` starts (its env file names the
//! API, the users, the host and the item). Without that env file every test here fails
//! with a message saying so.
//!
//! Tests may run in parallel (nextest: one process each). Those that stop the agent or the
//! API hold an exclusive lock on `$ZBX_DIR/tests.lock`; all others hold it shared. The
//! wrong-password test logs in as its own user, so the account the others use is never
//! blocked (five failed logins block one for 30 s).

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use stateshift::monitor::zabbix::{
    AuthPlacement, Credentials, LoginField, SourceConfig, ZabbixConfig, DEFAULT_TIMEOUT,
};
use stateshift::monitor::{
    conformance, Freshness, MetricSource, Poller, PollerConfig, Reading, Snapshot, Zabbix,
    ZabbixError, ZabbixSource,
};
use stateshift::util::Secret;

use crate::common::{start_daemon, Daemon};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/zabbix.sh");

pub(crate) struct Env {
    pub(crate) dir: PathBuf,
    pub(crate) url: String,
    pub(crate) user: String,
    pub(crate) password: Secret,
    lockout_user: String,
    host: String,
    hostid: String,
    key: String,
    itemid: String,
}

fn env_path() -> PathBuf {
    let dir = std::env::var_os("STATESHIFT_ZABBIX_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/stateshift-zabbix"));
    dir.join("env")
}

/// The env file `scripts/zabbix.sh up` writes (`KEY='value'` lines).
pub(crate) fn env() -> Env {
    let path = env_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: the test Zabbix is not running; run `scripts/zabbix.sh up` (as root) first",
            path.display()
        )
    });
    let vars: HashMap<&str, &str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim(), v.trim().trim_matches('\'')))
        .collect();
    let get = |k: &str| {
        vars.get(k)
            .unwrap_or_else(|| panic!("{}: no {k}; re-run `scripts/zabbix.sh up`", path.display()))
            .to_string()
    };
    Env {
        dir: PathBuf::from(get("ZBX_DIR")),
        url: get("ZBX_API_URL"),
        user: get("ZBX_USER"),
        password: Secret::new(get("ZBX_PASSWORD")),
        lockout_user: get("ZBX_LOCKOUT_USER"),
        host: get("ZBX_HOST"),
        hostid: get("ZBX_HOSTID"),
        key: get("ZBX_ITEM_KEY"),
        itemid: get("ZBX_ITEMID"),
    }
}

/// Tests that only read hold this shared; tests that stop a part hold it exclusively.
pub(crate) fn lock(env: &Env, exclusive: bool) -> File {
    let path = env.dir.join("tests.lock");
    let f = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if exclusive {
        f.lock().unwrap();
    } else {
        f.lock_shared().unwrap();
    }
    f
}

fn script(env: &Env, cmd: &str) {
    let out = Command::new(SCRIPT)
        .arg(cmd)
        .env("STATESHIFT_ZABBIX_DIR", &env.dir)
        .output()
        .unwrap_or_else(|e| panic!("{SCRIPT} {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{SCRIPT} {cmd}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `scripts/zabbix.sh <cmd>` when dropped, also when the test fails, so that the
/// part a test stopped is running again for the others.
struct RestartOnDrop<'a>(&'a Env, &'static str);

impl Drop for RestartOnDrop<'_> {
    fn drop(&mut self) {
        script(self.0, self.1);
    }
}

pub(crate) fn client(env: &Env) -> Zabbix {
    Zabbix::new(ZabbixConfig {
        url: env.url.clone(),
        credentials: Credentials::Password {
            user: env.user.clone(),
            password: env.password.clone(),
        },
        timeout: DEFAULT_TIMEOUT,
    })
    .unwrap()
}

fn source(env: &Env, poll: Duration) -> ZabbixSource {
    let mut cfg = SourceConfig::new(env.host.clone());
    cfg.key = env.key.clone();
    cfg.poll_interval = poll;
    ZabbixSource::new(client(env), cfg)
}

fn one_second_poller(env: &Env) -> Poller<ZabbixSource> {
    let cfg = PollerConfig {
        poll_interval: Duration::from_secs(1),
        backoff_max: Duration::from_secs(4),
    };
    Poller::new(source(env, cfg.poll_interval), cfg).unwrap()
}

/// Wait for a snapshot satisfying `pred`, at most `limit`.
async fn wait_for(
    rx: &mut tokio::sync::watch::Receiver<Snapshot>,
    limit: Duration,
    what: &str,
    pred: impl Fn(&Snapshot) -> bool,
) -> Snapshot {
    let r = tokio::time::timeout(limit, async {
        loop {
            if pred(&rx.borrow_and_update()) {
                return rx.borrow().clone();
            }
            rx.changed().await.expect("poller alive");
        }
    })
    .await;
    r.unwrap_or_else(|_| panic!("no {what} within {limit:?}; last: {:?}", rx.borrow()))
}

#[tokio::test]
async fn login_and_api_version_pick_the_6_0_dialect() {
    let env = env();
    let _l = lock(&env, false);
    let mut zbx = client(&env);
    let v = zbx.api_version().await.unwrap();
    assert_eq!((v.major, v.minor), (6, 0), "{v}");
    let d = zbx.dialect().unwrap();
    assert_eq!(d.login_field, LoginField::Username);
    assert_eq!(d.auth, AuthPlacement::Body);
    assert_eq!(zbx.logins(), 0, "apiinfo.version needs no login");
    zbx.login().await.unwrap();
    assert_eq!(zbx.logins(), 1);
    let hosts: Vec<Value> = zbx
        .call("host.get", json!({"output": ["hostid"], "limit": 1}))
        .await
        .unwrap();
    assert_eq!(hosts.len(), 1);
    assert_eq!(zbx.logins(), 1, "the session is reused");
    zbx.logout().await.unwrap();
}

#[tokio::test]
async fn host_and_item_are_found_by_name_and_key() {
    let env = env();
    let _l = lock(&env, false);
    let mut zbx = client(&env);
    assert_eq!(zbx.host_id(&env.host, &env.key).await.unwrap(), env.hostid);
    let item = zbx.item(&env.host, &env.key).await.unwrap();
    assert_eq!(item.itemid, env.itemid);
    assert_eq!(item.hostid, env.hostid);
    assert_eq!(item.key, "system.cpu.load[percpu,avg1]");
    assert_eq!(
        item.value_type,
        stateshift::monitor::zabbix::ValueType::Float
    );
    assert_eq!(item.delay, Some(Duration::from_secs(1)));
    assert!(item.enabled && item.supported, "{item:?}");
    zbx.logout().await.unwrap();
}

#[tokio::test]
async fn real_values_from_the_real_agent_arrive_fresh() {
    let env = env();
    let _l = lock(&env, false);
    let mut src = source(&env, Duration::from_secs(1));
    let readings = conformance::readings_are_consistent(&mut src, 6, Duration::from_secs(1))
        .await
        .unwrap();
    let fresh: Vec<_> = readings
        .iter()
        .filter_map(|r| match r {
            Reading::Fresh(s) => Some(*s),
            _ => None,
        })
        .collect();
    let mut clocks: Vec<_> = fresh.iter().map(|s| s.clock).collect();
    clocks.dedup();
    assert!(
        clocks.len() >= 3,
        "at least 3 new values in 6 one-second reads: {readings:?}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for s in &fresh {
        // load per CPU of this machine: small, never negative; collected just now
        assert!((0.0..100.0).contains(&s.value), "{s:?}");
        assert!((now - s.clock.as_secs_f64()).abs() < 30.0, "{s:?} vs {now}");
    }
    src.client().logout().await.unwrap();
}

#[tokio::test]
async fn a_killed_session_is_renewed_by_logging_in_once() {
    let env = env();
    let _l = lock(&env, false);
    let mut src = source(&env, Duration::from_secs(1));
    assert!(src.read().await.is_ok());
    assert_eq!(src.client().logins(), 1);
    // End the session on the server behind the client's back.
    let ended: Value = src.client().call("user.logout", json!([])).await.unwrap();
    assert_eq!(ended, json!(true));
    // The next call meets "Session terminated", logs in again once and succeeds.
    let hosts: Vec<Value> = src
        .client()
        .call(
            "host.get",
            json!({"output": ["hostid"], "filter": {"host": [env.host]}}),
        )
        .await
        .unwrap();
    assert_eq!(hosts.len(), 1);
    assert_eq!(src.client().logins(), 2, "exactly one more login");
    // and the source reads on with the new session
    src.client()
        .call::<Value>("user.logout", json!([]))
        .await
        .unwrap();
    let r = src.read().await.unwrap();
    assert_ne!(r.freshness(), Freshness::NoData);
    assert_eq!(src.client().logins(), 3);
    src.client().logout().await.unwrap();
}

#[tokio::test]
async fn unknown_host_or_key_is_an_error_naming_both() {
    let env = env();
    let _l = lock(&env, false);
    let mut zbx = client(&env);
    let err = zbx.item("no-such-host", &env.key).await.unwrap_err();
    assert!(matches!(err, ZabbixError::UnknownHost { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("\"no-such-host\"") && msg.contains(&format!("{:?}", env.key)),
        "{msg}"
    );
    assert!(
        msg.contains("monitor.zabbix.host"),
        "the setting to fix: {msg}"
    );
    assert!(!err.is_transient());

    let err = zbx.item(&env.host, "no.such.key[x]").await.unwrap_err();
    assert!(matches!(err, ZabbixError::UnknownItem { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&format!("{:?}", env.host)) && msg.contains("\"no.such.key[x]\""),
        "{msg}"
    );
    assert!(
        msg.contains("monitor.zabbix.key"),
        "the setting to fix: {msg}"
    );

    // the same through the metric source
    let mut cfg = SourceConfig::new(env.host.clone());
    cfg.key = "no.such.key[x]".into();
    let mut src = ZabbixSource::new(client(&env), cfg);
    let err = src.read().await.unwrap_err();
    assert!(err.to_string().contains("no.such.key[x]") && err.to_string().contains(&env.host));
    src.client().logout().await.unwrap();
    zbx.logout().await.unwrap();
}

#[tokio::test]
async fn a_wrong_password_is_a_clear_error_without_the_password() {
    let env = env();
    let _l = lock(&env, false);
    let wrong = format!("wrong-{}", std::process::id());
    let mut zbx = Zabbix::new(ZabbixConfig {
        url: env.url.clone(),
        credentials: Credentials::Password {
            user: env.lockout_user.clone(),
            password: Secret::new(wrong.clone()),
        },
        timeout: DEFAULT_TIMEOUT,
    })
    .unwrap();
    let err = zbx.login().await.unwrap_err();
    assert!(matches!(err, ZabbixError::LoginRefused { .. }), "{err:?}");
    assert!(!err.is_transient());
    let msg = err.to_string();
    assert!(msg.contains(&format!("{:?}", env.lockout_user)), "{msg}");
    assert!(msg.contains("password"), "says what to check: {msg}");
    for shown in [msg, format!("{err:?}"), format!("{zbx:?}")] {
        assert!(!shown.contains(&wrong), "password leaked: {shown}");
    }
    // a call needing a session fails the same way (no retry loop)
    let err = zbx
        .call::<Value>("host.get", json!({"output": ["hostid"]}))
        .await
        .unwrap_err();
    assert!(matches!(err, ZabbixError::LoginRefused { .. }), "{err:?}");
}

#[tokio::test]
async fn an_api_token_reads_without_logging_in_and_a_deleted_one_is_refused() {
    let env = env();
    let _l = lock(&env, false);
    let mut admin = client(&env);
    let users: Vec<Value> = admin
        .call(
            "user.get",
            json!({"output": ["userid"], "filter": {"username": [env.user]}}),
        )
        .await
        .unwrap();
    let userid = users[0]["userid"].as_str().unwrap().to_string();
    let name = format!("stateshift-it-{}", std::process::id());
    let created: Value = admin
        .call("token.create", json!({"name": name, "userid": userid}))
        .await
        .unwrap();
    let tokenid = created["tokenids"][0].as_str().unwrap().to_string();
    let generated: Value = admin
        .call("token.generate", json!([tokenid]))
        .await
        .unwrap();
    let token = Secret::new(generated[0]["token"].as_str().unwrap());

    let mut by_token = Zabbix::new(ZabbixConfig {
        url: env.url.clone(),
        credentials: Credentials::ApiToken(token.clone()),
        timeout: DEFAULT_TIMEOUT,
    })
    .unwrap();
    let item = by_token.item(&env.host, &env.key).await.unwrap();
    assert_eq!(item.itemid, env.itemid);
    assert_eq!(by_token.logins(), 0);

    let _: Value = admin.call("token.delete", json!([tokenid])).await.unwrap();
    let err = by_token.item(&env.host, &env.key).await.unwrap_err();
    assert!(matches!(err, ZabbixError::TokenRejected { .. }), "{err:?}");
    assert!(!err.to_string().contains(token.expose()));
    admin.logout().await.unwrap();
}

#[tokio::test]
async fn a_stopped_agent_makes_the_reading_stale_within_three_intervals() {
    let env = env();
    let _l = lock(&env, true);
    let poller = one_second_poller(&env);
    let mut rx = poller.subscribe();
    let token = CancellationToken::new();
    let task = tokio::spawn(poller.run(token.clone()));
    wait_for(&mut rx, Duration::from_secs(20), "two pushed values", |s| {
        s.pushed >= 2
    })
    .await;

    let restart = RestartOnDrop(&env, "agent-start");
    script(&env, "agent-stop");
    let stopped = Instant::now();
    let reads_at_stop = rx.borrow_and_update().reads;
    let stale = wait_for(&mut rx, Duration::from_secs(10), "stale reading", |s| {
        matches!(s.last_reading, Some(Reading::Stale(_)))
    })
    .await;
    let took = stopped.elapsed();
    let reads = stale.reads - reads_at_stop;
    eprintln!(
        "stale after {reads} reads, {:.1} s after the agent stopped",
        took.as_secs_f64()
    );
    // Three one-second intervals, plus the time the reads themselves take.
    assert!(
        took <= Duration::from_millis(3500) && reads <= 4,
        "stale only after {reads} one-second reads ({took:?})"
    );
    // stale readings are not pushed
    let later = wait_for(&mut rx, Duration::from_secs(10), "two more reads", |s| {
        s.reads >= stale.reads + 2
    })
    .await;
    assert_eq!(later.pushed, stale.pushed, "{later:?}");
    assert_eq!(later.last_pushed, stale.last_pushed);
    assert!(matches!(later.last_reading, Some(Reading::Stale(_))));

    // The agent comes back: fresh values flow again (and the next tests find it running).
    drop(restart);
    wait_for(
        &mut rx,
        Duration::from_secs(30),
        "fresh values again",
        |s| s.pushed >= later.pushed + 2,
    )
    .await;
    token.cancel();
    let mut poller = task.await.expect("the poller never panics");
    poller.source_mut().client().logout().await.unwrap();
}

#[tokio::test]
async fn the_poller_backs_off_while_the_api_is_down_and_resumes() {
    let env = env();
    let _l = lock(&env, true);
    let poller = one_second_poller(&env);
    let mut rx = poller.subscribe();
    let token = CancellationToken::new();
    let task = tokio::spawn(poller.run(token.clone()));
    let before = wait_for(&mut rx, Duration::from_secs(20), "a pushed value", |s| {
        s.pushed >= 1
    })
    .await;

    let restart = RestartOnDrop(&env, "api-start");
    script(&env, "api-stop");
    let down_at = Instant::now();
    let failing = wait_for(&mut rx, Duration::from_secs(10), "a failed read", |s| {
        s.consecutive_failures >= 1
    })
    .await;
    let err = failing.last_error.clone().unwrap();
    assert!(err.contains("no answer"), "{err}");
    // 12 s down: with 1 s polling that would be 12 reads; backing off 1, 2, 4, 4... (each
    // wait jittered to 50–100 %, never under the 1 s interval) it is about half, and the
    // wait grew towards the 4 s cap.
    let mut max_delay = Duration::ZERO;
    let mut last = failing.clone();
    while down_at.elapsed() < Duration::from_secs(12) {
        if tokio::time::timeout(Duration::from_millis(500), rx.changed())
            .await
            .is_ok()
        {
            last = rx.borrow_and_update().clone();
            max_delay = max_delay.max(last.next_delay);
        }
    }
    let failed_reads = last.failures - before.failures;
    eprintln!("{failed_reads} failed reads in 12 s, longest wait {max_delay:?}");
    assert!(
        max_delay >= Duration::from_secs(2) && max_delay <= Duration::from_secs(4),
        "the wait grew past the interval and stayed under the cap: {max_delay:?} {last:?}"
    );
    assert!((3..=9).contains(&failed_reads), "{last:?}");
    assert_eq!(last.pushed, failing.pushed, "nothing pushed while down");
    assert!(!task.is_finished(), "the poller keeps going");

    drop(restart);
    let back = wait_for(
        &mut rx,
        Duration::from_secs(20),
        "a value after the API is back",
        |s| s.pushed > last.pushed && s.consecutive_failures == 0,
    )
    .await;
    assert_eq!(back.next_delay, Duration::from_secs(1));
    assert!(back.last_error.is_none());
    token.cancel();
    let mut poller = task.await.expect("the poller never panics");
    poller.source_mut().client().logout().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_fills_its_window_from_the_real_zabbix() {
    let env = env();
    let _l = lock(&env, false);
    let d = tempfile::tempdir().unwrap();
    let yaml = format!(
        "service:\n  name: zbx\nsource:\n  influx_url: http://127.0.0.1:1\ntarget:\n  influx_url: http://127.0.0.1:2\nmigration:\n  work_dir: \"{}\"\nmonitor:\n  kind: zabbix\n  poll_interval: 1s\n  threshold: 1000000000\n  zabbix:\n    url: \"{}\"\n    username: \"{}\"\n    host: \"{}\"\n    key: \"{}\"\napi:\n  listen: \"127.0.0.1:0\"\n",
        d.path().display(),
        env.url,
        env.user,
        env.host,
        env.key
    );
    let p = d.path().join("c.yaml");
    std::fs::write(&p, yaml).unwrap();
    let cfg = stateshift::config::Config::load_with_env(
        &p,
        [(
            "STATESHIFT__MONITOR__ZABBIX__PASSWORD".to_string(),
            env.password.expose().to_string(),
        )],
    )
    .unwrap();
    assert!(
        !format!("{cfg:?}").contains(env.password.expose()),
        "the password never prints"
    );
    let Daemon {
        stop,
        task: d2,
        shared,
    } = start_daemon(cfg).await;
    let t = std::time::Instant::now();
    let window = loop {
        let w = shared.status.lock().unwrap().window.clone();
        if w.len() >= 3 || t.elapsed() > Duration::from_secs(20) {
            break w;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    stop.cancel();
    d2.await.unwrap().unwrap();
    assert!(
        window.len() >= 3,
        "fresh Zabbix readings fill the window: {window:?}"
    );
    assert!(window.iter().all(|v| v.is_finite() && *v >= 0.0));
    let st = shared.status.lock().unwrap().clone();
    assert!(st.load_source.contains(&env.host), "{}", st.load_source);
    assert_eq!(st.last_decision, "below threshold");
    assert!(shared
        .metrics
        .encode()
        .contains("stateshift_readings_total{freshness=\"fresh\"}"));
}

/// The whole loop driven by the real Zabbix: the daemon polls the load item, GM(1,1)
/// predicts, and with a threshold just above zero the real readings trigger; the service
/// moves between local stacks under a live writer, twice (a short cooldown in between).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_zabbix_readings_trigger_two_migrations_in_a_row_losing_nothing() {
    let env = env();
    let _l = lock(&env, false);
    let svc = crate::orchestrator::service(60).await;
    let pw = svc.dir().join("zbx.pw");
    crate::kit::lab::write_secret(&pw, env.password.expose()).unwrap();
    let extra = format!(
        "monitor:\n  kind: zabbix\n  poll_interval: 1s\n  window: 5\n  min_readings: 3\n  threshold: 0.000001\n  consecutive: 1\n  cooldown: 1s\n  model: last\n  zabbix:\n    url: \"{}\"\n    username: \"{}\"\n    password_file: \"{}\"\n    host: \"{}\"\n    key: \"{}\"\n",
        env.url,
        env.user,
        pw.display(),
        env.host,
        env.key
    );
    let mut yaml = std::fs::read_to_string(&svc.cfg_path).unwrap();
    yaml.push_str(&extra);
    std::fs::write(&svc.cfg_path, yaml).unwrap();
    let cfg = svc.cfg();
    let w = svc.writer(800);
    let Daemon {
        stop,
        task: d,
        shared,
    } = start_daemon(cfg).await;
    let t = Instant::now();
    loop {
        let st = shared.status.lock().unwrap().clone();
        let ok = st
            .migrations
            .iter()
            .filter(|m| m.outcome == Some(stateshift::migrate::journal::Outcome::Succeeded))
            .count();
        if ok >= 2 && st.state == "polling" {
            assert!(
                st.migrations
                    .iter()
                    .all(|m| m.trigger.starts_with("prediction")),
                "triggered by the predictions: {:?}",
                st.migrations.iter().map(|m| &m.trigger).collect::<Vec<_>>()
            );
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "two Zabbix-triggered migrations within 120 s: {st:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.cancel();
    d.await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ledger = w.finish().await;
    crate::orchestrator::assert_nothing_lost(&svc.current(), &ledger, 5_000, "zabbix-triggered")
        .await;
    let stacks = svc.stacks_on_disk();
    assert_eq!(
        stacks.len(),
        1,
        "each old stack was disposed of: {stacks:?}"
    );
}

/// A proxy in front of the real Zabbix API that can answer like a sick one.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Sick {
    Healthy,
    Garbage,
    RpcError,
    Slow,
    Html,
}

async fn sick_zabbix(
    real: String,
) -> (
    String,
    std::sync::Arc<std::sync::Mutex<Sick>>,
    tokio::task::JoinHandle<()>,
) {
    use axum::response::IntoResponse;
    let mode = std::sync::Arc::new(std::sync::Mutex::new(Sick::Healthy));
    let m = mode.clone();
    let http = reqwest::Client::new();
    let app = axum::Router::new().route(
        "/api_jsonrpc.php",
        axum::routing::post(move |body: axum::body::Bytes| {
            let (m, http, real) = (m.clone(), http.clone(), real.clone());
            async move {
                let mode = *m.lock().unwrap();
                let json = [(axum::http::header::CONTENT_TYPE, "application/json")];
                match mode {
                    Sick::Garbage => (json, "{\"jsonrpc\":\"2.0\",\"result\":[{\"itemid\":\"23")
                        .into_response(),
                    Sick::RpcError => (
                        json,
                        "{\"jsonrpc\":\"2.0\",\"error\":{\"code\":-32500,\"message\":\"Application error.\",\"data\":\"Connection to the database failed.\"},\"id\":1}",
                    )
                        .into_response(),
                    Sick::Html => (
                        axum::http::StatusCode::BAD_GATEWAY,
                        "<html><body><h1>502 Bad Gateway</h1></body></html>",
                    )
                        .into_response(),
                    Sick::Slow | Sick::Healthy => {
                        if mode == Sick::Slow {
                            tokio::time::sleep(Duration::from_secs(5)).await;
                        }
                        let r = http
                            .post(&real)
                            .header("content-type", "application/json-rpc")
                            .body(body)
                            .send()
                            .await
                            .unwrap();
                        let status = r.status().as_u16();
                        let b = r.bytes().await.unwrap();
                        (
                            axum::http::StatusCode::from_u16(status).unwrap(),
                            json,
                            b,
                        )
                            .into_response()
                    }
                }
            }
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api_jsonrpc.php", l.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    (url, mode, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zabbix_answering_garbage_errors_slowly_or_html_pushes_nothing_and_the_poller_recovers() {
    let env = env();
    let _l = lock(&env, false);
    let (url, mode, _proxy) = sick_zabbix(env.url.clone()).await;
    let z = Zabbix::new(ZabbixConfig {
        url,
        credentials: Credentials::Password {
            user: env.user.clone(),
            password: env.password.clone(),
        },
        timeout: Duration::from_secs(2),
    })
    .unwrap();
    let cfg = PollerConfig {
        poll_interval: Duration::from_secs(1),
        backoff_max: Duration::from_secs(2),
    };
    let mut scfg = SourceConfig::new(env.host.clone());
    scfg.key = env.key.clone();
    scfg.poll_interval = cfg.poll_interval;
    let poller = Poller::new(ZabbixSource::new(z, scfg), cfg).unwrap();
    let mut rx = poller.subscribe();
    let token = CancellationToken::new();
    let task = tokio::spawn(poller.run(token.clone()));
    wait_for(&mut rx, Duration::from_secs(20), "a first value", |s| {
        s.pushed >= 1
    })
    .await;
    for (sick, names) in [
        (Sick::Garbage, &["JSON"][..]),
        (
            Sick::RpcError,
            &["-32500", "Connection to the database failed"][..],
        ),
        (Sick::Slow, &["no answer within 2s"][..]),
        (Sick::Html, &["502"][..]),
    ] {
        *mode.lock().unwrap() = sick;
        let before = rx.borrow_and_update().clone();
        let failing = wait_for(&mut rx, Duration::from_secs(20), "a failed read", |s| {
            s.failures > before.failures
        })
        .await;
        let err = failing.last_error.clone().unwrap_or_default();
        eprintln!("{sick:?}: {err}");
        for n in names {
            assert!(err.contains(n), "{sick:?}: the error names {n:?}: {err}");
        }
        assert!(
            !err.contains(env.password.expose()),
            "{sick:?}: no password in {err}"
        );
        // While sick: reads fail, nothing is pushed.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let during = rx.borrow_and_update().clone();
        assert!(
            during.pushed <= failing.pushed,
            "{sick:?}: nothing pushed while sick: {during:?}"
        );
        assert!(!task.is_finished(), "{sick:?}: the poller keeps going");
        *mode.lock().unwrap() = Sick::Healthy;
        let pushed = during.pushed;
        wait_for(&mut rx, Duration::from_secs(30), "recovery", |s| {
            s.pushed > pushed && s.consecutive_failures == 0
        })
        .await;
    }
    token.cancel();
    let mut poller = task.await.expect("the poller never panics");
    poller.source_mut().client().logout().await.unwrap();
}
