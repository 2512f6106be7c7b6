//! Restore of a tree point: the folder tree written back exactly.
//!
//! Order, so that what is restored last cannot be disturbed by what comes
//! after it:
//! 1. check: nothing of the tree exists in the destination yet (a restore
//!    never overwrites); the destination is created if missing;
//! 2. folders, owner-writable (0700) for now, and symlinks (created as
//!    links, never followed, with their owner and mtime);
//! 3. files, many at once: each written under a temporary name
//!    (`.revive-partial-<n>` beside it), sparse where the backup had holes,
//!    then owner, mode and mtime set through its descriptor, then renamed
//!    into place, so a failed restore leaves no file that looks finished
//!    (folders and symlinks made so far stay);
//! 4. folders' owner, mode and mtime, deepest first, the root (the
//!    destination) last: adding entries changed their mtimes, and a
//!    read-only mode set earlier would have refused the entries;
//! 5. one `syncfs` of the destination's file system instead of an fsync per
//!    file.
//!
//! Owners (uid, gid) are restored when running as root, and left to the
//! restoring user otherwise. The destination folder takes the root entry's
//! owner, mode and mtime when the restore created it or it was empty.

use std::ffi::CString;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{fchown, lchown, symlink, DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::stream::{self, StreamExt, TryStreamExt};
use tracing::{info, warn};

use super::backup::join;
use super::manifest::RestorePoint;
use super::reader::FileReader;
use super::restore::write_sparse;
use super::tree::{EntryContent, TreeEntry};
use super::{RepoError, Repository};
use crate::progress::Progress;

/// Files restored at once: small files are one chunk each, so this is what
/// keeps a thousand small files from being restored one round trip at a
/// time; each waits mostly on file system metadata (create, rename), so more
/// than the cores.
const FILES_IN_FLIGHT: usize = 16;

fn restore_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RepoError {
    let path = path.to_path_buf();
    move |source| RepoError::Restore {
        action,
        path,
        source,
    }
}

/// Removes a partial file unless the restore of that file finished: a
/// failed or cancelled restore leaves no half-written file behind.
struct Partial {
    path: PathBuf,
    done: bool,
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.done {
            if let Err(e) = fs::remove_file(&self.path) {
                if e.kind() != io::ErrorKind::NotFound {
                    warn!(path = %self.path.display(), cause = %e, "could not remove partial file");
                }
            }
        }
    }
}

impl Repository {
    /// Restores tree point `point` into `dest`; see the module doc.
    pub(super) async fn restore_tree(
        &self,
        point: &RestorePoint,
        dest: &Path,
        progress: &dyn Progress,
    ) -> Result<(), RepoError> {
        let entries: Arc<[TreeEntry]> = point.tree_entries().into();
        // SAFETY: geteuid has no preconditions.
        let as_root = unsafe { libc::geteuid() } == 0;
        let (d, e) = (dest.to_path_buf(), entries.clone());
        let own_root = join(tokio::task::spawn_blocking(move || {
            prepare(&d, &e, as_root)
        }))
        .await??;

        progress.set_total(point.logical_size());
        progress.set_phase("files");
        let files = entries
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(e.content, EntryContent::File(_)));
        stream::iter(files)
            .map(|(n, entry)| self.restore_tree_file(point, dest, n, entry, as_root, progress))
            .buffer_unordered(FILES_IN_FLIGHT)
            .try_collect::<()>()
            .await?;

        let d = dest.to_path_buf();
        join(tokio::task::spawn_blocking(move || {
            finish_folders(&d, &entries, as_root, own_root)?;
            sync_fs(&d)
        }))
        .await??;
        info!(point = %point.id, dest = %dest.display(), "tree restore finished");
        Ok(())
    }

    /// Writes one file under a temporary name, sets its metadata, renames it.
    async fn restore_tree_file(
        &self,
        point: &RestorePoint,
        dest: &Path,
        n: usize,
        entry: &TreeEntry,
        as_root: bool,
        progress: &dyn Progress,
    ) -> Result<(), RepoError> {
        let reader = FileReader::new(self, point, &entry.path)?;
        let target = dest.join(&entry.path);
        let folder = target.parent().unwrap_or(dest).to_path_buf();
        let mut partial = Partial {
            path: folder.join(format!(".revive-partial-{n}")),
            done: false,
        };
        let (path, meta) = (partial.path.clone(), entry.clone());
        if reader.chunk_count() <= 1 {
            // Most files of a PostgreSQL data folder are one chunk: fetch it,
            // then create, write, set metadata and rename in one blocking task.
            let data = match reader.chunk_count() {
                0 => None,
                _ => Some(reader.chunk(0).await?),
            };
            join(tokio::task::spawn_blocking(move || {
                let file = create_partial(&path, meta.size)?;
                if let Some(data) = data {
                    write_sparse(&file, &data, 0).map_err(restore_err("write", &path))?;
                }
                finish_file(file, &path, &target, &meta, as_root)
            }))
            .await??;
            progress.advance(entry.size);
        } else {
            let p = path.clone();
            let file = join(tokio::task::spawn_blocking(move || {
                create_partial(&p, meta.size)
            }))
            .await??;
            let file = Arc::new(file);
            self.write_chunks(&reader, &file, &path, progress).await?;
            let meta = entry.clone();
            join(tokio::task::spawn_blocking(move || {
                finish_file(&*file, &path, &target, &meta, as_root)
            }))
            .await??;
        }
        partial.done = true;
        Ok(())
    }
}

/// Creates a partial file of `size` bytes (a hole until written).
fn create_partial(path: &Path, size: u64) -> Result<File, RepoError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(restore_err("create", path))?;
    file.set_len(size)
        .map_err(restore_err("set length of", path))?;
    Ok(file)
}

/// Sets a written partial file's owner, mode and mtime through its
/// descriptor, then renames it to `target`.
fn finish_file(
    file: impl std::borrow::Borrow<File>,
    path: &Path,
    target: &Path,
    meta: &TreeEntry,
    as_root: bool,
) -> Result<(), RepoError> {
    let file = file.borrow();
    if as_root {
        fchown(file, Some(meta.uid), Some(meta.gid)).map_err(restore_err("set owner of", path))?;
    }
    // After chown, which clears setuid and setgid bits.
    file.set_permissions(fs::Permissions::from_mode(meta.mode))
        .map_err(restore_err("set mode of", path))?;
    set_fd_mtime(file, meta.mtime_ns).map_err(restore_err("set mtime of", path))?;
    fs::rename(path, target).map_err(restore_err("rename", target))
}

/// Step 1 and 2 of the module doc. Returns whether the destination takes
/// the root entry's metadata (created here, or empty).
fn prepare(dest: &Path, entries: &[TreeEntry], as_root: bool) -> Result<bool, RepoError> {
    let own_root = match fs::symlink_metadata(dest) {
        Ok(meta) if meta.is_dir() => {
            let empty = fs::read_dir(dest)
                .map_err(restore_err("read folder", dest))?
                .next()
                .is_none();
            if !empty {
                for e in &entries[1..] {
                    let path = dest.join(&e.path);
                    if fs::symlink_metadata(&path).is_ok() {
                        return Err(RepoError::DestinationExists { path });
                    }
                }
            }
            empty
        }
        Ok(_) => {
            return Err(RepoError::DestinationExists {
                path: dest.to_path_buf(),
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(dest).map_err(restore_err("create folder", dest))?;
            true
        }
        Err(e) => return Err(restore_err("look at", dest)(e)),
    };
    let mut builder = DirBuilder::new();
    builder.mode(0o700);
    for e in &entries[1..] {
        let path = dest.join(&e.path);
        match &e.content {
            EntryContent::Folder => builder
                .create(&path)
                .map_err(restore_err("create folder", &path))?,
            EntryContent::Symlink(target) => {
                symlink(target, &path).map_err(restore_err("create symlink", &path))?;
                if as_root {
                    lchown(&path, Some(e.uid), Some(e.gid))
                        .map_err(restore_err("set owner of", &path))?;
                }
                set_path_mtime(&path, e.mtime_ns).map_err(restore_err("set mtime of", &path))?;
            }
            EntryContent::File(_) => {}
        }
    }
    Ok(own_root)
}

/// Step 4 of the module doc.
fn finish_folders(
    dest: &Path,
    entries: &[TreeEntry],
    as_root: bool,
    own_root: bool,
) -> Result<(), RepoError> {
    // Sorted by path: reversed, every folder comes after everything in it.
    for e in entries.iter().rev() {
        if !matches!(e.content, EntryContent::Folder) || (e.path.is_empty() && !own_root) {
            continue;
        }
        let path = if e.path.is_empty() {
            dest.to_path_buf()
        } else {
            dest.join(&e.path)
        };
        if as_root {
            lchown(&path, Some(e.uid), Some(e.gid)).map_err(restore_err("set owner of", &path))?;
        }
        fs::set_permissions(&path, fs::Permissions::from_mode(e.mode))
            .map_err(restore_err("set mode of", &path))?;
        set_path_mtime(&path, e.mtime_ns).map_err(restore_err("set mtime of", &path))?;
    }
    Ok(())
}

/// `[atime, mtime]` for utimensat/futimens: atime untouched.
fn times(mtime_ns: i64) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: mtime_ns.div_euclid(1_000_000_000) as libc::time_t,
            tv_nsec: mtime_ns.rem_euclid(1_000_000_000) as _,
        },
    ]
}

/// Sets the mtime of a path, not following a symlink at the end.
fn set_path_mtime(path: &Path, mtime_ns: i64) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    let t = times(mtime_ns);
    // SAFETY: a NUL-terminated path and a two-element timespec array.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            t.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sets the mtime of an open file.
fn set_fd_mtime(file: &File, mtime_ns: i64) -> io::Result<()> {
    let t = times(mtime_ns);
    // SAFETY: a descriptor we own and a two-element timespec array.
    let r = unsafe { libc::futimens(file.as_raw_fd(), t.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes everything restored durable with one `syncfs`.
fn sync_fs(dest: &Path) -> Result<(), RepoError> {
    let dir = File::open(dest).map_err(restore_err("open", dest))?;
    // SAFETY: syncfs on a descriptor we own.
    if unsafe { libc::syncfs(dir.as_raw_fd()) } != 0 {
        return Err(restore_err("sync", dest)(io::Error::last_os_error()));
    }
    Ok(())
}
