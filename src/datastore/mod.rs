//! `datastore`: the namespace a client sees. Exports, one folder per
//! publication (a restore point presented as a folder: a VM point's flat
//! folder, or a tree point's folders, files and symlinks with the modes,
//! owners and times the backup recorded), stable file ids, and the overlay
//! of each file's write cache on its backup.
//!
//! # Rules
//! - The repository is never written: every client write lands in the write
//!   cache of the publication that owns the file (`cache`).
//! - File ids and export instances are persisted (the namespace's change
//!   log and `exports.json`) before a change is acknowledged, so handles
//!   held by ESXi stay valid across restarts.
//! - Reads of a presented file come from the cache bitmap first, else from the
//!   backup through the shared block cache, with readahead for sequential
//!   readers (Storage vMotion reads every disk start to end).
//!
//! # State folder
//! ```text
//! <state>/exports.json                 export path → id, instance
//! <state>/exports/<id>/namespace.json  the tree, publications, next file id (checkpoint)
//! <state>/exports/<id>/namespace.log   changes since the checkpoint (nslog.rs)
//! <state>/exports/<id>/cache/          write caches of files outside publications
//! <cache_root>/<publication>/          write caches of a publication (default location)
//! ```

mod cache_dirs;
mod extents;
mod io;
pub mod namespace;
mod nslog;
mod ops;
pub mod passthrough;
pub mod router;
mod surface;
pub mod types;
mod usage;
mod view;

use std::collections::HashMap;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::{OnceCell, RwLock};
use tracing::{info, warn};

use crate::cache::{SessionCache, WriteCache};
use crate::repo::tree::{EntryContent, Tree, TreeEntry};
use crate::repo::{BlockCache, FileReader, Repository};
pub use cache_dirs::CACHE_MARKER;
pub use extents::FileExtent;
pub use namespace::ROOT_ID;
use namespace::{Content, Namespace, Node, Publication};
pub use surface::{FileAt, FileOps, NameAt};
pub use types::*;
pub use view::PublishedFile;

/// Chunks fetched ahead of a sequential reader: 8 × 1 MiB keeps a Storage
/// vMotion-style reader from ever waiting on a chunk decode.
pub const DEFAULT_READAHEAD_CHUNKS: u64 = 8;

/// One export as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    /// Path clients mount, e.g. `/revive`.
    pub path: String,
    /// Client addresses allowed (the ESXi hosts).
    pub allowed_clients: Vec<IpAddr>,
}

/// How a datastore is set up.
#[derive(Debug, Clone)]
pub struct DatastoreConfig {
    /// Folder of persisted identity and namespaces.
    pub state_dir: PathBuf,
    /// Default write cache location: one folder per publication below it.
    pub cache_root: PathBuf,
    /// Bytes of verified chunks kept in memory.
    pub block_cache_bytes: usize,
    /// Chunks fetched ahead of a sequential reader.
    pub readahead_chunks: u64,
    /// The exports.
    pub exports: Vec<ExportConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ExportRecord {
    path: String,
    id: ExportId,
    instance: u64,
}

/// Runtime state of one file: its backup reader and its write cache.
pub(crate) struct FileState {
    /// The backup behind a presented file.
    base: Option<FileReader>,
    /// The write cache, once the file has one.
    cache: OnceCell<Arc<WriteCache>>,
    /// Where the next sequential read would start (readahead detection).
    next_offset: AtomicU64,
    /// When a WRITE last set the node's mtime (nanoseconds since the Unix
    /// epoch; 0: never, or reset by SETATTR). Lets most WRITEs skip the
    /// namespace write lock (see `MTIME_GRANULARITY`).
    mtime_ns: AtomicU64,
    /// Which chunks of the backup hold data, once known (for `used`).
    usage: OnceCell<usage::BackupUsage>,
}

/// One export at run time.
pub(crate) struct ExportState {
    info: Arc<Export>,
    ns: RwLock<Namespace>,
    files: DashMap<FileId, Arc<FileState>>,
    /// Write caches by publication (`None`: files outside any publication).
    sessions: DashMap<Option<String>, Arc<SessionCache>>,
    /// Held while a session folder is opened: two callers never open (and
    /// lock) one folder at once.
    opening: tokio::sync::Mutex<()>,
    default_cache_dir: PathBuf,
    /// Publications whose write cache folder is missing now (logged once).
    missing: DashMap<String, ()>,
}

/// Parsed restore points kept (see `Datastore::points`).
const POINTS_KEPT: usize = 16;

/// A std mutex's guard, even if a panic poisoned it: what the locks here
/// guard stays consistent across a panic (whole values are swapped in).
pub(in crate::datastore) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The datastore: every export, over one repository.
pub struct Datastore {
    repo: Repository,
    block_cache: Arc<BlockCache>,
    /// Parsed manifests of the points files are presented from: a tree
    /// point's manifest lists every file, and parsing it again for each
    /// file opened (a folder listing opens hundreds) cost a millisecond
    /// apiece. Restore points never change.
    points: std::sync::Mutex<lru::LruCache<String, Arc<crate::repo::RestorePoint>>>,
    config: DatastoreConfig,
    exports: HashMap<ExportId, Arc<ExportState>>,
    by_path: HashMap<String, ExportId>,
}

fn state_io(action: &str, path: &Path, e: std::io::Error) -> DatastoreError {
    tracing::error!(path = %path.display(), cause = %e, "{action} failed");
    DatastoreError::Io(e)
}

impl Datastore {
    /// Opens (or creates) the datastore state and loads every export.
    pub async fn open(repo: Repository, config: DatastoreConfig) -> DsResult<Datastore> {
        fs::create_dir_all(&config.state_dir)
            .map_err(|e| state_io("create state folder", &config.state_dir, e))?;
        let records = load_export_records(&config)?;
        let block_cache = BlockCache::new(config.block_cache_bytes);
        let mut exports = HashMap::new();
        let mut by_path = HashMap::new();
        for ec in &config.exports {
            let record = records
                .iter()
                .find(|r| r.path == ec.path)
                .ok_or(DatastoreError::Invalid)?;
            let dir = config.state_dir.join("exports").join(record.id.to_string());
            let path = dir.join("namespace.json");
            let ns = tokio::task::spawn_blocking(move || Namespace::open(path))
                .await
                .map_err(|e| state_io("open namespace", &dir, std::io::Error::other(e)))??;
            let state = Arc::new(ExportState {
                info: Arc::new(Export {
                    id: record.id,
                    instance: record.instance,
                    path: ec.path.clone(),
                    root: ROOT_ID,
                    allowed_clients: ec.allowed_clients.clone(),
                }),
                ns: RwLock::new(ns),
                files: DashMap::new(),
                sessions: DashMap::new(),
                opening: tokio::sync::Mutex::new(()),
                default_cache_dir: dir.join("cache"),
                missing: DashMap::new(),
            });
            info!(export = %ec.path, id = record.id, "export loaded");
            by_path.insert(ec.path.clone(), record.id);
            exports.insert(record.id, state);
        }
        let datastore = Datastore {
            repo,
            block_cache,
            points: std::sync::Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(POINTS_KEPT).unwrap_or(std::num::NonZeroUsize::MIN),
            )),
            config,
            exports,
            by_path,
        };
        datastore.check_cache_dirs().await?;
        Ok(datastore)
    }

    /// The repository behind every publication.
    pub fn repo(&self) -> &Repository {
        &self.repo
    }

    /// The shared block cache (for metrics).
    pub fn block_cache(&self) -> &Arc<BlockCache> {
        &self.block_cache
    }

    /// The export mounted at `path`.
    pub fn export_by_path(&self, path: &str) -> Option<Arc<Export>> {
        self.by_path.get(path).and_then(|id| self.export(*id))
    }

    pub(crate) fn state(&self, export: ExportId) -> DsResult<&Arc<ExportState>> {
        self.exports.get(&export).ok_or(DatastoreError::Stale)
    }

    /// Presents restore point `point` (any spec `repo.resolve` takes) as folder
    /// `name` of export `export_path`; writes go to `cache_dir` (default:
    /// `<cache_root>/<name>`). Returns the folder's file id.
    pub async fn publish(
        &self,
        export_path: &str,
        name: &str,
        point: &str,
        cache_dir: Option<PathBuf>,
    ) -> DsResult<FileId> {
        namespace::check_name(name)?;
        let id = *self
            .by_path
            .get(export_path)
            .ok_or(DatastoreError::NotFound)?;
        let export = self.state(id)?;
        let point = self.repo.resolve(point).await.map_err(|e| {
            warn!(cause = %e, "publish: restore point not found");
            DatastoreError::NotFound
        })?;
        let cache_dir = cache_dir.unwrap_or_else(|| self.config.cache_root.join(name));
        let mut ns = export.ns.write().await;
        if ns.publication(name).is_some() || ns.lookup(ROOT_ID, name).is_ok() {
            return Err(DatastoreError::Exists);
        }
        // The cache folder exists, with its marker, before the publication
        // does: from then on a missing folder means lost storage, never
        // "not used yet" (see `cache_dirs.rs`).
        self.prepare_cache_dir(cache_dir.clone(), name).await?;
        // Pinned before it is visible: gc must never remove what a client
        // can read. Pinned before the tree changes, so a failed pin leaves
        // nothing behind.
        self.repo
            .pin(&point.id, &pin_holder(&export.info, name))
            .await
            .map_err(|e| DatastoreError::Io(std::io::Error::other(e.to_string())))?;
        let folder = add_tree(&mut ns, name, &Tree::of(&point))?;
        ns.add_publication(Publication {
            name: name.to_string(),
            point: point.id.clone(),
            cache_dir,
            folder,
            cache_marked: true,
        });
        let durable = ns.commit().await?;
        drop(ns);
        durable.wait().await?;
        info!(export = %export_path, publication = %name, point = %point.id, "published");
        Ok(folder)
    }

    /// Removes a publication: its folder, everything clients wrote in it and its write caches.
    pub async fn unpublish(&self, export_path: &str, name: &str) -> DsResult<()> {
        let id = *self
            .by_path
            .get(export_path)
            .ok_or(DatastoreError::NotFound)?;
        let export = self.state(id)?;
        let mut ns = export.ns.write().await;
        let publication = ns
            .publication(name)
            .cloned()
            .ok_or(DatastoreError::NotFound)?;
        let removed = ns.remove_tree(publication.folder)?;
        ns.remove_publication(name);
        let durable = ns.commit().await?;
        drop(ns);
        durable.wait().await?;
        for node in removed {
            export.files.remove(&node.id);
        }
        let session = export.sessions.remove(&Some(name.to_string()));
        drop(session);
        if let Err(e) = self
            .repo
            .unpin(&publication.point, &pin_holder(&export.info, name))
            .await
        {
            warn!(cause = %e, publication = %name, "could not unpin restore point");
        }
        let dir = publication.cache_dir.clone();
        let removed = tokio::task::spawn_blocking(move || fs::remove_dir_all(&dir))
            .await
            .map_err(|e| {
                state_io(
                    "delete write cache",
                    &publication.cache_dir,
                    std::io::Error::other(e),
                )
            })?;
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(state_io("delete write cache", &publication.cache_dir, e)),
        }
        info!(export = %export_path, publication = %name, "unpublished");
        Ok(())
    }

    /// Makes every write cache durable and checkpoints every namespace, for
    /// a clean stop: UNSTABLE writes that no COMMIT covered yet then survive
    /// a restart too (clients such as libnfs do not resend writes when the
    /// verifier changes), and so do the mtimes WRITEs set, which are not
    /// logged one by one.
    pub async fn flush_all(&self) -> DsResult<()> {
        for export in self.exports.values() {
            let caches: Vec<Arc<WriteCache>> = export
                .files
                .iter()
                .filter_map(|f| f.value().cache.get().cloned())
                .collect();
            for cache in caches {
                cache.commit().await.map_err(io::cache_err)?;
            }
            export.ns.write().await.checkpoint().await?;
        }
        Ok(())
    }

    /// Names and restore points of the publications of an export.
    pub async fn publications(&self, export_path: &str) -> DsResult<Vec<(String, String)>> {
        let id = *self
            .by_path
            .get(export_path)
            .ok_or(DatastoreError::NotFound)?;
        let ns = self.state(id)?.ns.read().await;
        Ok(ns
            .publications()
            .map(|p| (p.name.clone(), p.point.clone()))
            .collect())
    }
}

/// The pin holder of a publication: unique per export instance and name.
fn pin_holder(export: &Export, publication: &str) -> String {
    format!("{:016x}-{publication}", export.instance)
}

fn load_export_records(config: &DatastoreConfig) -> DsResult<Vec<ExportRecord>> {
    let path = config.state_dir.join("exports.json");
    let mut records: Vec<ExportRecord> = match fs::read(&path) {
        Ok(raw) => serde_json::from_slice(&raw).map_err(|e| {
            state_io(
                "parse export records",
                &path,
                std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            )
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(state_io("read export records", &path, e)),
    };
    let mut changed = false;
    for ec in &config.exports {
        if !records.iter().any(|r| r.path == ec.path) {
            let id = records.iter().map(|r| r.id).max().unwrap_or(0) + 1;
            records.push(ExportRecord {
                path: ec.path.clone(),
                id,
                instance: rand::random(),
            });
            changed = true;
        }
    }
    if changed {
        let json = serde_json::to_vec_pretty(&records)
            .map_err(|e| state_io("encode export records", &path, std::io::Error::other(e)))?;
        crate::fsutil::write_atomic(&path, &json)
            .map_err(|e| state_io("save export records", &path, e))?;
    }
    Ok(records)
}

/// Adds a restore point's tree under the export root as folder `name`: its
/// folders, files (read through to the backup) and symlinks, with the
/// modes, owners and times the backup recorded. The folder gets the root
/// entry's attributes. Folders' times are set last, since adding an entry
/// touches its folder.
fn add_tree(ns: &mut Namespace, name: &str, tree: &Tree) -> DsResult<FileId> {
    let attrs = |e: &TreeEntry| {
        let mtime = io::time_of_nanos(e.mtime_ns);
        Node {
            mode: e.mode & 0o7777,
            uid: e.uid,
            gid: e.gid,
            atime: mtime,
            mtime,
            ctime: mtime,
            ..Node::template(Content::Dir, 0, Some(name.to_string()))
        }
    };
    let root = tree.root();
    let folder = ns.add(ROOT_ID, name, Content::Dir, &attrs(root))?;
    let mut folders: HashMap<&str, FileId> = HashMap::from([("", folder)]);
    for entry in &tree.entries()[1..] {
        // Sorted by path, the root first: a folder always comes before its
        // entries, so its id is known.
        let parent = entry
            .parent()
            .and_then(|p| folders.get(p))
            .copied()
            .ok_or(DatastoreError::Invalid)?;
        let content = match &entry.content {
            EntryContent::Folder => Content::Dir,
            EntryContent::File(_) => Content::Presented {
                file: entry.path.clone(),
                base_size: entry.size,
            },
            EntryContent::Symlink(target) => Content::Symlink {
                target: target.clone(),
            },
        };
        let id = ns.add(parent, entry.name(), content, &attrs(entry))?;
        if matches!(entry.content, EntryContent::Folder) {
            folders.insert(&entry.path, id);
        }
    }
    for entry in tree.entries() {
        if let Some(id) = folders.get(entry.path.as_str()) {
            let at = io::time_of_nanos(entry.mtime_ns);
            let node = ns.get_mut(*id)?;
            node.mtime = at;
            node.ctime = at;
        }
    }
    Ok(folder)
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tree_tests;
