//! An operator's abort (`stateshift abort`, `POST /migrate/abort`, Ctrl-C on `stateshift
//! migrate`): before the cutover it rolls back exactly as a failure would (nothing lost,
//! the target removed, the source as before); past it, it is refused with the reason.
//! Tried at every phase of real migrations between local stacks under a live writer.

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stateshift::influx::Influx;
use stateshift::migrate::abort::{Abort, Refused};
use stateshift::migrate::engine::{Phase, Progress};
use stateshift::migrate::journal::Outcome;
use stateshift::migrate::machine::{self, MachineError, Provider};

use crate::common::*;
use crate::orchestrator::{assert_nothing_lost, migrate_cli, service, service_seeded, Svc};

/// Where in a migration the test asks for the abort.
#[derive(Debug, Clone, Copy, PartialEq)]
enum At {
    /// While the target stack is being created (before the data engine runs).
    StackCreation,
    /// As this engine phase starts, `after` into it.
    Phase(Phase, Duration),
    /// In this phase, once an `influxd backup` or `influxd restore` naming this path runs.
    Command(Phase, &'static str),
    /// While an earlier, interrupted migration is settled before this one.
    Settling,
}

/// Progress that asks for the abort at `at` and keeps the answer.
struct AbortAt {
    at: At,
    abort: Abort,
    answer: Arc<Mutex<Option<Result<(), Refused>>>>,
}

impl AbortAt {
    fn fire(&self, after: Duration) {
        let (abort, answer) = (self.abort.clone(), self.answer.clone());
        if after.is_zero() {
            *answer.lock().unwrap() = Some(abort.request("the abort test"));
            return;
        }
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            *answer.lock().unwrap() = Some(abort.request("the abort test"));
        });
    }
}

impl Progress for AbortAt {
    fn phase_started(&self, phase: Phase) {
        match self.at {
            At::Phase(p, after) if p == phase => self.fire(after),
            At::Command(p, path) if p == phase => {
                let (abort, answer) = (self.abort.clone(), self.answer.clone());
                tokio::spawn(async move {
                    let pattern = format!(
                        "influxd (backup|restore) .*{}",
                        stateshift::util::regex_quote(path)
                    );
                    let t = Instant::now();
                    while t.elapsed() < Duration::from_secs(30) {
                        let found = Command::new("pgrep")
                            .args(["-f", "--", &pattern])
                            .stdout(Stdio::null())
                            .status()
                            .is_ok_and(|s| s.success());
                        if found {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    *answer.lock().unwrap() = Some(abort.request("the abort test"));
                });
            }
            _ => {}
        }
    }
    fn note(&self, msg: &str) {
        if self.at == At::StackCreation && msg.starts_with("creating the target stack") {
            self.fire(Duration::from_millis(200));
        }
        if self.at == At::Settling && msg.starts_with("recovering migration") {
            self.fire(Duration::ZERO);
        }
    }
}

/// The stateshift subscriptions on an InfluxDB (a capture or watch left behind).
async fn our_subscriptions(on: &Influx) -> Vec<String> {
    on.subscriptions()
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.name.starts_with("stateshift_"))
        .map(|s| s.name)
        .collect()
}

/// One migration with an abort at `at`; asserts it rolled back cleanly.
async fn abort_rolls_back(svc: &Svc, at: At) {
    let cfg = svc.cfg();
    let provider = Provider::from_config(&cfg).unwrap();
    let source_url = std::fs::read_to_string(&svc.url_file).unwrap();
    let p = AbortAt {
        at,
        abort: Abort::new(),
        answer: Arc::default(),
    };
    let r = machine::migrate_abortable(&cfg, &provider, "abort test", &p, &p.abort).await;
    let what = format!("{at:?}");
    assert_eq!(
        *p.answer.lock().unwrap(),
        Some(Ok(())),
        "{what}: the abort was accepted"
    );
    let e = match r {
        Err(e) => e,
        Ok(rep) => panic!("{what}: the migration went on to succeed: {rep:?}"),
    };
    assert!(matches!(e, MachineError::RolledBack { .. }), "{what}: {e}");
    assert_eq!(e.aborted_by(), Some("the abort test"), "{what}: {e}");
    assert!(e.to_string().contains("aborted by the abort test"), "{e}");
    if let At::Phase(phase, after) = at {
        if after.is_zero() {
            assert_eq!(e.phase(), Some(phase), "{what}: stopped where asked: {e}");
        }
    }
    // Journaled: rolled back, by whom; nothing left to settle.
    let st = machine::state(&cfg).unwrap();
    let last = st.migrations.last().unwrap();
    assert_eq!(last.outcome, Some(Outcome::RolledBack), "{what}");
    assert_eq!(last.aborted_by.as_deref(), Some("the abort test"), "{what}");
    assert!(!last.cutover_started, "{what}: never repointed");
    assert_eq!(
        st.recovery(),
        stateshift::migrate::journal::Recovery::Nothing,
        "{what}"
    );
    // The target stack is gone, the service and its writers stay on the source, which
    // keeps no capture subscription.
    assert_eq!(
        svc.stacks_on_disk(),
        vec!["svc-influx-0".to_string()],
        "{what}"
    );
    assert_eq!(
        std::fs::read_to_string(&svc.url_file).unwrap(),
        source_url,
        "{what}: writers stay on the source"
    );
    assert_eq!(
        machine::current_source(&cfg, &st).influx_url,
        cfg.source.influx_url,
        "{what}"
    );
    let src = Influx::new(&source_url, None, None, Duration::from_secs(30));
    assert_eq!(
        our_subscriptions(&src).await,
        Vec::<String>::new(),
        "{what}"
    );
}

/// Every phase before the cutover, at its start: the step never runs, the rollback
/// undoes what the earlier ones made. Then the same service migrates, and an abort
/// asked for as verification starts (past the cutover) is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_at_every_phase_before_cutover_rolls_back_and_past_it_is_refused() {
    let svc = service(120).await;
    let w = svc.writer(500);
    tokio::time::sleep(Duration::from_millis(300)).await;
    abort_rolls_back(&svc, At::StackCreation).await;
    for phase in [
        Phase::Prepare,
        Phase::Capture,
        Phase::Dump,
        Phase::Transfer,
        Phase::Restore,
        Phase::Delta,
        Phase::Cutover,
    ] {
        abort_rolls_back(&svc, At::Phase(phase, Duration::ZERO)).await;
    }
    // Past the cutover: refused, with the reason, and the migration finishes.
    let cfg = svc.cfg();
    let provider = Provider::from_config(&cfg).unwrap();
    let p = AbortAt {
        at: At::Phase(Phase::Verify, Duration::ZERO),
        abort: Abort::new(),
        answer: Arc::default(),
    };
    let rep = machine::migrate_abortable(&cfg, &provider, "abort test", &p, &p.abort)
        .await
        .unwrap();
    assert_eq!(
        *p.answer.lock().unwrap(),
        Some(Err(Refused::PastCutover)),
        "an abort past the cutover is refused"
    );
    assert!(rep.cutover_done);
    let st = machine::state(&cfg).unwrap();
    let last = st.migrations.last().unwrap();
    assert_eq!(last.outcome, Some(Outcome::Succeeded));
    assert_eq!(last.aborted_by, None);
    let stacks = svc.stacks_on_disk();
    assert_eq!(stacks.len(), 1);
    assert_ne!(stacks[0], "svc-influx-0", "the service moved");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ledger = w.finish().await;
    assert_nothing_lost(&svc.current(), &ledger, 5_000, "abort at every phase").await;
}

/// Processes on this machine whose command line names `text`.
fn processes_naming(text: &str) -> Vec<String> {
    let out = Command::new("pgrep")
        .args(["-a", "-f", "--"])
        .arg(stateshift::util::regex_quote(text))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect()
}

/// An abort in the middle of the dump and of the restore (a bigger database, so each
/// runs long enough): the command running on the host is stopped too, its scratch
/// directory removed, and nothing half-restored stays on the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_in_the_middle_of_a_command_stops_it_on_the_host() {
    let svc = service_seeded(121, 300_000).await;
    let w = svc.writer(300);
    let dir: &'static str = Box::leak(svc.dir().display().to_string().into_boxed_str());
    for phase in [Phase::Dump, Phase::Restore] {
        // The `forward` transfer runs `influxd backup` and `influxd restore` on the hosts;
        // the default (`shards`) runs nothing there.
        let mut cfg = svc.cfg();
        cfg.migration.transfer = stateshift::config::TransferMode::Forward;
        let provider = Provider::from_config(&cfg).unwrap();
        let p = AbortAt {
            at: At::Command(phase, dir),
            abort: Abort::new(),
            answer: Arc::default(),
        };
        let t = Instant::now();
        let e = machine::migrate_abortable(&cfg, &provider, "abort test", &p, &p.abort)
            .await
            .unwrap_err();
        assert_eq!(e.aborted_by(), Some("the abort test"), "{phase}: {e}");
        assert_eq!(
            e.phase(),
            Some(phase),
            "{phase}: cut short in the middle: {e}"
        );
        let id = machine::state(&cfg)
            .unwrap()
            .migrations
            .last()
            .unwrap()
            .id
            .clone();
        // The scratch directories name the migration id: nothing using one is left.
        assert_eq!(
            processes_naming(&format!("-{id}")),
            Vec::<String>::new(),
            "{phase}: the cut-short command was stopped"
        );
        assert_eq!(svc.stacks_on_disk(), vec!["svc-influx-0".to_string()]);
        eprintln!("abort during {phase}: rolled back in {:?}", t.elapsed());
    }
    let ledger = w.finish().await;
    let src = Influx::new(
        &std::fs::read_to_string(&svc.url_file).unwrap(),
        None,
        None,
        Duration::from_secs(30),
    );
    assert_nothing_lost(&src, &ledger, 300_000, "abort mid-command").await;
}

/// A migration asked for while an interrupted one waits to be settled settles that one
/// first, as its journal says, and then stops. An abort during the settling was answered
/// "accepted: rolls back" and dropped (found on a read of `machine::migrate_holding`);
/// it is refused now, saying why, and the settling goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_while_an_interrupted_migration_is_settled_is_refused_saying_why() {
    let svc = service(124).await;
    let cfg = svc.cfg();
    let provider = Provider::from_config(&cfg).unwrap();
    // Interrupted before the cutover (settled by a rollback), and after the verify
    // (settled by finishing it).
    for (crash, settled_as) in [
        ("restore:done", Outcome::RolledBack),
        ("verify:done", Outcome::Succeeded),
    ] {
        let (ok, out) = migrate_cli(&svc, Some(crash));
        assert!(!ok, "{crash}: {out}");
        let p = AbortAt {
            at: At::Settling,
            abort: Abort::new(),
            answer: Arc::default(),
        };
        let r = machine::migrate_abortable(&cfg, &provider, "abort test", &p, &p.abort).await;
        assert_eq!(
            *p.answer.lock().unwrap(),
            Some(Err(Refused::Settling)),
            "{crash}"
        );
        assert!(
            Refused::Settling.to_string().contains("being settled"),
            "the refusal says why"
        );
        match r {
            Err(MachineError::Settled { .. }) => {}
            other => panic!("{crash}: the run settles and stops: {other:?}"),
        }
        let st = machine::state(&cfg).unwrap();
        assert_eq!(
            st.migrations.last().unwrap().outcome,
            Some(settled_as),
            "{crash}"
        );
    }
}

/// `stateshift migrate` interrupted by Ctrl-C (SIGINT) during the dump rolls back; and a
/// crash right after the abort was journaled is settled by the next run as a rollback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_aborts_a_cli_migration_and_a_crash_after_the_abort_still_rolls_back() {
    let svc = service(122).await;
    let w = svc.writer(500);
    let cfg = svc.cfg();
    for crash in [None, Some("abort_requested")] {
        let mut c = Command::new(bin());
        c.args(["migrate", "--yes", "--json", "-c"])
            .arg(&svc.cfg_path)
            .env("STATESHIFT_FAULT", "hold:dump")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(p) = crash {
            c.env("STATESHIFT_CRASH_AT", p);
        }
        let child = c.spawn().unwrap();
        // Wait until the journal says the dump started (it is held there 3 s).
        let t = Instant::now();
        loop {
            let st = machine::state(&cfg).unwrap();
            if st
                .migrations
                .last()
                .is_some_and(|m| m.outcome.is_none() && m.current_phase == Some(Phase::Dump))
            {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "the dump never started"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let pid = child.id().to_string();
        assert!(Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success());
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{text}");
        assert!(text.contains("aborting: rolling back"), "{text}");
        match crash {
            None => {
                assert!(text.contains("dump: aborted by an operator"), "{text}");
                // `--json`: stdout is the outcome alone.
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                assert_eq!(v["outcome"], "rolled_back", "{v}");
                assert_eq!(v["phase"], "dump", "{v}");
                assert_eq!(
                    v["aborted_by"], "an operator (a signal to stateshift migrate)",
                    "{v}"
                );
                assert_eq!(v["service_runs_on"], cfg.source.influx_url.as_str(), "{v}");
                assert!(text.contains("rolled back"), "{text}");
                assert_eq!(svc.stacks_on_disk(), vec!["svc-influx-0".to_string()]);
            }
            Some(_) => {
                assert!(text.contains("dying here"), "{text}");
                // The next run settles it: a rollback, as the abort asked.
                let (ok, settled) = migrate_cli(&svc, None);
                assert!(
                    !ok && settled.contains("was found and rolled back"),
                    "{settled}"
                );
                assert_eq!(svc.stacks_on_disk(), vec!["svc-influx-0".to_string()]);
            }
        }
        let st = machine::state(&cfg).unwrap();
        let last = st.migrations.last().unwrap();
        assert_eq!(last.outcome, Some(Outcome::RolledBack), "{text}");
        assert!(last.aborted_by.is_some(), "the abort is journaled");
    }
    let ledger = w.finish().await;
    let src = Influx::new(
        &std::fs::read_to_string(&svc.url_file).unwrap(),
        None,
        None,
        Duration::from_secs(30),
    );
    assert_nothing_lost(&src, &ledger, 5_000, "ctrl-c abort").await;
}

/// `POST /migrate/abort` and `stateshift abort` against a daemon: refused without the
/// token and when nothing runs; during a migration accepted, and the CLI waits for the
/// rollback; past the cutover refused with the reason, and the migration finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_aborts_on_request_before_cutover_and_refuses_past_it() {
    let svc = service(123).await;
    let w = svc.writer(500);
    let port = server_port();
    let api = format!("http://127.0.0.1:{port}");
    let mut daemon = Command::new(bin())
        .args(["daemon", "-c"])
        .arg(&svc.cfg_path)
        .env("STATESHIFT__API__LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "STATESHIFT_FAULT",
            "hold:target_stack,hold:restore,hold:verify",
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _kill = KillOnDrop(daemon.id());
    let http = reqwest::Client::new();
    let status = || async {
        match http.get(format!("{api}/status")).send().await {
            Ok(r) => r.json::<serde_json::Value>().await.ok(),
            Err(_) => None,
        }
    };
    let t = Instant::now();
    while status().await.is_none() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the daemon never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let abort_post = |token: Option<&'static str>| {
        let mut r = http.post(format!("{api}/migrate/abort"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    assert_eq!(abort_post(None).await.unwrap().status(), 401);
    let r = abort_post(Some(crate::orchestrator::TOKEN)).await.unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(r.text().await.unwrap(), "no migration is running\n");
    let cli = |args: &[&str]| {
        let out = Command::new(bin())
            .args(args)
            .arg("-c")
            .arg(&svc.cfg_path)
            .args(["--url", &api])
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let wait_phase = |phase: &'static str| async move {
        let t = Instant::now();
        loop {
            if let Some(st) = status().await {
                if st["state"] == "migrating" && st["phase"] == phase {
                    return;
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "never reached {phase}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    // From the page's button, before the cutover: the token and a confirmation, then
    // accepted, and the page shows the rollback.
    let driver = crate::page::Driver::start().await;
    let b = crate::page::Browser::open(&driver).await;
    b.cmd(
        reqwest::Method::POST,
        "/url",
        serde_json::json!({"url": format!("{api}/")}),
    )
    .await;
    b.wait_text("state", "idle", |t| t == "idle").await;
    assert_eq!(
        b.js("return document.getElementById('abort').disabled")
            .await,
        true,
        "nothing to abort while idle"
    );
    let (ok, out) = cli(&["trigger"]);
    assert!(ok, "{out}");
    // While its target stack is created (3 s here, minutes on a cloud), before any
    // phase: the migration is listed, saying what it does.
    let t = Instant::now();
    let creating = loop {
        if let Some(st) = status().await {
            let last = st["migrations"].as_array().and_then(|m| m.last()).cloned();
            if let Some(m) = last.filter(|m| m["creating"].is_string()) {
                break (st, m);
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the migration was never listed while its stack was created"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (st, m) = creating;
    assert_eq!(st["state"], "migrating", "{st:#}");
    assert_eq!(st["phase"], serde_json::Value::Null, "{st:#}");
    assert_eq!(m["outcome"], serde_json::Value::Null, "{st:#}");
    assert_eq!(m["target"], serde_json::Value::Null, "{st:#}");
    assert_eq!(m["phases"], serde_json::json!([]), "{st:#}");
    let stack = m["creating"].as_str().unwrap_or_default().to_string();
    assert!(stack.starts_with("svc-influx-"), "{st:#}");
    // The page draws that status (drawn here, not left to the page's 2 s refresh,
    // which may miss the hold on a loaded machine).
    let want = format!("running (creating the target stack {stack})");
    let shown = drawn(&b, &st, |t| t.contains(&want)).await;
    assert!(shown.contains(&want), "{shown}");
    // The same entry, once the daemon no longer runs it, is not said to be running.
    let mut idle = st.clone();
    idle["state"] = "polling".into();
    let not_ours = |t: &str| t.contains("not run by this daemon: a CLI's, or interrupted");
    let shown = drawn(&b, &idle, not_ours).await;
    assert!(not_ours(&shown) && !shown.contains("running ("), "{shown}");
    wait_phase("restore").await;
    b.wait_text("phase", "the restore on the page", |t| {
        t == "phase: restore"
    })
    .await;
    b.click("#abort").await;
    assert!(b.dialog().await.contains("API token"));
    b.answer(Some(crate::orchestrator::TOKEN), true).await;
    assert!(b.dialog().await.starts_with("Abort the running migration?"));
    b.answer(None, true).await;
    b.wait_text("note", "accepted", |t| t == "abort accepted: rolling back")
        .await;
    b.wait_text("migrations", "the rollback", |t| {
        t.contains("rolled_back: restore: aborted by an operator (POST /migrate/abort)")
    })
    .await;
    assert_eq!(svc.stacks_on_disk(), vec!["svc-influx-0".to_string()]);

    // From the CLI, before the cutover: accepted; it waits for the rollback and says so.
    let (ok, out) = cli(&["trigger"]);
    assert!(ok, "{out}");
    wait_phase("restore").await;
    let (ok, out) = cli(&["abort"]);
    assert!(ok, "{out}");
    assert!(out.contains("abort accepted"), "{out}");
    assert!(
        out.contains("rolled back (restore: aborted by an operator"),
        "{out}"
    );
    assert_eq!(svc.stacks_on_disk(), vec!["svc-influx-0".to_string()]);
    let st = status().await.unwrap();
    let last = st["migrations"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["outcome"], "rolled_back");
    assert_eq!(last["aborted_by"], "an operator (POST /migrate/abort)");
    assert_eq!(st["migrations"].as_array().unwrap().len(), 2);
    // Past the cutover: refused with the reason; the migration succeeds.
    let (ok, out) = cli(&["trigger"]);
    assert!(ok, "{out}");
    wait_phase("verify").await;
    b.wait_text("phase", "the verify on the page", |t| t == "phase: verify")
        .await;
    assert_eq!(
        b.js("return document.getElementById('abort').disabled")
            .await,
        true,
        "the page offers no abort past the cutover"
    );
    let (ok, out) = cli(&["abort"]);
    assert!(!ok, "{out}");
    assert!(out.contains("409"), "{out}");
    assert!(out.contains("past its cutover"), "{out}");
    let t = Instant::now();
    let st = loop {
        let st = status().await.unwrap();
        if st["state"] != "migrating" && st["migrations"].as_array().unwrap().len() == 3 {
            break st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "never finished: {st}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let last = st["migrations"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["outcome"], "succeeded", "{st}");
    let metrics = http
        .get(format!("{api}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("stateshift_migrations_total{outcome=\"aborted\"} 2"),
        "{metrics}"
    );
    b.close().await;
    let _ = daemon.kill();
    let _ = daemon.wait();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ledger = w.finish().await;
    assert_nothing_lost(&svc.current(), &ledger, 5_000, "daemon abort").await;
}

/// The migrations table as the page draws `status`: drawn again (up to three times)
/// should the page's own refresh have drawn the live status in between.
async fn drawn(
    b: &crate::page::Browser,
    status: &serde_json::Value,
    check: impl Fn(&str) -> bool,
) -> String {
    let mut shown = String::new();
    for _ in 0..3 {
        b.js(&format!("render({status}); return true")).await;
        shown = b.text_of("migrations").await;
        if check(&shown) {
            break;
        }
    }
    shown
}

/// Kills a process when dropped (a failed assertion must not leave a daemon running).
struct KillOnDrop(u32);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-9", &self.0.to_string()])
            .status();
    }
}

/// On a target that is not a stack (a static one, which nothing deletes whole), an abort
/// in the middle of `influxd restore` stops that command on the target host before the
/// rollback drops the half-restored database: left running, it would recreate the
/// database after the drop, and the next migration would find the target not empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_during_a_restore_on_a_static_target_leaves_nothing_there() {
    use stateshift::migrate::engine::{self, RunOptions, Unjournaled};
    let lab = lab(Default::default()).await;
    let (_, mut cfg) = lab.write_config("").unwrap();
    cfg.migration.transfer = stateshift::config::TransferMode::Forward;
    let seeded = seed(&lab, "cyclops", 300_000).await;
    let target = cfg.target.clone().unwrap();
    let dir: &'static str = Box::leak(lab.dir.display().to_string().into_boxed_str());
    let p = AbortAt {
        at: At::Command(Phase::Restore, dir),
        abort: Abort::new(),
        answer: Arc::default(),
    };
    let id = format!("{}", stateshift::util::now_ms());
    let (e, report) = engine::run_with(
        &cfg,
        &target,
        &p,
        &Unjournaled,
        RunOptions {
            id: Some(id.clone()),
            abort: Some(p.abort.clone()),
            ..RunOptions::default()
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            e,
            engine::MigrateError::Aborted {
                phase: Phase::Restore,
                ..
            }
        ),
        "{e}"
    );
    assert!(!report.cutover_done);
    // Long enough for a restore left running to have finished and recreated it.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(processes_naming(&format!("-{id}")), Vec::<String>::new());
    let dst = lab.target.client();
    assert!(
        !dst.databases()
            .await
            .unwrap()
            .contains(&"cyclops".to_string()),
        "the half-restored database is gone and stays gone"
    );
    assert_eq!(
        our_subscriptions(&lab.source.client()).await,
        Vec::<String>::new()
    );
    // The source is as before, and a migration now finds an empty target.
    let n = counts(&lab.source.client(), "cyclops").await;
    assert_eq!(
        n.iter()
            .filter(|(m, _)| m.starts_with("usage"))
            .map(|(_, n)| n)
            .sum::<u64>(),
        seeded
    );
    engine::run(&cfg, &target, &Quiet)
        .await
        .expect("the next migration finds the target empty");
}
