//! The shared state of one write cache and its group commit: which blocks are
//! present in memory, which bitmap pages, header and journal records are not
//! yet on disk, and the single flush that makes them durable for every waiter
//! at once.
//!
//! # Two kinds of flush
//!
//! A *journal flush* appends the pending records (the bytes of recent
//! writes, see `journal.rs`) to the journal with one `fdatasync`. It is
//! enough when every change since the last checkpoint is a journaled write:
//! replay at `open` redoes them. This is the fast path of stable writes.
//!
//! A *checkpoint* makes the data file and bitmap themselves durable, in three
//! steps, never reordered:
//!
//! 1. Under the state lock, snapshot the dirty bitmap pages and the header.
//!    Every bit in the snapshot was set *after* the `pwrite` of its data
//!    returned, so its data is already in the data file's page cache.
//! 2. `fdatasync` the data file: all that data is now durable.
//! 3. Write the snapshot pages and header to the `.map` file, `fdatasync` it.
//!
//! So the on-disk bitmap never has a bit set whose data is not durable. Bits
//! set after step 1 stay dirty for the next flush. Then, if the journal holds
//! records, it starts a new epoch (4.), which kills them: the data file and
//! bitmap now cover every one of them (they were all written before step 1).
//!
//! A flush is a checkpoint when some change is not journaled (an unstable
//! write beyond the pending budget, a write too large for a record, a
//! punch, a resize, a repair) or when the journal has grown past its
//! checkpoint size; otherwise it is a journal flush.
//!
//! # Group commit
//!
//! Every change (a write's bits, a truncate) takes a sequence number
//! `write_seq`. A caller that needs sequence `s` durable waits until
//! `durable_seq >= s`. If no flush is running it starts one; otherwise it
//! waits for the running flush to end and checks again. A flush covers
//! everything up to the `write_seq` of its snapshot, so all callers that
//! arrived while one flush ran are served by the next single flush: N
//! concurrent stable writes cost about one journal sync, not N.
//!
//! The flush runs in `spawn_blocking`, detached from the caller that started
//! it, so a cancelled caller never leaves the cache "flushing" forever. On a
//! FUSE request or NBD connection thread (`fsutil::serves_blocking`) it runs
//! on that thread:
//! its caller is never cancelled, and the hand-off would cost a wake-up
//! per fsync.

use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

use super::bitmap::{Bitmap, BLOCKS_PER_PAGE};
use super::error::{io_err, CacheError, Result};
use super::files::{FileSlot, Files};
use super::format::{
    Header, BITMAP_OFFSET, BITMAP_PAGE_BYTES, JOURNAL_CHECKPOINT_BYTES, MAX_RECORD_LEN,
};
use super::journal::{Journal, Record};
use super::range_lock::RangeLocks;
use super::write_cache::CachePaths;
use crate::bufpool::BufferPool;

/// An I/O event recorded in tests, to check the durability ordering against
/// a model of what a power loss would keep (see `tests::power_loss_model`).
#[cfg(test)]
#[derive(Debug, Clone)]
pub(crate) enum Event {
    /// Blocks `start..end` of the data file were written (the call returned).
    DataWritten(u64, u64),
    /// An `fdatasync` of the data file is about to start.
    DataSyncStart,
    /// That `fdatasync` returned.
    DataSyncEnd,
    /// A bitmap page is about to be written with these bytes.
    MapPage(u64, Vec<u8>),
    /// The data file was truncated: blocks from this one on are gone.
    DataTruncated(u64),
    /// The `.map` file's `fdatasync` returned: the pages written are durable.
    MapSyncEnd,
    /// Journal records covering these block ranges were written...
    JournalAppend(Vec<(u64, u64)>),
    /// ...and the journal's `fdatasync` returned.
    JournalSyncEnd,
    /// The journal started a new epoch: its records are dead.
    JournalReset,
    /// A stable write of blocks `start..end` was acknowledged to its caller.
    Acked(u64, u64),
}

/// Records an `Event` in test builds; compiles to nothing otherwise.
macro_rules! trace_io {
    ($shared:expr, $event:expr) => {
        #[cfg(test)]
        {
            $shared
                .trace
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push($event);
        }
    };
}
pub(crate) use trace_io;

/// State of one write cache, shared by its handle and background flushes.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Where the cache lives (for errors and deletion).
    pub paths: CachePaths,
    /// The data, map and journal files, open while in use (see `files.rs`).
    pub slot: Arc<FileSlot>,
    /// Where the journal's next record goes; only the (serialized) flush
    /// and `open` touch it.
    pub journal: Mutex<Journal>,
    /// Block size in bytes (a power of two).
    pub block_size: u64,
    /// Everything that changes, behind one short-held lock.
    pub inner: Mutex<Inner>,
    /// Serializes requests on overlapping blocks.
    pub locks: Arc<RangeLocks>,
    /// Bumped at the end of every flush; waiters watch it.
    pub flushed: watch::Sender<u64>,
    /// Number of flushes that ran: a metric, and proof of group commit.
    pub flushes: AtomicU64,
    /// A `presync` thread is running.
    pub presyncing: Arc<AtomicBool>,
    /// Buffers for long reads of cached bytes (see `WriteCache::read`).
    pub read_buffers: Arc<BufferPool>,
    /// I/O events, for the ordering test.
    #[cfg(test)]
    pub trace: Mutex<Vec<Event>>,
}

/// The mutable state of a write cache.
#[derive(Debug)]
pub(crate) struct Inner {
    /// Present blocks, including those of writes not yet durable.
    pub bitmap: Bitmap,
    /// Bitmap pages changed since the last flush snapshot.
    pub dirty_pages: BTreeSet<u64>,
    /// Current header (sizes); `sequence` is that of the last header written.
    pub header: Header,
    /// Whether `header` changed since the last flush snapshot.
    pub header_dirty: bool,
    /// Whether the data file was written since the last flush snapshot.
    pub data_dirty: bool,
    /// Sequence of the last change.
    pub write_seq: u64,
    /// Every change up to this sequence is durable.
    pub durable_seq: u64,
    /// A flush is running.
    pub flushing: bool,
    /// Set when a flush failed; the cache then refuses writes.
    pub poisoned: Option<String>,
    /// Journal records of writes not yet appended, in sequence order.
    pub records: Vec<Record>,
    /// Encoded bytes of `records`.
    pub record_bytes: u64,
    /// Some change since the last checkpoint snapshot is not in a journal
    /// record: the next flush must be a checkpoint.
    pub unjournaled: bool,
    /// Bytes of live records in the journal (as of the last flush).
    pub journal_bytes: u64,
    /// Journal size past which the next flush is a checkpoint.
    pub checkpoint_bytes: u64,
    /// Journal size at the last `presync` (0 after a checkpoint).
    pub presync_mark: u64,
    /// Bitmap pages whose bytes in the `.map` file are allocated, so a
    /// checkpoint can write them without needing space (see
    /// `Shared::reserve_map_pages`).
    pub map_reserved: BTreeSet<u64>,
    /// The flush that last failed without losing anything (for want of
    /// space, or its files could not be reopened), until one succeeds: its
    /// number in `Shared::flushed` and its error, which its waiters get.
    pub failed_flush: Option<(u64, RetryableError)>,
}

/// The error of a flush that lost nothing, as its waiters get it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RetryableError {
    kind: std::io::ErrorKind,
    os: Option<i32>,
}

impl RetryableError {
    fn to_io(self) -> std::io::Error {
        match self.os {
            Some(code) => std::io::Error::from_raw_os_error(code),
            None => self.kind.into(),
        }
    }
}

impl Inner {
    /// A fresh state for a cache whose disk image matches `bitmap` and `header`.
    pub fn new(bitmap: Bitmap, header: Header) -> Inner {
        Inner {
            bitmap,
            dirty_pages: BTreeSet::new(),
            header,
            header_dirty: false,
            data_dirty: false,
            write_seq: 0,
            durable_seq: 0,
            flushing: false,
            poisoned: None,
            records: Vec::new(),
            record_bytes: 0,
            unjournaled: false,
            journal_bytes: 0,
            checkpoint_bytes: JOURNAL_CHECKPOINT_BYTES,
            presync_mark: 0,
            map_reserved: BTreeSet::new(),
            failed_flush: None,
        }
    }

    /// Records a change that no journal record covers: the next flush will
    /// be a checkpoint, which also covers the pending records, so they are
    /// dropped now rather than held in memory.
    pub fn mark_unjournaled(&mut self) {
        self.unjournaled = true;
        self.records.clear();
        self.record_bytes = 0;
    }

    /// Queues the journal record of a write whose bytes are in the data file
    /// and whose bits are set; falls back to `mark_unjournaled` when the
    /// record is too large or too much is pending already.
    pub fn push_record(&mut self, record: Record) {
        let len = record.encoded_len();
        if self.unjournaled
            || record.len() > u64::from(MAX_RECORD_LEN)
            || self.record_bytes + len > MAX_PENDING_RECORD_BYTES
        {
            self.mark_unjournaled();
            return;
        }
        self.record_bytes += len;
        self.records.push(record);
    }

    /// Records a change and returns its sequence number.
    pub fn bump(&mut self) -> u64 {
        self.write_seq += 1;
        self.write_seq
    }

    /// Sets the bits of blocks `start..end`, marking their pages dirty.
    pub fn set_blocks(&mut self, start: u64, end: u64) {
        let dirty = &mut self.dirty_pages;
        self.bitmap.set_range(start, end, |p| {
            dirty.insert(p);
        });
    }

    /// Clears the bits of blocks `start..end`, marking their pages dirty.
    pub fn clear_blocks(&mut self, start: u64, end: u64) {
        let dirty = &mut self.dirty_pages;
        self.bitmap.clear_range(start, end, |p| {
            dirty.insert(p);
        });
    }
}

/// Most bytes of journal records held in memory between flushes. Unstable
/// writes are journaled too (so a COMMIT is one journal sync), but a client
/// that streams unstable writes without committing would pile up records:
/// past this budget they are dropped and the next flush is a checkpoint.
const MAX_PENDING_RECORD_BYTES: u64 = 8 << 20;

/// What one flush writes, taken under the lock in step 1.
struct Batch {
    seq: u64,
    /// Whether this is a checkpoint (else a journal flush of `records`).
    checkpoint: bool,
    /// Journal flush: the records to append.
    records: Vec<Record>,
    data_dirty: bool,
    pages: Vec<(u64, Vec<u8>)>,
    header: Option<Header>,
}

impl Shared {
    /// Locks the state; a panic elsewhere never leaves it unusable, because
    /// every critical section keeps it consistent.
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cache's open files (reopened if the bound on open files closed
    /// them). Blocking.
    ///
    /// # Errors
    /// I/O errors reopening them.
    pub fn files(&self) -> Result<Arc<Files>> {
        self.slot.get()
    }

    /// Makes sure the `.map` file has space for the bitmap pages of blocks
    /// `first..=last`, before a write publishes them: a checkpoint then
    /// never needs space, so a full file system fails the write itself
    /// (with nothing visible) rather than a later flush. Pages are
    /// allocated with `fallocate`, which changes no byte; on a file system
    /// without it, nothing can be reserved and a checkpoint may still run
    /// out of space (see `flush_quietly`). Blocking.
    ///
    /// # Errors
    /// I/O errors of `fallocate`, ENOSPC in particular.
    pub fn reserve_map_pages(&self, files: &Files, first: u64, last: u64) -> Result<()> {
        let pages: Vec<u64> = {
            let inner = self.lock();
            (first / BLOCKS_PER_PAGE..=last / BLOCKS_PER_PAGE)
                .filter(|p| !inner.map_reserved.contains(p))
                .collect()
        };
        for page in pages {
            let offset = BITMAP_OFFSET + page * BITMAP_PAGE_BYTES as u64;
            // SAFETY: fallocate on a descriptor we own, with integer arguments.
            let rc = unsafe {
                libc::fallocate(
                    files.map.as_raw_fd(),
                    libc::FALLOC_FL_KEEP_SIZE,
                    offset as libc::off_t,
                    BITMAP_PAGE_BYTES as libc::off_t,
                )
            };
            if rc != 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
                    return Err(io_err("reserve space in", &self.paths.map)(err));
                }
            }
            self.lock().map_reserved.insert(page);
        }
        Ok(())
    }

    /// Blocks `start..end` as runs `(first, end, cached)`, in order.
    pub fn cached_runs(&self, start: u64, end: u64) -> Vec<(u64, u64, bool)> {
        let inner = self.lock();
        let mut runs: Vec<(u64, u64, bool)> = Vec::new();
        for block in start..end {
            let cached = inner.bitmap.get(block);
            match runs.last_mut() {
                Some(run) if run.2 == cached => run.1 = block + 1,
                _ => runs.push((block, block + 1, cached)),
            }
        }
        runs
    }

    /// Fails if an earlier flush failed.
    pub fn check_poisoned(inner: &Inner, paths: &CachePaths) -> Result<()> {
        match &inner.poisoned {
            Some(reason) => Err(CacheError::Poisoned {
                path: paths.map.clone(),
                reason: reason.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Waits until every change up to `target` is durable, flushing as needed.
    ///
    /// # Errors
    /// `Poisoned` if this or an earlier flush failed; an ENOSPC I/O error if
    /// a flush that ended while this caller waited failed for want of space
    /// (the cache is not poisoned: a later flush tries again).
    pub async fn commit_upto(self: &Arc<Self>, target: u64) -> Result<()> {
        // The flush count when this caller started waiting: a flush that
        // ends after that and fails for want of space fails this caller.
        let mut since: Option<u64> = None;
        loop {
            // Subscribe before looking, so the end of any flush running now
            // (or started by us) wakes us.
            let mut rx = self.flushed.subscribe();
            let now = *rx.borrow();
            let start = {
                let mut inner = self.lock();
                Self::check_poisoned(&inner, &self.paths)?;
                if inner.durable_seq >= target {
                    return Ok(());
                }
                if let (Some(since), Some((failed, err))) = (since, inner.failed_flush) {
                    if failed > since {
                        return Err(CacheError::Io {
                            action: "flush",
                            path: self.paths.map.clone(),
                            source: err.to_io(),
                        });
                    }
                }
                let start = !inner.flushing;
                inner.flushing = true;
                start
            };
            since.get_or_insert(now);
            if start {
                let shared = Arc::clone(self);
                let flush = move || {
                    let flushed = shared.flushed.clone();
                    shared.flush_quietly();
                    // Let go of the files before waking anyone, so a waiter
                    // that drops its handle really closes (and unlocks) them.
                    drop(shared);
                    flushed.send_modify(|n| *n += 1);
                };
                if crate::fsutil::serves_blocking() {
                    // A request thread runs its caller to the end: the
                    // flush cannot be abandoned half way.
                    flush();
                } else {
                    // Detached on purpose: see the module doc.
                    drop(tokio::task::spawn_blocking(flush));
                }
            }
            if rx.changed().await.is_err() {
                // Unreachable while `self` holds the sender; stay safe anyway.
                return Err(CacheError::Poisoned {
                    path: self.paths.map.clone(),
                    reason: "flush notifier dropped".into(),
                });
            }
        }
    }

    /// One flush (steps 1-3 of the module doc). Called with `flushing` set;
    /// clears it and wakes all waiters when done.
    pub fn flush(&self) {
        self.flush_quietly();
        self.flushed.send_modify(|n| *n += 1);
    }

    /// `flush` without waking the waiters: the caller must do it.
    ///
    /// A flush that fails for want of space (ENOSPC from a write, never from
    /// a sync), or because its files could not be reopened (their storage
    /// went away), lost nothing: what it took goes back to dirty, the next
    /// flush tries again, and the callers waiting on this one get the
    /// error. Any other failure poisons the cache: what reached the disk is
    /// unknown.
    fn flush_quietly(&self) {
        let mut batch = self.take_batch();
        let result = self.write_batch(&mut batch);
        self.flushes.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        inner.flushing = false;
        match result {
            Ok(journal_bytes) => {
                inner.failed_flush = None;
                inner.durable_seq = inner.durable_seq.max(batch.seq);
                inner.journal_bytes = journal_bytes;
                if batch.checkpoint {
                    inner.presync_mark = 0;
                } else if journal_bytes >= inner.presync_mark + inner.checkpoint_bytes / 4 {
                    inner.presync_mark = journal_bytes;
                    drop(inner);
                    self.presync();
                }
            }
            Err(err) if retryable(&err).is_some() => {
                tracing::warn!(cache = %self.paths.map.display(), cause = %err, "write cache flush failed without losing anything; the next one tries again");
                // This flush's number once `flushed` is bumped for it.
                let number = *self.flushed.borrow() + 1;
                inner.failed_flush = retryable(&err).map(|e| (number, e));
                for (page, _) in &batch.pages {
                    inner.dirty_pages.insert(*page);
                }
                if batch.header.is_some() {
                    // The retry writes the same slot again: never the slot
                    // of the last good header.
                    inner.header.sequence -= 1;
                    inner.header_dirty = true;
                }
                inner.data_dirty |= batch.data_dirty;
                inner.mark_unjournaled();
            }
            Err(err) => {
                tracing::error!(cache = %self.paths.map.display(), cause = %err, "write cache flush failed");
                inner.poisoned = Some(err.to_string());
            }
        }
    }

    /// Starts an `fdatasync` of the data file on its own thread, off the
    /// flush path: the data behind the journal's records is written back (and
    /// its blocks allocated) while appends go on, so the next checkpoint's
    /// own data sync finds little left to do instead of stalling every
    /// stable write for the whole writeback. Syncing data never publishes
    /// anything, so it needs no ordering. Works on a duplicate of the file
    /// descriptor, so it never keeps the cache (its `flock`) open.
    fn presync(&self) {
        if self.presyncing.swap(true, Ordering::AcqRel) {
            return;
        }
        let Some(data) = self.files().ok().and_then(|f| f.data.try_clone().ok()) else {
            self.presyncing.store(false, Ordering::Release);
            return;
        };
        let running = Arc::clone(&self.presyncing);
        let spawned = std::thread::Builder::new()
            .name("cache-presync".into())
            .spawn(move || {
                // An error here is found again by the checkpoint's own sync.
                let _ = data.sync_data();
                running.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.presyncing.store(false, Ordering::Release);
        }
    }

    /// Step 1: snapshot what is dirty, and choose the kind of flush.
    fn take_batch(&self) -> Batch {
        let mut inner = self.lock();
        let records = std::mem::take(&mut inner.records);
        let record_bytes = std::mem::take(&mut inner.record_bytes);
        let checkpoint =
            inner.unjournaled || inner.journal_bytes + record_bytes > inner.checkpoint_bytes;
        if !checkpoint {
            return Batch {
                seq: inner.write_seq,
                checkpoint,
                records,
                data_dirty: false,
                pages: Vec::new(),
                header: None,
            };
        }
        Self::checkpoint_batch(&mut inner)
    }

    /// Step 1 of a checkpoint. It covers the pending records (their data
    /// and bits are in the snapshot): they are never appended.
    fn checkpoint_batch(inner: &mut Inner) -> Batch {
        inner.records.clear();
        inner.record_bytes = 0;
        inner.unjournaled = false;
        let pages = std::mem::take(&mut inner.dirty_pages)
            .into_iter()
            .map(|p| (p, inner.bitmap.page_bytes(p)))
            .collect();
        let header = if inner.header_dirty {
            inner.header_dirty = false;
            inner.header.sequence += 1;
            Some(inner.header)
        } else {
            None
        };
        Batch {
            seq: inner.write_seq,
            checkpoint: true,
            records: Vec::new(),
            data_dirty: std::mem::take(&mut inner.data_dirty),
            pages,
            header,
        }
    }

    /// The journal, locked. Only the serialized flush and `open` use it, so
    /// the lock is never contended.
    pub fn journal(&self) -> MutexGuard<'_, Journal> {
        self.journal.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Writes a batch; returns the live bytes of the journal after it.
    ///
    /// When the journal cannot grow (the file system is full), the batch
    /// becomes a checkpoint: the data file and map need no new space for
    /// what the records hold (the data is written, the map pages
    /// reserved), so stable writes keep working on a full file system.
    fn write_batch(&self, batch: &mut Batch) -> Result<u64> {
        tracing::debug!(
            cache = %self.paths.map.display(),
            seq = batch.seq,
            checkpoint = batch.checkpoint,
            records = batch.records.len(),
            pages = batch.pages.len(),
            header = batch.header.is_some(),
            "flush"
        );
        let files = self.files().map_err(|e| match e {
            CacheError::Io { path, source, .. } => CacheError::Io {
                action: REOPEN,
                path,
                source,
            },
            other => other,
        })?;
        let mut journal = self.journal();
        if !batch.checkpoint {
            trace_io!(
                self,
                Event::JournalAppend(block_ranges(self.block_size, &batch.records))
            );
            match journal.append(&files.journal, &batch.records) {
                Ok(()) => {
                    trace_io!(self, Event::JournalSyncEnd);
                    return Ok(journal.live_bytes());
                }
                Err(err) if is_no_space(&err) => {
                    tracing::info!(cache = %self.paths.map.display(), cause = %err, "journal cannot grow; checkpointing instead");
                    *batch = Self::checkpoint_batch(&mut self.lock());
                    self.checkpoint(&files, batch)?;
                    // A new epoch even when no record was live: whatever
                    // the failed append left in the file is dead.
                    journal.reset(&files.journal)?;
                    trace_io!(self, Event::JournalReset);
                    return Ok(journal.live_bytes());
                }
                Err(err) => return Err(err),
            }
        }
        self.checkpoint(&files, batch)?;
        if journal.live_bytes() > 0 {
            // 4. Every live record is now covered by the data file and map.
            journal.reset(&files.journal)?;
            trace_io!(self, Event::JournalReset);
        }
        Ok(journal.live_bytes())
    }

    /// Steps 2 and 3: data durable first, then the map that publishes it.
    fn checkpoint(&self, files: &Files, batch: &Batch) -> Result<()> {
        if batch.data_dirty {
            trace_io!(self, Event::DataSyncStart);
            files
                .data
                .sync_data()
                .map_err(io_err("sync", &self.paths.data))?;
            trace_io!(self, Event::DataSyncEnd);
        }
        if batch.pages.is_empty() && batch.header.is_none() {
            return Ok(());
        }
        let map_err = || io_err("write", &self.paths.map);
        for (page, bytes) in &batch.pages {
            let off = BITMAP_OFFSET + page * BITMAP_PAGE_BYTES as u64;
            trace_io!(self, Event::MapPage(*page, bytes.clone()));
            files.map.write_all_at(bytes, off).map_err(map_err())?;
        }
        if let Some(header) = batch.header {
            files
                .map
                .write_all_at(&header.encode(), header.slot_offset())
                .map_err(map_err())?;
        }
        files
            .map
            .sync_data()
            .map_err(io_err("sync", &self.paths.map))?;
        trace_io!(self, Event::MapSyncEnd);
        let mut inner = self.lock();
        inner
            .map_reserved
            .extend(batch.pages.iter().map(|(page, _)| *page));
        Ok(())
    }
}

/// The action of a flush that could not reopen its cache's files.
const REOPEN: &str = "reopen for a flush";

/// The error of a flush that lost nothing (see `flush_quietly`), if so.
fn retryable(err: &CacheError) -> Option<RetryableError> {
    match err {
        CacheError::Io { action, source, .. } if is_no_space(err) || *action == REOPEN => {
            Some(RetryableError {
                kind: source.kind(),
                os: source.raw_os_error(),
            })
        }
        _ => None,
    }
}

/// Whether an error means the file system is out of space (or quota) in a
/// write call: nothing written before it was lost, so the cache can go on.
/// ENOSPC from a sync is different: written-back data may be gone.
pub(crate) fn is_no_space(err: &CacheError) -> bool {
    match err {
        CacheError::Io { action, source, .. } => {
            *action != "sync"
                && matches!(
                    source.raw_os_error(),
                    Some(libc::ENOSPC) | Some(libc::EDQUOT)
                )
        }
        _ => false,
    }
}

/// The blocks each record covers (for the ordering test's trace).
#[cfg(test)]
fn block_ranges(block_size: u64, records: &[Record]) -> Vec<(u64, u64)> {
    records
        .iter()
        .filter(|r| r.len() > 0)
        .map(|r| {
            (
                r.offset / block_size,
                (r.offset + r.len() - 1) / block_size + 1,
            )
        })
        .collect()
}
