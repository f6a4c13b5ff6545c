//! Replay recorded load readings through the trigger policy with other settings: "with
//! threshold 8 you would have migrated 3 times, at …". The daemon records every fresh
//! reading it decides on in `readings.csv` (`timestamp,value`, RFC 3339 UTC, the same
//! format `stateshift predict --eval` reads); `stateshift replay` runs them through
//! [`TriggerPolicy`] exactly as the loop does, a trigger starting the cooldown as a
//! migration would (the service is taken to stay where it is: its window is kept).

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::policy::{PolicyConfig, TriggerPolicy};
use super::PredictError;

/// One recorded reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub at: SystemTime,
    pub value: f64,
}

/// A migration the policy would have started.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WouldMigrate {
    pub at: SystemTime,
    pub prediction: f64,
}

/// What went wrong reading a readings file, with its line.
#[derive(Debug, thiserror::Error)]
#[error("line {line} ({text:?}): {problem}")]
pub struct ParseError {
    pub line: usize,
    pub text: String,
    pub problem: String,
}

/// Parse a `timestamp,value` file as the daemon writes it. Timestamps are RFC 3339 (a
/// space instead of the `T` and no zone are read as UTC too); they must not go back.
pub fn parse(text: &str) -> Result<Vec<Reading>, ParseError> {
    let mut lines = text.lines().map(|l| l.strip_suffix('\r').unwrap_or(l));
    let header = lines.next().unwrap_or("");
    if header != "timestamp,value" {
        return Err(ParseError {
            line: 1,
            text: header.to_string(),
            problem: "expected the header `timestamp,value`".into(),
        });
    }
    let mut out: Vec<Reading> = Vec::new();
    for (i, text) in lines.enumerate() {
        let line = i + 2;
        if text.trim().is_empty() {
            continue;
        }
        let bad = |problem: String| ParseError {
            line,
            text: text.to_string(),
            problem,
        };
        let Some((ts, value)) = text.split_once(',') else {
            return Err(bad("expected `timestamp,value`".into()));
        };
        let at =
            humantime::parse_rfc3339_weak(ts.trim()).map_err(|e| bad(format!("timestamp: {e}")))?;
        let value: f64 = value
            .trim()
            .parse()
            .map_err(|e| bad(format!("value: {e}")))?;
        if !value.is_finite() {
            return Err(bad("value is not a finite number".into()));
        }
        if out.last().is_some_and(|r| r.at > at) {
            return Err(bad("goes back in time".into()));
        }
        out.push(Reading { at, value });
    }
    Ok(out)
}

/// One line of a readings file for `value` read at `at`.
pub fn line(at: SystemTime, value: f64) -> String {
    format!("{},{value}\n", humantime::format_rfc3339_millis(at))
}

/// The migrations `config` would have started over `readings`.
pub fn replay(
    readings: &[Reading],
    config: PolicyConfig,
) -> Result<Vec<WouldMigrate>, PredictError> {
    let mut policy = TriggerPolicy::new(config)?;
    let Some(first) = readings.first() else {
        return Ok(Vec::new());
    };
    // The policy's clock is an Instant: the recorded times, as offsets from the first.
    let base = Instant::now();
    let mut out = Vec::new();
    for r in readings {
        let offset = r.at.duration_since(first.at).unwrap_or(Duration::ZERO);
        let now = base + offset;
        let d = policy.on_reading(r.value, now)?;
        if d.trigger() {
            out.push(WouldMigrate {
                at: r.at,
                prediction: d.prediction.unwrap_or(f64::NAN),
            });
            policy.migration_started(now);
            policy.migration_finished(now, false);
        }
    }
    Ok(out)
}

/// Seconds since the Unix epoch of `t` (0 before it).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::predict::Model;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_790_000_000 + secs)
    }

    fn config(threshold: f64) -> PolicyConfig {
        PolicyConfig {
            threshold,
            min_readings: 1,
            window: 5,
            cooldown: Duration::from_secs(600),
            consecutive: 3,
            model: Model::Last,
        }
    }

    #[test]
    fn the_daemon_s_lines_parse_back_and_replay_through_the_cooldown() {
        // A reading a minute: 10 calm, then 30 at 9, then calm again.
        let mut text = String::from("timestamp,value\n");
        for i in 0..60u64 {
            let v = if (10..40).contains(&i) { 9.0 } else { 1.0 };
            text.push_str(&line(at(i * 60), v));
        }
        let readings = parse(&text).unwrap();
        assert_eq!(readings.len(), 60);
        assert_eq!(
            readings[10],
            Reading {
                at: at(600),
                value: 9.0
            }
        );
        // Threshold 8: the 3rd high reading triggers (minute 12); the cooldown holds 10
        // minutes, during which the load stays high, so it triggers again as the cooldown
        // ends (minute 22, then 32), as the daemon's loop would.
        let w = replay(&readings, config(8.0)).unwrap();
        let minutes: Vec<u64> = w
            .iter()
            .map(|m| (unix_secs(m.at) - 1_790_000_000) / 60)
            .collect();
        assert_eq!(minutes, [12, 22, 32]);
        assert!(w.iter().all(|m| m.prediction == 9.0));
        // Threshold 10: never.
        assert!(replay(&readings, config(10.0)).unwrap().is_empty());
    }

    #[test]
    fn a_bad_line_is_named() {
        let e =
            parse("timestamp,value\n2026-11-30T10:00:00Z,1\n2026-11-30T09:00:00Z,2\n").unwrap_err();
        assert_eq!(e.line, 3);
        assert!(e.to_string().contains("goes back in time"), "{e}");
        let e = parse("timestamp,value\nyesterday,1\n").unwrap_err();
        assert!(
            e.to_string().contains("line 2") && e.to_string().contains("timestamp"),
            "{e}"
        );
        let e = parse("time,value\n").unwrap_err();
        assert!(e.to_string().contains("timestamp,value"), "{e}");
        // NAB's traces read as they are.
        let r = parse("timestamp,value\n2014-02-14 14:30:00,0.132\n").unwrap();
        assert_eq!(r[0].value, 0.132);
    }
}
