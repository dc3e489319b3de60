//! Guards the fsync policy's promise: an append that returned is readable, with the same
//! content, after the appending process is killed with SIGKILL at an arbitrary moment.
//!
//! The test re-runs its own binary as a child that appends forever on the real disk and
//! prints each acknowledged offset range after `append` returns. The parent kills it
//! after a varying number of acknowledgements, reopens the log, checks every acknowledged
//! record, and starts the next round on the same directory. Record contents are a pure
//! function of their offset, so anything the child wrote — acknowledged or not — must
//! read back exactly or not at all.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use strata_storage::batch::{batches, BatchBuilder};
use strata_storage::{Durability, FileCache, Log, LogConfig};

const CHILD_DIR_ENV: &str = "STRATA_CRASH_CHILD_DIR";
const ROUNDS: u64 = 25;

fn config() -> LogConfig {
    LogConfig {
        // Small segments and frequent checkpoints so kills land during rolls and
        // checkpoint writes too.
        segment_bytes_max: 64 << 10,
        checkpoint_interval_bytes: 16 << 10,
        index_interval_bytes: 1024,
        index_bytes_max: 16 << 10,
        durability: Durability::Fsync,
        ..LogConfig::default()
    }
}

fn value_for(offset: u64) -> Vec<u8> {
    let mut v = format!("offset {offset}:").into_bytes();
    v.resize(
        v.len() + (offset % 300) as usize,
        b'a' + (offset % 26) as u8,
    );
    v
}

/// The child: appends batches of 1 to 5 records forever, printing `acked FIRST LAST`
/// after each append returns.
#[test]
#[ignore = "child process of sigkilled_appender_loses_no_acknowledged_record"]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return;
    };
    let mut log = Log::open(&dir, config(), &FileCache::new(16)).expect("child open");
    loop {
        let base = log.next_offset();
        let count = base % 5 + 1;
        let mut b = BatchBuilder::new();
        for offset in base..base + count {
            b.push(offset as i64, Some(b"k"), Some(&value_for(offset)), &[]);
        }
        let info = log.append(&b.finish()).expect("child append");
        assert_eq!(info.base_offset, base);
        println!("acked {} {}", info.base_offset, info.last_offset);
    }
}

/// Reads every record and checks offsets are dense from 0 and contents match.
fn verify(dir: &Path, acked_up_to: Option<u64>, round: u64) -> u64 {
    let log = Log::open(dir, config(), &FileCache::new(16)).expect("reopen");
    let reader = log.reader();
    let high_watermark = reader.high_watermark();
    if let Some(acked) = acked_up_to {
        assert!(
            high_watermark > acked,
            "round {round}: acknowledged offset {acked} lost (high watermark {high_watermark})"
        );
    }
    let mut expected = 0;
    while expected < high_watermark {
        let read = reader.read(expected, 1 << 20).expect("read");
        for batch in batches(&read.batches) {
            for record in batch.expect("valid batch").records() {
                let record = record.expect("valid record");
                if record.offset < expected {
                    continue;
                }
                assert_eq!(record.offset, expected, "round {round}: gap");
                assert_eq!(
                    record.value,
                    Some(&value_for(expected)[..]),
                    "round {round}"
                );
                expected += 1;
            }
        }
    }
    high_watermark
}

#[test]
fn sigkilled_appender_loses_no_acknowledged_record() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir on the real disk");
    let exe = std::env::current_exe().expect("test binary path");
    let mut acked: Option<u64> = None;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    for round in 0..ROUNDS {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let acks_before_kill = 1 + rng % 40;
        let mut child = Command::new(&exe)
            .args([
                "crash::crash_child",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("child stdout");
        let mut seen = 0;
        for line in BufReader::new(stdout).lines() {
            let line = line.expect("child output");
            let Some(range) = line.strip_prefix("acked ") else {
                continue;
            };
            let last: u64 = range
                .split(' ')
                .nth(1)
                .and_then(|s| s.parse().ok())
                .expect("acked line");
            acked = Some(last);
            seen += 1;
            if seen == acks_before_kill {
                break;
            }
        }
        child.kill().expect("SIGKILL child");
        child.wait().expect("reap child");
        assert_eq!(seen, acks_before_kill, "round {round}: child exited early");
        verify(dir.path(), acked, round);
    }
    let total = verify(dir.path(), acked, ROUNDS);
    eprintln!("{ROUNDS} SIGKILL rounds, {total} records verified");
}
