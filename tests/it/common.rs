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
