//! The daemon's HTTP API (bound to 127.0.0.1 by default; HTTPS with `api.tls_*`, see
//! [`crate::tls`]): `/` (the status page, `page/`), `/healthz`, `/livez`, `/readyz`, `/status` (JSON),
//! `/metrics` (Prometheus text), `/migrations/<id>/timeline.svg|csv` (a daemon migration's
//! availability timeline),
//! `POST /migrate` (409 while a migration runs or one is settled), `POST /migrate/abort` (202 when the running
//! migration stops and rolls back; 409 with the reason when it is past its cutover, an
//! interrupted earlier migration is being settled first, or none runs). Reading is open; every request that is
//! not a GET or HEAD, on any route, needs the bearer token (one layer over the whole
//! router, so a route added later cannot forget it). A refused token is logged without
//! the token.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use super::Shared;
use crate::migrate::engine::Phase;

type Labels = Vec<(String, String)>;

/// The daemon's metrics (low-cardinality labels only).
pub struct Metrics {
    registry: Mutex<Registry>,
    readings: Family<Labels, Counter>,
    load: Gauge<f64, AtomicU64>,
    prediction: Gauge<f64, AtomicU64>,
    threshold: Gauge<f64, AtomicU64>,
    operator_wait: Gauge,
    migrating: Gauge,
    triggers: Counter,
    would_migrate: Counter,
    migrations: Family<Labels, Counter>,
    phase_seconds: Family<Labels, Gauge<f64, AtomicU64>>,
    points_moved: Counter,
    capture_lost: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics {
            registry: Mutex::new(Registry::with_prefix("stateshift")),
            readings: Family::default(),
            load: Gauge::default(),
            prediction: Gauge::default(),
            threshold: Gauge::default(),
            operator_wait: Gauge::default(),
            migrating: Gauge::default(),
            triggers: Counter::default(),
            would_migrate: Counter::default(),
            migrations: Family::default(),
            phase_seconds: Family::default(),
            points_moved: Counter::default(),
            capture_lost: Counter::default(),
        };
        {
            let mut r = m.registry.lock().unwrap_or_else(|p| p.into_inner());
            r.register(
                "readings",
                "Load readings by freshness (fresh, stale, no_data, error)",
                m.readings.clone(),
            );
            r.register("load", "Last fresh load reading", m.load.clone());
            r.register(
                "prediction",
                "Last one-step-ahead load prediction",
                m.prediction.clone(),
            );
            r.register(
                "threshold",
                "The trigger's threshold (monitor.threshold)",
                m.threshold.clone(),
            );
            r.register(
                "operator_wait",
                "1 while a migration that failed after cutover waits for `stateshift resolve` (nothing migrates until then)",
                m.operator_wait.clone(),
            );
            r.register("migrating", "1 while a migration runs", m.migrating.clone());
            r.register(
                "triggers",
                "Migrations triggered by the prediction or by hand",
                m.triggers.clone(),
            );
            r.register(
                "would_migrate",
                "Migrations the prediction would have started in observe mode (monitor.mode: observe)",
                m.would_migrate.clone(),
            );
            r.register("migrations", "Migrations by outcome", m.migrations.clone());
            r.register(
                "phase_seconds",
                "Duration of each phase of the last migration",
                m.phase_seconds.clone(),
            );
            r.register(
                "points_moved",
                "Captured points replayed to targets",
                m.points_moved.clone(),
            );
            r.register(
                "capture_lost_writes",
                "Writes the source failed to forward to a migration's capture (the migration then stopped: its capture could not be proven complete)",
                m.capture_lost.clone(),
            );
        }
        m
    }

    pub fn reading(&self, freshness: &str) {
        self.readings
            .get_or_create(&vec![("freshness".into(), freshness.into())])
            .inc();
    }
    pub fn observe(&self, load: f64, prediction: Option<f64>) {
        self.load.set(load);
        if let Some(p) = prediction {
            self.prediction.set(p);
        }
    }
    pub fn trigger(&self) {
        self.triggers.inc();
    }
    pub fn would_migrate(&self) {
        self.would_migrate.inc();
    }
    pub fn capture_lost(&self, writes: u64) {
        self.capture_lost.inc_by(writes);
    }
    pub fn migration(&self, outcome: &str, points: u64) {
        self.migrations
            .get_or_create(&vec![("outcome".into(), outcome.into())])
            .inc();
        self.points_moved.inc_by(points);
    }
    pub fn phase_seconds(&self, phase: Phase, secs: f64) {
        self.phase_seconds
            .get_or_create(&vec![("phase".into(), phase.to_string())])
            .set(secs);
    }
    /// Set the gauges that mirror the daemon's state, just before a scrape.
    fn refresh(&self, st: &super::Status, migrating: bool) {
        self.threshold.set(st.threshold);
        self.operator_wait
            .set(i64::from(waiting_for_operator(st).is_some()));
        self.migrating.set(i64::from(migrating));
    }
    pub fn encode(&self) -> String {
        let mut s = String::new();
        let r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if encode(&mut s, &r).is_err() {
            s.clear();
        }
        s
    }
}

/// The API's routes, behind the token check for every state-changing request.
pub fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new()
        .route("/", get(page))
        .route("/app.js", get(page_script))
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/migrations/{id}/{file}", get(timeline_file))
        .route("/migrate", post(migrate))
        .route("/migrate/abort", post(abort))
        .layer(axum::middleware::from_fn_with_state(
            shared.clone(),
            require_token,
        ))
        .with_state(shared)
}

/// Serve [`router`] on `listener` (plain TCP, or [`crate::tls::TlsListener`]) until `stop`.
pub async fn serve<L>(listener: L, shared: Arc<Shared>, stop: CancellationToken)
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    if let Err(e) = axum::serve(listener, router(shared))
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "HTTP API stopped");
    }
}

/// `200 ok` while the daemon can act on its own; `503` and what to run while a migration
/// that failed past cutover waits for an operator (nothing migrates until then).
/// The last migration, when it failed after cutover and nobody has run `resolve` yet.
fn waiting_for_operator(st: &super::Status) -> Option<&crate::migrate::journal::MigrationSummary> {
    st.migrations.last().filter(|m| {
        m.outcome == Some(crate::migrate::journal::Outcome::Failed) && m.resolved_on.is_none()
    })
}

async fn healthz(State(s): State<Arc<Shared>>) -> (StatusCode, String) {
    let st = s.status.lock().unwrap_or_else(|p| p.into_inner());
    match waiting_for_operator(&st) {
        Some(m) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "waiting for an operator: migration {} failed after cutover ({}); check where the writers are, then run `stateshift resolve -c FILE --on source|target`\n",
                m.id,
                m.error.as_deref().unwrap_or("no reason recorded")
            ),
        ),
        None => (StatusCode::OK, "ok\n".into()),
    }
}

/// The status page: embedded in the binary, nothing from elsewhere (the content security
/// policy holds the page to this origin), no secret in it.
const PAGE: &str = include_str!("page/index.html");
const PAGE_SCRIPT: &str = include_str!("page/app.js");
const PAGE_POLICY: &str = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, PAGE_POLICY),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}

async fn page_script() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, PAGE_POLICY),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE_SCRIPT,
    )
}

/// `GET /migrations/<id>/timeline.svg` or `.csv`: the availability timeline the daemon
/// recorded for migration `id`. Only those two names, and an id of letters, digits, `-`
/// and `_`: nothing else under the work directory is reachable.
async fn timeline_file(
    State(s): State<Arc<Shared>>,
    axum::extract::Path((id, file)): axum::extract::Path<(String, String)>,
) -> Response {
    let content_type = match file.as_str() {
        "timeline.svg" => "image/svg+xml",
        "timeline.csv" => "text/csv; charset=utf-8",
        _ => return (StatusCode::NOT_FOUND, "no such file\n").into_response(),
    };
    let id_ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let Some(dir) = s.timelines.as_ref().filter(|_| id_ok) else {
        return (StatusCode::NOT_FOUND, "no such migration timeline\n").into_response();
    };
    match tokio::fs::read(dir.join(&id).join(&file)).await {
        Ok(body) => (
            [
                (header::CONTENT_TYPE, content_type),
                // An SVG opened on its own is a document of this origin: it may run
                // nothing and load nothing.
                (
                    header::CONTENT_SECURITY_POLICY,
                    "default-src 'none'; style-src 'unsafe-inline'",
                ),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            body,
        )
            .into_response(),
        Err(_) => (StatusCode::NOT_FOUND, "no such migration timeline\n").into_response(),
    }
}

/// `200 ok` whenever the process answers: restart it only when this fails.
async fn livez() -> &'static str {
    "ok\n"
}

/// Polled this many intervals without a fresh reading, the load counts as unreadable.
const READINGS_MISSED: u64 = 3;

/// Whether the daemon can do its job now, one line per check (`[+]`/`[-]`, as Kubernetes
/// components answer): its loop runs, no failure past cutover waits for an operator, the
/// load was read within the last [`READINGS_MISSED`] poll intervals (or a migration
/// runs, which stops the polling). 200 when every check passes, 503 otherwise.
async fn readyz(State(s): State<Arc<Shared>>) -> (StatusCode, String) {
    let loop_runs = s.ready.load(Ordering::SeqCst);
    let migrating = s.running.load(Ordering::SeqCst);
    let st = s.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let mut checks: Vec<(bool, String)> = vec![(
        loop_runs,
        if loop_runs {
            "loop ok".into()
        } else {
            "loop: not running (starting, or stopping)".into()
        },
    )];
    checks.push(match waiting_for_operator(&st) {
        Some(m) => (
            false,
            format!(
                "operator: migration {} failed after cutover; run `stateshift resolve -c FILE --on source|target`",
                m.id
            ),
        ),
        None => (true, "operator ok".into()),
    });
    if st.poll_interval_ms > 0 && !migrating {
        let limit = st.poll_interval_ms * READINGS_MISSED;
        // Never read fresh: counted from the daemon's start.
        let since = st.last_fresh_unix_ms.unwrap_or(st.started_unix_ms);
        let age = crate::util::now_ms().saturating_sub(since);
        checks.push(if age <= limit {
            (true, "load ok".into())
        } else {
            (
                false,
                format!(
                    "load: no fresh reading for {} s from {} (stateshift_readings in /metrics says why)",
                    age / 1000,
                    st.load_source
                ),
            )
        });
    }
    let ok = checks.iter().all(|(ok, _)| *ok);
    let body: String = checks
        .iter()
        .map(|(ok, what)| format!("[{}]{what}\n", if *ok { '+' } else { '-' }))
        .collect();
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, body)
}

async fn status(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let st = s.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
    axum::Json(st)
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    {
        let st = s.status.lock().unwrap_or_else(|p| p.into_inner());
        s.metrics.refresh(&st, s.running.load(Ordering::SeqCst));
    }
    (
        [(
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timings.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether `headers` carry the configured bearer token (never, when none is configured).
fn authorized(token: Option<&crate::util::Secret>, headers: &HeaderMap) -> (bool, bool) {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let ok = match (token, given) {
        (Some(t), Some(g)) => same(t.expose().as_bytes(), g.trim().as_bytes()),
        _ => false,
    };
    (ok, given.is_some())
}

/// GET and HEAD only read; anything else changes state and needs the token.
async fn require_token(State(s): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD) {
        return next.run(req).await;
    }
    let (ok, token_given) = authorized(s.token.as_ref(), req.headers());
    if ok {
        return next.run(req).await;
    }
    tracing::warn!(
        token_given,
        "{} {} refused: missing or wrong bearer token",
        req.method(),
        req.uri().path()
    );
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        "missing or wrong bearer token\n",
    )
        .into_response()
}

/// `POST /migrate`; the token was checked by [`require_token`].
async fn migrate(State(s): State<Arc<Shared>>) -> (StatusCode, String) {
    // Claimed here, so a second request before the loop picks this one up gets 409 too.
    if s.running
        .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
        .is_err()
    {
        return (
            StatusCode::CONFLICT,
            "a migration is already running\n".into(),
        );
    }
    match s
        .trigger
        .try_send(super::Request::now("manual: POST /migrate"))
    {
        Ok(()) => (StatusCode::ACCEPTED, "migration requested\n".into()),
        Err(_) => {
            s.running.store(false, Ordering::SeqCst);
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "the orchestrator is not taking requests\n".into(),
            )
        }
    }
}

/// `POST /migrate/abort`; the token was checked by [`require_token`].
async fn abort(State(s): State<Arc<Shared>>) -> (StatusCode, String) {
    let running = s.abort.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let Some(abort) = running else {
        let recovering =
            s.status.lock().unwrap_or_else(|p| p.into_inner()).state == super::RECOVERING;
        let msg = if recovering {
            "an interrupted migration is being settled (rolled back, or finished past its cutover); that cannot be aborted\n"
        } else if s.running.load(Ordering::SeqCst) {
            "a migration was requested but has not started yet; abort it once it runs\n"
        } else {
            "no migration is running\n"
        };
        return (StatusCode::CONFLICT, msg.into());
    };
    match abort.request("an operator (POST /migrate/abort)") {
        Ok(()) => {
            tracing::warn!("abort requested through the API");
            (
                StatusCode::ACCEPTED,
                "abort accepted: the migration stops where it is and rolls back; the service stays where it runs (follow it in /status)\n".into(),
            )
        }
        Err(refused) => {
            tracing::warn!(%refused, "abort refused");
            (StatusCode::CONFLICT, format!("abort refused: {refused}\n"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Api {
        url: String,
        shared: Arc<Shared>,
        stop: CancellationToken,
        /// Nothing picks triggers up here; held so that a trigger is accepted.
        _triggers: tokio::sync::mpsc::Receiver<super::super::Request>,
    }

    /// The router on a loopback port, with `token` configured.
    async fn start(token: Option<&str>) -> Api {
        start_with(token, None).await
    }

    /// [`start`], serving the timelines in `timelines`.
    async fn start_with(token: Option<&str>, timelines: Option<std::path::PathBuf>) -> Api {
        let (trigger, triggers) = tokio::sync::mpsc::channel(4);
        let shared = Arc::new(Shared {
            status: Mutex::new(super::super::Status::default()),
            running: std::sync::atomic::AtomicBool::new(false),
            metrics: Metrics::new(),
            trigger,
            token: token.map(crate::util::Secret::new),
            ready: std::sync::atomic::AtomicBool::new(false),
            abort: Mutex::new(None),
            timelines,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        tokio::spawn(serve(listener, shared.clone(), stop.clone()));
        Api {
            url,
            shared,
            stop,
            _triggers: triggers,
        }
    }

    #[tokio::test]
    async fn healthz_says_when_an_operator_must_act_and_what_to_run() {
        use crate::migrate::journal::{MigrationSummary, Outcome};
        let api = start(Some("t")).await;
        let get = || async {
            let r = reqwest::get(format!("{}/healthz", api.url)).await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        };
        assert_eq!(get().await, (200, "ok\n".to_string()));
        let failed = MigrationSummary {
            id: "42".into(),
            outcome: Some(Outcome::Failed),
            error: Some("verify: 3 points differ".into()),
            ..MigrationSummary::default()
        };
        api.shared.set(|s| s.migrations = vec![failed.clone()]);
        let (code, body) = get().await;
        assert_eq!(code, 503, "{body}");
        assert!(
            body.contains("migration 42") && body.contains("stateshift resolve"),
            "{body}"
        );
        let resolved = MigrationSummary {
            resolved_on: Some(crate::migrate::journal::Placement {
                stack: None,
                outputs: None,
                influx_url: "http://new:8086".into(),
            }),
            ..failed
        };
        api.shared.set(|s| s.migrations = vec![resolved]);
        assert_eq!(get().await.0, 200);
    }

    #[tokio::test]
    async fn readyz_names_each_check_and_livez_only_says_the_process_answers() {
        use crate::migrate::journal::{MigrationSummary, Outcome};
        let api = start(Some("t")).await;
        let get = |path: &'static str| {
            let url = format!("{}{path}", api.url);
            async move {
                let r = reqwest::get(url).await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            }
        };
        assert_eq!(get("/livez").await, (200, "ok\n".to_string()));
        // The loop has not started.
        let (code, body) = get("/readyz").await;
        assert_eq!(code, 503, "{body}");
        assert!(body.starts_with("[-]loop: not running"), "{body}");
        api.shared.ready.store(true, Ordering::SeqCst);
        assert_eq!(
            get("/readyz").await,
            (200, "[+]loop ok\n[+]operator ok\n".into())
        );
        // Polled every second, last read fresh 10 s ago.
        let now = crate::util::now_ms();
        api.shared.set(|s| {
            s.poll_interval_ms = 1000;
            s.started_unix_ms = now - 60_000;
            s.last_fresh_unix_ms = Some(now - 10_000);
            s.load_source = "zabbix item x of host h".into();
        });
        let (code, body) = get("/readyz").await;
        assert_eq!(code, 503, "{body}");
        assert!(
            body.contains("[-]load: no fresh reading for 10 s from zabbix item x of host h"),
            "{body}"
        );
        api.shared
            .set(|s| s.last_fresh_unix_ms = Some(crate::util::now_ms()));
        assert_eq!(get("/readyz").await.0, 200);
        // Never read since a start 60 s ago.
        api.shared.set(|s| s.last_fresh_unix_ms = None);
        assert!(get("/readyz").await.1.contains("no fresh reading for 60 s"));
        // A migration stops the polling: the load is not judged then.
        api.shared.running.store(true, Ordering::SeqCst);
        assert_eq!(get("/readyz").await.0, 200);
        api.shared.running.store(false, Ordering::SeqCst);
        api.shared
            .set(|s| s.last_fresh_unix_ms = Some(crate::util::now_ms()));
        // A failure past cutover waits for an operator.
        api.shared.set(|s| {
            s.migrations = vec![MigrationSummary {
                id: "7".into(),
                outcome: Some(Outcome::Failed),
                ..MigrationSummary::default()
            }]
        });
        let (code, body) = get("/readyz").await;
        assert_eq!(code, 503, "{body}");
        assert!(
            body.contains("[-]operator: migration 7 failed after cutover"),
            "{body}"
        );
        assert_eq!(get("/livez").await.0, 200, "alive all along");
        api.stop.cancel();
    }

    /// The `stateshift_*` names in `text` (a PromQL expression or a whole file).
    fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
        let mut out = std::collections::BTreeSet::new();
        let mut rest = text;
        while let Some(i) = rest.find("stateshift_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            out.insert(name);
        }
        out
    }

    #[tokio::test]
    async fn every_metric_the_alert_rules_and_the_dashboard_use_is_served() {
        let api = start(Some("t")).await;
        // One sample in every family, as a daemon that polled and migrated has.
        let m = &api.shared.metrics;
        m.reading("fresh");
        m.observe(1.0, Some(2.0));
        m.trigger();
        m.would_migrate();
        m.capture_lost(2);
        m.migration("failed", 3);
        m.phase_seconds(Phase::Verify, 1.5);
        let served = reqwest::get(format!("{}/metrics", api.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let served: std::collections::BTreeSet<String> = served
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(String::from)
            .collect();
        let rules: serde_yaml::Value = serde_yaml::from_str(include_str!(
            "../../deploy/prometheus/stateshift-alerts.yml"
        ))
        .unwrap();
        let mut used = std::collections::BTreeSet::new();
        for g in rules["groups"].as_sequence().unwrap() {
            for r in g["rules"].as_sequence().unwrap() {
                used.extend(metric_names(r["expr"].as_str().unwrap()));
            }
        }
        assert!(used.len() >= 4, "{used:?}");
        let dashboard: serde_json::Value = serde_json::from_str(include_str!(
            "../../deploy/grafana/stateshift-dashboard.json"
        ))
        .unwrap();
        let mut exprs = 0;
        for p in dashboard["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().into_iter().flatten() {
                used.extend(metric_names(t["expr"].as_str().unwrap()));
                exprs += 1;
            }
        }
        used.extend(metric_names(
            dashboard["templating"]["list"][0]["definition"]
                .as_str()
                .unwrap(),
        ));
        assert!(exprs >= 8, "{exprs} panel queries");
        let missing: Vec<&String> = used.iter().filter(|n| !served.contains(*n)).collect();
        assert!(
            missing.is_empty(),
            "not in /metrics: {missing:?}\nserved: {served:?}"
        );
        api.stop.cancel();
    }

    #[tokio::test]
    async fn every_method_but_get_and_head_needs_the_token_on_every_route() {
        let api = start(Some("right-token")).await;
        let url = &api.url;
        let http = reqwest::Client::new();
        for path in [
            "/",
            "/app.js",
            "/healthz",
            "/livez",
            "/readyz",
            "/status",
            "/metrics",
            "/migrate",
            "/no-such-route",
        ] {
            for method in ["POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
                let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
                for token in [None, Some("wrong-token")] {
                    let mut r = http.request(m.clone(), format!("{url}{path}"));
                    if let Some(t) = token {
                        r = r.bearer_auth(t);
                    }
                    let status = r.send().await.unwrap().status();
                    assert_eq!(status, 401, "{method} {path} with {token:?}");
                }
            }
        }
        assert!(
            !api.shared.running.load(Ordering::SeqCst),
            "nothing triggered"
        );
        // Reading stays open.
        for path in ["/", "/app.js", "/healthz", "/livez", "/status", "/metrics"] {
            let r = http.get(format!("{url}{path}")).send().await.unwrap();
            assert_eq!(r.status(), 200, "GET {path}");
        }
        // With the token, the request reaches its handler.
        let r = http
            .post(format!("{url}/migrate"))
            .bearer_auth("right-token")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let r = http
            .delete(format!("{url}/status"))
            .bearer_auth("right-token")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 405, "past the token, the route decides");
        api.stop.cancel();
    }

    #[tokio::test]
    async fn without_a_configured_token_every_state_changing_request_is_refused() {
        let api = start(None).await;
        let url = &api.url;
        let http = reqwest::Client::new();
        for token in [None, Some(""), Some("anything")] {
            let mut r = http.post(format!("{url}/migrate"));
            if let Some(t) = token {
                r = r.bearer_auth(t);
            }
            assert_eq!(r.send().await.unwrap().status(), 401, "{token:?}");
        }
        assert!(!api.shared.running.load(Ordering::SeqCst));
        api.stop.cancel();
    }

    #[tokio::test]
    async fn a_migration_timeline_is_served_and_nothing_else_under_the_work_dir() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("timelines");
        std::fs::create_dir_all(dir.join("1700000000000")).unwrap();
        std::fs::write(dir.join("1700000000000/timeline.svg"), "<svg/>").unwrap();
        std::fs::write(dir.join("1700000000000/timeline.csv"), "unix_time\n").unwrap();
        std::fs::write(tmp.path().join("secret"), "not for the web").unwrap();
        let api = start_with(None, Some(dir)).await;
        let get = |path: &str| reqwest::get(format!("{}{path}", api.url));
        let r = get("/migrations/1700000000000/timeline.svg").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "image/svg+xml");
        assert!(r.headers()["content-security-policy"]
            .to_str()
            .unwrap()
            .starts_with("default-src 'none'"));
        assert_eq!(r.text().await.unwrap(), "<svg/>");
        let r = get("/migrations/1700000000000/timeline.csv").await.unwrap();
        assert_eq!(r.status(), 200);
        for bad in [
            "/migrations/1700000000000/summary.txt",
            "/migrations/..%2Fsecret/timeline.svg",
            "/migrations/..%2F..%2Fsecret/timeline.csv",
            "/migrations/%2E%2E/secret",
            "/migrations/1800000000000/timeline.svg",
        ] {
            let r = get(bad).await.unwrap();
            assert_eq!(r.status(), 404, "{bad}");
            assert!(
                !r.text().await.unwrap().contains("not for the web"),
                "{bad}"
            );
        }
        api.stop.cancel();
    }
}
