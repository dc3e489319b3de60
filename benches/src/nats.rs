//! NATS JetStream as a peer target (feature `nats`).
//!
//! The run's messages go to one stream with file storage; its P partitions are P
//! subjects (`<stream>.<p>`), taken in turn per message. A producer's generator hands
//! messages in chunks to an async publisher, which publishes each with
//! `jetstream.publish` (no wait) and passes the acknowledgement future, with the send
//! time, to a collector that awaits them in order; at most `--max-pending` (default
//! 5,000) are unacknowledged. Each consumer reads its partitions through one ephemeral
//! pull consumer per subject, no acknowledgements, from the first message.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use async_nats::Subject;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::{StreamExt, StreamMap};

use crate::error::{Error, Result};
use crate::generator::{generate, GeneratorPlan, Offer};
use crate::options::Plan;
use crate::report::TargetInfo;
use crate::run::{
    ready_or_wait, Acks, ChunkSender, ConsumerOutcome, Consumption, ProducerOutcome, Shared,
};

/// Unacknowledged publishes per producer by default.
const PENDING_DEFAULT: usize = 5_000;
/// Messages a pull consumer asks for at once.
const PULL_BATCH: usize = 1_000;

/// A JetStream stream for the run.
pub struct NatsTarget {
    address: String,
    version: String,
    context: jetstream::Context,
    stream: String,
    subjects: Vec<Subject>,
    window: usize,
}

fn peer_error(message: impl std::fmt::Display) -> Error {
    Error::Peer {
        backend: "nats",
        message: message.to_string(),
    }
}

impl NatsTarget {
    /// Connects and creates the stream; [`Error::Unreachable`] if the server is not there.
    pub async fn open(plan: &Plan, address: &str) -> Result<NatsTarget> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .connect(address)
            .await
            .map_err(|e| Error::Unreachable {
                backend: "nats",
                address: address.to_string(),
                message: e.to_string(),
            })?;
        let version = client.server_info().version;
        let context = jetstream::new(client);
        let stream = format!("strata-bench-{}-{}", std::process::id(), plan.workload);
        let subjects = (0..plan.partitions)
            .map(|p| Subject::from(format!("{stream}.{p}")))
            .collect();
        context
            .create_stream(stream::Config {
                name: stream.clone(),
                subjects: vec![format!("{stream}.*")],
                storage: stream::StorageType::File,
                ..stream::Config::default()
            })
            .await
            .map_err(|e| peer_error(format!("create stream {stream}: {e}")))?;
        Ok(NatsTarget {
            address: address.to_string(),
            version,
            context,
            stream,
            subjects,
            window: plan.max_pending.unwrap_or(PENDING_DEFAULT).max(1),
        })
    }

    /// What the report says about this target.
    pub fn info(&self) -> TargetInfo {
        TargetInfo {
            name: "nats".into(),
            version: Some(self.version.clone()),
            address: Some(self.address.clone()),
            durability: "file, no fsync per ack".into(),
            durability_detail: "JetStream file storage: a publish is acknowledged once the \
                                server has written it to its store, without an fsync; the \
                                server fsyncs on its own schedule (every 2 minutes by \
                                default)"
                .into(),
            notes: vec![format!(
                "one stream, partitions are subjects; up to {} unacknowledged publishes per \
                 producer; consumers are ephemeral pull consumers without acks",
                crate::report::thousands(self.window as f64)
            )],
        }
    }

    pub(crate) async fn start_producer(
        &self,
        shared: &Arc<Shared>,
        plan: GeneratorPlan,
    ) -> Result<JoinHandle<ProducerOutcome>> {
        // A short hand-off queue: the window of unacknowledged publishes is the limit.
        let (mut handoff, mut messages) = ChunkSender::<(Bytes, u64)>::channel(1024);
        let clock = shared.clock;
        let sent = shared.meters.sent.register();
        let generator = tokio::task::spawn_blocking(move || {
            let sent = generate(&plan, clock, &sent, |offer| match offer {
                Offer::Message { value, sent_ns } => handoff.push((value.copy_out(), sent_ns)),
                Offer::Idle => handoff.flush(),
            });
            let _ = handoff.flush();
            sent
        });
        let (pending, mut acks_in) = mpsc::channel(self.window);
        let context = self.context.clone();
        let subjects = self.subjects.clone();
        let publisher = tokio::spawn(async move {
            let mut next = 0;
            while let Some(chunk) = messages.recv().await {
                for (value, sent_ns) in chunk {
                    let subject = subjects[next].clone();
                    next = (next + 1) % subjects.len();
                    let ack = context.publish(subject, value).await;
                    if pending.send((ack, sent_ns)).await.is_err() {
                        return;
                    }
                }
            }
        });
        let mut acks = Acks::new(shared);
        Ok(tokio::spawn(async move {
            while let Some((ack, sent_ns)) = acks_in.recv().await {
                match ack {
                    Ok(ack) => match ready_or_wait(ack.into_future()).await {
                        (Ok(_), waited) => acks.ok(sent_ns, waited),
                        (Err(e), _) => acks.failed(1, e),
                    },
                    Err(e) => acks.failed(1, e),
                }
            }
            let _ = publisher.await;
            let sent = generator.await.unwrap_or(0);
            ProducerOutcome {
                sent,
                acks: acks.finish(),
            }
        }))
    }

    pub(crate) async fn start_consumer(
        &self,
        shared: &Arc<Shared>,
        set: u32,
        partitions: Vec<u32>,
    ) -> Result<JoinHandle<ConsumerOutcome>> {
        let stream = self
            .context
            .get_stream(&self.stream)
            .await
            .map_err(|e| peer_error(format!("get stream {}: {e}", self.stream)))?;
        let mut streams = StreamMap::new();
        for partition in partitions {
            let consumer = stream
                .create_consumer(consumer::pull::Config {
                    filter_subject: self.subjects[partition as usize].to_string(),
                    ack_policy: consumer::AckPolicy::None,
                    deliver_policy: consumer::DeliverPolicy::All,
                    ..consumer::pull::Config::default()
                })
                .await
                .map_err(|e| peer_error(format!("create a pull consumer: {e}")))?;
            let messages = consumer
                .stream()
                .max_messages_per_batch(PULL_BATCH)
                .messages()
                .await
                .map_err(|e| peer_error(format!("start pulling: {e}")))?;
            streams.insert(partition, messages);
        }
        let mut consumption = Consumption::new(shared, set);
        let shared = Arc::clone(shared);
        Ok(tokio::spawn(async move {
            let stop = shared.stop_signal();
            tokio::pin!(stop);
            let error = loop {
                tokio::select! {
                    biased;
                    _ = &mut stop => break None,
                    (next, waited) = ready_or_wait(streams.next()) => match next {
                        Some((_, Ok(message))) => consumption.message(&message.payload, waited),
                        Some((partition, Err(e))) => {
                            break Some(format!("partition {partition}: {e}"))
                        }
                        None => break None,
                    },
                }
            };
            consumption.finish(error)
        }))
    }

    /// Deletes the run's stream.
    pub async fn close(self) {
        let _ = self.context.delete_stream(&self.stream).await;
    }
}
