//! The consumer-group RPCs: the `Groups` service (membership and committed offsets)
//! and the group half of `Admin` (list, describe, reset, delete). Membership rules live
//! in [`crate::groups::coordinator`], durable offsets in [`crate::groups::offsets`]; this module
//! translates requests and checks them against the partitions that exist.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_proto::v1::{self, groups_server};
use tonic::{Request, Response, Status};

use crate::broker::{Broker, Topic};
use crate::error::{Error, Result};
use crate::groups::assign::TopicPartition;
use crate::groups::coordinator::{validate_group, GroupState, GroupView, Heartbeat};
use crate::groups::offsets::{Committed, Mode};
use crate::grpc::service::Service;

fn to_partitions(from: &[v1::TopicPartitions]) -> Vec<TopicPartition> {
    from.iter()
        .flat_map(|t| {
            t.partitions
                .iter()
                .map(|&p| TopicPartition::new(t.topic.clone(), p))
        })
        .collect()
}

fn from_partitions<'a>(
    from: impl IntoIterator<Item = &'a TopicPartition>,
) -> Vec<v1::TopicPartitions> {
    let mut by_topic: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for tp in from {
        by_topic.entry(&tp.topic).or_default().push(tp.partition);
    }
    by_topic
        .into_iter()
        .map(|(topic, mut partitions)| {
            partitions.sort_unstable();
            v1::TopicPartitions {
                topic: topic.to_string(),
                partitions,
            }
        })
        .collect()
}

fn partition_offset(tp: TopicPartition, committed: Committed) -> v1::PartitionOffset {
    v1::PartitionOffset {
        topic: tp.topic,
        partition: tp.partition,
        offset: committed.offset,
        metadata: committed.metadata,
        commit_timestamp_ms: committed.timestamp_ms,
    }
}

fn state(state: GroupState) -> v1::GroupState {
    match state {
        GroupState::Empty => v1::GroupState::Empty,
        GroupState::Stable => v1::GroupState::Stable,
        GroupState::Reconciling => v1::GroupState::Reconciling,
    }
}

fn summary(name: &str, view: Option<&GroupView>) -> v1::GroupSummary {
    v1::GroupSummary {
        group: name.to_string(),
        state: state(view.map_or(GroupState::Empty, |v| v.state)).into(),
        members: view.map_or(0, |v| v.members.len() as u32),
        epoch: view.map_or(0, |v| v.epoch),
    }
}

fn millis(ms: u32) -> Duration {
    Duration::from_millis(ms.into())
}

/// The high watermark of a partition that must exist.
fn high_watermark(broker: &Broker, tp: &TopicPartition) -> Result<u64> {
    Ok(broker
        .partition(&tp.topic, tp.partition)?
        .reader()
        .high_watermark())
}

#[tonic::async_trait]
impl groups_server::Groups for Service {
    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let request = request.into_inner();
        let broker = self.broker();
        let reply = broker.coordinator().heartbeat(
            &request.group,
            Heartbeat {
                member_id: request.member_id,
                member_epoch: request.member_epoch,
                topics: request.topics,
                owned: to_partitions(&request.owned),
                session_timeout: millis(request.session_timeout_ms),
                rebalance_timeout: millis(request.rebalance_timeout_ms),
                client_id: request.client_id,
            },
            &|topic| broker.partition_count(topic),
            Instant::now(),
        )?;
        Ok(Response::new(v1::HeartbeatResponse {
            member_id: reply.member_id,
            member_epoch: reply.member_epoch,
            heartbeat_interval_ms: reply.interval.as_millis() as u32,
            assignment: from_partitions(&reply.assignment),
        }))
    }

    async fn leave_group(
        &self,
        request: Request<v1::LeaveGroupRequest>,
    ) -> Result<Response<v1::LeaveGroupResponse>, Status> {
        let request = request.into_inner();
        validate_group(&request.group)?;
        let broker = self.broker();
        broker
            .coordinator()
            .leave(&request.group, &request.member_id, &|topic| {
                broker.partition_count(topic)
            });
        Ok(Response::new(v1::LeaveGroupResponse {}))
    }

    async fn commit_offsets(
        &self,
        request: Request<v1::CommitOffsetsRequest>,
    ) -> Result<Response<v1::CommitOffsetsResponse>, Status> {
        let request = request.into_inner();
        validate_group(&request.group)?;
        let broker = self.broker();
        let mut offsets = Vec::with_capacity(request.offsets.len());
        let mut topics: Vec<Arc<Topic>> = Vec::new();
        let mut seen = BTreeSet::new();
        for o in request.offsets {
            let tp = TopicPartition::new(o.topic, o.partition);
            if !topics.iter().any(|t| t.name == tp.topic) {
                topics.push(broker.topic(&tp.topic)?);
            }
            let end = high_watermark(broker, &tp)?;
            if o.offset > end {
                return Err(Error::OutOfRange(format!(
                    "cannot commit offset {} for {tp}: its log ends at {end}",
                    o.offset
                ))
                .into());
            }
            if !seen.insert(tp.clone()) {
                return Err(
                    Error::InvalidArgument(format!("{tp} appears twice in one commit")).into(),
                );
            }
            offsets.push((tp, o.offset, o.metadata));
        }
        // A commit from outside the group keeps members from joining until it is
        // written, so none starts from the position it replaces.
        let _exclusive = if request.member_id.is_empty() {
            Some(
                broker
                    .coordinator()
                    .exclusive(&request.group, "commit to")?,
            )
        } else {
            broker.coordinator().check_owner(
                &request.group,
                &request.member_id,
                request.member_epoch,
                offsets.iter().map(|o| &o.0),
            )?;
            None
        };
        let committed = broker
            .offsets()
            .commit(&request.group, offsets, topics, Mode::Advance)
            .await?;
        Ok(Response::new(v1::CommitOffsetsResponse {
            offsets: committed
                .into_iter()
                .map(|(tp, c)| partition_offset(tp, c))
                .collect(),
        }))
    }

    async fn fetch_offsets(
        &self,
        request: Request<v1::FetchOffsetsRequest>,
    ) -> Result<Response<v1::FetchOffsetsResponse>, Status> {
        let request = request.into_inner();
        validate_group(&request.group)?;
        let wanted: BTreeSet<TopicPartition> =
            to_partitions(&request.partitions).into_iter().collect();
        let offsets = self
            .broker()
            .offsets()
            .group(&request.group)
            .into_iter()
            .filter(|(tp, _)| wanted.is_empty() || wanted.contains(tp))
            .map(|(tp, c)| partition_offset(tp, c))
            .collect();
        Ok(Response::new(v1::FetchOffsetsResponse { offsets }))
    }
}

/// Every group with members or committed offsets.
pub fn list_groups(broker: &Broker) -> v1::ListGroupsResponse {
    let active: BTreeMap<String, GroupView> = broker
        .coordinator()
        .list()
        .into_iter()
        .map(|v| (v.name.clone(), v))
        .collect();
    let mut names: BTreeSet<String> = broker.offsets().groups().into_iter().collect();
    names.extend(
        active
            .values()
            .filter(|v| !v.members.is_empty())
            .map(|v| v.name.clone()),
    );
    v1::ListGroupsResponse {
        groups: names
            .iter()
            .map(|name| summary(name, active.get(name)))
            .collect(),
    }
}

/// A group's members, and per partition its committed offset, end and lag.
pub fn describe_group(broker: &Broker, group: &str) -> Result<v1::DescribeGroupResponse> {
    validate_group(group)?;
    let view = broker.coordinator().describe(group);
    let committed = broker.offsets().group(group);
    // A group exists while it has members or committed offsets; the coordinator may
    // still hold one that just lost both.
    let has_members = view.as_ref().is_some_and(|v| !v.members.is_empty());
    if !has_members && committed.is_empty() {
        return Err(Error::GroupNotFound(group.to_string()));
    }
    let mut owners: BTreeMap<TopicPartition, String> = BTreeMap::new();
    let mut partitions: BTreeSet<TopicPartition> = committed.keys().cloned().collect();
    for member in view.iter().flat_map(|v| &v.members) {
        for tp in member.assignment.iter().chain(&member.revoking) {
            owners.insert(tp.clone(), member.member_id.clone());
        }
        for topic in &member.topics {
            let count = broker.partition_count(topic).unwrap_or(0);
            partitions.extend((0..count).map(|p| TopicPartition::new(topic.clone(), p)));
        }
    }
    let mut total_lag = 0;
    let partitions = partitions
        .into_iter()
        .map(|tp| {
            // A topic deleted since: its log has no end to measure lag against.
            let end = high_watermark(broker, &tp).ok();
            let commit = committed.get(&tp);
            let lag = end.zip(commit).map(|(end, c)| end.saturating_sub(c.offset));
            total_lag += lag.unwrap_or(0);
            v1::GroupPartitionInfo {
                committed_offset: commit.map(|c| c.offset),
                metadata: commit.map(|c| c.metadata.clone()).unwrap_or_default(),
                log_end_offset: end.unwrap_or(0),
                lag,
                member_id: owners.get(&tp).cloned().unwrap_or_default(),
                topic: tp.topic,
                partition: tp.partition,
            }
        })
        .collect();
    Ok(v1::DescribeGroupResponse {
        group: Some(summary(group, view.as_ref())),
        members: view
            .iter()
            .flat_map(|v| &v.members)
            .map(|m| v1::GroupMemberInfo {
                member_id: m.member_id.clone(),
                client_id: m.client_id.clone(),
                member_epoch: m.member_epoch,
                topics: m.topics.clone(),
                assignment: from_partitions(&m.assignment),
                revoking: from_partitions(&m.revoking),
                session_timeout_ms: m.session_timeout.as_millis() as u32,
            })
            .collect(),
        partitions,
        total_lag,
    })
}

/// Moves a group's committed offsets of one topic.
pub async fn reset_offsets(
    broker: &Broker,
    request: v1::ResetOffsetsRequest,
) -> Result<v1::ResetOffsetsResponse> {
    use v1::reset_offsets_request::To;
    validate_group(&request.group)?;
    let topic = broker.topic(&request.topic)?;
    let to = request.to.ok_or_else(|| {
        Error::InvalidArgument(
            "say where to reset to: earliest, latest, a timestamp or an offset".into(),
        )
    })?;
    let _exclusive = broker
        .coordinator()
        .exclusive(&request.group, "reset the offsets of")?;
    let ids: Vec<u32> = if request.partitions.is_empty() {
        (0..topic.settings.partitions).collect()
    } else {
        request.partitions.clone()
    };
    let mut offsets = Vec::with_capacity(ids.len());
    for id in ids {
        let reader = topic.partition(id)?.reader().clone();
        let (earliest, latest) = (reader.earliest_offset(), reader.high_watermark());
        let offset = match to {
            To::Earliest(_) => earliest,
            To::Latest(_) => latest,
            To::TimestampMs(at) => tokio::task::spawn_blocking(move || {
                reader
                    .offset_for_timestamp(at)
                    .map(|found| found.unwrap_or(latest))
            })
            .await
            .map_err(|_| Error::ShuttingDown)??,
            To::Offset(offset) if (earliest..=latest).contains(&offset) => offset,
            To::Offset(offset) => {
                return Err(Error::OutOfRange(format!(
                    "offset {offset} is outside {}/{id}, which holds {earliest} to {latest}",
                    topic.name
                )))
            }
        };
        offsets.push((
            TopicPartition::new(topic.name.clone(), id),
            offset,
            String::new(),
        ));
    }
    let committed = broker
        .offsets()
        .commit(&request.group, offsets, vec![topic.clone()], Mode::Reset)
        .await?;
    tracing::info!(group = %request.group, topic = %topic.name, "reset committed offsets");
    Ok(v1::ResetOffsetsResponse {
        offsets: committed
            .into_iter()
            .map(|(tp, c)| partition_offset(tp, c))
            .collect(),
    })
}

/// Forgets a group without members.
pub async fn delete_group(broker: &Broker, group: &str) -> Result<()> {
    validate_group(group)?;
    let _exclusive = broker.coordinator().exclusive(group, "delete")?;
    if broker.offsets().group(group).is_empty() {
        return Err(Error::GroupNotFound(group.to_string()));
    }
    broker.offsets().delete_group(group).await?;
    tracing::info!(%group, "deleted group");
    Ok(())
}

/// Checks a fetch by a group member: it must own the partition at its epoch.
pub fn check_fetch(
    broker: &Broker,
    member: &v1::GroupMember,
    topic: &str,
    partition: u32,
) -> Result<()> {
    broker.coordinator().check_owner(
        &member.group,
        &member.member_id,
        member.member_epoch,
        [&TopicPartition::new(topic, partition)],
    )
}
