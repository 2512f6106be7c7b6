//! The in-memory block cache: verified plain chunks, bounded in bytes, shared
//! by every reader of a repository (deduplicated chunks are cached once).
//!
//! A chunk's hash is checked once, when it enters the cache (`read_chunk`
//! verifies); hits are then served without hashing. Concurrent misses for the
//! same chunk share one fetch.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use dashmap::DashMap;
use lru::LruCache;
use tokio::sync::OnceCell;

use super::chunk::ChunkId;
use super::{RepoError, Repository};

/// Default capacity: 256 MiB holds the working set of a booting VM and a
/// sequential reader's readahead window many times over.
pub const DEFAULT_BLOCK_CACHE_BYTES: usize = 256 << 20;

/// Hit and miss counters, for metrics.
#[derive(Debug, Default)]
pub struct BlockCacheStats {
    /// Reads served from memory.
    pub hits: AtomicU64,
    /// Reads that fetched from the store.
    pub misses: AtomicU64,
    /// Plain bytes fetched from the store.
    pub bytes_fetched: AtomicU64,
}

/// Verified chunks in memory, least recently used evicted first.
#[derive(Debug)]
pub struct BlockCache {
    capacity: usize,
    lru: Mutex<Lru>,
    inflight: DashMap<ChunkId, Arc<OnceCell<Bytes>>>,
    stats: BlockCacheStats,
}

#[derive(Debug)]
struct Lru {
    map: LruCache<ChunkId, Bytes>,
    bytes: usize,
}

impl BlockCache {
    /// A cache holding at most `capacity` bytes of plain chunk data.
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(BlockCache {
            capacity,
            lru: Mutex::new(Lru {
                map: LruCache::unbounded(),
                bytes: 0,
            }),
            inflight: DashMap::new(),
            stats: BlockCacheStats::default(),
        })
    }

    /// Counters since start.
    pub fn stats(&self) -> &BlockCacheStats {
        &self.stats
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.lru.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The chunk's plain bytes, from memory or fetched (and verified) from `repo`.
    pub async fn get(&self, repo: &Repository, id: &ChunkId) -> Result<Bytes, RepoError> {
        if let Some(hit) = self.lock().map.get(id).cloned() {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hit);
        }
        let cell = self
            .inflight
            .entry(*id)
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        let mut fetched_here = false;
        let result = cell
            .get_or_try_init(|| async {
                fetched_here = true;
                repo.read_chunk(id).await
            })
            .await
            .cloned();
        if fetched_here {
            self.inflight.remove(id);
            if let Ok(data) = &result {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .bytes_fetched
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                self.insert(*id, data.clone());
            }
        } else {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// True when the chunk is in memory (no fetch needed).
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.lock().map.contains(id)
    }

    fn insert(&self, id: ChunkId, data: Bytes) {
        if data.len() > self.capacity {
            return;
        }
        let mut lru = self.lock();
        if let Some(old) = lru.map.put(id, data.clone()) {
            lru.bytes -= old.len();
        }
        lru.bytes += data.len();
        while lru.bytes > self.capacity {
            match lru.map.pop_lru() {
                Some((_, evicted)) => lru.bytes -= evicted.len(),
                None => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::NoProgress;
    use crate::repo::{backup, BackupOptions, FileReader};
    use crate::store::LocalStore;

    #[tokio::test]
    async fn bounded_in_bytes_and_verified_once() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("disk.img");
        let data: Vec<u8> = (0..(8u32 << 16)).flat_map(|i| i.to_le_bytes()).collect(); // 2 MiB
        std::fs::write(&src, &data).unwrap();
        let store = Arc::new(LocalStore::open(dir.path().join("repo")).unwrap());
        let repo = Repository::init(store, 64 * 1024).await.unwrap();
        let point = backup(&repo, &src, &BackupOptions::default(), &NoProgress)
            .await
            .unwrap();
        let cache = BlockCache::new(4 * 64 * 1024);
        let reader = FileReader::new(&repo, &point, "disk.img")
            .unwrap()
            .with_cache(cache.clone());
        let all = reader.read_at(0, data.len()).await.unwrap();
        assert_eq!(&all[..], &data[..]);
        assert!(
            cache.bytes() <= 4 * 64 * 1024,
            "cache holds {}",
            cache.bytes()
        );
        assert_eq!(cache.stats().misses.load(Ordering::Relaxed), 32);
        // The last chunks are still cached: reading them again fetches nothing.
        let tail = reader
            .read_at(data.len() as u64 - 1000, 1000)
            .await
            .unwrap();
        assert_eq!(&tail[..], &data[data.len() - 1000..]);
        assert_eq!(cache.stats().misses.load(Ordering::Relaxed), 32);
        assert!(cache.stats().hits.load(Ordering::Relaxed) >= 1);
    }
}
