//! Measuring the predictors on a recorded trace.
//!
//! Every model runs through the real [`TriggerPolicy`] over the trace, one reading at a
//! time, with a sliding window: after reading `t` the policy predicts reading `t+1`. On
//! the same steps (those with at least `min` readings in the window) we measure:
//!
//! - **one-step MAE**: mean of `|prediction - reading(t+1)|`;
//! - **precision / recall / F1 of the event "next value > threshold"**: predicted event
//!   `prediction > threshold`, actual event `reading(t+1) > threshold` (0 when a
//!   denominator is 0);
//! - **triggers per sustained overload**. A *sustained overload* is a maximal run of at
//!   least [`SUSTAINED_RUN`] consecutive readings above the threshold (one or two readings
//!   above it are a spike, not worth moving a database for). Triggers are the policy's
//!   [`Reason::Trigger`] decisions with the anti-flap count `consecutive` and no cooldown
//!   (no migration happens in a trace, so a cooldown would only hide flapping). An
//!   overload `[s, e]` is *caught* when a trigger fires after one of the readings
//!   `s-1..=e`, i.e. no later than its last overloaded reading; the *delay* is the index
//!   of the first such trigger minus `s`.
//!
//! The threshold defaults to the trace's 90th percentile (linear interpolation between
//! the sorted values, as numpy's default). The policy's clock advances [`TRACE_STEP`] per
//! reading (the NAB traces' interval).

use std::fmt;
use std::time::{Duration, Instant};

use super::policy::{PolicyConfig, Reason, TriggerPolicy, DEFAULT_CONSECUTIVE};
use super::{Model, PredictError};

/// Readings above the threshold in a row that make a sustained overload.
pub const SUSTAINED_RUN: usize = 3;

/// Percentile of the trace used as the default threshold.
pub const DEFAULT_PERCENTILE: f64 = 0.9;

/// Interval between two readings of the NAB traces (5 minutes).
pub const TRACE_STEP: Duration = Duration::from_secs(300);

/// Anti-flap counts measured for the table that justifies [`DEFAULT_CONSECUTIVE`].
pub const ANTI_FLAP_CANDIDATES: [usize; 4] = [1, 2, 3, 4];

/// Parse a trace CSV: a header line `timestamp,value`, then lines `timestamp,value` with a
/// non-empty timestamp and a finite number. Strict: any other line is an error naming its
/// 1-based line number and its text. A final newline is fine; an empty line is not.
pub fn parse_trace(text: &str) -> Result<Vec<f64>, PredictError> {
    let mut lines = text.lines().map(|l| l.strip_suffix('\r').unwrap_or(l));
    let header = lines.next().unwrap_or("");
    if header != "timestamp,value" {
        return Err(PredictError::TraceLine {
            line: 1,
            text: header.to_string(),
            problem: "expected the header `timestamp,value`",
        });
    }
    let mut values = Vec::new();
    for (i, text) in lines.enumerate() {
        let line = i + 2;
        let bad = |problem| PredictError::TraceLine {
            line,
            text: text.to_string(),
            problem,
        };
        let mut fields = text.split(',');
        let (Some(timestamp), Some(value), None) = (fields.next(), fields.next(), fields.next())
        else {
            return Err(bad("expected two fields `timestamp,value`"));
        };
        if timestamp.trim().is_empty() {
            return Err(bad("empty timestamp"));
        }
        let value: f64 = value.parse().map_err(|source| PredictError::TraceNumber {
            line,
            text: text.to_string(),
            source,
        })?;
        if !value.is_finite() {
            return Err(bad("value is not a finite number"));
        }
        values.push(value);
    }
    if values.is_empty() {
        return Err(PredictError::EmptyTrace);
    }
    Ok(values)
}

/// The `q`-quantile (0..=1) of the finite values, interpolating linearly between the
/// sorted values. `None` when there is no finite value.
pub fn percentile(values: &[f64], q: f64) -> Option<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_by(f64::total_cmp);
    let top = sorted.len().checked_sub(1)?;
    let position = q.clamp(0.0, 1.0) * top as f64;
    let below = position.floor() as usize;
    let fraction = position - below as f64;
    let low = *sorted.get(below)?;
    Some(match sorted.get(below + 1) {
        Some(&high) => low + (high - low) * fraction,
        None => low,
    })
}

/// The sustained overloads of `trace`: maximal runs of at least [`SUSTAINED_RUN`] readings
/// strictly above `threshold`, as inclusive index ranges `(start, end)`.
pub fn sustained_overloads(trace: &[f64], threshold: f64) -> Vec<(usize, usize)> {
    let mut runs = Vec::new();
    let mut start = None;
    for (i, &v) in trace.iter().enumerate() {
        match (v > threshold, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                if i - s >= SUSTAINED_RUN {
                    runs.push((s, i - 1));
                }
                start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = start {
        if trace.len() - s >= SUSTAINED_RUN {
            runs.push((s, trace.len() - 1));
        }
    }
    runs
}

/// How one model did on a trace.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelScore {
    /// The model.
    pub model: Model,
    /// One-step mean absolute error (0 when no step was scored).
    pub mae: f64,
    /// Of the predicted "next value > threshold" events, the fraction that happened.
    pub precision: f64,
    /// Of the "next value > threshold" events, the fraction predicted.
    pub recall: f64,
    /// Harmonic mean of precision and recall (0 when either is 0).
    pub f1: f64,
    /// Predicted and happened.
    pub true_positives: usize,
    /// Predicted, did not happen.
    pub false_positives: usize,
    /// Happened, not predicted.
    pub false_negatives: usize,
    /// Triggers with the report's anti-flap count (see [`EvalReport::consecutive`]).
    pub triggers: TriggerCount,
    /// For the guarded model: the fraction of scored steps on which its skill gate let
    /// GM(1,1) through (on the others it predicted the last value).
    pub gate_open_share: Option<f64>,
}

/// Triggers of the policy over a trace, against the sustained overloads.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TriggerCount {
    /// Anti-flap count used.
    pub consecutive: usize,
    /// Number of triggers.
    pub triggers: usize,
    /// Sustained overloads with a trigger no later than their last reading.
    pub caught: usize,
    /// `triggers / sustained overloads` (`None` without sustained overloads).
    pub per_overload: Option<f64>,
    /// Mean delay, in readings, from the start of a caught overload to its first trigger
    /// (`None` when none was caught).
    pub mean_delay: Option<f64>,
}

/// The evaluation of every model on one trace. `Display` prints it as a table.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct EvalReport {
    /// Readings in the trace.
    pub points: usize,
    /// Window capacity used.
    pub window: usize,
    /// Minimum readings used.
    pub min: usize,
    /// Threshold of the event and the trigger.
    pub threshold: f64,
    /// True when the threshold is the default (the trace's 90th percentile).
    pub threshold_is_percentile: bool,
    /// Scored one-step predictions per model.
    pub steps: usize,
    /// Steps whose next value is above the threshold.
    pub events: usize,
    /// Number of sustained overloads.
    pub sustained_overloads: usize,
    /// Anti-flap count of the per-model trigger columns ([`DEFAULT_CONSECUTIVE`]).
    pub consecutive: usize,
    /// One row per model, in [`Model::ALL`] order.
    pub models: Vec<ModelScore>,
    /// Triggers of the guarded model for each of [`ANTI_FLAP_CANDIDATES`].
    pub anti_flap: Vec<TriggerCount>,
}

impl EvalReport {
    /// The row of `model`.
    pub fn score(&self, model: Model) -> Option<&ModelScore> {
        self.models.iter().find(|s| s.model == model)
    }
}

/// Run every model over `trace` with a sliding window of `window` readings (at least 1),
/// predicting once `min` readings are in (clamped to `1..=window`). `threshold` defaults to
/// the trace's 90th percentile (also when it is not finite). Non-finite readings are
/// skipped like missing ones.
pub fn evaluate(trace: &[f64], window: usize, min: usize, threshold: Option<f64>) -> EvalReport {
    let window = window.max(1);
    let min = min.clamp(1, window);
    let given = threshold.filter(|t| t.is_finite());
    let threshold = given
        .or_else(|| percentile(trace, DEFAULT_PERCENTILE))
        .unwrap_or(0.0);
    let overloads = sustained_overloads(trace, threshold);
    let config = PolicyConfig {
        threshold,
        min_readings: min,
        window,
        cooldown: Duration::ZERO,
        consecutive: DEFAULT_CONSECUTIVE,
        model: Model::Guarded,
    };
    let mut steps = 0;
    let mut events = 0;
    let models = Model::ALL
        .into_iter()
        .map(|model| {
            let run = run(trace, PolicyConfig { model, ..config }, &overloads);
            steps = run.steps;
            events = run.true_positives + run.false_negatives;
            run.score(model)
        })
        .collect();
    let anti_flap = ANTI_FLAP_CANDIDATES
        .into_iter()
        .map(|consecutive| {
            run(
                trace,
                PolicyConfig {
                    consecutive,
                    ..config
                },
                &overloads,
            )
            .triggers
        })
        .collect();
    EvalReport {
        points: trace.len(),
        window,
        min,
        threshold,
        threshold_is_percentile: given.is_none(),
        steps,
        events,
        sustained_overloads: overloads.len(),
        consecutive: DEFAULT_CONSECUTIVE,
        models,
        anti_flap,
    }
}

/// Raw counts of one model's run.
struct Run {
    steps: usize,
    gate_open: usize,
    abs_error: f64,
    true_positives: usize,
    false_positives: usize,
    false_negatives: usize,
    triggers: TriggerCount,
}

impl Run {
    fn score(&self, model: Model) -> ModelScore {
        let ratio = |num: usize, den: usize| {
            if den == 0 {
                0.0
            } else {
                num as f64 / den as f64
            }
        };
        let precision = ratio(
            self.true_positives,
            self.true_positives + self.false_positives,
        );
        let recall = ratio(
            self.true_positives,
            self.true_positives + self.false_negatives,
        );
        let f1 = ratio(
            2 * self.true_positives,
            2 * self.true_positives + self.false_positives + self.false_negatives,
        );
        ModelScore {
            model,
            mae: if self.steps == 0 {
                0.0
            } else {
                self.abs_error / self.steps as f64
            },
            precision,
            recall,
            f1,
            true_positives: self.true_positives,
            false_positives: self.false_positives,
            false_negatives: self.false_negatives,
            triggers: self.triggers,
            gate_open_share: (model == Model::Guarded && self.steps > 0)
                .then(|| self.gate_open as f64 / self.steps as f64),
        }
    }
}

/// One pass of the policy over the trace.
fn run(trace: &[f64], config: PolicyConfig, overloads: &[(usize, usize)]) -> Run {
    let mut out = Run {
        steps: 0,
        gate_open: 0,
        abs_error: 0.0,
        true_positives: 0,
        false_positives: 0,
        false_negatives: 0,
        triggers: TriggerCount {
            consecutive: config.consecutive,
            triggers: 0,
            caught: 0,
            per_overload: None,
            mean_delay: None,
        },
    };
    // `evaluate` only builds valid configurations; an invalid one scores nothing.
    let Ok(mut policy) = TriggerPolicy::new(config) else {
        return out;
    };
    // The origin is arbitrary: only differences between instants matter to the policy.
    let mut now = Instant::now();
    let mut fired = Vec::new();
    for (t, &value) in trace.iter().enumerate() {
        let decision = policy.on_reading(value, now);
        now = now.checked_add(TRACE_STEP).unwrap_or(now);
        let Ok(decision) = decision else {
            continue;
        };
        if decision.reason == Reason::Trigger {
            fired.push(t);
        }
        let (Some(predicted), Some(&next)) = (decision.prediction, trace.get(t + 1)) else {
            continue;
        };
        if !next.is_finite() {
            continue;
        }
        out.steps += 1;
        if decision.gate_open == Some(true) {
            out.gate_open += 1;
        }
        out.abs_error += (predicted - next).abs();
        match (predicted > config.threshold, next > config.threshold) {
            (true, true) => out.true_positives += 1,
            (true, false) => out.false_positives += 1,
            (false, true) => out.false_negatives += 1,
            (false, false) => {}
        }
    }
    let delays: Vec<f64> = overloads
        .iter()
        .filter_map(|&(s, e)| {
            fired
                .iter()
                .find(|&&t| t + 1 >= s && t <= e)
                .map(|&t| t as f64 - s as f64)
        })
        .collect();
    out.triggers.triggers = fired.len();
    out.triggers.caught = delays.len();
    if !overloads.is_empty() {
        out.triggers.per_overload = Some(fired.len() as f64 / overloads.len() as f64);
    }
    if !delays.is_empty() {
        out.triggers.mean_delay = Some(delays.iter().sum::<f64>() / delays.len() as f64);
    }
    out
}

impl fmt::Display for EvalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = if self.threshold_is_percentile {
            "90th percentile"
        } else {
            "given"
        };
        writeln!(
            f,
            "{} readings, window {}, min {}, threshold {:.4} ({source})",
            self.points, self.window, self.min, self.threshold
        )?;
        writeln!(
            f,
            "{} one-step predictions, {} with next value above threshold; {} sustained \
             overloads (>= {SUSTAINED_RUN} readings in a row above threshold)",
            self.steps, self.events, self.sustained_overloads
        )?;
        writeln!(
            f,
            "{:<8} {:>10} {:>9} {:>7} {:>7} {:>9} {:>7} {:>10}",
            "model", "MAE", "precision", "recall", "F1", "triggers", "caught", "trig/overl"
        )?;
        for s in &self.models {
            writeln!(
                f,
                "{:<8} {:>10.5} {:>9.4} {:>7.4} {:>7.4} {:>9} {:>7} {:>10}",
                s.model.name(),
                s.mae,
                s.precision,
                s.recall,
                s.f1,
                s.triggers.triggers,
                format!("{}/{}", s.triggers.caught, self.sustained_overloads),
                per_overload(s.triggers.per_overload),
            )?;
        }
        if let Some(share) = self.score(Model::Guarded).and_then(|s| s.gate_open_share) {
            writeln!(
                f,
                "guarded: GM(1,1) trusted by the skill gate on {:.1}% of steps, last value on the rest",
                100.0 * share
            )?;
        }
        writeln!(
            f,
            "(triggers with {} predictions in a row above threshold, no cooldown)",
            self.consecutive
        )?;
        writeln!(
            f,
            "anti-flap, guarded model: {:>3} {:>9} {:>7} {:>10} {:>10}",
            "N", "triggers", "caught", "trig/overl", "mean delay"
        )?;
        for a in &self.anti_flap {
            writeln!(
                f,
                "                          {:>3} {:>9} {:>7} {:>10} {:>10}",
                a.consecutive,
                a.triggers,
                format!("{}/{}", a.caught, self.sustained_overloads),
                per_overload(a.per_overload),
                a.mean_delay
                    .map_or_else(|| "-".to_string(), |d| format!("{d:.2}")),
            )?;
        }
        Ok(())
    }
}

fn per_overload(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_string(), |v| format!("{v:.2}"))
}

#[cfg(test)]
mod tests {
    use super::super::guarded::MAE_TOLERANCE;
    use super::super::synthetic::{adversarial_traces, DEFAULT_LENGTH};
    use super::*;

    #[test]
    fn trace_csv_parses_header_and_values() {
        let text = "timestamp,value\n2014-02-14 14:30:00,0.132\r\n2014-02-14 14:35:00,1e1\n";
        assert_eq!(parse_trace(text), Ok(vec![0.132, 10.0]));
    }

    #[test]
    fn bad_number_is_an_error_naming_the_line_and_its_text() {
        let text = "timestamp,value\n2014-02-14 14:30:00,0.1\n2014-02-14 14:35:00,abc\n";
        let err = parse_trace(text).unwrap_err();
        assert!(
            matches!(&err, PredictError::TraceNumber { line: 3, text, .. }
                if text == "2014-02-14 14:35:00,abc"),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains("line 3"), "{message}");
        assert!(message.contains("14:35:00,abc"), "{message}");
    }

    #[test]
    fn wrong_field_count_empty_line_and_non_finite_values_are_errors() {
        let cases = [
            ("timestamp,value\nt,1\nt,2,3\n", 3, "two fields"),
            ("timestamp,value\nt,1\n\nt,2\n", 3, "two fields"),
            ("timestamp,value\n,1\n", 2, "empty timestamp"),
            ("timestamp,value\nt,1\nt,NaN\n", 3, "finite"),
            ("timestamp,value\nt,inf\n", 2, "finite"),
            ("time,value\nt,1\n", 1, "header"),
            ("", 1, "header"),
        ];
        for (text, want_line, want_problem) in cases {
            match parse_trace(text) {
                Err(PredictError::TraceLine { line, problem, .. }) => {
                    assert_eq!(line, want_line, "{text:?}");
                    assert!(problem.contains(want_problem), "{text:?}: {problem}");
                }
                other => panic!("{text:?}: expected TraceLine, got {other:?}"),
            }
        }
        assert!(matches!(
            parse_trace("timestamp,value\nt, 1\n"),
            Err(PredictError::TraceNumber { line: 2, .. })
        ));
    }

    #[test]
    fn header_only_trace_is_empty() {
        assert_eq!(
            parse_trace("timestamp,value\n"),
            Err(PredictError::EmptyTrace)
        );
    }

    #[test]
    fn percentile_interpolates_between_sorted_values() {
        let v = [5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(percentile(&v, 0.5), Some(3.0));
        assert_eq!(percentile(&v, 0.9), Some(4.6));
        assert_eq!(percentile(&v, 1.0), Some(5.0));
        assert_eq!(percentile(&[], 0.9), None);
        assert_eq!(percentile(&[f64::NAN, 2.0], 0.9), Some(2.0));
    }

    #[test]
    fn sustained_overloads_are_runs_of_three_or_more_above_threshold() {
        let v = [0.0, 5.0, 5.0, 0.0, 5.0, 5.0, 5.0, 0.0, 5.0, 5.0, 5.0, 5.0];
        assert_eq!(sustained_overloads(&v, 1.0), vec![(4, 6), (8, 11)]);
        assert_eq!(sustained_overloads(&v, 5.0), vec![]);
    }

    #[test]
    fn evaluation_on_a_hand_made_trace_counts_errors_events_and_triggers() {
        // Threshold 10. Last value: predictions = previous reading.
        let trace = [1.0, 1.0, 1.0, 20.0, 20.0, 20.0, 20.0, 1.0, 1.0];
        let report = evaluate(&trace, 5, 3, Some(10.0));
        assert_eq!(report.sustained_overloads, 1);
        assert_eq!(report.steps, 6); // after readings 2..=7, predicting 3..=8
        let last = report.score(Model::Last).unwrap();
        // Errors: |1-20| + 0 + 0 + 0 + |20-1| + 0 = 38 over 6 steps.
        assert!((last.mae - 38.0 / 6.0).abs() < 1e-12);
        // Events next>10 at steps predicting 3,4,5,6: last predicts 4,5,6 right, misses 3,
        // and falsely predicts 7.
        assert_eq!(
            (
                last.true_positives,
                last.false_positives,
                last.false_negatives
            ),
            (3, 1, 1)
        );
        assert!((last.f1 - 0.75).abs() < 1e-12);
        // Over after readings 3,4,5,6: the third in a row (after reading 5) triggers.
        assert_eq!(last.triggers.triggers, 1);
        assert_eq!(last.triggers.caught, 1);
        assert_eq!(last.triggers.mean_delay, Some(2.0));
        let n1 = report.anti_flap[0];
        assert_eq!((n1.consecutive, n1.triggers), (1, 1));
        assert_eq!(n1.mean_delay, Some(0.0));
        let text = report.to_string();
        assert!(text.contains("guarded") && text.contains("ewma"), "{text}");
    }

    #[test]
    fn evaluation_never_yields_nan_even_with_impossible_settings() {
        let report = evaluate(&[1.0, 2.0], 0, 9, None);
        assert_eq!(report.window, 1);
        assert_eq!(report.min, 1);
        let report = evaluate(&[], 5, 3, Some(f64::NAN));
        assert_eq!(report.steps, 0);
        for s in &report.models {
            assert!(s.mae.is_finite() && s.f1.is_finite());
        }
    }

    /// Every CPU trace of NAB, vendored in `testdata/traces/` (see its README for source and
    /// license) and embedded so that the test needs no file outside the repository. The
    /// first six tuned the guards; the other five were held out.
    const VENDORED_TRACES: [(&str, &str); 11] = [
        (
            "ec2_cpu_utilization_24ae8d",
            include_str!("../../testdata/traces/ec2_cpu_utilization_24ae8d.csv"),
        ),
        (
            "ec2_cpu_utilization_53ea38",
            include_str!("../../testdata/traces/ec2_cpu_utilization_53ea38.csv"),
        ),
        (
            "ec2_cpu_utilization_5f5533",
            include_str!("../../testdata/traces/ec2_cpu_utilization_5f5533.csv"),
        ),
        (
            "ec2_cpu_utilization_77c1ca",
            include_str!("../../testdata/traces/ec2_cpu_utilization_77c1ca.csv"),
        ),
        (
            "ec2_cpu_utilization_825cc2",
            include_str!("../../testdata/traces/ec2_cpu_utilization_825cc2.csv"),
        ),
        (
            "rds_cpu_utilization_cc0c53",
            include_str!("../../testdata/traces/rds_cpu_utilization_cc0c53.csv"),
        ),
        (
            "ec2_cpu_utilization_ac20cd",
            include_str!("../../testdata/traces/ec2_cpu_utilization_ac20cd.csv"),
        ),
        (
            "ec2_cpu_utilization_c6585a",
            include_str!("../../testdata/traces/ec2_cpu_utilization_c6585a.csv"),
        ),
        (
            "ec2_cpu_utilization_fe7f93",
            include_str!("../../testdata/traces/ec2_cpu_utilization_fe7f93.csv"),
        ),
        (
            "rds_cpu_utilization_e47b3b",
            include_str!("../../testdata/traces/rds_cpu_utilization_e47b3b.csv"),
        ),
        (
            "cpu_utilization_asg_misconfiguration",
            include_str!("../../testdata/traces/cpu_utilization_asg_misconfiguration.csv"),
        ),
    ];

    /// The guarded model against its fallback on one trace: the MAE bound the skill gate
    /// guarantees, and no sustained overload missed that the last value catches. Returns
    /// the two rows for further checks.
    fn assert_guard_keeps_its_bound<'a>(
        name: &str,
        report: &'a EvalReport,
    ) -> (&'a ModelScore, &'a ModelScore) {
        let guarded = report.score(Model::Guarded).unwrap();
        let last = report.score(Model::Last).unwrap();
        println!(
            "{name:<40} MAE {:>10.5} vs {:>10.5} ({:+.4} %)  F1 {:.4} vs {:.4}  caught {}/{} vs {}/{}  triggers {} vs {}  gate open {:.1} %",
            guarded.mae,
            last.mae,
            if last.mae > 0.0 { 100.0 * (guarded.mae / last.mae - 1.0) } else { 0.0 },
            guarded.f1,
            last.f1,
            guarded.triggers.caught,
            report.sustained_overloads,
            last.triggers.caught,
            report.sustained_overloads,
            guarded.triggers.triggers,
            last.triggers.triggers,
            100.0 * guarded.gate_open_share.unwrap_or(0.0),
        );
        assert!(
            guarded.mae <= (1.0 + MAE_TOLERANCE) * last.mae,
            "{name}: guarded MAE {} > (1 + {MAE_TOLERANCE}) × last-value MAE {}",
            guarded.mae,
            last.mae
        );
        assert!(
            guarded.triggers.caught >= last.triggers.caught,
            "{name}: guarded caught {} sustained overloads, the last value {}",
            guarded.triggers.caught,
            last.triggers.caught
        );
        (guarded, last)
    }

    /// On every real CPU trace, tuned on or held out: the MAE bound, every overload the last
    /// value catches, and an F1 at least the last value's.
    #[test]
    fn guarded_predictor_is_at_least_as_good_as_last_value_on_every_vendored_trace() {
        for (name, text) in VENDORED_TRACES {
            let trace = parse_trace(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            let report = evaluate(&trace, 5, 3, None);
            let (guarded, last) = assert_guard_keeps_its_bound(name, &report);
            assert!(
                guarded.f1 >= last.f1,
                "{name}: guarded F1 {} < last-value F1 {}",
                guarded.f1,
                last.f1
            );
        }
    }

    /// How much lower than the last value's the guarded F1 may be on a synthetic trace. Not
    /// a guarantee: a predictor that does not know the threshold cannot promise anything at
    /// it (see `guarded.rs`). The worst seen on 320 traces (seeds 0 to 19) is 0.0084; this
    /// catches a gate that trusts GM(1,1) where it should not.
    const SYNTHETIC_F1_SLACK: f64 = 0.01;

    /// On adversarial synthetic traces (ramps, steps, spikes, noise, plateaus, sines, regime
    /// switches…): the MAE bound, no overload missed that the last value catches, F1 within
    /// [`SYNTHETIC_F1_SLACK`]; and the gate does open where GM(1,1) has skill, so the bound
    /// is not met by never trusting it.
    #[test]
    fn guarded_predictor_keeps_its_bound_on_adversarial_synthetic_traces() {
        let mut trusted_and_better = 0;
        for t in adversarial_traces(DEFAULT_LENGTH) {
            let report = evaluate(&t.values, 5, 3, None);
            let (guarded, last) = assert_guard_keeps_its_bound(&t.name, &report);
            assert!(
                guarded.f1 >= last.f1 - SYNTHETIC_F1_SLACK,
                "{}: guarded F1 {} < last-value F1 {} - {SYNTHETIC_F1_SLACK}",
                t.name,
                guarded.f1,
                last.f1
            );
            if guarded.mae < 0.9 * last.mae {
                trusted_and_better += 1;
            }
        }
        // GM(1,1) cuts the MAE by more than 10 % on 6 of the 48 traces: growth with resets
        // and climbs to a cliff.
        assert!(trusted_and_better >= 6, "{trusted_and_better}");
    }
}
