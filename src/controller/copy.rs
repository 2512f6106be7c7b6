//! `copy` migration: revive's own quick migration. A bulk pass copies every
//! file of the published folder (backup merged with the write cache) to
//! `<destination>/<session name>/` while the VM runs, recording per file how
//! far it got so a restarted revive resumes there. At switchover, with the
//! VM stopped, a final pass copies every range clients ever wrote (the write
//! cache holds nothing else that differs from the backup, so this covers
//! all writes made since the bulk pass) and files created since.
//!
//! Every operation on the destination runs off the async threads
//! ([`Dest`]): production storage may take seconds per fsync, and the
//! threads that serve NFS must not wait for it.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use tracing::info;

use super::runner::update;
use super::session::{FileCopy, Migration};
use super::{ControllerError, Inner, Session, SessionHandle};
use crate::datastore::{FileAt, FileOps, PublishedFile};

/// Bytes per READ of the datastore (its maximum transfer size).
const COPY_BLOCK: u64 = 1 << 20;
/// Progress is persisted at least this often.
const SAVE_EVERY: Duration = Duration::from_secs(1);

/// Files worth copying: ESXi's lock files belong to the running host.
fn copied(file: &PublishedFile) -> bool {
    !file.is_dir && !file.name.starts_with(".lck-")
}

fn dest_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ControllerError {
    let path = path.to_path_buf();
    move |source| ControllerError::Destination {
        action,
        path,
        source,
    }
}

/// The destination folder of a session's copy.
pub(super) fn destination(session: &Session, migration: &Migration) -> PathBuf {
    Path::new(&migration.destination).join(&session.name)
}

/// Runs blocking destination I/O on the blocking pool.
async fn blocking<T: Send + 'static>(
    action: &'static str,
    path: &Path,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, ControllerError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result.map_err(dest_err(action, path)),
        Err(join) => Err(dest_err(action, path)(std::io::Error::other(join))),
    }
}

/// Creates a destination folder.
async fn create_folder(path: &Path) -> Result<(), ControllerError> {
    let p = path.to_path_buf();
    blocking("create destination folder", path, move || {
        std::fs::create_dir_all(&p)
    })
    .await
}

/// A file being written on the destination.
struct Dest {
    file: Arc<File>,
    path: PathBuf,
}

impl Dest {
    async fn open(path: &Path) -> Result<Dest, ControllerError> {
        let p = path.to_path_buf();
        let file = blocking("open destination file", path, move || {
            OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(&p)
        })
        .await?;
        Ok(Dest {
            file: Arc::new(file),
            path: path.to_path_buf(),
        })
    }

    async fn write_at(&self, data: Bytes, offset: u64) -> Result<(), ControllerError> {
        let file = self.file.clone();
        blocking("write destination file", &self.path, move || {
            file.write_all_at(&data, offset)
        })
        .await
    }

    async fn sync_data(&self) -> Result<(), ControllerError> {
        let file = self.file.clone();
        blocking("sync destination file", &self.path, move || {
            file.sync_data()
        })
        .await
    }

    async fn sync_all(&self) -> Result<(), ControllerError> {
        let file = self.file.clone();
        blocking("sync destination file", &self.path, move || file.sync_all()).await
    }

    async fn set_len(&self, len: u64) -> Result<(), ControllerError> {
        let file = self.file.clone();
        blocking("set size of destination file", &self.path, move || {
            file.set_len(len)
        })
        .await
    }
}

/// Sleeps as long as `migration_bandwidth` asks for `copied` bytes since
/// `started`, and stops a cancelled copy.
async fn pace(
    inner: &Inner,
    handle: &SessionHandle,
    started: Instant,
    copied: u64,
) -> Result<(), ControllerError> {
    let limit = inner.config.migration_bandwidth;
    if limit > 0 {
        let due = Duration::from_secs_f64(copied as f64 / limit as f64);
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
    if handle.cancel.load(Ordering::SeqCst) {
        return Err(ControllerError::Cancelled);
    }
    Ok(())
}

/// Copies one block of a published file at `offset` (at most `to - offset`
/// bytes) into `dest`; returns the bytes copied, 0 at end of file. A zero
/// block is not written when `sparse` (a fresh destination already reads as
/// zeros there).
async fn copy_block(
    inner: &Inner,
    export: crate::datastore::ExportId,
    file: &PublishedFile,
    dest: &Dest,
    offset: u64,
    to: u64,
    sparse: bool,
) -> Result<u64, ControllerError> {
    let count = (to - offset).min(COPY_BLOCK) as u32;
    let reply = inner
        .datastore
        .read(FileAt::new(export, file.id), offset, count)
        .await?;
    let n = reply.data.len() as u64;
    if n > 0 && !(sparse && reply.data.iter().all(|&b| b == 0)) {
        dest.write_at(reply.data, offset).await?;
    }
    inner
        .metrics
        .migration_bytes
        .fetch_add(n, Ordering::Relaxed);
    Ok(n)
}

/// The bulk pass, resumable.
pub(super) async fn bulk_pass(
    inner: &Inner,
    handle: &SessionHandle,
    session: &Session,
    migration: &Migration,
) -> Result<(), ControllerError> {
    let ds = &inner.datastore;
    let (export, _) = ds
        .publication_folder(&session.export, &session.name)
        .await?;
    let published: Vec<PublishedFile> = ds
        .publication_files(&session.export, &session.name)
        .await?
        .into_iter()
        .filter(copied)
        .collect();
    let folder = destination(session, migration);
    create_folder(&folder).await?;
    // The file list is fixed when the pass first starts; files created later
    // are taken by the final pass.
    let plan: Vec<FileCopy> = if migration.files.is_empty() {
        let plan: Vec<FileCopy> = published
            .iter()
            .map(|f| FileCopy {
                name: f.name.clone(),
                size: f.size,
                copied: 0,
            })
            .collect();
        let saved = plan.clone();
        update(inner, handle, |s| {
            if let Some(m) = s.migration.as_mut() {
                m.files = saved;
            }
            Ok(())
        })
        .await?;
        plan
    } else {
        migration.files.clone()
    };
    let total: u64 = plan.iter().map(|f| f.size).sum::<u64>().max(1);
    let mut done: u64 = plan.iter().map(|f| f.copied.min(f.size)).sum();
    info!(session = %session.id, files = plan.len(), bytes = total, resumed_at = done, to = %folder.display(), "copy migration: bulk pass");
    for (index, entry) in plan.iter().enumerate() {
        let Some(file) = published.iter().find(|f| f.name == entry.name) else {
            // Removed by a client since; nothing to copy.
            continue;
        };
        let path = folder.join(&entry.name);
        let dest = Dest::open(&path).await?;
        let mut last_save = Instant::now();
        // Bytes copied since the record was last saved: all of them count,
        // not only the block that happened to trigger the save.
        let mut unsaved: u64 = 0;
        let end = entry.size.min(file.size);
        let (from, started) = (entry.copied.min(end), Instant::now());
        let mut offset = from;
        while offset < end {
            pace(inner, handle, started, offset - from).await?;
            let n = copy_block(inner, export, file, &dest, offset, end, true).await?;
            if n == 0 {
                break;
            }
            offset += n;
            done += n;
            unsaved += n;
            if last_save.elapsed() < SAVE_EVERY && offset < entry.size {
                continue;
            }
            // Durable data first, then the record that says it is there.
            dest.sync_data().await?;
            last_save = Instant::now();
            let percent = (done.saturating_mul(100) / total).min(99) as u8;
            update(inner, handle, |s| {
                if let Some(m) = s.migration.as_mut() {
                    if let Some(f) = m.files.get_mut(index) {
                        f.copied = offset;
                    }
                    m.bytes_copied += unsaved;
                    m.percent = percent;
                }
                Ok(())
            })
            .await?;
            unsaved = 0;
        }
        dest.sync_all().await?;
    }
    Ok(())
}

/// The final pass, with the VM stopped: every written range, new files,
/// final sizes. Returns the destination folder.
pub(super) async fn final_pass(
    inner: &Inner,
    handle: &SessionHandle,
    session: &Session,
    migration: &Migration,
) -> Result<PathBuf, ControllerError> {
    let ds = &inner.datastore;
    let (export, _) = ds
        .publication_folder(&session.export, &session.name)
        .await?;
    let folder = destination(session, migration);
    create_folder(&folder).await?;
    let mut copied_bytes = 0u64;
    let published: Vec<PublishedFile> = ds
        .publication_files(&session.export, &session.name)
        .await?
        .into_iter()
        .filter(copied)
        .collect();
    for file in &published {
        let path = folder.join(&file.name);
        let planned = migration.files.iter().any(|f| f.name == file.name);
        let dest = Dest::open(&path).await?;
        let ranges = if planned {
            ds.written_ranges(export, file.id).await?
        } else {
            // Created after the bulk pass started: copy it whole.
            std::iter::once(0..file.size).collect()
        };
        for range in ranges {
            let end = range.end.min(file.size);
            let (mut offset, started) = (range.start, Instant::now());
            while offset < end {
                pace(inner, handle, started, offset - range.start).await?;
                let n = copy_block(inner, export, file, &dest, offset, end, false).await?;
                if n == 0 {
                    break;
                }
                offset += n;
                copied_bytes += n;
            }
        }
        dest.set_len(file.size).await?;
        dest.sync_all().await?;
    }
    // Files clients removed since the bulk pass must not come back.
    for planned in &migration.files {
        if !published.iter().any(|f| f.name == planned.name) {
            let path = folder.join(&planned.name);
            let p = path.clone();
            blocking(
                "remove destination file",
                &path,
                move || match std::fs::remove_file(&p) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    other => other,
                },
            )
            .await?;
        }
    }
    let dir = folder.clone();
    blocking("sync destination folder", &folder, move || {
        File::open(&dir)?.sync_all()
    })
    .await?;
    update(inner, handle, |s| {
        if let Some(m) = s.migration.as_mut() {
            m.bytes_copied += copied_bytes;
        }
        Ok(())
    })
    .await?;
    info!(session = %session.id, bytes = copied_bytes, to = %folder.display(), "copy migration: switchover pass done");
    Ok(folder)
}
