//! Idempotent produce against the real `strata` binary: a producer whose connection is
//! cut right after the broker answered (so the client must retry a batch the broker
//! already stored) ends with every record exactly once and in per-key order; producer
//! state survives a crash and a graceful restart; fenced and out-of-order batches are
//! refused without touching the log; a producer continues after a batch fails for good;
//! and a million small keyed records read back in per-key order.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::Broker;
use strata_client::{
    Client, Delivery, Durability, Error, OffsetSpec, PartitionConsumer, ProducerConfig, Record,
    StartAt, TopicConfig,
};
use strata_proto::v1;
use strata_storage::batch::BatchBuilder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_stream::StreamExt;
use tonic::Code;

/// Guard against a hang; never reached when things work, and nothing asserts on time.
const HANG_GUARD: Duration = Duration::from_secs(300);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(HANG_GUARD, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {HANG_GUARD:?}"))
}

fn config(durability: Durability) -> TopicConfig {
    TopicConfig {
        durability: Some(durability),
        ..TopicConfig::default()
    }
}

/// Scans the HTTP/2 frames of one direction of a connection (after the client's
/// preface, if any), and says whether a chunk starts a DATA frame with a payload: on
/// the broker-to-client side that is the body of a successful answer.
struct FrameScanner {
    /// Bytes of the client connection preface still to skip.
    preface_left: usize,
    header: [u8; 9],
    header_len: usize,
    payload_left: usize,
}

impl FrameScanner {
    fn new(preface: bool) -> FrameScanner {
        FrameScanner {
            preface_left: if preface { 24 } else { 0 },
            header: [0; 9],
            header_len: 0,
            payload_left: 0,
        }
    }

    /// Consumes `bytes`; true if they hold the header of a non-empty DATA frame.
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        let mut data = false;
        while !bytes.is_empty() {
            if self.preface_left > 0 || self.payload_left > 0 {
                let skip = if self.preface_left > 0 {
                    &mut self.preface_left
                } else {
                    &mut self.payload_left
                };
                let n = (*skip).min(bytes.len());
                *skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (9 - self.header_len).min(bytes.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
            self.header_len += n;
            bytes = &bytes[n..];
            if self.header_len == 9 {
                let h = self.header;
                let length = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                if h[3] == 0 && length > 0 {
                    data = true;
                }
                self.payload_left = length;
                self.header_len = 0;
            }
        }
        data
    }
}

/// A TCP proxy between a client and the broker that cuts the connection at the worst
/// moment for a producer: once at least `cut_after_bytes` went to the broker since the
/// last cut, it waits for the broker's next answer body (an HTTP/2 DATA frame, which it
/// only sends after storing a batch), drops it instead of passing it on, and resets
/// both connections. The client never learns that the batch was stored, so it must
/// send it again.
struct CuttingProxy {
    addr: SocketAddr,
    /// Answers dropped by a cut.
    cuts: Arc<AtomicUsize>,
}

struct ProxyLimits {
    cut_after_bytes: u64,
    cuts_max: usize,
}

impl CuttingProxy {
    async fn start(upstream: SocketAddr, limits: ProxyLimits) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("the proxy's address");
        let cuts = Arc::new(AtomicUsize::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let limits = Arc::new(limits);
        let proxy_cuts = Arc::clone(&cuts);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let cuts = Arc::clone(&proxy_cuts);
                let sent = Arc::clone(&sent);
                let limits = Arc::clone(&limits);
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(upstream).await {
                        pipe(client, server, &cuts, &sent, &limits).await;
                    }
                });
            }
        });
        CuttingProxy { addr, cuts }
    }

    fn cuts(&self) -> usize {
        self.cuts.load(Ordering::SeqCst)
    }
}

/// Copies bytes both ways until either side closes or a cut happens; then both sockets
/// are reset.
async fn pipe(
    client: TcpStream,
    server: TcpStream,
    cuts: &AtomicUsize,
    sent: &AtomicU64,
    limits: &ProxyLimits,
) {
    for socket in [&client, &server] {
        let _ = socket.set_nodelay(true);
        // Closing with a zero linger sends a reset, as a dying peer or network would.
        let _ = socket.set_zero_linger();
    }
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let upstream = async {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match client_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if server_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
            sent.fetch_add(n as u64, Ordering::SeqCst);
        }
    };
    let downstream = async {
        let mut buf = vec![0u8; 64 << 10];
        let mut frames = FrameScanner::new(false);
        loop {
            let n = match server_read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let answer = frames.feed(&buf[..n]);
            let due = sent.load(Ordering::SeqCst) >= limits.cut_after_bytes
                && cuts.load(Ordering::SeqCst) < limits.cuts_max;
            if answer && due {
                sent.store(0, Ordering::SeqCst);
                cuts.fetch_add(1, Ordering::SeqCst);
                return;
            }
            if client_write.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
}

/// Every record of a partition up to its current high watermark.
async fn read_partition(client: &Client, topic: &str, partition: u32) -> Vec<(u64, String)> {
    let end = client
        .admin()
        .list_offsets(topic, partition, OffsetSpec::Latest)
        .await
        .expect("latest offset");
    let mut consumer: PartitionConsumer = client
        .partition_consumer(topic, partition, StartAt::Earliest)
        .await
        .expect("a consumer");
    let mut out = Vec::with_capacity(end as usize);
    while (out.len() as u64) < end - consumer.start_offset() {
        let record = within("consume", consumer.next())
            .await
            .expect("the stream does not end")
            .expect("a record");
        let value = String::from_utf8(record.value.expect("a value").to_vec()).expect("utf-8");
        out.push((record.offset, value));
    }
    out
}

/// Sends `records` keyed records (value `key/n`, n counting per key from 0) and checks
/// that every record is stored exactly once, at the offset its delivery reported, and
/// that each key's records read back in the order they were sent.
async fn send_and_verify(
    producer: &strata_client::Producer,
    reader: &Client,
    topic: &str,
    records: usize,
    keys: usize,
) {
    let pending: Vec<_> = (0..records)
        .map(|i| {
            let key = format!("key-{}", i % keys);
            producer.send(Record::new(format!("{key}/{}", i / keys)).key(key))
        })
        .collect();
    let mut deliveries = Vec::with_capacity(records);
    for (i, send) in pending.into_iter().enumerate() {
        let delivery = within("send", send)
            .await
            .unwrap_or_else(|e| panic!("record {i}: {e}"));
        deliveries.push(delivery);
    }

    let mut stored: BTreeMap<Delivery, String> = BTreeMap::new();
    let mut next_per_key: BTreeMap<String, usize> = BTreeMap::new();
    for partition in 0..producer.partitions() {
        for (offset, value) in read_partition(reader, topic, partition).await {
            let (key, n) = value.split_once('/').expect("key/n");
            let n: usize = n.parse().expect("a number");
            let expected = next_per_key.entry(key.to_string()).or_insert(0);
            assert_eq!(
                n, *expected,
                "{key}: record {n} at {partition}/{offset} where {expected} was next: \
                 a duplicate, a gap or a reordering"
            );
            *expected += 1;
            stored.insert(Delivery { partition, offset }, value);
        }
    }
    assert_eq!(stored.len(), records, "every record stored exactly once");
    for (i, delivery) in deliveries.iter().enumerate() {
        let key = format!("key-{}", i % keys);
        assert_eq!(
            stored.get(delivery),
            Some(&format!("{key}/{}", i / keys)),
            "record {i} is where its delivery says ({delivery:?})"
        );
    }
}

/// The idempotence proof: 200,000 keyed records through a proxy that repeatedly drops
/// the broker's answer to a stored batch and resets the connection. The producer
/// retries those batches (with five requests in flight per partition, so retries also
/// race batches sent after them), and still every record is stored exactly once, in
/// per-key order. Without idempotence this fails: the retried batches are stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_after_cut_connections_store_every_record_once() {
    const RECORDS: usize = 200_000;
    const KEYS: usize = 500;
    let broker = Broker::start();
    let proxy = CuttingProxy::start(
        broker.addr_arg().parse().expect("the broker's address"),
        ProxyLimits {
            cut_after_bytes: 256 << 10,
            cuts_max: 12,
        },
    )
    .await;
    let direct = Client::connect(&broker.addr_arg()).await.expect("connect");
    direct
        .admin()
        .create_topic("cut", 4, config(Durability::None))
        .await
        .expect("create topic");
    let client = Client::connect(&proxy.addr.to_string())
        .await
        .expect("connect through the proxy");
    let settings = ProducerConfig {
        max_in_flight: 5,
        max_batch_bytes: 32 << 10,
        retries: 1000,
        retry_backoff_max: Duration::from_millis(50),
        ..ProducerConfig::default()
    };
    let producer = client
        .producer_with("cut", settings)
        .await
        .expect("a producer");
    assert!(producer.producer_id().is_some(), "idempotent by default");

    send_and_verify(&producer, &direct, "cut", RECORDS, KEYS).await;
    assert!(
        proxy.cuts() >= 1,
        "the proxy never dropped an answer, so nothing was proven"
    );
    eprintln!(
        "{} answers to stored batches were dropped and their batches retried",
        proxy.cuts()
    );
}

/// One producer sends 1,000,000 small keyed records; every one reads back, once, in
/// per-key order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_keyed_records_read_back_in_per_key_order() {
    let broker = Broker::start();
    let client = Client::connect(&broker.addr_arg()).await.expect("connect");
    client
        .admin()
        .create_topic("million", 4, config(Durability::None))
        .await
        .expect("create topic");
    let producer = client.producer("million").await.expect("a producer");
    send_and_verify(&producer, &client, "million", 1_000_000, 1_000).await;
}

/// A batch that fails for good (here: the broker is down and the producer may not
/// retry) leaves a hole in its partition's sequence; the producer starts a new epoch,
/// so the records sent after it are still stored, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_producer_continues_after_a_batch_fails_for_good() {
    let mut broker = Broker::start();
    let client = Client::connect(&broker.addr_arg()).await.expect("connect");
    client
        .admin()
        .create_topic("gap", 1, config(Durability::Fsync))
        .await
        .expect("create topic");
    let impatient = ProducerConfig {
        retries: 0,
        linger: Duration::ZERO,
        ..ProducerConfig::default()
    };
    let producer = client
        .producer_with("gap", impatient)
        .await
        .expect("a producer");
    let first = producer.send(Record::new("first").key("k"));
    assert_eq!(within("send", first).await.expect("stored").offset, 0);
    tokio::task::block_in_place(|| broker.stop());
    let lost = within("send", producer.send(Record::new("lost").key("k"))).await;
    assert!(matches!(lost, Err(Error::Unavailable { .. })), "{lost:?}");
    tokio::task::block_in_place(|| broker.restart_on_same_port());
    // The producer may not retry, so reconnect its connection first.
    within("reconnect", async {
        while client.admin().list_topics().await.is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let after = within("send", producer.send(Record::new("after").key("k")))
        .await
        .expect("stored after the failed batch");
    assert_eq!(after.offset, 1);
    let values: Vec<String> = read_partition(&client, "gap", 0)
        .await
        .into_iter()
        .map(|(_, v)| v)
        .collect();
    assert_eq!(values, ["first", "after"]);
}

/// A produce request carrying one encoded batch.
fn produce(batch: Vec<u8>) -> v1::ProduceRequest {
    crate::common::produce_batch("idem", 0, batch)
}

/// A batch of producer `id` with `count` records valued `{tag}-{i}`.
fn batch(id: i64, epoch: i16, sequence: i32, count: usize, tag: &str) -> Vec<u8> {
    let mut b = BatchBuilder::new().producer(id, epoch, sequence);
    for i in 0..count {
        b.push(1_000, None, Some(format!("{tag}-{i}").as_bytes()), &[]);
    }
    b.finish()
}

type BrokerClient = v1::broker_client::BrokerClient<tonic::transport::Channel>;

/// Sends a batch; its (base offset, last offset, duplicate).
async fn stored(client: &mut BrokerClient, batch: Vec<u8>) -> (u64, u64, bool) {
    let answer = client
        .produce(produce(batch))
        .await
        .expect("produce")
        .into_inner();
    (answer.base_offset, answer.last_offset, answer.duplicate)
}

/// Sends a batch that must be refused with `code`; the status message.
async fn refused(client: &mut BrokerClient, batch: Vec<u8>, code: Code) -> String {
    let status = client
        .produce(produce(batch))
        .await
        .expect_err("the batch is refused");
    assert_eq!(status.code(), code, "{status:?}");
    status.message().to_string()
}

/// Producer state survives a crash (SIGKILL: rebuilt by replaying the log), a graceful
/// restart (loaded from the snapshot written at close), and a crash after that
/// (snapshot plus the log after it): a retried batch is answered as a duplicate with
/// its original offsets. A sequence gap, a new epoch not starting at 0, an old epoch and
/// a producer id the broker never handed out are refused and change nothing. Producer
/// ids are never handed out twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producer_state_survives_restarts_and_bad_sequences_change_nothing() {
    let mut broker = Broker::start();
    let mut admin = broker.admin().await;
    let fsync = v1::TopicConfig {
        durability: Some("fsync".into()),
        ..Default::default()
    };
    crate::common::create_topic(&mut admin, "idem", 1, fsync).await;
    let mut client = broker.client().await;
    let init = client
        .init_producer(v1::InitProducerRequest {})
        .await
        .expect("init producer")
        .into_inner();
    assert_eq!(init.producer_epoch, 0);
    let id = init.producer_id;

    assert_eq!(
        stored(&mut client, batch(id, 0, 0, 3, "a")).await,
        (0, 2, false)
    );
    assert_eq!(
        stored(&mut client, batch(id, 0, 3, 2, "b")).await,
        (3, 4, false)
    );
    assert_eq!(
        stored(&mut client, batch(id, 0, 3, 2, "b")).await,
        (3, 4, true)
    );

    tokio::task::block_in_place(|| broker.restart_after_kill());
    let mut client = broker.client().await;
    assert_eq!(
        stored(&mut client, batch(id, 0, 3, 2, "b")).await,
        (3, 4, true)
    );
    assert_eq!(
        stored(&mut client, batch(id, 0, 0, 3, "a")).await,
        (0, 2, true)
    );
    assert_eq!(
        stored(&mut client, batch(id, 0, 5, 1, "c")).await,
        (5, 5, false)
    );
    let gap = refused(
        &mut client,
        batch(id, 0, 7, 1, "x"),
        Code::FailedPrecondition,
    )
    .await;
    assert!(gap.contains("expected sequence 6, got 7"), "{gap}");
    let restart = refused(
        &mut client,
        batch(id, 1, 6, 1, "x"),
        Code::FailedPrecondition,
    )
    .await;
    assert!(restart.contains("expected sequence 0, got 6"), "{restart}");

    tokio::task::block_in_place(|| broker.restart_graceful());
    let snapshot = broker
        .data_dir()
        .join("topics/idem/0")
        .join(strata_storage::producer::SNAPSHOT_FILE);
    assert!(snapshot.exists(), "a clean close writes the snapshot");
    let mut client = broker.client().await;
    assert_eq!(
        stored(&mut client, batch(id, 0, 5, 1, "c")).await,
        (5, 5, true)
    );
    assert_eq!(
        stored(&mut client, batch(id, 1, 0, 2, "d")).await,
        (6, 7, false)
    );

    tokio::task::block_in_place(|| broker.restart_after_kill());
    let mut client = broker.client().await;
    assert_eq!(
        stored(&mut client, batch(id, 1, 0, 2, "d")).await,
        (6, 7, true)
    );
    let fenced = refused(
        &mut client,
        batch(id, 0, 6, 1, "x"),
        Code::FailedPrecondition,
    )
    .await;
    assert!(fenced.contains("fenced"), "{fenced}");
    let unknown = refused(
        &mut client,
        batch(id + 1_000_000, 0, 0, 1, "x"),
        Code::InvalidArgument,
    )
    .await;
    assert!(unknown.contains("InitProducer"), "{unknown}");
    refused(&mut client, batch(-5, 0, 0, 1, "x"), Code::InvalidArgument).await;
    refused(&mut client, batch(id, 0, -2, 1, "x"), Code::InvalidArgument).await;

    let values: Vec<Vec<u8>> = crate::common::read_partition(&mut client, "idem", 0)
        .await
        .into_iter()
        .map(|r| r.value.expect("a value"))
        .collect();
    let expected: Vec<&[u8]> = vec![
        b"a-0", b"a-1", b"a-2", b"b-0", b"b-1", b"c-0", b"d-0", b"d-1",
    ];
    assert_eq!(values, expected);

    let again = client
        .init_producer(v1::InitProducerRequest {})
        .await
        .expect("init producer")
        .into_inner();
    assert!(
        again.producer_id > id,
        "id {} handed out again after restarts",
        again.producer_id
    );
}
