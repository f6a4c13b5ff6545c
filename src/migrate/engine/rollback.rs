//! Rollback: after a failure, undo what the plan says may be undone. Before any repoint,
//! everything this migration made on the target goes; after it, nothing is deleted.

use std::time::Duration;

use super::capture::drop_until_stopped;
use super::context::{sub_name, Migration};
use super::plan::Undo;
use super::{MigrateError, Phase};
use crate::influx::ident;
use crate::remote::Remote;

/// Receivers whose subscriptions were dropped, to stop once nothing more arrives
/// ([`Migration::drop_subscriptions`]); owns them, so that it can run beside other work.
pub(super) struct StopReceivers {
    receivers: Vec<crate::migrate::capture::Receiver>,
    settle: bool,
}

impl StopReceivers {
    /// InfluxDB 1.x forgets a dropped subscription's counters at once but still
    /// delivers what it had queued for it. Stopped now, a receiver would fail those
    /// deliveries, and the server would count them as forwarding drops that no
    /// subscription shows: the next migration from it (this target once it serves, or
    /// this source on a retry) would stop on them. So the receivers keep answering until
    /// nothing has arrived for 100 ms (at most 10 s).
    pub(super) async fn run(self) {
        if self.settle {
            let stats: Vec<_> = self.receivers.iter().map(|r| r.stats.clone()).collect();
            crate::migrate::capture::arrivals_settle(
                &stats,
                Duration::from_millis(100),
                Duration::from_secs(10),
            )
            .await;
        }
        for r in self.receivers {
            r.stop().await;
        }
    }
}

impl Migration<'_> {
    pub(super) async fn drop_subscriptions(&mut self, phase: Phase) {
        self.drop_subscriptions_only(phase).await.run().await;
    }

    /// Drop our subscriptions on both sides, and wait until the servers run none of
    /// them ([`drop_until_stopped`]); the receivers are handed back, to stop.
    pub(super) async fn drop_subscriptions_only(&mut self, phase: Phase) -> StopReceivers {
        let name = sub_name(&self.id);
        let tname = format!("{name}_t");
        let dropped = !self.created.source_subscriptions.is_empty()
            || !self.created.target_subscriptions.is_empty();
        let source = std::mem::take(&mut self.created.source_subscriptions);
        // The last DROPs of a rollback or a disposal: what is left is said, not kept.
        self.drop_ours(phase, true, &name, &source).await;
        let target = std::mem::take(&mut self.created.target_subscriptions);
        self.drop_ours(phase, false, &tname, &target).await;
        StopReceivers {
            receivers: [self.receiver.take(), self.touched_receiver.take()]
                .into_iter()
                .flatten()
                .collect(),
            settle: dropped,
        }
    }

    /// Drop our subscriptions `name` on `subs` of one side and wait until its server
    /// runs none of them ([`drop_until_stopped`]). Never fails: the rollback or the
    /// disposal goes on; what could not be done is said, and returned.
    pub(super) async fn drop_ours(
        &self,
        phase: Phase,
        on_source: bool,
        name: &str,
        subs: &[(String, String)],
    ) -> Vec<(String, String)> {
        let (side, what) = if on_source {
            (&self.source, "capture subscription on the source")
        } else {
            (&self.target, "watch subscription on the target")
        };
        let Some(side) = side else {
            return Vec::new();
        };
        let within = self.cfg.capture.live_timeout;
        let left = drop_until_stopped(&side.influx, phase, on_source, name, subs, within).await;
        if !left.is_empty() {
            tracing::warn!(
                server = %side.influx.url(),
                "the {what}: {}; one still there or still running forwards every write the server takes to a receiver that is gone, each a failed forward (InfluxDB stops a dropped one at its next change of metadata or restart)",
                left.describe()
            );
        }
        left.subscriptions()
    }

    /// Stop what a step cut short by an abort left running on a host: a dump, a transfer
    /// or a restore (an SSH channel going away does not stop its command), found by the
    /// scratch directory it names, which only this migration uses. A restore left running
    /// could otherwise recreate a database the rollback is about to drop.
    async fn stop_scratch_users(&self) {
        for (side, dirs) in [
            (&self.source, &self.created.source_dirs),
            (&self.target, &self.created.target_dirs),
        ] {
            let Some(side) = side else { continue };
            for d in dirs {
                if let Err(e) = side.host.run(&crate::util::stop_processes_naming(d)).await {
                    tracing::warn!(error = %e, dir = %d, "could not stop the commands using a scratch directory");
                }
            }
        }
    }

    /// A step cut short while InfluxDB was creating one of our subscriptions never
    /// recorded it (it is recorded once the server answered): found by name on both
    /// sides and dropped, as the crash recovery does.
    async fn drop_unrecorded_subscriptions(&self) {
        let ours = [sub_name(&self.id), format!("{}_t", sub_name(&self.id))];
        // The recorded ones are dropped next, one side at a time, each DROP watched until
        // its subscription stops (`drop_ours`): dropped here, back to back, a DROP the
        // server missed could not be made again there (found by review).
        let recorded = |on_source: bool, s: &crate::influx::Subscription| {
            let on = (s.database.clone(), s.retention_policy.clone());
            if on_source {
                s.name == ours[0] && self.created.source_subscriptions.contains(&on)
            } else {
                s.name == ours[1] && self.created.target_subscriptions.contains(&on)
            }
        };
        for (side, on_source) in [(&self.source, true), (&self.target, false)] {
            let Some(side) = side else { continue };
            let Ok(subs) = side.influx.subscriptions().await else {
                continue;
            };
            for s in subs
                .into_iter()
                .filter(|s| ours.contains(&s.name) && !recorded(on_source, s))
            {
                if let Err(e) = side
                    .influx
                    .drop_subscription(&s.name, &s.database, &s.retention_policy)
                    .await
                {
                    tracing::warn!(error = %e, sub = %s.name, "could not drop a subscription of the aborted migration");
                }
            }
        }
    }

    /// Undo what can be undone. Before cutover: everything this migration created on the
    /// target goes, the source is as before. After cutover: nothing is deleted anywhere.
    pub(super) async fn on_failure(&mut self, e: &MigrateError) {
        tracing::error!(phase = %e.phase(), error = %e, "migration failed");
        // Its findings are moot; its queries would only load both servers.
        self.early_verify = None;
        // Whatever happens next, neither server stays lowered: after the repoint an
        // operator may send the writers back to the source.
        self.restore_priorities().await;
        if matches!(e, MigrateError::Aborted { .. }) {
            self.stop_scratch_users().await;
            self.drop_unrecorded_subscriptions().await;
        }
        let undo = self.plan.undo(self.report.cutover_done);
        if undo == Undo::KeepBoth {
            // Writers may still reach the source: replay what it forwarded before stopping.
            if let Err(e) = self.stop_capture(e.phase()).await {
                tracing::error!(error = %e, "could not replay the last captured writes; the capture spool is kept");
            }
        }
        self.drop_subscriptions(e.phase()).await;
        self.remove_scratch().await;
        if undo == Undo::KeepBoth {
            self.progress.note(&format!(
                "writers may already use the target {} (the repoint had begun); the source {} is untouched and keeps all its data; the capture spool is kept",
                self.target_cfg.influx_url, self.cfg.source.influx_url
            ));
            return;
        }
        if let Some(dst) = &self.target {
            for db in std::mem::take(&mut self.created.target_databases) {
                if let Err(e) = dst
                    .influx
                    .query(None, &format!("DROP DATABASE {}", ident(&db)))
                    .await
                {
                    tracing::warn!(error = %e, db, "rollback: could not drop the half-made database on the target");
                }
            }
            for u in std::mem::take(&mut self.created.target_users) {
                let _ = dst
                    .influx
                    .query(None, &format!("DROP USER {}", ident(&u)))
                    .await;
            }
        }
        if let Some(s) = self.spool.take() {
            let _ = std::fs::remove_file(s.path());
            let _ = std::fs::remove_file(format!("{}.offset", s.path().display()));
        }
        self.progress.note("rolled back: the source is untouched and still serves the writers; what this migration made on the target is removed");
    }
}
