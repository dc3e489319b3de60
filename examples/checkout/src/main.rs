//! The `checkout` command: every service alone or all together, the synchronous
//! baseline, the late projection, and the load generator.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use checkout::consume::ConsumerSettings;
use checkout::db::Db;
use checkout::load::{self, LoadReport, Mode, RunArgs};
use checkout::outbox::CrashPoint;
use checkout::profile::{ProfileArgs, Service};
use checkout::services::inventory::InventoryConfig;
use checkout::services::order::OrderConfig;
use checkout::services::payment::PaymentConfig;
use checkout::services::{inventory, notification, order, payment, revenue, Running};
use checkout::system::{
    ensure_topics, Databases, System, SystemConfig, DEFAULT_INITIAL_STOCK, DEFAULT_PARTITIONS,
};
use clap::{Parser, Subcommand};
use strata_client::Client;
use strata_spawn::{find_strata, BrokerDir, SpawnedBroker};
use tokio_util::sync::CancellationToken;

/// Sample checkout services on Strata: an event-driven checkout against a synchronous
/// chain of seven services, and a load generator that compares them.
#[derive(Debug, Parser)]
#[command(name = "checkout", version)]
struct Cli {
    /// Log level: error, warn, info, debug or trace [default: info; error for load and
    /// compare, whose simulated failures would flood the log].
    #[arg(long, global = true)]
    log: Option<tracing::Level>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every event-driven service in one process, and a broker unless --broker is given.
    Demo(DemoArgs),
    /// The order service alone: POST /checkout, GET /orders/{id}, the status projection.
    Order(OrderArgs),
    /// The inventory service alone: reservations, and releases on payments.failed.
    Inventory(InventoryArgs),
    /// The payment service alone: charges orders.created.
    Payment(PaymentArgs),
    /// The notification service alone: emails on payments.completed.
    Notification(NotificationArgs),
    /// Revenue per hour, rebuilt from payments.completed from offset 0.
    Revenue(RevenueArgs),
    /// The dead letters of the checkout's topics, with why and from where.
    DeadLetters(BrokerArg),
    /// The synchronous baseline: seven services behind a front POST /checkout.
    Baseline(BaselineArgs),
    /// Checkouts against one design; prints latency, success, duplicates, settle time.
    Load(LoadArgs),
    /// Both designs, healthy and with the notification service down: the table.
    Compare(CompareArgs),
}

#[derive(Debug, Clone, clap::Args)]
struct BrokerArg {
    /// The Strata broker, host:port.
    #[arg(long, env = "CHECKOUT_BROKER", default_value = "127.0.0.1:7717")]
    broker: String,
}

#[derive(Debug, Clone, clap::Args)]
struct ServiceArgs {
    #[command(flatten)]
    broker: BrokerArg,
    /// The service's database: sqlite://PATH or postgres://USER@HOST/DB [default:
    /// sqlite://checkout-data/<service>.db].
    #[arg(long, env = "CHECKOUT_DATABASE")]
    database: Option<String>,
    /// Partitions of the checkout's topics, if they must be created.
    #[arg(long, default_value_t = DEFAULT_PARTITIONS)]
    partitions: u32,
    /// Members of the service's consumer group run by this process.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// How long a member that died keeps its partitions (ms).
    #[arg(long, default_value_t = 10_000)]
    session_timeout_ms: u64,
    #[command(flatten)]
    profile: ProfileArgs,
}

impl ServiceArgs {
    fn database(&self, service: &str) -> String {
        self.database
            .clone()
            .unwrap_or_else(|| Databases::Dir(PathBuf::from("checkout-data")).url(service))
    }

    fn consumer(&self) -> ConsumerSettings {
        ConsumerSettings {
            workers: self.workers,
            session_timeout: Duration::from_millis(self.session_timeout_ms),
            ..ConsumerSettings::default()
        }
    }

    /// Connects to the broker, creates missing topics, opens the database.
    async fn connect(&self, service: &str) -> anyhow::Result<(Client, Db)> {
        anyhow::ensure!(self.workers >= 1, "--workers must be at least 1");
        let client = Client::connect(&self.broker.broker).await?;
        ensure_topics(&client, self.partitions).await?;
        let url = self.database(service);
        if let Some(path) = url.strip_prefix("sqlite://") {
            let path = std::path::Path::new(path.split('?').next().unwrap_or(path));
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("create {}", parent.display()))?;
            }
        }
        let db = Db::connect(&url).await?;
        Ok((client, db))
    }
}

#[derive(Debug, clap::Args)]
struct OrderArgs {
    #[command(flatten)]
    service: ServiceArgs,
    /// Where the HTTP API listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// The inventory service.
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    inventory_url: String,
    /// Abort the process at this point (crash tests).
    #[arg(long, hide = true)]
    crash_at: Option<CrashPoint>,
}

#[derive(Debug, clap::Args)]
struct InventoryArgs {
    #[command(flatten)]
    service: ServiceArgs,
    /// Where the HTTP API listens.
    #[arg(long, default_value = "127.0.0.1:8081")]
    listen: SocketAddr,
    /// Units of each product stocked on a new database.
    #[arg(long, default_value_t = DEFAULT_INITIAL_STOCK)]
    initial_stock: i64,
}

#[derive(Debug, clap::Args)]
struct PaymentArgs {
    #[command(flatten)]
    service: ServiceArgs,
    /// After this many charges, hang (a stuck gateway; crash tests).
    #[arg(long, hide = true)]
    stall_after: Option<u64>,
}

#[derive(Debug, clap::Args)]
struct NotificationArgs {
    #[command(flatten)]
    service: ServiceArgs,
}

#[derive(Debug, clap::Args)]
struct RevenueArgs {
    #[command(flatten)]
    broker: BrokerArg,
    /// After the replay, keep reading and print each new payment's hour.
    #[arg(long)]
    follow: bool,
}

#[derive(Debug, clap::Args)]
struct BaselineArgs {
    /// Where the front service (POST /checkout) listens.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    #[command(flatten)]
    profile: ProfileArgs,
}

#[derive(Debug, clap::Args)]
struct DemoArgs {
    /// A running broker (host:port) instead of starting one.
    #[arg(long, env = "CHECKOUT_BROKER")]
    broker: Option<String>,
    /// The `strata` binary to start.
    #[arg(long, env = "CHECKOUT_STRATA_BIN")]
    strata_bin: Option<PathBuf>,
    /// Where the broker's data and the SQLite files go [default: a temporary directory,
    /// removed at exit].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// One database for every service (postgres://... or sqlite://...) instead of a
    /// SQLite file each.
    #[arg(long, env = "CHECKOUT_DATABASE")]
    database: Option<String>,
    /// Where the order service listens.
    #[arg(long, default_value = "127.0.0.1:8080")]
    order_listen: SocketAddr,
    /// Where the inventory service listens.
    #[arg(long, default_value = "127.0.0.1:8081")]
    inventory_listen: SocketAddr,
    #[command(flatten)]
    profile: ProfileArgs,
}

#[derive(Debug, clap::Args)]
struct LoadArgs {
    /// The design to measure.
    #[arg(long, value_enum)]
    mode: Mode,
    /// Print a Markdown table (header and row) instead of the report.
    #[arg(long)]
    markdown: bool,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, clap::Args)]
struct CompareArgs {
    #[command(flatten)]
    run: RunArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let quiet = matches!(cli.command, Command::Load(_) | Command::Compare(_));
    let level = cli.log.unwrap_or(if quiet {
        tracing::Level::ERROR
    } else {
        tracing::Level::INFO
    });
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("checkout: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("checkout: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo(args) => demo(args).await,
        Command::Order(args) => {
            let (client, db) = args.service.connect("orders").await?;
            let profile = args.service.profile.build(1.0)?;
            let config = OrderConfig {
                listen: args.listen,
                inventory_url: args.inventory_url,
                inventory_timeout: profile.call_timeout(),
                crash_at: args.crash_at,
                consumer: args.service.consumer(),
            };
            serve(|shutdown| order::start(&client, db, &config, shutdown)).await
        }
        Command::Inventory(args) => {
            let (client, db) = args.service.connect("inventory").await?;
            let profile = Arc::new(args.service.profile.build(1.0)?);
            let config = InventoryConfig {
                listen: args.listen,
                initial_stock: args.initial_stock,
                consumer: args.service.consumer(),
            };
            serve(|shutdown| inventory::start(&client, db, profile, &config, shutdown)).await
        }
        Command::Payment(args) => {
            let (client, db) = args.service.connect("payments").await?;
            let profile = Arc::new(args.service.profile.build(1.0)?);
            let config = PaymentConfig {
                consumer: args.service.consumer(),
                stall_after: args.stall_after,
            };
            serve(|shutdown| payment::start(&client, db, profile, &config, shutdown)).await
        }
        Command::Notification(args) => {
            let (client, db) = args.service.connect("notifications").await?;
            let profile = Arc::new(args.service.profile.build(1.0)?);
            let consumer = args.service.consumer();
            serve(|shutdown| notification::start(&client, db, profile, &consumer, shutdown)).await
        }
        Command::Revenue(args) => revenue(args).await,
        Command::DeadLetters(args) => {
            let client = Client::connect(&args.broker).await?;
            let letters = checkout::dead_letters::list(&client).await?;
            if letters.is_empty() {
                println!("no dead letters");
            }
            for letter in letters {
                println!(
                    "{}/{}@{}  from {}  after {} tries: {}\n    {}",
                    letter.topic,
                    letter.partition,
                    letter.offset,
                    letter.source,
                    letter.attempts,
                    letter.error,
                    letter.value
                );
            }
            Ok(())
        }
        Command::Baseline(args) => {
            let profile = Arc::new(args.profile.build(1.0)?);
            let baseline = checkout::baseline::Baseline::start(profile, args.listen).await?;
            println!("baseline listening on {}", baseline.url());
            println!("  POST {}/checkout", baseline.url());
            wait_for_signal().await?;
            baseline.stop().await;
            Ok(())
        }
        Command::Load(args) => {
            let outage = args.run.profile.outage;
            let report = load::run(args.mode, &args.run, outage).await?;
            if args.markdown {
                println!("{}", LoadReport::markdown_header());
                println!("{}", report.markdown_row());
            } else {
                print!("{}", report.render());
            }
            Ok(())
        }
        Command::Compare(args) => compare(args).await,
    }
}

/// Runs a service until Ctrl-C or SIGTERM; prints `<name> ready` (and where it
/// listens) once it has joined its groups, for scripts and tests to wait on.
async fn serve<F, Fut>(start: F) -> anyhow::Result<()>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = checkout::Result<Running>>,
{
    let shutdown = CancellationToken::new();
    let running = start(shutdown.clone()).await?;
    match running.url() {
        Some(url) => println!("{} listening on {url}", running.name),
        None => println!("{} ready", running.name),
    }
    wait_for_signal().await?;
    shutdown.cancel();
    running.join().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate()).context("listen for SIGTERM")?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.context("listen for Ctrl-C")?,
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await.context("listen for Ctrl-C")?;
    Ok(())
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let profile = Arc::new(args.profile.build(1.0)?);
    let temp = match &args.data_dir {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix("checkout-demo-")
                .tempdir()
                .context("create a temporary directory")?,
        ),
    };
    let data_dir = args
        .data_dir
        .clone()
        .or_else(|| temp.as_ref().map(|t| t.path().to_path_buf()))
        .context("no data directory")?;
    let spawned = match &args.broker {
        Some(_) => None,
        None => {
            let binary = find_strata(args.strata_bin.as_deref(), Some("checkout"))?;
            let broker_dir = data_dir.join("broker");
            let spawned = tokio::task::spawn_blocking(move || {
                SpawnedBroker::start(&binary, BrokerDir::Kept(&broker_dir))
            })
            .await??;
            Some(spawned)
        }
    };
    let broker = match (&args.broker, &spawned) {
        (Some(broker), _) => broker.clone(),
        (None, Some(spawned)) => spawned.address().to_string(),
        (None, None) => anyhow::bail!("no broker"),
    };
    let databases = match &args.database {
        Some(url) => Databases::Url(url.clone()),
        None => Databases::Dir(data_dir.join("db")),
    };
    let mut config = SystemConfig::all(&broker, databases.clone(), profile);
    config.order = Some(args.order_listen);
    config.inventory = Some(args.inventory_listen);
    let system = System::start(&config).await?;
    let order_url = system.order_url().unwrap_or_default().to_string();
    println!("checkout demo running; Ctrl-C stops it");
    match &spawned {
        Some(spawned) => println!(
            "  broker:     {broker} (strata, data in {})",
            spawned.data_dir().display()
        ),
        None => println!("  broker:     {broker}"),
    }
    println!("  order:      {order_url}");
    println!(
        "  inventory:  {}",
        system.inventory_url().unwrap_or_default()
    );
    match &databases {
        Databases::Dir(dir) => println!("  databases:  {}/*.db", dir.display()),
        Databases::Url(url) => println!("  database:   {url}"),
    }
    println!(
        "\nTry:\n  curl -si -X POST {order_url}/checkout -H 'content-type: application/json' \
         -H 'Idempotency-Key: demo-1' \
         -d '{{\"customer_id\":\"alice\",\"items\":[{{\"sku\":\"TEA-01\",\"quantity\":2}}]}}'\n  \
         curl -s {order_url}/orders/<order_id>\n  \
         checkout revenue --broker {broker}\n  \
         strata group describe payment --broker {broker}"
    );
    wait_for_signal().await?;
    system.stop().await;
    drop(spawned);
    Ok(())
}

async fn revenue(args: RevenueArgs) -> anyhow::Result<()> {
    let client = Client::connect(&args.broker.broker).await?;
    let (mut view, ends) = revenue::replay(&client).await?;
    print!("{}", view.render());
    if args.follow {
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let _ = wait_for_signal().await;
            stop.cancel();
        });
        revenue::follow(
            &client,
            &mut view,
            &ends,
            |view, paid| {
                println!(
                    "+ {} for order {}: {} payments, {} in total",
                    revenue::euros(paid.amount_cents),
                    paid.order_id,
                    view.payments(),
                    revenue::euros(view.total_cents())
                );
            },
            shutdown,
        )
        .await?;
    }
    Ok(())
}

async fn compare(mut args: CompareArgs) -> anyhow::Result<()> {
    // One seed for the four runs, so they draw the same carts and latencies.
    let profile = args.run.profile.build(load::DEFAULT_TIME_SCALE)?;
    args.run.profile.seed = Some(profile.seed());
    let mut rows = Vec::new();
    for mode in [Mode::Sync, Mode::Events] {
        for outage in [None, Some(Service::Notification)] {
            eprintln!(
                "checkout: running {mode:?} with outage {}...",
                outage.map_or("none", Service::name)
            );
            let report = load::run(mode, &args.run, outage).await?;
            eprint!("{}", report.render());
            rows.push(report.markdown_row());
        }
    }
    println!("{}", LoadReport::markdown_header());
    for row in rows {
        println!("{row}");
    }
    println!(
        "\n{} checkouts by {} users, {} retry per failed checkout; {}",
        args.run.checkouts,
        args.run.concurrency,
        args.run.retries,
        profile.describe()
    );
    Ok(())
}
