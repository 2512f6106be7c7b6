//! The file operations of passthrough exports, with the shapes of the
//! datastore's: each resolves its file by id (never following a symlink)
//! and runs the system calls on a blocking thread.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use rustix::fs::{self as rfs, AtFlags, Gid, Mode, OFlags, Timespec, Timestamps, Uid};

use super::resolve::{check_name, errno};
use super::{Passthrough, PtExport};
use crate::datastore::types::{
    Attr, CreateMode, DatastoreError, DirEntry, DirPage, DsResult, Export, ExportId, FileId,
    FileKind, FsStat, ReadReply, SetAttr, SetTime, Stability, WriteReply,
};
use crate::datastore::{FileAt, FileOps, NameAt};

/// Runs `f` on a blocking thread: every call here is file system I/O.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> DsResult<T> + Send + 'static,
) -> DsResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DatastoreError::Io(std::io::Error::other(e)))?
}

fn owner(uid: Option<u32>) -> Option<Uid> {
    uid.filter(|u| *u != u32::MAX).map(Uid::from_raw)
}

fn group(gid: Option<u32>) -> Option<Gid> {
    gid.filter(|g| *g != u32::MAX).map(Gid::from_raw)
}

fn timespec(t: SetTime) -> Timespec {
    match t {
        SetTime::DontChange => Timespec {
            tv_sec: 0,
            tv_nsec: rfs::UTIME_OMIT,
        },
        SetTime::ServerTime => Timespec {
            tv_sec: 0,
            tv_nsec: rfs::UTIME_NOW,
        },
        SetTime::ClientTime(at) => {
            let d = at.duration_since(UNIX_EPOCH).unwrap_or_default();
            Timespec {
                tv_sec: d.as_secs() as _,
                tv_nsec: d.subsec_nanos() as _,
            }
        }
    }
}

/// Applies mode, owner and times of `set` to an open file or folder.
fn apply(fd: &OwnedFd, set: &SetAttr) -> DsResult<()> {
    if let Some(mode) = set.mode {
        rfs::fchmod(fd, Mode::from_raw_mode(mode & 0o7777)).map_err(errno)?;
    }
    if set.uid.is_some() || set.gid.is_some() {
        rfs::fchown(fd, owner(set.uid), group(set.gid)).map_err(errno)?;
    }
    if set.atime != SetTime::DontChange || set.mtime != SetTime::DontChange {
        let times = Timestamps {
            last_access: timespec(set.atime),
            last_modification: timespec(set.mtime),
        };
        rfs::futimens(fd, &times).map_err(errno)?;
    }
    Ok(())
}

/// The times an exclusive CREATE stores its verifier in (as knfsd does).
fn verifier_times(v: [u8; 8]) -> Timestamps {
    let secs = |b: [u8; 4]| Timespec {
        tv_sec: u32::from_be_bytes(b) as _,
        tv_nsec: 0,
    };
    Timestamps {
        last_access: secs([v[0], v[1], v[2], v[3]]),
        last_modification: secs([v[4], v[5], v[6], v[7]]),
    }
}

fn secs_of(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn has_verifier(attr: &Attr, v: [u8; 8]) -> bool {
    let t = verifier_times(v);
    secs_of(attr.atime) == t.last_access.tv_sec as u64
        && secs_of(attr.mtime) == t.last_modification.tv_sec as u64
}

impl PtExport {
    fn getattr(&self, id: FileId) -> DsResult<Attr> {
        let fd = self.tree.open_id(id, OFlags::PATH)?;
        self.tree.stat_fd(&fd)
    }

    fn lookup(&self, dir: FileId, name: &str) -> DsResult<Attr> {
        match name {
            "." => self.getattr(dir),
            ".." => self.getattr(self.tree.parent_of(dir)?),
            _ => {
                check_name(name)?;
                let dir_fd = self.tree.open_dir(dir)?;
                self.tree.stat_at(&dir_fd, dir, name)
            }
        }
    }

    fn setattr(&self, id: FileId, set: &SetAttr, guard: Option<SystemTime>) -> DsResult<Attr> {
        let path_fd = self.tree.open_id(id, OFlags::PATH)?;
        let attr = self.tree.stat_fd(&path_fd)?;
        if guard.is_some_and(|g| g != attr.ctime) {
            return Err(DatastoreError::NotSync);
        }
        match attr.kind {
            FileKind::Symlink => {
                // A symlink's own owner; its mode and times mean nothing here.
                if set.size.is_some() {
                    return Err(DatastoreError::Invalid);
                }
                if set.uid.is_some() || set.gid.is_some() {
                    rfs::chownat(
                        &path_fd,
                        "",
                        owner(set.uid),
                        group(set.gid),
                        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
                    )
                    .map_err(errno)?;
                }
                self.tree.stat_fd(&path_fd)
            }
            FileKind::Directory => {
                if set.size.is_some() {
                    return Err(DatastoreError::IsDir);
                }
                let fd = self.tree.open_id(id, OFlags::RDONLY | OFlags::DIRECTORY)?;
                apply(&fd, set)?;
                self.tree.stat_fd(&fd)
            }
            FileKind::Regular => {
                let fd = match set.size {
                    Some(size) => {
                        let fd = self.tree.open_id(id, OFlags::WRONLY)?;
                        rfs::ftruncate(&fd, size).map_err(errno)?;
                        fd
                    }
                    None => self.tree.open_id(id, OFlags::RDONLY | OFlags::NONBLOCK)?,
                };
                apply(&fd, set)?;
                self.tree.stat_fd(&fd)
            }
        }
    }

    fn read(&self, id: FileId, offset: u64, count: u32) -> DsResult<ReadReply> {
        let fd = self.tree.data_fd(id)?;
        let mut buf = vec![0u8; count as usize];
        let mut filled = 0usize;
        while filled < buf.len() {
            let n = rustix::io::pread(&*fd, &mut buf[filled..], offset + filled as u64)
                .map_err(errno)?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        buf.truncate(filled);
        let attr = self.tree.stat_fd(&fd)?;
        Ok(ReadReply {
            eof: offset + filled as u64 >= attr.size,
            data: Bytes::from(buf),
            attr: Some(attr),
        })
    }

    fn write(
        &self,
        id: FileId,
        offset: u64,
        data: &[u8],
        stability: Stability,
    ) -> DsResult<WriteReply> {
        let fd = self.tree.data_fd(id)?;
        let mut done = 0usize;
        while done < data.len() {
            let n = rustix::io::pwrite(&*fd, &data[done..], offset + done as u64).map_err(errno)?;
            if n == 0 {
                return Err(DatastoreError::NoSpace);
            }
            done += n;
        }
        match stability {
            Stability::Unstable => {}
            Stability::DataSync => rfs::fdatasync(&*fd).map_err(errno)?,
            Stability::FileSync => rfs::fsync(&*fd).map_err(errno)?,
        }
        Ok(WriteReply {
            count: data.len() as u32,
            committed: stability,
            attr: Some(self.tree.stat_fd(&fd)?),
        })
    }

    fn commit(&self, id: FileId) -> DsResult<()> {
        let fd = self.tree.data_fd(id)?;
        rfs::fsync(&*fd).map_err(errno)
    }

    fn create(&self, dir: FileId, name: &str, mode: CreateMode, set: &SetAttr) -> DsResult<Attr> {
        check_name(name)?;
        let dir_fd = self.tree.open_dir(dir)?;
        let perm = Mode::from_raw_mode(set.mode.unwrap_or(0o644) & 0o7777);
        let excl =
            OFlags::CREATE | OFlags::EXCL | OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = match rfs::openat(&dir_fd, name, excl, perm) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::EXIST) => {
                let existing = self.tree.stat_at(&dir_fd, dir, name)?;
                return match mode {
                    CreateMode::Unchecked if existing.kind == FileKind::Regular => match set.size {
                        Some(size) => self.setattr(
                            existing.fileid,
                            &SetAttr {
                                size: Some(size),
                                ..SetAttr::default()
                            },
                            None,
                        ),
                        None => Ok(existing),
                    },
                    CreateMode::Exclusive(v) if has_verifier(&existing, v) => Ok(existing),
                    _ => Err(DatastoreError::Exists),
                };
            }
            Err(e) => return Err(errno(e)),
        };
        // The process umask must not change what the client asked for.
        let mut fix = SetAttr {
            mode: Some(perm.as_raw_mode()),
            uid: set.uid,
            gid: set.gid,
            ..SetAttr::default()
        };
        if let CreateMode::Exclusive(v) = mode {
            rfs::futimens(&fd, &verifier_times(v)).map_err(errno)?;
        } else {
            fix.atime = set.atime;
            fix.mtime = set.mtime;
        }
        apply(&fd, &fix)?;
        if let Some(size) = set.size.filter(|s| *s > 0) {
            rfs::ftruncate(&fd, size).map_err(errno)?;
        }
        let attr = self.tree.stat_fd(&fd)?;
        self.tree.remember(attr.fileid, dir, name);
        Ok(attr)
    }

    fn mkdir(&self, dir: FileId, name: &str, set: &SetAttr) -> DsResult<Attr> {
        check_name(name)?;
        let dir_fd = self.tree.open_dir(dir)?;
        let perm = Mode::from_raw_mode(set.mode.unwrap_or(0o755) & 0o7777);
        rfs::mkdirat(&dir_fd, name, perm).map_err(errno)?;
        let fd = rfs::openat(
            &dir_fd,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno)?;
        apply(
            &fd,
            &SetAttr {
                mode: Some(perm.as_raw_mode()),
                ..set.clone()
            },
        )?;
        let attr = self.tree.stat_fd(&fd)?;
        self.tree.remember(attr.fileid, dir, name);
        Ok(attr)
    }

    fn symlink(&self, dir: FileId, name: &str, target: &str, set: &SetAttr) -> DsResult<Attr> {
        check_name(name)?;
        if target.is_empty() || target.contains('\0') {
            return Err(DatastoreError::Invalid);
        }
        let dir_fd = self.tree.open_dir(dir)?;
        // The target is stored as text: the server never follows it.
        rfs::symlinkat(target, &dir_fd, name).map_err(errno)?;
        if set.uid.is_some() || set.gid.is_some() {
            rfs::chownat(
                &dir_fd,
                name,
                owner(set.uid),
                group(set.gid),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(errno)?;
        }
        self.tree.stat_at(&dir_fd, dir, name)
    }

    fn readlink(&self, id: FileId) -> DsResult<String> {
        let fd = self.tree.open_id(id, OFlags::PATH)?;
        if self.tree.stat_fd(&fd)?.kind != FileKind::Symlink {
            return Err(DatastoreError::Invalid);
        }
        let target = rfs::readlinkat(&fd, "", Vec::new()).map_err(errno)?;
        Ok(target.to_string_lossy().into_owned())
    }

    fn remove(&self, dir: FileId, name: &str, folder: bool) -> DsResult<()> {
        check_name(name)?;
        let dir_fd = self.tree.open_dir(dir)?;
        let attr = self.tree.stat_at(&dir_fd, dir, name)?;
        match (folder, attr.kind == FileKind::Directory) {
            (false, true) => return Err(DatastoreError::IsDir),
            (true, false) => return Err(DatastoreError::NotDir),
            _ => {}
        }
        let flags = if folder {
            AtFlags::REMOVEDIR
        } else {
            AtFlags::empty()
        };
        rfs::unlinkat(&dir_fd, name, flags).map_err(errno)?;
        self.tree.forget(attr.fileid);
        Ok(())
    }

    fn rename(&self, from_dir: FileId, from: &str, to_dir: FileId, to: &str) -> DsResult<()> {
        check_name(from)?;
        check_name(to)?;
        let from_fd = self.tree.open_dir(from_dir)?;
        let to_fd = self.tree.open_dir(to_dir)?;
        let moved = self.tree.stat_at(&from_fd, from_dir, from)?;
        let replaced = match rfs::statat(&to_fd, to, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Some(super::resolve::attr_of(&st).fileid),
            Err(rustix::io::Errno::NOENT) => None,
            Err(e) => return Err(errno(e)),
        };
        rfs::renameat(&from_fd, from, &to_fd, to).map_err(errno)?;
        if let Some(old) = replaced.filter(|id| *id != moved.fileid) {
            self.tree.forget(old);
        }
        self.tree.remember(moved.fileid, to_dir, to);
        Ok(())
    }

    fn readdir(&self, dir: FileId, cookie: u64, max_entries: usize) -> DsResult<DirPage> {
        let mut entries = self.tree.list(dir)?;
        // The cookie of an entry is its file id: listings resume right while
        // the folder changes, and across restarts.
        entries.retain(|(_, a)| a.fileid > cookie);
        entries.sort_by_key(|(_, a)| a.fileid);
        let eof = entries.len() <= max_entries;
        Ok(DirPage {
            entries: entries
                .into_iter()
                .take(max_entries)
                .map(|(name, attr)| DirEntry {
                    name,
                    cookie: attr.fileid,
                    attr,
                })
                .collect(),
            eof,
        })
    }

    #[allow(clippy::unnecessary_cast)] // statvfs field types differ between architectures
    fn fsstat(&self) -> DsResult<FsStat> {
        let st = rfs::fstatvfs(self.tree.root_fd()).map_err(errno)?;
        let frsize = st.f_frsize as u64;
        Ok(FsStat {
            total_bytes: st.f_blocks as u64 * frsize,
            free_bytes: st.f_bfree as u64 * frsize,
            avail_bytes: st.f_bavail as u64 * frsize,
            total_files: st.f_files as u64,
            free_files: st.f_ffree as u64,
            avail_files: st.f_favail as u64,
        })
    }
}

#[async_trait]
impl FileOps for Passthrough {
    fn exports(&self) -> Vec<Arc<Export>> {
        self.served_exports()
    }

    fn export(&self, id: ExportId) -> Option<Arc<Export>> {
        self.served(id).map(|e| e.info.clone())
    }

    async fn getattr(&self, at: FileAt) -> DsResult<Attr> {
        let e = self.state(at.export)?;
        blocking(move || e.getattr(at.id)).await
    }

    /// `..` never leaves the export.
    async fn lookup(&self, at: &NameAt) -> DsResult<Attr> {
        let e = self.state(at.dir.export)?;
        let (dir, name) = (at.dir.id, at.name.clone());
        blocking(move || e.lookup(dir, &name)).await
    }

    async fn setattr(
        &self,
        at: FileAt,
        set: &SetAttr,
        guard: Option<SystemTime>,
    ) -> DsResult<Attr> {
        let e = self.state(at.export)?;
        let set = set.clone();
        blocking(move || e.setattr(at.id, &set, guard)).await
    }

    /// Straight from the file.
    async fn read(&self, at: FileAt, offset: u64, count: u32) -> DsResult<ReadReply> {
        let e = self.state(at.export)?;
        blocking(move || e.read(at.id, offset, count)).await
    }

    /// Straight into the file; synced before the reply unless UNSTABLE.
    async fn write(
        &self,
        at: FileAt,
        offset: u64,
        data: Bytes,
        stability: Stability,
    ) -> DsResult<WriteReply> {
        let e = self.state(at.export)?;
        blocking(move || e.write(at.id, offset, &data, stability)).await
    }

    /// fsync of the file.
    async fn commit(&self, at: FileAt) -> DsResult<()> {
        let e = self.state(at.export)?;
        blocking(move || e.commit(at.id)).await
    }

    async fn create(&self, at: &NameAt, mode: CreateMode, attrs: &SetAttr) -> DsResult<Attr> {
        let e = self.state(at.dir.export)?;
        let (dir, name, attrs) = (at.dir.id, at.name.clone(), attrs.clone());
        blocking(move || e.create(dir, &name, mode, &attrs)).await
    }

    async fn mkdir(&self, at: &NameAt, attrs: &SetAttr) -> DsResult<Attr> {
        let e = self.state(at.dir.export)?;
        let (dir, name, attrs) = (at.dir.id, at.name.clone(), attrs.clone());
        blocking(move || e.mkdir(dir, &name, &attrs)).await
    }

    async fn remove(&self, at: &NameAt) -> DsResult<()> {
        let e = self.state(at.dir.export)?;
        let (dir, name) = (at.dir.id, at.name.clone());
        blocking(move || e.remove(dir, &name, false)).await
    }

    async fn rmdir(&self, at: &NameAt) -> DsResult<()> {
        let e = self.state(at.dir.export)?;
        let (dir, name) = (at.dir.id, at.name.clone());
        blocking(move || e.remove(dir, &name, true)).await
    }

    /// Within one export (a handle of another export is stale here).
    async fn rename(&self, from: &NameAt, to: &NameAt) -> DsResult<()> {
        if from.dir.export != to.dir.export {
            return Err(DatastoreError::Invalid);
        }
        let e = self.state(from.dir.export)?;
        let (from_dir, from_name) = (from.dir.id, from.name.clone());
        let (to_dir, to_name) = (to.dir.id, to.name.clone());
        blocking(move || e.rename(from_dir, &from_name, to_dir, &to_name)).await
    }

    /// Entries after `cookie` in file id order.
    async fn readdir(&self, dir: FileAt, cookie: u64, max_entries: usize) -> DsResult<DirPage> {
        let e = self.state(dir.export)?;
        blocking(move || e.readdir(dir.id, cookie, max_entries)).await
    }

    /// Of the file system holding the folder.
    async fn fsstat(&self, export: ExportId) -> DsResult<FsStat> {
        let e: Arc<PtExport> = self.state(export)?;
        blocking(move || e.fsstat()).await
    }

    async fn readlink(&self, at: FileAt) -> DsResult<String> {
        let e = self.state(at.export)?;
        blocking(move || e.readlink(at.id)).await
    }

    /// Stored as text, never followed by the server.
    async fn symlink(&self, at: &NameAt, target: &str, attrs: &SetAttr) -> DsResult<Attr> {
        let e = self.state(at.dir.export)?;
        let (dir, name) = (at.dir.id, at.name.clone());
        let (target, attrs) = (target.to_string(), attrs.clone());
        blocking(move || e.symlink(dir, &name, &target, &attrs)).await
    }
}
