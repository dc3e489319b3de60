//! The load generator (`strata-bench`) against the real `strata` binary: a small
//! workload's report must account for every message — each one produced is
//! acknowledged once and reaches every consumer set exactly once, with standalone
//! consumers and with consumer groups — and the bench must be able to start a broker by
//! itself from a binary path.

use std::time::Duration;

use crate::common::{Broker, STRATA};
use clap::Parser;
use strata_bench::{Options, Outcome, Report};

/// Guard against a hang; never reached when things work, and nothing asserts on time.
const HANG_GUARD: Duration = Duration::from_secs(120);

async fn run(args: &[&str]) -> Report {
    let mut all = vec!["strata-bench", "--quiet", "--disk-baseline-mib", "0"];
    all.extend_from_slice(args);
    let options = Options::try_parse_from(all).expect("valid flags");
    let outcome = tokio::time::timeout(HANG_GUARD, strata_bench::run(&options))
        .await
        .expect("the run ends")
        .expect("the run succeeds");
    match outcome {
        Outcome::Report(report) => *report,
        Outcome::Skipped { reason, .. } => panic!("skipped: {reason}"),
    }
}

/// A run against a broker the bench starts itself from the binary path, over a
/// temporary data directory.
async fn run_started(args: &[&str]) -> Report {
    let data = tempfile::tempdir().expect("a temporary directory");
    let data = data.path().display().to_string();
    let mut all = vec!["--strata-bin", STRATA, "--data-dir", &data];
    all.extend_from_slice(args);
    run(&all).await
}

/// Two producers, three partitions and two consumer sets of two consumers: every
/// message is acknowledged and counted once per set, each latency is recorded once
/// per acknowledgement and once per receipt, and the transport floor once per call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_is_acknowledged_and_consumed_once_per_set() {
    let broker = Broker::start();
    let report = run(&[
        "--broker",
        &broker.addr_arg(),
        "--producers",
        "2",
        "--partitions",
        "3",
        "--consumer-sets",
        "2",
        "--consumers",
        "2",
        "--messages",
        "3001",
        "--message-bytes",
        "64",
        "--linger-ms",
        "1",
        "--durability",
        "none",
        "--rate",
        "20000",
        "--floor-calls",
        "50",
    ])
    .await;
    let floor = report.floor.as_ref().expect("a fixed-rate run has a floor");
    assert_eq!(
        (floor.call.as_str(), floor.latency.samples),
        ("gRPC health check", 50)
    );
    let produced = report.produced.as_ref().expect("a produce side");
    assert_eq!(
        (produced.sent, produced.acked, produced.failed),
        (3001, 3001, 0)
    );
    let consumed = report.consumed.as_ref().expect("a consume side");
    assert_eq!(consumed.sets.len(), 2);
    for set in &consumed.sets {
        assert_eq!(
            (
                set.received,
                set.unique,
                set.duplicates,
                set.missing,
                set.malformed
            ),
            (3001, 3001, 0, 0, 0),
            "set {}: {set:?}",
            set.set
        );
        assert_eq!(set.error, None);
    }
    assert_eq!(report.ack_latency.expect("ack latencies").samples, 3001);
    assert_eq!(
        report.e2e_latency.expect("end-to-end latencies").samples,
        6002
    );
    assert!(report.is_complete());
    assert_eq!(report.target.durability, "none");

    let json: serde_json::Value = serde_json::from_str(&report.json()).expect("valid JSON");
    assert_eq!(json["produced"]["acked"], 3001);
    let row = report.markdown_row();
    assert!(row.starts_with("| custom | strata | none |"), "{row}");
    let header = Report::markdown_header()
        .lines()
        .next()
        .expect("a header line");
    assert_eq!(
        row.matches('|').count(),
        header.matches('|').count(),
        "{row}"
    );
}

/// Fan-out through consumer groups: each set is a group whose members the broker
/// assigns the partitions to; the run waits for the groups to settle, and every group
/// still receives every message exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_groups_each_receive_every_message_once() {
    let broker = Broker::start();
    let report = run(&[
        "--broker",
        &broker.addr_arg(),
        "--workload",
        "fanout",
        "--consumer-sets",
        "2",
        "--consumers",
        "2",
        "--partitions",
        "3",
        "--messages",
        "2000",
        "--message-bytes",
        "32",
        "--linger-ms",
        "1",
    ])
    .await;
    assert!(
        report.plan.shape().contains("consumer group"),
        "{}",
        report.plan.shape()
    );
    let produced = report.produced.as_ref().expect("a produce side");
    assert_eq!((produced.acked, produced.failed), (2000, 0));
    for set in &report.consumed.as_ref().expect("a consume side").sets {
        assert_eq!(
            (set.received, set.unique, set.duplicates, set.missing),
            (2000, 2000, 0, 0),
            "set {}: {set:?}",
            set.set
        );
    }
    assert_eq!(
        report.e2e_latency.expect("end-to-end latencies").samples,
        4000
    );
}

/// A fixed-rate replay against a broker the bench starts from the binary path: the
/// backlog is written first, then read back in full from offset 0; replay runs report
/// no end-to-end latency (the messages were sent long before they were read).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_against_a_broker_the_bench_starts() {
    let report = run_started(&[
        "--workload",
        "replay",
        "--messages",
        "2000",
        "--rate",
        "20000",
        "--message-bytes",
        "100",
    ])
    .await;
    assert_eq!(report.plan.workload, "replay");
    assert!(report.plan.modified);
    let produced = report.produced.as_ref().expect("a produce side");
    assert_eq!((produced.acked, produced.failed), (2000, 0));
    let set = &report.consumed.as_ref().expect("a consume side").sets[0];
    assert_eq!((set.unique, set.duplicates, set.missing), (2000, 0, 0));
    assert_eq!(report.ack_latency.expect("ack latencies").samples, 2000);
    assert_eq!(report.e2e_latency, None);
    assert_eq!(report.target.durability, "fsync");
    assert!(
        report
            .target
            .notes
            .iter()
            .any(|n| n.contains("started by the bench")),
        "{:?}",
        report.target.notes
    );
}

/// The partitions workload, scaled down: the bench starts the broker, fills every
/// partition, reads the idle broker's resources from /proc, then runs its fixed rate
/// across all the partitions with no consumers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partitions_workload_reads_the_idle_broker() {
    let report = run_started(&[
        "--workload",
        "partitions",
        "--partitions",
        "24",
        "--idle-s",
        "0.5",
        "--messages",
        "240",
        "--rate",
        "2000",
        "--floor-calls",
        "0",
    ])
    .await;
    let scale = report.scale.as_ref().expect("the idle probe ran");
    assert_eq!(scale.partitions, 24);
    // A partition holds descriptors and mappings today; the bound is loose on purpose:
    // it checks that the probe read the broker, not the broker's costs.
    assert!(
        scale.fds >= 24 && scale.mappings >= 24 && scale.threads >= 2,
        "{scale:?}"
    );
    assert!(
        scale.rss_bytes > 1 << 20 && scale.idle_cpu_pct >= 0.0,
        "{scale:?}"
    );
    let produced = report.produced.as_ref().expect("a produce side");
    assert_eq!((produced.acked, produced.failed), (240, 0));
    assert!(
        report.consumed.is_none() || report.consumed.as_ref().is_some_and(|c| c.sets.is_empty())
    );
}
