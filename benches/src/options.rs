//! Command-line options, the named standard workloads, and the [`Plan`] a run follows.
//!
//! A workload sets every parameter; flags given next to it override single ones (the
//! report then calls the workload "modified"). Without `--workload` the parameters
//! start from `small-max` and the report calls the run "custom".

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::Serialize;
use strata_client::Durability;

use crate::error::{Error, Result};
use crate::payload::HEADER_BYTES;

/// Largest message the generator makes: the broker's largest batch limit, less room
/// for the batch and record framing.
const MESSAGE_BYTES_MAX: usize = (32 << 20) - 4096;
/// Round trips the transport floor measures in a fixed-rate run by default: 2 s at one
/// per millisecond, enough for a p99.9.
const FLOOR_CALLS_DEFAULT: u32 = 2_000;

/// `strata-bench`: load generator for Strata and, for a same-run comparison, NATS
/// JetStream and Redis Streams.
#[derive(Debug, Clone, Parser)]
#[command(name = "strata-bench", version, about)]
pub struct Options {
    /// A named standard workload; flags below override its single parameters.
    #[arg(long, value_enum)]
    pub workload: Option<WorkloadName>,
    /// What to run against.
    #[arg(long, value_enum, default_value_t = TargetKind::Strata)]
    pub target: TargetKind,
    /// Shorthand for `--target null`: no broker, measures the generator's own ceiling.
    #[arg(long)]
    pub null: bool,
    /// Address of a running Strata broker; without it a broker is started on
    /// 127.0.0.1:0 over a temporary data directory.
    #[arg(long)]
    pub broker: Option<String>,
    /// The `strata` binary to start (default: next to this executable, built with cargo
    /// first if missing or stale and run through `cargo run`; else on `PATH`).
    #[arg(long)]
    pub strata_bin: Option<PathBuf>,
    /// Directory for the started broker's data and for the disk baseline (default: the
    /// system temporary directory).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// NATS server for `--target nats`.
    #[arg(long, default_value = "127.0.0.1:4222")]
    pub nats: String,
    /// Redis server for `--target redis`.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    pub redis: String,
    /// Producers, each on its own thread.
    #[arg(long)]
    pub producers: Option<u32>,
    /// Consumer sets: each reads every message once (a stand-in for consumer groups).
    #[arg(long)]
    pub consumer_sets: Option<u32>,
    /// Consumers per set; consumer `c` reads the partitions `p` with `p % consumers == c`.
    #[arg(long)]
    pub consumers: Option<u32>,
    /// How a Strata consumer set reads: `groups` (each set is a consumer group) or
    /// `standalone` (partition consumers). The peers always use standalone readers.
    #[arg(long, value_enum)]
    pub consumer_mode: Option<ConsumerMode>,
    /// Partitions (NATS: subjects of one stream; Redis: streams).
    #[arg(long)]
    pub partitions: Option<u32>,
    /// Message size in bytes (at least 16: the header with send time and id).
    #[arg(long)]
    pub message_bytes: Option<usize>,
    /// Largest batch in bytes (Strata producer batches; Redis pipelines hold at most
    /// this many bytes of messages, and at most 1,000 commands).
    #[arg(long)]
    pub batch_bytes: Option<usize>,
    /// How long a Strata producer batch waits for more records.
    #[arg(long)]
    pub linger_ms: Option<u64>,
    /// Messages per second over all producers, or `max`.
    #[arg(long, value_parser = parse_rate)]
    pub rate: Option<Rate>,
    /// How long the producers run, in seconds.
    #[arg(long)]
    pub duration_s: Option<f64>,
    /// How many messages the producers send in total (instead of a duration).
    #[arg(long)]
    pub messages: Option<u64>,
    /// Durability of the Strata topic: `fsync`, `none` or `interval:<ms>`.
    #[arg(long, value_parser = parse_durability)]
    pub durability: Option<Durability>,
    /// Messages a producer may have sent and not yet acknowledged (default: 8 MiB worth
    /// for Strata, 5,000 for NATS, 20,000 for Redis).
    #[arg(long)]
    pub max_pending: Option<usize>,
    /// MiB the same-run disk baseline writes and reads (0 skips it; default 512, and
    /// 2,048 for `--workload disk`).
    #[arg(long)]
    pub disk_baseline_mib: Option<u64>,
    /// Round trips of the target's cheapest call (Strata's gRPC health check, Redis's
    /// PING) to measure, one per millisecond, before the traffic: the transport floor
    /// beside the run's latencies (0 skips it; default 2,000 for fixed-rate runs against
    /// Strata or Redis, 0 otherwise).
    #[arg(long)]
    pub floor_calls: Option<u32>,
    /// Stop waiting for consumers after this many seconds without progress once the
    /// producers are done.
    #[arg(long, default_value_t = 10)]
    pub drain_timeout_s: u64,
    /// Before the traffic, leave the broker idle this many seconds and report what the
    /// run's partitions cost it (CPU, memory, threads, descriptors, mappings): the
    /// `partitions` workload does, for 30 s. Needs a broker the bench starts.
    #[arg(long, conflicts_with = "broker")]
    pub idle_s: Option<f64>,
    /// Leave the run's topic and consumer groups on the broker given with `--broker`
    /// instead of deleting them, to look at it after the run (its metrics, its lag).
    #[arg(long, requires = "broker")]
    pub keep: bool,
    /// Print the report as JSON on stdout.
    #[arg(long, conflicts_with = "markdown")]
    pub json: bool,
    /// Print the report as one Markdown table row (see `benches/run-all.sh`).
    #[arg(long)]
    pub markdown: bool,
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub save_json: Option<PathBuf>,
    /// Print the header of the `--markdown` table and exit.
    #[arg(long)]
    pub markdown_header: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
}

/// The named standard workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadName {
    /// 100 B messages at max rate, 1 producer, 4 partitions, 1 consumer set, 10 s.
    SmallMax,
    /// 1 KiB messages at max rate, 1 producer, 4 partitions, 1 consumer set, 10 s.
    LargeMax,
    /// 1 KiB messages at 10,000 msgs/s, linger 0, 1 producer, 4 partitions, 20 s.
    #[value(name = "latency-10k")]
    #[serde(rename = "latency-10k")]
    Latency10k,
    /// 1 KiB messages at max rate, 1 producer, 4 partitions, 4 consumer groups of 4
    /// members (Strata; the peers use 4 sets of standalone readers), 10 s.
    Fanout,
    /// Write 500,000 messages of 1 KiB at max rate, then consume the backlog from
    /// offset 0 with one consumer set.
    Replay,
    /// Only the disk baseline: sequential write and read of the data directory's disk.
    Disk,
    /// 10,000 partitions: creation time, then the idle broker's CPU over 30 s, RSS,
    /// threads, descriptors and mappings; then 1 KiB at 10,000 msgs/s spread over all of
    /// them, linger 0, 20 s.
    Partitions,
}

impl WorkloadName {
    /// The name as given on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadName::SmallMax => "small-max",
            WorkloadName::LargeMax => "large-max",
            WorkloadName::Latency10k => "latency-10k",
            WorkloadName::Fanout => "fanout",
            WorkloadName::Replay => "replay",
            WorkloadName::Disk => "disk",
            WorkloadName::Partitions => "partitions",
        }
    }
}

/// How a Strata consumer set reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ConsumerMode {
    /// Each consumer reads its share of the partitions with standalone partition
    /// consumers, from offset 0.
    Standalone,
    /// Each set is a consumer group whose members the broker assigns partitions to;
    /// they start at the earliest offset (a new group) and commit as they go.
    Groups,
}

/// What a run goes against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetKind {
    /// A Strata broker (started here, or `--broker`).
    Strata,
    /// No broker: batches are acknowledged as soon as they are sealed and handed to
    /// the consumers in memory. The generator's own ceiling.
    Null,
    /// NATS JetStream, file storage (needs the `nats` feature).
    Nats,
    /// Redis Streams (needs the `redis` feature).
    Redis,
}

impl TargetKind {
    /// The name as given on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::Strata => "strata",
            TargetKind::Null => "null",
            TargetKind::Nats => "nats",
            TargetKind::Redis => "redis",
        }
    }
}

/// A target message rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Rate {
    /// As fast as the target takes messages.
    Max,
    /// This many messages per second over all producers.
    PerSecond(f64),
}

fn parse_rate(s: &str) -> std::result::Result<Rate, String> {
    if s == "max" {
        return Ok(Rate::Max);
    }
    match s.replace('_', "").parse::<f64>() {
        Ok(r) if r > 0.0 && r.is_finite() => Ok(Rate::PerSecond(r)),
        _ => Err(format!(
            "expected `max` or messages per second above 0, not {s:?}"
        )),
    }
}

fn parse_durability(s: &str) -> std::result::Result<Durability, String> {
    match s {
        "fsync" => Ok(Durability::Fsync),
        "none" => Ok(Durability::None),
        _ => s
            .strip_prefix("interval:")
            .and_then(|ms| ms.parse().ok())
            .map(Durability::IntervalMs)
            .ok_or_else(|| format!("expected fsync, none or interval:<ms>, not {s:?}")),
    }
}

/// Whether consumers follow the producers or read a finished backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Consumers read while the producers write; end-to-end latency is measured.
    Live,
    /// The producers write first; then the consumers read everything from offset 0.
    Replay,
    /// No messages: only the disk baseline.
    DiskOnly,
}

/// How much the producers send.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Amount {
    /// For this many seconds.
    Seconds(f64),
    /// This many messages in total.
    Messages(u64),
}

/// Everything a run does, resolved from the workload and the flags.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// The workload's name, `custom` without one.
    pub workload: String,
    /// Whether flags changed the named workload's traffic shape (durability is a separate
    /// axis and does not count).
    pub modified: bool,
    /// What the run goes against.
    pub target: TargetKind,
    /// Live, replay or disk only.
    pub mode: Mode,
    /// Producers.
    pub producers: u32,
    /// Partitions.
    pub partitions: u32,
    /// Consumer sets (each reads every message).
    pub consumer_sets: u32,
    /// Consumers per set.
    pub consumers: u32,
    /// How Strata consumer sets read.
    pub consumer_mode: ConsumerMode,
    /// Message size in bytes.
    pub message_bytes: usize,
    /// Largest producer batch in bytes.
    pub batch_bytes: usize,
    /// Producer linger in milliseconds.
    pub linger_ms: u64,
    /// Messages per second over all producers; `None` is max rate.
    pub rate: Option<f64>,
    /// How much the producers send.
    pub amount: Amount,
    /// Strata topic durability (`fsync`, `none`, `interval:<ms>`).
    #[serde(serialize_with = "serialize_display")]
    pub durability: Durability,
    /// Messages a producer may have unacknowledged; `None` takes the target's default.
    pub max_pending: Option<usize>,
    /// Bytes the disk baseline writes (0: none).
    pub disk_baseline_bytes: u64,
    /// Round trips the transport floor measures (0: none).
    pub floor_calls: u32,
    /// Seconds the broker is left idle before the traffic to measure what the partitions
    /// cost it; `None`: no such probe.
    pub idle_s: Option<f64>,
    /// Give up on consumers after this long without progress once producers are done.
    #[serde(skip)]
    pub drain_timeout: Duration,
}

fn serialize_display<S: serde::Serializer>(
    d: &Durability,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    s.collect_str(d)
}

impl Plan {
    /// Resolves the options into a plan, checking that the parameters make sense.
    pub fn from_options(o: &Options) -> Result<Plan> {
        let name = o.workload.unwrap_or(WorkloadName::SmallMax);
        let mut plan = Plan::standard(name);
        plan.target = if o.null { TargetKind::Null } else { o.target };
        let before = plan.clone();
        macro_rules! set {
            ($field:ident, $value:expr) => {
                if let Some(v) = $value {
                    plan.$field = v;
                }
            };
        }
        set!(producers, o.producers);
        set!(partitions, o.partitions);
        set!(consumer_sets, o.consumer_sets);
        set!(consumers, o.consumers);
        set!(consumer_mode, o.consumer_mode);
        set!(message_bytes, o.message_bytes);
        set!(batch_bytes, o.batch_bytes);
        set!(linger_ms, o.linger_ms);
        set!(durability, o.durability);
        if let Some(rate) = o.rate {
            plan.rate = match rate {
                Rate::Max => None,
                Rate::PerSecond(r) => Some(r),
            };
        }
        match (o.duration_s, o.messages) {
            (Some(_), Some(_)) => {
                return Err(Error::Config(
                    "give --duration-s or --messages, not both".into(),
                ))
            }
            (Some(s), None) => plan.amount = Amount::Seconds(s),
            (None, Some(n)) => plan.amount = Amount::Messages(n),
            (None, None) => {}
        }
        if o.consumers.is_some() && plan.consumers > plan.partitions {
            return Err(Error::Config(format!(
                "--consumers {} is more than --partitions {}: every consumer reads at least \
                 one partition",
                plan.consumers, plan.partitions
            )));
        }
        // Fewer partitions than the workload's consumers: one consumer per partition.
        plan.consumers = plan.consumers.min(plan.partitions);
        plan.modified = o.workload.is_some() && !plan.same_shape(&before);
        if o.workload.is_none() {
            plan.workload = "custom".into();
        }
        plan.max_pending = o.max_pending;
        if o.idle_s.is_some() {
            plan.idle_s = o.idle_s;
        }
        plan.drain_timeout = Duration::from_secs(o.drain_timeout_s);
        let baseline_mib = o.disk_baseline_mib.unwrap_or(match (name, plan.target) {
            (WorkloadName::Disk, _) => 2048,
            (_, TargetKind::Null) => 0,
            _ => 512,
        });
        plan.disk_baseline_bytes = baseline_mib << 20;
        plan.floor_calls = o
            .floor_calls
            .unwrap_or(match (plan.target, plan.rate, plan.mode) {
                (TargetKind::Strata | TargetKind::Redis, Some(_), Mode::Live) => {
                    FLOOR_CALLS_DEFAULT
                }
                _ => 0,
            });
        plan.check()?;
        Ok(plan)
    }

    /// The parameters of a named workload.
    pub fn standard(name: WorkloadName) -> Plan {
        let base = Plan {
            workload: name.as_str().into(),
            modified: false,
            target: TargetKind::Strata,
            mode: Mode::Live,
            producers: 1,
            partitions: 4,
            consumer_sets: 1,
            consumers: 4,
            consumer_mode: ConsumerMode::Standalone,
            message_bytes: 100,
            batch_bytes: 1 << 20,
            linger_ms: 5,
            rate: None,
            amount: Amount::Seconds(10.0),
            durability: Durability::Fsync,
            max_pending: None,
            disk_baseline_bytes: 512 << 20,
            floor_calls: 0,
            idle_s: None,
            drain_timeout: Duration::from_secs(10),
        };
        match name {
            WorkloadName::SmallMax => base,
            WorkloadName::LargeMax => Plan {
                message_bytes: 1024,
                ..base
            },
            WorkloadName::Latency10k => Plan {
                message_bytes: 1024,
                rate: Some(10_000.0),
                linger_ms: 0,
                amount: Amount::Seconds(20.0),
                ..base
            },
            WorkloadName::Fanout => Plan {
                message_bytes: 1024,
                consumer_sets: 4,
                consumer_mode: ConsumerMode::Groups,
                ..base
            },
            WorkloadName::Replay => Plan {
                message_bytes: 1024,
                mode: Mode::Replay,
                amount: Amount::Messages(500_000),
                ..base
            },
            WorkloadName::Disk => Plan {
                mode: Mode::DiskOnly,
                consumer_sets: 0,
                disk_baseline_bytes: 2 << 30,
                ..base
            },
            WorkloadName::Partitions => Plan {
                partitions: 10_000,
                consumer_sets: 0,
                message_bytes: 1024,
                rate: Some(10_000.0),
                linger_ms: 0,
                amount: Amount::Seconds(20.0),
                idle_s: Some(30.0),
                ..base
            },
        }
    }

    fn same_shape(&self, other: &Plan) -> bool {
        self.producers == other.producers
            && self.partitions == other.partitions
            && self.consumer_sets == other.consumer_sets
            && self.consumers == other.consumers
            && self.consumer_mode == other.consumer_mode
            && self.message_bytes == other.message_bytes
            && self.batch_bytes == other.batch_bytes
            && self.linger_ms == other.linger_ms
            && self.rate == other.rate
            && self.amount == other.amount
    }

    fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        if self.mode == Mode::DiskOnly {
            return Ok(());
        }
        if self.producers == 0 || self.partitions == 0 {
            return bad("--producers and --partitions must be at least 1".into());
        }
        if self.consumer_sets > 0 && self.consumers == 0 {
            return bad("--consumers must be at least 1 when there are consumer sets".into());
        }
        if self.mode == Mode::Replay && self.consumer_sets == 0 {
            return bad("the replay workload needs a consumer set".into());
        }
        if !(HEADER_BYTES..=MESSAGE_BYTES_MAX).contains(&self.message_bytes) {
            return bad(format!(
                "--message-bytes must be between {HEADER_BYTES} (the send time and id) and \
                 {MESSAGE_BYTES_MAX}"
            ));
        }
        if self.batch_bytes < self.message_bytes + 128 || self.batch_bytes > 32 << 20 {
            return bad(format!(
                "--batch-bytes must hold one message with its framing ({} B) and be at most \
                 32 MiB",
                self.message_bytes + 128
            ));
        }
        if let Some(idle) = self.idle_s {
            if !(idle > 0.0 && idle.is_finite()) {
                return bad("--idle-s must be above 0".into());
            }
            if self.target != TargetKind::Strata {
                return bad(
                    "--idle-s measures a Strata broker's process: use --target strata".into(),
                );
            }
        }
        match self.amount {
            Amount::Seconds(s) if !(s > 0.0 && s.is_finite()) => {
                bad("--duration-s must be above 0".into())
            }
            Amount::Messages(0) => bad("--messages must be at least 1".into()),
            _ => Ok(()),
        }
    }

    /// Partitions consumer `consumer` of a set reads.
    pub fn partitions_of(&self, consumer: u32) -> Vec<u32> {
        (0..self.partitions)
            .filter(|p| p % self.consumers == consumer)
            .collect()
    }

    /// One line describing the traffic shape.
    pub fn shape(&self) -> String {
        let rate = match self.rate {
            None => "max rate".to_string(),
            Some(r) => format!("{} msgs/s", crate::report::thousands(r)),
        };
        let amount = match self.amount {
            Amount::Seconds(s) => format!("{s} s"),
            Amount::Messages(n) => format!("{} messages", crate::report::thousands(n as f64)),
        };
        let consume = match (self.mode, self.consumer_sets) {
            (_, 0) => "no consumers".to_string(),
            (Mode::Replay, _) => format!(
                "then {} consumer(s) read the backlog from offset 0",
                self.consumers
            ),
            (_, sets) => format!(
                "{sets} consumer set(s) × {} consumer(s), reading while producing",
                self.consumers
            ),
        };
        let consume = match (self.consumer_mode, self.consumer_sets, self.target) {
            (ConsumerMode::Groups, 1.., TargetKind::Strata) => {
                format!("{consume} (each set a consumer group)")
            }
            _ => consume,
        };
        format!(
            "{} producer(s), {} partition(s), {} B messages, {rate}, {amount}, batch ≤ {} B, \
             linger {} ms; {consume}",
            self.producers, self.partitions, self.message_bytes, self.batch_bytes, self.linger_ms
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(args: &[&str]) -> Result<Plan> {
        let mut all = vec!["strata-bench"];
        all.extend_from_slice(args);
        Plan::from_options(&Options::try_parse_from(all).expect("valid flags"))
    }

    #[test]
    fn workloads_and_overrides() {
        let p = plan(&["--workload", "latency-10k"]).expect("valid");
        assert_eq!(
            (p.rate, p.message_bytes, p.linger_ms, p.modified),
            (Some(10_000.0), 1024, 0, false)
        );
        let p = plan(&["--workload", "small-max", "--partitions", "2"]).expect("valid");
        assert_eq!((p.partitions, p.consumers, p.modified), (2, 2, true));
        let p = plan(&["--rate", "5_000", "--messages", "10"]).expect("valid");
        assert_eq!(p.workload, "custom");
        assert_eq!((p.rate, p.amount), (Some(5_000.0), Amount::Messages(10)));
        assert_eq!(
            p.floor_calls, FLOOR_CALLS_DEFAULT,
            "a fixed-rate run has a floor"
        );
        let p = plan(&["--null"]).expect("valid");
        assert_eq!((p.target, p.disk_baseline_bytes), (TargetKind::Null, 0));
        let p = plan(&["--null", "--rate", "1000"]).expect("valid");
        assert_eq!(p.floor_calls, 0, "no transport under the null target");
        let p = plan(&["--workload", "small-max"]).expect("valid");
        assert_eq!(p.floor_calls, 0, "a max-rate run's latency is its queue");
        let p = plan(&["--workload", "latency-10k", "--floor-calls", "0"]).expect("valid");
        assert_eq!((p.floor_calls, p.modified), (0, false));
        let p = plan(&["--durability", "interval:50"]).expect("valid");
        assert_eq!(p.durability, Durability::IntervalMs(50));
    }

    #[test]
    fn bad_parameters_are_rejected_with_the_flag_named() {
        let error = |args: &[&str]| plan(args).expect_err("invalid").to_string();
        assert!(error(&["--message-bytes", "8"]).contains("--message-bytes"));
        assert!(error(&["--consumers", "5", "--partitions", "4"]).contains("--consumers"));
        assert!(error(&["--duration-s", "1", "--messages", "5"]).contains("not both"));
        assert!(error(&["--messages", "0"]).contains("--messages"));
        assert!(error(&["--batch-bytes", "100"]).contains("--batch-bytes"));
        assert!(Options::try_parse_from(["strata-bench", "--rate", "-3"]).is_err());
        assert!(Options::try_parse_from(["strata-bench", "--durability", "maybe"]).is_err());
    }

    #[test]
    fn the_partitions_workload_probes_an_idle_broker_first() {
        let p = plan(&["--workload", "partitions"]).expect("valid");
        assert_eq!(
            (p.partitions, p.consumer_sets, p.rate, p.idle_s),
            (10_000, 0, Some(10_000.0), Some(30.0))
        );
        let p = plan(&["--workload", "partitions", "--idle-s", "5"]).expect("valid");
        assert_eq!((p.idle_s, p.modified), (Some(5.0), false));
        let error = |args: &[&str]| plan(args).expect_err("invalid").to_string();
        assert!(error(&["--idle-s", "0"]).contains("--idle-s"));
        assert!(error(&["--idle-s", "5", "--null"]).contains("--target strata"));
        assert!(
            Options::try_parse_from(["strata-bench", "--idle-s", "5", "--broker", "x"]).is_err()
        );
    }

    #[test]
    fn consumers_split_the_partitions() {
        let p = plan(&["--partitions", "5", "--consumers", "2"]).expect("valid");
        assert_eq!(p.partitions_of(0), vec![0, 2, 4]);
        assert_eq!(p.partitions_of(1), vec![1, 3]);
    }
}
