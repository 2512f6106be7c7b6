//! The session runner: one task per unfinished session, running the step its
//! state names, recording the outcome, and scheduling retries.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tracing::{error, info, warn};

use super::copy;
use super::{clones, snapshot_steps};
use super::{ControllerError, Inner, SessionHandle};
use super::{Migration, MigrationMethod, Session, SessionState};
use crate::datastore::DatastoreError;
use crate::drivers::{Driver, MigrationStatus, VmFile, VmSpec};
use crate::repo::FileReader;

/// How often a live migration's progress is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Changes a session under its lock and persists it before anyone acts on it.
pub(super) fn update<T>(
    inner: &Inner,
    handle: &SessionHandle,
    change: impl FnOnce(&mut Session) -> Result<T, ControllerError>,
) -> Result<Session, ControllerError> {
    let mut guard = match handle.record.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    };
    let mut next = guard.clone();
    change(&mut next)?;
    next.updated = Utc::now();
    inner.store.save(&next)?;
    *guard = next.clone();
    Ok(next)
}

/// Runs a session until it is done or cancelled.
pub(super) async fn run(inner: Arc<Inner>, handle: Arc<SessionHandle>) {
    loop {
        let session = handle.snapshot();
        let step = session.state;
        match step {
            SessionState::Done | SessionState::Cancelled => return,
            SessionState::Running | SessionState::Failed => {
                handle.wake.notified().await;
                continue;
            }
            SessionState::Waiting => {
                wait_for_retry(&inner, &handle, &session).await;
                continue;
            }
            _ => {}
        }
        let result = run_step(&inner, &handle, &session, step).await;
        if !record_outcome(&inner, &handle, step, result) {
            // The state folder is failing; do not spin.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Sleeps until the next automatic retry (or a wake-up), then resumes the step.
async fn wait_for_retry(inner: &Inner, handle: &SessionHandle, session: &Session) {
    let Some(at) = session.retries.next_at else {
        handle.wake.notified().await;
        return;
    };
    let delay = (at - Utc::now()).to_std().unwrap_or_default();
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = handle.wake.notified() => return,
    }
    let resumed = update(inner, handle, |s| {
        if s.state == SessionState::Waiting && s.retries.next_at == Some(at) {
            s.state = s.resume.unwrap_or(SessionState::Validating);
            s.retries.next_at = None;
        }
        Ok(())
    });
    if let Err(e) = resumed {
        error!(session = %session.id, cause = %e, "could not record retry");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Records a step's outcome, unless a command (stop) changed the state
/// meanwhile. False when the record could not be written.
fn record_outcome(
    inner: &Inner,
    handle: &SessionHandle,
    step: SessionState,
    result: Result<SessionState, ControllerError>,
) -> bool {
    let interval = inner.config.retry_interval;
    let recorded = update(inner, handle, |s| {
        if s.state != step {
            return Ok(());
        }
        match &result {
            Ok(next) => {
                s.state = *next;
                s.resume = None;
                s.error = None;
                s.retries.attempt = 0;
                s.retries.next_at = None;
            }
            Err(ControllerError::Cancelled) => {}
            Err(e) if e.is_transient() => {
                s.state = SessionState::Waiting;
                s.resume = Some(step);
                s.error = Some(format!("{step}: {e}"));
                if s.retries.attempt < s.retries.max {
                    s.retries.attempt += 1;
                    s.retries.next_at = Some(
                        Utc::now()
                            + chrono::Duration::from_std(interval)
                                .unwrap_or(chrono::Duration::seconds(300)),
                    );
                    inner.metrics.retries.fetch_add(1, Ordering::Relaxed);
                } else {
                    s.retries.next_at = None;
                }
            }
            Err(e) => {
                s.state = SessionState::Failed;
                s.resume = Some(step);
                s.error = Some(format!("{step}: {e}"));
            }
        }
        Ok(())
    });
    match (&recorded, &result) {
        (Ok(s), Ok(_)) => info!(session = %s.id, from = %step, to = %s.state, "step done"),
        (Ok(s), Err(e)) => warn!(
            session = %s.id, step = %step, state = %s.state,
            attempt = s.retries.attempt, max = s.retries.max, cause = %e,
            "step failed"
        ),
        (Err(e), _) => error!(step = %step, cause = %e, "could not record session state"),
    }
    recorded.is_ok()
}

fn driver_of(inner: &Inner, session: &Session) -> Result<Arc<dyn Driver>, ControllerError> {
    match inner.drivers.get(&session.host) {
        Some(Ok(d)) => Ok(d.clone()),
        Some(Err(cause)) => Err(ControllerError::Validation {
            check: "hypervisor",
            reason: format!("host '{}': {cause}", session.host),
        }),
        None => Err(ControllerError::UnknownHost {
            name: session.host.clone(),
            known: inner.drivers.keys().cloned().collect::<Vec<_>>().join(", "),
        }),
    }
}

async fn run_step(
    inner: &Inner,
    handle: &SessionHandle,
    session: &Session,
    step: SessionState,
) -> Result<SessionState, ControllerError> {
    let driver = driver_of(inner, session);
    match step {
        SessionState::Validating if snapshot_steps::is_snapshot(session) => {
            snapshot_steps::validate(inner, handle, session, &driver?).await
        }
        SessionState::Validating => validate(inner, handle, session, &driver?).await,
        SessionState::Publishing if snapshot_steps::is_snapshot(session) => {
            snapshot_steps::publish(inner, handle, session).await
        }
        SessionState::Publishing => publish(inner, session).await,
        SessionState::RegisteringDatastore => {
            let driver = driver?;
            let lock = host_lock(inner, &session.host);
            let _guard = lock.lock().await;
            driver.attach_datastore(&session.datastore).await?;
            update(inner, handle, |s| {
                s.datastore_attached = true;
                Ok(())
            })?;
            Ok(SessionState::RegisteringVm)
        }
        SessionState::RegisteringVm => {
            let spec = vm_spec(session)?;
            let vm = driver?.register_vm(&session.datastore, spec).await?;
            update(inner, handle, |s| {
                s.vm_ref = Some(vm.clone());
                Ok(())
            })?;
            Ok(if session.power_on {
                SessionState::PoweringOn
            } else {
                SessionState::Running
            })
        }
        SessionState::PoweringOn => {
            let vm = session.vm_ref.as_ref().ok_or_else(|| {
                ControllerError::BadRequest("no registered VM to power on".into())
            })?;
            driver?.power_on(vm).await?;
            Ok(SessionState::Running)
        }
        SessionState::Migrating => migrate(inner, handle, session, &driver?).await,
        SessionState::SwitchingOver => switch_over(inner, handle, session, &driver?).await,
        SessionState::Finalizing => {
            release(inner, handle, session, driver.ok(), false).await?;
            Ok(SessionState::Done)
        }
        SessionState::Stopping => {
            release(inner, handle, session, driver.ok(), true).await?;
            Ok(SessionState::Cancelled)
        }
        SessionState::Running
        | SessionState::Waiting
        | SessionState::Failed
        | SessionState::Done
        | SessionState::Cancelled => Ok(step),
    }
}

fn migration_of(session: &Session) -> Result<Migration, ControllerError> {
    session
        .migration
        .clone()
        .ok_or_else(|| ControllerError::BadRequest("no migration asked".into()))
}

fn vm_spec(session: &Session) -> Result<&VmSpec, ControllerError> {
    session
        .vm_spec
        .as_ref()
        .ok_or_else(|| ControllerError::BadRequest("session has no validated VM".into()))
}

fn host_lock(inner: &Inner, host: &str) -> Arc<tokio::sync::Mutex<()>> {
    inner
        .host_locks
        .entry(host.to_string())
        .or_default()
        .value()
        .clone()
}

/// Checks everything that can be checked before publishing.
async fn validate(
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
    check_free_space(&session.cache_dir, inner.config.min_free_cache)?;
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
            location: None,
        });
        if f.name.ends_with(".vmx") && f.size <= 1 << 20 {
            let reader = FileReader::new(repo, &point, &f.name)?;
            let text = reader.read_at(0, f.size as usize).await?;
            memory_mib = vmx_memsize(&String::from_utf8_lossy(&text));
        }
    }
    let spec = VmSpec {
        name: session.name.clone(),
        source_vm: session.vm.clone(),
        folder: session.name.clone(),
        files,
        memory_mib,
    };
    match driver.validate(&spec).await {
        Ok(_) => {}
        Err(e) if e.is_transient() => return Err(e.into()),
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
        Ok(())
    })?;
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
fn check_free_space(dir: &Path, needed: u64) -> Result<(), ControllerError> {
    let existing = dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let stat = nix_statvfs(existing).map_err(|source| ControllerError::Destination {
        action: "check free space of",
        path: existing.to_path_buf(),
        source,
    })?;
    if stat < needed {
        return Err(ControllerError::Validation {
            check: "write cache space",
            reason: format!(
                "'{}' has {} MiB free; at least {} MiB are configured ([sessions] min_free_cache)",
                existing.display(),
                stat >> 20,
                needed >> 20
            ),
        });
    }
    Ok(())
}

/// Bytes available to unprivileged users on the file system holding `path`.
fn nix_statvfs(path: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out pointer.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

async fn publish(inner: &Inner, session: &Session) -> Result<SessionState, ControllerError> {
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

async fn migrate(
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
                    })?;
                    t
                }
            };
            loop {
                if handle.cancel.load(Ordering::SeqCst) {
                    return Err(ControllerError::Cancelled);
                }
                match driver.live_migration_status(&vm, &task).await? {
                    MigrationStatus::Running { percent } => {
                        set_percent(inner, handle, percent)?;
                    }
                    MigrationStatus::Ready => {
                        driver.complete_live_migration(&vm, &task).await?;
                    }
                    MigrationStatus::Completed => {
                        set_percent(inner, handle, 100)?;
                        return Ok(SessionState::Finalizing);
                    }
                    MigrationStatus::Failed { reason } => {
                        return Err(ControllerError::Migration(reason));
                    }
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
    }
}

fn set_percent(inner: &Inner, handle: &SessionHandle, percent: u8) -> Result<(), ControllerError> {
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
    .map(|_| ())
}

/// Copy migration's switchover: stop the published VM, copy what was written
/// since the bulk pass, start the VM from the copy.
async fn switch_over(
    inner: &Inner,
    handle: &SessionHandle,
    session: &Session,
    driver: &Arc<dyn Driver>,
) -> Result<SessionState, ControllerError> {
    let migration = migration_of(session)?;
    if let Some(vm) = &session.vm_ref {
        driver.power_off(vm).await?;
    }
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
    })?;
    Ok(SessionState::Finalizing)
}

/// Finalize or stop: the VM (when stopping), the published folder and its
/// cache, and the datastore when no other session uses it.
async fn release(
    inner: &Inner,
    handle: &SessionHandle,
    session: &Session,
    driver: Option<Arc<dyn Driver>>,
    stopping: bool,
) -> Result<(), ControllerError> {
    if stopping {
        if let (Some(vm), Some(driver)) = (&session.vm_ref, &driver) {
            driver.power_off(vm).await?;
            driver.unregister_vm(vm).await?;
            update(inner, handle, |s| {
                s.vm_ref = None;
                Ok(())
            })?;
        }
    }
    match inner
        .datastore
        .unpublish(&session.export, &session.name)
        .await
    {
        Ok(()) | Err(DatastoreError::NotFound) => {}
        Err(e) => return Err(e.into()),
    }
    // A cache folder left by a crash between publish steps.
    match std::fs::remove_dir_all(&session.cache_dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ControllerError::State {
                action: "delete write cache",
                path: session.cache_dir.clone(),
                source,
            })
        }
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
        })?;
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
