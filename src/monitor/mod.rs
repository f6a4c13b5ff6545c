//! Watching the load: where readings come from, and the poller that feeds the window.
//!
//! - [`MetricSource`]: the capability "give me the newest reading of one metric", with a
//!   [`Freshness`] that tells a new value from one that stopped moving or never existed.
//! - [`zabbix`]: the Zabbix JSON-RPC client and [`zabbix::ZabbixSource`], the
//!   [`MetricSource`] backed by one Zabbix item.
//! - [`poller`]: polls a [`MetricSource`] every `poll_interval` into a
//!   [`crate::predict::Window`], pushing only fresh new readings, backing off while the
//!   source fails.
//!
//! The poller sees only the trait: it never speaks HTTP, so its timing is tested with
//! tokio's paused clock against a scripted source.

use std::cmp::Ordering;
use std::fmt;
use std::future::Future;

pub mod poller;
pub mod zabbix;

/// Check, changing nothing, that the configured load source answers: with Zabbix, that
/// the host has the item. Returns what was checked, `None` when there is nothing to check.
pub async fn preflight(cfg: &crate::config::MonitorConfig) -> Result<Option<String>, String> {
    let (crate::config::MonitorKind::Zabbix, Some(z)) = (cfg.kind, cfg.zabbix.as_ref()) else {
        return Ok(None);
    };
    let mut c = zabbix::Zabbix::from_monitor_config(z).map_err(|e| e.to_string())?;
    c.item(&z.host, &z.key).await.map_err(|e| e.to_string())?;
    Ok(Some(format!(
        "Zabbix {}: host {:?} has item {:?}",
        z.url, z.host, z.key
    )))
}

pub use poller::{Outcome, Poller, PollerConfig, Snapshot};
pub use zabbix::{Zabbix, ZabbixError, ZabbixSource};

/// When a value was collected: Unix seconds and nanoseconds, as Zabbix stores them
/// (`clock`, `ns`). Ordered by time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Clock {
    /// Seconds since the Unix epoch.
    pub secs: u64,
    /// Nanoseconds within the second (0..1e9).
    pub nanos: u32,
}

impl Clock {
    /// A clock of `secs` seconds and `nanos` nanoseconds (`nanos` is capped at 999 999 999).
    pub fn new(secs: u64, nanos: u32) -> Self {
        Clock {
            secs,
            nanos: nanos.min(999_999_999),
        }
    }

    /// The clock as seconds since the epoch (for ages and logs).
    pub fn as_secs_f64(self) -> f64 {
        self.secs as f64 + f64::from(self.nanos) * 1e-9
    }
}

impl PartialOrd for Clock {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Clock {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.secs, self.nanos).cmp(&(other.secs, other.nanos))
    }
}

impl fmt::Display for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:09}", self.secs, self.nanos)
    }
}

/// One collected value and when it was collected.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// The value (always finite).
    pub value: f64,
    /// When the monitoring system collected it.
    pub clock: Clock,
}

/// How much a reading can be trusted as the current load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Freshness {
    /// The metric is moving: this is the newest value, collected recently.
    Fresh,
    /// The metric stopped moving (a dead agent, an unsupported item, a disabled host):
    /// the value is the last one collected, not the current load.
    Stale,
    /// The metric has never been collected. Not a load of 0.
    NoData,
}

impl Freshness {
    /// `fresh`, `stale` or `no_data` (for logs and metrics labels).
    pub fn as_str(self) -> &'static str {
        match self {
            Freshness::Fresh => "fresh",
            Freshness::Stale => "stale",
            Freshness::NoData => "no_data",
        }
    }
}

impl fmt::Display for Freshness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a [`MetricSource`] says about its metric now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Reading {
    /// The newest value, and the metric is moving.
    Fresh(Sample),
    /// The last value collected, which has stopped moving.
    Stale(Sample),
    /// Nothing was ever collected.
    NoData,
}

impl Reading {
    /// The freshness state.
    pub fn freshness(&self) -> Freshness {
        match self {
            Reading::Fresh(_) => Freshness::Fresh,
            Reading::Stale(_) => Freshness::Stale,
            Reading::NoData => Freshness::NoData,
        }
    }

    /// The value and its clock, unless there is no data.
    pub fn sample(&self) -> Option<Sample> {
        match self {
            Reading::Fresh(s) | Reading::Stale(s) => Some(*s),
            Reading::NoData => None,
        }
    }

    /// The value, unless there is no data.
    pub fn value(&self) -> Option<f64> {
        self.sample().map(|s| s.value)
    }

    /// The clock of the value, unless there is no data.
    pub fn clock(&self) -> Option<Clock> {
        self.sample().map(|s| s.clock)
    }
}

impl fmt::Display for Reading {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.sample() {
            Some(s) => write!(f, "{} {} at {}", self.freshness(), s.value, s.clock),
            None => f.write_str("no data"),
        }
    }
}

/// An error a [`MetricSource`] returns: it knows whether waiting could help.
pub trait SourceError: std::error::Error + Send + Sync + 'static {
    /// True when retrying later may succeed (server down, network trouble); false when
    /// an operator must act (wrong password, unknown host or item).
    fn is_transient(&self) -> bool;
}

/// The capability to read the newest value of one metric (the load of one host).
///
/// A source keeps what it needs to judge freshness between reads (the last clock it saw
/// and since when), so it takes `&mut self`. Reads are expected every poll interval.
pub trait MetricSource: Send {
    /// The source's error type.
    type Error: SourceError;

    /// What is being read, for logs: e.g. `zabbix host "db1" item "system.cpu.load[percpu,avg1]"`.
    fn describe(&self) -> String;

    /// The newest reading.
    fn read(&mut self) -> impl Future<Output = Result<Reading, Self::Error>> + Send;
}

/// Checks every [`MetricSource`] implementation must pass (run by the unit tests on the
/// scripted source and by the integration tests on Zabbix).
pub mod conformance {
    use super::{MetricSource, Reading};
    use std::time::Duration;

    /// Read `reads` times, `interval` apart, and check the readings are consistent: values
    /// finite, clocks never going back, no "no data" once a value was seen. Returns the
    /// readings, or a description of the first inconsistency.
    pub async fn readings_are_consistent<S: MetricSource>(
        source: &mut S,
        reads: usize,
        interval: Duration,
    ) -> Result<Vec<Reading>, String> {
        let mut out: Vec<Reading> = Vec::with_capacity(reads);
        for i in 0..reads {
            if i > 0 {
                tokio::time::sleep(interval).await;
            }
            let r = source
                .read()
                .await
                .map_err(|e| format!("read #{i} of {}: {e}", source.describe()))?;
            if let Some(s) = r.sample() {
                if !s.value.is_finite() {
                    return Err(format!("read #{i}: value {} is not finite", s.value));
                }
            }
            let newest_seen = out.iter().filter_map(Reading::clock).max();
            if let (Some(seen), Some(c)) = (newest_seen, r.clock()) {
                if c < seen {
                    return Err(format!("read #{i}: clock went back from {seen} to {c}"));
                }
            }
            if let (Reading::NoData, Some(seen)) = (r, newest_seen) {
                return Err(format!("read #{i}: no data after a value of {seen}"));
            }
            out.push(r);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clocks_order_by_seconds_then_nanoseconds() {
        assert!(Clock::new(10, 5) < Clock::new(10, 6));
        assert!(Clock::new(10, 999_999_999) < Clock::new(11, 0));
        assert_eq!(Clock::new(1, 2_000_000_000).nanos, 999_999_999);
        assert_eq!(Clock::new(3, 5).to_string(), "3.000000005");
    }

    #[test]
    fn reading_exposes_value_clock_and_freshness() {
        let s = Sample {
            value: 0.5,
            clock: Clock::new(100, 0),
        };
        assert_eq!(Reading::Fresh(s).freshness(), Freshness::Fresh);
        assert_eq!(Reading::Stale(s).value(), Some(0.5));
        assert_eq!(Reading::Stale(s).clock(), Some(Clock::new(100, 0)));
        assert_eq!(Reading::NoData.value(), None);
        assert_eq!(Reading::NoData.freshness().as_str(), "no_data");
        assert_eq!(Reading::NoData.to_string(), "no data");
    }
}
