//! The client SDK (`strata-client`) against the real `strata` binary: producer batching,
//! partitioning, retries across a broker restart, the partition consumer's start
//! positions, admin round trips and typed errors. Every wait is on an answer or a
//! record, never on a clock; [`within`] only turns a hang into a failure.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use crate::common::Broker;
use strata_client::{
    Client, ConsumedRecord, Delivery, Durability, Error, OffsetSpec, PartitionConsumer,
    ProducerConfig, Record, StartAt, TopicConfig,
};
use tokio_stream::StreamExt;

/// Guard against a hang; never reached when things work, and nothing asserts on time.
const HANG_GUARD: Duration = Duration::from_secs(120);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(HANG_GUARD, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {HANG_GUARD:?}"))
}

async fn connect(broker: &Broker) -> Client {
    Client::connect(&broker.addr_arg())
        .await
        .expect("connect to the broker")
}

fn config(durability: Durability) -> TopicConfig {
    TopicConfig {
        durability: Some(durability),
        ..TopicConfig::default()
    }
}

/// The next `n` records of a consumer.
async fn take(consumer: &mut PartitionConsumer, n: usize) -> Vec<ConsumedRecord> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let record = within("consume", consumer.next())
            .await
            .expect("the stream does not end")
            .expect("a record");
        out.push(record);
    }
    out
}

/// Every record of a partition up to its current high watermark.
async fn read_all(client: &Client, topic: &str, partition: u32) -> Vec<ConsumedRecord> {
    let admin = client.admin();
    let end = admin
        .list_offsets(topic, partition, OffsetSpec::Latest)
        .await
        .expect("latest offset");
    let mut consumer = client
        .partition_consumer(topic, partition, StartAt::Earliest)
        .await
        .expect("a consumer");
    let start = consumer.start_offset();
    take(&mut consumer, (end - start) as usize).await
}

/// Raw record counts of the batches of partition 0, read with the generated client.
async fn batch_sizes(client: &Client, topic: &str) -> Vec<i32> {
    let answer = client
        .broker_client()
        .fetch(crate::common::fetch_request(topic, 0, 0, false))
        .await
        .expect("fetch")
        .into_inner();
    strata_storage::batch::batches(&answer.batches)
        .map(|b| b.expect("a valid batch").header().record_count)
        .collect()
}

/// 200,000 small keyed records from one producer: each lands in the partition its key
/// hashes to, at the offset its delivery reports, and each key's records read back in
/// send order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_records_read_back_in_per_key_order() {
    const RECORDS: usize = 200_000;
    const KEYS: usize = 1000;
    const PARTITIONS: u32 = 4;
    let broker = Broker::start();
    let client = connect(&broker).await;
    client
        .admin()
        .create_topic("keyed", PARTITIONS, config(Durability::None))
        .await
        .expect("create topic");
    let producer = client.producer("keyed").await.expect("a producer");
    let pending: Vec<_> = (0..RECORDS)
        .map(|i| {
            let key = format!("key-{}", i % KEYS);
            producer.send(Record::new(format!("{key}/{}", i / KEYS)).key(key))
        })
        .collect();
    let mut deliveries = Vec::with_capacity(RECORDS);
    for (i, send) in pending.into_iter().enumerate() {
        let delivery = within("send", send).await.expect("delivered");
        let key = format!("key-{}", i % KEYS);
        assert_eq!(
            delivery.partition,
            strata_proto::partition_for_key(key.as_bytes(), PARTITIONS),
            "record {i}"
        );
        deliveries.push(delivery);
    }

    let mut by_position = BTreeMap::new();
    let mut next_seq: BTreeMap<String, usize> = BTreeMap::new();
    for partition in 0..PARTITIONS {
        for record in read_all(&client, "keyed", partition).await {
            let key =
                String::from_utf8(record.key.clone().expect("a key").to_vec()).expect("utf-8 key");
            let value = String::from_utf8(record.value.clone().expect("a value").to_vec())
                .expect("utf-8 value");
            let (value_key, seq) = value.split_once('/').expect("key/seq");
            assert_eq!(value_key, key);
            let expected = next_seq.entry(key.clone()).or_insert(0);
            assert_eq!(
                seq.parse::<usize>().expect("seq"),
                *expected,
                "order of {key}"
            );
            *expected += 1;
            by_position.insert(
                Delivery {
                    partition,
                    offset: record.offset,
                },
                value,
            );
        }
    }
    assert_eq!(by_position.len(), RECORDS, "no record lost or duplicated");
    for (i, delivery) in deliveries.iter().enumerate() {
        let key = format!("key-{}", i % KEYS);
        assert_eq!(
            by_position.get(delivery),
            Some(&format!("{key}/{}", i / KEYS)),
            "record {i} at {delivery:?}"
        );
    }
}

/// Records sent without awaiting their futures are all stored once `flush` returns, and
/// concurrent sends share one batch; `max_batch_bytes` splits batches; sends beyond
/// `buffer_bytes_max` wait in order and flush still completes.
#[tokio::test]
async fn flush_sends_everything_and_linger_batches() {
    let broker = Broker::start();
    let client = connect(&broker).await;
    let admin = client.admin();
    admin
        .create_topic("batched", 1, config(Durability::None))
        .await
        .expect("create topic");
    // A linger far longer than the test: only flush sends the batch.
    let slow = ProducerConfig {
        linger: Duration::from_secs(3600),
        ..ProducerConfig::default()
    };
    let producer = client
        .producer_with("batched", slow)
        .await
        .expect("a producer");
    let pending: Vec<_> = (0..50)
        .map(|i| producer.send(Record::new(vec![i as u8; 100])))
        .collect();
    within("flush", producer.flush()).await;
    let described = admin.describe_topic("batched").await.expect("describe");
    assert_eq!(described.partitions[0].latest_offset, 50);
    for (i, send) in pending.into_iter().enumerate() {
        let delivery = send.await.expect("delivered");
        assert_eq!(
            delivery,
            Delivery {
                partition: 0,
                offset: i as u64
            }
        );
    }
    assert_eq!(batch_sizes(&client, "batched").await, vec![50]);

    // Batches of at most ~1000 bytes: 100-byte records split into several batches.
    let small = ProducerConfig {
        linger: Duration::from_secs(3600),
        max_batch_bytes: 1000,
        ..ProducerConfig::default()
    };
    let producer = client
        .producer_with("batched", small)
        .await
        .expect("a producer");
    let pending: Vec<_> = (0..50)
        .map(|i| producer.send(Record::new(vec![i as u8; 100])))
        .collect();
    within("flush", producer.flush()).await;
    for send in pending {
        send.await.expect("delivered");
    }
    let sizes = batch_sizes(&client, "batched").await;
    assert_eq!(sizes.iter().sum::<i32>(), 100);
    assert!(sizes.len() > 2, "max_batch_bytes splits batches: {sizes:?}");
    assert!(sizes[1..].iter().all(|&n| n > 1 && n < 50), "{sizes:?}");

    // A buffer of about two records: sends beyond it wait in order for room, and flush
    // still sends everything without waiting for the linger.
    let tight = ProducerConfig {
        linger: Duration::from_secs(3600),
        buffer_bytes_max: 300,
        ..ProducerConfig::default()
    };
    let producer = client
        .producer_with("batched", tight)
        .await
        .expect("a producer");
    let pending: Vec<_> = (0..50)
        .map(|i| producer.send(Record::new(vec![i as u8; 100])))
        .collect();
    within("flush", producer.flush()).await;
    for (i, send) in pending.into_iter().enumerate() {
        assert_eq!(send.await.expect("delivered").offset, 100 + i as u64);
    }

    // No linger: batches go out as request slots free up; every record still lands once
    // and in order.
    let eager = ProducerConfig {
        linger: Duration::ZERO,
        ..ProducerConfig::default()
    };
    let producer = client
        .producer_with("batched", eager)
        .await
        .expect("a producer");
    let pending: Vec<_> = (0..50)
        .map(|i| producer.send(Record::new(vec![i as u8; 100])))
        .collect();
    for (i, send) in pending.into_iter().enumerate() {
        let delivery = within("send", send).await.expect("delivered");
        assert_eq!(delivery.offset, 150 + i as u64);
    }

    let records = read_all(&client, "batched", 0).await;
    assert_eq!(records.len(), 200);
    for (i, record) in records.iter().enumerate() {
        assert_eq!(record.offset, i as u64);
        assert_eq!(record.value.as_deref(), Some(&[(i % 50) as u8; 100][..]));
    }
}

/// A producer keeps going through a broker crash (SIGKILL) and a graceful restart
/// (SIGTERM): sends in flight are retried until the broker is back, and every
/// acknowledged record is stored where its delivery says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_retries_through_broker_restarts() {
    let mut broker = Broker::start();
    let client = connect(&broker).await;
    client
        .admin()
        .create_topic("durable", 2, config(Durability::Fsync))
        .await
        .expect("create topic");
    let patient = ProducerConfig {
        retries: 1000,
        retry_backoff_max: Duration::from_millis(100),
        ..ProducerConfig::default()
    };
    let producer = client
        .producer_with("durable", patient)
        .await
        .expect("a producer");
    let mut acknowledged = Vec::new();
    let mut next = 0u32;
    for round in 0..3 {
        let pending: Vec<_> = (0..500)
            .map(|_| {
                next += 1;
                let value = format!("record-{next}");
                let key = format!("k{}", next % 7);
                (value.clone(), producer.send(Record::new(value).key(key)))
            })
            .collect();
        // The broker goes away while these are queued or in flight.
        match round {
            0 => tokio::task::block_in_place(|| broker.kill()),
            1 => tokio::task::block_in_place(|| broker.stop()),
            _ => {}
        }
        if round < 2 {
            tokio::task::block_in_place(|| broker.restart_on_same_port());
        }
        for (value, send) in pending {
            let delivery = within("send across a restart", send)
                .await
                .unwrap_or_else(|e| panic!("{value}: {e}"));
            acknowledged.push((delivery, value));
        }
    }
    let mut stored = BTreeMap::new();
    for partition in 0..2 {
        for record in read_all(&client, "durable", partition).await {
            stored.insert(
                Delivery {
                    partition,
                    offset: record.offset,
                },
                record.value.expect("a value"),
            );
        }
    }
    for (delivery, value) in &acknowledged {
        assert_eq!(
            stored.get(delivery).map(|v| v.as_ref()),
            Some(value.as_bytes()),
            "{value} at {delivery:?}"
        );
    }
}

/// A partition consumer tails its partition through a broker crash (SIGKILL) and a
/// graceful restart (SIGTERM, which ends its stream with UNAVAILABLE): it subscribes
/// again from where it was, and every record arrives once, in offset order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_consumer_follows_through_broker_restarts() {
    let mut broker = Broker::start();
    let client = connect(&broker).await;
    client
        .admin()
        .create_topic("tailed", 1, config(Durability::Fsync))
        .await
        .expect("create topic");
    let mut consumer = client
        .partition_consumer("tailed", 0, StartAt::Earliest)
        .await
        .expect("a consumer");
    let producer = client.producer("tailed").await.expect("a producer");
    let mut offset = 0;
    for round in 0..3 {
        for i in 0..50 {
            producer
                .send(Record::new(format!("r{round}-{i}")))
                .await
                .expect("delivered");
        }
        // Read after the restart: these wait in the partition, not in the consumer.
        match round {
            0 => tokio::task::block_in_place(|| broker.kill()),
            1 => tokio::task::block_in_place(|| broker.stop()),
            _ => {}
        }
        if round < 2 {
            tokio::task::block_in_place(|| broker.restart_on_same_port());
        }
        for (i, record) in take(&mut consumer, 50).await.into_iter().enumerate() {
            assert_eq!(record.offset, offset, "round {round}, record {i}");
            assert_eq!(
                record.value.as_deref(),
                Some(format!("r{round}-{i}").as_bytes())
            );
            offset += 1;
        }
    }
}

/// Admin calls round-trip their typed values and fail with typed errors.
#[tokio::test]
async fn admin_round_trips() {
    let broker = Broker::start();
    let admin = connect(&broker).await.admin();
    let config = TopicConfig {
        retention_ms: Some(3_600_000),
        retention_bytes: Some(1 << 30),
        segment_bytes: Some(1 << 20),
        max_message_bytes: Some(65536),
        durability: Some(Durability::IntervalMs(50)),
        ..TopicConfig::default()
    };
    let created = admin
        .create_topic("orders", 3, config.clone())
        .await
        .expect("create");
    assert_eq!(created.name, "orders");
    assert_eq!(created.partitions, 3);
    assert_eq!(
        TopicConfig {
            segment_ms: None,
            ..created.config.clone()
        },
        config
    );
    assert!(created.config.segment_ms.is_some(), "every field is set");
    admin
        .create_topic("audit", 1, TopicConfig::default())
        .await
        .expect("create");
    assert_eq!(
        admin
            .create_topic("orders", 1, TopicConfig::default())
            .await,
        Err(Error::TopicExists {
            topic: "orders".into()
        })
    );
    assert!(matches!(
        admin.create_topic("zero", 0, TopicConfig::default()).await,
        Err(Error::InvalidArgument { .. })
    ));
    let names: Vec<_> = admin
        .list_topics()
        .await
        .expect("list")
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, ["audit", "orders"]);
    let described = admin.describe_topic("orders").await.expect("describe");
    assert_eq!(described.topic, created);
    assert_eq!(described.partitions.len(), 3);
    for (i, p) in described.partitions.iter().enumerate() {
        assert_eq!(
            (p.partition, p.earliest_offset, p.latest_offset),
            (i as u32, 0, 0)
        );
    }
    for spec in [
        OffsetSpec::Earliest,
        OffsetSpec::Latest,
        OffsetSpec::Timestamp(0),
    ] {
        assert_eq!(admin.list_offsets("orders", 2, spec).await, Ok(0));
    }
    admin.delete_topic("orders").await.expect("delete");
    assert!(matches!(
        admin.describe_topic("orders").await,
        Err(Error::TopicNotFound { topic, .. }) if topic == "orders"
    ));
    assert!(matches!(
        admin.delete_topic("orders").await,
        Err(Error::TopicNotFound { .. })
    ));
}

/// A partition consumer starts at the earliest offset, the latest (then sees new
/// records as they come), a time, or an offset in the middle of a batch (skipping the
/// batch's earlier records).
#[tokio::test]
async fn partition_consumer_start_positions() {
    let broker = Broker::start();
    let client = connect(&broker).await;
    client
        .admin()
        .create_topic("events", 1, config(Durability::None))
        .await
        .expect("create topic");
    let manual = ProducerConfig {
        linger: Duration::from_secs(3600),
        ..ProducerConfig::default()
    };
    let producer = client
        .producer_with("events", manual)
        .await
        .expect("a producer");
    // Two batches of ten: timestamps 1000.. and 2000.., headers on each record.
    for base in [1000i64, 2000] {
        let pending: Vec<_> = (0..10)
            .map(|i| {
                producer.send(
                    Record::new(format!("v{}", base + i))
                        .key("k")
                        .header("event-type", "test")
                        .timestamp_ms(base + i),
                )
            })
            .collect();
        producer.flush().await;
        for send in pending {
            send.await.expect("delivered");
        }
    }
    assert_eq!(batch_sizes(&client, "events").await, vec![10, 10]);

    let first = |start| {
        let client = client.clone();
        async move {
            let mut consumer = client
                .partition_consumer("events", 0, start)
                .await
                .expect("a consumer");
            take(&mut consumer, 1).await.remove(0)
        }
    };
    let earliest = first(StartAt::Earliest).await;
    assert_eq!(earliest.offset, 0);
    assert_eq!(earliest.timestamp_ms, 1000);
    assert_eq!(earliest.key.as_deref(), Some(&b"k"[..]));
    assert_eq!(earliest.value.as_deref(), Some(&b"v1000"[..]));
    assert_eq!(
        earliest.headers,
        vec![("event-type".to_string(), "test".into())]
    );
    assert_eq!(first(StartAt::Timestamp(2000)).await.offset, 10);
    assert_eq!(first(StartAt::Timestamp(1005)).await.offset, 5);
    let mid = first(StartAt::Offset(15)).await;
    assert_eq!((mid.offset, mid.timestamp_ms), (15, 2005));

    let mut latest = client
        .partition_consumer("events", 0, StartAt::Latest)
        .await
        .expect("a consumer");
    assert_eq!(latest.start_offset(), 20);
    let sent = producer.send(Record::new("new"));
    producer.flush().await;
    assert_eq!(sent.await.expect("delivered").offset, 20);
    let record = take(&mut latest, 1).await.remove(0);
    assert_eq!(
        (record.offset, record.value.as_deref()),
        (20, Some(&b"new"[..]))
    );
}

/// Unknown topics and partitions, out-of-range offsets and oversized records fail with
/// their own error variants.
#[tokio::test]
async fn typed_errors() {
    let broker = Broker::start();
    let client = connect(&broker).await;
    assert!(matches!(
        client.producer("nope").await,
        Err(Error::TopicNotFound { topic, .. }) if topic == "nope"
    ));
    assert!(matches!(
        client
            .partition_consumer("nope", 0, StartAt::Earliest)
            .await,
        Err(Error::TopicNotFound { .. })
    ));
    let small = TopicConfig {
        max_message_bytes: Some(1000),
        durability: Some(Durability::None),
        ..TopicConfig::default()
    };
    client
        .admin()
        .create_topic("small", 1, small)
        .await
        .expect("create topic");
    assert_eq!(
        client
            .partition_consumer("small", 3, StartAt::Earliest)
            .await
            .map(|_| ()),
        Err(Error::PartitionNotFound {
            topic: "small".into(),
            partition: 3,
            partitions: 1
        })
    );
    let producer = client.producer("small").await.expect("a producer");
    assert_eq!(producer.max_batch_bytes(), 1000);
    assert!(matches!(
        producer.send(Record::new(vec![0u8; 2000])).await,
        Err(Error::RecordTooLarge { max: 1000, .. })
    ));
    producer.send(Record::new("one")).await.expect("delivered");

    let mut consumer = client
        .partition_consumer("small", 0, StartAt::Offset(1000))
        .await
        .expect("a consumer");
    let error = within("consume", consumer.next())
        .await
        .expect("an error item")
        .expect_err("offset 1000 is out of range");
    assert!(
        matches!(
            &error,
            Error::OffsetOutOfRange { topic, partition: 0, offset: 1000, .. } if topic == "small"
        ),
        "{error}"
    );
    assert!(
        consumer.next().await.is_none(),
        "the stream ends after an error"
    );
}

/// `is_serving` is the broker's overall health check: true on a healthy broker, and an
/// `Unavailable` error (not `false`) once nothing answers. disk_full.rs checks `false`
/// while the committed-offsets log has failed.
#[tokio::test]
async fn is_serving_answers_the_health_check() {
    let mut broker = Broker::start();
    let client = connect(&broker).await;
    assert!(client.is_serving().await.expect("a health answer"));
    broker.stop();
    let error = client
        .is_serving()
        .await
        .expect_err("a stopped broker does not answer");
    assert!(matches!(error, Error::Unavailable { .. }), "{error:?}");
}

/// A batch that compression would make larger (incompressible records: the codec adds
/// framing) is sent plain: compressed, a batch the producer filled up to the topic's
/// `max_message_bytes` would pass it and be refused, its records lost.
#[tokio::test]
async fn incompressible_batches_at_the_limit_are_sent_plain() {
    use strata_client::Compression;
    use strata_storage::batch::{BatchBuilder, BATCH_HEADER_LEN};
    // Large enough that every codec's framing (per block) outgrows the slack the
    // producer's per-record size estimate leaves.
    const LIMIT: usize = 4 << 20;
    const RECORD: usize = 64 << 10;
    // What the producer reckons a record of `value` bytes, no key nor headers, takes at
    // most (strata_client's `Record::encoded_len_max`).
    const ESTIMATE_SLACK: usize = 36;
    let broker = Broker::start();
    let client = connect(&broker).await;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut noise = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    };
    // Records of noise, the last sized so the batch fills exactly what the producer
    // allows.
    let mut values = Vec::new();
    let mut builder = BatchBuilder::new();
    while builder.encoded_len() + 2 * (RECORD + ESTIMATE_SLACK) <= LIMIT {
        let value = noise(RECORD);
        builder.push(0, None, Some(&value), &[]);
        values.push(value);
    }
    values.push(noise(LIMIT - builder.encoded_len() - ESTIMATE_SLACK));
    assert!(builder.encoded_len() > BATCH_HEADER_LEN);
    for codec in &Compression::ALL[1..] {
        let topic = format!("noise-{codec}");
        client
            .admin()
            .create_topic(
                &topic,
                1,
                TopicConfig {
                    max_message_bytes: Some(LIMIT as u32),
                    ..TopicConfig::default()
                },
            )
            .await
            .expect("create");
        let config = ProducerConfig {
            compression: *codec,
            max_batch_bytes: LIMIT,
            linger: Duration::from_secs(3600),
            ..ProducerConfig::default()
        };
        let producer = client
            .producer_with(&topic, config)
            .await
            .expect("a producer");
        let sends: Vec<_> = values
            .iter()
            .map(|v| producer.send(Record::new(v.clone())))
            .collect();
        within("flush", producer.flush()).await;
        for sent in sends {
            sent.await.expect("delivered, not refused as too large");
        }
        let answer = client
            .broker_client()
            .fetch(crate::common::fetch_request(&topic, 0, 0, false))
            .await
            .expect("fetch")
            .into_inner();
        let stored: Vec<_> = strata_storage::batch::batches(&answer.batches)
            .map(|b| {
                let b = b.expect("a valid batch");
                (b.compression(), b.header().record_count as usize)
            })
            .collect();
        assert_eq!(stored, [(Compression::None, values.len())], "{codec}");
    }
}
