//! The synchronous baseline: the same checkout as a chain of seven HTTP calls between
//! real axum services, each one with the profile's latency, tail, failures and outage.
//!
//! A front service takes `POST /checkout` (the same body as the event-driven one) and
//! calls, one after the other, each with the profile's call timeout (30 s before
//! scaling):
//! `auth → catalog → discount → inventory → order → payment → notification`.
//! Any failure or timeout fails the checkout (502, 503 or 504) at that step, whatever
//! was done before it: an order stored before payment failed stays PENDING (was it
//! charged? nobody knows), a paid order whose notification timed out is reported as a
//! failure. A user who retries (F5) starts again from the top and creates a new order:
//! this design has no idempotency key, as in the story. A declined payment answers 200
//! with the order CANCELLED, after releasing the stock (one more inventory call).
//!
//! The seven services keep their state in memory: storage is not what this baseline
//! measures, the chain is. Marking an order PAID or CANCELLED is a call to the order
//! service without simulated latency.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::catalog::{self, CheckoutRequest, ItemRequest, PRODUCTS};
use crate::error::{Error, Result};
use crate::events::{OrderLine, StockLine};
use crate::http::{HttpClient, HttpResponse, Server};
use crate::profile::{Profile, Service};
use crate::services::order::{status, StatusCounts};
use crate::system::DEFAULT_INITIAL_STOCK;
use crate::trace::{self, TraceContext, TRACEPARENT};

/// How long stopping waits for requests in progress.
const HTTP_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// The baseline's services, running.
#[derive(Debug)]
pub struct Baseline {
    shutdown: CancellationToken,
    servers: Vec<Server>,
    checkout_url: String,
    state: Arc<Shared>,
}

/// An order as the baseline's order service keeps it.
#[derive(Debug, Clone)]
struct StoredOrder {
    customer_id: String,
    status: &'static str,
}

/// What the in-memory services keep.
#[derive(Debug, Default)]
struct Books {
    orders: HashMap<String, StoredOrder>,
    stock: HashMap<&'static str, i64>,
    reservations: HashMap<String, Vec<StockLine>>,
}

#[derive(Debug)]
struct Shared {
    profile: Arc<Profile>,
    books: Mutex<Books>,
}

impl Shared {
    fn books(&self) -> MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where the front service finds the seven.
#[derive(Debug, Clone)]
struct Front {
    shared: Arc<Shared>,
    http: HttpClient,
    urls: HashMap<Service, String>,
}

impl Baseline {
    /// Starts the seven services on free loopback ports and the front service on
    /// `listen`.
    pub async fn start(profile: Arc<Profile>, listen: SocketAddr) -> Result<Baseline> {
        let shutdown = CancellationToken::new();
        let shared = Arc::new(Shared {
            profile,
            books: Mutex::new(Books {
                stock: PRODUCTS
                    .iter()
                    .map(|p| (p.sku, DEFAULT_INITIAL_STOCK))
                    .collect(),
                ..Books::default()
            }),
        });
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        let mut servers = Vec::new();
        let mut urls = HashMap::new();
        for service in Service::ALL {
            let server = Server::start(
                service.name(),
                any_port,
                router(service).with_state(Arc::clone(&shared)),
                shutdown.clone(),
            )
            .await?;
            urls.insert(service, server.url());
            servers.push(server);
        }
        let front = Front {
            shared: Arc::clone(&shared),
            http: HttpClient::new(),
            urls,
        };
        let router = Router::new()
            .route("/checkout", post(checkout))
            .with_state(Arc::new(front));
        let server = Server::start("checkout", listen, router, shutdown.clone()).await?;
        let checkout_url = server.url();
        servers.push(server);
        Ok(Baseline {
            shutdown,
            servers,
            checkout_url,
            state: shared,
        })
    }

    /// `http://<addr>` of the front service: `POST {url}/checkout`.
    pub fn url(&self) -> &str {
        &self.checkout_url
    }

    /// Orders per status, of customers whose id starts with `customer_prefix`.
    pub fn count_by_status(&self, customer_prefix: &str) -> StatusCounts {
        let mut counts = StatusCounts::default();
        for order in self.state.books().orders.values() {
            if order.customer_id.starts_with(customer_prefix) {
                match order.status {
                    status::PAID => counts.paid += 1,
                    status::CANCELLED => counts.cancelled += 1,
                    _ => counts.pending += 1,
                }
            }
        }
        counts
    }

    /// Orders beyond the first per customer, of customers whose id starts with
    /// `customer_prefix`.
    pub fn duplicate_orders(&self, customer_prefix: &str) -> usize {
        let mut per_customer: HashMap<String, usize> = HashMap::new();
        for order in self.state.books().orders.values() {
            if order.customer_id.starts_with(customer_prefix) {
                *per_customer.entry(order.customer_id.clone()).or_default() += 1;
            }
        }
        per_customer.values().map(|n| n - 1).sum()
    }

    /// Stops every service; requests hung on an outage are dropped.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for server in self.servers {
            server.join(HTTP_GRACE).await;
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct AuthRequest {
    customer_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct PriceRequest {
    items: Vec<ItemRequest>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Priced {
    lines: Vec<OrderLine>,
}

#[derive(Debug, Serialize, Deserialize)]
struct DiscountRequest {
    subtotal_cents: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Discounted {
    discount_cents: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct ReserveRequest {
    lines: Vec<StockLine>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ReservationRef {
    reservation_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct CreateOrder {
    customer_id: String,
    total_cents: i64,
    reservation_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct OrderRef {
    order_id: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct StatusUpdate {
    status: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct ChargeRequest {
    order_id: String,
    amount_cents: i64,
    payment_token: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct ChargeResult {
    declined: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct NotifyRequest {
    order_id: String,
    customer_id: String,
}

/// The answer of the front service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaselineAnswer {
    /// The order.
    pub order_id: String,
    /// PAID or CANCELLED.
    pub status: String,
    /// Charged (or declined), in cents.
    pub total_cents: i64,
}

type Ctx = State<Arc<Shared>>;

fn router(service: Service) -> Router<Arc<Shared>> {
    match service {
        Service::Auth => Router::new().route("/authenticate", post(authenticate)),
        Service::Catalog => Router::new().route("/price", post(price)),
        Service::Discount => Router::new().route("/discount", post(discount)),
        Service::Inventory => Router::new()
            .route("/reserve", post(reserve))
            .route("/release", post(release)),
        Service::Order => Router::new()
            .route("/orders", post(create_order))
            .route("/orders/{order_id}/status", post(set_status)),
        Service::Payment => Router::new().route("/charge", post(charge)),
        Service::Notification => Router::new().route("/notify", post(notify)),
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| Error::Invalid(e.to_string()))
}

async fn authenticate(State(s): Ctx, body: Bytes) -> Result<Json<serde_json::Value>> {
    s.profile.call(Service::Auth).await?;
    let request: AuthRequest = parse(&body)?;
    catalog::authenticate(&request.customer_id)?;
    Ok(Json(serde_json::json!({})))
}

async fn price(State(s): Ctx, body: Bytes) -> Result<Json<Priced>> {
    s.profile.call(Service::Catalog).await?;
    let request: PriceRequest = parse(&body)?;
    Ok(Json(Priced {
        lines: catalog::price(&request.items)?,
    }))
}

async fn discount(State(s): Ctx, body: Bytes) -> Result<Json<Discounted>> {
    s.profile.call(Service::Discount).await?;
    let request: DiscountRequest = parse(&body)?;
    Ok(Json(Discounted {
        discount_cents: catalog::discount(request.subtotal_cents),
    }))
}

async fn reserve(State(s): Ctx, body: Bytes) -> Result<Json<ReservationRef>> {
    s.profile.call(Service::Inventory).await?;
    let request: ReserveRequest = parse(&body)?;
    let mut books = s.books();
    for line in &request.lines {
        let available = books.stock.get(line.sku.as_str()).copied().unwrap_or(0);
        if available < line.quantity {
            return Err(Error::OutOfStock {
                sku: line.sku.clone(),
                requested: line.quantity,
                available,
            });
        }
    }
    for line in &request.lines {
        if let Some(available) = books.stock.get_mut(line.sku.as_str()) {
            *available -= line.quantity;
        }
    }
    let reservation_id = uuid::Uuid::new_v4().to_string();
    books
        .reservations
        .insert(reservation_id.clone(), request.lines);
    Ok(Json(ReservationRef { reservation_id }))
}

async fn release(State(s): Ctx, body: Bytes) -> Result<Json<serde_json::Value>> {
    s.profile.call(Service::Inventory).await?;
    let request: ReservationRef = parse(&body)?;
    let mut books = s.books();
    let lines = books
        .reservations
        .remove(&request.reservation_id)
        .unwrap_or_default();
    for line in lines {
        if let Some(available) = books.stock.get_mut(line.sku.as_str()) {
            *available += line.quantity;
        }
    }
    Ok(Json(serde_json::json!({})))
}

async fn create_order(State(s): Ctx, body: Bytes) -> Result<Json<OrderRef>> {
    s.profile.call(Service::Order).await?;
    let request: CreateOrder = parse(&body)?;
    let order_id = uuid::Uuid::new_v4().to_string();
    s.books().orders.insert(
        order_id.clone(),
        StoredOrder {
            customer_id: request.customer_id,
            status: status::PENDING,
        },
    );
    Ok(Json(OrderRef { order_id }))
}

async fn set_status(
    State(s): Ctx,
    Path(order_id): Path<String>,
    body: Bytes,
) -> Result<Json<serde_json::Value>> {
    let request: StatusUpdate = parse(&body)?;
    let new_status = match request.status.as_str() {
        status::PAID => status::PAID,
        status::CANCELLED => status::CANCELLED,
        other => return Err(Error::Invalid(format!("unknown status {other}"))),
    };
    let mut books = s.books();
    let order = books
        .orders
        .get_mut(&order_id)
        .ok_or_else(|| Error::NotFound(format!("no order {order_id}")))?;
    order.status = new_status;
    Ok(Json(serde_json::json!({})))
}

async fn charge(State(s): Ctx, body: Bytes) -> Result<Json<ChargeResult>> {
    s.profile.call(Service::Payment).await?;
    let request: ChargeRequest = parse(&body)?;
    let declined = s
        .profile
        .decline(&request.order_id, &request.payment_token)
        .map(str::to_string);
    Ok(Json(ChargeResult { declined }))
}

async fn notify(State(s): Ctx, body: Bytes) -> Result<Json<serde_json::Value>> {
    s.profile.call(Service::Notification).await?;
    let request: NotifyRequest = parse(&body)?;
    tracing::debug!(
        order_id = request.order_id,
        to = request.customer_id,
        "email sent"
    );
    Ok(Json(serde_json::json!({})))
}

impl Front {
    /// One call of the chain: POST `body` to `service`'s `path`, within the call
    /// timeout, and decode its answer.
    async fn call<Req: Serialize, Resp: serde::de::DeserializeOwned>(
        &self,
        service: Service,
        path: &str,
        trace: &TraceContext,
        body: &Req,
    ) -> Result<Resp> {
        let base = self
            .urls
            .get(&service)
            .ok_or_else(|| Error::Setup(format!("no {service} service")))?;
        let traceparent = trace.child().to_string();
        let response: HttpResponse = self
            .http
            .post_json(
                service.name(),
                &format!("{base}{path}"),
                &[(TRACEPARENT, &traceparent)],
                body,
                self.shared.profile.call_timeout(),
            )
            .await?;
        response.ensure_success(service.name())?;
        response.json()
    }
}

async fn checkout(
    State(front): State<Arc<Front>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<(StatusCode, Json<BaselineAnswer>)> {
    let trace = trace::from_http(&headers);
    let request: CheckoutRequest = parse(&body)?;
    let customer_id = request.customer_id.clone();
    let _: serde_json::Value = front
        .call(
            Service::Auth,
            "/authenticate",
            &trace,
            &AuthRequest {
                customer_id: customer_id.clone(),
            },
        )
        .await?;
    let priced: Priced = front
        .call(
            Service::Catalog,
            "/price",
            &trace,
            &PriceRequest {
                items: request.items.clone(),
            },
        )
        .await?;
    let subtotal_cents = catalog::subtotal(&priced.lines);
    let discounted: Discounted = front
        .call(
            Service::Discount,
            "/discount",
            &trace,
            &DiscountRequest { subtotal_cents },
        )
        .await?;
    let total_cents = subtotal_cents - discounted.discount_cents;
    let reservation: ReservationRef = front
        .call(
            Service::Inventory,
            "/reserve",
            &trace,
            &ReserveRequest {
                lines: priced
                    .lines
                    .iter()
                    .map(|l| StockLine {
                        sku: l.sku.clone(),
                        quantity: l.quantity,
                    })
                    .collect(),
            },
        )
        .await?;
    let order: OrderRef = front
        .call(
            Service::Order,
            "/orders",
            &trace,
            &CreateOrder {
                customer_id: customer_id.clone(),
                total_cents,
                reservation_id: reservation.reservation_id.clone(),
            },
        )
        .await?;
    let charged: ChargeResult = front
        .call(
            Service::Payment,
            "/charge",
            &trace,
            &ChargeRequest {
                order_id: order.order_id.clone(),
                amount_cents: total_cents,
                payment_token: request
                    .payment_token
                    .clone()
                    .unwrap_or_else(|| catalog::DEFAULT_PAYMENT_TOKEN.into()),
            },
        )
        .await?;
    // Declined: release the stock, then cancel the order. Charged: mark it paid, then
    // notify the customer.
    let (final_status, answer_status) = match charged.declined {
        Some(_) => {
            let _: serde_json::Value = front
                .call(Service::Inventory, "/release", &trace, &reservation)
                .await?;
            (status::CANCELLED, StatusCode::OK)
        }
        None => (status::PAID, StatusCode::CREATED),
    };
    let _: serde_json::Value = front
        .call(
            Service::Order,
            &format!("/orders/{}/status", order.order_id),
            &trace,
            &StatusUpdate {
                status: final_status.into(),
            },
        )
        .await?;
    if final_status == status::PAID {
        let _: serde_json::Value = front
            .call(
                Service::Notification,
                "/notify",
                &trace,
                &NotifyRequest {
                    order_id: order.order_id.clone(),
                    customer_id,
                },
            )
            .await?;
    }
    Ok((
        answer_status,
        Json(BaselineAnswer {
            order_id: order.order_id,
            status: final_status.into(),
            total_cents,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::profile::DECLINED_TOKEN;

    /// The chain's two endings: a charge marks the order PAID, notifies and answers 201;
    /// a decline releases the stock, marks the order CANCELLED and answers 200.
    #[tokio::test]
    async fn a_decline_cancels_the_order_and_releases_its_stock() {
        let profile = Arc::new(Profile::default().with(1.0, 0.0, 0.0, None));
        let baseline = Baseline::start(profile, SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("the baseline starts");
        let http = HttpClient::new();
        let url = format!("{}/checkout", baseline.url());
        let post = |request: CheckoutRequest| {
            let (http, url) = (&http, &url);
            async move {
                let response = http
                    .post_json("checkout", url, &[], &request, Duration::from_secs(30))
                    .await
                    .expect("the front service answers");
                let answer: BaselineAnswer = response.json().expect("an answer");
                (response.status, answer.status)
            }
        };

        let paid = post(CheckoutRequest::new("paid-1", &[("TEA-01", 2)])).await;
        assert_eq!(paid, (StatusCode::CREATED, status::PAID.to_string()));
        let declined = post(CheckoutRequest {
            payment_token: Some(DECLINED_TOKEN.into()),
            ..CheckoutRequest::new("declined-1", &[("MUG-01", 3)])
        })
        .await;
        assert_eq!(declined, (StatusCode::OK, status::CANCELLED.to_string()));

        assert_eq!(baseline.count_by_status("paid-").paid, 1);
        assert_eq!(baseline.count_by_status("declined-").cancelled, 1);
        {
            let books = baseline.state.books();
            assert_eq!(books.stock["TEA-01"], DEFAULT_INITIAL_STOCK - 2);
            assert_eq!(books.stock["MUG-01"], DEFAULT_INITIAL_STOCK);
        }
        baseline.stop().await;
    }
}
