//! The HTTP listener: `/metrics` (Prometheus/OpenMetrics text), `/healthz` (the process
//! answers) and `/readyz` (the broker serves everything, or why not).
//!
//! It starts before the data directory is opened, so while recovery runs `/readyz`
//! answers 503 `starting` and `/metrics` the process's metrics with `strata_ready 0`;
//! and it stops after every log is closed, so a shutdown shows as 503 `shutting down`
//! until the end. Scrapes encode on the blocking pool: group lag in seconds may read
//! batch headers, and process metrics read `/proc`.

pub mod client;

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use crate::metrics::{Metrics, Source};

/// The content type of the OpenMetrics text format.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the HTTP handlers read.
#[derive(Debug)]
pub struct HttpState {
    source: Arc<Source>,
    registry: Registry,
}

impl HttpState {
    /// The state of a broker recording into `metrics`, whose progress `source` follows.
    pub fn new(metrics: &Metrics, source: Arc<Source>) -> HttpState {
        HttpState {
            registry: crate::metrics::registry(metrics, Arc::clone(&source)),
            source,
        }
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

async fn metrics(State(state): State<Arc<HttpState>>) -> Response {
    let encoded = tokio::task::spawn_blocking(move || {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &state.registry).map(|()| text)
    })
    .await;
    match encoded {
        Ok(Ok(text)) => ([(header::CONTENT_TYPE, OPENMETRICS)], text).into_response(),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics; the broker's log says why\n",
        )
            .into_response(),
    }
}

async fn ready(State(state): State<Arc<HttpState>>) -> Response {
    let problems = state.source.not_ready();
    if problems.is_empty() {
        return "ready\n".into_response();
    }
    let body: String = problems.iter().map(|p| format!("{p}\n")).collect();
    (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
}
