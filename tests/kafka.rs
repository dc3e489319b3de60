//! The Kafka listener against the real `strata` binary: raw protocol checks (version
//! negotiation, framing limits, acks=0, long poll, ListOffsets), and real clients as
//! users run them: kcat (librdkafka), kafka-python and confluent-kafka, each with every
//! compression codec, installed by `.ci/run`. A test whose client is not installed
//! says so and passes without running.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    fetch_request, list_offsets_request, produce_request, ApiKey, ApiVersionsRequest,
    ApiVersionsResponse, FetchRequest, FetchResponse, ListOffsetsRequest, ListOffsetsResponse,
    MetadataRequest, MetadataResponse, ProduceRequest, RequestHeader, ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use strata_proto::v1;
use strata_storage::batch::BatchBuilder;
use strata_storage::compression::Compression;
use tokio_stream::StreamExt;

use crate::common::{create_topic, produce_records, read_partition, record, Broker};

/// Guard against a hang of a raw socket read; nothing asserts on time.
const READ_GUARD: Duration = Duration::from_secs(120);

fn start() -> (Broker, SocketAddr) {
    start_with(&[])
}

/// A broker with the Kafka listener on and `args` besides, and its Kafka address.
fn start_with(args: &[&str]) -> (Broker, SocketAddr) {
    let mut all = vec!["--kafka-listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let broker = Broker::start_with(&all);
    let kafka = broker
        .kafka_addr()
        .expect("the broker prints its Kafka address");
    (broker, kafka)
}

/// Creates `topic` with `partitions` partitions and the default settings.
async fn create(broker: &Broker, topic: &str, partitions: u32) {
    create_topic(
        &mut broker.admin().await,
        topic,
        partitions,
        v1::TopicConfig::default(),
    )
    .await;
}

/// A Kafka connection speaking the protocol with the crate's client-side codecs.
struct Raw {
    stream: TcpStream,
    correlation: i32,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).expect("connect to the Kafka listener");
        stream.set_read_timeout(Some(READ_GUARD)).expect("timeout");
        Raw {
            stream,
            correlation: 0,
        }
    }

    /// Sends a request; returns its correlation id.
    fn send<R: Encodable>(&mut self, api: ApiKey, version: i16, request: &R) -> i32 {
        self.correlation += 1;
        let header = RequestHeader::default()
            .with_request_api_key(api as i16)
            .with_request_api_version(version)
            .with_correlation_id(self.correlation)
            .with_client_id(Some(StrBytes::from_static_str("strata-test")));
        let mut body = BytesMut::new();
        header
            .encode(&mut body, api.request_header_version(version))
            .expect("encode header");
        request.encode(&mut body, version).expect("encode request");
        self.send_frame(&body);
        self.correlation
    }

    fn send_frame(&mut self, body: &[u8]) {
        let mut frame = Vec::with_capacity(body.len() + 4);
        frame.put_i32(body.len() as i32);
        frame.extend_from_slice(body);
        self.stream.write_all(&frame).expect("send");
    }

    /// The next response frame, `None` once the broker closed the connection.
    fn frame(&mut self) -> Option<Bytes> {
        let mut size = [0u8; 4];
        if self.stream.read_exact(&mut size).is_err() {
            return None;
        }
        let mut frame = vec![0u8; i32::from_be_bytes(size) as usize];
        self.stream.read_exact(&mut frame).ok()?;
        Some(frame.into())
    }

    /// Reads the next response: its correlation id and body.
    fn receive<T: Decodable>(&mut self, api: ApiKey, version: i16) -> (i32, T) {
        let mut frame = self.frame().expect("a response");
        let header = ResponseHeader::decode(&mut frame, api.response_header_version(version))
            .expect("decode the response header");
        let body = T::decode(&mut frame, version).expect("decode the response");
        assert!(!frame.has_remaining(), "{api:?} v{version}: trailing bytes");
        (header.correlation_id, body)
    }

    fn call<R: Encodable, T: Decodable>(&mut self, api: ApiKey, version: i16, request: &R) -> T {
        let sent = self.send(api, version, request);
        let (correlation, body) = self.receive(api, version);
        assert_eq!(correlation, sent, "{api:?}: answered out of order");
        body
    }
}

fn name(s: &str) -> TopicName {
    TopicName(StrBytes::from_string(s.to_string()))
}

#[test]
fn api_versions_lists_the_supported_ranges_and_a_too_new_request_gets_them_in_v0() {
    let (_broker, kafka) = start();
    let mut raw = Raw::connect(kafka);
    for version in 0..=4 {
        let answer: ApiVersionsResponse =
            raw.call(ApiKey::ApiVersions, version, &ApiVersionsRequest::default());
        assert_eq!(answer.error_code, 0, "v{version}");
        let produce = answer
            .api_keys
            .iter()
            .find(|k| k.api_key == ApiKey::Produce as i16)
            .expect("Produce is listed");
        // Listed from v0 so that librdkafka before 2.11.1 compresses (versions.rs);
        // served from v3.
        assert_eq!((produce.min_version, produce.max_version), (0, 9));
    }
    // A version above the broker's: a v0 body with UNSUPPORTED_VERSION and the ranges,
    // after a v0 header (no tagged fields), whatever the request's version.
    raw.correlation = 41;
    let mut body = BytesMut::new();
    body.put_i16(ApiKey::ApiVersions as i16);
    body.put_i16(99);
    body.put_i32(42);
    body.put_i16(-1); // null client id
    body.put_u8(0); // tagged fields of a flexible header
    raw.send_frame(&body);
    let mut frame = raw.frame().expect("an answer, not a closed connection");
    assert_eq!(frame.get_i32(), 42, "the correlation id, then the v0 body");
    let answer = ApiVersionsResponse::decode(&mut frame, 0).expect("a v0 body");
    assert_eq!(answer.error_code, 35, "UNSUPPORTED_VERSION");
    assert!(answer
        .api_keys
        .iter()
        .any(|k| k.api_key == ApiKey::Fetch as i16 && k.max_version == 12));
}

#[test]
fn unsupported_malformed_and_oversized_requests_close_only_their_connection() {
    let (_broker, kafka) = start();
    // A version the broker does not serve (Produce v2 is listed, for librdkafka, but
    // not served): no answer the client could parse exists.
    let mut raw = Raw::connect(kafka);
    let mut body = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(ApiKey::Produce as i16)
        .with_request_api_version(2)
        .with_correlation_id(1)
        .encode(&mut body, 1)
        .expect("header");
    body.put_slice(&[0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0]);
    raw.send_frame(&body);
    assert!(raw.frame().is_none(), "connection closed");
    // A key no Kafka version has.
    let mut raw = Raw::connect(kafka);
    raw.send_frame(&[0x7f, 0x00, 0, 0, 0, 0, 0, 1, 0xff, 0xff]);
    assert!(raw.frame().is_none(), "connection closed");
    // A frame larger than the limit is refused before its bytes are read.
    let mut raw = Raw::connect(kafka);
    raw.stream
        .write_all(&(1i32 << 30).to_be_bytes())
        .expect("send");
    assert!(raw.frame().is_none(), "connection closed");
    // A body the codec cannot read.
    let mut raw = Raw::connect(kafka);
    let mut body = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(ApiKey::Metadata as i16)
        .with_request_api_version(4)
        .with_correlation_id(1)
        .encode(&mut body, 1)
        .expect("header");
    body.put_i32(5); // five topics, none sent
    raw.send_frame(&body);
    assert!(raw.frame().is_none(), "connection closed");
    // A 20-byte Produce claiming two billion topics (the codec would reserve room for
    // them all and abort the process).
    let mut raw = Raw::connect(kafka);
    let mut body = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(ApiKey::Produce as i16)
        .with_request_api_version(3)
        .with_correlation_id(1)
        .encode(&mut body, 1)
        .expect("header");
    body.put_i16(-1);
    body.put_i16(1);
    body.put_i32(1000);
    body.put_i32(i32::MAX);
    raw.send_frame(&body);
    assert!(raw.frame().is_none(), "connection closed");
    // A valid Fetch padded to 1 MiB: it would hold that much of the request budget
    // for a few bytes of request.
    let mut raw = Raw::connect(kafka);
    let mut body = BytesMut::new();
    RequestHeader::default()
        .with_request_api_key(ApiKey::Fetch as i16)
        .with_request_api_version(11)
        .with_correlation_id(1)
        .encode(&mut body, ApiKey::Fetch.request_header_version(11))
        .expect("header");
    fetch("padded", 0, 0).encode(&mut body, 11).expect("fetch");
    body.put_bytes(0, 1 << 20);
    raw.send_frame(&body);
    assert!(raw.frame().is_none(), "connection closed");
    // The broker still serves everyone else.
    let mut raw = Raw::connect(kafka);
    let metadata: MetadataResponse = raw.call(
        ApiKey::Metadata,
        1,
        &MetadataRequest::default().with_topics(None),
    );
    assert_eq!(metadata.brokers.len(), 1);
    assert_eq!(metadata.brokers[0].port, i32::from(kafka.port()));
    assert_eq!(metadata.brokers[0].host.as_str(), "127.0.0.1");
}

/// One record batch as a Kafka producer sends it.
fn batch(records: &[(i64, &[u8])]) -> Bytes {
    let mut builder = BatchBuilder::new();
    for (timestamp, value) in records {
        builder.push(*timestamp, None, Some(value), &[]);
    }
    builder.finish().into()
}

fn produce_request(topic: &str, acks: i16, batch: Bytes) -> ProduceRequest {
    ProduceRequest::default()
        .with_acks(acks)
        .with_timeout_ms(30_000)
        .with_topic_data(vec![produce_request::TopicProduceData::default()
            .with_name(name(topic))
            .with_partition_data(vec![
                produce_request::PartitionProduceData::default()
                    .with_index(0)
                    .with_records(Some(batch)),
            ])])
}

fn fetch(topic: &str, offset: i64, max_wait_ms: i32) -> FetchRequest {
    FetchRequest::default()
        .with_max_wait_ms(max_wait_ms)
        .with_min_bytes(1)
        .with_max_bytes(1 << 20)
        .with_isolation_level(1)
        .with_topics(vec![fetch_request::FetchTopic::default()
            .with_topic(name(topic))
            .with_partitions(vec![fetch_request::FetchPartition::default()
                .with_partition(0)
                .with_fetch_offset(offset)
                .with_partition_max_bytes(1 << 20)])])
}

#[tokio::test]
async fn produce_acks_zero_gets_no_answer_and_a_long_poll_fetch_returns_new_data() {
    let (broker, kafka) = start();
    create(&broker, "polled", 1).await;
    let mut raw = Raw::connect(kafka);
    // acks=0 then a Metadata: the first answer on the wire is the Metadata's.
    raw.send(
        ApiKey::Produce,
        7,
        &produce_request("polled", 0, batch(&[(1, b"quiet")])),
    );
    let metadata: MetadataResponse = raw.call(
        ApiKey::Metadata,
        4,
        &MetadataRequest::default().with_topics(None),
    );
    assert_eq!(metadata.topics.len(), 1);
    // read_committed at the end of the log waits; a record produced meanwhile ends it.
    let sent = raw.send(ApiKey::Fetch, 11, &fetch("polled", 1, 60_000));
    let mut client = broker.client().await;
    client
        .produce(produce_records("polled", 0, vec![record(None, b"late")]))
        .await
        .expect("produce over gRPC");
    let (correlation, answer): (i32, FetchResponse) = raw.receive(ApiKey::Fetch, 11);
    assert_eq!(correlation, sent);
    let partition = &answer.responses[0].partitions[0];
    assert_eq!(partition.error_code, 0);
    assert_eq!(partition.high_watermark, 2);
    assert_eq!(partition.last_stable_offset, 2, "LSO = high watermark");
    let records =
        crate::common::decode_batches(partition.records.as_deref().unwrap_or_default(), 1);
    let values: Vec<_> = records.iter().map(|r| r.value.clone()).collect();
    assert_eq!(values, vec![Some(b"late".to_vec())]);
    // A fetch past the end: OFFSET_OUT_OF_RANGE with the bounds filled in.
    let answer: FetchResponse = raw.call(ApiKey::Fetch, 5, &fetch("polled", 7, 0));
    let partition = &answer.responses[0].partitions[0];
    assert_eq!(partition.error_code, 1);
    assert_eq!(
        (partition.high_watermark, partition.log_start_offset),
        (2, 0)
    );
}

#[tokio::test]
async fn list_offsets_finds_earliest_latest_and_by_timestamp() {
    let (broker, kafka) = start();
    create(&broker, "timed", 1).await;
    let mut raw = Raw::connect(kafka);
    let produced: kafka_protocol::messages::ProduceResponse = raw.call(
        ApiKey::Produce,
        9,
        &produce_request("timed", -1, batch(&[(100, b"a"), (200, b"b"), (300, b"c")])),
    );
    let stored = &produced.responses[0].partition_responses[0];
    assert_eq!((stored.error_code, stored.base_offset), (0, 0));
    let ask = |timestamp: i64| {
        ListOffsetsRequest::default()
            .with_replica_id((-1).into())
            .with_topics(vec![list_offsets_request::ListOffsetsTopic::default()
                .with_name(name("timed"))
                .with_partitions(vec![
                    list_offsets_request::ListOffsetsPartition::default()
                        .with_partition_index(0)
                        .with_timestamp(timestamp),
                ])])
    };
    for (timestamp, offset, found) in [
        (-2, 0, -1),
        (-1, 3, -1),
        (50, 0, 100),
        (150, 1, 200),
        (300, 2, 300),
        (301, -1, -1),
    ] {
        let answer: ListOffsetsResponse = raw.call(ApiKey::ListOffsets, 5, &ask(timestamp));
        let p = &answer.topics[0].partitions[0];
        assert_eq!(
            (p.error_code, p.offset, p.timestamp),
            (0, offset, found),
            "timestamp {timestamp}"
        );
    }
    let answer: ListOffsetsResponse = raw.call(
        ApiKey::ListOffsets,
        1,
        &ListOffsetsRequest::default().with_topics(vec![
            list_offsets_request::ListOffsetsTopic::default()
                .with_name(name("nope"))
                .with_partitions(vec![list_offsets_request::ListOffsetsPartition::default()]),
        ]),
    );
    assert_eq!(
        answer.topics[0].partitions[0].error_code, 3,
        "UNKNOWN_TOPIC_OR_PARTITION"
    );
    // Kafka requests are timed like gRPC ones, under listener="kafka".
    let http = broker.http_addr().expect("an HTTP listener");
    let (status, metrics) = crate::common::http_get(http, "/metrics").await;
    assert_eq!(status, 200);
    for (rpc, count) in [("Produce", 1), ("ListOffsets", 7)] {
        let line = format!(
            "strata_request_duration_seconds_count{{listener=\"kafka\",rpc=\"{rpc}\"}} {count}"
        );
        assert!(metrics.lines().any(|l| l == line), "{line} in:\n{metrics}");
    }
    // And its error answers are counted like gRPC's, with the Kafka error's name.
    let rejected = "strata_rejected_requests_total{listener=\"kafka\",rpc=\"ListOffsets\",\
                    code=\"UNKNOWN_TOPIC_OR_PARTITION\",reason=\"topic_not_found\"} 1";
    assert!(
        metrics.lines().any(|l| l == rejected),
        "{rejected} in:\n{metrics}"
    );
}

/// The kcat binary, or `None` (with a message) when it is not installed.
fn kcat() -> Option<&'static str> {
    let found = Command::new("kcat")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("kcat is not installed (.ci/run installs it from Debian's packages): skipped");
    }
    found.then_some("kcat")
}

/// Runs kcat with `args` against `kafka`, feeding it `input`; its standard output.
fn run_kcat(kafka: SocketAddr, args: &[&str], input: &str) -> String {
    let mut child = Command::new("timeout")
        .args(["120", "kcat", "-b", &kafka.to_string()])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kcat");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write to kcat");
    let output = child.wait_with_output().expect("kcat ends");
    assert!(
        output.status.success(),
        "kcat {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

#[tokio::test]
async fn kcat_produces_with_and_without_keys_and_consumes_from_earliest() {
    if kcat().is_none() {
        return;
    }
    let (broker, kafka) = start();
    create(&broker, "orders", 2).await;
    run_kcat(
        kafka,
        &["-P", "-t", "orders", "-K:"],
        "k1:v1\nk2:v2\nk1:v3\n",
    );
    run_kcat(
        kafka,
        &["-P", "-t", "orders", "-p", "1"],
        "plain1\nplain2\n",
    );
    let out = run_kcat(
        kafka,
        &[
            "-C",
            "-t",
            "orders",
            "-o",
            "beginning",
            "-e",
            "-q",
            "-f",
            "%p|%o|%k|%s\n",
        ],
        "",
    );
    let mut lines: Vec<&str> = out.lines().collect();
    lines.sort();
    assert_eq!(lines.len(), 5, "{out}");
    assert!(lines.iter().any(|l| l.ends_with("||plain1")), "{out}");
    assert!(lines.iter().any(|l| l.ends_with("||plain2")), "{out}");
    // One key, one partition, in order.
    let k1: Vec<&str> = lines
        .iter()
        .filter(|l| l.contains("|k1|"))
        .copied()
        .collect();
    assert_eq!(k1.len(), 2, "{out}");
    assert_eq!(k1[0].split('|').next(), k1[1].split('|').next(), "{out}");
    assert!(k1[0].ends_with("v1") && k1[1].ends_with("v3"), "{out}");
    // As a group member (-G): everything from the beginning once, committing.
    let group = ["-G", "kcat-group", "orders", "-e", "-q", "-f", "%s\n"];
    let first = run_kcat(kafka, &[&group[..], &["-o", "beginning"]].concat(), "");
    assert_eq!(first.lines().count(), 5, "{first}");
    // A record produced meanwhile to a partition it committed: the group resumes at its
    // commits and reads only it
    // (without them it would start at the end and read nothing).
    run_kcat(kafka, &["-P", "-t", "orders", "-p", "1"], "later\n");
    assert_eq!(
        run_kcat(kafka, &group, ""),
        "later\n",
        "resumed after the commits"
    );
    // The same records over gRPC: the unkeyed ones have a null key.
    let mut client = broker.client().await;
    let mut all = read_partition(&mut client, "orders", 0).await;
    all.extend(read_partition(&mut client, "orders", 1).await);
    assert_eq!(all.len(), 6);
    assert_eq!(all.iter().filter(|r| r.key.is_none()).count(), 3);
}

#[tokio::test]
async fn a_record_keeps_its_key_and_headers_from_grpc_to_kcat_and_back() {
    if kcat().is_none() {
        return;
    }
    let (broker, kafka) = start();
    create(&broker, "mixed", 1).await;
    let mut client = broker.client().await;
    let mut from_grpc = record(Some(b"order-1"), b"placed");
    from_grpc.headers = vec![
        v1::Header {
            key: "trace".into(),
            value: b"abc".to_vec().into(),
        },
        v1::Header {
            key: "source".into(),
            value: b"grpc".to_vec().into(),
        },
    ];
    client
        .produce(produce_records("mixed", 0, vec![from_grpc]))
        .await
        .expect("produce over gRPC");
    let out = run_kcat(
        kafka,
        &[
            "-C",
            "-t",
            "mixed",
            "-o",
            "beginning",
            "-e",
            "-q",
            "-f",
            "%k|%s|%h\n",
        ],
        "",
    );
    assert_eq!(out, "order-1|placed|trace=abc,source=grpc\n");

    run_kcat(
        kafka,
        &[
            "-P",
            "-t",
            "mixed",
            "-k",
            "order-2",
            "-H",
            "trace=def",
            "-H",
            "source=kcat",
        ],
        "paid\n",
    );
    let records = read_partition(&mut client, "mixed", 0).await;
    assert_eq!(records.len(), 2);
    assert_eq!(records[1].key.as_deref(), Some(&b"order-2"[..]));
    assert_eq!(records[1].value.as_deref(), Some(&b"paid"[..]));
    assert_eq!(
        records[1].headers,
        vec![
            ("trace".to_string(), b"def".to_vec()),
            ("source".to_string(), b"kcat".to_vec())
        ]
    );
}

/// The Python of the Kafka tests, `KAFKA_TEST_PYTHON` (set by .ci/run to its venv) or
/// `python3`, if it can run `import {modules}`; `None` (with a message naming `what`)
/// otherwise.
fn python_with(modules: &str, what: &str) -> Option<String> {
    let python = std::env::var("KAFKA_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let found = Command::new(&python)
        .args(["-c", &format!("import {modules}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("{what} is not installed (.ci/run installs it in a venv): skipped");
    }
    found.then_some(python)
}

/// A Python with kafka-python, or `None` (with a message).
fn kafka_python() -> Option<String> {
    python_with("kafka", "kafka-python")
}

/// A Python with confluent-kafka, or `None` (with a message).
fn confluent_kafka() -> Option<String> {
    python_with("confluent_kafka", "confluent-kafka")
}

/// Runs `script` with `args` under `python`, killed after `limit_secs` seconds (a guard
/// against a hang; nothing asserts on time); asserts that it succeeded and returns its
/// standard output.
fn run_python(python: &str, limit_secs: u32, script: &str, args: &[&str]) -> String {
    let output = Command::new("timeout")
        .args([&limit_secs.to_string(), python, "-c", script])
        .args(args)
        .output()
        .expect("run python");
    assert!(
        output.status.success(),
        "python {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("utf-8")
}

const KAFKA_PYTHON_ROUND_TRIP: &str = r#"
import sys
from kafka import KafkaProducer, KafkaConsumer, TopicPartition
b, t, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
p = KafkaProducer(bootstrap_servers=b, acks='all')
for i in range(n):
    p.send(t, key=b'k%d' % (i % 3), value=b'v%d' % i, headers=[('h', b'x%d' % i)])
p.flush()
p.close()
c = KafkaConsumer(bootstrap_servers=b, auto_offset_reset='earliest',
                  enable_auto_commit=False, consumer_timeout_ms=60000)
c.assign([TopicPartition(t, q) for q in sorted(c.partitions_for_topic(t))])
c.seek_to_beginning()
got = []
for m in c:
    got.append(m)
    if len(got) == n:
        break
c.close()
for m in sorted(got, key=lambda m: int(m.value[1:])):
    print(m.key.decode(), m.value.decode(), m.headers[0][0], m.headers[0][1].decode())
"#;

#[tokio::test]
async fn kafka_python_produces_and_consumes() {
    let Some(python) = kafka_python() else {
        return;
    };
    let (broker, kafka) = start();
    create(&broker, "py", 3).await;
    let out = run_python(
        &python,
        180,
        KAFKA_PYTHON_ROUND_TRIP,
        &[&kafka.to_string(), "py", "12"],
    );
    let expected: String = (0..12)
        .map(|i| format!("k{} v{i} h x{i}\n", i % 3))
        .collect();
    assert_eq!(out, expected);
    // Over gRPC too: every record, each key in one partition.
    let mut client = broker.client().await;
    let mut total = 0;
    for p in 0..3 {
        let records = read_partition(&mut client, "py", p).await;
        let mut keys: Vec<_> = records.iter().map(|r| r.key.clone()).collect();
        keys.dedup();
        keys.sort();
        keys.dedup();
        total += records.len();
        for key in keys {
            let values: Vec<u32> = records
                .iter()
                .filter(|r| r.key == key)
                .map(|r| {
                    String::from_utf8_lossy(&r.value.clone().unwrap_or_default()[1..])
                        .parse()
                        .expect("a number")
                })
                .collect();
            assert!(
                values.windows(2).all(|w| w[0] < w[1]),
                "per-key order: {values:?}"
            );
        }
    }
    assert_eq!(total, 12);
    // A group member (subscribe, JoinGroup/SyncGroup) reads everything and commits.
    assert_eq!(
        run_python(
            &python,
            180,
            KAFKA_PYTHON_GROUP,
            &[&kafka.to_string(), "py", "12"]
        ),
        "12 3\n"
    );
    let described = broker
        .admin()
        .await
        .describe_group(v1::DescribeGroupRequest {
            group: "py-group".into(),
        })
        .await
        .expect("describe")
        .into_inner();
    let committed: u64 = described
        .partitions
        .iter()
        .filter_map(|p| p.committed_offset)
        .sum();
    assert_eq!((committed, described.total_lag), (12, 0));
}

const KAFKA_PYTHON_GROUP: &str = r#"
import sys
from kafka import KafkaConsumer
b, t, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
c = KafkaConsumer(t, bootstrap_servers=b, group_id='py-group', auto_offset_reset='earliest',
                  enable_auto_commit=False, consumer_timeout_ms=60000)
got = []
for m in c:
    got.append(m)
    if len(got) == n:
        break
c.commit()
print(len(got), len(c.assignment()))
c.close()
"#;

const CONFLUENT_IDEMPOTENT_ROUND_TRIP: &str = r#"
import sys
from confluent_kafka import Producer, Consumer, TopicPartition
b, t, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
errors = []
def report(err, msg):
    if err is not None:
        errors.append(str(err))
p = Producer({'bootstrap.servers': b, 'enable.idempotence': True, 'acks': 'all',
              'linger.ms': 5})
for i in range(n):
    p.produce(t, key=b'k%d' % (i % 3), value=b'v%d' % i, headers=[('h', b'x%d' % i)],
              on_delivery=report)
left = p.flush(60)
assert left == 0 and not errors, (left, errors)
# librdkafka's default isolation level is read_committed.
c = Consumer({'bootstrap.servers': b, 'group.id': 'strata-test', 'enable.auto.commit': False})
md = c.list_topics(t, timeout=30)
c.assign([TopicPartition(t, q, 0) for q in sorted(md.topics[t].partitions)])
got = []
while len(got) < n:
    m = c.poll(60)
    if m is None:
        break
    if m.error():
        continue
    got.append(m)
c.close()
for m in sorted(got, key=lambda m: int(m.value()[1:])):
    print(m.key().decode(), m.value().decode(), m.headers()[0][0], m.headers()[0][1].decode())
"#;

#[tokio::test]
async fn an_idempotent_confluent_kafka_producer_writes_each_record_once() {
    let Some(python) = confluent_kafka() else {
        return;
    };
    let (broker, kafka) = start();
    create(&broker, "idem", 2).await;
    let out = run_python(
        &python,
        180,
        CONFLUENT_IDEMPOTENT_ROUND_TRIP,
        &[&kafka.to_string(), "idem", "30"],
    );
    let expected: String = (0..30)
        .map(|i| format!("k{} v{i} h x{i}\n", i % 3))
        .collect();
    assert_eq!(out, expected);
    // The batches carry the producer id the broker handed out.
    let mut client = broker.client().await;
    let mut ids = Vec::new();
    for partition in 0..2 {
        let answer = client
            .fetch(crate::common::fetch_request("idem", partition, 0, false))
            .await
            .expect("fetch")
            .into_inner();
        for batch in strata_storage::batch::batches(&answer.batches) {
            ids.push(batch.expect("a valid batch").header().producer_id);
        }
    }
    assert!(!ids.is_empty() && ids.iter().all(|&id| id >= 0), "{ids:?}");
}

/// Consumes `take` records of partition 0 as a member of `group` that assigns the
/// partition itself (starting at the group's committed offset, else the earliest),
/// commits after the last one when told to, and prints what it saw.
const CONFLUENT_ASSIGN_AND_COMMIT: &str = r#"
import sys
from confluent_kafka import Consumer, TopicPartition
b, t, group, take, commit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == 'commit'
c = Consumer({'bootstrap.servers': b, 'group.id': group, 'enable.auto.commit': False,
              'auto.offset.reset': 'earliest'})
c.assign([TopicPartition(t, 0)])
got = []
while len(got) < take:
    m = c.poll(60)
    if m is None:
        break
    if m.error():
        print('error', m.error(), file=sys.stderr)
        continue
    got.append(m)
print('consumed', ' '.join(str(m.offset()) for m in got))
if commit and got:
    c.commit(message=got[-1], asynchronous=False)
print('committed', c.committed([TopicPartition(t, 0)], timeout=30)[0].offset)
c.close()
"#;

#[tokio::test]
async fn kafka_commits_are_the_groups_offsets_and_resets_over_grpc_move_kafka_consumers() {
    let Some(python) = confluent_kafka() else {
        return;
    };
    let (broker, kafka) = start();
    let mut admin = broker.admin().await;
    create_topic(&mut admin, "ledger", 1, v1::TopicConfig::default()).await;
    let records = (0..10)
        .map(|i| record(None, format!("r{i}").as_bytes()))
        .collect();
    broker
        .client()
        .await
        .produce(produce_records("ledger", 0, records))
        .await
        .expect("produce");
    let consume = |take: &str, commit: &str| {
        run_python(
            &python,
            120,
            CONFLUENT_ASSIGN_AND_COMMIT,
            &[&kafka.to_string(), "ledger", "billing", take, commit],
        )
    };
    assert_eq!(consume("4", "commit"), "consumed 0 1 2 3\ncommitted 4\n");
    // A new consumer of the group resumes at the committed offset.
    assert_eq!(consume("1", "no"), "consumed 4\ncommitted 4\n");
    // The commit is the group's, as the CLI, lag and gRPC see it.
    let described = admin
        .describe_group(v1::DescribeGroupRequest {
            group: "billing".into(),
        })
        .await
        .expect("describe the group")
        .into_inner();
    assert_eq!(described.partitions.len(), 1);
    assert_eq!(described.partitions[0].committed_offset, Some(4));
    assert_eq!(described.total_lag, 6);
    // And the other way round: a reset over gRPC moves the Kafka consumer.
    admin
        .reset_offsets(v1::ResetOffsetsRequest {
            group: "billing".into(),
            topic: "ledger".into(),
            partitions: vec![0],
            to: Some(v1::reset_offsets_request::To::Offset(7)),
        })
        .await
        .expect("reset over gRPC");
    assert_eq!(consume("1", "no"), "consumed 7\ncommitted 7\n");
}

#[tokio::test]
async fn fetch_returns_at_least_one_whole_batch_then_only_batches_that_fit() {
    let (broker, kafka) = start();
    create(&broker, "sized", 2).await;
    let mut raw = Raw::connect(kafka);
    for partition in 0..2 {
        let mut request = produce_request("sized", -1, batch(&[(1, &[7u8; 500][..])]));
        request.topic_data[0].partition_data[0].index = partition;
        let answer: kafka_protocol::messages::ProduceResponse =
            raw.call(ApiKey::Produce, 8, &request);
        assert_eq!(answer.responses[0].partition_responses[0].error_code, 0);
    }
    let mut request = fetch("sized", 0, 0);
    request.max_bytes = 1;
    let mut second = request.topics[0].partitions[0].clone();
    second.partition = 1;
    request.topics[0].partitions.push(second);
    let answer: FetchResponse = raw.call(ApiKey::Fetch, 12, &request);
    let partitions = &answer.responses[0].partitions;
    let records = |i: usize| {
        crate::common::decode_batches(partitions[i].records.as_deref().unwrap_or_default(), 0)
    };
    assert_eq!(
        records(0).len(),
        1,
        "the first batch is whole, above max_bytes"
    );
    assert_eq!(records(1).len(), 0, "then nothing past max_bytes");
    assert_eq!(
        (partitions[1].error_code, partitions[1].high_watermark),
        (0, 1)
    );
    // With room for both, both come back.
    request.max_bytes = 1 << 20;
    let answer: FetchResponse = raw.call(ApiKey::Fetch, 12, &request);
    for p in &answer.responses[0].partitions {
        let records = crate::common::decode_batches(p.records.as_deref().unwrap_or_default(), 0);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].value.as_deref(), Some(&[7u8; 500][..]));
    }
}

#[test]
fn apis_the_broker_does_not_serve_are_answered_as_not_supported() {
    use kafka_protocol::messages::{
        ConsumerGroupHeartbeatRequest, ConsumerGroupHeartbeatResponse, SaslHandshakeRequest,
        SaslHandshakeResponse,
    };
    let (_broker, kafka) = start();
    let mut raw = Raw::connect(kafka);
    // A KIP-848 consumer (group.protocol=consumer) starts with ConsumerGroupHeartbeat.
    let answer: ConsumerGroupHeartbeatResponse = raw.call(
        ApiKey::ConsumerGroupHeartbeat,
        0,
        &ConsumerGroupHeartbeatRequest::default(),
    );
    assert_eq!(answer.error_code, 35, "UNSUPPORTED_VERSION");
    let answer: SaslHandshakeResponse = raw.call(
        ApiKey::SaslHandshake,
        1,
        &SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str("PLAIN")),
    );
    assert_eq!(answer.error_code, 33, "UNSUPPORTED_SASL_MECHANISM");
    // The connection goes on.
    let answer: ApiVersionsResponse =
        raw.call(ApiKey::ApiVersions, 3, &ApiVersionsRequest::default());
    assert_eq!(answer.error_code, 0);
    assert!(
        !answer
            .api_keys
            .iter()
            .any(|k| k.api_key == ApiKey::ConsumerGroupHeartbeat as i16),
        "not advertised"
    );
}

/// Two members of one group through a rebalance: the first gets every partition, the
/// second joins and they split them; each commits what it consumed and leaves. Then a
/// third member resumes from the commits and gets only what was produced since.
const CONFLUENT_GROUP_REBALANCE: &str = r#"
import sys
from confluent_kafka import Consumer, TopicPartition
b, t, group, n, phase = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
conf = {'bootstrap.servers': b, 'group.id': group, 'enable.auto.commit': False,
        'auto.offset.reset': 'earliest', 'session.timeout.ms': 6000,
        'heartbeat.interval.ms': 500}
got = []
seen = {}
def drain(c):
    m = c.poll(0.2)
    if m is not None and not m.error():
        got.append(m.value().decode())
        seen.setdefault(id(c), {})[m.partition()] = m.offset()
def commit(c):
    offsets = [TopicPartition(t, p, o + 1) for p, o in seen.get(id(c), {}).items()]
    if offsets:
        c.commit(offsets=offsets, asynchronous=False)
def assigned(c):
    return sorted(p.partition for p in c.assignment())
if phase == 'rebalance':
    c1 = Consumer(conf)
    c1.subscribe([t])
    for _ in range(300):
        drain(c1)
        if len(assigned(c1)) == 4:
            break
    print('alone', assigned(c1))
    c2 = Consumer(conf)
    c2.subscribe([t])
    for _ in range(600):
        drain(c1); drain(c2)
        if assigned(c1) and assigned(c2) and len(assigned(c1)) + len(assigned(c2)) == 4:
            break
    print('split', len(assigned(c1)) + len(assigned(c2)), bool(assigned(c1)), bool(assigned(c2)))
    for _ in range(600):
        if len(set(got)) >= n:
            break
        drain(c1); drain(c2)
    commit(c1); commit(c2)
    c1.close(); c2.close()
else:
    c3 = Consumer(conf)
    c3.subscribe([t])
    for _ in range(600):
        if len(set(got)) >= n:
            break
        drain(c3)
    c3.close()
print('records', ' '.join(sorted(set(got))))
"#;

#[tokio::test]
async fn a_kafka_group_of_two_rebalances_commits_and_resumes_where_it_left_off() {
    let Some(python) = confluent_kafka() else {
        return;
    };
    let (broker, kafka) = start();
    let mut admin = broker.admin().await;
    create_topic(&mut admin, "events", 4, v1::TopicConfig::default()).await;
    let mut client = broker.client().await;
    let produce = |from: usize, to: usize| {
        (from..to)
            .map(|i| {
                produce_records(
                    "events",
                    (i % 4) as u32,
                    vec![record(None, format!("e{i:02}").as_bytes())],
                )
            })
            .collect::<Vec<_>>()
    };
    for request in produce(0, 20) {
        client.produce(request).await.expect("produce");
    }
    let run = |n: &str, phase: &str| {
        run_python(
            &python,
            300,
            CONFLUENT_GROUP_REBALANCE,
            &[&kafka.to_string(), "events", "workers", n, phase],
        )
    };
    let all: Vec<String> = (0..20).map(|i| format!("e{i:02}")).collect();
    assert_eq!(
        run("20", "rebalance"),
        format!(
            "alone [0, 1, 2, 3]\nsplit 4 True True\nrecords {}\n",
            all.join(" ")
        )
    );
    let described = admin
        .describe_group(v1::DescribeGroupRequest {
            group: "workers".into(),
        })
        .await
        .expect("describe")
        .into_inner();
    let committed: Vec<_> = described
        .partitions
        .iter()
        .map(|p| p.committed_offset)
        .collect();
    assert_eq!(
        committed,
        vec![Some(5); 4],
        "every partition committed to its end"
    );
    for request in produce(20, 24) {
        client.produce(request).await.expect("produce");
    }
    assert_eq!(run("4", "resume"), "records e20 e21 e22 e23\n");
}

#[tokio::test]
async fn metadata_creates_topics_only_when_the_broker_and_the_client_allow_it() {
    use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
    let ask = |topics: &[&str], allow: bool| {
        MetadataRequest::default()
            .with_topics(Some(
                topics
                    .iter()
                    .map(|t| MetadataRequestTopic::default().with_name(Some(name(t))))
                    .collect(),
            ))
            .with_allow_auto_topic_creation(allow)
    };
    let codes = |answer: &MetadataResponse| {
        answer
            .topics
            .iter()
            .map(|t| (t.error_code, t.partitions.len()))
            .collect::<Vec<_>>()
    };
    // Off by default.
    let (_broker, kafka) = start();
    let mut raw = Raw::connect(kafka);
    let answer: MetadataResponse = raw.call(ApiKey::Metadata, 4, &ask(&["fresh"], true));
    assert_eq!(codes(&answer), vec![(3, 0)], "UNKNOWN_TOPIC_OR_PARTITION");
    // On: created with the defaults when the client allows it.
    let broker = Broker::start_with(&[
        "--kafka-listen",
        "127.0.0.1:0",
        "--kafka-auto-create-topics",
        "true",
    ]);
    let mut raw = Raw::connect(broker.kafka_addr().expect("kafka"));
    let answer: MetadataResponse =
        raw.call(ApiKey::Metadata, 9, &ask(&["fresh", "bad name!"], true));
    assert_eq!(
        codes(&answer),
        vec![(0, 1), (17, 0)],
        "created; INVALID_TOPIC_EXCEPTION"
    );
    let answer: MetadataResponse = raw.call(ApiKey::Metadata, 9, &ask(&["other"], false));
    assert_eq!(codes(&answer), vec![(3, 0)], "the client did not allow it");
    let names = crate::common::topic_names(&mut broker.admin().await).await;
    assert_eq!(names, vec!["fresh".to_string()]);
}

#[tokio::test]
async fn describe_configs_shows_a_topics_settings_under_their_kafka_names() {
    use kafka_protocol::messages::{
        describe_configs_request::DescribeConfigsResource, DescribeConfigsRequest,
        DescribeConfigsResponse,
    };
    let (broker, kafka) = start();
    let config = v1::TopicConfig {
        retention_ms: Some(86_400_000),
        ..v1::TopicConfig::default()
    };
    create_topic(&mut broker.admin().await, "configured", 2, config).await;
    let mut raw = Raw::connect(kafka);
    let ask = |topic: &str, keys: Option<Vec<&'static str>>| {
        DescribeConfigsRequest::default().with_resources(vec![DescribeConfigsResource::default()
            .with_resource_type(2)
            .with_resource_name(StrBytes::from_string(topic.to_string()))
            .with_configuration_keys(
                keys.map(|k| k.into_iter().map(StrBytes::from_static_str).collect()),
            )])
    };
    for version in [1, 4] {
        let answer: DescribeConfigsResponse =
            raw.call(ApiKey::DescribeConfigs, version, &ask("configured", None));
        let result = &answer.results[0];
        assert_eq!(result.error_code, 0);
        let value = |name: &str| {
            result
                .configs
                .iter()
                .find(|c| c.name.as_str() == name)
                .and_then(|c| c.value.as_ref())
                .map(|v| v.to_string())
        };
        assert_eq!(
            value("retention.ms").as_deref(),
            Some("86400000"),
            "v{version}"
        );
        assert_eq!(value("cleanup.policy").as_deref(), Some("delete"));
        assert_eq!(value("max.message.bytes").as_deref(), Some("1048576"));
    }
    let answer: DescribeConfigsResponse = raw.call(
        ApiKey::DescribeConfigs,
        4,
        &ask("configured", Some(vec!["segment.bytes"])),
    );
    let names: Vec<_> = answer.results[0]
        .configs
        .iter()
        .map(|c| c.name.to_string())
        .collect();
    assert_eq!(names, vec!["segment.bytes"]);
    let answer: DescribeConfigsResponse =
        raw.call(ApiKey::DescribeConfigs, 4, &ask("missing", None));
    assert_eq!(
        answer.results[0].error_code, 3,
        "UNKNOWN_TOPIC_OR_PARTITION"
    );
}

#[tokio::test]
async fn a_group_is_used_by_one_protocol_at_a_time() {
    use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
    use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
    use kafka_protocol::messages::{
        GroupId, JoinGroupRequest, JoinGroupResponse, SyncGroupRequest, SyncGroupResponse,
    };
    let (broker, kafka) = start();
    create(&broker, "shared", 1).await;
    let join = |group: &str| {
        JoinGroupRequest::default()
            .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
            .with_session_timeout_ms(30_000)
            .with_rebalance_timeout_ms(30_000)
            .with_protocol_type(StrBytes::from_static_str("consumer"))
            .with_protocols(vec![JoinGroupRequestProtocol::default()
                .with_name(StrBytes::from_static_str("range"))
                .with_metadata(Bytes::from_static(
                    b"\0\0\0\0\0\x01\0\x06shared\0\0\0\0",
                ))])
    };
    let heartbeat = |group: &str| v1::HeartbeatRequest {
        group: group.into(),
        topics: vec!["shared".into()],
        client_id: "grpc".into(),
        ..v1::HeartbeatRequest::default()
    };
    let mut raw = Raw::connect(kafka);
    // A Kafka member first: a gRPC member cannot join.
    let joined: JoinGroupResponse = raw.call(ApiKey::JoinGroup, 5, &join("kafka-side"));
    assert_eq!((joined.error_code, joined.generation_id), (0, 1));
    // The leader assigns shared/0 to itself (consumer protocol v0).
    let assignment = Bytes::from_static(b"\0\0\0\0\0\x01\0\x06shared\0\0\0\x01\0\0\0\0\0\0\0\0");
    let synced: SyncGroupResponse = raw.call(
        ApiKey::SyncGroup,
        3,
        &SyncGroupRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("kafka-side")))
            .with_generation_id(1)
            .with_member_id(joined.member_id.clone())
            .with_assignments(vec![SyncGroupRequestAssignment::default()
                .with_member_id(joined.member_id.clone())
                .with_assignment(assignment.clone())]),
    );
    assert_eq!((synced.error_code, synced.assignment), (0, assignment));
    // The CLI's view (DescribeGroup over gRPC) shows the Kafka member and what it owns.
    let described = broker
        .admin()
        .await
        .describe_group(v1::DescribeGroupRequest {
            group: "kafka-side".into(),
        })
        .await
        .expect("describe")
        .into_inner();
    assert_eq!(described.members.len(), 1);
    assert_eq!(described.members[0].client_id, "strata-test");
    assert_eq!(described.members[0].topics, vec!["shared".to_string()]);
    assert_eq!(described.partitions.len(), 1);
    assert_eq!(described.partitions[0].member_id, joined.member_id.as_str());
    let mut groups = broker.groups().await;
    let refused = groups
        .heartbeat(heartbeat("kafka-side"))
        .await
        .expect_err("the group has Kafka members");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("Kafka protocol"), "{refused:?}");
    // Nor can an operator reset or delete it under its Kafka members.
    let mut admin = broker.admin().await;
    let reset = admin
        .reset_offsets(v1::ResetOffsetsRequest {
            group: "kafka-side".into(),
            topic: "shared".into(),
            partitions: Vec::new(),
            to: Some(v1::reset_offsets_request::To::Earliest(true)),
        })
        .await
        .expect_err("the group has Kafka members");
    assert_eq!(reset.code(), tonic::Code::FailedPrecondition, "{reset:?}");
    let deleted = admin
        .delete_group(v1::DeleteGroupRequest {
            group: "kafka-side".into(),
        })
        .await
        .expect_err("the group has Kafka members");
    assert_eq!(
        deleted.code(),
        tonic::Code::FailedPrecondition,
        "{deleted:?}"
    );
    // A gRPC member first: a Kafka member cannot join.
    groups
        .heartbeat(heartbeat("grpc-side"))
        .await
        .expect("a gRPC member joins");
    let joined: JoinGroupResponse = raw.call(ApiKey::JoinGroup, 5, &join("grpc-side"));
    assert_eq!(joined.error_code, 23, "INCONSISTENT_GROUP_PROTOCOL");
}

#[tokio::test]
async fn committed_offsets_of_a_kafka_group_with_members_do_not_expire() {
    use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
    use kafka_protocol::messages::offset_commit_request::{
        OffsetCommitRequestPartition, OffsetCommitRequestTopic,
    };
    use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
    use kafka_protocol::messages::{
        GroupId, JoinGroupRequest, JoinGroupResponse, OffsetCommitRequest, OffsetCommitResponse,
        SyncGroupRequest, SyncGroupResponse,
    };
    let (broker, kafka) = start_with(&[
        "--offsets-retention-ms",
        "1s",
        "--retention-check-ms",
        "100ms",
    ]);
    let mut admin = broker.admin().await;
    create_topic(&mut admin, "kept", 1, v1::TopicConfig::default()).await;
    let records = (0..3).map(|i| record(None, &[i])).collect();
    let mut data = broker.client().await;
    data.produce(produce_records("kept", 0, records))
        .await
        .expect("produce");
    // A Kafka member joins "members" (session 30 s: it stays a member for the whole
    // test without heartbeats), owns kept/0 and commits offset 2.
    let mut raw = Raw::connect(kafka);
    let joined: JoinGroupResponse = raw.call(
        ApiKey::JoinGroup,
        5,
        &JoinGroupRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("members")))
            .with_session_timeout_ms(30_000)
            .with_rebalance_timeout_ms(30_000)
            .with_protocol_type(StrBytes::from_static_str("consumer"))
            .with_protocols(vec![JoinGroupRequestProtocol::default()
                .with_name(StrBytes::from_static_str("range"))
                .with_metadata(Bytes::from_static(b"\0\0\0\0\0\x01\0\x04kept\0\0\0\0"))]),
    );
    assert_eq!(joined.error_code, 0);
    let assignment = Bytes::from_static(b"\0\0\0\0\0\x01\0\x04kept\0\0\0\x01\0\0\0\0\0\0\0\0");
    let synced: SyncGroupResponse = raw.call(
        ApiKey::SyncGroup,
        3,
        &SyncGroupRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("members")))
            .with_generation_id(joined.generation_id)
            .with_member_id(joined.member_id.clone())
            .with_assignments(vec![SyncGroupRequestAssignment::default()
                .with_member_id(joined.member_id.clone())
                .with_assignment(assignment)]),
    );
    assert_eq!(synced.error_code, 0);
    let committed: OffsetCommitResponse = raw.call(
        ApiKey::OffsetCommit,
        2,
        &OffsetCommitRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("members")))
            .with_generation_id_or_member_epoch(joined.generation_id)
            .with_member_id(joined.member_id.clone())
            .with_retention_time_ms(-1)
            .with_topics(vec![OffsetCommitRequestTopic::default()
                .with_name(name("kept"))
                .with_partitions(vec![OffsetCommitRequestPartition::default()
                    .with_partition_index(0)
                    .with_committed_offset(2)])]),
    );
    assert_eq!(committed.topics[0].partitions[0].error_code, 0);
    // A group without members commits after it: once its offsets expire, the retention
    // has passed for the Kafka group's commit too.
    let mut groups = broker.groups().await;
    groups
        .commit_offsets(v1::CommitOffsetsRequest {
            group: "empty".into(),
            offsets: vec![v1::PartitionOffset {
                topic: "kept".into(),
                partition: 0,
                offset: 1,
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .expect("a commit from outside the group");
    let describe = |group: &str| v1::DescribeGroupRequest {
        group: group.into(),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        match admin.describe_group(describe("empty")).await {
            Err(status) if status.code() == tonic::Code::NotFound => break,
            other => {
                other.expect("the empty group exists until its offsets expire");
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the empty group never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let described = admin
        .describe_group(describe("members"))
        .await
        .expect("the Kafka group is still there")
        .into_inner();
    assert_eq!(described.partitions.len(), 1);
    assert_eq!(described.partitions[0].committed_offset, Some(2));
}

/// A small request that repeats a topic, a partition or a group, or names one longer
/// than Kafka allows, would make the broker copy, spawn and answer far more than its
/// frame: each is refused (connection closed) before any work; a Produce to partitions
/// that do not exist is answered per partition without work.
#[tokio::test]
async fn requests_repeating_names_or_partitions_or_with_overlong_names_are_refused() {
    use kafka_protocol::messages::{
        offset_fetch_request, DescribeGroupsRequest, GroupId, OffsetFetchRequest,
    };
    let (broker, kafka) = start();
    create(&broker, "bounded", 2).await;
    let produce = |topic: &str, partitions: &[i32]| {
        ProduceRequest::default()
            .with_acks(1)
            .with_timeout_ms(30_000)
            .with_topic_data(vec![produce_request::TopicProduceData::default()
                .with_name(name(topic))
                .with_partition_data(
                    partitions
                        .iter()
                        .map(|&p| produce_request::PartitionProduceData::default().with_index(p))
                        .collect(),
                )])
    };
    let refused = |api: ApiKey, request: &dyn Fn(&mut Raw) -> i32| {
        let mut raw = Raw::connect(kafka);
        request(&mut raw);
        assert!(raw.frame().is_none(), "{api:?}: connection closed");
    };
    let long = "t".repeat(250);
    refused(ApiKey::Produce, &|raw| {
        raw.send(ApiKey::Produce, 9, &produce("bounded", &[0, 1, 0]))
    });
    refused(ApiKey::Produce, &|raw| {
        raw.send(ApiKey::Produce, 9, &produce(&long, &[0]))
    });
    // One more than a topic may have (16,384).
    let many: Vec<i32> = (0..16_385).collect();
    refused(ApiKey::Produce, &|raw| {
        raw.send(ApiKey::Produce, 9, &produce("absent", &many))
    });
    refused(ApiKey::Metadata, &|raw| {
        let topic = |n: &str| {
            kafka_protocol::messages::metadata_request::MetadataRequestTopic::default()
                .with_name(Some(name(n)))
        };
        raw.send(
            ApiKey::Metadata,
            4,
            &MetadataRequest::default().with_topics(Some(vec![topic("bounded"), topic("bounded")])),
        )
    });
    refused(ApiKey::OffsetFetch, &|raw| {
        raw.send(
            ApiKey::OffsetFetch,
            5,
            &OffsetFetchRequest::default()
                .with_group_id(GroupId(StrBytes::from_static_str("g")))
                .with_topics(Some(vec![
                    offset_fetch_request::OffsetFetchRequestTopic::default()
                        .with_name(name("bounded"))
                        .with_partition_indexes(vec![1, 1]),
                ])),
        )
    });
    refused(ApiKey::DescribeGroups, &|raw| {
        let g = GroupId(StrBytes::from_static_str("g"));
        raw.send(
            ApiKey::DescribeGroups,
            5,
            &DescribeGroupsRequest::default().with_groups(vec![g.clone(), g]),
        )
    });
    refused(ApiKey::DescribeGroups, &|raw| {
        let g = GroupId(StrBytes::from_string("g".repeat(256)));
        raw.send(
            ApiKey::DescribeGroups,
            5,
            &DescribeGroupsRequest::default().with_groups(vec![g]),
        )
    });
    refused(ApiKey::DescribeConfigs, &|raw| {
        use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
        use kafka_protocol::messages::DescribeConfigsRequest;
        let resource = DescribeConfigsResource::default()
            .with_resource_type(2)
            .with_resource_name(StrBytes::from_static_str("bounded"));
        raw.send(
            ApiKey::DescribeConfigs,
            4,
            &DescribeConfigsRequest::default().with_resources(vec![resource.clone(), resource]),
        )
    });
    refused(ApiKey::CreateTopics, &|raw| {
        use kafka_protocol::messages::create_topics_request::CreatableTopic;
        use kafka_protocol::messages::CreateTopicsRequest;
        let topic = CreatableTopic::default()
            .with_name(name("twice"))
            .with_num_partitions(1)
            .with_replication_factor(1);
        raw.send(
            ApiKey::CreateTopics,
            5,
            &CreateTopicsRequest::default().with_topics(vec![topic.clone(), topic]),
        )
    });
    // Partitions and topics that do not exist: each answered, the rest still written.
    let mut raw = Raw::connect(kafka);
    let answer: kafka_protocol::messages::ProduceResponse =
        raw.call(ApiKey::Produce, 9, &produce("absent", &[0, 1, 2]));
    let codes: Vec<i16> = answer.responses[0]
        .partition_responses
        .iter()
        .map(|p| p.error_code)
        .collect();
    assert_eq!(codes, vec![3, 3, 3], "UNKNOWN_TOPIC_OR_PARTITION");
    let mut request = produce("bounded", &[5, -1, 1]);
    request.topic_data[0].partition_data[2].records = Some(batch(&[(1, b"kept")]));
    let answer: kafka_protocol::messages::ProduceResponse = raw.call(ApiKey::Produce, 9, &request);
    let partitions = &answer.responses[0].partition_responses;
    assert_eq!(
        partitions.iter().map(|p| p.error_code).collect::<Vec<_>>(),
        vec![3, 3, 0]
    );
    assert_eq!(partitions[2].base_offset, 0);
}

/// The group keeps a member's protocol metadata and assignment for the member's life:
/// more than 1 MiB of either is refused (connection closed); what fits is kept.
#[tokio::test]
async fn group_metadata_and_assignments_over_one_mib_are_refused() {
    use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
    use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
    use kafka_protocol::messages::{
        GroupId, JoinGroupRequest, JoinGroupResponse, SyncGroupRequest, SyncGroupResponse,
    };
    let (_broker, kafka) = start();
    let join = |metadata: Bytes| {
        JoinGroupRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("sized")))
            .with_session_timeout_ms(30_000)
            .with_rebalance_timeout_ms(30_000)
            .with_protocol_type(StrBytes::from_static_str("custom"))
            .with_protocols(vec![JoinGroupRequestProtocol::default()
                .with_name(StrBytes::from_static_str("mine"))
                .with_metadata(metadata)])
    };
    let mut raw = Raw::connect(kafka);
    raw.send(
        ApiKey::JoinGroup,
        5,
        &join(Bytes::from(vec![7u8; (1 << 20) + 1])),
    );
    assert!(
        raw.frame().is_none(),
        "oversized metadata: connection closed"
    );
    let mut raw = Raw::connect(kafka);
    let joined: JoinGroupResponse =
        raw.call(ApiKey::JoinGroup, 5, &join(Bytes::from(vec![7u8; 1 << 20])));
    assert_eq!((joined.error_code, joined.generation_id), (0, 1));
    assert_eq!(joined.members[0].metadata.len(), 1 << 20);
    let sync = |assignment: Bytes| {
        SyncGroupRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("sized")))
            .with_generation_id(1)
            .with_member_id(joined.member_id.clone())
            .with_assignments(vec![SyncGroupRequestAssignment::default()
                .with_member_id(joined.member_id.clone())
                .with_assignment(assignment)])
    };
    raw.send(
        ApiKey::SyncGroup,
        3,
        &sync(Bytes::from(vec![1u8; (1 << 20) + 1])),
    );
    assert!(
        raw.frame().is_none(),
        "oversized assignment: connection closed"
    );
    let mut raw = Raw::connect(kafka);
    let synced: SyncGroupResponse =
        raw.call(ApiKey::SyncGroup, 3, &sync(Bytes::from_static(b"fits")));
    assert_eq!(synced.error_code, 0);
    assert_eq!(&synced.assignment[..], b"fits");
}

/// Each partition of a commit gets its own answer: a bad one fails alone, with the code
/// a Kafka client expects for it, and the others are committed.
#[tokio::test]
async fn each_partition_of_a_commit_gets_its_own_error() {
    use kafka_protocol::messages::{
        offset_commit_request, offset_fetch_request, GroupId, OffsetCommitRequest,
        OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse,
    };
    // The configured metadata limit applies to Kafka commits as to gRPC ones.
    let (broker, kafka) = start_with(&["--max-commit-metadata-bytes", "64B"]);
    create(&broker, "mixed", 4).await;
    let mut raw = Raw::connect(kafka);
    let answer: kafka_protocol::messages::ProduceResponse = raw.call(
        ApiKey::Produce,
        9,
        // acks=all: answered once the records are below the high watermark.
        &produce_request("mixed", -1, batch(&[(1, b"a"), (2, b"b")])),
    );
    assert_eq!(answer.responses[0].partition_responses[0].error_code, 0);
    let partition = |index: i32, offset: i64, metadata: usize| {
        offset_commit_request::OffsetCommitRequestPartition::default()
            .with_partition_index(index)
            .with_committed_offset(offset)
            .with_committed_metadata(Some(StrBytes::from_string("m".repeat(metadata))))
    };
    let commit = OffsetCommitRequest::default()
        .with_group_id(GroupId(StrBytes::from_static_str("mixed-group")))
        .with_generation_id_or_member_epoch(-1)
        .with_topics(vec![
            offset_commit_request::OffsetCommitRequestTopic::default()
                .with_name(name("mixed"))
                .with_partitions(vec![
                    partition(0, 2, 10),
                    partition(9, 0, 0),
                    partition(1, 0, 65),
                    partition(2, 5, 0),
                ]),
            offset_commit_request::OffsetCommitRequestTopic::default()
                .with_name(name("absent"))
                .with_partitions(vec![partition(0, 0, 0)]),
        ]);
    let answer: OffsetCommitResponse = raw.call(ApiKey::OffsetCommit, 8, &commit);
    let codes: Vec<Vec<i16>> = answer
        .topics
        .iter()
        .map(|t| t.partitions.iter().map(|p| p.error_code).collect())
        .collect();
    // UNKNOWN_TOPIC_OR_PARTITION, OFFSET_METADATA_TOO_LARGE, INVALID_COMMIT_OFFSET_SIZE.
    assert_eq!(codes, vec![vec![0, 3, 12, 28], vec![3]]);
    let fetched: OffsetFetchResponse = raw.call(
        ApiKey::OffsetFetch,
        5,
        &OffsetFetchRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("mixed-group")))
            .with_topics(Some(vec![
                offset_fetch_request::OffsetFetchRequestTopic::default()
                    .with_name(name("mixed"))
                    .with_partition_indexes(vec![0, 1, 2]),
            ])),
    );
    let offsets: Vec<i64> = fetched.topics[0]
        .partitions
        .iter()
        .map(|p| p.committed_offset)
        .collect();
    assert_eq!(offsets, vec![2, -1, -1]);
}

/// A response larger than 64 MiB is refused before it is encoded: DescribeGroups of
/// many groups whose members each carry 1 MiB of metadata.
#[tokio::test]
async fn a_response_over_64_mib_is_refused_before_it_is_encoded() {
    use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
    use kafka_protocol::messages::{
        DescribeGroupsRequest, DescribeGroupsResponse, GroupId, JoinGroupRequest, JoinGroupResponse,
    };
    let (_broker, kafka) = start();
    let group = |i: usize| GroupId(StrBytes::from_string(format!("large-{i}")));
    let mut raw = Raw::connect(kafka);
    let metadata = Bytes::from(vec![7u8; 1 << 20]);
    for i in 0..65 {
        let joined: JoinGroupResponse = raw.call(
            ApiKey::JoinGroup,
            5,
            &JoinGroupRequest::default()
                .with_group_id(group(i))
                .with_session_timeout_ms(30_000)
                .with_rebalance_timeout_ms(30_000)
                .with_protocol_type(StrBytes::from_static_str("custom"))
                .with_protocols(vec![JoinGroupRequestProtocol::default()
                    .with_name(StrBytes::from_static_str("mine"))
                    .with_metadata(metadata.clone())]),
        );
        assert_eq!(joined.error_code, 0);
    }
    let described: DescribeGroupsResponse = raw.call(
        ApiKey::DescribeGroups,
        5,
        &DescribeGroupsRequest::default().with_groups((0..60).map(group).collect()),
    );
    assert_eq!(described.groups.len(), 60);
    assert_eq!(
        described.groups[59].members[0].member_metadata.len(),
        1 << 20
    );
    raw.send(
        ApiKey::DescribeGroups,
        5,
        &DescribeGroupsRequest::default().with_groups((0..65).map(group).collect()),
    );
    assert!(raw.frame().is_none(), "connection closed");
}

/// Waits until the broker serves at least one request (a guard bounds the wait; nothing
/// asserts on time).
async fn wait_in_flight(broker: &Broker) {
    let http = broker.http_addr().expect("the broker has an HTTP listener");
    for _ in 0..1200 {
        let (_, body) = crate::common::http_get(http, "/metrics").await;
        let serving = body
            .lines()
            .filter_map(|l| l.strip_prefix("strata_requests_in_flight "))
            .any(|v| v.trim().parse::<f64>().is_ok_and(|v| v >= 1.0));
        if serving {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no request in flight");
}

#[tokio::test]
async fn a_shutdown_answers_the_kafka_request_in_progress_then_closes_its_connection() {
    let (mut broker, kafka) = start();
    create(&broker, "draining", 1).await;
    let mut idle = Raw::connect(kafka);
    let _: MetadataResponse = idle.call(
        ApiKey::Metadata,
        4,
        &MetadataRequest::default().with_topics(None),
    );
    // A long poll at the end of the empty log: it waits for its 3 s.
    let mut raw = Raw::connect(kafka);
    let sent = raw.send(ApiKey::Fetch, 11, &fetch("draining", 0, 3_000));
    wait_in_flight(&broker).await;
    broker.terminate();
    let (correlation, answer): (i32, FetchResponse) = raw.receive(ApiKey::Fetch, 11);
    assert_eq!(correlation, sent);
    assert_eq!(answer.responses[0].partitions[0].error_code, 0);
    assert!(raw.frame().is_none(), "closed once its request is answered");
    assert!(idle.frame().is_none(), "an idle connection is closed");
    broker.wait_stopped();
}

/// A Kafka connection whose receive buffer stays small, so a response it does not
/// read stays with the broker.
fn unread_connection(kafka: SocketAddr) -> Raw {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("a socket");
    socket.set_recv_buffer_size(64 << 10).expect("SO_RCVBUF");
    socket.connect(&kafka.into()).expect("connect");
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(READ_GUARD)).expect("timeout");
    Raw {
        stream,
        correlation: 0,
    }
}

#[tokio::test]
async fn unread_kafka_fetch_responses_hold_the_shared_fetch_memory_budget() {
    let (broker, kafka) = start_with(&["--fetch-memory-bytes", "16MiB"]);
    create(&broker, "big", 1).await;
    let mut data = broker.client().await;
    for _ in 0..24 {
        let records = vec![record(None, &[7; 500 << 10]); 2];
        data.produce(produce_records("big", 0, records))
            .await
            .expect("produce");
    }
    // Three 8 MiB fetches nobody reads: their responses, being written, hold their
    // share of the 16 MiB (the third waits for room, for at most its max_wait_ms).
    let mut unread = Vec::new();
    for _ in 0..3 {
        let mut raw = unread_connection(kafka);
        let mut request = fetch("big", 0, 30_000);
        request.max_bytes = 8 << 20;
        request.topics[0].partitions[0].partition_max_bytes = 8 << 20;
        raw.send(ApiKey::Fetch, 11, &request);
        unread.push(raw);
    }
    // A gRPC fetch of 4 MiB finds no room (a guard bounds the wait; nothing asserts on
    // time).
    let mut large = crate::common::fetch_request("big", 0, 0, false);
    large.max_bytes = 4 << 20;
    let mut refused = None;
    for _ in 0..600 {
        match data.fetch(large.clone()).await {
            Ok(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(status) => {
                refused = Some(status);
                break;
            }
        }
    }
    let refused = refused.expect("the unread Kafka responses never held the budget");
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("fetch_memory_bytes"),
        "{refused:?}"
    );
    // Once the Kafka clients are gone, the budget is free again.
    drop(unread);
    let mut served = false;
    for _ in 0..600 {
        if data.fetch(large.clone()).await.is_ok() {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(served, "the budget was not returned");
}

/// The records every client's compression test writes to its topic for `codec` (one
/// partition): three keyed, then three keyless, with values that compress well (a
/// client may send a batch uncompressed when compressing would not shrink it) and one
/// header naming the codec.
fn codec_records(codec: Compression) -> Vec<(Option<String>, String)> {
    (0..6)
        .map(|i| {
            let key = (i < 3).then(|| format!("k{i}"));
            (key, format!("{codec}-{i}-").repeat(20))
        })
        .collect()
}

/// Every codec, in the order of their topic names (`<prefix><codec>`), as a client that
/// sorts its output by topic prints them.
fn codecs_by_name() -> Vec<Compression> {
    let mut codecs = Compression::ALL.to_vec();
    codecs.sort_by_key(|c| c.name());
    codecs
}

/// What the Python codec scripts print for the topics `<prefix><codec>`: one line per
/// record, `topic offset key value`, a null key as `None`.
fn codec_lines(prefix: &str) -> String {
    codecs_by_name()
        .into_iter()
        .flat_map(|codec| {
            codec_records(codec)
                .into_iter()
                .enumerate()
                .map(move |(offset, (key, value))| {
                    let key = key.unwrap_or_else(|| "None".into());
                    format!("{prefix}{codec} {offset} {key} {value}\n")
                })
        })
        .collect()
}

/// Creates `<prefix><codec>` with one partition for every codec.
async fn create_codec_topics(broker: &Broker, prefix: &str) {
    let mut admin = broker.admin().await;
    for codec in Compression::ALL {
        create_topic(
            &mut admin,
            &format!("{prefix}{codec}"),
            1,
            v1::TopicConfig::default(),
        )
        .await;
    }
}

/// Checks that `topic` holds `codec_records(codec)` with their header, stored in batches
/// compressed with `codec` as the client sent them, and decoded alike by the broker
/// (gRPC `decode=true`), by the storage codec on the raw batches, and by the Rust
/// client's consumer.
async fn check_codec_topic(broker: &Broker, topic: &str, codec: Compression) {
    let mut client = broker.client().await;
    let answer = client
        .fetch(crate::common::fetch_request(topic, 0, 0, false))
        .await
        .expect("fetch")
        .into_inner();
    let stored: Vec<Compression> = strata_storage::batch::batches(&answer.batches)
        .map(|b| b.expect("a valid batch").compression())
        .collect();
    assert!(
        !stored.is_empty() && stored.iter().all(|&c| c == codec),
        "{topic}: batches stored as {stored:?}"
    );
    let expected = codec_records(codec);
    let header = vec![("h".to_string(), codec.name().as_bytes().to_vec())];
    let records = read_partition(&mut client, topic, 0).await;
    let got: Vec<(Option<String>, String)> = records
        .iter()
        .map(|r| {
            assert_eq!(r.headers, header, "{topic}");
            let text = |b: &[u8]| String::from_utf8(b.to_vec()).expect("utf-8");
            (
                r.key.as_deref().map(text),
                text(r.value.as_deref().unwrap_or_default()),
            )
        })
        .collect();
    assert_eq!(got, expected, "{topic} over gRPC");
    let rust = strata_client::Client::connect(&broker.addr_arg())
        .await
        .expect("connect");
    let mut consumer = rust
        .partition_consumer(topic, 0, strata_client::StartAt::Earliest)
        .await
        .expect("a partition consumer");
    for (offset, (key, value)) in expected.iter().enumerate() {
        let record = tokio::time::timeout(READ_GUARD, consumer.next())
            .await
            .expect("a record within the guard")
            .expect("a record")
            .expect("a record");
        assert_eq!(record.offset, offset as u64, "{topic}");
        assert_eq!(record.key.as_deref(), key.as_deref().map(str::as_bytes));
        assert_eq!(record.value.as_deref(), Some(value.as_bytes()));
        assert_eq!(record.header_str("h"), Some(codec.name()));
    }
}

/// Consumes `topic` from the beginning with kcat: `offset|key|value|headers` lines (a
/// null key prints empty).
fn kcat_consume(kafka: SocketAddr, topic: &str) -> String {
    run_kcat(
        kafka,
        &[
            "-C",
            "-t",
            topic,
            "-o",
            "beginning",
            "-e",
            "-q",
            "-f",
            "%o|%k|%s|%h\n",
        ],
        "",
    )
}

/// The kcat lines of `codec_records(codec)`.
fn kcat_lines(codec: Compression) -> String {
    codec_records(codec)
        .into_iter()
        .enumerate()
        .map(|(offset, (key, value))| {
            format!("{offset}|{}|{value}|h={codec}\n", key.unwrap_or_default())
        })
        .collect()
}

#[tokio::test]
async fn kcat_produces_and_consumes_every_compression_codec() {
    if kcat().is_none() {
        return;
    }
    let (broker, kafka) = start();
    create_codec_topics(&broker, "kcat-").await;
    for codec in Compression::ALL {
        let topic = format!("kcat-{codec}");
        let header = format!("h={codec}");
        let records = codec_records(codec);
        let keyed: String = records[..3]
            .iter()
            .map(|(key, value)| format!("{}:{value}\n", key.as_deref().unwrap_or_default()))
            .collect();
        let keyless: String = records[3..].iter().map(|(_, v)| format!("{v}\n")).collect();
        let produce = ["-P", "-t", &topic, "-z", codec.name(), "-H", &header];
        run_kcat(kafka, &[&produce[..], &["-K:"]].concat(), &keyed);
        run_kcat(kafka, &produce, &keyless);
        assert_eq!(kcat_consume(kafka, &topic), kcat_lines(codec), "{topic}");
        check_codec_topic(&broker, &topic, codec).await;
    }
}

/// Produces `codec_records` to `<prefix><codec>` with every codec, then consumes all
/// the topics from the earliest offset, printing `codec_lines`.
const KAFKA_PYTHON_CODECS: &str = r#"
import sys
from kafka import KafkaProducer, KafkaConsumer, TopicPartition
b, prefix = sys.argv[1], sys.argv[2]
codecs = ['none', 'gzip', 'snappy', 'lz4', 'zstd']
for codec in codecs:
    p = KafkaProducer(bootstrap_servers=b, acks='all', linger_ms=20,
                      compression_type=None if codec == 'none' else codec)
    for i in range(6):
        key = b'k%d' % i if i < 3 else None
        value = (b'%s-%d-' % (codec.encode(), i)) * 20
        p.send(prefix + codec, key=key, value=value, headers=[('h', codec.encode())])
    p.flush()
    p.close()
c = KafkaConsumer(bootstrap_servers=b, enable_auto_commit=False, consumer_timeout_ms=60000)
c.assign([TopicPartition(prefix + codec, 0) for codec in codecs])
c.seek_to_beginning()
got = []
for m in c:
    got.append(m)
    if len(got) == 6 * len(codecs):
        break
c.close()
for m in sorted(got, key=lambda m: (m.topic, m.offset)):
    key = 'None' if m.key is None else m.key.decode()
    print(m.topic, m.offset, key, m.value.decode())
"#;

#[tokio::test]
async fn kafka_python_produces_and_consumes_every_compression_codec() {
    let Some(python) = python_with(
        "kafka, snappy, lz4.frame, zstandard",
        "kafka-python with its codecs (python-snappy, lz4, zstandard)",
    ) else {
        return;
    };
    let (broker, kafka) = start();
    create_codec_topics(&broker, "py-").await;
    let out = run_python(
        &python,
        300,
        KAFKA_PYTHON_CODECS,
        &[&kafka.to_string(), "py-"],
    );
    assert_eq!(out, codec_lines("py-"));
    for codec in Compression::ALL {
        let topic = format!("py-{codec}");
        check_codec_topic(&broker, &topic, codec).await;
        // kafka-python writes xerial-framed snappy, librdkafka reads it as stored.
        if kcat().is_some() {
            assert_eq!(kcat_consume(kafka, &topic), kcat_lines(codec), "{topic}");
        }
    }
}

/// `KAFKA_PYTHON_CODECS` with confluent-kafka (librdkafka).
const CONFLUENT_CODECS: &str = r#"
import sys
from confluent_kafka import Producer, Consumer, TopicPartition
b, prefix = sys.argv[1], sys.argv[2]
codecs = ['none', 'gzip', 'snappy', 'lz4', 'zstd']
errors = []
def report(err, msg):
    if err is not None:
        errors.append(str(err))
for codec in codecs:
    p = Producer({'bootstrap.servers': b, 'compression.type': codec, 'linger.ms': 20})
    for i in range(6):
        key = b'k%d' % i if i < 3 else None
        value = (b'%s-%d-' % (codec.encode(), i)) * 20
        p.produce(prefix + codec, key=key, value=value, headers=[('h', codec.encode())],
                  on_delivery=report)
    left = p.flush(60)
    assert left == 0 and not errors, (left, errors)
c = Consumer({'bootstrap.servers': b, 'group.id': 'codecs', 'enable.auto.commit': False})
c.assign([TopicPartition(prefix + codec, 0, 0) for codec in codecs])
got = []
while len(got) < 6 * len(codecs):
    m = c.poll(60)
    if m is None:
        break
    if m.error():
        print('error', m.error(), file=sys.stderr)
        continue
    got.append(m)
c.close()
for m in sorted(got, key=lambda m: (m.topic(), m.offset())):
    key = 'None' if m.key() is None else m.key().decode()
    print(m.topic(), m.offset(), key, m.value().decode())
"#;

#[tokio::test]
async fn confluent_kafka_produces_and_consumes_every_compression_codec() {
    let Some(python) = confluent_kafka() else {
        return;
    };
    let (broker, kafka) = start();
    create_codec_topics(&broker, "ck-").await;
    let out = run_python(&python, 300, CONFLUENT_CODECS, &[&kafka.to_string(), "ck-"]);
    assert_eq!(out, codec_lines("ck-"));
    for codec in Compression::ALL {
        check_codec_topic(&broker, &format!("ck-{codec}"), codec).await;
    }
}

#[tokio::test]
async fn the_rust_client_compresses_and_kcat_reads_every_codec() {
    if kcat().is_none() {
        return;
    }
    let (broker, kafka) = start();
    create_codec_topics(&broker, "rust-").await;
    let client = strata_client::Client::connect(&broker.addr_arg())
        .await
        .expect("connect");
    for codec in Compression::ALL {
        let topic = format!("rust-{codec}");
        let config = strata_client::ProducerConfig {
            compression: codec,
            // One batch for the six records.
            linger: Duration::from_secs(3600),
            ..strata_client::ProducerConfig::default()
        };
        let producer = client
            .producer_with(&topic, config)
            .await
            .expect("a producer");
        let sends: Vec<_> = codec_records(codec)
            .into_iter()
            .map(|(key, value)| {
                let mut record = strata_client::Record::new(value).header("h", codec.name());
                if let Some(key) = key {
                    record = record.key(key);
                }
                producer.send(record)
            })
            .collect();
        producer.flush().await;
        for send in sends {
            send.await.expect("delivered");
        }
        check_codec_topic(&broker, &topic, codec).await;
        assert_eq!(kcat_consume(kafka, &topic), kcat_lines(codec), "{topic}");
    }
}

/// A one-record batch labelled `codec` whose records section is `payload` as given
/// (length and CRC made right): what a broken or hostile producer could send.
fn with_payload(codec: Compression, payload: &[u8]) -> Vec<u8> {
    use strata_storage::batch::BATCH_HEADER_LEN;
    let mut builder = BatchBuilder::new();
    builder.push(1_000, None, Some(b"v"), &[]);
    let mut batch = builder.finish_compressed(codec)[..BATCH_HEADER_LEN].to_vec();
    batch.extend_from_slice(payload);
    let length = (batch.len() - 12) as i32;
    batch[8..12].copy_from_slice(&length.to_be_bytes());
    let crc = crc32c::crc32c(&batch[21..]);
    batch[17..21].copy_from_slice(&crc.to_be_bytes());
    batch
}

#[tokio::test]
async fn decompression_bombs_and_corrupt_payloads_are_refused_and_nothing_is_stored() {
    let (broker, kafka) = start();
    create(&broker, "guarded", 1).await;
    // One valid record followed by 8 MiB of zeros: about a kilobyte in zstd, twice the
    // most a batch that small may decompress to.
    let mut plain = BatchBuilder::new();
    plain.push(1_000, None, Some(b"v"), &[]);
    let mut records = plain.finish()[strata_storage::batch::BATCH_HEADER_LEN..].to_vec();
    records.resize(8 << 20, 0);
    let mut bomb = Vec::new();
    Compression::Zstd.compress(&records, &mut bomb);
    let bomb = with_payload(Compression::Zstd, &bomb);
    assert!(bomb.len() < 64 << 10, "{} bytes", bomb.len());
    let mut gzip = Vec::new();
    Compression::Gzip.compress(&records[..100], &mut gzip);
    let corrupt = with_payload(Compression::Gzip, &gzip[..gzip.len() / 2]);

    let mut raw = Raw::connect(kafka);
    for (batch, code, words) in [
        (&bomb, 87, "decompression limit"),
        (&corrupt, 2, "gzip payload does not decompress"),
    ] {
        let answer: kafka_protocol::messages::ProduceResponse = raw.call(
            ApiKey::Produce,
            9,
            &produce_request("guarded", -1, Bytes::from(batch.clone())),
        );
        let partition = &answer.responses[0].partition_responses[0];
        assert_eq!(partition.error_code, code, "{partition:?}");
        let message = partition.error_message.as_deref().unwrap_or_default();
        assert!(message.contains(words), "{message}");
    }
    let mut client = broker.client().await;
    let status = client
        .produce(crate::common::produce_batch("guarded", 0, bomb))
        .await
        .expect_err("a bomb is refused over gRPC too");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("decompression limit"),
        "{}",
        status.message()
    );
    assert!(read_partition(&mut client, "guarded", 0).await.is_empty());
}

/// Arrays are counted before the codec decodes them: a Metadata of 100,000 empty topic
/// names (200 KB on the wire, ~7 MB decoded) closes only its connection. Auto-creation,
/// like gRPC CreateTopic, stops at --max-partitions: POLICY_VIOLATION over Kafka,
/// RESOURCE_EXHAUSTED naming the limit over gRPC.
#[tokio::test]
async fn arrays_are_bounded_before_decoding_and_topics_stop_at_max_partitions() {
    use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
    let (broker, kafka) = start_with(&[
        "--kafka-auto-create-topics",
        "true",
        "--max-partitions",
        "2",
    ]);
    let mut flood = Raw::connect(kafka);
    flood.send(
        ApiKey::Metadata,
        9,
        &MetadataRequest::default().with_topics(Some(vec![
            MetadataRequestTopic::default()
                .with_name(Some(name("")));
            100_000
        ])),
    );
    assert!(flood.frame().is_none(), "connection closed");
    let mut raw = Raw::connect(kafka);
    let ask = |topics: &[&str]| {
        MetadataRequest::default()
            .with_topics(Some(
                topics
                    .iter()
                    .map(|t| MetadataRequestTopic::default().with_name(Some(name(t))))
                    .collect(),
            ))
            .with_allow_auto_topic_creation(true)
    };
    let answer: MetadataResponse = raw.call(ApiKey::Metadata, 9, &ask(&["a", "b", "c"]));
    let codes: Vec<(i16, usize)> = answer
        .topics
        .iter()
        .map(|t| (t.error_code, t.partitions.len()))
        .collect();
    assert_eq!(
        codes,
        vec![(0, 1), (0, 1), (44, 0)],
        "two created; POLICY_VIOLATION"
    );
    let refused = broker
        .admin()
        .await
        .create_topic(v1::CreateTopicRequest {
            name: "d".into(),
            partitions: 1,
            config: Some(v1::TopicConfig::default()),
        })
        .await
        .expect_err("past max_partitions");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(refused.message().contains("max_partitions"), "{refused:?}");
}
