//! The gRPC services. Handlers validate requests, move blocking work (directory changes,
//! file reads) off the async runtime, and convert errors to statuses in one place
//! ([`crate::error`]).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use strata_proto::v1::{self, admin_server, broker_server};
use strata_storage::batch::{batches, Batch, BatchBuilder, BatchHeader, BATCH_HEADER_LEN};
use strata_storage::compression::{decompressed_bytes_max, Compression, DECOMPRESSION_BUDGET};
use strata_storage::{now_ms, ReadResult};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::broker::{blocking, Broker, Topic};
use crate::error::{Error, Result};
use crate::grpc::groups;
use crate::grpc::instrument::Scope;
use crate::limits::{Limits, FETCH_MEMORY_BYTES_MIN};
use crate::topics::partition::{Ack, Partition};
use crate::topics::settings::{TopicOverrides, TopicSettings};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Fetch size when a request leaves max_bytes at 0.
pub const FETCH_BYTES_DEFAULT: usize = 1 << 20;
/// Largest fetch response; clients must accept messages of this size plus one batch.
pub const FETCH_BYTES_MAX: usize = 8 << 20;
/// Bytes of produce batches queued or being written at once, broker-wide.
pub const PRODUCE_BUDGET_BYTES: usize = 512 << 20;
/// Longest a fetch may wait for data.
pub const FETCH_WAIT_MAX: Duration = Duration::from_secs(30);
/// Quarters of the fetch memory budget Subscribe streams may hold.
const SUBSCRIBE_SHARE_QUARTERS: usize = 3;
/// Longest a fetch waits for room in the fetch memory budget before it is refused.
const FETCH_BUDGET_WAIT: Duration = Duration::from_secs(1);

/// Permits of the fetch memory budget for `bytes` (at most the largest fetch plus the
/// largest batch, below the least budget).
pub(crate) fn fetch_permits(bytes: usize) -> u32 {
    bytes.min(FETCH_MEMORY_BYTES_MIN) as u32
}

/// What a fetch response holds: its batches, or its decoded records.
fn response_bytes(response: &v1::FetchResponse) -> usize {
    response.batches.len()
        + response
            .records
            .iter()
            .map(|r| {
                RECORD_DECODED_OVERHEAD_BYTES
                    + r.value.as_ref().map_or(0, Bytes::len)
                    + r.key.as_ref().map_or(0, Bytes::len)
                    + r.headers
                        .iter()
                        .map(|h| h.key.len() + h.value.len() + HEADER_DECODED_OVERHEAD_BYTES)
                        .sum::<usize>()
            })
            .sum::<usize>()
}

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
    /// What one request may ask for.
    limits: Arc<Limits>,
    /// Bytes of Fetch and Subscribe responses the broker holds until they are sent,
    /// broker-wide: clients that do not read cannot make it hold more.
    fetch_budget: Arc<Semaphore>,
    /// The part of the fetch budget Subscribe streams may hold: the rest stays for
    /// Fetch, so clients holding streams cannot stop readers that poll (Kafka clients,
    /// and strata-client's consumers, which poll when a Subscribe is refused).
    subscribe_share: Arc<Semaphore>,
}

impl Service {
    /// Services over `broker`, within `limits`; `fetch_budget` holds
    /// `limits.fetch_memory_bytes` permits, shared with the Kafka listener.
    pub fn new(broker: Arc<Broker>, limits: Limits, fetch_budget: Arc<Semaphore>) -> Service {
        let (stopping, _) = tokio::sync::watch::channel(false);
        Service {
            broker,
            stopping: Arc::new(stopping),
            produce_budget: Arc::new(tokio::sync::Semaphore::new(PRODUCE_BUDGET_BYTES)),
            fetch_budget,
            subscribe_share: Arc::new(Semaphore::new(
                limits.fetch_memory_bytes / 4 * SUBSCRIBE_SHARE_QUARTERS,
            )),
            limits: Arc::new(limits),
        }
    }

    /// Takes `bytes` of the fetch memory budget, waiting at most [`FETCH_BUDGET_WAIT`]
    /// for responses in flight to free it.
    async fn fetch_memory(&self, bytes: usize) -> Result<OwnedSemaphorePermit> {
        let permits = fetch_permits(bytes);
        let budget = Arc::clone(&self.fetch_budget);
        match tokio::time::timeout(FETCH_BUDGET_WAIT, budget.acquire_many_owned(permits)).await {
            Ok(permit) => permit.map_err(|_| Error::ShuttingDown),
            Err(_) => Err(self.fetch_memory_exhausted()),
        }
    }

    /// Takes `bytes` of Subscribe's share of the fetch memory budget, and of the
    /// budget, if they have them now.
    fn try_subscribe_memory(
        &self,
        bytes: usize,
    ) -> Result<(OwnedSemaphorePermit, OwnedSemaphorePermit)> {
        let take = |semaphore: &Arc<Semaphore>| {
            Arc::clone(semaphore)
                .try_acquire_many_owned(fetch_permits(bytes))
                .map_err(|_| self.fetch_memory_exhausted())
        };
        Ok((take(&self.subscribe_share)?, take(&self.fetch_budget)?))
    }

    fn fetch_memory_exhausted(&self) -> Error {
        Error::LimitExceeded {
            limit: "fetch_memory_bytes",
            message: format!(
                "responses in flight hold all {} of the fetch memory budget (clients that \
                 do not read their Subscribe streams or responses); retry later",
                crate::units::ByteSize(self.limits.fetch_memory_bytes as u64)
            ),
        }
    }

    /// The limits requests are checked against.
    pub(crate) fn limits(&self) -> &Limits {
        &self.limits
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
        let max_bytes = topic.settings.max_message_bytes as usize;
        let (batch, budget) = match (request.batch.is_empty(), request.records.is_empty()) {
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
            (false, true) => {
                let batch = std::mem::take(&mut request.batch);
                // A batch is at most MESSAGE_BYTES_CAP, far below the budget, so this
                // never waits for more permits than exist.
                let budget = self.charge(batch.len()).await?;
                (batch, budget)
            }
            (true, false) => {
                // Charged once, before the batch is built, at the most a batch of these
                // records can take (one that would pass the topic's limit is refused):
                // waiting for more while holding a charge could deadlock the budget.
                let estimate = batch_bytes_bound(&request.records).min(max_bytes);
                let mut budget = self.charge(estimate).await?;
                let batch = encode_records(&request.records, max_bytes)?;
                request.records = Vec::new();
                if let Some(unused) = budget.num_permits().checked_sub(batch.len()) {
                    drop(budget.split(unused));
                }
                (batch.into(), budget)
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
        let stored = topic
            .partition(partition_id)?
            .append(batch, ack, Some(budget))
            .await?;
        Ok(v1::ProduceResponse {
            partition: partition_id,
            base_offset: stored.info.base_offset,
            last_offset: stored.info.last_offset,
            duplicate: stored.duplicate,
        })
    }

    /// Takes `bytes` (at most [`PRODUCE_BUDGET_BYTES`]) of the produce budget, waiting
    /// while other batches hold it.
    async fn charge(&self, bytes: usize) -> Result<tokio::sync::OwnedSemaphorePermit> {
        let permits = u32::try_from(bytes.min(PRODUCE_BUDGET_BYTES)).unwrap_or(u32::MAX);
        Arc::clone(&self.produce_budget)
            .acquire_many_owned(permits)
            .await
            .map_err(|_| Error::ShuttingDown)
    }

    /// Serves a fetch; the scope's clock restarts after a long poll's wait.
    async fn serve_fetch(
        &self,
        request: v1::FetchRequest,
        scope: &mut Scope,
    ) -> Result<(v1::FetchResponse, OwnedSemaphorePermit)> {
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
        // Held until the handler returns its response to the transport.
        let mut memory = self.fetch_memory(max_bytes).await?;
        let read = read(&partition, request.offset, max_bytes).await?;
        let response = fetch_response(
            request.partition,
            request.offset,
            read,
            request.decode,
            max_bytes,
        )
        .await?;
        fit_or_refuse(
            &self.fetch_budget,
            &mut memory,
            response_bytes(&response),
            || self.fetch_memory_exhausted(),
        )
        .await?;
        count_fetched(&partition, request.offset, &response);
        Ok((response, memory))
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

/// Most bytes one record adds to a batch beyond its key, value and headers (varint
/// lengths, deltas, attributes).
const RECORD_BYTES_MAX: usize = 64;

/// The most encoding `records` as one batch can take: the batch header, and their keys,
/// values and headers plus the framing of each.
fn batch_bytes_bound(records: &[v1::Record]) -> usize {
    BATCH_HEADER_LEN
        + records
            .iter()
            .map(|r| {
                RECORD_BYTES_MAX
                    + r.key.as_ref().map_or(0, Bytes::len)
                    + r.value.as_ref().map_or(0, Bytes::len)
                    + r.headers
                        .iter()
                        .map(|h| h.key.len() + h.value.len() + 16)
                        .sum::<usize>()
            })
            .sum::<usize>()
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
            let mut scratch = Vec::new();
            let key = match request.records.first() {
                Some(record) => record.key.as_deref(),
                None => first_batch_key(&request.batch, &mut scratch),
            };
            match key {
                Some(key) => strata_proto::partition_for_key(key, partitions),
                None => topic.next_partition(),
            }
        }
    })
}

/// The key of the first record of an encoded batch, for routing a produce request that
/// names no target (of a compressed batch, only as much as that record needs is
/// decompressed into `scratch`). An invalid batch has none; the append rejects it
/// afterwards.
fn first_batch_key<'a>(batch: &'a [u8], scratch: &'a mut Vec<u8>) -> Option<&'a [u8]> {
    Batch::new(batch).ok()?.first_record(scratch).ok()??.key
}

/// Rough per-record overhead of the decoded form (offset, timestamp, framing).
const RECORD_DECODED_OVERHEAD_BYTES: usize = 32;
/// Rough per-header overhead of the decoded form.
const HEADER_DECODED_OVERHEAD_BYTES: usize = 16;

/// Decodes the records at or after `from` for clients that asked for them; blocking
/// (decompression), so it runs on the blocking pool.
///
/// Decoded records take more room than their batch (a record of empty key and value is
/// a few bytes in a batch and tens of bytes decoded), so decoding stops before the
/// records (as [`response_bytes`] counts them) would pass `budget` bytes, after at
/// least one record; the returned offset is where the next fetch continues, possibly
/// inside a batch. A compressed batch is decompressed into a buffer of its own, which
/// holds its bound of the process-wide decompression budget (the one batch validation
/// takes from) while it lives.
fn decode_records(
    batches_bytes: &[u8],
    from: u64,
    budget: usize,
) -> Result<(Vec<v1::Record>, Option<u64>)> {
    let mut records = Vec::new();
    let mut used = 0;
    for batch in batches(batches_bytes) {
        let batch = batch.map_err(strata_storage::Error::from)?;
        let _decompressed = (batch.compression() != Compression::None)
            .then(|| DECOMPRESSION_BUDGET.acquire(decompressed_bytes_max(batch.as_bytes().len())));
        let mut scratch = Vec::new();
        let batch_records = batch
            .records_with(&mut scratch)
            .map_err(strata_storage::Error::from)?;
        for record in batch_records {
            let record = record.map_err(strata_storage::Error::from)?;
            if record.offset < from {
                continue;
            }
            let size = RECORD_DECODED_OVERHEAD_BYTES
                + record.key.map_or(0, <[u8]>::len)
                + record.value.map_or(0, <[u8]>::len)
                + record
                    .headers()
                    .map(|(k, v)| {
                        k.len() + v.map_or(0, <[u8]>::len) + HEADER_DECODED_OVERHEAD_BYTES
                    })
                    .sum::<usize>();
            if !records.is_empty() && used + size > budget {
                return Ok((records, Some(record.offset)));
            }
            used += size;
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

/// The response for what `read` found: its batches as they are, or (`decode`) their
/// records decoded, on the blocking pool.
async fn fetch_response(
    partition: u32,
    from: u64,
    read: ReadResult,
    decode: bool,
    max_bytes: usize,
) -> Result<v1::FetchResponse> {
    let (records, stopped_at, batches) = if decode {
        let batches = read.batches;
        let (records, stopped_at) =
            blocking(move || decode_records(&batches, from, max_bytes)).await?;
        (records, stopped_at, Bytes::new())
    } else {
        (Vec::new(), None, read.batches.into())
    };
    Ok(v1::FetchResponse {
        partition,
        batches,
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
        let (answer, memory) = match self.serve_fetch(request, &mut scope).await {
            Ok((response, memory)) => (Ok(response), Some(memory)),
            Err(e) => (Err(e), None),
        };
        let mut response = scope.finish(answer)?;
        if let Some(memory) = memory {
            response
                .extensions_mut()
                .insert(ResponseMemory(Arc::new(memory)));
        }
        Ok(response)
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
        let mut scope = self
            .scope("Subscribe")
            .topic(&request.topic)
            .partition(request.partition);
        if let Some(member) = &request.member {
            scope = scope.group(&member.group);
        }
        let max_bytes = fetch_bytes(request.max_bytes);
        let queue_bytes = self.limits.subscribe_queue_bytes;
        let queue = Arc::new(Semaphore::new(queue_bytes));
        let started = async {
            let topic = self.broker.topic(&request.topic)?;
            let partition = Arc::clone(topic.partition(request.partition)?);
            if let Some(member) = &request.member {
                groups::check_fetch(&self.broker, member, &request.topic, request.partition)?;
            }
            // Refused at once while responses in flight hold the whole budget, so new
            // streams do not pile up waiting with their first read.
            let (share, memory) = self.try_subscribe_memory(max_bytes)?;
            let held = Held {
                share,
                memory,
                queued: Arc::clone(&queue)
                    .try_acquire_many_owned(fetch_permits(max_bytes.min(queue_bytes)))
                    .map_err(|_| Error::ShuttingDown)?,
            };
            // Check the starting offset now, so a bad one fails the call, not the stream.
            let first = read(&partition, request.offset, max_bytes).await?;
            Ok((topic, partition, first, held))
        }
        .await;
        let (topic, partition, first, held) = match started {
            Ok(started) => started,
            Err(e) => return Err(scope.fail(e)),
        };
        let (sender, receiver) = tokio::sync::mpsc::channel::<(_, Option<Held>)>(4);
        let stopped = self.stopped();
        let service = self.clone();
        tokio::spawn(async move {
            tokio::pin!(stopped);
            let mut offset = request.offset;
            let mut next = Some((first, held));
            loop {
                let (read_result, mut held) = match next.take() {
                    Some((r, held)) => (Ok(r), held),
                    None => {
                        tokio::select! {
                            _ = partition.wait_past(offset, FETCH_WAIT_MAX) => {}
                            _ = sender.closed() => return,
                            _ = &mut stopped => {
                                // The client should reconnect, not take this as the end.
                                let _ = sender.try_send((Err(Error::ShuttingDown.into()), None));
                                return;
                            }
                        }
                        // Once the topic is deleted its writer is gone and the wait above
                        // returns at once: end the stream instead of spinning.
                        if !service
                            .broker
                            .topic(&request.topic)
                            .is_ok_and(|current| Arc::ptr_eq(&current, &topic))
                        {
                            let gone = Error::TopicNotFound(request.topic.clone());
                            let _ = sender.send((Err(scope.fail(gone)), None)).await;
                            return;
                        }
                        // Room for the next response before it is read: in this stream's
                        // queue (a client that does not read stops here), then in the
                        // broker-wide budget.
                        let held = tokio::select! {
                            held = service.hold(&queue, max_bytes) => held,
                            _ = sender.closed() => return,
                            _ = &mut stopped => {
                                let _ = sender.try_send((Err(Error::ShuttingDown.into()), None));
                                return;
                            }
                        };
                        let Some(held) = held else { return };
                        // The member may have lost the partition while it waited, for
                        // data or for room: checked right before the read.
                        if let Some(member) = &request.member {
                            let owner = groups::check_fetch(
                                &service.broker,
                                member,
                                &request.topic,
                                request.partition,
                            );
                            if let Err(e) = owner {
                                let _ = sender.send((Err(scope.fail(e)), None)).await;
                                return;
                            }
                        }
                        (read(&partition, offset, max_bytes).await, held)
                    }
                };
                let message = match read_result {
                    Ok(r) if r.batches.is_empty() => {
                        offset = r.next_offset;
                        Ok(None)
                    }
                    Ok(r) => {
                        fetch_response(request.partition, offset, r, request.decode, max_bytes)
                            .await
                            .map(Some)
                    }
                    Err(e) => Err(e),
                };
                // The response is charged all it holds (decoded records can take more
                // than was read), or refused.
                let message = match message {
                    Ok(Some(m)) => {
                        let bytes = response_bytes(&m);
                        let exhausted = || service.fetch_memory_exhausted();
                        let charged = async {
                            fit_or_refuse(
                                &service.fetch_budget,
                                &mut held.memory,
                                bytes,
                                exhausted,
                            )
                            .await?;
                            fit_or_refuse(
                                &service.subscribe_share,
                                &mut held.share,
                                bytes,
                                exhausted,
                            )
                            .await
                        };
                        charged.await.map(|()| {
                            count_fetched(&partition, offset, &m);
                            offset = m.next_offset;
                            Some(m)
                        })
                    }
                    other => other,
                };
                let failed = message.is_err();
                match message {
                    Ok(None) => continue,
                    Ok(Some(m)) => {
                        let bytes = response_bytes(&m);
                        // The stream's queue lets a larger response go alone.
                        fit(&queue, &mut held.queued, bytes.min(queue_bytes));
                        // A client that stops reading must not hold up a shutdown.
                        tokio::select! {
                            sent = sender.send((Ok(m), Some(held))) => if sent.is_err() { return },
                            _ = &mut stopped => return,
                        }
                    }
                    Err(e) => {
                        let _ = sender.send((Err(scope.fail(e)), None)).await;
                    }
                }
                if failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(Holding {
            inner: tokio_stream::wrappers::ReceiverStream::new(receiver),
            held: None,
        })))
    }
}

/// What a Subscribe response holds until the transport has taken it: its share of the
/// fetch memory budget and of its stream's queue.
struct Held {
    share: OwnedSemaphorePermit,
    memory: OwnedSemaphorePermit,
    queued: OwnedSemaphorePermit,
}

impl Service {
    /// Room for a response of up to `max_bytes`: in `queue` (of `subscribe_queue_bytes`;
    /// all of it for a larger response), then in Subscribe's share of the fetch memory
    /// budget and in the budget; waits for each. `None` once a semaphore is closed.
    async fn hold(&self, queue: &Arc<Semaphore>, max_bytes: usize) -> Option<Held> {
        let queued = Arc::clone(queue)
            .acquire_many_owned(fetch_permits(
                max_bytes.min(self.limits.subscribe_queue_bytes),
            ))
            .await
            .ok()?;
        let share = Arc::clone(&self.subscribe_share)
            .acquire_many_owned(fetch_permits(max_bytes))
            .await
            .ok()?;
        let memory = Arc::clone(&self.fetch_budget)
            .acquire_many_owned(fetch_permits(max_bytes))
            .await
            .ok()?;
        Some(Held {
            share,
            memory,
            queued,
        })
    }
}

/// Fits `permit` of `semaphore` (taken for a response before it was read) to the
/// response's `bytes`: frees what it does not need, or takes what it needs beyond, if
/// free (the response is read already; at most one batch over what was asked for).
pub(crate) fn fit(semaphore: &Arc<Semaphore>, permit: &mut OwnedSemaphorePermit, bytes: usize) {
    let held = permit.num_permits();
    if bytes < held {
        drop(permit.split(held - bytes));
    } else if let Ok(more) =
        Arc::clone(semaphore).try_acquire_many_owned(fetch_permits(bytes - held))
    {
        permit.merge(more);
    }
}

/// Fits `permit` of `semaphore` to a response of `bytes` that must be charged in full
/// (a decoded response can hold more than was read): frees what it does not need, or
/// takes what it needs beyond, waiting at most [`FETCH_BUDGET_WAIT`] for it, and refuses
/// the response (`exhausted`) if it does not free.
async fn fit_or_refuse(
    semaphore: &Arc<Semaphore>,
    permit: &mut OwnedSemaphorePermit,
    bytes: usize,
    exhausted: impl FnOnce() -> Error,
) -> Result<()> {
    let wanted = fetch_permits(bytes) as usize;
    let held = permit.num_permits();
    if wanted <= held {
        drop(permit.split(held - wanted));
        return Ok(());
    }
    let missing = (wanted - held) as u32;
    let more = match Arc::clone(semaphore).try_acquire_many_owned(missing) {
        Ok(more) => more,
        Err(_) => tokio::time::timeout(
            FETCH_BUDGET_WAIT,
            Arc::clone(semaphore).acquire_many_owned(missing),
        )
        .await
        .map_err(|_| exhausted())?
        .map_err(|_| Error::ShuttingDown)?,
    };
    permit.merge(more);
    Ok(())
}

/// A response's share of the fetch memory budget, released when the transport drops
/// the response's body: the layer around the services ([`crate::grpc::instrument`])
/// moves it from the response's extensions into its body.
#[derive(Clone)]
pub struct ResponseMemory(pub Arc<OwnedSemaphorePermit>);

/// A Subscribe stream's responses for tonic: each keeps its [`Held`] share until
/// tonic asks for the next one, by when the transport has taken it (HTTP/2 asks for
/// more only once the client's flow-control window lets the last one go).
struct Holding {
    inner:
        tokio_stream::wrappers::ReceiverStream<(Result<v1::FetchResponse, Status>, Option<Held>)>,
    held: Option<Held>,
}

impl Stream for Holding {
    type Item = Result<v1::FetchResponse, Status>;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.held = None;
        Pin::new(&mut self.inner).poll_next(cx).map(|next| {
            next.map(|(item, held)| {
                self.held = held;
                item
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use tokio_stream::StreamExt;

    fn record() -> impl Strategy<Value = v1::Record> {
        let bytes = || proptest::option::of(proptest::collection::vec(any::<u8>(), 0..300));
        let header = ("[a-z]{0,20}", proptest::collection::vec(any::<u8>(), 0..40)).prop_map(
            |(key, value)| v1::Header {
                key,
                value: value.into(),
            },
        );
        (
            bytes(),
            bytes(),
            proptest::collection::vec(header, 0..4),
            any::<i64>(),
        )
            .prop_map(|(key, value, headers, timestamp_ms)| v1::Record {
                key: key.map(Into::into),
                value: value.map(Into::into),
                headers,
                timestamp_ms,
                offset: 0,
            })
    }

    proptest! {
        /// A records-form produce is charged once, at this bound: the batch built from
        /// the records must never need more.
        #[test]
        fn the_batch_bound_holds_for_any_records(
            records in proptest::collection::vec(record(), 1..40)
        ) {
            let batch = encode_records(&records, usize::MAX).expect("encodes");
            prop_assert!(batch.len() <= batch_bytes_bound(&records));
        }
    }

    fn held(budget: &Arc<Semaphore>, bytes: u32) -> Held {
        let take = || {
            Arc::clone(budget)
                .try_acquire_many_owned(bytes)
                .expect("room")
        };
        Held {
            share: take(),
            memory: take(),
            queued: take(),
        }
    }

    /// A Subscribe response keeps its share of the budget until tonic asks for the
    /// next one, by when the transport has taken it.
    #[tokio::test]
    async fn a_response_holds_its_budget_until_the_next_is_asked_for() {
        let budget = Arc::new(Semaphore::new(60));
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        for _ in 0..2 {
            let response = Ok(v1::FetchResponse::default());
            sender
                .send((response, Some(held(&budget, 10))))
                .await
                .expect("send");
        }
        drop(sender);
        let mut stream = Holding {
            inner: tokio_stream::wrappers::ReceiverStream::new(receiver),
            held: None,
        };
        assert_eq!(budget.available_permits(), 0);
        stream.next().await.expect("a first").expect("a response");
        assert_eq!(budget.available_permits(), 0, "both still held");
        stream.next().await.expect("a second").expect("a response");
        assert_eq!(budget.available_permits(), 30, "the first released");
        assert!(stream.next().await.is_none());
        assert_eq!(budget.available_permits(), 60, "all released at the end");
    }

    /// Routing by the first key decodes the first record only: a batch whose rest is a
    /// bomb is routed (and then refused by the append), not decompressed to its bound.
    #[test]
    fn the_first_key_is_read_without_decoding_the_batch() {
        let mut builder = BatchBuilder::new();
        builder.push(1_000, Some(b"route-me"), Some(b"v"), &[]);
        let plain = builder.finish();
        let mut records = plain[BATCH_HEADER_LEN..].to_vec();
        records.resize(8 << 20, 0);
        let mut builder = BatchBuilder::new();
        builder.push(1_000, Some(b"route-me"), Some(b"v"), &[]);
        let mut bomb = builder.finish()[..BATCH_HEADER_LEN].to_vec();
        Compression::Zstd.compress(&records, &mut bomb);
        let len = (bomb.len() - 12) as i32;
        bomb[8..12].copy_from_slice(&len.to_be_bytes());
        bomb[21..23].copy_from_slice(&(Compression::Zstd.id() as i16).to_be_bytes());
        let crc = crc32c::crc32c(&bomb[21..]);
        bomb[17..21].copy_from_slice(&crc.to_be_bytes());
        let mut scratch = Vec::new();
        assert_eq!(first_batch_key(&bomb, &mut scratch), Some(&b"route-me"[..]));
        assert!(scratch.capacity() < 1 << 20, "{}", scratch.capacity());
    }

    /// Decoded records stay within the budget (after the first): decoding used to stop
    /// only once past it, a record over.
    #[test]
    fn decoding_stops_before_the_budget_is_passed() {
        for codec in [Compression::None, Compression::Zstd] {
            let mut builder = BatchBuilder::new();
            for i in 0..5 {
                builder.push(1_000 + i, Some(b"k"), Some(&[7; 100]), &[("h", &b"v"[..])]);
            }
            let batch = builder.finish_compressed(codec);
            let one = RECORD_DECODED_OVERHEAD_BYTES + 1 + 100 + 2 + HEADER_DECODED_OVERHEAD_BYTES;
            for budget in [0, one, one + 1, 2 * one + 10, 10 * one] {
                let (records, next) = decode_records(&batch, 0, budget).expect("decodes");
                let response = v1::FetchResponse {
                    records,
                    ..Default::default()
                };
                let held = response_bytes(&response);
                let count = response.records.len();
                assert_eq!(
                    held,
                    count * one,
                    "{codec}: counted as the fetch is charged"
                );
                assert_eq!(
                    count,
                    (budget / one).clamp(1, 5),
                    "{codec}: budget {budget}"
                );
                assert_eq!(next, (count < 5).then_some(count as u64), "{codec}");
            }
        }
    }

    /// A response that needs more of the budget than was taken for it waits for it, and
    /// is refused (not served under-charged) when it does not free.
    #[tokio::test]
    async fn a_response_is_charged_in_full_or_refused() {
        let budget = Arc::new(Semaphore::new(100));
        let mut permit = Arc::clone(&budget)
            .try_acquire_many_owned(40)
            .expect("room");
        let others = Arc::clone(&budget)
            .try_acquire_many_owned(60)
            .expect("room");
        let refused = fit_or_refuse(&budget, &mut permit, 90, || Error::ShuttingDown).await;
        assert!(matches!(refused, Err(Error::ShuttingDown)), "{refused:?}");
        assert_eq!(permit.num_permits(), 40, "nothing taken on refusal");
        drop(others);
        fit_or_refuse(&budget, &mut permit, 90, || Error::ShuttingDown)
            .await
            .expect("room now");
        assert_eq!((permit.num_permits(), budget.available_permits()), (90, 10));
        fit_or_refuse(&budget, &mut permit, 25, || Error::ShuttingDown)
            .await
            .expect("frees");
        assert_eq!((permit.num_permits(), budget.available_permits()), (25, 75));
    }

    #[test]
    fn a_fit_frees_what_a_response_does_not_need() {
        let budget = Arc::new(Semaphore::new(100));
        let mut permit = Arc::clone(&budget)
            .try_acquire_many_owned(40)
            .expect("room");
        fit(&budget, &mut permit, 25);
        assert_eq!((permit.num_permits(), budget.available_permits()), (25, 75));
        fit(&budget, &mut permit, 90);
        assert_eq!((permit.num_permits(), budget.available_permits()), (90, 10));
        // More than is free: the response is read already; it keeps what it has.
        fit(&budget, &mut permit, 200);
        assert_eq!(permit.num_permits(), 90);
    }
}
