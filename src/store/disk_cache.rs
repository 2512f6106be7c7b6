//! A size-bounded on-disk cache of immutable objects in front of a remote
//! store, so the hot chunks of a booting VM are read from local disk.
//!
//! Only keys under the prefixes the caller names are cached, and the caller
//! must name only immutable, content-addressed objects (a key always means
//! the same bytes): then a cached file can never be stale, and the cache
//! survives restarts without any coordination with the store. Manifests,
//! pins and leases are never cached.
//!
//! # Layout
//! ```text
//! <dir>/<key>           the object's bytes, e.g. <dir>/chunks/ab/abcd…
//! <dir>/**/.tmp-*       being written (removed at start)
//! ```
//! A file is written to a temporary name, fsynced and renamed, so after a
//! crash a cached file is complete or absent. Eviction is least recently used
//! by bytes; the order is kept across restarts through the files' mtimes
//! (touched on every hit).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use lru::LruCache;
use tracing::{debug, warn};

use super::{validate_key, LockGuard, LockMode, ObjectMeta, PutOutcome, Store, StoreError};

/// Prefix of temporary files while an object is written into the cache.
const TEMP_PREFIX: &str = ".tmp-";

/// Counters of the cache, for tests and metrics.
#[derive(Debug, Default)]
pub struct CacheCounters {
    /// Reads answered from local disk.
    pub hits: AtomicU64,
    /// Reads that went to the store.
    pub misses: AtomicU64,
}

/// The on-disk cache: files, an LRU index of their sizes, and a byte budget.
#[derive(Debug)]
pub struct DiskCache {
    dir: PathBuf,
    capacity: u64,
    index: Mutex<Index>,
    temp_counter: AtomicU64,
    /// Hit and miss counts.
    pub counters: CacheCounters,
}

#[derive(Debug)]
struct Index {
    lru: LruCache<String, u64>,
    bytes: u64,
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

impl DiskCache {
    /// Opens the cache in `dir` (created if missing) with a budget of
    /// `capacity` bytes, rebuilding its index from the files already there.
    pub fn open(dir: impl Into<PathBuf>, capacity: u64) -> Result<DiskCache, StoreError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_err("create chunk cache folder", &dir))?;
        let mut found = Vec::new();
        scan(&dir, &dir, &mut found)?;
        // Oldest first, so the most recently used end up at the LRU's front.
        found.sort_by_key(|(_, _, mtime)| *mtime);
        let mut index = Index {
            lru: LruCache::unbounded(),
            bytes: 0,
        };
        for (key, size, _) in found {
            index.bytes += size;
            index.lru.put(key, size);
        }
        debug!(dir = %dir.display(), objects = index.lru.len(), bytes = index.bytes, "chunk cache opened");
        let cache = DiskCache {
            dir,
            capacity,
            index: Mutex::new(index),
            temp_counter: AtomicU64::new(0),
            counters: CacheCounters::default(),
        };
        cache.evict();
        Ok(cache)
    }

    /// Bytes held now.
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    /// Objects held now.
    pub fn len(&self) -> usize {
        self.lock().lru.len()
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        // The index is a plain map; a panic elsewhere cannot break it.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(key)
    }

    /// The cached bytes of `key`, if any (blocking).
    fn read(&self, key: &str) -> Option<Bytes> {
        // Not indexed: not ours (or evicted). `get` also marks it recently used.
        self.lock().lru.get(key)?;
        let path = self.path(key);
        match fs::read(&path) {
            Ok(data) => {
                // Keep the LRU order for the next start.
                if let Ok(f) = File::options().write(true).open(&path) {
                    let _ = f.set_modified(SystemTime::now());
                }
                Some(Bytes::from(data))
            }
            Err(e) => {
                // Removed behind our back: forget it.
                if e.kind() != io::ErrorKind::NotFound {
                    warn!(path = %path.display(), cause = %e, "read cached object");
                }
                self.forget(key);
                None
            }
        }
    }

    /// Stores a copy of `key` (blocking): temp file, fsync, rename.
    fn insert(&self, key: &str, data: &[u8]) -> Result<(), StoreError> {
        let size = data.len() as u64;
        if size > self.capacity || self.lock().lru.contains(key) {
            return Ok(());
        }
        let path = self.path(key);
        let dir = path.parent().unwrap_or(&self.dir);
        fs::create_dir_all(dir).map_err(io_err("create chunk cache folder", dir))?;
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        let temp = dir.join(format!("{TEMP_PREFIX}{}-{n}", std::process::id()));
        let write = || -> io::Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&temp)?;
            f.write_all(data)?;
            // Complete before it has its name: a crash never leaves a torn chunk.
            f.sync_data()?;
            fs::rename(&temp, &path)
        };
        if let Err(e) = write() {
            let _ = fs::remove_file(&temp);
            return Err(io_err("write cached object", &path)(e));
        }
        {
            let mut index = self.lock();
            if index.lru.put(key.to_string(), size).is_none() {
                index.bytes += size;
            }
        }
        self.evict();
        Ok(())
    }

    fn forget(&self, key: &str) {
        let mut index = self.lock();
        if let Some(size) = index.lru.pop(key) {
            index.bytes -= size;
        }
    }

    /// Removes `key` from cache and disk (blocking).
    fn remove(&self, key: &str) {
        self.forget(key);
        let _ = fs::remove_file(self.path(key));
    }

    /// Drops least recently used objects until the budget holds (blocking).
    fn evict(&self) {
        loop {
            let victim = {
                let mut index = self.lock();
                if index.bytes <= self.capacity {
                    return;
                }
                match index.lru.pop_lru() {
                    Some((key, size)) => {
                        index.bytes -= size;
                        key
                    }
                    None => return,
                }
            };
            if let Err(e) = fs::remove_file(self.path(&victim)) {
                if e.kind() != io::ErrorKind::NotFound {
                    warn!(key = victim, cause = %e, "evict cached object");
                }
            }
        }
    }
}

/// Finds cached objects under `dir`; removes leftover temporary files.
fn scan(
    root: &Path,
    dir: &Path,
    out: &mut Vec<(String, u64, SystemTime)>,
) -> Result<(), StoreError> {
    for entry in fs::read_dir(dir).map_err(io_err("list chunk cache", dir))? {
        let entry = entry.map_err(io_err("list chunk cache", dir))?;
        let path = entry.path();
        let meta = entry.metadata().map_err(io_err("stat", &path))?;
        if meta.is_dir() {
            scan(root, &path, out)?;
            continue;
        }
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            let _ = fs::remove_file(&path);
            continue;
        }
        let Some(key) = path.strip_prefix(root).ok().and_then(|k| k.to_str()) else {
            continue;
        };
        if validate_key(key).is_ok() {
            let mtime = meta.modified().unwrap_or(SystemTime::UNIX_EPOCH);
            out.push((key.to_string(), meta.len(), mtime));
        }
    }
    Ok(())
}

/// A store with a [`DiskCache`] in front of reads of immutable objects.
#[derive(Debug, Clone)]
pub struct CachedStore {
    inner: Arc<dyn Store>,
    cache: Arc<DiskCache>,
    /// Key prefixes whose objects are immutable and may be cached.
    prefixes: Arc<[String]>,
}

impl CachedStore {
    /// Puts `cache` in front of `inner` for keys starting with one of `prefixes`.
    pub fn new(inner: Arc<dyn Store>, cache: DiskCache, prefixes: &[&str]) -> CachedStore {
        CachedStore {
            inner,
            cache: Arc::new(cache),
            prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
        }
    }

    /// The cache, for its counters.
    pub fn cache(&self) -> &Arc<DiskCache> {
        &self.cache
    }

    fn cacheable(&self, key: &str) -> bool {
        self.prefixes.iter().any(|p| key.starts_with(p.as_str()))
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&DiskCache) -> T + Send + 'static,
    ) -> Option<T> {
        let cache = self.cache.clone();
        tokio::task::spawn_blocking(move || f(&cache)).await.ok()
    }
}

#[async_trait]
impl Store for CachedStore {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        if !self.cacheable(key) {
            return self.inner.get(key).await;
        }
        validate_key(key)?;
        let k = key.to_string();
        if let Some(Some(hit)) = self.blocking(move |c| c.read(&k)).await {
            self.cache.counters.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hit);
        }
        self.cache.counters.misses.fetch_add(1, Ordering::Relaxed);
        let data = self.inner.get(key).await?;
        // Write behind: the reader has its bytes now; a failed cache write
        // only costs a later miss.
        let (cache, k, d) = (self.cache.clone(), key.to_string(), data.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(e) = cache.insert(&k, &d) {
                warn!(cause = %e, "fill chunk cache");
            }
        });
        Ok(data)
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        self.inner.get_range(key, range).await
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        self.inner.put(key, data).await
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        self.inner.put_if_absent(key, data).await
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        self.inner.exists(key).await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        if self.cacheable(key) {
            let k = key.to_string();
            self.blocking(move |c| c.remove(&k)).await;
        }
        self.inner.delete(key).await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        self.inner.list(prefix).await
    }

    async fn sync(&self) -> Result<(), StoreError> {
        self.inner.sync().await
    }

    async fn try_lock(&self, mode: LockMode) -> Result<Box<dyn LockGuard>, StoreError> {
        self.inner.try_lock(mode).await
    }

    async fn evict_copy(&self, key: &str) {
        if self.cacheable(key) {
            let k = key.to_string();
            self.blocking(move |c| c.remove(&k)).await;
        }
    }

    fn gc_grace(&self) -> Duration {
        self.inner.gc_grace()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    async fn settle(cache: &DiskCache, objects: usize) {
        // Inserts are written behind the read.
        for _ in 0..200 {
            if cache.len() >= objects {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn hits_survive_restart_and_budget_evicts_lru() {
        let dir = tempfile::tempdir().unwrap();
        let backing: Arc<dyn Store> = Arc::new(LocalStore::open(dir.path().join("s")).unwrap());
        for i in 0..4u8 {
            backing
                .put(&format!("chunks/0{i}"), Bytes::from(vec![i; 1000]))
                .await
                .unwrap();
        }
        backing
            .put("points/p.json", Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let cdir = dir.path().join("cache");
        let store = CachedStore::new(
            backing.clone(),
            DiskCache::open(&cdir, 2500).unwrap(),
            &["chunks/"],
        );
        for i in 0..3u8 {
            assert_eq!(store.get(&format!("chunks/0{i}")).await.unwrap()[0], i);
            settle(store.cache(), i as usize + 1).await;
        }
        store.get("points/p.json").await.unwrap();
        // 3000 bytes over a 2500 budget: the least recently used (00) went.
        assert_eq!(store.cache().len(), 2);
        assert!(!cdir.join("chunks/00").exists());
        assert!(!cdir.join("points").exists(), "manifests are never cached");

        // The store loses its copies; the cache still answers, after a restart too.
        backing.delete("chunks/01").await.unwrap();
        backing.delete("chunks/02").await.unwrap();
        drop(store);
        let store = CachedStore::new(
            backing.clone(),
            DiskCache::open(&cdir, 2500).unwrap(),
            &["chunks/"],
        );
        assert_eq!(store.get("chunks/01").await.unwrap(), vec![1u8; 1000]);
        assert_eq!(store.get("chunks/02").await.unwrap(), vec![2u8; 1000]);
        assert_eq!(store.cache().counters.hits.load(Ordering::Relaxed), 2);
        assert!(
            store.get("chunks/00").await.is_ok(),
            "a miss reads the store"
        );
        assert_eq!(store.cache().counters.misses.load(Ordering::Relaxed), 1);
    }
}
