//! The HTTP listener: `/metrics` (Prometheus/OpenMetrics text), `/healthz` (the process
//! answers) and `/readyz` (the broker serves everything, or why not).
//!
//! It starts before the data directory is opened, so while recovery runs `/readyz`
//! answers 503 with `starting`, and it stops after every log is closed, so a shutdown
//! shows as 503 `shutting down` until the end. Scrapes encode on the blocking pool:
//! group lag in seconds reads batch headers, and process metrics read `/proc`.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::broker::Broker;

/// The content type of the OpenMetrics text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the HTTP handlers read; filled in as the broker starts and stops.
#[derive(Debug, Default)]
pub struct HttpState {
    serving: OnceLock<(Arc<Broker>, Registry)>,
    stopping: AtomicBool,
}

impl HttpState {
    /// The broker is open: metrics and readiness come from it from now on.
    pub fn serve(&self, broker: Arc<Broker>) {
        let registry = crate::metrics::registry(Arc::clone(&broker));
        let _ = self.serving.set((broker, registry));
    }

    /// A shutdown began: `/readyz` answers 503 from now on.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }
}

/// Serves the HTTP endpoints on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: Arc<HttpState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(state);
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

fn unavailable(body: String) -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
}

async fn metrics(State(state): State<Arc<HttpState>>) -> Response {
    if state.serving.get().is_none() {
        return unavailable("starting: opening the data directory\n".into());
    }
    let encoded = tokio::task::spawn_blocking(move || {
        let (_, registry) = state.serving.get()?;
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).ok()?;
        Some(text)
    })
    .await;
    match encoded {
        Ok(Some(text)) => ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response(),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics; the broker's log says why\n",
        )
            .into_response(),
    }
}

async fn ready(State(state): State<Arc<HttpState>>) -> Response {
    if state.stopping.load(Ordering::Acquire) {
        return unavailable("shutting down\n".into());
    }
    let Some((broker, _)) = state.serving.get() else {
        return unavailable("starting: opening the data directory\n".into());
    };
    let problems = broker.problems();
    if problems.is_empty() {
        return "ready\n".into_response();
    }
    unavailable(problems.iter().map(|p| format!("{p}\n")).collect())
}
