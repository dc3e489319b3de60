//! A segment: one `.log` file of whole batches plus its `.index` and `.timeindex`, and
//! the bounded cache of read handles and index mappings shared by all segments of a
//! broker.
//!
//! A segment is shared between the log's writer and any number of readers through an
//! `Arc`. Everything a reader looks at is either immutable or published through atomics
//! (`readable_len`, `max_timestamp`, the index lengths), so readers never take a lock the
//! writer holds across I/O.
//!
//! A sealed segment holds no descriptor and no mapping until it is read: its read handle
//! and its index mappings are opened on first use and closed again by the [`FileCache`]
//! when they are the least recently used beyond its budgets. The active segment's index
//! mappings are the writer's and are not counted.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::batch::{BatchHeader, BATCH_HEADER_LEN};
use crate::error::{io_at, Error, Result};
use crate::fault;
use crate::index::{Index, IndexView, OffsetEntry, TimeEntry};

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
    /// Tick of the last use of each kind of resource ([`Held`]), for
    /// least-recently-used eviction.
    last_used: [AtomicU64; HELD_KINDS],
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
            last_used: [AtomicU64::new(0), AtomicU64::new(0)],
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
    /// batch holding `offset` starts there or later. Maps the offset index if needed.
    pub fn index_position(self: &Arc<Self>, cache: &FileCache, offset: u64) -> Result<u64> {
        let relative = offset
            .saturating_sub(self.base_offset)
            .min(u64::from(u32::MAX)) as u32;
        let offsets = self.load(&self.offsets, cache)?;
        Ok(
            match offsets.partition_point(|e| e.relative_offset <= relative) {
                0 => 0,
                n => u64::from(offsets.get(n - 1).position),
            },
        )
    }

    /// An offset from which scanning reaches the first record with a timestamp at or
    /// after `timestamp`: every record before it is older. Maps the time index if
    /// needed.
    pub fn time_index_offset(self: &Arc<Self>, cache: &FileCache, timestamp: i64) -> Result<u64> {
        let times = self.load(&self.times, cache)?;
        Ok(match times.partition_point(|e| e.timestamp < timestamp) {
            0 => self.base_offset,
            n => self.base_offset + u64::from(times.get(n - 1).relative_offset),
        })
    }

    /// One of the segment's indexes, mapped, with the cache told of a new mapping.
    fn load<E: crate::index::Entry>(
        self: &Arc<Self>,
        index: &Index<E>,
        cache: &FileCache,
    ) -> Result<IndexView<E>> {
        self.last_used[Held::IndexMaps as usize].store(cache.tick(), Ordering::Relaxed);
        let (view, mapped) = index.load().map_err(io_at(index.path()))?;
        if mapped {
            cache.opened(self, Held::IndexMaps);
        }
        Ok(view)
    }

    /// The read handle, opening the file if the cache closed it (or never opened it).
    pub fn file(self: &Arc<Self>, cache: &FileCache) -> Result<Arc<File>> {
        self.last_used[Held::ReadHandle as usize].store(cache.tick(), Ordering::Relaxed);
        let mut handle = self.handle.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(file) = &*handle {
            return Ok(Arc::clone(file));
        }
        let file = fault::open(OpenOptions::new().read(true), &self.log_path)
            .map_err(io_at(&self.log_path))?;
        let file = Arc::new(file);
        *handle = Some(Arc::clone(&file));
        drop(handle);
        cache.opened(self, Held::ReadHandle);
        Ok(file)
    }

    /// Writes the active segment's index entries to disk.
    pub fn sync_indexes(&self) -> Result<()> {
        self.offsets.sync().map_err(io_at(self.offsets.path()))?;
        self.times.sync().map_err(io_at(self.times.path()))
    }

    /// Trims both indexes to their entries, fsyncs them and drops their mappings: from
    /// then on they are mapped only while read.
    pub fn seal_indexes(&self) -> Result<()> {
        self.offsets.seal().map_err(io_at(self.offsets.path()))?;
        self.times.seal().map_err(io_at(self.times.path()))
    }

    /// Gives back a resource the cache evicts; readers holding its `Arc` finish first.
    fn release(&self, held: Held) {
        match held {
            Held::ReadHandle => {
                self.handle.lock().unwrap_or_else(|e| e.into_inner()).take();
            }
            Held::IndexMaps => {
                self.offsets.unload();
                self.times.unload();
            }
        }
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

/// What a segment holds on to while the [`FileCache`] lets it, each kind under its own
/// budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    /// The read handle of its `.log` (one descriptor).
    ReadHandle = 0,
    /// The mappings of its `.index` and `.timeindex` (up to two, no descriptor).
    IndexMaps = 1,
}

const HELD_KINDS: usize = 2;

/// Default of [`FileCache::with_mapped_max`]: sealed segments whose indexes stay mapped.
/// Each costs two of the kernel's `vm.max_map_count` mappings (65,530 by default), of
/// which every partition's active segment also takes two.
pub const MAPPED_SEGMENTS_MAX_DEFAULT: usize = 1024;

/// Bounds what the sealed segments of every log that shares it hold open: read handles
/// (at most `max_open`) and index mappings (at most `max_mapped` segments' worth). When a
/// budget is exceeded, the least recently used resource of that kind is released;
/// readers holding its `Arc` finish their read first. This is the one place that decides
/// what a sealed segment keeps. Clones share the budgets.
#[derive(Debug, Clone)]
pub struct FileCache {
    inner: Arc<CacheInner>,
}

#[derive(Debug)]
struct CacheInner {
    /// Per [`Held`] kind: the most segments holding it.
    max: [usize; HELD_KINDS],
    clock: AtomicU64,
    /// Per [`Held`] kind: the segments holding it.
    holders: [Mutex<Vec<Weak<Segment>>>; HELD_KINDS],
}

impl FileCache {
    /// A cache that keeps at most `max_open` sealed-segment files open (at least 1), and
    /// the indexes of at most [`MAPPED_SEGMENTS_MAX_DEFAULT`] sealed segments mapped.
    pub fn new(max_open: usize) -> FileCache {
        FileCache::with_mapped_max(max_open, MAPPED_SEGMENTS_MAX_DEFAULT)
    }

    /// A cache that keeps at most `max_open` sealed-segment files open and the indexes
    /// of at most `max_mapped` sealed segments mapped (each at least 1).
    pub fn with_mapped_max(max_open: usize, max_mapped: usize) -> FileCache {
        FileCache {
            inner: Arc::new(CacheInner {
                max: [max_open.max(1), max_mapped.max(1)],
                clock: AtomicU64::new(1),
                holders: [Mutex::new(Vec::new()), Mutex::new(Vec::new())],
            }),
        }
    }

    /// Number of open read handles the cache tracks.
    pub fn open_count(&self) -> usize {
        self.count(Held::ReadHandle)
    }

    /// Number of sealed segments whose indexes the cache tracks as mapped.
    pub fn mapped_count(&self) -> usize {
        self.count(Held::IndexMaps)
    }

    fn count(&self, held: Held) -> usize {
        let mut holders = self.holders(held);
        holders.retain(|w| w.strong_count() > 0);
        holders.len()
    }

    fn holders(&self, held: Held) -> std::sync::MutexGuard<'_, Vec<Weak<Segment>>> {
        self.inner.holders[held as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn tick(&self) -> u64 {
        self.inner.clock.fetch_add(1, Ordering::Relaxed)
    }

    /// Records that `segment` opened a resource of kind `held` and releases the least
    /// recently used one of that kind if the budget is exceeded. Never holds the cache
    /// lock while taking a segment's.
    fn opened(&self, segment: &Arc<Segment>, held: Held) {
        let victim = {
            let mut holders = self.holders(held);
            holders.retain(|w| w.strong_count() > 0);
            if !holders
                .iter()
                .any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(segment)))
            {
                holders.push(Arc::downgrade(segment));
            }
            if holders.len() > self.inner.max[held as usize] {
                holders
                    .iter()
                    .enumerate()
                    .filter_map(|(i, w)| {
                        w.upgrade()
                            .map(|s| (i, s.last_used[held as usize].load(Ordering::Relaxed)))
                    })
                    .min_by_key(|&(_, used)| used)
                    .map(|(i, _)| holders.swap_remove(i))
            } else {
                None
            }
        };
        if let Some(victim) = victim.and_then(|w| w.upgrade()) {
            victim.release(held);
        }
    }
}
