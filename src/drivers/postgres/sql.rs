//! SQL with the instances revive manages, through `tokio-postgres` over the
//! local Unix socket (as the database user; `pg_ident.conf`'s revive map
//! lets root in). Never by running psql and reading its output.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};
use tracing::debug;

use super::super::{DriverError, DriverResult};

/// Longest wait for one connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How one instance is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Folder of its Unix socket.
    pub socket_dir: PathBuf,
    /// Port (names the socket file).
    pub port: u16,
    /// Database user.
    pub user: String,
}

impl Endpoint {
    fn fault(&self, what: &str, e: impl std::fmt::Display) -> DriverError {
        DriverError::Fault {
            operation: format!("{what} (PostgreSQL on port {})", self.port),
            message: e.to_string(),
        }
    }

    fn sql_fault(&self, what: &str, e: tokio_postgres::Error) -> DriverError {
        self.fault(what, describe(&e))
    }

    /// A connection to database `postgres`; its driver task ends with it.
    pub async fn connect(&self) -> DriverResult<Client> {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(&self.socket_dir)
            .port(self.port)
            .user(&self.user)
            .dbname("postgres")
            .application_name("revive")
            .connect_timeout(CONNECT_TIMEOUT);
        let (client, connection) = config
            .connect(NoTls)
            .await
            .map_err(|e| self.sql_fault("connect", e))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(cause = %e, "SQL connection ended");
            }
        });
        Ok(client)
    }

    /// Connects and runs `SELECT 1` until it answers or `limit` passes;
    /// the time it took.
    pub async fn wait_ready(&self, limit: Duration) -> DriverResult<Duration> {
        let started = Instant::now();
        loop {
            let last = match self.connect().await {
                Ok(client) => match client.query_one("SELECT 1", &[]).await {
                    Ok(_) => return Ok(started.elapsed()),
                    Err(e) => describe(&e),
                },
                Err(e) => e.to_string(),
            };
            if started.elapsed() > limit {
                return Err(DriverError::Timeout {
                    host: "localhost".into(),
                    operation: format!("first query on port {} ({last})", self.port),
                    seconds: limit.as_secs(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs statements that return nothing.
    pub async fn execute(&self, client: &Client, sql: &str) -> DriverResult<()> {
        client
            .batch_execute(sql)
            .await
            .map_err(|e| self.sql_fault(sql, e))
    }

    /// One `bigint` (or NULL) from a one-row query.
    pub async fn int(&self, client: &Client, sql: &str) -> DriverResult<Option<i64>> {
        let row = client
            .query_opt(sql, &[])
            .await
            .map_err(|e| self.sql_fault(sql, e))?;
        match row {
            Some(r) => r
                .try_get::<_, Option<i64>>(0)
                .map_err(|e| self.fault(sql, e)),
            None => Ok(None),
        }
    }

    /// One `boolean` from a one-row query.
    pub async fn bool(&self, client: &Client, sql: &str) -> DriverResult<bool> {
        let row = client
            .query_one(sql, &[])
            .await
            .map_err(|e| self.sql_fault(sql, e))?;
        row.try_get::<_, bool>(0).map_err(|e| self.fault(sql, e))
    }
}

/// An error with the server's own message ("db error" alone says nothing).
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.severity(), db.message()),
        None => e.to_string(),
    }
}

/// A WAL position as a byte count, for comparisons in SQL-free Rust.
pub const LSN_AS_INT: &str = "pg_wal_lsn_diff({}, '0/0')::bigint";

/// `expr` (an `pg_lsn` expression) as a `bigint` select.
pub fn lsn_select(expr: &str) -> String {
    format!("SELECT {}", LSN_AS_INT.replace("{}", expr))
}

#[cfg(test)]
mod tests {
    #[test]
    fn lsn_selects_read_as_bytes() {
        assert_eq!(
            super::lsn_select("pg_current_wal_lsn()"),
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::bigint"
        );
    }
}
