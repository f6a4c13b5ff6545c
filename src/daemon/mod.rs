//! The service orchestrator loop (`stateshift daemon`): poll the load → window →
//! prediction → trigger → journaled migration → dispose → reset → poll the new host; and
//! its HTTP API ([`api`]). First SIGTERM/SIGINT: stop at the next safe point (a running
//! migration finishes first); second: exit at once (the journal lets the next start
//! settle what was interrupted).

pub mod api;
pub mod decide;
pub mod procload;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, MonitorKind, MonitorMode};
use crate::migrate::engine::{Phase, Progress};
use crate::migrate::journal::Placement;
use crate::migrate::machine::{self, Provider};
use crate::monitor::poller::PollerConfig;
use crate::monitor::{MetricSource, Reading, SourceError};
use crate::predict::policy::{PolicyConfig, TriggerPolicy};
pub use decide::Request;

/// What `/status` shows.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    pub service: String,
    /// Where the HTTP API listens.
    pub api: String,
    /// `polling`, `migrating`, or [`RECOVERING`] (settling an interrupted migration).
    pub state: String,
    pub phase: Option<String>,
    pub source_url: String,
    pub load_source: String,
    pub window: Vec<f64>,
    pub last_reading: Option<f64>,
    /// When the load was last read fresh, ms since the Unix epoch.
    pub last_fresh_unix_ms: Option<u64>,
    /// When the daemon started, ms since the Unix epoch.
    pub started_unix_ms: u64,
    /// How often the load is read, in ms (0: it is not: `monitor.kind: none`).
    pub poll_interval_ms: u64,
    pub last_prediction: Option<f64>,
    pub last_decision: String,
    pub threshold: f64,
    /// `act` (a prediction over the threshold migrates) or `observe` (it is only recorded
    /// in `would_migrate`).
    pub mode: String,
    /// The fresh readings with their predictions, oldest first (the last
    /// [`HISTORY_KEPT`]): the status page's chart.
    pub history: Vec<HistoryPoint>,
    /// In observe mode: the migrations the daemon would have started, newest last (the
    /// last [`WOULD_MIGRATE_KEPT`]).
    pub would_migrate: Vec<WouldMigrate>,
    pub migrations: Vec<crate::migrate::journal::MigrationSummary>,
    /// Each migration the daemon probed (`migration.probe_rate`): its id → the
    /// availability summary; the chart is `GET /migrations/<id>/timeline.svg`.
    pub availability: std::collections::BTreeMap<String, String>,
}

/// Where the daemon records every fresh load reading (`stateshift replay` reads it).
pub fn readings_file(cfg: &Config) -> std::path::PathBuf {
    cfg.migration.work_dir.join("readings.csv")
}

/// Where the daemon writes the availability timeline of migration `id`.
pub fn timeline_dir(cfg: &Config, id: &str) -> std::path::PathBuf {
    cfg.migration.work_dir.join("timelines").join(id)
}

/// The availability summaries of the timelines recorded so far (id → summary), read
/// back at start.
fn recorded_timelines(cfg: &Config) -> std::collections::BTreeMap<String, String> {
    let mut out = std::collections::BTreeMap::new();
    let Ok(dirs) = std::fs::read_dir(cfg.migration.work_dir.join("timelines")) else {
        return out;
    };
    for d in dirs.flatten() {
        let (Ok(id), path) = (d.file_name().into_string(), d.path()) else {
            continue;
        };
        if path.join("timeline.svg").is_file() {
            let summary = std::fs::read_to_string(path.join("summary.txt")).unwrap_or_default();
            out.insert(id, summary.trim().to_string());
        }
    }
    out
}

/// How many readings `/status` keeps for the chart (a day at one poll a minute).
pub const HISTORY_KEPT: usize = 1440;

/// One fresh reading and the prediction made with it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HistoryPoint {
    pub at_unix_ms: u64,
    pub load: f64,
    pub prediction: Option<f64>,
}

/// How many would-be migrations `/status` keeps.
pub const WOULD_MIGRATE_KEPT: usize = 100;

/// A migration the daemon would have started, in observe mode.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WouldMigrate {
    /// When, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// What it would have said: `would migrate now: prediction 12.30 > threshold 10 …`.
    pub decision: String,
    pub prediction: Option<f64>,
    pub threshold: f64,
    /// The window the prediction was made from, oldest first.
    pub window: Vec<f64>,
}

/// State shared between the loop and the API.
pub struct Shared {
    pub status: Mutex<Status>,
    pub running: AtomicBool,
    pub metrics: api::Metrics,
    pub trigger: mpsc::Sender<Request>,
    pub token: Option<crate::util::Secret>,
    /// The decision loop runs (set once it has located the service at start, cleared
    /// when it stops): what `/readyz` reports first.
    pub ready: AtomicBool,
    /// The running migration's abort switch (`POST /migrate/abort`); None between
    /// migrations.
    pub abort: Mutex<Option<crate::migrate::abort::Abort>>,
    /// Where the migrations' availability timelines are (`migration.work_dir`/timelines),
    /// served by `GET /migrations/<id>/timeline.svg|csv`; None: none are served.
    pub timelines: Option<std::path::PathBuf>,
}

impl Shared {
    fn set<F: FnOnce(&mut Status)>(&self, f: F) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// [`Shared::set`] that answers what `f` returns.
    fn get<T, F: FnOnce(&mut Status) -> T>(&self, f: F) -> T {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// `/status` `state` while the daemon settles a migration it found interrupted (a CLI's,
/// or its own before a restart): rolls it back or finishes it.
pub const RECOVERING: &str = "recovering";

/// Progress of a migration, shown in `/status` and the metrics.
struct LoopProgress<'a> {
    shared: &'a Shared,
    inner: &'a dyn Progress,
    cfg: &'a Config,
}

impl LoopProgress<'_> {
    /// The history as the journal has it now, the running migration's phases included.
    fn show_journal(&self) {
        if let Ok(st) = machine::state(self.cfg) {
            self.shared.set(|s| s.migrations = st.migrations);
        }
    }
}

impl Progress for LoopProgress<'_> {
    fn phase_started(&self, phase: Phase) {
        self.shared.set(|s| s.phase = Some(phase.to_string()));
        self.show_journal();
        self.inner.phase_started(phase);
    }
    fn phase_done(&self, phase: Phase, took: Duration) {
        self.shared.metrics.phase_seconds(phase, took.as_secs_f64());
        self.show_journal();
        self.inner.phase_done(phase, took);
    }
    fn note(&self, msg: &str) {
        self.inner.note(msg);
    }
    fn journaled(&self) {
        self.show_journal();
        self.inner.journaled();
    }
    fn capture_lost(&self, writes: u64) {
        self.shared.metrics.capture_lost(writes);
        self.inner.capture_lost(writes);
    }
}

/// The load source of the host the service runs on: a local process or a Zabbix item.
enum Load {
    Process(procload::ProcessCpu),
    Zabbix(Box<crate::monitor::zabbix::ZabbixSource>),
    /// The configured source could not be built; every read reports why.
    Broken(String),
}

/// A read of the load source that failed, and whether waiting may help.
#[derive(Debug, thiserror::Error)]
#[error("{msg}")]
pub struct LoadError {
    msg: String,
    transient: bool,
}

impl SourceError for LoadError {
    fn is_transient(&self) -> bool {
        self.transient
    }
}

fn load_error<E: SourceError>(e: E) -> LoadError {
    LoadError {
        transient: e.is_transient(),
        msg: e.to_string(),
    }
}

impl Load {
    /// The source of the host at `p`; `None` when migrations are triggered by hand only.
    fn for_source(cfg: &Config, p: &Placement) -> Option<Load> {
        Some(match cfg.monitor.kind {
            MonitorKind::None => return None,
            MonitorKind::Process => {
                let needle = match &p.stack {
                    Some(s) => format!("/stacks/{}/", s.name),
                    None => p.influx_url.clone(),
                };
                Load::Process(procload::ProcessCpu::new(needle))
            }
            MonitorKind::Zabbix => {
                use crate::monitor::zabbix::{SourceConfig, Zabbix};
                let Some(z) = cfg.monitor.zabbix.as_ref() else {
                    return Some(Load::Broken("monitor.zabbix is missing".into()));
                };
                let host = zabbix_host_of(z, p);
                match Zabbix::from_monitor_config(z) {
                    Ok(client) => {
                        let mut sc = SourceConfig::new(host);
                        sc.key = z.key.clone();
                        sc.poll_interval = cfg.monitor.poll_interval;
                        Load::Zabbix(Box::new(crate::monitor::zabbix::ZabbixSource::new(
                            client, sc,
                        )))
                    }
                    Err(e) => Load::Broken(format!("monitor.zabbix: {e}")),
                }
            }
        })
    }
}

impl MetricSource for Load {
    type Error = LoadError;

    fn describe(&self) -> String {
        match self {
            Load::Process(p) => p.describe(),
            Load::Zabbix(z) => z.describe(),
            Load::Broken(why) => format!("unavailable: {why}"),
        }
    }

    async fn read(&mut self) -> Result<Reading, LoadError> {
        match self {
            Load::Process(p) => p.read().await.map_err(load_error),
            Load::Zabbix(z) => z.read().await.map_err(load_error),
            Load::Broken(why) => Err(LoadError {
                msg: why.clone(),
                transient: false,
            }),
        }
    }
}

/// The Zabbix host of the InfluxDB VM at `p`: the stack's `zabbix_host` output when the
/// template names it (every VM after a migration), else the configured host.
fn zabbix_host_of(z: &crate::config::ZabbixMonitorConfig, p: &Placement) -> String {
    p.outputs
        .as_ref()
        .and_then(|o| o.raw.get("zabbix_host"))
        .and_then(|h| h.as_str())
        .filter(|h| !h.is_empty())
        .map(String::from)
        .unwrap_or_else(|| z.host.clone())
}

/// Retire, in Zabbix, the host of every InfluxDB VM a succeeded migration moved away from
/// and deleted (`monitor.zabbix.retire_old_hosts`), so no stale host is left behind after
/// each migration; each retirement is journaled, so it happens once, and one that failed
/// (Zabbix down) is tried again on the next call. Never the host the service runs on.
/// Returns one line per host retired or failed.
pub async fn retire_monitor_hosts(cfg: &Config) -> Vec<String> {
    use crate::config::RetireHosts;
    use crate::migrate::journal::{Event, Journal, Outcome};
    let Some(z) = cfg.monitor.zabbix.as_ref() else {
        return Vec::new();
    };
    if cfg.monitor.kind != MonitorKind::Zabbix || z.retire_old_hosts == RetireHosts::Keep {
        return Vec::new();
    }
    let Ok(st) = machine::state(cfg) else {
        return Vec::new();
    };
    let current = zabbix_host_of(z, &machine::current_source(cfg, &st));
    let pending: Vec<(String, String)> = st
        .migrations
        .iter()
        .filter(|m| m.outcome == Some(Outcome::Succeeded) && m.old_deleted && !m.monitor_retired)
        .filter_map(|m| Some((m.id.clone(), zabbix_host_of(z, m.source.as_ref()?))))
        .filter(|(_, host)| *host != current)
        .collect();
    if pending.is_empty() {
        return Vec::new();
    }
    let mut client = match crate::monitor::zabbix::Zabbix::from_monitor_config(z) {
        Ok(c) => c,
        Err(e) => return vec![format!("cannot retire old Zabbix hosts: {e}")],
    };
    let mut lines = Vec::new();
    for (id, host) in pending {
        match client.retire_host(&host, z.retire_old_hosts).await {
            Ok(changed) => {
                let paths = machine::Paths::of(cfg);
                let recorded = Journal::open(&paths.journal).and_then(|mut j| {
                    j.append(&id, Event::MonitorHostRetired { host: host.clone() })
                });
                if let Err(e) = recorded {
                    tracing::warn!(error = %e, %host, "could not journal the retired Zabbix host");
                }
                let what = match (changed, z.retire_old_hosts) {
                    (false, _) => "was already gone from",
                    (true, RetireHosts::Disable) => "disabled in",
                    _ => "deleted from",
                };
                tracing::info!(%host, migration = %id, "old InfluxDB VM's host {what} Zabbix");
                lines.push(format!(
                    "Zabbix host {host} (the old InfluxDB VM) {what} Zabbix"
                ));
            }
            Err(e) => {
                tracing::warn!(error = %e, %host, "could not retire the old VM's Zabbix host; will retry");
                lines.push(format!(
                    "could not retire the Zabbix host {host}: {e} (retried later)"
                ));
            }
        }
    }
    lines
}

/// The daemon's world: the journal says where the service runs, [`machine::migrate`] moves it.
struct Orchestrator<'a> {
    cfg: &'a Config,
    provider: &'a Provider,
    progress: &'a dyn Progress,
    shared: Arc<Shared>,
    here: Placement,
    /// The journal's stamp when it last held nothing to settle or retire (or did not
    /// exist yet): while it stays so, a look (every poll) does not parse it again.
    settled_at: Option<JournalStamp>,
}

/// A journal's size and modification time; `None` while there is no journal yet.
type JournalStamp = Option<(u64, std::time::SystemTime)>;

/// The journal's stamp (`None` if it cannot be read).
fn journal_stamp(cfg: &Config) -> Option<JournalStamp> {
    match std::fs::metadata(machine::Paths::of(cfg).journal) {
        Ok(m) => Some(Some((m.len(), m.modified().ok()?))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(None),
        Err(_) => None,
    }
}

impl Orchestrator<'_> {
    fn here_described(&self) -> String {
        match &self.here.stack {
            Some(s) => format!("{} ({})", self.here.influx_url, s.name),
            None => self.here.influx_url.clone(),
        }
    }
}

impl decide::World for Orchestrator<'_> {
    type Source = Load;

    async fn locate(&mut self) -> String {
        let cfg = self.cfg;
        let stamp = journal_stamp(cfg);
        if stamp.is_some() && stamp == self.settled_at {
            return self.here_described();
        }
        self.settled_at = None;
        match machine::state(cfg) {
            Ok(st) => {
                if st.recovery() != crate::migrate::journal::Recovery::Nothing {
                    // Through the loop's progress, as a migration it starts: a resumed
                    // cutover or disposal shows in `/status` while it runs, as state
                    // `recovering`, and a trigger meanwhile is refused (409) rather than
                    // queued behind it. What was shown before comes back after.
                    let was_running = self.shared.running.swap(true, Ordering::SeqCst);
                    let was_state = self
                        .shared
                        .get(|s| std::mem::replace(&mut s.state, RECOVERING.into()));
                    let lp = LoopProgress {
                        shared: &self.shared,
                        inner: self.progress,
                        cfg,
                    };
                    match machine::recover(cfg, self.provider, &lp).await {
                        // Another process (a CLI migration) holds the service: not ours to settle.
                        Ok(_) | Err(machine::MachineError::Busy(_)) => {}
                        Err(e) => {
                            tracing::error!(error = %e, "an interrupted migration could not be settled yet; retrying")
                        }
                    }
                    self.shared.set(|s| {
                        s.phase = None;
                        s.state = was_state;
                    });
                    self.shared.running.store(was_running, Ordering::SeqCst);
                }
                if st
                    .migrations
                    .iter()
                    .any(|m| m.old_deleted && !m.monitor_retired)
                {
                    retire_monitor_hosts(cfg).await;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot read the journal; the service is taken to run where it did")
            }
        }
        // Read again: a recovery just settled may have moved the service.
        let stamp = journal_stamp(cfg);
        if let Ok(st) = machine::state(cfg) {
            self.here = machine::current_source(cfg, &st);
            self.shared.set(|s| s.migrations = st.migrations.clone());
            let pending = st.recovery() != crate::migrate::journal::Recovery::Nothing
                || st
                    .migrations
                    .iter()
                    .any(|m| m.old_deleted && !m.monitor_retired);
            // Unchanged since this read (nothing appended in between): later looks
            // can skip it until it changes.
            if !pending && stamp == journal_stamp(cfg) {
                self.settled_at = stamp;
            }
        }
        self.here_described()
    }

    fn url(&self) -> String {
        self.here.influx_url.clone()
    }

    fn source(&self) -> Option<Load> {
        Load::for_source(self.cfg, &self.here)
    }

    fn describe_source(&self) -> String {
        match Load::for_source(self.cfg, &self.here) {
            Some(l) => l.describe(),
            None => "none (manual trigger only)".into(),
        }
    }

    async fn migrate(&mut self, why: &str) -> bool {
        let lp = LoopProgress {
            shared: &self.shared,
            inner: self.progress,
            cfg: self.cfg,
        };
        // A migration is not interrupted by the first signal: it is the safe point. An
        // operator's `POST /migrate/abort` stops it (before its cutover).
        let abort = crate::migrate::abort::Abort::new();
        *self.shared.abort.lock().unwrap_or_else(|p| p.into_inner()) = Some(abort.clone());
        let r = self.migrate_probed(why, &lp, &abort).await;
        *self.shared.abort.lock().unwrap_or_else(|p| p.into_inner()) = None;
        match r {
            Ok(rep) => {
                self.shared
                    .metrics
                    .migration("succeeded", rep.points_replayed);
                tracing::warn!(id = %rep.migration_id, "migration succeeded");
                true
            }
            Err(e @ machine::MachineError::Settled { outcome, .. }) => {
                // An interrupted migration was settled instead: the request is not acted
                // on; the service moved only if that migration finished.
                self.shared.metrics.migration("settled", 0);
                tracing::warn!(error = %e, "an interrupted migration was settled; no new migration was started");
                outcome == crate::migrate::journal::Outcome::Succeeded
            }
            Err(e) => {
                let outcome = match &e {
                    machine::MachineError::Busy(_) => "busy",
                    e if e.aborted_by().is_some() => "aborted",
                    _ => "failed",
                };
                self.shared.metrics.migration(outcome, 0);
                tracing::error!(error = %e, "migration failed");
                false
            }
        }
    }
}

impl Orchestrator<'_> {
    /// The migration, under the service's lock, with the availability probe around it
    /// (`migration.probe_rate`): started before anything changes (2 s of baseline), it
    /// follows the journal to wherever the writers point, and 3 s after the end its
    /// timeline is written to [`timeline_dir`] (in the background: the loop goes on).
    /// No probe when the journal holds anything to settle or waits for an operator (the
    /// run then only settles or refuses), nor when it cannot start (said in the log).
    async fn migrate_probed(
        &self,
        why: &str,
        lp: &LoopProgress<'_>,
        abort: &crate::migrate::abort::Abort,
    ) -> Result<crate::migrate::engine::Report, machine::MachineError> {
        use crate::migrate::journal::Recovery;
        use crate::timeline::probe::{self, JournalFollow, ProbeSpec, RunningProbe};
        let held = machine::lock(&machine::Paths::of(self.cfg).lock)?;
        let before = machine::state(self.cfg)?;
        let last_before = before.migrations.last().map(|m| m.id.clone());
        let clean = before.recovery() == Recovery::Nothing && before.needs_operator().is_none();
        let mut running = None;
        if self.cfg.migration.probe_rate > 0 && clean {
            let spec = ProbeSpec {
                rate: self.cfg.migration.probe_rate,
                // Never past the longest a migration may take.
                max_duration: Duration::from_secs(24 * 3600),
                ..ProbeSpec::default()
            };
            let started = match JournalFollow::new(self.cfg) {
                Ok(f) => RunningProbe::start(spec, f).await,
                Err(e) => Err(e),
            };
            match started {
                Ok(p) => {
                    lp.note("availability probe started (migration.probe_rate); 2 s of baseline before the migration");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    running = Some(p);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "the availability probe did not start; migrating without a timeline")
                }
            }
        }
        let r = machine::migrate_holding(&held, self.cfg, self.provider, why, lp, abort).await;
        drop(held);
        let after = machine::state(self.cfg).ok();
        let id = after
            .and_then(|st| st.migrations.last().map(|m| m.id.clone()))
            .filter(|id| Some(id) != last_before.as_ref());
        if let (Some(p), Some(id)) = (running, id) {
            let (cfg, shared) = (self.cfg.clone(), self.shared.clone());
            tokio::spawn(async move {
                // A few seconds on the service's home after the migration, to show it settled.
                tokio::time::sleep(Duration::from_secs(3)).await;
                let dir = timeline_dir(&cfg, &id);
                let title = format!(
                    "stateshift: availability of service {} during migration {id} ({} writes+reads/s)",
                    cfg.service.name, p.rate
                );
                match probe::finish_into(p, &cfg, &dir, &title).await {
                    Ok((_, svg, summary)) => {
                        let summary = summary.to_string();
                        if let Err(e) = std::fs::write(dir.join("summary.txt"), &summary) {
                            tracing::warn!(error = %e, "cannot write the timeline's summary");
                        }
                        tracing::info!(id, svg = %svg.display(), %summary, "availability timeline written");
                        shared.set(|s| {
                            s.availability.insert(id, summary);
                        });
                    }
                    Err(e) => {
                        tracing::warn!(id, error = %e, "the availability timeline was not written")
                    }
                }
            });
        }
        r
    }
}

/// Run the daemon until `shutdown` is cancelled. `progress` receives migration progress
/// (the CLI logs it; the demo prints it). Returns after the loop has stopped at a safe point.
pub async fn run(
    cfg: Config,
    shutdown: CancellationToken,
    progress: &dyn Progress,
    ready: Option<tokio::sync::oneshot::Sender<Arc<Shared>>>,
) -> anyhow::Result<()> {
    if cfg.api.plain_http_beyond_loopback() && !cfg.api.insecure_plain_http {
        anyhow::bail!("api.listen: {} is reachable from other machines and no TLS is configured; set api.tls_cert_file and api.tls_key_file, or api.insecure_plain_http: true", cfg.api.listen);
    }
    let provider = Provider::from_config(&cfg)?;
    // Settle whatever a crash left unfinished before anything else. A settle that fails
    // does not stop the daemon: one that failed past the cutover is journaled as waiting
    // for an operator, which the API must then say (`/healthz`, the page); any other is
    // retried by the loop. (Found by the daemon crash campaign: a daemon killed while
    // repointing exited at its restart instead of saying what to do.)
    match machine::recover(&cfg, &provider, progress).await {
        Ok(Some(outcome)) => {
            tracing::warn!(?outcome, "an interrupted migration was settled at start-up")
        }
        Ok(None) => {}
        Err(e) => tracing::error!(
            error = %e,
            "an interrupted migration could not be settled at start-up; it is retried, unless it waits for an operator"
        ),
    }
    let model = cfg.monitor.model;
    let policy = TriggerPolicy::new(PolicyConfig {
        threshold: cfg.monitor.threshold,
        min_readings: cfg.monitor.min_readings,
        window: cfg.monitor.window,
        cooldown: cfg.monitor.cooldown,
        consecutive: cfg.monitor.consecutive as usize,
        model,
    })
    .map_err(|e| anyhow::anyhow!("monitor: {e}"))?;
    let (tx, rx) = mpsc::channel::<Request>(4);
    let st = machine::state(&cfg)?;
    let source = machine::current_source(&cfg, &st);
    let shared = Arc::new(Shared {
        status: Mutex::new(Status {
            service: cfg.service.name.clone(),
            state: "polling".into(),
            source_url: source.influx_url.clone(),
            threshold: cfg.monitor.threshold,
            started_unix_ms: crate::util::now_ms(),
            poll_interval_ms: match cfg.monitor.kind {
                MonitorKind::None => 0,
                _ => cfg.monitor.poll_interval.as_millis() as u64,
            },
            mode: match cfg.monitor.mode {
                MonitorMode::Act => "act".into(),
                MonitorMode::Observe => "observe".into(),
            },
            migrations: st.migrations.clone(),
            availability: recorded_timelines(&cfg),
            ..Status::default()
        }),
        running: AtomicBool::new(false),
        metrics: api::Metrics::new(),
        trigger: tx,
        token: cfg.api.token.clone(),
        ready: AtomicBool::new(false),
        abort: Mutex::new(None),
        timelines: Some(cfg.migration.work_dir.join("timelines")),
    });
    let api_token = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind(cfg.api.listen)
        .await
        .map_err(|e| anyhow::anyhow!("api.listen {}: {e}", cfg.api.listen))?;
    let api_addr = listener.local_addr()?;
    shared.set(|s| s.api = api_addr.to_string());
    let api_task = match &cfg.api.tls {
        Some(t) => {
            tracing::info!(addr = %api_addr, cert = %t.cert_file.display(), "HTTPS API listening");
            let listener = crate::tls::TlsListener::new(
                listener,
                t.server.clone(),
                crate::tls::HANDSHAKE_TIMEOUT,
            )?;
            tokio::spawn(api::serve(listener, shared.clone(), api_token.clone()))
        }
        None => {
            if cfg.api.plain_http_beyond_loopback() {
                tracing::warn!(addr = %api_addr, "HTTP API listening without TLS beyond loopback (api.insecure_plain_http): the bearer token and /status cross the network in clear");
            } else {
                tracing::info!(addr = %api_addr, "HTTP API listening");
            }
            tokio::spawn(api::serve(listener, shared.clone(), api_token.clone()))
        }
    };
    if let Some(r) = ready {
        let _ = r.send(shared.clone());
    }
    let poll = PollerConfig {
        poll_interval: cfg.monitor.poll_interval,
        backoff_max: cfg.monitor.poll_interval.max(Duration::from_secs(60)),
    };
    let world = Orchestrator {
        cfg: &cfg,
        provider: &provider,
        progress,
        shared: shared.clone(),
        here: source,
        settled_at: None,
    };
    decide::Decider::new(world, policy, poll, shared.clone())
        .observe_only(cfg.monitor.mode == MonitorMode::Observe)
        .record_readings(Some(readings_file(&cfg)))
        .run(rx, shutdown)
        .await;
    api_token.cancel();
    let _ = api_task.await;
    Ok(())
}
