//! The session runner: one task per unfinished session, running the step its
//! state names (`steps.rs`), recording the outcome, and scheduling retries.
//! Every change of a session's record goes through [`update`], which writes
//! it durably off the async threads before anyone acts on it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tracing::{error, info, warn};

use super::snapshot_steps;
use super::steps::{host_lock, migrate, publish, release, switch_over, validate, vm_spec};
use super::{ControllerError, Inner, SessionHandle};
use super::{Session, SessionState};
use crate::datastore::DatastoreError;
use crate::drivers::Driver;

/// Changes a session's record and persists it before anyone acts on it.
///
/// Changes of one session are serialized by its `persist` lock, held across
/// the write (temp file, fsync, rename, fsync of the folder), which runs off
/// the async threads: a slow state disk delays this session's next step,
/// never the threads that serve NFS. Readers see the new record only once
/// it is durable.
pub(super) async fn update<T>(
    inner: &Inner,
    handle: &SessionHandle,
    change: impl FnOnce(&mut Session) -> Result<T, ControllerError>,
) -> Result<Session, ControllerError> {
    let _serial = handle.persist.lock().await;
    let mut next = handle.snapshot();
    change(&mut next)?;
    next.updated = Utc::now();
    let (store, record) = (inner.store.clone(), next.clone());
    tokio::task::spawn_blocking(move || store.save(&record))
        .await
        .map_err(|e| ControllerError::State {
            action: "write session",
            path: inner.config.state_dir.clone(),
            source: std::io::Error::other(e),
        })??;
    *handle
        .record
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = next.clone();
    Ok(next)
}

/// Runs a session until it is done or cancelled.
pub(super) async fn run(inner: Arc<Inner>, handle: Arc<SessionHandle>) {
    super::lifecycle::resume_driver(&inner, &handle).await;
    loop {
        let session = handle.snapshot();
        let step = session.state;
        match step {
            SessionState::Done | SessionState::Cancelled => return,
            SessionState::Running => {
                // A session resumed at start runs only with its write cache
                // there; without it, it waits (and retries) naming why.
                if let Err(e) = check_cache(&inner, &session).await {
                    if !record_outcome(&inner, &handle, step, Err(e)).await {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    continue;
                }
                handle.wake.notified().await;
                continue;
            }
            SessionState::Failed => {
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
        if !record_outcome(&inner, &handle, step, result).await {
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
    })
    .await;
    if let Err(e) = resumed {
        error!(session = %session.id, cause = %e, "could not record retry");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Records a step's outcome, unless a command (stop) changed the state
/// meanwhile. False when the record could not be written.
async fn record_outcome(
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
    })
    .await;
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

/// Fails while the session's published write cache folder is missing.
async fn check_cache(inner: &Inner, session: &Session) -> Result<(), ControllerError> {
    match inner
        .datastore
        .cache_missing(&session.export, &session.name)
        .await
    {
        Ok(Some(reason)) => Err(ControllerError::CacheMissing(reason)),
        // Not published (any more): nothing to check.
        Ok(None) | Err(DatastoreError::NotFound) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

pub(super) fn driver_of(
    inner: &Inner,
    session: &Session,
) -> Result<Arc<dyn Driver>, ControllerError> {
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
        SessionState::Publishing => publish(inner, session)
            .await
            .map(|next| super::block::after_publish(session, next)),
        SessionState::Exporting => super::block::export(inner, handle, session).await,
        SessionState::RegisteringDatastore => {
            let driver = driver?;
            let lock = host_lock(inner, &session.host);
            let _guard = lock.lock().await;
            driver.attach_datastore(&session.datastore).await?;
            update(inner, handle, |s| {
                s.datastore_attached = true;
                Ok(())
            })
            .await?;
            Ok(SessionState::RegisteringVm)
        }
        SessionState::RegisteringVm => {
            let spec = vm_spec(session)?;
            let vm = driver?.register_vm(&session.datastore, spec).await?;
            update(inner, handle, |s| {
                s.vm_ref = Some(vm.clone());
                Ok(())
            })
            .await?;
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
            if session.ready_ms.is_none() {
                let ms = (Utc::now() - session.created).num_milliseconds().max(0) as u64;
                update(inner, handle, |s| {
                    s.ready_ms = Some(ms);
                    Ok(())
                })
                .await?;
            }
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
