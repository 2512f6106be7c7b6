//! The write cache: where every client write to a published file goes,
//! instead of the backup repository.
//!
//! One `WriteCache` per file: a sparse data file with the same offsets as the
//! logical file, a `.map` file holding a header (block size, sizes) and a
//! persistent bitmap of the blocks present, and a `.journal` of recent
//! writes. Reads overlay the cache on the
//! base (the backup) through `Segment`s; writes are block-granular, with
//! copy-on-write of partial blocks from a `BaseRead`. `SessionCache` keeps the
//! caches of one session in one folder.
//!
//! This layer knows nothing of NFS or of the repository: the base is whatever
//! the caller's `BaseRead` returns.
//!
//! # Durability
//!
//! A write acknowledged stable (`Stability::FileSync`/`DataSync`, or
//! `Unstable` followed by `commit`) survives `kill -9` and is ordered for
//! power loss: either its bytes are in a journal record made durable by one
//! `fdatasync` of the journal (replayed at `open`), or, at a checkpoint, its
//! data is `fdatasync`ed in the data file before the bitmap bits that
//! publish it are written and `fdatasync`ed in the `.map` file, and only then
//! are journal records dropped. Concurrent stable writes share one flush
//! (group commit). Details in `commit.rs` and `journal.rs`; the on-disk
//! layout in `format.rs` and `docs/formats.md`.
//!
//! # Concurrency
//!
//! | operation                 | runs concurrently with                         |
//! |---------------------------|------------------------------------------------|
//! | `read`                    | everything                                     |
//! | `write`, `punch`          | requests on disjoint blocks                    |
//! | `set_len`                 | requests below the smaller of old and new size |
//! | `commit`, stable writes   | everything; flushes themselves are serialized  |
//!
//! A read racing a write to the same block may see either version (as on any
//! disk); overlapping writes are applied one after the other.
//!
//! # Example
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use bytes::Bytes;
//! use revive::cache::{BaseRead, Origin, Segment, SessionCache, Stability};
//!
//! /// The backed-up file (here: all 0xAA); really a repository reader.
//! struct Backup;
//! impl BaseRead for Backup {
//!     async fn read_base(&self, _offset: u64, len: usize) -> std::io::Result<Bytes> {
//!         Ok(Bytes::from(vec![0xAA; len]))
//!     }
//! }
//!
//! let dir = tempfile::tempdir()?;
//! let session = SessionCache::open(dir.path().join("session-1")).await?;
//! let disk = session
//!     .get_or_create("disk-flat.vmdk", 1 << 20, 4096, Origin::Backup)
//!     .await?;
//! // A 512-byte guest write: the cache copies the base of its 4 KiB block.
//! disk.write(1024, Bytes::from(vec![1; 512]), Stability::FileSync, &Backup)
//!     .await?;
//! let segments = disk.read(0, 8192).await?;
//! assert!(matches!(segments[0], Segment::Cached(_)));
//! assert_eq!(segments[1], Segment::Base { offset: 4096, len: 4096 });
//! let bytes = disk.read_overlay(0, 8192, &Backup).await?;
//! assert_eq!(&bytes[1020..1028], &[0xAA, 0xAA, 0xAA, 0xAA, 1, 1, 1, 1]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

mod batch;
mod bitmap;
mod commit;
mod error;
mod files;
pub mod format;
mod journal;
mod open;
mod range_lock;
mod resize;
mod segment;
mod session;
mod write_cache;

pub use error::{CacheError, Result};
pub use files::{max_open_caches, open_caches, reopened_caches, set_max_open_caches};
pub use format::DEFAULT_BLOCK_SIZE;
pub use segment::{assemble, BaseRead, NoBase, Segment};
pub use session::SessionCache;
pub use write_cache::{CachePaths, Origin, Stability, WriteCache};

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;
