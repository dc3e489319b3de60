//! Opening a partition directory the fuzzer wrote: segments (`.log`), their offset and
//! time indexes, the recovery checkpoint and the producer snapshot, as a crash or a
//! damaged disk could leave them. Opening may refuse with an error; it must not panic,
//! hang or allocate without bound, and whatever it opens must be readable end to end
//! (every read in range answers, with batches that parse) and searchable by time.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use strata_storage::batch::batches;
use strata_storage::producer::{ProducerStates, SNAPSHOT_FILE};
use strata_storage::{Durability, FileCache, Log, LogConfig};

#[derive(Arbitrary, Debug)]
struct Segment {
    base_offset: u8,
    log: Vec<u8>,
    fix_crcs: bool,
    index: Option<Vec<u8>>,
    time_index: Option<Vec<u8>>,
}

#[derive(Arbitrary, Debug)]
struct Directory {
    segments: Vec<Segment>,
    checkpoint: Option<Vec<u8>>,
    snapshot: Option<Vec<u8>>,
    timestamps: Vec<i64>,
}

fuzz_target!(|input: Directory| {
    let dir = tempfile::tempdir().expect("a temporary directory");
    for segment in input.segments.iter().take(4) {
        let name = format!("{:020}", segment.base_offset);
        let mut log = segment.log.clone();
        if segment.fix_crcs {
            strata_fuzz::fix_crcs(&mut log);
        }
        std::fs::write(dir.path().join(format!("{name}.log")), &log).expect("write");
        if let Some(index) = &segment.index {
            std::fs::write(dir.path().join(format!("{name}.index")), index).expect("write");
        }
        if let Some(time_index) = &segment.time_index {
            std::fs::write(dir.path().join(format!("{name}.timeindex")), time_index)
                .expect("write");
        }
    }
    if let Some(checkpoint) = &input.checkpoint {
        std::fs::write(dir.path().join("checkpoint"), checkpoint).expect("write");
    }
    if let Some(snapshot) = &input.snapshot {
        std::fs::write(dir.path().join(SNAPSHOT_FILE), snapshot).expect("write");
    }
    let config = LogConfig {
        durability: Durability::None,
        // Small, so that a fuzzed index is not a 10 MiB file per run.
        index_bytes_max: 4096,
        ..LogConfig::default()
    };
    let Ok(log) = Log::open(dir.path(), config, &FileCache::new(4)) else {
        return;
    };
    let reader = log.reader();
    let (earliest, end) = (reader.earliest_offset(), reader.high_watermark());
    assert!(earliest <= end, "log start {earliest} above the high watermark {end}");
    let mut offset = earliest;
    while offset < end {
        let Ok(read) = reader.read(offset, 64 << 10) else {
            break;
        };
        for batch in batches(&read.batches) {
            if batch.is_err() {
                break;
            }
        }
        if read.next_offset <= offset {
            break;
        }
        offset = read.next_offset;
    }
    for &timestamp in input.timestamps.iter().take(4) {
        if let Ok(lookup) = reader.offset_for_timestamp(timestamp) {
            let answer = lookup.offset();
            assert!(answer <= end, "time lookup answered {answer} past the end {end}");
        }
    }
    let _ = reader.batch_timestamp(earliest);
    let _ = ProducerStates::recover(reader, 0);
    let _ = log.close();
});
