//! Broker errors as Kafka error codes: the one place the Kafka listener converts them,
//! as [`crate::grpc::status`] does for gRPC.

use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError as K;
use strata_storage::{Error as S, InvalidBatch, SequenceError};

use crate::error::Error;

/// The Kafka error code for `e`.
pub fn code(e: &Error) -> i16 {
    match e {
        Error::TopicNotFound(_) | Error::PartitionNotFound { .. } => {
            K::UnknownTopicOrPartition.code()
        }
        Error::TopicExists(_) => K::TopicAlreadyExists.code(),
        Error::InvalidArgument(_) => K::InvalidRequest.code(),
        Error::OutOfRange(_) | Error::Storage(S::OffsetOutOfRange { .. }) => {
            K::OffsetOutOfRange.code()
        }
        Error::Sequence(_, SequenceError::Fenced { .. }) => K::InvalidProducerEpoch.code(),
        Error::Sequence(_, SequenceError::OutOfOrder { .. }) => K::OutOfOrderSequenceNumber.code(),
        Error::Sequence(..) => K::InvalidRecord.code(),
        Error::Storage(S::BatchTooLarge { .. }) => K::MessageTooLarge.code(),
        Error::Storage(S::InvalidBatch(
            InvalidBatch::UnsupportedCompression(_) | InvalidBatch::UnknownCompression(_),
        )) => K::UnsupportedCompressionType.code(),
        Error::Storage(S::InvalidBatch(InvalidBatch::ChecksumMismatch { .. })) => {
            K::CorruptMessage.code()
        }
        Error::Storage(S::InvalidBatch(_)) => K::InvalidRecord.code(),
        Error::Storage(S::InvalidConfig(_)) => K::InvalidConfig.code(),
        Error::DiskFull(..) | Error::Unavailable(..) | Error::Storage(_) | Error::Io { .. } => {
            K::KafkaStorageError.code()
        }
        Error::ShuttingDown => K::NotLeaderOrFollower.code(),
        _ => K::UnknownServerError.code(),
    }
}

/// The error's message, for the response fields that carry one.
pub fn message(e: &Error) -> Option<StrBytes> {
    Some(StrBytes::from_string(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_codes_clients_act_on() {
        assert_eq!(code(&Error::TopicNotFound("t".into())), 3);
        assert_eq!(
            code(&Error::Storage(S::BatchTooLarge { size: 2, max: 1 })),
            10
        );
        assert_eq!(
            code(&Error::Storage(S::InvalidBatch(
                InvalidBatch::ChecksumMismatch {
                    stored: 1,
                    computed: 2
                }
            ))),
            2
        );
        assert_eq!(
            code(&Error::Storage(S::InvalidBatch(
                InvalidBatch::UnsupportedCompression("gzip")
            ))),
            76
        );
        assert_eq!(code(&Error::TopicExists("t".into())), 36);
        assert_eq!(code(&Error::ShuttingDown), 6);
    }
}
