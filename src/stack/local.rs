//! Local "VMs": an `influxd` with its own config, data and loopback address
//! (`127.0.X.N`), and optionally an `sshd` on the same address with keys generated here.
//! Used by the demo, the benchmark and the tests; the local stack provider builds on it.
//!
//! Addresses are leased with a lock file (`/tmp/stateshift-addr/<ip>.lock`, held by an
//! `flock` for the VM's lifetime), so concurrent test processes never collide and a
//! crashed holder frees its address automatically.

use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::config::{HostKeyCheck, InstanceConfig, SshConfig};
use crate::influx::Influx;
use crate::util::Secret;

pub const HTTP_PORT: u16 = 8086;
pub const RPC_PORT: u16 = 8088;
pub const SSH_PORT: u16 = 2222;

#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    #[error("local VM {addr}: {what}: {source}")]
    Io {
        addr: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("local VM {addr}: {what}")]
    Start { addr: String, what: String },
    #[error("no free loopback address in 127.0.{subnet}.1-250 (all leased)")]
    NoAddress { subnet: u8 },
}

/// Lease a free loopback address `127.0.subnet.N`.
pub fn lease_address(subnet: u8) -> Result<(Ipv4Addr, File), LocalError> {
    let dir = Path::new("/tmp/stateshift-addr");
    let io = |what: &str, source| LocalError::Io {
        addr: format!("127.0.{subnet}.*"),
        what: what.into(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(|e| io("create lease dir", e))?;
    for n in 1..=250u8 {
        let ip = Ipv4Addr::new(127, 0, subnet, n);
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{ip}.lock")))
            .map_err(|e| io("open lease file", e))?;
        if f.try_lock().is_ok() {
            // Leased; but a process from outside our leasing (an orphan of a killed
            // run, say) may still hold one of the VM's ports.
            let free = [HTTP_PORT, RPC_PORT, SSH_PORT]
                .iter()
                .all(|&port| std::net::TcpListener::bind((ip, port)).is_ok());
            if free {
                return Ok((ip, f));
            }
        }
    }
    Err(LocalError::NoAddress { subnet })
}

/// SSH key material for local VMs: a client key authorized on every VM and one host key.
#[derive(Debug, Clone)]
pub struct SshKeys {
    pub dir: PathBuf,
    pub client_key: PathBuf,
    pub host_key: PathBuf,
    pub known_hosts: PathBuf,
}

impl SshKeys {
    /// Generate (or reuse) keys under `dir`. Safe when several processes call it at once
    /// (a demo beside a daemon, tests in parallel) and after a process killed halfway:
    /// each key is generated under a name of its own, written to disk and linked into
    /// place, so a key file is whole or absent, and the first process to link it wins;
    /// its public half is derived from it and written again if it is missing or another
    /// key's.
    pub fn ensure(dir: &Path) -> Result<SshKeys, LocalError> {
        std::fs::create_dir_all(dir).map_err(|e| key_io(dir, "create key dir", e))?;
        let keys = SshKeys {
            dir: dir.to_path_buf(),
            client_key: dir.join("client_ed25519"),
            host_key: dir.join("host_ed25519"),
            known_hosts: dir.join("known_hosts"),
        };
        for k in [&keys.client_key, &keys.host_key] {
            if !k.exists() {
                generate_key(k)?;
            }
            derive_public_key(k)?;
        }
        // Created if missing, never truncated: another process may be trusting a host.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&keys.known_hosts)
            .map_err(|e| key_io(&keys.known_hosts, "create", e))?;
        Ok(keys)
    }

    fn host_pub(&self) -> Result<String, LocalError> {
        std::fs::read_to_string(self.host_key.with_extension("pub"))
            .map(|s| s.split_whitespace().take(2).collect::<Vec<_>>().join(" "))
            .map_err(|source| LocalError::Io {
                addr: "ssh-keys".into(),
                what: "read host public key".into(),
                source,
            })
    }

    /// Record the host key for `addr:port` in the known-hosts file (idempotent).
    ///
    /// The line is appended, never the file rewritten: whoever calls this (an
    /// orchestrator creating a target stack) may be killed at any instant, and a rewrite
    /// killed between its truncation and its write left the file without the entries it
    /// held, the service's own source among them (CI, crash campaign: "SSH host key
    /// verification failed" on the source after a kill in stack create). Two processes
    /// trusting at once each keep their line too. Bytes that are not text are kept as
    /// they are; a file that cannot be read is an error, not an empty one.
    pub fn trust(&self, addr: Ipv4Addr, port: u16) -> Result<(), LocalError> {
        use std::io::Write as _;
        let line = format!("[{addr}]:{port} {}", self.host_pub()?);
        let io = |what: &str, source| LocalError::Io {
            addr: addr.to_string(),
            what: format!("{what} {}", self.known_hosts.display()),
            source,
        };
        let cur = match std::fs::read(&self.known_hosts) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io("read", e)),
        };
        if cur
            .split(|&b| b == b'\n')
            .any(|l| l.trim_ascii() == line.as_bytes())
        {
            return Ok(());
        }
        let sep = if cur.is_empty() || cur.ends_with(b"\n") {
            ""
        } else {
            "\n"
        };
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.known_hosts)
            .and_then(|mut f| f.write_all(format!("{sep}{line}\n").as_bytes()))
            .map_err(|e| io("append to", e))
    }
}

fn key_io(path: &Path, what: &str, source: std::io::Error) -> LocalError {
    LocalError::Io {
        addr: "ssh-keys".into(),
        what: format!("{what} {}", path.display()),
        source,
    }
}

/// A name next to `path` that no other process or call uses.
fn scratch_name(path: &Path) -> PathBuf {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()))
}

/// Run `ssh-keygen` with `args`; its stdout.
fn ssh_keygen(args: &[&std::ffi::OsStr]) -> Result<Vec<u8>, LocalError> {
    let out = std::process::Command::new("ssh-keygen")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| LocalError::Io {
            addr: "ssh-keys".into(),
            what: "run ssh-keygen (is openssh-client installed?)".into(),
            source: e,
        })?;
    if !out.status.success() {
        return Err(LocalError::Start {
            addr: "ssh-keys".into(),
            what: format!(
                "ssh-keygen {} failed ({}): {}",
                args.iter()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(out.stdout)
}

/// A new key at `path` (and its public half), unless another process put one there first:
/// then that one stays.
fn generate_key(path: &Path) -> Result<(), LocalError> {
    let tmp = scratch_name(path);
    let tmp_pub = tmp.with_extension("tmp.pub");
    let result = ssh_keygen(&[
        "-q".as_ref(),
        "-t".as_ref(),
        "ed25519".as_ref(),
        "-N".as_ref(),
        "".as_ref(),
        "-C".as_ref(),
        "stateshift-local".as_ref(),
        "-f".as_ref(),
        tmp.as_os_str(),
    ])
    .and_then(|_| {
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| key_io(&tmp, "write to disk the new key", e))
    })
    .and_then(|()| match std::fs::hard_link(&tmp, path) {
        // Ours is the key: its public half goes with it.
        Ok(()) => std::fs::rename(&tmp_pub, path.with_extension("pub"))
            .map_err(|e| key_io(path, "put the public key of", e)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(key_io(path, "link the new key to", e)),
    });
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_file(&tmp_pub);
    result
}

/// Write the public half of the key at `path` next to it, derived from it, unless the
/// file there already holds it.
fn derive_public_key(path: &Path) -> Result<(), LocalError> {
    let public = ssh_keygen(&["-y".as_ref(), "-f".as_ref(), path.as_os_str()]).map_err(|e| {
        LocalError::Start {
            addr: "ssh-keys".into(),
            what: format!(
                "the key {} has no public half and none can be derived from it (remove it, and a new one is made): {e}",
                path.display()
            ),
        }
    })?;
    let key_of = |text: &[u8]| {
        String::from_utf8_lossy(text)
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    if let Ok(have) = std::fs::read(path.with_extension("pub")) {
        if key_of(&have) == key_of(&public) {
            return Ok(());
        }
    }
    let tmp = scratch_name(&path.with_extension("pub"));
    let written = std::fs::write(&tmp, &public)
        .and_then(|()| std::fs::rename(&tmp, path.with_extension("pub")));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(|e| key_io(path, "write the public key of", e))
}

/// Options for one local VM.
#[derive(Debug, Clone, Default)]
pub struct VmOptions {
    /// Start an `sshd` on the VM's address (port [`SSH_PORT`]).
    pub ssh: Option<SshKeys>,
    /// Enable InfluxDB authentication with this admin user.
    pub admin: Option<(String, Secret)>,
    /// Subnet for the address lease (`127.0.subnet.N`); default 10.
    pub subnet: Option<u8>,
    /// Processes outlive this `LocalVm` (own process group, not killed on drop): for
    /// stacks that must survive an orchestrator restart. Stop them with [`stop_pids`].
    pub detached: bool,
    /// More settings of InfluxDB's `[data]` section, as written in its file (key, value):
    /// e.g. `("cache-snapshot-write-cold-duration", "\"1s\"")`.
    pub data_settings: Vec<(String, String)>,
    /// Store InfluxDB's own statistics in `_internal` at this interval (`[monitor]
    /// store-enabled`, Debian's default, every 10 s); off when `None`.
    pub monitor_store: Option<Duration>,
}

/// A running local VM. Dropping it kills its processes; [`LocalVm::destroy`] also
/// removes its directory.
pub struct LocalVm {
    pub addr: Ipv4Addr,
    pub dir: PathBuf,
    opts: VmOptions,
    influxd: Option<tokio::process::Child>,
    sshd: Option<tokio::process::Child>,
    _lease: File,
}

impl LocalVm {
    /// Start a VM with its files under `dir` (created). Ready when InfluxDB answers `/ping`
    /// and, with SSH, when sshd accepts TCP connections.
    pub async fn start(dir: &Path, opts: VmOptions) -> Result<LocalVm, LocalError> {
        let (addr, lease) = lease_address(opts.subnet.unwrap_or(10))?;
        let dir = dir.to_path_buf();
        let a = addr.to_string();
        let io = |what: &str, source| LocalError::Io {
            addr: a.clone(),
            what: what.into(),
            source,
        };
        for d in ["meta", "data", "wal", "work"] {
            std::fs::create_dir_all(dir.join(d)).map_err(|e| io("create directories", e))?;
        }
        let mut vm = LocalVm {
            addr,
            dir: dir.clone(),
            opts: opts.clone(),
            influxd: None,
            sshd: None,
            _lease: lease,
        };
        vm.start_influxd().await?;
        if let Some(keys) = &opts.ssh {
            vm.start_sshd(keys)?;
        }
        if let Some((user, pass)) = &opts.admin {
            let anon = Influx::new(&vm.influx_url(), None, None, Duration::from_secs(10));
            let q = format!(
                "CREATE USER {} WITH PASSWORD {} WITH ALL PRIVILEGES",
                crate::influx::ident(user),
                crate::influx::literal(pass.expose())
            );
            // The statement carries the password: the error names the user only.
            anon.query(None, &q).await.map_err(|e| LocalError::Start {
                addr: a.clone(),
                what: format!(
                    "create admin user {user:?}: {}",
                    match e {
                        crate::influx::InfluxError::Query { .. } =>
                            "the server refused the statement".to_string(),
                        other => other.to_string(),
                    }
                ),
            })?;
        }
        if opts.ssh.is_some() {
            vm.wait_ssh().await?;
        }
        Ok(vm)
    }

    fn influxd_config(&self) -> String {
        let d = self.dir.display();
        let auth = self.opts.admin.is_some();
        format!(
            r#"reporting-disabled = true
bind-address = "{a}:{RPC_PORT}"
[meta]
  dir = "{d}/meta"
[data]
  dir = "{d}/data"
  wal-dir = "{d}/wal"
  query-log-enabled = false
{data}[http]
  bind-address = "{a}:{HTTP_PORT}"
  auth-enabled = {auth}
  log-enabled = false
  pprof-enabled = false
[subscriber]
  # one forwarding goroutine per subscription keeps captured writes in arrival order
  write-concurrency = 1
  write-buffer-size = 10000
[logging]
  level = "warn"
[monitor]
{monitor}[continuous_queries]
  log-enabled = false
"#,
            a = self.addr,
            data = self
                .opts
                .data_settings
                .iter()
                .map(|(k, v)| format!("  {k} = {v}\n"))
                .collect::<String>(),
            monitor = match self.opts.monitor_store {
                Some(every) => format!(
                    "  store-enabled = true\n  store-interval = \"{}ms\"\n",
                    every.as_millis()
                ),
                None => "  store-enabled = false\n".into(),
            },
        )
    }

    /// (Re)start `influxd` and wait for `/ping`.
    pub async fn start_influxd(&mut self) -> Result<(), LocalError> {
        let a = self.addr.to_string();
        let io = |what: &str, source| LocalError::Io {
            addr: a.clone(),
            what: what.into(),
            source,
        };
        let conf = self.dir.join("influxdb.conf");
        std::fs::write(&conf, self.influxd_config()).map_err(|e| io("write influxdb.conf", e))?;
        let log =
            File::create(self.dir.join("influxd.log")).map_err(|e| io("create influxd.log", e))?;
        let log2 = log.try_clone().map_err(|e| io("dup log", e))?;
        let child = tokio::process::Command::new("influxd")
            .arg("run")
            .arg("-config")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(!self.opts.detached)
            .process_group(0)
            .spawn()
            .map_err(|e| {
                io(
                    "start influxd (is the Debian package influxdb installed?)",
                    e,
                )
            })?;
        self.influxd = Some(child);
        let client = Influx::new(&self.influx_url(), None, None, Duration::from_secs(2));
        client
            .wait_ready(Duration::from_secs(30))
            .await
            .map_err(|e| LocalError::Start {
                addr: a.clone(),
                what: format!(
                    "influxd did not answer /ping: {e} (log: {}/influxd.log)",
                    self.dir.display()
                ),
            })
    }

    /// Kill `influxd` (SIGKILL) without removing its data: a crash, for fault tests.
    pub async fn kill_influxd(&mut self) {
        if let Some(mut c) = self.influxd.take() {
            let _ = c.kill().await;
        }
    }

    /// Stop the VM's sshd (a host whose SSH is not up yet, or gone).
    pub async fn stop_sshd(&mut self) {
        if let Some(mut c) = self.sshd.take() {
            let _ = c.kill().await;
        }
    }

    /// Start (or restart) the VM's sshd with `keys` and wait until it listens.
    pub async fn restart_sshd(&mut self, keys: &SshKeys) -> Result<(), LocalError> {
        self.stop_sshd().await;
        self.start_sshd(keys)?;
        self.wait_ssh().await
    }

    fn start_sshd(&mut self, keys: &SshKeys) -> Result<(), LocalError> {
        let a = self.addr.to_string();
        let io = |what: &str, source| LocalError::Io {
            addr: a.clone(),
            what: what.into(),
            source,
        };
        std::fs::create_dir_all("/run/sshd").map_err(|e| io("create /run/sshd", e))?;
        let auth = self.dir.join("authorized_keys");
        let client_pub = std::fs::read_to_string(keys.client_key.with_extension("pub"))
            .map_err(|e| io("read client public key", e))?;
        std::fs::write(&auth, client_pub).map_err(|e| io("write authorized_keys", e))?;
        let conf = self.dir.join("sshd_config");
        // `SHLVL=1`: Debian's bash sources the user's ~/.bashrc for every command sshd
        // runs, unless it is a nested shell. These VMs log in as this machine's root, whose
        // ~/.bashrc is the developer's (here pyenv's init: 0.12 s of CPU per command, most
        // of a small migration's prepare); a VM's is Debian's default, which costs nothing.
        std::fs::write(
            &conf,
            format!(
                "ListenAddress {a}:{SSH_PORT}\nHostKey {hk}\nPidFile {d}/sshd.pid\nAuthorizedKeysFile {auth}\n\
                 PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
                 UsePAM no\nStrictModes no\nLogLevel ERROR\nMaxSessions 50\nMaxStartups 50:30:100\n\
                 SetEnv SHLVL=1\n",
                hk = keys.host_key.display(),
                d = self.dir.display(),
                auth = auth.display()
            ),
        )
        .map_err(|e| io("write sshd_config", e))?;
        let log = File::create(self.dir.join("sshd.log")).map_err(|e| io("create sshd.log", e))?;
        let child = tokio::process::Command::new("/usr/sbin/sshd")
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(!self.opts.detached)
            .process_group(0)
            .spawn()
            .map_err(|e| {
                io(
                    "start sshd (is the Debian package openssh-server installed?)",
                    e,
                )
            })?;
        self.sshd = Some(child);
        keys.trust(self.addr, SSH_PORT)?;
        Ok(())
    }

    async fn wait_ssh(&self) -> Result<(), LocalError> {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(10) {
            if tokio::net::TcpStream::connect((self.addr, SSH_PORT))
                .await
                .is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(LocalError::Start {
            addr: self.addr.to_string(),
            what: format!(
                "sshd did not listen on port {SSH_PORT} (log: {}/sshd.log)",
                self.dir.display()
            ),
        })
    }

    /// Process ids of the VM's `influxd` and `sshd`.
    pub fn pids(&self) -> Vec<u32> {
        [&self.influxd, &self.sshd]
            .into_iter()
            .flatten()
            .filter_map(|c| c.id())
            .collect()
    }

    pub fn influx_url(&self) -> String {
        format!("http://{}:{HTTP_PORT}", self.addr)
    }

    /// A client for this VM's InfluxDB, with the admin credentials if any.
    pub fn client(&self) -> Influx {
        let (u, p) = match &self.opts.admin {
            Some((u, p)) => (Some(u.as_str()), Some(p)),
            None => (None, None),
        };
        Influx::new(&self.influx_url(), u, p, Duration::from_secs(30))
    }

    /// The configuration block that names this VM as a migration source or target.
    pub fn instance_config(&self, name: &str) -> InstanceConfig {
        InstanceConfig {
            name: name.to_string(),
            influx_url: self.influx_url(),
            rpc_address: format!("{}:{RPC_PORT}", self.addr),
            username: self.opts.admin.as_ref().map(|(u, _)| u.clone()),
            password: self.opts.admin.as_ref().map(|(_, p)| p.clone()),
            password_file: None,
            ssh: self.opts.ssh.as_ref().map(|k| self.ssh_config(k)),
            work_dir: self.dir.join("work").display().to_string(),
            timeout: Duration::from_secs(30),
        }
    }

    pub fn ssh_config(&self, keys: &SshKeys) -> SshConfig {
        SshConfig {
            host: self.addr.to_string(),
            port: SSH_PORT,
            user: "root".into(),
            identity_file: Some(keys.client_key.clone()),
            known_hosts_file: Some(keys.known_hosts.clone()),
            host_key_check: HostKeyCheck::Strict,
            host_keys: Vec::new(),
            connect_timeout: Duration::from_secs(5),
            ready_timeout: Duration::from_secs(20),
        }
    }

    /// Stop every process and remove the VM's directory.
    pub async fn destroy(mut self) -> Result<(), LocalError> {
        self.kill_influxd().await;
        if let Some(mut c) = self.sshd.take() {
            let _ = c.kill().await;
        }
        std::fs::remove_dir_all(&self.dir).map_err(|source| LocalError::Io {
            addr: self.addr.to_string(),
            what: "remove directory".into(),
            source,
        })
    }
}

/// Whether process `pid` is alive and its command line names a path under `dir`
/// (pids are recycled; `dir/` with the slash, so `stacks/a` never matches `stacks/ab`).
fn pid_under(pid: u32, dir: &Path) -> bool {
    let needle = format!("{}/", dir.display());
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(&needle))
        .unwrap_or(false)
}

/// Every live process whose command line names a path under `dir`.
fn pids_under(dir: &Path) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid_under(pid, dir))
        .collect()
}

/// Stop the processes of a VM whose files are under `dir`: SIGTERM, then SIGKILL after
/// 5 s. Only pids whose command line still names `dir` are signalled.
pub async fn stop_pids(pids: &[u32], dir: &Path) {
    let signal = |sig: &str, pid: u32| {
        let _ = std::process::Command::new("kill")
            .args([sig, &pid.to_string()])
            .stderr(Stdio::null())
            .status();
    };
    let live: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|&p| pid_under(p, dir))
        .collect();
    for &p in &live {
        signal("-TERM", p);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while live.iter().any(|&p| pid_under(p, dir)) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for &p in live.iter().filter(|&&p| pid_under(p, dir)) {
        signal("-KILL", p);
    }
}

// ---------------------------------------------------------------- the local provider

use super::{StackError, StackOutputs, StackProvider, StackRef, StackSpec, StackStatus};

/// The state of one local stack, on disk (`<dir>/stacks/<name>/stack.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct StackState {
    version: u32,
    id: String,
    name: String,
    addr: Ipv4Addr,
    pids: Vec<u32>,
    outputs: StackOutputs,
}

/// The embedded stack provider: each stack is one local VM (an `influxd` and an `sshd`
/// on its own loopback address) whose processes outlive the orchestrator. Its state is
/// on disk, so a restarted orchestrator finds its stacks again. Parameters: `disk_mb`
/// (the VM's files on a filesystem of that size), `monitor_store_ms` (its InfluxDB
/// stores its own statistics in `_internal` at that interval).
pub struct LocalStacks {
    dir: PathBuf,
    keys: SshKeys,
    subnet: u8,
}

impl LocalStacks {
    /// Stacks under `dir` (created), reached with the SSH keys under `dir/keys`.
    pub fn new(dir: &Path, subnet: u8) -> Result<LocalStacks, LocalError> {
        std::fs::create_dir_all(dir.join("stacks")).map_err(|source| LocalError::Io {
            addr: "local stacks".into(),
            what: format!("create {}", dir.display()),
            source,
        })?;
        Ok(LocalStacks {
            dir: dir.to_path_buf(),
            keys: SshKeys::ensure(&dir.join("keys"))?,
            subnet,
        })
    }

    pub fn keys(&self) -> &SshKeys {
        &self.keys
    }

    fn stack_dir(&self, name: &str) -> PathBuf {
        self.dir.join("stacks").join(name)
    }

    /// After a stack's directory is removed: a command that a killed orchestrator had
    /// already sent over SSH may start only now (its session outlives the VM's sshd) and
    /// recreate files there (`mkdir -p`, then an `influxd backup` retrying for minutes).
    /// Found by the crash campaign. Look again, briefly, and remove what came back.
    async fn remove_late_arrivals(&self, sdir: &Path) -> Result<(), StackError> {
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let late = pids_under(sdir);
            if late.is_empty() && !sdir.exists() {
                return Ok(());
            }
            stop_pids(&late, sdir).await;
            if sdir.exists() {
                remove_stack_dir(sdir)
                    .await
                    .map_err(|e| self.err(format!("{}: {e}", sdir.display())))?;
            }
        }
        Ok(())
    }

    /// Whether anything of stack `name` is on disk, state or not (a create or a delete
    /// cut short by a crash leaves a directory without state; [`StackProvider::delete`]
    /// removes it by name).
    pub fn has_remains(&self, name: &str) -> bool {
        self.stack_dir(name).exists()
    }

    fn err(&self, msg: impl Into<String>) -> StackError {
        StackError::Other {
            provider: self.describe(),
            msg: msg.into(),
        }
    }

    fn load(&self, name: &str) -> Result<Option<StackState>, StackError> {
        let p = self.stack_dir(name).join("stack.json");
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| self.err(format!("{}: unreadable stack state: {e}", p.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err(format!("{}: {e}", p.display()))),
        }
    }

    fn alive(st: &StackState, dir: &Path) -> bool {
        !st.pids.is_empty() && st.pids.iter().all(|&pid| pid_under(pid, dir))
    }

    /// The instance config that names a local stack as a migration source or target.
    pub fn instance_config(&self, name: &str, outputs: &StackOutputs) -> InstanceConfig {
        InstanceConfig {
            name: name.to_string(),
            influx_url: outputs.influxdb_url.clone(),
            rpc_address: format!("{}:{RPC_PORT}", outputs.influxdb_host),
            username: None,
            password: None,
            password_file: None,
            ssh: Some(SshConfig {
                host: outputs.ssh_host.clone(),
                port: outputs.ssh_port,
                user: "root".into(),
                identity_file: Some(self.keys.client_key.clone()),
                known_hosts_file: Some(self.keys.known_hosts.clone()),
                host_key_check: HostKeyCheck::Strict,
                host_keys: Vec::new(),
                connect_timeout: Duration::from_secs(5),
                ready_timeout: Duration::from_secs(30),
            }),
            work_dir: self.stack_dir(name).join("vm/work").display().to_string(),
            timeout: Duration::from_secs(30),
        }
    }
}

/// A stack's disk of `mb` MiB: a tmpfs mounted on its directory, so a local VM can run
/// out of space like a real one with a small flavor (needs root, as the tests run). For
/// tests and demos only: a tmpfs lives in RAM and is gone after a reboot.
async fn mount_disk(dir: &Path, mb: &str) -> Result<(), String> {
    let n: u32 = mb
        .parse()
        .ok()
        .filter(|&n| n > 0)
        .ok_or("expected a whole number of MiB, at least 1")?;
    let out = tokio::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={n}m,mode=0755"),
            "stateshift-disk",
        ])
        .arg(dir)
        .output()
        .await
        .map_err(|e| format!("cannot run mount: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "cannot mount a {n} MiB tmpfs on {} (root needed): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Remove a stack's directory, unmounting its disk first if it has one.
async fn remove_stack_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let own_disk = match (std::fs::metadata(dir), dir.parent().map(std::fs::metadata)) {
        (Ok(d), Some(Ok(p))) => d.dev() != p.dev(),
        _ => false,
    };
    if own_disk {
        // Lazy: a process that still holds a file there must not keep the disk forever.
        match tokio::process::Command::new("umount")
            .arg("-l")
            .arg(dir)
            .status()
            .await
        {
            Ok(st) if st.success() => {}
            other => {
                tracing::warn!(dir = %dir.display(), result = ?other, "could not unmount the stack's disk")
            }
        }
    }
    std::fs::remove_dir_all(dir)
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl StackProvider for LocalStacks {
    fn describe(&self) -> String {
        format!("local stacks in {}", self.dir.display())
    }

    /// Local VMs carry their own keys and run InfluxDB without authentication: nothing
    /// from `defaults` applies.
    fn reach(
        &self,
        stack: &StackRef,
        outputs: &StackOutputs,
        _defaults: &InstanceConfig,
    ) -> InstanceConfig {
        self.instance_config(&stack.name, outputs)
    }

    async fn create(&self, spec: &StackSpec) -> Result<(StackRef, StackOutputs), StackError> {
        if !valid_name(&spec.name) {
            return Err(StackError::Invalid {
                provider: self.describe(),
                msg: format!(
                    "stack name {:?}: use 1-64 letters, digits, '-' or '_'",
                    spec.name
                ),
            });
        }
        let sdir = self.stack_dir(&spec.name);
        // Claim the name atomically: a second create with the same name fails here.
        if let Err(e) = std::fs::create_dir(&sdir) {
            return Err(match e.kind() {
                std::io::ErrorKind::AlreadyExists => StackError::Duplicate {
                    name: spec.name.clone(),
                },
                _ => self.err(format!("{}: {e}", sdir.display())),
            });
        }
        if let Some(mb) = spec.parameters.get("disk_mb") {
            if let Err(msg) = mount_disk(&sdir, mb).await {
                let _ = std::fs::remove_dir(&sdir);
                return Err(StackError::Invalid {
                    provider: self.describe(),
                    msg: format!("parameter disk_mb={mb:?}: {msg}"),
                });
            }
        }
        // The InfluxDB stores its own statistics in `_internal` every N ms, as
        // Debian's default does every 10 s (off unless asked: a foreign source's case).
        let monitor_store = match spec.parameters.get("monitor_store_ms") {
            None => None,
            Some(ms) => match ms.parse::<u64>() {
                Ok(ms) if ms > 0 => Some(Duration::from_millis(ms)),
                _ => {
                    let _ = remove_stack_dir(&sdir).await;
                    return Err(StackError::Invalid {
                        provider: self.describe(),
                        msg: format!(
                            "parameter monitor_store_ms={ms:?}: a whole number of milliseconds above 0"
                        ),
                    });
                }
            },
        };
        let opts = VmOptions {
            ssh: Some(self.keys.clone()),
            admin: None,
            subnet: Some(self.subnet),
            detached: true,
            data_settings: Vec::new(),
            monitor_store,
        };
        let started =
            tokio::time::timeout(spec.timeout, LocalVm::start(&sdir.join("vm"), opts)).await;
        let vm = match started {
            Ok(Ok(vm)) => vm,
            other => {
                // Nothing half-made is left behind: its processes, then its files.
                stop_pids(&pids_under(&sdir), &sdir).await;
                let _ = remove_stack_dir(&sdir).await;
                return Err(match other {
                    Ok(Err(e)) => StackError::CreateFailed {
                        name: spec.name.clone(),
                        reason: e.to_string(),
                    },
                    _ => StackError::Timeout {
                        name: spec.name.clone(),
                        timeout: spec.timeout,
                        cleanup: "its processes were stopped and its directory removed".into(),
                    },
                });
            }
        };
        let mut raw = std::collections::BTreeMap::new();
        raw.insert(
            "influxdb_host".into(),
            serde_json::json!(vm.addr.to_string()),
        );
        raw.insert("influxdb_url".into(), serde_json::json!(vm.influx_url()));
        raw.insert("ssh_host".into(), serde_json::json!(vm.addr.to_string()));
        raw.insert("ssh_port".into(), serde_json::json!(SSH_PORT));
        let outputs = StackOutputs::from_raw(&spec.name, raw)?;
        let id = format!(
            "local-{}-{}",
            spec.name,
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0)
        );
        let st = StackState {
            version: 1,
            id: id.clone(),
            name: spec.name.clone(),
            addr: vm.addr,
            pids: vm.pids(),
            outputs: outputs.clone(),
        };
        let json = serde_json::to_vec_pretty(&st).map_err(|e| self.err(e.to_string()))?;
        if let Err(e) = crate::util::write_atomic(&sdir.join("stack.json"), &json) {
            stop_pids(&st.pids, &sdir).await;
            let _ = remove_stack_dir(&sdir).await;
            return Err(self.err(format!("cannot record stack state: {e}")));
        }
        Ok((
            StackRef {
                id,
                name: spec.name.clone(),
            },
            outputs,
        ))
    }

    async fn status(&self, stack: &StackRef) -> Result<StackStatus, StackError> {
        Ok(match self.load(&stack.name)? {
            Some(st) if st.id == stack.id => {
                if Self::alive(&st, &self.stack_dir(&stack.name)) {
                    StackStatus::Complete
                } else {
                    StackStatus::Failed("its influxd or sshd is not running".into())
                }
            }
            _ => StackStatus::Gone,
        })
    }

    async fn outputs(&self, stack: &StackRef) -> Result<StackOutputs, StackError> {
        match self.load(&stack.name)? {
            Some(st) if st.id == stack.id => Ok(st.outputs),
            _ => Err(self.err(format!(
                "stack {} ({}) does not exist",
                stack.name, stack.id
            ))),
        }
    }

    async fn delete(&self, stack: &StackRef, timeout: Duration) -> Result<(), StackError> {
        let sdir = self.stack_dir(&stack.name);
        let Some(st) = self.load(&stack.name)? else {
            // No state: gone, or an orchestrator crashed mid-create. Whatever runs from
            // the stack's directory is stopped and the directory removed.
            if sdir.exists() {
                stop_pids(&pids_under(&sdir), &sdir).await;
                remove_stack_dir(&sdir)
                    .await
                    .map_err(|e| self.err(format!("{}: {e}", sdir.display())))?;
                self.remove_late_arrivals(&sdir).await?;
            }
            return Ok(());
        };
        if st.id != stack.id {
            return Err(self.err(format!(
                "stack {} is now a different stack ({}), not deleting it",
                stack.name, st.id
            )));
        }
        // Every process working under the stack's directory goes, not only the recorded
        // influxd and sshd: a command an interrupted orchestrator started there (a backup,
        // a `mkdir -p`) would otherwise outlive it and recreate files after the delete.
        let mut pids = st.pids.clone();
        pids.extend(pids_under(&sdir));
        pids.sort_unstable();
        pids.dedup();
        if tokio::time::timeout(timeout, stop_pids(&pids, &sdir))
            .await
            .is_err()
        {
            return Err(StackError::Timeout {
                name: stack.name.clone(),
                timeout,
                cleanup: "its processes did not stop; the directory is kept".into(),
            });
        }
        remove_stack_dir(&sdir)
            .await
            .map_err(|e| self.err(format!("{}: {e}", sdir.display())))?;
        self.remove_late_arrivals(&sdir).await
    }

    async fn find(&self, name: &str) -> Result<Option<StackRef>, StackError> {
        Ok(self.load(name)?.map(|st| StackRef {
            id: st.id,
            name: st.name,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> (tempfile::TempDir, SshKeys) {
        let tmp = tempfile::tempdir().unwrap();
        let keys = SshKeys::ensure(&tmp.path().join("keys")).unwrap();
        (tmp, keys)
    }

    fn entry(keys: &SshKeys, addr: Ipv4Addr) -> String {
        format!("[{addr}]:{SSH_PORT} {}", keys.host_pub().unwrap())
    }

    /// The public key `ssh-keygen` derives from the private key at `path` (type and body).
    fn derived(path: &Path) -> String {
        let out = std::process::Command::new("ssh-keygen")
            .arg("-y")
            .arg("-f")
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let s = String::from_utf8(out.stdout).unwrap();
        s.split_whitespace().take(2).collect::<Vec<_>>().join(" ")
    }

    #[test]
    fn a_key_left_without_its_public_half_gets_it_back() {
        let (tmp, keys) = keys();
        let before = keys.host_pub().unwrap();
        // What a process killed between the two files of the old ssh-keygen call left.
        std::fs::remove_file(keys.host_key.with_extension("pub")).unwrap();
        let again = SshKeys::ensure(&tmp.path().join("keys")).unwrap();
        assert_eq!(again.host_pub().unwrap(), before, "the same key");
    }

    #[test]
    fn a_public_half_of_another_key_is_replaced_by_the_keys_own() {
        let (tmp, keys) = keys();
        // A killed process linked a new key in place of a removed one, but not yet its
        // public half: the old key's stayed.
        std::fs::copy(
            keys.client_key.with_extension("pub"),
            keys.host_key.with_extension("pub"),
        )
        .unwrap();
        let again = SshKeys::ensure(&tmp.path().join("keys")).unwrap();
        assert_eq!(again.host_pub().unwrap(), derived(&keys.host_key));
    }

    #[test]
    fn callers_making_the_keys_at_once_all_get_the_same_whole_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("keys");
        let made: Vec<_> = std::thread::scope(|s| {
            let calls: Vec<_> = (0..8).map(|_| s.spawn(|| SshKeys::ensure(&dir))).collect();
            calls.into_iter().map(|c| c.join().unwrap()).collect()
        });
        let host = derived(&dir.join("host_ed25519"));
        for keys in made {
            let keys = keys.unwrap();
            assert_eq!(keys.host_pub().unwrap(), host);
        }
        let client = std::fs::read_to_string(dir.join("client_ed25519.pub")).unwrap();
        assert!(
            client.starts_with(&derived(&dir.join("client_ed25519"))),
            "{client}"
        );
        let mut left: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "client_ed25519",
                "client_ed25519.pub",
                "host_ed25519",
                "host_ed25519.pub",
                "known_hosts"
            ],
            "no scratch file left"
        );
    }

    #[test]
    fn trusting_a_host_keeps_every_byte_the_known_hosts_file_held() {
        let (_tmp, keys) = keys();
        // An operator's comment in Latin-1 and an entry with no final newline: not text
        // to `read_to_string`, which once made trust start from an empty file.
        let before = b"# caf\xe9 hosts\n[10.0.0.9]:22 ssh-ed25519 AAAAC3Nz";
        std::fs::write(&keys.known_hosts, before).unwrap();
        let a = Ipv4Addr::new(127, 0, 9, 1);
        keys.trust(a, SSH_PORT).unwrap();
        keys.trust(a, SSH_PORT).unwrap();
        let after = std::fs::read(&keys.known_hosts).unwrap();
        let mut want = before.to_vec();
        want.extend_from_slice(format!("\n{}\n", entry(&keys, a)).as_bytes());
        assert_eq!(
            String::from_utf8_lossy(&after),
            String::from_utf8_lossy(&want)
        );
    }

    #[test]
    fn hosts_trusted_at_once_from_several_threads_all_stay_trusted() {
        let (_tmp, keys) = keys();
        let addrs: Vec<Ipv4Addr> = (1..=200).map(|n| Ipv4Addr::new(127, 0, 9, n)).collect();
        std::thread::scope(|s| {
            for chunk in addrs.chunks(25) {
                let keys = &keys;
                s.spawn(move || {
                    for &a in chunk {
                        keys.trust(a, SSH_PORT).unwrap();
                    }
                });
            }
        });
        let text = std::fs::read_to_string(&keys.known_hosts).unwrap();
        let missing: Vec<_> = addrs
            .iter()
            .filter(|&&a| !text.lines().any(|l| l == entry(&keys, a)))
            .collect();
        assert!(missing.is_empty(), "entries lost: {missing:?}");
    }

    #[test]
    fn a_known_hosts_file_that_cannot_be_read_is_an_error_naming_it() {
        let (_tmp, keys) = keys();
        std::fs::remove_file(&keys.known_hosts).unwrap();
        std::fs::create_dir(&keys.known_hosts).unwrap();
        let err = keys
            .trust(Ipv4Addr::new(127, 0, 9, 1), SSH_PORT)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&keys.known_hosts.display().to_string()) && err.contains("read"),
            "{err}"
        );
    }
}
