//! Injected I/O faults and simulated power losses against the durability promises
//! (`docs/storage-format.md`, "What each durability policy promises").
//!
//! A real [`Log`] appends group-committed batches while [`strata_storage::fault`]
//! makes the Nth write, fsync, truncation, directory fsync, read or open fail (EIO,
//! ENOSPC, EMFILE, short writes), and reopens happen with the files as they are (a process restart) or
//! after [`Injector::crash`] has thrown away everything not fsynced (a power loss).
//! After every reopen the test reads the whole log and checks:
//!
//! - offsets are dense from the log's start, and every batch read is byte for byte one
//!   that was handed to `write` at that offset: nothing unacknowledged is half-visible;
//! - under `fsync`, every acknowledged batch is there, after any fault and any crash;
//! - under `interval` and `none`, every acknowledged batch (all of which were published,
//!   so may have been served) is there after a restart; after a power loss, a batch
//!   can be missing only if the log reports that it may have lost records from that
//!   offset on ([`strata_storage::LogRecovery`]).

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;
use strata_storage::batch::{batches, set_base_offset, BatchBuilder};
use strata_storage::fault::{Fault, Injector, Op};
use strata_storage::{Deferred, Durability, Error, FileCache, Log, LogConfig};

#[derive(Debug, Clone)]
enum Step {
    /// Write batches of these record counts, then commit them as one group.
    Append(Vec<usize>),
    /// Arm a fault for the Nth operation of a kind, from now.
    Arm { op: Op, nth: u64, fault: Fault },
    /// Drop the log and open it again; with `crash`, after a power loss.
    Reopen { crash: bool },
    /// Close the log cleanly (it may fail) and open it again.
    Close,
}

fn step() -> impl Strategy<Value = Step> {
    let op = prop_oneof![
        Just(Op::Write),
        Just(Op::Sync),
        Just(Op::SetLen),
        Just(Op::SyncDir),
        Just(Op::Read),
        Just(Op::Open),
    ];
    let fault = prop_oneof![
        Just(Fault::eio()),
        Just(Fault::no_space()),
        Just(Fault::too_many_open_files()),
        (0usize..200).prop_map(Fault::short_write),
    ];
    prop_oneof![
        8 => proptest::collection::vec(1usize..5, 1..4).prop_map(Step::Append),
        2 => (op, 1u64..6, fault).prop_map(|(op, nth, fault)| Step::Arm { op, nth, fault }),
        2 => any::<bool>().prop_map(|crash| Step::Reopen { crash }),
        1 => Just(Step::Close),
    ]
}

fn durability() -> impl Strategy<Value = Durability> {
    prop_oneof![
        Just(Durability::Fsync),
        // Long enough that only the checkpoint interval triggers syncs: deterministic.
        Just(Durability::Interval(Duration::from_secs(3600))),
        Just(Durability::None),
    ]
}

fn config(durability: Durability) -> LogConfig {
    LogConfig {
        segment_bytes_max: 1500,
        index_interval_bytes: 200,
        index_bytes_max: 96,
        checkpoint_interval_bytes: 700,
        segment_ms: None,
        retention_ms: None,
        durability,
        ..LogConfig::default()
    }
}

/// A batch no other batch equals: its values carry a unique id.
fn encode(id: u64, records: usize) -> Vec<u8> {
    let mut b = BatchBuilder::new();
    for i in 0..records {
        let value = format!("batch {id} record {i} {}", "x".repeat((id % 50) as usize));
        b.push(id as i64, None, Some(value.as_bytes()), &[]);
    }
    b.finish()
}

/// What the test knows about the log.
#[derive(Default)]
struct Ledger {
    /// Batches acknowledged (their commit returned), by base offset, as stored.
    acked: BTreeMap<u64, Vec<u8>>,
    /// Batches written whose commit failed (or never came): each may or may not be in
    /// the log after a reopen, whole.
    unacked: BTreeMap<u64, Vec<u8>>,
}

/// Every batch of the log, in order, checked to be dense and whole.
fn read_all(log: &Log) -> Result<Vec<(u64, Vec<u8>)>, TestCaseError> {
    let reader = log.reader();
    let mut out = Vec::new();
    let mut next = reader.earliest_offset();
    while next < reader.high_watermark() {
        let read = reader
            .read(next, 4096)
            .map_err(|e| TestCaseError::fail(format!("read at {next}: {e}")))?;
        for batch in batches(&read.batches) {
            let batch = batch.map_err(|e| TestCaseError::fail(format!("batch: {e}")))?;
            let header = batch.header();
            if header.last_offset() < next {
                continue;
            }
            prop_assert_eq!(header.base_offset, next, "offsets are not dense");
            out.push((header.base_offset, batch.as_bytes().to_vec()));
            next = header.next_offset();
        }
        prop_assert_eq!(read.next_offset, next);
    }
    Ok(out)
}

/// Opens the log, retrying with faults disarmed when an injected fault made it fail
/// (the second value is then false).
fn try_open(injector: &Injector, config: &LogConfig, files: &FileCache) -> (Log, bool) {
    match Log::open(injector.root(), config.clone(), files) {
        Ok(log) => (log, true),
        Err(_) => {
            injector.clear();
            let log =
                Log::open(injector.root(), config.clone(), files).expect("open without faults");
            (log, false)
        }
    }
}

fn open(injector: &Injector, config: &LogConfig, files: &FileCache) -> Log {
    try_open(injector, config, files).0
}

/// Checks a freshly opened log against the ledger, then makes the ledger describe it.
fn verify(
    injector: &Injector,
    log: &Log,
    ledger: &mut Ledger,
    crashed: bool,
) -> Result<(), TestCaseError> {
    // Faults armed for the open have had their chance; the check reads without them.
    injector.clear();
    let policy = log.config().durability;
    let recovery = log.recovery();
    let found = read_all(log)?;
    let end = log.reader().high_watermark();
    for (base, bytes) in &found {
        let expected = ledger.acked.get(base).or_else(|| ledger.unacked.get(base));
        prop_assert!(
            expected == Some(bytes),
            "batch at {} is not one written there (half-visible or a reused offset)",
            base
        );
    }
    for base in ledger.acked.keys().filter(|&&b| b >= end) {
        let excused = policy != Durability::Fsync
            && crashed
            && recovery.may_have_lost_records()
            && recovery.recovered_to <= *base;
        prop_assert!(
            excused,
            "acknowledged batch at {} lost under {} (crash: {}, recovered to {}, {:?})",
            base,
            policy,
            crashed,
            end,
            recovery
        );
    }
    ledger.acked = found.into_iter().collect();
    ledger.unacked.clear();
    Ok(())
}

fn run(steps: Vec<Step>, durability: Durability) -> Result<(), TestCaseError> {
    let dir = crate::common::scratch_dir();
    let injector = Injector::new(dir.path())
        .and_then(Injector::with_crash_model)
        .expect("injector");
    let files = FileCache::new(4);
    let config = config(durability);
    let mut log = Some(open(&injector, &config, &files));
    let mut ledger = Ledger::default();
    let mut id = 0;
    for step in steps {
        match step {
            Step::Append(counts) => {
                let l = log.as_mut().expect("open");
                let mut written = Vec::new();
                let mut failed = false;
                for records in counts {
                    id += 1;
                    let mut bytes = encode(id, records);
                    match l.write(&bytes) {
                        Ok(info) => {
                            set_base_offset(&mut bytes, info.base_offset);
                            written.push((info.base_offset, bytes));
                        }
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
                let committed = !failed && l.commit().is_ok();
                let into = if committed {
                    &mut ledger.acked
                } else {
                    &mut ledger.unacked
                };
                into.extend(written);
            }
            Step::Arm { op, nth, fault } => injector.fail_nth(op, nth, fault),
            Step::Reopen { crash } => {
                drop(log.take());
                if crash {
                    injector.crash().expect("crash");
                }
                let l = open(&injector, &config, &files);
                verify(&injector, &l, &mut ledger, crash)?;
                log = Some(l);
            }
            Step::Close => {
                let closed = log.take().expect("open").close();
                let (l, first_try) = try_open(&injector, &config, &files);
                if closed.is_ok() && first_try {
                    prop_assert!(l.recovery().clean, "a clean close is seen as clean");
                }
                verify(&injector, &l, &mut ledger, false)?;
                log = Some(l);
            }
        }
    }
    drop(log.take());
    injector.crash().expect("crash");
    let l = open(&injector, &config, &files);
    verify(&injector, &l, &mut ledger, true)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn acknowledged_batches_survive_faults_and_crashes(
        steps in proptest::collection::vec(step(), 1..60),
        durability in durability(),
    ) {
        run(steps, durability)?;
    }
}

/// The first case, as a fixed scenario: under `interval`, batches acknowledged
/// and served before a failed fsync must stay readable, and keep their offsets after a
/// restart (the failed fsync used to cut them off).
#[test]
fn failed_fsync_under_interval_keeps_served_batches() {
    let dir = crate::common::scratch_dir();
    let injector = Injector::new(dir.path()).expect("injector");
    let config = LogConfig {
        checkpoint_interval_bytes: 1 << 20,
        ..config(Durability::Interval(Duration::from_secs(3600)))
    };
    let files = FileCache::new(4);
    let mut log = Log::open(injector.root(), config.clone(), &files).expect("open");
    let acked: Vec<u64> = (0..3)
        .map(|i| log.append(&encode(i, 2)).expect("append").base_offset)
        .collect();
    let served = read_all(&log).expect("served");
    assert_eq!(served.len(), 3);
    injector.fail_nth(Op::Sync, 1, Fault::eio());
    let e = log.flush().expect_err("the fsync fails");
    assert!(e.to_string().contains("I/O error"), "{e}");
    assert!(
        log.append(&encode(9, 1)).is_err(),
        "the log fail-stops after a failed fsync"
    );
    assert_eq!(read_all(&log).expect("still served"), served);
    drop(log);
    let log = Log::open(injector.root(), config, &files).expect("reopen");
    assert_eq!(read_all(&log).expect("read"), served);
    assert_eq!(log.next_offset(), acked[2] + 2);
}

/// A log opened in a directory that does not exist yet creates every missing level, and
/// each must survive a power loss once an append was acknowledged under `fsync` (only
/// the last level's parent used to be fsynced).
#[test]
fn every_created_directory_level_survives_a_crash() {
    let dir = crate::common::scratch_dir();
    let injector = Injector::new(dir.path())
        .and_then(Injector::with_crash_model)
        .expect("injector");
    let path = injector.root().join("data").join("orders").join("0");
    let files = FileCache::new(4);
    let mut log = Log::open(&path, config(Durability::Fsync), &files).expect("open");
    let acked = log.append(&encode(1, 2)).expect("append");
    drop(log);
    injector.crash().expect("crash");
    let log = Log::open(&path, config(Durability::Fsync), &files).expect("reopen");
    assert_eq!(log.reader().high_watermark(), acked.last_offset + 1);
    for level in ["data", "data/orders", "data/orders/0"] {
        let level = injector.root().join(level);
        let parent = level.parent().expect("parent");
        assert!(
            injector.synced_dirs().iter().any(|d| d == parent),
            "{} was created but {} not fsynced",
            level.display(),
            parent.display()
        );
    }
}

/// When the fsync of a commit fails and cutting the unacknowledged bytes after it fails
/// too, the error says so (the cut used to be attempted and its failure ignored): those
/// batches may come back after a restart although their producers got an error.
#[test]
fn a_failed_cut_after_a_failed_fsync_is_reported() {
    let dir = crate::common::scratch_dir();
    let injector = Injector::new(dir.path()).expect("injector");
    let files = FileCache::new(4);
    let mut log = Log::open(injector.root(), config(Durability::Fsync), &files).expect("open");
    log.append(&encode(1, 2)).expect("append");
    log.write(&encode(2, 2)).expect("staged");
    injector.fail_nth(Op::Sync, 1, Fault::eio());
    injector.fail_nth(Op::SetLen, 1, Fault::eio());
    let e = log.commit().expect_err("the fsync fails").to_string();
    assert!(
        e.contains("fsync failed") && e.contains("cutting the"),
        "the failed cut is reported: {e}"
    );
    assert_eq!(
        log.reader().high_watermark(),
        2,
        "nothing unsynced published"
    );
}

/// Names of the files in the log's directory.
fn listing(injector: &Injector) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(injector.root())
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Appends batches of 3 records until the next one (of `id + 1`) needs a roll: the
/// active segment (the last `.log`; all is written under `fsync`) has no room for it.
/// Returns the acknowledged batches.
fn fill_segment(injector: &Injector, log: &mut Log, id: &mut u64) -> Vec<(u64, Vec<u8>)> {
    let segment_bytes_max = log.config().segment_bytes_max;
    let mut acked = Vec::new();
    loop {
        let last_log = listing(injector)
            .into_iter()
            .rfind(|n| n.ends_with(".log"))
            .expect("a segment");
        let active = std::fs::metadata(injector.root().join(last_log))
            .expect("size")
            .len();
        let next = encode(*id + 1, 3);
        if active > 0 && active + next.len() as u64 > segment_bytes_max {
            return acked;
        }
        *id += 1;
        let mut bytes = next;
        let info = log.append(&bytes).expect("append");
        set_base_offset(&mut bytes, info.base_offset);
        acked.push((info.base_offset, bytes));
    }
}

/// Issue 13: with the fd limit reached, creating the next segment's files fails with
/// EMFILE. That must not fail-stop the log (it used to, until a restart): the append
/// that needed the roll gets the retryable `RollFailed`, nothing it created is left
/// behind, what was published stays readable, and once files can be opened again the
/// roll happens and every acknowledged batch is there, dense, also after a power loss.
/// Each of the roll's four opens (offset index, time index, log, directory) fails, at
/// three tries in a row.
#[test]
fn emfile_at_a_roll_is_retried_and_fail_stops_nothing() {
    for nth in 1..=4 {
        let dir = crate::common::scratch_dir();
        let injector = Injector::new(dir.path())
            .and_then(Injector::with_crash_model)
            .expect("injector");
        let config = config(Durability::Fsync);
        let files = FileCache::new(4);
        let mut log = Log::open(injector.root(), config.clone(), &files).expect("open");
        let mut id = 0;
        let mut acked = fill_segment(&injector, &mut log, &mut id);
        let before = listing(&injector);
        // Reads keep the segment's read handle open (the file cache holds it).
        assert_eq!(read_all(&log).expect("read"), acked);
        for _ in 0..3 {
            injector.fail_nth(Op::Open, nth, Fault::too_many_open_files());
            id += 1;
            let e = log
                .append(&encode(id, 3))
                .expect_err("the roll cannot open its files");
            assert!(
                matches!(&e, Error::RollFailed { source, .. } if source.raw_os_error() == Some(24)),
                "open {nth}: {e:?}"
            );
            assert!(e.to_string().contains("still takes writes"), "{e}");
            assert_eq!(listing(&injector), before, "open {nth}: files left behind");
            assert_eq!(read_all(&log).expect("reads work"), acked);
        }
        let failures: Vec<_> = log.take_deferred_failures().collect();
        assert_eq!(failures.len(), 3, "{failures:?}");
        assert!(failures.iter().all(|f| f.step == Deferred::Roll));
        assert!(failures[0].first && !failures[1].first);
        assert_eq!(log.reader().segment_count(), 1);

        injector.clear();
        for _ in 0..3 {
            id += 1;
            let mut bytes = encode(id, 3);
            let info = log.append(&bytes).expect("the roll is retried");
            set_base_offset(&mut bytes, info.base_offset);
            acked.push((info.base_offset, bytes));
        }
        assert_eq!(log.reader().segment_count(), 2);
        assert_eq!(read_all(&log).expect("read"), acked);
        assert_eq!(log.take_deferred_failures().count(), 0);
        drop(log);
        injector.crash().expect("crash");
        let log = Log::open(injector.root(), config, &files).expect("reopen");
        assert_eq!(read_all(&log).expect("read after a crash"), acked);
    }
}

/// A checkpoint that cannot be written (here: its file cannot be opened) wrote no data:
/// the commit succeeds, the failure is reported as deferred, and the next sync writes
/// the checkpoint. A sealed segment's indexes that cannot be trimmed are retried at the
/// next commit, and a crash before that makes the next open rebuild them.
#[test]
fn failed_checkpoints_and_index_seals_are_retried_without_fail_stop() {
    let dir = crate::common::scratch_dir();
    let injector = Injector::new(dir.path())
        .and_then(Injector::with_crash_model)
        .expect("injector");
    let config = LogConfig {
        checkpoint_interval_bytes: 1,
        ..config(Durability::Fsync)
    };
    let files = FileCache::new(4);
    let mut log = Log::open(injector.root(), config.clone(), &files).expect("open");
    let mut acked = Vec::new();
    let append = |log: &mut Log, acked: &mut Vec<(u64, Vec<u8>)>, id: u64| {
        let mut bytes = encode(id, 3);
        let info = log.append(&bytes).expect("append");
        set_base_offset(&mut bytes, info.base_offset);
        acked.push((info.base_offset, bytes));
    };
    injector.fail_from(Op::Open, 1, Fault::too_many_open_files());
    append(&mut log, &mut acked, 1);
    append(&mut log, &mut acked, 2);
    let failures: Vec<_> = log.take_deferred_failures().collect();
    assert_eq!(failures.len(), 2, "{failures:?}");
    assert!(failures.iter().all(|f| f.step == Deferred::Checkpoint));
    assert!(failures[0].first && !failures[1].first);
    injector.clear();
    let opens = injector.count(Op::Open);
    append(&mut log, &mut acked, 3);
    assert_eq!(
        injector.count(Op::Open),
        opens + 1,
        "the checkpoint is written"
    );
    assert_eq!(log.take_deferred_failures().count(), 0);

    // The roll's third truncation trims the old segment's offset index (the first two
    // size the new segment's indexes); from there on every truncation fails, so the
    // checkpoints (which truncate their file) fail too.
    let mut id = 3;
    acked.extend(fill_segment(&injector, &mut log, &mut id));
    injector.fail_from(Op::SetLen, 3, Fault::eio());
    let segments = log.reader().segment_count();
    id += 1;
    append(&mut log, &mut acked, id);
    assert_eq!(log.reader().segment_count(), segments + 1, "rolled");
    let failures: Vec<_> = log.take_deferred_failures().collect();
    assert_eq!(failures[0].step, Deferred::IndexSeal, "{failures:?}");
    assert!(
        failures
            .iter()
            .all(|f| matches!(f.step, Deferred::IndexSeal | Deferred::Checkpoint)),
        "{failures:?}"
    );
    // A crash before a retry works: the untrimmed index is rebuilt, reads stay right.
    drop(log);
    injector.crash().expect("crash");
    let mut log = Log::open(injector.root(), config.clone(), &files).expect("reopen");
    assert_eq!(read_all(&log).expect("read"), acked);
    // Rebuilt, so trimmed: trusted as it was, its zero tail would have been taken for
    // entries (a max timestamp of 0 for retention, a search over unsorted entries).
    let index = injector.root().join(format!("{:020}.index", 0));
    let size = std::fs::metadata(&index).expect("index").len();
    assert!(size < config.index_bytes_max, "{size} bytes: never trimmed");

    // And without a crash, the next commit trims it.
    acked.extend(fill_segment(&injector, &mut log, &mut id));
    injector.fail_nth(Op::SetLen, 3, Fault::eio());
    let segments = log.reader().segment_count();
    id += 1;
    append(&mut log, &mut acked, id);
    assert_eq!(log.reader().segment_count(), segments + 1, "rolled");
    assert_eq!(log.take_deferred_failures().count(), 1);
    id += 1;
    append(&mut log, &mut acked, id);
    assert_eq!(
        log.take_deferred_failures().count(),
        0,
        "the retry trimmed it"
    );
    assert_eq!(read_all(&log).expect("read"), acked);
}

/// The promises the tests of this module check, as `docs/storage-format.md` (8.4) and
/// `docs/protocol.md` (2.3) state them: a changed sentence must be rechecked here.
const STORAGE_PROMISES: [&str; 7] = [
    "Under `fsync`, every batch whose commit returned is there after a crash, with the same offsets and bytes.",
    "Under `interval` and `none`, a crash loses the batches written since the last fsync; the log then reports an unclean stop, and their offsets go to new records.",
    "Under every policy, after a crash or an I/O error the log holds whole batches with dense offsets: a batch is there byte for byte or not at all.",
    "The log refuses every later write until it is reopened, and what it had published stays readable.",
    "A failed fsync cuts only bytes that were never published: under every policy, a published batch keeps its offsets while the log runs and after a restart.",
    "If cutting the unpublished bytes fails too, the error says so: those batches may come back after a restart.",
    "A roll that cannot create the new segment's files, and a checkpoint or index seal that fails, lose nothing and do not make the log refuse writes: the write that needed the roll gets a retryable error, and the next write tries the roll again.",
];

const PROTOCOL_PROMISES: [&str; 4] = [
    "Under `fsync`, an acknowledged batch survives any crash and any I/O error, with its offsets.",
    "Under `interval` and `none`, an acknowledged batch survives a `kill -9` and an I/O error, but a power loss or OS crash can take the batches acknowledged since the last fsync; the broker then logs that the partition was not shut down cleanly, and their offsets go to new records.",
    "After a failed write or fsync, the partition refuses produce requests until the broker restarts (`RESOURCE_EXHAUSTED` for the commit that found the disk full, `UNAVAILABLE` otherwise), and keeps serving what it had published with the same offsets.",
    "A segment roll that cannot create its files (too many open files, no memory, no space) refuses only the batch that needed it, with `UNAVAILABLE` (`RESOURCE_EXHAUSTED` when the disk is full) naming the cause; the partition is not fail-stopped, and the next produce retries the roll.",
];

#[test]
fn the_documents_state_the_promises_these_tests_check() {
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs");
    for (file, promises) in [
        ("storage-format.md", &STORAGE_PROMISES[..]),
        ("protocol.md", &PROTOCOL_PROMISES[..]),
    ] {
        let text = std::fs::read_to_string(docs.join(file)).expect("read the document");
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        for promise in promises {
            assert!(
                text.contains(promise),
                "docs/{file} no longer states: {promise}"
            );
        }
    }
}

/// A roll by age that cannot open its files does not stop retention: at the descriptor
/// limit or on a full disk, the deletions are what frees the room.
#[test]
fn retention_deletes_although_its_age_roll_fails() {
    let dir = crate::common::scratch_dir();
    let injector = Injector::new(dir.path()).expect("injector");
    let files = FileCache::new(4);
    let mut log = Log::open(injector.root(), config(Durability::Fsync), &files).expect("open");
    let mut id = 0;
    for _ in 0..2 {
        fill_segment(&injector, &mut log, &mut id);
        id += 1;
        log.append(&encode(id, 3)).expect("append past a roll");
    }
    drop(log);
    // Reopened to keep 1 byte, with segments that roll after 1 ms: the active segment is
    // old once a millisecond has passed, so retention tries to roll it first.
    let aged = LogConfig {
        segment_ms: Some(1),
        retention_bytes: Some(1),
        ..config(Durability::Fsync)
    };
    let mut log = Log::open(injector.root(), aged, &files).expect("reopen");
    let segments = log.reader().segment_count();
    assert_eq!(segments, 3);
    std::thread::sleep(Duration::from_millis(2));
    injector.fail_nth(Op::Open, 1, Fault::too_many_open_files());
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after the epoch")
        .as_millis() as i64;
    let deleted = log.apply_retention(now_ms).expect("retention runs");
    assert_eq!(
        deleted,
        segments - 1,
        "every sealed segment is over the 1 byte kept"
    );
    let failures: Vec<_> = log.take_deferred_failures().collect();
    assert!(
        failures.iter().any(|f| f.step == Deferred::Roll),
        "{failures:?}"
    );
}

/// Maintenance must keep coming to a poisoned log, whose owner learns of the failure
/// from the next commit: under `none` nothing else says there is work left (a roll's
/// fsync of the old segment, say for retention, is what failed).
#[test]
fn a_poisoned_log_is_never_idle() {
    let dir = crate::common::scratch_dir();
    let injector = Injector::new(dir.path()).expect("injector");
    let files = FileCache::new(4);
    let mut log = Log::open(injector.root(), config(Durability::None), &files).expect("open");
    log.append(&encode(1, 2)).expect("append");
    assert!(log.idle(), "under none, a commit leaves nothing to do");
    injector.fail_nth(Op::Sync, 1, Fault::eio());
    log.flush().expect_err("the fsync fails");
    assert!(!log.idle(), "a poisoned log is never idle");
}
