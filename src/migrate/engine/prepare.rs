//! Prepare: connect both sides and check, changing nothing, that the migration can run.

use std::collections::BTreeSet;
use std::time::Duration;

use super::context::{Migration, Side};
use super::{MigrateError, Phase};
use crate::config::InstanceConfig;
use crate::influx::Influx;
use crate::remote::{Host, Remote};

impl Migration<'_> {
    pub(super) async fn prepare(&mut self) -> Result<(), MigrateError> {
        let p = Phase::Prepare;
        let src_cfg = self.cfg.source.clone();
        let dst_cfg = self.target_cfg.clone();
        let src_influx = Influx::from_config(&src_cfg);
        let dst_influx = Influx::from_config(&dst_cfg);
        // SSH connects (hundreds of ms, longer to a booting VM) while InfluxDB is checked;
        // InfluxDB's answer is still the first error reported.
        let ssh = async {
            tokio::join!(
                Host::connect(src_cfg.ssh.as_ref()),
                Host::connect(dst_cfg.ssh.as_ref())
            )
        };
        let (checked, (sh, th)) = tokio::join!(self.check_influx(&src_influx, &dst_influx), ssh);
        let dbs = checked?;
        let sh = sh.map_err(Self::remote_err(p))?;
        let th = th.map_err(Self::remote_err(p))?;
        let space = async {
            if self.plan.resume {
                Ok(())
            } else {
                Self::check_target_space(&src_influx, &th, &dst_cfg).await
            }
        };
        let (src_cpus, dst_cpus, space) = tokio::join!(
            influxd_and_cpus(&sh, &src_cfg.name),
            influxd_and_cpus(&th, &dst_cfg.name),
            space
        );
        let cpus = [src_cpus?, dst_cpus?];
        space?;
        if let Some(c) = &self.cfg.cutover.command {
            if c.trim().is_empty() {
                return Err(MigrateError::Failed {
                    phase: p,
                    msg: "cutover.command is empty".into(),
                });
            }
        }
        self.report.databases = dbs;
        self.source = Some(Side {
            cfg: src_cfg,
            influx: src_influx,
            host: sh,
            cpus: cpus[0],
        });
        self.target = Some(Side {
            cfg: dst_cfg,
            influx: dst_influx,
            host: th,
            cpus: cpus[1],
        });
        Ok(())
    }

    /// Both servers answer, credentials work (a real query on each side), the target holds
    /// none of the source's databases (unless resuming), and every source user can be
    /// made on the target. The source's databases.
    async fn check_influx(
        &self,
        src_influx: &Influx,
        dst_influx: &Influx,
    ) -> Result<Vec<String>, MigrateError> {
        let p = Phase::Prepare;
        let (src_cfg, dst_cfg) = (&self.cfg.source, &self.target_cfg);
        let (a, b) = tokio::join!(src_influx.ping(), wait_ready(dst_influx, self.ready_wait));
        a.map_err(Self::influx_err(p))?;
        b?;
        // Authentication is checked by a real query on both sides.
        let dbs = src_influx.databases().await.map_err(Self::influx_err(p))?;
        let dst_dbs = dst_influx.databases().await.map_err(Self::influx_err(p))?;
        for db in dbs.iter().filter(|_| !self.plan.resume) {
            if dst_dbs.contains(db) {
                return Err(MigrateError::TargetNotEmpty {
                    target: dst_cfg.name.clone(),
                    db: db.clone(),
                });
            }
        }
        let users = src_influx.users().await.map_err(Self::influx_err(p))?;
        let dst_users: BTreeSet<String> = dst_influx
            .users()
            .await
            .map_err(Self::influx_err(p))?
            .into_iter()
            .map(|u| u.name)
            .collect();
        for u in &users {
            let known = self.cfg.migration.user_passwords.contains_key(&u.name)
                || (src_cfg.username.as_deref() == Some(&u.name) && src_cfg.password.is_some());
            if !dst_users.contains(&u.name) && !known {
                return Err(MigrateError::MissingPassword {
                    user: u.name.clone(),
                });
            }
        }
        Ok(dbs)
    }

    /// Refuse, before anything is made, a target whose scratch disk cannot hold the dump
    /// and the restored data (both about the size of the source's shards on disk).
    /// `influxd backup` hitting a full disk retries every shard for minutes before failing.
    pub(super) async fn check_target_space(
        src: &Influx,
        target: &Host,
        cfg: &InstanceConfig,
    ) -> Result<(), MigrateError> {
        let p = Phase::Prepare;
        let sizes = src.shard_disk_bytes().await.map_err(Self::influx_err(p))?;
        if sizes.is_empty() {
            tracing::warn!("the source reports no shard sizes (diskBytes) in /debug/vars; the target's free space is not checked");
            return Ok(());
        }
        let data = sizes.iter().fold(0u64, |a, &b| a.saturating_add(b));
        // The nearest existing directory on the work dir's path: prepare (and a dry run)
        // creates nothing on the target.
        let Some(free) = super::transfer::free_bytes(target, &cfg.work_dir)
            .await
            .map_err(Self::remote_err(p))?
        else {
            tracing::warn!(dir = %cfg.work_dir, "cannot read the target's free space; not checked");
            return Ok(());
        };
        // And the floor below which a dump is stopped (`transfer::DISK_FLOOR`).
        let need = data
            .saturating_mul(2)
            .saturating_add(super::transfer::DISK_FLOOR);
        if free < need {
            return Err(MigrateError::Failed {
                phase: p,
                msg: format!(
                    "not enough disk on the target {}: {} has {} MiB free, the dump and the restored data need about {} MiB (2 x {} MiB of shards on the source, and {} MiB to spare)",
                    cfg.name,
                    cfg.work_dir,
                    free >> 20,
                    need.div_ceil(1 << 20),
                    data.div_ceil(1 << 20),
                    super::transfer::DISK_FLOOR >> 20
                ),
            });
        }
        Ok(())
    }
}

/// Wait until a (new) InfluxDB answers an authenticated query: a VM that its stack calls
/// complete may still be starting it. Network trouble and 5xx are retried with backoff
/// until `timeout`; a refusal (wrong credentials, a 4xx) fails at once. A zero `timeout`:
/// one try, its own error.
pub(super) async fn wait_ready(influx: &Influx, timeout: Duration) -> Result<(), MigrateError> {
    if timeout.is_zero() {
        return influx
            .databases()
            .await
            .map(|_| ())
            .map_err(|source| MigrateError::Influx {
                phase: Phase::Prepare,
                source,
            });
    }
    let mut retry =
        crate::util::Retry::new(Duration::from_millis(200), Duration::from_secs(5), timeout)
            .counting_from(tokio::time::Instant::now());
    loop {
        match influx.databases().await {
            Ok(_) => return Ok(()),
            Err(e) if e.is_transient() => {
                let Some(wait) = retry.next() else {
                    return Err(MigrateError::TargetNotReady {
                        url: influx.url().to_string(),
                        timeout,
                        last: e.to_string(),
                    });
                };
                tracing::info!(url = %influx.url(), error = %e, "target InfluxDB not answering yet; waiting");
                tokio::time::sleep(wait).await;
            }
            Err(source) => {
                return Err(MigrateError::Influx {
                    phase: Phase::Prepare,
                    source,
                })
            }
        }
    }
}

/// `influxd` runs on host `h` (instance `name`); the host's CPUs.
async fn influxd_and_cpus(h: &Host, name: &str) -> Result<usize, MigrateError> {
    let out = h
        .run("influxd version && nproc")
        .await
        .map_err(|e| MigrateError::Failed {
            phase: Phase::Prepare,
            msg: format!("{name}: influxd is not runnable on the host ({e})"),
        })?;
    Ok(host_cpus(&out))
}

/// The CPUs `nproc` printed on the last line of `out`; 1 when it printed nothing usable.
fn host_cpus(out: &str) -> usize {
    out.lines()
        .last()
        .and_then(|l| l.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(1)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_hosts_cpus_are_the_last_line_of_its_answer_and_one_when_unreadable() {
        assert_eq!(
            super::host_cpus("InfluxDB v1.6.7 (git: unknown unknown)\n4\n"),
            4
        );
        assert_eq!(
            super::host_cpus("InfluxDB v1.6.7 (git: unknown unknown)\n"),
            1
        );
        assert_eq!(super::host_cpus("0\n"), 1);
        assert_eq!(super::host_cpus(""), 1);
    }
}
