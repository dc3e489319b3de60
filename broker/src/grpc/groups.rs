//! The consumer-group RPCs: the `Groups` service (membership and committed offsets)
//! and the group half of `Admin` (list, describe, reset, delete). The rules live in
//! [`crate::groups`]; this module translates requests and answers.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use strata_proto::v1::{self, groups_server};
use tonic::{Request, Response, Status};

use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::groups::api::{self, Committer, GroupSummary, ResetTo};
use crate::groups::assign::TopicPartition;
use crate::groups::coordinator::{validate_group, GroupState, Heartbeat};
use crate::groups::offsets::Committed;
use crate::grpc::checks;
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

fn partition_offset((tp, committed): (TopicPartition, Committed)) -> v1::PartitionOffset {
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

fn summary(summary: GroupSummary) -> v1::GroupSummary {
    v1::GroupSummary {
        group: summary.name,
        state: state(summary.state).into(),
        members: summary.members,
        epoch: summary.epoch,
    }
}

fn millis(ms: u32) -> Duration {
    Duration::from_millis(ms.into())
}

#[tonic::async_trait]
impl groups_server::Groups for Service {
    async fn heartbeat(
        &self,
        request: Request<v1::HeartbeatRequest>,
    ) -> Result<Response<v1::HeartbeatResponse>, Status> {
        let request = request.into_inner();
        let scope = self.scope("Heartbeat").group(&request.group);
        let broker = self.broker();
        let checked = checks::id("the member id", &request.member_id)
            .and_then(|()| checks::client_id(&request.client_id, self.limits().client_id_bytes))
            .and_then(|()| checks::topic_names(broker, &request.topics, "the heartbeat"))
            .and_then(|()| checks::topic_partitions(broker, &request.owned, "the heartbeat"));
        if let Err(e) = checked {
            return scope.finish(Err(e));
        }
        if broker.kafka_members().has_members(&request.group) {
            // A group is used by one protocol at a time.
            return scope.finish::<v1::HeartbeatResponse>(Err(Error::Fenced(format!(
                "group {:?} has members that joined over the Kafka protocol; stop them, or \
                 use another group",
                request.group
            ))));
        }
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
                join_key: request.join_key,
            },
            &|topic| broker.partition_count(topic),
            Instant::now(),
        );
        scope.finish(reply.map(|reply| v1::HeartbeatResponse {
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
        let scope = self.scope("LeaveGroup").group(&request.group);
        let broker = self.broker();
        let checked = validate_group(&request.group)
            .and_then(|()| checks::id("the member id", &request.member_id));
        scope.finish(checked.map(|()| {
            broker
                .coordinator()
                .leave(&request.group, &request.member_id, &|topic| {
                    broker.partition_count(topic)
                });
            v1::LeaveGroupResponse {}
        }))
    }

    async fn commit_offsets(
        &self,
        request: Request<v1::CommitOffsetsRequest>,
    ) -> Result<Response<v1::CommitOffsetsResponse>, Status> {
        let request = request.into_inner();
        let scope = self.scope("CommitOffsets").group(&request.group);
        let checked = checks::id("the member id", &request.member_id).and_then(|()| {
            checks::commit_offsets(
                self.broker(),
                &request.offsets,
                self.limits().commit_metadata_bytes,
            )
        });
        if let Err(e) = checked {
            return scope.finish(Err(e));
        }
        let committer = if request.member_id.is_empty() {
            Committer::Outside
        } else {
            Committer::Member {
                id: &request.member_id,
                epoch: request.member_epoch,
            }
        };
        let offsets = request
            .offsets
            .iter()
            .map(|o| {
                (
                    TopicPartition::new(o.topic.clone(), o.partition),
                    o.offset,
                    o.metadata.clone(),
                )
            })
            .collect();
        let committed =
            api::commit_offsets(self.broker(), &request.group, committer, offsets).await;
        scope.finish(committed.map(|committed| v1::CommitOffsetsResponse {
            offsets: committed.into_iter().map(partition_offset).collect(),
        }))
    }

    async fn fetch_offsets(
        &self,
        request: Request<v1::FetchOffsetsRequest>,
    ) -> Result<Response<v1::FetchOffsetsResponse>, Status> {
        let request = request.into_inner();
        let scope = self.scope("FetchOffsets").group(&request.group);
        if let Err(e) = checks::topic_partitions(self.broker(), &request.partitions, "the request")
        {
            return scope.finish(Err(e));
        }
        let wanted: BTreeSet<TopicPartition> =
            to_partitions(&request.partitions).into_iter().collect();
        let offsets = api::fetch_offsets(self.broker(), &request.group, &wanted);
        scope.finish(offsets.map(|offsets| v1::FetchOffsetsResponse {
            offsets: offsets.into_iter().map(partition_offset).collect(),
        }))
    }
}

/// Every group with members or committed offsets.
pub fn list_groups(broker: &Broker) -> v1::ListGroupsResponse {
    v1::ListGroupsResponse {
        groups: api::list_groups(broker).into_iter().map(summary).collect(),
    }
}

/// A group's members, and per partition its committed offset, end and lag.
pub fn describe_group(broker: &Broker, group: &str) -> Result<v1::DescribeGroupResponse> {
    let description = api::describe_group(broker, group)?;
    Ok(v1::DescribeGroupResponse {
        group: Some(summary(description.summary)),
        members: description
            .members
            .into_iter()
            .map(|m| v1::GroupMemberInfo {
                assignment: from_partitions(&m.assignment),
                revoking: from_partitions(&m.revoking),
                session_timeout_ms: m.session_timeout.as_millis() as u32,
                member_id: m.member_id,
                client_id: m.client_id,
                member_epoch: m.member_epoch,
                topics: m.topics,
            })
            .collect(),
        partitions: description
            .partitions
            .into_iter()
            .map(|p| v1::GroupPartitionInfo {
                committed_offset: p.committed.as_ref().map(|c| c.offset),
                metadata: p.committed.map(|c| c.metadata).unwrap_or_default(),
                log_start_offset: p.log.map_or(0, |l| l.start),
                log_end_offset: p.log.map_or(0, |l| l.end),
                lag: p.lag,
                member_id: p.member_id.unwrap_or_default(),
                topic: p.partition.topic,
                partition: p.partition.partition,
            })
            .collect(),
        total_lag: description.total_lag,
    })
}

/// Moves a group's committed offsets of one topic.
pub async fn reset_offsets(
    broker: &Broker,
    request: v1::ResetOffsetsRequest,
) -> Result<v1::ResetOffsetsResponse> {
    use v1::reset_offsets_request::To;
    let to = match request.to {
        Some(To::Earliest(_)) => ResetTo::Earliest,
        Some(To::Latest(_)) => ResetTo::Latest,
        Some(To::TimestampMs(at)) => ResetTo::Timestamp(at),
        Some(To::Offset(offset)) => ResetTo::Offset(offset),
        None => {
            // The group and the topic are checked first, as when `to` is given.
            validate_group(&request.group)?;
            broker.topic(&request.topic)?;
            return Err(Error::InvalidArgument(
                "say where to reset to: earliest, latest, a timestamp or an offset".into(),
            ));
        }
    };
    validate_group(&request.group)?;
    let count = broker
        .partition_count(&request.topic)
        .ok_or_else(|| Error::TopicNotFound(request.topic.clone()))?;
    checks::partition_list(&request.topic, count, &request.partitions, "the reset")?;
    let committed = api::reset_offsets(
        broker,
        &request.group,
        &request.topic,
        &request.partitions,
        to,
    )
    .await?;
    Ok(v1::ResetOffsetsResponse {
        offsets: committed.into_iter().map(partition_offset).collect(),
    })
}

/// Checks a fetch by a group member: it must own the partition at its epoch.
pub fn check_fetch(
    broker: &Broker,
    member: &v1::GroupMember,
    topic: &str,
    partition: u32,
) -> Result<()> {
    api::check_fetch(
        broker,
        &member.group,
        &member.member_id,
        member.member_epoch,
        &TopicPartition::new(topic, partition),
    )
}
