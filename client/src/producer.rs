//! The batching producer.
//!
//! Records are encoded, as they are sent, straight into the open batch of their
//! partition (one buffer per batch, `BatchBuilder`), so the hot path allocates nothing
//! per record. A batch is sealed when the next record would not fit in
//! `max_batch_bytes`, when its `linger` expires, or on [`Producer::flush`]. Sealed
//! batches wait in their partition's queue until fewer than `max_in_flight` requests of
//! that partition are in flight. All state sits behind one mutex that is never held
//! across an `.await`.
//!
//! Each batch has one shared [`Outcome`]; a record's send future holds the outcome and
//! its index in the batch, and reads its offset from there once the broker answers.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use strata_proto::v1::{self, broker_client::BrokerClient};
use strata_storage::batch::{BatchBuilder, BATCH_HEADER_LEN};
use tokio::sync::{oneshot, Notify};
use tonic::transport::Channel;

use crate::admin::Admin;
use crate::error::{Error, Result};
use crate::record::Record;

/// When the broker answers a produce request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Acks {
    /// Once the records are durable under the topic's durability policy (the default).
    #[default]
    Durable,
    /// Once the broker has appended the records, before any fsync. Faster, but an
    /// acknowledged record can be lost if the broker's write fails.
    Leader,
}

/// Settings of a [`Producer`]. Every limit has a default; see each field.
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// How long a batch waits for more records after its first one (default 5 ms).
    /// Zero sends a batch as soon as its partition has a free request slot; records sent
    /// meanwhile collect in the next batch.
    pub linger: Duration,
    /// Largest encoded batch (default 1 MiB). Lowered to the topic's
    /// `max_message_bytes` when that is smaller.
    pub max_batch_bytes: usize,
    /// Produce requests in flight per partition (default 1). The broker may append two
    /// requests in flight to one partition in either order, so values above 1 trade
    /// per-partition (and per-key) ordering for throughput until the broker checks
    /// producer sequence numbers.
    pub max_in_flight: usize,
    /// Bytes of records buffered and in flight (default 64 MiB). Records sent beyond
    /// this wait, in order, until acknowledgements make room; their send futures resolve
    /// only after that, so a sender that awaits its sends is held back.
    pub buffer_bytes_max: usize,
    /// How often a batch that failed with a retriable error (the broker unavailable or
    /// unreachable, a timeout) is sent again before its records fail (default 30).
    pub retries: u32,
    /// First retry delay; doubled per attempt (default 20 ms).
    pub retry_backoff_min: Duration,
    /// Largest retry delay (default 1 s).
    pub retry_backoff_max: Duration,
    /// How long one produce request may take before it counts as failed (default 30 s).
    pub request_timeout: Duration,
    /// When the broker answers (default [`Acks::Durable`]).
    pub acks: Acks,
}

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            linger: Duration::from_millis(5),
            max_batch_bytes: 1 << 20,
            max_in_flight: 1,
            buffer_bytes_max: 64 << 20,
            retries: 30,
            retry_backoff_min: Duration::from_millis(20),
            retry_backoff_max: Duration::from_secs(1),
            request_timeout: Duration::from_secs(30),
            acks: Acks::Durable,
        }
    }
}

/// Where a record was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Delivery {
    /// The partition.
    pub partition: u32,
    /// The record's offset in it.
    pub offset: u64,
}

/// Writes records to one topic, batching them per partition.
///
/// Keyed records go to the key's partition, computed exactly as the broker does
/// ([`strata_proto::partition_for_key`]), so one key's records stay in one partition in
/// the order they were sent. Records without a key go to a "sticky" partition that moves
/// to the next partition each time a batch of it is sealed, so keyless batches fill up
/// and spread over all partitions.
///
/// [`send`](Producer::send) places the record in its batch at once, in call order, and
/// returns a future that resolves to its [`Delivery`] when the broker acknowledges the
/// batch. Retriable failures are retried with exponential backoff. Delivery is at least
/// once: after an ambiguous failure (a dropped connection, a timeout) a retried batch
/// can be stored twice. Idempotent producers, which make retries exact, need broker
/// support that comes later.
///
/// Cheap to clone; clones share batches and connection.
///
/// ```no_run
/// use strata_client::{Client, ProducerConfig, Record};
/// use std::time::Duration;
///
/// # async fn run() -> strata_client::Result<()> {
/// let client = Client::connect("127.0.0.1:7717").await?;
/// let config = ProducerConfig { linger: Duration::from_millis(2), ..Default::default() };
/// let producer = client.producer_with("orders", config).await?;
///
/// // Fire many sends, then await them: they share batches.
/// let pending: Vec<_> = (0..1000)
///     .map(|i| producer.send(Record::new(format!("event {i}")).key(format!("order-{}", i % 10))))
///     .collect();
/// for delivery in pending {
///     let delivery = delivery.await?;
///     assert!(delivery.partition < producer.partitions());
/// }
/// producer.flush().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Producer {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("topic", &self.shared.topic)
            .field("partitions", &self.shared.partitions)
            .field("batch_bytes_max", &self.shared.batch_bytes_max)
            .finish_non_exhaustive()
    }
}

struct Shared {
    client: BrokerClient<Channel>,
    runtime: tokio::runtime::Handle,
    topic: String,
    partitions: u32,
    batch_bytes_max: usize,
    config: ProducerConfig,
    state: Mutex<State>,
    /// Notified when `outstanding` drops to zero.
    idle: Notify,
}

struct State {
    partitions: Vec<PartitionState>,
    /// The partition keyless records go to.
    sticky: u32,
    /// Records waiting for buffer room, in send order.
    backlog: VecDeque<Waiting>,
    /// Reserved bytes of records in batches not yet answered.
    buffered_bytes: usize,
    /// Records sent whose outcome is not known yet.
    outstanding: usize,
    /// Tells a linger timer whether its batch is still the open one.
    next_generation: u64,
    /// Running `flush` calls; while any runs, batches opened for records that waited in
    /// the backlog are sealed without lingering.
    flushing: usize,
}

#[derive(Default)]
struct PartitionState {
    open: Option<OpenBatch>,
    queued: VecDeque<Sealed>,
    in_flight: usize,
}

struct OpenBatch {
    builder: BatchBuilder,
    outcome: Arc<Outcome>,
    generation: u64,
    reserved: usize,
}

struct Sealed {
    bytes: Bytes,
    outcome: Arc<Outcome>,
    records: usize,
    reserved: usize,
}

/// The answer for one batch: its partition and base offset, or the error.
#[derive(Default)]
struct Outcome {
    result: OnceLock<Result<(u32, u64)>>,
    done: Notify,
}

/// A record's place in a batch.
struct Slot {
    outcome: Arc<Outcome>,
    index: u64,
}

impl Slot {
    async fn wait(self) -> Result<Delivery> {
        loop {
            let notified = self.outcome.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(result) = self.outcome.result.get() {
                return result.clone().map(|(partition, base)| Delivery {
                    partition,
                    offset: base + self.index,
                });
            }
            notified.await;
        }
    }
}

struct Waiting {
    record: Record,
    size: usize,
    slot: oneshot::Sender<Slot>,
}

enum Ticket {
    Placed(Slot),
    Waiting(oneshot::Receiver<Slot>),
    Failed(Error),
}

/// Initial capacity of a batch buffer; it grows (doubling) up to the batch limit.
const BATCH_CAPACITY_INITIAL: usize = 16 << 10;
/// Headers encoded without a heap allocation for their list.
const INLINE_HEADERS: usize = 8;

impl Producer {
    pub(crate) async fn new(
        client: BrokerClient<Channel>,
        admin: Admin,
        topic: &str,
        config: ProducerConfig,
    ) -> Result<Producer> {
        let info = admin.describe_topic(topic).await?.topic;
        if info.partitions == 0 {
            return Err(Error::Protocol {
                message: format!("topic {topic:?} has no partitions"),
            });
        }
        let topic_max = info
            .config
            .max_message_bytes
            .map_or(usize::MAX, |m| m as usize);
        let batch_bytes_max = config
            .max_batch_bytes
            .min(topic_max)
            .max(BATCH_HEADER_LEN + 1);
        let state = State {
            partitions: (0..info.partitions)
                .map(|_| PartitionState::default())
                .collect(),
            sticky: 0,
            backlog: VecDeque::new(),
            buffered_bytes: 0,
            outstanding: 0,
            next_generation: 0,
            flushing: 0,
        };
        Ok(Producer {
            shared: Arc::new(Shared {
                client,
                runtime: tokio::runtime::Handle::current(),
                topic: topic.to_string(),
                partitions: info.partitions,
                batch_bytes_max,
                config: ProducerConfig {
                    max_in_flight: config.max_in_flight.max(1),
                    ..config
                },
                state: Mutex::new(state),
                idle: Notify::new(),
            }),
        })
    }

    /// The topic this producer writes to.
    pub fn topic(&self) -> &str {
        &self.shared.topic
    }

    /// The topic's partition count.
    pub fn partitions(&self) -> u32 {
        self.shared.partitions
    }

    /// The batch size limit in force: the configured one, or the topic's
    /// `max_message_bytes` if smaller.
    pub fn max_batch_bytes(&self) -> usize {
        self.shared.batch_bytes_max
    }

    /// Adds `record` to its partition's batch now and returns a future that resolves to
    /// where it was stored once the broker acknowledges the batch (or to the error that
    /// failed it after any retries). The record is sent whether or not the future is
    /// awaited. Records sent by one caller keep their order within a partition (with
    /// `max_in_flight` 1, the default).
    pub fn send(&self, record: Record) -> impl Future<Output = Result<Delivery>> + Send + 'static {
        let ticket = self.shared.enqueue(record);
        async move {
            let slot = match ticket {
                Ticket::Placed(slot) => slot,
                Ticket::Waiting(rx) => rx.await.map_err(|_| Error::Closed)?,
                Ticket::Failed(e) => return Err(e),
            };
            slot.wait().await
        }
    }

    /// Sends every open batch now and waits until every record sent so far has its
    /// outcome (acknowledged or failed). While other tasks keep sending, it waits until
    /// there is a moment with nothing outstanding.
    pub async fn flush(&self) {
        /// Counts the flush as running until it returns or is dropped.
        struct Flushing<'a>(&'a Shared);
        impl Drop for Flushing<'_> {
            fn drop(&mut self) {
                self.0.lock().flushing -= 1;
            }
        }
        self.shared.lock().flushing += 1;
        let _running = Flushing(&self.shared);
        self.flush_inner().await;
    }

    async fn flush_inner(&self) {
        loop {
            let idle = self.shared.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            {
                let mut state = self.shared.lock();
                if state.outstanding == 0 {
                    return;
                }
                for p in 0..self.shared.partitions {
                    if state.partitions[p as usize].open.is_some() {
                        self.shared.seal(&mut state, p);
                    }
                }
            }
            idle.await;
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the state as consistent as any single
        // step does; keep serving rather than poisoning every later send.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn enqueue(self: &Arc<Self>, record: Record) -> Ticket {
        let size = record.encoded_len_max();
        if BATCH_HEADER_LEN + size > self.batch_bytes_max {
            return Ticket::Failed(Error::RecordTooLarge {
                size: BATCH_HEADER_LEN + size,
                max: self.batch_bytes_max,
            });
        }
        let mut state = self.lock();
        state.outstanding += 1;
        if state.backlog.is_empty() && self.has_room(&state, size) {
            Ticket::Placed(self.append(&mut state, record, size))
        } else {
            let (slot, rx) = oneshot::channel();
            state.backlog.push_back(Waiting { record, size, slot });
            Ticket::Waiting(rx)
        }
    }

    fn has_room(&self, state: &State, size: usize) -> bool {
        state.buffered_bytes == 0 || state.buffered_bytes + size <= self.config.buffer_bytes_max
    }

    /// Encodes `record` into its partition's open batch, sealing a full batch first.
    fn append(self: &Arc<Self>, state: &mut State, record: Record, size: usize) -> Slot {
        let mut partition = self.partition_of(state, &record);
        loop {
            let open = &state.partitions[partition as usize].open;
            match open {
                Some(open) if open.builder.encoded_len() + size > self.batch_bytes_max => {
                    self.seal(state, partition);
                    partition = self.partition_of(state, &record);
                }
                _ => break,
            }
        }
        let generation = state.next_generation;
        let part = &mut state.partitions[partition as usize];
        let open = part.open.get_or_insert_with(|| {
            let capacity = BATCH_CAPACITY_INITIAL.min(self.batch_bytes_max);
            OpenBatch {
                builder: BatchBuilder::with_buffer(Vec::with_capacity(capacity)),
                outcome: Arc::new(Outcome::default()),
                generation,
                reserved: 0,
            }
        });
        let opened = open.builder.is_empty();
        let index = open.builder.len() as u64;
        let timestamp = record.timestamp_ms.unwrap_or_else(crate::now_ms);
        let (key, value) = (record.key.as_deref(), record.value.as_deref());
        if record.headers.len() <= INLINE_HEADERS {
            let mut headers: [(&str, &[u8]); INLINE_HEADERS] = [("", &[]); INLINE_HEADERS];
            for (slot, (name, value)) in headers.iter_mut().zip(&record.headers) {
                *slot = (name.as_str(), value.as_ref());
            }
            open.builder
                .push(timestamp, key, value, &headers[..record.headers.len()]);
        } else {
            let headers: Vec<(&str, &[u8])> = record
                .headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_ref()))
                .collect();
            open.builder.push(timestamp, key, value, &headers);
        }
        open.reserved += size;
        let slot = Slot {
            outcome: Arc::clone(&open.outcome),
            index,
        };
        state.buffered_bytes += size;
        if self.config.linger.is_zero() {
            self.seal_if_idle(state, partition);
        } else if opened {
            state.next_generation += 1;
            let shared = Arc::clone(self);
            let linger = self.config.linger;
            self.runtime.spawn(async move {
                tokio::time::sleep(linger).await;
                shared.linger_expired(partition, generation);
            });
        }
        slot
    }

    /// Without a linger, the open batch goes out as soon as a request slot is free; until
    /// then it keeps collecting records.
    fn seal_if_idle(self: &Arc<Self>, state: &mut State, partition: u32) {
        let part = &state.partitions[partition as usize];
        if part.in_flight < self.config.max_in_flight && part.queued.is_empty() {
            self.seal(state, partition);
        }
    }

    fn partition_of(&self, state: &State, record: &Record) -> u32 {
        match &record.key {
            Some(key) => strata_proto::partition_for_key(key, self.partitions),
            None => state.sticky,
        }
    }

    fn linger_expired(self: &Arc<Self>, partition: u32, generation: u64) {
        let mut state = self.lock();
        let current = state.partitions[partition as usize]
            .open
            .as_ref()
            .is_some_and(|open| open.generation == generation);
        if current {
            self.seal(&mut state, partition);
        }
    }

    /// Closes the open batch of `partition`, queues it and sends what the in-flight
    /// limit allows. Moves the sticky partition on when it was this one.
    fn seal(self: &Arc<Self>, state: &mut State, partition: u32) {
        let part = &mut state.partitions[partition as usize];
        let Some(open) = part.open.take() else {
            return;
        };
        let records = open.builder.len();
        part.queued.push_back(Sealed {
            bytes: Bytes::from(open.builder.finish()),
            outcome: open.outcome,
            records,
            reserved: open.reserved,
        });
        if state.sticky == partition {
            state.sticky = (partition + 1) % self.partitions;
        }
        self.pump(state, partition);
    }

    fn pump(self: &Arc<Self>, state: &mut State, partition: u32) {
        let part = &mut state.partitions[partition as usize];
        while part.in_flight < self.config.max_in_flight {
            let Some(batch) = part.queued.pop_front() else {
                break;
            };
            part.in_flight += 1;
            let shared = Arc::clone(self);
            self.runtime.spawn(shared.deliver(partition, batch));
        }
    }

    async fn deliver(self: Arc<Self>, partition: u32, batch: Sealed) {
        let result = self.produce(partition, &batch.bytes).await;
        let _ = batch
            .outcome
            .result
            .set(result.map(|base| (partition, base)));
        batch.outcome.done.notify_waiters();
        let mut state = self.lock();
        state.partitions[partition as usize].in_flight -= 1;
        state.buffered_bytes -= batch.reserved;
        state.outstanding -= batch.records;
        self.pump(&mut state, partition);
        if self.config.linger.is_zero() {
            self.seal_if_idle(&mut state, partition);
        }
        self.drain_backlog(&mut state);
        if state.flushing > 0 {
            for p in 0..self.partitions {
                self.seal(&mut state, p);
            }
        }
        if state.outstanding == 0 {
            self.idle.notify_waiters();
        }
    }

    /// Places waiting records, in order, while there is room.
    fn drain_backlog(self: &Arc<Self>, state: &mut State) {
        while let Some(front) = state.backlog.front() {
            if !self.has_room(state, front.size) {
                break;
            }
            let Some(waiting) = state.backlog.pop_front() else {
                break;
            };
            let slot = self.append(state, waiting.record, waiting.size);
            // A dropped send future does not unsend its record.
            let _ = waiting.slot.send(slot);
        }
    }

    /// Sends one batch, retrying retriable failures with backoff; its base offset.
    async fn produce(&self, partition: u32, batch: &Bytes) -> Result<u64> {
        let acks = match self.config.acks {
            Acks::Durable => v1::Acks::Durable,
            Acks::Leader => v1::Acks::Leader,
        };
        let mut attempt = 0;
        loop {
            let mut request = tonic::Request::new(v1::ProduceRequest {
                topic: self.topic.clone(),
                target: Some(v1::produce_request::Target::Partition(partition)),
                records: Vec::new(),
                batch: batch.clone(),
                acks: acks.into(),
            });
            request.set_timeout(self.config.request_timeout);
            let error = match self.client.clone().produce(request).await {
                Ok(answer) => return Ok(answer.into_inner().base_offset),
                Err(status) => Error::from_status(status, &self.topic, None),
            };
            if !error.is_retriable() || attempt >= self.config.retries {
                return Err(error);
            }
            let delay = crate::backoff(
                self.config.retry_backoff_min,
                self.config.retry_backoff_max,
                attempt,
            );
            attempt += 1;
            tokio::time::sleep(delay).await;
        }
    }
}
