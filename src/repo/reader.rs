//! Random access to one file of a restore point, straight from the chunks.
//!
//! Offset → chunk is arithmetic plus one (cached) index page, or a slot of
//! the chunk list a small tree file keeps in its manifest entry, so a read
//! costs the same in the first restore point of a chain and in the
//! five-hundredth.

use std::sync::{Arc, OnceLock};

use bytes::{Bytes, BytesMut};

use super::block_cache::BlockCache;
use super::chunk::ChunkId;
use super::format::MAX_CHUNK_SIZE;
use super::index::locate;
use super::manifest::{PointKind, RestorePoint};
use super::tree::{ChunkIndex, EntryContent};
use super::{RepoError, Repository};

/// Reads one file of one restore point.
#[derive(Debug, Clone)]
pub struct FileReader {
    repo: Repository,
    /// Path in the tree (a VM point: the file name), for errors.
    path: String,
    size: u64,
    index: ChunkIndex,
    chunk_size: u64,
    /// Shared cache of verified chunks; `None` reads the store every time.
    cache: Option<Arc<BlockCache>>,
}

/// One chunk's worth of zeros, shared: holes are served without allocating.
fn zeros(len: usize) -> Bytes {
    static ZEROS: OnceLock<Bytes> = OnceLock::new();
    ZEROS
        .get_or_init(|| Bytes::from(vec![0u8; MAX_CHUNK_SIZE as usize]))
        .slice(..len)
}

impl FileReader {
    /// Opens the file at `path` of `point`: a path in the tree of a tree
    /// point (`base/1/1259`), the file name in a VM point.
    ///
    /// # Errors
    /// [`RepoError::NoSuchFile`] when there is no such entry,
    /// [`RepoError::NotAFile`] when it is a folder or a symlink.
    pub fn new(repo: &Repository, point: &RestorePoint, path: &str) -> Result<Self, RepoError> {
        let missing = || RepoError::NoSuchFile {
            point: point.id.clone(),
            name: path.to_string(),
        };
        let (size, index) = match point.kind {
            PointKind::Vm => {
                let f = point.file(path).ok_or_else(missing)?;
                (f.size, ChunkIndex::Pages(f.pages.clone()))
            }
            PointKind::Tree => {
                let e = point.entry(path).ok_or_else(missing)?;
                match &e.content {
                    EntryContent::File(index) => (e.size, index.clone()),
                    _ => {
                        return Err(RepoError::NotAFile {
                            point: point.id.clone(),
                            path: path.to_string(),
                            kind: e.kind().as_str(),
                        })
                    }
                }
            }
        };
        Ok(FileReader {
            repo: repo.clone(),
            path: path.to_string(),
            size,
            index,
            chunk_size: point.chunk_size as u64,
            cache: None,
        })
    }

    /// Serves chunks through `cache` (fetching into it on a miss).
    pub fn with_cache(mut self, cache: Arc<BlockCache>) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Number of chunks in the file.
    pub fn chunk_count(&self) -> u64 {
        super::index::chunk_count(self.size, self.chunk_size as u32)
    }

    /// Starts fetching chunk `index` into the block cache in the background,
    /// unless it is a hole or already cached. Used for readahead.
    pub async fn prefetch(&self, index: u64) {
        let Some(cache) = &self.cache else { return };
        let Ok(id) = self.chunk_id(index).await else {
            return;
        };
        if id.is_hole() || cache.contains(&id) {
            return;
        }
        let (cache, repo) = (cache.clone(), self.repo.clone());
        tokio::spawn(async move {
            // Errors surface when the reader asks for the chunk itself.
            let _ = cache.get(&repo, &id).await;
        });
    }

    /// The file's logical size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Chunk size of the file's index.
    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Path of the file in its tree (its name in a VM point).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Id of chunk number `index` ([`ChunkId::HOLE`] for zeros).
    pub async fn chunk_id(&self, index: u64) -> Result<ChunkId, RepoError> {
        let corrupt = || RepoError::CorruptObject {
            key: format!("index of '{}'", self.path),
            reason: format!("no entry for chunk {index}"),
        };
        match &self.index {
            ChunkIndex::Inline(chunks) => chunks.get(index as usize).copied().ok_or_else(corrupt),
            ChunkIndex::Pages(pages) => {
                let (page, slot) = locate(index);
                let page_id = pages.get(page).ok_or_else(corrupt)?;
                let page = self.repo.page(page_id).await?;
                page.entries.get(slot).copied().ok_or_else(corrupt)
            }
        }
    }

    /// For chunks `chunks` (clipped to the file), whether each is a hole
    /// (an all-zero chunk the backup did not store), in order. Reads each
    /// index page once, never a chunk: what block status queries and
    /// `used` need.
    ///
    /// # Errors
    /// A page that cannot be read or does not cover a chunk it should.
    pub async fn holes(&self, chunks: std::ops::Range<u64>) -> Result<Vec<bool>, RepoError> {
        let end = chunks.end.min(self.chunk_count());
        let mut out = Vec::with_capacity(end.saturating_sub(chunks.start) as usize);
        let mut index = chunks.start;
        let corrupt = |index: u64| RepoError::CorruptObject {
            key: format!("index of '{}'", self.path),
            reason: format!("no entry for chunk {index}"),
        };
        let pages = match &self.index {
            ChunkIndex::Inline(ids) => {
                for i in index..end {
                    out.push(ids.get(i as usize).ok_or_else(|| corrupt(i))?.is_hole());
                }
                return Ok(out);
            }
            ChunkIndex::Pages(pages) => pages,
        };
        while index < end {
            let (page_no, slot) = locate(index);
            let page_id = pages.get(page_no).ok_or_else(|| corrupt(index))?;
            let page = self.repo.page(page_id).await?;
            let take = (page.entries.len().saturating_sub(slot) as u64).min(end - index);
            if take == 0 {
                return Err(corrupt(index));
            }
            out.extend(
                page.entries[slot..slot + take as usize]
                    .iter()
                    .map(ChunkId::is_hole),
            );
            index += take;
        }
        Ok(out)
    }

    /// Plain bytes of chunk number `index`, verified; zeros for a hole.
    pub async fn chunk(&self, index: u64) -> Result<Bytes, RepoError> {
        let id = self.chunk_id(index).await?;
        if id.is_hole() {
            let start = index * self.chunk_size;
            let len = self.chunk_size.min(self.size.saturating_sub(start));
            return Ok(zeros(len as usize));
        }
        match &self.cache {
            Some(cache) => cache.get(&self.repo, &id).await,
            None => self.repo.read_chunk(&id).await,
        }
    }

    /// Reads up to `len` bytes at `offset`; short only at end of file.
    pub async fn read_at(&self, offset: u64, len: usize) -> Result<Bytes, RepoError> {
        let end = (offset + len as u64).min(self.size);
        if offset >= end {
            return Ok(Bytes::new());
        }
        let first = offset / self.chunk_size;
        let last = (end - 1) / self.chunk_size;
        if first == last {
            let chunk = self.chunk(first).await?;
            let start = (offset - first * self.chunk_size) as usize;
            return Ok(chunk.slice(start..start + (end - offset) as usize));
        }
        let mut out = BytesMut::with_capacity((end - offset) as usize);
        for index in first..=last {
            let chunk = self.chunk(index).await?;
            let base = index * self.chunk_size;
            let from = offset.max(base) - base;
            let to = end.min(base + chunk.len() as u64) - base;
            out.extend_from_slice(&chunk[from as usize..to as usize]);
        }
        Ok(out.freeze())
    }
}
