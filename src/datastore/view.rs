//! What the controller sees of a publication: its files, which byte ranges
//! clients have written (the write cache) and how much cache it uses. A
//! `copy` migration reads the merged files through the ordinary READ path and
//! re-copies only the written ranges at switchover.

use std::ops::Range;

use super::io::cache_err;
use super::namespace::ROOT_ID;
use super::{Datastore, DatastoreError, DsResult, ExportId, FileAt, FileId, FileOps};

/// One entry of a published VM folder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishedFile {
    /// File id (stable; what READ takes).
    pub id: FileId,
    /// Name in the folder.
    pub name: String,
    /// Logical size now (backup size, or what clients made it).
    pub size: u64,
    /// A sub-folder rather than a file.
    pub is_dir: bool,
}

impl Datastore {
    /// The export id and folder id of publication `name`.
    pub async fn publication_folder(
        &self,
        export_path: &str,
        name: &str,
    ) -> DsResult<(ExportId, FileId)> {
        let export = self
            .export_by_path(export_path)
            .ok_or(DatastoreError::NotFound)?;
        let ns = self.state(export.id)?.ns.read().await;
        let publication = ns.publication(name).ok_or(DatastoreError::NotFound)?;
        Ok((export.id, publication.folder))
    }

    /// Makes every write to publication `name` durable, as `syncfs(2)` on a
    /// local file system would: commits the write caches this process has
    /// open, then syncs the file system that holds the cache folder (writes
    /// a killed revive left in the page cache).
    pub async fn sync_publication(&self, export_path: &str, name: &str) -> DsResult<()> {
        let export = self
            .export_by_path(export_path)
            .ok_or(DatastoreError::NotFound)?;
        let state = self.state(export.id)?.clone();
        let cache_dir = {
            let ns = state.ns.read().await;
            let publication = ns.publication(name).ok_or(DatastoreError::NotFound)?;
            publication.cache_dir.clone()
        };
        let session = self.session(&state, &Some(name.to_string())).await?;
        session.commit_all().await.map_err(cache_err)?;
        tokio::task::spawn_blocking(move || {
            let dir = std::fs::File::open(&cache_dir)?;
            rustix::fs::syncfs(&dir).map_err(std::io::Error::from)
        })
        .await
        .map_err(|e| DatastoreError::Io(std::io::Error::other(e.to_string())))?
        .map_err(|e| {
            tracing::error!(publication = name, cause = %e, "syncing the write cache folder failed");
            DatastoreError::Io(e)
        })
    }

    /// The entries of a publication's folder, as clients see them now.
    pub async fn publication_files(
        &self,
        export_path: &str,
        name: &str,
    ) -> DsResult<Vec<PublishedFile>> {
        let (export, folder) = self.publication_folder(export_path, name).await?;
        let nodes: Vec<_> = {
            let ns = self.state(export)?.ns.read().await;
            ns.children(folder)?.into_iter().cloned().collect()
        };
        let mut files = Vec::with_capacity(nodes.len());
        for node in nodes {
            let attr = self.getattr(FileAt::new(export, node.id)).await?;
            files.push(PublishedFile {
                id: node.id,
                name: node.name.clone(),
                size: attr.size,
                is_dir: node.is_dir(),
            });
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(files)
    }

    /// Byte ranges of a file that live in its write cache (written by clients),
    /// merged and sorted. A file clients never wrote has none.
    pub async fn written_ranges(&self, export: ExportId, id: FileId) -> DsResult<Vec<Range<u64>>> {
        let (_, _, st) = self.regular(export, id).await?;
        let Some(cache) = st.cache.get() else {
            return Ok(Vec::new());
        };
        let bs = cache.block_size() as u64;
        let len = cache.len();
        let mut ranges: Vec<Range<u64>> = Vec::new();
        for block in 0..len.div_ceil(bs) {
            if !cache.is_cached(block) {
                continue;
            }
            let start = block * bs;
            let end = (start + bs).min(len);
            match ranges.last_mut() {
                Some(last) if last.end == start => last.end = end,
                _ => ranges.push(start..end),
            }
        }
        Ok(ranges)
    }

    /// Bytes the write caches of a publication occupy on disk.
    pub async fn publication_cache_bytes(&self, export_path: &str, name: &str) -> DsResult<u64> {
        let (export, _) = self.publication_folder(export_path, name).await?;
        let state = self.state(export)?;
        let session = self.session(state, &Some(name.to_string())).await?;
        Ok(session.bytes_used().await)
    }

    /// True when the export holds a publication (or any entry) named `name`.
    pub async fn name_taken(&self, export_path: &str, name: &str) -> DsResult<bool> {
        let export = self
            .export_by_path(export_path)
            .ok_or(DatastoreError::NotFound)?;
        let ns = self.state(export.id)?.ns.read().await;
        Ok(ns.publication(name).is_some() || ns.lookup(ROOT_ID, name).is_ok())
    }
}
