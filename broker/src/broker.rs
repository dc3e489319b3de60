//! The broker's registry of topics and their partitions, and the data directory layout:
//!
//! ```text
//! <data>/topics/<name>/topic.toml     settings
//! <data>/topics/<name>/<partition>/   one storage log per partition
//! <data>/tmp/                         topics being created (renamed into topics/)
//! <data>/trash/                       topics being deleted (removed after the rename)
//! <data>/groups/offsets/              the committed-offsets log of consumer groups
//! <data>/producer_ids                 the producer ids reserved so far
//! <data>/lock                         locked while a broker runs; holds its process id
//! ```

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use strata_storage::batch::NO_PRODUCER_ID;
use strata_storage::producer::ProducerIds;
use strata_storage::FileCache;

use crate::error::{Error, Result};
use crate::groups::coordinator::Coordinator;
use crate::groups::offsets::{Offsets, SEGMENT_BYTES};
use crate::health::{Faults, Problem};
use crate::metrics::Metrics;
use crate::topics::partition::Partition;
use crate::topics::settings::{validate_name, TopicSettings};
use crate::topics::writers::{Writers, WRITER_THREADS};

/// A topic and its open partitions.
#[derive(Debug)]
pub struct Topic {
    /// The topic's name.
    pub name: String,
    /// Its settings.
    pub settings: TopicSettings,
    partitions: Vec<Arc<Partition>>,
    next_partition: AtomicU32,
    /// Tells this topic from an earlier one of the same name (random, stored in its
    /// directory's `incarnation` file; 0 for a directory from before incarnations).
    /// Committed offsets carry it, so a recreated topic never inherits old ones.
    pub incarnation: u64,
    /// Set when the topic is deleted, before its groups' offsets are: a commit that
    /// checked the topic before the deletion and is written after it must not bring
    /// them back.
    deleted: AtomicBool,
}

impl Topic {
    /// Partition `id`, or `PartitionNotFound`.
    pub fn partition(&self, id: u32) -> Result<&Arc<Partition>> {
        self.partitions
            .get(id as usize)
            .ok_or_else(|| Error::PartitionNotFound {
                topic: self.name.clone(),
                partition: id,
                partitions: self.partitions.len() as u32,
            })
    }

    /// All partitions, in order.
    pub fn partitions(&self) -> &[Arc<Partition>] {
        &self.partitions
    }

    /// True once the topic has been deleted.
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    /// The partition for records without a key: each in turn.
    pub fn next_partition(&self) -> u32 {
        self.next_partition.fetch_add(1, Ordering::Relaxed) % self.partitions.len() as u32
    }

    /// Closes every partition, all at once; the errors say which did not close cleanly.
    fn shutdown(&self) -> Vec<String> {
        close_all(&self.partitions)
    }
}

/// Closes `partitions` together (their writers close them in parallel); the errors say
/// which did not close cleanly.
fn close_all<'a>(partitions: impl IntoIterator<Item = &'a Arc<Partition>>) -> Vec<String> {
    let closing: Vec<_> = partitions.into_iter().map(|p| p.close()).collect();
    closing.into_iter().filter_map(|c| c.wait().err()).collect()
}

/// All topics of one data directory.
#[derive(Debug)]
pub struct Broker {
    data_dir: PathBuf,
    defaults: TopicSettings,
    files: FileCache,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    /// The threads that serve every partition's writer. After `topics`: fields drop in
    /// order, so partitions dropped without a shutdown queue their close first, and the
    /// pool's drop waits for those closes.
    writers: Writers,
    /// Serializes creation and deletion (directory renames), not reads or produce.
    admin: Mutex<()>,
    /// Most partitions of all topics ([`Broker::set_max_partitions`]; none by default).
    max_partitions: AtomicUsize,
    /// Partitions of all topics now: changed with `topics`, under the admin lock (or
    /// while opening).
    partition_total: AtomicUsize,
    /// Shared with the offsets writer, which checks a member's ownership again when it
    /// applies the member's commit.
    coordinator: Arc<Coordinator>,
    /// Members of groups joined over the Kafka protocol (the Kafka listener's).
    kafka_members: crate::kafka::membership::Coordinator,
    offsets: Offsets,
    /// Hands out idempotent producer ids (blocking: it may fsync).
    producer_ids: Mutex<ProducerIds>,
    /// Every producer id handed out is below this; produce checks it without the lock.
    producer_ids_unissued: AtomicI64,
    metrics: Arc<Metrics>,
    faults: Faults,
    /// Holds an exclusive lock on `<data>/lock` for the broker's lifetime: two brokers
    /// on one data directory would corrupt each other's logs. Last: fields drop in
    /// order, so the lock outlives the writers' closes of the logs.
    _lock: std::fs::File,
}

/// Runs blocking broker work (anything that may touch files) on the blocking pool, for
/// the listeners' async handlers.
pub async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| Error::ShuttingDown)?
}

/// A creation that ran out of file descriptors or memory mappings says which knobs to
/// turn, as a limit the client can act on, instead of an internal I/O error.
fn out_of_descriptors(e: Error, partitions: u32) -> Error {
    use crate::error::{EMFILE, ENFILE, ENOMEM};
    let message = match e.errno() {
        Some(EMFILE | ENFILE) => format!(
            "creating {partitions} partitions ran out of file descriptors ({e}); each \
             partition holds one: raise the broker's descriptor limit (ulimit -n, \
             LimitNOFILE) or lower max_partitions so it fits"
        ),
        Some(ENOMEM) => format!(
            "creating {partitions} partitions ran out of memory mappings or memory ({e}); \
             each partition maps two index files: raise vm.max_map_count (sysctl) or \
             lower max_partitions so it fits"
        ),
        _ => return e,
    };
    Error::LimitExceeded {
        limit: "max_partitions",
        message,
    }
}

/// Threads that open a topic's partitions together (at creation and at start).
const OPENERS: usize = 16;

impl Broker {
    /// Opens the data directory, recovering every topic's partitions, recording into
    /// `metrics`. Blocking.
    pub fn open(
        data_dir: &Path,
        defaults: TopicSettings,
        files: FileCache,
        metrics: Arc<Metrics>,
    ) -> Result<Broker> {
        // Every level created is fsynced into its parent: a topic made durable later
        // must not vanish with a data directory a power loss forgot.
        strata_storage::create_dir_all_durable(data_dir)?;
        let lock_path = data_dir.join("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(Error::io(&lock_path))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let pid = std::fs::read_to_string(&lock_path)
                    .ok()
                    .and_then(|text| text.trim().parse().ok());
                return Err(Error::DataDirLocked {
                    path: data_dir.display().to_string(),
                    pid,
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(Error::io(&lock_path)(e)),
        }
        // The holder's process id, for the message a second broker gives.
        lock.set_len(0)
            .and_then(|()| writeln!(&lock, "{}", std::process::id()))
            .map_err(Error::io(&lock_path))?;
        for sub in ["topics", "tmp", "trash"] {
            strata_storage::create_dir_all_durable(&data_dir.join(sub))?;
        }
        // Leftovers of a create or delete that a crash interrupted.
        for sub in ["tmp", "trash"] {
            let dir = data_dir.join(sub);
            for entry in std::fs::read_dir(&dir).map_err(Error::io(&dir))? {
                let path = entry.map_err(Error::io(&dir))?.path();
                std::fs::remove_dir_all(&path).map_err(Error::io(&path))?;
            }
        }
        let writers = Writers::start(WRITER_THREADS)?;
        let faults = Faults::default();
        let offsets_dir = data_dir.join("groups").join("offsets");
        let offsets = Offsets::open(&offsets_dir, &files, SEGMENT_BYTES, &faults)?;
        let producer_ids = ProducerIds::open(data_dir)?;
        let broker = Broker {
            _lock: lock,
            data_dir: data_dir.to_path_buf(),
            defaults,
            files,
            writers,
            topics: RwLock::new(BTreeMap::new()),
            admin: Mutex::new(()),
            max_partitions: AtomicUsize::new(usize::MAX),
            partition_total: AtomicUsize::new(0),
            coordinator: Arc::default(),
            kafka_members: crate::kafka::membership::Coordinator::default(),
            offsets,
            producer_ids_unissued: AtomicI64::new(producer_ids.next_unissued()),
            producer_ids: Mutex::new(producer_ids),
            metrics,
            faults,
        };
        let topics_dir = data_dir.join("topics");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&topics_dir).map_err(Error::io(&topics_dir))? {
            let entry = entry.map_err(Error::io(&topics_dir))?;
            if let Some(name) = entry.file_name().to_str() {
                names.push(name.to_string());
            }
        }
        for name in names {
            let dir = topics_dir.join(&name);
            let settings = TopicSettings::load(&dir)?;
            let incarnation = load_incarnation(&dir)?;
            let topic = broker.open_topic(&name, &dir, settings, incarnation)?;
            broker.offsets.set_incarnation(&name, Some(incarnation));
            broker.coordinator.set_incarnation(&name, Some(incarnation));
            broker
                .partition_total
                .fetch_add(topic.settings.partitions as usize, Ordering::Relaxed);
            broker.write_topics().insert(name, Arc::new(topic));
        }
        broker
            .offsets
            .forget_stale_topics(|topic| broker.topic(topic).ok().map(|t| t.incarnation))?;
        // Ids in the partitions' state were handed out, even if the id file was lost.
        let max_seen = broker
            .read_topics()
            .values()
            .flat_map(|t| t.partitions.iter().filter_map(|p| p.max_producer_id()))
            .max();
        if let Some(max_seen) = max_seen {
            let mut ids = broker.lock_producer_ids();
            ids.skip_through(max_seen);
            broker
                .producer_ids_unissued
                .store(ids.next_unissued(), Ordering::Release);
        }
        Ok(broker)
    }

    /// Consumer group membership.
    pub fn coordinator(&self) -> &Coordinator {
        &self.coordinator
    }

    /// Membership of groups joined over the Kafka protocol: a group is used by one
    /// protocol at a time, so the gRPC coordinator checks it too.
    pub fn kafka_members(&self) -> &crate::kafka::membership::Coordinator {
        &self.kafka_members
    }

    /// Consumer group membership, for a check that runs after the caller returns.
    pub(crate) fn coordinator_handle(&self) -> Arc<Coordinator> {
        Arc::clone(&self.coordinator)
    }

    /// Committed consumer group offsets.
    pub fn offsets(&self) -> &Offsets {
        &self.offsets
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The metrics recorded as requests and commits happen.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Notifications of new faults (a partition or the offsets log fail-stopping).
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// What keeps the broker from being fully ready now: fail-stopped partitions and a
    /// failed offsets log. Empty when everything works.
    pub fn problems(&self) -> Vec<Problem> {
        let mut problems: Vec<Problem> = self
            .read_topics()
            .values()
            .flat_map(|t| t.partitions.iter())
            .filter_map(|p| {
                Some(Problem::PartitionFailed {
                    partition: p.name().to_string(),
                    reason: p.fault().reason()?,
                })
            })
            .collect();
        if let Some(reason) = self.offsets.fault().reason() {
            problems.push(Problem::OffsetsFailed { reason });
        }
        problems
    }

    /// The partition count of `topic`, `None` if it does not exist.
    pub fn partition_count(&self, topic: &str) -> Option<u32> {
        self.read_topics().get(topic).map(|t| t.settings.partitions)
    }

    fn lock_producer_ids(&self) -> std::sync::MutexGuard<'_, ProducerIds> {
        self.producer_ids.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new idempotent producer id, unique for the life of the data directory.
    /// Blocking: it may write and fsync the id file.
    pub fn allocate_producer_id(&self) -> Result<i64> {
        let mut ids = self.lock_producer_ids();
        let id = ids.allocate()?;
        self.producer_ids_unissued
            .store(ids.next_unissued(), Ordering::Release);
        Ok(id)
    }

    /// Refuses producer ids this broker never handed out: a made-up id could collide
    /// with one handed out later and mix two producers' sequences.
    pub fn check_producer_id(&self, producer_id: i64) -> Result<()> {
        if producer_id == NO_PRODUCER_ID
            || (0..self.producer_ids_unissued.load(Ordering::Acquire)).contains(&producer_id)
        {
            return Ok(());
        }
        Err(Error::InvalidArgument(format!(
            "producer id {producer_id} was not handed out by this broker: get one with \
             InitProducer, or send producer id -1 for a batch that is not idempotent"
        )))
    }

    /// Defaults for settings a create request leaves out.
    pub fn defaults(&self) -> &TopicSettings {
        &self.defaults
    }

    fn open_topic(
        &self,
        name: &str,
        dir: &Path,
        settings: TopicSettings,
        incarnation: u64,
    ) -> Result<Topic> {
        let config = settings.log_config()?;
        let count = settings.partitions;
        let open = |p: u32| {
            Partition::open(
                format!("{name}/{p}"),
                dir.join(p.to_string()),
                config.clone(),
                &self.files,
                &self.metrics,
                &self.faults,
                &self.writers,
            )
            .map(Arc::new)
        };
        // Opening a partition is mostly waiting for fsyncs of its new files and
        // directories: a few threads waiting together make thousands of partitions take
        // seconds instead of minutes. Each takes the next partition until all are open
        // or one failed.
        let next = AtomicU32::new(0);
        let failed = AtomicBool::new(false);
        let work = || {
            let mut done = Vec::new();
            while !failed.load(Ordering::Relaxed) {
                let p = next.fetch_add(1, Ordering::Relaxed);
                if p >= count {
                    break;
                }
                let opened = open(p);
                failed.fetch_or(opened.is_err(), Ordering::Relaxed);
                done.push((p, opened));
            }
            done
        };
        let mut results: Vec<(u32, Result<Arc<Partition>>)> = std::thread::scope(|scope| {
            let work = &work;
            // A helper the OS cannot start (thread limits) is simply not there: the
            // calling thread opens partitions too.
            let helpers: Vec<_> = (1..OPENERS.min(count as usize))
                .filter_map(|_| {
                    std::thread::Builder::new()
                        .name("partition-open".into())
                        .spawn_scoped(scope, work)
                        .ok()
                })
                .collect();
            let mut all = work();
            for helper in helpers {
                all.extend(
                    helper
                        .join()
                        .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                );
            }
            all
        });
        results.sort_unstable_by_key(|(p, _)| *p);
        if let Some(at) = results.iter().position(|(_, opened)| opened.is_err()) {
            // Close what did open before its directory goes, so no writer thread is
            // still writing there.
            let (_, error) = results.swap_remove(at);
            let opened: Vec<_> = results
                .into_iter()
                .filter_map(|(_, opened)| opened.ok())
                .collect();
            for why in close_all(&opened) {
                tracing::warn!(topic = %name, error = %why, "closing a partition of a topic that failed to open");
            }
            return Err(error.expect_err("the failed one"));
        }
        let partitions: Vec<Arc<Partition>> = results
            .into_iter()
            .filter_map(|(_, opened)| opened.ok())
            .collect();
        Ok(Topic {
            name: name.to_string(),
            settings,
            partitions,
            next_partition: AtomicU32::new(0),
            incarnation,
            deleted: AtomicBool::new(false),
        })
    }

    fn read_topics(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Topic>>> {
        self.topics.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_topics(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Topic>>> {
        self.topics.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The topic called `name`.
    pub fn topic(&self, name: &str) -> Result<Arc<Topic>> {
        self.read_topics()
            .get(name)
            .cloned()
            .ok_or_else(|| Error::TopicNotFound(name.to_string()))
    }

    /// Partition `partition` of topic `topic`.
    pub fn partition(&self, topic: &str, partition: u32) -> Result<Arc<Partition>> {
        self.topic(topic)?.partition(partition).cloned()
    }

    /// How many partitions all topics have.
    pub fn partition_total(&self) -> usize {
        self.partition_total.load(Ordering::Relaxed)
    }

    /// How many topics there are.
    pub fn topic_count(&self) -> usize {
        self.read_topics().len()
    }

    /// Every topic, sorted by name.
    pub fn topics(&self) -> Vec<Arc<Topic>> {
        self.read_topics().values().cloned().collect()
    }

    /// Limits creation to `max_partitions` partitions of all topics (`max_partitions`):
    /// a topic that would pass it is refused with [`Error::LimitExceeded`]; topics
    /// already there are not affected.
    pub fn set_max_partitions(&self, max_partitions: usize) {
        self.max_partitions.store(max_partitions, Ordering::Relaxed);
    }

    /// Creates a topic: builds its directory under `tmp/`, then renames it into place.
    /// Blocking.
    pub fn create_topic(&self, name: &str, settings: TopicSettings) -> Result<Arc<Topic>> {
        validate_name(name)?;
        let _admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        if self.read_topics().contains_key(name) {
            return Err(Error::TopicExists(name.to_string()));
        }
        // Under the admin lock, so concurrent creations cannot pass it together.
        let existing = self.partition_total();
        let max = self.max_partitions.load(Ordering::Relaxed);
        if existing.saturating_add(settings.partitions as usize) > max {
            return Err(Error::LimitExceeded {
                limit: "max_partitions",
                message: format!(
                    "topic {name:?} of {} partitions would take the broker past {max} \
                     partitions (it has {existing})",
                    settings.partitions
                ),
            });
        }
        let staging = self.data_dir.join("tmp").join(name);
        std::fs::create_dir_all(&staging).map_err(Error::io(&staging))?;
        settings.store(&staging)?;
        let incarnation = new_incarnation();
        store_incarnation(&staging, incarnation)?;
        let dir = self.data_dir.join("topics").join(name);
        std::fs::rename(&staging, &dir).map_err(Error::io(&dir))?;
        sync_dir(&self.data_dir.join("topics"))?;
        let partitions = settings.partitions;
        let topic = match self.open_topic(name, &dir, settings, incarnation) {
            Ok(topic) => Arc::new(topic),
            Err(e) => {
                // Do not leave a directory that would come back as a topic at restart.
                let trash = self.data_dir.join("trash").join(name);
                if std::fs::rename(&dir, &trash).is_ok() {
                    let _ = std::fs::remove_dir_all(&trash);
                }
                return Err(out_of_descriptors(e, partitions));
            }
        };
        // Offsets left by an earlier topic of this name (its deletion failed halfway)
        // are invisible from here on, and forgotten at the next start; partitions a
        // member still owns as the earlier topic's are fenced and revoked.
        self.offsets.set_incarnation(name, Some(incarnation));
        self.coordinator.set_incarnation(name, Some(incarnation));
        self.partition_total
            .fetch_add(topic.settings.partitions as usize, Ordering::Relaxed);
        self.write_topics()
            .insert(name.to_string(), Arc::clone(&topic));
        Ok(topic)
    }

    /// Deletes a topic and its data. Blocking.
    pub fn delete_topic(&self, name: &str) -> Result<()> {
        let _admin = self.admin.lock().unwrap_or_else(|e| e.into_inner());
        let topic = self
            .write_topics()
            .remove(name)
            .ok_or_else(|| Error::TopicNotFound(name.to_string()))?;
        self.partition_total
            .fetch_sub(topic.settings.partitions as usize, Ordering::Relaxed);
        topic.deleted.store(true, Ordering::Release);
        // Group state goes with the topic before anything here can fail: offsets of its
        // incarnation are invisible, and members owning its partitions are removed, so
        // a topic created again under this name inherits neither, even if the rest of
        // the deletion fails.
        self.offsets.set_incarnation(name, None);
        self.coordinator
            .topic_deleted(name, &|t| self.partition_count(t));
        // Its data goes next: a partition that did not close cleanly loses nothing more.
        for error in topic.shutdown() {
            tracing::warn!(topic = %name, %error, "deleting a topic whose partition did not close cleanly");
        }
        // Its partitions' faults, if any, are gone with it.
        self.faults.removed();
        let dir = self.data_dir.join("topics").join(name);
        let trash = self.data_dir.join("trash").join(name);
        std::fs::rename(&dir, &trash).map_err(Error::io(&dir))?;
        sync_dir(&self.data_dir.join("topics"))?;
        std::fs::remove_dir_all(&trash).map_err(Error::io(&trash))
    }

    /// Asks every partition to commit idle data and, when `retention` is set, to apply
    /// retention, and a failed offsets log to try to recover. Cheap; never blocks.
    pub fn maintain(&self, retention: bool) {
        for topic in self.read_topics().values() {
            for partition in &topic.partitions {
                partition.maintain(retention);
            }
        }
        self.offsets.maintain();
    }

    /// Removes group members whose session or rebalance timeout passed, and forgets
    /// groups left with neither members nor committed offsets.
    pub fn expire_members(&self) {
        self.coordinator.expire(
            &|topic| self.partition_count(topic),
            std::time::Instant::now(),
        );
        self.coordinator
            .forget_empty(&|group| self.offsets.has_group(group));
    }

    /// Answers everything queued, then closes every log cleanly. Blocking. The errors
    /// name every log that did not close cleanly (the next start runs recovery on it).
    pub fn shutdown(&self) -> Vec<String> {
        let topics = std::mem::take(&mut *self.write_topics());
        let mut errors = close_all(topics.values().flat_map(|t| &t.partitions));
        errors.extend(self.offsets.shutdown().err());
        errors
    }
}

/// The file in a topic's directory that holds its incarnation, in decimal.
const INCARNATION_FILE: &str = "incarnation";

/// A random incarnation, never 0 (the incarnation of topics from before them).
fn new_incarnation() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    hasher.finish().max(1)
}

/// Writes a new topic's incarnation file and fsyncs it (its directory is fsynced when it
/// is renamed into place).
fn store_incarnation(dir: &Path, incarnation: u64) -> Result<()> {
    let path = dir.join(INCARNATION_FILE);
    let mut file = std::fs::File::create(&path).map_err(Error::io(&path))?;
    writeln!(file, "{incarnation}")
        .and_then(|()| file.sync_all())
        .map_err(Error::io(&path))?;
    sync_dir(dir)
}

/// A topic's incarnation; 0 for a directory from before incarnations (without the file).
fn load_incarnation(dir: &Path) -> Result<u64> {
    let path = dir.join(INCARNATION_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text.trim().parse().map_err(|_| {
            Error::Storage(strata_storage::Error::InvalidConfig(format!(
                "{} holds {:?}, not a topic incarnation (a decimal number); restore it \
                 from a backup or delete the file to treat the topic as one from before \
                 incarnations",
                path.display(),
                text.trim()
            )))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(Error::io(&path)(e)),
    }
}

fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A broker over `dir` with the default settings.
    fn open_in(dir: &Path) -> Result<Broker> {
        Broker::open(
            dir,
            TopicSettings::default(),
            FileCache::new(64),
            Arc::new(Metrics::default()),
        )
    }

    /// Partitions are opened by several threads together, at creation and at start;
    /// each must still land at its own index.
    #[test]
    fn partitions_opened_together_keep_their_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let open = || open_in(dir.path()).expect("open");
        let partitions = OPENERS as u32 * 2 + 3;
        let names = |broker: &Broker| {
            let topic = broker.topic("t").expect("topic");
            (0..partitions)
                .map(|p| topic.partition(p).expect("partition").name().to_string())
                .collect::<Vec<_>>()
        };
        let expected: Vec<String> = (0..partitions).map(|p| format!("t/{p}")).collect();
        let broker = open();
        let settings = TopicSettings {
            partitions,
            ..TopicSettings::default()
        };
        broker.create_topic("t", settings).expect("create");
        assert_eq!(names(&broker), expected);
        drop(broker);
        assert_eq!(names(&open()), expected);
    }

    /// A broker dropped without a shutdown keeps the data directory locked until the
    /// writers have closed every log, the committed offsets' too: a broker opened next
    /// never meets a close still writing, and finds every log clean.
    #[test]
    fn a_dropped_broker_holds_its_lock_until_every_log_is_closed() {
        use strata_storage::fault::{Injector, Op};
        let dir = tempfile::tempdir().expect("tempdir");
        let open = || open_in(dir.path());
        let broker = open().expect("open");
        let partitions = 8;
        let settings = TopicSettings {
            partitions,
            ..TopicSettings::default()
        };
        broker.create_topic("t", settings).expect("create");
        let injector = Injector::new(&dir.path().join("topics")).expect("injector");
        let offsets = Injector::new(&dir.path().join("groups")).expect("injector");
        // The next sync of a partition's log is one of the closes the drop queues, and
        // the next of the committed-offsets log is its close: hold each in turn.
        let held = [
            injector.pause_nth(Op::Sync, 1),
            offsets.pause_nth(Op::Sync, 1),
        ];
        let dropping = std::thread::spawn(move || drop(broker));
        for held in held {
            held.wait_reached();
            let refused = open().expect_err("the dropped broker still closes a log");
            assert!(
                matches!(refused, Error::DataDirLocked { .. }),
                "{refused:?}"
            );
            held.release();
        }
        dropping.join().expect("dropped");
        drop((injector, offsets));
        for p in 0..partitions {
            let dir = dir.path().join("topics").join("t").join(p.to_string());
            let log = strata_storage::Log::open(&dir, Default::default(), &FileCache::new(4))
                .expect("open the log");
            assert!(log.recovery().clean, "partition {p} was not closed cleanly");
        }
        open().expect("open again");
    }

    /// A partition that cannot be opened fails the creation cleanly: the partitions that
    /// did open are closed, nothing of the topic stays, and the name can be created again.
    #[test]
    fn a_partition_that_fails_to_open_leaves_no_topic_behind() {
        use strata_storage::fault::{Fault, Injector, Op};
        let dir = tempfile::tempdir().expect("tempdir");
        let broker = open_in(dir.path()).expect("open");
        let topics = dir.path().join("topics");
        let injector = Injector::new(&topics).expect("injector");
        let settings = || TopicSettings {
            partitions: OPENERS as u32 * 2,
            ..TopicSettings::default()
        };
        // Some partition's directory (the tenth created) cannot be made.
        injector.fail_nth(Op::CreateDir, 10, Fault::eio());
        broker
            .create_topic("t", settings())
            .expect_err("a partition cannot be opened");
        assert!(broker.topic("t").is_err());
        // Out of descriptors, the error names the knobs.
        injector.fail_nth(Op::Open, 10, Fault::too_many_open_files());
        let e = broker
            .create_topic("t", settings())
            .expect_err("a partition cannot be opened");
        assert!(
            matches!(&e, Error::LimitExceeded { limit: "max_partitions", message } if message.contains("ulimit -n")),
            "{e:?}"
        );
        assert!(broker.topic("t").is_err());
        assert!(!topics.join("t").exists(), "the topic's directory is gone");
        injector.clear();
        broker.create_topic("t", settings()).expect("created again");
        assert_eq!(
            broker.topic("t").expect("topic").partitions.len(),
            OPENERS * 2
        );
    }
}
