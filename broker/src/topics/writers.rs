//! The writer pool: a few threads that own every partition's log, so the thread count
//! does not grow with the partition count.
//!
//! Each partition is served by one writer thread for its whole life (so its batches are
//! written in the order they arrived). A writer thread takes whatever has queued up for
//! any of its partitions, up to a group's limits, and writes every batch; then it
//! commits each partition the group touched (one fsync per partition under the `fsync`
//! policy: group commit across partitions) and answers the producers of each partition
//! right after that partition's commit. Commits of several partitions are issued
//! together: the writer thread runs one itself and hands the others to the sync
//! threads, a second fixed pool, because fsyncs of different files proceed in parallel
//! on the disk (measured on this machine's ext4: 3,100 fdatasyncs/s from one thread,
//! 15,200/s from 16, 23,400/s from 64). The writer thread waits for all of them before
//! the next group, so a partition's log is only ever used by one thread at a time.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex, MutexGuard};

use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit};

use super::partition::{Ack, Stored, Writer};
use crate::error::{Error, Result};

/// Commands that may queue per writer thread before producers wait (back-pressure).
const QUEUE_DEPTH: usize = 4096;
/// Most batches in one commit group, so one group cannot delay its first ack forever.
const GROUP_BATCHES_MAX: usize = 512;
/// Most bytes in one commit group.
const GROUP_BYTES_MAX: usize = 8 << 20;
/// Commits issued together at most: partitions a group touched beyond the sync
/// threads' count wait for a free one. See the module documentation for the numbers.
const SYNC_THREADS: usize = 32;

/// A partition's writer, shared between its [`Partition`](super::partition::Partition)
/// handle (which sends it commands) and the threads that run them. Only the writer
/// thread that serves the partition, or a sync thread it waits for, ever locks it, so
/// the lock is never contended. `None` once the partition is closed.
pub(crate) type SharedWriter = Arc<Mutex<Option<Writer>>>;

pub(crate) fn lock(writer: &SharedWriter) -> MutexGuard<'_, Option<Writer>> {
    writer.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) enum Command {
    Append {
        writer: SharedWriter,
        batch: bytes::Bytes,
        ack: Ack,
        reply: oneshot::Sender<Result<Stored>>,
        /// The share of the produce budget the batch holds, released once it is
        /// written: a producer that gives up waiting does not free it early.
        budget: Option<OwnedSemaphorePermit>,
    },
    /// Commit (syncs idle data under the interval policy); apply retention if asked.
    Maintain {
        writer: SharedWriter,
        retention: bool,
    },
    /// Answer everything queued before it, then close the partition's log; commands
    /// after it are refused.
    Close {
        writer: SharedWriter,
        reply: std_mpsc::SyncSender<std::result::Result<(), String>>,
    },
}

/// The pool of writer threads and of the sync threads they issue commits to. A writer
/// thread ends once the pool and every partition it served are dropped; the sync
/// threads end after the writer threads.
#[derive(Debug)]
pub struct Writers {
    threads: Vec<mpsc::Sender<Command>>,
    /// The thread the next partition goes to (round robin).
    next: AtomicUsize,
}

impl Writers {
    /// Starts `threads` writer threads (at least one) and the sync threads.
    pub fn start(threads: usize) -> Result<Writers> {
        let syncs = SyncThreads::start(SYNC_THREADS)?;
        let mut senders = Vec::new();
        for i in 0..threads.max(1) {
            let (sender, receiver) = mpsc::channel(QUEUE_DEPTH);
            let syncs = syncs.clone();
            std::thread::Builder::new()
                .name(format!("writer-{i}"))
                .spawn(move || run(receiver, &syncs))
                .map_err(|e| {
                    Error::Unavailable(
                        "writers".into(),
                        format!("cannot start a writer thread: {e}"),
                    )
                })?;
            senders.push(sender);
        }
        Ok(Writers {
            threads: senders,
            next: AtomicUsize::new(0),
        })
    }

    /// One writer thread per core, at most 16.
    pub fn default_threads() -> usize {
        std::thread::available_parallelism().map_or(2, |n| n.get().min(16))
    }

    /// The command queue of the thread a new partition is served by.
    pub(crate) fn assign(&self) -> mpsc::Sender<Command> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.threads.len();
        self.threads[i].clone()
    }
}

/// A writer thread: commit groups until no partition is left to send commands.
fn run(mut commands: mpsc::Receiver<Command>, syncs: &SyncThreads) {
    // The partitions the group being gathered touched, each once.
    let mut touched: Vec<SharedWriter> = Vec::new();
    while let Some(first) = commands.blocking_recv() {
        let mut next = Some(first);
        let (mut batches, mut bytes) = (0, 0);
        while let Some(command) = next.take() {
            match command {
                Command::Append {
                    writer,
                    batch,
                    ack,
                    reply,
                    budget,
                } => {
                    batches += 1;
                    bytes += batch.len();
                    let first_touch = match lock(&writer).as_mut() {
                        Some(w) => w.stage(&batch, ack, reply),
                        None => {
                            let _ = reply.send(Err(Error::ShuttingDown));
                            false
                        }
                    };
                    drop(budget);
                    if first_touch {
                        touched.push(writer);
                    }
                }
                Command::Maintain { writer, retention } => {
                    if lock(&writer)
                        .as_mut()
                        .is_some_and(|w| w.maintain(retention))
                    {
                        touched.push(writer);
                    }
                }
                Command::Close { writer, reply } => {
                    let first_touch = match lock(&writer).as_mut() {
                        Some(w) => w.close_after_group(reply),
                        None => {
                            let _ = reply.send(Ok(()));
                            false
                        }
                    };
                    if first_touch {
                        touched.push(writer);
                    }
                }
            }
            if batches >= GROUP_BATCHES_MAX || bytes >= GROUP_BYTES_MAX {
                break;
            }
            next = commands.try_recv().ok();
        }
        syncs.finish_groups(&mut touched);
    }
}

/// Threads that finish commit groups of partitions for a writer thread.
#[derive(Clone)]
struct SyncThreads {
    jobs: Option<std_mpsc::Sender<Job>>,
}

/// A partition whose group to finish, and where to say it is done.
struct Job {
    writer: SharedWriter,
    done: std_mpsc::Sender<()>,
}

impl SyncThreads {
    /// Starts `count` threads, or as many as the OS allows: with none, writer threads
    /// finish their groups one partition after another.
    fn start(count: usize) -> Result<SyncThreads> {
        let (jobs, receiver) = std_mpsc::channel::<Job>();
        let receiver = Arc::new(Mutex::new(receiver));
        let mut started = 0;
        for i in 0..count {
            let receiver = Arc::clone(&receiver);
            let spawned = std::thread::Builder::new()
                .name(format!("sync-{i}"))
                .spawn(move || loop {
                    // Ends once every writer thread (each holding a sender) has ended.
                    let job = receiver.lock().unwrap_or_else(|e| e.into_inner()).recv();
                    let Ok(job) = job else { return };
                    finish_group(&job.writer);
                    let _ = job.done.send(());
                });
            started += usize::from(spawned.is_ok());
        }
        Ok(SyncThreads {
            jobs: (started > 0).then_some(jobs),
        })
    }

    /// Commits each partition in `touched` and answers its producers; empties
    /// `touched`. All but one are handed to the sync threads so their fsyncs run
    /// together; returns once all are done.
    fn finish_groups(&self, touched: &mut Vec<SharedWriter>) {
        let Some(mine) = touched.pop() else { return };
        let (done, finished) = std_mpsc::channel();
        let mut handed = 0;
        for writer in touched.drain(..) {
            match &self.jobs {
                Some(jobs) => match jobs.send(Job {
                    writer,
                    done: done.clone(),
                }) {
                    Ok(()) => handed += 1,
                    Err(std_mpsc::SendError(job)) => finish_group(&job.writer),
                },
                None => finish_group(&writer),
            }
        }
        finish_group(&mine);
        // Only the jobs hold senders now, so a sync thread that panicked ends the wait.
        drop(done);
        for _ in 0..handed {
            if finished.recv().is_err() {
                break;
            }
        }
    }
}

/// Commits the partition's group and answers it; then closes the partition if the group
/// ended with a close request.
fn finish_group(writer: &SharedWriter) {
    let mut guard = lock(writer);
    let Some(close) = guard.as_mut().and_then(Writer::finish_group) else {
        return;
    };
    let closed = guard.take().map_or(Ok(()), Writer::close);
    let _ = close.send(closed);
}
