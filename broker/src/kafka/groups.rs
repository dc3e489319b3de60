//! Kafka's consumer-group APIs: FindCoordinator; JoinGroup, SyncGroup, Heartbeat and
//! LeaveGroup over the classic membership of [`super::membership`]; OffsetCommit and
//! OffsetFetch over Strata's one offset store, for members and for consumers that
//! assign partitions themselves (`assign()` then `commit()`: generation -1, no member
//! id); ListGroups and DescribeGroups. Offsets committed here are the ones `strata group
//! describe`, lag metrics and gRPC members see, and the other way round. A group is used
//! by one protocol at a time: a Kafka join or standalone commit to a group with gRPC
//! members is refused.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use bytes::Bytes;
use kafka_protocol::messages::{
    describe_groups_response, find_coordinator_response, join_group_response, leave_group_response,
    list_groups_response, offset_commit_response, offset_fetch_response, BrokerId,
    DescribeGroupsRequest, DescribeGroupsResponse, FindCoordinatorRequest, FindCoordinatorResponse,
    GroupId, HeartbeatRequest, HeartbeatResponse, JoinGroupRequest, JoinGroupResponse,
    LeaveGroupRequest, LeaveGroupResponse, ListGroupsRequest, ListGroupsResponse,
    OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse,
    SyncGroupRequest, SyncGroupResponse, TopicName,
};
use kafka_protocol::protocol::StrBytes;
use kafka_protocol::ResponseError as K;

use super::handlers::Client;
use super::membership::Join;
use super::{errors, Context, NODE_ID};
use crate::broker::Broker;
use crate::error::Error;
use crate::groups::api::{commit_offsets, fetch_offsets, list_groups, Committer};
use crate::groups::assign::TopicPartition;
use crate::groups::coordinator::{validate_group, GroupState};
use crate::groups::offsets::Committed;

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
    context: &Context,
    request: OffsetCommitRequest,
) -> OffsetCommitResponse {
    let broker = &context.broker;
    let group = request.group_id.0.to_string();
    let standalone = request.generation_id_or_member_epoch < 0 && request.member_id.is_empty();
    let member = if standalone && context.broker.kafka_members().has_members(&group) {
        // Like a commit from outside a group with gRPC members.
        tracing::info!(%group, "refused a standalone Kafka commit: the group has Kafka members");
        Err(K::UnknownMemberId.code())
    } else if standalone {
        Ok(Committer::Outside)
    } else {
        context
            .broker
            .kafka_members()
            .check_commit(
                &group,
                request.member_id.as_str(),
                request.generation_id_or_member_epoch,
            )
            .map(|()| Committer::KafkaMember)
    };
    // A member's commit does not take the group's hold (members of one group commit
    // concurrently), but waits out one an admin change (a reset, a deletion, a commit
    // from outside over gRPC) has taken, as a join does.
    let member = member.and_then(|committer| {
        if committer == Committer::KafkaMember && broker.coordinator().held(&group) {
            tracing::info!(%group, "a Kafka member's commit waits: an admin change holds the group");
            return Err(K::CoordinatorLoadInProgress.code());
        }
        Ok(committer)
    });
    let committer = match member {
        Ok(committer) => committer,
        Err(code) => return commit_answer(request, |_| code),
    };
    // Each partition's own answer (`None`: committed with the others); each topic is
    // looked up once, and only partitions that exist are copied into the commit.
    let mut errors: Vec<Option<i16>> = Vec::new();
    let mut offsets = Vec::new();
    for topic in &request.topics {
        let found = broker.topic(topic.name.0.as_str()).ok();
        for p in &topic.partitions {
            let partition = found
                .as_ref()
                .and_then(|t| t.partitions().get(usize::try_from(p.partition_index).ok()?));
            let metadata = p.committed_metadata.as_deref().unwrap_or_default();
            let error = match (partition, u64::try_from(p.committed_offset)) {
                (None, _) => Some(K::UnknownTopicOrPartition.code()),
                (Some(_), _) if metadata.len() > context.limits.commit_metadata_bytes => {
                    Some(K::OffsetMetadataTooLarge.code())
                }
                (Some(partition), Ok(offset)) if offset <= partition.reader().high_watermark() => {
                    offsets.push((
                        TopicPartition::new(topic.name.0.to_string(), p.partition_index as u32),
                        offset,
                        metadata.to_string(),
                    ));
                    None
                }
                // Negative, or past the log end: this commit only fails (Kafka clients
                // treat OFFSET_OUT_OF_RANGE here as fatal).
                (Some(_), _) => Some(K::InvalidCommitOffsetSize.code()),
            };
            errors.push(error);
        }
    }
    let outcome = if offsets.is_empty() {
        0
    } else {
        match commit_offsets(broker, &group, committer, offsets).await {
            Ok(_) => 0,
            Err(e) => {
                tracing::info!(%group, error = %e, "refused a Kafka offset commit");
                match e {
                    Error::OutOfRange(_) => K::InvalidCommitOffsetSize.code(),
                    e => code(&e),
                }
            }
        }
    };
    commit_answer(request, |i| errors[i].unwrap_or(outcome))
}

/// The OffsetCommit answer: `error(i)` for the i-th partition of the request.
fn commit_answer(
    request: OffsetCommitRequest,
    error: impl Fn(usize) -> i16,
) -> OffsetCommitResponse {
    let mut i = 0;
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
                            i += 1;
                            offset_commit_response::OffsetCommitResponsePartition::default()
                                .with_partition_index(p.partition_index)
                                .with_error_code(error(i - 1))
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
    // Only partitions that exist are copied into the lookup (the guard refused repeats).
    let wanted: Option<BTreeSet<TopicPartition>> = request.topics.as_ref().map(|topics| {
        topics
            .iter()
            .flat_map(|t| {
                let count = broker.partition_count(t.name.0.as_str()).unwrap_or(0);
                t.partition_indexes.iter().filter_map(move |&p| {
                    let p = u32::try_from(p).ok().filter(|&p| p < count)?;
                    Some(TopicPartition::new(t.name.0.to_string(), p))
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
        Some(topics) => {
            let by_partition: HashMap<(&str, u32), &Committed> = committed
                .iter()
                .map(|(tp, c)| ((tp.topic.as_str(), tp.partition), c))
                .collect();
            topics
                .into_iter()
                .map(|t| {
                    let partitions = t
                        .partition_indexes
                        .iter()
                        .map(|&p| {
                            let found = u32::try_from(p)
                                .ok()
                                .and_then(|p| by_partition.get(&(t.name.0.as_str(), p)));
                            match found {
                                Some(c) => partition(p, c.offset as i64, Some(c.metadata.clone())),
                                None => partition(p, -1, None),
                            }
                        })
                        .collect();
                    offset_fetch_response::OffsetFetchResponseTopic::default()
                        .with_name(t.name)
                        .with_partitions(partitions)
                })
                .collect()
        }
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

pub(super) fn list(context: &Context, _request: ListGroupsRequest) -> ListGroupsResponse {
    let kafka = context.broker.kafka_members().active();
    let mut groups: Vec<list_groups_response::ListedGroup> = list_groups(&context.broker)
        .into_iter()
        .filter(|g| !kafka.iter().any(|(name, _)| *name == g.name))
        .map(|g| {
            let state = match g.state {
                GroupState::Empty => "Empty",
                GroupState::Stable => "Stable",
                GroupState::Reconciling => "PreparingRebalance",
            };
            listed(g.name, state)
        })
        .collect();
    groups.extend(kafka.into_iter().map(|(name, state)| listed(name, state)));
    ListGroupsResponse::default().with_groups(groups)
}

fn listed(name: String, state: &'static str) -> list_groups_response::ListedGroup {
    list_groups_response::ListedGroup::default()
        .with_group_id(GroupId(StrBytes::from_string(name)))
        .with_protocol_type(StrBytes::from_static_str("consumer"))
        .with_group_state(StrBytes::from_static_str(state))
}

fn string(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

/// A JoinGroup as the coordinator needs it, owning its strings and metadata (nothing
/// of the request frame, which the join does not hold while it waits).
pub(super) fn joining(client: &Client, request: JoinGroupRequest, version: i16) -> Join {
    let millis = |ms: i32| Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    Join {
        group: request.group_id.0.to_string(),
        member_id: request.member_id.to_string(),
        client_id: client.id.clone(),
        client_host: client.host.clone(),
        session: millis(request.session_timeout_ms),
        // v0 has no rebalance timeout: the session timeout is used.
        rebalance: millis(if version >= 1 {
            request.rebalance_timeout_ms
        } else {
            request.session_timeout_ms
        }),
        protocol_type: request.protocol_type.to_string(),
        protocols: request
            .protocols
            .into_iter()
            // Copied out: a slice would keep the whole request frame alive for the
            // member's life.
            .map(|p| (p.name.to_string(), Bytes::copy_from_slice(&p.metadata)))
            .collect(),
    }
}

pub(super) async fn join(context: &Context, join: Join) -> JoinGroupResponse {
    let group = join.group.clone();
    let answer = JoinGroupResponse::default()
        .with_generation_id(-1)
        .with_member_id(string(&join.member_id))
        .with_protocol_name(Some(StrBytes::default()));
    if validate_group(&group).is_err() {
        return answer.with_error_code(K::InvalidGroupId.code());
    }
    if context.broker.coordinator().has_members(&group) {
        tracing::info!(%group, "refused a Kafka join: the group has gRPC members");
        return answer.with_error_code(K::InconsistentGroupProtocol.code());
    }
    // A reset or deletion of the group's offsets in progress holds the group: the
    // member would start from a position about to change. Checked under the Kafka
    // groups' lock, so a hold taken after it sees the member (and refuses).
    let coordinator = context.broker.coordinator();
    let joined = context
        .broker
        .kafka_members()
        .join(join, &|group| coordinator.held(group))
        .await;
    if joined.error == K::CoordinatorLoadInProgress.code() {
        tracing::info!(%group, "a Kafka join waits: an admin change holds the group");
    }
    answer
        .with_error_code(joined.error)
        .with_generation_id(joined.generation)
        .with_protocol_type(Some(string(&joined.protocol_type)))
        .with_protocol_name(Some(string(&joined.protocol)))
        .with_leader(string(&joined.leader))
        .with_member_id(string(&joined.member_id))
        .with_members(
            joined
                .members
                .into_iter()
                .map(|(id, metadata)| {
                    join_group_response::JoinGroupResponseMember::default()
                        .with_member_id(string(&id))
                        .with_metadata(metadata)
                })
                .collect(),
        )
}

/// A SyncGroup as the coordinator needs it, owning its ids and the assignments
/// (copied: a slice would keep the request frame alive for the member's life).
#[derive(Debug)]
pub(super) struct Syncing {
    group: String,
    member_id: String,
    generation: i32,
    assignments: Vec<(String, Bytes)>,
}

pub(super) fn syncing(request: SyncGroupRequest) -> Syncing {
    Syncing {
        group: request.group_id.0.to_string(),
        member_id: request.member_id.to_string(),
        generation: request.generation_id,
        assignments: request
            .assignments
            .into_iter()
            .map(|a| {
                (
                    a.member_id.to_string(),
                    Bytes::copy_from_slice(&a.assignment),
                )
            })
            .collect(),
    }
}

pub(super) async fn sync(context: &Context, request: Syncing) -> SyncGroupResponse {
    let synced = context
        .broker
        .kafka_members()
        .sync(
            &request.group,
            &request.member_id,
            request.generation,
            request.assignments,
        )
        .await;
    match synced {
        Ok((assignment, protocol_type, protocol)) => SyncGroupResponse::default()
            .with_assignment(assignment)
            .with_protocol_type(Some(string(&protocol_type)))
            .with_protocol_name(Some(string(&protocol))),
        Err(code) => SyncGroupResponse::default().with_error_code(code),
    }
}

pub(super) fn heartbeat(context: &Context, request: HeartbeatRequest) -> HeartbeatResponse {
    HeartbeatResponse::default().with_error_code(context.broker.kafka_members().heartbeat(
        request.group_id.0.as_str(),
        request.member_id.as_str(),
        request.generation_id,
    ))
}

pub(super) fn leave(
    context: &Context,
    request: LeaveGroupRequest,
    version: i16,
) -> LeaveGroupResponse {
    let group = request.group_id.0.as_str();
    if version <= 2 {
        return LeaveGroupResponse::default().with_error_code(
            context
                .broker
                .kafka_members()
                .leave(group, request.member_id.as_str()),
        );
    }
    let members = request
        .members
        .into_iter()
        .map(|m| {
            let code = context
                .broker
                .kafka_members()
                .leave(group, m.member_id.as_str());
            leave_group_response::MemberResponse::default()
                .with_member_id(m.member_id)
                .with_group_instance_id(m.group_instance_id)
                .with_error_code(code)
        })
        .collect();
    LeaveGroupResponse::default().with_members(members)
}

pub(super) fn describe(
    context: &Context,
    request: DescribeGroupsRequest,
) -> DescribeGroupsResponse {
    let listed = list_groups(&context.broker);
    let strata: HashMap<&str, GroupState> =
        listed.iter().map(|g| (g.name.as_str(), g.state)).collect();
    let groups = request
        .groups
        .into_iter()
        .map(|name| {
            let described = describe_groups_response::DescribedGroup::default()
                .with_group_id(name.clone())
                .with_protocol_type(StrBytes::from_static_str("consumer"));
            if let Some(view) = context.broker.kafka_members().describe(name.0.as_str()) {
                let members = view
                    .members
                    .into_iter()
                    .map(|m| {
                        describe_groups_response::DescribedGroupMember::default()
                            .with_member_id(string(&m.id))
                            .with_client_id(string(&m.client_id))
                            .with_client_host(string(&m.client_host))
                            .with_member_metadata(m.metadata)
                            .with_member_assignment(m.assignment)
                    })
                    .collect();
                return described
                    .with_group_state(StrBytes::from_static_str(view.state))
                    .with_protocol_type(string(&view.protocol_type))
                    .with_protocol_data(string(&view.protocol))
                    .with_members(members);
            }
            // A group of gRPC members, or with committed offsets only; members of the
            // gRPC protocol have no Kafka metadata to show.
            let state = match strata.get(name.0.as_str()) {
                Some(GroupState::Empty) => "Empty",
                Some(GroupState::Stable) => "Stable",
                Some(_) => "PreparingRebalance",
                None => "Dead",
            };
            described.with_group_state(StrBytes::from_static_str(state))
        })
        .collect();
    DescribeGroupsResponse::default().with_groups(groups)
}
