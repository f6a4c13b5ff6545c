//! GM(1,1), the first-order one-variable grey model, exactly as DESIGN.md §2.
//!
//! For a window `x0(1..=n)` (oldest first):
//!
//! 1. `x1(k) = x0(1) + … + x0(k)` (accumulated generating operation);
//! 2. `z(k) = (x1(k) + x1(k-1)) / 2` for `k = 2..=n` (background values);
//! 3. least squares of `x0(k) = -a·z(k) + b` over `k = 2..=n`, solved in closed form
//!    (the 2×2 normal equations, written in centred form for accuracy);
//! 4. one step ahead: `x̂0(n+1) = (1 - e^a)·(x0(1) - b/a)·e^(-a·n)`.
//!
//! Step 4 is evaluated as `(b·expm1(a)/a - x0(1)·expm1(a))·e^(-a·n)`, which is the same
//! expression without the division `b/a`: as `a → 0` it tends smoothly to `b` (and is
//! exactly `b` at `a = 0`), where the textbook form computes `0·∞`.
//!
//! Degenerate windows get a defined answer, never NaN, infinity or a panic: the *last
//! reading*, with `a = 0` and `b = last` (consistent with the `a → 0` limit `x̂0 → b`).
//! [`Fit`] says which case applied. Only an empty window or a non-finite reading is an
//! error.

use super::PredictError;

/// The spread of the background values `z(k)` below which the normal matrix counts as
/// singular: `Σ(z - z̄)² ≤ SINGULAR_TOLERANCE · Σz²`. The spread is zero exactly when
/// `x0(2..=n)` are all zero; the tolerance also catches spreads lost in rounding.
pub const SINGULAR_TOLERANCE: f64 = 1e-12;

/// A fitted GM(1,1) and its one-step-ahead prediction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gm11 {
    /// Development coefficient `a` (negative: growth, positive: decay).
    pub a: f64,
    /// Grey input `b`.
    pub b: f64,
    /// `x̂0(n+1)`, the next value; always finite.
    pub prediction: f64,
    /// Whether the fit was regular or which degenerate case gave the answer.
    pub fit: Fit,
}

/// How a [`Gm11`] came about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// The least-squares fit and the closed-form prediction.
    Regular,
    /// All readings equal (including all zero): the prediction is that value, `a = 0`.
    Constant,
    /// One reading: no equation to fit; the prediction is that reading.
    SinglePoint,
    /// The normal matrix is singular (`z(k)` all equal — `x0(2..=n)` all zero — or two
    /// readings, which give one equation for two unknowns): the prediction is the last
    /// reading.
    Singular,
    /// `a`, `b` or the prediction overflowed (e.g. `e^(-a·n)` for a huge negative `a`):
    /// the prediction is the last reading; `a` and `b` are kept when finite.
    Overflow,
}

impl Fit {
    /// True for every case except [`Fit::Regular`].
    pub fn is_degenerate(self) -> bool {
        self != Fit::Regular
    }
}

/// Fit GM(1,1) to `x0` (oldest first) and predict the next value, one step ahead.
///
/// Errors only for an empty window ([`PredictError::EmptyWindow`]) or a NaN/infinite
/// reading ([`PredictError::NonFinite`]); every other window gives a finite prediction
/// (see [`Fit`] for the degenerate cases). The model is meant for non-negative series such
/// as CPU load; negative readings are accepted and computed with the same formulas.
pub fn gm11(x0: &[f64]) -> Result<Gm11, PredictError> {
    let (Some(&first), Some(&last)) = (x0.first(), x0.last()) else {
        return Err(PredictError::EmptyWindow);
    };
    if let Some((index, &value)) = x0.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(PredictError::NonFinite { index, value });
    }
    let fallback = |fit| Gm11 {
        a: 0.0,
        b: last,
        prediction: last,
        fit,
    };
    if x0.len() == 1 {
        return Ok(fallback(Fit::SinglePoint));
    }
    if x0.iter().all(|&v| v == first) {
        return Ok(fallback(Fit::Constant));
    }

    // Equations k = 2..=n: y = x0(k), regressor z(k). Two passes (means, then centred
    // sums) keep the accuracy when the level is large and the spread small; the background
    // values are recomputed rather than stored so that a prediction does not allocate.
    let m = (x0.len() - 1) as f64;
    let (mut sum_z, mut sum_y) = (0.0, 0.0);
    for_each_equation(x0, |z, y| {
        sum_z += z;
        sum_y += y;
    });
    let (z_mean, y_mean) = (sum_z / m, sum_y / m);
    let (mut sxx, mut sxy, mut szz) = (0.0, 0.0, 0.0);
    for_each_equation(x0, |z, y| {
        let dz = z - z_mean;
        sxx += dz * dz;
        sxy += dz * (y - y_mean);
        szz += z * z;
    });
    // A NaN spread (from sums that overflowed) is not `regular` either.
    let regular = sxx > SINGULAR_TOLERANCE * szz;
    if !regular {
        return Ok(fallback(Fit::Singular));
    }
    let slope = sxy / sxx; // = -a
    let a = -slope;
    let b = y_mean - slope * z_mean;
    if !a.is_finite() || !b.is_finite() {
        return Ok(fallback(Fit::Overflow));
    }
    let prediction = one_step(a, b, first, x0.len());
    if !prediction.is_finite() {
        return Ok(Gm11 {
            a,
            b,
            prediction: last,
            fit: Fit::Overflow,
        });
    }
    Ok(Gm11 {
        a,
        b,
        prediction,
        fit: Fit::Regular,
    })
}

/// `x̂0(n+1) = (1 - e^a)·(x0(1) - b/a)·e^(-a·n)`, computed as
/// `(b·expm1(a)/a - x0(1)·expm1(a))·e^(-a·n)` so that it tends to `b` as `a → 0` (and is
/// `b` at `a = 0`) instead of dividing by `a`. May be infinite for extreme `a`; [`gm11`]
/// checks.
pub fn one_step(a: f64, b: f64, x0_first: f64, n: usize) -> f64 {
    let em1 = a.exp_m1();
    // expm1(a)/a → 1 as a → 0; for any a ≠ 0 (even subnormal) the quotient is accurate.
    let em1_over_a = if a == 0.0 { 1.0 } else { em1 / a };
    (b * em1_over_a - x0_first * em1) * (-a * n as f64).exp()
}

/// Calls `f(z(k), x0(k))` for k = 2..=n.
fn for_each_equation(x0: &[f64], mut f: impl FnMut(f64, f64)) {
    let mut x1 = match x0.first() {
        Some(&v) => v,
        None => return,
    };
    for &y in x0.iter().skip(1) {
        let previous = x1;
        x1 += y;
        f(0.5 * (previous + x1), y);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(actual: f64, expected: f64, tolerance: f64) {
        assert!(
            (actual - expected).abs() <= tolerance,
            "got {actual}, expected {expected} ± {tolerance}"
        );
    }

    #[test]
    fn growing_window_matches_the_hand_computed_fit() {
        // x0 = 1,2,3: x1 = 1,3,6; z = 2, 4.5; y = 2, 3. Two equations, exact line:
        // -a = (3-2)/(4.5-2) = 0.4, b = 2 - 0.4·2 = 1.2.
        // x̂0(4) = (1 - e^-0.4)·(1 - 1.2/-0.4)·e^(0.4·3) = (1 - e^-0.4)·4·e^1.2.
        let g = gm11(&[1.0, 2.0, 3.0]).unwrap();
        assert_eq!(g.fit, Fit::Regular);
        close(g.a, -0.4, 1e-12);
        close(g.b, 1.2, 1e-12);
        close(g.prediction, 4.378303976976319, 1e-12);
        // The original system's defect: the two-step value e^(-a·(n+1)) is not returned.
        assert!((g.prediction - 4.378303976976319 * 0.4f64.exp()).abs() > 1.0);
    }

    #[test]
    fn shrinking_window_matches_the_hand_computed_fit() {
        // x0 = 4,2,1: x1 = 4,6,7; z = 5, 6.5; y = 2, 1.
        // -a = (1-2)/(6.5-5) = -2/3 → a = 2/3; b = 2 + (2/3)·5 = 16/3; b/a = 8.
        // x̂0(4) = (1 - e^(2/3))·(4 - 8)·e^(-2) = 4·(e^(2/3) - 1)·e^-2.
        let g = gm11(&[4.0, 2.0, 1.0]).unwrap();
        assert_eq!(g.fit, Fit::Regular);
        close(g.a, 2.0 / 3.0, 1e-12);
        close(g.b, 16.0 / 3.0, 1e-12);
        close(g.prediction, 0.5130474195164563, 1e-12);
    }

    #[test]
    fn five_point_arithmetic_ramp_matches_the_least_squares_fit() {
        // x0 = 2,4,6,8,10: x1 = 2,6,12,20,30; z = 4, 9, 16, 25; y = 4, 6, 8, 10;
        // z̄ = 13.5, ȳ = 7; dz = -9.5,-4.5,2.5,11.5; dy = -3,-1,1,3;
        // Σdz·dy = 28.5+4.5+2.5+34.5 = 70; Σdz² = 90.25+20.25+6.25+132.25 = 249;
        // -a = 70/249, b = ȳ - (70/249)·z̄.
        let g = gm11(&[2.0, 4.0, 6.0, 8.0, 10.0]).unwrap();
        let slope = 70.0 / 249.0;
        close(g.a, -slope, 1e-12);
        close(g.b, 7.0 - slope * 13.5, 1e-12);
        close(g.prediction, 13.391873732800894, 1e-9);
    }

    #[test]
    fn geometric_growth_is_predicted_one_step_ahead() {
        let x0: Vec<f64> = (1..=5).map(|k| 1.1f64.powi(k)).collect();
        let g = gm11(&x0).unwrap();
        close(g.prediction, 1.1f64.powi(6), 0.005);
        assert!(g.a < 0.0);
    }

    #[test]
    fn constant_window_predicts_the_constant_with_a_zero() {
        let g = gm11(&[7.5, 7.5, 7.5, 7.5, 7.5]).unwrap();
        assert_eq!(
            g,
            Gm11 {
                a: 0.0,
                b: 7.5,
                prediction: 7.5,
                fit: Fit::Constant
            }
        );
    }

    #[test]
    fn all_zero_window_predicts_zero() {
        let g = gm11(&[0.0, 0.0, 0.0]).unwrap();
        assert_eq!(g.prediction, 0.0);
        assert_eq!(g.fit, Fit::Constant);
    }

    #[test]
    fn singular_normal_matrix_predicts_the_last_value() {
        // x0(2..) all zero → z(k) all equal to x0(1)/... constant → singular.
        let g = gm11(&[5.0, 0.0, 0.0, 0.0]).unwrap();
        assert_eq!(g.fit, Fit::Singular);
        assert_eq!(g.prediction, 0.0);
        // Two readings: one equation, two unknowns.
        let g = gm11(&[1.0, 3.0]).unwrap();
        assert_eq!(g.fit, Fit::Singular);
        assert_eq!(g.prediction, 3.0);
    }

    #[test]
    fn single_reading_predicts_itself_and_empty_window_is_an_error() {
        assert_eq!(gm11(&[4.2]).unwrap().prediction, 4.2);
        assert_eq!(gm11(&[4.2]).unwrap().fit, Fit::SinglePoint);
        assert_eq!(gm11(&[]), Err(PredictError::EmptyWindow));
    }

    #[test]
    fn non_finite_reading_is_an_error_naming_its_position() {
        match gm11(&[1.0, f64::NAN, 2.0]) {
            Err(PredictError::NonFinite { index: 1, value }) => assert!(value.is_nan()),
            other => panic!("expected NonFinite at 1, got {other:?}"),
        }
        assert_eq!(
            gm11(&[1.0, 2.0, f64::NEG_INFINITY]),
            Err(PredictError::NonFinite {
                index: 2,
                value: f64::NEG_INFINITY
            })
        );
    }

    #[test]
    fn a_to_zero_limit_is_b_and_never_nan() {
        let (b, x0_first) = (3.25, 2.0);
        assert_eq!(one_step(0.0, b, x0_first, 5), b);
        assert_eq!(one_step(-0.0, b, x0_first, 5), b);
        for a in [1e-300, -1e-300, 5e-324, 1e-16, -1e-16, 1e-12, -1e-12] {
            let p = one_step(a, b, x0_first, 5);
            assert!(p.is_finite(), "a = {a}: {p}");
            close(p, b, 1e-9);
        }
        // The textbook form divides by a and is useless here: 0·∞ = NaN at a = 0.
        let textbook = |a: f64| (1.0 - a.exp()) * (x0_first - b / a) * (-a * 5.0).exp();
        assert!(textbook(0.0).is_nan());
    }

    #[test]
    fn nearly_constant_window_gives_a_tiny_a_and_a_prediction_near_b() {
        let g = gm11(&[5.0, 5.0, 5.0, 5.0, 5.0 + 1e-9]).unwrap();
        assert!(g.a.abs() < 1e-9, "a = {}", g.a);
        assert!(g.prediction.is_finite());
        close(g.prediction, g.b, 1e-6);
        close(g.prediction, 5.0, 1e-6);
    }

    #[test]
    fn explosive_window_falls_back_to_the_last_value_instead_of_infinity() {
        let g = gm11(&[1e-300, 1e-200, 1e-100, 1.0, 1e100]).unwrap();
        assert!(g.prediction.is_finite());
        let g = gm11(&[1e300, 1e300, 1e308, 1e308]).unwrap();
        assert!(g.prediction.is_finite());
        assert!(g.fit.is_degenerate());
    }

    #[test]
    fn huge_decay_does_not_produce_nan() {
        // a large and positive: e^(-a·n) underflows to 0, expm1(a) overflows → 0·∞.
        let g = gm11(&[1e6, 1.0, 1e-300, 1e-300]).unwrap();
        assert!(g.prediction.is_finite(), "{g:?}");
    }
}
