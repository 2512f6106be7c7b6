//! Migration to local storage and switchover, as PostgreSQL instant
//! recovery products do it: `pg_basebackup -R -C -S <slot>` from the
//! published instance into the destination, a standby there on a second
//! port streaming until the operator switches over, then: published
//! read-only and its clients disconnected, the standby replays everything,
//! both stop, the destination starts on the session's port as a writable
//! primary, and the mount goes.
//!
//! Each step is recorded before it is acted on (`state.rs`), and each is
//! safe to run again: a restarted revive finds a copy it must start over or
//! a standby to keep following. The switchover is in `switchover.rs`.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::time::SystemTime;

use tracing::{info, warn};

use super::checks;
use super::process::{self, blocking};
use super::published::{self, lock};
use super::settings::Role;
use super::state::{MigrationState, PgSession, Phase, SessionPaths, SwitchStep};
use super::{PostgresDriver, Slot};
use crate::drivers::{DriverError, DriverResult, MigrationStatus, TaskRef};

/// The replication slot of a session: letters, digits and `_` only.
fn slot_name(session: &str) -> String {
    let clean: String = session
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let mut name = format!("revive_{clean}");
    name.truncate(63);
    name
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

pub(super) fn migration_of(state: &PgSession) -> DriverResult<MigrationState> {
    state
        .migration
        .clone()
        .ok_or_else(|| DriverError::NotFound {
            kind: "migration of postgres session",
            name: state.name.clone(),
        })
}

/// Starts the copy into `destination` (an absent or empty folder).
pub(super) async fn start(
    driver: &PostgresDriver,
    name: &str,
    destination: &Path,
) -> DriverResult<TaskRef> {
    let paths = driver.paths(name)?;
    let slot = driver.slot(name);
    let _guard = slot.lock.lock().await;
    let mut state = driver.record(&paths, name)?;
    if let Some(m) = &state.migration {
        // Asked again (a retry, a restart): the same migration goes on.
        if m.destination == destination {
            return Ok(TaskRef(m.slot.clone()));
        }
        return Err(DriverError::InUse {
            what: format!("postgres session '{name}'"),
            reason: format!("it migrates to '{}' already", m.destination.display()),
        });
    }
    published::ensure_running(driver, &slot, &paths, &mut state).await?;
    let endpoint = driver.endpoint(state.port);
    let client = endpoint.connect().await?;
    let size = endpoint
        .int(
            &client,
            "SELECT sum(pg_database_size(oid))::bigint FROM pg_database",
        )
        .await?
        .unwrap_or(0)
        .max(0) as u64;
    drop(client);
    let created = prepare_destination(driver, destination, size).await?;
    let standby_port = checks::free_port_after(
        state.port,
        &driver.config.listen_addresses,
        &driver.config.socket_dir,
    )
    .ok_or_else(|| DriverError::Check {
        check: "port",
        reason: format!("no free port after {} for the standby", state.port),
    })?;
    state.migration = Some(MigrationState {
        destination: destination.to_path_buf(),
        created_destination: created,
        slot: slot_name(name),
        standby_port,
        phase: Phase::Copying,
        switch: SwitchStep::Started,
        basebackup_pid: None,
        read_only_at_ms: None,
        writable_at_ms: None,
    });
    paths.save(&state)?;
    spawn_copy(driver, &slot, &paths, &mut state).await?;
    info!(session = %name, destination = %destination.display(), standby_port, "migration started");
    Ok(TaskRef(slot_name(name)))
}

/// Checks the destination (absolute, absent or empty, room for `size`
/// bytes) and makes it the OS user's with mode 0700. True when it was created.
async fn prepare_destination(
    driver: &PostgresDriver,
    destination: &Path,
    size: u64,
) -> DriverResult<bool> {
    let user = driver.os_user()?;
    let dest = destination.to_path_buf();
    let host = driver.host.clone();
    blocking(move || {
        let refuse = |reason: String| DriverError::Check {
            check: "destination",
            reason,
        };
        if !dest.is_absolute() {
            return Err(refuse(format!(
                "'{}' is not an absolute path",
                dest.display()
            )));
        }
        let parent = dest.parent().unwrap_or(Path::new("/"));
        if !parent.is_dir() {
            return Err(refuse(format!(
                "the parent of '{}' does not exist on host '{host}'",
                dest.display()
            )));
        }
        let created = match std::fs::read_dir(&dest) {
            Ok(mut entries) => {
                if entries.next().is_some() {
                    return Err(refuse(format!("'{}' is not empty", dest.display())));
                }
                false
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => return Err(refuse(format!("'{}': {e}", dest.display()))),
        };
        let free = checks::free_bytes(parent).map_err(|source| DriverError::Io {
            action: "check free space of",
            path: parent.to_path_buf(),
            source,
        })?;
        if free < size {
            return Err(DriverError::Check {
                check: "destination space",
                reason: format!(
                    "'{}' has {} MiB free; the database needs {} MiB",
                    parent.display(),
                    free >> 20,
                    size.div_ceil(1 << 20)
                ),
            });
        }
        let io = |action, source| DriverError::Io {
            action,
            path: dest.clone(),
            source,
        };
        if created {
            std::fs::create_dir(&dest).map_err(|e| io("create", e))?;
        }
        std::os::unix::fs::chown(&dest, Some(user.uid), Some(user.gid))
            .map_err(|e| io("give to the OS user", e))?;
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| io("set mode 0700 on", e))?;
        Ok(created)
    })
    .await
}

/// Runs `pg_basebackup` into the destination (emptied first: a copy that
/// died half way starts over) and records its pid.
async fn spawn_copy(
    driver: &PostgresDriver,
    slot: &Slot,
    paths: &SessionPaths,
    state: &mut PgSession,
) -> DriverResult<()> {
    let m = migration_of(state)?;
    drop_slot(driver, state, &m.slot).await?;
    let dest = m.destination.clone();
    let log_path = paths.basebackup_log();
    let log = blocking(move || {
        empty_folder(&dest)?;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|source| DriverError::Io {
                action: "open",
                path: log_path.clone(),
                source,
            })
    })
    .await?;
    let log_err = log.try_clone().map_err(|source| DriverError::Io {
        action: "open",
        path: paths.basebackup_log(),
        source,
    })?;
    let programs = driver.programs()?;
    let mut cmd = programs.command("pg_basebackup");
    cmd.arg("-h")
        .arg(&driver.config.socket_dir)
        .arg("-p")
        .arg(state.port.to_string())
        .arg("-U")
        .arg(driver.db_user())
        .arg("-D")
        .arg(&m.destination)
        .args(["-Fp", "-X", "stream", "-c", "fast", "-R", "-C", "-S"])
        .arg(&m.slot)
        .args(["--progress", "--no-password"])
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err));
    let child = cmd.spawn().map_err(|source| DriverError::Io {
        action: "start",
        path: driver.config.bin_dir.join("pg_basebackup"),
        source,
    })?;
    if let Some(mig) = state.migration.as_mut() {
        mig.basebackup_pid = child.id();
        mig.phase = Phase::Copying;
    }
    paths.save(state)?;
    *lock(&slot.basebackup) = Some(child);
    Ok(())
}

/// Removes everything inside `dir` (not `dir` itself).
fn empty_folder(dir: &Path) -> DriverResult<()> {
    let io = |source| DriverError::Io {
        action: "empty",
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let path = entry.path();
        if entry.file_type().map_err(io)?.is_dir() {
            std::fs::remove_dir_all(&path).map_err(io)?;
        } else {
            std::fs::remove_file(&path).map_err(io)?;
        }
    }
    Ok(())
}

/// Drops the session's replication slot on the published instance, if it is there.
pub(super) async fn drop_slot(
    driver: &PostgresDriver,
    state: &PgSession,
    slot: &str,
) -> DriverResult<()> {
    let endpoint = driver.endpoint(state.port);
    let client = endpoint.connect().await?;
    client
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE slot_name = $1 AND NOT active",
            &[&slot],
        )
        .await
        .map_err(|e| DriverError::Fault {
            operation: format!("drop replication slot '{slot}'"),
            message: super::sql::describe(&e),
        })?;
    Ok(())
}

/// Stops a running `pg_basebackup` (ours, or one a killed revive left).
pub(super) async fn stop_copy(slot: &Slot, state: &mut PgSession, paths: &SessionPaths) {
    let child = lock(&slot.basebackup).take();
    if let Some(mut child) = child {
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
    let Some(m) = state.migration.as_mut() else {
        return;
    };
    if let Some(pid) = m.basebackup_pid.take() {
        if is_basebackup(pid) {
            // SAFETY: kill(2) on a pid checked to be a pg_basebackup.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if let Err(e) = paths.save(state) {
            warn!(cause = %e, "record stopped pg_basebackup");
        }
    }
}

/// True when `pid` runs pg_basebackup.
fn is_basebackup(pid: u32) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .map(|exe| exe.to_string_lossy().contains("pg_basebackup"))
        .unwrap_or(false)
}

/// Progress: copy percent, then the standby's lag; `Completed` once production runs.
pub(super) async fn status(driver: &PostgresDriver, name: &str) -> DriverResult<MigrationStatus> {
    let paths = driver.paths(name)?;
    let slot = driver.slot(name);
    let _guard = slot.lock.lock().await;
    let mut state = driver.record(&paths, name)?;
    let m = migration_of(&state)?;
    match m.phase {
        Phase::Done => Ok(MigrationStatus::Completed),
        // A switchover under way: the controller asks to complete it.
        Phase::SwitchingOver => Ok(MigrationStatus::Syncing { lag_bytes: 0 }),
        Phase::Copying => copying(driver, &slot, &paths, &mut state).await,
        Phase::Streaming => {
            published::ensure_running(driver, &slot, &paths, &mut state).await?;
            ensure_standby(driver, &paths, &m).await?;
            streaming(driver, &state, &m).await
        }
    }
}

/// What became of the copy process.
enum Copy {
    /// Still copying.
    Running,
    /// Ended with this status.
    Exited(std::process::ExitStatus),
    /// Waiting for it failed.
    Lost(std::io::Error),
    /// This process did not start it (revive restarted during the copy).
    NotOurs,
}

/// While `pg_basebackup` runs: its percent; when it is done, the standby starts.
async fn copying(
    driver: &PostgresDriver,
    slot: &Slot,
    paths: &SessionPaths,
    state: &mut PgSession,
) -> DriverResult<MigrationStatus> {
    published::ensure_running(driver, slot, paths, state).await?;
    let copy = {
        let mut guard = lock(&slot.basebackup);
        match guard.as_mut().map(|child| child.try_wait()) {
            Some(Ok(None)) => Copy::Running,
            Some(Ok(Some(status))) => {
                *guard = None;
                Copy::Exited(status)
            }
            Some(Err(e)) => {
                *guard = None;
                Copy::Lost(e)
            }
            None => Copy::NotOurs,
        }
    };
    match copy {
        Copy::Running => Ok(MigrationStatus::Running {
            percent: copy_percent(driver, state).await,
        }),
        Copy::NotOurs => {
            // revive restarted under it: start over.
            stop_copy(slot, state, paths).await;
            warn!(session = %state.name, "restarting the copy a previous revive began");
            spawn_copy(driver, slot, paths, state).await?;
            Ok(MigrationStatus::Running { percent: 0 })
        }
        Copy::Lost(e) => Err(DriverError::Io {
            action: "wait for pg_basebackup into",
            path: migration_of(state)?.destination,
            source: e,
        }),
        Copy::Exited(status) if !status.success() => {
            let log = paths.basebackup_log();
            let text =
                blocking(move || Ok(std::fs::read_to_string(log).unwrap_or_default())).await?;
            Ok(MigrationStatus::Failed {
                reason: format!("pg_basebackup {status}: {}", process::tail(&text)),
            })
        }
        Copy::Exited(_) => {
            let m = migration_of(state)?;
            info!(session = %state.name, "copy done; starting the standby");
            ensure_standby(driver, paths, &m).await?;
            if let Some(mig) = state.migration.as_mut() {
                mig.phase = Phase::Streaming;
                mig.basebackup_pid = None;
            }
            paths.save(state)?;
            Ok(MigrationStatus::Running { percent: 99 })
        }
    }
}

/// Percent of the copy from `pg_stat_progress_basebackup` (0 until known).
async fn copy_percent(driver: &PostgresDriver, state: &PgSession) -> u8 {
    let endpoint = driver.endpoint(state.port);
    let Ok(client) = endpoint.connect().await else {
        return 0;
    };
    let row = client
        .query_opt(
            "SELECT backup_streamed, backup_total FROM pg_stat_progress_basebackup LIMIT 1",
            &[],
        )
        .await;
    match row {
        Ok(Some(r)) => {
            let streamed: Option<i64> = r.get(0);
            let total: Option<i64> = r.get(1);
            match (streamed, total) {
                (Some(s), Some(t)) if t > 0 => ((s.max(0) * 100 / t).min(98)) as u8,
                _ => 0,
            }
        }
        _ => 0,
    }
}

/// The standby's role.
pub(super) fn standby_role(driver: &PostgresDriver, m: &MigrationState) -> Role {
    Role {
        data: m.destination.clone(),
        port: m.standby_port,
        socket_dir: driver.config.socket_dir.clone(),
        listen_addresses: driver.config.listen_addresses.clone(),
        archive_off: true,
        syncfs_at_start: false,
    }
}

/// The standby runs on the destination (configured and started if not).
pub(super) async fn ensure_standby(
    driver: &PostgresDriver,
    paths: &SessionPaths,
    m: &MigrationState,
) -> DriverResult<()> {
    if let Some(pid) = process::postmaster_pid(&m.destination).await {
        if process::is_our_postmaster(pid, &driver.config.bin_dir, &m.destination) {
            return Ok(());
        }
    }
    driver.apply_role(standby_role(driver, m)).await?;
    driver
        .programs()?
        .start(&m.destination, &paths.standby_log(), driver.start_timeout())
        .await
}

/// `Syncing` with the lag once the standby streams; `Running` before.
async fn streaming(
    driver: &PostgresDriver,
    state: &PgSession,
    m: &MigrationState,
) -> DriverResult<MigrationStatus> {
    let endpoint = driver.endpoint(state.port);
    let client = endpoint.connect().await?;
    let row = client
        .query_opt(
            "SELECT r.state, pg_wal_lsn_diff(pg_current_wal_flush_lsn(), r.replay_lsn)::bigint \
             FROM pg_replication_slots s JOIN pg_stat_replication r ON r.pid = s.active_pid \
             WHERE s.slot_name = $1",
            &[&m.slot],
        )
        .await
        .map_err(|e| DriverError::Fault {
            operation: format!("replication lag of slot '{}'", m.slot),
            message: super::sql::describe(&e),
        })?;
    Ok(match row {
        Some(r) => {
            let stream_state: String = r.get(0);
            let lag: Option<i64> = r.get(1);
            match (stream_state.as_str(), lag) {
                ("streaming", Some(lag)) => MigrationStatus::Syncing {
                    lag_bytes: lag.max(0) as u64,
                },
                _ => MigrationStatus::Running { percent: 99 },
            }
        }
        None => MigrationStatus::Running { percent: 99 },
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn slot_names_are_valid_identifiers() {
        assert_eq!(super::slot_name("pg-prod-ir"), "revive_pg_prod_ir");
        assert_eq!(super::slot_name("A.b"), "revive_a_b");
        assert!(super::slot_name(&"x".repeat(100)).len() <= 63);
    }
}
