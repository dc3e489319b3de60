//! Per-log configuration: segment rolling, retention, limits and the durability policy.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use crate::batch::BATCH_HEADER_LEN;
use crate::error::{Error, Result};
use crate::index::{OFFSET_ENTRY_LEN, TIME_ENTRY_LEN};

/// When an appended batch counts as durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Every commit fsyncs before it returns: an acknowledged batch survives `kill -9`
    /// and power loss. Many appends committed together share one fsync (group commit).
    #[default]
    Fsync,
    /// Commits fsync at most once per interval; a crash can lose up to one interval.
    Interval(Duration),
    /// Never fsync on commit; the operating system writes back when it likes. Segments
    /// are still fsynced when they roll and on clean close.
    None,
}

impl FromStr for Durability {
    type Err = Error;

    /// Parses `fsync`, `none` or `interval:<ms>`.
    fn from_str(s: &str) -> Result<Durability> {
        match s {
            "fsync" => Ok(Durability::Fsync),
            "none" => Ok(Durability::None),
            _ => {
                let ms = s
                    .strip_prefix("interval:")
                    .and_then(|ms| ms.parse::<u64>().ok())
                    .filter(|&ms| ms > 0)
                    .ok_or_else(|| {
                        Error::InvalidConfig(format!(
                            "durability {s:?} is not one of `fsync`, `none`, `interval:<ms>` \
                             (ms > 0)"
                        ))
                    })?;
                Ok(Durability::Interval(Duration::from_millis(ms)))
            }
        }
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Durability::Fsync => f.write_str("fsync"),
            Durability::None => f.write_str("none"),
            Durability::Interval(d) => write!(f, "interval:{}", d.as_millis()),
        }
    }
}

/// Configuration of one partition log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A segment rolls before an append would take it past this size. At most
    /// `u32::MAX` (index positions are 32-bit).
    pub segment_bytes_max: u64,
    /// A non-empty segment rolls at the first append after it is this old.
    pub segment_ms: Option<u64>,
    /// Sealed segments whose newest record is older than this are deleted.
    pub retention_ms: Option<u64>,
    /// Oldest sealed segments are deleted while the log is larger than this.
    pub retention_bytes: Option<u64>,
    /// Largest batch an append accepts.
    pub batch_bytes_max: usize,
    /// Bytes of batches between two entries of the sparse offset index.
    pub index_interval_bytes: u64,
    /// Largest size of each index file (its file grows a page at a time while written);
    /// a segment rolls when its index is full.
    pub index_bytes_max: u64,
    /// When a commit is durable.
    pub durability: Durability,
    /// After this many bytes, a commit that fsyncs also writes a recovery checkpoint, so
    /// recovery after a crash scans at most about this much of the active segment.
    pub checkpoint_interval_bytes: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            segment_bytes_max: 1 << 30,
            segment_ms: Some(7 * 24 * 3600 * 1000),
            retention_ms: Some(7 * 24 * 3600 * 1000),
            retention_bytes: None,
            batch_bytes_max: 1 << 20,
            index_interval_bytes: 4096,
            index_bytes_max: 10 << 20,
            durability: Durability::Fsync,
            checkpoint_interval_bytes: 64 << 20,
        }
    }
}

impl LogConfig {
    /// Checks that every value is in its valid range.
    pub fn validate(&self) -> Result<()> {
        let fail = |msg: String| Err(Error::InvalidConfig(msg));
        if self.segment_bytes_max < BATCH_HEADER_LEN as u64
            || self.segment_bytes_max > u64::from(u32::MAX)
        {
            return fail(format!(
                "segment_bytes_max {} must be between {BATCH_HEADER_LEN} and {}",
                self.segment_bytes_max,
                u32::MAX
            ));
        }
        if self.batch_bytes_max < BATCH_HEADER_LEN || self.batch_bytes_max > i32::MAX as usize {
            return fail(format!(
                "batch_bytes_max {} must be between {BATCH_HEADER_LEN} and {}",
                self.batch_bytes_max,
                i32::MAX
            ));
        }
        let min_index = 4 * OFFSET_ENTRY_LEN.max(TIME_ENTRY_LEN) as u64;
        if self.index_bytes_max < min_index {
            return fail(format!(
                "index_bytes_max {} must be at least {min_index}",
                self.index_bytes_max
            ));
        }
        if self.index_interval_bytes == 0 {
            return fail("index_interval_bytes must be positive".into());
        }
        if self.segment_ms == Some(0) || self.retention_ms == Some(0) {
            return fail("segment_ms and retention_ms must be positive when set".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durability_parses_and_prints() {
        for s in ["fsync", "none", "interval:250"] {
            let d: Durability = s.parse().expect("valid");
            assert_eq!(d.to_string(), s);
        }
        for bad in [
            "",
            "sync",
            "interval:",
            "interval:0",
            "interval:-5",
            "interval:x",
        ] {
            assert!(bad.parse::<Durability>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn default_is_valid_and_bad_values_are_not() {
        LogConfig::default().validate().expect("default valid");
        let bad = [
            LogConfig {
                segment_bytes_max: 1 << 33,
                ..LogConfig::default()
            },
            LogConfig {
                index_bytes_max: 8,
                ..LogConfig::default()
            },
            LogConfig {
                batch_bytes_max: 10,
                ..LogConfig::default()
            },
            LogConfig {
                retention_ms: Some(0),
                ..LogConfig::default()
            },
        ];
        for config in bad {
            assert!(config.validate().is_err(), "{config:?}");
        }
    }
}
