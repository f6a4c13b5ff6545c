//! The naive predictors every GM(1,1) variant is measured against.
//!
//! On 5-minute CPU series the last value is a hard baseline to beat: the load mostly stays
//! where it is, and where it moves it moves in spikes no 5-point model foresees (see
//! `docs/prediction.md`).

/// Smoothing factor of [`ewma`]: the newest reading weighs `EWMA_ALPHA`, the one before
/// `EWMA_ALPHA·(1-EWMA_ALPHA)`, and so on (half-life one reading). 0.5 is the usual middle
/// ground between following the load (α → 1, the last value) and averaging the window
/// (α → 0); it is a reference model, not tuned.
pub const EWMA_ALPHA: f64 = 0.5;

/// The last reading: "the next value is the current one". `None` for an empty window.
pub fn last(values: &[f64]) -> Option<f64> {
    values.last().copied()
}

/// Exponentially weighted moving average over the window, started at the oldest reading:
/// `s = x(1); s = α·x(k) + (1-α)·s for k = 2..=n`. `None` for an empty window. `alpha` is
/// clamped to `[0, 1]` (NaN counts as [`EWMA_ALPHA`]).
pub fn ewma(values: &[f64], alpha: f64) -> Option<f64> {
    let alpha = if alpha.is_nan() {
        EWMA_ALPHA
    } else {
        alpha.clamp(0.0, 1.0)
    };
    let (&first, rest) = values.split_first()?;
    Some(
        rest.iter()
            .fold(first, |s, &x| alpha * x + (1.0 - alpha) * s),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_repeats_the_newest_reading() {
        assert_eq!(last(&[1.0, 2.0, 3.5]), Some(3.5));
        assert_eq!(last(&[]), None);
    }

    #[test]
    fn ewma_weighs_the_newest_reading_by_alpha() {
        // s = 1; s = .5·2 + .5·1 = 1.5; s = .5·4 + .5·1.5 = 2.75.
        assert_eq!(ewma(&[1.0, 2.0, 4.0], 0.5), Some(2.75));
        assert_eq!(ewma(&[1.0, 2.0, 4.0], 1.0), Some(4.0));
        assert_eq!(ewma(&[1.0, 2.0, 4.0], 0.0), Some(1.0));
        assert_eq!(ewma(&[3.0], 0.5), Some(3.0));
        assert_eq!(ewma(&[], 0.5), None);
    }

    #[test]
    fn ewma_with_out_of_range_alpha_is_clamped_not_nan() {
        assert_eq!(ewma(&[1.0, 2.0, 4.0], 7.0), Some(4.0));
        assert_eq!(ewma(&[1.0, 2.0, 4.0], f64::NAN), Some(2.75));
    }
}
