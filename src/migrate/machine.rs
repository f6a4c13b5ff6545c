//! The whole migration of a service, journaled (DESIGN.md §3 phases 1–10): create the
//! target stack, run the data engine (capture … verify), delete the old stack, reset.
//!
//! Every step is announced in the journal before its side effect and confirmed after it.
//! A restart reads the journal and settles an unfinished migration before anything else
//! ([`recover`]): before cutover it rolls back (the target stack goes, the source never
//! changed); after verification it finishes the disposal; in between, writers may use the
//! target, so nothing is deleted and the migration resumes from the cutover.
//! One migration per service at a time: an `flock`ed lock file, which a crashed holder
//! releases by dying.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use super::abort::Abort;
use super::engine::{
    self, EarlierCapture, Journaling, MigrateError, Phase, Progress, Report, Resume, RunOptions,
    TargetObject,
};
use super::journal::{Event, Journal, JournalError, JournalState, Outcome, Placement, Recovery};
use crate::config::{Config, InstanceConfig, ProviderKind};
use crate::influx::Influx;
use crate::stack::local::LocalStacks;
use crate::stack::{StackError, StackProvider, StackRef, StackSpec};

#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    #[error("another migration of this service is running (lock {0} is held)")]
    Busy(PathBuf),
    #[error("lock {path}: {source}")]
    Lock {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("prepare: creating the target stack: {0}")]
    Stack(#[source] StackError),
    #[error("rolled back, the service stays on {source_url}: {error}")]
    RolledBack {
        source_url: String,
        error: Box<MigrateError>,
    },
    #[error("failed after cutover; nothing was deleted, writers may use {target_url} and the source {source_url} keeps all its data: {error}")]
    AfterCutover {
        source_url: String,
        target_url: String,
        error: Box<MigrateError>,
    },
    #[error(
        "dispose: the data is verified on {target_url}, but deleting the old stack failed: {error}"
    )]
    Dispose {
        target_url: String,
        error: StackError,
    },
    #[error("migration {id} failed after cutover and nobody has said where the service runs now (writers may use {target_url}, the source {source_url} keeps its data); check, then run `stateshift resolve -c FILE --on source|target`")]
    NeedsOperator {
        id: String,
        source_url: String,
        target_url: String,
    },
    #[error("the data is verified on {target_url}, but {detail}; the old stack {stack} is kept: copy what only it holds, then run `stateshift resolve -c FILE --on target` and delete it by hand")]
    LateWrites {
        target_url: String,
        stack: String,
        detail: String,
    },
    /// The configuration cannot run (checked before anything changes).
    #[error("{0}")]
    Config(String),
    /// Settling an interrupted migration did not finish; it is tried again at the next start
    /// (the daemon tries every poll interval).
    #[error("settling migration {id}: {detail}")]
    Unsettled { id: String, detail: String },
    /// The request does not apply to the journal's state.
    #[error("{0}")]
    Refused(String),
    /// An interrupted migration was found and settled; no new migration was started
    /// (settling is its own step: the operator sees its outcome before anything else).
    #[error("{}", settled_message(id, *outcome, on))]
    Settled {
        id: String,
        outcome: Outcome,
        /// Where the service runs now.
        on: String,
    },
}

fn settled_message(id: &str, outcome: Outcome, on: &str) -> String {
    match outcome {
        Outcome::Succeeded => format!("an interrupted migration ({id}) was found and finished: verified, the service runs on {on}; no new migration was started"),
        Outcome::RolledBack => format!("an interrupted migration ({id}) was found and rolled back: the service stays on {on} and what the migration made on its target is removed; no new migration was started, run the migration again to move the service"),
        Outcome::Failed => format!("an interrupted migration ({id}) was found and failed after cutover; no new migration was started: run `stateshift status`, then `stateshift resolve`"),
    }
}

impl MachineError {
    /// Who aborted the migration, when an operator's abort rolled it back.
    pub fn aborted_by(&self) -> Option<&str> {
        match self {
            MachineError::RolledBack { error, .. } => match error.as_ref() {
                MigrateError::Aborted { by, .. } => Some(by),
                _ => None,
            },
            _ => None,
        }
    }

    /// The engine phase that failed, when the engine failed.
    pub fn phase(&self) -> Option<Phase> {
        match self {
            MachineError::RolledBack { error, .. } | MachineError::AfterCutover { error, .. } => {
                Some(error.phase())
            }
            MachineError::Stack(_) => Some(Phase::Prepare),
            _ => None,
        }
    }
}

/// The configured stack provider.
pub enum Provider {
    /// No stacks: the configured `target` is the target.
    Static,
    Local(LocalStacks),
    Heat(Box<crate::stack::heat::Heat>),
}

impl Provider {
    pub fn from_config(cfg: &Config) -> Result<Provider, MachineError> {
        Ok(match cfg.provider.kind {
            ProviderKind::Static => Provider::Static,
            ProviderKind::Local => Provider::Local(
                LocalStacks::new(&cfg.provider.local_dir, cfg.provider.local_subnet)
                    .map_err(|e| MachineError::Config(e.to_string()))?,
            ),

            ProviderKind::Heat => {
                let h = cfg
                    .provider
                    .heat
                    .clone()
                    .ok_or_else(|| MachineError::Config("provider.heat is missing".into()))?;
                Provider::Heat(Box::new(
                    crate::stack::heat::Heat::new(h)
                        .map_err(|e| MachineError::Config(e.to_string()))?,
                ))
            }
        })
    }

    async fn create(
        &self,
        spec: &StackSpec,
    ) -> Result<Option<(StackRef, crate::stack::StackOutputs)>, StackError> {
        match self {
            Provider::Static => Ok(None),
            Provider::Local(p) => p.create(spec).await.map(Some),
            Provider::Heat(p) => p.create(spec).await.map(Some),
        }
    }

    pub async fn delete(&self, stack: &StackRef, timeout: Duration) -> Result<(), StackError> {
        match self {
            Provider::Static => Ok(()),
            Provider::Local(p) => p.delete(stack, timeout).await,
            Provider::Heat(p) => p.delete(stack, timeout).await,
        }
    }

    async fn find(&self, name: &str) -> Result<Option<StackRef>, StackError> {
        match self {
            Provider::Static => Ok(None),
            Provider::Local(p) => p.find(name).await,
            Provider::Heat(p) => p.find(name).await,
        }
    }

    /// [`Provider::find`], or what a crash left of the stack: a local stack's directory
    /// without state (a create or a delete cut short) is found too, so that deleting it
    /// removes it. Heat keeps a stack's record until its delete completes.
    async fn find_or_remains(&self, name: &str) -> Result<Option<StackRef>, StackError> {
        match (self.find(name).await?, self) {
            (Some(s), _) => Ok(Some(s)),
            (None, Provider::Local(l)) if l.has_remains(name) => Ok(Some(StackRef {
                id: String::new(),
                name: name.to_string(),
            })),
            (None, _) => Ok(None),
        }
    }

    /// How to reach the InfluxDB of the service's source placement (by default the
    /// configured `source`).
    pub fn source_instance(&self, cfg: &Config, p: &Placement) -> InstanceConfig {
        self.instance(cfg, p, &cfg.source)
    }

    /// How to reach the InfluxDB of a migration's target placement (by default the
    /// configured `target`, else the `source`'s settings).
    pub fn target_instance(&self, cfg: &Config, p: &Placement) -> InstanceConfig {
        let fallback = cfg.target.as_ref().unwrap_or(&cfg.source);
        self.instance(cfg, p, fallback)
    }

    /// How to reach the InfluxDB of a placement.
    pub fn instance(
        &self,
        cfg: &Config,
        p: &Placement,
        fallback: &InstanceConfig,
    ) -> InstanceConfig {
        match (self, &p.stack, &p.outputs) {
            // Static: the configured target once the service runs there.
            (Provider::Static, _, _) => match &cfg.target {
                Some(t) if t.influx_url == p.influx_url => t.clone(),
                _ => fallback.clone(),
            },
            (Provider::Local(l), Some(s), Some(o)) => l.reach(s, o, &reach_defaults(cfg)),
            (Provider::Heat(h), Some(s), Some(o)) => h.reach(s, o, &reach_defaults(cfg)),
            _ => fallback.clone(),
        }
        .with_name_of(cfg, p)
    }
}

/// What a provider does not know about the InfluxDB of the stacks it creates: the
/// service's credentials, work directory and timeout, and the SSH user and key
/// (`provider.ssh`).
fn reach_defaults(cfg: &Config) -> InstanceConfig {
    InstanceConfig {
        ssh: cfg.provider.ssh.clone(),
        ..cfg.source.clone()
    }
}

impl InstanceConfig {
    fn with_name_of(mut self, _cfg: &Config, p: &Placement) -> InstanceConfig {
        if let Some(s) = &p.stack {
            self.name = s.name.clone();
        }
        self
    }
}

/// The service's paths under `migration.work_dir`.
pub struct Paths {
    pub journal: PathBuf,
    pub lock: PathBuf,
}

impl Paths {
    pub fn of(cfg: &Config) -> Paths {
        let d = &cfg.migration.work_dir;
        Paths {
            journal: d.join(format!("{}.journal", cfg.service.name)),
            lock: d.join(format!("{}.lock", cfg.service.name)),
        }
    }
}

/// The held per-service lock.
pub struct Lock(#[allow(dead_code)] std::fs::File);

pub fn lock(path: &Path) -> Result<Lock, MachineError> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(|source| MachineError::Lock {
            path: path.into(),
            source,
        })?;
    }
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|source| MachineError::Lock {
            path: path.into(),
            source,
        })?;
    match f.try_lock() {
        Ok(()) => Ok(Lock(f)),
        Err(std::fs::TryLockError::WouldBlock) => Err(MachineError::Busy(path.into())),
        Err(std::fs::TryLockError::Error(source)) => Err(MachineError::Lock {
            path: path.into(),
            source,
        }),
    }
}

/// The journal state of the service.
pub fn state(cfg: &Config) -> Result<JournalState, MachineError> {
    Ok(JournalState::from_records(&Journal::load(
        &Paths::of(cfg).journal,
    )?))
}

/// Where the service runs now: the last verified target, else the configured source.
pub fn current_source(cfg: &Config, st: &JournalState) -> Placement {
    st.current().unwrap_or_else(|| Placement {
        stack: cfg.service.stack.as_ref().map(|n| StackRef {
            id: String::new(),
            name: n.clone(),
        }),
        outputs: None,
        influx_url: cfg.source.influx_url.clone(),
    })
}

/// Where the writers point now: like [`current_source`], but already the target once a
/// running migration's cutover command has succeeded (what a probe of the service follows).
pub fn writers_source(cfg: &Config, st: &JournalState) -> Placement {
    match st.writers_on() {
        Some(p) => p,
        None => current_source(cfg, &JournalState::default()),
    }
}

/// The engine's journal points, in the service's journal under one migration id, each
/// followed by its crash point (the crash tests die right after a record).
struct Journaled<'a> {
    journal: &'a Mutex<Journal>,
    id: &'a str,
}

impl Journaled<'_> {
    fn append(&self, e: Event) -> Result<(), JournalError> {
        self.journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .append(self.id, e)
    }
    fn append_or_log(&self, e: Event) {
        if let Err(err) = self.append(e) {
            tracing::error!(error = %err, "cannot write the journal");
        }
    }
}

impl Journaling for Journaled<'_> {
    fn phase_started(&self, phase: Phase) {
        self.append_or_log(Event::PhaseStarted { phase });
        crash_point(&format!("{phase}:started"));
    }
    fn phase_done(&self, phase: Phase, took: Duration) {
        self.append_or_log(Event::PhaseDone {
            phase,
            seconds: took.as_secs_f64(),
        });
        crash_point(&format!("{phase}:done"));
    }
    fn writers_repointing(&self) -> Result<(), String> {
        self.append(Event::WritersRepointing).map_err(|e| {
            format!(
                "cannot record the repoint in the journal, so the writers were not repointed: {e}"
            )
        })?;
        crash_point("writers_repointing");
        Ok(())
    }
    fn writers_repointed(&self) {
        self.append_or_log(Event::WritersRepointed);
        crash_point("writers_repointed");
    }
    fn aborted(&self, phase: Phase, by: &str) {
        self.append_or_log(Event::AbortRequested {
            phase,
            by: by.to_string(),
        });
        crash_point("abort_requested");
    }
    fn target_creating(&self, object: &TargetObject) -> Result<(), String> {
        self.append(Event::TargetCreating {
            object: object.clone(),
        })
        .map_err(|e| format!("cannot record in the journal what is about to be created on the target, so it was not created: {e}"))?;
        crash_point("target_creating");
        Ok(())
    }
    fn idle_lowering(&self, end: engine::End, nice: u8) -> Result<(), String> {
        self.append(Event::IdleLowering { side: end, nice })
            .map_err(|e| format!("cannot record the lowering in the journal: {e}"))
    }
    fn idle_restored(&self, end: engine::End) {
        self.append_or_log(Event::IdleRestored { side: end });
    }
}

/// Fault injection for the crash tests: with `STATESHIFT_CRASH_AT=<point>` the process
/// dies at once (SIGKILL-like: no destructor, no cleanup) right after that journal point.
fn crash_point(point: &str) {
    if std::env::var("STATESHIFT_CRASH_AT").ok().as_deref() == Some(point) {
        eprintln!("stateshift: STATESHIFT_CRASH_AT={point}: dying here");
        std::process::abort();
    }
}

fn new_id() -> String {
    crate::util::now_ms().to_string()
}

/// Migrate the service now, and return the engine's report. An unfinished migration is
/// settled first and nothing else starts: [`MachineError::Settled`] says what was found
/// and done.
pub async fn migrate(
    cfg: &Config,
    provider: &Provider,
    trigger: &str,
    progress: &dyn Progress,
) -> Result<Report, MachineError> {
    migrate_abortable(cfg, provider, trigger, progress, &Abort::new()).await
}

/// [`migrate`], which `abort` can stop before its cutover ([`crate::migrate::abort`]).
pub async fn migrate_abortable(
    cfg: &Config,
    provider: &Provider,
    trigger: &str,
    progress: &dyn Progress,
    abort: &Abort,
) -> Result<Report, MachineError> {
    let held = lock(&Paths::of(cfg).lock)?;
    migrate_holding(&held, cfg, provider, trigger, progress, abort).await
}

/// [`migrate`] for a caller that already holds the service's lock (taken with [`lock`] on
/// [`Paths::lock`]) and did something that must not interleave with another migration
/// before it (the CLI's availability probe creates its database on the source).
pub async fn migrate_holding(
    _held: &Lock,
    cfg: &Config,
    provider: &Provider,
    trigger: &str,
    progress: &dyn Progress,
    abort: &Abort,
) -> Result<Report, MachineError> {
    let paths = Paths::of(cfg);
    if state(cfg)?.recovery() != Recovery::Nothing {
        abort.settling();
    }
    if let Some(outcome) = recover_locked(cfg, provider, progress).await? {
        let st = state(cfg)?;
        return Err(MachineError::Settled {
            id: st
                .migrations
                .last()
                .map(|m| m.id.clone())
                .unwrap_or_default(),
            outcome,
            on: current_source(cfg, &st).influx_url,
        });
    }
    let st = state(cfg)?;
    if let Some(m) = st.needs_operator() {
        return Err(MachineError::NeedsOperator {
            id: m.id.clone(),
            source_url: m
                .source
                .as_ref()
                .map(|p| p.influx_url.clone())
                .unwrap_or_default(),
            target_url: m
                .target
                .as_ref()
                .map(|p| p.influx_url.clone())
                .unwrap_or_default(),
        });
    }
    let source = current_source(cfg, &st);
    let journal = Mutex::new(Journal::open(&paths.journal)?);
    let id = new_id();
    let append = |e: Event| -> Result<(), MachineError> {
        journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .append(&id, e)?;
        Ok(())
    };
    if let (Provider::Static, Some(t)) = (provider, cfg.target.as_ref()) {
        if t.influx_url.trim_end_matches('/') == source.influx_url.trim_end_matches('/') {
            return Err(MachineError::Refused(format!(
                "the service already runs on the configured target {} (a migration moved it there); name another host in target: to move it again",
                t.influx_url
            )));
        }
    }
    append(Event::Started {
        trigger: trigger.into(),
        source: source.clone(),
    })?;
    crash_point("started");

    // Phase 1: the target stack.
    let name = format!("{}-influx-{id}", cfg.service.name);
    append(Event::StackCreating { name: name.clone() })?;
    progress.journaled();
    progress.note(&format!("creating the target stack {name}"));
    let spec = target_spec(cfg, name.clone());
    let created = tokio::select! {
        biased;
        by = abort.requested() => Err(by),
        r = async {
            crate::util::fault_hold("target_stack").await;
            provider.create(&spec).await
        } => Ok(r),
    };
    let created = match created {
        Ok(r) => r,
        Err(by) => {
            // Cut short while the stack is being created: what exists of it goes, as
            // after a failed create; until it is gone the journal stays at "creating".
            append(Event::AbortRequested {
                phase: Phase::Prepare,
                by: by.clone(),
            })?;
            crash_point("abort_requested");
            progress.journaled();
            let error = MigrateError::Aborted {
                phase: Phase::Prepare,
                by,
            };
            progress.note(&format!("{error}: deleting the target stack {name}"));
            if let Err(why) = delete_leftover(cfg, provider, &name).await {
                progress.note(&format!(
                    "the target stack {name} may be left behind ({why}); the next run deletes it"
                ));
                return Err(MachineError::RolledBack {
                    source_url: source.influx_url,
                    error: Box::new(error),
                });
            }
            append(Event::Finished {
                outcome: Outcome::RolledBack,
                error: Some(error.to_string()),
                report: None,
            })?;
            return Err(MachineError::RolledBack {
                source_url: source.influx_url,
                error: Box::new(error),
            });
        }
    };
    let target = match created {
        Ok(Some((stack, outputs))) => Placement {
            influx_url: outputs.influxdb_url.clone(),
            stack: Some(stack),
            outputs: Some(outputs),
        },
        Ok(None) => {
            let t = cfg.target.as_ref().ok_or_else(|| {
                MachineError::Config("provider.kind is static but no target is configured".into())
            })?;
            Placement {
                stack: None,
                outputs: None,
                influx_url: t.influx_url.clone(),
            }
        }
        Err(e) => {
            // A failed create may have left the stack behind: Heat may have stored a
            // create whose reply was lost, or kept creating after the provider's own
            // cleanup failed (Heat down mid-create). "Rolled back" is journaled only once
            // no stack of this name exists; otherwise the journal stays at "creating" and
            // the next run's recovery deletes it by name. A duplicate name is not ours.
            if !matches!(e, StackError::Duplicate { .. }) {
                if let Err(why) = delete_leftover(cfg, provider, &name).await {
                    tracing::warn!(stack = %name, error = %e, %why,
                        "the failed create may have left the target stack behind; the next run looks for it by name and deletes it");
                    progress.note(&format!(
                        "the target stack {name} may be left behind ({why}); the next run deletes it"
                    ));
                    return Err(MachineError::Stack(e));
                }
            }
            append(Event::Finished {
                outcome: Outcome::RolledBack,
                error: Some(e.to_string()),
                report: None,
            })?;
            return Err(MachineError::Stack(e));
        }
    };
    append(Event::StackCreated {
        target: target.clone(),
    })?;
    crash_point("stack_created");
    progress.journaled();
    progress.note(&format!(
        "target stack {name} ready at {}",
        target.influx_url
    ));
    // Phases 2–8 (and the capture's end): the data engine, on the current source.
    let result = run_engine(
        cfg,
        provider,
        &journal,
        &id,
        (&source, &target),
        RunOptions {
            id: Some(id.clone()),
            abort: Some(abort.clone()),
            ..RunOptions::default()
        },
        progress,
    )
    .await;
    finish(
        cfg, provider, &journal, &id, source, target, result, progress,
    )
    .await
}

/// Run the data engine from `source` to `target` (the placements' instances) under the
/// journal of migration `id`. A target with a stack was just created: its InfluxDB gets
/// `migration.target_ready_timeout` to answer.
#[allow(clippy::too_many_arguments)]
async fn run_engine(
    cfg: &Config,
    provider: &Provider,
    journal: &Mutex<Journal>,
    id: &str,
    (source, target): (&Placement, &Placement),
    opts: RunOptions,
    progress: &dyn Progress,
) -> Result<Report, (MigrateError, Box<Report>)> {
    let mut ecfg = cfg.clone();
    ecfg.source = provider.source_instance(cfg, source);
    let target_inst = provider.target_instance(cfg, target);
    let opts = RunOptions {
        new_target: target.stack.is_some(),
        ..opts
    };
    engine::run_with(
        &ecfg,
        &target_inst,
        progress,
        &Journaled { journal, id },
        opts,
    )
    .await
}

/// The target stack a migration of this service creates.
fn target_spec(cfg: &Config, name: String) -> StackSpec {
    StackSpec {
        name,
        template: cfg.provider.template.clone(),
        parameters: cfg.provider.parameters.clone(),
        secret_parameters: cfg.provider.secret_parameters.clone(),
        environment_files: cfg.provider.environment_files.clone(),
        timeout: cfg.provider.create_timeout,
    }
}

/// Make sure no stack named `name` is left after a failed create: find it, delete it.
async fn delete_leftover(cfg: &Config, provider: &Provider, name: &str) -> Result<(), String> {
    match provider.find(name).await {
        Ok(None) => Ok(()),
        Ok(Some(s)) => provider
            .delete(&s, cfg.provider.delete_timeout)
            .await
            .map_err(|e| format!("deleting it failed: {e}")),
        Err(e) => Err(format!("looking for it failed: {e}")),
    }
}

/// After the engine: roll back, keep everything, or dispose of the old stack.
#[allow(clippy::too_many_arguments)]
async fn finish(
    cfg: &Config,
    provider: &Provider,
    journal: &Mutex<Journal>,
    id: &str,
    source: Placement,
    target: Placement,
    result: Result<Report, (MigrateError, Box<Report>)>,
    progress: &dyn Progress,
) -> Result<Report, MachineError> {
    let append = |e: Event| -> Result<(), MachineError> {
        journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .append(id, e)?;
        Ok(())
    };
    match result {
        Err((error, report)) if !report.cutover_done => {
            if let Some(stack) = &target.stack {
                if let Err(e) = provider.delete(stack, cfg.provider.delete_timeout).await {
                    tracing::error!(error = %e, stack = %stack.name, "could not delete the half-made target stack");
                }
            }
            append(Event::Finished {
                outcome: Outcome::RolledBack,
                error: Some(error.to_string()),
                report: Some(report),
            })?;
            Err(MachineError::RolledBack {
                source_url: source.influx_url,
                error: Box::new(error),
            })
        }
        Err((error, report)) => {
            append(Event::Finished {
                outcome: Outcome::Failed,
                error: Some(error.to_string()),
                report: Some(report),
            })?;
            Err(MachineError::AfterCutover {
                source_url: source.influx_url,
                target_url: target.influx_url,
                error: Box::new(error),
            })
        }
        Ok(report) => {
            // A write that reached the old InfluxDB after the capture stopped is only there.
            crate::util::fault_hold("old_stack").await;
            if let Some(old) = &source.stack {
                let src = Influx::from_config(&provider.source_instance(cfg, &source));
                if let Some(detail) = late_writes(
                    &src,
                    &source.influx_url,
                    report.source_writes_at_capture_stop,
                )
                .await
                {
                    let err = MachineError::LateWrites {
                        target_url: target.influx_url.clone(),
                        stack: old.name.clone(),
                        detail,
                    };
                    append(Event::Finished {
                        outcome: Outcome::Failed,
                        error: Some(err.to_string()),
                        report: Some(Box::new(report)),
                    })?;
                    return Err(err);
                }
            }
            // Phase 9: only now, after verification, the old stack goes.
            append(Event::OldStackDeleting)?;
            crash_point("old_stack_deleting");
            progress.journaled();
            delete_old_stack(
                cfg, provider, journal, id, &source, &target, report, progress,
            )
            .await
        }
    }
}

/// Phases 9 and 10 once the old stack's deletion is journaled: delete it (found by name:
/// a deletion interrupted halfway finishes), record the reset and the success, and remove
/// the spools of the migration's runs.
#[allow(clippy::too_many_arguments)]
async fn delete_old_stack(
    cfg: &Config,
    provider: &Provider,
    journal: &Mutex<Journal>,
    id: &str,
    source: &Placement,
    target: &Placement,
    report: Report,
    progress: &dyn Progress,
) -> Result<Report, MachineError> {
    let append = |e: Event| -> Result<(), MachineError> {
        journal
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .append(id, e)?;
        Ok(())
    };
    if let Some(old) = &source.stack {
        // Found by name: a deletion cut short by a crash may have left only remains.
        let old = match provider.find_or_remains(&old.name).await {
            Ok(Some(found)) => Some(found),
            Ok(None) => None,
            Err(e) => {
                return Err(MachineError::Dispose {
                    target_url: target.influx_url.clone(),
                    error: e,
                })
            }
        };
        if let Some(old) = old {
            progress.note(&format!("deleting the old stack {}", old.name));
            provider
                .delete(&old, cfg.provider.delete_timeout)
                .await
                .map_err(|error| MachineError::Dispose {
                    target_url: target.influx_url.clone(),
                    error,
                })?;
        }
    }
    append(Event::OldStackDeleted)?;
    // Phase 10: the caller resets its monitoring window on success.
    append(Event::WindowReset)?;
    append(Event::Finished {
        outcome: Outcome::Succeeded,
        error: None,
        report: Some(Box::new(report.clone())),
    })?;
    // The spools of interrupted runs of this migration: everything in them is on
    // the verified target now.
    for rid in capture_runs(cfg, id) {
        let spool = cfg.capture.spool_dir.join(format!("{rid}.spool"));
        let _ = std::fs::remove_file(format!("{}.offset", spool.display()));
        let _ = std::fs::remove_file(spool);
    }
    Ok(report)
}

/// Why the old stack must be kept, if it must: the source acknowledged writes after the
/// capture stopped (`at_stop`: its count then), or its count cannot be read to prove it
/// did not.
async fn late_writes(src: &Influx, url: &str, at_stop: Option<u64>) -> Option<String> {
    let Some(at_stop) = at_stop else {
        return Some(format!(
            "the write counters of the old InfluxDB {url} could not be read when the capture stopped, so no write after it can be ruled out"
        ));
    };
    match src.http_points_written().await {
        Ok(now) if now > at_stop => Some(format!(
            "{} point(s) reached the old InfluxDB {url} after the capture stopped (a writer still using it); they are not on the target",
            now - at_stop
        )),
        // A restart resets the count: nothing can be proven then either.
        Ok(now) if now < at_stop => Some(format!(
            "the old InfluxDB {url} restarted after the capture stopped (its write count went from {at_stop} to {now}), so no write after it can be ruled out"
        )),
        Ok(_) => None,
        Err(e) => Some(format!(
            "the write counters of the old InfluxDB {url} cannot be read ({e}), so no write after the capture stopped can be ruled out"
        )),
    }
}

/// Settle an unfinished migration left by a crash (takes the lock).
pub async fn recover(
    cfg: &Config,
    provider: &Provider,
    progress: &dyn Progress,
) -> Result<Option<Outcome>, MachineError> {
    let _lock = lock(&Paths::of(cfg).lock)?;
    recover_locked(cfg, provider, progress).await
}

async fn recover_locked(
    cfg: &Config,
    provider: &Provider,
    progress: &dyn Progress,
) -> Result<Option<Outcome>, MachineError> {
    let paths = Paths::of(cfg);
    let st = state(cfg)?;
    let decision = st.recovery();
    if decision == Recovery::Nothing {
        return Ok(None);
    }
    let journal = Mutex::new(Journal::open(&paths.journal)?);
    let interrupted = st.migrations.last().cloned().unwrap_or_default();
    match decision {
        Recovery::Nothing => Ok(None),
        Recovery::RollBack {
            id,
            target,
            creating,
            made_on_target,
            source,
        } => {
            progress.note(&format!("recovering migration {id}: interrupted before cutover, rolling back (the source never changed)"));
            // The real world first: the target stack, by reference or by the name it was
            // being created under.
            let stack = match (target.as_ref().and_then(|t| t.stack.clone()), creating) {
                (Some(t), _) => Some(t),
                (None, Some(name)) => provider
                    .find_or_remains(&name)
                    .await
                    .map_err(MachineError::Stack)?,
                _ => None,
            };
            let target_stays = stack.is_none();
            if let Some(s) = stack {
                provider
                    .delete(&s, cfg.provider.delete_timeout)
                    .await
                    .map_err(MachineError::Stack)?;
            } else if let Some(t) = &target {
                // No stack to delete with everything in it (a static target): remove
                // exactly what the migration recorded it was making there.
                undo_on_target(cfg, provider, t, &id, &made_on_target, progress)
                    .await
                    .map_err(|detail| MachineError::Unsettled {
                        id: id.clone(),
                        detail,
                    })?;
            }
            // Our capture subscription on the source, if it was created.
            let src = provider.source_instance(cfg, &source);
            drop_our_subscriptions(cfg, &Influx::from_config(&src), &id, true).await;
            // A streamed dump the killed process started on the source goes on without it,
            // on the live service's disk: stop it and remove what it wrote.
            let dump = format!("{}/dump-{id}", src.work_dir.trim_end_matches('/'));
            use crate::remote::Remote;
            // (Two commands: one naming the directory would be stopped by the first.)
            let cleaned = match crate::remote::Host::connect(src.ssh.as_ref()).await {
                Ok(h) => match h.run(&crate::util::stop_processes_naming(&dump)).await {
                    Ok(_) => h
                        .run(&format!("rm -rf {}", crate::util::shell_quote(&dump)))
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(e.to_string()),
            };
            if let Err(e) = cleaned {
                tracing::warn!(error = %e, dir = %dump, "could not clean the interrupted migration's dump directory on the source");
            }
            give_back_idle(
                cfg,
                provider,
                &journal,
                &interrupted,
                [true, target_stays],
                progress,
            )
            .await;
            journal.lock().unwrap_or_else(|p| p.into_inner()).append(
                &id,
                Event::Finished {
                    outcome: Outcome::RolledBack,
                    error: Some("interrupted before cutover; rolled back on restart".into()),
                    report: None,
                },
            )?;
            Ok(Some(Outcome::RolledBack))
        }
        Recovery::FinishDispose {
            id,
            source,
            target,
            old_deleting: true,
        } => {
            // The checks before the deletion passed (they come before its record), and the
            // old InfluxDB may be gone already: only the deletion is left to finish.
            progress.note(&format!(
                "recovering migration {id}: interrupted while deleting the old stack, finishing it"
            ));
            give_back_idle(
                cfg,
                provider,
                &journal,
                &interrupted,
                [source.stack.is_none(), true],
                progress,
            )
            .await;
            let report = Report {
                migration_id: id.clone(),
                ..Report::default()
            };
            delete_old_stack(
                cfg, provider, &journal, &id, &source, &target, report, progress,
            )
            .await
            .map(|_| Some(Outcome::Succeeded))
        }
        Recovery::FinishDispose {
            id,
            source,
            target,
            old_deleting: false,
        } => {
            progress.note(&format!("recovering migration {id}: verified before the interruption, finishing the disposal"));
            // The source too, although its stack is about to go: the checks below may
            // keep it.
            give_back_idle(
                cfg,
                provider,
                &journal,
                &interrupted,
                [true, true],
                progress,
            )
            .await;
            let src = Influx::from_config(&provider.source_instance(cfg, &source));
            let dst = Influx::from_config(&provider.target_instance(cfg, &target));
            // Writes that reached the source after the crash never reached a spool: the
            // interrupted subscription counted them as failures. Then the old stack stays.
            // Counters that cannot be read prove nothing: nothing is decided, and settling is
            // tried again later.
            let mut failed = Ok(0);
            for rid in capture_runs(cfg, &id) {
                failed = match (
                    failed,
                    src.subscriber_stats(&format!("stateshift_{rid}")).await,
                ) {
                    (Ok(n), Ok(st)) => Ok(n + st.failed),
                    (Err(e), _) | (_, Err(e)) => Err(e),
                };
            }
            let failed = failed
                .map_err(|e| MachineError::Unsettled {
                    id: id.clone(),
                    detail: format!(
                        "cannot read the source's subscriber counters on {} to prove no write was lost after the interruption ({e}); nothing is deleted until they can be read",
                        source.influx_url
                    ),
                })?;
            if failed > 0 {
                let msg = format!(
                    "{failed} write(s) reached the source {} after the interruption and are not on the target {}; the old stack is kept",
                    source.influx_url, target.influx_url
                );
                journal.lock().unwrap_or_else(|p| p.into_inner()).append(
                    &id,
                    Event::Finished {
                        outcome: Outcome::Failed,
                        error: Some(msg.clone()),
                        report: None,
                    },
                )?;
                return Err(MachineError::Unsettled {
                    id: id.clone(),
                    detail: msg,
                });
            }
            // The count before the drop, for the check before the delete (see `finish`).
            let at_stop = src.http_points_written().await.ok();
            drop_our_subscriptions(cfg, &src, &id, true).await;
            drop_our_subscriptions(cfg, &dst, &id, false).await;
            // What the interrupted runs captured but had not replayed yet.
            repair_spools(cfg, &id, progress)?;
            for sid in capture_runs(cfg, &id) {
                let n = engine::replay_spool_tail(&cfg.capture.spool_dir, &sid, &dst)
                    .await
                    .map_err(|e| MachineError::Unsettled {
                        id: id.clone(),
                        detail: format!("replaying the interrupted capture: {e}"),
                    })?;
                if n > 0 {
                    progress.note(&format!(
                        "replayed {n} captured points the interrupted run had not replayed"
                    ));
                }
            }
            let r = finish(
                cfg,
                provider,
                &journal,
                &id,
                source,
                target,
                Ok(Report {
                    migration_id: id.clone(),
                    source_writes_at_capture_stop: at_stop,
                    ..Report::default()
                }),
                progress,
            )
            .await;
            r.map(|_| Some(Outcome::Succeeded))
        }
        Recovery::ResumeCutover { id, source, target } => {
            progress.note(&format!("recovering migration {id}: interrupted after cutover; resuming from the cutover (nothing is deleted unless verification passes)"));
            give_back_idle(
                cfg,
                provider,
                &journal,
                &interrupted,
                [true, true],
                progress,
            )
            .await;
            // The interrupted captures' subscriptions kept forwarding to a dead receiver
            // while we were down; the resumed engine checks their counters once a new
            // capture is live. A resume that was itself interrupted is one more of them.
            repair_spools(cfg, &id, progress)?;
            let runs = capture_runs(cfg, &id);
            let earlier = runs
                .iter()
                .map(|rid| {
                    let spool = cfg.capture.spool_dir.join(format!("{rid}.spool"));
                    EarlierCapture {
                        spooled_points: spool_points(&spool).unwrap_or(0),
                        spool,
                        subscription: format!("stateshift_{rid}"),
                    }
                })
                .collect();
            let result = run_engine(
                cfg,
                provider,
                &journal,
                &id,
                (&source, &target),
                RunOptions {
                    id: Some(resume_id(&id, runs.len())),
                    resume: Some(Resume { earlier }),
                    ..RunOptions::default()
                },
                progress,
            )
            .await;
            // Past cutover already: a failure now must not roll the target back.
            let result = result.map_err(|(e, mut r)| {
                r.cutover_done = true;
                (e, r)
            });
            let source_goes = source.stack.is_some();
            let r = finish(
                cfg, provider, &journal, &id, source, target, result, progress,
            )
            .await;
            // What is still on record as lowered: a side whose giving back above failed
            // (the resumed run found it already low, and left it so).
            let after = state(cfg).ok().and_then(|st| st.migrations.last().cloned());
            if let Some(m) = after.filter(|m| m.id == id) {
                let keep_source = !(r.is_ok() && source_goes);
                give_back_idle(cfg, provider, &journal, &m, [keep_source, true], progress).await;
            }
            r.map(|_| Some(Outcome::Succeeded))
        }
    }
}

/// The longest settling waits to give one side its priority back.
const GIVE_BACK_WAIT: Duration = Duration::from_secs(30);

/// Give back the priority an interrupted migration left lowered (`migration.idle_nice`)
/// on each side that `keep` says stays (source, target): a side whose stack is about to
/// be deleted is skipped. Never fatal: what cannot be done is said, and tried again at
/// the next settling if the migration stays unsettled.
async fn give_back_idle(
    cfg: &Config,
    provider: &Provider,
    journal: &Mutex<Journal>,
    m: &super::journal::MigrationSummary,
    keep: [bool; 2],
    progress: &dyn Progress,
) {
    for &(end, nice) in &m.idle_lowered {
        let (placement, stays) = match end {
            engine::End::Source => (m.source.as_ref(), keep[0]),
            engine::End::Target => (m.target.as_ref(), keep[1]),
        };
        let Some(p) = placement.filter(|_| stays) else {
            continue;
        };
        let inst = match end {
            engine::End::Source => provider.source_instance(cfg, p),
            engine::End::Target => provider.target_instance(cfg, p),
        };
        let side = end.name();
        let given =
            tokio::time::timeout(GIVE_BACK_WAIT, engine::give_back_after_crash(&inst, nice))
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {GIVE_BACK_WAIT:?}")));
        match given {
            Ok((pid, was)) => {
                if was == i32::from(nice) {
                    progress.note(&format!("the {side} influxd (pid {pid}) ran at nice {nice}, where the interrupted migration had lowered it (migration.idle_nice): it has nice 0 back, the default"));
                } else {
                    tracing::info!(side, pid, was, "the interrupted migration's lowered influxd runs at another nice value: left as it is");
                }
                let recorded = journal
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .append(&m.id, Event::IdleRestored { side: end });
                if let Err(e) = recorded {
                    tracing::error!(error = %e, "cannot write the journal");
                }
            }
            Err(e) => progress.note(&format!("the {side} influxd may still run at nice {nice}, where the interrupted migration lowered it (migration.idle_nice), and could not be given its priority back: {e}; `renice -n 0` on its threads gives it the default")),
        }
    }
}

/// Remove from a target without a stack what migration `id` recorded it was creating
/// there (newest first), its subscriptions and its scratch directory. A database or
/// user already gone is fine; a target that cannot be reached is an error (nothing is
/// recorded as rolled back, and settling is tried again).
async fn undo_on_target(
    cfg: &Config,
    provider: &Provider,
    target: &Placement,
    id: &str,
    made: &[TargetObject],
    progress: &dyn Progress,
) -> Result<(), String> {
    use crate::influx::ident;
    use crate::remote::{Host, Remote};
    let inst = provider.target_instance(cfg, target);
    let influx = Influx::from_config(&inst);
    let scratch = format!("{}/restore-{id}", inst.work_dir.trim_end_matches('/'));
    let host = Host::connect(inst.ssh.as_ref())
        .await
        .map_err(|e| e.to_string());
    // First what the killed process left running there: its SSH sessions outlive it, and
    // a restore still going would recreate a database dropped below (found by a test).
    // Every command a migration runs on the target names its scratch directory.
    let stopped = match &host {
        Ok(h) => h
            .run(&crate::util::stop_processes_naming(&scratch))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.clone()),
    };
    if let Err(e) = stopped {
        return Err(format!(
            "stopping what the interrupted migration still runs on the target ({e}); nothing is removed until it is stopped, or it could recreate what is removed"
        ));
    }
    for object in made.iter().rev() {
        let (q, what) = match object {
            TargetObject::Database(db) => (
                format!("DROP DATABASE {}", ident(db)),
                format!("database {db:?}"),
            ),
            TargetObject::User(u) => (format!("DROP USER {}", ident(u)), format!("user {u:?}")),
        };
        match influx.query(None, &q).await {
            Ok(_) => progress.note(&format!(
                "removed the {what} the interrupted migration made on {}",
                inst.influx_url
            )),
            Err(crate::influx::InfluxError::Query { msg, .. }) if msg.contains("not found") => {}
            Err(e) => {
                return Err(format!(
                    "removing the {what} it made on the target {}: {e}",
                    inst.influx_url
                ))
            }
        }
    }
    drop_our_subscriptions(cfg, &influx, id, false).await;
    let removed = match &host {
        Ok(h) => h
            .run(&format!("rm -rf {}", crate::util::shell_quote(&scratch)))
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.clone()),
    };
    if let Err(e) = removed {
        tracing::warn!(error = %e, dir = %scratch, "could not remove the interrupted migration's scratch directory on the target");
    }
    Ok(())
}

/// The capture runs of migration `id`, oldest first: the migration itself, then each
/// resume of it that began capturing (`<id>r`, `<id>r2`, …: their spools exist).
fn capture_runs(cfg: &Config, id: &str) -> Vec<String> {
    let mut runs = vec![id.to_string()];
    loop {
        let rid = resume_id(id, runs.len());
        if !cfg.capture.spool_dir.join(format!("{rid}.spool")).exists() {
            return runs;
        }
        runs.push(rid);
    }
}

/// Cut off the torn tail a power loss may leave in the interrupted runs' spools (never
/// acknowledged: see the spool's durability contract), saying so. A spool damaged
/// anywhere else stops the settling: nothing is decided on data that cannot be read.
fn repair_spools(cfg: &Config, id: &str, progress: &dyn Progress) -> Result<(), MachineError> {
    for rid in capture_runs(cfg, id) {
        let path = cfg.capture.spool_dir.join(format!("{rid}.spool"));
        if !path.exists() {
            continue;
        }
        match super::spool::repair_torn_tail(&path) {
            Ok(None) => {}
            Ok(Some(t)) => {
                let msg = format!(
                    "cut off a torn tail of {} bytes at byte {} of {}: a forwarded write that was being spooled when the process stopped, never acknowledged to the source (its subscriber counts it as failed)",
                    t.bytes,
                    t.offset,
                    path.display()
                );
                tracing::warn!("{msg}");
                progress.note(&msg);
            }
            Err(e) => {
                return Err(MachineError::Unsettled {
                    id: id.to_string(),
                    detail: format!(
                        "the interrupted capture's spool is damaged where it held acknowledged writes ({e}); nothing is deleted, and the source still has every write"
                    ),
                })
            }
        }
    }
    Ok(())
}

/// The id of the `k`-th resume of migration `id` (`k` ≥ 1): `<id>r`, then `<id>r2`, ….
fn resume_id(id: &str, k: usize) -> String {
    match k {
        0 | 1 => format!("{id}r"),
        k => format!("{id}r{k}"),
    }
}

/// Points in a finished spool file (`None`: missing or unreadable).
/// The writers' points a spool holds (the source's statistics, spooled for the drain's
/// proof only, left out: a resumed run compares this with what the subscriptions
/// delivered of the writers' writes).
fn spool_points(path: &Path) -> Option<u64> {
    let mut r = super::spool::SpoolReader::open_finished(path).ok()?;
    let mut n = 0u64;
    while let Some(rec) = r.next_ready().ok()? {
        if rec.db == crate::influx::MONITOR_DB {
            continue;
        }
        n += crate::influx::lineproto::count_points(std::str::from_utf8(&rec.body).ok()?) as u64;
    }
    Some(n)
}

/// Drop every subscription a migration `id` made on one server (`stateshift_<id>`, `_t`)
/// and wait until it runs none ([`engine::drop_leftover_subscriptions`]: InfluxDB can
/// miss a DROP, and one left running forwards every write to a receiver that is gone).
/// What is left is warned about and the settling goes on: the server stops a dropped
/// one at its next change of metadata or restart.
async fn drop_our_subscriptions(cfg: &Config, influx: &Influx, id: &str, on_source: bool) {
    // Named after the step that makes them: the capture's on the source, the watch
    // (made at the cutover) on the target.
    let phase = if on_source {
        Phase::Capture
    } else {
        Phase::Cutover
    };
    let within = cfg.capture.live_timeout;
    if let Err(left) =
        engine::drop_leftover_subscriptions(influx, phase, on_source, id, within).await
    {
        tracing::warn!(
            server = %influx.url(),
            "the interrupted migration's subscriptions: {left}; one still there or still running forwards every write the server takes to a receiver that is gone"
        );
    }
}

/// Check every dependency of a migration with a stack provider, changing nothing: the
/// current source (InfluxDB, SSH, `influxd` there), the provider (Heat: authentication,
/// catalog and template validation; local: its directory), and the cutover host. (The
/// load source is the daemon's: [`crate::monitor::preflight`].)
pub async fn preflight(cfg: &Config, provider: &Provider) -> Result<Vec<String>, String> {
    use crate::remote::{Host, Remote};
    let mut lines = Vec::new();
    let st = state(cfg).map_err(|e| e.to_string())?;
    let source = current_source(cfg, &st);
    let src = provider.source_instance(cfg, &source);
    let influx = Influx::from_config(&src);
    let dbs = influx.databases().await.map_err(|e| e.to_string())?;
    lines.push(format!(
        "source InfluxDB {} answers (credentials accepted); databases: {}",
        src.influx_url,
        dbs.join(", ")
    ));
    let host = Host::connect(src.ssh.as_ref())
        .await
        .map_err(|e| e.to_string())?;
    host.run("influxd version")
        .await
        .map_err(|e| format!("{}: influxd is not runnable: {e}", host.describe()))?;
    lines.push(format!(
        "source host {} runs commands; influxd present",
        host.describe()
    ));
    match st.recovery() {
        Recovery::Nothing => {}
        r => lines.push(format!(
            "an interrupted migration will be settled first: {r:?}"
        )),
    }
    match provider {
        Provider::Static => lines.push("provider: static (the configured target)".into()),
        Provider::Local(l) => {
            let probe = cfg.provider.local_dir.join("stacks");
            std::fs::metadata(&probe).map_err(|e| format!("{}: {e}", probe.display()))?;
            lines.push(format!("provider: {}", l.describe()));
        }
        Provider::Heat(h) => {
            let ep = h.endpoint().await.map_err(|e| e.to_string())?;
            lines.push(format!(
                "provider: Keystone authentication accepted; orchestration endpoint {ep}"
            ));
            let spec = target_spec(cfg, format!("{}-influx-preflight", cfg.service.name));
            h.validate(&spec).await.map_err(|e| e.to_string())?;
            lines.push(format!(
                "Heat validates {} with the configured parameters",
                cfg.provider.template.display()
            ));
        }
    }
    if cfg.cutover.command.is_some() {
        let h = Host::connect(cfg.cutover.ssh.as_ref())
            .await
            .map_err(|e| e.to_string())?;
        h.run("true").await.map_err(|e| e.to_string())?;
        lines.push(format!("cutover host {} runs commands", h.describe()));
    }
    Ok(lines)
}

/// Record an operator's decision about a migration that failed after cutover: the
/// service runs on its `source` or its `target` from now on (the other side is left as
/// it is, for the operator to dispose of).
pub fn resolve(cfg: &Config, on_target: bool) -> Result<String, MachineError> {
    let paths = Paths::of(cfg);
    let _lock = lock(&paths.lock)?;
    let st = state(cfg)?;
    let m = st.needs_operator().ok_or_else(|| {
        MachineError::Refused(
            "nothing to resolve: the last migration did not fail after cutover".into(),
        )
    })?;
    let on = if on_target {
        m.target.clone()
    } else {
        m.source.clone()
    };
    let on = on.ok_or_else(|| {
        MachineError::Refused(format!(
            "migration {} has no recorded {}",
            m.id,
            if on_target { "target" } else { "source" }
        ))
    })?;
    let url = on.influx_url.clone();
    Journal::open(&paths.journal)?.append(&m.id, Event::Resolved { on })?;
    Ok(url)
}
