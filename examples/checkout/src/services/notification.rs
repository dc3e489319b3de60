//! The notification service: "sends" the confirmation email of every paid order.
//!
//! Consumer group `notification` on `payments.completed`. Sending is simulated (the
//! profile's notification latency, failures and outage), then logged — the log line is
//! the email, with the checkout's trace id — and recorded in `notifications`, whose
//! primary key is the event id, so a redelivered event sends nothing twice.
//!
//! Nothing waits for this service: checkout answers before the payment is even made.
//! While it is down or stuck, its group's lag grows and checkout does not notice; when
//! it comes back, it works through the backlog.

use std::sync::Arc;

use sqlx::Row;
use strata_client::Client;
use tokio_util::sync::CancellationToken;

use crate::consume::{self, ConsumerSettings, Handler};
use crate::db::{now_ms, Db};
use crate::error::Result;
use crate::events::{topics, types, Event, PaymentCompleted};
use crate::profile::{Profile, Service};
use crate::services::Running;

/// The consumer group.
pub const GROUP: &str = "notification";
const TOPICS: &[&str] = &[topics::PAYMENTS_COMPLETED];

/// A sent notification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentNotification {
    /// The order paid.
    pub order_id: String,
    /// Where the email went.
    pub recipient: String,
    /// The checkout's trace id.
    pub trace_id: String,
}

struct Notifications {
    db: Db,
    profile: Arc<Profile>,
}

/// Creates the table and starts the consumers.
pub async fn start(
    client: &Client,
    db: Db,
    profile: Arc<Profile>,
    consumer: &ConsumerSettings,
    shutdown: CancellationToken,
) -> Result<Running> {
    db.migrate(&["CREATE TABLE IF NOT EXISTS notifications (
            event_id TEXT PRIMARY KEY,
            order_id TEXT NOT NULL,
            recipient TEXT NOT NULL,
            trace_id TEXT NOT NULL,
            sent_at_ms BIGINT NOT NULL
        )"
    .into()])
        .await?;
    let notifications = Arc::new(Notifications { db, profile });
    let tasks = consume::spawn(client, GROUP, TOPICS, consumer, notifications, shutdown).await?;
    Ok(Running::new("notification", None, tasks))
}

/// Every notification sent.
pub async fn list_sent(db: &Db) -> Result<Vec<SentNotification>> {
    let rows = sqlx::query(
        "SELECT order_id, recipient, trace_id FROM notifications ORDER BY sent_at_ms, order_id",
    )
    .fetch_all(db.pool())
    .await?;
    rows.iter()
        .map(|row| {
            Ok(SentNotification {
                order_id: row.try_get("order_id")?,
                recipient: row.try_get("recipient")?,
                trace_id: row.try_get("trace_id")?,
            })
        })
        .collect()
}

/// `payments.completed` → the confirmation email.
impl Handler for Notifications {
    type Message = PaymentCompleted;

    fn decode(&self, event: &Event) -> Result<PaymentCompleted> {
        consume::decode_as(event, types::PAYMENT_COMPLETED)
    }

    async fn handle(&self, event: &Event, paid: &PaymentCompleted) -> Result<()> {
        let sent: Option<String> =
            sqlx::query_scalar("SELECT event_id FROM notifications WHERE event_id = $1")
                .bind(&event.id)
                .fetch_optional(self.db.pool())
                .await?;
        if sent.is_some() {
            return Ok(());
        }
        self.profile.call(Service::Notification).await?;
        let recipient = format!("{}@example.com", paid.customer_id);
        let trace_id = event.trace.trace_id_hex();
        sqlx::query(
            "INSERT INTO notifications (event_id, order_id, recipient, trace_id, sent_at_ms)
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
        )
        .bind(&event.id)
        .bind(&paid.order_id)
        .bind(&recipient)
        .bind(&trace_id)
        .bind(now_ms())
        .execute(self.db.pool())
        .await?;
        tracing::info!(
            to = recipient,
            order_id = paid.order_id,
            amount_cents = paid.amount_cents,
            trace_id,
            "email sent: your order is paid"
        );
        Ok(())
    }
}
