//! A check of every array and string length in a request body against the bytes that
//! follow, before the codec sees it. The codec reserves room for an array from its
//! count (`Vec::with_capacity`): a 20-byte Produce claiming two billion topics made it
//! ask for 150 GB and abort the whole process. Here each request the listener serves
//! is walked by its schema (field order and types per version, as the codec reads
//! them); a count that could not fit in the remaining bytes closes the connection.

use std::collections::HashSet;

use kafka_protocol::messages::{ApiKey, JoinGroupRequest, SyncGroupRequest};

use crate::grpc::checks::PartitionSet;
use crate::topics::settings::PARTITIONS_MAX;

/// A field type as the wire carries it.
#[derive(Debug, Clone, Copy)]
enum Ty {
    /// Fixed-size: 1, 2, 4, 8 or 16 (uuid) bytes.
    Fixed(usize),
    /// A (nullable) string: i16 length, or compact.
    Str,
    /// (Nullable) bytes: i32 length, or compact.
    Bytes,
    /// An array of structs, of at most `Cap` entries.
    Array(&'static [Field], Cap),
    /// An array of fixed-size values of this size.
    Fixeds(usize, Cap),
    /// An array of strings.
    Strs(Cap),
}

/// How many entries an array may claim, checked before the codec decodes it: each
/// entry becomes a struct (a `Vec` element of tens to hundreds of bytes, a string a
/// 32-byte `Bytes`) from as little as one or two bytes of frame, so a frame that only
/// had to fit its counts still decoded to ~30x its size.
#[derive(Debug, Clone, Copy)]
enum Cap {
    /// Topics (or DescribeConfigs resources): [`Bounds::topics`].
    Topics,
    /// Partitions of one topic: at most [`PARTITIONS_MAX`], and at most
    /// [`Bounds::partitions`] over the whole request.
    Partitions,
    /// Groups: [`Bounds::groups`].
    Groups,
    /// Members of one group: [`Bounds::members`].
    Members,
    /// A fixed number, for lists real clients keep short.
    Few(usize),
}

/// A field present in versions `from..=to`.
#[derive(Debug, Clone, Copy)]
struct Field {
    from: i16,
    to: i16,
    ty: Ty,
}

const fn f(ty: Ty) -> Field {
    Field {
        from: 0,
        to: i16::MAX,
        ty,
    }
}

const fn since(from: i16, ty: Ty) -> Field {
    Field {
        from,
        to: i16::MAX,
        ty,
    }
}

const fn upto(to: i16, ty: Ty) -> Field {
    Field { from: 0, to, ty }
}

const fn between(from: i16, to: i16, ty: Ty) -> Field {
    Field { from, to, ty }
}

use Cap::{Few, Groups, Members, Partitions, Topics};
use Ty::{Bytes, Fixed, Fixeds, Str, Strs};
const I8: Ty = Fixed(1);
const I16: Ty = Fixed(2);
const I32: Ty = Fixed(4);
const I64: Ty = Fixed(8);
const UUID: Ty = Fixed(16);

const API_VERSIONS: &[Field] = &[since(3, Str), since(3, Str)];

const METADATA_TOPIC: &[Field] = &[since(10, UUID), f(Str)];
const METADATA: &[Field] = &[
    f(Ty::Array(METADATA_TOPIC, Topics)),
    since(4, I8),
    between(8, 10, I8),
    since(8, I8),
];

const PRODUCE_PARTITION: &[Field] = &[f(I32), f(Bytes)];
const PRODUCE_TOPIC: &[Field] = &[
    upto(12, Str),
    since(13, UUID),
    f(Ty::Array(PRODUCE_PARTITION, Partitions)),
];
const PRODUCE: &[Field] = &[f(Str), f(I16), f(I32), f(Ty::Array(PRODUCE_TOPIC, Topics))];

const FETCH_PARTITION: &[Field] = &[
    f(I32),
    since(9, I32),
    f(I64),
    since(12, I32),
    since(5, I64),
    f(I32),
];
const FETCH_TOPIC: &[Field] = &[
    upto(12, Str),
    since(13, UUID),
    f(Ty::Array(FETCH_PARTITION, Partitions)),
];
const FORGOTTEN_TOPIC: &[Field] = &[
    between(7, 12, Str),
    since(13, UUID),
    since(7, Fixeds(4, Partitions)),
];
const FETCH: &[Field] = &[
    upto(14, I32),
    f(I32),
    f(I32),
    f(I32),
    f(I8),
    since(7, I32),
    since(7, I32),
    f(Ty::Array(FETCH_TOPIC, Topics)),
    since(7, Ty::Array(FORGOTTEN_TOPIC, Topics)),
    since(11, Str),
];

const LIST_OFFSETS_PARTITION: &[Field] = &[f(I32), since(4, I32), f(I64)];
const LIST_OFFSETS_TOPIC: &[Field] = &[f(Str), f(Ty::Array(LIST_OFFSETS_PARTITION, Partitions))];
const LIST_OFFSETS: &[Field] = &[
    f(I32),
    since(2, I8),
    f(Ty::Array(LIST_OFFSETS_TOPIC, Topics)),
    since(10, I32),
];

const CREATE_ASSIGNMENT: &[Field] = &[f(I32), f(Fixeds(4, Few(REPLICAS_MAX)))];
const CREATE_CONFIG: &[Field] = &[f(Str), f(Str)];
const CREATE_TOPIC: &[Field] = &[
    f(Str),
    f(I32),
    f(I16),
    f(Ty::Array(CREATE_ASSIGNMENT, Partitions)),
    f(Ty::Array(CREATE_CONFIG, Few(CONFIGS_MAX))),
];
const CREATE_TOPICS: &[Field] = &[f(Ty::Array(CREATE_TOPIC, Topics)), f(I32), f(I8)];

const DELETE_TOPIC: &[Field] = &[since(6, Str), since(6, UUID)];
const DELETE_TOPICS: &[Field] = &[
    since(6, Ty::Array(DELETE_TOPIC, Topics)),
    upto(5, Strs(Topics)),
    f(I32),
];

const INIT_PRODUCER_ID: &[Field] = &[f(Str), f(I32), since(3, I64), since(3, I16)];

const FIND_COORDINATOR: &[Field] = &[upto(3, Str), since(1, I8), since(4, Strs(Groups))];

const COMMIT_PARTITION: &[Field] = &[f(I32), f(I64), since(6, I32), f(Str)];
const COMMIT_TOPIC: &[Field] = &[f(Str), f(Ty::Array(COMMIT_PARTITION, Partitions))];
const OFFSET_COMMIT: &[Field] = &[
    f(Str),
    f(I32),
    f(Str),
    since(7, Str),
    upto(4, I64),
    f(Ty::Array(COMMIT_TOPIC, Topics)),
];

const OFFSET_FETCH_TOPIC: &[Field] = &[f(Str), f(Fixeds(4, Partitions))];
const OFFSET_FETCH: &[Field] = &[
    upto(7, Str),
    upto(7, Ty::Array(OFFSET_FETCH_TOPIC, Topics)),
    since(7, I8),
];

const LIST_GROUPS: &[Field] = &[
    since(4, Strs(Few(FILTERS_MAX))),
    since(5, Strs(Few(FILTERS_MAX))),
];

const JOIN_PROTOCOL: &[Field] = &[f(Str), f(Bytes)];
const JOIN_GROUP: &[Field] = &[
    f(Str),
    f(I32),
    since(1, I32),
    f(Str),
    since(5, Str),
    f(Str),
    f(Ty::Array(JOIN_PROTOCOL, Few(JOIN_PROTOCOLS_MAX))),
    since(8, Str),
];

const SYNC_ASSIGNMENT: &[Field] = &[f(Str), f(Bytes)];
const SYNC_GROUP: &[Field] = &[
    f(Str),
    f(I32),
    f(Str),
    since(3, Str),
    since(5, Str),
    since(5, Str),
    f(Ty::Array(SYNC_ASSIGNMENT, Members)),
];

const HEARTBEAT: &[Field] = &[f(Str), f(I32), f(Str), since(3, Str)];

const LEAVE_MEMBER: &[Field] = &[f(Str), f(Str), since(5, Str)];
const LEAVE_GROUP: &[Field] = &[
    f(Str),
    upto(2, Str),
    since(3, Ty::Array(LEAVE_MEMBER, Members)),
];

const DESCRIBE_GROUPS: &[Field] = &[f(Strs(Groups)), since(3, I8)];

const CONFIG_RESOURCE: &[Field] = &[f(I8), f(Str), f(Strs(Few(CONFIGS_MAX)))];
const DESCRIBE_CONFIGS: &[Field] = &[f(Ty::Array(CONFIG_RESOURCE, Topics)), f(I8), since(3, I8)];

const CONSUMER_TOPIC: &[Field] = &[f(Str), f(Fixeds(4, Partitions))];
const CONSUMER_ASSIGNMENT: &[Field] = &[f(Ty::Array(CONSUMER_TOPIC, Topics)), f(Bytes)];
const CONSUMER_SUBSCRIPTION: &[Field] = &[
    f(Strs(Topics)),
    f(Bytes),
    since(1, Ty::Array(CONSUMER_TOPIC, Topics)),
    since(2, I32),
    since(3, Str),
];

/// Checks a consumer protocol assignment (`assignment`) or subscription body, as a
/// member sends them in JoinGroup and SyncGroup, before the codec reads it. Its lists
/// are bounded by [`Bounds::CONSUMER`] (the JoinGroup or SyncGroup that carried it
/// was bounded to 1 MiB already).
pub fn check_consumer_protocol(assignment: bool, version: i16, body: &[u8]) -> Result<(), String> {
    let fields = if assignment {
        CONSUMER_ASSIGNMENT
    } else {
        CONSUMER_SUBSCRIPTION
    };
    Walk::new(body, version, false, &Bounds::CONSUMER).fields(fields)
}

/// The body schema of `api` and the first version that is flexible (compact lengths,
/// tagged fields); `None` for APIs the listener does not serve.
fn schema(api: ApiKey, version: i16) -> Option<(&'static [Field], i16)> {
    Some(match api {
        ApiKey::ApiVersions => (API_VERSIONS, 3),
        ApiKey::Metadata => (METADATA, 9),
        ApiKey::Produce => (PRODUCE, 9),
        ApiKey::Fetch => (FETCH, 12),
        ApiKey::ListOffsets => (LIST_OFFSETS, 6),
        ApiKey::CreateTopics => (CREATE_TOPICS, 5),
        ApiKey::DeleteTopics => (DELETE_TOPICS, 4),
        ApiKey::InitProducerId => (INIT_PRODUCER_ID, 2),
        ApiKey::FindCoordinator => (FIND_COORDINATOR, 3),
        ApiKey::OffsetCommit => (OFFSET_COMMIT, 8),
        // v8+ (groups batched) is not served, and not described here.
        ApiKey::OffsetFetch if version <= 7 => (OFFSET_FETCH, 6),
        ApiKey::ListGroups => (LIST_GROUPS, 3),
        ApiKey::JoinGroup => (JOIN_GROUP, 6),
        ApiKey::SyncGroup => (SYNC_GROUP, 4),
        ApiKey::Heartbeat => (HEARTBEAT, 4),
        ApiKey::LeaveGroup => (LEAVE_GROUP, 4),
        ApiKey::DescribeGroups => (DESCRIBE_GROUPS, 5),
        ApiKey::DescribeConfigs => (DESCRIBE_CONFIGS, 4),
        _ => return None,
    })
}

/// What the arrays of one request may hold, from the broker's state and limits when
/// the request arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Topics (or DescribeConfigs resources) one request may name: the broker's topics
    /// plus [`TOPICS_SLACK`].
    pub topics: usize,
    /// Partitions one request may list over all its topics: `max_partitions`, the most
    /// that can be created (or those there are, when a broker started over more), plus
    /// [`PARTITIONS_MAX`] (topics about to be created, or deleted since).
    pub partitions: usize,
    /// Groups one request may name: `max_groups` plus [`TOPICS_SLACK`] (groups of
    /// committed offsets only are not counted by `max_groups`).
    pub groups: usize,
    /// Members one SyncGroup may assign or one LeaveGroup may name: `max_group_members`.
    pub members: usize,
}

impl Bounds {
    /// Bounds for a consumer protocol message, which names no more than a broker can
    /// hold of the default limits (it is not checked against one broker's state).
    pub const CONSUMER: Bounds = Bounds {
        topics: crate::limits::PARTITIONS_DEFAULT,
        partitions: crate::limits::PARTITIONS_DEFAULT,
        groups: 0,
        members: 0,
    };

    /// The bounds of a broker with `topics` topics of `partitions` partitions in all,
    /// and these limits.
    pub fn new(topics: usize, partitions: usize, limits: &crate::limits::Limits) -> Bounds {
        Bounds {
            topics: topics.saturating_add(TOPICS_SLACK),
            partitions: limits
                .partitions
                .max(partitions)
                .saturating_add(PARTITIONS_MAX as usize),
            groups: limits.groups.saturating_add(TOPICS_SLACK),
            members: limits.group_members,
        }
    }
}

/// Checks the body (after the request header) of a request of `api` at `version`:
/// every length and count fits in the bytes that follow it, every array holds at most
/// what `bounds` allows, and nothing follows the last field (padding would make a
/// small request hold a large share of the request budget).
pub fn check(api: ApiKey, version: i16, body: &[u8], bounds: &Bounds) -> Result<(), String> {
    match unread(api, version, body, bounds)? {
        0 => Ok(()),
        extra => Err(format!(
            "invalid {api:?} v{version} request: {extra} bytes follow its last field"
        )),
    }
}

/// The request header up to its tagged fields: api key, version, correlation id and
/// client id (a classic nullable string in every header version).
const HEADER: &[Field] = &[f(I16), f(I16), f(I32), since(1, Str)];

/// Checks a request header of `header_version` at the start of `frame` before the
/// codec reads it: its client id fits the frame and, in a v2 header, it carries at most
/// [`TAGGED_FIELDS_MAX`] tagged fields (each a map entry once decoded, from 2 bytes).
pub fn header(header_version: i16, frame: &[u8]) -> Result<(), String> {
    let mut walk = Walk::new(frame, header_version, false, &Bounds::CONSUMER);
    walk.fields(HEADER)
        .and_then(|()| {
            if header_version >= 2 {
                walk.tags()
            } else {
                Ok(())
            }
        })
        .map_err(|e| format!("invalid request header v{header_version}: {e}"))
}

/// [`check`], returning how many bytes follow the last field.
fn unread(api: ApiKey, version: i16, body: &[u8], bounds: &Bounds) -> Result<usize, String> {
    let (fields, flexible_from) =
        schema(api, version).ok_or_else(|| format!("{api:?} has no schema to check"))?;
    let mut walk = Walk::new(body, version, version >= flexible_from, bounds);
    walk.fields(fields)
        .map_err(|e| format!("invalid {api:?} v{version} request: {e}"))?;
    Ok(walk.rest.len())
}

/// Longest topic name Kafka accepts (and creates).
pub const TOPIC_NAME_MAX: usize = 249;
/// Longest group id, member id, group instance id or client id a Kafka request may carry.
pub const ID_MAX: usize = 255;
/// Topics a request may name beyond the broker's topic count (topics about to be
/// auto-created, or deleted since the client's last Metadata).
pub const TOPICS_SLACK: usize = 1024;
/// Replicas one CreateTopics partition assignment may list (Strata is one node and
/// refuses assignments; Kafka clusters have a handful of replicas).
const REPLICAS_MAX: usize = 16;
/// Configs one CreateTopics topic may set, or one DescribeConfigs resource may ask for
/// (Kafka topics have about 40).
const CONFIGS_MAX: usize = 64;
/// States or types one ListGroups may filter by (Kafka has 6 states and 3 types).
const FILTERS_MAX: usize = 16;
/// Tagged fields one struct may carry: each unknown one is kept by the codec in a map
/// entry of ~60 bytes from 2 bytes of frame; Kafka's structs define at most a few.
const TAGGED_FIELDS_MAX: usize = 32;

/// Checks the topics of a decoded request (each with the partitions it lists): names
/// at most [`TOPIC_NAME_MAX`] bytes, each topic once, and per topic each partition
/// once ([`check`] bounded how many there are before they were decoded). What a
/// request may then make the broker hold (copies, tasks, response entries) is bounded
/// by the topics that exist, not by how many times a small frame repeats a name or a
/// partition.
pub fn topics<'a, P>(
    what: &str,
    topics: impl ExactSizeIterator<Item = (&'a str, P)>,
) -> Result<(), String>
where
    P: ExactSizeIterator<Item = i32>,
{
    let mut seen = HashSet::with_capacity(topics.len());
    for (name, partitions) in topics {
        if name.len() > TOPIC_NAME_MAX {
            return Err(format!(
                "{what} names a topic of {} bytes; topic names are at most {TOPIC_NAME_MAX}",
                name.len()
            ));
        }
        if !seen.insert(name) {
            return Err(format!("{what} names topic {name:?} twice"));
        }
        let mut listed = PartitionSet::default();
        for p in partitions {
            if let Ok(p) = u32::try_from(p) {
                if p < PARTITIONS_MAX && !listed.insert(p) {
                    return Err(format!("{what} lists partition {name}/{p} twice"));
                }
            }
        }
    }
    Ok(())
}

/// Checks a group, member, instance or client id of a decoded request: at most
/// [`ID_MAX`] bytes.
pub fn id(what: &str, id: &str) -> Result<(), String> {
    if id.len() > ID_MAX {
        return Err(format!(
            "the {what} is {} bytes; it must be at most {ID_MAX}",
            id.len()
        ));
    }
    Ok(())
}

/// Checks that `names` names each group once and are valid ids.
pub fn groups<'a>(what: &str, names: impl ExactSizeIterator<Item = &'a str>) -> Result<(), String> {
    let mut seen = HashSet::with_capacity(names.len());
    for name in names {
        id("group id", name)?;
        if !seen.insert(name) {
            return Err(format!("{what} names group {name:?} twice"));
        }
    }
    Ok(())
}

/// Most protocols one JoinGroup may offer (Java consumers offer one or two assignors).
pub const JOIN_PROTOCOLS_MAX: usize = 16;
/// Most bytes of protocol metadata one JoinGroup may carry (all its protocols), and of
/// the assignment a SyncGroup gives one member: the group keeps them for the member's
/// life. A consumer's subscription or assignment of thousands of partitions is tens of
/// KiB.
pub const GROUP_METADATA_MAX: usize = 1 << 20;

/// Checks a decoded JoinGroup and its header's client id: ids at most [`ID_MAX`]
/// bytes, at most [`JOIN_PROTOCOLS_MAX`] protocols each named once, and at most
/// [`GROUP_METADATA_MAX`] bytes of their metadata.
pub fn join(request: &JoinGroupRequest, client_id: &str) -> Result<(), String> {
    id("group id", &request.group_id.0)?;
    id("member id", &request.member_id)?;
    id("client id", client_id)?;
    id("protocol type", &request.protocol_type)?;
    if let Some(instance) = &request.group_instance_id {
        id("group instance id", instance)?;
    }
    if request.protocols.len() > JOIN_PROTOCOLS_MAX {
        return Err(format!(
            "JoinGroup offers {} protocols; at most {JOIN_PROTOCOLS_MAX}",
            request.protocols.len()
        ));
    }
    let mut metadata = 0;
    for (i, protocol) in request.protocols.iter().enumerate() {
        id("protocol name", &protocol.name)?;
        if request.protocols[..i]
            .iter()
            .any(|p| p.name == protocol.name)
        {
            return Err(format!(
                "JoinGroup offers protocol {:?} twice",
                protocol.name.as_str()
            ));
        }
        metadata += protocol.metadata.len();
    }
    if metadata > GROUP_METADATA_MAX {
        return Err(format!(
            "JoinGroup carries {metadata} bytes of protocol metadata; at most {GROUP_METADATA_MAX}"
        ));
    }
    Ok(())
}

/// Checks a decoded SyncGroup: ids at most [`ID_MAX`] bytes and each member's
/// assignment at most [`GROUP_METADATA_MAX`] bytes.
pub fn sync(request: &SyncGroupRequest) -> Result<(), String> {
    id("group id", &request.group_id.0)?;
    id("member id", &request.member_id)?;
    if let Some(instance) = &request.group_instance_id {
        id("group instance id", instance)?;
    }
    for assignment in &request.assignments {
        id("member id", &assignment.member_id)?;
        if assignment.assignment.len() > GROUP_METADATA_MAX {
            return Err(format!(
                "SyncGroup assigns {} bytes to member {:?}; at most {GROUP_METADATA_MAX}",
                assignment.assignment.len(),
                assignment.member_id.as_str()
            ));
        }
    }
    Ok(())
}

struct Walk<'a> {
    rest: &'a [u8],
    version: i16,
    flexible: bool,
    bounds: &'a Bounds,
    /// Partitions listed so far, over all topics of the request.
    partitions: usize,
}

impl<'a> Walk<'a> {
    fn new(rest: &'a [u8], version: i16, flexible: bool, bounds: &'a Bounds) -> Walk<'a> {
        Walk {
            rest,
            version,
            flexible,
            bounds,
            partitions: 0,
        }
    }

    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        if n > self.rest.len() {
            return Err(format!(
                "a field needs {n} bytes, {} remain",
                self.rest.len()
            ));
        }
        let (taken, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(taken)
    }

    fn int(&mut self, n: usize) -> Result<i64, String> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0i64, |v, &b| (v << 8) | i64::from(b))
            // Sign-extend from n bytes.
            << (64 - 8 * n)
            >> (64 - 8 * n))
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..35).step_by(7) {
            let byte = self.take(1)?[0];
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("a varint longer than 5 bytes".into())
    }

    /// A length or count: `None` for null.
    fn length(&mut self, classic_bytes: usize) -> Result<Option<usize>, String> {
        let n = if self.flexible {
            self.varint()? as i64 - 1
        } else {
            self.int(classic_bytes)?
        };
        match n {
            -1 => Ok(None),
            n if n < 0 => Err(format!("negative length {n}")),
            n => Ok(Some(n as usize)),
        }
    }

    /// An array count whose elements, `min` bytes each at least, fit what remains, and
    /// that `cap` allows.
    fn count(&mut self, min: usize, cap: Cap) -> Result<usize, String> {
        let n = self.length(4)?.unwrap_or(0);
        if n.saturating_mul(min) > self.rest.len() {
            return Err(format!(
                "an array claims {n} elements but only {} bytes remain",
                self.rest.len()
            ));
        }
        let (most, what) = match cap {
            Topics => (self.bounds.topics, "topics"),
            Partitions => {
                if n > PARTITIONS_MAX as usize {
                    return Err(format!(
                        "lists {n} partitions of one topic; a topic has at most \
                         {PARTITIONS_MAX}"
                    ));
                }
                self.partitions += n;
                (self.bounds.partitions, "partitions in all")
            }
            Groups => (self.bounds.groups, "groups"),
            Members => (self.bounds.members, "group members"),
            Few(most) => (most, "entries in a list"),
        };
        let claimed = if matches!(cap, Partitions) {
            self.partitions
        } else {
            n
        };
        if claimed > most {
            return Err(format!(
                "names {claimed} {what}; at most {most} are allowed"
            ));
        }
        Ok(n)
    }

    fn fields(&mut self, fields: &[Field]) -> Result<(), String> {
        for field in fields {
            if (field.from..=field.to).contains(&self.version) {
                self.value(field.ty)?;
            }
        }
        if self.flexible {
            self.tags()?;
        }
        Ok(())
    }

    /// The tagged fields that end a struct of a flexible version.
    fn tags(&mut self) -> Result<(), String> {
        // The number of tagged fields is a plain unsigned varint, not a compact length
        // (no +1): read as one, the guard and the codec would walk different fields of
        // the same bytes, and the codec could allocate from a count the guard never saw.
        let tags = usize::try_from(self.varint()?).unwrap_or(usize::MAX);
        if tags.saturating_mul(2) > self.rest.len() {
            return Err(format!(
                "{tags} tagged fields claimed but only {} bytes remain",
                self.rest.len()
            ));
        }
        if tags > TAGGED_FIELDS_MAX {
            return Err(format!(
                "a struct carries {tags} tagged fields; at most {TAGGED_FIELDS_MAX}"
            ));
        }
        for _ in 0..tags {
            self.varint()?;
            let size = self.varint()? as usize;
            self.take(size)?;
        }
        Ok(())
    }

    fn value(&mut self, ty: Ty) -> Result<(), String> {
        match ty {
            Fixed(n) => {
                self.take(n)?;
            }
            Str | Bytes => {
                let classic = if matches!(ty, Str) { 2 } else { 4 };
                if let Some(n) = self.length(classic)? {
                    self.take(n)?;
                }
            }
            Ty::Array(fields, cap) => {
                let n = self.count(self.min_size(fields), cap)?;
                for _ in 0..n {
                    self.fields(fields)?;
                }
            }
            Fixeds(size, cap) => {
                let n = self.count(size, cap)?;
                self.take(n * size)?;
            }
            Strs(cap) => {
                let n = self.count(if self.flexible { 1 } else { 2 }, cap)?;
                for _ in 0..n {
                    self.value(Str)?;
                }
            }
        }
        Ok(())
    }

    /// The fewest bytes a struct of `fields` takes at this version.
    fn min_size(&self, fields: &[Field]) -> usize {
        let compact = usize::from(self.flexible);
        let size: usize = fields
            .iter()
            .filter(|f| (f.from..=f.to).contains(&self.version))
            .map(|f| match f.ty {
                Fixed(n) => n,
                Str => 1 + (1 - compact),
                Bytes | Ty::Array(..) | Fixeds(..) | Strs(_) => {
                    if self.flexible {
                        1
                    } else {
                        4
                    }
                }
            })
            .sum();
        (size + compact).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed<'a>(
        topics: &'a [(&'a str, &'a [i32])],
    ) -> impl ExactSizeIterator<Item = (&'a str, std::iter::Copied<std::slice::Iter<'a, i32>>)>
    {
        topics.iter().map(|(t, p)| (*t, p.iter().copied()))
    }

    #[test]
    fn a_request_names_each_topic_and_partition_once() {
        assert!(topics(
            "Produce",
            listed(&[("a", &[0, 1, -1, 20_000, 20_000]), ("b", &[])])
        )
        .is_ok());
        let twice =
            topics("Produce", listed(&[("a", &[0]), ("a", &[1])])).expect_err("topic twice");
        assert!(twice.contains("topic \"a\" twice"), "{twice}");
        let twice = topics("Fetch", listed(&[("a", &[3, 3])])).expect_err("partition twice");
        assert!(twice.contains("a/3 twice"), "{twice}");
        let long = "x".repeat(TOPIC_NAME_MAX + 1);
        let e = topics("Metadata", listed(&[(&long, &[])])).expect_err("long name");
        assert!(e.contains("at most 249"), "{e}");
        assert!(topics("Metadata", listed(&[(&long[1..], &[])])).is_ok());
        assert!(groups("DescribeGroups", ["a", "b"].into_iter()).is_ok());
        assert!(groups("DescribeGroups", ["a", "a"].into_iter()).is_err());
        assert!(id("member id", &"m".repeat(ID_MAX)).is_ok());
        assert!(id("member id", &"m".repeat(ID_MAX + 1)).is_err());
    }

    #[test]
    fn group_requests_carry_short_ids_and_at_most_a_mib_of_metadata() {
        use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
        use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
        let protocol = |name: &'static str, size: usize| {
            JoinGroupRequestProtocol::default()
                .with_name(StrBytes::from_static_str(name))
                .with_metadata(Buf::from(vec![0u8; size]))
        };
        let request = JoinGroupRequest::default()
            .with_protocol_type(StrBytes::from_static_str("consumer"))
            .with_protocols(vec![
                protocol("range", GROUP_METADATA_MAX / 2),
                protocol("sticky", GROUP_METADATA_MAX / 2),
            ]);
        assert!(join(&request, "client").is_ok());
        let e = join(&request, &"c".repeat(ID_MAX + 1)).expect_err("client id");
        assert!(e.contains("client id is 256 bytes"), "{e}");
        let mut big = request.clone();
        big.protocols[1].metadata = Buf::from(vec![0u8; GROUP_METADATA_MAX / 2 + 1]);
        assert!(join(&big, "client")
            .expect_err("metadata")
            .contains("protocol metadata"));
        let mut twice = request.clone();
        twice.protocols[1].name = StrBytes::from_static_str("range");
        assert!(join(&twice, "client").expect_err("twice").contains("twice"));
        let mut many = request;
        many.protocols = (0..=JOIN_PROTOCOLS_MAX).map(|_| protocol("p", 0)).collect();
        assert!(join(&many, "client")
            .expect_err("many")
            .contains("protocols"));
        let assign = |size: usize| {
            SyncGroupRequest::default()
                .with_assignments(vec![SyncGroupRequestAssignment::default()
                    .with_member_id(StrBytes::from_static_str("m"))
                    .with_assignment(Buf::from(vec![0u8; size]))])
        };
        assert!(sync(&assign(GROUP_METADATA_MAX)).is_ok());
        assert!(sync(&assign(GROUP_METADATA_MAX + 1)).is_err());
    }
    use bytes::{Bytes as Buf, BytesMut};
    use kafka_protocol::messages::{
        create_topics_request, fetch_request, produce_request, CreateTopicsRequest, FetchRequest,
        MetadataRequest, ProduceRequest, TopicName,
    };
    use kafka_protocol::protocol::{Encodable, StrBytes};

    /// Bounds that refuse nothing a frame can carry: the tests of lengths that do not
    /// fit their frame.
    const WIDE: Bounds = Bounds {
        topics: usize::MAX,
        partitions: usize::MAX,
        groups: usize::MAX,
        members: usize::MAX,
    };

    fn check_wide(api: ApiKey, version: i16, body: &[u8]) -> Result<(), String> {
        check(api, version, body, &WIDE)
    }

    fn encoded<T: Encodable>(request: &T, version: i16) -> Vec<u8> {
        let mut out = BytesMut::new();
        request.encode(&mut out, version).expect("encode");
        out.to_vec()
    }

    fn name(s: &str) -> TopicName {
        TopicName(StrBytes::from_string(s.to_string()))
    }

    /// Real requests of every served version pass; the same with a count inflated
    /// does not.
    #[test]
    fn real_requests_pass_and_inflated_counts_fail() {
        let produce = ProduceRequest::default()
            .with_acks(-1)
            .with_topic_data(vec![produce_request::TopicProduceData::default()
                .with_name(name("t"))
                .with_partition_data(vec![
                    produce_request::PartitionProduceData::default()
                        .with_records(Some(Buf::from_static(b"records"))),
                ])]);
        let fetch = FetchRequest::default().with_topics(vec![fetch_request::FetchTopic::default()
            .with_topic(name("t"))
            .with_partitions(vec![fetch_request::FetchPartition::default()])]);
        let create = CreateTopicsRequest::default().with_topics(vec![
            create_topics_request::CreatableTopic::default()
                .with_name(name("t"))
                .with_configs(vec![create_topics_request::CreatableTopicConfig::default()
                    .with_name(StrBytes::from_static_str("retention.ms"))
                    .with_value(Some(StrBytes::from_static_str("1000")))]),
        ]);
        for version in 3..=9 {
            check_wide(ApiKey::Produce, version, &encoded(&produce, version)).expect("produce");
        }
        for version in 4..=12 {
            check_wide(ApiKey::Fetch, version, &encoded(&fetch, version)).expect("fetch");
        }
        for version in 2..=7 {
            check_wide(ApiKey::CreateTopics, version, &encoded(&create, version)).expect("create");
        }
        for version in 0..=12 {
            let metadata = MetadataRequest::default().with_topics(Some(vec![
                kafka_protocol::messages::metadata_request::MetadataRequestTopic::default()
                    .with_name(Some(name("t"))),
            ]));
            check_wide(ApiKey::Metadata, version, &encoded(&metadata, version)).expect("metadata");
        }
        // Tagged fields, in a struct of a flexible version: the count is a plain varint.
        let mut tagged = produce_request::TopicProduceData::default()
            .with_name(name("t"))
            .with_partition_data(vec![produce_request::PartitionProduceData::default()
                .with_records(Some(Buf::from_static(b"records")))]);
        tagged
            .unknown_tagged_fields
            .insert(7, Buf::from_static(b"tag"));
        let with_tags = ProduceRequest::default()
            .with_acks(-1)
            .with_topic_data(vec![tagged.clone(), tagged.with_name(name("u"))]);
        check_wide(ApiKey::Produce, 9, &encoded(&with_tags, 9)).expect("tagged fields");
        // Produce v3: null transactional id, acks, timeout, then the topic count.
        let mut body = encoded(&produce, 3);
        body[8..12].copy_from_slice(&i32::MAX.to_be_bytes());
        let e = check_wide(ApiKey::Produce, 3, &body).expect_err("inflated");
        assert!(e.contains("claims 2147483647 elements"), "{e}");
        // The 20-byte frame that aborted the broker through the codec.
        let e = check_wide(
            ApiKey::Produce,
            3,
            &[0xff, 0xff, 0, 1, 0, 0, 3, 0xe8, 0x7f, 0xff, 0xff, 0xff],
        )
        .expect_err("inflated");
        assert!(e.contains("claims"), "{e}");
        // Flexible: a compact count of 2^28 topics.
        let e = check_wide(
            ApiKey::Metadata,
            9,
            &[0x80, 0x80, 0x80, 0x80, 0x01, 0, 0, 0],
        )
        .expect_err("inflated");
        assert!(e.contains("claims"), "{e}");
        // Padding after the last field: a small request in a large frame.
        let mut padded = encoded(&fetch, 12);
        padded.extend_from_slice(&[0; 16]);
        let e = check_wide(ApiKey::Fetch, 12, &padded).expect_err("padded");
        assert!(e.contains("16 bytes follow its last field"), "{e}");
        // Truncated strings and negative lengths.
        assert!(check_wide(ApiKey::CreateTopics, 2, &[0, 0, 0, 1, 0, 9, b'a']).is_err());
        assert!(check_wide(ApiKey::CreateTopics, 2, &[0xff, 0xff, 0xff, 0xf0]).is_err());
    }

    /// Decoding alone amplifies a frame: a Metadata topic entry with an empty name is 2
    /// bytes of frame and a struct of ~70 bytes once decoded, a DescribeGroups group
    /// name 2 bytes and a 32-byte string (then a described group in the answer). A
    /// frame that only had to fit its counts decoded to ~30x its size; counted before
    /// the decode, what one request decodes to is bounded by the broker's topics and
    /// limits. Measured by counting decoded entries.
    #[test]
    fn arrays_are_capped_before_the_codec_decodes_them() {
        use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
        use kafka_protocol::messages::{DescribeGroupsRequest, GroupId};
        use kafka_protocol::protocol::Decodable;
        let limits = crate::limits::Limits::default();
        let bounds = Bounds::new(10, 10, &limits);
        assert_eq!(bounds.topics, 10 + TOPICS_SLACK);
        assert_eq!(
            bounds.partitions,
            limits.partitions + PARTITIONS_MAX as usize
        );
        // A broker started over more partitions than max_partitions still serves them.
        let over = Bounds::new(10, limits.partitions * 2, &limits);
        assert_eq!(
            over.partitions,
            limits.partitions * 2 + PARTITIONS_MAX as usize
        );
        let entries = 100_000;
        for version in [4, 9, 12] {
            let metadata = |n: usize| {
                encoded(
                    &MetadataRequest::default().with_topics(Some(vec![
                        MetadataRequestTopic::default()
                            .with_name(Some(name("")));
                        n
                    ])),
                    version,
                )
            };
            let body = metadata(entries);
            // The frame fits its counts: without the bounds, all of it decodes.
            check(ApiKey::Metadata, version, &body, &WIDE).expect("fits its frame");
            let decoded = MetadataRequest::decode(&mut Buf::from(body.clone()), version)
                .expect("decodes")
                .topics
                .map_or(0, |t| t.len());
            assert_eq!(decoded, entries);
            let amplification = decoded * std::mem::size_of::<MetadataRequestTopic>() / body.len();
            println!(
                "Metadata v{version}: a {} byte frame decodes to {decoded} entries, {}x its \
                 size; now refused beyond {} entries ({} bytes decoded, whatever the frame)",
                body.len(),
                amplification,
                bounds.topics,
                bounds.topics * std::mem::size_of::<MetadataRequestTopic>()
            );
            // v10+ entries carry a 16-byte topic id, so amplify less.
            let least = if version < 10 { 30 } else { 3 };
            assert!(amplification >= least, "{amplification}x");
            let e = check(ApiKey::Metadata, version, &body, &bounds).expect_err("capped");
            assert!(e.contains("names 100000 topics; at most 1034"), "{e}");
            // At the bound it passes, and decodes to at most the bound.
            let body = metadata(bounds.topics);
            check(ApiKey::Metadata, version, &body, &bounds).expect("at the bound");
            let decoded = MetadataRequest::decode(&mut Buf::from(body), version)
                .expect("decodes")
                .topics
                .map_or(0, |t| t.len());
            assert_eq!(decoded, bounds.topics);
        }
        // DescribeGroups of many distinct groups: capped at max_groups + slack.
        let groups: Vec<GroupId> = (0..limits.groups + TOPICS_SLACK + 1)
            .map(|i| GroupId(StrBytes::from_string(i.to_string())))
            .collect();
        let describe = |groups: &[GroupId]| {
            encoded(
                &DescribeGroupsRequest::default().with_groups(groups.to_vec()),
                5,
            )
        };
        let e = check(ApiKey::DescribeGroups, 5, &describe(&groups), &bounds)
            .expect_err("groups capped");
        assert!(e.contains("groups; at most 11024"), "{e}");
        check(ApiKey::DescribeGroups, 5, &describe(&groups[1..]), &bounds).expect("at the bound");
        // Partitions: at most PARTITIONS_MAX of one topic, and the bound over all topics.
        let small = Bounds {
            partitions: 50,
            ..bounds
        };
        let produce = |topics: usize, partitions: usize| {
            let data = (0..topics)
                .map(|t| {
                    produce_request::TopicProduceData::default()
                        .with_name(name(&t.to_string()))
                        .with_partition_data(vec![
                            produce_request::PartitionProduceData::default();
                            partitions
                        ])
                })
                .collect();
            encoded(&ProduceRequest::default().with_topic_data(data), 9)
        };
        check(ApiKey::Produce, 9, &produce(2, 25), &small).expect("50 partitions");
        let e = check(ApiKey::Produce, 9, &produce(3, 17), &small).expect_err("51 in all");
        assert!(e.contains("51 partitions in all; at most 50"), "{e}");
        let e = check(
            ApiKey::Produce,
            9,
            &produce(1, PARTITIONS_MAX as usize + 1),
            &bounds,
        )
        .expect_err("one topic");
        let expected = format!("{} partitions of one topic", PARTITIONS_MAX + 1);
        assert!(e.contains(&expected), "{e}");
        // Tagged fields: at most a few per struct.
        let mut tagged = produce_request::TopicProduceData::default().with_name(name("t"));
        for tag in 0..=TAGGED_FIELDS_MAX as i32 {
            tagged.unknown_tagged_fields.insert(tag, Buf::new());
        }
        let body = encoded(&ProduceRequest::default().with_topic_data(vec![tagged]), 9);
        let e = check(ApiKey::Produce, 9, &body, &WIDE).expect_err("tags");
        assert!(e.contains("33 tagged fields"), "{e}");
        // Also in a request header (v2), which the codec reads first.
        let mut header = kafka_protocol::messages::RequestHeader::default()
            .with_request_api_key(ApiKey::Produce as i16)
            .with_request_api_version(9)
            .with_client_id(Some(StrBytes::from_static_str("c")));
        let mut frame = encoded(&header, 2);
        super::header(2, &frame).expect("a plain header");
        for tag in 0..=TAGGED_FIELDS_MAX as i32 {
            header.unknown_tagged_fields.insert(tag, Buf::new());
        }
        frame = encoded(&header, 2);
        let e = super::header(2, &frame).expect_err("header tags");
        assert!(e.contains("33 tagged fields"), "{e}");
    }

    proptest::proptest! {
        /// Whatever bytes follow a served request's header, what passes the check is
        /// safe to hand to the codec (an unbounded allocation would abort this test).
        #[test]
        fn the_codec_survives_whatever_passes(
            seed in proptest::collection::vec(proptest::num::u8::ANY, 0..64),
            flips in proptest::collection::vec((0usize..64, proptest::num::u8::ANY), 0..6),
            which in 0usize..4,
            version in 0i16..13,
        ) {
            use kafka_protocol::protocol::Decodable;
            let produce = ProduceRequest::default()
                .with_topic_data(vec![produce_request::TopicProduceData::default()
                    .with_name(name("t"))
                    .with_partition_data(vec![produce_request::PartitionProduceData::default()
                        .with_records(Some(Buf::from_static(b"r")))])]);
            let (api, version) = match which {
                0 => (ApiKey::Produce, 3 + version % 7),
                1 => (ApiKey::Fetch, 4 + version % 9),
                2 => (ApiKey::Metadata, version),
                _ => (ApiKey::CreateTopics, 2 + version % 6),
            };
            // A valid body with bytes overwritten, or random bytes.
            let mut body = match api {
                ApiKey::Produce => encoded(&produce, version),
                _ => seed.clone(),
            };
            for (at, byte) in flips {
                if let Some(b) = body.get_mut(at) {
                    *b = byte;
                }
            }
            if check_wide(api, version, &body).is_ok() {
                let mut bytes = Buf::from(body);
                let _ = match api {
                    ApiKey::Produce => ProduceRequest::decode(&mut bytes, version).map(drop),
                    ApiKey::Fetch => FetchRequest::decode(&mut bytes, version).map(drop),
                    ApiKey::Metadata => MetadataRequest::decode(&mut bytes, version).map(drop),
                    _ => CreateTopicsRequest::decode(&mut bytes, version).map(drop),
                };
            }
        }
    }

    /// A default request of `api` at `version`, encoded, or `None`; with `decode`, the
    /// codec's decode of `body` instead.
    fn codec(api: ApiKey, version: i16, body: Option<Vec<u8>>) -> Option<Vec<u8>> {
        use kafka_protocol::messages::*;
        use kafka_protocol::protocol::Decodable;
        macro_rules! run {
            ($($key:ident => $t:ty),* $(,)?) => {
                match (api, body) {
                    $(
                        (ApiKey::$key, Some(body)) => {
                            let _ = <$t>::decode(&mut Buf::from(body), version);
                            None
                        }
                        (ApiKey::$key, None) => {
                            let mut out = BytesMut::new();
                            <$t>::default().encode(&mut out, version).ok()?;
                            Some(out.to_vec())
                        }
                    )*
                    (other, _) => panic!("{other:?} is served but not covered here"),
                }
            };
        }
        run!(
            Produce => ProduceRequest,
            Fetch => FetchRequest,
            ListOffsets => ListOffsetsRequest,
            Metadata => MetadataRequest,
            ApiVersions => ApiVersionsRequest,
            CreateTopics => CreateTopicsRequest,
            DeleteTopics => DeleteTopicsRequest,
            InitProducerId => InitProducerIdRequest,
            FindCoordinator => FindCoordinatorRequest,
            OffsetCommit => OffsetCommitRequest,
            OffsetFetch => OffsetFetchRequest,
            ListGroups => ListGroupsRequest,
            JoinGroup => JoinGroupRequest,
            SyncGroup => SyncGroupRequest,
            Heartbeat => HeartbeatRequest,
            LeaveGroup => LeaveGroupRequest,
            DescribeGroups => DescribeGroupsRequest,
            DescribeConfigs => DescribeConfigsRequest,
        )
    }

    /// Every served API's schema reads exactly the codec's own encoding of a default
    /// request, at every served version.
    #[test]
    fn every_served_schema_reads_the_codecs_own_encoding() {
        let (mut checked, mut versions) = (0, 0);
        for &(api, min, max) in crate::kafka::versions::SUPPORTED {
            for version in min..=max {
                versions += 1;
                if let Some(body) = codec(api, version, None) {
                    let unread = unread(
                        api,
                        version,
                        &body,
                        &Bounds::new(0, 0, &crate::limits::Limits::default()),
                    )
                    .unwrap_or_else(|e| panic!("{api:?} v{version}: {e}"));
                    assert_eq!(unread, 0, "{api:?} v{version}: the schema misses fields");
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, versions, "every default request encodes");
    }

    proptest::proptest! {
        /// Every served API and version: a default request with bytes overwritten (a
        /// count made huge, typically) passes the check only if the codec can then decode
        /// it without an unbounded allocation (which would abort this test).
        #[test]
        fn every_served_schema_bounds_what_the_codec_allocates(
            flips in proptest::collection::vec((0usize..48, proptest::num::u8::ANY), 1..6),
            which in 0usize..64,
            pick in 0i16..64,
        ) {
            let (api, min, max) = crate::kafka::versions::SUPPORTED
                [which % crate::kafka::versions::SUPPORTED.len()];
            let version = min + pick % (max - min + 1);
            if let Some(mut body) = codec(api, version, None) {
                for (at, byte) in flips {
                    if let Some(b) = body.get_mut(at) {
                        *b = byte;
                    }
                }
                if check_wide(api, version, &body).is_ok() {
                    codec(api, version, Some(body));
                }
            }
        }
    }
}
