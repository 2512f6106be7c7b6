//! Switchover on the operator's word: a database's standby streams after
//! `revive migrate` until `revive switchover ID` (or `migrate --switchover`)
//! asks the driver to complete the migration.

use std::sync::Arc;

use tracing::info;

use super::runner::update;
use super::{Controller, ControllerError, Inner, SessionHandle, SessionState, SessionView};
use crate::drivers::{Driver, TaskRef, VmRef};

/// A live migration's copy follows its source (`MigrationStatus::Syncing`):
/// records the lag, and switches over when it was asked for.
pub(super) async fn syncing(
    inner: &Inner,
    handle: &SessionHandle,
    driver: &Arc<dyn Driver>,
    vm: &VmRef,
    task: &TaskRef,
    lag_bytes: u64,
) -> Result<(), ControllerError> {
    let current = handle.snapshot().migration;
    let asked = current.as_ref().is_some_and(|m| m.switchover);
    let changed = current
        .as_ref()
        .is_some_and(|m| !m.in_sync || m.lag_bytes != Some(lag_bytes) || m.percent != 100);
    if changed {
        update(inner, handle, |s| {
            if let Some(m) = s.migration.as_mut() {
                m.in_sync = true;
                m.lag_bytes = Some(lag_bytes);
                m.percent = 100;
            }
            Ok(())
        })
        .await?;
    }
    if asked {
        info!(session = %handle.snapshot().id, lag_bytes, "switching over");
        driver.complete_live_migration(vm, task).await?;
    }
    Ok(())
}

impl Controller {
    /// Switches a migrating session over to its copy now (a database: the
    /// standby becomes production).
    pub async fn switchover(&self, id: &str) -> Result<SessionView, ControllerError> {
        let session = self
            .command(id, "switchover", |s| {
                let migrating = s.state == SessionState::Migrating;
                match s.migration.as_mut() {
                    Some(m) if migrating => {
                        m.switchover = true;
                        Ok(())
                    }
                    _ => Err(ControllerError::WrongState {
                        id: String::new(),
                        state: String::new(),
                        action: "switchover",
                    }),
                }
            })
            .await?;
        info!(session = %id, "switchover asked");
        Ok(self.view(session).await)
    }
}
