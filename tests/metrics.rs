//! Observability of the real `strata` binary: what `/metrics` reports is what was sent
//! (parsed with a Prometheus text parser, not matched line by line), group lag is the
//! real backlog also for a group that never committed, and a partition broken by a real
//! I/O error shows in gRPC health, `/readyz`, the metrics and one log line, and makes
//! the shutdown exit non-zero.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::common::*;
use strata_proto::v1;
use strata_storage::batch::BatchBuilder;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

const TOPIC: &str = "events";

/// The broker's HTTP address, which it has unless told `--http-listen off`.
fn http(broker: &Broker) -> std::net::SocketAddr {
    broker
        .http_addr()
        .expect("the broker announced its HTTP listener")
}

/// One scrape of `/metrics`, parsed.
struct Scrape {
    samples: Vec<prometheus_parse::Sample>,
}

impl Scrape {
    async fn take(broker: &Broker) -> Scrape {
        let (status, body) = http_get(http(broker), "/metrics").await;
        assert_eq!(status, 200, "{body}");
        let lines = body.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("a parsable scrape");
        assert!(!scrape.samples.is_empty());
        Scrape {
            samples: scrape.samples,
        }
    }

    /// The value of the one sample called `name` whose labels include `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.metric == name)
            .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                ref other => panic!("{name}: not a single value: {other:?}"),
            })
            .collect();
        assert_eq!(found.len(), 1, "{name} {labels:?}: {found:?}");
        found[0]
    }

    fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.metric == name)
    }
}

/// Records written a minute ago, so a group's lag in time is about a minute.
fn batch(records: usize, value_bytes: usize) -> Vec<u8> {
    let minute_ago = strata_storage::now_ms() - 60_000;
    let mut b = BatchBuilder::new();
    for i in 0..records {
        b.push(
            minute_ago + i as i64,
            None,
            Some(&vec![b'v'; value_bytes]),
            &[],
        );
    }
    b.finish()
}

/// Guards the metrics' truth: counters equal what was produced and fetched, log ends
/// equal the records stored, rejections are counted by reason, and group lag equals the
/// backlog, for a group that never committed (from the log start) as for one that did;
/// the API and the CLI give the same lag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_was_sent_and_lag_is_the_real_backlog() {
    let broker = Broker::start();
    let mut admin = broker.admin().await;
    let mut client = broker.client().await;
    let mut groups = broker.groups().await;
    create_topic(&mut admin, TOPIC, 3, v1::TopicConfig::default()).await;

    // Partition p gets (p + 1) * 100 records in batches of 10.
    let mut records = BTreeMap::new();
    let mut bytes = BTreeMap::new();
    for p in 0..3u32 {
        for _ in 0..(p + 1) * 10 {
            let b = batch(10, 50);
            *bytes.entry(p).or_insert(0) += b.len();
            *records.entry(p).or_insert(0) += 10;
            client
                .produce(produce_batch(TOPIC, p, b))
                .await
                .expect("produce");
        }
    }
    // Two kinds of rejection.
    for _ in 0..2 {
        let missing = client
            .produce(produce_batch("missing", 0, batch(1, 1)))
            .await;
        assert_eq!(
            missing.expect_err("no such topic").code(),
            tonic::Code::NotFound
        );
    }
    let empty = client.produce(produce_batch(TOPIC, 0, Vec::new())).await;
    assert_eq!(
        empty.expect_err("no records").code(),
        tonic::Code::InvalidArgument
    );

    // Read partition 0 whole, in encoded form.
    let mut fetched_bytes = 0;
    let mut offset = 0;
    while offset < 100 {
        let answer = client
            .fetch(fetch_request(TOPIC, 0, offset, false))
            .await
            .expect("fetch")
            .into_inner();
        fetched_bytes += answer.batches.len();
        offset = answer.next_offset;
    }

    // A member of group "fresh" subscribes and never commits; group "half" has only a
    // commit, made from outside, halfway through partition 0.
    let joined = groups
        .heartbeat(v1::HeartbeatRequest {
            group: "fresh".into(),
            topics: vec![TOPIC.into()],
            client_id: "metrics-test".into(),
            ..Default::default()
        })
        .await
        .expect("join")
        .into_inner();
    assert!(!joined.member_id.is_empty());
    groups
        .commit_offsets(v1::CommitOffsetsRequest {
            group: "half".into(),
            offsets: vec![v1::PartitionOffset {
                topic: TOPIC.into(),
                partition: 0,
                offset: 50,
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .expect("commit");

    let scrape = Scrape::take(&broker).await;
    for p in 0..3u32 {
        let labels = [("topic", TOPIC), ("partition", &p.to_string())];
        let n = records[&p] as f64;
        assert_eq!(scrape.value("strata_produced_records_total", &labels), n);
        assert_eq!(
            scrape.value("strata_produced_bytes_total", &labels),
            bytes[&p] as f64
        );
        assert_eq!(scrape.value("strata_log_end_offset", &labels), n);
        assert_eq!(scrape.value("strata_log_start_offset", &labels), 0.0);
        assert_eq!(
            scrape.value("strata_log_size_bytes", &labels),
            bytes[&p] as f64
        );
        assert_eq!(scrape.value("strata_partition_fail_stopped", &labels), 0.0);
        let fetched = if p == 0 { 100.0 } else { 0.0 };
        assert_eq!(
            scrape.value("strata_fetched_records_total", &labels),
            fetched
        );
        // The group that never committed lags by the whole partition.
        let group_labels = [
            ("group", "fresh"),
            ("topic", TOPIC),
            ("partition", &p.to_string()),
        ];
        assert_eq!(scrape.value("strata_group_lag_records", &group_labels), n);
        // The oldest unconsumed record was written a minute ago (the machine may be
        // slow, but not ten minutes slow).
        let age = scrape.value("strata_group_lag_seconds", &group_labels);
        assert!((59.0..600.0).contains(&age), "lag of {age} s");
    }
    assert_eq!(
        scrape.value(
            "strata_fetched_bytes_total",
            &[("topic", TOPIC), ("partition", "0")]
        ),
        fetched_bytes as f64
    );
    let half = [("group", "half"), ("topic", TOPIC), ("partition", "0")];
    assert_eq!(scrape.value("strata_group_lag_records", &half), 50.0);
    assert_eq!(scrape.value("strata_ready", &[]), 1.0);
    assert_eq!(scrape.value("strata_group_committed_offset", &half), 50.0);
    assert_eq!(
        scrape.value("strata_group_members", &[("group", "fresh")]),
        1.0
    );
    assert_eq!(
        scrape.value("strata_group_members", &[("group", "half")]),
        0.0
    );
    assert!(scrape.value("strata_group_rebalances_total", &[("group", "fresh")]) >= 1.0);
    let rejected = |rpc: &str, code: &str, reason: &str| {
        scrape.value(
            "strata_rejected_requests_total",
            &[("rpc", rpc), ("code", code), ("reason", reason)],
        )
    };
    assert_eq!(rejected("Produce", "NOT_FOUND", "topic_not_found"), 2.0);
    assert_eq!(
        rejected("Produce", "INVALID_ARGUMENT", "invalid_argument"),
        1.0
    );
    assert!(scrape.value("strata_connections", &[]) >= 1.0);
    assert_eq!(scrape.value("strata_topics", &[]), 1.0);
    assert_eq!(scrape.value("strata_partitions_fail_stopped", &[]), 0.0);
    assert!(scrape.value("process_resident_memory_bytes", &[]) > 0.0);
    assert!(scrape.value("process_open_fds", &[]) > 0.0);
    assert!(scrape.value("process_threads", &[]) > 0.0);
    // 60 produce requests (and the rejected ones) were timed.
    assert!(
        scrape.value(
            "strata_request_duration_seconds_count",
            &[("rpc", "Produce")]
        ) >= 60.0
    );
    assert!(scrape.has("strata_fsync_duration_seconds"));

    // The API and the CLI give the same lag as the metrics.
    let described = admin
        .describe_group(v1::DescribeGroupRequest {
            group: "fresh".into(),
        })
        .await
        .expect("describe")
        .into_inner();
    assert_eq!(described.total_lag, 600);
    let cli = strata_command()
        .args(["group", "describe", "fresh", "--broker", &broker.addr_arg()])
        .output()
        .expect("run strata group describe");
    let out = String::from_utf8_lossy(&cli.stdout);
    assert!(cli.status.success(), "{out}");
    assert!(
        out.lines().any(|l| l.trim() == "total lag: 600"),
        "no total lag of 600 in:\n{out}"
    );

    let (status, body) = http_get(http(&broker), "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
    let (status, body) = http_get(http(&broker), "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
}

async fn health(broker: &Broker, service: &str) -> ServingStatus {
    let mut health = HealthClient::new(broker.channel().await);
    let answer = health
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .expect("health check")
        .into_inner();
    answer.status()
}

/// Guards what an operator sees when a partition fail-stops: a real I/O error (the
/// process's file size limit, `ulimit -f`, makes the segment write fail with EFBIG)
/// turns the partition's health NOT_SERVING, `/readyz` 503 with the cause, the metric
/// 1, and leaves exactly one error line with the cause in the log; the other services
/// keep serving, and the shutdown, which cannot close that log cleanly, exits non-zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_partition_shows_in_health_readiness_metrics_and_one_log_line() {
    // Index files are preallocated to 10 MiB: leave room for them and 2 MiB of data.
    const FILE_LIMIT_KIB: u64 = 12 << 10;
    let mut broker = Broker::start_in_shell(
        Some(&format!("trap '' XFSZ; ulimit -f {FILE_LIMIT_KIB}")),
        &[],
    );
    let mut admin = broker.admin().await;
    let mut client = broker.client().await;
    create_topic(&mut admin, TOPIC, 2, v1::TopicConfig::default()).await;
    assert_eq!(
        health(&broker, "strata.v1.Broker").await,
        ServingStatus::Serving
    );

    let chunk = batch(100, 10 << 10); // about 1 MiB
    let deadline = Instant::now() + Duration::from_secs(60);
    let failure = loop {
        assert!(Instant::now() < deadline, "the file size limit never hit");
        match client.produce(produce_batch(TOPIC, 1, chunk.clone())).await {
            Ok(_) => continue,
            Err(status) => break status,
        }
    };
    assert_eq!(failure.code(), tonic::Code::Unavailable, "{failure:?}");
    assert!(failure.message().contains("File too large"), "{failure:?}");

    // Health follows the fault at once (it is event-driven), but poll to be safe.
    let deadline = Instant::now() + Duration::from_secs(30);
    while health(&broker, "strata.v1.Broker").await != ServingStatus::NotServing {
        assert!(Instant::now() < deadline, "health stayed SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(health(&broker, "").await, ServingStatus::NotServing);
    assert_eq!(
        health(&broker, "strata.v1.Admin").await,
        ServingStatus::Serving
    );
    assert_eq!(
        health(&broker, "strata.v1.Groups").await,
        ServingStatus::Serving
    );

    let (status, body) = http_get(http(&broker), "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("partition events/1 refuses writes") && body.contains("File too large"),
        "{body}"
    );
    let scrape = Scrape::take(&broker).await;
    let failed = |p: &str| {
        scrape.value(
            "strata_partition_fail_stopped",
            &[("topic", TOPIC), ("partition", p)],
        )
    };
    assert_eq!((failed("0"), failed("1")), (0.0, 1.0));
    assert_eq!(scrape.value("strata_partitions_fail_stopped", &[]), 1.0);
    // The other partition still takes writes.
    client
        .produce(produce_batch(TOPIC, 0, batch(1, 10)))
        .await
        .expect("the healthy partition takes writes");

    // Later writes to it are refused without a new log line at WARN or above.
    let warned = |log: &str| log.lines().filter(|l| l.contains("WARN")).count();
    let warnings = warned(&broker.log());
    let refused = client
        .produce(produce_batch(TOPIC, 1, batch(1, 10)))
        .await
        .expect_err("the partition is fail-stopped");
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    assert_eq!(
        refused
            .metadata()
            .get("strata-reason")
            .and_then(|r| r.to_str().ok()),
        Some("partition_fail_stopped")
    );
    assert_eq!(warned(&broker.log()), warnings, "{}", broker.log());
    assert_eq!(Scrape::take(&broker).await.value("strata_ready", &[]), 0.0);

    let log = broker.log();
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(
        errors[0].contains("events/1") && errors[0].contains("File too large"),
        "{log}"
    );

    // A client that never finishes its HTTP request cannot hold the shutdown.
    let mut half_sent = tokio::net::TcpStream::connect(http(&broker))
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut half_sent, b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("send half a request");
    broker.terminate();
    let exit = broker.wait_within(Duration::from_secs(60));
    assert!(
        !exit.success(),
        "a shutdown that could not close a log must fail"
    );
    assert!(
        broker.log().contains("did not close cleanly"),
        "{}",
        broker.log()
    );
}

/// The metric names a scrape declares (its `# TYPE` lines, so a family without samples
/// yet counts), with the sample suffixes of their types.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            let suffixes: &[&str] = match kind {
                "counter" => &["_total"],
                "histogram" => &["_bucket", "_sum", "_count"],
                _ => &[""],
            };
            names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
        }
    }
    names
}

/// The `strata_*` and `process_*` metric names a query or rules file mentions.
fn mentioned_metrics(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|t| t.starts_with("strata_") || t.starts_with("process_"))
        .map(str::to_string)
        .collect()
}

/// Runs `promtool` with `args` in `dir`; `None` when promtool is not installed.
fn promtool(dir: &std::path::Path, args: &[&str]) -> Option<String> {
    let output = match std::process::Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
    {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("run promtool: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "promtool {args:?} failed:\n{text}");
    Some(text)
}

/// Guards docs/monitoring: the Grafana dashboard is well formed (unique ids, panels on
/// the 24-column grid, every query with a datasource and a ref id, every variable it
/// uses defined) and, like the alert rules, names only metrics a real broker exports.
/// Where promtool is installed (CI installs it), the rules pass `promtool check rules`
/// and their unit tests. (`promtool check metrics` reads the older Prometheus text
/// format, not the OpenMetrics text the broker serves, so it does not apply.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alert_rules_use_only_metrics_the_broker_exports() {
    let broker = Broker::start();
    let mut admin = broker.admin().await;
    let mut groups = broker.groups().await;
    create_topic(&mut admin, TOPIC, 1, v1::TopicConfig::default()).await;
    // A group with a member, so the group metrics exist.
    groups
        .heartbeat(v1::HeartbeatRequest {
            group: "g".into(),
            topics: vec![TOPIC.into()],
            ..Default::default()
        })
        .await
        .expect("join");
    // A rejection, so the rejected-requests family has a sample.
    let mut client = broker.client().await;
    let missing = client
        .produce(produce_batch("missing", 0, batch(1, 1)))
        .await;
    assert!(missing.is_err());
    let (status, text) = http_get(http(&broker), "/metrics").await;
    assert_eq!(status, 200);
    let exported = metric_names(&text);

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/monitoring");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("grafana-dashboard.json")).expect("read the dashboard"),
    )
    .expect("the dashboard is JSON");
    assert!(dashboard["title"].is_string() && dashboard["uid"].is_string());
    let variables: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating variables")
        .iter()
        .map(|v| v["name"].as_str().expect("a variable name"))
        .collect();
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = std::collections::BTreeSet::new();
    let mut queries = 0;
    for panel in panels {
        let title = panel["title"].as_str().expect("a panel title");
        assert!(
            ids.insert(panel["id"].as_u64().expect("an id")),
            "{title}: id reused"
        );
        let grid = &panel["gridPos"];
        let (x, w, h) = (grid["x"].as_u64(), grid["w"].as_u64(), grid["h"].as_u64());
        let (x, w, h) = (x.expect("x"), w.expect("w"), h.expect("h"));
        assert!(w > 0 && h > 0 && x + w <= 24, "{title}: off the grid");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
        let targets = panel["targets"].as_array().expect("targets");
        assert!(!targets.is_empty(), "{title}: no query");
        for target in targets {
            queries += 1;
            assert!(target["refId"].is_string(), "{title}");
            let expr = target["expr"].as_str().expect("an expression");
            for metric in mentioned_metrics(expr) {
                assert!(
                    exported.contains(&metric),
                    "{title}: {metric} is not exported"
                );
            }
            for used in expr.split('$').skip(1) {
                let name: String = used
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    name.starts_with("__") || variables.contains(&name.as_str()),
                    "{title}: ${name} is not a dashboard variable"
                );
            }
        }
    }
    assert!(queries >= 20, "{queries} queries");

    let rules = std::fs::read_to_string(dir.join("strata-alerts.yml")).expect("read the rules");
    for metric in mentioned_metrics(&rules) {
        assert!(
            exported.contains(&metric),
            "rules: {metric} is not exported"
        );
    }
    match promtool(&dir, &["check", "rules", "strata-alerts.yml"]) {
        None => eprintln!("promtool is not installed: skipping the promtool checks"),
        Some(_) => {
            promtool(&dir, &["test", "rules", "strata-alerts.test.yml"]);
        }
    }
}

/// Guards `strata top --once`: it reads the broker's metrics and shows each topic with
/// its partition count and each group with its members and lag.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strata_top_shows_topics_and_group_lag() {
    let broker = Broker::start();
    let mut admin = broker.admin().await;
    let mut client = broker.client().await;
    let mut groups = broker.groups().await;
    create_topic(&mut admin, TOPIC, 3, v1::TopicConfig::default()).await;
    client
        .produce(produce_batch(TOPIC, 1, batch(25, 10)))
        .await
        .expect("produce");
    groups
        .heartbeat(v1::HeartbeatRequest {
            group: "billing".into(),
            topics: vec![TOPIC.into()],
            ..Default::default()
        })
        .await
        .expect("join");
    let output = strata_command()
        .args(["top", "--once", "--interval", "0.2", "--broker"])
        .arg(broker.addr_arg())
        .arg("--http")
        .arg(http(&broker).to_string())
        .output()
        .expect("run strata top");
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let row = |first: &str| -> Vec<String> {
        out.lines()
            .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .find(|f| f.first().map(String::as_str) == Some(first))
            .unwrap_or_else(|| panic!("no {first} row in:\n{out}"))
    };
    assert!(out.starts_with("strata top:"), "{out}");
    assert!(out.contains("broker: ready"), "{out}");
    assert_eq!(row(TOPIC)[1], "3", "{out}");
    let billing = row("billing");
    assert_eq!(
        (billing[1].as_str(), billing[2].as_str()),
        ("1", "25"),
        "{out}"
    );

    let unreachable = strata_command()
        .args(["top", "--once", "--http", "127.0.0.1:1"])
        .output()
        .expect("run strata top");
    assert!(!unreachable.status.success());
    assert!(
        String::from_utf8_lossy(&unreachable.stderr).contains("cannot reach the broker's HTTP"),
        "{}",
        String::from_utf8_lossy(&unreachable.stderr)
    );
}

/// Guards health after the broken component goes away: deleting the topic of a
/// fail-stopped partition makes gRPC health SERVING and `/readyz` ready again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_broken_topic_makes_the_broker_healthy_again() {
    const FILE_LIMIT_KIB: u64 = 12 << 10;
    let broker = Broker::start_in_shell(
        Some(&format!("trap '' XFSZ; ulimit -f {FILE_LIMIT_KIB}")),
        &[],
    );
    let mut admin = broker.admin().await;
    let mut client = broker.client().await;
    create_topic(&mut admin, TOPIC, 1, v1::TopicConfig::default()).await;
    let chunk = batch(100, 10 << 10);
    let deadline = Instant::now() + Duration::from_secs(60);
    while client
        .produce(produce_batch(TOPIC, 0, chunk.clone()))
        .await
        .is_ok()
    {
        assert!(Instant::now() < deadline, "the file size limit never hit");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while health(&broker, "").await != ServingStatus::NotServing {
        assert!(Instant::now() < deadline, "health stayed SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    admin
        .delete_topic(v1::DeleteTopicRequest { name: TOPIC.into() })
        .await
        .expect("delete");
    let deadline = Instant::now() + Duration::from_secs(30);
    while health(&broker, "").await != ServingStatus::Serving
        || health(&broker, "strata.v1.Broker").await != ServingStatus::Serving
    {
        assert!(Instant::now() < deadline, "health stayed NOT_SERVING");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = http_get(http(&broker), "/readyz").await;
    assert_eq!((status, body.as_str()), (200, "ready\n"));
}
