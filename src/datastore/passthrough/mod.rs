//! Passthrough exports: a live folder on this machine served as it is, with
//! no write cache. Used for writable clones of storage snapshots (a btrfs
//! subvolume snapshot): the clone is already a private copy-on-write copy,
//! so clients write straight into it and the snapshot it came from is never
//! touched.
//!
//! [`Passthrough`] implements [`super::FileOps`], the surface every frontend
//! calls, so a frontend serves both kinds of export alike; [`super::router`]
//! picks one by export id ([`owns`]).
//!
//! # Rules
//! - **Names never escape the folder.** Every path is walked from the
//!   export's root directory one component at a time with `openat` and
//!   `O_NOFOLLOW`: a symlink (made by a client, or already in the folder) is
//!   never followed by the server, whatever its target; `..` is answered
//!   from the id map and never goes above the root.
//! - **File ids are inode numbers.** They live in the file system, so they
//!   survive restarts of revive (ESXi keeps handles of running VMs and names
//!   lock files `.lck-<fileid>`). A btrfs snapshot keeps its source's inode
//!   numbers; each clone is its own export (own id and instance), so equal
//!   numbers in two clones never meet.
//! - **id → path is a cache.** Lookups and listings fill it; a handle
//!   presented after a restart is resolved by walking the folder until that
//!   inode is found. A path that now leads to another inode is refreshed.
//! - Exports are persisted (`<state>/passthrough.json`: path, id, instance,
//!   folder, allowed clients) before they are announced, so a restarted
//!   revive serves the same handles.
//!
//! # State file
//! ```text
//! <state>/passthrough.json   {"next_id": N, "exports": [{path, id, instance, folder, allowed_clients}]}
//! ```

mod ops;
mod resolve;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::types::{DatastoreError, DsResult, Export, ExportId};
use resolve::Tree;

/// Export ids of passthrough exports start here, so they never meet the
/// ids the repository datastore allocates (1, 2, ...) in one NFS server.
pub const EXPORT_ID_BASE: ExportId = 0x8000_0000;

/// Whether export id `id` belongs to a passthrough export.
pub fn owns(id: ExportId) -> bool {
    id >= EXPORT_ID_BASE
}

/// One persisted export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    path: String,
    id: ExportId,
    instance: u64,
    folder: PathBuf,
    allowed_clients: Vec<IpAddr>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Records {
    next_id: ExportId,
    exports: Vec<Record>,
}

/// One served export: its identity and its folder.
pub(crate) struct PtExport {
    info: Arc<Export>,
    tree: Tree,
}

/// Every passthrough export.
pub struct Passthrough {
    state_file: PathBuf,
    /// Serializes changes of the export set and of the state file.
    records: Mutex<Records>,
    exports: RwLock<HashMap<ExportId, Arc<PtExport>>>,
}

fn state_err(action: &str, path: &Path, e: std::io::Error) -> DatastoreError {
    tracing::error!(path = %path.display(), cause = %e, "{action} failed");
    DatastoreError::Io(e)
}

impl Passthrough {
    /// Loads the exports persisted in `<state_dir>/passthrough.json`. An
    /// export whose folder is gone is kept in the record (its owner removes
    /// it) but not served.
    pub fn open(state_dir: &Path) -> DsResult<Passthrough> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| state_err("create state folder", state_dir, e))?;
        let state_file = state_dir.join("passthrough.json");
        let records: Records = match std::fs::read(&state_file) {
            Ok(raw) => serde_json::from_slice(&raw).map_err(|e| {
                state_err(
                    "parse passthrough exports",
                    &state_file,
                    std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Records::default(),
            Err(e) => return Err(state_err("read passthrough exports", &state_file, e)),
        };
        let mut exports = HashMap::new();
        for r in &records.exports {
            match PtExport::open(r) {
                Ok(e) => {
                    info!(export = %r.path, folder = %r.folder.display(), "passthrough export loaded");
                    exports.insert(r.id, Arc::new(e));
                }
                Err(e) => {
                    warn!(export = %r.path, folder = %r.folder.display(), cause = %e, "passthrough export not served")
                }
            }
        }
        Ok(Passthrough {
            state_file,
            records: Mutex::new(records),
            exports: RwLock::new(exports),
        })
    }

    fn save(&self, records: &Records) -> DsResult<()> {
        let json = serde_json::to_vec_pretty(records).map_err(|e| {
            state_err(
                "encode passthrough exports",
                &self.state_file,
                std::io::Error::other(e),
            )
        })?;
        crate::fsutil::write_atomic(&self.state_file, &json)
            .map_err(|e| state_err("save passthrough exports", &self.state_file, e))
    }

    fn lock_records(&self) -> std::sync::MutexGuard<'_, Records> {
        match self.records.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Exports folder `folder` at `path` to `allowed` clients, or returns the
    /// export already there with the same folder. Persisted before it is served.
    ///
    /// # Errors
    /// `Exists` when `path` exports another folder; I/O errors of the folder
    /// or the state file.
    pub fn add_export(
        &self,
        path: &str,
        folder: &Path,
        allowed: &[IpAddr],
    ) -> DsResult<Arc<Export>> {
        let mut records = self.lock_records();
        if let Some(r) = records.exports.iter().find(|r| r.path == path) {
            if r.folder != folder {
                return Err(DatastoreError::Exists);
            }
            if let Some(e) = self.served(r.id) {
                return Ok(e.info.clone());
            }
        }
        let record = match records.exports.iter().find(|r| r.path == path) {
            Some(r) => r.clone(),
            None => {
                let id = records.next_id.max(EXPORT_ID_BASE);
                Record {
                    path: path.to_string(),
                    id,
                    instance: rand::random(),
                    folder: folder.to_path_buf(),
                    allowed_clients: allowed.to_vec(),
                }
            }
        };
        let export = Arc::new(PtExport::open(&record)?);
        if !records.exports.iter().any(|r| r.path == path) {
            records.next_id = record.id + 1;
            records.exports.push(record.clone());
            self.save(&records)?;
        }
        self.write_exports().insert(record.id, export.clone());
        info!(export = %path, id = record.id, folder = %folder.display(), "passthrough export added");
        Ok(export.info.clone())
    }

    /// Stops serving `path` and forgets it; Ok when it is not exported.
    pub fn remove_export(&self, path: &str) -> DsResult<()> {
        let mut records = self.lock_records();
        let Some(pos) = records.exports.iter().position(|r| r.path == path) else {
            return Ok(());
        };
        let record = records.exports.remove(pos);
        self.save(&records)?;
        self.write_exports().remove(&record.id);
        info!(export = %path, id = record.id, "passthrough export removed");
        Ok(())
    }

    /// Paths of every persisted export, served or not.
    pub fn export_paths(&self) -> Vec<String> {
        self.lock_records()
            .exports
            .iter()
            .map(|r| r.path.clone())
            .collect()
    }

    fn write_exports(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<ExportId, Arc<PtExport>>> {
        match self.exports.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn served(&self, id: ExportId) -> Option<Arc<PtExport>> {
        let map = match self.exports.read() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        map.get(&id).cloned()
    }

    pub(crate) fn state(&self, id: ExportId) -> DsResult<Arc<PtExport>> {
        self.served(id).ok_or(DatastoreError::Stale)
    }

    /// Every served export, by id.
    fn served_exports(&self) -> Vec<Arc<Export>> {
        let map = match self.exports.read() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        let mut v: Vec<_> = map.values().map(|e| e.info.clone()).collect();
        v.sort_by_key(|e| e.id);
        v
    }

    /// The served export at `path`.
    pub fn export_by_path(&self, path: &str) -> Option<Arc<Export>> {
        self.served_exports().into_iter().find(|e| e.path == path)
    }
}

impl PtExport {
    fn open(r: &Record) -> DsResult<PtExport> {
        let tree = Tree::open(&r.folder)?;
        Ok(PtExport {
            info: Arc::new(Export {
                id: r.id,
                instance: r.instance,
                path: r.path.clone(),
                root: tree.root_id(),
                allowed_clients: r.allowed_clients.clone(),
            }),
            tree,
        })
    }
}
