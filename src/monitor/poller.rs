//! The poller: reads a [`MetricSource`] every `poll_interval` and hands each new value to
//! whoever decides (the daemon's trigger policy, through [`Poller::feed`]).
//!
//! Rules:
//! - only a [`Reading::Fresh`] value with a clock newer than the last one pushed is pushed;
//!   stale readings, missing data and repeats of the same sample (a source that answers
//!   with the same item value until it goes stale) never are. A poller restarted on the same
//!   metric resumes after the last clock pushed ([`Poller::resume_after`]);
//! - a failed read is retried after a bounded exponential backoff ([`crate::util::Retry`]:
//!   from `poll_interval`, doubling, capped at `backoff_max`, jittered but never sooner
//!   than `poll_interval`); the first successful read resets it. Permanent
//!   errors (wrong password, unknown item) are retried the same way, logged at ERROR:
//!   an operator can fix them without restarting the daemon;
//! - the poller never panics and stops when its [`CancellationToken`] is cancelled, also
//!   in the middle of a read or a wait.
//!
//! Reads are scheduled start to start, so a slow read does not stretch the interval.
//! Time comes from a [`Timer`]: [`TokioTimer`] in production (it follows tokio's paused
//! clock when a test pauses it), a virtual clock in this module's tests.
//!
//! Every read publishes a [`Snapshot`] on a `watch` channel ([`Poller::subscribe`]) for the
//! daemon's status and metrics.

use std::future::Future;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Clock, Freshness, MetricSource, Reading, Sample, SourceError};

/// Default time between reads (DESIGN.md §1).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(60);
/// The shortest poll interval allowed (Zabbix items update at most once a second).
pub const MIN_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Default cap of the backoff while the source fails.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Settings of a [`Poller`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollerConfig {
    /// Time between reads (at least [`MIN_POLL_INTERVAL`]).
    pub poll_interval: Duration,
    /// The longest wait between reads while the source fails (at least `poll_interval`).
    pub backoff_max: Duration,
}

impl Default for PollerConfig {
    fn default() -> Self {
        PollerConfig {
            poll_interval: DEFAULT_POLL_INTERVAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
        }
    }
}

impl PollerConfig {
    /// Check the settings; the error names the setting and what is allowed.
    pub fn validate(&self) -> Result<(), PollerError> {
        if self.poll_interval < MIN_POLL_INTERVAL {
            return Err(PollerError::InvalidConfig {
                field: "poll_interval",
                problem: format!(
                    "must be at least 1s, got {}",
                    humantime::format_duration(self.poll_interval)
                ),
            });
        }
        if self.backoff_max < self.poll_interval {
            return Err(PollerError::InvalidConfig {
                field: "backoff_max",
                problem: format!(
                    "must be at least poll_interval ({}), got {}",
                    humantime::format_duration(self.poll_interval),
                    humantime::format_duration(self.backoff_max)
                ),
            });
        }
        Ok(())
    }
}

/// Errors of the poller itself (its source's errors are retried, never returned).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PollerError {
    #[error("monitor: {field}: {problem}")]
    InvalidConfig {
        field: &'static str,
        problem: String,
    },
}

impl PollerError {
    /// Never: a bad setting stays bad.
    pub fn is_transient(&self) -> bool {
        false
    }
}

/// Where the poller gets the time and how it waits.
pub trait Timer: Send + Sync + 'static {
    /// Now, on a monotonic clock.
    fn now(&self) -> Instant;
    /// Wait until `deadline`.
    fn sleep_until(&self, deadline: Instant) -> impl Future<Output = ()> + Send;
}

/// tokio's clock (paused and advanced by tests that pause it).
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioTimer;

impl Timer for TokioTimer {
    fn now(&self) -> Instant {
        Instant::now()
    }
    fn sleep_until(&self, deadline: Instant) -> impl Future<Output = ()> + Send {
        tokio::time::sleep_until(deadline)
    }
}

/// What one read did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// A fresh new value, pushed.
    Pushed(Sample),
    /// Fresh, but the value already pushed: nothing new.
    Unchanged(Sample),
    /// The metric stopped moving: nothing pushed.
    Stale(Sample),
    /// The metric was never collected: nothing pushed.
    NoData,
    /// The read failed: nothing pushed, the next read is backed off.
    Failed { transient: bool },
}

/// What the poller has seen so far, published after every read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// The last successful reading.
    pub last_reading: Option<Reading>,
    /// The last value pushed.
    pub last_pushed: Option<Sample>,
    /// Reads attempted.
    pub reads: u64,
    /// Values pushed.
    pub pushed: u64,
    /// Reads that were stale.
    pub stale: u64,
    /// Reads that found no data.
    pub no_data: u64,
    /// Reads that failed.
    pub failures: u64,
    /// Failures in a row (0 after a success).
    pub consecutive_failures: u32,
    /// The wait before the next read.
    pub next_delay: Duration,
    /// The last error (cleared by a successful read); never contains secrets.
    pub last_error: Option<String>,
}

/// Polls a [`MetricSource`], pushing new values. See the module documentation.
#[derive(Debug)]
pub struct Poller<S, T = TokioTimer> {
    source: S,
    timer: T,
    config: PollerConfig,
    feed: Option<mpsc::UnboundedSender<Outcome>>,
    /// The waits after failures in a row ([`crate::util::Retry`], no budget).
    backoff: crate::util::Retry,
    last_pushed: Option<Clock>,
    last_state: Option<Freshness>,
    snapshot: Snapshot,
    tx: watch::Sender<Snapshot>,
}

impl<S: MetricSource> Poller<S, TokioTimer> {
    /// A poller of `source`, on tokio's clock.
    pub fn new(source: S, config: PollerConfig) -> Result<Self, PollerError> {
        Poller::with_timer(source, config, TokioTimer)
    }
}

impl<S: MetricSource, T: Timer> Poller<S, T> {
    /// A poller on the given clock.
    pub fn with_timer(source: S, config: PollerConfig, timer: T) -> Result<Self, PollerError> {
        config.validate()?;
        let snapshot = Snapshot {
            next_delay: config.poll_interval,
            ..Snapshot::default()
        };
        let (tx, _) = watch::channel(snapshot.clone());
        Ok(Poller {
            source,
            timer,
            config,
            feed: None,
            backoff: crate::util::Retry::unbounded(config.poll_interval, config.backoff_max),
            last_pushed: None,
            last_state: None,
            snapshot,
            tx,
        })
    }

    /// Send the outcome of every read to `tx`, the values pushed as [`Outcome::Pushed`]
    /// (a closed receiver is ignored: reads are still counted in the snapshot).
    pub fn feed(mut self, tx: mpsc::UnboundedSender<Outcome>) -> Self {
        self.feed = Some(tx);
        self
    }

    /// Push only values collected after `clock`: a poller restarted on the metric another
    /// one already pushed from never pushes the same sample twice.
    pub fn resume_after(mut self, clock: Option<Clock>) -> Self {
        self.last_pushed = clock;
        self
    }

    /// The source.
    pub fn source_mut(&mut self) -> &mut S {
        &mut self.source
    }

    /// The latest snapshot.
    pub fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// A receiver of the snapshot published after every read.
    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.tx.subscribe()
    }

    /// The wait before the next read: the poll interval, or the backoff after failures.
    pub fn next_delay(&self) -> Duration {
        self.snapshot.next_delay
    }

    /// Poll until `token` is cancelled; returns the poller (source, snapshot) when stopped.
    pub async fn run(mut self, token: CancellationToken) -> Self {
        tracing::info!(source = %self.source.describe(), poll_interval = %humantime::format_duration(self.config.poll_interval), "poller started");
        let mut next = self.timer.now();
        loop {
            tokio::select! {
                biased;
                _ = token.cancelled() => break,
                _ = self.timer.sleep_until(next) => {}
            }
            let started = self.timer.now();
            tokio::select! {
                biased;
                _ = token.cancelled() => break,
                _ = self.poll_once() => {}
            }
            next = started + self.snapshot.next_delay;
        }
        tracing::info!(source = %self.source.describe(), reads = self.snapshot.reads, pushed = self.snapshot.pushed, "poller stopped");
        self
    }

    /// One read: push the value if it is fresh and new, set the next delay, publish the
    /// snapshot.
    pub async fn poll_once(&mut self) -> Outcome {
        let result = self.source.read().await;
        self.snapshot.reads += 1;
        let outcome = match result {
            Ok(reading) => {
                if self.snapshot.consecutive_failures > 0 {
                    tracing::info!(source = %self.source.describe(), failures = self.snapshot.consecutive_failures, "source answers again");
                }
                self.backoff.reset();
                self.snapshot.consecutive_failures = 0;
                self.snapshot.last_error = None;
                self.snapshot.next_delay = self.config.poll_interval;
                self.snapshot.last_reading = Some(reading);
                self.on_reading(reading)
            }
            Err(e) => {
                let transient = e.is_transient();
                // Jittered, but never sooner than the poll interval.
                let delay = self
                    .backoff
                    .next()
                    .unwrap_or(self.config.backoff_max)
                    .max(self.config.poll_interval);
                self.snapshot.failures += 1;
                self.snapshot.consecutive_failures += 1;
                self.snapshot.next_delay = delay;
                self.snapshot.last_error = Some(e.to_string());
                let retry_in = humantime::format_duration(delay);
                if transient {
                    tracing::warn!(source = %self.source.describe(), error = %e, failures = self.snapshot.consecutive_failures, %retry_in, "read failed; backing off");
                } else {
                    tracing::error!(source = %self.source.describe(), error = %e, failures = self.snapshot.consecutive_failures, %retry_in, "read failed and needs an operator; retrying anyway");
                }
                Outcome::Failed { transient }
            }
        };
        self.tx.send_replace(self.snapshot.clone());
        if let Some(tx) = &self.feed {
            let _ = tx.send(outcome);
        }
        outcome
    }

    fn on_reading(&mut self, reading: Reading) -> Outcome {
        let state = reading.freshness();
        if self.last_state != Some(state) {
            match state {
                Freshness::Fresh => {
                    tracing::info!(source = %self.source.describe(), %reading, "metric is fresh")
                }
                Freshness::Stale => {
                    tracing::warn!(source = %self.source.describe(), %reading, "metric stopped moving; not pushing it")
                }
                Freshness::NoData => {
                    tracing::warn!(source = %self.source.describe(), "metric has no data yet")
                }
            }
            self.last_state = Some(state);
        }
        match reading {
            Reading::Fresh(s) if self.last_pushed.is_none_or(|c| s.clock > c) => {
                if !s.value.is_finite() {
                    tracing::error!(source = %self.source.describe(), value = s.value, "source returned a value that is not a number; not pushing it");
                    return Outcome::Unchanged(s);
                }
                self.last_pushed = Some(s.clock);
                self.snapshot.last_pushed = Some(s);
                self.snapshot.pushed += 1;
                tracing::debug!(value = s.value, clock = %s.clock, "reading pushed");
                Outcome::Pushed(s)
            }
            Reading::Fresh(s) => Outcome::Unchanged(s),
            Reading::Stale(s) => {
                self.snapshot.stale += 1;
                Outcome::Stale(s)
            }
            Reading::NoData => {
                self.snapshot.no_data += 1;
                Outcome::NoData
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    /// A clock that jumps to every deadline at once: a single task's waits take no time,
    /// and every read is stamped with the virtual instant it happened at.
    #[derive(Clone)]
    struct VirtualTimer(Arc<Mutex<Instant>>);

    impl VirtualTimer {
        fn new() -> Self {
            VirtualTimer(Arc::new(Mutex::new(Instant::now())))
        }
    }

    impl Timer for VirtualTimer {
        fn now(&self) -> Instant {
            *self.0.lock().unwrap()
        }
        fn sleep_until(&self, deadline: Instant) -> impl Future<Output = ()> + Send {
            let mut now = self.0.lock().unwrap();
            if deadline > *now {
                *now = deadline;
            }
            std::future::ready(())
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("scripted failure (transient: {0})")]
    struct Scripted(bool);

    impl SourceError for Scripted {
        fn is_transient(&self) -> bool {
            self.0
        }
    }

    /// Plays a script of read results, then cancels the token (and fails the last read).
    struct Script {
        steps: VecDeque<Result<Reading, Scripted>>,
        timer: VirtualTimer,
        token: CancellationToken,
        reads_at: Vec<Instant>,
    }

    impl MetricSource for Script {
        type Error = Scripted;
        fn describe(&self) -> String {
            "script".into()
        }
        async fn read(&mut self) -> Result<Reading, Scripted> {
            self.reads_at.push(self.timer.now());
            match self.steps.pop_front() {
                Some(step) => step,
                None => {
                    self.token.cancel();
                    Err(Scripted(true))
                }
            }
        }
    }

    fn s(value: f64, secs: u64) -> Sample {
        Sample {
            value,
            clock: Clock::new(secs, 0),
        }
    }

    fn config(poll: u64, max: u64) -> PollerConfig {
        PollerConfig {
            poll_interval: Duration::from_secs(poll),
            backoff_max: Duration::from_secs(max),
        }
    }

    async fn play(
        steps: Vec<Result<Reading, Scripted>>,
        config: PollerConfig,
    ) -> (Poller<Script, VirtualTimer>, Vec<f64>, Vec<f64>) {
        let timer = VirtualTimer::new();
        let token = CancellationToken::new();
        let script = Script {
            steps: steps.into(),
            timer: timer.clone(),
            token: token.clone(),
            reads_at: Vec::new(),
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let poller = Poller::with_timer(script, config, timer).unwrap().feed(tx);
        let mut poller = poller.run(token).await;
        let reads = &poller.source_mut().reads_at;
        let gaps = reads
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect();
        let mut pushed = Vec::new();
        while let Ok(o) = rx.try_recv() {
            if let Outcome::Pushed(s) = o {
                pushed.push(s.value);
            }
        }
        (poller, gaps, pushed)
    }

    #[tokio::test]
    async fn only_fresh_new_readings_are_pushed() {
        let steps = vec![
            Ok(Reading::NoData),
            Ok(Reading::Fresh(s(1.0, 100))),
            Ok(Reading::Fresh(s(1.0, 100))),
            Ok(Reading::Stale(s(1.0, 100))),
            Ok(Reading::Fresh(s(2.0, 101))),
            Ok(Reading::Stale(s(2.0, 101))),
            Ok(Reading::NoData),
            Ok(Reading::Fresh(s(3.0, 103))),
            // a clock going back is not new
            Ok(Reading::Fresh(s(9.0, 102))),
        ];
        let (poller, gaps, pushed) = play(steps, config(1, 8)).await;
        assert_eq!(pushed, &[1.0, 2.0, 3.0]);
        let snap = poller.snapshot();
        assert_eq!(
            (snap.pushed, snap.stale, snap.no_data),
            (3, 2, 2),
            "{snap:?}"
        );
        assert_eq!(snap.last_pushed, Some(s(3.0, 103)));
        assert_eq!(gaps, vec![1.0; 9], "one read per poll interval");
    }

    #[tokio::test]
    async fn failures_back_off_exponentially_up_to_the_cap_then_polling_resumes() {
        let mut steps = vec![Ok(Reading::Fresh(s(1.0, 100)))];
        steps.extend((0..6).map(|_| Err(Scripted(true))));
        steps.push(Ok(Reading::Fresh(s(2.0, 200))));
        steps.push(Ok(Reading::Fresh(s(3.0, 201))));
        let (poller, gaps, pushed) = play(steps, config(1, 8)).await;
        // read, then 6 failures: waits 1 (interval), then steps 1, 2, 4, 8, 8, 8 each
        // jittered to 50–100 % but never below the interval; then back to 1.
        let steps = [1.0, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0, 1.0, 1.0];
        assert_eq!(gaps.len(), steps.len(), "{gaps:?}");
        for (gap, step) in gaps.iter().zip(steps) {
            assert!((f64::max(1.0, step / 2.0)..=step).contains(gap), "{gaps:?}");
        }
        assert!(gaps[4..7].iter().all(|g| *g <= 8.0), "capped: {gaps:?}");
        assert_eq!(pushed, &[1.0, 2.0, 3.0]);
        assert_eq!(
            poller.snapshot().failures,
            7,
            "six scripted + the final one"
        );
    }

    #[tokio::test]
    async fn permanent_errors_are_retried_with_backoff_and_the_error_is_kept() {
        let steps = vec![
            Err(Scripted(false)),
            Err(Scripted(false)),
            Ok(Reading::Fresh(s(4.0, 10))),
        ];
        let (poller, gaps, pushed) = play(steps, config(2, 60)).await;
        assert_eq!(gaps[0], 2.0, "the first retry waits the interval");
        assert!((2.0..=4.0).contains(&gaps[1]), "{gaps:?}");
        assert_eq!(gaps[2], 2.0, "a success resets the schedule: {gaps:?}");
        assert_eq!(pushed, &[4.0]);
        let snap = poller.snapshot();
        assert_eq!(snap.consecutive_failures, 1, "the final scripted failure");
        assert!(snap.last_error.as_deref().unwrap().contains("scripted"));
    }

    #[tokio::test]
    async fn snapshots_are_published_after_every_read() {
        let timer = VirtualTimer::new();
        let token = CancellationToken::new();
        let script = Script {
            steps: vec![Ok(Reading::Fresh(s(1.0, 1))), Err(Scripted(true))].into(),
            timer: timer.clone(),
            token: token.clone(),
            reads_at: Vec::new(),
        };
        let mut poller = Poller::with_timer(script, config(1, 4), timer).unwrap();
        let rx = poller.subscribe();
        assert_eq!(poller.poll_once().await, Outcome::Pushed(s(1.0, 1)));
        assert_eq!(rx.borrow().last_pushed, Some(s(1.0, 1)));
        assert_eq!(
            poller.poll_once().await,
            Outcome::Failed { transient: true }
        );
        let snap = rx.borrow().clone();
        assert_eq!((snap.reads, snap.failures), (2, 1));
        assert_eq!(snap.next_delay, Duration::from_secs(1));
        assert_eq!(snap.last_reading, Some(Reading::Fresh(s(1.0, 1))));
    }

    #[tokio::test]
    async fn cancelling_stops_a_poller_that_is_waiting() {
        struct Forever;
        impl MetricSource for Forever {
            type Error = Scripted;
            fn describe(&self) -> String {
                "forever".into()
            }
            async fn read(&mut self) -> Result<Reading, Scripted> {
                Ok(Reading::Fresh(s(1.0, 1)))
            }
        }
        let token = CancellationToken::new();
        let poller = Poller::new(Forever, PollerConfig::default()).unwrap();
        let mut rx = poller.subscribe();
        let task = tokio::spawn(poller.run(token.clone()));
        rx.changed().await.unwrap();
        token.cancel();
        let poller = tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops at once, not after the 60 s interval")
            .unwrap();
        assert_eq!(poller.snapshot().reads, 1);
    }

    #[tokio::test]
    async fn a_resumed_poller_never_pushes_a_sample_already_pushed() {
        let timer = VirtualTimer::new();
        let script = Script {
            steps: vec![
                Ok(Reading::Fresh(s(1.0, 100))),
                Ok(Reading::Fresh(s(2.0, 101))),
            ]
            .into(),
            timer: timer.clone(),
            token: CancellationToken::new(),
            reads_at: Vec::new(),
        };
        let mut poller = Poller::with_timer(script, config(1, 4), timer)
            .unwrap()
            .resume_after(Some(Clock::new(100, 0)));
        assert_eq!(poller.poll_once().await, Outcome::Unchanged(s(1.0, 100)));
        assert_eq!(poller.poll_once().await, Outcome::Pushed(s(2.0, 101)));
    }

    #[test]
    fn poll_interval_below_one_second_is_refused_with_the_setting_named() {
        let err = PollerConfig {
            poll_interval: Duration::from_millis(500),
            ..PollerConfig::default()
        }
        .validate()
        .unwrap_err();
        assert!(err.to_string().contains("poll_interval"), "{err}");
        assert!(config(1, 1).validate().is_ok());
        assert!(config(10, 5).validate().is_err());
        assert_eq!(
            PollerConfig::default().poll_interval,
            Duration::from_secs(60)
        );
    }

    #[tokio::test]
    async fn the_scripted_source_passes_the_conformance_checks() {
        let timer = VirtualTimer::new();
        let mut script = Script {
            steps: vec![
                Ok(Reading::NoData),
                Ok(Reading::Fresh(s(1.0, 1))),
                Ok(Reading::Stale(s(1.0, 1))),
                Ok(Reading::Fresh(s(2.0, 2))),
            ]
            .into(),
            timer,
            token: CancellationToken::new(),
            reads_at: Vec::new(),
        };
        let readings =
            crate::monitor::conformance::readings_are_consistent(&mut script, 4, Duration::ZERO)
                .await
                .unwrap();
        assert_eq!(readings.len(), 4);
    }
}
