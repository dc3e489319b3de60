//! `strata-client`: the Rust client of the Strata broker.
//!
//! - [`Client`]: one HTTP/2 connection to a broker, shared by everything built from it.
//! - [`Producer`]: batches records per partition (linger, size limit), encodes them with
//!   the shared batch codec, keeps a bounded number of requests in flight, retries with
//!   backoff, and resolves each [`send`](Producer::send) to its partition and offset.
//! - [`Consumer`]: a member of a consumer group. It follows the partitions the broker
//!   assigns it, streams them with prefetch, yields their records as an async
//!   [`Stream`](tokio_stream::Stream), and commits what the application has received
//!   (at an interval, on revoke and on close) or what it commits explicitly: at least
//!   once.
//! - [`DeadLetters`]: retries a handler with backoff, then moves a record that keeps
//!   failing to a dead-letter topic (`<topic>.dlq`) with headers that say why.
//! - [`PartitionConsumer`]: reads one partition without a group, from an offset, the
//!   earliest or latest offset, or a time.
//! - [`Admin`]: create, list, describe and delete topics; look up offsets; list,
//!   describe (with lag), reset and delete consumer groups.
//! - [`Error`]: one typed error for every call.
//!
//! Event metadata travels in record headers; [`headers`] names the usual ones (event id,
//! type, schema version, trace context). [`trace`] carries W3C trace context from
//! producers to consumers in those headers, so one trace crosses the broker.
//!
//! Producers are idempotent by default: a produce request that fails ambiguously (a
//! dropped connection, a timeout) is retried, and the broker stores its batch once (see
//! [`ProducerConfig::idempotent`]). Consumers deliver at least once: a consumer that
//! crashes gets its uncommitted records delivered again (to whichever member owns the
//! partition next).
//!
//! ```no_run
//! use strata_client::{headers, Client, Record, TopicConfig};
//! use tokio_stream::StreamExt;
//!
//! # async fn run() -> strata_client::Result<()> {
//! let client = Client::connect("127.0.0.1:7717").await?;
//! client.admin().create_topic("orders", 3, TopicConfig::default()).await?;
//!
//! let producer = client.producer("orders").await?;
//! let event = Record::new("created")
//!     .key("order-42")
//!     .header(headers::EVENT_TYPE, "order.created");
//! let delivery = producer.send(event).await?;
//! println!("stored at {}/{}", delivery.partition, delivery.offset);
//!
//! let mut consumer = client.consumer("billing", &["orders"]).await?;
//! let record = consumer.next().await.expect("the stream is endless")?;
//! assert_eq!(record.header_str(headers::EVENT_TYPE), Some("order.created"));
//! consumer.close().await?;
//! # Ok(())
//! # }
//! ```

mod admin;
mod consumer;
mod dead_letter;
mod error;
mod follow;
mod group;
mod producer;
mod record;
pub mod trace;

use std::time::Duration;

use strata_proto::v1::{
    admin_client::AdminClient, broker_client::BrokerClient, groups_client::GroupsClient,
};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

pub use admin::{
    Admin, CommittedOffset, Durability, GroupDescription, GroupMemberInfo, GroupPartitionLag,
    GroupState, GroupSummary, OffsetSpec, PartitionInfo, ResetTo, TopicConfig, TopicDescription,
    TopicInfo, TopicPartition,
};
pub use consumer::{ConsumerConfig, PartitionConsumer, StartAt};
pub use dead_letter::{
    DeadLetterPolicy, DeadLetters, Outcome, DEAD_LETTER_SUFFIX, DLQ_ERROR_BYTES_MAX,
};
pub use error::{Error, Result};
pub use group::{Consumer, ConsumerGroupConfig, OffsetReset, OnRevoke, Revocation};
pub use producer::{Acks, Delivery, Producer, ProducerConfig};
pub use record::{headers, ConsumedRecord, Record};
/// The codecs a [`ProducerConfig`] can compress batches with.
pub use strata_storage::compression::Compression;

/// The README's examples, compiled as doc tests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

/// Largest gRPC message sent or accepted: the broker's own limit.
pub const MESSAGE_BYTES_MAX: usize = 64 << 20;
/// How often the connection is probed when idle (HTTP/2 PING and TCP keepalive), the
/// broker's default.
const KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
/// How long a PING may go unanswered before the connection is dropped.
const KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);
/// Initial HTTP/2 stream window, the broker's value: large fetches and bursts of produce
/// requests do not stall on window updates.
pub const STREAM_WINDOW_BYTES: u32 = 8 << 20;
/// Initial HTTP/2 connection window, the broker's value.
pub const CONNECTION_WINDOW_BYTES: u32 = 32 << 20;
/// Largest HTTP/2 frame, the broker's value.
pub const FRAME_BYTES_MAX: u32 = 1 << 20;
/// How long establishing a TCP connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection to one broker. Cheap to clone; clones share the connection, which
/// reconnects by itself (on the next call) after the broker restarts.
///
/// ```no_run
/// # async fn run() -> strata_client::Result<()> {
/// let client = strata_client::Client::connect("127.0.0.1:7717").await?;
/// for topic in client.admin().list_topics().await? {
///     println!("{} ({} partitions)", topic.name, topic.partitions);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Client {
    channel: Channel,
}

impl Client {
    /// Connects to a broker at `host:port` or `http://host:port`, failing with
    /// [`Error::Unavailable`] if it cannot be reached now.
    pub async fn connect(address: &str) -> Result<Client> {
        let endpoint = endpoint(address)?;
        let channel = endpoint.connect().await.map_err(|e| Error::Unavailable {
            message: format!("cannot connect to {address}: {}", error_chain(&e)),
        })?;
        Ok(Client { channel })
    }

    /// Like [`Client::connect`], but connects on the first call instead of now. Must be
    /// called within a tokio runtime.
    pub fn connect_lazy(address: &str) -> Result<Client> {
        Ok(Client {
            channel: endpoint(address)?.connect_lazy(),
        })
    }

    /// Topic and consumer-group administration over this connection.
    pub fn admin(&self) -> Admin {
        Admin::new(self.admin_client(), self.groups_client())
    }

    /// A producer to `topic` with the default [`ProducerConfig`]. Looks up the topic's
    /// partition count and batch limit once; fails if the topic does not exist.
    pub async fn producer(&self, topic: &str) -> Result<Producer> {
        self.producer_with(topic, ProducerConfig::default()).await
    }

    /// A producer to `topic` with the given settings.
    pub async fn producer_with(&self, topic: &str, config: ProducerConfig) -> Result<Producer> {
        Producer::new(self.broker_client(), self.admin(), topic, config).await
    }

    /// Joins consumer group `group` as a new member subscribed to `topics`, with the
    /// default [`ConsumerGroupConfig`] (auto-commit every 5 s, earliest offset without
    /// a committed one). Fails if a topic does not exist, or with
    /// [`Error::Unavailable`] if the broker stays unreachable through a few retries.
    pub async fn consumer(&self, group: &str, topics: &[&str]) -> Result<Consumer> {
        self.consumer_with(group, topics, ConsumerGroupConfig::default())
            .await
    }

    /// Joins consumer group `group` with the given settings.
    pub async fn consumer_with(
        &self,
        group: &str,
        topics: &[&str],
        config: ConsumerGroupConfig,
    ) -> Result<Consumer> {
        Consumer::start(self, group, topics, config).await
    }

    /// A consumer of one partition, starting at `start`, with the default
    /// [`ConsumerConfig`]. Fails if the topic or partition does not exist.
    pub async fn partition_consumer(
        &self,
        topic: &str,
        partition: u32,
        start: StartAt,
    ) -> Result<PartitionConsumer> {
        self.partition_consumer_with(topic, partition, start, ConsumerConfig::default())
            .await
    }

    /// A consumer of one partition with the given settings.
    pub async fn partition_consumer_with(
        &self,
        topic: &str,
        partition: u32,
        start: StartAt,
        config: ConsumerConfig,
    ) -> Result<PartitionConsumer> {
        PartitionConsumer::start(
            self.broker_client(),
            self.admin(),
            topic,
            partition,
            start,
            config,
        )
        .await
    }

    /// Whether the broker reports itself `SERVING` (the standard gRPC health check of the
    /// whole broker, service `""`): false while a partition is fail-stopped or the
    /// committed-offsets log has failed, or while it shuts down. Fails with
    /// [`Error::Unavailable`] if the broker cannot be reached.
    pub async fn is_serving(&self) -> Result<bool> {
        let answer = HealthClient::new(self.channel.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map_err(|status| Error::from_status(status, "", None))?;
        Ok(answer.into_inner().status() == ServingStatus::Serving)
    }

    /// The generated gRPC client of the `Broker` service on this connection, with the
    /// message size limits set, for calls this crate does not wrap.
    pub fn broker_client(&self) -> BrokerClient<Channel> {
        BrokerClient::new(self.channel.clone())
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX)
    }

    /// The generated gRPC client of the `Groups` service on this connection.
    pub fn groups_client(&self) -> GroupsClient<Channel> {
        GroupsClient::new(self.channel.clone())
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX)
    }

    /// The generated gRPC client of the `Admin` service on this connection.
    pub fn admin_client(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel.clone())
            .max_decoding_message_size(MESSAGE_BYTES_MAX)
            .max_encoding_message_size(MESSAGE_BYTES_MAX)
    }
}

fn endpoint(address: &str) -> Result<Endpoint> {
    let url = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    let endpoint = Endpoint::from_shared(url).map_err(|e| Error::InvalidAddress {
        address: address.to_string(),
        message: e.to_string(),
    })?;
    Ok(endpoint
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        // A broker that vanished without closing the connection (a crashed host, a
        // dropped NAT entry) is noticed within KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT,
        // so requests fail and reconnect instead of waiting forever.
        .tcp_keepalive(Some(KEEPALIVE_INTERVAL))
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        .max_frame_size(FRAME_BYTES_MAX))
}

/// An error with its causes, `: `-separated. A cause that reads exactly like the one
/// before it is left out: transport errors wrap an error in another that displays the
/// same text ("tcp connect error: tcp connect error: ...").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut last = e.to_string();
    let mut out = last.clone();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if text != last {
            out.push_str(": ");
            out.push_str(&text);
            last = text;
        }
        source = s.source();
    }
    out
}

/// Exponential backoff: `min` doubled per attempt, capped at `max`.
fn backoff(min: Duration, max: Duration, attempt: u32) -> Duration {
    min.saturating_mul(1u32 << attempt.min(16)).min(max)
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
