//! `strata-storage`: the partition log under every Strata topic partition.
//!
//! - [`batch`]: the record batch codec (Kafka RecordBatch v2), used by the broker, the
//!   client and tests alike: one codec everywhere.
//! - [`compression`]: Kafka's gzip, snappy, lz4 and zstd for the records of a batch,
//!   with the decompression bound.
//! - [`Log`]: one partition's append-only log of segment files with sparse offset and
//!   time indexes, a durability policy with group commit, crash recovery that scans only
//!   the unflushed tail, and retention by age and size.
//! - [`LogReader`]: lock-free-for-the-writer reads from any thread, bounded by the high
//!   watermark.
//! - [`producer`]: idempotent producers — the per-partition sequence state that makes a
//!   retried batch be stored once, its snapshot, and the producer id file.
//!
//! This crate knows nothing of networking, topics, consumer groups or async runtimes.
//! The on-disk format is documented byte by byte in `docs/storage-format.md`.

pub mod batch;
mod checkpoint;
pub mod compression;
mod config;
mod error;
pub mod fault;
mod index;
mod log;
pub mod producer;
mod segment;

pub use config::{Durability, LogConfig};
pub use error::{Error, InvalidBatch, Result};
pub use log::{
    create_dir_all_durable, now_ms, AppendInfo, Deferred, DeferredFailure, Log, LogReader,
    LogRecovery, ReadResult,
};
pub use producer::SequenceError;
pub use segment::{FileCache, MAPPED_SEGMENTS_MAX_DEFAULT};
