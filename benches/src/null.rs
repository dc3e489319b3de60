//! The null target: no broker, no network. It measures the load generator's own ceiling.
//!
//! Each producer does what the Strata producer path does with a message, minus the
//! network: the generator makes the payload, the sink encodes it into a Kafka v2 record
//! batch with the same codec (`strata_storage::batch::BatchBuilder`, one buffer per
//! batch), and seals the batch when the next message would not fit in `batch_bytes` or
//! when a fixed-rate generator is about to sleep. A sealed batch counts as acknowledged
//! at once (publish → ack latency is the time a message waited in its batch), and is
//! handed as `Bytes` through a bounded in-memory channel to the consumer of its
//! partition in every set, which decodes it with the same codec and does the same
//! per-message work as a Strata consumer (header, latency, exactly-once bitmap).
//! Partitions are taken in turn, one batch each, like the client's sticky partitioner.
//!
//! In replay runs the sealed batches are kept in memory and the consumers read them
//! after the producers finish.

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use strata_storage::batch::{batches, BatchBuilder};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::generator::{generate, GeneratorPlan, Offer, SinkClosed, Took};
use crate::options::{Mode, Plan};
use crate::report::TargetInfo;
use crate::run::{Acks, ConsumerOutcome, Consumption, ProducerOutcome, Shared};

/// Upper bound of a record's framing in a batch besides its value (length, attributes,
/// timestamp and offset deltas, null key, value length, header count): the client's own
/// reservation per record.
const RECORD_FRAMING_MAX: usize = 36;
/// Sealed batches a consumer may have waiting.
const CONSUMER_QUEUE_BATCHES: usize = 64;

/// Where sealed batches go: per partition, the channel of its consumer in each set.
type Routes = Vec<Vec<mpsc::Sender<Bytes>>>;

/// The null target.
pub struct NullTarget {
    partitions: u32,
    routes: Arc<Mutex<Routes>>,
    /// Replay runs: every sealed batch, per partition.
    log: Option<Arc<Mutex<Vec<Vec<Bytes>>>>>,
}

impl NullTarget {
    /// A null target for the plan.
    pub fn new(plan: &Plan) -> NullTarget {
        let partitions = plan.partitions;
        NullTarget {
            partitions,
            routes: Arc::new(Mutex::new(vec![Vec::new(); partitions as usize])),
            log: (plan.mode == Mode::Replay)
                .then(|| Arc::new(Mutex::new(vec![Vec::new(); partitions as usize]))),
        }
    }

    /// What the report says about this target.
    pub fn info(&self) -> TargetInfo {
        TargetInfo {
            name: "null".into(),
            version: None,
            address: None,
            durability: "-".into(),
            durability_detail: "no broker: a batch is acknowledged when it is sealed and \
                                handed to the consumers in memory"
                .into(),
            notes: vec![
                "measures the generator itself: payloads, batch encoding and decoding with \
                 the Strata codec, acknowledgement and latency bookkeeping, without network, \
                 broker or client"
                    .into(),
            ],
        }
    }

    pub(crate) fn start_producer(
        &self,
        shared: &Arc<Shared>,
        plan: GeneratorPlan,
    ) -> JoinHandle<ProducerOutcome> {
        let routes = lock(&self.routes).clone();
        let mut sink = NullSink {
            acks: Acks::new(shared),
            builder: new_builder(shared.plan.batch_bytes),
            sent_ns: Vec::new(),
            batch_bytes: shared.plan.batch_bytes,
            partition: plan.producer % self.partitions,
            partitions: self.partitions,
            routes,
            log: self.log.clone(),
            clock: shared.clock,
        };
        let sent_tally = shared.meters.sent.register();
        let clock = shared.clock;
        let generator = tokio::task::spawn_blocking(move || {
            let sent = generate(&plan, clock, &sent_tally, |offer| sink.offer(offer));
            sink.seal();
            ProducerOutcome {
                sent,
                acks: sink.acks.finish(),
            }
        });
        tokio::spawn(async move { generator.await.unwrap_or_default() })
    }

    pub(crate) fn start_consumer(
        &self,
        shared: &Arc<Shared>,
        set: u32,
        partitions: Vec<u32>,
    ) -> JoinHandle<ConsumerOutcome> {
        let mut consumption = Consumption::new(shared, set);
        if let Some(log) = &self.log {
            // Replay: the backlog is complete; read it.
            let log = Arc::clone(log);
            return tokio::task::spawn_blocking(move || {
                let log = lock(&log);
                for partition in partitions {
                    for batch in &log[partition as usize] {
                        decode(batch, &mut consumption);
                    }
                }
                consumption.finish(None)
            });
        }
        let (tx, mut rx) = mpsc::channel::<Bytes>(CONSUMER_QUEUE_BATCHES);
        {
            let mut routes = lock(&self.routes);
            for &partition in &partitions {
                routes[partition as usize].push(tx.clone());
            }
        }
        let shared = Arc::clone(shared);
        tokio::spawn(async move {
            let stop = shared.stop_signal();
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    biased;
                    _ = &mut stop => break,
                    batch = rx.recv() => match batch {
                        Some(batch) => decode(&batch, &mut consumption),
                        None => break,
                    },
                }
            }
            consumption.finish(None)
        })
    }
}

/// Reads one handed-over batch. Its first record is the one waited for; the rest came
/// with it.
fn decode(bytes: &Bytes, consumption: &mut Consumption) {
    let mut waited = true;
    for batch in batches(bytes) {
        let Ok(batch) = batch else {
            // The sink built it; a codec that cannot read its own output is a bug.
            unreachable!("the null target made an invalid batch");
        };
        for record in batch.records() {
            match record {
                Ok(record) => {
                    consumption.message(record.value.unwrap_or_default(), waited);
                    waited = false;
                }
                Err(e) => unreachable!("the null target made an invalid record: {e}"),
            }
        }
    }
}

struct NullSink {
    acks: Acks,
    builder: BatchBuilder,
    /// Send times of the messages in the open batch.
    sent_ns: Vec<u64>,
    batch_bytes: usize,
    partition: u32,
    partitions: u32,
    routes: Routes,
    log: Option<Arc<Mutex<Vec<Vec<Bytes>>>>>,
    clock: crate::payload::Clock,
}

impl NullSink {
    fn offer(&mut self, offer: Offer<'_>) -> Result<Took, SinkClosed> {
        match offer {
            Offer::Message { value, sent_ns } => {
                let value = value.current();
                let mut took = Took::AtOnce;
                if !self.builder.is_empty()
                    && self.builder.encoded_len() + value.len() + RECORD_FRAMING_MAX
                        > self.batch_bytes
                {
                    self.seal();
                    took = Took::MayHaveWaited;
                }
                let timestamp = self.clock.wall_ms(sent_ns);
                self.builder.push(timestamp, None, Some(value), &[]);
                self.sent_ns.push(sent_ns);
                Ok(took)
            }
            Offer::Idle => {
                self.seal();
                Ok(Took::MayHaveWaited)
            }
        }
    }

    /// Acknowledges the open batch and hands it to its partition's consumers.
    fn seal(&mut self) {
        if self.builder.is_empty() {
            return;
        }
        let builder = std::mem::replace(&mut self.builder, new_builder(self.batch_bytes));
        let batch = Bytes::from(builder.finish());
        let now_ns = self.clock.now_ns();
        for &sent_ns in &self.sent_ns {
            self.acks.ok_at(sent_ns, now_ns);
        }
        self.sent_ns.clear();
        let partition = self.partition as usize;
        self.partition = (self.partition + 1) % self.partitions;
        for consumer in &self.routes[partition] {
            // A consumer that stopped takes nothing more; the others still do.
            let _ = consumer.blocking_send(batch.clone());
        }
        if let Some(log) = &self.log {
            lock(log)[partition].push(batch);
        }
    }
}

fn new_builder(batch_bytes: usize) -> BatchBuilder {
    BatchBuilder::with_buffer(Vec::with_capacity(batch_bytes))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}
