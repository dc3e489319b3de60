//! The report of a run: what it measured, as a human-readable table, JSON, or one
//! Markdown table row.

use std::fmt::Write as _;

use serde::Serialize;

use crate::disk::DiskBaseline;
use crate::floor::Floor;
use crate::machine::Machine;
use crate::options::{Mode, Plan};
use crate::run::Measured;
use crate::scale::ScaleResult;
use crate::stats::Percentiles;

/// Everything a run measured and the conditions it ran under.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `strata-bench <version>`.
    pub tool: String,
    /// What was run.
    pub plan: Plan,
    /// What it ran against.
    pub target: TargetInfo,
    /// Where and when.
    pub machine: Machine,
    /// The same-run disk baseline, if measured.
    pub disk: Option<DiskBaseline>,
    /// The same-run transport floor: lone round trips of the target's cheapest call.
    pub floor: Option<Floor>,
    /// The producers' side.
    pub produced: Option<ProduceResult>,
    /// The consumers' side.
    pub consumed: Option<ConsumeResult>,
    /// Publish → acknowledgement latency, from the (intended) send time.
    pub ack_latency: Option<Percentiles>,
    /// Publish → consume latency, from the (intended) send time; live runs only.
    pub e2e_latency: Option<Percentiles>,
    /// One entry per second of the run.
    pub per_second: Vec<Second>,
    /// What the partitions cost the idle broker (`--idle-s`, the partitions workload).
    pub scale: Option<ScaleResult>,
}

/// The target of a run.
#[derive(Debug, Clone, Serialize)]
pub struct TargetInfo {
    /// `strata`, `null`, `nats`, `redis` or `disk`.
    pub name: String,
    /// Server version, where known.
    pub version: Option<String>,
    /// Where it was reached.
    pub address: Option<String>,
    /// Short durability label for tables.
    pub durability: String,
    /// What an acknowledgement means for durability, in a sentence.
    pub durability_detail: String,
    /// Other things a reader of the numbers should know.
    pub notes: Vec<String>,
}

impl TargetInfo {
    /// The pseudo-target of a disk-only run.
    pub fn disk_only() -> TargetInfo {
        TargetInfo {
            name: "disk".into(),
            version: None,
            address: None,
            durability: "-".into(),
            durability_detail: "raw file writes and reads, no broker".into(),
            notes: Vec::new(),
        }
    }

    /// `name version at address`.
    pub fn describe(&self) -> String {
        let mut s = self.name.clone();
        if let Some(v) = &self.version {
            let _ = write!(s, " {v}");
        }
        if let Some(a) = &self.address {
            let _ = write!(s, " at {a}");
        }
        let _ = write!(s, " (durability: {})", self.durability);
        s
    }
}

/// Messages, seconds and rates of one side of a run.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Throughput {
    /// Messages counted.
    pub messages: u64,
    /// Over this many seconds.
    pub seconds: f64,
    /// Messages per second.
    pub msgs_per_s: f64,
    /// Payload MB per second (10^6 bytes).
    pub mb_per_s: f64,
}

impl Throughput {
    /// `messages` of `message_bytes` over `seconds`.
    pub fn new(messages: u64, seconds: f64, message_bytes: usize) -> Throughput {
        let msgs_per_s = if seconds > 0.0 {
            messages as f64 / seconds
        } else {
            0.0
        };
        Throughput {
            messages,
            seconds,
            msgs_per_s,
            mb_per_s: msgs_per_s * message_bytes as f64 / 1e6,
        }
    }
}

/// The producers' side of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProduceResult {
    /// Messages handed to the target.
    pub sent: u64,
    /// Messages acknowledged.
    pub acked: u64,
    /// Messages whose send failed.
    pub failed: u64,
    /// The first failure, if any.
    pub first_error: Option<String>,
    /// Acknowledged messages from the first intended send to the last acknowledgement.
    pub throughput: Throughput,
}

/// The consumers' side of a run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConsumeResult {
    /// Each consumer set.
    pub sets: Vec<SetResult>,
    /// All sets' received messages, from the first send (live) or the consumers' start
    /// (replay) to the last receipt.
    pub throughput: Throughput,
}

/// What one consumer set received.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SetResult {
    /// Set number.
    pub set: u32,
    /// Messages received, duplicates included.
    pub received: u64,
    /// Distinct messages received.
    pub unique: u64,
    /// Extra receipts of a message already received.
    pub duplicates: u64,
    /// Acknowledged messages not received (acknowledged count − distinct received).
    pub missing: u64,
    /// Messages that were not ours (too short, or an id no producer made).
    pub malformed: u64,
    /// The error that ended a consumer of the set, if any.
    pub error: Option<String>,
}

/// One second of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Second {
    /// 1 for the first second.
    pub second: u32,
    /// Messages handed to the target.
    pub sent_per_s: f64,
    /// Messages acknowledged.
    pub acked_per_s: f64,
    /// Payload MB acknowledged.
    pub acked_mb_per_s: f64,
    /// Distinct messages received, all sets together.
    pub consumed_per_s: f64,
    /// p99 of the acknowledgements recorded this second.
    pub ack_p99_us: Option<f64>,
    /// p99 of the end-to-end latencies recorded this second.
    pub e2e_p99_us: Option<f64>,
}

impl Report {
    pub(crate) fn new(
        plan: Plan,
        target: TargetInfo,
        machine: Machine,
        disk: Option<DiskBaseline>,
        measured: Measured,
    ) -> Report {
        Report {
            tool: format!("strata-bench {}", env!("CARGO_PKG_VERSION")),
            plan,
            target,
            machine,
            disk,
            floor: measured.floor,
            produced: measured.produced,
            consumed: measured.consumed,
            ack_latency: measured.ack_latency,
            e2e_latency: measured.e2e_latency,
            per_second: measured.per_second,
            scale: measured.scale,
        }
    }

    /// Whether every send was acknowledged and every acknowledged message reached every
    /// consumer set intact. Duplicates do not count against it: delivery is at least once.
    pub fn is_complete(&self) -> bool {
        let produced = self.produced.as_ref().is_none_or(|p| p.failed == 0);
        let consumed = self.consumed.as_ref().is_none_or(|c| {
            c.sets
                .iter()
                .all(|s| s.missing == 0 && s.malformed == 0 && s.error.is_none())
        });
        produced && consumed
    }

    /// Produce MB/s as a percentage of the disk's sequential write bandwidth.
    pub fn produce_disk_pct(&self) -> Option<f64> {
        let disk = self.disk.as_ref()?;
        let p = self.produced.as_ref()?;
        Some(100.0 * p.throughput.mb_per_s / disk.write_mb_s)
    }

    /// Replay runs: consume MB/s as a percentage of the disk's O_DIRECT read bandwidth.
    /// (Live consumers read what was just written, from memory; no disk comparison.)
    pub fn consume_disk_pct(&self) -> Option<f64> {
        if self.plan.mode != Mode::Replay {
            return None;
        }
        let read = self.disk.as_ref()?.read_direct_mb_s?;
        let c = self.consumed.as_ref()?;
        Some(100.0 * c.throughput.mb_per_s / read)
    }

    /// The report as pretty JSON.
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self)
            .unwrap_or_else(|e| format!("{{\"error\": \"cannot serialize the report: {e}\"}}"))
    }

    /// The report as text for a terminal.
    pub fn human(&self) -> String {
        let mut out = String::new();
        let w = &mut out;
        let modified = if self.plan.modified {
            " (modified)"
        } else {
            ""
        };
        let _ = writeln!(
            w,
            "{}: workload {}{modified} against {}",
            self.tool, self.plan.workload, self.target.name
        );
        if self.plan.mode != Mode::DiskOnly {
            let _ = writeln!(w, "  shape:      {}", self.plan.shape());
            let _ = writeln!(w, "  target:     {}", self.target.describe());
            let _ = writeln!(w, "  durability: {}", self.target.durability_detail);
        }
        for note in &self.target.notes {
            let _ = writeln!(w, "  note:       {note}");
        }
        let _ = writeln!(w, "  machine:    {}", self.machine.describe());
        let _ = writeln!(w, "  date:       {}", self.machine.date_utc);
        if let Some(d) = &self.disk {
            let _ = writeln!(
                w,
                "  disk:       {} in {} ({} MiB, same run)",
                disk_summary(d),
                d.dir.display(),
                d.bytes >> 20
            );
        }
        if !self.per_second.is_empty() {
            let _ = writeln!(w);
            let _ = writeln!(
                w,
                "  {:>6} {:>12} {:>12} {:>9} {:>12} {:>10} {:>10}",
                "second", "sent/s", "acked/s", "MB/s", "consumed/s", "p99 ack", "p99 e2e"
            );
            for s in &self.per_second {
                let p99 = |v: Option<f64>| v.map_or_else(|| "-".to_string(), format_latency);
                let _ = writeln!(
                    w,
                    "  {:>6} {:>12} {:>12} {:>9.1} {:>12} {:>10} {:>10}",
                    s.second,
                    thousands(s.sent_per_s),
                    thousands(s.acked_per_s),
                    s.acked_mb_per_s,
                    thousands(s.consumed_per_s),
                    p99(s.ack_p99_us),
                    p99(s.e2e_p99_us)
                );
            }
        }
        if let Some(s) = &self.scale {
            let _ = writeln!(w);
            let _ = writeln!(
                w,
                "  partitions: {} created in {:.2} s, one record each in {:.2} s",
                thousands(f64::from(s.partitions)),
                s.create_s,
                s.fill_s
            );
            let _ = writeln!(
                w,
                "  idle broker over {:.0} s: CPU {:.1} % of one core, RSS {} MiB, {} threads, \
                 {} fds, {} mappings",
                s.idle_s,
                s.idle_cpu_pct,
                s.rss_bytes >> 20,
                thousands(s.threads as f64),
                thousands(s.fds as f64),
                thousands(s.mappings as f64)
            );
        }
        if self.produced.is_some() || self.consumed.is_some() {
            let _ = writeln!(w);
            let _ = writeln!(
                w,
                "  {:<10} {:>13} {:>8} {:>12} {:>9} {:>10}",
                "overall", "messages", "seconds", "msgs/s", "MB/s", "% of disk"
            );
            let pct = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.0} %"));
            if let Some(p) = &self.produced {
                let t = &p.throughput;
                let _ = writeln!(
                    w,
                    "  {:<10} {:>13} {:>8.2} {:>12} {:>9.1} {:>10}",
                    "produced",
                    thousands(t.messages as f64),
                    t.seconds,
                    thousands(t.msgs_per_s),
                    t.mb_per_s,
                    pct(self.produce_disk_pct())
                );
            }
            if let Some(c) = &self.consumed {
                let t = &c.throughput;
                let _ = writeln!(
                    w,
                    "  {:<10} {:>13} {:>8.2} {:>12} {:>9.1} {:>10}",
                    "consumed",
                    thousands(t.messages as f64),
                    t.seconds,
                    thousands(t.msgs_per_s),
                    t.mb_per_s,
                    pct(self.consume_disk_pct())
                );
            }
            let _ = writeln!(
                w,
                "  (% of disk: produce vs sequential write with a final fsync; replay consume \
                 vs O_DIRECT read)"
            );
        }
        if self.ack_latency.is_some() || self.e2e_latency.is_some() || self.floor.is_some() {
            let _ = writeln!(w);
            let _ = writeln!(
                w,
                "  {:<14} {:>10} {:>10} {:>10} {:>10} {:>10} {:>13}",
                "latency", "p50", "p90", "p99", "p99.9", "max", "samples"
            );
            for (name, p) in [
                ("publish→ack", &self.ack_latency),
                ("end-to-end", &self.e2e_latency),
                ("floor", &self.floor.as_ref().map(|f| f.latency)),
            ] {
                if let Some(p) = p {
                    let _ = writeln!(
                        w,
                        "  {:<14} {:>10} {:>10} {:>10} {:>10} {:>10} {:>13}",
                        name,
                        format_latency(p.p50_us),
                        format_latency(p.p90_us),
                        format_latency(p.p99_us),
                        format_latency(p.p999_us),
                        format_latency(p.max_us),
                        thousands(p.samples as f64)
                    );
                }
            }
            if self.plan.rate.is_some() {
                let _ = writeln!(
                    w,
                    "  (fixed rate: latencies run from each message's intended send time, so a \
                     stall is not hidden)"
                );
            }
            if let Some(f) = &self.floor {
                let _ = writeln!(
                    w,
                    "  (floor: one {} at a time, one every {}, on a connection of its own: a \
                     round trip with no work behind it)",
                    f.call,
                    format_latency(f.interval_us as f64)
                );
            }
        }
        if let Some(p) = &self.produced {
            let _ = writeln!(w);
            let _ = writeln!(
                w,
                "  produced: sent {}, acknowledged {}, failed {}",
                thousands(p.sent as f64),
                thousands(p.acked as f64),
                thousands(p.failed as f64)
            );
            if let Some(e) = &p.first_error {
                let _ = writeln!(w, "  first failure: {e}");
            }
        }
        if let Some(c) = &self.consumed {
            for s in &c.sets {
                let _ = writeln!(
                    w,
                    "  consumer set {}: received {}, distinct {}, duplicates {}, missing {}, \
                     malformed {}{}",
                    s.set,
                    thousands(s.received as f64),
                    thousands(s.unique as f64),
                    thousands(s.duplicates as f64),
                    thousands(s.missing as f64),
                    thousands(s.malformed as f64),
                    s.error
                        .as_ref()
                        .map_or_else(String::new, |e| format!(", stopped by: {e}"))
                );
            }
        }
        if !self.is_complete() {
            let _ = writeln!(
                w,
                "  INCOMPLETE: some messages failed or did not reach every consumer set"
            );
        }
        out
    }

    /// One Markdown table row; [`Report::markdown_header`] names its columns.
    pub fn markdown_row(&self) -> String {
        let latency = |p: &Option<Percentiles>| {
            p.map_or_else(
                || "—".to_string(),
                |p| {
                    format!(
                        "{} / {} / {} / {}",
                        format_latency(p.p50_us),
                        format_latency(p.p99_us),
                        format_latency(p.p999_us),
                        format_latency(p.max_us)
                    )
                },
            )
        };
        if self.plan.mode == Mode::DiskOnly {
            let Some(d) = &self.disk else {
                return "| disk | — | — | — | — | — | — | — | — | — | — |".into();
            };
            let opt = |v: Option<f64>| v.map_or_else(|| "—".to_string(), |v| format!("{v:.0}"));
            return format!(
                "| disk | raw file | — | — | write {} MB/s (final fsync), {} MB/s (fsync every 1 MiB) | 100 % | read {} MB/s (O_DIRECT), {} MB/s (page cache) | — | — | — | {:.2} |",
                opt(Some(d.write_mb_s)),
                opt(d.write_fsync_each_mb_s),
                opt(d.read_direct_mb_s),
                opt(d.read_cached_mb_s),
                self.machine.load_at_start[0],
            );
        }
        let (produce_rate, produce_mb) = self.produced.as_ref().map_or_else(
            || ("—".to_string(), "—".to_string()),
            |p| {
                (
                    thousands(p.throughput.msgs_per_s),
                    format!("{:.1}", p.throughput.mb_per_s),
                )
            },
        );
        let consume = self.consumed.as_ref().map_or_else(
            || "—".to_string(),
            |c| {
                let pct = self
                    .consume_disk_pct()
                    .map_or_else(String::new, |v| format!(" ({v:.0} % of disk read)"));
                format!(
                    "{} ({:.1} MB/s){pct}",
                    thousands(c.throughput.msgs_per_s),
                    c.throughput.mb_per_s
                )
            },
        );
        let complete = if self.is_complete() {
            ""
        } else {
            " **incomplete**"
        };
        format!(
            "| {}{} | {} | {} | {} | {} | {} | {} | {} | {}{complete} | {} | {:.2} |",
            self.plan.workload,
            if self.plan.modified { "*" } else { "" },
            self.target.name,
            self.target.durability,
            produce_rate,
            produce_mb,
            self.produce_disk_pct()
                .map_or_else(|| "—".to_string(), |v| format!("{v:.0} %")),
            consume,
            latency(&self.ack_latency),
            latency(&self.e2e_latency),
            self.floor.as_ref().map_or_else(
                || "—".to_string(),
                |f| format!(
                    "{} / {}",
                    format_latency(f.latency.p50_us),
                    format_latency(f.latency.p99_us)
                )
            ),
            self.machine.load_at_start[0],
        )
    }

    /// The header of the Markdown table [`Report::markdown_row`] fills.
    pub fn markdown_header() -> &'static str {
        "| workload | target | durability | produce msgs/s | produce MB/s | % of disk write | consume msgs/s (all sets) | publish→ack p50 / p99 / p99.9 / max | end-to-end p50 / p99 / p99.9 / max | floor p50 / p99 | load at start |\n|---|---|---|---|---|---|---|---|---|---|---|"
    }
}

fn disk_summary(d: &DiskBaseline) -> String {
    let mut s = format!(
        "write {:.0} MB/s (1 MiB writes + final fsync)",
        d.write_mb_s
    );
    if let Some(v) = d.write_fsync_each_mb_s {
        let _ = write!(s, ", {v:.0} MB/s (fsync after every 1 MiB)");
    }
    match d.read_direct_mb_s {
        Some(v) => {
            let _ = write!(s, ", read {v:.0} MB/s (O_DIRECT, from the disk)");
        }
        None => s.push_str(", read: O_DIRECT not supported here"),
    }
    if let Some(v) = d.read_cached_mb_s {
        let _ = write!(s, ", {v:.0} MB/s (page cache)");
    }
    s
}

/// A latency in microseconds as `812 µs`, `12.3 ms` or `1.20 s`.
pub fn format_latency(us: f64) -> String {
    if us < 1_000.0 {
        format!("{us:.0} µs")
    } else if us < 100_000.0 {
        format!("{:.1} ms", us / 1_000.0)
    } else if us < 1_000_000.0 {
        format!("{:.0} ms", us / 1_000.0)
    } else {
        format!("{:.2} s", us / 1_000_000.0)
    }
}

/// A number rounded to an integer with `,` between thousands.
pub fn thousands(v: f64) -> String {
    let digits = format!("{:.0}", v.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn number_formats() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1_000.0), "1,000");
        assert_eq!(thousands(4_512_345.6), "4,512,346");
        assert_eq!(format_latency(412.3), "412 µs");
        assert_eq!(format_latency(12_345.0), "12.3 ms");
        assert_eq!(format_latency(250_000.0), "250 ms");
        assert_eq!(format_latency(1_200_000.0), "1.20 s");
    }
}
