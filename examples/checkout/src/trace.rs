//! Trace context at the checkout's HTTP edge.
//!
//! Events carry W3C trace context (`traceparent`) through strata-client's own support
//! ([`strata_client::trace`]): the outbox relay publishes each event inside the context
//! that caused it, so the producer puts a child of it in the record's `traceparent`
//! header; the dead-letter helper runs every handler inside a child of the record's
//! context, so what a handler writes to its outbox continues the trace. What the client
//! does not know is HTTP: this module reads a request's `traceparent` and gives the one
//! to send on a call, so the trace id fixed when `POST /checkout` arrives (the caller's,
//! or a new one) is the one every service logs and stores for that order.

use axum::http::HeaderMap;
pub use strata_client::trace::TraceContext;

/// The header's name, on HTTP requests and on records.
pub const TRACEPARENT: &str = strata_client::headers::TRACEPARENT;

/// The context of a service handling an HTTP request: a child of the caller's
/// `traceparent`, or a new trace if there is none (or it is invalid).
pub fn from_http(headers: &HeaderMap) -> TraceContext {
    headers
        .get(TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::parse)
        .map_or_else(TraceContext::new_root, |parent| parent.child())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_request_continues_the_callers_trace_or_starts_one() {
        let mut headers = HeaderMap::new();
        headers.insert(TRACEPARENT, EXAMPLE.parse().expect("a header value"));
        let context = from_http(&headers);
        assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(
            Some(context),
            TraceContext::parse(EXAMPLE),
            "a span of its own"
        );
        headers.insert(TRACEPARENT, "garbage".parse().expect("a header value"));
        let fresh = from_http(&headers);
        assert_ne!(fresh.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(TraceContext::parse(&fresh.to_string()), Some(fresh));
        assert_ne!(from_http(&HeaderMap::new()).trace_id, fresh.trace_id);
    }
}
