//! Server-side partition assignment for consumer groups: balanced and sticky.
//!
//! Each topic is shared among the members subscribed to it: with `n` members and `P`
//! partitions, every member gets `P / n` partitions and `P % n` of them one more, so
//! counts differ by at most one. A member keeps the partitions it already had as far as
//! its quota allows; only the excess of members over their quota, and partitions nobody
//! had, move. The extra partitions go first to members that already hold one more than
//! the base (so nothing moves needlessly), then to members with the fewest partitions
//! across all topics (so totals stay even when members subscribe to several topics).
//! The result depends only on the inputs: the same members, subscriptions, partition
//! counts and previous assignment always give the same assignment.

use std::collections::{BTreeMap, BTreeSet};

/// A partition of a topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: u32,
}

impl TopicPartition {
    /// Partition `partition` of `topic`.
    pub fn new(topic: impl Into<String>, partition: u32) -> TopicPartition {
        TopicPartition {
            topic: topic.into(),
            partition,
        }
    }
}

impl std::fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// Partitions per member.
pub type Assignment = BTreeMap<String, BTreeSet<TopicPartition>>;

/// The target assignment for `members` (member id → subscribed topics), given each
/// topic's partition count (topics absent from `partitions` have none) and the
/// `previous` target.
pub fn assign(
    members: &BTreeMap<String, BTreeSet<String>>,
    partitions: &BTreeMap<String, u32>,
    previous: &Assignment,
) -> Assignment {
    let mut target: Assignment = members
        .keys()
        .map(|id| (id.clone(), BTreeSet::new()))
        .collect();
    let topics: BTreeSet<&String> = members.values().flatten().collect();
    for topic in topics {
        let count = partitions.get(topic).copied().unwrap_or(0);
        let subscribers: Vec<&String> = members
            .iter()
            .filter(|(_, topics)| topics.contains(topic))
            .map(|(id, _)| id)
            .collect();
        if count == 0 {
            continue;
        }
        let base = count as usize / subscribers.len();
        let extra = count as usize % subscribers.len();
        // What each subscriber had of this topic, without partitions that no longer
        // exist.
        let had: BTreeMap<&String, Vec<u32>> = subscribers
            .iter()
            .map(|&id| {
                let held = previous
                    .get(id)
                    .into_iter()
                    .flatten()
                    .filter(|tp| &tp.topic == topic && tp.partition < count)
                    .map(|tp| tp.partition)
                    .collect();
                (id, held)
            })
            .collect();
        let load = |id: &String| target.get(id).map_or(0, BTreeSet::len);
        let mut by_claim = subscribers.clone();
        by_claim.sort_by_key(|&id| {
            (
                std::cmp::Reverse(had[id].len().min(base + 1)),
                load(id),
                id.clone(),
            )
        });
        let quota: BTreeMap<&String, usize> = by_claim
            .iter()
            .enumerate()
            .map(|(rank, &id)| (id, base + usize::from(rank < extra)))
            .collect();
        let mut taken = vec![false; count as usize];
        let mut given: BTreeMap<&String, Vec<u32>> = BTreeMap::new();
        for &id in &subscribers {
            let mut kept = Vec::with_capacity(quota[id]);
            for &p in &had[id] {
                if kept.len() == quota[id] {
                    break;
                }
                // A partition two members claim (never the case for a previous target
                // this function made) goes to the first.
                if !std::mem::replace(&mut taken[p as usize], true) {
                    kept.push(p);
                }
            }
            given.insert(id, kept);
        }
        let mut free = (0..count).filter(|&p| !taken[p as usize]);
        let mut fill_order = subscribers.clone();
        fill_order.sort_by_key(|&id| (load(id), id.clone()));
        for id in fill_order {
            let held = given.get_mut(id).expect("every subscriber has an entry");
            while held.len() < quota[id] {
                match free.next() {
                    Some(p) => held.push(p),
                    None => break,
                }
            }
        }
        for (id, held) in given {
            let set = target.get_mut(id).expect("every member has an entry");
            set.extend(
                held.into_iter()
                    .map(|p| TopicPartition::new(topic.clone(), p)),
            );
        }
    }
    target
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn members(ids: &[&str], topics: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
        ids.iter()
            .map(|id| {
                (
                    id.to_string(),
                    topics.iter().map(|t| t.to_string()).collect(),
                )
            })
            .collect()
    }

    fn counts(of: &Assignment) -> Vec<usize> {
        of.values().map(BTreeSet::len).collect()
    }

    #[test]
    fn one_to_three_to_two_to_one_stays_balanced_and_sticky() {
        let partitions = BTreeMap::from([("orders".to_string(), 6)]);
        let one = assign(
            &members(&["a"], &["orders"]),
            &partitions,
            &Assignment::new(),
        );
        assert_eq!(counts(&one), [6]);
        let three = assign(&members(&["a", "b", "c"], &["orders"]), &partitions, &one);
        assert_eq!(counts(&three), [2, 2, 2]);
        assert!(three["a"].is_subset(&one["a"]));
        let two = assign(&members(&["a", "c"], &["orders"]), &partitions, &three);
        assert_eq!(counts(&two), [3, 3]);
        assert!(three["a"].is_subset(&two["a"]) && three["c"].is_subset(&two["c"]));
        let back = assign(&members(&["c"], &["orders"]), &partitions, &two);
        assert_eq!(counts(&back), [6]);
    }

    #[test]
    fn members_share_only_the_topics_they_subscribe_to() {
        let mut subscriptions = members(&["a", "b"], &["orders"]);
        subscriptions
            .get_mut("b")
            .expect("b")
            .insert("payments".to_string());
        let partitions = BTreeMap::from([("orders".to_string(), 4), ("payments".to_string(), 3)]);
        let target = assign(&subscriptions, &partitions, &Assignment::new());
        assert!(target["a"].iter().all(|tp| tp.topic == "orders"));
        assert_eq!(target["a"].len(), 2);
        assert_eq!(target["b"].len(), 5);
    }

    #[test]
    fn partitions_of_a_missing_topic_are_not_assigned() {
        let target = assign(
            &members(&["a"], &["gone"]),
            &BTreeMap::new(),
            &BTreeMap::from([(
                "a".to_string(),
                BTreeSet::from([TopicPartition::new("gone", 0)]),
            )]),
        );
        assert!(target["a"].is_empty());
    }

    fn scenario() -> impl Strategy<Value = (Vec<Vec<u8>>, Vec<u32>)> {
        // Up to four rounds of membership over ids 0..6, each member subscribing to a
        // subset of three topics, and the topics' partition counts.
        (
            prop::collection::vec(prop::collection::vec(0u8..24, 0..6), 1..5),
            prop::collection::vec(0u32..13, 3),
        )
    }

    proptest! {
        #[test]
        fn every_partition_once_balanced_and_sticky((rounds, sizes) in scenario()) {
            let partitions: BTreeMap<String, u32> =
                sizes.iter().enumerate().map(|(t, &n)| (format!("t{t}"), n)).collect();
            let mut previous = Assignment::new();
            for round in rounds {
                // Member id = value / 4; its topics = the bits of value % 4 + 1 (one
                // to three of the topics).
                let mut subscriptions: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
                for v in round {
                    let topics = (v % 4) + 1;
                    let set = (0..3)
                        .filter(|t| topics & (1 << t) != 0)
                        .map(|t| format!("t{t}"))
                        .collect();
                    subscriptions.insert(format!("m{}", v / 4), set);
                }
                let target = assign(&subscriptions, &partitions, &previous);
                prop_assert_eq!(target.len(), subscriptions.len());
                for (topic, &count) in &partitions {
                    let subscribers: Vec<&String> = subscriptions
                        .iter()
                        .filter(|(_, t)| t.contains(topic))
                        .map(|(id, _)| id)
                        .collect();
                    let mut owners = vec![0; count as usize];
                    let mut per_member = Vec::new();
                    for (id, set) in &target {
                        let mine: Vec<u32> = set
                            .iter()
                            .filter(|tp| &tp.topic == topic)
                            .map(|tp| tp.partition)
                            .collect();
                        if !mine.is_empty() {
                            prop_assert!(subscribers.contains(&id), "{} not subscribed", id);
                        }
                        for p in &mine {
                            owners[*p as usize] += 1;
                        }
                        if subscribers.contains(&id) {
                            per_member.push(mine.len());
                        }
                    }
                    if subscribers.is_empty() {
                        prop_assert!(owners.iter().all(|&n| n == 0));
                        continue;
                    }
                    prop_assert!(owners.iter().all(|&n| n == 1), "{}: {:?}", topic, owners);
                    let (min, max) = (per_member.iter().min(), per_member.iter().max());
                    prop_assert!(max.zip(min).is_some_and(|(max, min)| max - min <= 1));
                    // Sticky: a member keeps as many of its partitions as its new count
                    // allows.
                    for id in &subscribers {
                        let before: BTreeSet<&TopicPartition> = previous
                            .get(*id)
                            .into_iter()
                            .flatten()
                            .filter(|tp| &tp.topic == topic)
                            .collect();
                        let after: BTreeSet<&TopicPartition> =
                            target[*id].iter().filter(|tp| &tp.topic == topic).collect();
                        let kept = before.intersection(&after).count();
                        prop_assert_eq!(kept, before.len().min(after.len()), "{} on {}", id, topic);
                    }
                }
                previous = target;
            }
        }

        #[test]
        fn the_same_inputs_give_the_same_assignment((rounds, sizes) in scenario()) {
            let partitions: BTreeMap<String, u32> =
                sizes.iter().enumerate().map(|(t, &n)| (format!("t{t}"), n)).collect();
            let subscriptions: BTreeMap<String, BTreeSet<String>> = rounds[0]
                .iter()
                .map(|v| (format!("m{v}"), BTreeSet::from(["t0".to_string(), "t1".to_string()])))
                .collect();
            let first = assign(&subscriptions, &partitions, &Assignment::new());
            prop_assert_eq!(&first, &assign(&subscriptions, &partitions, &Assignment::new()));
            prop_assert_eq!(&first, &assign(&subscriptions, &partitions, &first));
        }
    }
}
