//! Topic names, per-topic settings and their persistence.
//!
//! A topic lives in `<data>/topics/<name>/`: `topic.toml` (its settings) and one
//! directory per partition, `0/`, `1/`, ... each a storage log. A topic directory is
//! built under `<data>/tmp/` and renamed into place, so a crash never leaves a topic
//! half created; deletion renames it into `<data>/trash/` first, so a crash never leaves
//! one half deleted.

use std::path::Path;

use serde::{Deserialize, Serialize};
use strata_storage::{Durability, LogConfig};

use crate::error::{Error, Result};

/// File holding a topic's settings inside its directory.
pub const TOPIC_FILE: &str = "topic.toml";
/// Most partitions a topic may have. What partitions cost is bounded broker-wide by
/// `max_partitions`; this only keeps a topic within what one request can name (and a
/// partition set within 2 KiB).
pub const PARTITIONS_MAX: u32 = 16_384;
/// Largest `max_message_bytes`: a produce request (one batch) and a fetch response (up to
/// 8 MiB plus one batch) must fit in the server's 64 MiB gRPC message limit.
pub const MESSAGE_BYTES_CAP: u32 = 32 << 20;

/// Checks a topic name: 1 to 249 characters from `[a-zA-Z0-9._-]`, not `.` or `..`.
pub fn validate_name(name: &str) -> Result<()> {
    validate("topic", name)
}

/// Checks a name of `kind` (a topic, a consumer group): 1 to 249 characters of
/// [a-zA-Z0-9._-], not `.` or `..`, so it is safe as a directory name and in logs.
pub fn validate(kind: &str, name: &str) -> Result<()> {
    let valid_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if name.is_empty() || name.len() > 249 || !valid_chars || name == "." || name == ".." {
        return Err(Error::InvalidArgument(format!(
            "invalid {kind} name {name:?}: use 1 to 249 characters from [a-zA-Z0-9._-], not \".\" or \"..\""
        )));
    }
    Ok(())
}

/// Reads a limit as the protocol and the configuration write it: absent takes
/// `default`, -1 means "no limit", anything else must be positive.
pub fn parse_limit(name: &str, value: Option<i64>, default: Option<u64>) -> Result<Option<u64>> {
    match value {
        None => Ok(default),
        Some(-1) => Ok(None),
        Some(v) if v > 0 => Ok(Some(v as u64)),
        Some(v) => Err(Error::InvalidArgument(format!(
            "{name} must be positive or -1 (no limit), got {v}"
        ))),
    }
}

/// The settings a create request gives, each `None` when it takes the broker's default.
/// Limits are written as the protocols write them: -1 means "no limit".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicOverrides {
    /// Retention by age in ms; -1 keeps forever.
    pub retention_ms: Option<i64>,
    /// Retention by size per partition; -1 is unlimited.
    pub retention_bytes: Option<i64>,
    /// Segment size at which the active segment rolls.
    pub segment_bytes: Option<u64>,
    /// Segment age in ms at which the active segment rolls; -1 never.
    pub segment_ms: Option<i64>,
    /// Largest batch a produce request may carry.
    pub max_message_bytes: Option<u32>,
    /// `fsync`, `interval:<ms>` or `none`.
    pub durability: Option<String>,
}

/// A topic's settings, as stored in `topic.toml`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicSettings {
    /// Number of partitions.
    pub partitions: u32,
    /// Retention by age; `None` keeps data forever.
    pub retention_ms: Option<u64>,
    /// Retention by size per partition; `None` is unlimited.
    pub retention_bytes: Option<u64>,
    /// Segment size at which the active segment rolls.
    pub segment_bytes: u64,
    /// Segment age at which the active segment rolls; `None` never.
    pub segment_ms: Option<u64>,
    /// Largest batch a produce request may carry.
    pub max_message_bytes: u32,
    /// `fsync`, `interval:<ms>` or `none`.
    pub durability: String,
}

impl TopicSettings {
    /// Settings from a create request, with `defaults` for what it leaves out.
    pub fn from_request(
        partitions: u32,
        c: TopicOverrides,
        defaults: &TopicSettings,
    ) -> Result<TopicSettings> {
        if partitions == 0 || partitions > PARTITIONS_MAX {
            return Err(Error::InvalidArgument(format!(
                "partitions must be between 1 and {PARTITIONS_MAX}, got {partitions}"
            )));
        }
        let settings = TopicSettings {
            partitions,
            retention_ms: parse_limit("retention_ms", c.retention_ms, defaults.retention_ms)?,
            retention_bytes: parse_limit(
                "retention_bytes",
                c.retention_bytes,
                defaults.retention_bytes,
            )?,
            segment_bytes: c.segment_bytes.unwrap_or(defaults.segment_bytes),
            segment_ms: parse_limit("segment_ms", c.segment_ms, defaults.segment_ms)?,
            max_message_bytes: c.max_message_bytes.unwrap_or(defaults.max_message_bytes),
            durability: c.durability.unwrap_or_else(|| defaults.durability.clone()),
        };
        if settings.max_message_bytes > MESSAGE_BYTES_CAP {
            return Err(Error::InvalidArgument(format!(
                "max_message_bytes {} is above the limit of {MESSAGE_BYTES_CAP}",
                settings.max_message_bytes
            )));
        }
        settings.log_config()?;
        Ok(settings)
    }

    /// The storage configuration of each partition log; checks every value.
    pub fn log_config(&self) -> Result<LogConfig> {
        let durability: Durability = self
            .durability
            .parse()
            .map_err(|e: strata_storage::Error| Error::InvalidArgument(e.to_string()))?;
        let config = LogConfig {
            segment_bytes_max: self.segment_bytes,
            segment_ms: self.segment_ms,
            retention_ms: self.retention_ms,
            retention_bytes: self.retention_bytes,
            batch_bytes_max: self.max_message_bytes as usize,
            durability,
            ..LogConfig::default()
        };
        config
            .validate()
            .map_err(|e| Error::InvalidArgument(e.to_string()))?;
        Ok(config)
    }

    /// The settings as overrides: every field set, -1 for "no limit".
    pub fn overrides(&self) -> TopicOverrides {
        let limit = |v: Option<u64>| Some(v.map_or(-1, |v| v.min(i64::MAX as u64) as i64));
        TopicOverrides {
            retention_ms: limit(self.retention_ms),
            retention_bytes: limit(self.retention_bytes),
            segment_bytes: Some(self.segment_bytes),
            segment_ms: limit(self.segment_ms),
            max_message_bytes: Some(self.max_message_bytes),
            durability: Some(self.durability.clone()),
        }
    }

    /// Reads `topic.toml` from a topic directory.
    pub fn load(dir: &Path) -> Result<TopicSettings> {
        let path = dir.join(TOPIC_FILE);
        let text = std::fs::read_to_string(&path).map_err(Error::io(&path))?;
        let invalid = |reason: String| Error::Io {
            path: path.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, reason),
        };
        let settings: TopicSettings = toml::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if settings.partitions == 0 || settings.partitions > PARTITIONS_MAX {
            return Err(invalid(format!(
                "partitions must be between 1 and {PARTITIONS_MAX}, found {}",
                settings.partitions
            )));
        }
        Ok(settings)
    }

    /// Writes `topic.toml` into a topic directory and fsyncs it.
    pub fn store(&self, dir: &Path) -> Result<()> {
        let path = dir.join(TOPIC_FILE);
        let text = toml::to_string(self).map_err(|e| Error::InvalidArgument(e.to_string()))?;
        std::fs::write(&path, text).map_err(Error::io(&path))?;
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(Error::io(&path))
    }
}

impl Default for TopicSettings {
    fn default() -> Self {
        let log = LogConfig::default();
        TopicSettings {
            partitions: 1,
            retention_ms: log.retention_ms,
            retention_bytes: log.retention_bytes,
            segment_bytes: log.segment_bytes_max,
            segment_ms: log.segment_ms,
            max_message_bytes: log.batch_bytes_max as u32,
            durability: log.durability.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["orders", "orders.created", "a", "A-b_c.9", &"x".repeat(249)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "ü", &"x".repeat(250)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn request_settings_take_defaults_and_reject_nonsense() {
        let d = TopicSettings::default();
        let s = TopicSettings::from_request(3, TopicOverrides::default(), &d).expect("defaults");
        assert_eq!(s.partitions, 3);
        assert_eq!(s.durability, "fsync");
        let forever = TopicOverrides {
            retention_ms: Some(-1),
            durability: Some("none".into()),
            ..Default::default()
        };
        let s = TopicSettings::from_request(1, forever, &d).expect("forever");
        assert_eq!((s.retention_ms, s.durability.as_str()), (None, "none"));
        assert_eq!(s.overrides().retention_ms, Some(-1));
        for bad in [
            TopicOverrides {
                retention_ms: Some(0),
                ..Default::default()
            },
            TopicOverrides {
                durability: Some("sometimes".into()),
                ..Default::default()
            },
            TopicOverrides {
                segment_bytes: Some(10),
                ..Default::default()
            },
            TopicOverrides {
                max_message_bytes: Some(64 << 20),
                ..Default::default()
            },
        ] {
            assert!(
                TopicSettings::from_request(1, bad.clone(), &d).is_err(),
                "{bad:?}"
            );
        }
        assert!(TopicSettings::from_request(0, TopicOverrides::default(), &d).is_err());
    }
}
