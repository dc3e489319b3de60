//! Topic and consumer-group administration and offset lookups: typed wrappers over the
//! `Admin` service (and `FetchOffsets` of the `Groups` service).

use strata_proto::v1::{self, admin_client::AdminClient, groups_client::GroupsClient};
use tonic::transport::Channel;

use crate::error::{Error, Result};

/// Topic and consumer-group administration. Cheap to clone.
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
///
/// Groups: see what a group owns and how far behind it is, and move its positions while
/// its consumers are stopped.
///
/// ```no_run
/// use strata_client::{Client, ResetTo};
///
/// # async fn run() -> strata_client::Result<()> {
/// let admin = Client::connect("127.0.0.1:7717").await?.admin();
/// for group in admin.list_groups().await? {
///     println!("{} {:?} with {} members", group.name, group.state, group.members);
/// }
/// let billing = admin.describe_group("billing").await?;
/// println!("billing is {} records behind", billing.total_lag);
/// for p in &billing.partitions {
///     println!("{}/{} committed {:?} lag {:?}", p.topic, p.partition, p.committed_offset, p.lag);
/// }
/// // With billing's consumers stopped: process the last hour again.
/// let hour_ago = std::time::SystemTime::now()
///     .duration_since(std::time::UNIX_EPOCH)
///     .expect("after 1970")
///     .as_millis() as i64
///     - 3_600_000;
/// admin.reset_offsets("billing", "orders", &[], ResetTo::Timestamp(hour_ago)).await?;
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Admin {
    client: AdminClient<Channel>,
    groups: GroupsClient<Channel>,
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

/// A partition of a topic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TopicPartition {
    /// The topic.
    pub topic: String,
    /// The partition number.
    pub partition: u32,
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// Flattens the protocol's per-topic partition lists.
pub(crate) fn flatten(lists: Vec<v1::TopicPartitions>) -> Vec<TopicPartition> {
    let mut out = Vec::new();
    for list in lists {
        for partition in list.partitions {
            out.push(TopicPartition {
                topic: list.topic.clone(),
                partition,
            });
        }
    }
    out
}

/// Where a consumer group stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GroupState {
    /// No members; committed offsets only.
    Empty,
    /// Every member owns exactly the partitions it should.
    Stable,
    /// Partitions are moving between members.
    Reconciling,
}

/// A consumer group as [`Admin::list_groups`] shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSummary {
    /// The group's name.
    pub name: String,
    /// Where it stands.
    pub state: GroupState,
    /// How many members it has.
    pub members: u32,
    /// Bumped on every change of membership, subscriptions or partition counts.
    pub epoch: u64,
}

impl GroupSummary {
    fn from_proto(g: Option<v1::GroupSummary>) -> Result<GroupSummary> {
        let g = g.ok_or_else(|| Error::Protocol {
            message: "the answer holds no group".into(),
        })?;
        let state = match v1::GroupState::try_from(g.state) {
            Ok(v1::GroupState::Empty) => GroupState::Empty,
            Ok(v1::GroupState::Stable) => GroupState::Stable,
            Ok(v1::GroupState::Reconciling) => GroupState::Reconciling,
            Err(_) => {
                return Err(Error::Protocol {
                    message: format!("unknown group state {}", g.state),
                })
            }
        };
        Ok(GroupSummary {
            name: g.group,
            state,
            members: g.members,
            epoch: g.epoch,
        })
    }
}

/// A member of a consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupMemberInfo {
    /// The id the broker gave it.
    pub member_id: String,
    /// The name it gave itself ([`ConsumerGroupConfig::client_id`](crate::ConsumerGroupConfig::client_id)).
    pub client_id: String,
    /// Its epoch, bumped whenever its assignment changes.
    pub member_epoch: u64,
    /// The topics it consumes.
    pub topics: Vec<String>,
    /// The partitions it owns.
    pub assignment: Vec<TopicPartition>,
    /// Partitions taken away from it that it has not released yet.
    pub revoking: Vec<TopicPartition>,
    /// Its session timeout.
    pub session_timeout_ms: u32,
}

/// A partition of a consumer group: its committed position and how far behind it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPartitionLag {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// The next offset the group will consume; `None` if it never committed one.
    pub committed_offset: Option<u64>,
    /// The metadata stored with the commit.
    pub metadata: String,
    /// The first offset still in the partition's log.
    pub log_start_offset: u64,
    /// The partition's high watermark.
    pub log_end_offset: u64,
    /// Records not yet consumed: `log_end_offset - committed_offset`, or
    /// `log_end_offset - log_start_offset` without a committed offset (where a new
    /// member starts). `None` once the topic is gone.
    pub lag: Option<u64>,
    /// The member that owns the partition, if one does.
    pub owner: Option<String>,
}

/// A consumer group in detail: members, assignment, positions and lag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupDescription {
    /// State, member count and epoch.
    pub group: GroupSummary,
    /// Every member.
    pub members: Vec<GroupMemberInfo>,
    /// Every partition of the subscribed topics, and every committed one, sorted.
    pub partitions: Vec<GroupPartitionLag>,
    /// The sum of the partitions' lags.
    pub total_lag: u64,
}

/// A committed position of a consumer group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommittedOffset {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
    /// The next offset to consume: one past the last record processed.
    pub offset: u64,
    /// The metadata stored with it.
    pub metadata: String,
    /// When it was committed, in milliseconds since the Unix epoch.
    pub commit_timestamp_ms: i64,
}

impl CommittedOffset {
    pub(crate) fn from_proto(o: v1::PartitionOffset) -> CommittedOffset {
        CommittedOffset {
            topic: o.topic,
            partition: o.partition,
            offset: o.offset,
            metadata: o.metadata,
            commit_timestamp_ms: o.commit_timestamp_ms,
        }
    }
}

/// Where [`Admin::reset_offsets`] moves a group's positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// To the first offset still stored: everything is consumed again.
    Earliest,
    /// To the high watermark: everything stored so far is skipped.
    Latest,
    /// To the first record at or after this time (ms since the Unix epoch), or the high
    /// watermark if none is that new.
    Timestamp(i64),
    /// To this offset, which must lie between the earliest and latest offsets.
    Offset(u64),
}

impl Admin {
    pub(crate) fn new(client: AdminClient<Channel>, groups: GroupsClient<Channel>) -> Admin {
        Admin { client, groups }
    }

    /// Creates a topic with `partitions` partitions (1 to 16,384); fields of `config` left
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

    /// Every consumer group the broker knows (with members or committed offsets), sorted
    /// by name.
    pub async fn list_groups(&self) -> Result<Vec<GroupSummary>> {
        let answer = self
            .client
            .clone()
            .list_groups(v1::ListGroupsRequest {})
            .await
            .map_err(|s| Error::from_group_admin_status(s, "", None))?;
        answer
            .into_inner()
            .groups
            .into_iter()
            .map(|g| GroupSummary::from_proto(Some(g)))
            .collect()
    }

    /// A group's members, assignment, committed offsets and lag per partition. Fails
    /// with [`Error::GroupNotFound`] for a group with neither members nor commits.
    pub async fn describe_group(&self, group: &str) -> Result<GroupDescription> {
        let answer = self
            .client
            .clone()
            .describe_group(v1::DescribeGroupRequest {
                group: group.to_string(),
            })
            .await
            .map_err(|s| Error::from_group_admin_status(s, group, None))?
            .into_inner();
        Ok(GroupDescription {
            group: GroupSummary::from_proto(answer.group)?,
            members: answer
                .members
                .into_iter()
                .map(|m| GroupMemberInfo {
                    member_id: m.member_id,
                    client_id: m.client_id,
                    member_epoch: m.member_epoch,
                    topics: m.topics,
                    assignment: flatten(m.assignment),
                    revoking: flatten(m.revoking),
                    session_timeout_ms: m.session_timeout_ms,
                })
                .collect(),
            partitions: answer
                .partitions
                .into_iter()
                .map(|p| GroupPartitionLag {
                    topic: p.topic,
                    partition: p.partition,
                    committed_offset: p.committed_offset,
                    metadata: p.metadata,
                    log_start_offset: p.log_start_offset,
                    log_end_offset: p.log_end_offset,
                    lag: p.lag,
                    owner: (!p.member_id.is_empty()).then_some(p.member_id),
                })
                .collect(),
            total_lag: answer.total_lag,
        })
    }

    /// The committed positions of a group, every partition it has committed; empty for
    /// an unknown group.
    pub async fn committed_offsets(&self, group: &str) -> Result<Vec<CommittedOffset>> {
        let answer = self
            .groups
            .clone()
            .fetch_offsets(v1::FetchOffsetsRequest {
                group: group.to_string(),
                partitions: Vec::new(),
            })
            .await
            .map_err(|s| Error::from_group_admin_status(s, group, None))?;
        Ok(answer
            .into_inner()
            .offsets
            .into_iter()
            .map(CommittedOffset::from_proto)
            .collect())
    }

    /// Moves a group's committed positions in `topic` (also backwards) for `partitions`,
    /// or every partition when empty, and returns the new positions. The group must have
    /// no members ([`Error::GroupNotEmpty`] otherwise): stop its consumers first. An
    /// offset outside a partition's stored range fails with an out-of-range error.
    pub async fn reset_offsets(
        &self,
        group: &str,
        topic: &str,
        partitions: &[u32],
        to: ResetTo,
    ) -> Result<Vec<CommittedOffset>> {
        use v1::reset_offsets_request::To;
        // An offset outside one partition's range is that partition's error.
        let read = match (to, partitions) {
            (ResetTo::Offset(offset), [partition]) => Some((*partition, offset)),
            _ => None,
        };
        let to = match to {
            ResetTo::Earliest => To::Earliest(true),
            ResetTo::Latest => To::Latest(true),
            ResetTo::Timestamp(t) => To::TimestampMs(t),
            ResetTo::Offset(o) => To::Offset(o),
        };
        let answer = self
            .client
            .clone()
            .reset_offsets(v1::ResetOffsetsRequest {
                group: group.to_string(),
                topic: topic.to_string(),
                partitions: partitions.to_vec(),
                to: Some(to),
            })
            .await
            .map_err(|s| match read {
                Some(read) if s.code() == tonic::Code::OutOfRange => {
                    Error::from_status(s, topic, Some(read))
                }
                _ => Error::from_group_admin_status(s, group, Some(topic)),
            })?;
        Ok(answer
            .into_inner()
            .offsets
            .into_iter()
            .map(CommittedOffset::from_proto)
            .collect())
    }

    /// Forgets a group's committed offsets. The group must have no members
    /// ([`Error::GroupNotEmpty`] otherwise).
    pub async fn delete_group(&self, group: &str) -> Result<()> {
        self.client
            .clone()
            .delete_group(v1::DeleteGroupRequest {
                group: group.to_string(),
            })
            .await
            .map_err(|s| Error::from_group_admin_status(s, group, None))?;
        Ok(())
    }
}
