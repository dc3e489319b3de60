//! The client subcommands of `strata`: `topic`, `group`, `produce` and `consume`,
//! talking to a broker over gRPC like any other client, through `strata-client`'s
//! connection (`consume --group` through its group [`Consumer`](strata_client::Consumer)).
//!
//! Every error a person can fix says how: the CLI knows which command failed and which
//! topic or group it was about, so it adds the next step to the broker's message.

mod member;

pub mod top;

use std::time::Duration;

use anyhow::Context;
use strata_client::Client;
use strata_proto::v1::{self, admin_client::AdminClient, broker_client::BrokerClient};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_stream::{StreamExt, StreamMap};
use tonic::transport::Channel;

use crate::error::Error;
use crate::topics::settings::MESSAGE_BYTES_CAP;
use crate::units::{ByteSize, Limit, Millis};

/// Default broker address of the client commands.
pub const DEFAULT_BROKER: &str = "127.0.0.1:7717";
/// The environment variable that names the broker when `--broker` is not given.
pub const BROKER_ENV: &str = "STRATA_BROKER";
/// Lines typed within this window go out in one produce request.
const PRODUCE_LINGER: Duration = Duration::from_millis(5);
/// Most lines in one produce request.
const PRODUCE_LINES_MAX: usize = 1000;

/// Where the broker is. Accepted before the subcommand (`strata --broker ADDR topic
/// list`) and after it (`strata topic list --broker ADDR`); after wins.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct BrokerArg {
    /// Broker address, host:port or http://host:port [env: STRATA_BROKER] [default:
    /// 127.0.0.1:7717].
    #[arg(long, global = true, value_name = "ADDRESS")]
    pub broker: Option<String>,
}

impl BrokerArg {
    /// The address to use: this flag, else `outer` (the flag before the subcommand),
    /// else `STRATA_BROKER`, else the default.
    pub fn resolve(self, outer: BrokerArg) -> String {
        self.broker
            .or(outer.broker)
            .or_else(|| std::env::var(BROKER_ENV).ok().filter(|v| !v.is_empty()))
            .unwrap_or_else(|| DEFAULT_BROKER.to_string())
    }
}

/// `strata topic ...`
#[derive(Debug, clap::Subcommand)]
pub enum TopicCommand {
    /// Create a topic. Settings left out take the broker's defaults (`strata serve
    /// --help`).
    Create {
        /// Topic name: 1 to 249 characters from [a-zA-Z0-9._-].
        name: String,
        /// Number of partitions, 1 to 16,384.
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Keep records this long: a duration (7d, 12h, 30m; a plain number is ms), or
        /// -1 to keep them forever [default: the broker's, 7d unless set].
        #[arg(long, allow_hyphen_values = true, value_name = "DURATION")]
        retention_ms: Option<Limit<Millis>>,
        /// Keep at most this much per partition: a size (10GiB, 512MiB; a plain number is
        /// bytes), or -1 for no limit [default: the broker's, -1 unless set].
        #[arg(long, allow_hyphen_values = true, value_name = "SIZE")]
        retention_bytes: Option<Limit<ByteSize>>,
        /// Start a new segment file at this size: a size (256MiB; a plain number is bytes)
        /// [default: the broker's, 1GiB unless set].
        #[arg(long, value_name = "SIZE")]
        segment_bytes: Option<ByteSize>,
        /// Largest batch a produce request may carry, at most 32MiB [default: the
        /// broker's, 1MiB unless set].
        #[arg(long, value_name = "SIZE")]
        max_message_bytes: Option<ByteSize>,
        /// fsync, interval:<ms> or none [default: the broker's, fsync unless set].
        #[arg(long, value_name = "POLICY")]
        durability: Option<String>,
    },
    /// List topics.
    List,
    /// Show a topic's settings and its partitions' offsets and sizes.
    Describe {
        /// Topic name.
        name: String,
    },
    /// Delete a topic and all its records.
    Delete {
        /// Topic name.
        name: String,
    },
}

/// `strata group ...`
#[derive(Debug, clap::Subcommand)]
pub enum GroupCommand {
    /// List consumer groups: those with members and those with committed offsets.
    List,
    /// Show a group's members and, per partition, its committed offset, log end and lag.
    Describe {
        /// Group name.
        group: String,
    },
    /// Move a group's committed offsets (the group must have no active members).
    Reset {
        /// Group name.
        group: String,
        /// The topic whose offsets move.
        #[arg(long)]
        topic: String,
        /// Only these partitions (repeatable; default: all).
        #[arg(long = "partition")]
        partitions: Vec<u32>,
        /// Where to: earliest, latest, an offset, or @<unix-ms> for a time.
        #[arg(long)]
        to: String,
    },
    /// Forget a group and its committed offsets (it must have no active members).
    Delete {
        /// Group name.
        group: String,
    },
}

/// `strata produce`: one record per line of standard input.
#[derive(Debug, clap::Args)]
pub struct ProduceArgs {
    /// Topic to write to.
    pub topic: String,
    /// Key of every record (all go to the key's partition, in order).
    #[arg(long)]
    pub key: Option<String>,
    /// Partition to write to (instead of hashing the key or spreading records).
    #[arg(long, conflicts_with = "key")]
    pub partition: Option<u32>,
}

/// `strata consume`: prints `partition, offset, timestamp, key, value`, tab-separated.
#[derive(Debug, clap::Args)]
pub struct ConsumeArgs {
    /// Topic to read.
    pub topic: String,
    /// Only this partition (default: all).
    #[arg(long, conflicts_with = "group")]
    pub partition: Option<u32>,
    /// Where to start: earliest, latest, an offset, or @<unix-ms> for a time.
    #[arg(long, default_value = "earliest", conflicts_with = "group")]
    pub from: String,
    /// Keep waiting for new records instead of stopping at the end.
    #[arg(long)]
    pub follow: bool,
    /// Stop after this many records.
    #[arg(long)]
    pub max_records: Option<u64>,
    /// Read as a member of this consumer group: share the topic's partitions with the
    /// group's other members, start where the group left off (a new group starts at
    /// the earliest offset), commit as records are printed, and run until Ctrl-C (or
    /// --max-records), which commits and leaves the group.
    #[arg(long, value_name = "NAME")]
    pub group: Option<String>,
}

/// Connects to the broker, or says how to get one running.
async fn connect(broker: &str) -> anyhow::Result<Client> {
    Client::connect(broker).await.map_err(|e| match e {
        strata_client::Error::Unavailable { message } => anyhow::anyhow!(
            "{message}; is `strata serve` running there? Start it, or point --broker (or \
             {BROKER_ENV}) at a running broker"
        ),
        e => anyhow::anyhow!(e),
    })
}

async fn admin(broker: &str) -> anyhow::Result<AdminClient<Channel>> {
    Ok(connect(broker).await?.admin_client())
}

/// A gRPC error as a person reads it: its kind, then the broker's message.
fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", code_name(e.code()), e.message())
}

/// Like [`status`], with the next step when the broker says `topic` does not exist:
/// `hint` completes "…does not exist; ".
fn topic_status<'a>(topic: &str, hint: &'a str) -> impl Fn(tonic::Status) -> anyhow::Error + 'a {
    let missing = Error::TopicNotFound(topic.to_string()).to_string();
    move |e| {
        if e.code() == tonic::Code::NotFound && e.message() == missing {
            anyhow::anyhow!("not found: {missing}; {hint}")
        } else {
            status(e)
        }
    }
}

/// The next step for a command that needs `topic` to exist.
fn create_it(topic: &str) -> String {
    format!("create it with `strata topic create {topic}` (`strata topic list` shows the topics there are)")
}

const LIST_TOPICS: &str = "`strata topic list` shows the topics there are";

fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::NotFound => "not found",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::OutOfRange => "out of range",
        tonic::Code::ResourceExhausted => "resource exhausted",
        tonic::Code::FailedPrecondition => "failed precondition",
        tonic::Code::Unavailable => "unavailable",
        _ => "error",
    }
}

fn limit(v: Option<i64>) -> String {
    match v {
        Some(-1) | None => "unlimited".into(),
        Some(v) => v.to_string(),
    }
}

/// A raw value followed by its human form when that says more: `604800000 (7d)`.
fn with_unit(raw: u64, human: String) -> String {
    if human == format!("{raw}B") || human == format!("{raw}ms") {
        raw.to_string()
    } else {
        format!("{raw} ({human})")
    }
}

/// Runs `strata topic ...`.
pub async fn topic(broker: &str, command: TopicCommand) -> anyhow::Result<()> {
    let mut client = admin(broker).await?;
    match command {
        TopicCommand::Create {
            name,
            partitions,
            retention_ms,
            retention_bytes,
            segment_bytes,
            max_message_bytes,
            durability,
        } => {
            let max_message_bytes = max_message_bytes
                .map(|size| {
                    u32::try_from(size.0).with_context(|| {
                        format!(
                            "--max-message-bytes {size}: at most {} is allowed",
                            ByteSize(MESSAGE_BYTES_CAP.into())
                        )
                    })
                })
                .transpose()?;
            let config = v1::TopicConfig {
                retention_ms: retention_ms.map(Limit::to_protocol),
                retention_bytes: retention_bytes.map(Limit::to_protocol),
                segment_bytes: segment_bytes.map(u64::from),
                segment_ms: None,
                max_message_bytes,
                durability,
            };
            let response = client
                .create_topic(v1::CreateTopicRequest {
                    name,
                    partitions,
                    config: Some(config),
                })
                .await
                .map_err(status)?
                .into_inner();
            if let Some(topic) = response.topic {
                println!(
                    "created topic {} with {} partition(s)",
                    topic.name, topic.partitions
                );
            }
        }
        TopicCommand::List => {
            let topics = client
                .list_topics(v1::ListTopicsRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .topics;
            println!(
                "{:<32} {:>10} {:<14} {:>14}",
                "TOPIC", "PARTITIONS", "DURABILITY", "RETENTION_MS"
            );
            for t in topics {
                let c = t.config.unwrap_or_default();
                println!(
                    "{:<32} {:>10} {:<14} {:>14}",
                    t.name,
                    t.partitions,
                    c.durability.unwrap_or_default(),
                    limit(c.retention_ms)
                );
            }
        }
        TopicCommand::Describe { name } => {
            let response = client
                .describe_topic(v1::DescribeTopicRequest { name: name.clone() })
                .await
                .map_err(topic_status(&name, LIST_TOPICS))?
                .into_inner();
            let topic = response.topic.unwrap_or_default();
            let c = topic.config.unwrap_or_default();
            let millis = |v: Option<i64>| match v {
                Some(ms) if ms >= 0 => with_unit(ms as u64, Millis(ms as u64).to_string()),
                v => limit(v),
            };
            let bytes = |v: u64| with_unit(v, ByteSize(v).to_string());
            println!("topic:             {}", topic.name);
            println!("partitions:        {}", topic.partitions);
            println!("durability:        {}", c.durability.unwrap_or_default());
            println!("retention_ms:      {}", millis(c.retention_ms));
            println!(
                "retention_bytes:   {}",
                match c.retention_bytes {
                    Some(b) if b >= 0 => bytes(b as u64),
                    v => limit(v),
                }
            );
            println!(
                "segment_bytes:     {}",
                bytes(c.segment_bytes.unwrap_or_default())
            );
            println!(
                "max_message_bytes: {}",
                bytes(c.max_message_bytes.unwrap_or_default().into())
            );
            println!();
            println!(
                "{:>9} {:>15} {:>15} {:>14} {:>8}",
                "PARTITION", "EARLIEST", "LATEST", "BYTES", "SEGMENTS"
            );
            for p in response.partitions {
                println!(
                    "{:>9} {:>15} {:>15} {:>14} {:>8}",
                    p.partition, p.earliest_offset, p.latest_offset, p.size_bytes, p.segments
                );
            }
        }
        TopicCommand::Delete { name } => {
            client
                .delete_topic(v1::DeleteTopicRequest { name: name.clone() })
                .await
                .map_err(topic_status(&name, LIST_TOPICS))?;
            println!("deleted topic {name}");
        }
    }
    Ok(())
}

fn group_state(state: i32) -> &'static str {
    match v1::GroupState::try_from(state) {
        Ok(v1::GroupState::Empty) => "EMPTY",
        Ok(v1::GroupState::Stable) => "STABLE",
        Ok(v1::GroupState::Reconciling) => "RECONCILING",
        Err(_) => "UNKNOWN",
    }
}

fn partition_list(partitions: &[v1::TopicPartitions]) -> String {
    let parts: Vec<String> = partitions
        .iter()
        .flat_map(|t| t.partitions.iter().map(move |p| format!("{}/{p}", t.topic)))
        .collect();
    if parts.is_empty() {
        "-".to_string()
    } else {
        parts.join(",")
    }
}

/// Parses where `strata group reset --to` points.
fn reset_target(to: &str) -> anyhow::Result<v1::reset_offsets_request::To> {
    use v1::reset_offsets_request::To;
    Ok(match to {
        "earliest" => To::Earliest(true),
        "latest" => To::Latest(true),
        _ => match to.strip_prefix('@') {
            Some(ms) => To::TimestampMs(
                ms.parse()
                    .with_context(|| format!("--to {to:?}: expected @<unix-ms>"))?,
            ),
            None => To::Offset(to.parse().with_context(|| {
                format!("--to {to:?}: expected earliest, latest, an offset or @<unix-ms>")
            })?),
        },
    })
}

/// Runs `strata group ...`.
pub async fn group(broker: &str, command: GroupCommand) -> anyhow::Result<()> {
    let mut client = admin(broker).await?;
    match command {
        GroupCommand::List => {
            let groups = client
                .list_groups(v1::ListGroupsRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .groups;
            println!(
                "{:<32} {:<12} {:>7} {:>7}",
                "GROUP", "STATE", "MEMBERS", "EPOCH"
            );
            for g in groups {
                println!(
                    "{:<32} {:<12} {:>7} {:>7}",
                    g.group,
                    group_state(g.state),
                    g.members,
                    g.epoch
                );
            }
        }
        GroupCommand::Describe { group } => {
            let response = client
                .describe_group(v1::DescribeGroupRequest { group })
                .await
                .map_err(status)?
                .into_inner();
            let summary = response.group.unwrap_or_default();
            println!("group:     {}", summary.group);
            println!("state:     {}", group_state(summary.state));
            println!("epoch:     {}", summary.epoch);
            println!("members:   {}", summary.members);
            println!("total lag: {}", response.total_lag);
            if !response.members.is_empty() {
                println!();
                println!(
                    "{:<18} {:<20} {:>6} {:<30} REVOKING",
                    "MEMBER", "CLIENT", "EPOCH", "ASSIGNMENT"
                );
                // In the order of the partitions they own, like the table below; members
                // that own nothing last.
                let mut members = response.members.clone();
                members.sort_by_cached_key(|m| {
                    let first = m
                        .assignment
                        .iter()
                        .find_map(|t| t.partitions.iter().min().map(|&p| (t.topic.clone(), p)));
                    (first.is_none(), first, m.member_id.clone())
                });
                for m in &members {
                    println!(
                        "{:<18} {:<20} {:>6} {:<30} {}",
                        m.member_id,
                        if m.client_id.is_empty() {
                            "-"
                        } else {
                            &m.client_id
                        },
                        m.member_epoch,
                        partition_list(&m.assignment),
                        partition_list(&m.revoking)
                    );
                }
            }
            println!();
            println!(
                "{:<32} {:>9} {:>15} {:>15} {:>12}  MEMBER",
                "TOPIC", "PARTITION", "COMMITTED", "LOG-END", "LAG"
            );
            let dash = || "-".to_string();
            for p in response.partitions {
                println!(
                    "{:<32} {:>9} {:>15} {:>15} {:>12}  {}",
                    p.topic,
                    p.partition,
                    p.committed_offset.map_or_else(dash, |o| o.to_string()),
                    p.log_end_offset,
                    p.lag.map_or_else(dash, |l| l.to_string()),
                    if p.member_id.is_empty() {
                        "-"
                    } else {
                        &p.member_id
                    }
                );
            }
        }
        GroupCommand::Reset {
            group,
            topic,
            partitions,
            to,
        } => {
            let response = client
                .reset_offsets(v1::ResetOffsetsRequest {
                    group: group.clone(),
                    topic: topic.clone(),
                    partitions,
                    to: Some(reset_target(&to)?),
                })
                .await
                .map_err(topic_status(&topic, LIST_TOPICS))?
                .into_inner();
            for o in response.offsets {
                println!("{group} {}/{} -> {}", o.topic, o.partition, o.offset);
            }
        }
        GroupCommand::Delete { group } => {
            client
                .delete_group(v1::DeleteGroupRequest {
                    group: group.clone(),
                })
                .await
                .map_err(status)?;
            println!("deleted group {group}");
        }
    }
    Ok(())
}

/// Runs `strata produce`: lines arriving together go out in one request.
pub async fn produce(broker: &str, args: ProduceArgs) -> anyhow::Result<()> {
    let mut client = connect(broker).await?.broker_client();
    let missing = create_it(&args.topic);
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let (mut total, mut requests) = (0u64, 0u64);
    let key = args.key.map(|k| bytes::Bytes::from(k.into_bytes()));
    loop {
        let Some(first) = lines.next_line().await.context("reading standard input")? else {
            break;
        };
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + PRODUCE_LINGER;
        let mut eof = false;
        while batch.len() < PRODUCE_LINES_MAX {
            match tokio::time::timeout_at(deadline, lines.next_line()).await {
                Ok(Ok(Some(line))) => batch.push(line),
                Ok(Ok(None)) => {
                    eof = true;
                    break;
                }
                Ok(Err(e)) => return Err(e).context("reading standard input"),
                Err(_) => break,
            }
        }
        let records = batch
            .into_iter()
            .map(|line| v1::Record {
                key: key.clone(),
                value: Some(line.into_bytes().into()),
                ..Default::default()
            })
            .collect::<Vec<_>>();
        let count = records.len() as u64;
        let target = args.partition.map(v1::produce_request::Target::Partition);
        let response = client
            .produce(v1::ProduceRequest {
                topic: args.topic.clone(),
                target,
                records,
                ..Default::default()
            })
            .await
            .map_err(topic_status(&args.topic, &missing))?
            .into_inner();
        total += count;
        requests += 1;
        eprintln!(
            "produced {count} record(s) to partition {} at offsets {}..={}",
            response.partition, response.base_offset, response.last_offset
        );
        if eof {
            break;
        }
    }
    if requests != 1 {
        eprintln!("{total} record(s) produced");
    }
    Ok(())
}

/// Writes one record as `strata consume` prints it: partition, offset, timestamp, key
/// and value, tab-separated, key and value as text (a null one as an empty field).
fn record_line(
    partition: u32,
    offset: u64,
    timestamp_ms: i64,
    key: Option<&[u8]>,
    value: Option<&[u8]>,
) -> String {
    format!(
        "{partition}\t{offset}\t{timestamp_ms}\t{}\t{}\n",
        String::from_utf8_lossy(key.unwrap_or_default()),
        String::from_utf8_lossy(value.unwrap_or_default())
    )
}

/// Runs `strata consume`.
pub async fn consume(broker: &str, args: ConsumeArgs) -> anyhow::Result<()> {
    let connection = connect(broker).await?;
    if let Some(group) = &args.group {
        return member::consume(&connection, group, &args.topic, args.max_records).await;
    }
    let missing = create_it(&args.topic);
    let mut admin = connection.admin_client();
    let mut client: BrokerClient<Channel> = connection.broker_client();
    let topic = admin
        .describe_topic(v1::DescribeTopicRequest {
            name: args.topic.clone(),
        })
        .await
        .map_err(topic_status(&args.topic, &missing))?
        .into_inner();
    let partitions: Vec<u32> = match args.partition {
        Some(p) => vec![p],
        None => (0..topic.topic.map_or(0, |t| t.partitions)).collect(),
    };
    let mut streams = StreamMap::new();
    let mut ends = Vec::new();
    for &partition in &partitions {
        let (spec, timestamp_ms, offset) = match args.from.as_str() {
            "earliest" => (v1::OffsetSpec::Earliest, 0, None),
            "latest" => (v1::OffsetSpec::Latest, 0, None),
            s if s.starts_with('@') => {
                let ms = s[1..]
                    .parse()
                    .with_context(|| format!("--from {s}: expected @<unix-ms>"))?;
                (v1::OffsetSpec::Timestamp, ms, None)
            }
            s => {
                let offset = s.parse().with_context(|| {
                    format!("--from {s}: expected earliest, latest, an offset or @<unix-ms>")
                })?;
                (v1::OffsetSpec::Earliest, 0, Some(offset))
            }
        };
        let start = match offset {
            Some(offset) => offset,
            None => {
                admin
                    .list_offsets(v1::ListOffsetsRequest {
                        topic: args.topic.clone(),
                        partition,
                        spec: spec.into(),
                        timestamp_ms,
                    })
                    .await
                    .map_err(status)?
                    .into_inner()
                    .offset
            }
        };
        let end = admin
            .list_offsets(v1::ListOffsetsRequest {
                topic: args.topic.clone(),
                partition,
                spec: v1::OffsetSpec::Latest.into(),
                timestamp_ms: 0,
            })
            .await
            .map_err(status)?
            .into_inner()
            .offset;
        if !args.follow && start >= end {
            continue;
        }
        ends.push((partition, end));
        let stream = client
            .subscribe(v1::SubscribeRequest {
                topic: args.topic.clone(),
                partition,
                offset: start,
                max_bytes: 0,
                decode: true,
                member: None,
            })
            .await
            .map_err(status)?
            .into_inner();
        streams.insert(partition, stream);
    }
    if args.follow {
        // Every start position is fixed now: whatever is produced from here on is
        // printed. Saying so tells a person (and a script) that it is waiting, not stuck.
        eprintln!("waiting for records (Ctrl-C to stop)");
    }
    let mut out = tokio::io::BufWriter::new(tokio::io::stdout());
    let mut printed = 0u64;
    while let Some((partition, message)) = streams.next().await {
        let message = message.map_err(topic_status(&args.topic, LIST_TOPICS))?;
        let end = ends
            .iter()
            .find(|(p, _)| *p == partition)
            .map_or(u64::MAX, |(_, e)| *e);
        for record in message.records {
            if !args.follow && record.offset >= end {
                break;
            }
            let line = record_line(
                partition,
                record.offset,
                record.timestamp_ms,
                record.key.as_deref(),
                record.value.as_deref(),
            );
            out.write_all(line.as_bytes()).await?;
            printed += 1;
            if args.max_records.is_some_and(|max| printed >= max) {
                out.flush().await?;
                return Ok(());
            }
        }
        if args.follow {
            out.flush().await?;
        } else if message.next_offset >= end {
            streams.remove(&partition);
        }
    }
    out.flush().await?;
    Ok(())
}
