//! One partition: its log, owned by a writer of the writer pool ([`super::writers`]),
//! and the read side shared with request handlers.
//!
//! Producers send batches to the partition's writer over its bounded queue. A pool
//! thread drains whatever has queued up, writes every batch, commits once (one fsync
//! under the `fsync` policy: group commit) and only then answers each producer.
//! Concurrent producers therefore share fsyncs, and the more of them there are, the
//! larger each group gets. Readers go straight to the log through a [`LogReader`] and
//! wait for new data on a watch channel that carries the high watermark.
//!
//! The writer also owns the partition's idempotent producer state
//! ([`ProducerStates`]): each batch with a producer id is checked against it before it
//! is staged, so a retry is recognised even when its original is staged in the same
//! commit group. A duplicate is answered with the original's offsets, after the commit
//! that makes the original durable if it is not yet. The state is recovered when the
//! partition opens and snapshotted periodically and at a clean close.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Duration;

use strata_storage::batch::{Batch, BatchHeader, NO_PRODUCER_ID};
use strata_storage::producer::{ProducerStates, SnapshotUse, Verdict};
use strata_storage::{now_ms, AppendInfo, Durability, FileCache, Log, LogConfig, LogReader};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit};

use crate::error::{Error, Result};
use crate::health::{Fault, Faults};
use crate::metrics::{Metrics, PartitionStats};

use super::writers::{Command, Scheduler, Slot, Writers};

/// When a producer gets its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// After the commit that makes the batch durable under the topic's policy.
    Durable,
    /// As soon as the batch is written into the log, before any fsync.
    Leader,
}

/// Where a produced batch is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// Its offsets.
    pub info: AppendInfo,
    /// It was a retry of a batch already stored: `info` is the original's, and nothing
    /// was written.
    pub duplicate: bool,
}

/// A partition of a topic.
pub struct Partition {
    name: String,
    reader: LogReader,
    /// The writer's queue; every command sent is followed by scheduling `slot`.
    commands: mpsc::Sender<Command>,
    slot: Arc<Slot>,
    scheduler: Scheduler,
    high_watermark: watch::Receiver<u64>,
    /// The largest producer id in the state recovered at open.
    max_producer_id: Option<i64>,
    stats: Arc<PartitionStats>,
    /// Set by the writer when the partition fail-stops.
    fault: Arc<Fault>,
    /// Set by the writer when a maintenance tick would find nothing to do (see
    /// [`Writer::idle`]), so ticks leave an idle partition alone.
    idle: Arc<AtomicBool>,
    /// Set by the writer: when retention could next find work
    /// ([`Log::retention_due_ms`]), so retention ticks leave the other partitions alone.
    retention_due: Arc<AtomicI64>,
}

impl std::fmt::Debug for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("name", &self.name)
            .finish()
    }
}

impl Partition {
    /// Opens (recovering if needed) the log in `dir` and hands it to a thread of
    /// `writers`.
    pub fn open(
        name: String,
        dir: PathBuf,
        config: LogConfig,
        files: &FileCache,
        metrics: &Arc<Metrics>,
        faults: &Faults,
        writers: &Writers,
    ) -> Result<Partition> {
        let opened = std::time::Instant::now();
        let log = Log::open(&dir, config.clone(), files)?;
        if opened.elapsed() > Duration::from_secs(1) {
            // Only recovery after a crash (a scan of the unflushed tail) takes this long.
            tracing::info!(partition = %name, took = ?opened.elapsed(), "recovered the log");
        }
        report_recovery(&name, &log);
        let (producers, keep_snapshot) = recover_producers(&name, &log)?;
        let max_producer_id = producers.max_producer_id();
        let reader = log.reader().clone();
        let (watermark, high_watermark) = watch::channel(reader.high_watermark());
        let stats = Arc::new(PartitionStats::default());
        let fault = faults.fault();
        let idle = Arc::new(AtomicBool::new(false));
        let retention_due = Arc::new(AtomicI64::new(log.retention_due_ms()));
        let writer = Writer {
            idle: Arc::clone(&idle),
            retention_due: Arc::clone(&retention_due),
            name: name.clone(),
            log,
            watermark,
            failed: false,
            producers,
            keep_snapshot,
            unsnapshotted_bytes: 0,
            snapshot_failing: false,
            room: writers.room(),
            stats: Arc::clone(&stats),
            metrics: Arc::clone(metrics),
            fault: Arc::clone(&fault),
            group: Group::default(),
        };
        let (commands, slot) = writers.add(writer);
        Ok(Partition {
            name,
            reader,
            commands,
            slot,
            scheduler: writers.scheduler(),
            high_watermark,
            max_producer_id,
            stats,
            fault,
            idle,
            retention_due,
        })
    }

    /// Records and bytes produced to and fetched from this partition.
    pub fn stats(&self) -> &PartitionStats {
        &self.stats
    }

    /// Why the partition refuses writes, once it does.
    pub fn fault(&self) -> &Fault {
        &self.fault
    }

    /// `topic/partition`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The largest producer id this partition had state for when it was opened.
    pub fn max_producer_id(&self) -> Option<i64> {
        self.max_producer_id
    }

    /// Read access to the log.
    pub fn reader(&self) -> &LogReader {
        &self.reader
    }

    /// Appends an encoded batch; answers per `ack`. A batch of an idempotent producer
    /// that repeats one already stored is not written again; the answer then carries
    /// the original's offsets. `budget`, the memory the batch is charged for, is
    /// released when the writer is done with the batch, even if the caller stops
    /// waiting for the answer.
    pub async fn append(
        &self,
        batch: bytes::Bytes,
        ack: Ack,
        budget: Option<OwnedSemaphorePermit>,
    ) -> Result<Stored> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Append {
                batch,
                ack,
                reply,
                budget,
            })
            .await
            .map_err(|_| Error::ShuttingDown)?;
        self.scheduler.schedule(&self.slot);
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Waits until the high watermark passes `offset` or `timeout` elapses; returns the
    /// high watermark.
    pub async fn wait_past(&self, offset: u64, timeout: Duration) -> u64 {
        let mut watermark = self.high_watermark.clone();
        let reached = tokio::time::timeout(timeout, watermark.wait_for(|&hw| hw > offset))
            .await
            .map(|r| r.map(|hw| *hw));
        match reached {
            Ok(Ok(hw)) => hw,
            _ => self.reader.high_watermark(),
        }
    }

    /// Asks the writer to commit (syncing idle data under the interval policy) and, if
    /// `retention`, to apply retention.
    pub fn maintain(&self, retention: bool) {
        // At 10,000 partitions a retention tick would otherwise queue 10,000 groups at
        // once ahead of the producers'.
        let retention = retention && now_ms() >= self.retention_due.load(Ordering::Acquire);
        if !retention && self.idle.load(Ordering::Acquire) {
            return;
        }
        // A full queue means the writer is busy committing anyway; skip this round.
        if self
            .commands
            .try_send(Command::Maintain { retention })
            .is_ok()
        {
            self.scheduler.schedule(&self.slot);
        }
    }

    /// Asks the writer to close the log once everything queued for it is answered,
    /// without waiting: closes of many partitions then run together. Blocks while the
    /// writer's queue is full; call from a blocking context.
    pub fn close(&self) -> Closing {
        let (reply, closed) = std_mpsc::sync_channel(1);
        // The receiver lives as long as this partition: sending cannot fail.
        let _ = self.commands.blocking_send(Command::Close { reply });
        self.scheduler.schedule(&self.slot);
        Closing {
            name: self.name.clone(),
            closed,
        }
    }
}

impl Drop for Partition {
    /// A partition dropped without [`Partition::close`] (a broker dropped without its
    /// shutdown) still has its log closed cleanly, by the pool, once what is queued
    /// is answered; with its queue full, the next start runs recovery instead.
    fn drop(&mut self) {
        let (reply, _) = std_mpsc::sync_channel(1);
        if self.commands.try_send(Command::Close { reply }).is_ok() {
            self.scheduler.schedule(&self.slot);
        }
    }
}

/// A close in progress ([`Partition::close`]).
pub struct Closing {
    name: String,
    closed: std_mpsc::Receiver<std::result::Result<(), String>>,
}

impl Closing {
    /// Waits for the close; the error says why the log did not close cleanly.
    pub fn wait(self) -> std::result::Result<(), String> {
        match self.closed.recv() {
            Ok(closed) => closed.map_err(|e| format!("partition {}: {e}", self.name)),
            Err(_) => Err(format!(
                "partition {}: its writer panicked while closing it",
                self.name
            )),
        }
    }
}

/// The answer to a write whose segment roll failed before writing anything: retryable,
/// saying what to do about the cause. EMFILE and ENFILE mostly come from idle client
/// connections holding the descriptors the roll needed.
fn roll_failed(partition: &str, errno: Option<i32>, e: &strata_storage::Error) -> Error {
    use crate::error::{EMFILE, ENFILE, ENOMEM};
    let hint = match errno {
        Some(EMFILE | ENFILE) => {
            "too many open files: raise the broker's file descriptor limit (ulimit -n, \
             LimitNOFILE) or lower max_connections; "
        }
        Some(ENOMEM) => {
            "out of memory or memory mappings: check vm.max_map_count against the \
             broker's start-up warning; "
        }
        _ => "",
    };
    let why = format!("{hint}{e}");
    if errno == Some(crate::error::ENOSPC) {
        Error::DiskFull(partition.to_string(), why)
    } else {
        Error::Unavailable(partition.to_string(), why)
    }
}

/// Free space a batch must leave on the partition's file system for the indexes,
/// checkpoint and producer snapshot that follow it.
const ROOM_RESERVE_BYTES: u64 = 1 << 20;
/// Below this much estimated free space (beyond a batch's needs), every batch measures.
const ROOM_MEASURE_BELOW: u64 = 256 << 20;
/// The free space is measured at least this often while writes come in.
const ROOM_MEASURE_EVERY: Duration = Duration::from_secs(1);

/// The free space of the data directory's file system, as last measured minus what
/// was written since, shared by every partition's writer (see [`Writer::check_room`]):
/// an estimate per partition would not see the others' writes, and would measure once
/// per partition where one measurement serves all.
#[derive(Debug, Default)]
pub(crate) struct Room {
    free: u64,
    measured: Option<std::time::Instant>,
}

/// Rebuilds the producer state of a freshly opened log, and snapshots it when the
/// snapshot on disk did not describe it exactly: before the log changes, so a rejected
/// snapshot can never be trusted later, and so the next open does not replay again.
///
/// Also returns whether the snapshot on disk must be kept as it is: after a failed
/// replay it describes producers the (empty) state in memory has forgotten, so it is
/// never replaced while this partition runs.
fn recover_producers(name: &str, log: &Log) -> Result<(ProducerStates, bool)> {
    let started = std::time::Instant::now();
    let (producers, recovery) = ProducerStates::recover(log.reader(), now_ms());
    if let Some(error) = &recovery.replay_error {
        tracing::warn!(
            partition = %name,
            %error,
            "cannot replay the log for idempotent producer state; every producer starts \
             as unknown, so retries of batches written before this start are not recognised"
        );
    }
    if let SnapshotUse::Rejected(reason) = &recovery.snapshot {
        tracing::warn!(partition = %name, %reason, "producer state snapshot not used; replayed the log");
    }
    if started.elapsed() > Duration::from_secs(1) {
        tracing::info!(
            partition = %name,
            batches = recovery.replayed_batches,
            took = ?started.elapsed(),
            "replayed the log for idempotent producer state"
        );
    }
    if recovery.needs_snapshot() {
        producers.write_snapshot(log.reader().dir(), log.next_offset(), true)?;
    }
    Ok((producers, recovery.replay_error.is_some()))
}

/// Says what opening the log found when it was not a clean restart: under `interval`
/// and `none`, acknowledged records past the last fsync may be gone and their offsets
/// reused; damaged sealed segments make reads of what they lack fail.
fn report_recovery(name: &str, log: &Log) {
    let recovery = log.recovery();
    let durability = log.config().durability;
    if !recovery.clean && durability != Durability::Fsync {
        tracing::warn!(
            partition = %name,
            %durability,
            from_offset = recovery.recovered_to,
            "the partition was not shut down cleanly: records acknowledged at or after this \
             offset that were not yet fsynced may be lost, and new records take their offsets"
        );
    }
    if recovery.damaged_segments > 0 {
        tracing::error!(
            partition = %name,
            segments = recovery.damaged_segments,
            "sealed segments are short, missing or damaged: reads of the offsets they lack \
             fail with a corruption error; restore the partition directory from a backup"
        );
    }
}

/// What [`Writer::write`] did with a batch.
struct Written {
    stored: Stored,
    /// The batch (or the original of a duplicate) is published: the answer need not
    /// wait for this group's commit.
    published: bool,
}

/// What a commit group staged in one partition, answered once the partition commits.
#[derive(Default)]
struct Group {
    /// Producers answered after the commit, with where their batch is.
    waiting: Vec<(oneshot::Sender<Result<Stored>>, Stored)>,
    /// Bytes of every batch of the group, duplicates and refused ones included.
    bytes: usize,
    /// What the group staged: counted as produced once the commit succeeds.
    staged_batches: usize,
    staged_records: u64,
    staged_bytes: usize,
    /// A maintenance tick asked for retention.
    retention: bool,
}

/// A partition's log and producer state, used by one writer thread at a time.
pub(crate) struct Writer {
    name: String,
    log: Log,
    watermark: watch::Sender<u64>,
    /// Set after the first failed commit: the log refuses writes from then on, so there
    /// is nothing to commit and nothing to report again.
    failed: bool,
    producers: ProducerStates,
    /// The producer state replay failed at open: the snapshot on disk knows producers
    /// this state forgot, so no snapshot replaces it.
    keep_snapshot: bool,
    /// Bytes written since the last producer state snapshot.
    unsnapshotted_bytes: u64,
    /// The last producer state snapshot failed: the next failure is not logged again.
    snapshot_failing: bool,
    /// Shared by all writers; see [`Writer::check_room`].
    room: Arc<std::sync::Mutex<Room>>,
    stats: Arc<PartitionStats>,
    metrics: Arc<Metrics>,
    fault: Arc<Fault>,
    /// Shared with [`Partition::maintain`]; see [`Writer::idle`].
    idle: Arc<AtomicBool>,
    /// Shared with [`Partition::maintain`]: [`Log::retention_due_ms`] after each group.
    retention_due: Arc<AtomicI64>,
    group: Group,
}

impl Writer {
    /// Writes a batch for the group being gathered and answers it, or keeps the answer
    /// for after the group's commit.
    pub(crate) fn stage(&mut self, batch: &[u8], ack: Ack, reply: oneshot::Sender<Result<Stored>>) {
        self.group.bytes += batch.len();
        let written = self.write(batch);
        if let Ok(w) = &written {
            if !w.stored.duplicate {
                self.group.staged_batches += 1;
                self.group.staged_records +=
                    w.stored.info.last_offset + 1 - w.stored.info.base_offset;
                self.group.staged_bytes += batch.len();
            }
        }
        match written {
            Ok(written) if ack == Ack::Leader || written.published => {
                let _ = reply.send(Ok(written.stored));
            }
            Ok(written) => self.group.waiting.push((reply, written.stored)),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Makes the group being gathered apply retention after its commit.
    pub(crate) fn maintain(&mut self, retention: bool) {
        self.group.retention |= retention;
    }

    /// Commits what the group staged, answers its producers, then does the upkeep
    /// that follows a commit (producer snapshot, retention, reporting).
    pub(crate) fn finish_group(&mut self) {
        // The waiting list's allocation is kept for the next group.
        let mut waiting = std::mem::take(&mut self.group.waiting);
        let group = std::mem::take(&mut self.group);
        let committed = self.commit();
        if committed.is_ok() && group.staged_batches > 0 {
            self.stats
                .produced(group.staged_records, group.staged_bytes as u64);
            self.metrics
                .commit(group.staged_batches, group.staged_bytes);
        }
        for fsync in self.log.take_fsyncs() {
            self.metrics.fsync(fsync);
        }
        for (reply, stored) in waiting.drain(..) {
            let _ = reply.send(match &committed {
                Ok(()) => Ok(stored),
                Err((true, e)) => Err(Error::DiskFull(self.name.clone(), e.clone())),
                Err((false, e)) => Err(Error::Unavailable(self.name.clone(), e.clone())),
            });
        }
        self.group.waiting = waiting;
        self.unsnapshotted_bytes += group.bytes as u64;
        if !self.failed && self.unsnapshotted_bytes >= self.log.config().checkpoint_interval_bytes {
            // Bounds the replay after a crash, like the log's checkpoint bounds its
            // scan. Under `none` nothing is fsynced between rolls, so neither is this.
            let sync = self.log.config().durability != Durability::None;
            self.snapshot_producers(sync);
        }
        if group.retention {
            self.retention();
        }
        // After retention, whose roll can fail too: an idle partition would otherwise
        // report it only at the next retention tick.
        self.report_upkeep();
        // A failed partition's retention does nothing (see `retention`).
        let due = if self.failed {
            i64::MAX
        } else {
            self.log.retention_due_ms()
        };
        self.retention_due.store(due, Ordering::Release);
        self.idle.store(self.idle(), Ordering::Release);
    }

    /// Fail-stops the partition after its writer panicked mid-group: what it staged
    /// is never published or answered as stored, and the next start runs recovery.
    pub(crate) fn panicked(self) {
        let why = "its writer panicked; the partition refuses writes until the broker restarts";
        self.fault.set(why.to_string());
        tracing::error!(partition = %self.name, "{why}");
    }

    /// Closes the log; everything staged is committed. A clean close leaves a snapshot
    /// of exactly the closed log, so the next start replays nothing. The error says why
    /// the log did not close cleanly.
    pub(crate) fn close(mut self) -> std::result::Result<(), String> {
        let end = self.log.next_offset();
        let dir = self.log.reader().dir().to_path_buf();
        match self.log.close() {
            Ok(()) if self.keep_snapshot => {}
            Ok(()) => {
                self.producers.expire(now_ms());
                if let Err(e) = self.producers.write_snapshot(&dir, end, true) {
                    tracing::warn!(
                        partition = %self.name,
                        error = %e,
                        "cannot write the producer state snapshot; the next start replays the log"
                    );
                }
            }
            Err(e) => {
                tracing::error!(partition = %self.name, error = %e, "closing the log failed");
                return Err(format!("closing the log failed: {e}"));
            }
        }
        Ok(())
    }

    /// Whether a maintenance tick would find nothing to do: the partition fail-stopped,
    /// or its log is idle ([`Log::idle`]) and no producer snapshot waits for a retry.
    /// Retention ticks come regardless once retention is due (`retention_due`).
    fn idle(&self) -> bool {
        self.failed
            || (self.log.idle()
                && (self.keep_snapshot
                    || self.unsnapshotted_bytes < self.log.config().checkpoint_interval_bytes))
    }

    /// Snapshots the producer state; everything staged is committed. A failure only
    /// makes the next recovery replay more, so it is logged, not returned.
    fn snapshot_producers(&mut self, sync: bool) {
        if self.keep_snapshot {
            self.unsnapshotted_bytes = 0;
            return;
        }
        self.producers.expire(now_ms());
        let dir = self.log.reader().dir();
        match self
            .producers
            .write_snapshot(dir, self.log.next_offset(), sync)
        {
            Ok(()) => {
                self.unsnapshotted_bytes = 0;
                self.snapshot_failing = false;
            }
            // Retried after the next commit group (at the latest the next maintenance
            // tick): `unsnapshotted_bytes` stays over the interval.
            Err(e) => {
                self.metrics.upkeep_failed_by("producer_snapshot", 1);
                if !std::mem::replace(&mut self.snapshot_failing, true) {
                    tracing::warn!(
                        partition = %self.name,
                        error = %e,
                        "cannot write the producer state snapshot; a crash now means a \
                         longer replay (retried; logged again only after it succeeded)"
                    )
                }
            }
        }
    }

    /// Checks a batch of an idempotent producer against the producer state, then stages
    /// it (or, for a duplicate, finds the original). A batch without a producer id goes
    /// straight to the log.
    fn write(&mut self, batch: &[u8]) -> Result<Written> {
        let header = match BatchHeader::parse(batch) {
            // After a failed commit the log refuses the write; a duplicate must not be
            // answered from state that may describe batches the failure lost.
            Ok(header) if header.producer_id != NO_PRODUCER_ID && !self.failed => header,
            _ => {
                let info = self.log_write(batch)?;
                return Ok(Written {
                    stored: Stored {
                        info,
                        duplicate: false,
                    },
                    published: false,
                });
            }
        };
        match self.producers.check(&header) {
            Ok(Verdict::Append) => {
                let info = self.log_write(batch)?;
                self.producers.record(&header, info.base_offset, now_ms());
                Ok(Written {
                    stored: Stored {
                        info,
                        duplicate: false,
                    },
                    published: false,
                })
            }
            Ok(Verdict::Duplicate(original)) => {
                self.validate(batch)?;
                Ok(Written {
                    stored: Stored {
                        info: AppendInfo {
                            base_offset: original.base_offset,
                            last_offset: original.last_offset,
                            max_timestamp: header.max_timestamp,
                        },
                        duplicate: true,
                    },
                    published: original.last_offset < self.log.reader().high_watermark(),
                })
            }
            Err(refused) => {
                // A malformed batch is reported as such, whatever its sequence.
                self.validate(batch)?;
                Err(Error::Sequence(self.name.clone(), refused))
            }
        }
    }

    /// The checks the log applies to a batch it writes, for batches it will not write.
    fn validate(&self, batch: &[u8]) -> Result<()> {
        let max = self.log.config().batch_bytes_max;
        if batch.len() > max {
            return Err(strata_storage::Error::BatchTooLarge {
                size: batch.len(),
                max,
            }
            .into());
        }
        Batch::new(batch)
            .and_then(|b| b.validate_records())
            .map_err(|e| Error::Storage(e.into()))
    }

    /// Commits and publishes the new high watermark. The error says whether the disk is
    /// full, and what happened.
    ///
    /// After a failed write or fsync the log's state is unknown, and the log refuses
    /// further writes (fail-stop, as Kafka takes a failed log directory offline): the
    /// partition keeps serving what it had published, and producers get UNAVAILABLE
    /// until a broker restart runs recovery. Reopening in place would leave readers on
    /// the old log and race two views of the same index files.
    fn commit(&mut self) -> std::result::Result<(), (bool, String)> {
        if self.failed {
            // Every write since the failure was refused, so nothing waits on this.
            return Ok(());
        }
        match self.log.commit() {
            Ok(high_watermark) => {
                self.watermark.send_replace(high_watermark);
                Ok(())
            }
            Err(e) => Err(self.fail(&e)),
        }
    }

    /// Stages a batch in the log. A write can flush staged data or roll the segment, so
    /// it can fail with an I/O error: the partition then fail-stops here, with that
    /// error as the cause, exactly as a failed commit does. A roll that failed before
    /// writing anything (its new files could not be created) does not fail-stop: the
    /// batch gets a retryable error and the next write tries the roll again.
    fn log_write(&mut self, batch: &[u8]) -> Result<AppendInfo> {
        self.check_room(batch.len())?;
        self.log.write(batch).map_err(|e| match e {
            strata_storage::Error::RollFailed { ref source, .. } => {
                roll_failed(&self.name, source.raw_os_error(), &e)
            }
            strata_storage::Error::Io { .. } if !self.failed => match self.fail(&e) {
                (true, why) => Error::DiskFull(self.name.clone(), why),
                (false, why) => Error::Unavailable(self.name.clone(), why),
            },
            e => e.into(),
        })
    }

    /// Reports the log's upkeep failures since the last call (failed rolls, checkpoints,
    /// index seals and growths; all retried, none fail-stopping): counted in
    /// `strata_storage_upkeep_failures`, and logged once per run of failures of a step.
    fn report_upkeep(&mut self) {
        for failure in self.log.take_deferred_failures() {
            self.metrics
                .upkeep_failed_by(failure.step.name(), 1 + failure.dropped);
            if failure.first {
                tracing::warn!(
                    partition = %self.name,
                    step = failure.step.name(),
                    error = %failure.error,
                    "storage upkeep failed; nothing was lost, the partition keeps serving \
                     and the step is retried (logged again only after it succeeded)"
                );
            }
        }
    }

    /// Refuses a batch the file system has no room for, before anything is written, so
    /// the partition stays writable and takes writes again once space is freed: a
    /// write that fails with ENOSPC fail-stops the partition until a restart. Free
    /// space is measured (`statvfs`) when the estimate is below [`ROOM_MEASURE_BELOW`]
    /// or older than [`ROOM_MEASURE_EVERY`]; in between, written bytes are subtracted.
    /// Space another process takes after the measurement can still end in ENOSPC.
    fn check_room(&mut self, batch: usize) -> Result<()> {
        if self.failed {
            return Ok(());
        }
        let need = batch as u64 + ROOM_RESERVE_BYTES;
        let mut room = self.room.lock().unwrap_or_else(|e| e.into_inner());
        let stale = room
            .measured
            .is_none_or(|at| at.elapsed() >= ROOM_MEASURE_EVERY);
        if stale || room.free < need + ROOM_MEASURE_BELOW {
            match rustix::fs::statvfs(self.log.reader().dir()) {
                Ok(fs) => {
                    room.free = fs.f_bavail.saturating_mul(fs.f_frsize);
                    room.measured = Some(std::time::Instant::now());
                }
                // Not measurable: let the write find out.
                Err(_) => return Ok(()),
            }
        }
        if room.free < need {
            return Err(Error::DiskFull(
                self.name.clone(),
                format!(
                    "{} bytes free where this batch needs {need} (its {batch} bytes and a \
                     reserve of {ROOM_RESERVE_BYTES} for indexes, checkpoints and \
                     snapshots); nothing was written, and writes resume once space is freed",
                    room.free
                ),
            ));
        }
        room.free -= batch as u64;
        Ok(())
    }

    /// Fail-stops the partition after a failed write or fsync: reports the cause once
    /// (log line, fault for health and metrics) and refuses writes from then on.
    /// Returns whether the disk is full, and the cause.
    fn fail(&mut self, e: &strata_storage::Error) -> (bool, String) {
        self.failed = true;
        self.fault.set(e.to_string());
        tracing::error!(
            partition = %self.name,
            error = %e,
            "commit failed; the partition refuses writes until the broker restarts"
        );
        (crate::error::is_disk_full(e), e.to_string())
    }

    fn retention(&mut self) {
        if self.failed {
            return;
        }
        match self.log.apply_retention(now_ms()) {
            Ok(0) => {}
            // Reported with the log's upkeep failures.
            Err(strata_storage::Error::RollFailed { .. }) => {}
            Ok(n) => {
                tracing::info!(partition = %self.name, segments = n, "retention deleted segments")
            }
            Err(e) => tracing::error!(partition = %self.name, error = %e, "retention failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_storage::batch::BatchBuilder;
    use strata_storage::SequenceError;

    fn writer(dir: &std::path::Path) -> Writer {
        let config = LogConfig {
            durability: Durability::Fsync,
            ..LogConfig::default()
        };
        writer_with(dir, config)
    }

    fn writer_with(dir: &std::path::Path, config: LogConfig) -> Writer {
        let log = Log::open(dir, config, &FileCache::new(4)).expect("open");
        let (producers, keep_snapshot) = recover_producers("t/0", &log).expect("recover");
        let (watermark, _) = watch::channel(0);
        Writer {
            name: "t/0".into(),
            log,
            watermark,
            failed: false,
            producers,
            keep_snapshot,
            unsnapshotted_bytes: 0,
            snapshot_failing: false,
            room: Arc::default(),
            stats: Arc::default(),
            metrics: Arc::default(),
            fault: Faults::default().fault(),
            idle: Arc::default(),
            retention_due: Arc::default(),
            group: Group::default(),
        }
    }

    /// Ticks skip a partition only while they would do nothing: under `interval`, data
    /// written but not yet fsynced keeps the ticks coming until a tick syncs it.
    #[test]
    fn only_a_partition_with_nothing_to_sync_skips_its_ticks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut fsync = writer(dir.path());
        fsync.write(&batch(-1, -1, 1)).expect("write");
        fsync.commit().expect("commit");
        assert!(fsync.idle(), "fsync: committed is synced");

        let dir = tempfile::tempdir().expect("tempdir");
        let config = LogConfig {
            durability: Durability::Interval(Duration::from_secs(3600)),
            ..LogConfig::default()
        };
        let mut interval = writer_with(dir.path(), config);
        assert!(interval.idle(), "nothing written yet");
        interval.write(&batch(-1, -1, 1)).expect("write");
        assert!(!interval.idle(), "staged data waits");
        interval.commit().expect("commit");
        assert!(
            !interval.idle(),
            "written, not yet fsynced: the ticks must come"
        );
        interval.log.flush().expect("flush");
        assert!(interval.idle(), "synced");
    }

    fn batch(producer_id: i64, sequence: i32, records: usize) -> Vec<u8> {
        let mut b = BatchBuilder::new().producer(producer_id, 0, sequence);
        for i in 0..records {
            b.push(1, None, Some(&[i as u8; 10]), &[]);
        }
        b.finish()
    }

    fn written(writer: &mut Writer, batch: &[u8]) -> (u64, u64, bool, bool) {
        let w = writer.write(batch).expect("written");
        (
            w.stored.info.base_offset,
            w.stored.info.last_offset,
            w.stored.duplicate,
            w.published,
        )
    }

    /// Issue 13: a segment roll that cannot open its files (EMFILE, as idle connections
    /// at the fd limit cause) answers the batch with a retryable error naming the cause
    /// and what to do, counts it, does not fail-stop the partition, and the next write
    /// rolls.
    #[test]
    fn a_roll_that_cannot_open_its_files_does_not_fail_stop() {
        use strata_storage::fault::{Fault, Injector, Op};
        let dir = tempfile::tempdir().expect("tempdir");
        let injector = Injector::new(dir.path()).expect("injector");
        let config = LogConfig {
            durability: Durability::Fsync,
            segment_bytes_max: 1024,
            ..LogConfig::default()
        };
        let mut w = writer_with(injector.root(), config);
        // Two of these do not fit in one segment.
        let large = |value: u8| {
            let mut b = BatchBuilder::new();
            b.push(1, None, Some(&[value; 600]), &[]);
            b.finish()
        };
        w.write(&large(0)).map(|_| ()).expect("first batch");
        w.commit().expect("commit");
        injector.fail_nth(Op::Open, 1, Fault::too_many_open_files());
        let e = w.write(&large(1)).map(|_| ()).expect_err("the roll fails");
        assert!(
            matches!(&e, Error::Unavailable(_, why) if why.contains("too many open files: raise")),
            "{e}"
        );
        assert!(!w.failed, "not fail-stopped");
        w.commit().expect("commit");
        w.report_upkeep();
        let roll = crate::metrics::UpkeepLabels { step: "roll" };
        assert_eq!(w.metrics.upkeep_failures.get_or_create(&roll).get(), 1);
        assert_eq!(w.log.reader().segment_count(), 1);
        w.write(&large(2)).map(|_| ()).expect("the roll is retried");
        w.commit().expect("commit");
        assert_eq!(w.log.reader().segment_count(), 2);
        assert_eq!(w.log.reader().high_watermark(), 2);
    }

    /// A retry that arrives while its original is still staged in the same commit
    /// group is a duplicate, and its answer waits for that group's commit; once the
    /// original is committed, a retry is answered at once.
    #[test]
    fn a_duplicate_in_the_same_group_waits_for_the_original_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = writer(dir.path());
        let first = batch(3, 0, 2);
        assert_eq!(written(&mut w, &first), (0, 1, false, false));
        assert_eq!(written(&mut w, &first), (0, 1, true, false));
        let second = batch(3, 2, 3);
        assert_eq!(written(&mut w, &second), (2, 4, false, false));
        w.commit().expect("commit");
        assert_eq!(written(&mut w, &first), (0, 1, true, true));
        assert_eq!(written(&mut w, &second), (2, 4, true, true));
        assert_eq!(w.log.next_offset(), 5, "duplicates wrote nothing");

        // A gap is refused and writes nothing.
        assert!(matches!(
            w.write(&batch(3, 9, 1)),
            Err(Error::Sequence(
                _,
                SequenceError::OutOfOrder {
                    expected: 5,
                    got: 9,
                    ..
                }
            ))
        ));
        // A damaged retry is reported as damaged, not answered as a duplicate.
        let mut damaged = first.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        assert!(matches!(
            w.write(&damaged),
            Err(Error::Storage(strata_storage::Error::InvalidBatch(_)))
        ));
        // Batches without a producer id are not checked.
        let mut plain = BatchBuilder::new();
        plain.push(1, None, Some(b"x"), &[]);
        assert_eq!(written(&mut w, &plain.finish()), (5, 5, false, false));
        w.commit().expect("commit");
        assert_eq!(w.log.next_offset(), 6);
    }

    /// After a replay that failed on a damaged batch, neither recovery nor later
    /// snapshots (periodic, or at close) replace the good snapshot on disk with the
    /// emptied state.
    #[test]
    fn a_failed_replay_never_replaces_the_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut w = writer(dir.path());
        for sequence in [0, 2] {
            written(&mut w, &batch(3, sequence, 2));
        }
        w.commit().expect("commit");
        w.snapshot_producers(true);
        written(&mut w, &batch(3, 4, 2));
        w.commit().expect("commit");
        // Closed cleanly, so the next open does not scan (and cut) the damaged tail.
        w.log.close().expect("close");
        let segment = dir.path().join(format!("{:020}.log", 0));
        let mut bytes = std::fs::read(&segment).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0x20;
        std::fs::write(&segment, &bytes).expect("damage");
        let snapshot = dir.path().join(strata_storage::producer::SNAPSHOT_FILE);
        let good = std::fs::read(&snapshot).expect("snapshot");

        let mut w = writer(dir.path());
        assert!(w.keep_snapshot);
        assert_eq!(std::fs::read(&snapshot).expect("snapshot"), good);
        w.snapshot_producers(true);
        assert_eq!(std::fs::read(&snapshot).expect("snapshot"), good);
    }

    /// Once `checkpoint_interval_bytes` were written since the last snapshot, the writer
    /// snapshots the producer state after the commit, so a crash replays only the rest.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_snapshots_producer_state_periodically() {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = LogConfig {
            durability: Durability::Fsync,
            checkpoint_interval_bytes: 1,
            ..LogConfig::default()
        };
        let files = FileCache::new(4);
        let writers = Writers::start(1).expect("writers");
        let partition = Partition::open(
            "t/0".into(),
            dir.path().into(),
            config,
            &files,
            &Arc::default(),
            &Faults::default(),
            &writers,
        )
        .expect("open");
        for sequence in [0, 2] {
            let stored = partition
                .append(batch(3, sequence, 2).into(), Ack::Durable, None)
                .await
                .expect("stored");
            assert!(!stored.duplicate);
        }
        // The snapshot is written after the answers: wait for the one after the second.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let (states, recovery) = loop {
            let (states, recovery) = ProducerStates::recover(partition.reader(), now_ms());
            if recovery.snapshot == (SnapshotUse::Loaded { covers: 4 }) {
                break (states, recovery);
            }
            assert!(std::time::Instant::now() < deadline, "{recovery:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        assert_eq!(recovery.replayed_batches, 0);
        assert_eq!(states.max_producer_id(), Some(3));
        let retry = partition
            .append(batch(3, 2, 2).into(), Ack::Durable, None)
            .await
            .expect("stored");
        assert!(retry.duplicate);
        assert_eq!((retry.info.base_offset, retry.info.last_offset), (2, 3));
        tokio::task::block_in_place(|| partition.close().wait()).expect("closed cleanly");
    }
}
