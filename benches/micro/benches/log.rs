//! Throughput of the partition log, against the raw disk measured in the same run.
//!
//! Every benchmark moves a fixed volume per iteration and reports it as bytes/s
//! (criterion's `BytesDecimal`: MB/s means 10^6 bytes/s). Messages/s follow from the
//! records per batch, which the bench prints before each group (`docs/benchmarks.md`
//! does the arithmetic). Each iteration writes to a fresh file or log directory; creating
//! it and deleting it afterwards are not timed.
//!
//! - `raw_write/1MiB_blocks`: the baseline. Sequential `write`s of 1 MiB to a fresh file,
//!   256 MiB, then one `sync_data`, all timed (like `fio --bs=1M --end_fsync=1`).
//! - `raw_write/batch_blocks`: the same with writes the size of one 1 KiB-record batch
//!   (65,140 B, so not page aligned): the write pattern `Log::append` produces.
//! - `raw_write/batch_blocks_fsync_each`: baseline for the fsync policy: batch-sized
//!   writes, each followed by `sync_data`, 32 MiB.
//! - `append_none/{1KiB,100B}_records`: `Log::append` of one prebuilt batch of at most
//!   64 KiB over and over (the log assigns the offsets) to a fresh log with
//!   `Durability::None` and 128 MiB segments (so segments roll), 256 MiB, then
//!   `Log::flush`, all timed.
//! - `append_none/1KiB_records_commit_per_1MiB`: the same, but `Log::write` 16 batches
//!   and then `Log::commit` once (about 1 MiB per commit), as the broker's group commit
//!   does under load.
//! - `append_fsync/1KiB_records`: `Log::append` with `Durability::Fsync` (every append
//!   fsyncs), 32 MiB.
//! - `read/1KiB_records`: `LogReader::read(offset, 1 MiB)` from offset 0, following
//!   `next_offset` to the high watermark, over a 256 MiB backlog written once before the
//!   first sample. The backlog was just written, so reads come from the page cache
//!   (warm): this measures the log's read path (framing and CRC checks, copies), not the
//!   disk.
//!
//! - `validate/{none,gzip,snappy,lz4,zstd}`: `Batch::new` + `Batch::validate_records` (what
//!   the log checks before it accepts a batch) of one batch of 1,000 JSON-like records of
//!   about 1 KiB, its records compressed with each codec as the Rust client compresses
//!   them. Throughput is of the uncompressed batch, so the codecs compare per record.
//!
//! Files live under Cargo's `CARGO_TARGET_TMPDIR` (`target/tmp`), on the project's file
//! system.
//!
//! Run with `cargo bench -p strata-microbench --bench log` (add a filter such as
//! `append_none` to run some). Each benchmark takes 10 samples of one or a few
//! iterations; the whole run takes about one and a half to two minutes.

use std::fs::File;
use std::hint::black_box;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput};
use strata_storage::batch::{Batch, BatchBuilder};
use strata_storage::compression::Compression;
use strata_storage::{now_ms, Durability, FileCache, Log, LogConfig};
use tempfile::TempDir;

const MIB: u64 = 1 << 20;
/// Volume of the buffered write benchmarks and of the read backlog.
const VOLUME: u64 = 256 * MIB;
/// Volume of the benchmarks that fsync every write.
const FSYNC_VOLUME: u64 = 32 * MIB;
/// Upper bound on the encoded size of one batch.
const BATCH_BYTES: usize = 64 << 10;
/// Segment size of the logs written here: small enough that a 256 MiB run rolls (twice).
const SEGMENT_BYTES: u64 = 128 * MIB;
/// Size of one `LogReader::read`.
const READ_BYTES: usize = 1 << 20;

/// A fresh directory under Cargo's scratch directory for benchmarks, which is on the
/// project's file system (a system temp dir may be a tmpfs or another disk).
fn scratch_dir() -> TempDir {
    let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(root).expect("create CARGO_TARGET_TMPDIR");
    tempfile::Builder::new()
        .prefix("strata-bench-")
        .tempdir_in(root)
        .expect("create a scratch directory")
}

/// One encoded batch of as many `value_len`-byte records (no key, no headers) as fit in
/// [`BATCH_BYTES`], and its record count.
fn batch_of(value_len: usize) -> (Vec<u8>, u64) {
    batch_up_to(value_len, BATCH_BYTES)
}

/// The largest batch of `value_len`-byte records that fits in `batch_bytes`.
fn batch_up_to(value_len: usize, batch_bytes: usize) -> (Vec<u8>, u64) {
    let value = vec![0x5a_u8; value_len];
    let timestamp = now_ms();
    let build = |records: usize| {
        let mut builder = BatchBuilder::with_buffer(Vec::with_capacity(batch_bytes));
        for _ in 0..records {
            builder.push(timestamp, None, Some(&value), &[]);
        }
        builder.finish()
    };
    let mut records = 1;
    while build(records + 1).len() <= batch_bytes {
        records += 1;
    }
    (build(records), records as u64)
}

/// Number of times `batch` is appended to move at least `volume` bytes.
fn batches_for(volume: u64, batch: &[u8]) -> u64 {
    volume.div_ceil(batch.len() as u64)
}

fn log_config(durability: Durability) -> LogConfig {
    LogConfig {
        segment_bytes_max: SEGMENT_BYTES,
        durability,
        ..LogConfig::default()
    }
}

/// Deletes a scratch directory and commits the deletion to the file system journal, so
/// freeing (and discarding) its blocks is not charged to the next timed iteration.
fn remove(dir: TempDir) {
    let parent = dir.path().parent().map(Path::to_path_buf);
    dir.close().expect("remove a scratch directory");
    if let Some(parent) = parent {
        File::open(&parent)
            .and_then(|d| d.sync_all())
            .expect("sync the scratch root");
    }
}

/// Writes `blocks` writes of `block` bytes to a fresh file; with `sync_each` every
/// write is followed by `sync_data`, otherwise there is one at the end. Returns the time
/// from the first write to the end of the last sync.
fn raw_write(blocks: u64, block: usize, sync_each: bool) -> Duration {
    let dir = scratch_dir();
    let mut file = File::create(dir.path().join("raw.dat")).expect("create the raw file");
    let buf = vec![0xa5_u8; block];
    let start = Instant::now();
    for _ in 0..blocks {
        file.write_all(&buf).expect("write a block");
        if sync_each {
            file.sync_data().expect("sync_data after a block");
        }
    }
    if !sync_each {
        file.sync_data().expect("final sync_data");
    }
    let elapsed = start.elapsed();
    drop(file);
    remove(dir);
    elapsed
}

/// Appends `batch` `count` times to a fresh log, committing after every `commit_every`
/// batches, then flushes. Returns the time of the appends and the flush.
fn append_run(batch: &[u8], count: u64, durability: Durability, commit_every: u64) -> Duration {
    let dir = scratch_dir();
    let files = FileCache::new(16);
    let mut log =
        Log::open(dir.path().join("p0"), log_config(durability), &files).expect("open a fresh log");
    let start = Instant::now();
    if commit_every == 1 {
        for _ in 0..count {
            black_box(log.append(batch).expect("append"));
        }
    } else {
        for i in 1..=count {
            black_box(log.write(batch).expect("write"));
            if i % commit_every == 0 {
                black_box(log.commit().expect("commit"));
            }
        }
    }
    log.flush().expect("flush");
    let elapsed = start.elapsed();
    log.close().expect("close");
    remove(dir);
    elapsed
}

/// Prints what one iteration of a benchmark moves, for the messages/s arithmetic.
fn describe(name: &str, batch: &[u8], records: u64, count: u64) {
    eprintln!(
        "{name}: {records} records per {} B batch, {count} batches = {} records = {} B \
         per iteration",
        batch.len(),
        count * records,
        count * batch.len() as u64,
    );
}

fn configure<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    group
}

fn bench_raw(c: &mut Criterion) {
    let mut group = configure(c, "raw_write");
    let blocks = VOLUME / MIB;
    group.throughput(Throughput::BytesDecimal(blocks * MIB));
    group.bench_function("1MiB_blocks", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| raw_write(blocks, MIB as usize, false))
                .sum()
        })
    });

    let (batch, _) = batch_of(1024);
    let block = batch.len();
    for (name, volume, sync_each) in [
        ("batch_blocks", VOLUME, false),
        ("batch_blocks_fsync_each", FSYNC_VOLUME, true),
    ] {
        let blocks = batches_for(volume, &batch);
        eprintln!("raw_write/{name}: {blocks} writes of {block} B per iteration");
        group.throughput(Throughput::BytesDecimal(blocks * block as u64));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| raw_write(blocks, block, sync_each))
                    .sum()
            })
        });
    }
    group.finish();
}

fn bench_append_none(c: &mut Criterion) {
    let mut group = configure(c, "append_none");
    for (name, value_len, batch_bytes, commit_every) in [
        ("1KiB_records", 1024, BATCH_BYTES, 1),
        ("100B_records", 100, BATCH_BYTES, 1),
        ("1KiB_records_256KiB_batches", 1024, 4 * BATCH_BYTES, 1),
        ("1KiB_records_commit_per_1MiB", 1024, BATCH_BYTES, 16),
    ] {
        let (batch, records) = batch_up_to(value_len, batch_bytes);
        let count = batches_for(VOLUME, &batch);
        describe(&format!("append_none/{name}"), &batch, records, count);
        group.throughput(Throughput::BytesDecimal(count * batch.len() as u64));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| append_run(&batch, count, Durability::None, commit_every))
                    .sum()
            })
        });
    }
    group.finish();
}

fn bench_append_fsync(c: &mut Criterion) {
    let mut group = configure(c, "append_fsync");
    let (batch, records) = batch_of(1024);
    let count = batches_for(FSYNC_VOLUME, &batch);
    describe("append_fsync/1KiB_records", &batch, records, count);
    group.throughput(Throughput::BytesDecimal(count * batch.len() as u64));
    group.bench_function("1KiB_records", |b| {
        b.iter_custom(|iters| {
            (0..iters)
                .map(|_| append_run(&batch, count, Durability::Fsync, 1))
                .sum()
        })
    });
    group.finish();
}

/// A log holding `count` copies of `batch`, flushed, with the directory that holds it.
struct Backlog {
    dir: TempDir,
    log: Log,
}

impl Backlog {
    fn write(batch: &[u8], count: u64) -> Backlog {
        let dir = scratch_dir();
        let files = FileCache::new(16);
        let mut log = Log::open(dir.path().join("p0"), log_config(Durability::None), &files)
            .expect("open the backlog log");
        for _ in 0..count {
            log.append(batch).expect("append to the backlog");
        }
        log.flush().expect("flush the backlog");
        Backlog { dir, log }
    }
}

fn bench_read(c: &mut Criterion) {
    let mut group = configure(c, "read");
    let (batch, records) = batch_of(1024);
    let count = batches_for(VOLUME, &batch);
    let total = count * batch.len() as u64;
    let end = count * records;
    // Written when the benchmark first runs, so a filter that skips it skips this too.
    let mut backlog: Option<Backlog> = None;
    group.throughput(Throughput::BytesDecimal(total));
    group.bench_function("1KiB_records", |b| {
        let backlog = backlog.get_or_insert_with(|| {
            describe("read/1KiB_records (backlog)", &batch, records, count);
            Backlog::write(&batch, count)
        });
        let reader = backlog.log.reader().clone();
        assert_eq!(reader.high_watermark(), end, "backlog record count");
        b.iter(|| {
            let mut from = 0;
            let mut bytes = 0;
            while from < end {
                let result = reader.read(from, READ_BYTES).expect("read");
                bytes += result.batches.len() as u64;
                from = result.next_offset;
                black_box(&result.batches);
            }
            assert_eq!(bytes, total, "read the whole backlog");
            bytes
        })
    });
    group.finish();
    if let Some(backlog) = backlog {
        backlog.log.close().expect("close the backlog log");
        remove(backlog.dir);
    }
}

fn bench_validate(c: &mut Criterion) {
    let mut group = configure(c, "validate");
    let build = || {
        let mut builder = BatchBuilder::new();
        for i in 0..1_000u32 {
            let items: Vec<String> = (0..40)
                .map(|j| ((i * 31 + j * 7) % 1000).to_string())
                .collect();
            let value = format!(
                "{{\"order\":{i},\"customer\":\"c-{}\",\"items\":[{}],\"note\":\"{}\"}}",
                i % 97,
                items.join(","),
                "x".repeat(700)
            );
            let key = format!("k{i}");
            builder.push(
                1_700_000_000_000 + i64::from(i),
                Some(key.as_bytes()),
                Some(value.as_bytes()),
                &[],
            );
        }
        builder
    };
    let plain_len = build().finish().len();
    group.throughput(Throughput::BytesDecimal(plain_len as u64));
    for codec in Compression::ALL {
        let bytes = build().finish_compressed(codec);
        eprintln!(
            "validate/{codec}: {plain_len} B uncompressed, {} B as stored",
            bytes.len()
        );
        group.bench_function(codec.name(), |b| {
            b.iter(|| {
                Batch::new(black_box(&bytes))
                    .and_then(|batch| batch.validate_records())
                    .expect("valid")
            })
        });
    }
    group.finish();
}

fn main() {
    // What `criterion_group!` + `criterion_main!` expand to, written out so the generated
    // public function does not trip the workspace's `missing_docs` lint.
    let mut c = Criterion::default().configure_from_args();
    bench_raw(&mut c);
    bench_append_none(&mut c);
    bench_append_fsync(&mut c);
    bench_read(&mut c);
    bench_validate(&mut c);
    c.final_summary();
}
