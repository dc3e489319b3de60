//! The batching producer.
//!
//! Records are encoded, as they are sent, straight into the open batch of their
//! partition (one buffer per batch, `BatchBuilder`), so the hot path allocates nothing
//! per record. A batch is sealed when the next record would not fit in
//! `max_batch_bytes`, when its `linger` expires, or on [`Producer::flush`]. Sealed
//! batches wait in their partition's queue until the partition has a free request slot:
//! `max_in_flight` bounds the window from its oldest unanswered batch to its newest
//! sent one, so a batch answered early does not free a slot while one sent before it
//! still waits (for idempotence, that window must not outgrow what the broker
//! remembers). All state sits behind one mutex that is never held
//! across an `.await`.
//!
//! With [`ProducerConfig::compression`], a batch's records are compressed when it leaves
//! its queue (under the mutex, as Kafka's producers compress as they append), once:
//! retries send the same bytes. A batch compression would not shrink goes plain.
//!
//! Each batch has one shared [`Outcome`]; a record's send future holds the outcome and
//! its index in the batch, and reads its offset from there once the broker answers.
//!
//! # Idempotence
//!
//! An idempotent producer gets a producer id from the broker when it is created. When a
//! batch leaves its partition's queue it is stamped with the id, the partition's epoch
//! and the partition's next sequence number, and its header and CRC are final: every
//! retry sends the same bytes, so the broker recognises it and answers a retry of a
//! stored batch with the original offsets. The broker accepts a partition's batches
//! only in sequence order, so with several requests in flight a batch that overtook an
//! earlier one is refused as out of order; it then waits for the earlier batch's outcome
//! and is sent again if that was stored. The one exception is a producer the partition
//! does not know (its first batch there, or one the broker has forgotten, for instance
//! after a day without writes): the broker accepts any first sequence from it, so a batch
//! overtaking that first one would be stored ahead of it. Therefore a batch sent while
//! nothing else of its partition is unanswered goes alone: the next one waits for its
//! answer. A batch that fails for good leaves a hole in
//! the sequence that no later batch can follow, so the later ones in flight fail with
//! it, and once none is in flight the partition starts a new epoch at sequence 0.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use strata_proto::v1::{self, broker_client::BrokerClient};
use strata_storage::batch::{BatchBuilder, BATCH_HEADER_LEN};
use strata_storage::compression::Compression;
use strata_storage::producer::{next_sequence, RECENT_BATCHES};
use tokio::sync::{oneshot, Notify};
use tonic::transport::Channel;
use tonic::Code;
use tracing::Instrument;

use crate::admin::Admin;
use crate::error::{Error, Result};
use crate::record::{headers, Record};
use crate::trace::{ClientSpan, SpanKind, TraceContext};

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
    /// Produce requests in flight per partition (default 1), counted from the oldest
    /// unanswered one: a batch is not sent while the one this many places before it
    /// waits for its answer. With `idempotent` (the default) records stay in order
    /// whatever the value, because the broker writes a partition's batches only in
    /// sequence order; at most [`RECENT_BATCHES`] (5) is used, the number of batches the
    /// broker remembers per producer for recognising retries. Without `idempotent`, the
    /// broker may append two requests in flight to one partition in either order, so
    /// values above 1 trade per-partition (and per-key) ordering for throughput.
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
    /// Idempotent produce (default true), as Kafka's `enable.idempotence`: the producer
    /// gets a producer id from the broker and numbers its records per partition, and
    /// the broker stores each batch once however often it is retried, so a retry after
    /// a dropped connection or a timeout never writes a record twice. Costs one call to
    /// the broker when the producer is created. Off: a retried batch can be stored
    /// twice (at least once).
    pub idempotent: bool,
    /// Codec the records of each batch are compressed with (default none), as Kafka's
    /// `compression.type`. The broker stores batches as sent and every consumer, Kafka
    /// clients included, decompresses them. `max_batch_bytes` and the topic's
    /// `max_message_bytes` limit the batch before compression; a batch that compression
    /// would not make smaller (incompressible records: the codec adds framing) is sent
    /// uncompressed, so compression never takes a batch past the limit it was sized
    /// for. A batch is compressed once, when it is sent.
    pub compression: Compression,
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
            idempotent: true,
            compression: Compression::None,
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
/// batch. Retriable failures are retried with exponential backoff. With
/// [`ProducerConfig::idempotent`] (the default) a retried batch is stored once: after a
/// dropped connection or a timeout, the broker recognises a batch it already has and
/// answers with the original offsets. Without it delivery is at least once: a retried
/// batch can be stored twice.
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

/// The producer id and the epoch the broker handed out.
#[derive(Debug, Clone, Copy)]
struct Identity {
    producer_id: i64,
    epoch: i16,
}

struct Shared {
    client: BrokerClient<Channel>,
    /// Set for an idempotent producer.
    identity: Option<Identity>,
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

struct PartitionState {
    open: Option<OpenBatch>,
    queued: VecDeque<Sealed>,
    /// The batches sent, from the oldest one still unanswered on; answered ones leave
    /// from the front only. Its length is what `max_in_flight` bounds.
    window: VecDeque<Arc<Outcome>>,
    /// Idempotence: the epoch of the next batch sent.
    epoch: i16,
    /// Idempotence: the sequence number of the next batch's first record.
    next_sequence: i32,
    /// Idempotence: a batch failed for good, so its sequence numbers are a hole no later
    /// batch of this epoch can follow; the next batch sent starts a new epoch.
    new_epoch_due: bool,
    /// Idempotence: the batch sent when nothing else was unanswered. No other is sent
    /// until it has its answer, as the broker may not know the producer yet and would
    /// then accept a batch overtaking it.
    probe: Option<Arc<Outcome>>,
}

impl PartitionState {
    fn new(epoch: i16) -> PartitionState {
        PartitionState {
            open: None,
            queued: VecDeque::new(),
            window: VecDeque::new(),
            epoch,
            next_sequence: 0,
            new_epoch_due: false,
            probe: None,
        }
    }
}

struct OpenBatch {
    builder: BatchBuilder,
    outcome: Arc<Outcome>,
    generation: u64,
    reserved: usize,
}

/// A batch closed for records, waiting for a request slot. Its header is filled in
/// (producer id, epoch, sequence, CRC) when it is sent.
struct Sealed {
    builder: BatchBuilder,
    outcome: Arc<Outcome>,
    records: usize,
    reserved: usize,
}

/// A batch being sent, with its final bytes.
struct Sending {
    /// The bytes, identical in every attempt; or why the batch cannot be sent.
    bytes: Result<Bytes>,
    outcome: Arc<Outcome>,
    records: usize,
    reserved: usize,
    /// Idempotence: the batch sent before this one to the partition in this epoch.
    previous: Option<Arc<Outcome>>,
}

/// The answer for one batch: its partition and base offset, or the error.
#[derive(Default)]
struct Outcome {
    result: OnceLock<Result<(u32, u64)>>,
    done: Notify,
}

impl Outcome {
    /// Waits for the result.
    async fn settled(&self) -> Result<(u32, u64)> {
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(result) = self.result.get() {
                return result.clone();
            }
            notified.await;
        }
    }
}

/// A record's place in a batch.
struct Slot {
    outcome: Arc<Outcome>,
    index: u64,
}

impl Slot {
    async fn wait(self) -> Result<Delivery> {
        let (partition, base) = self.outcome.settled().await?;
        Ok(Delivery {
            partition,
            offset: base + self.index,
        })
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
        let identity = match config.idempotent {
            true => Some(init_producer(client.clone()).await?),
            false => None,
        };
        let max_in_flight = match identity {
            Some(_) => config.max_in_flight.clamp(1, RECENT_BATCHES),
            None => config.max_in_flight.max(1),
        };
        let epoch = identity.map_or(0, |i| i.epoch);
        let state = State {
            partitions: (0..info.partitions)
                .map(|_| PartitionState::new(epoch))
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
                identity,
                runtime: tokio::runtime::Handle::current(),
                topic: topic.to_string(),
                partitions: info.partitions,
                batch_bytes_max,
                config: ProducerConfig {
                    max_in_flight,
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

    /// The producer id the broker handed out, for an idempotent producer.
    pub fn producer_id(&self) -> Option<i64> {
        self.shared.identity.map(|i| i.producer_id)
    }

    /// Adds `record` to its partition's batch now and returns a future that resolves to
    /// where it was stored once the broker acknowledges the batch (or to the error that
    /// failed it after any retries). The record is sent whether or not the future is
    /// awaited. Records sent by one caller keep their order within a partition (with
    /// idempotence, or with `max_in_flight` 1).
    ///
    /// Sent inside a trace context ([`crate::trace`]), the record gets a `traceparent`
    /// header naming a child of it (unless it has one), and the future is instrumented
    /// with a `strata.produce` span.
    pub fn send(
        &self,
        mut record: Record,
    ) -> impl Future<Output = Result<Delivery>> + Send + 'static {
        let (span, mut publish) = match TraceContext::current() {
            Some(parent) => {
                let publish = ClientSpan::start(
                    SpanKind::Producer,
                    format!("{} publish", self.shared.topic),
                    parent,
                );
                if !record
                    .headers
                    .iter()
                    .any(|(n, _)| n == headers::TRACEPARENT)
                {
                    record.headers.push((
                        headers::TRACEPARENT.to_string(),
                        publish.context.to_string().into(),
                    ));
                }
                let span = tracing::debug_span!(
                    "strata.produce",
                    topic = %self.shared.topic,
                    trace_id = %publish.context.trace_id_hex(),
                );
                (span, Some(publish))
            }
            None => (tracing::Span::none(), None),
        };
        let ticket = self.shared.enqueue(record);
        async move {
            let slot = match ticket {
                Ticket::Placed(slot) => slot,
                Ticket::Waiting(rx) => rx.await.map_err(|_| Error::Closed)?,
                Ticket::Failed(e) => return Err(e),
            };
            let delivery = slot.wait().await;
            if let (Some(publish), Ok(d)) = (&mut publish, &delivery) {
                publish.record_position(d.partition, d.offset);
            }
            delivery
        }
        .instrument(span)
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
        if part.window.len() < self.config.max_in_flight && part.queued.is_empty() {
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
            builder: open.builder,
            outcome: open.outcome,
            records,
            reserved: open.reserved,
        });
        if state.sticky == partition {
            state.sticky = (partition + 1) % self.partitions;
        }
        self.pump(state, partition);
    }

    /// Sends queued batches of `partition` while it has free request slots.
    fn pump(self: &Arc<Self>, state: &mut State, partition: u32) {
        let part = &mut state.partitions[partition as usize];
        while part.window.len() < self.config.max_in_flight {
            if part.new_epoch_due {
                // Batches of the old epoch still in flight must not be fenced by the new
                // one before they have their answers.
                if !part.window.is_empty() {
                    break;
                }
                if let Some(epoch) = part.epoch.checked_add(1) {
                    part.new_epoch_due = false;
                    part.next_sequence = 0;
                    part.epoch = epoch;
                }
            }
            if let Some(probe) = &part.probe {
                if probe.result.get().is_none() {
                    break;
                }
                part.probe = None;
            }
            let Some(batch) = part.queued.pop_front() else {
                break;
            };
            if self.identity.is_some() && part.window.is_empty() {
                part.probe = Some(Arc::clone(&batch.outcome));
            }
            let (bytes, previous) = match self.identity {
                None => (
                    Ok(Bytes::from(
                        batch
                            .builder
                            .finish_compressed_if_smaller(self.config.compression),
                    )),
                    None,
                ),
                // Still due after the bump above: 32,767 epochs ended in failed batches.
                Some(_) if part.new_epoch_due => (
                    Err(Error::SequenceRejected {
                        message: format!(
                            "every producer epoch of partition {partition} ended with a \
                             failed batch; create a new producer"
                        ),
                    }),
                    None,
                ),
                Some(identity) => {
                    let sequence = part.next_sequence;
                    part.next_sequence = next_sequence(sequence, batch.records as i32);
                    let bytes = batch
                        .builder
                        .producer(identity.producer_id, part.epoch, sequence)
                        .finish_compressed_if_smaller(self.config.compression);
                    (Ok(Bytes::from(bytes)), part.window.back().cloned())
                }
            };
            part.window.push_back(Arc::clone(&batch.outcome));
            let sending = Sending {
                bytes,
                outcome: batch.outcome,
                records: batch.records,
                reserved: batch.reserved,
                previous,
            };
            let shared = Arc::clone(self);
            self.runtime.spawn(shared.deliver(partition, sending));
        }
    }

    async fn deliver(self: Arc<Self>, partition: u32, batch: Sending) {
        let result = match &batch.bytes {
            Ok(bytes) => {
                self.produce(partition, bytes, batch.previous.as_deref())
                    .await
            }
            Err(e) => Err(e.clone()),
        };
        let failed = result.is_err();
        let _ = batch
            .outcome
            .result
            .set(result.map(|base| (partition, base)));
        batch.outcome.done.notify_waiters();
        let mut state = self.lock();
        let part = &mut state.partitions[partition as usize];
        while part
            .window
            .front()
            .is_some_and(|o| o.result.get().is_some())
        {
            part.window.pop_front();
        }
        if failed && self.identity.is_some() {
            part.new_epoch_due = true;
        }
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
    /// `previous` is the batch of the same partition and epoch sent just before it, for
    /// an idempotent producer.
    async fn produce(
        &self,
        partition: u32,
        batch: &Bytes,
        previous: Option<&Outcome>,
    ) -> Result<u64> {
        let acks = match self.config.acks {
            Acks::Durable => v1::Acks::Durable,
            Acks::Leader => v1::Acks::Leader,
        };
        let mut attempt = 0;
        loop {
            // Whether the batch before this one had its answer before this attempt left.
            let previous_pending = previous.is_some_and(|p| p.result.get().is_none());
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
                Err(status)
                    if status.code() == Code::FailedPrecondition && self.identity.is_some() =>
                {
                    let refused = Error::SequenceRejected {
                        message: status.message().to_string(),
                    };
                    // Refused as out of order because it overtook the batch before it,
                    // which was still in flight: send it again once that one is stored.
                    match previous {
                        Some(previous) if previous_pending => match previous.settled().await {
                            Ok(_) => continue,
                            Err(e) => {
                                return Err(Error::SequenceRejected {
                                    message: format!(
                                        "the batch sent before this one to partition \
                                         {partition} failed ({e}), so this one cannot follow \
                                         it in sequence"
                                    ),
                                })
                            }
                        },
                        _ => return Err(refused),
                    }
                }
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

/// Asks the broker for a producer id.
async fn init_producer(mut client: BrokerClient<Channel>) -> Result<Identity> {
    let answer = client
        .init_producer(v1::InitProducerRequest {})
        .await
        .map_err(|status| match status.code() {
            Code::Unimplemented => Error::Protocol {
                message: format!(
                    "the broker does not support idempotent producers ({}); set \
                     ProducerConfig::idempotent to false",
                    status.message()
                ),
            },
            _ => Error::from_status(status, "", None),
        })?
        .into_inner();
    let epoch = i16::try_from(answer.producer_epoch).map_err(|_| Error::Protocol {
        message: format!(
            "producer epoch {} does not fit a record batch",
            answer.producer_epoch
        ),
    })?;
    if answer.producer_id < 0 || epoch < 0 {
        return Err(Error::Protocol {
            message: format!(
                "invalid producer id {} or epoch {epoch}",
                answer.producer_id
            ),
        });
    }
    Ok(Identity {
        producer_id: answer.producer_id,
        epoch,
    })
}
