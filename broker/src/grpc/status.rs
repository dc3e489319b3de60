//! The one conversion from the broker's [`Error`] to a gRPC [`Status`].

use tonic::{Code, Status};

use crate::error::{is_disk_full, Error, ENOSPC};

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        use strata_storage::Error as S;
        let code = match &e {
            Error::TopicNotFound(_) | Error::PartitionNotFound { .. } | Error::GroupNotFound(_) => {
                Code::NotFound
            }
            Error::Fenced(_) => Code::FailedPrecondition,
            Error::OutOfRange(_) => Code::OutOfRange,
            Error::TopicExists(_) => Code::AlreadyExists,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::Sequence(_, strata_storage::SequenceError::InvalidFields { .. }) => {
                Code::InvalidArgument
            }
            Error::Sequence(..) => Code::FailedPrecondition,
            Error::Unavailable(..) | Error::ShuttingDown | Error::GroupBusy(_) => Code::Unavailable,
            Error::Storage(S::InvalidBatch(_)) => Code::InvalidArgument,
            Error::Storage(S::BatchTooLarge { .. }) => Code::ResourceExhausted,
            Error::Storage(S::OffsetOutOfRange { .. }) => Code::OutOfRange,
            Error::DiskFull(..) => Code::ResourceExhausted,
            Error::Storage(e) if is_disk_full(e) => Code::ResourceExhausted,
            Error::Io { source, .. } if source.raw_os_error() == Some(ENOSPC) => {
                Code::ResourceExhausted
            }
            Error::Storage(S::InvalidConfig(_)) => Code::InvalidArgument,
            Error::Storage(S::Poisoned { .. }) => Code::Unavailable,
            _ => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}
