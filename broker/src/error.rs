//! The broker's error type. Each listener converts it to its wire form in one place
//! (gRPC: [`crate::grpc::status`]).

/// Everything a broker operation can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// No topic of that name.
    #[error("topic {0:?} does not exist")]
    TopicNotFound(String),
    /// The partition number is not below the topic's partition count.
    #[error("topic {topic:?} has {partitions} partitions (0 to {}); there is no partition {partition}", partitions.saturating_sub(1))]
    PartitionNotFound {
        /// The topic.
        topic: String,
        /// The partition asked for.
        partition: u32,
        /// The topic's partition count.
        partitions: u32,
    },
    /// A topic of that name already exists.
    #[error("topic {0:?} already exists")]
    TopicExists(String),
    /// The request is malformed; the message says how.
    #[error("{0}")]
    InvalidArgument(String),
    /// A group request from a member that is not (or no longer) allowed to make it: it
    /// left or timed out, or does not own the partition at that epoch; or an admin
    /// change to a group that has members.
    #[error("{0}")]
    Fenced(String),
    /// A position outside what a partition holds.
    #[error("{0}")]
    OutOfRange(String),
    /// An admin change to the group's offsets is in progress.
    #[error("consumer group {0:?} is being reset or deleted; retry in a moment")]
    GroupBusy(String),
    /// No consumer group of that name.
    #[error("consumer group {0:?} does not exist (it has no members and no committed offsets)")]
    GroupNotFound(String),
    /// The disk is full: a write of the partition's log failed with ENOSPC.
    #[error("partition {0}: disk full: {1}")]
    DiskFull(String, String),
    /// The partition's log failed a write and is being recovered.
    #[error("partition {0} is unavailable: {1}")]
    Unavailable(String, String),
    /// Another broker process holds the data directory's lock.
    #[error("data directory {path} is in use by {}", pid.map_or_else(|| "another strata process".to_string(), |pid| format!("strata process {pid}")))]
    DataDirLocked {
        /// The data directory.
        path: String,
        /// The process holding it, as its lock file says.
        pid: Option<u32>,
    },
    /// The broker is shutting down.
    #[error("the broker is shutting down")]
    ShuttingDown,
    /// The request needs more than one of the broker's limits allows
    /// ([`crate::limits`]): `limit` is the setting's name, the message says by how much.
    #[error("{message} (limit {limit})")]
    LimitExceeded {
        /// The setting, as the configuration file names it.
        limit: &'static str,
        /// What the request asked for and what the limit is.
        message: String,
    },
    /// An idempotent producer's batch was refused by the partition (fenced epoch,
    /// out-of-order sequence, invalid producer fields). Nothing was written.
    #[error("partition {0}: {1}")]
    Sequence(String, strata_storage::SequenceError),
    /// An error from the partition log.
    #[error(transparent)]
    Storage(#[from] strata_storage::Error),
    /// An I/O error on broker metadata.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// The errno of a full disk.
pub(crate) const ENOSPC: i32 = 28;
/// The errno of a process at its open-file limit.
pub(crate) const EMFILE: i32 = 24;
/// The errno of a system at its open-file limit.
pub(crate) const ENFILE: i32 = 23;
/// The errno of a failed memory mapping or allocation (past `vm.max_map_count`, too).
pub(crate) const ENOMEM: i32 = 12;

/// True when a storage error is the disk running out of space.
pub fn is_disk_full(e: &strata_storage::Error) -> bool {
    matches!(e, strata_storage::Error::Io { source, .. } if source.raw_os_error() == Some(ENOSPC))
}

/// The broker's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every value [`Error::reason`] returns.
pub const REASONS: &[&str] = &[
    "topic_not_found",
    "partition_not_found",
    "topic_exists",
    "invalid_argument",
    "fenced",
    "out_of_range",
    "group_busy",
    "group_not_found",
    "disk_full",
    "partition_unavailable",
    "partition_fail_stopped",
    "shutting_down",
    "limit_exceeded",
    "producer_sequence",
    "invalid_batch",
    "batch_too_large",
    "offset_out_of_range",
    "invalid_config",
    "corrupt_data",
    "storage_error",
    "io_error",
];

/// Whose fault a failed request is, which decides how loudly it is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The request was wrong or came at the wrong time (unknown topic, bad batch, stale
    /// epoch, shutting down): the client's business, logged at debug.
    Client,
    /// The broker cannot serve it for now (disk full, a fail-stopped partition): the
    /// operator's business, logged at warn.
    Degraded,
    /// Something broke inside the broker (corrupt data, an I/O error): logged at error.
    Fault,
}

impl Error {
    /// The OS error number of an I/O error, if this is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Storage(strata_storage::Error::Io { source, .. }) | Error::Io { source, .. } => {
                source.raw_os_error()
            }
            _ => None,
        }
    }

    /// A short, stable name for the kind of error, from a fixed set: the `reason` label
    /// of the rejected-requests metric and the `strata-reason` header of a gRPC error.
    pub fn reason(&self) -> &'static str {
        use strata_storage::Error as S;
        match self {
            Error::TopicNotFound(_) => "topic_not_found",
            Error::PartitionNotFound { .. } => "partition_not_found",
            Error::TopicExists(_) => "topic_exists",
            Error::InvalidArgument(_) => "invalid_argument",
            Error::Fenced(_) => "fenced",
            Error::OutOfRange(_) => "out_of_range",
            Error::GroupBusy(_) => "group_busy",
            Error::GroupNotFound(_) => "group_not_found",
            Error::DiskFull(..) => "disk_full",
            Error::Unavailable(..) => "partition_unavailable",
            Error::ShuttingDown => "shutting_down",
            Error::LimitExceeded { .. } => "limit_exceeded",
            // Only `strata serve` at start meets it, never a request.
            Error::DataDirLocked { .. } => "data_dir_locked",
            Error::Sequence(..) => "producer_sequence",
            Error::Storage(S::InvalidBatch(_)) => "invalid_batch",
            Error::Storage(S::BatchTooLarge { .. }) => "batch_too_large",
            Error::Storage(S::OffsetOutOfRange { .. }) => "offset_out_of_range",
            Error::Storage(S::InvalidConfig(_)) => "invalid_config",
            Error::Storage(S::Poisoned { .. }) => "partition_fail_stopped",
            Error::Storage(e) if is_disk_full(e) => "disk_full",
            Error::Storage(S::Corrupted { .. }) => "corrupt_data",
            Error::Storage(_) => "storage_error",
            Error::Io { source, .. } if source.raw_os_error() == Some(ENOSPC) => "disk_full",
            Error::Io { .. } => "io_error",
        }
    }

    /// Whose fault it is. A write refused by a partition that already fail-stopped is
    /// the client's business: the failure itself was logged once, at ERROR, and health
    /// and metrics show it; a retrying producer must not flood the log.
    pub fn severity(&self) -> Severity {
        match self.reason() {
            "disk_full" | "partition_unavailable" | "data_dir_locked" => Severity::Degraded,
            "corrupt_data" | "storage_error" | "io_error" => Severity::Fault,
            _ => Severity::Client,
        }
    }

    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every reason comes from [`REASONS`], so metric labels stay a fixed set.
    #[test]
    fn reasons_are_listed() {
        use strata_storage::Error as S;
        let io = || std::io::Error::other("x");
        let errors = [
            Error::TopicNotFound("t".into()),
            Error::PartitionNotFound {
                topic: "t".into(),
                partition: 1,
                partitions: 1,
            },
            Error::TopicExists("t".into()),
            Error::InvalidArgument("x".into()),
            Error::Fenced("x".into()),
            Error::OutOfRange("x".into()),
            Error::GroupBusy("g".into()),
            Error::GroupNotFound("g".into()),
            Error::DiskFull("t/0".into(), "x".into()),
            Error::Unavailable("t/0".into(), "x".into()),
            Error::ShuttingDown,
            Error::LimitExceeded {
                limit: "max_groups",
                message: "x".into(),
            },
            Error::Storage(S::InvalidConfig("x".into())),
            Error::Storage(S::OffsetOutOfRange {
                requested: 1,
                earliest: 0,
                latest: 0,
            }),
            Error::Storage(S::Io {
                path: "p".into(),
                source: io(),
            }),
            Error::Io {
                path: "p".into(),
                source: io(),
            },
        ];
        for e in errors {
            assert!(REASONS.contains(&e.reason()), "{e:?}");
        }
    }
}
