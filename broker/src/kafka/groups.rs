//! Kafka's consumer-group offset APIs over Strata's one group model: FindCoordinator,
//! OffsetCommit and OffsetFetch for consumers that assign partitions themselves
//! (`assign()` then `commit()`: generation -1, no member id), and ListGroups. Offsets
//! committed here are the ones `strata group describe`, lag metrics and gRPC members
//! see, and the other way round. A Kafka commit to a group with gRPC members is refused
//! (a group is used by one protocol at a time). Group membership over Kafka (JoinGroup,
//! SyncGroup, Heartbeat, LeaveGroup) is not served yet.

use std::collections::BTreeSet;
use std::sync::Arc;

use kafka_protocol::messages::{
    find_coordinator_response, list_groups_response, offset_commit_response, offset_fetch_response,
    BrokerId, FindCoordinatorRequest, FindCoordinatorResponse, GroupId, ListGroupsRequest,
    ListGroupsResponse, OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest,
    OffsetFetchResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError as K;

use super::{errors, Context, NODE_ID};
use crate::broker::Broker;
use crate::error::Error;
use crate::groups::api::{commit_offsets, fetch_offsets, list_groups, Committer};
use crate::groups::assign::TopicPartition;
use crate::groups::coordinator::GroupState;

/// The Kafka error code of a group operation's failure.
fn code(e: &Error) -> i16 {
    match e {
        Error::InvalidArgument(m) if m.contains("group name") => K::InvalidGroupId.code(),
        // A commit from outside a group that has (gRPC) members.
        Error::Fenced(_) => K::UnknownMemberId.code(),
        Error::GroupBusy(_) => K::CoordinatorLoadInProgress.code(),
        Error::Unavailable(..) | Error::DiskFull(..) | Error::Storage(_) | Error::Io { .. } => {
            K::CoordinatorNotAvailable.code()
        }
        e => errors::code(e),
    }
}

pub(super) fn find_coordinator(
    context: &Context,
    request: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    let host = StrBytes::from_string(context.host.clone());
    // Key type 0 is a group; 1, a transactional id, has no coordinator here.
    let error = (request.key_type != 0).then(|| K::CoordinatorNotAvailable.code());
    let message = error.map(|_| {
        StrBytes::from_static_str("transactions are not supported; only group coordinators")
    });
    if version >= 4 {
        let coordinators = request
            .coordinator_keys
            .into_iter()
            .map(|key| {
                find_coordinator_response::Coordinator::default()
                    .with_key(key)
                    .with_node_id(BrokerId(error.map_or(NODE_ID, |_| -1)))
                    .with_host(host.clone())
                    .with_port(error.map_or(context.port, |_| -1))
                    .with_error_code(error.unwrap_or(0))
                    .with_error_message(message.clone())
            })
            .collect();
        return FindCoordinatorResponse::default().with_coordinators(coordinators);
    }
    FindCoordinatorResponse::default()
        .with_error_code(error.unwrap_or(0))
        .with_error_message(if version >= 1 { message } else { None })
        .with_node_id(BrokerId(error.map_or(NODE_ID, |_| -1)))
        .with_host(host)
        .with_port(error.map_or(context.port, |_| -1))
}

pub(super) async fn offset_commit(
    broker: &Arc<Broker>,
    request: OffsetCommitRequest,
) -> OffsetCommitResponse {
    let group = request.group_id.0.to_string();
    let mut offsets = Vec::new();
    let mut invalid = None;
    for topic in &request.topics {
        for p in &topic.partitions {
            match (
                u32::try_from(p.partition_index),
                u64::try_from(p.committed_offset),
            ) {
                (Ok(partition), Ok(offset)) => offsets.push((
                    TopicPartition::new(topic.name.0.to_string(), partition),
                    offset,
                    p.committed_metadata
                        .as_ref()
                        .map_or_else(String::new, |m| m.to_string()),
                )),
                _ => {
                    invalid = Some(Error::InvalidArgument(format!(
                        "cannot commit offset {} for partition {} of {}",
                        p.committed_offset,
                        p.partition_index,
                        topic.name.0.as_str()
                    )))
                }
            }
        }
    }
    let outcome = if request.generation_id_or_member_epoch >= 0 || !request.member_id.is_empty() {
        // Only consumers that assign partitions themselves commit over Kafka yet.
        Err(Error::Fenced(format!(
            "member {:?} (generation {}) is not a member of group {group:?}: Kafka group \
             membership is not supported; assign partitions and commit with generation -1",
            request.member_id.as_str(),
            request.generation_id_or_member_epoch
        )))
    } else if let Some(e) = invalid {
        Err(e)
    } else {
        commit_offsets(broker, &group, Committer::Outside, offsets).await
    };
    let error = match &outcome {
        Ok(_) => 0,
        Err(e) => {
            tracing::info!(%group, error = %e, "refused a Kafka offset commit");
            match e {
                Error::InvalidArgument(m) if m.starts_with("cannot commit offset") => {
                    K::OffsetOutOfRange.code()
                }
                e => code(e),
            }
        }
    };
    let topics = request
        .topics
        .into_iter()
        .map(|topic| {
            offset_commit_response::OffsetCommitResponseTopic::default()
                .with_name(topic.name)
                .with_partitions(
                    topic
                        .partitions
                        .iter()
                        .map(|p| {
                            offset_commit_response::OffsetCommitResponsePartition::default()
                                .with_partition_index(p.partition_index)
                                .with_error_code(error)
                        })
                        .collect(),
                )
        })
        .collect();
    OffsetCommitResponse::default().with_topics(topics)
}

pub(super) fn offset_fetch(
    broker: &Broker,
    request: OffsetFetchRequest,
    version: i16,
) -> OffsetFetchResponse {
    let group = request.group_id.0.to_string();
    let wanted: Option<BTreeSet<TopicPartition>> = request.topics.as_ref().map(|topics| {
        topics
            .iter()
            .flat_map(|t| {
                t.partition_indexes.iter().filter_map(|&p| {
                    Some(TopicPartition::new(
                        t.name.0.to_string(),
                        u32::try_from(p).ok()?,
                    ))
                })
            })
            .collect()
    });
    let committed = match fetch_offsets(broker, &group, &wanted.clone().unwrap_or_default()) {
        Ok(committed) => committed,
        Err(e) => {
            let error = code(&e);
            return if version >= 2 {
                OffsetFetchResponse::default().with_error_code(error)
            } else {
                // v1 has no top-level error: every asked partition carries it.
                let topics = request
                    .topics
                    .unwrap_or_default()
                    .into_iter()
                    .map(|t| {
                        offset_fetch_response::OffsetFetchResponseTopic::default()
                            .with_name(t.name)
                            .with_partitions(
                                t.partition_indexes
                                    .into_iter()
                                    .map(|p| {
                                        offset_fetch_response::OffsetFetchResponsePartition::default()
                                            .with_partition_index(p)
                                            .with_committed_offset(-1)
                                            .with_error_code(error)
                                    })
                                    .collect(),
                            )
                    })
                    .collect();
                OffsetFetchResponse::default().with_topics(topics)
            };
        }
    };
    let partition = |index: i32, offset: i64, metadata: Option<String>| {
        offset_fetch_response::OffsetFetchResponsePartition::default()
            .with_partition_index(index)
            .with_committed_offset(offset)
            .with_committed_leader_epoch(-1)
            .with_metadata(Some(StrBytes::from_string(metadata.unwrap_or_default())))
    };
    let topics = match request.topics {
        // Every asked partition, -1 where nothing is committed.
        Some(topics) => topics
            .into_iter()
            .map(|t| {
                let partitions = t
                    .partition_indexes
                    .iter()
                    .map(|&p| {
                        let found = committed.iter().find(|(tp, _)| {
                            tp.topic == t.name.0.as_str() && p >= 0 && tp.partition == p as u32
                        });
                        match found {
                            Some((_, c)) => partition(p, c.offset as i64, Some(c.metadata.clone())),
                            None => partition(p, -1, None),
                        }
                    })
                    .collect();
                offset_fetch_response::OffsetFetchResponseTopic::default()
                    .with_name(t.name)
                    .with_partitions(partitions)
            })
            .collect(),
        // Null (v2+): every committed partition.
        None => {
            let mut topics: Vec<offset_fetch_response::OffsetFetchResponseTopic> = Vec::new();
            for (tp, c) in committed {
                let p = partition(tp.partition as i32, c.offset as i64, Some(c.metadata));
                match topics.last_mut() {
                    Some(last) if last.name.0.as_str() == tp.topic => last.partitions.push(p),
                    _ => topics.push(
                        offset_fetch_response::OffsetFetchResponseTopic::default()
                            .with_name(TopicName(StrBytes::from_string(tp.topic)))
                            .with_partitions(vec![p]),
                    ),
                }
            }
            topics
        }
    };
    OffsetFetchResponse::default().with_topics(topics)
}

pub(super) fn list(broker: &Broker, _request: ListGroupsRequest) -> ListGroupsResponse {
    let groups = list_groups(broker)
        .into_iter()
        .map(|g| {
            let state = match g.state {
                GroupState::Empty => "Empty",
                GroupState::Stable => "Stable",
                GroupState::Reconciling => "PreparingRebalance",
            };
            list_groups_response::ListedGroup::default()
                .with_group_id(GroupId(StrBytes::from_string(g.name)))
                .with_protocol_type(StrBytes::from_static_str("consumer"))
                .with_group_state(StrBytes::from_static_str(state))
        })
        .collect();
    ListGroupsResponse::default().with_groups(groups)
}
