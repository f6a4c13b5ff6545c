//! Capture: a subscription on every retention policy of the source forwards each write
//! to our receiver, which spools it; and the checks that prove the capture lost nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::context::{sub_name, Migration};
use super::{MigrateError, Phase};
use crate::config::Config;
use crate::influx::{drained, ident, literal, Influx, SubStats, MONITOR_DB};
use crate::migrate::capture::{Receiver, ReceiverAuth, Sink};
use crate::migrate::spool::SpoolWriter;
use crate::util::Secret;

/// What the source's counters say about the capture's forwarding; see
/// [`Migration::drain_proven`].
pub(super) enum Drain {
    /// Everything that entered the source since the capture began has been received.
    Proven(SubStats),
    /// Not proven: `entered` points entered the source's points writer since the capture
    /// began, `delivered` were delivered to the receiver.
    Unproven { entered: u64, delivered: u64 },
    /// Cannot be proven in this migration: the capture has no base (it did not start in
    /// this run).
    NoBase,
}

impl Migration<'_> {
    pub(super) async fn capture(&mut self) -> Result<(), MigrateError> {
        let p = Phase::Capture;
        let spool_dir = &self.cfg.capture.spool_dir;
        std::fs::create_dir_all(spool_dir).map_err(|e| MigrateError::Failed {
            phase: p,
            msg: format!(
                "cannot create capture.spool_dir {}: {e}",
                spool_dir.display()
            ),
        })?;
        let spool_path = spool_dir.join(format!("{}.spool", self.id));
        let spool = Arc::new(
            SpoolWriter::create(&spool_path)
                .map_err(|source| MigrateError::Spool { phase: p, source })?,
        );
        let mut auth = Self::receiver_auth(p)?;
        let receiver = Receiver::start(self.cfg.capture.listen, Sink::Spool(spool.clone()), &auth)
            .await
            .map_err(|e| MigrateError::Failed {
                phase: p,
                msg: e.to_string(),
            })?;
        let url = self.advertise(receiver.addr);
        // The watch receiver's port is taken now: a busy one stops the migration here,
        // before the dump, not at cutover.
        self.watch_listener = Some(Self::bind_watch(self.cfg, p).await?);
        self.spool = Some(spool);
        self.receiver = Some(receiver);
        let name = sub_name(&self.id);
        // The drain's proof counts from the counters read just before the subscriptions
        // are made. A write that enters before they are live may not be forwarded: it is
        // in the dump, but the proof cannot hold then, and the cutover would wait
        // `capture.quiet_period`. So the subscriptions are made again, a few times at
        // most, until none entered meanwhile.
        if self.plan.resume {
            self.drop_interrupted_statistics(p).await?;
        }
        let mut attempt = 1;
        let subs = loop {
            let at_start = Self::subscriber_stats(&self.src().influx, &name, p).await?;
            self.source_started = at_start.started.clone();
            self.drops_base = at_start;
            let destination = auth.in_url(&url);
            let (subs, remade) = self
                .subscribe(Phase::Capture, true, &name, &destination)
                .await?;
            let entered =
                entered_while_subscribing(self.capture_base.as_ref(), self.capture_live.as_ref());
            if entered == 0 {
                break subs;
            }
            // A subscription made again may have started just before its DROP: what it
            // delivered then, followed by writes in the gap that only the dump holds,
            // would put an older value back at the replay. Another attempt starts from
            // an empty spool; on the last one the migration stops, before the dump.
            if remade && attempt == CAPTURE_ATTEMPTS && !self.plan.resume {
                return Err(MigrateError::Failed {
                    phase: p,
                    msg: format!(
                        "{}: the capture's subscriptions had to be made again on its last attempt ({CAPTURE_ATTEMPTS}; InfluxDB had not taken them up), while {entered} point(s) reached the source: the order of what they delivered cannot be vouched for, so the migration stops before the dump; the next one makes them afresh",
                        self.src().influx.url()
                    ),
                });
            }
            // A resumed run has no dump to hold what the first subscriptions delivered:
            // it keeps them (found by review).
            if attempt == CAPTURE_ATTEMPTS || self.plan.resume {
                tracing::info!(
                    points = entered,
                    attempts = attempt,
                    "writes reached the source while the capture's subscriptions were being made: unless they were forwarded, the counters cannot prove the drain, and time decides"
                );
                break subs;
            }
            tracing::info!(
                points = entered,
                attempt,
                "writes reached the source while the capture's subscriptions were being made; making them again"
            );
            auth = self.subscribe_again(p, &name, &spool_path).await?;
            attempt += 1;
        };
        self.progress.note(&format!(
            "capturing writes of {} retention policies into {url}{}",
            subs,
            if attempt > 1 {
                format!(" (subscriptions made {attempt} times: writes reached the source while they were being made)")
            } else {
                String::new()
            }
        ));
        let quiet = self.no_write_in_flight(p).await;
        // Only a dump holds what was dropped before: a resumed run has none (found by
        // review).
        let live = self.capture_live.as_ref().filter(|_| !self.plan.resume);
        if let Some(live) = drops_base_once_live(&self.drops_base, live, quiet.is_ok()) {
            tracing::info!(
                dropped = live.dropped - self.drops_base.dropped,
                queue_drops = live.queue_drops.saturating_sub(self.drops_base.queue_drops),
                "the source counted forwarding drops while the capture's subscriptions were being made; every write they concern was in its shards before the dump began, so they are not counted against the capture"
            );
            self.drops_base = live.clone();
        }
        if self.cfg.verify.read_back && self.cfg.verify.target_first {
            self.files_may_prove = quiet;
        }
        self.capture_live = None;
        Ok(())
    }

    /// Make the capture's subscriptions again, from a fresh start: new credentials and
    /// a new, empty spool (the receiver answers what the dropped subscriptions still
    /// deliver and keeps none of it: those writes entered before the new subscriptions
    /// were live, so the dump has them, and replayed after a write of the new window
    /// they could put an older value back); the subscriptions dropped and gone from
    /// the source's counters, whose next read is the new base. Returns the new
    /// credentials.
    async fn subscribe_again(
        &mut self,
        p: Phase,
        name: &str,
        spool_path: &std::path::Path,
    ) -> Result<ReceiverAuth, MigrateError> {
        let auth = Self::receiver_auth(p)?;
        // The old spool's file goes first (a spool is never reused); an append still
        // under way lands in the unlinked file, which nothing replays.
        self.spool = None;
        std::fs::remove_file(spool_path).map_err(|e| MigrateError::Failed {
            phase: p,
            msg: format!(
                "cannot remove the capture spool {}: {e}",
                spool_path.display()
            ),
        })?;
        let spool = Arc::new(
            SpoolWriter::create(spool_path)
                .map_err(|source| MigrateError::Spool { phase: p, source })?,
        );
        if let Some(r) = self.receiver.as_mut() {
            r.rotate(Sink::Spool(spool.clone()), &auth);
        }
        self.spool = Some(spool);
        let src = self.src().influx.clone();
        // Kept recorded until dropped: an abort meanwhile leaves them to the rollback's
        // watched DROPs (found by review).
        let made = self.created.source_subscriptions.clone();
        let within = self.cfg.capture.live_timeout;
        let left = drop_until_stopped(&src, p, true, name, &made, within).await;
        // What is left, the rollback drops again (one gone is no error there).
        self.created.source_subscriptions = left.subscriptions();
        if !left.is_empty() {
            return Err(MigrateError::Failed {
                phase: p,
                msg: format!(
                    "{}: of the {} subscriptions dropped to make them again, {}",
                    src.url(),
                    made.len(),
                    left.describe()
                ),
            });
        }
        Ok(auth)
    }

    /// Bind the watch receiver's address (the capture's, one port above).
    pub(super) async fn bind_watch(
        cfg: &Config,
        phase: Phase,
    ) -> Result<tokio::net::TcpListener, MigrateError> {
        let listen = std::net::SocketAddr::new(
            cfg.capture.listen.ip(),
            watch_port(cfg.capture.listen.port()),
        );
        Receiver::bind(listen)
            .await
            .map_err(|e| MigrateError::Failed {
                phase,
                msg: format!(
                    "{e} (the target's watch receiver listens one port above capture.listen)"
                ),
            })
    }

    /// A fresh secret for a capture receiver (its subscription carries it).
    pub(super) fn receiver_auth(phase: Phase) -> Result<ReceiverAuth, MigrateError> {
        ReceiverAuth::generate().map_err(|e| MigrateError::Failed {
            phase,
            msg: format!("cannot make the capture receiver's secret: {e}"),
        })
    }

    /// The URL InfluxDB must forward to for a receiver bound at `addr`: the configured
    /// `advertise_url` (or the bound address) with the port actually bound.
    pub(super) fn advertise(&self, addr: std::net::SocketAddr) -> String {
        match &self.cfg.capture.advertise_url {
            Some(u) => with_port(u, addr.port()),
            None => format!("http://{addr}"),
        }
    }

    /// Subscribe every retention policy of every user database (source or target side)
    /// and wait until InfluxDB shows the subscriptions live in `/debug/vars`.
    pub(super) async fn subscribe(
        &mut self,
        phase: Phase,
        on_source: bool,
        name: &str,
        destination: &Secret,
    ) -> Result<(usize, bool), MigrateError> {
        let side = if on_source { self.src() } else { self.dst() };
        let influx = side.influx.clone();
        let mut made = Vec::new();
        let mut rps = Vec::new();
        let mut dbs = influx.databases().await.map_err(Self::influx_err(phase))?;
        // A source that stores its statistics (Debian's default) sends them through the
        // same points writer as the writers' points, and the drain's proof counts every
        // point that enters it: forwarded too, they keep it provable. The receiver spools
        // them like any write (a resumed run checks spool against counters) and the
        // replay leaves them out: the target keeps statistics of its own.
        if on_source
            && influx
                .has_database(MONITOR_DB)
                .await
                .map_err(Self::influx_err(phase))?
        {
            dbs.push(MONITOR_DB.to_string());
        }
        for db in dbs {
            for rp in influx
                .retention_policies(&db)
                .await
                .map_err(Self::influx_err(phase))?
            {
                rps.push((db.clone(), rp));
            }
        }
        if on_source {
            // As late as possible: the window until the subscriptions are live should
            // see no write (see `capture`).
            self.capture_base = Some(Self::subscriber_stats(&influx, name, phase).await?);
            // Fault injection: the fault matrix drops another subscription here.
            crate::util::fault_hold("subscribing").await;
        }
        let based_at = Instant::now();
        // Fault injection (`STATESHIFT_FAULT=subscription_unseen`): the last subscription
        // of the first round on each side is left out, as if the server had not taken it
        // up (below); once per side and process, as the race strikes.
        let unseen = fault_once("subscription_unseen", on_source)
            .then(|| rps.last().map(|(db, rp)| (db.clone(), rp.name.clone())))
            .flatten();
        for (db, rp) in rps {
            if unseen.as_ref() != Some(&(db.clone(), rp.name.clone())) {
                create_subscription(&influx, phase, name, &db, &rp.name, destination, false)
                    .await?;
            } else {
                tracing::warn!(
                    db,
                    rp = rp.name,
                    "STATESHIFT_FAULT=subscription_unseen: not made in the first round"
                );
            }
            made.push((db.clone(), rp.name.clone()));
            if on_source {
                self.created
                    .source_subscriptions
                    .push((db.clone(), rp.name.clone()));
            } else {
                self.created
                    .target_subscriptions
                    .push((db.clone(), rp.name.clone()));
            }
        }
        let made_at = Instant::now();
        let mut polls = 0u32;
        let deadline = made_at + self.cfg.capture.live_timeout;
        let mut remake_at = made_at + remake_after(self.cfg.capture.live_timeout);
        let mut remade = false;
        loop {
            let (running, stats) = influx
                .live_each_and_stats(name, &made)
                .await
                .map_err(Self::influx_err(phase))?;
            let live = running.iter().filter(|r| **r).count();
            polls += 1;
            if live < made.len() && Instant::now() >= remake_at && Instant::now() < deadline {
                // InfluxDB 1.x's subscriber service can miss a change made right after
                // another (it asks for the next change only once the last one is taken
                // up), and a subscription it missed starts only with the next change of
                // its metadata. Those not live yet are dropped and made again: changes of
                // their own. One that started between this read and its DROP would leave
                // a gap in its deliveries: the caller knows, by `remade`.
                let unseen: Vec<(String, String)> = made
                    .iter()
                    .zip(&running)
                    .filter(|(_, r)| !**r)
                    .map(|(sub, _)| sub.clone())
                    .collect();
                tracing::warn!(
                    on_source,
                    unseen = ?unseen,
                    after_ms = made_at.elapsed().as_millis() as u64,
                    "subscriptions not live yet: made again (InfluxDB can miss a subscription made right after another)"
                );
                for (db, rp) in &unseen {
                    drop_subscription_if_any(&influx, phase, name, db, rp).await?;
                    create_subscription(&influx, phase, name, db, rp, destination, false).await?;
                }
                remade = true;
                remake_at = Instant::now() + remake_after(self.cfg.capture.live_timeout);
                continue;
            }
            if live == made.len() {
                tracing::debug!(
                    on_source,
                    statements_ms = (made_at - based_at).as_secs_f64() * 1e3,
                    live_ms = made_at.elapsed().as_secs_f64() * 1e3,
                    polls,
                    "subscriptions live"
                );
                if on_source {
                    self.capture_live = Some(stats);
                }
                return Ok((made.len(), remade));
            }
            if Instant::now() > deadline {
                return Err(MigrateError::Failed {
                    phase,
                    msg: format!(
                        "{}: only {live} of {} subscriptions became live within {:?}",
                        influx.url(),
                        made.len(),
                        self.cfg.capture.live_timeout
                    ),
                });
            }
            // Often at first: the drain's proof wants the window short (see `capture`).
            let pause = if made_at.elapsed() < Duration::from_millis(100) {
                2
            } else {
                20
            };
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    /// Whether the source, once the capture's subscriptions are live, was seen writing
    /// nothing: no HTTP write being served and no shard write begun and not ended
    /// ([`crate::influx::InFlight`]), read up to [`IN_FLIGHT_TRIES`] times,
    /// [`IN_FLIGHT_PAUSE`] apart. Then no write can be missing from both the dump and the
    /// capture: one dispatched to the subscriptions before they were live had begun its
    /// shard writes before (InfluxDB starts them first) and, seen ended, was in its shard
    /// before the dump began. Verification proves a measurement by its files only then
    /// ([`Self::read_back`]); its aggregates never needed it (they read what the source
    /// holds). `Err` says why not.
    async fn no_write_in_flight(&self, p: Phase) -> Result<(), String> {
        let mut last = None;
        for _ in 0..IN_FLIGHT_TRIES {
            match self.src().influx.writes_in_flight().await {
                Ok(None) => {
                    return Err(
                        "the source does not report its writes in flight (httpd writeReqActive)"
                            .into(),
                    )
                }
                Ok(Some(w)) if w.http == 0 && w.shards == 0 => return Ok(()),
                Ok(Some(w)) => {
                    last = Some(w);
                    tokio::time::sleep(IN_FLIGHT_PAUSE).await;
                }
                Err(e) => {
                    tracing::warn!(phase = %p, error = %e, "cannot read the source's writes in flight");
                    return Err(format!(
                        "the source's writes in flight could not be read ({e})"
                    ));
                }
            }
        }
        let w = last.unwrap_or(crate::influx::InFlight { http: 0, shards: 0 });
        Err(format!(
            "the source was writing whenever it was asked once the capture was live ({} reads {} ms apart; last: {} HTTP writes, {} shard writes in flight)",
            IN_FLIGHT_TRIES,
            IN_FLIGHT_PAUSE.as_millis(),
            w.http,
            w.shards
        ))
    }

    /// Forwarding counters from the source's `/debug/vars`.
    pub(super) async fn subscriber_stats(
        influx: &Influx,
        name: &str,
        phase: Phase,
    ) -> Result<SubStats, MigrateError> {
        influx
            .subscriber_stats(name)
            .await
            .map_err(Self::influx_err(phase))
    }

    /// Fail if the source reports forwarded writes that did not reach the receiver, or
    /// any forwarding drop since the capture started (drops are counted server-wide, so a
    /// drop for another subscriber also stops the migration: safe, not silent).
    pub(super) async fn check_capture_complete(
        &self,
        phase: Phase,
    ) -> Result<SubStats, MigrateError> {
        let st = Self::subscriber_stats(&self.src().influx, &sub_name(&self.id), phase).await?;
        if self.source_started.is_some() && st.started != self.source_started {
            // A restart loses the forwarding queue (writes acknowledged but not yet
            // forwarded) and zeroes the counters that would have shown it.
            return Err(MigrateError::Failed {
                phase,
                msg: format!(
                    "the source InfluxDB restarted during the capture (it had started at {}, now at {}): writes it acknowledged but had not forwarded yet are not in the capture, and its forwarding counters were reset",
                    self.source_started.as_deref().unwrap_or("?"),
                    st.started.as_deref().unwrap_or("?")
                ),
            });
        }
        let base = &self.drops_base;
        let dropped = st.dropped.saturating_sub(base.dropped);
        let lost = st.failed + dropped;
        if lost > 0 {
            tracing::warn!(
                ours_failed = st.failed,
                dropped,
                queue_drops = st.queue_drops,
                queue_drops_at_base = base.queue_drops,
                service_failures = st.service_failures,
                service_failures_at_base = base.service_failures,
                listed_failures = st.listed_failures,
                listed_failures_at_base = base.listed_failures,
                others = ?st.others,
                others_at_base = ?base.others,
                "the source's forwarding counters do not prove the capture complete"
            );
            self.progress.capture_lost(lost);
            return Err(MigrateError::Failed {
                phase,
                msg: lost_message(base, &st),
            });
        }
        Ok(st)
    }

    /// Whether the source's counters prove that every point that entered it since the
    /// capture started has reached the receiver: our subscriptions' counters (checked
    /// complete) read first, the points writer's entry count (`pointReq`) read after, and
    /// [`drained`] decides. When it cannot prove it (points entered outside the capture)
    /// the caller falls back on time. Proven: the first read, whose HTTP write count holds
    /// only points that entered before the second read, all of them received.
    pub(super) async fn drain_proven(&self, phase: Phase) -> Result<Drain, MigrateError> {
        let Some(base) = &self.capture_base else {
            self.check_capture_complete(phase).await?;
            return Ok(Drain::NoBase);
        };
        let first = self.check_capture_complete(phase).await?;
        let second = Self::subscriber_stats(&self.src().influx, &sub_name(&self.id), phase).await?;
        // What InfluxDB counts as delivered our receiver has spooled and counted: it
        // answers only then.
        if drained(base, &first, &second) {
            Ok(Drain::Proven(first))
        } else {
            Ok(Drain::Unproven {
                entered: second.entered.saturating_sub(base.entered),
                delivered: first.written,
            })
        }
    }

    /// After a crash past the repoint: with the new capture live, let each interrupted
    /// capture's subscription settle, then require that it delivered exactly what its
    /// spool holds and failed nothing. Then those subscriptions go.
    pub(super) async fn check_interrupted(&mut self) -> Result<(), MigrateError> {
        let p = Phase::Capture;
        let earlier = self
            .resume
            .as_ref()
            .map(|r| r.earlier.clone())
            .unwrap_or_default();
        let src = self.src().influx.clone();
        let live: std::collections::BTreeSet<String> = src
            .subscriptions()
            .await
            .map_err(Self::influx_err(p))?
            .into_iter()
            .map(|s| s.name)
            .collect();
        for c in earlier.iter().filter(|c| live.contains(&c.subscription)) {
            self.check_one_interrupted(&c.subscription, c.spooled_points)
                .await?;
        }
        Ok(())
    }

    /// A resumed run, before its capture's base: the interrupted captures' subscriptions
    /// on the source's statistics ([`MONITOR_DB`]) have failed every delivery since their
    /// receiver went, and go on (the statistics keep coming). They carry no writer's
    /// point, so they go first, until the server runs none ([`drop_until_stopped`]: a
    /// DROP it missed ran on silently before). Dropped, InfluxDB forgets their counters but keeps their
    /// failures in its service-wide count, and delivers what they had queued, failing
    /// it too: the base is read once that count has not moved for 500 ms (10 s at
    /// most), so that none of it is taken for this capture's drops. One that fails
    /// later still is, and stops the migration: safe, not silent. (Adding their last
    /// count to the base instead missed the failures after it, and, with a DROP that
    /// failed, hid as many real drops: found by review.)
    async fn drop_interrupted_statistics(&self, p: Phase) -> Result<(), MigrateError> {
        let names: Vec<&str> = self
            .resume
            .iter()
            .flat_map(|r| r.earlier.iter().map(|c| c.subscription.as_str()))
            .collect();
        let src = self.src().influx.clone();
        let subs = src.subscriptions().await.map_err(Self::influx_err(p))?;
        let gone = by_name(
            subs.into_iter()
                .filter(|s| s.database == MONITOR_DB && names.contains(&s.name.as_str())),
        );
        if gone.is_empty() {
            return Ok(());
        }
        let within = self.cfg.capture.live_timeout;
        for (name, subs) in &gone {
            let left = drop_until_stopped(&src, p, true, name, subs, within).await;
            if !left.is_empty() {
                // Its failures would be taken for this capture's drops: the migration
                // stops on them, safe but needless.
                tracing::warn!(
                    subscription = name,
                    "an interrupted capture's subscriptions on the source's statistics: {}; their failed forwards may be counted against this capture",
                    left.describe()
                );
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = None;
        let mut stable_since = Instant::now();
        while Instant::now() < deadline {
            let mut live = 0;
            for (name, subs) in &gone {
                live += src
                    .live_subscriptions(name, subs)
                    .await
                    .map_err(Self::influx_err(p))?;
            }
            let failures = Self::subscriber_stats(&src, "", p).await?.service_failures;
            if live > 0 || last != Some(failures) {
                stable_since = Instant::now();
            }
            last = Some(failures);
            if stable_since.elapsed() >= Duration::from_millis(500) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tracing::info!(
            subscriptions = gone.iter().map(|(_, subs)| subs.len()).sum::<usize>(),
            "the interrupted captures' subscriptions on the source's statistics were dropped before this capture's base"
        );
        Ok(())
    }

    async fn check_one_interrupted(&mut self, old: &str, spooled: u64) -> Result<(), MigrateError> {
        let p = Phase::Capture;
        let src = self.src().influx.clone();
        let mut last = Self::subscriber_stats(&src, old, p).await?;
        let mut stable_since = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(30);
        // A failure counted is final (counters only grow): the verdict is in, and with
        // writers still on the source the counts would never settle (it waited the whole
        // 30 s for that, found by a test of a kill while repointing).
        while last.failed == 0
            && stable_since.elapsed() < Duration::from_millis(500)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = Self::subscriber_stats(&src, old, p).await?;
            if (now.written, now.failed) != (last.written, last.failed) {
                stable_since = Instant::now();
            }
            last = now;
        }
        let settled = stable_since.elapsed() >= Duration::from_millis(500);
        // Its receivers are gone: whatever still runs fails every forward.
        let within = self.cfg.capture.live_timeout;
        let dst = self.dst().influx.clone();
        for (influx, on_source) in [(&src, true), (&dst, false)] {
            let subs = influx.subscriptions().await.map_err(Self::influx_err(p))?;
            let theirs = subs.into_iter().filter(|s| {
                if on_source {
                    s.name == old
                } else {
                    s.name.starts_with(old)
                }
            });
            for (name, on) in by_name(theirs) {
                let left = drop_until_stopped(influx, p, on_source, &name, &on, within).await;
                if !left.is_empty() {
                    tracing::warn!(
                        server = %influx.url(),
                        subscription = name,
                        "the interrupted capture's subscriptions: {}",
                        left.describe()
                    );
                }
            }
        }
        // Of the writers' writes only: the statistics' deliveries are not compared.
        let written = last.written.saturating_sub(last.monitor_written);
        if last.failed > 0 || written != spooled {
            self.progress
                .capture_lost((last.failed + written.saturating_sub(spooled)).max(1));
            return Err(MigrateError::Failed {
                phase: p,
                msg: format!(
                    "{}{} write(s) reached the source while the capture was down (the interrupted capture {old} forwarded {} points, its spool holds {spooled}); they are on the source but not on the target",
                    if settled || last.failed == 0 {
                        ""
                    } else {
                        "at least "
                    },
                    last.failed,
                    written
                ),
            });
        }
        Ok(())
    }
}

/// How many times the capture makes its subscriptions at most, while writes keep
/// entering the source in the few milliseconds that takes (see `capture`).
const CAPTURE_ATTEMPTS: u32 = 3;

/// Points that entered the source between the base read and the answer that showed the
/// subscriptions live; 0 when either is missing.
fn entered_while_subscribing(base: Option<&SubStats>, live: Option<&SubStats>) -> u64 {
    match (base, live) {
        (Some(b), Some(l)) => l.entered.saturating_sub(b.entered),
        _ => 0,
    }
}

/// The counters forwarding drops are counted from once the capture's subscriptions are
/// live: `live` (the answer that first showed them all live) when the source, read
/// after it, was seen writing nothing (`quiet`) and had not restarted; `None` keeps
/// `base`. A drop or failed forward counted by `live` concerns a write request the
/// points writer had handed on by then. InfluxDB starts a request's shard writes before
/// it hands the request on, and answers an HTTP write only once they end: a later read
/// that finds no HTTP write served and no shard write under way finds every such write
/// in its shards, and so in the dump, which begins after it. Those drops lose nothing;
/// what is counted after `live` still stops the migration.
fn drops_base_once_live<'s>(
    base: &SubStats,
    live: Option<&'s SubStats>,
    quiet: bool,
) -> Option<&'s SubStats> {
    live.filter(|l| quiet && l.started == base.started && l.dropped > base.dropped)
}

/// Why the counters `st` do not prove the capture complete since `base`: our
/// subscriptions' failed deliveries, and the source's forwarding drops split by where
/// InfluxDB counted them.
fn lost_message(base: &SubStats, st: &SubStats) -> String {
    let dropped = st.dropped.saturating_sub(base.dropped);
    let queue = st.queue_drops.saturating_sub(base.queue_drops).min(dropped);
    let unlisted = dropped - queue;
    // Other subscriptions with failures since the base: what may have filled a queue.
    let others: Vec<String> = st
        .others
        .iter()
        .filter_map(|(n, f)| {
            let since = f.saturating_sub(base.others.get(n).copied().unwrap_or(0));
            (since > 0).then(|| format!("{n} ({since} failed)"))
        })
        .collect();
    let others = if others.is_empty() {
        "none".to_string()
    } else {
        others.join(", ")
    };
    format!(
        "the source may have failed to forward {} captured writes to the capture receiver: {} deliveries of our subscriptions failed (the receiver refused them or did not answer within the source's [subscriber] http-timeout); since the capture's base the source could not hand {queue} write requests to its subscriber service (its queue was full), and counted {unlisted} failed forwards that no subscription it lists shows (a subscription's full queue, [subscriber] write-buffer-size, or the failed deliveries of a subscription dropped meanwhile, whose own counters InfluxDB forgets; other subscriptions failing meanwhile: {others}); the capture cannot be proven complete",
        st.failed + dropped,
        st.failed
    )
}

/// `url` with its port replaced (or added): `http://h:1/x` + 9 → `http://h:9/x`.
pub(super) fn with_port(url: &str, port: u16) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    let (authority, path) = rest
        .find('/')
        .map(|i| rest.split_at(i))
        .unwrap_or((rest, ""));
    let host = match authority.rsplit_once(':') {
        Some((h, p))
            if !h.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && !authority.ends_with(']') =>
        {
            h
        }
        _ => authority,
    };
    format!("{scheme}://{host}:{port}{path}")
}

/// The watch receiver's port: the capture's plus one, or any free port when the capture's
/// is 0 (or the last one).
pub(super) fn watch_port(capture: u16) -> u16 {
    match capture {
        0 => 0,
        p => p.checked_add(1).unwrap_or(0),
    }
}

/// How long subscriptions may take to go live (or, dropped, to stop) before the server
/// is given a change of their own again: 2 s, far above the few milliseconds they take,
/// so that a busy server is not given more changes to take up; a third of
/// `capture.live_timeout` when that is shorter, so that there is time for it.
fn remake_after(live_timeout: Duration) -> Duration {
    Duration::from_secs(2).min(live_timeout / 3)
}

/// Fault injection: whether `fault` is in `STATESHIFT_FAULT` and has not struck yet on
/// this side (source or target) in this process.
fn fault_once(fault: &str, on_source: bool) -> bool {
    use std::sync::Mutex;
    static STRUCK: Mutex<Vec<(String, bool)>> = Mutex::new(Vec::new());
    if !crate::util::fault_injected(fault) {
        return false;
    }
    let mut struck = STRUCK.lock().unwrap_or_else(|e| e.into_inner());
    let key = (fault.to_string(), on_source);
    if struck.contains(&key) {
        return false;
    }
    struck.push(key);
    true
}

/// Subscriptions grouped by name: each name with the `(database, retention policy)`
/// pairs it is on, in the order first seen.
pub(super) fn by_name(
    subs: impl IntoIterator<Item = crate::influx::Subscription>,
) -> Vec<(String, Vec<(String, String)>)> {
    let mut out: Vec<(String, Vec<(String, String)>)> = Vec::new();
    for s in subs {
        let on = (s.database, s.retention_policy);
        match out.iter_mut().find(|(n, _)| *n == s.name) {
            Some((_, ons)) => ons.push(on),
            None => out.push((s.name, vec![on])),
        }
    }
    out
}

/// What [`drop_until_stopped`] could not do.
#[derive(Debug, Default)]
pub(super) struct NotStopped {
    /// Dropped, and still running at the end.
    pub running: Vec<(String, String)>,
    /// How long after the DROPs the end was.
    pub waited: Duration,
    /// Those whose DROP failed, with the server's answer: maybe still in its metadata.
    pub failed: Vec<((String, String), String)>,
}

impl NotStopped {
    pub fn is_empty(&self) -> bool {
        self.running.is_empty() && self.failed.is_empty()
    }

    /// Every subscription concerned, the failed first.
    pub fn subscriptions(&self) -> Vec<(String, String)> {
        let failed = self.failed.iter().map(|(sub, _)| sub.clone());
        failed.chain(self.running.iter().cloned()).collect()
    }

    /// For an error or a warning: which, and why.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.running.is_empty() {
            parts.push(format!(
                "{} still running {} after their DROP ({})",
                self.running.len(),
                humantime::format_duration(Duration::from_millis(self.waited.as_millis() as u64)),
                on_list(&self.running)
            ));
        }
        for ((db, rp), why) in &self.failed {
            parts.push(format!("the DROP on {db}.{rp} failed: {why}"));
        }
        parts.join("; ")
    }
}

fn on_list(subs: &[(String, String)]) -> String {
    subs.iter()
        .map(|(db, rp)| format!("{db}.{rp}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Drop the subscriptions `name` on each `(database, retention policy)` of `subs` and
/// wait, `within` at most, until the server runs none of them. InfluxDB 1.x can miss a
/// DROP made right after another change of its metadata (the race `subscribe` meets),
/// and the subscription then runs on until the next change, forwarding every write to a
/// receiver that is about to stop: each one a failed forward, counted as a forwarding
/// drop against the next capture on that server. One still running after
/// [`remake_after`] is made again with the destination it had (the server keeps the
/// writer it runs: nothing new starts) and dropped: a change of its own for the server
/// to take up. A DROP that fails does not stop the others. What could not be done is
/// returned, for the caller to fail on or to say.
pub(super) async fn drop_until_stopped(
    influx: &Influx,
    phase: Phase,
    on_source: bool,
    name: &str,
    subs: &[(String, String)],
    within: Duration,
) -> NotStopped {
    let mut out = NotStopped::default();
    if subs.is_empty() {
        return out;
    }
    // Their destinations, read before they go (the metadata forgets them with the DROP);
    // unread, no nudge is possible, and the DROPs go all the same.
    let destinations: Vec<((String, String), Secret)> = match influx.subscriptions().await {
        Ok(all) => all
            .into_iter()
            .filter(|s| s.name == name)
            .filter_map(|s| {
                let d = s.destinations.into_iter().next()?;
                Some(((s.database, s.retention_policy), Secret::new(d)))
            })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, server = %influx.url(), "cannot read the subscriptions before dropping ours: one the server misses cannot be made again");
            Vec::new()
        }
    };
    // Fault injection (`STATESHIFT_FAULT=drop_unseen`): the last DROP of the first such
    // round on each side is left out, as if the server had missed it (it runs on, below).
    // Only ours on their own side: the capture's on the source, the watch (`_t`) on the
    // target, not the copies a portable restore carries over (found by review: they
    // took the target's turn before the disposal's).
    let eligible = on_source != name.ends_with("_t");
    let unseen = (eligible && fault_once("drop_unseen", on_source))
        .then(|| subs.last().cloned())
        .flatten();
    let mut dropped = Vec::new();
    // A server that does not answer a DROP is not asked the rest: each would wait the
    // whole request timeout (found by review: a rollback on a hung server took minutes).
    let mut unanswered: Option<String> = None;
    for (db, rp) in subs {
        let sub = (db.clone(), rp.clone());
        if let Some(why) = &unanswered {
            out.failed.push((sub, format!("not sent: {why}")));
            continue;
        }
        if unseen.as_ref() == Some(&sub) {
            tracing::warn!(
                db,
                rp,
                on_source,
                "STATESHIFT_FAULT=drop_unseen: not dropped in the first round"
            );
        } else if let Err(e) = drop_subscription_if_any(influx, phase, name, db, rp).await {
            if !matches!(
                e,
                MigrateError::Influx {
                    source: crate::influx::InfluxError::Query { .. },
                    ..
                }
            ) {
                unanswered = Some(format!("an earlier DROP got no answer ({e})"));
            }
            out.failed.push((sub, e.to_string()));
            continue;
        }
        dropped.push(sub);
    }
    let dropped_at = Instant::now();
    if dropped.is_empty() {
        return out;
    }
    let deadline = dropped_at + within;
    let mut nudge_at = dropped_at + remake_after(within);
    loop {
        let running = match influx.live_each(name, &dropped).await {
            Ok(r) => r,
            Err(e) => {
                out.waited = dropped_at.elapsed();
                // Whether they stopped is not known: said as not stopped.
                out.failed.extend(
                    dropped
                        .into_iter()
                        .map(|sub| (sub, format!("cannot read whether it stopped: {e}"))),
                );
                return out;
            }
        };
        let still: Vec<(String, String)> = dropped
            .iter()
            .zip(&running)
            .filter(|(_, r)| **r)
            .map(|(sub, _)| sub.clone())
            .collect();
        let now = Instant::now();
        if still.is_empty() || now >= deadline {
            out.running = still;
            out.waited = dropped_at.elapsed();
            return out;
        }
        // One whose destination is not known cannot be made as it was: only the
        // server's next change of metadata ends it (or a DROP slow to take effect),
        // and the wait goes on to the deadline.
        let known: Vec<&(String, String)> = still
            .iter()
            .filter(|sub| destinations.iter().any(|(s, _)| s == *sub))
            .collect();
        if now >= nudge_at && !known.is_empty() {
            tracing::warn!(
                on_source,
                still = %on_list(&still),
                after_ms = dropped_at.elapsed().as_millis() as u64,
                "dropped subscriptions still running: made and dropped again (InfluxDB can miss a change made right after another)"
            );
            for sub in known {
                let (db, rp) = sub;
                let Some((_, d)) = destinations.iter().find(|(s, _)| s == sub) else {
                    continue;
                };
                if let Err(e) = create_subscription(influx, phase, name, db, rp, d, true).await {
                    out.failed.push((sub.clone(), e.to_string()));
                    continue;
                }
                // Made again, it is in the metadata: a DROP that fails is tried once more.
                let mut again = drop_subscription_if_any(influx, phase, name, db, rp).await;
                if again.is_err() {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    again = drop_subscription_if_any(influx, phase, name, db, rp).await;
                }
                if let Err(e) = again {
                    out.failed.push((sub.clone(), e.to_string()));
                }
            }
            dropped.retain(|sub| !out.failed.iter().any(|(f, _)| f == sub));
            nudge_at = Instant::now() + remake_after(within);
            continue;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Drop every subscription the migration `id` left on one server (`stateshift_<id>`,
/// the watch `stateshift_<id>_t`, those of its resumed runs) and wait until the server
/// runs none of them ([`drop_until_stopped`], `within` at most for each name): the crash
/// recovery's sweep, which finds them by name since a killed process recorded nothing
/// it can trust. What could not be done is returned, said, for the caller to warn about.
pub async fn drop_leftover_subscriptions(
    influx: &Influx,
    phase: Phase,
    on_source: bool,
    id: &str,
    within: Duration,
) -> Result<(), String> {
    let prefix = format!("stateshift_{id}");
    let subs = influx
        .subscriptions()
        .await
        .map_err(|e| format!("cannot list the subscriptions on {}: {e}", influx.url()))?;
    let mut left = Vec::new();
    for (name, on) in by_name(subs.into_iter().filter(|s| s.name.starts_with(&prefix))) {
        let not = drop_until_stopped(influx, phase, on_source, &name, &on, within).await;
        if !not.is_empty() {
            left.push(format!("{name}: {}", not.describe()));
        }
    }
    if left.is_empty() {
        Ok(())
    } else {
        Err(left.join("; "))
    }
}

/// `DROP SUBSCRIPTION name ON db.rp`; one already gone is not an error.
pub(super) async fn drop_subscription_if_any(
    influx: &Influx,
    phase: Phase,
    name: &str,
    db: &str,
    rp: &str,
) -> Result<(), MigrateError> {
    match influx.drop_subscription(name, db, rp).await {
        Ok(()) => Ok(()),
        // Gone, or gone with its database or retention policy.
        Err(crate::influx::InfluxError::Query { msg, .. })
            if msg == "subscription not found"
                || msg.starts_with("database not found")
                || msg.starts_with("retention policy not found") =>
        {
            Ok(())
        }
        Err(source) => Err(MigrateError::Influx { phase, source }),
    }
}

/// `CREATE SUBSCRIPTION name ON db.rp DESTINATIONS ALL destination`; with `exists_ok`,
/// one there already is not an error. The statement holds the receiver's secret: its
/// error does not echo it.
async fn create_subscription(
    influx: &Influx,
    phase: Phase,
    name: &str,
    db: &str,
    rp: &str,
    destination: &Secret,
    exists_ok: bool,
) -> Result<(), MigrateError> {
    let q = format!(
        "CREATE SUBSCRIPTION {} ON {}.{} DESTINATIONS ALL {}",
        ident(name),
        ident(db),
        ident(rp),
        literal(destination.expose())
    );
    match influx.query(None, &q).await {
        Ok(_) => Ok(()),
        Err(crate::influx::InfluxError::Query { msg, .. })
            if exists_ok && msg == "subscription already exists" =>
        {
            Ok(())
        }
        Err(e) => Err(MigrateError::Failed {
            phase,
            msg: format!(
                "{}: cannot create subscription {name} on {db}.{rp}: {}",
                influx.url(),
                e.to_string().replace(destination.expose(), "***")
            ),
        }),
    }
}

#[cfg(test)]
mod watch_port_tests {
    #[test]
    fn the_watch_receiver_listens_one_port_above_the_capture_or_anywhere() {
        assert_eq!(super::watch_port(8899), 8900);
        assert_eq!(super::watch_port(0), 0);
        assert_eq!(super::watch_port(u16::MAX), 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(started: &str, queue_drops: u64, service: u64, listed: u64) -> SubStats {
        SubStats {
            started: Some(started.into()),
            queue_drops,
            service_failures: service,
            listed_failures: listed,
            dropped: queue_drops + service.saturating_sub(listed),
            ..Default::default()
        }
    }

    #[test]
    fn drops_counted_while_the_subscriptions_were_made_count_only_if_a_write_was_under_way() {
        let base = counters("t0", 1, 5, 5);
        // 57 drops by the time the subscriptions were live, then nothing being written.
        let live = counters("t0", 58, 5, 5);
        assert_eq!(
            drops_base_once_live(&base, Some(&live), true).map(|l| l.dropped),
            Some(58)
        );
        // A write still under way might have been dropped and not be in the dump yet.
        assert!(drops_base_once_live(&base, Some(&live), false).is_none());
        // A restart zeroes the counters: nothing to re-base on.
        assert!(drops_base_once_live(&base, Some(&counters("t1", 58, 5, 5)), true).is_none());
        // Nothing dropped meanwhile, or no answer read when they went live.
        assert!(drops_base_once_live(&base, Some(&base), true).is_none());
        assert!(drops_base_once_live(&base, None, true).is_none());
    }

    #[test]
    fn a_capture_not_proven_complete_says_where_the_source_counted_each_loss() {
        let base = counters("t0", 1, 5, 5);
        let mut base = base;
        base.others = [("cq_export".into(), 1), ("kapacitor".into(), 2)].into();
        let mut now = counters("t0", 3, 12, 6);
        now.failed = 1;
        now.others = [("cq_export".into(), 5), ("kapacitor".into(), 2)].into();
        let msg = lost_message(&base, &now);
        // 1 of ours + 2 queue drops + (12 - 6 - 0 at base) unlisted = 9.
        assert!(msg.contains("failed to forward 9 captured writes"), "{msg}");
        assert!(
            msg.contains("1 deliveries of our subscriptions failed"),
            "{msg}"
        );
        assert!(msg.contains("could not hand 2 write requests"), "{msg}");
        assert!(msg.contains("counted 6 failed forwards"), "{msg}");
        // Only what failed since the base, and only those that failed.
        assert!(
            msg.contains("failing meanwhile: cq_export (4 failed))"),
            "{msg}"
        );
    }

    #[test]
    fn with_port_replaces_or_adds_the_port_and_keeps_the_rest() {
        assert_eq!(
            with_port("http://10.0.0.2:8899", 40000),
            "http://10.0.0.2:40000"
        );
        assert_eq!(
            with_port("http://so.example", 40000),
            "http://so.example:40000"
        );
        assert_eq!(with_port("https://[::1]:80/x", 9), "https://[::1]:9/x");
        assert_eq!(with_port("http://[::1]", 9), "http://[::1]:9");
    }
}

/// Reads of the source's writes in flight after the capture went live, and the pause
/// between them: a writer at 1,000 points/s in requests of a few ms leaves the source
/// idle most of the time.
const IN_FLIGHT_TRIES: u32 = 50;
const IN_FLIGHT_PAUSE: Duration = Duration::from_millis(10);
