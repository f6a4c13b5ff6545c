//! The default trigger's predictor: GM(1,1) behind three guards, chosen by measurement on
//! the six NAB traces (`docs/prediction.md` has the numbers).
//!
//! 1. **Level-ratio test** (grey theory's applicability check): GM(1,1) is only fitted when
//!    every ratio `x0(k-1)/x0(k)` lies in the open interval `(e^(-2/(n+1)), e^(2/(n+1)))`
//!    and all readings are positive; otherwise the candidate is the last value. This
//!    rejects the windows where plain GM(1,1) explodes: a jump from idle (0.1) to busy
//!    (70) made plain GM's MAE 16× that of the last value on one trace.
//! 2. **Clamp** to the window range widened by [`CLAMP_MARGIN`] of the range on each side:
//!    `[min - ½·range, max + ½·range]`. GM may still extrapolate a trend beyond the window,
//!    but not arbitrarily far.
//! 3. **Skill gate** (fallback to the last value): the guarded candidate is used only while
//!    its recent one-step error is at least [`SKILL_MARGIN`] below that of the last value,
//!    both as exponentially weighted averages with decay [`SKILL_DECAY`] (memory of about
//!    100 readings), and only after [`SKILL_WARMUP`] scored readings. Otherwise the
//!    prediction is the last value.
//!
//! Why the gate: measured on the traces, no window-local guard (level-ratio, clamps of any
//! width, blends toward the last value, in-window back-tests, a posterior-error check) made
//! GM(1,1) at least as good as the last value on all six: on five of them a 5-point
//! GM(1,1) has no one-step skill over persistence at all, and windows where it helps on one
//! trace look the same as windows where it hurts on another. The gate measures the skill
//! on the series itself and uses GM(1,1) only where it has it; elsewhere the guarded
//! predictor *is* the last value, which is what made MAE and F1 at least as good as the
//! last value's on every trace.

use super::grey::{gm11, Fit};
use super::PredictError;

/// Decay of the exponentially weighted error averages of the skill gate (memory of about
/// `1/SKILL_DECAY` = 100 readings: 100 minutes at the default 60 s poll interval).
pub const SKILL_DECAY: f64 = 0.01;

/// How much better than the last value the candidate's recent error must be for the gate
/// to open: `candidate_mae < (1 - SKILL_MARGIN)·last_mae`.
pub const SKILL_MARGIN: f64 = 0.05;

/// Scored readings before the gate may open at all (no verdict from a handful of errors).
pub const SKILL_WARMUP: u32 = 20;

/// How far beyond the window range a guarded candidate may go, as a fraction of the range.
pub const CLAMP_MARGIN: f64 = 0.5;

/// The level-ratio bounds `(e^(-2/(n+1)), e^(2/(n+1)))` for a window of `n` readings.
pub fn level_ratio_bounds(n: usize) -> (f64, f64) {
    let half_width = 2.0 / (n as f64 + 1.0);
    ((-half_width).exp(), half_width.exp())
}

/// Grey theory's level-ratio test: all readings positive and every `x0(k-1)/x0(k)` strictly
/// inside [`level_ratio_bounds`]. A window of one reading passes (no ratio to test).
pub fn level_ratio_ok(values: &[f64]) -> bool {
    let (low, high) = level_ratio_bounds(values.len());
    values.iter().all(|&v| v > 0.0)
        && values.windows(2).all(|pair| {
            let ratio = pair[0] / pair[1];
            low < ratio && ratio < high
        })
}

/// Which guard shaped a [`Candidate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// GM(1,1)'s prediction, unchanged.
    Accepted,
    /// GM(1,1)'s prediction, clamped to the widened window range.
    Clamped,
    /// The level-ratio test failed: the candidate is the last value.
    LevelRatio,
    /// GM(1,1) had a degenerate window (see [`Fit`]): its answer, the last value.
    Degenerate(Fit),
}

/// The guarded GM(1,1) value for one window, before the skill gate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// The value after the level-ratio test and the clamp.
    pub value: f64,
    /// Plain GM(1,1)'s prediction, when it was computed.
    pub gm11: Option<f64>,
    /// Which guard decided.
    pub guard: Guard,
}

/// The window-local part of the guard: level-ratio test, GM(1,1), clamp.
pub fn candidate(values: &[f64]) -> Result<Candidate, PredictError> {
    let g = gm11(values)?;
    let last = g.prediction;
    if !level_ratio_ok(values) {
        let last = values.last().copied().unwrap_or(last);
        return Ok(Candidate {
            value: last,
            gm11: Some(g.prediction),
            guard: Guard::LevelRatio,
        });
    }
    if g.fit.is_degenerate() {
        return Ok(Candidate {
            value: g.prediction,
            gm11: Some(g.prediction),
            guard: Guard::Degenerate(g.fit),
        });
    }
    let (low, high) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let margin = CLAMP_MARGIN * (high - low);
    let clamped = g.prediction.clamp(low - margin, high + margin);
    Ok(Candidate {
        value: clamped,
        gm11: Some(g.prediction),
        guard: if clamped == g.prediction {
            Guard::Accepted
        } else {
            Guard::Clamped
        },
    })
}

/// The skill record behind the gate: exponentially weighted one-step absolute errors of the
/// guarded candidate and of the last value, on the same readings.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Skill {
    /// Weighted mean absolute error of the candidate (biased toward 0 early on, like
    /// `last_mae`; only their ratio matters).
    pub candidate_mae: f64,
    /// Weighted mean absolute error of the last value.
    pub last_mae: f64,
    /// Number of scored readings (saturates).
    pub observed: u32,
}

impl Skill {
    /// Whether the candidate has earned trust: at least [`SKILL_WARMUP`] scored readings
    /// and `candidate_mae < (1 - SKILL_MARGIN)·last_mae`.
    pub fn gate_open(&self) -> bool {
        self.observed >= SKILL_WARMUP && self.candidate_mae < (1.0 - SKILL_MARGIN) * self.last_mae
    }

    fn record(&mut self, candidate_error: f64, last_error: f64) {
        self.candidate_mae += SKILL_DECAY * (candidate_error - self.candidate_mae);
        self.last_mae += SKILL_DECAY * (last_error - self.last_mae);
        self.observed = self.observed.saturating_add(1);
    }
}

/// One guarded prediction, with what decided it (for the decision log).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuardedPrediction {
    /// The prediction: `candidate.value` when the gate is open, else the last reading.
    pub value: f64,
    /// The window-local guarded GM(1,1) value.
    pub candidate: Candidate,
    /// The last reading of the window.
    pub last: f64,
    /// Whether the skill gate let the candidate through.
    pub gate_open: bool,
}

/// The guarded predictor with its skill record. Call [`GuardedPredictor::predict`] with
/// each window and [`GuardedPredictor::observe`] with the reading that followed.
#[derive(Debug, Clone, Default)]
pub struct GuardedPredictor {
    skill: Skill,
    /// Candidate and last value of the outstanding prediction, scored by `observe`.
    pending: Option<(f64, f64)>,
}

impl GuardedPredictor {
    /// A predictor with no skill record: the gate is closed until [`SKILL_WARMUP`] readings
    /// have been scored.
    pub fn new() -> Self {
        Self::default()
    }

    /// Predict the next value after `values` (oldest first) and remember it for scoring.
    /// Errors as [`gm11`]: empty window or non-finite reading.
    pub fn predict(&mut self, values: &[f64]) -> Result<GuardedPrediction, PredictError> {
        let candidate = candidate(values)?;
        let last = values.last().copied().ok_or(PredictError::EmptyWindow)?;
        let gate_open = self.skill.gate_open();
        self.pending = Some((candidate.value, last));
        Ok(GuardedPrediction {
            value: if gate_open { candidate.value } else { last },
            candidate,
            last,
            gate_open,
        })
    }

    /// Score the outstanding prediction against the reading that followed it. Without an
    /// outstanding prediction, or for a non-finite reading, nothing is recorded.
    pub fn observe(&mut self, actual: f64) {
        if !actual.is_finite() {
            return;
        }
        if let Some((candidate, last)) = self.pending.take() {
            self.skill
                .record((candidate - actual).abs(), (last - actual).abs());
        }
    }

    /// Drop the outstanding prediction without scoring it (the window was reset).
    pub fn forget_pending(&mut self) {
        self.pending = None;
    }

    /// The skill record.
    pub fn skill(&self) -> Skill {
        self.skill
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn level_ratio_bounds_for_five_readings_are_e_to_plus_minus_a_third() {
        let (low, high) = level_ratio_bounds(5);
        assert!((low - (-1.0f64 / 3.0).exp()).abs() < 1e-15);
        assert!((high - (1.0f64 / 3.0).exp()).abs() < 1e-15);
    }

    #[test]
    fn level_ratio_test_rejects_jumps_and_non_positive_readings() {
        assert!(level_ratio_ok(&[10.0, 11.0, 10.5, 12.0, 11.0]));
        assert!(!level_ratio_ok(&[0.1, 0.1, 0.1, 0.1, 70.0]));
        assert!(!level_ratio_ok(&[1.0, 0.0, 1.0]));
        assert!(!level_ratio_ok(&[-1.0, -1.0, -1.0]));
    }

    #[test]
    fn jump_from_idle_gives_the_last_value_not_gms_extrapolation() {
        let w = [0.1, 0.1, 0.068, 0.1, 70.0];
        let c = candidate(&w).unwrap();
        assert_eq!(c.guard, Guard::LevelRatio);
        assert_eq!(c.value, 70.0);
    }

    #[test]
    fn candidate_is_clamped_to_half_the_range_beyond_the_window() {
        // Steady growth passes the level-ratio test; GM extrapolates beyond the window
        // maximum but within max + ½·range.
        let w = [10.0, 11.0, 12.0, 13.0, 14.0];
        let c = candidate(&w).unwrap();
        assert_eq!(c.guard, Guard::Accepted);
        assert!(c.value > 14.0 && c.value <= 16.0, "{c:?}");
        // A rise that has levelled off: GM keeps extrapolating growth (12.63) beyond
        // max + ½·range = 11 + 1.5, and is clamped.
        let w = [8.0, 8.0, 10.0, 11.0, 11.0];
        let c = candidate(&w).unwrap();
        let raw = c.gm11.unwrap();
        assert!((raw - 12.63344473506749).abs() < 1e-9, "{raw}");
        assert_eq!(c.guard, Guard::Clamped);
        assert_eq!(c.value, 12.5);
    }

    #[test]
    fn gate_stays_closed_until_warm_up_then_opens_only_for_a_better_candidate() {
        let mut p = GuardedPredictor::new();
        // Smooth growth: the candidate is right, the last value lags.
        let series: Vec<f64> = (0..40).map(|k| 100.0 + 2.0 * f64::from(k)).collect();
        let mut opened_at = None;
        for end in 3..series.len() {
            let window = &series[end.saturating_sub(5)..end];
            let prediction = p.predict(window).unwrap();
            if !prediction.gate_open {
                assert_eq!(prediction.value, prediction.last);
            } else if opened_at.is_none() {
                opened_at = Some(p.skill().observed);
            }
            p.observe(series[end]);
        }
        assert_eq!(opened_at, Some(SKILL_WARMUP));
        // Noise the candidate cannot beat: after long enough the gate closes again.
        for k in 0..600 {
            let v = if k % 2 == 0 { 150.0 } else { 151.0 };
            let window = [v, v, v, v, v];
            p.predict(&window).unwrap();
            p.observe(if k % 3 == 0 { 170.0 } else { v });
        }
        assert!(!p.skill().gate_open(), "{:?}", p.skill());
    }

    #[test]
    fn observe_without_a_prediction_or_with_nan_records_nothing() {
        let mut p = GuardedPredictor::new();
        p.observe(1.0);
        assert_eq!(p.skill().observed, 0);
        p.predict(&[1.0, 2.0, 3.0]).unwrap();
        p.observe(f64::NAN);
        assert_eq!(p.skill().observed, 0);
        p.observe(4.0);
        assert_eq!(p.skill().observed, 1);
        p.predict(&[1.0, 2.0, 3.0]).unwrap();
        p.forget_pending();
        p.observe(4.0);
        assert_eq!(p.skill().observed, 1);
    }
}
