//! Crash tests with real processes, on SQLite and (when it answers on 127.0.0.1:5432)
//! PostgreSQL: the payment service SIGKILLed in the middle of the stream charges no
//! order twice and loses none; the order service aborted right after its checkout
//! transaction committed, or right after its relay published, gets its event out after
//! a restart, and the order is charged once.

#[allow(dead_code, reason = "shared by the test files, each using part of it")]
#[macro_use]
mod common;

use std::collections::HashMap;

use checkout::catalog::CheckoutRequest;
use checkout::db::Db;
use checkout::events::topics;
use checkout::services::order::{self, order_id_for_key, status};
use checkout::services::payment;
use checkout::system::System;
use common::Env;

on_both_stores!(
    killing_the_payment_service_mid_stream_charges_each_order_once,
    a_crash_after_the_checkout_commit_still_publishes_the_order,
    a_crash_after_publishing_publishes_again_and_charges_once,
);

/// Thirty orders wait for payment. A payment process (two group members) charges ten,
/// then hangs in the middle of its next charge, holding records it fetched but did not
/// commit; it is SIGKILLed there. A second process takes over: every order ends PAID or
/// CANCELLED, with exactly one payment each.
async fn killing_the_payment_service_mid_stream_charges_each_order_once(env: Env) {
    let mut config = env.config(common::fast_profile());
    config.payment_workers = None;
    let system = common::start(&config).await;
    let url = system.order_url().expect("order runs").to_string();
    for i in 0..30 {
        let request = CheckoutRequest::new(format!("kill-{i}"), &[("SCL-01", 1)]);
        common::place(&url, &request, None, None).await;
    }
    let payment_args = [
        "payment",
        "--workers",
        "2",
        "--latency",
        "payment=1",
        "--failure-rate",
        "0",
        "--decline-rate",
        "0.2",
        "--seed",
        "7",
    ];
    let mut first = env.spawn_checkout(
        "payments",
        &[&payment_args[..], &["--stall-after", "10"]].concat(),
    );
    let payments_db = env.db("payments").await;
    common::wait_for("ten charges", || async {
        let n = payment::list_payments(&payments_db).await.ok()?.len();
        (n >= 10).then_some(())
    })
    .await;
    first.kill();

    let _second = env.spawn_checkout("payments", &payment_args);
    let orders_db = env.db("orders").await;
    let counts = common::wait_settled(&orders_db, "kill-", 30).await;
    assert_eq!(counts.paid + counts.cancelled, 30);
    let payments = payment::list_payments(&payments_db).await.expect("reads");
    let mut per_order: HashMap<&str, usize> = HashMap::new();
    for p in &payments {
        *per_order.entry(p.order_id.as_str()).or_default() += 1;
    }
    assert_eq!(per_order.len(), 30, "every order is charged");
    assert!(
        per_order.values().all(|n| *n == 1),
        "no order is charged twice: {per_order:?}"
    );
    system.stop().await;
}

/// The order service aborts right after the checkout's transaction commits, before it
/// answers and before its relay sees the row: the client gets no answer, the order is
/// stored PENDING with its event unsent, and nothing is on `orders.created`. Restarted,
/// the relay publishes it, payment charges it once, and the client's retry with the
/// same key gets that order.
async fn a_crash_after_the_checkout_commit_still_publishes_the_order(env: Env) {
    let (system, order_args) = all_but_order(&env).await;
    let order_args: Vec<&str> = order_args.iter().map(String::as_str).collect();
    let mut crashing = env.spawn_checkout(
        "orders",
        &[&order_args[..], &["--crash-at", "after-commit"]].concat(),
    );
    let url = crashing.url.clone().expect("the order service listens");
    let request = CheckoutRequest::new("crash-commit", &[("MUG-01", 2)]);
    let answer = common::post_checkout(&url, &request, Some("k"), None).await;
    assert!(answer.is_err(), "the process died before answering");
    assert!(crashing.wait_for_crash().await, "aborted, not exited");

    let order_id = order_id_for_key("crash-commit", "k");
    let orders_db = env.db("orders").await;
    let stored = order::find_order(&orders_db, &order_id)
        .await
        .expect("reads")
        .expect("the order was committed");
    assert_eq!(stored.status, status::PENDING);
    assert_eq!(unsent(&orders_db).await, 1);
    let client = env.client().await;
    assert!(common::read_topic(&client, topics::ORDERS_CREATED)
        .await
        .is_empty());

    let restarted = env.spawn_checkout("orders", &order_args);
    common::wait_settled(&orders_db, "crash-commit", 1).await;
    assert_eq!(unsent(&orders_db).await, 0);
    let created = common::read_topic(&client, topics::ORDERS_CREATED).await;
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].record.key.as_deref(), Some(order_id.as_bytes()));
    let payments = payment::list_payments(&env.db("payments").await)
        .await
        .expect("reads");
    assert_eq!(payments.len(), 1);
    let retry = common::post_checkout(
        restarted.url.as_deref().expect("listens"),
        &request,
        Some("k"),
        None,
    )
    .await
    .expect("answers");
    assert_eq!(retry.status.as_u16(), 200);
    assert_eq!(
        retry.json::<order::OrderView>().expect("an order").order_id,
        order_id
    );
    system.stop().await;
}

/// The order service's relay aborts right after the broker acknowledged the event,
/// before marking the row sent. Restarted, it publishes the row again: the topic holds
/// the event twice, with one event id, and payment charges the order once.
async fn a_crash_after_publishing_publishes_again_and_charges_once(env: Env) {
    let (system, order_args) = all_but_order(&env).await;
    let order_args: Vec<&str> = order_args.iter().map(String::as_str).collect();
    let mut crashing = env.spawn_checkout(
        "orders",
        &[&order_args[..], &["--crash-at", "after-publish"]].concat(),
    );
    let url = crashing.url.clone().expect("the order service listens");
    let request = CheckoutRequest::new("crash-publish", &[("TEA-02", 1)]);
    // The answer races the relay's abort; either way the order is committed.
    let _ = common::post_checkout(&url, &request, Some("k"), None).await;
    assert!(crashing.wait_for_crash().await, "aborted, not exited");
    let orders_db = env.db("orders").await;
    assert_eq!(unsent(&orders_db).await, 1);
    let client = env.client().await;
    assert_eq!(
        common::read_topic(&client, topics::ORDERS_CREATED)
            .await
            .len(),
        1
    );

    let _restarted = env.spawn_checkout("orders", &order_args);
    common::wait_for("the row to be marked sent", || async {
        (unsent(&orders_db).await == 0).then_some(())
    })
    .await;
    let created = common::read_topic(&client, topics::ORDERS_CREATED).await;
    assert_eq!(created.len(), 2, "published again after the crash");
    assert_eq!(created[0].id, created[1].id, "with the same event id");
    common::wait_settled(&orders_db, "crash-publish", 1).await;
    let payments_db = env.db("payments").await;
    // Both copies are processed before the group's position passes the second.
    common::wait_for("the payment group to pass both copies", || async {
        let group = client.admin().describe_group(payment::GROUP).await.ok()?;
        let committed: u64 = group
            .partitions
            .iter()
            .filter_map(|p| p.committed_offset)
            .sum();
        (committed == 2).then_some(())
    })
    .await;
    let payments = payment::list_payments(&payments_db).await.expect("reads");
    assert_eq!(payments.len(), 1, "charged once");
    system.stop().await;
}

/// Every service but order, in this process; and the arguments of a `checkout order`
/// process that completes them.
async fn all_but_order(env: &Env) -> (System, Vec<String>) {
    let mut config = env.config(common::fast_profile());
    config.order = None;
    let system = common::start(&config).await;
    let inventory = system.inventory_url().expect("inventory runs").to_string();
    let args = [
        "order",
        "--listen",
        "127.0.0.1:0",
        "--inventory-url",
        &inventory,
    ];
    (system, args.map(str::to_string).to_vec())
}

async fn unsent(db: &Db) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM order_outbox WHERE sent_at_ms IS NULL")
        .fetch_one(db.pool())
        .await
        .expect("counts")
}
