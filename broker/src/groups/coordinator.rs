//! Consumer group membership: who is in each group, which partitions each member owns,
//! and how partitions move when members come and go.
//!
//! Server-side assignment in the spirit of Kafka's KIP-848. Members join and heartbeat
//! with the topics they subscribe to and the partitions they still hold; each response
//! carries the member's whole current assignment. When membership, subscriptions or
//! partition counts change, the group computes a new *target* assignment
//! ([`crate::groups::assign`]) and every member moves toward it on its own heartbeats:
//!
//! - a partition the member owns but the target gives elsewhere is *revoked*: left out
//!   of the member's assignment, but still the member's until a heartbeat no longer
//!   lists it as held (the member commits and stops reading it first);
//! - a partition the target gives the member is *granted* once no member owns it.
//!
//! So a partition never has two owners, and only partitions whose owner changes stop
//! being consumed. Each change of a member's assignment bumps its epoch; a partition
//! granted at epoch `e` may be committed or fetched with any epoch from `e` to the
//! member's current one, which fences zombies: a removed member is unknown, and a
//! member's request from before a partition came back to it carries an older epoch.
//!
//! The group epoch counts changes of membership, subscriptions and partition counts. It
//! only increases while the group exists: a group whose last member leaves stays known,
//! EMPTY, with its epoch, for as long as it has committed offsets, and a member joining
//! it later moves the epoch on from there. A group with neither members nor offsets no
//! longer exists and is forgotten ([`Coordinator::forget_empty`]).
//!
//! A member's commit is checked for ownership again by the offsets writer right before
//! its write ([`Coordinator::begin_commit`]), and from that check until the commit is
//! durable and visible (or has failed) its partitions are *committing*: a partition is
//! granted only when no member owns it **and** no commit of it is in flight. So the
//! fsync of a late commit can never overlap a new owner reading its start position:
//! the new owner gets the partition after the commit is visible, and reads it.
//!
//! What a member owns is keyed by the topic's incarnation as well as its name and
//! partition ([`Coordinator::set_incarnation`]): a partition granted in a topic since
//! deleted (and maybe created again under its name) is fenced, revoked, and never given
//! back as the new topic's partition of that number.
//!
//! Members are soft state: a broker restart forgets them (and group epochs), and they
//! rejoin. Committed offsets are durable ([`crate::groups::offsets`]).

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::groups::assign::{assign, Assignment, TopicPartition};

/// Session timeout when a join leaves it at 0.
pub const SESSION_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Rebalance timeout when a join leaves it at 0.
pub const REBALANCE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// Shortest session or rebalance timeout a member may ask for.
pub const TIMEOUT_MIN: Duration = Duration::from_secs(1);
/// Longest session or rebalance timeout a member may ask for.
pub const TIMEOUT_MAX: Duration = Duration::from_secs(300);
/// Longest heartbeat interval of a member whose group is stable.
const HEARTBEAT_INTERVAL_MAX: Duration = Duration::from_secs(3);
/// Heartbeat interval while partitions move, so a released partition reaches its next
/// owner quickly.
const HEARTBEAT_INTERVAL_MOVING: Duration = Duration::from_millis(200);

/// What a member says in a heartbeat.
#[derive(Debug, Default)]
pub struct Heartbeat {
    /// Empty to join.
    pub member_id: String,
    /// 0 to join.
    pub member_epoch: u64,
    /// Subscribed topics: required to join; empty later keeps the subscription.
    pub topics: Vec<String>,
    /// Partitions the member still holds.
    pub owned: Vec<TopicPartition>,
    /// Join only; zero takes the default.
    pub session_timeout: Duration,
    /// Join only; zero takes the default.
    pub rebalance_timeout: Duration,
    /// A name for people.
    pub client_id: String,
    /// Join only, optional: chosen by the client for one join and sent again when it
    /// retries that join. A join whose key a member of the group already has is that
    /// member's join again (its answer was lost): it gets that member back instead of
    /// a second member, whose unclaimed partitions would wait a whole session.
    pub join_key: String,
}

/// Longest join key.
pub const JOIN_KEY_BYTES_MAX: usize = 64;

/// The coordinator's answer to a heartbeat.
#[derive(Debug, PartialEq, Eq)]
pub struct HeartbeatReply {
    /// The member's id.
    pub member_id: String,
    /// The member's epoch.
    pub member_epoch: u64,
    /// When to heartbeat next.
    pub interval: Duration,
    /// Every partition the member owns now.
    pub assignment: Vec<TopicPartition>,
}

/// A group's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    /// No members.
    Empty,
    /// Every member owns exactly its target partitions.
    Stable,
    /// Partitions are moving.
    Reconciling,
}

/// A member as DescribeGroup shows it.
#[derive(Debug, Clone)]
pub struct MemberView {
    /// Its id.
    pub member_id: String,
    /// The name it gave.
    pub client_id: String,
    /// Its epoch.
    pub member_epoch: u64,
    /// Its subscription.
    pub topics: Vec<String>,
    /// Partitions it owns.
    pub assignment: Vec<TopicPartition>,
    /// Partitions revoked from it that it has not released.
    pub revoking: Vec<TopicPartition>,
    /// Its session timeout.
    pub session_timeout: Duration,
}

/// A group as ListGroups and DescribeGroup show it.
#[derive(Debug, Clone)]
pub struct GroupView {
    /// Its name.
    pub name: String,
    /// Its state.
    pub state: GroupState,
    /// Its epoch: bumped on every change of membership, subscriptions or partitions.
    pub epoch: u64,
    /// Its members, by id.
    pub members: Vec<MemberView>,
}

#[derive(Debug)]
struct Member {
    client_id: String,
    /// The key of the join that added it; empty without one.
    join_key: String,
    topics: BTreeSet<String>,
    epoch: u64,
    /// Partitions owned and in the assignment, with the epoch each was granted at.
    assigned: BTreeMap<TopicPartition, u64>,
    /// Partitions owned but revoked, not yet released: grant epoch and revocation time.
    revoking: BTreeMap<TopicPartition, Revoked>,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    /// When the member expires without a heartbeat.
    deadline: Instant,
}

/// A partition taken away from a member that still holds it.
#[derive(Debug, Clone, Copy)]
struct Revoked {
    granted: u64,
    at: Instant,
}

impl Member {
    /// The epoch at which the member was granted `tp`, if it owns it.
    fn owns(&self, tp: &TopicPartition) -> Option<u64> {
        self.assigned
            .get(tp)
            .copied()
            .or_else(|| self.revoking.get(tp).map(|r| r.granted))
    }

    /// True when the member kept a revoked partition past its rebalance timeout.
    fn stuck(&self, now: Instant) -> bool {
        self.revoking
            .values()
            .any(|r| now > r.at + self.rebalance_timeout)
    }
}

#[derive(Debug, Default)]
struct Group {
    epoch: u64,
    members: BTreeMap<String, Member>,
    target: Assignment,
    /// The owner of every owned partition (assigned or revoking).
    owners: HashMap<TopicPartition, String>,
    /// The incarnation of its topic each owned partition was granted in (`None`: the
    /// coordinator knew none): with the name, the key of what a member owns. A topic
    /// deleted and created again under its name has another one, so a partition of the
    /// old one is nobody's to commit, fetch or keep ([`Group::is_stale`]).
    incarnations: HashMap<TopicPartition, Option<u64>>,
    /// Partition counts of the subscribed topics when the target was computed.
    partitions: BTreeMap<String, u32>,
}

impl Group {
    fn state(&self) -> GroupState {
        if self.members.is_empty() {
            return GroupState::Empty;
        }
        let settled = self.members.iter().all(|(id, m)| {
            m.revoking.is_empty()
                && self.target.get(id).is_some_and(|t| {
                    t.len() == m.assigned.len() && t.iter().all(|tp| m.assigned.contains_key(tp))
                })
        });
        if settled {
            GroupState::Stable
        } else {
            GroupState::Reconciling
        }
    }

    /// Recomputes the target when subscriptions or partition counts changed (or
    /// `changed` says membership did).
    fn retarget(&mut self, mut changed: bool, partitions: &dyn Fn(&str) -> Option<u32>) {
        let topics: BTreeSet<&String> = self.members.values().flat_map(|m| &m.topics).collect();
        let counts: BTreeMap<String, u32> = topics
            .into_iter()
            .map(|t| (t.clone(), partitions(t).unwrap_or(0)))
            .collect();
        if counts != self.partitions {
            self.partitions = counts;
            changed = true;
        }
        if !changed {
            return;
        }
        self.epoch += 1;
        let subscriptions = self
            .members
            .iter()
            .map(|(id, m)| (id.clone(), m.topics.clone()))
            .collect();
        self.target = assign(&subscriptions, &self.partitions, &self.target);
    }

    /// True when `tp` is owned as a partition of an incarnation of its topic other
    /// than `current` (the topic was deleted, and maybe created again).
    fn is_stale(&self, tp: &TopicPartition, current: &Incarnations) -> bool {
        self.incarnations
            .get(tp)
            .is_some_and(|granted| *granted != current.get(&tp.topic).copied())
    }

    /// Moves `id`'s assignment toward its target: revokes what the target gives away,
    /// and partitions of a topic incarnation that is gone (never given back: the member
    /// releases them before it can get the new incarnation's), grants what is free:
    /// owned by no member, with no commit in flight (`committing`). Returns whether the
    /// assignment changed.
    fn reconcile(
        &mut self,
        id: &str,
        now: Instant,
        committing: &Committing,
        current: &Incarnations,
    ) -> bool {
        let empty = BTreeSet::new();
        let stale: BTreeSet<TopicPartition> = self
            .incarnations
            .keys()
            .filter(|tp| self.is_stale(tp, current))
            .cloned()
            .collect();
        let target = self.target.get(id).unwrap_or(&empty);
        let Some(member) = self.members.get_mut(id) else {
            return false;
        };
        let mut changed = false;
        let revoked: Vec<TopicPartition> = member
            .assigned
            .keys()
            .filter(|tp| !target.contains(*tp) || stale.contains(*tp))
            .cloned()
            .collect();
        for tp in revoked {
            let granted = member.assigned.remove(&tp).expect("listed above");
            member.revoking.insert(tp, Revoked { granted, at: now });
            changed = true;
        }
        let mut granted = Vec::new();
        for tp in target {
            if member.assigned.contains_key(tp) || stale.contains(tp) {
                continue;
            }
            if let Some(revoked) = member.revoking.remove(tp) {
                // Given back before it was released: it never stopped being the
                // member's, so its grant epoch stands.
                member.assigned.insert(tp.clone(), revoked.granted);
                changed = true;
            } else if !self.owners.contains_key(tp) && !committing.contains_key(tp) {
                granted.push(tp.clone());
            }
        }
        let grew = !granted.is_empty();
        if changed || grew {
            member.epoch += 1;
        }
        for tp in granted {
            self.owners.insert(tp.clone(), id.to_string());
            let incarnation = current.get(&tp.topic).copied();
            self.incarnations.insert(tp.clone(), incarnation);
            member.assigned.insert(tp, member.epoch);
        }
        changed || grew
    }

    /// Releases the revoked partitions `id` no longer holds, as of a heartbeat sent at
    /// `epoch`. A partition granted after that epoch is not released: the heartbeat
    /// (a late or retried one) was sent before the member knew of it.
    fn release(&mut self, id: &str, epoch: u64, owned: &[TopicPartition]) {
        let Some(member) = self.members.get_mut(id) else {
            return;
        };
        let held: BTreeSet<&TopicPartition> = owned.iter().collect();
        let released: Vec<TopicPartition> = member
            .revoking
            .iter()
            .filter(|(tp, r)| r.granted <= epoch && !held.contains(tp))
            .map(|(tp, _)| tp.clone())
            .collect();
        for tp in released {
            member.revoking.remove(&tp);
            self.owners.remove(&tp);
            self.incarnations.remove(&tp);
        }
    }

    /// Removes a member; its partitions are free at once.
    fn remove(&mut self, id: &str, partitions: &dyn Fn(&str) -> Option<u32>) -> bool {
        let Some(member) = self.members.remove(id) else {
            return false;
        };
        for tp in member.assigned.keys().chain(member.revoking.keys()) {
            self.owners.remove(tp);
            self.incarnations.remove(tp);
        }
        self.target.remove(id);
        self.retarget(true, partitions);
        true
    }

    fn interval(&self, member: &Member) -> Duration {
        if self.state() == GroupState::Reconciling {
            HEARTBEAT_INTERVAL_MOVING
        } else {
            (member.session_timeout / 3).min(HEARTBEAT_INTERVAL_MAX)
        }
    }

    fn view(&self, name: &str) -> GroupView {
        GroupView {
            name: name.to_string(),
            state: self.state(),
            epoch: self.epoch,
            members: self
                .members
                .iter()
                .map(|(id, m)| MemberView {
                    member_id: id.clone(),
                    client_id: m.client_id.clone(),
                    member_epoch: m.epoch,
                    topics: m.topics.iter().cloned().collect(),
                    assignment: m.assigned.keys().cloned().collect(),
                    revoking: m.revoking.keys().cloned().collect(),
                    session_timeout: m.session_timeout,
                })
                .collect(),
        }
    }
}

/// The incarnation of every topic that exists, by name, as the broker told
/// ([`Coordinator::set_incarnation`]).
type Incarnations = HashMap<String, u64>;

/// The partitions of one group with a member's commit in flight, and how many.
type Committing = HashMap<TopicPartition, usize>;
/// [`Committing`] of every group that has commits in flight.
type CommitsInFlight = Arc<Mutex<HashMap<String, Committing>>>;

/// Every consumer group's membership.
#[derive(Debug)]
pub struct Coordinator {
    groups: Mutex<BTreeMap<String, Group>>,
    /// Partitions with a member's commit between its last ownership check and its
    /// answer ([`Coordinator::begin_commit`]): not granted to anyone meanwhile. Locked
    /// after `groups`, never before.
    committing: CommitsInFlight,
    /// The incarnation of every topic. Locked after `groups`, never before.
    incarnations: Mutex<Incarnations>,
    /// Groups whose offsets an admin change (or a commit from outside) is writing: they
    /// accept no joins until it is done, so no member starts from a position that is
    /// about to change. Locked after `groups`, never before.
    busy: Arc<Mutex<BTreeSet<String>>>,
    /// Member ids are random, so an id from before a restart is never handed out again.
    ids: RandomState,
    next_id: AtomicU64,
    /// Most members of one group ([`Coordinator::set_limits`]; none by default).
    max_members: AtomicUsize,
    /// Most groups with members.
    max_groups: AtomicUsize,
}

impl Default for Coordinator {
    fn default() -> Self {
        Coordinator {
            groups: Mutex::new(BTreeMap::new()),
            committing: Arc::default(),
            incarnations: Mutex::default(),
            busy: Arc::default(),
            ids: RandomState::new(),
            next_id: AtomicU64::new(0),
            max_members: AtomicUsize::new(usize::MAX),
            max_groups: AtomicUsize::new(usize::MAX),
        }
    }
}

/// A group reserved by [`Coordinator::exclusive`]; dropping it lets members join again.
/// It owns its share of the reservation, so a change of the committed offsets can hold
/// it until the change is written, whether or not its caller still waits.
#[derive(Debug)]
pub struct Exclusive {
    busy: Arc<Mutex<BTreeSet<String>>>,
    group: String,
}

impl Drop for Exclusive {
    fn drop(&mut self) {
        self.busy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.group);
    }
}

/// A member's commit that passed its last ownership check and is being written
/// ([`Coordinator::begin_commit`]): its partitions are granted to no one until it is
/// dropped, once the commit is visible or has failed.
#[derive(Debug)]
pub struct CommitInFlight {
    committing: CommitsInFlight,
    group: String,
    partitions: Vec<TopicPartition>,
}

impl Drop for CommitInFlight {
    fn drop(&mut self) {
        let mut committing = self.committing.lock().unwrap_or_else(|e| e.into_inner());
        let Some(group) = committing.get_mut(&self.group) else {
            return;
        };
        for tp in &self.partitions {
            if let Some(count) = group.get_mut(tp) {
                *count -= 1;
                if *count == 0 {
                    group.remove(tp);
                }
            }
        }
        if group.is_empty() {
            committing.remove(&self.group);
        }
    }
}

/// Checks a group name: the rules of topic names, so it is safe in logs and paths.
pub fn validate_group(name: &str) -> Result<()> {
    crate::topics::settings::validate("group", name)
}

fn timeout(asked: Duration, default: Duration, what: &str) -> Result<Duration> {
    if asked.is_zero() {
        return Ok(default);
    }
    if asked < TIMEOUT_MIN || asked > TIMEOUT_MAX {
        return Err(Error::InvalidArgument(format!(
            "{what} {} ms is outside {} ms to {} ms",
            asked.as_millis(),
            TIMEOUT_MIN.as_millis(),
            TIMEOUT_MAX.as_millis()
        )));
    }
    Ok(asked)
}

fn check_topics(topics: &[String], partitions: &dyn Fn(&str) -> Option<u32>) -> Result<()> {
    match topics.iter().find(|t| partitions(t).is_none()) {
        Some(missing) => Err(Error::TopicNotFound(missing.clone())),
        None => Ok(()),
    }
}

fn fenced(group: &str, member_id: &str, why: &str) -> Error {
    Error::Fenced(format!(
        "member {member_id:?} of group {group:?} {why}; rejoin with an empty member id"
    ))
}

impl Coordinator {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Group>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn incarnations(&self) -> std::sync::MutexGuard<'_, Incarnations> {
        self.incarnations.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the incarnation of a topic that exists (`None`: it was deleted). A
    /// partition owned as one of another incarnation of that name is fenced from then
    /// on, revoked at its owner's next heartbeat and granted again (the new
    /// incarnation's) only once released.
    pub fn set_incarnation(&self, topic: &str, incarnation: Option<u64>) {
        let mut incarnations = self.incarnations();
        match incarnation {
            Some(incarnation) => incarnations.insert(topic.to_string(), incarnation),
            None => incarnations.remove(topic),
        };
    }

    fn busy(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Limits joins: at most `max_members` in one group, at most `max_groups` groups
    /// with members. A join beyond either is refused with
    /// [`Error::LimitExceeded`]; members already in are not affected.
    pub fn set_limits(&self, max_members: usize, max_groups: usize) {
        self.max_members.store(max_members, Ordering::Relaxed);
        self.max_groups.store(max_groups, Ordering::Relaxed);
    }

    /// Refuses a join to `group_name` beyond the limits.
    fn check_join_limits(&self, groups: &BTreeMap<String, Group>, group_name: &str) -> Result<()> {
        let members = groups.get(group_name).map_or(0, |g| g.members.len());
        let max_members = self.max_members.load(Ordering::Relaxed);
        if members >= max_members {
            return Err(Error::LimitExceeded {
                limit: "max_group_members",
                message: format!("group {group_name:?} has {members} members already"),
            });
        }
        let max_groups = self.max_groups.load(Ordering::Relaxed);
        if members == 0 {
            let active = groups.values().filter(|g| !g.members.is_empty()).count();
            if active >= max_groups {
                return Err(Error::LimitExceeded {
                    limit: "max_groups",
                    message: format!(
                        "the broker has {active} consumer groups with members already"
                    ),
                });
            }
        }
        Ok(())
    }

    /// Reserves a group without members for a change of its offsets from outside
    /// (a reset, a deletion, a standalone commit): joins wait until the guard is
    /// dropped. `what` names the change for the error when the group has members.
    pub fn exclusive(&self, group_name: &str, what: &str) -> Result<Exclusive> {
        let groups = self.lock();
        if let Some(group) = groups.get(group_name).filter(|g| !g.members.is_empty()) {
            return Err(Error::Fenced(format!(
                "cannot {what} group {group_name:?}: it has {} active members; stop them \
                 first, or act as a member",
                group.members.len()
            )));
        }
        if !self.busy().insert(group_name.to_string()) {
            return Err(Error::GroupBusy(group_name.to_string()));
        }
        Ok(Exclusive {
            busy: Arc::clone(&self.busy),
            group: group_name.to_string(),
        })
    }

    /// True while a change from outside holds the group ([`Coordinator::exclusive`]):
    /// the Kafka listener's joins and member commits wait it out as this coordinator's
    /// joins do.
    pub fn held(&self, group_name: &str) -> bool {
        self.busy().contains(group_name)
    }

    /// Handles a heartbeat (or a join). `partitions` gives a topic's partition count,
    /// `None` for a topic that does not exist.
    pub fn heartbeat(
        &self,
        group_name: &str,
        request: Heartbeat,
        partitions: &dyn Fn(&str) -> Option<u32>,
        now: Instant,
    ) -> Result<HeartbeatReply> {
        validate_group(group_name)?;
        let mut groups = self.lock();
        let id = if request.member_id.is_empty() {
            if self.busy().contains(group_name) {
                return Err(Error::GroupBusy(group_name.to_string()));
            }
            check_topics(&request.topics, partitions)?;
            if request.member_epoch != 0 {
                return Err(Error::InvalidArgument(
                    "a join (empty member id) must have member epoch 0".into(),
                ));
            }
            if request.topics.is_empty() {
                return Err(Error::InvalidArgument(
                    "a join must name the topics to consume".into(),
                ));
            }
            let session_timeout = timeout(
                request.session_timeout,
                SESSION_TIMEOUT_DEFAULT,
                "session timeout",
            )?;
            let rebalance_timeout = timeout(
                request.rebalance_timeout,
                REBALANCE_TIMEOUT_DEFAULT,
                "rebalance timeout",
            )?;
            if request.join_key.len() > JOIN_KEY_BYTES_MAX {
                return Err(Error::InvalidArgument(format!(
                    "join key is {} bytes; at most {JOIN_KEY_BYTES_MAX} are allowed",
                    request.join_key.len()
                )));
            }
            let retried = groups.get(group_name).and_then(|g| {
                g.members
                    .iter()
                    .find(|(_, m)| !request.join_key.is_empty() && m.join_key == request.join_key)
                    .map(|(id, _)| id.clone())
            });
            if retried.is_none() {
                // A retried join is a member already in: the limits count it already.
                self.check_join_limits(&groups, group_name)?;
            }
            let group = groups.entry(group_name.to_string()).or_default();
            if let Some(member) = retried.as_ref().and_then(|id| group.members.get_mut(id)) {
                // The answer to this join was lost: answer it again.
                member.deadline = now + member.session_timeout;
                let id = retried.unwrap_or_default();
                tracing::info!(group = group_name, member = %id, "join retried");
                id
            } else {
                let counter = self.next_id.fetch_add(1, Ordering::Relaxed);
                let id = format!("{:016x}", self.ids.hash_one(counter));
                group.members.insert(
                    id.clone(),
                    Member {
                        client_id: request.client_id,
                        join_key: request.join_key,
                        topics: request.topics.iter().cloned().collect(),
                        epoch: 0,
                        assigned: BTreeMap::new(),
                        revoking: BTreeMap::new(),
                        session_timeout,
                        rebalance_timeout,
                        deadline: now + session_timeout,
                    },
                );
                group.retarget(true, partitions);
                tracing::info!(group = group_name, member = %id, "member joined");
                id
            }
        } else {
            let group = groups
                .get_mut(group_name)
                .ok_or_else(|| fenced(group_name, &request.member_id, "is not in the group"))?;
            let member = group
                .members
                .get_mut(&request.member_id)
                .ok_or_else(|| fenced(group_name, &request.member_id, "is not in the group"))?;
            if request.member_epoch > member.epoch {
                let why = format!(
                    "sent epoch {} but its epoch is {}",
                    request.member_epoch, member.epoch
                );
                // Whoever sent this is not the member the group knows: free its
                // partitions now rather than after its session times out.
                group.remove(&request.member_id, partitions);
                return Err(fenced(group_name, &request.member_id, &why));
            }
            member.deadline = now + member.session_timeout;
            let topics: BTreeSet<String> = request.topics.iter().cloned().collect();
            let resubscribed = !topics.is_empty() && topics != member.topics;
            if resubscribed {
                // Only a new subscription is checked: a topic deleted since the member
                // subscribed simply has no partitions to give.
                check_topics(&request.topics, partitions)?;
                member.topics = topics;
            }
            group.release(&request.member_id, request.member_epoch, &request.owned);
            group.retarget(resubscribed, partitions);
            request.member_id
        };
        let group = groups
            .get_mut(group_name)
            .expect("the member's group exists");
        let committing = self.committing.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.incarnations();
        group.reconcile(
            &id,
            now,
            committing.get(group_name).unwrap_or(&Committing::new()),
            &current,
        );
        drop((committing, current));
        let member = group
            .members
            .get_mut(&id)
            .expect("the member was just found or added");
        // Epoch 0 means "joining" in requests, so even a member that got nothing at its
        // join answers with epoch 1; its first grant then moves it on to 2.
        member.epoch = member.epoch.max(1);
        let member = &group.members[&id];
        Ok(HeartbeatReply {
            member_id: id.clone(),
            member_epoch: member.epoch,
            interval: group.interval(member),
            assignment: member.assigned.keys().cloned().collect(),
        })
    }

    /// Removes a member at once. Leaving twice, or after the session expired, is fine.
    pub fn leave(
        &self,
        group_name: &str,
        member_id: &str,
        partitions: &dyn Fn(&str) -> Option<u32>,
    ) {
        let mut groups = self.lock();
        if let Some(group) = groups.get_mut(group_name) {
            if group.remove(member_id, partitions) {
                tracing::info!(group = group_name, member = member_id, "member left");
            }
        }
    }

    /// Removes members whose session or rebalance timeout passed, and retargets groups
    /// whose topics changed partition counts (a topic deleted or recreated).
    pub fn expire(&self, partitions: &dyn Fn(&str) -> Option<u32>, now: Instant) {
        let mut groups = self.lock();
        for (name, group) in groups.iter_mut() {
            let expired: Vec<(String, &'static str)> = group
                .members
                .iter()
                .filter_map(|(id, m)| {
                    if now > m.deadline {
                        Some((id.clone(), "session timed out"))
                    } else if m.stuck(now) {
                        Some((
                            id.clone(),
                            "kept revoked partitions past its rebalance timeout",
                        ))
                    } else {
                        None
                    }
                })
                .collect();
            for (id, why) in expired {
                tracing::info!(group = %name, member = %id, "member removed: {why}");
                group.remove(&id, partitions);
            }
            group.retarget(false, partitions);
        }
    }

    /// Forgets the groups that have no members and, as `has_offsets` tells, no
    /// committed offsets: such a group no longer exists, and its name starts over at
    /// epoch 0. A group without members that has committed offsets is EMPTY and keeps
    /// its epoch, so a group's epoch only increases for as long as it exists. The
    /// groups kept are therefore those with members or committed offsets.
    pub fn forget_empty(&self, has_offsets: &dyn Fn(&str) -> bool) {
        self.lock()
            .retain(|name, group| !group.members.is_empty() || has_offsets(name));
    }

    /// Removes every member that owns a partition of `topic`, which was just deleted:
    /// a topic created again under that name is a different log, and a member must not
    /// carry its positions in the old one over to it. The members learn of it on their
    /// next request (FAILED_PRECONDITION) and rejoin.
    pub fn topic_deleted(&self, topic: &str, partitions: &dyn Fn(&str) -> Option<u32>) {
        let mut groups = self.lock();
        self.incarnations().remove(topic);
        for (name, group) in groups.iter_mut() {
            let owners: BTreeSet<String> = group
                .owners
                .iter()
                .filter(|(tp, _)| tp.topic == topic)
                .map(|(_, id)| id.clone())
                .collect();
            for id in owners {
                tracing::info!(group = %name, member = %id, %topic, "member removed: its topic was deleted");
                group.remove(&id, partitions);
            }
        }
    }

    /// The last check of a member's commit, made by the offsets writer right before
    /// the commit's write: [`Coordinator::check_owner`], and if the member still owns
    /// `partitions`, a guard that keeps them from being granted to anyone until it is
    /// dropped (after the commit is visible, or has failed). Checked and marked under
    /// one lock, so no grant falls between the check and the write.
    pub fn begin_commit(
        &self,
        group_name: &str,
        member_id: &str,
        member_epoch: u64,
        partitions: &[TopicPartition],
    ) -> Result<CommitInFlight> {
        let groups = self.lock();
        let current = self.incarnations();
        Self::check_owner_locked(
            &groups,
            &current,
            group_name,
            member_id,
            member_epoch,
            partitions,
        )?;
        drop(current);
        let mut committing = self.committing.lock().unwrap_or_else(|e| e.into_inner());
        let group = committing.entry(group_name.to_string()).or_default();
        for tp in partitions {
            *group.entry(tp.clone()).or_default() += 1;
        }
        Ok(CommitInFlight {
            committing: Arc::clone(&self.committing),
            group: group_name.to_string(),
            partitions: partitions.to_vec(),
        })
    }

    /// Checks that a request from a member (or, with an empty `member_id`, from outside
    /// the group) may commit or fetch `partitions`.
    pub fn check_owner<'a>(
        &self,
        group_name: &str,
        member_id: &str,
        member_epoch: u64,
        partitions: impl IntoIterator<Item = &'a TopicPartition>,
    ) -> Result<()> {
        let groups = self.lock();
        let current = self.incarnations();
        Self::check_owner_locked(
            &groups,
            &current,
            group_name,
            member_id,
            member_epoch,
            partitions,
        )
    }

    fn check_owner_locked<'a>(
        groups: &BTreeMap<String, Group>,
        current: &Incarnations,
        group_name: &str,
        member_id: &str,
        member_epoch: u64,
        partitions: impl IntoIterator<Item = &'a TopicPartition>,
    ) -> Result<()> {
        let group = groups.get(group_name);
        if member_id.is_empty() {
            return match group {
                Some(g) if !g.members.is_empty() => Err(Error::Fenced(format!(
                    "group {group_name:?} has {} active members: only they may read or \
                     commit its partitions as members",
                    g.members.len()
                ))),
                _ => Ok(()),
            };
        }
        let member = group
            .and_then(|g| g.members.get(member_id))
            .ok_or_else(|| fenced(group_name, member_id, "is not in the group"))?;
        if member_epoch > member.epoch {
            return Err(fenced(
                group_name,
                member_id,
                &format!(
                    "sent epoch {member_epoch} but its epoch is {}",
                    member.epoch
                ),
            ));
        }
        let group = group.expect("the member's group exists");
        for tp in partitions {
            if group.is_stale(tp, current) {
                return Err(fenced(
                    group_name,
                    member_id,
                    &format!("owns {tp} of a topic deleted since (or created again)"),
                ));
            }
            match member.owns(tp) {
                Some(granted) if granted <= member_epoch => {}
                Some(granted) => {
                    return Err(fenced(
                        group_name,
                        member_id,
                        &format!(
                            "sent epoch {member_epoch} for {tp}, which it owns since epoch \
                             {granted}"
                        ),
                    ))
                }
                None => return Err(fenced(group_name, member_id, &format!("does not own {tp}"))),
            }
        }
        Ok(())
    }

    /// True when the group has members.
    pub fn has_members(&self, group_name: &str) -> bool {
        self.lock()
            .get(group_name)
            .is_some_and(|g| !g.members.is_empty())
    }

    /// A group the coordinator knows, as DescribeGroup shows it: one with members, or
    /// one without that [`Coordinator::forget_empty`] keeps.
    pub fn describe(&self, group_name: &str) -> Option<GroupView> {
        self.lock().get(group_name).map(|g| g.view(group_name))
    }

    /// Every group the coordinator knows (see [`Coordinator::describe`]).
    pub fn list(&self) -> Vec<GroupView> {
        self.lock().iter().map(|(name, g)| g.view(name)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn six(topic: &str) -> Option<u32> {
        (topic == "orders").then_some(6)
    }

    fn join(c: &Coordinator, now: Instant) -> HeartbeatReply {
        c.heartbeat(
            "payments",
            Heartbeat {
                topics: vec!["orders".into()],
                ..Heartbeat::default()
            },
            &six,
            now,
        )
        .expect("join")
    }

    /// A heartbeat from a member that holds exactly what it was last given.
    fn beat(c: &Coordinator, last: &HeartbeatReply, now: Instant) -> Result<HeartbeatReply> {
        c.heartbeat(
            "payments",
            Heartbeat {
                member_id: last.member_id.clone(),
                member_epoch: last.member_epoch,
                owned: last.assignment.clone(),
                ..Heartbeat::default()
            },
            &six,
            now,
        )
    }

    fn tp(p: u32) -> TopicPartition {
        TopicPartition::new("orders", p)
    }

    #[test]
    fn a_partition_moves_only_after_its_owner_released_it() {
        let c = Coordinator::default();
        let now = Instant::now();
        let a = join(&c, now);
        assert_eq!(a.assignment.len(), 6);
        let b = join(&c, now);
        assert!(b.assignment.is_empty(), "nothing is free yet");
        assert_eq!(
            c.describe("payments").map(|g| g.state),
            Some(GroupState::Reconciling)
        );
        // a learns it must give three up; they stay a's until it stops holding them.
        let a_owned_before = a.assignment.clone();
        let a = c
            .heartbeat(
                "payments",
                Heartbeat {
                    member_id: a.member_id.clone(),
                    member_epoch: a.member_epoch,
                    owned: a_owned_before.clone(),
                    ..Heartbeat::default()
                },
                &six,
                now,
            )
            .expect("beat");
        assert_eq!(a.assignment.len(), 3);
        let still_b = beat(&c, &b, now).expect("beat");
        assert!(still_b.assignment.is_empty(), "a has not released yet");
        // a may still commit what is being revoked, with its old epoch.
        c.check_owner(
            "payments",
            &a.member_id,
            a.member_epoch - 1,
            &a_owned_before,
        )
        .expect("revoking partitions are still a's");
        let a = beat(&c, &a, now).expect("a releases");
        let b = beat(&c, &still_b, now).expect("b picks up");
        assert_eq!(b.assignment.len(), 3);
        assert!(b.assignment.iter().all(|p| !a.assignment.contains(p)));
        assert_eq!(
            c.describe("payments").map(|g| g.state),
            Some(GroupState::Stable)
        );
        // a can no longer commit what moved.
        let moved = &b.assignment[0];
        assert!(matches!(
            c.check_owner("payments", &a.member_id, a.member_epoch, [moved]),
            Err(Error::Fenced(_))
        ));
        c.check_owner("payments", &b.member_id, b.member_epoch, &b.assignment)
            .expect("b owns its partitions");
    }

    /// Guards the promise of docs/protocol.md that a group's epoch only increases: it
    /// used to go back to 0 when the last member left, because the group was forgotten
    /// although it still had committed offsets.
    #[test]
    fn the_group_epoch_only_increases_through_empty_times() {
        let c = Coordinator::default();
        let now = Instant::now();
        let a = join(&c, now);
        assert_eq!(c.describe("payments").map(|g| g.epoch), Some(1));
        c.leave("payments", &a.member_id, &six);
        let empty = c
            .describe("payments")
            .expect("a group with offsets stays known");
        assert_eq!((empty.state, empty.epoch), (GroupState::Empty, 2));
        c.forget_empty(&|_| true);
        assert_eq!(c.describe("payments").map(|g| g.epoch), Some(2));

        // A join continues from there; so does a member expiring.
        join(&c, now);
        assert_eq!(c.describe("payments").map(|g| g.epoch), Some(3));
        c.expire(
            &six,
            now + SESSION_TIMEOUT_DEFAULT + Duration::from_millis(1),
        );
        let expired = c.describe("payments").expect("still known");
        assert_eq!((expired.state, expired.epoch), (GroupState::Empty, 4));

        // Without members and offsets the group no longer exists; its name starts over.
        c.forget_empty(&|_| false);
        assert!(c.describe("payments").is_none());
        join(&c, now);
        assert_eq!(c.describe("payments").map(|g| g.epoch), Some(1));
    }

    #[test]
    fn joins_beyond_the_member_and_group_limits_are_refused() {
        let c = Coordinator::default();
        c.set_limits(2, 1);
        let now = Instant::now();
        let first = join(&c, now);
        join(&c, now);
        let join_group = |group: &str| {
            let join = Heartbeat {
                topics: vec!["orders".into()],
                ..Heartbeat::default()
            };
            c.heartbeat(group, join, &six, now)
        };
        let e = join_group("payments").expect_err("a third member");
        assert!(e.to_string().contains("max_group_members"), "{e}");
        let e = join_group("billing").expect_err("a second group");
        assert!(e.to_string().contains("max_groups"), "{e}");
        // Members already in keep heartbeating.
        beat(&c, &first, now).expect("a member's heartbeat");
    }

    #[test]
    fn a_join_answers_with_epoch_one_even_without_partitions() {
        let c = Coordinator::default();
        let now = Instant::now();
        let a = join(&c, now);
        assert_eq!((a.member_epoch, a.assignment.len()), (1, 6));
        // Nothing is free for b yet; epoch 0 would read as "joining" in its next request.
        let b = join(&c, now);
        assert_eq!((b.member_epoch, b.assignment.len()), (1, 0));
        let a = beat(&c, &a, now).expect("a told to revoke");
        beat(&c, &a, now).expect("a released");
        let b = beat(&c, &b, now).expect("b granted");
        assert_eq!((b.member_epoch, b.assignment.len()), (2, 3));
        c.check_owner("payments", &b.member_id, 2, &b.assignment)
            .expect("granted at epoch 2");
        assert!(matches!(
            c.check_owner("payments", &b.member_id, 1, &b.assignment),
            Err(Error::Fenced(_))
        ));
    }

    #[test]
    fn an_expired_member_is_fenced_and_its_partitions_move() {
        let c = Coordinator::default();
        let start = Instant::now();
        let a = join(&c, start);
        let b = join(&c, start);
        let a = beat(&c, &a, start).expect("a told to revoke");
        let a = beat(&c, &a, start).expect("a released");
        let b = beat(&c, &b, start).expect("b granted");
        assert_eq!((a.assignment.len(), b.assignment.len()), (3, 3));
        // b keeps heartbeating; a goes silent past its session.
        let later = start + SESSION_TIMEOUT_DEFAULT + Duration::from_millis(1);
        let b = beat(&c, &b, start + SESSION_TIMEOUT_DEFAULT / 2).expect("beat");
        c.expire(&six, later);
        let b = beat(&c, &b, later).expect("beat");
        assert_eq!(b.assignment.len(), 6);
        // The zombie cannot heartbeat, commit or fetch.
        assert!(matches!(beat(&c, &a, later), Err(Error::Fenced(_))));
        assert!(matches!(
            c.check_owner("payments", &a.member_id, a.member_epoch, &a.assignment),
            Err(Error::Fenced(_))
        ));
    }

    #[test]
    fn an_epoch_from_before_a_partition_came_back_is_fenced() {
        let c = Coordinator::default();
        let now = Instant::now();
        let a = join(&c, now);
        let old_epoch = a.member_epoch;
        let b = join(&c, now);
        let a = beat(&c, &a, now).expect("revoke");
        let a = beat(&c, &a, now).expect("release");
        let b = beat(&c, &b, now).expect("grant");
        let given_away = b.assignment[0].clone();
        c.leave("payments", &b.member_id, &six);
        let a = beat(&c, &a, now).expect("gets everything back");
        assert_eq!(a.assignment.len(), 6);
        c.check_owner("payments", &a.member_id, a.member_epoch, [&given_away])
            .expect("current epoch");
        assert!(matches!(
            c.check_owner("payments", &a.member_id, old_epoch, [&given_away]),
            Err(Error::Fenced(_))
        ));
    }

    #[test]
    fn a_member_that_never_releases_is_removed_after_its_rebalance_timeout() {
        let c = Coordinator::default();
        let start = Instant::now();
        let a = join(&c, start);
        let b = join(&c, start);
        let stubborn = beat(&c, &a, start).expect("revoke");
        // a keeps heartbeating but keeps holding all six.
        let mut now = start;
        while now < start + REBALANCE_TIMEOUT_DEFAULT + Duration::from_secs(2) {
            now += Duration::from_secs(1);
            let _ = c.heartbeat(
                "payments",
                Heartbeat {
                    member_id: stubborn.member_id.clone(),
                    member_epoch: stubborn.member_epoch,
                    owned: a.assignment.clone(),
                    ..Heartbeat::default()
                },
                &six,
                now,
            );
            let _ = beat(&c, &b, now);
            c.expire(&six, now);
        }
        let b = beat(&c, &b, now).expect("b stays");
        assert_eq!(b.assignment.len(), 6);
    }

    #[test]
    fn a_late_heartbeat_does_not_release_what_was_granted_after_it() {
        let c = Coordinator::default();
        let now = Instant::now();
        let a = join(&c, now);
        let stale = a.member_epoch;
        assert_eq!(a.assignment.len(), 6);
        let b = join(&c, now);
        // a is told to give three up, but a heartbeat from before it had them (epoch
        // 1, holding nothing) arrives late: it must not free them for b.
        beat(&c, &a, now).expect("revoke");
        c.heartbeat(
            "payments",
            Heartbeat {
                member_id: a.member_id.clone(),
                member_epoch: stale - 1,
                ..Heartbeat::default()
            },
            &six,
            now,
        )
        .expect("a late heartbeat is accepted");
        let b = beat(&c, &b, now).expect("beat");
        assert!(
            b.assignment.is_empty(),
            "b got {:?} while a holds them",
            b.assignment
        );
    }

    #[test]
    fn a_heartbeat_from_the_future_removes_the_member() {
        let c = Coordinator::default();
        let now = Instant::now();
        let a = join(&c, now);
        let forged = HeartbeatReply {
            member_epoch: a.member_epoch + 1,
            ..a
        };
        assert!(matches!(beat(&c, &forged, now), Err(Error::Fenced(_))));
        assert!(
            c.describe("payments").is_none_or(|g| g.members.is_empty()),
            "the member is gone at once"
        );
    }

    #[test]
    fn joins_wait_while_an_admin_change_holds_the_group() {
        let c = Coordinator::default();
        let now = Instant::now();
        let guard = c.exclusive("payments", "reset").expect("no members");
        assert!(matches!(
            c.heartbeat(
                "payments",
                Heartbeat {
                    topics: vec!["orders".into()],
                    ..Heartbeat::default()
                },
                &six,
                now
            ),
            Err(Error::GroupBusy(_))
        ));
        drop(guard);
        let a = join(&c, now);
        assert!(matches!(
            c.exclusive("payments", "reset"),
            Err(Error::Fenced(_))
        ));
        c.leave("payments", &a.member_id, &six);
    }

    #[test]
    fn deleting_a_topic_removes_the_members_that_own_its_partitions() {
        let c = Coordinator::default();
        let now = Instant::now();
        let a = join(&c, now);
        assert_eq!(a.assignment.len(), 6);
        c.topic_deleted("orders", &|_| None);
        assert!(matches!(beat(&c, &a, now), Err(Error::Fenced(_))));
        c.topic_deleted("elsewhere", &six);
    }

    /// Ownership is keyed by the topic's incarnation too: a partition granted as one of
    /// incarnation 1 is not the same-named partition of incarnation 2 (the topic was
    /// deleted and created again, and the member was not removed: a deletion that
    /// raced the grant, or a listener that does not remove owners). Its owner can no
    /// longer commit or fetch it, is told it is revoked, and gets the new incarnation's
    /// only after releasing the old one, so it notices and starts over from the new
    /// log's committed offsets.
    #[test]
    fn partitions_of_an_earlier_topic_incarnation_are_fenced_and_revoked() {
        let c = Coordinator::default();
        let now = Instant::now();
        c.set_incarnation("orders", Some(1));
        let a = join(&c, now);
        assert_eq!(a.assignment.len(), 6);
        c.check_owner("payments", &a.member_id, a.member_epoch, &a.assignment)
            .expect("owner");
        c.set_incarnation("orders", Some(2));
        assert!(matches!(
            c.check_owner("payments", &a.member_id, a.member_epoch, &a.assignment),
            Err(Error::Fenced(_))
        ));
        // Still holding the old ones: revoked, not given back as the new ones.
        let told = beat(&c, &a, now).expect("a heartbeat");
        assert!(told.assignment.is_empty(), "{:?}", told.assignment);
        let still_holding = c
            .heartbeat(
                "payments",
                Heartbeat {
                    member_id: told.member_id.clone(),
                    member_epoch: told.member_epoch,
                    owned: a.assignment.clone(),
                    ..Heartbeat::default()
                },
                &six,
                now,
            )
            .expect("a heartbeat");
        assert!(
            still_holding.assignment.is_empty(),
            "granted before the old were released"
        );
        let again = still_holding;
        // Released: the new incarnation's partitions, at a new epoch.
        let released = c
            .heartbeat(
                "payments",
                Heartbeat {
                    member_id: again.member_id.clone(),
                    member_epoch: again.member_epoch,
                    ..Heartbeat::default()
                },
                &six,
                now,
            )
            .expect("a heartbeat");
        assert_eq!(released.assignment.len(), 6);
        assert!(released.member_epoch > a.member_epoch);
        c.check_owner(
            "payments",
            &released.member_id,
            released.member_epoch,
            &released.assignment,
        )
        .expect("owner of the new incarnation's");
    }

    /// A join retried with its key (its answer was lost) gets the member it created
    /// back, with that member's partitions, instead of a second member while the first
    /// holds every partition for a whole session; a new key is a new member.
    #[test]
    fn a_retried_join_gets_its_member_back() {
        let c = Coordinator::default();
        let now = Instant::now();
        let request = |key: &str| Heartbeat {
            topics: vec!["orders".into()],
            join_key: key.into(),
            ..Heartbeat::default()
        };
        let lost = c
            .heartbeat("payments", request("k1"), &six, now)
            .expect("join");
        assert_eq!(lost.assignment.len(), 6);
        let retried = c
            .heartbeat("payments", request("k1"), &six, now)
            .expect("retry");
        assert_eq!(retried.member_id, lost.member_id);
        assert_eq!(retried.assignment.len(), 6);
        assert_eq!(c.describe("payments").expect("group").members.len(), 1);
        let other = c
            .heartbeat("payments", request("k2"), &six, now)
            .expect("join");
        assert_ne!(other.member_id, lost.member_id);
        assert_eq!(c.describe("payments").expect("group").members.len(), 2);
        // Without a key every join is a new member, as before.
        c.heartbeat("payments", request(""), &six, now)
            .expect("join");
        c.heartbeat("payments", request(""), &six, now)
            .expect("join");
        assert_eq!(c.describe("payments").expect("group").members.len(), 4);
        assert!(matches!(
            c.heartbeat("payments", request(&"k".repeat(65)), &six, now),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn outsiders_commit_only_to_groups_without_members() {
        let c = Coordinator::default();
        c.check_owner("payments", "", 0, [&tp(0)])
            .expect("no members: standalone commits are fine");
        let a = join(&c, Instant::now());
        assert!(matches!(
            c.check_owner("payments", "", 0, [&tp(0)]),
            Err(Error::Fenced(_))
        ));
        c.leave("payments", &a.member_id, &six);
        c.check_owner("payments", "", 0, [&tp(0)])
            .expect("no members any more: standalone commits are fine again");
    }

    #[test]
    fn bad_joins_are_refused() {
        let c = Coordinator::default();
        let now = Instant::now();
        let bad = |h: Heartbeat, group: &str| c.heartbeat(group, h, &six, now);
        assert!(matches!(
            bad(Heartbeat::default(), "g"),
            Err(Error::InvalidArgument(_))
        ));
        let topics = || vec!["orders".to_string()];
        assert!(matches!(
            bad(
                Heartbeat {
                    topics: vec!["nope".into()],
                    ..Heartbeat::default()
                },
                "g"
            ),
            Err(Error::TopicNotFound(_))
        ));
        assert!(matches!(
            bad(
                Heartbeat {
                    topics: topics(),
                    ..Heartbeat::default()
                },
                "bad name"
            ),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            bad(
                Heartbeat {
                    topics: topics(),
                    session_timeout: Duration::from_millis(5),
                    ..Heartbeat::default()
                },
                "g"
            ),
            Err(Error::InvalidArgument(_))
        ));
        assert!(matches!(
            bad(
                Heartbeat {
                    member_id: "nobody".into(),
                    member_epoch: 1,
                    ..Heartbeat::default()
                },
                "g"
            ),
            Err(Error::Fenced(_))
        ));
    }

    /// A model-checked run of the coordinator: random joins, heartbeats (from members
    /// that release what is taken away and from members that keep it), resubscriptions,
    /// leaves, time passing, expiry and topics changing size or disappearing.
    mod state_machine {
        use std::cell::Cell;

        use proptest::prelude::*;

        use super::*;

        const GROUP: &str = "g";
        const TOPICS: [&str; 2] = ["t0", "t1"];

        #[derive(Debug, Clone)]
        enum Op {
            /// Joins with the topics whose bits are set (1 to 3).
            Join(u8),
            /// A heartbeat of client `.0`; `.1`: it released what was taken away.
            Heartbeat(usize, bool),
            /// A heartbeat of client `.0` that subscribes to the topics of bits `.1`.
            Resubscribe(usize, u8),
            Leave(usize),
            AdvanceMs(u64),
            Expire,
            /// Forgets the group if it is empty; `.0`: it has committed offsets.
            ForgetEmpty(bool),
            /// Topic `.0` now has `.1` partitions; 0 deletes it.
            Resize(usize, u32),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                2 => (1u8..4).prop_map(Op::Join),
                8 => (0usize..8, prop::bool::weighted(0.8)).prop_map(|(c, r)| Op::Heartbeat(c, r)),
                1 => (0usize..8, 1u8..4).prop_map(|(c, t)| Op::Resubscribe(c, t)),
                1 => (0usize..8).prop_map(Op::Leave),
                2 => (0u64..4000).prop_map(Op::AdvanceMs),
                1 => Just(Op::Expire),
                1 => any::<bool>().prop_map(Op::ForgetEmpty),
                1 => (0usize..2, 0u32..7).prop_map(|(t, n)| Op::Resize(t, n)),
            ]
        }

        fn topics(bits: u8) -> Vec<String> {
            (0..TOPICS.len())
                .filter(|t| bits & (1 << t) != 0)
                .map(|t| TOPICS[t].to_string())
                .collect()
        }

        /// The client side of a member, as the model sees it.
        #[derive(Debug)]
        struct Client {
            id: String,
            epoch: u64,
            /// Assigned, or taken away and not released.
            held: BTreeSet<TopicPartition>,
        }

        struct World {
            coordinator: Coordinator,
            counts: [Cell<u32>; 2],
            now: Instant,
            clients: Vec<Client>,
            /// The group's epoch when last seen; 0 once it was forgotten.
            epoch: Cell<u64>,
        }

        impl World {
            fn partitions(&self, topic: &str) -> Option<u32> {
                let t = TOPICS.iter().position(|&name| name == topic)?;
                Some(self.counts[t].get()).filter(|&n| n > 0)
            }

            fn exists(&self, tp: &TopicPartition) -> bool {
                self.partitions(&tp.topic).is_some_and(|n| tp.partition < n)
            }

            fn is_member(&self, id: &str) -> bool {
                self.coordinator
                    .lock()
                    .get(GROUP)
                    .is_some_and(|g| g.members.contains_key(id))
            }

            /// Every partition some member other than `id` owns.
            fn owned_by_others(&self, id: &str) -> BTreeSet<TopicPartition> {
                let groups = self.coordinator.lock();
                groups
                    .get(GROUP)
                    .into_iter()
                    .flat_map(|g| &g.members)
                    .filter(|(other, _)| *other != id)
                    .flat_map(|(_, m)| m.assigned.keys().chain(m.revoking.keys()))
                    .cloned()
                    .collect()
            }

            /// A heartbeat of client `i`, checked against the model.
            fn heartbeat(
                &mut self,
                i: usize,
                release: bool,
                subscribe: Vec<String>,
            ) -> std::result::Result<(), TestCaseError> {
                let client = &self.clients[i];
                let known = self.is_member(&client.id);
                let missing_topic = subscribe.iter().any(|t| self.partitions(t).is_none());
                let others = self.owned_by_others(&client.id);
                let request = Heartbeat {
                    member_id: client.id.clone(),
                    member_epoch: client.epoch,
                    topics: subscribe,
                    owned: client.held.iter().cloned().collect(),
                    ..Heartbeat::default()
                };
                let reply =
                    self.coordinator
                        .heartbeat(GROUP, request, &|t| self.partitions(t), self.now);
                let reply = match reply {
                    Err(Error::TopicNotFound(_)) if missing_topic => return Ok(()),
                    Err(Error::Fenced(_)) if !known => {
                        // Drops everything without committing and goes away.
                        self.clients.remove(i);
                        return Ok(());
                    }
                    other => other.map_err(|e| TestCaseError::fail(format!("heartbeat: {e}")))?,
                };
                let client = &mut self.clients[i];
                prop_assert!(known, "an unknown member's heartbeat succeeded");
                prop_assert!(reply.member_epoch >= client.epoch, "the epoch went back");
                for tp in &reply.assignment {
                    prop_assert!(
                        !others.contains(tp),
                        "{} assigned while another member owns it",
                        tp
                    );
                }
                let assignment: BTreeSet<TopicPartition> = reply.assignment.into_iter().collect();
                client.epoch = reply.member_epoch;
                if release {
                    client.held = assignment;
                } else {
                    client.held.extend(assignment);
                }
                // Right after its heartbeat, a member is assigned only partitions of its
                // target, which exist: those of a topic that shrank or went away are
                // being revoked.
                let id = client.id.clone();
                let groups = self.coordinator.lock();
                let group = &groups[GROUP];
                let target = group.target.get(&id);
                for tp in group.members[&id].assigned.keys() {
                    prop_assert!(
                        target.is_some_and(|t| t.contains(tp)),
                        "{} assigned outside the target",
                        tp
                    );
                    prop_assert!(self.exists(tp), "{} does not exist but is assigned", tp);
                }
                Ok(())
            }

            fn apply(&mut self, op: &Op) -> std::result::Result<(), TestCaseError> {
                let pick = |i: usize, n: usize| (n > 0).then(|| i % n);
                match *op {
                    Op::Join(bits) => {
                        let subscribe = topics(bits);
                        let missing = subscribe.iter().any(|t| self.partitions(t).is_none());
                        let others = self.owned_by_others("");
                        let reply = self.coordinator.heartbeat(
                            GROUP,
                            Heartbeat {
                                topics: subscribe,
                                ..Heartbeat::default()
                            },
                            &|t| self.partitions(t),
                            self.now,
                        );
                        match reply {
                            Err(Error::TopicNotFound(_)) if missing => {}
                            Ok(reply) => {
                                prop_assert!(!missing, "joined a missing topic");
                                prop_assert!(reply.member_epoch >= 1);
                                for tp in &reply.assignment {
                                    prop_assert!(
                                        !others.contains(tp),
                                        "{} given at a join while owned",
                                        tp
                                    );
                                }
                                self.clients.push(Client {
                                    id: reply.member_id,
                                    epoch: reply.member_epoch,
                                    held: reply.assignment.into_iter().collect(),
                                });
                            }
                            Err(e) => prop_assert!(false, "join: {}", e),
                        }
                    }
                    Op::Heartbeat(i, release) => {
                        if let Some(i) = pick(i, self.clients.len()) {
                            self.heartbeat(i, release, Vec::new())?;
                        }
                    }
                    Op::Resubscribe(i, bits) => {
                        if let Some(i) = pick(i, self.clients.len()) {
                            self.heartbeat(i, true, topics(bits))?;
                        }
                    }
                    Op::Leave(i) => {
                        if let Some(i) = pick(i, self.clients.len()) {
                            let client = self.clients.remove(i);
                            self.coordinator
                                .leave(GROUP, &client.id, &|t| self.partitions(t));
                            prop_assert!(!self.is_member(&client.id));
                        }
                    }
                    Op::AdvanceMs(ms) => self.now += Duration::from_millis(ms),
                    Op::Expire => self.coordinator.expire(&|t| self.partitions(t), self.now),
                    Op::ForgetEmpty(has_offsets) => {
                        self.coordinator.forget_empty(&|_| has_offsets);
                        if self.coordinator.describe(GROUP).is_none() {
                            self.epoch.set(0);
                        }
                    }
                    Op::Resize(t, n) => self.counts[t].set(n),
                }
                Ok(())
            }

            /// Invariants that hold between any two operations.
            fn check(&self) -> std::result::Result<(), TestCaseError> {
                let groups = self.coordinator.lock();
                let Some(group) = groups.get(GROUP) else {
                    drop(groups);
                    // A group never created, or forgotten: its clients are zombies.
                    for client in &self.clients {
                        prop_assert!(self.zombie_is_fenced(client));
                    }
                    return Ok(());
                };
                prop_assert!(
                    group.epoch >= self.epoch.get(),
                    "the group epoch went back from {} to {}",
                    self.epoch.get(),
                    group.epoch
                );
                self.epoch.set(group.epoch);
                // No partition has two owners, and the owner index agrees.
                let mut owners: BTreeMap<&TopicPartition, &String> = BTreeMap::new();
                for (id, m) in &group.members {
                    let revoking = m.revoking.iter().map(|(tp, r)| (tp, &r.granted));
                    for (tp, &granted) in m.assigned.iter().chain(revoking) {
                        prop_assert!(
                            granted <= m.epoch,
                            "{} granted after the member's epoch",
                            tp
                        );
                        if let Some(other) = owners.insert(tp, id) {
                            prop_assert!(false, "{} owned by {} and {}", tp, other, id);
                        }
                    }
                }
                prop_assert_eq!(owners.len(), group.owners.len());
                for (tp, id) in &owners {
                    prop_assert_eq!(group.owners.get(*tp), Some(*id));
                }
                // The target gives each existing partition (as last seen) to at most one
                // subscribed member.
                let mut targeted = BTreeSet::new();
                for (id, set) in &group.target {
                    let member = group.members.get(id);
                    prop_assert!(member.is_some(), "a target for a departed member {}", id);
                    for tp in set {
                        prop_assert!(member.is_some_and(|m| m.topics.contains(&tp.topic)));
                        prop_assert!(group
                            .partitions
                            .get(&tp.topic)
                            .is_some_and(|&n| tp.partition < n));
                        prop_assert!(targeted.insert(tp), "{} targeted twice", tp);
                    }
                }
                drop(groups);
                // A client holds only what its member owns, at its epoch; a client
                // whose member is gone is fenced from everything it still holds.
                for client in &self.clients {
                    if self.is_member(&client.id) {
                        let groups = self.coordinator.lock();
                        let member = &groups[GROUP].members[&client.id];
                        prop_assert_eq!(member.epoch, client.epoch);
                        for tp in &client.held {
                            prop_assert!(member.owns(tp).is_some(), "{} held but not owned", tp);
                        }
                        drop(groups);
                        prop_assert!(self
                            .coordinator
                            .check_owner(GROUP, &client.id, client.epoch, &client.held)
                            .is_ok());
                    } else {
                        prop_assert!(self.zombie_is_fenced(client));
                    }
                }
                Ok(())
            }

            fn zombie_is_fenced(&self, client: &Client) -> bool {
                client.held.iter().all(|tp| {
                    matches!(
                        self.coordinator
                            .check_owner(GROUP, &client.id, client.epoch, [tp]),
                        Err(Error::Fenced(_))
                    )
                })
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]

            #[test]
            fn ownership_stays_exclusive_and_cooperative_members_settle_balanced(
                ops in prop::collection::vec(op(), 1..80),
            ) {
                let mut world = World {
                    coordinator: Coordinator::default(),
                    counts: [Cell::new(6), Cell::new(3)],
                    now: Instant::now(),
                    clients: Vec::new(),
                    epoch: Cell::new(0),
                };
                for op in &ops {
                    world.apply(op)?;
                    world.check()?;
                }
                // No more changes: members that heartbeat and release what is taken
                // away reach the target within a few rounds (a round to learn of a
                // revocation, one to release it, one for the next owner to get it).
                for _ in 0..4 {
                    let mut i = 0;
                    while i < world.clients.len() {
                        let before = world.clients.len();
                        world.heartbeat(i, true, Vec::new())?;
                        world.check()?;
                        // A zombie's heartbeat removes it; the next client moved up.
                        if world.clients.len() == before {
                            i += 1;
                        }
                    }
                }
                let view = world.coordinator.describe(GROUP);
                let Some(view) = view.filter(|v| !v.members.is_empty()) else {
                    prop_assert!(world.clients.is_empty());
                    return Ok(());
                };
                prop_assert_eq!(view.state, GroupState::Stable, "{:#?}", view);
                prop_assert_eq!(view.members.len(), world.clients.len());
                for topic in TOPICS {
                    let subscribers: Vec<&MemberView> =
                        view.members.iter().filter(|m| m.topics.iter().any(|t| t == topic)).collect();
                    let count = world.partitions(topic).unwrap_or(0);
                    if subscribers.is_empty() {
                        continue;
                    }
                    let mut all: Vec<u32> = Vec::new();
                    let mut per_member = Vec::new();
                    for m in &subscribers {
                        let mine: Vec<u32> = m.assignment.iter().filter(|tp| tp.topic == topic).map(|tp| tp.partition).collect();
                        per_member.push(mine.len());
                        all.extend(mine);
                    }
                    all.sort_unstable();
                    prop_assert_eq!(all, (0..count).collect::<Vec<u32>>(), "{}: {:#?}", topic, view);
                    let (min, max) = (per_member.iter().min(), per_member.iter().max());
                    prop_assert!(max.zip(min).is_some_and(|(max, min)| max - min <= 1), "{}: {:?}", topic, per_member);
                }
                for client in &world.clients {
                    let m = view.members.iter().find(|m| m.member_id == client.id);
                    prop_assert!(m.is_some_and(|m| m.revoking.is_empty()
                        && client.held == m.assignment.iter().cloned().collect::<BTreeSet<_>>()));
                }
            }
        }
    }
}
