//! The disk baseline: raw sequential write and read bandwidth of the file system that
//! holds the data directory, so every report can put its MB/s next to the disk's.
//!
//! - **write**: `bytes` in 1 MiB `write`s to a fresh file, then one `fdatasync`; the
//!   time includes the fsync (like `fio --bs=1M --end_fsync=1`).
//! - **write, fsync every 1 MiB** (full baseline only): a quarter of that volume with an
//!   `fdatasync` after each 1 MiB write, the pattern of a broker that fsyncs every
//!   group commit of about 1 MiB.
//! - **read, O_DIRECT**: the written file read back in 1 MiB reads that bypass the page
//!   cache, so they come from the disk (no need to drop the whole machine's caches).
//!   `None` where the file system refuses O_DIRECT.
//! - **read, page cache** (full baseline only): the same file read through the page
//!   cache, where it still is: the ceiling for reading a backlog that was just written.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::error::{Error, Result};

/// Size of every write and read.
const CHUNK_BYTES: usize = 1 << 20;
/// Alignment O_DIRECT needs for buffers (the page size covers every block size here).
const DIRECT_ALIGN: usize = 4096;

/// Raw bandwidth of the data directory's disk, MB/s (10^6 bytes per second).
#[derive(Debug, Clone, Serialize)]
pub struct DiskBaseline {
    /// Where the files were written.
    pub dir: PathBuf,
    /// Bytes written and read.
    pub bytes: u64,
    /// Sequential 1 MiB writes, one final fdatasync, included in the time.
    pub write_mb_s: f64,
    /// Sequential 1 MiB writes, each followed by fdatasync.
    pub write_fsync_each_mb_s: Option<f64>,
    /// Sequential 1 MiB reads with O_DIRECT (from the disk).
    pub read_direct_mb_s: Option<f64>,
    /// Sequential 1 MiB reads through the page cache, which holds the file.
    pub read_cached_mb_s: Option<f64>,
}

/// Measures the disk under `dir` with `bytes` of data; `full` adds the fsync-per-write
/// and page-cache variants.
pub fn measure(dir: &Path, bytes: u64, full: bool) -> Result<DiskBaseline> {
    let bytes = bytes.max(CHUNK_BYTES as u64) / CHUNK_BYTES as u64 * CHUNK_BYTES as u64;
    let path = dir.join(format!("strata-bench-disk-{}.tmp", std::process::id()));
    let result = measure_at(&path, bytes, full);
    let _ = std::fs::remove_file(&path);
    // Flush the removal too, so freeing (and discarding) the blocks is not charged to
    // whatever runs next.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    result.map(|mut b| {
        b.dir = dir.to_path_buf();
        b
    })
}

fn measure_at(path: &Path, bytes: u64, full: bool) -> Result<DiskBaseline> {
    let io = |what: &str| Error::io(format!("disk baseline: {what} {}", path.display()));
    let block: Vec<u8> = (0..CHUNK_BYTES).map(|i| (i % 251) as u8).collect();
    let chunks = bytes / CHUNK_BYTES as u64;

    let write_mb_s = {
        let mut file = File::create(path).map_err(io("create"))?;
        let started = Instant::now();
        for _ in 0..chunks {
            file.write_all(&block).map_err(io("write"))?;
        }
        file.sync_data().map_err(io("fdatasync"))?;
        mb_s(bytes, started)
    };

    let read_direct_mb_s = read_direct(path).map_err(io("read (O_DIRECT)"))?;
    let read_cached_mb_s = if full {
        // One pass to pull the file into the page cache, then the timed pass.
        read_buffered(path).map_err(io("read"))?;
        let started = Instant::now();
        let read = read_buffered(path).map_err(io("read"))?;
        Some(mb_s(read, started))
    } else {
        None
    };

    let write_fsync_each_mb_s = if full {
        let each_bytes = (chunks / 4).max(1) * CHUNK_BYTES as u64;
        let mut file = File::create(path).map_err(io("create"))?;
        let started = Instant::now();
        for _ in 0..each_bytes / CHUNK_BYTES as u64 {
            file.write_all(&block).map_err(io("write"))?;
            file.sync_data().map_err(io("fdatasync"))?;
        }
        Some(mb_s(each_bytes, started))
    } else {
        None
    };

    Ok(DiskBaseline {
        dir: PathBuf::new(),
        bytes,
        write_mb_s,
        write_fsync_each_mb_s,
        read_direct_mb_s,
        read_cached_mb_s,
    })
}

/// MB/s of an O_DIRECT read of the whole file; `None` if the file system refuses
/// O_DIRECT.
fn read_direct(path: &Path) -> std::io::Result<Option<f64>> {
    let mut file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(file) => file,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut raw = vec![0u8; CHUNK_BYTES + DIRECT_ALIGN];
    let start = raw.as_ptr().align_offset(DIRECT_ALIGN);
    let buf = &mut raw[start..start + CHUNK_BYTES];
    let started = Instant::now();
    let mut total = 0u64;
    loop {
        match file.read(buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && total == 0 => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    Ok(Some(mb_s(total, started)))
}

fn read_buffered(path: &Path) -> std::io::Result<u64> {
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut total = 0u64;
    loop {
        match file.read(&mut buf)? {
            0 => return Ok(total),
            n => total += n as u64,
        }
    }
}

fn mb_s(bytes: u64, since: Instant) -> f64 {
    bytes as f64 / since.elapsed().as_secs_f64().max(1e-9) / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_every_variant_and_cleans_up() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let b = measure(dir.path(), 4 << 20, true).expect("the baseline runs");
        assert_eq!(b.bytes, 4 << 20);
        assert!(b.write_mb_s > 0.0);
        assert!(b.write_fsync_each_mb_s.is_some_and(|v| v > 0.0));
        assert!(b.read_cached_mb_s.is_some_and(|v| v > 0.0));
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("list").count(),
            0,
            "the baseline file is removed"
        );
    }
}
