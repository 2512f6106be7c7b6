//! `store`: where the repository's bytes live.
//!
//! A [`Store`] is a flat namespace of immutable objects named by `/`-separated
//! keys (`chunks/ab/abcd…`, `points/0123….json`). It knows nothing of VMs,
//! chunks or restore points; `repo` gives the keys their meaning. The local
//! directory store is the default; an object store (S3) implements the same
//! trait, so `repo` never changes when the backend does.
//!
//! Writes are made durable by [`Store::sync`], not one by one: a backup writes
//! thousands of chunks and then syncs once before it publishes its manifest.

mod disk_cache;
pub mod lease;
mod local;
mod location;
mod s3;

pub use disk_cache::{CachedStore, DiskCache};
pub use local::LocalStore;
pub use location::StoreLocation;
pub use s3::{
    S3Options, S3Settings, S3Store, DEFAULT_REQUEST_TIMEOUT, DEFAULT_RETRY_WINDOW,
    DEFAULT_S3_GC_GRACE,
};

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

/// What went wrong talking to a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The object does not exist.
    #[error("object '{key}' not found in store {store}")]
    NotFound { store: String, key: String },
    /// A key that could escape the store or is otherwise unusable.
    #[error("invalid object key '{key}'")]
    InvalidKey { key: String },
    /// An I/O error on a local path.
    #[error("{action} '{path}' - {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The store is locked by another operation that must not overlap.
    #[error("store {store} is busy: {reason}")]
    Busy { store: String, reason: String },
    /// The backend could not be reached or answered with a server error; worth retrying.
    #[error("store {store} unavailable - {reason}")]
    Unavailable { store: String, reason: String },
    /// The backend refused our credentials.
    #[error("store {store} refused access - {reason} (check the access key and secret)")]
    Denied { store: String, reason: String },
    /// The store's settings are unusable (bad endpoint, missing region...).
    #[error("configure store {store} - {reason}")]
    Config { store: String, reason: String },
}

impl StoreError {
    /// True when the failure is about reachability rather than the data: the caller may retry.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }
}

/// Outcome of a conditional write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object did not exist and was written.
    Created,
    /// An object with that key already existed; nothing was written.
    AlreadyExists,
}

/// How a repository-wide lock is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Many holders at once: backups, restores, publishing.
    Shared,
    /// One holder and no shared holders: garbage collection.
    Exclusive,
}

/// A held repository lock; released on drop (local stores) or by
/// [`LockGuard::release`] (leases, which a drop can only remove in the
/// background).
#[async_trait]
pub trait LockGuard: Send + Sync + fmt::Debug {
    /// Fails when the lock may no longer be held (a lease not renewed in
    /// time): a caller checks before an action that relies on it.
    fn check(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Releases the lock now.
    async fn release(self: Box<Self>) -> Result<(), StoreError> {
        Ok(())
    }
}

/// One object listed by [`Store::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// The object's key.
    pub key: String,
    /// Size in bytes.
    pub size: u64,
    /// When the object was written, where the store knows it (gc's grace period).
    pub modified: Option<SystemTime>,
}

/// A flat key → immutable bytes namespace.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug {
    /// Human-readable location, used in error messages (a path or URL).
    fn describe(&self) -> String;

    /// Reads a whole object.
    async fn get(&self, key: &str) -> Result<Bytes, StoreError>;

    /// Reads bytes `range` of an object (a range request where the backend
    /// has them; here, the whole object sliced). A range past the end is cut.
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        let all = self.get(key).await?;
        let end = (range.end as usize).min(all.len());
        let start = (range.start as usize).min(end);
        Ok(all.slice(start..end))
    }

    /// Writes or replaces an object atomically (readers see the old or the new bytes).
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError>;

    /// Writes an object only if the key is free; never replaces existing bytes.
    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<PutOutcome, StoreError>;

    /// True when the object exists.
    async fn exists(&self, key: &str) -> Result<bool, StoreError>;

    /// Removes an object; removing a missing object is not an error.
    async fn delete(&self, key: &str) -> Result<(), StoreError>;

    /// Lists every object whose key starts with `prefix` (a folder path ending in `/`).
    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError>;

    /// Makes every write that returned before this call durable.
    async fn sync(&self) -> Result<(), StoreError>;

    /// Takes the repository-wide lock, failing with [`StoreError::Busy`] instead of waiting.
    async fn try_lock(&self, mode: LockMode) -> Result<Box<dyn LockGuard>, StoreError>;

    /// Drops any local copy of `key` (a cache in front of the store), so the
    /// next read goes to the store itself; a caller does this when a copy
    /// failed its content check. Stores without copies do nothing.
    async fn evict_copy(&self, _key: &str) {}

    /// How old an unreferenced object must be before `gc` removes it. Zero
    /// where the lock alone excludes every writer (a local folder, one
    /// machine); a grace period where a writer on another machine could
    /// outlive its lease (S3).
    fn gc_grace(&self) -> Duration {
        Duration::ZERO
    }
}

/// Checks that a key is a relative `/`-separated path without `.`/`..` parts.
pub fn validate_key(key: &str) -> Result<(), StoreError> {
    let bad = key.is_empty()
        || key.starts_with('/')
        || key
            .split('/')
            .any(|part| part.is_empty() || part == "." || part == "..")
        || key.contains('\0');
    if bad {
        Err(StoreError::InvalidKey {
            key: key.to_string(),
        })
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_escape() {
        for bad in ["", "/etc/passwd", "a/../b", "a//b", "./a", "a/", "a\0b"] {
            assert!(validate_key(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["config.json", "chunks/ab/abcdef", "points/1.json"] {
            assert!(validate_key(good).is_ok(), "{good:?} refused");
        }
    }
}
