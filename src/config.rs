//! Typed configuration.
//!
//! Layers, lowest first: built-in defaults < the YAML file < `STATESHIFT__SECTION__KEY`
//! environment variables (double underscore between levels, so snake_case keys survive).
//! The merged tree is deserialized into raw structs that refuse unknown keys, then a pure
//! `validate` turns them into [`Config`]; secrets are read from their files last.
//! Every error names the file and the key path: `cfg.yaml: source.ssh.port: ...`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::util::Secret;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}: cannot read: {source}")]
    Read {
        file: String,
        #[source]
        source: config::ConfigError,
    },
    #[error("{file}: {key}: {msg}")]
    Invalid {
        file: String,
        key: String,
        msg: String,
    },
    #[error("{file}: {key}: cannot read {path}: {source}")]
    File {
        file: String,
        key: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}: {key}: cannot read secret file {path}: {source}")]
    SecretFile {
        file: String,
        key: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

// ---------------------------------------------------------------- raw (as written)

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    source: Option<RawInstance>,
    target: Option<RawInstance>,
    #[serde(default)]
    capture: RawCapture,
    #[serde(default)]
    cutover: RawCutover,
    #[serde(default)]
    verify: RawVerify,
    #[serde(default)]
    migration: RawMigration,
    #[serde(default)]
    service: RawService,
    #[serde(default)]
    provider: RawProvider,
    #[serde(default)]
    monitor: RawMonitor,
    #[serde(default)]
    api: RawApi,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Option<String>,
    stack: Option<String>,
}

/// A template parameter: Heat takes every parameter as a string, but YAML (`count: 2`)
/// and environment overrides (`..__PARAMETERS__COUNT=2`) give numbers and booleans too.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ParamValue {
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl ParamValue {
    fn into_string(self) -> String {
        match self {
            ParamValue::Text(s) => s,
            ParamValue::Int(n) => n.to_string(),
            ParamValue::Float(x) => x.to_string(),
            ParamValue::Bool(b) => b.to_string(),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    kind: Option<ProviderKind>,
    local_dir: Option<PathBuf>,
    local_subnet: Option<u8>,
    template: Option<PathBuf>,
    parameters: Option<BTreeMap<String, ParamValue>>,
    parameter_files: Option<BTreeMap<String, PathBuf>>,
    environment_files: Option<Vec<PathBuf>>,
    #[serde(default, with = "humantime_serde")]
    create_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    delete_timeout: Option<Duration>,
    heat: Option<RawHeat>,
    ssh: Option<RawSsh>,
}

/// `provider.heat` as written. Durations are humantime strings ("700ms", "30s", "10m").
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeat {
    auth_url: Option<String>,
    region: Option<String>,
    interface: Option<CatalogInterface>,
    username: Option<String>,
    #[serde(default, deserialize_with = "de_secret")]
    password: Option<String>,
    password_file: Option<PathBuf>,
    user_domain_name: Option<String>,
    project_name: Option<String>,
    project_domain_name: Option<String>,
    application_credential_id: Option<String>,
    #[serde(default, deserialize_with = "de_secret")]
    application_credential_secret: Option<String>,
    application_credential_secret_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    endpoint_override: Option<String>,
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    request_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    retry_budget: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    delete_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    poll_max_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    token_renew_before: Option<Duration>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMonitor {
    kind: Option<MonitorKind>,
    #[serde(default, with = "humantime_serde")]
    poll_interval: Option<Duration>,
    window: Option<usize>,
    min_readings: Option<usize>,
    threshold: Option<f64>,
    #[serde(default, with = "humantime_serde")]
    cooldown: Option<Duration>,
    consecutive: Option<u32>,
    model: Option<crate::predict::Model>,
    mode: Option<MonitorMode>,
    zabbix: Option<RawZabbix>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawZabbix {
    url: Option<String>,
    username: Option<String>,
    #[serde(default, deserialize_with = "de_secret")]
    password: Option<String>,
    password_file: Option<PathBuf>,
    api_token_file: Option<PathBuf>,
    host: Option<String>,
    key: Option<String>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    retire_old_hosts: Option<RetireHosts>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawApi {
    listen: Option<String>,
    token_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "de_secret")]
    token: Option<String>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    insecure_plain_http: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawInstance {
    name: Option<String>,
    influx_url: Option<String>,
    rpc_address: Option<String>,
    username: Option<String>,
    #[serde(default, deserialize_with = "de_secret")]
    password: Option<String>,
    password_file: Option<PathBuf>,
    ssh: Option<RawSsh>,
    work_dir: Option<String>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawSsh {
    host: Option<String>,
    port: Option<u16>,
    user: Option<String>,
    identity_file: Option<PathBuf>,
    known_hosts_file: Option<PathBuf>,
    host_key_check: Option<HostKeyCheck>,
    host_keys: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    ready_timeout: Option<Duration>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCapture {
    listen: Option<String>,
    advertise_url: Option<String>,
    spool_dir: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    quiet_period: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    quiet_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    live_timeout: Option<Duration>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCutover {
    command: Option<String>,
    ssh: Option<RawSsh>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    synchronous: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawVerify {
    content: Option<ContentCheck>,
    sample_series: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    query_timeout: Option<Duration>,
    parallel_queries: Option<usize>,
    target_first: Option<bool>,
    read_back: Option<bool>,
    read_back_on_host: Option<bool>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawMigration {
    work_dir: Option<PathBuf>,
    user_passwords_file: Option<PathBuf>,
    existing_databases: Option<ExistingDatabases>,
    transfer: Option<TransferMode>,
    #[serde(default, with = "humantime_serde")]
    target_ready_timeout: Option<Duration>,
    probe_rate: Option<u32>,
    transfer_rate_limit: Option<RateScalar>,
    #[serde(default, with = "humantime_serde")]
    write_time_guard: Option<Duration>,
    idle_nice: Option<i64>,
}

/// The most `verify.parallel_queries` taken: more queries than a server has cores only
/// queue inside it, each holding its partial answer.
const MAX_PARALLEL_QUERIES: usize = 16;

/// The least `migration.transfer_rate_limit` taken: 4 GB then take 70 minutes.
const MIN_TRANSFER_RATE: u64 = 1_000_000;

/// The longest a poll interval or a stack's create or delete may be: the clocks they are
/// added to overflow somewhere past it, and a week is already no answer.
const MAX_WAIT: Duration = Duration::from_secs(7 * 24 * 3600);

/// `s` as an http(s) URL with a host and no credentials, trimmed and without a trailing
/// `/`; else what is wrong with it. An `@` anywhere is refused before anything is parsed,
/// and no message then repeats the URL: it may hold a password.
fn http_url(s: &str) -> Result<String, String> {
    let s = s.trim().trim_end_matches('/');
    if s.contains('@') {
        return Err("credentials in the URL are not accepted (they would show in logs); use username and password_file".into());
    }
    if s.contains(char::is_whitespace) {
        return Err(format!("expected an http(s) URL without spaces, got {s:?}"));
    }
    // The URL is kept as written, and parts of stateshift take it apart at `://`, which
    // a parser's leniency (`http:host`) would not have.
    if !(s.starts_with("http://") || s.starts_with("https://")) {
        return Err(format!("expected http(s) URL, got {s:?}"));
    }
    let u = reqwest::Url::parse(s).map_err(|e| {
        format!("expected http(s) URL like \"http://10.0.0.5:8086\", got {s:?}: {e}")
    })?;
    if u.host_str().is_none_or(str::is_empty) {
        return Err(format!("expected http(s) URL with a host, got {s:?}"));
    }
    Ok(s.to_string())
}

fn over_a_week(d: Duration) -> String {
    format!(
        "{} is longer than the most accepted, a week (7d)",
        humantime::format_duration(d)
    )
}

/// The bounds of `migration.write_time_guard`: under a millisecond no HTTP write is
/// answered, and over a minute a writer has long given up.
const MIN_WRITE_TIME_GUARD: Duration = Duration::from_millis(1);
const MAX_WRITE_TIME_GUARD: Duration = Duration::from_secs(60);

/// A rate in bytes per second as written: a number, or a string like `80MB/s`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RateScalar {
    N(u64),
    S(String),
}

/// `80MB/s`, `80 MiB/s`, `80000000` → bytes per second (`/s` optional; `0` = no limit).
fn bytes_per_second(r: &RateScalar) -> Result<u64, String> {
    match r {
        RateScalar::N(n) => Ok(*n),
        RateScalar::S(s) => {
            let t = s.trim();
            let t = t.strip_suffix("/s").unwrap_or(t).trim_end();
            t.parse::<bytesize::ByteSize>().map(|b| b.as_u64()).map_err(|_| {
                format!("{s:?} is not a rate: write bytes per second, e.g. \"80MB/s\", \"50MiB/s\" or 0 for no limit")
            })
        }
    }
}

/// A secret given as a scalar: `STATESHIFT__SOURCE__PASSWORD=12345` arrives as a number
/// once the environment is parsed; it is still a password. Never echoes the value.
fn de_secret<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        S(String),
        I(i64),
        U(u64),
        B(bool),
    }
    match Option::<Scalar>::deserialize(d) {
        Ok(v) => Ok(v.map(|v| match v {
            Scalar::S(s) => s,
            Scalar::I(i) => i.to_string(),
            Scalar::U(u) => u.to_string(),
            Scalar::B(b) => b.to_string(),
        })),
        Err(_) => Err(serde::de::Error::custom(
            "expected a string (value not shown: it is a secret)",
        )),
    }
}

// ---------------------------------------------------------------- typed

/// The whole validated configuration.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Config {
    pub source: InstanceConfig,
    /// A static target host (issue 2's operator-named target). `None` when the target is
    /// created by a stack provider.
    pub target: Option<InstanceConfig>,
    pub capture: CaptureConfig,
    pub cutover: CutoverConfig,
    pub verify: VerifyConfig,
    pub migration: MigrationConfig,
    pub service: ServiceConfig,
    pub provider: ProviderConfig,
    pub monitor: MonitorConfig,
    pub api: ApiConfig,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ServiceConfig {
    /// Names the target stacks: `<name>-influx-<migration id>`.
    pub name: String,
    /// The provider's stack that holds the configured source (deleted after a verified
    /// migration away from it). `None`: the source is not a stack of ours; never deleted.
    pub stack: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    /// No stacks: migrate to the configured `target`.
    Static,
    /// Local "VMs" on loopback addresses (the embedded default).
    Local,
    /// OpenStack Heat (Keystone v3).
    Heat,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    pub local_dir: PathBuf,
    pub local_subnet: u8,
    pub template: PathBuf,
    pub parameters: BTreeMap<String, String>,
    /// Template parameters whose values are secrets, read from `provider.parameter_files`
    /// (e.g. the admin password a new InfluxDB VM is created with). Sent to the provider
    /// only; never in logs, errors or the journal.
    pub secret_parameters: BTreeMap<String, Secret>,
    pub(crate) parameter_files: BTreeMap<String, PathBuf>,
    pub environment_files: Vec<PathBuf>,
    #[serde(serialize_with = "ser_duration")]
    pub create_timeout: Duration,
    #[serde(serialize_with = "ser_duration")]
    pub delete_timeout: Duration,
    pub heat: Option<HeatConfig>,
    /// How to reach the VMs of created stacks over SSH (host and port come from the
    /// stack's outputs).
    pub ssh: Option<SshConfig>,
}

/// Where Heat is and how to authenticate (`provider.heat`). Give either `username` +
/// `password`/`password_file` + `project_name`, or `application_credential_id` +
/// `application_credential_secret`/`..._secret_file`. Its checks are
/// [`HeatConfig::validate`], run at load and by [`crate::stack::heat::Heat::new`].
#[derive(Debug, Clone, serde::Serialize)]
pub struct HeatConfig {
    /// Keystone's URL, e.g. `https://keystone.example:5000/v3` (`/v3` is added if missing).
    pub auth_url: String,
    /// Region of the orchestration endpoint; `None`: the first endpoint with `interface`.
    pub region: Option<String>,
    /// Catalog interface (default `public`).
    pub interface: CatalogInterface,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    pub user_domain_name: String,
    pub project_name: Option<String>,
    pub project_domain_name: String,
    pub application_credential_id: Option<String>,
    pub application_credential_secret: Option<Secret>,
    pub application_credential_secret_file: Option<PathBuf>,
    /// PEM file with the CA(s) to trust besides the built-in roots. TLS verification is
    /// always on.
    pub ca_file: Option<PathBuf>,
    /// Use this orchestration URL instead of the catalog's (`%(tenant_id)s`,
    /// `%(project_id)s` and `{project_id}` are replaced by the token's project id).
    pub endpoint_override: Option<String>,
    /// One TCP/TLS connection attempt.
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// One HTTP request, start to end.
    #[serde(serialize_with = "ser_duration")]
    pub request_timeout: Duration,
    /// How long one call keeps retrying an unreachable or failing (5xx) service.
    #[serde(serialize_with = "ser_duration")]
    pub retry_budget: Duration,
    /// Deleting a failed or timed-out create waits this long for it to be gone.
    #[serde(serialize_with = "ser_duration")]
    pub delete_timeout: Duration,
    /// Polls start at 50 ms and back off to this interval (it bounds how late a
    /// `CREATE_COMPLETE` is seen).
    #[serde(serialize_with = "ser_duration")]
    pub poll_max_interval: Duration,
    /// Renew the token this long before Keystone's `expires_at`.
    #[serde(serialize_with = "ser_duration")]
    pub token_renew_before: Duration,
}

/// Which of a catalog entry's endpoints to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CatalogInterface {
    #[default]
    Public,
    Internal,
    Admin,
}

impl CatalogInterface {
    /// The name Keystone's catalog uses.
    pub fn as_str(self) -> &'static str {
        match self {
            CatalogInterface::Public => "public",
            CatalogInterface::Internal => "internal",
            CatalogInterface::Admin => "admin",
        }
    }
}

/// A check of one key that failed: the key path and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {msg}")]
pub struct KeyError {
    pub key: &'static str,
    pub msg: String,
}

impl HeatConfig {
    /// Defaults for everything but Keystone's URL (no credentials yet).
    pub fn new(auth_url: impl Into<String>) -> HeatConfig {
        HeatConfig {
            auth_url: auth_url.into(),
            region: None,
            interface: CatalogInterface::Public,
            username: None,
            password: None,
            password_file: None,
            user_domain_name: "Default".into(),
            project_name: None,
            project_domain_name: "Default".into(),
            application_credential_id: None,
            application_credential_secret: None,
            application_credential_secret_file: None,
            ca_file: None,
            endpoint_override: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(60),
            retry_budget: Duration::from_secs(60),
            delete_timeout: Duration::from_secs(600),
            poll_max_interval: Duration::from_millis(500),
            token_renew_before: Duration::from_secs(300),
        }
    }

    /// Pure checks (no filesystem, no network). Errors name the key and the fix.
    pub fn validate(&self) -> Result<(), KeyError> {
        let err = |key: &'static str, msg: &str| {
            Err(KeyError {
                key,
                msg: msg.to_string(),
            })
        };
        if let Err(e) = http_url(&self.auth_url) {
            return err(
                "provider.heat.auth_url",
                &format!("{e} (Keystone's, e.g. https://keystone:5000/v3)"),
            );
        }
        if let Some(Err(e)) = self.endpoint_override.as_deref().map(http_url) {
            return err("provider.heat.endpoint_override", &e);
        }
        let app = self.application_credential_id.is_some()
            || self.application_credential_secret.is_some()
            || self.application_credential_secret_file.is_some();
        let pw = self.username.is_some() || self.password.is_some() || self.password_file.is_some();
        match (app, pw) {
            (true, true) => {
                return err("provider.heat", "give either username/password or application_credential_id/secret, not both")
            }
            (false, false) => {
                return err("provider.heat", "no credentials: give username + password (or password_file) + project_name, or application_credential_id + application_credential_secret (or _secret_file)")
            }
            (true, false) => {
                if self.application_credential_id.is_none() {
                    return err("provider.heat.application_credential_id", "missing (the secret alone does not name the credential)");
                }
                if self.application_credential_secret.is_some()
                    == self.application_credential_secret_file.is_some()
                {
                    return err("provider.heat", "give exactly one of application_credential_secret and application_credential_secret_file");
                }
                if self.project_name.is_some() {
                    return err("provider.heat.project_name", "an application credential carries its own project; remove project_name");
                }
            }
            (false, true) => {
                if self.username.is_none() {
                    return err("provider.heat.username", "missing (a password needs a user)");
                }
                if self.password.is_some() == self.password_file.is_some() {
                    return err("provider.heat", "give exactly one of password and password_file");
                }
                if self.project_name.is_none() {
                    return err("provider.heat.project_name", "missing (stacks live in a project)");
                }
            }
        }
        if self.poll_max_interval < Duration::from_millis(50) {
            return err("provider.heat.poll_max_interval", "at least 50ms");
        }
        Ok(())
    }
}

impl RawHeat {
    fn into_config(self) -> HeatConfig {
        let d = HeatConfig::new(self.auth_url.unwrap_or_default());
        HeatConfig {
            region: self.region,
            interface: self.interface.unwrap_or_default(),
            username: self.username,
            password: self.password.map(Secret::new),
            password_file: self.password_file,
            user_domain_name: self.user_domain_name.unwrap_or(d.user_domain_name.clone()),
            project_name: self.project_name,
            project_domain_name: self
                .project_domain_name
                .unwrap_or(d.project_domain_name.clone()),
            application_credential_id: self.application_credential_id,
            application_credential_secret: self.application_credential_secret.map(Secret::new),
            application_credential_secret_file: self.application_credential_secret_file,
            ca_file: self.ca_file,
            endpoint_override: self.endpoint_override,
            connect_timeout: self.connect_timeout.unwrap_or(d.connect_timeout),
            request_timeout: self.request_timeout.unwrap_or(d.request_timeout),
            retry_budget: self.retry_budget.unwrap_or(d.retry_budget),
            delete_timeout: self.delete_timeout.unwrap_or(d.delete_timeout),
            poll_max_interval: self.poll_max_interval.unwrap_or(d.poll_max_interval),
            token_renew_before: self.token_renew_before.unwrap_or(d.token_renew_before),
            ..d
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MonitorKind {
    /// No automatic trigger: migrations start by hand only.
    None,
    /// CPU use of a local process (the local provider's `influxd`), in percent.
    Process,
    /// An item of a Zabbix server (JSON-RPC API).
    Zabbix,
}

/// `monitor.mode`: whether a prediction over the threshold starts a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum MonitorMode {
    /// It does (the default).
    Act,
    /// It is only recorded ("would migrate now: …" in `/status`, the metrics and the
    /// log); a migration starts by hand only. For watching the trigger's decisions before
    /// trusting it with a production database.
    Observe,
}

/// Where the load comes from with `monitor.kind: zabbix`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ZabbixMonitorConfig {
    /// The API endpoint, e.g. `http://zabbix.example/api_jsonrpc.php`.
    pub url: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub api_token: Option<Secret>,
    /// Host name of the InfluxDB VM (after a migration: the new stack's `zabbix_host` output, if any).
    pub host: String,
    pub key: String,
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// What happens to the Zabbix host of an InfluxDB VM once a verified migration has
    /// deleted its stack.
    pub retire_old_hosts: RetireHosts,
    pub(crate) password_file: Option<PathBuf>,
    pub(crate) api_token_file: Option<PathBuf>,
}

/// `monitor.zabbix.retire_old_hosts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RetireHosts {
    /// Delete the old VM's host (and its history) from Zabbix.
    Delete,
    /// Disable it: no data is expected, the history stays.
    Disable,
    /// Leave it as it is.
    Keep,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MonitorConfig {
    pub kind: MonitorKind,
    #[serde(serialize_with = "ser_duration")]
    pub poll_interval: Duration,
    pub window: usize,
    pub min_readings: usize,
    pub threshold: f64,
    #[serde(serialize_with = "ser_duration")]
    pub cooldown: Duration,
    pub consecutive: u32,
    /// The predictor (`monitor.model`: guarded, gm11, last or ewma).
    pub model: crate::predict::Model,
    pub mode: MonitorMode,
    pub zabbix: Option<ZabbixMonitorConfig>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// Bearer token for every state-changing request (`POST /migrate`); `None`: they are
    /// all refused.
    pub token: Option<Secret>,
    /// HTTPS. `None`: plain HTTP, which validation allows only on a loopback address or
    /// with `insecure_plain_http`.
    pub tls: Option<ApiTls>,
    /// Plain HTTP on a non-loopback address, asked for explicitly.
    pub insecure_plain_http: bool,
    pub(crate) token_file: Option<PathBuf>,
    /// `(tls_cert_file, tls_key_file)`, read into `tls` after validation.
    pub(crate) tls_files: Option<(PathBuf, PathBuf)>,
}

impl ApiConfig {
    /// Plain HTTP where others than this machine can connect.
    pub fn plain_http_beyond_loopback(&self) -> bool {
        self.tls.is_none() && !is_loopback(self.listen.ip())
    }
}

/// The API's certificate and key, ready to serve.
#[derive(Clone, serde::Serialize)]
pub struct ApiTls {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    #[serde(skip)]
    pub server: Arc<tokio_rustls::rustls::ServerConfig>,
}

impl std::fmt::Debug for ApiTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiTls")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .finish_non_exhaustive()
    }
}

/// 127.0.0.0/8 or ::1 (also written as ::ffff:127.x.y.z).
fn is_loopback(ip: std::net::IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// One InfluxDB host: where its HTTP API answers and how to run commands on it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct InstanceConfig {
    pub name: String,
    pub influx_url: String,
    /// The RPC (backup/restore) address as seen from the host itself.
    pub rpc_address: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    /// `None`: commands run on the orchestrator's own machine.
    pub ssh: Option<SshConfig>,
    /// Scratch directory on the host for dumps and restores.
    pub work_dir: String,
    /// Timeout of one HTTP request to this InfluxDB.
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostKeyCheck {
    /// Refuse unknown and changed host keys (the default).
    Strict,
    /// Accept and record a key never seen before; refuse a changed one.
    AcceptNew,
    /// No checking at all. Only for throwaway test hosts.
    Off,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SshConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub identity_file: Option<PathBuf>,
    pub known_hosts_file: Option<PathBuf>,
    pub host_key_check: HostKeyCheck,
    /// Pinned host public keys (`type base64` each), e.g. what a VM reported through its
    /// stack's `ssh_host_keys` output. When given, only these keys are accepted (strict),
    /// whatever `known_hosts_file` holds: a reused address with a new VM behind it works,
    /// an impostor does not.
    pub host_keys: Vec<String>,
    #[serde(serialize_with = "ser_duration")]
    pub connect_timeout: Duration,
    /// How long to keep retrying a host that does not accept SSH yet (fresh boot).
    #[serde(serialize_with = "ser_duration")]
    pub ready_timeout: Duration,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CaptureConfig {
    /// Where the capture receiver listens (port 0: any free port).
    pub listen: SocketAddr,
    /// The URL the source InfluxDB forwards writes to; default `http://{listen}`.
    pub advertise_url: Option<String>,
    pub spool_dir: PathBuf,
    /// The old instance must have received no write for this long before the drain.
    #[serde(serialize_with = "ser_duration")]
    pub quiet_period: Duration,
    /// Give up waiting for quiet after this long (the migration then fails safely); and
    /// before the repoint, give up on a replay whose backlog has not shrunk for this long
    /// (writers faster than the target: a rollback).
    #[serde(serialize_with = "ser_duration")]
    pub quiet_timeout: Duration,
    /// How long to wait for a new subscription to become live.
    #[serde(serialize_with = "ser_duration")]
    pub live_timeout: Duration,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct CutoverConfig {
    /// Command that repoints the writers; `{target_url}` is replaced by the target's
    /// InfluxDB URL (shell-quoted). `None`: nothing to repoint (writers follow by other means).
    pub command: Option<String>,
    /// Where the command runs; `None`: on the orchestrator's machine.
    pub ssh: Option<SshConfig>,
    #[serde(serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// The command returns only once no writer will write to the source again (it
    /// restarts them, or waits for them to switch). The drain then ends as soon as the
    /// source's counters prove every point it took has reached the capture, rather than
    /// after `capture.quiet_period` (still the fallback when they cannot prove it).
    pub synchronous: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ContentCheck {
    /// Per-series aggregates for every series, point-by-point where they differ, plus a sample.
    Full,
    /// Counts only (fast; for very large data sets).
    Counts,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyConfig {
    pub content: ContentCheck,
    /// Series per measurement compared point by point even when their aggregates agree.
    pub sample_series: usize,
    /// The longest one verification query may run without answering (the instances'
    /// `timeout` is for ordinary requests: an aggregate over a large database takes
    /// minutes).
    #[serde(serialize_with = "ser_duration")]
    pub query_timeout: Duration,
    /// Above 1, verification asks each aggregate (a field's count or sum) in a statement
    /// of its own, this many at once per server; at 1 one statement asks them all. One
    /// InfluxDB 1.6 statement keeps about one core busy.
    pub parallel_queries: usize,
    /// The measurements nothing writes to any more are aggregated on the target before
    /// the repoint and on the source after it: the full scans never run on the server the
    /// writers use (only the point-by-point reads of a sample, and whatever was written
    /// during the migration). Off: both sides at once, from just before the repoint.
    pub target_first: bool,
    /// With `target_first` and shards streamed (`migration.transfer: shards`, the first
    /// thing `auto` tries): before the repoint, read every shard back from the target and
    /// compare its files with the ones sent (SHA-256); a database whose shards all match
    /// needs no aggregate of the measurements nothing writes to any more. Off: aggregates
    /// for every measurement, as before.
    pub read_back: bool,
    /// With `read_back`, on a target reached over SSH: read and digest each shard on the
    /// target's own host with its `python3`, so only the digests cross SSH, not the
    /// shard's bytes. A host without `python3` is read through an SSH forward, as when
    /// this is off.
    pub read_back_on_host: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExistingDatabases {
    /// A database that already exists on the target stops the migration before any change.
    Refuse,
}

/// How the dump reaches the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransferMode {
    /// `shards`, else `forward` when the SSH servers allow TCP forwarding, else `stream`.
    Auto,
    /// Each shard goes from the source's InfluxDB RPC port into the target's, through SSH
    /// forwards and this process, speaking the snapshotter protocol: dump, transfer and
    /// restore in one pass, nothing written to a scratch disk.
    Shards,
    /// The target runs `influxd backup` against the source through SSH forwards: one pass.
    Forward,
    /// Dump on the source, then stream a tar archive through the orchestrator.
    Stream,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MigrationConfig {
    /// Orchestrator-side state: journal, reports.
    pub work_dir: PathBuf,
    /// Passwords for the source's InfluxDB users (InfluxDB never exports password hashes).
    pub user_passwords: BTreeMap<String, Secret>,
    pub existing_databases: ExistingDatabases,
    pub transfer: TransferMode,
    /// How long `prepare` keeps asking a target InfluxDB that does not answer yet (a VM
    /// still booting) before it calls the target unreachable.
    #[serde(serialize_with = "ser_duration")]
    pub target_ready_timeout: Duration,
    /// The daemon's availability probe during each migration it runs: writes and reads
    /// per second into the database `stateshift_probe` on the service's InfluxDB,
    /// recorded as a timeline (`{work_dir}/timelines/<id>/`); 0 turns it off.
    pub probe_rate: u32,
    /// Bytes per second the shard streams may read from the source, all copies together
    /// (0: as fast as they go). Bounds what a dump takes from the live source's disk, CPU
    /// and link, at the cost of a longer dump; the `forward` and `stream` fallbacks run
    /// `influxd backup` on a host and are not bounded by it.
    pub transfer_rate_limit: u64,
    /// The source's mean write time the shard streams keep to (0: off): every half
    /// second the dump reads the source's HTTP write counters, halves the streams' rate
    /// when its writes took longer than this on average (or none was answered while one
    /// was served all along), and raises it again while they take under half of it, up to
    /// `transfer_rate_limit`. For a source whose disk, CPU or storage backend the dump
    /// shares with its writers; the `forward` and `stream` fallbacks are not paced.
    #[serde(serialize_with = "ser_duration")]
    pub write_time_guard: Duration,
    /// The nice value (1–19; 0: off) of the `influxd` the writers are not using during
    /// the migration: the target's until the repoint (the shard imports, the replays and
    /// the early comparison run there), the source's from the repoint to the end
    /// (verification's scans). Each is back to 0 before writers use it and when the
    /// migration ends. Matters wherever the two servers, or a server and another busy
    /// process, share CPUs; on a VM of its own the server has nothing to yield to.
    pub idle_nice: u8,
    pub(crate) user_passwords_file: Option<PathBuf>,
}

/// A duration as the configuration writes it (`1m 30s`), for `config show`.
fn ser_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_duration(*d).to_string())
}

impl Config {
    /// The effective configuration as YAML: defaults and environment overrides applied,
    /// every secret shown as `***` (what `stateshift config show` prints).
    pub fn to_yaml(&self) -> Result<String, String> {
        serde_yaml::to_string(self).map_err(|e| e.to_string())
    }
}

/// Where the Debian package installs the stack template.
const PACKAGED_TEMPLATE: &str = "/usr/share/stateshift/heat-templates/influxdb.yaml";

/// `provider.template` when none is given: the packaged template where it is installed,
/// else a source checkout's, from the working directory.
fn default_template() -> PathBuf {
    template_or_checkout(Path::new(PACKAGED_TEMPLATE))
}

/// `packaged` if it exists, else a source checkout's template.
fn template_or_checkout(packaged: &Path) -> PathBuf {
    if packaged.exists() {
        packaged.to_path_buf()
    } else {
        PathBuf::from("heat-templates/influxdb.yaml")
    }
}

// ---------------------------------------------------------------- relative paths

/// `p` taken relative to `base` (the configuration file's directory) if it is relative.
/// A path from the home directory (`~/.ssh/id_ed25519`) stays as written: ssh expands it
/// (`-i`, `UserKnownHostsFile`), as it did before relative paths were resolved.
fn resolve(p: &mut PathBuf, base: &Path) {
    if p.is_relative() && !p.as_os_str().is_empty() && !p.starts_with("~") {
        *p = base.join(&*p);
    }
}

fn resolve_opt(p: &mut Option<PathBuf>, base: &Path) {
    if let Some(p) = p {
        resolve(p, base);
    }
}

impl RawSsh {
    fn resolve_paths(&mut self, base: &Path) {
        resolve_opt(&mut self.identity_file, base);
        resolve_opt(&mut self.known_hosts_file, base);
    }
}

impl RawInstance {
    fn resolve_paths(&mut self, base: &Path) {
        resolve_opt(&mut self.password_file, base);
        // `work_dir` is on the instance's host: not this machine's path.
        if let Some(ssh) = &mut self.ssh {
            ssh.resolve_paths(base);
        }
    }
}

impl RawConfig {
    /// Every path of this machine's that the configuration names, relative ones taken
    /// from the configuration file's directory (as an operator reads them: next to the
    /// file), whatever the working directory of the process that loads it. Defaults are
    /// not paths given, and stay as documented.
    fn resolve_paths(&mut self, base: &Path) {
        for inst in [self.source.as_mut(), self.target.as_mut()]
            .into_iter()
            .flatten()
        {
            inst.resolve_paths(base);
        }
        resolve_opt(&mut self.capture.spool_dir, base);
        if let Some(ssh) = &mut self.cutover.ssh {
            ssh.resolve_paths(base);
        }
        resolve_opt(&mut self.migration.work_dir, base);
        resolve_opt(&mut self.migration.user_passwords_file, base);
        let pr = &mut self.provider;
        resolve_opt(&mut pr.local_dir, base);
        resolve_opt(&mut pr.template, base);
        for p in pr.parameter_files.iter_mut().flat_map(|m| m.values_mut()) {
            resolve(p, base);
        }
        for p in pr.environment_files.iter_mut().flatten() {
            resolve(p, base);
        }
        if let Some(h) = &mut pr.heat {
            resolve_opt(&mut h.password_file, base);
            resolve_opt(&mut h.application_credential_secret_file, base);
            resolve_opt(&mut h.ca_file, base);
        }
        if let Some(ssh) = &mut pr.ssh {
            ssh.resolve_paths(base);
        }
        if let Some(z) = &mut self.monitor.zabbix {
            resolve_opt(&mut z.password_file, base);
            resolve_opt(&mut z.api_token_file, base);
        }
        resolve_opt(&mut self.api.token_file, base);
        resolve_opt(&mut self.api.tls_cert_file, base);
        resolve_opt(&mut self.api.tls_key_file, base);
    }
}

// ---------------------------------------------------------------- loading

impl Config {
    /// Load `file`, apply `STATESHIFT__*` environment overrides, validate, read secrets.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars()
            .filter(|(k, _)| k.starts_with("STATESHIFT__"))
            .collect();
        Self::load_with_env(file, env)
    }

    /// As [`Config::load`], with the environment given explicitly (tests).
    pub fn load_with_env(
        file: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut cfg = Self::load_unresolved(file, env)?;
        cfg.resolve_secrets(&file.display().to_string())?;
        Ok(cfg)
    }

    /// Load and validate `file` (with `env` over it) without reading any secret file:
    /// checks a configuration made for another machine, whose secret files exist only
    /// there (e.g. the one Heat renders for the orchestrator's VM). Secrets read from
    /// files are absent from the result.
    pub fn load_unresolved(
        file: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let fname = file.display().to_string();
        let env_map: std::collections::HashMap<String, String> = env.into_iter().collect();
        let merged = config::Config::builder()
            .add_source(
                config::File::from(file)
                    .format(config::FileFormat::Yaml)
                    .required(true),
            )
            .add_source(
                config::Environment::with_prefix("STATESHIFT")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .source(Some(env_map)),
            )
            .build()
            .map_err(|source| ConfigError::Read {
                file: fname.clone(),
                source,
            })?;
        let tree: serde_json::Value =
            merged
                .try_deserialize()
                .map_err(|source| ConfigError::Read {
                    file: fname.clone(),
                    source,
                })?;
        let raw: RawConfig = serde_path_to_error::deserialize(tree).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Invalid {
                file: fname.clone(),
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                msg: with_duration_hint(e.into_inner().to_string()),
            }
        })?;
        let mut raw = raw;
        // Only fails without a working directory, where relative paths mean nothing.
        let base = std::path::absolute(file)
            .ok()
            .and_then(|f| f.parent().map(Path::to_path_buf))
            .unwrap_or_default();
        raw.resolve_paths(&base);
        validate(&fname, raw)
    }

    fn resolve_secrets(&mut self, fname: &str) -> Result<(), ConfigError> {
        for (section, inst) in [
            ("source", Some(&mut self.source)),
            ("target", self.target.as_mut()),
        ] {
            let Some(inst) = inst else { continue };
            if let Some(p) = inst.password_file.take() {
                let key = format!("{section}.password_file");
                inst.password = Some(Secret::new(read_secret(fname, &key, &p)?));
            }
        }
        if let Some(z) = self.monitor.zabbix.as_mut() {
            if let Some(p) = z.password_file.take() {
                z.password = Some(Secret::new(read_secret(
                    fname,
                    "monitor.zabbix.password_file",
                    &p,
                )?));
            }
            if let Some(p) = z.api_token_file.take() {
                z.api_token = Some(Secret::new(read_secret(
                    fname,
                    "monitor.zabbix.api_token_file",
                    &p,
                )?));
            }
        }
        for (name, p) in std::mem::take(&mut self.provider.parameter_files) {
            let key = format!("provider.parameter_files.{name}");
            self.provider
                .secret_parameters
                .insert(name, Secret::new(read_secret(fname, &key, &p)?));
        }
        if let Some(p) = self.api.token_file.take() {
            self.api.token = Some(Secret::new(read_secret(fname, "api.token_file", &p)?));
        }
        if let Some((cert_file, key_file)) = self.api.tls_files.take() {
            self.api.tls = Some(read_api_tls(fname, cert_file, key_file)?);
        }
        if let Some(p) = self.migration.user_passwords_file.take() {
            let key = "migration.user_passwords_file";
            let text = read_secret(fname, key, &p)?;
            let map: BTreeMap<String, String> =
                serde_yaml::from_str(&text).map_err(|e| ConfigError::Invalid {
                    file: fname.into(),
                    key: key.into(),
                    // The parser's message may quote a password: give the place only.
                    msg: format!(
                        "{}{}: expected a YAML map of user name to password (quote numeric passwords)",
                        p.display(),
                        e.location().map(|l| format!(":{}:{}", l.line(), l.column())).unwrap_or_default()
                    ),
                })?;
            self.migration.user_passwords =
                map.into_iter().map(|(k, v)| (k, Secret::new(v))).collect();
        }
        Ok(())
    }
}

/// humantime-serde says "expected a duration"; say which form.
fn with_duration_hint(msg: String) -> String {
    if msg.ends_with("expected a duration") {
        format!("{msg} like \"500ms\", \"10s\" or \"5m\"")
    } else {
        msg
    }
}

fn read_secret(fname: &str, key: &str, path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim_end_matches(['\n', '\r']).to_string())
        .map_err(|source| ConfigError::SecretFile {
            file: fname.into(),
            key: key.into(),
            path: path.to_path_buf(),
            source,
        })
}

/// The API's certificate chain and private key (PEM), checked to belong together.
fn read_api_tls(fname: &str, cert_file: PathBuf, key_file: PathBuf) -> Result<ApiTls, ConfigError> {
    use crate::tls::{self, PemFile};
    let cert_pem = std::fs::read(&cert_file).map_err(|source| ConfigError::File {
        file: fname.into(),
        key: "api.tls_cert_file".into(),
        path: cert_file.clone(),
        source,
    })?;
    let key_pem = Secret::new(read_secret(fname, "api.tls_key_file", &key_file)?);
    let server = tls::server_config(
        &cert_pem,
        &cert_file,
        key_pem.expose().as_bytes(),
        &key_file,
    )
    .map_err(|e| ConfigError::Invalid {
        file: fname.into(),
        key: match e.file {
            PemFile::Cert => "api.tls_cert_file",
            PemFile::Key => "api.tls_key_file",
        }
        .into(),
        msg: e.msg,
    })?;
    Ok(ApiTls {
        cert_file,
        key_file,
        server,
    })
}

// ---------------------------------------------------------------- validation (pure)

/// Whether `line` looks like an OpenSSH public key: `TYPE BASE64 [comment]` with a key
/// type OpenSSH knows and a base64 body.
pub fn is_public_key_line(line: &str) -> bool {
    let mut parts = line.split_whitespace();
    let (Some(kind), Some(body)) = (parts.next(), parts.next()) else {
        return false;
    };
    let known = matches!(
        kind,
        "ssh-ed25519" | "ssh-rsa" | "sk-ssh-ed25519@openssh.com"
    ) || kind.starts_with("ecdsa-sha2-")
        || kind.starts_with("sk-ecdsa-sha2-");
    known
        && body.len() >= 16
        && body
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/' || b == b'=')
}

struct V<'a> {
    file: &'a str,
}

impl V<'_> {
    fn err(&self, key: &str, msg: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.into(),
            key: key.into(),
            msg: msg.into(),
        }
    }

    fn url(&self, key: &str, v: Option<&str>) -> Result<String, ConfigError> {
        let s = v.ok_or_else(|| {
            self.err(
                key,
                "missing; expected an http(s) URL like \"http://10.0.0.5:8086\"",
            )
        })?;
        http_url(s).map_err(|e| self.err(key, e))
    }

    fn instance(&self, section: &str, r: RawInstance) -> Result<InstanceConfig, ConfigError> {
        let k = |f: &str| format!("{section}.{f}");
        let influx_url = self.url(&k("influx_url"), r.influx_url.as_deref())?;
        if r.password.is_some() && r.password_file.is_some() {
            return Err(self.err(
                &k("password"),
                "give either password (environment) or password_file, not both",
            ));
        }
        if (r.password.is_some() || r.password_file.is_some()) && r.username.is_none() {
            return Err(self.err(&k("username"), "a password is set but no username"));
        }
        let rpc_address = r.rpc_address.unwrap_or_else(|| "127.0.0.1:8088".into());
        if !rpc_address.contains(':') {
            return Err(self.err(
                &k("rpc_address"),
                format!("expected host:port, got {rpc_address:?}"),
            ));
        }
        let ssh = r.ssh.map(|s| self.ssh(&k("ssh"), s)).transpose()?;
        Ok(InstanceConfig {
            name: r.name.unwrap_or_else(|| section.to_string()),
            influx_url,
            rpc_address,
            username: r.username,
            password: r.password.map(Secret::new),
            password_file: r.password_file,
            ssh,
            work_dir: r.work_dir.unwrap_or_else(|| "/var/tmp/stateshift".into()),
            timeout: r.timeout.unwrap_or(Duration::from_secs(30)),
        })
    }

    fn ssh(&self, section: &str, r: RawSsh) -> Result<SshConfig, ConfigError> {
        let k = |f: &str| format!("{section}.{f}");
        let host = r.host.filter(|h| !h.trim().is_empty()).ok_or_else(|| {
            self.err(
                &k("host"),
                "missing; expected the host name or address to reach over SSH",
            )
        })?;
        let host_key_check = r.host_key_check.unwrap_or(HostKeyCheck::Strict);
        let host_keys = r.host_keys.unwrap_or_default();
        for (i, key) in host_keys.iter().enumerate() {
            if !is_public_key_line(key) {
                return Err(self.err(
                    &k(&format!("host_keys[{i}]")),
                    format!("expected an SSH public key \"TYPE BASE64\" (e.g. ssh-ed25519 AAAA...), got {key:?}"),
                ));
            }
        }
        if !host_keys.is_empty() && host_key_check == HostKeyCheck::Off {
            return Err(self.err(
                &k("host_key_check"),
                "is off but host_keys are pinned; drop one of them",
            ));
        }
        Ok(SshConfig {
            host,
            port: r.port.unwrap_or(22),
            user: r.user.unwrap_or_else(|| "root".into()),
            identity_file: r.identity_file,
            known_hosts_file: r.known_hosts_file,
            host_key_check,
            host_keys,
            connect_timeout: r.connect_timeout.unwrap_or(Duration::from_secs(10)),
            ready_timeout: r.ready_timeout.unwrap_or(Duration::from_secs(300)),
        })
    }
}

/// Pure validation of the raw tree: no filesystem, network or process.
fn validate(file: &str, raw: RawConfig) -> Result<Config, ConfigError> {
    let v = V { file };
    let source = v.instance(
        "source",
        raw.source
            .ok_or_else(|| v.err("source", "missing; the InfluxDB instance to migrate from"))?,
    )?;
    let target = raw.target.map(|t| v.instance("target", t)).transpose()?;

    let c = raw.capture;
    let listen_s = c.listen.unwrap_or_else(|| "127.0.0.1:0".into());
    let listen: SocketAddr = listen_s.parse().map_err(|_| {
        v.err(
            "capture.listen",
            format!("expected ip:port like \"0.0.0.0:8899\", got {listen_s:?}"),
        )
    })?;
    let advertise_url = match c.advertise_url {
        Some(u) => Some(v.url("capture.advertise_url", Some(&u))?),
        None => None,
    };
    if advertise_url.is_none() && listen.ip().is_unspecified() {
        return Err(v.err("capture.advertise_url", "capture.listen binds every address; say which URL the source InfluxDB should forward writes to"));
    }
    let capture = CaptureConfig {
        listen,
        advertise_url,
        spool_dir: c
            .spool_dir
            .unwrap_or_else(|| PathBuf::from("/var/lib/stateshift/spool")),
        quiet_period: c.quiet_period.unwrap_or(Duration::from_secs(3)),
        quiet_timeout: c.quiet_timeout.unwrap_or(Duration::from_secs(120)),
        live_timeout: c.live_timeout.unwrap_or(Duration::from_secs(10)),
    };

    let cutover = CutoverConfig {
        command: raw.cutover.command.filter(|c| !c.trim().is_empty()),
        ssh: raw
            .cutover
            .ssh
            .map(|s| v.ssh("cutover.ssh", s))
            .transpose()?,
        timeout: raw.cutover.timeout.unwrap_or(Duration::from_secs(120)),
        synchronous: raw.cutover.synchronous.unwrap_or(false),
    };
    if cutover.synchronous && cutover.command.is_none() {
        return Err(v.err(
            "cutover.synchronous",
            "true, but there is no cutover.command to wait for; without one, writers follow by other means and the drain waits for capture.quiet_period",
        ));
    }

    let verify = VerifyConfig {
        content: raw.verify.content.unwrap_or(ContentCheck::Full),
        sample_series: raw.verify.sample_series.unwrap_or(3),
        query_timeout: raw
            .verify
            .query_timeout
            .unwrap_or(Duration::from_secs(1800)),
        parallel_queries: match raw.verify.parallel_queries {
            None => 1,
            Some(n @ 1..=MAX_PARALLEL_QUERIES) => n,
            Some(n) => {
                return Err(v.err(
                    "verify.parallel_queries",
                    format!("{n} is not between 1 and {MAX_PARALLEL_QUERIES}"),
                ))
            }
        },
        target_first: raw.verify.target_first.unwrap_or(true),
        read_back: raw.verify.read_back.unwrap_or(true),
        read_back_on_host: raw.verify.read_back_on_host.unwrap_or(true),
    };

    let m = raw.migration;
    let migration = MigrationConfig {
        work_dir: m
            .work_dir
            .unwrap_or_else(|| PathBuf::from("/var/lib/stateshift")),
        user_passwords: BTreeMap::new(),
        user_passwords_file: m.user_passwords_file,
        transfer: m.transfer.unwrap_or(TransferMode::Auto),
        existing_databases: m.existing_databases.unwrap_or(ExistingDatabases::Refuse),
        target_ready_timeout: m.target_ready_timeout.unwrap_or(Duration::from_secs(600)),
        probe_rate: m.probe_rate.unwrap_or(10),
        transfer_rate_limit: match &m.transfer_rate_limit {
            None => 0,
            Some(r) => {
                bytes_per_second(r).map_err(|e| v.err("migration.transfer_rate_limit", e))?
            }
        },
        write_time_guard: m.write_time_guard.unwrap_or(Duration::ZERO),
        idle_nice: match m.idle_nice {
            None => 19,
            Some(n @ 0..=19) => n as u8,
            Some(n) => {
                return Err(v.err(
                    "migration.idle_nice",
                    format!("{n} is not a nice value between 0 (off) and 19 (the lowest priority)"),
                ))
            }
        },
    };
    // `40` meant as 40 MB/s would be 40 bytes per second: a dump that never ends.
    if (1..MIN_TRANSFER_RATE).contains(&migration.transfer_rate_limit) {
        return Err(v.err(
            "migration.transfer_rate_limit",
            format!(
                "{} bytes per second is below the least accepted, 1MB/s (a plain number counts bytes; write e.g. \"40MB/s\", or 0 for no limit)",
                migration.transfer_rate_limit
            ),
        ));
    }
    let guard = migration.write_time_guard;
    if !guard.is_zero() && !(MIN_WRITE_TIME_GUARD..=MAX_WRITE_TIME_GUARD).contains(&guard) {
        return Err(v.err(
            "migration.write_time_guard",
            format!(
                "{} is not a mean write time between {} and {} (0s turns the guard off)",
                humantime::format_duration(guard),
                humantime::format_duration(MIN_WRITE_TIME_GUARD),
                humantime::format_duration(MAX_WRITE_TIME_GUARD)
            ),
        ));
    }
    if migration.probe_rate > 1000 {
        return Err(v.err(
            "migration.probe_rate",
            format!(
                "{} probes per second; at most 1000 (0 turns the probe off)",
                migration.probe_rate
            ),
        ));
    }

    let svc = raw.service;
    let service = ServiceConfig {
        name: svc.name.unwrap_or_else(|| "service".into()),
        stack: svc.stack.filter(|s| !s.is_empty()),
    };
    if !service
        .name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        || service.name.is_empty()
        || service.name.len() > 40
    {
        return Err(v.err(
            "service.name",
            format!(
                "use 1-40 letters, digits, '-' or '_', got {:?}",
                service.name
            ),
        ));
    }
    let pr = raw.provider;
    let provider = ProviderConfig {
        kind: pr.kind.unwrap_or(if target.is_some() {
            ProviderKind::Static
        } else {
            ProviderKind::Local
        }),
        local_dir: pr
            .local_dir
            .unwrap_or_else(|| PathBuf::from("/var/lib/stateshift/local")),
        local_subnet: pr.local_subnet.unwrap_or(10),
        template: pr.template.unwrap_or_else(default_template),
        parameters: pr
            .parameters
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_string()))
            .collect(),
        secret_parameters: BTreeMap::new(),
        parameter_files: pr.parameter_files.unwrap_or_default(),
        environment_files: pr.environment_files.unwrap_or_default(),
        create_timeout: pr.create_timeout.unwrap_or(Duration::from_secs(600)),
        delete_timeout: pr.delete_timeout.unwrap_or(Duration::from_secs(600)),
        heat: pr.heat.map(RawHeat::into_config),
        ssh: match pr.ssh {
            None => None,
            Some(mut r) => {
                // The host comes from each stack's outputs.
                r.host.get_or_insert_with(|| "from-stack-outputs".into());
                Some(v.ssh("provider.ssh", r)?)
            }
        },
    };
    if let Some(name) = provider
        .parameter_files
        .keys()
        .find(|n| provider.parameters.contains_key(*n))
    {
        return Err(v.err(
            &format!("provider.parameter_files.{name}"),
            "the parameter is also in provider.parameters; give it in one place",
        ));
    }
    if provider.kind == ProviderKind::Heat && provider.heat.is_none() {
        return Err(v.err("provider.heat", "missing; provider.kind is heat"));
    }
    for (key, d) in [
        ("provider.create_timeout", provider.create_timeout),
        ("provider.delete_timeout", provider.delete_timeout),
    ] {
        if d > MAX_WAIT {
            return Err(v.err(key, over_a_week(d)));
        }
    }
    if let Some(h) = &provider.heat {
        h.validate().map_err(|e| v.err(e.key, e.msg))?;
    }
    if provider.kind == ProviderKind::Static && target.is_none() {
        return Err(v.err(
            "target",
            "missing; provider.kind is static, so the target host must be named here",
        ));
    }
    let mo = raw.monitor;
    let monitor = MonitorConfig {
        kind: mo.kind.unwrap_or(MonitorKind::None),
        poll_interval: mo.poll_interval.unwrap_or(Duration::from_secs(60)),
        window: mo.window.unwrap_or(5),
        min_readings: mo.min_readings.unwrap_or(3),
        threshold: mo.threshold.unwrap_or(10.0),
        cooldown: mo.cooldown.unwrap_or(Duration::from_secs(900)),
        consecutive: mo.consecutive.unwrap_or(3),
        mode: mo.mode.unwrap_or(MonitorMode::Act),
        model: mo.model.unwrap_or_default(),
        zabbix: match mo.zabbix {
            None => None,
            Some(z) => {
                if z.password.is_some() && z.password_file.is_some() {
                    return Err(v.err(
                        "monitor.zabbix.password",
                        "give either password (environment) or password_file, not both",
                    ));
                }
                let has_password = z.password.is_some() || z.password_file.is_some();
                if has_password == z.api_token_file.is_some()
                    || (has_password && z.username.is_none())
                {
                    return Err(v.err("monitor.zabbix", "give username + password_file (or STATESHIFT__MONITOR__ZABBIX__PASSWORD), or api_token_file"));
                }
                Some(ZabbixMonitorConfig {
                    url: v.url("monitor.zabbix.url", z.url.as_deref())?,
                    username: z.username,
                    password: z.password.map(Secret::new),
                    api_token: None,
                    host: z.host.filter(|h| !h.is_empty()).ok_or_else(|| {
                        v.err(
                            "monitor.zabbix.host",
                            "missing; the Zabbix host name of the InfluxDB VM",
                        )
                    })?,
                    key: z
                        .key
                        .unwrap_or_else(|| "system.cpu.load[percpu,avg1]".into()),
                    timeout: z.timeout.unwrap_or(Duration::from_secs(10)),
                    retire_old_hosts: z.retire_old_hosts.unwrap_or(RetireHosts::Delete),
                    password_file: z.password_file,
                    api_token_file: z.api_token_file,
                })
            }
        },
    };
    if monitor.kind == MonitorKind::Zabbix && monitor.zabbix.is_none() {
        return Err(v.err("monitor.zabbix", "missing; monitor.kind is zabbix"));
    }
    if monitor.mode == MonitorMode::Observe && monitor.kind == MonitorKind::None {
        return Err(v.err(
            "monitor.mode",
            "observe needs a load to observe: set monitor.kind to zabbix or process",
        ));
    }
    if monitor.poll_interval < Duration::from_secs(1) {
        return Err(v.err("monitor.poll_interval", "must be at least 1s"));
    }
    if monitor.poll_interval > MAX_WAIT {
        return Err(v.err("monitor.poll_interval", over_a_week(monitor.poll_interval)));
    }
    if monitor.window == 0 || monitor.min_readings == 0 || monitor.min_readings > monitor.window {
        return Err(v.err(
            "monitor.min_readings",
            format!(
                "need 1 <= min_readings <= window, got {} and {}",
                monitor.min_readings, monitor.window
            ),
        ));
    }
    if !monitor.threshold.is_finite() {
        return Err(v.err("monitor.threshold", "must be a finite number"));
    }
    if monitor.cooldown > MAX_WAIT {
        return Err(v.err("monitor.cooldown", over_a_week(monitor.cooldown)));
    }
    // What else the daemon's trigger policy refuses when it starts is refused here, by its
    // key, so that `config check` answers as the daemon would.
    crate::predict::policy::PolicyConfig {
        threshold: monitor.threshold,
        min_readings: monitor.min_readings,
        window: monitor.window,
        cooldown: monitor.cooldown,
        consecutive: monitor.consecutive as usize,
        model: monitor.model,
    }
    .validate()
    .map_err(|e| match e {
        crate::predict::PredictError::InvalidPolicy { field, problem } => {
            v.err(&format!("monitor.{field}"), problem)
        }
        other => v.err("monitor", other.to_string()),
    })?;
    let ap = raw.api;
    let listen_s = ap.listen.unwrap_or_else(|| "127.0.0.1:9180".into());
    let listen: SocketAddr = listen_s
        .parse()
        .map_err(|_| v.err("api.listen", format!("expected ip:port, got {listen_s:?}")))?;
    let tls_files = match (ap.tls_cert_file, ap.tls_key_file) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => None,
        (Some(_), None) => {
            return Err(v.err(
                "api.tls_key_file",
                "missing; api.tls_cert_file is set, and HTTPS needs the certificate's private key too (PEM)",
            ))
        }
        (None, Some(_)) => {
            return Err(v.err(
                "api.tls_cert_file",
                "missing; api.tls_key_file is set, and HTTPS needs the certificate too (PEM)",
            ))
        }
    };
    let insecure_plain_http = ap.insecure_plain_http.unwrap_or(false);
    if insecure_plain_http && tls_files.is_some() {
        return Err(v.err(
            "api.insecure_plain_http",
            "set together with api.tls_cert_file/api.tls_key_file; remove one (with TLS the API never serves plain HTTP)",
        ));
    }
    if tls_files.is_none() && !insecure_plain_http && !is_loopback(listen.ip()) {
        return Err(v.err(
            "api.listen",
            format!(
                "{listen} is reachable from other machines, and without TLS the bearer token and /status would cross the network in clear; set api.tls_cert_file and api.tls_key_file (PEM), listen on 127.0.0.1, or set api.insecure_plain_http: true to accept plain HTTP"
            ),
        ));
    }
    let api = ApiConfig {
        listen,
        token: ap.token.map(Secret::new),
        tls: None,
        insecure_plain_http,
        token_file: ap.token_file,
        tls_files,
    };
    Ok(Config {
        source,
        target,
        capture,
        cutover,
        verify,
        migration,
        service,
        provider,
        monitor,
        api,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(yaml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c.yaml");
        std::fs::write(&p, yaml).unwrap();
        Config::load_with_env(&p, env.iter().map(|(k, v)| (k.to_string(), v.to_string())))
    }

    const MIN: &str = "source:\n  influx_url: http://127.0.0.1:8086\n  username: admin\n";

    #[test]
    fn relative_paths_are_taken_from_the_configuration_files_directory() {
        let d = tempfile::tempdir().unwrap();
        let conf = d.path().join("etc");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(conf.join("source.password"), "s3cret\n").unwrap();
        let p = conf.join("stateshift.yaml");
        std::fs::write(
            &p,
            "source:\n  influx_url: http://127.0.0.1:8086\n  username: admin\n  \
             password_file: source.password\n  work_dir: scratch\n  \
             ssh: {host: 192.0.2.1, identity_file: keys/id_ed25519, known_hosts_file: ~/.ssh/kh}\n\
             provider:\n  template: ../templates/influxdb.yaml\n  \
             environment_files: [env.yaml, /abs/env.yaml]\n",
        )
        .unwrap();
        // Loaded from elsewhere: the working directory is this crate's, not `etc`.
        let env = [(
            "STATESHIFT__CAPTURE__SPOOL_DIR".to_string(),
            "spool".to_string(),
        )];
        let c = Config::load_with_env(&p, env).unwrap();
        assert_eq!(c.source.password.as_ref().unwrap().expose(), "s3cret");
        let ssh = c.source.ssh.as_ref().unwrap();
        assert_eq!(ssh.identity_file, Some(conf.join("keys/id_ed25519")));
        // ssh expands `~` itself.
        assert_eq!(ssh.known_hosts_file, Some(PathBuf::from("~/.ssh/kh")));
        assert_eq!(c.provider.template, conf.join("../templates/influxdb.yaml"));
        assert_eq!(
            c.provider.environment_files,
            [conf.join("env.yaml"), PathBuf::from("/abs/env.yaml")]
        );
        assert_eq!(c.capture.spool_dir, conf.join("spool"));
        // A path on the instance's own host is not this machine's.
        assert_eq!(c.source.work_dir, "scratch");
        // Defaults are as documented.
        assert_eq!(c.migration.work_dir, PathBuf::from("/var/lib/stateshift"));
    }

    #[test]
    fn environment_overrides_the_file_with_double_underscores() {
        let c = load(
            MIN,
            &[
                ("STATESHIFT__CAPTURE__QUIET_PERIOD", "7s"),
                ("STATESHIFT__SOURCE__INFLUX_URL", "http://10.1.2.3:8086"),
            ],
        )
        .unwrap();
        assert_eq!(c.capture.quiet_period, Duration::from_secs(7));
        assert_eq!(c.source.influx_url, "http://10.1.2.3:8086");
    }

    #[test]
    fn template_parameters_take_numbers_and_booleans_as_heat_does() {
        let c = load(
            &format!(
                "{MIN}provider:\n  parameters:\n    flavor: m1.small\n    count: 2\n    ha: true\n"
            ),
            &[("STATESHIFT__PROVIDER__PARAMETERS__DISK_MB", "6")],
        )
        .unwrap();
        let p: Vec<(&str, &str)> = c
            .provider
            .parameters
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            p,
            [
                ("count", "2"),
                ("disk_mb", "6"),
                ("flavor", "m1.small"),
                ("ha", "true")
            ]
        );
    }

    #[test]
    fn a_numeric_password_from_the_environment_is_a_password_and_never_printed() {
        let c = load(MIN, &[("STATESHIFT__SOURCE__PASSWORD", "123456")]).unwrap();
        assert_eq!(
            c.source.password.as_ref().map(|p| p.expose()),
            Some("123456")
        );
        assert!(!format!("{c:?}").contains("123456"));
        let e = load(&format!("{MIN}  password: [1, 2]\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("source.password") && e.contains("not shown"),
            "{e}"
        );
    }

    #[test]
    fn credentials_in_a_url_are_refused_without_echoing_them() {
        let e = load(
            "source:\n  influx_url: http://admin:hunter2@10.0.0.1:8086\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("source.influx_url") && e.contains("credentials"),
            "{e}"
        );
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn a_non_loopback_api_listen_without_tls_is_refused_naming_the_key_and_the_fix() {
        for listen in [
            "0.0.0.0:9180",
            "10.0.0.5:9180",
            "[::]:9180",
            "[2001:db8::1]:9180",
        ] {
            let e = load(&format!("{MIN}api:\n  listen: \"{listen}\"\n"), &[])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("c.yaml: api.listen:")
                    && e.contains("without TLS")
                    && e.contains("set api.tls_cert_file and api.tls_key_file")
                    && e.contains("api.insecure_plain_http: true"),
                "{listen}: {e}"
            );
        }
        // From the environment too.
        let e = load(MIN, &[("STATESHIFT__API__LISTEN", "0.0.0.0:9180")]).unwrap_err();
        assert!(e.to_string().contains("api.listen"), "{e}");
    }

    #[test]
    fn loopback_stays_plain_http_by_default() {
        for listen in [
            "127.0.0.1:9180",
            "127.0.10.3:0",
            "[::1]:9180",
            "[::ffff:127.0.0.1]:1",
        ] {
            let c = load(&format!("{MIN}api:\n  listen: \"{listen}\"\n"), &[])
                .unwrap_or_else(|e| panic!("{listen}: {e}"));
            assert!(c.api.tls.is_none() && !c.api.insecure_plain_http);
            assert!(!c.api.plain_http_beyond_loopback(), "{listen}");
        }
        let c = load(MIN, &[]).unwrap();
        assert_eq!(c.api.listen.to_string(), "127.0.0.1:9180");
    }

    #[test]
    fn insecure_plain_http_accepts_plain_http_beyond_loopback() {
        let c = load(
            &format!("{MIN}api:\n  listen: \"0.0.0.0:9180\"\n  insecure_plain_http: true\n"),
            &[],
        )
        .unwrap();
        assert!(c.api.insecure_plain_http && c.api.tls.is_none());
        assert!(c.api.plain_http_beyond_loopback());
        let c = load(
            &format!("{MIN}api:\n  listen: \"10.0.0.5:9180\"\n"),
            &[("STATESHIFT__API__INSECURE_PLAIN_HTTP", "true")],
        )
        .unwrap();
        assert!(c.api.insecure_plain_http);
    }

    #[test]
    fn a_tls_certificate_without_its_key_is_refused_and_the_other_way_round() {
        let e = load(
            &format!("{MIN}api:\n  tls_cert_file: /etc/stateshift/api.crt\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("api.tls_key_file: missing") && e.contains("api.tls_cert_file is set"),
            "{e}"
        );
        let e = load(
            &format!("{MIN}api:\n  tls_key_file: /etc/stateshift/api.key\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("api.tls_cert_file: missing"), "{e}");
    }

    #[test]
    fn tls_and_insecure_plain_http_together_are_refused() {
        let e = load(
            &format!("{MIN}api:\n  tls_cert_file: /a.crt\n  tls_key_file: /a.key\n  insecure_plain_http: true\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("api.insecure_plain_http"), "{e}");
    }

    #[test]
    fn a_missing_tls_file_names_the_key_and_the_path() {
        let e = load(
            &format!("{MIN}api:\n  tls_cert_file: /nonexistent/api.crt\n  tls_key_file: /nonexistent/api.key\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("api.tls_cert_file") && e.contains("/nonexistent/api.crt"),
            "{e}"
        );
        let d = tempfile::tempdir().unwrap();
        let cert = d.path().join("api.crt");
        std::fs::write(&cert, "").unwrap();
        let e = load(
            &format!(
                "{MIN}api:\n  tls_cert_file: {}\n  tls_key_file: /nonexistent/api.key\n",
                cert.display()
            ),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("api.tls_key_file") && e.contains("/nonexistent/api.key"),
            "{e}"
        );
    }

    #[test]
    fn a_synchronous_cutover_needs_a_command_and_is_off_by_default() {
        assert!(!load(MIN, &[]).unwrap().cutover.synchronous);
        let on = load(
            &format!("{MIN}cutover:\n  command: \"true\"\n  synchronous: true\n"),
            &[],
        )
        .unwrap();
        assert!(on.cutover.synchronous);
        let e = load(&format!("{MIN}cutover:\n  synchronous: true\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cutover.synchronous") && e.contains("cutover.command"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_duration_names_the_key_and_the_expected_form() {
        let e = load(&format!("{MIN}capture:\n  quiet_period: soon\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("capture.quiet_period") && e.contains("\"10s\""),
            "{e}"
        );
    }
    #[test]
    fn the_model_is_an_enum_read_once_with_its_key_path_on_error() {
        use crate::predict::Model;
        assert_eq!(load(MIN, &[]).unwrap().monitor.model, Model::Guarded);
        let c = load(&format!("{MIN}monitor:\n  model: GM11\n"), &[]).unwrap();
        assert_eq!(
            c.monitor.model,
            Model::Gm11,
            "as `stateshift predict` reads it"
        );
        let e = load(&format!("{MIN}monitor:\n  model: gm12\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("monitor.model")
                && e.contains("\"gm12\"")
                && e.contains("guarded, gm11, last or ewma"),
            "{e}"
        );
    }

    #[test]
    fn heat_durations_are_humantime_and_unknown_keys_are_refused_by_their_path() {
        let heat = |extra: &str| {
            format!("{MIN}provider:\n  kind: heat\n  heat:\n    auth_url: http://keystone:5000/v3\n    username: so\n    password: pw\n    project_name: svc\n{extra}")
        };
        let c = load(
            &heat("    poll_max_interval: 500ms\n    retry_budget: 5s\n"),
            &[],
        )
        .unwrap();
        let h = c.provider.heat.unwrap();
        assert_eq!(h.poll_max_interval, Duration::from_millis(500));
        assert_eq!(h.retry_budget, Duration::from_secs(5));
        assert_eq!(h.interface, CatalogInterface::Public);
        let e = load(&heat("    usernme: so\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("provider.heat") && e.contains("usernme"), "{e}");
        let e = load(&heat("    retry_budget: soon\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("provider.heat.retry_budget")
                && e.contains("soon")
                && e.contains("duration"),
            "{e}"
        );
        let e = load(
            &format!("{MIN}provider:\n  kind: heat\n  heat:\n    auth_url: http://k:5000/v3\n    username: so\n    password: [hunter2]\n    project_name: p\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(!e.contains("hunter2") && e.contains("secret"), "{e}");
    }

    #[test]
    fn heat_validation_names_the_key_and_the_fix() {
        let mut c = HeatConfig::new("keystone:5000");
        assert_eq!(c.validate().unwrap_err().key, "provider.heat.auth_url");
        c.auth_url = "http://k:5000/v3".into();
        assert!(c.validate().unwrap_err().msg.contains("no credentials"));
        c.username = Some("demo".into());
        c.password = Some(Secret::new("x"));
        assert_eq!(c.validate().unwrap_err().key, "provider.heat.project_name");
        c.project_name = Some("demo".into());
        c.validate().unwrap();
        c.application_credential_id = Some("id".into());
        assert!(c.validate().unwrap_err().msg.contains("not both"));
    }

    #[test]
    fn a_bad_heat_section_is_refused_at_load_naming_its_key_path() {
        let heat = |extra: &str| {
            format!("{MIN}provider:\n  kind: heat\n  heat:\n    auth_url: http://keystone:5000/v3\n    username: so\n    password: pw\n    project_name: svc\n{extra}")
        };
        load(&heat(""), &[]).unwrap();
        let e = load(&heat("    interface: outside\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("provider.heat.interface: unknown variant `outside`")
                && e.contains("`internal`"),
            "{e}"
        );
        let e = load(
            &format!("{MIN}provider:\n  kind: heat\n  heat:\n    auth_url: keystone\n    username: so\n    password: Kx9-never-shown\n    project_name: svc\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("provider.heat.auth_url"), "{e}");
        // A password no path or message could hold by chance (a temporary directory
        // named ".tmpwXXXX" once held "pw").
        assert!(!e.contains("Kx9-never-shown"), "no secret in {e}");
    }
    #[test]
    fn secret_template_parameters_come_from_files_and_never_print() {
        let d = tempfile::tempdir().unwrap();
        let pw = d.path().join("admin.password");
        std::fs::write(&pw, "s3cret-admin-pw\n").unwrap();
        let c = load(
            &format!(
                "{MIN}provider:\n  parameters:\n    flavor: m1.small\n  parameter_files:\n    influxdb_admin_password: {}\n",
                pw.display()
            ),
            &[],
        )
        .unwrap();
        assert_eq!(
            c.provider.secret_parameters["influxdb_admin_password"].expose(),
            "s3cret-admin-pw"
        );
        assert!(!format!("{c:?}").contains("s3cret-admin-pw"));
        // A parameter in both places is ambiguous.
        let e = load(
            &format!(
                "{MIN}provider:\n  parameters:\n    x: 1\n  parameter_files:\n    x: {}\n",
                pw.display()
            ),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("provider.parameter_files.x"), "{e}");
        // A missing file names the parameter.
        let e = load(
            &format!("{MIN}provider:\n  parameter_files:\n    p: /nonexistent/pw\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("provider.parameter_files.p") && e.contains("/nonexistent/pw"),
            "{e}"
        );
    }

    #[test]
    fn pinned_host_keys_must_be_public_keys_and_cannot_be_combined_with_no_checking() {
        const KEY: &str =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDIfEYXAUQtwmEsxcNkkgTeO4S3ZCKl0jGy837I7q9hC";
        let c = load(
            &format!("{MIN}  ssh:\n    host: h\n    host_keys: [\"{KEY}\"]\n"),
            &[],
        )
        .unwrap();
        assert_eq!(c.source.ssh.unwrap().host_keys, [KEY]);
        let e = load(
            &format!("{MIN}  ssh:\n    host: h\n    host_keys: [\"{KEY}\", \"hello\"]\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("source.ssh.host_keys[1]"), "{e}");
        let e = load(
            &format!(
                "{MIN}  ssh:\n    host: h\n    host_key_check: \"off\"\n    host_keys: [\"{KEY}\"]\n"
            ),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("source.ssh.host_key_check"), "{e}");
    }

    #[test]
    fn observe_mode_is_chosen_explicitly_and_needs_a_load_source() {
        assert_eq!(load(MIN, &[]).unwrap().monitor.mode, MonitorMode::Act);
        let c = load(
            &format!("{MIN}monitor:\n  kind: process\n  mode: observe\n"),
            &[],
        )
        .unwrap();
        assert_eq!(c.monitor.mode, MonitorMode::Observe);
        let e = load(&format!("{MIN}monitor:\n  mode: observe\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("monitor.mode") && e.contains("monitor.kind"),
            "{e}"
        );
        let e = load(
            &format!("{MIN}monitor:\n  kind: process\n  mode: watch\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("monitor.mode"), "{e}");
    }

    #[test]
    fn verification_queries_have_their_own_limit() {
        let c = load(MIN, &[]).unwrap();
        assert_eq!(c.verify.query_timeout, Duration::from_secs(1800));
        let c = load(&format!("{MIN}verify:\n  query_timeout: 2h\n"), &[]).unwrap();
        assert_eq!(c.verify.query_timeout, Duration::from_secs(7200));
        let e = load(&format!("{MIN}verify:\n  query_timeout: long\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("verify.query_timeout"), "{e}");
    }

    #[test]
    fn the_target_readiness_wait_and_the_old_zabbix_host_policy_have_defaults_and_checks() {
        let c = load(MIN, &[]).unwrap();
        assert_eq!(c.migration.target_ready_timeout, Duration::from_secs(600));
        assert_eq!(c.migration.probe_rate, 10);
        assert_eq!(c.provider.template, default_template());
        let d = tempfile::tempdir().unwrap();
        let packaged = d.path().join("influxdb.yaml");
        assert_eq!(
            template_or_checkout(&packaged),
            PathBuf::from("heat-templates/influxdb.yaml")
        );
        std::fs::write(&packaged, "heat_template_version: 2018-08-31\n").unwrap();
        assert_eq!(template_or_checkout(&packaged), packaged);
        let z = "monitor:\n  kind: zabbix\n  zabbix:\n    url: http://z/api_jsonrpc.php\n    username: u\n    password: p\n    host: h\n";
        let c = load(&format!("{MIN}{z}"), &[]).unwrap();
        assert_eq!(
            c.monitor.zabbix.unwrap().retire_old_hosts,
            RetireHosts::Delete
        );
        let e = load(&format!("{MIN}{z}    retire_old_hosts: burn\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("monitor.zabbix.retire_old_hosts"), "{e}");
        let c = load(
            &format!(
                "{MIN}{z}    retire_old_hosts: disable\nmigration:\n  target_ready_timeout: 90s\n"
            ),
            &[],
        )
        .unwrap();
        assert_eq!(
            c.monitor.zabbix.unwrap().retire_old_hosts,
            RetireHosts::Disable
        );
        assert_eq!(c.migration.target_ready_timeout, Duration::from_secs(90));
    }

    #[test]
    fn verify_parallel_queries_defaults_to_one_and_names_a_count_out_of_range() {
        assert_eq!(load(MIN, &[]).unwrap().verify.parallel_queries, 1);
        let c = load(&format!("{MIN}verify:\n  parallel_queries: 4\n"), &[]).unwrap();
        assert_eq!(c.verify.parallel_queries, 4);
        let c = load(MIN, &[("STATESHIFT__VERIFY__PARALLEL_QUERIES", "3")]).unwrap();
        assert_eq!(c.verify.parallel_queries, 3);
        assert!(c.verify.target_first, "on by default");
        let c = load(&format!("{MIN}verify:\n  target_first: false\n"), &[]).unwrap();
        assert!(!c.verify.target_first);
        assert!(c.verify.read_back, "on by default");
        let c = load(&format!("{MIN}verify:\n  read_back: false\n"), &[]).unwrap();
        assert!(!c.verify.read_back);
        assert!(c.verify.read_back_on_host, "on by default");
        let c = load(&format!("{MIN}verify:\n  read_back_on_host: false\n"), &[]).unwrap();
        assert!(!c.verify.read_back_on_host);
        for bad in ["0", "17"] {
            let e = load(&format!("{MIN}verify:\n  parallel_queries: {bad}\n"), &[])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("verify.parallel_queries")
                    && e.contains(&format!("{bad} is not between 1 and 16")),
                "{e}"
            );
        }
    }

    #[test]
    fn the_idle_sides_nice_value_defaults_to_19_and_refuses_what_nice_cannot_be() {
        assert_eq!(load(MIN, &[]).unwrap().migration.idle_nice, 19);
        let c = load(&format!("{MIN}migration:\n  idle_nice: 0\n"), &[]).unwrap();
        assert_eq!(c.migration.idle_nice, 0);
        let c = load(MIN, &[("STATESHIFT__MIGRATION__IDLE_NICE", "10")]).unwrap();
        assert_eq!(c.migration.idle_nice, 10);
        for bad in ["20", "-5"] {
            let e = load(&format!("{MIN}migration:\n  idle_nice: {bad}\n"), &[])
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("migration.idle_nice")
                    && e.contains(&format!("{bad} is not a nice value")),
                "{e}"
            );
        }
    }

    #[test]
    fn a_poll_interval_cooldown_or_stack_timeout_over_a_week_is_refused_and_named() {
        for (yaml, key) in [
            (
                "monitor:\n  poll_interval: 3000000000000000h\n",
                "monitor.poll_interval",
            ),
            ("monitor:\n  poll_interval: 8d\n", "monitor.poll_interval"),
            (
                "provider:\n  create_timeout: 100000000000000h\n",
                "provider.create_timeout",
            ),
            (
                "provider:\n  delete_timeout: 8d\n",
                "provider.delete_timeout",
            ),
            // Past the clock, a cooldown would silently become none (checked_add).
            ("monitor:\n  cooldown: 8d\n", "monitor.cooldown"),
            (
                "monitor:\n  cooldown: 18446744073709551615s\n",
                "monitor.cooldown",
            ),
        ] {
            let e = load(&format!("{MIN}{yaml}"), &[]).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("a week"), "{yaml}: {e}");
        }
        let c = load(
            &format!("{MIN}monitor:\n  poll_interval: 7d\nprovider:\n  create_timeout: 7d\n"),
            &[],
        )
        .unwrap();
        assert_eq!(c.monitor.poll_interval, MAX_WAIT);
        assert_eq!(c.provider.create_timeout, MAX_WAIT);
    }

    #[test]
    fn what_the_trigger_policy_refuses_at_start_is_refused_at_load() {
        // `config check` passed it; the daemon then refused it at start.
        let e = load(&format!("{MIN}monitor:\n  consecutive: 0\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("monitor.consecutive"), "{e}");
        let c = load(&format!("{MIN}monitor:\n  consecutive: 1\n"), &[]).unwrap();
        assert_eq!(c.monitor.consecutive, 1);
    }

    #[test]
    fn a_url_with_credentials_or_no_host_is_refused_by_key_and_never_repeated() {
        // Each section with its URL at `URL`.
        let heat = format!("{MIN}provider:\n  kind: heat\n  heat:\n    auth_url: URL\n    username: so\n    password: pw\n    project_name: svc\n");
        let zabbix = format!("{MIN}monitor:\n  kind: zabbix\n  zabbix:\n    url: URL\n    username: so\n    password: pw\n    host: h\n");
        let influx = "source:\n  influx_url: URL\n  username: admin\n".to_string();
        for (section, key) in [
            (heat, "provider.heat.auth_url"),
            (zabbix, "monitor.zabbix.url"),
            (influx, "source.influx_url"),
        ] {
            let yaml = |url: &str| section.replace("URL", url);
            for bad in [
                "http://so:Kx9-never-shown@keystone:5000/v3",
                "http://so:Kx9-never-shown/x@keystone:5000/v3",
                "http://:5000",
                "ftp://keystone",
                "keystone:5000",
                "http://keystone:99999",
                "http:keystone:5000/v3",
                "http:/keystone",
            ] {
                let e = load(&yaml(bad), &[]).unwrap_err().to_string();
                assert!(e.contains(key), "{bad}: {e}");
                assert!(!e.contains("Kx9-never-shown"), "no password in {e}");
            }
            // A short host is a host (Heat's check once wanted 10 characters).
            let url = "http://ks";
            load(&yaml(url), &[]).unwrap_or_else(|e| panic!("{key} = {url}: {e}"));
        }
    }

    #[test]
    fn the_write_time_guard_reads_a_duration_and_names_one_out_of_bounds() {
        assert_eq!(
            load(MIN, &[]).unwrap().migration.write_time_guard,
            Duration::ZERO
        );
        for (given, want) in [("5ms", 5), ("0s", 0), ("1s", 1000)] {
            let c = load(
                &format!("{MIN}migration:\n  write_time_guard: {given}\n"),
                &[],
            )
            .unwrap();
            assert_eq!(
                c.migration.write_time_guard,
                Duration::from_millis(want),
                "{given}"
            );
        }
        let c = load(MIN, &[("STATESHIFT__MIGRATION__WRITE_TIME_GUARD", "20ms")]).unwrap();
        assert_eq!(c.migration.write_time_guard, Duration::from_millis(20));
        for (bad, says) in [
            ("500us", "500us is not a mean write time between 1ms and 1m"),
            ("2m", "2m is not a mean write time between 1ms and 1m"),
            ("fast", "migration"),
        ] {
            let e = load(
                &format!("{MIN}migration:\n  write_time_guard: {bad}\n"),
                &[],
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("write_time_guard") && e.contains(says),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn the_transfer_rate_limit_reads_bytes_per_second_and_names_a_bad_one() {
        assert_eq!(load(MIN, &[]).unwrap().migration.transfer_rate_limit, 0);
        for (given, want) in [
            ("80MB/s", 80_000_000),
            ("\"50 MiB/s\"", 50 << 20),
            ("1.5GB", 1_500_000_000),
            ("1000000", 1_000_000),
            ("0", 0),
        ] {
            let c = load(
                &format!("{MIN}migration:\n  transfer_rate_limit: {given}\n"),
                &[],
            )
            .unwrap();
            assert_eq!(c.migration.transfer_rate_limit, want, "{given}");
        }
        let c = load(
            MIN,
            &[("STATESHIFT__MIGRATION__TRANSFER_RATE_LIMIT", "20MB/s")],
        )
        .unwrap();
        assert_eq!(c.migration.transfer_rate_limit, 20_000_000);
        let e = load(
            &format!("{MIN}migration:\n  transfer_rate_limit: fast\n"),
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("migration.transfer_rate_limit") && e.contains("\"fast\" is not a rate"),
            "{e}"
        );
        // 40 meant as MB/s is 40 bytes per second: refused, saying how to write it.
        for tiny in ["40", "500KB/s"] {
            let e = load(
                &format!("{MIN}migration:\n  transfer_rate_limit: {tiny}\n"),
                &[],
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("migration.transfer_rate_limit")
                    && e.contains("below the least accepted, 1MB/s")
                    && e.contains("a plain number counts bytes"),
                "{tiny}: {e}"
            );
        }
    }

    #[test]
    fn the_probe_rate_is_bounded_and_zero_turns_it_off() {
        let c = load(&format!("{MIN}migration:\n  probe_rate: 0\n"), &[]).unwrap();
        assert_eq!(c.migration.probe_rate, 0);
        let e = load(&format!("{MIN}migration:\n  probe_rate: 5000\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("migration.probe_rate") && e.contains("at most 1000"),
            "{e}"
        );
        let e = load(&format!("{MIN}migration:\n  probe_rate: -1\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("probe_rate"), "{e}");
    }
}
