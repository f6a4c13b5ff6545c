//! Dispose: prove the capture complete once more, stop it, replay its tail, and remove
//! what the migration made that is not data (scratch directories, the spool).

use std::time::{Duration, Instant};

use super::capture::Drain;
use super::context::{sub_name, Migration};
use super::priority::End;
use super::{MigrateError, Phase};
use crate::remote::Remote;
use crate::util::shell_quote;

impl Migration<'_> {
    pub(super) async fn dispose(&mut self) -> Result<(), MigrateError> {
        // Given back while the capture stops (awaited at the end).
        self.raise_priority(End::Source);
        // Writes that reached the source after verification are forwarded too; a failed
        // forward (or a source restart) now would leave a point only on the old stack,
        // which is about to be deleted. Best: the counters prove that everything the
        // source took has arrived, and the proof's first read gives the write count a
        // later write is measured against (it only holds points that arrived).
        let proven = self.prove_drained(Phase::Dispose).await?;
        if let Some(n) = proven {
            self.report.source_writes_at_capture_stop = Some(n);
            self.report.capture_stop_proven = true;
        } else {
            self.check_capture_complete(Phase::Dispose).await?;
            // Read before the subscriptions go: a write between this read and the drop is
            // forwarded and still counted, so the later comparison errs on the safe side.
            if let Some(src) = &self.source {
                match src.influx.http_points_written().await {
                    Ok(n) => self.report.source_writes_at_capture_stop = Some(n),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot read the source's write counters before stopping the capture; the old stack will be kept unless they can be read")
                    }
                }
            }
        }
        let tail = self.stop_capture(Phase::Dispose).await?;
        if tail > 0 {
            self.progress.note(&format!(
                "replayed {tail} points that reached the source after verification"
            ));
        }
        // The receivers answer the dropped subscriptions' last deliveries while the
        // rest is cleaned up.
        let stop = self.drop_subscriptions_only(Phase::Dispose).await;
        let clean_up = async {
            self.remove_scratch().await;
            if let Some(s) = self.spool.take() {
                let _ = std::fs::remove_file(s.path());
                let _ = std::fs::remove_file(format!("{}.offset", s.path().display()));
            }
            self.restore_priorities().await;
        };
        tokio::join!(stop.run(), clean_up);
        Ok(())
    }

    /// Remove the dump and restore directories on both hosts (copies of data, not data).
    pub(super) async fn remove_scratch(&mut self) {
        for (side, dirs) in [
            (&self.source, std::mem::take(&mut self.created.source_dirs)),
            (&self.target, std::mem::take(&mut self.created.target_dirs)),
        ] {
            if let (Some(side), false) = (side, dirs.is_empty()) {
                let cmd = dirs
                    .iter()
                    .map(|d| format!("rm -rf {}", shell_quote(d)))
                    .collect::<Vec<_>>()
                    .join(" && ");
                if let Err(e) = side.host.run(&cmd).await {
                    tracing::warn!(error = %e, "could not remove scratch directories");
                }
            }
        }
    }

    /// Try for a moment to prove the capture drained ([`Self::drain_proven`]); the
    /// source's HTTP write count of the proof when it holds: every write it counts has
    /// reached the receiver, where before a forward still in flight after the settle wait
    /// was lost unnoticed. A source that takes points the capture does not cover never
    /// proves it: half a second, then the count is read as before.
    async fn prove_drained(&self, phase: Phase) -> Result<Option<u64>, MigrateError> {
        let deadline = Instant::now() + Duration::from_millis(500);
        loop {
            let (entered, delivered) = match self.drain_proven(phase).await? {
                Drain::Proven(first) => return Ok(Some(first.http_written)),
                Drain::Unproven { entered, delivered } => (entered, delivered),
                Drain::NoBase => return Ok(None),
            };
            if Instant::now() >= deadline {
                tracing::info!(
                    entered,
                    delivered,
                    "the source's counters do not prove the capture complete (points entered it outside the capture); stopping it on the settle wait alone"
                );
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Stop capturing on the source, let in-flight forwards land, and replay the tail of
    /// the spool (writes that still reached the source, e.g. from a straggling writer).
    /// The settle wait stays after a proof: points that enter after the proof's reads (a
    /// straggler, a continuous query's output) are still forwarded until the drop.
    pub(super) async fn stop_capture(&mut self, phase: Phase) -> Result<u64, MigrateError> {
        let name = sub_name(&self.id);
        let subs = std::mem::take(&mut self.created.source_subscriptions);
        // What is left is dropped again with the rest (`drop_subscriptions_only`): one
        // made again by a nudge whose DROP failed is back in the metadata (found by
        // review).
        self.created.source_subscriptions = self.drop_ours(phase, true, &name, &subs).await;
        // Forwards already in flight still land: wait until arrivals settle (bounded),
        // stop the receiver, and only then replay the last of the spool.
        if let Some(r) = &self.receiver {
            crate::migrate::capture::arrivals_settle(
                std::slice::from_ref(&r.stats),
                Duration::from_millis(300),
                Duration::from_secs(10),
            )
            .await;
        }
        if let Some(r) = self.receiver.take() {
            r.stop().await;
        }
        self.replay_now(phase).await
    }
}
