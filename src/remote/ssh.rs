//! SSH remote on the `openssh` crate (native multiplexing over one master connection).

use std::sync::Arc;
use std::time::Duration;

use openssh::{ForwardType, KnownHosts, Session, SessionBuilder, Socket, Stdio};

use super::{
    BoxRead, BoxWrite, HostKeyProblem, Pipes, ProcessInner, Remote, RemoteError, RemoteProcess,
};
use crate::config::{HostKeyCheck, SshConfig};

/// Commands on a host reached over SSH. A clone shares the connection (commands from
/// several tasks run as channels of one master).
#[derive(Clone)]
pub struct SshRemote {
    session: Arc<Session>,
    name: String,
    /// The known-hosts file made from pinned keys, removed with the last clone.
    _pinned: Option<Arc<PinnedKnownHosts>>,
}

/// A private known-hosts file holding exactly the keys pinned for one host: OpenSSH then
/// accepts those keys and nothing else (`StrictHostKeyChecking=yes`), whatever the user's
/// own known-hosts file says about the address.
struct PinnedKnownHosts(std::path::PathBuf);

impl PinnedKnownHosts {
    fn write(c: &SshConfig) -> std::io::Result<PinnedKnownHosts> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "stateshift-known-hosts-{}-{n}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
        ));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let host = if c.port == 22 {
            c.host.clone()
        } else {
            format!("[{}]:{}", c.host, c.port)
        };
        for key in &c.host_keys {
            let mut parts = key.split_whitespace();
            if let (Some(kind), Some(body)) = (parts.next(), parts.next()) {
                writeln!(f, "{host} {kind} {body}")?;
            }
        }
        f.sync_all()?;
        Ok(PinnedKnownHosts(path))
    }
}

impl Drop for PinnedKnownHosts {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// How many free ports [`SshRemote::forward_local_tcp`] tries.
const LOCAL_FORWARD_TRIES: usize = 8;

/// Where a local forward listens.
#[derive(Debug, Clone)]
pub enum Listen {
    Tcp(std::net::SocketAddr),
    Unix(std::path::PathBuf),
}

impl Listen {
    fn socket(&self) -> Socket<'_> {
        match self {
            Listen::Tcp(a) => (*a).into(),
            Listen::Unix(p) => Socket::UnixSocket { path: p.into() },
        }
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Tcp(a) => write!(f, "{a}"),
            Listen::Unix(p) => write!(f, "{}", p.display()),
        }
    }
}

impl SshRemote {
    /// Connect, retrying with backoff while the host refuses or does not answer (a VM
    /// still booting) until `ready_timeout`. A host-key mismatch or a refused key stops at
    /// once: retrying cannot fix those.
    pub async fn connect(c: &SshConfig) -> Result<SshRemote, RemoteError> {
        let name = format!("{}@{}:{}", c.user, c.host, c.port);
        let mut b = SessionBuilder::default();
        b.user(c.user.clone())
            .port(c.port)
            .connect_timeout(c.connect_timeout)
            .server_alive_interval(Duration::from_secs(15))
            // Not the working directory (openssh's default): under systemd that is `/`,
            // read-only with ProtectSystem=strict.
            .control_directory(std::env::temp_dir())
            .known_hosts_check(match c.host_key_check {
                _ if !c.host_keys.is_empty() => KnownHosts::Strict,
                HostKeyCheck::Strict => KnownHosts::Strict,
                HostKeyCheck::AcceptNew => KnownHosts::Add,
                HostKeyCheck::Off => KnownHosts::Accept,
            });
        if let Some(k) = &c.identity_file {
            b.keyfile(k);
        }
        let pinned = if c.host_keys.is_empty() {
            if let Some(k) = &c.known_hosts_file {
                b.user_known_hosts_file(k);
            }
            None
        } else {
            let p = PinnedKnownHosts::write(c).map_err(|e| RemoteError::Ssh {
                host: name.clone(),
                msg: format!("cannot write the pinned host keys to a temporary file: {e}"),
            })?;
            b.user_known_hosts_file(&p.0);
            Some(p)
        };
        let start = tokio::time::Instant::now();
        let mut retry = crate::util::Retry::new(
            Duration::from_millis(100),
            Duration::from_secs(5),
            c.ready_timeout,
        )
        .counting_from(start);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match b.connect_mux(&c.host).await {
                Ok(session) => {
                    tracing::debug!(host = %name, attempts, "SSH connected");
                    return Ok(SshRemote {
                        session: Arc::new(session),
                        name,
                        _pinned: pinned.map(Arc::new),
                    });
                }
                Err(e) => {
                    let msg = crate::util::error_chain(&e);
                    if let Some(problem) = HostKeyProblem::from_ssh(&msg) {
                        if pinned.is_some() {
                            return Err(RemoteError::PinnedHostKey { host: name });
                        }
                        return Err(RemoteError::HostKey {
                            host: name,
                            known_hosts: c
                                .known_hosts_file
                                .as_ref()
                                .map(|p| p.display().to_string())
                                .unwrap_or_else(|| "~/.ssh/known_hosts".into()),
                            problem,
                        });
                    }
                    if msg.contains("Permission denied") {
                        return Err(RemoteError::AuthRefused {
                            host: name,
                            user: c.user.clone(),
                        });
                    }
                    let Some(wait) = retry.next() else {
                        return Err(RemoteError::NotReady {
                            host: name,
                            waited: start.elapsed(),
                            attempts,
                            last: msg,
                        });
                    };
                    tracing::debug!(host = %name, attempts, error = %msg, "SSH not ready, retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

impl SshRemote {
    /// Whether the SSH connection still works (the control master answers and its
    /// connection to the host is up).
    pub async fn alive(&self) -> bool {
        self.session.check().await.is_ok()
    }

    /// Listen at `listen` on this machine (a TCP address, or a unix socket, which ssh
    /// creates with mode 0600) and forward each connection to `host:port` as seen from
    /// the remote host.
    pub async fn forward_local(
        &self,
        listen: &Listen,
        host: &str,
        port: u16,
    ) -> Result<(), RemoteError> {
        self.session
            .request_port_forward(
                ForwardType::Local,
                listen.socket(),
                Socket::TcpSocket {
                    host: host.into(),
                    port,
                },
            )
            .await
            .map_err(|e| RemoteError::Ssh {
                host: self.name.clone(),
                msg: format!(
                    "local forward {listen} -> {host}:{port} refused: {}",
                    crate::util::error_chain(&e)
                ),
            })
    }

    /// Listen on a free TCP port of 127.0.0.1 and forward each connection to `host:port`
    /// as seen from the remote host; returns where it listens. A free port is found by
    /// binding port 0 and letting it go, so another socket of this machine may take it
    /// before ssh binds it (under load, an outgoing connection's ephemeral port does):
    /// a refused forward is tried again on another port.
    pub async fn forward_local_tcp(
        &self,
        host: &str,
        port: u16,
    ) -> Result<std::net::SocketAddr, RemoteError> {
        let candidates = std::iter::repeat_with(|| {
            std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr())
        });
        self.forward_local_tcp_on(candidates.take(LOCAL_FORWARD_TRIES), host, port)
            .await
    }

    /// [`SshRemote::forward_local_tcp`] on the first of `candidates` that ssh can bind.
    pub async fn forward_local_tcp_on(
        &self,
        candidates: impl IntoIterator<Item = std::io::Result<std::net::SocketAddr>>,
        host: &str,
        port: u16,
    ) -> Result<std::net::SocketAddr, RemoteError> {
        let mut last = None;
        let mut tries = 0;
        for c in candidates {
            tries += 1;
            let addr = c.map_err(|e| RemoteError::Ssh {
                host: self.name.clone(),
                msg: format!("no free local port to forward to {host}:{port}: {e}"),
            })?;
            match self.forward_local(&Listen::Tcp(addr), host, port).await {
                Ok(()) => return Ok(addr),
                Err(e) => {
                    tracing::debug!(host = %self.name, listen = %addr, error = %e, "local forward refused, trying another port");
                    last = Some(e);
                }
            }
        }
        Err(match last {
            Some(RemoteError::Ssh { host, msg }) => RemoteError::Ssh {
                host,
                msg: format!("{msg} ({tries} ports tried)"),
            },
            Some(e) => e,
            None => RemoteError::Ssh {
                host: self.name.clone(),
                msg: format!("no local port given to forward to {host}:{port}"),
            },
        })
    }

    /// Forward `127.0.0.1:port` on the remote host to `connect` on this machine.
    pub async fn forward_remote(
        &self,
        port: u16,
        connect: std::net::SocketAddr,
    ) -> Result<(), RemoteError> {
        self.session
            .request_port_forward(
                ForwardType::Remote,
                Socket::TcpSocket {
                    host: "127.0.0.1".into(),
                    port,
                },
                connect,
            )
            .await
            .map_err(|e| RemoteError::Ssh {
                host: self.name.clone(),
                msg: format!(
                    "remote forward 127.0.0.1:{port} -> {connect} refused: {}",
                    crate::util::error_chain(&e)
                ),
            })
    }

    /// Close a forward opened by [`SshRemote::forward_local`].
    pub async fn close_local(&self, listen: &Listen, host: &str, port: u16) {
        let _ = self
            .session
            .close_port_forward(
                ForwardType::Local,
                listen.socket(),
                Socket::TcpSocket {
                    host: host.into(),
                    port,
                },
            )
            .await;
    }

    /// Close a forward opened by [`SshRemote::forward_remote`].
    pub async fn close_remote(&self, port: u16, connect: std::net::SocketAddr) {
        let _ = self
            .session
            .close_port_forward(
                ForwardType::Remote,
                Socket::TcpSocket {
                    host: "127.0.0.1".into(),
                    port,
                },
                connect,
            )
            .await;
    }
}

impl Remote for SshRemote {
    fn describe(&self) -> String {
        self.name.clone()
    }

    async fn spawn(&self, cmd: &str, pipes: Pipes) -> Result<RemoteProcess, RemoteError> {
        let mut c = Session::arc_raw_command(self.session.clone(), cmd);
        let [stdin, stdout, stderr] = pipes.stdio(Stdio::piped, Stdio::null);
        c.stdin(stdin).stdout(stdout).stderr(stderr);
        let mut child = c.spawn().await.map_err(|e| RemoteError::Ssh {
            host: self.name.clone(),
            msg: format!("cannot start `{cmd}`: {}", crate::util::error_chain(&e)),
        })?;
        Ok(RemoteProcess {
            stdin: child.stdin().take().map(|s| Box::pin(s) as BoxWrite),
            stdout: child.stdout().take().map(|s| Box::pin(s) as BoxRead),
            stderr: child.stderr().take().map(super::drain_stderr),
            inner: ProcessInner::Ssh(child),
            host: self.name.clone(),
            cmd: cmd.to_string(),
        })
    }
}
