//! The registry: agents, tokens, certificates, tasks, the TLS inventory. One set of portable SQL
//! statements serves SQLite (the embedded default) and PostgreSQL, through sqlx's
//! `Any` driver with `$N` placeholders.

mod agents;
mod audit;
mod certs;
mod inventory;
mod jobs;
mod plugins;
mod policies;
mod tasks;
mod tokens;

use std::str::FromStr;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, ConnectOptions};

pub use agents::{AgentMeta, AgentRow};
pub use audit::{AuditEntry, AuditFilter};
pub use inventory::CertRow;
pub use jobs::{JobRow, PendingSubtask, SubtaskCounts};
pub use plugins::{DesiredPlugin, PackageRow, ReportedPlugin};
pub use tasks::{NewTask, TaskRow};
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
}

impl Store {
    /// Opens (creating if needed) the database at `url` and applies migrations.
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let is_sqlite = url.starts_with("sqlite:");
        let url = if is_sqlite && !url.contains('?') {
            format!("{url}?mode=rwc")
        } else {
            url.to_owned()
        };
        let options = AnyConnectOptions::from_str(&url)?.disable_statement_logging();
        let mut pool_options = AnyPoolOptions::new().max_connections(if is_sqlite { 4 } else { 16 });
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
        Ok(Self { pool })
    }

    /// The underlying pool, for tests.
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }
}

fn corrupt(what: &'static str) -> impl FnOnce(serde_json::Error) -> StoreError {
    move |e| StoreError::Corrupt {
        what,
        message: e.to_string(),
    }
}

#[cfg(test)]
pub(crate) async fn test_store() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("t.db").display());
    (Store::open(&url).await.unwrap(), dir)
}
