//! What the gRPC listener records about its requests and connections.
//!
//! - [`Scope`], used by every handler: times the request (Fetch without its long-poll
//!   wait) and, when it fails, logs it once with its RPC, topic, partition or group and
//!   cause (never payloads), at the level its [`Severity`] says, and tags the status
//!   with a machine-readable `strata-reason` header.
//! - [`RequestsLayer`], around every service: counts requests in flight and every
//!   request answered with an error by RPC, status and reason, including those tonic
//!   refuses before a handler runs (a message over the size limit, an unknown method),
//!   which it also logs.
//! - [`Counted`], around every accepted connection: the open-connections gauge.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;
use tonic::{Code, Response, Status};

use crate::error::{Error, Result, Severity};
use crate::grpc::service::ResponseMemory;
use crate::metrics::{Metrics, RejectedLabels};

/// The header of an error status that names its reason ([`Error::reason`]).
pub const REASON_HEADER: &str = "strata-reason";

const LISTENER: &str = "grpc";

/// Every RPC the listener serves, so metric labels come from a fixed set.
pub const RPCS: &[&str] = &[
    "CreateTopic",
    "DeleteTopic",
    "ListTopics",
    "DescribeTopic",
    "ListOffsets",
    "ListGroups",
    "DescribeGroup",
    "ResetOffsets",
    "DeleteGroup",
    "Produce",
    "Fetch",
    "Subscribe",
    "InitProducer",
    "Heartbeat",
    "LeaveGroup",
    "CommitOffsets",
    "FetchOffsets",
    "Check",
    "Watch",
    "ServerReflectionInfo",
];

/// The RPC name of a request path `/package.Service/Method`; `unknown` for any other.
fn rpc_name(path: &str) -> &'static str {
    let method = path.rsplit('/').next().unwrap_or_default();
    RPCS.iter()
        .find(|&&m| m == method)
        .copied()
        .unwrap_or("unknown")
}

/// The context of one request, for its metrics and, if it fails, its log line.
pub struct Scope {
    metrics: Arc<Metrics>,
    rpc: &'static str,
    started: Instant,
    topic: Option<String>,
    partition: Option<u32>,
    group: Option<String>,
}

impl Scope {
    /// Starts timing a request of `rpc`.
    pub fn new(metrics: &Arc<Metrics>, rpc: &'static str) -> Scope {
        Scope {
            metrics: Arc::clone(metrics),
            rpc,
            started: Instant::now(),
            topic: None,
            partition: None,
            group: None,
        }
    }

    /// The topic the request is about.
    pub fn topic(mut self, topic: &str) -> Scope {
        self.topic = Some(topic.to_string());
        self
    }

    /// The partition the request is about.
    pub fn partition(mut self, partition: u32) -> Scope {
        self.partition = Some(partition);
        self
    }

    /// The partition the request turned out to be about (a produce routed by key).
    pub fn set_partition(&mut self, partition: u32) {
        self.partition = Some(partition);
    }

    /// The consumer group the request is about.
    pub fn group(mut self, group: &str) -> Scope {
        self.group = Some(group.to_string());
        self
    }

    /// Starts the clock again: what came before (a long poll's wait for data) is not the
    /// broker's latency.
    pub fn restart_clock(&mut self) {
        self.started = Instant::now();
    }

    /// Records the request's duration and turns its result into the gRPC answer.
    pub fn finish<T>(self, result: Result<T>) -> Result<Response<T>, Status> {
        self.metrics
            .request(LISTENER, self.rpc, self.started.elapsed());
        result.map(Response::new).map_err(|e| self.fail(e))
    }

    /// Logs a failed request once and converts its error to a status tagged with its
    /// reason.
    pub fn fail(&self, e: Error) -> Status {
        let reason = e.reason();
        // Fields a request does not have are left out of the line.
        let (topic, partition, group) =
            (self.topic.as_deref(), self.partition, self.group.as_deref());
        macro_rules! log {
            ($level:expr) => {
                tracing::event!(
                    $level,
                    rpc = self.rpc,
                    topic,
                    partition,
                    group,
                    reason,
                    error = %e,
                    "request failed"
                )
            };
        }
        match e.severity() {
            Severity::Client => log!(tracing::Level::DEBUG),
            Severity::Degraded => log!(tracing::Level::WARN),
            Severity::Fault => log!(tracing::Level::ERROR),
        }
        let mut status = Status::from(e);
        status.metadata_mut().insert(
            REASON_HEADER,
            tonic::metadata::MetadataValue::from_static(reason),
        );
        status
    }
}

/// Counts requests in flight and requests answered with an error; see the module doc.
#[derive(Debug, Clone)]
pub struct RequestsLayer {
    metrics: Arc<Metrics>,
}

impl RequestsLayer {
    /// A layer recording into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> RequestsLayer {
        RequestsLayer { metrics }
    }
}

impl<S> tower_layer::Layer<S> for RequestsLayer {
    type Service = Requests<S>;

    fn layer(&self, inner: S) -> Requests<S> {
        Requests {
            inner,
            metrics: Arc::clone(&self.metrics),
        }
    }
}

/// The service [`RequestsLayer`] wraps around the listener's routes.
#[derive(Debug, Clone)]
pub struct Requests<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

/// The reason of a refusal tonic made before any handler ran.
fn transport_reason(code: Code) -> &'static str {
    match code {
        Code::Unimplemented => "unknown_rpc",
        Code::OutOfRange | Code::ResourceExhausted => "message_too_large",
        Code::Internal | Code::InvalidArgument => "malformed_request",
        _ => "transport",
    }
}

impl<S, B, ResBody> tower_service::Service<http::Request<B>> for Requests<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: http_body::Body + Unpin,
{
    type Response = http::Response<LimitNamed<ResBody>>;
    type Error = S::Error;
    type Future =
        Pin<Box<dyn Future<Output = std::result::Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let rpc = rpc_name(request.uri().path());
        let path_limit = size_limit(request.uri().path());
        let metrics = Arc::clone(&self.metrics);
        let in_flight = InFlight::new(&metrics.in_flight);
        let answer = self.inner.call(request);
        Box::pin(async move {
            let response = answer.await.map(|mut r| {
                let memory = r.extensions_mut().remove::<ResponseMemory>();
                r.map(|body| LimitNamed {
                    inner: body,
                    limit: path_limit,
                    _memory: memory,
                })
            });
            let mut response = response;
            drop(in_flight);
            if let Ok(response) = &mut response {
                name_size_limit(path_limit, response.headers_mut());
                // An error answered before any message is a trailers-only response: its
                // status is in the headers. Errors inside a stream are not seen here.
                let headers = response.headers();
                let code = headers
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok()?.parse::<i32>().ok())
                    .map(Code::from_i32)
                    .filter(|&c| c != Code::Ok);
                if let Some(code) = code {
                    let reason = match headers.get(REASON_HEADER) {
                        Some(r) => static_reason(r.to_str().unwrap_or_default()),
                        None => {
                            let message = headers
                                .get("grpc-message")
                                .and_then(|m| m.to_str().ok())
                                .unwrap_or_default();
                            tracing::debug!(rpc, ?code, message, "request refused");
                            transport_reason(code)
                        }
                    };
                    metrics
                        .rejected
                        .get_or_create(&RejectedLabels {
                            listener: LISTENER,
                            rpc,
                            code: code_name(code),
                            reason,
                        })
                        .inc();
                }
            }
            response
        })
    }
}

/// The setting that bounds the requests of the service at `path`.
fn size_limit(path: &str) -> &'static str {
    if path.starts_with("/strata.v1.Admin/") {
        "max_admin_request_bytes"
    } else if path.starts_with("/strata.v1.Groups/") {
        "max_groups_request_bytes"
    } else {
        // The Broker service's bound is the largest batch (32MiB) plus 1MiB.
        "produce_request_bytes"
    }
}

/// Turns tonic's refusal of a request over the size limit (OUT_OF_RANGE, "decoded
/// message length too large") into RESOURCE_EXHAUSTED naming the setting, as every
/// other limit is reported.
fn name_size_limit(limit: &'static str, headers: &mut http::HeaderMap) {
    let too_large = headers.get("grpc-status").is_some_and(|v| v == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            // Percent-encoded, as grpc-message is on the wire.
            .is_some_and(|m| m.contains("message%20length%20too%20large"));
    if !too_large {
        return;
    }
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .unwrap_or_default();
    let rewritten = format!("{message}%20(limit%20{limit})");
    if let Ok(value) = http::HeaderValue::from_str(&rewritten) {
        headers.insert("grpc-message", value);
    }
    headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    headers.insert(
        REASON_HEADER,
        http::HeaderValue::from_static("limit_exceeded"),
    );
}

/// A response body whose trailers get [`name_size_limit`]: tonic reports a request
/// over the size limit in the trailers once it has sent the response headers.
///
/// It also holds the response's share of the fetch memory budget, if it has one, until
/// the transport drops it, having sent (nearly) all of it.
pub struct LimitNamed<B> {
    inner: B,
    limit: &'static str,
    _memory: Option<ResponseMemory>,
}

impl<B: http_body::Body + Unpin> http_body::Body for LimitNamed<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<http_body::Frame<B::Data>, B::Error>>> {
        let limit = self.limit;
        Pin::new(&mut self.inner).poll_frame(cx).map(|frame| {
            frame.map(|frame| {
                frame.map(|mut frame| {
                    if let Some(trailers) = frame.trailers_mut() {
                        name_size_limit(limit, trailers);
                    }
                    frame
                })
            })
        })
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The `&'static` reason matching a header the handlers set from [`Error::reason`].
fn static_reason(reason: &str) -> &'static str {
    crate::error::REASONS
        .iter()
        .find(|&&r| r == reason)
        .copied()
        .unwrap_or("other")
}

/// The canonical name of a status code, as gRPC documents it.
fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// One unit of a gauge for as long as it lives.
pub struct InFlight(Gauge);

impl InFlight {
    /// Adds one to `gauge`, taken back when the result is dropped.
    pub fn new(gauge: &Gauge) -> InFlight {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// An accepted connection, counted in the open-connections gauge while it is open.
pub struct Counted<IO> {
    io: IO,
    _open: InFlight,
}

impl<IO> Counted<IO> {
    /// Counts `io` in `gauge` until it is dropped.
    pub fn new(io: IO, gauge: &Gauge) -> Counted<IO> {
        Counted {
            io,
            _open: InFlight::new(gauge),
        }
    }
}

impl<IO: Connected> Connected for Counted<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_names_come_from_a_fixed_set() {
        assert_eq!(rpc_name("/strata.v1.Broker/Produce"), "Produce");
        assert_eq!(rpc_name("/grpc.health.v1.Health/Check"), "Check");
        assert_eq!(rpc_name("/strata.v1.Broker/Nope"), "unknown");
        assert_eq!(rpc_name(""), "unknown");
    }

    #[test]
    fn every_reason_an_error_gives_is_known_to_the_layer() {
        let errors = [
            Error::TopicNotFound("t".into()),
            Error::ShuttingDown,
            Error::DiskFull("t/0".into(), "full".into()),
            Error::Storage(strata_storage::Error::InvalidConfig("x".into())),
        ];
        for e in errors {
            assert_eq!(static_reason(e.reason()), e.reason());
        }
    }
}
