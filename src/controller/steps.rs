//! The steps of a session, one function per state that does work:
//! validating, publishing, migrating, switching over, releasing (finalize
//! and stop). The runner (`runner.rs`) calls them and records their outcome.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use super::copy;
use super::runner::update;
use super::{clones, snapshot_steps};
use super::{ControllerError, Inner, SessionHandle};
use super::{Migration, MigrationMethod, Session, SessionState};
use crate::datastore::DatastoreError;
use crate::drivers::{Driver, DriverError, MigrationStatus, VmFile, VmSpec};
use crate::repo::{EntryKind, FileReader, PointKind};

/// How often a live migration's progress is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

pub(super) fn migration_of(session: &Session) -> Result<Migration, ControllerError> {
    session
        .migration
        .clone()
        .ok_or_else(|| ControllerError::BadRequest("no migration asked".into()))
}

pub(super) fn vm_spec(session: &Session) -> Result<&VmSpec, ControllerError> {
    session
        .vm_spec
        .as_ref()
        .ok_or_else(|| ControllerError::BadRequest("session has no validated VM".into()))
}

pub(super) fn host_lock(inner: &Inner, host: &str) -> Arc<tokio::sync::Mutex<()>> {
    inner
        .host_locks
        .entry(host.to_string())
        .or_default()
        .value()
        .clone()
}

/// Checks everything that can be checked before publishing.
pub(super) async fn validate(
    inner: &Inner,
    handle: &SessionHandle,
    session: &Session,
    driver: &Arc<dyn Driver>,
) -> Result<SessionState, ControllerError> {
    let repo = inner.datastore.repo();
    let point = match repo.resolve(&session.point).await {
        Ok(p) => p,
        Err(e) if e.is_transient() => return Err(e.into()),
        Err(e) => {
            return Err(ControllerError::Validation {
                check: "restore point",
                reason: e.to_string(),
            })
        }
    };
    if point.vm != session.vm {
        return Err(ControllerError::Validation {
            check: "restore point",
            reason: format!(
                "point {} is of VM '{}', not '{}'",
                point.id, point.vm, session.vm
            ),
        });
    }
    // Every index page is read and hash-checked: a damaged index would
    // otherwise surface as I/O errors inside the booted guest.
    for file in &point.files {
        for page in &file.pages {
            match repo.page(page).await {
                Ok(_) => {}
                Err(e) if e.is_transient() => return Err(e.into()),
                Err(e) => {
                    return Err(ControllerError::Validation {
                        check: "restore point index",
                        reason: format!("{} of {}: {e}", file.name, point.id),
                    })
                }
            }
        }
    }
    check_free_space(&session.cache_dir, inner.config.min_free_cache).await?;
    if inner
        .datastore
        .name_taken(&session.export, &session.name)
        .await?
    {
        return Err(ControllerError::Validation {
            check: "name",
            reason: format!(
                "'{}' already exists on export {}",
                session.name, session.export
            ),
        });
    }
    let mut files = Vec::new();
    let mut memory_mib = None;
    for f in &point.files {
        files.push(VmFile {
            name: f.name.clone(),
            size: f.size,
            disk: f.kind.is_disk(),
            url: None,
            location: None,
        });
        if f.name.ends_with(".vmx") && f.size <= 1 << 20 {
            let reader = FileReader::new(repo, &point, &f.name)?;
            let text = reader.read_at(0, f.size as usize).await?;
            memory_mib = vmx_memsize(&String::from_utf8_lossy(&text));
        }
    }
    // A tree point (a database's data folder) lists its files by path.
    if point.kind == PointKind::Tree {
        let tree = point.tree();
        files.extend(
            tree.entries()
                .iter()
                .filter(|e| e.kind() == EntryKind::File)
                .map(|e| VmFile {
                    name: e.path.clone(),
                    size: e.size,
                    disk: false,
                    url: None,
                    location: None,
                }),
        );
    }
    let mut spec = VmSpec {
        name: session.name.clone(),
        source_vm: session.vm.clone(),
        folder: session.name.clone(),
        files,
        memory_mib,
        point: point.id.clone(),
        port: session.port,
        lab: session.lab.clone(),
    };
    let block_disk = super::block::validate(inner, session, &mut spec)?;
    match driver.validate(&spec).await {
        Ok(_) => {}
        Err(e) if e.is_transient() => return Err(e.into()),
        Err(DriverError::Check { check, reason }) => {
            return Err(ControllerError::Validation { check, reason })
        }
        Err(e) => {
            return Err(ControllerError::Validation {
                check: "hypervisor",
                reason: e.to_string(),
            })
        }
    }
    let point_id = point.id.clone();
    update(inner, handle, |s| {
        s.point = point_id;
        s.vm_spec = Some(spec);
        super::block::set_disk(s, block_disk);
        Ok(())
    })
    .await?;
    Ok(SessionState::Publishing)
}

/// `memsize = "2048"` of a .vmx file.
fn vmx_memsize(vmx: &str) -> Option<u64> {
    vmx.lines().find_map(|line| {
        let (key, value) = line.split_once('=')?;
        if !key.trim().eq_ignore_ascii_case("memsize") {
            return None;
        }
        value.trim().trim_matches('"').parse().ok()
    })
}

/// Free space where the write cache will be (its nearest existing ancestor).
async fn check_free_space(dir: &Path, needed: u64) -> Result<(), ControllerError> {
    let d = dir.to_path_buf();
    let space = tokio::task::spawn_blocking(move || crate::fsutil::space_of_nearest(&d))
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(|source| ControllerError::Destination {
            action: "check free space of",
            path: dir.to_path_buf(),
            source,
        })?;
    if space.avail_bytes < needed {
        return Err(ControllerError::Validation {
            check: "write cache space",
            reason: format!(
                "'{}' has {} MiB free; at least {} MiB are configured ([sessions] min_free_cache)",
                dir.display(),
                space.avail_bytes >> 20,
                needed >> 20
            ),
        });
    }
    Ok(())
}

pub(super) async fn publish(
    inner: &Inner,
    session: &Session,
) -> Result<SessionState, ControllerError> {
    let ds = &inner.datastore;
    let existing = ds.publications(&session.export).await?;
    if let Some((_, point)) = existing.iter().find(|(n, _)| *n == session.name) {
        // An earlier attempt got this far before a crash.
        if *point == session.point {
            return Ok(SessionState::RegisteringDatastore);
        }
        return Err(ControllerError::NameTaken {
            name: session.name.clone(),
            export: session.export.clone(),
        });
    }
    match ds
        .publish(
            &session.export,
            &session.name,
            &session.point,
            Some(session.cache_dir.clone()),
        )
        .await
    {
        Ok(_) => Ok(SessionState::RegisteringDatastore),
        Err(DatastoreError::Exists) => Err(ControllerError::NameTaken {
            name: session.name.clone(),
            export: session.export.clone(),
        }),
        // publish reports an unreadable repository as not found; look again.
        Err(DatastoreError::NotFound) => match ds.repo().point(&session.point).await {
            Err(e) => Err(e.into()),
            Ok(_) => Err(DatastoreError::NotFound.into()),
        },
        Err(e) => Err(e.into()),
    }
}

pub(super) async fn migrate(
    inner: &Inner,
    handle: &SessionHandle,
    session: &Session,
    driver: &Arc<dyn Driver>,
) -> Result<SessionState, ControllerError> {
    let migration = migration_of(session)?;
    match migration.method {
        MigrationMethod::Copy => {
            copy::bulk_pass(inner, handle, session, &migration).await?;
            Ok(SessionState::SwitchingOver)
        }
        MigrationMethod::Live => {
            let vm = session
                .vm_ref
                .clone()
                .ok_or_else(|| ControllerError::BadRequest("no registered VM to migrate".into()))?;
            let task = match migration.task {
                Some(t) => t,
                None => {
                    let t = driver
                        .start_live_migration(&vm, &migration.destination)
                        .await?;
                    update(inner, handle, |s| {
                        if let Some(m) = s.migration.as_mut() {
                            m.task = Some(t.clone());
                        }
                        Ok(())
                    })
                    .await?;
                    t
                }
            };
            loop {
                if handle.cancel.load(Ordering::SeqCst) {
                    return Err(ControllerError::Cancelled);
                }
                match driver.live_migration_status(&vm, &task).await? {
                    MigrationStatus::Running { percent } => {
                        set_percent(inner, handle, percent).await?;
                    }
                    MigrationStatus::Ready => {
                        driver.complete_live_migration(&vm, &task).await?;
                    }
                    MigrationStatus::Syncing { lag_bytes } => {
                        super::switchover::syncing(inner, handle, driver, &vm, &task, lag_bytes)
                            .await?;
                    }
                    MigrationStatus::Completed => {
                        set_percent(inner, handle, 100).await?;
                        return Ok(SessionState::Finalizing);
                    }
                    MigrationStatus::Failed { reason } => {
                        return Err(ControllerError::Migration(reason));
                    }
                }
                // A command (switchover, stop) wakes the loop at once.
                tokio::select! {
                    _ = tokio::time::sleep(POLL_INTERVAL) => {}
                    _ = handle.wake.notified() => {}
                }
            }
        }
    }
}

async fn set_percent(
    inner: &Inner,
    handle: &SessionHandle,
    percent: u8,
) -> Result<(), ControllerError> {
    let current = handle.snapshot().migration.map(|m| m.percent).unwrap_or(0);
    if current == percent {
        return Ok(());
    }
    update(inner, handle, |s| {
        if let Some(m) = s.migration.as_mut() {
            m.percent = percent;
        }
        Ok(())
    })
    .await
    .map(|_| ())
}

/// Copy migration's switchover: stop the published VM, copy what was written
/// since the bulk pass, start the VM from the copy.
pub(super) async fn switch_over(
    inner: &Inner,
    handle: &SessionHandle,
    session: &Session,
    driver: &Arc<dyn Driver>,
) -> Result<SessionState, ControllerError> {
    let migration = migration_of(session)?;
    if let Some(vm) = &session.vm_ref {
        driver.power_off(vm).await?;
    }
    // No block client may write once the last ranges are copied.
    super::block::unexport(inner, handle, session).await?;
    let folder = copy::final_pass(inner, handle, session, &migration).await?;
    if let Some(vm) = &session.vm_ref {
        driver.unregister_vm(vm).await?;
    }
    let spec = vm_spec(session)?;
    let started = driver.start_from_copy(spec, &folder).await?;
    update(inner, handle, |s| {
        s.vm_ref = None;
        if let Some(m) = s.migration.as_mut() {
            m.production_vm = started.clone();
            m.percent = 100;
        }
        Ok(())
    })
    .await?;
    Ok(SessionState::Finalizing)
}

/// Finalize or stop: the VM (when stopping), the published folder and its
/// cache, and the datastore when no other session uses it.
pub(super) async fn release(
    inner: &Inner,
    handle: &SessionHandle,
    session: &Session,
    driver: Option<Arc<dyn Driver>>,
    stopping: bool,
) -> Result<(), ControllerError> {
    if let (Some(vm), Some(driver)) = (&session.vm_ref, &driver) {
        if stopping {
            driver.power_off(vm).await?;
            driver.unregister_vm(vm).await?;
            update(inner, handle, |s| {
                s.vm_ref = None;
                Ok(())
            })
            .await?;
        } else if session.migration.is_some() {
            driver.migration_finished(vm).await?;
        }
    }
    super::block::unexport(inner, handle, session).await?;
    match inner
        .datastore
        .unpublish(&session.export, &session.name)
        .await
    {
        Ok(()) | Err(DatastoreError::NotFound) => {}
        Err(e) => return Err(e.into()),
    }
    // A cache folder left by a crash between publish steps.
    let dir = session.cache_dir.clone();
    let removed = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    })
    .await
    .map_err(std::io::Error::other)
    .and_then(|r| r);
    if let Err(source) = removed {
        return Err(ControllerError::State {
            action: "delete write cache",
            path: session.cache_dir.clone(),
            source,
        });
    }
    if session.datastore_attached {
        let lock = host_lock(inner, &session.host);
        let _guard = lock.lock().await;
        let others = inner.sessions.iter().any(|h| {
            let s = h.value().snapshot();
            s.id != session.id
                && s.host == session.host
                && s.datastore.name == session.datastore.name
                && s.datastore_attached
                && !s.state.is_terminal()
        });
        if !others {
            if let Some(driver) = &driver {
                driver.detach_datastore(&session.datastore).await?;
                info!(host = %session.host, datastore = %session.datastore.name, "datastore removed from host");
            }
        }
        update(inner, handle, |s| {
            s.datastore_attached = false;
            Ok(())
        })
        .await?;
    }
    if snapshot_steps::is_snapshot(session) {
        clones::release(inner, session).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memsize_is_read_from_vmx() {
        let vmx = ".encoding = \"UTF-8\"\nmemSize = \"2048\"\nnumvcpus = \"2\"\n";
        assert_eq!(vmx_memsize(vmx), Some(2048));
        assert_eq!(vmx_memsize("numvcpus = \"2\"\n"), None);
        assert_eq!(vmx_memsize("memsize = \"lots\"\n"), None);
    }
}
