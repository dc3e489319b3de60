//! The recovery checkpoint: a small file that says how much of the active segment is
//! known to be durable and consistent with its indexes, and whether the log was closed
//! cleanly.
//!
//! It is what keeps recovery proportional to the unflushed tail: after a crash only the
//! bytes of the active segment past `position` are scanned. It is written right after an
//! fsync of the segment and its indexes, so everything before `position` is on disk. The
//! file is rewritten in place: its 60 bytes fit in one disk sector, and a torn or stale write
//! fails its CRC, which only costs a scan of the whole active segment.
//!
//! Layout (big-endian):
//!
//! | field                 | type | offset |
//! |-----------------------|------|--------|
//! | magic `STCK`          | u32  | 0      |
//! | version (= 1)         | u8   | 4      |
//! | flags (bit 0: clean)  | u8   | 5      |
//! | reserved (= 0)        | u16  | 6      |
//! | active segment base   | u64  | 8      |
//! | position              | u64  | 16     |
//! | next offset           | u64  | 24     |
//! | offset index entries  | u32  | 32     |
//! | time index entries    | u32  | 36     |
//! | max timestamp         | i64  | 40     |
//! | segment created (ms)  | i64  | 48     |
//! | CRC-32 of bytes 0..56 | u32  | 56     |

use std::fs::OpenOptions;
use std::io;
use std::path::Path;

use crate::fault;

/// File name of the checkpoint inside a partition directory.
pub(crate) const CHECKPOINT_FILE: &str = "checkpoint";

const MAGIC: u32 = u32::from_be_bytes(*b"STCK");
const VERSION: u8 = 1;
const CLEAN: u8 = 1;
const CRC_AT: usize = 56;
const LEN: usize = CRC_AT + 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Checkpoint {
    /// The log was closed cleanly at exactly this state: no scan is needed.
    pub clean: bool,
    pub segment_base: u64,
    /// Bytes of the active segment that are durable and complete.
    pub position: u64,
    /// Offset after the last batch before `position`.
    pub next_offset: u64,
    /// Durable entries of the active segment's offset index.
    pub offset_entries: u32,
    /// Durable entries of the active segment's time index.
    pub time_entries: u32,
    /// Largest record timestamp before `position` (`i64::MIN` when none).
    pub max_timestamp: i64,
    /// Wall-clock time the active segment was created, for rolling by age.
    pub segment_created_ms: i64,
}

impl Checkpoint {
    fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4] = VERSION;
        b[5] = if self.clean { CLEAN } else { 0 };
        b[8..16].copy_from_slice(&self.segment_base.to_be_bytes());
        b[16..24].copy_from_slice(&self.position.to_be_bytes());
        b[24..32].copy_from_slice(&self.next_offset.to_be_bytes());
        b[32..36].copy_from_slice(&self.offset_entries.to_be_bytes());
        b[36..40].copy_from_slice(&self.time_entries.to_be_bytes());
        b[40..48].copy_from_slice(&self.max_timestamp.to_be_bytes());
        b[48..56].copy_from_slice(&self.segment_created_ms.to_be_bytes());
        let crc = crc32fast::hash(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_be_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Checkpoint> {
        if b.len() != LEN {
            return None;
        }
        let u64_at = |at: usize| {
            let mut x = [0u8; 8];
            x.copy_from_slice(&b[at..at + 8]);
            u64::from_be_bytes(x)
        };
        let u32_at = |at: usize| u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        if u32_at(0) != MAGIC || b[4] != VERSION || u32_at(CRC_AT) != crc32fast::hash(&b[..CRC_AT])
        {
            return None;
        }
        Some(Checkpoint {
            clean: b[5] & CLEAN != 0,
            segment_base: u64_at(8),
            position: u64_at(16),
            next_offset: u64_at(24),
            offset_entries: u32_at(32),
            time_entries: u32_at(36),
            max_timestamp: u64_at(40) as i64,
            segment_created_ms: u64_at(48) as i64,
        })
    }

    /// Reads the checkpoint of `dir`; `None` when it is missing or does not check out.
    pub fn read(dir: &Path) -> io::Result<Option<Checkpoint>> {
        match fault::read(&dir.join(CHECKPOINT_FILE)) {
            Ok(bytes) => Ok(Checkpoint::decode(&bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Overwrites the checkpoint of `dir` and fsyncs it. The caller fsyncs the directory
    /// when the file is new.
    pub fn write(&self, dir: &Path) -> io::Result<()> {
        let path = dir.join(CHECKPOINT_FILE);
        let file = fault::open(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false),
            &path,
        )?;
        fault::write_all_at(&file, &path, &self.encode(), 0)?;
        fault::set_len(&file, &path, LEN as u64)?;
        fault::sync_data(&file, &path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_damage() {
        let c = Checkpoint {
            clean: true,
            segment_base: 1 << 40,
            position: 12345,
            next_offset: (1 << 40) + 99,
            offset_entries: 3,
            time_entries: 2,
            max_timestamp: -7,
            segment_created_ms: 1_700_000_000_000,
        };
        let bytes = c.encode();
        assert_eq!(Checkpoint::decode(&bytes), Some(c));
        for i in 0..LEN {
            let mut damaged = bytes;
            damaged[i] ^= 0x10;
            assert_eq!(Checkpoint::decode(&damaged), None, "byte {i}");
        }
        assert_eq!(Checkpoint::decode(&bytes[..LEN - 1]), None);
    }
}
