//! The order service: takes checkouts, and keeps the order status read model.
//!
//! `POST /checkout` (body [`CheckoutRequest`], optional `Idempotency-Key` and
//! `traceparent` headers) does, in order:
//! 1. validation, in-process: auth, catalog prices, discount ([`crate::catalog`]);
//! 2. with an `Idempotency-Key`: if this customer used the key before, it answers that
//!    order again (200, `Idempotent-Replayed: true`), or 422 if the key came with a
//!    different request. The order id is derived from the customer and the key, so
//!    two concurrent requests with one key reserve for, and race to insert, the same
//!    order;
//! 3. the stock reservation, the one synchronous call (inventory, idempotent per order
//!    id);
//! 4. ONE transaction: the idempotency key, the order as PENDING, and its
//!    `order.created` event in the outbox ([`crate::outbox`]);
//! 5. the answer, at once: 201 with the order (read your own writes: `GET
//!    /orders/{id}` shows it from now on).
//!
//! Payment, notification and everything else happen after the answer, through topics.
//! The status projection (consumer group `order-projection` on `payments.completed`
//! and `payments.failed`) moves orders to PAID or CANCELLED, and only forward: an event
//! applies only if its sequence number is above the order's `status_seq`.
//!
//! Tables: `orders` (the order and its status), `order_idempotency`, `order_outbox`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;
use strata_client::Client;
use tokio_util::sync::CancellationToken;

use crate::catalog::{self, CheckoutRequest, PricedOrder};
use crate::consume::{self, ConsumerSettings, Handler};
use crate::db::{now_ms, Db};
use crate::error::{Error, Result};
use crate::events::{
    seq, topics, types, versions, Event, OrderCreatedV1, OrderCreatedV2, OrderLine, Outgoing,
    PaymentCompleted, PaymentFailed, CURRENCY,
};
use crate::http::Server;
use crate::outbox::{CrashPoint, Outbox};
use crate::services::inventory::InventoryClient;
use crate::services::Running;
use crate::trace::{self, TraceContext};

/// The consumer group of the status projection.
pub const GROUP: &str = "order-projection";
const TOPICS: &[&str] = &[topics::PAYMENTS_COMPLETED, topics::PAYMENTS_FAILED];
/// The idempotency header.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Set on an answer that repeats an earlier checkout.
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";
/// Longest idempotency key.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;
/// How long idempotency keys are kept: a repeat after this creates a new order.
pub const IDEMPOTENCY_KEEP_MS: i64 = 24 * 60 * 60 * 1000;
/// How often expired idempotency keys are deleted.
const IDEMPOTENCY_SWEEP_INTERVAL: Duration = Duration::from_secs(600);
/// Largest checkout body.
const BODY_BYTES_MAX: usize = 64 << 10;

/// Order statuses.
pub mod status {
    /// Placed, stock reserved, payment not yet known.
    pub const PENDING: &str = "PENDING";
    /// Charged.
    pub const PAID: &str = "PAID";
    /// Payment declined; stock released.
    pub const CANCELLED: &str = "CANCELLED";
}

/// Settings of the order service.
#[derive(Debug, Clone)]
pub struct OrderConfig {
    /// Where the HTTP API listens.
    pub listen: SocketAddr,
    /// The inventory service, `http://host:port`.
    pub inventory_url: String,
    /// How long the reservation call may take.
    pub inventory_timeout: Duration,
    /// Abort the process at this point (crash tests).
    pub crash_at: Option<CrashPoint>,
    /// How the projection consumes.
    pub consumer: ConsumerSettings,
}

/// An order as `POST /checkout` and `GET /orders/{id}` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderView {
    /// The order.
    pub order_id: String,
    /// PENDING, PAID or CANCELLED.
    pub status: String,
    /// Who ordered.
    pub customer_id: String,
    /// What.
    pub lines: Vec<OrderLine>,
    /// Before the discount, in cents.
    pub subtotal_cents: i64,
    /// Taken off.
    pub discount_cents: i64,
    /// Charged.
    pub total_cents: i64,
    /// Of every amount.
    pub currency: String,
    /// The checkout's trace id: find it in every service's log.
    pub trace_id: String,
    /// When placed (ms since the Unix epoch).
    pub created_at_ms: i64,
    /// When the status last changed.
    pub updated_at_ms: i64,
}

struct Orders {
    db: Db,
    outbox: Arc<Outbox>,
    inventory: InventoryClient,
}

/// The tables' `CREATE` statements.
fn migrations(outbox: &Outbox) -> Vec<String> {
    vec![
        "CREATE TABLE IF NOT EXISTS orders (
            order_id TEXT PRIMARY KEY,
            customer_id TEXT NOT NULL,
            lines TEXT NOT NULL,
            subtotal_cents BIGINT NOT NULL,
            discount_cents BIGINT NOT NULL,
            total_cents BIGINT NOT NULL,
            currency TEXT NOT NULL,
            payment_token TEXT NOT NULL,
            status TEXT NOT NULL,
            status_seq BIGINT NOT NULL,
            trace_id TEXT NOT NULL,
            created_at_ms BIGINT NOT NULL,
            updated_at_ms BIGINT NOT NULL
        )"
        .into(),
        "CREATE INDEX IF NOT EXISTS orders_by_customer ON orders (customer_id)".into(),
        "CREATE TABLE IF NOT EXISTS order_idempotency (
            customer_id TEXT NOT NULL,
            idempotency_key TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            order_id TEXT NOT NULL,
            created_at_ms BIGINT NOT NULL,
            PRIMARY KEY (customer_id, idempotency_key)
        )"
        .into(),
        outbox.migration(),
    ]
}

/// Creates the tables and starts the HTTP API, the status projection and the outbox
/// relay.
pub async fn start(
    client: &Client,
    db: Db,
    config: &OrderConfig,
    shutdown: CancellationToken,
) -> Result<Running> {
    let outbox = Arc::new(Outbox::new(db.clone(), "order_outbox", config.crash_at));
    db.migrate(&migrations(&outbox)).await?;
    let orders = Arc::new(Orders {
        db,
        outbox: Arc::clone(&outbox),
        inventory: InventoryClient::new(&config.inventory_url, config.inventory_timeout),
    });
    let mut tasks = consume::spawn(
        client,
        GROUP,
        TOPICS,
        &config.consumer,
        Arc::clone(&orders),
        shutdown.clone(),
    )
    .await?;
    tasks.push(outbox.spawn_relay(client.clone(), shutdown.clone()));
    tasks.push(tokio::spawn(sweep_idempotency_keys(
        orders.db.clone(),
        shutdown.clone(),
    )));
    let router = Router::new()
        .route("/checkout", post(checkout))
        .route("/orders/{order_id}", get(get_order))
        .layer(axum::extract::DefaultBodyLimit::max(BODY_BYTES_MAX))
        .with_state(orders);
    let server = Server::start("order", config.listen, router, shutdown).await?;
    tracing::info!(url = server.url(), "order service listening");
    Ok(Running::new("order", Some(server), tasks))
}

async fn checkout(
    State(orders): State<Arc<Orders>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    let trace = trace::from_http(&headers);
    let request: CheckoutRequest =
        serde_json::from_slice(&body).map_err(|e| Error::Invalid(format!("checkout body: {e}")))?;
    let order = catalog::validate(&request)?;
    let key = idempotency_key(&headers)?;
    let fingerprint = fingerprint(&order);
    if let Some(key) = &key {
        if let Some(existing) = orders.find_by_key(&order.customer_id, key).await? {
            return replay(existing, &fingerprint);
        }
    }
    let order_id = match &key {
        Some(key) => order_id_for_key(&order.customer_id, key),
        None => uuid::Uuid::new_v4().to_string(),
    };
    orders
        .inventory
        .reserve(&order_id, &order.lines, &trace)
        .await?;
    let created = orders
        .create(&order_id, &order, key.as_deref(), &fingerprint, &trace)
        .await;
    match created {
        Ok(Created::New(view)) => {
            orders.outbox.crash_point(CrashPoint::AfterCommit);
            orders.outbox.wake();
            tracing::info!(order_id, trace_id = view.trace_id, "order placed");
            let location = HeaderValue::from_str(&format!("/orders/{order_id}"))
                .map_err(|e| Error::Invalid(e.to_string()))?;
            Ok((
                StatusCode::CREATED,
                [(axum::http::header::LOCATION, location)],
                Json(view),
            )
                .into_response())
        }
        // A concurrent request with the same key stored it first.
        Ok(Created::Existing(existing)) => replay(existing, &fingerprint),
        Err(e) => {
            // Undo the reservation; if that fails too, a retry with the same key
            // reuses it.
            if let Err(release) = orders.inventory.release(&order_id).await {
                tracing::warn!(order_id, error = %release, "could not release the reservation");
            }
            Err(e)
        }
    }
}

/// The answer to a repeated checkout: the order it created, unless the key came with a
/// different request.
fn replay(existing: Existing, fingerprint: &str) -> Result<Response> {
    if existing.fingerprint != fingerprint {
        return Err(Error::Unprocessable(format!(
            "this Idempotency-Key was used for a different checkout (order {}); use a new key",
            existing.view.order_id
        )));
    }
    Ok((
        StatusCode::OK,
        [(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"))],
        Json(existing.view),
    )
        .into_response())
}

async fn get_order(
    State(orders): State<Arc<Orders>>,
    Path(order_id): Path<String>,
) -> Result<Json<OrderView>> {
    find_order(&orders.db, &order_id)
        .await?
        .map(Json)
        .ok_or_else(|| Error::NotFound(format!("no order {order_id}")))
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>> {
    let Some(value) = headers.get(IDEMPOTENCY_KEY) else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= IDEMPOTENCY_KEY_BYTES_MAX)
        .ok_or_else(|| {
            Error::Invalid(format!(
                "Idempotency-Key must be 1 to {IDEMPOTENCY_KEY_BYTES_MAX} visible ASCII characters"
            ))
        })?;
    Ok(Some(key.to_string()))
}

/// The order id of the checkout of `customer_id` with idempotency key `key`: a name-based
/// UUID, the same for every request with the key.
pub fn order_id_for_key(customer_id: &str, key: &str) -> String {
    const NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x5f1c_2a7e_9d0b_4c61_8e3a_7b24_0c9d_e6f1);
    uuid::Uuid::new_v5(&NAMESPACE, format!("{customer_id}\n{key}").as_bytes()).to_string()
}

/// What identifies a checkout's content, to tell a repeat from a key reused for
/// something else.
fn fingerprint(order: &PricedOrder) -> String {
    let canonical = serde_json::json!({
        "customer_id": order.customer_id,
        "lines": order.lines,
        "payment_token": order.payment_token,
    });
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, canonical.to_string().as_bytes()).to_string()
}

/// An order found by its idempotency key.
struct Existing {
    fingerprint: String,
    view: OrderView,
}

enum Created {
    New(OrderView),
    Existing(Existing),
}

impl Orders {
    async fn find_by_key(&self, customer_id: &str, key: &str) -> Result<Option<Existing>> {
        let row = sqlx::query(
            "SELECT fingerprint, order_id FROM order_idempotency
             WHERE customer_id = $1 AND idempotency_key = $2",
        )
        .bind(customer_id)
        .bind(key)
        .fetch_optional(self.db.pool())
        .await?;
        let Some(row) = row else { return Ok(None) };
        let order_id: String = row.try_get("order_id")?;
        let view = find_order(&self.db, &order_id).await?.ok_or_else(|| {
            Error::NotFound(format!(
                "idempotency key refers to a missing order {order_id}"
            ))
        })?;
        Ok(Some(Existing {
            fingerprint: row.try_get("fingerprint")?,
            view,
        }))
    }

    /// The checkout's transaction: key, order and outbox row, all or nothing.
    async fn create(
        &self,
        order_id: &str,
        order: &PricedOrder,
        key: Option<&str>,
        fingerprint: &str,
        trace: &TraceContext,
    ) -> Result<Created> {
        let now = now_ms();
        let mut tx = self.db.begin().await?;
        if let Some(key) = key {
            let inserted = sqlx::query(
                "INSERT INTO order_idempotency
                    (customer_id, idempotency_key, fingerprint, order_id, created_at_ms)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .bind(&order.customer_id)
            .bind(key)
            .bind(fingerprint)
            .bind(order_id)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted == 0 {
                tx.rollback().await?;
                let existing = self.find_by_key(&order.customer_id, key).await?;
                return existing
                    .map(Created::Existing)
                    .ok_or_else(|| Error::Unavailable {
                        service: "order",
                        message: "an idempotency key vanished; retry".into(),
                    });
            }
        }
        let lines = serde_json::to_string(&order.lines)
            .map_err(|e| Error::Invalid(format!("cannot encode lines: {e}")))?;
        sqlx::query(
            "INSERT INTO orders (order_id, customer_id, lines, subtotal_cents, discount_cents,
                total_cents, currency, payment_token, status, status_seq, trace_id,
                created_at_ms, updated_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $12)",
        )
        .bind(order_id)
        .bind(&order.customer_id)
        .bind(&lines)
        .bind(order.subtotal_cents)
        .bind(order.discount_cents)
        .bind(order.total_cents)
        .bind(CURRENCY)
        .bind(&order.payment_token)
        .bind(status::PENDING)
        .bind(seq::CREATED)
        .bind(trace.trace_id_hex())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let created = OrderCreatedV2 {
            v1: OrderCreatedV1 {
                order_id: order_id.to_string(),
                customer_id: order.customer_id.clone(),
                lines: order.lines.clone(),
                total_cents: order.total_cents,
                payment_token: order.payment_token.clone(),
                seq: seq::CREATED,
                created_at_ms: now,
            },
            currency: CURRENCY.into(),
            discount_cents: order.discount_cents,
        };
        let event = Outgoing::new(
            topics::ORDERS_CREATED,
            types::ORDER_CREATED,
            versions::ORDER_CREATED,
            order_id,
            trace,
            &created,
        )?;
        self.outbox.add(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(Created::New(OrderView {
            order_id: order_id.to_string(),
            status: status::PENDING.into(),
            customer_id: order.customer_id.clone(),
            lines: order.lines.clone(),
            subtotal_cents: order.subtotal_cents,
            discount_cents: order.discount_cents,
            total_cents: order.total_cents,
            currency: CURRENCY.into(),
            trace_id: trace.trace_id_hex(),
            created_at_ms: now,
            updated_at_ms: now,
        }))
    }
}

/// The order `order_id`, if it exists.
pub async fn find_order(db: &Db, order_id: &str) -> Result<Option<OrderView>> {
    let row = sqlx::query(
        "SELECT order_id, status, customer_id, lines, subtotal_cents, discount_cents,
            total_cents, currency, trace_id, created_at_ms, updated_at_ms
         FROM orders WHERE order_id = $1",
    )
    .bind(order_id)
    .fetch_optional(db.pool())
    .await?;
    row.map(|row| order_view(&row)).transpose()
}

fn order_view(row: &AnyRow) -> Result<OrderView> {
    let lines: String = row.try_get("lines")?;
    Ok(OrderView {
        order_id: row.try_get("order_id")?,
        status: row.try_get("status")?,
        customer_id: row.try_get("customer_id")?,
        lines: serde_json::from_str(&lines)
            .map_err(|e| Error::Invalid(format!("stored lines do not decode: {e}")))?,
        subtotal_cents: row.try_get("subtotal_cents")?,
        discount_cents: row.try_get("discount_cents")?,
        total_cents: row.try_get("total_cents")?,
        currency: row.try_get("currency")?,
        trace_id: row.try_get("trace_id")?,
        created_at_ms: row.try_get("created_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
    })
}

/// Orders per status, of customers whose id starts with `customer_prefix`.
pub async fn count_by_status(db: &Db, customer_prefix: &str) -> Result<StatusCounts> {
    let rows = sqlx::query(
        "SELECT status, COUNT(*) AS orders FROM orders WHERE customer_id LIKE $1 GROUP BY status",
    )
    .bind(format!("{customer_prefix}%"))
    .fetch_all(db.pool())
    .await?;
    let mut counts = StatusCounts::default();
    for row in rows {
        let status: String = row.try_get("status")?;
        let n = row.try_get::<i64, _>("orders")? as usize;
        match status.as_str() {
            status::PENDING => counts.pending += n,
            status::PAID => counts.paid += n,
            status::CANCELLED => counts.cancelled += n,
            other => return Err(Error::Invalid(format!("unknown order status {other}"))),
        }
    }
    Ok(counts)
}

/// Orders beyond the first per customer, of customers whose id starts with
/// `customer_prefix` (each load-test checkout has its own customer).
pub async fn duplicate_orders(db: &Db, customer_prefix: &str) -> Result<usize> {
    let extra: Vec<i64> = sqlx::query_scalar(
        "SELECT COUNT(*) - 1 FROM orders WHERE customer_id LIKE $1
         GROUP BY customer_id HAVING COUNT(*) > 1",
    )
    .bind(format!("{customer_prefix}%"))
    .fetch_all(db.pool())
    .await?;
    Ok(extra.iter().sum::<i64>() as usize)
}

/// Orders per status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatusCounts {
    /// Waiting for their payment.
    pub pending: usize,
    /// Charged.
    pub paid: usize,
    /// Declined.
    pub cancelled: usize,
}

impl StatusCounts {
    /// All orders.
    pub fn total(&self) -> usize {
        self.pending + self.paid + self.cancelled
    }
}

/// Moves order `order_id` to `new_status` if `event_seq` is above its `status_seq`.
/// Returns whether it moved; a stale or repeated event changes nothing.
pub async fn apply_status(
    db: &Db,
    order_id: &str,
    new_status: &str,
    event_seq: i64,
) -> Result<bool> {
    let moved = sqlx::query(
        "UPDATE orders SET status = $1, status_seq = $2, updated_at_ms = $3
         WHERE order_id = $4 AND status_seq < $2",
    )
    .bind(new_status)
    .bind(event_seq)
    .bind(now_ms())
    .bind(order_id)
    .execute(db.pool())
    .await?
    .rows_affected()
        == 1;
    if !moved && find_order(db, order_id).await?.is_none() {
        // Cannot happen unless events from another system land here: retried, then
        // dead-lettered for a person to look at.
        return Err(Error::NotFound(format!("no order {order_id}")));
    }
    Ok(moved)
}

/// The projection's view of a payment outcome.
pub struct StatusChange {
    order_id: String,
    status: &'static str,
    seq: i64,
}

/// `payments.completed` → PAID, `payments.failed` → CANCELLED.
impl Handler for Orders {
    type Message = StatusChange;

    fn decode(&self, event: &Event) -> Result<StatusChange> {
        match event.event_type.as_str() {
            types::PAYMENT_COMPLETED => {
                let paid: PaymentCompleted = event.payload()?;
                Ok(StatusChange {
                    order_id: paid.order_id,
                    status: status::PAID,
                    seq: paid.seq,
                })
            }
            types::PAYMENT_FAILED => {
                let failed: PaymentFailed = event.payload()?;
                Ok(StatusChange {
                    order_id: failed.order_id,
                    status: status::CANCELLED,
                    seq: failed.seq,
                })
            }
            other => Err(Error::BadEvent(format!(
                "the order projection does not handle {other}"
            ))),
        }
    }

    async fn handle(&self, event: &Event, change: &StatusChange) -> Result<()> {
        let moved = apply_status(&self.db, &change.order_id, change.status, change.seq).await?;
        tracing::info!(
            order_id = change.order_id,
            status = change.status,
            trace_id = event.trace.trace_id_hex(),
            applied = moved,
            "order status"
        );
        Ok(())
    }
}

async fn sweep_idempotency_keys(db: Db, shutdown: CancellationToken) {
    loop {
        let swept = sqlx::query("DELETE FROM order_idempotency WHERE created_at_ms < $1")
            .bind(now_ms() - IDEMPOTENCY_KEEP_MS)
            .execute(db.pool())
            .await;
        if let Err(e) = swept {
            tracing::warn!(error = %e, "deleting expired idempotency keys failed");
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(IDEMPOTENCY_SWEEP_INTERVAL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn db_with_order(dir: &tempfile::TempDir) -> (Db, String) {
        let db = Db::connect(&format!("sqlite://{}/orders.db", dir.path().display()))
            .await
            .expect("connects");
        let outbox = Arc::new(Outbox::new(db.clone(), "order_outbox", None));
        db.migrate(&migrations(&outbox)).await.expect("migrates");
        let orders = Orders {
            db: db.clone(),
            outbox,
            inventory: InventoryClient::new("http://127.0.0.1:9", Duration::from_secs(1)),
        };
        let request = CheckoutRequest::new("alice", &[("TEA-01", 1)]);
        let order = catalog::validate(&request).expect("valid");
        let fingerprint = fingerprint(&order);
        let trace = TraceContext::new_root();
        // The same checkout twice: stored once, then answered from its key.
        let store = || orders.create("o-1", &order, Some("k"), &fingerprint, &trace);
        assert!(matches!(store().await.expect("stored"), Created::New(_)));
        let again = store().await.expect("answered");
        assert!(matches!(again, Created::Existing(e) if e.view.order_id == "o-1"));
        assert_eq!(orders.outbox.unsent().await.expect("counts"), 1);
        (db, "o-1".into())
    }

    /// The projection's rule: a status moves only forward, so a stale, repeated or
    /// reordered event never undoes a later one.
    #[tokio::test]
    async fn a_stale_event_never_moves_an_order_backwards() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (db, id) = db_with_order(&dir).await;
        let status = |db: Db, id: String| async move {
            find_order(&db, &id)
                .await
                .expect("reads")
                .expect("exists")
                .status
        };
        assert_eq!(status(db.clone(), id.clone()).await, status::PENDING);
        assert!(apply_status(&db, &id, status::PAID, seq::PAYMENT)
            .await
            .expect("applies"));
        assert_eq!(status(db.clone(), id.clone()).await, status::PAID);
        // The same outcome again, a conflicting one at the same step, an older one.
        assert!(!apply_status(&db, &id, status::PAID, seq::PAYMENT)
            .await
            .expect("applies"));
        assert!(!apply_status(&db, &id, status::CANCELLED, seq::PAYMENT)
            .await
            .expect("applies"));
        assert!(!apply_status(&db, &id, status::PENDING, seq::CREATED)
            .await
            .expect("applies"));
        assert_eq!(status(db.clone(), id.clone()).await, status::PAID);
        assert!(matches!(
            apply_status(&db, "nobody", status::PAID, seq::PAYMENT).await,
            Err(Error::NotFound(_))
        ));
    }

    #[test]
    fn an_idempotency_key_names_one_order_per_customer() {
        assert_eq!(
            order_id_for_key("alice", "k1"),
            order_id_for_key("alice", "k1")
        );
        assert_ne!(
            order_id_for_key("alice", "k1"),
            order_id_for_key("alice", "k2")
        );
        assert_ne!(
            order_id_for_key("alice", "k1"),
            order_id_for_key("bob", "k1")
        );
    }

    #[test]
    fn an_idempotency_key_header_is_checked() {
        let mut headers = HeaderMap::new();
        assert_eq!(idempotency_key(&headers).expect("absent is fine"), None);
        headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_static("abc"));
        assert_eq!(
            idempotency_key(&headers).expect("valid"),
            Some("abc".into())
        );
        headers.insert(IDEMPOTENCY_KEY, HeaderValue::from_static(""));
        assert!(idempotency_key(&headers).is_err());
        let long = "k".repeat(IDEMPOTENCY_KEY_BYTES_MAX + 1);
        headers.insert(
            IDEMPOTENCY_KEY,
            HeaderValue::from_str(&long).expect("ascii"),
        );
        assert!(idempotency_key(&headers).is_err());
    }
}
