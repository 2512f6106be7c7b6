//! `WriteCache`: the write cache of one published file, the async API that
//! the datastore overlays on the backup. It owns the type and the read and
//! write paths (with copy-on-write); resize and punch live in `resize`,
//! durability in `commit`, file setup in `open`.
//!
//! Invariants kept by every path:
//! - bytes of a cached block beyond the logical size are zero in the data
//!   file (so extending a file never reveals old bytes);
//! - `base_len <= logical_size` (a truncate hides the base beyond it for good);
//! - a bit is set in memory only after its block's data is in the data file;
//! - a write's journal record is queued under the same lock that sets its
//!   bits, so records reach the journal in the order the data file got them.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

#[cfg(test)]
use super::commit::trace_io;
#[cfg(test)]
use super::commit::Event;
use super::commit::Shared;
use super::error::{io_err, join_err, CacheError, Result};
use super::format::MAX_LOGICAL_SIZE;
use super::open::{self, read_full_at};
use super::segment::{assemble, BaseRead, Segment};

/// How durable a write must be before `write` returns (NFSv3 `stable_how`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stability {
    /// Readable at once, durable only after `commit`.
    Unstable,
    /// Durable on return (same as `FileSync` here: sizes live with the bitmap).
    DataSync,
    /// Durable on return, data and size.
    FileSync,
}

/// Where the bytes of absent blocks come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A file of the backup: absent blocks below the initial size read from it.
    Backup,
    /// A file created by a client: absent blocks read as zeros.
    New,
}

/// The three files of one write cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachePaths {
    /// Sparse data file, same offsets as the logical file.
    pub data: PathBuf,
    /// Header slots and bitmap.
    pub map: PathBuf,
    /// Write-ahead journal of recent writes (see `journal.rs`).
    pub journal: PathBuf,
}

impl CachePaths {
    /// `DIR/NAME.data`, `DIR/NAME.map` and `DIR/NAME.journal`.
    pub fn in_dir(dir: &Path, name: &str) -> CachePaths {
        CachePaths {
            data: dir.join(format!("{name}.data")),
            map: dir.join(format!("{name}.map")),
            journal: dir.join(format!("{name}.journal")),
        }
    }
}

/// The write cache of one file: client writes land here, never in the backup.
///
/// Cheap to share (`Send + Sync`); every method takes `&self` and may run from
/// many tasks at once. Requests on disjoint blocks run concurrently.
///
/// Dropping it does not flush `Unstable` writes (like a crash, which NFS
/// clients are ready for); call `commit` first for a clean shutdown.
#[derive(Debug)]
pub struct WriteCache {
    pub(super) shared: Arc<Shared>,
}

pub(super) fn check_range(offset: u64, len: u64) -> Result<u64> {
    match offset.checked_add(len) {
        Some(end) if end <= MAX_LOGICAL_SIZE => Ok(end),
        _ => Err(CacheError::TooLarge { offset, len }),
    }
}

/// Runs blocking file I/O off the async threads (see `fsutil::blocking`).
pub(super) async fn blocking<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    crate::fsutil::blocking(f)
        .await
        .map_err(|e| join_err(path, e))?
}

impl WriteCache {
    /// Creates an empty cache for a file of `logical_size` bytes.
    ///
    /// With `Origin::Backup` absent blocks read from the base up to
    /// `logical_size`; with `Origin::New` they read as zeros.
    ///
    /// # Errors
    /// `InvalidBlockSize`, `TooLarge`, `Exists`, or I/O errors.
    pub async fn create(
        paths: &CachePaths,
        logical_size: u64,
        block_size: u32,
        origin: Origin,
    ) -> Result<WriteCache> {
        let base_len = match origin {
            Origin::Backup => logical_size,
            Origin::New => 0,
        };
        let p = paths.clone();
        let shared = blocking(&paths.map, move || {
            open::create(&p, logical_size, base_len, block_size)
        })
        .await?;
        Ok(WriteCache {
            shared: Arc::new(shared),
        })
    }

    /// Opens an existing cache, checking its header and repairing what a crash
    /// left behind. Every write acknowledged stable before the crash is there.
    ///
    /// # Errors
    /// `BadMagic`, `CorruptHeader`, or I/O errors (also when another process
    /// holds the cache open).
    pub async fn open(paths: &CachePaths) -> Result<WriteCache> {
        let p = paths.clone();
        let shared = blocking(&paths.map, move || open::open(&p)).await?;
        Ok(WriteCache {
            shared: Arc::new(shared),
        })
    }

    /// Sets the journal size past which a flush checkpoints (default
    /// `format::JOURNAL_CHECKPOINT_BYTES`). Small values make checkpoints
    /// frequent: for crash tests, which want kills to land in them.
    #[doc(hidden)]
    pub fn set_checkpoint_bytes(&self, bytes: u64) {
        self.shared.lock().checkpoint_bytes = bytes;
    }

    /// Removes the cache's files. Unflushed writes are dropped with it.
    ///
    /// # Errors
    /// I/O errors other than "not found".
    pub async fn delete(self) -> Result<()> {
        let paths = self.shared.paths.clone();
        self.shared.slot.close_for_delete();
        drop(self);
        let p = paths.clone();
        blocking(&paths.map, move || open::delete(&p)).await
    }

    /// The cache's files.
    pub fn paths(&self) -> &CachePaths {
        &self.shared.paths
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.shared.block_size as u32
    }

    /// Size of the file as clients see it.
    pub fn len(&self) -> u64 {
        self.shared.lock().header.logical_size
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of the base still visible (absent blocks below it read from it).
    pub fn base_len(&self) -> u64 {
        self.shared.lock().header.base_len
    }

    /// Bytes of present blocks: what this file's writes occupy (punched
    /// blocks count too, so this is an upper bound). Cheap; for metrics.
    pub fn bytes_used(&self) -> u64 {
        self.shared.lock().bitmap.count() * self.shared.block_size
    }

    /// Bytes the three files really occupy on disk (`st_blocks`). Blocking
    /// (`stat` of each file; no descriptor needed).
    ///
    /// # Errors
    /// I/O errors of `stat`.
    pub fn allocated_bytes(&self) -> Result<u64> {
        let p = &self.shared.paths;
        let mut total = 0;
        for path in [&p.data, &p.map, &p.journal] {
            total += std::fs::metadata(path)
                .map_err(io_err("stat", path))?
                .blocks()
                * 512;
        }
        Ok(total)
    }

    /// Number of flushes (journal syncs and checkpoints) run so far.
    pub fn flush_count(&self) -> u64 {
        self.shared.flushes.load(Ordering::Relaxed)
    }

    /// The I/O events recorded so far (tests only).
    #[cfg(test)]
    pub(crate) fn trace_events(&self) -> Vec<Event> {
        self.shared
            .trace
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether `block` is present in the cache (written, maybe not durable).
    pub fn is_cached(&self, block: u64) -> bool {
        self.shared.lock().bitmap.get(block)
    }

    /// Byte ranges of `[offset, offset + len)` whose blocks are present in
    /// the cache (written, punched or copied on write), clipped to the range
    /// and to the logical size, merged and in order. For block status
    /// queries: present bytes are served from the cache, never the base.
    pub fn present_ranges(&self, offset: u64, len: u64) -> Vec<std::ops::Range<u64>> {
        let bs = self.shared.block_size;
        let inner = self.shared.lock();
        let end = offset.saturating_add(len).min(inner.header.logical_size);
        if offset >= end {
            return Vec::new();
        }
        inner
            .bitmap
            .runs(offset / bs, end.div_ceil(bs))
            .into_iter()
            .map(|r| (r.start * bs).max(offset)..(r.end * bs).min(end))
            .collect()
    }

    /// Splits `[offset, offset + len)` into cached bytes, base ranges and
    /// zeros, truncated at the logical size. Adjacent pieces of one kind are
    /// merged.
    ///
    /// # Errors
    /// `TooLarge`, or I/O errors reading the data file.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Vec<Segment>> {
        check_range(offset, len)?;
        let bs = self.shared.block_size;
        // Plan under the lock, read the data file outside it.
        let mut plan: Vec<(Kind, u64, u64)> = Vec::new();
        {
            let inner = self.shared.lock();
            let end = (offset + len).min(inner.header.logical_size);
            let base_len = inner.header.base_len;
            let mut pos = offset;
            while pos < end {
                let block = pos / bs;
                let block_end = ((block + 1) * bs).min(end);
                let mut push = |kind: Kind, s: u64, e: u64| {
                    if s >= e {
                        return;
                    }
                    match plan.last_mut() {
                        Some(last) if last.0 == kind && last.2 == s => last.2 = e,
                        _ => plan.push((kind, s, e)),
                    }
                };
                if inner.bitmap.get(block) {
                    push(Kind::Cached, pos, block_end);
                } else {
                    let split = base_len.clamp(pos, block_end);
                    push(Kind::Base, pos, split);
                    push(Kind::Zero, split, block_end);
                }
                pos = block_end;
            }
        }
        if !plan.iter().any(|p| p.0 == Kind::Cached) {
            return Ok(plan
                .into_iter()
                .map(|p| to_segment(p, Bytes::new()))
                .collect());
        }
        let shared = Arc::clone(&self.shared);
        blocking(&self.shared.paths.data, move || {
            let files = shared.files()?;
            let mut out = Vec::with_capacity(plan.len());
            for p in plan {
                let mut bytes = Bytes::new();
                if p.0 == Kind::Cached {
                    bytes = read_cached(&shared, &files.data, p.1, (p.2 - p.1) as usize)?;
                }
                out.push(to_segment(p, bytes));
            }
            Ok(out)
        })
        .await
    }

    /// Reads `[offset, offset + len)` as one buffer, taking absent bytes from
    /// `base`. Truncated at the logical size.
    ///
    /// # Errors
    /// As `read`, plus `Base` when `base` fails.
    pub async fn read_overlay<B: BaseRead + ?Sized>(
        &self,
        offset: u64,
        len: u64,
        base: &B,
    ) -> Result<Bytes> {
        let segments = self.read(offset, len).await?;
        assemble(segments, base)
            .await
            .map_err(|source| CacheError::Base { offset, source })
    }

    /// Writes `data` at `offset`, extending the file if it ends beyond it.
    ///
    /// A partial block not yet cached is copied on write: the cache asks
    /// `base` for that block's base bytes (only for the head and tail blocks,
    /// only below the base length), merges, and writes whole blocks. With
    /// `Unstable` the data is readable at once and durable after `commit`;
    /// otherwise it is durable when this returns (group commit).
    ///
    /// # Errors
    /// `TooLarge`, `Base`, `Poisoned`, or I/O errors.
    pub async fn write<B: BaseRead + ?Sized>(
        &self,
        offset: u64,
        data: Bytes,
        stability: Stability,
        base: &B,
    ) -> Result<()> {
        let end = check_range(offset, data.len() as u64)?;
        if data.is_empty() {
            return self.finish(stability, None).await;
        }
        #[cfg(not(test))]
        let _ = end;
        let prepared = self.prepare(offset, data, base).await?;
        let shared = Arc::clone(&self.shared);
        let seq = blocking(&self.shared.paths.data, move || {
            let files = shared.files()?;
            prepared.apply(&shared, &files)
        })
        .await?;
        self.finish(stability, Some(seq)).await?;
        #[cfg(test)]
        if stability != Stability::Unstable {
            self.trace_ack(offset, end);
        }
        Ok(())
    }

    /// Builds block `block` for a copy-on-write: base bytes (zeros beyond
    /// `base_len`) overlaid with the part of `data` (at `offset`) inside it.
    pub(super) async fn cow_block<B: BaseRead + ?Sized>(
        &self,
        block: u64,
        base_len: u64,
        offset: u64,
        data: &[u8],
        base: &B,
    ) -> Result<Bytes> {
        let bs = self.shared.block_size;
        let start = block * bs;
        let mut buf = BytesMut::zeroed(bs as usize);
        if start < base_len {
            let want = ((start + bs).min(base_len) - start) as usize;
            let got = base
                .read_base(start, want)
                .await
                .map_err(|source| CacheError::Base {
                    offset: start,
                    source,
                })?;
            if got.len() != want {
                return Err(CacheError::Base {
                    offset: start,
                    source: std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("base returned {} of {want} bytes", got.len()),
                    ),
                });
            }
            buf[..want].copy_from_slice(&got);
        }
        let from = offset.max(start);
        let to = (offset + data.len() as u64).min(start + bs);
        buf[(from - start) as usize..(to - start) as usize]
            .copy_from_slice(&data[(from - offset) as usize..(to - offset) as usize]);
        Ok(buf.freeze())
    }

    /// Makes the change `seq` (or everything, for `None`) durable if asked.
    pub(super) async fn finish(&self, stability: Stability, seq: Option<u64>) -> Result<()> {
        if stability == Stability::Unstable {
            return Ok(());
        }
        match seq {
            Some(seq) => self.shared.commit_upto(seq).await,
            None => self.commit().await,
        }
    }

    /// Records, in test builds, that a stable write of `offset..end` was
    /// acknowledged, so the ordering test can check it was durable.
    #[cfg(test)]
    pub(super) fn trace_ack(&self, offset: u64, end: u64) {
        let bs = self.shared.block_size;
        trace_io!(self.shared, Event::Acked(offset / bs, end.div_ceil(bs)));
    }

    /// Makes every write done so far durable (NFSv3 COMMIT). Concurrent
    /// commits and stable writes share one flush.
    ///
    /// # Errors
    /// `Poisoned` if a flush failed.
    pub async fn commit(&self) -> Result<()> {
        let target = self.shared.lock().write_seq;
        self.shared.commit_upto(target).await
    }
}

/// The kind of a planned read piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Cached,
    Base,
    Zero,
}

/// Cached bytes read in one piece this long go into a reused buffer.
pub(super) const POOLED_READ: usize = 64 * 1024;

/// Bytes of free read buffers one cache keeps.
pub(super) const READ_BUFFERS_KEEP: usize = 8 << 20;

/// `len` cached bytes of the data file at `offset`. Long reads go into a
/// reused buffer of the cache's pool (see [`crate::bufpool`]: a fresh,
/// zeroed 1 MiB buffer per read cost more than the read itself). Blocking.
fn read_cached(shared: &Shared, data: &std::fs::File, offset: u64, len: usize) -> Result<Bytes> {
    if len < POOLED_READ {
        let mut buf = BytesMut::zeroed(len);
        // A short read (a concurrent truncate) leaves zeros.
        read_full_at(data, &mut buf, offset).map_err(io_err("read", &shared.paths.data))?;
        return Ok(buf.freeze());
    }
    let mut buf = shared.read_buffers.take(len);
    let got =
        read_full_at(data, &mut buf[..len], offset).map_err(io_err("read", &shared.paths.data))?;
    // A pool buffer holds an earlier read's bytes: what a short read (a
    // concurrent truncate) left out must read as zeros.
    buf[got..len].fill(0);
    Ok(shared.read_buffers.freeze(buf, len))
}

fn to_segment(p: (Kind, u64, u64), bytes: Bytes) -> Segment {
    match p.0 {
        Kind::Cached => Segment::Cached(bytes),
        Kind::Base => Segment::Base {
            offset: p.1,
            len: p.2 - p.1,
        },
        Kind::Zero => Segment::Zero { len: p.2 - p.1 },
    }
}
