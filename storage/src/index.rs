//! Sparse, memory-mapped segment indexes: the offset index (relative offset → file
//! position) and the time index (max timestamp so far → relative offset).
//!
//! Entries are fixed-width and big-endian. An index holds no file descriptor: each step
//! that needs one (creating, growing, trimming at seal, loading a sealed index) opens
//! the file by path and closes it before returning, so a partition's descriptors are
//! its active `.log` alone.
//!
//! The writable index of the active segment is mapped for its whole capacity (a
//! mapping may extend past the end of its file) and stays mapped until it is sealed.
//! Entries are stored through the mapping, but only into slots whose disk blocks were
//! allocated beforehand by writing zeros with `pwrite` ([`GROW_BYTES`] at a time): a
//! store into a hole that the file system cannot fill (disk full) would kill the process
//! with SIGBUS, where `pwrite` returns ENOSPC. A sealed index is trimmed to its entries
//! and unmapped; readers map it again on demand ([`Index::load`]), and the broker-wide
//! cache ([`crate::segment::FileCache`]) bounds how many sealed indexes stay mapped.
//!
//! This is the crate's only `unsafe` code: reading and writing the mapping through raw
//! pointers. It is sound because of these invariants:
//! - entry slots below `len` are never written again, slots at or above `len` are never
//!   read, and `len` is published with release/acquire ordering after its slot is
//!   written;
//! - writers are serialized by a mutex, so two threads never write one slot, and a log
//!   is opened by one writer at a time (the broker locks its data directory);
//! - every slot below `allocated` lies inside the file (never past its end, where an
//!   access is SIGBUS), and writes only go to those slots;
//! - a mapping is held through an `Arc` by whoever reads it, so eviction or sealing only
//!   drops the index's own reference and the pages stay mapped until the last reader is
//!   done.
//!
//! (Like every mmap user we assume no other process modifies or truncates the file while
//! it is mapped; the data directory belongs to one broker. On copy-on-write file systems
//! (btrfs, ZFS) a store into an allocated block may still need new space, so there a full
//! disk can still stop the process; see docs/operations.md.)
#![allow(unsafe_code)]

use std::fs::OpenOptions;
use std::io;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use memmap2::{MmapOptions, MmapRaw};

use crate::fault;
/// Size of one offset index entry: relative offset u32, position u32.
pub(crate) const OFFSET_ENTRY_LEN: usize = 8;
/// Size of one time index entry: timestamp i64, relative offset u32.
pub(crate) const TIME_ENTRY_LEN: usize = 12;
const MAX_ENTRY_LEN: usize = 12;

/// A fixed-width index entry.
pub(crate) trait Entry: Copy {
    const LEN: usize;
    fn decode(bytes: &[u8]) -> Self;
    fn encode(&self, out: &mut [u8]);
}

/// Maps a batch's base offset (relative to the segment) to its byte position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OffsetEntry {
    pub relative_offset: u32,
    pub position: u32,
}

impl Entry for OffsetEntry {
    const LEN: usize = OFFSET_ENTRY_LEN;

    fn decode(b: &[u8]) -> Self {
        OffsetEntry {
            relative_offset: u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
            position: u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
        }
    }

    fn encode(&self, out: &mut [u8]) {
        out[..4].copy_from_slice(&self.relative_offset.to_be_bytes());
        out[4..8].copy_from_slice(&self.position.to_be_bytes());
    }
}

/// Every record in batches up to and including the batch at `relative_offset` has a
/// timestamp at most `timestamp`. Timestamps and offsets both grow along the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TimeEntry {
    pub timestamp: i64,
    pub relative_offset: u32,
}

impl Entry for TimeEntry {
    const LEN: usize = TIME_ENTRY_LEN;

    fn decode(b: &[u8]) -> Self {
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&b[..8]);
        TimeEntry {
            timestamp: i64::from_be_bytes(ts),
            relative_offset: u32::from_be_bytes([b[8], b[9], b[10], b[11]]),
        }
    }

    fn encode(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.timestamp.to_be_bytes());
        out[8..12].copy_from_slice(&self.relative_offset.to_be_bytes());
    }
}

/// Bytes of disk blocks a writable index allocates at a time, rounded down to whole
/// entries: a page holds a few hundred entries, so growing is rare, and an active
/// segment's index takes one page of disk until it needs more.
pub(crate) const GROW_BYTES: usize = 4096;
/// Free allocated slots below which an index counts as nearly full. One slot is kept so
/// that sealing can always record the segment's final max timestamp.
const SLOTS_RESERVED: usize = 2;

/// One index file, mapped while it is written or read.
pub(crate) struct Index<E: Entry> {
    path: PathBuf,
    /// Entries the index may hold: what a writable index may grow to, what a sealed one
    /// holds.
    capacity: usize,
    /// Published number of entries.
    len: AtomicUsize,
    /// Trimmed and durable: no entry is added again, and the mapping may be dropped.
    sealed: AtomicBool,
    /// The mapping, when loaded: a writable index is mapped until it is sealed, a sealed
    /// one while the file cache keeps it. An empty sealed index is never mapped (an empty
    /// mapping is not allowed). Readers take the lock only to clone the `Arc`, or, for a
    /// sealed index, to map it.
    map: Mutex<Option<Arc<MmapRaw>>>,
    /// Entries backed by allocated disk blocks, all inside the file. The lock also
    /// serializes the writer's steps; readers never take it.
    allocated: Mutex<usize>,
    /// The outcome of the last attempt to allocate more slots, until the log takes it
    /// ([`Index::take_growth`]) to report a failure.
    growth: Mutex<Option<io::Result<()>>>,
    _entry: PhantomData<E>,
}

impl<E: Entry> std::fmt::Debug for Index<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("path", &self.path)
            .field("len", &self.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl<E: Entry> Index<E> {
    /// Opens (or creates) an index for appending: keeps the first `len` entries, lets it
    /// grow to `capacity_bytes`, allocates disk blocks for the next [`GROW_BYTES`] of
    /// entries and maps the whole capacity. Closes the file before returning.
    pub fn open_writable(path: &Path, len: usize, capacity_bytes: u64) -> io::Result<Self> {
        let capacity = (capacity_bytes / E::LEN as u64) as usize;
        assert!(
            len <= capacity,
            "index length {len} beyond capacity {capacity}"
        );
        let file = fault::open(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false),
            path,
        )?;
        // Slots from `len` on are written before they are read, so cutting them loses
        // nothing; it also drops the holes of a file extended sparsely (as indexes once
        // were), into which a store through the mapping could fault.
        fault::set_len(&file, path, (len * E::LEN) as u64)?;
        // Allocating needs free space: on a full disk the log still opens (so retention
        // can free some), with no slot to spare until a later write grows the index.
        let target = (len + grow_entries::<E>()).min(capacity);
        let allocated = match allocate(&file, path, len * E::LEN, target * E::LEN) {
            Ok(()) => target,
            Err(_) => {
                fault::set_len(&file, path, (len * E::LEN) as u64)?;
                len
            }
        };
        // Mapped past the file's end, so growing never remaps: only slots below
        // `allocated`, which lie inside the file, are ever touched.
        let map = MmapOptions::new().len(capacity * E::LEN).map_raw(&file)?;
        Ok(Index {
            path: path.to_path_buf(),
            capacity,
            len: AtomicUsize::new(len),
            sealed: AtomicBool::new(false),
            map: Mutex::new(Some(Arc::new(map))),
            allocated: Mutex::new(allocated),
            growth: Mutex::new(None),
            _entry: PhantomData,
        })
    }

    /// Opens a sealed index without mapping it: every byte of the file is entries.
    /// Returns the index and its last (up to) two entries, read with `pread`, or `None`
    /// when the file size is not a whole number of entries (the index must be rebuilt).
    pub fn open_sealed(path: &Path) -> io::Result<Option<(Self, Vec<E>)>> {
        let file = fault::open(OpenOptions::new().read(true), path)?;
        let size = file.metadata()?.len();
        if size % E::LEN as u64 != 0 {
            return Ok(None);
        }
        let len = (size / E::LEN as u64) as usize;
        let tail_len = len.min(2);
        let mut bytes = [0u8; 2 * MAX_ENTRY_LEN];
        let bytes = &mut bytes[..tail_len * E::LEN];
        fault::read_exact_at(&file, path, bytes, ((len - tail_len) * E::LEN) as u64)?;
        let tail = bytes.chunks_exact(E::LEN).map(E::decode).collect();
        let index = Index {
            path: path.to_path_buf(),
            capacity: len,
            len: AtomicUsize::new(len),
            sealed: AtomicBool::new(true),
            map: Mutex::new(None),
            allocated: Mutex::new(len),
            growth: Mutex::new(None),
            _entry: PhantomData,
        };
        Ok(Some((index, tail)))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of published entries.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    fn allocated(&self) -> std::sync::MutexGuard<'_, usize> {
        self.allocated.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn mapping(&self) -> std::sync::MutexGuard<'_, Option<Arc<MmapRaw>>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn growth(&self) -> std::sync::MutexGuard<'_, Option<io::Result<()>>> {
        self.growth.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The outcome of the last attempt to allocate more slots since the last call, if
    /// any: a failure is retried (at the next push or roll check) and worth reporting.
    pub fn take_growth(&self) -> Option<io::Result<()>> {
        self.growth().take()
    }

    /// True when fewer than two allocated slots are free: the segment should roll.
    pub fn is_nearly_full(&self) -> bool {
        self.len() + SLOTS_RESERVED > *self.allocated()
    }

    /// Like [`Index::is_nearly_full`], but first tries again to allocate more slots
    /// when an earlier allocation failed (at open, or growing in [`Index::push`]):
    /// a passing shortage of space or descriptors then costs a sparser index for a
    /// while, not a roll (which needs more of both) at every write.
    pub fn is_nearly_full_after_growing(&self) -> bool {
        let mut allocated = self.allocated();
        if self.len() + SLOTS_RESERVED > *allocated
            && *allocated < self.capacity
            && !self.sealed.load(Ordering::Relaxed)
        {
            self.grow(&mut allocated);
        }
        self.len() + SLOTS_RESERVED > *allocated
    }

    /// True when no allocated slot is free.
    pub fn is_full(&self) -> bool {
        self.len() >= *self.allocated()
    }

    /// The entries, if the index is mapped (or empty). Always `Some` for a writable
    /// index.
    pub fn loaded(&self) -> Option<IndexView<E>> {
        let len = self.len();
        let map = self.mapping().clone();
        (map.is_some() || len == 0).then(|| IndexView {
            map,
            len,
            _entry: PhantomData,
        })
    }

    /// The last entry of a writable index (which is always mapped).
    pub fn last(&self) -> Option<E> {
        self.loaded()
            .expect("a writable index is mapped until it is sealed")
            .last()
    }

    /// The entries, mapping the file if it is not mapped: opened by path, mapped and
    /// closed. Also returns whether this call mapped it, so the caller can account for
    /// the new mapping. Concurrent loads of one index map it once.
    pub fn load(&self) -> io::Result<(IndexView<E>, bool)> {
        let len = self.len();
        let mut slot = self.mapping();
        if slot.is_some() || len == 0 {
            let view = IndexView {
                map: slot.clone(),
                len,
                _entry: PhantomData,
            };
            return Ok((view, false));
        }
        let file = fault::open(OpenOptions::new().read(true), &self.path)?;
        // A file cut shorter than its entries would fault on access instead of failing.
        let size = file.metadata()?.len();
        if size != (len * E::LEN) as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "sealed index holds {size} bytes where {len} entries of {} bytes were \
                     found when the log was opened: the file was changed behind the broker \
                     (restart it to rebuild the index)",
                    E::LEN
                ),
            ));
        }
        let map = Arc::new(MmapOptions::new().map_raw_read_only(&file)?);
        *slot = Some(Arc::clone(&map));
        let view = IndexView {
            map: Some(map),
            len,
            _entry: PhantomData,
        };
        Ok((view, true))
    }

    /// Drops a sealed index's mapping; readers still holding a view keep it mapped until
    /// they are done. A writable index keeps its mapping.
    pub fn unload(&self) {
        if self.sealed.load(Ordering::Acquire) {
            self.mapping().take();
        }
    }

    /// Appends an entry. The caller checks that the index is not full first.
    ///
    /// The entry is stored through the mapping into a slot whose disk blocks are already
    /// allocated, so the store cannot meet a full disk. When the allocated slots run low,
    /// the next ones are allocated here; if that fails (disk full, no descriptor left),
    /// the index stays nearly full at its current size, and the log's next write tries
    /// again ([`Index::is_nearly_full_after_growing`]), rolling to a new segment only if
    /// it still fails; the roll reports the failure if it persists. The entry itself is
    /// stored either way.
    pub fn push(&self, entry: E) {
        let mut allocated = self.allocated();
        let i = self.len.load(Ordering::Relaxed);
        assert!(
            !self.sealed.load(Ordering::Relaxed) && i < *allocated,
            "index {} is sealed or full",
            self.path.display()
        );
        let map = self
            .mapping()
            .clone()
            .expect("a writable index is mapped until it is sealed");
        let mut buf = [0u8; MAX_ENTRY_LEN];
        entry.encode(&mut buf[..E::LEN]);
        // SAFETY: slot `i` lies inside the mapping and inside the file (i < allocated <=
        // capacity, and allocated slots are inside the file), and no reader looks at it
        // until `len` is published past it below. Writers are serialized by `allocated`.
        unsafe {
            std::ptr::copy_nonoverlapping(buf.as_ptr(), map.as_mut_ptr().add(i * E::LEN), E::LEN);
        }
        self.len.store(i + 1, Ordering::Release);
        if i + 1 + SLOTS_RESERVED > *allocated && *allocated < self.capacity {
            // A failure leaves the index nearly full: see above.
            self.grow(&mut allocated);
        }
    }

    /// Allocates disk blocks for the next [`GROW_BYTES`] of entries, and keeps the
    /// outcome for [`Index::take_growth`]: a failure leaves `allocated` as it was.
    fn grow(&self, allocated: &mut usize) {
        let target = (*allocated + grow_entries::<E>()).min(self.capacity);
        let grown = fault::open(OpenOptions::new().write(true), &self.path)
            .and_then(|file| allocate(&file, &self.path, *allocated * E::LEN, target * E::LEN));
        if grown.is_ok() {
            *allocated = target;
        }
        *self.growth() = Some(grown);
    }

    /// Writes the entries stored so far (and the file's size) to disk with `msync`,
    /// which needs no descriptor. A sealed index is already durable.
    pub fn sync(&self) -> io::Result<()> {
        let allocated = self.allocated();
        if self.sealed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let map = self
            .mapping()
            .clone()
            .expect("a writable index is mapped until it is sealed");
        fault::sync_mapping(&map, *allocated * E::LEN, &self.path)
    }

    /// Trims the file to its entries and makes it durable (opening it by path for that),
    /// then drops the mapping: the index of a sealed segment, mapped again when read.
    /// Slots past the new end are never read or written again. On failure, sealing can
    /// be tried again (both steps can be repeated).
    pub fn seal(&self) -> io::Result<()> {
        let mut allocated = self.allocated();
        if self.sealed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let len = self.len();
        let file = fault::open(OpenOptions::new().write(true), &self.path)?;
        fault::set_len(&file, &self.path, (len * E::LEN) as u64)?;
        // Slots past the new end are outside the file now: a store there would fault.
        *allocated = len;
        fault::sync_all(&file, &self.path)?;
        drop(file);
        self.sealed.store(true, Ordering::Release);
        self.mapping().take();
        Ok(())
    }
}

/// Entries that [`GROW_BYTES`] holds.
fn grow_entries<E: Entry>() -> usize {
    (GROW_BYTES / E::LEN).max(1)
}

/// Allocates disk blocks for the bytes `from..to` of `file` by writing zeros there
/// (growing the file to `to`), so that stores through a mapping never meet a hole.
fn allocate(file: &std::fs::File, path: &Path, from: usize, to: usize) -> io::Result<()> {
    if to <= from {
        return Ok(());
    }
    fault::write_all_at(file, path, &vec![0u8; to - from], from as u64)
}

/// A reader's view of an index's entries: the mapping, kept alive by its `Arc` whatever
/// happens to the index meanwhile (sealing, eviction), and the entries published when
/// the view was taken.
pub(crate) struct IndexView<E: Entry> {
    map: Option<Arc<MmapRaw>>,
    len: usize,
    _entry: PhantomData<E>,
}

impl<E: Entry> IndexView<E> {
    /// Entry `i`; `i` must be below the view's length.
    pub fn get(&self, i: usize) -> E {
        assert!(i < self.len, "index entry {i} not published");
        let map = self.map.as_ref().expect("a non-empty index is mapped");
        let mut buf = [0u8; MAX_ENTRY_LEN];
        // SAFETY: slot `i` lies inside the mapping and the file (i < len <= allocated)
        // and was fully written before `len` was published past it; published slots are
        // never written again, so nothing writes these bytes while we copy them. The
        // `Arc` keeps the pages mapped.
        unsafe {
            std::ptr::copy_nonoverlapping(map.as_ptr().add(i * E::LEN), buf.as_mut_ptr(), E::LEN);
        }
        E::decode(&buf[..E::LEN])
    }

    pub fn last(&self) -> Option<E> {
        self.len.checked_sub(1).map(|i| self.get(i))
    }

    /// Number of leading entries for which `pred` holds; `pred` must be true for a prefix
    /// of the entries and false after (the entries are sorted).
    pub fn partition_point(&self, pred: impl Fn(&E) -> bool) -> usize {
        let (mut lo, mut hi) = (0, self.len);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if pred(&self.get(mid)) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_get_seal_reopen_and_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.index");
        let index = Index::<OffsetEntry>::open_writable(&path, 0, 80).expect("open");
        assert_eq!(index.capacity, 10);
        for i in 0..5u32 {
            index.push(OffsetEntry {
                relative_offset: i * 10,
                position: i * 100,
            });
        }
        let view = index.loaded().expect("a writable index is mapped");
        assert_eq!(view.partition_point(|e| e.relative_offset <= 25), 3);
        assert_eq!(view.partition_point(|e| e.relative_offset < 1), 1);
        index.seal().expect("seal");
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), 40);
        assert!(index.loaded().is_none(), "sealing unmaps");
        // A view taken before the seal still reads its entries.
        assert_eq!(view.get(4).position, 400);
        drop(index);
        let (sealed, tail) = Index::<OffsetEntry>::open_sealed(&path)
            .expect("open")
            .expect("whole entries");
        assert_eq!(sealed.len(), 5);
        assert_eq!(tail.len(), 2);
        assert_eq!(
            tail[1],
            OffsetEntry {
                relative_offset: 40,
                position: 400
            }
        );
        assert!(
            sealed.loaded().is_none(),
            "a sealed index is mapped on demand"
        );
        let (view, mapped) = sealed.load().expect("load");
        assert!(mapped);
        assert_eq!(view.last(), Some(tail[1]));
        assert!(!sealed.load().expect("load again").1, "mapped once");
        sealed.unload();
        assert!(sealed.loaded().is_none());
        assert_eq!(
            view.get(0),
            OffsetEntry {
                relative_offset: 0,
                position: 0
            }
        );
    }

    /// Disk blocks are allocated a page at a time ahead of the entries stored through
    /// the mapping, and the file never holds more than the allocated slots.
    #[test]
    fn a_writable_index_grows_its_file_a_page_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.timeindex");
        let entries = grow_entries::<TimeEntry>();
        let index = Index::<TimeEntry>::open_writable(&path, 0, 1 << 20).expect("open");
        let size = || std::fs::metadata(&path).expect("meta").len();
        assert_eq!(size(), (entries * TIME_ENTRY_LEN) as u64);
        for i in 0..entries {
            assert!(!index.is_nearly_full(), "grown before it runs out, at {i}");
            index.push(TimeEntry {
                timestamp: i as i64,
                relative_offset: i as u32,
            });
        }
        assert_eq!(size(), (2 * entries * TIME_ENTRY_LEN) as u64);
        assert_eq!(index.last().map(|e| e.timestamp), Some(entries as i64 - 1));
        index.sync().expect("sync");
        index.seal().expect("seal");
        assert_eq!(size(), (entries * TIME_ENTRY_LEN) as u64);
    }

    #[test]
    fn time_entries_round_trip_and_partial_files_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.timeindex");
        let index = Index::<TimeEntry>::open_writable(&path, 0, 120).expect("open");
        let e = TimeEntry {
            timestamp: -5,
            relative_offset: 9,
        };
        index.push(e);
        assert_eq!(index.last(), Some(e));
        index.seal().expect("seal");
        drop(index);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| io::Write::write_all(&mut f, &[1, 2, 3]))
            .expect("append");
        assert!(Index::<TimeEntry>::open_sealed(&path)
            .expect("open")
            .is_none());
    }

    /// A sealed index whose file changed size behind the broker is refused, not mapped
    /// (reading past a file's end through a mapping kills the process).
    #[test]
    fn loading_a_sealed_index_checks_its_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.index");
        let index = Index::<OffsetEntry>::open_writable(&path, 0, 80).expect("open");
        index.push(OffsetEntry {
            relative_offset: 0,
            position: 0,
        });
        index.push(OffsetEntry {
            relative_offset: 1,
            position: 70,
        });
        index.seal().expect("seal");
        let (sealed, _) = Index::<OffsetEntry>::open_sealed(&path)
            .expect("open")
            .expect("whole entries");
        std::fs::File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(8))
            .expect("cut");
        let e = sealed.load().err().expect("refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    }
}
