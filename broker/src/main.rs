//! The `strata` binary: `strata serve` runs the broker; the other subcommands are a
//! command-line client for it.

use clap::{Parser, Subcommand};
use strata_broker::cli::top::TopArgs;
use strata_broker::cli::{self, BrokerArg, ConsumeArgs, GroupCommand, ProduceArgs, TopicCommand};
use strata_broker::config::{LogFormat, ServeArgs, ServeConfig};
use tracing_subscriber::filter::Targets;

#[derive(Debug, Parser)]
#[command(
    name = "strata",
    version,
    about = "Strata: a single-binary, log-structured message broker"
)]
struct Cli {
    /// Broker address of the client commands, host:port or http://host:port (also
    /// accepted after the subcommand) [env: STRATA_BROKER] [default: 127.0.0.1:7717].
    #[arg(long, value_name = "ADDRESS")]
    broker: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the broker.
    Serve(Box<ServeArgs>),
    /// Create, list, describe and delete topics.
    Topic {
        #[command(flatten)]
        broker: BrokerArg,
        #[command(subcommand)]
        command: TopicCommand,
    },
    /// List, describe (with lag), reset and delete consumer groups.
    Group {
        #[command(flatten)]
        broker: BrokerArg,
        #[command(subcommand)]
        command: GroupCommand,
    },
    /// Write standard input to a topic, one record per line.
    Produce {
        #[command(flatten)]
        broker: BrokerArg,
        #[command(flatten)]
        args: ProduceArgs,
    },
    /// Print a topic's records: partition, offset, timestamp, key, value (tab-separated).
    Consume {
        #[command(flatten)]
        broker: BrokerArg,
        #[command(flatten)]
        args: ConsumeArgs,
    },
    /// A live view of the broker: topic rates, group lag, latencies, the process.
    Top {
        #[command(flatten)]
        broker: BrokerArg,
        #[command(flatten)]
        args: TopArgs,
    },
}

/// Logs to standard error, as text for people (coloured on a terminal) or as one JSON
/// object per line for collectors.
fn init_logging(format: LogFormat, level: Targets) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let text = (format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
    });
    let json = (format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_current_span(false)
    });
    tracing_subscriber::registry()
        .with(level)
        .with(text)
        .with(json)
        .init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("strata: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let outer = BrokerArg { broker: cli.broker };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve(args) => {
                if outer.broker.is_some() {
                    anyhow::bail!(
                        "--broker names the broker the client commands talk to; `strata \
                         serve` listens where --listen says"
                    );
                }
                let config = ServeConfig::resolve(*args)?;
                init_logging(config.log_format, config.log_level.clone());
                strata_broker::server::serve(config, strata_broker::server::shutdown_signal()).await
            }
            Command::Topic { broker, command } => cli::topic(&broker.resolve(outer), command).await,
            Command::Group { broker, command } => cli::group(&broker.resolve(outer), command).await,
            Command::Produce { broker, args } => cli::produce(&broker.resolve(outer), args).await,
            Command::Consume { broker, args } => cli::consume(&broker.resolve(outer), args).await,
            Command::Top { broker, args } => cli::top::top(&broker.resolve(outer), args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
