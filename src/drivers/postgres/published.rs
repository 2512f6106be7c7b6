//! The published instance: the session's folder mounted through FUSE and
//! PostgreSQL running on it. Every call brings it to the state the record
//! asks for, whatever a crash left: a dead mount is detached (after its
//! orphaned postmaster is stopped) and mounted again, a server that is not
//! running is started (crash recovery), one that runs is left alone.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::process::{self, blocking, StopMode};
use super::settings::{self, Access, Role};
use super::sql::Endpoint;
use super::state::{PgSession, SessionPaths};
use super::{PostgresDriver, Slot};
use crate::drivers::{DatastoreSpec, DriverError, DriverResult, VmRef, VmSpec};
use crate::fuse::{self, Mount, MountOptions};

/// How long a clean stop of the published instance may take before it is
/// stopped immediately (its data stays consistent either way: the write
/// cache holds every fsynced write).
const STOP_GRACE: Duration = Duration::from_secs(60);

impl PostgresDriver {
    /// The endpoint revive's SQL uses for an instance on `port`.
    pub(super) fn endpoint(&self, port: u16) -> Endpoint {
        Endpoint {
            socket_dir: self.config.socket_dir.clone(),
            port,
            user: self.db_user(),
        }
    }

    /// The role of the published instance.
    pub(super) fn published_role(&self, paths: &SessionPaths, state: &PgSession) -> Role {
        Role {
            data: paths.data(),
            port: state.port,
            socket_dir: self.config.socket_dir.clone(),
            listen_addresses: self.config.listen_addresses.clone(),
            archive_off: true,
            syncfs_at_start: true,
        }
    }

    /// Writes `role`'s settings into its data folder (off the async threads).
    pub(super) async fn apply_role(&self, role: Role) -> DriverResult<()> {
        let user = self.os_user()?;
        let db_user = self.db_user();
        let data = role.data.clone();
        blocking(move || {
            let access = Access {
                os_user: &user,
                db_user: &db_user,
            };
            settings::apply(&role, &access).map_err(|source| DriverError::Io {
                action: "write PostgreSQL settings into",
                path: data,
                source,
            })
        })
        .await
    }
}

/// registering_vm: mount, write the overrides, clear a stale pid file.
pub(super) async fn register(
    driver: &PostgresDriver,
    datastore: &DatastoreSpec,
    vm: &VmSpec,
) -> DriverResult<VmRef> {
    let paths = driver.paths(&vm.name)?;
    let slot = driver.slot(&vm.name);
    let _guard = slot.lock.lock().await;
    let fresh = PgSession {
        name: vm.name.clone(),
        export: datastore.remote_path.clone(),
        point: vm.point.clone(),
        port: vm.port.unwrap_or(driver.config.port),
        started: false,
        postmaster_pid: None,
        first_query_ms: None,
        migration: None,
    };
    let state = match paths.load()? {
        // An earlier attempt of this session (a crash, a retry).
        Some(s) if !s.switched() && s.point == fresh.point && s.export == fresh.export => s,
        _ => fresh,
    };
    let dir = paths.dir.clone();
    let data = paths.data();
    blocking(move || {
        std::fs::create_dir_all(&data).map_err(|source| DriverError::Io {
            action: "create mount point",
            path: data.clone(),
            source,
        })?;
        // The OS user must traverse to its data folder.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).map_err(|source| {
            DriverError::Io {
                action: "open up",
                path: dir.clone(),
                source,
            }
        })
    })
    .await?;
    paths.save(&state)?;
    ensure_mounted(driver, &slot, &paths, &state).await?;
    if !postmaster_running(driver, &paths, &state).await {
        driver
            .apply_role(driver.published_role(&paths, &state))
            .await?;
        let data = paths.data();
        if blocking(move || {
            settings::remove_stale_pid(&data).map_err(|source| DriverError::Io {
                action: "remove stale postmaster.pid in",
                path: data.clone(),
                source,
            })
        })
        .await?
        {
            info!(session = %vm.name, "removed the backed-up cluster's postmaster.pid");
        }
    }
    Ok(VmRef(vm.name.clone()))
}

/// powering_on: the published instance runs and answers.
pub(super) async fn power_on(driver: &PostgresDriver, name: &str) -> DriverResult<()> {
    let paths = driver.paths(name)?;
    let slot = driver.slot(name);
    let _guard = slot.lock.lock().await;
    let mut state = driver.record(&paths, name)?;
    if !state.started {
        state.started = true;
        paths.save(&state)?;
    }
    ensure_running(driver, &slot, &paths, &mut state).await
}

/// After a restart of revive: the published instance as the record asks.
pub(super) async fn resume(driver: &PostgresDriver, name: &str) -> DriverResult<()> {
    let paths = driver.paths(name)?;
    let slot = driver.slot(name);
    let _guard = slot.lock.lock().await;
    let Some(mut state) = paths.load()? else {
        return Ok(());
    };
    if state.past_read_only() {
        // The switchover took the published instance down for good; only
        // a dead mount may be left to detach (done when it finishes).
        return Ok(());
    }
    if state.started {
        ensure_running(driver, &slot, &paths, &mut state).await?;
    } else if paths.data().exists() {
        ensure_mounted(driver, &slot, &paths, &state).await?;
    }
    Ok(())
}

/// Mounts the session's folder unless this process already serves it.
/// A mount left by a killed revive answers ENOTCONN: its orphaned
/// postmaster is stopped first, then it is detached.
pub(super) async fn ensure_mounted(
    driver: &PostgresDriver,
    slot: &Slot,
    paths: &SessionPaths,
    state: &PgSession,
) -> DriverResult<()> {
    if lock(&slot.mount).as_ref().is_some_and(Mount::is_serving) {
        return Ok(());
    }
    let data = paths.data();
    if fuse::is_mount_point(&data) {
        warn!(session = %state.name, path = %data.display(), "a previous mount is left; cleaning it");
        stop_orphan(driver, paths, state).await;
        let target = data.clone();
        blocking(move || {
            fuse::lazy_unmount(&target).map_err(|source| DriverError::Io {
                action: "detach the dead mount",
                path: target.clone(),
                source,
            })
        })
        .await?;
    }
    let (export, folder) = driver
        .datastore
        .publication_folder(&state.export, &state.name)
        .await
        .map_err(|e| DriverError::NotFound {
            kind: "published folder",
            name: format!("{}/{} ({e})", state.export, state.name),
        })?;
    let user = driver.os_user()?;
    let options = MountOptions {
        owner: Some((user.uid, user.gid)),
        allow_other: true,
        fs_name: format!("revive:{}", state.name),
        ..MountOptions::default()
    };
    let mount = Mount::start(driver.datastore.clone(), export, folder, &data, options)
        .await
        .map_err(|e| DriverError::Fault {
            operation: format!("mount '{}'", data.display()),
            message: e.to_string(),
        })?;
    // PostgreSQL refuses a data folder others can enter; the restore point's
    // folder mode is 0700 when the backup kept it, else it is set here
    // (through the write cache).
    let root = data.clone();
    blocking(move || {
        let mode = std::fs::metadata(&root)
            .map(|m| m.permissions().mode() & 0o777)
            .map_err(|source| DriverError::Io {
                action: "stat",
                path: root.clone(),
                source,
            })?;
        if mode & 0o027 != 0 {
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700)).map_err(
                |source| DriverError::Io {
                    action: "set mode 0700 on",
                    path: root.clone(),
                    source,
                },
            )?;
        }
        Ok(())
    })
    .await?;
    *lock(&slot.mount) = Some(mount);
    Ok(())
}

/// True when the recorded postmaster runs on this session's data folder.
async fn postmaster_running(
    driver: &PostgresDriver,
    paths: &SessionPaths,
    state: &PgSession,
) -> bool {
    state
        .postmaster_pid
        .is_some_and(|pid| process::is_our_postmaster(pid, &driver.config.bin_dir, &paths.data()))
}

/// Stops the postmaster a killed revive left on a dead mount.
async fn stop_orphan(driver: &PostgresDriver, paths: &SessionPaths, state: &PgSession) {
    if let Some(pid) = state.postmaster_pid {
        if process::is_our_postmaster(pid, &driver.config.bin_dir, &paths.data()) {
            process::kill_postmaster(pid, Duration::from_secs(10)).await;
        }
    }
}

/// Mounted, started and answering; records the postmaster and the time to
/// the first query of a start.
pub(super) async fn ensure_running(
    driver: &PostgresDriver,
    slot: &Slot,
    paths: &SessionPaths,
    state: &mut PgSession,
) -> DriverResult<()> {
    if state.switched() {
        return Ok(());
    }
    ensure_mounted(driver, slot, paths, state).await?;
    let endpoint = driver.endpoint(state.port);
    if postmaster_running(driver, paths, state).await {
        endpoint.wait_ready(driver.start_timeout()).await?;
        return Ok(());
    }
    let data = paths.data();
    // A server that runs on this folder but is not the one recorded (the
    // record was lost before it was written): adopt it.
    if let Some(pid) = process::postmaster_pid(&data).await {
        if process::is_our_postmaster(pid, &driver.config.bin_dir, &data) {
            endpoint.wait_ready(driver.start_timeout()).await?;
            state.postmaster_pid = Some(pid);
            return paths.save(state);
        }
    }
    let stale = data.clone();
    blocking(move || {
        settings::remove_stale_pid(&stale).map_err(|source| DriverError::Io {
            action: "remove stale postmaster.pid in",
            path: stale.clone(),
            source,
        })
    })
    .await?;
    let (socket_dir, port) = (driver.config.socket_dir.clone(), state.port);
    blocking(move || {
        process::remove_stale_socket_lock(&socket_dir, port).map_err(|source| DriverError::Io {
            action: "remove stale socket lock in",
            path: socket_dir.clone(),
            source,
        })
    })
    .await?;
    let started = Instant::now();
    // What PostgreSQL's start-up syncfs (recovery_init_sync_method) cannot
    // do through FUSE: every write of an earlier run made durable before
    // crash recovery writes anything new.
    driver
        .datastore
        .sync_publication(&state.export, &state.name)
        .await
        .map_err(|e| DriverError::Fault {
            operation: format!("sync the write cache of '{}'", state.name),
            message: e.to_string(),
        })?;
    driver
        .programs()?
        .start(&data, &paths.published_log(), driver.start_timeout())
        .await?;
    let pid = process::postmaster_pid(&data).await;
    endpoint
        .wait_ready(driver.start_timeout())
        .await
        .map_err(|e| DriverError::Fault {
            operation: format!("first query on port {}", state.port),
            message: e.to_string(),
        })?;
    let first_query = started.elapsed();
    info!(
        session = %state.name, port = state.port, ms = first_query.as_millis() as u64,
        "published PostgreSQL answers"
    );
    state.postmaster_pid = pid;
    state.first_query_ms = Some(first_query.as_millis() as u64);
    paths.save(state)
}

/// Stops the published instance (clean if it can), the standby and a
/// running `pg_basebackup`; production after a switchover is left alone.
pub(super) async fn power_off(driver: &PostgresDriver, name: &str) -> DriverResult<()> {
    let paths = driver.paths(name)?;
    let slot = driver.slot(name);
    let _guard = slot.lock.lock().await;
    let Some(mut state) = paths.load()? else {
        return Ok(());
    };
    if state.switched() {
        return Ok(());
    }
    let programs = driver.programs()?;
    super::migrate::stop_copy(&slot, &mut state, &paths).await;
    if let Some(m) = &state.migration {
        programs
            .stop(&m.destination, StopMode::Fast, STOP_GRACE)
            .await?;
    }
    stop_published(driver, &slot, &paths, &state).await?;
    state.started = false;
    paths.save(&state)
}

/// Stops the published instance: `pg_ctl stop` when the mount answers,
/// else the orphan by its pid.
pub(super) async fn stop_published(
    driver: &PostgresDriver,
    slot: &Slot,
    paths: &SessionPaths,
    state: &PgSession,
) -> DriverResult<()> {
    let serving = lock(&slot.mount).as_ref().is_some_and(Mount::is_serving);
    if !serving {
        stop_orphan(driver, paths, state).await;
        return Ok(());
    }
    let programs = driver.programs()?;
    let data = paths.data();
    if let Err(e) = programs.stop(&data, StopMode::Fast, STOP_GRACE).await {
        warn!(session = %state.name, cause = %e, "clean stop failed; stopping immediately");
        if programs
            .stop(&data, StopMode::Immediate, STOP_GRACE)
            .await
            .is_err()
        {
            stop_orphan(driver, paths, state).await;
        }
    }
    Ok(())
}

/// Removes the mount and what the session left under `run_dir`; a
/// destination revive created for a migration that did not finish goes too.
pub(super) async fn unregister(driver: &PostgresDriver, name: &str) -> DriverResult<()> {
    let paths = driver.paths(name)?;
    let slot = driver.slot(name);
    {
        let _guard = slot.lock.lock().await;
        unmount(&slot, &paths).await?;
        if let Some(state) = paths.load()? {
            if let Some(m) = state.migration.as_ref().filter(|_| !state.switched()) {
                if m.created_destination {
                    remove_dir(&m.destination).await?;
                }
            }
        }
        remove_dir(&paths.dir).await?;
    }
    driver.forget_slot(name);
    Ok(())
}

/// Unmounts the session's folder (lazily if still busy) and cleans a dead mount.
pub(super) async fn unmount(slot: &Slot, paths: &SessionPaths) -> DriverResult<()> {
    let mount = lock(&slot.mount).take();
    if let Some(mount) = mount {
        mount.unmount().await.map_err(|e| DriverError::Fault {
            operation: format!("unmount '{}'", paths.data().display()),
            message: e.to_string(),
        })?;
    }
    let data = paths.data();
    blocking(move || {
        if fuse::is_mount_point(&data) {
            fuse::lazy_unmount(&data).map_err(|source| DriverError::Io {
                action: "detach",
                path: data.clone(),
                source,
            })?;
        }
        Ok(())
    })
    .await
}

async fn remove_dir(dir: &Path) -> DriverResult<()> {
    let dir = dir.to_path_buf();
    blocking(move || match std::fs::remove_dir_all(&dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DriverError::Io {
            action: "remove",
            path: dir.clone(),
            source,
        }),
    })
    .await
}

/// Before revive stops: every published instance stopped cleanly and its
/// mount removed; the record keeps `started`, so the next start resumes it.
pub(super) async fn shutdown(driver: &PostgresDriver) {
    let slots: Vec<(String, std::sync::Arc<Slot>)> = {
        let slots = lock(&driver.slots);
        slots.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    };
    for (name, slot) in slots {
        let _guard = slot.lock.lock().await;
        let Ok(paths) = driver.paths(&name) else {
            continue;
        };
        let Ok(Some(state)) = paths.load() else {
            continue;
        };
        if let Err(e) = stop_published(driver, &slot, &paths, &state).await {
            warn!(session = %name, cause = %e, "stop the published PostgreSQL at shutdown");
        }
        if let Err(e) = unmount(&slot, &paths).await {
            warn!(session = %name, cause = %e, "unmount at shutdown");
        }
    }
}

/// A std mutex guard, whatever a panicking holder left.
pub(super) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    match m.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}
