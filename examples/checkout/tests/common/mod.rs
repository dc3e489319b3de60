//! Fixtures of the checkout's integration tests: a real `strata` broker on a free port,
//! a store (SQLite files in a temporary directory, or a fresh PostgreSQL database that
//! is dropped afterwards), the services, child processes of the `checkout` binary, and
//! waiting for a condition with a generous deadline.

use std::future::Future;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use checkout::catalog::CheckoutRequest;
use checkout::consume::ConsumerSettings;
use checkout::db::Db;
use checkout::events::Event;
use checkout::http::{HttpClient, HttpResponse};
use checkout::profile::Profile;
use checkout::services::order::{self, OrderView, IDEMPOTENCY_KEY};
use checkout::system::{Databases, System, SystemConfig};
use strata_client::{Client, DeadLetterPolicy, StartAt};
use strata_spawn::{find_strata, BrokerDir, SpawnedBroker};
use tokio_stream::StreamExt;

/// Runs each scenario (an `async fn(Env)` of the test file) as two tests: `sqlite`, and
/// `postgres`, which passes without running when no server answers.
macro_rules! on_both_stores {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use crate::common::{Env, Store};

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let env = Env::new(Store::Sqlite).await.expect("SQLite is always there");
                super::$scenario(env).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                if let Some(env) = Env::new(Store::Postgres).await {
                    super::$scenario(env).await;
                }
            }
        }
    )*};
}

/// How long a condition may take before the test fails. Never reached when things
/// work; nothing asserts on time.
pub const DEADLINE: Duration = Duration::from_secs(90);

/// The PostgreSQL server the tests use when it answers.
const POSTGRES_ADDR: &str = "127.0.0.1:5432";

/// Which database the services use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// A SQLite file per service.
    Sqlite,
    /// One fresh PostgreSQL database.
    Postgres,
}

/// A broker and a store for one test.
pub struct Env {
    /// The broker.
    pub broker: SpawnedBroker,
    /// Where the services keep their tables.
    pub databases: Databases,
    /// Holds the SQLite files and child logs.
    pub dir: tempfile::TempDir,
    _postgres: Option<PostgresDatabase>,
}

impl Env {
    /// A broker and a store of kind `store`; `None` (after saying so) when the store is
    /// PostgreSQL and no server answers.
    pub async fn new(store: Store) -> Option<Env> {
        let dir = tempfile::Builder::new()
            .prefix("checkout-test-")
            .tempdir()
            .expect("a temporary directory");
        let (databases, postgres) = match store {
            Store::Sqlite => (Databases::Dir(dir.path().join("db")), None),
            Store::Postgres => {
                let database = PostgresDatabase::create().await?;
                (Databases::Url(database.url.clone()), Some(database))
            }
        };
        let binary = strata().expect("the strata binary");
        let broker = tokio::task::spawn_blocking(move || {
            SpawnedBroker::start(&binary, BrokerDir::Temporary(None))
        })
        .await
        .expect("the broker start does not panic")
        .expect("the broker starts");
        Some(Env {
            broker,
            databases,
            dir,
            _postgres: postgres,
        })
    }

    /// The broker's address.
    pub fn broker_addr(&self) -> String {
        self.broker.address().to_string()
    }

    /// A client of the broker.
    pub async fn client(&self) -> Client {
        Client::connect(self.broker.address())
            .await
            .expect("connects to the broker")
    }

    /// The database of `service` (`orders`, `inventory`, `payments`, `notifications`).
    pub async fn db(&self, service: &str) -> Db {
        let url = self.databases.url(service);
        if let Databases::Dir(dir) = &self.databases {
            std::fs::create_dir_all(dir).expect("create the database directory");
        }
        Db::connect(&url).await.expect("connects to the database")
    }

    /// Every service, fast and without failures or declines (tests set what they
    /// need), on free ports.
    pub fn config(&self, profile: Profile) -> SystemConfig {
        let mut config = SystemConfig::all(
            self.broker.address(),
            self.databases.clone(),
            Arc::new(profile),
        );
        config.consumer = test_consumer();
        config.payment_workers = Some(2);
        config.notification_workers = Some(1);
        config
    }

    /// Runs `checkout <args>` with this broker and the database of `service`, logging
    /// to a file; waits for its `ready` or `listening on` line.
    pub fn spawn_checkout(&self, service: &str, args: &[&str]) -> ChildService {
        let log_path = self
            .dir
            .path()
            .join(format!("{service}-{}.log", uuid::Uuid::new_v4().simple()));
        let log = std::fs::File::create(&log_path).expect("create the child's log");
        if let Databases::Dir(dir) = &self.databases {
            std::fs::create_dir_all(dir).expect("create the database directory");
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_checkout"))
            .args(args)
            .args(["--broker", self.broker.address()])
            .args(["--database", &self.databases.url(service)])
            .args(["--session-timeout-ms", "2000", "--log", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn checkout");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut service = ChildService {
            child,
            log_path,
            url: None,
        };
        let mut lines = BufReader::new(stdout);
        let mut line = String::new();
        loop {
            line.clear();
            let read = lines.read_line(&mut line).expect("read the child's stdout");
            if read == 0 {
                panic!(
                    "checkout {args:?} exited before it was ready; its log:\n{}",
                    service.log()
                );
            }
            let line = line.trim();
            if let Some((_, url)) = line.split_once(" listening on ") {
                service.url = Some(url.to_string());
                break;
            }
            if line.ends_with(" ready") {
                break;
            }
        }
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = lines.read_to_end(&mut sink);
        });
        service
    }
}

/// The `strata` binary the tests run: the workspace's, built first when stale.
pub fn strata() -> strata_spawn::Result<PathBuf> {
    find_strata(None, Some("checkout"))
}

/// Consumers that give up a dead member's partitions after 2 s and dead-letter after
/// three quick tries.
pub fn test_consumer() -> ConsumerSettings {
    ConsumerSettings {
        workers: 1,
        session_timeout: Duration::from_secs(2),
        dead_letters: DeadLetterPolicy {
            max_attempts: 3,
            backoff_min: Duration::from_millis(10),
            backoff_max: Duration::from_millis(100),
            ..DeadLetterPolicy::default()
        },
    }
}

/// A fast world: every call 1 ms, no failures, no declines but the declined token.
pub fn fast_profile() -> Profile {
    Profile::default().with(1.0, 0.0, 0.0, None)
}

/// A `checkout` child process. Dropping it kills it.
pub struct ChildService {
    child: Child,
    log_path: PathBuf,
    /// Where it listens, if it has an HTTP API.
    pub url: Option<String>,
}

impl ChildService {
    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        self.child.kill().expect("kill the child");
        self.child.wait().expect("reap the child");
    }

    /// Waits for the process to exit by itself; returns whether it was killed by a
    /// signal (an abort) rather than exiting.
    pub async fn wait_for_crash(&mut self) -> bool {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the child") {
                return status.code().is_none();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the child did not exit; its log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// What it logged.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

impl Drop for ChildService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` until it returns `Some`, failing the test after [`DEADLINE`].
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// POSTs `request` to the order service at `url`, with an idempotency key if given.
pub async fn post_checkout(
    url: &str,
    request: &CheckoutRequest,
    key: Option<&str>,
    traceparent: Option<&str>,
) -> checkout::Result<HttpResponse> {
    let mut headers = Vec::new();
    if let Some(key) = key {
        headers.push((IDEMPOTENCY_KEY, key));
    }
    if let Some(traceparent) = traceparent {
        headers.push((checkout::trace::TRACEPARENT, traceparent));
    }
    HttpClient::new()
        .post_json(
            "order",
            &format!("{url}/checkout"),
            &headers,
            request,
            Duration::from_secs(30),
        )
        .await
}

/// POSTs a checkout that must be accepted (201); returns the order.
pub async fn place(
    url: &str,
    request: &CheckoutRequest,
    key: Option<&str>,
    traceparent: Option<&str>,
) -> OrderView {
    let response = post_checkout(url, request, key, traceparent)
        .await
        .expect("the order service answers");
    assert_eq!(
        response.status.as_u16(),
        201,
        "{}",
        response.error_message()
    );
    response.json().expect("an order")
}

/// GETs a JSON resource that must exist.
pub async fn get_json<T: serde::de::DeserializeOwned>(url: &str) -> T {
    let response = HttpClient::new()
        .request(
            "test",
            axum::http::Method::GET,
            url,
            &[],
            None,
            Duration::from_secs(30),
        )
        .await
        .expect("answers");
    assert!(response.status.is_success(), "{url}: {}", response.status);
    response.json().expect("JSON")
}

/// Waits until no order of customers starting with `prefix` is PENDING and `total` exist.
pub async fn wait_settled(db: &Db, prefix: &str, total: usize) -> order::StatusCounts {
    wait_for("every order to be PAID or CANCELLED", || async {
        let counts = order::count_by_status(db, prefix).await.expect("counts");
        (counts.pending == 0 && counts.total() == total).then_some(counts)
    })
    .await
}

/// Every event on `topic` now, in partition and offset order.
pub async fn read_topic(client: &Client, topic: &str) -> Vec<Event> {
    let description = client
        .admin()
        .describe_topic(topic)
        .await
        .expect("the topic exists");
    let mut events = Vec::new();
    for partition in description.partitions {
        if partition.latest_offset == partition.earliest_offset {
            continue;
        }
        let mut records = client
            .partition_consumer(topic, partition.partition, StartAt::Earliest)
            .await
            .expect("a partition consumer");
        while let Some(record) = records.next().await {
            let record = record.expect("a record");
            let last = record.offset + 1 >= partition.latest_offset;
            events.push(Event::parse(record).expect("a valid event"));
            if last {
                break;
            }
        }
    }
    events
}

/// Starts the services of `config`.
pub async fn start(config: &SystemConfig) -> System {
    System::start(config).await.expect("the services start")
}

/// A PostgreSQL database made for one test and dropped after it.
struct PostgresDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl PostgresDatabase {
    /// `None` (after printing why) if no server answers on [`POSTGRES_ADDR`]; a server
    /// that answers must let the test create a database.
    async fn create() -> Option<PostgresDatabase> {
        let reachable = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(POSTGRES_ADDR),
        )
        .await
        .is_ok_and(|c| c.is_ok());
        if !reachable {
            println!("skipped: PostgreSQL does not answer on {POSTGRES_ADDR}");
            return None;
        }
        let name = format!("checkout_test_{}", uuid::Uuid::new_v4().simple());
        let mut last_error = String::new();
        for user in ["postgres", "root"] {
            let admin_url = format!("postgres://{user}@{POSTGRES_ADDR}/postgres");
            match Db::connect(&admin_url).await {
                Ok(admin) => {
                    sqlx::query(&format!("CREATE DATABASE {name}"))
                        .execute(admin.pool())
                        .await
                        .expect("create a test database");
                    admin.close().await;
                    return Some(PostgresDatabase {
                        url: format!("postgres://{user}@{POSTGRES_ADDR}/{name}"),
                        admin_url,
                        name,
                    });
                }
                Err(e) => last_error = e.to_string(),
            }
        }
        panic!("PostgreSQL answers on {POSTGRES_ADDR} but refuses users postgres and root: {last_error}");
    }
}

impl Drop for PostgresDatabase {
    fn drop(&mut self) {
        let (admin_url, name) = (self.admin_url.clone(), self.name.clone());
        // Drop runs inside the test's runtime, which cannot be blocked on: use a thread
        // with a runtime of its own.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async {
                let admin = Db::connect(&admin_url).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(admin.pool())
                    .await?;
                admin.close().await;
                Ok::<_, checkout::Error>(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop the test database {}", self.name);
        }
    }
}
