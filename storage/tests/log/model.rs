//! Drives a real [`Log`] and an in-memory model with the same random operations —
//! appends (single and group-committed), reads, lookups by time, clean and unclean
//! reopens, retention — and checks after every step that they agree: same batches at the
//! same offsets, same earliest offset, high watermark and segment boundaries.
//!
//! The model knows the rolling and retention rules, so a disagreement in where segments
//! start or which ones retention deletes is caught too.

use proptest::prelude::*;
use strata_storage::batch::{batches, set_base_offset, Batch, BatchBuilder};
use strata_storage::{Durability, FileCache, Log, LogConfig};

const SEGMENT_BYTES_MAX: u64 = 2048;
const RETENTION_MS: u64 = 1_000;

#[derive(Debug, Clone)]
enum Op {
    /// Append one batch per entry, then commit once (group commit).
    Append(Vec<BatchSpec>),
    Read {
        from: u64,
        max_bytes: usize,
    },
    Lookup {
        timestamp: i64,
    },
    Reopen {
        clean: bool,
    },
    Retention {
        now_ms: i64,
    },
}

#[derive(Debug, Clone)]
struct BatchSpec {
    timestamps: Vec<i64>,
    value_len: usize,
}

impl BatchSpec {
    fn encode(&self, seed: u64) -> Vec<u8> {
        let mut b = BatchBuilder::new();
        for (i, &ts) in self.timestamps.iter().enumerate() {
            let value: Vec<u8> = (0..self.value_len)
                .map(|j| (seed as usize + i + j) as u8)
                .collect();
            let key = (i % 2 == 0).then(|| seed.to_be_bytes());
            b.push(
                ts,
                key.as_ref().map(|k| &k[..]),
                Some(&value),
                &[("n", &[i as u8])],
            );
        }
        b.finish()
    }
}

fn op() -> impl Strategy<Value = Op> {
    let batch = (proptest::collection::vec(0i64..5_000, 1..6), 0usize..300).prop_map(
        |(timestamps, value_len)| BatchSpec {
            timestamps,
            value_len,
        },
    );
    prop_oneof![
        6 => proptest::collection::vec(batch, 1..4).prop_map(Op::Append),
        3 => (0u64..400, 0usize..3000).prop_map(|(from, max_bytes)| Op::Read { from, max_bytes }),
        1 => (-10i64..5_100).prop_map(|timestamp| Op::Lookup { timestamp }),
        1 => any::<bool>().prop_map(|clean| Op::Reopen { clean }),
        1 => (0i64..7_000).prop_map(|now_ms| Op::Retention { now_ms }),
    ]
}

struct ModelBatch {
    base: u64,
    bytes: Vec<u8>,
    timestamps: Vec<i64>,
}

struct ModelSegment {
    base: u64,
    bytes: u64,
    max_timestamp: i64,
    batches: Vec<ModelBatch>,
}

struct Model {
    segments: Vec<ModelSegment>,
    next_offset: u64,
    retention_bytes: u64,
}

impl Model {
    fn append(&mut self, mut bytes: Vec<u8>, timestamps: Vec<i64>) -> u64 {
        let active = self.segments.last().expect("active segment");
        if !active.batches.is_empty() && active.bytes + bytes.len() as u64 > SEGMENT_BYTES_MAX {
            self.segments.push(ModelSegment {
                base: self.next_offset,
                bytes: 0,
                max_timestamp: i64::MIN,
                batches: Vec::new(),
            });
        }
        let base = self.next_offset;
        set_base_offset(&mut bytes, base);
        self.next_offset += timestamps.len() as u64;
        let active = self.segments.last_mut().expect("active segment");
        active.bytes += bytes.len() as u64;
        active.max_timestamp = active
            .max_timestamp
            .max(timestamps.iter().copied().max().unwrap_or(i64::MIN));
        active.batches.push(ModelBatch {
            base,
            bytes,
            timestamps,
        });
        base
    }

    fn earliest(&self) -> u64 {
        self.segments[0].base
    }

    fn batches(&self) -> impl Iterator<Item = &ModelBatch> {
        self.segments.iter().flat_map(|s| s.batches.iter())
    }

    /// Greedy: the batch holding `from`, then following batches while the total stays
    /// within `max_bytes` (the first is always returned).
    fn read(&self, from: u64, max_bytes: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for batch in self
            .batches()
            .filter(|b| b.base + b.timestamps.len() as u64 > from)
        {
            if !out.is_empty() && out.len() + batch.bytes.len() > max_bytes {
                break;
            }
            out.extend_from_slice(&batch.bytes);
            if out.len() >= max_bytes {
                break;
            }
        }
        out
    }

    fn lookup(&self, timestamp: i64) -> Option<u64> {
        self.batches().find_map(|b| {
            b.timestamps
                .iter()
                .position(|&ts| ts >= timestamp)
                .map(|i| b.base + i as u64)
        })
    }

    fn retention(&mut self, now_ms: i64) -> usize {
        let sealed = self.segments.len() - 1;
        let cutoff = now_ms - RETENTION_MS as i64;
        let by_time = self.segments[..sealed]
            .iter()
            .take_while(|s| s.max_timestamp < cutoff)
            .count();
        let mut total: u64 = self.segments.iter().map(|s| s.bytes).sum();
        let mut by_size = 0;
        for s in &self.segments[..sealed] {
            if total - s.bytes < self.retention_bytes {
                break;
            }
            total -= s.bytes;
            by_size += 1;
        }
        let n = by_time.max(by_size);
        self.segments.drain(..n);
        n
    }
}

fn config(retention_bytes: u64) -> LogConfig {
    LogConfig {
        segment_bytes_max: SEGMENT_BYTES_MAX,
        index_interval_bytes: 128,
        index_bytes_max: 4096,
        retention_bytes: Some(retention_bytes),
        retention_ms: Some(RETENTION_MS),
        segment_ms: None,
        durability: Durability::None,
        ..LogConfig::default()
    }
}

fn check_same(log: &Log, model: &Model) -> Result<(), TestCaseError> {
    let reader = log.reader();
    prop_assert_eq!(reader.earliest_offset(), model.earliest());
    prop_assert_eq!(reader.high_watermark(), model.next_offset);
    prop_assert_eq!(reader.segment_count(), model.segments.len());
    let model_bytes: u64 = model.segments.iter().map(|s| s.bytes).sum();
    prop_assert_eq!(reader.size_bytes(), model_bytes);
    Ok(())
}

fn run(ops: Vec<Op>, retention_bytes: u64) -> Result<(), TestCaseError> {
    let dir = crate::common::scratch_dir();
    let files = FileCache::new(3);
    let config = config(retention_bytes);
    let mut log = Some(Log::open(dir.path(), config.clone(), &files).expect("open"));
    let mut model = Model {
        segments: vec![ModelSegment {
            base: 0,
            bytes: 0,
            max_timestamp: i64::MIN,
            batches: Vec::new(),
        }],
        next_offset: 0,
        retention_bytes,
    };
    for (seed, op) in ops.into_iter().enumerate() {
        let l = log.as_mut().expect("log is open");
        match op {
            Op::Append(specs) => {
                for spec in specs {
                    let bytes = spec.encode(seed as u64);
                    let info = l.write(&bytes).expect("write");
                    prop_assert_eq!(info.base_offset, model.append(bytes, spec.timestamps));
                }
                l.commit().expect("commit");
            }
            Op::Read { from, max_bytes } => {
                let result = l.reader().read(from, max_bytes);
                if from < model.earliest() || from > model.next_offset {
                    prop_assert!(result.is_err(), "read at {} should be out of range", from);
                } else {
                    let result = result.expect("read");
                    prop_assert_eq!(&result.batches, &model.read(from, max_bytes));
                    for batch in batches(&result.batches) {
                        let batch: Batch = batch.expect("valid batch");
                        batch.validate_records().expect("valid records");
                    }
                }
            }
            Op::Lookup { timestamp } => {
                let lookup = l.reader().offset_for_timestamp(timestamp).expect("lookup");
                let found = lookup.found;
                prop_assert_eq!(found, model.lookup(timestamp), "timestamp {}", timestamp);
            }
            Op::Reopen { clean } => {
                let l = log.take().expect("log is open");
                if clean {
                    l.close().expect("close");
                } else {
                    drop(l);
                }
                log = Some(Log::open(dir.path(), config.clone(), &files).expect("reopen"));
            }
            Op::Retention { now_ms } => {
                let deleted = l.apply_retention(now_ms).expect("retention");
                prop_assert_eq!(deleted, model.retention(now_ms));
            }
        }
        check_same(log.as_ref().expect("log is open"), &model)?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn log_matches_model(ops in proptest::collection::vec(op(), 1..80), retention_bytes in 1024u64..8192) {
        run(ops, retention_bytes)?;
    }
}
