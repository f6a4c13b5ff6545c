//! The cloud path on real VMs (issue 10): the real Heat creates QEMU VMs (the VM lab:
//! `scripts/vmlab.sh` and its Heat plugin, mapped by `scripts/vmlab/env.yaml`) that boot
//! exactly the user_data Heat rendered from `heat-templates/` and `deploy/`, on the lab's
//! private network in the namespace `stateshift-lab`. Each test runs on a thread that
//! entered that namespace, so it reaches the VMs as the orchestrator does and the host's
//! Keystone, Heat and Zabbix through the lab's forwarders on their usual loopback ports.
//!
//! Lab tests run one at a time (a lock file in the lab directory; VMs under software
//! emulation share two cores) and delete every stack they made, also when they fail.
//! Their figures go to stderr as `LAB | ...` lines (`cargo nextest run --no-capture -E
//! 'test(lab::)'`).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use stateshift::config::SshConfig;
use stateshift::influx::Influx;
use stateshift::remote::{Host, Remote};
use stateshift::stack::heat::{Created, Heat};
use stateshift::stack::{StackOutputs, StackProvider, StackRef, StackSpec, StackStatus};
use stateshift::util::Secret;

use super::heat::{env as heat_env, password_cfg, unique, Env as HeatEnv};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
pub(crate) const IMAGE: &str = "debian-12-stateshift-lab";
pub(crate) const GATEWAY: &str = "192.168.77.1";
pub(crate) const CIDR: &str = "192.168.77.0/24";
pub(crate) const ZABBIX_SERVER: &str = "192.168.77.1:25051";

/// Print a figure line.
pub(crate) fn figure(line: &str) {
    eprintln!("LAB | {line}");
}

/// What `scripts/vmlab.sh up` left: lab.json.
pub(crate) struct LabInfo {
    pub(crate) netns: String,
    pub(crate) dir: PathBuf,
}

fn lab_info() -> LabInfo {
    let dir = std::env::var_os("STATESHIFT_VMLAB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/stateshift-vmlab"));
    let path = dir.join("lab.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: the VM lab is not up; run `scripts/vmlab.sh up` (as root) first",
            path.display()
        )
    });
    let v: Value = serde_json::from_str(&text).unwrap();
    LabInfo {
        netns: v["netns"].as_str().unwrap().to_string(),
        dir,
    }
}

/// Move the calling thread (and the threads and processes it starts later) into a network
/// namespace.
fn enter_netns(name: &str) {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/var/run/netns/{name}"))
        .unwrap_or_else(|e| panic!("network namespace {name}: {e} (run scripts/vmlab.sh up)"));
    // SAFETY: setns on a valid descriptor of a network namespace affects this thread only.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {name}: {}", std::io::Error::last_os_error());
}

/// Run a lab test: on its own thread inside the lab's namespace, with its own runtime;
/// every stack whose name starts with the test's prefix is deleted at the end, also when
/// the test failed.
pub(crate) fn lab_test<F, Fut>(tag: &str, f: F)
where
    F: FnOnce(Arc<Lab>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let tag = tag.to_string();
    let t = std::thread::spawn(move || {
        let info = lab_info();
        // One lab test at a time, whichever runner runs them.
        let lock = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(info.dir.join("tests.lock"))
            .unwrap();
        lock.lock().unwrap();
        enter_netns(&info.netns);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let lab = Arc::new(rt.block_on(Lab::new(&tag, info)));
        let task = rt.spawn(f(lab.clone()));
        let r = rt.block_on(task);
        if r.is_err() && std::env::var_os("STATESHIFT_LAB_KEEP").is_some() {
            eprintln!(
                "STATESHIFT_LAB_KEEP: the stacks and VMs of {} are kept for a look",
                lab.tag
            );
            if let Err(e) = r {
                std::panic::resume_unwind(e.into_panic());
            }
        }
        let left = rt.block_on(lab.cleanup());
        match r {
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("test task: {e}"),
            Ok(()) => assert!(left.is_empty(), "left behind: {left:?}"),
        }
    });
    if let Err(p) = t.join() {
        std::panic::resume_unwind(p)
    }
}

/// One lab test's view of the lab.
pub(crate) struct Lab {
    /// Prefix of every stack (and so every VM) this test makes.
    pub(crate) tag: String,
    pub(crate) info: LabInfo,
    pub(crate) heat: Heat,
    pub(crate) env: HeatEnv,
    /// The "Nova key pair" the VMs authorise, and its private half.
    pub(crate) keypair: String,
    pub(crate) key: PathBuf,
    _keydir: tempfile::TempDir,
}

impl Lab {
    async fn new(tag: &str, info: LabInfo) -> Lab {
        let env = heat_env();
        let heat = Heat::new(password_cfg(&env)).unwrap();
        let tag = unique(tag);
        let keydir = tempfile::Builder::new()
            .prefix("ss-lab")
            .tempdir_in("/tmp")
            .unwrap();
        let key = keydir.path().join("id_ed25519");
        let st = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", &tag, "-f"])
            .arg(&key)
            .status()
            .unwrap();
        assert!(st.success());
        let keypair = tag.clone();
        std::fs::create_dir_all(info.dir.join("keypairs")).unwrap();
        std::fs::copy(
            key.with_extension("pub"),
            info.dir.join("keypairs").join(format!("{keypair}.pub")),
        )
        .unwrap();
        Lab {
            tag,
            info,
            heat,
            env,
            keypair,
            key,
            _keydir: keydir,
        }
    }

    /// A stack spec for a template of this repository, with the lab's environment.
    pub(crate) fn spec(
        &self,
        name: &str,
        template: &str,
        params: &[(&str, &str)],
        secrets: &[(&str, &str)],
    ) -> StackSpec {
        StackSpec {
            name: name.into(),
            template: PathBuf::from(format!("{ROOT}/{template}")),
            parameters: params
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            secret_parameters: secrets
                .iter()
                .map(|(k, v)| (k.to_string(), Secret::new(*v)))
                .collect(),
            environment_files: vec![lab_env()],
            timeout: Duration::from_secs(1500),
        }
    }

    /// Create and wait; on failure, show the VMs' consoles.
    pub(crate) async fn create(&self, spec: &StackSpec) -> (Created, Duration) {
        let t = Instant::now();
        match self.heat.create_raw(spec).await {
            Ok(c) => (c, t.elapsed()),
            Err(e) => panic!("{}: create: {e}\n{}", spec.name, self.consoles()),
        }
    }

    /// An InfluxDB stack from heat-templates/influxdb.yaml.
    pub(crate) fn influxdb_spec(
        &self,
        name: &str,
        admin_pw: &str,
        extra: &[(&str, &str)],
    ) -> StackSpec {
        let mut params = vec![
            ("image", IMAGE),
            ("network", "lab"),
            ("key_name", self.keypair.as_str()),
            ("zabbix_server", ZABBIX_SERVER),
            ("access_cidr", CIDR),
        ];
        params.extend_from_slice(extra);
        self.spec(
            name,
            "heat-templates/influxdb.yaml",
            &params,
            &[("influxdb_admin_password", admin_pw)],
        )
    }

    /// SSH to a lab VM as its default user, its host keys pinned.
    pub(crate) async fn ssh(&self, host: &str, host_keys: Vec<String>) -> Host {
        let cfg = SshConfig {
            host: host.into(),
            port: 22,
            user: "debian".into(),
            identity_file: Some(self.key.clone()),
            known_hosts_file: None,
            host_key_check: stateshift::config::HostKeyCheck::Strict,
            host_keys,
            connect_timeout: Duration::from_secs(10),
            ready_timeout: Duration::from_secs(120),
        };
        Host::connect(Some(&cfg))
            .await
            .unwrap_or_else(|e| panic!("ssh {host}: {e}"))
    }

    /// The end of every console of this test's VMs (for failure messages).
    pub(crate) fn consoles(&self) -> String {
        let mut out = String::new();
        for (dir, name) in self.vms() {
            let log = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(25).collect();
            out.push_str(&format!("--- console of {name} (last lines)\n"));
            for l in tail.into_iter().rev() {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// This test's VMs that are still running: (directory, name).
    pub(crate) fn vms(&self) -> Vec<(PathBuf, String)> {
        let mut v = Vec::new();
        if let Ok(rd) = std::fs::read_dir(self.info.dir.join("vms")) {
            for e in rd.flatten() {
                let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
                let alive = std::fs::read_to_string(e.path().join("qemu.pid"))
                    .ok()
                    .and_then(|p| p.trim().parse::<i32>().ok())
                    // SAFETY: kill with signal 0 only checks that the process exists.
                    .is_some_and(|pid| unsafe { libc::kill(pid, 0) } == 0);
                if name.starts_with(&self.tag) && alive {
                    v.push((e.path(), name));
                }
            }
        }
        v
    }

    /// This test's stacks in Heat (by name prefix), undeleted.
    pub(crate) async fn stacks(&self) -> Vec<StackRef> {
        let url = format!("{}/stacks", self.heat.endpoint().await.unwrap());
        let v = get_json(&self.heat, &url).await;
        v["stacks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| {
                s["stack_name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(&self.tag))
                    && s["stack_status"].as_str() != Some("DELETE_COMPLETE")
            })
            .map(|s| StackRef {
                id: s["id"].as_str().unwrap().into(),
                name: s["stack_name"].as_str().unwrap().into(),
            })
            .collect()
    }

    /// Delete every stack of this test; returns what is still there afterwards (stacks
    /// and running VMs).
    async fn cleanup(&self) -> Vec<String> {
        for s in self.stacks().await {
            if let Err(e) = self.heat.delete(&s, Duration::from_secs(300)).await {
                eprintln!("cleanup: {}: {e}", s.name);
            }
        }
        let _ = std::fs::remove_file(
            self.info
                .dir
                .join("keypairs")
                .join(format!("{}.pub", self.keypair)),
        );
        // The hosts this test's VMs registered in Zabbix.
        let mut z = super::zabbix::client(&super::zabbix::env());
        if let Ok(hosts) = z
            .call::<Vec<Value>>(
                "host.get",
                serde_json::json!({"output": ["hostid", "host"], "search": {"host": self.tag}, "startSearch": true}),
            )
            .await
        {
            let ids: Vec<Value> = hosts.iter().map(|h| h["hostid"].clone()).collect();
            if !ids.is_empty() {
                let _ = z.call::<Value>("host.delete", Value::Array(ids)).await;
            }
        }
        let mut left: Vec<String> = self
            .stacks()
            .await
            .into_iter()
            .map(|s| format!("stack {}", s.name))
            .collect();
        left.extend(self.vms().into_iter().map(|(_, n)| format!("VM {n}")));
        left
    }
}

pub(crate) fn lab_env() -> PathBuf {
    PathBuf::from(format!("{ROOT}/scripts/vmlab/env.yaml"))
}

pub(crate) async fn get_json(h: &Heat, url: &str) -> Value {
    let r = reqwest::Client::new()
        .get(url)
        .header("X-Auth-Token", h.token().await.unwrap().expose())
        .header("Connection", "close")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{url}: {}", r.status());
    r.json().await.unwrap()
}

/// A random password of letters and digits.
pub(crate) fn password(len: usize) -> String {
    use std::io::Read;
    let mut b = vec![0u8; len];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut b)
        .unwrap();
    const A: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    b.iter().map(|x| A[*x as usize % A.len()] as char).collect()
}

/// An InfluxDB on a lab VM, with credentials.
pub(crate) fn influx(url: &str, user: &str, pw: &str) -> Influx {
    Influx::new(
        url,
        Some(user),
        Some(&Secret::new(pw)),
        Duration::from_secs(30),
    )
}

/// The service's databases and the user Cyclops writes as, as an operator provisions them.
pub(crate) async fn provision(admin: &Influx, cyclops_pw: &str) {
    for q in [
        "CREATE DATABASE udr_service".to_string(),
        "CREATE DATABASE rc_service".to_string(),
        "CREATE DATABASE billing_service".to_string(),
        format!("CREATE USER cyclops WITH PASSWORD '{cyclops_pw}'"),
        "GRANT ALL ON udr_service TO cyclops".to_string(),
        "GRANT ALL ON rc_service TO cyclops".to_string(),
        "GRANT ALL ON billing_service TO cyclops".to_string(),
    ] {
        admin.query(None, &q).await.unwrap();
    }
}

// ------------------------------------------------------------------ the writers' ledgers

/// What the Cyclops stand-ins acknowledged, per service.
pub(crate) struct Ledgers {
    /// service -> (instance, timestamp) -> last acknowledged value
    pub(crate) points: BTreeMap<String, HashMap<(String, i64), f64>>,
    /// service -> the InfluxDB URLs it wrote to, in order, each with its number of acks
    pub(crate) urls: BTreeMap<String, Vec<(String, u64)>>,
    pub(crate) acked: u64,
    pub(crate) failed_requests: u64,
}

/// Read the stand-ins' ledgers and stats on the Cyclops VM, with the writers stopped
/// (they overwrite points they acknowledged earlier: a ledger read while they run could
/// lag the database), then start them again when `restart`.
pub(crate) async fn ledgers(cyclops: &Host, restart: bool) -> Ledgers {
    const UNITS: &str = "cyclops-udr cyclops-rc cyclops-billing";
    cyclops
        .run(&format!("sudo systemctl stop {UNITS}"))
        .await
        .unwrap();
    let mut l = Ledgers {
        points: BTreeMap::new(),
        urls: BTreeMap::new(),
        acked: 0,
        failed_requests: 0,
    };
    for svc in ["udr", "rc", "billing"] {
        let text = cyclops
            .run(&format!("sudo cat /var/lib/cyclops/{svc}.ledger"))
            .await
            .unwrap();
        let points = l.points.entry(svc.into()).or_default();
        let urls = l.urls.entry(svc.into()).or_default();
        for line in text.lines() {
            let (url, lp) = line.split_once('\t').unwrap();
            match urls.last_mut() {
                Some((u, n)) if u == url => *n += 1,
                _ => urls.push((url.to_string(), 1)),
            }
            // usage,svc=S,instance=iN value=V,seq=Ki TS
            let mut parts = lp.split(' ');
            let series = parts.next().unwrap();
            let fields = parts.next().unwrap();
            let ts: i64 = parts.next().unwrap().parse().unwrap();
            let instance = series.split("instance=").nth(1).unwrap().to_string();
            let value: f64 = fields
                .split(',')
                .find_map(|f| f.strip_prefix("value="))
                .unwrap()
                .parse()
                .unwrap();
            points.insert((instance, ts), value);
            l.acked += 1;
        }
        let stats: Value = serde_json::from_str(
            &cyclops
                .run(&format!("sudo cat /var/lib/cyclops/{svc}.stats"))
                .await
                .unwrap(),
        )
        .unwrap();
        l.failed_requests += stats["failed_requests"].as_u64().unwrap();
    }
    if restart {
        cyclops
            .run(&format!("sudo systemctl start {UNITS}"))
            .await
            .unwrap();
    }
    l
}

/// Every acknowledged point is on `on` with its last acknowledged value; returns the
/// number of points checked.
pub(crate) async fn assert_ledgers_on(l: &Ledgers, on: &Influx) -> usize {
    let mut checked = 0;
    for (svc, want) in &l.points {
        let db = format!("{svc}_service");
        let mut have: HashMap<(String, i64), f64> = HashMap::new();
        on.query_chunked(
            &db,
            "SELECT value FROM usage WHERE time >= -9223372036854775806 AND time <= 9223372036854775806 GROUP BY instance",
            10_000,
            |s| {
                let inst = s
                    .tags
                    .as_ref()
                    .and_then(|t| t.get("instance"))
                    .cloned()
                    .unwrap_or_default();
                for row in &s.values {
                    let ts = row[0].as_i64().unwrap();
                    let v = row[1].as_f64().unwrap();
                    have.insert((inst.clone(), ts), v);
                }
                Ok(())
            },
        )
        .await
        .unwrap();
        let missing: Vec<_> = want
            .keys()
            .filter(|k| !have.contains_key(*k))
            .take(5)
            .collect();
        assert!(
            missing.is_empty(),
            "{svc}: {} acknowledged points missing on {}, e.g. {missing:?}",
            want.keys().filter(|k| !have.contains_key(*k)).count(),
            on.url()
        );
        let wrong: Vec<_> = want
            .iter()
            .filter(|(k, v)| (have[*k] - **v).abs() > 1e-9)
            .take(5)
            .collect();
        assert!(
            wrong.is_empty(),
            "{svc}: values differ from the last acknowledged ones: {wrong:?}"
        );
        checked += want.len();
    }
    checked
}

// ------------------------------------------------------------------ serving the binary

/// Serve one file over HTTP on `addr` (the SO VM downloads stateshift from here).
pub(crate) async fn serve_file(addr: &str, path: &Path) -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let url = format!("http://{}/stateshift", listener.local_addr().unwrap());
    let bytes = Arc::new(std::fs::read(path).unwrap());
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                break;
            };
            let bytes = bytes.clone();
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut req = Vec::new();
                let mut buf = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
                    bytes.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(&bytes).await;
                let _ = s.shutdown().await;
            });
        }
    });
    (url, task)
}

/// The stateshift binary the tests built, without its debug sections (what a release
/// download would be, and 4x smaller to push into an emulated VM), and its SHA-256.
pub(crate) fn stripped_binary(dir: &Path) -> (PathBuf, String) {
    let out = dir.join("stateshift");
    let st = std::process::Command::new("objcopy")
        .arg("--strip-debug")
        .arg(env!("CARGO_BIN_EXE_stateshift"))
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success(), "objcopy --strip-debug");
    let sum = std::process::Command::new("sha256sum")
        .arg(&out)
        .output()
        .unwrap();
    let sum = String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    (out, sum)
}

// ------------------------------------------------------------------ the SO's API

/// The names so-stack's `api_names` gives the API's certificate in the lab test.
const SO_NAME: &str = "so.rcbaas.lab";
const SO_EXTRA_IP: &str = "192.0.2.7";

/// The API's certificate holds the SO VM's fixed IP and the stack's `api_names`, and a
/// client that reaches the API by one of those names (as an operator's DNS would) trusts it.
async fn api_reached_by_name(api: &Api, ca_pem: &str, so_ip: &str) {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("api.crt");
    std::fs::write(&pem, ca_pem).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(&pem)
        .output()
        .unwrap();
    let sans = String::from_utf8_lossy(&out.stdout);
    for want in [
        format!("IP Address:{so_ip}"),
        format!("DNS:{SO_NAME}"),
        format!("IP Address:{SO_EXTRA_IP}"),
    ] {
        assert!(sans.contains(&want), "{want} in the certificate: {sans}");
    }
    let port = reqwest::Url::parse(&api.url)
        .unwrap()
        .port_or_known_default()
        .unwrap();
    let addr: std::net::SocketAddr = format!("{so_ip}:{port}").parse().unwrap();
    let by_name = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap())
        .resolve(SO_NAME, addr)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let r = by_name
        .get(format!("https://{SO_NAME}:{port}/healthz"))
        .send()
        .await
        .unwrap_or_else(|e| panic!("the API by its name {SO_NAME}: {e:?}"));
    assert!(
        r.status().is_success() || r.status().as_u16() == 503,
        "/healthz by name: {}",
        r.status()
    );
}

pub(crate) struct Api {
    pub(crate) url: String,
    pub(crate) client: reqwest::Client,
}

impl Api {
    pub(crate) fn new(url: &str, ca_pem: &str) -> Api {
        let cert = reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap();
        Api {
            url: url.trim_end_matches('/').to_string(),
            client: reqwest::Client::builder()
                .add_root_certificate(cert)
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        }
    }

    pub(crate) async fn status(&self) -> Value {
        let r = self
            .client
            .get(format!("{}/status", self.url))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "/status: {}", r.status());
        r.json().await.unwrap()
    }

    pub(crate) async fn migrate(&self, token: Option<&str>) -> u16 {
        let mut rb = self.client.post(format!("{}/migrate", self.url));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        rb.send().await.unwrap().status().as_u16()
    }

    /// Wait until the daemon has decided to start migration `n` (its state says
    /// `migrating` from the decision on, before the target stack is created; the
    /// migrations list has it from its first journal record on, a moment later); the
    /// status then.
    pub(crate) async fn wait_migration_decided(&self, n: usize, timeout: Duration) -> Value {
        let t = Instant::now();
        let mut last = Value::Null;
        while t.elapsed() < timeout {
            last = self.status().await;
            let listed = last["migrations"].as_array().map_or(0, |a| a.len());
            if last["state"] == "migrating" || listed >= n {
                return last;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        panic!("migration {n} was not decided within {timeout:?}; last status: {last:#}");
    }

    /// Wait until the status lists `n` finished migrations; the last one.
    pub(crate) async fn wait_migrations(&self, n: usize, timeout: Duration) -> Value {
        let t = Instant::now();
        let mut last = Value::Null;
        while t.elapsed() < timeout {
            last = self.status().await;
            let done: Vec<&Value> = last["migrations"]
                .as_array()
                .map(|a| a.iter().filter(|m| !m["outcome"].is_null()).collect())
                .unwrap_or_default();
            if done.len() >= n {
                return done[n - 1].clone();
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        panic!("{n} migration(s) did not finish within {timeout:?}; last status: {last:#}");
    }
}

/// The current status of a stack (Heat keeps deleted ones visible as gone).
pub(crate) async fn stack_status(h: &Heat, name: &str) -> Option<StackStatus> {
    let s = h.find(name).await.unwrap()?;
    Some(h.status(&s).await.unwrap())
}

/// The four outputs stateshift reads, and the pinned keys, of an InfluxDB stack.
pub(crate) fn influx_outputs(c: &Created) -> StackOutputs {
    StackOutputs::from_raw(&c.stack.name, c.outputs.clone()).unwrap()
}

// ------------------------------------------------------------------ the proof

/// The whole cloud path, on VMs that booted what Heat rendered: the operator's three
/// stacks (InfluxDB, the RCBaaS service with Cyclops stand-ins writing to it, the SO
/// deployed by deploy/so-stack.yaml), then a migration by `POST /migrate` and one by the
/// predictor from the VM's real load (read through the real Zabbix), each to a new VM
/// Heat creates; no acknowledged point lost by the writers' own ledgers, the writers on
/// the new host and off the old one, the old InfluxDB stack deleted and its Zabbix host
/// retired, the service stack intact, nothing left behind.
#[test]
fn the_service_moves_twice_between_heat_created_vms_by_api_and_by_prediction_losing_nothing() {
    lab_test("e2e", |lab| async move {
        let zenv = super::zabbix::env();
        let _zabbix_shared = super::zabbix::lock(&zenv, false);
        let admin_pw = password(20);
        let cyclops_pw = password(16);
        let tag = lab.tag.clone();

        // --- the operator's stacks: InfluxDB first, then the service, then the SO.
        let influx0_name = format!("{tag}-influx-0");
        let (influx0, took) = lab
            .create(&lab.influxdb_spec(&influx0_name, &admin_pw, &[("boot_timeout", "900")]))
            .await;
        let o0 = influx_outputs(&influx0);
        figure(&format!("InfluxDB stack: Heat create -> CREATE_COMPLETE with outputs (VM booted, InfluxDB answering, WaitCondition signalled): {:.1} s", took.as_secs_f64()));
        assert!(
            !o0.ssh_host_keys.is_empty(),
            "the VM reported its host keys"
        );
        let admin0 = influx(&o0.influxdb_url, "admin", &admin_pw);
        // Auth is on: no credentials, no data.
        assert!(
            Influx::new(&o0.influxdb_url, None, None, Duration::from_secs(10))
                .databases()
                .await
                .is_err()
        );
        provision(&admin0, &cyclops_pw).await;
        let seeded = crate::kit::workload::seed(
            &admin0,
            &crate::kit::workload::SeedSpec {
                db: "udr_service".into(),
                points: 20_000,
                series: 12,
                days: 10,
                measurements: 3,
                end_ns: super::common::now_ns(),
            },
        )
        .await
        .unwrap();

        let svc_name = format!("{tag}-svc");
        let (svc, took) = lab
            .create(&lab.spec(
                &svc_name,
                "heat-templates/rcbaas.yaml",
                &[
                    ("image", IMAGE),
                    ("network", "lab"),
                    ("key_name", &lab.keypair),
                    ("zabbix_server", ZABBIX_SERVER),
                    ("access_cidr", CIDR),
                    ("influxdb_url", &o0.influxdb_url),
                    ("boot_timeout", "900"),
                ],
                &[("influxdb_password", &cyclops_pw)],
            ))
            .await;
        figure(&format!(
            "service stack (Cyclops VM, writers started): {:.1} s",
            took.as_secs_f64()
        ));
        let cyclops_host = svc.outputs["cyclops_host"].as_str().unwrap().to_string();
        let cyclops_keys = stateshift::stack::host_keys(&svc.outputs["ssh_host_keys"]).unwrap();
        let cyclops = lab.ssh(&cyclops_host, cyclops_keys).await;

        let bin_dir = tempfile::tempdir().unwrap();
        let (bin, sha) = stripped_binary(bin_dir.path());
        let (bin_url, _server) = serve_file(&format!("{GATEWAY}:0"), &bin).await;
        let api_token = password(32);
        let so_name = format!("{tag}-so");
        let lab_environment = std::fs::read_to_string(lab_env()).unwrap();
        let zkey = std::fs::read_to_string(&lab.key).unwrap();
        let (so, took) = lab
            .create(&lab.spec(
                &so_name,
                "deploy/so-stack.yaml",
                &[
                    ("image", IMAGE),
                    ("network", "lab"),
                    ("key_name", &lab.keypair),
                    ("access_cidr", CIDR),
                    ("stateshift_url", &bin_url),
                    ("stateshift_sha256", &sha),
                    ("service_name", &tag),
                    ("influxdb_stack", &influx0_name),
                    ("influxdb_url", &o0.influxdb_url),
                    ("influxdb_host", &o0.ssh_host),
                    (
                        "influxdb_ssh_host_keys",
                        influx0.outputs["ssh_host_keys"].as_str().unwrap(),
                    ),
                    (
                        "zabbix_host",
                        influx0.outputs["zabbix_host"].as_str().unwrap(),
                    ),
                    ("cyclops_host", &cyclops_host),
                    (
                        "cyclops_ssh_host_keys",
                        svc.outputs["ssh_host_keys"].as_str().unwrap(),
                    ),
                    ("heat_auth_url", &format!("http://{GATEWAY}:25500/v3")),
                    ("heat_region", "LabNet"),
                    ("heat_username", &lab.env.username),
                    ("heat_project", &lab.env.project),
                    ("target_image", IMAGE),
                    ("target_key_name", &lab.keypair),
                    ("target_environment", &lab_environment),
                    ("target_boot_timeout", "900"),
                    ("target_create_timeout", "20m"),
                    ("zabbix_server", ZABBIX_SERVER),
                    (
                        "zabbix_api_url",
                        &format!("http://{GATEWAY}:25080/api_jsonrpc.php"),
                    ),
                    ("zabbix_user", &zenv.user),
                    ("threshold", "3.5"),
                    ("poll_interval", "5s"),
                    ("consecutive", "2"),
                    ("cooldown", "3m"),
                    ("boot_timeout", "900"),
                    ("api_names", &format!("{SO_NAME}, {SO_EXTRA_IP}")),
                ],
                &[
                    ("ssh_private_key", &zkey),
                    ("influxdb_admin_password", &admin_pw),
                    (
                        "influxdb_user_passwords",
                        &format!("{{cyclops: {cyclops_pw}}}"),
                    ),
                    ("heat_password", lab.env.password.expose()),
                    ("zabbix_password", zenv.password.expose()),
                    ("api_token", &api_token),
                ],
            ))
            .await;
        figure(&format!(
            "SO stack (VM, state volume, binary installed, daemon answering over TLS): {:.1} s",
            took.as_secs_f64()
        ));
        let report: Value =
            serde_json::from_str(so.outputs["boot_report"].as_str().unwrap()).unwrap();
        let api = Api::new(
            so.outputs["api_url"].as_str().unwrap(),
            report["api_certificate"].as_str().unwrap(),
        );
        api_reached_by_name(
            &api,
            report["api_certificate"].as_str().unwrap(),
            so.outputs["so_host"].as_str().unwrap(),
        )
        .await;
        let st = api.status().await;
        assert_eq!(st["source_url"], o0.influxdb_url.as_str(), "{st:#}");
        assert!(
            st["load_source"].as_str().unwrap().contains(&influx0_name),
            "the SO polls the InfluxDB VM's Zabbix host: {st:#}"
        );

        // --- migration 1: by hand, through the API.
        assert_eq!(api.migrate(None).await, 401, "no token, no migration");
        assert_eq!(api.migrate(Some("wrong-token-wrong-token")).await, 401);
        let t1 = Instant::now();
        let code = api.migrate(Some(&api_token)).await;
        assert!((200..300).contains(&code), "POST /migrate: {code}");
        let m1 = api.wait_migrations(1, Duration::from_secs(1500)).await;
        assert_eq!(m1["outcome"], "succeeded", "{m1:#}\n{}", lab.consoles());
        figure(&format!(
            "migration 1 (POST /migrate): {:.1} s end to end; phases {}",
            t1.elapsed().as_secs_f64(),
            m1["phases"]
        ));
        let target1 = m1["target"]["stack"]["name"].as_str().unwrap().to_string();
        let url1 = m1["target"]["influx_url"].as_str().unwrap().to_string();
        assert_ne!(url1, o0.influxdb_url);
        let st = api.status().await;
        assert_eq!(
            st["source_url"],
            url1.as_str(),
            "the SO follows the service"
        );
        assert!(
            matches!(
                stack_status(&lab.heat, &influx0_name).await,
                None | Some(StackStatus::Gone)
            ),
            "the old InfluxDB stack is deleted"
        );
        assert_eq!(
            stack_status(&lab.heat, &svc_name).await,
            Some(StackStatus::Complete),
            "the service stack is never touched"
        );
        let ledgers1 = ledgers(&cyclops, true).await;
        for (svc, urls) in &ledgers1.urls {
            let names: Vec<&str> = urls.iter().map(|(u, _)| u.as_str()).collect();
            assert_eq!(
                names,
                [o0.influxdb_url.as_str(), url1.as_str()],
                "{svc}: writes went to the old InfluxDB, then only to the new one"
            );
        }
        let admin1 = influx(&url1, "admin", &admin_pw);
        let checked = assert_ledgers_on(&ledgers1, &admin1).await;
        figure(&format!(
            "after migration 1: {} points acknowledged by the writers, {checked} distinct, all on the new VM ({url1}); {} failed write requests; {seeded} seeded points carried",
            ledgers1.acked, ledgers1.failed_requests
        ));
        assert_eq!(ledgers1.failed_requests, 0, "writers never saw an error");
        assert_eq!(
            crate::kit::workload::count_points(&admin1, "udr_service", "usage0")
                .await
                .unwrap()
                + crate::kit::workload::count_points(&admin1, "udr_service", "usage1")
                    .await
                    .unwrap()
                + crate::kit::workload::count_points(&admin1, "udr_service", "usage2")
                    .await
                    .unwrap(),
            seeded
        );
        // Zabbix: the old VM's host is retired, the new one registered itself.
        let mut z = super::zabbix::client(&zenv);
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let old = z.host_id(&influx0_name, "any").await.is_ok();
            let new = z.host_id(&target1, "any").await.is_ok();
            if !old && new {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "Zabbix: old host still there: {old}, new host registered: {new}"
            );
            tokio::time::sleep(Duration::from_secs(5)).await;
        }

        // --- migration 2: the predictor, from the new VM's real load.
        let t1_outputs: StackOutputs =
            serde_json::from_value(m1["target"]["outputs"].clone()).unwrap();
        let vm1 = lab
            .ssh(&t1_outputs.ssh_host, t1_outputs.ssh_host_keys.clone())
            .await;
        // CPU burners at the lowest priority (InfluxDB keeps serving the writers), bounded:
        // four runnable tasks lift the 1-minute load by ~4 (one vCPU).
        vm1.run("nohup sh -c 'for i in 1 2 3 4; do nice -n 19 timeout 1500 sh -c \"while :; do :; done\" & done; wait' >/dev/null 2>&1 &")
            .await
            .unwrap();
        let t2 = Instant::now();
        // The burners stop once the predictor has fired: the VMs booted for the migration
        // (each an emulated CPU on this machine's two cores) need the core they took.
        let decided = api
            .wait_migration_decided(2, Duration::from_secs(1800))
            .await;
        figure(&format!(
            "migration 2 decided {:.1} s after the load began (last decision: {}; window {})",
            t2.elapsed().as_secs_f64(),
            decided["last_decision"],
            decided["window"]
        ));
        // `[:]`: the pattern must not match the shell that runs pkill.
        let stopped = vm1
            .run("pkill -c -f 'while :; do [:]; done'; true")
            .await
            .unwrap();
        figure(&format!("burner processes stopped: {}", stopped.trim()));
        let m2 = api.wait_migrations(2, Duration::from_secs(1800)).await;
        assert_eq!(m2["outcome"], "succeeded", "{m2:#}\n{}", lab.consoles());
        let trigger = m2["trigger"].as_str().unwrap();
        assert!(
            trigger.starts_with("prediction"),
            "migration 2 was triggered by the predictor: {trigger}"
        );
        figure(&format!(
            "migration 2 ({trigger}): {:.1} s from the start of the load; phases {}",
            t2.elapsed().as_secs_f64(),
            m2["phases"]
        ));
        let target2 = m2["target"]["stack"]["name"].as_str().unwrap().to_string();
        let url2 = m2["target"]["influx_url"].as_str().unwrap().to_string();
        let t2_keys: Vec<String> =
            serde_json::from_value(m2["target"]["outputs"]["ssh_host_keys"].clone()).unwrap();
        // Neutron handed the freed address of the first VM to the new one: another VM,
        // other keys, same address. The SO connected because the keys came pinned from
        // the stack, not from a known_hosts entry learnt on first contact.
        assert_eq!(
            url2, o0.influxdb_url,
            "the lab reuses the first VM's address"
        );
        assert_ne!(
            t2_keys, o0.ssh_host_keys,
            "a new VM behind the reused address"
        );
        assert!(matches!(
            stack_status(&lab.heat, &target1).await,
            None | Some(StackStatus::Gone)
        ));
        assert_eq!(
            stack_status(&lab.heat, &svc_name).await,
            Some(StackStatus::Complete)
        );
        assert_eq!(
            stack_status(&lab.heat, &so_name).await,
            Some(StackStatus::Complete)
        );
        assert_eq!(
            stack_status(&lab.heat, &target2).await,
            Some(StackStatus::Complete)
        );

        // Let the writers go on a little on the final VM, then the last count.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let final_ledgers = ledgers(&cyclops, false).await;
        for (svc, urls) in &final_ledgers.urls {
            let names: Vec<&str> = urls.iter().map(|(u, _)| u.as_str()).collect();
            assert_eq!(
                names,
                [o0.influxdb_url.as_str(), url1.as_str(), url2.as_str()],
                "{svc}"
            );
        }
        let admin2 = influx(&url2, "admin", &admin_pw);
        let checked = assert_ledgers_on(&final_ledgers, &admin2).await;
        figure(&format!(
            "end: {} points acknowledged by the writers over both migrations, {checked} distinct, 0 lost, {} failed write requests; final InfluxDB {url2}",
            final_ledgers.acked, final_ledgers.failed_requests
        ));
        assert_eq!(final_ledgers.failed_requests, 0);
        let deadline = Instant::now() + Duration::from_secs(180);
        while z.host_id(&target1, "any").await.is_ok() {
            assert!(
                Instant::now() < deadline,
                "Zabbix host {target1} not retired"
            );
            tokio::time::sleep(Duration::from_secs(5)).await;
        }

        // --- the documented upgrade on the SO VM (the same binary here): the daemon stops
        // at a safe point, comes back with its history from the volume; its log reaches
        // the journal with priorities (the two "migration succeeded" lines are warnings).
        let so_keys = stateshift::stack::host_keys(&so.outputs["boot_report"]).unwrap();
        assert!(!so_keys.is_empty(), "the SO VM reported its host keys");
        let so_vm_ssh = lab
            .ssh(so.outputs["so_host"].as_str().unwrap(), so_keys)
            .await;
        let out = so_vm_ssh
            .run(&format!("sudo stateshift-upgrade {bin_url} {sha}"))
            .await
            .unwrap();
        assert!(out.contains("stateshift upgraded"), "{out}");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = api.client.get(format!("{}/status", api.url)).send().await {
                if let Ok(v) = r.json::<Value>().await {
                    if v["migrations"].as_array().map(|a| a.len()) == Some(2) {
                        break;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not come back after the upgrade"
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let warnings = so_vm_ssh
            .run("sudo journalctl -u stateshift -p warning --no-pager -o cat")
            .await
            .unwrap();
        assert!(
            warnings.matches("migration succeeded").count() >= 2,
            "journald sees the daemon's warnings at their priority: {warnings}"
        );
        let all = so_vm_ssh
            .run("sudo journalctl -u stateshift --no-pager -o cat")
            .await
            .unwrap();
        assert!(
            all.contains("HTTPS API listening"),
            "the info lines are in the journal: {all}"
        );
        // Where each cutover's time went (the VMs' cutovers take half a minute).
        let cutovers: Vec<&str> = all
            .lines()
            .filter_map(|l| l.split_once("cutover steps: ").map(|(_, s)| s))
            .collect();
        for (i, c) in cutovers.iter().enumerate() {
            figure(&format!("cutover {} of {}: {c}", i + 1, cutovers.len()));
        }
        assert_eq!(cutovers.len(), 2, "one breakdown per migration: {all}");
        assert!(
            !warnings.contains("HTTPS API listening"),
            "an info line is not a warning: {warnings}"
        );
        assert!(
            !warnings.contains("\x1b["),
            "no colour codes in the journal"
        );
        drop(so_vm_ssh);

        // --- the SO's own stack survives an update: new parameters (a new threshold, so a
        // new user_data) do not replace its VM; the daemon keeps running with its history.
        let so_vm = |vms: Vec<(PathBuf, String)>| {
            vms.into_iter()
                .find(|(_, n)| *n == format!("{so_name}-so"))
                .map(|(d, _)| d)
        };
        let before = so_vm(lab.vms()).expect("the SO VM runs");
        let so_ref = lab.heat.find(&so_name).await.unwrap().unwrap();
        let url = format!(
            "{}/stacks/{}/{}",
            lab.heat.endpoint().await.unwrap(),
            so_ref.name,
            so_ref.id
        );
        let r = reqwest::Client::new()
            .patch(&url)
            .header("X-Auth-Token", lab.heat.token().await.unwrap().expose())
            .header("Connection", "close")
            .json(&serde_json::json!({"parameters": {"threshold": "5"}}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "stack update: {}", r.status());
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            let v = get_json(&lab.heat, &url).await;
            match v["stack"]["stack_status"].as_str().unwrap_or("") {
                "UPDATE_COMPLETE" => break,
                "UPDATE_FAILED" => {
                    panic!("stack update failed: {}", v["stack"]["stack_status_reason"])
                }
                _ => {}
            }
            assert!(Instant::now() < deadline, "stack update did not finish");
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        assert_eq!(so_vm(lab.vms()), Some(before), "the SO VM was not replaced");
        let st = api.status().await;
        assert_eq!(
            st["migrations"].as_array().map(|a| a.len()),
            Some(2),
            "{st:#}"
        );

        // --- tear down like an operator: nothing may be left.
        drop(vm1);
        drop(cyclops);
        for name in [&so_name, &svc_name, &target2] {
            let s = lab.heat.find(name).await.unwrap().unwrap();
            lab.heat.delete(&s, Duration::from_secs(300)).await.unwrap();
        }
        assert!(
            lab.stacks().await.is_empty(),
            "stacks left: {:?}",
            lab.stacks().await
        );
        assert!(lab.vms().is_empty(), "VMs left: {:?}", lab.vms());
        let _ = z
            .retire_host(&target2, stateshift::config::RetireHosts::Delete)
            .await;
    });
}

// ------------------------------------------------------------------ faults on the path

/// A config for an orchestrator running here (in the lab's namespace) against the
/// service whose InfluxDB stack is `old`: provider heat with the real template and the lab
/// environment, `extra` appended to `provider.parameters`.
fn host_config(
    lab: &Lab,
    dir: &Path,
    old: &Created,
    admin_pw: &str,
    template: &str,
    extra: &[(&str, &str)],
    ready: &str,
) -> PathBuf {
    let o = influx_outputs(old);
    let pw = dir.join("admin.password");
    crate::kit::lab::write_secret(&pw, admin_pw).unwrap();
    let heat_pw = dir.join("heat.password");
    crate::kit::lab::write_secret(&heat_pw, lab.env.password.expose()).unwrap();
    let keys: String = o
        .ssh_host_keys
        .iter()
        .map(|k| format!("      - \"{k}\"\n"))
        .collect();
    let mut params = vec![
        ("image", IMAGE.to_string()),
        ("network", "lab".to_string()),
        ("key_name", lab.keypair.clone()),
        ("access_cidr", CIDR.to_string()),
        ("zabbix_server", ZABBIX_SERVER.to_string()),
        ("influxdb_admin_user", "admin".to_string()),
    ];
    params.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    let params: String = params
        .iter()
        .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
        .collect();
    let yaml = format!(
        r#"service:
  name: "{tag}"
  stack: "{old}"
source:
  influx_url: "{url}"
  username: admin
  password_file: "{pw}"
  ssh:
    host: "{host}"
    user: debian
    identity_file: "{key}"
    host_keys:
{keys}provider:
  kind: heat
  template: "{ROOT}/{template}"
  environment_files: ["{env}"]
  parameters:
{params}  parameter_files:
    influxdb_admin_password: "{pw}"
  create_timeout: 20m
  delete_timeout: 5m
  ssh:
    user: debian
    identity_file: "{key}"
    ready_timeout: 2m
  heat:
    auth_url: "{auth}"
    region: RegionOne
    username: "{user}"
    password_file: "{heat_pw}"
    project_name: "{project}"
capture:
  listen: "{GATEWAY}:0"
  spool_dir: "{d}/spool"
  quiet_period: 1s
cutover:
  command: "printf '%s' {{target_url}} > {d}/writer-url"
migration:
  work_dir: "{d}/state"
  target_ready_timeout: {ready}
"#,
        tag = lab.tag,
        old = old.stack.name,
        url = o.influxdb_url,
        pw = pw.display(),
        host = o.ssh_host,
        key = lab.key.display(),
        env = lab_env().display(),
        auth = lab.env.auth_url,
        user = lab.env.username,
        heat_pw = heat_pw.display(),
        project = lab.env.project,
        d = dir.display(),
    );
    let n = std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0);
    let path = dir.join(format!("stateshift-{n}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path
}

/// On the cloud path, a target that cannot come up fails the migration before cutover,
/// with the reason, and its stack is deleted; the service stays on its InfluxDB VM under
/// a live writer with nothing lost: a VM whose boot fails (a setting InfluxDB refuses), a
/// VM that does not report ready in time (the WaitCondition times out), and a stack whose
/// InfluxDB never answers (the orchestrator's bounded wait).
#[test]
fn a_target_that_cannot_come_up_fails_before_cutover_is_deleted_and_loses_nothing() {
    use crate::kit::workload::{self, RunningWriter, WriterSpec};
    use stateshift::migrate::engine::MigrateError;
    use stateshift::migrate::machine::{self, MachineError, Provider};
    lab_test("fault", |lab| async move {
        let admin_pw = password(20);
        let old_name = format!("{}-influx-0", lab.tag);
        let (old, _) = lab
            .create(&lab.influxdb_spec(&old_name, &admin_pw, &[("boot_timeout", "900")]))
            .await;
        let o = influx_outputs(&old);
        let admin = influx(&o.influxdb_url, "admin", &admin_pw);
        admin.query(None, "CREATE DATABASE cyclops").await.unwrap();
        let dir = tempfile::Builder::new()
            .prefix("ss-lf")
            .tempdir_in("/tmp")
            .unwrap();
        let d = dir.path();
        let url_file = d.join("writer-url");
        std::fs::write(&url_file, &o.influxdb_url).unwrap();
        let writer = RunningWriter::start(WriterSpec {
            db: "cyclops".into(),
            url_file: url_file.clone(),
            username: Some("admin".into()),
            password: Some(Secret::new(admin_pw.clone())),
            rate: 200,
            old_fraction: 0.1,
            overwrite_fraction: 0.1,
            max_duration: Duration::from_secs(1200),
        });
        let cases: Vec<(&str, PathBuf, &str)> = vec![
            (
                "a boot that fails",
                host_config(
                    &lab,
                    d,
                    &old,
                    &admin_pw,
                    "heat-templates/influxdb.yaml",
                    &[(
                        "influxdb_settings",
                        "INFLUXDB_DATA_CACHE_MAX_MEMORY_SIZE=lots",
                    )],
                    "2m",
                ),
                "boot failed",
            ),
            (
                "a VM that does not report ready in time",
                host_config(
                    &lab,
                    d,
                    &old,
                    &admin_pw,
                    "heat-templates/influxdb.yaml",
                    &[("boot_timeout", "30")],
                    "2m",
                ),
                "WaitConditionTimeout",
            ),
        ];
        for (what, cfg_path, reason) in cases {
            let cfg = stateshift::config::Config::load(&cfg_path).unwrap();
            let provider = Provider::from_config(&cfg).unwrap();
            let t = Instant::now();
            let err = machine::migrate(&cfg, &provider, "test", &super::common::Quiet)
                .await
                .err()
                .unwrap_or_else(|| panic!("{what}: the migration must fail"));
            figure(&format!(
                "{what}: failed in {:.1} s: {err}",
                t.elapsed().as_secs_f64()
            ));
            assert!(matches!(err, MachineError::Stack(_)), "{what}: {err:?}");
            assert!(
                err.to_string().contains(reason),
                "{what}: the reason is given: {err}"
            );
            if what == "a boot that fails" {
                // InfluxDB's own complaint reaches the operator through the stack status:
                // "run: apply env config: unknown size suffix: s (expected k, m, or g)".
                assert!(
                    err.to_string().contains("apply env config")
                        && err.to_string().contains("unknown size suffix"),
                    "InfluxDB's own complaint reaches the operator: {err}"
                );
            }
            assert_eq!(
                std::fs::read_to_string(&url_file).unwrap(),
                o.influxdb_url,
                "{what}: not repointed"
            );
            // Only the service's own stack and VM remain.
            let stacks: Vec<String> = lab.stacks().await.into_iter().map(|s| s.name).collect();
            assert_eq!(
                stacks,
                std::slice::from_ref(&old_name),
                "{what}: the failed target stack is deleted"
            );
            let vms: Vec<String> = lab.vms().into_iter().map(|(_, n)| n).collect();
            assert_eq!(
                vms,
                std::slice::from_ref(&old_name),
                "{what}: the failed target VM is gone"
            );
        }
        // A stack that completes, but whose InfluxDB never answers: the orchestrator waits
        // migration.target_ready_timeout, then rolls back and deletes it.
        let cfg_path = host_config(
            &lab,
            d,
            &old,
            &admin_pw,
            "tests/fixtures/heat/target-at.yaml",
            &[("host", "192.168.77.250"), ("ssh_port", "22")],
            "15s",
        );
        let text = std::fs::read_to_string(&cfg_path).unwrap();
        // target-at.yaml takes none of the VM parameters: keep only its own.
        let text: String = text
            .lines()
            .filter(|l| {
                ![
                    "    image:",
                    "    network:",
                    "    key_name:",
                    "    access_cidr:",
                    "    zabbix_server:",
                    "    influxdb_admin_user:",
                    "  parameter_files:",
                    "    influxdb_admin_password:",
                ]
                .iter()
                .any(|p| l.starts_with(p))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        std::fs::write(&cfg_path, text).unwrap();
        let cfg = stateshift::config::Config::load(&cfg_path).unwrap();
        let provider = Provider::from_config(&cfg).unwrap();
        let t = Instant::now();
        let Err(err) = machine::migrate(&cfg, &provider, "test", &super::common::Quiet).await
        else {
            panic!("a target that never answers must fail the migration");
        };
        let waited = t.elapsed();
        figure(&format!(
            "a target that never answers: failed in {:.1} s: {err}",
            waited.as_secs_f64()
        ));
        match &err {
            MachineError::RolledBack { error, .. } => {
                assert!(
                    matches!(**error, MigrateError::TargetNotReady { .. }),
                    "{error:?}"
                );
            }
            other => panic!("expected a rollback, got {other:?}"),
        }
        assert!(
            err.to_string().contains("192.168.77.250")
                && err.to_string().contains("target_ready_timeout"),
            "{err}"
        );
        assert!(
            waited >= Duration::from_secs(15),
            "it waited the configured time: {waited:?}"
        );
        let stacks: Vec<String> = lab.stacks().await.into_iter().map(|s| s.name).collect();
        assert_eq!(stacks, std::slice::from_ref(&old_name));

        // Nothing lost: every acknowledged write is on the service's InfluxDB VM.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let ledger = writer.finish().await;
        assert!(
            ledger.points_acked > 1000,
            "the writer kept writing: {}",
            ledger.points_acked
        );
        assert_eq!(
            ledger.requests_failed,
            0,
            "the writer saw no error: {:?}\n{}",
            ledger.errors,
            lab.consoles()
        );
        let problems = workload::check_ledger(&admin, "cyclops", &ledger)
            .await
            .unwrap();
        assert!(problems.is_empty(), "{problems:#?}");
        figure(&format!(
            "faults: {} points acknowledged by the writer during three failed migrations, all on the service's VM, 0 lost",
            ledger.points_acked
        ));
    });
}

// ------------------------------------------------------------------ measured

/// A whole migration between two Heat-created VMs, measured phase by phase, as an
/// operator runs it: `stateshift migrate -c FILE --yes` here (provider heat, the real
/// template), which creates the target VM, moves the data and deletes the old stack.
/// `STATESHIFT_LAB_POINTS` points (default 200,000; `docs/benchmarks.md` has the run with
/// 2,000,000: 150 series over 30 days, the RCBaaS paper's size) are seeded first. Prints
/// the figures next to the paper's 112 s for 2M records (100 s VM setup + 12 s data).
#[test]
fn a_migration_between_two_heat_created_vms_measured_phase_by_phase() {
    lab_test("bench", |lab| async move {
        let points: u64 = std::env::var("STATESHIFT_LAB_POINTS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200_000);
        let admin_pw = password(20);
        let old_name = format!("{}-influx-0", lab.tag);
        let (old, took) = lab
            .create(&lab.influxdb_spec(&old_name, &admin_pw, &[("boot_timeout", "900")]))
            .await;
        figure(&format!(
            "source VM: Heat create -> ready with outputs in {:.1} s",
            took.as_secs_f64()
        ));
        let o = influx_outputs(&old);
        let admin = influx(&o.influxdb_url, "admin", &admin_pw);
        let t = Instant::now();
        let seeded = crate::kit::workload::seed(
            &admin,
            &crate::kit::workload::SeedSpec {
                db: "rcbaas".into(),
                points,
                series: 150,
                days: 30,
                measurements: 3,
                end_ns: super::common::now_ns(),
            },
        )
        .await
        .unwrap();
        assert_eq!(seeded, points);
        figure(&format!(
            "seeded {points} points (150 series, 30 days) into the source VM in {:.1} s",
            t.elapsed().as_secs_f64()
        ));

        let dir = tempfile::Builder::new()
            .prefix("ss-lb")
            .tempdir_in("/tmp")
            .unwrap();
        let cfg = host_config(
            &lab,
            dir.path(),
            &old,
            &admin_pw,
            "heat-templates/influxdb.yaml",
            &[("boot_timeout", "900")],
            "5m",
        );
        let report = dir.path().join("report.json");
        let t = Instant::now();
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_stateshift"))
            .args(["migrate", "--yes", "-c"])
            .arg(&cfg)
            .arg("--report")
            .arg(&report)
            .output()
            .await
            .unwrap();
        let wall = t.elapsed();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "stateshift migrate: {}\n{stdout}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            lab.consoles()
        );
        let r: stateshift::migrate::engine::Report =
            serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
        // The stack creation is journaled around the engine's phases.
        let journal = stateshift::migrate::journal::Journal::load(
            &dir.path().join(format!("state/{}.journal", lab.tag)),
        )
        .unwrap();
        let at = |f: &dyn Fn(&stateshift::migrate::journal::Event) -> bool| {
            journal
                .iter()
                .find(|r| f(&r.event))
                .map(|r| r.at_ms)
                .unwrap()
        };
        use stateshift::migrate::journal::Event;
        let create_s = (at(&|e| matches!(e, Event::StackCreated { .. }))
            - at(&|e| matches!(e, Event::StackCreating { .. }))) as f64
            / 1000.0;
        let dispose_s = (at(&|e| matches!(e, Event::OldStackDeleted))
            - at(&|e| matches!(e, Event::OldStackDeleting))) as f64
            / 1000.0;
        let data_s: f64 = r
            .phases
            .iter()
            .filter(|p| !matches!(p.phase, stateshift::migrate::engine::Phase::Prepare))
            .map(|p| p.seconds)
            .sum();
        let phases: Vec<String> = r
            .phases
            .iter()
            .map(|p| format!("{} {:.1}", p.phase, p.seconds))
            .collect();
        figure(&format!(
            "migration of {points} points between two Heat-created VMs: {:.1} s wall; target stack create {create_s:.1} s (VM boot to ready), engine {:.1} s ({}), old stack delete {dispose_s:.1} s; data phases (capture..verify) {data_s:.1} s; dump {} bytes; RCBaaS paper, 2M records: 112 s (100 s VM setup + 12 s data)",
            wall.as_secs_f64(),
            r.total_seconds,
            phases.join(", "),
            r.dump_bytes,
        ));
        // The data is all on the new VM (the old stack is gone: the count is the seed's).
        let target_url = r.target.clone();
        let admin2 = influx(&target_url, "admin", &admin_pw);
        let mut n = 0;
        for m in 0..3 {
            n += crate::kit::workload::count_points(&admin2, "rcbaas", &format!("usage{m}"))
                .await
                .unwrap();
        }
        assert_eq!(n, points, "every seeded point is on the target VM");
        // Nothing wrote to the source during the migration: every measurement was proven
        // by its files, read back and digested on the target VM itself (its Debian
        // python3, `verify.read_back_on_host`), only the digests crossing SSH.
        let v = r
            .verify
            .as_ref()
            .expect("the report holds the verification");
        assert!(
            v.read_back_on_host && v.measurements_proven_by_files == 3 && v.read_back_shards > 0,
            "{v:?}\n{stdout}"
        );
        figure(&format!(
            "the target VM's {} shards read back on its host in {:.2} s ({:.1} MB)",
            v.read_back_shards,
            v.read_back_seconds,
            v.read_back_bytes as f64 / 1e6
        ));
        assert!(matches!(
            stack_status(&lab.heat, &old_name).await,
            None | Some(StackStatus::Gone)
        ));
    });
}
