//! The switchover, as PostgreSQL instant recovery products do it: the
//! published instance refuses writes and its clients are disconnected, the
//! standby replays everything, both stop, the destination starts on the
//! session's port as a writable primary, revive's access is removed from
//! it, and the mount goes. Write downtime runs from the first step to
//! production's first answer; both times are recorded.
//!
//! Each step ([`SwitchStep`]) is recorded once done and skipped when the
//! switchover runs again after a crash of revive.

use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::migrate::{drop_slot, ensure_standby, migration_of, now_ms, standby_role};
use super::process::{self, blocking, StopMode};
use super::published::{self, lock};
use super::settings;
use super::sql::{lsn_select, Endpoint};
use super::state::{MigrationState, PgSession, Phase, SessionPaths, SwitchStep};
use super::PostgresDriver;
use crate::drivers::{DriverError, DriverResult};

/// Longest wait for the standby to replay what the published instance wrote.
const REPLAY_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a standby or production server may take to stop cleanly.
const STOP_GRACE: Duration = Duration::from_secs(120);

/// The switchover, step by step (each recorded, each safe to repeat).
pub(super) async fn switch_over(driver: &PostgresDriver, name: &str) -> DriverResult<()> {
    let paths = driver.paths(name)?;
    let slot = driver.slot(name);
    let _guard = slot.lock.lock().await;
    let mut state = driver.record(&paths, name)?;
    let mut m = migration_of(&state)?;
    if m.phase == Phase::Done {
        return Ok(());
    }
    if m.phase == Phase::Copying {
        return Err(DriverError::InUse {
            what: format!("postgres session '{name}'"),
            reason: "the standby is still being copied; switch over once it streams".into(),
        });
    }
    if m.phase == Phase::Streaming {
        m.phase = Phase::SwitchingOver;
        m.switch = SwitchStep::Started;
        save(&paths, &mut state, &m)?;
    }
    let published_ep = driver.endpoint(state.port);
    let standby_ep = driver.endpoint(m.standby_port);
    let programs = driver.programs()?;
    if m.switch < SwitchStep::ReadOnly {
        published::ensure_running(driver, &slot, &paths, &mut state).await?;
        ensure_standby(driver, &paths, &m).await?;
        let client = published_ep.connect().await?;
        // Two statements: ALTER SYSTEM refuses to run inside the implicit
        // transaction of a multi-statement query.
        published_ep
            .execute(
                &client,
                "ALTER SYSTEM SET default_transaction_read_only = on",
            )
            .await?;
        published_ep
            .execute(&client, "SELECT pg_reload_conf()")
            .await?;
        // Sessions that began before the reload could still write: end them.
        published_ep
            .execute(
                &client,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
            )
            .await?;
        m.switch = SwitchStep::ReadOnly;
        m.read_only_at_ms = Some(now_ms());
        save(&paths, &mut state, &m)?;
        info!(session = %name, "published instance read-only; waiting for the standby");
    }
    if m.switch < SwitchStep::StandbyStopped {
        published::ensure_running(driver, &slot, &paths, &mut state).await?;
        ensure_standby(driver, &paths, &m).await?;
        let client = published_ep.connect().await?;
        let target = published_ep
            .int(&client, &lsn_select("pg_current_wal_flush_lsn()"))
            .await?
            .unwrap_or(0);
        wait_replayed(&standby_ep, target).await?;
        programs
            .stop(&m.destination, StopMode::Fast, STOP_GRACE)
            .await?;
        m.switch = SwitchStep::StandbyStopped;
        save(&paths, &mut state, &m)?;
    }
    if m.switch < SwitchStep::PublishedStopped {
        if lock(&slot.mount)
            .as_ref()
            .is_some_and(crate::fuse::Mount::is_serving)
        {
            if let Err(e) = drop_slot(driver, &state, &m.slot).await {
                warn!(session = %name, cause = %e, "drop the replication slot");
            }
            // Its data is thrown away: no shutdown checkpoint through the mount.
            programs
                .stop(&paths.data(), StopMode::Immediate, STOP_GRACE)
                .await?;
        } else {
            published::stop_published(driver, &slot, &paths, &state).await?;
        }
        m.switch = SwitchStep::PublishedStopped;
        save(&paths, &mut state, &m)?;
    }
    if m.switch < SwitchStep::Reconfigured {
        let user = driver.os_user()?;
        let dest = m.destination.clone();
        blocking(move || {
            settings::make_primary(&dest, &user).map_err(|source| DriverError::Io {
                action: "make a primary of",
                path: dest.clone(),
                source,
            })
        })
        .await?;
        let mut role = standby_role(driver, &m);
        role.port = state.port;
        role.archive_off = false;
        driver.apply_role(role).await?;
        m.switch = SwitchStep::Reconfigured;
        save(&paths, &mut state, &m)?;
    }
    if m.switch < SwitchStep::ProductionStarted {
        let running = match process::postmaster_pid(&m.destination).await {
            Some(pid) => process::is_our_postmaster(pid, &driver.config.bin_dir, &m.destination),
            None => false,
        };
        if !running {
            // Production's log stays with production: the session's
            // folder goes when the session ends.
            let log = production_log(&m.destination).await?;
            programs
                .start(&m.destination, &log, driver.start_timeout())
                .await?;
        }
        let production = driver.endpoint(state.port);
        production.wait_ready(driver.start_timeout()).await?;
        let client = production.connect().await?;
        if production
            .bool(&client, "SELECT pg_is_in_recovery()")
            .await?
        {
            return Err(DriverError::Fault {
                operation: format!("start production on '{}'", m.destination.display()),
                message: "the server is still in recovery".into(),
            });
        }
        m.writable_at_ms = Some(now_ms());
        let user = driver.os_user()?;
        let dest = m.destination.clone();
        blocking(move || {
            settings::close_access(&dest, &user).map_err(|source| DriverError::Io {
                action: "remove revive's access from",
                path: dest.clone(),
                source,
            })
        })
        .await?;
        production
            .execute(&client, "SELECT pg_reload_conf()")
            .await?;
        m.switch = SwitchStep::ProductionStarted;
        save(&paths, &mut state, &m)?;
        info!(
            session = %name, port = state.port,
            downtime_ms = m.writable_at_ms.unwrap_or(0).saturating_sub(m.read_only_at_ms.unwrap_or(0)),
            "production runs from '{}'", m.destination.display()
        );
    }
    published::unmount(&slot, &paths).await?;
    m.phase = Phase::Done;
    state.started = false;
    save(&paths, &mut state, &m)
}

fn save(paths: &SessionPaths, state: &mut PgSession, m: &MigrationState) -> DriverResult<()> {
    state.migration = Some(m.clone());
    paths.save(state)
}

/// Waits until the standby has replayed WAL up to `target`.
async fn wait_replayed(standby: &Endpoint, target: i64) -> DriverResult<()> {
    let started = Instant::now();
    let client = standby.connect().await?;
    loop {
        let replayed = standby
            .int(&client, &lsn_select("pg_last_wal_replay_lsn()"))
            .await?
            .unwrap_or(0);
        if replayed >= target {
            return Ok(());
        }
        if started.elapsed() > REPLAY_TIMEOUT {
            return Err(DriverError::Timeout {
                host: "localhost".into(),
                operation: format!(
                    "standby replay to {target} (at {replayed}, port {})",
                    standby.port
                ),
                seconds: REPLAY_TIMEOUT.as_secs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `<data>/log/revive-start.log` (PostgreSQL's own `log_directory` is `log`
/// in the data folder), its folder made and owned like the data folder.
async fn production_log(data: &std::path::Path) -> DriverResult<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    let (data, dir) = (data.to_path_buf(), data.join("log"));
    blocking(move || {
        let io = |source| DriverError::Io {
            action: "create the log folder",
            path: dir.clone(),
            source,
        };
        let owner = std::fs::metadata(&data).map_err(io)?;
        std::fs::create_dir_all(&dir).map_err(io)?;
        std::os::unix::fs::chown(&dir, Some(owner.uid()), Some(owner.gid())).map_err(io)?;
        Ok(dir.join("revive-start.log"))
    })
    .await
}
