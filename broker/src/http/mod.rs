//! The HTTP listener: `/metrics` (Prometheus/OpenMetrics text), `/healthz` (the process
//! answers) and `/readyz` (the broker serves everything, or why not).
//!
//! It starts before the data directory is opened, so while recovery runs `/readyz`
//! answers 503 `starting` and `/metrics` the process's metrics with `strata_ready 0`;
//! and it stops after every log is closed, so a shutdown shows as 503 `shutting down`
//! until the end. Scrapes encode on the blocking pool: group lag in seconds may read
//! batch headers, and process metrics read `/proc`.
//!
//! At most `max_http_connections` connections are open; more are closed as soon as
//! they are accepted, and `accept` backs off when the process is out of descriptors,
//! as on the gRPC and Kafka listeners ([`crate::grpc::connections`]).

pub mod client;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::grpc::connections::{AcceptPacer, Warner};
use crate::metrics::{Metrics, Source};

/// The content type of the OpenMetrics text format.
/// A connection that moves no byte either way for this long is closed, so clients that
/// connect and send nothing, or keep idle connections, cannot hold every one of
/// `max_http_connections` (and lock health probes out).
const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

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

/// Serves the HTTP endpoints on `listener`, with at most `max_connections` open, until
/// `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    max_connections: usize,
    state: Arc<HttpState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(state);
    let listener = Capped {
        listener,
        max_connections,
        permits: Arc::new(Semaphore::new(max_connections)),
        pacer: AcceptPacer::default(),
        refused: Warner::default(),
    };
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// A listener that keeps at most `max_connections` connections open: one accepted
/// beyond that is closed at once (so scrapers that never close cannot take the
/// process's descriptors), and a failing `accept` is paced.
struct Capped {
    listener: TcpListener,
    max_connections: usize,
    permits: Arc<Semaphore>,
    pacer: AcceptPacer,
    refused: Warner,
}

impl axum::serve::Listener for Capped {
    type Io = Held;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Held, SocketAddr) {
        loop {
            let (stream, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    self.pacer.failed(&e, "HTTP").await;
                    continue;
                }
            };
            self.pacer.accepted();
            match Arc::clone(&self.permits).try_acquire_owned() {
                Ok(permit) => return (Held::new(stream, permit), peer),
                Err(_) => {
                    if let Some(missed) = self.refused.due() {
                        tracing::warn!(
                            %peer,
                            max_http_connections = self.max_connections,
                            refused_since_last_warning = missed,
                            "closing a new HTTP connection: max_http_connections are open"
                        );
                    }
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }
}

/// An HTTP connection, holding one of the listener's permits until it is closed, and
/// failing with `TimedOut` once it has been idle for [`IDLE_TIMEOUT`].
struct Held {
    io: TcpStream,
    idle: Pin<Box<tokio::time::Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl Held {
    fn new(io: TcpStream, permit: OwnedSemaphorePermit) -> Held {
        Held {
            io,
            idle: Box::pin(tokio::time::sleep(IDLE_TIMEOUT)),
            _permit: permit,
        }
    }

    /// Passes on what the socket did: progress restarts the idle clock; waiting fails
    /// once the clock ran out.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        match polled {
            Poll::Ready(result) => {
                self.idle
                    .as_mut()
                    .reset(tokio::time::Instant::now() + IDLE_TIMEOUT);
                Poll::Ready(result)
            }
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("HTTP connection idle for {IDLE_TIMEOUT:?}"),
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncRead for Held {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        self.watch(cx, polled)
    }
}

impl AsyncWrite for Held {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.watch(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.watch(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connection that sends nothing is closed after the idle timeout; one that moves
    /// bytes restarts its clock each time. (The clock is tokio's paused one.)
    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_times_out_and_progress_restarts_the_clock() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let permit = Arc::new(Semaphore::new(1))
            .try_acquire_owned()
            .expect("a permit");
        let mut held = Held::new(server, permit);
        let started = tokio::time::Instant::now();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(IDLE_TIMEOUT * 2 / 3).await;
            client.write_all(b"x").await.expect("write");
            client
        });
        let mut byte = [0u8; 1];
        held.read_exact(&mut byte)
            .await
            .expect("the byte arrives before the timeout");
        let _client = writer.await.expect("writer");
        let e = held.read(&mut byte).await.expect_err("idle since the byte");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        let idle_from = IDLE_TIMEOUT * 2 / 3;
        assert!(
            started.elapsed() >= idle_from + IDLE_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
    }
}
