//! The idle side yields (`migration.idle_nice`): while the writers use one instance, the
//! other's `influxd` runs at a lower CPU priority. Until the repoint the target only
//! imports shards, takes replays and answers the early comparison; from the repoint on
//! the source only answers verification. Its `nice` cannot slow what the writers wait for
//! on the other side, and where both share CPUs (one machine, or a host with other busy
//! processes) the writers' server gets them first.
//!
//! A server is found by the process listening on its RPC address (`ss`), and every one of
//! its threads is reniced (Linux keeps a nice value per thread; Go starts threads as it
//! needs them, and they inherit the creating thread's). Each change runs in the
//! background on the side's SSH connection, after the side's previous change, so a
//! lowering and its undoing never cross. Before writers use a side, its change back to 0
//! is awaited; at the end of the migration, success or failure, both sides are back at 0.
//! Each lowering is journaled before it is started, and each change back once it is
//! done: after a crash, settling gives a server still at the lowered value the default
//! back ([`give_back_after_crash`]).

use serde::{Deserialize, Serialize};

use super::context::Migration;
use crate::config::InstanceConfig;
use crate::remote::{Host, Remote};
use crate::util::shell_quote;

/// Which instance of the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    Source,
    Target,
}

impl End {
    pub fn name(self) -> &'static str {
        match self {
            End::Source => "source",
            End::Target => "target",
        }
    }
}

/// A change of one side's priority, running or done: the pid and the nice value its
/// main thread had before.
pub(super) type Change = tokio::task::JoinHandle<Result<(u32, i32), Unchanged>>;

/// Why a change did not happen, or may not have.
#[derive(Debug)]
pub(super) enum Unchanged {
    /// The command ran and changed nothing: no such listener, no `ss`, no right to renice.
    Refused(String),
    /// It may or may not have run (the connection failed).
    Unknown(String),
    /// Not given back: the lowering was refused (why).
    NotLowered(String),
    /// Not given back: the server already ran at this nice value, at least as low as
    /// ours, before the lowering (which then left it as it was).
    AlreadyLow(i32),
}

impl std::fmt::Display for Unchanged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unchanged::Refused(e) | Unchanged::Unknown(e) | Unchanged::NotLowered(e) => {
                f.write_str(e)
            }
            Unchanged::AlreadyLow(n) => write!(f, "it already ran at nice {n}"),
        }
    }
}

/// Each side's last priority change, and whether it is a lowering not yet undone.
#[derive(Default)]
pub(super) struct Priorities {
    source: Option<(Change, bool)>,
    target: Option<(Change, bool)>,
}

impl Priorities {
    fn slot(&mut self, end: End) -> &mut Option<(Change, bool)> {
        match end {
            End::Source => &mut self.source,
            End::Target => &mut self.target,
        }
    }
}

/// What a change asks for.
#[derive(Debug, Clone, Copy)]
enum Nice {
    /// This value, if the server's is lower (a server already at least this low stays).
    Lower(u8),
    /// What the server had before the lowering to this value.
    Back(u8),
}

/// When a renice goes ahead, given the main thread's nice value before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum When {
    /// Always.
    Always,
    /// Only if it lowers the priority (a server already at least as low stays).
    Lowers,
    /// Only if the server runs at exactly this value.
    At(i32),
}

/// A shell command that gives every thread of the process listening on `rpc` (InfluxDB's
/// RPC address as the host itself sees it, `host:port`) the nice value `nice` (if `when`
/// says so), and prints its pid and its main thread's nice value before. A listener on
/// exactly that address wins over one on a wildcard address (the local provider runs
/// several servers on one port, each on its own loopback address).
/// Unprivileged users go through `sudo -n`: giving a priority back needs it. `renice -n`
/// sets the value (util-linux counts it relative under `POSIXLY_CORRECT`, unset here);
/// the threads are reniced twice, so one that a lowered thread started meanwhile is not
/// left behind.
pub(super) fn renice_cmd(rpc: &str, nice: i32, when: When) -> Result<String, String> {
    let (host, port) = super::transfer::split_rpc_address(rpc)
        .ok_or_else(|| format!("rpc_address {rpc:?} is not host:port"))?;
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        &host
    };
    // The local address is ss's fourth column: `127.0.0.1:8088`, `*:8088`, `[::1]:8088`,
    // `[::ffff:127.0.0.1]:8088`, `127.0.0.1%lo:8088`; the process column holds `pid=N`.
    let awk = r#"{ a = $4; sub(/:[0-9]+$/, "", a); sub(/%.*/, "", a); gsub(/\[|\]/, "", a)
  sub(/^::ffff:/, "", a)
  if (!match($0, /pid=[0-9]+/)) next
  p = substr($0, RSTART + 4, RLENGTH - 4)
  if (a == want) e = p; else if (a == "*" || a == "0.0.0.0" || a == "::") w = p }
END { if (e != "") print e; else if (w != "") print w }"#;
    let keep = match when {
        When::Always => String::new(),
        When::Lowers => {
            format!("[ \"$was\" -lt {nice} ] || {{ echo \"$pid $was\"; exit 0; }}\n")
        }
        When::At(n) => format!("[ \"$was\" = {n} ] || {{ echo \"$pid $was\"; exit 0; }}\n"),
    };
    Ok(format!(
        r#"S=; [ "$(id -u)" = 0 ] || S="sudo -n"
pid=$($S ss -Hltnp 'sport = :{port}' | awk -v want={want} {awk})
[ -n "$pid" ] || {{ echo "no process listens on {rpc_shown} here" >&2; exit 3; }}
was=$(awk '{{ print $19 }}' /proc/"$pid"/stat) || exit 3
{keep}$S env -u POSIXLY_CORRECT renice -n {nice} -p "$pid" >/dev/null || exit 4
for _ in 1 2; do
  $S env -u POSIXLY_CORRECT renice -n {nice} -p $(cd /proc/"$pid"/task && echo *) >/dev/null 2>&1
done
echo "$pid $was""#,
        want = shell_quote(host),
        awk = shell_quote(awk),
        rpc_shown = rpc.replace(['"', '$', '`', '\\'], "")
    ))
}

/// Give the `influxd` listening on `rpc` on `host` the nice value `nice` (if `when`
/// says so); its pid and its nice value before.
async fn set_nice(host: &Host, rpc: &str, nice: i32, when: When) -> Result<(u32, i32), Unchanged> {
    use crate::remote::RemoteError;
    let cmd = renice_cmd(rpc, nice, when).map_err(Unchanged::Refused)?;
    let out = host.run(&cmd).await.map_err(|e| match e {
        // The command's own exits, and a shell's "not found": before its first change.
        // Said without the script.
        RemoteError::Failed {
            host,
            status,
            code,
            stderr,
            ..
        } => {
            let why = format!(
                "{host}: renice of the influxd on {rpc} failed ({status}): {}",
                stderr.trim()
            );
            match code {
                Some(3 | 4 | 127) => Unchanged::Refused(why),
                _ => Unchanged::Unknown(why),
            }
        }
        e => Unchanged::Unknown(e.to_string()),
    })?;
    let mut words = out.split_whitespace();
    match (
        words.next().and_then(|w| w.parse().ok()),
        words.next().and_then(|w| w.parse().ok()),
    ) {
        (Some(pid), Some(was)) => Ok((pid, was)),
        _ => Err(Unchanged::Unknown(format!(
            "the renice command printed {:?}, not a pid and a nice value",
            out.trim()
        ))),
    }
}

/// The longest a change back is waited for at once.
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// What an operator is told of a change back that ended as `r` (nothing if it worked);
/// `last`: the migration ends, nothing waits for the change any more.
fn settled_note(
    end: End,
    nice: u8,
    r: Option<Result<(u32, i32), Unchanged>>,
    last: bool,
) -> Option<String> {
    let side = end.name();
    let then = if last {
        "it goes on in the background, unwatched"
    } else {
        "it is waited for again when the migration ends"
    };
    match r {
        None => Some(format!("the {side} influxd may still run at nice {nice} (migration.idle_nice): giving it its priority back did not answer within {SETTLE_WAIT:?}; {then}")),
        Some(Ok(_)) => None,
        Some(Err(Unchanged::NotLowered(why))) => Some(format!("the {side} influxd was not lowered (migration.idle_nice; it ran at the priority it had): {why}")),
        Some(Err(Unchanged::AlreadyLow(was))) => Some(format!("the {side} influxd already ran at nice {was} before this migration (an interrupted migration may have left it so) and keeps it; `renice -n 0` on its threads gives it the default")),
        Some(Err(e)) => Some(format!("the {side} influxd may still run at nice {nice} (migration.idle_nice): giving it its priority back failed: {e}")),
    }
}

/// Wait up to [`SETTLE_WAIT`] for `change`; `None` if it did not end (it is left
/// running, and handed back).
async fn wait_change(change: &mut Change) -> Option<Result<(u32, i32), Unchanged>> {
    match tokio::time::timeout(SETTLE_WAIT, change).await {
        Ok(Ok(r)) => Some(r),
        Ok(Err(join)) => Some(Err(Unchanged::Unknown(join.to_string()))),
        Err(_) => None,
    }
}

/// [`wait_change`] for a change that may not have been started (`None`).
async fn wait_started(c: Option<&mut Change>) -> Option<Option<Result<(u32, i32), Unchanged>>> {
    match c {
        Some(c) => Some(wait_change(c).await),
        None => None,
    }
}

impl Migration<'_> {
    /// Start changing `end`'s priority (after its previous change); nothing before the
    /// side is connected.
    fn change_priority(&mut self, end: End, to: Nice) {
        let side = match end {
            End::Source => self.source.as_ref(),
            End::Target => self.target.as_ref(),
        };
        let Some(side) = side else { return };
        let host = side.host.clone();
        let rpc = side.cfg.rpc_address.clone();
        let slot = self.priorities.slot(end);
        let lowering = matches!(to, Nice::Lower(_));
        let before = match slot.take() {
            // Lowered already: nothing to do. Not lowered: nothing to give back.
            Some((c, lowered)) if lowered == lowering => {
                *slot = Some((c, lowered));
                return;
            }
            None if !lowering => return,
            before => before.map(|(c, _)| c),
        };
        if let Nice::Lower(n) = to {
            // On record first: after a crash, settling gives it back.
            if let Err(e) = self.journal.idle_lowering(end, n) {
                *self.priorities.slot(end) = before.map(|c| (c, false));
                self.progress.note(&format!(
                    "the {} influxd keeps its priority (migration.idle_nice): {e}",
                    end.name()
                ));
                return;
            }
        }
        let slot = self.priorities.slot(end);
        *slot = Some((
            tokio::spawn(async move {
                let r = match to {
                    Nice::Lower(n) => {
                        if let Some(before) = before {
                            let _ = before.await;
                        }
                        set_nice(&host, &rpc, n.into(), When::Lowers).await
                    }
                    Nice::Back(n) => {
                        let lowering = match before {
                            Some(before) => before.await,
                            None => return Err(Unchanged::NotLowered("never lowered".into())),
                        };
                        let was = match lowering {
                            Ok(Ok((_, was))) if was >= i32::from(n) => {
                                return Err(Unchanged::AlreadyLow(was))
                            }
                            Ok(Ok((_, was))) => was,
                            Ok(Err(Unchanged::Refused(why) | Unchanged::NotLowered(why))) => {
                                return Err(Unchanged::NotLowered(why))
                            }
                            // It may have been lowered from anything: the default.
                            _ => 0,
                        };
                        set_nice(&host, &rpc, was, When::Always).await
                    }
                };
                match &r {
                    Ok((pid, was)) => {
                        tracing::info!(side = end.name(), pid, was, to = ?to, "influxd reniced")
                    }
                    Err(e) => {
                        tracing::warn!(side = end.name(), to = ?to, error = %e, "cannot renice influxd")
                    }
                }
                r
            }),
            lowering,
        ));
    }

    /// Lower `end` while no writer uses it (`migration.idle_nice`), in the background.
    pub(super) fn lower_priority(&mut self, end: End) {
        if self.cfg.migration.idle_nice > 0 {
            self.change_priority(end, Nice::Lower(self.cfg.migration.idle_nice));
        }
    }

    /// Start giving `end` back the priority it had, if this migration lowered it.
    pub(super) fn raise_priority(&mut self, end: End) {
        self.change_priority(end, Nice::Back(self.cfg.migration.idle_nice));
    }

    /// Take `end`'s change back, if one was started (a lowering stays on record until it
    /// is given back).
    fn take_raise(&mut self, end: End) -> Option<Change> {
        let slot = self.priorities.slot(end);
        match slot.take() {
            Some((c, false)) => Some(c),
            other => {
                *slot = other;
                None
            }
        }
    }

    /// Wait for `end`'s change back, if one was started; one that failed, or that did not
    /// happen for a reason an operator should know, is said. A host that stopped
    /// answering does not hold the repoint or a rollback: after [`SETTLE_WAIT`] the change
    /// is left running and waited for again at the migration's end.
    pub(super) async fn priority_settled(&mut self, end: End) {
        let Some(mut change) = self.take_raise(end) else {
            return;
        };
        let r = wait_change(&mut change).await;
        if r.is_none() {
            *self.priorities.slot(end) = Some((change, false));
        }
        self.record_settled(end, &r);
        if let Some(note) = settled_note(end, self.cfg.migration.idle_nice, r, false) {
            self.progress.note(&note);
        }
    }

    /// Journal that `end` needs nothing more after a crash, if its change back `r` says so.
    /// A server found already low stays on record: an interrupted migration may have left
    /// it so, and settling after a resumed run gives it back.
    fn record_settled(&self, end: End, r: &Option<Result<(u32, i32), Unchanged>>) {
        if let Some(Ok(_) | Err(Unchanged::NotLowered(_))) = r {
            self.journal.idle_restored(end);
        }
    }

    /// Both sides back to the priority they had, waited for together (the migration's
    /// end).
    pub(super) async fn restore_priorities(&mut self) {
        self.raise_priority(End::Source);
        self.raise_priority(End::Target);
        let (mut s, mut t) = (self.take_raise(End::Source), self.take_raise(End::Target));
        let (rs, rt) = tokio::join!(wait_started(s.as_mut()), wait_started(t.as_mut()));
        let nice = self.cfg.migration.idle_nice;
        for (end, r) in [(End::Source, rs), (End::Target, rt)] {
            if let Some(r) = &r {
                self.record_settled(end, r);
            }
            if let Some(note) = r.and_then(|r| settled_note(end, nice, r, true)) {
                self.progress.note(&note);
            }
        }
    }
}

/// After a crash: give the `influxd` of `inst` nice 0 if it still runs at `nice`, the
/// value an interrupted migration lowered it to (the value it had before was not
/// journaled; 0 is the default). Its pid and the value it ran at; a server at any other
/// value is left as it is.
pub async fn give_back_after_crash(inst: &InstanceConfig, nice: u8) -> Result<(u32, i32), String> {
    let host = Host::connect(inst.ssh.as_ref())
        .await
        .map_err(|e| e.to_string())?;
    set_nice(&host, &inst.rpc_address, 0, When::At(nice.into()))
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_rpc_address_is_named() {
        let e = renice_cmd("influxdb", 19, When::Lowers).unwrap_err();
        assert!(e.contains("\"influxdb\" is not host:port"), "{e}");
    }
}
