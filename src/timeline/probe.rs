//! The probe: a bounded writer and reader against the service's current InfluxDB.
//!
//! Every `1/rate` s it asks its [`Follow`] where the service runs now, writes one point
//! (`probe,run=<id> seq=<n>i`) and reads back `last(seq)` and `count(seq)` of its own run,
//! so every read says whether the newest acknowledged point is visible and how many
//! acknowledged points are not. One request at a time, like a single client: a stalled
//! request shows as latency and as fewer attempts in the seconds it covers.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use super::{Buckets, TimelineError, PROBE_DB, PROBE_MEASUREMENT};
use crate::config::Config;
use crate::influx::{ident, literal, Influx};
use crate::migrate::journal::{Journal, JournalState};
use crate::migrate::machine::{self, Paths, Provider};
use crate::util::now_ms;
use crate::util::Secret;

/// Where to probe, and as whom.
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeTarget {
    pub url: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

/// Where the service's writers point now.
pub trait Follow: Send + 'static {
    fn target(&mut self) -> Result<ProbeTarget, String>;
}

/// A fixed server (tests, a service without a journal).
pub struct Fixed(pub ProbeTarget);

impl Follow for Fixed {
    fn target(&mut self) -> Result<ProbeTarget, String> {
        Ok(self.0.clone())
    }
}

/// Follows the service's journal like its writers: the source until a running
/// migration's cutover command succeeds, then its target ([`machine::writers_source`]).
/// The journal is re-read only when its size or modification time changed.
pub struct JournalFollow {
    cfg: Config,
    provider: Provider,
    journal: PathBuf,
    seen: Option<(u64, Option<SystemTime>)>,
    cached: Option<ProbeTarget>,
}

impl JournalFollow {
    pub fn new(cfg: &Config) -> Result<JournalFollow, TimelineError> {
        let provider = Provider::from_config(cfg)
            .map_err(|e| TimelineError::Probe(format!("the stack provider: {e}")))?;
        Ok(JournalFollow {
            cfg: cfg.clone(),
            provider,
            journal: Paths::of(cfg).journal,
            seen: None,
            cached: None,
        })
    }
}

impl Follow for JournalFollow {
    fn target(&mut self) -> Result<ProbeTarget, String> {
        let stamp = match std::fs::metadata(&self.journal) {
            Ok(m) => Some((m.len(), m.modified().ok())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(format!("journal {}: {e}", self.journal.display())),
        };
        if let (Some(t), true) = (&self.cached, stamp == self.seen) {
            return Ok(t.clone());
        }
        let records = Journal::load(&self.journal).map_err(|e| e.to_string())?;
        let st = JournalState::from_records(&records);
        let placement = machine::writers_source(&self.cfg, &st);
        let inst = self
            .provider
            .instance(&self.cfg, &placement, &self.cfg.source);
        let t = ProbeTarget {
            url: inst.influx_url,
            username: inst.username,
            password: inst.password,
        };
        self.seen = stamp;
        self.cached = Some(t.clone());
        Ok(t)
    }
}

/// How the probe runs.
#[derive(Debug, Clone)]
pub struct ProbeSpec {
    /// Writes (and reads) per second.
    pub rate: u32,
    /// Timeout of one request.
    pub timeout: Duration,
    /// The probe stops by itself after this long.
    pub max_duration: Duration,
}

impl Default for ProbeSpec {
    fn default() -> Self {
        ProbeSpec {
            rate: 10,
            timeout: Duration::from_secs(5),
            max_duration: Duration::from_secs(6 * 3600),
        }
    }
}

/// What the probe recorded.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub run: String,
    pub buckets: Buckets,
    pub end_ms: u64,
}

/// A probe running in its own task.
pub struct RunningProbe {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Recorded>,
    pub run: String,
    pub start_ms: u64,
    /// Writes (and reads) per second, as clamped.
    pub rate: u32,
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

fn client(t: &ProbeTarget, timeout: Duration) -> Influx {
    Influx::new(&t.url, t.username.as_deref(), t.password.as_ref(), timeout)
}

struct State {
    spec: ProbeSpec,
    run: String,
    start_ns: i64,
    seq: u64,
    last_ts: i64,
    /// The newest acknowledged seq and how many were acknowledged.
    newest_acked: Option<u64>,
    acked: u64,
    last_ack: Option<Instant>,
    client: Option<(ProbeTarget, Influx)>,
}

impl State {
    fn influx(&mut self, t: &ProbeTarget) -> Influx {
        match &self.client {
            Some((ct, c)) if ct == t => c.clone(),
            _ => {
                let c = client(t, self.spec.timeout);
                self.client = Some((t.clone(), c.clone()));
                c
            }
        }
    }

    /// One write and one read, recorded in the bucket of the second they started in.
    async fn tick(&mut self, follow: &mut dyn Follow, b: &mut Buckets) {
        let at = now_ms();
        let target = match follow.target() {
            Ok(t) => t,
            Err(e) => {
                // Counted as a failed write attempt (latency 0): the client had nowhere to write.
                tracing::warn!(error = %e, "timeline probe: where the service runs is unknown");
                let bk = b.at(at);
                bk.write_us.push(0);
                bk.writes_failed += 1;
                return;
            }
        };
        let influx = self.influx(&target);
        b.at(at).saw_url(&target.url);
        self.seq += 1;
        let ts = now_ns().max(self.last_ts + 1);
        self.last_ts = ts;
        let line = format!(
            "{PROBE_MEASUREMENT},run={} seq={}i {ts}\n",
            self.run, self.seq
        );
        let t0 = Instant::now();
        let w = influx.write(PROBE_DB, None, "ns", Bytes::from(line)).await;
        let took = t0.elapsed();
        let bk = b.at(at);
        bk.write_us
            .push(took.as_micros().min(u32::MAX as u128) as u32);
        match w {
            Ok(()) => {
                let done = Instant::now();
                if let Some(prev) = self.last_ack {
                    let gap = done.duration_since(prev).as_millis() as u64;
                    bk.ack_gap_max_ms = bk.ack_gap_max_ms.max(gap);
                }
                self.last_ack = Some(done);
                self.newest_acked = Some(self.seq);
                self.acked += 1;
            }
            Err(e) => {
                bk.writes_failed += 1;
                tracing::warn!(error = %e, "timeline probe: write failed");
            }
        }
        let q = format!(
            "SELECT last(\"seq\"), count(\"seq\") FROM {} WHERE \"run\" = {} AND time >= {}",
            ident(PROBE_MEASUREMENT),
            literal(&self.run),
            self.start_ns
        );
        let t0 = Instant::now();
        let r = influx.query(Some(PROBE_DB), &q).await;
        let took = t0.elapsed();
        let bk = b.at(at);
        bk.read_us
            .push(took.as_micros().min(u32::MAX as u128) as u32);
        match r {
            Ok(series) => {
                let row = series.first().and_then(|s| s.values.first());
                let col = |i: usize| row.and_then(|r| r.get(i)).and_then(|v| v.as_u64());
                let (last, count) = (col(1), col(2).unwrap_or(0));
                if let Some(newest) = self.newest_acked {
                    if last.is_none_or(|l| l < newest) {
                        bk.reads_stale += 1;
                    }
                }
                bk.reads_missing_max = bk.reads_missing_max.max(self.acked.saturating_sub(count));
            }
            Err(e) => {
                bk.reads_failed += 1;
                tracing::warn!(error = %e, "timeline probe: read failed");
            }
        }
    }
}

impl RunningProbe {
    /// Create the probe database on the server `follow` names now (idempotent), write and
    /// read the first probe point there, then keep probing in a task until
    /// [`RunningProbe::finish`] or `spec.max_duration`. Fails when that first round fails:
    /// a migration should not start with a blind probe.
    pub async fn start(
        spec: ProbeSpec,
        mut follow: impl Follow,
    ) -> Result<RunningProbe, TimelineError> {
        let spec = ProbeSpec {
            rate: spec.rate.clamp(1, 1000),
            ..spec
        };
        let first = follow.target().map_err(TimelineError::Probe)?;
        let influx = client(&first, spec.timeout);
        influx
            .query(None, &format!("CREATE DATABASE {}", ident(PROBE_DB)))
            .await
            .map_err(|e| {
                TimelineError::Probe(format!("creating the probe database {PROBE_DB}: {e}"))
            })?;
        let start_ms = now_ms();
        let run = format!("{start_ms}");
        let max_seconds = spec.max_duration.as_secs().max(1) as usize + 1;
        let mut b = Buckets::new(start_ms, max_seconds);
        let mut st = State {
            spec: spec.clone(),
            run: run.clone(),
            start_ns: start_ms as i64 * 1_000_000,
            seq: 0,
            last_ts: 0,
            newest_acked: None,
            acked: 0,
            last_ack: None,
            client: None,
        };
        st.tick(&mut follow, &mut b).await;
        if st.acked == 0 || b.buckets.first().is_none_or(|x| x.reads_failed > 0) {
            return Err(TimelineError::Probe(format!(
                "the first probe write or read on {} failed (see the log)",
                first.url
            )));
        }
        let stop = CancellationToken::new();
        let s2 = stop.clone();
        let task = tokio::spawn(async move {
            let period = Duration::from_secs_f64(1.0 / st.spec.rate as f64);
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            tick.tick().await;
            let deadline = Instant::now() + st.spec.max_duration;
            while Instant::now() < deadline {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = s2.cancelled() => break,
                }
                if s2.is_cancelled() {
                    break;
                }
                st.tick(&mut follow, &mut b).await;
            }
            let end_ms = now_ms();
            b.extend_to(end_ms.saturating_sub(1));
            Recorded {
                run: st.run,
                buckets: b,
                end_ms,
            }
        });
        Ok(RunningProbe {
            stop,
            task,
            run,
            start_ms,
            rate: spec.rate,
        })
    }

    /// Stop (after the request in flight) and return what was recorded.
    pub async fn finish(mut self) -> Result<Recorded, TimelineError> {
        self.stop.cancel();
        (&mut self.task)
            .await
            .map_err(|e| TimelineError::Probe(format!("the probe task: {e}")))
    }
}

/// A probe dropped without [`RunningProbe::finish`] (an error path) stops at its next tick
/// instead of probing on until its `max_duration`.
impl Drop for RunningProbe {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Stop the probe, read the journal's events of the probed window and write
/// `dir/timeline.csv` and `dir/timeline.svg`. Returns the paths and the summary.
pub async fn finish_into(
    probe: RunningProbe,
    cfg: &Config,
    dir: &std::path::Path,
    title: &str,
) -> Result<(PathBuf, PathBuf, super::Summary), TimelineError> {
    let rec = probe.finish().await?;
    let records = Journal::load(&Paths::of(cfg).journal)
        .map_err(|e| TimelineError::Probe(format!("reading the journal: {e}")))?;
    let marks = super::marks(&records, rec.buckets.start_ms, rec.end_ms);
    let mut rows = rec.buckets.rows();
    super::attach_marks(&mut rows, rec.buckets.start_ms, &marks);
    let (c, s) = super::write_files(dir, &rows, &marks, title)?;
    Ok((c, s, super::summary(&rows)))
}
