//! Dump, transfer, restore: a portable backup of the source (pulled by the target through
//! SSH forwards, or made on the source and streamed as tar), restored on the target with
//! the users, grants, retention policies and continuous queries it does not carry.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use super::capture::{by_name, drop_until_stopped};
use super::context::{Migration, SentShard};
use super::guard::{self, Guard};
use super::priority::End;
use super::{MigrateError, Phase, ShardStreamed, TargetObject};
use crate::config::{InstanceConfig, TransferMode};
use crate::influx::{ident, literal, snapshotter, InfluxError};
use crate::remote::{Host, Listen, Pipes, Remote, RemoteError};
use crate::util::shell_quote;

impl Migration<'_> {
    pub(super) fn scratch(cfg: &InstanceConfig, id: &str, what: &str) -> String {
        format!("{}/{}-{}", cfg.work_dir.trim_end_matches('/'), what, id)
    }

    pub(super) async fn dump(&mut self) -> Result<(), MigrateError> {
        if crate::util::fault_injected("capture_receiver_killed") {
            if let Some(r) = self.receiver.as_mut() {
                tracing::warn!(addr = %r.addr, "STATESHIFT_FAULT=capture_receiver_killed: killing the capture receiver");
                r.kill();
            }
        }
        // No writer uses the target before the repoint: its imports yield to the source.
        self.lower_priority(End::Target);
        let mode = self.cfg.migration.transfer;
        if matches!(mode, TransferMode::Auto | TransferMode::Shards) {
            match self.stream_shards().await {
                Ok(r) => {
                    r?;
                    self.pulled = true;
                    self.restored = true;
                    return Ok(());
                }
                Err(why) if mode == TransferMode::Auto => {
                    self.no_fallback_without_ssh(&why).await?;
                    tracing::warn!(reason = %why, "cannot stream the shards between the InfluxDB RPC ports; falling back to influxd backup and restore");
                    let unbounded = if self.cfg.migration.transfer_rate_limit > 0 {
                        " (migration.transfer_rate_limit bounds shard streams only: this dump runs at full speed)"
                    } else if !self.cfg.migration.write_time_guard.is_zero() {
                        " (migration.write_time_guard paces shard streams only: this dump runs at full speed)"
                    } else {
                        ""
                    };
                    self.progress.note(&format!(
                        "shard streaming unavailable ({why}); falling back to influxd backup and restore{unbounded}"
                    ));
                }
                Err(why) => {
                    return Err(MigrateError::Failed {
                        phase: Phase::Dump,
                        msg: format!("migration.transfer is shards, but {why}"),
                    })
                }
            }
        }
        if matches!(mode, TransferMode::Auto | TransferMode::Forward) {
            match self.pull_dump().await {
                Ok(r) => {
                    r?;
                    self.pulled = true;
                    self.progress.note("the target pulled the dump from the source's RPC port through SSH forwards (dump and transfer in one pass)");
                    return Ok(());
                }
                Err(why) if mode == TransferMode::Auto => {
                    self.no_fallback_without_ssh(&why).await?;
                    tracing::warn!(reason = %why, "SSH forwarding unavailable; dumping on the source and streaming the archive instead");
                    self.progress.note(&format!(
                        "SSH forwarding unavailable ({why}); falling back to dump + tar stream"
                    ));
                }
                Err(why) => {
                    return Err(MigrateError::Failed {
                        phase: Phase::Dump,
                        msg: format!("migration.transfer is forward, but {why}"),
                    })
                }
            }
        }
        let p = Phase::Dump;
        let dir = Self::scratch(&self.src().cfg, &self.id, "dump");
        self.created.source_dirs.push(dir.clone());
        let src = self.src();
        let cmd = backup_cmd(&src.cfg.rpc_address, &dir);
        let out = tokio::select! {
            r = src.host.run(&cmd) => match r {
                Ok(out) => out,
                Err(e) => {
                    let e = Self::remote_err(p)(e);
                    return Err(full_or(&src.host, &dir, p, "source", &src.cfg.name, e).await);
                }
            },
            // The source's disk is the live service's: stop long before InfluxDB runs out.
            free = disk_fills(&src.host, &dir) => {
                stop_backup(&src.host, &dir).await;
                return Err(disk_full(p, "source", &src.cfg.name, &dir, free));
            }
        };
        self.report.dump_bytes = du_bytes(&out);
        Ok(())
    }

    /// A way of dumping failed with `why`: when the SSH connection to either side is gone,
    /// the next way would fail on it too, and say less. Fail naming the lost connection.
    async fn no_fallback_without_ssh(&self, why: &str) -> Result<(), MigrateError> {
        for (side, host) in [("source", &self.src().host), ("target", &self.dst().host)] {
            if !host.alive().await {
                return Err(MigrateError::Failed {
                    phase: Phase::Dump,
                    msg: format!(
                        "the SSH connection to the {side} {} was lost during the dump ({why})",
                        host.describe()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Stream every shard of the source's databases from its InfluxDB RPC port into the
    /// target's (both reached through local SSH forwards, so no VM needs the other's
    /// key): the target's metadata first (databases, retention policies, empty shards),
    /// then the shards' files, [`SHARD_COPIES`] at a time. Dump, transfer and restore of
    /// the data in one pass; the restore phase then adds what metadata lacks (users,
    /// grants, continuous queries). `Err` means nothing was made yet (the caller may fall
    /// back); `Ok(Err)` is a failure after the target was touched.
    pub(super) async fn stream_shards(&mut self) -> Result<Result<(), MigrateError>, String> {
        let dir = PrivateDir::create(&self.id)?;
        let src = RpcReach::open(
            &self.src().host,
            &self.src().cfg.rpc_address,
            "source",
            Some(&dir.path),
        )
        .await?;
        let dst = match RpcReach::open(
            &self.dst().host,
            &self.dst().cfg.rpc_address,
            "target",
            Some(&dir.path),
        )
        .await
        {
            Ok(d) => d,
            Err(e) => {
                if let Some(f) = src.forward {
                    f.close(&self.src().host).await;
                }
                return Err(e);
            }
        };
        let r = self.stream_shards_through(&src.at, &dst.at).await;
        if let Some(f) = src.forward {
            f.close(&self.src().host).await;
        }
        if let Some(f) = dst.forward {
            f.close(&self.dst().host).await;
        }
        r
    }

    async fn stream_shards_through(
        &mut self,
        from: &snapshotter::Endpoint,
        to: &snapshotter::Endpoint,
    ) -> Result<Result<(), MigrateError>, String> {
        let p = Phase::Dump;
        let fail = |msg: String| MigrateError::Failed { phase: p, msg };
        let cancel = snapshotter::Cancel::default();
        let _stop = CancelOnDrop(cancel.clone());
        // The shards each database has now, listed before the metadata is read: every one
        // of them is in it, unless retention deleted it in between (its points are gone
        // from the source too).
        let all = match self.src().influx.shards().await {
            Ok(s) => s,
            Err(e) => return Ok(Err(Self::influx_err(p)(e))),
        };
        let listed: Vec<Vec<u64>> = self
            .report
            .databases
            .iter()
            .map(|db| {
                let mut ids: Vec<u64> = all
                    .iter()
                    .filter(|s| &s.database == db)
                    .map(|s| s.id)
                    .collect();
                ids.sort_unstable();
                ids
            })
            .collect();
        let ends: HashMap<u64, i64> = all.iter().filter_map(|s| Some((s.id, s.span?.1))).collect();
        // The metadata, with every shard it names; a shard made later holds only points
        // written since the capture started, which the delta replays.
        let c = cancel.clone();
        let f = from.clone();
        let meta = tokio::task::spawn_blocking(move || snapshotter::metastore(&f, &c))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        // InfluxDB reads an uploaded blob with one read after its JSON decoder's buffer:
        // through an SSH channel (32 KB packets) a larger one may arrive in pieces and be
        // refused. `auto` leaves such a source to `influxd restore`, which runs on the
        // target's own host; `shards` tries, and says so when refused.
        if meta.len() > META_IN_ONE_PIECE && self.cfg.migration.transfer == TransferMode::Auto {
            return Err(format!(
                "the source's metadata is {} bytes, more than the {META_IN_ONE_PIECE} sure to reach the target's RPC port in one piece",
                meta.len()
            ));
        }
        let mut copies = Vec::new();
        for (db, shards) in self.report.databases.clone().into_iter().zip(listed) {
            if let Err(e) = self.claim_target_database(p, &db).await {
                return Ok(Err(e));
            }
            let (c, m, name, t) = (cancel.clone(), meta.clone(), db.clone(), to.clone());
            let map = match tokio::task::spawn_blocking(move || {
                snapshotter::import_database(&t, &name, &m, &c)
            })
            .await
            {
                Ok(Ok(map)) => map,
                Ok(Err(e)) => {
                    return Ok(Err(fail(format!(
                        "importing the metadata of database {db:?}: {e}"
                    ))))
                }
                Err(e) => return Ok(Err(fail(e.to_string()))),
            };
            let there = match self.dst().influx.databases().await {
                Ok(d) => d.contains(&db),
                Err(e) => return Ok(Err(Self::influx_err(p)(e))),
            };
            // InfluxDB imports a database's metadata whole or not at all, and answers a
            // failure with an empty map.
            if !there || (map.is_empty() && !shards.is_empty()) {
                return Ok(Err(fail(format!(
                    "the target {} did not import the metadata of database {db:?} (database there: {there}; {} shards on the source, none mapped; its InfluxDB log says why: a metadata blob of {} bytes may have reached it in pieces)",
                    self.dst().cfg.name,
                    shards.len(),
                    meta.len()
                ))));
            }
            // A shard listed but not mapped (retention removed it in between, or the
            // target left it out): its database cannot be proven by the files sent.
            let unmapped: Vec<u64> = shards
                .iter()
                .filter(|s| !map.contains_key(s))
                .copied()
                .collect();
            if !unmapped.is_empty() {
                self.shards_not_sent.insert(db.clone(), unmapped);
            }
            copies.extend(map.into_iter().map(|(old, new)| (db.clone(), old, new)));
        }
        // The shards whose groups end last first: the writers write to the current time,
        // and the source's answer to a shard backup first writes that shard's in-memory
        // cache out as a TSM file. For the shard the writers use, that is every write
        // since its last snapshot, and it stalls them while it is written and synced
        // (stop 41: 127-134 ms at 40 MB/s when that shard came last, 84 % into the dump;
        // 91.8 ms when it came first). First, its cache holds none of the dump's own
        // time, and the target has nothing imported yet to write back beside it.
        copies.sort_by_key(|(_, old, _)| newest_first(*old, ends.get(old).copied()));
        let shards = copies.len();
        let watch_source = async {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if !self.src().host.alive().await {
                    return;
                }
            }
        };
        let scratch = Self::scratch(&self.dst().cfg, &self.id, "restore");
        let pace = snapshotter::Pace::new(self.cfg.migration.transfer_rate_limit);
        let guarded = !self.cfg.migration.write_time_guard.is_zero();
        let mut guard = Guard::new(
            self.cfg.migration.write_time_guard,
            self.cfg.migration.transfer_rate_limit,
        );
        let run = async {
            let mut total = snapshotter::Copied::default();
            let mut sent = Vec::new();
            let mut streamed = Vec::new();
            let mut running = tokio::task::JoinSet::new();
            let mut queue = copies.into_iter();
            loop {
                while running.len() < SHARD_COPIES {
                    let Some((db, old, new)) = queue.next() else {
                        break;
                    };
                    let (c, f, t) = (cancel.clone(), from.clone(), to.clone());
                    let pace = pace.clone();
                    running.spawn_blocking(move || {
                        let began = std::time::Instant::now();
                        snapshotter::copy_shard(&f, old, &t, new, Some(&*pace), &c)
                            .map(|got| (db, old, new, got, began.elapsed()))
                            .map_err(|e| format!("shard {old} (target shard {new}): {e}"))
                    });
                }
                let Some(done) = running.join_next().await else {
                    break;
                };
                let (database, source, target, got, took) =
                    done.map_err(|e| e.to_string()).and_then(|r| r)?;
                // When each shard's stream ran: what a writer's stall during the dump is
                // laid against (a source's snapshot of the shard it writes to, say).
                tracing::info!(
                    %database,
                    shard = source,
                    target_shard = target,
                    files = got.files,
                    mb = got.bytes as f64 / 1e6,
                    seconds = took.as_secs_f64(),
                    "shard streamed"
                );
                total.files += got.files;
                total.bytes += got.bytes;
                streamed.push(ShardStreamed {
                    database: database.clone(),
                    shard: source,
                    target_shard: target,
                    bytes: got.bytes,
                    seconds: took.as_secs_f64(),
                });
                sent.push(SentShard {
                    database,
                    source,
                    target,
                    files: got.sent,
                });
            }
            Ok::<_, String>((total, sent, streamed))
        };
        let lost = |side: &str, host: &Host| {
            fail(format!(
                "the SSH connection to the {side} {} was lost during the dump",
                host.describe()
            ))
        };
        let paced = async {
            if guarded {
                guard::watch(&self.src().influx, &pace, &mut guard).await
            } else {
                std::future::pending().await
            }
        };
        let r = tokio::select! {
            never = paced => match never {},
            r = run => match r {
                Ok(total) => Ok(total),
                // A forward that stops answering: say which connection went, not which
                // local port refused.
                Err(_) if !self.src().host.alive().await => Err(lost("source", &self.src().host)),
                Err(_) if !self.dst().host.alive().await => Err(lost("target", &self.dst().host)),
                Err(e) => {
                    let e = fail(format!("streaming the shards: {e}"));
                    Err(full_or(&self.dst().host, &scratch, p, "target", &self.dst().cfg.name, e).await)
                }
            },
            () = watch_source => Err(lost("source", &self.src().host)),
            free = disk_fills(&self.dst().host, &scratch) => {
                Err(disk_full(p, "target", &self.dst().cfg.name, &scratch, free))
            }
        };
        cancel.cancel();
        Ok(r.map(|(total, sent, streamed)| {
            self.sent_shards = sent;
            self.report.shards_streamed = streamed;
            self.report.dump_bytes = total.bytes;
            let mut limit = match self.cfg.migration.transfer_rate_limit {
                0 => String::new(),
                l => format!(", at most {:.1} MB/s (migration.transfer_rate_limit)", l as f64 / 1e6),
            };
            if guarded && guard.judged == 0 {
                limit += ", not paced by the source's write time: its counters (/debug/vars) could not be read (migration.write_time_guard)";
            } else if guarded {
                limit += &match guard.lowest {
                    None => format!(
                        ", never slowed by the source's write time (migration.write_time_guard: {})",
                        humantime::format_duration(self.cfg.migration.write_time_guard)
                    ),
                    Some(low) => format!(
                        ", slowed {} times by the source's write time, to {:.1} MB/s at the least (migration.write_time_guard: {})",
                        guard.slowdowns,
                        low as f64 / 1e6,
                        humantime::format_duration(self.cfg.migration.write_time_guard)
                    ),
                };
                if let Some((own, goal)) = guard.learned {
                    limit += &format!(
                        "; the writes took {:.1} ms on average with the streams at their floor, so the guard kept to {:.1} ms (set migration.write_time_guard above the service's usual mean write time)",
                        own.as_secs_f64() * 1e3,
                        goal.as_secs_f64() * 1e3
                    );
                }
            }
            self.progress.note(&format!(
                "streamed {shards} shards ({} files, {:.1} MB{limit}) from the source's InfluxDB RPC port into the target's: dump, transfer and restore in one pass",
                total.files,
                total.bytes as f64 / 1e6
            ));
        }))
    }

    /// Record database `db` as this migration's on the target, right before the step that
    /// creates it: in memory and in the journal, so a half-restored database is ours to
    /// remove, also after a crash. Re-checked first: a database that appeared on the
    /// target since prepare is not ours, and a rollback must never drop it.
    async fn claim_target_database(&mut self, p: Phase, db: &str) -> Result<(), MigrateError> {
        let now = self
            .dst()
            .influx
            .databases()
            .await
            .map_err(Self::influx_err(p))?;
        if now.iter().any(|d| d == db) {
            return Err(MigrateError::TargetNotEmpty {
                target: self.dst().cfg.name.clone(),
                db: db.to_string(),
            });
        }
        self.created.target_databases.push(db.to_string());
        self.journal
            .target_creating(&TargetObject::Database(db.to_string()))
            .map_err(|msg| MigrateError::Failed { phase: p, msg })
    }

    /// Run `influxd backup` on the target host against the source's RPC port, reached
    /// through a local forward into the source and a remote forward out of the target,
    /// both through this process: no VM-to-VM keys, no copy on the source's disk.
    /// `Err` means the forwards could not be set up (the caller may fall back);
    /// `Ok(Err)` is a failure of the backup itself.
    pub(super) async fn pull_dump(&mut self) -> Result<Result<(), MigrateError>, String> {
        let p = Phase::Dump;
        // 1. The source's RPC port, as this process reaches it.
        let src_fwd = RpcReach::open(
            &self.src().host,
            &self.src().cfg.rpc_address,
            "source",
            None,
        )
        .await?;
        let Some(src_rpc) = src_fwd.tcp() else {
            return Err("the source's RPC port is not reached over TCP".into());
        };
        let local_fwd = src_fwd.forward;
        // 2. The target reaches it.
        let mut remote_fwd = None;
        let backup_from = match &self.dst().host {
            Host::Ssh(t) => {
                let mut last = String::new();
                for attempt in 0..8u64 {
                    let port = 20_000
                        + ((self.id.parse::<u64>().unwrap_or(0).wrapping_mul(7919)
                            + attempt * 104_729)
                            % 40_000) as u16;
                    match t.forward_remote(port, src_rpc).await {
                        Ok(()) => {
                            remote_fwd = Some(port);
                            break;
                        }
                        Err(e) => last = e.to_string(),
                    }
                }
                match remote_fwd {
                    Some(port) => format!("127.0.0.1:{port}"),
                    None => {
                        self.close_forwards(local_fwd, None, src_rpc).await;
                        return Err(last);
                    }
                }
            }
            Host::Local(_) => src_rpc.to_string(),
        };
        let dir = Self::scratch(&self.dst().cfg, &self.id, "restore");
        self.created.target_dirs.push(dir.clone());
        // The backup runs on the target but reads through our connection to the source:
        // if that connection dies, `influxd backup` would retry each shard for minutes.
        let watch_source = async {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                if !self.src().host.alive().await {
                    return;
                }
            }
        };
        let cmd = backup_cmd(&backup_from, &dir);
        let r = tokio::select! {
            r = self.dst().host.run(&cmd) => match r {
                Ok(out) => Ok(out),
                Err(e) => {
                    let e = Self::remote_err(p)(e);
                    Err(full_or(&self.dst().host, &dir, p, "target", &self.dst().cfg.name, e).await)
                }
            },
            () = watch_source => {
                stop_backup(&self.dst().host, &dir).await;
                Err(MigrateError::Failed {
                    phase: p,
                    msg: format!(
                        "the SSH connection to the source {} was lost during the dump",
                        self.src().host.describe()
                    ),
                })
            }
            free = disk_fills(&self.dst().host, &dir) => {
                stop_backup(&self.dst().host, &dir).await;
                Err(disk_full(p, "target", &self.dst().cfg.name, &dir, free))
            }
        };
        self.close_forwards(local_fwd, remote_fwd, src_rpc).await;
        Ok(r.map(|out| self.report.dump_bytes = du_bytes(&out)))
    }

    pub(super) async fn close_forwards(
        &self,
        local: Option<Forward>,
        remote: Option<u16>,
        src_rpc: std::net::SocketAddr,
    ) {
        if let (Some(port), Host::Ssh(t)) = (remote, &self.dst().host) {
            t.close_remote(port, src_rpc).await;
        }
        if let Some(f) = local {
            f.close(&self.src().host).await;
        }
    }

    pub(super) async fn transfer(&mut self) -> Result<(), MigrateError> {
        let p = Phase::Transfer;
        if self.pulled {
            return Ok(()); // the target already holds the dump
        }
        let from = Self::scratch(&self.src().cfg, &self.id, "dump");
        let to = Self::scratch(&self.dst().cfg, &self.id, "restore");
        self.created.target_dirs.push(to.clone());
        // The shards are already gzip-compressed: plain tar, streamed through this process.
        let send = format!("tar -C {} -cf - .", shell_quote(&from));
        let recv = format!(
            "rm -rf {to} && mkdir -p {to} && tar -C {to} -xf -",
            to = shell_quote(&to)
        );
        let mut tx = self
            .src()
            .host
            .spawn(
                &send,
                Pipes {
                    stdin: false,
                    stdout: true,
                },
            )
            .await
            .map_err(Self::remote_err(p))?;
        let mut rx = self
            .dst()
            .host
            .spawn(
                &recv,
                Pipes {
                    stdin: true,
                    stdout: false,
                },
            )
            .await
            .map_err(Self::remote_err(p))?;
        let (Some(mut out), Some(mut inp)) = (tx.stdout.take(), rx.stdin.take()) else {
            return Err(MigrateError::Failed {
                phase: p,
                msg: "transfer pipes were not opened".into(),
            });
        };
        let copied = tokio::select! {
            c = tokio::io::copy(&mut out, &mut inp) => c,
            free = disk_fills(&self.dst().host, &to) => {
                drop(inp);
                drop(out);
                let _ = tokio::join!(tx.finish(), rx.finish());
                return Err(disk_full(p, "target", &self.dst().cfg.name, &to, free));
            }
        };
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut inp).await;
        drop(inp);
        drop(out);
        let (a, b) = tokio::join!(tx.finish(), rx.finish());
        a.map_err(Self::remote_err(p))?;
        b.map_err(Self::remote_err(p))?;
        let n = copied.map_err(|e| MigrateError::Failed {
            phase: p,
            msg: format!("streaming the dump: {e}"),
        })?;
        self.progress.note(&format!("transferred {n} bytes"));
        Ok(())
    }

    pub(super) async fn restore(&mut self) -> Result<(), MigrateError> {
        let p = Phase::Restore;
        let dir = Self::scratch(&self.dst().cfg, &self.id, "restore");
        let rpc = self.dst().cfg.rpc_address.clone();
        // Streamed shards restored the databases already.
        let databases = if self.restored {
            Vec::new()
        } else {
            self.report.databases.clone()
        };
        if !databases.is_empty() {
            // What `influxd restore` would silently leave out (see
            // `SnapshotError::Deletions`): a shard archive holding a tombstone file.
            let found = self
                .dst()
                .host
                .run(&snapshotter::tombstones_in_archives_cmd(&dir))
                .await
                .map_err(Self::remote_err(p))?;
            if let Some(file) = found.lines().map(str::trim).find(|l| !l.is_empty()) {
                return Err(MigrateError::Failed {
                    phase: p,
                    msg: format!(
                        "the dump holds deletions the source has not applied to its files yet ({file}); InfluxDB's restore ignores such a file, so the deleted points would come back on the target. The source applies them at its next compaction of the shard, usually within seconds to minutes: migrate again then"
                    ),
                });
            }
        }
        for db in databases {
            self.claim_target_database(p, &db).await?;
            // Judged by its exit status (a failure's stderr is in the error) and by the state
            // it leaves; never by words in its output, which names databases and shards.
            let cmd = format!(
                "influxd restore -portable -db {} -host {} {}",
                shell_quote(&db),
                shell_quote(&rpc),
                shell_quote(&dir)
            );
            self.dst()
                .host
                .run(&cmd)
                .await
                .map_err(Self::remote_err(p))?;
            let restored = self
                .dst()
                .influx
                .databases()
                .await
                .map_err(Self::influx_err(p))?;
            if !restored.contains(&db) {
                return Err(MigrateError::Failed {
                    phase: p,
                    msg: format!(
                        "restore of database {db:?} on {} exited 0 but the database is not there",
                        self.dst().cfg.name
                    ),
                });
            }
        }
        let src = self.src().influx.clone();
        let dst = self.dst().influx.clone();
        let err = Self::influx_err(p);
        // Portable restore carries subscriptions over: ours must not forward from the
        // target (the capture's would spool the target's own writes), nor run on after a
        // DROP the server missed.
        let subs = dst.subscriptions().await.map_err(&err)?;
        let carried = by_name(
            subs.into_iter()
                .filter(|s| s.name.starts_with("stateshift_")),
        );
        let within = self.cfg.capture.live_timeout;
        for (name, subs) in &carried {
            let left = drop_until_stopped(&dst, p, false, name, subs, within).await;
            if !left.is_empty() {
                return Err(MigrateError::Failed {
                    phase: p,
                    msg: format!(
                        "{}: the subscriptions {name} the restore carried over: {}",
                        dst.url(),
                        left.describe()
                    ),
                });
            }
        }
        // Retention policies: restore brings them; make sure defaults and any missing agree.
        for db in &self.report.databases {
            let srps = src.retention_policies(db).await.map_err(&err)?;
            let drps = dst.retention_policies(db).await.map_err(&err)?;
            for rp in &srps {
                let q = match drps.iter().find(|d| d.name == rp.name) {
                    None => format!("CREATE RETENTION POLICY {} ON {} DURATION {} REPLICATION {} SHARD DURATION {}{}", ident(&rp.name), ident(db), rp.duration, rp.replication, rp.shard_group_duration, if rp.default { " DEFAULT" } else { "" }),
                    Some(d) if d != rp => format!("ALTER RETENTION POLICY {} ON {} DURATION {} REPLICATION {} SHARD DURATION {}{}", ident(&rp.name), ident(db), rp.duration, rp.replication, rp.shard_group_duration, if rp.default { " DEFAULT" } else { "" }),
                    Some(_) => continue,
                };
                dst.query(None, &q).await.map_err(&err)?;
            }
        }
        // Users and grants (portable restore drops them).
        let dst_users: BTreeSet<String> = dst
            .users()
            .await
            .map_err(&err)?
            .into_iter()
            .map(|u| u.name)
            .collect();
        for u in src.users().await.map_err(&err)? {
            if !dst_users.contains(&u.name) {
                let pw = self
                    .cfg
                    .migration
                    .user_passwords
                    .get(&u.name)
                    .or(if self.src().cfg.username.as_deref() == Some(&u.name) {
                        self.src().cfg.password.as_ref()
                    } else {
                        None
                    })
                    .cloned();
                let Some(pw) = pw else {
                    return Err(MigrateError::MissingPassword {
                        user: u.name.clone(),
                    });
                };
                let q = format!(
                    "CREATE USER {} WITH PASSWORD {}{}",
                    ident(&u.name),
                    literal(pw.expose()),
                    if u.admin { " WITH ALL PRIVILEGES" } else { "" }
                );
                self.created.target_users.push(u.name.clone());
                self.journal
                    .target_creating(&TargetObject::User(u.name.clone()))
                    .map_err(|msg| MigrateError::Failed { phase: p, msg })?;
                // The statement holds the password: its error must not echo it.
                dst.query(None, &q)
                    .await
                    .map_err(|e| MigrateError::Failed {
                        phase: p,
                        msg: format!(
                            "cannot create user {:?} on the target: {}",
                            u.name,
                            statement_error(&e, pw.expose())
                        ),
                    })?;
            } else if u.admin {
                dst.query(None, &format!("GRANT ALL PRIVILEGES TO {}", ident(&u.name)))
                    .await
                    .map_err(&err)?;
            }
            for g in src.grants(&u.name).await.map_err(&err)? {
                let privilege = if g.privilege == "ALL PRIVILEGES" {
                    "ALL"
                } else {
                    g.privilege.as_str()
                };
                dst.query(
                    None,
                    &format!(
                        "GRANT {privilege} ON {} TO {}",
                        ident(&g.database),
                        ident(&u.name)
                    ),
                )
                .await
                .map_err(&err)?;
            }
        }
        // Continuous queries.
        let have: BTreeSet<(String, String)> = dst
            .continuous_queries()
            .await
            .map_err(&err)?
            .into_iter()
            .map(|c| (c.database, c.name))
            .collect();
        for cq in src.continuous_queries().await.map_err(&err)? {
            if !have.contains(&(cq.database.clone(), cq.name.clone())) {
                dst.query(None, &cq.query).await.map_err(&err)?;
            }
        }
        Ok(())
    }
}

/// The error of a statement that carried a password, without the statement: the
/// server's own message (with the password masked, should a parser quote it) or the
/// HTTP status only.
pub(super) fn statement_error(e: &InfluxError, secret: &str) -> String {
    let msg = match e {
        InfluxError::Query { msg, .. } => msg.clone(),
        InfluxError::Http { status, .. } => format!("HTTP {status}"),
        InfluxError::Decode { .. } => "unexpected response".into(),
        other => other.to_string(),
    };
    if secret.is_empty() {
        msg
    } else {
        msg.replace(secret, "***")
    }
}

/// The shell command that makes a fresh portable backup of `rpc` into `dir` and prints
/// its size last (`du -sb`).
pub(super) fn backup_cmd(rpc: &str, dir: &str) -> String {
    let q = shell_quote(dir);
    format!(
        "rm -rf {q} && mkdir -p {q} && nice -n 10 influxd backup -portable -host {} {q} 2>&1 && du -sb {q}",
        shell_quote(rpc)
    )
}

/// Below this much free space on the disk a dump lands on, the dump stops: the InfluxDB
/// on that machine needs room too, and `influxd backup` retries a shard it cannot write
/// for minutes (measured: 237 s) before it fails without saying why.
pub(super) const DISK_FLOOR: u64 = 16 << 20;

/// Free bytes of the file system that holds `dir` (or its nearest existing parent) on
/// `host`; `None` when `df` answers something unreadable.
pub(super) async fn free_bytes(host: &Host, dir: &str) -> Result<Option<u64>, RemoteError> {
    let out = host
        .run(&format!(
            "d={}; while [ ! -d \"$d\" ]; do d=$(dirname \"$d\"); done; df -Pk \"$d\" | tail -n 1",
            shell_quote(dir)
        ))
        .await?;
    Ok(out
        .split_whitespace()
        .nth(3)
        .and_then(|n| n.parse::<u64>().ok())
        .map(|kib| kib.saturating_mul(1024)))
}

/// Resolves, with the free bytes, once the disk of `dir` on `host` has less than
/// [`DISK_FLOOR`] free, looking every second. A disk whose free space cannot be read is
/// not watched (said once in the log); it never resolves then.
async fn disk_fills(host: &Host, dir: &str) -> u64 {
    let mut warned = false;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        match free_bytes(host, dir).await {
            Ok(Some(free)) if free < DISK_FLOOR => return free,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) if warned => {}
            Ok(None) => {
                warned = true;
                tracing::warn!(host = %host.describe(), dir, "cannot read the free space during the dump; not watched");
            }
            Err(e) => {
                warned = true;
                tracing::warn!(host = %host.describe(), dir, error = %e, "cannot read the free space during the dump; not watched");
            }
        }
    }
}

/// `e`, a dump's failure, or the full disk it is when the disk of `dir` on `host` is
/// below [`DISK_FLOOR`] now: `influxd backup` and a shard import can fail on it before
/// [`disk_fills`] first looks (CI: 0.5 s into a dump of 200,000 points, "exit status: 1"
/// and nothing else).
async fn full_or(
    host: &Host,
    dir: &str,
    phase: Phase,
    side: &str,
    name: &str,
    e: MigrateError,
) -> MigrateError {
    // Bounded: the dump has failed already, and a host that does not answer must not hold
    // its error back (the SSH keep-alive alone would take ~45 s to say so).
    match tokio::time::timeout(Duration::from_secs(10), free_bytes(host, dir)).await {
        Ok(Ok(Some(free))) if free < DISK_FLOOR => {
            tracing::warn!(error = %e, side, dir, "the dump failed on a full disk");
            disk_full(phase, side, name, dir, free)
        }
        _ => e,
    }
}

fn disk_full(phase: Phase, side: &str, name: &str, dir: &str, free: u64) -> MigrateError {
    MigrateError::Failed {
        phase,
        msg: format!(
            "the disk of the {side} {name} filled during the dump: {dir} has {} KiB free (the floor is {} MiB); the dump was stopped",
            free >> 10,
            DISK_FLOOR >> 20
        ),
    }
}

/// Stop this migration's `influxd backup` on `host`. Dropping the command does not (an SSH
/// channel or `sh` going away leaves it retrying): it is found by its scratch directory,
/// which only this migration's backup names.
async fn stop_backup(host: &Host, dir: &str) {
    let pattern = format!("[i]nfluxd backup .*{}", crate::util::regex_quote(dir));
    if let Err(e) = host
        .run(&format!("pkill -f -- {} || true", shell_quote(&pattern)))
        .await
    {
        tracing::warn!(error = %e, "could not stop the backup");
    }
}

pub(super) fn du_bytes(out: &str) -> u64 {
    out.lines()
        .last()
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A local forward into a host's port, to close once used.
pub(super) struct Forward {
    listen: Listen,
    host: String,
    port: u16,
}

impl Forward {
    pub(super) async fn close(self, on: &Host) {
        if let Host::Ssh(s) = on {
            s.close_local(&self.listen, &self.host, self.port).await;
        }
        if let Listen::Unix(p) = &self.listen {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// An RPC address `host:port` (`[v6]:port`) as its host and port.
pub(super) fn split_rpc_address(rpc: &str) -> Option<(String, u16)> {
    rpc.rsplit_once(':').and_then(|(h, port)| {
        port.parse::<u16>()
            .ok()
            .map(|port| (h.trim_matches(['[', ']']).to_string(), port))
    })
}

/// A host's InfluxDB RPC port as this process reaches it: directly on a local host,
/// through a local SSH forward otherwise, listening on TCP loopback or, given a private
/// directory, on a unix socket there (mode 0600: no other local user can reach the
/// unauthenticated RPC port through it).
pub(super) struct RpcReach {
    pub at: snapshotter::Endpoint,
    pub forward: Option<Forward>,
}

impl RpcReach {
    /// `Err` says why the port cannot be reached (the caller may fall back).
    pub(super) async fn open(
        host: &Host,
        rpc: &str,
        side: &str,
        unix_dir: Option<&std::path::Path>,
    ) -> Result<RpcReach, String> {
        let (rpc_host, rpc_port) = split_rpc_address(rpc)
            .ok_or_else(|| format!("{side}.rpc_address {rpc:?} is not host:port"))?;
        match host {
            Host::Ssh(s) => {
                let listen = match unix_dir {
                    Some(d) => {
                        let listen = Listen::Unix(d.join(format!("{side}.sock")));
                        s.forward_local(&listen, &rpc_host, rpc_port)
                            .await
                            .map_err(|e| e.to_string())?;
                        listen
                    }
                    None => Listen::Tcp(
                        s.forward_local_tcp(&rpc_host, rpc_port)
                            .await
                            .map_err(|e| e.to_string())?,
                    ),
                };
                let at = match &listen {
                    Listen::Tcp(a) => snapshotter::At::Tcp(*a),
                    Listen::Unix(p) => snapshotter::At::Unix(p.clone()),
                };
                Ok(RpcReach {
                    at: snapshotter::Endpoint {
                        at,
                        name: format!("{rpc} of the {side} (through SSH to {})", host.describe()),
                    },
                    forward: Some(Forward {
                        listen,
                        host: rpc_host,
                        port: rpc_port,
                    }),
                })
            }
            Host::Local(_) => {
                let addr = tokio::net::lookup_host(rpc)
                    .await
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| format!("cannot resolve {side}.rpc_address {rpc:?}"))?;
                Ok(RpcReach {
                    at: snapshotter::Endpoint {
                        at: snapshotter::At::Tcp(addr),
                        name: format!("{rpc} of the {side}"),
                    },
                    forward: None,
                })
            }
        }
    }

    /// The TCP address, for a forward chained to it (`pull_dump`).
    fn tcp(&self) -> Option<std::net::SocketAddr> {
        match &self.at.at {
            snapshotter::At::Tcp(a) => Some(*a),
            snapshotter::At::Unix(_) => None,
        }
    }
}

/// A directory only this user can enter, for the forwards' unix sockets; removed when
/// dropped. In this process's directory, which the next stateshift process removes if
/// this one is killed (`remote::scratch`).
pub(super) struct PrivateDir {
    pub path: std::path::PathBuf,
    _parent: std::sync::Arc<crate::remote::scratch::ProcessDir>,
}

impl PrivateDir {
    pub(super) fn create(id: &str) -> Result<PrivateDir, String> {
        use std::os::unix::fs::DirBuilderExt;
        let parent = crate::remote::scratch::process_dir()
            .map_err(|e| format!("cannot make this process's temporary directory: {e}"))?;
        let d = parent.path().join(format!("forwards-{id}"));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&d)
            .map_err(|e| format!("cannot create {}: {e}", d.display()))?;
        Ok(PrivateDir {
            path: d,
            _parent: parent,
        })
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The order shards are streamed in: by the end of their shard group, latest first;
/// among equal ends, the highest id (the last created) first. A shard whose end is not
/// known comes first: mostly one created after `SHOW SHARDS` listed the others (a new
/// shard group, as at a group's turn), which is the one the writers moved to.
fn newest_first(id: u64, end: Option<i64>) -> (std::cmp::Reverse<i64>, std::cmp::Reverse<u64>) {
    (
        std::cmp::Reverse(end.unwrap_or(i64::MAX)),
        std::cmp::Reverse(id),
    )
}

/// Cancels the shard copies when dropped: an abort or a failure elsewhere drops the
/// future that runs them, and their blocking threads must not go on writing to the target.
pub(super) struct CancelOnDrop(pub snapshotter::Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// The largest metadata blob `auto` streams (see `stream_shards_through`).
const META_IN_ONE_PIECE: usize = 30 << 10;

/// Shard copies running at once. One: a copy already keeps the source's server, both SSH
/// ends and the target's import busy at once. Measured at 10M points on 2 cores
/// (`stateshift bench`, two runs each): two at once took 2.46/2.50 s with the writer's
/// p99 during the dump at 25.2/17.5 ms, one at once 2.51/2.62 s at 17.8/14.2 ms.
const SHARD_COPIES: usize = 1;

#[cfg(test)]
mod tests {
    use super::newest_first;

    #[test]
    fn shards_stream_latest_group_first_an_unknown_end_before_all_and_ties_by_newest_id() {
        // (id, its group's end): 2 was created after the listing (no end known), 4 is a
        // shard of a second retention policy ending with 3.
        let mut shards = [
            (1, Some(10)),
            (2, None),
            (3, Some(20)),
            (4, Some(20)),
            (5, Some(5)),
        ];
        shards.sort_by_key(|&(id, end)| newest_first(id, end));
        let ids: Vec<u64> = shards.iter().map(|s| s.0).collect();
        assert_eq!(ids, [2, 4, 3, 1, 5]);
    }
}
