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
            Error::DiskFull(..) | Error::LimitExceeded { .. } => Code::ResourceExhausted,
            Error::Storage(e) if is_disk_full(e) => Code::ResourceExhausted,
            Error::Io { source, .. } if source.raw_os_error() == Some(ENOSPC) => {
                Code::ResourceExhausted
            }
            Error::Storage(S::InvalidConfig(_)) => Code::InvalidArgument,
            Error::Storage(S::Poisoned { .. }) => Code::Unavailable,
            _ => Code::Internal,
        };
        Status::new(code, bounded(e.to_string()))
    }
}

/// Longest status message: messages quote what the client sent (a name, an id), and a
/// client that sent megabytes must not get them back in a header its HTTP/2 stack refuses.
const MESSAGE_BYTES_MAX: usize = 1024;

/// `message`, cut to [`MESSAGE_BYTES_MAX`] bytes on a character boundary, saying so.
fn bounded(mut message: String) -> String {
    if message.len() > MESSAGE_BYTES_MAX {
        let total = message.len();
        let mut end = MESSAGE_BYTES_MAX;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push_str(&format!("… ({total} bytes in all)"));
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_cut() {
        let status = Status::from(Error::TopicNotFound("é".repeat(1 << 20)));
        assert!(status.message().len() < MESSAGE_BYTES_MAX + 64);
        assert!(
            status.message().ends_with("bytes in all)"),
            "{}",
            status.message()
        );
        let short = Status::from(Error::TopicNotFound("t".into()));
        assert_eq!(short.message(), "topic \"t\" does not exist");
    }
}
