//! A full disk, for real: the broker's data directory on a 16 MiB tmpfs the test mounts
//! (as root; skipped with a message otherwise), filled by the test until a batch no
//! longer fits. The produce is refused with RESOURCE_EXHAUSTED before anything is
//! written, the log stays readable, and once space is freed writes resume without a
//! restart (a write that hit ENOSPC used to fail-stop the partition until a restart).

use std::path::{Path, PathBuf};
use std::process::Command;

use std::time::Duration;

use crate::common::{produce_records, read_partition, record, Broker};
use strata_client::{Client, ConsumerGroupConfig, Error};
use strata_proto::v1;
use strata_proto::v1::groups_client::GroupsClient;
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

/// Guard against a hang; never reached when things work, and nothing asserts on time.
const HANG_GUARD: Duration = Duration::from_secs(120);

/// Unmounts the tmpfs when the test ends, however it ends.
struct Mounted(PathBuf);

impl Mounted {
    /// Mounts a tmpfs of `size` over `dir`; `None` (with the reason) when it cannot.
    fn tmpfs(dir: &Path, size: &str) -> Result<Mounted, String> {
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !output.status.success() {
            return Err(String::from_utf8_lossy(&output.stderr).trim().to_string());
        }
        Ok(Mounted(dir.to_path_buf()))
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // Lazy: the broker may still have files open in it.
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn free_bytes(dir: &Path) -> u64 {
    let fs = rustix::fs::statvfs(dir).expect("statvfs");
    fs.f_bavail * fs.f_frsize
}

/// Writes `path` until the file system is full.
fn fill_up(path: &Path) {
    use std::io::Write;
    let mut file = std::fs::File::create(path).expect("create the filler");
    let chunk = vec![0u8; 64 << 10];
    while file.write(&chunk).is_ok_and(|n| n > 0) {}
}

/// 20 records of 10 KiB: a 200 KiB batch.
fn big_batch(tag: u8) -> Vec<v1::Record> {
    (0..20).map(|_| record(None, &[tag; 10 << 10])).collect()
}

/// A broker whose data directory is a fresh 16 MiB tmpfs; `None` (the test is skipped,
/// with a message) when it cannot be mounted.
fn broker_on_small_tmpfs() -> Option<(Broker, Mounted)> {
    let mut broker = Broker::start();
    // The data directory is replaced by the tmpfs: nothing in it matters yet.
    tokio::task::block_in_place(|| broker.kill());
    let mounted = match Mounted::tmpfs(&broker.data_dir(), "16m") {
        Ok(mounted) => mounted,
        Err(why) => {
            eprintln!("skipped: cannot mount a small tmpfs for the data directory ({why})");
            return None;
        }
    };
    tokio::task::block_in_place(|| broker.restart());
    Some((broker, mounted))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_and_they_resume_once_space_is_freed() {
    let Some((mut broker, _mounted)) = broker_on_small_tmpfs() else {
        return;
    };
    let data = broker.data_dir();
    let mut admin = broker.admin().await;
    crate::common::create_topic(&mut admin, "full", 1, v1::TopicConfig::default()).await;
    let mut client = broker.client().await;
    client
        .produce(produce_records("full", 0, big_batch(1)))
        .await
        .expect("room for the first batch");

    // Leave 64 KiB: less than the next batch.
    let filler = data.join("filler");
    let fill = free_bytes(&data).saturating_sub(64 << 10);
    std::fs::write(&filler, vec![0u8; fill as usize]).expect("fill the disk");
    let refused = client
        .produce(produce_records("full", 0, big_batch(2)))
        .await
        .expect_err("no room");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.message().contains("disk full"), "{refused:?}");

    // Readable as before.
    let records = read_partition(&mut client, "full", 0).await;
    assert_eq!(records.len(), 20);

    // Space freed: writes resume, same process.
    std::fs::remove_file(&filler).expect("free the space");
    let stored = client
        .produce(produce_records("full", 0, big_batch(3)))
        .await
        .expect("writes resume once space is freed")
        .into_inner();
    assert_eq!(
        stored.base_offset, 20,
        "nothing of the refused batch was stored"
    );
    let records = read_partition(&mut client, "full", 0).await;
    assert_eq!(records.len(), 40);
    assert!(records[20..]
        .iter()
        .all(|r| r.value.as_deref().is_some_and(|v| v[0] == 3)));
    tokio::task::block_in_place(|| broker.stop());
}

/// Records the consumer reads one commit at a time once the disk is full: each commit
/// adds about 100 bytes to the offsets log, so 200 of them outgrow any page it has.
const RECORDS_TO_COMMIT: usize = 200;

/// The committed-offsets log failing its write (the disk is full) is not swallowed: the
/// broker's Groups health goes NOT_SERVING, and a consumer whose auto-commits keep being
/// refused gets the error on its stream (auto-commit used to drop it silently). Once
/// space is freed the broker reopens the offsets log by itself: health turns SERVING
/// and commits succeed, without a restart (they used to be refused until one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_offsets_log_write_reaches_health_and_the_consumer() {
    let Some((broker, _mounted)) = broker_on_small_tmpfs() else {
        return;
    };
    let data = broker.data_dir();
    let mut admin = broker.admin().await;
    crate::common::create_topic(&mut admin, "events", 1, v1::TopicConfig::default()).await;
    let mut raw = broker.client().await;
    let small: Vec<v1::Record> = (0..RECORDS_TO_COMMIT)
        .map(|i| record(None, format!("e-{i}").as_bytes()))
        .collect();
    raw.produce(produce_records("events", 0, small))
        .await
        .expect("produce");
    let client = Client::connect(&broker.addr_arg()).await.expect("connect");
    let config = ConsumerGroupConfig {
        client_id: "auditor".into(),
        auto_commit_interval: Some(Duration::from_millis(50)),
        ..ConsumerGroupConfig::default()
    };
    let mut consumer = client
        .consumer_with("auditors", &["events"], config)
        .await
        .expect("join");
    let first = tokio::time::timeout(HANG_GUARD, consumer.next())
        .await
        .expect("a record");
    assert!(matches!(first, Some(Ok(_))), "{first:?}");

    fill_up(&data.join("filler"));
    // A commit that fits in the last page the offsets log already has succeeds on a
    // full tmpfs: read slower than auto-commit runs, so every record read is a commit of
    // its own, far more than a page holds.
    let reported = tokio::time::timeout(HANG_GUARD, async {
        loop {
            match consumer.next().await {
                Some(Ok(_)) => tokio::time::sleep(Duration::from_millis(60)).await,
                Some(Err(e)) => break e,
                None => panic!("the stream ended"),
            }
        }
    })
    .await
    .expect("the failing auto-commit is reported");
    assert!(
        matches!(reported, Error::Unavailable { .. }),
        "{reported:?}"
    );
    assert!(
        reported.to_string().contains("committed-offsets"),
        "{reported}"
    );

    let mut health = HealthClient::new(broker.channel().await);
    let status = health
        .check(HealthCheckRequest {
            service: "strata.v1.Groups".into(),
        })
        .await
        .expect("health check")
        .into_inner()
        .status();
    assert_eq!(status, ServingStatus::NotServing);
    assert!(
        !client.is_serving().await.expect("a health answer"),
        "the whole broker is not serving while commits are refused"
    );
    drop(consumer);

    std::fs::remove_file(data.join("filler")).expect("free the space");
    let mut watch = health
        .watch(HealthCheckRequest {
            service: "strata.v1.Groups".into(),
        })
        .await
        .expect("health watch")
        .into_inner();
    tokio::time::timeout(HANG_GUARD, async {
        while let Some(status) = watch.next().await {
            if status.expect("a status").status() == ServingStatus::Serving {
                return;
            }
        }
        panic!("the health watch ended");
    })
    .await
    .expect("the offsets log recovers once space is freed");
    assert!(client.is_serving().await.expect("a health answer"));
    let mut groups = GroupsClient::new(broker.channel().await);
    let offset = v1::PartitionOffset {
        topic: "events".into(),
        partition: 0,
        offset: 42,
        ..Default::default()
    };
    groups
        .commit_offsets(v1::CommitOffsetsRequest {
            group: "after-the-disk-was-freed".into(),
            offsets: vec![offset],
            ..Default::default()
        })
        .await
        .expect("commits succeed again, without a restart");
    let fetched = groups
        .fetch_offsets(v1::FetchOffsetsRequest {
            group: "after-the-disk-was-freed".into(),
            partitions: vec![],
        })
        .await
        .expect("fetch")
        .into_inner();
    assert_eq!(fetched.offsets.len(), 1);
    assert_eq!(fetched.offsets[0].offset, 42);
}
