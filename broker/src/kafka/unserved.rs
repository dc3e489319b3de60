//! Answers for APIs the codec knows but the listener does not serve: rather than
//! dropping the connection, the client gets a response it can parse, carrying
//! `UNSUPPORTED_VERSION` (or, for SASL, `UNSUPPORTED_SASL_MECHANISM`), so it reports
//! "not supported" instead of retrying a dead connection. Clients only send what
//! ApiVersions lists, so this serves clients that assume an API exists (SASL clients
//! start with SaslHandshake; KIP-848 consumers with ConsumerGroupHeartbeat).

use bytes::BytesMut;
use kafka_protocol::messages::{
    AddOffsetsToTxnResponse, AddPartitionsToTxnResponse, ApiKey, ConsumerGroupHeartbeatResponse,
    DescribeAclsResponse, DescribeClientQuotasResponse, DescribeClusterResponse, EndTxnResponse,
    GetTelemetrySubscriptionsResponse, ListTransactionsResponse, OffsetDeleteResponse,
    PushTelemetryResponse, SaslAuthenticateResponse, SaslHandshakeResponse,
};
use kafka_protocol::ResponseError as K;

use super::encode;

/// Encodes the "not supported" answer to `api` at `version` into `out` (after its
/// length prefix); false when there is none to give (an API outside this list, or a
/// version the codec does not know).
pub(super) fn answer(
    api: ApiKey,
    version: i16,
    correlation_id: i32,
    out: &mut BytesMut,
) -> Result<bool, String> {
    let range = api.valid_versions();
    if !(range.min..=range.max).contains(&version) {
        return Ok(false);
    }
    let unsupported = K::UnsupportedVersion.code();
    macro_rules! answer {
        ($response:ty, $code:expr) => {
            encode(
                out,
                correlation_id,
                api,
                version,
                &<$response>::default().with_error_code($code),
            )?
        };
    }
    match api {
        ApiKey::ConsumerGroupHeartbeat => answer!(ConsumerGroupHeartbeatResponse, unsupported),
        ApiKey::OffsetDelete => answer!(OffsetDeleteResponse, unsupported),
        ApiKey::SaslHandshake => {
            answer!(SaslHandshakeResponse, K::UnsupportedSaslMechanism.code())
        }
        ApiKey::SaslAuthenticate => answer!(SaslAuthenticateResponse, unsupported),
        ApiKey::AddPartitionsToTxn => answer!(AddPartitionsToTxnResponse, unsupported),
        ApiKey::AddOffsetsToTxn => answer!(AddOffsetsToTxnResponse, unsupported),
        ApiKey::EndTxn => answer!(EndTxnResponse, unsupported),
        ApiKey::ListTransactions => answer!(ListTransactionsResponse, unsupported),
        ApiKey::DescribeAcls => answer!(DescribeAclsResponse, unsupported),
        ApiKey::DescribeClientQuotas => answer!(DescribeClientQuotasResponse, unsupported),
        ApiKey::DescribeCluster => answer!(DescribeClusterResponse, unsupported),
        ApiKey::GetTelemetrySubscriptions => {
            answer!(GetTelemetrySubscriptionsResponse, unsupported)
        }
        ApiKey::PushTelemetry => answer!(PushTelemetryResponse, unsupported),
        _ => return Ok(false),
    }
    Ok(true)
}
