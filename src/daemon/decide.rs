//! The daemon's decisions: which reading counts, when a migration starts, what a move or a
//! request does to the window and the cooldown. Written over a `World` (where the service
//! runs, its load source, a migration), so the tests drive this very loop with tokio's
//! paused clock, a scripted source and a scripted world.
//!
//! Rules (ARCHITECTURE.md, "The daemon's decisions"):
//! - Readings come from a [`Poller`] running in its own task: a sample counts once, by its
//!   clock, however often the source repeats it; the poller is stopped during a migration
//!   and, on the same host, resumes after the last clock it pushed.
//! - Where the service runs is re-read from the journal after each reading (in its
//!   wake-up), at most once per half poll interval, or by a timer while no reading comes
//!   (1.5 intervals after the last reading, then every interval). A move made
//!   by someone else (a CLI migration, a recovery settled by another process) is treated as
//!   a migration that succeeded: the old host's window is dropped and the cooldown starts.
//! - A request (`POST /migrate`) is honoured even during the cooldown: the operator said so.
//!   A request that arrived before a migration started is answered by that migration and
//!   dropped: two migrations never run back to back unless a request arrives after the
//!   first one started.
//! - Every wait is cancellable: a signal is seen at once, except during a migration or a
//!   settling recovery, which are the safe points the daemon finishes first.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::monitor::poller::{Outcome, Poller, PollerConfig};
use crate::monitor::{Clock, MetricSource, Sample};
use crate::predict::policy::TriggerPolicy;

/// A request to migrate, with when it arrived.
#[derive(Debug, Clone)]
pub struct Request {
    /// Why, for the journal and the logs (`manual: POST /migrate`).
    pub why: String,
    /// When it arrived (tokio's clock).
    pub at: Instant,
}

impl Request {
    /// A request arriving now.
    pub fn now(why: impl Into<String>) -> Request {
        Request {
            why: why.into(),
            at: Instant::now(),
        }
    }
}

/// What the loop acts on.
pub(crate) trait World {
    /// The load source of a host.
    type Source: MetricSource + 'static;

    /// Settle whatever is left unfinished in the journal, then say where the service runs
    /// now: an identity that changes whenever the service moves (a stack's name with its
    /// URL: a cloud may give a new VM the address of a deleted one).
    async fn locate(&mut self) -> String;

    /// The InfluxDB URL of where the service runs, as [`World::locate`] last said.
    fn url(&self) -> String;

    /// The load source of where the service runs now, as [`World::locate`] last said;
    /// `None` when migrations are triggered by hand only.
    fn source(&self) -> Option<Self::Source>;

    /// What the source reads, for `/status`.
    fn describe_source(&self) -> String;

    /// Run one migration; true when it succeeded.
    async fn migrate(&mut self, why: &str) -> bool;
}

/// The poller of the current host, in its own task.
struct Feed<S: MetricSource> {
    outcomes: mpsc::UnboundedReceiver<Outcome>,
    stop: CancellationToken,
    task: Option<JoinHandle<Poller<S>>>,
}

impl<S: MetricSource + 'static> Feed<S> {
    fn start(source: Option<S>, config: PollerConfig, resume: Option<Clock>) -> Feed<S> {
        let (tx, outcomes) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let task = source.and_then(|s| match Poller::new(s, config) {
            Ok(p) => {
                let p = p.feed(tx).resume_after(resume);
                Some(tokio::spawn(p.run(stop.clone())))
            }
            Err(e) => {
                tracing::error!(error = %e, "the load cannot be polled");
                None
            }
        });
        Feed {
            outcomes,
            stop,
            task,
        }
    }

    /// The next outcome; pending forever when nothing is polled.
    async fn next(&mut self) -> Option<Outcome> {
        if self.task.is_none() {
            return std::future::pending().await;
        }
        self.outcomes.recv().await
    }

    /// Stop the poller; the clock of the last value it pushed.
    async fn stop(mut self) -> Option<Clock> {
        self.stop.cancel();
        let task = self.task.take()?;
        match task.await {
            Ok(p) => p.snapshot().last_pushed.map(|s| s.clock),
            Err(e) => {
                tracing::error!(error = %e, "the load poller ended abnormally");
                None
            }
        }
    }
}

/// The readings record moves to `readings.csv.1` past this size (about 2 million
/// readings: a month at one a second, years at one a minute).
const RECORD_MAX_BYTES: u64 = 64 << 20;

/// The loop's state between iterations.
pub(crate) struct Decider<W: World> {
    world: W,
    policy: TriggerPolicy,
    poll: PollerConfig,
    shared: Arc<Shared>,
    here: String,
    last_start: Option<Instant>,
    /// `monitor.mode: observe`: a trigger is recorded, never acted on.
    observe: bool,
    /// Where every fresh reading is appended (`timestamp,value`), for `stateshift replay`.
    record: Option<std::path::PathBuf>,
    /// A failure to record was logged already.
    record_warned: bool,
}

impl<W: World> Decider<W> {
    pub(crate) fn new(
        world: W,
        policy: TriggerPolicy,
        poll: PollerConfig,
        shared: Arc<Shared>,
    ) -> Self {
        Decider {
            world,
            policy,
            poll,
            shared,
            here: String::new(),
            last_start: None,
            observe: false,
            record: None,
            record_warned: false,
        }
    }

    /// Append every fresh reading to `path` (`timestamp,value`, the sample's own clock),
    /// so `stateshift replay` can run them through other settings later.
    pub(crate) fn record_readings(mut self, path: Option<std::path::PathBuf>) -> Self {
        self.record = path;
        self
    }

    /// One reading into the record; a file past [`RECORD_MAX_BYTES`] moves to `.1` first.
    fn record(&mut self, s: &Sample) {
        use std::io::Write;
        let Some(path) = &self.record else { return };
        let at = std::time::UNIX_EPOCH + std::time::Duration::new(s.clock.secs, s.clock.nanos);
        let r = (|| -> std::io::Result<()> {
            if std::fs::metadata(path).is_ok_and(|m| m.len() > RECORD_MAX_BYTES) {
                std::fs::rename(path, path.with_extension("csv.1"))?;
            }
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            if f.metadata()?.len() == 0 {
                f.write_all(b"timestamp,value\n")?;
            }
            f.write_all(crate::predict::replay::line(at, s.value).as_bytes())
        })();
        match r {
            Ok(()) => self.record_warned = false,
            Err(e) if !self.record_warned => {
                self.record_warned = true;
                tracing::warn!(path = %path.display(), error = %e, "cannot record the load reading (stateshift replay will miss it)");
            }
            Err(_) => {}
        }
    }

    /// Observe only: a prediction over the threshold is recorded ("would migrate now")
    /// and starts the cooldown as a migration would, so the record shows how often the
    /// daemon would have migrated; only a request migrates.
    pub(crate) fn observe_only(mut self, on: bool) -> Self {
        self.observe = on;
        self
    }

    /// Run until `shutdown` is cancelled (at once, or after the migration that runs).
    pub(crate) async fn run(
        mut self,
        mut requests: mpsc::Receiver<Request>,
        shutdown: CancellationToken,
    ) -> W {
        self.here = self.world.locate().await;
        self.show_source();
        self.shared.ready.store(true, Ordering::SeqCst);
        let mut feed = Feed::start(self.world.source(), self.poll, None);
        let mut look = tokio::time::interval_at(
            Instant::now() + self.poll.poll_interval,
            self.poll.poll_interval,
        );
        look.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // When the last look ended: a look after a reading waits half an interval since
        // it, so a look slower than the readings (a recovery retried against a cloud
        // that does not answer) cannot run once per queued reading.
        let mut looked = Instant::now();
        loop {
            let (why, look_now) = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                Some(r) = requests.recv() => (self.on_request(r), false),
                Some(o) = feed.next() => {
                    let why = self.on_outcome(o);
                    // The look rides on the reading's wake-up: an idle daemon wakes once
                    // per poll, and the timer fires only while no reading comes (at
                    // most 1.5 poll intervals after the last look).
                    let half = self.poll.poll_interval / 2;
                    let look_now = why.is_none() && looked.elapsed() >= half;
                    if why.is_none() {
                        // The timer waits 1.5 intervals from this look (or the last one, if
                        // this reading is too close to it): a reading that lands a little
                        // later than the last one must not find the timer's look just done.
                        let from = if look_now { Instant::now() } else { looked };
                        look.reset_at(from + self.poll.poll_interval + half);
                    }
                    (why, look_now)
                }
                _ = look.tick() => (None, true),
            };
            if look_now {
                let now = self.world.locate().await;
                looked = Instant::now();
                if now != self.here {
                    tracing::warn!(from = %self.here, to = %now, "the service moved; polling the new host with a fresh window and the cooldown started");
                    self.policy.service_moved(Instant::now().into_std());
                    self.here = now;
                    feed.stop().await;
                    feed = Feed::start(self.world.source(), self.poll, None);
                    self.show_source();
                    self.shared.set(|s| s.window.clear());
                }
            }
            let Some(why) = why else { continue };
            if shutdown.is_cancelled() {
                break;
            }
            let resume = feed.stop().await;
            let ok = self.migrate(&why).await;
            let now = self.world.locate().await;
            let resume = if now == self.here { resume } else { None };
            self.here = now;
            feed = Feed::start(self.world.source(), self.poll, resume);
            self.show_source();
            self.shared.set(|s| {
                s.state = "polling".into();
                s.phase = None;
                if ok {
                    s.window.clear();
                }
            });
            self.shared.running.store(false, Ordering::SeqCst);
        }
        self.shared.ready.store(false, Ordering::SeqCst);
        feed.stop().await;
        self.world
    }

    fn show_source(&self) {
        let (url, what) = (self.world.url(), self.world.describe_source());
        self.shared.set(|s| {
            s.source_url = url;
            s.load_source = what;
        });
    }

    /// A request is honoured unless a migration started after it arrived.
    fn on_request(&mut self, r: Request) -> Option<String> {
        if let Some(started) = self.last_start.filter(|s| r.at <= *s) {
            tracing::warn!(request = %r.why, arrived_before_by = ?started - r.at, "a migration started after this request arrived and answered it; not migrating again");
            self.shared.set(|s| {
                s.last_decision = format!(
                    "request \"{}\" answered by the migration that started after it",
                    r.why
                )
            });
            return None;
        }
        Some(r.why)
    }

    /// One read's outcome: count it, and feed a new value to the policy.
    fn on_outcome(&mut self, o: Outcome) -> Option<String> {
        let label = match o {
            Outcome::Pushed(_) | Outcome::Unchanged(_) => "fresh",
            Outcome::Stale(_) => "stale",
            Outcome::NoData => "no_data",
            Outcome::Failed { .. } => "error",
        };
        self.shared.metrics.reading(label);
        if label == "fresh" {
            self.shared
                .set(|s| s.last_fresh_unix_ms = Some(crate::util::now_ms()));
        }
        let Outcome::Pushed(s) = o else { return None };
        self.decide(s)
    }

    fn decide(&mut self, s: Sample) -> Option<String> {
        self.record(&s);
        let d = match self.policy.on_reading(s.value, Instant::now().into_std()) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "reading refused by the window");
                return None;
            }
        };
        tracing::info!(window = ?d.window, prediction = ?d.prediction, threshold = d.threshold, reason = %d.reason, clock = %s.clock, "decision");
        self.shared.metrics.observe(s.value, d.prediction);
        self.shared.set(|st| {
            st.window = d.window.clone();
            st.last_reading = Some(s.value);
            st.last_prediction = d.prediction;
            st.last_decision = d.reason.to_string();
            st.history.push(super::HistoryPoint {
                at_unix_ms: crate::util::now_ms(),
                load: s.value,
                prediction: d.prediction,
            });
            let over = st.history.len().saturating_sub(super::HISTORY_KEPT);
            st.history.drain(..over);
        });
        if !d.trigger() {
            return None;
        }
        let why = format!(
            "prediction {:.2} > threshold {}",
            d.prediction.unwrap_or(f64::NAN),
            d.threshold
        );
        if !self.observe {
            return Some(why);
        }
        let polls = self.policy.config().consecutive;
        let decision = format!(
            "would migrate now: {why} for {polls} poll{} (observe mode)",
            if polls == 1 { "" } else { "s" }
        );
        tracing::warn!(decision = %decision, window = ?d.window, "not migrating: monitor.mode is observe");
        self.shared.metrics.would_migrate();
        let now = Instant::now().into_std();
        // The service stays where it is: its window stays, the cooldown starts.
        self.policy.migration_started(now);
        self.policy.migration_finished(now, false);
        let record = super::WouldMigrate {
            at_unix_ms: crate::util::now_ms(),
            decision: decision.clone(),
            prediction: d.prediction,
            threshold: d.threshold,
            window: d.window.clone(),
        };
        self.shared.set(|st| {
            st.last_decision = decision;
            st.would_migrate.push(record);
            let over = st
                .would_migrate
                .len()
                .saturating_sub(super::WOULD_MIGRATE_KEPT);
            st.would_migrate.drain(..over);
        });
        None
    }

    async fn migrate(&mut self, why: &str) -> bool {
        self.shared.metrics.trigger();
        tracing::warn!(trigger = %why, "migrating");
        self.last_start = Some(Instant::now());
        self.shared.running.store(true, Ordering::SeqCst);
        self.shared.set(|s| s.state = "migrating".into());
        self.policy.migration_started(Instant::now().into_std());
        let ok = self.world.migrate(why).await;
        self.policy
            .migration_finished(Instant::now().into_std(), ok);
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::{api, Status};
    use crate::monitor::{Reading, SourceError};
    use crate::predict::policy::PolicyConfig;
    use crate::predict::Model;
    use std::collections::VecDeque;
    use std::sync::atomic::AtomicBool;
    use std::sync::Mutex;
    use std::time::Duration;

    const POLL: Duration = Duration::from_secs(1);

    #[derive(Debug, thiserror::Error)]
    #[error("scripted failure")]
    struct Scripted;
    impl SourceError for Scripted {
        fn is_transient(&self) -> bool {
            true
        }
    }

    /// One host's readings, one per read; the last one repeats forever. Each read takes
    /// the scene's `read_takes`, and its end is recorded in `reads`.
    struct Script(VecDeque<Reading>, Duration, Arc<Mutex<Vec<Instant>>>);
    impl MetricSource for Script {
        type Error = Scripted;
        fn describe(&self) -> String {
            "script".into()
        }
        async fn read(&mut self) -> Result<Reading, Scripted> {
            tokio::time::sleep(self.1).await;
            self.2.lock().unwrap().push(Instant::now());
            let r = if self.0.len() > 1 {
                self.0.pop_front()
            } else {
                self.0.front().copied()
            };
            r.ok_or(Scripted)
        }
    }

    /// A world of hosts with scripted loads; migrations move to the next host and take
    /// `migration_takes`. `moves` lets a test move the service behind the loop's back.
    #[derive(Clone, Default)]
    struct Scene {
        loads: Arc<Mutex<Vec<VecDeque<Reading>>>>,
        host: Arc<Mutex<usize>>,
        migrations: Arc<Mutex<Vec<(Instant, String)>>>,
        migration_takes: Duration,
        /// Every host answers at the same URL (a cloud reusing a deleted VM's address).
        same_url: bool,
        read_takes: Duration,
        /// How long a look where the service runs takes.
        locate_takes: Duration,
        /// When each read ended, and when the loop looked where the service runs.
        reads: Arc<Mutex<Vec<Instant>>>,
        looks: Arc<Mutex<Vec<Instant>>>,
    }
    impl World for Scene {
        type Source = Script;
        async fn locate(&mut self) -> String {
            self.looks.lock().unwrap().push(Instant::now());
            tokio::time::sleep(self.locate_takes).await;
            format!("host{}", self.host.lock().unwrap())
        }
        fn url(&self) -> String {
            if self.same_url {
                return "http://reused:8086".into();
            }
            format!("host{}", self.host.lock().unwrap())
        }
        fn source(&self) -> Option<Script> {
            let h = *self.host.lock().unwrap();
            let load = self.loads.lock().unwrap().get(h).cloned()?;
            Some(Script(load, self.read_takes, self.reads.clone()))
        }
        fn describe_source(&self) -> String {
            "script".into()
        }
        async fn migrate(&mut self, why: &str) -> bool {
            self.migrations
                .lock()
                .unwrap()
                .push((Instant::now(), why.to_string()));
            tokio::time::sleep(self.migration_takes).await;
            *self.host.lock().unwrap() += 1;
            true
        }
    }

    fn fresh(value: f64, secs: u64) -> Reading {
        Reading::Fresh(Sample {
            value,
            clock: Clock::new(secs, 0),
        })
    }

    fn shared() -> (Arc<Shared>, mpsc::Receiver<Request>) {
        let (trigger, rx) = mpsc::channel(4);
        let shared = Arc::new(Shared {
            status: Mutex::new(Status::default()),
            running: AtomicBool::new(false),
            metrics: api::Metrics::new(),
            trigger,
            token: None,
            ready: AtomicBool::new(false),
            abort: Mutex::new(None),
            timelines: None,
        });
        (shared, rx)
    }

    fn policy(consecutive: usize, cooldown: Duration) -> TriggerPolicy {
        TriggerPolicy::new(PolicyConfig {
            threshold: 10.0,
            min_readings: 1,
            window: 5,
            cooldown,
            consecutive,
            model: Model::Last,
        })
        .unwrap()
    }

    fn poll() -> PollerConfig {
        PollerConfig {
            poll_interval: POLL,
            backoff_max: Duration::from_secs(8),
        }
    }

    /// Run the loop for `for_` of paused time; the scene and what `/status` shows.
    async fn play(
        scene: Scene,
        policy: TriggerPolicy,
        for_: Duration,
        during: impl FnOnce(Arc<Shared>) -> JoinHandle<()>,
    ) -> (Scene, Status) {
        play_in(false, scene, policy, for_, during).await.0
    }

    /// [`play`], in observe mode or not; also the metrics as `/metrics` shows them.
    async fn play_in(
        observe: bool,
        scene: Scene,
        policy: TriggerPolicy,
        for_: Duration,
        during: impl FnOnce(Arc<Shared>) -> JoinHandle<()>,
    ) -> ((Scene, Status), String) {
        let (shared, rx) = shared();
        let stop = CancellationToken::new();
        let decider = Decider::new(scene, policy, poll(), shared.clone()).observe_only(observe);
        let task = tokio::spawn(decider.run(rx, stop.clone()));
        let side = during(shared.clone());
        tokio::time::sleep(for_).await;
        stop.cancel();
        let scene = task.await.unwrap();
        side.abort();
        let status = shared.status.lock().unwrap().clone();
        ((scene, status), shared.metrics.encode())
    }

    fn nothing(_: Arc<Shared>) -> JoinHandle<()> {
        tokio::spawn(async {})
    }

    /// Milliseconds since `t0`.
    fn since(t0: Instant, at: &[Instant]) -> Vec<u128> {
        at.iter().map(|t| (*t - t0).as_millis()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn the_loop_looks_where_the_service_runs_right_after_each_reading() {
        // Each read takes 300 ms, so readings land between the poll interval's ticks: the
        // look at the journal rides on each reading's wake-up instead of a timer of its
        // own; the first reading, 300 ms after the start's look, is too close to it.
        let t0 = Instant::now();
        let scene = Scene {
            loads: Arc::new(Mutex::new(vec![VecDeque::from([fresh(1.0, 100)])])),
            read_takes: Duration::from_millis(300),
            ..Scene::default()
        };
        let (scene, _) = play(scene, policy(1, POLL), Duration::from_millis(4500), nothing).await;
        let reads = since(t0, &scene.reads.lock().unwrap());
        let looks = since(t0, &scene.looks.lock().unwrap());
        assert_eq!(reads, vec![300, 1300, 2300, 3300, 4300]);
        assert_eq!(
            looks,
            vec![0, 1300, 2300, 3300, 4300],
            "one look per reading, at once, none within half an interval of the last"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_look_slower_than_the_readings_does_not_run_once_per_queued_reading() {
        // Each look takes 2.5 s (a recovery retried against a cloud that does not answer)
        // while a reading comes every second: the readings queued meanwhile are counted
        // at once, not each after a look of its own.
        let scene = Scene {
            loads: Arc::new(Mutex::new(vec![VecDeque::from([fresh(1.0, 100)])])),
            locate_takes: Duration::from_millis(2500),
            ..Scene::default()
        };
        let ((scene, _), metrics) = play_in(
            false,
            scene,
            policy(1, POLL),
            Duration::from_secs(30),
            nothing,
        )
        .await;
        let read = scene.reads.lock().unwrap().len();
        let counted: f64 = metrics
            .lines()
            .filter(|l| l.starts_with("stateshift_readings_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert!(read >= 28, "{read} reads in 30 s");
        assert!(
            counted >= read as f64 - 3.0,
            "{counted} of {read} readings counted: the rest wait behind looks\n{metrics}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn while_no_reading_comes_the_loop_still_looks_every_poll_interval_and_a_half() {
        // A source that fails backs off (1, 2, 4 s...); no source at all never reads.
        for loads in [vec![VecDeque::new()], vec![]] {
            let t0 = Instant::now();
            let scene = Scene {
                loads: Arc::new(Mutex::new(loads.clone())),
                ..Scene::default()
            };
            let (scene, _) =
                play(scene, policy(1, POLL), Duration::from_millis(8500), nothing).await;
            let looks = since(t0, &scene.looks.lock().unwrap());
            assert_eq!(looks.first(), Some(&0), "{loads:?}");
            if loads.is_empty() {
                let each_second: Vec<u128> = (0..=8).map(|s| s * 1000).collect();
                assert_eq!(looks, each_second, "no source: the timer alone");
            }
            assert!(
                looks.windows(2).all(|w| w[1] - w[0] <= 1500) && looks.last() >= Some(&7000),
                "a look at least once per 1.5 poll intervals with {} sources: {looks:?}",
                loads.len()
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_sample_repeated_by_the_source_counts_once() {
        // One value above the threshold, collected once, read as fresh 5 times in a row
        // (the item updates every 30 s, the daemon polls every second), then a calm one.
        let mut load: VecDeque<Reading> = std::iter::repeat_n(fresh(20.0, 100), 5).collect();
        load.push_back(fresh(1.0, 130));
        let scene = Scene {
            loads: Arc::new(Mutex::new(vec![load])),
            ..Scene::default()
        };
        let (scene, status) = play(scene, policy(3, POLL), Duration::from_secs(10), nothing).await;
        assert!(
            scene.migrations.lock().unwrap().is_empty(),
            "one sample above the threshold is not three: {:?}",
            scene.migrations.lock().unwrap()
        );
        assert_eq!(status.window, vec![20.0, 1.0], "each sample once");
    }

    #[tokio::test(start_paused = true)]
    async fn three_distinct_samples_above_the_threshold_trigger_once() {
        let load: VecDeque<Reading> = (0..3).map(|i| fresh(20.0, 100 + i)).collect();
        let scene = Scene {
            loads: Arc::new(Mutex::new(vec![load, VecDeque::from([fresh(1.0, 200)])])),
            ..Scene::default()
        };
        let (scene, status) = play(
            scene,
            policy(3, Duration::from_secs(3600)),
            Duration::from_secs(20),
            nothing,
        )
        .await;
        let m = scene.migrations.lock().unwrap();
        assert_eq!(m.len(), 1, "{m:?}");
        assert!(m[0].1.contains("prediction 20.00 > threshold 10"), "{m:?}");
        assert_eq!(status.source_url, "host1");
        assert_eq!(status.window, vec![1.0], "the new host's readings only");
    }

    #[tokio::test(start_paused = true)]
    async fn in_observe_mode_a_trigger_is_recorded_not_acted_on_and_a_request_still_migrates() {
        // Host 0 stays loaded: in act mode the third reading migrates (above). Observed,
        // each trigger is recorded and starts the cooldown (10 s) as a migration would.
        let load: VecDeque<Reading> = (0..60).map(|i| fresh(20.0, 100 + i)).collect();
        let scene = Scene {
            loads: Arc::new(Mutex::new(vec![load, VecDeque::from([fresh(1.0, 900)])])),
            ..Scene::default()
        };
        let ((scene, status), metrics) = play_in(
            true,
            scene,
            policy(3, Duration::from_secs(10)),
            Duration::from_secs(30),
            nothing,
        )
        .await;
        assert!(
            scene.migrations.lock().unwrap().is_empty(),
            "observe mode never migrates by itself: {:?}",
            scene.migrations.lock().unwrap()
        );
        let n = status.would_migrate.len();
        assert!((2..=3).contains(&n), "{:?}", status.would_migrate);
        for w in &status.would_migrate {
            assert_eq!(
                w.decision,
                "would migrate now: prediction 20.00 > threshold 10 for 3 polls (observe mode)"
            );
            assert_eq!(w.window, vec![20.0; w.window.len()]);
            assert_eq!((w.prediction, w.threshold), (Some(20.0), 10.0));
        }
        assert_eq!(status.source_url, "host0", "the service did not move");
        assert!(
            metrics.contains(&format!("stateshift_would_migrate_total {n}")),
            "{metrics}"
        );

        // A request still migrates.
        let load: VecDeque<Reading> = (0..60).map(|i| fresh(1.0, 100 + i)).collect();
        let scene = Scene {
            loads: Arc::new(Mutex::new(vec![load.clone(), load])),
            ..Scene::default()
        };
        let ((scene, status), _) = play_in(
            true,
            scene,
            policy(3, Duration::from_secs(10)),
            Duration::from_secs(10),
            |shared| {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    shared
                        .trigger
                        .send(Request::now("manual: POST /migrate"))
                        .await
                        .unwrap();
                })
            },
        )
        .await;
        let m = scene.migrations.lock().unwrap();
        assert_eq!(m.len(), 1, "{m:?}");
        assert_eq!(m[0].1, "manual: POST /migrate");
        assert!(status.would_migrate.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn every_fresh_reading_is_recorded_once_for_replay() {
        // A sample repeated by the source counts once, and is recorded once, with the
        // source's own clock.
        let load: VecDeque<Reading> = [
            fresh(2.0, 1_790_000_000),
            fresh(2.0, 1_790_000_000),
            fresh(3.5, 1_790_000_060),
            fresh(4.0, 1_790_000_120),
        ]
        .into();
        let scene = Scene {
            loads: Arc::new(Mutex::new(vec![load])),
            ..Scene::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("readings.csv");
        let (shared, rx) = shared();
        let stop = CancellationToken::new();
        let decider = Decider::new(scene, policy(3, POLL), poll(), shared)
            .record_readings(Some(path.clone()));
        let task = tokio::spawn(decider.run(rx, stop.clone()));
        tokio::time::sleep(Duration::from_secs(8)).await;
        stop.cancel();
        task.await.unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "timestamp,value\n2026-09-21T14:13:20.000Z,2\n2026-09-21T14:14:20.000Z,3.5\n2026-09-21T14:15:20.000Z,4\n"
        );
        let r = crate::predict::replay::parse(&text).unwrap();
        assert_eq!(r.len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_move_by_someone_else_clears_the_window_and_starts_the_cooldown() {
        move_by_someone_else(false).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_move_to_a_new_vm_at_a_reused_address_is_seen_too() {
        move_by_someone_else(true).await;
    }

    async fn move_by_someone_else(same_url: bool) {
        // Host 0 is loaded for two samples (the third would trigger), then the service is
        // moved by a CLI migration; host 1 is loaded too, but the cooldown holds.
        let load0: VecDeque<Reading> = (0..2).map(|i| fresh(20.0, 100 + i)).collect();
        let load1: VecDeque<Reading> = (0..30).map(|i| fresh(20.0, 300 + i)).collect();
        let scene = Scene {
            loads: Arc::new(Mutex::new(vec![load0, load1])),
            same_url,
            ..Scene::default()
        };
        let host = scene.host.clone();
        let (scene, status) = play(
            scene,
            policy(3, Duration::from_secs(600)),
            Duration::from_secs(30),
            move |_| {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(2500)).await;
                    *host.lock().unwrap() = 1;
                })
            },
        )
        .await;
        assert!(
            scene.migrations.lock().unwrap().is_empty(),
            "the old host's readings and the cooldown hold: {:?}",
            scene.migrations.lock().unwrap()
        );
        let want = if same_url {
            "http://reused:8086"
        } else {
            "host1"
        };
        assert_eq!(status.source_url, want);
        assert!(
            status.last_decision.starts_with("cooling down"),
            "{}",
            status.last_decision
        );
        assert!(status.window.iter().all(|v| *v == 20.0) && !status.window.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_queued_before_a_predicted_migration_does_not_start_a_second_one() {
        let load: VecDeque<Reading> = (0..3).map(|i| fresh(20.0, 100 + i)).collect();
        let scene = Scene {
            // Host 1 has no load source: nothing after the migration overwrites the decision.
            loads: Arc::new(Mutex::new(vec![load])),
            migration_takes: Duration::from_secs(5),
            ..Scene::default()
        };
        // A request accepted at 1.5 s that the loop reads only after the predicted
        // migration (third reading, at 2 s) started: as if it had waited in the queue while
        // the loop was busy deciding.
        let t0 = Instant::now();
        let (scene, status) = play(
            scene,
            policy(3, Duration::from_secs(3600)),
            Duration::from_secs(30),
            move |shared| {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(2500)).await;
                    let r = Request {
                        why: "manual: POST /migrate".into(),
                        at: t0 + Duration::from_millis(1500),
                    };
                    shared.trigger.try_send(r).unwrap();
                })
            },
        )
        .await;
        let m = scene.migrations.lock().unwrap();
        assert_eq!(m.len(), 1, "no second migration back to back: {m:?}");
        assert!(
            status.last_decision.contains("answered by the migration"),
            "{}",
            status.last_decision
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_after_a_migration_is_honoured_even_in_the_cooldown() {
        let load: VecDeque<Reading> = (0..3).map(|i| fresh(20.0, 100 + i)).collect();
        let scene = Scene {
            loads: Arc::new(Mutex::new(vec![
                load,
                VecDeque::from([fresh(1.0, 200)]),
                VecDeque::from([fresh(1.0, 300)]),
            ])),
            migration_takes: Duration::from_secs(5),
            ..Scene::default()
        };
        let (scene, status) = play(
            scene,
            policy(3, Duration::from_secs(3600)),
            Duration::from_secs(30),
            |shared| {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(15)).await;
                    shared
                        .trigger
                        .try_send(Request::now("manual: POST /migrate"))
                        .unwrap();
                })
            },
        )
        .await;
        let m = scene.migrations.lock().unwrap();
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(m[1].1, "manual: POST /migrate");
        assert_eq!(status.source_url, "host2");
    }

    #[tokio::test(start_paused = true)]
    async fn a_signal_during_a_backoff_or_a_slow_read_is_seen_at_once() {
        struct Hangs;
        impl MetricSource for Hangs {
            type Error = Scripted;
            fn describe(&self) -> String {
                "hangs".into()
            }
            async fn read(&mut self) -> Result<Reading, Scripted> {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Err(Scripted)
            }
        }
        struct Slow;
        impl World for Slow {
            type Source = Hangs;
            async fn locate(&mut self) -> String {
                "host0".into()
            }
            fn url(&self) -> String {
                "host0".into()
            }
            fn source(&self) -> Option<Hangs> {
                Some(Hangs)
            }
            fn describe_source(&self) -> String {
                "hangs".into()
            }
            async fn migrate(&mut self, _: &str) -> bool {
                false
            }
        }
        let (shared, rx) = shared();
        let stop = CancellationToken::new();
        let task =
            tokio::spawn(Decider::new(Slow, policy(1, POLL), poll(), shared).run(rx, stop.clone()));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let asked = Instant::now();
        stop.cancel();
        task.await.unwrap();
        assert_eq!(
            Instant::now(),
            asked,
            "stopped without waiting for the read"
        );
    }
}
