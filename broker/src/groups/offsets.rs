//! Committed consumer-group offsets, kept in an internal Strata log at
//! `<data>/groups/offsets/` and cached in memory.
//!
//! Every change is a record of that log (docs/storage-format.md has the layout): the key
//! names the group, topic and partition, the value holds the offset, the commit time and
//! the metadata; a null value deletes. One writer thread applies changes in the order
//! they arrive, so the log's order is the order of the cache's changes and replaying
//! the log rebuilds the cache exactly. Like a partition's writer, it drains whatever has
//! queued, writes one batch and fsyncs once (group commit), then publishes the changes
//! to readers and answers: a commit is acknowledged only once it is on disk, and
//! readers never see one that is not.
//!
//! The log would grow with every commit, so once it is larger than two segments plus
//! four times its live entries, the writer appends a snapshot of every live entry and
//! deletes the segments before it. Recovery reads the log from its start, which is then
//! at most a few segments and a snapshot long.
//!
//! A failed write or fsync (a full disk, an I/O error) fails every change of its drain,
//! and the log refuses writes from then on; so does the writer, with the fault set for
//! health. It recovers by itself, without a restart: at the next change (or the
//! broker's maintenance tick, [`Offsets::maintain`]) it reopens the log, which recovery
//! brings back to whole batches, replays it, and writes whatever makes the log say
//! exactly what the cache says: the cache holds only what was acknowledged, and the
//! failed write (its committers were told it failed) may have left a whole batch on
//! disk (when cutting it failed too) that must never count. The fault is cleared once
//! a write after that succeeds (the change's, or a probe restating one entry). A
//! recovery, or a write right after one, that fails is retried after a backoff of
//! [`RETRY_BACKOFF_MIN`] doubling up to [`RETRY_BACKOFF_MAX`]; changes meanwhile are
//! refused at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use strata_storage::batch::{batches, BatchBuilder};
use strata_storage::{now_ms, Durability, FileCache, Log, LogConfig};
use tokio::sync::{mpsc, oneshot};

use crate::broker::Topic;
use crate::error::{Error, Result};
use crate::groups::assign::TopicPartition;
use crate::groups::coordinator::{CommitInFlight, Exclusive};
use crate::health::{Fault, Faults};

/// Largest metadata string of a commit.
pub const METADATA_BYTES_MAX: usize = 4096;
/// Record format version, the first byte of every key.
const FORMAT_VERSION: u8 = 1;
/// Key kinds.
const KIND_OFFSET: u8 = 1;
const KIND_GROUP_DELETED: u8 = 2;
/// An offset of a topic incarnation other than 0 (topics created before incarnations
/// existed have 0 and keep writing `KIND_OFFSET`): the key ends with the incarnation.
const KIND_OFFSET_INCARNATION: u8 = 3;
/// Segment size of the offsets log: small, so compaction frees space soon.
pub const SEGMENT_BYTES: u64 = 4 << 20;
/// Rough bytes per live entry in the log, for deciding when to compact before the
/// first snapshot has measured them.
const ENTRY_BYTES_ESTIMATE: u64 = 96;
/// Changes queued before committers wait.
const QUEUE_DEPTH: usize = 1024;
/// Changes the writer takes into one batch: one commit request is at most the Groups
/// service's 4 MiB message limit, so a drain stays well below `BATCH_BYTES_MAX`.
const DRAIN_BYTES_MAX: usize = 4 << 20;
/// The writer starts a new batch before one would pass this. A drain fits in one batch,
/// so it is durable as a whole or not at all; only a huge topic deletion or snapshot
/// spans several.
const BATCH_SPLIT_BYTES: usize = 12 << 20;
/// Largest batch the offsets log accepts: a split batch plus one record of the longest
/// kind.
const BATCH_BYTES_MAX: usize = 16 << 20;
/// Wait before retrying a recovery of the offsets log that failed (the first is tried
/// at the next change after the failed write): short, as a disk freed by an operator
/// should take commits again soon.
pub const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait between recoveries: each failed one doubles the wait, so a disk that
/// stays broken is not reopened in a loop.
pub const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// A committed position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    /// The next offset to consume.
    pub offset: u64,
    /// The committer's note.
    pub metadata: String,
    /// When it was committed, in ms since the Unix epoch.
    pub timestamp_ms: i64,
}

/// How a write treats positions already committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A consumer's commit: a position never moves backwards.
    Advance,
    /// An operator's reset: positions move wherever asked.
    Reset,
}

type GroupOffsets = BTreeMap<TopicPartition, Committed>;

/// A committed position and the incarnation of the topic it was committed for: a topic
/// recreated under the same name has another one and never sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stored {
    committed: Committed,
    incarnation: u64,
}

type Store = BTreeMap<String, BTreeMap<TopicPartition, Stored>>;
/// The incarnation of every topic that exists, by name.
type Incarnations = BTreeMap<String, u64>;

/// Checked by the writer right before it writes a commit: a member's commit that waited
/// in the queue (or behind a slow write) while its partitions moved is refused with this
/// check's error instead of landing below the new owner's position. What it returns is
/// held until the commit is answered, visible or failed: its partitions are granted to
/// no new owner while the write and its fsync run, so no new owner reads a position the
/// commit is about to replace.
pub type Fence = Box<dyn FnOnce() -> Result<CommitInFlight> + Send>;
type Reply<T> = oneshot::Sender<Result<T>>;

enum Change {
    Commit {
        group: String,
        offsets: Vec<(TopicPartition, u64, String)>,
        /// The topics of `offsets`, as they were checked: refused if deleted since.
        topics: Vec<Arc<Topic>>,
        mode: Mode,
        reply: Reply<Vec<(TopicPartition, Committed)>>,
        /// Released once the change is answered: written (and visible) or refused.
        hold: Option<Exclusive>,
        /// Checked when the commit is staged for writing; its guard is held until the
        /// commit is answered.
        fence: Option<Fence>,
    },
    DeleteGroup {
        group: String,
        reply: Reply<()>,
        hold: Option<Exclusive>,
    },
    DeleteTopic {
        topic: String,
        /// Offsets of this incarnation stay (those of the topic that exists now).
        keep: Option<u64>,
        reply: Reply<()>,
    },
    /// Nothing to write: a failed writer tries to recover, if its backoff allows.
    Retry,
    Shutdown,
}

/// The committed offsets of every group.
#[derive(Debug)]
pub struct Offsets {
    committed: Arc<RwLock<Store>>,
    /// Offsets of a topic that exists under another incarnation are invisible.
    incarnations: RwLock<Incarnations>,
    /// Set by the writer when a write fails and commits are refused.
    fault: Arc<Fault>,
    changes: mpsc::Sender<Change>,
    /// The writer thread; it ends with an error if the log did not close cleanly.
    writer: Mutex<Option<JoinHandle<std::result::Result<(), String>>>>,
}

impl std::fmt::Debug for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Change")
    }
}

impl Offsets {
    /// Opens (recovering) the offsets log in `dir`, with segments of `segment_bytes`
    /// ([`SEGMENT_BYTES`] but in tests), and starts its writer. Blocking.
    pub fn open(
        dir: &Path,
        files: &FileCache,
        segment_bytes: u64,
        faults: &Faults,
    ) -> Result<Offsets> {
        let config = LogConfig {
            segment_bytes_max: segment_bytes,
            batch_bytes_max: BATCH_BYTES_MAX,
            durability: Durability::Fsync,
            ..LogConfig::default()
        };
        let log = Log::open(dir, config.clone(), files)?;
        let committed = replay(&log)?;
        let committed = Arc::new(RwLock::new(committed));
        let (changes, receiver) = mpsc::channel(QUEUE_DEPTH);
        let fault = faults.fault();
        let writer = Writer {
            log,
            dir: dir.to_path_buf(),
            config,
            files: files.clone(),
            committed: Arc::clone(&committed),
            segment_bytes,
            snapshot_bytes: 0,
            failed: None,
            backoff: RETRY_BACKOFF_MIN,
            fault: Arc::clone(&fault),
        };
        let thread = std::thread::Builder::new()
            .name("writer-offsets".into())
            .spawn(move || writer.run(receiver))
            .map_err(|e| {
                Error::Unavailable("offsets".into(), format!("cannot start writer: {e}"))
            })?;
        Ok(Offsets {
            committed,
            incarnations: RwLock::default(),
            fault,
            changes,
            writer: Mutex::new(Some(thread)),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Store> {
        self.committed.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the incarnation of a topic that exists (`None`: it was deleted). Offsets
    /// committed for another incarnation of that name are invisible from then on.
    pub fn set_incarnation(&self, topic: &str, incarnation: Option<u64>) {
        let mut incarnations = self.incarnations.write().unwrap_or_else(|e| e.into_inner());
        match incarnation {
            Some(incarnation) => incarnations.insert(topic.to_string(), incarnation),
            None => incarnations.remove(topic),
        };
    }

    /// The visible offsets of one group's store.
    fn visible<'a>(
        &'a self,
        offsets: &'a BTreeMap<TopicPartition, Stored>,
    ) -> impl Iterator<Item = (&'a TopicPartition, &'a Committed)> + 'a {
        let incarnations = self.incarnations.read().unwrap_or_else(|e| e.into_inner());
        offsets
            .iter()
            .filter(move |(tp, stored)| {
                incarnations
                    .get(&tp.topic)
                    .is_none_or(|i| *i == stored.incarnation)
            })
            .map(|(tp, stored)| (tp, &stored.committed))
    }

    async fn send<T>(&self, change: impl FnOnce(Reply<T>) -> Change) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.changes
            .send(change(reply))
            .await
            .map_err(|_| Error::ShuttingDown)?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Commits `offsets` (partition, offset, metadata) of `topics` for `group` durably;
    /// returns the resulting position of each partition. All or nothing.
    ///
    /// `hold` (a reservation of the group against joins) is released only once the
    /// change is answered, even if the caller stops waiting (a client that disconnects):
    /// no member can join and read the position the change replaces.
    ///
    /// `fence` runs in the writer right before the commit is staged for its write; an
    /// error refuses the commit (nothing of it is written).
    pub async fn commit(
        &self,
        group: &str,
        offsets: Vec<(TopicPartition, u64, String)>,
        topics: Vec<Arc<Topic>>,
        mode: Mode,
        hold: Option<Exclusive>,
        fence: Option<Fence>,
    ) -> Result<Vec<(TopicPartition, Committed)>> {
        if let Some((tp, _, metadata)) = offsets.iter().find(|o| o.2.len() > METADATA_BYTES_MAX) {
            return Err(Error::InvalidArgument(format!(
                "metadata of {tp} is {} bytes; at most {METADATA_BYTES_MAX} are allowed",
                metadata.len()
            )));
        }
        self.send(|reply| Change::Commit {
            group: group.to_string(),
            offsets,
            topics,
            mode,
            reply,
            hold,
            fence,
        })
        .await
    }

    /// Forgets every offset of `group`; `hold` as for [`Offsets::commit`].
    pub async fn delete_group(&self, group: &str, hold: Option<Exclusive>) -> Result<()> {
        self.send(|reply| Change::DeleteGroup {
            group: group.to_string(),
            reply,
            hold,
        })
        .await
    }

    /// Forgets every group's offsets of `topic` (it was deleted: a topic created later
    /// under the same name must not inherit them).
    pub async fn delete_topic(&self, topic: &str) -> Result<()> {
        self.send(|reply| Change::DeleteTopic {
            topic: topic.to_string(),
            keep: None,
            reply,
        })
        .await
    }

    /// Forgets the offsets of topics that no longer exist or exist under another
    /// incarnation (`current` gives a topic's incarnation, `None` when it does not
    /// exist): a crash or a failed write between a topic's deletion and its offsets'
    /// leaves them behind. Blocking.
    pub fn forget_stale_topics(&self, current: impl Fn(&str) -> Option<u64>) -> Result<()> {
        let stale: BTreeMap<String, Option<u64>> = self
            .read()
            .values()
            .flat_map(|offsets| offsets.iter())
            .filter_map(|(tp, stored)| {
                let now = current(&tp.topic);
                (now != Some(stored.incarnation)).then(|| (tp.topic.clone(), now))
            })
            .collect();
        for (topic, keep) in stale {
            tracing::info!(%topic, "forgetting committed offsets of a deleted topic");
            let (reply, answer) = oneshot::channel();
            self.changes
                .blocking_send(Change::DeleteTopic { topic, keep, reply })
                .map_err(|_| Error::ShuttingDown)?;
            answer.blocking_recv().map_err(|_| Error::ShuttingDown)??;
        }
        Ok(())
    }

    /// Holds the published offsets: the writer stops at its next change until the
    /// guard is dropped, so a test can move partitions while commits wait in the queue.
    #[cfg(test)]
    pub(crate) fn stall(&self) -> impl Sized + '_ {
        self.committed.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Why commits are refused, while they are.
    pub fn fault(&self) -> &Fault {
        &self.fault
    }

    /// Asks a failed writer to try to recover (it does once its backoff has passed), so
    /// commits and health come back without waiting for a commit. Never blocks.
    pub fn maintain(&self) {
        if self.fault.reason().is_some() {
            // A full queue has changes that will try the same.
            let _ = self.changes.try_send(Change::Retry);
        }
    }

    /// The committed offsets of `group`.
    pub fn group(&self, group: &str) -> GroupOffsets {
        self.read()
            .get(group)
            .map(|offsets| {
                self.visible(offsets)
                    .map(|(tp, c)| (tp.clone(), c.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// True when `group` has committed offsets.
    pub fn has_group(&self, group: &str) -> bool {
        self.read()
            .get(group)
            .is_some_and(|offsets| self.visible(offsets).next().is_some())
    }

    /// Names of the groups with committed offsets.
    pub fn groups(&self) -> Vec<String> {
        self.read()
            .iter()
            .filter(|(_, offsets)| self.visible(offsets).next().is_some())
            .map(|(group, _)| group.clone())
            .collect()
    }

    /// Stops the writer after it has answered everything queued, and closes the log;
    /// the error says why it could not. Blocking.
    pub fn shutdown(&self) -> std::result::Result<(), String> {
        let _ = self.changes.blocking_send(Change::Shutdown);
        let thread = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        match thread.map(JoinHandle::join) {
            None | Some(Ok(Ok(()))) => Ok(()),
            Some(Ok(Err(e))) => Err(format!("offsets log: {e}")),
            Some(Err(_)) => Err("offsets log: the writer thread panicked".into()),
        }
    }
}

impl Drop for Offsets {
    /// Without a [`Offsets::shutdown`] (a broker dropped without its shutdown): ends the
    /// writer by dropping the only sender, and waits while it writes what is queued and
    /// closes the log, so whoever holds the data directory's lock outlives the writes.
    /// No `blocking_send`: this may run on an async worker.
    fn drop(&mut self) {
        let (closed, _) = mpsc::channel(1);
        drop(std::mem::replace(&mut self.changes, closed));
        if let Some(thread) = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = thread.join();
        }
    }
}

/// Encodes the key of a partition's offset.
fn offset_key(out: &mut Vec<u8>, group: &str, tp: &TopicPartition, incarnation: u64) {
    out.clear();
    let kind = if incarnation == 0 {
        KIND_OFFSET
    } else {
        KIND_OFFSET_INCARNATION
    };
    out.extend_from_slice(&[FORMAT_VERSION, kind]);
    put_str(out, group);
    put_str(out, &tp.topic);
    out.extend_from_slice(&tp.partition.to_be_bytes());
    if incarnation != 0 {
        out.extend_from_slice(&incarnation.to_be_bytes());
    }
}

fn group_deleted_key(out: &mut Vec<u8>, group: &str) {
    out.clear();
    out.extend_from_slice(&[FORMAT_VERSION, KIND_GROUP_DELETED]);
    put_str(out, group);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    // Group and topic names are at most 249 bytes, metadata is not part of a key.
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn offset_value(out: &mut Vec<u8>, committed: &Committed) {
    out.clear();
    out.extend_from_slice(&committed.offset.to_be_bytes());
    out.extend_from_slice(&committed.timestamp_ms.to_be_bytes());
    out.extend_from_slice(committed.metadata.as_bytes());
}

/// A decoded record of the offsets log.
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Offset {
        group: String,
        tp: TopicPartition,
        /// The topic's incarnation (0 in records from before incarnations).
        incarnation: u64,
        committed: Option<Committed>,
    },
    GroupDeleted {
        group: String,
    },
}

fn bad(why: &str) -> Error {
    Error::Storage(strata_storage::Error::InvalidConfig(format!(
        "the committed-offsets log holds a record this broker cannot read ({why}); \
         was it written by a newer version?"
    )))
}

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
    if bytes.len() < n {
        return Err(bad("truncated key or value"));
    }
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    Ok(head)
}

fn take_str(bytes: &mut &[u8]) -> Result<String> {
    let len = u16::from_be_bytes(take(bytes, 2)?.try_into().expect("2 bytes")) as usize;
    String::from_utf8(take(bytes, len)?.to_vec()).map_err(|_| bad("a name is not UTF-8"))
}

fn decode(key: &[u8], value: Option<&[u8]>) -> Result<Entry> {
    let mut key = key;
    let header = take(&mut key, 2)?;
    if header[0] != FORMAT_VERSION {
        return Err(bad(&format!("format version {}", header[0])));
    }
    let group = take_str(&mut key)?;
    match header[1] {
        kind @ (KIND_OFFSET | KIND_OFFSET_INCARNATION) => {
            let topic = take_str(&mut key)?;
            let partition = u32::from_be_bytes(take(&mut key, 4)?.try_into().expect("4 bytes"));
            let incarnation = if kind == KIND_OFFSET {
                0
            } else {
                u64::from_be_bytes(take(&mut key, 8)?.try_into().expect("8 bytes"))
            };
            let committed = match value {
                None => None,
                Some(mut value) => {
                    let offset = u64::from_be_bytes(take(&mut value, 8)?.try_into().expect("8"));
                    let timestamp_ms =
                        i64::from_be_bytes(take(&mut value, 8)?.try_into().expect("8"));
                    let metadata = String::from_utf8(value.to_vec())
                        .map_err(|_| bad("metadata is not UTF-8"))?;
                    Some(Committed {
                        offset,
                        metadata,
                        timestamp_ms,
                    })
                }
            };
            Ok(Entry::Offset {
                group,
                tp: TopicPartition { topic, partition },
                incarnation,
                committed,
            })
        }
        KIND_GROUP_DELETED => Ok(Entry::GroupDeleted { group }),
        kind => Err(bad(&format!("record kind {kind}"))),
    }
}

fn apply(committed: &mut Store, entry: Entry) {
    match entry {
        Entry::Offset {
            group,
            tp,
            incarnation,
            committed: Some(c),
        } => {
            let stored = Stored {
                committed: c,
                incarnation,
            };
            committed.entry(group).or_default().insert(tp, stored);
        }
        Entry::Offset {
            group,
            tp,
            committed: None,
            ..
        } => {
            if let Some(offsets) = committed.get_mut(&group) {
                offsets.remove(&tp);
                if offsets.is_empty() {
                    committed.remove(&group);
                }
            }
        }
        Entry::GroupDeleted { group } => {
            committed.remove(&group);
        }
    }
}

/// Rebuilds the offsets from the whole log.
fn replay(log: &Log) -> Result<Store> {
    let reader = log.reader();
    let mut committed = BTreeMap::new();
    let mut offset = reader.earliest_offset();
    while offset < reader.high_watermark() {
        let read = reader.read(offset, 1 << 20)?;
        for batch in batches(&read.batches) {
            let batch = batch.map_err(strata_storage::Error::from)?;
            for record in batch.records() {
                let record = record.map_err(strata_storage::Error::from)?;
                if record.offset < offset {
                    continue;
                }
                let key = record.key.ok_or_else(|| bad("a record without a key"))?;
                apply(&mut committed, decode(key, record.value)?);
            }
        }
        offset = read.next_offset;
    }
    Ok(committed)
}

struct Writer {
    log: Log,
    /// Where the log is, how, and its read handles: to reopen it after a failure.
    dir: PathBuf,
    config: LogConfig,
    files: FileCache,
    /// The acknowledged state: every change written and fsynced, nothing else.
    committed: Arc<RwLock<Store>>,
    segment_bytes: u64,
    /// Size of the last snapshot: the live entries' size in the log.
    snapshot_bytes: u64,
    /// Set after a failed write: every change is refused until a recovery and a write
    /// after it succeed.
    failed: Option<Failed>,
    /// The wait after the next failed recovery (or failed write right after one).
    backoff: Duration,
    fault: Arc<Fault>,
}

/// A failed writer's state.
struct Failed {
    /// What failed, for every refused change.
    why: String,
    /// No recovery is tried before then.
    retry_at: Instant,
}

/// One change to publish once durable: the new value, `None` to delete.
type Pending = BTreeMap<(String, TopicPartition), Option<Stored>>;

/// What to write to a log replaying to `durable` so that it replays to `acknowledged`:
/// each entry that differs, as its acknowledged value or a deletion.
fn differences(durable: &Store, acknowledged: &Store) -> Pending {
    let entry = |store: &Store, group: &str, tp: &TopicPartition| -> Option<Stored> {
        store
            .get(group)
            .and_then(|offsets| offsets.get(tp))
            .cloned()
    };
    let mut repair = Pending::new();
    for (group, offsets) in durable.iter().chain(acknowledged) {
        for tp in offsets.keys() {
            let wanted = entry(acknowledged, group, tp);
            if entry(durable, group, tp) != wanted {
                repair.insert((group.clone(), tp.clone()), wanted);
            }
        }
    }
    repair
}

/// The error every change of a failed write gets.
fn unavailable(written: &std::result::Result<(), String>) -> Result<()> {
    written
        .clone()
        .map_err(|why| Error::Unavailable("offsets".into(), why))
}

enum Answer {
    Committed(
        Reply<Vec<(TopicPartition, Committed)>>,
        Result<Vec<(TopicPartition, Committed)>>,
        Option<Exclusive>,
        Option<CommitInFlight>,
    ),
    Done(Reply<()>, Option<Exclusive>),
}

impl Writer {
    /// Serves changes until shutdown; then closes the log, returning why it could not.
    fn run(mut self, mut changes: mpsc::Receiver<Change>) -> std::result::Result<(), String> {
        let mut shutdown = false;
        while !shutdown {
            let Some(first) = changes.blocking_recv() else {
                break;
            };
            let mut pending = Pending::new();
            let mut deleted_groups = Vec::new();
            let mut answers = Vec::new();
            let mut staged_bytes = 0;
            let mut next = Some(first);
            while let Some(change) = next.take() {
                match change {
                    Change::Commit {
                        group,
                        offsets,
                        topics,
                        mode,
                        reply,
                        hold,
                        fence,
                    } => {
                        staged_bytes += offsets.iter().map(|o| o.2.len() + 64).sum::<usize>();
                        let (fenced, in_flight) = match fence.map(|check| check()) {
                            None => (Ok(()), None),
                            Some(Ok(guard)) => (Ok(()), Some(guard)),
                            Some(Err(e)) => (Err(e), None),
                        };
                        let result = match topics.iter().find(|t| t.is_deleted()) {
                            Some(gone) => Err(Error::TopicNotFound(gone.name.clone())),
                            None if fenced.is_err() => fenced.map(|()| Vec::new()),
                            None => Ok(self.stage_commit(
                                &mut pending,
                                &deleted_groups,
                                group,
                                offsets,
                                &topics,
                                mode,
                            )),
                        };
                        answers.push(Answer::Committed(reply, result, hold, in_flight));
                    }
                    Change::DeleteGroup { group, reply, hold } => {
                        pending.retain(|(g, _), _| *g != group);
                        deleted_groups.push(group);
                        answers.push(Answer::Done(reply, hold));
                    }
                    Change::DeleteTopic { topic, keep, reply } => {
                        self.stage_topic_deletion(&mut pending, &deleted_groups, &topic, keep);
                        answers.push(Answer::Done(reply, None));
                    }
                    Change::Retry => {}
                    Change::Shutdown => shutdown = true,
                }
                if shutdown || answers.len() >= QUEUE_DEPTH || staged_bytes >= DRAIN_BYTES_MAX {
                    break;
                }
                next = changes.try_recv().ok();
            }
            let written = self.write(&pending, &deleted_groups);
            if written.is_ok() {
                let mut committed = self.committed.write().unwrap_or_else(|e| e.into_inner());
                for group in &deleted_groups {
                    committed.remove(group);
                }
                for ((group, tp), value) in pending {
                    apply(
                        &mut committed,
                        Entry::Offset {
                            group,
                            tp,
                            incarnation: value.as_ref().map_or(0, |v| v.incarnation),
                            committed: value.map(|v| v.committed),
                        },
                    );
                }
            }
            // Each reservation is released before its answer, with the change visible
            // already: a committer that hears back finds its partitions grantable, and
            // a reset or deletion that hears back finds the group free for the next one.
            for answer in answers {
                match answer {
                    Answer::Committed(reply, result, hold, in_flight) => {
                        drop((hold, in_flight));
                        let _ = reply.send(unavailable(&written).and(result));
                    }
                    Answer::Done(reply, hold) => {
                        drop(hold);
                        let _ = reply.send(unavailable(&written));
                    }
                }
            }
            if written.is_ok() {
                self.compact_if_large();
            }
        }
        // A failed log is poisoned and cannot close; recovery at the next start brings
        // it back to what was acknowledged, as a recovery here would have.
        if let Some(failed) = self.failed {
            return Err(format!(
                "not closed after an earlier failure ({})",
                failed.why
            ));
        }
        self.log.close().map_err(|e| {
            tracing::error!(error = %e, "closing the offsets log failed");
            format!("closing failed: {e}")
        })
    }

    /// The current value of a partition's offset, staged changes included.
    /// Another incarnation's value counts as none.
    fn current(
        &self,
        pending: &Pending,
        deleted_groups: &[String],
        group: &str,
        tp: &TopicPartition,
        incarnation: u64,
    ) -> Option<Committed> {
        let stored = match pending.get(&(group.to_string(), tp.clone())) {
            Some(staged) => staged.clone(),
            None if deleted_groups.iter().any(|g| g == group) => None,
            None => {
                let committed = self.committed.read().unwrap_or_else(|e| e.into_inner());
                committed.get(group)?.get(tp).cloned()
            }
        };
        stored
            .filter(|s| s.incarnation == incarnation)
            .map(|s| s.committed)
    }

    fn stage_commit(
        &self,
        pending: &mut Pending,
        deleted_groups: &[String],
        group: String,
        offsets: Vec<(TopicPartition, u64, String)>,
        topics: &[Arc<Topic>],
        mode: Mode,
    ) -> Vec<(TopicPartition, Committed)> {
        let now = now_ms();
        let mut result = Vec::with_capacity(offsets.len());
        for (tp, offset, metadata) in offsets {
            let incarnation = topics
                .iter()
                .find(|t| t.name == tp.topic)
                .map_or(0, |t| t.incarnation);
            let current = self.current(pending, deleted_groups, &group, &tp, incarnation);
            let unchanged = current
                .as_ref()
                .is_some_and(|c| c.offset == offset && c.metadata == metadata);
            let behind =
                mode == Mode::Advance && current.as_ref().is_some_and(|c| c.offset > offset);
            let value = match current {
                Some(current) if unchanged || behind => current,
                _ => {
                    let value = Committed {
                        offset,
                        metadata,
                        timestamp_ms: now,
                    };
                    let stored = Stored {
                        committed: value.clone(),
                        incarnation,
                    };
                    pending.insert((group.clone(), tp.clone()), Some(stored));
                    value
                }
            };
            result.push((tp, value));
        }
        result
    }

    /// Deletes the offsets of `topic` but those of incarnation `keep`.
    fn stage_topic_deletion(
        &self,
        pending: &mut Pending,
        deleted_groups: &[String],
        topic: &str,
        keep: Option<u64>,
    ) {
        let committed = self.committed.read().unwrap_or_else(|e| e.into_inner());
        let stored = committed
            .iter()
            .filter(|(group, _)| !deleted_groups.contains(group))
            .flat_map(|(group, offsets)| offsets.iter().map(move |(tp, s)| (group, tp, s)))
            .filter(|(_, tp, s)| tp.topic == topic && keep != Some(s.incarnation))
            .map(|(group, tp, _)| (group.clone(), tp.clone()))
            .collect::<Vec<_>>();
        drop(committed);
        for key in stored {
            pending.entry(key).or_insert(None);
        }
        for (key, value) in pending.iter_mut() {
            if key.1.topic == topic && keep != value.as_ref().map(|v| v.incarnation) {
                *value = None;
            }
        }
    }

    /// Writes the staged changes as one batch and fsyncs; the error says what failed.
    /// A failed writer first tries to recover ([`Writer::recover`]), and is failed no
    /// more, with its fault cleared, only once a write has succeeded: the changes', or
    /// without any (a retry of the maintenance tick) a probe's.
    fn write(
        &mut self,
        pending: &Pending,
        deleted_groups: &[String],
    ) -> std::result::Result<(), String> {
        let recovering = self.failed.is_some();
        if recovering {
            self.recover()?;
        }
        let nothing = pending.is_empty() && deleted_groups.is_empty();
        if nothing && !recovering {
            return Ok(());
        }
        let written = if nothing {
            self.probe()
        } else {
            self.write_records(pending, deleted_groups)
        };
        match written {
            Ok(()) => {
                if recovering {
                    tracing::info!(
                        "the committed-offsets log is reopened; commits are accepted again"
                    );
                    self.fault.clear();
                }
                self.failed = None;
                self.backoff = RETRY_BACKOFF_MIN;
                Ok(())
            }
            Err(e) => {
                let why = format!("writing the committed-offsets log failed: {e}");
                // A first failure is retried at the next change, as its cause may have
                // been brief; one right after a recovery waits, longer each time.
                let wait = if recovering {
                    tracing::warn!("{why}, again after reopening the log");
                    let wait = self.backoff;
                    self.backoff = (self.backoff * 2).min(RETRY_BACKOFF_MAX);
                    wait
                } else {
                    tracing::error!("{why}; commits are refused until the log is reopened");
                    Duration::ZERO
                };
                self.failed = Some(Failed {
                    why: why.clone(),
                    retry_at: Instant::now() + wait,
                });
                self.fault.set(why.clone());
                Err(why)
            }
        }
    }

    /// Once the backoff allows, reopens the failed log so that it holds exactly the
    /// acknowledged state ([`Writer::reopen`]). Errs with the failure when it may not
    /// yet, or cannot.
    fn recover(&mut self) -> std::result::Result<(), String> {
        let now = Instant::now();
        let retry_at = self.failed.as_ref().map_or(now, |f| f.retry_at);
        let reopened = if now < retry_at {
            Ok(false)
        } else {
            self.reopen().map(|()| true)
        };
        let failed = self.failed.as_mut().expect("only a failed writer recovers");
        match reopened {
            Ok(true) => Ok(()),
            Ok(false) => Err(failed.why.clone()),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    retry_in = ?self.backoff,
                    "reopening the committed-offsets log failed"
                );
                failed.retry_at = now + self.backoff;
                self.backoff = (self.backoff * 2).min(RETRY_BACKOFF_MAX);
                Err(failed.why.clone())
            }
        }
    }

    /// Reopens the log (its recovery cuts any partial batch) and writes what makes it
    /// replay to the cache: a whole batch of a failed write that is still on disk is
    /// overwritten, anything acknowledged but missing written again.
    fn reopen(&mut self) -> std::result::Result<(), String> {
        let log =
            Log::open(&self.dir, self.config.clone(), &self.files).map_err(|e| e.to_string())?;
        let durable = replay(&log).map_err(|e| e.to_string())?;
        // The poisoned log goes; nothing reads it.
        self.log = log;
        let repair = {
            let acknowledged = self.committed.read().unwrap_or_else(|e| e.into_inner());
            differences(&durable, &acknowledged)
        };
        if !repair.is_empty() {
            tracing::warn!(
                entries = repair.len(),
                "the reopened committed-offsets log differs from what was acknowledged \
                 (a failed write left a batch behind); rewriting those entries"
            );
            self.write_records(&repair, &[])
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Proves that a reopened log takes writes when no change is waiting: restates one
    /// acknowledged entry, which replays to the same state. With none, there is nothing
    /// a failing log could lose.
    fn probe(&mut self) -> strata_storage::Result<()> {
        let entry: Pending = {
            let committed = self.committed.read().unwrap_or_else(|e| e.into_inner());
            committed
                .iter()
                .flat_map(|(group, offsets)| {
                    offsets
                        .iter()
                        .map(move |(tp, s)| ((group.clone(), tp.clone()), Some(s.clone())))
                })
                .take(1)
                .collect()
        };
        if entry.is_empty() {
            return Ok(());
        }
        self.write_records(&entry, &[])
    }

    fn write_records(
        &mut self,
        pending: &Pending,
        deleted_groups: &[String],
    ) -> strata_storage::Result<()> {
        let now = now_ms();
        let (mut key, mut value) = (Vec::new(), Vec::new());
        let mut builder = BatchBuilder::new();
        for group in deleted_groups {
            group_deleted_key(&mut key, group);
            builder.push(now, Some(&key), None, &[]);
        }
        for ((group, tp), stored) in pending {
            offset_key(
                &mut key,
                group,
                tp,
                stored.as_ref().map_or(0, |s| s.incarnation),
            );
            let value = stored.as_ref().map(|s| {
                offset_value(&mut value, &s.committed);
                &value[..]
            });
            builder.push(now, Some(&key), value, &[]);
            if builder.encoded_len() >= BATCH_SPLIT_BYTES {
                self.log.write(&builder.finish())?;
                builder = BatchBuilder::new();
            }
        }
        if builder.encoded_len() > strata_storage::batch::BATCH_HEADER_LEN {
            self.log.write(&builder.finish())?;
        }
        self.log.commit().map(|_| ())
    }

    /// Appends a snapshot of every live entry and deletes what came before it, once the
    /// log is larger than two segments plus twice its live entries (as the last
    /// snapshot measured them, or estimated before the first).
    fn compact_if_large(&mut self) {
        let size = self.log.size_bytes();
        let snapshot = {
            let committed = self.committed.read().unwrap_or_else(|e| e.into_inner());
            let live = committed.values().map(|g| g.len() as u64).sum::<u64>();
            let live_bytes = self.snapshot_bytes.max(live * ENTRY_BYTES_ESTIMATE);
            if size < 2 * self.segment_bytes + 2 * live_bytes {
                return;
            }
            committed
                .iter()
                .flat_map(|(group, offsets)| {
                    offsets
                        .iter()
                        .map(move |(tp, c)| ((group.clone(), tp.clone()), Some(c.clone())))
                })
                .collect::<Pending>()
        };
        let start = self.log.next_offset();
        let before = self.log.size_bytes();
        let written = self.write(&snapshot, &[]);
        self.snapshot_bytes = self.log.size_bytes().saturating_sub(before);
        match written.and_then(|()| self.log.delete_before(start).map_err(|e| e.to_string())) {
            Ok(deleted) => tracing::info!(
                before = size,
                after = self.log.size_bytes(),
                segments = deleted,
                "compacted the committed-offsets log"
            ),
            Err(e) => tracing::error!(error = %e, "compacting the committed-offsets log failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: u32) -> TopicPartition {
        TopicPartition::new("orders", p)
    }

    fn open(dir: &Path, segment_bytes: u64) -> Offsets {
        Offsets::open(dir, &FileCache::new(8), segment_bytes, &Faults::default()).expect("open")
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    }

    /// A reset whose caller stops waiting (a client that disconnects) keeps the group
    /// reserved against joins until the reset is visible: a member can never join and
    /// read the position it replaces (the reservation used to end with the caller).
    #[test]
    fn a_reservation_is_held_until_the_change_is_visible() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = runtime();
        let _entered = rt.enter();
        let offsets = open(dir.path(), SEGMENT_BYTES);
        let coordinator = crate::groups::coordinator::Coordinator::default();
        for round in 1..=20u64 {
            let hold = coordinator.exclusive("g", "reset").expect("free");
            let mut reset = Box::pin(offsets.commit(
                "g",
                vec![(tp(0), round, String::new())],
                vec![],
                Mode::Reset,
                Some(hold),
                None,
            ));
            // One poll sends the change; then the caller goes away.
            let waker = std::task::Waker::noop();
            let _ = std::future::Future::poll(
                reset.as_mut(),
                &mut std::task::Context::from_waker(waker),
            );
            drop(reset);
            loop {
                if let Ok(free) = coordinator.exclusive("g", "reset") {
                    let now = offsets.group("g").get(&tp(0)).map(|c| c.offset);
                    assert_eq!(now, Some(round), "free before the reset was visible");
                    drop(free);
                    break;
                }
                std::thread::yield_now();
            }
        }
    }

    #[test]
    fn commits_never_move_back_resets_do_and_everything_survives_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = runtime();
        let offsets = open(dir.path(), SEGMENT_BYTES);
        rt.block_on(async {
            let c = offsets
                .commit(
                    "g",
                    vec![(tp(0), 10, "m".into()), (tp(1), 5, String::new())],
                    vec![],
                    Mode::Advance,
                    None,
                    None,
                )
                .await
                .expect("commit");
            assert_eq!(c[0].1.offset, 10);
            let c = offsets
                .commit(
                    "g",
                    vec![(tp(0), 7, String::new())],
                    vec![],
                    Mode::Advance,
                    None,
                    None,
                )
                .await
                .expect("commit");
            assert_eq!((c[0].1.offset, c[0].1.metadata.as_str()), (10, "m"));
            offsets
                .commit(
                    "g",
                    vec![(tp(1), 2, String::new())],
                    vec![],
                    Mode::Reset,
                    None,
                    None,
                )
                .await
                .expect("reset");
            offsets
                .commit(
                    "other",
                    vec![(TopicPartition::new("gone", 0), 3, String::new())],
                    vec![],
                    Mode::Advance,
                    None,
                    None,
                )
                .await
                .expect("commit");
            offsets.delete_topic("gone").await.expect("delete topic");
            offsets
                .commit(
                    "dropped",
                    vec![(tp(0), 1, String::new())],
                    vec![],
                    Mode::Advance,
                    None,
                    None,
                )
                .await
                .expect("commit");
            offsets
                .delete_group("dropped", None)
                .await
                .expect("delete group");
            let too_long = "x".repeat(METADATA_BYTES_MAX + 1);
            assert!(matches!(
                offsets
                    .commit(
                        "g",
                        vec![(tp(0), 11, too_long)],
                        vec![],
                        Mode::Advance,
                        None,
                        None
                    )
                    .await,
                Err(Error::InvalidArgument(_))
            ));
        });
        let expect = |offsets: &Offsets| {
            let g = offsets.group("g");
            assert_eq!(g[&tp(0)].offset, 10);
            assert_eq!(g[&tp(0)].metadata, "m");
            assert_eq!(g[&tp(1)].offset, 2);
            assert_eq!(offsets.groups(), ["g"]);
        };
        expect(&offsets);
        offsets.shutdown().expect("closed cleanly");
        let reopened = open(dir.path(), SEGMENT_BYTES);
        expect(&reopened);
        reopened.shutdown().expect("closed cleanly");
    }

    fn commit(
        rt: &tokio::runtime::Runtime,
        offsets: &Offsets,
        tp: TopicPartition,
        offset: u64,
    ) -> Result<Vec<(TopicPartition, Committed)>> {
        rt.block_on(offsets.commit(
            "g",
            vec![(tp, offset, String::new())],
            vec![],
            Mode::Advance,
            None,
            None,
        ))
    }

    /// A failed write of the offsets log (a full disk, a failed fsync) used to refuse
    /// every commit until the broker restarted. The commits of the failed write are
    /// refused and never count, even when the failed fsync's cut failed too and left
    /// their batch whole on disk; the next commit reopens the log and goes through,
    /// without a restart; and after a restart the log holds exactly what was
    /// acknowledged.
    #[test]
    fn a_failed_write_is_discarded_and_commits_resume_without_a_restart() {
        use strata_storage::fault::{Fault, Injector, Op};

        let dir = tempfile::tempdir().expect("tempdir");
        let injector = Injector::new(dir.path()).expect("injector");
        let rt = runtime();
        let offsets = open(injector.root(), SEGMENT_BYTES);
        commit(&rt, &offsets, tp(0), 1).expect("commit");

        // The fsync fails, and so does cutting the batch it did not make durable.
        injector.fail_nth(Op::Sync, 1, Fault::eio());
        injector.fail_nth(Op::SetLen, 1, Fault::eio());
        let e = commit(&rt, &offsets, tp(1), 5).expect_err("the fsync failed");
        assert!(matches!(e, Error::Unavailable(..)), "{e:?}");
        assert!(offsets.fault().reason().is_some());
        assert_eq!(offsets.group("g").len(), 1, "nothing of it is visible");
        commit(&rt, &offsets, tp(0), 2).expect("the log recovered");
        assert_eq!(offsets.fault().reason(), None);

        // A write that fills the disk halfway through its batch.
        injector.fail_nth(Op::Write, 1, Fault::short_write(20));
        commit(&rt, &offsets, tp(2), 9).expect_err("the disk is full");
        offsets.maintain();
        commit(&rt, &offsets, tp(0), 3).expect("the log recovered again");
        let acknowledged = offsets.group("g");
        assert_eq!(
            acknowledged.keys().cloned().collect::<Vec<_>>(),
            vec![tp(0)]
        );
        assert_eq!(acknowledged[&tp(0)].offset, 3);

        offsets.shutdown().expect("closed cleanly");
        let reopened = open(injector.root(), SEGMENT_BYTES);
        assert_eq!(
            reopened.group("g"),
            acknowledged,
            "exactly what was acknowledged"
        );
        reopened.shutdown().expect("closed cleanly");
    }

    /// While the disk stays broken, recoveries fail too (reopening the log writes): every
    /// commit is refused and the fault stays set; once the disk works commits resume.
    #[test]
    fn a_broken_disk_keeps_commits_refused_until_it_works_again() {
        use strata_storage::fault::{Fault, Injector, Op};

        let dir = tempfile::tempdir().expect("tempdir");
        let injector = Injector::new(dir.path()).expect("injector");
        let rt = runtime();
        let offsets = open(injector.root(), SEGMENT_BYTES);
        injector.fail_from(Op::Sync, 1, Fault::no_space());
        injector.fail_from(Op::Write, 1, Fault::no_space());
        for offset in 0..5 {
            commit(&rt, &offsets, tp(0), offset).expect_err("the disk is full");
            assert!(offsets.fault().reason().is_some());
        }
        injector.clear();
        // The backoff of a failed recovery may still run: the fault clears once it
        // has passed, at a commit or at the maintenance tick.
        while commit(&rt, &offsets, tp(0), 7).is_err() {
            offsets.maintain();
            std::thread::yield_now();
        }
        assert_eq!(offsets.fault().reason(), None);
        assert_eq!(offsets.group("g")[&tp(0)].offset, 7);
        offsets.shutdown().expect("closed cleanly");
        let reopened = open(injector.root(), SEGMENT_BYTES);
        assert_eq!(reopened.group("g")[&tp(0)].offset, 7);
    }

    #[test]
    fn the_log_compacts_to_its_live_entries_and_replays_the_same() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = runtime();
        let offsets = open(dir.path(), 64 << 10);
        rt.block_on(async {
            for round in 0..3000u64 {
                let batch = (0..8).map(|p| (tp(p), round, "x".repeat(64))).collect();
                offsets
                    .commit("g", batch, vec![], Mode::Advance, None, None)
                    .await
                    .expect("commit");
            }
        });
        // Index files are preallocated; the segments' .log files hold the data.
        let log_dir_bytes = |dir: &Path| -> u64 {
            std::fs::read_dir(dir)
                .expect("read dir")
                .map(|e| e.expect("entry").path())
                .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
                .map(|path| std::fs::metadata(path).expect("metadata").len())
                .sum()
        };
        // 3000 rounds of 8 entries of ~100 bytes are ~2.4 MB written; compaction keeps
        // two or three segments.
        let kept = log_dir_bytes(dir.path());
        assert!(kept < 512 << 10, "{kept} bytes kept");
        offsets.shutdown().expect("closed cleanly");
        let reopened = open(dir.path(), 64 << 10);
        let g = reopened.group("g");
        assert_eq!(g.len(), 8);
        assert!(g.values().all(|c| c.offset == 2999));
    }

    #[test]
    fn a_commit_larger_than_a_data_batch_is_one_durable_batch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let rt = runtime();
        let offsets = open(dir.path(), SEGMENT_BYTES);
        // 300 partitions with the largest metadata: ~1.2 MiB in one request.
        let big: Vec<_> = (0..300)
            .map(|p| (tp(p), 1, "m".repeat(METADATA_BYTES_MAX)))
            .collect();
        rt.block_on(offsets.commit("g", big, vec![], Mode::Advance, None, None))
            .expect("a large commit");
        rt.block_on(offsets.commit(
            "g",
            vec![(tp(0), 2, String::new())],
            vec![],
            Mode::Advance,
            None,
            None,
        ))
        .expect("later commits still work");
        offsets.shutdown().expect("closed cleanly");
        let reopened = open(dir.path(), SEGMENT_BYTES);
        assert_eq!(reopened.group("g").len(), 300);
        reopened.shutdown().expect("closed cleanly");
    }

    #[test]
    fn records_round_trip_and_unknown_ones_are_refused() {
        let mut key = Vec::new();
        let mut value = Vec::new();
        let c = Committed {
            offset: 42,
            metadata: "meta".into(),
            timestamp_ms: 7,
        };
        // Incarnation 0 (a topic from before incarnations) keeps the old record kind.
        for incarnation in [0, u64::MAX - 5] {
            offset_key(&mut key, "g", &tp(3), incarnation);
            assert_eq!(key[1] == KIND_OFFSET, incarnation == 0);
            offset_value(&mut value, &c);
            assert_eq!(
                decode(&key, Some(&value)).expect("decode"),
                Entry::Offset {
                    group: "g".into(),
                    tp: tp(3),
                    incarnation,
                    committed: Some(c.clone())
                }
            );
        }
        group_deleted_key(&mut key, "g");
        assert_eq!(
            decode(&key, None).expect("decode"),
            Entry::GroupDeleted { group: "g".into() }
        );
        assert!(decode(&[9, 1, 0, 0], None).is_err());
        assert!(decode(&[FORMAT_VERSION, 7, 0, 0], None).is_err());
        assert!(decode(&[FORMAT_VERSION, KIND_OFFSET, 0, 5, b'a'], None).is_err());
    }
}
