//! The one error type of `strata-storage`.
//!
//! Operating errors (I/O failures, corrupt bytes on disk, bad input from a client) are
//! returned as [`Error`]; broken invariants inside the crate are asserted instead.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the storage engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation on a file of the log failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory the operation was on.
        path: PathBuf,
        /// The operating system's error.
        source: io::Error,
    },
    /// A record batch handed to the log (or decoded by a client) is malformed.
    /// Nothing was written.
    #[error("invalid record batch: {0}")]
    InvalidBatch(#[from] InvalidBatch),
    /// A record batch is larger than the log accepts. Nothing was written.
    #[error("record batch of {size} bytes exceeds the maximum of {max} bytes")]
    BatchTooLarge {
        /// Size of the rejected batch in bytes.
        size: usize,
        /// The configured maximum (`batch_bytes_max`).
        max: usize,
    },
    /// A read asked for an offset outside `[earliest, latest]`.
    #[error("offset {requested} is out of range: the log holds offsets {earliest} to {latest} (exclusive)")]
    OffsetOutOfRange {
        /// The offset that was asked for.
        requested: u64,
        /// The first offset still in the log.
        earliest: u64,
        /// The next offset to be written (the high watermark).
        latest: u64,
    },
    /// Bytes on disk that were written whole no longer check out (bit rot, outside
    /// modification). Recovery never reports this: it truncates a torn tail instead.
    #[error("corrupt data in {} at byte {position}: {reason}", path.display())]
    Corrupted {
        /// The segment or index file.
        path: PathBuf,
        /// Byte position of the bad data in that file.
        position: u64,
        /// What was wrong.
        reason: String,
    },
    /// An earlier write or fsync failed, so what is on disk is unknown. The log refuses
    /// further writes; reopening it runs recovery and brings it back.
    #[error("the log at {} failed an earlier write or fsync and refuses writes until it is reopened (restart the broker to run recovery)", path.display())]
    Poisoned {
        /// The partition directory.
        path: PathBuf,
    },
    /// Rolling to a new segment failed before anything was written to the new segment:
    /// its files could not be created (too many open files, no memory, no space) or the
    /// old segment's indexes could not be flushed. The active segment is unchanged and
    /// everything it published stays readable; the batch that needed the roll was not
    /// written, and the next write tries the roll again. The log does not refuse writes.
    #[error("cannot start a new segment at offset {base_offset} in {}: {source}; the batch was not written, the log still takes writes and the next write retries the roll", path.display())]
    RollFailed {
        /// The file or directory the failing operation was on.
        path: PathBuf,
        /// The base offset the new segment would have had.
        base_offset: u64,
        /// The operating system's error.
        source: io::Error,
    },
    /// A configuration value is out of its valid range.
    #[error("invalid log configuration: {0}")]
    InvalidConfig(String),
}

/// Why a record batch was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidBatch {
    /// Fewer bytes than the header or the declared length needs.
    #[error("truncated: need {needed} bytes, have {available}")]
    Truncated {
        /// Bytes the batch needs.
        needed: usize,
        /// Bytes that were there.
        available: usize,
    },
    /// The batch length field disagrees with the bytes given.
    #[error("batch length field says {declared} bytes but {actual} were given")]
    LengthMismatch {
        /// Total size the length field declares.
        declared: usize,
        /// Total size of the input.
        actual: usize,
    },
    /// The batch length field is smaller than a batch header.
    #[error("batch length {0} is smaller than a batch header")]
    LengthTooSmall(i32),
    /// The base offset field is negative.
    #[error("negative base offset {0}")]
    NegativeBaseOffset(i64),
    /// Only magic 2 (Kafka RecordBatch v2) is supported.
    #[error("unsupported magic byte {0}: only record batch v2 (magic 2) is supported")]
    UnsupportedMagic(i8),
    /// The CRC-32C over attributes..end does not match the stored one.
    #[error("checksum mismatch: batch says {stored:#010x}, content hashes to {computed:#010x}")]
    ChecksumMismatch {
        /// The CRC stored in the batch.
        stored: u32,
        /// The CRC of the bytes.
        computed: u32,
    },
    /// A compression id no codec uses.
    #[error("unknown compression codec id {0}: Kafka's are 0 (none) to 4 (zstd)")]
    UnknownCompression(u8),
    /// The compressed records are not valid for their codec.
    #[error("{codec} payload does not decompress: {reason}")]
    Decompression {
        /// The codec's name.
        codec: &'static str,
        /// What the decoder reported.
        reason: String,
    },
    /// The compressed records decompress to more than the bound
    /// ([`crate::compression::decompressed_bytes_max`]): a decompression bomb, or a
    /// batch far more compressible than real data.
    #[error(
        "{codec} records decompress to more than {limit} bytes, the decompression limit \
         for a batch of this size ({ratio} times its size, at least {floor} and at most \
         {cap} bytes)",
        ratio = crate::compression::DECOMPRESSION_RATIO_MAX,
        floor = crate::compression::DECOMPRESSED_BYTES_FLOOR,
        cap = crate::compression::DECOMPRESSED_BYTES_CAP
    )]
    DecompressedTooLarge {
        /// The codec's name.
        codec: &'static str,
        /// The bound that was passed.
        limit: usize,
    },
    /// The records of a compressed batch were asked for without decompressing them
    /// (a caller bug: `Batch::records_with` reads every batch).
    #[error("the batch is {0}-compressed: its records are read with Batch::records_with")]
    Compressed(&'static str),
    /// Transactional and control batches are not supported.
    #[error("transactional and control batches are not supported")]
    Transactional,
    /// A batch must hold at least one record.
    #[error("batch holds no records")]
    Empty,
    /// The record count field disagrees with the records present.
    #[error("batch declares {declared} records but holds {found}")]
    RecordCountMismatch {
        /// The record count field.
        declared: i32,
        /// Records actually decoded.
        found: i32,
    },
    /// Offsets inside the batch must run 0, 1, 2, ... with last offset delta = count - 1.
    #[error("record offsets are not dense: {0}")]
    OffsetDeltas(String),
    /// The max timestamp field disagrees with the records' timestamps.
    #[error("max timestamp field {declared} but the largest record timestamp is {actual}")]
    MaxTimestampMismatch {
        /// The field.
        declared: i64,
        /// The largest record timestamp.
        actual: i64,
    },
    /// A record inside the batch is malformed.
    #[error("record {index} is malformed: {reason}")]
    MalformedRecord {
        /// Position of the record in the batch, from 0.
        index: i32,
        /// What was wrong.
        reason: &'static str,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Builds a closure that wraps an `io::Error` with the path it happened on; the path is
/// copied only when there is an error.
pub(crate) fn io_at(path: &std::path::Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}
