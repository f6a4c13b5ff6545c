//! The service orchestrator loop (`stateshift daemon`): poll the load → window →
//! prediction → trigger → journaled migration → dispose → reset → poll the new host; and
//! its HTTP API ([`api`]). First SIGTERM/SIGINT: stop at the next safe point (a running
//! migration finishes first); second: exit at once (the journal lets the next start
//! settle what was interrupted).

pub mod api;
pub mod procload;
pub mod tls;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, MonitorKind};
use crate::migrate::engine::{Phase, Progress};
use crate::migrate::journal::Placement;
use crate::migrate::machine::{self, Provider};
use crate::monitor::{MetricSource, Reading};
use crate::predict::policy::{PolicyConfig, TriggerPolicy};

/// What `/status` shows.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    pub service: String,
    /// Where the HTTP API listens.
    pub api: String,
    /// `polling` or `migrating`.
    pub state: String,
    pub phase: Option<String>,
    pub source_url: String,
    pub load_source: String,
    pub window: Vec<f64>,
    pub last_reading: Option<f64>,
    pub last_prediction: Option<f64>,
    pub last_decision: String,
    pub threshold: f64,
    pub migrations: Vec<crate::migrate::journal::MigrationSummary>,
}

/// State shared between the loop and the API.
pub struct Shared {
    pub status: Mutex<Status>,
    pub running: AtomicBool,
    pub metrics: api::Metrics,
    pub trigger: mpsc::Sender<String>,
    pub token: Option<crate::util::Secret>,
}

impl Shared {
    fn set<F: FnOnce(&mut Status)>(&self, f: F) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

/// Progress of a migration, shown in `/status` and the metrics.
struct LoopProgress<'a> {
    shared: &'a Shared,
    inner: &'a dyn Progress,
}

impl Progress for LoopProgress<'_> {
    fn phase_started(&self, phase: Phase) {
        self.shared.set(|s| s.phase = Some(phase.to_string()));
        self.inner.phase_started(phase);
    }
    fn phase_done(&self, phase: Phase, took: Duration) {
        self.shared.metrics.phase_seconds(phase, took.as_secs_f64());
        self.inner.phase_done(phase, took);
    }
    fn note(&self, msg: &str) {
        self.inner.note(msg);
    }
    fn writers_repointing(&self) -> Result<(), String> {
        self.inner.writers_repointing()
    }
}

/// The load source: none (manual only) or a local process.
enum Load {
    None,
    Process(procload::ProcessCpu),
    Zabbix(Box<crate::monitor::zabbix::ZabbixSource>),
    /// The configured source could not be built; every read reports why.
    Broken(String),
}

impl Load {
    fn for_source(cfg: &Config, p: &Placement) -> Load {
        match cfg.monitor.kind {
            MonitorKind::None => Load::None,
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
                    return Load::Broken("monitor.zabbix is missing".into());
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
        }
    }
    fn describe(&self) -> String {
        match self {
            Load::None => "none (manual trigger only)".into(),
            Load::Process(p) => p.describe(),
            Load::Zabbix(z) => z.describe(),
            Load::Broken(why) => format!("unavailable: {why}"),
        }
    }
    async fn read(&mut self) -> Option<Result<Reading, String>> {
        match self {
            Load::None => None,
            Load::Process(p) => Some(p.read().await.map_err(|e| e.to_string())),
            Load::Zabbix(z) => Some(z.read().await.map_err(|e| e.to_string())),
            Load::Broken(why) => Some(Err(why.clone())),
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
    // Settle whatever a crash left unfinished before anything else.
    if let Some(outcome) = machine::recover(&cfg, &provider, progress).await? {
        tracing::warn!(?outcome, "an interrupted migration was settled at start-up");
    }
    let model = cfg
        .monitor
        .model
        .parse()
        .map_err(|e| anyhow::anyhow!("monitor.model: {e}"))?;
    let mut policy = TriggerPolicy::new(PolicyConfig {
        threshold: cfg.monitor.threshold,
        min_readings: cfg.monitor.min_readings,
        window: cfg.monitor.window,
        cooldown: cfg.monitor.cooldown,
        consecutive: cfg.monitor.consecutive as usize,
        model,
    })
    .map_err(|e| anyhow::anyhow!("monitor: {e}"))?;
    let (tx, mut rx) = mpsc::channel::<String>(4);
    let st = machine::state(&cfg)?;
    let mut source = machine::current_source(&cfg, &st);
    let mut load = Load::for_source(&cfg, &source);
    let shared = Arc::new(Shared {
        status: Mutex::new(Status {
            service: cfg.service.name.clone(),
            state: "polling".into(),
            source_url: source.influx_url.clone(),
            load_source: load.describe(),
            threshold: cfg.monitor.threshold,
            migrations: st.migrations.clone(),
            ..Status::default()
        }),
        running: AtomicBool::new(false),
        metrics: api::Metrics::new(),
        trigger: tx,
        token: cfg.api.token.clone(),
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
            let listener =
                tls::TlsListener::new(listener, t.server.clone(), tls::HANDSHAKE_TIMEOUT)?;
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
    let mut tick = tokio::time::interval(cfg.monitor.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = Duration::ZERO;
    loop {
        // The journal is the truth about where the service runs: a migration by the CLI
        // or a settled recovery moves the polling too; an unsettled one is retried.
        if let Ok(st) = machine::state(&cfg) {
            if st.recovery() != crate::migrate::journal::Recovery::Nothing {
                match machine::recover(&cfg, &provider, progress).await {
                    // Another process (a CLI migration) holds the service: not ours to settle.
                    Ok(_) | Err(machine::MachineError::Busy(_)) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "an interrupted migration could not be settled yet; retrying")
                    }
                }
            }
            if st
                .migrations
                .iter()
                .any(|m| m.old_deleted && !m.monitor_retired)
            {
                retire_monitor_hosts(&cfg).await;
            }
            let now = machine::current_source(&cfg, &st);
            if now.influx_url != source.influx_url {
                tracing::warn!(from = %source.influx_url, to = %now.influx_url, "the service moved; polling the new host");
                source = now;
                load = Load::for_source(&cfg, &source);
                shared.set(|s| {
                    s.source_url = source.influx_url.clone();
                    s.load_source = load.describe();
                    s.migrations = st.migrations.clone();
                });
            }
        }
        let trigger = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            Some(t) = rx.recv() => Some(t),
            _ = tick.tick() => {
                if !backoff.is_zero() {
                    tokio::time::sleep(backoff).await;
                }
                match load.read().await {
                    None => None,
                    Some(Err(e)) => {
                        backoff = (backoff * 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
                        shared.metrics.reading("error");
                        tracing::warn!(error = %e, backoff = ?backoff, "cannot read the load; backing off");
                        None
                    }
                    Some(Ok(r)) => {
                        backoff = Duration::ZERO;
                        shared.metrics.reading(r.freshness().as_str());
                        match r {
                            Reading::Fresh(s) => match policy.on_reading(s.value, Instant::now()) {
                                Ok(d) => {
                                    tracing::info!(window = ?d.window, prediction = ?d.prediction, threshold = d.threshold, reason = %d.reason, "decision");
                                    shared.metrics.observe(s.value, d.prediction);
                                    shared.set(|st| {
                                        st.window = d.window.clone();
                                        st.last_reading = Some(s.value);
                                        st.last_prediction = d.prediction;
                                        st.last_decision = d.reason.to_string();
                                    });
                                    d.trigger().then(|| format!("prediction {:.2} > threshold {}", d.prediction.unwrap_or(f64::NAN), d.threshold))
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "reading refused by the window");
                                    None
                                }
                            },
                            other => {
                                tracing::info!(reading = %other, "not a fresh reading; not pushed into the window");
                                None
                            }
                        }
                    }
                }
            }
        };
        let Some(why) = trigger else { continue };
        if shutdown.is_cancelled() {
            // Stopping: no new migration starts after the first signal.
            shared.running.store(false, Ordering::SeqCst);
            break;
        }
        shared.metrics.trigger();
        tracing::warn!(trigger = %why, "migrating");
        shared.running.store(true, Ordering::SeqCst);
        shared.set(|s| s.state = "migrating".into());
        policy.migration_started(Instant::now());
        let lp = LoopProgress {
            shared: &shared,
            inner: progress,
        };
        // A migration is not interrupted by the first signal: it is the safe point.
        let r = machine::migrate(&cfg, &provider, &why, &lp).await;
        let ok = r.is_ok();
        match &r {
            Ok(rep) => {
                shared.metrics.migration("succeeded", rep.points_replayed);
                tracing::warn!(id = %rep.migration_id, "migration succeeded");
            }
            Err(e) => {
                shared.metrics.migration(
                    if matches!(e, machine::MachineError::Busy(_)) {
                        "busy"
                    } else {
                        "failed"
                    },
                    0,
                );
                tracing::error!(error = %e, "migration failed");
            }
        }
        policy.migration_finished(Instant::now(), ok);
        let st = machine::state(&cfg)?;
        source = machine::current_source(&cfg, &st);
        load = Load::for_source(&cfg, &source);
        shared.set(|s| {
            s.state = "polling".into();
            s.phase = None;
            s.source_url = source.influx_url.clone();
            s.load_source = load.describe();
            s.migrations = st.migrations.clone();
            if ok {
                s.window.clear();
            }
        });
        shared.running.store(false, Ordering::SeqCst);
    }
    api_token.cancel();
    let _ = api_task.await;
    Ok(())
}
