//! The event-driven checkout against the real `strata` binary, on SQLite and (when it
//! answers on 127.0.0.1:5432) on PostgreSQL: orders settle, failed payments release
//! their stock, idempotency keys hold under concurrency, the notification outage does
//! not touch checkout, trace ids travel with the events, poison events are
//! dead-lettered, old consumers read new events, and a late projection rebuilds its view
//! from offset 0.

#[allow(dead_code, reason = "shared by the test files, each using part of it")]
#[macro_use]
mod common;

use std::collections::{HashMap, HashSet};

use checkout::catalog::CheckoutRequest;
use checkout::events::{self, topics, types, versions, OrderCreatedV1, OrderCreatedV2};
use checkout::profile::{Service, DECLINED_TOKEN};
use checkout::services::inventory::{Reservation, Stock};
use checkout::services::order::{self, status, OrderView, IDEMPOTENT_REPLAYED};
use checkout::services::{notification, payment, revenue};
use checkout::system::DEFAULT_INITIAL_STOCK;
use checkout::trace::TraceContext;
use common::{Env, Store};
use strata_client::{headers, Record};

on_both_stores!(
    every_checkout_settles_and_a_failed_payment_releases_its_stock,
    one_idempotency_key_makes_one_order,
    the_notification_outage_leaves_checkout_untouched,
);

/// Twelve checkouts, three of them declined: every order ends PAID or CANCELLED; a
/// declined order's reservation is released (stock back, `inventory.released`
/// published); the trace id of each checkout (given by the caller or not) reaches its
/// payment and its notification; and the revenue projection, started afterwards,
/// rebuilds the paid total from the log.
async fn every_checkout_settles_and_a_failed_payment_releases_its_stock(env: Env) {
    let system = common::start(&env.config(common::fast_profile())).await;
    let url = system.order_url().expect("order runs").to_string();
    let inventory = system.inventory_url().expect("inventory runs").to_string();
    let caller_trace = TraceContext::new_root();
    let mut placed: Vec<OrderView> = Vec::new();
    let mut declined = HashSet::new();
    for i in 0..12 {
        let token = (i % 4 == 3).then_some(DECLINED_TOKEN);
        let request = CheckoutRequest {
            payment_token: token.map(str::to_string),
            ..CheckoutRequest::new(format!("flow-{i}"), &[("TEA-01", 1 + i % 3), ("MUG-01", 1)])
        };
        let traceparent = (i == 0).then(|| caller_trace.to_string());
        let view = common::place(&url, &request, None, traceparent.as_deref()).await;
        assert_eq!(view.status, status::PENDING);
        if token.is_some() {
            declined.insert(view.order_id.clone());
        }
        // Read your own writes: the order is there at once.
        let read: OrderView = common::get_json(&format!("{url}/orders/{}", view.order_id)).await;
        assert_eq!(read.order_id, view.order_id);
        placed.push(view);
    }
    assert_eq!(placed[0].trace_id, caller_trace.trace_id_hex());

    let orders_db = env.db("orders").await;
    let counts = common::wait_settled(&orders_db, "flow-", 12).await;
    assert_eq!((counts.paid, counts.cancelled), (9, 3));

    let mut sold = 0;
    for view in &placed {
        let reservation: Reservation =
            common::get_json(&format!("{inventory}/reservations/{}", view.order_id)).await;
        let stored = order::find_order(&orders_db, &view.order_id)
            .await
            .expect("reads")
            .expect("exists");
        if !declined.contains(&view.order_id) {
            assert_eq!(stored.status, status::PAID);
            assert_eq!(reservation.status, "RESERVED");
            sold += view
                .lines
                .iter()
                .find(|l| l.sku == "TEA-01")
                .map_or(0, |l| l.quantity);
        } else {
            assert_eq!(stored.status, status::CANCELLED);
            // The compensation may still be on its way: wait for it.
            let id = view.order_id.clone();
            let inventory = inventory.clone();
            common::wait_for("the reservation to be released", || {
                let (id, inventory) = (id.clone(), inventory.clone());
                async move {
                    let r: Reservation =
                        common::get_json(&format!("{inventory}/reservations/{id}")).await;
                    (r.status == "RELEASED").then_some(())
                }
            })
            .await;
        }
    }
    let stock: Stock = common::get_json(&format!("{inventory}/stock/TEA-01")).await;
    assert_eq!(stock.available, DEFAULT_INITIAL_STOCK - sold);

    let client = env.client().await;
    let released = common::wait_for("three inventory.released events", || async {
        let events = common::read_topic(&client, topics::INVENTORY_RELEASED).await;
        (events.len() == 3).then_some(events)
    })
    .await;
    let released: HashSet<String> = released
        .iter()
        .map(|e| {
            e.payload::<events::InventoryReleased>()
                .expect("decodes")
                .order_id
        })
        .collect();
    assert_eq!(released, declined);

    // The checkout's trace id is logged and stored by the payment and notification
    // handlers.
    let payments = payment::list_payments(&env.db("payments").await)
        .await
        .expect("reads");
    assert_eq!(payments.len(), 12);
    let notifications_db = env.db("notifications").await;
    let sent = common::wait_for("nine emails", || async {
        let sent = notification::list_sent(&notifications_db)
            .await
            .expect("reads");
        (sent.len() == 9).then_some(sent)
    })
    .await;
    for view in &placed {
        let charge = payments
            .iter()
            .find(|p| p.order_id == view.order_id)
            .expect("charged");
        assert_eq!(charge.trace_id, view.trace_id);
        if let Some(email) = sent.iter().find(|s| s.order_id == view.order_id) {
            assert_eq!(email.trace_id, view.trace_id);
        }
    }

    // A service that did not exist during the run builds its view from offset 0.
    let (revenue, _) = revenue::replay(&client).await.expect("replays");
    let paid_total: i64 = payments
        .iter()
        .filter(|p| p.status == "COMPLETED")
        .map(|p| p.amount_cents)
        .sum();
    assert_eq!(revenue.payments(), 9);
    assert_eq!(revenue.total_cents(), paid_total);
    system.stop().await;
}

/// The same checkout POSTed again with its key answers the same order (200, replayed)
/// and creates nothing; eight concurrent POSTs with one key create one order, reserve
/// once and publish one event; the key with a different cart is refused.
async fn one_idempotency_key_makes_one_order(env: Env) {
    let system = common::start(&env.config(common::fast_profile())).await;
    let url = system.order_url().expect("order runs").to_string();
    let inventory = system.inventory_url().expect("inventory runs").to_string();
    let request = CheckoutRequest::new("idem-a", &[("POT-01", 2)]);
    let first = common::place(&url, &request, Some("key-1"), None).await;
    for _ in 0..2 {
        let again = common::post_checkout(&url, &request, Some("key-1"), None)
            .await
            .expect("answers");
        assert_eq!(again.status.as_u16(), 200);
        assert_eq!(
            again.headers.get(IDEMPOTENT_REPLAYED).map(|v| v.as_bytes()),
            Some(&b"true"[..])
        );
        let view: OrderView = again.json().expect("an order");
        assert_eq!(view.order_id, first.order_id);
    }
    let other_cart = CheckoutRequest::new("idem-a", &[("POT-01", 3)]);
    let refused = common::post_checkout(&url, &other_cart, Some("key-1"), None)
        .await
        .expect("answers");
    assert_eq!(refused.status.as_u16(), 422, "{}", refused.error_message());

    let racing = CheckoutRequest::new("idem-b", &[("KET-01", 1)]);
    let answers = futures_join_all((0..8).map(|_| {
        let (url, racing) = (url.clone(), racing.clone());
        async move {
            common::post_checkout(&url, &racing, Some("key-2"), None)
                .await
                .expect("answers")
        }
    }))
    .await;
    let ids: HashSet<String> = answers
        .iter()
        .map(|a| {
            assert!(a.status.is_success(), "{}", a.error_message());
            a.json::<OrderView>().expect("an order").order_id
        })
        .collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(
        answers.iter().filter(|a| a.status.as_u16() == 201).count(),
        1
    );

    let orders_db = env.db("orders").await;
    let counts = common::wait_settled(&orders_db, "idem-", 2).await;
    assert_eq!(counts.paid, 2);
    assert_eq!(
        order::duplicate_orders(&orders_db, "idem-")
            .await
            .expect("counts"),
        0
    );
    let stock: Stock = common::get_json(&format!("{inventory}/stock/KET-01")).await;
    assert_eq!(stock.available, DEFAULT_INITIAL_STOCK - 1);
    let client = env.client().await;
    let created = common::read_topic(&client, topics::ORDERS_CREATED).await;
    assert_eq!(created.len(), 2);
    let payments = payment::list_payments(&env.db("payments").await)
        .await
        .expect("reads");
    assert_eq!(payments.len(), 2);
    system.stop().await;
}

/// With the notification service stuck forever (its handler never returns), every
/// checkout still answers 201 and every order is PAID: no checkout's path waits on
/// notification. Its group's lag holds the emails; a healthy instance started later
/// sends every one of them, with the checkout's trace id.
async fn the_notification_outage_leaves_checkout_untouched(env: Env) {
    let mut core = env.config(common::fast_profile());
    core.notification_workers = None;
    let system = common::start(&core).await;
    let mut stuck =
        env.config(common::fast_profile().with(1.0, 0.0, 0.0, Some(Service::Notification)));
    stuck.order = None;
    stuck.inventory = None;
    stuck.payment_workers = None;
    let notifier = common::start(&stuck).await;

    let url = system.order_url().expect("order runs").to_string();
    let mut placed = Vec::new();
    for i in 0..10 {
        let request = CheckoutRequest::new(format!("outage-{i}"), &[("TIN-01", 1)]);
        placed.push(common::place(&url, &request, Some(&format!("k{i}")), None).await);
    }
    let orders_db = env.db("orders").await;
    let counts = common::wait_settled(&orders_db, "outage-", 10).await;
    assert_eq!(counts.paid, 10);
    let notifications_db = env.db("notifications").await;
    assert!(notification::list_sent(&notifications_db)
        .await
        .expect("reads")
        .is_empty());
    let client = env.client().await;
    // Its group holds the emails: ten paid records, none consumed.
    let waiting = common::wait_for("the notification group's backlog", || async {
        let group = client
            .admin()
            .describe_group(notification::GROUP)
            .await
            .ok()?;
        let unconsumed: u64 = group
            .partitions
            .iter()
            .map(|p| p.log_end_offset - p.committed_offset.unwrap_or(0))
            .sum();
        (unconsumed == 10).then_some(unconsumed)
    })
    .await;
    assert_eq!(waiting, 10);

    notifier.stop().await;
    let mut healthy = env.config(common::fast_profile());
    healthy.order = None;
    healthy.inventory = None;
    healthy.payment_workers = None;
    let notifier = common::start(&healthy).await;
    let sent = common::wait_for("ten emails", || async {
        let sent = notification::list_sent(&notifications_db)
            .await
            .expect("reads");
        (sent.len() == 10).then_some(sent)
    })
    .await;
    let traces: HashMap<&str, &str> = placed
        .iter()
        .map(|v| (v.order_id.as_str(), v.trace_id.as_str()))
        .collect();
    for email in &sent {
        assert_eq!(traces[email.order_id.as_str()], email.trace_id);
    }
    notifier.stop().await;
    system.stop().await;
}

/// A record without an envelope and an `order.created` that is not JSON go to
/// `orders.created.dlq` at once; a payment for an order that does not exist fails in the
/// projection, is retried with backoff and then dead-lettered. The dead letters are
/// visible with `strata consume`, and the services go on: the next checkout is PAID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_events_go_to_dead_letter_topics() {
    let env = Env::new(Store::Sqlite)
        .await
        .expect("SQLite is always there");
    let system = common::start(&env.config(common::fast_profile())).await;
    let client = env.client().await;
    let producer = client
        .producer(topics::ORDERS_CREATED)
        .await
        .expect("a producer");
    producer
        .send(Record::new("no headers at all").key("poison-1"))
        .await
        .expect("stored");
    producer
        .send(
            Record::new("{not json")
                .key("poison-2")
                .header(headers::EVENT_ID, "poison-2")
                .header(headers::EVENT_TYPE, types::ORDER_CREATED)
                .header(headers::SCHEMA_VERSION, "2"),
        )
        .await
        .expect("stored");
    let stray = events::PaymentCompleted {
        order_id: "no-such-order".into(),
        payment_id: "p".into(),
        customer_id: "nobody".into(),
        amount_cents: 1,
        seq: events::seq::PAYMENT,
        occurred_at_ms: 0,
    };
    client
        .producer(topics::PAYMENTS_COMPLETED)
        .await
        .expect("a producer")
        .send(
            Record::new(serde_json::to_string(&stray).expect("encodes"))
                .key("no-such-order")
                .header(headers::EVENT_ID, "stray-1")
                .header(headers::EVENT_TYPE, types::PAYMENT_COMPLETED)
                .header(headers::SCHEMA_VERSION, "1"),
        )
        .await
        .expect("stored");

    let letters = common::wait_for("three dead letters", || async {
        let letters = checkout::dead_letters::list(&client).await.ok()?;
        (letters.len() == 3).then_some(letters)
    })
    .await;
    let stray_letter = letters
        .iter()
        .find(|l| l.topic == "payments.completed.dlq")
        .expect("the stray payment is dead-lettered");
    assert!(
        stray_letter.error.contains("no-such-order"),
        "{stray_letter:?}"
    );
    assert_eq!(stray_letter.attempts, "3");
    let poison: Vec<_> = letters
        .iter()
        .filter(|l| l.topic == "orders.created.dlq")
        .collect();
    assert_eq!(poison.len(), 2);
    assert!(poison
        .iter()
        .any(|l| l.error.contains("no event-id header")));
    assert!(poison.iter().any(|l| l.error.contains("does not decode")));
    assert!(poison.iter().all(|l| l.attempts == "0"));

    let strata = common::strata().expect("the strata binary");
    let output = std::process::Command::new(strata)
        .args([
            "consume",
            "orders.created.dlq",
            "--broker",
            &env.broker_addr(),
        ])
        .output()
        .expect("strata consume runs");
    assert!(output.status.success());
    let printed = String::from_utf8_lossy(&output.stdout);
    assert!(printed.contains("no headers at all"), "{printed}");
    assert!(printed.contains("{not json"), "{printed}");

    let url = system.order_url().expect("order runs").to_string();
    let view = common::place(
        &url,
        &CheckoutRequest::new("after-poison", &[("FLT-01", 1)]),
        None,
        None,
    )
    .await;
    let orders_db = env.db("orders").await;
    common::wait_settled(&orders_db, "after-poison", 1).await;
    assert_eq!(
        order::find_order(&orders_db, &view.order_id)
            .await
            .expect("reads")
            .expect("exists")
            .status,
        status::PAID
    );
    system.stop().await;
}

/// The payment service reads `order.created` with the version 1 struct. It charges a
/// version 1 event (an old producer), a version 2 event (what the order service writes)
/// and a later version with a field nobody knows yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_consumer_reads_later_versions() {
    let env = Env::new(Store::Sqlite)
        .await
        .expect("SQLite is always there");
    let mut config = env.config(common::fast_profile());
    config.order = None;
    config.inventory = None;
    config.notification_workers = None;
    let system = common::start(&config).await;
    let client = env.client().await;
    let producer = client
        .producer(topics::ORDERS_CREATED)
        .await
        .expect("a producer");
    let v1 = |id: &str| OrderCreatedV1 {
        order_id: id.into(),
        customer_id: "old".into(),
        lines: vec![events::OrderLine {
            sku: "TEA-02".into(),
            quantity: 1,
            unit_price_cents: 390,
        }],
        total_cents: 390,
        payment_token: "tok_visa".into(),
        seq: events::seq::CREATED,
        created_at_ms: 0,
    };
    let v2 = OrderCreatedV2 {
        v1: v1("order-v2"),
        currency: "EUR".into(),
        discount_cents: 0,
    };
    let mut v3 = serde_json::to_value(&v2).expect("encodes");
    v3["gift_wrap"] = serde_json::json!({ "paper": "red" });
    let payloads = [
        (
            "order-v1",
            1,
            serde_json::to_string(&v1("order-v1")).expect("encodes"),
        ),
        (
            "order-v2",
            versions::ORDER_CREATED,
            serde_json::to_string(&v2).expect("encodes"),
        ),
        ("order-v3", 3, {
            v3["order_id"] = "order-v3".into();
            v3.to_string()
        }),
    ];
    for (id, version, payload) in payloads {
        producer
            .send(
                Record::new(payload)
                    .key(id)
                    .header(headers::EVENT_ID, format!("event-{id}"))
                    .header(headers::EVENT_TYPE, types::ORDER_CREATED)
                    .header(headers::SCHEMA_VERSION, version.to_string()),
            )
            .await
            .expect("stored");
    }
    let payments_db = env.db("payments").await;
    let payments = common::wait_for("three payments", || async {
        let payments = payment::list_payments(&payments_db).await.expect("reads");
        (payments.len() == 3).then_some(payments)
    })
    .await;
    let charged: HashSet<&str> = payments.iter().map(|p| p.order_id.as_str()).collect();
    assert_eq!(charged, HashSet::from(["order-v1", "order-v2", "order-v3"]));
    assert!(payments.iter().all(|p| p.amount_cents == 390));
    system.stop().await;
}

/// Runs futures concurrently and collects their outputs in order.
async fn futures_join_all<F: std::future::Future + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send + 'static,
{
    let tasks: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        out.push(task.await.expect("the task does not panic"));
    }
    out
}
