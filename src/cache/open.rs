//! Creating, opening, repairing and deleting the two files of a write cache.
//! Blocking code: the async `WriteCache` methods run it in `spawn_blocking`.
//!
//! `create` is atomic: the data file is created first, the `.map` file is
//! written under a temporary name, synced, renamed into place and the folder
//! synced, so a crash leaves either no cache or a complete empty one.
//!
//! `open` repairs what a crash can leave behind. The header and the bitmap
//! pages of one flush are written together, so a crash can persist a bitmap
//! page without the header that grew the file: bits beyond the logical size,
//! or bytes past the end in the last block. Both are undone before use, which
//! keeps the rule "bytes of a cached block beyond the logical size are zero".
//!
//! Before that, `open` replays the live records of the journal into the data
//! file and the bitmap, in order, and checkpoints them (data, then map, then
//! a new journal epoch) before the cache serves anything. A crash during
//! replay leaves the journal as it was, so the next `open` replays again:
//! replay writes the same bytes to the same places.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::bitmap::Bitmap;
use super::commit::{Inner, Shared};
use super::error::{io_err, CacheError, Result};
use super::files::{lock_exclusive, open_rw, with_descriptors, FileSlot, Files};
use super::format::{
    valid_block_size, Header, BITMAP_OFFSET, BITMAP_PAGE_BYTES, HEADER_SIZE, HEADER_SLOTS,
    MAX_LOGICAL_SIZE,
};
use super::journal::{Journal, Replayed};
use super::range_lock::RangeLocks;
use super::write_cache::{CachePaths, POOLED_READ, READ_BUFFERS_KEEP};
use crate::bufpool::BufferPool;

/// How much of the bitmap `open` reads per call.
const LOAD_CHUNK: usize = 256 * BITMAP_PAGE_BYTES;

/// Syncs a folder so that a created, renamed or removed entry is durable.
/// Some file systems refuse fsync on a folder (EINVAL); their metadata is
/// synchronous or out of our hands, so that is not an error.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    match with_descriptors(|| File::open(dir)).and_then(|d| d.sync_all()) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        other => other.map_err(io_err("sync folder", dir)),
    }
}

/// The folder holding a cache file (`.` for a bare file name).
pub(crate) fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn shared(
    paths: &CachePaths,
    files: Files,
    journal: Journal,
    bitmap: Bitmap,
    header: Header,
) -> Shared {
    let mut inner = Inner::new(bitmap, header);
    // Pages with bits on disk were written, so their space is allocated.
    inner.map_reserved = inner.bitmap.pages().collect();
    Shared {
        paths: paths.clone(),
        slot: FileSlot::new(paths, files),
        journal: Mutex::new(journal),
        block_size: u64::from(header.block_size),
        inner: Mutex::new(inner),
        locks: Arc::new(RangeLocks::default()),
        flushed: watch::Sender::new(0),
        flushes: AtomicU64::new(0),
        presyncing: Arc::new(AtomicBool::new(false)),
        read_buffers: BufferPool::new(POOLED_READ, READ_BUFFERS_KEEP),
        #[cfg(test)]
        trace: Mutex::new(Vec::new()),
    }
}

/// Creates a new, empty cache. See the module doc for the order of steps.
pub(crate) fn create(
    paths: &CachePaths,
    logical_size: u64,
    base_len: u64,
    block_size: u32,
) -> Result<Shared> {
    if !valid_block_size(block_size) {
        return Err(CacheError::InvalidBlockSize(block_size));
    }
    if logical_size > MAX_LOGICAL_SIZE {
        return Err(CacheError::TooLarge {
            offset: 0,
            len: logical_size,
        });
    }
    if paths.map.exists() {
        return Err(CacheError::Exists(paths.map.clone()));
    }
    // A data file without a map is the leftover of a crashed create or
    // delete: nothing references it, so truncating it is safe.
    let data = with_descriptors(|| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&paths.data)
    })
    .map_err(io_err("create", &paths.data))?;
    data.sync_all().map_err(io_err("sync", &paths.data))?;
    // A leftover journal (of a deleted cache) is emptied before the map
    // makes the cache exist, so its records are never replayed here.
    let (journal, journal_file) = Journal::create(&paths.journal)?;

    let header = Header {
        block_size,
        logical_size,
        base_len,
        sequence: 1,
    };
    let tmp = paths.map.with_extension("map.tmp");
    let write_tmp = || -> io::Result<()> {
        let f = with_descriptors(|| {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
        })?;
        let first = Header {
            sequence: 0,
            ..header
        };
        f.write_all_at(&first.encode(), first.slot_offset())?;
        f.write_all_at(&header.encode(), header.slot_offset())?;
        f.set_len(BITMAP_OFFSET)?;
        f.sync_all()
    };
    if let Err(err) = write_tmp() {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("create", &tmp)(err));
    }
    fs::rename(&tmp, &paths.map).map_err(io_err("rename into place", &paths.map))?;
    sync_dir(parent_of(&paths.map))?;

    let map = open_rw(&paths.map)?;
    lock_exclusive(&map, &paths.map, false)?;
    let files = Files {
        data,
        map,
        journal: journal_file,
    };
    Ok(shared(paths, files, journal, Bitmap::new(), header))
}

/// Reads the newer valid header slot.
fn read_header(map: &File, path: &Path) -> Result<Header> {
    let len = map.metadata().map_err(io_err("stat", path))?.len();
    if len < BITMAP_OFFSET {
        return Err(CacheError::CorruptHeader {
            path: path.to_path_buf(),
            reason: "map file shorter than its two header slots",
        });
    }
    let mut best: Option<Header> = None;
    let mut first_err = None;
    for slot in HEADER_SLOTS {
        let mut buf = [0u8; HEADER_SIZE];
        map.read_exact_at(&mut buf, slot)
            .map_err(io_err("read", path))?;
        match Header::decode(&buf, path) {
            Ok(h) if best.is_none_or(|b| h.sequence > b.sequence) => best = Some(h),
            Ok(_) => {}
            // A slot with our magic tells more than one without.
            Err(e) => match first_err {
                Some(CacheError::BadMagic { .. }) | None => first_err = Some(e),
                Some(_) => {}
            },
        }
    }
    match (best, first_err) {
        (Some(h), _) => Ok(h),
        (None, Some(e)) => Err(e),
        (None, None) => unreachable!("two slots give a header or an error"),
    }
}

/// Loads every nonzero bitmap page.
fn read_bitmap(map: &File, path: &Path) -> Result<Bitmap> {
    let mut bitmap = Bitmap::new();
    let mut buf = vec![0u8; LOAD_CHUNK];
    let mut off = BITMAP_OFFSET;
    loop {
        let n = read_full_at(map, &mut buf, off).map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        for (i, page) in buf[..n].chunks(BITMAP_PAGE_BYTES).enumerate() {
            if page.iter().any(|b| *b != 0) {
                let page_no = (off - BITMAP_OFFSET) / BITMAP_PAGE_BYTES as u64 + i as u64;
                bitmap.load_page(page_no, page);
            }
        }
        if n < buf.len() {
            break;
        }
        off += n as u64;
    }
    Ok(bitmap)
}

/// Reads until `buf` is full or end of file; returns the bytes read.
pub(crate) fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Opens an existing cache, checks its header and repairs crash leftovers.
pub(crate) fn open(paths: &CachePaths) -> Result<Shared> {
    let map = open_rw(&paths.map)?;
    lock_exclusive(&map, &paths.map, false)?;
    let header = read_header(&map, &paths.map)?;
    let data = open_rw(&paths.data)?;
    let bitmap = read_bitmap(&map, &paths.map)?;
    let (journal, journal_file, records) = Journal::open(&paths.journal)?;
    let files = Files {
        data,
        map,
        journal: journal_file,
    };
    let shared = shared(paths, files, journal, bitmap, header);
    replay(&shared, records)?;
    repair(&shared)?;
    // Records of the old epoch are covered now (repair checkpointed any
    // replayed ones); a new epoch keeps them from ever being replayed again
    // over newer data, and makes the journal's file entry durable.
    let files = shared.files()?;
    shared.journal().reset(&files.journal)?;
    sync_dir(parent_of(&paths.journal))?;
    Ok(shared)
}

/// Applies the journal's live records to the data file and the in-memory
/// bitmap and size, in order. `repair` then checkpoints them.
fn replay(shared: &Shared, records: Vec<Replayed>) -> Result<()> {
    if records.is_empty() {
        return Ok(());
    }
    let bs = shared.block_size;
    let files = shared.files()?;
    let mut inner = shared.lock();
    for r in &records {
        if r.payload.is_empty() {
            continue;
        }
        files
            .data
            .write_all_at(&r.payload, r.offset)
            .map_err(io_err("write", &shared.paths.data))?;
        let end = r.offset + r.payload.len() as u64;
        inner.set_blocks(r.offset / bs, end.div_ceil(bs));
        if r.logical_end > inner.header.logical_size {
            inner.header.logical_size = r.logical_end;
            inner.header_dirty = true;
        }
    }
    inner.data_dirty = true;
    inner.mark_unjournaled();
    tracing::info!(
        cache = %shared.paths.map.display(),
        records = records.len(),
        "replayed write cache journal"
    );
    Ok(())
}

/// Undoes what a crash between a bitmap page and its header can leave (see
/// the module doc), and makes the repair durable before the cache is used.
fn repair(shared: &Shared) -> Result<()> {
    let bs = shared.block_size;
    let files = shared.files()?;
    let mut inner = shared.lock();
    let size = inner.header.logical_size;
    let first_beyond = size.div_ceil(bs);
    inner.clear_blocks(first_beyond, u64::MAX);
    let tail_block = size / bs;
    if !size.is_multiple_of(bs) && inner.bitmap.get(tail_block) {
        let zeros = vec![0u8; (bs - size % bs) as usize];
        files
            .data
            .write_all_at(&zeros, size)
            .map_err(io_err("write", &shared.paths.data))?;
        inner.data_dirty = true;
    }
    if inner.dirty_pages.is_empty() && !inner.data_dirty {
        return Ok(());
    }
    tracing::info!(cache = %shared.paths.map.display(), "repaired write cache after a crash");
    inner.mark_unjournaled();
    inner.flushing = true;
    drop(inner);
    shared.flush();
    let inner = shared.lock();
    Shared::check_poisoned(&inner, &shared.paths)
}

/// Removes the files of a cache and syncs the folder. The map goes first:
/// a data file or journal without a map is ignored and reused by `create`.
pub(crate) fn delete(paths: &CachePaths) -> Result<()> {
    for path in [&paths.map, &paths.data, &paths.journal] {
        match fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("remove", path)(e)),
        }
    }
    sync_dir(parent_of(&paths.map))
}
