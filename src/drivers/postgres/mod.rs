//! The `postgres` driver: PostgreSQL instant recovery. A session's published
//! folder (a backed-up data folder) is mounted through FUSE on the target
//! host, PostgreSQL starts on it at once with every write landing in the
//! write cache, and a later migration builds a streaming standby on local
//! storage with `pg_basebackup` and switches over to it.
//!
//! The controller's states map onto the [`Driver`] calls:
//!
//! | state | call | what happens |
//! |---|---|---|
//! | validating | `validate` | `PG_VERSION` of the point = the host's major version; the port is free; the OS user, binaries and socket folder exist; `data_parent` has room for the database |
//! | registering_vm | `register_vm` | FUSE mount at `<run_dir>/<session>/data`, files shown as the OS user's; overrides written through the write cache (`settings`); stale `postmaster.pid` removed |
//! | powering_on | `power_on` | `pg_ctl start -w`, then the first query through tokio-postgres (its time is recorded) |
//! | migrating | `start_live_migration`, `live_migration_status` | `pg_basebackup -R -C -S <slot>` into the destination, the standby started on a second port, lag from `pg_stat_replication` |
//! | (switchover) | `complete_live_migration` | published read-only and its clients disconnected, standby replays all, both stopped, the destination restarted on the session's port as a writable primary, the mount removed |
//! | stopping | `power_off`, `unregister_vm` | every server, `pg_basebackup` and the mount stopped; a destination revive created removed |
//!
//! After `kill -9` of revive the database is left on a dead mount; at the
//! next start [`Driver::resume`] stops that orphaned postmaster, detaches the
//! dead mount, mounts again and starts PostgreSQL, which runs crash
//! recovery: every commit it acknowledged was fsynced, and an fsync through
//! the mount is the write cache's journal sync.
//!
//! - [`process`]: `pg_ctl`, `postgres`, `pg_basebackup` as the OS user; postmaster pids.
//! - [`settings`]: what revive writes into a data folder for each role.
//! - [`sql`]: readiness, lag and switchover statements.
//! - [`state`]: the per-session record under `run_dir`.
//! - `checks`: validation; `published`: the mount and the published
//!   instance; `migrate`: the copy and the standby; `switchover`.

mod checks;
mod migrate;
pub mod process;
mod published;
pub mod settings;
pub mod sql;
pub mod state;
mod switchover;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;

use self::process::Programs;
use self::state::{PgSession, SessionPaths};
use super::{
    DatastoreSpec, Driver, DriverContext, DriverError, DriverResult, HostInfo, MigrationStatus,
    TaskRef, VmRef, VmSpec,
};
use crate::datastore::Datastore;
use crate::fuse::users::{self, User};

/// `[[host]] driver = "postgres"` settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Folder of the host's PostgreSQL programs; their major version must be
    /// the backup's.
    #[serde(default = "default_bin_dir")]
    pub bin_dir: PathBuf,
    /// OS user the servers run as (files on the mount are shown as its).
    #[serde(default = "default_os_user")]
    pub os_user: String,
    /// Database superuser revive connects as (default: the OS user's name).
    #[serde(default)]
    pub db_user: Option<String>,
    /// Where production data folders go: validation checks it has room for
    /// the database.
    #[serde(default = "default_data_parent")]
    pub data_parent: PathBuf,
    /// Per session: the mount point, the driver's record and server logs.
    #[serde(default = "default_run_dir")]
    pub run_dir: PathBuf,
    /// Unix socket folder of the instances revive starts.
    #[serde(default = "default_socket_dir")]
    pub socket_dir: PathBuf,
    /// `listen_addresses` of the instances revive starts.
    #[serde(default = "default_listen")]
    pub listen_addresses: String,
    /// Port of a session that names none (`recover --port`).
    #[serde(default = "default_port")]
    pub port: u16,
    /// Longest wait for a server to start and answer (crash recovery of a
    /// busy database can take a while).
    #[serde(default = "default_start_timeout")]
    pub start_timeout_secs: u64,
}

fn default_bin_dir() -> PathBuf {
    PathBuf::from("/usr/lib/postgresql/15/bin")
}

fn default_os_user() -> String {
    "postgres".into()
}

fn default_data_parent() -> PathBuf {
    PathBuf::from("/var/lib/postgresql")
}

fn default_run_dir() -> PathBuf {
    PathBuf::from("/var/lib/revive/postgres")
}

fn default_socket_dir() -> PathBuf {
    PathBuf::from("/var/run/postgresql")
}

fn default_listen() -> String {
    "localhost".into()
}

fn default_port() -> u16 {
    5432
}

fn default_start_timeout() -> u64 {
    300
}

/// Builds the driver of a PostgreSQL host.
pub fn build(
    host: &str,
    config: &PostgresConfig,
    context: &DriverContext,
) -> DriverResult<Arc<dyn Driver>> {
    Ok(Arc::new(PostgresDriver::new(
        host,
        config.clone(),
        context.datastore.clone(),
    )))
}

/// What the driver holds for one session while revive runs.
#[derive(Default)]
struct Slot {
    /// One driver call at a time per session.
    lock: tokio::sync::Mutex<()>,
    /// The FUSE mount of the published data folder.
    mount: Mutex<Option<crate::fuse::Mount>>,
    /// The running `pg_basebackup`.
    basebackup: Mutex<Option<tokio::process::Child>>,
}

/// The postgres driver of one host.
pub struct PostgresDriver {
    host: String,
    config: PostgresConfig,
    datastore: Arc<Datastore>,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

impl PostgresDriver {
    /// A driver for host `host`, mounting folders of `datastore`.
    pub fn new(host: &str, config: PostgresConfig, datastore: Arc<Datastore>) -> PostgresDriver {
        PostgresDriver {
            host: host.to_string(),
            config,
            datastore,
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// The OS user servers run as.
    fn os_user(&self) -> DriverResult<User> {
        users::user_named(&self.config.os_user).ok_or_else(|| DriverError::Check {
            check: "os user",
            reason: format!(
                "no user '{}' on host '{}' (os_user)",
                self.config.os_user, self.host
            ),
        })
    }

    /// The programs, run as the OS user.
    fn programs(&self) -> DriverResult<Programs> {
        Ok(Programs {
            bin_dir: self.config.bin_dir.clone(),
            user: self.os_user()?,
        })
    }

    fn db_user(&self) -> String {
        self.config
            .db_user
            .clone()
            .unwrap_or_else(|| self.config.os_user.clone())
    }

    fn start_timeout(&self) -> Duration {
        Duration::from_secs(self.config.start_timeout_secs.max(1))
    }

    fn paths(&self, name: &str) -> DriverResult<SessionPaths> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(DriverError::UnsupportedVm {
                driver: "postgres",
                vm: name.to_string(),
                reason: "the session name cannot be a folder name".into(),
            });
        }
        Ok(SessionPaths::new(&self.config.run_dir, name))
    }

    fn slot(&self, name: &str) -> Arc<Slot> {
        let mut slots = match self.slots.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        slots.entry(name.to_string()).or_default().clone()
    }

    fn forget_slot(&self, name: &str) {
        let mut slots = match self.slots.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        slots.remove(name);
    }

    /// The session's record, which must exist.
    fn record(&self, paths: &SessionPaths, name: &str) -> DriverResult<PgSession> {
        paths.load()?.ok_or_else(|| DriverError::NotFound {
            kind: "postgres session",
            name: name.to_string(),
        })
    }
}

#[async_trait]
impl Driver for PostgresDriver {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    async fn validate(&self, vm: &VmSpec) -> DriverResult<HostInfo> {
        checks::validate(self, vm).await?;
        Ok(HostInfo {
            free_memory_mib: None,
        })
    }

    async fn attach_datastore(&self, _datastore: &DatastoreSpec) -> DriverResult<()> {
        // The folder is mounted per session, at registration.
        Ok(())
    }

    async fn detach_datastore(&self, _datastore: &DatastoreSpec) -> DriverResult<()> {
        Ok(())
    }

    async fn register_vm(&self, datastore: &DatastoreSpec, vm: &VmSpec) -> DriverResult<VmRef> {
        published::register(self, datastore, vm).await
    }

    async fn power_on(&self, vm: &VmRef) -> DriverResult<()> {
        published::power_on(self, &vm.0).await
    }

    async fn power_off(&self, vm: &VmRef) -> DriverResult<()> {
        published::power_off(self, &vm.0).await
    }

    async fn unregister_vm(&self, vm: &VmRef) -> DriverResult<()> {
        published::unregister(self, &vm.0).await
    }

    /// After the switchover nothing of the session's folder is needed: its
    /// removal is the same as unregistering (production is not touched).
    async fn migration_finished(&self, vm: &VmRef) -> DriverResult<()> {
        published::unregister(self, &vm.0).await
    }

    async fn start_live_migration(&self, vm: &VmRef, destination: &str) -> DriverResult<TaskRef> {
        migrate::start(self, &vm.0, Path::new(destination)).await
    }

    async fn live_migration_status(
        &self,
        vm: &VmRef,
        _task: &TaskRef,
    ) -> DriverResult<MigrationStatus> {
        migrate::status(self, &vm.0).await
    }

    async fn complete_live_migration(&self, vm: &VmRef, _task: &TaskRef) -> DriverResult<()> {
        switchover::switch_over(self, &vm.0).await
    }

    async fn start_from_copy(&self, _vm: &VmSpec, _folder: &Path) -> DriverResult<Option<VmRef>> {
        Err(DriverError::NotSupported {
            driver: "postgres",
            operation: "copy migration (use revive migrate: a streaming standby)",
        })
    }

    async fn resume(&self, vm: &VmRef) -> DriverResult<()> {
        published::resume(self, &vm.0).await
    }

    async fn shutdown(&self) {
        published::shutdown(self).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_unknown_keys() {
        let config: PostgresConfig = toml::from_str("").unwrap();
        assert_eq!(config.bin_dir, PathBuf::from("/usr/lib/postgresql/15/bin"));
        assert_eq!(config.os_user, "postgres");
        assert_eq!(config.port, 5432);
        assert!(toml::from_str::<PostgresConfig>("bindir = \"/x\"").is_err());
    }
}
