//! Durable state through sqlx: zone snapshots, the audit log and its dead letters, in PostgreSQL
//! or in an embedded SQLite file (the default: no server to install). The database URL decides
//! which; everything above this module sees one [`Store`].
//!
//! Both backends run the same queries, written once: [`on_pool!`] expands each for both pool
//! types. Only what must differ does: the migrations (JSONB and a GIN index on PostgreSQL) and
//! the audit log's batch insert (`UNNEST` on PostgreSQL, a multi-row `VALUES` on SQLite).

mod audit;
mod revocations;
mod zones;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection};

use uuid::Uuid;

use crate::redact::redact_url;
use crate::zone::ZoneError;

pub use audit::{AppendReport, AuditSink, Audited, DeadLetter};
pub use zones::{SnapshotSink, Snapshotted};

/// Which database a store is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("unsupported database URL {0:?}: expected postgres://… or sqlite://…")]
    UnsupportedUrl(String),
    #[error("invalid database URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("cannot open the database at {url}: {source}")]
    Connect { url: String, source: sqlx::Error },
    #[error(
        "no database at {0}: `thunderline serve` creates it on first start; point at an existing one with --database or --data-dir"
    )]
    NoDatabase(PathBuf),
    #[error("cannot bring the schema up to date: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(transparent)]
    Zone(#[from] ZoneError),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the database holds data this version cannot read: {0}")]
    Corrupt(String),
    /// A write of a zone's former writer in a cluster: its lease has moved on to a writer with a
    /// higher fencing token, so the write is refused.
    #[error(
        "zone {zone}'s writer was fenced off: its lease (token {fence}) has moved on (token {current})"
    )]
    Fenced {
        zone: Uuid,
        fence: u64,
        current: u64,
    },
}

/// A writer's claim on a zone in a cluster: the zone and its lease's fencing token. Writes that
/// carry one are refused once the zone's row names a higher token.
pub type Fence = (Uuid, u64);

/// The token a write without a claim is checked against: it passes any row (a single daemon).
pub(crate) const UNFENCED: i64 = i64::MAX;

/// The token as the database keeps it.
pub(crate) fn fence_value(fence: Option<u64>) -> i64 {
    fence.map_or(UNFENCED, |f| i64::try_from(f).unwrap_or(UNFENCED))
}

#[derive(Clone, Debug)]
pub(crate) enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// Runs the same code against whichever pool the store has.
macro_rules! on_pool {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            $crate::store::Db::Postgres($pool) => $body,
            $crate::store::Db::Sqlite($pool) => $body,
        }
    };
}
pub(crate) use on_pool;

/// Zone snapshots, the audit log and its dead letters.
#[derive(Clone, Debug)]
pub struct Store {
    db: Db,
    /// SQLite takes one writer at a time; writers that find it busy sleep in its busy handler
    /// (1, 2, 5, 10… ms), which made commits wait tens of milliseconds under load. Writers take
    /// turns here instead, in order. Unused on PostgreSQL.
    writer: Arc<tokio::sync::Mutex<()>>,
}

/// The embedded default: a SQLite file in the data directory.
pub fn default_database_url(data_dir: &Path) -> String {
    format!("sqlite://{}", data_dir.join("thunderline.db").display())
}

impl Store {
    /// Opens the database at `url` (`postgres://…` or `sqlite://…`), creating a SQLite file and
    /// its directory if needed, and runs the migrations.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_with(url, 10).await
    }

    /// Opens a database that exists already: a SQLite file that is not there is an error, not
    /// created (for the commands that read a server's store, e.g. `replay`).
    pub async fn open_existing(url: &str) -> Result<Self, StoreError> {
        Self::open(url, 10, false, None).await
    }

    /// As [`connect`](Self::connect), with at most `max_connections` connections.
    pub async fn connect_with(url: &str, max_connections: u32) -> Result<Self, StoreError> {
        Self::open(url, max_connections, true, None).await
    }

    /// As [`connect`](Self::connect), for a writer whose zones others take over when it falls
    /// silent (a node of a cluster). On PostgreSQL a transaction of its left idle longer than
    /// `stall_limit` (the process paused or stalled between two statements) is ended by the
    /// server: the zone rows it locked would otherwise hold the next owner's claim back for as
    /// long as the stall lasts. The stalled write fails, and once retried its fencing token is
    /// refused.
    pub async fn connect_with_stall_limit(
        url: &str,
        stall_limit: Duration,
    ) -> Result<Self, StoreError> {
        Self::open(url, 10, true, Some(stall_limit)).await
    }

    async fn open(
        url: &str,
        max_connections: u32,
        create: bool,
        stall_limit: Option<Duration>,
    ) -> Result<Self, StoreError> {
        let invalid = |e: sqlx::Error| StoreError::InvalidUrl {
            url: redact_url(url),
            reason: e.to_string(),
        };
        let connect = |e: sqlx::Error| StoreError::Connect {
            url: redact_url(url),
            source: e,
        };
        let db = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let mut options = PgConnectOptions::from_str(url).map_err(invalid)?;
            if let Some(limit) = stall_limit {
                let ms = limit.as_millis().max(1).to_string();
                options = options.options([("idle_in_transaction_session_timeout", ms)]);
            }
            // One direct connection first: a pool would retry a refused connection until its
            // acquire timeout, and a wrong URL deserves an answer now.
            options
                .connect()
                .await
                .map_err(connect)?
                .close()
                .await
                .map_err(connect)?;
            let pool = PgPoolOptions::new()
                .max_connections(max_connections)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options)
                .await
                .map_err(connect)?;
            sqlx::migrate!("migrations/postgres").run(&pool).await?;
            Db::Postgres(pool)
        } else if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(invalid)?
                .create_if_missing(create)
                .journal_mode(SqliteJournalMode::Wal)
                // An acknowledged event is on disk: FULL syncs the WAL at every commit.
                .synchronous(SqliteSynchronous::Full)
                .busy_timeout(Duration::from_secs(10))
                .foreign_keys(true);
            if !create && !options.get_filename().exists() {
                return Err(StoreError::NoDatabase(options.get_filename().to_owned()));
            }
            if let Some(dir) = options.get_filename().parent()
                && create
                && !dir.as_os_str().is_empty()
            {
                std::fs::create_dir_all(dir).map_err(|e| connect(sqlx::Error::Io(e)))?;
            }
            let pool = SqlitePoolOptions::new()
                .max_connections(max_connections.clamp(1, 8))
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options)
                .await
                .map_err(connect)?;
            sqlx::migrate!("migrations/sqlite").run(&pool).await?;
            Db::Sqlite(pool)
        } else {
            return Err(StoreError::UnsupportedUrl(redact_url(url)));
        };
        Ok(Self {
            db,
            writer: Arc::default(),
        })
    }

    pub fn backend(&self) -> Backend {
        match self.db {
            Db::Postgres(_) => Backend::Postgres,
            Db::Sqlite(_) => Backend::Sqlite,
        }
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        on_pool!(&self.db, pool => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    pub async fn close(&self) {
        on_pool!(&self.db, pool => pool.close().await);
    }

    pub(crate) fn db(&self) -> &Db {
        &self.db
    }

    /// This store's turn to write, on SQLite; nothing to wait for on PostgreSQL.
    pub(crate) async fn write_turn(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match self.db {
            Db::Sqlite(_) => Some(self.writer.lock().await),
            Db::Postgres(_) => None,
        }
    }
}
