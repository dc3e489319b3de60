//! Broker errors as Kafka error codes: the one place the Kafka listener converts them,
//! as [`crate::grpc::status`] does for gRPC.

use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError as K;
use strata_storage::{Error as S, InvalidBatch, SequenceError};

use crate::error::Error;
use crate::metrics::{Metrics, RejectedLabels};

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
        Error::Storage(S::InvalidBatch(InvalidBatch::UnknownCompression(_))) => {
            K::UnsupportedCompressionType.code()
        }
        // Bytes that do not check out (CRC, a compressed payload that does not decode)
        // are CORRUPT_MESSAGE, as Kafka answers; records that decode but break the
        // rules, a decompression bomb included, INVALID_RECORD below.
        Error::Storage(S::InvalidBatch(
            InvalidBatch::ChecksumMismatch { .. } | InvalidBatch::Decompression { .. },
        )) => K::CorruptMessage.code(),
        Error::Storage(S::InvalidBatch(_)) => K::InvalidRecord.code(),
        Error::Storage(S::InvalidConfig(_)) => K::InvalidConfig.code(),
        Error::DiskFull(..) | Error::Unavailable(..) | Error::Storage(_) | Error::Io { .. } => {
            K::KafkaStorageError.code()
        }
        Error::ShuttingDown => K::NotLeaderOrFollower.code(),
        // A topic past `max_partitions`: Kafka's answer to a create its policy refuses.
        Error::LimitExceeded { .. } => K::PolicyViolation.code(),
        _ => K::UnknownServerError.code(),
    }
}

/// The name of a code [`code`] returns, as Kafka spells it.
fn name(code: i16) -> &'static str {
    match code {
        1 => "OFFSET_OUT_OF_RANGE",
        2 => "CORRUPT_MESSAGE",
        3 => "UNKNOWN_TOPIC_OR_PARTITION",
        6 => "NOT_LEADER_OR_FOLLOWER",
        10 => "MESSAGE_TOO_LARGE",
        36 => "TOPIC_ALREADY_EXISTS",
        40 => "INVALID_CONFIG",
        42 => "INVALID_REQUEST",
        44 => "POLICY_VIOLATION",
        45 => "OUT_OF_ORDER_SEQUENCE_NUMBER",
        47 => "INVALID_PRODUCER_EPOCH",
        56 => "KAFKA_STORAGE_ERROR",
        76 => "UNSUPPORTED_COMPRESSION_TYPE",
        87 => "INVALID_RECORD",
        _ => "UNKNOWN_SERVER_ERROR",
    }
}

/// Counts an answer carrying `e` for `rpc` in `strata_rejected_requests_total`
/// (`listener="kafka"`, the Kafka error name, the broker's reason).
pub fn count(metrics: &Metrics, rpc: &'static str, e: &Error) {
    metrics
        .rejected
        .get_or_create(&RejectedLabels {
            listener: "kafka",
            rpc,
            code: name(code(e)),
            reason: e.reason(),
        })
        .inc();
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
                InvalidBatch::UnknownCompression(5)
            ))),
            76
        );
        assert_eq!(
            code(&Error::Storage(S::InvalidBatch(
                InvalidBatch::Decompression {
                    codec: "zstd",
                    reason: "truncated".into()
                }
            ))),
            2
        );
        assert_eq!(
            code(&Error::Storage(S::InvalidBatch(
                InvalidBatch::DecompressedTooLarge {
                    codec: "gzip",
                    limit: 1
                }
            ))),
            87
        );
        assert_eq!(code(&Error::TopicExists("t".into())), 36);
        assert_eq!(code(&Error::ShuttingDown), 6);
        let metrics = Metrics::new(true);
        count(&metrics, "Produce", &Error::TopicNotFound("t".into()));
        let labels = RejectedLabels {
            listener: "kafka",
            rpc: "Produce",
            code: "UNKNOWN_TOPIC_OR_PARTITION",
            reason: "topic_not_found",
        };
        assert_eq!(metrics.rejected.get_or_create(&labels).get(), 1);
    }
}
