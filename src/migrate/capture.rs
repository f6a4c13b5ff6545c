//! The capture receiver: an HTTP endpoint that speaks InfluxDB's `/write` API, to which
//! the old InfluxDB forwards every write through a subscription
//! (`CREATE SUBSCRIPTION ... DESTINATIONS ALL 'http://receiver'`).
//!
//! Two sinks: [`Sink::Spool`] appends each forwarded write to the on-disk spool (the
//! delta to replay); [`Sink::Keys`] only counts writes per point (used on the target after
//! cutover, so verification can tell a writer's legitimate overwrite from a corruption). The receiver answers 204 only after the sink has taken the write (for the
//! spool: written and synced to disk, see `spool`'s durability contract); if it
//! cannot, it answers 500, InfluxDB counts a `writeFailure`, and the migration sees it.
//!
//! Only the InfluxDB that was subscribed gets in: each receiver has its own random
//! secret, which the subscription's destination carries as credentials
//! (`http://stateshift:SECRET@host:port`; measured on InfluxDB 1.6.7: the subscriber sends
//! them as HTTP Basic auth with every forwarded write). A request without them, or with
//! others, gets 401 and is counted ([`ReceiverStats::unauthorized`]); nothing of it is
//! stored. The secret lives as long as the receiver; it shows in the subscribed
//! InfluxDB's query log and `SHOW SUBSCRIPTIONS` (admins only), never in ours.

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::header::{AUTHORIZATION, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use super::spool::SpoolWriter;
use crate::influx::{lineproto, MONITOR_DB};
use crate::util::Secret;

/// Where forwarded writes go.
#[derive(Clone)]
pub enum Sink {
    Spool(Arc<SpoolWriter>),
    /// Hashes of (measurement, tags, timestamp) of every point seen, up to a cap.
    Keys(Arc<Mutex<KeySet>>),
}

/// Point keys seen on the target after cutover, bounded.
///
/// `arrivals` counts every write the target received for a key (forwarded by the watch
/// subscription); `replayed` counts the writes stateshift itself replayed for that key
/// after the watch started. A key was written *directly* to the target (by a repointed
/// writer) exactly when it arrived more often than it was replayed.
#[derive(Debug, Default, Clone)]
pub struct KeySet {
    pub arrivals: HashMap<u64, u32>,
    pub replayed: HashMap<u64, u32>,
    pub cap: usize,
    /// Set when more distinct points arrived than `cap`: membership is then unknown.
    pub overflowed: bool,
}

impl KeySet {
    pub fn with_cap(cap: usize) -> KeySet {
        KeySet {
            cap,
            ..KeySet::default()
        }
    }

    fn bump(map: &mut HashMap<u64, u32>, cap: usize, overflowed: &mut bool, k: u64) {
        if let Some(n) = map.get_mut(&k) {
            *n = n.saturating_add(1);
        } else if map.len() < cap {
            map.insert(k, 1);
        } else {
            *overflowed = true;
        }
    }

    pub fn arrived(&mut self, k: u64) {
        Self::bump(&mut self.arrivals, self.cap, &mut self.overflowed, k);
    }

    pub fn replayed(&mut self, k: u64) {
        Self::bump(&mut self.replayed, self.cap, &mut self.overflowed, k);
    }

    /// Whether the target received a write for `k` that stateshift did not replay.
    pub fn written_directly(&self, k: u64) -> bool {
        self.arrivals.get(&k).copied().unwrap_or(0) > self.replayed.get(&k).copied().unwrap_or(0)
    }

    /// Record the keys of every point of a line-protocol body, with `f` per key.
    pub fn for_each_key(body: &str, precision: &str, mut f: impl FnMut(u64)) -> bool {
        let Some(factor) = precision_factor(precision) else {
            return false;
        };
        // Only the lines InfluxDB takes as points: the crate's own parser ends a comment at
        // an escaped newline and would key the rest of the line.
        for line in lineproto::point_lines(body).flat_map(influxdb_line_protocol::parse_lines) {
            let Ok(line) = line else { continue };
            let Some(ts) = line.timestamp else { continue };
            let tags = line
                .series
                .tag_set
                .iter()
                .flatten()
                .map(|(k, v)| (k.as_str(), v.as_str()));
            f(point_key(
                line.series.measurement.as_str(),
                tags,
                ts.saturating_mul(factor),
            ));
        }
        true
    }
}

/// The key of one point: measurement, non-empty tags sorted by key, timestamp in ns.
pub fn point_key<'a>(
    measurement: &str,
    tags: impl Iterator<Item = (&'a str, &'a str)>,
    time_ns: i64,
) -> u64 {
    let mut t: Vec<(&str, &str)> = tags.filter(|(_, v)| !v.is_empty()).collect();
    t.sort_unstable();
    let mut h = DefaultHasher::new();
    measurement.hash(&mut h);
    t.hash(&mut h);
    time_ns.hash(&mut h);
    h.finish()
}

fn precision_factor(p: &str) -> Option<i64> {
    Some(match p {
        "" | "n" | "ns" => 1,
        "u" | "us" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ => return None,
    })
}

/// Counters of one receiver.
#[derive(Debug, Default)]
pub struct ReceiverStats {
    pub requests: AtomicU64,
    pub points: AtomicU64,
    pub rejected: AtomicU64,
    /// Requests refused for missing or wrong credentials (not the subscribed InfluxDB).
    pub unauthorized: AtomicU64,
    /// Requests that carried credentials retired by [`Receiver::rotate`]: answered,
    /// kept nowhere.
    pub retired: AtomicU64,
    /// Of `points`, those of the source's own statistics ([`MONITOR_DB`]): spooled for
    /// the drain's proof, never replayed, and no writer's.
    pub monitor_points: AtomicU64,
    last_write: Mutex<Option<Instant>>,
    /// The measurements the spooled writes went to.
    written_to: Mutex<WrittenTo>,
}

/// The measurements of the writes a capture received, per database, up to a cap: what
/// tells verification which measurements the source may still change
/// ([`crate::migrate::verify::verify_cold`]).
#[derive(Debug, Default)]
struct WrittenTo {
    names: HashMap<String, HashSet<String>>,
    count: usize,
    /// A line whose measurement could not be read, or more names than the cap: any
    /// measurement may have been written.
    unknown: bool,
}

/// Distinct measurements remembered before [`WrittenTo`] gives up and says "any".
const WRITTEN_TO_CAP: usize = 100_000;

impl WrittenTo {
    fn record(&mut self, db: &str, body: &str) {
        if self.unknown {
            return;
        }
        for raw in lineproto::point_lines(body) {
            // InfluxDB unescapes only `\,` and `\ ` in a measurement name, the crate also
            // `\\`: a name with any other backslash may be recorded under another spelling.
            let name = raw_measurement(raw).as_bytes();
            let other_escape = (0..name.len())
                .any(|i| name[i] == b'\\' && !matches!(name.get(i + 1), Some(b',' | b' ')));
            if other_escape {
                self.unknown = true;
                return;
            }
            let Some(Ok(line)) = influxdb_line_protocol::parse_lines(raw).next() else {
                // InfluxDB took it (it forwarded it); we cannot tell where it went.
                self.unknown = true;
                return;
            };
            let m = line.series.measurement.as_str();
            let names = self.names.entry(db.to_string()).or_default();
            if !names.contains(m) {
                if self.count >= WRITTEN_TO_CAP {
                    self.unknown = true;
                    return;
                }
                names.insert(m.to_string());
                self.count += 1;
            }
        }
    }

    fn contains(&self, db: &str, m: &str) -> bool {
        self.unknown || self.names.get(db).is_some_and(|n| n.contains(m))
    }
}

/// A line's measurement as written, escapes kept: from its first character that is not a
/// space, tab or NUL up to the first `,` or space not preceded by a backslash (as
/// InfluxDB 1.x scans it).
fn raw_measurement(line: &str) -> &str {
    let line = line.trim_start_matches([' ', '\t', '\0']);
    let b = line.as_bytes();
    let end = (0..b.len())
        .find(|&i| (b[i] == b',' || b[i] == b' ') && (i == 0 || b[i - 1] != b'\\'))
        .unwrap_or(b.len());
    &line[..end]
}

impl ReceiverStats {
    pub fn points(&self) -> u64 {
        self.points.load(Ordering::SeqCst)
    }
    /// The points of writers' writes: [`Self::points`] less the source's statistics.
    pub fn writers_points(&self) -> u64 {
        self.points()
            .saturating_sub(self.monitor_points.load(Ordering::SeqCst))
    }
    /// Requests that reached the receiver, taken or not.
    pub fn arrivals(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
            + self.unauthorized.load(Ordering::SeqCst)
            + self.retired.load(Ordering::SeqCst)
    }
    /// When the last write arrived.
    pub fn last_write(&self) -> Option<Instant> {
        *self.last_write.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Whether a write to measurement `m` of database `db` may have arrived (always
    /// "yes" once the receiver lost track). Recorded before the write is counted in
    /// [`ReceiverStats::points`]: when the source's forwarded count equals that, every
    /// forwarded write's measurement is known.
    pub fn written_to(&self, db: &str, m: &str) -> bool {
        self.written_to
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(db, m)
    }
}

#[derive(Clone)]
struct AppState {
    route: Arc<std::sync::RwLock<Route>>,
    /// Fault injection (`STATESHIFT_FAULT=slow_watch_receiver`): a watch receiver that
    /// takes 20 ms to answer each write, so that InfluxDB queues for it.
    slow: bool,
}

/// Where a receiver's writes go ([`Receiver::rotate`] changes it).
struct Route {
    /// The `Authorization` header value a forwarded write must carry.
    expected: Secret,
    sink: Sink,
    stats: Arc<ReceiverStats>,
    /// Header values of credentials retired by [`Receiver::rotate`]: a write that
    /// carries one is answered and kept nowhere.
    retired: Vec<Secret>,
}

/// The credentials of one receiver: a user name and a random secret, which go into the
/// subscription's destination URL and nowhere else.
#[derive(Clone)]
pub struct ReceiverAuth {
    secret: Secret,
}

/// The user name in a capture destination's credentials.
pub const CAPTURE_USER: &str = "stateshift";

impl ReceiverAuth {
    /// A fresh secret: 24 random bytes from the OS, URL-safe base64 (no character that
    /// would need escaping in a URL's userinfo or in InfluxQL's quoted string).
    pub fn generate() -> std::io::Result<ReceiverAuth> {
        use base64::Engine;
        let mut bytes = [0u8; 24];
        getrandom::getrandom(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(ReceiverAuth {
            secret: Secret::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)),
        })
    }

    /// `url` (`http://host:port[/path]`) with these credentials in it, for the subscription.
    pub fn in_url(&self, url: &str) -> Secret {
        let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
        Secret::new(format!(
            "{scheme}://{CAPTURE_USER}:{}@{rest}",
            self.secret.expose()
        ))
    }

    fn header(&self) -> Secret {
        use base64::Engine;
        Secret::new(format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD
                .encode(format!("{CAPTURE_USER}:{}", self.secret.expose()))
        ))
    }
}

#[derive(Deserialize)]
struct WriteParams {
    db: Option<String>,
    #[serde(default)]
    rp: String,
    #[serde(default)]
    precision: String,
}

/// A running receiver; stops when dropped or on [`Receiver::stop`].
pub struct Receiver {
    pub addr: SocketAddr,
    /// The counters of what the current credentials brought (see [`Receiver::rotate`]).
    pub stats: Arc<ReceiverStats>,
    route: Arc<std::sync::RwLock<Route>>,
    token: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
#[error("capture receiver: cannot listen on {addr}: {source}")]
pub struct BindError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

impl Receiver {
    pub async fn start(
        listen: SocketAddr,
        sink: Sink,
        auth: &ReceiverAuth,
    ) -> Result<Receiver, BindError> {
        Self::start_on(Self::bind(listen).await?, sink, auth)
    }

    /// Bind the receiver's address ahead of [`Receiver::start_on`] (reserve the port).
    pub async fn bind(listen: SocketAddr) -> Result<tokio::net::TcpListener, BindError> {
        tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|source| BindError {
                addr: listen,
                source,
            })
    }

    /// Serve on a listener bound before.
    pub fn start_on(
        listener: tokio::net::TcpListener,
        sink: Sink,
        auth: &ReceiverAuth,
    ) -> Result<Receiver, BindError> {
        let listen = listener
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let addr = listener.local_addr().map_err(|source| BindError {
            addr: listen,
            source,
        })?;
        let stats = Arc::new(ReceiverStats::default());
        let slow =
            matches!(sink, Sink::Keys(_)) && crate::util::fault_injected("slow_watch_receiver");
        let route = Arc::new(std::sync::RwLock::new(Route {
            expected: auth.header(),
            sink,
            stats: stats.clone(),
            retired: Vec::new(),
        }));
        let app = axum::Router::new()
            .route("/write", post(write))
            .with_state(AppState {
                route: route.clone(),
                slow,
            })
            .layer(axum::extract::DefaultBodyLimit::max(64 << 20));
        let token = CancellationToken::new();
        let t = token.clone();
        let task = tokio::spawn(async move {
            let r = axum::serve(listener, app)
                .with_graceful_shutdown(async move { t.cancelled().await })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "capture receiver stopped");
            }
        });
        Ok(Receiver {
            addr,
            stats,
            route,
            token,
            task: Some(task),
        })
    }

    /// Take writes that carry `auth` into `sink` from now on, counted in fresh
    /// [`Receiver::stats`]; writes that carry the credentials used so far are answered
    /// (204, so that InfluxDB counts no failure for them) and kept nowhere. For a capture
    /// whose subscriptions are made again on the same port: what the first ones still
    /// deliver after their drop must neither count nor be replayed.
    pub fn rotate(&mut self, sink: Sink, auth: &ReceiverAuth) {
        let stats = Arc::new(ReceiverStats::default());
        let mut r = self.route.write().unwrap_or_else(|p| p.into_inner());
        let old = std::mem::replace(&mut r.expected, auth.header());
        r.retired.push(old);
        r.sink = sink;
        r.stats = stats.clone();
        self.stats = stats;
    }

    /// Stop listening at once, as a crashed receiver would: later deliveries are refused
    /// (fault injection; [`Receiver::stop`] is the clean way, which waits).
    pub fn kill(&mut self) {
        self.token.cancel();
    }

    pub async fn stop(mut self) {
        self.token.cancel();
        if let Some(t) = self.task.take() {
            // Graceful shutdown waits for open connections; never forever.
            if tokio::time::timeout(std::time::Duration::from_secs(5), t)
                .await
                .is_err()
            {
                tracing::warn!(addr = %self.addr, "capture receiver did not stop within 5 s");
            }
        }
    }
}

/// Wait until no request has reached any of `receivers` for `quiet`, at most `max`:
/// what InfluxDB still delivers for a subscription it was told to drop.
pub async fn arrivals_settle(receivers: &[Arc<ReceiverStats>], quiet: Duration, max: Duration) {
    let count = || receivers.iter().map(|r| r.arrivals()).sum::<u64>();
    let mut last = count();
    let mut stable = Instant::now();
    let deadline = Instant::now() + max;
    while stable.elapsed() < quiet && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(25)).await;
        let now = count();
        if now != last {
            last = now;
            stable = Instant::now();
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

async fn write(
    State(st): State<AppState>,
    headers: HeaderMap,
    Query(p): Query<WriteParams>,
    body: Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let given = headers
        .get(AUTHORIZATION)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    let is = |s: &Secret| bool::from(given.ct_eq(s.expose().as_bytes()));
    let (sink, stats) = {
        let r = st.route.read().unwrap_or_else(|p| p.into_inner());
        if is(&r.expected) {
            (Some(r.sink.clone()), r.stats.clone())
        } else if r.retired.iter().any(is) {
            (None, r.stats.clone())
        } else {
            r.stats.unauthorized.fetch_add(1, Ordering::Relaxed);
            return (
                StatusCode::UNAUTHORIZED,
                [(WWW_AUTHENTICATE, "Basic realm=\"stateshift capture\"")],
            )
                .into_response();
        }
    };
    match sink {
        Some(sink) => take(&sink, &stats, st.slow, p, body).await.into_response(),
        None => {
            // A retired subscription's write: in the dump (see `rotate`). Its
            // measurement is remembered all the same, the safe side for verification.
            stats.retired.fetch_add(1, Ordering::Relaxed);
            if let (Some(db), Ok(text)) = (&p.db, std::str::from_utf8(&body)) {
                stats
                    .written_to
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .record(db, text);
            }
            StatusCode::NO_CONTENT.into_response()
        }
    }
}

async fn take(
    sink: &Sink,
    stats: &ReceiverStats,
    slow: bool,
    p: WriteParams,
    body: Bytes,
) -> StatusCode {
    stats.requests.fetch_add(1, Ordering::Relaxed);
    let reject = |code| {
        stats.rejected.fetch_add(1, Ordering::Relaxed);
        code
    };
    let Some(db) = p.db.filter(|d| !d.is_empty()) else {
        return reject(StatusCode::BAD_REQUEST);
    };
    let Ok(text) = std::str::from_utf8(&body) else {
        return reject(StatusCode::BAD_REQUEST);
    };
    let points = lineproto::count_points(text) as u64;
    let statistics = db == MONITOR_DB;
    match sink {
        Sink::Spool(w) => {
            // Before the write counts as received (and even if spooling it fails: "maybe
            // written" is the safe side).
            stats
                .written_to
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .record(&db, text);
            let w = w.clone();
            let (rp, prec) = (p.rp.clone(), p.precision.clone());
            let body = body.clone();
            // On disk before the 204: an acknowledged write survives a power loss.
            let r =
                tokio::task::spawn_blocking(move || w.append_durable(&db, &rp, &prec, &body)).await;
            match r {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "capture: cannot spool a forwarded write");
                    return reject(StatusCode::INTERNAL_SERVER_ERROR);
                }
                Err(_) => return reject(StatusCode::INTERNAL_SERVER_ERROR),
            }
        }
        Sink::Keys(set) => {
            if slow {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let mut g = set.lock().unwrap_or_else(|p| p.into_inner());
            if !KeySet::for_each_key(text, &p.precision, |k| g.arrived(k)) {
                return reject(StatusCode::BAD_REQUEST);
            }
        }
    }
    if statistics {
        // Counted first: `points` never shows them as a writer's. Statistics arrive
        // whatever the writers do, so they do not hold the quiet period off either.
        stats.monitor_points.fetch_add(points, Ordering::SeqCst);
        stats.points.fetch_add(points, Ordering::SeqCst);
        return StatusCode::NO_CONTENT;
    }
    stats.points.fetch_add(points, Ordering::SeqCst);
    *stats.last_write.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Line-protocol-ish text: the characters that matter to the splitter and parser.
    fn body() -> impl Strategy<Value = String> {
        prop_oneof![
            "([a-z ,=\\\"#\n\t\r\u{0}0-9.-]|true|i|u){0,80}",
            "(m(,t=[a-z]{0,2}){0,3} [a-z]=(1i|-2|\"[a-z\n]{0,3}\"|t|1e9)( -?[0-9]{1,19})?\n){0,5}",
            any::<String>(),
        ]
    }

    proptest! {
        #[test]
        fn any_body_and_precision_is_keyed_without_panic_and_never_beyond_its_points(
            body in body(),
            precision in prop_oneof!["(n|ns|u|us|ms|s|m|h)?", any::<String>()],
        ) {
            let points = lineproto::count_points(&body);
            let mut keys = 0usize;
            let known = KeySet::for_each_key(&body, &precision, |_| keys += 1);
            prop_assert!(known || keys == 0);
            prop_assert!(keys <= points, "{} keys, {} points", keys, points);
        }

        #[test]
        fn a_point_key_ignores_tag_order_and_empty_tags(
            m in ".{0,8}",
            tags in prop::collection::vec(("[a-c]{1,2}", "[a-c]{0,2}"), 0..5),
            t in any::<i64>(),
        ) {
            let mut tags: Vec<(String, String)> = tags;
            tags.sort();
            tags.dedup_by(|a, b| a.0 == b.0);
            let fwd = point_key(&m, tags.iter().map(|(k, v)| (k.as_str(), v.as_str())), t);
            let rev = point_key(&m, tags.iter().rev().map(|(k, v)| (k.as_str(), v.as_str())), t);
            let non_empty = point_key(
                &m,
                tags.iter().filter(|(_, v)| !v.is_empty()).map(|(k, v)| (k.as_str(), v.as_str())),
                t,
            );
            prop_assert_eq!(fwd, rev);
            prop_assert_eq!(fwd, non_empty);
        }
    }

    #[test]
    fn a_comment_ending_in_a_backslash_swallows_the_next_line_as_in_influxdb() {
        // Found by the lineproto fuzz target (10M-run campaign, keys <= points): the
        // crate's parser ended the comment at the escaped newline and keyed "m v=1 1",
        // a point InfluxDB never stores (its scanLine joins the two lines, then skips
        // the comment).
        let body = "# c\\\nm v=1 1\nm v=2 2\n";
        assert_eq!(lineproto::count_points(body), 1);
        let mut keys = Vec::new();
        assert!(KeySet::for_each_key(body, "ns", |k| keys.push(k)));
        assert_eq!(keys, vec![point_key("m", std::iter::empty(), 2)]);
    }

    #[test]
    fn written_measurements_are_known_per_database_by_their_unescaped_names() {
        let mut w = WrittenTo::default();
        w.record("db", "m\\,x\\ y,t=a v=1 1\n# m2 v=1 2\nother v=2i 3\n");
        assert!(w.contains("db", "m,x y"));
        assert!(w.contains("db", "other"));
        assert!(!w.contains("db", "m2"), "a comment writes nothing");
        assert!(!w.contains("db2", "other"), "per database");
        assert!(!w.contains("db", "m"));
    }

    #[test]
    fn a_measurement_name_with_a_backslash_means_any_measurement_may_be_written() {
        // InfluxDB keeps `a\\b` as it is; the line-protocol crate would record `a\b`.
        let mut w = WrittenTo::default();
        w.record("db", "plain v=1 1\na\\\\b,t=x v=1 2\n");
        assert!(w.unknown);
        assert!(w.contains("db", "a\\\\b"));
        // A backslash in a tag value or a string field says nothing about the name.
        let mut w = WrittenTo::default();
        w.record("db", "m,path=C:\\\\x s=\"q\\\"\" 1\n");
        assert!(!w.unknown);
        assert!(w.contains("db", "m") && !w.contains("db", "n"));
    }

    #[test]
    fn an_unreadable_line_or_too_many_names_mean_any_measurement_may_be_written() {
        let mut w = WrittenTo::default();
        w.record("db", "m v=1 1\n,,, 2\n");
        assert!(w.contains("db", "never-seen"));

        let mut w = WrittenTo::default();
        let body: String = (0..=WRITTEN_TO_CAP)
            .map(|i| format!("m{i} v=1 1\n"))
            .collect();
        w.record("db", &body);
        assert!(w.unknown);
        assert!(w.contains("db", "never-seen"));
    }

    #[test]
    fn a_line_influxdb_counts_is_never_keyed_without_being_counted() {
        // The invariant "keys <= points" (the fuzz target checks it) broke on these
        // before count_points followed InfluxDB: a line led by "\r" (or any Unicode space
        // but ' ', '\t', NUL) then '#' was not counted, yet it is a point to InfluxDB and
        // to the key parser.
        for body in ["\r#m v=1 1", "\u{b}#m v=1 1", "\u{a0}#m v=1 1"] {
            let mut keys = 0;
            assert!(KeySet::for_each_key(body, "ns", |_| keys += 1));
            assert!(keys <= lineproto::count_points(body), "{body:?}");
        }
    }

    /// A receiver on a free loopback port that records the keys of what it receives.
    async fn keys_receiver(set: &Arc<Mutex<KeySet>>, auth: &ReceiverAuth) -> Receiver {
        Receiver::start(
            "127.0.0.1:0".parse().unwrap(),
            Sink::Keys(set.clone()),
            auth,
        )
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn keys_sink_records_the_same_key_verification_computes() {
        let set = Arc::new(Mutex::new(KeySet::with_cap(10)));
        let auth = ReceiverAuth::generate().unwrap();
        let r = keys_receiver(&set, &auth).await;
        let body = "cyclops_usage,host=w5 value=1,seq=2i,account=\"acme\",billable=true 1795461247919819443\n";
        let url = format!("http://{}/write?db=d&rp=autogen&precision=ns", r.addr);
        let resp = reqwest::Client::new()
            .post(url)
            .header("Authorization", auth.header().expose())
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 204);
        let k = point_key(
            "cyclops_usage",
            [("host", "w5")].into_iter(),
            1795461247919819443,
        );
        r.stop().await;
        let mut g = set.lock().unwrap();
        assert!(g.written_directly(k));
        g.replayed(k);
        assert!(
            !g.written_directly(k),
            "a write stateshift replayed itself is not a direct write"
        );
    }

    #[tokio::test]
    async fn a_rotated_receiver_answers_the_old_credentials_and_keeps_only_the_new_ones_writes() {
        let first = Arc::new(Mutex::new(KeySet::with_cap(10)));
        let second = Arc::new(Mutex::new(KeySet::with_cap(10)));
        let (a1, a2) = (
            ReceiverAuth::generate().unwrap(),
            ReceiverAuth::generate().unwrap(),
        );
        let mut r = keys_receiver(&first, &a1).await;
        let url = format!("http://{}/write?db=d&precision=ns", r.addr);
        let c = reqwest::Client::new();
        let send = |a: &ReceiverAuth, body: &'static str| {
            c.post(&url)
                .header("Authorization", a.header().expose().to_string())
                .body(body)
                .send()
        };
        let status = |r: reqwest::Result<reqwest::Response>| r.unwrap().status().as_u16();
        assert_eq!(status(send(&a1, "m,t=a v=1 1\n").await), 204);
        let before = r.stats.clone();
        r.rotate(Sink::Keys(second.clone()), &a2);
        // What the first subscriptions still deliver: answered, kept nowhere.
        assert_eq!(status(send(&a1, "n,t=b v=1 2\n").await), 204);
        assert_eq!(status(send(&a2, "m,t=c v=1 3\n").await), 204);
        let stranger = ReceiverAuth::generate().unwrap();
        assert_eq!(status(send(&stranger, "m v=1 4\n").await), 401);
        assert_eq!(
            before.points(),
            1,
            "the first credentials' count stays theirs"
        );
        assert_eq!(
            r.stats.points(),
            1,
            "counted afresh: only the new credentials' write"
        );
        assert_eq!(r.stats.retired.load(Ordering::SeqCst), 1);
        assert_eq!(r.stats.unauthorized.load(Ordering::SeqCst), 1);
        assert_eq!(r.stats.arrivals(), 3);
        assert_eq!(first.lock().unwrap().arrivals.len(), 1);
        assert_eq!(
            second.lock().unwrap().arrivals.len(),
            1,
            "the retired write is kept nowhere"
        );
        // Its measurement is remembered: the safe side for verification.
        assert!(r.stats.written_to("d", "n"));
        r.stop().await;
    }

    #[tokio::test]
    async fn only_the_subscribed_influxdb_gets_in_anything_else_is_refused_and_counted() {
        let set = Arc::new(Mutex::new(KeySet::with_cap(10)));
        let auth = ReceiverAuth::generate().unwrap();
        let other = ReceiverAuth::generate().unwrap();
        assert_ne!(
            auth.secret.expose(),
            other.secret.expose(),
            "fresh per receiver"
        );
        let r = keys_receiver(&set, &auth).await;
        let url = format!("http://{}/write?db=d&precision=ns", r.addr);
        let c = reqwest::Client::new();
        let send = |h: Option<String>| {
            let mut rb = c.post(&url).body("m v=1 1\n");
            if let Some(h) = h {
                rb = rb.header("Authorization", h);
            }
            rb.send()
        };
        let none = send(None).await.unwrap();
        assert_eq!(none.status().as_u16(), 401);
        assert!(none.headers().contains_key("www-authenticate"));
        assert_eq!(
            send(Some(other.header().expose().to_string()))
                .await
                .unwrap()
                .status()
                .as_u16(),
            401
        );
        assert_eq!(
            send(Some("Bearer x".into()))
                .await
                .unwrap()
                .status()
                .as_u16(),
            401
        );
        assert_eq!(r.stats.unauthorized.load(Ordering::SeqCst), 3);
        assert_eq!(r.stats.points(), 0, "nothing of a refused write is taken");
        assert!(set.lock().unwrap().arrivals.is_empty());
        // The credentials as a URL carries them (what InfluxDB turns into Basic auth).
        let with = auth.in_url(&format!("http://{}", r.addr));
        let u = reqwest::Url::parse(with.expose()).unwrap();
        assert_eq!(u.username(), CAPTURE_USER);
        let ok = c
            .post(format!("http://{}/write?db=d&precision=ns", r.addr))
            .basic_auth(u.username(), u.password())
            .body("m v=1 1\n")
            .send()
            .await
            .unwrap();
        assert_eq!(ok.status().as_u16(), 204);
        assert_eq!(r.stats.points(), 1);
        assert!(!format!("{:?}", auth.in_url("http://h:1")).contains(auth.secret.expose()));
        r.stop().await;
    }
}
