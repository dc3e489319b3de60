//! The gRPC services. Handlers validate requests, move blocking work (directory changes,
//! file reads) off the async runtime, and convert errors to statuses in one place
//! ([`crate::error`]).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use strata_proto::v1::{self, admin_server, broker_server};
use strata_storage::batch::{batches, Batch, BatchBuilder, BatchHeader};
use strata_storage::{now_ms, ReadResult};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::broker::{Broker, Topic};
use crate::error::{Error, Result};
use crate::grpc::groups;
use crate::grpc::instrument::Scope;
use crate::topics::partition::{Ack, Partition};
use crate::topics::settings::{TopicOverrides, TopicSettings};

/// Fetch size when a request leaves max_bytes at 0.
pub const FETCH_BYTES_DEFAULT: usize = 1 << 20;
/// Largest fetch response; clients must accept messages of this size plus one batch.
pub const FETCH_BYTES_MAX: usize = 8 << 20;
/// Bytes of produce batches queued or being written at once, broker-wide.
pub const PRODUCE_BUDGET_BYTES: usize = 512 << 20;
/// Longest a fetch may wait for data.
pub const FETCH_WAIT_MAX: Duration = Duration::from_secs(30);

/// Implements both gRPC services over one broker.
#[derive(Debug, Clone)]
pub struct Service {
    broker: Arc<Broker>,
    /// Set when the server starts shutting down: long polls answer and Subscribe streams
    /// end, so a graceful shutdown does not wait for them.
    stopping: Arc<tokio::sync::watch::Sender<bool>>,
    /// Bytes of produce batches the broker holds between decoding and acknowledging,
    /// across all partitions: producers beyond it wait (back-pressure), so memory stays
    /// bounded however many of them there are.
    produce_budget: Arc<tokio::sync::Semaphore>,
}

impl Service {
    /// Services over `broker`.
    pub fn new(broker: Arc<Broker>) -> Service {
        let (stopping, _) = tokio::sync::watch::channel(false);
        Service {
            broker,
            stopping: Arc::new(stopping),
            produce_budget: Arc::new(tokio::sync::Semaphore::new(PRODUCE_BUDGET_BYTES)),
        }
    }

    /// The broker the services run on.
    pub(crate) fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Starts recording a request of `rpc`.
    pub(crate) fn scope(&self, rpc: &'static str) -> Scope {
        Scope::new(self.broker.metrics(), rpc)
    }

    /// Ends waiting: pending long polls answer with what they have and Subscribe
    /// streams end with UNAVAILABLE. Call when a graceful shutdown begins.
    pub fn stop_waiting(&self) {
        self.stopping.send_replace(true);
    }

    /// Resolves once [`Service::stop_waiting`] has been called.
    fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut stopping = self.stopping.subscribe();
        async move {
            let _ = stopping.wait_for(|&stopping| stopping).await;
        }
    }
}

impl Service {
    /// Serves a produce; the scope learns the partition once it is chosen.
    async fn serve_produce(
        &self,
        mut request: v1::ProduceRequest,
        scope: &mut Scope,
    ) -> Result<v1::ProduceResponse> {
        let topic = self.broker.topic(&request.topic)?;
        let partition_id = target_partition(&topic, &request)?;
        scope.set_partition(partition_id);
        let batch = match (request.batch.is_empty(), request.records.is_empty()) {
            (false, false) => {
                return Err(Error::InvalidArgument(
                    "send either records or an encoded batch, not both".into(),
                ))
            }
            (true, true) => {
                return Err(Error::InvalidArgument(
                    "the request holds no records".into(),
                ))
            }
            (false, true) => std::mem::take(&mut request.batch),
            (true, false) => {
                encode_records(&request.records, topic.settings.max_message_bytes as usize)?.into()
            }
        };
        let ack = match v1::Acks::try_from(request.acks) {
            Ok(v1::Acks::Durable) => Ack::Durable,
            Ok(v1::Acks::Leader) => Ack::Leader,
            Err(_) => {
                return Err(Error::InvalidArgument(format!(
                    "unknown acks mode {}",
                    request.acks
                )))
            }
        };
        // An unparsable header is left for the writer's validation to report.
        if let Ok(header) = BatchHeader::parse(&batch) {
            self.broker.check_producer_id(header.producer_id)?;
        }
        // A batch is at most MESSAGE_BYTES_CAP, far below the budget, so this never
        // waits for more permits than exist.
        let permits = u32::try_from(batch.len()).unwrap_or(u32::MAX);
        let _budget = self
            .produce_budget
            .acquire_many(permits)
            .await
            .map_err(|_| Error::ShuttingDown)?;
        let stored = topic.partition(partition_id)?.append(batch, ack).await?;
        Ok(v1::ProduceResponse {
            partition: partition_id,
            base_offset: stored.info.base_offset,
            last_offset: stored.info.last_offset,
            duplicate: stored.duplicate,
        })
    }

    /// Serves a fetch; the scope's clock restarts after a long poll's wait.
    async fn serve_fetch(
        &self,
        request: v1::FetchRequest,
        scope: &mut Scope,
    ) -> Result<v1::FetchResponse> {
        let partition = self.broker.partition(&request.topic, request.partition)?;
        if let Some(member) = &request.member {
            groups::check_fetch(&self.broker, member, &request.topic, request.partition)?;
        }
        let wait = Duration::from_millis(request.max_wait_ms.into()).min(FETCH_WAIT_MAX);
        if !wait.is_zero() && partition.reader().high_watermark() == request.offset {
            tokio::select! {
                _ = partition.wait_past(request.offset, wait) => {}
                _ = self.stopped() => {}
            }
            scope.restart_clock();
            // The member may have lost the partition while it waited.
            if let Some(member) = &request.member {
                groups::check_fetch(&self.broker, member, &request.topic, request.partition)?;
            }
        }
        let max_bytes = fetch_bytes(request.max_bytes);
        let read = read(&partition, request.offset, max_bytes).await?;
        let response = fetch_response(
            request.partition,
            request.offset,
            read,
            request.decode,
            max_bytes,
        )?;
        count_fetched(&partition, request.offset, &response);
        Ok(response)
    }
}

/// Counts what a fetch response hands out: offsets are dense, so the records from the
/// requested offset to the next one.
fn count_fetched(partition: &Partition, from: u64, response: &v1::FetchResponse) {
    let bytes = response.batches.len()
        + response
            .records
            .iter()
            .map(|r| r.value.as_ref().map_or(0, Bytes::len) + r.key.as_ref().map_or(0, Bytes::len))
            .sum::<usize>();
    partition
        .stats()
        .fetched(response.next_offset.saturating_sub(from), bytes as u64);
}

/// Runs blocking broker work on the blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| Error::ShuttingDown)?
}

fn overrides(c: v1::TopicConfig) -> TopicOverrides {
    TopicOverrides {
        retention_ms: c.retention_ms,
        retention_bytes: c.retention_bytes,
        segment_bytes: c.segment_bytes,
        segment_ms: c.segment_ms,
        max_message_bytes: c.max_message_bytes,
        durability: c.durability,
    }
}

fn topic_config(settings: &TopicSettings) -> v1::TopicConfig {
    let o = settings.overrides();
    v1::TopicConfig {
        retention_ms: o.retention_ms,
        retention_bytes: o.retention_bytes,
        segment_bytes: o.segment_bytes,
        segment_ms: o.segment_ms,
        max_message_bytes: o.max_message_bytes,
        durability: o.durability,
    }
}

fn topic_info(topic: &Topic) -> v1::TopicInfo {
    v1::TopicInfo {
        name: topic.name.clone(),
        partitions: topic.settings.partitions,
        config: Some(topic_config(&topic.settings)),
    }
}

#[tonic::async_trait]
impl admin_server::Admin for Service {
    async fn create_topic(
        &self,
        request: Request<v1::CreateTopicRequest>,
    ) -> Result<Response<v1::CreateTopicResponse>, Status> {
        let request = request.into_inner();
        let scope = self.scope("CreateTopic").topic(&request.name);
        scope.finish(
            async {
                let settings = TopicSettings::from_request(
                    request.partitions,
                    request.config.map(overrides).unwrap_or_default(),
                    self.broker.defaults(),
                )?;
                let broker = Arc::clone(&self.broker);
                let topic = blocking(move || broker.create_topic(&request.name, settings)).await?;
                tracing::info!(topic = %topic.name, partitions = topic.settings.partitions, "created topic");
                Ok(v1::CreateTopicResponse {
                    topic: Some(topic_info(&topic)),
                })
            }
            .await,
        )
    }

    async fn delete_topic(
        &self,
        request: Request<v1::DeleteTopicRequest>,
    ) -> Result<Response<v1::DeleteTopicResponse>, Status> {
        let name = request.into_inner().name;
        let scope = self.scope("DeleteTopic").topic(&name);
        let broker = Arc::clone(&self.broker);
        let deleted = name.clone();
        let topic = name.clone();
        // The topic (which removes the members owning its partitions), then its groups'
        // offsets, in a task of its own: a client that gives up waiting cannot stop it
        // between the two. Offsets left behind by a failure are invisible to a topic
        // created again under this name (its incarnation differs).
        let done = tokio::spawn(async move {
            let offsets = Arc::clone(&broker);
            blocking(move || broker.delete_topic(&deleted)).await?;
            offsets.offsets().delete_topic(&topic).await
        })
        .await
        .map_err(|_| Error::ShuttingDown)
        .and_then(|deleted| deleted);
        if done.is_ok() {
            tracing::info!(topic = %name, "deleted topic");
        }
        scope.finish(done.map(|()| v1::DeleteTopicResponse {}))
    }

    async fn list_topics(
        &self,
        _request: Request<v1::ListTopicsRequest>,
    ) -> Result<Response<v1::ListTopicsResponse>, Status> {
        let topics = self.broker.topics().iter().map(|t| topic_info(t)).collect();
        self.scope("ListTopics")
            .finish(Ok(v1::ListTopicsResponse { topics }))
    }

    async fn describe_topic(
        &self,
        request: Request<v1::DescribeTopicRequest>,
    ) -> Result<Response<v1::DescribeTopicResponse>, Status> {
        let name = request.into_inner().name;
        let scope = self.scope("DescribeTopic").topic(&name);
        scope.finish(self.broker.topic(&name).map(|topic| {
            let partitions = topic
                .partitions()
                .iter()
                .enumerate()
                .map(|(id, p)| {
                    let reader = p.reader();
                    v1::PartitionInfo {
                        partition: id as u32,
                        earliest_offset: reader.earliest_offset(),
                        latest_offset: reader.high_watermark(),
                        size_bytes: reader.size_bytes(),
                        segments: reader.segment_count() as u32,
                    }
                })
                .collect();
            v1::DescribeTopicResponse {
                topic: Some(topic_info(&topic)),
                partitions,
            }
        }))
    }

    async fn list_offsets(
        &self,
        request: Request<v1::ListOffsetsRequest>,
    ) -> Result<Response<v1::ListOffsetsResponse>, Status> {
        let request = request.into_inner();
        let scope = self
            .scope("ListOffsets")
            .topic(&request.topic)
            .partition(request.partition);
        scope.finish(
            async {
                let partition = self.broker.partition(&request.topic, request.partition)?;
                let reader = partition.reader().clone();
                let offset = match v1::OffsetSpec::try_from(request.spec) {
                    Ok(v1::OffsetSpec::Earliest) => reader.earliest_offset(),
                    Ok(v1::OffsetSpec::Latest) => reader.high_watermark(),
                    Ok(v1::OffsetSpec::Timestamp) => {
                        let at = request.timestamp_ms;
                        blocking(move || Ok(reader.offset_for_timestamp(at)?.offset())).await?
                    }
                    Err(_) => {
                        return Err(Error::InvalidArgument(format!(
                            "unknown offset spec {}",
                            request.spec
                        )))
                    }
                };
                Ok(v1::ListOffsetsResponse { offset })
            }
            .await,
        )
    }

    async fn list_groups(
        &self,
        _request: Request<v1::ListGroupsRequest>,
    ) -> Result<Response<v1::ListGroupsResponse>, Status> {
        self.scope("ListGroups")
            .finish(Ok(groups::list_groups(&self.broker)))
    }

    async fn describe_group(
        &self,
        request: Request<v1::DescribeGroupRequest>,
    ) -> Result<Response<v1::DescribeGroupResponse>, Status> {
        let group = request.into_inner().group;
        let scope = self.scope("DescribeGroup").group(&group);
        scope.finish(groups::describe_group(&self.broker, &group))
    }

    async fn reset_offsets(
        &self,
        request: Request<v1::ResetOffsetsRequest>,
    ) -> Result<Response<v1::ResetOffsetsResponse>, Status> {
        let request = request.into_inner();
        let scope = self
            .scope("ResetOffsets")
            .group(&request.group)
            .topic(&request.topic);
        scope.finish(groups::reset_offsets(&self.broker, request).await)
    }

    async fn delete_group(
        &self,
        request: Request<v1::DeleteGroupRequest>,
    ) -> Result<Response<v1::DeleteGroupResponse>, Status> {
        let group = request.into_inner().group;
        let scope = self.scope("DeleteGroup").group(&group);
        scope.finish(
            crate::groups::api::delete_group(&self.broker, &group)
                .await
                .map(|()| v1::DeleteGroupResponse {}),
        )
    }
}

/// Encodes the simple form of a produce request as one batch.
/// Stops as soon as the batch passes `max_bytes`, so an oversized request costs no more
/// than the limit.
fn encode_records(records: &[v1::Record], max_bytes: usize) -> Result<Vec<u8>> {
    let now = now_ms();
    let mut builder = BatchBuilder::new();
    let mut headers: Vec<(&str, &[u8])> = Vec::new();
    for record in records {
        headers.clear();
        headers.extend(
            record
                .headers
                .iter()
                .map(|h| (h.key.as_str(), &h.value[..])),
        );
        let timestamp = if record.timestamp_ms == 0 {
            now
        } else {
            record.timestamp_ms
        };
        builder.push(
            timestamp,
            record.key.as_deref(),
            record.value.as_deref(),
            &headers,
        );
        if builder.encoded_len() > max_bytes {
            return Err(strata_storage::Error::BatchTooLarge {
                size: builder.encoded_len(),
                max: max_bytes,
            }
            .into());
        }
    }
    Ok(builder.finish())
}

/// The partition a produce request goes to.
fn target_partition(topic: &Topic, request: &v1::ProduceRequest) -> Result<u32> {
    let partitions = topic.settings.partitions;
    Ok(match &request.target {
        Some(v1::produce_request::Target::Partition(p)) => {
            topic.partition(*p)?;
            *p
        }
        Some(v1::produce_request::Target::Key(key)) => {
            strata_proto::partition_for_key(key, partitions)
        }
        None => {
            let key = match request.records.first() {
                Some(record) => record.key.as_deref(),
                None => first_batch_key(&request.batch),
            };
            match key {
                Some(key) => strata_proto::partition_for_key(key, partitions),
                None => topic.next_partition(),
            }
        }
    })
}

/// The key of the first record of an encoded batch, for routing a produce request that
/// names no target. An invalid batch has none; the append rejects it afterwards.
fn first_batch_key(batch: &[u8]) -> Option<&[u8]> {
    Batch::new(batch).ok()?.records().next()?.ok()?.key
}

/// Decodes the records at or after `from` for clients that asked for them.
///
/// Decoded records take more room than their batch (a record of empty key and value is
/// a few bytes in a batch and tens of bytes decoded), so decoding stops after about
/// `budget` bytes, always after at least one record; the returned offset is where the
/// next fetch continues, possibly inside a batch.
fn decode_records(
    batches_bytes: &[u8],
    from: u64,
    budget: usize,
) -> Result<(Vec<v1::Record>, Option<u64>)> {
    /// Rough per-record overhead of the decoded form (offset, timestamp, framing).
    const RECORD_OVERHEAD_BYTES: usize = 32;
    let mut records = Vec::new();
    let mut used = 0;
    for batch in batches(batches_bytes) {
        let batch = batch.map_err(strata_storage::Error::from)?;
        for record in batch.records() {
            let record = record.map_err(strata_storage::Error::from)?;
            if record.offset < from {
                continue;
            }
            if !records.is_empty() && used >= budget {
                return Ok((records, Some(record.offset)));
            }
            used += RECORD_OVERHEAD_BYTES
                + record.key.map_or(0, <[u8]>::len)
                + record.value.map_or(0, <[u8]>::len)
                + record
                    .headers()
                    .map(|(k, v)| k.len() + v.map_or(0, <[u8]>::len) + 8)
                    .sum::<usize>();
            records.push(v1::Record {
                key: record.key.map(Bytes::copy_from_slice),
                value: record.value.map(Bytes::copy_from_slice),
                headers: record
                    .headers()
                    .map(|(key, value)| v1::Header {
                        key: key.to_string(),
                        value: Bytes::copy_from_slice(value.unwrap_or_default()),
                    })
                    .collect(),
                timestamp_ms: record.timestamp,
                offset: record.offset,
            });
        }
    }
    Ok((records, None))
}

fn fetch_response(
    partition: u32,
    from: u64,
    read: ReadResult,
    decode: bool,
    max_bytes: usize,
) -> Result<v1::FetchResponse> {
    let (records, stopped_at) = if decode {
        decode_records(&read.batches, from, max_bytes)?
    } else {
        (Vec::new(), None)
    };
    Ok(v1::FetchResponse {
        partition,
        batches: if decode {
            Bytes::new()
        } else {
            read.batches.into()
        },
        records,
        next_offset: stopped_at.unwrap_or(read.next_offset),
        high_watermark: read.high_watermark,
        earliest_offset: read.earliest_offset,
    })
}

fn fetch_bytes(max_bytes: u32) -> usize {
    match max_bytes as usize {
        0 => FETCH_BYTES_DEFAULT,
        n => n.min(FETCH_BYTES_MAX),
    }
}

/// Reads from `partition` on the blocking pool.
async fn read(partition: &Arc<Partition>, from: u64, max_bytes: usize) -> Result<ReadResult> {
    let reader = partition.reader().clone();
    blocking(move || reader.read(from, max_bytes).map_err(Error::from)).await
}

type SubscribeStream = Pin<Box<dyn Stream<Item = Result<v1::FetchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl broker_server::Broker for Service {
    async fn produce(
        &self,
        request: Request<v1::ProduceRequest>,
    ) -> Result<Response<v1::ProduceResponse>, Status> {
        let request = request.into_inner();
        let mut scope = self.scope("Produce").topic(&request.topic);
        let answer = self.serve_produce(request, &mut scope).await;
        scope.finish(answer)
    }

    async fn fetch(
        &self,
        request: Request<v1::FetchRequest>,
    ) -> Result<Response<v1::FetchResponse>, Status> {
        let request = request.into_inner();
        let mut scope = self
            .scope("Fetch")
            .topic(&request.topic)
            .partition(request.partition);
        if let Some(member) = &request.member {
            scope = scope.group(&member.group);
        }
        let answer = self.serve_fetch(request, &mut scope).await;
        scope.finish(answer)
    }

    type SubscribeStream = SubscribeStream;

    async fn init_producer(
        &self,
        _request: Request<v1::InitProducerRequest>,
    ) -> Result<Response<v1::InitProducerResponse>, Status> {
        let broker = Arc::clone(&self.broker);
        let allocated = blocking(move || broker.allocate_producer_id()).await;
        if let Ok(producer_id) = allocated {
            tracing::debug!(producer_id, "handed out a producer id");
        }
        self.scope("InitProducer")
            .finish(allocated.map(|producer_id| v1::InitProducerResponse {
                producer_id,
                producer_epoch: 0,
            }))
    }

    async fn subscribe(
        &self,
        request: Request<v1::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let request = request.into_inner();
        let scope = self
            .scope("Subscribe")
            .topic(&request.topic)
            .partition(request.partition);
        let started = async {
            let topic = self.broker.topic(&request.topic)?;
            let partition = Arc::clone(topic.partition(request.partition)?);
            // Check the starting offset now, so a bad one fails the call, not the stream.
            let first = read(&partition, request.offset, fetch_bytes(request.max_bytes)).await?;
            Ok((topic, partition, first))
        }
        .await;
        let (topic, partition, first) = match started {
            Ok(started) => started,
            Err(e) => return Err(scope.fail(e)),
        };
        let max_bytes = fetch_bytes(request.max_bytes);
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        let stopped = self.stopped();
        let broker = Arc::clone(&self.broker);
        tokio::spawn(async move {
            tokio::pin!(stopped);
            let mut offset = request.offset;
            let mut next = Some(first);
            loop {
                let read_result = match next.take() {
                    Some(r) => Ok(r),
                    None => {
                        tokio::select! {
                            _ = partition.wait_past(offset, FETCH_WAIT_MAX) => {}
                            _ = sender.closed() => return,
                            _ = &mut stopped => {
                                // The client should reconnect, not take this as the end.
                                let _ = sender.try_send(Err(Error::ShuttingDown.into()));
                                return;
                            }
                        }
                        // Once the topic is deleted its writer is gone and the wait above
                        // returns at once: end the stream instead of spinning.
                        if !broker
                            .topic(&request.topic)
                            .is_ok_and(|current| Arc::ptr_eq(&current, &topic))
                        {
                            let gone = Error::TopicNotFound(request.topic.clone());
                            let _ = sender.send(Err(scope.fail(gone))).await;
                            return;
                        }
                        read(&partition, offset, max_bytes).await
                    }
                };
                let message = read_result.and_then(|r| {
                    if r.batches.is_empty() {
                        offset = r.next_offset;
                        return Ok(None);
                    }
                    let m =
                        fetch_response(request.partition, offset, r, request.decode, max_bytes)?;
                    count_fetched(&partition, offset, &m);
                    offset = m.next_offset;
                    Ok(Some(m))
                });
                let failed = message.is_err();
                match message {
                    Ok(None) => continue,
                    Ok(Some(m)) => {
                        // A client that stops reading must not hold up a shutdown.
                        tokio::select! {
                            sent = sender.send(Ok(m)) => if sent.is_err() { return },
                            _ = &mut stopped => return,
                        }
                    }
                    Err(e) => {
                        let _ = sender.send(Err(scope.fail(e))).await;
                    }
                }
                if failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(receiver),
        )))
    }
}
