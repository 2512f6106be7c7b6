//! The machinery of the datastore's data paths (the `FileOps` methods read,
//! write and commit are in `ops.rs`): a file's runtime state, its write cache
//! created on first need, readahead, and the mapping of repository and cache
//! errors. Reads come from the cache first, else the backup through the block
//! cache; writes go to the write cache with copy-on-write of partial blocks
//! from the backup.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tracing::error;

use super::namespace::{Content, Node};
use super::{Datastore, DatastoreError, DsResult, ExportId, ExportState, FileId, FileState};
use crate::cache::{BaseRead, CacheError, Origin, SessionCache, WriteCache, DEFAULT_BLOCK_SIZE};
use crate::repo::{FileReader, RepoError};

/// A WRITE updates the file's mtime and ctime only when the last update by
/// a WRITE is at least this old. Taking the namespace write lock on every
/// WRITE serialized all writes of all files on it; Linux file systems stamp
/// times from a clock of similar (jiffy, 1-10 ms) granularity, so clients
/// see nothing they would not see on a local disk.
pub(super) const MTIME_GRANULARITY: Duration = Duration::from_millis(1);

/// Nanoseconds since the Unix epoch (0 for earlier times).
pub(super) fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos().min(u128::from(u64::MAX)) as u64)
}

/// A time from nanoseconds since the Unix epoch (negative: before it).
pub(super) fn time_of_nanos(ns: i64) -> std::time::SystemTime {
    let epoch = std::time::UNIX_EPOCH;
    let magnitude = std::time::Duration::from_nanos(ns.unsigned_abs());
    if ns >= 0 {
        epoch + magnitude
    } else {
        epoch - magnitude
    }
}

/// The backup under a presented file, as the write cache reads it.
pub(super) struct Base<'a>(pub(super) &'a FileReader);

impl BaseRead for Base<'_> {
    async fn read_base(&self, offset: u64, len: usize) -> std::io::Result<Bytes> {
        self.0.read_at(offset, len).await.map_err(|e| repo_io(&e))
    }
}

/// A repository failure as an I/O error, logged with what failed (the chunk id
/// of a corrupt chunk): the client gets EIO, never wrong bytes.
fn repo_io(e: &RepoError) -> std::io::Error {
    if e.is_transient() {
        // The store is unreachable (already retried in the store): the
        // client is told to retry, not that the data is bad.
        tracing::warn!(cause = %e, "backup store unavailable; client asked to retry");
        return std::io::Error::new(std::io::ErrorKind::TimedOut, e.to_string());
    }
    error!(cause = %e, "read from backup failed");
    std::io::Error::other(e.to_string())
}

/// A repository failure as the datastore's error: transient store failures
/// become JUKEBOX (retry later), everything else EIO.
pub(super) fn repo_err(e: &RepoError) -> DatastoreError {
    let io = repo_io(e);
    if io.kind() == std::io::ErrorKind::TimedOut {
        DatastoreError::Jukebox
    } else {
        DatastoreError::Io(io)
    }
}

pub(super) fn cache_err(e: CacheError) -> DatastoreError {
    error!(cause = %e, "write cache failed");
    match e {
        CacheError::Io { source, .. }
            if matches!(
                source.raw_os_error(),
                Some(libc::ENOSPC) | Some(libc::EDQUOT)
            ) =>
        {
            DatastoreError::NoSpace
        }
        // The cache file's filesystem has a smaller limit (ext4: 16 TiB).
        CacheError::Io { source, .. } if source.raw_os_error() == Some(libc::EFBIG) => {
            DatastoreError::TooBig
        }
        CacheError::TooLarge { .. } => DatastoreError::TooBig,
        // A backup read under a copy-on-write that found the store unreachable.
        CacheError::Io { source, .. } if source.kind() == std::io::ErrorKind::TimedOut => {
            DatastoreError::Jukebox
        }
        // The cache's files went away under it (its storage unmounted), or
        // the process is out of descriptors for a moment: retry later.
        CacheError::Io { source, .. }
            if source.kind() == std::io::ErrorKind::NotFound
                || matches!(
                    source.raw_os_error(),
                    Some(libc::EMFILE) | Some(libc::ENFILE)
                ) =>
        {
            DatastoreError::Jukebox
        }
        other => DatastoreError::Io(std::io::Error::other(other.to_string())),
    }
}

/// Refuses data operations on what has no data: folders (EISDIR) and
/// symlinks (EINVAL, as for `read(2)` on a link).
pub(super) fn check_regular(node: &Node) -> DsResult<()> {
    match node.content {
        Content::Dir => Err(DatastoreError::IsDir),
        Content::Symlink { .. } => Err(DatastoreError::Invalid),
        Content::Presented { .. } | Content::New => Ok(()),
    }
}

/// Name of a file's cache inside its session folder: the file id, so renames
/// never move cache files.
pub(super) fn cache_key(id: FileId) -> String {
    format!("f{id:016x}")
}

impl FileState {
    /// Logical size: the cache's once the file has one, else the backup's.
    pub(super) fn size(&self, node: &Node) -> u64 {
        match (self.cache.get(), &node.content) {
            (Some(c), _) => c.len(),
            (None, Content::Presented { base_size, .. }) => *base_size,
            _ => 0,
        }
    }

    /// Bytes this file really occupies: the backup's chunks holding data
    /// that are still visible, plus the write cache's blocks.
    pub(super) fn used(&self, node: &Node) -> u64 {
        // A truncate hides the backup beyond the cache's `base_len` for good,
        // even when the file is extended again (sparse), so that is the most
        // of the backup the file can still show.
        let (base, cached) = match (self.cache.get(), &node.content) {
            (Some(c), _) => (c.base_len(), c.bytes_used()),
            (None, Content::Presented { base_size, .. }) => (*base_size, 0),
            (None, _) => (0, 0),
        };
        // All-zero chunks are holes in the repository: they hold nothing.
        let held = match self.usage.get() {
            Some(usage) => usage.data_bytes_below(base),
            None => base,
        };
        held.saturating_add(cached).min(self.size(node).max(cached))
    }
}

impl Datastore {
    /// The write cache folder of a publication (`None`: outside publications).
    pub(super) async fn session(
        &self,
        export: &ExportState,
        publication: &Option<String>,
    ) -> DsResult<Arc<SessionCache>> {
        if let Some(s) = export.sessions.get(publication) {
            return Ok(s.clone());
        }
        let _opening = export.opening.lock().await;
        if let Some(s) = export.sessions.get(publication) {
            return Ok(s.clone());
        }
        let session = match publication {
            Some(name) => {
                let p = export
                    .ns
                    .read()
                    .await
                    .publication(name)
                    .cloned()
                    .ok_or(DatastoreError::Stale)?;
                // Never an empty cache in place of a missing one.
                self.check_cache_dir(export, &p).await?;
                SessionCache::open_existing(p.cache_dir).await
            }
            None => SessionCache::open(export.default_cache_dir.clone()).await,
        };
        let session = Arc::new(session.map_err(cache_err)?);
        Ok(export
            .sessions
            .entry(publication.clone())
            .or_insert(session)
            .clone())
    }

    /// Runtime state of a file node: backup reader and (existing) write cache.
    pub(super) async fn file_state(
        &self,
        export: &ExportState,
        node: &Node,
    ) -> DsResult<Arc<FileState>> {
        if let Some(st) = export.files.get(&node.id) {
            return Ok(st.clone());
        }
        let base = match &node.content {
            Content::Presented { file, .. } => {
                let point_id = {
                    let ns = export.ns.read().await;
                    node.publication
                        .as_ref()
                        .and_then(|p| ns.publication(p))
                        .map(|p| p.point.clone())
                        .ok_or(DatastoreError::Stale)?
                };
                let point = self.point(&point_id).await?;
                let reader = FileReader::new(&self.repo, &point, file)
                    .map_err(|e| repo_err(&e))?
                    .with_cache(self.block_cache.clone());
                Some(reader)
            }
            _ => None,
        };
        let session = self.session(export, &node.publication).await?;
        let cache = tokio::sync::OnceCell::new();
        if let Some(c) = session.get(&cache_key(node.id)).await {
            let _ = cache.set(c);
        }
        let st = Arc::new(FileState {
            base,
            cache,
            next_offset: Default::default(),
            mtime_ns: Default::default(),
            usage: Default::default(),
        });
        Ok(export.files.entry(node.id).or_insert(st).clone())
    }

    /// Restore point `id`, parsed once while it stays among the recently used.
    async fn point(&self, id: &str) -> DsResult<Arc<crate::repo::RestorePoint>> {
        if let Some(p) = super::lock(&self.points).get(id) {
            return Ok(p.clone());
        }
        // Two first opens may both parse it; the second copy replaces the first.
        let point = Arc::new(self.repo.point(id).await.map_err(|e| repo_err(&e))?);
        super::lock(&self.points).put(id.to_string(), point.clone());
        Ok(point)
    }

    /// The file's write cache, created on first need.
    pub(super) async fn ensure_cache(
        &self,
        export: &ExportState,
        node: &Node,
        st: &FileState,
    ) -> DsResult<Arc<WriteCache>> {
        let cache = st
            .cache
            .get_or_try_init(|| async {
                let (size, origin) = match &node.content {
                    Content::Presented { base_size, .. } => (*base_size, Origin::Backup),
                    _ => (0, Origin::New),
                };
                let session = self.session(export, &node.publication).await?;
                session
                    .get_or_create(&cache_key(node.id), size, DEFAULT_BLOCK_SIZE, origin)
                    .await
                    .map_err(cache_err)
            })
            .await?;
        Ok(cache.clone())
    }

    /// A file node and its runtime state, refusing folders.
    pub(super) async fn regular(
        &self,
        export: ExportId,
        id: FileId,
    ) -> DsResult<(Arc<ExportState>, Node, Arc<FileState>)> {
        let state = self.state(export)?.clone();
        let node = state.ns.read().await.get(id)?.clone();
        check_regular(&node)?;
        let st = self.file_state(&state, &node).await?;
        Ok((state, node, st))
    }

    /// The runtime state and size of a file for READ. Once the file has its
    /// state, this only looks the node up under the namespace read lock:
    /// no clone of the node (name, publication) per READ.
    pub(super) async fn read_state(
        &self,
        export: ExportId,
        id: FileId,
    ) -> DsResult<(Arc<FileState>, u64)> {
        let state = self.state(export)?;
        {
            let ns = state.ns.read().await;
            let node = ns.get(id)?;
            check_regular(node)?;
            if let Some(st) = state.files.get(&id).map(|e| Arc::clone(e.value())) {
                let size = st.size(node);
                return Ok((st, size));
            }
        }
        let (_, node, st) = self.regular(export, id).await?;
        let size = st.size(&node);
        Ok((st, size))
    }

    /// Prefetches the chunks after a read that continues the previous one.
    pub(super) async fn readahead(&self, st: &FileState, base: &FileReader, offset: u64, len: u64) {
        let end = offset + len;
        let previous = st.next_offset.swap(end, Ordering::Relaxed);
        if previous != offset || self.config.readahead_chunks == 0 {
            return;
        }
        let cs = base.chunk_size();
        let first = end / cs + 1;
        let last = (first + self.config.readahead_chunks).min(base.chunk_count());
        for index in first..last {
            base.prefetch(index).await;
        }
    }
}
