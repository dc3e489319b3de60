//! Sparse, memory-mapped segment indexes: the offset index (relative offset → file
//! position) and the time index (max timestamp so far → relative offset).
//!
//! Entries are fixed-width and big-endian. An index file is preallocated to its capacity
//! while its segment is active and trimmed to its entries when the segment is sealed.
//!
//! This is the crate's only `unsafe` code: reading the mapping through a raw pointer.
//! It is sound because of one invariant: entry slots below `len` are never written
//! again, slots at or above `len` are never read, and `len` is published with
//! release/acquire ordering after its slot is written (with `pwrite`; see
//! [`Index::push`]). Writers are serialized by a mutex, so two threads never write one
//! slot, and a log is opened by one writer at a time (the broker locks its data
//! directory). (Like every mmap user we assume no other process
//! modifies the file while it is mapped; the data directory belongs to one broker.)
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use memmap2::MmapRaw;

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

/// One index file and its mapping.
pub(crate) struct Index<E: Entry> {
    path: PathBuf,
    /// Open while the index can still change; closed once sealed, so sealed segments
    /// hold no file descriptors (the mapping outlives the descriptor).
    file: Mutex<Option<File>>,
    /// `None` when the file is empty (an empty mapping is not allowed).
    map: Option<MmapRaw>,
    /// Entries the mapping can hold.
    capacity: usize,
    /// Published number of entries.
    len: AtomicUsize,
    /// Serializes writers; readers never take it.
    write: Mutex<()>,
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
    /// Opens (or creates) an index for appending: keeps the first `len` entries and
    /// grows the file to `capacity_bytes` (a sparse extension, no disk blocks used).
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
        fault::set_len(&file, path, (capacity * E::LEN) as u64)?;
        Self::map(path, file, len, capacity)
    }

    /// Opens a sealed index: every byte of the file is entries. Returns `None` when the
    /// file size is not a whole number of entries (the index must be rebuilt).
    pub fn open_sealed(path: &Path) -> io::Result<Option<Self>> {
        let file = fault::open(OpenOptions::new().read(true).write(true), path)?;
        let size = file.metadata()?.len();
        if size % E::LEN as u64 != 0 {
            return Ok(None);
        }
        let len = (size / E::LEN as u64) as usize;
        let index = Self::map(path, file, len, len)?;
        index.file.lock().unwrap_or_else(|e| e.into_inner()).take();
        Ok(Some(index))
    }

    fn map(path: &Path, file: File, len: usize, capacity: usize) -> io::Result<Self> {
        let map = if capacity == 0 {
            None
        } else {
            Some(MmapRaw::map_raw(&file)?)
        };
        Ok(Index {
            path: path.to_path_buf(),
            file: Mutex::new(Some(file)),
            map,
            capacity,
            len: AtomicUsize::new(len),
            write: Mutex::new(()),
            _entry: PhantomData,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of published entries.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// True when fewer than two free slots remain. One slot is kept in reserve so that
    /// sealing can always record the segment's final max timestamp.
    pub fn is_nearly_full(&self) -> bool {
        self.len() + 2 > self.capacity
    }

    /// True when no slot is free.
    pub fn is_full(&self) -> bool {
        self.len() >= self.capacity
    }

    /// Entry `i`; `i` must be below [`Index::len`].
    pub fn get(&self, i: usize) -> E {
        assert!(i < self.len(), "index entry {i} not published");
        let map = self.map.as_ref().expect("a non-empty index is mapped");
        let mut buf = [0u8; MAX_ENTRY_LEN];
        // SAFETY: slot `i` lies inside the mapping (i < len <= capacity) and was fully
        // written before `len` was published past it; published slots are never written
        // again, so nothing writes these bytes while we copy them.
        unsafe {
            std::ptr::copy_nonoverlapping(map.as_ptr().add(i * E::LEN), buf.as_mut_ptr(), E::LEN);
        }
        E::decode(&buf[..E::LEN])
    }

    pub fn last(&self) -> Option<E> {
        self.len().checked_sub(1).map(|i| self.get(i))
    }

    /// Number of leading entries for which `pred` holds; `pred` must be true for a prefix
    /// of the entries and false after (the entries are sorted).
    pub fn partition_point(&self, pred: impl Fn(&E) -> bool) -> usize {
        let (mut lo, mut hi) = (0, self.len());
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

    /// Appends an entry. The caller checks capacity first.
    ///
    /// The entry is written with `pwrite`, not through the mapping: the file is sparse,
    /// and a store into a page the file system cannot allocate (disk full) would kill the
    /// process with SIGBUS, where `pwrite` returns ENOSPC. The mapping is shared, so
    /// readers see the entry through it once `len` is published.
    pub fn push(&self, entry: E) -> io::Result<()> {
        let _writer = self.write.lock().unwrap_or_else(|e| e.into_inner());
        let i = self.len.load(Ordering::Relaxed);
        assert!(i < self.capacity, "index {} is full", self.path.display());
        let mut buf = [0u8; MAX_ENTRY_LEN];
        entry.encode(&mut buf[..E::LEN]);
        let file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let file = file
            .as_ref()
            .ok_or_else(|| io::Error::other("index is sealed"))?;
        fault::write_all_at(file, &self.path, &buf[..E::LEN], (i * E::LEN) as u64)?;
        self.len.store(i + 1, Ordering::Release);
        Ok(())
    }

    /// Fsyncs the entries written so far. A sealed index is already durable.
    pub fn sync(&self) -> io::Result<()> {
        match &*self.file.lock().unwrap_or_else(|e| e.into_inner()) {
            Some(file) => fault::sync_data(file, &self.path),
            None => Ok(()),
        }
    }

    /// Trims the file to its entries, makes it durable and closes it: the index of a
    /// sealed segment. The mapping stays as it is; slots past the new end are never read.
    /// On failure the file stays open, so sealing can be tried again (both steps can be
    /// repeated).
    pub fn seal(&self) -> io::Result<()> {
        let mut slot = self.file.lock().unwrap_or_else(|e| e.into_inner());
        let Some(file) = slot.as_ref() else {
            return Ok(());
        };
        fault::set_len(file, &self.path, (self.len() * E::LEN) as u64)?;
        fault::sync_all(file, &self.path)?;
        slot.take();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_get_seal_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("x.index");
        let index = Index::<OffsetEntry>::open_writable(&path, 0, 80).expect("open");
        assert_eq!(index.capacity, 10);
        for i in 0..5u32 {
            index
                .push(OffsetEntry {
                    relative_offset: i * 10,
                    position: i * 100,
                })
                .expect("push");
        }
        assert_eq!(index.partition_point(|e| e.relative_offset <= 25), 3);
        assert_eq!(index.partition_point(|e| e.relative_offset < 1), 1);
        index.seal().expect("seal");
        assert_eq!(std::fs::metadata(&path).expect("meta").len(), 40);
        drop(index);
        let sealed = Index::<OffsetEntry>::open_sealed(&path)
            .expect("open")
            .expect("whole entries");
        assert_eq!(sealed.len(), 5);
        assert_eq!(
            sealed.last(),
            Some(OffsetEntry {
                relative_offset: 40,
                position: 400
            })
        );
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
        index.push(e).expect("push");
        assert_eq!(index.get(0), e);
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
}
