//! Workloads for the demo, the benchmark and the tests: a seeded data set and a live,
//! Cyclops-like writer that keeps an independent ledger of every point a server
//! acknowledged, so "nothing lost" is checked without trusting the product's verify.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use bytes::Bytes;
use influxdb_line_protocol::LineProtocolBuilder;
use tokio_util::sync::CancellationToken;

use stateshift::influx::{Influx, InfluxError};

const NS: i64 = 1_000_000_000;
pub const DAY_NS: i64 = 86_400 * NS;

/// Shape of the seeded data set.
#[derive(Debug, Clone)]
pub struct SeedSpec {
    pub db: String,
    pub points: u64,
    pub series: u32,
    pub days: u32,
    pub measurements: u32,
    /// Timestamp of the newest point (ns).
    pub end_ns: i64,
}

/// A deterministic pseudo-random 64-bit mix of (series, i) (splitmix64), so seeded data
/// compresses like real measurements, not like a pattern, and a check can recompute it.
pub fn seed_mix(series: u32, i: u64) -> u64 {
    let mut z = (series as u64) << 40 ^ i ^ 0x9E37_79B9_7F4A_7C15;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The deterministic float value of a seeded point.
pub fn seed_value(series: u32, i: u64) -> f64 {
    (seed_mix(series, i) % 10_000_000) as f64 / 1000.0
}

/// Write the seed: `points` points spread over `series` series (tags `host`, `region`)
/// of `measurements` measurements, evenly over `days` days, with float, integer, string
/// and boolean fields. Returns points written.
pub async fn seed(influx: &Influx, spec: &SeedSpec) -> Result<u64, InfluxError> {
    influx
        .query(
            None,
            &format!("CREATE DATABASE {}", stateshift::influx::ident(&spec.db)),
        )
        .await?;
    let per_series = spec.points.div_ceil(spec.series as u64).max(1);
    let span = spec.days as i64 * DAY_NS;
    let step = (span / per_series as i64).max(1);
    let start = spec.end_ns - span;
    let mut written = 0u64;
    let mut buf = LineProtocolBuilder::new();
    let mut in_buf = 0u32;
    // Interleave series so each batch touches many series, like a real writer.
    'outer: for i in 0..per_series {
        for s in 0..spec.series {
            if written >= spec.points {
                break 'outer;
            }
            let m = format!("usage{}", s % spec.measurements);
            buf = buf
                .measurement(&m)
                .tag("host", &format!("h{s:03}"))
                .tag("region", if s % 2 == 0 { "eu" } else { "us" })
                .field("value", seed_value(s, i))
                .field("count", (seed_mix(s, i) >> 24) as i64 % 100_000)
                .field(
                    "unit",
                    ["kWh", "GB", "s", "req"][(seed_mix(s, i) >> 8) as usize % 4],
                )
                .field("ok", seed_mix(s, i) & 1 == 0)
                // Jitter within the step, as real usage records arrive.
                .timestamp(start + i as i64 * step + (seed_mix(s, i) >> 16) as i64 % step.max(1))
                .close_line();
            written += 1;
            in_buf += 1;
            if in_buf == 10_000 {
                let body = std::mem::take(&mut buf).build();
                influx
                    .write(&spec.db, None, "ns", Bytes::from(body))
                    .await?;
                in_buf = 0;
            }
        }
    }
    if in_buf > 0 {
        influx
            .write(&spec.db, None, "ns", Bytes::from(buf.build()))
            .await?;
    }
    Ok(written)
}

/// Where the writer sends its writes: re-read before every batch, so a cutover command
/// that rewrites this file moves the writer (as Cyclops' config does). While it runs,
/// `<url_file>.running` exists, and `<url_file>.ack` names the URL it writes to: once
/// the file names a new URL, no request of the writer goes to the old one again (it
/// writes one batch at a time), so a command that waits for the ack is synchronous
/// (`cutover.synchronous`). While `<url_file>.pause` exists the writer sends nothing,
/// and says so with `<url_file>.paused` once no request of its is in flight (a test holds
/// it that way while a capture's subscriptions are made).
#[derive(Debug, Clone)]
pub struct WriterSpec {
    pub db: String,
    pub url_file: PathBuf,
    pub username: Option<String>,
    pub password: Option<stateshift::util::Secret>,
    /// Points per second (approximate; batches every 10 ms).
    pub rate: u32,
    /// Fraction of points written with a timestamp days in the past.
    pub old_fraction: f64,
    /// Fraction of points that overwrite an already acknowledged point with a new value.
    pub overwrite_fraction: f64,
    /// Stop after this long at the latest.
    pub max_duration: Duration,
}

/// The writer's ledger: the latest acknowledged value of every point it wrote, and its
/// latency and failure counts.
#[derive(Debug, Default)]
pub struct Ledger {
    /// (host tag, timestamp ns) → last acknowledged `value`.
    pub acked: HashMap<(String, i64), f64>,
    pub points_acked: u64,
    pub points_failed: u64,
    pub requests_failed: u64,
    pub latencies_us: Vec<u32>,
    /// When each request of `latencies_us` was sent, ms since the Unix epoch.
    pub sent_unix_ms: Vec<u64>,
    pub urls_used: Vec<String>,
    pub max_stall: Duration,
    /// The first failed requests (at most [`ERRORS_KEPT`]): how long after the start, and
    /// the error, for a test that fails on them to say what happened.
    pub errors: Vec<(Duration, String)>,
}

/// How many failed requests a [`Ledger`] describes.
pub const ERRORS_KEPT: usize = 5;

impl Ledger {
    /// Latency percentile in milliseconds.
    pub fn latency_ms(&self, q: f64) -> f64 {
        percentile_ms(self.latencies_us.clone(), q)
    }

    /// Latency percentile in milliseconds of the requests sent in `[from, to)` (ms since
    /// the Unix epoch), and how many there were.
    pub fn latency_ms_between(&self, from: u64, to: u64, q: f64) -> (f64, usize) {
        let v: Vec<u32> = self
            .latencies_us
            .iter()
            .zip(&self.sent_unix_ms)
            .filter(|(_, &at)| at >= from && at < to)
            .map(|(&l, _)| l)
            .collect();
        let n = v.len();
        (percentile_ms(v, q), n)
    }
}

fn percentile_ms(mut v: Vec<u32>, q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((v.len() - 1) as f64 * q).round() as usize;
    v[i.min(v.len() - 1)] as f64 / 1000.0
}

/// The measurement the live writer writes.
pub const LIVE_MEASUREMENT: &str = "cyclops_usage";

/// Run the writer until `stop` is cancelled or `max_duration` passes.
pub async fn run_writer(spec: WriterSpec, stop: CancellationToken) -> Ledger {
    let mut ledger = Ledger::default();
    let mut url = String::new();
    let mut client: Option<Influx> = None;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let per_batch = (spec.rate / 100).max(1);
    let started = Instant::now();
    let mut seq = 0u64;
    let mut old_points: Vec<(String, i64, Instant)> = Vec::new();
    let mut last_ok = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (running, ack) = (
        side_file(&spec.url_file, "running"),
        side_file(&spec.url_file, "ack"),
    );
    let _ = std::fs::write(&running, "");
    let (pause, paused) = (
        side_file(&spec.url_file, "pause"),
        side_file(&spec.url_file, "paused"),
    );
    while !stop.is_cancelled() && started.elapsed() < spec.max_duration {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        if let Ok(u) = std::fs::read_to_string(&spec.url_file) {
            let u = u.trim().to_string();
            if !u.is_empty() && u != url {
                client = Some(Influx::new(
                    &u,
                    spec.username.as_deref(),
                    spec.password.as_ref(),
                    Duration::from_secs(10),
                ));
                ledger.urls_used.push(u.clone());
                // Written whole then renamed: a reader never sees half a URL.
                let tmp = side_file(&spec.url_file, "ack.tmp");
                let _ = std::fs::write(&tmp, &u).and_then(|()| std::fs::rename(&tmp, &ack));
                url = u;
            }
        }
        let Some(c) = &client else { continue };
        if pause.exists() {
            let _ = std::fs::write(&paused, "");
            continue;
        }
        let _ = std::fs::remove_file(&paused);
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        let mut b = LineProtocolBuilder::new();
        let mut batch: Vec<((String, i64), f64)> = Vec::with_capacity(per_batch as usize);
        for _ in 0..per_batch {
            seq += 1;
            let r = (next() % 10_000) as f64 / 10_000.0;
            let value = seq as f64 + 0.5;
            let (host, ts) = if r < spec.overwrite_fraction && !old_points.is_empty() {
                // Overwrite a point acknowledged at least a second ago.
                let i = (next() % old_points.len() as u64) as usize;
                let (h, t, at) = &old_points[i];
                if at.elapsed() < Duration::from_secs(1) {
                    (format!("w{}", seq % 20), now_ns + seq as i64)
                } else {
                    (h.clone(), *t)
                }
            } else if r < spec.overwrite_fraction + spec.old_fraction {
                let days = 1 + (next() % 5) as i64;
                (
                    format!("w{}", seq % 20),
                    now_ns - days * DAY_NS + seq as i64,
                )
            } else {
                (format!("w{}", seq % 20), now_ns + seq as i64)
            };
            b = b
                .measurement(LIVE_MEASUREMENT)
                .tag("host", &host)
                .field("value", value)
                .field("seq", seq as i64)
                .field("account", "acme")
                .field("billable", true)
                .timestamp(ts)
                .close_line();
            batch.push(((host, ts), value));
        }
        let t = Instant::now();
        ledger.sent_unix_ms.push(stateshift::util::now_ms());
        let r = c.write(&spec.db, None, "ns", Bytes::from(b.build())).await;
        ledger
            .latencies_us
            .push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
        match r {
            Ok(()) => {
                ledger.max_stall = ledger.max_stall.max(last_ok.elapsed());
                last_ok = Instant::now();
                for (k, v) in batch {
                    ledger.points_acked += 1;
                    if old_points.len() < 50_000 && !ledger.acked.contains_key(&k) {
                        old_points.push((k.0.clone(), k.1, Instant::now()));
                    }
                    ledger.acked.insert(k, v);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "writer: write failed");
                if ledger.errors.len() < ERRORS_KEPT {
                    ledger.errors.push((started.elapsed(), e.to_string()));
                }
                ledger.requests_failed += 1;
                ledger.points_failed += batch.len() as u64;
            }
        }
    }
    let _ = std::fs::remove_file(&running);
    ledger
}

/// `<file>.<what>`, next to `file`.
fn side_file(file: &std::path::Path, what: &str) -> PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(".");
    s.push(what);
    PathBuf::from(s)
}

/// Independent check: every point in the ledger is on `target` with its latest
/// acknowledged value. Returns the list of problems (empty: nothing lost).
pub async fn check_ledger(
    target: &Influx,
    db: &str,
    ledger: &Ledger,
) -> Result<Vec<String>, InfluxError> {
    let mut on_target: HashMap<(String, i64), f64> = HashMap::with_capacity(ledger.acked.len());
    let q = format!("SELECT value FROM {} WHERE time >= -9223372036854775806 AND time <= 9223372036854775806 GROUP BY host", LIVE_MEASUREMENT);
    let mut err = None;
    target
        .query_chunked(db, &q, 10_000, |s| {
            let host = s
                .tags
                .as_ref()
                .and_then(|t| t.get("host"))
                .cloned()
                .unwrap_or_default();
            for row in s.values {
                match (
                    row.first().and_then(|v| v.as_i64()),
                    row.get(1).and_then(|v| v.as_f64()),
                ) {
                    (Some(t), Some(v)) => {
                        on_target.insert((host.clone(), t), v);
                    }
                    _ => err = Some(format!("unexpected row {row:?}")),
                }
            }
            Ok(())
        })
        .await?;
    let mut problems: Vec<String> = err.into_iter().collect();
    let mut lost = 0u64;
    let mut stale = 0u64;
    for (k, v) in &ledger.acked {
        match on_target.get(k) {
            None => {
                lost += 1;
                if problems.len() < 20 {
                    problems.push(format!(
                        "acknowledged point host={} time={} is missing on the target",
                        k.0, k.1
                    ));
                }
            }
            Some(w) if w != v => {
                stale += 1;
                if problems.len() < 20 {
                    problems.push(format!(
                        "point host={} time={} has value {w} on the target, last acknowledged {v}",
                        k.0, k.1
                    ));
                }
            }
            Some(_) => {}
        }
    }
    if lost + stale > 0 {
        problems.push(format!(
            "{lost} acknowledged points lost, {stale} with a stale value, of {}",
            ledger.acked.len()
        ));
    }
    Ok(problems)
}

/// Shared handle to stop a writer and collect its ledger.
pub struct RunningWriter {
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<Ledger>,
}

impl RunningWriter {
    pub fn start(spec: WriterSpec) -> RunningWriter {
        let stop = CancellationToken::new();
        let task = tokio::spawn(run_writer(spec, stop.clone()));
        RunningWriter { stop, task }
    }
    pub async fn finish(self) -> Ledger {
        self.stop.cancel();
        self.task.await.unwrap_or_default()
    }
}

/// Count the points of every seeded measurement on a server (independent of verify).
pub async fn count_points(
    influx: &Influx,
    db: &str,
    measurement: &str,
) -> Result<u64, InfluxError> {
    let q = format!("SELECT COUNT(value) FROM {} WHERE time >= -9223372036854775806 AND time <= 9223372036854775806", stateshift::influx::ident(measurement));
    let s = influx.query(Some(db), &q).await?;
    Ok(s.first()
        .and_then(|s| s.values.first())
        .and_then(|r| r.get(1))
        .and_then(|v| v.as_u64())
        .unwrap_or(0))
}
