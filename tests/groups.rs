//! Consumer groups against the real `strata` binary, over raw gRPC: members join,
//! heartbeat with what they hold, process their partitions with fenced fetches, commit,
//! and give partitions up when told to (the client side of the protocol, played by
//! [`TestMember`]). The tests check what the protocol promises: a partition never has
//! two owners, a settled group is balanced and sticky, no record is lost, silent members
//! lose their partitions within their session timeout and are fenced, committed offsets
//! survive a crash, and bad requests get clear statuses without changing anything.
//!
//! Every wait polls for a condition with a generous deadline; the one assertion on
//! elapsed time is the session timeout, a bound the protocol states.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::common::*;
use strata_proto::v1::{
    self, admin_client::AdminClient, broker_client::BrokerClient, groups_client::GroupsClient,
};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// How long a poll waits for a condition before failing. Never reached when things
/// work; the conditions normally hold within a few heartbeats.
const DEADLINE: Duration = Duration::from_secs(30);
/// Pause between polls, so a poll loop does not hammer the broker.
const POLL_PAUSE: Duration = Duration::from_millis(20);
const TOPIC: &str = "orders";
const PARTITIONS: u32 = 6;

/// Asserts that `result` failed with `code` and a readable explanation.
fn expect_status<T: std::fmt::Debug>(result: Result<T, Status>, code: Code, what: &str) {
    match result {
        Ok(value) => panic!("{what}: expected {code:?}, got {value:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{what}: {status:?}");
            assert!(
                !status.message().is_empty() && !status.message().contains("  "),
                "{what}: an empty or garbled message: {:?}",
                status.message()
            );
        }
    }
}

/// [`expect_status`] for an RPC's answer.
fn expect_code<T: std::fmt::Debug>(
    result: Result<tonic::Response<T>, Status>,
    code: Code,
    what: &str,
) {
    expect_status(result.map(tonic::Response::into_inner), code, what);
}

fn topic_partitions(topic: &str, partitions: impl IntoIterator<Item = u32>) -> v1::TopicPartitions {
    v1::TopicPartitions {
        topic: topic.to_string(),
        partitions: partitions.into_iter().collect(),
    }
}

/// The partitions of `topic` in an assignment.
fn partitions_of(of: &[v1::TopicPartitions], topic: &str) -> BTreeSet<u32> {
    of.iter()
        .filter(|t| t.topic == topic)
        .flat_map(|t| t.partitions.iter().copied())
        .collect()
}

fn position(topic: &str, partition: u32, offset: u64) -> v1::PartitionOffset {
    v1::PartitionOffset {
        topic: topic.to_string(),
        partition,
        offset,
        ..Default::default()
    }
}

fn commit_request(
    group: &str,
    member_id: &str,
    member_epoch: u64,
    offsets: Vec<v1::PartitionOffset>,
) -> v1::CommitOffsetsRequest {
    v1::CommitOffsetsRequest {
        group: group.to_string(),
        member_id: member_id.to_string(),
        member_epoch,
        offsets,
    }
}

fn join_request(group: &str, topic: &str, session_timeout_ms: u32) -> v1::HeartbeatRequest {
    v1::HeartbeatRequest {
        group: group.to_string(),
        topics: vec![topic.to_string()],
        session_timeout_ms,
        client_id: "join-test".to_string(),
        ..Default::default()
    }
}

async fn describe(admin: &mut AdminClient<Channel>, group: &str) -> v1::DescribeGroupResponse {
    admin
        .describe_group(v1::DescribeGroupRequest {
            group: group.to_string(),
        })
        .await
        .unwrap_or_else(|e| panic!("describe group {group}: {e:?}"))
        .into_inner()
}

async fn list_groups(admin: &mut AdminClient<Channel>) -> Vec<v1::GroupSummary> {
    admin
        .list_groups(v1::ListGroupsRequest {})
        .await
        .expect("list groups")
        .into_inner()
        .groups
}

fn state(d: &v1::DescribeGroupResponse) -> v1::GroupState {
    d.group.as_ref().expect("a group summary").state()
}

/// A group's committed offsets of `topic`, by partition.
async fn committed(
    groups: &mut GroupsClient<Channel>,
    group: &str,
    topic: &str,
) -> BTreeMap<u32, u64> {
    committed_offsets(groups, group)
        .await
        .into_iter()
        .filter(|o| o.topic == topic)
        .map(|o| (o.partition, o.offset))
        .collect()
}

/// Every committed offset of a group, as FetchOffsets returns them.
async fn committed_offsets(
    groups: &mut GroupsClient<Channel>,
    group: &str,
) -> Vec<v1::PartitionOffset> {
    groups
        .fetch_offsets(v1::FetchOffsetsRequest {
            group: group.to_string(),
            partitions: Vec::new(),
        })
        .await
        .unwrap_or_else(|e| panic!("fetch offsets of {group}: {e:?}"))
        .into_inner()
        .offsets
}

/// Produces `count` records to every partition of `topic`, tagged with `tag`.
async fn produce_everywhere(
    data: &mut BrokerClient<Channel>,
    topic: &str,
    partitions: u32,
    count: usize,
    tag: &str,
) {
    for p in 0..partitions {
        let records = (0..count)
            .map(|i| record(None, format!("{tag}-{p}-{i}").as_bytes()))
            .collect();
        data.produce(produce_records(topic, p, records))
            .await
            .unwrap_or_else(|e| panic!("produce to {topic}/{p}: {e:?}"));
    }
}

/// Creates a topic with the broker's default settings.
async fn create(admin: &mut AdminClient<Channel>, topic: &str, partitions: u32) {
    create_topic(admin, topic, partitions, v1::TopicConfig::default()).await;
}

/// Fails the test with `context()` once the deadline has passed.
fn check_deadline(start: Instant, what: &str, context: impl FnOnce() -> String) {
    if start.elapsed() > DEADLINE {
        panic!("{what}: not within {DEADLINE:?}; {}", context());
    }
}

/// A group member driven over raw gRPC, playing the client side of the protocol:
/// it heartbeats with every partition it holds; starts a newly assigned partition at
/// its committed offset (earliest without one); processes records with fetches fenced
/// by its membership, committing after each pass (at least once); and when a partition
/// is taken away it commits it, drops it and heartbeats again at once to release it.
struct TestMember {
    name: String,
    group: String,
    topic: String,
    session_timeout_ms: u32,
    groups: GroupsClient<Channel>,
    data: BrokerClient<Channel>,
    member_id: String,
    epoch: u64,
    /// Partitions held (assigned, or taken away and not yet released), with the next
    /// offset to process.
    held: BTreeMap<u32, u64>,
    /// Every partition it was given, with the position it started at.
    grants: Vec<(u32, u64)>,
    /// Every record it processed, as (partition, offset), in order.
    processed: Vec<(u32, u64)>,
}

impl TestMember {
    /// Joins `group` to consume `topic`.
    async fn join(
        broker: &Broker,
        name: &str,
        group: &str,
        topic: &str,
        session_timeout_ms: u32,
    ) -> TestMember {
        let mut member = TestMember {
            name: name.to_string(),
            group: group.to_string(),
            topic: topic.to_string(),
            session_timeout_ms,
            groups: broker.groups().await,
            data: broker.client().await,
            member_id: String::new(),
            epoch: 0,
            held: BTreeMap::new(),
            grants: Vec::new(),
            processed: Vec::new(),
        };
        member.rejoin().await;
        member
    }

    /// New connections to `broker` (after it restarted on a new port).
    async fn reconnect(&mut self, broker: &Broker) {
        self.groups = broker.groups().await;
        self.data = broker.client().await;
    }

    /// Joins again with an empty member id, as a member must after a heartbeat got
    /// FAILED_PRECONDITION: everything it held is dropped WITHOUT committing, since
    /// another member may own it now.
    async fn rejoin(&mut self) {
        self.held.clear();
        self.member_id.clear();
        self.epoch = 0;
        let request = v1::HeartbeatRequest {
            client_id: self.name.clone(),
            ..join_request(&self.group, &self.topic, self.session_timeout_ms)
        };
        let reply = self
            .groups
            .heartbeat(request)
            .await
            .unwrap_or_else(|e| panic!("{} joins {}: {e:?}", self.name, self.group))
            .into_inner();
        assert!(
            !reply.member_id.is_empty() && reply.member_epoch >= 1,
            "{}: a join answers with an id and an epoch: {reply:?}",
            self.name
        );
        assert!(
            reply.heartbeat_interval_ms > 0,
            "{}: a join answers with a heartbeat interval: {reply:?}",
            self.name
        );
        self.member_id = reply.member_id.clone();
        let again = self.apply(reply).await;
        assert!(!again, "{}: a join takes nothing away", self.name);
    }

    fn fence(&self) -> v1::GroupMember {
        v1::GroupMember {
            group: self.group.clone(),
            member_id: self.member_id.clone(),
            member_epoch: self.epoch,
        }
    }

    fn owned(&self) -> Vec<v1::TopicPartitions> {
        if self.held.is_empty() {
            return Vec::new();
        }
        vec![topic_partitions(&self.topic, self.held.keys().copied())]
    }

    /// One heartbeat. Ok(true) when it had to give partitions up: it committed and
    /// dropped them, and must heartbeat again at once to release them.
    async fn heartbeat(&mut self) -> Result<bool, Status> {
        let reply = self
            .groups
            .heartbeat(v1::HeartbeatRequest {
                group: self.group.clone(),
                member_id: self.member_id.clone(),
                member_epoch: self.epoch,
                owned: self.owned(),
                ..Default::default()
            })
            .await?
            .into_inner();
        assert_eq!(
            reply.member_id, self.member_id,
            "{}: the id stays",
            self.name
        );
        Ok(self.apply(reply).await)
    }

    /// Heartbeats until nothing more is to be released; panics on an error.
    async fn beat(&mut self) {
        while self
            .heartbeat()
            .await
            .unwrap_or_else(|e| panic!("{}: heartbeat: {e:?}", self.name))
        {}
    }

    /// Diffs the assignment of a heartbeat answer with what the member holds.
    async fn apply(&mut self, reply: v1::HeartbeatResponse) -> bool {
        assert!(
            reply.member_epoch >= self.epoch,
            "{}: the epoch went back from {} to {}",
            self.name,
            self.epoch,
            reply.member_epoch
        );
        assert!(
            reply.assignment.iter().all(|t| t.topic == self.topic),
            "{}: assigned a topic it does not consume: {reply:?}",
            self.name
        );
        self.epoch = reply.member_epoch;
        let assigned = partitions_of(&reply.assignment, &self.topic);
        let revoked: Vec<u32> = self
            .held
            .keys()
            .filter(|p| !assigned.contains(p))
            .copied()
            .collect();
        if !revoked.is_empty() {
            // Still ours until released, so the commit must be accepted.
            self.commit(&revoked).await.unwrap_or_else(|e| {
                panic!(
                    "{}: commit of partitions being taken away {revoked:?}: {e:?}",
                    self.name
                )
            });
            for p in &revoked {
                self.held.remove(p);
            }
        }
        for p in assigned {
            if !self.held.contains_key(&p) {
                let start = self.committed_offset(p).await.unwrap_or(0);
                self.held.insert(p, start);
                self.grants.push((p, start));
            }
        }
        !revoked.is_empty()
    }

    async fn committed_offset(&mut self, partition: u32) -> Option<u64> {
        let offsets = self
            .groups
            .fetch_offsets(v1::FetchOffsetsRequest {
                group: self.group.clone(),
                partitions: vec![topic_partitions(&self.topic, [partition])],
            })
            .await
            .unwrap_or_else(|e| panic!("{}: fetch offsets: {e:?}", self.name))
            .into_inner()
            .offsets;
        assert!(offsets.len() <= 1, "asked for one partition: {offsets:?}");
        offsets.first().map(|o| o.offset)
    }

    /// A fetch of `partition` at `offset`, fenced by the membership.
    async fn fetch(&mut self, partition: u32, offset: u64) -> Result<v1::FetchResponse, Status> {
        let request = v1::FetchRequest {
            member: Some(self.fence()),
            ..fetch_request(&self.topic, partition, offset, true)
        };
        Ok(self.data.fetch(request).await?.into_inner())
    }

    /// Processes at most `max_records` records of every held partition (all up to the
    /// high watermark when it is `u64::MAX`), without committing.
    async fn process_at_most(&mut self, max_records: u64) {
        let held: Vec<u32> = self.held.keys().copied().collect();
        for p in held {
            self.process_partition(p, max_records).await;
        }
    }

    /// Processes at most `max_records` records of a held partition from its position,
    /// without committing.
    async fn process_partition(&mut self, p: u32, max_records: u64) {
        let mut at = self.held[&p];
        let mut taken = 0;
        while taken < max_records {
            let response = self
                .fetch(p, at)
                .await
                .unwrap_or_else(|e| panic!("{}: fetch {p} at {at}: {e:?}", self.name));
            if at >= response.high_watermark {
                break;
            }
            assert!(
                !response.records.is_empty(),
                "{}: a fetch of {p} at {at} below the high watermark returned nothing",
                self.name
            );
            for r in &response.records {
                if taken == max_records {
                    break;
                }
                assert_eq!(
                    r.offset, at,
                    "{}: partition {p} skipped or repeated an offset",
                    self.name
                );
                self.processed.push((p, r.offset));
                at += 1;
                taken += 1;
            }
        }
        self.held.insert(p, at);
    }

    /// Processes everything available and commits it.
    async fn process(&mut self) {
        self.process_at_most(u64::MAX).await;
        let all: Vec<u32> = self.held.keys().copied().collect();
        if !all.is_empty() {
            self.commit(&all)
                .await
                .unwrap_or_else(|e| panic!("{}: commit {all:?}: {e:?}", self.name));
        }
    }

    /// Commits the positions of `partitions`.
    async fn commit(&mut self, partitions: &[u32]) -> Result<Vec<v1::PartitionOffset>, Status> {
        let offsets = partitions
            .iter()
            .map(|p| position(&self.topic, *p, self.held[p]))
            .collect();
        let request = commit_request(&self.group, &self.member_id, self.epoch, offsets);
        Ok(self
            .groups
            .commit_offsets(request)
            .await?
            .into_inner()
            .offsets)
    }

    /// Commits everything processed, then leaves.
    async fn leave(&mut self) {
        self.process().await;
        self.groups
            .leave_group(v1::LeaveGroupRequest {
                group: self.group.clone(),
                member_id: self.member_id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("{}: leave: {e:?}", self.name));
        self.held.clear();
    }
}

/// Asserts that no partition has two owners, as the members see it (what they hold,
/// revoked or not) and as the broker sees it (assignment and revoking sets), and that
/// whatever a member holds the broker counts as that member's.
async fn assert_single_owners(
    admin: &mut AdminClient<Channel>,
    members: &[TestMember],
    step: &str,
) {
    let d = describe(admin, &members[0].group).await;
    let mut held_by: BTreeMap<u32, &str> = BTreeMap::new();
    for m in members {
        for p in m.held.keys() {
            if let Some(other) = held_by.insert(*p, &m.name) {
                panic!(
                    "{step}: partition {p} is held by both {other} and {}; broker: {d:#?}",
                    m.name
                );
            }
        }
    }
    let mut owned_by: BTreeMap<u32, &str> = BTreeMap::new();
    for info in &d.members {
        let owned = partitions_of(&info.assignment, TOPIC)
            .into_iter()
            .chain(partitions_of(&info.revoking, TOPIC));
        for p in owned {
            if let Some(other) = owned_by.insert(p, &info.member_id) {
                panic!(
                    "{step}: the broker gives partition {p} to {other} and to {}: {d:#?}",
                    info.member_id
                );
            }
        }
    }
    for m in members {
        for p in m.held.keys() {
            assert_eq!(
                owned_by.get(p).copied(),
                Some(m.member_id.as_str()),
                "{step}: {} holds partition {p} the broker does not count as its: {d:#?}",
                m.name
            );
        }
    }
}

/// One heartbeat round: every member heartbeats (and again at once after giving
/// partitions up), then processes and commits. Ownership is checked after every
/// heartbeat. Newest first, members waiting for partitions ask before the members that
/// must give them up have released them.
async fn round(
    admin: &mut AdminClient<Channel>,
    members: &mut [TestMember],
    step: &str,
    newest_first: bool,
) {
    let mut order: Vec<usize> = (0..members.len()).collect();
    if newest_first {
        order.reverse();
    }
    for i in order {
        loop {
            let again = members[i]
                .heartbeat()
                .await
                .unwrap_or_else(|e| panic!("{step}: heartbeat of {}: {e:?}", members[i].name));
            assert_single_owners(admin, members, step).await;
            if !again {
                break;
            }
        }
        members[i].process().await;
    }
}

/// Runs heartbeat rounds until the group is STABLE, then checks the settled
/// assignment: every partition has exactly one owner, counts differ by at most one, and
/// each member holds exactly what the broker assigns it. Returns each member's set.
async fn settle(
    admin: &mut AdminClient<Channel>,
    members: &mut [TestMember],
    step: &str,
) -> BTreeMap<String, BTreeSet<u32>> {
    let start = Instant::now();
    let mut rounds = 0;
    let d = loop {
        round(admin, members, step, rounds % 2 == 0).await;
        rounds += 1;
        let d = describe(admin, &members[0].group).await;
        if state(&d) == v1::GroupState::Stable {
            break d;
        }
        check_deadline(start, &format!("{step}: the group settles"), || {
            format!("last description: {d:#?}")
        });
        tokio::time::sleep(POLL_PAUSE).await;
    };
    assert_eq!(d.members.len(), members.len(), "{step}: {d:#?}");
    let mut owners = vec![0; PARTITIONS as usize];
    let mut sets = BTreeMap::new();
    for m in members.iter() {
        let info = d
            .members
            .iter()
            .find(|i| i.member_id == m.member_id)
            .unwrap_or_else(|| panic!("{step}: {} is not described: {d:#?}", m.name));
        assert!(
            info.revoking.is_empty(),
            "{step}: stable yet revoking: {d:#?}"
        );
        let assigned = partitions_of(&info.assignment, TOPIC);
        let held: BTreeSet<u32> = m.held.keys().copied().collect();
        assert_eq!(
            held, assigned,
            "{step}: {} holds other partitions than assigned",
            m.name
        );
        for p in &assigned {
            owners[*p as usize] += 1;
        }
        sets.insert(m.name.clone(), assigned);
    }
    assert!(
        owners.iter().all(|&n| n == 1),
        "{step}: owners per partition {owners:?}: {d:#?}"
    );
    let counts: Vec<usize> = sets.values().map(BTreeSet::len).collect();
    let (min, max) = (counts.iter().min(), counts.iter().max());
    assert!(
        max.zip(min).is_some_and(|(max, min)| max - min <= 1),
        "{step}: unbalanced {sets:?}"
    );
    for info in &d.partitions {
        let owner = members
            .iter()
            .find(|m| m.held.contains_key(&info.partition))
            .expect("every partition has an owner");
        assert_eq!(info.member_id, owner.member_id, "{step}: owner of {info:?}");
    }
    sets
}

/// Asserts that every member present in both `before` and `after` kept its
/// partitions: its new set contains its old one or is contained in it.
fn assert_sticky(
    before: &BTreeMap<String, BTreeSet<u32>>,
    after: &BTreeMap<String, BTreeSet<u32>>,
    step: &str,
) {
    for (name, now) in after {
        if let Some(then) = before.get(name) {
            assert!(
                now.is_subset(then) || now.is_superset(then),
                "{step}: {name} went from {then:?} to {now:?}"
            );
        }
    }
}

/// Guards the heart of the protocol through 1 → 3 → 2 → 1 members of a 6-partition
/// topic, with records produced before every step: after every single heartbeat no
/// partition has two owners (counting revoked partitions not yet released); a settled
/// group gives each partition exactly one owner, balanced, and members that stay keep
/// their partitions; and with commits after processing and on revocation, every record
/// is processed at least once and the committed offsets end at the high watermarks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalancing_one_three_two_one_members_never_shares_or_loses_a_partition() {
    let broker = Broker::start();
    let mut admin = broker.admin().await;
    let mut data = broker.client().await;
    let mut groups = broker.groups().await;
    create(&mut admin, TOPIC, PARTITIONS).await;
    let group = "billing";

    produce_everywhere(&mut data, TOPIC, PARTITIONS, 10, "one").await;
    let mut members = vec![TestMember::join(&broker, "a", group, TOPIC, 0).await];
    let one = settle(&mut admin, &mut members, "one member").await;
    assert_eq!(one["a"].len(), PARTITIONS as usize);

    produce_everywhere(&mut data, TOPIC, PARTITIONS, 10, "three").await;
    members.push(TestMember::join(&broker, "b", group, TOPIC, 0).await);
    assert_single_owners(&mut admin, &members, "b joined").await;
    members.push(TestMember::join(&broker, "c", group, TOPIC, 0).await);
    assert_single_owners(&mut admin, &members, "c joined").await;
    let three = settle(&mut admin, &mut members, "three members").await;
    assert_sticky(&one, &three, "one to three");

    produce_everywhere(&mut data, TOPIC, PARTITIONS, 10, "two").await;
    let mut b = members.remove(1);
    b.leave().await;
    assert_single_owners(&mut admin, &members, "b left").await;
    let two = settle(&mut admin, &mut members, "two members").await;
    assert_sticky(&three, &two, "three to two");

    produce_everywhere(&mut data, TOPIC, PARTITIONS, 10, "back to one").await;
    let mut a = members.remove(0);
    a.leave().await;
    assert_single_owners(&mut admin, &members, "a left").await;
    let last = settle(&mut admin, &mut members, "one member again").await;
    assert_sticky(&two, &last, "two to one");
    assert_eq!(last["c"].len(), PARTITIONS as usize);
    members[0].process().await;

    // Nothing lost: every record was processed by someone, and the group committed
    // everything.
    let ends = high_watermarks(&mut admin, TOPIC).await;
    let mut processed: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
    for (p, offset) in a
        .processed
        .iter()
        .chain(&b.processed)
        .chain(&members[0].processed)
    {
        processed.entry(*p).or_default().insert(*offset);
    }
    for p in 0..PARTITIONS {
        let expected: BTreeSet<u64> = (0..ends[p as usize]).collect();
        assert_eq!(
            processed.get(&p),
            Some(&expected),
            "partition {p}: processed offsets"
        );
    }
    let end_map: BTreeMap<u32, u64> = (0..PARTITIONS).zip(ends.iter().copied()).collect();
    assert_eq!(committed(&mut groups, group, TOPIC).await, end_map);
    let d = describe(&mut admin, group).await;
    assert_eq!(d.total_lag, 0, "{d:#?}");
}

/// Guards session expiry and zombie fencing: a member that stops heartbeating without
/// leaving loses its partitions to the other member within its session timeout, which
/// starts them at the victim's committed offsets; the victim's late commit, fenced
/// fetch and heartbeat all get FAILED_PRECONDITION and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_member_loses_its_partitions_within_its_session_and_is_fenced() {
    const SESSION_TIMEOUT_MS: u32 = 2000;
    let broker = Broker::start();
    let mut admin = broker.admin().await;
    let mut data = broker.client().await;
    let mut groups = broker.groups().await;
    create(&mut admin, TOPIC, PARTITIONS).await;
    let group = "shipping";
    produce_everywhere(&mut data, TOPIC, PARTITIONS, 10, "before").await;

    let mut members = vec![
        TestMember::join(&broker, "survivor", group, TOPIC, SESSION_TIMEOUT_MS).await,
        TestMember::join(&broker, "victim", group, TOPIC, SESSION_TIMEOUT_MS).await,
    ];
    settle(&mut admin, &mut members, "two members").await;
    let mut victim = members.pop().expect("the victim");
    let mut survivor = members.pop().expect("the survivor");
    let victims: BTreeSet<u32> = victim.held.keys().copied().collect();
    assert_eq!(victims.len(), 3);

    // The victim's last heartbeat; then it processes more without committing, and goes
    // silent.
    victim.beat().await;
    let last_heartbeat = Instant::now();
    produce_everywhere(&mut data, TOPIC, PARTITIONS, 5, "after").await;
    victim.process_at_most(2).await;
    let committed_before = committed(&mut groups, group, TOPIC).await;

    let grants_before = survivor.grants.len();
    let start = Instant::now();
    while survivor.held.len() < PARTITIONS as usize {
        survivor.beat().await;
        check_deadline(start, "the survivor takes the victim's partitions", || {
            format!("survivor holds {:?}", survivor.held)
        });
        tokio::time::sleep(POLL_PAUSE).await;
    }
    let took = last_heartbeat.elapsed();
    // A protocol bound, not a performance guess: a member without a heartbeat for its
    // session timeout is removed and its partitions are free at once; the broker checks
    // sessions every 100 ms and the survivor heartbeats every few tens of ms, so 2 s of
    // slack is generous.
    let bound = Duration::from_millis(SESSION_TIMEOUT_MS.into()) + Duration::from_secs(2);
    assert!(
        took <= bound,
        "the victim's partitions moved {took:?} after its last heartbeat; the bound is {bound:?}"
    );
    let taken_over = &survivor.grants[grants_before..];
    assert_eq!(
        taken_over
            .iter()
            .map(|(p, _)| *p)
            .collect::<BTreeSet<u32>>(),
        victims
    );
    for (p, start) in taken_over {
        assert_eq!(
            Some(start),
            committed_before.get(p),
            "the survivor starts {p} at the victim's committed offset"
        );
    }

    // The zombie is fenced everywhere, and nothing it tries changes anything.
    let taken: Vec<u32> = victims.iter().copied().collect();
    expect_status(
        victim.commit(&taken).await,
        Code::FailedPrecondition,
        "zombie commit",
    );
    expect_status(
        victim.fetch(taken[0], 0).await,
        Code::FailedPrecondition,
        "zombie fetch",
    );
    expect_status(
        victim.heartbeat().await,
        Code::FailedPrecondition,
        "zombie heartbeat",
    );
    assert_eq!(committed(&mut groups, group, TOPIC).await, committed_before);
    let d = describe(&mut admin, group).await;
    assert_eq!(d.members.len(), 1, "{d:#?}");
    assert_eq!(d.members[0].member_id, survivor.member_id);
    // The survivor processes what the victim had not committed, at least once.
    survivor.process().await;
    let ends = high_watermarks(&mut admin, TOPIC).await;
    let end_map: BTreeMap<u32, u64> = (0..PARTITIONS).zip(ends.iter().copied()).collect();
    assert_eq!(committed(&mut groups, group, TOPIC).await, end_map);
}

/// Guards the durability of groups: committed offsets (with their metadata and commit
/// times) and what DescribeGroup and ListGroups show of them survive a SIGKILL of the
/// broker; the members do not (they are soft state), so the old member's next
/// heartbeat gets FAILED_PRECONDITION.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_offsets_and_group_descriptions_survive_a_crash() {
    let mut broker = Broker::start();
    let mut admin = broker.admin().await;
    let mut data = broker.client().await;
    let mut groups = broker.groups().await;
    create(&mut admin, TOPIC, PARTITIONS).await;
    for p in 0..PARTITIONS {
        let records = (0..3 * p + 2)
            .map(|i| record(None, format!("{p}-{i}").as_bytes()))
            .collect();
        data.produce(produce_records(TOPIC, p, records))
            .await
            .expect("produce");
    }
    let mut member = TestMember::join(&broker, "a", "billing", TOPIC, 0).await;
    assert_eq!(member.held.len(), PARTITIONS as usize);
    let offsets: Vec<v1::PartitionOffset> = (0..PARTITIONS)
        .map(|p| v1::PartitionOffset {
            metadata: format!("note {p}"),
            ..position(TOPIC, p, u64::from(2 * p))
        })
        .collect();
    member
        .groups
        .commit_offsets(commit_request(
            "billing",
            &member.member_id,
            member.epoch,
            offsets,
        ))
        .await
        .expect("member commit");
    // A group committed from outside, with no members at all.
    groups
        .commit_offsets(commit_request("audit", "", 0, vec![position(TOPIC, 1, 4)]))
        .await
        .expect("outsider commit");

    let billing_before = describe(&mut admin, "billing").await;
    let audit_before = describe(&mut admin, "audit").await;
    let offsets_before = committed_offsets(&mut groups, "billing").await;
    assert_eq!(offsets_before.len(), PARTITIONS as usize);
    assert_eq!(
        billing_before.total_lag,
        (0..PARTITIONS).map(|p| u64::from(p + 2)).sum::<u64>()
    );

    broker.kill();
    broker.restart();
    let mut admin = broker.admin().await;
    let mut groups = broker.groups().await;
    member.reconnect(&broker).await;

    assert_eq!(
        committed_offsets(&mut groups, "billing").await,
        offsets_before
    );
    let billing_after = describe(&mut admin, "billing").await;
    // The same partitions, no longer owned: the member is gone.
    let unowned: Vec<v1::GroupPartitionInfo> = billing_before
        .partitions
        .iter()
        .map(|p| {
            assert_eq!(p.member_id, member.member_id, "owned before: {p:?}");
            v1::GroupPartitionInfo {
                member_id: String::new(),
                ..p.clone()
            }
        })
        .collect();
    assert_eq!(billing_after.partitions, unowned);
    assert_eq!(billing_after.total_lag, billing_before.total_lag);
    assert!(
        billing_after.members.is_empty(),
        "members are soft state: {billing_after:#?}"
    );
    assert_eq!(state(&billing_after), v1::GroupState::Empty);
    assert_eq!(describe(&mut admin, "audit").await, audit_before);
    let listed = list_groups(&mut admin).await;
    let names: Vec<(&str, v1::GroupState, u32)> = listed
        .iter()
        .map(|g| (g.group.as_str(), g.state(), g.members))
        .collect();
    assert_eq!(
        names,
        [
            ("audit", v1::GroupState::Empty, 0),
            ("billing", v1::GroupState::Empty, 0)
        ]
    );
    expect_status(
        member.heartbeat().await,
        Code::FailedPrecondition,
        "heartbeat of a member from before the restart",
    );
}

/// Guards the group epoch through a time without members: it only increases
/// (docs/protocol.md), so a group whose last member left is EMPTY with the epoch it
/// reached (it used to show 0), and the next member moves it on from there. (That a
/// group that never committed is gone once its members are is checked with the other
/// bad requests below.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_group_keeps_its_epoch() {
    let broker = Broker::start();
    let mut admin = broker.admin().await;
    create(&mut admin, TOPIC, PARTITIONS).await;
    let epoch = |d: &v1::DescribeGroupResponse| d.group.as_ref().map_or(0, |g| g.epoch);

    let mut first = TestMember::join(&broker, "first", "billing", TOPIC, 0).await;
    let active = describe(&mut admin, "billing").await;
    assert!(epoch(&active) >= 1, "{active:#?}");
    first.leave().await;
    let empty = describe(&mut admin, "billing").await;
    assert_eq!(state(&empty), v1::GroupState::Empty);
    assert!(
        epoch(&empty) > epoch(&active),
        "the epoch went from {} to {} when the group became empty",
        epoch(&active),
        epoch(&empty)
    );
    let listed = list_groups(&mut admin).await;
    assert_eq!(
        listed
            .iter()
            .map(|g| (g.group.as_str(), g.epoch))
            .collect::<Vec<_>>(),
        [("billing", epoch(&empty))]
    );
    let _second = TestMember::join(&broker, "second", "billing", TOPIC, 0).await;
    let again = describe(&mut admin, "billing").await;
    assert!(epoch(&again) > epoch(&empty), "{again:#?}");
}

/// Guards resuming after a crash: a member processes part of each partition and
/// commits, processes further without committing, and the broker is SIGKILLed. After
/// the restart its heartbeat gets FAILED_PRECONDITION; it rejoins without committing,
/// and reads every partition again from exactly its committed offset: nothing below it
/// is delivered again, and nothing from it on is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_a_group_resumes_exactly_at_its_committed_offsets() {
    let mut broker = Broker::start();
    let mut admin = broker.admin().await;
    let mut data = broker.client().await;
    create(&mut admin, TOPIC, PARTITIONS).await;
    produce_everywhere(&mut data, TOPIC, PARTITIONS, 20, "before").await;

    let mut member = TestMember::join(&broker, "a", "billing", TOPIC, 0).await;
    assert_eq!(member.held.len(), PARTITIONS as usize);
    // Commit a different amount per partition: partition p at 2 + p.
    for p in 0..PARTITIONS {
        member.process_partition(p, u64::from(2 + p)).await;
    }
    let all: Vec<u32> = (0..PARTITIONS).collect();
    member.commit(&all).await.expect("commit");
    // Processed but never committed: these are delivered again after the crash.
    member.process_at_most(3).await;
    let mut groups = broker.groups().await;
    let before = committed(&mut groups, "billing", TOPIC).await;
    let expected: BTreeMap<u32, u64> = (0..PARTITIONS).map(|p| (p, u64::from(2 + p))).collect();
    assert_eq!(before, expected);

    broker.kill();
    broker.restart();
    member.reconnect(&broker).await;
    produce_everywhere(&mut member.data, TOPIC, PARTITIONS, 4, "after").await;
    expect_status(
        member.heartbeat().await,
        Code::FailedPrecondition,
        "heartbeat of a member from before the restart",
    );
    let old_id = member.member_id.clone();
    member.processed.clear();
    member.grants.clear();
    member.rejoin().await;
    assert_ne!(member.member_id, old_id, "ids are never reused");
    let start = Instant::now();
    while member.held.len() < PARTITIONS as usize {
        member.beat().await;
        check_deadline(start, "the rejoined member gets every partition", || {
            format!("it holds {:?}", member.held)
        });
        tokio::time::sleep(POLL_PAUSE).await;
    }
    let starts: BTreeMap<u32, u64> = member.grants.iter().copied().collect();
    assert_eq!(starts, before, "starts at the committed offsets");
    member.process().await;

    let mut admin = broker.admin().await;
    let ends = high_watermarks(&mut admin, TOPIC).await;
    for p in 0..PARTITIONS {
        let delivered: Vec<u64> = member
            .processed
            .iter()
            .filter(|(q, _)| *q == p)
            .map(|(_, o)| *o)
            .collect();
        let expected: Vec<u64> = (before[&p]..ends[p as usize]).collect();
        assert_eq!(delivered, expected, "partition {p} after the restart");
    }
    let mut groups = broker.groups().await;
    let end_map: BTreeMap<u32, u64> = (0..PARTITIONS).zip(ends.iter().copied()).collect();
    assert_eq!(committed(&mut groups, "billing", TOPIC).await, end_map);
}

/// Asserts that a group's committed offsets are still `before`.
async fn assert_unchanged(
    groups: &mut GroupsClient<Channel>,
    group: &str,
    before: &[v1::PartitionOffset],
    what: &str,
) {
    assert_eq!(
        committed_offsets(groups, group).await,
        before,
        "after {what}"
    );
}

/// Two members with three partitions each, settled; returns (a, b).
async fn settled_pair(
    broker: &Broker,
    admin: &mut AdminClient<Channel>,
    group: &str,
) -> (TestMember, TestMember) {
    let mut members = vec![
        TestMember::join(broker, "a", group, TOPIC, 0).await,
        TestMember::join(broker, "b", group, TOPIC, 0).await,
    ];
    settle(admin, &mut members, "two members").await;
    let b = members.pop().expect("b");
    let a = members.pop().expect("a");
    (a, b)
}

/// Guards the commit rules: a commit past the log end gets OUT_OF_RANGE, one of a
/// partition the member does not own, or from outside while the group has members,
/// FAILED_PRECONDITION — and a refused commit writes nothing, not even its valid
/// part. A commit that would move backwards is accepted and answers with the position
/// the group already has. Once the members left, an outside commit is accepted. An
/// epoch from before a partition came back to a member is fenced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_that_break_the_rules_are_refused_and_change_nothing() {
    let broker = Broker::start();
    let mut admin = broker.admin().await;
    let mut data = broker.client().await;
    let mut groups = broker.groups().await;
    create(&mut admin, TOPIC, PARTITIONS).await;
    produce_everywhere(&mut data, TOPIC, PARTITIONS, 10, "x").await;
    let group = "billing";
    let (mut a, mut b) = settled_pair(&broker, &mut admin, group).await;
    // Settling processed and committed everything; these records are still to come.
    produce_everywhere(&mut data, TOPIC, PARTITIONS, 10, "y").await;
    let mine: Vec<u32> = a.held.keys().copied().collect();
    let theirs: Vec<u32> = b.held.keys().copied().collect();
    let (p, q, other) = (mine[0], mine[1], theirs[0]);
    let commit = |member: &TestMember, offsets: Vec<v1::PartitionOffset>| {
        commit_request(group, &member.member_id, member.epoch, offsets)
    };

    groups
        .commit_offsets(commit(&a, vec![position(TOPIC, p, 13)]))
        .await
        .expect("a valid commit");
    let before = committed_offsets(&mut groups, group).await;

    expect_code(
        groups
            .commit_offsets(commit(&a, vec![position(TOPIC, p, 21)]))
            .await,
        Code::OutOfRange,
        "commit past the log end",
    );
    expect_code(
        groups
            .commit_offsets(commit(
                &a,
                vec![position(TOPIC, q, 14), position(TOPIC, p, 21)],
            ))
            .await,
        Code::OutOfRange,
        "commit with one offset past the log end",
    );
    assert_unchanged(&mut groups, group, &before, "commits past the log end").await;

    expect_code(
        groups
            .commit_offsets(commit(&a, vec![position(TOPIC, other, 12)]))
            .await,
        Code::FailedPrecondition,
        "commit of a partition another member owns",
    );
    expect_code(
        groups
            .commit_offsets(commit(
                &a,
                vec![position(TOPIC, q, 14), position(TOPIC, other, 12)],
            ))
            .await,
        Code::FailedPrecondition,
        "commit of an owned and an unowned partition",
    );
    expect_code(
        groups
            .commit_offsets(commit_request(group, "", 0, vec![position(TOPIC, q, 14)]))
            .await,
        Code::FailedPrecondition,
        "outsider commit while the group has members",
    );
    expect_code(
        groups
            .commit_offsets(commit_request(
                group,
                "nobody",
                1,
                vec![position(TOPIC, q, 14)],
            ))
            .await,
        Code::FailedPrecondition,
        "commit by an unknown member",
    );
    expect_code(
        groups
            .commit_offsets(commit_request(
                group,
                &a.member_id,
                a.epoch + 1,
                vec![position(TOPIC, q, 14)],
            ))
            .await,
        Code::FailedPrecondition,
        "commit with an epoch from the future",
    );
    expect_code(
        groups
            .commit_offsets(commit(
                &a,
                vec![position(TOPIC, q, 14), position(TOPIC, q, 15)],
            ))
            .await,
        Code::InvalidArgument,
        "commit naming a partition twice",
    );
    expect_code(
        groups
            .commit_offsets(commit(&a, vec![position("missing", 0, 0)]))
            .await,
        Code::NotFound,
        "commit of a topic that does not exist",
    );
    assert_unchanged(&mut groups, group, &before, "refused commits").await;

    let answer = groups
        .commit_offsets(commit(&a, vec![position(TOPIC, p, 12)]))
        .await
        .expect("a commit that would move backwards is accepted")
        .into_inner()
        .offsets;
    assert_eq!(answer.len(), 1);
    assert_eq!(
        (answer[0].partition, answer[0].offset),
        (p, 13),
        "{answer:?}"
    );
    assert_unchanged(
        &mut groups,
        group,
        &before,
        "a commit that would move backwards",
    )
    .await;

    // b leaves: its partitions come back to a at a later epoch, and a's requests with
    // the epoch from before are fenced for them (not for what a held all along).
    let early_epoch = a.epoch;
    b.leave().await;
    let start = Instant::now();
    while a.held.len() < PARTITIONS as usize {
        a.beat().await;
        check_deadline(start, "a gets b's partitions", || format!("{:?}", a.held));
        tokio::time::sleep(POLL_PAUSE).await;
    }
    assert!(a.epoch > early_epoch);
    let returned = other;
    assert!(a.held.contains_key(&returned));
    let mut fenced = a.fence();
    fenced.member_epoch = early_epoch;
    expect_code(
        data.fetch(v1::FetchRequest {
            member: Some(fenced.clone()),
            ..fetch_request(TOPIC, returned, 0, true)
        })
        .await,
        Code::FailedPrecondition,
        "fetch with an epoch from before the partition came back",
    );
    expect_code(
        groups
            .commit_offsets(commit_request(
                group,
                &a.member_id,
                early_epoch,
                vec![position(TOPIC, returned, 11)],
            ))
            .await,
        Code::FailedPrecondition,
        "commit with an epoch from before the partition came back",
    );
    data.fetch(v1::FetchRequest {
        member: Some(fenced),
        ..fetch_request(TOPIC, p, 0, true)
    })
    .await
    .expect("the early epoch still covers what a held all along");

    // Without members, commits from outside are accepted.
    a.leave().await;
    produce_everywhere(&mut data, TOPIC, PARTITIONS, 5, "more").await;
    let answer = groups
        .commit_offsets(commit_request(
            group,
            "",
            0,
            vec![position(TOPIC, other, 22)],
        ))
        .await
        .expect("outsider commit without members")
        .into_inner()
        .offsets;
    assert_eq!((answer[0].partition, answer[0].offset), (other, 22));
    assert_eq!(committed(&mut groups, group, TOPIC).await[&other], 22);
}

/// A member's Subscribe stream is fenced like its fetches: opened with an epoch from
/// before the partition came to the member, it fails at once with FAILED_PRECONDITION;
/// opened as the owner, it streams the partition, and once the member has left the
/// group it ends with FAILED_PRECONDITION at the next record instead of serving it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_members_subscribe_stream_is_fenced_like_its_fetches() {
    let broker = Broker::start();
    let mut admin = broker.admin().await;
    let mut data = broker.client().await;
    create(&mut admin, TOPIC, PARTITIONS).await;
    let mut member = TestMember::join(&broker, "tailer", "tailers", TOPIC, 10_000).await;
    let start = Instant::now();
    while member.held.len() < PARTITIONS as usize {
        member.beat().await;
        check_deadline(start, "the only member gets every partition", || {
            format!("{:?}", member.held)
        });
        tokio::time::sleep(POLL_PAUSE).await;
    }
    let subscribe = |member: v1::GroupMember| v1::SubscribeRequest {
        topic: TOPIC.into(),
        partition: 0,
        offset: 0,
        member: Some(member),
        ..Default::default()
    };
    let mut stale = member.fence();
    stale.member_epoch = 0;
    expect_status(
        data.subscribe(subscribe(stale)).await.map(|_| ()),
        Code::FailedPrecondition,
        "subscribe with an epoch from before the member owned the partition",
    );

    let mut stream = data
        .subscribe(subscribe(member.fence()))
        .await
        .expect("the owner subscribes")
        .into_inner();
    produce_everywhere(&mut data, TOPIC, 1, 1, "first").await;
    let message = stream
        .message()
        .await
        .expect("the owner is served")
        .expect("a message");
    assert_eq!(message.next_offset, 1);

    member.leave().await;
    produce_everywhere(&mut data, TOPIC, 1, 1, "after-leaving").await;
    let ended = stream.message().await;
    expect_status(
        ended,
        Code::FailedPrecondition,
        "the stream of a member that left, at its next record",
    );
}

/// Guards the statuses of bad membership requests and of unknown groups, and that none
/// of them disturbs a running group: a join of a missing topic gets NOT_FOUND; a bad
/// group name, timeouts outside 1 s to 5 min, a join without topics or with an epoch
/// get INVALID_ARGUMENT; an unknown member gets FAILED_PRECONDITION; describing or
/// deleting an unknown group gets NOT_FOUND; and ResetOffsets and DeleteGroup of a group
/// with members get FAILED_PRECONDITION. Last, a heartbeat with an epoch from the future
/// gets FAILED_PRECONDITION and removes the member it claims to be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_membership_requests_get_clear_statuses_and_change_nothing() {
    let broker = Broker::start();
    let mut admin = broker.admin().await;
    let mut data = broker.client().await;
    let mut groups = broker.groups().await;
    create(&mut admin, TOPIC, PARTITIONS).await;
    produce_everywhere(&mut data, TOPIC, PARTITIONS, 10, "x").await;
    let group = "billing";
    let mut a = TestMember::join(&broker, "a", group, TOPIC, 0).await;
    a.process_at_most(3).await;
    a.commit(&[0, 1]).await.expect("commit");
    let offsets_before = committed_offsets(&mut groups, group).await;
    let description_before = describe(&mut admin, group).await;
    assert_eq!(state(&description_before), v1::GroupState::Stable);

    let join = |topics: &[&str]| v1::HeartbeatRequest {
        topics: topics.iter().map(|t| t.to_string()).collect(),
        ..join_request(group, TOPIC, 0)
    };
    expect_code(
        groups.heartbeat(join(&["missing"])).await,
        Code::NotFound,
        "join of a missing topic",
    );
    expect_code(
        groups.heartbeat(join(&[TOPIC, "missing"])).await,
        Code::NotFound,
        "join of a present and a missing topic",
    );
    expect_code(
        groups.heartbeat(join(&[])).await,
        Code::InvalidArgument,
        "join without topics",
    );
    expect_code(
        groups
            .heartbeat(v1::HeartbeatRequest {
                member_epoch: 3,
                ..join(&[TOPIC])
            })
            .await,
        Code::InvalidArgument,
        "join with an epoch",
    );
    let too_long = "g".repeat(250);
    for bad in ["", "bad name", "a/b", "ünïcode", too_long.as_str()] {
        let what = format!("group name {bad:?}");
        expect_code(
            groups.heartbeat(join_request(bad, TOPIC, 0)).await,
            Code::InvalidArgument,
            &format!("join of {what}"),
        );
        expect_code(
            groups
                .commit_offsets(commit_request(bad, "", 0, vec![position(TOPIC, 0, 1)]))
                .await,
            Code::InvalidArgument,
            &format!("commit to {what}"),
        );
        expect_code(
            admin
                .describe_group(v1::DescribeGroupRequest {
                    group: bad.to_string(),
                })
                .await,
            Code::InvalidArgument,
            &format!("describe of {what}"),
        );
    }
    for (session_timeout_ms, rebalance_timeout_ms) in
        [(999, 0), (300_001, 0), (0, 999), (0, 300_001)]
    {
        expect_code(
            groups
                .heartbeat(v1::HeartbeatRequest {
                    session_timeout_ms,
                    rebalance_timeout_ms,
                    ..join(&[TOPIC])
                })
                .await,
            Code::InvalidArgument,
            &format!(
                "join with session {session_timeout_ms} ms, rebalance {rebalance_timeout_ms} ms"
            ),
        );
    }
    expect_code(
        groups
            .heartbeat(v1::HeartbeatRequest {
                group: group.to_string(),
                member_id: "nobody".to_string(),
                member_epoch: 1,
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        "heartbeat of an unknown member",
    );
    for (what, result) in [
        (
            "reset of a group with members",
            admin
                .reset_offsets(v1::ResetOffsetsRequest {
                    group: group.to_string(),
                    topic: TOPIC.to_string(),
                    partitions: Vec::new(),
                    to: Some(v1::reset_offsets_request::To::Earliest(true)),
                })
                .await
                .map(|_| ()),
        ),
        (
            "delete of a group with members",
            admin
                .delete_group(v1::DeleteGroupRequest {
                    group: group.to_string(),
                })
                .await
                .map(|_| ()),
        ),
    ] {
        expect_status(result, Code::FailedPrecondition, what);
    }

    // The timeouts' bounds themselves are accepted.
    let edge = groups
        .heartbeat(v1::HeartbeatRequest {
            session_timeout_ms: 1000,
            rebalance_timeout_ms: 300_000,
            ..join_request("edge", TOPIC, 0)
        })
        .await
        .expect("join with the shortest session and the longest rebalance timeout")
        .into_inner();
    let d = describe(&mut admin, "edge").await;
    assert_eq!(d.members[0].session_timeout_ms, 1000, "{d:#?}");
    groups
        .leave_group(v1::LeaveGroupRequest {
            group: "edge".to_string(),
            member_id: edge.member_id.clone(),
        })
        .await
        .expect("leave");
    groups
        .leave_group(v1::LeaveGroupRequest {
            group: "edge".to_string(),
            member_id: edge.member_id,
        })
        .await
        .expect("leaving twice is fine");

    // Unknown groups.
    expect_code(
        admin
            .describe_group(v1::DescribeGroupRequest {
                group: "edge".to_string(),
            })
            .await,
        Code::NotFound,
        "describe of a group without members or offsets",
    );
    expect_code(
        admin
            .delete_group(v1::DeleteGroupRequest {
                group: "unknown".to_string(),
            })
            .await,
        Code::NotFound,
        "delete of an unknown group",
    );
    assert!(committed_offsets(&mut groups, "unknown").await.is_empty());

    // None of it touched the running group.
    a.beat().await;
    assert_eq!(committed_offsets(&mut groups, group).await, offsets_before);
    let d = describe(&mut admin, group).await;
    assert_eq!(d.members.len(), 1, "{d:#?}");
    assert_eq!(d.members[0].member_id, a.member_id);
    assert_eq!(d.partitions, description_before.partitions);
    assert_eq!(state(&d), v1::GroupState::Stable);
    let listed: Vec<String> = list_groups(&mut admin)
        .await
        .into_iter()
        .map(|g| g.group)
        .collect();
    assert_eq!(listed, [group]);

    // A heartbeat from an epoch the member never had is not the member the group
    // knows: it is refused, and the member is removed at once so its partitions do not
    // wait for its session to expire.
    expect_code(
        groups
            .heartbeat(v1::HeartbeatRequest {
                group: group.to_string(),
                member_id: a.member_id.clone(),
                member_epoch: a.epoch + 1,
                owned: a.owned(),
                ..Default::default()
            })
            .await,
        Code::FailedPrecondition,
        "heartbeat with an epoch from the future",
    );
    let d = describe(&mut admin, group).await;
    assert!(d.members.is_empty(), "{d:#?}");
}

fn reset(
    group: &str,
    topic: &str,
    partitions: &[u32],
    to: v1::reset_offsets_request::To,
) -> v1::ResetOffsetsRequest {
    v1::ResetOffsetsRequest {
        group: group.to_string(),
        topic: topic.to_string(),
        partitions: partitions.to_vec(),
        to: Some(to),
    }
}

/// Guards ResetOffsets and DeleteGroup on a group without members: resets to the
/// earliest offset, the latest, a timestamp and an explicit offset move positions
/// either way; an offset outside the log gets OUT_OF_RANGE, a missing partition or
/// topic NOT_FOUND, a reset without a target INVALID_ARGUMENT, all changing nothing;
/// and a deleted group is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_move_committed_offsets_either_way_and_deleted_groups_are_gone() {
    use v1::reset_offsets_request::To;
    let broker = Broker::start();
    let mut admin = broker.admin().await;
    let mut data = broker.client().await;
    let mut groups = broker.groups().await;
    create(&mut admin, TOPIC, PARTITIONS).await;
    produce_everywhere(&mut data, TOPIC, PARTITIONS, 10, "x").await;
    create(&mut admin, "events", 2).await;
    let base = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("a clock after 1970")
        .as_millis() as i64
        - 60_000;
    let timed = (0..5)
        .map(|i| v1::Record {
            value: Some(format!("at {i}").into_bytes().into()),
            timestamp_ms: base + 1000 * i,
            ..Default::default()
        })
        .collect();
    data.produce(produce_records("events", 0, timed))
        .await
        .expect("produce");
    let group = "billing";
    let everywhere = (0..PARTITIONS).map(|p| position(TOPIC, p, 5)).collect();
    groups
        .commit_offsets(commit_request(group, "", 0, everywhere))
        .await
        .expect("outsider commit");

    let mut expect_reset = async |request: v1::ResetOffsetsRequest,
                                  expected: &[(&str, u32, u64)]| {
        let what = format!("{request:?}");
        let answer = admin
            .reset_offsets(request)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:?}"))
            .into_inner()
            .offsets;
        let got: Vec<(&str, u32, u64)> = answer
            .iter()
            .map(|o| (o.topic.as_str(), o.partition, o.offset))
            .collect();
        assert_eq!(got, expected, "{what}");
    };
    let all: Vec<(&str, u32, u64)> = (0..PARTITIONS).map(|p| (TOPIC, p, 0)).collect();
    expect_reset(reset(group, TOPIC, &[], To::Earliest(true)), &all).await;
    expect_reset(
        reset(group, TOPIC, &[2], To::Latest(true)),
        &[(TOPIC, 2, 10)],
    )
    .await;
    expect_reset(
        reset(group, TOPIC, &[1, 3], To::Offset(4)),
        &[(TOPIC, 1, 4), (TOPIC, 3, 4)],
    )
    .await;
    expect_reset(
        reset(group, "events", &[], To::TimestampMs(base + 2500)),
        &[("events", 0, 3), ("events", 1, 0)],
    )
    .await;
    expect_reset(
        reset(group, "events", &[0], To::TimestampMs(base - 1)),
        &[("events", 0, 0)],
    )
    .await;
    expect_reset(
        reset(group, "events", &[0], To::TimestampMs(base + 1000)),
        &[("events", 0, 1)],
    )
    .await;
    let before = committed_offsets(&mut groups, group).await;
    let summary: Vec<(String, u32, u64)> = before
        .iter()
        .map(|o| (o.topic.clone(), o.partition, o.offset))
        .collect();
    let expected: Vec<(String, u32, u64)> = [
        ("events", 0, 1),
        ("events", 1, 0),
        (TOPIC, 0, 0),
        (TOPIC, 1, 4),
        (TOPIC, 2, 10),
        (TOPIC, 3, 4),
        (TOPIC, 4, 0),
        (TOPIC, 5, 0),
    ]
    .into_iter()
    .map(|(t, p, o)| (t.to_string(), p, o))
    .collect();
    assert_eq!(summary, expected);

    expect_code(
        admin
            .reset_offsets(reset(group, TOPIC, &[1], To::Offset(11)))
            .await,
        Code::OutOfRange,
        "reset past the log end",
    );
    expect_code(
        admin
            .reset_offsets(reset(group, TOPIC, &[0, 9], To::Latest(true)))
            .await,
        Code::NotFound,
        "reset of a missing partition",
    );
    expect_code(
        admin
            .reset_offsets(reset(group, "missing", &[], To::Latest(true)))
            .await,
        Code::NotFound,
        "reset of a missing topic",
    );
    expect_code(
        admin
            .reset_offsets(v1::ResetOffsetsRequest {
                to: None,
                ..reset(group, TOPIC, &[], To::Latest(true))
            })
            .await,
        Code::InvalidArgument,
        "reset without a target",
    );
    assert_unchanged(&mut groups, group, &before, "refused resets").await;

    admin
        .delete_group(v1::DeleteGroupRequest {
            group: group.to_string(),
        })
        .await
        .expect("delete group");
    assert!(committed_offsets(&mut groups, group).await.is_empty());
    expect_code(
        admin
            .describe_group(v1::DescribeGroupRequest {
                group: group.to_string(),
            })
            .await,
        Code::NotFound,
        "describe of a deleted group",
    );
    expect_code(
        admin
            .delete_group(v1::DeleteGroupRequest {
                group: group.to_string(),
            })
            .await,
        Code::NotFound,
        "delete of a deleted group",
    );
    let listed = list_groups(&mut admin).await;
    assert!(listed.is_empty(), "{listed:?}");
}

/// Guards that a deleted topic takes its committed offsets with it, in every group and
/// across a crash, so a topic created later under the same name starts fresh; a group
/// left with nothing is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_topic_forgets_its_committed_offsets() {
    let mut broker = Broker::start();
    let mut admin = broker.admin().await;
    let mut data = broker.client().await;
    let mut groups = broker.groups().await;
    create(&mut admin, TOPIC, 2).await;
    create(&mut admin, "events", 2).await;
    produce_everywhere(&mut data, TOPIC, 2, 5, "x").await;
    produce_everywhere(&mut data, "events", 2, 5, "x").await;
    let commits = vec![
        position(TOPIC, 0, 5),
        position("events", 0, 3),
        position("events", 1, 2),
    ];
    groups
        .commit_offsets(commit_request("keeper", "", 0, commits))
        .await
        .expect("commit");
    groups
        .commit_offsets(commit_request(
            "only-events",
            "",
            0,
            vec![position("events", 1, 4)],
        ))
        .await
        .expect("commit");

    admin
        .delete_topic(v1::DeleteTopicRequest {
            name: "events".to_string(),
        })
        .await
        .expect("delete topic");
    create(&mut admin, "events", 2).await;

    for run in ["before the crash", "after the crash"] {
        let kept: Vec<(String, u32, u64)> = committed_offsets(&mut groups, "keeper")
            .await
            .into_iter()
            .map(|o| (o.topic, o.partition, o.offset))
            .collect();
        assert_eq!(kept, [(TOPIC.to_string(), 0, 5)], "{run}");
        let d = describe(&mut admin, "keeper").await;
        assert!(
            d.partitions
                .iter()
                .all(|p| p.topic != "events" || (p.committed_offset.is_none() && p.lag == Some(0))),
            "{run}: {d:#?}"
        );
        expect_code(
            admin
                .describe_group(v1::DescribeGroupRequest {
                    group: "only-events".to_string(),
                })
                .await,
            Code::NotFound,
            &format!("{run}: describe of a group whose only topic was deleted"),
        );
        let listed: Vec<String> = list_groups(&mut admin)
            .await
            .into_iter()
            .map(|g| g.group)
            .collect();
        assert_eq!(listed, ["keeper"], "{run}");
        if run == "before the crash" {
            broker.kill();
            broker.restart();
            admin = broker.admin().await;
            groups = broker.groups().await;
        }
    }
    // A member of the new topic starts at the beginning, not at an old position.
    let mut member = TestMember::join(&broker, "a", "only-events", "events", 0).await;
    assert_eq!(member.grants, [(0, 0), (1, 0)]);
    member.leave().await;
}

/// Guards what DescribeGroup and ListGroups show: per partition the committed offset,
/// its metadata, the log end, lag = log end - committed (absent without a commit) and
/// the owner; the total lag; the members with their subscription, assignment and
/// session; and both groups with only committed offsets (EMPTY) and active ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_shows_lag_per_partition_and_list_shows_empty_and_active_groups() {
    let broker = Broker::start();
    let mut admin = broker.admin().await;
    let mut data = broker.client().await;
    let mut groups = broker.groups().await;
    create(&mut admin, TOPIC, 3).await;
    for (p, count) in [(0, 5), (1, 8)] {
        let records = (0..count)
            .map(|i| record(None, format!("{i}").as_bytes()))
            .collect();
        data.produce(produce_records(TOPIC, p, records))
            .await
            .expect("produce");
    }
    let mut a = TestMember::join(&broker, "a", "active", TOPIC, 6000).await;
    assert_eq!(a.held.len(), 3);
    let offsets = vec![
        v1::PartitionOffset {
            metadata: "two done".to_string(),
            ..position(TOPIC, 0, 2)
        },
        position(TOPIC, 1, 8),
    ];
    a.groups
        .commit_offsets(commit_request("active", &a.member_id, a.epoch, offsets))
        .await
        .expect("commit");
    groups
        .commit_offsets(commit_request("idle", "", 0, vec![position(TOPIC, 1, 4)]))
        .await
        .expect("outsider commit");

    let partition = |p: u32, committed: Option<u64>, metadata: &str, end: u64, owner: &str| {
        v1::GroupPartitionInfo {
            topic: TOPIC.to_string(),
            partition: p,
            committed_offset: committed,
            metadata: metadata.to_string(),
            log_end_offset: end,
            // Without a commit, the group starts at the log start (0 here).
            lag: Some(end - committed.unwrap_or(0)),
            member_id: owner.to_string(),
            log_start_offset: 0,
        }
    };
    let d = describe(&mut admin, "active").await;
    let summary = d.group.clone().expect("a summary");
    assert_eq!(
        (summary.group.as_str(), summary.state(), summary.members),
        ("active", v1::GroupState::Stable, 1)
    );
    assert!(summary.epoch >= 1, "{d:#?}");
    assert_eq!(
        d.members,
        [v1::GroupMemberInfo {
            member_id: a.member_id.clone(),
            client_id: "a".to_string(),
            member_epoch: a.epoch,
            topics: vec![TOPIC.to_string()],
            assignment: vec![topic_partitions(TOPIC, 0..3)],
            revoking: Vec::new(),
            session_timeout_ms: 6000,
        }]
    );
    let id = a.member_id.as_str();
    assert_eq!(
        d.partitions,
        [
            partition(0, Some(2), "two done", 5, id),
            partition(1, Some(8), "", 8, id),
            partition(2, None, "", 0, id),
        ]
    );
    assert_eq!(d.total_lag, 3);

    // New records raise the lag.
    let records = (0..4)
        .map(|i| record(None, format!("{i}").as_bytes()))
        .collect();
    data.produce(produce_records(TOPIC, 0, records))
        .await
        .expect("produce");
    let d = describe(&mut admin, "active").await;
    assert_eq!(d.partitions[0], partition(0, Some(2), "two done", 9, id));
    assert_eq!(d.total_lag, 7);

    let d = describe(&mut admin, "idle").await;
    assert_eq!(
        d.group.as_ref().map(|g| g.state()),
        Some(v1::GroupState::Empty)
    );
    assert!(d.members.is_empty());
    assert_eq!(d.partitions, [partition(1, Some(4), "", 8, "")]);
    assert_eq!(d.total_lag, 4);

    let list = |admin: &mut AdminClient<Channel>| {
        let mut admin = admin.clone();
        async move {
            list_groups(&mut admin)
                .await
                .into_iter()
                .map(|g| (g.group.clone(), g.state(), g.members))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        list(&mut admin).await,
        [
            ("active".to_string(), v1::GroupState::Stable, 1),
            ("idle".to_string(), v1::GroupState::Empty, 0)
        ]
    );
    a.leave().await;
    assert_eq!(
        list(&mut admin).await,
        [
            ("active".to_string(), v1::GroupState::Empty, 0),
            ("idle".to_string(), v1::GroupState::Empty, 0)
        ]
    );
}

/// A join whose answer was lost and that is sent again with the same join key is the
/// same member: the group does not get a second member while the first (that nobody
/// heartbeats for) holds every partition for a session. A new key is a new member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_retried_with_its_key_is_the_same_member() {
    let broker = Broker::start();
    let mut admin = broker.admin().await;
    let mut groups = broker.groups().await;
    create(&mut admin, TOPIC, PARTITIONS).await;
    let group = "retried";
    let keyed = |key: &str| v1::HeartbeatRequest {
        join_key: key.to_string(),
        ..join_request(group, TOPIC, 10_000)
    };
    // The first answer is "lost": the test ignores it and retries.
    let lost = groups
        .heartbeat(keyed("k-1"))
        .await
        .expect("join")
        .into_inner();
    let retried = groups
        .heartbeat(keyed("k-1"))
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(retried.member_id, lost.member_id);
    assert_eq!(retried.assignment, lost.assignment);
    assert_eq!(describe(&mut admin, group).await.members.len(), 1);
    let other = groups
        .heartbeat(keyed("k-2"))
        .await
        .expect("join")
        .into_inner();
    assert_ne!(other.member_id, lost.member_id);
    assert_eq!(describe(&mut admin, group).await.members.len(), 2);
    let status = groups
        .heartbeat(keyed(&"k".repeat(65)))
        .await
        .expect_err("a 65-byte key");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("join key"), "{status:?}");
}
