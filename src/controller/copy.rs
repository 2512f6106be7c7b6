//! `copy` migration: revive's own quick migration. A bulk pass copies every
//! file of the published folder (backup merged with the write cache) to
//! `<destination>/<session name>/` while the VM runs, recording per file how
//! far it got so a restarted revive resumes there. At switchover, with the
//! VM stopped, a final pass copies every range clients ever wrote (the write
//! cache holds nothing else that differs from the backup, so this covers
//! all writes made since the bulk pass) and files created since.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tracing::info;

use super::session::{FileCopy, Migration};
use super::steps::update;
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

fn open_dest(path: &Path) -> Result<File, ControllerError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(dest_err("open destination file", path))
}

/// Copies `[from, to)` of a published file into `dest`, calling `progress`
/// with the offset reached. Zero blocks are skipped when `sparse` (a fresh
/// destination already reads as zeros there).
#[allow(clippy::too_many_arguments)]
async fn copy_range(
    inner: &Inner,
    handle: &SessionHandle,
    export: crate::datastore::ExportId,
    file: &PublishedFile,
    dest: &File,
    dest_path: &Path,
    from: u64,
    to: u64,
    sparse: bool,
    mut progress: impl FnMut(u64, u64) -> Result<(), ControllerError>,
) -> Result<(), ControllerError> {
    let mut offset = from;
    let started = Instant::now();
    let limit = inner.config.migration_bandwidth;
    while offset < to {
        if limit > 0 {
            // Sleep until the bytes copied so far fit the allowed rate.
            let due = Duration::from_secs_f64((offset - from) as f64 / limit as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        if handle.cancel.load(Ordering::SeqCst) {
            return Err(ControllerError::Cancelled);
        }
        let count = (to - offset).min(COPY_BLOCK) as u32;
        let reply = inner
            .datastore
            .read(FileAt::new(export, file.id), offset, count)
            .await?;
        if reply.data.is_empty() {
            break;
        }
        let n = reply.data.len() as u64;
        if !(sparse && reply.data.iter().all(|&b| b == 0)) {
            dest.write_all_at(&reply.data, offset)
                .map_err(dest_err("write destination file", dest_path))?;
        }
        inner
            .metrics
            .migration_bytes
            .fetch_add(n, Ordering::Relaxed);
        offset += n;
        progress(offset, n)?;
    }
    Ok(())
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
    std::fs::create_dir_all(&folder).map_err(dest_err("create destination folder", &folder))?;
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
        })?;
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
        let dest = open_dest(&path)?;
        let mut last_save = Instant::now();
        // Bytes copied since the record was last saved: all of them count,
        // not only the block that happened to trigger the save.
        let mut unsaved: u64 = 0;
        let mut save = |offset: u64, n: u64| -> Result<(), ControllerError> {
            done += n;
            unsaved += n;
            if last_save.elapsed() < SAVE_EVERY && offset < entry.size {
                return Ok(());
            }
            // Durable data first, then the record that says it is there.
            dest.sync_data()
                .map_err(dest_err("sync destination file", &path))?;
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
            })?;
            unsaved = 0;
            Ok(())
        };
        let end = entry.size.min(file.size);
        copy_range(
            inner,
            handle,
            export,
            file,
            &dest,
            &path,
            entry.copied.min(end),
            end,
            true,
            &mut save,
        )
        .await?;
        dest.sync_all()
            .map_err(dest_err("sync destination file", &path))?;
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
    std::fs::create_dir_all(&folder).map_err(dest_err("create destination folder", &folder))?;
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
        let dest = open_dest(&path)?;
        let ranges = if planned {
            ds.written_ranges(export, file.id).await?
        } else {
            // Created after the bulk pass started: copy it whole.
            std::iter::once(0..file.size).collect()
        };
        for range in ranges {
            let end = range.end.min(file.size);
            copy_range(
                inner,
                handle,
                export,
                file,
                &dest,
                &path,
                range.start,
                end,
                false,
                |_, n| {
                    copied_bytes += n;
                    Ok(())
                },
            )
            .await?;
        }
        dest.set_len(file.size)
            .map_err(dest_err("set size of destination file", &path))?;
        dest.sync_all()
            .map_err(dest_err("sync destination file", &path))?;
    }
    // Files clients removed since the bulk pass must not come back.
    for planned in &migration.files {
        if !published.iter().any(|f| f.name == planned.name) {
            let path = folder.join(&planned.name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(dest_err("remove destination file", &path)(e)),
            }
        }
    }
    File::open(&folder)
        .and_then(|d| d.sync_all())
        .map_err(dest_err("sync destination folder", &folder))?;
    update(inner, handle, |s| {
        if let Some(m) = s.migration.as_mut() {
            m.bytes_copied += copied_bytes;
        }
        Ok(())
    })?;
    info!(session = %session.id, bytes = copied_bytes, to = %folder.display(), "copy migration: switchover pass done");
    Ok(folder)
}
