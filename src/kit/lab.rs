//! A lab on one machine: a source and a target local VM (InfluxDB + sshd on their own
//! loopback addresses), SSH keys, and a configuration file naming them, as an operator
//! would write it. The demo, the benchmark and the tests start from here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use stateshift::config::Config;
use stateshift::stack::local::{LocalError, LocalVm, SshKeys, VmOptions};
use stateshift::util::Secret;

pub struct Lab {
    pub dir: PathBuf,
    pub keys: SshKeys,
    pub source: LocalVm,
    pub target: LocalVm,
    /// The writers' configuration file: holds the InfluxDB URL they write to.
    pub url_file: PathBuf,
    /// See [`LabOptions::synchronous_cutover`].
    pub synchronous_cutover: bool,
}

/// Options of a lab.
#[derive(Debug, Clone, Default)]
pub struct LabOptions {
    /// Enable InfluxDB authentication on both VMs with this admin user.
    pub admin: Option<(String, Secret)>,
    /// The cutover command waits until a running writer has moved (`cutover.synchronous`).
    pub synchronous_cutover: bool,
    /// More `[data]` settings of both VMs' InfluxDB ([`VmOptions::data_settings`]).
    pub data_settings: Vec<(String, String)>,
    /// The source's InfluxDB stores its statistics in `_internal` at this interval
    /// ([`VmOptions::monitor_store`]); the target never does.
    pub source_monitor_store: Option<Duration>,
}

impl Lab {
    /// Start a fresh lab in `dir` (whatever an earlier lab left there is removed).
    pub async fn start(dir: &Path, opts: LabOptions) -> Result<Lab, LocalError> {
        for sub in ["source", "target", "spool", "state"] {
            let _ = std::fs::remove_dir_all(dir.join(sub));
        }
        std::fs::create_dir_all(dir).map_err(|source| LocalError::Io {
            addr: "lab".into(),
            what: format!("create {}", dir.display()),
            source,
        })?;
        let keys = SshKeys::ensure(&dir.join("keys"))?;
        let vm = |name: &str| {
            let d = dir.join(name);
            let o = VmOptions {
                ssh: Some(keys.clone()),
                admin: opts.admin.clone(),
                subnet: None,
                detached: false,
                data_settings: opts.data_settings.clone(),
                monitor_store: opts.source_monitor_store.filter(|_| name == "source"),
            };
            async move { LocalVm::start(&d, o).await }
        };
        let (source, target) = tokio::join!(vm("source"), vm("target"));
        let (source, target) = (source?, target?);
        let url_file = dir.join("writer-url");
        std::fs::write(&url_file, source.influx_url()).map_err(|e| LocalError::Io {
            addr: "lab".into(),
            what: "write writer-url".into(),
            source: e,
        })?;
        Ok(Lab {
            dir: dir.to_path_buf(),
            keys,
            source,
            target,
            url_file,
            synchronous_cutover: opts.synchronous_cutover,
        })
    }

    /// The YAML an operator would write for this lab. `extra` is appended verbatim.
    pub fn config_yaml(&self, extra: &str) -> String {
        let inst = |name: &str, vm: &LocalVm| {
            let c = vm.instance_config(name);
            let ssh = c.ssh.as_ref().map(|s| {
                format!(
                    "  ssh:\n    host: \"{}\"\n    port: {}\n    user: root\n    identity_file: \"{}\"\n    known_hosts_file: \"{}\"\n    ready_timeout: 20s\n",
                    s.host,
                    s.port,
                    self.keys.client_key.display(),
                    self.keys.known_hosts.display()
                )
            });
            let user = c
                .username
                .as_ref()
                .map(|u| {
                    format!(
                        "  username: \"{u}\"\n  password_file: \"{}/{name}.password\"\n",
                        self.dir.display()
                    )
                })
                .unwrap_or_default();
            format!(
                "{name}:\n  name: {name}\n  influx_url: \"{}\"\n  rpc_address: \"{}\"\n  work_dir: \"{}\"\n{user}{}",
                c.influx_url,
                c.rpc_address,
                c.work_dir,
                ssh.unwrap_or_default()
            )
        };
        let d = self.dir.display();
        let command = if self.synchronous_cutover {
            // Waits for the writer's ack (when a writer runs); `cutover.timeout` bounds it.
            format!("command: \"printf '%s' {{target_url}} > {d}/writer-url && if [ -e {d}/writer-url.running ]; then until [ \\\"$(cat {d}/writer-url.ack 2>/dev/null)\\\" = {{target_url}} ]; do sleep 0.005; done; fi\"\n  synchronous: true")
        } else {
            format!("command: \"printf '%s' {{target_url}} > {d}/writer-url\"")
        };
        format!(
            "{}{}capture:\n  listen: \"127.0.0.1:0\"\n  spool_dir: \"{d}/spool\"\n  quiet_period: 2s\n  quiet_timeout: 60s\ncutover:\n  {command}\nmigration:\n  work_dir: \"{d}/state\"\n{extra}",
            inst("source", &self.source),
            inst("target", &self.target),
        )
    }

    /// Write the config (and password files, 0600) and load it back as the CLI would.
    pub fn write_config(&self, extra: &str) -> Result<(PathBuf, Config), String> {
        let path = self.dir.join("stateshift.yaml");
        std::fs::write(&path, self.config_yaml(extra))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        for (name, vm) in [("source", &self.source), ("target", &self.target)] {
            if let Some(p) = vm.instance_config(name).password {
                let f = self.dir.join(format!("{name}.password"));
                write_secret(&f, p.expose()).map_err(|e| format!("{}: {e}", f.display()))?;
            }
        }
        let cfg = Config::load(&path).map_err(|e| e.to_string())?;
        Ok((path, cfg))
    }

    pub async fn destroy(self) {
        let _ = self.source.destroy().await;
        let _ = self.target.destroy().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Create a file readable by its owner only and write a secret into it.
pub fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(secret.as_bytes())
}
