//! The mappings of the FUSE frontend, each in one place: inode numbers ↔
//! datastore file ids, datastore attributes → kernel attributes (with the
//! optional owner mapping), datastore errors → errno, and the kernel's
//! names, creation modes and open flags → the datastore's.

use std::time::SystemTime;

use fuser::{Errno, FileAttr, FileType, INodeNo};

use std::ffi::OsStr;

use fuser::{OpenFlags, Request};

use crate::datastore::{Attr, DatastoreError, FileId, FileKind, SetAttr, SetTime, Stability};

/// Inode the datastore's own root id (1) gets when it is not the mount's
/// root: FUSE reserves 1 for the mount root, and file ids never get this high.
const EXPORT_ROOT_ALIAS: u64 = u64::MAX - 1;

/// The datastore's root folder id (every export's root).
const DATASTORE_ROOT: FileId = crate::datastore::ROOT_ID;

/// Inode numbers of one mount. The kernel's inode is the datastore's file
/// id, persisted and never reused within an export instance, except that
/// the mounted folder is inode 1 (FUSE's root). No table is kept: a
/// FORGET has nothing to free and ids stay valid across remounts.
#[derive(Debug, Clone, Copy)]
pub(super) struct Inodes {
    /// File id of the mounted folder.
    pub root: FileId,
}

impl Inodes {
    /// The inode of a file id.
    pub fn ino(&self, id: FileId) -> INodeNo {
        if id == self.root {
            INodeNo::ROOT
        } else if id == DATASTORE_ROOT {
            INodeNo(EXPORT_ROOT_ALIAS)
        } else {
            INodeNo(id)
        }
    }

    /// The file id of an inode.
    pub fn id(&self, ino: INodeNo) -> FileId {
        match ino.0 {
            1 => self.root,
            EXPORT_ROOT_ALIAS => DATASTORE_ROOT,
            other => other,
        }
    }
}

/// How attributes are shown: owners as stored, or all mapped to one user.
#[derive(Debug, Clone, Copy)]
pub(super) struct Presentation {
    pub inodes: Inodes,
    pub owner: Option<(u32, u32)>,
}

impl Presentation {
    /// The kernel's attributes of a datastore file.
    pub fn file_attr(&self, attr: &Attr) -> FileAttr {
        let (uid, gid) = self.owner.unwrap_or((attr.uid, attr.gid));
        FileAttr {
            ino: self.inodes.ino(attr.fileid),
            size: attr.size,
            blocks: attr.used.div_ceil(512),
            atime: attr.atime,
            mtime: attr.mtime,
            ctime: attr.ctime,
            crtime: attr.ctime,
            kind: file_type(attr.kind),
            perm: (attr.mode & 0o7777) as u16,
            nlink: attr.nlink,
            uid,
            gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

/// The kernel's file type of a datastore kind.
pub(super) fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::Regular => FileType::RegularFile,
        FileKind::Directory => FileType::Directory,
        FileKind::Symlink => FileType::Symlink,
    }
}

/// How a datastore failure reaches the caller of a system call.
pub(super) fn errno(e: &DatastoreError) -> Errno {
    let code = match e {
        DatastoreError::NotFound => libc::ENOENT,
        DatastoreError::Exists => libc::EEXIST,
        DatastoreError::NotDir => libc::ENOTDIR,
        DatastoreError::IsDir => libc::EISDIR,
        DatastoreError::NotEmpty => libc::ENOTEMPTY,
        DatastoreError::Access => libc::EACCES,
        DatastoreError::Io(_) => libc::EIO,
        DatastoreError::InvalidName => libc::EINVAL,
        DatastoreError::Invalid => libc::EINVAL,
        // A removed file still open: the kernel keeps the inode, we do not.
        DatastoreError::Stale => libc::ESTALE,
        DatastoreError::NoSpace => libc::ENOSPC,
        DatastoreError::ReadOnly => libc::EROFS,
        DatastoreError::NotSupported => libc::EOPNOTSUPP,
        DatastoreError::BadCookie => libc::EINVAL,
        DatastoreError::TooBig => libc::EFBIG,
        DatastoreError::NotSync => libc::EAGAIN,
        // The backup store is unreachable for now: a local file system has
        // no "retry later", and a database treats EIO as fatal for the
        // operation only, so report I/O errors honestly.
        DatastoreError::Jukebox => libc::EIO,
    };
    Errno::from_i32(code)
}

/// A kernel time change as the datastore's.
pub(super) fn set_time(t: Option<fuser::TimeOrNow>) -> SetTime {
    match t {
        None => SetTime::DontChange,
        Some(fuser::TimeOrNow::Now) => SetTime::ServerTime,
        Some(fuser::TimeOrNow::SpecificTime(at)) => SetTime::ClientTime(at),
    }
}

/// Attributes of `.` and `..` entries, which the kernel never caches.
pub(super) fn dir_placeholder(ino: INodeNo) -> FileAttr {
    let now = SystemTime::now();
    FileAttr {
        ino,
        size: 4096,
        blocks: 8,
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind: FileType::Directory,
        perm: 0o755,
        nlink: 2,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// A name from the kernel as the datastore takes it (UTF-8 only).
pub(super) fn utf8(name: &OsStr) -> Result<String, Errno> {
    name.to_str()
        .map(str::to_string)
        .ok_or(Errno::from_i32(libc::EINVAL))
}

/// What a new file or folder is created with: its permission bits after the
/// caller's umask, owned by the caller.
pub(super) fn new_attrs(req: &Request, mode: u32, umask: u32) -> SetAttr {
    SetAttr {
        mode: Some(mode & !umask & 0o7777),
        uid: Some(req.uid()),
        gid: Some(req.gid()),
        ..SetAttr::default()
    }
}

/// Durability a WRITE asks for: files opened `O_SYNC`/`O_DSYNC` want each
/// write durable; the rest wait for `fsync` (the write cache's commit).
pub(super) fn stability(flags: OpenFlags) -> Stability {
    if flags.0 & libc::O_SYNC == libc::O_SYNC {
        Stability::FileSync
    } else if flags.0 & libc::O_DSYNC != 0 {
        Stability::DataSync
    } else {
        Stability::Unstable
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mounted_folder_is_inode_one_and_ids_map_back() {
        let inodes = Inodes { root: 7 };
        assert_eq!(inodes.ino(7), INodeNo::ROOT);
        assert_eq!(inodes.id(INodeNo::ROOT), 7);
        assert_eq!(inodes.ino(42), INodeNo(42));
        assert_eq!(inodes.id(INodeNo(42)), 42);
        assert_eq!(inodes.id(inodes.ino(DATASTORE_ROOT)), DATASTORE_ROOT);
        let whole = Inodes {
            root: DATASTORE_ROOT,
        };
        assert_eq!(whole.ino(DATASTORE_ROOT), INodeNo::ROOT);
        assert_eq!(whole.id(INodeNo::ROOT), DATASTORE_ROOT);
    }

    #[test]
    fn owners_are_mapped_only_when_asked() {
        let now = SystemTime::now();
        let attr = Attr {
            kind: FileKind::Regular,
            mode: 0o100600,
            nlink: 1,
            uid: 0,
            gid: 0,
            size: 10,
            used: 4096,
            fileid: 9,
            atime: now,
            mtime: now,
            ctime: now,
        };
        let inodes = Inodes { root: 2 };
        let kept = Presentation {
            inodes,
            owner: None,
        }
        .file_attr(&attr);
        assert_eq!((kept.uid, kept.gid, kept.perm), (0, 0, 0o600));
        assert_eq!(kept.blocks, 8);
        let mapped = Presentation {
            inodes,
            owner: Some((101, 104)),
        }
        .file_attr(&attr);
        assert_eq!((mapped.uid, mapped.gid), (101, 104));
    }

    #[test]
    fn errors_map_to_their_errno() {
        assert_eq!(errno(&DatastoreError::NotFound).code(), libc::ENOENT);
        assert_eq!(errno(&DatastoreError::NotEmpty).code(), libc::ENOTEMPTY);
        assert_eq!(errno(&DatastoreError::NoSpace).code(), libc::ENOSPC);
    }

    #[test]
    fn sync_opens_ask_for_durable_writes() {
        assert_eq!(stability(OpenFlags(libc::O_RDWR)), Stability::Unstable);
        assert_eq!(
            stability(OpenFlags(libc::O_RDWR | libc::O_DSYNC)),
            Stability::DataSync
        );
        assert_eq!(
            stability(OpenFlags(libc::O_WRONLY | libc::O_SYNC)),
            Stability::FileSync
        );
    }
}
