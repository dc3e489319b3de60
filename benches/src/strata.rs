//! The Strata target, through `strata-client`.
//!
//! - Producer: one `Producer` (its own connection) per generator. The generator thread
//!   calls [`Producer::send`], which places the record in its batch at once and returns
//!   the future of its acknowledgement; the future goes, with the send time, through a
//!   bounded channel to an async collector that awaits the futures in send order and
//!   records publish → ack latency. The channel's capacity is the producer's window of
//!   unacknowledged messages (`--max-pending`).
//! - Consumer: standalone `PartitionConsumer`s (one connection per consumer), merged
//!   when a consumer reads several partitions; or, with `--consumer-mode groups`, one
//!   group `Consumer` per member, each set being one consumer group. Either way a
//!   consumer is a stream of records fed to the shared [`Consumption`].

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use strata_client::{
    Client, ConsumedRecord, ConsumerConfig, ConsumerGroupConfig, Durability, GroupState,
    ProducerConfig, Record, StartAt, TopicConfig,
};
use strata_spawn::{find_strata, BrokerDir, SpawnedBroker};
use tokio::task::JoinHandle;
use tokio_stream::{Stream, StreamExt, StreamMap};

use crate::error::{Error, Result};
use crate::floor::{self, Floor};
use crate::generator::{generate, GeneratorPlan, Offer};
use crate::options::{ConsumerMode, Options, Plan};
use crate::report::TargetInfo;
use crate::run::{
    ready_or_wait, Acks, ChunkSender, ConsumerOutcome, Consumption, ProducerOutcome, Shared,
};

/// Unacknowledged bytes a producer may have by default (`--max-pending` overrides the
/// count): enough for the client to keep a batch in flight and the next one filling on
/// every partition, and well under its 64 MiB buffer, so sends never queue inside the
/// client. At max rate every message waits behind this window, so it sets the latency
/// (window ÷ throughput); a larger one measured no higher throughput here.
const PENDING_BYTES_DEFAULT: usize = 8 << 20;
/// How long the consumer groups of a run may take to settle.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the settling groups are looked at.
const SETTLE_POLL: Duration = Duration::from_millis(20);

/// A Strata broker with the run's topic.
pub struct StrataTarget {
    address: String,
    topic: String,
    admin: strata_client::Admin,
    spawned: Option<SpawnedBroker>,
    durability: Durability,
    window: usize,
    consumer_mode: ConsumerMode,
    consumer_sets: u32,
    keep: bool,
    /// How long creating the topic took.
    created_in: Duration,
}

impl StrataTarget {
    /// Starts a broker (unless `--broker` names one), connects, and creates the topic.
    pub async fn open(plan: &Plan, options: &Options, parent: &Path) -> Result<StrataTarget> {
        let spawned = match &options.broker {
            Some(_) => None,
            None => {
                let progress = (!options.quiet).then_some("strata-bench");
                let binary = find_strata(options.strata_bin.as_deref(), progress)?;
                let parent = parent.to_path_buf();
                let broker = tokio::task::spawn_blocking(move || {
                    SpawnedBroker::start(&binary, BrokerDir::Temporary(Some(&parent)))
                })
                .await
                .map_err(|e| Error::Broker(format!("the start task failed: {e}")))??;
                Some(broker)
            }
        };
        let address = match (&options.broker, &spawned) {
            (Some(address), _) => address.clone(),
            (None, Some(broker)) => broker.address().to_string(),
            (None, None) => unreachable!("a broker is given or spawned"),
        };
        let client = Client::connect(&address).await?;
        let admin = client.admin();
        let topic = format!(
            "bench-{}-{}-{}",
            plan.workload,
            std::process::id(),
            plan.durability.to_string().replace(':', "-")
        );
        let config = TopicConfig {
            durability: Some(plan.durability),
            // Room for the configured batch when it is above the broker's default limit.
            max_message_bytes: (plan.batch_bytes > 1 << 20).then_some(plan.batch_bytes as u32),
            ..TopicConfig::default()
        };
        let creating = std::time::Instant::now();
        admin.create_topic(&topic, plan.partitions, config).await?;
        let created_in = creating.elapsed();
        let window = plan
            .max_pending
            .unwrap_or(PENDING_BYTES_DEFAULT / plan.message_bytes)
            .max(1);
        Ok(StrataTarget {
            address,
            topic,
            admin,
            spawned,
            durability: plan.durability,
            window,
            consumer_mode: plan.consumer_mode,
            consumer_sets: plan.consumer_sets,
            keep: options.keep,
            created_in,
        })
    }

    /// What the report says about this target.
    pub fn info(&self) -> TargetInfo {
        let durability_detail = match self.durability {
            Durability::Fsync => {
                "fsync: a batch is acknowledged after it is fdatasynced (group commit)".into()
            }
            Durability::None => {
                "none: acknowledged once written to the page cache; the broker never fsyncs \
                 on commit"
                    .into()
            }
            Durability::IntervalMs(ms) => format!(
                "interval:{ms}: acknowledged once in the page cache, fsynced within about \
                 {ms} ms"
            ),
            other => other.to_string(),
        };
        let consumers = match self.consumer_mode {
            ConsumerMode::Groups => {
                "each consumer set is a consumer group (client Consumer, auto-commit every \
                 5 s), settled before the producers start"
            }
            ConsumerMode::Standalone => {
                "consumer sets are independent standalone partition consumers"
            }
        };
        let mut notes = vec![format!(
            "producer window {} unacknowledged messages; {consumers}",
            crate::report::thousands(self.window as f64)
        )];
        if let Some(broker) = &self.spawned {
            notes.push(format!(
                "broker {} started by the bench, data in {}; it shares the machine's cores \
                 with the load generator",
                broker.binary().display(),
                broker.data_dir().display()
            ));
        }
        TargetInfo {
            name: "strata".into(),
            version: None,
            address: Some(self.address.clone()),
            durability: self.durability.to_string(),
            durability_detail,
            notes,
        }
    }

    pub(crate) async fn start_producer(
        &self,
        shared: &Arc<Shared>,
        plan: GeneratorPlan,
    ) -> Result<JoinHandle<ProducerOutcome>> {
        let client = Client::connect(&self.address).await?;
        let config = ProducerConfig {
            linger: Duration::from_millis(shared.plan.linger_ms),
            max_batch_bytes: shared.plan.batch_bytes,
            ..ProducerConfig::default()
        };
        let producer = client.producer_with(&self.topic, config).await?;
        let (mut pending, mut acks_in) = ChunkSender::channel(self.window);
        let clock = shared.clock;
        let sent = shared.meters.sent.register();
        let generator = tokio::task::spawn_blocking(move || {
            let sent = generate(&plan, clock, &sent, |offer| match offer {
                Offer::Message { value, sent_ns } => {
                    let record = Record {
                        value: Some(value.copy_out()),
                        timestamp_ms: Some(clock.wall_ms(sent_ns)),
                        ..Record::default()
                    };
                    pending.push((producer.send(record), sent_ns))
                }
                // Hand over what waits, so acknowledgements are seen when they come.
                Offer::Idle => pending.flush(),
            });
            // A closed channel means the collector is gone and nothing is waiting.
            let _ = pending.flush();
            sent
        });
        let mut acks = Acks::new(shared);
        Ok(tokio::spawn(async move {
            while let Some(chunk) = acks_in.recv().await {
                for (delivery, sent_ns) in chunk {
                    match ready_or_wait(delivery).await {
                        (Ok(_), waited) => acks.ok(sent_ns, waited),
                        (Err(e), _) => acks.failed(1, e),
                    }
                }
            }
            let sent = match generator.await {
                Ok(sent) => sent,
                Err(e) => {
                    acks.failed(0, format!("the generator failed: {e}"));
                    0
                }
            };
            ProducerOutcome {
                sent,
                acks: acks.finish(),
            }
        }))
    }

    /// The transport floor: lone gRPC health checks on a connection of their own.
    pub(crate) async fn floor(&self, calls: u32) -> Result<Option<Floor>> {
        let client = Client::connect(&self.address).await?;
        floor::measure("gRPC health check", calls, || {
            let client = client.clone();
            async move {
                client.is_serving().await?;
                Ok(())
            }
        })
        .await
    }

    pub(crate) async fn start_consumer(
        &self,
        shared: &Arc<Shared>,
        set: u32,
        partitions: Vec<u32>,
    ) -> Result<JoinHandle<ConsumerOutcome>> {
        let client = Client::connect(&self.address).await?;
        let consumption = Consumption::new(shared, set);
        let shared = Arc::clone(shared);
        if self.consumer_mode == ConsumerMode::Groups {
            // The broker assigns the partitions; `partitions` only said how many
            // members the set has.
            let config = ConsumerGroupConfig {
                client_id: format!("strata-bench-set{set}"),
                ..ConsumerGroupConfig::default()
            };
            let consumer = client
                .consumer_with(&self.group_name(set), &[&self.topic], config)
                .await?;
            return Ok(tokio::spawn(async move {
                let (outcome, consumer) = consume(shared, consumption, consumer).await;
                // Leave the group at once rather than after the session timeout.
                let _ = tokio::time::timeout(Duration::from_secs(5), consumer.close()).await;
                outcome
            }));
        }
        let mut consumers = Vec::new();
        for partition in partitions {
            let consumer = client
                .partition_consumer_with(
                    &self.topic,
                    partition,
                    StartAt::Earliest,
                    ConsumerConfig::default(),
                )
                .await?;
            consumers.push((partition, consumer));
        }
        Ok(match consumers.pop() {
            // One partition needs no merging.
            Some((_, consumer)) if consumers.is_empty() => {
                tokio::spawn(async move { consume(shared, consumption, consumer).await.0 })
            }
            last => {
                let mut streams = StreamMap::new();
                for (partition, consumer) in consumers.into_iter().chain(last) {
                    streams.insert(partition, consumer);
                }
                let records = streams.map(|(_, record)| record);
                tokio::spawn(async move { consume(shared, consumption, records).await.0 })
            }
        })
    }

    /// Group mode: waits until every set's group is stable with all its members and
    /// every partition assigned, so the run does not measure the first rebalances.
    pub(crate) async fn settle(&self, plan: &Plan) -> Result<()> {
        if self.consumer_mode != ConsumerMode::Groups {
            return Ok(());
        }
        let deadline = tokio::time::Instant::now() + SETTLE_TIMEOUT;
        for set in 0..plan.consumer_sets {
            let group = self.group_name(set);
            loop {
                let d = self.admin.describe_group(&group).await?;
                let assigned: usize = d.members.iter().map(|m| m.assignment.len()).sum();
                let revoking = d.members.iter().any(|m| !m.revoking.is_empty());
                if d.group.state == GroupState::Stable
                    && d.members.len() == plan.consumers as usize
                    && assigned == plan.partitions as usize
                    && !revoking
                {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(Error::Broker(format!(
                        "consumer group {group} did not settle within {SETTLE_TIMEOUT:?}: \
                         {} member(s), {assigned} partition(s) assigned, state {:?}",
                        d.members.len(),
                        d.group.state
                    )));
                }
                tokio::time::sleep(SETTLE_POLL).await;
            }
        }
        Ok(())
    }

    /// What the run's partitions cost the broker, left idle for `idle`
    /// ([`crate::scale`]); only a broker the bench started has a process to read.
    pub(crate) async fn scale(
        &self,
        plan: &Plan,
        idle: Duration,
        quiet: bool,
    ) -> Result<crate::scale::ScaleResult> {
        let pid = self
            .spawned
            .as_ref()
            .map(SpawnedBroker::pid)
            .ok_or_else(|| {
                Error::Config("--idle-s reads the broker's process: let the bench start it".into())
            })?;
        crate::scale::probe(
            &self.address,
            &self.topic,
            plan.partitions,
            pid,
            self.created_in,
            idle,
            quiet,
        )
        .await
    }

    fn group_name(&self, set: u32) -> String {
        format!("{}-set{set}", self.topic)
    }

    /// Deletes the topic (and the groups) from a broker the run did not start, unless
    /// `--keep`; a started one is killed and its data removed.
    pub async fn close(self) {
        if self.spawned.is_none() && !self.keep {
            if self.consumer_mode == ConsumerMode::Groups {
                for set in 0..self.consumer_sets {
                    let _ = self.admin.delete_group(&self.group_name(set)).await;
                }
            }
            let _ = self.admin.delete_topic(&self.topic).await;
        }
    }
}

/// Reads `records` until the run stops or the stream fails; gives the stream back.
async fn consume<S>(
    shared: Arc<Shared>,
    mut consumption: Consumption,
    mut records: S,
) -> (ConsumerOutcome, S)
where
    S: Stream<Item = strata_client::Result<ConsumedRecord>> + Unpin,
{
    let stop = shared.stop_signal();
    tokio::pin!(stop);
    let error = loop {
        tokio::select! {
            biased;
            _ = &mut stop => break None,
            (next, waited) = ready_or_wait(records.next()) => match next {
                Some(Ok(record)) => {
                    consumption.message(record.value.as_deref().unwrap_or_default(), waited);
                }
                Some(Err(e)) => break Some(e.to_string()),
                None => break None,
            },
        }
    };
    (consumption.finish(error), records)
}
