//! `strata serve` configuration: defaults, overridden by an optional TOML file, then by
//! environment variables, then by flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tracing_subscriber::filter::Targets;

use crate::topics::settings::TopicSettings;

/// The default gRPC address: loopback only, on a port no common service uses.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7717";
/// The default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "strata-data";

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
    /// Retention by age of topics created without one, in ms; -1 keeps forever [default: 7 days].
    #[arg(long, env = "STRATA_DEFAULT_RETENTION_MS", allow_hyphen_values = true)]
    pub default_retention_ms: Option<i64>,
    /// Retention by size per partition of topics created without one; -1 is unlimited [default: -1].
    #[arg(
        long,
        env = "STRATA_DEFAULT_RETENTION_BYTES",
        allow_hyphen_values = true
    )]
    pub default_retention_bytes: Option<i64>,
    /// Segment size of topics created without one [default: 1 GiB].
    #[arg(long, env = "STRATA_DEFAULT_SEGMENT_BYTES")]
    pub default_segment_bytes: Option<u64>,
    /// Largest batch of topics created without one [default: 1 MiB].
    #[arg(long, env = "STRATA_DEFAULT_MAX_MESSAGE_BYTES")]
    pub default_max_message_bytes: Option<u32>,
    /// Most segment files kept open for reading across all partitions [default: 1024].
    #[arg(long, env = "STRATA_MAX_OPEN_FILES")]
    pub max_open_files: Option<usize>,
    /// How often retention runs, in ms [default: 30000].
    #[arg(long, env = "STRATA_RETENTION_CHECK_MS")]
    pub retention_check_ms: Option<u64>,
    /// HTTP address serving /metrics, /healthz and /readyz, or `off` [default: loopback
    /// on the port after the gRPC one, 127.0.0.1:7718; port 0 when the gRPC port is 0].
    #[arg(long, env = "STRATA_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// Log format: `text` (for people) or `json` (one object per line) [default: text].
    #[arg(long, env = "STRATA_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// Log level (error, warn, info, debug, trace), optionally per module:
    /// `info,strata_broker::grpc=debug` [default: info].
    #[arg(long, env = "STRATA_LOG_LEVEL")]
    pub log_level: Option<String>,
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
    /// Retention period.
    pub retention_check: Duration,
    /// HTTP address of /metrics, /healthz and /readyz; `None` when off.
    pub http_listen: Option<SocketAddr>,
    /// Log format.
    pub log_format: LogFormat,
    /// Log level directives.
    pub log_level: Targets,
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
        let base = TopicSettings::default();
        let topic_defaults = TopicSettings {
            partitions: 1,
            retention_ms: limit(
                "default_retention_ms",
                args.default_retention_ms.or(file.default_retention_ms),
                base.retention_ms,
            )?,
            retention_bytes: limit(
                "default_retention_bytes",
                args.default_retention_bytes
                    .or(file.default_retention_bytes),
                base.retention_bytes,
            )?,
            segment_bytes: args
                .default_segment_bytes
                .or(file.default_segment_bytes)
                .unwrap_or(base.segment_bytes),
            segment_ms: base.segment_ms,
            max_message_bytes: args
                .default_max_message_bytes
                .or(file.default_max_message_bytes)
                .unwrap_or(base.max_message_bytes),
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
            data_dir: args
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            listen,
            http_listen,
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            log_level,
            topic_defaults,
            max_open_files: args.max_open_files.or(file.max_open_files).unwrap_or(1024),
            retention_check: Duration::from_millis(
                args.retention_check_ms
                    .or(file.retention_check_ms)
                    .unwrap_or(30_000)
                    .max(1),
            ),
        })
    }
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
}
