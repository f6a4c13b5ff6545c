//! The availability timeline: what a client of the service saw, second by second, while
//! a migration ran (issue 6; the measurement Themis made for VM migrations).
//!
//! A bounded probe ([`probe`]) writes a few points per second into its own database
//! ([`PROBE_DB`]) on the service's *current* InfluxDB — it follows the cutover the way the
//! writers do, from the journal — and reads its own newest point back. Each attempt lands
//! in the bucket of the second it started in ([`Buckets`]); the buckets become [`Row`]s,
//! exported as CSV ([`csv`]) and drawn as an SVG chart ([`svg`]) with the journal's phase
//! boundaries ([`marks`]). Everything here but [`probe`] is pure.
//!
//! The probe database is created before the migration starts, so the engine migrates it
//! like any other user database: the probe's points are themselves "nothing lost" data.

pub mod probe;
pub mod svg;

use std::path::{Path, PathBuf};

use crate::migrate::journal::{Event, Outcome, Record};

/// The probe's database (created on the service before the migration; migrated with it).
pub const PROBE_DB: &str = "stateshift_probe";
/// The probe's measurement: `probe,run=<id> seq=<n>i <ns>`.
pub const PROBE_MEASUREMENT: &str = "probe";

#[derive(Debug, thiserror::Error)]
pub enum TimelineError {
    #[error("timeline: {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("timeline probe: {0}")]
    Probe(String),
}

/// What happened in one second of the probe (attempts are counted in the second they
/// started in).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Bucket {
    /// Latency of every write attempt, failed ones included (µs).
    pub write_us: Vec<u32>,
    pub writes_failed: u32,
    /// The longest wait between two consecutive acknowledged writes, for acks of writes
    /// started in this second (ms).
    pub ack_gap_max_ms: u64,
    /// Latency of every read attempt, failed ones included (µs).
    pub read_us: Vec<u32>,
    pub reads_failed: u32,
    /// Successful reads that did not see the newest acknowledged probe point.
    pub reads_stale: u32,
    /// The most acknowledged probe points a successful read did not see.
    pub reads_missing_max: u64,
    /// The URLs probed, in order, each once.
    pub urls: Vec<String>,
}

impl Bucket {
    pub fn saw_url(&mut self, url: &str) {
        if !self.urls.iter().any(|u| u == url) {
            self.urls.push(url.to_string());
        }
    }
}

/// Per-second buckets from `start_ms` (Unix ms), bounded by `max_seconds`.
#[derive(Debug, Clone)]
pub struct Buckets {
    pub start_ms: u64,
    pub max_seconds: usize,
    pub buckets: Vec<Bucket>,
}

impl Buckets {
    pub fn new(start_ms: u64, max_seconds: usize) -> Buckets {
        Buckets {
            start_ms,
            max_seconds: max_seconds.max(1),
            buckets: Vec::new(),
        }
    }

    /// The second an instant (Unix ms) falls in: clamped to 0 before the start (a clock
    /// step back) and to the last second allowed.
    pub fn index(&self, at_ms: u64) -> usize {
        ((at_ms.saturating_sub(self.start_ms) / 1000) as usize).min(self.max_seconds - 1)
    }

    /// The bucket of an instant, creating the empty seconds before it.
    pub fn at(&mut self, at_ms: u64) -> &mut Bucket {
        let i = self.index(at_ms);
        if self.buckets.len() <= i {
            self.buckets.resize_with(i + 1, Bucket::default);
        }
        &mut self.buckets[i]
    }

    /// Make sure every second up to `end_ms` has a (maybe empty) bucket.
    pub fn extend_to(&mut self, end_ms: u64) {
        let _ = self.at(end_ms.max(self.start_ms));
    }

    pub fn rows(&self) -> Vec<Row> {
        self.buckets
            .iter()
            .enumerate()
            .map(|(i, b)| Row::of(self.start_ms + i as u64 * 1000, i as u64, b))
            .collect()
    }
}

/// Nearest-rank percentile (`q` in 0..=1) of sorted values; `None` when there are none.
pub fn percentile(sorted: &[u32], q: f64) -> Option<u32> {
    if sorted.is_empty() {
        return None;
    }
    let n = sorted.len();
    let rank = (q.clamp(0.0, 1.0) * n as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, n) - 1])
}

/// One second of the timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Start of the second (Unix ms).
    pub unix_ms: u64,
    /// Seconds since the probe started.
    pub t_s: u64,
    pub writes: u32,
    pub writes_failed: u32,
    pub write_p50_ms: Option<f64>,
    pub write_p99_ms: Option<f64>,
    pub write_max_ms: Option<f64>,
    pub ack_gap_max_ms: u64,
    pub reads: u32,
    pub reads_failed: u32,
    pub read_p99_ms: Option<f64>,
    pub read_max_ms: Option<f64>,
    /// Every successful read saw the newest acknowledged point (`None`: no successful read).
    pub read_sees_newest: Option<bool>,
    pub reads_missing_max: u64,
    pub urls: Vec<String>,
    /// Journal events in this second (filled by [`attach_marks`]).
    pub events: Vec<String>,
}

impl Row {
    fn of(unix_ms: u64, t_s: u64, b: &Bucket) -> Row {
        let ms = |v: Option<u32>| v.map(|us| us as f64 / 1000.0);
        let mut w = b.write_us.clone();
        w.sort_unstable();
        let mut r = b.read_us.clone();
        r.sort_unstable();
        let reads_ok = (r.len() as u32).saturating_sub(b.reads_failed);
        Row {
            unix_ms,
            t_s,
            writes: w.len() as u32,
            writes_failed: b.writes_failed,
            write_p50_ms: ms(percentile(&w, 0.5)),
            write_p99_ms: ms(percentile(&w, 0.99)),
            write_max_ms: ms(w.last().copied()),
            ack_gap_max_ms: b.ack_gap_max_ms,
            reads: r.len() as u32,
            reads_failed: b.reads_failed,
            read_p99_ms: ms(percentile(&r, 0.99)),
            read_max_ms: ms(r.last().copied()),
            read_sees_newest: (reads_ok > 0).then_some(b.reads_stale == 0),
            reads_missing_max: b.reads_missing_max,
            urls: b.urls.clone(),
            events: Vec::new(),
        }
    }

    /// Writes the server acknowledged in this second.
    pub fn writes_ok(&self) -> u32 {
        self.writes.saturating_sub(self.writes_failed)
    }
}

/// A phase boundary (or another journal event) on the timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    pub at_ms: u64,
    pub label: String,
}

/// The label of a journal event on the chart, `None` for events not drawn (their
/// neighbours mark the same instant).
fn label(e: &Event) -> Option<String> {
    Some(match e {
        Event::Started { .. } => "start".into(),
        Event::StackCreating { .. } => "create stack".into(),
        Event::PhaseStarted { phase } => phase.to_string(),
        Event::WritersRepointed => "repointed".into(),
        Event::OldStackDeleting => "delete old stack".into(),
        Event::Resolved { .. } => "resolved".into(),
        Event::AbortRequested { .. } => "abort".into(),
        Event::Finished { outcome, .. } => match outcome {
            Outcome::Succeeded => "succeeded",
            Outcome::RolledBack => "rolled back",
            Outcome::Failed => "failed",
        }
        .into(),
        Event::StackCreated { .. }
        | Event::PhaseDone { .. }
        | Event::WritersRepointing
        | Event::TargetCreating { .. }
        | Event::IdleLowering { .. }
        | Event::IdleRestored { .. }
        | Event::OldStackDeleted
        | Event::MonitorHostRetired { .. }
        | Event::WindowReset => return None,
    })
}

/// The journal events between `from_ms` and `to_ms` (inclusive) as marks, in order. With
/// several migrations in the window, labels after the first are prefixed with its id.
pub fn marks(records: &[Record], from_ms: u64, to_ms: u64) -> Vec<Mark> {
    let inside: Vec<&Record> = records
        .iter()
        .filter(|r| r.at_ms >= from_ms && r.at_ms <= to_ms)
        .collect();
    let first = inside.first().map(|r| r.migration.clone());
    inside
        .into_iter()
        .filter_map(|r| {
            let l = label(&r.event)?;
            Some(Mark {
                at_ms: r.at_ms,
                label: if Some(&r.migration) == first.as_ref() {
                    l
                } else {
                    format!("{} {l}", r.migration)
                },
            })
        })
        .collect()
}

/// Put each mark's label in the row of the second it happened in (marks outside the
/// rows go to the first or last row).
pub fn attach_marks(rows: &mut [Row], start_ms: u64, marks: &[Mark]) {
    let Some(last) = rows.len().checked_sub(1) else {
        return;
    };
    for m in marks {
        let i = ((m.at_ms.saturating_sub(start_ms) / 1000) as usize).min(last);
        rows[i].events.push(m.label.clone());
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn opt_ms(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.3}")).unwrap_or_default()
}

pub const CSV_HEADER: &str = "unix_time,t_s,writes,writes_failed,write_p50_ms,write_p99_ms,write_max_ms,ack_gap_max_ms,reads,reads_failed,read_p99_ms,read_max_ms,read_sees_newest,reads_missing_max,url,events";

/// The rows as CSV: one line per second, latencies in ms (empty: no attempt),
/// `read_sees_newest` 1/0 (empty: no successful read), URLs and events `;`-separated.
pub fn csv(rows: &[Row]) -> String {
    let mut out = String::with_capacity(64 + rows.len() * 96);
    out.push_str(CSV_HEADER);
    out.push('\n');
    for r in rows {
        let fields = [
            format!("{}.{:03}", r.unix_ms / 1000, r.unix_ms % 1000),
            r.t_s.to_string(),
            r.writes.to_string(),
            r.writes_failed.to_string(),
            opt_ms(r.write_p50_ms),
            opt_ms(r.write_p99_ms),
            opt_ms(r.write_max_ms),
            r.ack_gap_max_ms.to_string(),
            r.reads.to_string(),
            r.reads_failed.to_string(),
            opt_ms(r.read_p99_ms),
            opt_ms(r.read_max_ms),
            match r.read_sees_newest {
                Some(true) => "1".into(),
                Some(false) => "0".into(),
                None => String::new(),
            },
            r.reads_missing_max.to_string(),
            csv_field(&r.urls.join(";")),
            csv_field(&r.events.join(";")),
        ];
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

/// The figures a person asks first.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub seconds: usize,
    pub writes: u64,
    pub writes_failed: u64,
    pub write_max_ms: f64,
    /// The longest wait between two acknowledged writes (ms).
    pub longest_ack_gap_ms: u64,
    /// The longest run of whole seconds without an acknowledged write.
    pub longest_seconds_without_ack: usize,
    pub reads: u64,
    pub reads_failed: u64,
    /// Seconds in which a successful read missed the newest acknowledged point.
    pub stale_read_seconds: usize,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} s probed: {} writes, {} failed, max write latency {:.1} ms, longest gap between acknowledged writes {} ms ({} whole seconds without one); {} reads, {} failed, {} second(s) with a stale read",
            self.seconds,
            self.writes,
            self.writes_failed,
            self.write_max_ms,
            self.longest_ack_gap_ms,
            self.longest_seconds_without_ack,
            self.reads,
            self.reads_failed,
            self.stale_read_seconds
        )
    }
}

pub fn summary(rows: &[Row]) -> Summary {
    let mut s = Summary {
        seconds: rows.len(),
        ..Summary::default()
    };
    let mut run = 0usize;
    for r in rows {
        s.writes += r.writes as u64;
        s.writes_failed += r.writes_failed as u64;
        s.write_max_ms = s.write_max_ms.max(r.write_max_ms.unwrap_or(0.0));
        s.longest_ack_gap_ms = s.longest_ack_gap_ms.max(r.ack_gap_max_ms);
        run = if r.writes_ok() == 0 { run + 1 } else { 0 };
        s.longest_seconds_without_ack = s.longest_seconds_without_ack.max(run);
        s.reads += r.reads as u64;
        s.reads_failed += r.reads_failed as u64;
        if r.read_sees_newest == Some(false) {
            s.stale_read_seconds += 1;
        }
    }
    s
}

/// Write `dir/timeline.csv` and `dir/timeline.svg`; returns their paths.
pub fn write_files(
    dir: &Path,
    rows: &[Row],
    marks: &[Mark],
    title: &str,
) -> Result<(PathBuf, PathBuf), TimelineError> {
    std::fs::create_dir_all(dir).map_err(|source| TimelineError::Io {
        what: "create directory",
        path: dir.into(),
        source,
    })?;
    let c = dir.join("timeline.csv");
    let s = dir.join("timeline.svg");
    std::fs::write(&c, csv(rows)).map_err(|source| TimelineError::Io {
        what: "write",
        path: c.clone(),
        source,
    })?;
    let start = rows.first().map(|r| r.unix_ms).unwrap_or(0);
    std::fs::write(&s, svg::render(rows, start, marks, title)).map_err(|source| {
        TimelineError::Io {
            what: "write",
            path: s.clone(),
            source,
        }
    })?;
    Ok((c, s))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::engine::Phase;
    use crate::migrate::journal::VERSION;

    #[test]
    fn percentiles_are_nearest_rank() {
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[7], 0.99), Some(7));
        let v: Vec<u32> = (1..=100).collect();
        assert_eq!(percentile(&v, 0.5), Some(50));
        assert_eq!(percentile(&v, 0.99), Some(99));
        assert_eq!(percentile(&v, 1.0), Some(100));
        assert_eq!(percentile(&v, 0.0), Some(1));
        // Ten samples: p99 is the largest, p50 the fifth.
        let v: Vec<u32> = (1..=10).collect();
        assert_eq!(percentile(&v, 0.99), Some(10));
        assert_eq!(percentile(&v, 0.5), Some(5));
    }

    #[test]
    fn attempts_land_in_the_second_they_started_and_empty_seconds_are_rows() {
        let mut b = Buckets::new(10_000, 3600);
        b.at(10_000).write_us.push(1_000);
        b.at(10_999).write_us.push(3_000);
        b.at(12_500).write_us.push(2_000);
        b.at(12_500).writes_failed += 1;
        b.at(9_000).read_us.push(500); // before the start: clamped to second 0
        b.extend_to(13_000);
        let rows = b.rows();
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0].writes, 2);
        assert_eq!(rows[0].write_p50_ms, Some(1.0));
        assert_eq!(rows[0].write_max_ms, Some(3.0));
        assert_eq!(rows[0].read_sees_newest, Some(true));
        assert_eq!(rows[1].writes, 0);
        assert_eq!(rows[1].write_p99_ms, None);
        assert_eq!(rows[2].writes_ok(), 0);
        assert_eq!(rows[3].unix_ms, 13_000);
        assert_eq!(rows[3].t_s, 3);
        let s = summary(&rows);
        assert_eq!((s.writes, s.writes_failed), (3, 1));
        assert_eq!(s.longest_seconds_without_ack, 3);
        // Bounded: an instant past the last second allowed goes in that second.
        let mut b = Buckets::new(0, 2);
        b.at(1_000_000).writes_failed += 1;
        assert_eq!(b.buckets.len(), 2);
    }

    #[test]
    fn marks_label_the_window_events_and_land_in_their_second() {
        let rec = |at_ms, event| Record {
            v: VERSION,
            migration: "42".into(),
            at_ms,
            event,
        };
        let rs = vec![
            rec(500, Event::WindowReset),
            rec(1_000, Event::StackCreating { name: "s".into() }),
            rec(
                2_100,
                Event::PhaseStarted {
                    phase: Phase::Capture,
                },
            ),
            rec(2_200, Event::WritersRepointing),
            rec(2_300, Event::WritersRepointed),
            rec(
                3_000,
                Event::Finished {
                    outcome: Outcome::Succeeded,
                    error: None,
                    report: None,
                },
            ),
        ];
        let m = marks(&rs, 1_000, 2_999);
        let labels: Vec<&str> = m.iter().map(|m| m.label.as_str()).collect();
        assert_eq!(labels, ["create stack", "capture", "repointed"]);
        let mut b = Buckets::new(1_000, 10);
        b.extend_to(2_500);
        let mut rows = b.rows();
        attach_marks(&mut rows, 1_000, &m);
        assert_eq!(rows[0].events, ["create stack"]);
        assert_eq!(rows[1].events, ["capture", "repointed"]);
        let text = csv(&rows);
        assert!(text.starts_with(CSV_HEADER));
        assert_eq!(text.lines().count(), 3);
        assert!(text.lines().nth(2).unwrap().ends_with(",capture;repointed"));
    }

    #[test]
    fn csv_fields_with_commas_are_quoted() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"x\","), "\"say \"\"x\"\",\"");
        assert_eq!(csv_field("http://h:8086"), "http://h:8086");
    }
}
