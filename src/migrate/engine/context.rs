//! The shared context of one migration: what the phases read (configuration, both
//! sides), what they hand each other (capture receiver, spool, replay position), and
//! what a rollback must undo ([`Created`]).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::plan::Plan;
use super::{Journaling, LogProgress, MigrateError, Phase, Progress, Report, Unjournaled};
use crate::config::{Config, InstanceConfig};
use crate::influx::{Influx, InfluxError};
use crate::migrate::capture::{KeySet, Receiver};
use crate::migrate::spool::{SpoolReader, SpoolWriter};
use crate::remote::{Host, RemoteError};

/// One end of the migration, connected in `prepare`.
pub(super) struct Side {
    pub cfg: InstanceConfig,
    pub influx: Influx,
    pub host: Host,
    /// The host's CPUs (`nproc`): how many aggregate statements verification runs at
    /// once on this server while no writer uses it.
    pub cpus: usize,
}

/// Everything this migration created, so a rollback removes exactly that.
#[derive(Default)]
pub(super) struct Created {
    pub source_subscriptions: Vec<(String, String)>,
    pub target_subscriptions: Vec<(String, String)>,
    pub target_databases: Vec<String>,
    pub target_users: Vec<String>,
    pub source_dirs: Vec<String>,
    pub target_dirs: Vec<String>,
}

pub(super) struct Migration<'a> {
    pub id: String,
    pub cfg: &'a Config,
    pub progress: &'a dyn Progress,
    pub journal: &'a dyn Journaling,
    pub plan: Plan,
    pub report: Report,
    pub created: Created,
    pub source: Option<Side>,
    pub target_cfg: InstanceConfig,
    pub target: Option<Side>,
    pub receiver: Option<Receiver>,
    pub spool: Option<Arc<SpoolWriter>>,
    pub touched: Option<Arc<Mutex<KeySet>>>,
    pub touched_receiver: Option<Receiver>,
    /// The source's counters that forwarding drops are counted from: read when the
    /// capture started, or once its subscriptions were live when every write that
    /// could have been dropped before was then in its shards (see `Self::capture`).
    pub drops_base: crate::influx::SubStats,
    /// The source process's start time when the capture started.
    pub source_started: Option<String>,
    /// The source's counters read just before the capture's subscriptions were made: the
    /// base of [`Self::drain_proven`].
    pub capture_base: Option<crate::influx::SubStats>,
    /// The same counters from the answer that first showed the subscriptions live.
    pub capture_live: Option<crate::influx::SubStats>,
    /// The replay's position in the spool, kept for the tail after verify.
    pub reader: Option<SpoolReader>,
    /// The target pulled the dump itself: nothing to transfer.
    pub pulled: bool,
    /// The shards went straight into the target's InfluxDB: its databases are restored.
    pub restored: bool,
    /// With a resumed run: what it takes over from the interrupted one.
    pub resume: Option<super::Resume>,
    /// How long `prepare` waits for the target's InfluxDB to answer.
    pub ready_wait: Duration,
    /// The watch receiver's port, reserved at the capture.
    pub watch_listener: Option<tokio::net::TcpListener>,
    /// An operator's abort ([`crate::migrate::abort`]); closed at the repoint.
    pub abort: crate::migrate::abort::Abort,
    /// Verification of the measurements nothing writes to any more, run during the
    /// cutover ([`crate::migrate::verify::verify_cold`]); stopped if the
    /// migration ends before its verify phase.
    pub early_verify: Option<EarlyVerify>,
    /// The target's side of the early pass, read before the repoint (`verify.target_first`).
    pub early_first: Option<crate::migrate::verify::TargetFirst>,
    /// When the first comparison began (the early pass's start, or the verify phase's).
    pub verify_started: Option<std::time::Instant>,
    /// The idle side's lowered CPU priority (`migration.idle_nice`).
    pub priorities: super::priority::Priorities,
    /// Every shard the dump streamed into the target, with the files sent: what
    /// verification reads back (`verify.read_back`). Empty when the dump took another way.
    pub sent_shards: Vec<SentShard>,
    /// Per database, the shards the source listed before the dump that it did not copy.
    pub shards_not_sent: std::collections::BTreeMap<String, Vec<u64>>,
    /// Whether the shards' files may prove what they hold: the source was seen writing
    /// nothing once the capture was live (`no_write_in_flight`); `Err` says why not.
    pub files_may_prove: Result<(), String>,
}

/// One shard the dump streamed: its database, its id on each side, the files sent.
pub(super) struct SentShard {
    pub database: String,
    pub source: u64,
    pub target: u64,
    pub files: Vec<crate::influx::snapshotter::ShardFile>,
}

/// The early verification's task.
pub(super) type EarlyVerify =
    tokio_util::task::AbortOnDropHandle<Result<crate::migrate::verify::Early, InfluxError>>;

/// The name of a migration's capture subscriptions (`_t` appended: its target watch).
pub(super) fn sub_name(id: &str) -> String {
    format!("stateshift_{id}")
}

impl<'a> Migration<'a> {
    pub(super) fn new(cfg: &'a Config, target: &InstanceConfig) -> Migration<'a> {
        let id = crate::util::now_ms().to_string();
        Migration {
            id: id.clone(),
            cfg,
            progress: &LogProgress,
            journal: &Unjournaled,
            plan: Plan::default(),
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
            drops_base: Default::default(),
            source_started: None,
            capture_base: None,
            capture_live: None,
            reader: None,
            pulled: false,
            restored: false,
            resume: None,
            ready_wait: Duration::ZERO,
            watch_listener: None,
            abort: crate::migrate::abort::Abort::new(),
            early_verify: None,
            early_first: None,
            verify_started: None,
            priorities: Default::default(),
            sent_shards: Vec::new(),
            shards_not_sent: Default::default(),
            files_may_prove: Err("the capture did not look".into()),
        }
    }
}

impl Migration<'_> {
    pub(super) fn src(&self) -> &Side {
        self.source.as_ref().expect("source connected in prepare")
    }
    pub(super) fn dst(&self) -> &Side {
        self.target.as_ref().expect("target connected in prepare")
    }

    pub(super) fn influx_err(phase: Phase) -> impl Fn(InfluxError) -> MigrateError {
        move |source| MigrateError::Influx { phase, source }
    }
    pub(super) fn remote_err(phase: Phase) -> impl Fn(RemoteError) -> MigrateError {
        move |source| MigrateError::Remote { phase, source }
    }
}
