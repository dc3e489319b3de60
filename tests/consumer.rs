//! Consumer groups through the client SDK against the real `strata` binary: a group of
//! three survives a member crash without losing a record, partitions hand over at the
//! committed position, a poison record ends in the dead-letter topic, auto-commit
//! commits only what the application received, manual commits resume exactly, a
//! broker restart is ridden out, and the group admin calls. Every wait polls for a
//! condition with a generous deadline; nothing asserts on time.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::common::Broker;
use strata_client::{
    headers, Client, ConsumedRecord, Consumer, ConsumerGroupConfig, DeadLetterPolicy, DeadLetters,
    Delivery, Durability, Error, GroupState, OffsetReset, OnRevoke, Outcome, ProducerConfig,
    Record, ResetTo, Revocation, StartAt, TopicConfig, TopicPartition,
};
use tokio::sync::watch;
use tokio_stream::StreamExt;

/// Guard against a hang; never reached when things work, and nothing asserts on time.
const HANG_GUARD: Duration = Duration::from_secs(120);

async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(HANG_GUARD, future)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {HANG_GUARD:?}"))
}

/// Polls `condition` until it holds; fails after [`HANG_GUARD`].
async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    within(what, async {
        while !condition().await {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

async fn connect(broker: &Broker) -> Client {
    Client::connect(&broker.addr_arg())
        .await
        .expect("connect to the broker")
}

async fn create_topic(client: &Client, name: &str, partitions: u32) {
    let config = TopicConfig {
        durability: Some(Durability::None),
        ..TopicConfig::default()
    };
    client
        .admin()
        .create_topic(name, partitions, config)
        .await
        .unwrap_or_else(|e| panic!("create topic {name}: {e}"));
}

/// Settings that make a test quick: short commits and retry delays.
fn quick(client_id: &str) -> ConsumerGroupConfig {
    ConsumerGroupConfig {
        client_id: client_id.into(),
        auto_commit_interval: Some(Duration::from_millis(100)),
        retry_backoff_max: Duration::from_millis(200),
        ..ConsumerGroupConfig::default()
    }
}

/// Sends `n` keyed records (`<prefix>-<i>`, keys spread over 64 values) and returns
/// where each was stored.
async fn produce(client: &Client, topic: &str, prefix: &str, n: usize) -> Vec<Delivery> {
    let producer = client.producer(topic).await.expect("a producer");
    let pending: Vec<_> = (0..n)
        .map(|i| {
            producer.send(
                Record::new(format!("{prefix}-{i}"))
                    .key(format!("key-{}", i % 64))
                    .header(headers::EVENT_TYPE, "test.event"),
            )
        })
        .collect();
    let mut deliveries = Vec::with_capacity(n);
    for send in pending {
        deliveries.push(within("send", send).await.expect("delivered"));
    }
    deliveries
}

/// The next record of a group consumer.
async fn next(consumer: &mut Consumer) -> ConsumedRecord {
    within("consume", consumer.next())
        .await
        .expect("the stream does not end")
        .expect("a record")
}

/// The group's committed offsets by partition of `topic`.
async fn committed(client: &Client, group: &str, topic: &str) -> BTreeMap<u32, u64> {
    client
        .admin()
        .committed_offsets(group)
        .await
        .expect("committed offsets")
        .into_iter()
        .filter(|o| o.topic == topic)
        .map(|o| (o.partition, o.offset))
        .collect()
}

/// A record some member processed.
#[derive(Debug, Clone, Copy)]
struct Seen {
    member: usize,
    partition: u32,
    offset: u64,
}

/// A group member running in its own task: it records every record it gets as
/// processed, then spends `work` on it.
struct Member {
    task: tokio::task::JoinHandle<()>,
    stop: watch::Sender<bool>,
}

impl Member {
    fn spawn(
        index: usize,
        mut consumer: Consumer,
        seen: Arc<Mutex<Vec<Seen>>>,
        work: Duration,
    ) -> Member {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    record = consumer.next() => {
                        let record = record
                            .expect("the stream does not end")
                            .unwrap_or_else(|e| panic!("member {index}: {e}"));
                        seen.lock().expect("not poisoned").push(Seen {
                            member: index,
                            partition: record.partition,
                            offset: record.offset,
                        });
                        if !work.is_zero() {
                            tokio::time::sleep(work).await;
                        }
                    }
                }
            }
            consumer.close().await.expect("close");
        });
        Member { task, stop }
    }

    /// Stops consuming, commits and leaves; fails if the member panicked.
    async fn stop(self) {
        let _ = self.stop.send(true);
        within("member stops", self.task)
            .await
            .expect("the member ran without failing");
    }

    /// Kills the member like a crashed process: no commit, no leave, no more heartbeats.
    async fn crash(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Asserts that `group` committed every partition of `topic` up to one past the last
/// record `produced` there (0 for a partition that got none).
async fn assert_committed_to_the_end(
    client: &Client,
    group: &str,
    topic: &str,
    partitions: u32,
    produced: &[Delivery],
) {
    let committed = committed(client, group, topic).await;
    for partition in 0..partitions {
        let end = produced
            .iter()
            .filter(|d| d.partition == partition)
            .map(|d| d.offset + 1)
            .max()
            .unwrap_or(0);
        assert_eq!(
            committed.get(&partition).copied().unwrap_or(0),
            end,
            "{group} on {topic}/{partition}"
        );
    }
}

/// Waits until the group has `members` members, is stable, and each owns its share.
async fn wait_stable(client: &Client, group: &str, members: usize) {
    let admin = client.admin();
    wait_until("the group settles", || async {
        match admin.describe_group(group).await {
            Ok(d) => {
                d.group.state == GroupState::Stable
                    && d.members.len() == members
                    && d.members.iter().all(|m| m.revoking.is_empty())
            }
            Err(_) => false,
        }
    })
    .await;
}

/// A group of three shares a 6-partition topic; one member crashes (its task is
/// aborted: no commit, no leave) while it is working through its partitions. Once its
/// session expires the others take its partitions over from its last commit. Every
/// record is processed; the only records processed twice are ones the crashed member
/// had processed (at least once, never more than that), and it never had committed past
/// what it processed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_of_three_loses_nothing_when_a_member_crashes() {
    let broker = Broker::start();
    let client = connect(&broker).await;
    create_topic(&client, "orders", 6).await;
    let seen = Arc::new(Mutex::new(Vec::new()));

    // Member 0 will crash: its short session lets the group notice soon. It works
    // slowly, so it crashes with records processed but not yet committed.
    let crashing = ConsumerGroupConfig {
        session_timeout: Duration::from_secs(2),
        ..quick("m0")
    };
    let mut members = Vec::new();
    for index in 0..3 {
        let config = if index == 0 {
            crashing.clone()
        } else {
            quick(&format!("m{index}"))
        };
        let consumer = client
            .consumer_with("checkout", &["orders"], config)
            .await
            .expect("join");
        let work = if index == 0 {
            Duration::from_millis(2)
        } else {
            Duration::ZERO
        };
        members.push(Member::spawn(index, consumer, Arc::clone(&seen), work));
    }
    wait_stable(&client, "checkout", 3).await;
    let description = client
        .admin()
        .describe_group("checkout")
        .await
        .expect("describe");
    let crashed_id = description
        .members
        .iter()
        .find(|m| m.client_id == "m0")
        .expect("member 0 in the group")
        .member_id
        .clone();
    let crashed_partitions: BTreeSet<u32> = description
        .partitions
        .iter()
        .filter(|p| p.owner.as_deref() == Some(crashed_id.as_str()))
        .map(|p| p.partition)
        .collect();
    assert_eq!(crashed_partitions.len(), 2, "{description:?}");

    let mut produced = produce(&client, "orders", "before", 3000).await;
    wait_until("member 0 processes records", || {
        let n = seen
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|s| s.member == 0)
            .count();
        async move { n >= 100 }
    })
    .await;
    let mut members = members.into_iter();
    members.next().expect("member 0").crash().await;

    // The survivors take over; more records arrive meanwhile.
    produced.extend(produce(&client, "orders", "after", 600).await);
    let expected: BTreeSet<(u32, u64)> = produced.iter().map(|d| (d.partition, d.offset)).collect();
    wait_until("every record is processed", || {
        let got: BTreeSet<(u32, u64)> = seen
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|s| (s.partition, s.offset))
            .collect();
        let done = expected.is_subset(&got);
        async move { done }
    })
    .await;
    for member in members {
        member.stop().await;
    }

    let seen = seen.lock().expect("not poisoned").clone();
    let mut by_record: BTreeMap<(u32, u64), Vec<usize>> = BTreeMap::new();
    for s in &seen {
        by_record
            .entry((s.partition, s.offset))
            .or_default()
            .push(s.member);
    }
    let mut redelivered = 0;
    for ((partition, offset), processors) in &by_record {
        let survivors = processors.iter().filter(|&&m| m != 0).count();
        assert!(
            survivors <= 1,
            "{partition}/{offset} processed by {processors:?}: survivors never share a partition"
        );
        if processors.len() > 1 {
            assert!(
                processors.contains(&0) && crashed_partitions.contains(partition),
                "{partition}/{offset} processed by {processors:?}: only the crashed member's \
                 records are delivered again"
            );
            redelivered += 1;
        }
    }
    let crashed_processed = seen.iter().filter(|s| s.member == 0).count();
    assert!(crashed_processed >= 100);
    assert!(redelivered <= crashed_processed);
    // The takeover started where member 0 had committed, which is never past what it
    // processed: the first offset a survivor got on each of its partitions was one
    // member 0 had processed or the one right after.
    for partition in &crashed_partitions {
        let last_by_crashed = seen
            .iter()
            .filter(|s| s.member == 0 && s.partition == *partition)
            .map(|s| s.offset)
            .max();
        let first_by_survivor = seen
            .iter()
            .filter(|s| s.member != 0 && s.partition == *partition)
            .map(|s| s.offset)
            .min();
        // Nothing to take over if member 0 had processed and committed all of it.
        let Some(first_by_survivor) = first_by_survivor else {
            continue;
        };
        let resumable = last_by_crashed.map_or(0, |last| last + 1);
        assert!(
            first_by_survivor <= resumable,
            "partition {partition}: survivors started at {first_by_survivor}, past what \
             member 0 processed ({last_by_crashed:?})"
        );
    }
    // Everything is committed in the end.
    assert_committed_to_the_end(&client, "checkout", "orders", 6, &produced).await;
}

/// A second member joins while the first is working through four partitions: the
/// partitions that move are handed over at the first member's committed position, which
/// is what it processed (up to the record it was holding at the revoke, which the new
/// owner gets again). The first member gets no record of a partition after it lost it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_partitions_hand_over_at_the_processed_position() {
    let broker = Broker::start();
    let client = connect(&broker).await;
    create_topic(&client, "events", 4).await;
    let mut produced = produce(&client, "events", "early", 1000).await;
    let seen = Arc::new(Mutex::new(Vec::new()));
    // No auto-commit tick during the test: the position the second member starts at
    // can only come from the commit on revoke.
    let first = ConsumerGroupConfig {
        auto_commit_interval: Some(Duration::from_secs(3600)),
        ..quick("first")
    };
    let first = client
        .consumer_with("handover", &["events"], first)
        .await
        .expect("join");
    let first = Member::spawn(0, first, Arc::clone(&seen), Duration::from_millis(2));
    wait_until("the first member processes records", || {
        let n = seen.lock().expect("not poisoned").len();
        async move { n >= 50 }
    })
    .await;
    let second = client
        .consumer_with("handover", &["events"], quick("second"))
        .await
        .expect("join");
    let second = Member::spawn(1, second, Arc::clone(&seen), Duration::ZERO);
    wait_stable(&client, "handover", 2).await;
    // Records for every partition after the handover, so the second member reads its
    // partitions whether or not the first had finished them.
    produced.extend(produce(&client, "events", "late", 1000).await);
    let expected: BTreeSet<(u32, u64)> = produced.iter().map(|d| (d.partition, d.offset)).collect();
    wait_until("every record is processed", || {
        let got: BTreeSet<(u32, u64)> = seen
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|s| (s.partition, s.offset))
            .collect();
        let done = expected.is_subset(&got);
        async move { done }
    })
    .await;
    first.stop().await;
    second.stop().await;

    let seen = seen.lock().expect("not poisoned").clone();
    let moved: BTreeSet<u32> = seen
        .iter()
        .filter(|s| s.member == 1)
        .map(|s| s.partition)
        .collect();
    assert!(!moved.is_empty(), "the second member got partitions");
    for partition in moved {
        let by = |member: usize| {
            seen.iter()
                .filter(move |s| s.member == member && s.partition == partition)
                .map(|s| s.offset)
        };
        let second_first = by(1).min().expect("records of a moved partition");
        match by(0).max() {
            // The first member had not read this partition yet: the second starts at
            // its beginning.
            None => assert_eq!(second_first, 0, "partition {partition}"),
            Some(last) => assert!(
                second_first == last || second_first == last + 1,
                "partition {partition}: the first member processed up to {last}, the \
                 second started at {second_first}"
            ),
        }
        // Each member read the partition in order, without gaps or repeats.
        for member in [0, 1] {
            let offsets: Vec<u64> = by(member).collect();
            assert!(
                offsets.windows(2).all(|w| w[1] == w[0] + 1),
                "member {member} on partition {partition}: {offsets:?}"
            );
        }
    }
}

/// A record whose handler keeps failing is tried `max_attempts` times, then stored in
/// `<topic>.dlq` with its key, value and headers and the error headers; the records
/// around it are processed normally and everything is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_record_ends_in_the_dead_letter_topic() {
    let broker = Broker::start();
    let client = connect(&broker).await;
    create_topic(&client, "payments", 1).await;
    let producer = client.producer("payments").await.expect("a producer");
    for value in ["ok-0", "ok-1", "poison", "ok-3", "ok-4"] {
        let record = Record::new(value)
            .key(format!("order-{value}"))
            .header(headers::EVENT_ID, format!("id-{value}"))
            .header(headers::EVENT_TYPE, "payment.requested");
        producer.send(record).await.expect("delivered");
    }

    let mut consumer = client
        .consumer_with("payments-service", &["payments"], quick("payer"))
        .await
        .expect("join");
    let policy = DeadLetterPolicy {
        max_attempts: 3,
        backoff_min: Duration::from_millis(10),
        backoff_max: Duration::from_millis(50),
        ..DeadLetterPolicy::default()
    };
    let dead_letters = DeadLetters::new(&client, policy);
    let tries: Arc<Mutex<BTreeMap<u64, u32>>> = Arc::default();
    let mut outcomes = Vec::new();
    for _ in 0..5 {
        let record = next(&mut consumer).await;
        let outcome = dead_letters
            .process(&record, |r| {
                *tries
                    .lock()
                    .expect("not poisoned")
                    .entry(r.offset)
                    .or_default() += 1;
                let value = r.value.clone().expect("a value");
                async move {
                    if &value[..] == b"poison" {
                        Err(format!("cannot charge {}", String::from_utf8_lossy(&value)))
                    } else {
                        Ok(())
                    }
                }
            })
            .await
            .expect("processed or dead-lettered");
        outcomes.push(outcome);
    }
    assert_eq!(
        *tries.lock().expect("not poisoned"),
        BTreeMap::from([(0, 1), (1, 1), (2, 3), (3, 1), (4, 1)])
    );
    for (i, outcome) in outcomes.iter().enumerate() {
        if i == 2 {
            assert!(
                matches!(
                    outcome,
                    Outcome::DeadLettered { attempts: 3, error, topic, .. }
                        if error == "cannot charge poison" && topic == "payments.dlq"
                ),
                "{outcome:?}"
            );
        } else {
            assert_eq!(*outcome, Outcome::Processed { attempts: 1 });
        }
    }
    consumer.close().await.expect("close");
    assert_eq!(
        committed(&client, "payments-service", "payments").await,
        BTreeMap::from([(0, 5)])
    );

    // The dead-letter topic was created with the source's partition count.
    let dlq = client
        .admin()
        .describe_topic("payments.dlq")
        .await
        .expect("the dead-letter topic exists");
    assert_eq!(dlq.topic.partitions, 1);
    assert_eq!(dlq.partitions[0].latest_offset, 1);
    let mut reader = client
        .partition_consumer("payments.dlq", 0, StartAt::Earliest)
        .await
        .expect("a reader");
    let letter = within("read the dead letter", reader.next())
        .await
        .expect("a record")
        .expect("a record");
    assert_eq!(letter.key.as_deref(), Some(&b"order-poison"[..]));
    assert_eq!(letter.value.as_deref(), Some(&b"poison"[..]));
    for (name, value) in [
        (headers::EVENT_ID, "id-poison"),
        (headers::EVENT_TYPE, "payment.requested"),
        (headers::DLQ_ERROR, "cannot charge poison"),
        (headers::DLQ_ATTEMPTS, "3"),
        (headers::DLQ_SOURCE_TOPIC, "payments"),
        (headers::DLQ_SOURCE_PARTITION, "0"),
        (headers::DLQ_SOURCE_OFFSET, "2"),
    ] {
        assert_eq!(letter.header_str(name), Some(value), "header {name}");
    }
    let failed_at: i64 = letter
        .header_str(headers::DLQ_TIMESTAMP)
        .and_then(|t| t.parse().ok())
        .expect("a dead-letter time");
    assert!(
        failed_at
            >= letter
                .header_str(headers::DLQ_SOURCE_TIMESTAMP)
                .and_then(|t| t.parse().ok())
                .expect("a source time")
    );
}

/// Auto-commit commits, per partition, only what the application received: never the
/// records prefetched behind them, and not the record still in its hands (the last one
/// it got, until it asks for the next). Closing commits everything it was handed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_commit_commits_only_received_positions() {
    let broker = Broker::start();
    let client = connect(&broker).await;
    create_topic(&client, "events", 3).await;
    produce(&client, "events", "e", 300).await;
    let mut consumer = client
        .consumer_with("auditors", &["events"], quick("auditor"))
        .await
        .expect("join");
    // The consumer prefetches far more than this.
    let mut last: BTreeMap<u32, u64> = BTreeMap::new();
    let mut holding = None;
    for _ in 0..40 {
        let record = next(&mut consumer).await;
        last.insert(record.partition, record.offset);
        holding = Some(record);
    }
    let holding = holding.expect("records");
    let expected = |held: bool| -> BTreeMap<u32, u64> {
        (0..3)
            .map(|p| {
                let position = match last.get(&p) {
                    Some(&offset) if held && p == holding.partition => offset,
                    Some(&offset) => offset + 1,
                    // Not read yet: the start position is committed.
                    None => 0,
                };
                (p, position)
            })
            .collect()
    };
    let while_held = expected(true);
    wait_until("auto-commit commits what was received", || {
        let client = client.clone();
        let want = while_held.clone();
        async move { committed(&client, "auditors", "events").await == want }
    })
    .await;
    consumer.close().await.expect("close");
    assert_eq!(
        committed(&client, "auditors", "events").await,
        expected(false)
    );
}

/// Without auto-commit, positions move only by explicit commits: a commit of one record
/// in the middle of a batch, then a restart, resumes exactly after it (the fetch returns
/// the whole batch and its earlier records are skipped); `commit()` commits everything
/// received; closing keeps the last explicit commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_commits_resume_exactly_after_a_restart() {
    let broker = Broker::start();
    let client = connect(&broker).await;
    create_topic(&client, "ledger", 1).await;
    let one_batch = ProducerConfig {
        linger: Duration::from_secs(3600),
        ..ProducerConfig::default()
    };
    let producer = client
        .producer_with("ledger", one_batch)
        .await
        .expect("a producer");
    let pending: Vec<_> = (0..50)
        .map(|i| producer.send(Record::new(format!("entry-{i}"))))
        .collect();
    producer.flush().await;
    for send in pending {
        send.await.expect("delivered");
    }
    let answer = client
        .broker_client()
        .fetch(crate::common::fetch_request("ledger", 0, 0, false))
        .await
        .expect("fetch")
        .into_inner();
    let batches: Vec<i32> = strata_storage::batch::batches(&answer.batches)
        .map(|b| b.expect("a valid batch").header().record_count)
        .collect();
    assert_eq!(batches, [50], "one batch of 50 records");

    let manual = ConsumerGroupConfig {
        auto_commit_interval: None,
        ..quick("bookkeeper")
    };
    let mut consumer = client
        .consumer_with("bookkeepers", &["ledger"], manual.clone())
        .await
        .expect("join");
    let mut received = Vec::new();
    for _ in 0..20 {
        received.push(next(&mut consumer).await);
    }
    assert_eq!(received[19].offset, 19);
    consumer
        .commit_record(&received[9])
        .await
        .expect("commit record 9");
    assert_eq!(
        committed(&client, "bookkeepers", "ledger").await,
        BTreeMap::from([(0, 10)])
    );
    // A record not handed out yet cannot be committed.
    let unread = ConsumedRecord {
        offset: 30,
        ..received[19].clone()
    };
    assert!(matches!(
        consumer.commit_record(&unread).await,
        Err(Error::InvalidArgument { .. })
    ));
    let elsewhere = ConsumedRecord {
        topic: "other".into(),
        ..received[0].clone()
    };
    assert_eq!(
        consumer.commit_record(&elsewhere).await,
        Err(Error::PartitionRevoked {
            topic: "other".into(),
            partition: 0
        })
    );
    consumer.close().await.expect("close");
    assert_eq!(
        committed(&client, "bookkeepers", "ledger").await,
        BTreeMap::from([(0, 10)]),
        "closing without auto-commit keeps the explicit commit"
    );

    let mut consumer = client
        .consumer_with("bookkeepers", &["ledger"], manual)
        .await
        .expect("rejoin");
    let resumed = next(&mut consumer).await;
    assert_eq!(resumed.offset, 10);
    assert_eq!(resumed.value.as_deref(), Some(&b"entry-10"[..]));
    for expected in 11..15 {
        assert_eq!(next(&mut consumer).await.offset, expected);
    }
    consumer.commit().await.expect("commit");
    assert_eq!(
        committed(&client, "bookkeepers", "ledger").await,
        BTreeMap::from([(0, 15)])
    );
    assert_eq!(
        consumer.assignment(),
        [TopicPartition {
            topic: "ledger".into(),
            partition: 0
        }]
    );
    assert!(consumer.member_id().is_some());
    consumer.close().await.expect("close");
}

/// A consumer rides out a broker crash: the broker forgets its members, the consumer
/// rejoins, resumes at the committed positions, and gets every record, old and new,
/// without an error in its stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_rides_out_a_broker_restart() {
    let mut broker = Broker::start();
    let client = connect(&broker).await;
    create_topic(&client, "signals", 2).await;
    let mut produced = produce(&client, "signals", "before", 100).await;
    let mut consumer = client
        .consumer_with("watchers", &["signals"], quick("watcher"))
        .await
        .expect("join");
    let mut got = BTreeSet::new();
    for _ in 0..100 {
        let record = next(&mut consumer).await;
        got.insert((record.partition, record.offset));
    }
    let member_before = consumer.member_id().expect("a member");
    tokio::task::block_in_place(|| {
        broker.kill();
        broker.restart_on_same_port();
    });
    produced.extend(produce(&client, "signals", "after", 100).await);
    let expected: BTreeSet<(u32, u64)> = produced.iter().map(|d| (d.partition, d.offset)).collect();
    while !expected.is_subset(&got) {
        let record = next(&mut consumer).await;
        got.insert((record.partition, record.offset));
    }
    let member_after = consumer.member_id();
    assert!(
        member_after.is_some_and(|id| id != member_before),
        "rejoined with a new id"
    );
    consumer.close().await.expect("close");
    assert_committed_to_the_end(&client, "watchers", "signals", 2, &produced).await;
}

/// Group administration: list, describe with lag, reset (refused while the group has
/// members, and out of range), delete; and the join errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_admin_and_join_errors() {
    let broker = Broker::start();
    let client = connect(&broker).await;
    let admin = client.admin();
    create_topic(&client, "clicks", 2).await;
    let produced = produce(&client, "clicks", "c", 40).await;
    let ends: BTreeMap<u32, u64> = produced.iter().fold(BTreeMap::new(), |mut ends, d| {
        let end = ends.entry(d.partition).or_insert(0);
        *end = (*end).max(d.offset + 1);
        ends
    });

    assert!(matches!(
        client.consumer("analytics", &["nope"]).await,
        Err(Error::TopicNotFound { .. })
    ));
    let short = ConsumerGroupConfig {
        session_timeout: Duration::from_millis(10),
        ..ConsumerGroupConfig::default()
    };
    assert!(matches!(
        client.consumer_with("analytics", &["clicks"], short).await,
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        admin.describe_group("analytics").await,
        Err(Error::GroupNotFound { group, .. }) if group == "analytics"
    ));

    let mut consumer = client
        .consumer_with("analytics", &["clicks"], quick("a1"))
        .await
        .expect("join");
    for _ in 0..40 {
        next(&mut consumer).await;
    }
    // Give back the last record so its position is committable too.
    consumer.commit().await.expect("commit");
    let live = admin.describe_group("analytics").await.expect("describe");
    assert_eq!(live.members.len(), 1);
    assert_eq!(live.members[0].client_id, "a1");
    assert_eq!(live.total_lag, 0);
    assert!(matches!(
        admin
            .reset_offsets("analytics", "clicks", &[], ResetTo::Earliest)
            .await,
        Err(Error::GroupNotEmpty { .. })
    ));
    assert!(matches!(
        admin.delete_group("analytics").await,
        Err(Error::GroupNotEmpty { .. })
    ));
    consumer.close().await.expect("close");

    let groups = admin.list_groups().await.expect("list");
    assert_eq!(groups.len(), 1);
    assert_eq!(
        (groups[0].name.as_str(), groups[0].state, groups[0].members),
        ("analytics", GroupState::Empty, 0)
    );
    let reset = admin
        .reset_offsets("analytics", "clicks", &[0], ResetTo::Offset(1))
        .await
        .expect("reset partition 0");
    assert_eq!(reset.len(), 1);
    assert_eq!((reset[0].partition, reset[0].offset), (0, 1));
    let described = admin.describe_group("analytics").await.expect("describe");
    let lag: BTreeMap<u32, (Option<u64>, Option<u64>, u64)> = described
        .partitions
        .iter()
        .map(|p| (p.partition, (p.committed_offset, p.lag, p.log_end_offset)))
        .collect();
    assert_eq!(
        lag,
        BTreeMap::from([
            (0, (Some(1), Some(ends[&0] - 1), ends[&0])),
            (1, (Some(ends[&1]), Some(0), ends[&1])),
        ])
    );
    assert_eq!(described.total_lag, ends[&0] - 1);
    assert!(matches!(
        admin
            .reset_offsets("analytics", "clicks", &[0], ResetTo::Offset(10_000))
            .await,
        Err(Error::OffsetOutOfRange {
            partition: 0,
            offset: 10_000,
            ..
        })
    ));

    // The group resumes where it was reset to.
    let mut consumer = client
        .consumer_with("analytics", &["clicks"], quick("a2"))
        .await
        .expect("join");
    let record = next(&mut consumer).await;
    assert_eq!((record.partition, record.offset), (0, 1));
    consumer.close().await.expect("close");

    admin.delete_group("analytics").await.expect("delete");
    assert!(matches!(
        admin.describe_group("analytics").await,
        Err(Error::GroupNotFound { .. })
    ));
}

/// Guards trace propagation across the broker: records sent inside a trace context carry
/// a child of it in `traceparent`, stored by the broker as a header; a group consumer
/// reads the same trace id back, and a handler run with `in_trace` (as `DeadLetters`
/// runs every handler) continues the trace in what it produces. Records sent outside any
/// context carry no trace header.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_id_travels_from_producer_through_the_broker_to_consumers() {
    use strata_client::trace::{self, TraceContext};

    let broker = Broker::start();
    let client = connect(&broker).await;
    create_topic(&client, "orders", 2).await;
    create_topic(&client, "payments", 1).await;
    let orders = client.producer("orders").await.expect("a producer");
    let payments = client.producer("payments").await.expect("a producer");

    let root = TraceContext::new_root();
    trace::in_context(root, async {
        for i in 0..4 {
            let record = Record::new(format!("order-{i}")).key(format!("order-{i}"));
            orders.send(record).await.expect("delivered");
        }
    })
    .await;
    orders
        .send(Record::new("untraced").key("order-x"))
        .await
        .expect("delivered");

    let mut consumer = client
        .consumer_with("payment", &["orders"], quick("payer"))
        .await
        .expect("join");
    let dead_letters = DeadLetters::new(&client, DeadLetterPolicy::default());
    let mut traced = 0;
    for _ in 0..5 {
        let record = next(&mut consumer).await;
        let Some(context) = record.trace_context() else {
            assert_eq!(record.value.as_deref(), Some(&b"untraced"[..]));
            assert_eq!(record.header(headers::TRACEPARENT), None);
            continue;
        };
        traced += 1;
        assert_eq!(context.trace_id, root.trace_id, "{record:?}");
        assert_ne!(context.span_id, root.span_id, "the producer sends a child");
        // The handler continues the trace: what it produces carries the same trace id.
        let outcome = dead_letters
            .process(&record, |r| {
                let payments = &payments;
                let value = r.value.clone().unwrap_or_default();
                async move {
                    let current = TraceContext::current().expect("inside the record's trace");
                    assert_eq!(current.trace_id, root.trace_id);
                    payments
                        .send(Record::new(value))
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
            })
            .await
            .expect("processed");
        assert!(matches!(outcome, Outcome::Processed { attempts: 1 }));
    }
    assert_eq!(traced, 4);
    consumer.close().await.expect("close");

    let mut payment_reader = client
        .consumer_with("audit", &["payments"], quick("auditor"))
        .await
        .expect("join");
    for _ in 0..4 {
        let record = next(&mut payment_reader).await;
        let context = record.trace_context().expect("a trace context");
        assert_eq!(context.trace_id, root.trace_id, "{record:?}");
    }
    payment_reader.close().await.expect("close");
}

/// Deleting one topic of a two-topic subscription removes the members that owned its
/// partitions; their rejoin is answered NOT_FOUND. The consumer reports that once and
/// rejoins without the deleted topic: the other topic goes on being consumed (the
/// error used to end the stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_one_subscribed_topic_keeps_the_others_consumed() {
    let broker = Broker::start();
    let client = connect(&broker).await;
    create_topic(&client, "gone", 2).await;
    create_topic(&client, "kept", 2).await;
    let mut consumer = client
        .consumer_with("watchers", &["gone", "kept"], quick("watcher"))
        .await
        .expect("join");
    produce(&client, "kept", "before", 5).await;
    let mut before = 0;
    while before < 5 {
        if next(&mut consumer).await.value.is_some() {
            before += 1;
        }
    }
    client.admin().delete_topic("gone").await.expect("delete");
    produce(&client, "kept", "after", 5).await;
    let mut after = BTreeSet::new();
    let mut not_found = 0;
    while after.len() < 5 {
        match within("consume", consumer.next()).await {
            Some(Ok(record)) => {
                let value = String::from_utf8_lossy(record.value.as_deref().unwrap_or_default())
                    .into_owned();
                if value.starts_with("after-") {
                    after.insert(value);
                }
            }
            Some(Err(Error::TopicNotFound { .. })) => not_found += 1,
            Some(Err(e)) => panic!("unexpected error: {e}"),
            None => panic!("the stream ended after the topic was deleted"),
        }
    }
    assert!(
        not_found <= 2,
        "the missing topic is reported once, not per retry"
    );
    consumer.close().await.expect("close");
}

/// With `OffsetReset::None` a group without a committed position reads nothing and says
/// so (`NoPosition`, naming the partition); once an operator sets the position, a
/// consumer starts exactly there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reset_policy_reads_nothing_without_a_committed_position() {
    let broker = Broker::start();
    let client = connect(&broker).await;
    create_topic(&client, "payments", 1).await;
    produce(&client, "payments", "p", 10).await;
    let strict = ConsumerGroupConfig {
        auto_offset_reset: OffsetReset::None,
        ..quick("strict")
    };
    let mut consumer = client
        .consumer_with("settlement", &["payments"], strict.clone())
        .await
        .expect("join");
    match within("the missing position is reported", consumer.next()).await {
        Some(Err(Error::NoPosition {
            group,
            topic,
            partition,
            ..
        })) => assert_eq!(
            (group.as_str(), topic.as_str(), partition),
            ("settlement", "payments", 0)
        ),
        other => panic!("expected NoPosition, got {other:?}"),
    }
    consumer.close().await.expect("close");
    client
        .admin()
        .reset_offsets("settlement", "payments", &[], ResetTo::Offset(7))
        .await
        .expect("set the position");
    let mut consumer = client
        .consumer_with("settlement", &["payments"], strict)
        .await
        .expect("join again");
    let offsets: Vec<u64> = [
        next(&mut consumer).await,
        next(&mut consumer).await,
        next(&mut consumer).await,
    ]
    .iter()
    .map(|r| r.offset)
    .collect();
    assert_eq!(offsets, [7, 8, 9]);
    consumer.close().await.expect("close");
}

/// `seek` rewinds (or skips ahead in) an owned partition: buffered records from the old
/// position are dropped and the next record is the one sought. A position ahead is
/// committed at once; a rewind leaves the committed position (commits never go back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seek_rewinds_an_owned_partition_and_commits_the_position() {
    let broker = Broker::start();
    let client = connect(&broker).await;
    create_topic(&client, "ticks", 1).await;
    produce(&client, "ticks", "t", 20).await;
    let mut consumer = client
        .consumer_with("replayers", &["ticks"], quick("replayer"))
        .await
        .expect("join");
    for expected in 0..10 {
        assert_eq!(next(&mut consumer).await.offset, expected);
    }
    consumer.commit().await.expect("commit");
    assert_eq!(committed(&client, "replayers", "ticks").await[&0], 10);

    consumer.seek("ticks", 0, 3).await.expect("seek back");
    assert_eq!(next(&mut consumer).await.offset, 3);
    assert_eq!(next(&mut consumer).await.offset, 4);
    assert_eq!(committed(&client, "replayers", "ticks").await[&0], 10);
    consumer.seek("ticks", 0, 15).await.expect("seek ahead");
    assert_eq!(committed(&client, "replayers", "ticks").await[&0], 15);
    assert_eq!(next(&mut consumer).await.offset, 15);

    assert!(matches!(
        consumer.seek("ticks", 0, 21).await,
        Err(Error::InvalidArgument { .. })
    ));
    assert!(matches!(
        consumer.seek("ticks", 1, 0).await,
        Err(Error::PartitionRevoked { .. })
    ));
    consumer.close().await.expect("close");
}

/// The revocation hook is told which partitions a rebalance takes away, and which a
/// close releases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_revocation_hook_hears_of_partitions_taken_away() {
    let broker = Broker::start();
    let client = connect(&broker).await;
    create_topic(&client, "jobs", 2).await;
    type Heard = Vec<(Revocation, Vec<TopicPartition>)>;
    let heard: Arc<Mutex<Heard>> = Arc::default();
    let hook = {
        let heard = Arc::clone(&heard);
        OnRevoke::new(move |why, partitions| {
            heard
                .lock()
                .expect("heard")
                .push((why, partitions.to_vec()));
        })
    };
    let first = client
        .consumer_with(
            "workers",
            &["jobs"],
            ConsumerGroupConfig {
                on_revoke: Some(hook),
                ..quick("first")
            },
        )
        .await
        .expect("join");
    wait_until("the first member owns both partitions", || {
        let owned = first.assignment().len();
        async move { owned == 2 }
    })
    .await;
    let second = client
        .consumer_with("workers", &["jobs"], quick("second"))
        .await
        .expect("join");
    wait_until("a partition is taken from the first member", || {
        let heard = !heard.lock().expect("heard").is_empty();
        async move { heard }
    })
    .await;
    let taken = heard.lock().expect("heard")[0].clone();
    assert_eq!(taken.0, Revocation::Revoked);
    assert_eq!(taken.1.len(), 1, "{taken:?}");
    wait_until("the second member gets it", || {
        let owned = second.assignment();
        let expected = taken.1.clone();
        async move { owned == expected }
    })
    .await;
    let kept = first.assignment();
    first.close().await.expect("close");
    let last = heard.lock().expect("heard").last().cloned().expect("heard");
    assert_eq!(last, (Revocation::Revoked, kept));
    second.close().await.expect("close");
}
