//! Whole migrations whose stacks live in the real Keystone + Heat that
//! `scripts/openstack.sh up` starts (issue 6: the Heat/Keystone rows of the fault matrix).
//!
//! This machine has no Nova, so the "VMs" are `LocalVm`s the test starts itself (influxd +
//! sshd on loopback addresses in 127.0.70-79.*), and Heat's stacks are made from
//! `tests/fixtures/heat/target-at.yaml`, whose outputs name them. Heat really creates,
//! fails, times out and deletes the stacks; the data really moves from one influxd to the
//! other, under a live writer whose ledger proves nothing is lost.
//!
//! Each service: a source VM holding 5 000 seeded points, registered in Heat as the
//! service's current stack (`<svc>-influx-0`, deleted through Heat at dispose), and a
//! target VM that the provider's template parameters point the new stack at.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::kit::workload::{self, Ledger, RunningWriter, WriterSpec, LIVE_MEASUREMENT};
use stateshift::config::Config;
use stateshift::influx::Influx;
use stateshift::migrate::engine::{Phase, Progress};
use stateshift::migrate::journal::{Event, Journal, Outcome};
use stateshift::migrate::machine::{self, MachineError, Provider};
use stateshift::stack::heat::Heat;
use stateshift::stack::local::{LocalVm, SshKeys, VmOptions};
use stateshift::stack::{StackError, StackProvider, StackRef, StackSpec};

use super::common::*;
use super::heat::{env, fake_server, fixture, password_cfg, revoke, unique, Env};
use super::orchestrator::assert_nothing_lost;

const SEEDED: u64 = 5_000;
/// Points per second the live writer aims at (the brief asks for at least 500).
const RATE: u32 = 1_000;

// ---------------------------------------------------------------- logs

#[derive(Clone, Default)]
struct LogBuf(Arc<Mutex<Vec<u8>>>);
impl std::io::Write for LogBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
impl LogBuf {
    /// Capture this process's `stateshift` logs (nextest runs each test in its own process).
    fn install() -> LogBuf {
        let logs = LogBuf::default();
        let l2 = logs.clone();
        let _ = tracing_subscriber::fmt()
            .with_writer(move || l2.clone())
            .with_ansi(false)
            .with_env_filter("stateshift=info")
            .try_init();
        logs
    }
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).to_string()
    }
}

// ---------------------------------------------------------------- progress

/// Records the phases and notes; runs a hook when a phase starts (fault injection).
#[derive(Default)]
struct Watch<'a> {
    lines: Mutex<Vec<String>>,
    #[allow(clippy::type_complexity)]
    hook: Option<(Phase, Box<dyn Fn() + Send + Sync + 'a>)>,
}

impl Progress for Watch<'_> {
    fn phase_started(&self, phase: Phase) {
        self.lines.lock().unwrap().push(format!("{phase} started"));
        if let Some((p, f)) = &self.hook {
            if *p == phase {
                f();
            }
        }
    }
    fn phase_done(&self, phase: Phase, took: Duration) {
        self.lines
            .lock()
            .unwrap()
            .push(format!("{phase} done in {took:?}"));
    }
    fn note(&self, msg: &str) {
        self.lines.lock().unwrap().push(msg.to_string());
    }
}

impl Watch<'_> {
    /// The name the machine created the target stack under.
    fn target_stack(&self) -> String {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .find_map(|l| {
                l.strip_prefix("creating the target stack ")
                    .map(String::from)
            })
            .expect("the machine announced the target stack")
    }
}

// ---------------------------------------------------------------- the service

struct HeatSvc {
    tmp: tempfile::TempDir,
    e: Env,
    /// The test's own Heat client, for checks and cleanup.
    heat: Heat,
    src: LocalVm,
    dst: LocalVm,
    name: String,
    /// The service's current stack in Heat, pointing at `src`.
    old: StackRef,
    cfg_path: PathBuf,
    url_file: PathBuf,
}

/// How the service's provider section differs from a healthy one.
struct Knobs {
    /// Extra template parameters (fault switches of target-at.yaml).
    params: Vec<(&'static str, String)>,
    create_timeout: &'static str,
    /// Extra `provider.heat` keys, `key: value` each.
    heat: Vec<String>,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            params: Vec::new(),
            create_timeout: "120s",
            heat: Vec::new(),
        }
    }
}

fn target_at_spec(name: &str, vm: &LocalVm) -> StackSpec {
    StackSpec {
        secret_parameters: Default::default(),
        name: name.into(),
        template: fixture("target-at.yaml"),
        parameters: [
            ("host".to_string(), vm.addr.to_string()),
            ("ssh_port".to_string(), "2222".to_string()),
        ]
        .into(),
        environment_files: Vec::new(),
        timeout: Duration::from_secs(120),
    }
}

/// A seeded service on VMs in `127.0.{subnet}.*` whose current stack is in Heat.
async fn heat_service(subnet: u8, tag: &str, knobs: Knobs) -> HeatSvc {
    assert!((70..=79).contains(&subnet));
    let e = env();
    let heat = Heat::new(password_cfg(&e)).unwrap();
    // Short paths: ssh control sockets must fit in 108 bytes.
    let tmp = tempfile::Builder::new()
        .prefix("ss-hm")
        .tempdir_in("/tmp")
        .unwrap();
    let d = tmp.path().to_path_buf();
    let keys = SshKeys::ensure(&d.join("keys")).unwrap();
    let opts = VmOptions {
        ssh: Some(keys.clone()),
        subnet: Some(subnet),
        ..VmOptions::default()
    };
    let src = LocalVm::start(&d.join("src"), opts.clone()).await.unwrap();
    let dst = LocalVm::start(&d.join("dst"), opts).await.unwrap();
    workload::seed(&src.client(), &seed_spec("cyclops", SEEDED))
        .await
        .unwrap();
    let name = unique(tag);
    let (old, out) = heat
        .create(&target_at_spec(&format!("{name}-influx-0"), &src))
        .await
        .unwrap();
    assert_eq!(
        out.influxdb_url,
        src.influx_url(),
        "Heat echoes the source VM"
    );
    let url_file = d.join("writer-url");
    std::fs::write(&url_file, src.influx_url()).unwrap();
    let pw = d.join("heat.password");
    crate::kit::lab::write_secret(&pw, e.password.expose()).unwrap();
    let inst = src.instance_config("src");
    let ssh = inst.ssh.clone().unwrap();
    let mut params = vec![
        ("host", dst.addr.to_string()),
        ("ssh_port", "2222".to_string()),
    ];
    params.extend(knobs.params);
    let params: String = params
        .iter()
        .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
        .collect();
    let heat_extra: String = knobs.heat.iter().map(|l| format!("    {l}\n")).collect();
    let yaml = format!(
        r#"service:
  name: "{name}"
  stack: "{name}-influx-0"
source:
  influx_url: "{src_url}"
  rpc_address: "{rpc}"
  work_dir: "{work}"
  ssh:
    host: "{ssh_host}"
    port: {ssh_port}
    identity_file: "{key}"
    known_hosts_file: "{kh}"
provider:
  kind: heat
  template: "{template}"
  parameters:
{params}  create_timeout: {create_timeout}
  delete_timeout: 60s
  ssh:
    user: root
    identity_file: "{key}"
    known_hosts_file: "{kh}"
    connect_timeout: 5s
    ready_timeout: 20s
  heat:
    auth_url: "{auth}"
    region: "{region}"
    username: "{user}"
    password_file: "{pw}"
    project_name: "{project}"
    poll_max_interval: 200ms
{heat_extra}capture:
  spool_dir: "{d}/spool"
  quiet_period: 1s
cutover:
  command: "printf '%s' {{target_url}} > {d}/writer-url"
migration:
  work_dir: "{d}/state"
"#,
        src_url = inst.influx_url,
        rpc = inst.rpc_address,
        work = inst.work_dir,
        ssh_host = ssh.host,
        ssh_port = ssh.port,
        key = keys.client_key.display(),
        kh = keys.known_hosts.display(),
        template = fixture("target-at.yaml").display(),
        create_timeout = knobs.create_timeout,
        auth = e.auth_url,
        region = e.region,
        user = e.username,
        pw = pw.display(),
        project = e.project,
        d = d.display(),
    );
    assert!(
        !yaml.contains(e.password.expose()),
        "no secret in the config"
    );
    let cfg_path = d.join("stateshift.yaml");
    std::fs::write(&cfg_path, yaml).unwrap();
    HeatSvc {
        tmp,
        e,
        heat,
        src,
        dst,
        name,
        old,
        cfg_path,
        url_file,
    }
}

impl HeatSvc {
    fn cfg(&self) -> Config {
        Config::load(&self.cfg_path).unwrap()
    }
    fn writer(&self) -> (RunningWriter, Instant) {
        let w = RunningWriter::start(WriterSpec {
            db: "cyclops".into(),
            url_file: self.url_file.clone(),
            username: None,
            password: None,
            rate: RATE,
            old_fraction: 0.1,
            overwrite_fraction: 0.1,
            max_duration: Duration::from_secs(300),
        });
        (w, Instant::now())
    }
    fn writer_url(&self) -> String {
        std::fs::read_to_string(&self.url_file).unwrap()
    }
    fn journal(&self) -> Vec<Event> {
        Journal::load(&self.tmp.path().join(format!("state/{}.journal", self.name)))
            .unwrap()
            .into_iter()
            .map(|r| r.event)
            .collect()
    }
    /// Delete what this test left in Heat (best effort: a failed test must not leak).
    async fn cleanup(&self, names: &[&str]) {
        for n in names {
            if let Ok(Some(s)) = self.heat.find(n).await {
                let _ = self.heat.delete(&s, Duration::from_secs(60)).await;
            }
        }
    }
}

/// Stop the writer after a last second of writes and check its rate.
async fn finish_writer(w: RunningWriter, started: Instant) -> Ledger {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ledger = w.finish().await;
    let rate = ledger.points_acked as f64 / started.elapsed().as_secs_f64();
    assert!(
        rate >= 500.0,
        "the writer kept up at least 500 points/s: {rate:.0}"
    );
    ledger
}

/// The measured line for RELIABILITY.md: written / on the final instance / lost.
async fn measured(what: &str, on: &Influx, ledger: &Ledger, took: Duration, outcome: &str) {
    let problems = workload::check_ledger(on, "cyclops", ledger).await.unwrap();
    let lost = problems.iter().filter(|p| p.contains("missing")).count();
    let live = workload::count_points(on, "cyclops", LIVE_MEASUREMENT)
        .await
        .unwrap();
    eprintln!(
        "MEASURED {what}: {outcome} in {took:.1?}; writer acked {} points ({} distinct) at ~{RATE}/s, {live} live + {SEEDED} seeded on {}, {lost} lost, {} failed requests",
        ledger.points_acked,
        ledger.acked.len(),
        on.url(),
        ledger.requests_failed
    );
}

/// The seeded points are all still on the source (the engine never deletes there).
async fn source_intact(svc: &HeatSvc, what: &str) {
    let src = svc.src.client();
    let mut n = 0;
    for m in 0..3 {
        n += workload::count_points(&src, "cyclops", &format!("usage{m}"))
            .await
            .unwrap();
    }
    assert_eq!(n, SEEDED, "{what}: the source keeps every seeded point");
}

fn no_secrets(text: &str, e: &Env, what: &str) {
    assert!(
        !text.contains(e.password.expose()),
        "{what}: the Keystone password must not appear"
    );
}

/// A migration that failed while Heat was creating the target: the service stays on the
/// source, nothing is lost there, the target VM got nothing, the old stack stays, no new
/// stack is left behind, and the journal says rolled back with the error.
async fn assert_rolled_back_at_create(
    svc: &HeatSvc,
    target: &str,
    ledger: &Ledger,
    err: &MachineError,
    what: &str,
) {
    assert!(matches!(err, MachineError::Stack(_)), "{what}: {err:?}");
    assert_eq!(err.phase(), Some(Phase::Prepare));
    assert_eq!(
        svc.writer_url(),
        svc.src.influx_url(),
        "{what}: not repointed"
    );
    assert_nothing_lost(&svc.src.client(), ledger, SEEDED, what).await;
    source_intact(svc, what).await;
    assert!(
        !svc.dst
            .client()
            .databases()
            .await
            .unwrap()
            .contains(&"cyclops".to_string()),
        "{what}: nothing was restored on the target VM"
    );
    assert_eq!(
        svc.heat.find(target).await.unwrap(),
        None,
        "{what}: the failed target stack is gone from Heat"
    );
    assert_eq!(
        svc.heat.find(&svc.old.name).await.unwrap(),
        Some(svc.old.clone()),
        "{what}: the old stack is untouched"
    );
    let j = svc.journal();
    match j.last() {
        Some(Event::Finished {
            outcome: Outcome::RolledBack,
            error: Some(msg),
            ..
        }) => {
            let MachineError::Stack(s) = err else {
                unreachable!()
            };
            // Journaled by the migration itself, or by the recovery that settled it.
            assert!(
                *msg == s.to_string() || msg.contains("rolled back on restart"),
                "{what}: {msg}"
            )
        }
        other => panic!("{what}: the journal ends rolled back: {other:?}"),
    }
    assert!(
        !j.iter().any(|e| matches!(e, Event::StackCreated { .. })),
        "{what}: no target was ever recorded"
    );
}

/// A completed migration: the writers use the target, which holds everything; the old
/// stack was deleted through Heat only after verification; the source data is intact.
async fn assert_migrated(svc: &HeatSvc, target: &str, ledger: &Ledger, what: &str) {
    assert_eq!(
        svc.writer_url(),
        svc.dst.influx_url(),
        "{what}: writers repointed"
    );
    assert_nothing_lost(&svc.dst.client(), ledger, SEEDED, what).await;
    source_intact(svc, what).await;
    assert_eq!(
        svc.heat.find(&svc.old.name).await.unwrap(),
        None,
        "{what}: the old stack was deleted through Heat"
    );
    assert!(
        svc.heat.find(target).await.unwrap().is_some(),
        "{what}: the target stack stays in Heat"
    );
    let j = svc.journal();
    let verified = j
        .iter()
        .position(|e| {
            matches!(
                e,
                Event::PhaseDone {
                    phase: Phase::Verify,
                    ..
                }
            )
        })
        .expect("verified");
    let deleting = j
        .iter()
        .position(|e| matches!(e, Event::OldStackDeleting))
        .expect("old stack deleted");
    assert!(
        verified < deleting,
        "{what}: dispose only after verification"
    );
    assert!(matches!(
        j.last(),
        Some(Event::Finished {
            outcome: Outcome::Succeeded,
            ..
        })
    ));
}

// ---------------------------------------------------------------- a flaky Heat

/// A proxy in front of the real Heat API: forwards every request, except that it answers
/// 500 in Heat's error format to the next `gets_to_fail_after_create` GETs once a create
/// was accepted, and to everything while `fail_all` is set (which an accepted create sets
/// with `fail_all_after_create`).
struct FlakyHeat {
    /// For `provider.heat.endpoint_override`.
    url: String,
    fail_all: Arc<std::sync::atomic::AtomicBool>,
    failed: Arc<AtomicUsize>,
    forwarded: Arc<AtomicUsize>,
}

async fn flaky_heat(
    e: &Env,
    gets_to_fail_after_create: usize,
    fail_all_after_create: bool,
) -> FlakyHeat {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/{{project_id}}", l.local_addr().unwrap());
    let origin = e.heat_url[..e.heat_url.find("/v1/").unwrap()].to_string();
    let armed = Arc::new(AtomicUsize::new(0));
    let fail_all = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let forwarded = Arc::new(AtomicUsize::new(0));
    let f = FlakyHeat {
        url,
        fail_all: fail_all.clone(),
        failed: failed.clone(),
        forwarded: forwarded.clone(),
    };
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let (http, origin, armed, fail_all, failed, forwarded) = (
                http.clone(),
                origin.clone(),
                armed.clone(),
                fail_all.clone(),
                failed.clone(),
                forwarded.clone(),
            );
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 65536];
                let head_end = loop {
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
                let mut lines = head.split("\r\n");
                let mut rl = lines.next().unwrap_or("").split(' ');
                let (method, path) = (
                    rl.next().unwrap_or("").to_string(),
                    rl.next().unwrap_or("").to_string(),
                );
                let headers: Vec<(String, String)> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                    .collect();
                let len: usize = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .and_then(|(_, v)| v.parse().ok())
                    .unwrap_or(0);
                while buf.len() < head_end + len {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = buf[head_end..head_end + len].to_vec();
                let fail = fail_all.load(Ordering::SeqCst)
                    || (method == "GET"
                        && armed
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok());
                let (status, ctype, reply) = if fail {
                    failed.fetch_add(1, Ordering::SeqCst);
                    let b = r#"{"code": 500, "title": "Internal Server Error", "explanation": "The server has either erred or is incapable of performing the requested operation.", "error": {"message": "injected by the test's flaky Heat proxy", "type": "DBConnectionError", "traceback": null}}"#;
                    (
                        500u16,
                        "application/json".to_string(),
                        b.as_bytes().to_vec(),
                    )
                } else {
                    forwarded.fetch_add(1, Ordering::SeqCst);
                    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
                    let mut req = http
                        .request(m, format!("{origin}{path}"))
                        .header("Connection", "close");
                    for (k, v) in &headers {
                        if ["x-auth-token", "content-type", "accept"].contains(&k.as_str()) {
                            req = req.header(k.as_str(), v.as_str());
                        }
                    }
                    let r = match req.body(body).send().await {
                        Ok(r) => r,
                        Err(_) => return,
                    };
                    let status = r.status().as_u16();
                    let ctype = r
                        .headers()
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("application/json")
                        .to_string();
                    let b = r.bytes().await.map(|b| b.to_vec()).unwrap_or_default();
                    if method == "POST" && path.ends_with("/stacks") && status == 201 {
                        armed.store(gets_to_fail_after_create, Ordering::SeqCst);
                        if fail_all_after_create {
                            fail_all.store(true, Ordering::SeqCst);
                        }
                    }
                    (status, ctype, b)
                };
                let mut resp = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    reply.len()
                )
                .into_bytes();
                resp.extend_from_slice(&reply);
                let _ = s.write_all(&resp).await;
            });
        }
    });
    f
}

// ---------------------------------------------------------------- the tests

/// a. The whole migration through Heat: Heat creates the target stack, the data moves to
/// the target VM under the writer, and the old stack is deleted through Heat at dispose.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heat_migration_moves_the_service_to_a_stack_heat_created_and_deletes_the_old_one() {
    let logs = LogBuf::install();
    let svc = heat_service(70, "hma", Knobs::default()).await;
    let cfg = svc.cfg();
    let provider = Provider::from_config(&cfg).unwrap();
    let (w, started) = svc.writer();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let watch = Watch::default();
    let t = Instant::now();
    let r = machine::migrate(&cfg, &provider, "test", &watch).await;
    let took = t.elapsed();
    let target = watch.target_stack();
    let ledger = finish_writer(w, started).await;
    let report = r.unwrap_or_else(|e| panic!("the migration succeeds: {e}"));
    assert!(report.cutover_done);
    assert_eq!(report.target, svc.dst.influx_url());
    assert_migrated(&svc, &target, &ledger, "heat a").await;
    let j = svc.journal();
    let created = j.iter().find_map(|e| match e {
        Event::StackCreated { target } => Some(target.clone()),
        _ => None,
    });
    let created = created.expect("the target stack is journaled");
    assert_eq!(created.stack.as_ref().unwrap().name, target);
    let outs = created.outputs.unwrap();
    assert_eq!(
        outs.raw["zabbix_host"],
        serde_json::json!(format!("{target}-influxdb")),
        "Heat computed the outputs"
    );
    let text = logs.text();
    for want in [
        "heat: stack create accepted",
        "heat: stack created",
        "heat: stack deleted",
    ] {
        assert!(text.contains(want), "{want:?} in the logs:\n{text}");
    }
    no_secrets(&text, &svc.e, "logs");
    no_secrets(&format!("{j:?}"), &svc.e, "journal");
    measured("heat a", &svc.dst.client(), &ledger, took, "migrated").await;
    svc.cleanup(&[&target, &svc.old.name]).await;
}

/// b. Heat reports CREATE_FAILED (a resource of the target template fails): the
/// migration rolls back before touching any data, the failed stack is deleted, and the
/// error carries Heat's own reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heat_migration_create_failed_rolls_back_with_heats_reason_and_deletes_the_stack() {
    let logs = LogBuf::install();
    let svc = heat_service(
        71,
        "hmb",
        Knobs {
            params: vec![("fail", "true".into())],
            ..Knobs::default()
        },
    )
    .await;
    let cfg = svc.cfg();
    let provider = Provider::from_config(&cfg).unwrap();
    let (w, started) = svc.writer();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let watch = Watch::default();
    let t = Instant::now();
    let err = machine::migrate(&cfg, &provider, "test", &watch)
        .await
        .unwrap_err();
    let took = t.elapsed();
    let target = watch.target_stack();
    let ledger = finish_writer(w, started).await;
    let msg = err.to_string();
    assert!(
        matches!(&err, MachineError::Stack(StackError::CreateFailed { name, .. }) if *name == target),
        "{err:?}"
    );
    assert!(
        msg.contains("Test Resource failed vm") && msg.contains("the stack was deleted"),
        "Heat's reason and the cleanup: {msg}"
    );
    assert_rolled_back_at_create(&svc, &target, &ledger, &err, "heat b").await;
    let text = logs.text();
    assert!(text.contains("heat: create failed"), "{text}");
    no_secrets(&format!("{msg}\n{text}"), &svc.e, "heat b");
    eprintln!("ERROR heat b: {msg}");
    measured("heat b", &svc.src.client(), &ledger, took, "rolled back").await;
    svc.cleanup(&[&svc.old.name]).await;
}

/// c. The create takes longer than `provider.create_timeout` (a resource that waits 300 s
/// against a 5 s timeout): rolled back, the half-made stack deleted, the error says it
/// timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heat_migration_create_timeout_rolls_back_and_deletes_the_half_made_stack() {
    let logs = LogBuf::install();
    let svc = heat_service(
        72,
        "hmc",
        Knobs {
            params: vec![("delay", "300".into())],
            create_timeout: "5s",
            ..Knobs::default()
        },
    )
    .await;
    let cfg = svc.cfg();
    let provider = Provider::from_config(&cfg).unwrap();
    let (w, started) = svc.writer();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let watch = Watch::default();
    let t = Instant::now();
    let err = machine::migrate(&cfg, &provider, "test", &watch)
        .await
        .unwrap_err();
    let took = t.elapsed();
    let target = watch.target_stack();
    let ledger = finish_writer(w, started).await;
    let msg = err.to_string();
    match &err {
        MachineError::Stack(StackError::Timeout {
            name,
            timeout,
            cleanup,
        }) => {
            assert_eq!(name, &target);
            assert_eq!(*timeout, Duration::from_secs(5));
            assert_eq!(cleanup, "it was deleted");
        }
        other => panic!("expected a create timeout, got {other:?}"),
    }
    assert!(msg.contains("not complete within 5s"), "{msg}");
    assert!(
        took >= Duration::from_secs(5) && took < Duration::from_secs(60),
        "bounded by the timeout plus the delete: {took:?}"
    );
    assert_rolled_back_at_create(&svc, &target, &ledger, &err, "heat c").await;
    let text = logs.text();
    assert!(text.contains("heat: create timed out"), "{text}");
    no_secrets(&format!("{msg}\n{text}"), &svc.e, "heat c");
    eprintln!("ERROR heat c: {msg}");
    measured("heat c", &svc.src.client(), &ledger, took, "rolled back").await;
    svc.cleanup(&[&svc.old.name]).await;
}

/// d1. Heat's API answering 500 to everything, then unreachable, while migrations start:
/// the create POST is not retried on a 500 (Heat may have stored it: no double create),
/// a refused connection is retried within `retry_budget`; both fail with a clear
/// transient error and the service stays on the source. Whether Heat stored the stack
/// cannot be known while it fails, so the rollback is settled by the next run once Heat
/// answers (here: `machine::recover` with the healthy endpoint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heat_migration_heat_answering_500_or_unreachable_rolls_back_after_bounded_retries() {
    let logs = LogBuf::install();
    let svc = heat_service(73, "hmd", Knobs::default()).await;
    let healthy = svc.cfg();
    let healthy_provider = Provider::from_config(&healthy).unwrap();
    let (w, started) = svc.writer();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (fake, hits) = fake_server(500).await;
    let faults = [
        // 500 from every Heat request (a fake server speaking Heat's error format).
        ("500", fake),
        // Unreachable: nothing listens on 127.0.0.1:9.
        (
            "unreachable",
            "http://127.0.0.1:9/v1/{project_id}".to_string(),
        ),
    ];
    let mut lines = Vec::new();
    let mut total = Duration::ZERO;
    let mut last = None;
    for (what, endpoint) in faults {
        let mut cfg = svc.cfg();
        let h = cfg.provider.heat.as_mut().unwrap();
        h.endpoint_override = Some(endpoint);
        h.retry_budget = Duration::from_secs(3);
        let provider = Provider::from_config(&cfg).unwrap();
        let watch = Watch::default();
        let t = Instant::now();
        let err = machine::migrate(&cfg, &provider, "test", &watch)
            .await
            .unwrap_err();
        let took = t.elapsed();
        total += took;
        let target = watch.target_stack();
        let msg = err.to_string();
        assert!(
            matches!(&err, MachineError::Stack(e) if e.is_transient()),
            "{what}: {err:?}"
        );
        if what == "500" {
            assert!(
                msg.contains("POST")
                    && msg.contains("answered 500")
                    && msg.contains("fake heat says 500"),
                "{msg}"
            );
        } else {
            assert!(
                msg.contains("POST http://127.0.0.1:9/") && msg.contains("Connection refused"),
                "{msg}"
            );
        }
        // The create's retries (unreachable) and the search for a leftover stack are
        // each bounded by the 3 s budget.
        assert!(
            took < Duration::from_secs(15),
            "{what}: bounded retries: {took:?}"
        );
        assert_eq!(svc.writer_url(), svc.src.influx_url(), "{what}");
        assert!(
            watch
                .lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("may be left behind")),
            "{what}: the unsettled rollback is said"
        );
        // Heat answers again: the rollback is settled, nothing was created.
        assert_eq!(
            machine::recover(&healthy, &healthy_provider, &Watch::default())
                .await
                .unwrap(),
            Some(Outcome::RolledBack),
            "{what}"
        );
        assert_eq!(svc.heat.find(&target).await.unwrap(), None, "{what}");
        lines.push(format!("ERROR heat d ({what}): {msg} [{took:?}]"));
        last = Some((target, err));
    }
    let ledger = finish_writer(w, started).await;
    assert!(hits.load(Ordering::SeqCst) >= 2, "the fake Heat was asked");
    let text = logs.text();
    let retries = text
        .matches("heat: unreachable or failing; retrying")
        .count();
    assert!(
        retries >= 6,
        "bounded retries are logged: {retries}\n{text}"
    );
    assert!(
        text.contains("the failed create may have left the target stack behind"),
        "{text}"
    );
    let (target, err) = last.unwrap();
    assert_rolled_back_at_create(&svc, &target, &ledger, &err, "heat d").await;
    no_secrets(&format!("{lines:?}\n{text}"), &svc.e, "heat d");
    for l in lines {
        eprintln!("{l}");
    }
    measured(
        "heat d",
        &svc.src.client(),
        &ledger,
        total,
        "rolled back twice",
    )
    .await;
    svc.cleanup(&[&svc.old.name]).await;
}

/// d2. Heat answering 500 to its status polls for a while in the middle of the create
/// (a proxy in front of the real Heat): retried with backoff within `retry_budget`, the
/// create completes and so does the migration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heat_migration_heat_500s_while_polling_are_retried_and_the_migration_completes() {
    let logs = LogBuf::install();
    let e = env();
    let flaky = flaky_heat(&e, 4, false).await;
    let svc = heat_service(
        74,
        "hmd2",
        Knobs {
            heat: vec![
                format!("endpoint_override: \"{}\"", flaky.url),
                "retry_budget: 20s".into(),
            ],
            ..Knobs::default()
        },
    )
    .await;
    let cfg = svc.cfg();
    let provider = Provider::from_config(&cfg).unwrap();
    let (w, started) = svc.writer();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let watch = Watch::default();
    let t = Instant::now();
    let r = machine::migrate(&cfg, &provider, "test", &watch).await;
    let took = t.elapsed();
    let target = watch.target_stack();
    let ledger = finish_writer(w, started).await;
    r.unwrap_or_else(|e| panic!("the migration succeeds: {e}"));
    assert_eq!(
        flaky.failed.load(Ordering::SeqCst),
        4,
        "4 polls answered 500"
    );
    assert!(flaky.forwarded.load(Ordering::SeqCst) >= 4);
    assert_migrated(&svc, &target, &ledger, "heat d2").await;
    let text = logs.text();
    let retries = text
        .matches("heat: unreachable or failing; retrying")
        .count();
    assert_eq!(retries, 4, "{text}");
    assert!(
        text.contains("injected by the test's flaky Heat proxy"),
        "{text}"
    );
    no_secrets(&text, &svc.e, "heat d2");
    measured(
        "heat d2",
        &svc.dst.client(),
        &ledger,
        took,
        "migrated after 4 polls answered 500",
    )
    .await;
    svc.cleanup(&[&target, &svc.old.name]).await;
}

/// e. The provider's Keystone token is revoked (what its expiry looks like to Heat) in the
/// middle of the migration, after the target stack was created: the next Heat call (the
/// dispose) is refused with 401, the provider re-authenticates once, and the migration
/// completes with the old stack deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heat_migration_token_revoked_mid_migration_reauthenticates_and_completes() {
    let logs = LogBuf::install();
    let svc = heat_service(75, "hme", Knobs::default()).await;
    let cfg = svc.cfg();
    let provider = Provider::from_config(&cfg).unwrap();
    let Provider::Heat(h) = &provider else {
        panic!("the heat provider")
    };
    let revoked: Mutex<Option<stateshift::util::Secret>> = Mutex::new(None);
    let rt = tokio::runtime::Handle::current();
    let e = &svc.e;
    let watch = Watch {
        hook: Some((
            Phase::Capture,
            Box::new(|| {
                tokio::task::block_in_place(|| {
                    rt.block_on(async {
                        let tok = h.token().await.unwrap();
                        revoke(e, &tok).await;
                        *revoked.lock().unwrap() = Some(tok);
                    })
                })
            }),
        )),
        ..Watch::default()
    };
    let (w, started) = svc.writer();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    let r = machine::migrate(&cfg, &provider, "test", &watch).await;
    let took = t.elapsed();
    let target = watch.target_stack();
    let ledger = finish_writer(w, started).await;
    r.unwrap_or_else(|e| panic!("the migration succeeds: {e}"));
    let revoked = revoked
        .lock()
        .unwrap()
        .clone()
        .expect("revoked mid-migration");
    assert_eq!(h.auth_count(), 2, "exactly one re-authentication");
    assert_ne!(h.token().await.unwrap(), revoked);
    assert_migrated(&svc, &target, &ledger, "heat e").await;
    let text = logs.text();
    assert!(
        text.contains("heat: token refused (401); re-authenticating once"),
        "{text}"
    );
    no_secrets(&text, &svc.e, "heat e");
    assert!(!text.contains(revoked.expose()), "no token in the logs");
    assert!(!text.contains(h.token().await.unwrap().expose()));
    measured(
        "heat e",
        &svc.dst.client(),
        &ledger,
        took,
        "migrated after one re-authentication",
    )
    .await;
    svc.cleanup(&[&target, &svc.old.name]).await;
}

/// d3. Heat answering 500 to everything from verification on (the dispose): the data is
/// verified on the target and the writers stay there; the old stack cannot be deleted,
/// which the error says after bounded retries; once Heat answers again, the recovery
/// finishes the disposal and nothing was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heat_migration_heat_down_at_dispose_keeps_the_verified_target_and_recovery_finishes() {
    let logs = LogBuf::install();
    let e = env();
    let flaky = flaky_heat(&e, 0, false).await;
    let svc = heat_service(
        76,
        "hmd3",
        Knobs {
            heat: vec![
                format!("endpoint_override: \"{}\"", flaky.url),
                "retry_budget: 3s".into(),
            ],
            ..Knobs::default()
        },
    )
    .await;
    let cfg = svc.cfg();
    let provider = Provider::from_config(&cfg).unwrap();
    let fail_all = flaky.fail_all.clone();
    let watch = Watch {
        hook: Some((
            Phase::Verify,
            Box::new(move || fail_all.store(true, Ordering::SeqCst)),
        )),
        ..Watch::default()
    };
    let (w, started) = svc.writer();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t = Instant::now();
    let err = machine::migrate(&cfg, &provider, "test", &watch)
        .await
        .unwrap_err();
    let took = t.elapsed();
    let target = watch.target_stack();
    let msg = err.to_string();
    match &err {
        MachineError::Dispose { target_url, error } => {
            assert_eq!(target_url, &svc.dst.influx_url());
            assert!(error.is_transient(), "{error:?}");
        }
        other => panic!("expected a dispose failure, got {other:?}"),
    }
    assert!(
        msg.contains("the data is verified on")
            && msg.contains("injected by the test's flaky Heat proxy"),
        "{msg}"
    );
    assert!(flaky.failed.load(Ordering::SeqCst) >= 2, "retried");
    // The writers stay on the verified target; the old stack is still in Heat.
    assert_eq!(svc.writer_url(), svc.dst.influx_url());
    assert_eq!(
        svc.heat.find(&svc.old.name).await.unwrap(),
        Some(svc.old.clone())
    );
    source_intact(&svc, "heat d3").await;
    // Heat answers again: the recovery finishes the disposal.
    flaky.fail_all.store(false, Ordering::SeqCst);
    let watch2 = Watch::default();
    let outcome = machine::recover(&cfg, &provider, &watch2).await;
    let ledger = finish_writer(w, started).await;
    assert_eq!(
        outcome.unwrap_or_else(|e| panic!("the recovery finishes the disposal: {e}")),
        Some(Outcome::Succeeded)
    );
    assert_migrated(&svc, &target, &ledger, "heat d3").await;
    let text = logs.text();
    no_secrets(&format!("{msg}\n{text}"), &svc.e, "heat d3");
    eprintln!("ERROR heat d3: {msg}");
    measured(
        "heat d3",
        &svc.dst.client(),
        &ledger,
        took,
        "verified; dispose failed, finished by the recovery",
    )
    .await;
    svc.cleanup(&[&target, &svc.old.name]).await;
}

/// d4. Heat goes down (500 to everything) right after it accepted the target's create:
/// the provider's polls fail after bounded retries and so does its own cleanup, so the
/// stack may be left in Heat. The migration rolls back the data side at once (nothing
/// was touched) and leaves the journal unsettled; once Heat answers again, the recovery
/// finds the stack by name and deletes it: nothing leaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heat_migration_heat_down_mid_create_leaves_no_stack_once_heat_is_back() {
    let logs = LogBuf::install();
    let e = env();
    let flaky = flaky_heat(&e, 0, true).await;
    let svc = heat_service(
        77,
        "hmd4",
        Knobs {
            params: vec![("delay", "2".into())],
            heat: vec![
                format!("endpoint_override: \"{}\"", flaky.url),
                "retry_budget: 2s".into(),
                "delete_timeout: 5s".into(),
            ],
            ..Knobs::default()
        },
    )
    .await;
    let cfg = svc.cfg();
    let provider = Provider::from_config(&cfg).unwrap();
    let (w, started) = svc.writer();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let watch = Watch::default();
    let t = Instant::now();
    let err = machine::migrate(&cfg, &provider, "test", &watch)
        .await
        .unwrap_err();
    let took = t.elapsed();
    let target = watch.target_stack();
    let msg = err.to_string();
    assert!(
        matches!(&err, MachineError::Stack(e) if e.is_transient()),
        "{err:?}"
    );
    assert!(
        msg.contains("injected by the test's flaky Heat proxy")
            && msg.contains("may be left behind as")
            && msg.contains(&target),
        "{msg}"
    );
    assert!(
        took < Duration::from_secs(30),
        "bounded by the retry budgets: {took:?}"
    );
    assert_eq!(svc.writer_url(), svc.src.influx_url(), "not repointed");
    assert!(
        svc.heat.find(&target).await.unwrap().is_some(),
        "Heat went on creating the stack it had accepted"
    );
    // Heat answers again: the next run (here: the recovery) deletes it by name.
    flaky.fail_all.store(false, Ordering::SeqCst);
    let outcome = machine::recover(&cfg, &provider, &Watch::default()).await;
    let ledger = finish_writer(w, started).await;
    assert_eq!(
        outcome.unwrap_or_else(|e| panic!("the recovery settles the rollback: {e}")),
        Some(Outcome::RolledBack)
    );
    assert_eq!(svc.heat.find(&target).await.unwrap(), None, "nothing leaks");
    assert_nothing_lost(&svc.src.client(), &ledger, SEEDED, "heat d4").await;
    source_intact(&svc, "heat d4").await;
    assert_eq!(
        svc.heat.find(&svc.old.name).await.unwrap(),
        Some(svc.old.clone())
    );
    let text = logs.text();
    no_secrets(&format!("{msg}\n{text}"), &svc.e, "heat d4");
    eprintln!("ERROR heat d4: {msg}");
    measured(
        "heat d4",
        &svc.src.client(),
        &ledger,
        took,
        "rolled back; the stack Heat kept creating deleted by the recovery",
    )
    .await;
    svc.cleanup(&[&target, &svc.old.name]).await;
}
