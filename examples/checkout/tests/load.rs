//! The load generator against both designs, small and fast, with the notification
//! service down. What is asserted holds by construction, not by timing: a synchronous
//! checkout whose notification call hangs can only fail (and a retry can only store a
//! second order), while the event-driven checkout never calls notification at all.

use checkout::load::{self, Mode, RunArgs};
use checkout::profile::{ProfileArgs, Service};

/// A tiny run: every simulated call 0.5 to 3 ms (the story's figures times 0.01), no
/// random failures or declines; a call times out after 3 s, a user after 6 s.
fn args(checkouts: usize) -> RunArgs {
    RunArgs {
        checkouts,
        concurrency: checkouts.min(6),
        rate: 0.0,
        retries: 1,
        client_timeout_ms: 600_000,
        settle_timeout_s: 90,
        broker: None,
        database: None,
        strata_bin: None,
        partitions: 2,
        profile: ProfileArgs {
            tail_p99: 1.0,
            failure_rate: 0.0,
            decline_rate: 0.0,
            time_scale: Some(0.01),
            call_timeout_ms: 300_000,
            seed: Some(3),
            ..ProfileArgs::default()
        },
    }
}

/// With notification down, every synchronous checkout waits for the call timeout and
/// fails after payment: the user's retry stores and charges a second order. The
/// healthy chain answers every checkout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_synchronous_checkout_fails_and_duplicates_while_notification_is_down() {
    let down = load::run(Mode::Sync, &args(6), Some(Service::Notification))
        .await
        .expect("the run completes");
    assert_eq!(down.requests, 12, "each checkout tried twice");
    assert_eq!(down.succeeded, 0);
    assert_eq!(down.abandoned, 6);
    assert_eq!(down.orders.paid, 12, "both tries charged");
    assert_eq!(down.duplicates, 6);
    assert!(
        down.failures.keys().all(|k| k.contains("notification")),
        "{:?}",
        down.failures
    );

    let healthy = load::run(Mode::Sync, &args(6), None)
        .await
        .expect("the run completes");
    assert_eq!((healthy.requests, healthy.succeeded), (6, 6));
    assert_eq!((healthy.orders.paid, healthy.duplicates), (6, 0));
    assert!(healthy.settled_after.is_some());
}

/// The event-driven checkout, with its own broker and databases, healthy and with the
/// notification service not running: every checkout succeeds at the first try, no
/// order is duplicated, and every order is PAID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_driven_checkout_does_not_depend_on_notification() {
    for outage in [None, Some(Service::Notification)] {
        let report = load::run(Mode::Events, &args(20), outage)
            .await
            .expect("the run completes");
        assert_eq!((report.requests, report.succeeded), (20, 20), "{outage:?}");
        assert_eq!(report.duplicates, 0);
        assert_eq!(report.orders.paid, 20);
        assert!(report.settled_after.is_some());
        let row = report.markdown_row();
        assert!(row.starts_with("| events |"), "{row}");
    }
}

/// Outages the event-driven design has no place for are refused with a reason.
#[tokio::test]
async fn an_outage_of_an_in_process_step_is_refused() {
    let error = load::run(Mode::Events, &args(1), Some(Service::Discount))
        .await
        .expect_err("refused");
    assert!(
        error.to_string().contains("not a separate service"),
        "{error}"
    );
}
