//! Topic administration and offset lookups: typed wrappers over the `Admin` service.

use strata_proto::v1::{self, admin_client::AdminClient};
use tonic::transport::Channel;

use crate::error::{Error, Result};

/// Topic administration. Cheap to clone.
///
/// ```no_run
/// use strata_client::{Client, Durability, OffsetSpec, TopicConfig};
///
/// # async fn run() -> strata_client::Result<()> {
/// let admin = Client::connect("127.0.0.1:7717").await?.admin();
/// let config = TopicConfig {
///     durability: Some(Durability::IntervalMs(100)),
///     retention_ms: Some(86_400_000),
///     ..TopicConfig::default()
/// };
/// let topic = admin.create_topic("payments", 6, config).await?;
/// assert_eq!(topic.partitions, 6);
/// let described = admin.describe_topic("payments").await?;
/// let latest = admin.list_offsets("payments", 0, OffsetSpec::Latest).await?;
/// assert_eq!(latest, described.partitions[0].latest_offset);
/// admin.delete_topic("payments").await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Admin {
    client: AdminClient<Channel>,
}

/// When an acknowledged write is on disk; see the protocol's "What an acknowledgement
/// means".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Durability {
    /// An acknowledgement means the batch is fsynced.
    Fsync,
    /// An fsync follows within about this many milliseconds.
    IntervalMs(u64),
    /// No fsync on commit; the OS writes back when it likes.
    None,
}

impl Durability {
    fn parse(s: &str) -> Result<Durability> {
        match s {
            "fsync" => Ok(Durability::Fsync),
            "none" => Ok(Durability::None),
            _ => s
                .strip_prefix("interval:")
                .and_then(|ms| ms.parse().ok())
                .map(Durability::IntervalMs)
                .ok_or_else(|| Error::Protocol {
                    message: format!("unknown durability {s:?}"),
                }),
        }
    }
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Durability::Fsync => f.write_str("fsync"),
            Durability::IntervalMs(ms) => write!(f, "interval:{ms}"),
            Durability::None => f.write_str("none"),
        }
    }
}

/// Per-topic settings. On creation, `None` takes the broker's default; in answers every
/// field is set. `-1` means "no limit" / "forever" / "never" where the protocol allows it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicConfig {
    /// Delete sealed segments whose newest record is older than this.
    pub retention_ms: Option<i64>,
    /// Delete the oldest sealed segments while the partition is larger than this.
    pub retention_bytes: Option<i64>,
    /// Roll the active segment at this size.
    pub segment_bytes: Option<u64>,
    /// Roll the active segment at this age.
    pub segment_ms: Option<i64>,
    /// Largest encoded record batch a produce request may carry.
    pub max_message_bytes: Option<u32>,
    /// When an acknowledged write is durable.
    pub durability: Option<Durability>,
}

impl TopicConfig {
    fn to_proto(&self) -> v1::TopicConfig {
        v1::TopicConfig {
            retention_ms: self.retention_ms,
            retention_bytes: self.retention_bytes,
            segment_bytes: self.segment_bytes,
            segment_ms: self.segment_ms,
            max_message_bytes: self.max_message_bytes,
            durability: self.durability.map(|d| d.to_string()),
        }
    }

    fn from_proto(c: v1::TopicConfig) -> Result<TopicConfig> {
        Ok(TopicConfig {
            retention_ms: c.retention_ms,
            retention_bytes: c.retention_bytes,
            segment_bytes: c.segment_bytes,
            segment_ms: c.segment_ms,
            max_message_bytes: c.max_message_bytes,
            durability: c.durability.as_deref().map(Durability::parse).transpose()?,
        })
    }
}

/// A topic: its name, partition count and config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicInfo {
    /// The name.
    pub name: String,
    /// Number of partitions, numbered from 0.
    pub partitions: u32,
    /// The config in force.
    pub config: TopicConfig,
}

impl TopicInfo {
    fn from_proto(t: Option<v1::TopicInfo>) -> Result<TopicInfo> {
        let t = t.ok_or_else(|| Error::Protocol {
            message: "the answer holds no topic".into(),
        })?;
        Ok(TopicInfo {
            name: t.name,
            partitions: t.partitions,
            config: TopicConfig::from_proto(t.config.unwrap_or_default())?,
        })
    }
}

/// One partition's offsets and size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionInfo {
    /// The partition number.
    pub partition: u32,
    /// First offset still stored.
    pub earliest_offset: u64,
    /// The offset the next record gets (the high watermark).
    pub latest_offset: u64,
    /// Bytes of visible data.
    pub size_bytes: u64,
    /// Number of segments, the active one included.
    pub segments: u32,
}

/// A topic with its partitions' offsets and sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicDescription {
    /// The topic.
    pub topic: TopicInfo,
    /// Each partition, in order.
    pub partitions: Vec<PartitionInfo>,
}

/// Which offset [`Admin::list_offsets`] looks up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    /// The first offset still stored.
    Earliest,
    /// The high watermark: the offset the next record gets.
    Latest,
    /// The first offset, in log order, whose timestamp is at or after this time (ms since
    /// the Unix epoch); the latest offset if no record is that new.
    Timestamp(i64),
}

impl Admin {
    pub(crate) fn new(client: AdminClient<Channel>) -> Admin {
        Admin { client }
    }

    /// Creates a topic with `partitions` partitions (1 to 1024); fields of `config` left
    /// `None` take the broker's defaults. Returns the topic with its config in force.
    pub async fn create_topic(
        &self,
        name: &str,
        partitions: u32,
        config: TopicConfig,
    ) -> Result<TopicInfo> {
        let answer = self
            .client
            .clone()
            .create_topic(v1::CreateTopicRequest {
                name: name.to_string(),
                partitions,
                config: Some(config.to_proto()),
            })
            .await
            .map_err(|s| Error::from_status(s, name, None))?;
        TopicInfo::from_proto(answer.into_inner().topic)
    }

    /// Deletes a topic and all its records.
    pub async fn delete_topic(&self, name: &str) -> Result<()> {
        self.client
            .clone()
            .delete_topic(v1::DeleteTopicRequest {
                name: name.to_string(),
            })
            .await
            .map_err(|s| Error::from_status(s, name, None))?;
        Ok(())
    }

    /// Every topic, sorted by name.
    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>> {
        let answer = self
            .client
            .clone()
            .list_topics(v1::ListTopicsRequest {})
            .await
            .map_err(|s| Error::from_status(s, "", None))?;
        answer
            .into_inner()
            .topics
            .into_iter()
            .map(|t| TopicInfo::from_proto(Some(t)))
            .collect()
    }

    /// A topic with each partition's offsets and size.
    pub async fn describe_topic(&self, name: &str) -> Result<TopicDescription> {
        let answer = self
            .client
            .clone()
            .describe_topic(v1::DescribeTopicRequest {
                name: name.to_string(),
            })
            .await
            .map_err(|s| Error::from_status(s, name, None))?
            .into_inner();
        Ok(TopicDescription {
            topic: TopicInfo::from_proto(answer.topic)?,
            partitions: answer
                .partitions
                .into_iter()
                .map(|p| PartitionInfo {
                    partition: p.partition,
                    earliest_offset: p.earliest_offset,
                    latest_offset: p.latest_offset,
                    size_bytes: p.size_bytes,
                    segments: p.segments,
                })
                .collect(),
        })
    }

    /// One offset of one partition: the earliest, the latest, or the first at or after a
    /// time.
    pub async fn list_offsets(&self, topic: &str, partition: u32, spec: OffsetSpec) -> Result<u64> {
        let (spec, timestamp_ms) = match spec {
            OffsetSpec::Earliest => (v1::OffsetSpec::Earliest, 0),
            OffsetSpec::Latest => (v1::OffsetSpec::Latest, 0),
            OffsetSpec::Timestamp(t) => (v1::OffsetSpec::Timestamp, t),
        };
        let answer = self
            .client
            .clone()
            .list_offsets(v1::ListOffsetsRequest {
                topic: topic.to_string(),
                partition,
                spec: spec.into(),
                timestamp_ms,
            })
            .await
            .map_err(|s| Error::from_status(s, topic, None))?;
        Ok(answer.into_inner().offset)
    }
}
