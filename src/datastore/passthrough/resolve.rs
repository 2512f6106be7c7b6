//! The folder behind one passthrough export: its root, the id → path cache,
//! walks that never follow a symlink, and the open data files.

use std::collections::{HashMap, VecDeque};
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lru::LruCache;
use rustix::fs::{self as rfs, AtFlags, Dir, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;

use super::super::types::{Attr, DatastoreError, DsResult, FileId, FileKind};
use crate::datastore::lock;

/// Parents followed from a file up to the root before the chain is taken
/// for a cycle (renames racing with a walk) and rebuilt.
const MAX_DEPTH: usize = 256;
/// Entries a rebuild of the id map visits at most: a datastore of VM
/// folders holds hundreds, so this only bounds a pathological folder.
const MAX_REBUILD_ENTRIES: usize = 1 << 20;
/// Files kept open for READ and WRITE: a few VMs' disks and small files.
const OPEN_FILES: usize = 256;

/// Where a name lives.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Place {
    parent: FileId,
    name: String,
}

/// The folder of one export.
pub(crate) struct Tree {
    /// `O_PATH` descriptor of the root: every walk starts here, so a rename
    /// of the folder itself does not redirect the export.
    root: OwnedFd,
    root_id: FileId,
    /// The root's device: entries on another file system (or another btrfs
    /// subvolume nested in the clone) are not served.
    dev: u64,
    names: Mutex<HashMap<FileId, Place>>,
    open: Mutex<LruCache<FileId, Arc<OwnedFd>>>,
}

/// The one mapping of system errors to datastore errors.
pub(crate) fn errno(e: Errno) -> DatastoreError {
    match e {
        Errno::NOENT => DatastoreError::NotFound,
        Errno::EXIST => DatastoreError::Exists,
        Errno::NOTDIR => DatastoreError::NotDir,
        Errno::ISDIR => DatastoreError::IsDir,
        Errno::NOTEMPTY => DatastoreError::NotEmpty,
        // ELOOP: a symlink where a walk needed a file or folder; never followed.
        Errno::ACCESS | Errno::PERM | Errno::LOOP => DatastoreError::Access,
        Errno::NOSPC | Errno::DQUOT => DatastoreError::NoSpace,
        Errno::ROFS => DatastoreError::ReadOnly,
        Errno::NAMETOOLONG => DatastoreError::InvalidName,
        Errno::INVAL => DatastoreError::Invalid,
        Errno::STALE => DatastoreError::Stale,
        Errno::FBIG => DatastoreError::TooBig,
        Errno::XDEV | Errno::OPNOTSUPP => DatastoreError::NotSupported,
        other => DatastoreError::Io(std::io::Error::from_raw_os_error(other.raw_os_error())),
    }
}

/// A name a client may use inside a folder: one component, never `.`/`..`.
pub(crate) fn check_name(name: &str) -> DsResult<()> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(DatastoreError::InvalidName);
    }
    Ok(())
}

fn time(secs: i64, nanos: u64) -> SystemTime {
    let nanos = Duration::from_nanos(nanos.min(999_999_999));
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nanos
    }
}

/// Attributes of a file as the datastore reports them.
#[allow(clippy::unnecessary_cast)] // field types differ between architectures
pub(crate) fn attr_of(st: &Stat) -> Attr {
    let kind = match FileType::from_raw_mode(st.st_mode as _) {
        FileType::Directory => FileKind::Directory,
        FileType::Symlink => FileKind::Symlink,
        _ => FileKind::Regular,
    };
    Attr {
        kind,
        mode: st.st_mode as u32 & 0o7777,
        nlink: st.st_nlink as u32,
        uid: st.st_uid as u32,
        gid: st.st_gid as u32,
        size: st.st_size.max(0) as u64,
        used: (st.st_blocks as u64).saturating_mul(512),
        fileid: st.st_ino as u64,
        atime: time(st.st_atime as i64, st.st_atime_nsec as u64),
        mtime: time(st.st_mtime as i64, st.st_mtime_nsec as u64),
        ctime: time(st.st_ctime as i64, st.st_ctime_nsec as u64),
    }
}

#[allow(clippy::unnecessary_cast)]
fn ino(st: &Stat) -> FileId {
    st.st_ino as u64
}

#[allow(clippy::unnecessary_cast)]
fn dev(st: &Stat) -> u64 {
    st.st_dev as u64
}

impl Tree {
    /// Opens the root of `folder`.
    pub fn open(folder: &Path) -> DsResult<Tree> {
        let root = rfs::open(
            folder,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(errno)?;
        let st = rfs::fstat(&root).map_err(errno)?;
        Ok(Tree {
            root,
            root_id: ino(&st),
            dev: dev(&st),
            names: Mutex::new(HashMap::new()),
            open: Mutex::new(LruCache::new(
                NonZeroUsize::new(OPEN_FILES).unwrap_or(NonZeroUsize::MIN),
            )),
        })
    }

    /// File id of the root folder.
    pub fn root_id(&self) -> FileId {
        self.root_id
    }

    /// The root's descriptor (for `fstatvfs`).
    pub fn root_fd(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Records that `id` is `name` in folder `parent`.
    pub fn remember(&self, id: FileId, parent: FileId, name: &str) {
        if id == self.root_id {
            return;
        }
        lock(&self.names).insert(
            id,
            Place {
                parent,
                name: name.to_string(),
            },
        );
    }

    /// Forgets `id`'s place and closes its data file.
    pub fn forget(&self, id: FileId) {
        lock(&self.names).remove(&id);
        lock(&self.open).pop(&id);
    }

    /// The folder holding `id` (the root for the root).
    pub fn parent_of(&self, id: FileId) -> DsResult<FileId> {
        if id == self.root_id {
            return Ok(self.root_id);
        }
        if let Some(p) = lock(&self.names).get(&id) {
            return Ok(p.parent);
        }
        self.rebuild(id)?;
        lock(&self.names)
            .get(&id)
            .map(|p| p.parent)
            .ok_or(DatastoreError::Stale)
    }

    /// Names from the root down to `id`, from the cache.
    fn components(&self, id: FileId) -> Option<Vec<String>> {
        let names = lock(&self.names);
        let mut out = Vec::new();
        let mut at = id;
        while at != self.root_id {
            let place = names.get(&at)?;
            out.push(place.name.clone());
            at = place.parent;
            if out.len() > MAX_DEPTH {
                return None;
            }
        }
        out.reverse();
        Some(out)
    }

    /// Opens `components` below the root: each folder with `O_PATH |
    /// O_DIRECTORY | O_NOFOLLOW`, the last one with `flags | O_NOFOLLOW`, so
    /// no symlink is ever followed.
    fn walk(&self, components: &[String], flags: OFlags) -> DsResult<OwnedFd> {
        let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let Some((last, folders)) = components.split_last() else {
            return rfs::openat(&self.root, ".", flags, Mode::empty()).map_err(errno);
        };
        let mut dir: Option<OwnedFd> = None;
        for name in folders {
            let base = dir.as_ref().map_or(self.root.as_fd(), |d| d.as_fd());
            let next = rfs::openat(
                base,
                name.as_str(),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(errno)?;
            dir = Some(next);
        }
        let base = dir.as_ref().map_or(self.root.as_fd(), |d| d.as_fd());
        rfs::openat(base, last.as_str(), flags, Mode::empty()).map_err(errno)
    }

    /// Opens file `id` with `flags` (never following a symlink) and checks
    /// the name still leads to that inode; a stale cached path is rebuilt
    /// once. `Stale` when the file is gone.
    pub fn open_id(&self, id: FileId, flags: OFlags) -> DsResult<OwnedFd> {
        for attempt in 0..2 {
            if let Some(components) = self.components(id) {
                match self.walk(&components, flags) {
                    Ok(fd) => {
                        if ino(&rfs::fstat(&fd).map_err(errno)?) == id {
                            return Ok(fd);
                        }
                    }
                    Err(DatastoreError::NotFound | DatastoreError::NotDir) => {}
                    Err(e) => return Err(e),
                }
                lock(&self.names).remove(&id);
            }
            if attempt == 0 {
                self.rebuild(id)?;
            }
        }
        Err(DatastoreError::Stale)
    }

    /// Folder `dir` as an `O_PATH` descriptor, for `*at` calls on its names.
    pub fn open_dir(&self, dir: FileId) -> DsResult<OwnedFd> {
        self.open_id(dir, OFlags::PATH | OFlags::DIRECTORY)
    }

    /// Attributes of `name` in the folder `dir_fd` (a symlink's own), and
    /// records its place. Entries of another file system are not served.
    pub fn stat_at(&self, dir_fd: &OwnedFd, dir: FileId, name: &str) -> DsResult<Attr> {
        let st = rfs::statat(dir_fd, name, AtFlags::SYMLINK_NOFOLLOW).map_err(errno)?;
        if dev(&st) != self.dev {
            return Err(DatastoreError::Access);
        }
        self.remember(ino(&st), dir, name);
        Ok(attr_of(&st))
    }

    /// Attributes of an open file.
    pub fn stat_fd(&self, fd: &OwnedFd) -> DsResult<Attr> {
        Ok(attr_of(&rfs::fstat(fd).map_err(errno)?))
    }

    /// The entries of folder `dir` (not `.` and `..`) with their
    /// attributes, recorded in the id map.
    pub fn list(&self, dir: FileId) -> DsResult<Vec<(String, Attr)>> {
        let fd = self.open_id(dir, OFlags::RDONLY | OFlags::DIRECTORY)?;
        let mut out = Vec::new();
        for entry in Dir::new(fd.try_clone().map_err(DatastoreError::Io)?).map_err(errno)? {
            let entry = entry.map_err(errno)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "." || name == ".." {
                continue;
            }
            match self.stat_at(&fd, dir, &name) {
                Ok(attr) => out.push((name, attr)),
                // Removed meanwhile, or on another file system: not listed.
                Err(DatastoreError::NotFound | DatastoreError::Access) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Walks the folder breadth first, recording every place, until `wanted`
    /// is found. `Stale` when it is not in the folder any more.
    fn rebuild(&self, wanted: FileId) -> DsResult<()> {
        let mut queue = VecDeque::from([self.root_id]);
        let mut visited = 0usize;
        while let Some(dir) = queue.pop_front() {
            let entries = match self.list(dir) {
                Ok(e) => e,
                // A folder that went away during the walk.
                Err(DatastoreError::Stale | DatastoreError::NotFound) => continue,
                Err(e) => return Err(e),
            };
            for (_, attr) in entries {
                visited += 1;
                if attr.fileid == wanted {
                    return Ok(());
                }
                if attr.kind == FileKind::Directory {
                    queue.push_back(attr.fileid);
                }
            }
            if visited > MAX_REBUILD_ENTRIES {
                break;
            }
        }
        Err(DatastoreError::Stale)
    }

    /// A descriptor for READ and WRITE of regular file `id` (read-write when
    /// allowed, else read-only), kept open between calls.
    pub fn data_fd(&self, id: FileId) -> DsResult<Arc<OwnedFd>> {
        if let Some(fd) = lock(&self.open).get(&id) {
            return Ok(fd.clone());
        }
        let fd = match self.open_id(id, OFlags::RDWR) {
            Ok(fd) => fd,
            Err(DatastoreError::Access | DatastoreError::ReadOnly) => {
                self.open_id(id, OFlags::RDONLY)?
            }
            Err(e) => return Err(e),
        };
        let st = rfs::fstat(&fd).map_err(errno)?;
        if FileType::from_raw_mode(st.st_mode as _) != FileType::RegularFile {
            return Err(DatastoreError::Invalid);
        }
        let fd = Arc::new(fd);
        lock(&self.open).put(id, fd.clone());
        Ok(fd)
    }
}
