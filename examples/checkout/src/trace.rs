//! W3C trace context: the `traceparent` header on HTTP requests and on events.
//!
//! Everything the checkout does with trace context lives here — parsing the header,
//! starting a child span, putting it on a record, reading it back off a consumed one —
//! so that this module can be swapped for strata-client's own trace-context support
//! once the client has it. A `traceparent` is
//! `00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>`
//! (<https://www.w3.org/TR/trace-context/#traceparent-header>).
//!
//! The trace id of a checkout is fixed when `POST /checkout` arrives (taken from the
//! caller's `traceparent`, or new) and every hop after it — the inventory call, the
//! outbox row, `orders.created`, the payment, `payments.completed`, the notification —
//! carries the same trace id with a span id of its own, so one id finds the whole
//! story in every service's log.

use std::fmt;

use axum::http::HeaderMap;
use strata_client::{headers, ConsumedRecord, Record};

/// The header's name, on HTTP requests and on records.
pub const TRACEPARENT: &str = headers::TRACEPARENT;

/// The `sampled` flag: this service records what it does for the trace.
const FLAG_SAMPLED: u8 = 0x01;

/// One span's trace context.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    trace_id: [u8; 16],
    span_id: [u8; 8],
    flags: u8,
}

impl TraceContext {
    /// A new trace (no caller sent one): random trace and span ids, sampled.
    pub fn new_root() -> TraceContext {
        let random = uuid::Uuid::new_v4().into_bytes();
        TraceContext {
            trace_id: random,
            span_id: new_span_id(),
            flags: FLAG_SAMPLED,
        }
    }

    /// Parses a `traceparent` value; `None` if it is not valid. Versions other than
    /// `00` are read by their first four fields, as the specification asks; version
    /// `ff`, all-zero ids and upper-case hex are invalid.
    pub fn parse(value: &str) -> Option<TraceContext> {
        let mut fields = value.trim().split('-');
        let version = fields.next()?;
        let trace = fields.next()?;
        let span = fields.next()?;
        let flags = fields.next()?;
        let rest = fields.next();
        if version.len() != 2 || version == "ff" || (version == "00" && rest.is_some()) {
            return None;
        }
        hex::<1>(version)?;
        let trace_id = hex::<16>(trace)?;
        let span_id = hex::<8>(span)?;
        let [flags] = hex::<1>(flags)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceContext {
            trace_id,
            span_id,
            flags,
        })
    }

    /// A span inside this one's trace: same trace id and flags, a new span id.
    pub fn child(&self) -> TraceContext {
        TraceContext {
            span_id: new_span_id(),
            ..*self
        }
    }

    /// The span of a service handling an HTTP request: a child of the caller's
    /// `traceparent`, or a new trace if there is none (or it is invalid).
    pub fn from_http(headers: &HeaderMap) -> TraceContext {
        headers
            .get(TRACEPARENT)
            .and_then(|v| v.to_str().ok())
            .and_then(TraceContext::parse)
            .map_or_else(TraceContext::new_root, |parent| parent.child())
    }

    /// The span of a consumer handling a record: a child of the record's
    /// `traceparent`, or a new trace if the producer sent none.
    pub fn from_record(record: &ConsumedRecord) -> TraceContext {
        record
            .header_str(TRACEPARENT)
            .and_then(TraceContext::parse)
            .map_or_else(TraceContext::new_root, |parent| parent.child())
    }

    /// `record` with this span as its `traceparent`: the consumer's span will be its
    /// child.
    pub fn inject(&self, record: Record) -> Record {
        record.header(TRACEPARENT, self.to_string())
    }

    /// The trace id as 32 lower-case hex digits, as logged and stored.
    pub fn trace_id(&self) -> String {
        to_hex(&self.trace_id)
    }

    /// The span id as 16 lower-case hex digits.
    pub fn span_id(&self) -> String {
        to_hex(&self.span_id)
    }
}

/// The `traceparent` value: `00-<trace id>-<span id>-<flags>`.
impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            to_hex(&self.trace_id),
            to_hex(&self.span_id),
            self.flags
        )
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceContext({self})")
    }
}

fn new_span_id() -> [u8; 8] {
    let random = uuid::Uuid::new_v4().into_bytes();
    let mut span = [0; 8];
    span.copy_from_slice(&random[..8]);
    if span == [0; 8] {
        span[7] = 1;
    }
    span
}

/// Exactly `2 * N` lower-case hex digits.
fn hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let digits = s.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0; N];
    for (i, pair) in digits.chunks_exact(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(2 * bytes.len()), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_prints_the_specification_example() {
        let context = TraceContext::parse(EXAMPLE).expect("valid");
        assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.span_id(), "00f067aa0ba902b7");
        assert_eq!(context.to_string(), EXAMPLE);
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0g-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn reads_the_known_fields_of_a_future_version() {
        let future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later";
        let context = TraceContext::parse(future).expect("valid");
        assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn a_child_keeps_the_trace_and_gets_a_new_span() {
        let parent = TraceContext::parse(EXAMPLE).expect("valid");
        let child = parent.child();
        assert_eq!(child.trace_id(), parent.trace_id());
        assert_ne!(child.span_id(), parent.span_id());
        assert_eq!(TraceContext::parse(&child.to_string()), Some(child));
    }

    #[test]
    fn http_headers_continue_the_callers_trace_or_start_one() {
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, EXAMPLE.parse().expect("a header value"));
        let context = TraceContext::from_http(&headers);
        assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        headers.insert(TRACEPARENT, "garbage".parse().expect("a header value"));
        let fresh = TraceContext::from_http(&headers);
        assert_ne!(fresh.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(TraceContext::parse(&fresh.to_string()), Some(fresh));
    }

    #[test]
    fn a_record_carries_the_context_to_its_consumer() {
        let producer_span = TraceContext::new_root();
        let record = producer_span.inject(Record::new("x"));
        let consumed = ConsumedRecord {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            timestamp_ms: 0,
            key: None,
            value: record.value.clone(),
            headers: record.headers.clone(),
        };
        let consumer_span = TraceContext::from_record(&consumed);
        assert_eq!(consumer_span.trace_id(), producer_span.trace_id());
        assert_ne!(consumer_span.span_id(), producer_span.span_id());
    }
}
