//! The event-driven checkout in one process: the topics, a database per service, and
//! whichever services are asked for. `checkout demo`, `checkout load --mode events` and
//! the tests start it this way; each service can also run alone (`checkout order`,
//! `checkout payment`, ...).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use strata_client::{Client, Error as ClientError, TopicConfig};
use tokio_util::sync::CancellationToken;

use crate::consume::ConsumerSettings;
use crate::db::Db;
use crate::error::{Error, Result};
use crate::events::topics;
use crate::outbox::CrashPoint;
use crate::profile::Profile;
use crate::services::inventory::InventoryConfig;
use crate::services::order::OrderConfig;
use crate::services::payment::PaymentConfig;
use crate::services::{inventory, notification, order, payment, Running};

/// Partitions of each checkout topic when they are created here.
pub const DEFAULT_PARTITIONS: u32 = 4;
/// Units of each product a new inventory starts with.
pub const DEFAULT_INITIAL_STOCK: i64 = 1_000_000;

/// Where the services keep their tables.
#[derive(Debug, Clone)]
pub enum Databases {
    /// One SQLite file per service in this directory (`orders.db`, `inventory.db`,
    /// `payments.db`, `notifications.db`).
    Dir(PathBuf),
    /// One database for all (a `postgres://` or `sqlite://` URL); the services' tables
    /// have distinct names.
    Url(String),
}

impl Databases {
    /// The database URL of `service`.
    pub fn url(&self, service: &str) -> String {
        match self {
            Databases::Dir(dir) => format!("sqlite://{}/{service}.db", dir.display()),
            Databases::Url(url) => url.clone(),
        }
    }
}

/// Which services run, and how.
#[derive(Debug, Clone)]
pub struct SystemConfig {
    /// The broker, `host:port`.
    pub broker: String,
    /// Where the tables are.
    pub databases: Databases,
    /// The simulated world.
    pub profile: Arc<Profile>,
    /// Partitions of the topics, if they must be created.
    pub partitions: u32,
    /// Run the order service (HTTP API, status projection, outbox relay) on this
    /// address.
    pub order: Option<SocketAddr>,
    /// Run the inventory service on this address.
    pub inventory: Option<SocketAddr>,
    /// The inventory service the order service calls, if it does not run here.
    pub inventory_url: Option<String>,
    /// Run the payment service, with these members in its group.
    pub payment_workers: Option<usize>,
    /// Run the notification service, with these members in its group.
    pub notification_workers: Option<usize>,
    /// Consumer settings (the worker counts above override `workers`).
    pub consumer: ConsumerSettings,
    /// Abort the order service at this point (crash tests).
    pub crash_at: Option<CrashPoint>,
    /// Units of each product a new inventory starts with.
    pub initial_stock: i64,
}

impl SystemConfig {
    /// Every service, on free loopback ports, with default settings.
    pub fn all(broker: &str, databases: Databases, profile: Arc<Profile>) -> SystemConfig {
        let any_port = SocketAddr::from(([127, 0, 0, 1], 0));
        SystemConfig {
            broker: broker.to_string(),
            databases,
            profile,
            partitions: DEFAULT_PARTITIONS,
            order: Some(any_port),
            inventory: Some(any_port),
            inventory_url: None,
            payment_workers: Some(DEFAULT_PARTITIONS as usize),
            notification_workers: Some(2),
            consumer: ConsumerSettings::default(),
            crash_at: None,
            initial_stock: DEFAULT_INITIAL_STOCK,
        }
    }
}

/// Running services.
#[derive(Debug)]
pub struct System {
    shutdown: CancellationToken,
    running: Vec<Running>,
    dbs: HashMap<String, Db>,
    order_url: Option<String>,
    inventory_url: Option<String>,
}

impl System {
    /// Creates the topics if needed, opens the databases and starts the services.
    pub async fn start(config: &SystemConfig) -> Result<System> {
        let client = Client::connect(&config.broker).await?;
        ensure_topics(&client, config.partitions).await?;
        let mut system = System {
            shutdown: CancellationToken::new(),
            running: Vec::new(),
            dbs: HashMap::new(),
            order_url: None,
            inventory_url: config.inventory_url.clone(),
        };
        if let Err(e) = system.start_services(&client, config).await {
            system.stop().await;
            return Err(e);
        }
        Ok(system)
    }

    async fn start_services(&mut self, client: &Client, config: &SystemConfig) -> Result<()> {
        let shutdown = self.shutdown.clone();
        let workers = |n: usize| ConsumerSettings {
            workers: n,
            ..config.consumer.clone()
        };
        if let Some(listen) = config.inventory {
            let db = self.db(config, "inventory").await?;
            let inventory_config = InventoryConfig {
                listen,
                initial_stock: config.initial_stock,
                consumer: config.consumer.clone(),
            };
            let running = inventory::start(
                client,
                db,
                Arc::clone(&config.profile),
                &inventory_config,
                shutdown.clone(),
            )
            .await?;
            self.inventory_url = running.url();
            self.running.push(running);
        }
        if let Some(listen) = config.order {
            let inventory_url = self.inventory_url.clone().ok_or_else(|| {
                Error::Setup("the order service needs an inventory service URL".into())
            })?;
            let db = self.db(config, "orders").await?;
            let order_config = OrderConfig {
                listen,
                inventory_url,
                inventory_timeout: config.profile.call_timeout(),
                crash_at: config.crash_at,
                consumer: config.consumer.clone(),
            };
            let running = order::start(client, db, &order_config, shutdown.clone()).await?;
            self.order_url = running.url();
            self.running.push(running);
        }
        if let Some(n) = config.payment_workers {
            let db = self.db(config, "payments").await?;
            let payment_config = PaymentConfig {
                consumer: workers(n),
                stall_after: None,
            };
            let running = payment::start(
                client,
                db,
                Arc::clone(&config.profile),
                &payment_config,
                shutdown.clone(),
            )
            .await?;
            self.running.push(running);
        }
        if let Some(n) = config.notification_workers {
            let db = self.db(config, "notifications").await?;
            let running = notification::start(
                client,
                db,
                Arc::clone(&config.profile),
                &workers(n),
                shutdown.clone(),
            )
            .await?;
            self.running.push(running);
        }
        Ok(())
    }

    /// The database of `service` (`orders`, `inventory`, `payments`,
    /// `notifications`), opened once per URL.
    async fn db(&mut self, config: &SystemConfig, service: &str) -> Result<Db> {
        let url = config.databases.url(service);
        if let Some(db) = self.dbs.get(&url) {
            return Ok(db.clone());
        }
        if let Databases::Dir(dir) = &config.databases {
            std::fs::create_dir_all(dir).map_err(Error::io(format!("create {}", dir.display())))?;
        }
        let db = Db::connect(&url).await?;
        self.dbs.insert(url, db.clone());
        Ok(db)
    }

    /// `http://<addr>` of the order service, if it runs here.
    pub fn order_url(&self) -> Option<&str> {
        self.order_url.as_deref()
    }

    /// `http://<addr>` of the inventory service.
    pub fn inventory_url(&self) -> Option<&str> {
        self.inventory_url.as_deref()
    }

    /// Stops every service, waits for them, and closes the databases.
    pub async fn stop(self) {
        self.shutdown.cancel();
        for running in self.running {
            running.join().await;
        }
        for db in self.dbs.values() {
            db.close().await;
        }
    }
}

/// Creates the checkout's topics with `partitions` partitions, those that do not exist.
pub async fn ensure_topics(client: &Client, partitions: u32) -> Result<()> {
    let admin = client.admin();
    for topic in topics::ALL {
        match admin
            .create_topic(topic, partitions, TopicConfig::default())
            .await
        {
            Ok(_) | Err(ClientError::TopicExists { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}
