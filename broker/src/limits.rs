//! The broker's resource limits: what one client may make the broker hold (request
//! sizes, connections, streams, response memory, groups), so a hostile or broken client
//! is answered with an error instead of taking the broker down. Each is a setting of
//! `strata serve` ([`crate::config`]) listed in docs/operations.md; a client that hits
//! one gets RESOURCE_EXHAUSTED (or INVALID_ARGUMENT for a malformed request) naming it.

use std::time::Duration;

/// Largest request of the `Admin` service when `--max-admin-request-bytes` is not given:
/// its requests name a topic or a group and at most a partition list, a few KiB.
pub const ADMIN_REQUEST_BYTES_DEFAULT: usize = 4 << 20;
/// Largest request of the `Groups` service when `--max-groups-request-bytes` is not
/// given: a heartbeat or a commit of a member owning thousands of partitions fits.
pub const GROUPS_REQUEST_BYTES_DEFAULT: usize = 4 << 20;
/// Open client connections when `--max-connections` is not given.
pub const CONNECTIONS_DEFAULT: usize = 1024;
/// Open connections of the HTTP listener (metrics, health) when
/// `--max-http-connections` is not given: scrapers and probes need a few.
pub const HTTP_CONNECTIONS_DEFAULT: usize = 256;
/// Concurrent requests (HTTP/2 streams) per connection when
/// `--max-streams-per-connection` is not given: hyper's own default, which tonic
/// otherwise removes.
pub const STREAMS_PER_CONNECTION_DEFAULT: u32 = 200;
/// How often an idle connection is probed (HTTP/2 PING and TCP keepalive) when
/// `--keepalive-interval-ms` is not given.
pub const KEEPALIVE_INTERVAL_DEFAULT: Duration = Duration::from_secs(30);
/// How long a PING may go unanswered before the connection is dropped, when
/// `--keepalive-timeout-ms` is not given.
pub const KEEPALIVE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(20);
/// How long a shutdown waits for requests in progress before it cuts the remaining
/// connections, when `--shutdown-timeout-ms` is not given.
pub const SHUTDOWN_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Bytes of Fetch and Subscribe responses in flight, broker-wide, when
/// `--fetch-memory-bytes` is not given.
pub const FETCH_MEMORY_BYTES_DEFAULT: usize = 256 << 20;
/// The least `--fetch-memory-bytes` may be: two of the largest fetches.
pub const FETCH_MEMORY_BYTES_MIN: usize = 16 << 20;
/// Bytes one Subscribe stream may hold queued for its client (a response larger than
/// this still goes, alone) when `--subscribe-queue-bytes` is not given.
pub const SUBSCRIBE_QUEUE_BYTES_DEFAULT: usize = 16 << 20;
/// Longest id a client may give (member id, client id).
pub const ID_BYTES_MAX: usize = 255;
/// Longest client id a member may give when `--max-client-id-bytes` is not given.
pub const CLIENT_ID_BYTES_DEFAULT: usize = 255;
/// Longest metadata of a committed offset when `--max-commit-metadata-bytes` is not
/// given (Kafka's `offset.metadata.max.bytes`).
pub const COMMIT_METADATA_BYTES_DEFAULT: usize = 4096;
/// How long the committed offsets of a group without members are kept after its last
/// member left or its last commit, when `--offsets-retention-ms` is not given (Kafka's
/// `offsets.retention.minutes`).
pub const OFFSETS_RETENTION_DEFAULT: Duration = Duration::from_secs(7 * 86_400);
/// Members of one group when `--max-group-members` is not given.
pub const GROUP_MEMBERS_DEFAULT: usize = 1000;
/// Groups with members, broker-wide, when `--max-groups` is not given.
pub const GROUPS_DEFAULT: usize = 10_000;
/// Partitions of all topics, broker-wide, when `--max-partitions` is not given. Each
/// takes a file descriptor and two memory mappings (see the open-file check at start),
/// so a client creating topics (a Kafka client with auto-creation on, say) must
/// not grow them without end.
pub const PARTITIONS_DEFAULT: usize = 10_000;

/// The limits in force; [`Limits::default`] gives the defaults above.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest encoded request of the `Admin` service.
    pub admin_request_bytes: usize,
    /// Largest encoded request of the `Groups` service.
    pub groups_request_bytes: usize,
    /// Open client connections; more are closed as soon as they are accepted.
    pub connections: usize,
    /// Open connections of the HTTP listener; more are closed as soon as accepted.
    pub http_connections: usize,
    /// Concurrent HTTP/2 streams per connection.
    pub streams_per_connection: u32,
    /// Interval of HTTP/2 PINGs and TCP keepalive probes on idle connections.
    pub keepalive_interval: Duration,
    /// How long a PING may go unanswered.
    pub keepalive_timeout: Duration,
    /// How long a shutdown drains before it cuts connections.
    pub shutdown_timeout: Duration,
    /// Bytes of Fetch and Subscribe responses in flight, broker-wide.
    pub fetch_memory_bytes: usize,
    /// Bytes one Subscribe stream may hold queued.
    pub subscribe_queue_bytes: usize,
    /// Longest client id of a group member.
    pub client_id_bytes: usize,
    /// Longest metadata of a committed offset.
    pub commit_metadata_bytes: usize,
    /// Members of one group.
    pub group_members: usize,
    /// Groups with members, broker-wide.
    pub groups: usize,
    /// Partitions of all topics, broker-wide.
    pub partitions: usize,
    /// How long an empty group's committed offsets are kept.
    pub offsets_retention: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            admin_request_bytes: ADMIN_REQUEST_BYTES_DEFAULT,
            groups_request_bytes: GROUPS_REQUEST_BYTES_DEFAULT,
            connections: CONNECTIONS_DEFAULT,
            http_connections: HTTP_CONNECTIONS_DEFAULT,
            streams_per_connection: STREAMS_PER_CONNECTION_DEFAULT,
            keepalive_interval: KEEPALIVE_INTERVAL_DEFAULT,
            keepalive_timeout: KEEPALIVE_TIMEOUT_DEFAULT,
            shutdown_timeout: SHUTDOWN_TIMEOUT_DEFAULT,
            fetch_memory_bytes: FETCH_MEMORY_BYTES_DEFAULT,
            subscribe_queue_bytes: SUBSCRIBE_QUEUE_BYTES_DEFAULT,
            client_id_bytes: CLIENT_ID_BYTES_DEFAULT,
            commit_metadata_bytes: COMMIT_METADATA_BYTES_DEFAULT,
            group_members: GROUP_MEMBERS_DEFAULT,
            groups: GROUPS_DEFAULT,
            partitions: PARTITIONS_DEFAULT,
            offsets_retention: OFFSETS_RETENTION_DEFAULT,
        }
    }
}
