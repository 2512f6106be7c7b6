//! `drivers`: what the controller asks of a hypervisor or a database host.
//! One trait, [`Driver`], and one implementation per kind of host: `none`
//! (publish only, the user mounts by hand), `vsphere` (ESXi / vCenter over
//! the vim25 API), `qemu` (QEMU/KVM over QMP) and `postgres` (a PostgreSQL
//! server started on the restore point through FUSE, then moved to local
//! storage by streaming replication).
//!
//! # Rules
//! - Every call is idempotent: the controller retries a step after a
//!   transient failure or a restart of revive, so "register" must find what an
//!   earlier attempt already registered, and "remove" of something gone is Ok.
//! - References a driver returns ([`VmRef`], [`TaskRef`]) are opaque strings
//!   the controller persists in the session, so a restarted revive resumes
//!   with the same VM and the same migration job.
//! - [`DriverError::is_transient`] decides between "waiting, retry later" and
//!   "failed": only reachability problems are transient.

pub mod none;
pub mod postgres;
pub mod qemu;
pub mod vsphere;

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// Failures of a hypervisor driver.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// The hypervisor (or its management API) could not be reached; worth retrying.
    #[error("hypervisor '{host}' unreachable - {reason}")]
    Unreachable { host: String, reason: String },
    /// An operation did not finish in time; worth retrying.
    #[error("{operation} on '{host}' timed out after {seconds} s")]
    Timeout {
        host: String,
        operation: String,
        seconds: u64,
    },
    /// Credentials refused.
    #[error("login to '{host}' refused - {reason}")]
    Auth { host: String, reason: String },
    /// A named object does not exist (host, datastore, VM, network, ...).
    #[error("{kind} '{name}' not found")]
    NotFound { kind: &'static str, name: String },
    /// A named object already exists and is not ours to reuse.
    #[error("{kind} '{name}' already exists")]
    Duplicate { kind: &'static str, name: String },
    /// The object is in use (e.g. a datastore with VMs on it).
    #[error("{what} is in use - {reason}")]
    InUse { what: String, reason: String },
    /// The host cannot run the VM.
    #[error("host '{host}' has {available_mib} MiB of memory free; the VM needs {needed_mib} MiB")]
    InsufficientMemory {
        host: String,
        needed_mib: u64,
        available_mib: u64,
    },
    /// The driver cannot do this.
    #[error("the {driver} driver does not support {operation}")]
    NotSupported {
        driver: &'static str,
        operation: &'static str,
    },
    /// The VM as backed up cannot be run by this driver (e.g. no disk).
    #[error("VM '{vm}' cannot be started by the {driver} driver - {reason}")]
    UnsupportedVm {
        driver: &'static str,
        vm: String,
        reason: String,
    },
    /// The hypervisor refused an operation for another reason.
    #[error("{operation} failed - {message}")]
    Fault { operation: String, message: String },
    /// A named check before anything starts refused the request (the
    /// controller reports it as that validation).
    #[error("{check} - {reason}")]
    Check { check: &'static str, reason: String },
    /// A local file or process operation failed.
    #[error("{action} '{path}' - {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl DriverError {
    /// True when the cause is reachability, so the session should wait and retry.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            DriverError::Unreachable { .. } | DriverError::Timeout { .. }
        )
    }
}

/// Result of driver calls.
pub type DriverResult<T> = Result<T, DriverError>;

/// The NFS datastore as a hypervisor mounts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatastoreSpec {
    /// Name the hypervisor shows; the same for every session on a host.
    pub name: String,
    /// Address the hypervisor uses to reach revive's NFS server.
    pub remote_host: String,
    /// Export path (the NFS "share").
    pub remote_path: String,
    /// Where the export's files are on this machine, when revive knows it
    /// (a snapshot clone's folder). Only a simulator uses it (vcsim treats a
    /// NAS datastore's local path as a folder); real hosts ignore it.
    pub local_path: Option<PathBuf>,
}

/// One file of a published VM folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmFile {
    /// File name in the VM folder.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// A virtual disk (flat extent or raw image) rather than a small file.
    pub disk: bool,
    /// Where the hypervisor opens this disk instead of the datastore
    /// folder: the block export of a block session (`nbd://HOST:PORT/NAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Where the hypervisor opens this disk itself instead of in the VM's
    /// folder on the datastore: a block image such as `rbd:POOL/IMAGE`
    /// (a clone of a Ceph snapshot). `None`: in the folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
}

/// A VM to register: its folder on a datastore and what the backup says about it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Name the VM is registered under (the session name).
    pub name: String,
    /// Name of the VM as backed up.
    pub source_vm: String,
    /// Folder of the VM's files, relative to the datastore root.
    pub folder: String,
    /// The VM's files as published.
    pub files: Vec<VmFile>,
    /// Memory the VM is configured with (from the .vmx `memsize`), if known.
    pub memory_mib: Option<u64>,
    /// The restore point presented (its id), for drivers that read the
    /// backup before publishing (the postgres driver reads `PG_VERSION`).
    #[serde(default)]
    pub point: String,
    /// The port the recovered service answers on (postgres sessions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Boot on an isolated lab network (verification boots) instead of as
    /// configured; only drivers that can isolate a guest accept it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lab: Option<LabNetwork>,
}

/// An isolated network for a verification boot: the guest gets one NIC on a
/// network that routes nowhere (not to the host, not to production), a
/// screen that can be captured, and only `forwards` reach into it, from
/// 127.0.0.1 on the hypervisor's machine.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabNetwork {
    /// Guest TCP ports reachable from the hypervisor's loopback.
    #[serde(default)]
    pub forwards: Vec<PortForward>,
}

/// One TCP port of a lab guest, reachable at `127.0.0.1:host_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortForward {
    /// Port on the hypervisor's loopback.
    pub host_port: u16,
    /// Port in the guest.
    pub guest_port: u16,
}

impl VmSpec {
    /// The VMware configuration file, if the VM has one.
    pub fn vmx(&self) -> Option<&VmFile> {
        self.files.iter().find(|f| f.name.ends_with(".vmx"))
    }

    /// The disks, in file name order.
    pub fn disks(&self) -> impl Iterator<Item = &VmFile> {
        self.files.iter().filter(|f| f.disk)
    }
}

/// A registered VM, as the driver identifies it (persisted by the controller).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRef(pub String);

/// A long-running hypervisor job such as a Storage vMotion or a block mirror.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRef(pub String);

/// Progress of a live migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum MigrationStatus {
    /// Copying; `percent` of the work done.
    Running { percent: u8 },
    /// The copy is in sync and waits for [`Driver::complete_live_migration`]
    /// (QEMU's mirror "ready"); drivers that pivot by themselves skip this.
    Ready,
    /// The copy follows the source live (a streaming standby), `lag_bytes`
    /// behind; [`Driver::complete_live_migration`] switches over whenever the
    /// operator asks (the postgres driver).
    Syncing { lag_bytes: u64 },
    /// The VM runs from the destination.
    Completed,
    /// The hypervisor gave up.
    Failed { reason: String },
}

/// What a host reports during validation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostInfo {
    /// Memory free for new VMs, if the hypervisor reports it.
    pub free_memory_mib: Option<u64>,
}

/// What the controller asks of a hypervisor.
#[async_trait]
pub trait Driver: Send + Sync {
    /// Short name used in config, logs and the API: "none", "vsphere", "qemu".
    fn kind(&self) -> &'static str;

    /// Checks the host is reachable and can run `vm` (memory); a clear error otherwise.
    async fn validate(&self, vm: &VmSpec) -> DriverResult<HostInfo>;

    /// Mounts the datastore on the host, or finds it already mounted.
    async fn attach_datastore(&self, datastore: &DatastoreSpec) -> DriverResult<()>;

    /// Unmounts the datastore; Ok when it is not mounted.
    async fn detach_datastore(&self, datastore: &DatastoreSpec) -> DriverResult<()>;

    /// Registers the VM from its folder on the datastore, or finds it registered.
    async fn register_vm(&self, datastore: &DatastoreSpec, vm: &VmSpec) -> DriverResult<VmRef>;

    /// Powers the VM on; Ok when it already runs.
    async fn power_on(&self, vm: &VmRef) -> DriverResult<()>;

    /// Powers the VM off; Ok when it is already off.
    async fn power_off(&self, vm: &VmRef) -> DriverResult<()>;

    /// Removes the VM from the host's inventory (its files stay); Ok when gone.
    async fn unregister_vm(&self, vm: &VmRef) -> DriverResult<()>;

    /// Starts moving the running VM's storage to `destination` (a datastore
    /// name for vSphere, a folder for QEMU).
    async fn start_live_migration(&self, vm: &VmRef, destination: &str) -> DriverResult<TaskRef>;

    /// Progress of a live migration started by [`Driver::start_live_migration`].
    async fn live_migration_status(
        &self,
        vm: &VmRef,
        task: &TaskRef,
    ) -> DriverResult<MigrationStatus>;

    /// Switches the VM over to the destination once the copy is ready.
    async fn complete_live_migration(&self, vm: &VmRef, task: &TaskRef) -> DriverResult<()>;

    /// After a `copy` migration: registers and starts the VM from the copied
    /// files in `folder` (production storage). `None`: the driver has no VM to start.
    async fn start_from_copy(
        &self,
        vm: &VmSpec,
        folder: &std::path::Path,
    ) -> DriverResult<Option<VmRef>>;

    /// After a restart of revive: brings back what died with the previous
    /// process for a registered VM (the postgres driver remounts its FUSE
    /// folder and restarts the database on it). Hypervisors keep running
    /// without revive: the default does nothing.
    async fn resume(&self, _vm: &VmRef) -> DriverResult<()> {
        Ok(())
    }

    /// The session ended after its migration: the VM runs from production
    /// storage and stays; whatever the driver kept for the published copy
    /// goes (the postgres driver's session folder). The default keeps nothing.
    async fn migration_finished(&self, _vm: &VmRef) -> DriverResult<()> {
        Ok(())
    }

    /// Before revive stops cleanly: stops what cannot outlive the process
    /// (a database on a FUSE mount is stopped cleanly and unmounted; it is
    /// started again by [`Driver::resume`]).
    async fn shutdown(&self) {}

    /// What the guest wrote on its serial console so far (verification
    /// boots look for their success signal in it).
    async fn console_output(&self, _vm: &VmRef) -> DriverResult<Vec<u8>> {
        Err(DriverError::NotSupported {
            driver: self.kind(),
            operation: "reading the guest's console",
        })
    }

    /// A PNG picture of the guest's screen.
    async fn screenshot(&self, _vm: &VmRef) -> DriverResult<Vec<u8>> {
        Err(DriverError::NotSupported {
            driver: self.kind(),
            operation: "screenshots",
        })
    }
}

/// What a driver may use of the server it runs in.
#[derive(Clone)]
pub struct DriverContext {
    /// The datastore the sessions' folders are published in (the postgres
    /// driver mounts them through FUSE and reads restore points).
    pub datastore: Arc<crate::datastore::Datastore>,
}

/// One hypervisor host as configured (`[[host]]`).
// No `deny_unknown_fields` here: serde does not support it with `flatten`;
// the driver's own settings struct refuses unknown keys instead.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct HostConfig {
    /// Name used by `revive recover --host`.
    pub name: String,
    /// Address the host uses to reach revive's NFS server (default: the NFS bind address, or 127.0.0.1).
    pub nfs_address: Option<String>,
    /// Write cache location of this host's sessions when `recover` names
    /// none (default: `[datastore] cache_root`): e.g. a folder on the
    /// target's own disk rather than on the mount server.
    pub cache_dir: Option<PathBuf>,
    /// Addresses the host's NFS client connects from: the export of a
    /// snapshot clone recovered on this host admits only these (default:
    /// the allowed_clients of the sessions' export).
    #[serde(default)]
    pub nfs_clients: Vec<std::net::IpAddr>,
    /// The driver and its settings.
    #[serde(flatten)]
    pub driver: DriverConfig,
}

/// Which driver a host uses, with its settings (`driver = "..."`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "driver", rename_all = "lowercase")]
// Parsed once per configured host: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum DriverConfig {
    /// Publish only.
    None(NoneConfig),
    /// VMware ESXi or vCenter.
    Vsphere(vsphere::VsphereConfig),
    /// QEMU/KVM.
    Qemu(qemu::QemuConfig),
    /// PostgreSQL started on the restore point through FUSE.
    Postgres(postgres::PostgresConfig),
}

/// `driver = "none"` takes no settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoneConfig {}

/// Builds the driver of a configured host.
pub fn build(host: &HostConfig, context: &DriverContext) -> DriverResult<Arc<dyn Driver>> {
    match &host.driver {
        DriverConfig::None(_) => Ok(Arc::new(none::NoneDriver)),
        DriverConfig::Vsphere(config) => vsphere::build(&host.name, config),
        DriverConfig::Qemu(config) => qemu::build(&host.name, config),
        DriverConfig::Postgres(config) => postgres::build(&host.name, config, context),
    }
}
