//! SSH remote on the `openssh` crate (native multiplexing over one master connection).

use std::sync::Arc;
use std::time::Duration;

use openssh::{ForwardType, KnownHosts, Session, SessionBuilder, Socket, Stdio};

use super::{BoxRead, BoxWrite, Pipes, ProcessInner, Remote, RemoteError, RemoteProcess};
use crate::config::{HostKeyCheck, SshConfig};

/// Commands on a host reached over SSH.
pub struct SshRemote {
    session: Arc<Session>,
    name: String,
}

/// The full chain of an error's causes on one line (ssh's own stderr is in the chain).
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(m.trim());
        }
        cur = c.source();
    }
    s
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
            .known_hosts_check(match c.host_key_check {
                HostKeyCheck::Strict => KnownHosts::Strict,
                HostKeyCheck::AcceptNew => KnownHosts::Add,
                HostKeyCheck::Off => KnownHosts::Accept,
            });
        if let Some(k) = &c.identity_file {
            b.keyfile(k);
        }
        if let Some(k) = &c.known_hosts_file {
            b.user_known_hosts_file(k);
        }
        let start = tokio::time::Instant::now();
        let mut delay = Duration::from_millis(100);
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match b.connect_mux(&c.host).await {
                Ok(session) => {
                    tracing::debug!(host = %name, attempts, "SSH connected");
                    return Ok(SshRemote {
                        session: Arc::new(session),
                        name,
                    });
                }
                Err(e) => {
                    let msg = error_chain(&e);
                    if msg.contains("Host key verification failed")
                        || msg.contains("REMOTE HOST IDENTIFICATION HAS CHANGED")
                        || msg.contains("No ED25519 host key is known")
                        || msg.contains("host key for")
                    {
                        return Err(RemoteError::HostKey {
                            host: name,
                            known_hosts: c
                                .known_hosts_file
                                .as_ref()
                                .map(|p| p.display().to_string())
                                .unwrap_or_else(|| "~/.ssh/known_hosts".into()),
                        });
                    }
                    if msg.contains("Permission denied") {
                        return Err(RemoteError::AuthRefused {
                            host: name,
                            user: c.user.clone(),
                        });
                    }
                    if start.elapsed() + delay >= c.ready_timeout {
                        return Err(RemoteError::NotReady {
                            host: name,
                            waited: start.elapsed(),
                            attempts,
                            last: msg,
                        });
                    }
                    tracing::debug!(host = %name, attempts, error = %msg, "SSH not ready, retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}

impl SshRemote {
    /// Forward `listen` on this machine to `host:port` as seen from the remote host.
    /// Whether the SSH connection still works (the control master answers and its
    /// connection to the host is up).
    pub async fn alive(&self) -> bool {
        self.session.check().await.is_ok()
    }

    pub async fn forward_local(
        &self,
        listen: std::net::SocketAddr,
        host: &str,
        port: u16,
    ) -> Result<(), RemoteError> {
        self.session
            .request_port_forward(
                ForwardType::Local,
                listen,
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
                    error_chain(&e)
                ),
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
                    error_chain(&e)
                ),
            })
    }

    /// Close a forward opened by [`SshRemote::forward_local`].
    pub async fn close_local(&self, listen: std::net::SocketAddr, host: &str, port: u16) {
        let _ = self
            .session
            .close_port_forward(
                ForwardType::Local,
                listen,
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
        c.stdin(if pipes.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(if pipes.stdout {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stderr(Stdio::piped());
        let mut child = c.spawn().await.map_err(|e| RemoteError::Ssh {
            host: self.name.clone(),
            msg: format!("cannot start `{cmd}`: {}", error_chain(&e)),
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
