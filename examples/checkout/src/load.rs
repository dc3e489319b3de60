//! The load generator: the same checkouts against either design, and the numbers that
//! compare them.
//!
//! `checkout load --mode sync|events` starts the design it measures in this process
//! (the seven synchronous services; or the event-driven services over a `strata`
//! broker it starts, unless `--broker` names one, and SQLite files in a temporary
//! directory, unless `--database` names a database), then runs `--checkouts` checkouts
//! from `--concurrency` simulated users. Each checkout is a new customer with a cart of
//! one to three products. A user whose checkout fails or times out (`--client-timeout-ms`,
//! 60 s before scaling) presses F5: tries again, up to `--retries` times. Against the
//! event-driven design the retry carries the same `Idempotency-Key`; the synchronous
//! design has none.
//!
//! It reports, over every HTTP request: latency p50, p99 and max (a failed or timed-out
//! request counts with the time the user waited), the share answered with success, the
//! orders stored beyond one per customer (duplicates), the orders per status, and how
//! long after the last answer every order was PAID or CANCELLED ("never" when some stay
//! PENDING). `checkout compare` runs both designs, healthy and with the notification
//! service down, and prints the table.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strata_spawn::{find_strata, BrokerDir, SpawnedBroker};
use tokio::time::Instant;

use crate::baseline::Baseline;
use crate::catalog::{CheckoutRequest, PRODUCTS};
use crate::db::Db;
use crate::error::{Error, Result};
use crate::http::HttpClient;
use crate::profile::{Profile, ProfileArgs, Service};
use crate::services::order::{self, StatusCounts, IDEMPOTENCY_KEY};
use crate::system::{Databases, System, SystemConfig};
use crate::trace::{TraceContext, TRACEPARENT};

/// The time scale of load runs unless `--time-scale` says otherwise: the story's
/// latencies divided by 20, so a run takes seconds.
pub const DEFAULT_TIME_SCALE: f64 = 0.05;
/// How often the end of a run checks whether every order has settled.
const SETTLE_POLL: Duration = Duration::from_millis(20);

/// Which design a run measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Seven synchronous HTTP calls per checkout.
    Sync,
    /// Reserve, store, answer; the rest through Strata.
    Events,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Sync => "sync",
            Mode::Events => "events",
        }
    }
}

/// Settings of a run, shared by `checkout load` and `checkout compare`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Checkouts to make (each by a new customer).
    #[arg(long, default_value_t = 500)]
    pub checkouts: usize,
    /// Users checking out at the same time.
    #[arg(long, default_value_t = 50)]
    pub concurrency: usize,
    /// Start checkouts at this rate (per second, not scaled) instead of each user's
    /// next one as soon as the last answered: both designs then get the same offered
    /// load. A checkout that starts late because every user is busy counts the wait in
    /// its latency. 0: as fast as the users go.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// How often a user retries a failed checkout (F5).
    #[arg(long, default_value_t = 1)]
    pub retries: u32,
    /// How long a user waits for an answer (ms, before scaling).
    #[arg(long, default_value_t = 60_000)]
    pub client_timeout_ms: u64,
    /// How long to wait, after the last answer, for every order to be PAID or
    /// CANCELLED (seconds, not scaled).
    #[arg(long, default_value_t = 60)]
    pub settle_timeout_s: u64,
    /// Events mode: a running broker (`host:port`) instead of starting one.
    #[arg(long)]
    pub broker: Option<String>,
    /// Events mode: a database for every service (`postgres://...` or `sqlite://...`)
    /// instead of SQLite files in a temporary directory.
    #[arg(long)]
    pub database: Option<String>,
    /// Events mode: the `strata` binary to start.
    #[arg(long, env = "CHECKOUT_STRATA_BIN")]
    pub strata_bin: Option<PathBuf>,
    /// Events mode: partitions of the topics, and payment workers.
    #[arg(long, default_value_t = crate::system::DEFAULT_PARTITIONS)]
    pub partitions: u32,
    /// The simulated world.
    #[command(flatten)]
    pub profile: ProfileArgs,
}

/// What a run measured.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// The design.
    pub mode: Mode,
    /// The service that was down.
    pub outage: Option<Service>,
    /// Checkouts made.
    pub checkouts: usize,
    /// Users at once.
    pub concurrency: usize,
    /// HTTP requests sent (checkouts and retries).
    pub requests: usize,
    /// Requests answered with a 2xx.
    pub succeeded: usize,
    /// Checkouts that never succeeded, retries included.
    pub abandoned: usize,
    /// Failed requests by cause.
    pub failures: BTreeMap<String, usize>,
    /// Median request latency.
    pub p50: Duration,
    /// 99th percentile request latency.
    pub p99: Duration,
    /// Slowest request.
    pub max: Duration,
    /// Orders stored, per status, at the end.
    pub orders: StatusCounts,
    /// Orders beyond one per checkout.
    pub duplicates: usize,
    /// From the start to the last answer.
    pub answered_after: Duration,
    /// From the start until no order was PENDING; `None` if some never left PENDING.
    pub settled_after: Option<Duration>,
    /// The time scale of every simulated duration.
    pub time_scale: f64,
    /// The seed of the random draws.
    pub seed: u64,
}

/// One measured request.
#[derive(Debug, Clone)]
struct Attempt {
    latency: Duration,
    /// `None`: success; else the cause.
    failure: Option<String>,
}

/// Runs `mode` with `outage` (overriding `--outage`).
pub async fn run(mode: Mode, args: &RunArgs, outage: Option<Service>) -> Result<LoadReport> {
    if args.checkouts == 0 || args.concurrency == 0 || !args.rate.is_finite() || args.rate < 0.0 {
        return Err(Error::Setup(
            "--checkouts and --concurrency must be at least 1, --rate 0 or more".into(),
        ));
    }
    let mut profile_args = args.profile.clone();
    profile_args.outage = outage;
    let profile = Arc::new(profile_args.build(DEFAULT_TIME_SCALE)?);
    let customers = format!("load-{}-", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let measured = match mode {
        Mode::Sync => run_sync(args, &profile, &customers).await?,
        Mode::Events => run_events(args, &profile, &customers).await?,
    };
    Ok(report(mode, args, &profile, measured))
}

/// What a run measured, before it is summed up.
struct Measured {
    /// Every request's outcome, grouped by checkout.
    attempts: Vec<Vec<Attempt>>,
    orders: StatusCounts,
    duplicates: usize,
    answered_after: Duration,
    settled_after: Option<Duration>,
}

async fn run_sync(args: &RunArgs, profile: &Arc<Profile>, customers: &str) -> Result<Measured> {
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let baseline = Baseline::start(Arc::clone(profile), listen).await?;
    let url = format!("{}/checkout", baseline.url());
    let started = Instant::now();
    let attempts = drive(Mode::Sync, args, profile, &url, customers).await;
    let answered_after = started.elapsed();
    let orders = baseline.count_by_status(customers);
    let duplicates = baseline.duplicate_orders(customers);
    baseline.stop().await;
    Ok(Measured {
        attempts,
        orders,
        duplicates,
        answered_after,
        // Statuses are final when the chain answers, or never.
        settled_after: (orders.pending == 0).then_some(answered_after),
    })
}

async fn run_events(args: &RunArgs, profile: &Arc<Profile>, customers: &str) -> Result<Measured> {
    let outage = profile.outage();
    if let Some(service @ (Service::Auth | Service::Catalog | Service::Discount | Service::Order)) =
        outage
    {
        return Err(Error::Setup(format!(
            "--outage {service}: in the event-driven checkout {service} is not a separate \
             service (the order service validates in-process and is the entry point); \
             choose inventory, payment or notification"
        )));
    }
    let spawned = match &args.broker {
        Some(_) => None,
        None => {
            let binary = find_strata(args.strata_bin.as_deref(), Some("checkout"))?;
            let broker = tokio::task::spawn_blocking(move || {
                SpawnedBroker::start(&binary, BrokerDir::Temporary(None))
            })
            .await
            .map_err(|e| Error::Setup(format!("starting the broker panicked: {e}")))??;
            Some(broker)
        }
    };
    let broker = match (&args.broker, &spawned) {
        (Some(address), _) => address.clone(),
        (None, Some(spawned)) => spawned.address().to_string(),
        (None, None) => unreachable!("a broker was started when none was given"),
    };
    let temp = tempfile::Builder::new()
        .prefix("checkout-load-")
        .tempdir()
        .map_err(Error::io("create a temporary directory"))?;
    let databases = match &args.database {
        Some(url) => Databases::Url(url.clone()),
        None => Databases::Dir(temp.path().to_path_buf()),
    };
    let mut config = SystemConfig::all(&broker, databases.clone(), Arc::clone(profile));
    config.partitions = args.partitions;
    config.payment_workers = (outage != Some(Service::Payment)).then_some(args.partitions as usize);
    config.notification_workers = (outage != Some(Service::Notification)).then_some(2);
    let system = System::start(&config).await?;
    let url = format!(
        "{}/checkout",
        system
            .order_url()
            .ok_or_else(|| Error::Setup("the order service did not start".into()))?
    );
    let orders_db = Db::connect(&databases.url("orders")).await?;
    let started = Instant::now();
    let attempts = drive(Mode::Events, args, profile, &url, customers).await;
    let answered_after = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(args.settle_timeout_s);
    let (orders, settled_after) = loop {
        let orders = order::count_by_status(&orders_db, customers).await?;
        if orders.pending == 0 {
            break (orders, Some(started.elapsed()));
        }
        if Instant::now() >= deadline {
            break (orders, None);
        }
        tokio::time::sleep(SETTLE_POLL).await;
    };
    let duplicates = order::duplicate_orders(&orders_db, customers).await?;
    orders_db.close().await;
    system.stop().await;
    drop(spawned);
    Ok(Measured {
        attempts,
        orders,
        duplicates,
        answered_after,
        settled_after,
    })
}

/// Runs the checkouts against `url` and returns every request's outcome, grouped by
/// checkout.
async fn drive(
    mode: Mode,
    args: &RunArgs,
    profile: &Arc<Profile>,
    url: &str,
    customers: &str,
) -> Vec<Vec<Attempt>> {
    let http = HttpClient::new();
    let next = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Vec::with_capacity(args.checkouts)));
    let timeout = profile.scaled(args.client_timeout_ms as f64);
    let started = Instant::now();
    let interval = (args.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / args.rate));
    let mut users = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency.min(args.checkouts) {
        let (http, next, results, profile) = (
            http.clone(),
            Arc::clone(&next),
            Arc::clone(&results),
            Arc::clone(profile),
        );
        let (url, customers, checkouts, retries) = (
            url.to_string(),
            customers.to_string(),
            args.checkouts,
            args.retries,
        );
        users.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= checkouts {
                    return;
                }
                let request = cart(&profile, format!("{customers}{i}"));
                let scheduled = interval.map(|interval| started + interval * i as u32);
                if let Some(at) = scheduled {
                    tokio::time::sleep_until(at).await;
                }
                let attempts =
                    checkout(&http, &url, mode, &request, retries, timeout, scheduled).await;
                results
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(attempts);
            }
        }));
    }
    for user in users {
        if let Err(e) = user.await {
            tracing::warn!(error = %e, "a load task panicked");
        }
    }
    let mut results = results.lock().unwrap_or_else(|e| e.into_inner());
    std::mem::take(&mut *results)
}

/// A cart of one to three distinct products, one to three of each.
fn cart(profile: &Profile, customer_id: String) -> CheckoutRequest {
    let lines = 1 + (profile.uniform() * 3.0) as usize;
    let first = (profile.uniform() * PRODUCTS.len() as f64) as usize;
    let items: Vec<(&str, i64)> = (0..lines)
        .map(|k| {
            let product = &PRODUCTS[(first + k) % PRODUCTS.len()];
            (product.sku, 1 + (profile.uniform() * 3.0) as i64)
        })
        .collect();
    CheckoutRequest::new(customer_id, &items)
}

/// One user's checkout: the first try and the F5s. The first try's latency counts from
/// `scheduled`, when there is a schedule.
async fn checkout(
    http: &HttpClient,
    url: &str,
    mode: Mode,
    request: &CheckoutRequest,
    retries: u32,
    timeout: Duration,
    scheduled: Option<Instant>,
) -> Vec<Attempt> {
    let key = uuid::Uuid::new_v4().to_string();
    let traceparent = TraceContext::new_root().to_string();
    let mut headers = vec![(TRACEPARENT, traceparent.as_str())];
    if mode == Mode::Events {
        headers.push((IDEMPOTENCY_KEY, key.as_str()));
    }
    let mut attempts = Vec::new();
    for attempt in 0..=retries {
        let started = match scheduled {
            Some(at) if attempt == 0 => at,
            _ => Instant::now(),
        };
        let outcome = http
            .post_json("checkout", url, &headers, request, timeout)
            .await;
        let latency = started.elapsed();
        let failure = match outcome {
            Ok(response) if response.status.is_success() => None,
            Ok(response) => Some(format!(
                "HTTP {}: {}",
                response.status.as_u16(),
                failure_cause(&response.error_message())
            )),
            Err(Error::Timeout { .. }) => Some("user gave up (client timeout)".into()),
            Err(e) => Some(failure_cause(&e.to_string())),
        };
        let done = failure.is_none();
        attempts.push(Attempt { latency, failure });
        if done {
            break;
        }
    }
    attempts
}

/// The kind of a failure, without the ids and numbers that make every message unique.
fn failure_cause(message: &str) -> String {
    let cause: String = message
        .split(|c: char| c.is_ascii_digit())
        .next()
        .unwrap_or(message)
        .trim_end_matches([' ', '(', ':'])
        .to_string();
    if cause.is_empty() {
        message.to_string()
    } else {
        cause
    }
}

fn report(mode: Mode, args: &RunArgs, profile: &Profile, measured: Measured) -> LoadReport {
    let mut latencies = Vec::new();
    let mut failures = BTreeMap::new();
    let mut abandoned = 0;
    for attempts in &measured.attempts {
        if attempts.iter().all(|a| a.failure.is_some()) {
            abandoned += 1;
        }
        for attempt in attempts {
            latencies.push(attempt.latency);
            if let Some(cause) = &attempt.failure {
                *failures.entry(cause.clone()).or_insert(0) += 1;
            }
        }
    }
    latencies.sort();
    let failed: usize = failures.values().sum();
    LoadReport {
        mode,
        outage: profile.outage(),
        checkouts: measured.attempts.len(),
        concurrency: args.concurrency,
        requests: latencies.len(),
        succeeded: latencies.len() - failed,
        abandoned,
        failures,
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        max: latencies.last().copied().unwrap_or_default(),
        orders: measured.orders,
        duplicates: measured.duplicates,
        answered_after: measured.answered_after,
        settled_after: measured.settled_after,
        time_scale: profile.time_scale(),
        seed: profile.seed(),
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

impl LoadReport {
    /// Requests answered with success, in percent.
    pub fn success_percent(&self) -> f64 {
        if self.requests == 0 {
            return 0.0;
        }
        100.0 * self.succeeded as f64 / self.requests as f64
    }

    fn outage_label(&self) -> String {
        self.outage
            .map_or_else(|| "none".to_string(), |s| format!("{s} down"))
    }

    /// How long after the last answer every order was PAID or CANCELLED.
    fn settled_label(&self) -> String {
        match self.settled_after {
            Some(d) => format!(
                "{:.2} s",
                d.saturating_sub(self.answered_after).as_secs_f64()
            ),
            None => format!("never ({} PENDING)", self.orders.pending),
        }
    }

    /// The report for people.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} checkout, outage: {}, {} checkouts by {} users (time scale {}, seed {})",
            self.mode.name(),
            self.outage_label(),
            self.checkouts,
            self.concurrency,
            self.time_scale,
            self.seed
        );
        let _ = writeln!(
            out,
            "  requests:   {} ({} retries), {:.2} % answered with success; {} checkouts abandoned",
            self.requests,
            self.requests - self.checkouts,
            self.success_percent(),
            self.abandoned
        );
        let _ = writeln!(
            out,
            "  latency:    p50 {} ms, p99 {} ms, max {} ms",
            ms(self.p50),
            ms(self.p99),
            ms(self.max)
        );
        let _ = writeln!(
            out,
            "  orders:     {} ({} PAID, {} CANCELLED, {} PENDING), {} duplicates",
            self.orders.total(),
            self.orders.paid,
            self.orders.cancelled,
            self.orders.pending,
            self.duplicates
        );
        let settled = match self.settled_after {
            Some(_) => format!(
                "every order PAID or CANCELLED {} after it",
                self.settled_label()
            ),
            None => format!("{} orders never left PENDING", self.orders.pending),
        };
        let _ = writeln!(
            out,
            "  time:       last answer {:.2} s after the start; {settled}",
            self.answered_after.as_secs_f64(),
        );
        for (cause, n) in &self.failures {
            let _ = writeln!(out, "  failed:     {n} x {cause}");
        }
        out
    }

    /// The header of [`markdown_row`](LoadReport::markdown_row)'s table.
    pub fn markdown_header() -> &'static str {
        "| design | outage | checkouts | requests | success | p50 ms | p99 ms | max ms | \
         duplicate orders | PAID / CANCELLED / PENDING | settled after the last answer |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"
    }

    /// One table row.
    pub fn markdown_row(&self) -> String {
        format!(
            "| {} | {} | {} | {} | {:.2} % | {} | {} | {} | {} | {} / {} / {} | {} |",
            self.mode.name(),
            self.outage_label(),
            self.checkouts,
            self.requests,
            self.success_percent(),
            ms(self.p50),
            ms(self.p99),
            ms(self.max),
            self.duplicates,
            self.orders.paid,
            self.orders.cancelled,
            self.orders.pending,
            self.settled_label()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let values: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&values, 0.5), Duration::from_millis(50));
        assert_eq!(percentile(&values, 0.99), Duration::from_millis(99));
        assert_eq!(percentile(&values[..1], 0.99), Duration::from_millis(1));
        assert_eq!(percentile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn failure_causes_drop_what_varies() {
        assert_eq!(
            failure_cause("notification did not answer within 1500 ms"),
            "notification did not answer within"
        );
        assert_eq!(failure_cause("42"), "42");
    }

    #[test]
    fn carts_are_valid_checkouts() {
        let profile = Profile::default();
        for i in 0..200 {
            let request = cart(&profile, format!("load-x-{i}"));
            crate::catalog::validate(&request).expect("a valid cart");
        }
    }
}
