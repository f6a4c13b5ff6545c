//! The daemon's API over HTTPS (issue 10, "Nobody else gets in"): a certificate made by
//! the `openssl` CLI at test time, the daemon serving it on loopback, and what a client
//! sees: HTTPS works, plain HTTP on the same port does not, writes need the token, and a
//! client that never finishes its handshake holds up nobody. The config side: plain HTTP
//! beyond loopback and broken certificate files stop `stateshift daemon` with exit 2.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use stateshift::config::Config;
use stateshift::daemon::{self, Shared};
use tokio_util::sync::CancellationToken;

use crate::common::bin;

const TOKEN: &str = "tls-test-token-5c1e";

/// A self-signed P-256 certificate for 127.0.0.1 and its key: `(cert.pem, key.pem)`.
fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            // webpki refuses a CA certificate as a server's own; openssl's default is CA:TRUE.
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-days",
            "1",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("the openssl CLI runs (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl req: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

/// A daemon config with nothing behind it (static target, no monitor), the API on `api`.
fn write_config(dir: &Path, api: &str) -> PathBuf {
    std::fs::write(dir.join("api-token"), TOKEN).unwrap();
    let p = dir.join("c.yaml");
    std::fs::write(
        &p,
        format!(
            "service:\n  name: tls\nsource:\n  influx_url: http://127.0.0.1:1\ntarget:\n  influx_url: http://127.0.0.1:2\nmigration:\n  work_dir: \"{d}/state\"\napi:\n  token_file: \"{d}/api-token\"\n{api}",
            d = dir.display()
        ),
    )
    .unwrap();
    p
}

struct Running {
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    cert: PathBuf,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl Running {
    fn addr(&self) -> String {
        self.shared.status.lock().unwrap().api.clone()
    }

    /// A client that trusts only the test certificate.
    fn https(&self) -> reqwest::Client {
        let pem = std::fs::read(&self.cert).unwrap();
        reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the daemon stops when asked")
            .unwrap()
            .unwrap();
    }
}

/// The daemon, in this process, serving HTTPS on a free loopback port.
async fn daemon_with_tls() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), "api");
    let p = write_config(
        dir.path(),
        &format!(
            "  listen: \"127.0.0.1:0\"\n  tls_cert_file: \"{}\"\n  tls_key_file: \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    let cfg = Config::load_with_env(&p, []).unwrap();
    assert!(cfg.api.tls.is_some());
    let stop = CancellationToken::new();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let s2 = stop.clone();
    let task = tokio::spawn(async move {
        daemon::run(cfg, s2, &stateshift::migrate::engine::LogProgress, Some(tx)).await
    });
    let shared = rx.await.expect("the daemon starts");
    Running {
        shared,
        stop,
        task,
        cert,
        config: p,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_serves_https_with_its_certificate_and_plain_http_on_its_port_fails() {
    let d = daemon_with_tls().await;
    let addr = d.addr();
    let https = d.https();
    let r = https
        .get(format!("https://{addr}/healthz"))
        .send()
        .await
        .expect("HTTPS with the configured certificate works");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok\n");
    let st: serde_json::Value = https
        .get(format!("https://{addr}/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(st["service"], "tls");
    assert_eq!(st["mode"], "act");
    let r = https
        .get(format!("https://{addr}/livez"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Ready once the decision loop has located the service.
    let mut ready = (0, String::new());
    for _ in 0..100 {
        let r = https
            .get(format!("https://{addr}/readyz"))
            .send()
            .await
            .unwrap();
        ready = (r.status().as_u16(), r.text().await.unwrap());
        if ready.0 == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready, (200, "[+]loop ok\n[+]operator ok\n".to_string()));

    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let r = plain.get(format!("http://{addr}/healthz")).send().await;
    assert!(
        r.is_err(),
        "plain HTTP to the HTTPS port must not get an answer: {r:?}"
    );
    // A client that does not trust the certificate is refused by its own TLS check.
    let r = reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .build()
        .unwrap()
        .get(format!("https://{addr}/healthz"))
        .send()
        .await;
    assert!(r.is_err(), "{r:?}");
    // The failed handshakes left the listener serving.
    assert_eq!(
        https
            .get(format!("https://{addr}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_https_a_state_changing_request_without_the_right_token_is_401() {
    let d = daemon_with_tls().await;
    let addr = d.addr();
    let https = d.https();
    let r = https
        .post(format!("https://{addr}/migrate"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );
    let r = https
        .post(format!("https://{addr}/migrate"))
        .bearer_auth("not-the-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    for method in [reqwest::Method::PUT, reqwest::Method::DELETE] {
        let r = https
            .request(method.clone(), format!("https://{addr}/status"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{method} /status");
    }
    assert!(
        !d.shared.running.load(std::sync::atomic::Ordering::SeqCst),
        "nothing was triggered"
    );
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_finishes_its_tls_handshake_holds_up_nobody() {
    let d = daemon_with_tls().await;
    let addr = d.addr();
    // Connected, silent: a handshake that would wait for the full deadline.
    let mut stalled = Vec::new();
    for _ in 0..3 {
        stalled.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    let t = Instant::now();
    let r = d
        .https()
        .get(format!("https://{addr}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "the stalled handshakes delayed another client by {:?}",
        t.elapsed()
    );
    drop(stalled);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_that_does_not_finish_in_time_is_dropped() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path(), "api");
    let p = write_config(
        dir.path(),
        &format!(
            "  tls_cert_file: \"{}\"\n  tls_key_file: \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    let tls = Config::load_with_env(&p, []).unwrap().api.tls.unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let _listener =
        stateshift::tls::TlsListener::new(tcp, tls.server, Duration::from_millis(300)).unwrap();
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .expect("the server closes a connection whose handshake ran out of time");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
}

/// `stateshift daemon -c FILE`'s exit code and stderr for an `api:` section (it must
/// stop before anything runs).
fn daemon_cli(dir: &Path, api: &str) -> (i32, String) {
    let p = write_config(dir, api);
    let mut child = Command::new(bin())
        .args(["daemon", "-c"])
        .arg(&p)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return (status.code().unwrap_or(-1), err);
        }
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the daemon started instead of refusing its config");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_daemon_refuses_plain_http_beyond_loopback_with_exit_2_naming_api_listen_and_the_fix() {
    let d = tempfile::tempdir().unwrap();
    let (code, err) = daemon_cli(d.path(), "  listen: \"0.0.0.0:0\"\n");
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("c.yaml: api.listen: 0.0.0.0:0")
            && err.contains("api.tls_cert_file")
            && err.contains("api.tls_key_file")
            && err.contains("api.insecure_plain_http"),
        "{err}"
    );
}

#[test]
fn the_daemon_refuses_a_missing_certificate_file_with_exit_2_naming_the_key_and_path() {
    let d = tempfile::tempdir().unwrap();
    let (_, key) = self_signed(d.path(), "api");
    let missing = d.path().join("nowhere.crt");
    let (code, err) = daemon_cli(
        d.path(),
        &format!(
            "  listen: \"127.0.0.1:0\"\n  tls_cert_file: \"{}\"\n  tls_key_file: \"{}\"\n",
            missing.display(),
            key.display()
        ),
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("api.tls_cert_file") && err.contains(&missing.display().to_string()),
        "{err}"
    );
}

#[test]
fn a_key_that_belongs_to_another_certificate_is_refused_naming_both_files() {
    let d = tempfile::tempdir().unwrap();
    let (cert, _) = self_signed(d.path(), "one");
    let (_, other_key) = self_signed(d.path(), "two");
    let p = write_config(
        d.path(),
        &format!(
            "  tls_cert_file: \"{}\"\n  tls_key_file: \"{}\"\n",
            cert.display(),
            other_key.display()
        ),
    );
    let e = Config::load_with_env(&p, []).unwrap_err().to_string();
    assert!(
        e.contains("api.tls_key_file")
            && e.contains(&other_key.display().to_string())
            && e.contains(&cert.display().to_string())
            && e.contains("does not belong"),
        "{e}"
    );
}

#[test]
fn a_key_file_that_is_not_pem_is_refused_without_quoting_it() {
    let d = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(d.path(), "api");
    let junk = "-----BEGIN PRIVATE KEY-----\nsecret-k3y-material!!\n-----END PRIVATE KEY-----\n";
    std::fs::write(&key, junk).unwrap();
    let p = write_config(
        d.path(),
        &format!(
            "  tls_cert_file: \"{}\"\n  tls_key_file: \"{}\"\n",
            cert.display(),
            key.display()
        ),
    );
    let e = Config::load_with_env(&p, []).unwrap_err().to_string();
    assert!(
        e.contains("api.tls_key_file") && e.contains(&key.display().to_string()),
        "{e}"
    );
    assert!(!e.contains("secret-k3y"), "{e}");
    // A certificate file holding no certificate.
    std::fs::write(&cert, "not a certificate\n").unwrap();
    let e = Config::load_with_env(&p, []).unwrap_err().to_string();
    assert!(
        e.contains("api.tls_cert_file") && e.contains("no certificate found"),
        "{e}"
    );
}

/// `stateshift trigger` asks the running daemon over its HTTPS API, trusting the daemon's
/// certificate from the configuration, with the configured token; a wrong token is
/// refused and the CLI says so, without the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stateshift_trigger_posts_to_the_daemon_with_its_token_over_https() {
    let d = daemon_with_tls().await;
    let url = format!("https://{}", d.addr());
    let wrong = d.config.with_file_name("wrong-token");
    std::fs::write(&wrong, "not-the-token-5521\n").unwrap();
    let trigger = |env: Option<&Path>| {
        let mut c = tokio::process::Command::new(bin());
        c.args(["trigger", "-c"])
            .arg(&d.config)
            .args(["--url", &url]);
        if let Some(f) = env {
            c.env("STATESHIFT__API__TOKEN_FILE", f);
        }
        async move {
            let out = c.output().await.unwrap();
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).to_string(),
                String::from_utf8_lossy(&out.stderr).to_string(),
            )
        }
    };
    let (code, out, err) = trigger(Some(&wrong)).await;
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("401") && err.contains("missing or wrong bearer token"),
        "{err}"
    );
    assert!(!err.contains("not-the-token-5521") && !out.contains("not-the-token-5521"));
    assert!(!d.shared.running.load(std::sync::atomic::Ordering::SeqCst));

    let (code, out, err) = trigger(None).await;
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("migration requested"), "{out}");
    d.stop().await;
}
