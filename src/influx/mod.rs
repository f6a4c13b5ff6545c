//! InfluxDB 1.x HTTP client: ping, queries (plain and chunked/streaming), line-protocol
//! writes, and the metadata a migration must carry (databases, retention policies,
//! measurements, field types, users, grants, continuous queries, subscriptions).
//!
//! Credentials travel in an `Authorization: Basic` header, never in the URL, so no
//! request log or error message can show them.

pub mod lineproto;
pub mod snapshotter;
mod vars;

pub use vars::{drained, InFlight, SubStats, WriteTimes};

/// The database where InfluxDB stores its own statistics (`[monitor] store-enabled`):
/// never migrated, each server keeping its own.
pub const MONITOR_DB: &str = "_internal";

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::Value;

use crate::config::InstanceConfig;
use crate::util::Secret;

#[derive(Debug, thiserror::Error)]
pub enum InfluxError {
    #[error("InfluxDB {url}: unreachable: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// A request, or the wait between two reads of a streamed answer, outlasted its limit:
    /// the server answered the connection but not the request in time.
    #[error("InfluxDB {url}: no answer within {}", humantime::format_duration(*after))]
    TimedOut { url: String, after: Duration },
    #[error("InfluxDB {url}: authentication failed (HTTP {status}): check the username and password configured for this instance")]
    Auth { url: String, status: u16 },
    #[error("InfluxDB {url}: database {db:?} not found")]
    DatabaseNotFound { url: String, db: String },
    #[error("InfluxDB {url}: HTTP {status} for {what}: {body}")]
    Http {
        url: String,
        status: u16,
        what: String,
        body: String,
    },
    #[error("InfluxDB {url}: query {query:?} failed: {msg}")]
    Query {
        url: String,
        query: String,
        msg: String,
    },
    #[error("InfluxDB {url}: the answer to {what} is larger than {limit} bytes; refusing to hold it in memory")]
    TooLarge {
        url: String,
        what: String,
        limit: usize,
    },
    #[error("InfluxDB {url}: unexpected response to {what}: {msg}")]
    Decode {
        url: String,
        what: String,
        msg: String,
    },
}

impl InfluxError {
    /// True when the connection was refused (nothing listens at the address): the
    /// server is down, not slow or unroutable.
    pub fn is_refused(&self) -> bool {
        let InfluxError::Unreachable { source, .. } = self else {
            return false;
        };
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(source);
        while let Some(e) = cur {
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                if io.kind() == std::io::ErrorKind::ConnectionRefused {
                    return true;
                }
            }
            cur = e.source();
        }
        false
    }

    /// True when retrying later may succeed (network trouble, 5xx).
    pub fn is_transient(&self) -> bool {
        match self {
            InfluxError::Unreachable { .. } | InfluxError::TimedOut { .. } => true,
            InfluxError::Http { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// One series of a query result.
#[derive(Debug, Clone, Deserialize, Default)]
pub struct Series {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub tags: Option<std::collections::BTreeMap<String, String>>,
    #[serde(default)]
    pub columns: Vec<String>,
    #[serde(default)]
    pub values: Vec<Vec<Value>>,
}

const MSGPACK: &str = "application/x-msgpack";

#[derive(Deserialize)]
struct Response {
    #[serde(default)]
    results: Vec<StatementResult>,
    #[serde(default)]
    error: Option<String>,
}

#[derive(Deserialize)]
struct StatementResult {
    #[serde(default)]
    series: Vec<Series>,
    #[serde(default)]
    error: Option<String>,
    /// Set on a truncated result (e.g. the server's `max-row-limit`); in a chunked
    /// response, on every chunk but the last.
    #[serde(default)]
    partial: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub name: String,
    pub duration: String,
    pub shard_group_duration: String,
    pub replication: u64,
    pub default: bool,
}

/// One shard as `SHOW SHARDS` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub id: u64,
    pub database: String,
    pub retention_policy: String,
    /// Its shard group's start and end, as the server printed them (RFC 3339, seconds).
    pub start_time: String,
    pub end_time: String,
    /// The nanoseconds since the epoch its shard group covers, both ends included (see
    /// [`shard_span`]); `None` when the times printed cannot be read.
    pub span: Option<(i64, i64)>,
}

/// The nanoseconds since the epoch a shard group printed as `start`..`end` covers, both
/// ends included: `[start, end)`, widened to whole seconds, because InfluxDB prints them
/// as RFC 3339 without the fraction (Go's `time.RFC3339` cuts it off), and never past
/// InfluxDB's last time (`models.MaxNanoTime`). `None` for a time that is not RFC 3339 in
/// UTC, or before 1970 (which `humantime` does not read): nothing is then known of the
/// shard's span.
pub fn shard_span(start: &str, end: &str) -> Option<(i64, i64)> {
    const MAX_NANO_TIME: i64 = 9_223_372_036_854_775_806;
    let ns = |t: &str| -> Option<i64> {
        let at = humantime::parse_rfc3339(t).ok()?;
        let since = at.duration_since(std::time::UNIX_EPOCH).ok()?;
        Some(i64::try_from(since.as_nanos()).unwrap_or(i64::MAX))
    };
    let (from, to) = (ns(start)?, ns(end)?);
    let to = to.saturating_add(999_999_999).min(MAX_NANO_TIME);
    (from <= to).then_some((from, to))
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct User {
    pub name: String,
    pub admin: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Grant {
    pub database: String,
    /// `READ`, `WRITE` or `ALL PRIVILEGES`.
    pub privilege: String,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ContinuousQuery {
    pub database: String,
    pub name: String,
    pub query: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub database: String,
    pub retention_policy: String,
    pub name: String,
    pub mode: String,
    pub destinations: Vec<String>,
}

/// A field's type as InfluxDB stores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum FieldType {
    Float,
    Integer,
    String,
    Boolean,
    Unsigned,
}

impl FieldType {
    fn parse(s: &str) -> Option<FieldType> {
        Some(match s {
            "float" => FieldType::Float,
            "integer" => FieldType::Integer,
            "string" => FieldType::String,
            "boolean" => FieldType::Boolean,
            "unsigned" => FieldType::Unsigned,
            _ => return None,
        })
    }
    pub fn is_numeric(self) -> bool {
        matches!(
            self,
            FieldType::Float | FieldType::Integer | FieldType::Unsigned
        )
    }
}

/// Client for one InfluxDB 1.x server.
#[derive(Clone)]
pub struct Influx {
    base: String,
    http: reqwest::Client,
    /// No total timeout (a long chunked query), but one between two reads.
    streaming: reqwest::Client,
    auth: Option<(String, Secret)>,
    answer_limit: usize,
    /// The limit of one request, and of the wait between two reads of a streamed answer.
    timeout: Duration,
}

/// The most of one non-streamed answer (schema queries, counts, `GROUP BY *` aggregates)
/// held in memory.
pub const MAX_ANSWER_BYTES: usize = 256 << 20;
/// The most of `/debug/vars` held in memory (it grows with shards and subscriptions).
pub const MAX_DEBUG_VARS_BYTES: usize = 64 << 20;
/// The most of one line of a chunked answer (one chunk of `chunk_size` rows).
pub const MAX_CHUNK_BYTES: usize = 256 << 20;
/// The most of an error's body read (and the first 500 characters of it are kept).
const MAX_ERROR_BODY_BYTES: usize = 4 << 10;

impl std::fmt::Debug for Influx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Influx").field("url", &self.base).finish()
    }
}

/// Quote an identifier for InfluxQL.
pub fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Quote a string literal for InfluxQL (backslash, quote and newline escaped).
pub fn literal(s: &str) -> String {
    format!(
        "'{}'",
        s.replace('\\', "\\\\")
            .replace('\'', "\\'")
            .replace('\n', "\\n")
    )
}

impl Influx {
    pub fn new(
        url: &str,
        username: Option<&str>,
        password: Option<&Secret>,
        timeout: Duration,
    ) -> Influx {
        let (http, streaming) = Self::clients(timeout);
        Influx {
            base: url.trim_end_matches('/').to_string(),
            http,
            streaming,
            answer_limit: MAX_ANSWER_BYTES,
            auth: username.map(|u| {
                (
                    u.to_string(),
                    password.cloned().unwrap_or_else(|| Secret::new("")),
                )
            }),
            timeout,
        }
    }

    fn clients(timeout: Duration) -> (reqwest::Client, reqwest::Client) {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(timeout)
            .build()
            .unwrap_or_default();
        let streaming = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(timeout)
            .build()
            .unwrap_or_default();
        (http, streaming)
    }

    /// The same server with another request limit (long queries: verification).
    pub fn with_timeout(&self, timeout: Duration) -> Influx {
        let (http, streaming) = Self::clients(timeout);
        Influx {
            http,
            streaming,
            timeout,
            ..self.clone()
        }
    }

    /// Hold at most `bytes` of one non-streamed answer (default [`MAX_ANSWER_BYTES`]).
    pub fn with_answer_limit(mut self, bytes: usize) -> Influx {
        self.answer_limit = bytes;
        self
    }

    pub fn from_config(c: &InstanceConfig) -> Influx {
        Influx::new(
            &c.influx_url,
            c.username.as_deref(),
            c.password.as_ref(),
            c.timeout,
        )
    }

    /// At most `limit` bytes of `r`'s body; a longer body is an error, read no further.
    async fn body_capped(
        &self,
        r: reqwest::Response,
        what: &str,
        limit: usize,
    ) -> Result<Vec<u8>, InfluxError> {
        crate::util::read_body_capped(r, limit)
            .await
            .map_err(|e| match e {
                crate::util::CappedReadError::TooLarge => self.too_large(what, limit),
                crate::util::CappedReadError::Transport(source) => self.unreachable()(source),
            })
    }

    fn too_large(&self, what: &str, limit: usize) -> InfluxError {
        InfluxError::TooLarge {
            url: self.base.clone(),
            what: what.into(),
            limit,
        }
    }

    /// The start of an error's body, for the message (never more than a few KiB read).
    async fn error_body(r: reqwest::Response) -> String {
        let mut out = Vec::new();
        let mut stream = r.bytes_stream();
        while let Some(Ok(chunk)) = stream.next().await {
            out.extend_from_slice(&chunk);
            if out.len() >= MAX_ERROR_BODY_BYTES {
                break;
            }
        }
        String::from_utf8_lossy(&out).chars().take(500).collect()
    }

    pub fn url(&self) -> &str {
        &self.base
    }

    fn authed(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth {
            Some((u, p)) => rb.basic_auth(u, Some(p.expose())),
            None => rb,
        }
    }

    fn unreachable(&self) -> impl Fn(reqwest::Error) -> InfluxError + '_ {
        move |source| {
            // A timeout while reading a body surfaces as a "decode" error: say what it is.
            // One while connecting is the network's: the host is unreachable.
            if source.is_timeout() && !source.is_connect() {
                InfluxError::TimedOut {
                    url: self.base.clone(),
                    after: self.timeout,
                }
            } else {
                InfluxError::Unreachable {
                    url: self.base.clone(),
                    source: source.without_url(),
                }
            }
        }
    }

    /// `/ping`: 204 when the server is up.
    pub async fn ping(&self) -> Result<(), InfluxError> {
        let r = self
            .http
            .get(format!("{}/ping", self.base))
            .send()
            .await
            .map_err(self.unreachable())?;
        match r.status().as_u16() {
            204 | 200 => Ok(()),
            s => Err(InfluxError::Http {
                url: self.base.clone(),
                status: s,
                what: "ping".into(),
                body: String::new(),
            }),
        }
    }

    /// Wait until `/ping` answers, up to `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), InfluxError> {
        let mut retry = crate::util::Retry::new(
            Duration::from_millis(20),
            Duration::from_millis(500),
            timeout,
        )
        .counting_from(tokio::time::Instant::now());
        loop {
            match self.ping().await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    let Some(wait) = retry.next() else {
                        return Err(e);
                    };
                    tracing::debug!(url = %self.base, error = %e, "InfluxDB not ready yet");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn check(
        &self,
        r: reqwest::Response,
        what: &str,
    ) -> Result<reqwest::Response, InfluxError> {
        let status = r.status().as_u16();
        if r.status().is_success() {
            return Ok(r);
        }
        let body = Self::error_body(r).await;
        Err(match status {
            401 | 403 => InfluxError::Auth {
                url: self.base.clone(),
                status,
            },
            _ => InfluxError::Http {
                url: self.base.clone(),
                status,
                what: what.into(),
                body: body.trim().to_string(),
            },
        })
    }

    /// Run one InfluxQL statement (POST, so writes like CREATE work too) and return its series.
    pub async fn query(&self, db: Option<&str>, q: &str) -> Result<Vec<Series>, InfluxError> {
        self.query_as(db, q, false).await
    }

    /// [`query`](Self::query), with the answer in MessagePack rather than JSON, for large
    /// answers: measured on InfluxDB 1.6.7, 300,000 rows of four fields took the server
    /// 0.32–0.35 s to encode as MessagePack and 0.76–1.05 s as JSON. Values decode alike
    /// from either (a float stays a float where JSON would print `1` for 1.0). A server
    /// that answers JSON anyway (older than 1.4) is read as JSON.
    pub async fn query_packed(
        &self,
        db: Option<&str>,
        q: &str,
    ) -> Result<Vec<Series>, InfluxError> {
        self.query_as(db, q, true).await
    }

    async fn query_as(
        &self,
        db: Option<&str>,
        q: &str,
        packed: bool,
    ) -> Result<Vec<Series>, InfluxError> {
        let mut form = vec![("q", q), ("epoch", "ns")];
        if let Some(db) = db {
            form.push(("db", db));
        }
        let mut req = self.authed(self.http.post(format!("{}/query", self.base)));
        if packed {
            req = req.header(reqwest::header::ACCEPT, MSGPACK);
        }
        let r = req.form(&form).send().await.map_err(self.unreachable())?;
        let is_packed = r
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(MSGPACK.as_bytes()));
        if is_packed && !r.status().is_success() && !matches!(r.status().as_u16(), 401 | 403) {
            // The error in MessagePack: shown as the JSON one would be.
            let status = r.status().as_u16();
            let bytes = self
                .body_capped(r, &format!("query {q:?}"), 1 << 20)
                .await?;
            let body = match rmp_serde::from_slice::<Response>(&bytes) {
                Ok(Response { error: Some(e), .. }) => {
                    serde_json::json!({ "error": e }).to_string()
                }
                _ => format!("({} bytes of MessagePack that hold no error)", bytes.len()),
            };
            return Err(InfluxError::Http {
                url: self.base.clone(),
                status,
                what: "query".into(),
                body,
            });
        }
        let r = self.check(r, "query").await?;
        let bytes = self
            .body_capped(r, &format!("query {q:?}"), self.answer_limit)
            .await?;
        let decoded = if is_packed {
            rmp_serde::from_slice::<Response>(&bytes).map_err(|e| e.to_string())
        } else {
            serde_json::from_slice::<Response>(&bytes).map_err(|e| e.to_string())
        };
        let resp = decoded.map_err(|msg| InfluxError::Decode {
            url: self.base.clone(),
            what: format!("query {q:?}"),
            msg,
        })?;
        if resp.results.iter().any(|r| r.partial) {
            return Err(InfluxError::Query {
                url: self.base.clone(),
                query: q.to_string(),
                msg: "the result was truncated by the server (max-row-limit?); refusing to use a partial result".into(),
            });
        }
        self.first_result(q, resp)
    }

    fn first_result(&self, q: &str, resp: Response) -> Result<Vec<Series>, InfluxError> {
        let qerr = |msg: String| InfluxError::Query {
            url: self.base.clone(),
            query: q.to_string(),
            msg,
        };
        if let Some(e) = resp.error {
            return Err(qerr(e));
        }
        let mut out = Vec::new();
        for r in resp.results {
            if let Some(e) = r.error {
                return Err(qerr(e));
            }
            out.extend(r.series);
        }
        Ok(out)
    }

    /// Stream a query's series chunk by chunk (`chunked=true`): memory stays bounded by the
    /// chunk size whatever the result size. `f` is called for each chunk of each series.
    pub async fn query_chunked<F>(
        &self,
        db: &str,
        q: &str,
        chunk_size: usize,
        mut f: F,
    ) -> Result<(), InfluxError>
    where
        F: FnMut(Series) -> Result<(), InfluxError>,
    {
        let size = chunk_size.to_string();
        let form = [
            ("q", q),
            ("db", db),
            ("epoch", "ns"),
            ("chunked", "true"),
            ("chunk_size", size.as_str()),
        ];
        let r = self
            .authed(self.streaming.post(format!("{}/query", self.base)))
            .form(&form)
            .send()
            .await
            .map_err(self.unreachable())?;
        let r = self.check(r, "query").await?;
        let mut stream = r.bytes_stream();
        let mut buf: Vec<u8> = Vec::new();
        let mut handle = |line: &[u8]| -> Result<(), InfluxError> {
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                return Ok(());
            }
            let resp: Response = serde_json::from_slice(line).map_err(|e| InfluxError::Decode {
                url: self.base.clone(),
                what: format!("chunked query {q:?}"),
                msg: e.to_string(),
            })?;
            for s in self.first_result(q, resp)? {
                f(s)?;
            }
            Ok(())
        };
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(self.unreachable())?;
            buf.extend_from_slice(&chunk);
            while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
                handle(&buf[..pos])?;
                buf.drain(..=pos);
            }
            if buf.len() > MAX_CHUNK_BYTES {
                return Err(self.too_large(&format!("a chunk of query {q:?}"), MAX_CHUNK_BYTES));
            }
        }
        handle(&buf)
    }

    /// Write a line-protocol body. `precision` is one of `ns`, `u`, `ms`, `s`, `m`, `h`.
    pub async fn write(
        &self,
        db: &str,
        rp: Option<&str>,
        precision: &str,
        body: Bytes,
    ) -> Result<(), InfluxError> {
        let mut params = vec![("db", db), ("precision", precision)];
        if let Some(rp) = rp.filter(|r| !r.is_empty()) {
            params.push(("rp", rp));
        }
        let r = self
            .authed(self.http.post(format!("{}/write", self.base)))
            .query(&params)
            .body(body)
            .send()
            .await
            .map_err(self.unreachable())?;
        let status = r.status().as_u16();
        if status == 404 {
            let body = Self::error_body(r).await;
            if body.contains("database not found") {
                return Err(InfluxError::DatabaseNotFound {
                    url: self.base.clone(),
                    db: db.to_string(),
                });
            }
            return Err(InfluxError::Http {
                url: self.base.clone(),
                status,
                what: format!("write to {db}"),
                body,
            });
        }
        self.check(r, &format!("write to {db}")).await.map(|_| ())
    }

    /// `/debug/vars`, the server's internal statistics.
    pub async fn debug_vars(&self) -> Result<Value, InfluxError> {
        let r = self
            .authed(self.http.get(format!("{}/debug/vars", self.base)))
            .send()
            .await
            .map_err(self.unreachable())?;
        let r = self.check(r, "/debug/vars").await?;
        let bytes = self
            .body_capped(r, "/debug/vars", MAX_DEBUG_VARS_BYTES)
            .await?;
        serde_json::from_slice(&bytes).map_err(|e| InfluxError::Decode {
            url: self.base.clone(),
            what: "/debug/vars".into(),
            msg: e.to_string(),
        })
    }

    fn decode_err(&self, what: &str, msg: impl Into<String>) -> InfluxError {
        InfluxError::Decode {
            url: self.base.clone(),
            what: what.into(),
            msg: msg.into(),
        }
    }

    /// User databases (without [`MONITOR_DB`]).
    pub async fn databases(&self) -> Result<Vec<String>, InfluxError> {
        let mut out = self.all_databases().await?;
        out.retain(|n| n != MONITOR_DB);
        Ok(out)
    }

    /// Whether the server holds database `name` ([`MONITOR_DB`] included).
    pub async fn has_database(&self, name: &str) -> Result<bool, InfluxError> {
        Ok(self.all_databases().await?.iter().any(|n| n == name))
    }

    async fn all_databases(&self) -> Result<Vec<String>, InfluxError> {
        let series = self.query(None, "SHOW DATABASES").await?;
        let mut out = Vec::new();
        for s in series {
            for row in s.values {
                match row.first().and_then(Value::as_str) {
                    Some(n) => out.push(n.to_string()),
                    None => return Err(self.decode_err("SHOW DATABASES", "a row without a name")),
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every shard of database `db` by id (`SHOW SHARDS`; a row of another database is
    /// not read, whatever it holds).
    pub async fn shard_ids(&self, db: &str) -> Result<Vec<u64>, InfluxError> {
        let q = "SHOW SHARDS";
        let mut out = Vec::new();
        for s in self.query(None, q).await? {
            for row in &s.values {
                if str_of(col(&s.columns, row, "database")).as_deref() != Some(db) {
                    continue;
                }
                let id = col(&s.columns, row, "id")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| self.decode_err(q, "a shard without an id"))?;
                out.push(id);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Every shard of every database (`SHOW SHARDS`), with the time its shard group covers.
    pub async fn shards(&self) -> Result<Vec<Shard>, InfluxError> {
        let q = "SHOW SHARDS";
        let mut out = Vec::new();
        for s in self.query(None, q).await? {
            for row in &s.values {
                let get = |c: &str| str_of(col(&s.columns, row, c));
                let id = col(&s.columns, row, "id")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| self.decode_err(q, "a shard without an id"))?;
                let (start, end) = (get("start_time"), get("end_time"));
                out.push(Shard {
                    id,
                    database: get("database").unwrap_or_default(),
                    retention_policy: get("retention_policy").unwrap_or_default(),
                    span: start
                        .as_deref()
                        .zip(end.as_deref())
                        .and_then(|(a, b)| shard_span(a, b)),
                    start_time: start.unwrap_or_default(),
                    end_time: end.unwrap_or_default(),
                });
            }
        }
        Ok(out)
    }

    pub async fn retention_policies(&self, db: &str) -> Result<Vec<RetentionPolicy>, InfluxError> {
        let q = format!("SHOW RETENTION POLICIES ON {}", ident(db));
        let mut out = Vec::new();
        for s in self.query(None, &q).await? {
            for row in &s.values {
                let get = |c: &str| col(&s.columns, row, c);
                out.push(RetentionPolicy {
                    name: str_of(get("name")).ok_or_else(|| self.decode_err(&q, "no name"))?,
                    duration: str_of(get("duration")).unwrap_or_default(),
                    shard_group_duration: str_of(get("shardGroupDuration")).unwrap_or_default(),
                    replication: get("replicaN").and_then(Value::as_u64).unwrap_or(1),
                    default: get("default").and_then(Value::as_bool).unwrap_or(false),
                });
            }
        }
        Ok(out)
    }

    pub async fn measurements(&self, db: &str) -> Result<Vec<String>, InfluxError> {
        let mut out = Vec::new();
        for s in self.query(Some(db), "SHOW MEASUREMENTS").await? {
            for row in s.values {
                if let Some(n) = row.first().and_then(Value::as_str) {
                    out.push(n.to_string());
                }
            }
        }
        Ok(out)
    }

    /// `(measurement, field, type)` for every field of `db` in retention policy `rp`.
    pub async fn field_keys_in(
        &self,
        db: &str,
        rp: &str,
    ) -> Result<Vec<(String, String, FieldType)>, InfluxError> {
        self.field_keys_query(db, &format!("SHOW FIELD KEYS FROM {}./.*/", ident(rp)))
            .await
    }

    /// `(measurement, field, type)` for every field of `db` (InfluxDB answers for the
    /// database's default retention policy only; see [`Influx::field_keys_in`]).
    pub async fn field_keys(
        &self,
        db: &str,
    ) -> Result<Vec<(String, String, FieldType)>, InfluxError> {
        self.field_keys_query(db, "SHOW FIELD KEYS").await
    }

    async fn field_keys_query(
        &self,
        db: &str,
        q: &str,
    ) -> Result<Vec<(String, String, FieldType)>, InfluxError> {
        let mut out = Vec::new();
        for s in self.query(Some(db), q).await? {
            for row in s.values {
                let (Some(k), Some(t)) = (
                    row.first().and_then(Value::as_str),
                    row.get(1).and_then(Value::as_str),
                ) else {
                    return Err(self.decode_err("SHOW FIELD KEYS", "a row without key or type"));
                };
                let ty = FieldType::parse(t).ok_or_else(|| {
                    self.decode_err("SHOW FIELD KEYS", format!("unknown field type {t:?}"))
                })?;
                out.push((s.name.clone(), k.to_string(), ty));
            }
        }
        out.sort();
        Ok(out)
    }

    pub async fn users(&self) -> Result<Vec<User>, InfluxError> {
        let mut out = Vec::new();
        for s in self.query(None, "SHOW USERS").await? {
            for row in &s.values {
                let name = str_of(col(&s.columns, row, "user"))
                    .ok_or_else(|| self.decode_err("SHOW USERS", "a row without user"))?;
                let admin = col(&s.columns, row, "admin")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                out.push(User { name, admin });
            }
        }
        out.sort();
        Ok(out)
    }

    pub async fn grants(&self, user: &str) -> Result<Vec<Grant>, InfluxError> {
        let q = format!("SHOW GRANTS FOR {}", ident(user));
        let mut out = Vec::new();
        for s in self.query(None, &q).await? {
            for row in &s.values {
                let database = str_of(col(&s.columns, row, "database"))
                    .ok_or_else(|| self.decode_err(&q, "a row without database"))?;
                let privilege = str_of(col(&s.columns, row, "privilege"))
                    .ok_or_else(|| self.decode_err(&q, "a row without privilege"))?;
                if privilege != "NO PRIVILEGES" {
                    out.push(Grant {
                        database,
                        privilege,
                    });
                }
            }
        }
        out.sort();
        Ok(out)
    }

    pub async fn continuous_queries(&self) -> Result<Vec<ContinuousQuery>, InfluxError> {
        let mut out = Vec::new();
        for s in self.query(None, "SHOW CONTINUOUS QUERIES").await? {
            if s.name == MONITOR_DB {
                continue;
            }
            for row in &s.values {
                let (Some(name), Some(query)) = (
                    str_of(col(&s.columns, row, "name")),
                    str_of(col(&s.columns, row, "query")),
                ) else {
                    return Err(
                        self.decode_err("SHOW CONTINUOUS QUERIES", "a row without name or query")
                    );
                };
                out.push(ContinuousQuery {
                    database: s.name.clone(),
                    name,
                    query,
                });
            }
        }
        out.sort();
        Ok(out)
    }

    /// `DROP SUBSCRIPTION name ON db.rp`.
    pub async fn drop_subscription(
        &self,
        name: &str,
        db: &str,
        rp: &str,
    ) -> Result<(), InfluxError> {
        let q = format!(
            "DROP SUBSCRIPTION {} ON {}.{}",
            ident(name),
            ident(db),
            ident(rp)
        );
        self.query(None, &q).await.map(|_| ())
    }

    pub async fn subscriptions(&self) -> Result<Vec<Subscription>, InfluxError> {
        let mut out = Vec::new();
        for s in self.query(None, "SHOW SUBSCRIPTIONS").await? {
            for row in &s.values {
                let get = |c: &str| str_of(col(&s.columns, row, c));
                let destinations = col(&s.columns, row, "destinations")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|d| d.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                out.push(Subscription {
                    database: s.name.clone(),
                    retention_policy: get("retention_policy").unwrap_or_default(),
                    name: get("name").unwrap_or_default(),
                    mode: get("mode").unwrap_or_default(),
                    destinations,
                });
            }
        }
        Ok(out)
    }
}

fn col<'a>(columns: &[String], row: &'a [Value], name: &str) -> Option<&'a Value> {
    columns
        .iter()
        .position(|c| c == name)
        .and_then(|i| row.get(i))
}

fn str_of(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str).map(String::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn a_shard_span_covers_its_group_in_whole_seconds_or_is_unknown() {
        // 2026-11-02T00:00:00Z is 1,793,577,600 s after the epoch.
        let day = 86_400 * 1_000_000_000i64;
        let start = 1_793_577_600 * 1_000_000_000i64;
        assert_eq!(
            shard_span("2026-11-02T00:00:00Z", "2026-11-09T00:00:00Z"),
            Some((start, start + 7 * day + 999_999_999)),
            "the end's second is covered too: its fraction is not printed"
        );
        // InfluxDB's last shard group ends past its last time.
        assert_eq!(
            shard_span("2262-04-05T00:00:00Z", "2262-04-12T00:00:00Z").map(|s| s.1),
            Some(9_223_372_036_854_775_806)
        );
        for (a, b) in [
            ("1969-12-29T00:00:00Z", "1970-01-05T00:00:00Z"),
            ("2026-11-02", "2026-11-09T00:00:00Z"),
            ("2026-11-09T00:00:00Z", "2026-11-02T00:00:00Z"),
            ("", ""),
        ] {
            assert_eq!(shard_span(a, b), None, "{a:?}..{b:?}");
        }
    }

    /// An HTTP/1.1 server on loopback that answers every request with `status` and a
    /// chunked body that never ends (a misbehaving proxy or server); stops when the
    /// client goes away.
    async fn endless(status: &'static str) -> String {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut req = [0u8; 4096];
                    let _ = s.read(&mut req).await;
                    let head = format!("HTTP/1.1 {status}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n");
                    if s.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = format!("{:x}\r\n{}\r\n", 64 << 10, "x".repeat(64 << 10));
                    // Bounded: 4 GiB at most, far beyond any limit under test.
                    for _ in 0..(1 << 16) {
                        if s.write_all(chunk.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn an_answer_larger_than_the_limit_is_an_error_not_a_memory_hog() {
        let url = endless("200 OK").await;
        let influx =
            Influx::new(&url, None, None, Duration::from_secs(30)).with_answer_limit(1 << 20);
        let e = influx
            .query(Some("db"), "SELECT * FROM m GROUP BY *")
            .await
            .unwrap_err();
        assert!(
            matches!(e, InfluxError::TooLarge { limit, .. } if limit == 1 << 20),
            "{e}"
        );
        assert!(e.to_string().contains("larger than 1048576 bytes"), "{e}");
    }

    #[tokio::test]
    async fn an_error_with_an_endless_body_is_reported_at_once_with_its_start() {
        let url = endless("500 Internal Server Error").await;
        // Reading the whole body (it never ends) would end at the request timeout with
        // nothing kept of it.
        let influx = Influx::new(&url, None, None, Duration::from_secs(10));
        let e = influx.query(None, "SHOW DATABASES").await.unwrap_err();
        assert!(matches!(e, InfluxError::Http { status: 500, .. }), "{e}");
        let InfluxError::Http { body, .. } = e else {
            unreachable!()
        };
        assert_eq!(body.len(), 500, "the start of the body is kept");
    }
}
