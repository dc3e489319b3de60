//! A segment: one `.log` file of whole batches plus its `.index` and `.timeindex`, and
//! the bounded cache of open read handles shared by all segments of a broker.
//!
//! A segment is shared between the log's writer and any number of readers through an
//! `Arc`. Everything a reader looks at is either immutable or published through atomics
//! (`readable_len`, `max_timestamp`, the index lengths), so readers never take a lock the
//! writer holds across I/O.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::batch::{BatchHeader, BATCH_HEADER_LEN};
use crate::error::{io_at, Error, Result};
use crate::fault;
use crate::index::{Index, OffsetEntry, TimeEntry};

/// File name of a segment file: the base offset, zero-padded to 20 digits.
pub(crate) fn segment_path(dir: &Path, base_offset: u64, extension: &str) -> PathBuf {
    dir.join(format!("{base_offset:020}.{extension}"))
}

pub(crate) const LOG_EXT: &str = "log";
pub(crate) const INDEX_EXT: &str = "index";
pub(crate) const TIME_INDEX_EXT: &str = "timeindex";

pub(crate) struct Segment {
    pub base_offset: u64,
    pub log_path: PathBuf,
    pub offsets: Index<OffsetEntry>,
    pub times: Index<TimeEntry>,
    /// Bytes of whole, published batches. Readers never look past it.
    readable_len: AtomicU64,
    /// Largest record timestamp among published batches, `i64::MIN` when none.
    max_timestamp: AtomicI64,
    /// The read handle, opened lazily and closed by the [`FileCache`] when idle.
    handle: Mutex<Option<Arc<File>>>,
    /// Tick of the last use of `handle`, for least-recently-used eviction.
    last_used: AtomicU64,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("base_offset", &self.base_offset)
            .field("readable_len", &self.readable_len())
            .finish()
    }
}

impl Segment {
    pub fn new(
        dir: &Path,
        base_offset: u64,
        offsets: Index<OffsetEntry>,
        times: Index<TimeEntry>,
        readable_len: u64,
        max_timestamp: i64,
    ) -> Segment {
        Segment {
            base_offset,
            log_path: segment_path(dir, base_offset, LOG_EXT),
            offsets,
            times,
            readable_len: AtomicU64::new(readable_len),
            max_timestamp: AtomicI64::new(max_timestamp),
            handle: Mutex::new(None),
            last_used: AtomicU64::new(0),
        }
    }

    pub fn readable_len(&self) -> u64 {
        self.readable_len.load(Ordering::Acquire)
    }

    pub fn max_timestamp(&self) -> i64 {
        self.max_timestamp.load(Ordering::Acquire)
    }

    /// Makes bytes up to `len` visible to readers. Called by the writer only after they
    /// are written (and, under the fsync policy, synced).
    pub fn publish(&self, len: u64, max_timestamp: i64) {
        self.max_timestamp.store(max_timestamp, Ordering::Release);
        self.readable_len.store(len, Ordering::Release);
    }

    /// Position of the last indexed batch whose base offset is at most `offset`; the
    /// batch holding `offset` starts there or later.
    pub fn index_position(&self, offset: u64) -> u64 {
        let relative = offset
            .saturating_sub(self.base_offset)
            .min(u64::from(u32::MAX)) as u32;
        match self
            .offsets
            .partition_point(|e| e.relative_offset <= relative)
        {
            0 => 0,
            n => u64::from(self.offsets.get(n - 1).position),
        }
    }

    /// An offset from which scanning reaches the first record with a timestamp at or
    /// after `timestamp`: every record before it is older.
    pub fn time_index_offset(&self, timestamp: i64) -> u64 {
        match self.times.partition_point(|e| e.timestamp < timestamp) {
            0 => self.base_offset,
            n => self.base_offset + u64::from(self.times.get(n - 1).relative_offset),
        }
    }

    /// The read handle, opening the file if the cache closed it (or never opened it).
    pub fn file(self: &Arc<Self>, cache: &FileCache) -> Result<Arc<File>> {
        self.last_used.store(cache.tick(), Ordering::Relaxed);
        let mut handle = self.handle.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(file) = &*handle {
            return Ok(Arc::clone(file));
        }
        let file = fault::open(OpenOptions::new().read(true), &self.log_path)
            .map_err(io_at(&self.log_path))?;
        let file = Arc::new(file);
        *handle = Some(Arc::clone(&file));
        drop(handle);
        cache.opened(self);
        Ok(file)
    }

    /// Writes the indexes' mapped entries to disk.
    pub fn sync_indexes(&self) -> Result<()> {
        self.offsets.sync().map_err(io_at(self.offsets.path()))?;
        self.times.sync().map_err(io_at(self.times.path()))
    }

    /// Trims both indexes to their entries and fsyncs them.
    pub fn seal_indexes(&self) -> Result<()> {
        self.offsets.seal().map_err(io_at(self.offsets.path()))?;
        self.times.seal().map_err(io_at(self.times.path()))
    }

    fn close_handle(&self) {
        self.handle.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Reads and parses the batch header at `position`.
    pub fn read_header(&self, file: &File, position: u64) -> Result<BatchHeader> {
        let mut buf = [0u8; BATCH_HEADER_LEN];
        fault::read_exact_at(file, &self.log_path, &mut buf, position)
            .map_err(io_at(&self.log_path))?;
        BatchHeader::parse(&buf).map_err(|e| self.corrupted(position, e.to_string()))
    }

    pub fn corrupted(&self, position: u64, reason: String) -> Error {
        Error::Corrupted {
            path: self.log_path.clone(),
            position,
            reason,
        }
    }
}

/// Opens a segment's log file for appending (pwrite at explicit positions).
pub(crate) fn open_for_write(path: &Path, create: bool) -> Result<File> {
    fault::open(
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false),
        path,
    )
    .map_err(io_at(path))
}

/// Bounds the read handles of sealed segments across every log that shares it. When more
/// than `max_open` are open, the least recently used is closed; readers holding its `Arc`
/// finish their read first. Clones share one budget.
#[derive(Debug, Clone)]
pub struct FileCache {
    inner: Arc<CacheInner>,
}

#[derive(Debug)]
struct CacheInner {
    max_open: usize,
    clock: AtomicU64,
    open: Mutex<Vec<Weak<Segment>>>,
}

impl FileCache {
    /// A cache that keeps at most `max_open` sealed-segment files open (at least 1).
    pub fn new(max_open: usize) -> FileCache {
        FileCache {
            inner: Arc::new(CacheInner {
                max_open: max_open.max(1),
                clock: AtomicU64::new(1),
                open: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Number of open handles the cache tracks.
    pub fn open_count(&self) -> usize {
        let mut open = self.inner.open.lock().unwrap_or_else(|e| e.into_inner());
        open.retain(|w| w.strong_count() > 0);
        open.len()
    }

    fn tick(&self) -> u64 {
        self.inner.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// Records that `segment` opened its handle and closes the least recently used one
    /// if the budget is exceeded. Never holds the cache lock while taking a segment's.
    fn opened(&self, segment: &Arc<Segment>) {
        let victim = {
            let mut open = self.inner.open.lock().unwrap_or_else(|e| e.into_inner());
            open.retain(|w| w.strong_count() > 0);
            if !open
                .iter()
                .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(segment)))
            {
                open.push(Arc::downgrade(segment));
            }
            if open.len() > self.inner.max_open {
                open.iter()
                    .enumerate()
                    .filter_map(|(i, w)| {
                        w.upgrade()
                            .map(|s| (i, s.last_used.load(Ordering::Relaxed)))
                    })
                    .min_by_key(|&(_, used)| used)
                    .map(|(i, _)| open.swap_remove(i))
            } else {
                None
            }
        };
        if let Some(victim) = victim.and_then(|w| w.upgrade()) {
            victim.close_handle();
        }
    }
}
