//! Running commands on a host: [`Remote`] is the capability (run a command, stream its
//! stdin/stdout, copy a file); [`LocalRemote`] runs on this machine, [`SshRemote`] on
//! another one over SSH (the `openssh` crate, host-key checking on by default).
//! [`Host`] picks one of the two from the configuration.

pub(crate) mod scratch;
mod ssh;

use std::path::Path;
use std::pin::Pin;
use std::process::Stdio;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub use ssh::{cpu_has_aes, Listen, SshRemote};

use crate::config::SshConfig;

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{host}: cannot start `{cmd}`: {source}")]
    Spawn {
        host: String,
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{host}: `{cmd}` failed ({status}): {stderr}")]
    Failed {
        host: String,
        cmd: String,
        status: String,
        /// The exit code, when the command exited (not killed by a signal).
        code: Option<i32>,
        stderr: String,
    },
    #[error("{host}: SSH host key verification failed: {}", problem.explain(host, known_hosts))]
    HostKey {
        host: String,
        known_hosts: String,
        problem: HostKeyProblem,
    },
    #[error("{host}: the SSH host key it offers is none of the keys pinned for it (the stack's ssh_host_keys output, or ssh.host_keys): refusing to connect, another machine may answer at this address")]
    PinnedHostKey { host: String },
    #[error("{host}: SSH authentication refused for user {user}: check the identity file and the host's authorized_keys")]
    AuthRefused { host: String, user: String },
    #[error(
        "{host}: SSH did not answer within {waited:?} ({attempts} attempts); last error: {last}"
    )]
    NotReady {
        host: String,
        waited: std::time::Duration,
        attempts: u32,
        last: String,
    },
    #[error("{host}: SSH: {msg}")]
    Ssh { host: String, msg: String },
    #[error("{host}: I/O while streaming `{cmd}`: {source}")]
    Io {
        host: String,
        cmd: String,
        #[source]
        source: std::io::Error,
    },
}

/// What OpenSSH said about a host key it refused: the fix differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostKeyProblem {
    /// The known-hosts file holds no key for the host.
    Unknown,
    /// It holds another key for the host than the one offered.
    Changed,
    /// OpenSSH refused the key and did not say which.
    Unclear,
}

impl HostKeyProblem {
    /// From OpenSSH's own words on stderr.
    pub fn from_ssh(stderr: &str) -> Option<HostKeyProblem> {
        if stderr.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
            || (stderr.contains("Host key for") && stderr.contains("has changed"))
        {
            Some(HostKeyProblem::Changed)
        } else if stderr.contains("host key is known for") {
            Some(HostKeyProblem::Unknown)
        } else if stderr.contains("Host key verification failed") {
            Some(HostKeyProblem::Unclear)
        } else {
            None
        }
    }

    fn explain(&self, host: &str, known_hosts: &str) -> String {
        match self {
            HostKeyProblem::Unknown => format!("the known-hosts file ({known_hosts}) holds no key for {host}; add the host's key to it (checked against the VM's console or its stack's ssh_host_keys output), or set host_key_check: accept-new for a host never seen before"),
            HostKeyProblem::Changed => format!("the key {host} offers is not the one the known-hosts file ({known_hosts}) holds for it: another machine may answer at this address (a reused address, a rebuilt VM); check which before replacing that line"),
            HostKeyProblem::Unclear => format!("the key offered by {host} is unknown or has changed; check it and add the right key to the known-hosts file ({known_hosts}), or set host_key_check: accept-new for a host never seen before"),
        }
    }
}

impl RemoteError {
    pub fn is_transient(&self) -> bool {
        matches!(self, RemoteError::NotReady { .. } | RemoteError::Ssh { .. })
    }
}

pub type BoxRead = Pin<Box<dyn AsyncRead + Send>>;
pub type BoxWrite = Pin<Box<dyn AsyncWrite + Send>>;

/// Which standard streams of a spawned command the caller wants.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pipes {
    pub stdin: bool,
    pub stdout: bool,
}

impl Pipes {
    /// The child's stdin and stdout as asked; stderr is always captured (errors quote it).
    /// Generic over the process library's `Stdio` (std's, or openssh's).
    pub(crate) fn stdio<S>(self, piped: fn() -> S, null: fn() -> S) -> [S; 3] {
        let pipe = |p: bool| if p { piped() } else { null() };
        [pipe(self.stdin), pipe(self.stdout), piped()]
    }
}

/// A running command. Take its pipes, then call [`RemoteProcess::finish`].
pub struct RemoteProcess {
    pub stdin: Option<BoxWrite>,
    pub stdout: Option<BoxRead>,
    inner: ProcessInner,
    /// Drains stderr from the start (a command that writes a lot to stderr must never
    /// block on a full pipe while we read its stdout); yields the last bytes.
    stderr: Option<tokio::task::JoinHandle<Vec<u8>>>,
    host: String,
    cmd: String,
}

/// The most of a command's stdout that [`Remote::run`] holds (commands that print more
/// stream it through [`Remote::spawn`]).
pub const RUN_OUTPUT_MAX: usize = 16 << 20;

/// Keep at most this much of a command's stderr for its error message.
const STDERR_KEEP: usize = 64 << 10;

fn drain_stderr(
    mut r: impl AsyncRead + Unpin + Send + 'static,
) -> tokio::task::JoinHandle<Vec<u8>> {
    tokio::spawn(async move {
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n) = r.read(&mut buf).await {
            if n == 0 {
                break;
            }
            kept.extend_from_slice(&buf[..n]);
            if kept.len() > 2 * STDERR_KEEP {
                kept.drain(..kept.len() - STDERR_KEEP);
            }
        }
        kept
    })
}

enum ProcessInner {
    Local(tokio::process::Child),
    /// With what the master was started with (files it may read again), kept while the
    /// command runs.
    Ssh(
        openssh::Child<std::sync::Arc<openssh::Session>>,
        std::sync::Arc<dyn std::any::Any + Send + Sync>,
    ),
}

impl RemoteProcess {
    /// Wait for the command; an exit status other than 0 is an error carrying its stderr.
    pub async fn finish(mut self) -> Result<(), RemoteError> {
        drop(self.stdin.take());
        drop(self.stdout.take());
        let status = match self.inner {
            ProcessInner::Local(mut child) => {
                let st = child.wait().await.map_err(|source| RemoteError::Io {
                    host: self.host.clone(),
                    cmd: self.cmd.clone(),
                    source,
                })?;
                st.success()
                    .then_some(())
                    .ok_or((st.to_string(), st.code()))
            }
            ProcessInner::Ssh(child, _files) => match child.wait().await {
                Ok(st) => st
                    .success()
                    .then_some(())
                    .ok_or((st.to_string(), st.code())),
                // openssh reports a remote exit status of 127 (command not found) as this
                // error, not as a status: it is the command's own failure, as it is here.
                Err(openssh::Error::Remote(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                    Err(("exit status: 127".to_string(), Some(127)))
                }
                Err(e) => {
                    return Err(RemoteError::Ssh {
                        host: self.host.clone(),
                        msg: format!("`{}`: {}", self.cmd, crate::util::error_chain(&e)),
                    })
                }
            },
        };
        let stderr = match self.stderr.take() {
            Some(t) => t.await.unwrap_or_default(),
            None => Vec::new(),
        };
        status.map_err(|(status, code)| RemoteError::Failed {
            host: self.host,
            cmd: self.cmd,
            status,
            code,
            stderr: tail(&stderr),
        })
    }
}

/// The last lines of a command's stderr, for an error message.
fn tail(stderr: &[u8]) -> String {
    let s = String::from_utf8_lossy(stderr);
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(5);
    lines[start..].join(" | ")
}

/// Run commands on a host.
#[allow(async_fn_in_trait)]
pub trait Remote {
    /// A name for messages: `local` or `user@host:port`.
    fn describe(&self) -> String;

    /// Start `cmd` (a POSIX shell command line) with the asked-for pipes; stderr is kept
    /// for the error message.
    async fn spawn(&self, cmd: &str, pipes: Pipes) -> Result<RemoteProcess, RemoteError>;

    /// Run `cmd` to completion and return its stdout.
    async fn run(&self, cmd: &str) -> Result<String, RemoteError> {
        self.run_with_input(cmd, None).await
    }

    /// Run `cmd` with `input` written to its stdin and return its stdout (as
    /// [`Remote::run`]). Its stdin stays open until its stdout ends, so a command that
    /// watches for the end of its stdin stops when this future is dropped, even on a host
    /// reached over SSH, where dropping the channel ends no remote process by itself.
    async fn run_with_input(&self, cmd: &str, input: Option<&[u8]>) -> Result<String, RemoteError> {
        let mut p = self
            .spawn(
                cmd,
                Pipes {
                    stdin: input.is_some(),
                    stdout: true,
                },
            )
            .await?;
        // Held until the output has ended; written while the output is read, so that
        // neither side waits on a full pipe.
        let mut stdin = p.stdin.take();
        let write = async {
            match (stdin.as_mut(), input) {
                (Some(w), Some(input)) => {
                    w.write_all(input).await?;
                    w.flush().await
                }
                _ => Ok(()),
            }
        };
        let read = async {
            let mut out = Vec::new();
            match p.stdout.take() {
                // One byte over the limit tells a full answer from a cut one.
                Some(o) => o
                    .take(RUN_OUTPUT_MAX as u64 + 1)
                    .read_to_end(&mut out)
                    .await
                    .map(|n| (n, out)),
                None => Ok((0, out)),
            }
        };
        let (written, read) = tokio::join!(write, read);
        let io_err = |source| RemoteError::Io {
            host: self.describe(),
            cmd: cmd.to_string(),
            source,
        };
        let (n, out) = read.map_err(io_err)?;
        if n > RUN_OUTPUT_MAX {
            // Dropping the process closes its pipes; the command stops at its next write.
            return Err(io_err(std::io::Error::other(format!(
                "printed more than {RUN_OUTPUT_MAX} bytes on stdout; refusing to hold more"
            ))));
        }
        drop(stdin);
        // A command that ended without reading its input says why by its exit status; one
        // that succeeded without wanting all of it has not failed.
        p.finish().await?;
        match written {
            Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(io_err(e)),
            _ => {}
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Copy a local file to `dest` on the host (streamed through the command's stdin).
    async fn copy_to(&self, local: &Path, dest: &str) -> Result<u64, RemoteError> {
        let cmd = format!("cat > {}", crate::util::shell_quote(dest));
        let io_err = |source| RemoteError::Io {
            host: self.describe(),
            cmd: cmd.clone(),
            source,
        };
        let mut file = tokio::fs::File::open(local).await.map_err(io_err)?;
        let mut p = self
            .spawn(
                &cmd,
                Pipes {
                    stdin: true,
                    stdout: false,
                },
            )
            .await?;
        let mut stdin = p
            .stdin
            .take()
            .ok_or_else(|| io_err(std::io::Error::other("no stdin")))?;
        let n = tokio::io::copy(&mut file, &mut stdin)
            .await
            .map_err(io_err)?;
        stdin.shutdown().await.map_err(io_err)?;
        drop(stdin);
        p.finish().await?;
        Ok(n)
    }
}

/// Commands on the orchestrator's own machine.
#[derive(Debug, Clone, Default)]
pub struct LocalRemote;

impl Remote for LocalRemote {
    fn describe(&self) -> String {
        "local".into()
    }

    async fn spawn(&self, cmd: &str, pipes: Pipes) -> Result<RemoteProcess, RemoteError> {
        let mut c = tokio::process::Command::new("sh");
        let [stdin, stdout, stderr] = pipes.stdio(Stdio::piped, Stdio::null);
        c.arg("-c")
            .arg(cmd)
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true);
        let mut child = c.spawn().map_err(|source| RemoteError::Spawn {
            host: self.describe(),
            cmd: cmd.to_string(),
            source,
        })?;
        Ok(RemoteProcess {
            stdin: child.stdin.take().map(|s| Box::pin(s) as BoxWrite),
            stdout: child.stdout.take().map(|s| Box::pin(s) as BoxRead),
            stderr: child.stderr.take().map(drain_stderr),
            inner: ProcessInner::Local(child),
            host: self.describe(),
            cmd: cmd.to_string(),
        })
    }
}

/// A host as the configuration names it: local, or reached over SSH.
#[derive(Clone)]
pub enum Host {
    Local(LocalRemote),
    Ssh(SshRemote),
}

impl Host {
    /// Connect as configured (`None`: local). SSH waits until the host accepts connections,
    /// up to the configured `ready_timeout`.
    pub async fn connect(ssh: Option<&SshConfig>) -> Result<Host, RemoteError> {
        match ssh {
            None => Ok(Host::Local(LocalRemote)),
            Some(c) => Ok(Host::Ssh(SshRemote::connect(c).await?)),
        }
    }
}

impl Host {
    /// Whether the connection still works (always, for the local host).
    pub async fn alive(&self) -> bool {
        match self {
            Host::Local(_) => true,
            Host::Ssh(s) => s.alive().await,
        }
    }
}

impl Remote for Host {
    fn describe(&self) -> String {
        match self {
            Host::Local(l) => l.describe(),
            Host::Ssh(s) => s.describe(),
        }
    }

    async fn spawn(&self, cmd: &str, pipes: Pipes) -> Result<RemoteProcess, RemoteError> {
        match self {
            Host::Local(l) => l.spawn(cmd, pipes).await,
            Host::Ssh(s) => s.spawn(cmd, pipes).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn run_refuses_to_hold_an_output_beyond_its_limit_and_names_it() {
        let ok = LocalRemote
            .run(&format!("head -c {RUN_OUTPUT_MAX} /dev/zero"))
            .await
            .unwrap();
        assert_eq!(ok.len(), RUN_OUTPUT_MAX, "up to the limit is fine");
        let e = LocalRemote
            .run(&format!("head -c {} /dev/zero", RUN_OUTPUT_MAX + 1))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("printed more than"), "{e}");
    }
}
