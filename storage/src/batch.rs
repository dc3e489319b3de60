//! The record batch codec: Kafka's RecordBatch v2 (magic 2), field for field.
//!
//! A batch is the unit of write, storage and fetch. Its header is 61 bytes, big-endian:
//!
//! | field                | type  | byte offset |
//! |----------------------|-------|-------------|
//! | base offset          | i64   | 0           |
//! | batch length         | i32   | 8           |
//! | partition leader epoch | i32 | 12          |
//! | magic (= 2)          | i8    | 16          |
//! | CRC-32C              | u32   | 17          |
//! | attributes           | i16   | 21          |
//! | last offset delta    | i32   | 23          |
//! | base timestamp       | i64   | 27          |
//! | max timestamp        | i64   | 35          |
//! | producer id          | i64   | 43          |
//! | producer epoch       | i16   | 51          |
//! | base sequence        | i32   | 53          |
//! | record count         | i32   | 57          |
//!
//! followed by `record count` records, each a zigzag-varint length and then
//! `attributes: i8, timestamp delta: varlong, offset delta: varint, key, value, headers`.
//! The batch length counts every byte after the length field; the CRC covers everything
//! from the attributes to the end. The base offset and leader epoch sit outside the CRC so
//! a broker can assign offsets by rewriting one field, without re-encoding.
//!
//! When the attributes name a compression codec, everything after the header (the
//! records) is one compressed block ([`crate::compression`]); the header stays in the
//! clear, so offsets, counts, timestamps, producer state and recovery never need to
//! decompress.
//!
//! [`BatchBuilder`] encodes into one buffer (no allocation per record); [`Batch`] is a
//! validated zero-copy view and [`Record`] borrows its key, value and headers from it,
//! or from the buffer a compressed batch was decompressed into.

use crate::compression::{
    decompressed_bytes_max, Compression, DecompressionBudget, DECOMPRESSION_BUDGET,
};
use crate::error::InvalidBatch;

const BASE_OFFSET: usize = 0;
const BATCH_LENGTH: usize = BASE_OFFSET + 8;
const LEADER_EPOCH: usize = BATCH_LENGTH + 4;
const MAGIC: usize = LEADER_EPOCH + 4;
const CRC: usize = MAGIC + 1;
const ATTRIBUTES: usize = CRC + 4;
const LAST_OFFSET_DELTA: usize = ATTRIBUTES + 2;
const BASE_TIMESTAMP: usize = LAST_OFFSET_DELTA + 4;
const MAX_TIMESTAMP: usize = BASE_TIMESTAMP + 8;
const PRODUCER_ID: usize = MAX_TIMESTAMP + 8;
const PRODUCER_EPOCH: usize = PRODUCER_ID + 8;
const BASE_SEQUENCE: usize = PRODUCER_EPOCH + 2;
const RECORD_COUNT: usize = BASE_SEQUENCE + 4;

/// Size of the batch header; records start here.
pub const BATCH_HEADER_LEN: usize = RECORD_COUNT + 4;
/// Bytes in front of what the batch length field counts (base offset + the length).
pub const BATCH_LENGTH_PREFIX: usize = LEADER_EPOCH;
/// The only supported magic byte.
pub const MAGIC_V2: i8 = 2;

const COMPRESSION_MASK: i16 = 0x07;
const TIMESTAMP_TYPE_BIT: i16 = 0x08;
const TRANSACTIONAL_BIT: i16 = 0x10;
const CONTROL_BIT: i16 = 0x20;

/// "No producer": the value of producer id, epoch and base sequence in batches from
/// producers that are not idempotent.
pub const NO_PRODUCER_ID: i64 = -1;

/// The fixed fields of a batch header, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Offset of the first record.
    pub base_offset: u64,
    /// Total size of the batch in bytes, header included.
    pub size: usize,
    /// Partition leader epoch (not covered by the CRC).
    pub leader_epoch: i32,
    /// Attribute bits: compression codec, timestamp type, transactional, control.
    pub attributes: i16,
    /// Offset of the last record minus the base offset.
    pub last_offset_delta: i32,
    /// Timestamp of the first record, milliseconds since the Unix epoch.
    pub base_timestamp: i64,
    /// Largest record timestamp in the batch.
    pub max_timestamp: i64,
    /// Idempotent producer id, or -1.
    pub producer_id: i64,
    /// Idempotent producer epoch, or -1.
    pub producer_epoch: i16,
    /// Sequence number of the first record, or -1.
    pub base_sequence: i32,
    /// Number of records.
    pub record_count: i32,
    /// The stored CRC-32C.
    pub crc: u32,
}

impl BatchHeader {
    /// Decodes the header at the front of `bytes`, checking the magic byte and that the
    /// length field is plausible. Only the first [`BATCH_HEADER_LEN`] bytes are read;
    /// the rest of the batch need not be present, and the CRC is not checked.
    pub fn parse(bytes: &[u8]) -> Result<BatchHeader, InvalidBatch> {
        if bytes.len() < BATCH_HEADER_LEN {
            return Err(InvalidBatch::Truncated {
                needed: BATCH_HEADER_LEN,
                available: bytes.len(),
            });
        }
        let magic = bytes[MAGIC] as i8;
        if magic != MAGIC_V2 {
            return Err(InvalidBatch::UnsupportedMagic(magic));
        }
        let length = read_i32(bytes, BATCH_LENGTH);
        if length < (BATCH_HEADER_LEN - BATCH_LENGTH_PREFIX) as i32 {
            return Err(InvalidBatch::LengthTooSmall(length));
        }
        let base_offset = read_i64(bytes, BASE_OFFSET);
        if base_offset < 0 {
            return Err(InvalidBatch::NegativeBaseOffset(base_offset));
        }
        Ok(BatchHeader {
            base_offset: base_offset as u64,
            size: BATCH_LENGTH_PREFIX + length as usize,
            leader_epoch: read_i32(bytes, LEADER_EPOCH),
            crc: read_u32(bytes, CRC),
            attributes: read_i16(bytes, ATTRIBUTES),
            last_offset_delta: read_i32(bytes, LAST_OFFSET_DELTA),
            base_timestamp: read_i64(bytes, BASE_TIMESTAMP),
            max_timestamp: read_i64(bytes, MAX_TIMESTAMP),
            producer_id: read_i64(bytes, PRODUCER_ID),
            producer_epoch: read_i16(bytes, PRODUCER_EPOCH),
            base_sequence: read_i32(bytes, BASE_SEQUENCE),
            record_count: read_i32(bytes, RECORD_COUNT),
        })
    }

    /// Offset of the last record (`base_offset + last_offset_delta`).
    pub fn last_offset(&self) -> u64 {
        self.base_offset + self.last_offset_delta.max(0) as u64
    }

    /// The offset right after this batch.
    pub fn next_offset(&self) -> u64 {
        self.last_offset() + 1
    }

    /// True when record timestamps were set by the broker (LogAppendTime).
    pub fn is_log_append_time(&self) -> bool {
        self.attributes & TIMESTAMP_TYPE_BIT != 0
    }

    fn check_attributes(&self) -> Result<Compression, InvalidBatch> {
        let id = (self.attributes & COMPRESSION_MASK) as u8;
        let compression = Compression::from_id(id).ok_or(InvalidBatch::UnknownCompression(id))?;
        if self.attributes & (TRANSACTIONAL_BIT | CONTROL_BIT) != 0 {
            return Err(InvalidBatch::Transactional);
        }
        Ok(compression)
    }
}

/// Overwrites the base offset of the encoded batch at the front of `bytes`. The base
/// offset is outside the CRC, so the batch stays valid.
pub fn set_base_offset(bytes: &mut [u8], base_offset: u64) {
    bytes[BASE_OFFSET..BASE_OFFSET + 8].copy_from_slice(&base_offset.to_be_bytes());
}

/// A whole record batch whose framing, magic, CRC and attributes have been checked.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    header: BatchHeader,
    compression: Compression,
    bytes: &'a [u8],
}

impl<'a> Batch<'a> {
    /// Checks that `bytes` is exactly one valid batch.
    pub fn new(bytes: &'a [u8]) -> Result<Batch<'a>, InvalidBatch> {
        let (batch, rest) = Batch::split_first(bytes)?;
        if !rest.is_empty() {
            return Err(InvalidBatch::LengthMismatch {
                declared: batch.header.size,
                actual: bytes.len(),
            });
        }
        Ok(batch)
    }

    /// Checks the batch at the front of `bytes` and returns it with the bytes after it.
    pub fn split_first(bytes: &'a [u8]) -> Result<(Batch<'a>, &'a [u8]), InvalidBatch> {
        let header = BatchHeader::parse(bytes)?;
        if bytes.len() < header.size {
            return Err(InvalidBatch::Truncated {
                needed: header.size,
                available: bytes.len(),
            });
        }
        let (this, rest) = bytes.split_at(header.size);
        let computed = crc32c::crc32c(&this[ATTRIBUTES..]);
        if computed != header.crc {
            return Err(InvalidBatch::ChecksumMismatch {
                stored: header.crc,
                computed,
            });
        }
        let compression = header.check_attributes()?;
        Ok((
            Batch {
                header,
                compression,
                bytes: this,
            },
            rest,
        ))
    }

    /// The decoded header.
    pub fn header(&self) -> &BatchHeader {
        &self.header
    }

    /// The encoded batch.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.bytes
    }

    /// The codec of the records.
    pub fn compression(&self) -> Compression {
        self.compression
    }

    /// Iterates over the records of an uncompressed batch, decoding each as it goes,
    /// without copying. For a compressed batch it yields one
    /// [`InvalidBatch::Compressed`] error: read those with [`Batch::records_with`].
    pub fn records(&self) -> Records<'a> {
        if self.compression != Compression::None {
            return Records {
                header: self.header,
                rest: &[],
                index: 0,
                compressed: Some(self.compression.name()),
            };
        }
        self.records_in(&self.bytes[BATCH_HEADER_LEN..])
    }

    /// Iterates over the records of any batch: those of an uncompressed batch in place,
    /// those of a compressed one after decompressing them into `scratch` (cleared
    /// first; reuse it across batches to allocate once). Decompression is bounded by
    /// [`decompressed_bytes_max`] of the batch's size.
    pub fn records_with<'b>(&self, scratch: &'b mut Vec<u8>) -> Result<Records<'b>, InvalidBatch>
    where
        'a: 'b,
    {
        if self.compression == Compression::None {
            return Ok(self.records());
        }
        scratch.clear();
        self.decompress(scratch)?;
        Ok(self.records_in(scratch))
    }

    /// Appends the records section, decompressed, to `out`: the bytes
    /// [`Batch::records_in`] decodes (for an uncompressed batch, a copy of them).
    pub fn decompress(&self, out: &mut Vec<u8>) -> Result<(), InvalidBatch> {
        self.compression.decompress(
            &self.bytes[BATCH_HEADER_LEN..],
            decompressed_bytes_max(self.bytes.len()),
            out,
        )
    }

    /// The first record of the batch (`None` if it has none), decompressing only as much
    /// of a compressed batch as that record needs into `scratch` (cleared first; raw
    /// snappy excepted, see [`Compression::decompress_prefix`]): routing a produce by
    /// its first key should not cost the whole batch.
    pub fn first_record<'b>(
        &self,
        scratch: &'b mut Vec<u8>,
    ) -> Result<Option<Record<'b>>, InvalidBatch>
    where
        'a: 'b,
    {
        if self.compression == Compression::None {
            return self.records().next().transpose();
        }
        let input = &self.bytes[BATCH_HEADER_LEN..];
        let limit = decompressed_bytes_max(self.bytes.len());
        scratch.clear();
        // The record's length comes first, a varint of at most 10 bytes...
        self.compression
            .decompress_prefix(input, VARLONG_LEN_MAX, limit, scratch)?;
        let mut reader = Reader::new(scratch);
        let Ok(length) = reader.varint() else {
            // Too short or malformed: the iterator says which.
            return self.records_in(scratch).next().transpose();
        };
        let record_len = (scratch.len() - reader.rest().len())
            .saturating_add(usize::try_from(length).unwrap_or(0));
        // ...then the record; a longer one than the bound allows is refused as the whole
        // batch would be.
        if record_len > limit {
            return Err(InvalidBatch::DecompressedTooLarge {
                codec: self.compression.name(),
                limit,
            });
        }
        scratch.clear();
        self.compression
            .decompress_prefix(input, record_len, limit, scratch)?;
        self.records_in(scratch).next().transpose()
    }

    /// Iterates over the records encoded in `records`, this batch's records section as
    /// [`Batch::decompress`] gave it (offsets and timestamps come from the header).
    pub fn records_in<'b>(&self, records: &'b [u8]) -> Records<'b> {
        Records {
            header: self.header,
            rest: records,
            index: 0,
            compressed: None,
        }
    }

    /// Full structural check a log runs before accepting a batch: at least one record,
    /// every record well formed, offset deltas dense (0, 1, 2, ...), record count, last
    /// offset delta and max timestamp consistent with the records, no trailing bytes.
    /// A compressed batch is decompressed (bounded) into a buffer that lives for the
    /// call, holding its bound of the process-wide [`DECOMPRESSION_BUDGET`] meanwhile
    /// (waiting for it: callers are writer threads); an uncompressed one is checked in
    /// place, with no allocation and no lock.
    pub fn validate_records(&self) -> Result<(), InvalidBatch> {
        self.validate_records_within(&DECOMPRESSION_BUDGET)
    }

    fn validate_records_within(&self, budget: &DecompressionBudget) -> Result<(), InvalidBatch> {
        let declared = self.header.record_count;
        if declared <= 0 {
            return Err(InvalidBatch::Empty);
        }
        if self.header.last_offset_delta != declared - 1 {
            return Err(InvalidBatch::OffsetDeltas(format!(
                "last offset delta is {} for {declared} records",
                self.header.last_offset_delta
            )));
        }
        let _permit = (self.compression != Compression::None)
            .then(|| budget.acquire(decompressed_bytes_max(self.bytes.len())));
        let mut scratch = Vec::new();
        let mut records = self.records_with(&mut scratch)?;
        let mut found = 0i32;
        let mut max_timestamp = i64::MIN;
        for record in records.by_ref() {
            let record = record?;
            let delta = record.offset - self.header.base_offset;
            if delta != found as u64 {
                return Err(InvalidBatch::OffsetDeltas(format!(
                    "record {found} has offset delta {delta}"
                )));
            }
            max_timestamp = max_timestamp.max(record.timestamp);
            found += 1;
        }
        if found != declared || !records.rest.is_empty() {
            return Err(InvalidBatch::RecordCountMismatch {
                declared,
                found: if records.rest.is_empty() {
                    found
                } else {
                    found + 1
                },
            });
        }
        if !self.header.is_log_append_time() && max_timestamp != self.header.max_timestamp {
            return Err(InvalidBatch::MaxTimestampMismatch {
                declared: self.header.max_timestamp,
                actual: max_timestamp,
            });
        }
        Ok(())
    }
}

/// Iterates over the batches of a buffer of concatenated batches (a fetch response, a
/// segment). Each item is checked like [`Batch::split_first`]; after an error the
/// iterator ends.
pub fn batches(bytes: &[u8]) -> Batches<'_> {
    Batches { rest: bytes }
}

/// Iterator returned by [`batches`].
#[derive(Debug, Clone)]
pub struct Batches<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Batches<'a> {
    type Item = Result<Batch<'a>, InvalidBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        match Batch::split_first(self.rest) {
            Ok((batch, rest)) => {
                self.rest = rest;
                Some(Ok(batch))
            }
            Err(e) => {
                self.rest = &[];
                Some(Err(e))
            }
        }
    }
}

/// One decoded record, borrowing from its batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Absolute offset (base offset + offset delta).
    pub offset: u64,
    /// Milliseconds since the Unix epoch.
    pub timestamp: i64,
    /// The key; `None` is a null key, distinct from an empty one.
    pub key: Option<&'a [u8]>,
    /// The value; `None` is a null value (a tombstone).
    pub value: Option<&'a [u8]>,
    headers_bytes: &'a [u8],
    header_count: u32,
}

impl<'a> Record<'a> {
    /// The record's headers, in order. Names are UTF-8; a value may be null.
    pub fn headers(&self) -> Headers<'a> {
        Headers {
            rest: self.headers_bytes,
            remaining: self.header_count,
        }
    }

    /// Number of headers.
    pub fn header_count(&self) -> usize {
        self.header_count as usize
    }
}

/// Iterator over a record's headers: `(name, value)`.
#[derive(Debug, Clone)]
pub struct Headers<'a> {
    rest: &'a [u8],
    remaining: u32,
}

impl<'a> Iterator for Headers<'a> {
    type Item = (&'a str, Option<&'a [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        // The bytes were validated when the record was decoded, so this cannot fail;
        // ending the iteration is the safe answer if it somehow did.
        let mut reader = Reader::new(self.rest);
        let header = read_header(&mut reader).ok()?;
        self.rest = reader.rest();
        Some(header)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining as usize, Some(self.remaining as usize))
    }
}

/// Iterator over the records of a batch; see [`Batch::records`].
#[derive(Debug, Clone)]
pub struct Records<'a> {
    header: BatchHeader,
    rest: &'a [u8],
    index: i32,
    /// The codec, when this iterates over a compressed batch that was not decompressed.
    compressed: Option<&'static str>,
}

impl<'a> Iterator for Records<'a> {
    type Item = Result<Record<'a>, InvalidBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(codec) = self.compressed.take() {
            self.index = self.header.record_count;
            return Some(Err(InvalidBatch::Compressed(codec)));
        }
        if self.index >= self.header.record_count || self.rest.is_empty() {
            return None;
        }
        let index = self.index;
        self.index += 1;
        match self.decode_next() {
            Ok(record) => Some(Ok(record)),
            Err(reason) => {
                self.rest = &[];
                Some(Err(InvalidBatch::MalformedRecord { index, reason }))
            }
        }
    }
}

impl<'a> Records<'a> {
    fn decode_next(&mut self) -> Result<Record<'a>, &'static str> {
        let mut outer = Reader::new(self.rest);
        let length = outer.varint()?;
        if length < 0 {
            return Err("negative record length");
        }
        let body = outer.take(length as usize)?;
        self.rest = outer.rest();

        let mut r = Reader::new(body);
        let _attributes = r.take(1)?;
        let timestamp_delta = r.varlong()?;
        let offset_delta = r.varint()?;
        if offset_delta < 0 {
            return Err("negative offset delta");
        }
        let key = r.nullable_bytes()?;
        let value = r.nullable_bytes()?;
        let header_count = r.varint()?;
        if header_count < 0 {
            return Err("negative header count");
        }
        let headers_bytes = r.rest();
        for _ in 0..header_count {
            read_header(&mut r)?;
        }
        if !r.rest().is_empty() {
            return Err("bytes left over after the headers");
        }
        Ok(Record {
            offset: self.header.base_offset + offset_delta as u64,
            // With LogAppendTime every record carries the time the broker stamped on the
            // batch, as Kafka defines it.
            timestamp: if self.header.is_log_append_time() {
                self.header.max_timestamp
            } else {
                self.header.base_timestamp.wrapping_add(timestamp_delta)
            },
            key,
            value,
            headers_bytes,
            header_count: header_count as u32,
        })
    }
}

fn read_header<'a>(r: &mut Reader<'a>) -> Result<(&'a str, Option<&'a [u8]>), &'static str> {
    let name = r.nullable_bytes()?.ok_or("null header name")?;
    let name = std::str::from_utf8(name).map_err(|_| "header name is not UTF-8")?;
    let value = r.nullable_bytes()?;
    Ok((name, value))
}

/// Builds one record batch in a single buffer. Records are appended in place, so encoding
/// N records costs no allocation beyond the buffer's own growth; reuse a buffer with
/// [`BatchBuilder::with_buffer`] to avoid even that.
#[derive(Debug)]
pub struct BatchBuilder {
    buf: Vec<u8>,
    count: i32,
    base_timestamp: i64,
    max_timestamp: i64,
    producer_id: i64,
    producer_epoch: i16,
    base_sequence: i32,
}

impl Default for BatchBuilder {
    fn default() -> Self {
        BatchBuilder::new()
    }
}

impl BatchBuilder {
    /// An empty builder with no producer identity.
    pub fn new() -> BatchBuilder {
        BatchBuilder::with_buffer(Vec::new())
    }

    /// An empty builder that encodes into `buf` (cleared first), keeping its capacity.
    pub fn with_buffer(mut buf: Vec<u8>) -> BatchBuilder {
        buf.clear();
        buf.resize(BATCH_HEADER_LEN, 0);
        BatchBuilder {
            buf,
            count: 0,
            base_timestamp: -1,
            max_timestamp: -1,
            producer_id: NO_PRODUCER_ID,
            producer_epoch: -1,
            base_sequence: -1,
        }
    }

    /// Stamps the batch with an idempotent producer's identity and the sequence number
    /// of its first record.
    pub fn producer(mut self, producer_id: i64, producer_epoch: i16, base_sequence: i32) -> Self {
        self.producer_id = producer_id;
        self.producer_epoch = producer_epoch;
        self.base_sequence = base_sequence;
        self
    }

    /// Appends a record. Header values are never null when encoded by this builder.
    ///
    /// # Panics
    /// If the batch already holds `i32::MAX` records (the format's limit).
    pub fn push(
        &mut self,
        timestamp: i64,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &[(&str, &[u8])],
    ) {
        assert!(
            self.count < i32::MAX,
            "a record batch holds at most i32::MAX records"
        );
        if self.count == 0 {
            self.base_timestamp = timestamp;
            self.max_timestamp = timestamp;
        }
        self.max_timestamp = self.max_timestamp.max(timestamp);
        let timestamp_delta = timestamp.wrapping_sub(self.base_timestamp);
        let offset_delta = self.count;

        let body_len = 1
            + varlong_len(timestamp_delta)
            + varlong_len(offset_delta.into())
            + nullable_len(key)
            + nullable_len(value)
            + varlong_len(headers.len() as i64)
            + headers
                .iter()
                .map(|(name, value)| {
                    nullable_len(Some(name.as_bytes())) + nullable_len(Some(value))
                })
                .sum::<usize>();
        self.buf.reserve(varlong_len(body_len as i64) + body_len);
        put_varlong(&mut self.buf, body_len as i64);
        self.buf.push(0); // record attributes: unused in v2
        put_varlong(&mut self.buf, timestamp_delta);
        put_varlong(&mut self.buf, offset_delta.into());
        put_nullable(&mut self.buf, key);
        put_nullable(&mut self.buf, value);
        put_varlong(&mut self.buf, headers.len() as i64);
        for (name, value) in headers {
            put_nullable(&mut self.buf, Some(name.as_bytes()));
            put_nullable(&mut self.buf, Some(value));
        }
        self.count += 1;
    }

    /// Number of records pushed so far.
    pub fn len(&self) -> usize {
        self.count as usize
    }

    /// True when no record was pushed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Size the encoded batch has so far, in bytes.
    pub fn encoded_len(&self) -> usize {
        self.buf.len()
    }

    /// Fills in the header and CRC and returns the encoded batch, base offset 0.
    pub fn finish(mut self) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.buf);
        self.write_header(&mut buf, Compression::None);
        buf
    }

    /// Like [`BatchBuilder::finish`], with the records compressed by `compression` (into
    /// a new buffer: the builder's own is dropped).
    pub fn finish_compressed(self, compression: Compression) -> Vec<u8> {
        if compression == Compression::None {
            return self.finish();
        }
        self.compressed(compression)
    }

    fn compressed(&self, compression: Compression) -> Vec<u8> {
        let records = &self.buf[BATCH_HEADER_LEN..];
        let mut out = Vec::with_capacity(BATCH_HEADER_LEN + records.len() / 2);
        out.resize(BATCH_HEADER_LEN, 0);
        compression.compress(records, &mut out);
        self.write_header(&mut out, compression);
        out
    }

    /// The batch with its records compressed, unless that is no smaller than the batch
    /// as it is (incompressible records: compression adds framing), which is then
    /// returned uncompressed. A producer that sizes batches by their plain length sends
    /// this, so compression never makes a batch larger than the limit it was sized for.
    pub fn finish_compressed_if_smaller(self, compression: Compression) -> Vec<u8> {
        if compression == Compression::None {
            return self.finish();
        }
        let compressed = self.compressed(compression);
        if compressed.len() < self.buf.len() {
            compressed
        } else {
            self.finish()
        }
    }

    /// Writes the header of `b`, a batch whose records section is in place after it,
    /// and its CRC.
    fn write_header(&self, b: &mut [u8], compression: Compression) {
        let length = (b.len() - BATCH_LENGTH_PREFIX) as i32;
        b[BASE_OFFSET..BASE_OFFSET + 8].copy_from_slice(&0i64.to_be_bytes());
        b[BATCH_LENGTH..BATCH_LENGTH + 4].copy_from_slice(&length.to_be_bytes());
        b[LEADER_EPOCH..LEADER_EPOCH + 4].copy_from_slice(&(-1i32).to_be_bytes());
        b[MAGIC] = MAGIC_V2 as u8;
        let attributes = i16::from(compression.id());
        b[ATTRIBUTES..ATTRIBUTES + 2].copy_from_slice(&attributes.to_be_bytes());
        let last_offset_delta = (self.count - 1).max(0);
        b[LAST_OFFSET_DELTA..LAST_OFFSET_DELTA + 4]
            .copy_from_slice(&last_offset_delta.to_be_bytes());
        b[BASE_TIMESTAMP..BASE_TIMESTAMP + 8].copy_from_slice(&self.base_timestamp.to_be_bytes());
        b[MAX_TIMESTAMP..MAX_TIMESTAMP + 8].copy_from_slice(&self.max_timestamp.to_be_bytes());
        b[PRODUCER_ID..PRODUCER_ID + 8].copy_from_slice(&self.producer_id.to_be_bytes());
        b[PRODUCER_EPOCH..PRODUCER_EPOCH + 2].copy_from_slice(&self.producer_epoch.to_be_bytes());
        b[BASE_SEQUENCE..BASE_SEQUENCE + 4].copy_from_slice(&self.base_sequence.to_be_bytes());
        b[RECORD_COUNT..RECORD_COUNT + 4].copy_from_slice(&self.count.to_be_bytes());
        let crc = crc32c::crc32c(&b[ATTRIBUTES..]);
        b[CRC..CRC + 4].copy_from_slice(&crc.to_be_bytes());
    }
}

/// The longest a varlong (and so a varint) is encoded.
const VARLONG_LEN_MAX: usize = 10;

fn read_i16(b: &[u8], at: usize) -> i16 {
    i16::from_be_bytes([b[at], b[at + 1]])
}

fn read_i32(b: &[u8], at: usize) -> i32 {
    i32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    read_i32(b, at) as u32
}

fn read_i64(b: &[u8], at: usize) -> i64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    i64::from_be_bytes(x)
}

/// Zigzag-encoded length of `v` as a varint. Kafka's varint (i32) and varlong (i64)
/// encode the same value identically, so one function serves both.
fn varlong_len(v: i64) -> usize {
    let z = zigzag(v);
    let bits = 64 - (z | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn put_varlong(buf: &mut Vec<u8>, v: i64) {
    let mut z = zigzag(v);
    while z >= 0x80 {
        buf.push((z as u8) | 0x80);
        z >>= 7;
    }
    buf.push(z as u8);
}

fn nullable_len(bytes: Option<&[u8]>) -> usize {
    match bytes {
        None => varlong_len(-1),
        Some(b) => varlong_len(b.len() as i64) + b.len(),
    }
}

fn put_nullable(buf: &mut Vec<u8>, bytes: Option<&[u8]>) {
    match bytes {
        None => put_varlong(buf, -1),
        Some(b) => {
            put_varlong(buf, b.len() as i64);
            buf.extend_from_slice(b);
        }
    }
}

/// A cursor over untrusted bytes: every read is bounds-checked and returns an error
/// instead of panicking or allocating.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    fn rest(&self) -> &'a [u8] {
        self.bytes
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], &'static str> {
        if n > self.bytes.len() {
            return Err("length runs past the end of the record");
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn varlong(&mut self) -> Result<i64, &'static str> {
        const _: () = assert!(VARLONG_LEN_MAX == 10);
        let mut z: u64 = 0;
        for i in 0..10 {
            let &byte = self.bytes.get(i).ok_or("varint runs past the end")?;
            z |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                if i == 9 && byte > 1 {
                    return Err("varint overflows 64 bits");
                }
                self.bytes = &self.bytes[i + 1..];
                return Ok((z >> 1) as i64 ^ -((z & 1) as i64));
            }
        }
        Err("varint longer than 10 bytes")
    }

    fn varint(&mut self) -> Result<i32, &'static str> {
        i32::try_from(self.varlong()?).map_err(|_| "varint overflows 32 bits")
    }

    fn nullable_bytes(&mut self) -> Result<Option<&'a [u8]>, &'static str> {
        match self.varint()? {
            -1 => Ok(None),
            n if n < -1 => Err("negative length"),
            n => self.take(n as usize).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn one_record(value: &[u8]) -> Vec<u8> {
        let mut b = BatchBuilder::new();
        b.push(1_000, Some(b"k"), Some(value), &[("trace", b"abc")]);
        b.finish()
    }

    #[test]
    fn header_fields_land_at_kafka_offsets() {
        let mut b = BatchBuilder::new().producer(7, 3, 42);
        b.push(5_000, None, Some(b"x"), &[]);
        b.push(4_000, None, Some(b"y"), &[]);
        let mut bytes = b.finish();
        set_base_offset(&mut bytes, 100);
        assert_eq!(&bytes[0..8], &100i64.to_be_bytes());
        assert_eq!(read_i32(&bytes, 8) as usize, bytes.len() - 12);
        assert_eq!(bytes[16], 2);
        assert_eq!(read_i32(&bytes, 23), 1); // last offset delta
        assert_eq!(read_i64(&bytes, 27), 5_000); // first timestamp
        assert_eq!(read_i64(&bytes, 35), 5_000); // max timestamp
        assert_eq!(read_i64(&bytes, 43), 7);
        assert_eq!(read_i16(&bytes, 51), 3);
        assert_eq!(read_i32(&bytes, 53), 42);
        assert_eq!(read_i32(&bytes, 57), 2);
        assert_eq!(BATCH_HEADER_LEN, 61);
        let batch = Batch::new(&bytes).expect("valid");
        batch.validate_records().expect("valid records");
        let records: Vec<_> = batch.records().map(|r| r.expect("record")).collect();
        assert_eq!(records[1].offset, 101);
        assert_eq!(records[1].timestamp, 4_000);
    }

    #[test]
    fn varint_lengths_match_encoding() {
        for v in [
            0i64,
            1,
            -1,
            63,
            64,
            -64,
            -65,
            8191,
            8192,
            i32::MAX as i64,
            i64::MIN,
            i64::MAX,
        ] {
            let mut buf = Vec::new();
            put_varlong(&mut buf, v);
            assert_eq!(buf.len(), varlong_len(v), "value {v}");
            assert_eq!(Reader::new(&buf).varlong(), Ok(v));
        }
    }

    #[test]
    fn rejects_what_it_should() {
        let good = one_record(b"hello");
        let check = |bytes: &[u8], expected: InvalidBatch| {
            assert_eq!(
                Batch::new(bytes).and_then(|b| b.validate_records()),
                Err(expected)
            );
        };

        let mut crc = good.clone();
        let last = crc.len() - 1;
        crc[last] ^= 0xff;
        assert!(matches!(
            Batch::new(&crc),
            Err(InvalidBatch::ChecksumMismatch { .. })
        ));

        let mut magic = good.clone();
        magic[MAGIC] = 1;
        check(&magic, InvalidBatch::UnsupportedMagic(1));

        check(
            &good[..good.len() - 1],
            InvalidBatch::Truncated {
                needed: good.len(),
                available: good.len() - 1,
            },
        );
        let mut long = good.clone();
        long.push(0);
        check(
            &long,
            InvalidBatch::LengthMismatch {
                declared: good.len(),
                actual: good.len() + 1,
            },
        );

        let mut codec5 = good.clone();
        codec5[ATTRIBUTES + 1] = 5;
        let crc = crc32c::crc32c(&codec5[ATTRIBUTES..]);
        codec5[CRC..CRC + 4].copy_from_slice(&crc.to_be_bytes());
        check(&codec5, InvalidBatch::UnknownCompression(5));

        // Uncompressed records labelled gzip: the CRC is right, the payload is not gzip.
        let mut mislabelled = good.clone();
        mislabelled[ATTRIBUTES + 1] = 1;
        let crc = crc32c::crc32c(&mislabelled[ATTRIBUTES..]);
        mislabelled[CRC..CRC + 4].copy_from_slice(&crc.to_be_bytes());
        assert!(matches!(
            Batch::new(&mislabelled).and_then(|b| b.validate_records()),
            Err(InvalidBatch::Decompression { codec: "gzip", .. })
        ));

        check(&BatchBuilder::new().finish(), InvalidBatch::Empty);
    }

    #[test]
    fn null_and_empty_keys_differ() {
        let mut b = BatchBuilder::new();
        b.push(1, None, None, &[]);
        b.push(1, Some(b""), Some(b""), &[]);
        let bytes = b.finish();
        let batch = Batch::new(&bytes).expect("valid");
        let r: Vec<_> = batch.records().map(|r| r.expect("record")).collect();
        assert_eq!((r[0].key, r[0].value), (None, None));
        assert_eq!((r[1].key, r[1].value), (Some(&b""[..]), Some(&b""[..])));
    }

    /// A batch whose records section is `records` compressed with `codec`, the header
    /// saying `count` records.
    fn compressed_batch(codec: Compression, records: &[u8], count: i32) -> Vec<u8> {
        let mut b = BatchBuilder::new();
        for i in 0..count {
            b.push(1_000 + i64::from(i), None, Some(b"v"), &[]);
        }
        b.buf.truncate(BATCH_HEADER_LEN);
        b.buf.extend_from_slice(records);
        b.finish_compressed(codec)
    }

    #[test]
    fn compressed_records_are_validated_like_plain_ones() {
        let mut plain = BatchBuilder::new();
        plain.push(1_000, Some(b"k"), Some(b"v"), &[("h", b"x")]);
        plain.push(1_001, None, Some(b"w"), &[]);
        let plain = plain.finish();
        let records = &plain[BATCH_HEADER_LEN..];
        for codec in &Compression::ALL[1..] {
            let good = compressed_batch(*codec, records, 2);
            let batch = Batch::new(&good).expect("valid");
            batch.validate_records().expect("valid records");
            // Reading a compressed batch without decompressing is a caller bug, said so.
            assert_eq!(
                batch.records().collect::<Vec<_>>(),
                vec![Err(InvalidBatch::Compressed(codec.name()))]
            );
            // One record fewer than the header says, one byte of garbage after them.
            let short = compressed_batch(*codec, records, 3);
            assert!(matches!(
                Batch::new(&short).and_then(|b| b.validate_records()),
                Err(InvalidBatch::RecordCountMismatch {
                    declared: 3,
                    found: 2
                })
            ));
            let mut trailing = records.to_vec();
            trailing.push(0);
            let trailing = compressed_batch(*codec, &trailing, 2);
            assert!(Batch::new(&trailing)
                .and_then(|b| b.validate_records())
                .is_err());
            // A corrupt payload with a correct CRC.
            let mut corrupt = good.clone();
            corrupt.truncate(BATCH_HEADER_LEN + (good.len() - BATCH_HEADER_LEN) / 2);
            let length = (corrupt.len() - BATCH_LENGTH_PREFIX) as i32;
            corrupt[BATCH_LENGTH..BATCH_LENGTH + 4].copy_from_slice(&length.to_be_bytes());
            let crc = crc32c::crc32c(&corrupt[ATTRIBUTES..]);
            corrupt[CRC..CRC + 4].copy_from_slice(&crc.to_be_bytes());
            assert!(
                matches!(
                    Batch::new(&corrupt).and_then(|b| b.validate_records()),
                    Err(InvalidBatch::Decompression { .. })
                ),
                "{codec}"
            );
        }
    }

    #[test]
    fn a_compressed_bomb_is_refused() {
        // 8 MiB of zeros after one valid record: a few KiB compressed, past the bound
        // for a batch that size. (Snappy compresses at most about 21:1, so a snappy
        // batch never reaches the bound of 64 times its size.)
        let mut records = one_record(b"v")[BATCH_HEADER_LEN..].to_vec();
        records.resize(8 << 20, 0);
        for codec in [Compression::Gzip, Compression::Lz4, Compression::Zstd] {
            let codec = &codec;
            let bomb = compressed_batch(*codec, &records, 1);
            let batch = Batch::new(&bomb).expect("header and CRC are fine");
            assert_eq!(
                batch.validate_records(),
                Err(InvalidBatch::DecompressedTooLarge {
                    codec: codec.name(),
                    limit: decompressed_bytes_max(bomb.len())
                }),
                "{codec}"
            );
        }
    }

    /// Incompressible records are sent plain: compressed, their batch would be larger
    /// than the plain one the producer sized to the topic's limit.
    #[test]
    fn a_batch_is_compressed_only_when_that_makes_it_smaller() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..4000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect();
        for codec in &Compression::ALL[1..] {
            let build = |value: &[u8]| {
                let mut b = BatchBuilder::new();
                b.push(1, Some(b"k"), Some(value), &[]);
                b
            };
            let plain = build(&noise).finish();
            assert!(
                build(&noise).finish_compressed(*codec).len() >= plain.len(),
                "{codec}"
            );
            let sent = build(&noise).finish_compressed_if_smaller(*codec);
            assert_eq!(sent, plain, "{codec}: sent plain");
            let zeros = vec![0; 4000];
            let sent = build(&zeros).finish_compressed_if_smaller(*codec);
            let batch = Batch::new(&sent).expect("valid");
            assert_eq!(batch.compression(), *codec);
            assert!(sent.len() < build(&zeros).finish().len());
            batch.validate_records().expect("valid records");
        }
    }

    /// The first record of a compressed batch is read without decompressing the rest:
    /// here the rest is a bomb the whole batch is refused for.
    #[test]
    fn the_first_record_costs_only_itself() {
        let mut records = one_record(b"v")[BATCH_HEADER_LEN..].to_vec();
        records.resize(8 << 20, 0);
        for codec in [Compression::Gzip, Compression::Lz4, Compression::Zstd] {
            let bomb = compressed_batch(codec, &records, 1);
            let batch = Batch::new(&bomb).expect("header and CRC are fine");
            assert!(batch.records_with(&mut Vec::new()).is_err(), "{codec}");
            let mut scratch = Vec::new();
            let first = batch
                .first_record(&mut scratch)
                .expect("decodes")
                .expect("one record");
            assert_eq!((first.key, first.value), (Some(&b"k"[..]), Some(&b"v"[..])));
            assert!(
                scratch.capacity() < 1 << 20,
                "{codec}: {}",
                scratch.capacity()
            );
        }
        for codec in Compression::ALL {
            let mut b = BatchBuilder::new();
            b.push(1, Some(b"first"), Some(&[1; 3000]), &[]);
            b.push(2, Some(b"second"), None, &[]);
            let bytes = b.finish_compressed(codec);
            let batch = Batch::new(&bytes).expect("valid");
            let mut scratch = Vec::new();
            let first = batch.first_record(&mut scratch).expect("decodes");
            assert_eq!(first.and_then(|r| r.key), Some(&b"first"[..]), "{codec}");
        }
    }

    #[test]
    fn compressed_validation_waits_for_the_decompression_budget() {
        let plain = one_record(b"v");
        let compressed = compressed_batch(Compression::Zstd, &plain[BATCH_HEADER_LEN..], 1);
        // A budget of one small batch's bound (the 4 MiB floor), one byte of it taken.
        let budget = DecompressionBudget::new(decompressed_bytes_max(compressed.len()));
        let held = budget.acquire(1);
        // An uncompressed batch takes nothing from it.
        Batch::new(&plain)
            .expect("valid")
            .validate_records_within(&budget)
            .expect("valid records");
        std::thread::scope(|s| {
            let validation = s.spawn(|| {
                Batch::new(&compressed)
                    .expect("valid")
                    .validate_records_within(&budget)
            });
            while budget.waiting() == 0 {
                std::thread::yield_now();
            }
            drop(held);
            assert_eq!(validation.join().expect("no panic"), Ok(()));
        });
        assert_eq!(budget.used(), 0, "given back after validating");
    }

    type RecordSpec = (
        i64,
        Option<Vec<u8>>,
        Option<Vec<u8>>,
        Vec<(String, Vec<u8>)>,
    );

    fn record_spec() -> impl Strategy<Value = RecordSpec> {
        (
            any::<i64>(),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..200)),
            proptest::collection::vec(
                ("[a-z]{0,8}", proptest::collection::vec(any::<u8>(), 0..16)),
                0..4,
            ),
        )
    }

    proptest! {
        #[test]
        fn round_trips(
            specs in proptest::collection::vec(record_spec(), 1..30),
            base in 0u64..1 << 62,
            codec in proptest::sample::select(Compression::ALL.to_vec()),
        ) {
            let mut b = BatchBuilder::new();
            for (ts, key, value, headers) in &specs {
                let headers: Vec<(&str, &[u8])> =
                    headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
                b.push(*ts, key.as_deref(), value.as_deref(), &headers);
            }
            let mut bytes = b.finish_compressed(codec);
            set_base_offset(&mut bytes, base);
            let batch = Batch::new(&bytes).expect("valid");
            prop_assert_eq!(batch.compression(), codec);
            batch.validate_records().expect("valid records");
            prop_assert_eq!(batch.header().record_count as usize, specs.len());
            let mut scratch = Vec::new();
            let records = batch.records_with(&mut scratch).expect("decompresses");
            for (i, (record, spec)) in records.zip(&specs).enumerate() {
                let record = record.expect("record");
                prop_assert_eq!(record.offset, base + i as u64);
                prop_assert_eq!(record.timestamp, spec.0);
                prop_assert_eq!(record.key, spec.1.as_deref());
                prop_assert_eq!(record.value, spec.2.as_deref());
                let headers: Vec<(String, Vec<u8>)> = record
                    .headers()
                    .map(|(n, v)| (n.to_string(), v.expect("non-null").to_vec()))
                    .collect();
                prop_assert_eq!(&headers, &spec.3);
            }
        }

        /// Decoding arbitrary bytes returns an error or a batch; it never panics.
        #[test]
        fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            for batch in batches(&bytes).flatten() {
                let _ = batch.validate_records();
                for record in batch.records().flatten() {
                    let _ = record.headers().count();
                }
            }
        }

        /// Any single flipped bit in a batch is rejected (by CRC, framing or magic),
        /// except in the base offset and leader epoch, which the CRC does not cover.
        #[test]
        fn flipped_bits_are_caught(value in proptest::collection::vec(any::<u8>(), 0..100), bit in any::<proptest::sample::Index>()) {
            let mut bytes = one_record(&value);
            let bit = bit.index(bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            let byte = bit / 8;
            let sign_bit = byte == BASE_OFFSET && bit % 8 == 7; // makes the offset negative
            let in_uncovered = (BASE_OFFSET..BATCH_LENGTH).contains(&byte) && !sign_bit
                || (LEADER_EPOCH..MAGIC).contains(&byte);
            let result = Batch::new(&bytes).and_then(|b| b.validate_records());
            prop_assert_eq!(result.is_ok(), in_uncovered);
        }
    }
}
