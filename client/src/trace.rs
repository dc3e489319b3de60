//! Trace context that travels with events: W3C Trace Context (`traceparent`) in record
//! headers, so one trace follows an event from the service that produced it, through
//! the broker (which stores headers as bytes), to every service that consumes it.
//!
//! - The *current* context is task-local: [`in_context`] runs a future with one, and
//!   [`TraceContext::current`] reads it. An HTTP handler typically starts one from the
//!   request's `traceparent` header (or a new root) and runs its work inside it.
//! - The [`Producer`](crate::Producer) injects a child of the current context into
//!   every record sent within one (a record that already has a `traceparent` keeps it),
//!   and records a `strata.produce` span (`tracing`, debug level) with its ids.
//! - A consumer extracts it: [`ConsumedRecord::trace_context`], and
//!   [`ConsumedRecord::in_trace`] runs a handler inside a child of it with a
//!   `strata.consume` span; [`DeadLetters`](crate::DeadLetters) does that for every
//!   handler it runs.
//!
//! Records sent outside any context carry no trace header and cost nothing extra.
//!
//! With the `otlp` feature, [`otlp::install`] exports these spans (`<topic> publish`,
//! `<topic> process`) to an OpenTelemetry collector over OTLP/gRPC; the ids in the
//! headers are then those of the exported spans, so a collector shows producer and
//! consumer in one trace.
//!
//! ```
//! use strata_client::trace::{self, TraceContext};
//!
//! # async fn run() {
//! let incoming = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
//! let context = incoming.unwrap_or_else(TraceContext::new_root);
//! trace::in_context(context, async {
//!     // Records sent here carry a child of `context` in their traceparent header.
//!     assert_eq!(TraceContext::current().map(|c| c.trace_id), Some(context.trace_id));
//! })
//! .await;
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use tracing::Instrument;

use crate::record::{headers, ConsumedRecord};

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// A W3C trace context: which trace an operation belongs to and which span is its
/// parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    /// The trace, shared by every span of it; never all zeros.
    pub trace_id: [u8; 16],
    /// The span this context names as parent; never all zeros.
    pub span_id: [u8; 8],
    /// Whether the caller records this trace (the `sampled` flag).
    pub sampled: bool,
}

impl TraceContext {
    /// A new trace, sampled, with random ids.
    pub fn new_root() -> TraceContext {
        let high = random_u64().to_be_bytes();
        let low = random_u64().to_be_bytes();
        let mut trace_id = [0; 16];
        trace_id[..8].copy_from_slice(&high);
        trace_id[8..].copy_from_slice(&low);
        TraceContext {
            trace_id,
            span_id: random_span_id(),
            sampled: true,
        }
    }

    /// A context for a new span in the same trace, with this one's span as parent.
    pub fn child(&self) -> TraceContext {
        TraceContext {
            span_id: random_span_id(),
            ..*self
        }
    }

    /// Parses a `traceparent` header value: `00-<32 hex>-<16 hex>-<2 hex>` (lowercase,
    /// ids not all zeros). A future version's value is read by its first four fields,
    /// as the specification asks; `None` for anything invalid.
    pub fn parse(value: &str) -> Option<TraceContext> {
        let mut fields = value.trim().split('-');
        let version = hex::<1>(fields.next()?)?[0];
        let trace_id = hex::<16>(fields.next()?)?;
        let span_id = hex::<8>(fields.next()?)?;
        let flags = hex::<1>(fields.next()?)?[0];
        let rest = fields.next();
        let valid = match version {
            0 => rest.is_none(),
            0xff => false,
            _ => true,
        };
        (valid && trace_id != [0; 16] && span_id != [0; 8]).then_some(TraceContext {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The current task's context, if it runs inside one ([`in_context`]).
    pub fn current() -> Option<TraceContext> {
        CURRENT.try_with(|c| *c).ok()
    }

    /// The trace id as 32 lowercase hex digits, as logs and tracing systems show it.
    pub fn trace_id_hex(&self) -> String {
        to_hex(&self.trace_id)
    }
}

/// The `traceparent` header value: `00-<trace id>-<span id>-<flags>`.
impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            to_hex(&self.trace_id),
            to_hex(&self.span_id),
            u8::from(self.sampled)
        )
    }
}

/// Runs `future` with `context` as the current trace context.
pub async fn in_context<F: Future>(context: TraceContext, future: F) -> F::Output {
    CURRENT.scope(context, future).await
}

/// What a span does, for exporters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SpanKind {
    /// Sending a record.
    Producer,
    /// Processing a received record.
    Consumer,
}

/// A client span: the context its work runs in (and puts in headers) and, with an
/// exporter installed, the exported span, which ends when this is dropped.
pub(crate) struct ClientSpan {
    /// The span's own context: the parent's trace, a new span id.
    pub context: TraceContext,
    #[cfg(feature = "otlp")]
    exported: Option<opentelemetry_sdk::trace::Span>,
}

impl ClientSpan {
    /// Starts a span named `name` under `parent`.
    pub fn start(kind: SpanKind, name: impl Into<String>, parent: TraceContext) -> ClientSpan {
        #[cfg(feature = "otlp")]
        if let Some((context, span)) = otlp::start(kind, name.into(), parent) {
            return ClientSpan {
                context,
                exported: Some(span),
            };
        }
        #[cfg(not(feature = "otlp"))]
        let _ = (kind, name.into());
        ClientSpan {
            context: parent.child(),
            #[cfg(feature = "otlp")]
            exported: None,
        }
    }

    /// Adds where a record is (partition and offset) to the exported span, if any.
    pub fn record_position(&mut self, partition: u32, offset: u64) {
        #[cfg(feature = "otlp")]
        if let Some(span) = &mut self.exported {
            use opentelemetry::trace::Span;
            span.set_attribute(opentelemetry::KeyValue::new(
                "messaging.destination.partition.id",
                partition.to_string(),
            ));
            span.set_attribute(opentelemetry::KeyValue::new(
                "messaging.kafka.offset",
                offset as i64,
            ));
        }
        #[cfg(not(feature = "otlp"))]
        let _ = (partition, offset);
    }
}

impl ConsumedRecord {
    /// The trace context the producer put in the `traceparent` header, if it is there
    /// and valid.
    pub fn trace_context(&self) -> Option<TraceContext> {
        TraceContext::parse(self.header_str(headers::TRACEPARENT)?)
    }

    /// Runs `handler` as the processing of this record: inside a child of the record's
    /// trace context (so what it produces continues the trace) and a `strata.consume`
    /// span carrying the record's position and trace id. A record without a trace
    /// context runs its handler outside any.
    pub async fn in_trace<F: Future>(&self, handler: F) -> F::Output {
        let span = tracing::debug_span!(
            "strata.consume",
            topic = %self.topic,
            partition = self.partition,
            offset = self.offset,
            trace_id = tracing::field::Empty,
        );
        match self.trace_context() {
            Some(context) => {
                span.record("trace_id", context.trace_id_hex());
                let mut process = ClientSpan::start(
                    SpanKind::Consumer,
                    format!("{} process", self.topic),
                    context,
                );
                process.record_position(self.partition, self.offset);
                in_context(process.context, handler.instrument(span)).await
            }
            None => handler.instrument(span).await,
        }
    }
}

/// Export of the client's spans to an OpenTelemetry collector (OTLP over gRPC).
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let _exporter = strata_client::trace::otlp::install("http://127.0.0.1:4317", "checkout")?;
/// // Produce and consume; spans are exported in batches, and flushed when `_exporter`
/// // is dropped.
/// # Ok(())
/// # }
/// ```
#[cfg(feature = "otlp")]
pub mod otlp {
    use opentelemetry::trace::{Span, SpanContext, TraceContextExt, Tracer, TracerProvider};
    use opentelemetry::{Context, KeyValue};
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use std::sync::RwLock;

    use super::{SpanKind, TraceContext};

    /// The tracer of the installed exporter, made once at install.
    static TRACER: RwLock<Option<opentelemetry_sdk::trace::SdkTracer>> = RwLock::new(None);

    /// Exports spans while it lives; dropping it flushes what is left and stops.
    #[derive(Debug)]
    #[must_use = "spans are exported only while the exporter lives"]
    pub struct Exporter {
        provider: SdkTracerProvider,
    }

    /// Starts exporting the client's spans to the OTLP/gRPC `endpoint` (a collector,
    /// e.g. `http://127.0.0.1:4317`) as `service_name`. Call inside a Tokio runtime.
    pub fn install(
        endpoint: &str,
        service_name: &str,
    ) -> Result<Exporter, opentelemetry_otlp::ExporterBuildError> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(service_name.to_string())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        *TRACER.write().unwrap_or_else(|e| e.into_inner()) = Some(provider.tracer("strata-client"));
        Ok(Exporter { provider })
    }

    impl Drop for Exporter {
        fn drop(&mut self) {
            TRACER.write().unwrap_or_else(|e| e.into_inner()).take();
            // Flushes the last batch; a collector that is gone only loses those spans.
            let _ = self.provider.shutdown();
        }
    }

    /// An exported span under `parent`, when an exporter is installed.
    pub(super) fn start(
        kind: SpanKind,
        name: String,
        parent: TraceContext,
    ) -> Option<(TraceContext, opentelemetry_sdk::trace::Span)> {
        let tracer = TRACER.read().unwrap_or_else(|e| e.into_inner()).clone()?;
        let remote = SpanContext::new(
            opentelemetry::trace::TraceId::from_bytes(parent.trace_id),
            opentelemetry::trace::SpanId::from_bytes(parent.span_id),
            if parent.sampled {
                opentelemetry::trace::TraceFlags::SAMPLED
            } else {
                opentelemetry::trace::TraceFlags::default()
            },
            true,
            Default::default(),
        );
        let kind = match kind {
            SpanKind::Producer => opentelemetry::trace::SpanKind::Producer,
            SpanKind::Consumer => opentelemetry::trace::SpanKind::Consumer,
        };
        let span = tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes([KeyValue::new("messaging.system", "strata")])
            .start_with_context(&tracer, &Context::new().with_remote_span_context(remote));
        let own = span.span_context();
        let context = TraceContext {
            trace_id: own.trace_id().to_bytes(),
            span_id: own.span_id().to_bytes(),
            sampled: own.is_sampled(),
        };
        Some((context, span))
    }
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 15) as usize] as char);
    }
    out
}

/// `N` bytes from exactly `2 N` lowercase hex digits.
fn hex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let text = text.as_bytes();
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0; N];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// A 64-bit value no other call in this process returns and no other process can
/// predict: a counter hashed with SipHash under keys the standard library draws from
/// the operating system's random source once per process.
pub(crate) fn random_u64() -> u64 {
    static KEYS: OnceLock<std::collections::hash_map::RandomState> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = KEYS.get_or_init(Default::default).build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.finish()
}

fn random_span_id() -> [u8; 8] {
    loop {
        let id = random_u64();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_the_specification_example_and_writes_it_back() {
        let value = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = TraceContext::parse(value).expect("valid");
        assert!(context.sampled);
        assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.to_string(), value);
    }

    #[test]
    fn refuses_what_the_specification_refuses() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
        // A later version is read by its first four fields.
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-whatever";
        let context = TraceContext::parse(future).expect("a later version");
        assert!(!context.sampled);
    }

    #[test]
    fn children_keep_the_trace_and_get_new_spans() {
        let root = TraceContext::new_root();
        let child = root.child();
        assert_eq!(child.trace_id, root.trace_id);
        assert_ne!(child.span_id, root.span_id);
        assert_ne!(TraceContext::new_root().trace_id, root.trace_id);
    }

    #[tokio::test]
    async fn the_current_context_is_task_local() {
        assert_eq!(TraceContext::current(), None);
        let context = TraceContext::new_root();
        let seen = in_context(context, async { TraceContext::current() }).await;
        assert_eq!(seen, Some(context));
        assert_eq!(TraceContext::current(), None);
    }

    proptest! {
        #[test]
        fn every_context_survives_its_header(
            trace_id in prop::array::uniform16(any::<u8>()),
            span_id in prop::array::uniform8(any::<u8>()),
            sampled in any::<bool>(),
        ) {
            let context = TraceContext { trace_id, span_id, sampled };
            let parsed = TraceContext::parse(&context.to_string());
            let valid = trace_id != [0; 16] && span_id != [0; 8];
            prop_assert_eq!(parsed, valid.then_some(context));
        }
    }
}

/// The spans reach a real OTLP/gRPC endpoint (a collector played by the test) with the
/// ids the headers carry. Run with `--features otlp`.
#[cfg(all(test, feature = "otlp"))]
mod otlp_tests {
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use opentelemetry_proto::tonic::trace::v1::Span;

    use super::*;

    #[derive(Default, Clone)]
    struct Collector(Arc<Mutex<Vec<Span>>>);

    #[tonic::async_trait]
    impl TraceService for Collector {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let spans = request
                .into_inner()
                .resource_spans
                .into_iter()
                .flat_map(|r| r.scope_spans)
                .flat_map(|s| s.spans);
            self.0.lock().expect("not poisoned").extend(spans);
            Ok(tonic::Response::new(ExportTraceServiceResponse {
                partial_success: None,
            }))
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publish_and_process_spans_reach_the_collector_in_one_trace() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        let collector = Collector::default();
        let service = TraceServiceServer::new(collector.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let exporter = otlp::install(&format!("http://{address}"), "test").expect("install");

        let root = TraceContext::new_root();
        let mut publish = ClientSpan::start(SpanKind::Producer, "orders publish", root);
        publish.record_position(2, 41);
        let header = publish.context.to_string();
        drop(publish);
        let record = ConsumedRecord {
            topic: Arc::from("orders"),
            partition: 2,
            offset: 41,
            timestamp_ms: 0,
            key: None,
            value: None,
            headers: vec![(headers::TRACEPARENT.into(), Bytes::from(header.clone()))],
        };
        let inside = record.in_trace(async { TraceContext::current() }).await;
        tokio::task::spawn_blocking(move || drop(exporter))
            .await
            .expect("flushed");

        let spans = collector.0.lock().expect("not poisoned").clone();
        let by_name = |name: &str| {
            spans
                .iter()
                .find(|s| s.name == name)
                .unwrap_or_else(|| panic!("no span {name} in {spans:?}"))
                .clone()
        };
        let (publish, process) = (by_name("orders publish"), by_name("orders process"));
        let sent = TraceContext::parse(&header).expect("a valid header");
        assert_eq!(publish.trace_id, root.trace_id);
        assert_eq!(publish.parent_span_id, root.span_id);
        assert_eq!(
            publish.span_id, sent.span_id,
            "the header names the publish span"
        );
        assert_eq!(process.trace_id, root.trace_id);
        assert_eq!(process.parent_span_id, publish.span_id);
        let inside = inside.expect("the handler runs in the process span");
        assert_eq!(inside.span_id[..], process.span_id[..]);
    }
}
