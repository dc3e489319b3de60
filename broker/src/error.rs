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

/// True when a storage error is the disk running out of space.
pub fn is_disk_full(e: &strata_storage::Error) -> bool {
    matches!(e, strata_storage::Error::Io { source, .. } if source.raw_os_error() == Some(ENOSPC))
}

/// The broker's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            path: path.display().to_string(),
            source,
        }
    }
}
