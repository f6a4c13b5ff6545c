//! Security (issue 6 item 4): every secret the test sets — InfluxDB admin and user
//! passwords, the API token, a wrong token and a wrong password an operator might type,
//! the SSH private key — is searched for in everything the product writes or answers: the
//! daemon's log (at debug level), the journal, `/status`, `/metrics`, the CLI's output on
//! success and on failure, and every file left in the work and spool directories.
//! Unknown host keys are refused; private keys and secret files are 0600.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::kit::lab::LabOptions;
use stateshift::util::Secret;

use crate::common::*;

const ADMIN_PW: &str = "adm-Secr3t-4711";
const BOB_PW: &str = "bob-Secr3t-0815";
const TOKEN: &str = "api-Secr3t-token-2a9f";
const WRONG_TOKEN: &str = "wrong-Secr3t-token-77";
const WRONG_PW: &str = "wrong-Secr3t-pass-66";

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => stack.push(p),
                Ok(t) if t.is_file() => out.push(p),
                _ => {}
            }
        }
    }
    out
}

fn assert_no_secret(what: &str, text: &[u8], secrets: &[(&str, String)]) {
    let text = String::from_utf8_lossy(text);
    for (name, s) in secrets {
        assert!(
            !text.contains(s.as_str()),
            "{name} appears in {what}:\n{}",
            &text[..text.len().min(4000)]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_logs_errors_journal_status_or_files() {
    let lab = lab(LabOptions {
        admin: Some(("admin".into(), Secret::new(ADMIN_PW))),
        ..LabOptions::default()
    })
    .await;
    let d = lab.dir.clone();
    let users = d.join("users.yaml");
    crate::kit::lab::write_secret(&users, &format!("bob: {BOB_PW}\n")).unwrap();
    crate::kit::lab::write_secret(&d.join("api-token"), TOKEN).unwrap();
    let port = server_port();
    let (cfg_path, _) = lab
        .write_config(&format!(
            "  user_passwords_file: \"{}\"\napi:\n  listen: \"127.0.0.1:{port}\"\n  token_file: \"{}/api-token\"\n",
            users.display(),
            d.display()
        ))
        .unwrap();
    let src = lab.source.client();
    seed(&lab, "cyclops", 2_000).await;
    src.query(None, &format!("CREATE USER bob WITH PASSWORD '{BOB_PW}'"))
        .await
        .unwrap();
    src.query(None, "GRANT READ ON cyclops TO bob")
        .await
        .unwrap();

    // The daemon, logging at debug level into a file; one bad and one good trigger.
    let log_path = d.join("daemon.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut daemon = Command::new(bin())
        .args(["daemon", "-c"])
        .arg(&cfg_path)
        .env("RUST_LOG", "stateshift=debug")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let api = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let t = Instant::now();
    while http.get(format!("{api}/healthz")).send().await.is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "daemon never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let post = |tok: &'static str| http.post(format!("{api}/migrate")).bearer_auth(tok).send();
    assert_eq!(post(WRONG_TOKEN).await.unwrap().status(), 401);
    assert_eq!(post(TOKEN).await.unwrap().status(), 202);
    let status = loop {
        let st: serde_json::Value = http
            .get(format!("{api}/status"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let done = st["migrations"]
            .as_array()
            .and_then(|m| m.last())
            .is_some_and(|m| !m["outcome"].is_null());
        if done && st["state"] == "polling" {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "{st:#}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        status["migrations"][0]["outcome"], "succeeded",
        "{status:#}"
    );
    let status_body = http
        .get(format!("{api}/status"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let metrics = http
        .get(format!("{api}/metrics"))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let _ = daemon.wait();

    // The CLI failing on a wrong password (an operator's typo in a password file).
    crate::kit::lab::write_secret(&d.join("target.password"), WRONG_PW).unwrap();
    crate::kit::lab::write_secret(&d.join("source.password"), WRONG_PW).unwrap();
    let bad = Command::new(bin())
        .args(["migrate", "--dry-run", "-c"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    let bad_out = [bad.stdout.clone(), bad.stderr.clone()].concat();
    assert!(
        !bad.status.success()
            && String::from_utf8_lossy(&bad_out).contains("authentication failed"),
        "the wrong password is refused by the target: {}",
        String::from_utf8_lossy(&bad_out)
    );
    let ok = Command::new(bin())
        .args(["status", "-c"])
        .arg(&cfg_path)
        .output()
        .unwrap();
    let ok_out = [ok.stdout.clone(), ok.stderr.clone()].concat();

    let key = std::fs::read_to_string(&lab.keys.client_key).unwrap();
    let key_body = key
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .max_by_key(|l| l.len())
        .unwrap()
        .to_string();
    let secrets: Vec<(&str, String)> = vec![
        ("the admin password", ADMIN_PW.into()),
        ("bob's password", BOB_PW.into()),
        ("the API token", TOKEN.into()),
        ("a wrong API token", WRONG_TOKEN.into()),
        ("a wrong password", WRONG_PW.into()),
        ("the SSH private key", key_body),
    ];
    let log_text = std::fs::read(&log_path).unwrap();
    assert!(
        String::from_utf8_lossy(&log_text).contains("POST /migrate refused"),
        "the bad trigger is logged (without its token)"
    );
    assert!(log_text.len() > 1000, "the debug log has content");
    assert_no_secret("the daemon log", &log_text, &secrets);
    assert_no_secret("/status", &status_body, &secrets);
    assert_no_secret("/metrics", &metrics, &secrets);
    assert_no_secret("the failing CLI's output", &bad_out, &secrets);
    assert_no_secret("`stateshift status`", &ok_out, &secrets);
    // Every file the product wrote: journal, spool and state, the VMs' work dirs.
    let mut checked = 0;
    for dir in [
        d.join("state"),
        d.join("spool"),
        d.join("source/work"),
        d.join("target/work"),
    ] {
        for f in files_under(&dir) {
            assert_no_secret(
                &f.display().to_string(),
                &std::fs::read(&f).unwrap(),
                &secrets,
            );
            checked += 1;
        }
    }
    assert!(
        files_under(&d.join("state"))
            .iter()
            .any(|f| f.to_string_lossy().ends_with(".journal")),
        "the journal was among the files checked ({checked})"
    );
    // Secret files: the private keys the product generated, and the operator's files.
    for f in files_under(&lab.keys.dir) {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        if text.contains("PRIVATE KEY") {
            let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} is {mode:o}", f.display());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_host_key_is_refused_unless_explicitly_accepted() {
    let lab = lab(LabOptions::default()).await;
    let (cfg_path, _) = lab.write_config("").unwrap();
    let empty = lab.dir.join("empty_known_hosts");
    std::fs::write(&empty, "").unwrap();
    let run = |check: Option<&str>| {
        let mut c = Command::new(bin());
        c.args(["migrate", "--dry-run", "-c"])
            .arg(&cfg_path)
            .env("STATESHIFT__SOURCE__SSH__KNOWN_HOSTS_FILE", &empty)
            .env("STATESHIFT__SOURCE__SSH__READY_TIMEOUT", "2s")
            .stdin(Stdio::null());
        if let Some(v) = check {
            c.env("STATESHIFT__SOURCE__SSH__HOST_KEY_CHECK", v);
        }
        let o = c.output().unwrap();
        (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    let (ok, out) = run(None);
    assert!(!ok, "an unknown host key must be refused: {out}");
    assert!(
        out.to_lowercase().contains("host key"),
        "the refusal names the host key: {out}"
    );
    let (ok, out) = run(Some("accept-new"));
    assert!(ok, "accept-new is the explicit opt-in: {out}");
    let learned = std::fs::read_to_string(&empty).unwrap();
    assert!(
        !learned.trim().is_empty(),
        "accept-new records the key it learned"
    );
}
