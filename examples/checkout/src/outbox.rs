//! The transactional outbox: an event is written to an outbox table in the same
//! database transaction as the change it announces, and a relay publishes it afterwards.
//!
//! A service never publishes to the broker inside a transaction (the broker is not part
//! of it) and never after a commit by itself (the process can die in between, and the
//! event would be lost while the change stays). Instead [`Outbox::add`] inserts the
//! event into the service's `<service>_outbox` table inside the transaction, and the
//! relay task publishes unsent rows in id order and marks them sent.
//!
//! Invariants:
//! - a committed change always gets its event: the row is committed with it, and rows
//!   stay unsent until the broker has acknowledged them, so a relay that dies at any
//!   point (before publishing, after publishing but before marking) publishes them on
//!   its next start;
//! - an event can be published more than once (killed after publishing, before
//!   marking); it keeps its `event-id`, and every consumer deduplicates by it;
//! - one relay per outbox table: two would publish the same rows twice (harmless, but
//!   wasteful). One process per service database runs it.
//!
//! The relay wakes when a transaction with an event commits ([`Outbox::wake`]) and
//! every [`POLL_INTERVAL`] to pick up rows a crashed process left behind.
//!
//! [`CrashPoint`] lets a test kill the process at the two places that matter: right
//! after a transaction with an event committed, and right after the relay published but
//! before it marked the rows sent.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::{Any, Row, Transaction};
use strata_client::{headers, Client, Producer, ProducerConfig, Record};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::db::{now_ms, placeholders, Db};
use crate::error::Result;
use crate::events::Outgoing;
use crate::trace::TraceContext;
use strata_client::trace;

/// Rows published per round.
const BATCH_ROWS_MAX: i64 = 256;
/// How often the relay looks for rows without being woken.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Delay before retrying after the broker or the database failed.
const RETRY_DELAY: Duration = Duration::from_millis(200);
/// Sent rows are deleted this long after they were sent; the log keeps the events.
const SENT_ROWS_KEEP_MS: i64 = 60 * 60 * 1000;

/// Where a test can have the process abort, to prove the outbox survives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CrashPoint {
    /// Right after a checkout's transaction (order and outbox row) committed, before
    /// the answer and before the relay saw the row.
    AfterCommit,
    /// Right after the relay published rows, before it marked them sent.
    AfterPublish,
}

/// A service's outbox table and its relay.
#[derive(Debug)]
pub struct Outbox {
    db: Db,
    table: &'static str,
    wake: Notify,
    crash_at: Option<CrashPoint>,
}

impl Outbox {
    /// The outbox in `table` of `db`; [`migration`](Outbox::migration) creates it.
    pub fn new(db: Db, table: &'static str, crash_at: Option<CrashPoint>) -> Outbox {
        Outbox {
            db,
            table,
            wake: Notify::new(),
            crash_at,
        }
    }

    /// The table's `CREATE TABLE IF NOT EXISTS`.
    pub fn migration(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {} (
                id {},
                event_id TEXT NOT NULL UNIQUE,
                topic TEXT NOT NULL,
                event_key TEXT NOT NULL,
                event_type TEXT NOT NULL,
                schema_version BIGINT NOT NULL,
                traceparent TEXT NOT NULL,
                payload TEXT NOT NULL,
                created_at_ms BIGINT NOT NULL,
                sent_at_ms BIGINT
            )",
            self.table,
            self.db.serial_primary_key()
        )
    }

    /// Adds `event` inside `tx`: it is published once `tx` commits (call
    /// [`wake`](Outbox::wake) then), and never if it rolls back.
    pub async fn add(&self, tx: &mut Transaction<'static, Any>, event: &Outgoing) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO {} (event_id, topic, event_key, event_type, schema_version,
                traceparent, payload, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            self.table
        ))
        .bind(&event.event_id)
        .bind(&event.topic)
        .bind(&event.key)
        .bind(&event.event_type)
        .bind(i64::from(event.schema_version))
        .bind(&event.traceparent)
        .bind(&event.payload)
        .bind(now_ms())
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Tells the relay that rows were committed.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Aborts the process if the test asked for a crash at `point`.
    pub fn crash_point(&self, point: CrashPoint) {
        if self.crash_at == Some(point) {
            eprintln!("checkout: crashing at {point:?}, as asked (--crash-at)");
            std::process::abort();
        }
    }

    /// Rows not yet published.
    pub async fn unsent(&self) -> Result<i64> {
        let query = format!(
            "SELECT COUNT(*) FROM {} WHERE sent_at_ms IS NULL",
            self.table
        );
        Ok(sqlx::query_scalar(&query).fetch_one(self.db.pool()).await?)
    }

    /// Starts the relay: it publishes through `client` until `shutdown`.
    pub fn spawn_relay(
        self: &Arc<Self>,
        client: Client,
        shutdown: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let outbox = Arc::clone(self);
        tokio::spawn(async move { outbox.relay(client, shutdown).await })
    }

    async fn relay(&self, client: Client, shutdown: CancellationToken) {
        // Under the after-commit crash point, only a wake-up (which the crash comes
        // before) makes the relay look: a timed poll could otherwise publish the row in
        // the instant between the commit and the abort, and the test would prove
        // nothing.
        let poll_interval = if self.crash_at == Some(CrashPoint::AfterCommit) {
            Duration::from_secs(24 * 60 * 60)
        } else {
            POLL_INTERVAL
        };
        let mut producers = HashMap::new();
        let mut next_cleanup = now_ms();
        while !shutdown.is_cancelled() {
            let wait = match self.publish_round(&client, &mut producers).await {
                Ok(published) if published as i64 == BATCH_ROWS_MAX => continue,
                Ok(_) => {
                    if now_ms() >= next_cleanup {
                        if let Err(e) = self.delete_sent().await {
                            tracing::warn!(table = self.table, error = %e, "outbox cleanup failed");
                        }
                        next_cleanup = now_ms() + SENT_ROWS_KEEP_MS / 4;
                    }
                    poll_interval
                }
                Err(e) => {
                    tracing::warn!(table = self.table, error = %e, "outbox relay failed; retrying");
                    RETRY_DELAY
                }
            };
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        for producer in producers.values() {
            producer.flush().await;
        }
    }

    /// Publishes up to [`BATCH_ROWS_MAX`] unsent rows in id order, waits for the
    /// broker's acknowledgements, then marks them sent. Returns how many.
    async fn publish_round(
        &self,
        client: &Client,
        producers: &mut HashMap<String, Producer>,
    ) -> Result<usize> {
        let rows = sqlx::query(&format!(
            "SELECT id, event_id, topic, event_key, event_type, schema_version, traceparent,
                payload FROM {} WHERE sent_at_ms IS NULL ORDER BY id LIMIT $1",
            self.table
        ))
        .bind(BATCH_ROWS_MAX)
        .fetch_all(self.db.pool())
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut ids = Vec::with_capacity(rows.len());
        let mut deliveries = Vec::with_capacity(rows.len());
        for row in &rows {
            ids.push(row.try_get::<i64, _>("id")?);
            let topic: String = row.try_get("topic")?;
            if !producers.contains_key(&topic) {
                let config = ProducerConfig {
                    // Publish as soon as a row is there: the relay already batches.
                    linger: Duration::ZERO,
                    ..ProducerConfig::default()
                };
                let producer = client.producer_with(&topic, config).await?;
                producers.insert(topic.clone(), producer);
            }
            let producer = &producers[&topic];
            let record = Record::new(row.try_get::<String, _>("payload")?)
                .key(row.try_get::<String, _>("event_key")?)
                .header(headers::EVENT_ID, row.try_get::<String, _>("event_id")?)
                .header(headers::EVENT_TYPE, row.try_get::<String, _>("event_type")?)
                .header(
                    headers::SCHEMA_VERSION,
                    row.try_get::<i64, _>("schema_version")?.to_string(),
                );
            // Sent inside the context that caused the event, the record gets a child of
            // it as its traceparent (and the client's publish span).
            #[expect(
                clippy::async_yields_async,
                reason = "only send() must run in the context; the delivery is awaited \
                          with the round's others"
            )]
            let delivery = match TraceContext::parse(&row.try_get::<String, _>("traceparent")?) {
                Some(context) => trace::in_context(context, async { producer.send(record) }).await,
                None => producer.send(record),
            };
            deliveries.push(delivery);
        }
        for delivery in deliveries {
            delivery.await?;
        }
        self.crash_point(CrashPoint::AfterPublish);
        let query = format!(
            "UPDATE {} SET sent_at_ms = $1 WHERE id IN ({})",
            self.table,
            placeholders(2, ids.len())
        );
        let mut update = sqlx::query(&query).bind(now_ms());
        for id in &ids {
            update = update.bind(*id);
        }
        update.execute(self.db.pool()).await?;
        Ok(ids.len())
    }

    async fn delete_sent(&self) -> Result<()> {
        sqlx::query(&format!(
            "DELETE FROM {} WHERE sent_at_ms IS NOT NULL AND sent_at_ms < $1",
            self.table
        ))
        .bind(now_ms() - SENT_ROWS_KEEP_MS)
        .execute(self.db.pool())
        .await?;
        Ok(())
    }
}
