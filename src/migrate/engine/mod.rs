//! The data migration from a source InfluxDB host to a target host, phase by phase:
//! prepare → capture → dump → transfer → restore → delta → cutover → verify → dispose.
//!
//! Layout: one module per phase (`prepare`, `capture`, `transfer` for dump, transfer and
//! restore, `replay` for the delta and every catch-up, `cutover`, `verify`, `dispose`,
//! `rollback`), each an `impl` block over the shared [`context`](self) of one migration;
//! `plan` decides, purely, which step comes next and what a failure undoes; this file
//! holds the public surface and the loop that runs the plan. The engine reports to two
//! separate parties: [`Progress`] (what a person watches) and [`Journaling`] (what a
//! restart needs, made durable before the engine goes on).
//!
//! Safety rules enforced here:
//! - nothing on the source is ever deleted (only our own subscription is dropped);
//! - any failure before cutover rolls back: our subscriptions are dropped, every database
//!   and user this migration created on the target is removed, scratch files are deleted;
//! - after cutover, a failure leaves both sides as they are and says where writers point;
//! - success is reported only after verification passed.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::spool::SpoolError;
use super::verify::VerifyReport;
use crate::config::{Config, InstanceConfig};
use crate::influx::InfluxError;
use crate::remote::{Host, Remote, RemoteError};

mod capture;
mod context;
mod cutover;
mod dispose;
mod guard;
mod plan;
mod prepare;
mod priority;
mod replay;
mod rollback;
mod transfer;
mod verify;

pub use capture::drop_leftover_subscriptions;
use context::Migration;
pub use priority::{give_back_after_crash, End};
pub use replay::{replay_catching_up, replay_ready, replay_spool_tail};

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
    /// An operator stopped the migration before its cutover ([`crate::migrate::abort`]).
    #[error("{phase}: aborted by {by}")]
    Aborted { phase: Phase, by: String },
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
            | MigrateError::Failed { phase, .. }
            | MigrateError::Aborted { phase, .. } => *phase,
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
    /// When the phase began, milliseconds since the Unix epoch (0 in reports written
    /// before it was recorded): lets a benchmark put a writer's latencies in their phase.
    #[serde(default)]
    pub started_unix_ms: u64,
}

/// Timing of one step inside a phase (the cutover's: its catch-ups, the watch
/// subscription, the target's aggregates, the command, the drain).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepTiming {
    pub step: String,
    pub seconds: f64,
}

/// One shard the dump streamed from the source's RPC port into the target's, in the order
/// the streams ended.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardStreamed {
    pub database: String,
    /// Its id on the source and on the target.
    pub shard: u64,
    pub target_shard: u64,
    pub bytes: u64,
    pub seconds: f64,
}

/// The steps of a phase as they end, each timed from the end of the one before.
pub(crate) struct Steps {
    at: std::time::Instant,
    done: Vec<StepTiming>,
}

impl Steps {
    pub(crate) fn start() -> Steps {
        Steps {
            at: std::time::Instant::now(),
            done: Vec::new(),
        }
    }

    /// `step` ended now.
    pub(crate) fn done(&mut self, step: &str) {
        let now = std::time::Instant::now();
        self.done.push(StepTiming {
            step: step.into(),
            seconds: (now - self.at).as_secs_f64(),
        });
        self.at = now;
    }

    /// `step` ended at `at` (not before the last step ended): a step that ran beside
    /// another, timed when it ended rather than when both had.
    pub(crate) fn done_at(&mut self, step: &str, at: std::time::Instant) {
        let at = at.max(self.at);
        self.done.push(StepTiming {
            step: step.into(),
            seconds: (at - self.at).as_secs_f64(),
        });
        self.at = at;
    }

    pub(crate) fn into_vec(self) -> Vec<StepTiming> {
        self.done
    }
}

/// `catch-up 0.12 s, command 6.03 s`: steps for a person to read.
pub fn describe_steps(steps: &[StepTiming]) -> String {
    steps
        .iter()
        .map(|s| format!("{} {:.2} s", s.step, s.seconds))
        .collect::<Vec<_>>()
        .join(", ")
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
    /// The drain after cutover ended on the source's counters' proof (with
    /// `cutover.synchronous`), not after `capture.quiet_period`.
    #[serde(default)]
    pub drain_proven: bool,
    /// The capture stopped at disposal on the counters' proof that everything the source
    /// took had arrived, not after the settle wait.
    #[serde(default)]
    pub capture_stop_proven: bool,
    /// The cutover's steps, in order (empty in reports written before they were timed):
    /// where a cutover's time goes on slow VMs.
    #[serde(default)]
    pub cutover_steps: Vec<StepTiming>,
    /// The shards streamed, in the order their streams ended (empty when the dump took
    /// another way): the shard group that ends last first, and where a writer's stall in
    /// the dump falls. Kept out of the journal and `--report` (each shard's line is in
    /// the log): the journal holds every migration's report, and a source may have
    /// hundreds of shards.
    #[serde(skip)]
    pub shards_streamed: Vec<ShardStreamed>,
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

/// What a person watching a migration sees (the CLI prints it, the daemon shows it in
/// `/status`, tests ignore it). Nothing here is needed to recover from a crash: that is
/// [`Journaling`].
pub trait Progress: Send + Sync {
    fn phase_started(&self, _phase: Phase) {}
    fn phase_done(&self, _phase: Phase, _took: Duration) {}
    fn note(&self, _msg: &str) {}
    /// The journal recorded a step of the migration outside the engine's phases: the
    /// migration itself, before its target stack is created (minutes on a cloud), the
    /// stack created, the old stack being deleted. The daemon shows the journal again.
    fn journaled(&self) {}
    /// The source failed to forward `writes` captured writes: the capture cannot be
    /// proven complete, and the migration stops (a metric and an alert for the daemon).
    fn capture_lost(&self, _writes: u64) {}
}

/// The points of a migration that a restart must know about, recorded durably before the
/// engine goes on: each phase begun and done, and above all the repoint of the writers,
/// which decides whether a crash may roll the target back.
/// [`machine`](super::machine) writes them to the service's journal; a migration run
/// outside the orchestrator ([`run`]) records nothing ([`Unjournaled`]).
pub trait Journaling: Send + Sync {
    fn phase_started(&self, phase: Phase);
    fn phase_done(&self, phase: Phase, took: Duration);
    /// The writers are about to be repointed to the target: from here on a failure or a
    /// crash must not roll the target back. An error stops the cutover before its
    /// command runs: unrecorded, a crash would look like "never repointed" and roll back
    /// a target that writers use.
    fn writers_repointing(&self) -> Result<(), String>;
    /// The cutover command succeeded.
    fn writers_repointed(&self);
    /// An operator's abort stopped the migration in `phase`; the rollback follows.
    fn aborted(&self, _phase: Phase, _by: &str) {}
    /// About to create `object` on the target. An error stops the migration before it
    /// is created: unrecorded, a rollback after a crash could not remove it.
    fn target_creating(&self, object: &TargetObject) -> Result<(), String>;
    /// About to lower `end`'s `influxd` to nice `nice` (`migration.idle_nice`). An error
    /// leaves it as it is: unrecorded, settling after a crash would not give it back.
    fn idle_lowering(&self, _end: End, _nice: u8) -> Result<(), String> {
        Ok(())
    }
    /// `end`'s `influxd` has its priority back (or was never lowered).
    fn idle_restored(&self, _end: End) {}
}

/// Something a migration creates on its target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "name", rename_all = "snake_case")]
pub enum TargetObject {
    /// A database (restored with its retention policies, shards and subscriptions).
    Database(String),
    /// A user (with its grants).
    User(String),
}

/// Records nothing: a migration run by hand, a test or the benchmark, with no journal
/// and no recovery.
pub struct Unjournaled;
impl Journaling for Unjournaled {
    fn phase_started(&self, _phase: Phase) {}
    fn phase_done(&self, _phase: Phase, _took: Duration) {}
    fn writers_repointing(&self) -> Result<(), String> {
        Ok(())
    }
    fn writers_repointed(&self) {}
    fn target_creating(&self, _object: &TargetObject) -> Result<(), String> {
        Ok(())
    }
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
    run_with(cfg, target, progress, &Unjournaled, RunOptions::default())
        .await
        .map_err(|(e, _)| e)
}

/// How [`run_with`] runs.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Migration id (also names the capture subscription); default: the current time.
    pub id: Option<String>,
    /// Resume a migration interrupted past its repoint, whose data is already on the
    /// target: capture again, repoint the writers again, drain, verify. No dump or restore.
    pub resume: Option<Resume>,
    /// The target was just created (a stack provider's new VM): `prepare` waits up to
    /// `migration.target_ready_timeout` for its InfluxDB to answer. Otherwise (a static
    /// target that should be up) one try, and an error at once.
    pub new_target: bool,
    /// An operator's abort: before the repoint it stops the step in progress and rolls
    /// back; from the repoint on it is refused. None: nobody can abort this run.
    pub abort: Option<crate::migrate::abort::Abort>,
}

/// What a resumed run takes over from the runs that were interrupted before it.
#[derive(Debug, Clone)]
pub struct Resume {
    /// The interrupted runs' captures, oldest first (the migration itself, then each
    /// resume that was interrupted in turn).
    pub earlier: Vec<EarlierCapture>,
}

/// The capture of an interrupted run.
#[derive(Debug, Clone)]
pub struct EarlierCapture {
    /// Its spool: what was not replayed yet is replayed, in order, before anything new.
    pub spool: std::path::PathBuf,
    /// Its capture subscription, and the points its spool holds. Once the new capture is
    /// live, every write that subscription failed to forward in between reached the
    /// source but no spool: then the run stops, safely. A subscription already gone was
    /// checked and dropped by a later run.
    pub subscription: String,
    pub spooled_points: u64,
}

/// Run a migration; on failure also return the report so far (its `cutover_done` says
/// whether writers may already use the target, which decides between rollback and
/// leaving everything in place).
pub async fn run_with(
    cfg: &Config,
    target: &InstanceConfig,
    progress: &dyn Progress,
    journal: &dyn Journaling,
    opts: RunOptions,
) -> Result<Report, (MigrateError, Box<Report>)> {
    let mut m = Migration::new(cfg, target);
    m.progress = progress;
    m.journal = journal;
    m.plan = plan::Plan {
        resume: opts.resume.is_some(),
    };
    // A resumed run starts past the repoint: writers may use the target from the start.
    m.report.cutover_done = opts.resume.is_some();
    m.resume = opts.resume;
    m.abort = opts.abort.unwrap_or_default();
    if m.report.cutover_done {
        // Past an earlier repoint already: nothing to abort.
        let _ = m.abort.close();
    }
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
    let r = m.run_plan().await;
    m.report.total_seconds = start.elapsed().as_secs_f64();
    match r {
        Ok(()) => Ok(m.report),
        Err(e) => {
            m.on_failure(&e).await;
            Err((e, Box::new(m.report)))
        }
    }
}

impl Migration<'_> {
    /// Run the plan's steps in order; the first error stops it.
    async fn run_plan(&mut self) -> Result<(), MigrateError> {
        let mut step = Some(plan::Plan::FIRST);
        while let Some(s) = step {
            self.run_step(s).await?;
            step = self.plan.next(s);
        }
        Ok(())
    }

    /// One step, journaled, shown and timed under its phase.
    async fn run_step(&mut self, step: plan::Step) -> Result<(), MigrateError> {
        use plan::Step;
        let phase = step.phase();
        let t = Instant::now();
        let started_unix_ms = crate::util::now_ms();
        self.journal.phase_started(phase);
        self.progress.phase_started(phase);
        let abort = self.abort.clone();
        let run = async {
            if step != Step::Prepare {
                crate::util::fault_hold(&phase.to_string()).await;
            }
            match step {
                Step::Prepare => self.prepare().await,
                Step::Capture => self.capture().await,
                Step::CheckInterrupted => self.check_interrupted().await,
                Step::Dump => self.dump().await,
                Step::Transfer => self.transfer().await,
                Step::Restore => self.restore().await,
                Step::Delta => self.delta().await,
                Step::Cutover => self.cutover().await,
                Step::Verify => self.verify().await,
                Step::Dispose => self.dispose().await,
            }
        };
        // An accepted abort cuts the step short wherever it waits: only possible before
        // the repoint ([`Abort::close`] refuses it after), so the rollback that follows
        // undoes it like any failure; commands the step left running on a host are
        // stopped there ([`Migration::stop_scratch_users`]).
        let r = tokio::select! {
            biased;
            by = abort.requested() => Err(MigrateError::Aborted { phase, by }),
            r = run => r,
        };
        if let Err(MigrateError::Aborted { by, .. }) = &r {
            self.journal.aborted(phase, by);
            self.progress
                .note(&format!("aborted by {by} during {phase}: rolling back"));
        }
        self.report.phases.push(PhaseTiming {
            phase,
            seconds: t.elapsed().as_secs_f64(),
            started_unix_ms,
        });
        r?;
        self.journal.phase_done(phase, t.elapsed());
        self.progress.phase_done(phase, t.elapsed());
        Ok(())
    }
}
