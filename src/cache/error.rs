//! Errors of the write cache: one enum, with the path or offset that failed.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong in the write cache.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// An I/O call on a cache file failed.
    #[error("{action} write cache file '{path}' - {source}")]
    Io {
        /// What was being done ("write", "sync", ...).
        action: &'static str,
        /// The file or folder involved.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The `.map` file does not start with a known write cache magic.
    #[error("open write cache '{path}' - not a write cache of a known version (bad magic); remove it or use a newer revive")]
    BadMagic {
        /// The `.map` file.
        path: PathBuf,
    },
    /// The `.map` file has a known magic but an unusable header.
    #[error("open write cache '{path}' - corrupt header: {reason}")]
    CorruptHeader {
        /// The `.map` file.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A block size that is not a power of two between 512 B and 1 MiB.
    #[error("invalid write cache block size {0} - must be a power of two from 512 B to 1 MiB")]
    InvalidBlockSize(u32),
    /// An offset or size beyond the largest file a write cache holds.
    #[error("offset {offset} + length {len} is beyond the largest file a write cache holds")]
    TooLarge {
        /// Start of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
    },
    /// The caller's base (backup) reader failed while fetching bytes for a
    /// copy-on-write of a partial block.
    #[error("read base (backup) at offset {offset} for copy-on-write - {source}")]
    Base {
        /// Offset of the block being copied.
        offset: u64,
        /// The reader's error.
        #[source]
        source: io::Error,
    },
    /// A previous flush failed: what reached the disk is unknown, so the cache
    /// refuses further writes rather than acknowledge data it may have lost.
    #[error("write cache '{path}' failed an earlier flush and refuses writes - {reason}")]
    Poisoned {
        /// The `.map` file.
        path: PathBuf,
        /// The error of the failed flush.
        reason: String,
    },
    /// A cache to be created already exists.
    #[error("create write cache '{0}' - already exists")]
    Exists(PathBuf),
    /// A cache name that is empty, `.`/`..`, too long, or contains `/` or NUL.
    #[error("invalid write cache name '{0}'")]
    InvalidName(String),
}

/// Result of write cache operations.
pub type Result<T, E = CacheError> = std::result::Result<T, E>;

/// Builds a `map_err` closure that wraps an `io::Error` with action and path.
pub(crate) fn io_err<'a>(
    action: &'static str,
    path: &'a std::path::Path,
) -> impl FnOnce(io::Error) -> CacheError + 'a {
    move |source| CacheError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Turns a failed `spawn_blocking` join (a panic in the blocking closure, or a
/// runtime shutting down) into an I/O error on `path`.
pub(crate) fn join_err(path: &std::path::Path, err: tokio::task::JoinError) -> CacheError {
    CacheError::Io {
        action: "run blocking I/O on",
        path: path.to_path_buf(),
        source: io::Error::other(err),
    }
}
