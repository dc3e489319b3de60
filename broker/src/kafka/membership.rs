//! Kafka's classic group membership (JoinGroup, SyncGroup, Heartbeat, LeaveGroup):
//! members join, the coordinator picks a protocol and a leader, the leader computes the
//! assignment on the client side and SyncGroup hands it out. A member that stops
//! heartbeating for its session timeout is removed; any change of membership starts a
//! rebalance that the others learn of from their heartbeats.
//!
//! Offsets stay in Strata's one store (`groups/`); a group is used by one protocol at a
//! time: a Kafka join to a group with gRPC members is refused.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use kafka_protocol::ResponseError as K;

/// Shortest and longest session timeout a member may ask for (Kafka's defaults for
/// `group.min.session.timeout.ms` and `group.max.session.timeout.ms`).
pub const SESSION_TIMEOUT_MIN: Duration = Duration::from_secs(6);
/// See [`SESSION_TIMEOUT_MIN`].
pub const SESSION_TIMEOUT_MAX: Duration = Duration::from_secs(1800);
/// Longest a rebalance waits for members to rejoin.
pub const REBALANCE_TIMEOUT_MAX: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Empty => "Empty",
            State::PreparingRebalance => "PreparingRebalance",
            State::CompletingRebalance => "CompletingRebalance",
            State::Stable => "Stable",
        }
    }
}

#[derive(Debug)]
struct Member {
    client_id: String,
    client_host: String,
    session: Duration,
    rebalance: Duration,
    protocols: Vec<(String, Bytes)>,
    /// Joined in the rebalance in progress.
    joined: bool,
    /// Requests of this member waiting (join or sync): it is alive meanwhile.
    waiting: u32,
    last_seen: Instant,
    assignment: Bytes,
}

/// What a completed rebalance hands to the members that joined it.
#[derive(Debug, Clone, Default)]
struct Round {
    generation: i32,
    protocol: String,
    leader: String,
    /// Member ids and their metadata for the chosen protocol, for the leader.
    members: Vec<(String, Bytes)>,
}

#[derive(Debug)]
struct Group {
    state: State,
    generation: i32,
    protocol_type: String,
    members: BTreeMap<String, Member>,
    deadline: Instant,
    round: Round,
}

impl Group {
    fn new() -> Group {
        Group {
            state: State::Empty,
            generation: 0,
            protocol_type: String::new(),
            members: BTreeMap::new(),
            deadline: Instant::now(),
            round: Round::default(),
        }
    }

    /// Each member with its metadata for `protocol`: the member list of a round, as
    /// its leader gets it and DescribeGroups and `strata group describe` show it.
    fn members_with<'a>(
        &'a self,
        protocol: &'a str,
    ) -> impl Iterator<Item = (&'a String, &'a Member, Bytes)> + 'a {
        self.members.iter().map(move |(id, member)| {
            let metadata = member
                .protocols
                .iter()
                .find(|(name, _)| name == protocol)
                .map(|(_, metadata)| metadata.clone())
                .unwrap_or_default();
            (id, member, metadata)
        })
    }

    /// Starts a rebalance unless one is in progress.
    fn prepare(&mut self, now: Instant) {
        if self.state != State::PreparingRebalance {
            self.state = State::PreparingRebalance;
            self.deadline = now + self.longest_rebalance();
            for member in self.members.values_mut() {
                member.joined = false;
            }
        }
    }

    /// The longest rebalance timeout of the members, at most [`REBALANCE_TIMEOUT_MAX`].
    fn longest_rebalance(&self) -> Duration {
        self.members
            .values()
            .map(|m| m.rebalance)
            .max()
            .unwrap_or_default()
            .min(REBALANCE_TIMEOUT_MAX)
    }

    /// Ends a CompletingRebalance whose leader sent no assignment within the rebalance
    /// timeout (it may heartbeat all along): the leader is removed and the others,
    /// waiting in SyncGroup, get REBALANCE_IN_PROGRESS and rejoin. True when it ended.
    fn end_overdue_sync(&mut self, now: Instant) -> bool {
        if self.state != State::CompletingRebalance || now < self.deadline {
            return false;
        }
        let leader = std::mem::take(&mut self.round.leader);
        self.members.remove(&leader);
        if self.members.is_empty() {
            self.state = State::Empty;
        } else {
            self.prepare(now);
        }
        true
    }

    /// Completes the rebalance if every member joined, or, `at_deadline`, with those
    /// that did. True when it completed.
    fn try_complete(&mut self, now: Instant, at_deadline: bool) -> bool {
        if self.state != State::PreparingRebalance {
            return false;
        }
        let all = self.members.values().all(|m| m.joined);
        let overdue = at_deadline && now >= self.deadline;
        if !(all || overdue) {
            return false;
        }
        self.members.retain(|_, m| m.joined);
        self.generation += 1;
        if self.members.is_empty() {
            self.state = State::Empty;
            self.round = Round {
                generation: self.generation,
                ..Round::default()
            };
            return true;
        }
        // The first protocol, in the order of the members' preference, that all support.
        let first = self.members.values().next().map(|m| m.protocols.clone());
        let protocol = first
            .unwrap_or_default()
            .into_iter()
            .map(|(name, _)| name)
            .find(|name| {
                self.members
                    .values()
                    .all(|m| m.protocols.iter().any(|(n, _)| n == name))
            })
            .unwrap_or_default();
        let leader = if self.members.contains_key(&self.round.leader) {
            self.round.leader.clone()
        } else {
            self.members.keys().next().cloned().unwrap_or_default()
        };
        let members = self
            .members_with(&protocol)
            .map(|(id, _, metadata)| (id.clone(), metadata))
            .collect();
        for member in self.members.values_mut() {
            member.joined = false;
            member.last_seen = now;
            member.assignment = Bytes::new();
        }
        self.state = State::CompletingRebalance;
        // The leader has the rebalance timeout to send the assignment.
        self.deadline = now + self.longest_rebalance();
        self.round = Round {
            generation: self.generation,
            protocol,
            leader,
            members,
        };
        true
    }

    /// Removes members whose session expired; true when any was.
    fn expire(&mut self, now: Instant) -> bool {
        let before = self.members.len();
        self.members
            .retain(|_, m| m.waiting > 0 || now < m.last_seen + m.session);
        let removed = self.members.len() != before;
        if removed {
            if self.members.is_empty() {
                self.state = State::Empty;
            } else {
                self.prepare(now);
            }
        }
        removed
    }
}

/// A JoinGroup request, as the coordinator needs it.
#[derive(Debug)]
pub struct Join {
    /// The group.
    pub group: String,
    /// The member id, empty for a new member.
    pub member_id: String,
    /// The client's id and host, for DescribeGroups.
    pub client_id: String,
    /// See `client_id`.
    pub client_host: String,
    /// Session timeout.
    pub session: Duration,
    /// Rebalance timeout.
    pub rebalance: Duration,
    /// Protocol type (`consumer`).
    pub protocol_type: String,
    /// Protocols with their metadata, in preference order.
    pub protocols: Vec<(String, Bytes)>,
}

/// A JoinGroup answer.
#[derive(Debug, Default)]
pub struct Joined {
    /// The error code, 0 on success.
    pub error: i16,
    /// The generation.
    pub generation: i32,
    /// The chosen protocol.
    pub protocol: String,
    /// The protocol type.
    pub protocol_type: String,
    /// The leader's member id.
    pub leader: String,
    /// This member's id.
    pub member_id: String,
    /// Every member with its metadata, for the leader only.
    pub members: Vec<(String, Bytes)>,
}

/// A member as DescribeGroups shows it.
#[derive(Debug, Clone)]
pub struct MemberView {
    /// Its id.
    pub id: String,
    /// The client's id.
    pub client_id: String,
    /// The client's host.
    pub client_host: String,
    /// Its metadata for the chosen protocol.
    pub metadata: Bytes,
    /// Its assignment.
    pub assignment: Bytes,
}

/// A group as DescribeGroups and ListGroups show it.
#[derive(Debug, Clone)]
pub struct GroupView {
    /// Its state name.
    pub state: &'static str,
    /// Protocol type.
    pub protocol_type: String,
    /// The chosen protocol.
    pub protocol: String,
    /// Its members.
    pub members: Vec<MemberView>,
}

/// The Kafka groups of one broker.
#[derive(Debug)]
pub struct Coordinator {
    groups: Mutex<HashMap<String, Group>>,
    changed: Notify,
    next_member: AtomicU64,
    /// Most members of one group ([`Coordinator::set_limits`]; none by default).
    max_members: AtomicUsize,
    /// Most Kafka groups with members.
    max_groups: AtomicUsize,
}

impl Default for Coordinator {
    fn default() -> Self {
        Coordinator {
            groups: Mutex::default(),
            changed: Notify::new(),
            next_member: AtomicU64::new(0),
            max_members: AtomicUsize::new(usize::MAX),
            max_groups: AtomicUsize::new(usize::MAX),
        }
    }
}

impl Coordinator {
    /// Limits joins as the gRPC coordinator's limits do (`max_group_members`,
    /// `max_groups`, counted over the Kafka groups): a join beyond either is refused
    /// with GROUP_MAX_SIZE_REACHED, which clients report as fatal; members already in
    /// are not affected.
    pub fn set_limits(&self, max_members: usize, max_groups: usize) {
        self.max_members.store(max_members, Ordering::Relaxed);
        self.max_groups.store(max_groups, Ordering::Relaxed);
    }

    /// The limit a join of `member_id` to `group_name` would pass, if any.
    fn join_beyond_limits(
        &self,
        groups: &HashMap<String, Group>,
        group_name: &str,
        member_id: &str,
    ) -> Option<&'static str> {
        match groups.get(group_name).filter(|g| !g.members.is_empty()) {
            Some(group) => (!group.members.contains_key(member_id)
                && group.members.len() >= self.max_members.load(Ordering::Relaxed))
            .then_some("max_group_members"),
            None => (groups.values().filter(|g| !g.members.is_empty()).count()
                >= self.max_groups.load(Ordering::Relaxed))
            .then_some("max_groups"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Group>> {
        self.groups.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serves a JoinGroup: returns once the rebalance it starts or joins completes.
    /// `held` tells whether an admin change holds a group (a reset or deletion of its
    /// offsets): a join to a held group is refused with COORDINATOR_LOAD_IN_PROGRESS,
    /// which clients retry. It is asked under this coordinator's lock, so a hold taken
    /// after the check sees the member.
    pub async fn join(&self, join: Join, held: &(dyn Fn(&str) -> bool + Sync)) -> Joined {
        let fail = |error: K, member_id: &str| Joined {
            error: error.code(),
            member_id: member_id.to_string(),
            generation: -1,
            ..Joined::default()
        };
        if join.session < SESSION_TIMEOUT_MIN || join.session > SESSION_TIMEOUT_MAX {
            return fail(K::InvalidSessionTimeout, &join.member_id);
        }
        if join.protocols.is_empty() || join.protocol_type.is_empty() {
            return fail(K::InconsistentGroupProtocol, &join.member_id);
        }
        let member_id = if join.member_id.is_empty() {
            format!(
                "{}-{}-{}",
                if join.client_id.is_empty() {
                    "member"
                } else {
                    id_prefix(&join.client_id)
                },
                std::process::id(),
                self.next_member.fetch_add(1, Ordering::Relaxed)
            )
        } else {
            join.member_id.clone()
        };
        let started = {
            let mut groups = self.lock();
            if held(&join.group) {
                return fail(K::CoordinatorLoadInProgress, &join.member_id);
            }
            if let Some(limit) = self.join_beyond_limits(&groups, &join.group, &member_id) {
                tracing::warn!(group = %join.group, limit, "refused a Kafka join beyond a limit");
                return fail(K::GroupMaxSizeReached, &member_id);
            }
            let group = groups.entry(join.group.clone()).or_insert_with(Group::new);
            if !join.member_id.is_empty() && !group.members.contains_key(&join.member_id) {
                return fail(K::UnknownMemberId, &join.member_id);
            }
            let others_share_a_protocol = group
                .members
                .iter()
                .filter(|(id, _)| **id != member_id)
                .all(|(_, m)| {
                    m.protocols
                        .iter()
                        .any(|(n, _)| join.protocols.iter().any(|(p, _)| p == n))
                });
            if !group.members.is_empty()
                && (group.protocol_type != join.protocol_type || !others_share_a_protocol)
            {
                return fail(K::InconsistentGroupProtocol, &member_id);
            }
            group.protocol_type = join.protocol_type.clone();
            let now = Instant::now();
            let member = group.members.entry(member_id.clone()).or_insert(Member {
                client_id: join.client_id.clone(),
                client_host: join.client_host.clone(),
                session: join.session,
                rebalance: join.rebalance,
                protocols: Vec::new(),
                joined: false,
                waiting: 0,
                last_seen: now,
                assignment: Bytes::new(),
            });
            member.session = join.session;
            member.rebalance = join.rebalance;
            member.protocols = join.protocols;
            member.last_seen = now;
            member.waiting += 1;
            let generation = group.generation;
            group.prepare(now);
            if let Some(member) = group.members.get_mut(&member_id) {
                member.joined = true;
            }
            group.try_complete(now, false);
            generation
        };
        self.changed.notify_waiters();
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let deadline = {
                let mut groups = self.lock();
                let Some(group) = groups.get_mut(&join.group) else {
                    return fail(K::UnknownMemberId, &member_id);
                };
                if group.round.generation > started {
                    if let Some(member) = group.members.get_mut(&member_id) {
                        member.waiting = member.waiting.saturating_sub(1);
                    }
                    let round = &group.round;
                    if !round.members.iter().any(|(id, _)| *id == member_id) {
                        return fail(K::UnknownMemberId, &member_id);
                    }
                    return Joined {
                        error: 0,
                        generation: round.generation,
                        protocol: round.protocol.clone(),
                        protocol_type: group.protocol_type.clone(),
                        leader: round.leader.clone(),
                        members: if round.leader == member_id {
                            round.members.clone()
                        } else {
                            Vec::new()
                        },
                        member_id,
                    };
                }
                if !group.members.contains_key(&member_id) {
                    return fail(K::UnknownMemberId, &member_id);
                }
                let now = Instant::now();
                if group.try_complete(now, true) {
                    drop(groups);
                    self.changed.notify_waiters();
                    continue;
                }
                group.deadline
            };
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }

    /// Serves a SyncGroup: the leader's call stores the assignment; every member's
    /// returns its own once the leader's has arrived. The error code, or the assignment
    /// with the protocol type and name.
    pub async fn sync(
        &self,
        group_name: &str,
        member_id: &str,
        generation: i32,
        assignments: Vec<(String, Bytes)>,
    ) -> Result<(Bytes, String, String), i16> {
        {
            // Dropped with this block: a member waiting below holds no assignments.
            let assignments = assignments;
            let mut groups = self.lock();
            let group = groups
                .get_mut(group_name)
                .ok_or(K::UnknownMemberId.code())?;
            check(group, member_id, generation)?;
            if group.state == State::PreparingRebalance {
                return Err(K::RebalanceInProgress.code());
            }
            if group.round.leader == member_id && group.state == State::CompletingRebalance {
                // Owned copies (not slices of the SyncGroup frame): the members keep them.
                let mut assignments: HashMap<String, Bytes> = assignments.into_iter().collect();
                for (id, member) in group.members.iter_mut() {
                    member.assignment = assignments.remove(id).unwrap_or_default();
                }
                group.state = State::Stable;
            }
            if let Some(member) = group.members.get_mut(member_id) {
                member.waiting += 1;
                member.last_seen = Instant::now();
            }
        }
        self.changed.notify_waiters();
        let answer = loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let deadline = {
                let groups = self.lock();
                let Some(group) = groups.get(group_name) else {
                    return Err(K::UnknownMemberId.code());
                };
                let Some(member) = group.members.get(member_id) else {
                    return Err(K::UnknownMemberId.code());
                };
                if group.generation != generation || group.state == State::PreparingRebalance {
                    break Err(K::RebalanceInProgress.code());
                }
                if group.state == State::Stable {
                    break Ok((
                        member.assignment.clone(),
                        group.protocol_type.clone(),
                        group.round.protocol.clone(),
                    ));
                }
                Instant::now() + member.session
            };
            let _ = tokio::time::timeout_at(deadline, notified).await;
        };
        if let Some(member) = self
            .lock()
            .get_mut(group_name)
            .and_then(|g| g.members.get_mut(member_id))
        {
            member.waiting = member.waiting.saturating_sub(1);
            member.last_seen = Instant::now();
        }
        answer
    }

    /// Serves a Heartbeat: the error code (0, or REBALANCE_IN_PROGRESS to rejoin).
    pub fn heartbeat(&self, group_name: &str, member_id: &str, generation: i32) -> i16 {
        let mut groups = self.lock();
        let Some(group) = groups.get_mut(group_name) else {
            return K::UnknownMemberId.code();
        };
        if let Err(code) = check(group, member_id, generation) {
            return code;
        }
        if let Some(member) = group.members.get_mut(member_id) {
            member.last_seen = Instant::now();
        }
        match group.state {
            State::PreparingRebalance => K::RebalanceInProgress.code(),
            _ => 0,
        }
    }

    /// Serves a LeaveGroup for one member: its error code.
    pub fn leave(&self, group_name: &str, member_id: &str) -> i16 {
        let code = {
            let mut groups = self.lock();
            let Some(group) = groups.get_mut(group_name) else {
                return K::UnknownMemberId.code();
            };
            if group.members.remove(member_id).is_none() {
                return K::UnknownMemberId.code();
            }
            let now = Instant::now();
            if group.members.is_empty() {
                group.state = State::Empty;
            } else {
                group.prepare(now);
                group.try_complete(now, false);
            }
            0
        };
        self.changed.notify_waiters();
        code
    }

    /// Checks a commit of a member at `generation`: the error code otherwise.
    pub fn check_commit(
        &self,
        group_name: &str,
        member_id: &str,
        generation: i32,
    ) -> Result<(), i16> {
        let groups = self.lock();
        let group = groups.get(group_name).ok_or(K::UnknownMemberId.code())?;
        check(group, member_id, generation)
    }

    /// True when the group has Kafka members.
    pub fn has_members(&self, group_name: &str) -> bool {
        self.lock()
            .get(group_name)
            .is_some_and(|g| !g.members.is_empty())
    }

    /// The group, if it has Kafka members.
    pub fn describe(&self, group_name: &str) -> Option<GroupView> {
        let groups = self.lock();
        let group = groups.get(group_name).filter(|g| !g.members.is_empty())?;
        Some(GroupView {
            state: group.state.name(),
            protocol_type: group.protocol_type.clone(),
            protocol: group.round.protocol.clone(),
            members: group
                .members_with(&group.round.protocol)
                .map(|(id, m, metadata)| MemberView {
                    id: id.clone(),
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    metadata,
                    assignment: m.assignment.clone(),
                })
                .collect(),
        })
    }

    /// The group as the gRPC coordinator describes its own, when it has Kafka members:
    /// `strata group describe` and lag show Kafka members and the partitions their
    /// leader assigned them (decoded from the consumer protocol; a member whose
    /// metadata is not the consumer protocol shows none).
    pub fn group_view(&self, group_name: &str) -> Option<crate::groups::coordinator::GroupView> {
        use crate::groups::coordinator::{GroupState, GroupView, MemberView};
        let groups = self.lock();
        let group = groups.get(group_name).filter(|g| !g.members.is_empty())?;
        let consumer = group.protocol_type == "consumer";
        let members = group
            .members_with(&group.round.protocol)
            .map(|(id, m, metadata)| {
                let (topics, assignment) = if consumer {
                    (subscribed(&metadata), assigned(&m.assignment))
                } else {
                    (Vec::new(), Vec::new())
                };
                MemberView {
                    member_id: id.clone(),
                    client_id: m.client_id.clone(),
                    member_epoch: u64::try_from(group.generation).unwrap_or(0),
                    topics,
                    assignment,
                    revoking: Vec::new(),
                    session_timeout: m.session,
                }
            })
            .collect();
        Some(GroupView {
            name: group_name.to_string(),
            state: if group.state == State::Stable {
                GroupState::Stable
            } else {
                GroupState::Reconciling
            },
            epoch: u64::try_from(group.generation).unwrap_or(0),
            members,
        })
    }

    /// Names of the groups with Kafka members.
    pub fn active(&self) -> Vec<(String, &'static str)> {
        self.lock()
            .iter()
            .filter(|(_, g)| !g.members.is_empty())
            .map(|(name, g)| (name.clone(), g.state.name()))
            .collect()
    }

    /// Removes members whose session expired, completes rebalances past their deadline,
    /// ends syncs whose leader sent no assignment in time and forgets empty groups.
    /// Call periodically.
    pub fn tick(&self) {
        self.tick_at(Instant::now());
    }

    /// [`Coordinator::tick`] at `now`.
    fn tick_at(&self, now: Instant) {
        let mut changed = false;
        {
            let mut groups = self.lock();
            for group in groups.values_mut() {
                changed |= group.expire(now);
                changed |= group.end_overdue_sync(now);
                changed |= group.try_complete(now, true);
            }
            groups.retain(|_, g| !g.members.is_empty() || g.state != State::Empty);
        }
        if changed {
            self.changed.notify_waiters();
        }
    }
}

/// The version prefix and body of a consumer protocol message, checked for `assignment`
/// or subscription.
fn consumer_message(bytes: &Bytes, assignment: bool) -> Option<(i16, Bytes)> {
    let version = i16::from_be_bytes([*bytes.first()?, *bytes.get(1)?]).clamp(0, 3);
    let body = bytes.slice(2..);
    super::guard::check_consumer_protocol(assignment, version, &body).ok()?;
    Some((version, body))
}

/// The topics a consumer subscription names.
fn subscribed(metadata: &Bytes) -> Vec<String> {
    use kafka_protocol::messages::ConsumerProtocolSubscription;
    use kafka_protocol::protocol::Decodable;
    consumer_message(metadata, false)
        .and_then(|(version, mut body)| {
            ConsumerProtocolSubscription::decode(&mut body, version).ok()
        })
        .map(|s| s.topics.iter().map(|t| t.to_string()).collect())
        .unwrap_or_default()
}

/// The partitions a consumer assignment gives.
fn assigned(assignment: &Bytes) -> Vec<crate::groups::assign::TopicPartition> {
    use kafka_protocol::messages::ConsumerProtocolAssignment;
    use kafka_protocol::protocol::Decodable;
    consumer_message(assignment, true)
        .and_then(|(version, mut body)| ConsumerProtocolAssignment::decode(&mut body, version).ok())
        .map(|a| {
            a.assigned_partitions
                .iter()
                .flat_map(|tp| {
                    tp.partitions.iter().filter_map(|&p| {
                        Some(crate::groups::assign::TopicPartition::new(
                            tp.topic.0.to_string(),
                            u32::try_from(p).ok()?,
                        ))
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Longest client id prefix of a member id the broker makes, so that the id (with
/// `-<pid>-<n>`) stays within the 255 bytes every later request of the member is held to.
const MEMBER_ID_PREFIX_MAX: usize = 200;

/// `client_id`, cut to at most [`MEMBER_ID_PREFIX_MAX`] bytes at a character boundary.
fn id_prefix(client_id: &str) -> &str {
    let mut end = client_id.len().min(MEMBER_ID_PREFIX_MAX);
    while !client_id.is_char_boundary(end) {
        end -= 1;
    }
    &client_id[..end]
}

fn check(group: &Group, member_id: &str, generation: i32) -> Result<(), i16> {
    if !group.members.contains_key(member_id) {
        return Err(K::UnknownMemberId.code());
    }
    if generation != group.generation {
        return Err(K::IllegalGeneration.code());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(group: &str, member: &str) -> Join {
        Join {
            group: group.into(),
            member_id: member.into(),
            client_id: "c".into(),
            client_host: "/127.0.0.1".into(),
            session: Duration::from_secs(10),
            rebalance: Duration::from_secs(30),
            protocol_type: "consumer".into(),
            protocols: vec![("range".into(), Bytes::from_static(b"m"))],
        }
    }

    /// The leader's member list and DescribeGroups show each member with its metadata
    /// for the chosen protocol, built by one function.
    #[tokio::test]
    async fn the_leader_and_describe_see_the_same_member_list() {
        let c = Coordinator::default();
        let mut first = join("g", "");
        first.protocols = vec![
            ("roundrobin".into(), Bytes::from_static(b"rr")),
            ("range".into(), Bytes::from_static(b"r")),
        ];
        let joined = c.join(first, &|_| false).await;
        assert_eq!(joined.protocol, "roundrobin");
        let view = c.describe("g").expect("the group");
        let described: Vec<(String, Bytes)> = view
            .members
            .into_iter()
            .map(|m| (m.id, m.metadata))
            .collect();
        assert_eq!(described, joined.members);
        assert_eq!(described[0].1, Bytes::from_static(b"rr"));
    }

    #[tokio::test]
    async fn a_member_id_made_from_a_long_client_id_stays_within_255_bytes() {
        let c = Coordinator::default();
        let mut long = join("g", "");
        long.client_id = "é".repeat(127);
        let joined = c.join(long, &|_| false).await;
        assert_eq!(joined.error, 0);
        assert!(joined.member_id.len() <= 255, "{}", joined.member_id);
        assert!(joined.member_id.starts_with(&"é".repeat(100)));
    }

    #[tokio::test]
    async fn joins_beyond_the_group_limits_are_refused() {
        let c = Coordinator::default();
        c.set_limits(1, 1);
        let first = c.join(join("g", ""), &|_| false).await;
        assert_eq!(first.error, 0);
        let code = K::GroupMaxSizeReached.code();
        assert_eq!(
            c.join(join("g", ""), &|_| false).await.error,
            code,
            "a second member"
        );
        assert_eq!(
            c.join(join("h", ""), &|_| false).await.error,
            code,
            "a second group"
        );
        // The member already in rejoins as before.
        assert_eq!(
            c.join(join("g", &first.member_id), &|_| false).await.error,
            0
        );
    }

    #[tokio::test]
    async fn two_members_rebalance_and_get_the_leaders_assignment() {
        let c = std::sync::Arc::new(Coordinator::default());
        let first = c.join(join("g", ""), &|_| false).await;
        assert_eq!((first.error, first.generation), (0, 1));
        assert_eq!(first.leader, first.member_id, "alone, it leads");
        assert_eq!(first.members.len(), 1);
        let sync = c
            .sync(
                "g",
                &first.member_id,
                1,
                vec![(first.member_id.clone(), Bytes::from_static(b"all"))],
            )
            .await;
        assert_eq!(sync.map(|s| s.0), Ok(Bytes::from_static(b"all")));
        assert_eq!(c.heartbeat("g", &first.member_id, 1), 0);
        // A second member starts a rebalance; the first learns of it by heartbeat.
        let second = tokio::spawn({
            let c = std::sync::Arc::clone(&c);
            async move { c.join(join("g", ""), &|_| false).await }
        });
        let mut heartbeat = 0;
        for _ in 0..1000 {
            heartbeat = c.heartbeat("g", &first.member_id, 1);
            if heartbeat != 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(heartbeat, K::RebalanceInProgress.code());
        let rejoined = c.join(join("g", &first.member_id), &|_| false).await;
        let second = second.await.expect("joined");
        assert_eq!((rejoined.generation, second.generation), (2, 2));
        assert_eq!(rejoined.leader, first.member_id, "the leader stays");
        assert_eq!(rejoined.members.len(), 2);
        assert!(
            second.members.is_empty(),
            "only the leader gets the members"
        );
        let follower = tokio::spawn({
            let c = std::sync::Arc::clone(&c);
            let id = second.member_id.clone();
            async move { c.sync("g", &id, 2, Vec::new()).await }
        });
        let leader = c
            .sync(
                "g",
                &first.member_id,
                2,
                vec![
                    (first.member_id.clone(), Bytes::from_static(b"p0")),
                    (second.member_id.clone(), Bytes::from_static(b"p1")),
                ],
            )
            .await;
        assert_eq!(leader.map(|s| s.0), Ok(Bytes::from_static(b"p0")));
        let follower = follower.await.expect("synced");
        assert_eq!(follower.map(|s| s.0), Ok(Bytes::from_static(b"p1")));
        // Stale generations and unknown members are refused; leaving rebalances.
        assert_eq!(
            c.heartbeat("g", &first.member_id, 1),
            K::IllegalGeneration.code()
        );
        assert_eq!(c.heartbeat("g", "nobody", 2), K::UnknownMemberId.code());
        assert_eq!(c.check_commit("g", &second.member_id, 2), Ok(()));
        assert_eq!(c.leave("g", &second.member_id), 0);
        assert_eq!(
            c.heartbeat("g", &first.member_id, 2),
            K::RebalanceInProgress.code()
        );
        let alone = c.join(join("g", &first.member_id), &|_| false).await;
        assert_eq!(
            (alone.error, alone.generation, alone.members.len()),
            (0, 3, 1)
        );
    }

    #[tokio::test]
    async fn a_join_with_another_protocol_or_a_bad_session_is_refused() {
        let c = Coordinator::default();
        let first = c.join(join("g", ""), &|_| false).await;
        assert_eq!(first.error, 0);
        let mut other = join("g", "");
        other.protocols = vec![("sticky-only".into(), Bytes::new())];
        assert_eq!(
            c.join(other, &|_| false).await.error,
            K::InconsistentGroupProtocol.code()
        );
        let mut short = join("g", "");
        short.session = Duration::from_millis(10);
        assert_eq!(
            c.join(short, &|_| false).await.error,
            K::InvalidSessionTimeout.code()
        );
        assert_eq!(
            c.join(join("g", "made-up"), &|_| false).await.error,
            K::UnknownMemberId.code()
        );
    }

    #[tokio::test]
    async fn a_leader_that_never_syncs_is_removed_after_the_rebalance_timeout() {
        let c = std::sync::Arc::new(Coordinator::default());
        let quick = |member: &str| Join {
            rebalance: Duration::from_secs(1),
            ..join("g", member)
        };
        let first = c.join(quick(""), &|_| false).await;
        let synced = c
            .sync(
                "g",
                &first.member_id,
                1,
                vec![(first.member_id.clone(), Bytes::new())],
            )
            .await;
        assert!(synced.is_ok());
        let second = tokio::spawn({
            let c = std::sync::Arc::clone(&c);
            async move { c.join(quick(""), &|_| false).await }
        });
        let mut rejoined = Joined::default();
        for _ in 0..1000 {
            if c.heartbeat("g", &first.member_id, 1) != 0 {
                rejoined = c.join(quick(&first.member_id), &|_| false).await;
                break;
            }
            tokio::task::yield_now().await;
        }
        let second = second.await.expect("joined");
        assert_eq!(
            (rejoined.generation, rejoined.leader.as_str()),
            (2, first.member_id.as_str())
        );
        // The follower waits for an assignment the leader never sends; the leader
        // heartbeats all along, so its session does not expire.
        let follower = tokio::spawn({
            let c = std::sync::Arc::clone(&c);
            let id = second.member_id.clone();
            async move { c.sync("g", &id, 2, Vec::new()).await }
        });
        assert_eq!(c.heartbeat("g", &first.member_id, 2), 0);
        c.tick_at(Instant::now() + Duration::from_secs(2));
        let view = c.describe("g").expect("the group");
        assert_eq!(view.state, "PreparingRebalance");
        assert_eq!(view.members.len(), 1, "the leader is removed");
        assert_eq!(view.members[0].id, second.member_id);
        assert_eq!(
            follower.await.expect("synced"),
            Err(K::RebalanceInProgress.code())
        );
        assert_eq!(
            c.heartbeat("g", &first.member_id, 2),
            K::UnknownMemberId.code()
        );
    }
}
