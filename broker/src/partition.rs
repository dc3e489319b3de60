//! One partition: its log, owned by a dedicated writer thread, and the read side shared
//! with request handlers.
//!
//! Producers send batches to the writer over a bounded channel. The writer drains
//! whatever has queued up, writes every batch, commits once (one fsync under the `fsync`
//! policy: group commit) and only then answers each producer. Concurrent producers
//! therefore share fsyncs, and the more of them there are, the larger each group gets.
//! Readers go straight to the log through a [`LogReader`] and wait for new data on a
//! watch channel that carries the high watermark.

use std::path::PathBuf;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use strata_storage::{now_ms, AppendInfo, FileCache, Log, LogConfig, LogReader};
use tokio::sync::{mpsc, oneshot, watch};

use crate::error::{Error, Result};

/// Produce requests that may queue per partition before producers wait (back-pressure).
const QUEUE_DEPTH: usize = 1024;
/// Most batches in one commit group, so one group cannot delay its first ack forever.
const GROUP_BATCHES_MAX: usize = 512;
/// Most bytes in one commit group.
const GROUP_BYTES_MAX: usize = 8 << 20;

/// When a producer gets its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// After the commit that makes the batch durable under the topic's policy.
    Durable,
    /// As soon as the batch is written into the log, before any fsync.
    Leader,
}

enum Command {
    Append {
        batch: bytes::Bytes,
        ack: Ack,
        reply: oneshot::Sender<Result<AppendInfo>>,
    },
    /// Commit (syncs idle data under the interval policy); apply retention if asked.
    Maintain {
        retention: bool,
    },
    Shutdown,
}

/// A partition of a topic.
pub struct Partition {
    name: String,
    reader: LogReader,
    commands: mpsc::Sender<Command>,
    high_watermark: watch::Receiver<u64>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("name", &self.name)
            .finish()
    }
}

impl Partition {
    /// Opens (recovering if needed) the log in `dir` and starts its writer thread.
    pub fn open(
        name: String,
        dir: PathBuf,
        config: LogConfig,
        files: &FileCache,
    ) -> Result<Partition> {
        let opened = std::time::Instant::now();
        let log = Log::open(&dir, config.clone(), files)?;
        if opened.elapsed() > Duration::from_secs(1) {
            // Only recovery after a crash (a scan of the unflushed tail) takes this long.
            tracing::info!(partition = %name, took = ?opened.elapsed(), "recovered the log");
        }
        let reader = log.reader().clone();
        let (commands, receiver) = mpsc::channel(QUEUE_DEPTH);
        let (watermark, high_watermark) = watch::channel(reader.high_watermark());
        let writer = Writer {
            name: name.clone(),
            log,
            watermark,
            failed: false,
        };
        let thread = std::thread::Builder::new()
            .name(format!("writer-{name}"))
            .spawn(move || writer.run(receiver))
            .map_err(|e| {
                Error::Unavailable(name.clone(), format!("cannot start writer thread: {e}"))
            })?;
        Ok(Partition {
            name,
            reader,
            commands,
            high_watermark,
            writer: Mutex::new(Some(thread)),
        })
    }

    /// Read access to the log.
    pub fn reader(&self) -> &LogReader {
        &self.reader
    }

    /// Appends an encoded batch; answers per `ack`.
    pub async fn append(&self, batch: bytes::Bytes, ack: Ack) -> Result<AppendInfo> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Append { batch, ack, reply })
            .await
            .map_err(|_| Error::ShuttingDown)?;
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
        // A full queue means the writer is busy committing anyway; skip this round.
        let _ = self.commands.try_send(Command::Maintain { retention });
    }

    /// Stops the writer after it has answered everything queued, and closes the log
    /// cleanly. Blocks; call from a blocking context.
    pub fn shutdown(&self) {
        let _ = self.commands.blocking_send(Command::Shutdown);
        let thread = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            if thread.join().is_err() {
                tracing::error!(partition = %self.name, "writer thread panicked");
            }
        }
    }
}

struct Writer {
    name: String,
    log: Log,
    watermark: watch::Sender<u64>,
    /// Set after the first failed commit: the log refuses writes from then on, so there
    /// is nothing to commit and nothing to report again.
    failed: bool,
}

impl Writer {
    fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut waiting: Vec<(oneshot::Sender<Result<AppendInfo>>, AppendInfo)> = Vec::new();
        let mut shutdown = false;
        while let Some(first) = commands.blocking_recv() {
            let mut next = Some(first);
            let (mut batches, mut bytes) = (0, 0);
            let mut maintain = false;
            while let Some(command) = next.take() {
                match command {
                    Command::Append { batch, ack, reply } => {
                        batches += 1;
                        bytes += batch.len();
                        match self.write(&batch) {
                            Ok(info) if ack == Ack::Leader => {
                                let _ = reply.send(Ok(info));
                            }
                            Ok(info) => waiting.push((reply, info)),
                            Err(e) => {
                                let _ = reply.send(Err(e));
                            }
                        }
                    }
                    Command::Maintain { retention } => maintain |= retention,
                    Command::Shutdown => shutdown = true,
                }
                if shutdown || batches >= GROUP_BATCHES_MAX || bytes >= GROUP_BYTES_MAX {
                    break;
                }
                next = commands.try_recv().ok();
            }
            let committed = self.commit();
            for (reply, info) in waiting.drain(..) {
                let _ = reply.send(match &committed {
                    Ok(()) => Ok(info),
                    Err((true, e)) => Err(Error::DiskFull(self.name.clone(), e.clone())),
                    Err((false, e)) => Err(Error::Unavailable(self.name.clone(), e.clone())),
                });
            }
            if maintain {
                self.retention();
            }
            if shutdown {
                break;
            }
        }
        if let Err(e) = self.log.close() {
            tracing::error!(partition = %self.name, error = %e, "closing the log failed");
        }
    }

    fn write(&mut self, batch: &[u8]) -> Result<AppendInfo> {
        self.log.write(batch).map_err(Error::from)
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
            Err(e) => {
                self.failed = true;
                tracing::error!(
                    partition = %self.name,
                    error = %e,
                    "commit failed; the partition refuses writes until the broker restarts"
                );
                Err((crate::error::is_disk_full(&e), e.to_string()))
            }
        }
    }

    fn retention(&mut self) {
        if self.failed {
            return;
        }
        match self.log.apply_retention(now_ms()) {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(partition = %self.name, segments = n, "retention deleted segments")
            }
            Err(e) => tracing::error!(partition = %self.name, error = %e, "retention failed"),
        }
    }
}
