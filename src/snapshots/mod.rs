//! `snapshots`: instant recovery from the snapshots a production storage
//! system already keeps, beside the repository's restore points.
//!
//! A [`SnapshotProvider`] drives one storage system through its own CLI:
//! it lists volumes and their snapshots with the VMs in them, makes a
//! writable clone of a snapshot, presents the clone to hosts, and takes it
//! away again. The snapshot itself is never written: every write of a
//! recovered VM lands in its clone.
//!
//! - [`btrfs`]: a subvolume is a datastore of VM folders; `btrfs subvolume
//!   snapshot` makes the clone (O(1)); revive's NFS server exports it as a
//!   passthrough export ([`crate::datastore::passthrough`]) to the host only.
//! - [`rbd`]: an image is a VM disk; a protected snapshot and `rbd clone`
//!   make a copy-on-write clone, which QEMU opens as `rbd:POOL/IMAGE`.
//!
//! # Rules
//! - The controller names a clone after the session that needs it
//!   ([`clone_name`]) and records it *before* asking the storage for it, so
//!   a crash in between leaves a record that a restart sweeps; every call
//!   here is idempotent (create finds what an earlier attempt made, destroy
//!   of something gone is Ok).
//! - Clones carry [`CLONE_PREFIX`]: [`SnapshotProvider::clones`] lists what
//!   revive made, so nothing else on the storage is ever destroyed.
//! - Errors name the command that is missing or failed, with its message.

pub mod btrfs;
mod command;
pub mod config;
pub mod rbd;
mod vmfolders;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use command::{StorageCommand, COMMAND_TIMEOUT};
pub use config::{BtrfsConfig, ProviderConfig, RbdConfig, RbdPresent, SnapshotSourceConfig};
pub use vmfolders::vms_in_folder;

use crate::datastore::passthrough::Passthrough;

/// Prefix of every clone revive makes (subvolume or image name).
pub const CLONE_PREFIX: &str = "revive-clone-";

/// Prefix of a restore point spec that names a storage snapshot.
pub const POINT_PREFIX: &str = "snap:";

/// Folder of the NFS paths clones are exported at (`/snap/<clone>`).
pub const EXPORT_ROOT: &str = "/snap";

/// The clone a session creates: named after it, so a restart finds it.
pub fn clone_name(session_id: &str) -> String {
    format!("{CLONE_PREFIX}{session_id}")
}

/// What snapshot operations fail with.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// `snap:NAME/...` names no configured source.
    #[error("no snapshot source '{name}' in the configuration (configured: {known})")]
    UnknownSource { name: String, known: String },
    /// No such snapshot in the source.
    #[error("snapshot '{snapshot}' not found in source '{source_name}'")]
    UnknownSnapshot {
        source_name: String,
        snapshot: String,
    },
    /// The storage CLI is not installed (or not where configured).
    #[error("storage command '{command}' of snapshot source '{source_name}' not found - install it or set `command` in its [[snapshot_source]]")]
    CommandMissing {
        source_name: String,
        command: String,
    },
    /// The storage CLI failed.
    #[error("storage command '{command}' failed ({status}) - {stderr}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },
    /// The storage CLI printed something we cannot read.
    #[error("storage command '{command}' printed unexpected output - {reason}")]
    BadOutput { command: String, reason: String },
    /// A local file operation failed.
    #[error("{action} '{path}' - {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Presenting a clone to hosts failed.
    #[error("present clone '{clone}' - {reason}")]
    Present { clone: String, reason: String },
    /// A point spec that is not `snap:SOURCE/SNAPSHOT`.
    #[error("'{0}' does not name a storage snapshot: write snap:SOURCE/SNAPSHOT")]
    BadSpec(String),
}

/// Shorthand for snapshot results.
pub type SnapResult<T> = Result<T, SnapshotError>;

/// `snap:SOURCE/SNAPSHOT`, as `revive recover --point` takes it. The
/// snapshot part may hold slashes (a btrfs subvolume path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotSpec {
    /// Configured source name.
    pub source: String,
    /// Snapshot id within the source.
    pub snapshot: String,
}

impl SnapshotSpec {
    /// Whether a point spec names a storage snapshot rather than a restore point.
    pub fn is_snapshot(point: &str) -> bool {
        point.starts_with(POINT_PREFIX)
    }

    /// Parses `snap:SOURCE/SNAPSHOT`.
    pub fn parse(point: &str) -> SnapResult<SnapshotSpec> {
        let rest = point
            .strip_prefix(POINT_PREFIX)
            .ok_or_else(|| SnapshotError::BadSpec(point.to_string()))?;
        match rest.split_once('/') {
            Some((source, snapshot)) if !source.is_empty() && !snapshot.is_empty() => {
                Ok(SnapshotSpec {
                    source: source.to_string(),
                    snapshot: snapshot.to_string(),
                })
            }
            _ => Err(SnapshotError::BadSpec(point.to_string())),
        }
    }
}

impl std::fmt::Display for SnapshotSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{POINT_PREFIX}{}/{}", self.source, self.snapshot)
    }
}

/// One file of a VM in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotFile {
    /// Name in the VM folder (for a block volume: `<image>.raw`).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// A virtual disk.
    pub disk: bool,
}

/// A VM found in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotVm {
    /// VM name (the `.vmx` name; for a block volume its `revive.vm` metadata or image name).
    pub name: String,
    /// Its folder relative to the snapshot's root ("" for a block volume).
    pub folder: String,
    /// Its files.
    pub files: Vec<SnapshotFile>,
    /// Memory it is configured with (`.vmx` memsize, `revive.memsize`), if known.
    pub memory_mib: Option<u64>,
}

/// A snapshot of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Id within the source (btrfs: subvolume path; rbd: `image@snap`).
    pub id: String,
    /// The volume it is a snapshot of.
    pub volume: String,
    /// When it was taken, as the storage reports it.
    pub created: Option<String>,
    /// The VMs in it.
    pub vms: Vec<SnapshotVm>,
}

/// A volume with its snapshots.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Volume {
    /// Name (btrfs: subvolume path; rbd: image name).
    pub name: String,
    /// Its snapshots, oldest first.
    pub snapshots: Vec<Snapshot>,
}

/// A clone as the controller persists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneRef {
    /// Clone name ([`clone_name`]).
    pub name: String,
    /// Where it is: btrfs subvolume path, or `POOL/IMAGE`.
    pub location: String,
    /// The snapshot it was made of.
    pub snapshot: String,
    /// revive protected the snapshot for it (rbd), so revive unprotects it
    /// when its last clone goes.
    #[serde(default)]
    pub protected_snapshot: bool,
}

/// One disk of a clone a hypervisor opens itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDisk {
    /// The disk's file name in the VM's spec.
    pub name: String,
    /// What the hypervisor opens (`rbd:POOL/IMAGE:conf=...`).
    pub url: String,
}

/// How a clone reaches hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Presentation {
    /// Exported by revive's NFS server: hosts mount `export` as a datastore.
    Nfs {
        /// NFS export path.
        export: String,
        /// The clone's folder on this machine.
        folder: PathBuf,
    },
    /// Block images the hypervisor opens directly.
    Block {
        /// The disks, in the VM's order.
        disks: Vec<BlockDisk>,
    },
}

/// One storage system's snapshots.
#[async_trait]
pub trait SnapshotProvider: Send + Sync {
    /// "btrfs" or "rbd".
    fn kind(&self) -> &'static str;

    /// Every volume with its snapshots and the VMs in them.
    async fn volumes(&self) -> SnapResult<Vec<Volume>>;

    /// One snapshot with its VMs; [`SnapshotError::UnknownSnapshot`] if absent.
    async fn snapshot(&self, id: &str) -> SnapResult<Snapshot>;

    /// Where clone `name` of snapshot `snapshot` (its id) will be: recorded
    /// before [`Self::create_clone`].
    fn plan_clone(&self, snapshot: &str, name: &str) -> CloneRef;

    /// Makes the writable clone, or finds it made by an earlier attempt.
    /// Returns it as it must be recorded (e.g. whether it protected the snapshot).
    async fn create_clone(&self, clone: &CloneRef) -> SnapResult<CloneRef>;

    /// Presents the clone to hosts at `clients` (an NFS allow-list).
    async fn present(
        &self,
        clone: &CloneRef,
        vm: &SnapshotVm,
        clients: &[IpAddr],
    ) -> SnapResult<Presentation>;

    /// Takes the presentation away; Ok when there is none.
    async fn unpresent(&self, clone: &CloneRef) -> SnapResult<()>;

    /// Deletes the clone; Ok when it is gone.
    async fn destroy(&self, clone: &CloneRef) -> SnapResult<()>;

    /// Names of the clones revive made on this storage ([`CLONE_PREFIX`]).
    async fn clones(&self) -> SnapResult<Vec<String>>;
}

/// The configured snapshot sources, by name.
#[derive(Default)]
pub struct SnapshotSources {
    sources: BTreeMap<String, Arc<dyn SnapshotProvider>>,
}

impl SnapshotSources {
    /// Builds every configured source; btrfs clones are exported through
    /// `passthrough` (`None`: this process lists snapshots, it serves no clone).
    pub fn build(configs: &[SnapshotSourceConfig], passthrough: Option<Arc<Passthrough>>) -> Self {
        let mut sources = BTreeMap::new();
        for c in configs {
            let built: Arc<dyn SnapshotProvider> = match &c.provider {
                ProviderConfig::Btrfs(b) => {
                    Arc::new(btrfs::BtrfsProvider::new(&c.name, b, passthrough.clone()))
                }
                ProviderConfig::Rbd(r) => Arc::new(rbd::RbdProvider::new(&c.name, r)),
            };
            sources.insert(c.name.clone(), built);
        }
        SnapshotSources { sources }
    }

    /// No sources (repository-only daemons and tests).
    pub fn none() -> Self {
        SnapshotSources::default()
    }

    /// The source called `name`.
    pub fn get(&self, name: &str) -> SnapResult<Arc<dyn SnapshotProvider>> {
        self.sources
            .get(name)
            .cloned()
            .ok_or_else(|| SnapshotError::UnknownSource {
                name: name.to_string(),
                known: self.known(),
            })
    }

    /// Configured names, comma-separated ("none" when there are none).
    pub fn known(&self) -> String {
        if self.sources.is_empty() {
            return "none".into();
        }
        self.sources.keys().cloned().collect::<Vec<_>>().join(", ")
    }

    /// Every source, by name.
    pub fn all(&self) -> Vec<(String, Arc<dyn SnapshotProvider>)> {
        self.sources
            .iter()
            .map(|(n, p)| (n.clone(), p.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_print() {
        let s = SnapshotSpec::parse("snap:pool1/snaps/ds1@monday").unwrap();
        assert_eq!(s.source, "pool1");
        assert_eq!(s.snapshot, "snaps/ds1@monday");
        assert_eq!(s.to_string(), "snap:pool1/snaps/ds1@monday");
        assert!(SnapshotSpec::is_snapshot("snap:x/y"));
        assert!(!SnapshotSpec::is_snapshot("web01@latest"));
        for bad in [
            "snap:",
            "snap:pool1",
            "snap:/x",
            "snap:pool1/",
            "web01@latest",
        ] {
            let err = SnapshotSpec::parse(bad).unwrap_err();
            assert!(err.to_string().contains("snap:SOURCE/SNAPSHOT"), "{err}");
        }
        assert_eq!(clone_name("0123abcd"), "revive-clone-0123abcd");
    }

    #[test]
    fn unknown_sources_list_the_configured_ones() {
        let none = SnapshotSources::none();
        let err = none.get("pool1").err().unwrap().to_string();
        assert!(err.contains("'pool1'") && err.contains("none"), "{err}");
    }
}
