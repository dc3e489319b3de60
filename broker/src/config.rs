//! `strata serve` configuration: defaults, overridden by an optional TOML file, then by
//! environment variables, then by flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tracing_subscriber::filter::Targets;

use crate::limits::{Limits, FETCH_MEMORY_BYTES_MIN};
use crate::topics::settings::{TopicSettings, MESSAGE_BYTES_CAP};
use crate::units::{ByteSize, Limit, Millis};

/// The default gRPC address: loopback only, on a port no common service uses.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7717";
/// The default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "strata-data";
/// Segment files kept open for reading when `--max-open-files` is not given.
const MAX_OPEN_FILES_DEFAULT: usize = 1024;
/// Sealed segments whose indexes stay mapped when `--max-mapped-segments` is not given.
const MAX_MAPPED_SEGMENTS_DEFAULT: usize = strata_storage::MAPPED_SEGMENTS_MAX_DEFAULT;
/// How often retention runs when `--retention-check-ms` is not given.
const RETENTION_CHECK_MS_DEFAULT: u64 = 30_000;

/// Settings of `strata serve`: flags (each also read from an environment variable), and
/// the same names, snake_case, in the TOML file.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML file with any of the settings below (same names, snake_case).
    #[arg(long, env = "STRATA_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Data directory [default: ./strata-data].
    #[arg(long, env = "STRATA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// gRPC listen address; port 0 picks a free port [default: 127.0.0.1:7717].
    #[arg(long, env = "STRATA_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Durability of topics created without one: fsync, interval:<ms> or none [default: fsync].
    #[arg(long, env = "STRATA_DEFAULT_DURABILITY")]
    pub default_durability: Option<String>,
    /// Retention by age of topics created without one: a duration (7d, 12h, 30m, 500ms;
    /// a plain number is ms), or -1 to keep forever [default: 7d].
    #[arg(long, env = "STRATA_DEFAULT_RETENTION_MS", allow_hyphen_values = true)]
    pub default_retention_ms: Option<Limit<Millis>>,
    /// Retention by size per partition of topics created without one: a size (10GiB,
    /// 512MiB; a plain number is bytes), or -1 for unlimited [default: -1].
    #[arg(
        long,
        env = "STRATA_DEFAULT_RETENTION_BYTES",
        allow_hyphen_values = true
    )]
    pub default_retention_bytes: Option<Limit<ByteSize>>,
    /// Segment size of topics created without one: a size (256MiB; a plain number is
    /// bytes) [default: 1GiB].
    #[arg(long, env = "STRATA_DEFAULT_SEGMENT_BYTES")]
    pub default_segment_bytes: Option<ByteSize>,
    /// Largest batch of topics created without one, at most 32MiB [default: 1MiB].
    #[arg(long, env = "STRATA_DEFAULT_MAX_MESSAGE_BYTES")]
    pub default_max_message_bytes: Option<ByteSize>,
    /// Most segment files kept open for reading across all partitions [default: 1024].
    #[arg(long, env = "STRATA_MAX_OPEN_FILES")]
    pub max_open_files: Option<usize>,
    /// Most sealed segments whose two index files stay memory-mapped for reading, across
    /// all partitions [default: 1024].
    #[arg(long, env = "STRATA_MAX_MAPPED_SEGMENTS")]
    pub max_mapped_segments: Option<usize>,
    /// How often retention runs: a duration (1m, 30s; a plain number is ms) [default: 30s].
    #[arg(long, env = "STRATA_RETENTION_CHECK_MS")]
    pub retention_check_ms: Option<Millis>,
    /// HTTP address serving /metrics, /healthz and /readyz, or `off` [default: loopback
    /// on the port after the gRPC one, 127.0.0.1:7718; port 0 when the gRPC port is 0].
    #[arg(long, env = "STRATA_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// Kafka wire protocol listen address (host:port; port 0 picks a free port), or
    /// `off` [default: off].
    #[arg(long, env = "STRATA_KAFKA_LISTEN")]
    pub kafka_listen: Option<String>,
    /// The host:port Kafka clients are told to connect to (Metadata); needed when the
    /// Kafka listener binds a wildcard address. Defaults to the bound Kafka address.
    #[arg(long, env = "STRATA_KAFKA_ADVERTISED")]
    pub kafka_advertised: Option<String>,
    /// Create a topic (with the default settings) when a Kafka client asks for one that
    /// does not exist (Metadata with auto-creation allowed, as producers send): true or
    /// false [default: false].
    #[arg(long, env = "STRATA_KAFKA_AUTO_CREATE_TOPICS")]
    pub kafka_auto_create_topics: Option<bool>,
    /// Log format: `text` (for people) or `json` (one object per line) [default: text].
    #[arg(long, env = "STRATA_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log level (error, warn, info, debug, trace), optionally per module:
    /// `info,strata_broker::grpc=debug` [default: info].
    #[arg(long, env = "STRATA_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Largest request of the Admin service (a size) [default: 4MiB].
    #[arg(long, env = "STRATA_MAX_ADMIN_REQUEST_BYTES")]
    pub max_admin_request_bytes: Option<ByteSize>,
    /// Largest request of the Groups service (a size) [default: 4MiB].
    #[arg(long, env = "STRATA_MAX_GROUPS_REQUEST_BYTES")]
    pub max_groups_request_bytes: Option<ByteSize>,
    /// Most open client connections; more are closed at once [default: 1024].
    #[arg(long, env = "STRATA_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Most open connections of the HTTP listener (/metrics, /healthz, /readyz); more
    /// are closed at once [default: 256].
    #[arg(long, env = "STRATA_MAX_HTTP_CONNECTIONS")]
    pub max_http_connections: Option<usize>,
    /// Most concurrent requests (HTTP/2 streams) per connection [default: 200].
    #[arg(long, env = "STRATA_MAX_STREAMS_PER_CONNECTION")]
    pub max_streams_per_connection: Option<u32>,
    /// How often idle connections are probed (HTTP/2 PING, TCP keepalive): a duration
    /// [default: 30s].
    #[arg(long, env = "STRATA_KEEPALIVE_INTERVAL_MS")]
    pub keepalive_interval_ms: Option<Millis>,
    /// How long a PING may go unanswered before the connection is dropped [default: 20s].
    #[arg(long, env = "STRATA_KEEPALIVE_TIMEOUT_MS")]
    pub keepalive_timeout_ms: Option<Millis>,
    /// How long a shutdown waits for requests in progress before it cuts the remaining
    /// connections [default: 10s].
    #[arg(long, env = "STRATA_SHUTDOWN_TIMEOUT_MS")]
    pub shutdown_timeout_ms: Option<Millis>,
    /// Bytes of Fetch and Subscribe responses in flight, broker-wide (a size, at least
    /// 16MiB) [default: 256MiB].
    #[arg(long, env = "STRATA_FETCH_MEMORY_BYTES")]
    pub fetch_memory_bytes: Option<ByteSize>,
    /// Bytes one Subscribe stream may hold queued for a slow client (a size)
    /// [default: 16MiB].
    #[arg(long, env = "STRATA_SUBSCRIBE_QUEUE_BYTES")]
    pub subscribe_queue_bytes: Option<ByteSize>,
    /// Longest client id of a group member (a size) [default: 255B].
    #[arg(long, env = "STRATA_MAX_CLIENT_ID_BYTES")]
    pub max_client_id_bytes: Option<ByteSize>,
    /// Longest metadata of a committed offset (a size) [default: 4KiB].
    #[arg(long, env = "STRATA_MAX_COMMIT_METADATA_BYTES")]
    pub max_commit_metadata_bytes: Option<ByteSize>,
    /// Most members of one consumer group [default: 1000].
    #[arg(long, env = "STRATA_MAX_GROUP_MEMBERS")]
    pub max_group_members: Option<usize>,
    /// Most consumer groups with members, broker-wide [default: 10000].
    #[arg(long, env = "STRATA_MAX_GROUPS")]
    pub max_groups: Option<usize>,
    /// Most partitions of all topics, broker-wide [default: 10000].
    #[arg(long, env = "STRATA_MAX_PARTITIONS")]
    pub max_partitions: Option<usize>,
    /// How long the committed offsets of a group without members are kept after its
    /// last member left or its last commit: a duration [default: 7d].
    #[arg(long, env = "STRATA_OFFSETS_RETENTION_MS")]
    pub offsets_retention_ms: Option<Millis>,
}

/// How the broker writes its log (to standard error).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Where the Kafka listener binds and what it tells clients to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaListen {
    /// The address to bind.
    pub listen: SocketAddr,
    /// The host:port Metadata advertises; `None` advertises the bound address.
    pub advertised: Option<(String, u16)>,
    /// Metadata creates unknown topics a client allows to be created.
    pub auto_create_topics: bool,
}

/// Resolved configuration of a broker.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Where topics live.
    pub data_dir: PathBuf,
    /// gRPC address.
    pub listen: SocketAddr,
    /// Settings for topics created without them.
    pub topic_defaults: TopicSettings,
    /// Open-file budget for segment reads.
    pub max_open_files: usize,
    /// Budget of sealed segments whose indexes stay mapped for reads.
    pub max_mapped_segments: usize,
    /// Retention period.
    pub retention_check: Duration,
    /// HTTP address of /metrics, /healthz and /readyz; `None` when off.
    pub http_listen: Option<SocketAddr>,
    /// The Kafka listener, when it is on.
    pub kafka: Option<KafkaListen>,
    /// Log format.
    pub log_format: LogFormat,
    /// Log level directives.
    pub log_level: Targets,
    /// Resource limits.
    pub limits: Limits,
}

impl ServeConfig {
    /// Resolves flags (which clap already merged with the environment) over the file.
    pub fn resolve(args: ServeArgs) -> anyhow::Result<ServeConfig> {
        let file = match &args.config {
            Some(path) => load(path)?,
            None => ServeArgs::default(),
        };
        let limit = |name: &str, v: Option<i64>, default: Option<u64>| {
            crate::topics::settings::parse_limit(name, v, default)
                .map_err(|e| anyhow::anyhow!("{e}"))
        };
        let limits = resolve_limits(&args, &file)?;
        let base = TopicSettings::default();
        let max_message_bytes = args
            .default_max_message_bytes
            .or(file.default_max_message_bytes)
            .map_or(Ok(base.max_message_bytes), |size| {
                u32::try_from(size.0)
                    .ok()
                    .filter(|&bytes| bytes <= MESSAGE_BYTES_CAP)
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "default_max_message_bytes {size} is above the limit of {}",
                            ByteSize(MESSAGE_BYTES_CAP.into())
                        )
                    })
            })?;
        let topic_defaults = TopicSettings {
            partitions: 1,
            retention_ms: limit(
                "default_retention_ms",
                args.default_retention_ms
                    .or(file.default_retention_ms)
                    .map(Limit::to_protocol),
                base.retention_ms,
            )?,
            retention_bytes: limit(
                "default_retention_bytes",
                args.default_retention_bytes
                    .or(file.default_retention_bytes)
                    .map(Limit::to_protocol),
                base.retention_bytes,
            )?,
            segment_bytes: args
                .default_segment_bytes
                .or(file.default_segment_bytes)
                .map_or(base.segment_bytes, u64::from),
            segment_ms: base.segment_ms,
            max_message_bytes,
            durability: args
                .default_durability
                .or(file.default_durability)
                .unwrap_or(base.durability),
        };
        topic_defaults
            .log_config()
            .map_err(|e| anyhow::anyhow!("invalid topic defaults: {e}"))?;
        let default_listen: SocketAddr = DEFAULT_LISTEN.parse()?;
        let listen = args.listen.or(file.listen).unwrap_or(default_listen);
        let http_listen = match args.http_listen.or(file.http_listen).as_deref() {
            Some("off") => None,
            Some(address) => Some(address.parse().map_err(|e| {
                anyhow::anyhow!(
                    "invalid http_listen {address:?}: {e}; give host:port (port 0 picks a \
                     free one) or `off`"
                )
            })?),
            None => Some(http_next_to(listen)?),
        };
        let kafka = kafka_listen(
            args.kafka_listen.or(file.kafka_listen),
            args.kafka_advertised.or(file.kafka_advertised),
            args.kafka_auto_create_topics
                .or(file.kafka_auto_create_topics)
                .unwrap_or(false),
        )?;
        let log_level = args
            .log_level
            .or(file.log_level)
            .unwrap_or_else(|| "info".to_string());
        let log_level = parse_log_level(&log_level).ok_or_else(|| {
            anyhow::anyhow!(
                "invalid log_level {log_level:?}: give a level (error, warn, info, debug, \
                 trace, off), optionally with per-module levels: info,strata_broker::grpc=debug"
            )
        })?;
        Ok(ServeConfig {
            limits,
            data_dir: args
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            listen,
            http_listen,
            kafka,
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            log_level,
            topic_defaults,
            max_open_files: cache_size(
                "max_open_files",
                args.max_open_files.or(file.max_open_files),
                MAX_OPEN_FILES_DEFAULT,
            )?,
            max_mapped_segments: cache_size(
                "max_mapped_segments",
                args.max_mapped_segments.or(file.max_mapped_segments),
                MAX_MAPPED_SEGMENTS_DEFAULT,
            )?,
            retention_check: Duration::from_millis(
                args.retention_check_ms
                    .or(file.retention_check_ms)
                    .map_or(RETENTION_CHECK_MS_DEFAULT, u64::from)
                    .max(1),
            ),
        })
    }
}

/// A bound of the read cache, or `default`: 0 is refused, since every read needs a slot.
fn cache_size(name: &str, value: Option<usize>, default: usize) -> anyhow::Result<usize> {
    match value {
        Some(0) => anyhow::bail!("{name} must be positive: every read holds one while it runs"),
        value => Ok(value.unwrap_or(default)),
    }
}

/// The resource limits: flags over the file over [`Limits::default`]; every one must be
/// positive.
fn resolve_limits(args: &ServeArgs, file: &ServeArgs) -> anyhow::Result<Limits> {
    let base = Limits::default();
    fn positive<T: Copy + Into<u64>>(name: &str, v: T) -> anyhow::Result<T> {
        if v.into() == 0 {
            anyhow::bail!("{name} must be positive");
        }
        Ok(v)
    }
    let size = |name: &str, a: Option<ByteSize>, f: Option<ByteSize>, d: usize| {
        a.or(f).map_or(Ok(d), |s| {
            positive(name, s.0).and_then(|b| {
                usize::try_from(b).map_err(|_| anyhow::anyhow!("{name} {s} is too large"))
            })
        })
    };
    let count = |name: &str, a: Option<usize>, f: Option<usize>, d: usize| {
        a.or(f)
            .map_or(Ok(d), |n| positive(name, n as u64).map(|n| n as usize))
    };
    let duration = |name: &str, a: Option<Millis>, f: Option<Millis>, d: Duration| {
        a.or(f)
            .map_or(Ok(d), |m| positive(name, m.0).map(Duration::from_millis))
    };
    let request_cap = MESSAGE_BYTES_CAP as usize;
    let limits = Limits {
        admin_request_bytes: size(
            "max_admin_request_bytes",
            args.max_admin_request_bytes,
            file.max_admin_request_bytes,
            base.admin_request_bytes,
        )?,
        groups_request_bytes: size(
            "max_groups_request_bytes",
            args.max_groups_request_bytes,
            file.max_groups_request_bytes,
            base.groups_request_bytes,
        )?,
        connections: count(
            "max_connections",
            args.max_connections,
            file.max_connections,
            base.connections,
        )?,
        http_connections: count(
            "max_http_connections",
            args.max_http_connections,
            file.max_http_connections,
            base.http_connections,
        )?,
        streams_per_connection: positive(
            "max_streams_per_connection",
            args.max_streams_per_connection
                .or(file.max_streams_per_connection)
                .unwrap_or(base.streams_per_connection),
        )?,
        keepalive_interval: duration(
            "keepalive_interval_ms",
            args.keepalive_interval_ms,
            file.keepalive_interval_ms,
            base.keepalive_interval,
        )?,
        keepalive_timeout: duration(
            "keepalive_timeout_ms",
            args.keepalive_timeout_ms,
            file.keepalive_timeout_ms,
            base.keepalive_timeout,
        )?,
        shutdown_timeout: duration(
            "shutdown_timeout_ms",
            args.shutdown_timeout_ms,
            file.shutdown_timeout_ms,
            base.shutdown_timeout,
        )?,
        fetch_memory_bytes: size(
            "fetch_memory_bytes",
            args.fetch_memory_bytes,
            file.fetch_memory_bytes,
            base.fetch_memory_bytes,
        )?,
        subscribe_queue_bytes: size(
            "subscribe_queue_bytes",
            args.subscribe_queue_bytes,
            file.subscribe_queue_bytes,
            base.subscribe_queue_bytes,
        )?,
        client_id_bytes: size(
            "max_client_id_bytes",
            args.max_client_id_bytes,
            file.max_client_id_bytes,
            base.client_id_bytes,
        )?,
        commit_metadata_bytes: size(
            "max_commit_metadata_bytes",
            args.max_commit_metadata_bytes,
            file.max_commit_metadata_bytes,
            base.commit_metadata_bytes,
        )?,
        group_members: count(
            "max_group_members",
            args.max_group_members,
            file.max_group_members,
            base.group_members,
        )?,
        groups: count("max_groups", args.max_groups, file.max_groups, base.groups)?,
        partitions: count(
            "max_partitions",
            args.max_partitions,
            file.max_partitions,
            base.partitions,
        )?,
        offsets_retention: duration(
            "offsets_retention_ms",
            args.offsets_retention_ms,
            file.offsets_retention_ms,
            base.offsets_retention,
        )?,
    };
    if limits.fetch_memory_bytes < FETCH_MEMORY_BYTES_MIN {
        anyhow::bail!(
            "fetch_memory_bytes {} is below the least of {}: two of the largest fetches",
            ByteSize(limits.fetch_memory_bytes as u64),
            ByteSize(FETCH_MEMORY_BYTES_MIN as u64)
        );
    }
    for (name, bytes) in [
        ("max_admin_request_bytes", limits.admin_request_bytes),
        ("max_groups_request_bytes", limits.groups_request_bytes),
    ] {
        if bytes > request_cap {
            anyhow::bail!(
                "{name} {} is above the limit of {}",
                ByteSize(bytes as u64),
                ByteSize(request_cap as u64)
            );
        }
    }
    Ok(limits)
}

/// Resolves the Kafka listener settings: off unless an address is given; a wildcard
/// bind needs an advertised address (clients cannot connect to 0.0.0.0).
fn kafka_listen(
    listen: Option<String>,
    advertised: Option<String>,
    auto_create_topics: bool,
) -> anyhow::Result<Option<KafkaListen>> {
    let listen = match listen.as_deref() {
        None | Some("off") => {
            if advertised.is_some() {
                anyhow::bail!(
                    "kafka_advertised is set but the Kafka listener is off: turn it on with \
                     --kafka-listen <host:port>"
                );
            }
            return Ok(None);
        }
        Some(address) => address.parse::<SocketAddr>().map_err(|e| {
            anyhow::anyhow!(
                "invalid kafka_listen {address:?}: {e}; give ip:port (port 0 picks a free \
                 one, 127.0.0.1:9092 is Kafka's usual port) or `off`"
            )
        })?,
    };
    let advertised = match advertised {
        None if listen.ip().is_unspecified() => anyhow::bail!(
            "kafka_listen {listen} binds every interface, and Kafka clients cannot connect \
             to that address: say which host:port they should use with --kafka-advertised"
        ),
        None => None,
        Some(a) => {
            let (host, port) = a
                .rsplit_once(':')
                .ok_or_else(|| anyhow::anyhow!("invalid kafka_advertised {a:?}: give host:port"))?;
            let port: u16 = port.parse().map_err(|e| {
                anyhow::anyhow!("invalid kafka_advertised {a:?}: port {port:?}: {e}")
            })?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() || port == 0 {
                anyhow::bail!(
                    "invalid kafka_advertised {a:?}: give a host and a port other than 0"
                );
            }
            Some((host.to_string(), port))
        }
    };
    Ok(Some(KafkaListen {
        listen,
        advertised,
        auto_create_topics,
    }))
}

/// Log level directives: `level` or `module=level`, comma-separated. Stricter than
/// [`Targets`]'s own parser, which takes a misspelt level for a module name.
fn parse_log_level(directives: &str) -> Option<Targets> {
    let is_level = |l: &str| l.parse::<tracing_subscriber::filter::LevelFilter>().is_ok();
    let valid = directives.split(',').all(|d| match d.split_once('=') {
        Some((module, level)) => !module.is_empty() && is_level(level),
        None => is_level(d),
    });
    valid.then(|| directives.parse().ok()).flatten()
}

/// The default HTTP address: loopback, whatever the gRPC address (metrics name every
/// topic and group; exposing them is a decision to make with --http-listen), on the
/// port after the gRPC one, so brokers given different gRPC ports do not collide; port
/// 0 stays 0 (a free port).
fn http_next_to(listen: SocketAddr) -> anyhow::Result<SocketAddr> {
    let port = match listen.port() {
        0 => 0,
        port => port.checked_add(1).ok_or_else(|| {
            anyhow::anyhow!(
                "cannot put the HTTP listener on the port after {port}: give --http-listen"
            )
        })?,
    };
    let loopback: std::net::IpAddr = if listen.is_ipv6() {
        std::net::Ipv6Addr::LOCALHOST.into()
    } else {
        std::net::Ipv4Addr::LOCALHOST.into()
    };
    Ok(SocketAddr::new(loopback, port))
}

fn load(path: &Path) -> anyhow::Result<ServeArgs> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", path.display()))?;
    toml::from_str(&text)
        .map_err(|e| anyhow::anyhow!("invalid config file {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_override_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("strata.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9999\"\ndefault_durability = \"none\"\n",
        )
        .expect("write");
        let config = ServeConfig::resolve(ServeArgs {
            config: Some(path.clone()),
            default_durability: Some("interval:50".into()),
            ..ServeArgs::default()
        })
        .expect("resolve");
        assert_eq!(config.listen.port(), 9999);
        assert_eq!(config.topic_defaults.durability, "interval:50");
        assert_eq!(config.data_dir, PathBuf::from(DEFAULT_DATA_DIR));

        std::fs::write(&path, "no_such_setting = 1\n").expect("write");
        let err = ServeConfig::resolve(ServeArgs {
            config: Some(path),
            ..ServeArgs::default()
        });
        assert!(err.is_err());
        let bad = ServeConfig::resolve(ServeArgs {
            default_durability: Some("sometimes".into()),
            ..ServeArgs::default()
        });
        assert!(bad.is_err());
    }

    #[test]
    fn sizes_and_durations_take_units_in_flags_and_in_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("strata.toml");
        std::fs::write(
            &path,
            "default_retention_ms = \"3d\"\ndefault_retention_bytes = 10737418240\n\
             default_max_message_bytes = \"4MiB\"\nretention_check_ms = \"1m\"\n",
        )
        .expect("write");
        let config = ServeConfig::resolve(ServeArgs {
            config: Some(path.clone()),
            default_segment_bytes: Some("256MiB".parse().expect("a size")),
            default_retention_bytes: Some("-1".parse().expect("no limit")),
            ..ServeArgs::default()
        })
        .expect("resolve");
        let d = &config.topic_defaults;
        assert_eq!(d.retention_ms, Some(3 * 86_400_000));
        assert_eq!(d.retention_bytes, None, "the flag's -1 wins over the file");
        assert_eq!(d.segment_bytes, 256 << 20);
        assert_eq!(d.max_message_bytes, 4 << 20);
        assert_eq!(config.retention_check, Duration::from_secs(60));

        for (file, expected) in [
            (
                "default_max_message_bytes = \"64MiB\"",
                "above the limit of 32MiB",
            ),
            ("default_retention_ms = 0", "must be positive or -1"),
            ("max_open_files = 0", "max_open_files must be positive"),
            (
                "max_mapped_segments = 0",
                "max_mapped_segments must be positive",
            ),
            ("default_segment_bytes = \"1GB\"", "KiB, MiB, GiB"),
        ] {
            std::fs::write(&path, file).expect("write");
            let e = ServeConfig::resolve(ServeArgs {
                config: Some(path.clone()),
                ..ServeArgs::default()
            })
            .expect_err(file);
            assert!(format!("{e:#}").contains(expected), "{file}: {e:#}");
        }
    }

    /// Guards `strata serve --help`: every default it shows is written in a form its
    /// flag accepts, and is the value the broker uses when the setting is left out.
    #[test]
    fn help_shows_the_defaults_in_use() {
        let config = ServeConfig::resolve(ServeArgs::default()).expect("defaults");
        let d = &config.topic_defaults;
        let l = &config.limits;
        let limit = |v: Option<u64>| v.map_or(-1, |v| v as i64);
        let command = <ServeArgs as clap::Args>::augment_args(clap::Command::new("serve"));
        let mut shown = 0;
        for arg in command.get_arguments() {
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            let Some(default) = help
                .split("[default: ")
                .nth(1)
                .and_then(|rest| rest.split(']').next())
            else {
                continue;
            };
            let size = || default.parse::<ByteSize>().expect(default).0;
            let millis = || Duration::from_millis(default.parse::<Millis>().expect(default).0);
            match arg.get_id().as_str() {
                "data_dir" => assert_eq!(
                    config.data_dir,
                    PathBuf::from(default.trim_start_matches("./"))
                ),
                "listen" => assert_eq!(config.listen.to_string(), default),
                "default_durability" => assert_eq!(d.durability, default),
                "default_retention_ms" => assert_eq!(
                    default.parse::<Limit<Millis>>().map(Limit::to_protocol),
                    Ok(limit(d.retention_ms))
                ),
                "default_retention_bytes" => assert_eq!(
                    default.parse::<Limit<ByteSize>>().map(Limit::to_protocol),
                    Ok(limit(d.retention_bytes))
                ),
                "default_segment_bytes" => assert_eq!(size(), d.segment_bytes),
                "default_max_message_bytes" => {
                    assert_eq!(size(), u64::from(d.max_message_bytes))
                }
                "max_open_files" => assert_eq!(default.parse(), Ok(config.max_open_files)),
                "max_mapped_segments" => {
                    assert_eq!(default.parse(), Ok(config.max_mapped_segments))
                }
                "retention_check_ms" => assert_eq!(
                    default
                        .parse::<Millis>()
                        .map(|m| Duration::from_millis(m.0)),
                    Ok(config.retention_check)
                ),
                "http_listen" => {
                    let http = config.http_listen.expect("on by default").to_string();
                    assert!(default.contains(&http), "{default} names {http}");
                }
                "kafka_listen" => {
                    assert_eq!(default, "off");
                    assert_eq!(config.kafka, None);
                }
                "kafka_auto_create_topics" => {
                    let on = ServeConfig::resolve(ServeArgs {
                        kafka_listen: Some("127.0.0.1:0".into()),
                        ..ServeArgs::default()
                    })
                    .expect("on");
                    assert_eq!(
                        on.kafka.map(|k| k.auto_create_topics),
                        Some(default == "true")
                    );
                }
                "log_format" => assert_eq!(
                    <LogFormat as clap::ValueEnum>::from_str(default, false),
                    Ok(config.log_format)
                ),
                "log_level" => assert_eq!(
                    format!("{:?}", parse_log_level(default)),
                    format!("{:?}", Some(&config.log_level))
                ),
                "max_admin_request_bytes" => {
                    assert_eq!(size(), l.admin_request_bytes as u64)
                }
                "max_groups_request_bytes" => {
                    assert_eq!(size(), l.groups_request_bytes as u64)
                }
                "max_connections" => assert_eq!(default.parse(), Ok(l.connections)),
                "max_http_connections" => assert_eq!(default.parse(), Ok(l.http_connections)),
                "max_streams_per_connection" => {
                    assert_eq!(default.parse(), Ok(l.streams_per_connection))
                }
                "keepalive_interval_ms" => assert_eq!(millis(), l.keepalive_interval),
                "keepalive_timeout_ms" => assert_eq!(millis(), l.keepalive_timeout),
                "shutdown_timeout_ms" => assert_eq!(millis(), l.shutdown_timeout),
                "max_client_id_bytes" => assert_eq!(size(), l.client_id_bytes as u64),
                "fetch_memory_bytes" => assert_eq!(size(), l.fetch_memory_bytes as u64),
                "subscribe_queue_bytes" => {
                    assert_eq!(size(), l.subscribe_queue_bytes as u64)
                }
                "max_commit_metadata_bytes" => {
                    assert_eq!(size(), l.commit_metadata_bytes as u64)
                }
                "max_group_members" => assert_eq!(default.parse(), Ok(l.group_members)),
                "max_groups" => assert_eq!(default.parse(), Ok(l.groups)),
                "max_partitions" => assert_eq!(default.parse(), Ok(l.partitions)),
                "offsets_retention_ms" => assert_eq!(millis(), l.offsets_retention),
                other => panic!("--help shows a default of {other} this test does not check"),
            }
            shown += 1;
        }
        assert_eq!(
            shown, 31,
            "every setting but --config and --kafka-advertised shows its default"
        );
    }

    #[test]
    fn the_http_listener_sits_next_to_the_grpc_one_unless_told_otherwise() {
        let resolve = |listen: &str, http: Option<&str>| {
            ServeConfig::resolve(ServeArgs {
                listen: Some(listen.parse().expect("address")),
                http_listen: http.map(str::to_string),
                ..ServeArgs::default()
            })
        };
        let http = |c: ServeConfig| c.http_listen.map(|a| a.to_string());
        assert_eq!(
            http(resolve("127.0.0.1:7717", None).expect("ok")).as_deref(),
            Some("127.0.0.1:7718")
        );
        assert_eq!(
            http(resolve("127.0.0.1:0", None).expect("ok")).as_deref(),
            Some("127.0.0.1:0")
        );
        assert_eq!(http(resolve("127.0.0.1:0", Some("off")).expect("ok")), None);
        assert_eq!(
            http(resolve("127.0.0.1:0", Some("0.0.0.0:9100")).expect("ok")).as_deref(),
            Some("0.0.0.0:9100")
        );
        assert_eq!(
            http(resolve("0.0.0.0:7717", None).expect("ok")).as_deref(),
            Some("127.0.0.1:7718"),
            "loopback unless told otherwise"
        );
        assert!(resolve("127.0.0.1:65535", None).is_err());
        assert!(resolve("127.0.0.1:0", Some("nowhere")).is_err());
        let bad_level = ServeConfig::resolve(ServeArgs {
            log_level: Some("loud".into()),
            ..ServeArgs::default()
        });
        assert!(bad_level.is_err());
    }

    #[test]
    fn the_kafka_listener_is_off_unless_given_an_address() {
        let resolve = |listen: Option<&str>, advertised: Option<&str>| {
            ServeConfig::resolve(ServeArgs {
                kafka_listen: listen.map(str::to_string),
                kafka_advertised: advertised.map(str::to_string),
                ..ServeArgs::default()
            })
            .map(|c| c.kafka)
        };
        assert_eq!(resolve(None, None).expect("ok"), None);
        assert_eq!(resolve(Some("off"), None).expect("ok"), None);
        let on = resolve(Some("127.0.0.1:9092"), None)
            .expect("ok")
            .expect("on");
        assert_eq!(on.listen.to_string(), "127.0.0.1:9092");
        assert_eq!(on.advertised, None);
        let wild = resolve(Some("0.0.0.0:9092"), Some("broker.example:19092"))
            .expect("ok")
            .expect("on");
        assert_eq!(wild.advertised, Some(("broker.example".to_string(), 19092)));
        for (listen, advertised, expected) in [
            (Some("0.0.0.0:9092"), None, "--kafka-advertised"),
            (Some("nowhere"), None, "invalid kafka_listen"),
            (None, Some("h:1"), "listener is off"),
            (Some("127.0.0.1:0"), Some("h"), "give host:port"),
            (Some("127.0.0.1:0"), Some("h:0"), "other than 0"),
        ] {
            let e = resolve(listen, advertised).expect_err(expected);
            assert!(format!("{e:#}").contains(expected), "{expected}: {e:#}");
        }
    }
}
