//! The inventory service: reserves stock synchronously (the one call left on the
//! checkout's path) and releases it when a payment fails (the saga's compensation).
//!
//! HTTP:
//! - `POST /reservations` `{"order_id", "lines": [{"sku", "quantity"}]}`: reserves every
//!   line or nothing (409 when a product runs short). Idempotent per order id: a
//!   repeated call for a reserved order answers 200 and takes nothing more; a released
//!   reservation is taken anew.
//! - `DELETE /reservations/{order_id}`: releases it (the order service's undo when it
//!   cannot store the order). `GET /reservations/{order_id}`, `GET /stock/{sku}`.
//!
//! Events: consumer group `inventory` on `payments.failed`. In one transaction it
//! records the event id in `inventory_processed` (a repeat does nothing), returns the
//! order's reserved stock, and adds `inventory.released` to its outbox.
//!
//! Tables: `inventory_stock` (available units per product), `inventory_reservations`
//! (per order and product: RESERVED or RELEASED), `inventory_processed`,
//! `inventory_outbox`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sqlx::{Any, Row, Transaction};
use strata_client::Client;
use tokio_util::sync::CancellationToken;

use crate::catalog::PRODUCTS;
use crate::consume::{self, ConsumerSettings, Handler};
use crate::db::{now_ms, Db};
use crate::error::{Error, Result};
use crate::events::{
    seq, topics, types, versions, Event, InventoryReleased, OrderLine, Outgoing, PaymentFailed,
    StockLine,
};
use crate::http::{HttpClient, Server};
use crate::outbox::Outbox;
use crate::profile::{Profile, Service};
use crate::services::Running;
use crate::trace::{self, TraceContext, TRACEPARENT};

/// The consumer group releasing reservations.
pub const GROUP: &str = "inventory";
const TOPICS: &[&str] = &[topics::PAYMENTS_FAILED];
const PROCESSED: &str = "inventory_processed";
const RESERVED: &str = "RESERVED";
const RELEASED: &str = "RELEASED";

/// Settings of the inventory service.
#[derive(Debug, Clone)]
pub struct InventoryConfig {
    /// Where the HTTP API listens.
    pub listen: SocketAddr,
    /// Units of every product stocked when the service first starts on a database.
    pub initial_stock: i64,
    /// How it consumes `payments.failed`.
    pub consumer: ConsumerSettings,
}

/// The body of `POST /reservations`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReservationRequest {
    /// The order the stock is for.
    pub order_id: String,
    /// What to reserve.
    pub lines: Vec<StockLine>,
}

/// A reservation as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The order.
    pub order_id: String,
    /// RESERVED or RELEASED.
    pub status: String,
    /// What it holds (or held).
    pub lines: Vec<StockLine>,
}

/// A product's stock as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stock {
    /// The product.
    pub sku: String,
    /// Units not reserved.
    pub available: i64,
}

struct Inventory {
    db: Db,
    outbox: Arc<Outbox>,
    profile: Arc<Profile>,
}

/// Creates the tables, stocks the catalog, and starts the HTTP API, the
/// `payments.failed` consumers and the outbox relay.
pub async fn start(
    client: &Client,
    db: Db,
    profile: Arc<Profile>,
    config: &InventoryConfig,
    shutdown: CancellationToken,
) -> Result<Running> {
    let outbox = Arc::new(Outbox::new(db.clone(), "inventory_outbox", None));
    db.migrate(&[
        "CREATE TABLE IF NOT EXISTS inventory_stock (
            sku TEXT PRIMARY KEY,
            available BIGINT NOT NULL
        )"
        .into(),
        "CREATE TABLE IF NOT EXISTS inventory_reservations (
            order_id TEXT NOT NULL,
            sku TEXT NOT NULL,
            quantity BIGINT NOT NULL,
            status TEXT NOT NULL,
            updated_at_ms BIGINT NOT NULL,
            PRIMARY KEY (order_id, sku)
        )"
        .into(),
        consume::processed_table(PROCESSED),
        outbox.migration(),
    ])
    .await?;
    for product in PRODUCTS {
        sqlx::query(
            "INSERT INTO inventory_stock (sku, available) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(product.sku)
        .bind(config.initial_stock)
        .execute(db.pool())
        .await?;
    }
    let inventory = Arc::new(Inventory {
        db,
        outbox: Arc::clone(&outbox),
        profile,
    });
    let mut tasks = consume::spawn(
        client,
        GROUP,
        TOPICS,
        &config.consumer,
        Arc::clone(&inventory),
        shutdown.clone(),
    )
    .await?;
    tasks.push(outbox.spawn_relay(client.clone(), shutdown.clone()));
    let router = Router::new()
        .route("/reservations", post(reserve))
        .route(
            "/reservations/{order_id}",
            get(get_reservation).delete(release_reservation),
        )
        .route("/stock/{sku}", get(get_stock))
        .with_state(inventory);
    let server = Server::start("inventory", config.listen, router, shutdown).await?;
    tracing::info!(url = server.url(), "inventory service listening");
    Ok(Running::new("inventory", Some(server), tasks))
}

async fn reserve(
    State(inventory): State<Arc<Inventory>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<Reservation>)> {
    let trace = trace::from_http(&headers);
    let request: ReservationRequest = serde_json::from_slice(&body)
        .map_err(|e| Error::Invalid(format!("reservation body: {e}")))?;
    if request.order_id.is_empty() || request.lines.is_empty() {
        return Err(Error::Invalid(
            "a reservation needs an order_id and at least one line".into(),
        ));
    }
    if let Some(line) = request.lines.iter().find(|l| l.quantity < 1) {
        return Err(Error::Invalid(format!(
            "quantity of {} must be at least 1",
            line.sku
        )));
    }
    // The simulated cost of the call (and its outage and failures), as in the
    // synchronous design.
    inventory.profile.call(Service::Inventory).await?;
    let created = inventory.reserve(&request).await?;
    tracing::debug!(
        order_id = request.order_id,
        trace_id = trace.trace_id_hex(),
        created,
        "reserved"
    );
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let reservation = Reservation {
        order_id: request.order_id,
        status: RESERVED.into(),
        lines: request.lines,
    };
    Ok((status, Json(reservation)))
}

async fn release_reservation(
    State(inventory): State<Arc<Inventory>>,
    Path(order_id): Path<String>,
) -> Result<Json<Reservation>> {
    let mut tx = inventory.db.begin().await?;
    let lines = release(&mut tx, &order_id).await?;
    tx.commit().await?;
    Ok(Json(Reservation {
        order_id,
        status: RELEASED.into(),
        lines,
    }))
}

async fn get_reservation(
    State(inventory): State<Arc<Inventory>>,
    Path(order_id): Path<String>,
) -> Result<Json<Reservation>> {
    let rows = sqlx::query(
        "SELECT sku, quantity, status FROM inventory_reservations WHERE order_id = $1 ORDER BY sku",
    )
    .bind(&order_id)
    .fetch_all(inventory.db.pool())
    .await?;
    let Some(first) = rows.first() else {
        return Err(Error::NotFound(format!(
            "no reservation for order {order_id}"
        )));
    };
    let status: String = first.try_get("status")?;
    let lines = rows
        .iter()
        .map(|row| {
            Ok(StockLine {
                sku: row.try_get("sku")?,
                quantity: row.try_get("quantity")?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(Json(Reservation {
        order_id,
        status,
        lines,
    }))
}

async fn get_stock(
    State(inventory): State<Arc<Inventory>>,
    Path(sku): Path<String>,
) -> Result<Json<Stock>> {
    let available: Option<i64> =
        sqlx::query_scalar("SELECT available FROM inventory_stock WHERE sku = $1")
            .bind(&sku)
            .fetch_optional(inventory.db.pool())
            .await?;
    let available = available.ok_or_else(|| Error::NotFound(format!("no product {sku}")))?;
    Ok(Json(Stock { sku, available }))
}

impl Inventory {
    /// Reserves every line or nothing. Returns whether a reservation was made (false:
    /// the order already held one).
    async fn reserve(&self, request: &ReservationRequest) -> Result<bool> {
        let mut tx = self.db.begin().await?;
        let existing: Vec<String> =
            sqlx::query_scalar("SELECT status FROM inventory_reservations WHERE order_id = $1")
                .bind(&request.order_id)
                .fetch_all(&mut *tx)
                .await?;
        if existing.iter().any(|s| s == RESERVED) {
            return Ok(false);
        }
        if !existing.is_empty() {
            // Released (the order could not be stored): reserve again from scratch.
            sqlx::query("DELETE FROM inventory_reservations WHERE order_id = $1")
                .bind(&request.order_id)
                .execute(&mut *tx)
                .await?;
        }
        let now = now_ms();
        for line in &request.lines {
            let taken = sqlx::query(
                "UPDATE inventory_stock SET available = available - $1
                 WHERE sku = $2 AND available >= $1",
            )
            .bind(line.quantity)
            .bind(&line.sku)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if taken == 0 {
                let available: Option<i64> =
                    sqlx::query_scalar("SELECT available FROM inventory_stock WHERE sku = $1")
                        .bind(&line.sku)
                        .fetch_optional(&mut *tx)
                        .await?;
                return Err(match available {
                    Some(available) => Error::OutOfStock {
                        sku: line.sku.clone(),
                        requested: line.quantity,
                        available,
                    },
                    None => Error::Unprocessable(format!("unknown product {:?}", line.sku)),
                });
            }
            let inserted = sqlx::query(
                "INSERT INTO inventory_reservations (order_id, sku, quantity, status, updated_at_ms)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            )
            .bind(&request.order_id)
            .bind(&line.sku)
            .bind(line.quantity)
            .bind(RESERVED)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted == 0 {
                // A concurrent request for the same order (on PostgreSQL, where the
                // check above does not lock) reserved it first: undo ours.
                tx.rollback().await?;
                return Ok(false);
            }
        }
        tx.commit().await?;
        Ok(true)
    }
}

/// Releases `order_id`'s reserved lines inside `tx` and returns them (none if nothing
/// was reserved, or it was released already).
async fn release(tx: &mut Transaction<'static, Any>, order_id: &str) -> Result<Vec<StockLine>> {
    let rows = sqlx::query(
        "UPDATE inventory_reservations SET status = $1, updated_at_ms = $2
         WHERE order_id = $3 AND status = $4 RETURNING sku, quantity",
    )
    .bind(RELEASED)
    .bind(now_ms())
    .bind(order_id)
    .bind(RESERVED)
    .fetch_all(&mut **tx)
    .await?;
    let mut lines = Vec::with_capacity(rows.len());
    for row in rows {
        let line = StockLine {
            sku: row.try_get("sku")?,
            quantity: row.try_get("quantity")?,
        };
        sqlx::query("UPDATE inventory_stock SET available = available + $1 WHERE sku = $2")
            .bind(line.quantity)
            .bind(&line.sku)
            .execute(&mut **tx)
            .await?;
        lines.push(line);
    }
    lines.sort_by(|a, b| a.sku.cmp(&b.sku));
    Ok(lines)
}

/// `payments.failed` → release the order's stock and announce it.
impl Handler for Inventory {
    type Message = PaymentFailed;

    fn decode(&self, event: &Event) -> Result<PaymentFailed> {
        consume::decode_as(event, types::PAYMENT_FAILED)
    }

    async fn handle(&self, event: &Event, failed: &PaymentFailed) -> Result<()> {
        let mut tx = self.db.begin().await?;
        if !consume::first_delivery(&mut tx, PROCESSED, &event.id).await? {
            return Ok(());
        }
        let lines = release(&mut tx, &failed.order_id).await?;
        if !lines.is_empty() {
            let released = InventoryReleased {
                order_id: failed.order_id.clone(),
                lines: lines.clone(),
                seq: seq::RELEASED,
                occurred_at_ms: now_ms(),
            };
            let outgoing = Outgoing::new(
                topics::INVENTORY_RELEASED,
                types::INVENTORY_RELEASED,
                versions::INVENTORY_RELEASED,
                &failed.order_id,
                &event.context(),
                &released,
            )?;
            self.outbox.add(&mut tx, &outgoing).await?;
        }
        tx.commit().await?;
        self.outbox.wake();
        tracing::info!(
            order_id = failed.order_id,
            trace_id = event.trace.trace_id_hex(),
            lines = lines.len(),
            "payment failed: reservation released"
        );
        Ok(())
    }
}

/// The order service's client of this service.
#[derive(Debug, Clone)]
pub struct InventoryClient {
    http: HttpClient,
    url: String,
    timeout: Duration,
}

impl InventoryClient {
    /// A client of the inventory service at `url` (`http://host:port`), giving up on a
    /// call after `timeout`.
    pub fn new(url: &str, timeout: Duration) -> InventoryClient {
        InventoryClient {
            http: HttpClient::new(),
            url: url.trim_end_matches('/').to_string(),
            timeout,
        }
    }

    /// Reserves `lines` for `order_id` (idempotent per order id).
    pub async fn reserve(
        &self,
        order_id: &str,
        lines: &[OrderLine],
        trace: &TraceContext,
    ) -> Result<()> {
        let request = ReservationRequest {
            order_id: order_id.to_string(),
            lines: lines
                .iter()
                .map(|l| StockLine {
                    sku: l.sku.clone(),
                    quantity: l.quantity,
                })
                .collect(),
        };
        let traceparent = trace.child().to_string();
        let response = self
            .http
            .post_json(
                "inventory",
                &format!("{}/reservations", self.url),
                &[(TRACEPARENT, &traceparent)],
                &request,
                self.timeout,
            )
            .await?;
        response.ensure_success("inventory")
    }

    /// Releases `order_id`'s reservation.
    pub async fn release(&self, order_id: &str) -> Result<()> {
        let response = self
            .http
            .request(
                "inventory",
                axum::http::Method::DELETE,
                &format!("{}/reservations/{order_id}", self.url),
                &[],
                None,
                self.timeout,
            )
            .await?;
        response.ensure_success("inventory")
    }
}
