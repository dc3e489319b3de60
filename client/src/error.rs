//! The client's one error type. Every gRPC status the broker returns is mapped here, in
//! one place, to a variant that says what went wrong; the broker's message (meant for a
//! person) is kept for `Display`.

use tonic::{Code, Status};

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything a Strata client call can fail with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The broker address cannot be parsed or used.
    #[error("invalid broker address {address:?}: {message}")]
    InvalidAddress {
        /// The address as given.
        address: String,
        /// Why it was rejected.
        message: String,
    },
    /// The topic does not exist (gRPC `NOT_FOUND`).
    #[error("topic {topic:?} not found: {message}")]
    TopicNotFound {
        /// The topic asked for.
        topic: String,
        /// The broker's message.
        message: String,
    },
    /// The partition number is not below the topic's partition count.
    #[error("topic {topic:?} has {partitions} partitions; there is no partition {partition}")]
    PartitionNotFound {
        /// The topic.
        topic: String,
        /// The partition asked for.
        partition: u32,
        /// The topic's partition count.
        partitions: u32,
    },
    /// CreateTopic with a name that is taken (gRPC `ALREADY_EXISTS`).
    #[error("topic {topic:?} already exists")]
    TopicExists {
        /// The topic name.
        topic: String,
    },
    /// The broker rejected a request argument (gRPC `INVALID_ARGUMENT`): a bad name,
    /// partition count, config value or record batch.
    #[error("invalid argument: {message}")]
    InvalidArgument {
        /// The broker's message.
        message: String,
    },
    /// A read offset outside the partition's stored range (gRPC `OUT_OF_RANGE`), for
    /// example after retention deleted the data at a consumer's position.
    #[error("offset {offset} of {topic}/{partition} is out of range: {message}")]
    OffsetOutOfRange {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The offset asked for.
        offset: u64,
        /// The broker's message, which gives the stored range.
        message: String,
    },
    /// A consumer with [`OffsetReset::None`](crate::OffsetReset::None) has no position to
    /// read a partition from: its group has no committed offset there, or retention
    /// deleted the records at it. The partition is not read until the group has one
    /// (the consumer keeps asking; set one with `Admin::reset_offsets` while the group
    /// has no members, or `strata groups reset`).
    #[error(
        "consumer group {group:?} has no position to read {topic}/{partition} from: {message}"
    )]
    NoPosition {
        /// The group.
        group: String,
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// Why, and what to do.
        message: String,
    },
    /// The consumer group does not exist: it has neither members nor committed offsets
    /// (gRPC `NOT_FOUND` from a group administration call).
    #[error("consumer group {group:?} not found: {message}")]
    GroupNotFound {
        /// The group asked for.
        group: String,
        /// The broker's message.
        message: String,
    },
    /// The group does not count this consumer as a member, or not as the owner of a
    /// partition at its epoch (gRPC `FAILED_PRECONDITION` from a member's call): its
    /// session expired, it was fenced for holding a revoked partition too long, or the
    /// broker restarted. A [`Consumer`](crate::Consumer) handles this itself: it drops
    /// its partitions without committing and rejoins; uncommitted records are delivered
    /// again.
    #[error("not a member of consumer group {group:?} (rejoining): {message}")]
    Fenced {
        /// The group.
        group: String,
        /// The broker's message.
        message: String,
    },
    /// The operation needs a group without members, and this one has some (gRPC
    /// `FAILED_PRECONDITION` from resetting offsets or deleting a group): stop its
    /// consumers first.
    #[error("consumer group {group:?} has active members: {message}")]
    GroupNotEmpty {
        /// The group.
        group: String,
        /// The broker's message.
        message: String,
    },
    /// A commit named a partition this consumer no longer owns: it was revoked (moved to
    /// another member) after the record was read. The record will be delivered again
    /// to the partition's new owner; keep consuming.
    #[error("partition {topic}/{partition} is no longer assigned to this consumer")]
    PartitionRevoked {
        /// The topic.
        topic: String,
        /// The partition.
        partition: u32,
    },
    /// One record is larger than a batch may be, so it can never be sent.
    #[error("record of about {size} bytes cannot fit in a batch of at most {max} bytes")]
    RecordTooLarge {
        /// Encoded size of the record, batch header included.
        size: usize,
        /// The batch size limit in force.
        max: usize,
    },
    /// The broker refused for lack of a resource (gRPC `RESOURCE_EXHAUSTED`): a batch over
    /// the topic's `max_message_bytes`, or a full disk.
    #[error("too large or out of resources: {message}")]
    TooLarge {
        /// The broker's message.
        message: String,
    },
    /// The broker is unreachable, shutting down, or a partition is recovering (gRPC
    /// `UNAVAILABLE`, or a connection error). Retrying later is reasonable; the producer
    /// and consumer already retried before returning this.
    #[error("broker unavailable: {message}")]
    Unavailable {
        /// What failed.
        message: String,
    },
    /// The request timed out (gRPC `DEADLINE_EXCEEDED`). The outcome is unknown: a
    /// produce request may still have been written.
    #[error("request timed out: {message}")]
    Timeout {
        /// What timed out.
        message: String,
    },
    /// The broker failed internally (gRPC `INTERNAL`): an I/O error or corrupt data.
    #[error("broker internal error: {message}")]
    Internal {
        /// The broker's message.
        message: String,
    },
    /// Data from the broker could not be decoded.
    #[error("the broker sent an invalid record batch: {0}")]
    InvalidBatch(#[from] strata_storage::InvalidBatch),
    /// The broker's answer lacks a field or holds a value this client does not know.
    #[error("unexpected answer from the broker: {message}")]
    Protocol {
        /// What was wrong.
        message: String,
    },
    /// The broker refused an idempotent producer's batch because its sequence number
    /// does not follow the partition's last one (gRPC `FAILED_PRECONDITION` on
    /// Produce): a batch before it failed, or the producer was fenced by a newer epoch.
    /// Nothing of the batch was written.
    #[error("batch refused by the producer sequence check: {message}")]
    SequenceRejected {
        /// The broker's (or the producer's) explanation.
        message: String,
    },
    /// The producer or consumer was shut down before the operation completed.
    #[error("the client was closed before the operation completed")]
    Closed,
    /// Any other gRPC status.
    #[error("gRPC status {code:?}: {message}")]
    Status {
        /// The status code.
        code: Code,
        /// Its message.
        message: String,
    },
}

impl Error {
    /// True for errors where the same request may succeed if sent again: the broker was
    /// unavailable or the request timed out.
    pub fn is_retriable(&self) -> bool {
        matches!(self, Error::Unavailable { .. } | Error::Timeout { .. })
    }

    /// Maps a gRPC status. `topic` and `read` (partition and offset of a read) give the
    /// call's context to the variants that name them.
    pub(crate) fn from_status(status: Status, topic: &str, read: Option<(u32, u64)>) -> Error {
        let message = status.message().to_string();
        // A status the transport made (not the broker) carries its cause as a source:
        // a refused or reset connection, an HTTP/2 error, a timeout.
        if std::error::Error::source(&status).is_some() && status.code() != Code::DeadlineExceeded {
            let message = if message.is_empty() {
                format!("{:?}", status.code())
            } else {
                message
            };
            return Error::Unavailable { message };
        }
        match status.code() {
            Code::NotFound => Error::TopicNotFound {
                topic: topic.to_string(),
                message,
            },
            Code::AlreadyExists => Error::TopicExists {
                topic: topic.to_string(),
            },
            Code::InvalidArgument => Error::InvalidArgument { message },
            Code::OutOfRange => match read {
                Some((partition, offset)) => Error::OffsetOutOfRange {
                    topic: topic.to_string(),
                    partition,
                    offset,
                    message,
                },
                None => Error::Status {
                    code: Code::OutOfRange,
                    message,
                },
            },
            Code::ResourceExhausted => Error::TooLarge { message },
            Code::Unavailable => Error::Unavailable { message },
            Code::DeadlineExceeded => Error::Timeout { message },
            Code::Internal => Error::Internal { message },
            code => Error::Status { code, message },
        }
    }

    /// Maps a gRPC status of a call a group member makes (heartbeat, commit, fenced
    /// fetch): `FAILED_PRECONDITION` means the member is unknown or fenced.
    pub(crate) fn from_member_status(
        status: Status,
        group: &str,
        topic: &str,
        read: Option<(u32, u64)>,
    ) -> Error {
        if status.code() == Code::FailedPrecondition && std::error::Error::source(&status).is_none()
        {
            return Error::Fenced {
                group: group.to_string(),
                message: status.message().to_string(),
            };
        }
        Error::from_status(status, topic, read)
    }

    /// Maps a gRPC status of a group administration call: `FAILED_PRECONDITION` is a
    /// group that still has members; `NOT_FOUND` an unknown `topic` when the call names
    /// one, an unknown group otherwise.
    pub(crate) fn from_group_admin_status(
        status: Status,
        group: &str,
        topic: Option<&str>,
    ) -> Error {
        let transport = std::error::Error::source(&status).is_some();
        match (status.code(), topic) {
            (Code::FailedPrecondition, _) if !transport => Error::GroupNotEmpty {
                group: group.to_string(),
                message: status.message().to_string(),
            },
            (Code::NotFound, None) if !transport => Error::GroupNotFound {
                group: group.to_string(),
                message: status.message().to_string(),
            },
            (_, topic) => Error::from_status(status, topic.unwrap_or_default(), None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(status: Status, read: Option<(u32, u64)>, expected: Error) {
        assert_eq!(Error::from_status(status, "t", read), expected);
    }

    #[test]
    fn statuses_map_to_variants() {
        let m = || "m".to_string();
        check(
            Status::not_found("m"),
            None,
            Error::TopicNotFound {
                topic: "t".into(),
                message: m(),
            },
        );
        check(
            Status::already_exists("m"),
            None,
            Error::TopicExists { topic: "t".into() },
        );
        check(
            Status::out_of_range("m"),
            Some((1, 9)),
            Error::OffsetOutOfRange {
                topic: "t".into(),
                partition: 1,
                offset: 9,
                message: m(),
            },
        );
        check(
            Status::out_of_range("m"),
            None,
            Error::Status {
                code: Code::OutOfRange,
                message: m(),
            },
        );
        check(
            Status::resource_exhausted("m"),
            None,
            Error::TooLarge { message: m() },
        );
        check(
            Status::unavailable("m"),
            None,
            Error::Unavailable { message: m() },
        );
        check(
            Status::internal("m"),
            None,
            Error::Internal { message: m() },
        );
        assert_eq!(
            Error::from_member_status(Status::failed_precondition("m"), "g", "t", None),
            Error::Fenced {
                group: "g".into(),
                message: m(),
            }
        );
        assert_eq!(
            Error::from_group_admin_status(Status::not_found("m"), "g", None),
            Error::GroupNotFound {
                group: "g".into(),
                message: m(),
            }
        );
        assert_eq!(
            Error::from_group_admin_status(Status::not_found("m"), "g", Some("t")),
            Error::TopicNotFound {
                topic: "t".into(),
                message: m(),
            }
        );
        assert_eq!(
            Error::from_group_admin_status(Status::failed_precondition("m"), "g", Some("t")),
            Error::GroupNotEmpty {
                group: "g".into(),
                message: m(),
            }
        );
        assert!(Error::Unavailable { message: m() }.is_retriable());
        assert!(!Error::Internal { message: m() }.is_retriable());
    }
}
