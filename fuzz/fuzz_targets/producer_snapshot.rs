//! The producer state snapshot decoder, through the one way a broker reads it:
//! `ProducerStates::recover` on a log that holds idempotent batches. A snapshot is
//! either used or rejected with a reason; it must never panic, and a state it loads must
//! answer sequence checks for the log's own batches.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use strata_storage::batch::{batches, BatchBuilder};
use strata_storage::producer::{ProducerStates, SNAPSHOT_FILE};
use strata_storage::{Durability, FileCache, Log, LogConfig};

/// A log with batches of three producers, opened once for every run.
fn log() -> &'static (tempfile::TempDir, Log) {
    static LOG: OnceLock<(tempfile::TempDir, Log)> = OnceLock::new();
    LOG.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let config = LogConfig {
            durability: Durability::None,
            ..LogConfig::default()
        };
        let mut log = Log::open(dir.path(), config, &FileCache::new(4)).expect("open");
        for round in 0..4 {
            for producer in 0..3i64 {
                let mut batch = BatchBuilder::new().producer(producer, 0, round * 2);
                batch.push(1_000 + i64::from(round), Some(b"k"), Some(b"v"), &[]);
                batch.push(1_001 + i64::from(round), None, Some(b"w"), &[]);
                log.append(&batch.finish()).expect("append");
            }
        }
        log.commit().expect("commit");
        (dir, log)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let (dir, log) = log();
    // Most runs get the magic, version and a correct checksum, so the decoder's later
    // checks are reached; the rest get the bytes as they are.
    let mut snapshot = Vec::with_capacity(body.len() + 12);
    if mode & 1 != 0 {
        snapshot.extend_from_slice(b"STPS\x01\0\0\0");
    }
    snapshot.extend_from_slice(body);
    if mode & 2 != 0 {
        let crc = crc32fast::hash(&snapshot);
        snapshot.extend_from_slice(&crc.to_be_bytes());
    }
    std::fs::write(dir.path().join(SNAPSHOT_FILE), &snapshot).expect("write");
    let reader = log.reader();
    let (states, _recovery) = ProducerStates::recover(reader, 0);
    let read = reader.read(0, 1 << 20).expect("read");
    for batch in batches(&read.batches) {
        let batch = batch.expect("the log's own batches parse");
        let _ = states.check(batch.header());
    }
});
