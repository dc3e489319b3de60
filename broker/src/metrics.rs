//! The broker's metrics, in the Prometheus/OpenMetrics model, encoded by the
//! `prometheus-client` crate.
//!
//! Two kinds of metric, so that the hot paths pay only for atomic increments:
//!
//! - **Recorded as things happen**: per-partition counters of records and bytes produced
//!   and fetched ([`PartitionStats`], plain atomics owned by each partition, so a
//!   produce request costs two relaxed additions and no label lookup); request latency
//!   by RPC, fsync latency and commit-group sizes (histograms: one short lock per
//!   request or commit, never per record); rejected requests; connections and requests
//!   in flight; storage upkeep failures (failed rolls, checkpoints, index seals and
//!   growths, and producer snapshots, which are retried rather than fail-stopping).
//!   These live in [`Metrics`], owned by the broker.
//! - **Read at scrape time** by [`BrokerCollector`]: log start and end offsets, size and
//!   segments per partition; fail-stopped partitions; per group its members, rebalances,
//!   and per partition its committed offset and lag in records and in seconds; the
//!   process's resident memory, open fds, threads and CPU time; readiness. Only the
//!   time of the batch at each group position is remembered between scrapes (it never
//!   changes), so a deleted topic or group simply stops appearing.
//!
//! The registry exists before the broker opens its data directory ([`Source`] says when
//! it is open), so a scrape during recovery shows the process and `strata_ready 0`.
//!
//! Cardinality is bounded by what exists: per partition 9 series, per group 2 plus 3
//! per partition the group consumes, per RPC one histogram, and rejected requests by RPC,
//! status code and reason (fixed sets). docs/operations.md lists every metric.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric, MetricEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use strata_storage::now_ms;

use crate::broker::Broker;
use crate::groups::api;
use crate::groups::assign::TopicPartition;

/// Counters of one partition, added to by its writer (produced) and by fetch handlers.
#[derive(Debug, Default)]
pub struct PartitionStats {
    produced_records: AtomicU64,
    produced_bytes: AtomicU64,
    fetched_records: AtomicU64,
    fetched_bytes: AtomicU64,
}

impl PartitionStats {
    /// Counts records and bytes made durable (acknowledged) by a commit.
    pub fn produced(&self, records: u64, bytes: u64) {
        self.produced_records.fetch_add(records, Ordering::Relaxed);
        self.produced_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Counts records and bytes handed to a consumer.
    pub fn fetched(&self, records: u64, bytes: u64) {
        self.fetched_records.fetch_add(records, Ordering::Relaxed);
        self.fetched_bytes.fetch_add(bytes, Ordering::Relaxed);
    }
}

/// Labels of a per-RPC metric.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// The listener: `grpc` or `kafka`.
    pub listener: &'static str,
    /// The RPC's method name, e.g. `Produce`.
    pub rpc: &'static str,
}

/// Labels of a rejected request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectedLabels {
    /// The listener: `grpc`.
    pub listener: &'static str,
    /// The RPC's method name.
    pub rpc: &'static str,
    /// The status code sent, e.g. `NOT_FOUND`.
    pub code: &'static str,
    /// Why, from a fixed set ([`crate::Error::reason`]).
    pub reason: &'static str,
}

/// Labels of a storage upkeep failure.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpkeepLabels {
    /// The step: `roll`, `checkpoint`, `index_seal`, `index_growth` or `producer_snapshot`.
    pub step: &'static str,
}

/// The metrics recorded as things happen, shared by the listeners and writers.
#[derive(Debug)]
pub struct Metrics {
    /// Time each request took, by RPC; Fetch without its long-poll wait.
    pub request_seconds: Family<RpcLabels, Histogram>,
    /// Requests answered with an error, by RPC, status and reason.
    pub rejected: Family<RejectedLabels, Counter>,
    /// Client connections open now.
    pub connections: Gauge,
    /// Requests being handled now (a Subscribe stream counts while it is set up).
    pub in_flight: Gauge,
    /// Time of each data fsync of a partition commit.
    pub fsync_seconds: Histogram,
    /// Batches per partition commit (group commit: how many requests shared it).
    pub commit_batches: Histogram,
    /// Bytes per partition commit.
    pub commit_bytes: Histogram,
    /// Failures of partition upkeep that wrote no data (a segment roll, a checkpoint, an
    /// index seal or growth, a producer state snapshot): retried, never fail-stopping.
    pub upkeep_failures: Family<UpkeepLabels, Counter>,
    started: SystemTime,
    /// The histograms of `request_seconds`, one per RPC of every listener, made up front
    /// so that timing a request needs no lock and no hashing.
    request_histograms: Vec<(&'static str, &'static str, Histogram)>,
}

/// Latency buckets from 50 µs to about 3.3 s, doubling.
fn latency_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(50e-6, 2.0, 17)
}

impl Default for Metrics {
    /// The metrics of a broker without the Kafka listener.
    fn default() -> Metrics {
        Metrics::new(false)
    }
}

impl Metrics {
    /// The metrics of a broker, with the Kafka listener's request series when `kafka`
    /// (so a broker without it exports none of them).
    pub fn new(kafka: bool) -> Metrics {
        let request_seconds: Family<RpcLabels, Histogram> =
            Family::new_with_constructor(|| Histogram::new(latency_buckets()));
        let mut listeners = vec![("grpc", crate::grpc::instrument::RPCS)];
        if kafka {
            listeners.push(("kafka", crate::kafka::versions::RPCS));
        }
        let request_histograms = listeners
            .iter()
            .flat_map(|&(listener, rpcs)| rpcs.iter().map(move |&rpc| (listener, rpc)))
            .map(|(listener, rpc)| {
                let labels = RpcLabels { listener, rpc };
                let histogram = request_seconds.get_or_create(&labels).clone();
                (listener, rpc, histogram)
            })
            .collect();
        Metrics {
            request_seconds,
            request_histograms,
            rejected: Family::default(),
            connections: Gauge::default(),
            in_flight: Gauge::default(),
            fsync_seconds: Histogram::new(latency_buckets()),
            commit_batches: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            commit_bytes: Histogram::new(exponential_buckets(1024.0, 4.0, 8)),
            upkeep_failures: Family::default(),
            started: SystemTime::now(),
        }
    }

    /// Records how long a request of `rpc` on `listener` took: a short scan of a fixed
    /// list, no hashing. An RPC outside the list is not recorded.
    pub fn request(&self, listener: &str, rpc: &str, took: Duration) {
        if let Some((_, _, histogram)) = self
            .request_histograms
            .iter()
            .find(|(l, r, _)| *l == listener && *r == rpc)
        {
            histogram.observe(took.as_secs_f64());
        }
    }

    /// Records one partition commit that wrote data: how many batches and bytes.
    pub fn commit(&self, batches: usize, bytes: usize) {
        self.commit_batches.observe(batches as f64);
        self.commit_bytes.observe(bytes as f64);
    }

    /// Counts failures of a partition upkeep step (see [`Metrics::upkeep_failures`]).
    pub fn upkeep_failed_by(&self, step: &'static str, failures: u64) {
        self.upkeep_failures
            .get_or_create(&UpkeepLabels { step })
            .inc_by(failures);
    }

    /// Records one data fsync of a partition log (a commit's or a segment roll's).
    pub fn fsync(&self, took: Duration) {
        self.fsync_seconds.observe(took.as_secs_f64());
    }
}

/// Where the scrape-time metrics come from: the broker once it is open, and whether it
/// is ready. Filled in as the broker starts and stops.
#[derive(Debug, Default)]
pub struct Source {
    broker: OnceLock<Arc<Broker>>,
    stopping: AtomicBool,
}

impl Source {
    /// The broker is open.
    pub fn serve(&self, broker: Arc<Broker>) {
        let _ = self.broker.set(broker);
    }

    /// A shutdown began.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// The open broker, if it is open.
    pub fn broker(&self) -> Option<&Arc<Broker>> {
        self.broker.get()
    }

    /// Why the broker is not ready, one line each; empty when it is.
    pub fn not_ready(&self) -> Vec<String> {
        if self.stopping.load(Ordering::Acquire) {
            return vec!["shutting down".into()];
        }
        match self.broker.get() {
            None => vec!["starting: opening the data directory".into()],
            Some(broker) => broker.problems().iter().map(|p| p.to_string()).collect(),
        }
    }
}

/// A registry of every metric, ready to encode: those in `metrics`, and those read at
/// scrape time from `source` (the process's from the start, the broker's once it is
/// open).
pub fn registry(metrics: &Metrics, source: Arc<Source>) -> Registry {
    // Not `with_prefix`: the process metrics keep the names every exporter uses.
    let mut registry = Registry::default();
    let m = metrics;
    registry.register_with_unit(
        "strata_request_duration",
        "Time the broker took to answer a request, by RPC (Fetch without its long-poll wait)",
        Unit::Seconds,
        m.request_seconds.clone(),
    );
    registry.register(
        "strata_rejected_requests",
        "Requests answered with an error, by RPC, status code and reason",
        m.rejected.clone(),
    );
    registry.register(
        "strata_connections",
        "Client connections open now",
        m.connections.clone(),
    );
    registry.register(
        "strata_requests_in_flight",
        "Requests being handled now",
        m.in_flight.clone(),
    );
    registry.register_with_unit(
        "strata_fsync_duration",
        "Time of each data fsync of a partition log (commits and segment rolls)",
        Unit::Seconds,
        m.fsync_seconds.clone(),
    );
    registry.register(
        "strata_commit_group_batches",
        "Batches written by one partition commit (group commit size)",
        m.commit_batches.clone(),
    );
    registry.register_with_unit(
        "strata_commit_group",
        "Bytes written by one partition commit",
        Unit::Bytes,
        m.commit_bytes.clone(),
    );
    registry.register(
        "strata_storage_upkeep_failures",
        "Failures of partition upkeep that wrote no data (segment roll, checkpoint, index \
         seal or growth, producer state snapshot), by step: retried, the partition keeps \
         serving",
        m.upkeep_failures.clone(),
    );
    registry.register_collector(Box::new(BrokerCollector {
        source,
        started: m.started,
        lag_times: Mutex::default(),
    }));
    registry
}

/// Reads the state-derived metrics at scrape time. Blocking: group lag in seconds reads
/// one batch header per lagging partition, and process metrics read `/proc`.
#[derive(Debug)]
pub struct BrokerCollector {
    source: Arc<Source>,
    started: SystemTime,
    /// The time of the batch at each group position seen by the last scrape: a position
    /// that did not move since needs no read (the log below the high watermark never
    /// changes), so an idle or caught-up group costs no I/O per scrape.
    lag_times: Mutex<LagTimes>,
}

/// Per group and partition: the position last seen and the time of the batch there.
type LagTimes = HashMap<(String, TopicPartition), (u64, Option<i64>)>;

type Labels<'a> = Vec<(&'static str, &'a str)>;

/// One metric family: a descriptor, then a value per label set.
struct Series<'a, V> {
    name: &'static str,
    help: &'static str,
    unit: Option<Unit>,
    values: Vec<(Labels<'a>, V)>,
}

impl<'a, V> Series<'a, V> {
    fn new(name: &'static str, help: &'static str, unit: Option<Unit>) -> Series<'a, V> {
        Series {
            name,
            help,
            unit,
            values: Vec::new(),
        }
    }

    fn push(&mut self, labels: Labels<'a>, value: V) {
        self.values.push((labels, value));
    }
}

fn encode_series<V: Copy>(
    encoder: &mut DescriptorEncoder,
    series: Series<'_, V>,
    metric_type: MetricType,
    encode: impl Fn(V, MetricEncoder) -> Result<(), std::fmt::Error>,
) -> Result<(), std::fmt::Error> {
    let mut metric =
        encoder.encode_descriptor(series.name, series.help, series.unit.as_ref(), metric_type)?;
    for (labels, value) in &series.values {
        encode(*value, metric.encode_family(labels)?)?;
    }
    Ok(())
}

fn encode_gauges<V: EncodeGaugeValue + Copy>(
    encoder: &mut DescriptorEncoder,
    series: Series<'_, V>,
) -> Result<(), std::fmt::Error> {
    encode_series(encoder, series, MetricType::Gauge, |v, e| {
        ConstGauge::new(v).encode(e)
    })
}

fn encode_counters(
    encoder: &mut DescriptorEncoder,
    series: Series<'_, u64>,
) -> Result<(), std::fmt::Error> {
    encode_series(encoder, series, MetricType::Counter, |v, e| {
        ConstCounter::new(v).encode(e)
    })
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for BrokerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut ready = Series::new(
            "strata_ready",
            "1 when the broker serves everything (as /readyz answers 200), 0 while it starts, \
             shuts down, or has a fail-stopped component",
            None,
        );
        ready.push(Vec::new(), i64::from(self.source.not_ready().is_empty()));
        encode_gauges(&mut encoder, ready)?;
        if let Some(broker) = self.source.broker() {
            self.encode_partitions(broker, &mut encoder)?;
            self.encode_groups(broker, &mut encoder)?;
        }
        encode_process(&mut encoder, self.started)
    }
}

impl BrokerCollector {
    fn encode_partitions(
        &self,
        broker: &Broker,
        encoder: &mut DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let topics = broker.topics();
        let names: Vec<Vec<String>> = topics
            .iter()
            .map(|t| (0..t.partitions().len()).map(|p| p.to_string()).collect())
            .collect();
        let mut produced_records = Series::new(
            "strata_produced_records",
            "Records acknowledged to producers",
            None,
        );
        let mut produced_bytes = Series::new(
            "strata_produced",
            "Bytes of record batches acknowledged to producers",
            Some(Unit::Bytes),
        );
        let mut fetched_records =
            Series::new("strata_fetched_records", "Records sent to consumers", None);
        let mut fetched_bytes = Series::new(
            "strata_fetched",
            "Bytes of record batches sent to consumers",
            Some(Unit::Bytes),
        );
        let mut start = Series::new(
            "strata_log_start_offset",
            "First offset still in the partition's log",
            None,
        );
        let mut end = Series::new(
            "strata_log_end_offset",
            "The partition's high watermark: the offset the next record gets",
            None,
        );
        let mut size = Series::new(
            "strata_log_size",
            "Bytes of the partition's log",
            Some(Unit::Bytes),
        );
        let mut segments = Series::new(
            "strata_log_segments",
            "Segment files of the partition",
            None,
        );
        let mut failed = Series::new(
            "strata_partition_fail_stopped",
            "1 while the partition refuses writes after a failed write or fsync",
            None,
        );
        let mut failed_total = 0;
        for (topic, ids) in topics.iter().zip(&names) {
            for (partition, id) in topic.partitions().iter().zip(ids) {
                let labels = vec![("topic", topic.name.as_str()), ("partition", id.as_str())];
                let stats = partition.stats();
                let reader = partition.reader();
                produced_records.push(
                    labels.clone(),
                    stats.produced_records.load(Ordering::Relaxed),
                );
                produced_bytes.push(labels.clone(), stats.produced_bytes.load(Ordering::Relaxed));
                fetched_records.push(
                    labels.clone(),
                    stats.fetched_records.load(Ordering::Relaxed),
                );
                fetched_bytes.push(labels.clone(), stats.fetched_bytes.load(Ordering::Relaxed));
                start.push(labels.clone(), clamp(reader.earliest_offset()));
                end.push(labels.clone(), clamp(reader.high_watermark()));
                size.push(labels.clone(), clamp(reader.size_bytes()));
                segments.push(labels.clone(), reader.segment_count() as i64);
                let is_failed = partition.fault().reason().is_some();
                failed_total += i64::from(is_failed);
                failed.push(labels, i64::from(is_failed));
            }
        }
        encode_counters(encoder, produced_records)?;
        encode_counters(encoder, produced_bytes)?;
        encode_counters(encoder, fetched_records)?;
        encode_counters(encoder, fetched_bytes)?;
        encode_gauges(encoder, start)?;
        encode_gauges(encoder, end)?;
        encode_gauges(encoder, size)?;
        encode_gauges(encoder, segments)?;
        encode_gauges(encoder, failed)?;
        let mut all_failed = Series::new(
            "strata_partitions_fail_stopped",
            "Partitions refusing writes after a failed write or fsync",
            None,
        );
        all_failed.push(Vec::new(), failed_total);
        encode_gauges(encoder, all_failed)?;
        let mut topics_count = Series::new("strata_topics", "Topics", None);
        topics_count.push(Vec::new(), topics.len() as i64);
        encode_gauges(encoder, topics_count)?;
        let mut offsets_failed = Series::new(
            "strata_offsets_log_failed",
            "1 while consumer group commits are refused after a failed write of the offsets log",
            None,
        );
        offsets_failed.push(
            Vec::new(),
            i64::from(broker.offsets().fault().reason().is_some()),
        );
        encode_gauges(encoder, offsets_failed)?;
        // The filesystem of the data directory: a full disk stops every partition.
        if let Ok(fs) = rustix::fs::statvfs(broker.data_dir()) {
            let mut free = Series::new(
                "strata_data_dir_free",
                "Bytes free for the broker on the data directory's filesystem",
                Some(Unit::Bytes),
            );
            free.push(Vec::new(), clamp(fs.f_bavail.saturating_mul(fs.f_frsize)));
            encode_gauges(encoder, free)?;
            let mut capacity = Series::new(
                "strata_data_dir_capacity",
                "Size of the data directory's filesystem",
                Some(Unit::Bytes),
            );
            capacity.push(Vec::new(), clamp(fs.f_blocks.saturating_mul(fs.f_frsize)));
            encode_gauges(encoder, capacity)?;
        }
        Ok(())
    }

    fn encode_groups(
        &self,
        broker: &Broker,
        encoder: &mut DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        let descriptions: Vec<api::GroupDescription> = api::list_groups(broker)
            .iter()
            .filter_map(|g| api::describe_group(broker, &g.name).ok())
            .collect();
        let mut lag_times = self.lag_times.lock().unwrap_or_else(|e| e.into_inner());
        let mut seen = HashMap::with_capacity(lag_times.len());
        struct Row<'a> {
            topic: &'a str,
            partition: String,
            committed: Option<u64>,
            lag: u64,
            lag_ms: Option<u64>,
        }
        let now = now_ms();
        let rows: Vec<Vec<Row>> = descriptions
            .iter()
            .map(|d| {
                d.partitions
                    .iter()
                    .filter_map(|p| {
                        let (log, lag) = (p.log?, p.lag?);
                        let position = p
                            .committed
                            .as_ref()
                            .map_or(log.start, |c| c.offset.max(log.start));
                        let key = (d.summary.name.clone(), p.partition.clone());
                        // A time found once never changes; "nothing waits" can.
                        // A batch that retention or a deletion took since the describe has
                        // no time to read: the row stays, without a lag in seconds.
                        let written = match lag_times.get(&key) {
                            Some(&(at, Some(written))) if at == position => Some(written),
                            _ => api::batch_time(broker, &p.partition, position)
                                .ok()
                                .flatten(),
                        };
                        seen.insert(key, (position, written));
                        Some(Row {
                            topic: &p.partition.topic,
                            partition: p.partition.partition.to_string(),
                            committed: p.committed.as_ref().map(|c| c.offset),
                            lag,
                            lag_ms: written.map(|w| now.saturating_sub(w).max(0) as u64),
                        })
                    })
                    .collect()
            })
            .collect();
        // Forget positions of groups and partitions that are gone.
        *lag_times = seen;
        drop(lag_times);
        let mut members = Series::new(
            "strata_group_members",
            "Members of the consumer group",
            None,
        );
        let mut rebalances = Series::new(
            "strata_group_rebalances",
            "Times the group's assignment was recomputed (its epoch) since the broker started",
            None,
        );
        let mut committed = Series::new(
            "strata_group_committed_offset",
            "The group's committed offset (the next to consume); absent without a commit",
            None,
        );
        let mut lag = Series::new(
            "strata_group_lag_records",
            "Records the group has yet to consume (from the log start without a commit)",
            None,
        );
        let mut lag_seconds = Series::new(
            "strata_group_lag",
            "Age of the oldest record the group has yet to consume; 0 without lag",
            Some(Unit::Seconds),
        );
        for (d, rows) in descriptions.iter().zip(&rows) {
            let group = d.summary.name.as_str();
            members.push(vec![("group", group)], i64::from(d.summary.members));
            rebalances.push(vec![("group", group)], d.summary.epoch);
            for row in rows {
                let labels = vec![
                    ("group", group),
                    ("topic", row.topic),
                    ("partition", row.partition.as_str()),
                ];
                if let Some(offset) = row.committed {
                    committed.push(labels.clone(), clamp(offset));
                }
                lag_seconds.push(labels.clone(), row.lag_ms.unwrap_or(0) as f64 / 1000.0);
                lag.push(labels, clamp(row.lag));
            }
        }
        encode_gauges(encoder, members)?;
        encode_counters(encoder, rebalances)?;
        encode_gauges(encoder, committed)?;
        encode_gauges(encoder, lag)?;
        encode_gauges(encoder, lag_seconds)
    }
}

/// The process's own metrics, with the names Prometheus client libraries use, read
/// from `/proc` (Linux). A value that cannot be read is left out.
fn encode_process(
    encoder: &mut DescriptorEncoder,
    started: SystemTime,
) -> Result<(), std::fmt::Error> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let mut gauges: Vec<(&'static str, &'static str, Option<Unit>, Option<i64>)> = vec![
        (
            "process_resident_memory",
            "Resident memory of the broker process",
            Some(Unit::Bytes),
            field("VmRSS:").map(|kib| clamp(kib * 1024)),
        ),
        (
            "process_threads",
            "Threads of the broker process",
            None,
            field("Threads:").map(clamp),
        ),
        (
            "process_open_fds",
            "File descriptors open in the broker process",
            None,
            std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|d| d.count() as i64),
        ),
        (
            "process_max_fds",
            "The broker process's limit on open file descriptors (soft RLIMIT_NOFILE)",
            None,
            max_open_files(),
        ),
    ];
    gauges.push((
        "process_start_time",
        "When the broker process started, in seconds since the Unix epoch",
        Some(Unit::Seconds),
        started
            .duration_since(UNIX_EPOCH)
            .ok()
            .map(|d| d.as_secs() as i64),
    ));
    for (name, help, unit, value) in gauges {
        if let Some(value) = value {
            let mut series = Series::new(name, help, unit);
            series.push(Vec::new(), value);
            encode_gauges(encoder, series)?;
        }
    }
    if let Some(seconds) = cpu_seconds() {
        let counter = ConstCounter::new(seconds);
        let metric = encoder.encode_descriptor(
            "process_cpu",
            "CPU time (user and system) the broker process used",
            Some(&Unit::Seconds),
            counter.metric_type(),
        )?;
        counter.encode(metric)?;
    }
    Ok(())
}

/// The soft limit on open files, from `/proc/self/limits`.
fn max_open_files() -> Option<i64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// User plus system CPU seconds of the whole process, from `/proc/self/stat`, whose
/// times are in clock ticks of USER_HZ, which Linux fixes at 100 in its ABI.
fn cpu_seconds() -> Option<f64> {
    const USER_HZ: f64 = 100.0;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may hold spaces; the fields after it follow its ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after ')'.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_metrics_read_this_process() {
        assert!(cpu_seconds().is_some_and(|s| s >= 0.0));
        assert!(max_open_files().is_some_and(|n| n > 0));
        let mut text = String::new();
        let mut registry = Registry::default();
        #[derive(Debug)]
        struct Process;
        impl Collector for Process {
            fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
                encode_process(&mut encoder, SystemTime::now())
            }
        }
        registry.register_collector(Box::new(Process));
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        for name in [
            "process_resident_memory_bytes ",
            "process_threads ",
            "process_open_fds ",
            "process_cpu_seconds_total ",
        ] {
            assert!(
                text.lines().any(|l| l.starts_with(name)),
                "{name} missing in:\n{text}"
            );
        }
    }
}
