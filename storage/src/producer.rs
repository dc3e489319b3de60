//! Idempotent producers: the per-partition state that lets a partition's writer store a
//! retried batch at most once, the snapshot file that keeps that state across restarts,
//! and the broker-wide file that makes producer ids unique.
//!
//! A batch from an idempotent producer carries its producer id, epoch and the sequence
//! number of its first record in the RecordBatch v2 header; its records take the
//! sequence numbers after it. For every producer seen, a partition remembers the epoch
//! and where the last [`RECENT_BATCHES`] batches went ([`ProducerStates`]). Before a batch
//! is written, [`ProducerStates::check`] decides:
//!
//! - no producer id ([`NO_PRODUCER_ID`]): append, nothing is checked or remembered;
//! - unknown producer id: append, whatever its first sequence (the state may have been
//!   forgotten: expired, evicted, or deleted with the log by retention);
//! - epoch lower than the remembered one: [`SequenceError::Fenced`];
//! - epoch higher: append if the sequence starts at 0 (a new epoch restarts numbering),
//!   else [`SequenceError::OutOfOrder`];
//! - same first and last sequence as a remembered batch: a duplicate, answered with that
//!   batch's offsets and not written again;
//! - first sequence right after the last remembered one: append;
//! - anything else: [`SequenceError::OutOfOrder`].
//!
//! Sequence numbers wrap from `i32::MAX` to 0, as Kafka's do.
//!
//! The state is rebuilt at open by [`ProducerStates::recover`]: load the snapshot
//! (`producers.snapshot`, written at clean close and periodically), then replay the
//! batch headers of the log from the offset it covers to the end. Without a usable
//! snapshot the whole retained log is replayed: slower, never wrong. The file formats
//! are in `docs/storage-format.md`.
//!
//! Apart from its two files and the log reads of `recover`, this module does no I/O: the
//! checks are pure functions of the state, so they are tested against a model.

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::batch::{batches, BatchHeader, NO_PRODUCER_ID};
use crate::error::{io_at, Error, Result};
use crate::fault;
use crate::log::LogReader;

/// Batches remembered per producer and partition: a retry of any of them is recognised
/// as a duplicate. Producers must keep at most this many requests in flight per
/// partition.
pub const RECENT_BATCHES: usize = 5;
/// Producers remembered per partition. A new producer beyond it makes the partition
/// forget the one that wrote least recently (whose later batches are then accepted as
/// from an unknown producer).
pub const PRODUCERS_MAX: usize = 4096;
/// A producer that has not written to a partition for this long is forgotten at the
/// next snapshot (Kafka's `producer.id.expiration.ms` default).
pub const PRODUCER_IDLE_MS: i64 = 24 * 60 * 60 * 1000;
/// File name of the producer state snapshot inside a partition directory.
pub const SNAPSHOT_FILE: &str = "producers.snapshot";
/// The snapshot is written here first, then renamed over [`SNAPSHOT_FILE`].
const SNAPSHOT_TMP_FILE: &str = "producers.snapshot.tmp";
/// Bytes read per log read while replaying.
const REPLAY_READ_BYTES: usize = 4 << 20;

const SNAPSHOT_MAGIC: u32 = u32::from_be_bytes(*b"STPS");
const SNAPSHOT_VERSION: u8 = 1;
/// magic u32, version u8, reserved [u8; 3], covered offset u64, producer count u32.
const SNAPSHOT_HEADER_LEN: usize = 4 + 1 + 3 + 8 + 4;
/// producer id i64, epoch i16, batch count u8, reserved u8, last write (ms) i64.
const PRODUCER_ENTRY_LEN: usize = 8 + 2 + 1 + 1 + 8;
/// first sequence i32, last sequence i32, base offset u64, last offset u64.
const BATCH_ENTRY_LEN: usize = 4 + 4 + 8 + 8;
const CRC_LEN: usize = 4;

/// The sequence number of the last record of a batch that starts at `base_sequence`
/// and holds `records` records, wrapping past `i32::MAX` to 0.
pub fn last_sequence(base_sequence: i32, records: i32) -> i32 {
    let last = i64::from(base_sequence) + i64::from(records.max(1)) - 1;
    (last % (i64::from(i32::MAX) + 1)) as i32
}

/// The sequence number a producer gives the batch after one that starts at
/// `base_sequence` and holds `records` records.
pub fn next_sequence(base_sequence: i32, records: i32) -> i32 {
    following(last_sequence(base_sequence, records))
}

/// The sequence number after `sequence`.
fn following(sequence: i32) -> i32 {
    if sequence == i32::MAX {
        0
    } else {
        sequence + 1
    }
}

/// Where one batch of a producer is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchMeta {
    /// Sequence number of its first record.
    pub first_sequence: i32,
    /// Sequence number of its last record.
    pub last_sequence: i32,
    /// Offset of its first record.
    pub base_offset: u64,
    /// Offset of its last record.
    pub last_offset: u64,
}

/// What to do with a batch, according to [`ProducerStates::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Write it (then call [`ProducerStates::record`]).
    Append,
    /// It is a retry of this stored batch: write nothing and answer with its offsets.
    Duplicate(BatchMeta),
}

/// Why a batch of an idempotent producer is refused. Nothing was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SequenceError {
    /// The batch's epoch is older than one the partition has already seen from this
    /// producer id: a newer instance of the producer took over.
    #[error(
        "producer {producer_id} is fenced: the batch has epoch {epoch} but this partition \
         has seen epoch {current}; a newer instance of the producer has taken over, so \
         this one must stop"
    )]
    Fenced {
        /// The producer id.
        producer_id: i64,
        /// The batch's epoch.
        epoch: i16,
        /// The epoch the partition knows.
        current: i16,
    },
    /// The batch's first sequence number is not the one the partition expects next.
    #[error(
        "out-of-order sequence from producer {producer_id} (epoch {epoch}): expected \
         sequence {expected}, got {got}; an earlier batch is missing (not yet written, or \
         failed), so this one cannot follow it: send the batches in sequence order, or \
         start a new epoch at sequence 0"
    )]
    OutOfOrder {
        /// The producer id.
        producer_id: i64,
        /// The batch's epoch.
        epoch: i16,
        /// The sequence number the partition expects.
        expected: i32,
        /// The batch's first sequence number.
        got: i32,
    },
    /// The producer fields of the header are not valid together.
    #[error(
        "invalid producer fields: producer id {producer_id}, epoch {epoch}, base sequence \
         {base_sequence}; batches of an idempotent producer need an id, epoch and sequence \
         of 0 or more (and batches of other producers producer id -1)"
    )]
    InvalidFields {
        /// The producer id field.
        producer_id: i64,
        /// The producer epoch field.
        epoch: i16,
        /// The base sequence field.
        base_sequence: i32,
    },
}

/// What one partition remembers about one producer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ProducerState {
    epoch: i16,
    /// The last batches of `epoch`, oldest first; never empty, at most
    /// [`RECENT_BATCHES`].
    batches: VecDeque<BatchMeta>,
    /// Broker wall-clock time of the producer's last write here (replay counts as one).
    last_write_ms: i64,
}

/// The idempotent producers of one partition. See the module documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProducerStates {
    producers: HashMap<i64, ProducerState>,
}

impl ProducerStates {
    /// No producers.
    pub fn new() -> ProducerStates {
        ProducerStates::default()
    }

    /// Number of producers remembered.
    pub fn len(&self) -> usize {
        self.producers.len()
    }

    /// True when no producer is remembered.
    pub fn is_empty(&self) -> bool {
        self.producers.is_empty()
    }

    /// The largest producer id remembered.
    pub fn max_producer_id(&self) -> Option<i64> {
        self.producers.keys().copied().max()
    }

    /// Decides what to do with a batch whose header is `header` (its base offset is
    /// ignored). Changes nothing: after writing a batch judged [`Verdict::Append`], call
    /// [`ProducerStates::record`].
    pub fn check(&self, header: &BatchHeader) -> Result<Verdict, SequenceError> {
        if header.producer_id == NO_PRODUCER_ID {
            return Ok(Verdict::Append);
        }
        if header.producer_id < 0 || header.producer_epoch < 0 || header.base_sequence < 0 {
            return Err(SequenceError::InvalidFields {
                producer_id: header.producer_id,
                epoch: header.producer_epoch,
                base_sequence: header.base_sequence,
            });
        }
        let Some(state) = self.producers.get(&header.producer_id) else {
            return Ok(Verdict::Append);
        };
        let out_of_order = |expected| SequenceError::OutOfOrder {
            producer_id: header.producer_id,
            epoch: header.producer_epoch,
            expected,
            got: header.base_sequence,
        };
        if header.producer_epoch < state.epoch {
            return Err(SequenceError::Fenced {
                producer_id: header.producer_id,
                epoch: header.producer_epoch,
                current: state.epoch,
            });
        }
        if header.producer_epoch > state.epoch {
            return match header.base_sequence {
                0 => Ok(Verdict::Append),
                _ => Err(out_of_order(0)),
            };
        }
        let last = last_sequence(header.base_sequence, header.record_count);
        if let Some(stored) = state
            .batches
            .iter()
            .find(|b| b.first_sequence == header.base_sequence && b.last_sequence == last)
        {
            return Ok(Verdict::Duplicate(*stored));
        }
        let expected = state
            .batches
            .back()
            .map_or(0, |b| following(b.last_sequence));
        if header.base_sequence == expected {
            Ok(Verdict::Append)
        } else {
            Err(out_of_order(expected))
        }
    }

    /// Remembers a batch that was written at `base_offset` (replay passes batches read
    /// from the log, whose header holds their offset). Batches without a producer id
    /// are ignored. `now_ms` is the broker's wall-clock time.
    pub fn record(&mut self, header: &BatchHeader, base_offset: u64, now_ms: i64) {
        if header.producer_id == NO_PRODUCER_ID {
            return;
        }
        let batch = BatchMeta {
            first_sequence: header.base_sequence,
            last_sequence: last_sequence(header.base_sequence, header.record_count),
            base_offset,
            last_offset: base_offset + header.last_offset_delta.max(0) as u64,
        };
        if !self.producers.contains_key(&header.producer_id)
            && self.producers.len() >= PRODUCERS_MAX
        {
            self.evict_least_recent();
        }
        let state = self
            .producers
            .entry(header.producer_id)
            .or_insert_with(|| ProducerState {
                epoch: header.producer_epoch,
                batches: VecDeque::with_capacity(RECENT_BATCHES),
                last_write_ms: now_ms,
            });
        if state.epoch != header.producer_epoch {
            state.epoch = header.producer_epoch;
            state.batches.clear();
        }
        if state.batches.len() == RECENT_BATCHES {
            state.batches.pop_front();
        }
        state.batches.push_back(batch);
        state.last_write_ms = now_ms;
    }

    fn evict_least_recent(&mut self) {
        let oldest = self
            .producers
            .iter()
            .min_by_key(|(id, state)| (state.last_write_ms, **id))
            .map(|(id, _)| *id);
        if let Some(id) = oldest {
            self.producers.remove(&id);
        }
    }

    /// Forgets producers that have not written for [`PRODUCER_IDLE_MS`].
    pub fn expire(&mut self, now_ms: i64) {
        let cutoff = now_ms.saturating_sub(PRODUCER_IDLE_MS);
        self.producers
            .retain(|_, state| state.last_write_ms >= cutoff);
    }

    /// The snapshot file's bytes for this state, which reflects every batch below
    /// `covers` (the log's next offset when it is taken).
    fn encode(&self, covers: u64) -> Vec<u8> {
        let mut ids: Vec<i64> = self.producers.keys().copied().collect();
        ids.sort_unstable();
        let batch_count: usize = self.producers.values().map(|s| s.batches.len()).sum();
        let mut b = Vec::with_capacity(
            SNAPSHOT_HEADER_LEN
                + ids.len() * PRODUCER_ENTRY_LEN
                + batch_count * BATCH_ENTRY_LEN
                + CRC_LEN,
        );
        b.extend_from_slice(&SNAPSHOT_MAGIC.to_be_bytes());
        b.push(SNAPSHOT_VERSION);
        b.extend_from_slice(&[0; 3]);
        b.extend_from_slice(&covers.to_be_bytes());
        b.extend_from_slice(&(ids.len() as u32).to_be_bytes());
        for id in ids {
            let state = &self.producers[&id];
            b.extend_from_slice(&id.to_be_bytes());
            b.extend_from_slice(&state.epoch.to_be_bytes());
            b.push(state.batches.len() as u8);
            b.push(0);
            b.extend_from_slice(&state.last_write_ms.to_be_bytes());
            for batch in &state.batches {
                b.extend_from_slice(&batch.first_sequence.to_be_bytes());
                b.extend_from_slice(&batch.last_sequence.to_be_bytes());
                b.extend_from_slice(&batch.base_offset.to_be_bytes());
                b.extend_from_slice(&batch.last_offset.to_be_bytes());
            }
        }
        let crc = crc32fast::hash(&b);
        b.extend_from_slice(&crc.to_be_bytes());
        b
    }

    /// Decodes a snapshot; `Err` says why it is not usable.
    fn decode(bytes: &[u8]) -> Result<(ProducerStates, u64), String> {
        if bytes.len() < SNAPSHOT_HEADER_LEN + CRC_LEN {
            return Err(format!("{} bytes is too short", bytes.len()));
        }
        let (body, crc) = bytes.split_at(bytes.len() - CRC_LEN);
        let mut r = Cursor { rest: body };
        let stored = u32::from_be_bytes([crc[0], crc[1], crc[2], crc[3]]);
        let computed = crc32fast::hash(body);
        if stored != computed {
            return Err(format!(
                "checksum mismatch: file says {stored:#010x}, content hashes to {computed:#010x}"
            ));
        }
        if r.u32()? != SNAPSHOT_MAGIC {
            return Err("bad magic".into());
        }
        let version = r.take(4)?[0];
        if version != SNAPSHOT_VERSION {
            return Err(format!("unknown version {version}"));
        }
        let covers = r.u64()?;
        let count = r.u32()? as usize;
        if count > PRODUCERS_MAX {
            return Err(format!(
                "{count} producers, more than the {PRODUCERS_MAX} a partition keeps"
            ));
        }
        let mut producers = HashMap::with_capacity(count);
        for _ in 0..count {
            let id = r.u64()? as i64;
            let epoch = r.u16()? as i16;
            let batch_count = r.take(2)?[0] as usize;
            let last_write_ms = r.u64()? as i64;
            if id < 0 || epoch < 0 || !(1..=RECENT_BATCHES).contains(&batch_count) {
                return Err(format!(
                    "invalid entry: producer {id}, epoch {epoch}, {batch_count} batches"
                ));
            }
            let mut batches = VecDeque::with_capacity(RECENT_BATCHES);
            for _ in 0..batch_count {
                let batch = BatchMeta {
                    first_sequence: r.u32()? as i32,
                    last_sequence: r.u32()? as i32,
                    base_offset: r.u64()?,
                    last_offset: r.u64()?,
                };
                if batch.first_sequence < 0
                    || batch.last_sequence < 0
                    || batch.last_offset < batch.base_offset
                    || batch.last_offset >= covers
                {
                    return Err(format!("invalid batch entry of producer {id}: {batch:?}"));
                }
                batches.push_back(batch);
            }
            let state = ProducerState {
                epoch,
                batches,
                last_write_ms,
            };
            if producers.insert(id, state).is_some() {
                return Err(format!("producer {id} appears twice"));
            }
        }
        if !r.rest.is_empty() {
            return Err(format!("{} bytes after the last entry", r.rest.len()));
        }
        Ok((ProducerStates { producers }, covers))
    }

    /// Writes the snapshot of `dir`: this state, which reflects every batch below
    /// `covers`. Written to a temporary file and renamed over the old snapshot, so a
    /// crash leaves the old or the new one. With `sync`, the file is fsynced before the
    /// rename and the directory after it, so the new snapshot is durable on return;
    /// without, a crash may leave the old snapshot or a damaged one, which
    /// [`ProducerStates::recover`] rejects.
    pub fn write_snapshot(&self, dir: &Path, covers: u64, sync: bool) -> Result<()> {
        replace_file(
            dir,
            SNAPSHOT_TMP_FILE,
            SNAPSHOT_FILE,
            &self.encode(covers),
            sync,
        )
    }

    /// Rebuilds the producer state of the log `reader` reads: loads the snapshot if it
    /// is intact and covers an offset inside the log, and replays the batch headers from
    /// there (from the log's start without one) to the high watermark. Never fails: an
    /// unusable snapshot only costs a longer replay, and a log that cannot be read to
    /// the end (damaged data) leaves the state empty, as if every producer were unknown;
    /// [`Recovery`] says what happened. `now_ms` stamps the producers replayed.
    pub fn recover(reader: &LogReader, now_ms: i64) -> (ProducerStates, Recovery) {
        let earliest = reader.earliest_offset();
        let end = reader.high_watermark();
        let (mut states, from, snapshot) = match load_snapshot(reader.dir()) {
            LoadedSnapshot::Valid(states, covers) if (earliest..=end).contains(&covers) => {
                (states, covers, SnapshotUse::Loaded { covers })
            }
            LoadedSnapshot::Valid(_, covers) => (
                ProducerStates::new(),
                earliest,
                SnapshotUse::Rejected(format!(
                    "it covers offsets below {covers} but the log holds offsets {earliest} \
                     to {end}"
                )),
            ),
            LoadedSnapshot::Missing => (ProducerStates::new(), earliest, SnapshotUse::Missing),
            LoadedSnapshot::Unusable(reason) => (
                ProducerStates::new(),
                earliest,
                SnapshotUse::Rejected(reason),
            ),
        };
        let mut recovery = Recovery {
            snapshot,
            replayed_batches: 0,
            replay_error: None,
        };
        if let Err(e) = states.replay(reader, from, end, now_ms, &mut recovery.replayed_batches) {
            states = ProducerStates::new();
            recovery.replay_error = Some(e.to_string());
        }
        (states, recovery)
    }

    fn replay(
        &mut self,
        reader: &LogReader,
        from: u64,
        end: u64,
        now_ms: i64,
        replayed: &mut u64,
    ) -> Result<()> {
        let mut offset = from;
        while offset < end {
            let read = reader.read(offset, REPLAY_READ_BYTES)?;
            for batch in batches(&read.batches) {
                let header = *batch?.header();
                if header.base_offset >= end {
                    break;
                }
                if header.base_offset >= offset {
                    self.record(&header, header.base_offset, now_ms);
                    *replayed += 1;
                }
            }
            if read.next_offset <= offset {
                break;
            }
            offset = read.next_offset;
        }
        Ok(())
    }
}

/// What [`ProducerStates::recover`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// What became of the snapshot.
    pub snapshot: SnapshotUse,
    /// Batches replayed from the log.
    pub replayed_batches: u64,
    /// Why the log could not be replayed to the end; the state was then left empty.
    pub replay_error: Option<String>,
}

impl Recovery {
    /// True when the snapshot on disk does not describe the recovered state exactly, so
    /// a new one should be written before the log changes: a rejected snapshot must never
    /// be trusted later, and a long replay should not be repeated at the next open.
    ///
    /// False when the replay failed: the state is then empty, and a snapshot of it would
    /// replace a good one for good, where the next open, or one after the damage is
    /// repaired or expired, could still use it.
    pub fn needs_snapshot(&self) -> bool {
        self.replay_error.is_none()
            && (self.replayed_batches > 0 || matches!(self.snapshot, SnapshotUse::Rejected(_)))
    }
}

/// What became of the producer state snapshot at recovery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotUse {
    /// Loaded; it covered the log below this offset.
    Loaded {
        /// The offset it covered up to.
        covers: u64,
    },
    /// There was none.
    Missing,
    /// There was one, but it was not used; the reason says why.
    Rejected(String),
}

enum LoadedSnapshot {
    Valid(ProducerStates, u64),
    Missing,
    Unusable(String),
}

fn load_snapshot(dir: &Path) -> LoadedSnapshot {
    match fault::read(&dir.join(SNAPSHOT_FILE)) {
        Ok(bytes) => match ProducerStates::decode(&bytes) {
            Ok((states, covers)) => LoadedSnapshot::Valid(states, covers),
            Err(reason) => LoadedSnapshot::Unusable(reason),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => LoadedSnapshot::Missing,
        Err(e) => LoadedSnapshot::Unusable(format!("cannot read it: {e}")),
    }
}

/// A bounds-checked reader over snapshot bytes.
struct Cursor<'a> {
    rest: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.rest.len() {
            return Err("entries run past the end of the file".into());
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, String> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, String> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self) -> Result<u64, String> {
        let mut x = [0u8; 8];
        x.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(x))
    }
}

/// File name of the producer id file inside the broker's data directory.
pub const PRODUCER_IDS_FILE: &str = "producer_ids";
const PRODUCER_IDS_TMP_FILE: &str = "producer_ids.tmp";
/// Ids reserved per write of the producer id file.
pub const PRODUCER_ID_BLOCK: i64 = 1000;
const IDS_MAGIC: u32 = u32::from_be_bytes(*b"STPI");
const IDS_VERSION: u8 = 1;
/// magic u32, version u8, reserved [u8; 3], reserved bound i64, CRC u32.
const IDS_LEN: usize = 4 + 1 + 3 + 8 + CRC_LEN;

/// Hands out producer ids that are unique for the life of a data directory.
///
/// Ids are reserved in blocks of [`PRODUCER_ID_BLOCK`]: before the first id of a block
/// is handed out, the block's end is written to `<data>/producer_ids` and made durable.
/// After a restart, ids continue from the last reserved end, so an id is never handed
/// out twice, even after a crash (the rest of a block is skipped).
#[derive(Debug)]
pub struct ProducerIds {
    dir: PathBuf,
    /// The next id to hand out.
    next: i64,
    /// Ids below this are reserved in the file.
    reserved: i64,
}

impl ProducerIds {
    /// Reads the producer id file of the data directory `dir` (none: ids start at 0).
    /// A file that fails its checks is an error: the ids already handed out cannot be
    /// known, and handing one out twice would let two producers overwrite each other's
    /// sequence state.
    pub fn open(dir: &Path) -> Result<ProducerIds> {
        let path = dir.join(PRODUCER_IDS_FILE);
        let reserved = match fault::read(&path) {
            Ok(bytes) => decode_ids(&bytes).map_err(|reason| Error::Corrupted {
                path: path.clone(),
                position: 0,
                reason: format!(
                    "{reason}; the producer ids handed out so far are unknown: restore the \
                     file from a backup, or delete it to continue above the highest id \
                     found in the partitions' producer state (ids handed out but not used \
                     yet may then be handed out again)"
                ),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
            Err(e) => return Err(io_at(&path)(e)),
        };
        Ok(ProducerIds {
            dir: dir.to_path_buf(),
            next: reserved,
            reserved,
        })
    }

    /// Makes sure ids up to and including `id` are never handed out (ids found in
    /// partition state when the file was missing).
    pub fn skip_through(&mut self, id: i64) {
        let after = id.saturating_add(1);
        if after > self.next {
            self.next = after;
            self.reserved = self.reserved.max(after);
        }
    }

    /// The lowest id not handed out yet: every id handed out is below it.
    pub fn next_unissued(&self) -> i64 {
        self.next
    }

    /// A new producer id. Writes and fsyncs the file when a new block is needed.
    pub fn allocate(&mut self) -> Result<i64> {
        if self.next >= self.reserved {
            let bound = self
                .next
                .checked_add(PRODUCER_ID_BLOCK)
                .ok_or_else(|| Error::Io {
                    path: self.dir.join(PRODUCER_IDS_FILE),
                    source: io::Error::other("every producer id has been handed out"),
                })?;
            self.write(bound)?;
            self.reserved = bound;
        }
        let id = self.next;
        self.next += 1;
        Ok(id)
    }

    /// Durably replaces the file with one that reserves ids below `bound`.
    fn write(&self, bound: i64) -> Result<()> {
        replace_file(
            &self.dir,
            PRODUCER_IDS_TMP_FILE,
            PRODUCER_IDS_FILE,
            &encode_ids(bound),
            true,
        )
    }
}

/// Replaces `dir/name` with `bytes` through `dir/tmp` and a rename, so a crash leaves
/// the old file or the new one. With `sync`, the new file is durable on return (the
/// file is fsynced before the rename and the directory after it).
fn replace_file(dir: &Path, tmp: &str, name: &str, bytes: &[u8], sync: bool) -> Result<()> {
    let (tmp, path) = (dir.join(tmp), dir.join(name));
    let file = fault::open(
        fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true),
        &tmp,
    )
    .map_err(io_at(&tmp))?;
    fault::write_all_at(&file, &tmp, bytes, 0).map_err(io_at(&tmp))?;
    if sync {
        fault::sync_data(&file, &tmp).map_err(io_at(&tmp))?;
    }
    drop(file);
    fault::rename(&tmp, &path).map_err(io_at(&path))?;
    if sync {
        fault::sync_dir(dir).map_err(io_at(dir))?;
    }
    Ok(())
}

fn encode_ids(bound: i64) -> [u8; IDS_LEN] {
    let mut b = [0u8; IDS_LEN];
    b[0..4].copy_from_slice(&IDS_MAGIC.to_be_bytes());
    b[4] = IDS_VERSION;
    b[8..16].copy_from_slice(&bound.to_be_bytes());
    let crc = crc32fast::hash(&b[..16]);
    b[16..].copy_from_slice(&crc.to_be_bytes());
    b
}

fn decode_ids(bytes: &[u8]) -> Result<i64, String> {
    if bytes.len() != IDS_LEN {
        return Err(format!(
            "{} bytes where {IDS_LEN} were expected",
            bytes.len()
        ));
    }
    let mut r = Cursor { rest: &bytes[..16] };
    let stored = u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]);
    if stored != crc32fast::hash(&bytes[..16]) {
        return Err("checksum mismatch".into());
    }
    if r.u32()? != IDS_MAGIC || r.take(4)?[0] != IDS_VERSION {
        return Err("bad magic or version".into());
    }
    let bound = r.u64()? as i64;
    if bound < 0 {
        return Err(format!("negative bound {bound}"));
    }
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::BatchBuilder;
    use crate::{FileCache, Log, LogConfig};
    use proptest::prelude::*;

    fn header(producer_id: i64, epoch: i16, base_sequence: i32, records: i32) -> BatchHeader {
        BatchHeader {
            base_offset: 0,
            size: 0,
            leader_epoch: -1,
            attributes: 0,
            last_offset_delta: records - 1,
            base_timestamp: 0,
            max_timestamp: 0,
            producer_id,
            producer_epoch: epoch,
            base_sequence,
            record_count: records,
            crc: 0,
        }
    }

    #[test]
    fn sequences_wrap_at_i32_max() {
        assert_eq!(last_sequence(0, 1), 0);
        assert_eq!(last_sequence(5, 10), 14);
        assert_eq!(last_sequence(i32::MAX, 1), i32::MAX);
        assert_eq!(last_sequence(i32::MAX, 2), 0);
        assert_eq!(last_sequence(i32::MAX - 1, 5), 2);
        assert_eq!(next_sequence(i32::MAX - 1, 2), 0);
        assert_eq!(next_sequence(7, 3), 10);
    }

    /// The rules, case by case: a table of (state-building batches, batch, verdict).
    #[test]
    fn check_follows_the_rules() {
        let mut s = ProducerStates::new();
        let dup = |first, last, base, last_offset| {
            Ok(Verdict::Duplicate(BatchMeta {
                first_sequence: first,
                last_sequence: last,
                base_offset: base,
                last_offset,
            }))
        };
        // Unknown producers start anywhere; batches without a producer are not checked.
        assert_eq!(s.check(&header(7, 0, 1234, 3)), Ok(Verdict::Append));
        assert_eq!(s.check(&header(-1, -1, -1, 3)), Ok(Verdict::Append));
        s.record(&header(-1, -1, -1, 3), 0, 1);
        assert!(s.is_empty());
        s.record(&header(7, 0, 0, 10), 100, 1);
        s.record(&header(7, 0, 10, 5), 110, 1);
        assert_eq!(s.check(&header(7, 0, 15, 1)), Ok(Verdict::Append));
        assert_eq!(s.check(&header(7, 0, 10, 5)), dup(10, 14, 110, 114));
        assert_eq!(s.check(&header(7, 0, 0, 10)), dup(0, 9, 100, 109));
        // Same first sequence, different length: not the stored batch.
        assert!(matches!(
            s.check(&header(7, 0, 10, 4)),
            Err(SequenceError::OutOfOrder {
                expected: 15,
                got: 10,
                ..
            })
        ));
        assert!(matches!(
            s.check(&header(7, 0, 16, 1)),
            Err(SequenceError::OutOfOrder {
                expected: 15,
                got: 16,
                ..
            })
        ));
        // A new epoch starts at 0; an old one is fenced.
        assert_eq!(s.check(&header(7, 1, 0, 2)), Ok(Verdict::Append));
        assert!(matches!(
            s.check(&header(7, 1, 15, 2)),
            Err(SequenceError::OutOfOrder { expected: 0, .. })
        ));
        s.record(&header(7, 1, 0, 2), 200, 2);
        assert!(matches!(
            s.check(&header(7, 0, 15, 1)),
            Err(SequenceError::Fenced {
                epoch: 0,
                current: 1,
                ..
            })
        ));
        // The epoch change forgot the old epoch's batches.
        assert_eq!(s.check(&header(7, 1, 0, 2)), dup(0, 1, 200, 201));
        assert!(matches!(
            s.check(&header(5, -1, 0, 1)),
            Err(SequenceError::InvalidFields { .. })
        ));
        assert!(matches!(
            s.check(&header(5, 0, -3, 1)),
            Err(SequenceError::InvalidFields { .. })
        ));
        assert!(matches!(
            s.check(&header(-2, 0, 0, 1)),
            Err(SequenceError::InvalidFields { .. })
        ));
        // Only the last RECENT_BATCHES are remembered.
        for i in 0..RECENT_BATCHES as i32 {
            s.record(&header(7, 1, 2 + i, 1), 300 + i as u64, 3);
        }
        assert!(matches!(
            s.check(&header(7, 1, 0, 2)),
            Err(SequenceError::OutOfOrder { .. })
        ));
        assert_eq!(s.check(&header(7, 1, 2, 1)), dup(2, 2, 300, 300));
    }

    #[test]
    fn producers_are_bounded_and_expire() {
        let mut s = ProducerStates::new();
        for id in 0..PRODUCERS_MAX as i64 {
            s.record(&header(id, 0, 0, 1), id as u64, 1_000 + id);
        }
        assert_eq!(s.len(), PRODUCERS_MAX);
        // One more evicts the producer that wrote least recently (id 0).
        s.record(&header(1 << 40, 0, 0, 1), 1 << 20, 1_000_000);
        assert_eq!(s.len(), PRODUCERS_MAX);
        assert_eq!(s.check(&header(0, 0, 99, 1)), Ok(Verdict::Append));
        assert!(s.check(&header(1, 0, 99, 1)).is_err());
        assert_eq!(s.max_producer_id(), Some(1 << 40));
        s.expire(1_000_000 + PRODUCER_IDLE_MS);
        assert_eq!(s.len(), 1);
        s.expire(1_000_001 + PRODUCER_IDLE_MS);
        assert!(s.is_empty());
    }

    #[test]
    fn snapshot_round_trips_and_any_damage_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut s = ProducerStates::new();
        for id in 0..4 {
            for b in 0..(id + 3) {
                s.record(
                    &header(id, id as i16, b as i32 * 2, 2),
                    10 * b as u64,
                    77 + id,
                );
            }
        }
        s.record(&header(9, 3, i32::MAX, 3), 1000, 5);
        s.write_snapshot(dir.path(), 1003, true).expect("write");
        match load_snapshot(dir.path()) {
            LoadedSnapshot::Valid(loaded, covers) => {
                assert_eq!((loaded, covers), (s.clone(), 1003));
            }
            _ => panic!("the snapshot just written loads"),
        }
        assert!(!dir.path().join(SNAPSHOT_TMP_FILE).exists());

        let bytes = s.encode(1003);
        for i in 0..bytes.len() {
            for bit in [0x01, 0x80] {
                let mut damaged = bytes.clone();
                damaged[i] ^= bit;
                assert!(ProducerStates::decode(&damaged).is_err(), "byte {i}");
            }
        }
        for len in 0..bytes.len() {
            assert!(
                ProducerStates::decode(&bytes[..len]).is_err(),
                "length {len}"
            );
        }
        // An entry whose offsets lie beyond what the snapshot covers is not believed,
        // even with a correct checksum.
        assert!(ProducerStates::decode(&s.encode(1002)).is_err());
        assert_eq!(
            ProducerStates::decode(&ProducerStates::new().encode(0)),
            Ok((ProducerStates::new(), 0))
        );
    }

    /// The examples of `docs/storage-format.md` (16.2 and 17), byte for byte.
    #[test]
    fn files_match_the_documented_examples() {
        let mut s = ProducerStates::new();
        s.record(&header(7, 0, 0, 3), 0, 1_700_000_000_000);
        s.record(&header(7, 0, 3, 2), 3, 1_700_000_000_000);
        let hex = |bytes: &[u8]| {
            bytes
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            hex(&s.encode(5)),
            "53 54 50 53 01 00 00 00 00 00 00 00 00 00 00 05 \
             00 00 00 01 00 00 00 00 00 00 00 07 00 00 02 00 \
             00 00 01 8b cf e5 68 00 00 00 00 00 00 00 00 02 \
             00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 02 \
             00 00 00 03 00 00 00 04 00 00 00 00 00 00 00 03 \
             00 00 00 00 00 00 00 04 c4 ed f2 87"
        );
        assert_eq!(
            hex(&encode_ids(2000)),
            "53 54 50 49 01 00 00 00 00 00 00 00 00 00 07 d0 46 eb ee 30"
        );
    }

    fn log_config() -> LogConfig {
        LogConfig {
            segment_bytes_max: 2048,
            durability: crate::Durability::None,
            ..LogConfig::default()
        }
    }

    fn idempotent_batch(producer_id: i64, sequence: i32, records: usize) -> Vec<u8> {
        let mut b = BatchBuilder::new().producer(producer_id, 0, sequence);
        for i in 0..records {
            b.push(i as i64, Some(b"key"), Some(&[i as u8; 40]), &[]);
        }
        b.finish()
    }

    /// Writes batches of three producers (and one without a producer) through a real
    /// log, keeping the state as the broker's writer does.
    fn fill(log: &mut Log) -> ProducerStates {
        let mut states = ProducerStates::new();
        let mut sequences = [0i32; 3];
        for i in 0..60 {
            let batch = if i % 7 == 6 {
                let mut b = BatchBuilder::new();
                b.push(0, None, Some(b"plain"), &[]);
                b.finish()
            } else {
                let producer = i % 3;
                let records = 1 + i % 4;
                let batch = idempotent_batch(producer as i64, sequences[producer], records);
                sequences[producer] = next_sequence(sequences[producer], records as i32);
                batch
            };
            let header = BatchHeader::parse(&batch).expect("header");
            assert_eq!(states.check(&header), Ok(Verdict::Append));
            let info = log.append(&batch).expect("append");
            states.record(&header, info.base_offset, 50);
        }
        states
    }

    /// State recovered from a snapshot plus the log equals the state kept while writing,
    /// and so does state replayed from the log alone, whatever happened to the snapshot:
    /// missing, damaged, ahead of the log, or behind the log's start.
    #[test]
    fn recovery_rebuilds_the_state_with_or_without_a_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = FileCache::new(4);
        let mut log = Log::open(dir.path(), log_config(), &files).expect("open");
        let expected = fill(&mut log);
        assert!(log.reader().segment_count() > 3, "the log rolled");

        // No snapshot: everything is replayed.
        let (states, recovery) = ProducerStates::recover(log.reader(), 50);
        assert_eq!(states, expected);
        assert_eq!(recovery.snapshot, SnapshotUse::Missing);
        assert_eq!(recovery.replayed_batches, 60);
        assert!(recovery.needs_snapshot());

        // A snapshot at the end: nothing to replay.
        let end = log.next_offset();
        expected
            .write_snapshot(dir.path(), end, true)
            .expect("snapshot");
        let (states, recovery) = ProducerStates::recover(log.reader(), 50);
        assert_eq!(states, expected);
        assert_eq!(recovery.snapshot, SnapshotUse::Loaded { covers: end });
        assert!(!recovery.needs_snapshot());

        // A snapshot in the middle, then more batches: the tail is replayed.
        let more = {
            let mut states = expected.clone();
            let batch = idempotent_batch(1, 1_000, 2);
            let header = BatchHeader::parse(&batch).expect("header");
            assert!(states.check(&header).is_err(), "a gap is refused");
            let batch = idempotent_batch(8, 1_000, 2);
            let header = BatchHeader::parse(&batch).expect("header");
            let info = log.append(&batch).expect("append");
            states.record(&header, info.base_offset, 50);
            states
        };
        let (states, recovery) = ProducerStates::recover(log.reader(), 50);
        assert_eq!(states, more);
        assert_eq!(recovery.replayed_batches, 1);

        // A snapshot claiming more than the log holds (the log lost its tail) is
        // rejected, and so is a damaged one: the whole log is replayed instead.
        more.write_snapshot(dir.path(), log.next_offset() + 5, true)
            .expect("snapshot");
        let (states, recovery) = ProducerStates::recover(log.reader(), 50);
        assert_eq!(states, more);
        assert!(matches!(recovery.snapshot, SnapshotUse::Rejected(_)));
        let path = dir.path().join(SNAPSHOT_FILE);
        let mut bytes = fs::read(&path).expect("read");
        bytes[10] ^= 1;
        fs::write(&path, &bytes).expect("damage");
        let (states, recovery) = ProducerStates::recover(log.reader(), 50);
        assert_eq!(states, more);
        assert!(matches!(recovery.snapshot, SnapshotUse::Rejected(_)));
        assert_eq!(recovery.replay_error, None);

        // A snapshot below the log's start (retention went past it) is not used.
        ProducerStates::new()
            .write_snapshot(dir.path(), 1, false)
            .expect("snapshot");
        log.apply_retention(i64::MAX).expect("retention");
        assert!(log.reader().earliest_offset() > 1);
        let (_, recovery) = ProducerStates::recover(log.reader(), 50);
        assert!(matches!(recovery.snapshot, SnapshotUse::Rejected(_)));
        log.close().expect("close");
    }

    /// A replay that fails halfway (a damaged batch after the snapshot) leaves the state
    /// empty, and must not ask for that empty state to replace the good snapshot.
    #[test]
    fn a_failed_replay_keeps_the_good_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = FileCache::new(4);
        let mut log = Log::open(dir.path(), log_config(), &files).expect("open");
        let states = fill(&mut log);
        states
            .write_snapshot(dir.path(), log.next_offset(), true)
            .expect("snapshot");
        for sequence in [0, 2, 4] {
            log.append(&idempotent_batch(9, sequence, 2))
                .expect("append");
        }
        log.close().expect("close");
        let active = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .max()
            .expect("a segment");
        let mut bytes = fs::read(&active).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x20;
        fs::write(&active, &bytes).expect("damage");

        let log = Log::open(dir.path(), log_config(), &files).expect("reopen");
        let (recovered, recovery) = ProducerStates::recover(log.reader(), 50);
        assert!(recovery.replay_error.is_some(), "{recovery:?}");
        assert!(recovery.replayed_batches > 0, "the replay got partway");
        assert!(recovered.is_empty());
        assert!(!recovery.needs_snapshot(), "{recovery:?}");
    }

    #[test]
    fn producer_ids_are_never_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ids = ProducerIds::open(dir.path()).expect("open");
        assert_eq!(ids.allocate().expect("id"), 0);
        assert_eq!(ids.allocate().expect("id"), 1);
        assert_eq!(ids.next_unissued(), 2);
        // A restart (clean or not) continues after the reserved block.
        let mut ids = ProducerIds::open(dir.path()).expect("reopen");
        assert_eq!(ids.next_unissued(), PRODUCER_ID_BLOCK);
        assert_eq!(ids.allocate().expect("id"), PRODUCER_ID_BLOCK);
        for _ in 0..PRODUCER_ID_BLOCK {
            ids.allocate().expect("id");
        }
        let mut ids = ProducerIds::open(dir.path()).expect("reopen");
        assert_eq!(ids.allocate().expect("id"), 3 * PRODUCER_ID_BLOCK);
        ids.skip_through(5 * PRODUCER_ID_BLOCK);
        assert_eq!(ids.allocate().expect("id"), 5 * PRODUCER_ID_BLOCK + 1);
        let ids = ProducerIds::open(dir.path()).expect("reopen");
        assert_eq!(ids.next_unissued(), 6 * PRODUCER_ID_BLOCK + 1);

        // A damaged file stops the broker rather than risk handing an id out twice.
        let path = dir.path().join(PRODUCER_IDS_FILE);
        let mut bytes = fs::read(&path).expect("read");
        bytes[12] ^= 4;
        fs::write(&path, &bytes).expect("damage");
        assert!(matches!(
            ProducerIds::open(dir.path()),
            Err(Error::Corrupted { .. })
        ));
    }

    /// One step of the model test: a batch of `records` records from producer `id`,
    /// with an epoch and first sequence chosen relative to what the model expects.
    #[derive(Debug, Clone)]
    struct Step {
        id: i64,
        epoch_delta: i8,
        sequence: SequenceChoice,
        records: i32,
        snapshot: bool,
    }

    #[derive(Debug, Clone)]
    enum SequenceChoice {
        Next,
        /// A retry of the n-th most recent batch of the producer.
        Retry(usize),
        Offset(i32),
        Start(i32),
    }

    fn step() -> impl Strategy<Value = Step> {
        let sequence = prop_oneof![
            4 => Just(SequenceChoice::Next),
            3 => (0usize..7).prop_map(SequenceChoice::Retry),
            1 => (-3i32..4).prop_map(SequenceChoice::Offset),
            1 => prop_oneof![Just(0), Just(i32::MAX - 2), 0..1000].prop_map(SequenceChoice::Start),
        ];
        (
            0i64..3,
            prop_oneof![8 => Just(0i8), 1 => Just(1), 1 => Just(-1)],
            sequence,
            1i32..4,
            proptest::bool::weighted(0.05),
        )
            .prop_map(|(id, epoch_delta, sequence, records, snapshot)| Step {
                id,
                epoch_delta,
                sequence,
                records,
                snapshot,
            })
    }

    /// The model: every batch ever written, per producer, in order.
    #[derive(Default)]
    struct Model {
        written: HashMap<i64, Vec<(i16, BatchMeta)>>,
    }

    impl Model {
        fn expected(&self, h: &BatchHeader) -> Result<Verdict, SequenceError> {
            let Some(history) = self.written.get(&h.producer_id) else {
                return Ok(Verdict::Append);
            };
            let (epoch, _) = *history.last().expect("non-empty");
            if h.producer_epoch < epoch {
                return Err(SequenceError::Fenced {
                    producer_id: h.producer_id,
                    epoch: h.producer_epoch,
                    current: epoch,
                });
            }
            let out_of_order = |expected| SequenceError::OutOfOrder {
                producer_id: h.producer_id,
                epoch: h.producer_epoch,
                expected,
                got: h.base_sequence,
            };
            if h.producer_epoch > epoch {
                return if h.base_sequence == 0 {
                    Ok(Verdict::Append)
                } else {
                    Err(out_of_order(0))
                };
            }
            // The last five batches of this epoch.
            let same_epoch: Vec<BatchMeta> = history
                .iter()
                .rev()
                .take_while(|(e, _)| *e == epoch)
                .take(RECENT_BATCHES)
                .map(|(_, b)| *b)
                .collect();
            let count = i64::from(h.record_count);
            let last = ((i64::from(h.base_sequence) + count - 1) % (1 << 31)) as i32;
            if let Some(b) = same_epoch
                .iter()
                .find(|b| b.first_sequence == h.base_sequence && b.last_sequence == last)
            {
                return Ok(Verdict::Duplicate(*b));
            }
            let expected = ((i64::from(same_epoch[0].last_sequence) + 1) % (1 << 31)) as i32;
            if h.base_sequence == expected {
                Ok(Verdict::Append)
            } else {
                Err(out_of_order(expected))
            }
        }
    }

    proptest! {
        /// The state machine agrees with a model that keeps every batch ever written,
        /// across snapshot round trips.
        #[test]
        fn check_agrees_with_a_model(steps in proptest::collection::vec(step(), 1..200)) {
            let mut states = ProducerStates::new();
            let mut model = Model::default();
            let mut next_offset = 0u64;
            for step in steps {
                let history = model.written.get(&step.id);
                let (epoch, sequence) = match history.and_then(|h| h.last()) {
                    None => (0i16, match step.sequence {
                        SequenceChoice::Start(s) => s,
                        _ => 0,
                    }),
                    Some((epoch, last)) => {
                        let epoch = (*epoch + i16::from(step.epoch_delta)).max(0);
                        let sequence = match step.sequence {
                            SequenceChoice::Next => following(last.last_sequence),
                            SequenceChoice::Retry(n) => {
                                let h = history.expect("history");
                                h[h.len().saturating_sub(n + 1)].1.first_sequence
                            }
                            SequenceChoice::Offset(d) => {
                                following(last.last_sequence).saturating_add(d).max(0)
                            }
                            SequenceChoice::Start(s) => s,
                        };
                        (epoch, sequence)
                    }
                };
                // A retry repeats the stored batch's length.
                let records = match (&step.sequence, history) {
                    (SequenceChoice::Retry(n), Some(h)) => {
                        let b = h[h.len().saturating_sub(n + 1)].1;
                        (i64::from(b.last_sequence) - i64::from(b.first_sequence))
                            .rem_euclid(1 << 31) as i32 + 1
                    }
                    _ => step.records,
                };
                let h = header(step.id, epoch, sequence, records);
                let verdict = states.check(&h);
                prop_assert_eq!(&verdict, &model.expected(&h), "{:?}", h);
                if verdict == Ok(Verdict::Append) {
                    states.record(&h, next_offset, 1);
                    model.written.entry(step.id).or_default().push((epoch, BatchMeta {
                        first_sequence: sequence,
                        last_sequence: last_sequence(sequence, records),
                        base_offset: next_offset,
                        last_offset: next_offset + records as u64 - 1,
                    }));
                    next_offset += records as u64;
                }
                if step.snapshot {
                    let decoded = ProducerStates::decode(&states.encode(next_offset));
                    prop_assert_eq!(decoded, Ok((states.clone(), next_offset)));
                }
            }
        }
    }
}
