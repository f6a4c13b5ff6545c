//! The fault matrix on the data path (issue 6): each test injects one fault into a real
//! migration between local stacks under a live writer and checks that the service either
//! stays on the old instance or completes on the new one, that no acknowledged point is
//! lost (the writer's own ledger and the seeded count), that the old stack survives until
//! verification, and that the error names the fault. RELIABILITY.md has one row per test.
//!
//! Faults are real where they can be: processes are killed with signals, connections cut
//! by killing the sshd serving them, disks filled. Two hooks help place them in time:
//! `STATESHIFT_FAULT=hold:<phase>` (the engine waits 3 s right after that phase starts;
//! `hold:subscribing`: after the capture's counters are read, before its subscriptions
//! are made) and `STATESHIFT_FAULT=capture_receiver_killed` (the in-process capture receiver is
//! aborted when the dump starts, as if it had crashed).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::kit::workload::{self, Ledger};
use stateshift::influx::Influx;

use crate::common::*;
use crate::orchestrator::{
    assert_nothing_lost, migrate_cli, reliability_line, service, service_seeded, Svc,
};

const ORIGINAL: &str = "svc-influx-0";

/// `stateshift migrate` started in the background with extra environment.
fn spawn_migrate(svc: &Svc, env: &[(&str, &str)]) -> Child {
    let mut c = Command::new(bin());
    c.args(["migrate", "--yes", "-c"]).arg(&svc.cfg_path);
    for (k, v) in env {
        c.env(k, v);
    }
    c.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) -> (bool, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn journal(svc: &Svc) -> String {
    std::fs::read_to_string(svc.dir().join("state/svc.journal")).unwrap_or_default()
}

/// Wait until the journal holds `needle` (e.g. `"phase":"restore"`).
fn wait_journal(svc: &Svc, needle: &str) {
    let t = Instant::now();
    while !journal(svc).contains(needle) {
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "the migration never reached {needle}:\n{}",
            journal(svc)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn stack_dir(svc: &Svc, name: &str) -> PathBuf {
    svc.dir().join("local/stacks").join(name)
}

/// The stack the running migration created.
fn new_stack(svc: &Svc) -> PathBuf {
    let t = Instant::now();
    loop {
        if let Some(n) = svc.stacks_on_disk().into_iter().find(|n| n != ORIGINAL) {
            return stack_dir(svc, &n);
        }
        assert!(t.elapsed() < Duration::from_secs(30), "no target stack");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Pids of the live processes named `exe` whose command line mentions `dir/`.
fn pids_of(exe: &str, dir: &Path) -> Vec<u32> {
    let needle = format!("{}/", dir.display());
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.split(' ').next().is_some_and(|a| a.ends_with(exe)) && cmd.contains(&needle) {
            out.push(pid);
        }
    }
    out
}

fn kill(sig: &str, pid: u32) {
    let _ = Command::new("kill").args([sig, &pid.to_string()]).status();
}

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

fn source_influx(svc: &Svc) -> Influx {
    Influx::new(
        &std::fs::read_to_string(&svc.url_file).unwrap(),
        None,
        None,
        Duration::from_secs(30),
    )
}

/// A rolled-back migration: the CLI failed naming the rollback and `want`, the original
/// stack is still there and is the only one, and the writers still use it.
fn assert_rolled_back(svc: &Svc, ok: bool, out: &str, want: &[&str]) {
    assert!(!ok, "the migration must fail: {out}");
    assert!(
        out.contains("rolled back, the service stays on"),
        "a rollback: {out}"
    );
    for w in want {
        assert!(out.contains(w), "the error names {w:?}: {out}");
    }
    assert_eq!(
        svc.stacks_on_disk(),
        vec![ORIGINAL.to_string()],
        "the failed target is deleted and the original kept"
    );
    let url = std::fs::read_to_string(&svc.url_file).unwrap();
    assert!(
        journal(svc).contains(&format!("\"influx_url\":\"{url}\"")),
        "writers still point at the original"
    );
}

/// After a rollback: a migration with no fault moves everything.
async fn retry_succeeds(svc: &Svc, what: &str) {
    let (ok, out) = migrate_cli(svc, None);
    assert!(ok, "{what}: the retry migrates: {out}");
    let left = svc.stacks_on_disk();
    assert_eq!(left.len(), 1, "{what}: {left:?}");
    assert_ne!(left[0], ORIGINAL, "{what}: the original is disposed of");
}

async fn lost_nothing(svc: &Svc, ledger: &Ledger, seeded: u64, what: &str) {
    assert!(ledger.points_acked > 0, "{what}: the writer wrote");
    assert_nothing_lost(&svc.current(), ledger, seeded, what).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_sshd_cut_during_the_dump_rolls_back_and_a_retry_migrates() {
    let seeded = 300_000;
    let svc = service_seeded(80, seeded).await;
    let w = svc.writer(1000);
    let sshd_pid: u32 = std::fs::read_to_string(stack_dir(&svc, ORIGINAL).join("vm/sshd.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let child = spawn_migrate(&svc, &[]);
    wait_journal(&svc, "\"phase\":\"dump\"");
    // Every SSH session to the source dies (its sshd children); the listener stays, as
    // after a network cut that the server noticed.
    let cut = Command::new("pkill")
        .args(["-KILL", "-P", &sshd_pid.to_string()])
        .status()
        .unwrap();
    assert!(cut.success(), "there were SSH sessions to cut");
    let (ok, out) = finish(child);
    assert_rolled_back(
        &svc,
        ok,
        &out,
        &["dump", "SSH connection to the source", "was lost"],
    );
    retry_succeeds(&svc, "ssh cut").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    lost_nothing(&svc, &w.finish().await, seeded, "ssh cut").await;
}

/// Kill the target's influxd while the migration holds in `phase`.
async fn target_killed_in(phase: &str, subnet: u8) {
    let svc = service(subnet).await;
    let w = svc.writer(1000);
    let child = spawn_migrate(&svc, &[("STATESHIFT_FAULT", &format!("hold:{phase}"))]);
    wait_journal(&svc, &format!("\"phase\":\"{phase}\""));
    let target = new_stack(&svc);
    let pids = pids_of("influxd", &target);
    assert_eq!(pids.len(), 1, "one target influxd: {pids:?}");
    kill("-KILL", pids[0]);
    let (ok, out) = finish(child);
    assert_rolled_back(&svc, ok, &out, &[&format!("{phase}:")]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ledger = w.finish().await;
    assert_nothing_lost(&source_influx(&svc), &ledger, 5_000, phase).await;
    assert!(ledger.points_acked > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_influxd_killed_during_the_restore_rolls_back_losing_nothing() {
    target_killed_in("restore", 81).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_influxd_killed_during_the_delta_rolls_back_losing_nothing() {
    target_killed_in("delta", 82).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_capture_receiver_is_detected_and_rolls_back_losing_nothing() {
    let svc = service(83).await;
    let w = svc.writer(1000);
    let child = spawn_migrate(
        &svc,
        &[("STATESHIFT_FAULT", "capture_receiver_killed,hold:delta")],
    );
    let (ok, out) = finish(child);
    assert_rolled_back(
        &svc,
        ok,
        &out,
        &["failed to forward", "the capture cannot be proven complete"],
    );
    retry_succeeds(&svc, "receiver killed").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    lost_nothing(&svc, &w.finish().await, 5_000, "receiver killed").await;
}

/// InfluxDB 1.x's subscriber service can miss a subscription change made right after
/// another: it asks for its next metadata change only after the last one is taken up, so
/// a change in between goes unseen until the next (`services/subscriber/service.go`,
/// `waitForMetaUpdates`). Found by the daemon crash campaign in CI (seed
/// 6135542998407478606, kill 8): "only 1 of 2 subscriptions became live within 10s",
/// rolled back. The race cannot be placed on cue, so the faults play it once per side:
/// `subscription_unseen` leaves the last subscription out of the first round, on the
/// source (the capture) and on the target (the watch at cutover), and `drop_unseen`
/// leaves the last DROP out when the capture, writes having reached the source while it
/// subscribed (the first round waits 2 s under 1,000 writes/s), makes its subscriptions
/// again: to the engine, the same as a change the server missed. Before: rolled back
/// after 10 s ("only 0 of 1 subscriptions became live", checked). Now each is made (or
/// made and dropped) again after 2 s; the migration completes and nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_change_the_server_missed_is_made_again() {
    let svc = service(97).await;
    let w = svc.writer(1000);
    let child = spawn_migrate(
        &svc,
        &[
            ("STATESHIFT_FAULT", "subscription_unseen,drop_unseen"),
            ("RUST_LOG", "stateshift=warn"),
        ],
    );
    let (ok, out) = finish(child);
    assert!(ok, "the migration completes: {out}");
    for side in ["on_source=true", "on_source=false"] {
        assert!(
            out.lines()
                .any(|l| l.contains("subscriptions not live yet: made again") && l.contains(side)),
            "made again ({side}): {out}"
        );
    }
    // The source's DROP when the capture starts afresh, the target's watch at disposal.
    for side in ["on_source=true", "on_source=false"] {
        assert!(
            out.lines().any(|l| l
                .contains("dropped subscriptions still running: made and dropped again")
                && l.contains(side)),
            "dropped again ({side}): {out}"
        );
    }
    // The watch subscription the server missed dropping would forward every write of the
    // new production server to a receiver that is gone, until its next metadata change.
    let running = running_subscribers(&svc.current()).await;
    assert!(
        running.is_empty(),
        "the new production server runs no subscription after the migration: {running:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    lost_nothing(
        &svc,
        &w.finish().await,
        5_000,
        "subscription changes unseen",
    )
    .await;
}

/// The subscriptions a server runs, from its `/debug/vars` (`subscriber:db:rp:name`;
/// not the destination, which holds the receiver's secret).
async fn running_subscribers(influx: &Influx) -> Vec<String> {
    let vars = influx.debug_vars().await.unwrap();
    vars.as_object()
        .unwrap()
        .keys()
        .filter(|k| k.starts_with("subscriber:"))
        .map(|k| k.split(":http").next().unwrap_or(k).to_string())
        .collect()
}

/// The crash recovery drops the killed run's capture subscription as the engine does:
/// watched until the server runs it no more, and made and dropped again when the server
/// missed the DROP. Until stop 38 it sent one DROP and went on, and a DROP the server
/// missed left the live source forwarding every write to the dead process's receiver,
/// each a failed forward counted against the next capture there (this test then saw no
/// "dropped again" line: the fault is only in the watched drop).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recovery_makes_again_a_subscription_drop_the_server_missed() {
    let svc = service(98).await;
    let w = svc.writer(500);
    let (ok, out) = migrate_cli(&svc, Some("dump:done"));
    assert!(
        !ok && out.contains("dying here"),
        "the first run dies: {out}"
    );
    let src = svc.current();
    assert!(
        src.subscriptions()
            .await
            .unwrap()
            .iter()
            .any(|s| s.name.starts_with("stateshift_")),
        "the killed run left its capture subscription on the source"
    );
    let (ok, out) = finish(spawn_migrate(
        &svc,
        &[
            ("STATESHIFT_FAULT", "drop_unseen"),
            ("RUST_LOG", "stateshift=warn"),
        ],
    ));
    assert!(
        !ok && out.contains("was found and rolled back"),
        "the second run settles the first by a rollback: {out}"
    );
    assert!(
        out.lines().any(|l| l
            .contains("dropped subscriptions still running: made and dropped again")
            && l.contains("on_source=true")),
        "the DROP the server missed is made again: {out}"
    );
    assert!(
        !out.contains("the interrupted migration's subscriptions:"),
        "nothing is left: {out}"
    );
    let left: Vec<String> = src
        .subscriptions()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .filter(|n| n.starts_with("stateshift_"))
        .collect();
    assert!(
        left.is_empty(),
        "none of ours is left on the source: {left:?}"
    );
    let running = running_subscribers(&src).await;
    assert!(
        running.is_empty(),
        "the source runs no subscription after the recovery: {running:?}"
    );
    // And the next migration, on a source with no stale forwarding, loses nothing.
    let (ok, out) = migrate_cli(&svc, None);
    assert!(ok, "the migration after the recovery completes: {out}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    lost_nothing(
        &svc,
        &w.finish().await,
        5_000,
        "recovery with a missed DROP",
    )
    .await;
}

/// Stop the influxd `pid` (SIGTERM, as an operator or systemd would); its command line.
fn stop_influxd(pid: u32) -> Vec<String> {
    let cmdline: Vec<String> =
        String::from_utf8(std::fs::read(format!("/proc/{pid}/cmdline")).unwrap())
            .unwrap()
            .split('\0')
            .filter(|a| !a.is_empty())
            .map(String::from)
            .collect();
    kill("-TERM", pid);
    let t = Instant::now();
    while alive(pid) {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "influxd did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    cmdline
}

/// Start the influxd of the stack in `dir` again with `cmdline`, logging where it did.
fn start_influxd(dir: &Path, cmdline: &[String]) {
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("vm/influxd.log"))
        .unwrap();
    Command::new("setsid")
        .arg("-f")
        .args(cmdline)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .status()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_down_while_settling_a_verified_migration_defers_the_disposal_and_says_why() {
    let svc = service(89).await;
    let child = spawn_migrate(&svc, &[("STATESHIFT_CRASH_AT", "verify:done")]);
    let (ok, out) = finish(child);
    assert!(!ok && out.contains("dying here"), "{out}");
    let src = stack_dir(&svc, ORIGINAL);
    let pids = pids_of("influxd", &src);
    assert_eq!(pids.len(), 1, "{pids:?}");
    let cmdline = stop_influxd(pids[0]);
    // The counters that prove no write was lost cannot be read: nothing is decided.
    let (ok, out) = finish(spawn_migrate(&svc, &[]));
    assert!(!ok, "{out}");
    assert!(
        out.contains("cannot read the source's subscriber counters"),
        "the reason is named: {out}"
    );
    assert!(
        !out.contains(&u64::MAX.to_string()),
        "no made-up count: {out}"
    );
    assert!(
        svc.stacks_on_disk().contains(&ORIGINAL.to_string()),
        "the old stack is kept"
    );
    assert!(
        !journal(&svc).contains("\"outcome\":\"failed\""),
        "nothing is recorded as failed:\n{}",
        journal(&svc)
    );
    // The source answers again: the next run finishes the disposal.
    start_influxd(&src, &cmdline);
    let t = Instant::now();
    let old = Influx::new(
        &svc.cfg().source.influx_url,
        None,
        None,
        Duration::from_secs(5),
    );
    while old.ping().await.is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "influxd did not come back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (ok, out) = finish(spawn_migrate(&svc, &[]));
    assert!(out.contains("finishing the disposal"), "{out}");
    assert!(ok, "{out}");
    assert!(
        !svc.stacks_on_disk().contains(&ORIGINAL.to_string()),
        "the old stack is disposed of"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_source_influxd_restarted_during_the_capture_is_detected_and_rolls_back() {
    let svc = service(84).await;
    let w = svc.writer(1000);
    let child = spawn_migrate(&svc, &[("STATESHIFT_FAULT", "hold:dump")]);
    wait_journal(&svc, "\"phase\":\"dump\"");
    // Restart the source influxd as an operator (or a crash and systemd) would.
    let src = stack_dir(&svc, ORIGINAL);
    let pids = pids_of("influxd", &src);
    assert_eq!(pids.len(), 1, "{pids:?}");
    let cmdline = stop_influxd(pids[0]);
    start_influxd(&src, &cmdline);
    let (ok, out) = finish(child);
    assert_rolled_back(
        &svc,
        ok,
        &out,
        &[
            "restarted during the capture",
            "forwarding counters were reset",
        ],
    );
    // The writer saw the restart: refused writes are not acknowledged, so not lost.
    retry_succeeds(&svc, "source restarted").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ledger = w.finish().await;
    let problems = workload::check_ledger(&svc.current(), "cyclops", &ledger)
        .await
        .unwrap();
    assert!(problems.is_empty(), "source restarted: {problems:#?}");
    assert!(ledger.points_acked > 0);
    let mut seeded_found = 0;
    for m in 0..3 {
        seeded_found += workload::count_points(&svc.current(), "cyclops", &format!("usage{m}"))
            .await
            .unwrap();
    }
    assert_eq!(seeded_found, 5_000);
    reliability_line(
        "source influxd restarted during the capture",
        &ledger,
        5_000,
        seeded_found,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_writers_host_unreachable_at_cutover_rolls_back_before_any_repoint() {
    let svc = service(85).await;
    let w = svc.writer(1000);
    // The writers' host is reached over SSH; nothing listens there.
    let child = spawn_migrate(
        &svc,
        &[
            ("STATESHIFT__CUTOVER__SSH__HOST", "127.0.0.1"),
            ("STATESHIFT__CUTOVER__SSH__PORT", "1"),
            ("STATESHIFT__CUTOVER__SSH__READY_TIMEOUT", "2s"),
        ],
    );
    let (ok, out) = finish(child);
    assert_rolled_back(&svc, ok, &out, &["cutover:", "127.0.0.1"]);
    assert!(
        !journal(&svc).contains("writers_repointing"),
        "the repoint never started:\n{}",
        journal(&svc)
    );
    retry_succeeds(&svc, "writers' host unreachable").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    lost_nothing(&svc, &w.finish().await, 5_000, "writers' host unreachable").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_target_disk_rolls_back_naming_the_lack_of_space() {
    let seeded = 200_000;
    let svc = service_seeded(86, seeded).await;
    let w = svc.writer(1000);
    // The target VM gets a 4 MiB disk: influxd starts, the data does not fit.
    let child = spawn_migrate(&svc, &[("STATESHIFT__PROVIDER__PARAMETERS__DISK_MB", "4")]);
    let (ok, out) = finish(child);
    assert_rolled_back(
        &svc,
        ok,
        &out,
        &["not enough disk on the target", "MiB free"],
    );
    retry_succeeds(&svc, "disk full").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    lost_nothing(&svc, &w.finish().await, seeded, "disk full").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_orchestrator_on_the_same_service_is_refused_while_the_first_completes() {
    let svc = service(87).await;
    let w = svc.writer(1000);
    let first = spawn_migrate(&svc, &[("STATESHIFT_FAULT", "hold:restore")]);
    wait_journal(&svc, "\"phase\":\"restore\"");
    let t = Instant::now();
    let (ok, out) = migrate_cli(&svc, None);
    assert!(!ok, "{out}");
    assert!(
        out.contains("another migration of this service is running"),
        "{out}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "refused at once, not after waiting"
    );
    // Nor may a second one's availability probe write into the source being moved.
    let probe_dir = svc.dir().join("timeline");
    let out = Command::new(bin())
        .args(["migrate", "--yes", "-c"])
        .arg(&svc.cfg_path)
        .arg("--timeline")
        .arg(&probe_dir)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("nothing was probed or migrated"),
        "{text}"
    );
    assert!(
        !source_influx(&svc)
            .databases()
            .await
            .unwrap()
            .iter()
            .any(|d| d == "stateshift_probe"),
        "no probe database appeared on the source"
    );
    let (ok, out) = finish(first);
    assert!(ok, "the first one completes: {out}");
    assert_eq!(svc.stacks_on_disk().len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    lost_nothing(&svc, &w.finish().await, 5_000, "second orchestrator").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_to_the_old_stack_after_the_capture_stopped_keeps_it_and_says_so() {
    let svc = service(86).await;
    let w = svc.writer(500);
    let src = source_influx(&svc);
    let child = spawn_migrate(&svc, &[("STATESHIFT_FAULT", "hold:old_stack")]);
    wait_journal(&svc, "\"phase\":\"dispose\"");
    // The capture's subscriptions are gone: nothing forwards from now on.
    let t = Instant::now();
    while src
        .subscriptions()
        .await
        .unwrap()
        .iter()
        .any(|s| s.name.starts_with("stateshift_"))
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the capture never stopped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A writer that was not repointed writes to the old instance in that window.
    let ts = now_ns();
    src.write(
        "cyclops",
        None,
        "ns",
        format!("straggler,host=late value=1 {ts}").into(),
    )
    .await
    .unwrap();
    let (ok, out) = finish(child);
    assert!(!ok, "{out}");
    assert!(
        out.contains("reached the old InfluxDB") && out.contains("after the capture stopped"),
        "the reason is named: {out}"
    );
    assert!(out.contains("stateshift resolve"), "and what to do: {out}");
    assert!(
        svc.stacks_on_disk().contains(&ORIGINAL.to_string()),
        "the old stack, the only one holding the straggler, is kept"
    );
    let n = workload::count_points(&src, "cyclops", "straggler")
        .await
        .unwrap();
    assert_eq!(n, 1, "the straggler is on the old instance");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ledger = w.finish().await;
    let problems = workload::check_ledger(&svc_target(&svc), "cyclops", &ledger)
        .await
        .unwrap();
    assert!(problems.is_empty(), "{problems:#?}");
    assert!(
        journal(&svc).contains("\"outcome\":\"failed\""),
        "an operator decides, as after any failure past cutover"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_straggler_write_lost_by_the_capture_after_verify_keeps_the_old_stack() {
    let svc = service(88).await;
    let w = svc.writer(1000);
    let src = source_influx(&svc);
    let child = spawn_migrate(
        &svc,
        &[(
            "STATESHIFT_FAULT",
            "capture_receiver_killed_after_cutover,hold:dispose",
        )],
    );
    wait_journal(&svc, "\"phase\":\"dispose\"");
    // A writer that was not repointed writes to the old instance after verification;
    // the capture that should forward it is gone.
    let ts = now_ns();
    src.write(
        "cyclops",
        None,
        "ns",
        format!("straggler,host=late value=1 {ts}").into(),
    )
    .await
    .unwrap();
    let (ok, out) = finish(child);
    assert!(!ok, "{out}");
    assert!(
        out.contains("failed after cutover") && out.contains("failed to forward"),
        "{out}"
    );
    assert!(
        svc.stacks_on_disk().contains(&ORIGINAL.to_string()),
        "the old stack, the only one holding the straggler, is kept"
    );
    let n = workload::count_points(&src, "cyclops", "straggler")
        .await
        .unwrap();
    assert_eq!(n, 1, "the straggler is on the old instance");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ledger = w.finish().await;
    // The writers use the verified target; everything they were told is there.
    let problems = workload::check_ledger(&svc_target(&svc), "cyclops", &ledger)
        .await
        .unwrap();
    assert!(problems.is_empty(), "{problems:#?}");
    let mut seeded_found = 0;
    for m in 0..3 {
        seeded_found += workload::count_points(&svc_target(&svc), "cyclops", &format!("usage{m}"))
            .await
            .unwrap();
    }
    assert_eq!(seeded_found, 5_000);
    reliability_line(
        "straggler lost by the capture after verify",
        &ledger,
        5_000,
        seeded_found,
    );
}

/// Where the writers point now (the url file the cutover command rewrote).
fn svc_target(svc: &Svc) -> Influx {
    source_influx(svc)
}

/// Killed while deleting the old stack, whose InfluxDB is already stopped (a deletion
/// half done): the checks before the deletion passed, so settling only finishes it. Found
/// by the crash campaign: before, settling asked the gone InfluxDB for its counters and
/// stayed unsettled forever ("cannot read the source's subscriber counters").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_the_old_stack_is_deleted_is_settled_without_its_influxdb() {
    let svc = service(91).await;
    let w = svc.writer(500);
    let child = spawn_migrate(&svc, &[("STATESHIFT_CRASH_AT", "old_stack_deleting")]);
    let (ok, out) = finish(child);
    assert!(!ok && out.contains("dying here"), "{out}");
    let pids = pids_of("influxd", &stack_dir(&svc, ORIGINAL));
    assert_eq!(pids.len(), 1, "{pids:?}");
    stop_influxd(pids[0]);
    // As a delete cut short leaves it: part of the directory gone, its state with it
    // (also found by the campaign: the remains were then never removed).
    std::fs::remove_file(stack_dir(&svc, ORIGINAL).join("stack.json")).unwrap();
    let (ok, out) = finish(spawn_migrate(&svc, &[]));
    assert!(
        ok && out.contains("was found and finished"),
        "the deletion is finished: {out}"
    );
    assert!(
        !svc.stacks_on_disk().contains(&ORIGINAL.to_string()),
        "the old stack's remains are gone"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    lost_nothing(&svc, &w.finish().await, 5_000, "old stack half deleted").await;
}

/// `<url_file>.<what>`, the writer's side files.
fn writer_file(svc: &Svc, what: &str) -> PathBuf {
    let mut p = svc.url_file.clone().into_os_string();
    p.push(format!(".{what}"));
    PathBuf::from(p)
}

/// Hold the writer still (it says so once no request of its is in flight).
fn pause_writer(svc: &Svc) {
    std::fs::write(writer_file(svc, "pause"), "").unwrap();
    let t = Instant::now();
    while !writer_file(svc, "paused").exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "the writer never paused"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn resume_writer(svc: &Svc) {
    std::fs::remove_file(writer_file(svc, "pause")).unwrap();
}

/// A subscription of someone else's on the source, forwarding `cyclops` to a port where
/// nothing listens: each write it takes is one failed delivery, shown in its own counters
/// (and the subscriber service's) until it is dropped. Returns once it has failed some.
async fn failing_foreign_subscription(src: &Influx) {
    src.query(
        None,
        "CREATE SUBSCRIPTION other ON cyclops.autogen DESTINATIONS ALL 'http://127.0.0.1:1'",
    )
    .await
    .unwrap();
    let t = Instant::now();
    while src.subscriber_stats("other").await.unwrap().failed < 20 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the foreign subscription never failed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// InfluxDB 1.x forgets a dropped subscription's counters but keeps its failures in the
/// subscriber service's: from then on they look like forwarding drops. Dropped while the
/// capture's subscriptions are being made, before the dump, they concern writes the dump
/// has: the migration goes on (without the re-base at the subscriptions' going live it
/// stopped, "failed to forward").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_counted_before_the_dump_by_a_subscription_dropped_meanwhile_stop_nothing() {
    let svc = service(92).await;
    let w = svc.writer(1000);
    let src = source_influx(&svc);
    failing_foreign_subscription(&src).await;
    // No write while the capture subscribes: it makes its subscriptions once.
    pause_writer(&svc);
    let child = spawn_migrate(
        &svc,
        &[
            ("STATESHIFT_FAULT", "hold:subscribing"),
            ("RUST_LOG", "stateshift=info"),
        ],
    );
    wait_journal(&svc, "\"phase\":\"capture\"");
    // Inside the 3 s hold, after the counters were read.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let failed = src.subscriber_stats("other").await.unwrap().failed;
    src.drop_subscription("other", "cyclops", "autogen")
        .await
        .unwrap();
    wait_journal(&svc, "\"phase\":\"dump\"");
    resume_writer(&svc);
    let (ok, out) = finish(child);
    assert!(
        ok,
        "the migration goes on past {failed} forgotten failures: {out}"
    );
    assert!(
        failed >= 20,
        "the dropped subscription had failed: {failed}"
    );
    // The drop landed between the base and the subscriptions' going live, and the base
    // moved past it (not before the base, where nothing would have been tested).
    assert!(
        out.contains("so they are not counted against the capture"),
        "{out}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ledger = w.finish().await;
    lost_nothing(&svc, &ledger, 5_000, "foreign subscription dropped").await;
}

/// The same failures counted once the dump has begun cannot be told from a full
/// forwarding queue of ours: the migration rolls back, and says where the source counted
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_counted_after_the_dump_began_by_a_subscription_dropped_meanwhile_roll_back() {
    let svc = service(93).await;
    let w = svc.writer(1000);
    let src = source_influx(&svc);
    failing_foreign_subscription(&src).await;
    let child = spawn_migrate(&svc, &[("STATESHIFT_FAULT", "hold:dump")]);
    wait_journal(&svc, "\"phase\":\"dump\"");
    src.drop_subscription("other", "cyclops", "autogen")
        .await
        .unwrap();
    let (ok, out) = finish(child);
    assert_rolled_back(
        &svc,
        ok,
        &out,
        &[
            "failed forwards that no subscription it lists shows",
            "the capture cannot be proven complete",
        ],
    );
    retry_succeeds(&svc, "foreign subscription dropped during the dump").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ledger = w.finish().await;
    lost_nothing(
        &svc,
        &ledger,
        5_000,
        "foreign subscription dropped during the dump",
    )
    .await;
}

/// InfluxDB 1.6 still delivers what a dropped subscription had queued, and counts each
/// delivery that fails where no listed subscription shows it. The watch subscription
/// on the target (the next migration's source) is dropped at dispose; its receiver,
/// slowed here so that InfluxDB queues for it, answers until that queue is delivered:
/// the new source counts no failed forward. (Before, the receiver stopped at once and
/// the queue's deliveries failed there; a migration from it starting meanwhile would
/// have stopped on them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_receiver_answers_until_its_dropped_subscription_is_delivered() {
    let svc = service(94).await;
    let w = svc.writer(1000);
    let child = spawn_migrate(&svc, &[("STATESHIFT_FAULT", "slow_watch_receiver")]);
    let (ok, out) = finish(child);
    assert!(ok, "the migration completes: {out}");
    // Whatever InfluxDB still delivers after the migration has ended fails now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let st = svc.current().subscriber_stats("-").await.unwrap();
    assert_eq!(
        (st.service_failures, st.dropped),
        (0, 0),
        "the new source counted failed forwards: {st:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ledger = w.finish().await;
    lost_nothing(&svc, &ledger, 5_000, "slow watch receiver").await;
}

/// A write that enters the source while the capture's subscriptions are being made is in
/// the dump but may not be forwarded, so the source's counters could never prove the
/// drain and the cutover would wait `capture.quiet_period`. The capture makes its
/// subscriptions again, from a fresh base, spool and credentials: the synchronous
/// cutover then ends on the counters, and the write is on the new instance. (Without
/// the second attempt: "did not prove the drain".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_while_the_capture_subscribes_makes_it_subscribe_again_and_the_drain_is_proven() {
    let svc = service(95).await;
    let w = svc.writer(1000);
    tokio::time::sleep(Duration::from_secs(1)).await;
    pause_writer(&svc);
    let d = svc.dir().display().to_string();
    let wait_for_ack = format!(
        "printf '%s' {{target_url}} > {d}/writer-url && until [ \"$(cat {d}/writer-url.ack 2>/dev/null)\" = {{target_url}} ]; do sleep 0.005; done"
    );
    let child = spawn_migrate(
        &svc,
        &[
            ("STATESHIFT_FAULT", "hold:subscribing"),
            ("STATESHIFT__CUTOVER__COMMAND", &wait_for_ack),
            ("STATESHIFT__CUTOVER__SYNCHRONOUS", "true"),
        ],
    );
    wait_journal(&svc, "\"phase\":\"capture\"");
    // Inside the first attempt's 3 s hold: after its base, before its subscriptions.
    tokio::time::sleep(Duration::from_secs(1)).await;
    source_influx(&svc)
        .write(
            "cyclops",
            None,
            "ns",
            "while_subscribing v=1 1700000000000000000".into(),
        )
        .await
        .unwrap();
    // The second attempt holds 3 s too, with nothing written; the dump follows it.
    wait_journal(&svc, "\"phase\":\"dump\"");
    resume_writer(&svc);
    let (ok, out) = finish(child);
    assert!(ok, "the migration completes: {out}");
    assert!(out.contains("subscriptions made 2 times"), "{out}");
    assert!(
        !out.contains("did not prove the drain"),
        "the drain ended on the counters: {out}"
    );
    let found = svc
        .current()
        .query(Some("cyclops"), "SELECT count(v) FROM while_subscribing")
        .await
        .unwrap();
    assert_eq!(
        found
            .first()
            .and_then(|s| s.values.first())
            .and_then(|r| r.get(1))
            .and_then(|v| v.as_u64()),
        Some(1),
        "the write made while subscribing is on the new instance: {found:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    lost_nothing(&svc, &w.finish().await, 5_000, "write while subscribing").await;
}
