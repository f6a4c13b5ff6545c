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
//! Only a crash in between leaves a server lowered (ARCHITECTURE.md, "Known limits").

use super::context::Migration;
use crate::remote::{Host, Remote};
use crate::util::shell_quote;

/// The longest a change back is waited for.
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Which instance of the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum End {
    Source,
    Target,
}

impl End {
    fn name(self) -> &'static str {
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
    /// Not tried: a change back after a lowering that changed nothing.
    Skipped,
}

impl std::fmt::Display for Unchanged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unchanged::Refused(e) | Unchanged::Unknown(e) => f.write_str(e),
            Unchanged::Skipped => f.write_str("nothing to change back"),
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
    /// What the server had before the lowering.
    Back,
}

/// A shell command that gives every thread of the process listening on `rpc` (InfluxDB's
/// RPC address as the host itself sees it, `host:port`) the nice value `nice` (only if it
/// lowers it, when `only_lower`), and prints its pid and its main thread's nice value
/// before. A listener on exactly that address wins over one on a wildcard address (the
/// local provider runs several servers on one port, each on its own loopback address).
/// Unprivileged users go through `sudo -n`: giving a priority back needs it.
pub(super) fn renice_cmd(rpc: &str, nice: i32, only_lower: bool) -> Result<String, String> {
    let (host, port) = rpc
        .rsplit_once(':')
        .and_then(|(h, p)| {
            p.parse::<u16>()
                .ok()
                .map(|p| (h.trim_matches(['[', ']']), p))
        })
        .ok_or_else(|| format!("rpc_address {rpc:?} is not host:port"))?;
    let host = if host == "localhost" {
        "127.0.0.1"
    } else {
        host
    };
    // The local address is ss's fourth column: `127.0.0.1:8088`, `*:8088`, `[::1]:8088`,
    // `127.0.0.1%lo:8088`; the process column holds `pid=N`.
    let awk = r#"{ a = $4; sub(/:[0-9]+$/, "", a); sub(/%.*/, "", a); gsub(/\[|\]/, "", a)
  if (!match($0, /pid=[0-9]+/)) next
  p = substr($0, RSTART + 4, RLENGTH - 4)
  if (a == want) e = p; else if (a == "*" || a == "0.0.0.0" || a == "::") w = p }
END { if (e != "") print e; else if (w != "") print w }"#;
    let keep = if only_lower {
        format!("[ \"$was\" -lt {nice} ] || {{ echo \"$pid $was\"; exit 0; }}\n")
    } else {
        String::new()
    };
    Ok(format!(
        r#"S=; [ "$(id -u)" = 0 ] || S="sudo -n"
pid=$($S ss -Hltnp 'sport = :{port}' | awk -v want={want} {awk})
[ -n "$pid" ] || {{ echo "no process listens on {rpc_shown} here" >&2; exit 3; }}
was=$(awk '{{ print $19 }}' /proc/"$pid"/stat) || exit 3
{keep}$S renice -n {nice} -p "$pid" >/dev/null || exit 4
$S renice -n {nice} -p $(cd /proc/"$pid"/task && echo *) >/dev/null 2>&1
echo "$pid $was""#,
        want = shell_quote(host),
        awk = shell_quote(awk),
        rpc_shown = rpc.replace(['"', '$', '`', '\\'], "")
    ))
}

/// Give the `influxd` listening on `rpc` on `host` the nice value `nice`; its pid and
/// its nice value before.
async fn set_nice(
    host: &Host,
    rpc: &str,
    nice: i32,
    only_lower: bool,
) -> Result<(u32, i32), Unchanged> {
    let cmd = renice_cmd(rpc, nice, only_lower).map_err(Unchanged::Refused)?;
    let out = host.run(&cmd).await.map_err(|e| match e {
        // The command's own exits, and a shell's "not found": before its first change.
        crate::remote::RemoteError::Failed {
            code: Some(3 | 4 | 127),
            ..
        } => Unchanged::Refused(e.to_string()),
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
        *slot = Some((
            tokio::spawn(async move {
                let r = match to {
                    Nice::Lower(n) => {
                        if let Some(before) = before {
                            let _ = before.await;
                        }
                        set_nice(&host, &rpc, n.into(), true).await
                    }
                    Nice::Back => {
                        let was = match before {
                            None => return Err(Unchanged::Skipped),
                            Some(before) => match before.await {
                                Ok(Ok((_, was))) => was,
                                Ok(Err(Unchanged::Refused(_) | Unchanged::Skipped)) => {
                                    return Err(Unchanged::Skipped)
                                }
                                // It may have been lowered from anything: the default.
                                _ => 0,
                            },
                        };
                        set_nice(&host, &rpc, was, false).await
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
        self.change_priority(end, Nice::Back);
    }

    /// Wait for `end`'s change back, if one was started; one that failed is said (the
    /// server then serves at the lower priority until it restarts).
    pub(super) async fn priority_settled(&mut self, end: End) {
        let slot = self.priorities.slot(end);
        let change = match slot.take() {
            None => return,
            // A lowering stays on record until it is given back.
            Some((c, true)) => {
                *slot = Some((c, true));
                return;
            }
            Some((c, false)) => c,
        };
        // A host that stopped answering must not hold the repoint or a rollback.
        let why = match tokio::time::timeout(SETTLE_WAIT, change).await {
            Ok(Ok(Err(e @ (Unchanged::Refused(_) | Unchanged::Unknown(_))))) => e.to_string(),
            Ok(_) => return,
            Err(_) => format!("no answer within {SETTLE_WAIT:?}"),
        };
        let nice = self.cfg.migration.idle_nice;
        self.progress.note(&format!(
            "the {} influxd may still run at nice {nice} (migration.idle_nice): giving it its priority back failed: {why}",
            end.name()
        ));
    }

    /// Both sides back to the priority they had, waited for (the migration's end).
    pub(super) async fn restore_priorities(&mut self) {
        self.raise_priority(End::Source);
        self.raise_priority(End::Target);
        self.priority_settled(End::Source).await;
        self.priority_settled(End::Target).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_rpc_address_is_named() {
        let e = renice_cmd("influxdb", 19, true).unwrap_err();
        assert!(e.contains("\"influxdb\" is not host:port"), "{e}");
    }
}
