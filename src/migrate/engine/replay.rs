//! Replay: the spool's records written to the target in order, in batches; the delta
//! before cutover and every catch-up after it; the offset a resumed run starts from.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::context::Migration;
use super::{MigrateError, Phase};
use crate::influx::{lineproto, Influx, InfluxError, MONITOR_DB};
use crate::migrate::capture::KeySet;
use crate::migrate::spool::SpoolReader;

impl Migration<'_> {
    pub(super) async fn delta(&mut self) -> Result<(), MigrateError> {
        let p = Phase::Delta;
        // The imports are done: the target gets its priority back while the delta and the
        // cutover's first steps run, in time for the writers (the cutover waits for it);
        // with verify.target_first, once its aggregates are read, just before the repoint.
        if !self.cfg.verify.target_first {
            self.raise_priority(super::priority::End::Target);
        }
        let spool = self.spool.clone().ok_or_else(|| MigrateError::Failed {
            phase: p,
            msg: "no capture spool".into(),
        })?;
        spool
            .sync()
            .map_err(|source| MigrateError::Spool { phase: p, source })?;
        let mut reader = spool
            .reader()
            .map_err(|source| MigrateError::Spool { phase: p, source })?;
        // Catch up with what was captured so far; writers keep writing to the source.
        let dst = self.dst().influx.clone();
        let t = Instant::now();
        let earlier: Vec<_> = self
            .resume
            .iter()
            .flat_map(|r| r.earlier.iter().map(|c| c.spool.clone()))
            .collect();
        for old in earlier {
            // The interrupted runs' captures first, oldest first, each in its own order.
            let Ok(mut r) = SpoolReader::open_finished(&old) else {
                // A run interrupted before its capture began spooled nothing.
                continue;
            };
            // Only what was not replayed yet: replaying older records again would put
            // back values that writers have overwritten on the target since.
            r.seek(replayed_offset(&old))
                .map_err(|source| MigrateError::Spool { phase: p, source })?;
            let n = replay_ready(&mut r, &dst, p, None).await?;
            // Recorded, so a crash of this run does not replay them once more.
            record_offset_of(&old, r.offset()).await;
            if n > 0 {
                self.progress.note(&format!(
                    "replayed {n} points captured before the interruption"
                ));
            }
            self.report.points_replayed += n;
        }
        // Bounded: writers that outpace the replay would keep the delta going for ever,
        // while the source goes on taking their points; better a rollback now. (Not in a
        // resumed run, which is past the repoint.)
        let limit = (!self.report.cutover_done).then_some(self.cfg.capture.quiet_timeout);
        let n = replay(&mut reader, &dst, p, None, limit).await?;
        record_offset(&self.cfg.capture.spool_dir, &self.id, reader.offset()).await;
        self.report.points_replayed += n;
        self.report.replay_seconds += t.elapsed().as_secs_f64();
        self.reader = Some(reader);
        self.check_capture_complete(p).await?;
        Ok(())
    }

    /// Replay what the spool holds now (tracking the keys once the target is watched).
    pub(super) async fn replay_now(&mut self, phase: Phase) -> Result<u64, MigrateError> {
        let (Some(reader), Some(dst)) = (self.reader.as_mut(), self.target.as_ref()) else {
            return Ok(0);
        };
        let t = Instant::now();
        // Before the repoint, writers that outpace the replay fail it (a rollback); after,
        // the writers depend on the target and the drain's own deadline bounds it. Without
        // a cutover command, writers may use the target from the cutover on.
        let before_repoint = !self.report.cutover_done
            && (phase == Phase::Delta || self.cfg.cutover.command.is_some());
        let limit = before_repoint.then_some(self.cfg.capture.quiet_timeout);
        let track = self.touched.as_deref();
        let n = replay(reader, &dst.influx, phase, track, limit).await?;
        record_offset(&self.cfg.capture.spool_dir, &self.id, reader.offset()).await;
        self.report.points_replayed += n;
        self.report.replay_seconds += t.elapsed().as_secs_f64();
        Ok(n)
    }
}

/// Largest body sent in one replay request (InfluxDB's default limit is 25 MB).
const REPLAY_BATCH_BYTES: usize = 4 << 20;

/// Replay every record committed so far. Writes to different databases or retention
/// policies are independent, so each (database, retention policy) gets its own batch and
/// interleaved writers (RCBaaS's udr, rc and billing databases; the availability probe)
/// still travel in large requests; within one, the spool's order is kept, and a change of
/// precision flushes first. Everything open is flushed once the batches hold
/// [`REPLAY_BATCH_BYTES`] together, and at the end. Returns the points replayed.
///
/// Found on the VM lab: batching only *consecutive* records of one database sent one
/// request per captured write as soon as two databases were written in turn, and under
/// load the replay never caught up with the capture.
///
/// With `track`, the key of every replayed point is counted as replayed, so verification
/// can tell stateshift's own writes to the target from a writer's.
pub async fn replay_ready(
    reader: &mut SpoolReader,
    target: &Influx,
    phase: Phase,
    track: Option<&Mutex<KeySet>>,
) -> Result<u64, MigrateError> {
    replay(reader, target, phase, track, None).await
}

/// [`replay_ready`] for a spool that writers keep filling, which fails when the replay
/// does not gain on them: when the backlog (bytes captured and not on the target yet) has
/// not come below its lowest so far for `give_up_after` and more than one request
/// ([`REPLAY_BATCH_BYTES`]) is unread. A backlog that comes to a new lowest within every
/// `give_up_after` (each 4 MB request written does that, unless the writers add more
/// meanwhile) never trips it, however large; one that only grows does after
/// `give_up_after` (`capture.quiet_timeout`; used before the repoint, where failing is a
/// safe rollback). Writers that keep exact pace, so that the spool is never empty, end it
/// after `give_up_after` with less than one request left, for the next catch-up.
pub async fn replay_catching_up(
    reader: &mut SpoolReader,
    target: &Influx,
    phase: Phase,
    give_up_after: Duration,
) -> Result<u64, MigrateError> {
    replay(reader, target, phase, None, Some(give_up_after)).await
}

async fn replay(
    reader: &mut SpoolReader,
    target: &Influx,
    phase: Phase,
    track: Option<&Mutex<KeySet>>,
    give_up_after: Option<Duration>,
) -> Result<u64, MigrateError> {
    let mut points = 0u64;
    let mut open: Vec<Batch> = Vec::new();
    let mut held = 0usize;
    let start = Instant::now();
    // The lowest backlog seen (captured, not on the target yet: unread, or read and held
    // in a batch), and when it was seen.
    let mut lowest = (reader.lag(), start);
    loop {
        if let Some(limit) = give_up_after {
            let (lag, behind) = (reader.lag(), reader.lag() + held as u64);
            if behind < lowest.0 {
                lowest = (behind, Instant::now());
            } else if lowest.1.elapsed() >= limit && lag <= REPLAY_BATCH_BYTES as u64 {
                // Writers as fast as the replay, never leaving the spool empty for a
                // moment: as caught up as they allow; what is left is one request, for
                // the next catch-up (after the cutover command, if this was the last).
                tracing::warn!(
                    behind_bytes = lag,
                    "the replay keeps pace with the writers without ever emptying the spool"
                );
                break;
            } else if lowest.1.elapsed() >= limit {
                return Err(MigrateError::Failed {
                    phase,
                    msg: format!(
                        "the replay is not catching up with the writers: {} MB captured and \
                         not replayed yet, never fewer than {} MB for {limit:?} \
                         (capture.quiet_timeout), after {points} points replayed in {:.1} s; \
                         the writers write faster than the target takes them",
                        mb(behind),
                        mb(lowest.0),
                        start.elapsed().as_secs_f64()
                    ),
                });
            }
        }
        let ready = reader
            .next_batch(REPLAY_BATCH_BYTES)
            .await
            .map_err(|source| MigrateError::Spool { phase, source })?;
        if ready.is_empty() {
            break;
        }
        for r in ready {
            if r.db == MONITOR_DB {
                // The source's own statistics, captured for the drain's proof only.
                continue;
            }
            if held + r.body.len() > REPLAY_BATCH_BYTES {
                for b in &mut open {
                    points += b.flush(target, phase, track).await?;
                }
                held = 0;
            }
            let i = match open.iter().position(|b| b.db == r.db && b.rp == r.rp) {
                Some(i) => i,
                None => {
                    open.push(Batch {
                        db: r.db,
                        rp: r.rp,
                        precision: r.precision.clone(),
                        body: Vec::new(),
                    });
                    open.len() - 1
                }
            };
            let b = &mut open[i];
            if b.precision != r.precision {
                held -= b.body.len();
                points += b.flush(target, phase, track).await?;
                b.precision = r.precision;
            }
            held += r.body.len() + 1;
            b.body.extend_from_slice(&r.body);
            if !r.body.ends_with(b"\n") {
                b.body.push(b'\n');
            }
        }
    }
    for b in &mut open {
        points += b.flush(target, phase, track).await?;
    }
    Ok(points)
}

/// Bytes as MB with one decimal, for messages.
fn mb(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / 1e6)
}

/// The open replay batch of one database and retention policy.
struct Batch {
    db: String,
    rp: String,
    precision: String,
    body: Vec<u8>,
}

impl Batch {
    /// Write what the batch holds (nothing when empty) and empty it.
    async fn flush(
        &mut self,
        target: &Influx,
        phase: Phase,
        track: Option<&Mutex<KeySet>>,
    ) -> Result<u64, MigrateError> {
        if self.body.is_empty() {
            return Ok(0);
        }
        let body = Bytes::from(std::mem::take(&mut self.body));
        let n = write_with_retry(
            target,
            &self.db,
            &self.rp,
            &self.precision,
            body.clone(),
            phase,
        )
        .await?;
        if let Some(t) = track {
            let mut g = t.lock().unwrap_or_else(|e| e.into_inner());
            KeySet::for_each_key(
                std::str::from_utf8(&body).unwrap_or(""),
                &self.precision,
                |k| g.replayed(k),
            );
        }
        Ok(n)
    }
}

pub(super) async fn write_with_retry(
    target: &Influx,
    db: &str,
    rp: &str,
    precision: &str,
    body: Bytes,
    phase: Phase,
) -> Result<u64, MigrateError> {
    let n = lineproto::count_points(std::str::from_utf8(&body).unwrap_or("")) as u64;
    let start = tokio::time::Instant::now();
    let mut retry = crate::util::Retry::new(
        Duration::from_millis(50),
        Duration::from_secs(2),
        Duration::from_secs(60),
    )
    .counting_from(start);
    loop {
        match target.write(db, Some(rp), precision, body.clone()).await {
            Ok(()) => return Ok(n),
            // The source stored the valid points of a partial write and forwarded those;
            // a 400 "partial write" here (e.g. points beyond retention) is what the source
            // itself answered for them.
            Err(InfluxError::Http {
                status: 400,
                ref body,
                ..
            }) if body.starts_with("{\"error\":\"partial write")
                || body.contains("partial write") =>
            {
                tracing::warn!(db, error = %body, "replay: partial write, as on the source");
                return Ok(n);
            }
            // A busy or briefly unreachable target gets a minute. Before cutover (the
            // delta), one that refuses connections is down, and waiting a minute for it
            // only delays the rollback; after the repoint the writers depend on it, so a
            // restarting target (refusing until its shards are open) gets the minute too.
            Err(e)
                if e.is_transient()
                    && !(phase == Phase::Delta
                        && e.is_refused()
                        && start.elapsed() >= Duration::from_secs(10)) =>
            {
                let Some(wait) = retry.next() else {
                    return Err(MigrateError::Influx { phase, source: e });
                };
                tracing::warn!(error = %e, retry_in = ?wait, "replay write failed, retrying");
                tokio::time::sleep(wait).await;
            }
            Err(source) => return Err(MigrateError::Influx { phase, source }),
        }
    }
}

/// Replay what an interrupted run's spool (`<spool_dir>/<id>.spool`) holds beyond its
/// recorded offset, onto `target`. Returns the points replayed (0 without a spool).
pub async fn replay_spool_tail(
    spool_dir: &std::path::Path,
    id: &str,
    target: &Influx,
) -> Result<u64, MigrateError> {
    let p = Phase::Dispose;
    let path = spool_dir.join(format!("{id}.spool"));
    if !path.exists() {
        return Ok(0);
    }
    let mut r = SpoolReader::open_finished(&path)
        .map_err(|source| MigrateError::Spool { phase: p, source })?;
    r.seek(replayed_offset(&path))
        .map_err(|source| MigrateError::Spool { phase: p, source })?;
    let n = replay_ready(&mut r, target, p, None).await?;
    record_offset(spool_dir, id, r.offset()).await;
    Ok(n)
}

/// Remember how far the spool of migration `id` has been replayed (`<id>.spool.offset`).
/// Written after every replay; a crash of this process keeps it (page cache), and a
/// resumed migration starts its replay there.
pub(super) async fn record_offset(spool_dir: &std::path::Path, id: &str, offset: u64) {
    record_offset_of(&spool_dir.join(format!("{id}.spool")), offset).await
}

/// [`record_offset`] for the spool file at `spool` (`<spool>.offset`).
async fn record_offset_of(spool: &std::path::Path, offset: u64) {
    let mut p = spool.as_os_str().to_owned();
    p.push(".offset");
    let p = std::path::PathBuf::from(p);
    // Atomic: a torn offset would read as 0 and replay old records over newer values. Its
    // fsync runs on a blocking thread, never on the workers serving the capture receiver.
    let path = p.clone();
    let done = tokio::task::spawn_blocking(move || {
        crate::util::write_atomic(&path, offset.to_string().as_bytes())
    })
    .await;
    match done {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, path = %p.display(), "cannot record the replay offset")
        }
        Err(e) => {
            tracing::warn!(error = %e, path = %p.display(), "cannot record the replay offset")
        }
    }
}

/// The replayed offset recorded for a spool file (0 when none was recorded).
pub(super) fn replayed_offset(spool: &std::path::Path) -> u64 {
    let mut p = spool.as_os_str().to_owned();
    p.push(".offset");
    std::fs::read_to_string(std::path::PathBuf::from(p))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}
