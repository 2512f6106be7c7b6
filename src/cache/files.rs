//! The open files of write caches, bounded for the whole process.
//!
//! A write cache needs its three files (data, map, journal) open only while
//! it is read, written or flushed. Keeping them open for good made file
//! descriptors, not space, the limit on how many files a datastore holds:
//! under the usual limit of 1024, an allowed client's ~337th CREATE failed
//! and nothing (not even REMOVE) worked again until a restart. So every
//! cache's files live in a [`FileSlot`], and at most
//! [`max_open_caches`] slots of the process hold open files; opening one
//! more closes the least recently used.
//!
//! # Rules
//!
//! - A closed slot reopens on demand, transparently to its cache.
//! - Operations hold an `Arc<Files>` while they use the descriptors: closing
//!   a slot only drops the slot's reference, and the files close when the
//!   last operation (a flush, a read) lets go. A slot whose files are still
//!   held reuses them instead of reopening, so the process never competes
//!   with itself for the map file's `flock`.
//! - An open that fails with "too many open files" (`EMFILE`, `ENFILE`)
//!   closes half of the open slots and tries again: a REMOVE, which frees,
//!   never fails for want of a descriptor.
//! - A deleted cache's slot closes for good, so its space is freed as soon
//!   as no operation holds it.
//!
//! Blocking code: called from `spawn_blocking` closures and `open`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, Weak};
use std::time::Duration;

use super::error::{io_err, CacheError, Result};
use super::write_cache::CachePaths;

/// Most caches with open files when the descriptor limit is large.
const MAX_OPEN_CEILING: usize = 4096;

/// Fewest caches with open files, whatever the limit.
const MAX_OPEN_FLOOR: usize = 16;

/// Share of the process's descriptor limit the write caches may use: each
/// open cache takes three, a fourth while a background data sync runs. A
/// tenth of the limit in caches (so 30-40 % in descriptors) leaves the
/// rest to connections, the repository and the state folder.
const LIMIT_DIVISOR: u64 = 10;

/// How long a reopen waits for the map's lock, held until an operation
/// that still used the closed files lets go of them (microseconds, in
/// practice).
const RELOCK_WAIT: Duration = Duration::from_millis(200);

/// The three open files of one write cache.
#[derive(Debug)]
pub(crate) struct Files {
    /// The sparse data file, same offsets as the logical file.
    pub data: File,
    /// The header slots and the bitmap; holds an exclusive `flock`.
    pub map: File,
    /// The write-ahead journal.
    pub journal: File,
}

/// Whether an I/O error means the process ran out of descriptors.
fn out_of_descriptors(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// Runs `open`; when it runs out of descriptors, closes half of the open
/// caches and runs it once more.
pub(crate) fn with_descriptors<T>(mut open: impl FnMut() -> io::Result<T>) -> io::Result<T> {
    match open() {
        Err(e) if out_of_descriptors(&e) => {
            let closed = pool().shed();
            tracing::warn!(closed, cause = %e, "out of file descriptors: closed write cache files");
            open()
        }
        other => other,
    }
}

/// Opens `path` for reading and writing (it must exist).
pub(crate) fn open_rw(path: &Path) -> Result<File> {
    with_descriptors(|| OpenOptions::new().read(true).write(true).open(path))
        .map_err(io_err("open", path))
}

/// Takes an exclusive advisory lock, so two processes never run one cache.
///
/// A cache on a mounted datastore may live on a file system without `flock`
/// (ENOLCK, EOPNOTSUPP): then it runs unlocked, with a warning, rather than
/// not at all. With `wait`, a lock held elsewhere is retried for
/// [`RELOCK_WAIT`] (a reopen racing the close of the previous descriptors).
pub(crate) fn lock_exclusive(file: &File, path: &Path, wait: bool) -> Result<()> {
    let deadline = std::time::Instant::now() + RELOCK_WAIT;
    loop {
        // SAFETY: flock on a file descriptor we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ENOLCK) | Some(libc::EOPNOTSUPP) => {
                tracing::warn!(cache = %path.display(), cause = %err, "cannot lock write cache; running it unlocked");
                return Ok(());
            }
            Some(libc::EWOULDBLOCK) if wait && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(1));
            }
            _ => {
                return Err(CacheError::Io {
                    action: "lock (is another revive using it?)",
                    path: path.to_path_buf(),
                    source: err,
                })
            }
        }
    }
}

impl Files {
    /// Opens the three files of an existing cache and locks the map.
    /// `relock`: the slot had them open before (see [`lock_exclusive`]).
    pub fn open(paths: &CachePaths, relock: bool) -> Result<Files> {
        let map = open_rw(&paths.map)?;
        lock_exclusive(&map, &paths.map, relock)?;
        let data = open_rw(&paths.data)?;
        let journal = open_rw(&paths.journal)?;
        Ok(Files { data, map, journal })
    }
}

/// What a slot holds.
#[derive(Debug, Default)]
struct SlotState {
    /// The open files, counted in the pool.
    open: Option<Arc<Files>>,
    /// The files last opened, while an operation still holds them.
    last: Weak<Files>,
    /// The cache was deleted: never reopen.
    deleted: bool,
}

/// The files of one write cache: open, or closed and reopened on demand.
#[derive(Debug)]
pub(crate) struct FileSlot {
    id: u64,
    paths: CachePaths,
    state: Mutex<SlotState>,
    /// Pool tick of the last use, for least-recently-used closing.
    last_used: AtomicU64,
}

impl FileSlot {
    /// A slot holding `files`, just opened or created by the caller.
    pub fn new(paths: &CachePaths, files: Files) -> Arc<FileSlot> {
        let pool = pool();
        let files = Arc::new(files);
        let slot = Arc::new(FileSlot {
            id: pool.next_id.fetch_add(1, Ordering::Relaxed),
            paths: paths.clone(),
            state: Mutex::new(SlotState {
                last: Arc::downgrade(&files),
                open: Some(files),
                deleted: false,
            }),
            last_used: AtomicU64::new(pool.tick()),
        });
        pool.trim(Some(slot.id), 1);
        pool.register(&slot);
        slot
    }

    fn state(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cache's open files, reopened if the pool closed them.
    ///
    /// # Errors
    /// I/O errors reopening (the files are gone, the lock is held by
    /// another process), `NotFound` for a deleted cache.
    pub fn get(self: &Arc<Self>) -> Result<Arc<Files>> {
        let pool = pool();
        self.last_used.store(pool.tick(), Ordering::Relaxed);
        {
            let mut st = self.state();
            if let Some(files) = &st.open {
                return Ok(Arc::clone(files));
            }
            if st.deleted {
                return Err(CacheError::Io {
                    action: "use deleted",
                    path: self.paths.map.clone(),
                    source: io::ErrorKind::NotFound.into(),
                });
            }
            if let Some(files) = st.last.upgrade() {
                st.open = Some(Arc::clone(&files));
                drop(st);
                pool.register(self);
                return Ok(files);
            }
        }
        // Make room before taking our own lock: closing others locks them.
        pool.trim(Some(self.id), 1);
        let mut st = self.state();
        if let Some(files) = &st.open {
            return Ok(Arc::clone(files));
        }
        let files = Arc::new(Files::open(&self.paths, true)?);
        st.last = Arc::downgrade(&files);
        st.open = Some(Arc::clone(&files));
        drop(st);
        pool.register(self);
        pool.reopened.fetch_add(1, Ordering::Relaxed);
        Ok(files)
    }

    /// Lets go of the open files (they close once no operation holds them).
    fn close(&self) {
        let files = {
            let mut st = self.state();
            st.open.take()
        };
        drop(files);
    }

    /// Closes the files for good: the cache is being deleted, and its space
    /// must be freed as soon as no operation holds them.
    pub fn close_for_delete(&self) {
        self.state().deleted = true;
        self.close();
        pool().unregister(self.id);
    }
}

impl Drop for FileSlot {
    fn drop(&mut self) {
        pool().unregister(self.id);
    }
}

/// The process-wide bound on caches with open files.
#[derive(Debug)]
struct Pool {
    /// Slots with open files, by id.
    open: Mutex<HashMap<u64, Weak<FileSlot>>>,
    /// Most slots with open files.
    max_open: AtomicUsize,
    /// Use clock for least-recently-used order.
    clock: AtomicU64,
    next_id: AtomicU64,
    /// Slots reopened after the pool closed them (for tests and metrics).
    reopened: AtomicU64,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool {
        open: Mutex::new(HashMap::new()),
        max_open: AtomicUsize::new(default_max_open()),
        clock: AtomicU64::new(1),
        next_id: AtomicU64::new(1),
        reopened: AtomicU64::new(0),
    })
}

/// A tenth of the soft descriptor limit, within the floor and ceiling.
fn default_max_open() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 1024,
        rlim_max: 1024,
    };
    // SAFETY: getrlimit writes into the rlimit we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        limit.rlim_cur = 1024;
    }
    let soft = limit.rlim_cur.min(u64::from(u32::MAX));
    ((soft / LIMIT_DIVISOR) as usize).clamp(MAX_OPEN_FLOOR, MAX_OPEN_CEILING)
}

impl Pool {
    fn tick(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Weak<FileSlot>>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn register(&self, slot: &Arc<FileSlot>) {
        self.lock().insert(slot.id, Arc::downgrade(slot));
    }

    fn unregister(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Closes least recently used slots (never `keep`) until `room` more
    /// fit under the bound.
    fn trim(&self, keep: Option<u64>, room: usize) {
        let max = self.max_open.load(Ordering::Relaxed);
        self.close_oldest(keep, |open| (open + room).saturating_sub(max));
    }

    /// Closes half of the open slots; returns how many.
    fn shed(&self) -> usize {
        self.close_oldest(None, |open| open.div_ceil(2))
    }

    /// Closes the `count(open slots)` least recently used slots but `keep`.
    ///
    /// Never drops a slot while holding the pool's lock: the last reference
    /// to a slot going away takes the lock (see `Drop for FileSlot`).
    fn close_oldest(&self, keep: Option<u64>, count: impl FnOnce(usize) -> usize) -> usize {
        let (n, mut slots) = {
            let mut open = self.lock();
            open.retain(|_, slot| slot.strong_count() > 0);
            let n = count(open.len());
            if n == 0 {
                return 0;
            }
            let slots: Vec<Arc<FileSlot>> = open.values().filter_map(Weak::upgrade).collect();
            (n, slots)
        };
        slots.retain(|s| Some(s.id) != keep);
        slots.sort_by_key(|s| s.last_used.load(Ordering::Relaxed));
        slots.truncate(n);
        {
            let mut open = self.lock();
            for s in &slots {
                open.remove(&s.id);
            }
        }
        for slot in &slots {
            slot.close();
        }
        slots.len()
    }
}

/// Most write caches with open files at once in this process: a tenth of
/// the soft descriptor limit when first used, between 16 and 4096.
pub fn max_open_caches() -> usize {
    pool().max_open.load(Ordering::Relaxed)
}

/// Sets [`max_open_caches`] (tests; a daemon keeps the default).
#[doc(hidden)]
pub fn set_max_open_caches(n: usize) {
    pool().max_open.store(n.max(1), Ordering::Relaxed);
}

/// Write caches with open files now.
pub fn open_caches() -> usize {
    pool()
        .lock()
        .values()
        .filter(|slot| slot.strong_count() > 0)
        .count()
}

/// Times a cache's files were reopened after the bound closed them.
pub fn reopened_caches() -> u64 {
    pool().reopened.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::cache::{NoBase, Origin, SessionCache, Stability};

    /// More caches than may be open: every one still reads and writes
    /// (reopened on demand), the bound holds, and removing them frees
    /// their descriptors and files.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn caches_beyond_the_bound_reopen_on_demand() {
        let before = max_open_caches();
        set_max_open_caches(8);
        let dir = tempfile::tempdir().unwrap();
        let session = SessionCache::open(dir.path().join("s")).await.unwrap();
        let reopened = reopened_caches();
        for i in 0..40u8 {
            let cache = session
                .get_or_create(&format!("c{i}"), 0, 4096, Origin::New)
                .await
                .unwrap();
            let data = Bytes::from(vec![i; 5000]);
            cache
                .write(0, data, Stability::FileSync, &NoBase)
                .await
                .unwrap();
        }
        for i in 0..40u8 {
            let cache = session.get(&format!("c{i}")).await.unwrap();
            let got = cache.read_overlay(0, 5000, &NoBase).await.unwrap();
            assert!(got.iter().all(|b| *b == i), "cache {i}");
            cache
                .write(
                    4096,
                    Bytes::from(vec![i; 100]),
                    Stability::Unstable,
                    &NoBase,
                )
                .await
                .unwrap();
            cache.commit().await.unwrap();
        }
        assert!(reopened_caches() > reopened, "closed caches were reopened");
        for i in 0..40u8 {
            assert!(session.remove(&format!("c{i}")).await.unwrap());
        }
        let left = std::fs::read_dir(dir.path().join("s")).unwrap().count();
        assert_eq!(left, 0, "every cache file removed");
        set_max_open_caches(before);
    }

    /// A slot whose files an operation still holds hands those back
    /// instead of reopening (which the map's lock would refuse).
    #[tokio::test]
    async fn a_closed_slot_reuses_files_still_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let paths = CachePaths::in_dir(dir.path(), "x");
        let cache = crate::cache::WriteCache::create(&paths, 0, 4096, Origin::New)
            .await
            .unwrap();
        let slot = Arc::clone(&cache.shared.slot);
        let held = slot.get().unwrap();
        slot.close();
        let again = slot.get().unwrap();
        assert!(Arc::ptr_eq(&held, &again));
        drop((held, again));
        slot.close();
        // Nothing holds them now: a real reopen, lock and all.
        let fresh = slot.get().unwrap();
        drop(fresh);
        slot.close_for_delete();
        assert!(slot.get().is_err(), "a deleted cache never reopens");
    }
}
