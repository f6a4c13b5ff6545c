//! Measure the availability timeline of an operator's `stateshift migrate --timeline`:
//! a local-stack service like the integration tests' fixture (subnet 62), seeded with
//! POINTS points, a Cyclops-like writer at 1000 points/s that follows the cutover, and
//! the real CLI as a child process.
//!
//! ```sh
//! cargo build --release && cargo run --release --example timeline -- /tmp/ss-tl 200000
//! ```
//! It writes DIR/timeline/timeline.{csv,svg} and prints the writer's own figures.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use stateshift::influx::Influx;
use stateshift::stack::local::LocalStacks;
use stateshift::stack::{StackProvider, StackSpec};
/// The workload kit, included as the tests include it (it is not library API).
#[allow(dead_code)]
#[path = "../src/kit/workload.rs"]
mod workload;

use workload::{RunningWriter, SeedSpec, WriterSpec};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().context("usage: timeline DIR POINTS")?);
    let points: u64 = args
        .next()
        .context("usage: timeline DIR POINTS")?
        .parse()
        .context("POINTS: expected a number")?;
    let bin = std::env::current_exe()?
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("stateshift"))
        .context("where is the stateshift binary?")?;
    let subnet = 62u8;
    let _ = std::fs::remove_dir_all(&dir);
    let stacks = LocalStacks::new(&dir.join("local"), subnet)?;
    let spec = StackSpec {
        secret_parameters: Default::default(),
        name: "svc-influx-0".into(),
        template: dir.join("none"),
        parameters: Default::default(),
        environment_files: vec![],
        timeout: Duration::from_secs(60),
    };
    let (_, out0) = stacks.create(&spec).await?;
    let src = Influx::new(&out0.influxdb_url, None, None, Duration::from_secs(30));
    let end_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as i64;
    let seed = SeedSpec {
        db: "cyclops".into(),
        points,
        series: 30,
        days: 30,
        measurements: 3,
        end_ns,
    };
    workload::seed(&src, &seed).await?;
    let url_file = dir.join("writer-url");
    std::fs::write(&url_file, &out0.influxdb_url)?;
    let inst = stacks.instance_config("svc-influx-0", &out0);
    let ssh = inst.ssh.clone().context("local stack without ssh")?;
    let yaml = format!(
        "service:\n  name: svc\n  stack: svc-influx-0\nsource:\n  influx_url: \"{}\"\n  rpc_address: \"{}\"\n  work_dir: \"{}\"\n  ssh:\n    host: \"{}\"\n    port: {}\n    identity_file: \"{}\"\n    known_hosts_file: \"{}\"\nprovider:\n  kind: local\n  local_dir: \"{d}/local\"\n  local_subnet: {subnet}\ncapture:\n  spool_dir: \"{d}/spool\"\n  quiet_period: 2s\ncutover:\n  command: \"printf '%s' {{target_url}} > {d}/writer-url\"\nmigration:\n  work_dir: \"{d}/state\"\n",
        inst.influx_url,
        inst.rpc_address,
        inst.work_dir,
        ssh.host,
        ssh.port,
        stacks.keys().client_key.display(),
        stacks.keys().known_hosts.display(),
        d = dir.display()
    );
    let cfg = dir.join("stateshift.yaml");
    std::fs::write(&cfg, yaml)?;
    let w = RunningWriter::start(WriterSpec {
        db: "cyclops".into(),
        url_file,
        username: None,
        password: None,
        rate: 1000,
        old_fraction: 0.1,
        overwrite_fraction: 0.1,
        max_duration: Duration::from_secs(600),
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tl = dir.join("timeline");
    println!(
        "$ {} migrate --yes -c {} --timeline {}",
        bin.display(),
        cfg.display(),
        tl.display()
    );
    let st = std::process::Command::new(&bin)
        .args(["migrate", "--yes", "-c"])
        .arg(&cfg)
        .arg("--timeline")
        .arg(&tl)
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    let ledger = w.finish().await;
    println!(
        "{st}; the writer (1000 points/s): {} points acked, {} requests failed, p99 {:.1} ms, max {:.1} ms, longest stall {:?}",
        ledger.points_acked,
        ledger.requests_failed,
        ledger.latency_ms(0.99),
        ledger.latency_ms(1.0),
        ledger.max_stall
    );
    // Local stacks outlive their creator by design: stop this run's.
    for name in std::fs::read_dir(dir.join("local/stacks"))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
    {
        if let Ok(Some(r)) = stacks.find(&name).await {
            let _ = stacks.delete(&r, Duration::from_secs(30)).await;
        }
    }
    Ok(())
}
