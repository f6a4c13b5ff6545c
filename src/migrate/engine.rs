//! The data migration from a source InfluxDB host to a target host, phase by phase:
//! prepare → capture → dump → transfer → restore → delta → cutover → verify → dispose.
//!
//! Safety rules enforced here:
//! - nothing on the source is ever deleted (only our own subscription is dropped);
//! - any failure before cutover rolls back: our subscriptions are dropped, every database
//!   and user this migration created on the target is removed, scratch files are deleted;
//! - after cutover, a failure leaves both sides as they are and says where writers point;
//! - success is reported only after verification passed.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::capture::{KeySet, Receiver, ReceiverAuth, Sink};
use super::spool::{Record, SpoolError, SpoolReader, SpoolWriter};
use super::verify::{self, VerifyReport};
use crate::config::{Config, InstanceConfig, TransferMode};
use crate::influx::{ident, lineproto, literal, Influx, InfluxError};
use crate::remote::{Host, Pipes, Remote, RemoteError};
use crate::util::{shell_quote, Secret};

/// Phases in order (DESIGN.md §3; stack creation, disposal of the old stack and the
/// window reset belong to the orchestrator around this engine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Prepare,
    Capture,
    Dump,
    Transfer,
    Restore,
    Delta,
    Cutover,
    Verify,
    Dispose,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default();
        f.write_str(&s)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("{phase}: {source}")]
    Influx {
        phase: Phase,
        #[source]
        source: InfluxError,
    },
    #[error("{phase}: {source}")]
    Remote {
        phase: Phase,
        #[source]
        source: RemoteError,
    },
    #[error("{phase}: {source}")]
    Spool {
        phase: Phase,
        #[source]
        source: SpoolError,
    },
    #[error("prepare: target {target} already has database {db:?}; InfluxDB cannot restore into an existing database and stateshift never merges silently: drop it on the target or pick an empty target")]
    TargetNotEmpty { target: String, db: String },
    #[error("prepare: source user {user:?} has no password in migration.user_passwords_file; InfluxDB never exports password hashes, so the user cannot be recreated on the target without it")]
    MissingPassword { user: String },
    #[error("prepare: the target InfluxDB {url} did not answer within {timeout:?} (migration.target_ready_timeout); last error: {last}")]
    TargetNotReady {
        url: String,
        timeout: Duration,
        last: String,
    },
    #[error("{phase}: {msg}")]
    Failed { phase: Phase, msg: String },
    #[error("verify: the target is missing data; nothing was deleted, the source keeps everything. {summary}")]
    VerifyFailed {
        summary: String,
        report: Box<VerifyReport>,
    },
}

impl MigrateError {
    pub fn phase(&self) -> Phase {
        match self {
            MigrateError::Influx { phase, .. }
            | MigrateError::Remote { phase, .. }
            | MigrateError::Spool { phase, .. }
            | MigrateError::Failed { phase, .. } => *phase,
            MigrateError::TargetNotEmpty { .. }
            | MigrateError::MissingPassword { .. }
            | MigrateError::TargetNotReady { .. } => Phase::Prepare,
            MigrateError::VerifyFailed { .. } => Phase::Verify,
        }
    }
}

/// Timing of one phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseTiming {
    pub phase: Phase,
    pub seconds: f64,
}

/// What a migration did; written as JSON by `--report`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Report {
    pub migration_id: String,
    pub source: String,
    pub target: String,
    pub phases: Vec<PhaseTiming>,
    pub total_seconds: f64,
    pub databases: Vec<String>,
    pub dump_bytes: u64,
    pub points_captured: u64,
    pub points_replayed: u64,
    pub replay_points_per_second: f64,
    pub replay_seconds: f64,
    pub cutover_done: bool,
    pub verify: Option<VerifyReport>,
    /// Points the source had acknowledged over HTTP just before the capture stopped at
    /// disposal (`httpd` `pointsWrittenOK` in `/debug/vars`). A higher count just before the
    /// old stack is deleted means a write reached it that nothing forwarded.
    #[serde(default)]
    pub source_writes_at_capture_stop: Option<u64>,
}

impl Report {
    pub fn phase_seconds(&self, p: Phase) -> f64 {
        self.phases
            .iter()
            .filter(|t| t.phase == p)
            .map(|t| t.seconds)
            .sum()
    }
}

/// Progress callbacks (the CLI prints them; tests ignore them).
pub trait Progress: Send + Sync {
    fn phase_started(&self, _phase: Phase) {}
    fn phase_done(&self, _phase: Phase, _took: Duration) {}
    fn note(&self, _msg: &str) {}
    /// The writers are about to be repointed to the target: from here on a failure or a
    /// crash must not roll the target back.
    /// Returns an error when the repoint cannot be recorded: the cutover must not run
    /// unrecorded (a crash would then look like "never repointed" and roll back a target
    /// that writers use).
    fn writers_repointing(&self) -> Result<(), String> {
        Ok(())
    }
    /// The cutover command succeeded.
    fn writers_repointed(&self) {}
}

/// Progress that only logs.
pub struct LogProgress;
impl Progress for LogProgress {
    fn phase_started(&self, phase: Phase) {
        tracing::info!(%phase, "phase started");
    }
    fn phase_done(&self, phase: Phase, took: Duration) {
        tracing::info!(%phase, seconds = took.as_secs_f64(), "phase done");
    }
    fn note(&self, msg: &str) {
        tracing::info!("{msg}");
    }
}

struct Side {
    cfg: InstanceConfig,
    influx: Influx,
    host: Host,
}

/// Forwarding counters of the source (see [`Migration::subscriber_stats`]).
#[derive(Debug, Default, Clone)]
pub struct SubStats {
    /// Points the subscriptions delivered.
    pub written: u64,
    /// Deliveries the subscriptions failed.
    pub failed: u64,
    /// Server-wide forwarding drops (cumulative since the server started).
    pub dropped: u64,
    /// When the server process started (`system.started`): every counter above restarts
    /// from zero with it, and its in-memory forwarding queue is lost.
    pub started: Option<String>,
}

/// Everything this migration created, so a rollback removes exactly that.
#[derive(Default)]
struct Created {
    source_subscriptions: Vec<(String, String)>,
    target_subscriptions: Vec<(String, String)>,
    target_databases: Vec<String>,
    target_users: Vec<String>,
    source_dirs: Vec<String>,
    target_dirs: Vec<String>,
}

/// Check every dependency of a migration without changing anything: both InfluxDB
/// servers (reachable, credentials), SSH to both hosts and `influxd` there, the target
/// free of the source's databases, passwords for every user, the cutover host.
pub async fn preflight(cfg: &Config, target: &InstanceConfig) -> Result<Vec<String>, MigrateError> {
    let mut m = Migration::new(cfg, target);
    m.prepare().await?;
    let mut lines = vec![
        format!(
            "source InfluxDB {} answers; databases: {}",
            cfg.source.influx_url,
            m.report.databases.join(", ")
        ),
        format!(
            "target InfluxDB {} answers and holds none of them",
            target.influx_url
        ),
        format!(
            "commands run on source host {} and target host {}; influxd present on both",
            m.src().host.describe(),
            m.dst().host.describe()
        ),
        "every source user can be recreated on the target".to_string(),
    ];
    if cfg.cutover.command.is_some() {
        let h = Host::connect(cfg.cutover.ssh.as_ref())
            .await
            .map_err(Migration::remote_err(Phase::Prepare))?;
        h.run("true")
            .await
            .map_err(Migration::remote_err(Phase::Prepare))?;
        lines.push(format!("cutover host {} runs commands", h.describe()));
    }
    Ok(lines)
}

/// Run a whole data migration from `cfg.source` to `target`.
pub async fn run(
    cfg: &Config,
    target: &InstanceConfig,
    progress: &dyn Progress,
) -> Result<Report, MigrateError> {
    run_with(cfg, target, progress, RunOptions::default())
        .await
        .map_err(|(e, _)| e)
}

/// How [`run_with`] runs.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Migration id (also names the capture subscription); default: the current time.
    pub id: Option<String>,
    /// Resume an interrupted migration whose data is already on the target: capture
    /// again, repoint the writers again, drain, verify. No dump or restore.
    pub resume: bool,
    /// With `resume`: the interrupted run's spool, replayed in full before anything new.
    pub replay_first: Option<std::path::PathBuf>,
    /// With `resume`: the interrupted run's capture subscription and the points its spool
    /// holds. Once the new capture is live, every write the old subscription failed to
    /// forward in between reached the source but no spool: then the run stops, safely.
    pub interrupted: Option<(String, u64)>,
    /// The target was just created (a stack provider's new VM): `prepare` waits up to
    /// `migration.target_ready_timeout` for its InfluxDB to answer. Otherwise (a static
    /// target that should be up) one try, and an error at once.
    pub new_target: bool,
}

/// Run a migration; on failure also return the report so far (its `cutover_done` says
/// whether writers may already use the target, which decides between rollback and
/// leaving everything in place).
pub async fn run_with(
    cfg: &Config,
    target: &InstanceConfig,
    progress: &dyn Progress,
    opts: RunOptions,
) -> Result<Report, (MigrateError, Box<Report>)> {
    let mut m = Migration::new(cfg, target);
    m.progress = progress;
    m.resume = opts.resume;
    // A resumed run starts past the repoint: its own failure must never roll back.
    m.report.cutover_done = opts.resume;
    m.replay_first = opts.replay_first;
    m.interrupted = opts.interrupted;
    m.ready_wait = if opts.new_target {
        cfg.migration.target_ready_timeout
    } else {
        Duration::ZERO
    };
    if let Some(id) = opts.id {
        m.id = id.clone();
        m.report.migration_id = id;
    }
    let start = Instant::now();
    let r = m.run_phases().await;
    m.report.total_seconds = start.elapsed().as_secs_f64();
    match r {
        Ok(()) => Ok(m.report),
        Err(e) => {
            m.on_failure(&e).await;
            Err((e, Box::new(m.report)))
        }
    }
}

impl<'a> Migration<'a> {
    fn new(cfg: &'a Config, target: &InstanceConfig) -> Migration<'a> {
        let id = format!(
            "{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0)
        );
        Migration {
            id: id.clone(),
            cfg,
            progress: &LogProgress,
            report: Report {
                migration_id: id,
                source: cfg.source.influx_url.clone(),
                target: target.influx_url.clone(),
                ..Report::default()
            },
            created: Created::default(),
            source: None,
            target_cfg: target.clone(),
            target: None,
            receiver: None,
            spool: None,
            touched: None,
            touched_receiver: None,
            drops_at_start: 0,
            source_started: None,
            reader: None,
            pulled: false,
            resume: false,
            replay_first: None,
            interrupted: None,
            ready_wait: Duration::ZERO,
            watch_listener: None,
        }
    }
}

struct Migration<'a> {
    id: String,
    cfg: &'a Config,
    progress: &'a dyn Progress,
    report: Report,
    created: Created,
    source: Option<Side>,
    target_cfg: InstanceConfig,
    target: Option<Side>,
    receiver: Option<Receiver>,
    spool: Option<Arc<SpoolWriter>>,
    touched: Option<Arc<Mutex<KeySet>>>,
    touched_receiver: Option<Receiver>,
    /// Server-wide forwarding drops on the source when the capture started.
    drops_at_start: u64,
    /// The source process's start time when the capture started.
    source_started: Option<String>,
    /// The replay's position in the spool, kept for the tail after verify.
    reader: Option<SpoolReader>,
    /// The target pulled the dump itself: nothing to transfer.
    pulled: bool,
    /// Resuming after a crash past cutover: the data is already on the target.
    resume: bool,
    replay_first: Option<std::path::PathBuf>,
    interrupted: Option<(String, u64)>,
    /// How long `prepare` waits for the target's InfluxDB to answer.
    ready_wait: Duration,
    /// The watch receiver's port, reserved at the capture.
    watch_listener: Option<tokio::net::TcpListener>,
}

fn sub_name(id: &str) -> String {
    format!("stateshift_{id}")
}

impl Migration<'_> {
    fn src(&self) -> &Side {
        self.source.as_ref().expect("source connected in prepare")
    }
    fn dst(&self) -> &Side {
        self.target.as_ref().expect("target connected in prepare")
    }

    async fn run_phases(&mut self) -> Result<(), MigrateError> {
        let t = Instant::now();
        self.progress.phase_started(Phase::Prepare);
        let r = self.prepare().await;
        self.report.phases.push(PhaseTiming {
            phase: Phase::Prepare,
            seconds: t.elapsed().as_secs_f64(),
        });
        r?;
        self.progress.phase_done(Phase::Prepare, t.elapsed());

        macro_rules! phase {
            ($p:expr, $f:ident) => {{
                let t = Instant::now();
                self.progress.phase_started($p);
                crate::util::fault_hold(&$p.to_string()).await;
                let r = self.$f().await;
                self.report.phases.push(PhaseTiming {
                    phase: $p,
                    seconds: t.elapsed().as_secs_f64(),
                });
                let v = r?;
                self.progress.phase_done($p, t.elapsed());
                v
            }};
        }
        phase!(Phase::Capture, capture);
        if self.interrupted.is_some() {
            phase!(Phase::Capture, check_interrupted);
        }
        if !self.resume {
            phase!(Phase::Dump, dump);
            phase!(Phase::Transfer, transfer);
            phase!(Phase::Restore, restore);
        }
        phase!(Phase::Delta, delta);
        self.report.cutover_done = false;
        let t = Instant::now();
        self.progress.phase_started(Phase::Cutover);
        let r = self.cutover().await;
        self.report.phases.push(PhaseTiming {
            phase: Phase::Cutover,
            seconds: t.elapsed().as_secs_f64(),
        });
        r?;
        self.progress.phase_done(Phase::Cutover, t.elapsed());
        phase!(Phase::Verify, verify);
        phase!(Phase::Dispose, dispose);
        Ok(())
    }

    fn influx_err(phase: Phase) -> impl Fn(InfluxError) -> MigrateError {
        move |source| MigrateError::Influx { phase, source }
    }
    fn remote_err(phase: Phase) -> impl Fn(RemoteError) -> MigrateError {
        move |source| MigrateError::Remote { phase, source }
    }

    // ------------------------------------------------------------------ prepare

    async fn prepare(&mut self) -> Result<(), MigrateError> {
        let p = Phase::Prepare;
        let src_cfg = self.cfg.source.clone();
        let dst_cfg = self.target_cfg.clone();
        let src_influx = Influx::from_config(&src_cfg);
        let dst_influx = Influx::from_config(&dst_cfg);
        let (a, b) = tokio::join!(src_influx.ping(), wait_ready(&dst_influx, self.ready_wait));
        a.map_err(Self::influx_err(p))?;
        b?;
        // Authentication is checked by a real query on both sides.
        let dbs = src_influx.databases().await.map_err(Self::influx_err(p))?;
        let dst_dbs = dst_influx.databases().await.map_err(Self::influx_err(p))?;
        for db in dbs.iter().filter(|_| !self.resume) {
            if dst_dbs.contains(db) {
                return Err(MigrateError::TargetNotEmpty {
                    target: dst_cfg.name.clone(),
                    db: db.clone(),
                });
            }
        }
        let users = src_influx.users().await.map_err(Self::influx_err(p))?;
        let dst_users: BTreeSet<String> = dst_influx
            .users()
            .await
            .map_err(Self::influx_err(p))?
            .into_iter()
            .map(|u| u.name)
            .collect();
        for u in &users {
            let known = self.cfg.migration.user_passwords.contains_key(&u.name)
                || (src_cfg.username.as_deref() == Some(&u.name) && src_cfg.password.is_some());
            if !dst_users.contains(&u.name) && !known {
                return Err(MigrateError::MissingPassword {
                    user: u.name.clone(),
                });
            }
        }
        let (sh, th) = tokio::join!(
            Host::connect(src_cfg.ssh.as_ref()),
            Host::connect(dst_cfg.ssh.as_ref())
        );
        let sh = sh.map_err(Self::remote_err(p))?;
        let th = th.map_err(Self::remote_err(p))?;
        for (h, name) in [(&sh, &src_cfg.name), (&th, &dst_cfg.name)] {
            h.run("influxd version")
                .await
                .map_err(|e| MigrateError::Failed {
                    phase: p,
                    msg: format!("{name}: influxd is not runnable on the host ({e})"),
                })?;
        }
        if !self.resume {
            Self::check_target_space(&src_influx, &th, &dst_cfg).await?;
        }
        if let Some(c) = &self.cfg.cutover.command {
            if c.trim().is_empty() {
                return Err(MigrateError::Failed {
                    phase: p,
                    msg: "cutover.command is empty".into(),
                });
            }
        }
        self.report.databases = dbs;
        self.source = Some(Side {
            cfg: src_cfg,
            influx: src_influx,
            host: sh,
        });
        self.target = Some(Side {
            cfg: dst_cfg,
            influx: dst_influx,
            host: th,
        });
        Ok(())
    }

    /// Refuse, before anything is made, a target whose scratch disk cannot hold the dump
    /// and the restored data (both about the size of the source's shards on disk).
    /// `influxd backup` hitting a full disk retries every shard for minutes before failing.
    async fn check_target_space(
        src: &Influx,
        target: &Host,
        cfg: &InstanceConfig,
    ) -> Result<(), MigrateError> {
        let p = Phase::Prepare;
        let vars = src.debug_vars().await.map_err(Self::influx_err(p))?;
        let sizes: Vec<u64> = vars
            .as_object()
            .map(|o| {
                o.iter()
                    .filter(|(k, _)| k.starts_with("shard:"))
                    .filter_map(|(_, v)| v.pointer("/values/diskBytes")?.as_u64())
                    .collect()
            })
            .unwrap_or_default();
        if sizes.is_empty() {
            tracing::warn!("the source reports no shard sizes (diskBytes) in /debug/vars; the target's free space is not checked");
            return Ok(());
        }
        let data = sizes.iter().fold(0u64, |a, &b| a.saturating_add(b));
        let wd = shell_quote(&cfg.work_dir);
        let out = target
            // The nearest existing directory on the work dir's path: prepare (and a dry run)
            // creates nothing on the target.
            .run(&format!(
                "d={wd}; while [ ! -d \"$d\" ]; do d=$(dirname \"$d\"); done; df -Pk \"$d\" | tail -n 1"
            ))
            .await
            .map_err(Self::remote_err(p))?;
        let Some(free_kib) = out
            .split_whitespace()
            .nth(3)
            .and_then(|n| n.parse::<u64>().ok())
        else {
            tracing::warn!(output = %out.trim(), "cannot read the target's free space; not checked");
            return Ok(());
        };
        let (free, need) = (
            free_kib.saturating_mul(1024),
            data.saturating_mul(2).saturating_add(1 << 20),
        );
        if free < need {
            return Err(MigrateError::Failed {
                phase: p,
                msg: format!(
                    "not enough disk on the target {}: {} has {} MiB free, the dump and the restored data need about {} MiB (2 x {} MiB of shards on the source)",
                    cfg.name,
                    cfg.work_dir,
                    free >> 20,
                    need.div_ceil(1 << 20),
                    data.div_ceil(1 << 20)
                ),
            });
        }
        Ok(())
    }

    // ------------------------------------------------------------------ capture

    async fn capture(&mut self) -> Result<(), MigrateError> {
        let p = Phase::Capture;
        let spool_dir = &self.cfg.capture.spool_dir;
        std::fs::create_dir_all(spool_dir).map_err(|e| MigrateError::Failed {
            phase: p,
            msg: format!(
                "cannot create capture.spool_dir {}: {e}",
                spool_dir.display()
            ),
        })?;
        let spool = Arc::new(
            SpoolWriter::create(&spool_dir.join(format!("{}.spool", self.id)))
                .map_err(|source| MigrateError::Spool { phase: p, source })?,
        );
        let auth = Self::receiver_auth(p)?;
        let receiver = Receiver::start(self.cfg.capture.listen, Sink::Spool(spool.clone()), &auth)
            .await
            .map_err(|e| MigrateError::Failed {
                phase: p,
                msg: e.to_string(),
            })?;
        let url = self.advertise(receiver.addr);
        // The watch receiver's port is taken now: a busy one stops the migration here,
        // before the dump, not at cutover.
        self.watch_listener = Some(Self::bind_watch(self.cfg, p).await?);
        self.spool = Some(spool);
        self.receiver = Some(receiver);
        let name = sub_name(&self.id);
        let at_start = Self::subscriber_stats(&self.src().influx, &name, p).await?;
        self.drops_at_start = at_start.dropped;
        self.source_started = at_start.started;
        let subs = self
            .subscribe(Phase::Capture, true, &name, &auth.in_url(&url))
            .await?;
        self.progress.note(&format!(
            "capturing writes of {} retention policies into {url}",
            subs
        ));
        Ok(())
    }

    /// Bind the watch receiver's address (the capture's, one port above).
    async fn bind_watch(
        cfg: &Config,
        phase: Phase,
    ) -> Result<tokio::net::TcpListener, MigrateError> {
        let listen = std::net::SocketAddr::new(
            cfg.capture.listen.ip(),
            watch_port(cfg.capture.listen.port()),
        );
        Receiver::bind(listen)
            .await
            .map_err(|e| MigrateError::Failed {
                phase,
                msg: format!(
                    "{e} (the target's watch receiver listens one port above capture.listen)"
                ),
            })
    }

    /// A fresh secret for a capture receiver (its subscription carries it).
    fn receiver_auth(phase: Phase) -> Result<ReceiverAuth, MigrateError> {
        ReceiverAuth::generate().map_err(|e| MigrateError::Failed {
            phase,
            msg: format!("cannot make the capture receiver's secret: {e}"),
        })
    }

    /// The URL InfluxDB must forward to for a receiver bound at `addr`: the configured
    /// `advertise_url` (or the bound address) with the port actually bound.
    fn advertise(&self, addr: std::net::SocketAddr) -> String {
        match &self.cfg.capture.advertise_url {
            Some(u) => with_port(u, addr.port()),
            None => format!("http://{addr}"),
        }
    }

    /// Subscribe every retention policy of every user database (source or target side)
    /// and wait until InfluxDB shows the subscriptions live in `/debug/vars`.
    async fn subscribe(
        &mut self,
        phase: Phase,
        on_source: bool,
        name: &str,
        destination: &Secret,
    ) -> Result<usize, MigrateError> {
        let side = if on_source { self.src() } else { self.dst() };
        let influx = side.influx.clone();
        let mut made = Vec::new();
        for db in influx.databases().await.map_err(Self::influx_err(phase))? {
            for rp in influx
                .retention_policies(&db)
                .await
                .map_err(Self::influx_err(phase))?
            {
                let q = format!(
                    "CREATE SUBSCRIPTION {} ON {}.{} DESTINATIONS ALL {}",
                    ident(name),
                    ident(&db),
                    ident(&rp.name),
                    literal(destination.expose())
                );
                // The statement holds the receiver's secret: its error must not echo it.
                influx
                    .query(None, &q)
                    .await
                    .map_err(|e| MigrateError::Failed {
                        phase,
                        msg: format!(
                            "{}: cannot create subscription {name} on {db}.{}: {}",
                            influx.url(),
                            rp.name,
                            e.to_string().replace(destination.expose(), "***")
                        ),
                    })?;
                made.push((db.clone(), rp.name.clone()));
                if on_source {
                    self.created
                        .source_subscriptions
                        .push((db.clone(), rp.name.clone()));
                } else {
                    self.created
                        .target_subscriptions
                        .push((db.clone(), rp.name.clone()));
                }
            }
        }
        let deadline = Instant::now() + self.cfg.capture.live_timeout;
        loop {
            let vars = influx.debug_vars().await.map_err(Self::influx_err(phase))?;
            // `subscriber:<db>:<rp>:<name>:<destination>`: the name is this migration's own.
            let live = made
                .iter()
                .filter(|(db, rp)| {
                    let prefix = format!("subscriber:{db}:{rp}:{name}:");
                    vars.as_object()
                        .is_some_and(|o| o.keys().any(|k| k.starts_with(&prefix)))
                })
                .count();
            if live == made.len() {
                return Ok(made.len());
            }
            if Instant::now() > deadline {
                return Err(MigrateError::Failed {
                    phase,
                    msg: format!(
                        "{}: only {live} of {} subscriptions became live within {:?}",
                        influx.url(),
                        made.len(),
                        self.cfg.capture.live_timeout
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Forwarding counters from the source's `/debug/vars`.
    async fn subscriber_stats(
        influx: &Influx,
        name: &str,
        phase: Phase,
    ) -> Result<SubStats, MigrateError> {
        subscriber_stats(influx, name)
            .await
            .map_err(Self::influx_err(phase))
    }

    /// Fail if the source reports forwarded writes that did not reach the receiver, or
    /// any forwarding drop since the capture started (drops are counted server-wide, so a
    /// drop for another subscriber also stops the migration: safe, not silent).
    async fn check_capture_complete(&self, phase: Phase) -> Result<SubStats, MigrateError> {
        let st = Self::subscriber_stats(&self.src().influx, &sub_name(&self.id), phase).await?;
        if self.source_started.is_some() && st.started != self.source_started {
            // A restart loses the forwarding queue (writes acknowledged but not yet
            // forwarded) and zeroes the counters that would have shown it.
            return Err(MigrateError::Failed {
                phase,
                msg: format!(
                    "the source InfluxDB restarted during the capture (it had started at {}, now at {}): writes it acknowledged but had not forwarded yet are not in the capture, and its forwarding counters were reset",
                    self.source_started.as_deref().unwrap_or("?"),
                    st.started.as_deref().unwrap_or("?")
                ),
            });
        }
        let dropped = st.dropped.saturating_sub(self.drops_at_start);
        let lost = st.failed + dropped;
        if lost > 0 {
            return Err(MigrateError::Failed {
                phase,
                msg: format!("the source may have failed to forward {lost} captured writes to the capture receiver ({} deliveries of our subscriptions failed: the receiver refused them or did not answer within the source's [subscriber] http-timeout; {dropped} failures counted by the source outside our subscriptions: a full forwarding queue ([subscriber] write-buffer-size), or another subscription failing its deliveries, which InfluxDB counts in the same place); the capture cannot be proven complete", st.failed),
            });
        }
        Ok(st)
    }

    /// After a crash past the repoint: with the new capture live, let the old
    /// subscription's counters settle, then require that it delivered exactly what the
    /// old spool holds and failed nothing. Then the old subscriptions go.
    async fn check_interrupted(&mut self) -> Result<(), MigrateError> {
        let p = Phase::Capture;
        let Some((old, spooled)) = self.interrupted.clone() else {
            return Ok(());
        };
        let src = self.src().influx.clone();
        let mut last = Self::subscriber_stats(&src, &old, p).await?;
        let mut stable_since = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(30);
        while stable_since.elapsed() < Duration::from_millis(500) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = Self::subscriber_stats(&src, &old, p).await?;
            if (now.written, now.failed) != (last.written, last.failed) {
                stable_since = Instant::now();
            }
            last = now;
        }
        for s in src.subscriptions().await.map_err(Self::influx_err(p))? {
            if s.name == old {
                let _ = src
                    .drop_subscription(&s.name, &s.database, &s.retention_policy)
                    .await;
            }
        }
        let dst = self.dst().influx.clone();
        for s in dst.subscriptions().await.map_err(Self::influx_err(p))? {
            if s.name.starts_with(&old) {
                let _ = dst
                    .drop_subscription(&s.name, &s.database, &s.retention_policy)
                    .await;
            }
        }
        if last.failed > 0 || last.written != spooled {
            return Err(MigrateError::Failed {
                phase: p,
                msg: format!(
                    "{} write(s) reached the source while the capture was down (the interrupted capture forwarded {} points, its spool holds {spooled}); they are on the source but not on the target",
                    last.failed, last.written
                ),
            });
        }
        Ok(())
    }

    // ------------------------------------------------------------------ dump / transfer / restore

    fn scratch(cfg: &InstanceConfig, id: &str, what: &str) -> String {
        format!("{}/{}-{}", cfg.work_dir.trim_end_matches('/'), what, id)
    }

    async fn dump(&mut self) -> Result<(), MigrateError> {
        if crate::util::fault_injected("capture_receiver_killed") {
            if let Some(r) = self.receiver.as_mut() {
                tracing::warn!(addr = %r.addr, "STATESHIFT_FAULT=capture_receiver_killed: killing the capture receiver");
                r.kill();
            }
        }
        if self.cfg.migration.transfer != TransferMode::Stream {
            match self.pull_dump().await {
                Ok(r) => {
                    r?;
                    self.pulled = true;
                    self.progress.note("the target pulled the dump from the source's RPC port through SSH forwards (dump and transfer in one pass)");
                    return Ok(());
                }
                Err(why) if self.cfg.migration.transfer == TransferMode::Auto => {
                    tracing::warn!(reason = %why, "SSH forwarding unavailable; dumping on the source and streaming the archive instead");
                    self.progress.note(&format!(
                        "SSH forwarding unavailable ({why}); falling back to dump + tar stream"
                    ));
                }
                Err(why) => {
                    return Err(MigrateError::Failed {
                        phase: Phase::Dump,
                        msg: format!("migration.transfer is forward, but {why}"),
                    })
                }
            }
        }
        let p = Phase::Dump;
        let dir = Self::scratch(&self.src().cfg, &self.id, "dump");
        self.created.source_dirs.push(dir.clone());
        let out = self
            .src()
            .host
            .run(&backup_cmd(&self.src().cfg.rpc_address, &dir))
            .await
            .map_err(Self::remote_err(p))?;
        self.report.dump_bytes = du_bytes(&out);
        Ok(())
    }

    /// Run `influxd backup` on the target host against the source's RPC port, reached
    /// through a local forward into the source and a remote forward out of the target,
    /// both through this process: no VM-to-VM keys, no copy on the source's disk.
    /// `Err` means the forwards could not be set up (the caller may fall back);
    /// `Ok(Err)` is a failure of the backup itself.
    async fn pull_dump(&mut self) -> Result<Result<(), MigrateError>, String> {
        let p = Phase::Dump;
        let rpc = self.src().cfg.rpc_address.clone();
        let (rpc_host, rpc_port) = rpc
            .rsplit_once(':')
            .and_then(|(h, port)| {
                port.parse::<u16>()
                    .ok()
                    .map(|port| (h.trim_matches(['[', ']']).to_string(), port))
            })
            .ok_or_else(|| format!("source.rpc_address {rpc:?} is not host:port"))?;
        // 1. The source's RPC port, as this process reaches it.
        let mut local_fwd = None;
        let src_rpc: std::net::SocketAddr = match &self.src().host {
            Host::Ssh(s) => {
                let listen = free_local_port().map_err(|e| format!("no free local port: {e}"))?;
                s.forward_local(listen, &rpc_host, rpc_port)
                    .await
                    .map_err(|e| e.to_string())?;
                local_fwd = Some(listen);
                listen
            }
            Host::Local(_) => tokio::net::lookup_host(rpc.as_str())
                .await
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| format!("cannot resolve source.rpc_address {rpc:?}"))?,
        };
        // 2. The target reaches it.
        let mut remote_fwd = None;
        let backup_from = match &self.dst().host {
            Host::Ssh(t) => {
                let mut last = String::new();
                for attempt in 0..8u64 {
                    let port = 20_000
                        + ((self.id.parse::<u64>().unwrap_or(0).wrapping_mul(7919)
                            + attempt * 104_729)
                            % 40_000) as u16;
                    match t.forward_remote(port, src_rpc).await {
                        Ok(()) => {
                            remote_fwd = Some(port);
                            break;
                        }
                        Err(e) => last = e.to_string(),
                    }
                }
                match remote_fwd {
                    Some(port) => format!("127.0.0.1:{port}"),
                    None => {
                        self.close_forwards(local_fwd, None, &rpc_host, rpc_port, src_rpc)
                            .await;
                        return Err(last);
                    }
                }
            }
            Host::Local(_) => src_rpc.to_string(),
        };
        let dir = Self::scratch(&self.dst().cfg, &self.id, "restore");
        self.created.target_dirs.push(dir.clone());
        // The backup runs on the target but reads through our connection to the source:
        // if that connection dies, `influxd backup` would retry each shard for minutes.
        let watch_source = async {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if !self.src().host.alive().await {
                    return;
                }
            }
        };
        let cmd = backup_cmd(&backup_from, &dir);
        let r = tokio::select! {
            r = self.dst().host.run(&cmd) => r.map_err(Self::remote_err(p)),
            () = watch_source => {
                // Dropping the command does not stop `influxd backup` on the target (an
                // SSH channel or `sh` going away leaves it retrying): stop it by its
                // scratch directory, which only this migration's backup names.
                let pattern = format!("[i]nfluxd backup .*{}", regex_quote(&dir));
                if let Err(e) = self.dst().host.run(&format!("pkill -f -- {} || true", shell_quote(&pattern))).await {
                    tracing::warn!(error = %e, "could not stop the target's backup");
                }
                Err(MigrateError::Failed {
                    phase: p,
                    msg: format!(
                        "the SSH connection to the source {} was lost during the dump",
                        self.src().host.describe()
                    ),
                })
            }
        };
        self.close_forwards(local_fwd, remote_fwd, &rpc_host, rpc_port, src_rpc)
            .await;
        Ok(r.map(|out| self.report.dump_bytes = du_bytes(&out)))
    }

    async fn close_forwards(
        &self,
        local: Option<std::net::SocketAddr>,
        remote: Option<u16>,
        rpc_host: &str,
        rpc_port: u16,
        src_rpc: std::net::SocketAddr,
    ) {
        if let (Some(port), Host::Ssh(t)) = (remote, &self.dst().host) {
            t.close_remote(port, src_rpc).await;
        }
        if let (Some(listen), Host::Ssh(s)) = (local, &self.src().host) {
            s.close_local(listen, rpc_host, rpc_port).await;
        }
    }

    async fn transfer(&mut self) -> Result<(), MigrateError> {
        let p = Phase::Transfer;
        if self.pulled {
            return Ok(()); // the target already holds the dump
        }
        let from = Self::scratch(&self.src().cfg, &self.id, "dump");
        let to = Self::scratch(&self.dst().cfg, &self.id, "restore");
        self.created.target_dirs.push(to.clone());
        // The shards are already gzip-compressed: plain tar, streamed through this process.
        let send = format!("tar -C {} -cf - .", shell_quote(&from));
        let recv = format!(
            "rm -rf {to} && mkdir -p {to} && tar -C {to} -xf -",
            to = shell_quote(&to)
        );
        let mut tx = self
            .src()
            .host
            .spawn(
                &send,
                Pipes {
                    stdin: false,
                    stdout: true,
                },
            )
            .await
            .map_err(Self::remote_err(p))?;
        let mut rx = self
            .dst()
            .host
            .spawn(
                &recv,
                Pipes {
                    stdin: true,
                    stdout: false,
                },
            )
            .await
            .map_err(Self::remote_err(p))?;
        let (Some(mut out), Some(mut inp)) = (tx.stdout.take(), rx.stdin.take()) else {
            return Err(MigrateError::Failed {
                phase: p,
                msg: "transfer pipes were not opened".into(),
            });
        };
        let copied = tokio::io::copy(&mut out, &mut inp).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut inp).await;
        drop(inp);
        drop(out);
        let (a, b) = tokio::join!(tx.finish(), rx.finish());
        a.map_err(Self::remote_err(p))?;
        b.map_err(Self::remote_err(p))?;
        let n = copied.map_err(|e| MigrateError::Failed {
            phase: p,
            msg: format!("streaming the dump: {e}"),
        })?;
        self.progress.note(&format!("transferred {n} bytes"));
        Ok(())
    }

    async fn restore(&mut self) -> Result<(), MigrateError> {
        let p = Phase::Restore;
        let dir = Self::scratch(&self.dst().cfg, &self.id, "restore");
        let rpc = self.dst().cfg.rpc_address.clone();
        for db in self.report.databases.clone() {
            // Re-checked right before the side effect: a database that appeared on the
            // target since prepare is not ours, and a rollback must never drop it.
            let now = self
                .dst()
                .influx
                .databases()
                .await
                .map_err(Self::influx_err(p))?;
            if now.contains(&db) {
                return Err(MigrateError::TargetNotEmpty {
                    target: self.dst().cfg.name.clone(),
                    db,
                });
            }
            // Recorded before the side effect: a half-restored database is ours to remove.
            self.created.target_databases.push(db.clone());
            // Judged by its exit status (a failure's stderr is in the error) and by the state
            // it leaves; never by words in its output, which names databases and shards.
            let cmd = format!(
                "influxd restore -portable -db {} -host {} {}",
                shell_quote(&db),
                shell_quote(&rpc),
                shell_quote(&dir)
            );
            self.dst()
                .host
                .run(&cmd)
                .await
                .map_err(Self::remote_err(p))?;
            let restored = self
                .dst()
                .influx
                .databases()
                .await
                .map_err(Self::influx_err(p))?;
            if !restored.contains(&db) {
                return Err(MigrateError::Failed {
                    phase: p,
                    msg: format!(
                        "restore of database {db:?} on {} exited 0 but the database is not there",
                        self.dst().cfg.name
                    ),
                });
            }
        }
        let src = self.src().influx.clone();
        let dst = self.dst().influx.clone();
        let err = Self::influx_err(p);
        // Portable restore carries subscriptions over: ours must not forward from the target.
        for s in dst.subscriptions().await.map_err(&err)? {
            if s.name.starts_with("stateshift_") {
                dst.drop_subscription(&s.name, &s.database, &s.retention_policy)
                    .await
                    .map_err(&err)?;
            }
        }
        // Retention policies: restore brings them; make sure defaults and any missing agree.
        for db in &self.report.databases {
            let srps = src.retention_policies(db).await.map_err(&err)?;
            let drps = dst.retention_policies(db).await.map_err(&err)?;
            for rp in &srps {
                let q = match drps.iter().find(|d| d.name == rp.name) {
                    None => format!("CREATE RETENTION POLICY {} ON {} DURATION {} REPLICATION {} SHARD DURATION {}{}", ident(&rp.name), ident(db), rp.duration, rp.replication, rp.shard_group_duration, if rp.default { " DEFAULT" } else { "" }),
                    Some(d) if d != rp => format!("ALTER RETENTION POLICY {} ON {} DURATION {} REPLICATION {} SHARD DURATION {}{}", ident(&rp.name), ident(db), rp.duration, rp.replication, rp.shard_group_duration, if rp.default { " DEFAULT" } else { "" }),
                    Some(_) => continue,
                };
                dst.query(None, &q).await.map_err(&err)?;
            }
        }
        // Users and grants (portable restore drops them).
        let dst_users: BTreeSet<String> = dst
            .users()
            .await
            .map_err(&err)?
            .into_iter()
            .map(|u| u.name)
            .collect();
        for u in src.users().await.map_err(&err)? {
            if !dst_users.contains(&u.name) {
                let pw = self
                    .cfg
                    .migration
                    .user_passwords
                    .get(&u.name)
                    .or(if self.src().cfg.username.as_deref() == Some(&u.name) {
                        self.src().cfg.password.as_ref()
                    } else {
                        None
                    })
                    .cloned();
                let Some(pw) = pw else {
                    return Err(MigrateError::MissingPassword {
                        user: u.name.clone(),
                    });
                };
                let q = format!(
                    "CREATE USER {} WITH PASSWORD {}{}",
                    ident(&u.name),
                    literal(pw.expose()),
                    if u.admin { " WITH ALL PRIVILEGES" } else { "" }
                );
                self.created.target_users.push(u.name.clone());
                // The statement holds the password: its error must not echo it.
                dst.query(None, &q)
                    .await
                    .map_err(|e| MigrateError::Failed {
                        phase: p,
                        msg: format!(
                            "cannot create user {:?} on the target: {}",
                            u.name,
                            statement_error(&e, pw.expose())
                        ),
                    })?;
            } else if u.admin {
                dst.query(None, &format!("GRANT ALL PRIVILEGES TO {}", ident(&u.name)))
                    .await
                    .map_err(&err)?;
            }
            for g in src.grants(&u.name).await.map_err(&err)? {
                let privilege = if g.privilege == "ALL PRIVILEGES" {
                    "ALL"
                } else {
                    g.privilege.as_str()
                };
                dst.query(
                    None,
                    &format!(
                        "GRANT {privilege} ON {} TO {}",
                        ident(&g.database),
                        ident(&u.name)
                    ),
                )
                .await
                .map_err(&err)?;
            }
        }
        // Continuous queries.
        let have: BTreeSet<(String, String)> = dst
            .continuous_queries()
            .await
            .map_err(&err)?
            .into_iter()
            .map(|c| (c.database, c.name))
            .collect();
        for cq in src.continuous_queries().await.map_err(&err)? {
            if !have.contains(&(cq.database.clone(), cq.name.clone())) {
                dst.query(None, &cq.query).await.map_err(&err)?;
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------------ delta / cutover

    async fn delta(&mut self) -> Result<(), MigrateError> {
        let p = Phase::Delta;
        let spool = self.spool.clone().ok_or_else(|| MigrateError::Failed {
            phase: p,
            msg: "no capture spool".into(),
        })?;
        spool
            .sync()
            .map_err(|source| MigrateError::Spool { phase: p, source })?;
        let mut reader = spool
            .reader()
            .map_err(|source| MigrateError::Spool { phase: p, source })?;
        // Catch up with what was captured so far; writers keep writing to the source.
        let dst = self.dst().influx.clone();
        let t = Instant::now();
        if let Some(old) = self.replay_first.clone() {
            // An interrupted run's capture, first, in its own order.
            let mut r = SpoolReader::open_finished(&old)
                .map_err(|source| MigrateError::Spool { phase: p, source })?;
            // Only what the interrupted run had not replayed yet: replaying older records
            // again would put back values that writers have overwritten on the target since.
            r.seek(replayed_offset(&old))
                .map_err(|source| MigrateError::Spool { phase: p, source })?;
            let n = replay_ready(&mut r, &dst, p, None).await?;
            self.progress.note(&format!(
                "replayed {n} points captured before the interruption"
            ));
            self.report.points_replayed += n;
        }
        let n = replay_ready(&mut reader, &dst, p, None).await?;
        record_offset(&self.cfg.capture.spool_dir, &self.id, reader.offset()).await;
        self.report.points_replayed += n;
        self.report.replay_seconds += t.elapsed().as_secs_f64();
        self.reader = Some(reader);
        self.check_capture_complete(p).await?;
        Ok(())
    }

    /// Replay what the spool holds now (tracking the keys once the target is watched).
    async fn replay_now(&mut self, phase: Phase) -> Result<u64, MigrateError> {
        let (Some(reader), Some(dst)) = (self.reader.as_mut(), self.target.as_ref()) else {
            return Ok(0);
        };
        let t = Instant::now();
        let n = replay_ready(reader, &dst.influx, phase, self.touched.as_deref()).await?;
        record_offset(&self.cfg.capture.spool_dir, &self.id, reader.offset()).await;
        self.report.points_replayed += n;
        self.report.replay_seconds += t.elapsed().as_secs_f64();
        Ok(n)
    }

    async fn cutover(&mut self) -> Result<(), MigrateError> {
        let p = Phase::Cutover;
        // Catch up once more so the lag at the switch is as small as possible.
        self.replay_now(p).await?;
        self.check_capture_complete(p).await?;
        // Watch the target from now on: a writer's overwrite there after cutover may
        // legitimately differ from the source's old value. The watch receiver listens on
        // the capture address, one port above the capture's (a free port when the
        // capture's is 0): a firewall between the VMs and the orchestrator must let the
        // target reach it (found on the lab: a random port was dropped by the SO's
        // security group, the target's forwards hung until InfluxDB's http-timeout).
        let touched = Arc::new(Mutex::new(KeySet::with_cap(5_000_000)));
        let listener = match self.watch_listener.take() {
            Some(l) => l,
            None => Self::bind_watch(self.cfg, p).await?,
        };
        let tauth = Self::receiver_auth(p)?;
        let tr =
            Receiver::start_on(listener, Sink::Keys(touched.clone()), &tauth).map_err(|e| {
                MigrateError::Failed {
                    phase: p,
                    msg: e.to_string(),
                }
            })?;
        let turl = tauth.in_url(&self.advertise(tr.addr));
        self.touched = Some(touched);
        self.touched_receiver = Some(tr);
        self.subscribe(p, false, &format!("{}_t", sub_name(&self.id)), &turl)
            .await?;

        if let Some(cmd) = &self.cfg.cutover.command {
            let cmd = cmd.replace("{target_url}", &shell_quote(&self.dst().cfg.influx_url));
            let host = Host::connect(self.cfg.cutover.ssh.as_ref())
                .await
                .map_err(Self::remote_err(p))?;
            // Recorded first: the command must never run unrecorded.
            self.progress
                .writers_repointing()
                .map_err(|msg| MigrateError::Failed { phase: p, msg })?;
            // From here on some writers may already write to the target: a failure must
            // not roll the target back (it may hold acknowledged writes).
            self.report.cutover_done = true;
            // Bounded on the writers' host itself: closing an SSH channel does not stop a
            // command there, so a command that outlives its timeout would go on repointing
            // writers while this migration reports it failed. `timeout` kills its whole
            // process group; the local bound is a backstop should the host stop answering.
            let limit = self.cfg.cutover.timeout;
            let bounded = format!(
                "timeout -k 5 {}s sh -c {}",
                limit.as_secs_f64(),
                shell_quote(&cmd)
            );
            let r = tokio::time::timeout(limit + Duration::from_secs(10), host.run(&bounded)).await;
            match r {
                Ok(Ok(out)) => {
                    // Replay at once what arrived during the command, so what a crash right
                    // now would leave unreplayed is as little as possible.
                    self.replay_now(p).await?;
                    self.progress.writers_repointed();
                    let said = match out.trim() {
                        "" => String::new(),
                        o => format!(" ({o})"),
                    };
                    self.progress.note(&format!(
                        "writers repointed to {}{said}",
                        self.dst().cfg.influx_url
                    ))
                }
                // 124: `timeout` stopped it; 137: it had to be killed.
                Ok(Err(RemoteError::Failed {
                    code: Some(124 | 137),
                    ..
                })) => {
                    return Err(MigrateError::Failed {
                        phase: p,
                        msg: format!(
                            "cutover command did not finish within {:?} (cutover.timeout) and was stopped on {}",
                            limit,
                            host.describe()
                        ),
                    })
                }
                Ok(Err(e)) => {
                    return Err(MigrateError::Remote {
                        phase: p,
                        source: e,
                    })
                }
                Err(_) => {
                    return Err(MigrateError::Failed {
                        phase: p,
                        msg: format!(
                            "cutover command did not finish within {:?} (cutover.timeout) and {} stopped answering; it may still be running there",
                            limit,
                            host.describe()
                        ),
                    })
                }
            }
        }
        if self.cfg.cutover.command.is_none() {
            // Writers follow by other means (DNS, a proxy): they may use the target now,
            // and there is no command to wait for.
            self.progress
                .writers_repointing()
                .map_err(|msg| MigrateError::Failed { phase: p, msg })?;
            self.progress.writers_repointed();
        }
        self.report.cutover_done = true;
        // Keep replaying until the source has been quiet for the grace period and every
        // point it forwarded has reached the receiver.
        let quiet = self.cfg.capture.quiet_period;
        let deadline = Instant::now() + self.cfg.capture.quiet_timeout;
        let stats = self
            .receiver
            .as_ref()
            .map(|r| r.stats.clone())
            .ok_or_else(|| MigrateError::Failed {
                phase: p,
                msg: "no receiver".into(),
            })?;
        let switched = Instant::now();
        loop {
            self.replay_now(p).await?;
            let last = stats.last_write().unwrap_or(switched).max(switched);
            if last.elapsed() >= quiet {
                let st = self.check_capture_complete(p).await?;
                let received = stats.points();
                let lag = self.reader.as_ref().map(|r| r.lag()).unwrap_or(0);
                if st.written == received && lag == 0 {
                    break;
                }
                tracing::debug!(
                    forwarded = st.written,
                    received,
                    "source quiet but forwarding not settled yet"
                );
            }
            if Instant::now() > deadline {
                return Err(MigrateError::Failed {
                    phase: p,
                    msg: format!("the source kept receiving writes for {:?} after cutover (capture.quiet_timeout); are all writers repointed?", self.cfg.capture.quiet_timeout),
                });
            }
            match self.reader.as_mut() {
                Some(r) => {
                    tokio::select! {
                        _ = r.wait_for_more() => {}
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
                None => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        self.report.points_captured = stats.points();
        self.report.replay_points_per_second = if self.report.replay_seconds > 0.0 {
            self.report.points_replayed as f64 / self.report.replay_seconds
        } else {
            0.0
        };
        Ok(())
    }

    // ------------------------------------------------------------------ verify / dispose

    async fn verify(&mut self) -> Result<(), MigrateError> {
        let p = Phase::Verify;
        if crate::util::fault_injected("capture_receiver_killed_after_cutover") {
            if let Some(r) = self.receiver.as_mut() {
                tracing::warn!(addr = %r.addr, "STATESHIFT_FAULT=capture_receiver_killed_after_cutover: killing the capture receiver");
                r.kill();
            }
        }
        if let (Some(t), Some(r)) = (&self.touched, &self.touched_receiver) {
            let g = t.lock().unwrap_or_else(|e| e.into_inner());
            tracing::info!(
                keys = g.arrivals.len(),
                overflowed = g.overflowed,
                points = r.stats.points(),
                "points written to the target since cutover"
            );
        }
        let rep = verify::verify(
            &self.src().influx,
            &self.dst().influx,
            &self.cfg.verify,
            self.touched.as_deref(),
            self.resume,
        )
        .await
        .map_err(Self::influx_err(p))?;
        self.report.verify = Some(rep.clone());
        if !rep.ok() {
            let mut summary = rep
                .problems
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ");
            if rep.problems.len() > 10 || rep.problems_truncated {
                summary.push_str(&format!(
                    "; and more ({} shown of at least {})",
                    10,
                    rep.problems.len()
                ));
            }
            return Err(MigrateError::VerifyFailed {
                summary,
                report: Box::new(rep),
            });
        }
        self.progress.note(&format!(
            "verified: {} databases, {} series, {} values on the source, {} on the target, {} series compared point by point, {} points overwritten after cutover",
            rep.databases, rep.series, rep.source_values, rep.target_values, rep.series_compared_point_by_point, rep.overwritten_after_cutover
        ));
        if rep.values_unverifiable > 0 {
            self.progress.note(&format!(
                "{} point values differ and cannot be judged: they changed on the target while stateshift was down after the repoint",
                rep.values_unverifiable
            ));
        }
        Ok(())
    }

    async fn dispose(&mut self) -> Result<(), MigrateError> {
        // Writes that reached the source after verification are forwarded too; a failed
        // forward (or a source restart) now would leave a point only on the old stack,
        // which is about to be deleted.
        self.check_capture_complete(Phase::Dispose).await?;
        // Read before the subscriptions go: a write between this read and the drop is
        // forwarded and still counted, so the later comparison errs on the safe side.
        if let Some(src) = &self.source {
            match source_http_writes(&src.influx).await {
                Ok(n) => self.report.source_writes_at_capture_stop = Some(n),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the source's write counters before stopping the capture; the old stack will be kept unless they can be read")
                }
            }
        }
        let tail = self.stop_capture(Phase::Dispose).await?;
        if tail > 0 {
            self.progress.note(&format!(
                "replayed {tail} points that reached the source after verification"
            ));
        }
        self.drop_subscriptions().await;
        self.remove_scratch().await;
        if let Some(s) = self.spool.take() {
            let _ = std::fs::remove_file(s.path());
            let _ = std::fs::remove_file(format!("{}.offset", s.path().display()));
        }
        Ok(())
    }

    /// Remove the dump and restore directories on both hosts (copies of data, not data).
    async fn remove_scratch(&mut self) {
        for (side, dirs) in [
            (&self.source, std::mem::take(&mut self.created.source_dirs)),
            (&self.target, std::mem::take(&mut self.created.target_dirs)),
        ] {
            if let (Some(side), false) = (side, dirs.is_empty()) {
                let cmd = dirs
                    .iter()
                    .map(|d| format!("rm -rf {}", shell_quote(d)))
                    .collect::<Vec<_>>()
                    .join(" && ");
                if let Err(e) = side.host.run(&cmd).await {
                    tracing::warn!(error = %e, "could not remove scratch directories");
                }
            }
        }
    }

    /// Stop capturing on the source, let in-flight forwards land, and replay the tail of
    /// the spool (writes that still reached the source, e.g. from a straggling writer).
    async fn stop_capture(&mut self, phase: Phase) -> Result<u64, MigrateError> {
        let name = sub_name(&self.id);
        if let Some(src) = &self.source {
            for (db, rp) in std::mem::take(&mut self.created.source_subscriptions) {
                if let Err(e) = src.influx.drop_subscription(&name, &db, &rp).await {
                    tracing::warn!(error = %e, db, rp, "could not drop the capture subscription on the source");
                }
            }
        }
        // Forwards already in flight still land: wait until arrivals settle (bounded),
        // stop the receiver, and only then replay the last of the spool.
        if let Some(r) = &self.receiver {
            let stats = r.stats.clone();
            let mut last = stats.points();
            let mut stable = Instant::now();
            let deadline = Instant::now() + Duration::from_secs(10);
            while stable.elapsed() < Duration::from_millis(300) && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let now = stats.points();
                if now != last {
                    last = now;
                    stable = Instant::now();
                }
            }
        }
        if let Some(r) = self.receiver.take() {
            r.stop().await;
        }
        self.replay_now(phase).await
    }

    async fn drop_subscriptions(&mut self) {
        let name = sub_name(&self.id);
        let tname = format!("{name}_t");
        if let Some(src) = &self.source {
            for (db, rp) in std::mem::take(&mut self.created.source_subscriptions) {
                if let Err(e) = src.influx.drop_subscription(&name, &db, &rp).await {
                    tracing::warn!(error = %e, db, rp, "could not drop the capture subscription on the source");
                }
            }
        }
        if let Some(dst) = &self.target {
            for (db, rp) in std::mem::take(&mut self.created.target_subscriptions) {
                if let Err(e) = dst.influx.drop_subscription(&tname, &db, &rp).await {
                    tracing::warn!(error = %e, db, rp, "could not drop the watch subscription on the target");
                }
            }
        }
        if let Some(r) = self.receiver.take() {
            r.stop().await;
        }
        if let Some(r) = self.touched_receiver.take() {
            r.stop().await;
        }
    }

    /// Undo what can be undone. Before cutover: everything this migration created on the
    /// target goes, the source is as before. After cutover: nothing is deleted anywhere.
    async fn on_failure(&mut self, e: &MigrateError) {
        tracing::error!(phase = %e.phase(), error = %e, "migration failed");
        if self.report.cutover_done {
            // Writers may still reach the source: replay what it forwarded before stopping.
            if let Err(e) = self.stop_capture(e.phase()).await {
                tracing::error!(error = %e, "could not replay the last captured writes; the capture spool is kept");
            }
        }
        self.drop_subscriptions().await;
        self.remove_scratch().await;
        if self.report.cutover_done {
            self.progress.note(&format!(
                "writers already point at the target {}; the source {} is untouched and keeps all its data; the capture spool is kept",
                self.target_cfg.influx_url, self.cfg.source.influx_url
            ));
            return;
        }
        if let Some(dst) = &self.target {
            for db in std::mem::take(&mut self.created.target_databases) {
                if let Err(e) = dst
                    .influx
                    .query(None, &format!("DROP DATABASE {}", ident(&db)))
                    .await
                {
                    tracing::warn!(error = %e, db, "rollback: could not drop the half-made database on the target");
                }
            }
            for u in std::mem::take(&mut self.created.target_users) {
                let _ = dst
                    .influx
                    .query(None, &format!("DROP USER {}", ident(&u)))
                    .await;
            }
        }
        if let Some(s) = self.spool.take() {
            let _ = std::fs::remove_file(s.path());
            let _ = std::fs::remove_file(format!("{}.offset", s.path().display()));
        }
        self.progress.note("rolled back: the source is untouched and still serves the writers; what this migration made on the target is removed");
    }
}

/// The error of a statement that carried a password, without the statement: the
/// server's own message (with the password masked, should a parser quote it) or the
/// HTTP status only.
fn statement_error(e: &InfluxError, secret: &str) -> String {
    let msg = match e {
        InfluxError::Query { msg, .. } => msg.clone(),
        InfluxError::Http { status, .. } => format!("HTTP {status}"),
        InfluxError::Decode { .. } => "unexpected response".into(),
        other => other.to_string(),
    };
    if secret.is_empty() {
        msg
    } else {
        msg.replace(secret, "***")
    }
}

/// Forwarding counters of the subscriptions named `name` on a server, from `/debug/vars`.
/// Points the InfluxDB at `influx` has acknowledged over HTTP since it started (the sum of
/// `pointsWrittenOK` over its `httpd` services in `/debug/vars`).
pub async fn source_http_writes(influx: &Influx) -> Result<u64, InfluxError> {
    let vars = influx.debug_vars().await?;
    Ok(vars
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, _)| k.starts_with("httpd"))
                .filter_map(|(_, v)| v.pointer("/values/pointsWrittenOK")?.as_u64())
                .sum()
        })
        .unwrap_or(0))
}

pub async fn subscriber_stats(influx: &Influx, name: &str) -> Result<SubStats, InfluxError> {
    let vars = influx.debug_vars().await?;
    let num = |v: &serde_json::Value, p: &str| v.pointer(p).and_then(|n| n.as_u64()).unwrap_or(0);
    let mut st = SubStats::default();
    if let Some(obj) = vars.as_object() {
        for (k, v) in obj {
            if k.starts_with("subscriber:")
                && v.pointer("/tags/name").and_then(|n| n.as_str()) == Some(name)
            {
                st.written += num(v, "/values/pointsWritten");
                st.failed += num(v, "/values/writeFailures");
            }
        }
        // Drops that never reach a subscription's own counters: the points writer's
        // queue to the subscriber service, and the service's per-subscription queues.
        if let Some(w) = obj.get("write") {
            st.dropped += num(w, "/values/subWriteDrop");
        }
        st.started = obj
            .get("system")
            .and_then(|v| v.get("started"))
            .and_then(|v| v.as_str())
            .map(str::to_string);
        // The service-level failure count includes every subscription's delivery
        // failures; what exceeds their sum is queue-full drops.
        let per_sub: u64 = obj
            .iter()
            .filter(|(k, _)| k.starts_with("subscriber:"))
            .map(|(_, v)| num(v, "/values/writeFailures"))
            .sum();
        if let Some(sv) = obj.get("subscriber") {
            st.dropped += num(sv, "/values/writeFailures").saturating_sub(per_sub);
        }
    }
    Ok(st)
}

/// Largest body sent in one replay request (InfluxDB's default limit is 25 MB).
const REPLAY_BATCH_BYTES: usize = 4 << 20;

/// Replay every record committed so far, in order, batching consecutive records that
/// share database, retention policy and precision. Returns the points replayed.
///
/// With `track`, the key of every replayed point is counted as replayed, so verification
/// can tell stateshift's own writes to the target from a writer's.
pub async fn replay_ready(
    reader: &mut SpoolReader,
    target: &Influx,
    phase: Phase,
    track: Option<&Mutex<KeySet>>,
) -> Result<u64, MigrateError> {
    let mut points = 0u64;
    let mut batch: Vec<u8> = Vec::with_capacity(REPLAY_BATCH_BYTES);
    let mut key: Option<(String, String, String)> = None;
    let mut ready: std::collections::VecDeque<Record> = Default::default();
    loop {
        if ready.is_empty() {
            ready = reader
                .next_batch(REPLAY_BATCH_BYTES)
                .await
                .map_err(|source| MigrateError::Spool { phase, source })?
                .into();
        }
        let rec = ready.pop_front();
        let flush = match (&rec, &key) {
            (None, _) => true,
            (Some(r), Some((d, rp, pr))) => {
                &r.db != d
                    || &r.rp != rp
                    || &r.precision != pr
                    || batch.len() + r.body.len() > REPLAY_BATCH_BYTES
            }
            (Some(_), None) => false,
        };
        if flush && !batch.is_empty() {
            if let Some((d, rp, pr)) = &key {
                let body = Bytes::from(std::mem::take(&mut batch));
                points += write_with_retry(target, d, rp, pr, body.clone(), phase).await?;
                if let Some(t) = track {
                    let mut g = t.lock().unwrap_or_else(|e| e.into_inner());
                    KeySet::for_each_key(std::str::from_utf8(&body).unwrap_or(""), pr, |k| {
                        g.replayed(k)
                    });
                }
                batch.reserve(REPLAY_BATCH_BYTES);
            }
        }
        let Some(r) = rec else { return Ok(points) };
        key = Some((r.db, r.rp, r.precision));
        batch.extend_from_slice(&r.body);
        if !r.body.ends_with(b"\n") {
            batch.push(b'\n');
        }
    }
}

async fn write_with_retry(
    target: &Influx,
    db: &str,
    rp: &str,
    precision: &str,
    body: Bytes,
    phase: Phase,
) -> Result<u64, MigrateError> {
    let n = lineproto::count_points(std::str::from_utf8(&body).unwrap_or("")) as u64;
    let start = tokio::time::Instant::now();
    let mut retry = crate::util::Retry::new(
        Duration::from_millis(50),
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .counting_from(start);
    loop {
        match target.write(db, Some(rp), precision, body.clone()).await {
            Ok(()) => return Ok(n),
            // The source stored the valid points of a partial write and forwarded those;
            // a 400 "partial write" here (e.g. points beyond retention) is what the source
            // itself answered for them.
            Err(InfluxError::Http {
                status: 400,
                ref body,
                ..
            }) if body.starts_with("{\"error\":\"partial write")
                || body.contains("partial write") =>
            {
                tracing::warn!(db, error = %body, "replay: partial write, as on the source");
                return Ok(n);
            }
            // A busy or briefly unreachable target gets a minute. Before cutover (the
            // delta), one that refuses connections is down, and waiting a minute for it
            // only delays the rollback; after the repoint the writers depend on it, so a
            // restarting target (refusing until its shards are open) gets the minute too.
            Err(e)
                if e.is_transient()
                    && !(phase == Phase::Delta
                        && e.is_refused()
                        && start.elapsed() >= Duration::from_secs(10)) =>
            {
                let Some(wait) = retry.next() else {
                    return Err(MigrateError::Influx { phase, source: e });
                };
                tracing::warn!(error = %e, retry_in = ?wait, "replay write failed, retrying");
                tokio::time::sleep(wait).await;
            }
            Err(source) => return Err(MigrateError::Influx { phase, source }),
        }
    }
}

/// Replay what an interrupted run's spool (`<spool_dir>/<id>.spool`) holds beyond its
/// recorded offset, onto `target`. Returns the points replayed (0 without a spool).
pub async fn replay_spool_tail(
    spool_dir: &std::path::Path,
    id: &str,
    target: &Influx,
) -> Result<u64, MigrateError> {
    let p = Phase::Dispose;
    let path = spool_dir.join(format!("{id}.spool"));
    if !path.exists() {
        return Ok(0);
    }
    let mut r = SpoolReader::open_finished(&path)
        .map_err(|source| MigrateError::Spool { phase: p, source })?;
    r.seek(replayed_offset(&path))
        .map_err(|source| MigrateError::Spool { phase: p, source })?;
    let n = replay_ready(&mut r, target, p, None).await?;
    record_offset(spool_dir, id, r.offset()).await;
    Ok(n)
}

/// Remember how far the spool of migration `id` has been replayed (`<id>.spool.offset`).
/// Written after every replay; a crash of this process keeps it (page cache), and a
/// resumed migration starts its replay there.
async fn record_offset(spool_dir: &std::path::Path, id: &str, offset: u64) {
    let p = spool_dir.join(format!("{id}.spool.offset"));
    // Atomic: a torn offset would read as 0 and replay old records over newer values. Its
    // fsync runs on a blocking thread, never on the workers serving the capture receiver.
    let path = p.clone();
    let done = tokio::task::spawn_blocking(move || {
        crate::util::write_atomic(&path, offset.to_string().as_bytes())
    })
    .await;
    match done {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, path = %p.display(), "cannot record the replay offset")
        }
        Err(e) => {
            tracing::warn!(error = %e, path = %p.display(), "cannot record the replay offset")
        }
    }
}

/// The replayed offset recorded for a spool file (0 when none was recorded).
fn replayed_offset(spool: &std::path::Path) -> u64 {
    let mut p = spool.as_os_str().to_owned();
    p.push(".offset");
    std::fs::read_to_string(std::path::PathBuf::from(p))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The shell command that makes a fresh portable backup of `rpc` into `dir` and prints
/// its size last (`du -sb`).
fn backup_cmd(rpc: &str, dir: &str) -> String {
    let q = shell_quote(dir);
    format!(
        "rm -rf {q} && mkdir -p {q} && nice -n 10 influxd backup -portable -host {} {q} 2>&1 && du -sb {q}",
        shell_quote(rpc)
    )
}

/// `s` as a literal in an extended regular expression (`pkill -f`).
fn regex_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.^$|?*+()[]{}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn du_bytes(out: &str) -> u64 {
    out.lines()
        .last()
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A free TCP port on 127.0.0.1 (bound and released: another process could take it
/// first, in which case the forward request fails and the caller falls back).
fn free_local_port() -> std::io::Result<std::net::SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// `url` with its port replaced (or added): `http://h:1/x` + 9 → `http://h:9/x`.
fn with_port(url: &str, port: u16) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    let (authority, path) = rest
        .find('/')
        .map(|i| rest.split_at(i))
        .unwrap_or((rest, ""));
    let host = match authority.rsplit_once(':') {
        Some((h, p))
            if !h.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && !authority.ends_with(']') =>
        {
            h
        }
        _ => authority,
    };
    format!("{scheme}://{host}:{port}{path}")
}

/// The watch receiver's port: the capture's plus one, or any free port when the capture's
/// is 0 (or the last one).
fn watch_port(capture: u16) -> u16 {
    match capture {
        0 => 0,
        p => p.checked_add(1).unwrap_or(0),
    }
}

/// Wait until a (new) InfluxDB answers an authenticated query: a VM that its stack calls
/// complete may still be starting it. Network trouble and 5xx are retried with backoff
/// until `timeout`; a refusal (wrong credentials, a 4xx) fails at once. A zero `timeout`:
/// one try, its own error.
async fn wait_ready(influx: &Influx, timeout: Duration) -> Result<(), MigrateError> {
    if timeout.is_zero() {
        return influx
            .databases()
            .await
            .map(|_| ())
            .map_err(|source| MigrateError::Influx {
                phase: Phase::Prepare,
                source,
            });
    }
    let mut retry =
        crate::util::Retry::new(Duration::from_millis(200), Duration::from_secs(5), timeout)
            .counting_from(tokio::time::Instant::now());
    loop {
        match influx.databases().await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_transient() => {
                let Some(wait) = retry.next() else {
                    return Err(MigrateError::TargetNotReady {
                        url: influx.url().to_string(),
                        timeout,
                        last: e.to_string(),
                    });
                };
                tracing::info!(url = %influx.url(), error = %e, "target InfluxDB not answering yet; waiting");
                tokio::time::sleep(wait).await;
            }
            Err(source) => {
                return Err(MigrateError::Influx {
                    phase: Phase::Prepare,
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod watch_port_tests {
    #[test]
    fn the_watch_receiver_listens_one_port_above_the_capture_or_anywhere() {
        assert_eq!(super::watch_port(8899), 8900);
        assert_eq!(super::watch_port(0), 0);
        assert_eq!(super::watch_port(u16::MAX), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_port_replaces_or_adds_the_port_and_keeps_the_rest() {
        assert_eq!(
            with_port("http://10.0.0.2:8899", 40000),
            "http://10.0.0.2:40000"
        );
        assert_eq!(
            with_port("http://so.example", 40000),
            "http://so.example:40000"
        );
        assert_eq!(with_port("https://[::1]:80/x", 9), "https://[::1]:9/x");
        assert_eq!(with_port("http://[::1]", 9), "http://[::1]:9");
    }
}
