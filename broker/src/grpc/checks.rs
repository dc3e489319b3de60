//! Bounds on the repeated fields and ids of requests, checked before the broker builds
//! anything from them: a list is never longer than what it can name (a topic's
//! partitions, the broker's topics), never names the same thing twice, and ids are
//! short. So a request costs the broker about what it costs on the wire.

use std::collections::HashMap;

use strata_proto::v1;

use crate::broker::Broker;
use crate::error::{Error, Result};
use crate::limits::ID_BYTES_MAX;
use crate::topics::settings::PARTITIONS_MAX;

/// Topics a list may name beyond those that exist: partitions a member still owns of
/// topics deleted since it was assigned them.
const DELETED_TOPICS_SLACK: usize = 100;

/// Checks a list of partitions of `topic` (which has `count`): each one it has, each
/// once, so the list is at most `count` long.
pub fn partition_list(topic: &str, count: u32, partitions: &[u32], what: &str) -> Result<()> {
    if partitions.len() > count as usize {
        return Err(Error::InvalidArgument(format!(
            "{what} lists {} partitions, but topic {topic:?} has {count}: name each \
             partition once, or none for all",
            partitions.len()
        )));
    }
    let mut seen = PartitionSet::default();
    for &p in partitions {
        if p >= count {
            return Err(Error::PartitionNotFound {
                topic: topic.to_string(),
                partition: p,
                partitions: count,
            });
        }
        if !seen.insert(p) {
            return Err(Error::InvalidArgument(format!(
                "{what} lists partition {topic}/{p} twice"
            )));
        }
    }
    Ok(())
}

/// Checks per-topic partition lists (a member's owned partitions, the partitions of a
/// FetchOffsets): each topic once, at most as many topics as the broker has (plus some
/// deleted since), and per topic each partition once, below the most a topic may have
/// and below the topic's count while it exists.
pub fn topic_partitions(broker: &Broker, lists: &[v1::TopicPartitions], what: &str) -> Result<()> {
    if lists.len() > broker.topic_count() + DELETED_TOPICS_SLACK {
        return Err(Error::InvalidArgument(format!(
            "{what} names {} topics, but the broker has {}",
            lists.len(),
            broker.topic_count()
        )));
    }
    let mut topics: HashMap<&str, ()> = HashMap::with_capacity(lists.len());
    for list in lists {
        if topics.insert(&list.topic, ()).is_some() {
            return Err(Error::InvalidArgument(format!(
                "{what} names topic {:?} twice; list its partitions under one entry",
                list.topic
            )));
        }
        // A deleted topic's partitions are still listed by members that owned them;
        // only the most a topic may have applies to them.
        let count = broker
            .partition_count(&list.topic)
            .unwrap_or(PARTITIONS_MAX);
        if list.partitions.len() > count as usize {
            return Err(Error::InvalidArgument(format!(
                "{what} lists {} partitions of topic {:?}, which has {count}",
                list.partitions.len(),
                list.topic
            )));
        }
        let mut seen = PartitionSet::default();
        for &p in &list.partitions {
            if p >= PARTITIONS_MAX || !seen.insert(p) {
                return Err(Error::InvalidArgument(format!(
                    "{what} lists partition {}/{p} twice or out of range",
                    list.topic
                )));
            }
        }
    }
    Ok(())
}

/// Checks a list of topic names: each once, at most as many as the broker has (plus
/// some deleted since a member subscribed; a missing topic is reported by name later).
pub fn topic_names(broker: &Broker, topics: &[String], what: &str) -> Result<()> {
    if topics.len() > broker.topic_count() + DELETED_TOPICS_SLACK {
        return Err(Error::InvalidArgument(format!(
            "{what} names {} topics, but the broker has {}",
            topics.len(),
            broker.topic_count()
        )));
    }
    let mut seen: HashMap<&str, ()> = HashMap::with_capacity(topics.len());
    for topic in topics {
        if seen.insert(topic, ()).is_some() {
            return Err(Error::InvalidArgument(format!(
                "{what} names topic {topic:?} twice"
            )));
        }
    }
    Ok(())
}

/// Checks the offsets of a commit: each of an existing topic, at most as many per topic
/// as it has partitions, and each metadata at most `metadata_max` bytes. (Duplicates
/// and partition numbers are checked where the commit is built.)
pub fn commit_offsets(
    broker: &Broker,
    offsets: &[v1::PartitionOffset],
    metadata_max: usize,
) -> Result<()> {
    let mut per_topic: HashMap<&str, (u32, u32)> = HashMap::new();
    for o in offsets {
        if o.metadata.len() > metadata_max {
            return Err(Error::LimitExceeded {
                limit: "max_commit_metadata_bytes",
                message: format!(
                    "the metadata of {}/{} is {} bytes, more than {metadata_max}",
                    o.topic,
                    o.partition,
                    o.metadata.len()
                ),
            });
        }
        let (seen, count) = match per_topic.get_mut(o.topic.as_str()) {
            Some(entry) => entry,
            None => {
                let count = broker
                    .partition_count(&o.topic)
                    .ok_or_else(|| Error::TopicNotFound(o.topic.clone()))?;
                per_topic.entry(&o.topic).or_insert((0, count))
            }
        };
        *seen += 1;
        if *seen > *count {
            return Err(Error::InvalidArgument(format!(
                "the commit lists more partitions of topic {:?} than its {count}",
                o.topic
            )));
        }
    }
    Ok(())
}

/// Checks an id a client gives (a member id): at most [`ID_BYTES_MAX`] bytes.
pub fn id(what: &str, id: &str) -> Result<()> {
    if id.len() > ID_BYTES_MAX {
        return Err(Error::InvalidArgument(format!(
            "{what} is {} bytes; it must be at most {ID_BYTES_MAX}",
            id.len()
        )));
    }
    Ok(())
}

/// Checks a member's client id against `--max-client-id-bytes`.
pub fn client_id(client_id: &str, max: usize) -> Result<()> {
    if client_id.len() > max {
        return Err(Error::LimitExceeded {
            limit: "max_client_id_bytes",
            message: format!(
                "the client id is {} bytes, more than {max}",
                client_id.len()
            ),
        });
    }
    Ok(())
}

/// A set of partition numbers below [`PARTITIONS_MAX`], without allocating.
pub(crate) struct PartitionSet([u64; PARTITIONS_MAX as usize / 64]);

impl Default for PartitionSet {
    fn default() -> PartitionSet {
        PartitionSet([0; PARTITIONS_MAX as usize / 64])
    }
}

impl PartitionSet {
    /// Adds `p` (below [`PARTITIONS_MAX`]); false if it was there already.
    pub(crate) fn insert(&mut self, p: u32) -> bool {
        let (word, bit) = (p as usize / 64, 1u64 << (p % 64));
        let fresh = self.0[word] & bit == 0;
        self.0[word] |= bit;
        fresh
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_list_names_each_partition_of_the_topic_once() {
        assert!(partition_list("t", 3, &[], "reset").is_ok());
        assert!(partition_list("t", 3, &[2, 0, 1], "reset").is_ok());
        let twice = partition_list("t", 3, &[1, 1], "reset").expect_err("duplicate");
        assert!(twice.to_string().contains("t/1 twice"), "{twice}");
        let long = partition_list("t", 3, &[0; 1_000_000], "reset").expect_err("long");
        assert!(
            long.to_string().contains("lists 1000000 partitions"),
            "{long}"
        );
        assert!(matches!(
            partition_list("t", 3, &[3], "reset"),
            Err(Error::PartitionNotFound { partition: 3, .. })
        ));
    }

    #[test]
    fn partition_sets_cover_every_partition_number() {
        let mut set = PartitionSet::default();
        assert!(set.insert(0));
        assert!(set.insert(PARTITIONS_MAX - 1));
        assert!(!set.insert(PARTITIONS_MAX - 1));
        assert!(set.insert(64));
        assert!(!set.insert(0));
    }

    #[test]
    fn long_ids_are_refused_with_the_limit_named() {
        assert!(id("member id", &"m".repeat(ID_BYTES_MAX)).is_ok());
        assert!(id("member id", &"m".repeat(ID_BYTES_MAX + 1)).is_err());
        let e = client_id(&"c".repeat(3 << 20), 255).expect_err("too long");
        assert_eq!(e.reason(), "limit_exceeded");
        assert!(e.to_string().contains("max_client_id_bytes"), "{e}");
    }
}
