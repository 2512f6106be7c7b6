//! Backup: turns a VM folder, a disk image or a folder tree into a restore
//! point. This file holds the VM case and what both cases share (chunk
//! storing, publication); `tree_backup.rs` the tree case.
//!
//! Which one: a file, a folder with a `.vmx`, or a flat folder of files is a
//! VM (manifest version 1, as before trees existed); a folder with subfolders
//! or symlinks, or any folder with [`BackupOptions::tree`], is a tree
//! ([`source::is_tree`]).
//!
//! Each file is read in chunk-size pieces, in parallel (positioned reads), and
//! each piece is classified: all-zero (hole), the same as the parent's chunk at
//! that position (no store call at all), already in the repository (dedup
//! across VMs), or new (compressed and stored put-if-absent). The index pages
//! are then written, skipping pages identical to the parent's, and the
//! manifest is published last.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use futures::stream::{self, StreamExt, TryStreamExt};
use tracing::{debug, info};

use super::chunk::{self, ChunkId};
use super::index::{chunk_count, IndexPage, PageId};
use super::manifest::{
    new_point_id, BackupStats, FileEntry, PointKind, RestorePoint, MANIFEST_VERSION_VM,
};
use super::source::{self, SourceFile};
use super::{format::PAGE_ENTRIES, RepoError, Repository};
use crate::progress::Progress;
use crate::store::{LockGuard, LockMode, PutOutcome};

/// Chunks in flight per file: enough to keep both cores hashing and compressing
/// while the store writes, without holding more than a few MiB in memory.
const CHUNKS_IN_FLIGHT: usize = 6;

/// Choices for one backup.
#[derive(Debug, Clone, Default)]
pub struct BackupOptions {
    /// Name of the chain (VM name); defaults to the `.vmx` stem or the folder name.
    pub vm: Option<String>,
    /// Back the folder up as a tree even when it looks like a VM folder.
    pub tree: bool,
}

/// What happened to one chunk.
pub(super) enum ChunkFate {
    Hole,
    Reused(ChunkId),
    New {
        id: ChunkId,
        plain: u64,
        stored: u64,
    },
}

/// Backs up `path` (a VM folder or an image file) as a new restore point.
///
/// # Errors
/// Bad input fails before anything is stored. A failure later leaves only
/// unreferenced chunks: the manifest is the last thing written.
pub async fn backup(
    repo: &Repository,
    path: &Path,
    options: &BackupOptions,
    progress: &dyn Progress,
) -> Result<RestorePoint, RepoError> {
    let started = Instant::now();
    let owned = path.to_path_buf();
    let force_tree = options.tree;
    let is_tree = join(tokio::task::spawn_blocking(move || {
        source::is_tree(&owned, force_tree)
    }))
    .await??;
    if is_tree {
        return super::tree_backup::backup_tree(repo, path, options, progress).await;
    }
    let owned = path.to_path_buf();
    let source = tokio::task::spawn_blocking(move || source::scan(&owned))
        .await
        .map_err(|e| RepoError::BadSource {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })??;
    let vm = options.vm.clone().unwrap_or(source.vm.clone());
    let lock = repo.lock(LockMode::Shared).await?;
    let parent = latest_of(repo, &vm).await?;
    let now = Utc::now();
    let id = new_point_id(now);
    info!(point = %id, vm = %vm, parent = ?parent.as_ref().map(|p| &p.id), "backup started");
    progress.set_total(source.files.iter().map(|f| f.size).sum());

    let mut stats = BackupStats::default();
    let mut files = Vec::with_capacity(source.files.len());
    for file in &source.files {
        progress.set_phase(&file.name);
        let parent_file = parent
            .as_ref()
            .filter(|p| p.chunk_size == repo.chunk_size())
            .and_then(|p| p.file(&file.name));
        files.push(back_up_file(repo, file, parent_file, progress, &mut stats).await?);
    }

    let point = RestorePoint {
        format_version: MANIFEST_VERSION_VM,
        id,
        vm,
        created: now,
        parent: parent.map(|p| p.id),
        chunk_size: repo.chunk_size(),
        kind: PointKind::Vm,
        files,
        entries: Vec::new(),
        stats,
    };
    publish(repo, lock, point, started).await
}

/// The latest restore point of chain `name`, if any.
pub(super) async fn latest_of(
    repo: &Repository,
    name: &str,
) -> Result<Option<RestorePoint>, RepoError> {
    match repo.resolve(&format!("{name}@latest")).await {
        Ok(p) => Ok(Some(p)),
        Err(RepoError::PointNotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Publishes a restore point whose chunks and pages are all stored: sync,
/// then the manifest put-if-absent, then sync again.
pub(super) async fn publish(
    repo: &Repository,
    lock: Box<dyn LockGuard>,
    mut point: RestorePoint,
    started: Instant,
) -> Result<RestorePoint, RepoError> {
    let key = RestorePoint::key_of(&point.id);
    let corrupt = |reason: String| RepoError::CorruptObject {
        key: key.clone(),
        reason,
    };
    // A bug here must not publish a manifest every reader then refuses.
    point.check().map_err(&corrupt)?;
    // Everything the manifest names must be durable before the manifest exists.
    repo.store().sync().await?;
    point.stats.seconds = started.elapsed().as_secs_f64();
    // VM manifests stay pretty-printed as they always were; a tree's thousands
    // of entries are written compact (about half the bytes).
    let json = match point.kind {
        PointKind::Vm => serde_json::to_vec_pretty(&point),
        PointKind::Tree => serde_json::to_vec(&point),
    }
    .map_err(|e| corrupt(e.to_string()))?;
    // A lease not renewed in time may have let gc run on another server: the
    // chunks this backup reused could be gone, so it must not publish.
    lock.check()?;
    if repo.store().put_if_absent(&key, json.into()).await? == PutOutcome::AlreadyExists {
        return Err(corrupt(
            "a restore point with this id already exists".into(),
        ));
    }
    repo.store().sync().await?;
    lock.release().await?;
    info!(point = %point.id, kind = point.kind.as_str(), bytes_new = point.stats.bytes_new, seconds = point.stats.seconds, "backup finished");
    Ok(point)
}

async fn parent_chunks(repo: &Repository, parent: &FileEntry) -> Result<Vec<ChunkId>, RepoError> {
    let mut out = Vec::new();
    for page in &parent.pages {
        out.extend_from_slice(&repo.page(page).await?.entries);
    }
    Ok(out)
}

async fn back_up_file(
    repo: &Repository,
    file: &SourceFile,
    parent: Option<&FileEntry>,
    progress: &dyn Progress,
    stats: &mut BackupStats,
) -> Result<FileEntry, RepoError> {
    let chunk_size = repo.chunk_size() as u64;
    let handle = Arc::new(File::open(&file.path).map_err(|source| RepoError::Source {
        path: file.path.clone(),
        source,
    })?);
    let size = file.size;
    let previous = match parent {
        Some(p) => parent_chunks(repo, p).await?,
        None => Vec::new(),
    };
    let previous = Arc::new(previous);

    let fates: Vec<ChunkFate> = stream::iter(0..chunk_count(size, chunk_size as u32))
        .map(|i| {
            let handle = handle.clone();
            let previous = previous.clone();
            let path = file.path.clone();
            async move {
                let offset = i * chunk_size;
                let len = chunk_size.min(size - offset) as usize;
                let read = tokio::task::spawn_blocking(move || -> Result<_, RepoError> {
                    let mut buf = vec![0u8; len];
                    handle
                        .read_exact_at(&mut buf, offset)
                        .map_err(|source| RepoError::Source { path, source })?;
                    if chunk::is_zero(&buf) {
                        return Ok(None);
                    }
                    let id = ChunkId::of(&buf);
                    Ok(Some((id, buf)))
                });
                let Some((id, buf)) = join(read).await?? else {
                    progress.advance(len as u64);
                    return Ok(ChunkFate::Hole);
                };
                let fate = store_chunk(repo, id, buf, previous.get(i as usize)).await?;
                progress.advance(len as u64);
                Ok::<_, RepoError>(fate)
            }
        })
        .buffered(CHUNKS_IN_FLIGHT)
        .try_collect()
        .await?;

    let mut entries = Vec::with_capacity(fates.len());
    for fate in fates {
        entries.push(match fate {
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
    stats.bytes_read += size;

    let parent_pages: HashSet<PageId> = parent
        .map(|p| p.pages.iter().copied().collect())
        .unwrap_or_default();
    let pages = write_pages(repo, &entries, &parent_pages, stats).await?;
    debug!(file = %file.name, size, pages = pages.len(), "file indexed");
    Ok(FileEntry {
        name: file.name.clone(),
        kind: file.kind,
        size,
        pages,
    })
}

/// Writes the index pages of a file's chunk list, skipping pages the parent
/// already has (same content, same id); returns the page ids in order.
pub(super) async fn write_pages(
    repo: &Repository,
    chunks: &[ChunkId],
    parent_pages: &HashSet<PageId>,
    stats: &mut BackupStats,
) -> Result<Vec<PageId>, RepoError> {
    let mut pages = Vec::with_capacity(chunks.len().div_ceil(PAGE_ENTRIES));
    for slice in chunks.chunks(PAGE_ENTRIES) {
        let page = IndexPage {
            entries: slice.to_vec(),
        };
        let (id, bytes) = page.encode();
        if !parent_pages.contains(&id) {
            let len = bytes.len() as u64;
            if repo.store().put_if_absent(&id.key(), bytes).await? == PutOutcome::Created {
                stats.pages_new += 1;
                stats.bytes_stored += len;
            }
        }
        pages.push(id);
    }
    Ok(pages)
}

/// Stores one non-zero chunk unless the repository already has it.
pub(super) async fn store_chunk(
    repo: &Repository,
    id: ChunkId,
    plain: Vec<u8>,
    previous: Option<&ChunkId>,
) -> Result<ChunkFate, RepoError> {
    // Same chunk at the same position as the parent: known to be stored.
    if previous == Some(&id) {
        return Ok(ChunkFate::Reused(id));
    }
    let key = id.key();
    if repo.store().exists(&key).await? {
        return Ok(ChunkFate::Reused(id));
    }
    let plain_len = plain.len() as u64;
    let encoded = join(tokio::task::spawn_blocking(move || chunk::encode(&plain))).await??;
    let stored = encoded.len() as u64;
    match repo.store().put_if_absent(&key, encoded).await? {
        PutOutcome::Created => Ok(ChunkFate::New {
            id,
            plain: plain_len,
            stored,
        }),
        // Another backup stored it between our check and our write.
        PutOutcome::AlreadyExists => Ok(ChunkFate::Reused(id)),
    }
}

pub(super) async fn join<T>(task: tokio::task::JoinHandle<T>) -> Result<T, RepoError> {
    task.await.map_err(|e| RepoError::Internal {
        what: format!("backup worker failed: {e}"),
    })
}
