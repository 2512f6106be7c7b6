//! Operator commands on a running session: migrate, retry, discard the
//! write cache, stop. Each changes the session's record under its lock and
//! wakes its runner; the work itself is the runner's.

use super::*;

impl Controller {
    /// Changes a session's record under its lock, persists it, wakes its runner.
    pub(super) async fn command(
        &self,
        id: &str,
        action: &'static str,
        change: impl FnOnce(&mut Session) -> Result<(), ControllerError>,
    ) -> Result<Session, ControllerError> {
        let handle = self.handle(id)?;
        let updated = runner::update(&self.inner, &handle, |s| {
            change(s).map_err(|e| match e {
                ControllerError::WrongState { .. } => ControllerError::WrongState {
                    id: s.id.clone(),
                    state: s.state.to_string(),
                    action,
                },
                other => other,
            })
        })
        .await?;
        handle.wake.notify_one();
        Ok(updated)
    }

    /// Moves a running session to production storage.
    pub async fn migrate(
        &self,
        id: &str,
        req: MigrateRequest,
    ) -> Result<SessionView, ControllerError> {
        if req.to.trim().is_empty() {
            return Err(ControllerError::BadRequest(
                "--to names the destination (a folder, or a datastore for live migration)".into(),
            ));
        }
        let database = self.handle(id)?.snapshot().driver == "postgres";
        let method = req.method.unwrap_or(if database {
            MigrationMethod::Live
        } else {
            MigrationMethod::Copy
        });
        let needs_folder = method == MigrationMethod::Copy || database;
        if needs_folder && !std::path::Path::new(&req.to).is_absolute() {
            return Err(ControllerError::BadRequest(format!(
                "destination '{}' must be an absolute folder path",
                req.to
            )));
        }
        if database && method == MigrationMethod::Copy {
            return Err(ControllerError::BadRequest(
                "a database moves by streaming replication: drop --method copy".into(),
            ));
        }
        let switchover = req.switchover.unwrap_or(!database);
        let session = self.command(id, "migrate", |s| {
            if s.state != SessionState::Running {
                return Err(ControllerError::WrongState {
                    id: String::new(),
                    state: String::new(),
                    action: "migrate",
                });
            }
            if method == MigrationMethod::Live && s.driver == "none" {
                return Err(ControllerError::BadRequest(
                    "the none driver cannot migrate live; use --method copy".into(),
                ));
            }
            // A copy migration stops the VM before it asks the driver to
            // start the copy; vSphere cannot (ESXi does not see the copy), so
            // refuse before the VM is stopped.
            if method == MigrationMethod::Copy && snapshot_steps::is_snapshot(s) {
                return Err(ControllerError::BadRequest(
                    "a session recovered from a storage snapshot runs from its clone, which copy migration cannot read yet; use --method live".into(),
                ));
            }
            if method == MigrationMethod::Copy && s.driver == "vsphere" {
                return Err(ControllerError::BadRequest(
                    "the vsphere driver cannot start a VM from a copy; use --method live --to <datastore> (Storage vMotion)".into(),
                ));
            }
            s.migration = Some(Migration {
                method,
                switchover,
                lag_bytes: None,
                in_sync: false,
                destination: req.to.clone(),
                task: None,
                percent: 0,
                files: Vec::new(),
                bytes_copied: 0,
                production_vm: None,
            });
            s.state = SessionState::Migrating;
            Ok(())
        })
        .await?;
        info!(session = %id, ?method, to = %req.to, switchover, "migration asked");
        Ok(self.view(session).await)
    }

    /// Runs a waiting or failed session's step again now.
    pub async fn retry(&self, id: &str) -> Result<SessionView, ControllerError> {
        let session = self
            .command(id, "retry", |s| {
                if !matches!(s.state, SessionState::Waiting | SessionState::Failed) {
                    return Err(ControllerError::WrongState {
                        id: String::new(),
                        state: String::new(),
                        action: "retry",
                    });
                }
                s.state = s.resume.unwrap_or(SessionState::Validating);
                s.retries.attempt = 0;
                s.retries.next_at = None;
                Ok(())
            })
            .await?;
        info!(session = %id, step = %session.state, "manual retry");
        Ok(self.view(session).await)
    }

    /// Starts a session's write cache over, empty: everything clients wrote
    /// in its folder is dropped and the VM's files read as the backup
    /// again. The one way on from a write cache that is gone for good (a
    /// missing cache is otherwise only waited for); then runs the waiting
    /// step again, as `retry` does.
    pub async fn discard_cache(&self, id: &str) -> Result<SessionView, ControllerError> {
        let session = self.handle(id)?.snapshot();
        if session.state.is_terminal() || session.state == SessionState::Validating {
            return Err(ControllerError::WrongState {
                id: session.id,
                state: session.state.to_string(),
                action: "discard-cache",
            });
        }
        self.inner
            .datastore
            .discard_cache(&session.export, &session.name)
            .await?;
        info!(session = %id, name = %session.name, "write cache discarded");
        let session = self
            .command(id, "discard-cache", |s| {
                if s.state == SessionState::Waiting {
                    s.state = s.resume.unwrap_or(SessionState::Validating);
                    s.retries.attempt = 0;
                    s.retries.next_at = None;
                }
                Ok(())
            })
            .await?;
        Ok(self.view(session).await)
    }

    /// Cancels a session: powers off and unregisters its VM, unpublishes its
    /// folder, deletes its write cache.
    pub async fn stop(&self, id: &str) -> Result<SessionView, ControllerError> {
        let handle = self.handle(id)?;
        let session = self
            .command(id, "stop", |s| {
                if s.state.is_terminal() {
                    return Err(ControllerError::WrongState {
                        id: String::new(),
                        state: String::new(),
                        action: "stop",
                    });
                }
                s.state = SessionState::Stopping;
                s.resume = None;
                s.retries.next_at = None;
                Ok(())
            })
            .await?;
        handle.cancel.store(true, Ordering::SeqCst);
        info!(session = %id, "stop asked");
        Ok(self.view(session).await)
    }
}
