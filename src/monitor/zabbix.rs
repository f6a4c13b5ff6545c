//! Zabbix over its JSON-RPC API, and [`ZabbixSource`]: one Zabbix item as a
//! [`MetricSource`].
//!
//! Wire facts this module is built on (measured on Zabbix 6.0.14, `../shared/env-probes/`):
//!
//! - Requests are `POST`s with `Content-Type: application/json-rpc`. `apiinfo.version` must
//!   be called *without* auth; its answer picks the [`Dialect`]: `user.login` takes
//!   `username` from 5.4 on (`user` before); the session goes in the body's `auth` field up
//!   to 6.x and in an `Authorization: Bearer` header from 7.0 on. A long-lived API token
//!   travels the same way and needs no login.
//! - Every number is a JSON string (`"lastclock":"1795462839"`); they are parsed strictly
//!   and a bad one is an error naming the field.
//! - An unknown host or item is an empty list, not an error.
//! - An expired or logged-out session answers `-32602 "Session terminated, re-login,
//!   please."`; no session at all, `"Not authorized."`. The client logs in again exactly
//!   once and repeats the call.
//! - A failed login answers `-32500 "Incorrect user name or password or account is
//!   temporarily blocked."`; five in a row block the account for 30 s.
//! - With its database down the API answers `code 1 "Error connecting to database."`
//!   (transient).
//! - An item never collected shows `lastclock "0"` (and `lastvalue "0"`: not a load of 0).
//!   A dead agent does not change the item's `state` (still `"0"`): only `lastclock` stops
//!   moving, so staleness is judged from the clock (see [`ZabbixSource`]).
//!
//! Secrets (password, session, API token) are [`Secret`]s: they go into request bodies or
//! headers only, and no error, log line or `Debug` output contains them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::time::Instant;

use super::{Clock, MetricSource, Reading, Sample, SourceError};
use crate::util::{read_body_capped, CappedReadError, Secret};

/// The item key read by default (DESIGN.md §1): the 1-minute load average per CPU.
pub const DEFAULT_ITEM_KEY: &str = "system.cpu.load[percpu,avg1]";
fn within(t: &Option<Duration>) -> String {
    t.map(|t| format!(" within {t:?} (zabbix.timeout)"))
        .unwrap_or_default()
}

/// Default timeout of one API request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default number of intervals a clock must stand still before a reading is stale.
pub const DEFAULT_STALE_INTERVALS: u32 = 2;
/// Allowance for clock skew between this host and the Zabbix server plus Zabbix's own
/// collection-to-database lag, when judging whether a value is already old on arrival.
pub const ARRIVAL_SLACK: Duration = Duration::from_secs(10);
/// The largest JSON-RPC answer the client reads. The answers it asks for (one item, one
/// history row) are a few hundred bytes; anything near this is a wrong URL or a broken
/// server, and is refused rather than buffered.
pub const MAX_ANSWER_BYTES: usize = 8 << 20;

/// Everything that can go wrong talking to Zabbix. No variant carries a password, a
/// session id or an API token.
#[derive(Debug, thiserror::Error)]
pub enum ZabbixError {
    /// The configured API URL is unusable.
    #[error("monitor.zabbix.url {url:?}: {problem}")]
    InvalidUrl { url: String, problem: String },
    /// No HTTP answer (connection refused, timeout, reset).
    #[error("zabbix {url}: {method}: no answer{}: {source}", within(.timed_out))]
    Unreachable {
        url: String,
        method: String,
        /// The request timeout, when that is why there was no answer.
        timed_out: Option<Duration>,
        #[source]
        source: reqwest::Error,
    },
    /// An HTTP status other than 2xx.
    #[error("zabbix {url}: {method}: HTTP {status}")]
    HttpStatus {
        url: String,
        method: String,
        status: u16,
    },
    /// The answer is larger than [`MAX_ANSWER_BYTES`].
    #[error("zabbix {url}: {method}: answer larger than {limit} bytes, refused; is {url} the Zabbix API endpoint?")]
    TooLarge {
        url: String,
        method: String,
        limit: usize,
    },
    /// The answer is not the JSON-RPC answer expected.
    #[error("zabbix {url}: {method}: unexpected answer: {problem}")]
    BadResponse {
        url: String,
        method: String,
        problem: String,
    },
    /// The API answered with an error object.
    #[error("zabbix {url}: {method}: API error {code}: {message} {data}")]
    Api {
        url: String,
        method: String,
        code: i64,
        message: String,
        data: String,
    },
    /// `user.login` was refused (wrong user or password, or the account is blocked).
    #[error("zabbix {url}: login as {user:?} refused: {detail} (check monitor.zabbix.username and its password; five failed logins block the account for 30 s)")]
    LoginRefused {
        url: String,
        user: String,
        detail: String,
    },
    /// The session was rejected again right after a fresh login.
    #[error("zabbix {url}: {method}: session rejected even after logging in again: {detail}")]
    SessionRejected {
        url: String,
        method: String,
        detail: String,
    },
    /// The configured API token was rejected.
    #[error("zabbix {url}: {method}: API token rejected: {detail} (is it expired, disabled or deleted?)")]
    TokenRejected {
        url: String,
        method: String,
        detail: String,
    },
    /// `apiinfo.version` answered something that is not a version.
    #[error("zabbix {url}: apiinfo.version: cannot read the version {version:?}")]
    BadVersion { url: String, version: String },
    /// No host with that technical name.
    #[error("zabbix: no host {host:?} (looking for item {key:?}): check monitor.zabbix.host: the host's technical name (not its visible name)")]
    UnknownHost { host: String, key: String },
    /// The host has no item with that key.
    #[error("zabbix: host {host:?} has no item with key {key:?}: check monitor.zabbix.key")]
    UnknownItem { host: String, key: String },
    /// The item does not hold numbers.
    #[error("zabbix: item {key:?} on host {host:?} holds {kind} values (value_type {value_type}), not numbers")]
    NotNumeric {
        host: String,
        key: String,
        value_type: u8,
        kind: &'static str,
    },
    /// A number field that does not parse.
    #[error("zabbix: {method}: field {field:?}: expected {expected}, got {text:?}")]
    BadNumber {
        method: &'static str,
        field: &'static str,
        expected: &'static str,
        text: String,
    },
}

impl ZabbixError {
    /// True when retrying later may succeed: no answer, a 5xx/429, the API's database
    /// unreachable or an internal error. Wrong credentials, unknown hosts or items and
    /// malformed answers need an operator.
    pub fn is_transient(&self) -> bool {
        match self {
            ZabbixError::Unreachable { .. } => true,
            ZabbixError::HttpStatus { status, .. } => *status >= 500 || *status == 429,
            ZabbixError::Api {
                code,
                message,
                data,
                ..
            } => api_error_is_transient(*code, message, data),
            _ => false,
        }
    }
}

impl SourceError for ZabbixError {
    fn is_transient(&self) -> bool {
        ZabbixError::is_transient(self)
    }
}

/// `code 1 "Error connecting to database."` (measured with PostgreSQL stopped) and
/// JSON-RPC internal errors are the server's trouble, not the request's.
fn api_error_is_transient(code: i64, message: &str, data: &str) -> bool {
    let text = format!("{message} {data}").to_ascii_lowercase();
    code == 1 || code == -32603 || text.contains("database")
}

/// Whether an API error means "your session (or token) is not valid".
fn is_session_error(message: &str, data: &str) -> bool {
    let text = format!("{message} {data}").to_ascii_lowercase();
    text.contains("session terminated")
        || text.contains("not authorised")
        || text.contains("not authorized")
}

// ------------------------------------------------------------------ dialect

/// A Zabbix API version, as `apiinfo.version` reports it (`6.0.14`, `7.0.0`, `7.2.0rc1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ApiVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl ApiVersion {
    /// Parse `MAJOR.MINOR[.PATCH[suffix]]`: digits only in each part, a pre-release suffix
    /// (letters then digits, e.g. `rc1`, `alpha2`) allowed after the patch number.
    pub fn parse(text: &str) -> Option<ApiVersion> {
        let mut parts = text.split('.');
        let major = digits(parts.next()?)?;
        let minor = digits(parts.next()?)?;
        let patch = match parts.next() {
            None => 0,
            Some(p) => {
                let end = p.find(|c: char| !c.is_ascii_digit()).unwrap_or(p.len());
                let (num, suffix) = p.split_at(end);
                let letters = suffix.trim_end_matches(|c: char| c.is_ascii_digit());
                if !letters.chars().all(|c| c.is_ascii_alphabetic()) {
                    return None;
                }
                digits(num)?
            }
        };
        if parts.next().is_some() {
            return None;
        }
        Some(ApiVersion {
            major,
            minor,
            patch,
        })
    }
}

fn digits(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl std::fmt::Display for ApiVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// The name of the user parameter of `user.login`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginField {
    /// `username` (5.4 and later).
    Username,
    /// `user` (before 5.4).
    User,
}

impl LoginField {
    fn name(self) -> &'static str {
        match self {
            LoginField::Username => "username",
            LoginField::User => "user",
        }
    }
}

/// Where the session id or API token goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthPlacement {
    /// The request body's `auth` field (up to 6.x).
    Body,
    /// An `Authorization: Bearer` header (7.0 and later; 7.2 refuses the body field).
    BearerHeader,
}

/// How to speak to one Zabbix API version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dialect {
    pub login_field: LoginField,
    pub auth: AuthPlacement,
}

impl Dialect {
    /// The dialect of API version `v`.
    pub fn for_version(v: ApiVersion) -> Dialect {
        let at_least = |major, minor| (v.major, v.minor) >= (major, minor);
        Dialect {
            login_field: if at_least(5, 4) {
                LoginField::Username
            } else {
                LoginField::User
            },
            auth: if at_least(7, 0) {
                AuthPlacement::BearerHeader
            } else {
                AuthPlacement::Body
            },
        }
    }
}

// ------------------------------------------------------------------ strict numbers

/// An unsigned integer as Zabbix sends it: ASCII digits only (no sign, no spaces).
pub fn parse_uint(
    method: &'static str,
    field: &'static str,
    text: &str,
) -> Result<u64, ZabbixError> {
    let bad = || ZabbixError::BadNumber {
        method,
        field,
        expected: "an unsigned integer",
        text: text.to_string(),
    };
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    text.parse().map_err(|_| bad())
}

/// A decimal number as Zabbix sends it: `-?DIGITS(.DIGITS)?([eE][+-]?DIGITS)?`, finite.
/// No spaces, no leading `+`, no `inf`/`nan`, no bare `.5` or `5.`.
pub fn parse_float(
    method: &'static str,
    field: &'static str,
    text: &str,
) -> Result<f64, ZabbixError> {
    let bad = || ZabbixError::BadNumber {
        method,
        field,
        expected: "a decimal number",
        text: text.to_string(),
    };
    if !is_decimal(text) {
        return Err(bad());
    }
    match text.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(bad()),
    }
}

fn is_decimal(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = 0;
    let run = |i: &mut usize| {
        let start = *i;
        while *i < b.len() && b[*i].is_ascii_digit() {
            *i += 1;
        }
        *i > start
    };
    if b.first() == Some(&b'-') {
        i += 1;
    }
    if !run(&mut i) {
        return false;
    }
    if b.get(i) == Some(&b'.') {
        i += 1;
        if !run(&mut i) {
            return false;
        }
    }
    if matches!(b.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(b.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !run(&mut i) {
            return false;
        }
    }
    i == b.len()
}

/// An item's update interval (`delay`): `30`, `30s`, `1m`, `1h`, `1d`, `1w`, optionally
/// followed by `;flexible/scheduling` intervals (ignored). `None` for user macros and
/// anything else this does not understand, and for `0` (scheduling only).
pub fn parse_delay(text: &str) -> Option<Duration> {
    let base = text.split(';').next()?.trim();
    let (num, unit) = match base.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => base.split_at(i),
        None => (base, "s"),
    };
    let n: u64 = if num.is_empty() {
        return None;
    } else {
        num.parse().ok()?
    };
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => return None,
    };
    let secs = n.checked_mul(mult)?;
    (secs > 0).then(|| Duration::from_secs(secs))
}

// ------------------------------------------------------------------ client

/// How the client authenticates.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// `user.login` with a user name and password; the session is renewed when it ends.
    Password { user: String, password: Secret },
    /// A long-lived API token (Zabbix 5.4+), used as is; no login.
    ApiToken(Secret),
}

/// Settings of a [`Zabbix`] client.
#[derive(Debug, Clone)]
pub struct ZabbixConfig {
    /// The API endpoint, e.g. `http://zabbix.example/api_jsonrpc.php`.
    pub url: String,
    pub credentials: Credentials,
    /// Timeout of one request.
    pub timeout: Duration,
}

/// The value type of an item (`value_type`); only numeric items can be read as load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueType {
    /// 0: numeric float (history table `history`).
    Float,
    /// 3: numeric unsigned (history table `history_uint`).
    Unsigned,
    /// 1 character, 2 log, 4 text, or anything newer.
    Other(u8),
}

impl ValueType {
    /// From the API's `value_type` code.
    pub fn from_code(code: u8) -> ValueType {
        match code {
            0 => ValueType::Float,
            3 => ValueType::Unsigned,
            other => ValueType::Other(other),
        }
    }

    /// The API's code, which is also the `history` parameter of `history.get`.
    pub fn code(self) -> u8 {
        match self {
            ValueType::Float => 0,
            ValueType::Unsigned => 3,
            ValueType::Other(c) => c,
        }
    }

    fn kind(self) -> &'static str {
        match self.code() {
            0 => "float",
            1 => "character",
            2 => "log",
            3 => "unsigned",
            4 => "text",
            5 => "binary",
            _ => "unknown",
        }
    }
}

/// One item as `item.get` describes it, numbers parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub itemid: String,
    pub hostid: String,
    pub key: String,
    pub value_type: ValueType,
    /// The update interval, when it is a plain interval (see [`parse_delay`]).
    pub delay: Option<Duration>,
    /// `status` 0: the item is enabled.
    pub enabled: bool,
    /// `state` 0: the item is supported (a dead agent does not change this).
    pub supported: bool,
    /// Why the item is unsupported, when it is.
    pub error: String,
    /// The newest value's clock; `None` when `lastclock` is 0: never collected.
    pub last_clock: Option<Clock>,
    /// The newest value, for numeric items that have one.
    pub last_value: Option<f64>,
}

#[derive(Deserialize)]
struct WireEnvelope {
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    error: Option<WireError>,
}

#[derive(Deserialize)]
struct WireError {
    code: i64,
    #[serde(default)]
    message: String,
    #[serde(default)]
    data: Value,
}

#[derive(Deserialize)]
struct WireHost {
    hostid: String,
}

#[derive(Deserialize)]
struct WireItem {
    itemid: String,
    hostid: String,
    key_: String,
    value_type: String,
    delay: String,
    status: String,
    state: String,
    #[serde(default)]
    error: String,
    lastclock: String,
    #[serde(default)]
    lastns: Option<String>,
    #[serde(default)]
    lastvalue: Option<String>,
}

#[derive(Deserialize)]
struct WireHistory {
    clock: String,
    #[serde(default)]
    ns: Option<String>,
    value: String,
}

const ITEM_FIELDS: [&str; 11] = [
    "itemid",
    "hostid",
    "key_",
    "value_type",
    "delay",
    "status",
    "state",
    "error",
    "lastclock",
    "lastns",
    "lastvalue",
];

impl WireItem {
    fn parse(self) -> Result<Item, ZabbixError> {
        const M: &str = "item.get";
        let code = parse_uint(M, "value_type", &self.value_type)?;
        let value_type = ValueType::from_code(u8::try_from(code).unwrap_or(u8::MAX));
        let status = parse_uint(M, "status", &self.status)?;
        let state = parse_uint(M, "state", &self.state)?;
        let secs = parse_uint(M, "lastclock", &self.lastclock)?;
        let last_clock = if secs == 0 {
            None
        } else {
            let nanos = match &self.lastns {
                Some(ns) => parse_nanos(M, "lastns", ns)?,
                None => 0,
            };
            Some(Clock::new(secs, nanos))
        };
        let last_value = match (&last_clock, &self.lastvalue, value_type) {
            (Some(_), Some(v), ValueType::Float) => Some(parse_float(M, "lastvalue", v)?),
            (Some(_), Some(v), ValueType::Unsigned) => Some(parse_uint(M, "lastvalue", v)? as f64),
            _ => None,
        };
        Ok(Item {
            itemid: self.itemid,
            hostid: self.hostid,
            key: self.key_,
            value_type,
            delay: parse_delay(&self.delay),
            enabled: status == 0,
            supported: state == 0,
            error: self.error,
            last_clock,
            last_value,
        })
    }
}

fn parse_nanos(method: &'static str, field: &'static str, text: &str) -> Result<u32, ZabbixError> {
    let n = parse_uint(method, field, text)?;
    u32::try_from(n)
        .ok()
        .filter(|n| *n < 1_000_000_000)
        .ok_or_else(|| ZabbixError::BadNumber {
            method,
            field,
            expected: "nanoseconds below 1000000000",
            text: text.to_string(),
        })
}

impl WireHistory {
    fn parse(self, value_type: ValueType) -> Result<Sample, ZabbixError> {
        const M: &str = "history.get";
        let secs = parse_uint(M, "clock", &self.clock)?;
        let nanos = match &self.ns {
            Some(ns) => parse_nanos(M, "ns", ns)?,
            None => 0,
        };
        let value = match value_type {
            ValueType::Unsigned => parse_uint(M, "value", &self.value)? as f64,
            _ => parse_float(M, "value", &self.value)?,
        };
        Ok(Sample {
            value,
            clock: Clock::new(secs, nanos),
        })
    }
}

/// A Zabbix JSON-RPC client. Holds the session it logged in with; methods take `&mut self`
/// because a call may renew it.
#[derive(Debug)]
pub struct Zabbix {
    http: reqwest::Client,
    url: reqwest::Url,
    credentials: Credentials,
    version: Option<ApiVersion>,
    session: Option<Secret>,
    logins: u64,
    next_id: u64,
    timeout: Duration,
}

/// What one JSON-RPC exchange gave: a result, or the API's error object (code, message,
/// data as text).
pub type RpcAnswer = Result<Value, (i64, String, String)>;

// ------------------------------------------------------------------ pure decoding

/// Decode the body of a JSON-RPC answer to `method` sent to `url` (pure: the transport is
/// the caller's). The outer error says what is wrong with the body; the inner `Err` is the
/// API's own error object.
pub fn decode_answer(url: &str, method: &str, body: &[u8]) -> Result<RpcAnswer, ZabbixError> {
    let bad = |problem: String| ZabbixError::BadResponse {
        url: url.to_string(),
        method: method.to_string(),
        problem,
    };
    let envelope: WireEnvelope = serde_json::from_slice(body).map_err(|e| {
        bad(if body.iter().all(u8::is_ascii_whitespace) {
            format!("empty body; is {url} the Zabbix API endpoint?")
        } else {
            format!("not JSON-RPC ({e}); is {url} the Zabbix API endpoint?")
        })
    })?;
    match (envelope.result, envelope.error) {
        (_, Some(err)) => {
            let data = match err.data {
                Value::Null => String::new(),
                Value::String(s) => s,
                other => other.to_string(),
            };
            Ok(Err((err.code, err.message, data)))
        }
        (Some(result), None) => Ok(Ok(result)),
        (None, None) => Err(bad("neither result nor error".into())),
    }
}

/// A `result` as `T`; a wrong shape is [`ZabbixError::BadResponse`] naming `method`.
fn decode_result<T: DeserializeOwned>(
    url: &str,
    method: &str,
    result: Value,
) -> Result<T, ZabbixError> {
    serde_json::from_value(result).map_err(|e| ZabbixError::BadResponse {
        url: url.to_string(),
        method: method.to_string(),
        problem: format!("result does not have the expected shape: {e}"),
    })
}

/// The host ids in a `host.get` result (pure).
pub fn decode_host_ids(url: &str, result: Value) -> Result<Vec<String>, ZabbixError> {
    let hosts: Vec<WireHost> = decode_result(url, "host.get", result)?;
    Ok(hosts.into_iter().map(|h| h.hostid).collect())
}

/// The items in an `item.get` result, numbers parsed strictly (pure).
pub fn decode_items(url: &str, result: Value) -> Result<Vec<Item>, ZabbixError> {
    let items: Vec<WireItem> = decode_result(url, "item.get", result)?;
    items.into_iter().map(WireItem::parse).collect()
}

/// The samples in a `history.get` result for an item of `value_type`, newest first
/// (pure).
pub fn decode_history(
    url: &str,
    result: Value,
    value_type: ValueType,
) -> Result<Vec<Sample>, ZabbixError> {
    let rows: Vec<WireHistory> = decode_result(url, "history.get", result)?;
    let mut out = rows
        .into_iter()
        .map(|r| r.parse(value_type))
        .collect::<Result<Vec<_>, _>>()?;
    // `sortfield: clock` leaves values within one second unordered by ns.
    out.sort_by_key(|s| std::cmp::Reverse(s.clock));
    Ok(out)
}

impl Zabbix {
    /// A client for `config.url`. Fails on a URL that is not `http(s)` or that carries
    /// credentials (they would end up in error messages).
    pub fn new(config: ZabbixConfig) -> Result<Zabbix, ZabbixError> {
        let invalid = |problem: &str| ZabbixError::InvalidUrl {
            url: config.url.clone(),
            problem: problem.to_string(),
        };
        let url = reqwest::Url::parse(&config.url)
            .map_err(|e| invalid(&format!("{e}; expected e.g. http://zabbix/api_jsonrpc.php")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid("expected an http(s) URL"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid(
                "credentials do not belong in the URL; set monitor.zabbix.username and password_file",
            ));
        }
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| invalid(&format!("cannot build an HTTP client: {e}")))?;
        Ok(Zabbix {
            timeout: config.timeout,
            http,
            url,
            credentials: config.credentials,
            version: None,
            session: None,
            logins: 0,
            next_id: 1,
        })
    }

    /// The API endpoint.
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    /// How many successful `user.login` calls this client made (0 with an API token).
    pub fn logins(&self) -> u64 {
        self.logins
    }

    /// The dialect in use, once the version is known.
    pub fn dialect(&self) -> Option<Dialect> {
        self.version.map(Dialect::for_version)
    }

    /// `apiinfo.version` (without auth), remembered: it decides the [`Dialect`].
    pub async fn api_version(&mut self) -> Result<ApiVersion, ZabbixError> {
        if let Some(v) = self.version {
            return Ok(v);
        }
        let answer = self
            .exchange("apiinfo.version", json!([]), None, AuthPlacement::Body)
            .await?;
        let value = self.result_or_api_error("apiinfo.version", answer)?;
        let text = value.as_str().unwrap_or_default().to_string();
        let v = ApiVersion::parse(&text).ok_or_else(|| ZabbixError::BadVersion {
            url: self.url.to_string(),
            version: if text.is_empty() {
                value.to_string()
            } else {
                text
            },
        })?;
        tracing::debug!(url = %self.url, version = %v, dialect = ?Dialect::for_version(v), "zabbix API version");
        self.version = Some(v);
        Ok(v)
    }

    /// Log in (with [`Credentials::Password`]; a no-op with an API token) and keep the
    /// session.
    pub async fn login(&mut self) -> Result<(), ZabbixError> {
        let (user, password) = match &self.credentials {
            Credentials::ApiToken(_) => return Ok(()),
            Credentials::Password { user, password } => (user.clone(), password.clone()),
        };
        let dialect = Dialect::for_version(self.api_version().await?);
        self.session = None;
        let mut params = serde_json::Map::new();
        params.insert(
            dialect.login_field.name().into(),
            Value::String(user.clone()),
        );
        params.insert(
            "password".into(),
            Value::String(password.expose().to_string()),
        );
        let params = Value::Object(params);
        let answer = self
            .exchange("user.login", params, None, dialect.auth)
            .await?;
        match answer {
            Ok(Value::String(session)) if !session.is_empty() => {
                self.session = Some(Secret::new(session));
                self.logins += 1;
                tracing::debug!(url = %self.url, user = %user, "zabbix login");
                Ok(())
            }
            // Never echo the result: it would be the session id.
            Ok(_) => Err(ZabbixError::BadResponse {
                url: self.url.to_string(),
                method: "user.login".into(),
                problem: "result is not a session id".into(),
            }),
            Err((code, message, data)) if !api_error_is_transient(code, &message, &data) => {
                Err(ZabbixError::LoginRefused {
                    url: self.url.to_string(),
                    user,
                    detail: if data.is_empty() { message } else { data },
                })
            }
            Err((code, message, data)) => Err(ZabbixError::Api {
                url: self.url.to_string(),
                method: "user.login".into(),
                code,
                message,
                data,
            }),
        }
    }

    /// End the session on the server (`user.logout`) and forget it.
    pub async fn logout(&mut self) -> Result<(), ZabbixError> {
        if self.session.is_none() {
            return Ok(());
        }
        let r = self.call::<Value>("user.logout", json!([])).await;
        self.session = None;
        r.map(|_| ())
    }

    /// Call `method` with `params`, authenticated. A session that the server ended is
    /// renewed by logging in again, once; a second rejection is an error.
    pub async fn call<T: DeserializeOwned>(
        &mut self,
        method: &str,
        params: Value,
    ) -> Result<T, ZabbixError> {
        let value = self.call_value(method, params).await?;
        decode_result(self.url.as_str(), method, value)
    }

    async fn call_value(&mut self, method: &str, params: Value) -> Result<Value, ZabbixError> {
        let dialect = Dialect::for_version(self.api_version().await?);
        if let Credentials::ApiToken(token) = &self.credentials {
            let token = token.clone();
            return match self
                .exchange(method, params, Some(&token), dialect.auth)
                .await?
            {
                Err((_, message, data)) if is_session_error(&message, &data) => {
                    Err(ZabbixError::TokenRejected {
                        url: self.url.to_string(),
                        method: method.to_string(),
                        detail: if data.is_empty() { message } else { data },
                    })
                }
                answer => self.result_or_api_error(method, answer),
            };
        }
        let mut fresh = false;
        if self.session.is_none() {
            self.login().await?;
            fresh = true;
        }
        let session = self.session.clone();
        let answer = self
            .exchange(method, params.clone(), session.as_ref(), dialect.auth)
            .await?;
        let (message, data) = match answer {
            Err((_, message, data)) if is_session_error(&message, &data) => (message, data),
            answer => return self.result_or_api_error(method, answer),
        };
        if fresh {
            return Err(self.session_rejected(method, message, data));
        }
        tracing::info!(url = %self.url, method, reason = %data, "zabbix session ended; logging in again");
        self.login().await?;
        let session = self.session.clone();
        match self
            .exchange(method, params, session.as_ref(), dialect.auth)
            .await?
        {
            Err((_, message, data)) if is_session_error(&message, &data) => {
                Err(self.session_rejected(method, message, data))
            }
            answer => self.result_or_api_error(method, answer),
        }
    }

    fn session_rejected(&mut self, method: &str, message: String, data: String) -> ZabbixError {
        self.session = None;
        ZabbixError::SessionRejected {
            url: self.url.to_string(),
            method: method.to_string(),
            detail: if data.is_empty() { message } else { data },
        }
    }

    fn result_or_api_error(&self, method: &str, answer: RpcAnswer) -> Result<Value, ZabbixError> {
        answer.map_err(|(code, message, data)| ZabbixError::Api {
            url: self.url.to_string(),
            method: method.to_string(),
            code,
            message,
            data,
        })
    }

    /// One JSON-RPC request. The outer error is transport trouble; the inner one the API's
    /// error object (code, message, data).
    async fn exchange(
        &mut self,
        method: &str,
        params: Value,
        auth: Option<&Secret>,
        placement: AuthPlacement,
    ) -> Result<RpcAnswer, ZabbixError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut body = json!({ "jsonrpc": "2.0", "method": method, "params": params, "id": id });
        let mut req = self
            .http
            .post(self.url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json-rpc");
        if let Some(secret) = auth {
            match placement {
                AuthPlacement::Body => body["auth"] = Value::String(secret.expose().to_string()),
                AuthPlacement::BearerHeader => {
                    let mut v = reqwest::header::HeaderValue::from_str(&format!(
                        "Bearer {}",
                        secret.expose()
                    ))
                    .map_err(|_| ZabbixError::BadResponse {
                        url: self.url.to_string(),
                        method: method.to_string(),
                        problem: "the session id or token is not a valid header value".into(),
                    })?;
                    v.set_sensitive(true);
                    req = req.header(reqwest::header::AUTHORIZATION, v);
                }
            }
        }
        let bytes = serde_json::to_vec(&body).map_err(|e| ZabbixError::BadResponse {
            url: self.url.to_string(),
            method: method.to_string(),
            problem: format!("cannot encode the request: {e}"),
        })?;
        let unreachable = |source: reqwest::Error| ZabbixError::Unreachable {
            url: self.url.to_string(),
            method: method.to_string(),
            timed_out: source.is_timeout().then_some(self.timeout),
            source: source.without_url(),
        };
        let resp = req.body(bytes).send().await.map_err(unreachable)?;
        let status = resp.status();
        if !status.is_success() {
            return Err(ZabbixError::HttpStatus {
                url: self.url.to_string(),
                method: method.to_string(),
                status: status.as_u16(),
            });
        }
        let body = read_body_capped(resp, MAX_ANSWER_BYTES)
            .await
            .map_err(|e| match e {
                CappedReadError::TooLarge => ZabbixError::TooLarge {
                    url: self.url.to_string(),
                    method: method.to_string(),
                    limit: MAX_ANSWER_BYTES,
                },
                CappedReadError::Transport(source) => unreachable(source),
            })?;
        decode_answer(self.url.as_str(), method, &body)
    }

    /// A client for the daemon's `monitor.zabbix` section.
    pub fn from_monitor_config(
        z: &crate::config::ZabbixMonitorConfig,
    ) -> Result<Zabbix, ZabbixError> {
        let credentials = match (&z.api_token, &z.username, &z.password) {
            (Some(t), _, _) => Credentials::ApiToken(t.clone()),
            (None, Some(u), Some(pw)) => Credentials::Password {
                user: u.clone(),
                password: pw.clone(),
            },
            _ => {
                return Err(ZabbixError::InvalidUrl {
                    url: z.url.clone(),
                    problem: "no credentials: give monitor.zabbix.username and password_file, or api_token_file".into(),
                })
            }
        };
        Zabbix::new(ZabbixConfig {
            url: z.url.clone(),
            credentials,
            timeout: z.timeout,
        })
    }

    /// Retire the host named `host` once its VM is gone: delete it, or disable it (no data
    /// is expected any more; the history stays). `Ok(false)`: no such host (already
    /// retired, or never registered).
    pub async fn retire_host(
        &mut self,
        host: &str,
        how: crate::config::RetireHosts,
    ) -> Result<bool, ZabbixError> {
        use crate::config::RetireHosts;
        let result = self
            .call_value(
                "host.get",
                json!({ "output": ["hostid"], "filter": { "host": [host] } }),
            )
            .await?;
        let Some(id) = decode_host_ids(self.url.as_str(), result)?
            .into_iter()
            .next()
        else {
            return Ok(false);
        };
        match how {
            RetireHosts::Keep => return Ok(false),
            RetireHosts::Delete => {
                self.call_value("host.delete", json!([id])).await?;
            }
            RetireHosts::Disable => {
                self.call_value("host.update", json!({ "hostid": id, "status": 1 }))
                    .await?;
            }
        }
        Ok(true)
    }

    /// The id of the host whose technical name is `host`. `key` only names the item being
    /// looked for, for the error.
    pub async fn host_id(&mut self, host: &str, key: &str) -> Result<String, ZabbixError> {
        let result = self
            .call_value(
                "host.get",
                json!({ "output": ["hostid"], "filter": { "host": [host] } }),
            )
            .await?;
        decode_host_ids(self.url.as_str(), result)?
            .into_iter()
            .next()
            .ok_or_else(|| ZabbixError::UnknownHost {
                host: host.to_string(),
                key: key.to_string(),
            })
    }

    /// The item with key `key` on host `host`.
    pub async fn item(&mut self, host: &str, key: &str) -> Result<Item, ZabbixError> {
        let hostid = self.host_id(host, key).await?;
        let result = self
            .call_value(
                "item.get",
                json!({
                    "output": ITEM_FIELDS,
                    "hostids": [hostid],
                    "filter": { "key_": [key] },
                }),
            )
            .await?;
        decode_items(self.url.as_str(), result)?
            .into_iter()
            .next()
            .ok_or_else(|| ZabbixError::UnknownItem {
                host: host.to_string(),
                key: key.to_string(),
            })
    }

    /// The item with id `itemid`, or `None` if it no longer exists.
    pub async fn item_by_id(&mut self, itemid: &str) -> Result<Option<Item>, ZabbixError> {
        let result = self
            .call_value(
                "item.get",
                json!({ "output": ITEM_FIELDS, "itemids": [itemid] }),
            )
            .await?;
        Ok(decode_items(self.url.as_str(), result)?.into_iter().next())
    }

    /// Up to `limit` values of a numeric item collected at or after `time_from` (Unix
    /// seconds), newest first (`history.get` on the item's history type).
    pub async fn history(
        &mut self,
        itemid: &str,
        value_type: ValueType,
        time_from: u64,
        limit: usize,
    ) -> Result<Vec<Sample>, ZabbixError> {
        let result = self
            .call_value(
                "history.get",
                json!({
                    "output": ["clock", "ns", "value"],
                    "history": value_type.code(),
                    "itemids": [itemid],
                    "time_from": time_from,
                    "sortfield": "clock",
                    "sortorder": "DESC",
                    "limit": limit,
                }),
            )
            .await?;
        decode_history(self.url.as_str(), result, value_type)
    }
}

// ------------------------------------------------------------------ the metric source

/// Settings of a [`ZabbixSource`].
#[derive(Debug, Clone)]
pub struct SourceConfig {
    /// The host's technical name.
    pub host: String,
    /// The item key (default [`DEFAULT_ITEM_KEY`]).
    pub key: String,
    /// How often the source is read (the poller's interval).
    pub poll_interval: Duration,
    /// A clock that stands still this many intervals makes the reading stale
    /// (default [`DEFAULT_STALE_INTERVALS`]).
    pub stale_intervals: u32,
}

impl SourceConfig {
    /// Host `host`, the default key, interval and staleness.
    pub fn new(host: impl Into<String>) -> SourceConfig {
        SourceConfig {
            host: host.into(),
            key: DEFAULT_ITEM_KEY.to_string(),
            poll_interval: super::poller::DEFAULT_POLL_INTERVAL,
            stale_intervals: DEFAULT_STALE_INTERVALS,
        }
    }
}

/// When a reading stops being fresh.
///
/// A clock is *stale* when it has stood still for `intervals` reads **and** for
/// `intervals` item update intervals (less half an interval, for jitter), so that neither
/// a poll faster than the item nor one slower than it is misjudged. A value that is
/// already older than `intervals × max(poll interval, item delay) + ARRIVAL_SLACK` when
/// it is first seen (by this host's wall clock) is stale on arrival: after a restart or a
/// long outage, the last value of a dead agent must not count as fresh.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StaleRule {
    pub intervals: u32,
    pub poll_interval: Duration,
    pub item_delay: Option<Duration>,
}

impl StaleRule {
    fn standstill(&self) -> Option<Duration> {
        let d = self.item_delay?;
        let n = self.intervals.max(1);
        Some((d * n).saturating_sub(d / 2))
    }

    fn max_age_on_arrival(&self) -> Duration {
        let interval = self.item_delay.unwrap_or_default().max(self.poll_interval);
        interval * self.intervals.max(1) + ARRIVAL_SLACK
    }
}

/// The pure freshness bookkeeping of a [`ZabbixSource`]: the newest sample seen, when
/// its clock last moved (by the caller's monotonic clock), and for how many reads it has
/// stood still.
#[derive(Debug, Clone, Default)]
pub struct FreshnessTracker {
    newest: Option<Sample>,
    moved_at: Option<Instant>,
    still_reads: u32,
    old_on_arrival: bool,
}

impl FreshnessTracker {
    /// The newest sample seen.
    pub fn newest(&self) -> Option<Sample> {
        self.newest
    }

    /// The item has no data (`lastclock` 0): forget everything.
    pub fn no_data(&mut self) -> Reading {
        *self = FreshnessTracker::default();
        Reading::NoData
    }

    /// The item's clock moved: `sample` is the newest value. `wall_age` is how old it is
    /// by this host's wall clock (`None` if it looks like it is from the future).
    pub fn moved(
        &mut self,
        sample: Sample,
        now: Instant,
        wall_age: Option<Duration>,
        rule: &StaleRule,
    ) -> Reading {
        self.newest = Some(sample);
        self.moved_at = Some(now);
        self.still_reads = 0;
        self.old_on_arrival = wall_age.is_some_and(|age| age > rule.max_age_on_arrival());
        if self.old_on_arrival {
            Reading::Stale(sample)
        } else {
            Reading::Fresh(sample)
        }
    }

    /// The item's clock did not move since the last read.
    pub fn still(&mut self, now: Instant, rule: &StaleRule) -> Reading {
        let Some(sample) = self.newest else {
            return Reading::NoData;
        };
        self.still_reads = self.still_reads.saturating_add(1);
        let reads = self.still_reads >= rule.intervals.max(1);
        let time = match (rule.standstill(), self.moved_at) {
            (Some(need), Some(at)) => now.saturating_duration_since(at) >= need,
            _ => true,
        };
        if self.old_on_arrival || (reads && time) {
            Reading::Stale(sample)
        } else {
            Reading::Fresh(sample)
        }
    }
}

/// One Zabbix item as a [`MetricSource`]: host and key resolved once (and again if the
/// item disappears), `item.get` every read for `lastclock`, `history.get` since the last
/// clock when it moved.
#[derive(Debug)]
pub struct ZabbixSource {
    client: Zabbix,
    config: SourceConfig,
    item: Option<Item>,
    tracker: FreshnessTracker,
    warned_unsupported: bool,
}

impl ZabbixSource {
    /// A source reading `config.key` on `config.host` through `client`.
    pub fn new(client: Zabbix, config: SourceConfig) -> ZabbixSource {
        ZabbixSource {
            client,
            config,
            item: None,
            tracker: FreshnessTracker::default(),
            warned_unsupported: false,
        }
    }

    /// The client (e.g. to check its login count).
    pub fn client(&mut self) -> &mut Zabbix {
        &mut self.client
    }

    /// The item as last read.
    pub fn item(&self) -> Option<&Item> {
        self.item.as_ref()
    }

    async fn current_item(&mut self) -> Result<Item, ZabbixError> {
        let known = match self.item.as_ref().map(|i| i.itemid.clone()) {
            Some(itemid) => self.client.item_by_id(&itemid).await?,
            None => None,
        };
        let item = match known {
            Some(item) => item,
            None => {
                let item = self
                    .client
                    .item(&self.config.host, &self.config.key)
                    .await?;
                tracing::debug!(host = %self.config.host, key = %self.config.key, itemid = %item.itemid, "zabbix item found");
                item
            }
        };
        if let ValueType::Other(code) = item.value_type {
            self.item = None;
            return Err(ZabbixError::NotNumeric {
                host: self.config.host.clone(),
                key: self.config.key.clone(),
                value_type: code,
                kind: item.value_type.kind(),
            });
        }
        if !item.supported || !item.enabled {
            if !self.warned_unsupported {
                tracing::warn!(host = %self.config.host, key = %self.config.key, enabled = item.enabled, error = %item.error, "zabbix item is not collecting (disabled or unsupported); its readings will go stale");
                self.warned_unsupported = true;
            }
        } else {
            self.warned_unsupported = false;
        }
        self.item = Some(item.clone());
        Ok(item)
    }

    fn rule(&self, item: &Item) -> StaleRule {
        StaleRule {
            intervals: self.config.stale_intervals,
            poll_interval: self.config.poll_interval,
            item_delay: item.delay,
        }
    }
}

fn wall_age(clock: Clock) -> Option<Duration> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    now.checked_sub(Duration::new(clock.secs, clock.nanos))
}

impl MetricSource for ZabbixSource {
    type Error = ZabbixError;

    fn describe(&self) -> String {
        format!(
            "zabbix host {:?} item {:?}",
            self.config.host, self.config.key
        )
    }

    #[tracing::instrument(level = "debug", skip(self), fields(host = %self.config.host, key = %self.config.key))]
    async fn read(&mut self) -> Result<Reading, ZabbixError> {
        let item = self.current_item().await?;
        let rule = self.rule(&item);
        let Some(last_clock) = item.last_clock else {
            return Ok(self.tracker.no_data());
        };
        let previous = self.tracker.newest().map(|s| s.clock);
        if previous.is_some_and(|p| last_clock <= p) {
            return Ok(self.tracker.still(Instant::now(), &rule));
        }
        // The clock moved. `item.get` carries the newest value with its clock (Zabbix's
        // value cache): one call per poll. Only an item without it is asked for its
        // history.
        let newest = match item.last_value {
            Some(value) => Some(Sample {
                value,
                clock: last_clock,
            }),
            None => {
                let since = previous.map_or(last_clock.secs, |p| p.secs);
                self.client
                    .history(&item.itemid, item.value_type, since, 1)
                    .await?
                    .into_iter()
                    .find(|s| previous.is_none_or(|p| s.clock > p))
            }
        };
        match newest {
            Some(sample) => {
                Ok(self
                    .tracker
                    .moved(sample, Instant::now(), wall_age(sample.clock), &rule))
            }
            None => Ok(self.tracker.still(Instant::now(), &rule)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::arb;
    use proptest::prelude::*;

    const URL: &str = "http://zabbix.test/api_jsonrpc.php";

    /// Everything the client does with an answer body, as the fuzz target does it.
    fn decode_everything(body: &[u8]) -> Result<(), ZabbixError> {
        let Ok(result) = decode_answer(URL, "item.get", body)? else {
            return Ok(());
        };
        if let Some(s) = result.as_str() {
            let _ = ApiVersion::parse(s);
        }
        decode_host_ids(URL, result.clone())?;
        let items = decode_items(URL, result.clone());
        for vt in [ValueType::Float, ValueType::Unsigned] {
            let samples = decode_history(URL, result.clone(), vt)?;
            assert!(samples.windows(2).all(|w| w[0].clock >= w[1].clock));
            assert!(samples.iter().all(|s| s.value.is_finite()));
        }
        items.map(drop)
    }

    proptest! {
        #[test]
        fn any_answer_bytes_are_a_value_or_a_typed_error(body in prop::collection::vec(any::<u8>(), 0..128)) {
            if let Err(e) = decode_everything(&body) {
                prop_assert!(e.to_string().contains("zabbix"));
            }
        }

        #[test]
        fn any_json_answer_or_result_is_a_value_or_a_typed_error(v in arb::json()) {
            let _ = decode_everything(v.to_string().as_bytes());
            let wrapped = serde_json::json!({ "jsonrpc": "2.0", "result": [v.clone()], "id": 1 });
            let _ = decode_everything(wrapped.to_string().as_bytes());
            let error = serde_json::json!({ "jsonrpc": "2.0", "error": v, "id": 1 });
            let _ = decode_everything(error.to_string().as_bytes());
        }

        #[test]
        fn item_rows_with_any_field_values_parse_or_name_the_field(
            fields in prop::collection::vec(arb::word(), 11),
        ) {
            let row: serde_json::Map<String, Value> = ITEM_FIELDS
                .iter()
                .zip(fields)
                .map(|(k, v)| (k.to_string(), Value::String(v)))
                .collect();
            match decode_items(URL, Value::Array(vec![Value::Object(row)])) {
                Ok(items) => prop_assert_eq!(items.len(), 1),
                Err(ZabbixError::BadNumber { method, field, .. }) => {
                    prop_assert_eq!(method, "item.get");
                    prop_assert!(ITEM_FIELDS.contains(&field));
                }
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }

        #[test]
        fn strict_numbers_round_trip(n in any::<u64>(), x in any::<f64>().prop_filter("finite", |x| x.is_finite())) {
            prop_assert_eq!(parse_uint("m", "f", &n.to_string()).unwrap(), n);
            prop_assert_eq!(parse_float("m", "f", &format!("{x:e}")).unwrap(), x);
        }
    }

    #[test]
    fn malformed_answers_are_bad_responses_naming_url_and_method() {
        for (body, want) in [
            (&b""[..], "empty body"),
            (b"  \n", "empty body"),
            (
                b"{\"jsonrpc\":\"2.0\",\"result\":[{\"hostid\":",
                "not JSON-RPC",
            ),
            (b"<html><body>502 Bad Gateway</body></html>", "not JSON-RPC"),
            (
                b"{\"jsonrpc\":\"2.0\",\"id\":1}",
                "neither result nor error",
            ),
            (b"{\"error\":{\"code\":\"-32602\"}}", "not JSON-RPC"),
            (b"[]", "neither result nor error"),
        ] {
            match decode_answer(URL, "host.get", body) {
                Err(e @ ZabbixError::BadResponse { .. }) => {
                    let m = e.to_string();
                    assert!(
                        m.contains(URL) && m.contains("host.get") && m.contains(want),
                        "{m}"
                    );
                }
                other => panic!("{body:?}: expected BadResponse, got {other:?}"),
            }
        }
        // Wrong types inside a well-formed envelope: a number where Zabbix sends a
        // string, an object where a list belongs.
        let e = decode_items(URL, serde_json::json!([{"itemid": 42}])).unwrap_err();
        assert!(
            matches!(&e, ZabbixError::BadResponse { method, problem, .. } if method == "item.get" && problem.contains("expected a string")),
            "{e}"
        );
        let e =
            decode_history(URL, serde_json::json!({"clock": "1"}), ValueType::Float).unwrap_err();
        assert!(e.to_string().contains("history.get"), "{e}");
    }

    fn wire_item(lastclock: &str, lastvalue: &str, value_type: &str) -> WireItem {
        WireItem {
            itemid: "44518".into(),
            hostid: "10559".into(),
            key_: DEFAULT_ITEM_KEY.into(),
            value_type: value_type.into(),
            delay: "1s".into(),
            status: "0".into(),
            state: "0".into(),
            error: String::new(),
            lastclock: lastclock.into(),
            lastns: Some("904241617".into()),
            lastvalue: Some(lastvalue.into()),
        }
    }

    #[test]
    fn strict_floats_accept_zabbix_decimals_only() {
        for ok in ["0", "0.789795", "-1.5", "12", "1.0E+25", "2e-3"] {
            assert!(parse_float("m", "value", ok).is_ok(), "{ok}");
        }
        assert_eq!(parse_float("m", "value", "0.789795").unwrap(), 0.789795);
        for bad in [
            "", " 1", "1 ", "+1", ".5", "5.", "1e", "inf", "NaN", "infinity", "0x10", "1,5", "--1",
            "1e400",
        ] {
            let err = parse_float("history.get", "value", bad).unwrap_err();
            assert!(
                matches!(&err, ZabbixError::BadNumber { field: "value", text, .. } if text == bad),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn strict_integers_refuse_signs_spaces_and_overflow() {
        assert_eq!(
            parse_uint("m", "clock", "1795462839").unwrap(),
            1_795_462_839
        );
        for bad in ["", "+1", "-1", " 1", "1.0", "18446744073709551616", "12a"] {
            assert!(parse_uint("m", "clock", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bad_number_error_names_the_method_and_field() {
        let err = wire_item("12a", "0", "0").parse().unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("item.get") && msg.contains("\"lastclock\"") && msg.contains("\"12a\""),
            "{msg}"
        );
        assert!(!err.is_transient());
    }

    #[test]
    fn lastclock_zero_is_no_data_not_a_load_of_zero() {
        let item = wire_item("0", "0", "0").parse().unwrap();
        assert_eq!(item.last_clock, None);
        assert_eq!(item.last_value, None);
        let mut t = FreshnessTracker::default();
        assert_eq!(t.no_data(), Reading::NoData);
    }

    #[test]
    fn item_fields_parse_into_domain_values() {
        let item = wire_item("1795462839", "0.789795", "0").parse().unwrap();
        assert_eq!(
            item.last_clock,
            Some(Clock::new(1_795_462_839, 904_241_617))
        );
        assert_eq!(item.last_value, Some(0.789795));
        assert_eq!(item.value_type, ValueType::Float);
        assert_eq!(item.delay, Some(Duration::from_secs(1)));
        assert!(item.enabled && item.supported);
        let unsigned = wire_item("5", "42", "3").parse().unwrap();
        assert_eq!(unsigned.last_value, Some(42.0));
        let text = wire_item("5", "hello", "4").parse().unwrap();
        assert_eq!(text.value_type, ValueType::Other(4));
        assert_eq!(text.last_value, None);
        assert!(wire_item("5", "x1", "0").parse().is_err());
    }

    #[test]
    fn history_rows_parse_with_nanoseconds() {
        let row = WireHistory {
            clock: "100".into(),
            ns: Some("5".into()),
            value: "0.25".into(),
        };
        assert_eq!(
            row.parse(ValueType::Float).unwrap(),
            Sample {
                value: 0.25,
                clock: Clock::new(100, 5)
            }
        );
        let bad_ns = WireHistory {
            clock: "100".into(),
            ns: Some("1000000000".into()),
            value: "1".into(),
        };
        assert!(bad_ns.parse(ValueType::Float).is_err());
    }

    #[test]
    fn delays_parse_plain_intervals_and_refuse_macros() {
        assert_eq!(parse_delay("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_delay("60"), Some(Duration::from_secs(60)));
        assert_eq!(parse_delay("5m"), Some(Duration::from_secs(300)));
        assert_eq!(
            parse_delay("1h;50s/1-7,00:00-24:00"),
            Some(Duration::from_secs(3600))
        );
        assert_eq!(parse_delay("{$LOAD_DELAY}"), None);
        assert_eq!(parse_delay("0"), None);
        assert_eq!(parse_delay("1y"), None);
    }

    #[test]
    fn versions_parse_strictly() {
        let v = |a, b, c| ApiVersion {
            major: a,
            minor: b,
            patch: c,
        };
        assert_eq!(ApiVersion::parse("6.0.14"), Some(v(6, 0, 14)));
        assert_eq!(ApiVersion::parse("7.2.0rc1"), Some(v(7, 2, 0)));
        assert_eq!(ApiVersion::parse("5.4"), Some(v(5, 4, 0)));
        for bad in ["", "6", "6.x.1", "6.0.1.2", " 6.0.1", "6.0.1-rc", "v6.0.0"] {
            assert_eq!(ApiVersion::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn dialect_follows_the_api_version() {
        let d = |s| Dialect::for_version(ApiVersion::parse(s).unwrap());
        assert_eq!(d("5.2.7").login_field, LoginField::User);
        assert_eq!(d("5.2.7").auth, AuthPlacement::Body);
        assert_eq!(d("5.4.0").login_field, LoginField::Username);
        assert_eq!(d("6.0.14").login_field, LoginField::Username);
        assert_eq!(d("6.0.14").auth, AuthPlacement::Body);
        assert_eq!(d("6.4.9").auth, AuthPlacement::Body);
        assert_eq!(d("7.0.0").auth, AuthPlacement::BearerHeader);
        assert_eq!(d("7.2.1").login_field, LoginField::Username);
    }

    #[test]
    fn session_errors_are_recognised_in_both_spellings() {
        assert!(is_session_error(
            "Invalid params.",
            "Session terminated, re-login, please."
        ));
        assert!(is_session_error("Invalid params.", "Not authorized."));
        assert!(is_session_error("Invalid params.", "Not authorised."));
        assert!(!is_session_error(
            "Invalid params.",
            "Invalid parameter \"/time_from\": an integer is expected."
        ));
    }

    #[test]
    fn transient_errors_are_the_servers_trouble() {
        let api = |code, message: &str, data: &str| ZabbixError::Api {
            url: "u".into(),
            method: "host.get".into(),
            code,
            message: message.into(),
            data: data.into(),
        };
        assert!(api(1, "Error connecting to database.", "").is_transient());
        assert!(api(-32603, "Internal error.", "").is_transient());
        assert!(!api(-32602, "Invalid params.", "Invalid parameter").is_transient());
        let status = |status| ZabbixError::HttpStatus {
            url: "u".into(),
            method: "m".into(),
            status,
        };
        assert!(status(502).is_transient());
        assert!(!status(404).is_transient());
        let unknown = ZabbixError::UnknownItem {
            host: "db1".into(),
            key: "k".into(),
        };
        assert!(!unknown.is_transient());
    }

    #[test]
    fn unknown_host_and_item_errors_name_both() {
        for e in [
            ZabbixError::UnknownHost {
                host: "db1".into(),
                key: "load[x]".into(),
            },
            ZabbixError::UnknownItem {
                host: "db1".into(),
                key: "load[x]".into(),
            },
        ] {
            let msg = e.to_string();
            assert!(
                msg.contains("\"db1\"") && msg.contains("\"load[x]\""),
                "{msg}"
            );
        }
    }

    #[test]
    fn urls_with_credentials_or_other_schemes_are_refused_without_echoing_secrets() {
        let cfg = |url: &str| ZabbixConfig {
            url: url.into(),
            credentials: Credentials::Password {
                user: "u".into(),
                password: Secret::new("hunter2"),
            },
            timeout: DEFAULT_TIMEOUT,
        };
        assert!(Zabbix::new(cfg("http://127.0.0.1/api_jsonrpc.php")).is_ok());
        assert!(Zabbix::new(cfg("ftp://h/api")).is_err());
        assert!(Zabbix::new(cfg("zabbix:80")).is_err());
        assert!(Zabbix::new(cfg("http://u:p@h/api_jsonrpc.php")).is_err());
        let client = Zabbix::new(cfg("http://127.0.0.1/api_jsonrpc.php")).unwrap();
        let debug = format!("{client:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
    }

    fn rule(delay: u64) -> StaleRule {
        StaleRule {
            intervals: 2,
            poll_interval: Duration::from_secs(1),
            item_delay: Some(Duration::from_secs(delay)),
        }
    }

    fn sample(secs: u64) -> Sample {
        Sample {
            value: 0.5,
            clock: Clock::new(secs, 0),
        }
    }

    #[test]
    fn a_clock_that_stands_still_two_intervals_is_stale() {
        let r = rule(1);
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut t = FreshnessTracker::default();
        assert_eq!(
            t.moved(sample(100), t0, Some(s), &r),
            Reading::Fresh(sample(100))
        );
        // one read without a new value is jitter, not a dead agent
        assert_eq!(t.still(t0 + s, &r), Reading::Fresh(sample(100)));
        assert_eq!(t.still(t0 + 2 * s, &r), Reading::Stale(sample(100)));
        assert_eq!(t.still(t0 + 3 * s, &r), Reading::Stale(sample(100)));
        // and a new value makes it fresh again
        assert_eq!(
            t.moved(sample(104), t0 + 4 * s, Some(s), &r),
            Reading::Fresh(sample(104))
        );
    }

    #[test]
    fn a_slow_item_polled_fast_is_not_stale_between_its_updates() {
        let r = rule(60);
        let t0 = Instant::now();
        let mut t = FreshnessTracker::default();
        t.moved(sample(100), t0, Some(Duration::from_secs(1)), &r);
        for k in 1..=60 {
            assert_eq!(
                t.still(t0 + Duration::from_secs(k), &r),
                Reading::Fresh(sample(100)),
                "{k}"
            );
        }
        assert_eq!(
            t.still(t0 + Duration::from_secs(90), &r),
            Reading::Stale(sample(100))
        );
    }

    #[test]
    fn a_value_already_old_when_first_seen_is_stale() {
        let r = rule(1);
        let t0 = Instant::now();
        let mut t = FreshnessTracker::default();
        let old = Some(Duration::from_secs(3600));
        assert_eq!(
            t.moved(sample(100), t0, old, &r),
            Reading::Stale(sample(100))
        );
        assert_eq!(
            t.still(t0 + Duration::from_secs(1), &r),
            Reading::Stale(sample(100))
        );
        // a value from the future (clock skew) is taken as fresh
        let mut t = FreshnessTracker::default();
        assert_eq!(
            t.moved(sample(100), t0, None, &r),
            Reading::Fresh(sample(100))
        );
    }
}
