//! The partition log: an ordered list of segments, one writer and any number of readers.
//!
//! # Writing
//! [`Log::write`] validates a batch, assigns its offsets and stages it; [`Log::commit`]
//! writes staged batches with one `pwrite`, applies the durability policy (one fsync for
//! everything staged: group commit) and only then publishes them to readers by advancing
//! the high watermark. [`Log::append`] is `write` + `commit` for one batch.
//!
//! # Reading
//! A [`LogReader`] is a cheap clone that other threads use. It loads the high watermark,
//! takes a snapshot of the segment list (a read lock held for one `Arc` clone) and reads
//! files with `pread`. It never sees past the watermark, so never a half-written batch.
//!
//! # Invariants
//! - Offsets are dense and assigned in order: a segment's batches run from its base offset
//!   without gaps, and each segment starts where the previous ended.
//! - Only the last segment (the active one) is ever written; the others are sealed:
//!   fsynced, with trimmed and fsynced indexes.
//! - Published data (below `readable_len` and the high watermark) is never rewritten.
//!   Under [`Durability::Fsync`] it is also on disk.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::batch::{set_base_offset, Batch, BatchHeader, BATCH_HEADER_LEN};
use crate::checkpoint::{Checkpoint, CHECKPOINT_FILE};
use crate::config::{Durability, LogConfig};
use crate::error::{io_at, Error, Result};
use crate::fault;
use crate::index::{Index, OffsetEntry, TimeEntry};
use crate::segment::{
    open_for_write, segment_path, FileCache, Segment, INDEX_EXT, LOG_EXT, TIME_INDEX_EXT,
};

/// Staged bytes are written out once they reach this size, even before a commit, so a
/// long run of writes does not grow the staging buffer without bound.
const STAGE_BYTES_MAX: usize = 1 << 20;
/// Fsync durations kept for [`Log::take_fsyncs`] between two calls.
pub const FSYNCS_KEPT_MAX: usize = 64;
/// Read size used when scanning a segment during recovery or an index rebuild.
const SCAN_CHUNK_BYTES: usize = 1 << 20;
/// Deferred failures kept for [`Log::take_deferred_failures`] between two calls; more
/// are counted in the last one kept.
pub const DEFERRED_KEPT_MAX: usize = 16;

/// A step of the log's upkeep that failed without losing or half-writing data, so the
/// log retries it instead of refusing writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Deferred {
    /// Starting a new segment; the write that needed it got [`Error::RollFailed`].
    Roll,
    /// Writing the recovery checkpoint or flushing the active segment's indexes before
    /// it: retried at the next sync. Until then a crash makes recovery scan more.
    Checkpoint,
    /// Trimming and fsyncing a sealed segment's indexes: retried at every commit and at
    /// close. Until then a crash makes the next open rebuild them.
    IndexSeal,
    /// Allocating more slots for the active segment's index (a full disk, no
    /// descriptor to open the file): retried at the next write, which indexes more
    /// sparsely meanwhile and rolls the segment once the index is nearly full.
    IndexGrowth,
}

impl Deferred {
    /// A short, stable name (a metric label).
    pub fn name(self) -> &'static str {
        match self {
            Deferred::Roll => "roll",
            Deferred::Checkpoint => "checkpoint",
            Deferred::IndexSeal => "index_seal",
            Deferred::IndexGrowth => "index_growth",
        }
    }

    fn slot(self) -> usize {
        self as usize
    }
}

/// One failure of a [`Deferred`] step, as [`Log::take_deferred_failures`] reports it.
#[derive(Debug)]
pub struct DeferredFailure {
    /// Which step failed.
    pub step: Deferred,
    /// Why: the error's message.
    pub error: String,
    /// The step had succeeded (or never failed) before this failure: the first of a run
    /// of failures, the one worth a log line.
    pub first: bool,
    /// Failures of any step that were not kept because the list was full, counted here.
    pub dropped: u64,
}

/// Where an appended batch landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendInfo {
    /// Offset of the batch's first record.
    pub base_offset: u64,
    /// Offset of its last record.
    pub last_offset: u64,
    /// Largest record timestamp in the batch.
    pub max_timestamp: i64,
}

/// The answer of [`LogReader::offset_for_timestamp`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimestampLookup {
    /// The first offset whose record timestamp is at or after the one asked for.
    pub found: Option<u64>,
    /// The high watermark the search went up to.
    pub high_watermark: u64,
}

impl TimestampLookup {
    /// The offset to start consuming from: the one found, else the high watermark the
    /// search went up to (records after it are newer).
    pub fn offset(&self) -> u64 {
        self.found.unwrap_or(self.high_watermark)
    }
}

/// The answer to a read: whole batches, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReadResult {
    /// Concatenated encoded batches. The first may start before the requested offset
    /// (a batch is never split); the reader skips those records.
    pub batches: Vec<u8>,
    /// Offset right after the last returned batch: where the next read continues.
    pub next_offset: u64,
    /// The high watermark when the read started.
    pub high_watermark: u64,
    /// The first offset in the log when the read started.
    pub earliest_offset: u64,
}

struct Shared {
    dir: PathBuf,
    segments: RwLock<Arc<Vec<Arc<Segment>>>>,
    /// Next offset readers may not yet see; every offset below it is published.
    high_watermark: AtomicU64,
    files: FileCache,
}

impl Shared {
    fn segments(&self) -> Arc<Vec<Arc<Segment>>> {
        Arc::clone(&self.segments.read().unwrap_or_else(|e| e.into_inner()))
    }

    fn set_segments(&self, segments: Vec<Arc<Segment>>) {
        *self.segments.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(segments);
    }
}

/// A read handle on a log, for any thread. Clones are cheap and share the log.
#[derive(Clone)]
pub struct LogReader {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogReader")
            .field("dir", &self.shared.dir)
            .field("high_watermark", &self.high_watermark())
            .finish()
    }
}

/// Decides which batches get index entries. Shared by appends and recovery so an index
/// rebuilt from the log equals the one written alongside it.
#[derive(Debug, Clone, Copy)]
struct IndexState {
    bytes_since_entry: u64,
    /// Largest record timestamp in the segment so far.
    max_timestamp: i64,
    /// Timestamp of the last time index entry.
    time_indexed: i64,
    /// Relative offset of the last batch.
    last_batch: u32,
}

impl IndexState {
    fn resume(segment: &Segment, position: u64, max_timestamp: i64) -> IndexState {
        let last_entry = segment.offsets.last();
        IndexState {
            bytes_since_entry: position - last_entry.map_or(0, |e| u64::from(e.position)),
            max_timestamp,
            time_indexed: segment.times.last().map_or(i64::MIN, |e| e.timestamp),
            last_batch: last_entry.map_or(0, |e| e.relative_offset),
        }
    }

    /// Indexes a batch. When an index is nearly full (possible in a scan, if the index
    /// settings shrank since the segment was written or the index file could not grow)
    /// entries are skipped: a sparser index is slower to search but still correct.
    fn add(&mut self, segment: &Segment, header: &BatchHeader, position: u64, interval: u64) {
        let relative = (header.base_offset - segment.base_offset) as u32;
        self.max_timestamp = self.max_timestamp.max(header.max_timestamp);
        let room = !segment.offsets.is_nearly_full() && !segment.times.is_nearly_full();
        if room && (segment.offsets.len() == 0 || self.bytes_since_entry >= interval) {
            let entry = OffsetEntry {
                relative_offset: relative,
                position: position as u32,
            };
            segment.offsets.push(entry);
            self.bytes_since_entry = 0;
            if self.max_timestamp > self.time_indexed {
                self.push_time(segment, relative);
            }
        }
        self.bytes_since_entry += header.size as u64;
        self.last_batch = relative;
    }

    /// Records the segment's final max timestamp, so a sealed segment's largest
    /// timestamp is its last time index entry.
    fn finish(&mut self, segment: &Segment) {
        if self.max_timestamp > self.time_indexed && !segment.times.is_full() {
            self.push_time(segment, self.last_batch);
        }
    }

    fn push_time(&mut self, segment: &Segment, relative: u32) {
        let entry = TimeEntry {
            timestamp: self.max_timestamp,
            relative_offset: relative,
        };
        segment.times.push(entry);
        self.time_indexed = self.max_timestamp;
    }
}

/// The writer's view of the active segment.
struct Active {
    segment: Arc<Segment>,
    file: fs::File,
    /// Bytes in the file.
    written: u64,
    /// Bytes known to be on disk.
    synced: u64,
    /// Position of the last checkpoint.
    checkpointed: u64,
    /// Staged batches; they go to the file at position `written`.
    staged: Vec<u8>,
    /// Offset the next staged batch gets.
    next_offset: u64,
    index: IndexState,
    created_ms: i64,
}

impl Active {
    fn end(&self) -> u64 {
        self.written + self.staged.len() as u64
    }
}

/// One partition's log. See the module documentation.
pub struct Log {
    reader: LogReader,
    config: LogConfig,
    active: Active,
    last_sync: Instant,
    /// How long each data fsync since the last [`Log::take_fsyncs`] took (commits and
    /// segment rolls). Drained by the writer after each commit, so it stays short.
    fsyncs: Vec<Duration>,
    poisoned: bool,
    recovery: LogRecovery,
    /// Failures of upkeep the log retries, not yet taken by the caller.
    deferred: Vec<DeferredFailure>,
    /// Per [`Deferred`] step: its last attempt failed.
    failing: [bool; 4],
    /// The last checkpoint attempt failed: the next sync writes one whatever the
    /// checkpoint interval says.
    checkpoint_stale: bool,
    /// Sealed segments whose indexes could not be trimmed and fsynced yet.
    unsealed: Vec<Arc<Segment>>,
}

/// What [`Log::open`] found: whether anything written before may be gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRecovery {
    /// The log was closed cleanly last time, so nothing it had published is missing.
    pub clean: bool,
    /// Bytes cut off the end of the active segment: a torn or unsynced tail, or batches
    /// that failed their checks.
    pub truncated_bytes: u64,
    /// The high watermark after recovery. When the log was not closed cleanly, records
    /// the previous run published at or above it may have been lost (under `interval`
    /// and `none`, a crash loses what was not yet fsynced) and their offsets are given
    /// to new records: this is the report of that loss.
    pub recovered_to: u64,
    /// Sealed segments that do not hold every offset up to the next segment in whole
    /// batches: a short or missing file, or damaged bytes. Reads of the offsets they
    /// lack report [`Error::Corrupted`].
    pub damaged_segments: u32,
}

impl LogRecovery {
    /// True when records the previous run published at or above
    /// [`LogRecovery::recovered_to`] may be gone: the log was not closed cleanly. Under
    /// the `fsync` policy nothing acknowledged is ever among them.
    pub fn may_have_lost_records(&self) -> bool {
        !self.clean
    }
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log")
            .field("dir", &self.reader.shared.dir)
            .field("next_offset", &self.active.next_offset)
            .field("high_watermark", &self.reader.high_watermark())
            .finish()
    }
}

impl Log {
    /// Opens the log in `dir`, creating it if needed, and recovers it: after a clean
    /// close this reads only metadata; after a crash it scans the active segment from
    /// the last checkpoint and truncates it at the first incomplete or corrupt batch.
    pub fn open(dir: impl AsRef<Path>, config: LogConfig, files: &FileCache) -> Result<Log> {
        config.validate()?;
        let dir = dir.as_ref().to_path_buf();
        create_dir_all_durable(&dir)?;
        let bases = list_segments(&dir)?;
        let checkpoint = Checkpoint::read(&dir).map_err(io_at(&dir.join(CHECKPOINT_FILE)))?;

        let mut segments = Vec::with_capacity(bases.len().max(1));
        let mut damaged = 0;
        for pair in bases.windows(2) {
            let (segment, damage) = open_sealed(&dir, pair[0], pair[1], &config)?;
            damaged += u32::from(damage);
            segments.push(Arc::new(segment));
        }
        let active_base = bases.last().copied().unwrap_or(0);
        let (active, mut recovery) = recover_active(&dir, active_base, checkpoint, &config)?;
        recovery.damaged_segments = damaged;
        // A new partition (no segment file yet) lost nothing, checkpoint or not.
        recovery.clean |= bases.is_empty();
        let high_watermark = active.next_offset;
        segments.push(Arc::clone(&active.segment));
        // After an unclean stop, files may have been created (a roll that failed before
        // its directory fsync) whose names are not durable yet: new data would go into
        // a file a power loss can take away with its name.
        if bases.is_empty() || !recovery.clean {
            sync_dir(&dir)?;
        }

        let checkpoint_is_new = !dir.join(CHECKPOINT_FILE).exists();
        let mut log = Log {
            reader: LogReader {
                shared: Arc::new(Shared {
                    dir,
                    segments: RwLock::new(Arc::new(segments)),
                    high_watermark: AtomicU64::new(high_watermark),
                    files: files.clone(),
                }),
            },
            config,
            active,
            last_sync: Instant::now(),
            fsyncs: Vec::new(),
            poisoned: false,
            recovery,
            deferred: Vec::new(),
            failing: [false; 4],
            checkpoint_stale: false,
            unsealed: Vec::new(),
        };
        // A fresh, unclean checkpoint: the clean flag must not outlive the first write,
        // and the next recovery starts from what this one established.
        log.write_checkpoint(false)?;
        if checkpoint_is_new {
            sync_dir(&log.reader.shared.dir)?;
        }
        Ok(log)
    }

    /// What opening the log found: whether the previous run ended cleanly and where
    /// recovery put the high watermark.
    pub fn recovery(&self) -> LogRecovery {
        self.recovery
    }

    /// A read handle; clone it to read from other threads.
    pub fn reader(&self) -> &LogReader {
        &self.reader
    }

    /// The log's configuration.
    pub fn config(&self) -> &LogConfig {
        &self.config
    }

    /// How long each data fsync since the last call took (those of commits and of
    /// segment rolls), oldest first; the log keeps at most [`FSYNCS_KEPT_MAX`] between
    /// calls.
    pub fn take_fsyncs(&mut self) -> std::vec::Drain<'_, Duration> {
        self.fsyncs.drain(..)
    }

    /// Failures of upkeep steps since the last call, oldest first (at most
    /// [`DEFERRED_KEPT_MAX`]). None of them lost data or made the log refuse writes: the
    /// log retries each step (see [`Deferred`]).
    pub fn take_deferred_failures(&mut self) -> std::vec::Drain<'_, DeferredFailure> {
        self.deferred.drain(..)
    }

    /// Records the outcome of a deferred step, returning the error if it failed.
    fn deferred<T>(&mut self, step: Deferred, result: Result<T>) -> Result<T> {
        let failing = &mut self.failing[step.slot()];
        let first = !*failing;
        *failing = result.is_err();
        match result {
            Ok(x) => Ok(x),
            Err(error) => {
                if self.deferred.len() < DEFERRED_KEPT_MAX {
                    self.deferred.push(DeferredFailure {
                        step,
                        error: error.to_string(),
                        first,
                        dropped: 0,
                    });
                } else if let Some(last) = self.deferred.last_mut() {
                    last.dropped += 1;
                }
                Err(error)
            }
        }
    }

    /// The offset the next written batch gets (staged batches included).
    pub fn next_offset(&self) -> u64 {
        self.active.next_offset
    }

    /// Validates `batch`, assigns it the next offsets and stages it. It is neither
    /// visible nor durable until [`Log::commit`]. A rejected batch changes nothing.
    pub fn write(&mut self, batch: &[u8]) -> Result<AppendInfo> {
        self.check_poisoned()?;
        if batch.len() > self.config.batch_bytes_max {
            return Err(Error::BatchTooLarge {
                size: batch.len(),
                max: self.config.batch_bytes_max,
            });
        }
        let parsed = Batch::new(batch)?;
        parsed.validate_records()?;
        let header = *parsed.header();
        let record_count = header.record_count as u64;
        let written = self.guard(|log| {
            if log.should_roll(batch.len(), record_count) {
                log.roll()?;
            }
            let active = &mut log.active;
            let base_offset = active.next_offset;
            let position = active.end();
            let start = active.staged.len();
            active.staged.extend_from_slice(batch);
            set_base_offset(&mut active.staged[start..], base_offset);
            let header = BatchHeader {
                base_offset,
                ..header
            };
            active.index.add(
                &active.segment,
                &header,
                position,
                log.config.index_interval_bytes,
            );
            active.next_offset += record_count;
            if active.staged.len() >= STAGE_BYTES_MAX {
                log.write_staged()?;
            }
            Ok(AppendInfo {
                base_offset,
                last_offset: header.last_offset(),
                max_timestamp: header.max_timestamp,
            })
        });
        self.report_index_growth();
        written
    }

    /// Records the outcome of the active indexes' last attempts to grow, if any, as one:
    /// failed if either failed (so one index growing does not end the other's run of
    /// failures).
    fn report_index_growth(&mut self) {
        let segment = Arc::clone(&self.active.segment);
        let offsets = segment
            .offsets
            .take_growth()
            .map(|r| r.map_err(io_at(segment.offsets.path())));
        let times = segment
            .times
            .take_growth()
            .map(|r| r.map_err(io_at(segment.times.path())));
        let outcome = match (offsets, times) {
            (Some(Err(e)), _) | (_, Some(Err(e))) => Err(e),
            (None, None) => return,
            _ => Ok(()),
        };
        let _ = self.deferred(Deferred::IndexGrowth, outcome);
    }

    /// Writes staged batches, makes them durable as the policy says (fsync: one fsync
    /// for all of them) and publishes them to readers. Returns the new high watermark.
    pub fn commit(&mut self) -> Result<u64> {
        self.check_poisoned()?;
        self.guard(|log| {
            log.write_staged()?;
            // Under `interval`, also sync once a checkpoint interval has been written, so
            // recovery never scans more than that. Under `none` nothing is synced before
            // the segment rolls: an fsync here would stall appends (measured: -15% of
            // append bandwidth), and recovery scans the unflushed tail, which under
            // `none` is the active segment.
            let unchecked = log.active.written - log.active.checkpointed;
            let due = match log.config.durability {
                Durability::Fsync => true,
                Durability::Interval(every) => {
                    log.last_sync.elapsed() >= every
                        || unchecked >= log.config.checkpoint_interval_bytes
                }
                Durability::None => false,
            };
            if due {
                log.sync()?;
            }
            log.publish();
            Ok(log.active.next_offset)
        })
        .inspect(|_| self.seal_unsealed())
    }

    /// Whether a [`Log::commit`] now would do nothing: nothing is staged, nothing
    /// written waits for an interval fsync, and no deferred upkeep waits for its retry.
    /// An idle log needs no maintenance ticks until it is written to again; a poisoned
    /// one is never idle.
    pub fn idle(&self) -> bool {
        let active = &self.active;
        let syncs = self.config.durability != Durability::None;
        // A poisoned log is not idle: the next commit reports the poisoning to its owner.
        !self.poisoned
            && active.staged.is_empty()
            && (!syncs || (active.synced == active.written && !self.checkpoint_stale))
            && self.unsealed.is_empty()
    }

    /// [`Log::write`] then [`Log::commit`]: under the fsync policy the batch is on disk
    /// when this returns.
    pub fn append(&mut self, batch: &[u8]) -> Result<AppendInfo> {
        let info = self.write(batch)?;
        self.commit()?;
        Ok(info)
    }

    /// Writes, fsyncs and publishes everything, whatever the policy, and records a
    /// checkpoint so recovery starts from here.
    pub fn flush(&mut self) -> Result<()> {
        self.check_poisoned()?;
        self.guard(|log| {
            log.write_staged()?;
            log.sync()?;
            log.publish();
            if log.active.checkpointed != log.active.written || log.checkpoint_stale {
                log.checkpoint();
            }
            Ok(())
        })?;
        self.seal_unsealed();
        Ok(())
    }

    /// Flushes and closes the log, marking it clean so the next open skips recovery.
    /// A sealed segment whose indexes still cannot be trimmed is left as it is: the next
    /// open finds them untrimmed and rebuilds them.
    pub fn close(mut self) -> Result<()> {
        self.flush()?;
        let active = &mut self.active;
        active.index.finish(&active.segment);
        active.segment.seal_indexes()?;
        self.write_checkpoint(true)
    }

    /// Deletes the oldest sealed segments that retention no longer keeps: those whose
    /// newest record is older than `retention_ms` before `now_ms`, and those that take
    /// the log over `retention_bytes`. The active segment is never deleted. Returns how
    /// many segments were deleted.
    pub fn apply_retention(&mut self, now_ms: i64) -> Result<usize> {
        self.check_poisoned()?;
        // Rolling by age is otherwise checked on append only: without this, the last
        // segment of a partition nobody writes to would never roll, so never expire.
        // A roll that cannot open its files (kept for its retry, and reported with the
        // upkeep failures) must not stop the deletions: on a full disk they are what frees
        // the space.
        if self.active.next_offset != self.active.segment.base_offset && self.active_is_old(now_ms)
        {
            match self.guard(|log| log.roll()) {
                Ok(()) | Err(Error::RollFailed { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        let segments = self.reader.shared.segments();
        let sealed = &segments[..segments.len() - 1];
        let mut expired = 0;
        if let Some(ms) = self.config.retention_ms {
            let cutoff = now_ms.saturating_sub(millis(ms));
            expired = sealed
                .iter()
                .take_while(|s| s.max_timestamp() < cutoff)
                .count();
        }
        if let Some(max_bytes) = self.config.retention_bytes {
            let mut total = self.size_bytes();
            let mut oversize = 0;
            for segment in sealed {
                let len = segment.readable_len();
                if total - len < max_bytes {
                    break;
                }
                total -= len;
                oversize += 1;
            }
            expired = expired.max(oversize);
        }
        self.delete_oldest(&segments, expired)
    }

    /// The earliest time (ms since the epoch) at which [`Log::apply_retention`] could
    /// do anything, as the log stands: roll a non-empty active segment that reached
    /// `segment_ms`, or delete the oldest sealed segment once its newest record is older
    /// than `retention_ms`; `i64::MIN` when the log is over `retention_bytes` by its oldest
    /// sealed segment, `i64::MAX` when nothing but a write can give it work. Writes and
    /// retention change the answer; the passing of time does not.
    pub fn retention_due_ms(&self) -> i64 {
        let mut due = i64::MAX;
        let active = &self.active;
        if let Some(ms) = self.config.segment_ms {
            if active.next_offset != active.segment.base_offset {
                due = due.min(active.created_ms.saturating_add(millis(ms)));
            }
        }
        let segments = self.reader.shared.segments();
        if let Some(oldest) = segments[..segments.len() - 1].first() {
            // Size changes only by writes and deletions, after which this is asked again.
            if let Some(max_bytes) = self.config.retention_bytes {
                if self.size_bytes() - oldest.readable_len() >= max_bytes {
                    return i64::MIN;
                }
            }
            if let Some(ms) = self.config.retention_ms {
                let expires = oldest
                    .max_timestamp()
                    .saturating_add(millis(ms))
                    .saturating_add(1);
                due = due.min(expires);
            }
        }
        due
    }

    /// Deletes the sealed segments that hold only offsets below `offset`, for a log
    /// whose older records a later snapshot has made redundant (the broker's
    /// committed-offsets log). The active segment is never deleted. Returns how many
    /// segments were deleted.
    pub fn delete_before(&mut self, offset: u64) -> Result<usize> {
        self.check_poisoned()?;
        let segments = self.reader.shared.segments();
        // A sealed segment ends where the next one begins.
        let below = segments
            .windows(2)
            .take_while(|pair| pair[1].base_offset <= offset)
            .count();
        self.delete_oldest(&segments, below)
    }

    /// Deletes the first `count` segments, which must all be sealed.
    fn delete_oldest(&mut self, segments: &[Arc<Segment>], count: usize) -> Result<usize> {
        let expired = count.min(segments.len() - 1);
        if expired == 0 {
            return Ok(0);
        }
        self.reader
            .shared
            .set_segments(segments[expired..].to_vec());
        // Indexes still waiting to be trimmed go with their segments.
        let deleted = &segments[..expired];
        self.unsealed
            .retain(|s| !deleted.iter().any(|d| Arc::ptr_eq(d, s)));
        // Oldest first, log file first: a crash part way leaves a log that starts at a
        // later segment, and index files without a log, which open removes.
        for segment in &segments[..expired] {
            for ext in [LOG_EXT, INDEX_EXT, TIME_INDEX_EXT] {
                remove_if_exists(&segment_path(
                    &self.reader.shared.dir,
                    segment.base_offset,
                    ext,
                ))?;
            }
        }
        sync_dir(&self.reader.shared.dir)?;
        Ok(expired)
    }

    /// Bytes in all segments, staged batches included.
    pub fn size_bytes(&self) -> u64 {
        let segments = self.reader.shared.segments();
        let sealed: u64 = segments[..segments.len() - 1]
            .iter()
            .map(|s| s.readable_len())
            .sum();
        sealed + self.active.end()
    }

    fn check_poisoned(&self) -> Result<()> {
        if self.poisoned {
            return Err(Error::Poisoned {
                path: self.reader.shared.dir.clone(),
            });
        }
        Ok(())
    }

    /// Runs a step that touches files; if it fails, the log's state on disk is unknown
    /// (a failed fsync may have dropped dirty pages), so refuse further writes. A failed
    /// roll is the exception: it wrote nothing and left the active segment as it was.
    fn guard<T>(&mut self, step: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        let result = step(self);
        if result
            .as_ref()
            .is_err_and(|e| !matches!(e, Error::RollFailed { .. }))
        {
            self.poisoned = true;
        }
        result
    }

    fn should_roll(&self, batch_bytes: usize, record_count: u64) -> bool {
        let active = &self.active;
        let segment = &active.segment;
        if active.next_offset == segment.base_offset {
            return false;
        }
        let too_big = active.end() + batch_bytes as u64 > self.config.segment_bytes_max;
        let index_full = segment.offsets.is_nearly_full_after_growing()
            || segment.times.is_nearly_full_after_growing();
        let offsets_full =
            active.next_offset + record_count - segment.base_offset > u64::from(u32::MAX);
        too_big || index_full || offsets_full || self.active_is_old(now_ms())
    }

    /// True when the active segment is older than `segment_ms` at `now` (ms).
    fn active_is_old(&self, now: i64) -> bool {
        self.config
            .segment_ms
            .is_some_and(|ms| now.saturating_sub(self.active.created_ms) >= millis(ms))
    }

    /// Seals the active segment and starts a new one at the next offset.
    ///
    /// Only writing and fsyncing the old segment's data can fail-stop the log (an I/O
    /// error, which `guard` turns into poisoning). Everything after that writes no data
    /// the log depends on, so a failure there is not fatal:
    /// - flushing the old segment's indexes or creating the new segment's files (EMFILE,
    ///   ENFILE, ENOMEM, ENOSPC) fails the roll with [`Error::RollFailed`]: whatever was
    ///   created is removed, the active segment stays as it was and takes writes, and
    ///   the next write that needs a roll tries again;
    /// - trimming the old segment's indexes and the new checkpoint are retried later
    ///   ([`Deferred`]).
    fn roll(&mut self) -> Result<()> {
        // A failed growth may be why the segment rolls: report it while it is the
        // active one's.
        self.report_index_growth();
        self.write_staged()?;
        self.sync()?;
        self.publish();
        let base = self.active.next_offset;
        let dir = self.reader.shared.dir.clone();
        // The old segment's indexes are made durable before any file names the new
        // segment: from then on a restart treats the old segment as sealed.
        let old = &mut self.active;
        old.index.finish(&old.segment);
        let flushed = old.segment.sync_indexes().map_err(|e| roll_failed(base, e));
        let created = flushed.and_then(|()| create_next(&dir, base, &self.config));
        let (segment, file) = match created {
            Ok(created) => created,
            // The removal of a half-made segment failed: not retryable.
            Err(e @ Error::Io { .. }) => return Err(e),
            Err(e) => return self.deferred(Deferred::Roll, Err(e)),
        };
        self.failing[Deferred::Roll.slot()] = false;
        // The new segment's indexes start a run of growths of their own.
        self.failing[Deferred::IndexGrowth.slot()] = false;
        let segment = Arc::new(segment);
        let mut segments = self.reader.shared.segments().to_vec();
        segments.push(Arc::clone(&segment));
        self.reader.shared.set_segments(segments);
        let old = std::mem::replace(
            &mut self.active,
            Active {
                index: IndexState::resume(&segment, 0, i64::MIN),
                segment,
                file,
                written: 0,
                synced: 0,
                checkpointed: 0,
                staged: Vec::new(),
                next_offset: base,
                created_ms: now_ms(),
            },
        );
        self.unsealed.push(old.segment);
        self.seal_unsealed();
        self.checkpoint();
        Ok(())
    }

    /// Trims and fsyncs the indexes of sealed segments that still need it; those that
    /// fail stay listed and are tried again at the next commit. Until then a crash
    /// leaves them untrimmed, and the next open rebuilds them (6.4 of the format).
    fn seal_unsealed(&mut self) {
        if self.unsealed.is_empty() {
            return;
        }
        let mut result = Ok(());
        let mut unsealed = std::mem::take(&mut self.unsealed);
        unsealed.retain(|segment| match segment.seal_indexes() {
            Ok(()) => false,
            Err(e) => {
                if result.is_ok() {
                    result = Err(e);
                }
                true
            }
        });
        self.unsealed = unsealed;
        // Recorded for the caller; nothing more to do until the next try.
        let _ = self.deferred(Deferred::IndexSeal, result);
    }

    /// Flushes the active segment's indexes and writes a checkpoint. A failure is
    /// deferred: the data is durable without it, a crash only makes recovery scan more,
    /// and the next sync tries again.
    fn checkpoint(&mut self) {
        let result = self
            .sync_indexes()
            .and_then(|()| self.write_checkpoint(false));
        self.checkpoint_stale = result.is_err();
        // Recorded for the caller; `checkpoint_stale` makes the next sync retry.
        let _ = self.deferred(Deferred::Checkpoint, result);
    }

    fn write_staged(&mut self) -> Result<()> {
        let active = &mut self.active;
        if active.staged.is_empty() {
            return Ok(());
        }
        let path = &active.segment.log_path;
        fault::write_all_at(&active.file, path, &active.staged, active.written)
            .map_err(io_at(path))?;
        active.written += active.staged.len() as u64;
        active.staged.clear();
        Ok(())
    }

    /// Fsyncs written data and, every `checkpoint_interval_bytes`, the indexes and a new
    /// checkpoint.
    fn sync(&mut self) -> Result<()> {
        let active = &mut self.active;
        if active.synced < active.written {
            let started = Instant::now();
            if let Err(e) = fault::sync_data(&active.file, &active.segment.log_path) {
                return Err(sync_failed(active, e));
            }
            active.synced = active.written;
            if self.fsyncs.len() < FSYNCS_KEPT_MAX {
                self.fsyncs.push(started.elapsed());
            }
        }
        self.last_sync = Instant::now();
        if self.checkpoint_stale
            || active.written - active.checkpointed >= self.config.checkpoint_interval_bytes
        {
            self.checkpoint();
        }
        Ok(())
    }

    fn sync_indexes(&self) -> Result<()> {
        self.active.segment.sync_indexes()
    }

    /// Makes everything written visible to readers. Under the fsync policy it is only
    /// called once written data is synced.
    fn publish(&self) {
        let active = &self.active;
        debug_assert!(active.staged.is_empty(), "publishing with staged batches");
        debug_assert!(
            self.config.durability != Durability::Fsync || active.synced == active.written,
            "publishing unsynced data under the fsync policy"
        );
        active
            .segment
            .publish(active.written, active.index.max_timestamp);
        self.reader
            .shared
            .high_watermark
            .store(active.next_offset, Ordering::Release);
    }

    /// Records the active segment's durable state. The caller has written and synced
    /// the segment and its indexes up to `written`.
    fn write_checkpoint(&mut self, clean: bool) -> Result<()> {
        let active = &mut self.active;
        assert!(active.staged.is_empty() && active.synced == active.written);
        let checkpoint = Checkpoint {
            clean,
            segment_base: active.segment.base_offset,
            position: active.written,
            next_offset: active.next_offset,
            offset_entries: active.segment.offsets.len() as u32,
            time_entries: active.segment.times.len() as u32,
            max_timestamp: active.index.max_timestamp,
            segment_created_ms: active.created_ms,
        };
        let dir = &self.reader.shared.dir;
        checkpoint
            .write(dir)
            .map_err(io_at(&dir.join(CHECKPOINT_FILE)))?;
        active.checkpointed = active.written;
        Ok(())
    }
}

/// The error of a failed fsync of the active segment, after cutting what it may have
/// lost and nobody was told about.
///
/// After a failed fsync the kernel may have dropped the dirty pages or marked them clean
/// without writing them: bytes after `synced` read back fine now and can be gone after a
/// power loss. Bytes that were never published (under `fsync`, everything unsynced) are
/// cut, so recovery cannot turn batches whose producers got an error into records.
/// Published bytes are kept whatever the policy: under `interval` and `none` they were
/// acknowledged and may have been served, and cutting them would make later reads of
/// their offsets fail and a restart give the offsets to new records. The log is poisoned
/// next (fail-stop); a restart runs recovery, which keeps whatever reached the disk.
fn sync_failed(active: &Active, e: io::Error) -> Error {
    let path = &active.segment.log_path;
    let keep = active.synced.max(active.segment.readable_len());
    if keep < active.written {
        if let Err(cut) = fault::set_len(&active.file, path, keep) {
            // Not ignored: the error says the unacknowledged tail may come back.
            return Error::Io {
                path: path.clone(),
                source: io::Error::new(
                    e.kind(),
                    format!(
                        "fsync failed ({e}), then cutting the {} unacknowledged bytes after \
                         byte {keep} failed too ({cut}): after a restart, recovery may keep \
                         batches whose producers were told they failed",
                        active.written - keep
                    ),
                ),
            };
        }
    }
    io_at(path)(e)
}

impl LogReader {
    /// The first offset still in the log.
    pub fn earliest_offset(&self) -> u64 {
        self.shared.segments()[0].base_offset
    }

    /// The offset after the last published batch: readers see every offset below it.
    pub fn high_watermark(&self) -> u64 {
        self.shared.high_watermark.load(Ordering::Acquire)
    }

    /// Number of segments, the active one included.
    pub fn segment_count(&self) -> usize {
        self.shared.segments().len()
    }

    /// Bytes of published data in all segments.
    pub fn size_bytes(&self) -> u64 {
        self.shared
            .segments()
            .iter()
            .map(|s| s.readable_len())
            .sum()
    }

    /// The partition directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Reads whole batches starting with the one that holds `from`, up to about
    /// `max_bytes` (always at least one batch, so a large batch cannot stall a reader).
    /// Reading at the high watermark returns no batches; outside
    /// `[earliest, high watermark]` it is [`Error::OffsetOutOfRange`].
    pub fn read(&self, from: u64, max_bytes: usize) -> Result<ReadResult> {
        let high_watermark = self.high_watermark();
        let segments = self.shared.segments();
        let earliest_offset = segments[0].base_offset;
        if from < earliest_offset || from > high_watermark {
            return Err(Error::OffsetOutOfRange {
                requested: from,
                earliest: earliest_offset,
                latest: high_watermark,
            });
        }
        let mut result = ReadResult {
            batches: Vec::new(),
            next_offset: from,
            high_watermark,
            earliest_offset,
        };
        let first = segments.partition_point(|s| s.base_offset <= from) - 1;
        for (i, segment) in segments.iter().enumerate().skip(first) {
            let full = !result.batches.is_empty() && result.batches.len() >= max_bytes;
            if result.next_offset >= high_watermark || full {
                break;
            }
            let kept = result.batches.len();
            match self.read_segment(segment, max_bytes, &mut result) {
                // A segment that ends before the next one begins (a short or missing
                // file): the next read starts in the hole and reports it.
                Ok(true)
                    if segments
                        .get(i + 1)
                        .is_some_and(|s| s.base_offset != result.next_offset) =>
                {
                    break
                }
                Ok(true) => {}
                Ok(false) => break,
                // Good batches before damage are returned; the next read, which starts
                // at the damage, gets the error.
                Err(Error::Corrupted { .. }) if kept > 0 => {
                    result.batches.truncate(kept);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(result)
    }

    /// Appends batches from `segment`, starting at `result.next_offset`. Returns true
    /// when it read to the segment's end, so the read may go on in the next segment.
    fn read_segment(
        &self,
        segment: &Arc<Segment>,
        max_bytes: usize,
        result: &mut ReadResult,
    ) -> Result<bool> {
        let from = result.next_offset;
        let high_watermark = result.high_watermark;
        let readable = segment.readable_len();
        let file = self.open(segment, from)?;

        // Find the batch holding `from`: index, then a short walk over headers.
        let mut position = self.index_position(segment, from)?;
        let first = loop {
            if position + BATCH_HEADER_LEN as u64 > readable {
                return Err(missing(segment, from, position));
            }
            let header = segment.read_header(&file, position)?;
            if header.last_offset() >= from {
                break header;
            }
            position += header.size as u64;
        };
        if first.base_offset > from {
            return Err(missing(segment, from, position));
        }
        if first.base_offset >= high_watermark {
            return Ok(false);
        }
        let budget = max_bytes.saturating_sub(result.batches.len());
        if !result.batches.is_empty() && first.size > budget {
            return Ok(false);
        }
        let want = (budget.max(first.size) as u64).min(readable - position) as usize;
        let start = result.batches.len();
        result.batches.resize(start + want, 0);
        fault::read_exact_at(
            &file,
            &segment.log_path,
            &mut result.batches[start..],
            position,
        )
        .map_err(io_at(&segment.log_path))?;

        // Keep whole, checked batches below the high watermark.
        let mut kept = 0;
        let mut rest = &result.batches[start..];
        let mut expected = first.base_offset;
        let mut damage = None;
        while rest.len() >= BATCH_HEADER_LEN {
            let at = position + kept as u64;
            let header = match BatchHeader::parse(rest) {
                Ok(header) => header,
                Err(e) => {
                    damage = Some(segment.corrupted(at, e.to_string()));
                    break;
                }
            };
            if header.base_offset >= high_watermark || header.size > rest.len() {
                break;
            }
            let (batch, tail) = match Batch::split_first(rest) {
                Ok(split) => split,
                Err(e) => {
                    damage = Some(segment.corrupted(at, e.to_string()));
                    break;
                }
            };
            if batch.header().base_offset != expected {
                damage = Some(segment.corrupted(
                    at,
                    format!(
                        "batch has base offset {} where {expected} was expected",
                        batch.header().base_offset
                    ),
                ));
                break;
            }
            expected = batch.header().next_offset();
            kept += batch.as_bytes().len();
            rest = tail;
        }
        result.batches.truncate(start + kept);
        if kept == 0 {
            return Err(damage.unwrap_or_else(|| {
                segment.corrupted(position, "batch runs past the published end".into())
            }));
        }
        result.next_offset = expected;
        // Stop before damage: the good batches are returned, and the next read starts
        // at the damage and gets the error.
        Ok(damage.is_none() && position + kept as u64 == readable)
    }

    /// The segment's read handle.
    fn open(&self, segment: &Arc<Segment>, from: u64) -> Result<Arc<fs::File>> {
        segment
            .file(&self.shared.files)
            .map_err(|e| self.gone_if_deleted(e, from))
    }

    /// Where to start looking for `offset` in the segment, mapping its index if needed.
    fn index_position(&self, segment: &Arc<Segment>, offset: u64) -> Result<u64> {
        segment
            .index_position(&self.shared.files, offset)
            .map_err(|e| self.gone_if_deleted(e, offset))
    }

    /// A segment file that is gone was deleted by retention since the reader took its
    /// snapshot of the segments: the requested offset is now out of range.
    fn gone_if_deleted(&self, e: Error, requested: u64) -> Error {
        match e {
            Error::Io { source, .. } if source.kind() == io::ErrorKind::NotFound => {
                Error::OffsetOutOfRange {
                    requested,
                    earliest: self.earliest_offset(),
                    latest: self.high_watermark(),
                }
            }
            other => other,
        }
    }

    /// The timestamp of the first record of the batch that holds `offset` (the time it
    /// was written, for a consumer's lag in time), reading only that batch's header.
    /// `None` at or past the high watermark; [`Error::OffsetOutOfRange`] below the log
    /// start.
    pub fn batch_timestamp(&self, offset: u64) -> Result<Option<i64>> {
        let high_watermark = self.high_watermark();
        let segments = self.shared.segments();
        if offset < segments[0].base_offset {
            return Err(Error::OffsetOutOfRange {
                requested: offset,
                earliest: segments[0].base_offset,
                latest: high_watermark,
            });
        }
        if offset >= high_watermark {
            return Ok(None);
        }
        let segment = &segments[segments.partition_point(|s| s.base_offset <= offset) - 1];
        let file = self.open(segment, offset)?;
        let readable = segment.readable_len();
        let mut position = self.index_position(segment, offset)?;
        while position + BATCH_HEADER_LEN as u64 <= readable {
            let header = segment.read_header(&file, position)?;
            if header.last_offset() >= offset {
                return Ok(Some(header.base_timestamp));
            }
            position += header.size as u64;
        }
        Err(missing(segment, offset, position))
    }

    /// The first offset, in log order, whose record timestamp is at or after
    /// `timestamp`, searched up to the high watermark loaded when the call began. When
    /// no record below it is that new, the answer is that high watermark: not one loaded
    /// later, which could be past records appended meanwhile that match.
    pub fn offset_for_timestamp(&self, timestamp: i64) -> Result<TimestampLookup> {
        let high_watermark = self.high_watermark();
        let found = self.find_timestamp(timestamp, high_watermark)?;
        Ok(TimestampLookup {
            found,
            high_watermark,
        })
    }

    fn find_timestamp(&self, timestamp: i64, high_watermark: u64) -> Result<Option<u64>> {
        let segments = self.shared.segments();
        let mut buf = Vec::new();
        // The records of a compressed batch, decompressed (one buffer for the lookup).
        let mut scratch = Vec::new();
        for segment in segments.iter() {
            if segment.max_timestamp() < timestamp {
                continue;
            }
            let start = segment
                .time_index_offset(&self.shared.files, timestamp)
                .map_err(|e| self.gone_if_deleted(e, segment.base_offset))?;
            let file = self.open(segment, start)?;
            let readable = segment.readable_len();
            let mut position = self.index_position(segment, start)?;
            while position + BATCH_HEADER_LEN as u64 <= readable {
                let header = segment.read_header(&file, position)?;
                if header.base_offset >= high_watermark {
                    return Ok(None);
                }
                if header.max_timestamp >= timestamp {
                    // Check the length field before trusting it with an allocation.
                    if position + header.size as u64 > readable {
                        return Err(segment.corrupted(
                            position,
                            format!(
                                "batch of {} bytes runs past the segment's {readable} bytes",
                                header.size
                            ),
                        ));
                    }
                    buf.resize(header.size, 0);
                    fault::read_exact_at(&file, &segment.log_path, &mut buf, position)
                        .map_err(io_at(&segment.log_path))?;
                    let batch =
                        Batch::new(&buf).map_err(|e| segment.corrupted(position, e.to_string()))?;
                    let records = batch
                        .records_with(&mut scratch)
                        .map_err(|e| segment.corrupted(position, e.to_string()))?;
                    for record in records {
                        let record =
                            record.map_err(|e| segment.corrupted(position, e.to_string()))?;
                        if record.timestamp >= timestamp {
                            return Ok(Some(record.offset));
                        }
                    }
                }
                position += header.size as u64;
            }
        }
        Ok(None)
    }
}

/// The error for an offset below the high watermark that the segment which should hold
/// it does not: its file is short, or the segment holding it is missing.
fn missing(segment: &Segment, offset: u64, position: u64) -> Error {
    segment.corrupted(
        position,
        format!(
            "offset {offset} is below the high watermark but the segment ends before it: \
             the segment file is short or a segment file after it is missing (restore the \
             partition directory from a backup or a replica)"
        ),
    )
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn sync_dir(dir: &Path) -> Result<()> {
    fault::sync_dir(dir).map_err(io_at(dir))
}

/// A duration in ms as an `i64` for time arithmetic, saturating at `i64::MAX`.
fn millis(ms: u64) -> i64 {
    ms.min(i64::MAX as u64) as i64
}

/// Creates `dir` and its missing ancestors, fsyncing the parent of every level it
/// creates, so that after a crash the whole path is there, not only its last level.
pub fn create_dir_all_durable(dir: &Path) -> Result<()> {
    let mut missing = Vec::new();
    let mut level = dir;
    while !level.as_os_str().is_empty() && !level.is_dir() {
        missing.push(level);
        match level.parent() {
            Some(parent) => level = parent,
            None => break,
        }
    }
    for level in missing.into_iter().rev() {
        match fault::create_dir(level) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && level.is_dir() => {}
            result => result.map_err(io_at(level))?,
        }
        let parent = match level.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        sync_dir(parent)?;
    }
    Ok(())
}

fn remove_if_exists(path: &Path) -> Result<()> {
    match fault::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_at(path)(e)),
        _ => Ok(()),
    }
}

/// Base offsets of the segments in `dir`, ascending. Index files whose log is gone (a
/// crash during retention) are removed.
fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let mut logs = Vec::new();
    let mut indexes = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_at(dir))? {
        let entry = entry.map_err(io_at(dir))?;
        let name = entry.file_name();
        let Some((stem, ext)) = name.to_str().and_then(|n| n.split_once('.')) else {
            continue;
        };
        let Some(base) = (stem.len() == 20)
            .then(|| stem.parse::<u64>().ok())
            .flatten()
        else {
            continue;
        };
        match ext {
            LOG_EXT => logs.push(base),
            INDEX_EXT | TIME_INDEX_EXT => indexes.push(entry.path()),
            _ => {}
        }
    }
    logs.sort_unstable();
    for path in indexes {
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse().ok());
        if stem.is_some_and(|base| logs.binary_search(&base).is_err()) {
            remove_if_exists(&path)?;
        }
    }
    Ok(logs)
}

/// Creates the files of the segment that follows the active one, at `base`, and makes
/// their names durable. On failure, removes what it created, so the directory names no
/// segment past the active one and that segment can keep taking writes: the error is
/// then [`Error::RollFailed`]. If a created `.log` cannot be removed (and the removal
/// made durable), the error is an I/O error: a restart would take the empty file for the
/// active segment, so the old one must take no more writes.
fn create_next(dir: &Path, base: u64, config: &LogConfig) -> Result<(Segment, fs::File)> {
    let log_path = segment_path(dir, base, LOG_EXT);
    let mut log_created = false;
    let created = create_segment(dir, base, config).and_then(|segment| {
        let file = open_for_write(&log_path, true)?;
        log_created = true;
        sync_dir(dir)?;
        Ok((segment, file))
    });
    // Dropped (closed and unmapped) by now on failure.
    let e = match created {
        Ok(created) => return Ok(created),
        Err(e) => e,
    };
    // Index files without their log are harmless: open removes them (2.3).
    for ext in [INDEX_EXT, TIME_INDEX_EXT] {
        let _ = remove_if_exists(&segment_path(dir, base, ext));
    }
    if log_created {
        if let Err(undo) = remove_if_exists(&log_path).and_then(|()| sync_dir(dir)) {
            return Err(Error::Io {
                path: log_path,
                source: io::Error::other(format!(
                    "starting a new segment failed ({e}), then removing its empty file \
                     failed too ({undo}): the log takes no more writes until a restart"
                )),
            });
        }
    }
    Err(roll_failed(base, e))
}

/// The error of a roll that failed before writing to the new segment.
fn roll_failed(base: u64, e: Error) -> Error {
    match e {
        Error::Io { path, source } => Error::RollFailed {
            path,
            base_offset: base,
            source,
        },
        other => other,
    }
}

fn create_segment(dir: &Path, base: u64, config: &LogConfig) -> Result<Segment> {
    let index_path = segment_path(dir, base, INDEX_EXT);
    let time_path = segment_path(dir, base, TIME_INDEX_EXT);
    let offsets =
        Index::open_writable(&index_path, 0, config.index_bytes_max).map_err(io_at(&index_path))?;
    let times =
        Index::open_writable(&time_path, 0, config.index_bytes_max).map_err(io_at(&time_path))?;
    Ok(Segment::new(dir, base, offsets, times, 0, i64::MIN))
}

/// Opens a sealed segment, trusting its indexes after a cheap check of their last
/// entries (read with `pread`: the indexes are mapped only when read) and rebuilding
/// them from the log when that check fails. Leaves no file open and nothing mapped.
/// Returns the segment and whether it is damaged: it does not hold exactly the offsets
/// from its base to `next_base` in whole batches (a short or missing file, bit rot).
/// Only the whole batches before the damage are readable; reads of the others report
/// [`Error::Corrupted`].
fn open_sealed(
    dir: &Path,
    base: u64,
    next_base: u64,
    config: &LogConfig,
) -> Result<(Segment, bool)> {
    let log_path = segment_path(dir, base, LOG_EXT);
    let log_len = fs::metadata(&log_path).map_err(io_at(&log_path))?.len();
    let span = next_base - base;
    let index_path = segment_path(dir, base, INDEX_EXT);
    let time_path = segment_path(dir, base, TIME_INDEX_EXT);
    // Entries grow strictly along both indexes, so an index that was never trimmed (a
    // crash or failure before its seal) ends in two equal zero slots and is rebuilt.
    let offsets = open_sealed_index::<OffsetEntry>(&index_path)?.filter(|(_, tail)| {
        tail.last()
            .is_some_and(|e| u64::from(e.position) < log_len && u64::from(e.relative_offset) < span)
            && last_two(tail).is_none_or(|(a, b)| a.relative_offset < b.relative_offset)
    });
    // An empty time index is valid: every record may carry timestamp i64::MIN.
    let times = open_sealed_index::<TimeEntry>(&time_path)?.filter(|(_, tail)| {
        tail.last()
            .is_none_or(|e| u64::from(e.relative_offset) < span)
            && last_two(tail).is_none_or(|(a, b)| a.timestamp < b.timestamp)
    });
    if let (Some((offsets, offsets_tail)), Some((times, times_tail))) = (offsets, times) {
        let max_timestamp = times_tail.last().map_or(i64::MIN, |e| e.timestamp);
        let last_indexed = offsets_tail.last().map_or(0, |e| u64::from(e.position));
        let segment = Segment::new(dir, base, offsets, times, log_len, max_timestamp);
        // Walk the headers after the last index entry: the last batch must end at the
        // file's end and just before the next segment's base offset.
        let file =
            fault::open(fs::OpenOptions::new().read(true), &log_path).map_err(io_at(&log_path))?;
        // Headers only, one small read each: the tail holds about
        // `index_interval_bytes` of batches, the last of which may be large.
        let mut position = last_indexed;
        let mut next_offset = None;
        let mut bytes = [0u8; BATCH_HEADER_LEN];
        while position + BATCH_HEADER_LEN as u64 <= log_len {
            fault::read_exact_at(&file, &log_path, &mut bytes, position)
                .map_err(io_at(&log_path))?;
            let Ok(header) = BatchHeader::parse(&bytes) else {
                // Damage inside: reads that reach it report it.
                return Ok((segment, true));
            };
            if position + header.size as u64 > log_len {
                break;
            }
            position += header.size as u64;
            next_offset = Some(header.next_offset());
        }
        let whole = position == log_len && next_offset == Some(next_base);
        if !whole {
            segment.publish(position, max_timestamp);
        }
        return Ok((segment, !whole));
    }

    // Rebuild both indexes with a full scan of this one segment.
    remove_if_exists(&index_path)?;
    remove_if_exists(&time_path)?;
    let segment = create_segment(dir, base, config)?;
    let file =
        fault::open(fs::OpenOptions::new().read(true), &log_path).map_err(io_at(&log_path))?;
    let mut index = IndexState::resume(&segment, 0, i64::MIN);
    // A sealed segment is never truncated (the next one starts at `next_base`), but
    // only its valid batches are readable: reads of offsets past damage, or missing
    // because the file is short, report corruption.
    let end = scan(&file, &segment, &mut index, 0, base, log_len, config)?;
    index.finish(&segment);
    segment.seal_indexes()?;
    segment.publish(end.position, index.max_timestamp);
    let whole = end.position == log_len && end.next_offset == next_base;
    Ok((segment, !whole))
}

/// The two entries of an index's tail, when it has two.
fn last_two<E: crate::index::Entry>(tail: &[E]) -> Option<(E, E)> {
    match tail {
        [a, b] => Some((*a, *b)),
        _ => None,
    }
}

/// A sealed index and its last (up to) two entries, `None` when missing or partial.
fn open_sealed_index<E: crate::index::Entry>(path: &Path) -> Result<Option<(Index<E>, Vec<E>)>> {
    match Index::open_sealed(path) {
        Ok(index) => Ok(index),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_at(path)(e)),
    }
}

/// Where a scan stopped: just after the last valid batch.
struct ScanEnd {
    position: u64,
    next_offset: u64,
}

/// Walks the batches of `file` from `position` (expected to hold `next_offset`),
/// checking each one's framing, CRC and offset continuity, and indexing it. Stops at
/// `end` or at the first batch that does not check out. Reads in large chunks.
fn scan(
    file: &fs::File,
    segment: &Segment,
    index: &mut IndexState,
    mut position: u64,
    mut next_offset: u64,
    end: u64,
    config: &LogConfig,
) -> Result<ScanEnd> {
    let mut chunk = Chunk {
        file,
        path: &segment.log_path,
        end,
        buf: Vec::new(),
        start: position,
    };
    while let Some(bytes) = chunk.get(position, BATCH_HEADER_LEN)? {
        let Ok(header) = BatchHeader::parse(bytes) else {
            break;
        };
        if header.base_offset != next_offset || header.record_count <= 0 {
            break;
        }
        match chunk.get(position, header.size)? {
            Some(bytes) if Batch::new(bytes).is_ok() => {}
            _ => break,
        }
        index.add(segment, &header, position, config.index_interval_bytes);
        position += header.size as u64;
        next_offset = header.next_offset();
    }
    Ok(ScanEnd {
        position,
        next_offset,
    })
}

/// A read-ahead window over a file, for sequential scans.
struct Chunk<'a> {
    file: &'a fs::File,
    path: &'a Path,
    /// Scans stop here.
    end: u64,
    buf: Vec<u8>,
    /// File position of `buf[0]`.
    start: u64,
}

impl Chunk<'_> {
    /// The `len` bytes at `position`, or `None` if they run past `end`.
    fn get(&mut self, position: u64, len: usize) -> Result<Option<&[u8]>> {
        if position + len as u64 > self.end {
            return Ok(None);
        }
        if position < self.start || position + len as u64 > self.start + self.buf.len() as u64 {
            let read = (len.max(SCAN_CHUNK_BYTES) as u64).min(self.end - position) as usize;
            self.buf.resize(read, 0);
            fault::read_exact_at(self.file, self.path, &mut self.buf, position)
                .map_err(io_at(self.path))?;
            self.start = position;
        }
        let at = (position - self.start) as usize;
        Ok(Some(&self.buf[at..at + len]))
    }
}

/// Opens the active segment, scanning its unflushed tail and truncating it at the first
/// invalid byte.
fn recover_active(
    dir: &Path,
    base: u64,
    checkpoint: Option<Checkpoint>,
    config: &LogConfig,
) -> Result<(Active, LogRecovery)> {
    let log_path = segment_path(dir, base, LOG_EXT);
    let file = open_for_write(&log_path, true)?;
    let file_len = file.metadata().map_err(io_at(&log_path))?.len();
    let capacity = |entry_len: usize| config.index_bytes_max / entry_len as u64;
    let trusted = checkpoint.filter(|c| {
        c.segment_base == base
            && c.position <= file_len
            && c.next_offset >= base
            && u64::from(c.offset_entries) <= capacity(crate::index::OFFSET_ENTRY_LEN)
            && u64::from(c.time_entries) <= capacity(crate::index::TIME_ENTRY_LEN)
    });
    let index_path = segment_path(dir, base, INDEX_EXT);
    let time_path = segment_path(dir, base, TIME_INDEX_EXT);
    let open = |offset_entries: usize, time_entries: usize| -> Result<Segment> {
        let offsets = Index::open_writable(&index_path, offset_entries, config.index_bytes_max)
            .map_err(io_at(&index_path))?;
        let times = Index::open_writable(&time_path, time_entries, config.index_bytes_max)
            .map_err(io_at(&time_path))?;
        Ok(Segment::new(dir, base, offsets, times, 0, i64::MIN))
    };

    // Trust the checkpointed prefix if its indexes agree with it; else start over.
    let mut start = (0, base, i64::MIN, now_ms());
    let mut segment = None;
    if let Some(c) = trusted {
        let s = open(c.offset_entries as usize, c.time_entries as usize)?;
        let offsets_ok = s.offsets.last().is_none_or(|e| {
            u64::from(e.position) < c.position
                && base + u64::from(e.relative_offset) < c.next_offset
        });
        let times_ok = s
            .times
            .last()
            .is_none_or(|e| base + u64::from(e.relative_offset) < c.next_offset);
        if offsets_ok && times_ok {
            start = (
                c.position,
                c.next_offset,
                c.max_timestamp,
                c.segment_created_ms,
            );
            segment = Some(s);
        }
    }
    let segment = match segment {
        Some(s) => s,
        None => open(0, 0)?,
    };
    let (position, next_offset, max_timestamp, created_ms) = start;
    let mut index = IndexState::resume(&segment, position, max_timestamp);
    let clean = trusted.is_some_and(|c| c.clean && c.position == file_len) && position == file_len;
    let end = if clean {
        ScanEnd {
            position,
            next_offset,
        }
    } else {
        scan(
            &file,
            &segment,
            &mut index,
            position,
            next_offset,
            file_len,
            config,
        )?
    };
    if end.position < file_len {
        fault::set_len(&file, &log_path, end.position).map_err(io_at(&log_path))?;
    }
    if !clean {
        fault::sync_data(&file, &log_path).map_err(io_at(&log_path))?;
        segment.sync_indexes()?;
    }
    segment.publish(end.position, index.max_timestamp);
    let recovery = LogRecovery {
        clean,
        truncated_bytes: file_len - end.position,
        recovered_to: end.next_offset,
        damaged_segments: 0,
    };
    let active = Active {
        segment: Arc::new(segment),
        file,
        written: end.position,
        synced: end.position,
        checkpointed: 0,
        staged: Vec::new(),
        next_offset: end.next_offset,
        index,
        created_ms,
    };
    Ok((active, recovery))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::{batches, BatchBuilder};

    fn small() -> LogConfig {
        LogConfig {
            segment_bytes_max: 1024,
            index_interval_bytes: 100,
            durability: Durability::None,
            ..LogConfig::default()
        }
    }

    fn batch(values: &[&str], timestamp: i64) -> Vec<u8> {
        let mut b = BatchBuilder::new();
        for v in values {
            b.push(timestamp, None, Some(v.as_bytes()), &[]);
        }
        b.finish()
    }

    /// Every record value readable from `from`, in order.
    fn values(reader: &LogReader, from: u64) -> Vec<(u64, String)> {
        let mut out = Vec::new();
        let mut offset = from;
        while offset < reader.high_watermark() {
            let result = reader.read(offset, 300).expect("read");
            for b in batches(&result.batches) {
                for r in b.expect("batch").records() {
                    let r = r.expect("record");
                    if r.offset >= offset {
                        out.push((
                            r.offset,
                            String::from_utf8_lossy(r.value.unwrap_or_default()).into(),
                        ));
                    }
                }
            }
            offset = result.next_offset;
        }
        out
    }

    /// Descriptors this process holds on files under `dir`.
    fn descriptors_under(dir: &Path) -> usize {
        let dir = dir.canonicalize().expect("canonical");
        fs::read_dir("/proc/self/fd")
            .expect("list descriptors")
            .filter_map(|entry| fs::read_link(entry.ok()?.path()).ok())
            .filter(|target| target.starts_with(&dir))
            .count()
    }

    /// Mappings of files under `dir` in this process.
    fn mappings_under(dir: &Path) -> usize {
        let dir = dir.canonicalize().expect("canonical");
        let dir = format!("{}/", dir.display());
        fs::read_to_string("/proc/self/maps")
            .expect("read mappings")
            .lines()
            .filter(|line| line.contains(&dir))
            .count()
    }

    /// Issue 16 (10,000 partitions per node): after open, a log with many sealed
    /// segments holds one descriptor (the active `.log`) and two mappings (the active
    /// indexes), whether it was closed cleanly or recovered, and whether its sealed
    /// indexes were trusted or rebuilt.
    #[test]
    fn an_open_log_holds_one_descriptor_and_two_mappings() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = FileCache::with_mapped_max(4, 4);
        let mut log = Log::open(dir.path(), small(), &files).expect("open");
        for i in 0..100 {
            log.append(&batch(&["0123456789"; 4], i)).expect("append");
        }
        let sealed = log.reader().segment_count() - 1;
        assert!(sealed >= 10, "{sealed} sealed segments");
        assert_eq!(descriptors_under(dir.path()), 1, "while writing");
        assert_eq!(mappings_under(dir.path()), 2, "while writing");
        log.close().expect("close");
        assert_eq!(descriptors_under(dir.path()), 0);
        assert_eq!(mappings_under(dir.path()), 0);

        let log = Log::open(dir.path(), small(), &files).expect("clean reopen");
        assert!(log.recovery().clean);
        assert_eq!(descriptors_under(dir.path()), 1, "after a clean open");
        assert_eq!(mappings_under(dir.path()), 2, "after a clean open");
        drop(log);
        // Untrimmed indexes make the next open rebuild them.
        for base in [0, 1] {
            let base = list_segments(dir.path()).expect("list")[base];
            let path = segment_path(dir.path(), base, INDEX_EXT);
            let len = fs::metadata(&path).expect("index").len();
            fs::File::options()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(len + 16))
                .expect("untrim");
        }
        let log = Log::open(dir.path(), small(), &files).expect("unclean reopen");
        assert!(!log.recovery().clean);
        assert_eq!(descriptors_under(dir.path()), 1, "after recovery");
        assert_eq!(mappings_under(dir.path()), 2, "after recovery");
        assert_eq!(values(log.reader(), 0).len(), 400);
    }

    /// With room for one read handle and one segment's index mappings, reading every
    /// sealed segment, in order and back again, evicts and reloads them: reads stay
    /// right, and the log never holds more than the budgets allow.
    #[test]
    fn sealed_segments_read_right_after_eviction_with_a_cache_of_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = FileCache::with_mapped_max(1, 1);
        let mut log = Log::open(dir.path(), small(), &files).expect("open");
        let mut expected = Vec::new();
        for i in 0..60u64 {
            let v = format!("value-{i}-{}", "x".repeat(100));
            log.append(&batch(&[&v], i as i64)).expect("append");
            expected.push((i, v));
        }
        let reader = log.reader();
        assert!(reader.segment_count() > 5);
        let bases: Vec<u64> = reader
            .shared
            .segments()
            .iter()
            .map(|s| s.base_offset)
            .collect();
        for pass in 0..2 {
            let mut order = bases.clone();
            if pass == 1 {
                order.reverse();
            }
            for base in order {
                assert_eq!(
                    values(reader, base),
                    expected[base as usize..],
                    "from {base}"
                );
                assert_eq!(
                    reader.batch_timestamp(base).expect("timestamp"),
                    Some(base as i64)
                );
                assert_eq!(
                    reader
                        .offset_for_timestamp(base as i64)
                        .expect("lookup")
                        .found,
                    Some(base)
                );
                assert!(files.open_count() <= 1 && files.mapped_count() <= 1);
                // The active segment's .log and indexes, plus one sealed segment's
                // read handle and index mappings.
                assert!(descriptors_under(dir.path()) <= 2);
                assert!(mappings_under(dir.path()) <= 4);
            }
        }
        assert_eq!(
            files.mapped_count(),
            1,
            "sealed indexes were mapped and evicted"
        );
    }

    /// An index that cannot grow (its file cannot be opened: no descriptor left) loses
    /// nothing and fail-stops nothing: the segment counts as full, so the next write
    /// rolls, and while files still cannot be opened that write gets the retryable
    /// `RollFailed`. Once they can, the index grows at the next write (a passing
    /// shortage costs no roll), and every batch is there.
    #[test]
    fn an_index_that_cannot_grow_refuses_writes_only_while_files_cannot_open() {
        use crate::fault::{Fault, Injector, Op};
        let dir = tempfile::tempdir().expect("tempdir");
        let injector = Injector::new(dir.path()).expect("injector");
        // Every batch indexed, so the index outgrows its first page quickly.
        let config = LogConfig {
            segment_bytes_max: 1 << 20,
            index_interval_bytes: 1,
            ..small()
        };
        let mut log = Log::open(injector.root(), config, &FileCache::new(4)).expect("open");
        let first_page = crate::index::GROW_BYTES / crate::index::TIME_ENTRY_LEN;
        let mut id = 0;
        let mut append = |log: &mut Log| {
            id += 1;
            log.append(&batch(&["v"], id))
        };
        while log.active.segment.times.len() + 4 < first_page {
            append(&mut log).expect("append");
        }
        injector.fail_from(Op::Open, 1, Fault::too_many_open_files());
        let mut refused = 0;
        for _ in 0..8 {
            match append(&mut log) {
                Ok(_) => {}
                Err(Error::RollFailed { .. }) => refused += 1,
                Err(e) => panic!("only the roll may fail: {e:?}"),
            }
        }
        assert!(refused > 0, "the full index made the log roll");
        assert_eq!(log.reader().segment_count(), 1);
        // The failed growths are reported, the first of the run as such.
        let growths: Vec<_> = log
            .take_deferred_failures()
            .filter(|f| f.step == Deferred::IndexGrowth)
            .collect();
        assert!(!growths.is_empty());
        assert!(
            growths[0].first && growths[1..].iter().all(|f| !f.first),
            "{growths:?}"
        );
        assert!(growths[0].error.contains(".timeindex"), "{growths:?}");
        injector.clear();
        append(&mut log).expect("the index grows");
        assert_eq!(log.reader().segment_count(), 1);
        assert!(!log.active.segment.times.is_nearly_full(), "grown");
        let accepted = log.reader().high_watermark();
        assert_eq!(values(log.reader(), 0).len() as u64, accepted);
        log.close().expect("close");
    }

    /// A log closed cleanly opens again on a full disk (so retention can free space):
    /// allocating index slots is then left to a later write.
    #[test]
    fn a_clean_log_opens_on_a_full_disk() {
        use crate::fault::{Fault, Injector, Op};
        let dir = tempfile::tempdir().expect("tempdir");
        let injector = Injector::new(dir.path()).expect("injector");
        let mut log = Log::open(injector.root(), small(), &FileCache::new(4)).expect("open");
        log.append(&batch(&["v"], 1)).expect("append");
        log.close().expect("close");
        // The first write of an open allocates the offset index's slots; the checkpoint
        // rewritten later in place needs no new blocks on a real disk.
        injector.fail_nth(Op::Write, 1, Fault::no_space());
        let mut log = Log::open(injector.root(), small(), &FileCache::new(4))
            .expect("opens with the disk full");
        assert!(injector.injected() > 0, "an allocation was refused");
        assert_eq!(log.reader().high_watermark(), 1);
        injector.clear();
        log.append(&batch(&["w"], 2))
            .expect("writes once space is back");
        assert_eq!(values(log.reader(), 0).len(), 2);
    }

    /// Sealing opens each index file by path; when that open fails (no descriptor
    /// left), the seal is deferred and retried at the next commit, as any failed trim
    /// is, and the segment reads right meanwhile from the mapping it still holds.
    #[test]
    fn a_seal_that_cannot_open_its_index_is_retried() {
        use crate::fault::{Fault, Injector, Op};
        let dir = tempfile::tempdir().expect("tempdir");
        let injector = Injector::new(dir.path()).expect("injector");
        let mut log = Log::open(injector.root(), small(), &FileCache::new(4)).expect("open");
        let mut id = 0;
        while log.reader().segment_count() == 1 {
            id += 1;
            // The roll opens the new segment's two index files, its log and the
            // directory before it seals the old segment's indexes; from there on no
            // file opens, so the commit's retry of the seal fails too.
            injector.clear();
            injector.fail_from(Op::Open, 5, Fault::too_many_open_files());
            log.append(&batch(&["0123456789"; 4], id)).expect("append");
        }
        injector.clear();
        let failures: Vec<_> = log.take_deferred_failures().collect();
        assert!(
            failures.iter().any(|f| f.step == Deferred::IndexSeal),
            "{failures:?}"
        );
        // Untrimmed, an index file still holds its allocated page.
        let sizes = || {
            [INDEX_EXT, TIME_INDEX_EXT].map(|ext| {
                let path = segment_path(injector.root(), 0, ext);
                fs::metadata(path).expect("index").len()
            })
        };
        let page = crate::index::GROW_BYTES as u64;
        let untrimmed = |size: u64| size + 12 > page;
        assert!(sizes().into_iter().any(untrimmed), "{:?}", sizes());
        let expected = values(log.reader(), 0);
        assert_eq!(expected.len() as u64, log.reader().high_watermark());
        log.append(&batch(&["more"], id + 1)).expect("append");
        assert_eq!(
            log.take_deferred_failures().count(),
            0,
            "the retry sealed it"
        );
        assert!(!sizes().into_iter().any(untrimmed), "{:?}", sizes());
        assert_eq!(values(log.reader(), 0)[..expected.len()], expected[..]);
    }

    /// Readers of different sealed segments sharing a cache of one keep evicting each
    /// other's index mappings and read handles while they use them: the `Arc` each holds
    /// keeps its mapping valid, so every read is right.
    #[test]
    fn concurrent_readers_survive_each_others_evictions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = FileCache::with_mapped_max(1, 1);
        let mut log = Log::open(dir.path(), small(), &files).expect("open");
        for i in 0..60 {
            log.append(&batch(&[&"v".repeat(100)], i)).expect("append");
        }
        let expected = values(log.reader(), 0);
        let bases: Vec<u64> = log
            .reader()
            .shared
            .segments()
            .iter()
            .map(|s| s.base_offset)
            .collect();
        std::thread::scope(|s| {
            for start in 0..3 {
                let reader = log.reader().clone();
                let (bases, expected) = (&bases, &expected);
                s.spawn(move || {
                    for round in 0..50 {
                        let base = bases[(start + round * 3) % bases.len()];
                        assert_eq!(values(&reader, base), expected[base as usize..]);
                    }
                });
            }
        });
    }

    #[test]
    fn appends_roll_and_read_back_across_segments_and_reopens() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = FileCache::new(2);
        let mut log = Log::open(dir.path(), small(), &files).expect("open");
        let mut expected = Vec::new();
        for i in 0..100u64 {
            let v = format!("value-{i}");
            let info = log.append(&batch(&[&v, &v], i as i64)).expect("append");
            assert_eq!(info.base_offset, 2 * i);
            expected.push((2 * i, v.clone()));
            expected.push((2 * i + 1, v));
        }
        assert!(log.reader().segment_count() > 5, "segments rolled");
        assert_eq!(values(log.reader(), 0), expected);
        assert_eq!(values(log.reader(), 77), expected[77..]);
        assert!(files.open_count() <= 2, "file cache bounded");
        log.close().expect("close");

        // Clean reopen, then an unclean one (drop without close).
        let log = Log::open(dir.path(), small(), &files).expect("reopen");
        assert_eq!(log.reader().high_watermark(), 200);
        assert_eq!(values(log.reader(), 0), expected);
        drop(log);
        let mut log = Log::open(dir.path(), small(), &files).expect("reopen unclean");
        assert_eq!(values(log.reader(), 0), expected);
        assert_eq!(
            log.append(&batch(&["more"], 5))
                .expect("append")
                .base_offset,
            200
        );
    }

    /// Opening a new log is not reported as an unclean stop (the broker would warn of
    /// possible loss at every topic creation); dropping one without close is.
    #[test]
    fn recovery_reports_an_unclean_stop_but_not_a_new_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = FileCache::new(8);
        let mut log = Log::open(dir.path(), small(), &files).expect("open");
        assert!(log.recovery().clean, "{:?}", log.recovery());
        log.append(&batch(&["a"], 1)).expect("append");
        drop(log);
        let log = Log::open(dir.path(), small(), &files).expect("reopen");
        assert!(log.recovery().may_have_lost_records());
        assert_eq!(log.recovery().recovered_to, 1);
        log.close().expect("close");
        let log = Log::open(dir.path(), small(), &files).expect("reopen");
        assert!(log.recovery().clean);
    }

    #[test]
    fn out_of_range_and_rejected_batches_leave_the_log_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = Log::open(dir.path(), small(), &FileCache::new(8)).expect("open");
        log.append(&batch(&["a"], 1)).expect("append");
        let mut bad = batch(&["b"], 1);
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(matches!(log.append(&bad), Err(Error::InvalidBatch(_))));
        let big = batch(&[&"x".repeat(2 << 20)], 1);
        assert!(matches!(log.append(&big), Err(Error::BatchTooLarge { .. })));
        assert!(matches!(
            log.reader().read(2, 100),
            Err(Error::OffsetOutOfRange {
                requested: 2,
                earliest: 0,
                latest: 1
            })
        ));
        assert!(log
            .reader()
            .read(1, 100)
            .expect("read at end")
            .batches
            .is_empty());
        assert_eq!(
            log.append(&batch(&["c"], 1)).expect("append").base_offset,
            1
        );
        assert_eq!(
            values(log.reader(), 0),
            vec![(0, "a".into()), (1, "c".into())]
        );
    }

    #[test]
    fn offset_for_timestamp_matches_a_scan() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = Log::open(dir.path(), small(), &FileCache::new(8)).expect("open");
        // Timestamps go up and down, as producer clocks do; batches use every codec
        // (a compressed batch's records are decompressed to find the one).
        let stamps: Vec<i64> = (0..200).map(|i| (i * 37) % 101 + i / 2).collect();
        let codecs = crate::compression::Compression::ALL.iter().cycle();
        for (chunk, &codec) in stamps.chunks(3).zip(codecs) {
            let mut b = BatchBuilder::new();
            for &ts in chunk {
                b.push(ts, None, Some(b"v"), &[]);
            }
            log.append(&b.finish_compressed(codec)).expect("append");
        }
        for target in -1..=stamps.iter().max().copied().unwrap_or(0) + 1 {
            let scan = stamps.iter().position(|&ts| ts >= target).map(|i| i as u64);
            let found = log
                .reader()
                .offset_for_timestamp(target)
                .expect("lookup")
                .found;
            assert_eq!(found, scan, "target {target}");
        }
    }

    /// A lookup that finds nothing answers the high watermark it searched to, never one
    /// past a matching record appended while it ran (which a consumer would skip).
    #[test]
    fn timestamp_lookup_answers_the_watermark_it_searched_to() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = Log::open(dir.path(), small(), &FileCache::new(8)).expect("open");
        for i in 0..50 {
            log.append(&batch(&["old"], i)).expect("append");
        }
        let reader = log.reader().clone();
        std::thread::scope(|s| {
            s.spawn(move || {
                for _ in 0..300 {
                    log.append(&batch(&["new"], 1_000)).expect("append");
                }
            });
            loop {
                let lookup = reader.offset_for_timestamp(1_000).expect("lookup");
                assert!(lookup.offset() <= 50, "{lookup:?} skips offset 50");
                if lookup.found.is_some() {
                    assert_eq!(lookup.found, Some(50));
                    break;
                }
            }
        });
    }

    /// A damaged length field makes the lookup report corruption; it used to size a
    /// buffer from it first (up to 2 GiB per call).
    #[test]
    fn timestamp_lookup_checks_a_batch_length_before_using_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = Log::open(dir.path(), small(), &FileCache::new(8)).expect("open");
        for i in 0..40 {
            log.append(&batch(&["0123456789"; 3], i)).expect("append");
        }
        let second = log.reader().shared.segments()[1].base_offset;
        log.close().expect("close");
        let path = segment_path(dir.path(), second, LOG_EXT);
        let mut bytes = fs::read(&path).expect("read");
        bytes[8..12].copy_from_slice(&0x7fff_0000i32.to_be_bytes());
        fs::write(&path, &bytes).expect("write");
        let log = Log::open(dir.path(), small(), &FileCache::new(8)).expect("reopen");
        // Three records per batch, the batch index as timestamp.
        let result = log.reader().offset_for_timestamp((second / 3) as i64);
        assert!(matches!(result, Err(Error::Corrupted { .. })), "{result:?}");
    }

    #[test]
    fn batch_timestamp_is_that_of_the_batch_holding_the_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = Log::open(dir.path(), small(), &FileCache::new(8)).expect("open");
        // Two records per batch, across several segments.
        for i in 0..100i64 {
            log.append(&batch(&["a", "b"], 1000 + i)).expect("append");
        }
        let reader = log.reader();
        assert!(reader.segment_count() > 1);
        for offset in [0, 1, 2, 77, 199] {
            let expected = 1000 + (offset / 2) as i64;
            assert_eq!(
                reader.batch_timestamp(offset).expect("read"),
                Some(expected)
            );
        }
        assert_eq!(reader.batch_timestamp(200).expect("read"), None);
        log.delete_before(100).expect("delete");
        assert!(matches!(
            log.reader().batch_timestamp(0),
            Err(Error::OffsetOutOfRange { .. })
        ));
    }

    #[test]
    fn retention_deletes_oldest_sealed_segments_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = LogConfig {
            retention_bytes: Some(2048),
            retention_ms: Some(1000),
            ..small()
        };
        let mut log = Log::open(dir.path(), config, &FileCache::new(8)).expect("open");
        for i in 0..60 {
            log.append(&batch(&["0123456789"; 4], 10_000 + i))
                .expect("append");
        }
        let before = log.reader().segment_count();
        let deleted = log.apply_retention(0).expect("retention by size");
        assert!(deleted > 0 && log.reader().segment_count() == before - deleted);
        assert!(log.size_bytes() >= 2048 && log.size_bytes() < 2048 + 1024);
        let earliest = log.reader().earliest_offset();
        assert!(matches!(
            log.reader().read(0, 100),
            Err(Error::OffsetOutOfRange { .. })
        ));
        assert_eq!(
            values(log.reader(), earliest).first().map(|v| v.0),
            Some(earliest)
        );
        // Everything is older than a minute after the newest record: all sealed go.
        log.apply_retention(10_000 + 60 + 60_000)
            .expect("retention by time");
        assert_eq!(log.reader().segment_count(), 1);
        drop(log);
        let log = Log::open(dir.path(), small(), &FileCache::new(8)).expect("reopen");
        assert_eq!(log.reader().segment_count(), 1);
        assert_eq!(log.reader().high_watermark(), 240);
    }

    #[test]
    fn delete_before_removes_only_whole_segments_below_the_offset() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = Log::open(dir.path(), small(), &FileCache::new(8)).expect("open");
        for i in 0..60 {
            log.append(&batch(&["0123456789"; 4], i)).expect("append");
        }
        let segments = log.reader().segment_count();
        assert!(segments > 3);
        assert_eq!(log.delete_before(0).expect("nothing below 0"), 0);
        // An offset inside the second segment keeps it: it still holds that offset.
        let deleted = log.delete_before(log.reader().earliest_offset() + 1);
        assert_eq!(deleted.expect("delete"), 0);
        let deleted = log.delete_before(120).expect("delete");
        assert!(deleted > 0);
        let earliest = log.reader().earliest_offset();
        assert!(earliest <= 120, "offset 120 must still be readable");
        assert_eq!(values(log.reader(), earliest).len() as u64, 240 - earliest);
        // Never the active segment, whatever the offset.
        log.delete_before(u64::MAX).expect("delete all sealed");
        assert_eq!(log.reader().segment_count(), 1);
        assert_eq!(log.reader().high_watermark(), 240);
        drop(log);
        let log = Log::open(dir.path(), small(), &FileCache::new(8)).expect("reopen");
        assert_eq!(log.reader().segment_count(), 1);
    }

    #[test]
    fn fsync_policy_publishes_only_committed_batches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = LogConfig {
            durability: Durability::Fsync,
            ..small()
        };
        let mut log = Log::open(dir.path(), config, &FileCache::new(8)).expect("open");
        let reader = log.reader().clone();
        for i in 0..5 {
            log.write(&batch(&["a", "b"], i)).expect("write");
        }
        assert_eq!(reader.high_watermark(), 0, "staged batches are invisible");
        assert_eq!(log.commit().expect("commit"), 10);
        assert_eq!(reader.high_watermark(), 10);
        assert_eq!(values(&reader, 0).len(), 10);
    }

    /// Reopening with smaller index settings and a missing sealed index must rebuild a
    /// sparser index, not overflow the new capacity (it used to panic).
    #[test]
    fn rebuild_with_shrunken_index_settings_does_not_overflow() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = LogConfig {
            segment_bytes_max: 16 << 10,
            ..small()
        };
        let mut log = Log::open(dir.path(), config.clone(), &FileCache::new(8)).expect("open");
        let value = "v".repeat(1000);
        for i in 0..40 {
            log.append(&batch(&[&value], i)).expect("append");
        }
        let expected = values(log.reader(), 0);
        drop(log);
        fs::remove_file(segment_path(dir.path(), 0, INDEX_EXT)).expect("remove index");
        let shrunk = LogConfig {
            index_bytes_max: 48,
            index_interval_bytes: 100,
            ..config
        };
        let log = Log::open(dir.path(), shrunk, &FileCache::new(8)).expect("reopen");
        assert_eq!(values(log.reader(), 0), expected);
        log.close().expect("close");
    }

    /// Age-based rolling and size-based retention make retention due as the log says.
    #[test]
    fn retention_is_due_at_the_roll_by_age_and_when_over_the_size_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = LogConfig {
            segment_ms: Some(60_000),
            retention_ms: None,
            ..small()
        };
        let mut log = Log::open(dir.path(), config.clone(), &FileCache::new(8)).expect("open");
        assert_eq!(
            log.retention_due_ms(),
            i64::MAX,
            "an empty log never needs it"
        );
        log.append(&batch(&["a"], 0)).expect("append");
        assert_eq!(log.retention_due_ms(), log.active.created_ms + 60_000);
        while log.reader().segment_count() < 3 {
            log.append(&batch(&["0123456789"; 4], 0)).expect("append");
        }
        let size = log.size_bytes();
        let oldest = log.reader.shared.segments()[0].readable_len();
        drop(log);
        // Exactly at the limit the oldest segment may go; one byte above it, not.
        for (max_bytes, due_now) in [(size - oldest, true), (size - oldest + 1, false)] {
            let sized = LogConfig {
                retention_bytes: Some(max_bytes),
                ..config.clone()
            };
            let mut log = Log::open(dir.path(), sized, &FileCache::new(8)).expect("reopen");
            let due = log.retention_due_ms();
            assert_eq!(due == i64::MIN, due_now, "{max_bytes}: {due}");
            let deleted = log.apply_retention(now_ms()).expect("retention");
            assert_eq!(deleted > 0, due_now);
        }
    }

    proptest::proptest! {
        /// Retention is due exactly when it would act: at `retention_due_ms() - 1` it
        /// neither deletes nor rolls, at `retention_due_ms()` it does one or the other,
        /// and when never due it does nothing however late (short of `i64::MAX` itself,
        /// where saturation makes "never" and "at the end of time" the same).
        #[test]
        fn retention_is_due_exactly_when_it_acts(
            timestamps in proptest::collection::vec(
                proptest::prop_oneof![0i64..100_000, 0i64..i64::MAX / 2],
                0..40,
            ),
            retention_ms in proptest::option::of(proptest::prop_oneof![
                1u64..50_000,
                proptest::prelude::Just(u64::MAX),
                proptest::prelude::any::<u64>(),
            ]),
            segment_ms in proptest::option::of(proptest::prop_oneof![
                1u64..100_000,
                proptest::prelude::Just(u64::MAX),
            ]),
            retention_bytes in proptest::option::of(0u64..6000),
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let config = LogConfig {
                segment_ms,
                retention_ms,
                retention_bytes,
                ..small()
            };
            let mut log = Log::open(dir.path(), config, &FileCache::new(8)).expect("open");
            for &timestamp in &timestamps {
                log.append(&batch(&["0123456789"; 4], timestamp)).expect("append");
            }
            let shape = |log: &Log| (log.reader().segment_count(), log.active.segment.base_offset);
            let before = shape(&log);
            let due = log.retention_due_ms();
            if due == i64::MAX {
                let late = log.apply_retention(i64::MAX - 1).expect("retention");
                proptest::prop_assert_eq!(late, 0);
                proptest::prop_assert_eq!(shape(&log), before);
            } else {
                if due != i64::MIN {
                    let early = log.apply_retention(due - 1).expect("retention");
                    proptest::prop_assert_eq!(early, 0, "due {}", due);
                    proptest::prop_assert_eq!(shape(&log), before, "due {}", due);
                }
                let deleted = log.apply_retention(due).expect("retention");
                proptest::prop_assert!(deleted > 0 || shape(&log) != before, "due {}", due);
            }
        }
    }

    /// An idle partition's last segment must still roll by age and expire: rolling is
    /// otherwise only checked on append.
    #[test]
    fn retention_rolls_and_expires_an_idle_aged_active_segment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = LogConfig {
            segment_ms: Some(1),
            retention_ms: Some(1000),
            ..small()
        };
        let mut log = Log::open(dir.path(), config, &FileCache::new(8)).expect("open");
        log.append(&batch(&["old"], 0)).expect("append");
        std::thread::sleep(std::time::Duration::from_millis(5));
        assert_eq!(log.apply_retention(now_ms()).expect("retention"), 1);
        assert_eq!(log.reader().segment_count(), 1);
        assert_eq!(log.reader().earliest_offset(), 1);
        assert_eq!(log.reader().high_watermark(), 1);
        // An empty active segment is left alone.
        assert_eq!(log.apply_retention(now_ms()).expect("retention"), 0);
        assert_eq!(
            log.append(&batch(&["new"], now_ms()))
                .expect("append")
                .base_offset,
            1
        );
    }
}
