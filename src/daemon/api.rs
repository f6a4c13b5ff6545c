//! The daemon's HTTP API (bound to 127.0.0.1 by default): `/healthz`, `/status` (JSON),
//! `/metrics` (Prometheus text), `POST /migrate` (bearer token; 409 while a migration
//! runs). A refused token is logged without the token.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
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
    triggers: Counter,
    migrations: Family<Labels, Counter>,
    phase_seconds: Family<Labels, Gauge<f64, AtomicU64>>,
    points_moved: Counter,
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
            triggers: Counter::default(),
            migrations: Family::default(),
            phase_seconds: Family::default(),
            points_moved: Counter::default(),
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
                "triggers",
                "Migrations triggered by the prediction or by hand",
                m.triggers.clone(),
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
    pub fn encode(&self) -> String {
        let mut s = String::new();
        let r = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        if encode(&mut s, &r).is_err() {
            s.clear();
        }
        s
    }
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/migrate", post(migrate))
        .with_state(shared);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "HTTP API stopped");
    }
}

async fn status(State(s): State<Arc<Shared>>) -> impl IntoResponse {
    let st = s.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
    axum::Json(st)
}

async fn metrics(State(s): State<Arc<Shared>>) -> impl IntoResponse {
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

async fn migrate(State(s): State<Arc<Shared>>, headers: HeaderMap) -> (StatusCode, String) {
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let ok = match (&s.token, given) {
        (Some(t), Some(g)) => same(t.expose().as_bytes(), g.trim().as_bytes()),
        _ => false,
    };
    if !ok {
        tracing::warn!(
            token_given = given.is_some(),
            "POST /migrate refused: missing or wrong bearer token"
        );
        return (
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token\n".into(),
        );
    }
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
    match s.trigger.try_send("manual: POST /migrate".into()) {
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
