//! SSH remote on the `openssh` crate (native multiplexing over one master connection).

use std::sync::Arc;
use std::time::Duration;

use openssh::{ForwardType, KnownHosts, Session, SessionBuilder, Socket, Stdio};

use super::scratch::ProcessDir;
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
    /// The files the master was started with (pinned host keys, its configuration),
    /// removed with the last clone.
    files: Arc<MasterFiles>,
}

/// What a master was started with and may read again, in this process's directory (where
/// its control socket is too); the files are removed before the directory is let go.
struct MasterFiles {
    _files: Vec<PrivateFile>,
    _dir: Arc<ProcessDir>,
}

/// A file only this user can read, removed when dropped.
struct PrivateFile(std::path::PathBuf);

impl PrivateFile {
    /// Write `content` to a new file named for `what` in `dir`.
    fn write(dir: &std::path::Path, what: &str, content: &str) -> std::io::Result<PrivateFile> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = dir.join(format!("{what}-{n}"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let file = PrivateFile(path);
        f.write_all(content.as_bytes())?;
        f.sync_all()?;
        Ok(file)
    }
}

impl Drop for PrivateFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A private known-hosts file holding exactly the keys pinned for one host: OpenSSH then
/// accepts those keys and nothing else (`StrictHostKeyChecking=yes`), whatever the user's
/// own known-hosts file says about the address.
fn pinned_known_hosts(dir: &std::path::Path, c: &SshConfig) -> std::io::Result<PrivateFile> {
    let host = if c.port == 22 {
        c.host.clone()
    } else {
        format!("[{}]:{}", c.host, c.port)
    };
    let mut lines = String::new();
    for key in &c.host_keys {
        let mut parts = key.split_whitespace();
        if let (Some(kind), Some(body)) = (parts.next(), parts.next()) {
            lines.push_str(&format!("{host} {kind} {body}\n"));
        }
    }
    PrivateFile::write(dir, "known-hosts", &lines)
}

/// The ciphers put first where this machine's CPU has AES instructions.
const AES_GCM_FIRST: &str = "aes128-gcm@openssh.com,aes256-gcm@openssh.com";

/// OpenSSH's other default ciphers, after them. Written out rather than `^` (prepend to
/// the defaults), which older OpenSSH releases do not know: there the master would not
/// start at all.
const THEN: &str = "chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr";

/// The ssh configuration a master starts with (`ssh -F`): the user's and the system's
/// files, read as ssh reads them without `-F` (the first value found for an option wins,
/// so whatever they set stays: a `ProxyJump`, their own `Ciphers`), then AES-GCM first
/// among the default ciphers where `aes` says the CPU has AES instructions. Without
/// them OpenSSH's order is kept, and `None` is returned: no `-F` at all.
///
/// Why: every shard a migration streams crosses two SSH connections, encrypted and
/// decrypted four times, and the source's end runs beside the writers' server. OpenSSH
/// puts chacha20-poly1305 first because it is fast without AES instructions; with them,
/// AES-GCM took half its CPU per byte on both ends here (docs/benchmarks.md, stop 32).
/// Only this machine's CPU is known before the connection: the hosts are assumed to be
/// alike (a cloud's VMs are, with nova's default `host-model` CPUs). Where they lack AES
/// instructions, a `Ciphers` line in the user's `~/.ssh/config` puts chacha20 back first.
fn master_config(user_config: &str, aes: bool) -> Option<String> {
    aes.then(|| {
        format!(
            "# Written by stateshift for one SSH master; removed when it is done with it.\n\
             Include {user_config}\n\
             Include /etc/ssh/ssh_config\n\
             Host *\n  Ciphers {AES_GCM_FIRST},{THEN}\n"
        )
    })
}

/// Whether this machine's CPU has AES instructions (AES-GCM is then cheaper than
/// chacha20-poly1305).
pub fn cpu_has_aes() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Whether an SSH master's control socket fits in `dir` (else the master cannot start, and
/// would be retried until the host's `ready_timeout` with ssh's own terse complaint).
fn control_dir_fits(dir: &std::path::Path) -> Result<(), String> {
    let len = dir.as_os_str().len();
    if len <= super::scratch::CONTROL_DIR_MAX {
        return Ok(());
    }
    Err(format!(
        "the directory for this process's SSH control sockets, {}, is {len} bytes long: a socket's path must fit in 107, which leaves {} for it; set TMPDIR to a shorter directory",
        dir.display(),
        super::scratch::CONTROL_DIR_MAX
    ))
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
        super::scratch::sweep_once().await;
        let dir = super::scratch::process_dir().map_err(|e| RemoteError::Ssh {
            host: name.clone(),
            msg: format!("cannot make this process's directory for its SSH connections: {e}"),
        })?;
        control_dir_fits(dir.path()).map_err(|msg| RemoteError::Ssh {
            host: name.clone(),
            msg,
        })?;
        let mut b = SessionBuilder::default();
        b.user(c.user.clone())
            .port(c.port)
            .connect_timeout(c.connect_timeout)
            .server_alive_interval(Duration::from_secs(15))
            // Not the working directory (openssh's default): under systemd that is `/`,
            // read-only with ProtectSystem=strict. This process's own: if it is killed,
            // the next one closes the master it leaves (`scratch`).
            .control_directory(dir.path())
            .known_hosts_check(match c.host_key_check {
                _ if !c.host_keys.is_empty() => KnownHosts::Strict,
                HostKeyCheck::Strict => KnownHosts::Strict,
                HostKeyCheck::AcceptNew => KnownHosts::Add,
                HostKeyCheck::Off => KnownHosts::Accept,
            });
        if let Some(k) = &c.identity_file {
            b.keyfile(k);
        }
        let mut files = Vec::new();
        let pinned = !c.host_keys.is_empty();
        if pinned {
            let p = pinned_known_hosts(dir.path(), c).map_err(|e| RemoteError::Ssh {
                host: name.clone(),
                msg: format!("cannot write the pinned host keys to a temporary file: {e}"),
            })?;
            b.user_known_hosts_file(&p.0);
            files.push(p);
        } else if let Some(k) = &c.known_hosts_file {
            b.user_known_hosts_file(k);
        }
        if let Some(conf) = master_config("~/.ssh/config", cpu_has_aes()) {
            let f = PrivateFile::write(dir.path(), "ssh-config", &conf).map_err(|e| {
                RemoteError::Ssh {
                    host: name.clone(),
                    msg: format!("cannot write the ssh configuration to a temporary file: {e}"),
                }
            })?;
            b.config_file(&f.0);
            files.push(f);
        }
        let files = Arc::new(MasterFiles {
            _files: files,
            _dir: dir,
        });
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
                        files,
                    });
                }
                Err(e) => {
                    let msg = crate::util::error_chain(&e);
                    if let Some(problem) = HostKeyProblem::from_ssh(&msg) {
                        if pinned {
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
            // The master may outlive every clone of this remote while the command runs,
            // and ssh reads the pinned known-hosts file again at each rekeying.
            inner: ProcessInner::Ssh(child, self.files.clone()),
            host: self.name.clone(),
            cmd: cmd.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `ssh` itself makes of `master_config`: `ssh -G` prints the options it would
    /// use for `host`.
    fn resolved(conf: &str, host: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let f = PrivateFile::write(dir.path(), "test-ssh-config", conf).unwrap();
        let out = std::process::Command::new("ssh")
            .args(["-G", "-F"])
            .arg(&f.0)
            .arg(host)
            .output()
            .expect("ssh (openssh-client) runs");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn option<'a>(resolved: &'a str, name: &str) -> Option<&'a str> {
        resolved
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
    }

    #[test]
    fn a_control_directory_too_long_for_a_socket_is_refused_with_what_to_do() {
        let fits = format!(
            "/{}",
            "d".repeat(super::super::scratch::CONTROL_DIR_MAX - 1)
        );
        assert_eq!(control_dir_fits(std::path::Path::new(&fits)), Ok(()));
        let long = format!("{fits}e");
        let e = control_dir_fits(std::path::Path::new(&long)).unwrap_err();
        assert!(e.contains(&long) && e.contains("set TMPDIR"), "{e}");
        // What ssh binds there, the longest: openssh's directory, ssh's temporary name.
        let socket = format!("{fits}/.ssh-connectionAbC123/master.0123456789abcdef");
        assert_eq!(socket.len(), 107);
    }

    #[test]
    fn aes_gcm_comes_first_only_where_the_cpu_has_aes_instructions() {
        assert_eq!(master_config("~/.ssh/config", false), None);
        let user = tempfile::NamedTempFile::new().unwrap();
        let conf = master_config(&user.path().display().to_string(), true).unwrap();
        let r = resolved(&conf, "192.0.2.1");
        let ciphers = option(&r, "ciphers").unwrap();
        assert!(ciphers.starts_with(AES_GCM_FIRST), "{ciphers}");
        // OpenSSH's other defaults are still offered, after them.
        assert!(
            ciphers.contains("chacha20-poly1305@openssh.com"),
            "{ciphers}"
        );
    }

    #[test]
    fn the_users_own_ssh_configuration_still_applies_and_wins() {
        let mut user = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(
            &mut user,
            b"Host 192.0.2.*\n  ProxyJump bastion.example\n  Ciphers aes256-ctr\n",
        )
        .unwrap();
        let conf = master_config(&user.path().display().to_string(), true).unwrap();
        let r = resolved(&conf, "192.0.2.1");
        assert_eq!(option(&r, "proxyjump"), Some("bastion.example"), "{r}");
        assert_eq!(option(&r, "ciphers"), Some("aes256-ctr"), "{r}");
        // A host the user's file does not name gets ours.
        let other = resolved(&conf, "198.51.100.1");
        assert_eq!(option(&other, "proxyjump"), None, "{other}");
        assert!(option(&other, "ciphers")
            .unwrap()
            .starts_with(AES_GCM_FIRST));
    }
}
