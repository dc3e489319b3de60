//! A full disk, for real: the broker's data directory on a 16 MiB tmpfs the test mounts
//! (as root; skipped with a message otherwise), filled by the test until a batch no
//! longer fits. The produce is refused with RESOURCE_EXHAUSTED before anything is
//! written, the log stays readable, and once space is freed writes resume without a
//! restart (a write that hit ENOSPC used to fail-stop the partition until a restart).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{produce_records, read_partition, record, Broker};
use strata_proto::v1;
use tonic::Code;

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

/// 20 records of 10 KiB: a 200 KiB batch.
fn big_batch(tag: u8) -> Vec<v1::Record> {
    (0..20).map(|_| record(None, &[tag; 10 << 10])).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_and_they_resume_once_space_is_freed() {
    let mut broker = Broker::start();
    // The data directory is replaced by the tmpfs: nothing in it matters yet.
    tokio::task::block_in_place(|| broker.kill());
    let data = broker.data_dir();
    let _mounted = match Mounted::tmpfs(&data, "16m") {
        Ok(mounted) => mounted,
        Err(why) => {
            eprintln!("skipped: cannot mount a small tmpfs for the data directory ({why})");
            return;
        }
    };
    tokio::task::block_in_place(|| broker.restart());
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
