//! The transport floor: round trips of the cheapest call a target answers, measured on
//! its own connection before the traffic starts, so a run's latency can be read against
//! what one call costs on this machine with no work behind it.
//!
//! Strata's cheapest call is the gRPC health check (`grpc.health.v1.Health/Check`): the
//! same client, HTTP/2 connection and server stack as a Produce, with no topic, storage
//! or writer behind it. Redis's is `PING`. The calls go one at a time, one per
//! [`INTERVAL`], so each is a lone round trip on a quiet connection, not one queued
//! behind another.

use std::future::Future;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::Result;
use crate::stats::{latency_histogram, Percentiles};

/// Time between the starts of two calls (when a call takes longer, the next one starts
/// when it ends).
pub const INTERVAL: Duration = Duration::from_millis(1);

/// What the floor measured.
#[derive(Debug, Clone, Serialize)]
pub struct Floor {
    /// The call, as the target names it.
    pub call: String,
    /// Time between the starts of two calls, in microseconds.
    pub interval_us: u64,
    /// Round trips, from the call to its answer.
    pub latency: Percentiles,
}

/// Makes `calls` calls of `call` (named `name`), one per [`INTERVAL`], after one that
/// warms the connection up and is not counted. The first failure ends the measurement.
pub async fn measure<F, Fut>(name: &str, calls: u32, mut call: F) -> Result<Option<Floor>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<()>>,
{
    if calls == 0 {
        return Ok(None);
    }
    call().await?;
    let mut histogram = latency_histogram();
    let mut ticks = tokio::time::interval(INTERVAL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for _ in 0..calls {
        ticks.tick().await;
        let started = Instant::now();
        call().await?;
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        histogram.saturating_record(ns.max(1));
    }
    Ok(Percentiles::of(&histogram).map(|latency| Floor {
        call: name.to_string(),
        interval_us: INTERVAL.as_micros() as u64,
        latency,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_every_call_but_the_warm_up_and_stops_at_a_failure() {
        let mut made = 0u32;
        let floor = measure("nothing", 5, || {
            made += 1;
            async { Ok(()) }
        })
        .await
        .expect("no failure")
        .expect("measured");
        assert_eq!((made, floor.latency.samples), (6, 5));
        assert_eq!(floor.call, "nothing");

        assert!(measure("none", 0, || async { Ok(()) })
            .await
            .expect("no calls, no failure")
            .is_none());

        let mut made = 0u32;
        let failed = measure("fails", 5, || {
            made += 1;
            let fail = made == 3;
            async move {
                if fail {
                    Err(crate::error::Error::Broker("refused".into()))
                } else {
                    Ok(())
                }
            }
        })
        .await;
        assert!(failed.is_err());
        assert_eq!(made, 3, "no call after the failure");
    }
}
