//! The broker under hostile load, against the real `strata` binary: oversized and
//! malformed requests of every service, each answered with its documented status
//! (RESOURCE_EXHAUSTED naming the limit, or INVALID_ARGUMENT and the like), while a
//! well-behaved producer and consumer keep working beside them; the broker's memory
//! (RSS, read from /proc) stays under a stated bound and no partition is fail-stopped at
//! the end. The limits are those of docs/operations.md.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use strata_proto::v1;
use tokio_stream::StreamExt;
use tonic::{Code, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

const TOPIC: &str = "orders";
const PARTITIONS: u32 = 3;
/// The broker's RSS bound under every attack here: the produce budget (512 MiB) is the
/// largest single holder; the attacks' requests are capped at a few MiB each.
const RSS_BOUND_BYTES: u64 = 1 << 30;

/// The resident set size of process `pid`, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line");
    kib * 1024
}

/// A well-behaved producer and consumer on their own connections: the producer sends a
/// small batch at a time to partition 0 and the consumer follows it with long polls.
struct WellBehaved {
    stop: Arc<AtomicBool>,
    produced: Arc<AtomicU64>,
    consumed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Result<(), Status>>>,
}

impl WellBehaved {
    async fn start(broker: &Broker) -> WellBehaved {
        let stop = Arc::new(AtomicBool::new(false));
        let produced = Arc::new(AtomicU64::new(0));
        let consumed = Arc::new(AtomicU64::new(0));
        let mut producer = broker.client().await;
        let mut consumer = broker.client().await;
        let producing = {
            let (stop, produced) = (Arc::clone(&stop), Arc::clone(&produced));
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let records = (0..10).map(|i| record(None, &[i; 100])).collect();
                    let answer = producer
                        .produce(produce_records(TOPIC, 0, records))
                        .await?
                        .into_inner();
                    produced.store(answer.last_offset + 1, Ordering::Relaxed);
                }
                Ok(())
            })
        };
        let consuming = {
            let (stop, consumed) = (Arc::clone(&stop), Arc::clone(&consumed));
            tokio::spawn(async move {
                let mut offset = 0;
                while !stop.load(Ordering::Relaxed) {
                    let mut request = fetch_request(TOPIC, 0, offset, false);
                    request.max_wait_ms = 200;
                    let answer = consumer.fetch(request).await?.into_inner();
                    offset = answer.next_offset;
                    consumed.store(offset, Ordering::Relaxed);
                }
                Ok(())
            })
        };
        WellBehaved {
            stop,
            produced,
            consumed,
            tasks: vec![producing, consuming],
        }
    }

    /// Records produced and consumed so far.
    fn progress(&self) -> (u64, u64) {
        (
            self.produced.load(Ordering::Relaxed),
            self.consumed.load(Ordering::Relaxed),
        )
    }

    /// Stops both; fails if either met an error.
    async fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await
                .expect("the well-behaved client panicked")
                .expect("the well-behaved client's request failed");
        }
        (
            self.produced.load(Ordering::Relaxed),
            self.consumed.load(Ordering::Relaxed),
        )
    }
}

type Attack = Pin<Box<dyn Future<Output = Result<(), Status>> + Send>>;

/// One hostile request: what it is, the code it must get, and words its message must
/// hold (the limit's name for RESOURCE_EXHAUSTED).
struct Case {
    what: &'static str,
    code: Code,
    says: &'static str,
    attack: Attack,
}

fn case(
    what: &'static str,
    code: Code,
    says: &'static str,
    attack: impl Future<Output = Result<(), Status>> + Send + 'static,
) -> Case {
    Case {
        what,
        code,
        says,
        attack: Box::pin(attack),
    }
}

async fn health(broker: &Broker, service: &str) -> ServingStatus {
    let mut health = HealthClient::new(broker.channel().await);
    health
        .check(HealthCheckRequest {
            service: service.to_string(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status()
}

fn join(group: &str, topics: Vec<String>) -> v1::HeartbeatRequest {
    v1::HeartbeatRequest {
        group: group.to_string(),
        topics,
        ..Default::default()
    }
}

/// Every kind of malformed or oversized request below gets its documented status, the
/// broker's RSS stays under [`RSS_BOUND_BYTES`], the well-behaved client keeps going
/// throughout, and the partitions are all healthy at the end.
#[tokio::test]
async fn malformed_and_oversized_requests_get_their_statuses_and_cost_little() {
    let broker = Broker::start();
    let mut admin = broker.admin().await;
    create_topic(&mut admin, TOPIC, PARTITIONS, v1::TopicConfig::default()).await;
    create_topic(&mut admin, "payments", 1, v1::TopicConfig::default()).await;
    let well_behaved = WellBehaved::start(&broker).await;
    let admin = broker.admin().await;
    let groups = broker.groups().await;
    let data = broker.client().await;
    let topics = || vec![TOPIC.to_string()];
    let owned = |partitions: Vec<u32>| {
        vec![v1::TopicPartitions {
            topic: TOPIC.into(),
            partitions,
        }]
    };
    let offset = |partition: u32, metadata: String| v1::PartitionOffset {
        topic: TOPIC.into(),
        partition,
        offset: 0,
        metadata,
        commit_timestamp_ms: 0,
    };
    let reset = |partitions: Vec<u32>| v1::ResetOffsetsRequest {
        group: "g".into(),
        topic: TOPIC.into(),
        partitions,
        to: Some(v1::reset_offsets_request::To::Earliest(true)),
    };
    let (a, g, d) = (admin.clone(), groups.clone(), data.clone());
    let lone = broker.admin().await;
    macro_rules! rpc {
        ($client:expr, $method:ident, $request:expr) => {{
            let mut client = $client.clone();
            let request = $request;
            async move { client.$method(request).await.map(|_| ()) }
        }};
    }
    let cases = vec![
        case(
            "ResetOffsets naming 3 million partitions",
            Code::InvalidArgument,
            "lists 3000000 partitions",
            rpc!(a, reset_offsets, reset(vec![0; 3_000_000])),
        ),
        case(
            "ResetOffsets naming a partition twice",
            Code::InvalidArgument,
            "twice",
            rpc!(a, reset_offsets, reset(vec![1, 1])),
        ),
        case(
            "ResetOffsets of a partition the topic lacks",
            Code::NotFound,
            "no partition 7",
            rpc!(a, reset_offsets, reset(vec![7])),
        ),
        case(
            "an Admin request over the Admin limit (5 MiB)",
            Code::ResourceExhausted,
            "max_admin_request_bytes",
            rpc!(
                a,
                create_topic,
                v1::CreateTopicRequest {
                    name: "n".repeat(5 << 20),
                    ..Default::default()
                }
            ),
        ),
        case(
            "CreateTopic with a 1 MiB name",
            Code::InvalidArgument,
            "bytes in all",
            rpc!(
                a,
                create_topic,
                v1::CreateTopicRequest {
                    name: "n".repeat(1 << 20),
                    partitions: 1,
                    config: None,
                }
            ),
        ),
        case(
            "CreateTopic with a million partitions",
            Code::InvalidArgument,
            "partitions must be between",
            rpc!(
                a,
                create_topic,
                v1::CreateTopicRequest {
                    name: "many".into(),
                    partitions: 1_000_000,
                    config: None,
                }
            ),
        ),
        case(
            "DescribeGroup with a 1 MiB group name",
            Code::InvalidArgument,
            "bytes in all",
            rpc!(
                a,
                describe_group,
                v1::DescribeGroupRequest {
                    group: "g".repeat(1 << 20)
                }
            ),
        ),
        case(
            "a Groups request over the Groups limit (5 MiB)",
            Code::ResourceExhausted,
            "max_groups_request_bytes",
            rpc!(g, heartbeat, join("g", vec!["t".repeat(5 << 20)])),
        ),
        case(
            "a join with a 3 MB client id",
            Code::ResourceExhausted,
            "max_client_id_bytes",
            rpc!(
                g,
                heartbeat,
                v1::HeartbeatRequest {
                    client_id: "c".repeat(3_000_000),
                    ..join("g", topics())
                }
            ),
        ),
        case(
            "a heartbeat with a 1 KiB member id",
            Code::InvalidArgument,
            "member id is 1024 bytes",
            rpc!(
                g,
                heartbeat,
                v1::HeartbeatRequest {
                    member_id: "m".repeat(1024),
                    ..join("g", topics())
                }
            ),
        ),
        case(
            "a heartbeat owning a million partitions",
            Code::InvalidArgument,
            "lists 1000000 partitions",
            rpc!(
                g,
                heartbeat,
                v1::HeartbeatRequest {
                    owned: owned(vec![0; 1_000_000]),
                    ..join("g", topics())
                }
            ),
        ),
        case(
            "a heartbeat owning a partition twice",
            Code::InvalidArgument,
            "twice",
            rpc!(
                g,
                heartbeat,
                v1::HeartbeatRequest {
                    owned: owned(vec![2, 2]),
                    ..join("g", topics())
                }
            ),
        ),
        case(
            "a join naming its topic 400000 times",
            Code::InvalidArgument,
            "names 400000 topics",
            rpc!(g, heartbeat, join("g", vec![TOPIC.to_string(); 400_000])),
        ),
        case(
            "a join naming its topic twice",
            Code::InvalidArgument,
            "twice",
            rpc!(g, heartbeat, join("g", vec![TOPIC.to_string(); 2])),
        ),
        case(
            "a join with a session timeout of an hour",
            Code::InvalidArgument,
            "session timeout",
            rpc!(
                g,
                heartbeat,
                v1::HeartbeatRequest {
                    session_timeout_ms: 3_600_000,
                    ..join("g", topics())
                }
            ),
        ),
        case(
            "LeaveGroup with a 1 KiB member id",
            Code::InvalidArgument,
            "member id is 1024 bytes",
            rpc!(
                g,
                leave_group,
                v1::LeaveGroupRequest {
                    group: "g".into(),
                    member_id: "m".repeat(1024),
                }
            ),
        ),
        case(
            "FetchOffsets for a million partitions",
            Code::InvalidArgument,
            "lists 1000000 partitions",
            rpc!(
                g,
                fetch_offsets,
                v1::FetchOffsetsRequest {
                    group: "g".into(),
                    partitions: owned(vec![0; 1_000_000]),
                }
            ),
        ),
        case(
            "FetchOffsets naming a topic twice",
            Code::InvalidArgument,
            "twice",
            rpc!(
                g,
                fetch_offsets,
                v1::FetchOffsetsRequest {
                    group: "g".into(),
                    partitions: [owned(vec![0]), owned(vec![1])].concat(),
                }
            ),
        ),
        case(
            "a commit with 1 MiB of metadata",
            Code::ResourceExhausted,
            "max_commit_metadata_bytes",
            rpc!(
                g,
                commit_offsets,
                v1::CommitOffsetsRequest {
                    group: "g".into(),
                    offsets: vec![offset(0, "m".repeat(1 << 20))],
                    ..Default::default()
                }
            ),
        ),
        case(
            "a commit of 100000 offsets of a 3-partition topic",
            Code::InvalidArgument,
            "more partitions of topic",
            rpc!(
                g,
                commit_offsets,
                v1::CommitOffsetsRequest {
                    group: "g".into(),
                    offsets: vec![offset(0, String::new()); 100_000],
                    ..Default::default()
                }
            ),
        ),
        case(
            "a produce over the Broker limit (40 MiB)",
            Code::ResourceExhausted,
            "produce_request_bytes",
            rpc!(d, produce, produce_batch(TOPIC, 1, vec![0; 40 << 20])),
        ),
        case(
            "a produce of a million empty records (2 MB on the wire)",
            Code::ResourceExhausted,
            "produce_decoded_bytes",
            rpc!(
                d,
                produce,
                produce_records(TOPIC, 1, vec![v1::Record::default(); 1_000_000])
            ),
        ),
        case(
            "a produce of a batch that is not one",
            Code::InvalidArgument,
            "batch",
            rpc!(d, produce, produce_batch(TOPIC, 1, vec![7; 4096])),
        ),
        case(
            "a produce of records over max_message_bytes",
            Code::ResourceExhausted,
            "exceeds the maximum",
            rpc!(
                d,
                produce,
                produce_records(TOPIC, 1, vec![record(None, &[0; 64 << 10]); 32])
            ),
        ),
        case(
            "a produce with both records and a batch",
            Code::InvalidArgument,
            "not both",
            rpc!(
                d,
                produce,
                v1::ProduceRequest {
                    records: vec![record(None, b"x")],
                    ..produce_batch(TOPIC, 1, vec![1])
                }
            ),
        ),
        case(
            "a produce with an unknown acks mode",
            Code::InvalidArgument,
            "acks",
            rpc!(
                d,
                produce,
                v1::ProduceRequest {
                    acks: 99,
                    ..produce_records(TOPIC, 1, vec![record(None, b"x")])
                }
            ),
        ),
        case(
            "a produce to a 1 MiB topic name",
            Code::NotFound,
            "bytes in all",
            rpc!(
                d,
                produce,
                produce_records(&"t".repeat(1 << 20), 1, vec![record(None, b"x")])
            ),
        ),
        case(
            "a fetch of partition 2^31",
            Code::NotFound,
            "no partition",
            rpc!(d, fetch, fetch_request(TOPIC, 1 << 31, 0, false)),
        ),
        case(
            "a fetch far past the end",
            Code::OutOfRange,
            "offset",
            rpc!(d, fetch, fetch_request(TOPIC, 1, u64::MAX, false)),
        ),
        case(
            "a request with 1 MiB of metadata (its connection is closed)",
            Code::ResourceExhausted,
            "",
            {
                let mut client = lone;
                let mut request = tonic::Request::new(v1::ListTopicsRequest {});
                request.metadata_mut().insert(
                    "x-padding",
                    "p".repeat(1 << 20).parse().expect("a header value"),
                );
                async move { client.list_topics(request).await.map(|_| ()) }
            },
        ),
        case(
            "ListOffsets with an unknown spec",
            Code::InvalidArgument,
            "unknown offset spec",
            rpc!(
                a,
                list_offsets,
                v1::ListOffsetsRequest {
                    topic: TOPIC.into(),
                    partition: 0,
                    spec: 42,
                    timestamp_ms: 0,
                }
            ),
        ),
    ];
    assert!(cases.len() >= 20, "at least 20 kinds of hostile requests");
    let pid = broker.pid();
    // The well-behaved client's rate alone, then beside the attacks: printed, not
    // asserted (it depends on the machine's load).
    let rate = |from: (u64, u64), to: (u64, u64), took: Duration| {
        (to.0 - from.0) as f64 / took.as_secs_f64()
    };
    let solo_from = (well_behaved.progress(), Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let solo = rate(solo_from.0, well_behaved.progress(), solo_from.1.elapsed());
    let attacked_from = (well_behaved.progress(), Instant::now());
    let mut peak = 0;
    for case in cases {
        let status = case.attack.await.expect_err(case.what);
        assert_eq!(status.code(), case.code, "{}: {status:?}", case.what);
        assert!(
            status.message().contains(case.says),
            "{}: {:?} does not say {:?}",
            case.what,
            status.message(),
            case.says
        );
        peak = peak.max(rss_bytes(pid));
    }
    let attacked = rate(
        attacked_from.0,
        well_behaved.progress(),
        attacked_from.1.elapsed(),
    );
    println!(
        "well-behaved producer: {solo:.0} records/s alone, {attacked:.0} records/s beside \
         the attacks; broker RSS peaked at {} MiB",
        peak >> 20
    );
    assert!(
        peak < RSS_BOUND_BYTES,
        "the broker's RSS reached {peak} bytes"
    );
    // The group the attacks named was never created, nor changed.
    let mut a = admin.clone();
    let missing = a
        .describe_group(v1::DescribeGroupRequest { group: "g".into() })
        .await
        .expect_err("no group");
    assert_eq!(missing.code(), Code::NotFound);
    let before = well_behaved.progress();
    wait_for_progress(&well_behaved, before).await;
    let (produced, consumed) = well_behaved.finish().await;
    assert!(produced > 0 && consumed > 0);
    assert_eq!(health(&broker, "").await, ServingStatus::Serving);
    assert_eq!(
        health(&broker, "strata.v1.Broker").await,
        ServingStatus::Serving
    );
}

/// Waits until the well-behaved client has both produced and consumed past `before`.
async fn wait_for_progress(client: &WellBehaved, before: (u64, u64)) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (produced, consumed) = client.progress();
        if produced > before.0 && consumed > before.1 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the well-behaved client made no progress"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Opens `n` TCP connections to the broker that never send anything.
fn idle_connections(broker: &Broker, n: usize) -> Vec<std::net::TcpStream> {
    (0..n)
        .map(|_| std::net::TcpStream::connect(broker.addr_arg()).expect("connect"))
        .collect()
}

/// Lists the topics on a new connection.
async fn list_topics(broker: &Broker) -> Result<(), Status> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", broker.addr_arg()))
        .expect("an endpoint")
        .connect()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    v1::admin_client::AdminClient::new(channel)
        .list_topics(v1::ListTopicsRequest {})
        .await
        .map(|_| ())
}

/// Connections beyond --max-connections are closed at once (the client's request fails
/// with a transport error); the broker serves again as soon as some close.
#[tokio::test]
async fn connections_beyond_the_cap_are_closed_at_once() {
    let broker = Broker::start_with(&["--max-connections", "4"]);
    let idle = idle_connections(&broker, 4);
    // The broker has accepted them all once a fifth is refused.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match list_topics(&broker).await {
            // The connection is reset: tonic says UNKNOWN "transport error", or
            // CANCELLED ("connection closed") when the close overtakes the request
            // hyper had queued on it. Either way the transport made the status.
            Err(status) => {
                assert!(
                    matches!(
                        status.code(),
                        Code::Unavailable | Code::Unknown | Code::Cancelled
                    ),
                    "{status:?}"
                );
                assert!(
                    status.code() != Code::Cancelled
                        || std::error::Error::source(&status).is_some(),
                    "{status:?}"
                );
                break;
            }
            Ok(()) => assert!(Instant::now() < deadline, "a fifth connection was served"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(60);
    while list_topics(&broker).await.is_err() {
        assert!(Instant::now() < deadline, "the broker did not serve again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        broker.log().contains("max_connections are open"),
        "{}",
        broker.log()
    );
}

/// The HTTP listener (metrics, health) holds at most --max-http-connections: clients
/// that open connections and never send a request cannot take the process's
/// descriptors. One more is closed at once (its GET fails), and /metrics answers again
/// once they close (it had no cap before).
#[tokio::test]
async fn http_connections_beyond_the_cap_are_closed_at_once() {
    let broker = Broker::start_with(&["--max-http-connections", "3"]);
    let http = broker.http_addr().expect("the HTTP listener is on");
    let address = http.to_string();
    let get = |path: &'static str| strata_broker::http::client::get(&address, path);
    let (status, body) = get("/metrics").await.expect("a scrape under the cap");
    assert_eq!(status, 200);
    assert!(body.contains("strata_ready 1"), "{body}");
    // Idle connections are added until one beyond them is refused: an idle one that
    // arrived while a scrape's connection still held its permit was closed itself, so
    // the count that fills the cap is not fixed.
    let mut idle = Vec::new();
    while get("/metrics").await.is_ok() {
        assert!(idle.len() < 50, "50 idle connections and still served");
        idle.push(std::net::TcpStream::connect(http).expect("connect"));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        idle.len() >= 3,
        "refused with {} idle connections",
        idle.len()
    );
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match get("/metrics").await {
            Ok((status, body)) => {
                assert_eq!(status, 200);
                assert!(body.contains("strata_ready 1"), "{body}");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "never answered again: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        broker.log().contains("max_http_connections are open"),
        "{}",
        broker.log()
    );
}

/// A client holding a half-sent request and an open health Watch stream do not keep
/// the broker from shutting down: it logs the signal, drains for the configured time,
/// cuts them, closes its logs and exits cleanly.
#[tokio::test]
async fn a_watch_stream_and_a_half_sent_request_do_not_hold_a_shutdown() {
    use std::io::Write;
    let mut broker = Broker::start_with(&["--shutdown-timeout-ms", "500ms"]);
    let mut admin = broker.admin().await;
    create_topic(&mut admin, TOPIC, 1, v1::TopicConfig::default()).await;
    let mut health = HealthClient::new(broker.channel().await);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.message().await.expect("a status").expect("a status");
    assert_eq!(first.status(), ServingStatus::Serving);
    // An HTTP/2 preface, then nothing: a request that never finishes arriving.
    let mut half = std::net::TcpStream::connect(broker.addr_arg()).expect("connect");
    half.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .expect("write the preface");
    broker.terminate();
    let status = broker.wait_within(Duration::from_secs(60));
    let log = broker.log();
    assert!(status.success(), "{status}; its log:\n{log}");
    for said in [
        "received a shutdown signal",
        "signal=\"SIGTERM\"",
        "cutting them",
        "shut down cleanly",
    ] {
        assert!(log.contains(said), "the log does not say {said:?}:\n{log}");
    }
    // The Watch stream ended (cut) rather than staying open.
    while let Ok(Some(_)) = watch.message().await {}
}

/// CPU time (user + system) process `pid` has used, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("a command name")
        .1
        .split_whitespace()
        .collect();
    let field = |i: usize| fields[i].parse::<u64>().expect("a number");
    // utime and stime: fields 14 and 15 of the line, 12 and 13 after the name.
    field(11) + field(12)
}

/// Clock ticks per second of /proc's CPU times (USER_HZ; 100 on Linux everywhere).
const TICKS_PER_SECOND: u64 = 100;

/// At the descriptor limit (a low `ulimit -n` filled by idle connections), `accept`
/// backs off instead of spinning, the log says why, the start warned that the limit
/// is too low, and the broker serves again once the connections close.
#[tokio::test]
async fn accept_backs_off_at_the_descriptor_limit() {
    let broker = Broker::start_in_shell(Some("ulimit -n 128"), &[]);
    let mut admin = broker.admin().await;
    create_topic(&mut admin, TOPIC, 1, v1::TopicConfig::default()).await;
    let mut data = broker.client().await;
    let idle = idle_connections(&broker, 200);
    let pid = broker.pid();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !broker.log().contains("out of file descriptors") {
        assert!(
            Instant::now() < deadline,
            "no warning about accept: {}",
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let window = Duration::from_secs(2);
    let before = cpu_ticks(pid);
    tokio::time::sleep(window).await;
    let used = cpu_ticks(pid) - before;
    assert!(
        used < window.as_secs() * TICKS_PER_SECOND / 2,
        "the broker used {used} ticks of CPU in {window:?} with accept failing: a spin"
    );
    // A connection opened before keeps working.
    data.produce(produce_records(TOPIC, 0, vec![record(None, b"still here")]))
        .await
        .expect("produce at the descriptor limit");
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(60);
    while list_topics(&broker).await.is_err() {
        assert!(Instant::now() < deadline, "the broker did not serve again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        broker
            .log()
            .contains("the open-file limit (ulimit -n) is below"),
        "{}",
        broker.log()
    );
    assert_eq!(
        health(&broker, "strata.v1.Broker").await,
        ServingStatus::Serving
    );
}

/// Issue 13: at the descriptor limit (a low `ulimit -n` filled by idle connections), a
/// produce that needs a segment roll gets a retryable UNAVAILABLE naming the cause
/// instead of fail-stopping the partition until a restart (which it did although
/// nothing was lost): produces that fit in the active segment still succeed, and once
/// the idle connections close the roll happens and every acknowledged record is there,
/// in order, with dense offsets.
#[tokio::test]
async fn a_segment_roll_at_the_descriptor_limit_does_not_fail_stop() {
    let broker = Broker::start_in_shell(Some("ulimit -n 128"), &[]);
    let mut admin = broker.admin().await;
    let config = v1::TopicConfig {
        segment_bytes: Some(2048),
        ..Default::default()
    };
    create_topic(&mut admin, TOPIC, 1, config).await;
    let mut data = broker.client().await;
    let mut acked: Vec<Vec<u8>> = Vec::new();
    // Two of these do not fit in one segment; a small one fits beside one.
    let large = |i: u8| vec![i; 1200];
    acked.push(produce(&mut data, large(0)).await.expect("produce"));
    // Reading now keeps the active segment's read handle open.
    assert_eq!(read_partition(&mut data, TOPIC, 0).await.len(), 1);
    let idle = idle_connections(&broker, 200);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !broker.log().contains("out of file descriptors") {
        assert!(
            Instant::now() < deadline,
            "never at the limit: {}",
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every produce rolls (each new segment takes descriptors) until one cannot.
    let mut refused = None;
    for i in 1..50 {
        match produce(&mut data, large(i)).await {
            Ok(value) => acked.push(value),
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    let status = refused.expect("a roll at the descriptor limit fails");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("too many open files: raise"),
        "{status:?}"
    );
    // Not fail-stopped: a batch that needs no roll is written.
    acked.push(
        produce(&mut data, vec![9; 100])
            .await
            .expect("no roll needed"),
    );
    drop(idle);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match produce(&mut data, large(100)).await {
            Ok(value) => {
                acked.push(value);
                break;
            }
            Err(status) => {
                assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                assert!(
                    Instant::now() < deadline,
                    "the roll never happened: {status:?}"
                );
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let records = read_partition(&mut data, TOPIC, 0).await;
    let offsets: Vec<u64> = records.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, (0..acked.len() as u64).collect::<Vec<_>>());
    let values: Vec<Vec<u8>> = records
        .into_iter()
        .map(|r| r.value.unwrap_or_default())
        .collect();
    assert_eq!(values, acked);
    assert_eq!(
        health(&broker, "strata.v1.Broker").await,
        ServingStatus::Serving
    );
    assert!(
        broker.log().contains("storage upkeep failed"),
        "{}",
        broker.log()
    );
}

/// Produces one record of `value` to partition 0 of [`TOPIC`]; returns the value.
async fn produce(
    data: &mut v1::broker_client::BrokerClient<tonic::transport::Channel>,
    value: Vec<u8>,
) -> Result<Vec<u8>, Status> {
    data.produce(produce_records(TOPIC, 0, vec![record(None, &value)]))
        .await
        .map(|_| value)
}

/// Fills partition 0 of `topic` with about `mib` MiB, in 1 MiB requests of 512 KiB
/// records.
async fn fill(broker: &Broker, topic: &str, mib: usize) {
    let mut data = broker.client().await;
    for _ in 0..mib {
        let records = vec![record(None, &[7; 500 << 10]); 2];
        data.produce(produce_records(topic, 0, records))
            .await
            .expect("produce");
    }
}

/// Opens a Subscribe stream from offset 0 on its own connection and never reads it.
async fn unread_subscribe(
    broker: &Broker,
    topic: &str,
    max_bytes: u32,
) -> Result<tonic::Streaming<v1::FetchResponse>, Status> {
    let mut client = broker.client().await;
    client
        .subscribe(v1::SubscribeRequest {
            topic: topic.to_string(),
            partition: 0,
            offset: 0,
            max_bytes,
            ..Default::default()
        })
        .await
        .map(tonic::Response::into_inner)
}

/// Twenty Subscribe streams whose clients never read held about 1 GB before their
/// queues were bounded in bytes and their responses charged to the fetch memory
/// budget; now the broker stays under a bound and a well-behaved client keeps going.
#[tokio::test]
async fn unread_subscribe_streams_hold_bounded_memory() {
    let broker = Broker::start_with(&["--default-max-message-bytes", "2MiB"]);
    let mut admin = broker.admin().await;
    create_topic(&mut admin, TOPIC, 1, v1::TopicConfig::default()).await;
    create_topic(&mut admin, "big", 1, v1::TopicConfig::default()).await;
    fill(&broker, "big", 96).await;
    let well_behaved = WellBehaved::start(&broker).await;
    let mut streams = Vec::new();
    for _ in 0..20 {
        match unread_subscribe(&broker, "big", 8 << 20).await {
            Ok(stream) => streams.push(stream),
            // Refused while the others hold the budget: what the limit is for.
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(
                    status.message().contains("fetch_memory_bytes"),
                    "{status:?}"
                );
            }
        }
    }
    assert!(!streams.is_empty());
    // The streams fill their queues and the budget; let them get there.
    let pid = broker.pid();
    let mut peak = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss_bytes(pid));
    }
    println!(
        "{} unread Subscribe streams: broker RSS peaked at {} MiB",
        streams.len(),
        peak >> 20
    );
    assert!(
        peak < SUBSCRIBE_RSS_BOUND_BYTES,
        "the broker's RSS reached {} MiB",
        peak >> 20
    );
    let before = well_behaved.progress();
    wait_for_progress(&well_behaved, before).await;
    drop(streams);
    well_behaved.finish().await;
}

/// The RSS bound with unread Subscribe streams: the fetch memory budget (256 MiB), what
/// the transport holds of each stream's last response (up to 8 MiB each), and the rest
/// of the broker.
const SUBSCRIBE_RSS_BOUND_BYTES: u64 = 640 << 20;

/// Turns a hang into a failure; never reached when things work.
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within 60 s"))
}

/// Client consumers that stop reading a backlog cancel their Subscribe streams once
/// their prefetch budget is full, so the broker holds no responses for them: with a
/// small fetch memory budget and six such partition consumers (which, holding their
/// streams, would pin more than Subscribe's share of it), a new consumer still
/// subscribes and reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_partition_consumers_leave_the_fetch_budget_to_others() {
    stalled_consumers_leave_the_fetch_budget_to_others(false).await;
}

/// The same with group consumers: each stalled one is its own group's only member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_group_consumers_leave_the_fetch_budget_to_others() {
    stalled_consumers_leave_the_fetch_budget_to_others(true).await;
}

async fn stalled_consumers_leave_the_fetch_budget_to_others(groups: bool) {
    let broker = Broker::start_with(&["--fetch-memory-bytes", "16MiB"]);
    let mut admin = broker.admin().await;
    create_topic(&mut admin, TOPIC, 1, v1::TopicConfig::default()).await;
    create_topic(&mut admin, "big", 1, v1::TopicConfig::default()).await;
    fill(&broker, "big", 16).await;
    let client = strata_client::Client::connect(&broker.addr_arg())
        .await
        .expect("connect");
    let mut stalled = Vec::new();
    for i in 0..6 {
        let mut consumer = client_consumer(&client, "big", &format!("stalled-{i}"), groups).await;
        let first = within("the first record", consumer.next()).await;
        assert!(matches!(first, Some(Ok(_))), "{first:?}");
        stalled.push(consumer);
    }
    reads_ten_new_records(&broker, &client, groups).await;
    drop(stalled);
}

/// Raw Subscribe streams that are never read hold Subscribe's whole share of a small
/// fetch memory budget, so every new Subscribe is refused: strata-client's consumers
/// then poll with Fetch from the rest of the budget, and keep reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_consumers_read_on_while_unread_streams_hold_the_streaming_share() {
    let broker = Broker::start_with(&[
        "--fetch-memory-bytes",
        "16MiB",
        "--subscribe-queue-bytes",
        "8MiB",
    ]);
    let mut admin = broker.admin().await;
    create_topic(&mut admin, TOPIC, 1, v1::TopicConfig::default()).await;
    create_topic(&mut admin, "big", 1, v1::TopicConfig::default()).await;
    fill(&broker, "big", 64).await;
    let mut streams = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Ok(stream) = unread_subscribe(&broker, "big", 4 << 20).await {
        streams.push(stream);
        assert!(Instant::now() < deadline, "Subscribe was never refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let client = strata_client::Client::connect(&broker.addr_arg())
        .await
        .expect("connect");
    for groups in [false, true] {
        reads_ten_new_records(&broker, &client, groups).await;
    }
    drop(streams);
}

/// A strata-client consumer of partition 0 of [`TOPIC`]: a partition consumer, or the
/// only member of the group `name` (prefetching at most 2 MiB).
async fn client_consumer(
    client: &strata_client::Client,
    topic: &str,
    name: &str,
    groups: bool,
) -> Pin<
    Box<
        dyn tokio_stream::Stream<Item = strata_client::Result<strata_client::ConsumedRecord>>
            + Send,
    >,
> {
    if groups {
        let config = strata_client::ConsumerGroupConfig {
            client_id: name.to_string(),
            prefetch_bytes_max: 2 << 20,
            ..strata_client::ConsumerGroupConfig::default()
        };
        Box::pin(
            client
                .consumer_with(name, &[topic], config)
                .await
                .expect("a group consumer"),
        )
    } else {
        Box::pin(
            client
                .partition_consumer(topic, 0, strata_client::StartAt::Earliest)
                .await
                .expect("a partition consumer"),
        )
    }
}

/// Produces ten records to [`TOPIC`], then reads every record of it, in order, with a
/// new consumer (a new group starts at the earliest offset too).
async fn reads_ten_new_records(broker: &Broker, client: &strata_client::Client, groups: bool) {
    let mut data = broker.client().await;
    let start = high_watermarks(&mut broker.admin().await, TOPIC).await[0];
    let records = (0..10)
        .map(|i| record(None, format!("r{i}").as_bytes()))
        .collect();
    data.produce(produce_records(TOPIC, 0, records))
        .await
        .expect("produce");
    let name = if groups { "fresh-group" } else { "fresh" };
    let mut fresh = client_consumer(client, TOPIC, name, groups).await;
    for offset in 0..start + 10 {
        let record = within("a record for the consumer that reads", fresh.next())
            .await
            .expect("the stream does not end")
            .expect("a record, not an error");
        assert_eq!(record.offset, offset);
    }
}

/// With a small fetch memory budget held by unread streams, a new Subscribe and a
/// Fetch are refused with RESOURCE_EXHAUSTED naming fetch_memory_bytes instead of
/// piling up.
#[tokio::test]
async fn a_held_fetch_budget_refuses_new_reads_naming_the_limit() {
    let broker = Broker::start_with(&[
        "--fetch-memory-bytes",
        "16MiB",
        "--subscribe-queue-bytes",
        "8MiB",
    ]);
    let mut admin = broker.admin().await;
    create_topic(&mut admin, "big", 1, v1::TopicConfig::default()).await;
    fill(&broker, "big", 64).await;
    let mut streams = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let refused = loop {
        match unread_subscribe(&broker, "big", 4 << 20).await {
            Ok(stream) => streams.push(stream),
            Err(status) => break status,
        }
        assert!(Instant::now() < deadline, "Subscribe was never refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused.message().contains("fetch_memory_bytes"),
        "{refused:?}"
    );
    // Subscribe streams may hold three quarters of the budget: 12 MiB, so an 8 MiB
    // fetch finds no room, while a 1 MiB one (strata-client's default) does.
    let mut data = broker.client().await;
    let mut request = fetch_request("big", 0, 0, false);
    request.max_bytes = 8 << 20;
    let fetch = data.fetch(request).await.map(|_| ()).expect_err("no room");
    assert_eq!(fetch.code(), Code::ResourceExhausted, "{fetch:?}");
    data.fetch(fetch_request("big", 0, 0, false))
        .await
        .expect("a 1 MiB fetch fits in the rest");
    assert!(fetch.message().contains("fetch_memory_bytes"), "{fetch:?}");
    // Once the streams are gone, large reads are served again.
    drop(streams);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut large = fetch_request("big", 0, 0, false);
    large.max_bytes = 8 << 20;
    while data.fetch(large.clone()).await.map(|_| ()).is_err() {
        assert!(Instant::now() < deadline, "fetches stayed refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Joins beyond --max-group-members or --max-groups get RESOURCE_EXHAUSTED naming the
/// setting; the members already in keep their group.
#[tokio::test]
async fn joins_beyond_the_group_limits_are_refused() {
    let broker = Broker::start_with(&["--max-group-members", "2", "--max-groups", "1"]);
    let mut admin = broker.admin().await;
    create_topic(&mut admin, TOPIC, PARTITIONS, v1::TopicConfig::default()).await;
    let mut groups = broker.groups().await;
    for _ in 0..2 {
        groups
            .heartbeat(join("g", vec![TOPIC.into()]))
            .await
            .expect("a join within the limits");
    }
    for (group, limit) in [("g", "max_group_members"), ("h", "max_groups")] {
        let refused = groups
            .heartbeat(join(group, vec![TOPIC.into()]))
            .await
            .expect_err("a join beyond the limits");
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert!(refused.message().contains(limit), "{refused:?}");
    }
    let described = admin
        .describe_group(v1::DescribeGroupRequest { group: "g".into() })
        .await
        .expect("describe")
        .into_inner();
    assert_eq!(described.members.len(), 2);
}

/// The committed offsets of a group without members expire after
/// --offsets-retention-ms (Kafka's offsets.retention.minutes); those of a group with a
/// member stay.
#[tokio::test]
async fn committed_offsets_of_empty_groups_expire() {
    let broker = Broker::start_with(&[
        "--offsets-retention-ms",
        "1s",
        "--retention-check-ms",
        "100ms",
    ]);
    let mut admin = broker.admin().await;
    create_topic(&mut admin, TOPIC, 1, v1::TopicConfig::default()).await;
    let mut data = broker.client().await;
    data.produce(produce_records(TOPIC, 0, vec![record(None, b"x")]))
        .await
        .expect("produce");
    let mut groups = broker.groups().await;
    let commit = |group: &str, member_id: String, member_epoch: u64| v1::CommitOffsetsRequest {
        group: group.into(),
        member_id,
        member_epoch,
        offsets: vec![v1::PartitionOffset {
            topic: TOPIC.into(),
            partition: 0,
            offset: 1,
            ..Default::default()
        }],
    };
    groups
        .commit_offsets(commit("gone", String::new(), 0))
        .await
        .expect("a commit from outside");
    let member = groups
        .heartbeat(v1::HeartbeatRequest {
            session_timeout_ms: 60_000,
            ..join("live", vec![TOPIC.into()])
        })
        .await
        .expect("join")
        .into_inner();
    groups
        .commit_offsets(commit(
            "live",
            member.member_id.clone(),
            member.member_epoch,
        ))
        .await
        .expect("a member's commit");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let described = admin
            .describe_group(v1::DescribeGroupRequest {
                group: "gone".into(),
            })
            .await;
        match described {
            Err(status) if status.code() == Code::NotFound => break,
            other => {
                other.expect("the group exists until it expires");
            }
        }
        assert!(Instant::now() < deadline, "the empty group never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Past its retention too (its commit is older than the retention by then), but it
    // has a member.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let live = admin
        .describe_group(v1::DescribeGroupRequest {
            group: "live".into(),
        })
        .await
        .expect("the group with a member stays")
        .into_inner();
    assert_eq!(live.partitions[0].committed_offset, Some(1));
    assert!(
        broker.log().contains("expired the committed offsets"),
        "{}",
        broker.log()
    );
}
