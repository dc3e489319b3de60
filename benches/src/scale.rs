//! What holding many partitions costs the broker: the first half of the `partitions`
//! workload (the second half is an ordinary fixed-rate run across all of them).
//!
//! After the run's topic is created (timed by the target), one small record goes to each
//! partition, so every partition has a segment with data; then the broker is left idle
//! for `--idle-s` seconds while its CPU time is read from `/proc/<pid>/stat`, and its
//! resident memory, threads, open descriptors and memory mappings are read from /proc.
//! Only a broker the bench started itself has a process to read.

use std::time::{Duration, Instant};

use serde::Serialize;
use strata_client::Client;
use strata_proto::v1;

use crate::error::{Error, Result};

/// Clock ticks per second of /proc's CPU times (USER_HZ: 100 on Linux everywhere).
const TICKS_PER_S: f64 = 100.0;

/// Produce requests in flight while every partition gets its record.
const FILL_CONCURRENCY: u32 = 32;

/// What the partitions cost, measured before any traffic.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleResult {
    /// Partitions of the run's topic.
    pub partitions: u32,
    /// Seconds the CreateTopic call took.
    pub create_s: f64,
    /// Seconds to write one record to every partition (one producer, all in flight).
    pub fill_s: f64,
    /// Seconds the broker was left idle.
    pub idle_s: f64,
    /// CPU the idle broker used, in percent of one core.
    pub idle_cpu_pct: f64,
    /// Resident memory after the idle period.
    pub rss_bytes: u64,
    /// Threads of the broker process.
    pub threads: u64,
    /// Open file descriptors.
    pub fds: u64,
    /// Memory mappings (lines of /proc/<pid>/maps).
    pub mappings: u64,
}

/// A process's resources as /proc shows them.
struct Process {
    cpu_ticks: u64,
    rss_bytes: u64,
    threads: u64,
    fds: u64,
    mappings: u64,
}

impl Process {
    fn read(pid: u32) -> Result<Process> {
        let read = |file: &str| {
            std::fs::read_to_string(format!("/proc/{pid}/{file}"))
                .map_err(Error::io(format!("read /proc/{pid}/{file}")))
        };
        let stat = read("stat")?;
        // The fields after the command name, which is in parentheses and may hold spaces;
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
        let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        let fields: Vec<&str> = after_name.split_whitespace().collect();
        let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
        let cpu_ticks = tick(11)
            .zip(tick(12))
            .map(|(user, system)| user + system)
            .ok_or_else(|| Error::Broker(format!("cannot parse /proc/{pid}/stat")))?;
        let status = read("status")?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| Error::Broker(format!("no {name} in /proc/{pid}/status")))
        };
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map_err(Error::io(format!("list /proc/{pid}/fd")))?
            .count() as u64;
        Ok(Process {
            cpu_ticks,
            rss_bytes: field("VmRSS:")? * 1024,
            threads: field("Threads:")?,
            fds,
            mappings: read("maps")?.lines().count() as u64,
        })
    }
}

/// Writes one record to each of `partitions` partitions of `topic`, leaves the broker
/// (process `pid`) idle for `idle`, and reads what it holds.
pub(crate) async fn probe(
    address: &str,
    topic: &str,
    partitions: u32,
    pid: u32,
    create: Duration,
    idle: Duration,
    quiet: bool,
) -> Result<ScaleResult> {
    let started = Instant::now();
    let client = Client::connect(address).await?;
    let mut fills = tokio::task::JoinSet::new();
    for first in 0..FILL_CONCURRENCY.min(partitions) {
        let mut broker = client.broker_client();
        let topic = topic.to_string();
        fills.spawn(async move {
            for partition in (first..partitions).step_by(FILL_CONCURRENCY as usize) {
                let request = v1::ProduceRequest {
                    topic: topic.clone(),
                    target: Some(v1::produce_request::Target::Partition(partition)),
                    records: vec![v1::Record {
                        value: Some(b"scale".to_vec().into()),
                        ..v1::Record::default()
                    }],
                    ..v1::ProduceRequest::default()
                };
                broker.produce(request).await.map_err(|status| {
                    Error::Broker(format!("produce to partition {partition}: {status}"))
                })?;
            }
            Ok::<_, Error>(())
        });
    }
    while let Some(done) = fills.join_next().await {
        done.map_err(|e| Error::Broker(format!("a fill task failed: {e}")))??;
    }
    let fill = started.elapsed();
    if !quiet {
        eprintln!(
            "strata-bench: {partitions} partitions created in {:.1} s, filled in {:.1} s; \
             idle for {} s",
            create.as_secs_f64(),
            fill.as_secs_f64(),
            idle.as_secs()
        );
    }
    let before = Process::read(pid)?;
    let idle_started = Instant::now();
    tokio::time::sleep(idle).await;
    let idle_s = idle_started.elapsed().as_secs_f64();
    let after = Process::read(pid)?;
    let cpu_s = after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / TICKS_PER_S;
    Ok(ScaleResult {
        partitions,
        create_s: create.as_secs_f64(),
        fill_s: fill.as_secs_f64(),
        idle_s,
        idle_cpu_pct: cpu_s / idle_s * 100.0,
        rss_bytes: after.rss_bytes,
        threads: after.threads,
        fds: after.fds,
        mappings: after.mappings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_its_own_process() {
        let me = Process::read(std::process::id()).expect("own /proc");
        assert!(me.rss_bytes > 0 && me.threads >= 1 && me.fds >= 3 && me.mappings > 10);
    }
}
