//! Garbage collection: removes chunks and index pages no restore point uses
//! (VM or tree: a tree point keeps the chunks its manifest lists inline and
//! those of its index pages).
//!
//! Runs under the exclusive repository lock, so no backup is between deciding
//! to reuse a chunk and publishing the manifest that names it. If any index
//! page cannot be read, gc stops: it cannot know what that page keeps alive.
//!
//! On stores where the lock is a lease (S3, several servers), unreferenced
//! objects younger than the grace period stay too: a backup that lost its
//! lease (a paused process) may still be writing them.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use tracing::info;

use super::chunk::ChunkId;
use super::index::PageId;
use super::tree::IndexRef;
use super::{RepoError, Repository};
use crate::store::LockMode;

/// Choices for one gc run.
#[derive(Debug, Clone, Default)]
pub struct GcOptions {
    /// Keep unreferenced objects younger than this; `None`: the store's
    /// default ([`crate::store::Store::gc_grace`]).
    pub grace: Option<Duration>,
}

/// What a gc run did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    /// Restore points whose objects were kept.
    pub points: usize,
    /// Chunks still referenced.
    pub chunks_kept: u64,
    /// Chunks removed.
    pub chunks_removed: u64,
    /// Index pages removed.
    pub pages_removed: u64,
    /// Stored bytes freed.
    pub bytes_freed: u64,
    /// Unreferenced objects kept because they are younger than the grace period.
    pub young_kept: u64,
    /// The grace period used, in seconds.
    pub grace_seconds: u64,
}

impl Repository {
    /// Sweeps every chunk and page that no restore point references, with
    /// the store's default grace period.
    pub async fn gc(&self) -> Result<GcReport, RepoError> {
        self.gc_with(&GcOptions::default()).await
    }

    /// Sweeps unreferenced chunks and pages older than the grace period.
    pub async fn gc_with(&self, options: &GcOptions) -> Result<GcReport, RepoError> {
        let lock = self.lock(LockMode::Exclusive).await?;
        let grace = options.grace.unwrap_or_else(|| self.store().gc_grace());
        // Objects modified after this are young. Without a time (a store that
        // does not say), an object counts as old.
        let cutoff = SystemTime::now()
            .checked_sub(grace)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let young = |m: &crate::store::ObjectMeta| {
            !grace.is_zero() && m.modified.is_some_and(|t| t > cutoff)
        };
        let points = self.points().await?;
        let mut pages: HashSet<PageId> = HashSet::new();
        let mut chunks: HashSet<ChunkId> = HashSet::new();
        for point in &points {
            for (_, index) in point.file_indexes() {
                match index {
                    // Small files of tree points list their chunks in the manifest.
                    IndexRef::Inline(ids) => chunks.extend(ids.iter().filter(|c| !c.is_hole())),
                    IndexRef::Pages(ids) => {
                        for page_id in ids {
                            pages.insert(*page_id);
                            let page = self.page(page_id).await?;
                            chunks.extend(page.entries.iter().filter(|c| !c.is_hole()));
                        }
                    }
                }
            }
        }
        let mut report = GcReport {
            points: points.len(),
            grace_seconds: grace.as_secs(),
            ..GcReport::default()
        };
        for meta in self.store().list("chunks/").await? {
            let name = meta.key.rsplit('/').next().unwrap_or_default();
            match ChunkId::from_hex(name) {
                Some(id) if chunks.contains(&id) => report.chunks_kept += 1,
                _ if young(&meta) => report.young_kept += 1,
                _ => {
                    // Deleting takes a while on S3: stop if the lease is gone.
                    lock.check()?;
                    self.store().delete(&meta.key).await?;
                    report.chunks_removed += 1;
                    report.bytes_freed += meta.size;
                }
            }
        }
        for meta in self.store().list("pages/").await? {
            let name = meta.key.rsplit('/').next().unwrap_or_default();
            if PageId::from_hex(name).is_some_and(|id| pages.contains(&id)) {
                continue;
            }
            if young(&meta) {
                report.young_kept += 1;
            } else {
                lock.check()?;
                self.store().delete(&meta.key).await?;
                report.pages_removed += 1;
                report.bytes_freed += meta.size;
            }
        }
        self.store().sync().await?;
        lock.release().await?;
        info!(
            removed = report.chunks_removed,
            kept = report.chunks_kept,
            freed = report.bytes_freed,
            "garbage collection finished"
        );
        Ok(report)
    }
}
