//! Garbage collection: removes chunks and index pages no restore point uses.
//!
//! Runs under the exclusive repository lock, so no backup is between deciding
//! to reuse a chunk and publishing the manifest that names it. If any index
//! page cannot be read, gc stops: it cannot know what that page keeps alive.

use std::collections::HashSet;

use serde::Serialize;
use tracing::info;

use super::chunk::ChunkId;
use super::index::PageId;
use super::{RepoError, Repository};
use crate::store::LockMode;

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
}

impl Repository {
    /// Sweeps every chunk and page that no restore point references.
    pub async fn gc(&self) -> Result<GcReport, RepoError> {
        let _lock = self.lock(LockMode::Exclusive).await?;
        let points = self.points().await?;
        let mut pages: HashSet<PageId> = HashSet::new();
        let mut chunks: HashSet<ChunkId> = HashSet::new();
        for point in &points {
            for file in &point.files {
                for page_id in &file.pages {
                    pages.insert(*page_id);
                    let page = self.page(page_id).await?;
                    chunks.extend(page.entries.iter().filter(|c| !c.is_hole()));
                }
            }
        }
        let mut report = GcReport {
            points: points.len(),
            ..GcReport::default()
        };
        for meta in self.store().list("chunks/").await? {
            let name = meta.key.rsplit('/').next().unwrap_or_default();
            match ChunkId::from_hex(name) {
                Some(id) if chunks.contains(&id) => report.chunks_kept += 1,
                _ => {
                    self.store().delete(&meta.key).await?;
                    report.chunks_removed += 1;
                    report.bytes_freed += meta.size;
                }
            }
        }
        for meta in self.store().list("pages/").await? {
            let name = meta.key.rsplit('/').next().unwrap_or_default();
            if !PageId::from_hex(name).is_some_and(|id| pages.contains(&id)) {
                self.store().delete(&meta.key).await?;
                report.pages_removed += 1;
                report.bytes_freed += meta.size;
            }
        }
        self.store().sync().await?;
        info!(
            removed = report.chunks_removed,
            kept = report.chunks_kept,
            freed = report.bytes_freed,
            "garbage collection finished"
        );
        Ok(report)
    }
}
