//! The data-engine benchmark (`stateshift bench`): two local InfluxDB servers, a
//! seeded data set, a live writer, one migration against native backup + restore, and
//! the figures. (The demo of the whole loop is [`super::demo`].)

use std::path::Path;
use std::time::{Duration, Instant};

use crate::kit::lab::{Lab, LabOptions};
use crate::kit::workload::{self, RunningWriter, SeedSpec, WriterSpec};
use stateshift::migrate::engine::{self, Phase, Report};
use stateshift::stack::local::{LocalVm, VmOptions};

/// Print the per-phase timings of a report.
pub fn print_report(r: &Report) {
    say!("\n  phase        seconds");
    for p in &r.phases {
        say!("  {:<12} {:>8.3}", p.phase.to_string(), p.seconds);
    }
    say!("  {:<12} {:>8.3}", "total", r.total_seconds);
    say!(
        "  dump {} bytes; captured {} points, replayed {} points ({:.0} points/s)",
        r.dump_bytes,
        r.points_captured,
        r.points_replayed,
        r.replay_points_per_second
    );
}

fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// Peak resident set of this process, in MB (`VmHWM`).
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn writer_spec(lab: &Lab, db: &str, rate: u32, alone: Duration) -> WriterSpec {
    WriterSpec {
        db: db.into(),
        url_file: lab.url_file.clone(),
        username: None,
        password: None,
        rate,
        old_fraction: 0.1,
        overwrite_fraction: 0.1,
        max_duration: alone + Duration::from_secs(600),
    }
}

/// The writer's latency p99 and max per migration phase, next to its baseline with
/// nothing else running: which phase slows the service's writes down, and by how much.
fn print_writer_phases(
    ledger: &workload::Ledger,
    report: &Report,
    idle: (u64, u64),
    migration_to: u64,
) {
    let row = |name: &str, from: u64, to: u64| {
        let (p99, n) = ledger.latency_ms_between(from, to, 0.99);
        let (max, _) = ledger.latency_ms_between(from, to, 1.0);
        if n > 0 {
            println!("  {name:<12} {n:>8} {p99:>8.2} {max:>8.2}");
        }
    };
    println!(
        "writer latency by phase (ms):\n  {:<12} {:>8} {:>8} {:>8}",
        "phase", "requests", "p99", "max"
    );
    row("(alone)", idle.0, idle.1);
    for p in &report.phases {
        let to = p.started_unix_ms + (p.seconds * 1000.0).ceil() as u64;
        row(&p.phase.to_string(), p.started_unix_ms, to);
    }
    // Where the slowest writes were sent, within their phase: a spike at a phase's first
    // milliseconds and one spread over it have different causes.
    let mut slow: Vec<(u32, u64)> = ledger
        .latencies_us
        .iter()
        .copied()
        .zip(ledger.sent_unix_ms.iter().copied())
        .filter(|&(_, at)| at >= idle.0 && at < migration_to)
        .collect();
    slow.sort_unstable_by_key(|&(us, _)| std::cmp::Reverse(us));
    let at = |ms: u64| {
        if ms < idle.1 {
            return format!("(alone) +{:.3} s", (ms - idle.0) as f64 / 1000.0);
        }
        report
            .phases
            .iter()
            .rev()
            .find(|p| p.started_unix_ms <= ms)
            .map(|p| {
                format!(
                    "{} +{:.3} s of {:.3} s",
                    p.phase,
                    (ms - p.started_unix_ms) as f64 / 1000.0,
                    p.seconds
                )
            })
            .unwrap_or_else(|| "before the migration".into())
    };
    let list: Vec<String> = slow
        .iter()
        .take(5)
        .map(|&(us, ms)| {
            // The wall clock too, to match a write with a trace taken beside the bench.
            let wall = std::time::UNIX_EPOCH + Duration::from_millis(ms);
            format!(
                "{:.1} ms at {} ({})",
                us as f64 / 1000.0,
                at(ms),
                humantime::format_rfc3339_millis(wall)
            )
        })
        .collect();
    if !list.is_empty() {
        println!("  slowest writes: {}", list.join("; "));
    }
}

/// Benchmark options.
pub struct BenchOptions {
    pub points: u64,
    pub rate: u32,
    pub replay_points: u64,
    /// `migration.transfer_rate_limit` as the configuration writes it.
    pub transfer_rate_limit: String,
    /// `migration.write_time_guard` as the configuration writes it.
    pub write_time_guard: String,
    /// The cutover command does not wait for the writer (no `cutover.synchronous`).
    pub quiet_drain: bool,
    /// `migration.idle_nice`.
    pub idle_nice: u8,
    /// `verify.target_first`.
    pub verify_target_first: bool,
    /// `verify.read_back`.
    pub verify_read_back: bool,
    /// `verify.read_back_on_host`.
    pub verify_read_back_on_host: bool,
    /// The nice value of the `stateshift migrate` process.
    pub orchestrator_nice: u8,
    /// How long the live writer runs alone before the migration starts: its baseline.
    pub alone: Duration,
}

/// The data-engine benchmark.
pub async fn bench(dir: &Path, o: &BenchOptions) -> anyhow::Result<()> {
    println!(
        "stateshift bench, built from {} ({} build)",
        env!("STATESHIFT_COMMIT"),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
    );
    // A local stack: create until influxd answers, then delete.
    {
        use stateshift::stack::{StackProvider, StackSpec};
        let stacks = stateshift::stack::local::LocalStacks::new(&dir.join("stacks"), 15)?;
        let mut times = Vec::new();
        for i in 0..3 {
            let spec = StackSpec {
                secret_parameters: Default::default(),
                name: format!("bench-{i}"),
                template: dir.join("none"),
                parameters: Default::default(),
                environment_files: vec![],
                timeout: Duration::from_secs(60),
            };
            let t = Instant::now();
            let (r, _) = stacks.create(&spec).await?;
            let ready = t.elapsed().as_secs_f64();
            let t = Instant::now();
            stacks.delete(&r, Duration::from_secs(30)).await?;
            times.push((ready, t.elapsed().as_secs_f64()));
        }
        let s: Vec<String> = times
            .iter()
            .map(|(c, d)| format!("{c:.2}s/{d:.2}s"))
            .collect();
        println!(
            "local stack create (influxd answering) / delete, 3 runs: {}",
            s.join(", ")
        );
    }
    // What a run that failed before its end left of its native baseline.
    for sub in ["native", "native-backup-warm", "native-backup"] {
        let _ = std::fs::remove_dir_all(dir.join(sub));
    }
    let lab = Lab::start(
        dir,
        LabOptions {
            synchronous_cutover: !o.quiet_drain,
            ..LabOptions::default()
        },
    )
    .await?;
    let (cfg_path, cfg) = lab
        .write_config(&format!(
            "  transfer_rate_limit: {}\n  write_time_guard: {}\n  idle_nice: {}\nverify:\n  content: full\n  target_first: {}\n  read_back: {}\n  read_back_on_host: {}\n",
            serde_json::to_string(&o.transfer_rate_limit)?,
            serde_json::to_string(&o.write_time_guard)?,
            o.idle_nice,
            o.verify_target_first,
            o.verify_read_back,
            o.verify_read_back_on_host
        ))
        .map_err(anyhow::Error::msg)?;
    println!(
        "the server the writer is not using runs at nice {} (migration.idle_nice)",
        cfg.migration.idle_nice
    );
    if o.orchestrator_nice > 0 {
        println!(
            "stateshift migrate runs at nice {} (--orchestrator-nice: on a cloud it runs on the SO's VM, apart from the InfluxDB servers)",
            o.orchestrator_nice
        );
    }
    println!(
        "verification reads the target's aggregates {} (verify.target_first)",
        if cfg.verify.target_first {
            "before the repoint, the source's after it"
        } else {
            "and the source's at once, from just before the repoint"
        }
    );
    println!(
        "the measurements nothing writes to are proven {} (verify.read_back)",
        if cfg.verify.read_back && cfg.verify.target_first {
            if cfg.verify.read_back_on_host {
                "by their files where the shards read back from the target allow it (read and digested on the target's host: verify.read_back_on_host), else by their aggregates"
            } else {
                "by their files where the shards read back from the target allow it (through an SSH forward to its RPC port), else by their aggregates"
            }
        } else {
            "by their aggregates"
        }
    );
    if cfg.migration.transfer_rate_limit > 0 {
        println!(
            "shard streams limited to {:.1} MB/s (migration.transfer_rate_limit)",
            cfg.migration.transfer_rate_limit as f64 / 1e6
        );
    }
    if !cfg.migration.write_time_guard.is_zero() {
        println!(
            "shard streams paced to keep the source's mean write time under {} (migration.write_time_guard)",
            humantime::format_duration(cfg.migration.write_time_guard)
        );
    }
    let db = "bench";
    let spec = SeedSpec {
        db: db.into(),
        points: o.points,
        series: 150,
        days: 30,
        measurements: 3,
        end_ns: now_ns(),
    };
    let t = Instant::now();
    let seeded = workload::seed(&lab.source.client(), &spec).await?;
    println!(
        "seeded {seeded} points (150 series, 30 days, 3 measurements, 4 field types) in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // Native baseline on the same data: backup -portable + restore -portable to a fresh server.
    // Nothing it writes is deleted before the migration is measured: after gigabytes are
    // deleted on a file system mounted with online discard (this machine's ext4 is),
    // fsyncs wait up to half a second for about 20 s (docs/benchmarks.md, stop 35), the
    // source's WAL's too, which the writer would have counted against the migration.
    let mut native_vm = LocalVm::start(&dir.join("native"), VmOptions::default()).await?;
    let backup_into = |bdir: &Path| {
        let _ = std::fs::remove_dir_all(bdir);
        let t = Instant::now();
        run_cmd(
            "influxd",
            &[
                "backup",
                "-portable",
                "-host",
                &format!("{}:8088", lab.source.addr),
                &bdir.display().to_string(),
            ],
        )
        .map(|()| t.elapsed().as_secs_f64())
    };
    // A first backup flushes the source's cache; time the second, as the migration will
    // find the cache flushed too. Each into a directory of its own (see above).
    let warm_bdir = dir.join("native-backup-warm");
    let bdir = dir.join("native-backup");
    backup_into(&warm_bdir)?;
    let native_backup = backup_into(&bdir)?;
    let t = Instant::now();
    run_cmd(
        "influxd",
        &[
            "restore",
            "-portable",
            "-host",
            &format!("{}:8088", native_vm.addr),
            &bdir.display().to_string(),
        ],
    )?;
    let native_restore = t.elapsed().as_secs_f64();
    let native = native_backup + native_restore;
    println!("native backup -portable + restore -portable: {native:.3} s (backup {native_backup:.3} s, restore {native_restore:.3} s)");
    native_vm.kill_influxd().await;
    // What the native run left in the page cache goes to disk now, not under the writer.
    run_cmd("sync", &[])?;
    let remove_native = || async {
        let _ = native_vm.destroy().await;
        let _ = std::fs::remove_dir_all(&warm_bdir);
        let _ = std::fs::remove_dir_all(&bdir);
    };

    let writer = RunningWriter::start(writer_spec(&lab, db, o.rate, o.alone));
    // The writer alone first: its latency with nothing else running is the baseline the
    // migration's phases are judged against.
    let idle_from = stateshift::util::now_ms();
    tokio::time::sleep(o.alone).await;
    let idle_to = stateshift::util::now_ms();
    // The migration runs as its own `stateshift migrate` process, so its peak RSS is its own.
    let (report, migrate_rss_mb) =
        migrate_subprocess(&cfg_path, &dir.join("report.json"), o.orchestrator_nice).await;
    let migration_to = stateshift::util::now_ms();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ledger = writer.finish().await;
    let report = report?;
    print_report(&report);
    let problems = workload::check_ledger(&lab.target.client(), db, &ledger).await?;

    // Replay throughput on a sizeable delta.
    let replay = replay_throughput(&lab, o.replay_points).await?;
    // Only now: nothing measured is left to run.
    remove_native().await;

    let data = [
        Phase::Capture,
        Phase::Dump,
        Phase::Transfer,
        Phase::Restore,
        Phase::Delta,
    ]
    .iter()
    .map(|p| report.phase_seconds(*p))
    .sum::<f64>();
    println!("\n== stateshift bench: {seeded} points ==");
    println!("native backup -portable + restore -portable: {native:.3} s (backup {native_backup:.3} s, restore {native_restore:.3} s)");
    println!(
        "stateshift data phase (capture+dump+transfer+restore+delta): {data:.3} s  ratio {:.2}x",
        data / native
    );
    let drain = if report.drain_proven {
        "drain proven by the source's counters".to_string()
    } else {
        format!(
            "drain ended by the {:?} quiet period",
            cfg.capture.quiet_period
        )
    };
    println!(
        "stateshift whole migration incl. prepare, cutover ({drain}), verify and dispose (the old stack's deletion is not in it): {:.3} s  ratio {:.2}x",
        report.total_seconds,
        report.total_seconds / native
    );
    // Issue 12's measure ends at "verified"; dispose (the capture's stop: a settle wait
    // for forwards in flight, the tail's replay, subscriptions and scratch removed) follows
    // the proof. The old stack's deletion is not in the total at all.
    let to_verified = report.total_seconds - report.phase_seconds(Phase::Dispose);
    println!(
        "  of which prepare -> verified (dispose, the capture's stop and cleanup, left out): {to_verified:.3} s  ratio {:.2}x",
        to_verified / native
    );
    let verify = report.phase_seconds(Phase::Verify);
    println!(
        "  verify: {verify:.3} s ({:.0} % of the whole migration)",
        100.0 * verify / report.total_seconds.max(f64::EPSILON)
    );
    if let Some(v) = &report.verify {
        println!(
            "  verification in all, from its first comparison to its end: {:.3} s ({:.0} % of the whole migration)",
            v.span_seconds,
            100.0 * v.span_seconds / report.total_seconds.max(f64::EPSILON)
        );
    }
    if let Some(v) = report
        .verify
        .as_ref()
        .filter(|v| v.measurements_verified_early > 0)
    {
        println!(
            "  and before it, during the cutover: {} measurements compared in {:.3} s (counted in the cutover and verify phases it overlapped, not added)",
            v.measurements_verified_early, v.early_seconds
        );
    }
    if let Some(v) = report
        .verify
        .as_ref()
        .filter(|v| v.measurements_proven_by_files + v.measurements_proven_partly_by_files > 0)
    {
        println!(
            "  of them proven by their files (no scan on either server): {} measurements, {} more in part (the spans of time of the shards that did not read back as sent compared by their aggregates); the target's {} shards read back in {:.3} s ({:.1} MB, {})",
            v.measurements_proven_by_files,
            v.measurements_proven_partly_by_files,
            v.read_back_shards,
            v.read_back_seconds,
            v.read_back_bytes as f64 / 1e6,
            if v.read_back_on_host {
                "digested on its host"
            } else {
                "digested here"
            }
        );
    }
    println!("delta replay throughput: {:.0} points/s ({} points); in this migration: {} points at {:.0} points/s", replay.0, replay.1, report.points_replayed, report.replay_points_per_second);
    // The goal's figures are the writes sent from the migration's start: the writer's
    // time alone is its baseline, printed beside them, not part of them.
    let during = |q: f64| ledger.latency_ms_between(idle_to, migration_to, q).0;
    let alone = |q: f64| ledger.latency_ms_between(idle_from, idle_to, q).0;
    println!(
        "writer ({} points/s target): {} points acked, {} failed writes; during the migration: latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} requests); alone for {:.0} s before it: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        o.rate,
        ledger.points_acked,
        ledger.requests_failed,
        during(0.5),
        during(0.99),
        during(1.0),
        ledger.latency_ms_between(idle_to, migration_to, 1.0).1,
        o.alone.as_secs_f64(),
        alone(0.5),
        alone(0.99),
        alone(1.0),
    );
    print_writer_phases(&ledger, &report, (idle_from, idle_to), migration_to);
    println!(
        "independent ledger check: {}",
        if problems.is_empty() {
            "0 lost".to_string()
        } else {
            problems.join("; ")
        }
    );
    println!("stateshift migrate peak RSS: {migrate_rss_mb:.1} MB (bench process incl. seeding and writer: {:.1} MB)", peak_rss_mb());
    lab.destroy().await;
    Ok(())
}

/// Run `stateshift migrate -c CFG --yes --report R` as a child process; return its report
/// and its peak RSS (VmHWM, polled until it exits).
async fn migrate_subprocess(cfg: &Path, report: &Path, nice: u8) -> (anyhow::Result<Report>, f64) {
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => return (Err(e.into()), 0.0),
    };
    // Through coreutils' `nice`, which execs the program: the pid is still its own.
    let mut child = match tokio::process::Command::new("nice")
        .args(["-n", &nice.to_string()])
        .arg(exe)
        .args(["migrate", "--yes", "-c"])
        .arg(cfg)
        .arg("--report")
        .arg(report)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return (Err(e.into()), 0.0),
    };
    let status_file = child.id().map(|pid| format!("/proc/{pid}/status"));
    let mut peak_kb = 0f64;
    let status = loop {
        if let Some(f) = &status_file {
            let hwm = std::fs::read_to_string(f).ok().and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|k| k.parse::<f64>().ok())
            });
            if let Some(kb) = hwm {
                peak_kb = peak_kb.max(kb);
            }
        }
        tokio::select! {
            st = child.wait() => break st,
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    };
    let r = (|| -> anyhow::Result<Report> {
        let st = status?;
        let text = std::fs::read_to_string(report)?;
        if !st.success() {
            anyhow::bail!("stateshift migrate failed: {text}");
        }
        Ok(serde_json::from_str(&text)?)
    })();
    (r, peak_kb / 1024.0)
}

fn run_cmd(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = std::process::Command::new(cmd).args(args).output()?;
    if !out.status.success() {
        anyhow::bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Replay `points` spooled points into a fresh database on the lab's target.
async fn replay_throughput(lab: &Lab, points: u64) -> anyhow::Result<(f64, u64)> {
    use influxdb_line_protocol::LineProtocolBuilder;
    use stateshift::migrate::spool::SpoolWriter;
    let dst = lab.target.client();
    dst.query(None, "CREATE DATABASE replaybench").await?;
    let path = lab.dir.join("replay.spool");
    let _ = std::fs::remove_file(&path);
    let w = SpoolWriter::create(&path)?;
    let base = now_ns();
    let mut i = 0u64;
    while i < points {
        let mut b = LineProtocolBuilder::new();
        for _ in 0..100 {
            b = b
                .measurement("delta")
                .tag("host", &format!("h{}", i % 150))
                .field("value", i as f64)
                .field("n", i as i64)
                .timestamp(base - i as i64 * 1000)
                .close_line();
            i += 1;
        }
        w.append("replaybench", "autogen", "ns", &b.build())?;
    }
    let mut r = w.reader()?;
    let t = Instant::now();
    let n = engine::replay_ready(&mut r, &dst, Phase::Delta, None).await?;
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    Ok((n as f64 / secs, n))
}
