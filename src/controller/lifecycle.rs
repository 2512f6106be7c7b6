//! What the controller does around a restart of revive: on start, drivers
//! bring back what died with the previous process (a database's FUSE mount
//! and server); on a clean stop, drivers stop what cannot outlive it.
//! Also: a recovery named only by its restore point.

use tracing::{error, info, warn};

use super::runner::{driver_of, update};
use super::{Controller, ControllerError, Inner, SessionHandle, SessionState};

/// The name a restore point was backed up under (`recover --point` without `--vm`).
pub(super) async fn name_of_point(inner: &Inner, point: &str) -> Result<String, ControllerError> {
    match inner.datastore.repo().resolve(point).await {
        Ok(p) => Ok(p.vm),
        Err(e) if e.is_transient() => Err(e.into()),
        Err(e) => Err(ControllerError::Validation {
            check: "restore point",
            reason: e.to_string(),
        }),
    }
}

/// Before a session's runner starts: if the session has a registered VM
/// and is past powering on, its driver re-establishes what a previous
/// revive process held. A failure makes the session power on again (the
/// postgres driver's power on repairs the same way), through the usual
/// retries.
pub(super) async fn resume_driver(inner: &Inner, handle: &SessionHandle) {
    let session = handle.snapshot();
    let active = matches!(
        session.state,
        SessionState::Running
            | SessionState::Migrating
            | SessionState::SwitchingOver
            | SessionState::Waiting
            | SessionState::Failed
    );
    let Some(vm) = session
        .vm_ref
        .clone()
        .filter(|_| active && session.power_on)
    else {
        return;
    };
    let Ok(driver) = driver_of(inner, &session) else {
        return;
    };
    match driver.resume(&vm).await {
        Ok(()) => {}
        Err(e) => {
            warn!(session = %session.id, cause = %e, "could not resume after restart");
            if session.state == SessionState::Running {
                let retried = update(inner, handle, |s| {
                    if s.state == SessionState::Running {
                        s.state = SessionState::PoweringOn;
                        s.error = Some(format!("resume after restart: {e}"));
                    }
                    Ok(())
                })
                .await;
                if let Err(e) = retried {
                    error!(session = %session.id, cause = %e, "could not record state");
                }
            }
        }
    }
}

impl Controller {
    /// Before revive stops cleanly: every driver stops what cannot outlive
    /// the process (databases on FUSE mounts); they resume at the next start.
    pub async fn shutdown(&self) {
        for (host, driver) in &self.inner.drivers {
            if let Ok(driver) = driver {
                info!(host = %host, "stopping the host's sessions for shutdown");
                driver.shutdown().await;
            }
        }
    }
}
