//! Block recovery sessions (`revive recover --kind block`): the session
//! publishes the restore point as usual, then serves one of its disks as a
//! block export (NBD or iSCSI) instead of registering an NFS datastore:
//!
//! ```text
//! validating → publishing → exporting → registering_vm → (powering_on) → running
//! ```
//!
//! With the publish-only host the disk is simply served (a database host
//! attaches it with nbdfuse, qemu or an iSCSI initiator); with a QEMU host
//! the guest boots from `nbd://ADDR:PORT/NAME` or `iscsi://ADDR:PORT/IQN/0`. A `copy` migration is the ordinary one, plus one
//! step: at switchover the export is removed (its connections closed and
//! their requests in flight finished) before the last written ranges are
//! copied, so no write can land after the copy.
//!
//! The export lives in memory ([`BlockExports`]); the session's record says
//! it exists (`exported`), and [`restore`] re-creates it when a restarted
//! revive loads the session.

use serde::{Deserialize, Serialize};
use tracing::{error, info};

use super::{ControllerError, Inner, Session, SessionHandle, SessionState};
use crate::block::setup::{self, choose_disk, ExportRequest, SetupError};
use crate::block::{BlockProtocol, BlockProtocolConfig};
use crate::drivers::VmSpec;

/// What a recovery presents: a VM folder (NFS datastore) or a disk (block export).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecoveryKind {
    /// A VM folder on the NFS datastore, registered with the host.
    #[default]
    Vm,
    /// One disk as a block export.
    Block,
}

/// The block export of a block session, persisted in its record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockTarget {
    /// Disk file served; `None` until validation picks the only disk.
    pub disk: Option<String>,
    /// Protocol serving it.
    pub protocol: BlockProtocol,
    /// Export name clients ask for (the session name).
    pub export: String,
    /// How clients reach it once exported, e.g. `nbd://127.0.0.1:10809/web01-ir`
    /// or `iscsi://127.0.0.1:3260/iqn.2024-01.dev.revive:web01-ir/0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The export was created (and is re-created after a restart).
    pub exported: bool,
}

impl BlockTarget {
    /// A target named `export`, for `disk` (or the only disk).
    pub fn new(export: &str, disk: Option<String>, protocol: BlockProtocol) -> BlockTarget {
        BlockTarget {
            disk,
            protocol,
            export: export.to_string(),
            url: None,
            exported: false,
        }
    }
}

fn setup_err(e: SetupError) -> ControllerError {
    match e {
        SetupError::Datastore { source, .. } => source.into(),
        other => ControllerError::Validation {
            check: "block export",
            reason: other.to_string(),
        },
    }
}

/// Checks a block session before anything is published: its protocol is
/// served, the name is free, the disk exists. Keeps only that disk in the
/// VM spec (a QEMU host boots it alone) and returns its name; `None` for a
/// VM session.
pub(super) fn validate(
    inner: &Inner,
    session: &Session,
    spec: &mut VmSpec,
) -> Result<Option<String>, ControllerError> {
    let Some(target) = &session.block else {
        return Ok(None);
    };
    let invalid = |reason: String| ControllerError::Validation {
        check: "block export",
        reason,
    };
    if inner.blocks.listening(target.protocol).is_none() {
        return Err(invalid(format!(
            "revive serve runs no {} server: set [{}] enabled = true",
            target.protocol, target.protocol
        )));
    }
    if inner.blocks.contains(&target.export) {
        return Err(invalid(format!(
            "a block export named '{}' exists",
            target.export
        )));
    }
    let disks: Vec<String> = spec.disks().map(|d| d.name.clone()).collect();
    let disk = choose_disk(&disks, target.disk.as_deref()).map_err(invalid)?;
    if !disks.contains(&disk) {
        return Err(invalid(format!(
            "restore point has no disk '{disk}' (disks: {})",
            disks.join(", ")
        )));
    }
    spec.files.retain(|f| !f.disk || f.name == disk);
    Ok(Some(disk))
}

/// Records the disk validation chose.
pub(super) fn set_disk(session: &mut Session, disk: Option<String>) {
    if let (Some(target), Some(disk)) = (session.block.as_mut(), disk) {
        target.disk = Some(disk);
    }
}

/// The step after publishing: block sessions export their disk instead of
/// registering a datastore.
pub(super) fn after_publish(session: &Session, next: SessionState) -> SessionState {
    match (&session.block, next) {
        (Some(_), SessionState::RegisteringDatastore) => SessionState::Exporting,
        _ => next,
    }
}

/// Creates the session's block export (unless it exists) from its published folder.
async fn create(
    inner: &Inner,
    session: &Session,
    target: &BlockTarget,
) -> Result<(), ControllerError> {
    if inner.blocks.contains(&target.export) {
        return Ok(());
    }
    let allowed = inner
        .datastore
        .export_by_path(&session.export)
        .map(|e| e.allowed_clients.clone())
        .unwrap_or_default();
    setup::export_file(
        &inner.datastore,
        &inner.blocks,
        &ExportRequest {
            name: &target.export,
            nfs_export: &session.export,
            publication: &session.name,
            file: target.disk.as_deref(),
            allowed_clients: allowed,
            read_only: false,
            protocol: BlockProtocolConfig::default_for(target.protocol),
        },
    )
    .await
    .map_err(setup_err)?;
    Ok(())
}

/// The `exporting` step: serves the disk and records where, also in the VM
/// spec so a QEMU host opens the disk from the export.
pub(super) async fn export(
    inner: &Inner,
    handle: &SessionHandle,
    session: &Session,
) -> Result<SessionState, ControllerError> {
    let target = session
        .block
        .clone()
        .ok_or_else(|| ControllerError::BadRequest("not a block session".into()))?;
    let Some(addr) = inner.blocks.listening(target.protocol) else {
        return Err(ControllerError::Validation {
            check: "block export",
            reason: format!("revive serve runs no {} server", target.protocol),
        });
    };
    create(inner, session, &target).await?;
    let url = match inner.blocks.get(&target.export, target.protocol) {
        Some(export) => export.url(&session.datastore.remote_host, addr.port()),
        None => {
            return Err(ControllerError::Validation {
                check: "block export",
                reason: format!("block export '{}' vanished while created", target.export),
            })
        }
    };
    super::runner::update(inner, handle, |s| {
        if let Some(t) = s.block.as_mut() {
            t.url = Some(url.clone());
            t.exported = true;
        }
        if let Some(spec) = s.vm_spec.as_mut() {
            for f in spec
                .files
                .iter_mut()
                .filter(|f| Some(&f.name) == target.disk.as_ref())
            {
                f.url = Some(url.clone());
            }
        }
        Ok(())
    })
    .await?;
    info!(session = %session.id, url = %url, "disk exported");
    Ok(SessionState::RegisteringVm)
}

/// Removes the session's export, closing its connections once their
/// requests in flight are answered (switchover, finalize, stop).
pub(super) async fn unexport(
    inner: &Inner,
    handle: &SessionHandle,
    session: &Session,
) -> Result<(), ControllerError> {
    let Some(target) = &session.block else {
        return Ok(());
    };
    if inner.blocks.remove(&target.export).await {
        info!(session = %session.id, export = %target.export, "block export removed");
    }
    if target.exported {
        super::runner::update(inner, handle, |s| {
            if let Some(t) = s.block.as_mut() {
                t.exported = false;
            }
            Ok(())
        })
        .await?;
    }
    Ok(())
}

/// Re-creates the export of a session loaded at start (revive restarted).
pub(super) async fn restore(inner: &Inner, session: &Session) {
    let Some(target) = &session.block else { return };
    if !target.exported || session.state.is_terminal() {
        return;
    }
    match create(inner, session, target).await {
        Ok(()) => info!(session = %session.id, export = %target.export, "block export restored"),
        Err(e) => {
            error!(session = %session.id, export = %target.export, cause = %e, "could not restore block export")
        }
    }
}
