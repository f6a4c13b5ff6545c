//! What the engine does next, and what it undoes after a failure: pure functions of the
//! kind of run and the step just done, so every path through a migration is a unit test.

use super::Phase;

/// One step of the engine; each is a phase module's entry point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    Prepare,
    Capture,
    /// A resumed run checks, once its own capture is live, that the interrupted run's
    /// capture lost nothing while the orchestrator was down.
    CheckInterrupted,
    Dump,
    Transfer,
    Restore,
    Delta,
    Cutover,
    Verify,
    Dispose,
}

impl Step {
    /// The phase the step is journaled and timed under.
    pub(super) fn phase(self) -> Phase {
        match self {
            Step::Prepare => Phase::Prepare,
            Step::Capture | Step::CheckInterrupted => Phase::Capture,
            Step::Dump => Phase::Dump,
            Step::Transfer => Phase::Transfer,
            Step::Restore => Phase::Restore,
            Step::Delta => Phase::Delta,
            Step::Cutover => Phase::Cutover,
            Step::Verify => Phase::Verify,
            Step::Dispose => Phase::Dispose,
        }
    }
}

/// The kind of run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Plan {
    /// The data is already on the target (a run resumed after a crash past the repoint):
    /// the interrupted run's capture is proven complete, and there is no dump, transfer
    /// or restore.
    pub resume: bool,
}

/// What a failure leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Undo {
    /// Writers never left the source: what this run made on the target goes.
    RollBack,
    /// Writers may use the target: nothing is deleted anywhere, the spool is kept.
    KeepBoth,
}

impl Plan {
    pub(super) const FIRST: Step = Step::Prepare;

    /// The step after `done`, or `None` when the migration is complete.
    pub(super) fn next(self, done: Step) -> Option<Step> {
        use Step::*;
        Some(match done {
            Prepare => Capture,
            Capture if self.resume => CheckInterrupted,
            CheckInterrupted => Delta,
            Capture => Dump,
            Dump => Transfer,
            Transfer => Restore,
            Restore => Delta,
            Delta => Cutover,
            Cutover => Verify,
            Verify => Dispose,
            Dispose => return None,
        })
    }

    /// What to undo after a failure, given whether this run started repointing writers.
    /// A resumed run starts past an earlier repoint: whatever fails in it, writers may use
    /// the target, so it never rolls back.
    pub(super) fn undo(self, repointing_started: bool) -> Undo {
        if self.resume || repointing_started {
            Undo::KeepBoth
        } else {
            Undo::RollBack
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(plan: Plan) -> Vec<Step> {
        let mut out = vec![Plan::FIRST];
        while let Some(s) = plan.next(*out.last().unwrap()) {
            out.push(s);
        }
        out
    }

    #[test]
    fn a_fresh_run_moves_the_data_before_it_repoints_and_verifies_before_it_disposes() {
        use Step::*;
        assert_eq!(
            steps(Plan::default()),
            [Prepare, Capture, Dump, Transfer, Restore, Delta, Cutover, Verify, Dispose]
        );
    }

    #[test]
    fn a_resumed_run_moves_no_data_again_and_checks_the_lost_capture_first() {
        use Step::*;
        assert_eq!(
            steps(Plan { resume: true }),
            [
                Prepare,
                Capture,
                CheckInterrupted,
                Delta,
                Cutover,
                Verify,
                Dispose
            ]
        );
    }

    #[test]
    fn only_a_fresh_run_that_never_started_repointing_rolls_back() {
        let fresh = Plan::default();
        assert_eq!(fresh.undo(false), Undo::RollBack);
        assert_eq!(fresh.undo(true), Undo::KeepBoth);
        // Before this split the engine reset "cutover done" before a resumed run's
        // cutover, so a failure there (e.g. the journal refusing the repoint record)
        // deleted the new capture's spool: points captured since the last replay, which
        // writers had sent to the source, were lost.
        let resumed = Plan { resume: true };
        assert_eq!(resumed.undo(false), Undo::KeepBoth);
        assert_eq!(resumed.undo(true), Undo::KeepBoth);
    }

    #[test]
    fn every_step_is_timed_under_its_phase_in_phase_order() {
        for plan in [Plan { resume: false }, Plan { resume: true }] {
            let phases: Vec<Phase> = steps(plan).iter().map(|s| s.phase()).collect();
            let mut sorted = phases.clone();
            sorted.sort_by_key(|p| *p as u8);
            assert_eq!(phases, sorted);
        }
    }
}
