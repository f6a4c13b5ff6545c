//! Verify: the target holds everything the source holds (see
//! [`crate::migrate::verify`] for the comparison), before anything is deleted.

use super::context::Migration;
use super::{MigrateError, Phase};
use crate::influx::InfluxError;
use crate::migrate::verify;

impl Migration<'_> {
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
        let rep = verify::verify(
            &self.src().influx,
            &self.dst().influx,
            &self.cfg.verify,
            self.touched.as_deref(),
            self.plan.resume,
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
        self.progress.note(&format!(
            "verified: {} databases, {} series, {} values on the source, {} on the target, {} series compared point by point, {} points overwritten after cutover",
            rep.databases, rep.series, rep.source_values, rep.target_values, rep.series_compared_point_by_point, rep.overwritten_after_cutover
        ));
        if rep.values_unverifiable > 0 {
            self.progress.note(&format!(
                "{} point values differ and cannot be judged: they changed on the target while stateshift was down after the repoint",
                rep.values_unverifiable
            ));
        }
        Ok(())
    }
}
