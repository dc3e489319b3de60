//! The simulated world: how long each service takes, how often it fails, which one is
//! down, which payments are declined — one profile for both designs, so they are
//! compared under the same conditions.
//!
//! Latency model: each call takes `base × m × time_scale`, where `m ≥ 1` is drawn from a
//! Pareto distribution whose 99th percentile is `tail_p99` (default 4: a call is at
//! least its base latency, and one in a hundred takes four times it or more, the tail
//! the story describes) and capped at `tail_p99²`. The bases are the story's figures:
//! auth 50 ms, catalog 80, discount 120, inventory 200, order 100, payment 300,
//! notification 150; `time_scale` shrinks every duration alike (timeouts too) so a run
//! takes seconds. A call fails (a 503, a transient error) with probability
//! `failure_rate`. A service named by `outage` never answers: its calls hang until
//! the caller's timeout.
//!
//! Payment declines are business outcomes, not failures: a payment with the token
//! [`DECLINED_TOKEN`] is always declined, and otherwise an order is declined with
//! probability `decline_rate`, decided by a hash of its id (so a redelivered event gets
//! the same answer).

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use crate::error::{Error, Result};

/// The payment token that is always declined (Stripe's test token of the same name).
pub const DECLINED_TOKEN: &str = "tok_chargeDeclined";

/// The seven services of the story.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, clap::ValueEnum)]
pub enum Service {
    /// Checks the customer.
    Auth,
    /// Prices the items.
    Catalog,
    /// Computes the discount.
    Discount,
    /// Reserves stock.
    Inventory,
    /// Stores the order.
    Order,
    /// Charges the customer.
    Payment,
    /// Sends the confirmation.
    Notification,
}

impl Service {
    /// All seven, in the order the synchronous checkout calls them.
    pub const ALL: [Service; 7] = [
        Service::Auth,
        Service::Catalog,
        Service::Discount,
        Service::Inventory,
        Service::Order,
        Service::Payment,
        Service::Notification,
    ];

    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Service::Auth => "auth",
            Service::Catalog => "catalog",
            Service::Discount => "discount",
            Service::Inventory => "inventory",
            Service::Order => "order",
            Service::Payment => "payment",
            Service::Notification => "notification",
        }
    }

    /// The story's latency of the service, in ms.
    pub fn base_ms(self) -> f64 {
        match self {
            Service::Auth => 50.0,
            Service::Catalog => 80.0,
            Service::Discount => 120.0,
            Service::Inventory => 200.0,
            Service::Order => 100.0,
            Service::Payment => 300.0,
            Service::Notification => 150.0,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The profile's command-line flags, shared by every command that simulates.
#[derive(Debug, Clone, clap::Args)]
pub struct ProfileArgs {
    /// Base latency of a service, e.g. `--latency inventory=20` (ms; repeatable). The
    /// defaults are the story's: auth 50, catalog 80, discount 120, inventory 200,
    /// order 100, payment 300, notification 150.
    #[arg(long = "latency", value_name = "SERVICE=MS", value_parser = parse_latency)]
    pub latency: Vec<(Service, f64)>,
    /// The 99th percentile of each call's latency as a multiple of its base.
    #[arg(long, default_value_t = 4.0)]
    pub tail_p99: f64,
    /// Probability that a call fails with a transient error.
    #[arg(long, default_value_t = 0.01)]
    pub failure_rate: f64,
    /// Probability that a payment is declined.
    #[arg(long, default_value_t = 0.02)]
    pub decline_rate: f64,
    /// Multiplies every simulated duration and timeout [default: 1, and 0.05 for load
    /// and compare].
    #[arg(long)]
    pub time_scale: Option<f64>,
    /// How long one service waits for another before giving up (ms, before scaling).
    #[arg(long, default_value_t = 30_000)]
    pub call_timeout_ms: u64,
    /// The service that is down: it never answers.
    #[arg(long)]
    pub outage: Option<Service>,
    /// Seed of the random draws (latencies, failures, carts), for a reproducible run
    /// [default: from the clock].
    #[arg(long)]
    pub seed: Option<u64>,
}

impl Default for ProfileArgs {
    fn default() -> Self {
        ProfileArgs {
            latency: Vec::new(),
            tail_p99: 4.0,
            failure_rate: 0.01,
            decline_rate: 0.02,
            time_scale: None,
            call_timeout_ms: 30_000,
            outage: None,
            seed: None,
        }
    }
}

impl ProfileArgs {
    /// The profile, with `default_time_scale` unless a scale was given.
    pub fn build(&self, default_time_scale: f64) -> Result<Profile> {
        let mut base_ms = Service::ALL.map(Service::base_ms);
        for (service, ms) in &self.latency {
            base_ms[service.index()] = *ms;
        }
        let time_scale = self.time_scale.unwrap_or(default_time_scale);
        let check = |name: &str, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(Error::Setup(format!("--{name} is out of range")))
            }
        };
        check("tail-p99 (at least 1)", self.tail_p99 >= 1.0)?;
        check(
            "failure-rate (0 to 1)",
            (0.0..=1.0).contains(&self.failure_rate),
        )?;
        check(
            "decline-rate (0 to 1)",
            (0.0..=1.0).contains(&self.decline_rate),
        )?;
        check(
            "time-scale (above 0, at most 100)",
            time_scale > 0.0 && time_scale <= 100.0,
        )?;
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
        });
        Ok(Profile {
            base_ms,
            tail_p99: self.tail_p99,
            failure_rate: self.failure_rate,
            decline_rate: self.decline_rate,
            time_scale,
            call_timeout_ms: self.call_timeout_ms,
            outage: self.outage,
            seed,
            rng: Mutex::new(SplitMix64(seed)),
        })
    }
}

fn parse_latency(s: &str) -> std::result::Result<(Service, f64), String> {
    let (name, ms) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not SERVICE=MS"))?;
    let service = <Service as clap::ValueEnum>::from_str(name, true)?;
    let ms: f64 = ms.parse().map_err(|e| format!("{ms:?}: {e}"))?;
    if !(0.0..=600_000.0).contains(&ms) {
        return Err(format!("{ms} ms is not between 0 and 600000"));
    }
    Ok((service, ms))
}

/// A resolved profile. Shared by the services of a run (`Arc`).
#[derive(Debug)]
pub struct Profile {
    base_ms: [f64; 7],
    tail_p99: f64,
    failure_rate: f64,
    decline_rate: f64,
    time_scale: f64,
    call_timeout_ms: u64,
    outage: Option<Service>,
    seed: u64,
    rng: Mutex<SplitMix64>,
}

impl Default for Profile {
    /// The story's profile at full scale, without failures or declines, seed 0: for
    /// tests that set what they need.
    fn default() -> Self {
        ProfileArgs {
            failure_rate: 0.0,
            decline_rate: 0.0,
            seed: Some(0),
            ..ProfileArgs::default()
        }
        .build(1.0)
        .unwrap_or_else(|_| unreachable!("the defaults are in range"))
    }
}

impl Profile {
    /// The same profile with every base latency, the failure and decline rates and the
    /// outage replaced: for tests and for services run without simulation.
    pub fn with(
        mut self,
        base_ms: f64,
        failure_rate: f64,
        decline_rate: f64,
        outage: Option<Service>,
    ) -> Profile {
        self.base_ms = [base_ms; 7];
        self.failure_rate = failure_rate;
        self.decline_rate = decline_rate;
        self.outage = outage;
        self
    }

    /// One draw of `service`'s latency, scaled.
    pub fn latency(&self, service: Service) -> Duration {
        let u = self.uniform();
        // Pareto with minimum 1 and P(m > tail_p99) = 1 %: alpha = ln 100 / ln tail_p99.
        let m = if self.tail_p99 > 1.0 {
            let alpha = 100f64.ln() / self.tail_p99.ln();
            (1.0 - u)
                .powf(-1.0 / alpha)
                .min(self.tail_p99 * self.tail_p99)
        } else {
            1.0
        };
        self.scaled(self.base_ms[service.index()] * m)
    }

    /// A call to `service`: waits its latency, then fails with probability
    /// `failure_rate`. Never returns if the service is the one down.
    pub async fn call(&self, service: Service) -> Result<()> {
        if self.outage == Some(service) {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(self.latency(service)).await;
        if self.uniform() < self.failure_rate {
            return Err(Error::Unavailable {
                service: service.name(),
                message: "simulated transient failure".into(),
            });
        }
        Ok(())
    }

    /// Why the payment of `order_id` with `payment_token` is declined, or `None`.
    pub fn decline(&self, order_id: &str, payment_token: &str) -> Option<&'static str> {
        if payment_token == DECLINED_TOKEN {
            return Some("card declined");
        }
        let draw = (fnv1a(self.seed, order_id.as_bytes()) >> 11) as f64 / (1u64 << 53) as f64;
        (draw < self.decline_rate).then_some("insufficient funds")
    }

    /// How long one service waits for another, scaled.
    pub fn call_timeout(&self) -> Duration {
        self.scaled(self.call_timeout_ms as f64)
    }

    /// `ms` scaled to a duration.
    pub fn scaled(&self, ms: f64) -> Duration {
        Duration::from_secs_f64((ms * self.time_scale / 1000.0).max(0.0))
    }

    /// The service that is down.
    pub fn outage(&self) -> Option<Service> {
        self.outage
    }

    /// The time scale.
    pub fn time_scale(&self) -> f64 {
        self.time_scale
    }

    /// The seed of the random draws.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// A uniform draw in [0, 1).
    pub fn uniform(&self) -> f64 {
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        (rng.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// One line for reports.
    pub fn describe(&self) -> String {
        let bases: Vec<String> = Service::ALL
            .iter()
            .map(|s| format!("{} {}", s.name(), self.base_ms[s.index()]))
            .collect();
        format!(
            "base ms: {}; tail p99 x{}; failure rate {}; decline rate {}; time scale {}; \
             call timeout {} ms (scaled {:?}); seed {}",
            bases.join(", "),
            self.tail_p99,
            self.failure_rate,
            self.decline_rate,
            self.time_scale,
            self.call_timeout_ms,
            self.call_timeout(),
            self.seed
        )
    }
}

/// SplitMix64: a tiny, good-enough generator for simulated latencies, seeded for
/// reproducibility.
#[derive(Debug)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// FNV-1a over the seed and `bytes`: a stable hash (unlike `DefaultHasher`, which may
/// change between Rust releases).
fn fnv1a(seed: u64, bytes: &[u8]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325_u64;
    for b in seed.to_le_bytes().iter().chain(bytes) {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // FNV's low bits mix poorly; finish with SplitMix64's mixer.
    SplitMix64(hash).next()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(tail_p99: f64) -> Profile {
        ProfileArgs {
            tail_p99,
            seed: Some(7),
            ..ProfileArgs::default()
        }
        .build(1.0)
        .expect("valid")
    }

    #[test]
    fn latencies_have_the_base_as_minimum_and_the_asked_tail() {
        let profile = profile(4.0);
        let mut draws: Vec<Duration> = (0..20_000)
            .map(|_| profile.latency(Service::Inventory))
            .collect();
        draws.sort();
        let base = Duration::from_millis(200);
        assert!(draws[0] >= base);
        let p99 = draws[draws.len() * 99 / 100];
        // A seeded draw: the 99th percentile lies near 4 x base.
        assert!(p99 > base * 3 && p99 < base * 5, "{p99:?}");
        assert!(*draws.last().expect("draws") <= base * 16);
    }

    #[test]
    fn no_tail_means_constant_latency_and_scale_applies() {
        let profile = ProfileArgs {
            tail_p99: 1.0,
            time_scale: Some(0.1),
            ..ProfileArgs::default()
        }
        .build(1.0)
        .expect("valid");
        assert_eq!(profile.latency(Service::Payment), Duration::from_millis(30));
        assert_eq!(profile.call_timeout(), Duration::from_secs(3));
    }

    #[test]
    fn declines_are_decided_by_the_order_id() {
        let profile = ProfileArgs {
            decline_rate: 0.3,
            seed: Some(1),
            ..ProfileArgs::default()
        }
        .build(1.0)
        .expect("valid");
        let declined = (0..10_000)
            .filter(|i| profile.decline(&format!("order-{i}"), "tok_visa").is_some())
            .count();
        assert!((2_500..3_500).contains(&declined), "{declined}");
        for i in 0..100 {
            let id = format!("order-{i}");
            assert_eq!(
                profile.decline(&id, "tok_visa"),
                profile.decline(&id, "tok_visa")
            );
            assert_eq!(profile.decline(&id, DECLINED_TOKEN), Some("card declined"));
        }
    }

    #[test]
    fn flags_parse_and_out_of_range_values_are_refused() {
        assert_eq!(
            parse_latency("inventory=20"),
            Ok((Service::Inventory, 20.0))
        );
        assert!(parse_latency("inventory").is_err());
        assert!(parse_latency("nobody=1").is_err());
        assert!(parse_latency("auth=-1").is_err());
        let bad = ProfileArgs {
            failure_rate: 2.0,
            ..ProfileArgs::default()
        };
        assert!(bad.build(1.0).is_err());
    }

    #[tokio::test]
    async fn a_service_that_is_down_never_answers() {
        let profile = Profile::default().with(1.0, 0.0, 0.0, Some(Service::Notification));
        assert!(profile.call(Service::Payment).await.is_ok());
        // Not a timing assumption: the call is pending forever, whatever the deadline.
        let hung = tokio::time::timeout(
            Duration::from_millis(20),
            profile.call(Service::Notification),
        )
        .await;
        assert!(
            hung.is_err(),
            "the call must hang until the caller gives up"
        );
    }
}
