//! `strata serve` configuration: defaults, overridden by an optional TOML file, then by
//! environment variables, then by flags.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::topics::settings::{TopicSettings, MESSAGE_BYTES_CAP};
use crate::units::{ByteSize, Limit, Millis};

/// The default gRPC address: loopback only, on a port no common service uses.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7717";
/// The default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "strata-data";
/// Segment files kept open for reading when `--max-open-files` is not given.
const MAX_OPEN_FILES_DEFAULT: usize = 1024;
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
    /// How often retention runs: a duration (1m, 30s; a plain number is ms) [default: 30s].
    #[arg(long, env = "STRATA_RETENTION_CHECK_MS")]
    pub retention_check_ms: Option<Millis>,
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
        Ok(ServeConfig {
            data_dir: args
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            listen: args.listen.or(file.listen).unwrap_or(default_listen),
            topic_defaults,
            max_open_files: args
                .max_open_files
                .or(file.max_open_files)
                .unwrap_or(MAX_OPEN_FILES_DEFAULT),
            retention_check: Duration::from_millis(
                args.retention_check_ms
                    .or(file.retention_check_ms)
                    .map_or(RETENTION_CHECK_MS_DEFAULT, u64::from)
                    .max(1),
            ),
        })
    }
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
                "retention_check_ms" => assert_eq!(
                    default
                        .parse::<Millis>()
                        .map(|m| Duration::from_millis(m.0)),
                    Ok(config.retention_check)
                ),
                other => panic!("--help shows a default of {other} this test does not check"),
            }
            shown += 1;
        }
        assert_eq!(shown, 9, "every setting but --config shows its default");
    }
}
