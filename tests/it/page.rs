//! The daemon's status page in a real browser: headless Chromium (Debian's `chromium`)
//! driven over the W3C WebDriver protocol by Debian's `chromedriver`, against a daemon
//! with a local stack, a live load source and a migration started from the page's button.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::{start_daemon, Daemon};
use crate::orchestrator::{service_seeded, TOKEN};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process on a loopback port, killed on drop.
pub(crate) struct Driver {
    child: std::process::Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    pub(crate) async fn start() -> Driver {
        for _ in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = std::process::Command::new("chromedriver")
                .arg(format!("--port={port}"))
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("chromedriver (Debian's chromium-driver) is installed by scripts/setup.sh");
            let d = Driver {
                child,
                url: format!("http://127.0.0.1:{port}"),
            };
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(r) = reqwest::get(format!("{}/status", d.url)).await {
                    if let Ok(v) = r.json::<Value>().await {
                        if v["value"]["ready"] == true {
                            return d;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // The port was taken between the probe and chromedriver's bind: another one.
        }
        panic!("chromedriver did not start");
    }
}

/// One WebDriver session with headless Chromium.
pub(crate) struct Browser {
    http: reqwest::Client,
    base: String,
}

impl Browser {
    pub(crate) async fn open(driver: &Driver) -> Browser {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "unhandledPromptBehavior": "ignore",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1200,1500"]
            }
        }}});
        let v: Value = http
            .post(format!("{}/session", driver.url))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_string();
        Browser {
            http,
            base: format!("{}/session/{id}", driver.url),
        }
    }

    /// A WebDriver command; its `value` (an error is returned as the value too).
    pub(crate) async fn cmd(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let mut r = self
            .http
            .request(method.clone(), format!("{}{path}", self.base));
        if method == reqwest::Method::POST {
            r = r.json(&body);
        }
        let v: Value = r.send().await.unwrap().json().await.unwrap();
        v["value"].clone()
    }

    pub(crate) async fn js(&self, script: &str) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }

    pub(crate) async fn text_of(&self, id: &str) -> String {
        self.js(&format!(
            "return document.getElementById('{id}').textContent"
        ))
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// Poll the page until `check` holds for the text of `id`.
    pub(crate) async fn wait_text(
        &self,
        id: &str,
        what: &str,
        check: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let t = self.text_of(id).await;
            if check(&t) {
                return t;
            }
            assert!(Instant::now() < deadline, "#{id}: {what}; it says {t:?}");
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    pub(crate) async fn click(&self, css: &str) {
        let e = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        let id = e[ELEMENT].as_str().unwrap_or_else(|| panic!("{css}: {e}"));
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{id}/click"),
            json!({}),
        )
        .await;
    }

    /// The open prompt or confirm: its text, once it is there.
    pub(crate) async fn dialog(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = self
                .cmd(reqwest::Method::GET, "/alert/text", Value::Null)
                .await;
            if let Some(t) = v.as_str() {
                return t.to_string();
            }
            assert!(Instant::now() < deadline, "no dialog opened: {v}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) async fn answer(&self, text: Option<&str>, accept: bool) {
        if let Some(t) = text {
            self.cmd(reqwest::Method::POST, "/alert/text", json!({"text": t}))
                .await;
        }
        let what = if accept { "accept" } else { "dismiss" };
        self.cmd(reqwest::Method::POST, &format!("/alert/{what}"), json!({}))
            .await;
    }

    /// A PNG of the page, into `STATESHIFT_PAGE_SHOTS` (a directory) when it is set.
    pub(crate) async fn screenshot(&self, name: &str) {
        use base64::Engine;
        let v = self
            .cmd(reqwest::Method::GET, "/screenshot", Value::Null)
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        if let Ok(dir) = std::env::var("STATESHIFT_PAGE_SHOTS") {
            std::fs::write(std::path::Path::new(&dir).join(name), png).unwrap();
        }
    }

    pub(crate) async fn close(&self) {
        self.cmd(reqwest::Method::DELETE, "", Value::Null).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_live_state_through_a_migration_started_from_its_button() {
    let svc = service_seeded(110, 200_000).await;
    // The local influxd's CPU as the load (percent of one core), polled every second, a
    // threshold 2 cores never reach: the chart fills, and only the button migrates.
    let mut yaml = std::fs::read_to_string(&svc.cfg_path).unwrap();
    yaml.push_str(
        "monitor:\n  kind: process\n  poll_interval: 1s\n  window: 5\n  min_readings: 2\n  threshold: 250\n",
    );
    std::fs::write(&svc.cfg_path, yaml).unwrap();
    let cfg = svc.cfg();
    let Daemon {
        stop,
        task: d,
        shared,
    } = start_daemon(cfg.clone()).await;
    let api = format!("http://{}", shared.status.lock().unwrap().api);
    let old_url = cfg.source.influx_url.clone();

    // Everything the page needs comes from the daemon, and no secret is in it.
    let html = reqwest::get(format!("{api}/")).await.unwrap();
    let csp = html.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(csp.starts_with("default-src 'self'"), "{csp}");
    let html = html.text().await.unwrap();
    let script = reqwest::get(format!("{api}/app.js"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for body in [&html, &script] {
        assert!(!body.contains(TOKEN));
        assert!(
            !body.contains("http://") && !body.contains("https://"),
            "nothing from elsewhere"
        );
    }

    let driver = Driver::start().await;
    let b = Browser::open(&driver).await;
    b.cmd(
        reqwest::Method::POST,
        "/url",
        json!({"url": format!("{api}/")}),
    )
    .await;
    b.wait_text("service", "names the service", |t| t == "stateshift: svc")
        .await;
    assert_eq!(b.text_of("source_url").await, old_url);
    b.wait_text("points", "the chart has readings", |t| {
        t.split(' ')
            .next()
            .and_then(|n| n.parse::<u32>().ok())
            .is_some_and(|n| n >= 3)
    })
    .await;
    let drawn = b
        .js("return document.getElementById('load-line').getAttribute('points').trim().split(' ').length")
        .await;
    assert!(drawn.as_u64().is_some_and(|n| n >= 3), "{drawn}");
    assert_eq!(b.text_of("state").await, "idle");
    b.screenshot("page-before.png").await;

    // No token: nothing is sent. A wrong one: the daemon refuses and the page says so.
    b.click("#trigger").await;
    assert!(b.dialog().await.contains("API token"));
    b.answer(None, false).await;
    b.click("#trigger").await;
    b.dialog().await;
    b.answer(Some("not-the-token"), true).await;
    assert!(b.dialog().await.starts_with("Migrate "));
    b.answer(None, true).await;
    b.wait_text("note", "the refusal", |t| t.contains("HTTP 401"))
        .await;
    assert!(
        shared.status.lock().unwrap().migrations.is_empty(),
        "nothing started"
    );

    // The token and a confirmation: the migration runs, the page follows it.
    b.click("#trigger").await;
    b.dialog().await;
    b.answer(Some(TOKEN), true).await;
    b.dialog().await;
    b.answer(None, true).await;
    b.wait_text("note", "accepted", |t| t == "migration requested")
        .await;
    let phase = b
        .wait_text("phase", "a phase while migrating", |t| {
            t.starts_with("phase: ")
        })
        .await;
    assert_eq!(b.text_of("state").await, "migrating", "{phase}");
    b.screenshot("page-during.png").await;
    b.wait_text("migrations", "the migration succeeded", |t| {
        t.contains("succeeded")
    })
    .await;
    let new_url = b
        .wait_text("source_url", "the new InfluxDB", |t| {
            !t.is_empty() && t != old_url
        })
        .await;
    assert!(new_url.starts_with("http://127.0.110."), "{new_url}");
    // The first reading on the new host meets the cooldown that the migration started.
    b.wait_text("state", "cooling down", |t| t == "cooldown")
        .await;
    assert!(b.text_of("phase").await.starts_with("cooling down"));
    let table = b.text_of("migrations").await;
    for p in ["dump", "restore", "cutover", "verify"] {
        assert!(table.contains(p), "per-phase timings: {table}");
    }
    // The daemon probed the service through the migration: its availability timeline
    // is drawn on the page, served by the daemon, and no probe write failed.
    let summary = b
        .wait_text("timeline-summary", "the availability summary", |t| {
            t.contains("s probed")
        })
        .await;
    assert!(summary.contains(" writes, 0 failed"), "{summary}");
    let t = Instant::now();
    loop {
        let w = b
            .js("const i = document.getElementById('timeline-chart'); return i.complete ? i.naturalWidth : 0")
            .await;
        if w.as_u64().is_some_and(|w| w > 0) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the chart never loaded"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let id = b.text_of("timeline-id").await;
    let csv = reqwest::get(format!("{api}/migrations/{id}/timeline.csv"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(csv.starts_with(stateshift::timeline::CSV_HEADER), "{csv}");
    assert!(csv.contains("cutover"), "the phases are marked: {csv}");
    let table = b.text_of("migrations").await;
    assert!(
        table.ends_with("chart"),
        "each probed migration links its chart: {table}"
    );
    b.screenshot("page-after.png").await;

    // Readable on a phone: nothing wider than the screen.
    b.cmd(
        reqwest::Method::POST,
        "/window/rect",
        json!({"width": 390, "height": 844}),
    )
    .await;
    let overflow = b
        .js("return document.documentElement.scrollWidth - document.documentElement.clientWidth")
        .await;
    assert!(overflow.as_i64().is_some_and(|o| o <= 0), "{overflow}");
    b.screenshot("page-phone.png").await;

    // A migration the daemon settles after finding it interrupted (`/status` state
    // `recovering`: the campaign test brings one about in a real daemon) reads as this
    // daemon's work, not as "not run by this daemon".
    let settling = b
        .js("const st = {state: 'recovering', phase: 'verify', migrations: [{id: 'm1', current_phase: 'verify'}]}; \
             return [state(st), doing(st.migrations[0], st)]")
        .await;
    assert_eq!(
        settling,
        json!([
            [
                "migrating",
                "settling an interrupted migration",
                "phase: verify"
            ],
            "interrupted, being settled by this daemon (at verify)"
        ])
    );
    b.close().await;

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(60), d)
        .await
        .expect("the daemon stops")
        .unwrap()
        .unwrap();
}
