//! The payment service: charges each order once.
//!
//! Consumer group `payment` on `orders.created`, read with the version 1 struct (it
//! reads version 2 events as well; see [`crate::events`]). For each order:
//! 1. if the event id is in `payment_processed`, it was handled: done;
//! 2. the charge, simulated: the profile's payment latency and transient failures
//!    (retried by the consumer with backoff), and its declines;
//! 3. ONE transaction: the event id into `payment_processed` (if another delivery got
//!    there first, nothing else happens), the payment into `payments`, and
//!    `payment.completed` or `payment.failed` into `payment_outbox`.
//!
//! So a redelivered event (a crash before the commit of the consumer's position, a
//! rebalance) never charges twice, and a charge is never lost: its event leaves with
//! the outbox. The trace id of the checkout is logged and stored with the payment.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use sqlx::Row;
use strata_client::Client;
use tokio_util::sync::CancellationToken;

use crate::consume::{self, ConsumerSettings, Handler};
use crate::db::{now_ms, Db};
use crate::error::Result;
use crate::events::{
    seq, topics, types, versions, Event, OrderCreatedV1, Outgoing, PaymentCompleted, PaymentFailed,
};
use crate::outbox::Outbox;
use crate::profile::{Profile, Service};
use crate::services::Running;

/// The consumer group.
pub const GROUP: &str = "payment";
const TOPICS: &[&str] = &[topics::ORDERS_CREATED];
const PROCESSED: &str = "payment_processed";

/// Settings of the payment service.
#[derive(Debug, Clone, Default)]
pub struct PaymentConfig {
    /// How it consumes `orders.created`.
    pub consumer: ConsumerSettings,
    /// After this many charges every further charge hangs (a gateway that stopped
    /// answering): the crash test kills the process while it is in that state.
    pub stall_after: Option<u64>,
}

/// A stored payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaymentRow {
    /// The payment.
    pub payment_id: String,
    /// The order charged.
    pub order_id: String,
    /// In cents.
    pub amount_cents: i64,
    /// COMPLETED or FAILED.
    pub status: String,
    /// The checkout's trace id.
    pub trace_id: String,
}

struct Payments {
    db: Db,
    outbox: Arc<Outbox>,
    profile: Arc<Profile>,
    stall_after: Option<u64>,
    charges: AtomicU64,
}

/// Creates the tables and starts the consumers and the outbox relay.
pub async fn start(
    client: &Client,
    db: Db,
    profile: Arc<Profile>,
    config: &PaymentConfig,
    shutdown: CancellationToken,
) -> Result<Running> {
    let outbox = Arc::new(Outbox::new(db.clone(), "payment_outbox", None));
    db.migrate(&[
        "CREATE TABLE IF NOT EXISTS payments (
            payment_id TEXT PRIMARY KEY,
            order_id TEXT NOT NULL,
            customer_id TEXT NOT NULL,
            amount_cents BIGINT NOT NULL,
            status TEXT NOT NULL,
            reason TEXT NOT NULL,
            trace_id TEXT NOT NULL,
            created_at_ms BIGINT NOT NULL
        )"
        .into(),
        "CREATE INDEX IF NOT EXISTS payments_by_order ON payments (order_id)".into(),
        consume::processed_table(PROCESSED),
        outbox.migration(),
    ])
    .await?;
    let payments = Arc::new(Payments {
        db,
        outbox: Arc::clone(&outbox),
        profile,
        stall_after: config.stall_after,
        charges: AtomicU64::new(0),
    });
    let mut tasks = consume::spawn(
        client,
        GROUP,
        TOPICS,
        &config.consumer,
        payments,
        shutdown.clone(),
    )
    .await?;
    tasks.push(outbox.spawn_relay(client.clone(), shutdown));
    Ok(Running::new("payment", None, tasks))
}

/// Every payment, oldest first.
pub async fn list_payments(db: &Db) -> Result<Vec<PaymentRow>> {
    let rows = sqlx::query(
        "SELECT payment_id, order_id, amount_cents, status, trace_id FROM payments
         ORDER BY created_at_ms, payment_id",
    )
    .fetch_all(db.pool())
    .await?;
    rows.iter()
        .map(|row| {
            Ok(PaymentRow {
                payment_id: row.try_get("payment_id")?,
                order_id: row.try_get("order_id")?,
                amount_cents: row.try_get("amount_cents")?,
                status: row.try_get("status")?,
                trace_id: row.try_get("trace_id")?,
            })
        })
        .collect()
}

/// `orders.created` → charge → `payments.completed` or `payments.failed`.
impl Handler for Payments {
    type Message = OrderCreatedV1;

    fn decode(&self, event: &Event) -> Result<OrderCreatedV1> {
        consume::decode_as(event, types::ORDER_CREATED)
    }

    async fn handle(&self, event: &Event, order: &OrderCreatedV1) -> Result<()> {
        if consume::already_processed(&self.db, PROCESSED, &event.id).await? {
            tracing::debug!(order_id = order.order_id, "already charged");
            return Ok(());
        }
        let trace_id = event.trace.trace_id_hex();
        if self
            .stall_after
            .is_some_and(|n| self.charges.load(Ordering::SeqCst) >= n)
        {
            tracing::warn!(
                order_id = order.order_id,
                "stalling, as asked (--stall-after)"
            );
            std::future::pending::<()>().await;
        }
        tracing::info!(
            order_id = order.order_id,
            trace_id,
            amount_cents = order.total_cents,
            schema_version = event.schema_version,
            "charging"
        );
        self.profile.call(Service::Payment).await?;
        let declined = self.profile.decline(&order.order_id, &order.payment_token);
        let payment_id = uuid::Uuid::new_v4().to_string();
        let now = now_ms();
        let mut tx = self.db.begin().await?;
        if !consume::first_delivery(&mut tx, PROCESSED, &event.id).await? {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO payments (payment_id, order_id, customer_id, amount_cents, status,
                reason, trace_id, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&payment_id)
        .bind(&order.order_id)
        .bind(&order.customer_id)
        .bind(order.total_cents)
        .bind(if declined.is_some() {
            "FAILED"
        } else {
            "COMPLETED"
        })
        .bind(declined.unwrap_or(""))
        .bind(&trace_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let context = event.context();
        let outgoing = match declined {
            None => Outgoing::new(
                topics::PAYMENTS_COMPLETED,
                types::PAYMENT_COMPLETED,
                versions::PAYMENT_COMPLETED,
                &order.order_id,
                &context,
                &PaymentCompleted {
                    order_id: order.order_id.clone(),
                    payment_id,
                    customer_id: order.customer_id.clone(),
                    amount_cents: order.total_cents,
                    seq: seq::PAYMENT,
                    occurred_at_ms: now,
                },
            )?,
            Some(reason) => Outgoing::new(
                topics::PAYMENTS_FAILED,
                types::PAYMENT_FAILED,
                versions::PAYMENT_FAILED,
                &order.order_id,
                &context,
                &PaymentFailed {
                    order_id: order.order_id.clone(),
                    payment_id,
                    customer_id: order.customer_id.clone(),
                    amount_cents: order.total_cents,
                    reason: reason.into(),
                    seq: seq::PAYMENT,
                    occurred_at_ms: now,
                },
            )?,
        };
        self.outbox.add(&mut tx, &outgoing).await?;
        tx.commit().await?;
        self.outbox.wake();
        self.charges.fetch_add(1, Ordering::SeqCst);
        tracing::info!(
            order_id = order.order_id,
            trace_id,
            declined = declined.unwrap_or("no"),
            "charged"
        );
        Ok(())
    }
}
