//! The migration journal: an append-only file of versioned JSON records, one per line,
//! each fsynced before the side effect it announces goes ahead ("started") and after it
//! ("done"). A crash leaves at worst a torn last line, which loading ignores.
//!
//! [`JournalState::from_records`] is pure: it derives what the last migration did and
//! what a restart must do about it.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::engine::{End, Phase, Report, TargetObject};
use crate::stack::{StackOutputs, StackRef};

pub const VERSION: u32 = 1;

/// One journal line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub v: u32,
    pub migration: String,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    #[serde(flatten)]
    pub event: Event,
}

/// Where an instance lives: a stack of the provider, or a fixed host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Placement {
    pub stack: Option<StackRef>,
    pub outputs: Option<StackOutputs>,
    pub influx_url: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Started {
        trigger: String,
        source: Placement,
    },
    /// About to create the target stack with this name (found again after a crash).
    StackCreating {
        name: String,
    },
    StackCreated {
        target: Placement,
    },
    PhaseStarted {
        phase: Phase,
    },
    PhaseDone {
        phase: Phase,
        seconds: f64,
    },
    /// About to create this on the target: a rollback after a crash removes exactly what
    /// these records name, and never anything else (a static target is not deleted
    /// whole, as a stack is).
    TargetCreating {
        object: TargetObject,
    },
    /// About to lower this side's `influxd` to nice `nice` (`migration.idle_nice`):
    /// settling after a crash gives it back.
    IdleLowering {
        side: End,
        nice: u8,
    },
    /// That side's `influxd` has its priority back.
    IdleRestored {
        side: End,
    },
    /// The cutover command is about to run: writers may use the target from now on.
    WritersRepointing,
    /// The cutover command succeeded.
    WritersRepointed,
    /// An operator's abort stopped the migration in `phase`, before its repoint: the
    /// rollback follows (also after a crash: nothing was repointed).
    AbortRequested {
        phase: Phase,
        by: String,
    },
    /// An operator settled a migration that failed after cutover: the service runs here.
    Resolved {
        on: Placement,
    },
    OldStackDeleting,
    OldStackDeleted,
    /// The old VM's host in the monitoring system was retired (deleted or disabled) after
    /// its stack went; recorded so it is done once, also after a restart.
    MonitorHostRetired {
        host: String,
    },
    WindowReset,
    Finished {
        outcome: Outcome,
        error: Option<String>,
        report: Option<Box<Report>>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Verified on the target; the old stack is gone.
    Succeeded,
    /// Failed before cutover: the service stayed on the source, the target was disposed of.
    RolledBack,
    /// Failed after cutover: nothing was deleted anywhere; an operator must look.
    Failed,
}

#[derive(Debug, thiserror::Error)]
#[error("journal {path}: {what}: {source}")]
pub struct JournalError {
    pub path: PathBuf,
    pub what: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// The journal file.
pub struct Journal {
    path: PathBuf,
    file: File,
}

impl Journal {
    pub fn open(path: &Path) -> Result<Journal, JournalError> {
        let err = |what, source| JournalError {
            path: path.into(),
            what,
            source,
        };
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d).map_err(|e| err("create directory", e))?;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| err("open", e))?;
        // A torn last line (a crash mid-append) must not swallow the next record.
        let text = std::fs::read(path).map_err(|e| err("read", e))?;
        if text.last().is_some_and(|&b| b != b'\n') {
            file.write_all(b"\n").map_err(|e| err("append", e))?;
        }
        Ok(Journal {
            path: path.into(),
            file,
        })
    }

    /// Append one record and fsync it.
    pub fn append(&mut self, migration: &str, event: Event) -> Result<(), JournalError> {
        let rec = Record {
            v: VERSION,
            migration: migration.into(),
            at_ms: crate::util::now_ms(),
            event,
        };
        let mut line = serde_json::to_vec(&rec).map_err(|e| JournalError {
            path: self.path.clone(),
            what: "encode",
            source: std::io::Error::other(e),
        })?;
        line.push(b'\n');
        self.file.write_all(&line).map_err(|source| JournalError {
            path: self.path.clone(),
            what: "append",
            source,
        })?;
        self.file.sync_data().map_err(|source| JournalError {
            path: self.path.clone(),
            what: "fsync",
            source,
        })
    }

    /// Every readable record; a torn or unknown line (a crash mid-write, a newer
    /// version) is skipped with a warning, never fatal.
    pub fn load(path: &Path) -> Result<Vec<Record>, JournalError> {
        let f = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(JournalError {
                    path: path.into(),
                    what: "open",
                    source,
                })
            }
        };
        let mut out = Vec::new();
        for (i, line) in BufReader::new(f).lines().enumerate() {
            let line = line.map_err(|source| JournalError {
                path: path.into(),
                what: "read",
                source,
            })?;
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Record>(&line) {
                Ok(r) if r.v <= VERSION => out.push(r),
                Ok(r) => tracing::warn!(
                    line = i + 1,
                    version = r.v,
                    "journal record from a newer version skipped"
                ),
                Err(e) => {
                    tracing::warn!(line = i + 1, error = %e, "unreadable journal line skipped (torn write?)")
                }
            }
        }
        Ok(out)
    }
}

/// One migration as the journal tells it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MigrationSummary {
    pub id: String,
    pub trigger: String,
    pub started_ms: u64,
    pub source: Option<Placement>,
    pub target: Option<Placement>,
    pub creating: Option<String>,
    /// What the migration was about to create on the target, in order.
    pub made_on_target: Vec<TargetObject>,
    pub phases: Vec<(Phase, f64)>,
    pub current_phase: Option<Phase>,
    pub cutover_started: bool,
    /// The cutover command succeeded: the writers use the target.
    pub repointed: bool,
    pub verified: bool,
    pub old_deleting: bool,
    pub old_deleted: bool,
    /// The old VM's monitoring host was retired.
    pub monitor_retired: bool,
    pub window_reset: bool,
    pub outcome: Option<Outcome>,
    pub error: Option<String>,
    /// An operator aborted it (who); it rolled back, or a restart rolls it back.
    pub aborted_by: Option<String>,
    /// After a failure past cutover: where an operator said the service runs.
    pub resolved_on: Option<Placement>,
    /// The sides whose `influxd` was lowered to this nice value and not given it back.
    pub idle_lowered: Vec<(End, u8)>,
}

/// What the journal says, derived purely from its records.
#[derive(Debug, Clone, Default, Serialize)]
pub struct JournalState {
    pub migrations: Vec<MigrationSummary>,
}

/// What a restart must do about an unfinished migration.
#[derive(Debug, Clone, PartialEq)]
pub enum Recovery {
    Nothing,
    /// Cutover never started: the source still serves everything. Remove the target
    /// stack (found by name if it was being created), or on a target without a stack
    /// exactly what the migration made there, and our subscriptions.
    RollBack {
        id: String,
        target: Option<Placement>,
        creating: Option<String>,
        made_on_target: Vec<TargetObject>,
        source: Placement,
    },
    /// Verified: only the old stack's deletion (and the reset) remain.
    FinishDispose {
        id: String,
        source: Placement,
        target: Placement,
        /// The old stack's deletion had begun: its InfluxDB may be gone already, and the
        /// checks before the deletion were done.
        old_deleting: bool,
    },
    /// Cutover started but verification did not finish: writers may use the target.
    /// Nothing may be deleted; resume from the cutover.
    ResumeCutover {
        id: String,
        source: Placement,
        target: Placement,
    },
}

impl JournalState {
    pub fn from_records(records: &[Record]) -> JournalState {
        let mut st = JournalState::default();
        for r in records {
            if st
                .migrations
                .last()
                .map(|m| m.id != r.migration)
                .unwrap_or(true)
            {
                st.migrations.push(MigrationSummary {
                    id: r.migration.clone(),
                    started_ms: r.at_ms,
                    ..Default::default()
                });
            }
            let Some(m) = st.migrations.last_mut() else {
                continue;
            };
            match &r.event {
                Event::Started { trigger, source } => {
                    m.trigger = trigger.clone();
                    m.source = Some(source.clone());
                }
                Event::StackCreating { name } => m.creating = Some(name.clone()),
                Event::StackCreated { target } => m.target = Some(target.clone()),
                Event::TargetCreating { object } => m.made_on_target.push(object.clone()),
                Event::IdleLowering { side, nice } => {
                    m.idle_lowered.retain(|(s, _)| s != side);
                    m.idle_lowered.push((*side, *nice));
                }
                Event::IdleRestored { side } => m.idle_lowered.retain(|(s, _)| s != side),
                Event::PhaseStarted { phase } => m.current_phase = Some(*phase),
                Event::WritersRepointing => m.cutover_started = true,
                Event::WritersRepointed => m.repointed = true,
                Event::AbortRequested { by, .. } => m.aborted_by = Some(by.clone()),
                Event::Resolved { on } => m.resolved_on = Some(on.clone()),
                Event::PhaseDone { phase, seconds } => {
                    m.phases.push((*phase, *seconds));
                    if *phase == Phase::Verify {
                        m.verified = true;
                    }
                }
                Event::OldStackDeleting => m.old_deleting = true,
                Event::OldStackDeleted => m.old_deleted = true,
                Event::MonitorHostRetired { .. } => m.monitor_retired = true,
                Event::WindowReset => m.window_reset = true,
                Event::Finished { outcome, error, .. } => {
                    m.outcome = Some(*outcome);
                    m.error = error.clone();
                    m.current_phase = None;
                }
            }
        }
        st
    }

    /// The decision for the last migration, if it never finished.
    pub fn recovery(&self) -> Recovery {
        let Some(m) = self.migrations.last().filter(|m| m.outcome.is_none()) else {
            return Recovery::Nothing;
        };
        let Some(source) = m.source.clone() else {
            return Recovery::RollBack {
                id: m.id.clone(),
                target: None,
                creating: m.creating.clone(),
                made_on_target: Vec::new(),
                source: Placement {
                    stack: None,
                    outputs: None,
                    influx_url: String::new(),
                },
            };
        };
        match (&m.target, m.verified, m.cutover_started) {
            (Some(t), true, _) => Recovery::FinishDispose {
                id: m.id.clone(),
                source,
                target: t.clone(),
                old_deleting: m.old_deleting,
            },
            (Some(t), false, true) => Recovery::ResumeCutover {
                id: m.id.clone(),
                source,
                target: t.clone(),
            },
            (t, _, _) => Recovery::RollBack {
                id: m.id.clone(),
                target: t.clone(),
                creating: m.creating.clone(),
                made_on_target: m.made_on_target.clone(),
                source,
            },
        }
    }

    /// The placement that serves the service now: the target of the last successful
    /// migration, else `None` (the configured source).
    pub fn current(&self) -> Option<Placement> {
        self.migrations
            .iter()
            .rev()
            .find_map(|m| match (m.outcome, &m.resolved_on) {
                (_, Some(on)) => Some(on.clone()),
                (Some(Outcome::Succeeded), _) => m.target.clone(),
                _ => None,
            })
    }

    /// Where the writers point now: the target of a migration whose cutover command
    /// succeeded and that is still running (or failed after it with no operator decision
    /// yet), else [`JournalState::current`]. A probe that follows the service the way its
    /// writers do uses this (`None`: the configured source).
    pub fn writers_on(&self) -> Option<Placement> {
        match self.migrations.last() {
            Some(m)
                if m.repointed
                    && m.resolved_on.is_none()
                    && matches!(m.outcome, None | Some(Outcome::Failed)) =>
            {
                m.target.clone().or_else(|| self.current())
            }
            _ => self.current(),
        }
    }

    /// The last migration failed after cutover and no operator has said where the service
    /// runs: writers may use either side, so no new migration may start.
    pub fn needs_operator(&self) -> Option<&MigrationSummary> {
        self.migrations
            .last()
            .filter(|m| m.outcome == Some(Outcome::Failed) && m.resolved_on.is_none())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placement(n: &str) -> Placement {
        Placement {
            stack: Some(StackRef {
                id: format!("id-{n}"),
                name: n.into(),
            }),
            outputs: None,
            influx_url: format!("http://{n}:8086"),
        }
    }

    /// Migration "1" from "old" to "new", up to the record of the repoint.
    fn repointing() -> Vec<Record> {
        vec![
            rec(
                "1",
                Event::Started {
                    trigger: "t".into(),
                    source: placement("old"),
                },
            ),
            rec(
                "1",
                Event::StackCreated {
                    target: placement("new"),
                },
            ),
            rec("1", Event::WritersRepointing),
        ]
    }

    fn rec(m: &str, e: Event) -> Record {
        Record {
            v: VERSION,
            migration: m.into(),
            at_ms: 1,
            event: e,
        }
    }

    #[test]
    fn a_lowered_side_stays_on_record_until_it_is_given_back_and_the_record_reads_back() {
        let lowering = |side| Event::IdleLowering { side, nice: 19 };
        let mut rs = vec![
            rec(
                "1",
                Event::Started {
                    trigger: "manual".into(),
                    source: placement("old"),
                },
            ),
            rec("1", lowering(End::Target)),
            rec("1", Event::IdleRestored { side: End::Target }),
            rec("1", lowering(End::Source)),
        ];
        let st = JournalState::from_records(&rs);
        assert_eq!(st.migrations[0].idle_lowered, vec![(End::Source, 19)]);
        // A line as written and read back.
        let line = serde_json::to_string(&rs[1]).unwrap();
        assert!(
            line.contains(r#""event":"idle_lowering","side":"target","nice":19"#),
            "{line}"
        );
        let back: Record = serde_json::from_str(&line).unwrap();
        assert!(matches!(
            back.event,
            Event::IdleLowering {
                side: End::Target,
                nice: 19
            }
        ));
        rs.push(rec("1", Event::IdleRestored { side: End::Source }));
        assert!(JournalState::from_records(&rs).migrations[0]
            .idle_lowered
            .is_empty());
    }

    #[test]
    fn an_abort_is_remembered_and_an_unfinished_aborted_migration_rolls_back() {
        let mut rs = vec![
            rec(
                "1",
                Event::Started {
                    trigger: "manual".into(),
                    source: placement("old"),
                },
            ),
            rec(
                "1",
                Event::StackCreated {
                    target: placement("new"),
                },
            ),
            rec(
                "1",
                Event::AbortRequested {
                    phase: Phase::Dump,
                    by: "operator".into(),
                },
            ),
        ];
        let st = JournalState::from_records(&rs);
        assert_eq!(st.migrations[0].aborted_by.as_deref(), Some("operator"));
        // A crash during the abort's rollback: the next start rolls back.
        assert!(matches!(
            st.recovery(),
            Recovery::RollBack {
                target: Some(_),
                ..
            }
        ));
        rs.push(rec(
            "1",
            Event::Finished {
                outcome: Outcome::RolledBack,
                error: Some("dump: aborted by operator".into()),
                report: None,
            },
        ));
        let st = JournalState::from_records(&rs);
        assert_eq!(st.recovery(), Recovery::Nothing);
        assert_eq!(st.migrations[0].aborted_by.as_deref(), Some("operator"));
    }

    #[test]
    fn a_crash_before_cutover_rolls_back_and_one_after_verify_finishes_the_disposal() {
        let mut rs = vec![
            rec(
                "1",
                Event::Started {
                    trigger: "manual".into(),
                    source: placement("old"),
                },
            ),
            rec("1", Event::StackCreating { name: "new".into() }),
        ];
        assert!(
            matches!(JournalState::from_records(&rs).recovery(), Recovery::RollBack { target: None, creating: Some(ref n), .. } if n == "new")
        );
        rs.push(rec(
            "1",
            Event::StackCreated {
                target: placement("new"),
            },
        ));
        rs.push(rec(
            "1",
            Event::PhaseStarted {
                phase: Phase::Restore,
            },
        ));
        assert!(matches!(
            JournalState::from_records(&rs).recovery(),
            Recovery::RollBack {
                target: Some(_),
                ..
            }
        ));
        rs.push(rec(
            "1",
            Event::PhaseStarted {
                phase: Phase::Cutover,
            },
        ));
        // The cutover phase began, but the writers were never repointed: roll back.
        assert!(matches!(
            JournalState::from_records(&rs).recovery(),
            Recovery::RollBack {
                target: Some(_),
                ..
            }
        ));
        rs.push(rec("1", Event::WritersRepointing));
        assert!(matches!(
            JournalState::from_records(&rs).recovery(),
            Recovery::ResumeCutover { .. }
        ));
        rs.push(rec(
            "1",
            Event::PhaseDone {
                phase: Phase::Verify,
                seconds: 1.0,
            },
        ));
        assert!(matches!(
            JournalState::from_records(&rs).recovery(),
            Recovery::FinishDispose { .. }
        ));
        rs.push(rec(
            "1",
            Event::Finished {
                outcome: Outcome::Succeeded,
                error: None,
                report: None,
            },
        ));
        let st = JournalState::from_records(&rs);
        assert_eq!(st.recovery(), Recovery::Nothing);
        assert_eq!(st.current(), Some(placement("new")));
    }

    #[test]
    fn a_failure_after_cutover_blocks_new_migrations_until_an_operator_resolves_it() {
        let mut rs = repointing();
        rs.extend([rec(
            "1",
            Event::Finished {
                outcome: Outcome::Failed,
                error: Some("verify".into()),
                report: None,
            },
        )]);
        let st = JournalState::from_records(&rs);
        assert_eq!(st.recovery(), Recovery::Nothing);
        assert!(st.needs_operator().is_some());
        assert_eq!(st.current(), None);
        rs.push(rec(
            "1",
            Event::Resolved {
                on: placement("new"),
            },
        ));
        let st = JournalState::from_records(&rs);
        assert!(st.needs_operator().is_none());
        assert_eq!(st.current(), Some(placement("new")));
    }

    #[test]
    fn writers_follow_the_target_from_the_successful_repoint_on() {
        let mut rs = repointing();
        // The command has not succeeded yet: the writers still use the source.
        assert_eq!(JournalState::from_records(&rs).writers_on(), None);
        rs.push(rec("1", Event::WritersRepointed));
        assert_eq!(
            JournalState::from_records(&rs).writers_on(),
            Some(placement("new"))
        );
        rs.push(rec(
            "1",
            Event::Finished {
                outcome: Outcome::Failed,
                error: Some("verify".into()),
                report: None,
            },
        ));
        assert_eq!(
            JournalState::from_records(&rs).writers_on(),
            Some(placement("new"))
        );
        rs.push(rec(
            "1",
            Event::Resolved {
                on: placement("old"),
            },
        ));
        assert_eq!(
            JournalState::from_records(&rs).writers_on(),
            Some(placement("old"))
        );
    }

    #[test]
    fn a_torn_last_line_does_not_swallow_the_next_record() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("journal");
        std::fs::write(&p, "{\"v\":1,\"migr").unwrap();
        Journal::open(&p)
            .unwrap()
            .append("1", Event::WindowReset)
            .unwrap();
        let rs = Journal::load(&p).unwrap();
        assert_eq!(rs.len(), 1);
        assert!(matches!(rs[0].event, Event::WindowReset));
    }

    #[test]
    fn a_torn_last_line_and_a_newer_version_are_skipped() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("journal");
        let mut j = Journal::open(&p).unwrap();
        j.append("1", Event::WindowReset).unwrap();
        drop(j);
        let mut text = std::fs::read_to_string(&p).unwrap();
        text.push_str("{\"v\":99,\"migration\":\"2\",\"at_ms\":1,\"event\":\"window_reset\"}\n{\"v\":1,\"migr");
        std::fs::write(&p, text).unwrap();
        let rs = Journal::load(&p).unwrap();
        assert_eq!(rs.len(), 1);
        assert!(matches!(rs[0].event, Event::WindowReset));
    }
}
