//! Black-box tests of the `strata` binary: each test starts the real broker on a free
//! port over a temporary data directory and talks to it over gRPC (or runs the CLI).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use crate::common::*;
use strata_proto::v1::{self, admin_client::AdminClient, broker_client::BrokerClient};
use strata_storage::batch::BatchBuilder;
use tonic::transport::Channel;
use tonic::Code;

/// Guard against a hang: a test that waits on a stream fails after this instead of
/// running forever. Never reached when things work; nothing asserts on elapsed time.
const HANG_GUARD: Duration = Duration::from_secs(60);

/// Awaits `future`, failing the test if it hangs past [`HANG_GUARD`].
async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(HANG_GUARD, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {HANG_GUARD:?}"))
}

/// Polls `future` once; true if it is still pending.
async fn poll_once<F: Future + Unpin>(future: &mut F) -> bool {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *future).poll(cx).is_pending())).await
}

fn header(key: &str, value: &[u8]) -> v1::Header {
    v1::Header {
        key: key.to_string(),
        value: bytes::Bytes::copy_from_slice(value),
    }
}

/// The expected form of a record produced with the decoded form at `offset`.
fn expected(offset: u64, r: &v1::Record) -> Rec {
    Rec {
        offset,
        ..Rec::from_proto(r)
    }
}

/// A record as pushed into a [`BatchBuilder`].
struct Pushed<'a> {
    timestamp: i64,
    key: Option<&'a [u8]>,
    value: Option<&'a [u8]>,
    headers: &'a [(&'a str, &'a [u8])],
}

/// Encodes `records` as one batch; returns it with the records as a fetch returns them
/// (offsets from `base`).
fn encode(records: &[Pushed<'_>], base: u64) -> (Vec<u8>, Vec<Rec>) {
    let mut builder = BatchBuilder::new();
    let mut out = Vec::new();
    for (i, r) in records.iter().enumerate() {
        builder.push(r.timestamp, r.key, r.value, r.headers);
        out.push(Rec {
            offset: base + i as u64,
            timestamp: r.timestamp,
            key: r.key.map(<[u8]>::to_vec),
            value: r.value.map(<[u8]>::to_vec),
            headers: r
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_vec()))
                .collect(),
        });
    }
    (builder.finish(), out)
}

/// Every record of every partition of `topic`.
async fn snapshot(
    client: &mut BrokerClient<Channel>,
    topic: &str,
    partitions: u32,
) -> Vec<Vec<Rec>> {
    let mut all = Vec::new();
    for p in 0..partitions {
        all.push(read_partition(client, topic, p).await);
    }
    all
}

/// Asserts that `result` failed with `code`; returns the status.
fn expect_code<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    what: &str,
) -> tonic::Status {
    match result {
        Ok(response) => panic!("{what}: expected {code:?}, got {:?}", response.into_inner()),
        Err(status) => {
            assert_eq!(status.code(), code, "{what}: {status:?}");
            assert!(!status.message().is_empty(), "{what}: an empty message");
            status
        }
    }
}

/// Guards the whole write/read path and its durability: both produce forms (decoded
/// records and an encoded batch) land at consecutive offsets with keys, values, headers
/// and timestamps intact; fetch returns them decoded and as raw batches (the first
/// batch may start before the requested offset); and topics and records survive a
/// graceful restart (SIGTERM) and a crash (SIGKILL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_fetch_and_restarts_keep_everything() {
    let mut broker = Broker::start();
    let mut admin = broker.admin().await;
    let mut client = broker.client().await;
    let created = create_topic(&mut admin, "events", 3, v1::TopicConfig::default()).await;
    assert_eq!((created.name.as_str(), created.partitions), ("events", 3));
    let config = created.config.clone().expect("the config in force");
    assert_eq!(config.durability.as_deref(), Some("fsync"));

    // The decoded form: null key, empty key, null value, headers, non-monotonic times.
    let records = vec![
        v1::Record {
            key: Some(b"k1".to_vec().into()),
            value: Some(b"v1".to_vec().into()),
            headers: vec![header("trace", b"abc"), header("empty", b"")],
            timestamp_ms: 1_700_000_000_010,
            offset: 0,
        },
        v1::Record {
            key: None,
            value: Some(b"no key".to_vec().into()),
            headers: vec![],
            timestamp_ms: 1_700_000_000_000,
            offset: 0,
        },
        v1::Record {
            key: Some(bytes::Bytes::new()),
            value: None,
            headers: vec![header("bin", b"\x00\xff"), header("bin", b"again")],
            timestamp_ms: 1_700_000_000_020,
            offset: 0,
        },
    ];
    let answer = client
        .produce(produce_records("events", 0, records.clone()))
        .await
        .expect("produce records")
        .into_inner();
    assert_eq!(
        (answer.partition, answer.base_offset, answer.last_offset),
        (0, 0, 2)
    );
    let mut p0: Vec<Rec> = records
        .iter()
        .enumerate()
        .map(|(i, r)| expected(i as u64, r))
        .collect();

    // The fast path: an encoded batch.
    let (batch, recs) = encode(
        &[
            Pushed {
                timestamp: 1_700_000_001_000,
                key: Some(b"bk1"),
                value: Some(b"bv1"),
                headers: &[("x", b"1")],
            },
            Pushed {
                timestamp: 1_700_000_000_500,
                key: None,
                value: Some(b"bv2"),
                headers: &[],
            },
            Pushed {
                timestamp: 1_700_000_001_002,
                key: Some(b"bk3"),
                value: None,
                headers: &[("a", b""), ("b", b"2")],
            },
        ],
        3,
    );
    let answer = client
        .produce(produce_batch("events", 0, batch))
        .await
        .expect("produce a batch")
        .into_inner();
    assert_eq!(
        (answer.partition, answer.base_offset, answer.last_offset),
        (0, 3, 5)
    );
    p0.extend(recs);

    let (batch, p1) = encode(
        &[Pushed {
            timestamp: 1_600_000_000_000,
            key: Some(b"only"),
            value: Some(b"in partition 1"),
            headers: &[],
        }],
        0,
    );
    let answer = client
        .produce(produce_batch("events", 1, batch))
        .await
        .expect("produce to partition 1")
        .into_inner();
    assert_eq!(
        (answer.partition, answer.base_offset, answer.last_offset),
        (1, 0, 0)
    );

    // Timestamp 0 means "now": the broker stamps the record.
    let answer = client
        .produce(v1::ProduceRequest {
            acks: v1::Acks::Leader.into(),
            ..produce_records("events", 2, vec![record(None, b"stamped")])
        })
        .await
        .expect("produce with acks=leader")
        .into_inner();
    assert_eq!((answer.partition, answer.base_offset), (2, 0));
    // A leader ack comes before the commit publishes the record; a long poll waits for
    // it to become visible.
    client
        .fetch(v1::FetchRequest {
            max_wait_ms: 10_000,
            ..fetch_request("events", 2, 0, false)
        })
        .await
        .expect("wait for the leader-acked record");

    assert_eq!(read_partition(&mut client, "events", 0).await, p0);
    assert_eq!(read_partition(&mut client, "events", 1).await, p1);
    let p2 = read_partition(&mut client, "events", 2).await;
    assert_eq!(p2.len(), 1);
    let now = strata_storage::now_ms();
    assert!(
        p2[0].timestamp > 1_700_000_000_000 && p2[0].timestamp <= now,
        "timestamp 0 was not replaced by the broker's clock: {:?}",
        p2[0]
    );

    // A fetch from inside a batch: the raw batches start at the batch's base offset,
    // the decoded records at the requested offset.
    let raw = client
        .fetch(fetch_request("events", 0, 4, false))
        .await
        .expect("raw fetch from the middle of a batch")
        .into_inner();
    assert_eq!(
        (
            raw.partition,
            raw.next_offset,
            raw.high_watermark,
            raw.earliest_offset
        ),
        (0, 6, 6, 0)
    );
    let first = strata_storage::batch::batches(&raw.batches)
        .next()
        .expect("a batch")
        .expect("a valid batch");
    assert_eq!(first.header().base_offset, 3);
    assert_eq!(decode_batches(&raw.batches, 4), p0[4..].to_vec());
    let decoded = client
        .fetch(fetch_request("events", 0, 4, true))
        .await
        .expect("decoded fetch from the middle of a batch")
        .into_inner();
    let decoded: Vec<Rec> = decoded.records.iter().map(Rec::from_proto).collect();
    assert_eq!(decoded, p0[4..].to_vec());
    assert_eq!(
        read_from(&mut client, "events", 0, 4).await,
        p0[4..].to_vec()
    );

    // Fetching at the high watermark answers at once with nothing.
    let empty = client
        .fetch(fetch_request("events", 0, 6, true))
        .await
        .expect("fetch at the high watermark")
        .into_inner();
    assert!(empty.records.is_empty() && empty.batches.is_empty());
    assert_eq!(empty.next_offset, 6);

    let before = snapshot(&mut client, "events", 3).await;

    // Graceful restart.
    broker.restart_graceful();
    let mut admin = broker.admin().await;
    let mut client = broker.client().await;
    let topics = admin
        .list_topics(v1::ListTopicsRequest {})
        .await
        .expect("list topics")
        .into_inner()
        .topics;
    assert_eq!(
        topics,
        vec![created.clone()],
        "topics after a graceful restart"
    );
    assert_eq!(high_watermarks(&mut admin, "events").await, vec![6, 1, 1]);
    assert_eq!(snapshot(&mut client, "events", 3).await, before);

    // Offsets go on where they stopped; then a crash.
    let answer = client
        .produce(produce_records(
            "events",
            0,
            vec![record(Some(b"after"), b"restart")],
        ))
        .await
        .expect("produce after restart")
        .into_inner();
    assert_eq!(answer.base_offset, 6);
    let (batch, _) = encode(
        &[Pushed {
            timestamp: 1_700_000_002_000,
            key: Some(b"k"),
            value: Some(b"before the crash"),
            headers: &[("h", b"v")],
        }],
        1,
    );
    let answer = client
        .produce(produce_batch("events", 1, batch))
        .await
        .expect("produce a batch before the crash")
        .into_inner();
    assert_eq!(answer.base_offset, 1);
    let before = snapshot(&mut client, "events", 3).await;
    assert_eq!(before[0].len(), 7);
    assert_eq!(before[1].len(), 2);

    broker.restart_after_kill();
    let mut admin = broker.admin().await;
    let mut client = broker.client().await;
    assert_eq!(topic_names(&mut admin).await, vec!["events".to_string()]);
    assert_eq!(high_watermarks(&mut admin, "events").await, vec![7, 2, 1]);
    assert_eq!(snapshot(&mut client, "events", 3).await, before);
    let answer = client
        .produce(produce_records("events", 0, vec![record(None, b"x")]))
        .await
        .expect("produce after the crash")
        .into_inner();
    assert_eq!(answer.base_offset, 7);
}

/// Guards long polling: a fetch waiting at the high watermark is answered with the
/// record a later produce appends (a fetch that timed out would carry no records), and
/// a fetch whose wait runs out answers with nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_fetch_wakes_on_produce() {
    let broker = Broker::start();
    let mut admin = broker.admin().await;
    create_topic(&mut admin, "poll", 2, v1::TopicConfig::default()).await;
    let mut client = broker.client().await;
    client
        .produce(produce_records("poll", 0, vec![record(None, b"first")]))
        .await
        .expect("produce the first record");

    // Producing on the same connection puts the produce on the wire after the fetch.
    let mut producer = client.clone();
    let request = v1::FetchRequest {
        max_wait_ms: 10_000,
        ..fetch_request("poll", 0, 1, true)
    };
    let mut fetch = Box::pin(client.fetch(request));
    assert!(
        poll_once(&mut fetch).await,
        "the long poll answered at once"
    );
    let answer = producer
        .produce(produce_records(
            "poll",
            0,
            vec![record(Some(b"k"), b"wake up")],
        ))
        .await
        .expect("produce")
        .into_inner();
    assert_eq!(answer.base_offset, 1);
    let response = fetch.await.expect("the long poll").into_inner();
    let records: Vec<Rec> = response.records.iter().map(Rec::from_proto).collect();
    assert_eq!(records.len(), 1, "the long poll returned {response:?}");
    assert_eq!(
        (
            records[0].offset,
            records[0].key.as_deref(),
            records[0].value.as_deref()
        ),
        (1, Some(&b"k"[..]), Some(&b"wake up"[..]))
    );
    assert_eq!(response.next_offset, 2);

    // A wait that runs out answers with nothing and the same offset.
    let mut client = broker.client().await;
    let response = client
        .fetch(v1::FetchRequest {
            max_wait_ms: 50,
            ..fetch_request("poll", 1, 0, true)
        })
        .await
        .expect("a long poll that times out")
        .into_inner();
    assert!(response.records.is_empty() && response.batches.is_empty());
    assert_eq!((response.next_offset, response.high_watermark), (0, 0));
}

/// Guards Subscribe: a stream opened at offset 0 of an empty partition delivers every
/// record produced afterwards, in order, decoded or as raw batches, and nothing from
/// other partitions; a stream opened inside a batch starts at the requested offset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_streams_new_records_in_order() {
    let broker = Broker::start();
    let mut admin = broker.admin().await;
    create_topic(&mut admin, "stream", 2, v1::TopicConfig::default()).await;
    let mut client = broker.client().await;
    let subscribe = |decode: bool, offset: u64| v1::SubscribeRequest {
        topic: "stream".into(),
        partition: 1,
        offset,
        max_bytes: 0,
        decode,
        member: None,
    };
    let mut decoded = client
        .subscribe(subscribe(true, 0))
        .await
        .expect("subscribe decoded")
        .into_inner();
    let mut raw = client
        .subscribe(subscribe(false, 0))
        .await
        .expect("subscribe raw")
        .into_inner();

    let mut producer = broker.client().await;
    let mut sent = Vec::new();
    for i in 0..12u64 {
        let count = i % 3 + 1;
        if i.is_multiple_of(2) {
            let records: Vec<v1::Record> = (0..count)
                .map(|j| record(Some(b"key"), format!("m{i}.{j}").as_bytes()))
                .collect();
            producer
                .produce(produce_records("stream", 1, records))
                .await
                .expect("produce records");
        } else {
            let mut builder = BatchBuilder::new();
            for j in 0..count {
                builder.push(
                    1_700_000_000_000,
                    Some(b"key"),
                    Some(format!("m{i}.{j}").as_bytes()),
                    &[],
                );
            }
            producer
                .produce(produce_batch("stream", 1, builder.finish()))
                .await
                .expect("produce a batch");
        }
        producer
            .produce(produce_records(
                "stream",
                0,
                vec![record(None, b"elsewhere")],
            ))
            .await
            .expect("produce to the other partition");
        sent.extend((0..count).map(|j| format!("m{i}.{j}")));
    }

    let mut got = Vec::new();
    while got.len() < sent.len() {
        let message = within("decoded subscribe", decoded.message())
            .await
            .expect("a healthy stream")
            .expect("the stream stays open");
        assert_eq!(message.partition, 1);
        assert!(message.batches.is_empty());
        got.extend(message.records.iter().map(Rec::from_proto));
    }
    let mut got_raw = Vec::new();
    while got_raw.len() < sent.len() {
        let message = within("raw subscribe", raw.message())
            .await
            .expect("a healthy stream")
            .expect("the stream stays open");
        assert!(message.records.is_empty());
        got_raw.extend(decode_batches(&message.batches, got_raw.len() as u64));
    }
    assert_eq!(got, got_raw);
    let offsets: Vec<u64> = got.iter().map(|r| r.offset).collect();
    assert_eq!(offsets, (0..sent.len() as u64).collect::<Vec<_>>());
    let values: Vec<String> = got
        .iter()
        .map(|r| String::from_utf8_lossy(r.value.as_deref().expect("a value")).into_owned())
        .collect();
    assert_eq!(values, sent);

    // From inside the second batch (offsets 1..=2): the first message starts at 2.
    let mut late = client
        .subscribe(subscribe(true, 2))
        .await
        .expect("subscribe from offset 2")
        .into_inner();
    let mut tail = Vec::new();
    while tail.len() < sent.len() - 2 {
        let message = within("late subscribe", late.message())
            .await
            .expect("a healthy stream")
            .expect("the stream stays open");
        tail.extend(message.records.iter().map(Rec::from_proto));
    }
    assert_eq!(tail, got[2..].to_vec());
}

/// Guards keyed ordering: records with a key — routed with `target: key`, or without a
/// target by the key of their first record, in either produce form — all land in the
/// partition `partition_for_key` predicts, in produce order; keyless records without a
/// target are spread over the partitions in turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_records_stay_in_their_partition_in_order() {
    const PARTITIONS: u32 = 6;
    let broker = Broker::start();
    let mut admin = broker.admin().await;
    create_topic(&mut admin, "keyed", PARTITIONS, v1::TopicConfig::default()).await;
    let mut client = broker.client().await;
    let keys: Vec<String> = (0..9).map(|i| format!("customer-{i}")).collect();
    let mut sent: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for round in 0..8 {
        for (i, key) in keys.iter().enumerate() {
            let values: Vec<String> = (0..(round + i) % 3 + 1)
                .map(|j| format!("{key}/{round}/{j}"))
                .collect();
            let k = key.as_bytes();
            let mut request = v1::ProduceRequest {
                topic: "keyed".into(),
                ..Default::default()
            };
            match (round + i) % 4 {
                // target: key, decoded records
                0 => {
                    request.target = Some(v1::produce_request::Target::Key(k.to_vec().into()));
                    request.records = values
                        .iter()
                        .map(|v| record(Some(k), v.as_bytes()))
                        .collect();
                }
                // target: key, encoded batch
                1 => {
                    request.target = Some(v1::produce_request::Target::Key(k.to_vec().into()));
                    request.batch = batch_of(k, &values).into();
                }
                // no target, decoded records: the first record's key decides
                2 => {
                    request.records = values
                        .iter()
                        .map(|v| record(Some(k), v.as_bytes()))
                        .collect();
                }
                // no target, encoded batch: the first record's key decides
                _ => request.batch = batch_of(k, &values).into(),
            }
            let answer = client
                .produce(request)
                .await
                .expect("keyed produce")
                .into_inner();
            assert_eq!(
                answer.partition,
                strata_proto::partition_for_key(k, PARTITIONS),
                "the partition of key {key} (form {})",
                (round + i) % 4
            );
            sent.entry(key.clone()).or_default().extend(values);
        }
    }
    let mut found: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in 0..PARTITIONS {
        for r in read_partition(&mut client, "keyed", p).await {
            let key = String::from_utf8(r.key.expect("a key")).expect("a UTF-8 key");
            assert_eq!(
                p,
                strata_proto::partition_for_key(key.as_bytes(), PARTITIONS),
                "a record of key {key} in partition {p}"
            );
            let value = String::from_utf8(r.value.expect("a value")).expect("a UTF-8 value");
            found.entry(key).or_default().push(value);
        }
    }
    assert_eq!(found, sent);

    // No key and no target: partitions in turn.
    create_topic(&mut admin, "spread", 4, v1::TopicConfig::default()).await;
    let mut counts = [0usize; 4];
    for i in 0..8 {
        let answer = client
            .produce(v1::ProduceRequest {
                topic: "spread".into(),
                records: vec![record(None, format!("{i}").as_bytes())],
                ..Default::default()
            })
            .await
            .expect("keyless produce")
            .into_inner();
        counts[answer.partition as usize] += 1;
    }
    assert_eq!(counts, [2, 2, 2, 2]);
}

fn batch_of(key: &[u8], values: &[String]) -> Vec<u8> {
    let mut builder = BatchBuilder::new();
    for v in values {
        builder.push(1_700_000_000_000, Some(key), Some(v.as_bytes()), &[]);
    }
    builder.finish()
}

/// Guards input validation: every bad request gets its documented status code with a
/// message, and none of them changes the log, creates a directory or stops the broker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_status_and_leaves_the_log_intact() {
    let broker = Broker::start();
    let mut admin = broker.admin().await;
    let mut client = broker.client().await;
    create_topic(&mut admin, "good", 2, v1::TopicConfig::default()).await;
    let small = v1::TopicConfig {
        max_message_bytes: Some(512),
        ..Default::default()
    };
    create_topic(&mut admin, "small", 1, small).await;
    for (topic, partition) in [("good", 0), ("good", 1), ("small", 0)] {
        let records = (0..3)
            .map(|i| record(Some(b"k"), format!("{topic}-{partition}-{i}").as_bytes()))
            .collect();
        client
            .produce(produce_records(topic, partition, records))
            .await
            .expect("produce the good data");
    }
    let good_before = snapshot(&mut client, "good", 2).await;
    let small_before = snapshot(&mut client, "small", 1).await;
    let (valid, _) = encode(
        &[Pushed {
            timestamp: 1_700_000_000_000,
            key: Some(b"key"),
            value: Some(b"a value long enough to corrupt"),
            headers: &[("h", b"v")],
        }],
        0,
    );

    // Unknown topic, everywhere a topic is named.
    let status = expect_code(
        client
            .produce(produce_batch("nope", 0, valid.clone()))
            .await,
        Code::NotFound,
        "produce to an unknown topic",
    );
    assert!(status.message().contains("nope"), "{status:?}");
    expect_code(
        client.fetch(fetch_request("nope", 0, 0, true)).await,
        Code::NotFound,
        "fetch from an unknown topic",
    );
    expect_code(
        client
            .subscribe(v1::SubscribeRequest {
                topic: "nope".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "subscribe to an unknown topic",
    );
    expect_code(
        admin
            .describe_topic(v1::DescribeTopicRequest {
                name: "nope".into(),
            })
            .await,
        Code::NotFound,
        "describe an unknown topic",
    );
    expect_code(
        admin
            .delete_topic(v1::DeleteTopicRequest {
                name: "nope".into(),
            })
            .await,
        Code::NotFound,
        "delete an unknown topic",
    );
    expect_code(
        admin
            .list_offsets(v1::ListOffsetsRequest {
                topic: "nope".into(),
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "list offsets of an unknown topic",
    );

    // Unknown partition.
    let status = expect_code(
        client
            .produce(produce_batch("good", 2, valid.clone()))
            .await,
        Code::NotFound,
        "produce to an unknown partition",
    );
    assert!(status.message().contains("partition 2"), "{status:?}");
    expect_code(
        client.fetch(fetch_request("good", 7, 0, false)).await,
        Code::NotFound,
        "fetch from an unknown partition",
    );
    expect_code(
        client
            .subscribe(v1::SubscribeRequest {
                topic: "good".into(),
                partition: 2,
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "subscribe to an unknown partition",
    );
    expect_code(
        admin
            .list_offsets(v1::ListOffsetsRequest {
                topic: "good".into(),
                partition: 9,
                ..Default::default()
            })
            .await,
        Code::NotFound,
        "list offsets of an unknown partition",
    );

    // Bad create requests.
    let long = "x".repeat(250);
    for name in [
        "",
        "has space",
        "a/b",
        "..",
        ".",
        "ünïcode",
        long.as_str(),
        "../escape",
    ] {
        expect_code(
            admin
                .create_topic(v1::CreateTopicRequest {
                    name: name.into(),
                    partitions: 1,
                    config: None,
                })
                .await,
            Code::InvalidArgument,
            &format!("create topic {name:?}"),
        );
    }
    expect_code(
        admin
            .create_topic(v1::CreateTopicRequest {
                name: "good".into(),
                partitions: 2,
                config: None,
            })
            .await,
        Code::AlreadyExists,
        "create a duplicate topic",
    );
    expect_code(
        admin
            .create_topic(v1::CreateTopicRequest {
                name: "fresh".into(),
                partitions: 1,
                config: Some(v1::TopicConfig {
                    durability: Some("sometimes".into()),
                    ..Default::default()
                }),
            })
            .await,
        Code::InvalidArgument,
        "create with a bad durability",
    );
    expect_code(
        admin
            .create_topic(v1::CreateTopicRequest {
                name: "fresh".into(),
                partitions: 0,
                config: None,
            })
            .await,
        Code::InvalidArgument,
        "create with 0 partitions",
    );
    expect_code(
        admin
            .create_topic(v1::CreateTopicRequest {
                name: "fresh".into(),
                partitions: 1,
                config: Some(v1::TopicConfig {
                    retention_ms: Some(0),
                    ..Default::default()
                }),
            })
            .await,
        Code::InvalidArgument,
        "create with retention_ms 0",
    );

    // Bad batches.
    let mut corrupt = valid.clone();
    let last = corrupt.len() - 3;
    corrupt[last] ^= 0x55;
    let status = expect_code(
        client.produce(produce_batch("good", 0, corrupt)).await,
        Code::InvalidArgument,
        "a batch with a corrupted payload",
    );
    assert!(status.message().contains("checksum"), "{status:?}");
    let mut bad_crc = valid.clone();
    bad_crc[17] ^= 0xff; // the CRC field itself
    expect_code(
        client.produce(produce_batch("good", 0, bad_crc)).await,
        Code::InvalidArgument,
        "a batch with a corrupted CRC",
    );
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("a truncated batch", valid[..valid.len() - 5].to_vec()),
        ("a truncated header", valid[..20].to_vec()),
        ("garbage", b"this is not a record batch".to_vec()),
        ("long garbage", vec![0xa5; 200]),
        ("zeros", vec![0; 100]),
        ("two batches", [valid.clone(), valid.clone()].concat()),
        ("trailing bytes", [valid.clone(), vec![0; 3]].concat()),
    ];
    for (what, bytes) in cases {
        expect_code(
            client.produce(produce_batch("good", 1, bytes)).await,
            Code::InvalidArgument,
            what,
        );
    }
    expect_code(
        client
            .produce(v1::ProduceRequest {
                records: vec![record(None, b"both")],
                ..produce_batch("good", 0, valid.clone())
            })
            .await,
        Code::InvalidArgument,
        "records and a batch",
    );
    expect_code(
        client.produce(produce_records("good", 0, vec![])).await,
        Code::InvalidArgument,
        "an empty produce",
    );
    expect_code(
        client
            .produce(v1::ProduceRequest {
                topic: "good".into(),
                ..Default::default()
            })
            .await,
        Code::InvalidArgument,
        "an empty produce without a target",
    );
    expect_code(
        client
            .produce(v1::ProduceRequest {
                acks: 7,
                ..produce_batch("good", 0, valid.clone())
            })
            .await,
        Code::InvalidArgument,
        "an unknown acks mode",
    );

    // Too large for the topic, in both forms.
    let mut builder = BatchBuilder::new();
    builder.push(1_700_000_000_000, None, Some(&[7u8; 600]), &[]);
    let status = expect_code(
        client
            .produce(produce_batch("small", 0, builder.finish()))
            .await,
        Code::ResourceExhausted,
        "a batch over max_message_bytes",
    );
    assert!(status.message().contains("512"), "{status:?}");
    let big = (0..20).map(|_| record(None, &[1u8; 40])).collect();
    expect_code(
        client.produce(produce_records("small", 0, big)).await,
        Code::ResourceExhausted,
        "records over max_message_bytes",
    );

    // Reads out of range.
    let status = expect_code(
        client.fetch(fetch_request("good", 0, 4, true)).await,
        Code::OutOfRange,
        "fetch past the end",
    );
    assert!(status.message().contains("0 to 3"), "{status:?}");
    expect_code(
        client
            .fetch(fetch_request("good", 0, u64::MAX, false))
            .await,
        Code::OutOfRange,
        "fetch at u64::MAX",
    );
    expect_code(
        client
            .subscribe(v1::SubscribeRequest {
                topic: "good".into(),
                partition: 1,
                offset: 100,
                ..Default::default()
            })
            .await,
        Code::OutOfRange,
        "subscribe past the end",
    );
    expect_code(
        admin
            .list_offsets(v1::ListOffsetsRequest {
                topic: "good".into(),
                partition: 0,
                spec: 42,
                timestamp_ms: 0,
            })
            .await,
        Code::InvalidArgument,
        "an unknown offset spec",
    );

    // Nothing changed, nothing was created, and the broker still takes a good produce.
    assert_eq!(snapshot(&mut client, "good", 2).await, good_before);
    assert_eq!(snapshot(&mut client, "small", 1).await, small_before);
    assert_eq!(high_watermarks(&mut admin, "good").await, vec![3, 3]);
    assert_eq!(high_watermarks(&mut admin, "small").await, vec![3]);
    assert_eq!(
        topic_names(&mut admin).await,
        vec!["good".to_string(), "small".to_string()]
    );
    let data = broker.data_dir();
    assert_eq!(dir_names(&data.join("topics")), vec!["good", "small"]);
    assert!(dir_names(&data.join("tmp")).is_empty());
    let answer = client
        .produce(produce_batch("good", 0, valid))
        .await
        .expect("a good produce after the bad ones")
        .into_inner();
    assert_eq!((answer.base_offset, answer.last_offset), (3, 3));
    let answer = client
        .produce(produce_records("small", 0, vec![record(None, b"fits")]))
        .await
        .expect("a good produce to the small topic")
        .into_inner();
    assert_eq!(answer.base_offset, 3);
}

/// A deterministic pseudo-random sequence (an LCG), so the data is the same every run.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, below: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % below
    }
}

/// The answer ListOffsets(TIMESTAMP) must give, found by scanning: the first offset in
/// log order whose timestamp is at or after `target`, else the high watermark.
fn offset_for_timestamp(records: &[Rec], target: i64) -> u64 {
    records
        .iter()
        .find(|r| r.timestamp >= target)
        .map_or(records.len() as u64, |r| r.offset)
}

async fn check_offsets(admin: &mut AdminClient<Channel>, records: &[Rec], targets: &[i64]) {
    let ask = |spec: v1::OffsetSpec, timestamp_ms: i64| {
        let mut admin = admin.clone();
        async move {
            admin
                .list_offsets(v1::ListOffsetsRequest {
                    topic: "times".into(),
                    partition: 0,
                    spec: spec.into(),
                    timestamp_ms,
                })
                .await
                .expect("list offsets")
                .into_inner()
                .offset
        }
    };
    assert_eq!(ask(v1::OffsetSpec::Earliest, 0).await, 0);
    assert_eq!(ask(v1::OffsetSpec::Latest, 0).await, records.len() as u64);
    for &target in targets {
        assert_eq!(
            ask(v1::OffsetSpec::Timestamp, target).await,
            offset_for_timestamp(records, target),
            "ListOffsets(TIMESTAMP, {target})"
        );
    }
}

/// Guards ListOffsets: earliest, latest, and by timestamp over records with explicit,
/// non-monotonic timestamps spread over several segments, compared with a scan of the
/// fetched records — before and after a graceful restart and a crash (indexes reloaded
/// and rebuilt).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_offsets_match_a_scan_of_the_log() {
    let mut broker = Broker::start();
    let mut admin = broker.admin().await;
    let mut client = broker.client().await;
    let config = v1::TopicConfig {
        segment_bytes: Some(2048),
        ..Default::default()
    };
    create_topic(&mut admin, "times", 1, config).await;
    let empty: Vec<Rec> = Vec::new();
    check_offsets(
        &mut admin,
        &empty,
        &[i64::MIN, 0, 1_700_000_000_000, i64::MAX],
    )
    .await;

    const BASE: i64 = 1_700_000_000_000;
    let mut rng = Lcg(7);
    let mut produced = 0u64;
    for i in 0..60u64 {
        let count = rng.next(5) + 1;
        // Mostly rising, with jumps back in time inside and across batches.
        let times: Vec<i64> = (0..count)
            .map(|_| BASE + (i * 100) as i64 + rng.next(1500) as i64 - 700)
            .collect();
        let answer = if i.is_multiple_of(2) {
            let records = times
                .iter()
                .map(|&t| v1::Record {
                    value: Some(format!("{i}@{t}").into_bytes().into()),
                    timestamp_ms: t,
                    ..Default::default()
                })
                .collect();
            client.produce(produce_records("times", 0, records)).await
        } else {
            let mut builder = BatchBuilder::new();
            for &t in &times {
                builder.push(t, None, Some(format!("{i}@{t}").as_bytes()), &[]);
            }
            client
                .produce(produce_batch("times", 0, builder.finish()))
                .await
        };
        assert_eq!(answer.expect("produce").into_inner().base_offset, produced);
        produced += count;
    }
    let records = read_partition(&mut client, "times", 0).await;
    assert_eq!(records.len() as u64, produced);
    let segments = admin
        .describe_topic(v1::DescribeTopicRequest {
            name: "times".into(),
        })
        .await
        .expect("describe")
        .into_inner()
        .partitions[0]
        .segments;
    assert!(segments > 3, "expected several segments, got {segments}");

    let mut targets: BTreeSet<i64> = [i64::MIN, -1, 0, BASE - 10_000, i64::MAX].into();
    for r in &records {
        targets.extend([r.timestamp - 1, r.timestamp, r.timestamp + 1]);
    }
    let targets: Vec<i64> = targets.into_iter().collect();
    check_offsets(&mut admin, &records, &targets).await;

    broker.restart_graceful();
    let mut admin = broker.admin().await;
    check_offsets(&mut admin, &records, &targets).await;

    broker.restart_after_kill();
    let mut admin = broker.admin().await;
    let mut client = broker.client().await;
    assert_eq!(read_partition(&mut client, "times", 0).await, records);
    check_offsets(&mut admin, &records, &targets).await;
}

/// One acknowledged produce of the crash test.
#[derive(Debug, Clone)]
struct Acked {
    partition: u32,
    base_offset: u64,
    last_offset: u64,
    values: Vec<String>,
}

/// Guards durability under concurrency: four producers on their own connections write
/// to a 4-partition fsync topic (by partition and by key, in both produce forms) until
/// the broker is SIGKILLed after 300 acknowledgements. After a restart every
/// acknowledged record is at its acknowledged offset with its content, every partition
/// is dense from 0 with no gaps or duplicates, and each producer's records are in its
/// send order (at most its one in-flight batch beyond what was acknowledged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_records_survive_a_crash_under_concurrent_producers() {
    const PARTITIONS: u32 = 4;
    const PRODUCERS: usize = 4;
    const KILL_AFTER: usize = 300;
    let mut broker = Broker::start();
    let mut admin = broker.admin().await;
    let config = v1::TopicConfig {
        durability: Some("fsync".into()),
        ..Default::default()
    };
    create_topic(&mut admin, "crash", PARTITIONS, config).await;

    let acks: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let count = Arc::new(AtomicUsize::new(0));
    let reached = Arc::new(tokio::sync::Notify::new());
    // Set just before the SIGKILL: an error before it would be a broker failure.
    let killed = Arc::new(AtomicBool::new(false));
    let mut producers = tokio::task::JoinSet::new();
    for producer in 0..PRODUCERS {
        let mut client = broker.client().await;
        let (acks, count, reached) = (Arc::clone(&acks), Arc::clone(&count), Arc::clone(&reached));
        let killed = Arc::clone(&killed);
        producers.spawn(async move {
            let key = format!("producer-{producer}").into_bytes();
            let mut seq = 0usize;
            let mut round = 0usize;
            loop {
                let values: Vec<String> = (0..round % 4 + 1)
                    .map(|i| format!("{producer}:{}", seq + i))
                    .collect();
                // Producers 0 and 1 name their partition; 2 and 3 send a key.
                let target = if producer < 2 {
                    v1::produce_request::Target::Partition(producer as u32)
                } else {
                    v1::produce_request::Target::Key(key.clone().into())
                };
                let mut request = v1::ProduceRequest {
                    topic: "crash".into(),
                    target: Some(target),
                    ..Default::default()
                };
                if (producer + round).is_multiple_of(2) {
                    request.records = values
                        .iter()
                        .map(|v| record(Some(&key), v.as_bytes()))
                        .collect();
                } else {
                    request.batch = batch_of(&key, &values).into();
                }
                let answer = match client.produce(request).await {
                    Ok(answer) => answer.into_inner(),
                    // The broker died: stop. The last batch may or may not be stored.
                    Err(status) => {
                        assert!(
                            killed.load(Ordering::SeqCst),
                            "producer {producer} failed before the crash: {status:?}"
                        );
                        return (producer, seq, values.len(), status);
                    }
                };
                seq += values.len();
                acks.lock().expect("acks lock").push(Acked {
                    partition: answer.partition,
                    base_offset: answer.base_offset,
                    last_offset: answer.last_offset,
                    values,
                });
                if count.fetch_add(1, Ordering::SeqCst) + 1 == KILL_AFTER {
                    reached.notify_one();
                }
                round += 1;
            }
        });
    }

    // Kill after KILL_AFTER acknowledgements; fail if every producer stopped first.
    tokio::select! {
        _ = reached.notified() => {}
        _ = async { while producers.join_next().await.is_some() {} } => {
            panic!("the producers stopped before {KILL_AFTER} acks")
        }
    }
    killed.store(true, Ordering::SeqCst);
    broker.kill();
    let mut ends = Vec::new();
    while let Some(end) = producers.join_next().await {
        ends.push(end.expect("a producer task"));
    }
    assert_eq!(ends.len(), PRODUCERS, "every producer ran until the crash");
    let acks = acks.lock().expect("acks lock").clone();
    assert!(acks.len() >= KILL_AFTER);

    broker.restart();
    let mut client = broker.client().await;
    let mut admin = broker.admin().await;
    let watermarks = high_watermarks(&mut admin, "crash").await;
    let logs = snapshot(&mut client, "crash", PARTITIONS).await;
    for (p, log) in logs.iter().enumerate() {
        // Dense from 0 up to the high watermark.
        let offsets: Vec<u64> = log.iter().map(|r| r.offset).collect();
        assert_eq!(
            offsets,
            (0..watermarks[p]).collect::<Vec<_>>(),
            "partition {p} is not dense"
        );
    }
    for ack in &acks {
        let log = &logs[ack.partition as usize];
        assert_eq!(
            ack.last_offset - ack.base_offset + 1,
            ack.values.len() as u64,
            "{ack:?}"
        );
        for (i, value) in ack.values.iter().enumerate() {
            let stored = log
                .get((ack.base_offset + i as u64) as usize)
                .unwrap_or_else(|| panic!("acknowledged record lost: {ack:?}"));
            assert_eq!(
                stored.value.as_deref(),
                Some(value.as_bytes()),
                "acknowledged record changed: {ack:?}"
            );
        }
    }
    // Per producer: exactly its first n records, in order, no duplicates, where n is
    // what was acknowledged plus possibly the batch in flight at the crash.
    let mut seen: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    let mut partition_of: BTreeMap<usize, usize> = BTreeMap::new();
    for (p, log) in logs.iter().enumerate() {
        for r in log {
            let value = String::from_utf8(r.value.clone().expect("a value")).expect("UTF-8");
            let (producer, seq) = value.split_once(':').expect("producer:seq");
            let producer: usize = producer.parse().expect("a producer number");
            let seq: usize = seq.parse().expect("a sequence number");
            assert_eq!(
                r.key.as_deref(),
                Some(format!("producer-{producer}").as_bytes())
            );
            let home = *partition_of.entry(producer).or_insert(p);
            assert_eq!(home, p, "producer {producer} wrote to two partitions");
            seen.entry(producer).or_default().push(seq);
        }
    }
    for (producer, acked, in_flight, status) in ends {
        let seqs = seen.remove(&producer).unwrap_or_default();
        let n = seqs.len();
        assert_eq!(
            seqs,
            (0..n).collect::<Vec<_>>(),
            "producer {producer}'s records are out of order, duplicated or missing"
        );
        assert!(
            n == acked || n == acked + in_flight,
            "producer {producer}: {n} records stored, {acked} acknowledged, \
             {in_flight} in flight when it failed with {status:?}"
        );
    }

    // The broker takes writes again.
    let answer = client
        .produce(produce_records("crash", 0, vec![record(None, b"after")]))
        .await
        .expect("produce after recovery")
        .into_inner();
    assert_eq!(answer.base_offset, watermarks[0]);
}

/// Guards topic deletion: the topic leaves the list and its directory is removed, a
/// Subscribe stream on it ends with NOT_FOUND, its name is free again — a new topic of
/// that name starts empty — and the deletion survives a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_topic_is_gone_and_its_name_reusable() {
    let mut broker = Broker::start();
    let mut admin = broker.admin().await;
    let mut client = broker.client().await;
    create_topic(&mut admin, "doomed", 2, v1::TopicConfig::default()).await;
    create_topic(&mut admin, "kept", 1, v1::TopicConfig::default()).await;
    for p in 0..2 {
        client
            .produce(produce_records("doomed", p, vec![record(None, b"old"); 3]))
            .await
            .expect("produce to the doomed topic");
    }
    client
        .produce(produce_records("kept", 0, vec![record(None, b"kept")]))
        .await
        .expect("produce to the kept topic");
    let topics = broker.data_dir().join("topics");
    assert!(topics.join("doomed").is_dir());
    let mut tail = client
        .subscribe(v1::SubscribeRequest {
            topic: "doomed".into(),
            partition: 1,
            offset: 0,
            max_bytes: 0,
            decode: true,
            member: None,
        })
        .await
        .expect("subscribe to the doomed topic")
        .into_inner();
    let first = within("the subscriber's first message", tail.message())
        .await
        .expect("a healthy stream")
        .expect("a message");
    assert_eq!(first.records.len(), 3);

    admin
        .delete_topic(v1::DeleteTopicRequest {
            name: "doomed".into(),
        })
        .await
        .expect("delete the topic");
    assert_eq!(topic_names(&mut admin).await, vec!["kept".to_string()]);
    assert!(
        !topics.join("doomed").exists(),
        "the topic directory is still there"
    );
    match within("the subscriber's end", tail.message()).await {
        Err(status) => assert_eq!(status.code(), Code::NotFound, "{status:?}"),
        Ok(message) => panic!("the subscription outlived its topic: {message:?}"),
    }
    assert!(dir_names(&broker.data_dir().join("trash")).is_empty());
    expect_code(
        client.fetch(fetch_request("doomed", 0, 0, true)).await,
        Code::NotFound,
        "fetch from a deleted topic",
    );
    expect_code(
        client
            .produce(produce_records("doomed", 0, vec![record(None, b"x")]))
            .await,
        Code::NotFound,
        "produce to a deleted topic",
    );
    expect_code(
        admin
            .delete_topic(v1::DeleteTopicRequest {
                name: "doomed".into(),
            })
            .await,
        Code::NotFound,
        "delete twice",
    );

    // Same name, new topic: empty, with its own partition count.
    let again = create_topic(&mut admin, "doomed", 3, v1::TopicConfig::default()).await;
    assert_eq!(again.partitions, 3);
    assert_eq!(high_watermarks(&mut admin, "doomed").await, vec![0, 0, 0]);
    assert!(snapshot(&mut client, "doomed", 3)
        .await
        .iter()
        .all(Vec::is_empty));
    let answer = client
        .produce(produce_records("doomed", 0, vec![record(None, b"new")]))
        .await
        .expect("produce to the recreated topic")
        .into_inner();
    assert_eq!(answer.base_offset, 0);

    // Delete again and restart: it stays gone; the other topic is untouched.
    admin
        .delete_topic(v1::DeleteTopicRequest {
            name: "doomed".into(),
        })
        .await
        .expect("delete the recreated topic");
    broker.restart_graceful();
    let mut admin = broker.admin().await;
    let mut client = broker.client().await;
    assert_eq!(topic_names(&mut admin).await, vec!["kept".to_string()]);
    assert_eq!(dir_names(&broker.data_dir().join("topics")), vec!["kept"]);
    let kept = read_partition(&mut client, "kept", 0).await;
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].value.as_deref(), Some(&b"kept"[..]));
}

/// Runs the `strata` CLI against `broker` with `stdin`; returns (success, stdout, stderr).
fn cli(broker: &Broker, args: &[&str], stdin: &str) -> (bool, String, String) {
    use std::io::Write;
    let mut child = strata_command()
        .args(args)
        .arg("--broker")
        .arg(broker.addr_arg())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the strata CLI");
    let mut input = child.stdin.take().expect("piped stdin");
    input
        .write_all(stdin.as_bytes())
        .expect("write the CLI's stdin");
    drop(input);
    let output = child.wait_with_output().expect("run the strata CLI");
    (
        output.status.success(),
        String::from_utf8(output.stdout).expect("UTF-8 stdout"),
        String::from_utf8(output.stderr).expect("UTF-8 stderr"),
    )
}

/// Guards the command line client: `topic create`, `produce` (lines of stdin, with
/// `--key` or `--partition`) and `consume` (tab-separated `partition offset timestamp
/// key value` lines, stopping at the end) work through the binary with exit code 0, and
/// a failing command exits non-zero with a readable message on stderr.
#[test]
fn cli_creates_produces_and_consumes() {
    let broker = Broker::start();
    let (ok, out, err) = cli(
        &broker,
        &["topic", "create", "cli", "--partitions", "2"],
        "",
    );
    assert!(ok, "topic create failed: {err}");
    assert_eq!(out, "created topic cli with 2 partition(s)\n");

    let (ok, _, err) = cli(
        &broker,
        &["produce", "cli", "--key", "user-7"],
        "a\nb b\nc\n",
    );
    assert!(ok, "produce --key failed: {err}");
    let keyed = strata_proto::partition_for_key(b"user-7", 2);
    assert!(
        err.contains(&format!("record(s) to partition {keyed} at offsets 0..=")),
        "{err}"
    );
    let other = 1 - keyed;
    let (ok, _, err) = cli(
        &broker,
        &["produce", "cli", "--partition", &other.to_string()],
        "x\ny\n",
    );
    assert!(ok, "produce --partition failed: {err}");

    let (ok, out, err) = cli(&broker, &["consume", "cli"], "");
    assert!(ok, "consume failed: {err}");
    let mut lines: Vec<Vec<String>> = out
        .lines()
        .map(|l| l.split('\t').map(str::to_string).collect())
        .collect();
    lines.sort_by_key(|f| (f[0].clone(), f[1].parse::<u64>().expect("an offset")));
    let mut expected = vec![
        (keyed, 0, "user-7", "a"),
        (keyed, 1, "user-7", "b b"),
        (keyed, 2, "user-7", "c"),
        (other, 0, "", "x"),
        (other, 1, "", "y"),
    ];
    expected.sort();
    assert_eq!(lines.len(), expected.len(), "consume printed:\n{out}");
    for (fields, (p, offset, key, value)) in lines.iter().zip(&expected) {
        assert_eq!(fields.len(), 5, "a line of 5 fields: {fields:?}");
        assert_eq!(fields[0], p.to_string());
        assert_eq!(fields[1], offset.to_string());
        let timestamp: i64 = fields[2].parse().expect("a timestamp");
        assert!(
            timestamp > 1_600_000_000_000,
            "a broker-stamped time: {fields:?}"
        );
        assert_eq!((fields[3].as_str(), fields[4].as_str()), (*key, *value));
    }

    // One partition, from an offset.
    let (ok, out, err) = cli(
        &broker,
        &[
            "consume",
            "cli",
            "--partition",
            &keyed.to_string(),
            "--from",
            "1",
        ],
        "",
    );
    assert!(ok, "consume --from 1 failed: {err}");
    let values: Vec<&str> = out
        .lines()
        .map(|l| l.rsplit('\t').next().expect("a value"))
        .collect();
    assert_eq!(values, vec!["b b", "c"]);

    let (ok, out, err) = cli(&broker, &["topic", "list"], "");
    assert!(ok, "topic list failed: {err}");
    assert!(out.lines().any(|l| l.starts_with("cli ")), "{out}");

    let (ok, out, err) = cli(&broker, &["topic", "describe", "missing"], "");
    assert!(!ok, "describing a missing topic succeeded: {out}");
    assert!(
        err.contains("not found") && err.contains("missing"),
        "an unreadable error: {err}"
    );
    let (ok, _, err) = cli(&broker, &["topic", "create", "cli"], "");
    assert!(!ok && err.contains("already exists"), "{err}");
}

/// Guards the CLI's errors: each one a person can fix says how. Producing to or
/// consuming a missing topic suggests creating it; an unreachable broker suggests
/// starting one or pointing --broker at it (and names its cause once); `--broker` also
/// works before the subcommand and is refused for `serve`; sizes and durations take
/// units.
#[test]
fn cli_errors_name_the_next_step() {
    let broker = Broker::start();
    let create = "create it with `strata topic create nope`";
    let (ok, _, err) = cli(&broker, &["produce", "nope"], "line\n");
    assert!(!ok && err.contains(create), "{err}");
    let (ok, _, err) = cli(&broker, &["consume", "nope"], "");
    assert!(!ok && err.contains(create), "{err}");
    let (ok, _, err) = cli(&broker, &["consume", "nope", "--group", "g"], "");
    assert!(!ok && err.contains(create), "{err}");
    let (ok, _, err) = cli(&broker, &["topic", "describe", "nope"], "");
    assert!(!ok && err.contains("`strata topic list`"), "{err}");

    // A port nothing listens on: the broker's own, once it is gone.
    let unreachable = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .to_string();
    let output = strata_command()
        .args(["topic", "list", "--broker", &unreachable])
        .output()
        .expect("run the CLI");
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{err}");
    assert!(
        err.contains("`strata serve`") && err.contains("--broker") && err.contains("refused"),
        "{err}"
    );
    assert_eq!(err.matches("tcp connect error").count(), 1, "{err}");

    let output = strata_command()
        .args(["--broker", &broker.addr_arg(), "topic", "create", "units"])
        .args(["--retention-ms", "3d", "--segment-bytes", "64MiB"])
        .args(["--retention-bytes", "-1", "--max-message-bytes", "2MiB"])
        .output()
        .expect("run the CLI");
    assert!(output.status.success(), "{output:?}");
    let (ok, out, err) = cli(&broker, &["topic", "describe", "units"], "");
    assert!(ok, "{err}");
    for line in [
        "retention_ms:      259200000 (3d)",
        "retention_bytes:   unlimited",
        "segment_bytes:     67108864 (64MiB)",
        "max_message_bytes: 2097152 (2MiB)",
    ] {
        assert!(out.contains(line), "{line:?} in:\n{out}");
    }
    let (ok, _, err) = cli(
        &broker,
        &["topic", "create", "bad", "--segment-bytes", "1GB"],
        "",
    );
    assert!(!ok && err.contains("KiB, MiB, GiB"), "{err}");

    let output = strata_command()
        .args(["--broker", &broker.addr_arg(), "serve"])
        .output()
        .expect("run the CLI");
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && err.contains("--listen"),
        "{err}"
    );
}

/// Guards `strata consume --group`: a member prints what it reads, commits it, and a
/// member started later resumes after it; `--max-records` stops, commits and leaves.
#[test]
fn cli_group_members_commit_what_they_print() {
    let broker = Broker::start();
    let (ok, _, err) = cli(&broker, &["topic", "create", "ledger"], "");
    assert!(ok, "{err}");
    let (ok, _, err) = cli(&broker, &["produce", "ledger"], "a\nb\nc\nd\ne\n");
    assert!(ok, "{err}");
    let member = |max: &str| {
        cli(
            &broker,
            &[
                "consume",
                "ledger",
                "--group",
                "audit",
                "--max-records",
                max,
            ],
            "",
        )
    };
    let values = |out: &str| -> Vec<String> {
        out.lines()
            .map(|l| l.rsplit('\t').next().unwrap_or_default().to_string())
            .collect()
    };
    let (ok, out, err) = member("3");
    assert!(ok, "{err}");
    assert_eq!(values(&out), ["a", "b", "c"]);
    assert!(err.starts_with("joined group audit as member "), "{err}");
    assert!(err.contains("owns ledger/0\n"), "{err}");
    assert!(err.ends_with("committed and left group audit\n"), "{err}");
    let (ok, out, err) = member("2");
    assert!(ok, "{err}");
    assert_eq!(values(&out), ["d", "e"], "resumes at the committed offset");
    let (ok, out, err) = cli(&broker, &["group", "describe", "audit"], "");
    assert!(ok, "{err}");
    assert!(
        out.lines().any(
            |l| l.split_whitespace().collect::<Vec<_>>() == ["ledger", "0", "5", "5", "0", "-"]
        ),
        "{out}"
    );
}

/// Guards graceful shutdown with waiting clients: SIGTERM while a Subscribe stream is
/// open and a long poll is pending ends the stream with UNAVAILABLE (so the client
/// reconnects rather than taking it for the end), answers the long poll with nothing,
/// and the broker exits successfully instead of waiting for those clients to leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_does_not_wait_for_subscribers_or_long_polls() {
    let mut broker = Broker::start();
    let mut admin = broker.admin().await;
    create_topic(&mut admin, "tail", 1, v1::TopicConfig::default()).await;
    let mut client = broker.client().await;
    client
        .produce(produce_records("tail", 0, vec![record(None, b"one")]))
        .await
        .expect("produce");
    let mut stream = client
        .subscribe(v1::SubscribeRequest {
            topic: "tail".into(),
            partition: 0,
            offset: 0,
            max_bytes: 0,
            decode: true,
            member: None,
        })
        .await
        .expect("subscribe")
        .into_inner();
    let first = within("the first message", stream.message())
        .await
        .expect("a healthy stream")
        .expect("a message");
    assert_eq!(first.records.len(), 1);

    // The long poll goes out first on its connection; the answer to a later request on
    // the same connection shows the broker has it.
    let mut poller = broker.client().await;
    let mut barrier = poller.clone();
    let mut poll = Box::pin(poller.fetch(v1::FetchRequest {
        max_wait_ms: 10_000,
        ..fetch_request("tail", 0, 1, true)
    }));
    assert!(poll_once(&mut poll).await, "the long poll answered at once");
    barrier
        .fetch(fetch_request("tail", 0, 0, true))
        .await
        .expect("a fetch behind the long poll");

    broker.terminate();
    let end = within("the end of the stream", stream.message()).await;
    match end {
        Err(status) => assert_eq!(status.code(), Code::Unavailable, "{status:?}"),
        Ok(message) => panic!("the stream went on after SIGTERM: {message:?}"),
    }
    let answer = within("the long poll", poll)
        .await
        .expect("the long poll answers")
        .into_inner();
    assert!(answer.records.is_empty(), "{answer:?}");
    broker.wait_stopped();

    broker.restart();
    let mut client = broker.client().await;
    assert_eq!(read_partition(&mut client, "tail", 0).await.len(), 1);
}

/// Guards the data directory lock: a second broker on the same directory must refuse to
/// start (two writers would corrupt each other's logs), with a clear message.
#[test]
fn a_second_broker_on_the_same_data_dir_refuses_to_start() {
    let broker = Broker::start();
    let output = strata_command()
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(broker.data_dir())
        .output()
        .expect("run a second broker");
    assert!(!output.status.success(), "second broker must fail");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let holder = format!("is in use by strata process {}; stop", broker.pid());
    assert!(
        stderr.contains(&holder) && stderr.contains("--data-dir"),
        "stderr: {stderr}"
    );
}

/// Guards the listen address check: a broker whose address is taken says to choose
/// another with --listen, and leaves no data directory behind (it binds the address
/// before it creates the directory).
#[test]
fn a_broker_whose_address_is_taken_says_so_and_creates_nothing() {
    let broker = Broker::start();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let data = dir.path().join("never-created");
    let output = strata_command()
        .args(["serve", "--listen", &broker.addr_arg(), "--data-dir"])
        .arg(&data)
        .output()
        .expect("run a second broker");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("address is in use") && stderr.contains("--listen"),
        "stderr: {stderr}"
    );
    assert!(!data.exists(), "the data directory was created");
}

/// Guards the HTTP listener's wiring: by default it serves health next to gRPC, and
/// `--http-listen off` turns it off (no announcement, and the broker still serves gRPC).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_listener_serves_health_and_can_be_turned_off() {
    let broker = Broker::start();
    let http = broker.http_addr().expect("an HTTP listener by default");
    assert_eq!(http_get(http, "/healthz").await, (200, "ok\n".to_string()));
    assert_eq!(
        http_get(http, "/readyz").await,
        (200, "ready\n".to_string())
    );
    assert_eq!(http_get(http, "/nowhere").await.0, 404);

    let quiet = Broker::start_with(&["--http-listen", "off"]);
    assert_eq!(quiet.http_addr(), None);
    let mut admin = quiet.admin().await;
    create_topic(&mut admin, "t", 1, v1::TopicConfig::default()).await;
}

/// Guards the decoded-form budget: decoding a large batch of tiny records stops after
/// about `max_bytes` of decoded records and continues inside the batch, so a decoded
/// fetch never grows past the gRPC message limit, and consecutive fetches still see
/// every record exactly once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoded_fetch_stops_at_its_budget_and_resumes_inside_the_batch() {
    let broker = Broker::start();
    let mut admin = broker.admin().await;
    create_topic(&mut admin, "tiny", 1, v1::TopicConfig::default()).await;
    let mut client = broker.client().await;
    let records: Vec<v1::Record> = (0..5_000u32)
        .map(|i| record(None, &i.to_be_bytes()))
        .collect();
    client
        .produce(produce_records("tiny", 0, records))
        .await
        .expect("produce one batch of 5,000 records");

    let mut offset = 0;
    let mut fetches = 0;
    while offset < 5_000 {
        let response = client
            .fetch(v1::FetchRequest {
                max_bytes: 4096,
                ..fetch_request("tiny", 0, offset, true)
            })
            .await
            .expect("decoded fetch")
            .into_inner();
        assert!(!response.records.is_empty(), "progress at offset {offset}");
        for r in &response.records {
            assert_eq!(r.offset, offset, "dense, in order");
            assert_eq!(r.value.as_deref(), Some(&(offset as u32).to_be_bytes()[..]));
            offset += 1;
        }
        assert_eq!(response.next_offset, offset);
        fetches += 1;
    }
    assert!(
        fetches > 10,
        "a 4 KiB budget needs many fetches, took {fetches}"
    );
}

/// The `LAG` column of partition `partition` in `strata group describe` output, and the
/// total lag line.
fn described_lag(out: &str, topic: &str, partition: u32) -> (String, String) {
    let row = out
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() >= 6 && f[0] == topic && f[1] == partition.to_string())
        .unwrap_or_else(|| panic!("no row for {topic}/{partition} in:\n{out}"));
    let total = out
        .lines()
        .find_map(|l| l.strip_prefix("total lag:"))
        .unwrap_or_else(|| panic!("no total lag in:\n{out}"))
        .trim()
        .to_string();
    (row[4].to_string(), total)
}

/// Guards `strata group list|describe|reset|delete`: describe shows the lag of a group
/// whose consumer stopped (growing as records arrive), and zero once it caught up;
/// reset moves offsets of a group without members; errors exit non-zero with the
/// broker's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_group_describe_shows_lag_and_reset_moves_offsets() {
    use strata_proto::v1::groups_client::GroupsClient;
    let broker = Broker::start();
    let (ok, _, err) = cli(
        &broker,
        &["topic", "create", "lag", "--partitions", "2"],
        "",
    );
    assert!(ok, "{err}");
    let ten = "1\n2\n3\n4\n5\n6\n7\n8\n9\n10\n";
    assert!(cli(&broker, &["produce", "lag", "--partition", "0"], ten).0);
    assert!(
        cli(
            &broker,
            &["produce", "lag", "--partition", "1"],
            "a\nb\nc\nd\ne\nf\n"
        )
        .0
    );

    // A consumer joins, processes part of partition 0 and all of partition 1, commits
    // and stops (leaves).
    let mut groups = GroupsClient::new(broker.channel().await);
    let mut member = v1::HeartbeatResponse::default();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while member
        .assignment
        .iter()
        .map(|t| t.partitions.len())
        .sum::<usize>()
        < 2
    {
        assert!(
            std::time::Instant::now() < deadline,
            "never got both partitions"
        );
        member = groups
            .heartbeat(v1::HeartbeatRequest {
                group: "billing".into(),
                member_id: member.member_id.clone(),
                member_epoch: member.member_epoch,
                topics: vec!["lag".into()],
                owned: member.assignment.clone(),
                client_id: "cli-test".into(),
                ..Default::default()
            })
            .await
            .expect("heartbeat")
            .into_inner();
    }
    let commit = |member_id: &str, epoch: u64, p0: u64, p1: u64| v1::CommitOffsetsRequest {
        group: "billing".into(),
        member_id: member_id.to_string(),
        member_epoch: epoch,
        offsets: [(0, p0), (1, p1)]
            .into_iter()
            .map(|(partition, offset)| v1::PartitionOffset {
                topic: "lag".into(),
                partition,
                offset,
                ..Default::default()
            })
            .collect(),
    };
    groups
        .commit_offsets(commit(&member.member_id, member.member_epoch, 4, 6))
        .await
        .expect("commit");
    let (ok, out, err) = cli(&broker, &["group", "describe", "billing"], "");
    assert!(ok, "{err}");
    assert!(out.contains("STABLE") && out.contains("cli-test"), "{out}");
    groups
        .leave_group(v1::LeaveGroupRequest {
            group: "billing".into(),
            member_id: member.member_id.clone(),
        })
        .await
        .expect("leave");

    let (ok, out, err) = cli(&broker, &["group", "describe", "billing"], "");
    assert!(ok, "{err}");
    assert!(out.contains("EMPTY"), "{out}");
    assert_eq!(described_lag(&out, "lag", 0), ("6".into(), "6".into()));
    assert_eq!(described_lag(&out, "lag", 1).0, "0");
    // Records keep arriving while the consumer is stopped: the lag grows.
    assert!(
        cli(
            &broker,
            &["produce", "lag", "--partition", "1"],
            "g\nh\ni\nj\nk\n"
        )
        .0
    );
    let (_, out, _) = cli(&broker, &["group", "describe", "billing"], "");
    assert_eq!(described_lag(&out, "lag", 1), ("5".into(), "11".into()));
    // It comes back and catches up (a commit from outside the empty group).
    groups
        .commit_offsets(commit("", 0, 10, 11))
        .await
        .expect("catch-up commit");
    let (_, out, _) = cli(&broker, &["group", "describe", "billing"], "");
    assert_eq!(described_lag(&out, "lag", 0), ("0".into(), "0".into()));

    let (ok, out, _) = cli(&broker, &["group", "list"], "");
    assert!(
        ok && out
            .lines()
            .any(|l| l.starts_with("billing") && l.contains("EMPTY")),
        "{out}"
    );
    let (ok, out, err) = cli(
        &broker,
        &[
            "group", "reset", "billing", "--topic", "lag", "--to", "earliest",
        ],
        "",
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("billing lag/0 -> 0") && out.contains("billing lag/1 -> 0"),
        "{out}"
    );
    let (_, out, _) = cli(&broker, &["group", "describe", "billing"], "");
    assert_eq!(described_lag(&out, "lag", 1), ("11".into(), "21".into()));
    let (ok, out, _) = cli(
        &broker,
        &[
            "group",
            "reset",
            "billing",
            "--topic",
            "lag",
            "--partition",
            "1",
            "--to",
            "7",
        ],
        "",
    );
    assert!(ok && out.trim() == "billing lag/1 -> 7", "{out}");

    let (ok, _, err) = cli(
        &broker,
        &["group", "reset", "billing", "--topic", "lag", "--to", "99"],
        "",
    );
    assert!(!ok && err.contains("out of range: offset 99"), "{err}");
    let (ok, _, err) = cli(
        &broker,
        &[
            "group", "reset", "billing", "--topic", "lag", "--to", "soon",
        ],
        "",
    );
    assert!(!ok && err.contains("expected earliest, latest"), "{err}");
    let (ok, out, err) = cli(&broker, &["group", "delete", "billing"], "");
    assert!(ok && out.contains("deleted group billing"), "{err}");
    let (ok, _, err) = cli(&broker, &["group", "describe", "billing"], "");
    assert!(!ok && err.contains("not found"), "{err}");
}

/// A mapping budget the kernel's `vm.max_map_count` cannot hold is warned about at
/// start, naming the setting to change; the default budget is not.
#[test]
fn a_mapping_budget_above_the_kernel_limit_is_warned_about_at_start() {
    let limit: u64 = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .expect("read vm.max_map_count")
        .trim()
        .parse()
        .expect("a number");
    let warning = format!(
        "the kernel's memory-mapping limit (vm.max_map_count = {limit}) is below what this \
         broker may need"
    );
    let quiet = Broker::start();
    let too_many = (limit / 2 + 1).to_string();
    let warned = Broker::start_with(&["--max-mapped-segments", &too_many]);
    let deadline = std::time::Instant::now() + HANG_GUARD;
    while !warned.log().contains(&warning) {
        assert!(
            std::time::Instant::now() < deadline,
            "no warning: {}",
            warned.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(warned.log().contains("--max-mapped-segments"));
    assert!(!quiet.log().contains(&warning), "{}", quiet.log());
}

/// Retention runs on its own, at `--retention-check-ms`: the segments of records older
/// than the topic's retention (an hour; those records are a day old) go, the active
/// segment and younger records stay.
#[tokio::test]
async fn retention_ticks_delete_expired_segments_and_only_those() {
    let broker = Broker::start_with(&["--retention-check-ms", "50"]);
    let mut admin = broker.admin().await;
    let config = v1::TopicConfig {
        retention_ms: Some(3_600_000),
        segment_bytes: Some(1024),
        ..Default::default()
    };
    create_topic(&mut admin, "old", 1, config.clone()).await;
    create_topic(&mut admin, "fresh", 1, config).await;
    let mut client = broker.client().await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    for (topic, timestamp_ms) in [("old", now - 86_400_000), ("fresh", now)] {
        for _ in 0..20 {
            let stamped = v1::Record {
                timestamp_ms,
                ..record(None, &[b'x'; 200])
            };
            client
                .produce(produce_records(topic, 0, vec![stamped]))
                .await
                .expect("produce");
        }
    }
    let earliest = |client: &mut BrokerClient<Channel>, topic: &'static str| {
        let mut client = client.clone();
        async move {
            let fetched = client
                .fetch(fetch_request(topic, 0, 0, false))
                .await
                .map(|r| r.into_inner());
            match fetched {
                Ok(fetched) => fetched.earliest_offset,
                // Offset 0 is gone: the answer says so.
                Err(status) if status.code() == Code::OutOfRange => u64::MAX,
                Err(status) => panic!("fetch {topic}: {status}"),
            }
        }
    };
    let deadline = std::time::Instant::now() + HANG_GUARD;
    while earliest(&mut client, "old").await == 0 {
        assert!(std::time::Instant::now() < deadline, "retention never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let high_watermark = client
        .fetch(fetch_request("old", 0, 19, false))
        .await
        .expect("the active segment's record stays")
        .into_inner()
        .high_watermark;
    assert_eq!(high_watermark, 20);
    assert_eq!(earliest(&mut client, "fresh").await, 0);
}
