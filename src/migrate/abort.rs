//! An operator's "stop this migration now" (`stateshift abort`, `POST /migrate/abort`, the
//! status page's button, Ctrl-C on `stateshift migrate`), and the one point that decides
//! whether it may still be honoured: the repoint of the writers.
//!
//! Before the repoint an abort is a failure the operator asked for: the engine stops the
//! step it is in and rolls back exactly as after any failure (the target and everything
//! made on it go, the source never changed). From the repoint on, writers may already have
//! acknowledged writes on the target, so rolling it back could lose them: the abort is
//! refused. Both are decided under one lock, so an abort and a repoint that race each
//! other never both happen.

use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// A running migration's abort switch; clones share it.
#[derive(Clone, Default)]
pub struct Abort {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
    requested: CancellationToken,
}

#[derive(Debug, Default)]
enum State {
    #[default]
    Open,
    Requested {
        by: String,
    },
    /// The writers' repoint was recorded: no abort from here on.
    Closed,
    /// An earlier, interrupted migration is being settled before this one may start: its
    /// journal decides (roll back, or resume and finish), not an abort.
    Settling,
}

impl std::fmt::Debug for Abort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        f.debug_tuple("Abort").field(&*st).finish()
    }
}

/// Why an abort was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the migration is past its cutover: writers may already have written to the target, and rolling it back could lose those writes. Let it finish (verify, then the old stack goes); should it fail, nothing is deleted and `stateshift resolve --on source|target` says where the service runs")]
    PastCutover,
    #[error("an earlier migration that was interrupted is being settled first (rolled back, or resumed and finished, as its journal says): that cannot be aborted, and no new migration starts after it. Follow it in /status or with `stateshift status`")]
    Settling,
}

impl Abort {
    pub fn new() -> Abort {
        Abort::default()
    }

    /// Ask the migration to stop and roll back; `by` says who asked (for the journal and
    /// the messages). A second request while the first is being carried out is accepted
    /// too (it changes nothing).
    pub fn request(&self, by: &str) -> Result<(), Refused> {
        let mut st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        match &*st {
            State::Closed => Err(Refused::PastCutover),
            State::Settling => Err(Refused::Settling),
            State::Requested { .. } => Ok(()),
            State::Open => {
                *st = State::Requested { by: by.to_string() };
                self.inner.requested.cancel();
                Ok(())
            }
        }
    }

    /// Who asked, once an abort was accepted.
    pub fn requested_by(&self) -> Option<String> {
        match &*self.inner.state.lock().unwrap_or_else(|p| p.into_inner()) {
            State::Requested { by } => Some(by.clone()),
            _ => None,
        }
    }

    /// Resolves once an abort is accepted, with who asked; never while none is.
    pub async fn requested(&self) -> String {
        self.inner.requested.cancelled().await;
        self.requested_by().unwrap_or_default()
    }

    /// An interrupted earlier migration is about to be settled: refuse aborts with that
    /// reason (after it, the run ends; no new migration starts). An abort accepted
    /// already stays accepted: nothing new runs either way.
    pub fn settling(&self) {
        let mut st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(&*st, State::Open) {
            *st = State::Settling;
        }
    }

    /// The writers are about to be repointed: refuse every abort from now on. `Err` with
    /// who asked when an abort came first: then the repoint must not happen.
    pub fn close(&self) -> Result<(), String> {
        let mut st = self.inner.state.lock().unwrap_or_else(|p| p.into_inner());
        match &*st {
            State::Requested { by } => Err(by.clone()),
            State::Open | State::Closed | State::Settling => {
                *st = State::Closed;
                Ok(())
            }
        }
    }

    /// Whether the repoint was passed (aborts are refused).
    pub fn is_closed(&self) -> bool {
        matches!(
            &*self.inner.state.lock().unwrap_or_else(|p| p.into_inner()),
            State::Closed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_abort_before_the_repoint_is_accepted_and_stops_the_repoint() {
        let a = Abort::new();
        assert_eq!(a.requested_by(), None);
        a.request("operator: stateshift abort").unwrap();
        assert_eq!(
            a.requested_by().as_deref(),
            Some("operator: stateshift abort")
        );
        // A second request is no error and keeps the first one's name.
        a.request("someone else").unwrap();
        assert_eq!(
            a.requested_by().as_deref(),
            Some("operator: stateshift abort")
        );
        assert_eq!(a.close(), Err("operator: stateshift abort".to_string()));
        assert!(!a.is_closed());
    }

    #[test]
    fn past_the_repoint_an_abort_is_refused_and_says_why() {
        let a = Abort::new();
        a.close().unwrap();
        let e = a.request("operator").unwrap_err();
        assert_eq!(e, Refused::PastCutover);
        assert!(e.to_string().contains("past its cutover"), "{e}");
        assert!(e.to_string().contains("stateshift resolve"), "{e}");
        assert_eq!(a.requested_by(), None);
        assert!(a.is_closed());
    }

    #[test]
    fn while_an_earlier_migration_is_settled_an_abort_is_refused_and_says_why() {
        let a = Abort::new();
        a.settling();
        let e = a.request("operator").unwrap_err();
        assert_eq!(e, Refused::Settling);
        assert!(e.to_string().contains("being settled"), "{e}");
        assert_eq!(a.requested_by(), None);
        // One accepted before stays accepted.
        let b = Abort::new();
        b.request("page").unwrap();
        b.settling();
        assert_eq!(b.requested_by().as_deref(), Some("page"));
    }

    #[tokio::test]
    async fn requested_wakes_a_waiter_with_who_asked() {
        let a = Abort::new();
        let waiter = tokio::spawn({
            let a = a.clone();
            async move { a.requested().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        a.request("page").unwrap();
        assert_eq!(waiter.await.unwrap(), "page");
    }
}
