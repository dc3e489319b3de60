//! `strata top`: a live view of a broker, redrawn every interval from its `/metrics`:
//! per-topic rates, per-group lag, latencies over the last interval, and the process.
//!
//! Rates and latency percentiles compare two scrapes: counters by difference, latency
//! by the difference of histogram buckets, read the way Prometheus's
//! `histogram_quantile` reads them (linear within a bucket).

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::Context;
use prometheus_parse::{Sample, Value};

/// `strata top` options.
#[derive(Debug, Clone, clap::Args)]
pub struct TopArgs {
    /// The broker's HTTP address (`host:port`) [default: the broker's host, the port
    /// after the gRPC one].
    #[arg(long)]
    pub http: Option<String>,
    /// Seconds between refreshes.
    #[arg(long, default_value_t = 2.0)]
    pub interval: f64,
    /// Print one view (over one interval) and exit, instead of refreshing.
    #[arg(long)]
    pub once: bool,
}

/// The HTTP address next to a gRPC `host:port` (or `http://host:port`).
fn http_next_to(broker: &str) -> anyhow::Result<String> {
    let address = broker
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    let (host, port) = address
        .rsplit_once(':')
        .with_context(|| format!("cannot tell the port of {broker:?}; give --http"))?;
    let port: u16 = port
        .trim_end_matches('/')
        .parse()
        .with_context(|| format!("cannot tell the port of {broker:?}; give --http"))?;
    let next = port
        .checked_add(1)
        .with_context(|| format!("no port after {port}; give --http"))?;
    Ok(format!("{host}:{next}"))
}

/// Runs `strata top` against the broker at `broker`.
pub async fn top(broker: &str, args: TopArgs) -> anyhow::Result<()> {
    let http = match args.http {
        Some(http) => http,
        None => http_next_to(broker)?,
    };
    if !(args.interval > 0.0 && args.interval.is_finite()) {
        anyhow::bail!("--interval must be a positive number of seconds");
    }
    let interval = Duration::from_secs_f64(args.interval);
    let terminal = std::io::stdout().is_terminal() && !args.once;
    // Ctrl-C quits at any point, also while a scrape is in flight.
    let quit = tokio::signal::ctrl_c();
    tokio::pin!(quit);
    let mut previous = tokio::select! {
        snapshot = Snapshot::take(&http) => snapshot?,
        _ = &mut quit => return Ok(()),
    };
    loop {
        let current = tokio::select! {
            snapshot = async {
                tokio::time::sleep(interval).await;
                Snapshot::take(&http).await
            } => snapshot?,
            _ = &mut quit => return Ok(()),
        };
        let view = render(&http, &previous, &current);
        let mut out = std::io::stdout().lock();
        if terminal {
            // Clear the screen and go home, then draw.
            write!(out, "\x1b[2J\x1b[H")?;
        }
        write!(out, "{view}")?;
        out.flush()?;
        if args.once {
            return Ok(());
        }
        previous = current;
    }
}

/// One scrape, and the readiness answer next to it.
struct Snapshot {
    at: Instant,
    samples: Vec<Sample>,
    ready: String,
}

impl Snapshot {
    async fn take(http: &str) -> anyhow::Result<Snapshot> {
        let (status, text) = get(http, "/metrics").await?;
        if status != 200 {
            anyhow::bail!("{http}/metrics answered {status}: {}", text.trim());
        }
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines)
            .with_context(|| format!("cannot parse the metrics of {http}"))?;
        let (_, ready) = get(http, "/readyz").await?;
        Ok(Snapshot {
            at: Instant::now(),
            samples: scrape.samples,
            ready: ready.trim().to_string(),
        })
    }

    /// The sum of the samples called `name` per value of `label` (all under "" when
    /// `label` is empty).
    fn by(&self, name: &str, label: &str) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for s in self.samples.iter().filter(|s| s.metric == name) {
            let key = s.labels.get(label).unwrap_or_default().to_string();
            *out.entry(key).or_insert(0.0) += scalar(&s.value);
        }
        out
    }

    fn value(&self, name: &str) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| scalar(&s.value))
    }

    /// Cumulative bucket counts of histogram `name` (summed over series matching
    /// `label` = `value` when given), by upper bound.
    fn buckets(&self, name: &str, filter: Option<(&str, &str)>) -> Vec<(f64, f64)> {
        let mut sums: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
        for s in self.samples.iter().filter(|s| s.metric == name) {
            if filter.is_some_and(|(k, v)| s.labels.get(k) != Some(v)) {
                continue;
            }
            if let Value::Histogram(counts) = &s.value {
                for c in counts {
                    let entry = sums
                        .entry(c.less_than.to_bits())
                        .or_insert((c.less_than, 0.0));
                    entry.1 += c.count;
                }
            }
        }
        let mut buckets: Vec<(f64, f64)> = sums.into_values().collect();
        buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        buckets
    }
}

fn scalar(value: &Value) -> f64 {
    match value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        _ => 0.0,
    }
}

/// The `q` quantile of the observations between two cumulative bucket lists, linear
/// within a bucket; `None` without observations.
fn quantile(q: f64, before: &[(f64, f64)], after: &[(f64, f64)]) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, count)| {
            let was = before
                .iter()
                .find(|(b, _)| *b == le)
                .map_or(0.0, |(_, c)| *c);
            (le, (count - was).max(0.0))
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in &delta {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let within = (rank - lower.1) / (count - lower.1).max(f64::MIN_POSITIVE);
            return Some(lower.0 + (le - lower.0) * within);
        }
        lower = (le, count);
    }
    None
}

fn millis(seconds: Option<f64>) -> String {
    match seconds {
        Some(s) if s < 0.001 => format!("{:.0} µs", s * 1e6),
        Some(s) => format!("{:.1} ms", s * 1e3),
        None => "-".into(),
    }
}

fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{value:.0} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0) as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// The view of the interval between two snapshots.
fn render(http: &str, before: &Snapshot, after: &Snapshot) -> String {
    let seconds = after.at.duration_since(before.at).as_secs_f64().max(1e-3);
    let rate = |name: &str, label: &str| -> BTreeMap<String, f64> {
        let old = before.by(name, label);
        after
            .by(name, label)
            .into_iter()
            .map(|(k, v)| {
                let was = old.get(&k).copied().unwrap_or(0.0);
                (k, (v - was).max(0.0) / seconds)
            })
            .collect()
    };
    let mut out = String::new();
    let line = |out: &mut String, text: String| {
        out.push_str(&text);
        out.push('\n');
    };
    line(
        &mut out,
        format!("strata top: {http}, every {seconds:.1}s (Ctrl-C quits)"),
    );
    let uptime = after
        .value("process_start_time_seconds")
        .and_then(|start| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?;
            Some(duration(now.as_secs_f64() - start))
        })
        .unwrap_or_else(|| "-".into());
    let cpu = rate("process_cpu_seconds_total", "")
        .get("")
        .map_or_else(|| "-".into(), |c| format!("{:.0}%", c * 100.0));
    let gauge = |name: &str| after.value(name).map_or(0.0, |v| v);
    line(
        &mut out,
        format!(
            "broker: {} | up {uptime} | cpu {cpu} | rss {} | fds {:.0}/{:.0} | threads {:.0} | connections {:.0} | in flight {:.0}",
            after.ready.lines().next().unwrap_or("-"),
            bytes(gauge("process_resident_memory_bytes")),
            gauge("process_open_fds"),
            gauge("process_max_fds"),
            gauge("process_threads"),
            gauge("strata_connections"),
            gauge("strata_requests_in_flight"),
        ),
    );
    for problem in after.ready.lines().skip(1) {
        line(&mut out, format!("  {problem}"));
    }
    let latency = |name: &str, filter: Option<(&str, &str)>, q: f64| {
        millis(quantile(
            q,
            &before.buckets(name, filter),
            &after.buckets(name, filter),
        ))
    };
    let produce = Some(("rpc", "Produce"));
    let fetch = Some(("rpc", "Fetch"));
    let commits = rate("strata_commit_group_batches_count", "")
        .get("")
        .copied()
        .unwrap_or(0.0);
    let batches = rate("strata_commit_group_batches_sum", "")
        .get("")
        .copied()
        .unwrap_or(0.0);
    line(
        &mut out,
        format!(
            "latency: produce p50 {} p99 {} | fetch p99 {} | fsync p50 {} p99 {} | {:.0} commits/s, {:.1} batches each",
            latency("strata_request_duration_seconds", produce, 0.5),
            latency("strata_request_duration_seconds", produce, 0.99),
            latency("strata_request_duration_seconds", fetch, 0.99),
            latency("strata_fsync_duration_seconds", None, 0.5),
            latency("strata_fsync_duration_seconds", None, 0.99),
            commits,
            if commits > 0.0 { batches / commits } else { 0.0 },
        ),
    );
    let rejected = rate("strata_rejected_requests_total", "reason");
    let rejected: Vec<String> = rejected
        .iter()
        .filter(|(_, r)| **r > 0.0)
        .map(|(reason, r)| format!("{reason} {r:.1}/s"))
        .collect();
    if !rejected.is_empty() {
        line(&mut out, format!("rejected: {}", rejected.join(", ")));
    }

    out.push('\n');
    let counts: BTreeMap<String, usize> = after
        .samples
        .iter()
        .filter(|s| s.metric == "strata_log_end_offset")
        .fold(BTreeMap::new(), |mut m, s| {
            *m.entry(s.labels.get("topic").unwrap_or_default().to_string())
                .or_insert(0) += 1;
            m
        });
    let (records_in, bytes_in) = (
        rate("strata_produced_records_total", "topic"),
        rate("strata_produced_bytes_total", "topic"),
    );
    let (records_out, bytes_out) = (
        rate("strata_fetched_records_total", "topic"),
        rate("strata_fetched_bytes_total", "topic"),
    );
    let sizes = after.by("strata_log_size_bytes", "topic");
    line(
        &mut out,
        format!(
            "{:<32} {:>10} {:>12} {:>12} {:>12} {:>12} {:>12}",
            "TOPIC", "PARTITIONS", "IN REC/S", "IN BYTES/S", "OUT REC/S", "OUT BYTES/S", "SIZE"
        ),
    );
    for topic in counts.keys() {
        let get = |m: &BTreeMap<String, f64>| m.get(topic).copied().unwrap_or(0.0);
        line(
            &mut out,
            format!(
                "{:<32} {:>10} {:>12.0} {:>12} {:>12.0} {:>12} {:>12}",
                topic,
                counts.get(topic).copied().unwrap_or(0),
                get(&records_in),
                bytes(get(&bytes_in)),
                get(&records_out),
                bytes(get(&bytes_out)),
                bytes(get(&sizes)),
            ),
        );
    }

    out.push('\n');
    let members = after.by("strata_group_members", "group");
    let lag = after.by("strata_group_lag_records", "group");
    let lag_age: BTreeMap<String, f64> = after
        .samples
        .iter()
        .filter(|s| s.metric == "strata_group_lag_seconds")
        .fold(BTreeMap::new(), |mut m, s| {
            let entry = m
                .entry(s.labels.get("group").unwrap_or_default().to_string())
                .or_insert(0.0f64);
            *entry = entry.max(scalar(&s.value));
            m
        });
    let rebalances = after.by("strata_group_rebalances_total", "group");
    line(
        &mut out,
        format!(
            "{:<32} {:>8} {:>14} {:>10} {:>12} {:>11}",
            "GROUP", "MEMBERS", "LAG", "LAG AGE", "LAG CHANGE", "REBALANCES"
        ),
    );
    let old_lag = before.by("strata_group_lag_records", "group");
    for (group, n) in &members {
        let change =
            lag.get(group).copied().unwrap_or(0.0) - old_lag.get(group).copied().unwrap_or(0.0);
        line(
            &mut out,
            format!(
                "{:<32} {:>8.0} {:>14.0} {:>10} {:>+12.0} {:>11.0}",
                group,
                n,
                lag.get(group).copied().unwrap_or(0.0),
                duration(lag_age.get(group).copied().unwrap_or(0.0)),
                change,
                rebalances.get(group).copied().unwrap_or(0.0),
            ),
        );
    }
    out
}

/// GETs `path` from the broker's HTTP listener.
async fn get(http: &str, path: &str) -> anyhow::Result<(u16, String)> {
    crate::http::client::get(http, path).await.with_context(|| {
        format!(
            "cannot reach the broker's HTTP listener at {http}; is the broker running, and \
             with this --http address (see `strata serve --http-listen`)?"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_buckets_over_the_interval() {
        let before = [(0.001, 10.0), (0.002, 10.0), (f64::INFINITY, 10.0)];
        let after = [(0.001, 10.0), (0.002, 110.0), (f64::INFINITY, 110.0)];
        // All 100 new observations fell in (1 ms, 2 ms].
        let p50 = quantile(0.5, &before, &after).expect("observations");
        assert!((p50 - 0.0015).abs() < 1e-9, "{p50}");
        assert_eq!(quantile(0.5, &after, &after), None);
    }

    #[test]
    fn the_http_address_sits_next_to_the_broker() {
        assert_eq!(
            http_next_to("http://127.0.0.1:7717").expect("ok"),
            "127.0.0.1:7718"
        );
        assert_eq!(
            http_next_to("localhost:9000").expect("ok"),
            "localhost:9001"
        );
        assert!(http_next_to("nowhere").is_err());
    }
}
