//! A local [`MetricSource`]: the CPU use of a process on this machine, in percent of one
//! core, read from `/proc/<pid>/stat` (user + system time, clock ticks at 100 Hz, the
//! Linux default `CLK_TCK`). The demo reads the local stack's `influxd` with it, where no
//! Zabbix is running. The process is found by a substring of its command line (the
//! stack's directory), so after a migration the new stack's `influxd` is read.

use std::time::Instant;

use crate::monitor::{Clock, MetricSource, Reading, Sample, SourceError};

const CLK_TCK: f64 = 100.0;

#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error("no running process whose command line contains {0:?}")]
    NotFound(String),
}

impl SourceError for ProcError {
    fn is_transient(&self) -> bool {
        true
    }
}

/// CPU use of the process whose command line contains `needle`.
pub struct ProcessCpu {
    needle: String,
    last: Option<(u32, u64, Instant)>,
}

impl ProcessCpu {
    pub fn new(needle: impl Into<String>) -> ProcessCpu {
        ProcessCpu {
            needle: needle.into(),
            last: None,
        }
    }

    fn matches(&self, pid: u32) -> bool {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| {
                let c = String::from_utf8_lossy(&c);
                c.starts_with("influxd") && c.contains(&self.needle)
            })
            .unwrap_or(false)
    }

    /// The process: the one read last time while it still matches, else a scan of /proc.
    fn find(&self) -> Option<u32> {
        if let Some((pid, _, _)) = self.last {
            if self.matches(pid) {
                return Some(pid);
            }
        }
        std::fs::read_dir("/proc")
            .ok()?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
            .find(|&pid| self.matches(pid))
    }

    fn ticks(pid: u32) -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name (which may contain spaces) start after ')'.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat; 12 and 13 after ')' and state.
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    }
}

impl MetricSource for ProcessCpu {
    type Error = ProcError;

    fn describe(&self) -> String {
        format!("CPU of the local influxd under {:?}", self.needle)
    }

    async fn read(&mut self) -> Result<Reading, ProcError> {
        let pid = self
            .find()
            .ok_or_else(|| ProcError::NotFound(self.needle.clone()))?;
        let ticks = Self::ticks(pid).ok_or_else(|| ProcError::NotFound(self.needle.clone()))?;
        let now = Instant::now();
        let prev = self.last.replace((pid, ticks, now));
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let clock = Clock::new(wall.as_secs(), wall.subsec_nanos());
        Ok(match prev {
            Some((p, t, at)) if p == pid && now > at => {
                let secs = now.duration_since(at).as_secs_f64();
                let pct = ticks.saturating_sub(t) as f64 / CLK_TCK / secs * 100.0;
                Reading::Fresh(Sample { value: pct, clock })
            }
            // A first read, or a new process: a rate needs two readings.
            _ => Reading::NoData,
        })
    }
}
