use std::path::PathBuf;

use crate::kit::lab::{Lab, LabOptions};
use crate::kit::workload::{self, SeedSpec};
use stateshift::migrate::engine::Progress;

pub fn now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// A port on 127.0.0.1 for a server a test starts by configuration (a daemon's API): free
/// now, and below the kernel's ephemeral range, so no outgoing connection of this busy
/// machine takes it before the server binds it, as one can take a port got by binding
/// port 0 and letting it go (CI failed once on that race, in a local SSH forward).
pub fn server_port() -> u16 {
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let (lo, hi) = (20_000, ephemeral_from.max(20_001));
    for _ in 0..1000 {
        let port = fastrand::u16(lo..hi);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 in {lo}..{hi}");
}

pub struct TestLab {
    pub lab: Lab,
    _tmp: tempfile::TempDir,
}

impl std::ops::Deref for TestLab {
    type Target = Lab;
    fn deref(&self) -> &Lab {
        &self.lab
    }
}

impl std::ops::DerefMut for TestLab {
    fn deref_mut(&mut self) -> &mut Lab {
        &mut self.lab
    }
}

pub async fn lab(opts: LabOptions) -> TestLab {
    // Short paths: ssh control sockets must fit in 108 bytes.
    let tmp = tempfile::Builder::new()
        .prefix("ss-it")
        .tempdir_in("/tmp")
        .unwrap();
    let lab = Lab::start(tmp.path(), opts)
        .await
        .expect("lab starts (run scripts/setup.sh first)");
    TestLab { lab, _tmp: tmp }
}

pub fn seed_spec(db: &str, points: u64) -> SeedSpec {
    SeedSpec {
        db: db.into(),
        points,
        series: 12,
        days: 10,
        measurements: 3,
        end_ns: now_ns(),
    }
}

pub async fn seed(lab: &Lab, db: &str, points: u64) -> u64 {
    workload::seed(&lab.source.client(), &seed_spec(db, points))
        .await
        .unwrap()
}

/// Every measurement's point count on a server.
pub async fn counts(influx: &stateshift::influx::Influx, db: &str) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for m in influx.measurements(db).await.unwrap() {
        out.push((
            m.clone(),
            workload::count_points(influx, db, &m).await.unwrap(),
        ));
    }
    out
}

pub struct Quiet;
impl Progress for Quiet {}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_stateshift"))
}

/// The nice values of every thread of process `pid` (Linux keeps one per thread).
pub fn thread_nices(pid: u32) -> std::collections::BTreeSet<i32> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("stat")).ok())
        .map(|stat| {
            // After the command's closing parenthesis: state is field 3, nice field 19.
            let rest = &stat[stat.rfind(')').unwrap() + 2..];
            rest.split(' ').nth(16).unwrap().parse().unwrap()
        })
        .collect()
}

/// Give every thread of process `pid` the nice value `nice`.
pub fn renice_all(pid: u32, nice: i32) {
    let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| Some(t.ok()?.file_name().to_string_lossy().into_owned()))
        .collect();
    let ok = std::process::Command::new("renice")
        .args(["-n", &nice.to_string(), "-p"])
        .args(&tasks)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "renice {pid}");
}

/// A daemon running in this process, once its loop is ready.
pub struct Daemon {
    /// Cancel it to stop the daemon (after the migration that runs, if any).
    pub stop: tokio_util::sync::CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
    /// What its API serves (`/status`, the metrics, the trigger).
    pub shared: std::sync::Arc<stateshift::daemon::Shared>,
}

/// Start `stateshift daemon` on `cfg` in this process; wait until its loop runs.
pub async fn start_daemon(cfg: stateshift::config::Config) -> Daemon {
    let stop = tokio_util::sync::CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let s2 = stop.clone();
    let task = tokio::spawn(async move {
        stateshift::daemon::run(cfg, s2, &stateshift::migrate::engine::LogProgress, Some(tx)).await
    });
    let shared = rx.await.expect("the daemon started");
    Daemon { stop, task, shared }
}
