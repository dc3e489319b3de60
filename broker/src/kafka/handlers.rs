//! One function per Kafka API: decode the request, call the domain, build the
//! response for the negotiated version.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use kafka_protocol::messages::{
    api_versions_response, create_topics_response, delete_topics_response, fetch_request,
    fetch_response, list_offsets_response, metadata_response, produce_response, ApiKey,
    ApiVersionsRequest, BrokerId, CreateTopicsRequest, CreateTopicsResponse, DeleteTopicsRequest,
    DeleteTopicsResponse, FetchRequest, FetchResponse, InitProducerIdRequest,
    InitProducerIdResponse, ListOffsetsRequest, ListOffsetsResponse, MetadataRequest,
    MetadataResponse, ProduceRequest, ProduceResponse, TopicName,
};
use kafka_protocol::messages::{
    describe_configs_response, DescribeConfigsRequest, DescribeConfigsResponse,
    DescribeGroupsRequest, FindCoordinatorRequest, HeartbeatRequest, JoinGroupRequest,
    LeaveGroupRequest, ListGroupsRequest, OffsetCommitRequest, OffsetFetchRequest,
    SyncGroupRequest,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kafka_protocol::ResponseError as K;
use strata_storage::batch::batches;
use tokio::task::JoinSet;

use super::{errors, groups, guard, versions, Context, NODE_ID};
use crate::broker::{blocking, Broker};
use crate::error::{Error, Result};
use crate::topics::partition::{Ack, Partition};
use crate::topics::settings::{TopicOverrides, TopicSettings};

/// Largest Fetch response (soft: the first batch is always whole); Kafka clients ask
/// for up to 50 MiB.
pub const FETCH_BYTES_MAX: usize = 8 << 20;
/// Longest a Fetch waits for `min_bytes`.
pub const FETCH_WAIT_MAX: Duration = Duration::from_secs(30);
/// Largest response body the listener encodes, as large as the largest request frame:
/// a Fetch is at most 8 MiB, and only a DescribeGroups of many groups with large member
/// metadata, or a Metadata of over a million partitions, comes near it.
pub const RESPONSE_BYTES_MAX: usize = 64 << 20;
/// The cluster id Metadata reports: one node, one cluster.
const CLUSTER_ID: &str = "strata";

/// Who sent a request, and since when it is being served.
#[derive(Debug)]
pub(super) struct Client {
    /// The client id of the request header.
    pub id: String,
    /// `/<ip>`, as Kafka shows a member's host.
    pub host: String,
    /// When serving started; restarted after a long poll's or a rebalance's wait, which
    /// are not the broker's latency.
    pub clock: tokio::time::Instant,
    /// The answer's share of the fetch memory budget, held until it is written.
    pub memory: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The request frame's share of the request budget; see [`Client::decoded`].
    pub frame: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Client {
    /// Gives the frame's share of the request budget back, once the request was
    /// decoded into owned state whose size other bounds hold (the guard's and the
    /// group limits) and the frame itself is dropped: a request that then waits (a
    /// JoinGroup or SyncGroup for the other members, a Fetch's long poll) does not keep
    /// other clients' requests waiting for the budget.
    fn decoded(&mut self, frame: Bytes) {
        drop(frame);
        self.frame = None;
    }
}

/// Decodes the request of `api`, serves it and encodes the answer after `out`'s length
/// prefix; false when the request gets no answer (acks=0).
pub(super) async fn dispatch(
    context: &Context,
    client: &mut Client,
    api: ApiKey,
    version: i16,
    mut body: Bytes,
    correlation_id: i32,
    out: &mut BytesMut,
) -> Result<bool, String> {
    macro_rules! decode {
        ($t:ty) => {
            <$t>::decode(&mut body, version)
                .map_err(|e| format!("invalid {api:?} v{version} request: {e}"))?
        };
    }
    let broker = &context.broker;
    match api {
        ApiKey::ApiVersions => {
            let _request = decode!(ApiVersionsRequest);
            let answer: api_versions_response::ApiVersionsResponse = versions::api_versions(0);
            encode(out, correlation_id, api, version, &answer)?;
        }
        ApiKey::Metadata => {
            let request = decode!(MetadataRequest);
            if let Some(topics) = &request.topics {
                let names = topics
                    .iter()
                    .filter_map(|t| Some(t.name.as_ref()?.0.as_str()));
                guard::topics("Metadata", named(names))?;
            }
            let answer = metadata(context, request, version).await;
            encode(out, correlation_id, api, version, &answer)?;
        }
        ApiKey::Produce => {
            let request = decode!(ProduceRequest);
            guard::topics(
                "Produce",
                request
                    .topic_data
                    .iter()
                    .map(|t| (t.name.0.as_str(), t.partition_data.iter().map(|p| p.index))),
            )?;
            let acks = request.acks;
            let answer = produce(broker, request, &mut client.frame).await;
            if acks == 0 {
                return Ok(false);
            }
            encode(out, correlation_id, api, version, &answer)?;
        }
        ApiKey::Fetch => {
            let request = decode!(FetchRequest);
            guard::topics(
                "Fetch",
                request
                    .topics
                    .iter()
                    .map(|t| (t.topic.0.as_str(), t.partitions.iter().map(|p| p.partition))),
            )?;
            // Only what the answer needs, copied out of the frame: the long poll holds
            // neither the frame nor its budget.
            let request = owned_fetch(request);
            client.decoded(body);
            let answer = fetch(broker, &context.fetch_budget, request, client).await;
            encode(out, correlation_id, api, version, &answer)?;
        }
        ApiKey::ListOffsets => {
            let request = decode!(ListOffsetsRequest);
            guard::topics(
                "ListOffsets",
                request.topics.iter().map(|t| {
                    (
                        t.name.0.as_str(),
                        t.partitions.iter().map(|p| p.partition_index),
                    )
                }),
            )?;
            let answer = list_offsets(broker, request).await;
            encode(out, correlation_id, api, version, &answer)?;
        }
        ApiKey::CreateTopics => {
            let request = decode!(CreateTopicsRequest);
            guard::topics(
                "CreateTopics",
                named(request.topics.iter().map(|t| t.name.0.as_str())),
            )?;
            let answer = create_topics(context, request).await;
            encode(out, correlation_id, api, version, &answer)?;
        }
        ApiKey::DeleteTopics => {
            let request = decode!(DeleteTopicsRequest);
            let names = request
                .topic_names
                .iter()
                .chain(request.topics.iter().filter_map(|t| t.name.as_ref()));
            guard::topics("DeleteTopics", named(names.map(|n| n.0.as_str())))?;
            let answer = delete_topics(context, request, version).await;
            encode(out, correlation_id, api, version, &answer)?;
        }
        ApiKey::InitProducerId => {
            let answer = init_producer_id(broker, decode!(InitProducerIdRequest)).await;
            encode(out, correlation_id, api, version, &answer)?;
        }
        ApiKey::FindCoordinator => {
            let answer =
                groups::find_coordinator(context, decode!(FindCoordinatorRequest), version);
            encode(out, correlation_id, api, version, &answer)?;
        }
        ApiKey::OffsetCommit => {
            let request = decode!(OffsetCommitRequest);
            guard::id("group id", request.group_id.0.as_str())?;
            guard::id("member id", request.member_id.as_str())?;
            guard::topics(
                "OffsetCommit",
                request.topics.iter().map(|t| {
                    (
                        t.name.0.as_str(),
                        t.partitions.iter().map(|p| p.partition_index),
                    )
                }),
            )?;
            let answer = groups::offset_commit(context, request).await;
            encode(out, correlation_id, api, version, &answer)?;
        }
        ApiKey::OffsetFetch => {
            let request = decode!(OffsetFetchRequest);
            guard::id("group id", request.group_id.0.as_str())?;
            if let Some(topics) = &request.topics {
                guard::topics(
                    "OffsetFetch",
                    topics
                        .iter()
                        .map(|t| (t.name.0.as_str(), t.partition_indexes.iter().copied())),
                )?;
            }
            let answer = groups::offset_fetch(broker, request, version);
            encode(out, correlation_id, api, version, &answer)?;
        }
        ApiKey::ListGroups => {
            let answer = groups::list(context, decode!(ListGroupsRequest));
            encode(out, correlation_id, api, version, &answer)?;
        }
        ApiKey::JoinGroup => {
            let request = decode!(JoinGroupRequest);
            guard::join(&request, &client.id)?;
            let join = groups::joining(client, request, version);
            client.decoded(body);
            let answer = groups::join(context, join).await;
            client.clock = tokio::time::Instant::now();
            encode(out, correlation_id, api, version, &answer)?;
        }
        ApiKey::SyncGroup => {
            let request = decode!(SyncGroupRequest);
            guard::sync(&request)?;
            let sync = groups::syncing(request);
            client.decoded(body);
            let answer = groups::sync(context, sync).await;
            client.clock = tokio::time::Instant::now();
            encode(out, correlation_id, api, version, &answer)?;
        }
        ApiKey::Heartbeat => {
            let request = decode!(HeartbeatRequest);
            guard::id("group id", &request.group_id.0)?;
            guard::id("member id", &request.member_id)?;
            let answer = groups::heartbeat(context, request);
            encode(out, correlation_id, api, version, &answer)?;
        }
        ApiKey::LeaveGroup => {
            let request = decode!(LeaveGroupRequest);
            guard::id("group id", &request.group_id.0)?;
            guard::id("member id", &request.member_id)?;
            for member in &request.members {
                guard::id("member id", &member.member_id)?;
            }
            let answer = groups::leave(context, request, version);
            encode(out, correlation_id, api, version, &answer)?;
        }
        ApiKey::DescribeGroups => {
            let request = decode!(DescribeGroupsRequest);
            guard::groups(
                "DescribeGroups",
                request.groups.iter().map(|g| g.0.as_str()),
            )?;
            let answer = groups::describe(context, request);
            encode(out, correlation_id, api, version, &answer)?;
        }
        ApiKey::DescribeConfigs => {
            let request = decode!(DescribeConfigsRequest);
            // Each resource answers with all its settings: named twice, or beyond the
            // topics there are, a small request would build a large answer.
            guard::topics(
                "DescribeConfigs",
                named(request.resources.iter().map(|r| r.resource_name.as_str())),
            )?;
            let answer = describe_configs(broker, request);
            encode(out, correlation_id, api, version, &answer)?;
        }
        other => return Err(format!("{other:?} has no handler")),
    }
    Ok(true)
}

/// Names without partitions, for [`guard::topics`].
fn named<'a>(
    names: impl Iterator<Item = &'a str>,
) -> std::vec::IntoIter<(&'a str, std::iter::Empty<i32>)> {
    names
        .map(|name| (name, std::iter::empty()))
        .collect::<Vec<_>>()
        .into_iter()
}

/// Encodes `body` after `out`'s length prefix ([`super::encode`]), unless it would
/// take more than [`RESPONSE_BYTES_MAX`]: then the request is refused (its connection
/// closed) before any of it is encoded.
fn encode<T: Encodable>(
    out: &mut BytesMut,
    correlation_id: i32,
    api: ApiKey,
    version: i16,
    body: &T,
) -> Result<(), String> {
    let size = body
        .compute_size(version)
        .map_err(|e| format!("cannot size the {api:?} v{version} response: {e}"))?;
    if size > RESPONSE_BYTES_MAX {
        return Err(format!(
            "the {api:?} response would be {size} bytes, more than {RESPONSE_BYTES_MAX}; \
             ask for fewer topics or groups per request"
        ));
    }
    super::encode(out, correlation_id, api, version, body)
}

fn name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_string()))
}

async fn metadata(context: &Context, request: MetadataRequest, version: i16) -> MetadataResponse {
    let broker = &context.broker;
    // v0-3 have no flag: Kafka treats them as allowing it.
    let may_create =
        context.auto_create_topics && (version < 4 || request.allow_auto_topic_creation);
    // v0: an empty list means every topic; v1+: null means every topic, [] none.
    let wanted: Option<Vec<Option<String>>> = match request.topics {
        Some(topics) if version >= 1 || !topics.is_empty() => Some(
            topics
                .into_iter()
                .map(|t| t.name.map(|n| n.0.to_string()))
                .collect(),
        ),
        _ => None,
    };
    let describe = |topic: &crate::broker::Topic| {
        metadata_response::MetadataResponseTopic::default()
            .with_name(Some(name(&topic.name)))
            .with_partitions(
                (0..topic.partitions().len() as i32)
                    .map(|p| {
                        metadata_response::MetadataResponsePartition::default()
                            .with_partition_index(p)
                            .with_leader_id(BrokerId(NODE_ID))
                            .with_leader_epoch(-1)
                            .with_replica_nodes(vec![BrokerId(NODE_ID)])
                            .with_isr_nodes(vec![BrokerId(NODE_ID)])
                    })
                    .collect(),
            )
    };
    let topics = match wanted {
        None => broker.topics().iter().map(|t| describe(t)).collect(),
        Some(names) => {
            let mut topics = Vec::with_capacity(names.len());
            for wanted in names {
                topics.push(match wanted {
                    // v10+ may ask by topic id only; Strata has no Kafka topic ids yet.
                    None => metadata_response::MetadataResponseTopic::default()
                        .with_error_code(K::UnknownTopicId.code()),
                    Some(wanted) => match find_or_create(context, &wanted, may_create).await {
                        Ok(topic) => describe(&topic),
                        Err(e) => metadata_response::MetadataResponseTopic::default()
                            .with_name(Some(name(&wanted)))
                            .with_error_code(match e {
                                Error::InvalidArgument(_) => K::InvalidTopicException.code(),
                                e => errors::code(&e),
                            }),
                    },
                });
            }
            topics
        }
    };
    MetadataResponse::default()
        .with_brokers(vec![metadata_response::MetadataResponseBroker::default()
            .with_node_id(BrokerId(NODE_ID))
            .with_host(StrBytes::from_string(context.host.clone()))
            .with_port(context.port)])
        .with_cluster_id(Some(StrBytes::from_static_str(CLUSTER_ID)))
        .with_controller_id(BrokerId(NODE_ID))
        .with_topics(topics)
}

/// The topic `name`; when it does not exist and `create`, creates it with the broker's
/// defaults (a concurrent creation of the same topic is fine).
async fn find_or_create(
    context: &Context,
    name: &str,
    create: bool,
) -> Result<Arc<crate::broker::Topic>> {
    let broker = &context.broker;
    match broker.topic(name) {
        Err(Error::TopicNotFound(_)) if create => {
            let creating = Arc::clone(broker);
            let topic = name.to_string();
            let created = context
                .admin
                .run(blocking(move || {
                    let settings = creating.defaults().clone();
                    creating.create_topic(&topic, settings)
                }))
                .await
                .unwrap_or(Err(Error::ShuttingDown));
            match created {
                Ok(topic) => {
                    tracing::info!(topic = %topic.name, partitions = topic.settings.partitions, "created topic (kafka auto-creation)");
                    Ok(topic)
                }
                Err(Error::TopicExists(_)) => broker.topic(name),
                Err(e) => Err(e),
            }
        }
        found => found,
    }
}

/// A partition of a request, or the error to answer for it.
fn find_partition(broker: &Broker, topic: &str, partition: i32) -> Result<Arc<Partition>> {
    let id = u32::try_from(partition).map_err(|_| Error::PartitionNotFound {
        topic: topic.to_string(),
        partition: u32::MAX,
        partitions: broker.partition_count(topic).unwrap_or(0),
    })?;
    broker.partition(topic, id)
}

/// Serves a Produce; each batch handed to a partition's writer takes its size out of
/// `frame` (the frame's share of the request budget) with it.
async fn produce(
    broker: &Arc<Broker>,
    request: ProduceRequest,
    frame: &mut Option<tokio::sync::OwnedSemaphorePermit>,
) -> ProduceResponse {
    let ack = match request.acks {
        0 | 1 => Ok(Ack::Leader),
        -1 => Ok(Ack::Durable),
        other => Err(StrBytes::from_string(format!(
            "acks must be 0, 1 or -1 (all), got {other}"
        ))),
    };
    // Partitions are written concurrently: each waits for its own commit. Each topic
    // entry is resolved once; a partition that does not exist is answered here, without
    // a task (the guard refused repeated topics and partitions, so tasks are at most
    // the partitions that exist).
    let mut appends = JoinSet::new();
    let mut responses: Vec<produce_response::TopicProduceResponse> = Vec::new();
    for (t, topic) in request.topic_data.into_iter().enumerate() {
        let found = ack.is_ok().then(|| broker.topic(topic.name.0.as_str()));
        let mut partitions = Vec::with_capacity(topic.partition_data.len());
        for (p, data) in topic.partition_data.into_iter().enumerate() {
            let mut response = produce_response::PartitionProduceResponse::default()
                .with_index(data.index)
                .with_base_offset(-1)
                .with_log_append_time_ms(-1)
                .with_log_start_offset(-1);
            let partition = found
                .as_ref()
                .and_then(|found| found.as_ref().ok())
                .and_then(|found| found.partitions().get(usize::try_from(data.index).ok()?));
            match (&ack, partition) {
                (Err(message), _) => {
                    response.error_code = K::InvalidRequiredAcks.code();
                    response.error_message = Some(message.clone());
                }
                (Ok(ack), Some(partition)) => {
                    // Until the task reports: a task that panics leaves this answer.
                    response.error_code = K::UnknownServerError.code();
                    let (broker, partition, ack) =
                        (Arc::clone(broker), Arc::clone(partition), *ack);
                    let size = data.records.as_ref().map_or(0, |r| r.len());
                    let share = frame.as_mut().and_then(|frame| frame.split(size));
                    appends.spawn(async move {
                        let stored = append(&broker, &partition, data.records, ack, share).await;
                        (t, p, stored)
                    });
                }
                (Ok(_), None) => response.error_code = K::UnknownTopicOrPartition.code(),
            }
            partitions.push(response);
        }
        if let Some(Err(e)) = &found {
            errors::count(broker.metrics(), "Produce", e);
        }
        responses.push(
            produce_response::TopicProduceResponse::default()
                .with_name(topic.name)
                .with_partition_responses(partitions),
        );
    }
    while let Some(done) = appends.join_next().await {
        let Ok((t, p, stored)) = done else { continue };
        let response = &mut responses[t].partition_responses[p];
        match stored {
            Ok((base_offset, log_start_offset)) => {
                response.error_code = 0;
                response.base_offset = base_offset;
                response.log_start_offset = log_start_offset;
            }
            Err(e) => {
                tracing::debug!(error = %e, "kafka produce refused");
                errors::count(broker.metrics(), "Produce", &e);
                response.error_code = errors::code(&e);
                response.error_message = errors::message(&e);
            }
        }
    }
    ProduceResponse::default().with_responses(responses)
}

/// Stores one partition's batch; returns its base offset and the log start offset.
async fn append(
    broker: &Broker,
    partition: &Partition,
    records: Option<Bytes>,
    ack: Ack,
    share: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Result<(i64, i64)> {
    let batch = records
        .filter(|r| !r.is_empty())
        .ok_or_else(|| Error::InvalidArgument("the produce request holds no records".into()))?;
    if let Ok(header) = strata_storage::batch::BatchHeader::parse(&batch) {
        broker.check_producer_id(header.producer_id)?;
    }
    // The batch is a slice of the request frame: queued, it keeps the frame alive even
    // after a client that disconnected mid-produce is gone. Its share of the frame's
    // request budget goes with it and is released when the writer is done with it, so
    // a client cannot reconnect and resend beyond the budget while a slow disk still
    // holds its earlier frames (the rest of the frame, its names and headers, which the
    // guard bounds, is released when the request ends).
    let stored = partition.append(batch, ack, share).await?;
    Ok((
        stored.info.base_offset as i64,
        partition.reader().earliest_offset() as i64,
    ))
}

/// The part of a Fetch request [`fetch`] uses, copied out of the request frame (whose
/// topic names it would otherwise share): its size is bounded by the guard's topic and
/// partition bounds, not by the frame.
fn owned_fetch(request: FetchRequest) -> FetchRequest {
    let topics = request
        .topics
        .into_iter()
        .map(|topic| {
            fetch_request::FetchTopic::default()
                .with_topic(name(&topic.topic))
                .with_partitions(
                    topic
                        .partitions
                        .into_iter()
                        .map(|p| {
                            fetch_request::FetchPartition::default()
                                .with_partition(p.partition)
                                .with_fetch_offset(p.fetch_offset)
                                .with_partition_max_bytes(p.partition_max_bytes)
                        })
                        .collect(),
                )
        })
        .collect();
    FetchRequest::default()
        .with_max_wait_ms(request.max_wait_ms)
        .with_min_bytes(request.min_bytes)
        .with_max_bytes(request.max_bytes)
        .with_topics(topics)
}

/// Serves a Fetch; `client.memory` gets the answer's share of `budget` (the broker's
/// fetch memory budget), taken before each read and fitted to what was read. A long
/// poll holds none of it while it waits. The whole request, waits for the budget
/// included, takes at most its `max_wait_ms` (within [`FETCH_WAIT_MAX`]): when the
/// budget has no room by then, each asked partition is answered without records (its
/// high watermark and log start as usual) and the client fetches again.
async fn fetch(
    broker: &Arc<Broker>,
    budget: &Arc<tokio::sync::Semaphore>,
    request: FetchRequest,
    client: &mut Client,
) -> FetchResponse {
    // Read-committed readers stop at the last stable offset; without transactions that
    // is the high watermark, so both isolation levels read the same.
    let max_bytes = usize::try_from(request.max_bytes)
        .unwrap_or(0)
        .clamp(1, FETCH_BYTES_MAX);
    let min_bytes = usize::try_from(request.min_bytes).unwrap_or(0);
    let wait =
        Duration::from_millis(u64::try_from(request.max_wait_ms).unwrap_or(0)).min(FETCH_WAIT_MAX);
    let deadline = tokio::time::Instant::now() + wait;
    let answer = |response: (Vec<fetch_response::FetchableTopicResponse>, usize)| {
        FetchResponse::default()
            .with_session_id(0)
            .with_responses(response.0)
    };
    let Some(mut memory) = fetch_memory(budget, max_bytes, deadline).await else {
        return answer(read_fetch(broker, &request, None).await);
    };
    let mut response = read_fetch(broker, &request, Some(max_bytes)).await;
    // A partition asked past its high watermark waits too: its offset may be written
    // but not yet committed (an acks=0 or acks=1 produce just before), which Kafka
    // (reading up to its log end offset) serves after the wait, not as out of range.
    if response.1 < min_bytes.max(1) && !wait.is_zero() {
        // Long poll: wait until any asked partition gets data past its fetch offset,
        // polling their waits together in this task.
        let mut at_end = Vec::new();
        for topic in &request.topics {
            for p in &topic.partitions {
                if let (Ok(partition), Ok(offset)) = (
                    find_partition(broker, &topic.topic, p.partition),
                    u64::try_from(p.fetch_offset),
                ) {
                    if partition.reader().high_watermark() <= offset {
                        at_end.push((partition, offset));
                    }
                }
            }
        }
        if !at_end.is_empty() {
            // Nothing read is held through the wait (it is read again after it): the
            // memory budget is given back, so what it covered goes too.
            drop(memory);
            drop(std::mem::take(&mut response.0));
            let mut waits: Vec<_> = at_end
                .iter()
                .map(|(partition, offset)| Box::pin(partition.wait_past(*offset, wait)))
                .collect();
            let any = std::future::poll_fn(|cx| {
                if waits
                    .iter_mut()
                    .any(|w| std::future::Future::poll(w.as_mut(), cx).is_ready())
                {
                    std::task::Poll::Ready(())
                } else {
                    std::task::Poll::Pending
                }
            });
            let _ = tokio::time::timeout_at(deadline, any).await;
            drop(waits);
            client.clock = tokio::time::Instant::now();
            let Some(again) = fetch_memory(budget, max_bytes, deadline).await else {
                return answer(read_fetch(broker, &request, None).await);
            };
            memory = again;
            response = read_fetch(broker, &request, Some(max_bytes)).await;
        }
    }
    crate::grpc::service::fit(budget, &mut memory, response.1);
    client.memory = Some(memory);
    answer(response)
}

/// Takes `bytes` of the fetch memory budget, waiting until `deadline` at most for
/// responses being written to free it (each within the listeners' write limits);
/// `None` when it did not free in time (or the budget is closed, which it never is
/// while the listener serves).
async fn fetch_memory(
    budget: &Arc<tokio::sync::Semaphore>,
    bytes: usize,
    deadline: tokio::time::Instant,
) -> Option<tokio::sync::OwnedSemaphorePermit> {
    let permits = crate::grpc::service::fetch_permits(bytes);
    let taken = tokio::time::timeout_at(deadline, Arc::clone(budget).acquire_many_owned(permits))
        .await
        .ok()
        .and_then(|taken| taken.ok());
    if taken.is_none() {
        tracing::debug!(
            bytes,
            "a Kafka Fetch found no room in the fetch memory budget within its max_wait_ms; \
             answered without records"
        );
    }
    taken
}

/// One pass over the asked partitions: the topics' answers and the bytes they carry;
/// with `max_bytes` `None`, the answers without records.
async fn read_fetch(
    broker: &Arc<Broker>,
    request: &FetchRequest,
    max_bytes: Option<usize>,
) -> (Vec<fetch_response::FetchableTopicResponse>, usize) {
    let mut left = max_bytes.unwrap_or(0);
    let mut total = 0;
    let mut topics = Vec::with_capacity(request.topics.len());
    for topic in &request.topics {
        let mut partitions = Vec::with_capacity(topic.partitions.len());
        for p in &topic.partitions {
            let answer = fetch_response::PartitionData::default()
                .with_partition_index(p.partition)
                .with_aborted_transactions(Some(Vec::new()));
            let budget = usize::try_from(p.partition_max_bytes)
                .unwrap_or(0)
                .min(left);
            let read = fetch_partition(
                broker,
                &topic.topic,
                p.partition,
                p.fetch_offset,
                budget,
                // Past the budget only the first batch found, and none without one.
                total == 0 && max_bytes.is_some(),
            )
            .await;
            partitions.push(match read {
                Ok((records, high_watermark, log_start)) => {
                    left = left.saturating_sub(records.len());
                    total += records.len();
                    answer
                        .with_high_watermark(high_watermark)
                        .with_last_stable_offset(high_watermark)
                        .with_log_start_offset(log_start)
                        .with_records(Some(records))
                }
                Err((e, high_watermark, log_start)) => {
                    errors::count(broker.metrics(), "Fetch", &e);
                    answer
                        .with_error_code(errors::code(&e))
                        .with_high_watermark(high_watermark)
                        .with_last_stable_offset(high_watermark)
                        .with_log_start_offset(log_start)
                }
            });
        }
        topics.push(
            fetch_response::FetchableTopicResponse::default()
                .with_topic(topic.topic.clone())
                .with_partitions(partitions),
        );
    }
    (topics, total)
}

/// The stored batches from `offset` (the first whole even past `budget` when `first`),
/// the high watermark and the log start offset.
async fn fetch_partition(
    broker: &Broker,
    topic: &str,
    partition: i32,
    offset: i64,
    budget: usize,
    first: bool,
) -> std::result::Result<(Bytes, i64, i64), (Error, i64, i64)> {
    let partition = find_partition(broker, topic, partition).map_err(|e| (e, -1, -1))?;
    let reader = partition.reader().clone();
    let (hw, start) = (
        reader.high_watermark() as i64,
        reader.earliest_offset() as i64,
    );
    let from = u64::try_from(offset).map_err(|_| {
        (
            Error::OutOfRange(format!("negative fetch offset {offset}")),
            hw,
            start,
        )
    })?;
    if budget == 0 && !first {
        return Ok((Bytes::new(), hw, start));
    }
    let read = blocking(move || reader.read(from, budget.max(1)).map_err(Error::from))
        .await
        .map_err(|e| (e, hw, start))?;
    let mut bytes = read.batches;
    let mut next_offset = read.next_offset;
    if !first && bytes.len() > budget {
        // Past the first partition with data, only whole batches that fit.
        let mut fits = 0;
        while let Ok(header) = strata_storage::batch::BatchHeader::parse(&bytes[fits..]) {
            if fits + header.size > budget {
                next_offset = header.base_offset;
                break;
            }
            fits += header.size;
        }
        bytes.truncate(fits);
    }
    partition
        .stats()
        .fetched(next_offset.saturating_sub(from), bytes.len() as u64);
    Ok((
        Bytes::from(bytes),
        read.high_watermark as i64,
        read.earliest_offset as i64,
    ))
}

async fn list_offsets(broker: &Arc<Broker>, request: ListOffsetsRequest) -> ListOffsetsResponse {
    let mut topics = Vec::with_capacity(request.topics.len());
    for topic in request.topics {
        let mut partitions = Vec::with_capacity(topic.partitions.len());
        for p in topic.partitions {
            let answer = list_offsets_response::ListOffsetsPartitionResponse::default()
                .with_partition_index(p.partition_index)
                .with_leader_epoch(-1);
            partitions.push(
                match list_offset(broker, &topic.name, p.partition_index, p.timestamp).await {
                    Ok((offset, timestamp)) => answer.with_offset(offset).with_timestamp(timestamp),
                    Err(e) => {
                        errors::count(broker.metrics(), "ListOffsets", &e);
                        answer
                            .with_error_code(errors::code(&e))
                            .with_offset(-1)
                            .with_timestamp(-1)
                    }
                },
            );
        }
        topics.push(
            list_offsets_response::ListOffsetsTopicResponse::default()
                .with_name(topic.name)
                .with_partitions(partitions),
        );
    }
    ListOffsetsResponse::default().with_topics(topics)
}

/// Kafka's ListOffsets timestamps: -2 the log start, -1 the end (the high watermark,
/// which is also the last stable offset), t >= 0 the first record at or after t.
async fn list_offset(
    broker: &Broker,
    topic: &str,
    partition: i32,
    timestamp: i64,
) -> Result<(i64, i64)> {
    let reader = find_partition(broker, topic, partition)?.reader().clone();
    match timestamp {
        -2 => Ok((reader.earliest_offset() as i64, -1)),
        -1 => Ok((reader.high_watermark() as i64, -1)),
        t if t >= 0 => {
            blocking(move || {
                let Some(offset) = reader.offset_for_timestamp(t)?.found else {
                    return Ok((-1, -1));
                };
                // The found record's own timestamp, from the batch that holds it.
                let read = reader.read(offset, 1)?;
                let mut scratch = Vec::new();
                let found = batches(&read.batches)
                    .filter_map(|b| b.ok())
                    .find_map(|b| {
                        b.records_with(&mut scratch)
                            .ok()?
                            .filter_map(|r| r.ok())
                            .find(|r| r.offset == offset)
                            .map(|r| r.timestamp)
                    })
                    .unwrap_or(t);
                Ok((offset as i64, found))
            })
            .await
        }
        other => Err(Error::InvalidArgument(format!(
            "unsupported ListOffsets timestamp {other}: use -2 (earliest), -1 (latest) or a \
             time in ms"
        ))),
    }
}

/// The topic settings a CreateTopics topic asks for.
fn creatable(
    broker: &Broker,
    topic: &kafka_protocol::messages::create_topics_request::CreatableTopic,
) -> Result<TopicSettings, (i16, String)> {
    let invalid = |code: K, message: String| (code.code(), message);
    if !matches!(topic.replication_factor, -1 | 1) {
        return Err(invalid(
            K::InvalidReplicationFactor,
            format!(
                "replication factor {} is not possible: Strata is one node; use 1 or -1",
                topic.replication_factor
            ),
        ));
    }
    if !topic.assignments.is_empty() {
        return Err(invalid(
            K::InvalidReplicaAssignment,
            "manual replica assignments are not supported: Strata is one node".into(),
        ));
    }
    let mut overrides = TopicOverrides::default();
    for config in &topic.configs {
        let key = config.name.as_str();
        let value = config.value.as_ref().map(|v| v.as_str()).unwrap_or("");
        let bad = |e: &dyn std::fmt::Display| {
            invalid(K::InvalidConfig, format!("config {key}={value:?}: {e}"))
        };
        match key {
            "retention.ms" => overrides.retention_ms = Some(value.parse().map_err(|e| bad(&e))?),
            "retention.bytes" => {
                overrides.retention_bytes = Some(value.parse().map_err(|e| bad(&e))?)
            }
            "segment.bytes" => overrides.segment_bytes = Some(value.parse().map_err(|e| bad(&e))?),
            "segment.ms" => overrides.segment_ms = Some(value.parse().map_err(|e| bad(&e))?),
            "max.message.bytes" => {
                overrides.max_message_bytes = Some(value.parse().map_err(|e| bad(&e))?)
            }
            "cleanup.policy" if value == "delete" => {}
            _ => {
                return Err(invalid(
                    K::InvalidConfig,
                    format!(
                        "config {key}={value:?} is not supported; supported: retention.ms, \
                         retention.bytes, segment.bytes, segment.ms, max.message.bytes, \
                         cleanup.policy=delete"
                    ),
                ))
            }
        }
    }
    let partitions = match topic.num_partitions {
        -1 => broker.defaults().partitions,
        n => u32::try_from(n).unwrap_or(0),
    };
    if partitions == 0 {
        return Err(invalid(
            K::InvalidPartitions,
            format!(
                "partitions must be at least 1, got {}",
                topic.num_partitions
            ),
        ));
    }
    TopicSettings::from_request(partitions, overrides, broker.defaults()).map_err(|e| {
        let code = if e.to_string().contains("partitions") {
            K::InvalidPartitions
        } else {
            K::InvalidConfig
        };
        invalid(code, e.to_string())
    })
}

async fn create_topics(context: &Context, request: CreateTopicsRequest) -> CreateTopicsResponse {
    let broker = &context.broker;
    let mut results = Vec::with_capacity(request.topics.len());
    for topic in request.topics {
        let result = create_topics_response::CreatableTopicResult::default()
            .with_name(topic.name.clone())
            .with_num_partitions(-1)
            .with_replication_factor(-1);
        let settings = match creatable(broker, &topic) {
            Ok(settings) => settings,
            Err((code, message)) => {
                results.push(
                    result
                        .with_error_code(code)
                        .with_error_message(Some(StrBytes::from_string(message))),
                );
                continue;
            }
        };
        let topic_name = topic.name.0.to_string();
        let partitions = settings.partitions;
        let created = if request.validate_only {
            crate::topics::settings::validate_name(&topic_name).and_then(|()| {
                match broker.topic(&topic_name) {
                    Ok(_) => Err(Error::TopicExists(topic_name.clone())),
                    Err(_) => Ok(()),
                }
            })
        } else {
            let broker = Arc::clone(broker);
            let name = topic_name.clone();
            context
                .admin
                .run(blocking(move || {
                    broker.create_topic(&name, settings).map(|_| ())
                }))
                .await
                .unwrap_or(Err(Error::ShuttingDown))
        };
        results.push(match created {
            Ok(()) => {
                if !request.validate_only {
                    tracing::info!(topic = %topic_name, partitions, "created topic (kafka)");
                }
                result
                    .with_num_partitions(partitions as i32)
                    .with_replication_factor(1)
            }
            Err(e) => {
                errors::count(broker.metrics(), "CreateTopics", &e);
                let code = match &e {
                    Error::InvalidArgument(_) => K::InvalidTopicException.code(),
                    e => errors::code(e),
                };
                result
                    .with_error_code(code)
                    .with_error_message(errors::message(&e))
            }
        });
    }
    CreateTopicsResponse::default().with_topics(results)
}

async fn delete_topics(
    context: &Context,
    request: DeleteTopicsRequest,
    version: i16,
) -> DeleteTopicsResponse {
    let broker = &context.broker;
    let names: Vec<Option<TopicName>> = if version >= 6 {
        request.topics.into_iter().map(|t| t.name).collect()
    } else {
        request.topic_names.into_iter().map(Some).collect()
    };
    let mut results = Vec::with_capacity(names.len());
    for topic in names {
        let result =
            delete_topics_response::DeletableTopicResult::default().with_name(topic.clone());
        let Some(topic) = topic else {
            results.push(result.with_error_code(K::UnknownTopicId.code()));
            continue;
        };
        let name = topic.0.to_string();
        let deleted = delete_topic(context, name.clone()).await;
        results.push(match deleted {
            Ok(()) => {
                tracing::info!(topic = %name, "deleted topic (kafka)");
                result
            }
            Err(e) => {
                errors::count(broker.metrics(), "DeleteTopics", &e);
                let message = if version >= 5 {
                    errors::message(&e)
                } else {
                    None
                };
                result
                    .with_error_code(errors::code(&e))
                    .with_error_message(message)
            }
        });
    }
    DeleteTopicsResponse::default().with_responses(results)
}

/// Deletes a topic and its groups' offsets, as the gRPC DeleteTopic does, in a task of
/// its own so a closed connection cannot stop it between the two.
async fn delete_topic(context: &Context, name: String) -> Result<()> {
    let broker = Arc::clone(&context.broker);
    context
        .admin
        .run(async move {
            let deleting = Arc::clone(&broker);
            let deleted = name.clone();
            blocking(move || deleting.delete_topic(&deleted)).await?;
            broker
                .coordinator()
                .topic_deleted(&name, &|t| broker.partition_count(t));
            broker.offsets().delete_topic(&name).await
        })
        .await
        .unwrap_or(Err(Error::ShuttingDown))
}

async fn init_producer_id(
    broker: &Arc<Broker>,
    request: InitProducerIdRequest,
) -> InitProducerIdResponse {
    let answer = InitProducerIdResponse::default()
        .with_producer_id((-1).into())
        .with_producer_epoch(-1);
    if request.transactional_id.is_some() {
        tracing::info!(
            "refused InitProducerId with a transactional id: transactions are not supported"
        );
        return answer.with_error_code(K::TransactionalIdAuthorizationFailed.code());
    }
    let allocating = Arc::clone(broker);
    match blocking(move || allocating.allocate_producer_id()).await {
        Ok(id) => {
            tracing::debug!(producer_id = id, "handed out a producer id (kafka)");
            answer.with_producer_id(id.into()).with_producer_epoch(0)
        }
        Err(e) => answer.with_error_code(errors::code(&e)),
    }
}

/// Kafka's resource types in DescribeConfigs.
const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
/// `config_source` of a topic's own setting.
const SOURCE_TOPIC: i8 = 1;

/// A topic's settings under their Kafka names (read-only: there is no AlterConfigs).
fn topic_configs(settings: &TopicSettings) -> Vec<(&'static str, String)> {
    let limit = |v: Option<u64>| v.map_or_else(|| "-1".to_string(), |v| v.to_string());
    vec![
        ("cleanup.policy", "delete".to_string()),
        ("retention.ms", limit(settings.retention_ms)),
        ("retention.bytes", limit(settings.retention_bytes)),
        ("segment.bytes", settings.segment_bytes.to_string()),
        ("segment.ms", limit(settings.segment_ms)),
        ("max.message.bytes", settings.max_message_bytes.to_string()),
    ]
}

fn describe_configs(broker: &Broker, request: DescribeConfigsRequest) -> DescribeConfigsResponse {
    let results = request
        .resources
        .into_iter()
        .map(|resource| {
            let result = describe_configs_response::DescribeConfigsResult::default()
                .with_resource_type(resource.resource_type)
                .with_resource_name(resource.resource_name.clone());
            let configs = match resource.resource_type {
                RESOURCE_TOPIC => match broker.topic(resource.resource_name.as_str()) {
                    Ok(topic) => topic_configs(&topic.settings),
                    Err(e) => {
                        return result
                            .with_error_code(errors::code(&e))
                            .with_error_message(errors::message(&e))
                    }
                },
                // The broker's own settings are not exposed over Kafka.
                RESOURCE_BROKER => Vec::new(),
                other => {
                    return result
                        .with_error_code(K::InvalidRequest.code())
                        .with_error_message(Some(StrBytes::from_string(format!(
                            "resource type {other} is not supported: ask for topics (2) or \
                             the broker (4)"
                        ))))
                }
            };
            let wanted = |name: &str| {
                resource
                    .configuration_keys
                    .as_ref()
                    .is_none_or(|keys| keys.iter().any(|k| k.as_str() == name))
            };
            result.with_configs(
                configs
                    .into_iter()
                    .filter(|(name, _)| wanted(name))
                    .map(|(name, value)| {
                        describe_configs_response::DescribeConfigsResourceResult::default()
                            .with_name(StrBytes::from_static_str(name))
                            .with_value(Some(StrBytes::from_string(value)))
                            .with_read_only(true)
                            .with_config_source(SOURCE_TOPIC)
                    })
                    .collect(),
            )
        })
        .collect();
    DescribeConfigsResponse::default().with_results(results)
}
