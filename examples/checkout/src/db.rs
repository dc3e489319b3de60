//! Storage: one code path for SQLite and PostgreSQL through `sqlx::Any`.
//!
//! Every query is written once, in the SQL both databases accept: `$1` placeholders,
//! `BIGINT` and `TEXT` columns only (the `Any` driver maps them both ways),
//! `INSERT ... ON CONFLICT DO NOTHING` for idempotence, `RETURNING`. Queries are built
//! at run time (no `query!` macros, which need a database at build time). Two things
//! differ per database and live here, nowhere else:
//! - how a write transaction starts: SQLite's `BEGIN IMMEDIATE` takes the write lock at
//!   once, so two writers queue on the busy timeout instead of one failing when it
//!   upgrades a read lock (which a plain `BEGIN` risks); PostgreSQL's `BEGIN` locks rows
//!   as they are written;
//! - the auto-increment key of outbox tables.
//!
//! SQLite runs in WAL mode with `synchronous=NORMAL`: a commit survives the process
//! being killed (what the crash tests do), and a power loss can lose the last
//! transactions, like PostgreSQL with `synchronous_commit=off`. Each service owns its
//! tables (prefixed with its name), so services can share one PostgreSQL database or
//! each have a SQLite file.

use std::str::FromStr;
use std::sync::Once;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{Any, AnyPool, Executor, Transaction};

use crate::error::{Error, Result};

/// Connections per pool on SQLite: one. SQLite takes one writer at a time anyway, and
/// writers on several connections wait for its lock in SQLite's busy handler, which
/// sleeps 1 to 100 ms between tries; one connection makes them queue in the pool
/// instead, first come first served. (Another process on the same file still waits in
/// the busy handler, which is why write transactions take the lock up front.)
const SQLITE_CONNECTIONS_MAX: u32 = 1;
/// Connections per pool on PostgreSQL: five services (and the tests' parallel runs)
/// stay well below its default limit of 100.
const POSTGRES_CONNECTIONS_MAX: u32 = 6;
/// How long a query waits for a free connection before failing.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(30);

/// Which database a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// An embedded SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

/// A connection pool to one database. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Db {
    pool: AnyPool,
    backend: Backend,
}

impl Db {
    /// Connects to `sqlite://PATH` (the file is created if missing) or
    /// `postgres://USER@HOST:PORT/DATABASE`.
    pub async fn connect(url: &str) -> Result<Db> {
        static DRIVERS: Once = Once::new();
        DRIVERS.call_once(sqlx::any::install_default_drivers);
        let (backend, url) = if url.starts_with("sqlite:") {
            let url = if url.contains("mode=") {
                url.to_string()
            } else {
                let separator = if url.contains('?') { '&' } else { '?' };
                format!("{url}{separator}mode=rwc")
            };
            (Backend::Sqlite, url)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Backend::Postgres, url.to_string())
        } else {
            return Err(Error::Setup(format!(
                "unsupported database URL {url:?}: use sqlite://PATH or postgres://USER@HOST/DB"
            )));
        };
        let options = AnyConnectOptions::from_str(&url)
            .map_err(|e| Error::Setup(format!("bad database URL {url:?}: {e}")))?;
        let pool = AnyPoolOptions::new()
            .max_connections(match backend {
                Backend::Sqlite => SQLITE_CONNECTIONS_MAX,
                Backend::Postgres => POSTGRES_CONNECTIONS_MAX,
            })
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .after_connect(move |connection, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        connection
                            .execute("PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL;")
                            .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        Ok(Db { pool, backend })
    }

    /// The pool, for queries outside a transaction.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Starts a write transaction (see the module notes).
    pub async fn begin(&self) -> Result<Transaction<'static, Any>> {
        Ok(match self.backend {
            Backend::Sqlite => self.pool.begin_with("BEGIN IMMEDIATE").await?,
            Backend::Postgres => self.pool.begin().await?,
        })
    }

    /// Runs each statement in order: the service's `CREATE TABLE IF NOT EXISTS`.
    pub async fn migrate(&self, statements: &[String]) -> Result<()> {
        for statement in statements {
            sqlx::query(statement).execute(&self.pool).await?;
        }
        Ok(())
    }

    /// The column definition of an auto-increment primary key.
    pub fn serial_primary_key(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "INTEGER PRIMARY KEY AUTOINCREMENT",
            Backend::Postgres => "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        }
    }

    /// Closes every connection.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `$first, $first+1, ...`: `count` placeholders for an `IN (...)` list.
pub fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|i| format!("${i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_from_the_first() {
        assert_eq!(placeholders(2, 3), "$2, $3, $4");
        assert_eq!(placeholders(1, 1), "$1");
    }

    #[tokio::test]
    async fn an_unknown_url_scheme_is_a_setup_error() {
        let error = Db::connect("mysql://localhost/x")
            .await
            .expect_err("refused");
        assert!(matches!(error, Error::Setup(m) if m.contains("sqlite://")));
    }

    #[tokio::test]
    async fn sqlite_creates_the_file_and_runs_transactions() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = format!("sqlite://{}/t.db", dir.path().display());
        let db = Db::connect(&url).await.expect("connects");
        db.migrate(&[format!(
            "CREATE TABLE IF NOT EXISTS t (id {}, n BIGINT NOT NULL)",
            db.serial_primary_key()
        )])
        .await
        .expect("creates");
        let mut tx = db.begin().await.expect("begins");
        sqlx::query("INSERT INTO t (n) VALUES ($1)")
            .bind(5_i64)
            .execute(&mut *tx)
            .await
            .expect("inserts");
        tx.commit().await.expect("commits");
        let n: i64 = sqlx::query_scalar("SELECT n FROM t")
            .fetch_one(db.pool())
            .await
            .expect("reads");
        assert_eq!(n, 5);
        assert!(dir.path().join("t.db").is_file());
    }
}
