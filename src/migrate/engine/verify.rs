//! Verify: the target holds everything the source holds (see
//! [`crate::migrate::verify`] for the comparison), before anything is deleted.

use std::collections::HashSet;

use super::context::{sub_name, Migration};
use super::transfer::{split_rpc_address, CancelOnDrop, PrivateDir, RpcReach};
use super::{MigrateError, Phase};
use crate::influx::snapshotter;
use crate::influx::InfluxError;
use crate::migrate::verify::{self, Early, TargetFirst};
use crate::remote::{Host, Remote, RemoteError};

/// Each shard sent (its index in `sent_shards`) with its files as read back from the
/// target, or why they could not be; `Err`: the reading stopped as a whole.
type ShardReads = Result<Vec<(usize, Result<Vec<snapshotter::ShardFile>, String>)>, String>;

/// Whether `(database, retention policy, measurement)` is cold: see [`verify::Cold`].
type ColdFn = Box<dyn Fn(&str, &str, &str) -> bool + Send + Sync>;

impl Migration<'_> {
    /// Nothing can write to a measurement on the source any more when its retention
    /// policy is captured (our subscription on it was made and is still there: dropping a
    /// database or retention policy drops its subscriptions, and later writes to one made
    /// again would reach nothing) and the capture has received no write to it. `None` when
    /// that cannot be known: a resumed run's capture did not see the writes before the
    /// interruption, or the source's subscriptions cannot be listed.
    async fn cold(&self) -> Option<ColdFn> {
        if self.plan.resume {
            return None;
        }
        let stats = self.receiver.as_ref()?.stats.clone();
        let name = sub_name(&self.id);
        let present: HashSet<(String, String)> = match self.src().influx.subscriptions().await {
            Ok(subs) => subs
                .into_iter()
                .filter(|s| s.name == name)
                .map(|s| (s.database, s.retention_policy))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the source's subscriptions: every measurement is compared after the cutover");
                return None;
            }
        };
        let captured: HashSet<(String, String)> = self
            .created
            .source_subscriptions
            .iter()
            .filter(|k| present.contains(*k))
            .cloned()
            .collect();
        Some(Box::new(move |db: &str, rp: &str, m: &str| {
            captured.contains(&(db.to_string(), rp.to_string())) && !stats.written_to(db, m)
        }))
    }

    /// Read the target's aggregates of the cold measurements now, before the repoint
    /// (`verify.target_first`): nothing when they cannot be known cold, or the reads
    /// fail (the early pass then reads both sides).
    pub(super) async fn read_target_first(&mut self) -> TargetFirst {
        let Some(cold) = self.cold().await else {
            return TargetFirst::default();
        };
        self.verify_started
            .get_or_insert_with(std::time::Instant::now);
        let read_back = self.read_back().await;
        let dst = self.dst();
        let at_once = dst.cpus.max(self.cfg.verify.parallel_queries);
        match verify::target_first(
            &self.src().influx,
            &dst.influx,
            &self.cfg.verify,
            &*cold,
            at_once,
            read_back,
        )
        .await
        {
            Ok(first) => first,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the target's aggregates before the repoint; both sides are read after it");
                TargetFirst::default()
            }
        }
    }

    /// Read back from the target every shard the dump streamed into it, while no writer
    /// uses it, and say what the files prove: per database, the shards that still hold
    /// each file sent, with the same bytes, and the spans of time of the others, which
    /// the aggregates compare ([`verify::ReadBack`], [`verify::files_prove`]). Nothing
    /// proven when `verify.read_back` is off, the dump took another way, or the target
    /// cannot be reached: the measurements are then compared by their aggregates.
    async fn read_back(&self) -> verify::ReadBack {
        let mut out = verify::ReadBack::default();
        if !self.cfg.verify.read_back || self.sent_shards.is_empty() {
            return out;
        }
        if let Err(why) = &self.files_may_prove {
            self.progress.note(&format!(
                "{why}: a write may have reached a shard after the dump read it, unforwarded, so every measurement is compared by its aggregates, not by its files"
            ));
            return out;
        }
        // A continuous query restored on the target runs there at once, from the
        // target's data, and may rewrite points of a measurement the source's capture
        // calls cold; only the point-by-point comparison would see a value it changed.
        match self.src().influx.continuous_queries().await {
            Ok(cqs) if cqs.is_empty() => {}
            Ok(cqs) => {
                self.progress.note(&format!(
                    "the source has {} continuous queries, which the target runs from the restore on: every measurement is compared by its aggregates, not by its files",
                    cqs.len()
                ));
                return out;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the source's continuous queries; every measurement is compared by its aggregates");
                return out;
            }
        }
        let started = std::time::Instant::now();
        // Every shard the source listed before the dump, judged: proven by its files on
        // the target, or why not.
        let mut judged: Vec<verify::Judged> = self
            .shards_not_sent
            .iter()
            .flat_map(|(db, ids)| {
                ids.iter().map(|id| verify::Judged {
                    database: db.clone(),
                    source: *id,
                    proven: Err(format!(
                        "source shard {id} was listed before the dump but not copied"
                    )),
                })
            })
            .collect();
        let reads = match self.read_shards_on_host().await {
            Some(reads) => {
                out.on_host = true;
                reads
            }
            None => self.read_shards_through_rpc().await,
        };
        let reads = match reads {
            Ok(reads) => reads,
            Err(e) => {
                tracing::warn!(error = %e, "reading the target's shards back stopped; every measurement is compared by its aggregates");
                return out;
            }
        };
        for (i, got) in reads {
            let shard = &self.sent_shards[i];
            let why = match got {
                Ok(now) => {
                    out.shards += 1;
                    out.bytes += now.iter().map(|f| f.size).sum::<u64>();
                    snapshotter::files_differ(&shard.files, &now)
                }
                Err(e) => Some(e),
            };
            judged.push(verify::Judged {
                database: shard.database.clone(),
                source: shard.source,
                proven: match why {
                    None => Ok(()),
                    Some(why) => Err(format!(
                        "target shard {} (source shard {}): {why}",
                        shard.target, shard.source
                    )),
                },
            });
        }
        // The spans of the shards that are not proven: asked only when there is one.
        let listing = if judged.iter().all(|j| j.proven.is_ok()) {
            Ok(Vec::new())
        } else {
            self.src().influx.shards().await.map_err(|e| e.to_string())
        };
        let proof = verify::files_prove(&judged, listing.as_deref().map_err(String::as_str));
        out.databases = proof.databases;
        out.seconds = started.elapsed().as_secs_f64();
        for (db, why) in &proof.whole {
            tracing::warn!(database = %db, reason = %why, "the files read back from the target prove nothing of this database: its measurements are compared by their aggregates");
            self.progress.note(&format!(
                "database {db:?}: {why}; its measurements are compared by their aggregates instead of their files"
            ));
        }
        // One note per shard, a few at most: a target that compacted many says so once.
        const SAID: usize = 5;
        for (db, said) in &proof.spans {
            for why in said.iter().take(SAID) {
                tracing::warn!(database = %db, reason = %why, "a shard is not proven by its files: its span of time is compared by its aggregates");
                self.progress.note(&format!("database {db:?}: {why}"));
            }
            if said.len() > SAID {
                self.progress.note(&format!(
                    "database {db:?}: and {} more shards not proven by their files, their spans compared by their aggregates",
                    said.len() - SAID
                ));
            }
        }
        if !out.databases.is_empty() {
            let proven = judged.iter().filter(|j| j.proven.is_ok()).count();
            self.progress.note(&format!(
                "read {} shards back from the target ({:.1} MB in {:.3} s, {}): {proven} of the {} sent hold every file sent, unchanged",
                out.shards,
                out.bytes as f64 / 1e6,
                out.seconds,
                if out.on_host {
                    "digested on its host"
                } else {
                    "through its RPC port"
                },
                self.sent_shards.len(),
            ));
        }
        out
    }

    /// Read every shard sent back on the target's own host, in one command
    /// ([`snapshotter::shard_files_on_host_cmd`]), as many at once as it has CPUs: the
    /// shards' bytes stay there, only their digests cross SSH. `None` when the target is
    /// not reached over SSH (its RPC port then is as near as its host),
    /// `verify.read_back_on_host` is off, or the command fails as a whole (no `python3`
    /// there, among others): the caller reads through the RPC port instead.
    async fn read_shards_on_host(&self) -> Option<ShardReads> {
        let dst = self.dst();
        if !self.cfg.verify.read_back_on_host || !matches!(dst.host, Host::Ssh(_)) {
            return None;
        }
        let (rpc_host, rpc_port) = split_rpc_address(&dst.cfg.rpc_address)?;
        let ids: Vec<u64> = self.sent_shards.iter().map(|s| s.target).collect();
        let cmd = snapshotter::shard_files_on_host_cmd(
            self.cfg.migration.idle_nice,
            &rpc_host,
            rpc_port,
            dst.cpus,
        );
        let ids_in = snapshotter::shard_files_on_host_input(&ids);
        let out = match dst.host.run_with_input(&cmd, Some(&ids_in)).await {
            Ok(out) => out,
            Err(e) => {
                // Without `python3` (127), with one too old for `-I`: the forward reads the
                // same shards. The command, the whole script, is left out of what is said.
                let why = match &e {
                    RemoteError::Failed {
                        code: Some(snapshotter::NO_INTERPRETER),
                        ..
                    } => "it has no python3".to_string(),
                    e => e.to_string().replace(&cmd, "<the read-back script>"),
                };
                self.progress.note(&format!(
                    "the target's shards cannot be read back on its host ({why}): they are read through an SSH forward to its RPC port, bytes and all"
                ));
                return None;
            }
        };
        let at = format!(
            "{} of the target (read on {})",
            dst.cfg.rpc_address,
            dst.host.describe()
        );
        let mut got = match snapshotter::shard_files_on_host(&at, &out) {
            Ok(got) => got,
            Err(e) => return Some(Err(e.to_string())),
        };
        let mut reads = Vec::with_capacity(ids.len());
        for (i, id) in ids.iter().enumerate() {
            let Some(k) = got.iter().position(|(shard, _)| shard == id) else {
                return Some(Err(format!(
                    "{at}: shard {id} was not read back (the answer stopped short)"
                )));
            };
            let (_, files) = got.swap_remove(k);
            reads.push((i, files.map_err(|e| e.to_string())));
        }
        Some(Ok(reads))
    }

    /// Read every shard sent back through the target's RPC port (an SSH forward to it,
    /// when the target is reached over SSH), digesting here, as many at once as it has
    /// CPUs, on threads at the idle nice value.
    async fn read_shards_through_rpc(&self) -> ShardReads {
        let dst = self.dst();
        let dir = PrivateDir::create(&self.id)?;
        let reach =
            RpcReach::open(&dst.host, &dst.cfg.rpc_address, "target", Some(&dir.path)).await?;
        let cancel = snapshotter::Cancel::default();
        let _stop = CancelOnDrop(cancel.clone());
        let mut running = tokio::task::JoinSet::new();
        let mut queue = self.sent_shards.iter().enumerate();
        let mut reads = Vec::with_capacity(self.sent_shards.len());
        let mut stopped = None;
        loop {
            while stopped.is_none() && running.len() < dst.cpus.max(1) {
                let Some((i, shard)) = queue.next() else {
                    break;
                };
                let (c, at, id) = (cancel.clone(), reach.at.clone(), shard.target);
                // At the idle nice value: where the orchestrator shares the CPUs with the
                // writers' server, digesting the whole database must not slow them.
                let nice = self.cfg.migration.idle_nice;
                let read =
                    crate::util::spawn_niced(nice, move || snapshotter::shard_files(&at, id, &c));
                running.spawn(async move {
                    match read {
                        Ok(rx) => (i, rx.await.map_err(|e| e.to_string())),
                        Err(e) => (i, Err(e.to_string())),
                    }
                });
            }
            let Some(done) = running.join_next().await else {
                break;
            };
            match done {
                Ok((i, Ok(got))) => reads.push((i, got.map_err(|e| e.to_string()))),
                Ok((_, Err(e))) => {
                    stopped = Some(e);
                    cancel.cancel();
                }
                Err(e) => {
                    stopped = Some(e.to_string());
                    cancel.cancel();
                }
            }
        }
        if let Some(f) = reach.forward {
            f.close(&dst.host).await;
        }
        match stopped {
            Some(e) => Err(e),
            None => Ok(reads),
        }
    }

    /// Start comparing the cold measurements (the target is watched; the writers may still be
    /// moving to it), with the target's aggregates read `first` if any. After
    /// [`Self::read_target_first`] the writers have left the source: its statements run
    /// as many at once as it has CPUs.
    pub(super) async fn start_early_verify(&mut self, first: TargetFirst) {
        let Some(cold) = self.cold().await else {
            return;
        };
        let (source, target) = (self.src().influx.clone(), self.dst().influx.clone());
        let cfg = self.cfg.verify.clone();
        let touched = self.touched.clone();
        let at_once = if self.cfg.verify.target_first {
            [
                self.src().cpus.max(cfg.parallel_queries),
                cfg.parallel_queries,
            ]
        } else {
            [cfg.parallel_queries; 2]
        };
        self.verify_started
            .get_or_insert_with(std::time::Instant::now);
        self.early_verify = Some(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
            async move {
                verify::verify_cold(
                    &source,
                    &target,
                    &cfg,
                    touched.as_deref(),
                    &*cold,
                    first,
                    at_once,
                )
                .await
            },
        )));
    }

    /// What the early pass found; nothing when it did not run or failed (the final pass
    /// then compares everything).
    async fn early_findings(&mut self) -> Early {
        let Some(task) = self.early_verify.take() else {
            return Early::default();
        };
        match task.await {
            Ok(Ok(early)) => early,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "verification during the cutover failed; comparing everything now");
                Early::default()
            }
            Err(e) => {
                tracing::warn!(error = %e, "verification during the cutover stopped; comparing everything now");
                Early::default()
            }
        }
    }

    pub(super) async fn verify(&mut self) -> Result<(), MigrateError> {
        let p = Phase::Verify;
        if crate::util::fault_injected("capture_receiver_killed_after_cutover") {
            if let Some(r) = self.receiver.as_mut() {
                tracing::warn!(addr = %r.addr, "STATESHIFT_FAULT=capture_receiver_killed_after_cutover: killing the capture receiver");
                r.kill();
            }
        }
        if let (Some(t), Some(r)) = (&self.touched, &self.touched_receiver) {
            let g = t.lock().unwrap_or_else(|e| e.into_inner());
            tracing::info!(
                keys = g.arrivals.len(),
                overflowed = g.overflowed,
                points = r.stats.points(),
                "points written to the target since cutover"
            );
        }
        let started = *self
            .verify_started
            .get_or_insert_with(std::time::Instant::now);
        let early = self.early_findings().await;
        let cold = self.cold().await;
        let rep = verify::verify_after(
            &self.src().influx,
            &self.dst().influx,
            &self.cfg.verify,
            self.touched.as_deref(),
            self.plan.resume,
            early,
            cold.as_deref().unwrap_or(&|_, _, _| false),
        )
        .await
        .map_err(|e| match e {
            InfluxError::TimedOut { .. } => MigrateError::Failed {
                phase: p,
                msg: format!(
                    "{e}: one verification query may take up to verify.query_timeout ({}); raise it for a database this large",
                    humantime::format_duration(self.cfg.verify.query_timeout)
                ),
            },
            e => Self::influx_err(p)(e),
        })?;
        let mut rep = rep;
        rep.span_seconds = started.elapsed().as_secs_f64();
        self.report.verify = Some(rep.clone());
        if !rep.ok() {
            let mut summary = rep
                .problems
                .iter()
                .take(10)
                .cloned()
                .collect::<Vec<_>>()
                .join("; ");
            if rep.problems.len() > 10 || rep.problems_truncated {
                summary.push_str(&format!(
                    "; and more ({} shown of at least {})",
                    10,
                    rep.problems.len()
                ));
            }
            return Err(MigrateError::VerifyFailed {
                summary,
                report: Box::new(rep),
            });
        }
        let by_files = rep.measurements_proven_by_files + rep.measurements_proven_partly_by_files;
        self.progress.note(&format!(
            "verified: {} databases, {} series, {} values on the source, {} on the target{}, {} series compared point by point, {} points overwritten after cutover",
            rep.databases,
            rep.series,
            rep.source_values,
            rep.target_values,
            if by_files > 0 {
                " (counted where aggregates were read: not what the files proved)"
            } else {
                ""
            },
            rep.series_compared_point_by_point,
            rep.overwritten_after_cutover
        ));
        if rep.measurements_proven_by_files > 0 {
            self.progress.note(&format!(
                "of them, {} measurements proven by their files: every shard of their retention policy read back from the target as sent ({} shards, {:.1} MB in {:.3} s), their series listed on both sides",
                rep.measurements_proven_by_files,
                rep.read_back_shards,
                rep.read_back_bytes as f64 / 1e6,
                rep.read_back_seconds
            ));
        }
        if rep.measurements_proven_partly_by_files > 0 {
            self.progress.note(&format!(
                "of them, {} measurements proven by their files in part: the spans of time of the shards that did not read back from the target as sent compared by their aggregates, their series listed on both sides",
                rep.measurements_proven_partly_by_files
            ));
        }
        if rep.measurements_verified_early > 0 {
            self.progress.note(&format!(
                "of them, {} measurements compared during the cutover ({:.3} s), nothing having written to them since the capture started",
                rep.measurements_verified_early, rep.early_seconds
            ));
        }
        if rep.values_unverifiable > 0 {
            self.progress.note(&format!(
                "{} point values differ and cannot be judged: they changed on the target while stateshift was down after the repoint",
                rep.values_unverifiable
            ));
        }
        Ok(())
    }
}
