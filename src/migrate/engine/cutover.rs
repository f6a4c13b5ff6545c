//! Cutover: watch the target, record the repoint, run the cutover command (bounded on
//! the writers' host), then replay until every point the source forwarded is on the
//! target and either its counters prove nothing more is on the way (with
//! `cutover.synchronous`) or it has gone quiet.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::capture::Drain;
use super::context::{sub_name, Migration};
use super::priority::End;
use super::{describe_steps, MigrateError, Phase, Steps};
use crate::migrate::capture::{KeySet, Receiver, Sink};
use crate::remote::{Host, Remote, RemoteError};
use crate::util::shell_quote;

impl Migration<'_> {
    /// The point of no return for an abort: from here on it is refused. An abort accepted
    /// just before stops the cutover here, before anything is recorded or run.
    fn close_abort(&self, p: Phase) -> Result<(), MigrateError> {
        self.abort
            .close()
            .map_err(|by| MigrateError::Aborted { phase: p, by })
    }

    /// The cutover, its steps timed into the report and a note, whether it succeeds or
    /// not: a cutover that fails or takes long is the one whose time must be told.
    pub(super) async fn cutover(&mut self) -> Result<(), MigrateError> {
        let mut steps = Steps::start();
        let r = self.cutover_steps(&mut steps).await;
        if r.is_err() {
            steps.done("until the failure");
        }
        let steps = steps.into_vec();
        self.progress
            .note(&format!("cutover steps: {}", describe_steps(&steps)));
        self.report.cutover_steps = steps;
        r
    }

    async fn cutover_steps(&mut self, steps: &mut Steps) -> Result<(), MigrateError> {
        let p = Phase::Cutover;
        // The target gets its priority back before any writer uses it (started with the
        // delta, or after the target's aggregates below; awaited before the repoint).
        if !self.cfg.verify.target_first {
            self.raise_priority(End::Target);
        }
        // Catch up once more so the lag at the switch is as small as possible.
        self.replay_now(p).await?;
        self.check_capture_complete(p).await?;
        steps.done("catch-up");
        // Watch the target from now on: a writer's overwrite there after cutover may
        // legitimately differ from the source's old value. The watch receiver listens on
        // the capture address, one port above the capture's (a free port when the
        // capture's is 0): a firewall between the VMs and the orchestrator must let the
        // target reach it (found on the lab: a random port was dropped by the SO's
        // security group, the target's forwards hung until InfluxDB's http-timeout).
        let touched = Arc::new(Mutex::new(KeySet::with_cap(5_000_000)));
        let listener = match self.watch_listener.take() {
            Some(l) => l,
            None => Self::bind_watch(self.cfg, p).await?,
        };
        let tauth = Self::receiver_auth(p)?;
        let tr =
            Receiver::start_on(listener, Sink::Keys(touched.clone()), &tauth).map_err(|e| {
                MigrateError::Failed {
                    phase: p,
                    msg: e.to_string(),
                }
            })?;
        let turl = tauth.in_url(&self.advertise(tr.addr));
        self.touched = Some(touched);
        self.touched_receiver = Some(tr);
        // A watch subscription made again (`remade`) has no order to keep: nothing
        // writes to the target before the repoint.
        self.subscribe(p, false, &format!("{}_t", sub_name(&self.id)), &turl)
            .await?;
        steps.done("watch subscription");
        // What nothing can change on the source any more is compared from now on, through
        // the command and the drain; whatever a writer touches meanwhile is
        // compared again after them. With verify.target_first, the target's side is read
        // now, while no writer uses it, and the source's once the writers have left it.
        // The writers' host is connected to meanwhile: on slow VMs both take seconds (the
        // lab: 6.5 s for the aggregates, 8-10 s for the SSH connection between two TCG
        // guests), neither needs the other, and the writers stay on the source until the
        // command, which still follows a catch-up.
        let mut connected = None;
        if self.cfg.verify.target_first {
            let cfg = self.cfg;
            let connect = async move {
                if cfg.cutover.command.is_some() {
                    Some(Host::connect(cfg.cutover.ssh.as_ref()).await)
                } else {
                    None
                }
            };
            // The target's priority is raised as soon as its aggregates are read, not
            // once the connection is up too.
            let read = async {
                let first = self.read_target_first().await;
                self.raise_priority(End::Target);
                (first, Instant::now())
            };
            let ((first, read), host) = tokio::join!(read, connect);
            connected = host;
            self.early_first = Some(first);
            steps.done_at("target's aggregates", read);
        } else {
            self.start_early_verify(Default::default()).await;
            steps.done("early verification started");
        }

        if let Some(cmd) = &self.cfg.cutover.command {
            let cmd = cmd.replace("{target_url}", &shell_quote(&self.dst().cfg.influx_url));
            let host = match connected {
                Some(host) => host,
                None => Host::connect(self.cfg.cutover.ssh.as_ref()).await,
            }
            .map_err(Self::remote_err(p))?;
            // With verify.target_first, what the connection took beyond the aggregates.
            steps.done("connect to the writers' host");
            self.priority_settled(End::Target).await;
            steps.done("target's priority");
            // Caught up right before the command: a captured write replayed after it could
            // land over a writer's newer write of the same point on the target (the switch
            // window). The reads above (the target's aggregates) take seconds on a large
            // database, during which the writers go on writing to the source.
            self.replay_now(p).await?;
            steps.done("catch-up before the command");
            // Recorded first: the command must never run unrecorded.
            self.close_abort(p)?;
            self.journal
                .writers_repointing()
                .map_err(|msg| MigrateError::Failed { phase: p, msg })?;
            steps.done("repoint recorded");
            // From here on some writers may already write to the target: a failure must
            // not roll the target back (it may hold acknowledged writes).
            self.report.cutover_done = true;
            // Bounded on the writers' host itself: closing an SSH channel does not stop a
            // command there, so a command that outlives its timeout would go on repointing
            // writers while this migration reports it failed. `timeout` kills its whole
            // process group; the local bound is a backstop should the host stop answering.
            let limit = self.cfg.cutover.timeout;
            let bounded = format!(
                "timeout -k 5 {}s sh -c {}",
                limit.as_secs_f64(),
                shell_quote(&cmd)
            );
            let r = tokio::time::timeout(limit + Duration::from_secs(10), host.run(&bounded)).await;
            match r {
                Ok(Ok(out)) => {
                    steps.done("command");
                    // Replay at once what arrived during the command, so what a crash right
                    // now would leave unreplayed is as little as possible.
                    self.replay_now(p).await?;
                    steps.done("catch-up after the command");
                    self.journal.writers_repointed();
                    let said = match out.trim() {
                        "" => String::new(),
                        o => format!(" ({o})"),
                    };
                    self.progress.note(&format!(
                        "writers repointed to {}{said}",
                        self.dst().cfg.influx_url
                    ))
                }
                // 124: `timeout` stopped it; 137: it had to be killed.
                Ok(Err(RemoteError::Failed {
                    code: Some(124 | 137),
                    ..
                })) => {
                    return Err(MigrateError::Failed {
                        phase: p,
                        msg: format!(
                            "cutover command did not finish within {:?} (cutover.timeout) and was stopped on {}",
                            limit,
                            host.describe()
                        ),
                    })
                }
                Ok(Err(e)) => {
                    return Err(MigrateError::Remote {
                        phase: p,
                        source: e,
                    })
                }
                Err(_) => {
                    return Err(MigrateError::Failed {
                        phase: p,
                        msg: format!(
                            "cutover command did not finish within {:?} (cutover.timeout) and {} stopped answering; it may still be running there",
                            limit,
                            host.describe()
                        ),
                    })
                }
            }
        }
        if self.cfg.cutover.command.is_none() {
            // Writers follow by other means (DNS, a proxy): they may use the target now,
            // and there is no command to wait for.
            self.priority_settled(End::Target).await;
            steps.done("target's priority");
            self.replay_now(p).await?;
            steps.done("catch-up before the repoint");
            self.close_abort(p)?;
            self.journal
                .writers_repointing()
                .map_err(|msg| MigrateError::Failed { phase: p, msg })?;
            self.journal.writers_repointed();
            steps.done("repoint recorded");
        }
        self.report.cutover_done = true;
        if let Some(first) = self.early_first.take() {
            self.start_early_verify(first).await;
            steps.done("early verification started");
        }
        // Keep replaying until every point the source took has reached the receiver, and
        // either the command promised no writer will write there again and the source's
        // counters prove it (cutover.synchronous), or it has been quiet for the grace period.
        let mut proof = self.cfg.cutover.synchronous && self.cfg.cutover.command.is_some();
        let mut unproven = None;
        let quiet = self.cfg.capture.quiet_period;
        let deadline = Instant::now() + self.cfg.capture.quiet_timeout;
        let stats = self
            .receiver
            .as_ref()
            .map(|r| r.stats.clone())
            .ok_or_else(|| MigrateError::Failed {
                phase: p,
                msg: "no receiver".into(),
            })?;
        let switched = Instant::now();
        loop {
            self.replay_now(p).await?;
            // Each try reads the source's counters twice; a source that never proves it
            // (points it takes outside the capture) is not asked for the whole quiet period.
            if proof && switched.elapsed() > Duration::from_secs(1) {
                proof = false;
            }
            if proof {
                match self.drain_proven(p).await? {
                    Drain::Proven(_) => {
                        // What was delivered by the proof's first read is in the spool.
                        self.replay_now(p).await?;
                        self.report.drain_proven = true;
                        break;
                    }
                    Drain::Unproven { entered, delivered } => {
                        unproven = Some(format!("within 1 s of the command; at the last try {entered} points had entered it since the capture began and {delivered} had been forwarded: points still queued there, or taken outside the capture (a database or retention policy it does not cover, a write refused there, or one that arrived while the capture's subscriptions were being made)"))
                    }
                    Drain::NoBase => {
                        proof = false;
                        unproven = Some("the capture did not start in this run".into())
                    }
                }
            }
            let last = stats.last_write().unwrap_or(switched).max(switched);
            if last.elapsed() >= quiet {
                let st = self.check_capture_complete(p).await?;
                let received = stats.points();
                let lag = self.reader.as_ref().map(|r| r.lag()).unwrap_or(0);
                if st.written == received && lag == 0 {
                    if let Some(why) = &unproven {
                        // Said once per migration, so an operator sees why this one
                        // waited.
                        self.progress.note(&format!("the source's counters did not prove the drain ({why}); ended it after capture.quiet_period instead"));
                    }
                    break;
                }
                tracing::debug!(
                    forwarded = st.written,
                    received,
                    "source quiet but forwarding not settled yet"
                );
            }
            if Instant::now() > deadline {
                return Err(MigrateError::Failed {
                    phase: p,
                    msg: format!("the source kept receiving writes for {:?} after cutover (capture.quiet_timeout); are all writers repointed?", self.cfg.capture.quiet_timeout),
                });
            }
            match self.reader.as_mut() {
                Some(r) => {
                    tokio::select! {
                        _ = r.wait_for_more() => {}
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
                None => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        steps.done("drain");
        // The source is quiet: what runs there from now on (verification) yields to the
        // target, which serves the writers.
        self.lower_priority(End::Source);
        self.report.points_captured = stats.writers_points();
        self.report.replay_points_per_second = if self.report.replay_seconds > 0.0 {
            self.report.points_replayed as f64 / self.report.replay_seconds
        } else {
            0.0
        };
        Ok(())
    }
}
