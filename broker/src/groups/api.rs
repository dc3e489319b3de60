//! The operations every listener offers on consumer groups, over the coordinator
//! (membership) and the committed offsets: list, describe with lag, commit from a member
//! or from outside, fetch, reset, delete, and the ownership check of a member's fetch.
//!
//! Lag is measured the same way everywhere (DescribeGroup, the CLI, metrics): a
//! partition's lag is its log end minus the group's committed offset, and a partition
//! the group never committed counts from the log start, where a new member begins. So a
//! new group in front of a backlog shows that backlog, not zero.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::broker::{Broker, Topic};
use crate::error::{Error, Result};
use crate::groups::assign::TopicPartition;
use crate::groups::coordinator::{validate_group, GroupState, GroupView, MemberView};
use crate::groups::offsets::{Committed, Fence, Mode};

/// A group as a list shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupSummary {
    /// Its name.
    pub name: String,
    /// Its state.
    pub state: GroupState,
    /// How many members it has.
    pub members: u32,
    /// Its epoch (0 without members).
    pub epoch: u64,
}

impl GroupSummary {
    fn new(name: &str, view: Option<&GroupView>) -> GroupSummary {
        GroupSummary {
            name: name.to_string(),
            state: view.map_or(GroupState::Empty, |v| v.state),
            members: view.map_or(0, |v| v.members.len() as u32),
            epoch: view.map_or(0, |v| v.epoch),
        }
    }
}

/// One partition of a group's description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    /// The partition.
    pub partition: TopicPartition,
    /// The group's position; `None` when it never committed one.
    pub committed: Option<Committed>,
    /// The partition's log start and end; `None` once its topic is gone.
    pub log: Option<LogRange>,
    /// Records between the group's position (the log start without one) and the end;
    /// `None` once the topic is gone.
    pub lag: Option<u64>,
    /// The member that owns the partition, if any.
    pub member_id: Option<String>,
}

/// The offsets a partition holds: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogRange {
    /// The first offset still in the log.
    pub start: u64,
    /// The high watermark.
    pub end: u64,
}

/// A group's members and, per partition, its position and lag.
#[derive(Debug, Clone)]
pub struct GroupDescription {
    /// The group.
    pub summary: GroupSummary,
    /// Its members.
    pub members: Vec<MemberView>,
    /// Every partition of the subscribed topics and every committed one, sorted.
    pub partitions: Vec<PartitionLag>,
    /// The sum of the partitions' lags.
    pub total_lag: u64,
}

/// Where a reset moves a group's positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetTo {
    /// The first offset still in each log.
    Earliest,
    /// Each log's end: only new records are consumed.
    Latest,
    /// The first record at or after this time (ms since the Unix epoch); the log end
    /// where none is that new.
    Timestamp(i64),
    /// This offset, which every partition must hold.
    Offset(u64),
}

/// Who commits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committer<'a> {
    /// A member, which must own every partition at this epoch.
    Member {
        /// Its id.
        id: &'a str,
        /// Its epoch.
        epoch: u64,
    },
    /// A tool outside the group: refused while the group has members.
    Outside,
    /// A member of a Kafka group whose generation the caller checked when the commit
    /// arrived (as Kafka's coordinator does). It does not hold the group, so members
    /// commit concurrently; a commit that lands late cannot move a position back
    /// ([`Mode::Advance`]).
    KafkaMember,
}

fn log_range(broker: &Broker, tp: &TopicPartition) -> Result<LogRange> {
    let partition = broker.partition(&tp.topic, tp.partition)?;
    let reader = partition.reader();
    Ok(LogRange {
        start: reader.earliest_offset(),
        end: reader.high_watermark(),
    })
}

/// The lag of a partition at `log` for a group at `committed`.
pub fn lag(log: LogRange, committed: Option<&Committed>) -> u64 {
    let position = committed.map_or(log.start, |c| c.offset.max(log.start));
    log.end.saturating_sub(position)
}

/// Every group with members or committed offsets, sorted by name.
pub fn list_groups(broker: &Broker) -> Vec<GroupSummary> {
    let active: BTreeMap<String, GroupView> = broker
        .coordinator()
        .list()
        .into_iter()
        .map(|v| (v.name.clone(), v))
        .collect();
    let mut names: BTreeSet<String> = broker.offsets().groups().into_iter().collect();
    names.extend(
        active
            .values()
            .filter(|v| !v.members.is_empty())
            .map(|v| v.name.clone()),
    );
    // Groups joined over the Kafka protocol.
    let kafka: BTreeMap<String, GroupView> = broker
        .kafka_members()
        .active()
        .into_iter()
        .filter_map(|(name, _)| Some((name.clone(), broker.kafka_members().group_view(&name)?)))
        .collect();
    names.extend(kafka.keys().cloned());
    names
        .iter()
        .map(|name| {
            let view = active
                .get(name)
                .filter(|v| !v.members.is_empty())
                .or_else(|| kafka.get(name))
                .or_else(|| active.get(name));
            GroupSummary::new(name, view)
        })
        .collect()
}

/// A group's members, and per partition its committed offset, log range and lag.
pub fn describe_group(broker: &Broker, group: &str) -> Result<GroupDescription> {
    validate_group(group)?;
    // A group is used by one protocol at a time: its gRPC members, else its Kafka ones.
    let view = match broker.coordinator().describe(group) {
        Some(view) if !view.members.is_empty() => Some(view),
        view => broker.kafka_members().group_view(group).or(view),
    };
    let committed = broker.offsets().group(group);
    // A group exists while it has members or committed offsets; the coordinator may
    // still hold one that just lost both.
    let has_members = view.as_ref().is_some_and(|v| !v.members.is_empty());
    if !has_members && committed.is_empty() {
        return Err(Error::GroupNotFound(group.to_string()));
    }
    let mut owners: BTreeMap<TopicPartition, String> = BTreeMap::new();
    let mut partitions: BTreeSet<TopicPartition> = committed.keys().cloned().collect();
    for member in view.iter().flat_map(|v| &v.members) {
        for tp in member.assignment.iter().chain(&member.revoking) {
            owners.insert(tp.clone(), member.member_id.clone());
        }
        for topic in &member.topics {
            let count = broker.partition_count(topic).unwrap_or(0);
            partitions.extend((0..count).map(|p| TopicPartition::new(topic.clone(), p)));
        }
    }
    let partitions: Vec<PartitionLag> = partitions
        .into_iter()
        .map(|tp| {
            // A topic deleted since has no log to measure lag against.
            let log = log_range(broker, &tp).ok();
            let commit = committed.get(&tp).cloned();
            PartitionLag {
                lag: log.map(|log| lag(log, commit.as_ref())),
                log,
                committed: commit,
                member_id: owners.get(&tp).cloned(),
                partition: tp,
            }
        })
        .collect();
    Ok(GroupDescription {
        summary: GroupSummary::new(group, view.as_ref()),
        members: view.map(|v| v.members).unwrap_or_default(),
        total_lag: partitions.iter().filter_map(|p| p.lag).sum(),
        partitions,
    })
}

/// Commits `offsets` (partition, offset, metadata) for `group`, all or nothing; returns
/// the resulting position of each partition (a member's commit never moves one back).
pub async fn commit_offsets(
    broker: &Broker,
    group: &str,
    committer: Committer<'_>,
    offsets: Vec<(TopicPartition, u64, String)>,
) -> Result<Vec<(TopicPartition, Committed)>> {
    validate_group(group)?;
    let mut topics: Vec<Arc<Topic>> = Vec::new();
    let mut seen = BTreeSet::new();
    for (tp, offset, _) in &offsets {
        if !topics.iter().any(|t| t.name == tp.topic) {
            topics.push(broker.topic(&tp.topic)?);
        }
        let end = log_range(broker, tp)?.end;
        if *offset > end {
            return Err(Error::OutOfRange(format!(
                "cannot commit offset {offset} for {tp}: its log ends at {end}"
            )));
        }
        if !seen.insert(tp.clone()) {
            return Err(Error::InvalidArgument(format!(
                "{tp} appears twice in one commit"
            )));
        }
    }
    // A commit from outside the group keeps members from joining until it is written, so
    // none starts from the position it replaces.
    let (exclusive, fence) = match committer {
        Committer::Outside => (
            Some(broker.coordinator().exclusive(group, "commit to")?),
            None,
        ),
        Committer::KafkaMember => (None, None),
        Committer::Member { id, epoch } => {
            broker
                .coordinator()
                .check_owner(group, id, epoch, offsets.iter().map(|o| &o.0))?;
            // Checked again when the write is applied: a commit that waited (behind a
            // slow write, or longer than its caller's timeout) while the partitions
            // moved must not land below the new owner's position. From that check on,
            // until the commit is visible, its partitions go to no new owner.
            let coordinator = broker.coordinator_handle();
            let (group, id) = (group.to_string(), id.to_string());
            let partitions: Vec<TopicPartition> = offsets.iter().map(|o| o.0.clone()).collect();
            let fence: Fence =
                Box::new(move || coordinator.begin_commit(&group, &id, epoch, &partitions));
            (None, Some(fence))
        }
    };
    broker
        .offsets()
        .commit(group, offsets, topics, Mode::Advance, exclusive, fence)
        .await
}

/// The committed offsets of `group`, limited to `wanted` unless it is empty.
pub fn fetch_offsets(
    broker: &Broker,
    group: &str,
    wanted: &BTreeSet<TopicPartition>,
) -> Result<Vec<(TopicPartition, Committed)>> {
    validate_group(group)?;
    Ok(broker
        .offsets()
        .group(group)
        .into_iter()
        .filter(|(tp, _)| wanted.is_empty() || wanted.contains(tp))
        .collect())
}

/// Moves a group's committed offsets of `partitions` of `topic` (every partition when
/// empty). Refused while the group has members.
pub async fn reset_offsets(
    broker: &Broker,
    group: &str,
    topic: &str,
    partitions: &[u32],
    to: ResetTo,
) -> Result<Vec<(TopicPartition, Committed)>> {
    validate_group(group)?;
    let topic = broker.topic(topic)?;
    // Held before the Kafka members are looked at: a Kafka join checks the hold under
    // its own lock, so either it sees the hold or this sees its member.
    let exclusive = broker
        .coordinator()
        .exclusive(group, "reset the offsets of")?;
    refuse_kafka_members(broker, group, "reset the offsets of")?;
    let ids: Vec<u32> = if partitions.is_empty() {
        (0..topic.settings.partitions).collect()
    } else {
        partitions.to_vec()
    };
    let mut offsets = Vec::with_capacity(ids.len());
    for id in ids {
        let reader = topic.partition(id)?.reader().clone();
        let (earliest, latest) = (reader.earliest_offset(), reader.high_watermark());
        let offset = match to {
            ResetTo::Earliest => earliest,
            ResetTo::Latest => latest,
            ResetTo::Timestamp(at) => tokio::task::spawn_blocking(move || {
                reader.offset_for_timestamp(at).map(|l| l.offset())
            })
            .await
            .map_err(|_| Error::ShuttingDown)??,
            ResetTo::Offset(offset) if (earliest..=latest).contains(&offset) => offset,
            ResetTo::Offset(offset) => {
                return Err(Error::OutOfRange(format!(
                    "offset {offset} is outside {}/{id}, which holds {earliest} to {latest}",
                    topic.name
                )))
            }
        };
        offsets.push((
            TopicPartition::new(topic.name.clone(), id),
            offset,
            String::new(),
        ));
    }
    let committed = broker
        .offsets()
        .commit(
            group,
            offsets,
            vec![topic.clone()],
            Mode::Reset,
            Some(exclusive),
            None,
        )
        .await?;
    tracing::info!(%group, topic = %topic.name, "reset committed offsets");
    Ok(committed)
}

/// Refuses a change to a group with members that joined over the Kafka protocol, as
/// [`Coordinator::exclusive`](crate::groups::coordinator::Coordinator::exclusive)
/// refuses one to a group with gRPC members: those members would commit over it.
fn refuse_kafka_members(broker: &Broker, group: &str, what: &str) -> Result<()> {
    if broker.kafka_members().has_members(group) {
        return Err(Error::Fenced(format!(
            "cannot {what} group {group:?}: it has active members (Kafka clients); stop \
             them first"
        )));
    }
    Ok(())
}

/// Forgets a group without members.
pub async fn delete_group(broker: &Broker, group: &str) -> Result<()> {
    validate_group(group)?;
    // Held first, as for a reset.
    let exclusive = broker.coordinator().exclusive(group, "delete")?;
    refuse_kafka_members(broker, group, "delete")?;
    if broker.offsets().group(group).is_empty() {
        return Err(Error::GroupNotFound(group.to_string()));
    }
    broker
        .offsets()
        .delete_group(group, Some(exclusive))
        .await?;
    tracing::info!(%group, "deleted group");
    Ok(())
}

/// When groups were last seen with members, for [`expire_offsets`]: ms since the Unix
/// epoch, with a floor of when the broker started (it knows nothing from before).
#[derive(Debug)]
pub struct GroupActivity {
    started_ms: i64,
    last_active_ms: BTreeMap<String, i64>,
}

impl GroupActivity {
    /// No group seen yet; the broker started at `now_ms`.
    pub fn new(now_ms: i64) -> GroupActivity {
        GroupActivity {
            started_ms: now_ms,
            last_active_ms: BTreeMap::new(),
        }
    }
}

/// Deletes the committed offsets of every group that has had no members, nor a commit,
/// for `retention` (Kafka's `offsets.retention.minutes`); returns the groups deleted.
/// `activity` remembers when groups had members; call this periodically with the same.
pub async fn expire_offsets(
    broker: &Broker,
    retention: std::time::Duration,
    activity: &mut GroupActivity,
    now_ms: i64,
) -> Vec<String> {
    for view in broker.coordinator().list() {
        if !view.members.is_empty() {
            activity.last_active_ms.insert(view.name, now_ms);
        }
    }
    // Groups joined over the Kafka protocol have their members there, not in the
    // coordinator: their offsets are kept as long as they have members too.
    for (group, _state) in broker.kafka_members().active() {
        activity.last_active_ms.insert(group, now_ms);
    }
    let retention_ms = i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let expired = |group: &str| {
        let newest_commit = broker
            .offsets()
            .group(group)
            .values()
            .map(|c| c.timestamp_ms)
            .max()
            .unwrap_or(i64::MIN);
        let active = activity
            .last_active_ms
            .get(group)
            .copied()
            .unwrap_or(activity.started_ms);
        now_ms.saturating_sub(newest_commit.max(active)) > retention_ms
    };
    let mut deleted = Vec::new();
    for group in broker.offsets().groups() {
        if !expired(&group) {
            continue;
        }
        // Members and commits from outside wait while it holds the group; a group that
        // has members again, or is being changed, is left for the next round.
        let Ok(exclusive) = broker.coordinator().exclusive(&group, "expire") else {
            continue;
        };
        // A Kafka member may have joined since the round began (Kafka joins do not
        // take the coordinator's hold).
        if !expired(&group) || broker.kafka_members().has_members(&group) {
            continue;
        }
        match broker.offsets().delete_group(&group, Some(exclusive)).await {
            Ok(()) => {
                tracing::info!(%group, ?retention, "expired the committed offsets of an empty group");
                deleted.push(group);
            }
            Err(e) => {
                tracing::warn!(%group, error = %e, "cannot expire the offsets of a group");
            }
        }
    }
    activity
        .last_active_ms
        .retain(|group, _| broker.offsets().has_group(group));
    deleted
}

/// Checks a fetch by a group member: it must own the partition at its epoch.
pub fn check_fetch(
    broker: &Broker,
    group: &str,
    member_id: &str,
    member_epoch: u64,
    tp: &TopicPartition,
) -> Result<()> {
    broker
        .coordinator()
        .check_owner(group, member_id, member_epoch, [tp])
}

/// When the records at a group's position were written: the timestamp of the batch
/// holding `position` (its first record's, as the producer set it), for the group's
/// lag in time. `None` at or past the high watermark, where nothing waits. Blocking:
/// it reads a batch header.
pub fn batch_time(broker: &Broker, tp: &TopicPartition, position: u64) -> Result<Option<i64>> {
    let partition = broker.partition(&tp.topic, tp.partition)?;
    let reader = partition.reader();
    if position >= reader.high_watermark() {
        return Ok(None);
    }
    Ok(reader.batch_timestamp(position.max(reader.earliest_offset()))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::groups::coordinator::{Heartbeat, HeartbeatReply};
    use std::time::{Duration, Instant};

    fn committed(offset: u64) -> Committed {
        Committed {
            offset,
            metadata: String::new(),
            timestamp_ms: 0,
        }
    }

    fn open_broker(dir: &std::path::Path) -> Broker {
        Broker::open(
            dir,
            crate::topics::settings::TopicSettings::default(),
            strata_storage::FileCache::new(64),
            Arc::new(crate::metrics::Metrics::default()),
        )
        .expect("open")
    }

    /// Settings of a topic with one partition.
    fn one_partition() -> crate::topics::settings::TopicSettings {
        crate::topics::settings::TopicSettings {
            partitions: 1,
            ..Default::default()
        }
    }

    /// A new member of `group` subscribed to `topic`, joined now with long timeouts.
    fn join(broker: &Broker, group: &str, topic: &str) -> HeartbeatReply {
        let request = Heartbeat {
            topics: vec![topic.to_string()],
            session_timeout: Duration::from_secs(30),
            rebalance_timeout: Duration::from_secs(30),
            client_id: "c".into(),
            ..Heartbeat::default()
        };
        let counts = |t: &str| broker.partition_count(t);
        broker
            .coordinator()
            .heartbeat(group, request, &counts, Instant::now())
            .expect("join")
    }

    /// A heartbeat of the member `last` answered, holding nothing.
    fn beat(broker: &Broker, group: &str, last: &HeartbeatReply) -> HeartbeatReply {
        let request = Heartbeat {
            member_id: last.member_id.clone(),
            member_epoch: last.member_epoch,
            ..Heartbeat::default()
        };
        let counts = |t: &str| broker.partition_count(t);
        broker
            .coordinator()
            .heartbeat(group, request, &counts, Instant::now())
            .expect("heartbeat")
    }

    /// Kafka members of one group commit concurrently: a member's commit does not take
    /// the group's outside hold, which one commit in flight would otherwise keep from
    /// the others (GroupBusy, COORDINATOR_LOAD_IN_PROGRESS to a Kafka client).
    #[tokio::test]
    async fn a_kafka_members_commit_does_not_wait_for_the_groups_hold() {
        let dir = tempfile::tempdir().expect("tempdir");
        let broker = open_broker(dir.path());
        broker
            .create_topic("t", crate::topics::settings::TopicSettings::default())
            .expect("create");
        let offsets = || vec![(TopicPartition::new("t".to_string(), 0), 0, String::new())];
        let _held = broker
            .coordinator()
            .exclusive("g", "commit to")
            .expect("hold");
        assert!(matches!(
            commit_offsets(&broker, "g", Committer::Outside, offsets()).await,
            Err(Error::GroupBusy(_))
        ));
        commit_offsets(&broker, "g", Committer::KafkaMember, offsets())
            .await
            .expect("a member's commit goes through");
    }

    /// A member's commit that waits behind the offsets writer while its partition moves
    /// to another member must be refused when it is applied, not land afterwards below
    /// the new owner's position.
    #[test]
    fn a_commit_applied_after_its_partition_moved_is_fenced() {
        use std::future::Future;

        let dir = tempfile::tempdir().expect("tempdir");
        let broker = open_broker(dir.path());
        let settings = crate::topics::settings::TopicSettings {
            partitions: 1,
            ..Default::default()
        };
        broker.create_topic("t", settings).expect("create");
        let counts = |t: &str| broker.partition_count(t);
        let first = join(&broker, "g", "t");
        let tp = TopicPartition::new("t".to_string(), 0);
        assert_eq!(first.assignment, vec![tp.clone()]);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let stalled = broker.offsets().stall();
        // The writer takes this commit and waits for the stall to end.
        let mut before = Box::pin(commit_offsets(
            &broker,
            "other",
            Committer::Outside,
            vec![(tp.clone(), 0, String::new())],
        ));
        assert!(before.as_mut().poll(&mut cx).is_pending());
        // The member's commit is checked on arrival, while it owns the partition.
        let mut late = Box::pin(commit_offsets(
            &broker,
            "g",
            Committer::Member {
                id: &first.member_id,
                epoch: first.member_epoch,
            },
            vec![(tp.clone(), 0, String::new())],
        ));
        assert!(late.as_mut().poll(&mut cx).is_pending());
        // The partition moves: the member leaves.
        broker.coordinator().leave("g", &first.member_id, &counts);
        drop(stalled);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(before).expect("outside commit");
        match rt.block_on(late) {
            Err(Error::Fenced(why)) => assert!(why.contains("not in the group"), "{why}"),
            other => panic!("a commit applied after the move landed: {other:?}"),
        }
        assert!(broker.offsets().group("g").is_empty());
    }

    /// Appends `records` records to `topic`/0 and waits until they are durable.
    fn produce(broker: &Broker, topic: &str, records: usize) {
        let mut batch = strata_storage::batch::BatchBuilder::new();
        for _ in 0..records {
            batch.push(0, None, Some(b"r"), &[]);
        }
        let partition = broker.partition(topic, 0).expect("partition");
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        rt.block_on(partition.append(
            batch.finish().into(),
            crate::topics::partition::Ack::Durable,
            None,
        ))
        .expect("append");
    }

    /// A member's commit whose fsync is still running when its partition moves (the
    /// member leaves) must be visible before the partition's next owner gets it: that
    /// owner starts at the committed offset it reads, which a commit landing after the
    /// grant would move under it (it was granted at once, and read the old position).
    #[test]
    fn a_partition_moves_only_once_a_commit_in_flight_is_visible() {
        use std::future::Future;
        use strata_storage::fault::{Injector, Op};

        let dir = tempfile::tempdir().expect("tempdir");
        let offsets_dir = dir.path().join("groups").join("offsets");
        std::fs::create_dir_all(&offsets_dir).expect("mkdir");
        // Only the offsets log's operations are counted (and paused).
        let injector = Injector::new(&offsets_dir).expect("injector");
        let data = injector
            .root()
            .parent()
            .and_then(|p| p.parent())
            .expect("data dir");
        let broker = open_broker(data);
        let settings = crate::topics::settings::TopicSettings {
            partitions: 1,
            ..Default::default()
        };
        broker.create_topic("t", settings).expect("create");
        produce(&broker, "t", 10);
        let tp = TopicPartition::new("t".to_string(), 0);
        let a = join(&broker, "g", "t");
        assert_eq!(a.assignment, vec![tp.clone()]);

        let fsync = injector.pause_nth(Op::Sync, 1);
        let mut commit = Box::pin(commit_offsets(
            &broker,
            "g",
            Committer::Member {
                id: &a.member_id,
                epoch: a.member_epoch,
            },
            vec![(tp.clone(), 7, String::new())],
        ));
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(commit.as_mut().poll(&mut cx).is_pending());
        // The commit passed its last ownership check and its fsync is running.
        fsync.wait_reached();
        let counts = |t: &str| broker.partition_count(t);
        broker.coordinator().leave("g", &a.member_id, &counts);
        let b = join(&broker, "g", "t");
        assert!(
            b.assignment.is_empty(),
            "granted while a commit of it was being written"
        );
        fsync.release();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let committed = rt.block_on(commit).expect("the commit was checked in time");
        assert_eq!(committed[0].1.offset, 7);
        let b = beat(&broker, "g", &b);
        assert_eq!(b.assignment, vec![tp.clone()], "granted once visible");
        let start = fetch_offsets(&broker, "g", &BTreeSet::from([tp.clone()])).expect("fetch");
        assert_eq!(start[0].1.offset, 7, "the new owner starts at the commit");
    }

    /// A topic deleted without its offsets (the offsets' deletion failed, or the broker
    /// died in between) and created again under the same name starts without committed
    /// offsets, before and after a restart; an old topic keeps its own.
    #[test]
    fn a_recreated_topic_never_inherits_old_committed_offsets() {
        let dir = tempfile::tempdir().expect("tempdir");
        let broker = open_broker(dir.path());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let commit = |broker: &Broker, topic: &str| {
            rt.block_on(commit_offsets(
                broker,
                "g",
                Committer::Outside,
                vec![(TopicPartition::new(topic.to_string(), 0), 0, "old".into())],
            ))
            .expect("commit")
        };
        for topic in ["t", "kept"] {
            broker.create_topic(topic, one_partition()).expect("create");
            commit(&broker, topic);
        }
        let all = BTreeSet::new();
        assert_eq!(fetch_offsets(&broker, "g", &all).expect("fetch").len(), 2);
        // The topic goes, its offsets' deletion never runs.
        broker.delete_topic("t").expect("delete");
        broker.create_topic("t", one_partition()).expect("recreate");
        let kept = vec![TopicPartition::new("kept".to_string(), 0)];
        let visible = |broker: &Broker| -> Vec<TopicPartition> {
            let offsets = fetch_offsets(broker, "g", &all).expect("fetch");
            offsets.into_iter().map(|(tp, _)| tp).collect()
        };
        assert_eq!(visible(&broker), kept);
        let described = describe_group(&broker, "g").expect("describe");
        assert!(described
            .partitions
            .iter()
            .all(|p| p.partition.topic == "kept" || p.committed.is_none()));
        // A restart forgets the old offsets for good; the new topic commits its own.
        assert!(broker.shutdown().is_empty());
        drop(broker);
        let broker = open_broker(dir.path());
        assert_eq!(visible(&broker), kept);
        commit(&broker, "t");
        assert_eq!(visible(&broker).len(), 2);
        assert!(broker.shutdown().is_empty());
        drop(broker);
        let broker = open_broker(dir.path());
        assert_eq!(visible(&broker).len(), 2);
    }

    /// Deleting a topic removes the members owning its partitions itself, not a later
    /// step that a failure could skip: a member never carries over to a topic created
    /// again under the same name.
    #[test]
    fn a_deleted_topic_takes_its_owners_out_of_the_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let broker = open_broker(dir.path());
        broker.create_topic("t", one_partition()).expect("create");
        let member = join(&broker, "g", "t");
        let tp = TopicPartition::new("t".to_string(), 0);
        check_fetch(&broker, "g", &member.member_id, member.member_epoch, &tp).expect("owner");
        broker.delete_topic("t").expect("delete");
        broker.create_topic("t", one_partition()).expect("recreate");
        assert!(matches!(
            check_fetch(&broker, "g", &member.member_id, member.member_epoch, &tp),
            Err(Error::Fenced(_))
        ));
    }

    /// A topic deleted and created again under a live group: the member that owned
    /// the old topic's partition cannot commit to the new one, and the group is
    /// assigned the new incarnation's partition, whose commits land as that
    /// incarnation's (visible, and kept over a restart).
    #[test]
    fn a_recreated_topic_under_a_live_group_fences_the_old_owner() {
        let dir = tempfile::tempdir().expect("tempdir");
        let broker = open_broker(dir.path());
        broker.create_topic("t", one_partition()).expect("create");
        produce(&broker, "t", 5);
        let tp = TopicPartition::new("t".to_string(), 0);
        let old = join(&broker, "g", "t");
        let waiting = join(&broker, "g", "t");
        assert_eq!(old.assignment, vec![tp.clone()]);
        assert!(waiting.assignment.is_empty());

        broker.delete_topic("t").expect("delete");
        broker.create_topic("t", one_partition()).expect("recreate");
        produce(&broker, "t", 3);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let commit = |id: &str, epoch: u64, offset: u64| {
            rt.block_on(commit_offsets(
                &broker,
                "g",
                Committer::Member { id, epoch },
                vec![(tp.clone(), offset, String::new())],
            ))
        };
        assert!(matches!(
            commit(&old.member_id, old.member_epoch, 3),
            Err(Error::Fenced(_))
        ));
        let now = beat(&broker, "g", &waiting);
        assert_eq!(now.assignment, vec![tp.clone()]);
        commit(&now.member_id, now.member_epoch, 2).expect("the new owner commits");
        let all = BTreeSet::new();
        assert_eq!(
            fetch_offsets(&broker, "g", &all).expect("fetch")[0]
                .1
                .offset,
            2
        );
        assert!(broker.shutdown().is_empty());
        drop(broker);
        let broker = open_broker(dir.path());
        assert_eq!(
            fetch_offsets(&broker, "g", &all).expect("fetch")[0]
                .1
                .offset,
            2
        );
    }

    #[test]
    fn lag_counts_from_the_log_start_without_a_commit() {
        let log = LogRange {
            start: 10,
            end: 110,
        };
        assert_eq!(lag(log, None), 100);
        assert_eq!(lag(log, Some(&committed(60))), 50);
        assert_eq!(lag(log, Some(&committed(110))), 0);
        // Retention deleted records the group never read: they are not lag any more.
        assert_eq!(lag(log, Some(&committed(3))), 100);
    }
}
