//! Records as the application writes them ([`Record`]) and reads them
//! ([`ConsumedRecord`]).

use bytes::Bytes;

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

/// A record read from a partition. Key, value and header values share the fetched
/// buffer (no copy per record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedRecord {
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

/// Decodes the concatenated batches of a fetch answer into owned records at or after
/// `from`, slicing `bytes` instead of copying.
pub(crate) fn decode(
    bytes: &Bytes,
    from: u64,
    out: &mut Vec<ConsumedRecord>,
) -> Result<(), strata_storage::InvalidBatch> {
    let slice = |part: &[u8]| bytes.slice_ref(part);
    for batch in strata_storage::batch::batches(bytes) {
        let batch = batch?;
        if batch.header().last_offset() < from {
            continue;
        }
        for record in batch.records() {
            let record = record?;
            if record.offset < from {
                continue;
            }
            out.push(ConsumedRecord {
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
        let mut builder = BatchBuilder::new();
        builder.push(10, Some(b"k0"), Some(b"v0"), &[]);
        builder.push(11, None, None, &[("h", b"x")]);
        builder.push(12, Some(b""), Some(b"v2"), &[]);
        let mut batch = builder.finish();
        strata_storage::batch::set_base_offset(&mut batch, 100);
        let bytes = Bytes::from(batch);
        let mut out = Vec::new();
        decode(&bytes, 101, &mut out).expect("a valid batch");
        assert_eq!(
            out,
            vec![
                ConsumedRecord {
                    offset: 101,
                    timestamp_ms: 11,
                    key: None,
                    value: None,
                    headers: vec![("h".into(), Bytes::from_static(b"x"))],
                },
                ConsumedRecord {
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
