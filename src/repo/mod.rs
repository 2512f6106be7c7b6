//! `repo`: backup chains of VM folders and folder trees in a deduplicated,
//! content-addressed repository.
//!
//! # Restore points
//! A restore point is a VM folder (flat files with roles, manifest version 1)
//! or a folder tree (every folder, file and symlink with mode, owner and
//! mtime, manifest version 2; a PostgreSQL data folder): see [`manifest`].
//! [`backup`] picks the kind ([`BackupOptions::tree`]); [`Repository::restore`]
//! writes either back. Readers present any point the same way:
//! - [`RestorePoint::tree`] gives a [`Tree`]: every [`TreeEntry`] (path,
//!   [`EntryKind`], mode, uid, gid, mtime in ns, size, symlink target, chunk
//!   index), lookup by path, the children of a folder. A VM point is a flat
//!   tree.
//! - [`FileReader::new`]`(repo, point, path)` reads a file by its path in the
//!   tree (by its name in a VM point), any offset in O(1) whatever the chain.
//!
//! # Layout (on any [`Store`])
//! ```text
//! config.json                 format version, chunk size, repository id
//! chunks/<2 hex>/<64 hex>     chunk objects (format.rs), keyed by BLAKE3 of the plain data
//! pages/<2 hex>/<64 hex>      index pages (format.rs), keyed by BLAKE3 of the page
//! points/<id>.json            restore point manifests (manifest.rs)
//! pins/<id>/<holder>          a live session reads restore point <id> (pins.rs)
//! checks/<id>/boot.json       result of the last verification boot of <id>, and
//! checks/<id>/boot.png        its console screenshot (boot_record.rs)
//! lock                        local stores only: flock, shared by backups, exclusive for gc
//! locks/exclusive.json        S3: gc's lease (store/lease.rs)
//! locks/shared/<holder>.json  S3: a backup's or forget's lease
//! ```
//!
//! # Rules
//! - Reads never walk a chain: every restore point has a complete index.
//! - A manifest is published last (conditional put after a store sync), so a
//!   killed backup leaves only unreferenced chunks, which `gc` sweeps.
//! - Backups take the repository lock shared and `gc` exclusive, so gc never
//!   removes a chunk that a running backup decided to reuse. On S3 the lock is
//!   a set of leases visible to every server; a backup whose lease was not
//!   renewed in time does not publish, and gc spares unreferenced objects
//!   younger than the store's grace period (chunks of a backup that lost its
//!   lease but is still writing).
//! - A pinned restore point (published by a live session) cannot be
//!   forgotten, so `gc` never removes a chunk a session can read.
//! - Nothing here writes into an existing object: chunks and pages are
//!   put-if-absent, manifests are created once and only removed by `forget`.
//!
//! | operation | may run with |
//! |---|---|
//! | backup | backup, restore, verify, read, forget |
//! | gc | restore, verify, read of points it keeps |

mod backup;
pub mod block_cache;
mod boot_record;
pub mod chunk;
pub mod format;
mod gc;
pub mod index;
pub mod manifest;
mod pins;
mod points;
mod reader;
mod restore;
pub mod source;
pub mod tree;
mod tree_backup;
mod tree_restore;
mod tree_scan;
mod verify;

pub use backup::{backup, BackupOptions};
pub use block_cache::BlockCache;
pub use boot_record::{BootRecord, BootVerdict};
pub use chunk::ChunkId;
pub use gc::{GcOptions, GcReport};
pub use index::{IndexPage, PageId};
pub use manifest::{resolve_in, BackupStats, FileEntry, FileKind, PointKind, RestorePoint};
pub use reader::FileReader;
pub use tree::{ChunkIndex, EntryContent, EntryCounts, EntryKind, IndexRef, Tree, TreeEntry};
pub use verify::{Problem, ProblemKind, VerifyReport};

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use lru::LruCache;
use serde::{Deserialize, Serialize};

use crate::store::{
    CachedStore, DiskCache, LocalStore, LockGuard, LockMode, PutOutcome, Store, StoreError,
    StoreLocation,
};
use format::{DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, REPO_FORMAT_VERSION};

/// Key of the repository configuration object.
const CONFIG_KEY: &str = "config.json";
/// Index pages kept decoded in memory: 4096 × 32 KiB = 128 MiB at most, enough
/// for the indexes of 4 TiB of disks at 1 MiB chunks.
const PAGE_CACHE_PAGES: usize = 4096;

/// Everything that can go wrong in the repository.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No repository at that location.
    #[error("no revive repository at '{location}' (run `revive init --repo {location}` first)")]
    NotARepository { location: String },
    /// `init` on a location that already holds a repository.
    #[error("a revive repository already exists at '{location}'")]
    AlreadyExists { location: String },
    /// A repository written by a different format version.
    #[error(
        "repository '{location}' has format version {found}; this revive reads version {supported}"
    )]
    FormatVersion {
        location: String,
        found: u32,
        supported: u32,
    },
    /// A chunk size outside the supported range.
    #[error("chunk size {size} is not a power of two between 64 KiB and 4 MiB")]
    ChunkSize { size: u64 },
    /// The backup source does not exist or cannot be read.
    #[error("read backup source '{path}' - {source}")]
    Source {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A source that is neither a folder nor a regular file, or an empty folder.
    #[error("backup source '{path}' - {reason}")]
    BadSource { path: PathBuf, reason: String },
    /// A VMDK descriptor whose extent file is missing.
    #[error("VMDK descriptor '{descriptor}' names extent '{extent}', which is missing")]
    MissingExtent { descriptor: PathBuf, extent: String },
    /// No restore point matches.
    #[error("no restore point matches '{spec}'")]
    PointNotFound { spec: String },
    /// A prefix matching several points.
    #[error("restore point '{spec}' is ambiguous: it matches {candidates}")]
    AmbiguousPoint { spec: String, candidates: String },
    /// A chunk whose stored bytes are wrong.
    #[error("chunk {id} is corrupt - {reason}")]
    CorruptChunk { id: ChunkId, reason: String },
    /// A chunk referenced by an index but absent from the store.
    #[error("chunk {id} is missing from the repository")]
    MissingChunk { id: ChunkId },
    /// A page, manifest or config object that does not parse.
    #[error("object '{key}' is corrupt - {reason}")]
    CorruptObject { key: String, reason: String },
    /// Compression failed (out of memory, in practice).
    #[error("compress chunk - {0}")]
    Compress(#[source] std::io::Error),
    /// Writing restored files failed.
    #[error("{action} '{path}' - {source}")]
    Restore {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A restore destination that already holds a file of the restore point.
    #[error("restore destination '{path}' already exists; remove it or choose another folder")]
    DestinationExists { path: PathBuf },
    /// A worker task panicked or was cancelled: a bug, reported instead of crashing.
    #[error("internal error - {what}")]
    Internal { what: String },
    /// `forget` of a restore point that live sessions read.
    #[error("restore point {point} is in use by {holders}; stop those sessions first")]
    Pinned { point: String, holders: String },
    /// A pin holder name that cannot be a store key.
    #[error("invalid pin holder '{holder}'")]
    BadPin { holder: String },
    /// A file name not found in a restore point.
    #[error("restore point {point} has no file '{name}'")]
    NoSuchFile { point: String, name: String },
    /// A path of a tree point that is not a regular file.
    #[error("restore point {point}: '{path}' is a {kind}, not a file")]
    NotAFile {
        point: String,
        path: String,
        kind: &'static str,
    },
    /// A manifest written by a newer revive.
    #[error(
        "restore point {point} has manifest version {found}; this revive reads versions up to \
         {supported} (upgrade revive)"
    )]
    ManifestVersion {
        point: String,
        found: u32,
        supported: u32,
    },
    /// A store that accepted a second put-if-absent of the same key: it
    /// ignores conditional writes, so two writers could overwrite each other.
    #[error(
        "store '{location}' does not honour conditional writes (a second put-if-absent of '{key}' \
         was accepted instead of failing with 412 Precondition Failed); revive needs a store that \
         supports If-None-Match on PUT (AWS S3, Ceph RGW 18+, MinIO, moto)"
    )]
    NoConditionalWrites { location: String, key: String },
}

impl RepoError {
    /// True when retrying later may succeed (the store was unreachable).
    pub fn is_transient(&self) -> bool {
        matches!(self, RepoError::Store(e) if e.is_transient())
    }
}

/// `config.json`: fixed at `init`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoConfig {
    /// Layout version; see [`REPO_FORMAT_VERSION`].
    pub format_version: u32,
    /// Random id of this repository.
    pub id: String,
    /// Chunk size of every disk index.
    pub chunk_size: u32,
    /// When `init` ran.
    pub created: DateTime<Utc>,
}

/// Checks a chunk size chosen at `init`.
pub fn check_chunk_size(size: u64) -> Result<u32, RepoError> {
    if size.is_power_of_two() && (MIN_CHUNK_SIZE as u64..=MAX_CHUNK_SIZE as u64).contains(&size) {
        Ok(size as u32)
    } else {
        Err(RepoError::ChunkSize { size })
    }
}

/// An open repository; cheap to clone and share between tasks.
#[derive(Clone)]
pub struct Repository {
    store: Arc<dyn Store>,
    config: RepoConfig,
    /// Decoded index pages: they are immutable, so caching them is always safe.
    pages: Arc<Mutex<LruCache<PageId, Arc<IndexPage>>>>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("store", &self.store.describe())
            .field("config", &self.config)
            .finish()
    }
}

impl Repository {
    /// Creates a new repository in an empty store, after checking that the
    /// store honours conditional writes.
    pub async fn init(store: Arc<dyn Store>, chunk_size: u32) -> Result<Self, RepoError> {
        let chunk_size = check_chunk_size(chunk_size as u64)?;
        if store.exists(CONFIG_KEY).await? {
            return Err(RepoError::AlreadyExists {
                location: store.describe(),
            });
        }
        probe_conditional_writes(&*store).await?;
        let config = RepoConfig {
            format_version: REPO_FORMAT_VERSION,
            id: format!("{:016x}", rand::random::<u64>()),
            chunk_size,
            created: Utc::now(),
        };
        let json = serde_json::to_vec_pretty(&config).map_err(|e| RepoError::CorruptObject {
            key: CONFIG_KEY.into(),
            reason: e.to_string(),
        })?;
        match store.put_if_absent(CONFIG_KEY, Bytes::from(json)).await? {
            PutOutcome::Created => {}
            PutOutcome::AlreadyExists => {
                return Err(RepoError::AlreadyExists {
                    location: store.describe(),
                })
            }
        }
        store.sync().await?;
        Ok(Self::with_config(store, config))
    }

    /// Opens an existing repository and checks its format version.
    pub async fn open(store: Arc<dyn Store>) -> Result<Self, RepoError> {
        let raw = match store.get(CONFIG_KEY).await {
            Ok(raw) => raw,
            Err(StoreError::NotFound { .. }) => {
                return Err(RepoError::NotARepository {
                    location: store.describe(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let config: RepoConfig =
            serde_json::from_slice(&raw).map_err(|e| RepoError::CorruptObject {
                key: CONFIG_KEY.into(),
                reason: e.to_string(),
            })?;
        if config.format_version != REPO_FORMAT_VERSION {
            return Err(RepoError::FormatVersion {
                location: store.describe(),
                found: config.format_version,
                supported: REPO_FORMAT_VERSION,
            });
        }
        check_chunk_size(config.chunk_size as u64)?;
        Ok(Self::with_config(store, config))
    }

    /// Opens the repository at `location` (a folder or `s3://bucket/prefix`),
    /// with the on-disk chunk cache of `options` in front of the store.
    pub async fn open_at(
        location: &StoreLocation,
        options: &OpenOptions,
    ) -> Result<Self, RepoError> {
        if let StoreLocation::Local(path) = location {
            // Opening a local store creates its folder: do not leave an empty
            // folder behind a typo.
            if !path.join(CONFIG_KEY).exists() {
                return Err(RepoError::NotARepository {
                    location: path.display().to_string(),
                });
            }
        }
        let mut store = location.open()?;
        if let Some((dir, bytes)) = &options.chunk_cache {
            let cache = DiskCache::open(dir, *bytes)?;
            // Chunks and index pages are named by their content: immutable.
            store = Arc::new(CachedStore::new(store, cache, &["chunks/", "pages/"]));
        }
        Self::open(store).await
    }

    /// Opens the repository in a local folder.
    pub async fn open_local(path: impl Into<PathBuf>) -> Result<Self, RepoError> {
        let path = path.into();
        if !path.join(CONFIG_KEY).exists() {
            return Err(RepoError::NotARepository {
                location: path.display().to_string(),
            });
        }
        Self::open(Arc::new(LocalStore::open(path)?)).await
    }

    fn with_config(store: Arc<dyn Store>, config: RepoConfig) -> Self {
        let cap = NonZeroUsize::new(PAGE_CACHE_PAGES).unwrap_or(NonZeroUsize::MIN);
        Repository {
            store,
            config,
            pages: Arc::new(Mutex::new(LruCache::new(cap))),
        }
    }

    /// The store underneath.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// The repository's fixed configuration.
    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    /// Chunk size of this repository.
    pub fn chunk_size(&self) -> u32 {
        self.config.chunk_size
    }

    /// Takes the repository lock; see the module doc for who holds which mode.
    pub async fn lock(&self, mode: LockMode) -> Result<Box<dyn LockGuard>, RepoError> {
        Ok(self.store.try_lock(mode).await?)
    }

    /// Drops a restore point; its chunks stay until `gc`.
    ///
    /// A server may publish the point at the same moment: it writes its pin
    /// and then re-reads the manifest ([`Repository::pin`]). So after deleting
    /// the manifest, the pins are listed again, and a pin that appeared
    /// meanwhile puts the manifest back. The shared lock keeps gc out while
    /// the manifest is briefly gone.
    pub async fn forget(&self, id: &str) -> Result<(), RepoError> {
        let lock = self.lock(LockMode::Shared).await?;
        let key = RestorePoint::key_of(id);
        let manifest = match self.store.get(&key).await {
            Ok(raw) => raw,
            Err(StoreError::NotFound { .. }) | Err(StoreError::InvalidKey { .. }) => {
                return Err(RepoError::PointNotFound { spec: id.into() })
            }
            Err(e) => return Err(e.into()),
        };
        let holders = self.pins(id).await?;
        if !holders.is_empty() {
            return Err(RepoError::Pinned {
                point: id.to_string(),
                holders: holders.join(", "),
            });
        }
        self.store.delete(&key).await?;
        let holders = self.pins(id).await?;
        if !holders.is_empty() {
            self.store.put_if_absent(&key, manifest).await?;
            self.store.sync().await?;
            return Err(RepoError::Pinned {
                point: id.to_string(),
                holders: holders.join(", "),
            });
        }
        self.drop_boot_record(id).await?;
        lock.release().await?;
        Ok(())
    }

    /// Reads and decodes an index page (cached).
    pub async fn page(&self, id: &PageId) -> Result<Arc<IndexPage>, RepoError> {
        if let Some(p) = self.lock_pages().get(id) {
            return Ok(p.clone());
        }
        let raw = match self.store.get(&id.key()).await {
            Ok(raw) => raw,
            Err(StoreError::NotFound { .. }) => {
                return Err(RepoError::CorruptObject {
                    key: id.key(),
                    reason: "index page is missing".into(),
                })
            }
            Err(e) => return Err(e.into()),
        };
        let page = Arc::new(IndexPage::decode(id, &raw)?);
        self.lock_pages().put(*id, page.clone());
        Ok(page)
    }

    /// Reads a chunk and checks its hash; holes come back as zeros of `len`.
    /// A copy that fails the check is evicted from any local cache and read
    /// once more from the store itself before the chunk is called corrupt.
    pub async fn read_chunk(&self, id: &ChunkId) -> Result<Bytes, RepoError> {
        match self.read_chunk_once(id).await {
            Err(RepoError::CorruptChunk { .. }) => {
                self.store.evict_copy(&id.key()).await;
                self.read_chunk_once(id).await
            }
            other => other,
        }
    }

    async fn read_chunk_once(&self, id: &ChunkId) -> Result<Bytes, RepoError> {
        let raw = match self.store.get(&id.key()).await {
            Ok(raw) => raw,
            Err(StoreError::NotFound { .. }) => return Err(RepoError::MissingChunk { id: *id }),
            Err(e) => return Err(e.into()),
        };
        let id = *id;
        // On a thread that serves a client itself (NBD, FUSE) the decode
        // runs in place: no hand-off on a cold read.
        crate::fsutil::blocking(move || chunk::decode(&id, &raw))
            .await
            .map_err(|e| RepoError::Internal {
                what: format!("decode chunk {id}: {e}"),
            })?
    }

    fn lock_pages(&self) -> std::sync::MutexGuard<'_, LruCache<PageId, Arc<IndexPage>>> {
        // A panic while holding the lock cannot leave the LRU inconsistent for us.
        self.pages.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Writes a probe object put-if-absent twice: the second write must be
/// refused. A store that silently overwrites would let two backups or two gc
/// runs overwrite each other's manifests and leases.
async fn probe_conditional_writes(store: &dyn Store) -> Result<(), RepoError> {
    let key = format!("probe/{:016x}", rand::random::<u64>());
    let first = store
        .put_if_absent(&key, Bytes::from_static(b"first"))
        .await?;
    let second = store
        .put_if_absent(&key, Bytes::from_static(b"second"))
        .await;
    // Clean up whatever the answer was.
    store.delete(&key).await?;
    match (first, second?) {
        (PutOutcome::Created, PutOutcome::AlreadyExists) => Ok(()),
        _ => Err(RepoError::NoConditionalWrites {
            location: store.describe(),
            key,
        }),
    }
}

/// How to open a repository beyond its location.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// On-disk cache of chunks and index pages: folder and byte budget.
    /// For long-running readers (`serve`); one-shot commands such as `verify`
    /// must read the store itself.
    pub chunk_cache: Option<(PathBuf, u64)>,
}

/// The chunk size used when `init` is not told one.
pub const fn default_chunk_size() -> u32 {
    DEFAULT_CHUNK_SIZE
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::store::{CachedStore, DiskCache, LocalStore};

    #[tokio::test]
    async fn a_damaged_cached_chunk_is_refetched_from_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let backing: Arc<dyn Store> = Arc::new(LocalStore::open(dir.path().join("s")).unwrap());
        let plain: Vec<u8> = (0..100_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let id = ChunkId::of(&plain);
        Repository::init(backing.clone(), 1 << 20).await.unwrap();
        backing
            .put(&id.key(), chunk::encode(&plain).unwrap())
            .await
            .unwrap();
        let cdir = dir.path().join("cache");
        let cached = CachedStore::new(
            backing.clone(),
            DiskCache::open(&cdir, 1 << 30).unwrap(),
            &["chunks/"],
        );
        let repo = Repository::open(Arc::new(cached.clone())).await.unwrap();
        assert_eq!(repo.read_chunk(&id).await.unwrap(), plain);
        // The copy is written behind the read.
        for _ in 0..200 {
            if !cached.cache().is_empty() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        // Damage the cached copy only.
        let file = cdir.join(id.key());
        let mut bytes = std::fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        std::fs::write(&file, &bytes).unwrap();
        assert_eq!(repo.read_chunk(&id).await.unwrap(), plain);
        assert_eq!(cached.cache().counters.misses.load(Ordering::Relaxed), 2);
    }
}
