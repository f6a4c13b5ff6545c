//! Load prediction: GM(1,1), baselines, trigger policy, trace evaluation (pure, no I/O).
//!
//! The daemon keeps the last few load readings in a [`Window`], predicts the next reading
//! and asks the [`TriggerPolicy`] whether to migrate. Nothing here reads a file or the
//! network, and no decision reads the clock: time is passed in as [`std::time::Instant`]
//! values (the evaluation takes one `Instant::now()` as the arbitrary origin of its
//! simulated clock) and traces as `&str`, so every decision is reproducible in a unit test.
//! See `docs/prediction.md` for the measured numbers behind the defaults.
//!
//! - [`grey`]: GM(1,1) exactly as DESIGN.md §2 — one step ahead, the `a → 0` limit computed
//!   with `expm1`, a defined answer for every degenerate window.
//! - [`baseline`]: the naive predictors GM(1,1) must be compared with: last value and EWMA.
//! - [`guarded`]: the default trigger's predictor — GM(1,1) behind a level-ratio test, a
//!   clamp to the window range and a skill gate that falls back to the last value unless
//!   GM(1,1)'s recent errors are clearly lower, with a budget that keeps its MAE within
//!   0.05 % of the last value's.
//! - [`window`]: the sliding window of readings.
//! - [`policy`]: threshold, minimum readings, cooldown, "not while migrating", anti-flap.
//! - [`eval`]: trace CSV parsing, one-step MAE, precision/recall/F1 of "next value above
//!   threshold", triggers per sustained overload.
//! - [`synthetic`]: seeded synthetic load traces of the shapes a predictor gets wrong
//!   (ramps, steps, spikes, noise, plateaus, sines, regime switches), for the tests.

use std::fmt;
use std::str::FromStr;

pub mod baseline;
pub mod eval;
pub mod grey;
pub mod guarded;
pub mod policy;
pub mod replay;
pub mod synthetic;
pub mod window;

pub use baseline::{ewma, last, EWMA_ALPHA};
pub use eval::{evaluate, parse_trace, EvalReport, ModelScore};
pub use grey::{gm11, Fit, Gm11};
pub use guarded::{GuardedPrediction, GuardedPredictor};
pub use policy::{Decision, PolicyConfig, Reason, TriggerPolicy};
pub use window::Window;

/// Everything that can go wrong in the prediction core. Nothing here is transient: the
/// core does no I/O, so every error is about the input it was given.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PredictError {
    /// A prediction was asked of a window with no readings.
    #[error("empty window: a prediction needs at least one reading")]
    EmptyWindow,
    /// A reading is NaN or infinite.
    #[error("reading #{index} is {value}: load readings must be finite numbers")]
    NonFinite {
        /// Position of the reading in the window (0 = oldest).
        index: usize,
        /// The offending value.
        value: f64,
    },
    /// A window was asked to hold no readings.
    #[error("window capacity must be at least 1, got {0}")]
    InvalidCapacity(usize),
    /// A trigger policy setting is out of range.
    #[error("trigger policy: {field}: {problem}")]
    InvalidPolicy {
        /// The setting, e.g. `min_readings`.
        field: &'static str,
        /// What is wrong with it and what is allowed.
        problem: String,
    },
    /// A model name that is not one of `guarded`, `gm11`, `last`, `ewma`.
    #[error("unknown model {0:?}: expected one of guarded, gm11, last, ewma")]
    UnknownModel(String),
    /// A trace line that is not `timestamp,value`.
    #[error("trace line {line}: {problem}: {text:?}")]
    TraceLine {
        /// 1-based line number (the header is line 1).
        line: usize,
        /// The line as read.
        text: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A trace value that does not parse as a number.
    #[error("trace line {line}: value is not a number: {text:?}")]
    TraceNumber {
        /// 1-based line number (the header is line 1).
        line: usize,
        /// The line as read.
        text: String,
        /// The parser's complaint.
        #[source]
        source: std::num::ParseFloatError,
    },
    /// A trace with a header but no data rows.
    #[error("trace has no data rows (expected lines of `timestamp,value` after the header)")]
    EmptyTrace,
}

impl PredictError {
    /// Whether retrying could help. Never: the prediction core does no I/O.
    pub fn is_transient(&self) -> bool {
        false
    }
}

/// The predictors the CLI and the evaluation know, by the names `guarded`, `gm11`, `last`
/// and `ewma`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Model {
    /// The default trigger's predictor: GM(1,1) behind the guards of [`guarded`].
    #[default]
    Guarded,
    /// Plain GM(1,1) ([`grey::gm11`]); degenerate windows give the last value.
    Gm11,
    /// Repeat the last reading ([`baseline::last`]).
    Last,
    /// Exponentially weighted moving average over the window ([`baseline::ewma`]).
    Ewma,
}

impl Model {
    /// Every model, in the order the evaluation table lists them.
    pub const ALL: [Model; 4] = [Model::Guarded, Model::Gm11, Model::Last, Model::Ewma];

    /// The name accepted by [`FromStr`] and printed by [`fmt::Display`].
    pub fn name(self) -> &'static str {
        match self {
            Model::Guarded => "guarded",
            Model::Gm11 => "gm11",
            Model::Last => "last",
            Model::Ewma => "ewma",
        }
    }
}

impl fmt::Display for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Read from configuration by the names [`FromStr`] accepts.
impl serde::Serialize for Model {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Model {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <String as serde::Deserialize>::deserialize(d)?;
        s.parse().map_err(|_| {
            serde::de::Error::custom(format!("expected guarded, gm11, last or ewma, got {s:?}"))
        })
    }
}

impl FromStr for Model {
    type Err = PredictError;

    /// Accepts `guarded`, `gm11`, `last` or `ewma` (ASCII case-insensitive, surrounding
    /// whitespace ignored).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let wanted = s.trim();
        Model::ALL
            .into_iter()
            .find(|m| m.name().eq_ignore_ascii_case(wanted))
            .ok_or_else(|| PredictError::UnknownModel(s.to_string()))
    }
}

/// A predictor of one [`Model`] together with whatever state that model keeps between
/// readings (only [`Model::Guarded`] keeps any: its skill record).
///
/// Feed it in reading order: [`Predictor::observe`] each new reading, then
/// [`Predictor::predict`] from the window that now ends with it.
#[derive(Debug, Clone, Default)]
pub struct Predictor {
    model: Model,
    guarded: GuardedPredictor,
}

impl Predictor {
    /// A fresh predictor of `model` (for `guarded`: with no skill record yet).
    pub fn new(model: Model) -> Self {
        Predictor {
            model,
            guarded: GuardedPredictor::new(),
        }
    }

    /// The model this predictor runs.
    pub fn model(&self) -> Model {
        self.model
    }

    /// The next value after `window`, or `None` with fewer than `min` readings (`min` is
    /// at least 1) or a non-finite reading in the window.
    pub fn predict(&mut self, window: &[f64], min: usize) -> Option<f64> {
        if window.len() < min.max(1) || window.iter().any(|v| !v.is_finite()) {
            return None;
        }
        match self.model {
            Model::Guarded => self.guarded.predict(window).ok().map(|p| p.value),
            Model::Gm11 => gm11(window).ok().map(|g| g.prediction),
            Model::Last => last(window),
            Model::Ewma => ewma(window, EWMA_ALPHA),
        }
    }

    /// Record the reading that followed the last prediction (scores the guarded model's
    /// skill; no effect on the others).
    pub fn observe(&mut self, actual: f64) {
        self.guarded.observe(actual);
    }

    /// Forget the outstanding prediction, e.g. when the window is reset after a migration,
    /// so that it is not scored against a reading from another host.
    pub fn forget_pending(&mut self) {
        self.guarded.forget_pending();
    }

    /// The guarded model's state (skill record, gate), for logs and metrics.
    pub fn guarded(&self) -> &GuardedPredictor {
        &self.guarded
    }
}

/// The next value predicted by `model` from `values` (the window, oldest first), or `None`
/// with fewer than `min` readings (`min` is at least 1) or a non-finite reading.
///
/// This is a single, stateless prediction. For [`Model::Guarded`] that means no skill
/// record: its skill gate is closed, so the answer is the last value, exactly what the
/// daemon predicts for its first [`guarded::SKILL_WARMUP`] readings. Use
/// [`predict_series`] to replay a longer history through the gate.
pub fn predict_next(model: Model, values: &[f64], min: usize) -> Option<f64> {
    Predictor::new(model).predict(values, min)
}

/// The next value predicted by `model` after replaying `history` (oldest first) through a
/// sliding window of `window` readings, as the daemon would have seen it. For the stateless
/// models this equals [`predict_next`] on the last `window` values; for [`Model::Guarded`]
/// the replay builds the skill record that decides whether GM(1,1) is trusted.
///
/// `None` with fewer than `min` readings in the final window or a non-finite reading in it.
pub fn predict_series(model: Model, history: &[f64], window: usize, min: usize) -> Option<f64> {
    let window = window.max(1);
    let mut predictor = Predictor::new(model);
    let mut answer = None;
    for end in 1..=history.len() {
        let start = end.saturating_sub(window);
        if let Some(&newest) = history.get(end - 1) {
            if newest.is_finite() {
                predictor.observe(newest);
            }
        }
        answer = history
            .get(start..end)
            .and_then(|w| predictor.predict(w, min));
    }
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_names_parse_case_insensitively_and_round_trip() {
        for m in Model::ALL {
            assert_eq!(m.name().parse::<Model>(), Ok(m));
            assert_eq!(m.to_string().to_uppercase().parse::<Model>(), Ok(m));
        }
        assert_eq!(" gm11 ".parse::<Model>(), Ok(Model::Gm11));
    }

    #[test]
    fn unknown_model_name_is_an_error_listing_the_choices() {
        let err = "arima".parse::<Model>().unwrap_err();
        assert_eq!(err, PredictError::UnknownModel("arima".into()));
        assert!(err.to_string().contains("guarded, gm11, last, ewma"));
    }

    #[test]
    fn fewer_than_min_readings_give_no_prediction_for_every_model() {
        for m in Model::ALL {
            assert_eq!(predict_next(m, &[1.0, 2.0], 3), None, "{m}");
            assert_eq!(predict_next(m, &[], 0), None, "{m}");
            assert!(predict_next(m, &[1.0, 2.0, 3.0], 3).is_some(), "{m}");
        }
    }

    #[test]
    fn non_finite_readings_give_no_prediction_for_every_model() {
        for m in Model::ALL {
            assert_eq!(predict_next(m, &[1.0, f64::NAN, 3.0], 3), None, "{m}");
            assert_eq!(predict_next(m, &[1.0, 2.0, f64::INFINITY], 3), None, "{m}");
        }
    }

    #[test]
    fn single_guarded_prediction_without_history_is_the_last_value() {
        assert_eq!(
            predict_next(Model::Guarded, &[1.0, 2.0, 3.0, 4.0, 5.0], 3),
            Some(5.0)
        );
    }

    #[test]
    fn stateless_models_predict_the_same_from_a_series_as_from_its_last_window() {
        let history = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0];
        for m in [Model::Gm11, Model::Last, Model::Ewma] {
            assert_eq!(
                predict_series(m, &history, 5, 3),
                predict_next(m, &history[3..], 3),
                "{m}"
            );
        }
    }

    #[test]
    fn guarded_series_replay_trusts_gm_on_a_smooth_trend() {
        // A smooth exponential trend: GM(1,1) is nearly exact, persistence always lags,
        // so after a full window of evidence the skill gate opens, and once its first
        // moves have come true the guarded prediction is GM's, above the last value.
        let history: Vec<f64> = (0..300).map(|k| 10.0 * 1.01f64.powi(k)).collect();
        let last = history[history.len() - 1];
        let p = predict_series(Model::Guarded, &history, 5, 3).unwrap();
        assert!(p > last, "{p} should exceed {last}");
        assert!((p - last * 1.01).abs() < 1e-3 * last, "{p}");
        // A history shorter than the window of evidence gives the last value.
        let short = &history[..100];
        assert_eq!(predict_series(Model::Guarded, short, 5, 3), Some(short[99]));
    }
}
