//! Restore: writes a restore point back as an ordinary VM folder (this file)
//! or folder tree (`tree_restore.rs`).
//!
//! Files are written under a temporary name and renamed when complete, so a
//! failed restore (a corrupt chunk, a full disk) leaves no file that looks
//! finished. Holes are not written, neither all-zero chunks nor all-zero 4 KiB
//! blocks inside a chunk: the result is sparse where the backup was.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::stream::{self, StreamExt, TryStreamExt};
use tracing::info;

use super::chunk;
use super::index::chunk_count;
use super::manifest::{PointKind, RestorePoint};
use super::reader::FileReader;
use super::{RepoError, Repository};
use crate::progress::Progress;

/// Granularity of holes inside a chunk: the file system block size of ext4
/// and xfs. Zero blocks of a chunk are not written, so a restored file is as
/// sparse as the backed-up one was, not only where whole chunks were zero.
const SPARSE_BLOCK: usize = 4096;

/// Writes `data` at `offset` (a multiple of [`SPARSE_BLOCK`]) of a file
/// whose length is already set, skipping all-zero blocks: they stay holes.
pub(super) fn write_sparse(file: &File, data: &[u8], offset: u64) -> std::io::Result<()> {
    let mut run_start = None;
    for (n, block) in data.chunks(SPARSE_BLOCK).enumerate() {
        let at = n * SPARSE_BLOCK;
        match (chunk::is_zero(block), run_start) {
            (false, None) => run_start = Some(at),
            (true, Some(start)) => {
                file.write_all_at(&data[start..at], offset + start as u64)?;
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(start) = run_start {
        file.write_all_at(&data[start..], offset + start as u64)?;
    }
    Ok(())
}

/// Chunks fetched and decoded at once while restoring.
const CHUNKS_IN_FLIGHT: usize = 4;

impl Repository {
    /// Restores every file of `point` into the folder `dest` (created if
    /// needed); a tree point with its folders, symlinks and metadata.
    ///
    /// # Errors
    /// [`RepoError::DestinationExists`] before writing anything if a file would
    /// be overwritten; a chunk error names the chunk and removes the partial file.
    pub async fn restore(
        &self,
        point: &RestorePoint,
        dest: &Path,
        progress: &dyn Progress,
    ) -> Result<(), RepoError> {
        let restore_err = |action: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| RepoError::Restore {
                action,
                path,
                source,
            }
        };
        if point.kind == PointKind::Tree {
            return self.restore_tree(point, dest, progress).await;
        }
        fs::create_dir_all(dest).map_err(restore_err("create folder", dest))?;
        for f in &point.files {
            let target = dest.join(&f.name);
            if target.exists() {
                return Err(RepoError::DestinationExists { path: target });
            }
        }
        progress.set_total(point.logical_size());
        for f in &point.files {
            progress.set_phase(&f.name);
            let target = dest.join(&f.name);
            let partial = dest.join(format!(".{}.revive-partial", f.name));
            let result = self.restore_file(point, &f.name, &partial, progress).await;
            match result {
                Ok(()) => fs::rename(&partial, &target).map_err(restore_err("rename", &target))?,
                Err(e) => {
                    let _ = fs::remove_file(&partial);
                    return Err(e);
                }
            }
        }
        info!(point = %point.id, dest = %dest.display(), "restore finished");
        Ok(())
    }

    async fn restore_file(
        &self,
        point: &RestorePoint,
        name: &str,
        partial: &PathBuf,
        progress: &dyn Progress,
    ) -> Result<(), RepoError> {
        let reader = FileReader::new(self, point, name)?;
        let to_restore_err = |action: &'static str| {
            let path = partial.clone();
            move |source| RepoError::Restore {
                action,
                path,
                source,
            }
        };
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(partial)
            .map_err(to_restore_err("create"))?;
        file.set_len(reader.size())
            .map_err(to_restore_err("set length of"))?;
        let file = Arc::new(file);
        self.write_chunks(&reader, &file, partial, progress).await?;
        let file: &File = &file;
        file.sync_all().map_err(to_restore_err("sync"))?;
        Ok(())
    }

    /// Writes every chunk of `reader` that is not a hole into `file` (already
    /// of the right length, so holes stay holes: sparse); `path` names the
    /// file in errors.
    pub(super) async fn write_chunks(
        &self,
        reader: &FileReader,
        file: &Arc<File>,
        path: &Path,
        progress: &dyn Progress,
    ) -> Result<(), RepoError> {
        let chunk_size = reader.chunk_size();
        stream::iter(0..chunk_count(reader.size(), chunk_size as u32))
            .map(|i| {
                let file = file.clone();
                let path = path.to_path_buf();
                let err = move |source| RepoError::Restore {
                    action: "write",
                    path,
                    source,
                };
                async move {
                    let id = reader.chunk_id(i).await?;
                    let len = chunk_size.min(reader.size() - i * chunk_size);
                    if !id.is_hole() {
                        let data = self.read_chunk(&id).await?;
                        tokio::task::spawn_blocking(move || {
                            write_sparse(&file, &data, i * chunk_size)
                        })
                        .await
                        .map_err(|e| RepoError::Internal {
                            what: format!("restore writer failed: {e}"),
                        })?
                        .map_err(err)?;
                    }
                    progress.advance(len);
                    Ok::<_, RepoError>(())
                }
            })
            .buffer_unordered(CHUNKS_IN_FLIGHT)
            .try_collect::<()>()
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_inside_a_chunk_stay_holes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = File::create(&path).unwrap();
        file.set_len(4 << 20).unwrap();
        let mut data = vec![0u8; 1 << 20];
        data[5000] = 1;
        data[(1 << 20) - 1] = 2;
        write_sparse(&file, &data, 1 << 20).unwrap();
        drop(file);
        let back = fs::read(&path).unwrap();
        assert_eq!(&back[1 << 20..2 << 20], &data[..]);
        assert!(back[..1 << 20].iter().all(|&b| b == 0));
        let allocated = fs::metadata(&path).unwrap().blocks() * 512;
        assert!(allocated <= 4 * 4096, "{allocated} bytes allocated");
    }
}
