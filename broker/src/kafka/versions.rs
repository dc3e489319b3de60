//! The one table of Kafka APIs and versions this listener implements. It drives both
//! the ApiVersions answer and the dispatcher, so the broker never advertises an API or a
//! version it cannot serve (but for the one low Produce floor below): clients pick the
//! highest common version and turn features on from the keys they see.

use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::{ApiKey, ApiVersionsResponse};

/// Every implemented API with its version range. Produce starts at v3 and Fetch at v4
/// (record batch v2, the stored format); Produce v10+, Fetch v13+ and ListOffsets v7+
/// need topic ids, tiered-storage or max-timestamp lookups Strata does not have yet.
pub const SUPPORTED: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 9),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 6),
    (ApiKey::Metadata, 0, 12),
    (ApiKey::ApiVersions, 0, 4),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 6),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::FindCoordinator, 0, 4),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 7),
    (ApiKey::ListGroups, 0, 4),
    (ApiKey::JoinGroup, 0, 7),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::DescribeConfigs, 1, 4),
];

/// The names of the served APIs, as the request metrics label them (same order as
/// [`SUPPORTED`]).
pub const RPCS: &[&str] = &[
    "Produce",
    "Fetch",
    "ListOffsets",
    "Metadata",
    "ApiVersions",
    "CreateTopics",
    "DeleteTopics",
    "InitProducerId",
    "FindCoordinator",
    "OffsetCommit",
    "OffsetFetch",
    "ListGroups",
    "JoinGroup",
    "SyncGroup",
    "Heartbeat",
    "LeaveGroup",
    "DescribeGroups",
    "DescribeConfigs",
];

/// The metrics name of a served API.
pub fn rpc(key: ApiKey) -> &'static str {
    SUPPORTED
        .iter()
        .position(|(k, ..)| *k == key)
        .map_or("unknown", |i| RPCS[i])
}

/// The version range of `key`, `None` when the listener does not implement it.
pub fn range(key: ApiKey) -> Option<(i16, i16)> {
    SUPPORTED
        .iter()
        .find(|(k, ..)| *k == key)
        .map(|&(_, min, max)| (min, max))
}

/// The least Produce version ApiVersions lists, below the least served (v3, the first
/// with record batch v2): librdkafka before 2.11.1 compresses with gzip, snappy or lz4
/// only for a broker whose listed Produce range includes v0 (it asks whether Produce
/// `[0, 0]` is supported) and otherwise sends every batch uncompressed. No client
/// sends v0-v2 to a broker that lists v3+, and one that did would be told the served
/// range like any request outside it.
const PRODUCE_LISTED_MIN: i16 = 0;

/// The ApiVersions answer: every implemented API, with `error_code`.
pub fn api_versions(error_code: i16) -> ApiVersionsResponse {
    ApiVersionsResponse::default()
        .with_error_code(error_code)
        .with_api_keys(
            SUPPORTED
                .iter()
                .map(|&(key, min, max)| {
                    let min = match key {
                        ApiKey::Produce => PRODUCE_LISTED_MIN,
                        _ => min,
                    };
                    ApiVersion::default()
                        .with_api_key(key as i16)
                        .with_min_version(min)
                        .with_max_version(max)
                })
                .collect(),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The crate can decode every request and encode every response version advertised.
    #[test]
    fn every_advertised_version_is_within_the_codec_range() {
        for &(key, min, max) in SUPPORTED {
            let codec = key.valid_versions();
            assert!(min <= max, "{key:?}");
            assert!(
                codec.min <= min && max <= codec.max,
                "{key:?} {min}-{max} outside the codec's {codec}"
            );
        }
        assert_eq!(range(ApiKey::Fetch), Some((4, 12)));
        assert_eq!(SUPPORTED.len(), RPCS.len());
        for (&(key, ..), name) in SUPPORTED.iter().zip(RPCS) {
            assert_eq!(format!("{key:?}"), *name);
        }
        assert_eq!(range(ApiKey::EndTxn), None);
    }
}
