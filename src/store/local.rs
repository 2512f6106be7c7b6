//! The local-directory store: each object is a file under the repository folder.
//!
//! Writes go to a temporary file in the target folder and are then linked
//! (`put_if_absent`) or renamed (`put`) into place, so a reader never sees a
//! half-written object and a crash leaves at most a `.tmp-*` file, which
//! listing ignores. Durability is batched: [`Store::sync`] calls `syncfs` once
//! for everything written before it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::{validate_key, LockGuard, LockMode, ObjectMeta, PutOutcome, Store, StoreError};

/// Prefix of temporary files; never a valid object name.
const TEMP_PREFIX: &str = ".tmp-";
/// Name of the lock file in the store's root.
const LOCK_FILE: &str = "lock";

/// A store in a local directory.
#[derive(Debug, Clone)]
pub struct LocalStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    /// Distinguishes concurrent temporary files of this process.
    temp_counter: AtomicU64,
}

#[derive(Debug)]
struct LocalLock {
    _file: File,
}

impl LockGuard for LocalLock {}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

impl LocalStore {
    /// Opens (and creates if needed) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = root.into();
        fs::create_dir_all(&root).map_err(io_err("create store folder", &root))?;
        Ok(LocalStore {
            inner: Arc::new(Inner {
                root,
                temp_counter: AtomicU64::new(0),
            }),
        })
    }

    /// The folder this store lives in.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Maps a key to its path after checking it cannot escape the root.
    pub fn path_of(&self, key: &str) -> Result<PathBuf, StoreError> {
        validate_key(key)?;
        Ok(self.inner.root.join(key))
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        match crate::fsutil::blocking(move || f(&inner)).await {
            Ok(result) => result,
            Err(join) => Err(StoreError::Io {
                action: "run store task",
                path: self.inner.root.clone(),
                source: io::Error::other(join.to_string()),
            }),
        }
    }
}

impl Inner {
    /// After a "not found": distinguishes a missing object from a missing
    /// repository folder (an unmounted disk or share), which is worth retrying
    /// and must never be recreated empty by a write.
    fn check_root(&self) -> Result<(), StoreError> {
        if self.root.is_dir() {
            return Ok(());
        }
        Err(StoreError::Unavailable {
            store: self.root.display().to_string(),
            reason: "the repository folder is missing (unmounted?)".into(),
        })
    }

    /// Writes `data` to a fresh temporary file beside `target`.
    fn write_temp(&self, target: &Path, data: &[u8]) -> Result<PathBuf, StoreError> {
        let dir = target.parent().unwrap_or(&self.root);
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        let temp = dir.join(format!("{TEMP_PREFIX}{}-{n}", std::process::id()));
        let write = |path: &Path| -> io::Result<()> {
            let mut f = OpenOptions::new().write(true).create_new(true).open(path)?;
            f.write_all(data)
        };
        match write(&temp) {
            Ok(()) => Ok(temp),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.check_root()?;
                fs::create_dir_all(dir).map_err(io_err("create folder", dir))?;
                write(&temp).map_err(io_err("write object", &temp))?;
                Ok(temp)
            }
            Err(e) => {
                let _ = fs::remove_file(&temp);
                Err(io_err("write object", &temp)(e))
            }
        }
    }
}

fn list_dir(root: &Path, dir: &Path, out: &mut Vec<ObjectMeta>) -> Result<(), StoreError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("list folder", dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io_err("list folder", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with(TEMP_PREFIX) {
            continue;
        }
        let path = entry.path();
        let meta = entry.metadata().map_err(io_err("stat", &path))?;
        if meta.is_dir() {
            list_dir(root, &path, out)?;
        } else if let Ok(rel) = path.strip_prefix(root) {
            if let Some(key) = rel.to_str() {
                out.push(ObjectMeta {
                    key: key.to_string(),
                    size: meta.len(),
                    modified: meta.modified().ok(),
                });
            }
        }
    }
    Ok(())
}

#[async_trait]
impl Store for LocalStore {
    fn describe(&self) -> String {
        self.inner.root.display().to_string()
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let path = self.path_of(key)?;
        let key = key.to_string();
        self.blocking(move |inner| match fs::read(&path) {
            Ok(data) => Ok(Bytes::from(data)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                inner.check_root()?;
                Err(StoreError::NotFound {
                    store: inner.root.display().to_string(),
                    key,
                })
            }
            Err(e) => Err(io_err("read object", &path)(e)),
        })
        .await
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        self.blocking(move |inner| {
            let temp = inner.write_temp(&path, &data)?;
            fs::rename(&temp, &path).map_err(|e| {
                let _ = fs::remove_file(&temp);
                io_err("rename object", &path)(e)
            })
        })
        .await
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        let path = self.path_of(key)?;
        self.blocking(move |inner| {
            if path.exists() {
                return Ok(PutOutcome::AlreadyExists);
            }
            let temp = inner.write_temp(&path, &data)?;
            // link() fails with EEXIST instead of replacing: the atomic "if absent".
            let linked = fs::hard_link(&temp, &path);
            let _ = fs::remove_file(&temp);
            match linked {
                Ok(()) => Ok(PutOutcome::Created),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(PutOutcome::AlreadyExists),
                Err(e) => Err(io_err("publish object", &path)(e)),
            }
        })
        .await
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let path = self.path_of(key)?;
        self.blocking(move |inner| match fs::symlink_metadata(&path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => inner.check_root().map(|()| false),
            Err(e) => Err(io_err("stat object", &path)(e)),
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path_of(key)?;
        self.blocking(move |inner| match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => inner.check_root(),
            Err(e) => Err(io_err("remove object", &path)(e)),
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let dir = self.path_of(prefix.trim_end_matches('/'))?;
        self.blocking(move |inner| {
            inner.check_root()?;
            let mut out = Vec::new();
            list_dir(&inner.root, &dir, &mut out)?;
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
    }

    async fn sync(&self) -> Result<(), StoreError> {
        self.blocking(|inner| {
            let dir = File::open(&inner.root).map_err(io_err("open store folder", &inner.root))?;
            // One syncfs covers every chunk written by this backup: far cheaper than
            // an fsync per chunk, and it also persists the folder entries.
            // SAFETY: the fd is valid for the lifetime of `dir`.
            let rc = unsafe { libc::syncfs(dir.as_raw_fd()) };
            if rc != 0 {
                return Err(io_err("sync store", &inner.root)(io::Error::last_os_error()));
            }
            Ok(())
        })
        .await
    }

    async fn try_lock(&self, mode: LockMode) -> Result<Box<dyn LockGuard>, StoreError> {
        self.blocking(move |inner| {
            let path = inner.root.join(LOCK_FILE);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(io_err("open lock file", &path))?;
            let locked = match mode {
                LockMode::Shared => file.try_lock_shared(),
                LockMode::Exclusive => file.try_lock(),
            };
            match locked {
                Ok(()) => Ok(Box::new(LocalLock { _file: file }) as Box<dyn LockGuard>),
                Err(fs::TryLockError::WouldBlock) => Err(StoreError::Busy {
                    store: inner.root.display().to_string(),
                    reason: match mode {
                        LockMode::Shared => "garbage collection is running".to_string(),
                        LockMode::Exclusive => {
                            "a backup or another operation is using the repository".to_string()
                        }
                    },
                }),
                Err(fs::TryLockError::Error(e)) => Err(io_err("lock", &path)(e)),
            }
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_if_absent_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let first = store
            .put_if_absent("a/b/c", Bytes::from_static(b"one"))
            .await
            .unwrap();
        let second = store
            .put_if_absent("a/b/c", Bytes::from_static(b"two"))
            .await
            .unwrap();
        assert_eq!(first, PutOutcome::Created);
        assert_eq!(second, PutOutcome::AlreadyExists);
        assert_eq!(
            store.get("a/b/c").await.unwrap(),
            Bytes::from_static(b"one")
        );
        let listed = store.list("a/").await.unwrap();
        assert_eq!(listed.len(), 1, "temp files must not be listed: {listed:?}");
        store.sync().await.unwrap();
    }

    #[tokio::test]
    async fn missing_objects_are_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let err = store.get("nope").await.unwrap_err();
        assert!(matches!(err, StoreError::NotFound { .. }), "{err}");
        store.delete("nope").await.unwrap();
        assert!(!store.exists("nope").await.unwrap());
    }

    #[tokio::test]
    async fn a_missing_repository_folder_is_unavailable_and_not_recreated() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        let store = LocalStore::open(&root).unwrap();
        store.put("a/b", Bytes::from_static(b"x")).await.unwrap();
        let away = dir.path().join("unmounted");
        fs::rename(&root, &away).unwrap();
        for err in [
            store.get("a/b").await.unwrap_err(),
            store
                .put("c/d", Bytes::from_static(b"y"))
                .await
                .unwrap_err(),
            store.list("a/").await.unwrap_err(),
        ] {
            assert!(err.is_transient(), "{err}");
        }
        assert!(!root.exists(), "a write must not recreate the folder");
        fs::rename(&away, &root).unwrap();
        assert_eq!(store.get("a/b").await.unwrap(), Bytes::from_static(b"x"));
    }

    #[tokio::test]
    async fn exclusive_lock_excludes_shared() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(dir.path()).unwrap();
        let shared = store.try_lock(LockMode::Shared).await.unwrap();
        let also_shared = store.try_lock(LockMode::Shared).await.unwrap();
        assert!(store.try_lock(LockMode::Exclusive).await.is_err());
        drop((shared, also_shared));
        let _excl = store.try_lock(LockMode::Exclusive).await.unwrap();
        assert!(store.try_lock(LockMode::Shared).await.is_err());
    }
}
