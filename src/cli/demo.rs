//! `stateshift demo`: the whole service-orchestrator loop on one machine, with the local
//! stack provider and real InfluxDB servers. A Cyclops-like writer writes usage records
//! and follows the cutover; a query load ramps up on the service's InfluxDB VM; the
//! daemon reads that VM's real CPU use (the documented local load source, where no
//! Zabbix runs), predicts it with GM(1,1), triggers, migrates to a new stack, disposes of
//! the old one and resets its window. It ends with an independent count.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::cli::PrintProgress;
use crate::kit::workload::{self, RunningWriter, SeedSpec, WriterSpec};
use stateshift::config::Config;
use stateshift::daemon::{self, Shared};
use stateshift::influx::Influx;
use stateshift::migrate::journal::Outcome;
use stateshift::migrate::machine;
use stateshift::stack::local::LocalStacks;
use stateshift::stack::{StackProvider, StackSpec};
use stateshift::timeline::probe::{self, JournalFollow, ProbeSpec, RunningProbe};
use stateshift::timeline::PROBE_DB;

/// What the demo saw.
#[derive(Debug, Clone)]
pub struct Outcome2 {
    pub lost: u64,
    pub failed_writes: u64,
    pub old_stack_gone: bool,
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Heavy queries against whatever URL the writers use, `workers` at a time, until `stop`.
fn start_load(
    url_file: std::path::PathBuf,
    workers: Arc<std::sync::atomic::AtomicUsize>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for i in 0..4usize {
            let (url_file, workers, stop) = (url_file.clone(), workers.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let q = "SELECT MEAN(value), MAX(count), COUNT(unit) FROM /usage.*/ WHERE time > now() - 31d GROUP BY time(10m), host";
                let deadline = Instant::now() + Duration::from_secs(300);
                while !stop.is_cancelled() && Instant::now() < deadline {
                    if workers.load(std::sync::atomic::Ordering::SeqCst) <= i {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                    let url = std::fs::read_to_string(&url_file).unwrap_or_default();
                    let c = Influx::new(url.trim(), None, None, Duration::from_secs(30));
                    let _ = c.query(Some("cyclops"), q).await;
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    })
}

pub async fn run(dir: &Path, points: u64, serve: bool) -> anyhow::Result<Outcome2> {
    println!("stateshift demo: the service orchestrator loop on one machine\n");
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let local_dir = dir.join("local");
    let stacks = LocalStacks::new(&local_dir, 10)?;
    let spec = StackSpec {
        secret_parameters: Default::default(),
        name: "demo-influx-0".into(),
        template: dir.join("none"),
        parameters: Default::default(),
        environment_files: vec![],
        timeout: Duration::from_secs(60),
    };
    let (stack0, out0) = stacks.create(&spec).await?;
    // Local stacks outlive their creator by design: if the demo is dropped (Ctrl-C), its
    // servers must not.
    let _servers = StopOnDrop(local_dir.clone());
    let result = run_in(dir, &stacks, &out0, points, serve).await;
    // Whatever happened, stop every local stack the demo made.
    for name in std::fs::read_dir(local_dir.join("stacks"))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
    {
        if let Ok(Some(r)) = stacks.find(&name).await {
            let _ = stacks.delete(&r, Duration::from_secs(30)).await;
        }
    }
    let _ = stack0;
    result
}

/// Stops every process started under a directory (the local stacks' influxd and sshd).
struct StopOnDrop(std::path::PathBuf);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let pattern = stateshift::util::regex_quote(&format!("{}/", self.0.display()));
        let _ = std::process::Command::new("pkill")
            .arg("-f")
            .arg(pattern)
            .status();
    }
}

async fn run_in(
    dir: &Path,
    stacks: &LocalStacks,
    out0: &stateshift::stack::StackOutputs,
    points: u64,
    serve: bool,
) -> anyhow::Result<Outcome2> {
    println!(
        "1. the service's InfluxDB VM is local stack demo-influx-0: influxd + sshd on {}",
        out0.influxdb_host
    );
    let db = "cyclops";
    let src = Influx::new(&out0.influxdb_url, None, None, Duration::from_secs(30));
    let seed = SeedSpec {
        db: db.into(),
        points,
        series: 30,
        days: 30,
        measurements: 3,
        end_ns: now_ns(),
    };
    let seeded = workload::seed(&src, &seed).await?;
    println!("2. seeded {seeded} usage records (30 series over 30 days)");
    let url_file = dir.join("writer-url");
    std::fs::write(&url_file, &out0.influxdb_url)?;
    let writer = RunningWriter::start(WriterSpec {
        db: db.into(),
        url_file: url_file.clone(),
        username: None,
        password: None,
        rate: 1000,
        old_fraction: 0.1,
        overwrite_fraction: 0.1,
        max_duration: Duration::from_secs(600),
    });
    println!("3. a Cyclops-like writer sends 1000 points/s (10% days-old timestamps, 10% overwrites) and follows its config file");
    let inst = stacks.instance_config("demo-influx-0", out0);
    let ssh = inst
        .ssh
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("local stack without ssh"))?;
    let yaml = format!(
        "service:\n  name: demo\n  stack: demo-influx-0\nsource:\n  name: demo-influx-0\n  influx_url: \"{url}\"\n  rpc_address: \"{rpc}\"\n  work_dir: \"{work}\"\n  ssh:\n    host: \"{h}\"\n    port: {p}\n    identity_file: \"{id}\"\n    known_hosts_file: \"{kh}\"\nprovider:\n  kind: local\n  local_dir: \"{local}\"\n  local_subnet: 10\n  create_timeout: 60s\ncapture:\n  spool_dir: \"{d}/spool\"\n  quiet_period: 2s\ncutover:\n  command: \"printf '%s' {{target_url}} > {d}/writer-url\"\nmigration:\n  work_dir: \"{d}/state\"\nmonitor:\n  kind: process\n  poll_interval: 1s\n  window: 5\n  min_readings: 3\n  threshold: 60\n  consecutive: 2\n  cooldown: 5m\napi:\n  listen: \"127.0.0.1:0\"\n",
        url = inst.influx_url,
        rpc = inst.rpc_address,
        work = inst.work_dir,
        h = ssh.host,
        p = ssh.port,
        id = stacks.keys().client_key.display(),
        kh = stacks.keys().known_hosts.display(),
        local = dir.join("local").display(),
        d = dir.display()
    );
    let cfg_path = dir.join("stateshift.yaml");
    std::fs::write(&cfg_path, yaml)?;
    let cfg = Config::load(&cfg_path)?;
    // A probe client from now to the end, following the service like the writers do.
    let probe = RunningProbe::start(ProbeSpec::default(), JournalFollow::new(&cfg)?).await?;
    println!(
        "   a probe writes and reads {} points/s in its own database ({PROBE_DB}, migrated with the rest) to chart availability",
        ProbeSpec::default().rate
    );
    println!("4. the orchestrator (stateshift daemon, config {}) polls the VM's influxd CPU every second;", cfg_path.display());
    println!("   GM(1,1) predicts the next reading; it migrates when the prediction exceeds {}% twice in a row", cfg.monitor.threshold);
    let stop_daemon = CancellationToken::new();
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Arc<Shared>>();
    let dcfg = cfg.clone();
    let sd = stop_daemon.clone();
    let daemon =
        tokio::spawn(async move { daemon::run(dcfg, sd, &PrintProgress, Some(ready_tx)).await });
    let shared = ready_rx
        .await
        .map_err(|_| anyhow::anyhow!("the daemon did not start"))?;
    let page = format!(
        "http://{}/",
        shared
            .status
            .lock()
            .map(|s| s.api.clone())
            .unwrap_or_default()
    );
    println!("   its status page: {page} (and {page}status, {page}metrics)");

    let workers = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let stop_load = CancellationToken::new();
    let load = start_load(url_file.clone(), workers.clone(), stop_load.clone());
    println!("5. load ramps up on the VM (heavy aggregate queries, 1 then 2 then 3 at a time):");
    let started = Instant::now();
    let deadline = started + Duration::from_secs(240);
    let mut migrating_seen = false;
    let mut last_print = String::new();
    let succeeded = loop {
        let secs = started.elapsed().as_secs() as usize;
        let st = shared.status.lock().map(|s| s.clone()).unwrap_or_default();
        if st.state == "migrating" {
            if !migrating_seen {
                migrating_seen = true;
                stop_load.cancel();
                println!(
                    "   -> trigger: {}; the load generator pauses while the service moves",
                    st.last_decision
                );
            }
        } else if !migrating_seen {
            workers.store((secs / 4).min(3), std::sync::atomic::Ordering::SeqCst);
            let line = format!(
                "   t={:>3}s load {:>6.1}%  prediction {:>6}  window {:?}  ({})",
                secs,
                st.last_reading.unwrap_or(0.0),
                st.last_prediction
                    .map(|p| format!("{p:.1}%"))
                    .unwrap_or_else(|| "-".into()),
                st.window
                    .iter()
                    .map(|v| (v * 10.0).round() / 10.0)
                    .collect::<Vec<_>>(),
                st.last_decision
            );
            if line != last_print {
                println!("{line}");
                last_print = line;
            }
        }
        if let Some(m) = st.migrations.last().filter(|m| m.outcome.is_some()) {
            break m.outcome == Some(Outcome::Succeeded);
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    stop_load.cancel();
    let _ = load.await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ledger = writer.finish().await;
    let st = shared.status.lock().map(|s| s.clone()).unwrap_or_default();
    if !succeeded {
        anyhow::bail!("no successful migration within 240 s (last decision: {}; see `stateshift status -c {}`)", st.last_decision, cfg_path.display());
    }
    let jst = machine::state(&cfg)?;
    let cur = machine::current_source(&cfg, &jst);
    let old_gone = stacks.find("demo-influx-0").await?.is_none();
    println!("\n6. after the migration: the service runs on {} (stack {}); old stack demo-influx-0 {}; window {:?} (reset)",
        cur.influx_url, cur.stack.as_ref().map(|s| s.name.as_str()).unwrap_or("?"), if old_gone { "deleted" } else { "STILL PRESENT" }, st.window);
    let dst = Influx::new(&cur.influx_url, None, None, Duration::from_secs(30));
    let mut on_target = 0;
    for m in 0..seed.measurements {
        on_target += workload::count_points(&dst, db, &format!("usage{m}")).await?;
    }
    let problems = workload::check_ledger(&dst, db, &ledger).await?;
    let lost = seeded.saturating_sub(on_target) + problems.len() as u64;
    println!("7. independent count (the writer's own ledger, not stateshift's verify):");
    println!(
        "   points written: {} seeded + {} live ({} distinct) = {}",
        seeded,
        ledger.points_acked,
        ledger.acked.len(),
        seeded + ledger.acked.len() as u64
    );
    println!(
        "   points on the new host: {} seeded + {} live with their latest value",
        on_target,
        ledger.acked.len() as u64 - (problems.len() as u64).min(ledger.acked.len() as u64)
    );
    println!(
        "   writes failed: {}; writer latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        ledger.requests_failed,
        ledger.latency_ms(0.5),
        ledger.latency_ms(0.99),
        ledger.latency_ms(1.0)
    );
    println!("   points lost: {lost}");
    for p in &problems {
        println!("   ! {p}");
    }
    let title = format!(
        "stateshift demo: availability during the migration ({} probe writes+reads/s)",
        ProbeSpec::default().rate
    );
    let (csv, svg, summary) = probe::finish_into(probe, &cfg, dir, &title).await?;
    println!("8. the probe client: {summary}");
    println!("   per-second CSV: {}", csv.display());
    println!("availability timeline: {}", svg.display());
    let outcome = Outcome2 {
        lost,
        failed_writes: ledger.requests_failed,
        old_stack_gone: old_gone,
    };
    if serve {
        let _ = SERVED.set(outcome.clone());
        println!("\nserving the status page at {page} until Ctrl-C");
        // Ctrl-C ends the demo here (`interruptible` stops the local servers with it).
        std::future::pending::<()>().await;
    }
    stop_daemon.cancel();
    daemon
        .await
        .map_err(|e| anyhow::anyhow!("daemon task: {e}"))??;
    Ok(outcome)
}

/// With `--serve`: the demo's outcome, set once it is known and the page is being served
/// until Ctrl-C (which ends the demo by dropping it).
pub static SERVED: std::sync::OnceLock<Outcome2> = std::sync::OnceLock::new();
