//! Deterministic synthetic load traces: the shapes a one-step predictor can get wrong.
//!
//! The guards of [`super::guarded`] were first tuned on six recorded traces; a guard that
//! only holds there may lose anywhere else. These generators make the shapes that hurt a
//! growth model or a gate that trusts it too late or too long: ramps, steps, isolated
//! spikes, white noise, long exact plateaus, slow sines, exponential growth, random walks,
//! and combinations, including regime switches from a trend (where GM(1,1) earns trust) to
//! noise (where it has none). Values are CPU-like percentages in `[0, 100]`.
//!
//! Everything is seeded: the same [`adversarial_traces`] call gives the same traces, so a
//! test over them is reproducible. The random numbers come from splitmix64 and Box–Muller;
//! no dependency, no I/O.

use std::f64::consts::TAU;

/// A named synthetic trace.
#[derive(Debug, Clone, PartialEq)]
pub struct SyntheticTrace {
    /// Family and seed, e.g. `regime_switch/2`.
    pub name: String,
    /// The readings, one per step.
    pub values: Vec<f64>,
}

/// Readings per trace in [`adversarial_traces`]: a week of 5-minute readings.
pub const DEFAULT_LENGTH: usize = 2016;

/// Seeds per family in [`adversarial_traces`].
pub const SEEDS: u64 = 3;

/// A shape of load, generated from a seed.
type Family = fn(&mut Rng, usize) -> Vec<f64>;

/// Every family, by name.
const FAMILIES: [(&str, Family); 16] = [
    ("ramp_slow", ramp_slow),
    ("ramp_fast", ramp_fast),
    ("steps", steps),
    ("spikes", spikes),
    ("white_noise", white_noise),
    ("plateaus", plateaus),
    ("idle_bursts", idle_bursts),
    ("sine_slow", sine_slow),
    ("sine_day_quantised", sine_day_quantised),
    ("growth_resets", growth_resets),
    ("random_walk", random_walk),
    ("mean_reverting", mean_reverting),
    ("regime_switch", regime_switch),
    ("ramp_to_cliff", ramp_to_cliff),
    ("threshold_hover", threshold_hover),
    ("combination", combination),
];

/// [`SEEDS`] traces of `len` readings for each family, in a fixed order.
pub fn adversarial_traces(len: usize) -> Vec<SyntheticTrace> {
    seeded_traces(len, 0..SEEDS)
}

/// One trace of `len` readings per family and seed, family by family.
pub fn seeded_traces(len: usize, seeds: std::ops::Range<u64>) -> Vec<SyntheticTrace> {
    let mut traces = Vec::with_capacity(FAMILIES.len() * seeds.clone().count());
    for (f, (name, family)) in FAMILIES.iter().enumerate() {
        for seed in seeds.clone() {
            let mut rng = Rng::new((f as u64) << 32 | seed);
            let values = family(&mut rng, len)
                .into_iter()
                .map(|v| v.clamp(0.0, 100.0))
                .collect();
            traces.push(SyntheticTrace {
                name: format!("{name}/{seed}"),
                values,
            });
        }
    }
    traces
}

/// splitmix64: tiny, seedable, good enough for test data.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator started from `seed`.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[low, high)`.
    pub fn uniform(&mut self, low: f64, high: f64) -> f64 {
        low + (high - low) * self.unit()
    }

    /// Uniform integer in `low..=high`.
    pub fn between(&mut self, low: usize, high: usize) -> usize {
        low + (self.next_u64() % (high - low + 1) as u64) as usize
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = 1.0 - self.unit(); // (0, 1]: ln is finite
        let v = self.unit();
        (-2.0 * u.ln()).sqrt() * (TAU * v).cos()
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// Linear ramps up and down between random levels, a few hundred readings each, light noise.
fn ramp_slow(rng: &mut Rng, len: usize) -> Vec<f64> {
    ramps(rng, len, 150, 500, 0.5)
}

/// Ramps of 10 to 40 readings: GM(1,1) follows a ramp, then overshoots its turn.
fn ramp_fast(rng: &mut Rng, len: usize) -> Vec<f64> {
    ramps(rng, len, 10, 40, 1.0)
}

fn ramps(rng: &mut Rng, len: usize, shortest: usize, longest: usize, noise: f64) -> Vec<f64> {
    let mut out = Vec::with_capacity(len);
    let mut level = rng.uniform(5.0, 95.0);
    while out.len() < len {
        let target = rng.uniform(5.0, 95.0);
        let steps = rng.between(shortest, longest);
        for k in 1..=steps {
            let v = level + (target - level) * k as f64 / steps as f64;
            out.push(v + noise * rng.normal());
        }
        level = target;
    }
    out.truncate(len);
    out
}

/// Piecewise constant levels with light noise: a jump is unforeseeable, and afterwards a
/// 5-point model sees a "trend" that is over.
fn steps(rng: &mut Rng, len: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let level = rng.uniform(5.0, 95.0);
        for _ in 0..rng.between(20, 300) {
            out.push(level + 0.5 * rng.normal());
        }
    }
    out.truncate(len);
    out
}

/// A noisy base with isolated spikes of one or two readings.
fn spikes(rng: &mut Rng, len: usize) -> Vec<f64> {
    let base = rng.uniform(10.0, 40.0);
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        if rng.chance(0.03) {
            let height = rng.uniform(30.0, 60.0);
            for _ in 0..rng.between(1, 2) {
                out.push(base + height + rng.normal());
            }
        } else {
            out.push(base + rng.normal());
        }
    }
    out.truncate(len);
    out
}

/// Independent normal readings: nothing to predict; the last value has twice the variance
/// of the mean, GM(1,1) extrapolates noise.
fn white_noise(rng: &mut Rng, len: usize) -> Vec<f64> {
    let (mean, sd) = (rng.uniform(30.0, 60.0), rng.uniform(3.0, 12.0));
    (0..len).map(|_| mean + sd * rng.normal()).collect()
}

/// Exactly constant plateaus of 200 to 1000 readings, jumping between them: the last value
/// is exact except at a jump.
fn plateaus(rng: &mut Rng, len: usize) -> Vec<f64> {
    let levels = [0.1, 2.0, 35.0, 50.0, 99.0];
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let level = levels[rng.between(0, levels.len() - 1)];
        out.extend(std::iter::repeat_n(level, rng.between(200, 1000)));
    }
    out.truncate(len);
    out
}

/// Idle at ~0.1 % with bursts to 70–100 % of 5 to 60 readings (the shape that made plain
/// GM(1,1) explode on a recorded trace).
fn idle_bursts(rng: &mut Rng, len: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        for _ in 0..rng.between(20, 200) {
            out.push(if rng.chance(0.2) { 0.068 } else { 0.1 });
        }
        let level = rng.uniform(70.0, 100.0);
        for _ in 0..rng.between(5, 60) {
            out.push(level + 2.0 * rng.normal());
        }
    }
    out.truncate(len);
    out
}

/// A slow sine (period 300 to 1000 readings) with light noise: smooth, GM(1,1)'s best case.
fn sine_slow(rng: &mut Rng, len: usize) -> Vec<f64> {
    let period = rng.uniform(300.0, 1000.0);
    let phase = rng.uniform(0.0, TAU);
    (0..len)
        .map(|k| 50.0 + 30.0 * (TAU * k as f64 / period + phase).sin() + 0.3 * rng.normal())
        .collect()
}

/// A daily cycle (288 readings) with noise, rounded to whole percent like many agents
/// report: many windows are flat, then move by one unit.
fn sine_day_quantised(rng: &mut Rng, len: usize) -> Vec<f64> {
    let phase = rng.uniform(0.0, TAU);
    (0..len)
        .map(|k| {
            (40.0 + 25.0 * (TAU * k as f64 / 288.0 + phase).sin() + 1.5 * rng.normal()).round()
        })
        .collect()
}

/// Exponential growth at 1–4 % per reading from a low level, reset after 30–120 readings:
/// GM(1,1) is right during the growth and wrong at every reset.
fn growth_resets(rng: &mut Rng, len: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let rate = rng.uniform(1.01, 1.04);
        let mut v = rng.uniform(2.0, 10.0);
        for _ in 0..rng.between(30, 120) {
            out.push(v * (1.0 + 0.01 * rng.normal()));
            v = (v * rate).min(100.0);
        }
    }
    out.truncate(len);
    out
}

/// A random walk (reflected into `[0, 100]`): the last value is the best predictor there is.
fn random_walk(rng: &mut Rng, len: usize) -> Vec<f64> {
    let sd = rng.uniform(0.5, 3.0);
    let mut v = rng.uniform(20.0, 80.0);
    (0..len)
        .map(|_| {
            v += sd * rng.normal();
            if v < 0.0 {
                v = -v;
            } else if v > 100.0 {
                v = 200.0 - v;
            }
            v
        })
        .collect()
}

/// AR(1) noise around a level (φ = 0.3 to 0.7): after a move the load tends to come back,
/// which a smoother foresees and the last value does not.
fn mean_reverting(rng: &mut Rng, len: usize) -> Vec<f64> {
    let (mean, phi, sd) = (
        rng.uniform(30.0, 60.0),
        rng.uniform(0.3, 0.7),
        rng.uniform(2.0, 6.0),
    );
    let mut x = 0.0;
    (0..len)
        .map(|_| {
            x = phi * x + sd * rng.normal();
            mean + x
        })
        .collect()
}

/// Alternating regimes of 60 to 300 readings: smooth exponential or linear trends (GM(1,1)
/// earns the gate's trust) and spiky noise (it has none). A gate that remembers too long
/// keeps trusting GM(1,1) into the noise.
fn regime_switch(rng: &mut Rng, len: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(len);
    let mut level = rng.uniform(10.0, 30.0);
    let mut trend = true;
    while out.len() < len {
        let n = rng.between(60, 300);
        if trend {
            let rate = rng.uniform(-0.015, 0.02);
            for _ in 0..n {
                level = (level * (1.0 + rate)).clamp(2.0, 98.0);
                out.push(level + 0.1 * rng.normal());
            }
        } else {
            for _ in 0..n {
                let spike = if rng.chance(0.1) {
                    rng.uniform(-20.0, 40.0)
                } else {
                    0.0
                };
                out.push(level + 4.0 * rng.normal() + spike);
            }
        }
        trend = !trend;
    }
    out.truncate(len);
    out
}

/// Steady climbs of 20–80 readings that end in a cliff back to a low level: the growth a
/// trend model is right about, then the drop it is most wrong about.
fn ramp_to_cliff(rng: &mut Rng, len: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let low = rng.uniform(5.0, 20.0);
        let high = rng.uniform(60.0, 100.0);
        let n = rng.between(20, 80);
        for k in 0..n {
            out.push(low + (high - low) * k as f64 / n as f64 + 0.3 * rng.normal());
        }
        for _ in 0..rng.between(5, 40) {
            out.push(low + 0.3 * rng.normal());
        }
    }
    out.truncate(len);
    out
}

/// A slow drift around the level that the 90th percentile will sit at, with noise of the
/// same size as the distance to it: most threshold crossings are coin flips.
fn threshold_hover(rng: &mut Rng, len: usize) -> Vec<f64> {
    let level = rng.uniform(40.0, 70.0);
    let period = rng.uniform(100.0, 400.0);
    let mut x = 0.0;
    (0..len)
        .map(|k| {
            x = 0.8 * x + 1.5 * rng.normal();
            level + 4.0 * (TAU * k as f64 / period).sin() + x
        })
        .collect()
}

/// A daily sine, steps, spikes and noise on top of each other.
fn combination(rng: &mut Rng, len: usize) -> Vec<f64> {
    let mut offset = 0.0;
    let phase = rng.uniform(0.0, TAU);
    (0..len)
        .map(|k| {
            if rng.chance(0.005) {
                offset = rng.uniform(-15.0, 15.0);
            }
            let spike = if rng.chance(0.02) {
                rng.uniform(20.0, 50.0)
            } else {
                0.0
            };
            40.0 + offset
                + 15.0 * (TAU * k as f64 / 288.0 + phase).sin()
                + 2.0 * rng.normal()
                + spike
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_are_reproducible_finite_and_within_percent_bounds() {
        let a = adversarial_traces(500);
        let b = adversarial_traces(500);
        assert_eq!(a, b);
        assert_eq!(a.len(), FAMILIES.len() * SEEDS as usize);
        for t in &a {
            assert_eq!(t.values.len(), 500, "{}", t.name);
            assert!(
                t.values.iter().all(|v| (0.0..=100.0).contains(v)),
                "{}",
                t.name
            );
        }
    }

    #[test]
    fn seeds_of_one_family_differ() {
        let traces = adversarial_traces(100);
        assert_ne!(traces[0].values, traces[1].values);
        assert_ne!(traces[1].values, traces[2].values);
    }

    #[test]
    fn normal_draws_have_mean_zero_and_unit_variance() {
        let mut rng = Rng::new(7);
        let n = 20_000;
        let xs: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.03, "{mean}");
        assert!((var - 1.0).abs() < 0.05, "{var}");
    }
}
