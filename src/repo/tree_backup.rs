//! Backup of a folder tree (a PostgreSQL data folder) as a tree restore
//! point (manifest version 2).
//!
//! The tree is scanned first (`tree_scan.rs`: metadata, symlinks unfollowed,
//! bad entries refused before anything is stored). Then every file is cut
//! into chunk-size pieces, and the pieces of all files go through one bounded
//! pipeline: thousands of small files are read, hashed, compressed and stored
//! concurrently, while a large file's pieces stream through the same slots,
//! so memory stays at [`TREE_CHUNKS_IN_FLIGHT`] chunks whatever the tree.
//!
//! Each piece is a hole (all zeros, or inside a hole of a sparse file: not
//! even read), a chunk the parent point already names anywhere in its tree
//! (no store call: this is what makes an unchanged or renamed file cost
//! nothing), a chunk already in the repository, or a new chunk stored
//! put-if-absent. Small files list their chunk ids in their manifest entry,
//! large ones get index pages (unchanged pages are the parent's).

use std::collections::HashSet;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use chrono::Utc;
use futures::stream::{self, StreamExt, TryStreamExt};
use tracing::{debug, info};

use super::backup::{join, latest_of, publish, store_chunk, write_pages, BackupOptions, ChunkFate};
use super::chunk::{self, ChunkId};
use super::index::{chunk_count, PageId};
use super::manifest::{new_point_id, BackupStats, PointKind, RestorePoint, MANIFEST_VERSION_TREE};
use super::tree::{inline_fits, ChunkIndex, EntryContent, EntryKind, IndexRef, TreeEntry};
use super::tree_scan::{scan_tree, Scanned};
use super::{RepoError, Repository};
use crate::progress::Progress;
use crate::store::LockMode;

/// Chunks read, hashed, compressed or stored at once, across all files: a
/// small file is one chunk, so this is also how many small files are in
/// flight. Enough to hide store latency (S3) behind the two cores' hashing;
/// at most 16 × the chunk size of memory.
const TREE_CHUNKS_IN_FLIGHT: usize = 16;

/// Chunks and pages of the parent point: reusing them needs no store call.
#[derive(Default)]
struct Known {
    chunks: HashSet<ChunkId>,
    pages: HashSet<PageId>,
}

impl Known {
    /// Everything `parent` names (any kind of point), pages read once each.
    async fn of(repo: &Repository, parent: Option<&RestorePoint>) -> Result<Known, RepoError> {
        let mut known = Known::default();
        let Some(parent) = parent else {
            return Ok(known);
        };
        for (_, index) in parent.file_indexes() {
            match index {
                IndexRef::Inline(ids) => known.chunks.extend(ids.iter().copied()),
                IndexRef::Pages(ids) => {
                    for id in ids {
                        if known.pages.insert(*id) {
                            known
                                .chunks
                                .extend(repo.page(id).await?.entries.iter().copied());
                        }
                    }
                }
            }
        }
        known.chunks.remove(&ChunkId::HOLE);
        Ok(known)
    }
}

/// Backs up the folder tree at `path` as a new tree restore point.
///
/// # Errors
/// Bad input fails before anything is stored; a failure later leaves only
/// unreferenced chunks (the manifest is written last).
pub(super) async fn backup_tree(
    repo: &Repository,
    path: &Path,
    options: &BackupOptions,
    progress: &dyn Progress,
) -> Result<RestorePoint, RepoError> {
    let started = Instant::now();
    let owned = path.to_path_buf();
    let (scanned, folder_name) = join(tokio::task::spawn_blocking(move || {
        let name = std::fs::canonicalize(&owned)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| "tree".to_string());
        scan_tree(&owned).map(|s| (s, name))
    }))
    .await??;
    let name = options.vm.clone().unwrap_or(folder_name);
    let lock = repo.lock(LockMode::Shared).await?;
    let parent = latest_of(repo, &name).await?;
    let known = Known::of(repo, parent.as_ref()).await?;
    let now = Utc::now();
    let id = new_point_id(now);
    info!(point = %id, name = %name, entries = scanned.len(), parent = ?parent.as_ref().map(|p| &p.id), "tree backup started");

    let mut stats = BackupStats::default();
    let total: u64 = scanned
        .iter()
        .filter(|e| e.kind == EntryKind::File)
        .map(|e| e.size)
        .sum();
    stats.bytes_read = total;
    progress.set_total(total);
    progress.set_phase("files");

    let chunk_size = repo.chunk_size() as u64;
    let pieces = scanned
        .iter()
        .enumerate()
        .filter(|(_, e)| e.kind == EntryKind::File)
        .flat_map(|(n, e)| (0..chunk_count(e.size, chunk_size as u32)).map(move |c| (n, e, c)));
    let known_ref = &known;
    let mut fates = stream::iter(pieces)
        .map(|(n, entry, c)| {
            let full = entry.full.clone();
            let offset = c * chunk_size;
            let len = chunk_size.min(entry.size - offset);
            async move {
                let read =
                    tokio::task::spawn_blocking(move || read_piece(&full, offset, len as usize));
                let fate = match join(read).await?? {
                    None => ChunkFate::Hole,
                    Some((id, _)) if known_ref.chunks.contains(&id) => ChunkFate::Reused(id),
                    Some((id, data)) => store_chunk(repo, id, data, None).await?,
                };
                progress.advance(len);
                Ok::<_, RepoError>((n, fate))
            }
        })
        .buffered(TREE_CHUNKS_IN_FLIGHT);

    // Pieces come back in order, so each file's list fills chunk by chunk.
    let mut lists: Vec<Vec<ChunkId>> = vec![Vec::new(); scanned.len()];
    while let Some((n, fate)) = fates.try_next().await? {
        lists[n].push(match fate {
            ChunkFate::Hole => {
                stats.chunks_zero += 1;
                ChunkId::HOLE
            }
            ChunkFate::Reused(id) => {
                stats.chunks_reused += 1;
                id
            }
            ChunkFate::New { id, plain, stored } => {
                stats.chunks_new += 1;
                stats.bytes_new += plain;
                stats.bytes_stored += stored;
                id
            }
        });
    }
    drop(fates);

    let mut entries = Vec::with_capacity(scanned.len());
    for (n, s) in scanned.into_iter().enumerate() {
        let chunks = std::mem::take(&mut lists[n]);
        entries.push(entry_of(repo, s, chunks, &known.pages, &mut stats).await?);
    }
    let point = RestorePoint {
        format_version: MANIFEST_VERSION_TREE,
        id,
        vm: name,
        created: now,
        parent: parent.map(|p| p.id),
        chunk_size: repo.chunk_size(),
        kind: PointKind::Tree,
        files: Vec::new(),
        entries,
        stats,
    };
    publish(repo, lock, point, started).await
}

/// The manifest entry of a scanned entry; writes the index pages of a file
/// too large to list its chunks inline.
async fn entry_of(
    repo: &Repository,
    s: Scanned,
    chunks: Vec<ChunkId>,
    parent_pages: &HashSet<PageId>,
    stats: &mut BackupStats,
) -> Result<TreeEntry, RepoError> {
    let content = match s.kind {
        EntryKind::Folder => EntryContent::Folder,
        EntryKind::Symlink => EntryContent::Symlink(s.target.unwrap_or_default()),
        EntryKind::File if inline_fits(chunks.len()) => {
            EntryContent::File(ChunkIndex::Inline(chunks))
        }
        EntryKind::File => {
            let pages = write_pages(repo, &chunks, parent_pages, stats).await?;
            debug!(file = %s.path, size = s.size, pages = pages.len(), "file indexed");
            EntryContent::File(ChunkIndex::Pages(pages))
        }
    };
    Ok(TreeEntry {
        path: s.path,
        mode: s.mode,
        uid: s.uid,
        gid: s.gid,
        mtime_ns: s.mtime_ns,
        size: s.size,
        content,
    })
}

/// Reads `len` bytes at `offset` of the file at `path`; `None` for a hole.
/// The file is opened per piece: no descriptor is held across thousands of
/// files, and a large file costs one open per chunk, nothing next to the read.
fn read_piece(
    path: &Path,
    offset: u64,
    len: usize,
) -> Result<Option<(ChunkId, Vec<u8>)>, RepoError> {
    let source_err = |source| RepoError::Source {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(source_err)?;
    if in_hole(&file, offset, len as u64) {
        return Ok(None);
    }
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            RepoError::BadSource {
                path: path.to_path_buf(),
                reason: "the file shrank while it was backed up".into(),
            }
        } else {
            source_err(e)
        }
    })?;
    if chunk::is_zero(&buf) {
        return Ok(None);
    }
    Ok(Some((ChunkId::of(&buf), buf)))
}

/// True when `[offset, offset + len)` lies in a hole of a sparse file
/// (`SEEK_DATA` finds no data before its end): such a piece is zeros and is
/// not read at all. False when the file system cannot tell.
fn in_hole(file: &File, offset: u64, len: u64) -> bool {
    let Ok(start) = libc::off_t::try_from(offset) else {
        return false;
    };
    // SAFETY: lseek on a descriptor we own; it only moves the file offset,
    // which positioned reads do not use.
    let data = unsafe { libc::lseek(file.as_raw_fd(), start, libc::SEEK_DATA) };
    if data < 0 {
        // ENXIO: no data at or after `offset`.
        return std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    }
    data as u64 >= offset + len
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holes_of_sparse_files_are_found_without_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse");
        let f = File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"data", 32 << 20).unwrap();
        drop(f);
        let f = File::open(&path).unwrap();
        assert!(in_hole(&f, 0, 1 << 20));
        assert!(!in_hole(&f, 32 << 20, 1 << 20));
        assert!(in_hole(&f, 63 << 20, 1 << 20));
        assert!(read_piece(&path, 0, 1 << 20).unwrap().is_none());
        let (id, data) = read_piece(&path, 32 << 20, 8).unwrap().unwrap();
        assert_eq!(&data[..4], b"data");
        assert_eq!(id, ChunkId::of(&data));
    }
}
