//! The registry: agents, tokens, certificates, tasks, the TLS inventory and its
//! schedules, file-delivery pushes. One set of portable SQL
//! statements serves SQLite (the embedded default) and PostgreSQL, through sqlx's
//! `Any` driver with `$N` placeholders.

mod activity;
mod agents;
mod audit;
mod certs;
mod cluster;
mod files;
mod inventory;
mod jobs;
mod plugins;
mod policies;
mod schedules;
mod tasks;
mod tokens;

use std::str::FromStr;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, ConnectOptions, Connection};

pub use activity::{CertificateRow, SESSIONS_PER_AGENT, Sample, SessionRow};
pub use agents::{AgentMeta, AgentQuery, AgentRow};
pub use audit::{AuditEntry, AuditFilter};
pub use cluster::{InstanceRow, TunnelJobRow};
pub use files::{Claimed, FileStatusRow, NewPushAgent, PushAgentRow, PushRow, WantedFile};
pub use inventory::CertRow;
pub use jobs::{JobRow, PendingSubtask, SubtaskCounts};
pub use plugins::{PackageRow, ReportedPlugin};
pub use schedules::{HISTORY_PER_TARGET, ScanEvent, ScheduleRow};
pub use tasks::{NewTask, StreamMark, TaskRow};
pub use tokens::{NewToken, Role, TokenRefusal, TokenRow};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A storage failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed.
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    /// Migrations could not be applied.
    #[error("database migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored value could not be decoded.
    #[error("stored {what} is corrupt: {message}")]
    Corrupt {
        /// Which value.
        what: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Handle to the registry database; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    pool: AnyPool,
    /// Time of the operations an idle or busy server does most, by operation.
    query_seconds: Family<Operation, Histogram, fn() -> Histogram>,
}

/// An operation's label in `keel_store_query_seconds`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Operation {
    op: &'static str,
}

impl Store {
    /// Opens (creating if needed) the database at `url` and applies migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        Self::open_with(url, None).await
    }

    /// [`Store::open`] with at most `max_connections` (default 4 on SQLite, 16
    /// on PostgreSQL).
    pub async fn open_with(url: &str, max_connections: Option<u32>) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let is_sqlite = url.starts_with("sqlite:");
        let url = if is_sqlite && !url.contains('?') {
            format!("{url}?mode=rwc")
        } else {
            url.to_owned()
        };
        let options = AnyConnectOptions::from_str(&url)?.disable_statement_logging();
        let mut pool_options =
            AnyPoolOptions::new().max_connections(max_connections.unwrap_or(if is_sqlite { 4 } else { 16 }));
        if is_sqlite {
            pool_options = pool_options.after_connect(|conn, _| {
                Box::pin(async move {
                    // WAL lets readers and the one writer proceed together; NORMAL is
                    // durable across process crashes, which is what WAL promises.
                    sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA synchronous = NORMAL").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA busy_timeout = 10000").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA foreign_keys = ON").execute(&mut *conn).await?;
                    Ok(())
                })
            });
        }
        let pool = pool_options.connect_with(options).await?;
        MIGRATOR.run(&pool).await?;
        Ok(Self {
            pool,
            query_seconds: Family::new_with_constructor(crate::metrics::latency),
        })
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.timed("ping", sqlx::query("SELECT 1").execute(&self.pool)).await?;
        Ok(())
    }

    /// Adds `keel_store_query_seconds` to the server's metrics.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "store_query_seconds",
            "Time of registry operations, by operation",
            self.query_seconds.clone(),
        );
    }

    /// Runs `work`, timed as operation `op`.
    async fn timed<T>(&self, op: &'static str, work: impl std::future::Future<Output = T>) -> T {
        let started = std::time::Instant::now();
        let out = work.await;
        self.query_seconds
            .get_or_create(&Operation { op })
            .observe(started.elapsed().as_secs_f64());
        out
    }

    /// The underlying pool, for tests.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }
}

/// A new, empty schema in the PostgreSQL database at `base`, as a URL whose
/// connections use it: for tests and benchmarks that each need a registry of
/// their own on one database.
pub async fn fresh_schema(base: &str) -> Result<String, StoreError> {
    sqlx::any::install_default_drivers();
    let name = format!("k{}", uuid::Uuid::new_v4().simple());
    let mut admin = sqlx::AnyConnection::connect(base).await?;
    // The name is generated here: `k` and 32 hex digits.
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {name}")))
        .execute(&mut admin)
        .await?;
    let sep = if base.contains('?') { '&' } else { '?' };
    Ok(format!("{base}{sep}options=-c%20search_path%3D{name}"))
}

/// The most rows one statement of a batched write carries.
const BATCH_ROWS: usize = 256;

/// `rows` cut into batches of a power of two rows each, at most `BATCH_ROWS`:
/// so a batched write is one of nine statements, each prepared once per
/// connection and then reused, however many rows each flush has.
fn batches<T>(mut rows: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        if rows.is_empty() {
            return None;
        }
        let n = rows.len().min(BATCH_ROWS);
        let size = 1 << n.ilog2();
        let (batch, rest) = rows.split_at(size);
        rows = rest;
        Some(batch)
    })
}

/// `($1, …, $width), ($width+1, …)`: the placeholders of `rows` rows.
fn tuples(rows: usize, width: usize) -> String {
    (0..rows)
        .map(|i| {
            let row: Vec<String> = (1..=width).map(|c| format!("${}", width * i + c)).collect();
            format!("({})", row.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn corrupt(what: &'static str) -> impl FnOnce(serde_json::Error) -> StoreError {
    move |e| StoreError::Corrupt {
        what,
        message: e.to_string(),
    }
}

/// The PostgreSQL database tests and benchmarks make their schemas in:
/// `KEEL_TEST_POSTGRES`, or the local service's `test` database.
pub fn test_postgres() -> String {
    std::env::var("KEEL_TEST_POSTGRES")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Whether tests that can run on either engine run on PostgreSQL:
/// `KEEL_TEST_STORE=postgres`. Otherwise they use SQLite.
pub fn tests_on_postgres() -> bool {
    std::env::var("KEEL_TEST_STORE").is_ok_and(|v| v == "postgres")
}

/// A registry for one test: a fresh schema in [`test_postgres`] when
/// [`tests_on_postgres`], else SQLite in a temporary directory.
#[cfg(test)]
pub(crate) async fn test_store() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = if tests_on_postgres() {
        fresh_schema(&test_postgres()).await.unwrap()
    } else {
        format!("sqlite://{}", dir.path().join("t.db").display())
    };
    (Store::open(&url).await.unwrap(), dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_powers_of_two_and_cover_every_row_in_order() {
        let sizes = |n: usize| {
            let rows: Vec<usize> = (0..n).collect();
            let cut: Vec<&[usize]> = batches(&rows).collect();
            assert_eq!(cut.concat(), rows);
            cut.iter().map(|b| b.len()).collect::<Vec<_>>()
        };
        assert_eq!(sizes(0), Vec::<usize>::new());
        assert_eq!(sizes(7), vec![4, 2, 1]);
        assert_eq!(sizes(1600), vec![256, 256, 256, 256, 256, 256, 64]);
        // Whatever the count, only nine statement shapes are ever used.
        let mut shapes: Vec<usize> = (0..2000).flat_map(sizes).collect();
        shapes.sort_unstable();
        shapes.dedup();
        assert_eq!(shapes, vec![1, 2, 4, 8, 16, 32, 64, 128, 256]);
    }
}
