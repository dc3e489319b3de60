//! Consuming events as a service: group membership, dead letters, commits, shutdown —
//! once, for every consumer of the checkout.
//!
//! A service names its group and topics and gives a [`Handler`]. [`spawn`] joins
//! `workers` members of the group (each a [`strata_client::Consumer`]; the broker
//! spreads the partitions over them) and runs each member's loop:
//! - a record whose envelope or payload does not decode is a poison event: it goes to
//!   the topic's dead-letter topic (`<topic>.dlq`) at once, with the reason;
//! - otherwise the handler runs through [`DeadLetters::process`]: retried with
//!   exponential backoff, then dead-lettered if it still fails;
//! - positions are committed explicitly, at most every [`COMMIT_INTERVAL`], and only
//!   past records whose handling finished (processed or dead-lettered). A member that
//!   dies, or is stopped in the middle of a handler, leaves those records uncommitted,
//!   and they are delivered again: delivery is at least once, so every handler is
//!   idempotent: a version check, or a processed-events table written in the same
//!   transaction as the handler's effect ([`processed_table`], [`first_delivery`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{Any, Transaction};
use strata_client::{
    Client, ConsumedRecord, Consumer, ConsumerGroupConfig, DeadLetterPolicy, DeadLetters, Outcome,
};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::db::{now_ms, Db};
use crate::error::Result;
use crate::events::Event;

/// How often a member commits its position while it processes records.
pub const COMMIT_INTERVAL: Duration = Duration::from_millis(500);
/// Delay before a member that failed rejoins its group.
const REJOIN_DELAY: Duration = Duration::from_secs(1);

/// How a service consumes.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// Members of the group this process runs; each handles its partitions one record
    /// at a time, so this is the service's parallelism (up to the partition count).
    pub workers: usize,
    /// How long a member that died keeps its partitions (the broker's session timeout).
    pub session_timeout: Duration,
    /// Retries and backoff before a failing record is dead-lettered.
    pub dead_letters: DeadLetterPolicy,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        ConsumerSettings {
            workers: 2,
            session_timeout: Duration::from_secs(10),
            // Eight tries over about 6 s: enough for a transient failure, short enough
            // that one poison event holds up its partition only briefly.
            dead_letters: DeadLetterPolicy {
                max_attempts: 8,
                backoff_min: Duration::from_millis(50),
                backoff_max: Duration::from_secs(5),
                ..DeadLetterPolicy::default()
            },
        }
    }
}

/// What a service does with its events.
pub trait Handler: Send + Sync + 'static {
    /// The decoded payload.
    type Message: Send + Sync + 'static;

    /// Checks the event's type and decodes its payload. An error here makes the event
    /// poison: it is dead-lettered without retries.
    fn decode(&self, event: &Event) -> Result<Self::Message>;

    /// Handles a decoded event; must be idempotent (it can see an event twice). An
    /// error is retried with backoff, then the event is dead-lettered.
    fn handle<'a>(
        &'a self,
        event: &'a Event,
        message: &'a Self::Message,
    ) -> impl Future<Output = Result<()>> + Send + 'a;
}

/// Joins `settings.workers` members of `group` on `topics` and runs them until
/// `shutdown`. Returns once every member has joined.
pub async fn spawn<H: Handler>(
    client: &Client,
    group: &'static str,
    topics: &'static [&'static str],
    settings: &ConsumerSettings,
    handler: Arc<H>,
    shutdown: CancellationToken,
) -> Result<Vec<JoinHandle<()>>> {
    let dead_letters = Arc::new(DeadLetters::new(client, settings.dead_letters.clone()));
    let mut tasks = Vec::with_capacity(settings.workers);
    for worker in 0..settings.workers.max(1) {
        let member = Member {
            client: client.clone(),
            group,
            topics,
            config: group_config(group, worker, settings),
            handler: Arc::clone(&handler),
            dead_letters: Arc::clone(&dead_letters),
        };
        let consumer = member.join().await?;
        let shutdown = shutdown.clone();
        tasks.push(tokio::spawn(member.run(consumer, shutdown)));
    }
    Ok(tasks)
}

fn group_config(group: &str, worker: usize, settings: &ConsumerSettings) -> ConsumerGroupConfig {
    ConsumerGroupConfig {
        client_id: format!("checkout-{group}-{}-{worker}", std::process::id()),
        session_timeout: settings.session_timeout,
        // Commits are explicit: only past records whose handling finished.
        auto_commit_interval: None,
        // Events are small and handled one by one; a small prefetch keeps a member
        // from hoarding records another member could take after a rebalance.
        prefetch_bytes_max: 1 << 20,
        ..ConsumerGroupConfig::default()
    }
}

struct Member<H> {
    client: Client,
    group: &'static str,
    topics: &'static [&'static str],
    config: ConsumerGroupConfig,
    handler: Arc<H>,
    dead_letters: Arc<DeadLetters>,
}

/// Why a member's loop ended.
enum Stop {
    /// Shut down between records: everything handled may be committed.
    Clean,
    /// Shut down in the middle of a record: commit nothing more.
    Interrupted,
    /// Failed; rejoin after a delay.
    Failed,
}

impl<H: Handler> Member<H> {
    async fn join(&self) -> Result<Consumer> {
        Ok(self
            .client
            .consumer_with(self.group, self.topics, self.config.clone())
            .await?)
    }

    async fn run(self, mut consumer: Consumer, shutdown: CancellationToken) {
        loop {
            let stop = self.consume(&mut consumer, &shutdown).await;
            if matches!(stop, Stop::Clean) {
                if let Err(e) = consumer.commit().await {
                    tracing::warn!(group = self.group, error = %e, "final commit failed");
                }
            }
            // Without auto-commit, close() keeps only what was committed explicitly.
            if let Err(e) = consumer.close().await {
                tracing::warn!(group = self.group, error = %e, "leaving the group failed");
            }
            if !matches!(stop, Stop::Failed) {
                return;
            }
            consumer = loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(REJOIN_DELAY) => {}
                }
                match self.join().await {
                    Ok(consumer) => break consumer,
                    Err(e) => tracing::warn!(group = self.group, error = %e, "rejoin failed"),
                }
            };
        }
    }

    async fn consume(&self, consumer: &mut Consumer, shutdown: &CancellationToken) -> Stop {
        let mut uncommitted = false;
        let mut next_commit = Instant::now() + COMMIT_INTERVAL;
        loop {
            let next = tokio::select! {
                biased;
                () = shutdown.cancelled() => return Stop::Clean,
                () = tokio::time::sleep_until(next_commit), if uncommitted => None,
                next = consumer.next() => Some(next),
            };
            let record = match next {
                // Time to commit what was handled.
                None => {
                    self.commit(consumer, &mut uncommitted, &mut next_commit)
                        .await;
                    continue;
                }
                Some(None) => return Stop::Failed,
                Some(Some(Err(e))) => {
                    tracing::warn!(group = self.group, error = %e, "consumer error");
                    continue;
                }
                Some(Some(Ok(record))) => record,
            };
            let handled = tokio::select! {
                () = shutdown.cancelled() => return Stop::Interrupted,
                handled = self.process(record) => handled,
            };
            if let Err(e) = handled {
                tracing::error!(group = self.group, error = %e, "cannot dead-letter a record; rejoining");
                return Stop::Failed;
            }
            uncommitted = true;
            if Instant::now() >= next_commit {
                self.commit(consumer, &mut uncommitted, &mut next_commit)
                    .await;
            }
        }
    }

    async fn commit(&self, consumer: &Consumer, uncommitted: &mut bool, next: &mut Instant) {
        match consumer.commit().await {
            Ok(()) => *uncommitted = false,
            // Fenced or rejoining: the records will come again, to whoever owns them.
            Err(e) => tracing::debug!(group = self.group, error = %e, "commit failed"),
        }
        *next = Instant::now() + COMMIT_INTERVAL;
    }

    /// Handles one record to the end: processed, or stored as a dead letter. Fails only
    /// if the dead letter cannot be written (then the record must not be committed).
    async fn process(&self, record: ConsumedRecord) -> Result<()> {
        let decoded = Event::parse(record.clone()).and_then(|event| {
            let message = self.handler.decode(&event)?;
            Ok((event, message))
        });
        let (event, message) = match decoded {
            Ok(decoded) => decoded,
            Err(e) => {
                let (topic, _) = self
                    .dead_letters
                    .dead_letter(&record, &e.to_string(), 0)
                    .await?;
                tracing::warn!(
                    group = self.group,
                    source = %format!("{}/{}@{}", record.topic, record.partition, record.offset),
                    dead_letter_topic = topic,
                    error = %e,
                    "poison event dead-lettered"
                );
                return Ok(());
            }
        };
        let outcome = self
            .dead_letters
            .process(&record, |_| self.handler.handle(&event, &message))
            .await?;
        if let Outcome::DeadLettered {
            attempts,
            error,
            topic,
            ..
        } = outcome
        {
            tracing::warn!(
                group = self.group,
                event_id = event.id,
                trace_id = event.trace.trace_id_hex(),
                attempts,
                dead_letter_topic = topic,
                error,
                "event dead-lettered after retries"
            );
        }
        Ok(())
    }
}

/// [`Error::BadEvent`] unless `event` is of `event_type`, then its payload as `T`.
pub fn decode_as<T: serde::de::DeserializeOwned>(event: &Event, event_type: &str) -> Result<T> {
    event.expect_type(event_type)?;
    event.payload()
}

/// The `CREATE TABLE IF NOT EXISTS` of an idempotent consumer's processed-events table.
pub fn processed_table(table: &str) -> String {
    format!(
        "CREATE TABLE IF NOT EXISTS {table} (
            event_id TEXT PRIMARY KEY,
            processed_at_ms BIGINT NOT NULL
        )"
    )
}

/// Records `event_id` in `table` inside `tx`, the transaction of the handler's effect.
/// `false`: another delivery of the event got there first, and the handler must do
/// nothing (the transaction can be dropped).
pub async fn first_delivery(
    tx: &mut Transaction<'static, Any>,
    table: &str,
    event_id: &str,
) -> Result<bool> {
    let inserted = sqlx::query(&format!(
        "INSERT INTO {table} (event_id, processed_at_ms) VALUES ($1, $2) ON CONFLICT DO NOTHING"
    ))
    .bind(event_id)
    .bind(now_ms())
    .execute(&mut **tx)
    .await?
    .rows_affected();
    Ok(inserted == 1)
}

/// Whether `event_id` is in `table` already: a cheap check before work that should not
/// be repeated (a charge); [`first_delivery`] stays the guarantee.
pub async fn already_processed(db: &Db, table: &str, event_id: &str) -> Result<bool> {
    let found: Option<String> =
        sqlx::query_scalar(&format!("SELECT event_id FROM {table} WHERE event_id = $1"))
            .bind(event_id)
            .fetch_optional(db.pool())
            .await?;
    Ok(found.is_some())
}
