//! Crash-recovery tests on damaged files: the active segment is cut at every byte inside
//! its last batch, has random bytes flipped in its tail, or has garbage appended, and the
//! log must reopen keeping every complete batch before the damage, losing nothing
//! earlier, never panicking, and accepting appends at the right offset afterwards.

use std::fs;
use std::path::{Path, PathBuf};

use crate::common::scratch_dir;
use strata_storage::batch::BatchBuilder;
use strata_storage::{Durability, FileCache, Log, LogConfig};

fn config() -> LogConfig {
    LogConfig {
        segment_bytes_max: 1 << 20,
        index_interval_bytes: 200,
        // Small preallocated indexes keep the hundreds of directory copies cheap.
        index_bytes_max: 16 << 10,
        durability: Durability::None,
        ..LogConfig::default()
    }
}

fn batch(i: usize) -> Vec<u8> {
    let mut b = BatchBuilder::new();
    for r in 0..=(i % 4) {
        let value = format!("batch {i} record {r} {}", "x".repeat(i * 7 % 90));
        b.push(
            1_000 + i as i64,
            Some(b"key"),
            Some(value.as_bytes()),
            &[("h", b"v")],
        );
    }
    b.finish()
}

/// A batch as the log stores it: what a read returns.
struct Stored {
    base: u64,
    next: u64,
    /// Byte position in the active segment.
    position: u64,
    bytes: Vec<u8>,
}

/// Writes `count` batches and drops the log without closing it (an unclean stop). With
/// `checkpoint_after`, a flush after that many batches leaves a checkpoint mid-segment.
fn build(dir: &Path, count: usize, checkpoint_after: Option<usize>) -> Vec<Stored> {
    let mut log = Log::open(dir, config(), &FileCache::new(4)).expect("open");
    let mut position = 0;
    let mut stored = Vec::new();
    for i in 0..count {
        let bytes = batch(i);
        let info = log.append(&bytes).expect("append");
        let read = log.reader().read(info.base_offset, 0).expect("read back");
        assert_eq!(read.batches.len(), bytes.len());
        stored.push(Stored {
            base: info.base_offset,
            next: info.last_offset + 1,
            position,
            bytes: read.batches,
        });
        position += bytes.len() as u64;
        if checkpoint_after == Some(i + 1) {
            log.flush().expect("flush");
        }
    }
    drop(log);
    stored
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in fs::read_dir(from).expect("read dir") {
        let entry = entry.expect("entry");
        fs::copy(entry.path(), to.join(entry.file_name())).expect("copy");
    }
}

/// A copy of the log in `pristine` whose active segment is cut to `len` bytes.
fn cut_copy(pristine: &Path, len: u64) -> tempfile::TempDir {
    let dir = scratch_dir();
    copy_dir(pristine, dir.path());
    let file = fs::OpenOptions::new()
        .write(true)
        .open(active_log(dir.path()))
        .expect("open log");
    file.set_len(len).expect("truncate");
    dir
}

fn active_log(dir: &Path) -> PathBuf {
    let mut logs: Vec<PathBuf> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    logs.sort();
    logs.pop().expect("a segment")
}

/// Opens the log in `dir` and checks it holds exactly `stored[..keep]`, byte for byte,
/// then that the next append gets the next offset and survives a clean reopen.
fn check_recovered(dir: &Path, stored: &[Stored], keep: usize, what: &str) {
    let files = FileCache::new(4);
    let mut log = Log::open(dir, config(), &files).unwrap_or_else(|e| panic!("{what}: open: {e}"));
    let next = stored[..keep].last().map_or(0, |s| s.next);
    assert_eq!(
        log.reader().high_watermark(),
        next,
        "{what}: high watermark"
    );
    for s in &stored[..keep] {
        let read = log.reader().read(s.base, 0).expect("read");
        assert_eq!(read.batches, s.bytes, "{what}: batch at offset {}", s.base);
    }
    assert_eq!(
        log.append(&batch(7)).expect("append").base_offset,
        next,
        "{what}: append"
    );
    log.close().expect("close");
    let log = Log::open(dir, config(), &files).expect("reopen");
    assert!(
        log.reader().high_watermark() > next,
        "{what}: append survives"
    );
}

#[test]
fn truncation_at_every_byte_of_the_last_batch_keeps_all_earlier_batches() {
    for checkpoint_after in [None, Some(10)] {
        let pristine = scratch_dir();
        let stored = build(pristine.path(), 12, checkpoint_after);
        let last = stored.last().expect("batches");
        for cut in last.position..last.position + last.bytes.len() as u64 {
            let dir = cut_copy(pristine.path(), cut);
            let what = format!("checkpoint {checkpoint_after:?}, cut at byte {cut}");
            check_recovered(dir.path(), &stored, stored.len() - 1, &what);
        }
    }
}

#[test]
fn truncation_before_the_checkpoint_falls_back_to_a_full_scan() {
    let pristine = scratch_dir();
    let stored = build(pristine.path(), 12, Some(10));
    // Cut inside batch 5, before the checkpoint at batch 10: the checkpoint now points
    // past the end of the file and must not be trusted.
    let dir = cut_copy(pristine.path(), stored[5].position + 3);
    check_recovered(dir.path(), &stored, 5, "cut before checkpoint");
}

/// A small deterministic generator, so a failure names its seed and reproduces.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn flipped_bytes_in_the_tail_truncate_at_the_damaged_batch() {
    let pristine = scratch_dir();
    let stored = build(pristine.path(), 30, Some(20));
    let tail_start = stored[20].position;
    let end = stored
        .last()
        .map_or(0, |s| s.position + s.bytes.len() as u64);
    let seed = 0x5eed_0001;
    let mut rng = XorShift(seed);
    for round in 0..150 {
        let dir = scratch_dir();
        copy_dir(pristine.path(), dir.path());
        let path = active_log(dir.path());
        let mut bytes = fs::read(&path).expect("read log");
        let at = tail_start + rng.next() % (end - tail_start);
        let mask = (rng.next() % 255 + 1) as u8;
        bytes[at as usize] ^= mask;
        fs::write(&path, &bytes).expect("write log");

        let damaged = stored
            .iter()
            .position(|s| at < s.position + s.bytes.len() as u64)
            .expect("damage inside a batch");
        let within = at - stored[damaged].position;
        // Bytes 12..16 (leader epoch) are outside the CRC: that batch legitimately
        // survives with the changed epoch, and so does everything after it.
        let keep = if (12..16).contains(&within) {
            stored.len()
        } else {
            damaged
        };
        let what = format!("seed {seed:#x} round {round}: byte {at} ^ {mask:#04x}");
        if keep == stored.len() {
            let log = Log::open(dir.path(), config(), &FileCache::new(4)).expect("open");
            assert_eq!(
                log.reader().high_watermark(),
                stored.last().map_or(0, |s| s.next),
                "{what}"
            );
        } else {
            check_recovered(dir.path(), &stored, keep, &what);
        }
    }
}

#[test]
fn garbage_after_the_last_batch_is_cut_off_on_every_reopen() {
    let dir = scratch_dir();
    let stored = build(dir.path(), 8, None);
    let mut rng = XorShift(0x09a4_ba9e);
    for round in 0..20 {
        let path = active_log(dir.path());
        let mut bytes = fs::read(&path).expect("read log");
        let garbage = 1 + rng.next() as usize % 200;
        bytes.extend((0..garbage).map(|_| rng.next() as u8));
        fs::write(&path, &bytes).expect("write log");
        let log = Log::open(dir.path(), config(), &FileCache::new(4)).expect("open");
        assert_eq!(
            log.reader().high_watermark(),
            stored.last().map_or(0, |s| s.next),
            "round {round}"
        );
        for s in &stored {
            assert_eq!(
                log.reader().read(s.base, 0).expect("read").batches,
                s.bytes,
                "round {round}"
            );
        }
        drop(log);
    }
}

/// Every batch of a log as stored, by base offset.
type Batches = Vec<(u64, Vec<u8>)>;

/// Sealed segments of about four batches each, closed cleanly: (directory, per-segment
/// base offsets, every stored batch).
fn sealed_log() -> (tempfile::TempDir, Vec<u64>, Batches) {
    let dir = scratch_dir();
    let config = LogConfig {
        segment_bytes_max: 1024,
        ..config()
    };
    let mut log = Log::open(dir.path(), config, &FileCache::new(4)).expect("open");
    let mut stored = Vec::new();
    for i in 0..40 {
        let info = log.append(&batch(i)).expect("append");
        let read = log.reader().read(info.base_offset, 0).expect("read back");
        stored.push((info.base_offset, read.batches));
    }
    log.close().expect("close");
    let mut bases: Vec<u64> = fs::read_dir(dir.path())
        .expect("read dir")
        .filter_map(|e| {
            let name = e.expect("entry").file_name().into_string().expect("utf-8");
            name.strip_suffix(".log")
                .map(|stem| stem.parse().expect("base"))
        })
        .collect();
    bases.sort_unstable();
    assert!(bases.len() >= 4, "several segments");
    (dir, bases, stored)
}

fn segment_file(dir: &Path, base: u64, ext: &str) -> PathBuf {
    dir.join(format!("{base:020}.{ext}"))
}

fn is_corrupted<T: std::fmt::Debug>(result: strata_storage::Result<T>) -> bool {
    matches!(result, Err(strata_storage::Error::Corrupted { .. }))
}

/// A sealed segment cut short (or one missing from the middle) must not make reads of
/// its lost offsets return the next segment's records: open reports the damage, reads
/// inside the hole report corruption, and reads before it still work.
#[test]
fn a_short_or_missing_sealed_segment_is_reported_not_skipped() {
    for missing in [false, true] {
        let (dir, bases, stored) = sealed_log();
        let (damaged, next) = (bases[1], bases[2]);
        let log_path = segment_file(dir.path(), damaged, "log");
        if missing {
            for ext in ["log", "index", "timeindex"] {
                fs::remove_file(segment_file(dir.path(), damaged, ext)).expect("remove");
            }
        } else {
            let len = fs::metadata(&log_path).expect("meta").len();
            let file = fs::OpenOptions::new()
                .write(true)
                .open(&log_path)
                .expect("open");
            file.set_len(len / 2).expect("cut");
        }
        let log = Log::open(dir.path(), config(), &FileCache::new(4)).expect("open");
        assert_eq!(log.recovery().damaged_segments, 1, "missing {missing}");
        let reader = log.reader();
        // Every offset in the hole: an error, never a record from the next segment.
        let hole_start = if missing {
            damaged
        } else {
            let read = reader
                .read(damaged, 1 << 20)
                .expect("read up to the damage");
            assert!(!read.batches.is_empty() && read.next_offset < next);
            read.next_offset
        };
        for offset in hole_start..next {
            assert!(
                is_corrupted(reader.read(offset, 1 << 20)),
                "missing {missing}: read at {offset}"
            );
        }
        // A read from before the hole stops at it.
        let read = reader
            .read(bases[0], 1 << 20)
            .expect("read before the damage");
        assert!(read.next_offset <= hole_start, "missing {missing}");
        // The segments after the hole are intact.
        let (base, bytes) = stored.iter().find(|(b, _)| *b == next).expect("stored");
        assert_eq!(&reader.read(*base, 0).expect("read after").batches, bytes);
    }
}

/// A read that reaches a damaged batch returns the good batches it collected before it;
/// the next read, at the damaged batch, reports the corruption.
#[test]
fn a_damaged_batch_does_not_discard_the_good_ones_before_it() {
    let (dir, bases, stored) = sealed_log();
    let in_segment: Vec<&(u64, Vec<u8>)> = stored
        .iter()
        .filter(|(b, _)| (bases[1]..bases[2]).contains(b))
        .collect();
    assert!(in_segment.len() >= 3);
    let path = segment_file(dir.path(), bases[1], "log");
    let mut bytes = fs::read(&path).expect("read");
    let third_at: usize = in_segment[..2].iter().map(|(_, b)| b.len()).sum();
    let last = third_at + in_segment[2].1.len() - 1;
    bytes[last] ^= 0x40;
    fs::write(&path, &bytes).expect("write");
    let log = Log::open(dir.path(), config(), &FileCache::new(4)).expect("open");
    // From the previous segment: its batches and the first two of this one come back.
    let read = log.reader().read(bases[0], 1 << 20).expect("good batches");
    let expected: Vec<u8> = stored
        .iter()
        .filter(|(b, _)| *b >= bases[0] && *b < in_segment[2].0)
        .flat_map(|(_, b)| b.iter().copied())
        .collect();
    assert_eq!(read.batches, expected);
    assert_eq!(read.next_offset, in_segment[2].0);
    assert!(is_corrupted(log.reader().read(read.next_offset, 1 << 20)));
}
