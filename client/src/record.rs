//! Records as the application writes them ([`Record`]) and reads them
//! ([`ConsumedRecord`]).

use std::sync::Arc;

use bytes::Bytes;
use strata_storage::batch::BATCH_HEADER_LEN;
use strata_storage::compression::Compression;

/// A record to produce: an optional key (which picks the partition), an optional value,
/// headers, and a timestamp (the time of [`Producer::send`](crate::Producer::send) when
/// not set).
///
/// ```
/// use strata_client::Record;
///
/// let record = Record::new(r#"{"total": 42}"#)
///     .key("order-42")
///     .header("event-type", "order.created")
///     .header("schema-version", "3")
///     .timestamp_ms(1_767_225_600_000);
/// assert_eq!(record.headers.len(), 2);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    /// The key; `None` is a null key (distinct from an empty one). Keyed records go to
    /// the key's partition, so one key's records stay in order.
    pub key: Option<Bytes>,
    /// The value; `None` is a null value (a tombstone).
    pub value: Option<Bytes>,
    /// Headers in order: event id, type, schema version, trace context, ...
    pub headers: Vec<(String, Bytes)>,
    /// Milliseconds since the Unix epoch; `None` takes the time of sending.
    pub timestamp_ms: Option<i64>,
}

impl Record {
    /// A record with this value, no key and no headers.
    pub fn new(value: impl Into<Bytes>) -> Record {
        Record {
            value: Some(value.into()),
            ..Record::default()
        }
    }

    /// Sets the key.
    pub fn key(mut self, key: impl Into<Bytes>) -> Record {
        self.key = Some(key.into());
        self
    }

    /// Appends a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Bytes>) -> Record {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the timestamp, in milliseconds since the Unix epoch.
    pub fn timestamp_ms(mut self, timestamp_ms: i64) -> Record {
        self.timestamp_ms = Some(timestamp_ms);
        self
    }

    /// Upper bound of the bytes this record takes in an encoded batch.
    pub(crate) fn encoded_len_max(&self) -> usize {
        // Length, attributes, timestamp delta and offset delta varints take at most
        // 5 + 1 + 10 + 5 bytes; each nullable field at most 5 bytes of length.
        const FIXED: usize = 21;
        const FIELD: usize = 5;
        let len = |b: &Option<Bytes>| FIELD + b.as_ref().map_or(0, Bytes::len);
        FIXED
            + len(&self.key)
            + len(&self.value)
            + FIELD
            + self
                .headers
                .iter()
                .map(|(n, v)| 2 * FIELD + n.len() + v.len())
                .sum::<usize>()
    }
}

/// Header names. Strata gives headers no meaning; these are the names this crate's
/// documentation uses for event metadata, so services agree on them, and the names the
/// dead-letter helper writes.
///
/// ```
/// use strata_client::{headers, Record};
///
/// let event = Record::new(r#"{"order": 42}"#)
///     .key("order-42")
///     .header(headers::EVENT_ID, "5f0c6d1e-9d4b-4c57-b7a4-2b1f5e0f7a10")
///     .header(headers::EVENT_TYPE, "order.created")
///     .header(headers::SCHEMA_VERSION, "2")
///     .header(headers::TRACEPARENT, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// assert_eq!(event.headers.len(), 4);
/// ```
pub mod headers {
    /// A unique id of the event, for deduplication by consumers (at-least-once delivery
    /// can hand a record over twice).
    pub const EVENT_ID: &str = "event-id";
    /// What happened, e.g. `order.created`.
    pub const EVENT_TYPE: &str = "event-type";
    /// The version of the value's schema, so consumers can decode old and new events.
    pub const SCHEMA_VERSION: &str = "schema-version";
    /// W3C trace context (`00-<trace id>-<span id>-<flags>`), so a trace follows the
    /// event from producer to consumer.
    pub const TRACEPARENT: &str = "traceparent";

    /// On a dead letter ([`DeadLetters`](crate::DeadLetters)): the last error's text.
    pub const DLQ_ERROR: &str = "dlq.error";
    /// On a dead letter: how often the handler was tried.
    pub const DLQ_ATTEMPTS: &str = "dlq.attempts";
    /// On a dead letter: the topic the record was read from.
    pub const DLQ_SOURCE_TOPIC: &str = "dlq.source.topic";
    /// On a dead letter: the partition the record was read from.
    pub const DLQ_SOURCE_PARTITION: &str = "dlq.source.partition";
    /// On a dead letter: the record's offset there.
    pub const DLQ_SOURCE_OFFSET: &str = "dlq.source.offset";
    /// On a dead letter: the record's own timestamp (ms since the Unix epoch).
    pub const DLQ_SOURCE_TIMESTAMP: &str = "dlq.source.timestamp";
    /// On a dead letter: when it was dead-lettered (ms since the Unix epoch).
    pub const DLQ_TIMESTAMP: &str = "dlq.timestamp";
}

/// A record read from a partition. Key, value and header values share the fetched
/// buffer (no copy per record).
///
/// ```
/// # use strata_client::ConsumedRecord;
/// fn describe(record: &ConsumedRecord) -> String {
///     let event_type = record
///         .header_str(strata_client::headers::EVENT_TYPE)
///         .unwrap_or("unknown");
///     format!("{event_type} at {}/{}@{}", record.topic, record.partition, record.offset)
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedRecord {
    /// The topic it was read from (shared by the records of a fetch, not copied).
    pub topic: Arc<str>,
    /// The partition it was read from.
    pub partition: u32,
    /// Its offset in the partition.
    pub offset: u64,
    /// Milliseconds since the Unix epoch, as the producer set it.
    pub timestamp_ms: i64,
    /// The key; `None` is null.
    pub key: Option<Bytes>,
    /// The value; `None` is null.
    pub value: Option<Bytes>,
    /// Headers in order; a null header value reads as empty.
    pub headers: Vec<(String, Bytes)>,
}

impl ConsumedRecord {
    /// The value of the last header with this name (a later header overrides an earlier
    /// one, as when a record is forwarded with a header updated), or `None`.
    pub fn header(&self, name: &str) -> Option<&Bytes> {
        self.headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// Like [`ConsumedRecord::header`], as text; `None` if absent or not UTF-8.
    pub fn header_str(&self, name: &str) -> Option<&str> {
        self.header(name).and_then(|v| std::str::from_utf8(v).ok())
    }
}

/// Decodes the concatenated batches of a fetch answer of `topic`/`partition` into owned
/// records at or after `from`, slicing `bytes` instead of copying. The broker answers
/// with whole batches, so the first may start before `from`: its earlier records are
/// skipped here, the one place every consumer decodes.
pub(crate) fn decode(
    bytes: &Bytes,
    topic: &Arc<str>,
    partition: u32,
    from: u64,
    out: &mut Vec<ConsumedRecord>,
) -> Result<(), strata_storage::InvalidBatch> {
    for batch in strata_storage::batch::batches(bytes) {
        let batch = batch?;
        if batch.header().last_offset() < from {
            continue;
        }
        // The records' bytes: the batch's own, or a compressed batch's decompressed
        // (bounded) into a buffer its records then share.
        let records = match batch.compression() {
            Compression::None => bytes.slice_ref(&batch.as_bytes()[BATCH_HEADER_LEN..]),
            _ => {
                let mut decompressed = Vec::new();
                batch.decompress(&mut decompressed)?;
                Bytes::from(decompressed)
            }
        };
        let slice = |part: &[u8]| records.slice_ref(part);
        for record in batch.records_in(&records) {
            let record = record?;
            if record.offset < from {
                continue;
            }
            out.push(ConsumedRecord {
                topic: Arc::clone(topic),
                partition,
                offset: record.offset,
                timestamp_ms: record.timestamp,
                key: record.key.map(slice),
                value: record.value.map(slice),
                headers: record
                    .headers()
                    .map(|(name, value)| (name.to_string(), value.map_or_else(Bytes::new, slice)))
                    .collect(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_storage::batch::BatchBuilder;

    #[test]
    fn decode_skips_records_before_the_start_and_keeps_fields() {
        for codec in Compression::ALL {
            decodes_with(codec);
        }
    }

    fn decodes_with(codec: Compression) {
        let mut builder = BatchBuilder::new();
        builder.push(10, Some(b"k0"), Some(b"v0"), &[]);
        builder.push(11, None, None, &[("h", b"x")]);
        builder.push(12, Some(b""), Some(b"v2"), &[]);
        let mut batch = builder.finish_compressed(codec);
        strata_storage::batch::set_base_offset(&mut batch, 100);
        let bytes = Bytes::from(batch);
        let topic: Arc<str> = Arc::from("t");
        let mut out = Vec::new();
        decode(&bytes, &topic, 3, 101, &mut out).expect("a valid batch");
        assert_eq!(
            out,
            vec![
                ConsumedRecord {
                    topic: topic.clone(),
                    partition: 3,
                    offset: 101,
                    timestamp_ms: 11,
                    key: None,
                    value: None,
                    headers: vec![("h".into(), Bytes::from_static(b"x"))],
                },
                ConsumedRecord {
                    topic: topic.clone(),
                    partition: 3,
                    offset: 102,
                    timestamp_ms: 12,
                    key: Some(Bytes::new()),
                    value: Some(Bytes::from_static(b"v2")),
                    headers: vec![],
                },
            ]
        );
    }

    #[test]
    fn header_lookup_takes_the_last_of_a_name() {
        let record = ConsumedRecord {
            topic: Arc::from("t"),
            partition: 0,
            offset: 0,
            timestamp_ms: 0,
            key: None,
            value: None,
            headers: vec![
                ("event-type".into(), Bytes::from_static(b"v1")),
                ("bin".into(), Bytes::from_static(&[0xff])),
                ("event-type".into(), Bytes::from_static(b"v2")),
            ],
        };
        assert_eq!(record.header_str("event-type"), Some("v2"));
        assert_eq!(record.header("bin").map(|v| &v[..]), Some(&[0xff][..]));
        assert_eq!(record.header_str("bin"), None);
        assert_eq!(record.header("missing"), None);
    }

    #[test]
    fn encoded_len_max_is_an_upper_bound() {
        let record = Record::new(vec![7u8; 300])
            .key("key")
            .header("name", "value");
        let mut builder = BatchBuilder::new();
        let before = builder.encoded_len();
        builder.push(
            i64::MAX,
            record.key.as_deref(),
            record.value.as_deref(),
            &[("name", b"value")],
        );
        assert!(builder.encoded_len() - before <= record.encoded_len_max());
    }
}
