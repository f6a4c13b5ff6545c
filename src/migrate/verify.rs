//! Verification: prove that every point of the old instance is on the target before
//! anything is deleted.
//!
//! 1. Databases, retention policies and field types of the source exist on the target.
//! 2. Per retention policy, measurement, series and field: the target holds at least as
//!    many points as the source (the target may hold more: writes after cutover).
//! 3. Content: per series, the sums of numeric fields must agree; a series whose counts
//!    or sums differ, and a sample of the others, is compared point by point, page by
//!    page (bounded memory). A value that differs is accepted only when the target
//!    received a write for that very point after cutover (the live `touched` key set,
//!    fed by a subscription on the target; forwarding is asynchronous, so a mismatch
//!    waits for that write to be seen, at most 10 s); anything else is a corruption.
//!
//! Steps 2 and 3 may run for a measurement during the cutover, its command and quiet
//! period ([`verify_cold`]), when nothing can change it on the source any more: its
//! retention policy is captured and no write to it has reached the capture since the
//! capture started. Such a measurement's source content is then the one the dump copied,
//! and on the target only a writer's write after the repoint can change it (before, only
//! replays of captured writes arrive there), which the checks above already account for.
//! The final pass ([`verify_after`]) takes that early result only if the measurement is
//! still unwritten then; anything written in the meantime (a writer not yet repointed, a
//! late writer of the old instance) is compared again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;

use super::capture::{point_key, KeySet};
use crate::config::{ContentCheck, VerifyConfig};
use crate::influx::{ident, literal, FieldType, Influx, InfluxError, Series, Shard};

/// A span of time, both ends included, in nanoseconds since the epoch: what an aggregate
/// or a point-by-point comparison reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Span {
    pub from: i64,
    pub to: i64,
}

impl Span {
    /// InfluxDB's own time bounds (`models.MinNanoTime`/`MaxNanoTime`): all time.
    pub const ALL: Span = Span {
        from: -9_223_372_036_854_775_806,
        to: 9_223_372_036_854_775_806,
    };

    fn condition(&self) -> String {
        format!("time >= {} AND time <= {}", self.from, self.to)
    }
}

impl std::fmt::Display for Span {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if *self == Span::ALL {
            return f.write_str("all time");
        }
        let at = |ns: i64| match u64::try_from(ns) {
            Ok(ns) => {
                humantime::format_rfc3339_nanos(std::time::UNIX_EPOCH + Duration::from_nanos(ns))
                    .to_string()
            }
            Err(_) => format!("{ns} ns"),
        };
        write!(f, "{} to {}", at(self.from), at(self.to))
    }
}

/// `spans` named for an operator: the first three, and how many more.
fn show_spans(spans: &[Span]) -> String {
    let mut out: Vec<String> = spans.iter().take(3).map(Span::to_string).collect();
    if spans.len() > 3 {
        out.push(format!("and {} more", spans.len() - 3));
    }
    out.join(", ")
}

/// `spans` as the fewest disjoint spans, in order: those that overlap or touch are
/// merged (InfluxDB 1.x answers nothing to time conditions joined by OR, so each span is
/// one statement, and a point in two of them would be counted twice).
pub fn merge_spans(mut spans: Vec<Span>) -> Vec<Span> {
    spans.sort();
    let mut out: Vec<Span> = Vec::with_capacity(spans.len());
    for s in spans {
        match out.last_mut() {
            Some(last) if s.from <= last.to.saturating_add(1) => last.to = last.to.max(s.to),
            _ => out.push(s),
        }
    }
    out
}
const PAGE: usize = 10_000;
const MAX_PROBLEMS: usize = 50;

/// What verification found.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
pub struct VerifyReport {
    pub databases: usize,
    pub series: usize,
    /// Field values counted on the source (a point with 3 fields counts 3).
    pub source_values: u64,
    pub target_values: u64,
    pub series_compared_point_by_point: usize,
    pub points_compared: u64,
    /// Points whose value differs because the target received a newer write after cutover.
    pub overwritten_after_cutover: u64,
    /// After an interruption past the repoint: points whose value differs, which cannot
    /// be judged (the record of the target's direct writes was lost with the process).
    pub values_unverifiable: u64,
    #[serde(skip)]
    after_interruption: bool,
    pub problems: Vec<String>,
    pub problems_truncated: bool,
    /// Measurements (per retention policy) whose comparison ran during the cutover and
    /// still held at the end ([`verify_cold`]).
    #[serde(default)]
    pub measurements_verified_early: usize,
    /// How long that early pass took (it overlaps the cutover, not the verify phase).
    #[serde(default)]
    pub early_seconds: f64,
    /// Of those, the measurements proven by their data files instead of their aggregates:
    /// every shard of their database read back from the target as the dump sent it
    /// ([`ReadBack`]).
    #[serde(default)]
    pub measurements_proven_by_files: usize,
    /// And those proven by their files in part: the spans of time of the shards that did
    /// not read back as sent were compared by their aggregates.
    #[serde(default)]
    pub measurements_proven_partly_by_files: usize,
    /// That read-back: shards, bytes, seconds.
    #[serde(default)]
    pub read_back_shards: usize,
    #[serde(default)]
    pub read_back_bytes: u64,
    #[serde(default)]
    pub read_back_seconds: f64,
    /// The shards were read and digested on the target's host (only digests crossed SSH).
    #[serde(default)]
    pub read_back_on_host: bool,
    /// From the first comparison (early or not) to the end of verification: how long the
    /// migration spent verifying, wherever it overlapped.
    #[serde(default)]
    pub span_seconds: f64,
    /// Mismatches not (yet) explained by a post-cutover write: (key, description).
    #[serde(skip)]
    pending: Vec<(u64, String)>,
}

impl VerifyReport {
    fn problem(&mut self, p: String) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(p);
        } else {
            self.problems_truncated = true;
        }
    }
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }

    /// Add one measurement's findings, made by an earlier pass.
    fn absorb(&mut self, o: VerifyReport) {
        self.series += o.series;
        self.source_values += o.source_values;
        self.target_values += o.target_values;
        self.series_compared_point_by_point += o.series_compared_point_by_point;
        self.points_compared += o.points_compared;
        self.overwritten_after_cutover += o.overwritten_after_cutover;
        self.values_unverifiable += o.values_unverifiable;
        self.measurements_proven_by_files += o.measurements_proven_by_files;
        self.measurements_proven_partly_by_files += o.measurements_proven_partly_by_files;
        self.problems_truncated |= o.problems_truncated;
        for p in o.problems {
            self.problem(p);
        }
        self.pending.extend(o.pending);
    }

    /// Judge the mismatches left pending, once the target's forwarding had time to settle:
    /// a point written directly to the target after cutover is an overwrite, anything else
    /// a corruption.
    fn settle(&mut self, touched: Option<&Mutex<KeySet>>) {
        for (key, desc) in std::mem::take(&mut self.pending) {
            if is_touched(touched, key) {
                self.overwritten_after_cutover += 1;
            } else {
                self.problem(desc);
            }
        }
    }
}

/// Whether nothing can write to `(database, retention policy, measurement)` on the source
/// any more (see the module's introduction).
pub type Cold<'a> = &'a (dyn Fn(&str, &str, &str) -> bool + Send + Sync);

/// Measurements compared before the source went quiet, each with its own findings.
#[derive(Debug, Default)]
pub struct Early {
    done: HashMap<(String, String, String), VerifyReport>,
    /// The series each measurement had on both servers when it was compared (hashes of
    /// their tags): the final pass checks they are still on the target.
    series: HashMap<(String, String, String), std::collections::HashSet<u64>>,
    pub seconds: f64,
    read_back: ReadBack,
}

impl Early {
    pub fn measurements(&self) -> usize {
        self.done.len()
    }
}

/// Series identity inside one retention policy and measurement: sorted non-empty tags.
type Tags = BTreeMap<String, String>;

fn tags_of(s: &Series) -> Tags {
    s.tags
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .collect()
}

fn show_tags(t: &Tags) -> String {
    if t.is_empty() {
        return "(no tags)".into();
    }
    t.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// One series' aggregates per span of time read (its index in the spans): `(span,
/// field) -> count` and `(span, field) -> sum` (the `count_f` and `sum_f` columns of its
/// aggregate rows).
#[derive(Default)]
struct Aggregates {
    counts: HashMap<(usize, String), Value>,
    sums: HashMap<(usize, String), Value>,
}

impl Aggregates {
    fn add_row(&mut self, span: usize, s: &Series) {
        let Some(row) = s.values.first() else {
            return;
        };
        for (c, v) in s.columns.iter().zip(row) {
            if let Some(f) = c.strip_prefix("count_") {
                self.counts.insert((span, f.to_string()), v.clone());
            } else if let Some(f) = c.strip_prefix("sum_") {
                self.sums.insert((span, f.to_string()), v.clone());
            }
        }
    }
    fn count(&self, span: usize, f: &str) -> u64 {
        self.counts
            .get(&(span, f.to_string()))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }
    fn sum(&self, span: usize, f: &str) -> Option<&Value> {
        self.sums.get(&(span, f.to_string()))
    }
}

/// Every series' aggregates on one server, from the answers of `queries` (one statement
/// asking them all, or one per aggregate), up to `at_once` of them running together.
/// InfluxDB 1.6 reads the data once per aggregate whether they come in one statement or
/// several, and one statement keeps about one core busy; several use the server's other
/// cores.
async fn per_series(
    influx: &Influx,
    db: &str,
    queries: &[(usize, String)],
    at_once: usize,
) -> Result<HashMap<Tags, Aggregates>, InfluxError> {
    // Streamed: the answer has a row per series, and a measurement may have millions of
    // series; only the aggregates are kept, never the whole answer.
    let out: Mutex<HashMap<Tags, Aggregates>> = Mutex::default();
    let out = &out;
    let mut pending = Vec::with_capacity(queries.len());
    for (span, q) in queries {
        let record = move |s: Series| {
            out.lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(tags_of(&s))
                .or_default()
                .add_row(*span, &s);
            Ok(())
        };
        pending.push(influx.query_chunked(db, q, 10_000, record));
    }
    let mut answers = futures_util::stream::iter(pending).buffer_unordered(at_once.max(1));
    while let Some(answer) = answers.next().await {
        answer?;
    }
    drop(answers);
    let mut out = out.lock().unwrap_or_else(|e| e.into_inner());
    Ok(std::mem::take(&mut *out))
}

/// Equal aggregate sums: integer sums exactly, float sums within a relative 1e-9 (the
/// order of a float summation may differ between the two servers' shard layouts).
fn same_sum(a: &Value, b: &Value) -> bool {
    if let (Some(x), Some(y)) = (a.as_i64(), b.as_i64()) {
        return x == y;
    }
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) if a.is_f64() || b.is_f64() => {
            x == y || (x - y).abs() <= 1e-9 * x.abs().max(y.abs())
        }
        _ => a == b,
    }
}

fn sampled(t: &Tags, n: usize, total: usize) -> bool {
    if n == 0 {
        return false;
    }
    if total <= n {
        return true;
    }
    let mut h = DefaultHasher::new();
    t.hash(&mut h);
    (h.finish() % total as u64) < n as u64
}

/// Compare `source` and `target`; problems are collected in the report, I/O errors returned.
///
/// `after_interruption`: the migration resumes after a crash past the repoint, when the
/// record of the target's direct writes died with the process. Existence, counts and
/// types stay strict; a value that differs cannot be judged and is counted in
/// `values_unverifiable` instead of failing.
pub async fn verify(
    source: &Influx,
    target: &Influx,
    cfg: &VerifyConfig,
    touched: Option<&Mutex<KeySet>>,
    after_interruption: bool,
) -> Result<VerifyReport, InfluxError> {
    verify_after(
        source,
        target,
        cfg,
        touched,
        after_interruption,
        Early::default(),
        &|_, _, _| false,
    )
    .await
}

/// Database, retention policy, measurement.
type MeasurementKey = (String, String, String);

/// A measurement nothing writes to any more: database, retention policy, name, and its
/// fields with whether each is numeric.
type ColdMeasurement = (String, String, String, Vec<(String, bool)>);

/// The measurements `cold` names that have points (fields) in a retention policy, and
/// whose database is on the target (the final pass names a missing one).
async fn cold_measurements(
    source: &Influx,
    target: &Influx,
    cold: Cold<'_>,
) -> Result<Vec<ColdMeasurement>, InfluxError> {
    let mut out = Vec::new();
    let target_dbs = target.databases().await?;
    for db in source.databases().await? {
        if !target_dbs.contains(&db) {
            continue;
        }
        let measurements = source.measurements(&db).await?;
        for rp in source.retention_policies(&db).await? {
            let src_fields = source.field_keys_in(&db, &rp.name).await?;
            for m in &measurements {
                if !cold(&db, &rp.name, m) {
                    continue;
                }
                let fields: Vec<(String, bool)> = fields_of(&src_fields, m)
                    .into_iter()
                    .map(|(f, n)| (f.to_string(), n))
                    .collect();
                if !fields.is_empty() {
                    out.push((db.clone(), rp.name.clone(), m.clone(), fields));
                }
            }
        }
    }
    Ok(out)
}

/// What reading the target's shards back found, before the repoint: the databases whose
/// every shard the dump streamed the target's engine still holds as sent.
///
/// Why that proves a cold measurement of such a database as much as its aggregates and a
/// sample would (ARCHITECTURE.md, "Verification"): the source's shard backup writes its
/// cache out before it sends the files (InfluxDB's `Engine.CreateSnapshot`), so the files
/// sent hold every point acknowledged before it, and a cold measurement has had no write
/// since the capture started, which was before; the target's own backup sends the files
/// its engine has open, so the same files, byte for byte (SHA-256), are what it serves.
/// A deletion pending there (a tombstone) or a file compacted away proves nothing of that
/// shard, whose span of time is then compared by its aggregates. Files added since hold
/// only replays, which touch written measurements. The index, rebuilt from the files, is
/// checked by listing the series on both sides.
///
/// Per shard: a point of a cold measurement is in one shard of its retention policy on
/// the source, inside that shard's span (its shard group's start and end). If that shard
/// read back as sent, its files hold the point on the target; if not, the aggregates of
/// the span, read on both sides, count it. Shard groups of one retention policy may
/// overlap (one made after its duration changed), so a span's aggregates also count
/// points of the proven shards inside it, on both sides alike: more read, nothing less
/// proven.
#[derive(Debug, Default, Clone)]
pub struct ReadBack {
    /// The databases proven by their files, wholly or in part: per retention policy, the
    /// spans of time its files do not prove (of the shards that did not read back as sent,
    /// or were not sent), merged ([`merge_spans`]). A database not here is not proven by
    /// its files at all.
    pub databases: HashMap<String, HashMap<String, Vec<Span>>>,
    /// Read and digested on the target's host, only the digests crossing SSH.
    pub on_host: bool,
    pub shards: usize,
    pub bytes: u64,
    pub seconds: f64,
}

/// The target's aggregates of the measurements nothing writes to any more, read before
/// the repoint, while no writer uses the target ([`target_first`]).
#[derive(Default)]
pub struct TargetFirst {
    read: HashMap<MeasurementKey, TargetRead>,
    /// The databases proven by their files: their cold measurements need no aggregate.
    pub read_back: ReadBack,
    pub seconds: f64,
}

/// What the read-back found of one shard of the source: its database, its id there, and
/// `Ok` when its files prove its points on the target, else why not.
pub struct Judged {
    pub database: String,
    pub source: u64,
    pub proven: Result<(), String>,
}

/// Beyond this many spans of time in one retention policy, its cold measurements are
/// aggregated whole: each span is a statement that answers a row per series, and many
/// of them would cost more than one scan (found by review).
pub const MAX_SPANS: usize = 32;

/// What the files prove, from every shard [`Judged`] and the source's shards as `SHOW
/// SHARDS` lists them now (their retention policies and spans; `Err`, why they cannot
/// be listed).
#[derive(Debug, Default)]
pub struct FilesProve {
    /// As [`ReadBack::databases`].
    pub databases: HashMap<String, HashMap<String, Vec<Span>>>,
    /// The databases the files prove nothing of, with why.
    pub whole: BTreeMap<String, String>,
    /// Per database the files prove in part, what is said of each shard that is not.
    pub spans: BTreeMap<String, Vec<String>>,
}

/// Which spans of time of which retention policies the files prove ([`ReadBack`]). A
/// database is proven in part when at least one of its shards is; a shard that is not
/// adds its span to what its retention policy's aggregates read, unless that span
/// cannot be known (the shard is no longer listed, its retention policy or times cannot
/// be read, or the shards cannot be listed): then its database's aggregates read all
/// time. So does a retention policy none of whose shards is proven, or one with more
/// than [`MAX_SPANS`] spans.
pub fn files_prove(judged: &[Judged], listing: Result<&[Shard], &str>) -> FilesProve {
    let mut out = FilesProve::default();
    // Per database and retention policy, each shard not proven: why, and its span.
    type NotProven<'a> = (&'a str, &'a Shard, Span);
    let mut unproven: BTreeMap<(&str, &str), Vec<NotProven>> = BTreeMap::new();
    let mut proven_rps: HashSet<(&str, &str)> = HashSet::new();
    let mut proven_dbs: HashSet<&str> = HashSet::new();
    // A database none of whose shards is proven: the first reason given.
    let mut first_why: HashMap<&str, &str> = HashMap::new();
    for j in judged {
        let db = j.database.as_str();
        let listed = listing
            .map_err(|e| format!("the source's shards could not be listed ({e})"))
            .and_then(|l| {
                l.iter()
                    .find(|s| s.id == j.source && s.database == db)
                    .ok_or_else(|| format!("the source no longer lists shard {}", j.source))
            });
        let why = match &j.proven {
            Ok(()) => {
                proven_dbs.insert(db);
                if let Ok(s) = listed {
                    proven_rps.insert((db, s.retention_policy.as_str()));
                }
                continue;
            }
            Err(why) => why.as_str(),
        };
        first_why.entry(db).or_insert(why);
        let span = listed.and_then(|s| match s.span {
            Some((from, to)) if !s.retention_policy.is_empty() => Ok((s, Span { from, to })),
            _ => Err(format!(
                "its retention policy ({:?}) or span of time ({:?} to {:?}) cannot be read",
                s.retention_policy, s.start_time, s.end_time
            )),
        });
        match span {
            Ok((s, span)) => unproven
                .entry((db, s.retention_policy.as_str()))
                .or_default()
                .push((why, s, span)),
            Err(e) => {
                out.whole
                    .entry(db.to_string())
                    .or_insert_with(|| format!("{why}, and {e}"));
            }
        }
    }
    for (db, why) in first_why {
        if !proven_dbs.contains(db) && !out.whole.contains_key(db) {
            out.whole.insert(
                db.to_string(),
                format!("{why} (and no shard of this database reads back as sent)"),
            );
        }
    }
    for db in &proven_dbs {
        if out.whole.contains_key(*db) {
            continue;
        }
        let mut per_rp: HashMap<String, Vec<Span>> = HashMap::new();
        let said = out.spans.entry(db.to_string()).or_default();
        for ((_, rp), shards) in unproven
            .range((*db, "")..)
            .take_while(|((d, _), _)| d == db)
        {
            let merged = merge_spans(shards.iter().map(|(_, _, span)| *span).collect());
            let over_all_time = if !proven_rps.contains(&(*db, *rp)) {
                Some("none of its shards reads back as sent")
            } else if merged.len() > MAX_SPANS {
                Some("more spans than are worth a statement each")
            } else {
                None
            };
            for (why, s, _) in shards {
                said.push(match over_all_time {
                    None => format!(
                        "{why}; its points (retention policy {rp:?} from {} to {}) are compared by their aggregates instead of its files",
                        s.start_time, s.end_time
                    ),
                    Some(because) => format!(
                        "{why}; retention policy {rp:?} is compared by its aggregates over all time ({because})"
                    ),
                });
            }
            per_rp.insert(
                rp.to_string(),
                match over_all_time {
                    Some(_) => vec![Span::ALL],
                    None => merged,
                },
            );
        }
        out.databases.insert(db.to_string(), per_rp);
    }
    out.spans.retain(|_, said| !said.is_empty());
    out
}

impl ReadBack {
    /// What of `db`.`rp` is compared by its aggregates: `None`, all of it (its database is
    /// not proven by its files); else the spans of time its files do not prove, none
    /// when they prove all of it.
    pub fn unproven(&self, db: &str, rp: &str) -> Option<&[Span]> {
        self.databases
            .get(db)
            .map(|rps| rps.get(rp).map_or(&[][..], Vec::as_slice))
    }

    /// The spans of time the aggregates of `db`.`rp` read: all time when its files prove
    /// none of it.
    fn spans(&self, db: &str, rp: &str) -> Vec<Span> {
        self.unproven(db, rp)
            .map_or_else(|| vec![Span::ALL], <[Span]>::to_vec)
    }
}

/// One measurement's aggregates read on the target before the repoint.
struct TargetRead {
    /// The fields asked about (with whether each is numeric).
    fields: Vec<(String, bool)>,
    /// The spans of time read.
    spans: Vec<Span>,
    per_series: HashMap<Tags, Aggregates>,
}

impl TargetFirst {
    pub fn measurements(&self) -> usize {
        self.read.len()
    }
}

/// Read on the target the aggregates of every measurement `cold` names (`verify.target_first`).
///
/// Sound for the same reason as [`verify_cold`]: until the repoint only replays of
/// captured writes reach the target, and they touch written measurements only, so a cold
/// measurement holds there what the dump copied; after the repoint a writer can only add
/// points or overwrite them with newer values, which the comparison already allows (the
/// target's counts may be higher; a value that differs is judged point by point against
/// the watch). The point-by-point reads happen after the repoint, on the target as it is
/// then.
/// `at_once`: aggregate statements run together on the target (its cores: nothing else
/// runs there).
/// `read_back`: what the files prove, which is not read.
pub async fn target_first(
    source: &Influx,
    target: &Influx,
    cfg: &VerifyConfig,
    cold: Cold<'_>,
    at_once: usize,
    read_back: ReadBack,
) -> Result<TargetFirst, InfluxError> {
    let started = Instant::now();
    let target_q = target.with_timeout(cfg.query_timeout);
    let mut out = TargetFirst {
        read_back,
        ..TargetFirst::default()
    };
    for (db, rp, m, fields) in cold_measurements(source, target, cold).await? {
        let spans = out.read_back.spans(&db, &rp);
        if spans.is_empty() {
            continue;
        }
        let from = format!("{}.{}.{}", ident(&db), ident(&rp), ident(&m));
        let asked: Vec<(&str, bool)> = fields.iter().map(|(f, n)| (f.as_str(), *n)).collect();
        let queries = aggregate_queries(cfg, &from, &asked, at_once, &spans);
        let t = Instant::now();
        let aggs = per_series(&target_q, &db, &queries, at_once).await?;
        tracing::debug!(
            measurement = from,
            series = aggs.len(),
            seconds = t.elapsed().as_secs_f64(),
            "verify: the target's aggregates, before the repoint"
        );
        out.read.insert(
            (db, rp, m),
            TargetRead {
                fields,
                spans,
                per_series: aggs,
            },
        );
    }
    // The read-back is part of this side's reading.
    out.seconds = started.elapsed().as_secs_f64() + out.read_back.seconds;
    Ok(out)
}

/// Steps 2 and 3 for the measurements `cold` names, before the source has gone quiet.
/// Their findings wait in [`Early`] for [`verify_after`], which keeps them only for the
/// measurements still cold then. With `first`, a measurement's target aggregates read
/// before the repoint are used instead of being read again. `at_once`: the aggregate
/// statements run together on the source and on the target. I/O errors are returned;
/// problems stay in the findings.
pub async fn verify_cold(
    source: &Influx,
    target: &Influx,
    cfg: &VerifyConfig,
    touched: Option<&Mutex<KeySet>>,
    cold: Cold<'_>,
    mut first: TargetFirst,
    at_once: [usize; 2],
) -> Result<Early, InfluxError> {
    let started = Instant::now();
    let (source, target) = (
        &source.with_timeout(cfg.query_timeout),
        &target.with_timeout(cfg.query_timeout),
    );
    let mut early = Early::default();
    for (db, rp, m, fields) in cold_measurements(source, target, cold).await? {
        let from = format!("{}.{}.{}", ident(&db), ident(&rp), ident(&m));
        let spans = first.read_back.spans(&db, &rp);
        // Proven by its files, wholly or in part: its series listed on both sides.
        let listed = if spans != [Span::ALL] {
            let wholly = spans.is_empty();
            Some(series_listed_on_both(source, target, &db, &rp, &m, wholly).await?)
        } else {
            None
        };
        let key = (db, rp, m);
        if spans.is_empty() {
            let (rep, series) = listed.unwrap_or_default();
            early.done.insert(key.clone(), rep);
            early.series.insert(key, series);
            continue;
        }
        // Read about the same fields and spans of time, or read again.
        let read = first
            .read
            .remove(&key)
            .filter(|r| r.fields == fields && r.spans == spans)
            .map(|r| r.per_series);
        let fields: Vec<(&str, bool)> = fields.iter().map(|(f, n)| (f.as_str(), *n)).collect();
        let (db, rp, m) = &key;
        let mut rep = VerifyReport::default();
        let series = verify_measurement(
            source, target, cfg, touched, db, rp, m, &from, &fields, at_once, &spans, read,
            &mut rep,
        )
        .await?;
        let series = match listed {
            // The spans' aggregates saw the series with a point in them; the listing, all.
            Some((by_files, listed)) => {
                rep.series = by_files.series;
                rep.measurements_proven_partly_by_files = 1;
                rep.problems_truncated |= by_files.problems_truncated;
                for p in by_files.problems {
                    rep.problem(p);
                }
                listed
            }
            None => series.iter().map(tags_hash).collect(),
        };
        early.done.insert(key.clone(), rep);
        early.series.insert(key.clone(), series);
    }
    if early.done.values().any(|r| !r.pending.is_empty()) {
        let keys: Vec<u64> = early
            .done
            .values()
            .flat_map(|r| r.pending.iter().map(|(k, _)| *k))
            .collect();
        await_touched(&keys, touched).await;
        for rep in early.done.values_mut() {
            rep.settle(touched);
        }
    }
    early.seconds = started.elapsed().as_secs_f64() + first.seconds;
    early.read_back = first.read_back;
    Ok(early)
}

/// A measurement proven by its files ([`ReadBack`]): the series the source's index lists
/// for it must be listed by the target's too (the index is rebuilt from the files, not
/// copied). Its findings, and the series it has (hashes of their tags) for the final
/// pass's check.
async fn series_listed_on_both(
    source: &Influx,
    target: &Influx,
    db: &str,
    rp: &str,
    m: &str,
    wholly: bool,
) -> Result<(VerifyReport, std::collections::HashSet<u64>), InfluxError> {
    let q = format!("SHOW SERIES FROM {}.{}", ident(rp), ident(m));
    let (on_source, on_target) =
        tokio::try_join!(listed_series(source, db, &q), listed_series(target, db, &q))?;
    let mut rep = VerifyReport {
        series: on_source.len(),
        measurements_proven_by_files: 1,
        ..VerifyReport::default()
    };
    let mut missing: Vec<String> = on_source
        .iter()
        .filter(|(h, _)| !on_target.contains_key(*h))
        .map(|(_, t)| show_tags(t))
        .collect();
    missing.sort();
    let although = match wholly {
        true => ", although the files read back are there",
        false => "",
    };
    for gone in missing.into_iter().take(MAX_PROBLEMS + 1) {
        rep.problem(format!(
            "{db}.{rp}.{m} [{gone}]: series is missing from the target's index{although}"
        ));
    }
    // The series both have: one missing is reported here, not again by the final pass.
    Ok((
        rep,
        on_source
            .into_keys()
            .filter(|h| on_target.contains_key(h))
            .collect(),
    ))
}

/// Every step, taking from `early` the findings of each measurement still `cold`.
pub async fn verify_after(
    source: &Influx,
    target: &Influx,
    cfg: &VerifyConfig,
    touched: Option<&Mutex<KeySet>>,
    after_interruption: bool,
    mut early: Early,
    cold: Cold<'_>,
) -> Result<VerifyReport, InfluxError> {
    // Every query here reads a whole measurement or series: on a large database one runs
    // for minutes, far beyond what an ordinary request may take.
    let (source, target) = (
        &source.with_timeout(cfg.query_timeout),
        &target.with_timeout(cfg.query_timeout),
    );
    let mut rep = VerifyReport {
        after_interruption,
        early_seconds: early.seconds,
        read_back_shards: early.read_back.shards,
        read_back_bytes: early.read_back.bytes,
        read_back_seconds: early.read_back.seconds,
        read_back_on_host: early.read_back.on_host,
        ..VerifyReport::default()
    };
    let target_dbs = target.databases().await?;
    for db in source.databases().await? {
        rep.databases += 1;
        if !target_dbs.contains(&db) {
            rep.problem(format!("database {db:?} is missing on the target"));
            continue;
        }
        let src_rps = source.retention_policies(&db).await?;
        let dst_rps = target.retention_policies(&db).await?;
        for rp in &src_rps {
            match dst_rps.iter().find(|r| r.name == rp.name) {
                None => rep.problem(format!(
                    "{db}: retention policy {:?} is missing on the target",
                    rp.name
                )),
                Some(d) if d != rp => rep.problem(format!(
                    "{db}: retention policy {:?} differs: source {rp:?}, target {d:?}",
                    rp.name
                )),
                Some(_) => {}
            }
        }
        let measurements = source.measurements(&db).await?;
        // Field keys per retention policy: a bare SHOW FIELD KEYS sees the default one only,
        // and continuous-query outputs often live in another.
        for rp in &src_rps {
            let src_fields = source.field_keys_in(&db, &rp.name).await?;
            let dst_fields = target.field_keys_in(&db, &rp.name).await?;
            for f in &src_fields {
                if !dst_fields.contains(f) {
                    let other = dst_fields.iter().find(|d| d.0 == f.0 && d.1 == f.1);
                    rep.problem(match other {
                        Some(o) => format!(
                            "{db}.{}.{}: field {:?} is {:?} on the source but {:?} on the target",
                            rp.name, f.0, f.1, f.2, o.2
                        ),
                        None => format!(
                            "{db}.{}.{}: field {:?} ({:?}) is missing on the target",
                            rp.name, f.0, f.1, f.2
                        ),
                    });
                }
            }
            for m in &measurements {
                let key = (db.clone(), rp.name.clone(), m.clone());
                let compared_series = early.series.remove(&key);
                if let Some(found) = early.done.remove(&key) {
                    if cold(&db, &rp.name, m) {
                        // Compared before: the target as it was then. Its series must
                        // still be there (an index listing, not a scan of the data).
                        let compared = compared_series.unwrap_or_default();
                        for gone in series_gone(source, target, &db, &rp.name, m, &compared).await?
                        {
                            rep.problem(format!(
                                "{db}.{}.{m} [{gone}]: series is missing on the target (it was there when compared during the cutover)",
                                rp.name
                            ));
                        }
                        rep.absorb(found);
                        rep.measurements_verified_early += 1;
                        continue;
                    }
                }
                let fields = fields_of(&src_fields, m);
                let from = format!("{}.{}.{}", ident(&db), ident(&rp.name), ident(m));
                let at_once = [cfg.parallel_queries; 2];
                verify_measurement(
                    source,
                    target,
                    cfg,
                    touched,
                    &db,
                    &rp.name,
                    m,
                    &from,
                    &fields,
                    at_once,
                    &[Span::ALL],
                    None,
                    &mut rep,
                )
                .await?;
            }
        }
    }
    if !rep.pending.is_empty() {
        // A write to the target just before we read it may not have been forwarded yet.
        let keys: Vec<u64> = rep.pending.iter().map(|(k, _)| *k).collect();
        await_touched(&keys, touched).await;
        rep.settle(touched);
    }
    Ok(rep)
}

/// The series of `db`.`rp`.`m` that both servers had when it was compared (`compared`,
/// hashes of their tags) and that the source's index still lists but the target's no
/// longer does, named as [`show_tags`] prints them, sorted, at most [`MAX_PROBLEMS`] + 1.
/// Index listings, not scans of the data; a series gone from both (a shard group that
/// expired meanwhile) is not a loss.
async fn series_gone(
    source: &Influx,
    target: &Influx,
    db: &str,
    rp: &str,
    m: &str,
    compared: &std::collections::HashSet<u64>,
) -> Result<Vec<String>, InfluxError> {
    if compared.is_empty() {
        return Ok(Vec::new());
    }
    // `SHOW SERIES` looks at the default retention policy unless FROM names one.
    let q = format!("SHOW SERIES FROM {}.{}", ident(rp), ident(m));
    let (on_source, on_target) =
        tokio::try_join!(listed_series(source, db, &q), listed_series(target, db, &q))?;
    let mut gone: Vec<String> = on_source
        .iter()
        .filter(|(h, _)| compared.contains(*h) && !on_target.contains_key(*h))
        .map(|(_, t)| show_tags(t))
        .collect();
    gone.sort();
    gone.truncate(MAX_PROBLEMS + 1);
    Ok(gone)
}

/// The series a `SHOW SERIES` statement lists, by [`tags_hash`].
async fn listed_series(on: &Influx, db: &str, q: &str) -> Result<HashMap<u64, Tags>, InfluxError> {
    let mut out: HashMap<u64, Tags> = HashMap::new();
    on.query_chunked(db, q, 10_000, |s: Series| {
        for row in &s.values {
            if let Some(tags) = row.first().and_then(Value::as_str).and_then(key_tags) {
                out.insert(tags_hash(&tags), tags);
            }
        }
        Ok(())
    })
    .await?;
    Ok(out)
}

/// A series' identity in a few bytes (the early pass keeps one per series).
fn tags_hash(t: &Tags) -> u64 {
    let mut h = DefaultHasher::new();
    t.hash(&mut h);
    h.finish()
}

/// The tags of a series key as `SHOW SERIES` prints it (`m,k=v,k2=v2`, with `\,`, `\=`
/// and `\ ` escaped), the empty ones left out as [`tags_of`] does; `None` for a key that
/// is not one.
fn key_tags(key: &str) -> Option<Tags> {
    let mut tags = Tags::new();
    // The parts between unescaped commas; the first is the measurement.
    let mut parts: Vec<(Option<String>, String)> = vec![(None, String::new())];
    let mut chars = key.chars();
    while let Some(c) = chars.next() {
        let in_tags = parts.len() > 1;
        let (k, cur) = parts.last_mut()?;
        match c {
            '\\' => match chars.next() {
                Some(e @ (',' | '=' | ' ')) => cur.push(e),
                Some(e) => {
                    cur.push('\\');
                    cur.push(e);
                }
                None => cur.push('\\'),
            },
            ',' => parts.push((None, String::new())),
            '=' if k.is_none() && in_tags => *k = Some(std::mem::take(cur)),
            c => cur.push(c),
        }
    }
    for (k, v) in parts.into_iter().skip(1) {
        let k = k?;
        if !v.is_empty() {
            tags.insert(k, v);
        }
    }
    Some(tags)
}

/// A measurement's fields in one retention policy, with whether each is numeric. A field
/// stored with another type in another shard is listed once per type by InfluxDB; here
/// it is one field, numeric if any of its types is.
fn fields_of<'a>(fields: &'a [(String, String, FieldType)], m: &str) -> Vec<(&'a str, bool)> {
    let mut out: Vec<(&str, bool)> = Vec::new();
    for (_, f, t) in fields.iter().filter(|(mm, _, _)| mm == m) {
        match out.iter_mut().find(|(g, _)| *g == f.as_str()) {
            Some((_, numeric)) => *numeric |= t.is_numeric(),
            None => out.push((f.as_str(), t.is_numeric())),
        }
    }
    out
}

/// How long a write to the target may take to reach the watch receiver.
const SETTLE: Duration = Duration::from_secs(10);

/// Wait, at most [`SETTLE`], until a writer's write to each point of `keys` has been seen
/// on the target. The watch receiver learns of such a write through the target's
/// forwarding, which is asynchronous and falls behind when the receiver or the link is
/// slow: a fixed second was too short once InfluxDB queued for it (found by a test that
/// slows the watch receiver), and longer than needed otherwise. Waiting cannot make a
/// corrupted point pass: it passes only once a writer's write to that very point after
/// cutover is seen. Without a watch nothing can arrive.
async fn await_touched(keys: &[u64], touched: Option<&Mutex<KeySet>>) {
    let Some(t) = touched else {
        return;
    };
    // A key an overflowed set does not hold can never be seen (found by review).
    let settled = || {
        let g = t.lock().unwrap_or_else(|e| e.into_inner());
        keys.iter()
            .all(|&k| g.written_directly(k) || (g.overflowed && !g.arrivals.contains_key(&k)))
    };
    let deadline = tokio::time::Instant::now() + SETTLE;
    while !settled() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Whether a writer wrote `key` directly to the target after cutover. With an overflowed
/// key set the answer is unknown, and unknown is "no": the mismatch is reported.
fn is_touched(touched: Option<&Mutex<KeySet>>, key: u64) -> bool {
    touched.is_some_and(|t| {
        let g = t.lock().unwrap_or_else(|e| e.into_inner());
        g.written_directly(key)
    })
}

/// The statements that read a measurement's aggregates over `spans` of time, each with
/// the index of its span: every field's count and every numeric field's sum (with
/// `verify.content: full`), in one statement per span, or one each when `at_once` of
/// them are to run together.
fn aggregate_queries(
    cfg: &VerifyConfig,
    from: &str,
    fields: &[(&str, bool)],
    at_once: usize,
    spans: &[Span],
) -> Vec<(usize, String)> {
    let with_sums = cfg.content == ContentCheck::Full;
    let mut aggs: Vec<String> = fields
        .iter()
        .map(|(f, _)| format!("COUNT({}) AS {}", ident(f), ident(&format!("count_{f}"))))
        .collect();
    if with_sums {
        aggs.extend(
            fields
                .iter()
                .filter(|(_, numeric)| *numeric)
                .map(|(f, _)| format!("SUM({}) AS {}", ident(f), ident(&format!("sum_{f}")))),
        );
    }
    // One at a time, one statement asks them all: the same passes over the data, fewer
    // answers to read (early pass at 10M points, three runs each: 10.6-11.8 s as one
    // statement, 11.2-12.2 s as six).
    let groups: Vec<String> = if at_once > 1 {
        aggs
    } else {
        vec![aggs.join(", ")]
    };
    spans
        .iter()
        .enumerate()
        .flat_map(|(i, span)| {
            groups.iter().map(move |a| {
                let q = format!(
                    "SELECT {a} FROM {from} WHERE {} GROUP BY *",
                    span.condition()
                );
                (i, q)
            })
        })
        .collect()
}

/// Steps 2 and 3 for one measurement of one retention policy, over `spans` of time (the
/// whole measurement with [`Span::ALL`]); `at_once`: the aggregate statements run
/// together on the source and on the target; `target_read`: the target's aggregates of
/// the same spans when they were read before ([`target_first`]).
#[allow(clippy::too_many_arguments)]
async fn verify_measurement(
    source: &Influx,
    target: &Influx,
    cfg: &VerifyConfig,
    touched: Option<&Mutex<KeySet>>,
    db: &str,
    rp: &str,
    m: &str,
    from: &str,
    fields: &[(&str, bool)],
    at_once: [usize; 2],
    spans: &[Span],
    target_read: Option<HashMap<Tags, Aggregates>>,
    rep: &mut VerifyReport,
) -> Result<Vec<Tags>, InfluxError> {
    if fields.is_empty() {
        // No field in this retention policy: no point either.
        return Ok(Vec::new());
    }
    let read = |on, at_once| {
        let queries = aggregate_queries(cfg, from, fields, at_once, spans);
        async move { per_series(on, db, &queries, at_once).await }
    };
    let t = std::time::Instant::now();
    let (sc, tc) = match target_read {
        Some(tc) => (read(source, at_once[0]).await?, tc),
        None => tokio::try_join!(read(source, at_once[0]), read(target, at_once[1]))?,
    };
    tracing::debug!(
        measurement = from,
        series = sc.len(),
        seconds = t.elapsed().as_secs_f64(),
        "verify: aggregates"
    );
    let total = sc.len();
    let mut to_compare = Vec::new();
    // Each span compared on its own: a loss in one is not made up for by more in another.
    let whole = spans == [Span::ALL];
    let span_said = |i: usize| match spans.get(i) {
        Some(s) if !whole => format!(" from {s}"),
        _ => String::new(),
    };
    for (tags, src) in &sc {
        rep.series += 1;
        let where_ = format!("{db}.{rp}.{m} [{}]", show_tags(tags));
        let Some(dst) = tc.get(tags) else {
            rep.problem(match whole {
                true => format!("{where_}: series is missing on the target"),
                false => format!(
                    "{where_}: series has no point on the target from {}, what its files do not prove",
                    show_spans(spans)
                ),
            });
            continue;
        };
        let mut suspicious = false;
        // A field a series has no value of has no count (and no sum) in its answer.
        for i in 0..spans.len() {
            for (f, _) in fields {
                let (s, t) = (src.count(i, f), dst.count(i, f));
                rep.source_values += s;
                rep.target_values += t;
                if t < s {
                    rep.problem(format!("{where_}: field {f:?}{}: {s} points on the source, only {t} on the target ({} missing)", span_said(i), s - t));
                } else if t > s {
                    suspicious = true;
                }
            }
            suspicious |= fields.iter().filter(|(_, numeric)| *numeric).any(|(f, _)| {
                match (src.sum(i, f), dst.sum(i, f)) {
                    (None, None) => false,
                    (Some(a), Some(b)) => !same_sum(a, b),
                    _ => true,
                }
            });
        }
        if cfg.content == ContentCheck::Full
            && (suspicious || sampled(tags, cfg.sample_series, total))
        {
            to_compare.push((tags, where_));
        }
    }
    // The series both servers had: a series missing on the target is reported above.
    let source_series: Vec<Tags> = sc.keys().filter(|t| tc.contains_key(*t)).cloned().collect();
    if to_compare.is_empty() {
        return Ok(source_series);
    }
    // Tag conditions must name every tag key of the measurement: a missing tag is ''.
    let mut tag_keys = Vec::new();
    for s in source
        .query(Some(db), &format!("SHOW TAG KEYS FROM {}", ident(m)))
        .await?
    {
        tag_keys.extend(
            s.values
                .iter()
                .filter_map(|row| row.first().and_then(Value::as_str).map(String::from)),
        );
    }
    let series = Series1 {
        source,
        target,
        touched,
        db,
        from,
        m,
        fields,
        tag_keys: &tag_keys,
        spans,
        after_interruption: rep.after_interruption,
    };
    // Two series at a time: each page waits on one server, then the other.
    let mut pending = Vec::with_capacity(to_compare.len());
    for (tags, where_) in &to_compare {
        pending.push(series.compare_points(tags, where_));
    }
    let mut checks = futures_util::stream::iter(pending).buffer_unordered(COMPARE_AT_ONCE);
    let t = std::time::Instant::now();
    while let Some(check) = checks.next().await {
        check?.add_to(rep);
    }
    tracing::debug!(
        measurement = from,
        series = to_compare.len(),
        seconds = t.elapsed().as_secs_f64(),
        "verify: point by point"
    );
    Ok(source_series)
}

/// Series compared point by point at once.
const COMPARE_AT_ONCE: usize = 2;

/// What the point-by-point comparison of one series found.
#[derive(Default)]
struct PointCheck {
    compared: u64,
    overwritten: u64,
    unverifiable: u64,
    problems: Vec<String>,
    pending: Vec<(u64, String)>,
}

impl PointCheck {
    fn add_to(self, rep: &mut VerifyReport) {
        rep.series_compared_point_by_point += 1;
        rep.points_compared += self.compared;
        rep.overwritten_after_cutover += self.overwritten;
        rep.values_unverifiable += self.unverifiable;
        for p in self.problems {
            rep.problem(p);
        }
        rep.pending.extend(self.pending);
    }
}

/// One measurement of one retention policy, as the point-by-point comparison needs it.
struct Series1<'a> {
    source: &'a Influx,
    target: &'a Influx,
    touched: Option<&'a Mutex<KeySet>>,
    db: &'a str,
    from: &'a str,
    m: &'a str,
    fields: &'a [(&'a str, bool)],
    tag_keys: &'a [String],
    /// The spans of time compared.
    spans: &'a [Span],
    after_interruption: bool,
}

/// Point-by-point comparison of one series in its spans of time, page by page: the
/// source's page, then the target's points in the same time range. Only the fields are
/// read (a row of `SELECT *` repeats every tag value).
impl Series1<'_> {
    async fn compare_points(&self, tags: &Tags, where_: &str) -> Result<PointCheck, InfluxError> {
        let mut out = PointCheck::default();
        let mut conds: Vec<String> = tags
            .iter()
            .map(|(k, v)| format!("{} = {}", ident(k), literal(v)))
            .collect();
        for k in self.tag_keys {
            if !tags.contains_key(k) {
                conds.push(format!("{} = ''", ident(k)));
            }
        }
        let tag_cond = if conds.is_empty() {
            String::new()
        } else {
            format!(" AND {}", conds.join(" AND "))
        };
        let select = self
            .fields
            .iter()
            .map(|(f, _)| format!("{}::field", ident(f)))
            .collect::<Vec<_>>()
            .join(", ");
        for span in self.spans {
            self.compare_span(span, &select, &tag_cond, tags, where_, &mut out)
                .await?;
        }
        Ok(out)
    }

    async fn compare_span(
        &self,
        span: &Span,
        select: &str,
        tag_cond: &str,
        tags: &Tags,
        where_: &str,
        out: &mut PointCheck,
    ) -> Result<(), InfluxError> {
        let (source, target, db, from, m) = (self.source, self.target, self.db, self.from, self.m);
        let mut after: i64 = span.from.saturating_sub(1);
        loop {
            let q = format!("SELECT {select} FROM {from} WHERE time > {after} AND time <= {}{tag_cond} ORDER BY time ASC LIMIT {PAGE}", span.to);
            let src = source.query_packed(Some(db), &q).await?;
            let Some(sp) = src.into_iter().next().filter(|s| !s.values.is_empty()) else {
                return Ok(());
            };
            let first = sp
                .values
                .first()
                .and_then(|r| r.first())
                .and_then(Value::as_i64)
                .unwrap_or(after);
            let last = sp
                .values
                .last()
                .and_then(|r| r.first())
                .and_then(Value::as_i64)
                .unwrap_or(after);
            let tq = format!("SELECT {select} FROM {from} WHERE time >= {first} AND time <= {last}{tag_cond} ORDER BY time ASC");
            let tp = target
                .query_packed(Some(db), &tq)
                .await?
                .into_iter()
                .next()
                .unwrap_or_default();
            let mut trows: HashMap<i64, &Vec<Value>> = HashMap::with_capacity(tp.values.len());
            for r in &tp.values {
                if let Some(t) = r.first().and_then(Value::as_i64) {
                    trows.insert(t, r);
                }
            }
            let tcol: HashMap<&str, usize> = tp
                .columns
                .iter()
                .enumerate()
                .map(|(i, c)| (c.as_str(), i))
                .collect();
            for row in &sp.values {
                out.compared += 1;
                let Some(t) = row.first().and_then(Value::as_i64) else {
                    continue;
                };
                let Some(trow) = trows.get(&t) else {
                    out.problems
                        .push(format!("{where_}: point at {t} is missing on the target"));
                    continue;
                };
                // Values compare exactly: replay is lossless and both servers print a value alike.
                let differs = sp.columns.iter().zip(row).skip(1).any(|(c, v)| {
                    let w = tcol
                        .get(c.as_str())
                        .and_then(|&i| trow.get(i))
                        .unwrap_or(&Value::Null);
                    v != w
                });
                if differs {
                    let key = point_key(m, tags.iter().map(|(k, v)| (k.as_str(), v.as_str())), t);
                    if is_touched(self.touched, key) {
                        out.overwritten += 1;
                    } else if self.after_interruption {
                        out.unverifiable += 1;
                    } else {
                        out.pending.push((
                            key,
                            format!(
                                "{where_}: point at {t} differs: source {row:?}, target {trow:?}"
                            ),
                        ));
                    }
                }
            }
            if sp.values.len() < PAGE {
                return Ok(());
            }
            after = last;
        }
    }
}

/// Field type of a measurement's field on a server, for the type-survival checks.
pub async fn field_type(
    influx: &Influx,
    db: &str,
    m: &str,
    f: &str,
) -> Result<Option<FieldType>, InfluxError> {
    Ok(influx
        .field_keys(db)
        .await?
        .into_iter()
        .find(|(mm, ff, _)| mm == m && ff == f)
        .map(|(_, _, t)| t))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_series_key_gives_its_tags_unescaped() {
        let t = |pairs: &[(&str, &str)]| -> Tags {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(key_tags("usage2,host=h002"), Some(t(&[("host", "h002")])));
        assert_eq!(key_tags("cpu"), Some(t(&[])));
        assert_eq!(
            key_tags(r"we\,ird,a\ b=c\=d\,e,z=1"),
            Some(t(&[("a b", "c=d,e"), ("z", "1")]))
        );
        assert_eq!(key_tags("m,novalue"), None, "a tag without =");
        // What the comparison names a series by is the same either way.
        assert_eq!(
            show_tags(&key_tags("m,b=2,a=1").unwrap()),
            show_tags(&t(&[("a", "1"), ("b", "2")]))
        );
    }

    #[test]
    fn a_field_listed_with_two_types_is_one_field_numeric_if_either_type_is() {
        let f = |m: &str, n: &str, t| (m.to_string(), n.to_string(), t);
        let keys = [
            f("usage", "v", FieldType::String),
            f("usage", "n", FieldType::Integer),
            f("usage", "v", FieldType::Float),
            f("other", "x", FieldType::Boolean),
        ];
        assert_eq!(fields_of(&keys, "usage"), [("v", true), ("n", true)]);
        assert_eq!(fields_of(&keys, "other"), [("x", false)]);
    }

    #[test]
    fn integer_sums_compare_exactly_and_float_sums_with_a_tolerance() {
        assert!(!same_sum(
            &json!(10_000_000_005i64),
            &json!(10_000_000_007i64)
        ));
        assert!(same_sum(
            &json!(10_000_000_005i64),
            &json!(10_000_000_005i64)
        ));
        assert!(same_sum(&json!(1.0e12), &json!(1.0e12 + 1.0e-4)));
        assert!(!same_sum(&json!(1.5), &json!(2.5)));
    }

    #[test]
    fn spans_that_overlap_or_touch_are_read_once() {
        let s = |from, to| Span { from, to };
        assert_eq!(
            merge_spans(vec![s(20, 29), s(0, 9), s(10, 12), s(5, 7), s(40, 50)]),
            vec![s(0, 12), s(20, 29), s(40, 50)]
        );
        assert_eq!(
            merge_spans(vec![s(0, 9), s(11, 20)]),
            vec![s(0, 9), s(11, 20)]
        );
        assert_eq!(merge_spans(vec![Span::ALL, s(0, 9)]), vec![Span::ALL]);
        assert_eq!(merge_spans(vec![]), vec![]);
    }

    fn shard(db: &str, rp: &str, id: u64, week: i64) -> Shard {
        let w = 7 * 86_400 * 1_000_000_000i64;
        Shard {
            id,
            database: db.into(),
            retention_policy: rp.into(),
            start_time: format!("week {week}"),
            end_time: format!("week {}", week + 1),
            span: Some((week * w, (week + 1) * w)),
        }
    }

    fn judged(db: &str, source: u64, proven: bool) -> Judged {
        Judged {
            database: db.into(),
            source,
            proven: if proven {
                Ok(())
            } else {
                Err(format!("shard {source} changed"))
            },
        }
    }

    #[test]
    fn the_files_prove_every_shard_but_those_that_changed_whose_spans_are_aggregated() {
        let w = 7 * 86_400 * 1_000_000_000i64;
        let listing = vec![
            shard("bill", "autogen", 1, 0),
            shard("bill", "autogen", 2, 1),
            shard("bill", "autogen", 3, 2),
            shard("bill", "autogen", 4, 3),
            shard("bill", "year", 5, 0),
            shard("usage", "autogen", 6, 0),
        ];
        let j = [
            judged("bill", 1, false),
            judged("bill", 2, false),
            judged("bill", 3, true),
            judged("bill", 4, false),
            judged("bill", 5, true),
            judged("usage", 6, true),
        ];
        let p = files_prove(&j, Ok(&listing));
        let rb = ReadBack {
            databases: p.databases,
            ..ReadBack::default()
        };
        // Weeks 0 and 1 touch: one span; week 3 another.
        assert_eq!(
            rb.unproven("bill", "autogen"),
            Some(
                &[
                    Span { from: 0, to: 2 * w },
                    Span {
                        from: 3 * w,
                        to: 4 * w
                    }
                ][..]
            )
        );
        assert_eq!(rb.unproven("bill", "year"), Some(&[][..]));
        assert_eq!(rb.unproven("usage", "autogen"), Some(&[][..]));
        assert_eq!(rb.unproven("other", "autogen"), None, "never read back");
        assert!(p.whole.is_empty(), "{:?}", p.whole);
        assert_eq!(p.spans["bill"].len(), 3, "{:?}", p.spans);
        assert!(
            p.spans["bill"][0].contains("shard 1 changed")
                && p.spans["bill"][0].contains("from week 0 to week 1"),
            "{:?}",
            p.spans
        );
    }

    #[test]
    fn a_span_that_cannot_be_known_sends_the_whole_database_to_the_aggregates() {
        let mut nameless = shard("bill", "", 2, 1);
        nameless.retention_policy.clear();
        let mut timeless = shard("bill", "autogen", 2, 1);
        timeless.span = None;
        for listing in [
            vec![shard("bill", "autogen", 1, 0)],
            vec![
                shard("bill", "autogen", 1, 0),
                shard("usage", "autogen", 2, 1),
            ],
            vec![shard("bill", "autogen", 1, 0), nameless],
            vec![shard("bill", "autogen", 1, 0), timeless],
        ] {
            let p = files_prove(
                &[judged("bill", 1, true), judged("bill", 2, false)],
                Ok(&listing),
            );
            assert!(p.databases.is_empty(), "{listing:?}: {p:?}");
            assert!(
                p.whole["bill"].starts_with("shard 2 changed, and "),
                "{p:?}"
            );
        }
        let p = files_prove(
            &[judged("bill", 1, true), judged("bill", 2, false)],
            Err("connection refused"),
        );
        assert!(p.databases.is_empty());
        assert!(p.whole["bill"].contains("could not be listed (connection refused)"));
        // Nothing to ask when every shard is proven.
        let p = files_prove(&[judged("bill", 1, true)], Err("not asked"));
        assert_eq!(p.databases["bill"], HashMap::new());
    }

    #[test]
    fn a_retention_policy_with_no_shard_proven_or_too_many_spans_is_aggregated_whole() {
        let mut listing = vec![shard("bill", "autogen", 1, 0), shard("bill", "year", 2, 0)];
        let mut j = vec![judged("bill", 1, true), judged("bill", 2, false)];
        // Every other week changed: more spans than are worth a statement each.
        for i in 0..(2 * MAX_SPANS as u64 + 2) {
            listing.push(shard("bill", "autogen", 10 + i, 1 + i as i64));
            j.push(judged("bill", 10 + i, i % 2 == 1));
        }
        let rb = ReadBack {
            databases: files_prove(&j, Ok(&listing)).databases,
            ..ReadBack::default()
        };
        assert_eq!(rb.unproven("bill", "year"), Some(&[Span::ALL][..]));
        assert_eq!(rb.unproven("bill", "autogen"), Some(&[Span::ALL][..]));
        let said = files_prove(&j, Ok(&listing)).spans.remove("bill").unwrap();
        assert!(
            said.iter().any(|s| s.contains(
                "retention policy \"year\" is compared by its aggregates over all time (none of its shards reads back as sent)"
            )) && said.iter().any(|s| s.contains(
                "retention policy \"autogen\" is compared by its aggregates over all time (more spans"
            )) && !said.iter().any(|s| s.contains("its points")),
            "the notes say what is read: {said:#?}"
        );
        // A database none of whose shards is proven is not proven in part.
        let p = files_prove(&[judged("bill", 1, false)], Ok(&listing));
        assert!(p.databases.is_empty() && p.spans.is_empty(), "{p:?}");
        assert!(p.whole["bill"].starts_with("shard 1 changed"), "{p:?}");
    }

    #[test]
    fn a_span_is_named_in_rfc_3339() {
        assert_eq!(Span::ALL.to_string(), "all time");
        let s = Span {
            from: 1_793_577_600_000_000_000,
            to: 1_793_577_600_999_999_999,
        };
        assert_eq!(
            s.to_string(),
            "2026-11-02T00:00:00.000000000Z to 2026-11-02T00:00:00.999999999Z"
        );
        assert_eq!(show_spans(&[s; 5]).matches(" to ").count(), 3);
        assert!(show_spans(&[s; 5]).ends_with("and 2 more"));
    }

    #[test]
    fn aggregates_are_kept_per_span_read() {
        let row = |cols: &[&str], vals: Vec<Value>| Series {
            columns: cols.iter().map(|c| c.to_string()).collect(),
            values: vec![vals],
            ..Series::default()
        };
        let mut a = Aggregates::default();
        let cols = ["time", "count_v", "sum_v"];
        a.add_row(0, &row(&cols, vec![json!(0), json!(3), json!(1.5)]));
        a.add_row(1, &row(&cols, vec![json!(0), json!(2), json!(2)]));
        // A statement of its own per aggregate (`verify.parallel_queries`).
        a.add_row(2, &row(&["time", "count_v"], vec![json!(0), json!(4)]));
        a.add_row(2, &row(&["time", "sum_v"], vec![json!(0), json!(7)]));
        assert_eq!(
            (
                a.count(0, "v"),
                a.count(1, "v"),
                a.count(2, "v"),
                a.count(3, "v")
            ),
            (3, 2, 4, 0)
        );
        assert_eq!(a.sum(0, "v"), Some(&json!(1.5)));
        assert_eq!(a.sum(2, "v"), Some(&json!(7)));
        assert_eq!(a.sum(3, "v"), None);
    }

    #[test]
    fn the_aggregates_read_each_span_in_its_own_statements() {
        let cfg = VerifyConfig {
            content: ContentCheck::Full,
            sample_series: 0,
            query_timeout: Duration::from_secs(1),
            parallel_queries: 1,
            target_first: true,
            read_back: true,
            read_back_on_host: true,
        };
        let fields = [("v", true), ("s", false)];
        let spans = [Span { from: 0, to: 9 }, Span { from: 20, to: 29 }];
        let one = aggregate_queries(&cfg, "\"m\"", &fields, 1, &spans);
        assert_eq!(one.len(), 2, "{one:#?}");
        assert!(
            one[0].0 == 0
                && one[0]
                    .1
                    .contains("WHERE time >= 0 AND time <= 9 GROUP BY *"),
            "{one:#?}"
        );
        assert!(
            one[1].0 == 1
                && one[1]
                    .1
                    .contains("WHERE time >= 20 AND time <= 29 GROUP BY *"),
            "{one:#?}"
        );
        // Two counts and one sum, each its own statement, per span.
        assert_eq!(
            aggregate_queries(&cfg, "\"m\"", &fields, 2, &spans).len(),
            6
        );
        assert!(
            aggregate_queries(&cfg, "\"m\"", &fields, 1, &[Span::ALL])[0]
                .1
                .contains("time >= -9223372036854775806 AND time <= 9223372036854775806")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_mismatch_waits_for_its_points_forward_from_the_target_not_a_fixed_second() {
        let ks = std::sync::Arc::new(Mutex::new(KeySet::with_cap(10)));
        let late = ks.clone();
        // The target's forward of a writer's overwrite arrives 3 s late (a queue there).
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            late.lock().unwrap().arrived(7);
        });
        let t = tokio::time::Instant::now();
        await_touched(&[7], Some(&ks)).await;
        assert!(
            is_touched(Some(&ks), 7),
            "still waiting at {:?}",
            t.elapsed()
        );
        assert!(t.elapsed() < SETTLE);
        // A point no writer wrote is given up at the bound, and reported.
        await_touched(&[7, 8], Some(&ks)).await;
        assert!(!is_touched(Some(&ks), 8));
        assert!(t.elapsed() >= SETTLE);
        // Without a watch nothing can arrive: no wait.
        let t = tokio::time::Instant::now();
        await_touched(&[9], None).await;
        assert_eq!(t.elapsed(), Duration::ZERO);
        // Nor can a key an overflowed set does not hold.
        let full = Mutex::new(KeySet::with_cap(1));
        full.lock().unwrap().arrived(1);
        full.lock().unwrap().arrived(2);
        assert!(full.lock().unwrap().overflowed);
        await_touched(&[2], Some(&full)).await;
        assert_eq!(t.elapsed(), Duration::ZERO);
    }

    #[test]
    fn a_key_replayed_by_stateshift_is_not_a_direct_write() {
        let ks = Mutex::new(KeySet::with_cap(2));
        ks.lock().unwrap().arrived(7);
        assert!(is_touched(Some(&ks), 7));
        ks.lock().unwrap().replayed(7);
        assert!(!is_touched(Some(&ks), 7));
        // Over the cap, membership is unknown and a mismatch is reported, not accepted.
        ks.lock().unwrap().arrived(8);
        ks.lock().unwrap().arrived(9);
        assert!(ks.lock().unwrap().overflowed);
        assert!(!is_touched(Some(&ks), 9));
    }
}
