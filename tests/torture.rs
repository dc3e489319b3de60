//! Crash torture: rounds of SIGKILL of the real broker while a producer writes and a
//! consumer group reads, with a ledger of every acknowledged record.
//!
//! Each round lets the producer get a varying number of acknowledgements, kills the
//! broker with SIGKILL in the middle of the traffic (sends in flight, commits in
//! flight), restarts it on the same port and waits until it answers again (the
//! recovery time). The producer (idempotent, the default) and the consumer ride the
//! restarts out. At the end the test checks, under `fsync` with one consumer and under
//! `interval` and `none` with three consumers of the group (a SIGKILL kills the process,
//! not the OS: every policy keeps what was acknowledged, storage-format.md 8.2):
//!
//! - nothing acknowledged is lost: every acknowledged record is at the offset its
//!   acknowledgement named;
//! - no offset holds two records: every record the consumer was handed is the record
//!   the log holds at that offset now;
//! - no acknowledged record appears twice in the log (nor does any other record);
//! - the group's committed offsets never go back, sampled after every restart.
//!
//! `STRATA_TORTURE_ROUNDS` sets the number of rounds (default 3, CI-sized);
//! docs/reliability.md records a 100-round run:
//! `STRATA_TORTURE_ROUNDS=100 cargo test -p strata-broker --test blackbox torture:: -- --nocapture`.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{read_partition, Broker};
use strata_client::{Client, ConsumerGroupConfig, Durability, Record, TopicConfig};
use tokio::sync::{watch, Semaphore};
use tokio_stream::StreamExt;

const TOPIC: &str = "ledger";
const PARTITIONS: u32 = 3;
const GROUP: &str = "auditors";
/// Guard against a hang; never reached when things work, and nothing asserts on time.
const HANG_GUARD: Duration = Duration::from_secs(180);
/// Sends in flight at once.
const IN_FLIGHT: usize = 64;

fn rounds() -> u64 {
    std::env::var("STRATA_TORTURE_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
}

async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < HANG_GUARD,
            "{what}: not within {HANG_GUARD:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Acknowledged records: value → (partition, offset).
type Ledger = Arc<Mutex<HashMap<String, (u32, u64)>>>;
/// What the consumer was handed: (partition, offset) → value.
type Seen = Arc<Mutex<BTreeMap<(u32, u64), String>>>;

/// Sends `r-<n>` records until told to stop, recording each acknowledgement.
fn spawn_producer(
    client: Client,
    ledger: Ledger,
    stop: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let producer = client.producer(TOPIC).await.expect("a producer");
        let window = Arc::new(Semaphore::new(IN_FLIGHT));
        let mut sent = 0u64;
        while !*stop.borrow() {
            let permit = Arc::clone(&window).acquire_owned().await.expect("open");
            let value = format!("r-{sent}");
            let send = producer.send(Record::new(value.clone()).key(format!("k-{}", sent % 97)));
            let ledger = Arc::clone(&ledger);
            tokio::spawn(async move {
                // A send that fails (the broker died under it, past the retries) is not
                // acknowledged: it may or may not be stored, once.
                if let Ok(delivery) = send.await {
                    ledger
                        .lock()
                        .expect("ledger")
                        .insert(value, (delivery.partition, delivery.offset));
                }
                drop(permit);
            });
            sent += 1;
        }
        // Let the sends in flight settle.
        let _ = window.acquire_many(IN_FLIGHT as u32).await;
        sent
    })
}

/// Consumes with auto-commit, recording what it is handed; errors (a broker that is
/// down) are ridden out.
fn spawn_consumer(
    client: Client,
    seen: Seen,
    mut stop: watch::Receiver<bool>,
    name: String,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let config = ConsumerGroupConfig {
            client_id: name,
            auto_commit_interval: Some(Duration::from_millis(50)),
            retry_backoff_max: Duration::from_millis(200),
            session_timeout: Duration::from_secs(6),
            ..ConsumerGroupConfig::default()
        };
        let mut consumer = loop {
            match client.consumer_with(GROUP, &[TOPIC], config.clone()).await {
                Ok(consumer) => break consumer,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                item = consumer.next() => match item {
                    Some(Ok(record)) => {
                        let value = String::from_utf8_lossy(record.value.as_deref().unwrap_or_default()).into_owned();
                        let previous = seen
                            .lock()
                            .expect("seen")
                            .insert((record.partition, record.offset), value.clone());
                        if let Some(previous) = previous {
                            assert_eq!(
                                previous, value,
                                "offset {}/{} was handed out with two records",
                                record.partition, record.offset
                            );
                        }
                    }
                    Some(Err(_)) => {}
                    None => panic!("the consumer's stream ended"),
                },
            }
        }
        let _ = consumer.close().await;
    })
}

async fn committed(client: &Client) -> Option<BTreeMap<u32, u64>> {
    let offsets = client.admin().committed_offsets(GROUP).await.ok()?;
    Some(
        offsets
            .into_iter()
            .filter(|o| o.topic == TOPIC)
            .map(|o| (o.partition, o.offset))
            .collect(),
    )
}

fn check_not_behind(before: &mut BTreeMap<u32, u64>, now: BTreeMap<u32, u64>, when: &str) {
    for (partition, offset) in now {
        let previous = before.entry(partition).or_insert(offset);
        assert!(
            offset >= *previous,
            "{when}: committed offset of {TOPIC}/{partition} went back from {previous} to {offset}"
        );
        *previous = offset;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_rounds_lose_nothing_acknowledged() {
    torture(Durability::Fsync, 1).await;
}

/// The same under the policies that acknowledge before an fsync, with several members
/// of the group sharing the partitions (rebalancing at every restart): redeliveries
/// across members are allowed, two different records at one offset are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_rounds_under_interval_and_none_with_three_consumers() {
    torture(Durability::IntervalMs(200), 3).await;
    torture(Durability::None, 3).await;
}

async fn torture(durability: Durability, members: usize) {
    let rounds = rounds();
    let mut broker = Broker::start();
    let client = Client::connect(&broker.addr_arg()).await.expect("connect");
    client
        .admin()
        .create_topic(
            TOPIC,
            PARTITIONS,
            TopicConfig {
                durability: Some(durability),
                ..TopicConfig::default()
            },
        )
        .await
        .expect("create topic");
    let ledger: Ledger = Arc::default();
    let seen: Seen = Arc::default();
    let (stop_tx, stop) = watch::channel(false);
    let producer = spawn_producer(client.clone(), Arc::clone(&ledger), stop.clone());
    let consumers: Vec<_> = (0..members)
        .map(|n| {
            let name = format!("auditor-{n}");
            spawn_consumer(client.clone(), Arc::clone(&seen), stop.clone(), name)
        })
        .collect();

    let mut high_committed = BTreeMap::new();
    let mut recoveries = Vec::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..rounds {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let target = ledger.lock().expect("ledger").len() + 20 + (rng % 300) as usize;
        wait_for(&format!("round {round}: acknowledgements"), || {
            ledger.lock().expect("ledger").len() >= target
        })
        .await;
        let killed = Instant::now();
        tokio::task::block_in_place(|| {
            broker.kill();
            broker.restart_on_same_port();
        });
        // Recovered: the broker answers for the topic again.
        loop {
            if client.admin().describe_topic(TOPIC).await.is_ok() {
                break;
            }
            assert!(killed.elapsed() < HANG_GUARD, "round {round}: no recovery");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        recoveries.push(killed.elapsed());
        if let Some(now) = committed(&client).await {
            check_not_behind(&mut high_committed, now, &format!("after round {round}"));
        }
    }

    stop_tx.send(true).expect("stop");
    let sent = tokio::time::timeout(HANG_GUARD, producer)
        .await
        .expect("the producer settles")
        .expect("producer task");
    for consumer in consumers {
        tokio::time::timeout(HANG_GUARD, consumer)
            .await
            .expect("the consumer stops")
            .expect("consumer task");
    }
    if let Some(now) = committed(&client).await {
        check_not_behind(&mut high_committed, now, "at the end");
    }

    // The log as it is now, partition by partition.
    let mut raw = broker.client().await;
    let mut log: BTreeMap<(u32, u64), String> = BTreeMap::new();
    let mut values: HashMap<String, (u32, u64)> = HashMap::new();
    for partition in 0..PARTITIONS {
        for record in read_partition(&mut raw, TOPIC, partition).await {
            let value = String::from_utf8(record.value.expect("a value")).expect("utf-8");
            if let Some(first) = values.insert(value.clone(), (partition, record.offset)) {
                panic!(
                    "{value} is stored twice: at {first:?} and at {partition}/{}",
                    record.offset
                );
            }
            log.insert((partition, record.offset), value);
        }
    }
    let ledger = ledger.lock().expect("ledger");
    for (value, at) in ledger.iter() {
        assert_eq!(
            log.get(at),
            Some(value),
            "acknowledged {value} at {at:?} is not there"
        );
    }
    for (at, value) in seen.lock().expect("seen").iter() {
        assert_eq!(
            log.get(at),
            Some(value),
            "the consumer was handed {value} at {at:?}"
        );
    }

    let handed = seen.lock().expect("seen").len();
    assert!(handed > 0, "the consumer was handed records");
    recoveries.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    eprintln!(
        "torture ({durability:?}, {members} consumers): {rounds} SIGKILL rounds; {sent} records sent, {} acknowledged, {} stored, \
         {handed} handed to the consumer; committed at the end {high_committed:?}; \
         recovery (kill to answering) min {:.0} ms, median {:.0} ms, max {:.0} ms",
        ledger.len(),
        log.len(),
        recoveries.first().map_or(0.0, |d| ms(*d)),
        recoveries.get(recoveries.len() / 2).map_or(0.0, |d| ms(*d)),
        recoveries.last().map_or(0.0, |d| ms(*d)),
    );
}
