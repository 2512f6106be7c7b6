//! `SessionCache`: the write caches of one session, kept in one folder
//! (`NAME.data` + `NAME.map` per file). It owns the folder: creates it, finds
//! the caches in it after a restart, sums their usage, and removes it all
//! when the session ends.
//!
//! The folder can be anywhere: a local folder (the default) or a folder on a
//! production datastore mounted on this machine.

use std::collections::HashMap;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::Mutex;

use super::error::{io_err, join_err, CacheError, Result};
use super::files::{lock_exclusive, with_descriptors};
use super::open::{parent_of, sync_dir};
use super::write_cache::{CachePaths, Origin, WriteCache};

/// Longest cache name accepted, leaving room for the suffixes within the
/// usual 255-byte file name limit.
const MAX_NAME_LEN: usize = 200;

/// The per-file write caches of one session, by name.
///
/// Names are chosen by the caller; a stable one (the file id) survives
/// client renames without touching the cache.
#[derive(Debug)]
pub struct SessionCache {
    dir: PathBuf,
    files: Mutex<HashMap<String, Arc<WriteCache>>>,
    /// The folder, open and `flock`ed while this runs it: the caches in it
    /// close their files when idle (see `files.rs`), and with them their
    /// own locks, so the folder's lock is what keeps a second process out.
    _lock: File,
}

/// Checks that `name` can be used as a file name in the session folder.
fn check_name(name: &str) -> Result<()> {
    let bad = name.is_empty()
        || name.len() > MAX_NAME_LEN
        || name == "."
        || name == ".."
        || name.contains(['/', '\0']);
    if bad {
        return Err(CacheError::InvalidName(name.to_string()));
    }
    Ok(())
}

impl SessionCache {
    /// Opens the session folder `dir`, creating it if needed, and opens every
    /// cache found in it (repairing crash leftovers).
    ///
    /// # Errors
    /// I/O errors on the folder; any error opening one of its caches.
    pub async fn open(dir: impl Into<PathBuf>) -> Result<SessionCache> {
        Self::open_in(dir.into(), true).await
    }

    /// Opens the session folder `dir` like [`SessionCache::open`], but
    /// refuses to create it: a missing folder is an I/O error (`NotFound`),
    /// never a silently empty cache.
    ///
    /// # Errors
    /// As `open`, and `NotFound` when `dir` does not exist.
    pub async fn open_existing(dir: impl Into<PathBuf>) -> Result<SessionCache> {
        Self::open_in(dir.into(), false).await
    }

    async fn open_in(dir: PathBuf, create: bool) -> Result<SessionCache> {
        let d = dir.clone();
        let (lock, names) = tokio::task::spawn_blocking(move || {
            if create && !d.exists() {
                fs::create_dir_all(&d).map_err(io_err("create", &d))?;
                sync_dir(parent_of(&d))?;
            }
            let lock = with_descriptors(|| File::open(&d)).map_err(io_err("open", &d))?;
            // Waits a moment: a handle to this folder that the process
            // itself just let go of may still be closing.
            lock_exclusive(&lock, &d, true)?;
            Ok::<_, CacheError>((lock, scan(&d)?))
        })
        .await
        .map_err(|e| join_err(&dir, e))??;
        let mut files = HashMap::new();
        for name in names {
            let cache = WriteCache::open(&CachePaths::in_dir(&dir, &name)).await?;
            files.insert(name, Arc::new(cache));
        }
        Ok(SessionCache {
            dir,
            files: Mutex::new(files),
            _lock: lock,
        })
    }

    /// The session folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cache of `name`, if it has one.
    pub async fn get(&self, name: &str) -> Option<Arc<WriteCache>> {
        self.files.lock().await.get(name).cloned()
    }

    /// The cache of `name`, created (see `WriteCache::create`) if missing.
    ///
    /// # Errors
    /// `InvalidName`, or the errors of `WriteCache::create`.
    pub async fn get_or_create(
        &self,
        name: &str,
        logical_size: u64,
        block_size: u32,
        origin: Origin,
    ) -> Result<Arc<WriteCache>> {
        check_name(name)?;
        let mut files = self.files.lock().await;
        if let Some(cache) = files.get(name) {
            return Ok(Arc::clone(cache));
        }
        let paths = CachePaths::in_dir(&self.dir, name);
        let cache = Arc::new(WriteCache::create(&paths, logical_size, block_size, origin).await?);
        files.insert(name.to_string(), Arc::clone(&cache));
        Ok(cache)
    }

    /// Removes the cache of `name` and frees its space. Handles still held
    /// elsewhere keep working on the unlinked files until dropped.
    /// Returns whether there was one.
    ///
    /// # Errors
    /// I/O errors removing the files.
    pub async fn remove(&self, name: &str) -> Result<bool> {
        let mut files = self.files.lock().await;
        let Some(cache) = files.remove(name) else {
            return Ok(false);
        };
        let paths = cache.paths().clone();
        // Its descriptors close as soon as no operation holds them, so the
        // space is freed even while a handle to it lingers elsewhere.
        cache.shared.slot.close_for_delete();
        drop(cache);
        tokio::task::spawn_blocking(move || super::open::delete(&paths))
            .await
            .map_err(|e| join_err(&self.dir, e))??;
        Ok(true)
    }

    /// Names of the files with a cache, sorted.
    pub async fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.files.lock().await.keys().cloned().collect();
        names.sort();
        names
    }

    /// Bytes of present blocks over all caches (see `WriteCache::bytes_used`).
    pub async fn bytes_used(&self) -> u64 {
        self.files
            .lock()
            .await
            .values()
            .map(|c| c.bytes_used())
            .sum()
    }

    /// Makes every write of every cache durable.
    ///
    /// # Errors
    /// The first error of `WriteCache::commit`.
    pub async fn commit_all(&self) -> Result<()> {
        let caches: Vec<Arc<WriteCache>> = self.files.lock().await.values().cloned().collect();
        for cache in caches {
            cache.commit().await?;
        }
        Ok(())
    }

    /// Removes the session folder and everything in it.
    ///
    /// # Errors
    /// I/O errors removing the folder.
    pub async fn delete(self) -> Result<()> {
        let dir = self.dir.clone();
        drop(self);
        let d = dir.clone();
        tokio::task::spawn_blocking(move || -> Result<()> {
            match fs::remove_dir_all(&d) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io_err("remove", &d)(e)),
            }
            sync_dir(parent_of(&d))
        })
        .await
        .map_err(|e| join_err(&dir, e))?
    }
}

/// Lists the cache names in `dir`; removes the temporary files of creates
/// that a crash interrupted.
fn scan(dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        if file_name.ends_with(".map.tmp") {
            let path = entry.path();
            fs::remove_file(&path).map_err(io_err("remove", &path))?;
        } else if let Some(name) = file_name.strip_suffix(".map") {
            if check_name(name).is_ok() {
                names.push(name.to_string());
            }
        }
    }
    names.sort();
    Ok(names)
}
