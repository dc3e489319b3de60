//! The writer pool: a fixed set of threads that serve every partition's writer, so the
//! thread count does not grow with the partition count.
//!
//! Each partition has its own bounded command queue. A partition with commands is put
//! on the pool's run queue, once; a free writer thread takes it, drains what has
//! queued up for it (up to a group's limits), writes every batch, commits once (one
//! fsync under the `fsync` policy: group commit), answers the producers, and puts the
//! partition back on the run queue if more commands came meanwhile. Only the thread
//! holding a partition touches its log, so its batches are written in the order they
//! arrived, and partitions are committed by as many threads at once as the pool has.
//!
//! The pool is sized for fsyncs, not for cores: a thread waiting in fdatasync uses no
//! CPU, and fsyncs of different files proceed in parallel on the disk (measured on this
//! machine's ext4 with `benches/fsync-files.c`, 10,000 files: 3,900 fdatasyncs/s from
//! one thread, 19,300/s from 16, 27,200/s from 64). [`WRITER_THREADS`] threads
//! therefore keep the disk busy across many partitions while the thread count stays
//! fixed.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Condvar, Mutex, MutexGuard};

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use super::partition::{Ack, Room, Stored, Writer};
use crate::error::{Error, Result};

/// Commands that may queue per partition before producers wait (back-pressure).
const QUEUE_DEPTH: usize = 1024;
/// Most batches in one commit group, so one group cannot delay its first ack forever
/// (and a busy partition lets the others on the run queue have a thread).
const GROUP_BATCHES_MAX: usize = 512;
/// Most bytes in one commit group.
const GROUP_BYTES_MAX: usize = 8 << 20;
/// Writer threads: partitions committed at once at most. See the module documentation.
pub const WRITER_THREADS: usize = 64;

pub(crate) enum Command {
    Append {
        batch: bytes::Bytes,
        ack: Ack,
        reply: oneshot::Sender<Result<Stored>>,
        /// The share of the produce budget the batch holds, released once it is
        /// written: a producer that gives up waiting does not free it early.
        budget: Option<OwnedSemaphorePermit>,
    },
    /// Commit (syncs idle data under the interval policy); apply retention if asked.
    Maintain { retention: bool },
    /// Answer everything queued before it, then close the partition's log; commands
    /// after it are refused.
    Close {
        reply: std_mpsc::SyncSender<std::result::Result<(), String>>,
    },
}

/// A partition as the pool sees it: its writer, the receiving end of its queue, and
/// whether it is on the run queue or being served.
pub(crate) struct Slot {
    /// Set while the partition is on the run queue or held by a thread: it is put on
    /// the run queue only by whoever sets it.
    scheduled: AtomicBool,
    /// Locked only by the thread serving the partition (or by a close after the pool
    /// is gone), so never contended.
    state: Mutex<SlotState>,
}

struct SlotState {
    commands: mpsc::Receiver<Command>,
    /// `None` once the partition is closed.
    writer: Option<Writer>,
}

impl Slot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The writer threads and their run queue.
#[derive(Debug)]
pub struct Writers {
    queue: Arc<RunQueue>,
    /// The free-space estimate every writer checks batches against.
    room: Arc<Mutex<Room>>,
    /// Joined when the pool is dropped.
    threads: Vec<std::thread::JoinHandle<()>>,
}

#[derive(Debug, Default)]
struct RunQueue {
    ready: Mutex<Ready>,
    wake: Condvar,
}

#[derive(Default)]
struct Ready {
    slots: VecDeque<Arc<Slot>>,
    /// The pool was dropped: threads end once the queue is empty.
    closed: bool,
}

impl std::fmt::Debug for Ready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ready")
            .field("slots", &self.slots.len())
            .field("closed", &self.closed)
            .finish()
    }
}

impl Writers {
    /// Starts `threads` writer threads, or as many as the OS allows (at least one).
    pub fn start(threads: usize) -> Result<Writers> {
        let queue = Arc::new(RunQueue::default());
        let mut started = Vec::new();
        let mut refused = None;
        for i in 0..threads.max(1) {
            let queue = Arc::clone(&queue);
            match std::thread::Builder::new()
                .name(format!("writer-{i}"))
                .spawn(move || serve(&queue))
            {
                Ok(thread) => started.push(thread),
                Err(e) => refused = Some(e),
            }
        }
        match refused {
            Some(e) if started.is_empty() => Err(Error::Unavailable(
                "writers".into(),
                format!("cannot start a writer thread: {e}"),
            )),
            _ => Ok(Writers {
                queue,
                room: Arc::default(),
                threads: started,
            }),
        }
    }

    /// Registers a partition's writer; returns its queue and slot.
    pub(crate) fn add(&self, writer: Writer) -> (mpsc::Sender<Command>, Arc<Slot>) {
        let (sender, commands) = mpsc::channel(QUEUE_DEPTH);
        let slot = Arc::new(Slot {
            scheduled: AtomicBool::new(false),
            state: Mutex::new(SlotState {
                commands,
                writer: Some(writer),
            }),
        });
        (sender, slot)
    }

    /// The free-space estimate of the data directory's file system, shared by the
    /// writers.
    pub(crate) fn room(&self) -> Arc<Mutex<Room>> {
        Arc::clone(&self.room)
    }

    /// A handle that schedules partitions on this pool.
    pub(crate) fn scheduler(&self) -> Scheduler {
        Scheduler {
            queue: Arc::clone(&self.queue),
        }
    }
}

impl Drop for Writers {
    /// Serves the partitions already scheduled (among them the closes that partitions
    /// dropped before the pool queued), then waits for the threads to end: whoever owns
    /// the pool (the broker, with the data directory's lock) outlives every write.
    fn drop(&mut self) {
        self.queue.lock().closed = true;
        self.queue.wake.notify_all();
        let current = std::thread::current().id();
        for thread in self.threads.drain(..) {
            // A writer thread never owns the pool; were it to drop it, it could not
            // wait for itself.
            if thread.thread().id() != current {
                let _ = thread.join();
            }
        }
    }
}

impl RunQueue {
    fn lock(&self) -> MutexGuard<'_, Ready> {
        self.ready.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Puts partitions with queued commands on the run queue.
#[derive(Debug, Clone)]
pub(crate) struct Scheduler {
    queue: Arc<RunQueue>,
}

impl Scheduler {
    /// Makes sure a thread will serve `slot`'s queued commands. Cheap when the
    /// partition is already scheduled.
    pub(crate) fn schedule(&self, slot: &Arc<Slot>) {
        if slot.scheduled.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut ready = self.queue.lock();
        if ready.closed {
            drop(ready);
            // No thread will come: refuse what is queued, here, until nothing is left
            // that a sender who found the flag set counted on us for.
            loop {
                let mut state = slot.lock();
                refuse_all(&mut state);
                if !release(slot, &state) {
                    return;
                }
            }
        }
        ready.slots.push_back(Arc::clone(slot));
        drop(ready);
        self.queue.wake.notify_one();
    }
}

/// A writer thread: serves scheduled partitions until the pool is dropped.
fn serve(queue: &RunQueue) {
    loop {
        let slot = {
            let mut ready = queue.lock();
            loop {
                if let Some(slot) = ready.slots.pop_front() {
                    break slot;
                }
                if ready.closed {
                    return;
                }
                ready = queue.wake.wait(ready).unwrap_or_else(|e| e.into_inner());
            }
        };
        let mut state = slot.lock();
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_group(&mut state);
        }));
        if served.is_err() {
            // The writer's state is unknown: fail-stop the partition (its producers get
            // an answer, their budget is freed) and keep the thread for the others.
            if let Some(writer) = state.writer.take() {
                writer.panicked();
            }
            refuse_all(&mut state);
        }
        // Commands that came after the group was gathered are served in another turn
        // (behind the partitions already waiting).
        if release(&slot, &state) {
            drop(state);
            queue.lock().slots.push_back(slot);
        }
    }
}

/// Gives up `slot` after serving it; returns whether commands came meanwhile and the
/// caller won `scheduled` again, so it must requeue them. A sender that found the flag
/// set relies on this check: it queued its command before looking at the flag.
fn release(slot: &Slot, state: &SlotState) -> bool {
    slot.scheduled.store(false, Ordering::SeqCst);
    // Orders the store before the queue's (acquire) emptiness check on every
    // architecture, as the sender's send-then-swap is ordered.
    std::sync::atomic::fence(Ordering::SeqCst);
    !state.commands.is_empty() && !slot.scheduled.swap(true, Ordering::SeqCst)
}

/// Serves one commit group of a partition: whatever has queued up, within the group's
/// limits.
fn run_group(state: &mut SlotState) {
    let Some(writer) = state.writer.as_mut() else {
        refuse_all(state);
        return;
    };
    let (mut batches, mut bytes) = (0, 0);
    let mut close = None;
    while let Ok(command) = state.commands.try_recv() {
        match command {
            Command::Append {
                batch,
                ack,
                reply,
                budget,
            } => {
                batches += 1;
                bytes += batch.len();
                writer.stage(&batch, ack, reply);
                drop(budget);
            }
            Command::Maintain { retention } => writer.maintain(retention),
            Command::Close { reply } => {
                close = Some(reply);
                break;
            }
        }
        if batches >= GROUP_BATCHES_MAX || bytes >= GROUP_BYTES_MAX {
            break;
        }
    }
    writer.finish_group();
    if let Some(reply) = close {
        let closed = state.writer.take().map_or(Ok(()), Writer::close);
        let _ = reply.send(closed);
        refuse_all(state);
    }
}

/// Answers every queued command of a closed partition (or one no thread will serve).
fn refuse_all(state: &mut SlotState) {
    while let Ok(command) = state.commands.try_recv() {
        match command {
            Command::Append { reply, .. } => {
                let _ = reply.send(Err(Error::ShuttingDown));
            }
            Command::Close { reply } => {
                let closed = state.writer.take().map_or(Ok(()), Writer::close);
                let _ = reply.send(closed);
            }
            Command::Maintain { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use strata_storage::batch::BatchBuilder;
    use strata_storage::{Durability, FileCache, LogConfig};

    use super::Writers;
    use crate::error::Error;
    use crate::health::Faults;
    use crate::topics::partition::{Ack, Partition};

    fn batch(value: u32) -> bytes::Bytes {
        let mut b = BatchBuilder::new();
        b.push(1, None, Some(&value.to_be_bytes()), &[]);
        b.finish().into()
    }

    /// Many partitions share two threads: each partition's batches get consecutive
    /// offsets in the order they were sent, closes run together and answer once
    /// everything before them is answered, and a batch sent after a close is refused.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn partitions_sharing_threads_keep_their_order_and_close_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        let writers = Writers::start(2).expect("writers");
        let files = FileCache::new(4);
        let config = LogConfig {
            durability: Durability::Fsync,
            ..LogConfig::default()
        };
        let partitions: Vec<Arc<Partition>> = (0..8)
            .map(|p| {
                Partition::open(
                    format!("t/{p}"),
                    dir.path().join(p.to_string()),
                    config.clone(),
                    &files,
                    &Arc::default(),
                    &Faults::default(),
                    &writers,
                )
                .map(Arc::new)
                .expect("open")
            })
            .collect();
        let producers: Vec<_> = partitions
            .iter()
            .map(|partition| {
                let partition = Arc::clone(partition);
                tokio::spawn(async move {
                    for i in 0..100u32 {
                        let stored = partition
                            .append(batch(i), Ack::Durable, None)
                            .await
                            .expect("stored");
                        assert_eq!(stored.info.base_offset, u64::from(i));
                    }
                })
            })
            .collect();
        for producer in producers {
            producer.await.expect("producer");
        }
        for partition in &partitions {
            assert_eq!(partition.reader().high_watermark(), 100);
        }
        let closing: Vec<_> =
            tokio::task::block_in_place(|| partitions.iter().map(|p| p.close()).collect());
        for c in closing {
            tokio::task::block_in_place(|| c.wait()).expect("closed cleanly");
        }
        let refused = partitions[3].append(batch(0), Ack::Durable, None).await;
        assert!(matches!(refused, Err(Error::ShuttingDown)), "{refused:?}");
    }
}
