//! This process's private directory in the temporary directory, and the clearing of the
//! ones left by stateshift processes that ended without removing theirs.
//!
//! Why: an SSH master runs on after the process that started it (openssh's
//! `ControlPersist=yes`); it stops when its `Session` is dropped. A process that is killed
//! (`kill -9`, a second Ctrl-C, a crash) drops nothing: its masters stay connected to their
//! hosts for as long as the hosts answer, and its files stay in `/tmp`. Under systemd the
//! unit's stop kills them with the process (`KillMode=mixed`); a `stateshift migrate` run
//! by hand has no such care, and six of the CLI tests left two masters each.
//!
//! So everything a process keeps there (the masters' control sockets, the files they start
//! with, the forwards' unix sockets) goes into one directory named for the process
//! (`stateshift-p<pid>-<start>-<pid namespace>`, the last two in hex): its pid, the time
//! it started (so a reused pid is not taken for it) and its pid namespace (so a process of
//! another container sharing `/tmp` is never judged from here). The directory is removed
//! when the last thing in it is done with; the next stateshift process that connects over
//! SSH closes the masters of the ones whose process is gone, and removes them.
//!
//! The name is short on purpose: an SSH control socket's path must fit in 107 bytes
//! (see [`CONTROL_DIR_MAX`]).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

const PREFIX: &str = "stateshift-p";

/// The longest control directory an SSH master can have its socket in: ssh binds
/// `<dir>/.ssh-connectionXXXXXX/master.<16 random characters>` (openssh's temporary
/// directory, then ssh's own temporary name), and a unix socket's path holds at most 107
/// bytes.
pub(crate) const CONTROL_DIR_MAX: usize =
    107 - "/.ssh-connectionXXXXXX/master.0123456789abcdef".len();

/// How long closing one left-over master may take (it answers on its control socket at
/// once, or its socket is dead and the connect fails at once).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// This process's directory: mode 0700, removed (if empty) when the last holder drops it.
#[derive(Debug)]
pub(crate) struct ProcessDir(PathBuf);

impl ProcessDir {
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ProcessDir {
    fn drop(&mut self) {
        // Under the lock, and only if no new holder took the directory meanwhile (between
        // the last holder letting go and this, `process_dir` may have found it again).
        let current = CURRENT
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Counted, not upgraded: an `Arc` upgraded here could be the last one, and its drop
        // would run this again, under the lock this holds.
        if current.strong_count() == 0 {
            // Only if empty: whatever is still in it belongs to something that outlived
            // its holders, and the next process's sweep takes it once this one has ended.
            let _ = std::fs::remove_dir(&self.0);
        }
    }
}

/// Who a directory belongs to: a process, told apart from a later one with its pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Owner {
    pid_ns: u64,
    pid: u32,
    start: u64,
}

impl Owner {
    /// This process; its start and namespace are 0 (never judged) where `/proc` is not
    /// this process's pid namespace's.
    fn me() -> Owner {
        let pid = std::process::id();
        let ours = std::fs::read_link("/proc/self")
            .is_ok_and(|p| p.to_str() == Some(pid.to_string().as_str()));
        Owner {
            pid_ns: ours.then(pid_namespace).flatten().unwrap_or(0),
            pid,
            start: ours.then(|| process_start(pid)).flatten().unwrap_or(0),
        }
    }

    /// The directory's name; `suffix` tells it from another of the same process (when its
    /// own name is taken by somebody else's).
    fn dir_name(&self, suffix: Option<&str>) -> String {
        let name = format!("{PREFIX}{}-{:x}-{:x}", self.pid, self.start, self.pid_ns);
        match suffix {
            Some(s) => format!("{name}-{s}"),
            None => name,
        }
    }

    fn from_dir_name(name: &str) -> Option<Owner> {
        let mut parts = name.strip_prefix(PREFIX)?.split('-');
        let owner = Owner {
            pid: parts.next()?.parse().ok()?,
            start: u64::from_str_radix(parts.next()?, 16).ok()?,
            pid_ns: u64::from_str_radix(parts.next()?, 16).ok()?,
        };
        let suffix_ok = parts
            .next()
            .is_none_or(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric()));
        (suffix_ok && parts.next().is_none()).then_some(owner)
    }

    /// Whether this process has ended, as seen from `me`: only said of a process of the
    /// same pid namespace, and only where `/proc` tells, for both (otherwise nothing is
    /// judged).
    fn ended(&self, me: &Owner) -> bool {
        let known = |o: &Owner| o.pid_ns != 0 && o.start != 0;
        if !known(me) || !known(self) || self.pid_ns != me.pid_ns {
            return false;
        }
        process_start(self.pid) != Some(self.start)
    }
}

/// The inode of this process's pid namespace (`/proc/self/ns/pid` reads `pid:[N]`).
fn pid_namespace() -> Option<u64> {
    let link = std::fs::read_link("/proc/self/ns/pid").ok()?;
    let link = link.to_str()?;
    link.strip_prefix("pid:[")?.strip_suffix(']')?.parse().ok()
}

/// When process `pid` started, in clock ticks since boot (`/proc/PID/stat`, field 22), or
/// `None` when no such process runs.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2, the command's name in parentheses, may hold spaces and parentheses itself:
    // the fields after it start after the last ')'; field 22 is the 20th of them.
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(19)?.parse().ok()
}

/// The directory of this process, under the temporary directory (`$TMPDIR` or `/tmp`).
static CURRENT: Mutex<Weak<ProcessDir>> = Mutex::new(Weak::new());

/// This process's directory, created if no holder has it now.
pub(crate) fn process_dir() -> std::io::Result<Arc<ProcessDir>> {
    let mut current = CURRENT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(dir) = current.upgrade() {
        return Ok(dir);
    }
    let tmp = std::env::temp_dir();
    let me = Owner::me();
    let path = match create_private(&tmp.join(me.dir_name(None))) {
        Ok(p) => p,
        // Taken by somebody else (the name is easy to guess): one of our own, then.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let suffix: String = std::iter::repeat_with(fastrand::alphanumeric)
                .take(6)
                .collect();
            create_private(&tmp.join(me.dir_name(Some(&suffix))))?
        }
        Err(e) => return Err(e),
    };
    let dir = Arc::new(ProcessDir(path));
    *current = Arc::downgrade(&dir);
    Ok(dir)
}

/// Create `path` with mode 0700, or take it if it is already this user's and private
/// (this process made it before, and something in it outlived its holders). Anything else
/// there is refused: in a directory everybody can write to, it may be somebody's trap.
fn create_private(path: &Path) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let named = |e: std::io::Error| {
        std::io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display()))
    };
    match std::fs::DirBuilder::new().mode(0o700).create(path) {
        Ok(()) => Ok(path.to_path_buf()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let m = std::fs::symlink_metadata(path).map_err(named)?;
            // SAFETY: geteuid has no preconditions and cannot fail.
            let euid = unsafe { libc::geteuid() };
            if m.is_dir() && m.uid() == euid && m.permissions().mode() & 0o077 == 0 {
                Ok(path.to_path_buf())
            } else {
                Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not this user's private directory (mode 0700)",
                        path.display()
                    ),
                ))
            }
        }
        Err(e) => Err(named(e)),
    }
}

/// What [`sweep`] cleared.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Swept {
    /// Directories of ended processes removed.
    pub dirs: usize,
    /// Their SSH masters that answered and were told to exit.
    pub masters: usize,
}

/// Once per process, before its first SSH master: clear what ended stateshift processes
/// left in the temporary directory.
pub(crate) async fn sweep_once() {
    static DONE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    DONE.get_or_init(|| async {
        let s = sweep(&std::env::temp_dir()).await;
        if s.dirs > 0 {
            tracing::info!(
                dirs = s.dirs,
                ssh_masters = s.masters,
                "closed the SSH connections and removed the files that ended stateshift processes had left"
            );
        }
    })
    .await;
}

/// Close the SSH masters of the directories in `tmp` whose process has ended, and remove
/// those directories. Only this user's directories are looked at; nothing here fails (a
/// directory that cannot be read or removed is left for the next sweep).
pub(crate) async fn sweep(tmp: &Path) -> Swept {
    use std::os::unix::fs::MetadataExt;
    let me = Owner::me();
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    let mut swept = Swept::default();
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return swept;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(owner) = name.to_str().and_then(Owner::from_dir_name) else {
            continue;
        };
        let Ok(m) = std::fs::symlink_metadata(entry.path()) else {
            continue;
        };
        if !m.is_dir() || m.uid() != euid || !owner.ended(&me) {
            continue;
        }
        swept.masters += close_masters(&entry.path()).await;
        if std::fs::remove_dir_all(entry.path()).is_ok() {
            swept.dirs += 1;
        }
    }
    swept
}

/// Tell every SSH master with a control socket in `dir` (openssh's `.ssh-connection*/master`)
/// to exit; how many did.
async fn close_masters(dir: &Path) -> usize {
    let mut closed = 0;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    for entry in entries.flatten() {
        let ctl = entry.path().join("master");
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with(".ssh-connection")
            || !ctl.exists()
        {
            continue;
        }
        let session = openssh::Session::resume_mux(ctl.clone().into_boxed_path(), None);
        match tokio::time::timeout(CLOSE_TIMEOUT, session.close()).await {
            Ok(Ok(())) => closed += 1,
            Ok(Err(e)) => tracing::debug!(
                socket = %ctl.display(),
                error = %crate::util::error_chain(&e),
                "a left-over SSH master did not answer (already gone)"
            ),
            Err(_) => {
                tracing::debug!(socket = %ctl.display(), "a left-over SSH master did not answer in time")
            }
        }
    }
    closed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_name_says_whose_it_is_and_nothing_else_is_taken_for_one() {
        let me = Owner::me();
        assert_ne!(me.start, 0, "/proc tells when this process started");
        assert_ne!(me.pid_ns, 0, "/proc tells this process's pid namespace");
        assert_eq!(Owner::from_dir_name(&me.dir_name(None)), Some(me));
        assert_eq!(Owner::from_dir_name(&me.dir_name(Some("a1B2c3"))), Some(me));
        for other in [
            "stateshift-p1-2",
            "stateshift-p1-2-3-4-5",
            "stateshift-p1-2-3-",
            "stateshift-p1-2-3-a.b",
            "stateshift-px-2-3",
            "stateshift-p1-2-g",
            "stateshift-ssh-config-1-0-5",
            "stateshift-proc-1-2-3",
            "stateshift-demo",
        ] {
            assert_eq!(Owner::from_dir_name(other), None, "{other}");
        }
    }

    #[test]
    fn only_a_process_that_has_ended_is_said_to_have_ended() {
        let me = Owner::me();
        assert!(!me.ended(&me), "this process runs");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let gone = Owner { pid, ..me };
        assert!(gone.ended(&me), "a process that has exited");
        let reused = Owner {
            start: me.start + 1,
            ..me
        };
        assert!(reused.ended(&me), "this pid, but a later process's start");
        let elsewhere = Owner {
            pid_ns: me.pid_ns + 1,
            pid,
            ..me
        };
        assert!(
            !elsewhere.ended(&me),
            "another pid namespace's process is not judged from here"
        );
        let unknown_start = Owner {
            pid,
            start: 0,
            ..me
        };
        assert!(
            !unknown_start.ended(&me),
            "a process that could not tell when it started is not judged"
        );
    }

    #[tokio::test]
    async fn the_sweep_removes_ended_processes_directories_and_keeps_live_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let me = Owner::me();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        let ended = tmp.path().join(Owner { pid, ..me }.dir_name(Some("x")));
        let mine = tmp.path().join(me.dir_name(None));
        let foreign_ns = tmp.path().join(
            Owner {
                pid_ns: me.pid_ns + 1,
                pid,
                ..me
            }
            .dir_name(None),
        );
        for d in [&ended, &mine, &foreign_ns] {
            create_private(d).unwrap();
            std::fs::write(d.join("ssh-config"), "Host *\n").unwrap();
        }
        // A stale control socket: its master is gone.
        std::fs::create_dir(ended.join(".ssh-connectionX")).unwrap();
        let _ = std::os::unix::net::UnixListener::bind(ended.join(".ssh-connectionX/master"));
        let s = sweep(tmp.path()).await;
        assert_eq!(
            s,
            Swept {
                dirs: 1,
                masters: 0
            }
        );
        assert!(!ended.exists());
        assert!(mine.join("ssh-config").exists(), "this process's own stays");
        assert!(foreign_ns.join("ssh-config").exists());
    }

    #[test]
    fn a_directory_that_is_not_this_users_private_one_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = create_private(&open).unwrap_err();
        assert!(
            e.to_string().contains("not this user's private directory"),
            "{e}"
        );
        assert!(e.to_string().contains(&open.display().to_string()), "{e}");
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
        assert!(create_private(&link).is_err(), "a symlink is not taken");
        let fine = tmp.path().join("fine");
        create_private(&fine).unwrap();
        assert_eq!(create_private(&fine).unwrap(), fine, "taken again");
    }
}
