//! The write-time guard (`migration.write_time_guard`): while the shards stream, the
//! source's writers come first. Every [`TICK`] the guard reads the source's HTTP write
//! counters (`/debug/vars`) and the bytes the streams read in the tick. When the writes
//! answered in the tick took longer than the goal on average, or none was answered
//! while one was served through the whole tick, it halves the streams' rate, once for
//! one stall (the two slow ticks after a cut hold the rate); while they take under half
//! the goal, or while nothing writes at all, it raises the rate by an eighth, up to
//! `migration.transfer_rate_limit`.
//!
//! A goal at or under what the writes take anyway (with the capture on, and whatever
//! else the server does) would hold the streams at their floor for good (stop 36: 3 ms,
//! 1 MB/s, a dump of over an hour). So the guard learns: writes still slow after
//! [`LEARN_TICKS`] ticks in a row with the streams at their floor are the writers' own
//! time, not the dump's: the least of those ticks' means becomes the baseline (the least,
//! so that the writes queued behind the stall that made the last cut do not count), and
//! the goal half again over it (never under the one configured, never over
//! [`LEARNED_GOAL_MOST`]), said in a warning. Calm is then under halfway from the
//! baseline to the goal. A disk's backlog that keeps every write slow for all those
//! ticks would be taken for the writers' own time too: the guard then spares the
//! writers less than configured, and says by how much.
//!
//! What it measures is what the writers wait for, whatever the cause: the source's CPU,
//! its disk, or a storage backend the target's volume shares with the source's (a
//! cloud's Ceph). It reacts a tick late at best, and a disk's backlog of written-out
//! pages drains at the disk's pace, not the stream's: it bounds how long the writers
//! suffer, not the first slow write.

use std::convert::Infallible;
use std::time::{Duration, Instant};

use crate::influx::snapshotter::Pace;
use crate::influx::{Influx, WriteTimes};

/// How often the guard reads the source's counters.
pub(super) const TICK: Duration = Duration::from_millis(500);

/// How long one read of the counters may take (a source of many shards answers a large
/// `/debug/vars`): the tick judged is the time between two readings, however long.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads in a row that fail before the guard says so (once).
const FAILED_READS_SAID: u32 = 10;

/// The least rate the guard sets, bytes per second: `migration.transfer_rate_limit`'s
/// least.
const FLOOR: u64 = 1_000_000;

/// Slow ticks in a row with the streams at the floor after which the writes' mean in
/// them is taken as their own time (3 s): long enough that a stall the streams caused
/// before the floor has been answered and judged.
const LEARN_TICKS: u32 = 6;

/// The least writes answered in those ticks for a mean to learn from.
const LEARN_WRITES: u64 = 10;

/// The most a learned goal may be: half a tick, so that a write served through a whole
/// tick stays slow by it (in [`Guard::next`]).
const LEARNED_GOAL_MOST: Duration = Duration::from_millis(250);

/// The guard's state: its goal and what it did.
#[derive(Debug)]
pub(super) struct Guard {
    /// The writes' mean time the streams keep to.
    goal: Duration,
    /// `migration.transfer_rate_limit` (0: none): the rate never goes above it.
    ceiling: u64,
    /// Times the guard slowed the streams.
    pub slowdowns: u32,
    /// The lowest rate it set.
    pub lowest: Option<u64>,
    /// Ticks judged: two readings of the source's counters, one after the other.
    pub judged: u32,
    /// Bytes per second the streams read in the tick before the last one judged.
    last_used: u64,
    /// Slow ticks still to be taken, after a cut, for the stall that made it (see
    /// [`Guard::next`]), not as reasons for more cuts.
    held: u8,
    /// Slow ticks so taken: the rate held.
    pub holds: u32,
    /// The writes' own mean time, learned at the floor (none: zero).
    baseline: Duration,
    /// Slow ticks in a row at the floor, the writes answered in them, and the least
    /// mean of one of them (nanoseconds).
    at_floor: (u32, u64, Option<u64>),
    /// The goal configured, if the guard raised its own: the writes' mean learned at
    /// the floor, and the goal set from it.
    pub learned: Option<(Duration, Duration)>,
}

impl Guard {
    pub fn new(goal: Duration, ceiling: u64) -> Guard {
        Guard {
            goal,
            ceiling,
            slowdowns: 0,
            lowest: None,
            judged: 0,
            last_used: 0,
            held: 0,
            holds: 0,
            baseline: Duration::ZERO,
            at_floor: (0, 0, None),
            learned: None,
        }
    }

    /// Learn the writes' own time from slow ticks at the floor (see the module's
    /// documentation); whether the goal was raised.
    fn learn(&mut self, rate: u64, slow: bool, answered: u64, nanos: u64) -> bool {
        if !(slow && rate > 0 && rate <= FLOOR) {
            self.at_floor = (0, 0, None);
            return false;
        }
        let (ticks, writes, least) = self.at_floor;
        let mean = nanos.checked_div(answered);
        let least = match (least, mean) {
            (Some(l), Some(m)) => Some(l.min(m)),
            (l, m) => l.or(m),
        };
        self.at_floor = (ticks + 1, writes + answered, least);
        let (ticks, writes, Some(least)) = self.at_floor else {
            return false;
        };
        if ticks < LEARN_TICKS || writes < LEARN_WRITES {
            return false;
        }
        self.at_floor = (0, 0, None);
        let own = Duration::from_nanos(least);
        let goal = (own + own / 2).min(LEARNED_GOAL_MOST);
        if goal <= self.goal {
            return false;
        }
        self.baseline = own.min(goal);
        self.goal = goal;
        self.learned = Some((own, goal));
        true
    }

    /// The rate from now on (0: none), from the rate during the tick, the source's
    /// counters at its start and end, the bytes the streams read in it and its length.
    pub fn next(
        &mut self,
        rate: u64,
        before: WriteTimes,
        after: WriteTimes,
        streamed: u64,
        tick: Duration,
    ) -> u64 {
        // Counters that went back: the server restarted, and the tick says nothing.
        if after.arrived < before.arrived || after.nanos < before.nanos {
            self.at_floor = (0, 0, None);
            return rate;
        }
        self.judged += 1;
        let answered = after.answered().saturating_sub(before.answered());
        let nanos = after.nanos - before.nanos;
        let goal = self.goal.as_nanos() as u64;
        // The mean time of the writes answered in the tick; none answered: any write
        // served at the tick's start still is, and has waited the whole tick.
        let mean = nanos.checked_div(answered);
        let slow = match mean {
            Some(mean) => mean > goal,
            None => before.active > 0 && after.active > 0 && tick >= self.goal,
        };
        if self.learn(rate, slow, answered, nanos) {
            // The floor was the writers' own time: the hold that comes with a cut ends,
            // and the rate holds until the writes are calm by the new goal.
            self.held = 0;
            return rate;
        }
        let used = (streamed as f64 / tick.as_secs_f64().max(1e-3)) as u64;
        let used_before = std::mem::replace(&mut self.last_used, used);
        // One stall is seen up to three times: while it is served, once it is answered,
        // and in the writes queued behind it. It is cut for once: the two slow ticks
        // after a cut hold the rate (a tick not judged slow ends the hold), so writes
        // that stay slow halve it every third tick, not every tick (stop 35's 100M log,
        // docs/benchmarks.md: one stall took the streams from 133 to 16.6 MB/s in 1 s).
        if !slow {
            self.held = 0;
        } else if self.held > 0 {
            self.held -= 1;
            self.holds += 1;
            return rate;
        }
        if slow {
            // Half of what the streams were allowed (with no limit, of what they read).
            // Not of what they read under a limit: a stall holds them too, and halving
            // the little they read in it sent the rate to the floor, where those stalls
            // came back all the same (100M on one disk, docs/benchmarks.md "Stop 34").
            // With no limit, the larger of this tick's and the one before: a stall that
            // held the streams in this one leaves them little to halve (found by review).
            let base = if rate == 0 {
                used.max(used_before)
            } else {
                rate
            };
            let new = (base / 2).max(FLOOR);
            self.held = 2;
            self.slowdowns += 1;
            self.lowest = Some(self.lowest.map_or(new, |l| l.min(new)));
            return new;
        }
        // Calm: quick writes, or none at all (nobody waits). A write that arrived in the
        // tick and is still served says nothing yet.
        // Under halfway from the writes' own time (none learned: zero) to the goal.
        let baseline = self.baseline.as_nanos() as u64;
        let calm = match mean {
            Some(mean) => mean <= baseline + goal.saturating_sub(baseline) / 2,
            None => before.active == 0 && after.active == 0,
        };
        // Raised only while the streams use what they have: a rate they do not reach
        // (they wait on a server) would let a burst through later.
        if calm && rate > 0 && used >= rate / 4 * 3 {
            let new = rate + (rate / 8).max(FLOOR);
            return if self.ceiling > 0 {
                new.min(self.ceiling)
            } else {
                new
            };
        }
        rate
    }
}

/// Pace the streams by the source's write time until dropped (the dump's end).
pub(super) async fn watch(source: &Influx, pace: &Pace, guard: &mut Guard) -> Infallible {
    let mut last: Option<(Instant, WriteTimes, u64)> = None;
    let mut failed = 0u32;
    loop {
        let read = match tokio::time::timeout(READ_TIMEOUT, source.write_times()).await {
            Ok(read) => read.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer in {READ_TIMEOUT:?}")),
        };
        let (now, taken) = (Instant::now(), pace.taken());
        match read {
            Ok(times) => {
                if let Some((then, before, taken_before)) = last {
                    let rate = pace.rate();
                    let streamed = taken.saturating_sub(taken_before);
                    let (holds, learned) = (guard.holds, guard.learned);
                    let next = guard.next(rate, before, times, streamed, now - then);
                    if let (Some((own, goal)), true) = (guard.learned, guard.learned != learned) {
                        tracing::warn!(
                            own_ms = own.as_secs_f64() * 1e3,
                            goal_ms = goal.as_secs_f64() * 1e3,
                            floor = %per_second(FLOOR),
                            "the source's writes stay slow with the shard streams at their floor: that is their own time, not the dump's, so the guard keeps to half again over it from now on (migration.write_time_guard is at or under what the service's writes take; set it above their usual mean, /debug/vars httpd writeReqDurationNs / writeReq)"
                        );
                    }
                    if guard.holds > holds {
                        tracing::info!(
                            rate = %per_second(rate),
                            "the source's writes are still slow: the rate holds, one cut for one stall (migration.write_time_guard)"
                        );
                    }
                    if next != rate {
                        let answered = times.answered().saturating_sub(before.answered());
                        let mean_ms = if answered == 0 {
                            f64::NAN
                        } else {
                            times.nanos.saturating_sub(before.nanos) as f64 / answered as f64 / 1e6
                        };
                        let (from, to) = (per_second(rate), per_second(next));
                        let read = format!(
                            "{:.1} MB/s",
                            streamed as f64 / (now - then).as_secs_f64().max(1e-3) / 1e6
                        );
                        if next < rate || rate == 0 {
                            tracing::info!(
                                writes = answered,
                                mean_ms,
                                served_now = times.active,
                                streams_read = %read,
                                from = %from,
                                to = %to,
                                "the source's writes are slow: shard streams slowed (migration.write_time_guard)"
                            );
                        } else {
                            tracing::debug!(
                                writes = answered,
                                mean_ms,
                                streams_read = %read,
                                from = %from,
                                to = %to,
                                "shard streams faster"
                            );
                        }
                        pace.set_rate(next);
                    }
                }
                last = Some((now, times, taken));
                failed = 0;
            }
            // No evidence: the next tick starts over.
            Err(why) => {
                failed += 1;
                if failed == FAILED_READS_SAID {
                    tracing::warn!(reads = failed, error = %why, "the write-time guard cannot read the source's counters (/debug/vars): the shard streams keep the rate they have");
                } else {
                    tracing::debug!(error = %why, "the write-time guard could not read the source's counters");
                }
                last = None;
                // The ticks a hold or a lesson counts are half seconds in a row: a gap in
                // the readings ends both.
                guard.held = 0;
                guard.at_floor = (0, 0, None);
            }
        }
        tokio::time::sleep(TICK.saturating_sub(now.elapsed())).await;
    }
}

/// A rate as the log shows it.
fn per_second(rate: u64) -> String {
    match rate {
        0 => "no limit".into(),
        r => format!("{:.1} MB/s", r as f64 / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn times(arrived: u64, active: u64, nanos: u64) -> WriteTimes {
        WriteTimes {
            arrived,
            active,
            nanos,
        }
    }

    #[test]
    fn slow_writes_halve_the_streams_and_calm_ones_raise_them_to_the_limit() {
        let mut g = Guard::new(Duration::from_millis(5), 80_000_000);
        let tick = Duration::from_millis(500);
        let start = times(100, 0, 100 * MS);
        // 50 writes in the tick, 20 ms each: with no limit, half of what the streams read.
        let slow = times(150, 0, 100 * MS + 50 * 20 * MS);
        // Each cut on a guard of its own: the slow ticks right after a cut hold the rate
        // (the next test).
        let cut = |rate, streamed| {
            let mut g = Guard::new(Duration::from_millis(5), 80_000_000);
            let new = g.next(rate, start, slow, streamed, tick);
            assert_eq!((g.slowdowns, g.lowest), (1, Some(new)));
            new
        };
        assert_eq!(cut(0, 100_000_000), 100_000_000);
        // With one, half of it, whatever the streams read in the tick: a stall that
        // holds the writes holds them too.
        assert_eq!(cut(60_000_000, 30_000_000), 30_000_000);
        assert_eq!(cut(40_000_000, 100_000), 20_000_000);
        // Never below the floor.
        assert_eq!(cut(1_500_000, 0), FLOOR);
        // Calm writes (1 ms, under half the goal) while the streams use their rate: an
        // eighth more, never above the limit.
        let calm = times(150, 0, 100 * MS + 50 * MS);
        assert_eq!(
            g.next(40_000_000, start, calm, 20_000_000, tick),
            45_000_000
        );
        assert_eq!(
            g.next(75_000_000, start, calm, 37_000_000, tick),
            80_000_000
        );
        // Not while they use less than three quarters of it.
        assert_eq!(
            g.next(40_000_000, start, calm, 10_000_000, tick),
            40_000_000
        );
        // With no limit in the configuration, the rate grows as the streams use it.
        let mut free = Guard::new(Duration::from_millis(5), 0);
        assert_eq!(
            free.next(200_000_000, start, calm, 100_000_000, tick),
            225_000_000
        );
        // No limit set and calm writes: still none.
        assert_eq!(free.next(0, start, calm, 100_000_000, tick), 0);
        // Between half the goal and the goal: the rate stays.
        let between = times(150, 0, 100 * MS + 50 * 4 * MS);
        assert_eq!(
            g.next(40_000_000, start, between, 20_000_000, tick),
            40_000_000
        );
        assert_eq!(g.slowdowns, 0);
    }

    #[test]
    fn one_stall_is_cut_for_once_and_writes_that_stay_slow_halve_the_rate_every_third_tick() {
        let mut g = Guard::new(Duration::from_millis(5), 80_000_000);
        let tick = Duration::from_millis(500);
        // A write arrived before the first tick and is served through it: a cut.
        let t0 = times(100, 1, 99 * MS);
        let t1 = times(100, 1, 99 * MS);
        assert_eq!(g.next(80_000_000, t0, t1, 40_000_000, tick), 40_000_000);
        // It is answered in the next tick (700 ms), 20 writes queued behind it, and those
        // are answered in the one after (300 ms each on average): the same stall, twice
        // more, and the rate holds.
        let t2 = times(120, 20, 99 * MS + 700 * MS);
        assert_eq!(g.next(40_000_000, t1, t2, 1_000_000, tick), 40_000_000);
        let t3 = times(120, 0, t2.nanos + 20 * 300 * MS);
        assert_eq!(g.next(40_000_000, t2, t3, 1_000_000, tick), 40_000_000);
        assert_eq!((g.slowdowns, g.holds), (1, 2));
        // Still slow a third tick on: that is news, a second cut.
        let t4 = times(150, 0, t3.nanos + 30 * 10 * MS);
        assert_eq!(g.next(40_000_000, t3, t4, 20_000_000, tick), 20_000_000);
        assert_eq!((g.slowdowns, g.lowest), (2, Some(20_000_000)));
        // A quick tick ends the hold: the next slow one is cut for at once.
        let t5 = times(200, 0, t4.nanos + 50 * MS);
        assert_eq!(g.next(20_000_000, t4, t5, 10_000_000, tick), 22_500_000);
        let t6 = times(250, 0, t5.nanos + 50 * 10 * MS);
        assert_eq!(g.next(22_500_000, t5, t6, 11_000_000, tick), 11_250_000);
        assert_eq!(g.slowdowns, 3);
    }

    #[test]
    fn with_no_limit_a_stalled_tick_halves_what_the_streams_read_before_it() {
        let mut g = Guard::new(Duration::from_millis(5), 0);
        let tick = Duration::from_millis(500);
        // A tick of 50 writes of 1 ms at 100 MB/s with no limit: still none. One more
        // write arrived in it, and is served at its end.
        let (start, calm) = (times(100, 0, 100 * MS), times(151, 1, 150 * MS));
        assert_eq!(g.next(0, start, calm, 50_000_000, tick), 0);
        // That write is still served at the end of the next tick, none answered, the
        // streams held too (1 MB read): half of the 100 MB/s before, not of the 2 MB/s.
        let stuck = times(151, 1, 150 * MS);
        assert_eq!(g.next(0, calm, stuck, 1_000_000, tick), 50_000_000);
        assert_eq!((g.judged, g.slowdowns), (2, 1));
        // Counters that went back are not judged.
        assert_eq!(g.next(0, calm, start, 1_000_000, tick), 0);
        assert_eq!(g.judged, 2);
    }

    #[test]
    fn writes_still_slow_at_the_floor_are_their_own_time_and_raise_the_goal() {
        let mut g = Guard::new(Duration::from_millis(3), 0);
        let tick = Duration::from_millis(500);
        // 50 writes of 4 ms a tick, whatever the streams do: the first tick halves them,
        // and so on down to the floor (a cut, then two ticks held, each time).
        let mut t = times(100, 0, 100 * MS);
        let mut slow_tick = |g: &mut Guard, rate: u64| {
            let next = times(t.arrived + 50, 0, t.nanos + 50 * 4 * MS);
            let r = g.next(rate, t, next, rate / 2, tick);
            t = next;
            r
        };
        let mut rate = 8 * FLOOR;
        let mut ticks = 0;
        while rate > FLOOR {
            rate = slow_tick(&mut g, rate);
            ticks += 1;
            assert!(ticks < 20, "the rate reaches the floor");
        }
        assert_eq!(
            g.learned, None,
            "not before {LEARN_TICKS} slow ticks at the floor"
        );
        // The tick that cut to the floor counts as the first at it only from the next.
        for _ in 0..LEARN_TICKS - 1 {
            assert_eq!(slow_tick(&mut g, rate), FLOOR);
            assert_eq!(g.learned, None);
        }
        assert_eq!(
            slow_tick(&mut g, rate),
            FLOOR,
            "the rate holds as it learns"
        );
        let (own, goal) = g.learned.expect("learned");
        assert_eq!(own, Duration::from_millis(4));
        assert_eq!(goal, Duration::from_millis(6));
        assert_eq!(g.goal, goal);
        // The same writes now are calm (under halfway from 4 to 6 ms): the rate rises.
        let same = times(t.arrived + 50, 0, t.nanos + 50 * 4 * MS);
        assert_eq!(g.next(FLOOR, t, same, FLOOR / 2, tick), 2 * FLOOR);
        // Between 5 and 6 ms it stays.
        let between = times(same.arrived + 50, 0, same.nanos + 50 * 55 * MS / 10);
        assert_eq!(g.next(2 * FLOOR, same, between, FLOOR, tick), 2 * FLOOR);
        // Slower than the new goal: a cut, as before.
        let slower = times(between.arrived + 50, 0, between.nanos + 50 * 7 * MS);
        assert_eq!(g.next(2 * FLOOR, between, slower, FLOOR, tick), FLOOR);
        assert_eq!(g.learned, Some((own, goal)), "one lesson so far");

        // Slow ticks at the floor count in a row: one that is not slow starts over.
        let mut spells = Guard::new(Duration::from_millis(3), 0);
        let mut t = times(100, 0, 100 * MS);
        for i in 0..4 * LEARN_TICKS {
            let each = if i % LEARN_TICKS == LEARN_TICKS - 1 {
                2
            } else {
                4
            };
            let next = times(t.arrived + 50, 0, t.nanos + 50 * each * MS);
            spells.next(FLOOR, t, next, FLOOR / 2, tick);
            t = next;
        }
        assert_eq!(
            spells.learned, None,
            "never {LEARN_TICKS} slow ticks in a row"
        );
        // Too few writes to learn from: the ticks go on counting until there are enough.
        let mut few = Guard::new(Duration::from_millis(3), 0);
        let mut t = times(100, 0, 100 * MS);
        for i in 1..=LEARN_WRITES {
            let next = times(t.arrived + 1, 0, t.nanos + 4 * MS);
            few.next(FLOOR, t, next, FLOOR / 2, tick);
            t = next;
            assert_eq!(few.learned.is_some(), i == LEARN_WRITES, "after {i} writes");
        }
        // Any goal far under what the writes take at the floor follows them: 20 ms
        // configured, 25 ms writes.
        let mut high = Guard::new(Duration::from_millis(20), 0);
        let mut t = times(100, 0, 100 * MS);
        for _ in 0..2 * LEARN_TICKS {
            let next = times(t.arrived + 50, 0, t.nanos + 50 * 25 * MS);
            high.next(FLOOR, t, next, FLOOR / 2, tick);
            t = next;
        }
        let (own, goal) = high.learned.expect("25 ms over a 20 ms goal");
        assert_eq!((own.as_millis(), goal.as_micros()), (25, 37_500));
        // The writes queued behind the stall that made the cut to the floor are not the
        // writers' own time: the least tick's mean is (3.5 ms, not the 9 ms of them all).
        let mut stalled = Guard::new(Duration::from_millis(3), 0);
        let mut t = times(100, 0, 100 * MS);
        for each in [300, 100, 35, 35, 35, 35] {
            let next = times(t.arrived + 50, 0, t.nanos + 50 * each * MS / 10);
            stalled.next(FLOOR, t, next, FLOOR / 2, tick);
            t = next;
        }
        let (own, goal) = stalled.learned.expect("six slow ticks");
        assert_eq!((own.as_micros(), goal.as_micros()), (3_500, 5_250));
        // Never over half a tick, where a write served through a whole tick would no
        // longer be slow; and raised only once there.
        let mut crawl = Guard::new(Duration::from_millis(60), 0);
        let mut t = times(100, 0, 100 * MS);
        for _ in 0..4 * LEARN_TICKS {
            let next = times(t.arrived + 20, 0, t.nanos + 20 * 400 * MS);
            crawl.next(FLOOR, t, next, FLOOR / 2, tick);
            t = next;
        }
        assert_eq!(crawl.goal, LEARNED_GOAL_MOST);
        assert_eq!(
            crawl.learned,
            Some((Duration::from_millis(400), LEARNED_GOAL_MOST))
        );
    }

    #[test]
    fn a_write_served_for_the_whole_tick_is_slow_and_no_write_at_all_is_calm() {
        let mut g = Guard::new(Duration::from_millis(5), 0);
        let tick = Duration::from_millis(500);
        // One write arrived before the tick and is still served at its end, none answered.
        let stuck = (times(100, 1, 99 * MS), times(100, 1, 99 * MS));
        assert_eq!(g.next(0, stuck.0, stuck.1, 50_000_000, tick), 50_000_000);
        // One that arrived during the tick may be new: no evidence.
        let new = (times(100, 0, 100 * MS), times(101, 1, 100 * MS));
        assert_eq!(
            g.next(30_000_000, new.0, new.1, 15_000_000, tick),
            30_000_000
        );
        // Nothing written at all: nobody waits, the streams may go faster.
        let idle = (times(100, 0, 100 * MS), times(100, 0, 100 * MS));
        assert_eq!(
            g.next(30_000_000, idle.0, idle.1, 15_000_000, tick),
            33_750_000
        );
        // A server restarted (its counters went back): the tick says nothing.
        let restarted = (times(100, 0, 100 * MS), times(3, 0, MS));
        assert_eq!(
            g.next(30_000_000, restarted.0, restarted.1, 15_000_000, tick),
            30_000_000
        );
        let slow_after_restart = (times(100, 0, 100 * MS), times(3, 0, 900 * MS));
        assert_eq!(
            g.next(
                30_000_000,
                slow_after_restart.0,
                slow_after_restart.1,
                15_000_000,
                tick
            ),
            30_000_000
        );
        assert_eq!(g.slowdowns, 1);
    }
}
