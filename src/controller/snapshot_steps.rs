//! The two steps that differ for a session recovered from a storage
//! snapshot (`--point snap:SOURCE/SNAPSHOT`): validating reads the
//! snapshot on the storage (does it exist, does it hold the VM), and
//! publishing takes a writable clone of it ([`super::clones`]) and presents
//! it to the host. Every other step (datastore, VM, power on, live
//! migration, stop) is the same as for a restore point; releasing the
//! session releases its clone.

use std::net::IpAddr;
use std::sync::Arc;

use super::clones::{self, Wanted};
use super::runner::update;
use super::{ControllerError, Inner, Session, SessionHandle, SessionState};
use crate::drivers::{DatastoreSpec, Driver, VmFile, VmSpec};
use crate::snapshots::{
    Presentation, Snapshot, SnapshotError, SnapshotProvider, SnapshotSpec, SnapshotVm,
};

/// Whether the session recovers from a storage snapshot.
pub(super) fn is_snapshot(session: &Session) -> bool {
    SnapshotSpec::is_snapshot(&session.point)
}

/// Snapshot errors a user can fix by asking for something else.
fn checked(e: SnapshotError) -> ControllerError {
    match e {
        SnapshotError::UnknownSnapshot { .. } | SnapshotError::BadSpec(_) => {
            ControllerError::Validation {
                check: "snapshot",
                reason: e.to_string(),
            }
        }
        SnapshotError::UnknownSource { .. } => ControllerError::Validation {
            check: "snapshot source",
            reason: e.to_string(),
        },
        other => ControllerError::Snapshot(other),
    }
}

/// The session's snapshot on the storage, and its VM in it.
async fn find(
    inner: &Inner,
    session: &Session,
) -> Result<
    (
        SnapshotSpec,
        Arc<dyn SnapshotProvider>,
        Snapshot,
        SnapshotVm,
    ),
    ControllerError,
> {
    let spec = SnapshotSpec::parse(&session.point).map_err(checked)?;
    let provider = inner.snapshots.get(&spec.source).map_err(checked)?;
    let snapshot = provider.snapshot(&spec.snapshot).await.map_err(checked)?;
    let Some(vm) = snapshot.vms.iter().find(|v| v.name == session.vm).cloned() else {
        let held: Vec<&str> = snapshot.vms.iter().map(|v| v.name.as_str()).collect();
        return Err(ControllerError::Validation {
            check: "snapshot",
            reason: format!(
                "snapshot '{}' of source '{}' holds no VM '{}' (it holds: {})",
                spec.snapshot,
                spec.source,
                session.vm,
                if held.is_empty() {
                    "none".to_string()
                } else {
                    held.join(", ")
                }
            ),
        });
    };
    Ok((spec, provider, snapshot, vm))
}

/// Checks the snapshot, the VM in it and the host, before anything is made.
pub(super) async fn validate(
    inner: &Inner,
    handle: &SessionHandle,
    session: &Session,
    driver: &Arc<dyn Driver>,
) -> Result<SessionState, ControllerError> {
    let (_, provider, _, vm) = find(inner, session).await?;
    if provider.kind() == "rbd" && driver.kind() == "vsphere" {
        return Err(ControllerError::Validation {
            check: "hypervisor",
            reason: format!(
                "host '{}' uses the vsphere driver: ESXi can run a clone of block storage only as a LUN (iSCSI), which revive cannot present yet; recover it on a qemu host",
                session.host
            ),
        });
    }
    let spec = VmSpec {
        name: session.name.clone(),
        source_vm: vm.name.clone(),
        folder: vm.folder.clone(),
        lab: session.lab.clone(),
        point: session.point.clone(),
        port: session.port,
        files: vm
            .files
            .iter()
            .map(|f| VmFile {
                name: f.name.clone(),
                size: f.size,
                disk: f.disk,
                location: None,
                url: None,
            })
            .collect(),
        memory_mib: vm.memory_mib,
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
    update(inner, handle, |s| {
        s.vm_spec = Some(spec);
        Ok(())
    })
    .await?;
    Ok(SessionState::Publishing)
}

/// Addresses a clone recovered on `host` is exported to: the host's
/// `nfs_clients`, else the sessions export's allow-list.
fn clients_of(inner: &Inner, host: &str) -> Vec<IpAddr> {
    let configured = inner
        .config
        .hosts
        .iter()
        .find(|h| h.name == host)
        .map(|h| h.nfs_clients.clone())
        .unwrap_or_default();
    if !configured.is_empty() {
        return configured;
    }
    inner
        .datastore
        .export_by_path(&inner.config.export)
        .map(|e| e.allowed_clients.clone())
        .unwrap_or_default()
}

/// Takes (or shares) the clone and presents it: an NFS datastore of its
/// own for a file clone, disk URLs in the VM's spec for a block clone.
pub(super) async fn publish(
    inner: &Inner,
    handle: &SessionHandle,
    session: &Session,
) -> Result<SessionState, ControllerError> {
    let (spec, provider, snapshot, vm) = find(inner, session).await?;
    let clients = clients_of(inner, &session.host);
    let (record, presentation) = clones::acquire(
        inner,
        session,
        Wanted {
            source: &spec.source,
            provider: &provider,
            snapshot: &snapshot,
            vm: &vm,
            clients: &clients,
        },
    )
    .await?;
    match presentation {
        Presentation::Nfs { export, folder } => {
            update(inner, handle, |s| {
                s.datastore = DatastoreSpec {
                    name: record.clone.name.clone(),
                    remote_host: s.datastore.remote_host.clone(),
                    remote_path: export.clone(),
                    local_path: Some(folder.clone()),
                };
                s.export = export.clone();
                Ok(())
            })
            .await?;
            Ok(SessionState::RegisteringDatastore)
        }
        Presentation::Block { disks } => {
            update(inner, handle, |s| {
                s.datastore.name = record.clone.name.clone();
                if let Some(spec) = s.vm_spec.as_mut() {
                    for f in spec.files.iter_mut().filter(|f| f.disk) {
                        f.location = disks
                            .iter()
                            .find(|d| d.name == f.name)
                            .map(|d| d.url.clone());
                    }
                }
                Ok(())
            })
            .await?;
            // Nothing to mount: the hypervisor opens each disk itself.
            Ok(SessionState::RegisteringVm)
        }
    }
}
