//! When to migrate: the trigger policy.
//!
//! Each reading goes through [`TriggerPolicy::on_reading`], which pushes it into the
//! window, predicts the next reading and returns a [`Decision`]: the window, the
//! prediction, the threshold and the [`Reason`], ready to be logged. Rules, in order:
//!
//! 1. no trigger while a migration runs ([`Reason::MigrationRunning`]);
//! 2. no trigger during the cooldown after a migration ended, successful or not
//!    ([`Reason::CoolingDown`]);
//! 3. no prediction with fewer than `min_readings` readings ([`Reason::TooFewReadings`]);
//! 4. a prediction at or below the threshold resets the anti-flap count
//!    ([`Reason::BelowThreshold`]);
//! 5. anti-flap: only the `consecutive`-th prediction in a row above the threshold
//!    triggers ([`Reason::Building`] before that), and only once per such run
//!    ([`Reason::AlreadyTriggered`] after it) — until the run ends or a migration finishes.
//!
//! Predictions are counted toward the anti-flap run even while rules 1–2 hold, so that an
//! overload that persists through a cooldown triggers as soon as the cooldown is over.
//!
//! Time is passed in: the policy never reads a clock, so tests drive it with `Instant`s
//! they compute.

use std::fmt;
use std::time::{Duration, Instant};

use super::{Model, PredictError, Predictor, Window};

/// Default threshold on the predicted load (DESIGN.md §1).
pub const DEFAULT_THRESHOLD: f64 = 10.0;
/// Default number of readings needed before predicting (DESIGN.md §1).
pub const DEFAULT_MIN_READINGS: usize = 3;
/// Default quiet time after a migration ends before another may trigger.
pub const DEFAULT_COOLDOWN: Duration = Duration::from_secs(15 * 60);
/// Default anti-flap count: predictions in a row above the threshold needed to trigger.
/// Measured on the six traces (`docs/prediction.md`): 3 gives one trigger per sustained
/// overload on every trace and catches all of them; 2 still fires up to 13 times per
/// sustained overload on spiky traces; 4 misses up to 6 in 7 of them.
pub const DEFAULT_CONSECUTIVE: usize = 3;

/// Settings of a [`TriggerPolicy`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyConfig {
    /// Trigger when the prediction is strictly above this.
    pub threshold: f64,
    /// Readings needed before a prediction is made (1..=window).
    pub min_readings: usize,
    /// Window capacity (at least 1).
    pub window: usize,
    /// Quiet time after a migration ends.
    pub cooldown: Duration,
    /// Predictions in a row above the threshold needed to trigger (at least 1).
    pub consecutive: usize,
    /// The predictor.
    pub model: Model,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            threshold: DEFAULT_THRESHOLD,
            min_readings: DEFAULT_MIN_READINGS,
            window: super::window::DEFAULT_CAPACITY,
            cooldown: DEFAULT_COOLDOWN,
            consecutive: DEFAULT_CONSECUTIVE,
            model: Model::Guarded,
        }
    }
}

impl PolicyConfig {
    /// Check the settings; the error names the setting and what is allowed.
    pub fn validate(&self) -> Result<(), PredictError> {
        let invalid = |field, problem: String| Err(PredictError::InvalidPolicy { field, problem });
        if !self.threshold.is_finite() {
            return invalid(
                "threshold",
                format!("must be a finite number, got {}", self.threshold),
            );
        }
        if self.window == 0 {
            return invalid("window", "must be at least 1, got 0".into());
        }
        if self.min_readings == 0 || self.min_readings > self.window {
            return invalid(
                "min_readings",
                format!(
                    "must be between 1 and the window ({}), got {}",
                    self.window, self.min_readings
                ),
            );
        }
        if self.consecutive == 0 {
            return invalid("consecutive", "must be at least 1, got 0".into());
        }
        Ok(())
    }
}

/// Why a [`Decision`] came out as it did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Migrate now.
    Trigger,
    /// A migration is running.
    MigrationRunning,
    /// A migration ended less than the cooldown ago.
    CoolingDown {
        /// Time left until triggers are allowed again.
        remaining: Duration,
    },
    /// Not enough readings to predict.
    TooFewReadings {
        /// Readings in the window.
        have: usize,
        /// Readings needed.
        need: usize,
    },
    /// The prediction is at or below the threshold.
    BelowThreshold,
    /// Above the threshold, but not yet `needed` predictions in a row.
    Building {
        /// Predictions in a row above the threshold so far.
        consecutive: usize,
        /// Predictions in a row needed.
        needed: usize,
    },
    /// Above the threshold, and this run of predictions has already triggered.
    AlreadyTriggered,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Trigger => f.write_str("trigger"),
            Reason::MigrationRunning => f.write_str("migration running"),
            Reason::CoolingDown { remaining } => {
                write!(f, "cooling down ({}s left)", remaining.as_secs())
            }
            Reason::TooFewReadings { have, need } => {
                write!(f, "too few readings ({have} of {need})")
            }
            Reason::BelowThreshold => f.write_str("below threshold"),
            Reason::Building {
                consecutive,
                needed,
            } => write!(
                f,
                "above threshold {consecutive} of {needed} times in a row"
            ),
            Reason::AlreadyTriggered => f.write_str("above threshold, already triggered"),
        }
    }
}

/// One decision, with everything the caller logs and exports.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The window the prediction was made from, oldest first.
    pub window: Vec<f64>,
    /// The predicted next reading (`None` with too few readings).
    pub prediction: Option<f64>,
    /// The threshold it was compared with.
    pub threshold: f64,
    /// Predictions in a row above the threshold, this one included.
    pub consecutive: usize,
    /// The predictor.
    pub model: Model,
    /// For the guarded model: whether its skill gate let GM(1,1) through (else the
    /// prediction is the last value).
    pub gate_open: Option<bool>,
    /// Why.
    pub reason: Reason,
}

impl Decision {
    /// True when the caller should start a migration now.
    pub fn trigger(&self) -> bool {
        self.reason == Reason::Trigger
    }
}

impl fmt::Display for Decision {
    /// `trigger=false reason="below threshold" prediction=4.2 threshold=10 window=[…]`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "trigger={} reason=\"{}\" ", self.trigger(), self.reason)?;
        match self.prediction {
            Some(p) => write!(f, "prediction={p}")?,
            None => f.write_str("prediction=none")?,
        }
        write!(
            f,
            " threshold={} model={} window={:?}",
            self.threshold, self.model, self.window
        )
    }
}

/// The trigger policy with its window, predictor and migration state.
#[derive(Debug, Clone)]
pub struct TriggerPolicy {
    config: PolicyConfig,
    window: Window,
    predictor: Predictor,
    consecutive: usize,
    fired: bool,
    running: bool,
    cooldown_until: Option<Instant>,
}

impl TriggerPolicy {
    /// A policy with an empty window; the settings are validated.
    pub fn new(config: PolicyConfig) -> Result<Self, PredictError> {
        config.validate()?;
        Ok(TriggerPolicy {
            config,
            window: Window::new(config.window)?,
            predictor: Predictor::new(config.model),
            consecutive: 0,
            fired: false,
            running: false,
            cooldown_until: None,
        })
    }

    /// Take a new reading at `now` and decide. A NaN or infinite reading is refused (the
    /// state is unchanged); a stale or missing reading should not be passed at all.
    pub fn on_reading(&mut self, value: f64, now: Instant) -> Result<Decision, PredictError> {
        self.window.push(value)?;
        self.predictor.observe(value);
        let values = self.window.values();
        let prediction = self.predictor.predict(values, self.config.min_readings);
        // The skill record only changes in `observe`, so this is the state the prediction
        // was made with.
        let gate_open = match self.config.model {
            Model::Guarded if prediction.is_some() => {
                Some(self.predictor.guarded().skill().gate_open())
            }
            _ => None,
        };
        let above = prediction.is_some_and(|p| p > self.config.threshold);
        if above {
            self.consecutive = self.consecutive.saturating_add(1);
        } else {
            self.consecutive = 0;
            self.fired = false;
        }
        let reason = self.reason(prediction, above, now);
        if reason == Reason::Trigger {
            self.fired = true;
        }
        Ok(Decision {
            window: values.to_vec(),
            prediction,
            threshold: self.config.threshold,
            consecutive: self.consecutive,
            model: self.config.model,
            gate_open,
            reason,
        })
    }

    fn reason(&self, prediction: Option<f64>, above: bool, now: Instant) -> Reason {
        if self.running {
            return Reason::MigrationRunning;
        }
        if let Some(until) = self.cooldown_until {
            if now < until {
                return Reason::CoolingDown {
                    remaining: until.saturating_duration_since(now),
                };
            }
        }
        if prediction.is_none() {
            return Reason::TooFewReadings {
                have: self.window.len(),
                need: self.config.min_readings,
            };
        }
        if !above {
            return Reason::BelowThreshold;
        }
        if self.consecutive < self.config.consecutive {
            return Reason::Building {
                consecutive: self.consecutive,
                needed: self.config.consecutive,
            };
        }
        if self.fired {
            return Reason::AlreadyTriggered;
        }
        Reason::Trigger
    }

    /// A migration has started (triggered or by the operator): no trigger until it ends.
    pub fn migration_started(&mut self, _now: Instant) {
        self.running = true;
    }

    /// A migration ended at `now`. The cooldown starts either way. On success the window is
    /// cleared (the service now runs on another host); either way the anti-flap run starts
    /// over, so a persisting overload after a failed migration triggers again once the
    /// cooldown is over and `consecutive` predictions agree.
    pub fn migration_finished(&mut self, now: Instant, succeeded: bool) {
        self.running = false;
        self.cooldown_until = now.checked_add(self.config.cooldown);
        self.consecutive = 0;
        self.fired = false;
        if succeeded {
            self.window.clear();
            self.predictor.forget_pending();
        }
    }

    /// The service moved to another host without this policy's migration (a CLI migration,
    /// a recovery settled at start-up or by another process): the same as a migration that
    /// succeeded at `now`. The old host's readings are dropped, the anti-flap run starts
    /// over and the cooldown starts, so nothing measured on the old host can move the
    /// service away from the new one.
    pub fn service_moved(&mut self, now: Instant) {
        self.migration_finished(now, true);
    }

    /// Whether a migration is running.
    pub fn migration_running(&self) -> bool {
        self.running
    }

    /// The window of readings.
    pub fn window(&self) -> &Window {
        &self.window
    }

    /// The settings.
    pub fn config(&self) -> &PolicyConfig {
        &self.config
    }

    /// The predictor and its state.
    pub fn predictor(&self) -> &Predictor {
        &self.predictor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLL: Duration = Duration::from_secs(60);

    fn policy(consecutive: usize, model: Model) -> TriggerPolicy {
        TriggerPolicy::new(PolicyConfig {
            consecutive,
            model,
            ..PolicyConfig::default()
        })
        .unwrap()
    }

    /// Feeds `values` one poll apart starting at `start`; returns the decisions and the
    /// time of the next poll.
    fn feed(p: &mut TriggerPolicy, start: Instant, values: &[f64]) -> (Vec<Decision>, Instant) {
        let mut now = start;
        let mut decisions = Vec::new();
        for &v in values {
            decisions.push(p.on_reading(v, now).unwrap());
            now += POLL;
        }
        (decisions, now)
    }

    #[test]
    fn defaults_are_threshold_ten_min_three_window_five() {
        let c = PolicyConfig::default();
        assert_eq!(c.threshold, 10.0);
        assert_eq!(c.min_readings, 3);
        assert_eq!(c.window, 5);
        assert_eq!(c.consecutive, 3);
        assert_eq!(c.model, Model::Guarded);
    }

    #[test]
    fn fewer_than_min_readings_never_trigger_even_far_above_threshold() {
        let mut p = policy(1, Model::Last);
        let (d, _) = feed(&mut p, Instant::now(), &[50.0, 60.0]);
        assert_eq!(d[0].reason, Reason::TooFewReadings { have: 1, need: 3 });
        assert_eq!(d[1].prediction, None);
        assert!(!d[1].trigger());
    }

    #[test]
    fn decision_carries_window_prediction_threshold_and_reason() {
        let mut p = policy(1, Model::Last);
        let (d, _) = feed(&mut p, Instant::now(), &[1.0, 2.0, 3.0]);
        let d = &d[2];
        assert_eq!(d.window, vec![1.0, 2.0, 3.0]);
        assert_eq!(d.prediction, Some(3.0));
        assert_eq!(d.threshold, 10.0);
        assert_eq!(d.reason, Reason::BelowThreshold);
        let line = d.to_string();
        for part in [
            "trigger=false",
            "below threshold",
            "prediction=3",
            "threshold=10",
        ] {
            assert!(line.contains(part), "{line}");
        }
    }

    #[test]
    fn anti_flap_triggers_on_the_third_prediction_in_a_row_and_only_once() {
        let mut p = policy(3, Model::Last);
        let (d, _) = feed(
            &mut p,
            Instant::now(),
            &[1.0, 1.0, 11.0, 12.0, 13.0, 14.0, 15.0],
        );
        let reasons: Vec<Reason> = d.iter().map(|d| d.reason).collect();
        assert_eq!(
            reasons[2..],
            [
                Reason::Building {
                    consecutive: 1,
                    needed: 3
                },
                Reason::Building {
                    consecutive: 2,
                    needed: 3
                },
                Reason::Trigger,
                Reason::AlreadyTriggered,
                Reason::AlreadyTriggered,
            ]
        );
    }

    #[test]
    fn a_spike_shorter_than_the_anti_flap_count_does_not_trigger() {
        let mut p = policy(3, Model::Last);
        let (d, _) = feed(
            &mut p,
            Instant::now(),
            &[1.0, 1.0, 1.0, 20.0, 25.0, 1.0, 30.0, 1.0, 1.0],
        );
        assert!(d.iter().all(|d| !d.trigger()));
    }

    #[test]
    fn each_separate_overload_run_triggers_again() {
        let mut p = policy(2, Model::Last);
        let (d, _) = feed(
            &mut p,
            Instant::now(),
            &[1.0, 1.0, 11.0, 11.0, 11.0, 1.0, 11.0, 11.0],
        );
        let triggers: Vec<usize> = (0..d.len()).filter(|&i| d[i].trigger()).collect();
        assert_eq!(triggers, vec![3, 7]);
    }

    #[test]
    fn no_trigger_while_a_migration_runs() {
        let t0 = Instant::now();
        let mut p = policy(1, Model::Last);
        p.migration_started(t0);
        let (d, _) = feed(&mut p, t0, &[20.0, 20.0, 20.0, 20.0]);
        assert!(d.iter().all(|d| d.reason == Reason::MigrationRunning));
        assert!(p.migration_running());
    }

    #[test]
    fn cooldown_blocks_triggers_until_it_is_over_then_overload_triggers_at_once() {
        let t0 = Instant::now();
        let mut p = policy(3, Model::Last);
        p.migration_started(t0);
        let finished = t0 + Duration::from_secs(120);
        p.migration_finished(finished, true);
        assert!(p.window().is_empty());
        // Readings every minute from the end of the migration; cooldown is 15 minutes.
        let (d, _) = feed(&mut p, finished, &[20.0; 16]);
        assert_eq!(
            d[0].reason,
            Reason::CoolingDown {
                remaining: Duration::from_secs(900)
            }
        );
        assert_eq!(
            d[14].reason,
            Reason::CoolingDown {
                remaining: Duration::from_secs(60)
            }
        );
        // 15 minutes after the end: the overload has lasted all along, so it triggers.
        assert_eq!(d[15].reason, Reason::Trigger);
        assert_eq!(d[15].consecutive, 14);
    }

    #[test]
    fn cooldown_follows_a_failed_migration_too_and_keeps_the_window() {
        let t0 = Instant::now();
        let mut p = policy(1, Model::Last);
        let (_, now) = feed(&mut p, t0, &[20.0, 20.0, 20.0]);
        p.migration_started(now);
        p.migration_finished(now, false);
        assert_eq!(p.window().len(), 3);
        let d = p.on_reading(20.0, now + Duration::from_secs(60)).unwrap();
        assert!(matches!(d.reason, Reason::CoolingDown { .. }));
        let d = p.on_reading(20.0, now + DEFAULT_COOLDOWN).unwrap();
        assert_eq!(d.reason, Reason::Trigger);
    }

    #[test]
    fn a_move_by_someone_else_drops_the_old_hosts_readings_and_starts_the_cooldown() {
        let t0 = Instant::now();
        let mut p = policy(2, Model::Last);
        let (d, now) = feed(&mut p, t0, &[20.0, 20.0, 20.0]);
        assert_eq!(
            d[2].reason,
            Reason::Building {
                consecutive: 1,
                needed: 2
            }
        );
        p.service_moved(now);
        assert!(p.window().is_empty(), "the old host's readings are gone");
        let d = p.on_reading(20.0, now + Duration::from_secs(60)).unwrap();
        assert!(matches!(d.reason, Reason::CoolingDown { .. }), "{d}");
        assert_eq!(d.window, vec![20.0]);
    }

    #[test]
    fn non_finite_reading_is_refused_and_changes_nothing() {
        let mut p = policy(1, Model::Last);
        let t0 = Instant::now();
        p.on_reading(1.0, t0).unwrap();
        assert!(matches!(
            p.on_reading(f64::NAN, t0),
            Err(PredictError::NonFinite { .. })
        ));
        assert_eq!(p.window().values(), &[1.0]);
    }

    #[test]
    fn invalid_settings_are_refused_naming_the_setting() {
        let bad = [
            (
                PolicyConfig {
                    min_readings: 6,
                    ..PolicyConfig::default()
                },
                "min_readings",
            ),
            (
                PolicyConfig {
                    min_readings: 0,
                    ..PolicyConfig::default()
                },
                "min_readings",
            ),
            (
                PolicyConfig {
                    consecutive: 0,
                    ..PolicyConfig::default()
                },
                "consecutive",
            ),
            (
                PolicyConfig {
                    threshold: f64::NAN,
                    ..PolicyConfig::default()
                },
                "threshold",
            ),
            (
                PolicyConfig {
                    window: 0,
                    ..PolicyConfig::default()
                },
                "window",
            ),
        ];
        for (config, field) in bad {
            match TriggerPolicy::new(config) {
                Err(PredictError::InvalidPolicy { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: expected InvalidPolicy, got {other:?}"),
            }
        }
    }

    #[test]
    fn guarded_policy_reports_its_gate_and_starts_as_last_value() {
        let mut p = policy(3, Model::Guarded);
        let (d, _) = feed(&mut p, Instant::now(), &[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(d[3].prediction, Some(4.0));
        assert_eq!(d[3].gate_open, Some(false));
        assert_eq!(d[0].gate_open, None);
    }
}
