//! The client subcommands of `strata`: `topic`, `group`, `produce` and `consume`,
//! talking to a broker over gRPC like any other client.

pub mod top;

use std::time::Duration;

use anyhow::Context;
use strata_proto::v1::{self, admin_client::AdminClient, broker_client::BrokerClient};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_stream::{StreamExt, StreamMap};
use tonic::transport::Channel;

/// Default broker address of the client commands.
pub const DEFAULT_BROKER: &str = "http://127.0.0.1:7717";
/// Largest message the CLI accepts: a fetch of the broker's maximum plus a batch.
const MESSAGE_BYTES_MAX: usize = 64 << 20;
/// Lines typed within this window go out in one produce request.
const PRODUCE_LINGER: Duration = Duration::from_millis(5);
/// Most lines in one produce request.
const PRODUCE_LINES_MAX: usize = 1000;

/// Where the broker is.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArg {
    /// Broker address, `host:port` or `http://host:port`.
    #[arg(long, env = "STRATA_BROKER", default_value = DEFAULT_BROKER, global = true)]
    pub broker: String,
}

/// `strata topic ...`
#[derive(Debug, clap::Subcommand)]
pub enum TopicCommand {
    /// Create a topic.
    Create {
        /// Topic name: 1 to 249 characters from [a-zA-Z0-9._-].
        name: String,
        /// Number of partitions.
        #[arg(long, default_value_t = 1)]
        partitions: u32,
        /// Keep records this long (ms); -1 forever. Default: the broker's.
        #[arg(long, allow_hyphen_values = true)]
        retention_ms: Option<i64>,
        /// Keep at most this many bytes per partition; -1 unlimited.
        #[arg(long, allow_hyphen_values = true)]
        retention_bytes: Option<i64>,
        /// Segment size in bytes.
        #[arg(long)]
        segment_bytes: Option<u64>,
        /// Largest batch in bytes.
        #[arg(long)]
        max_message_bytes: Option<u32>,
        /// fsync, interval:<ms> or none.
        #[arg(long)]
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
    #[arg(long)]
    pub partition: Option<u32>,
    /// Where to start: earliest, latest, an offset, or @<unix-ms> for a time.
    #[arg(long, default_value = "earliest")]
    pub from: String,
    /// Keep waiting for new records instead of stopping at the end.
    #[arg(long)]
    pub follow: bool,
    /// Stop after this many records.
    #[arg(long)]
    pub max_records: Option<u64>,
}

fn endpoint(broker: &str) -> String {
    if broker.contains("://") {
        broker.to_string()
    } else {
        format!("http://{broker}")
    }
}

async fn channel(broker: &str) -> anyhow::Result<Channel> {
    let url = endpoint(broker);
    tonic::transport::Endpoint::from_shared(url.clone())
        .with_context(|| format!("invalid broker address {broker:?}"))?
        .tcp_nodelay(true)
        .initial_stream_window_size(crate::grpc::STREAM_WINDOW_BYTES)
        .initial_connection_window_size(crate::grpc::CONNECTION_WINDOW_BYTES)
        .max_frame_size(crate::grpc::FRAME_BYTES_MAX)
        .connect()
        .await
        .with_context(|| {
            format!("cannot connect to the broker at {url}; is `strata serve` running?")
        })
}

async fn admin(broker: &str) -> anyhow::Result<AdminClient<Channel>> {
    Ok(AdminClient::new(channel(broker).await?).max_decoding_message_size(MESSAGE_BYTES_MAX))
}

async fn data(broker: &str) -> anyhow::Result<BrokerClient<Channel>> {
    Ok(BrokerClient::new(channel(broker).await?)
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX))
}

/// A gRPC error as a person reads it.
fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", code_name(e.code()), e.message())
}

fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::NotFound => "not found",
        tonic::Code::AlreadyExists => "already exists",
        tonic::Code::InvalidArgument => "invalid argument",
        tonic::Code::OutOfRange => "out of range",
        tonic::Code::ResourceExhausted => "resource exhausted",
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
            let config = v1::TopicConfig {
                retention_ms,
                retention_bytes,
                segment_bytes,
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
                .describe_topic(v1::DescribeTopicRequest { name })
                .await
                .map_err(status)?
                .into_inner();
            let topic = response.topic.unwrap_or_default();
            let c = topic.config.unwrap_or_default();
            println!("topic:             {}", topic.name);
            println!("partitions:        {}", topic.partitions);
            println!("durability:        {}", c.durability.unwrap_or_default());
            println!("retention_ms:      {}", limit(c.retention_ms));
            println!("retention_bytes:   {}", limit(c.retention_bytes));
            println!("segment_bytes:     {}", c.segment_bytes.unwrap_or_default());
            println!(
                "max_message_bytes: {}",
                c.max_message_bytes.unwrap_or_default()
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
                .map_err(status)?;
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
                for m in &response.members {
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
                    topic,
                    partitions,
                    to: Some(reset_target(&to)?),
                })
                .await
                .map_err(status)?
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
    let mut client = data(broker).await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut total = 0u64;
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
            .map_err(status)?
            .into_inner();
        total += count;
        eprintln!(
            "produced {count} record(s) to partition {} at offsets {}..={}",
            response.partition, response.base_offset, response.last_offset
        );
        if eof {
            break;
        }
    }
    eprintln!("{total} record(s) produced");
    Ok(())
}

/// Runs `strata consume`.
pub async fn consume(broker: &str, args: ConsumeArgs) -> anyhow::Result<()> {
    let mut admin = admin(broker).await?;
    let mut client = data(broker).await?;
    let topic = admin
        .describe_topic(v1::DescribeTopicRequest {
            name: args.topic.clone(),
        })
        .await
        .map_err(status)?
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
            })
            .await
            .map_err(status)?
            .into_inner();
        streams.insert(partition, stream);
    }
    let mut out = tokio::io::BufWriter::new(tokio::io::stdout());
    let mut printed = 0u64;
    while let Some((partition, message)) = streams.next().await {
        let message = message.map_err(status)?;
        let end = ends
            .iter()
            .find(|(p, _)| *p == partition)
            .map_or(u64::MAX, |(_, e)| *e);
        for record in message.records {
            if !args.follow && record.offset >= end {
                break;
            }
            let key = record
                .key
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            let value = record
                .value
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            let line = format!(
                "{partition}\t{}\t{}\t{key}\t{value}\n",
                record.offset, record.timestamp_ms
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
