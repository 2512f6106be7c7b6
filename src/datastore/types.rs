//! The vocabulary of the datastore: file ids, exports, attributes, directory
//! listings and errors, as any file-serving frontend (NFS today) needs them.
//! Nothing here knows RPC or XDR.

use std::net::IpAddr;
use std::time::SystemTime;

use bytes::Bytes;

pub use crate::cache::Stability;

/// A file's identity inside one export, chosen and persisted by the backend.
///
/// It is the NFS `fileid` clients see (ESXi names lock files `.lck-<fileid>`),
/// and it is embedded in file handles, so it must stay the same across
/// restarts and must never be reused for another file within one export
/// instance (see [`Export::instance`]).
pub type FileId = u64;

/// Identifies an export in file handles; persisted by the backend.
pub type ExportId = u32;

/// Largest file a client may make: 64 TiB, the VMFS/vSphere virtual disk
/// limit, advertised as FSINFO's `maxfilesize`. SETATTR, WRITE and CREATE
/// beyond it fail with [`DatastoreError::TooBig`] before changing anything.
pub const MAX_FILE_SIZE: u64 = 64 << 40;

/// One exported tree, as published by the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    /// Stable number of the export, embedded in every file handle.
    pub id: ExportId,
    /// Persisted instance of this export: a handle whose instance differs is
    /// answered with `NFS3ERR_STALE`. Change it only when the export is
    /// recreated from scratch and its old file ids lose their meaning.
    /// Never derive it from process start time: ESXi keeps handles forever.
    pub instance: u64,
    /// Path clients pass to MOUNT, e.g. `/revive`.
    pub path: String,
    /// File id of the export's root directory.
    pub root: FileId,
    /// Client addresses allowed to mount and to call NFS on this export.
    /// An empty list allows nobody.
    pub allowed_clients: Vec<IpAddr>,
}

impl Export {
    /// Whether `client` is on the allow-list. IPv4-mapped IPv6 addresses
    /// (from dual-stack sockets) compare equal to their IPv4 form.
    pub fn allows(&self, client: IpAddr) -> bool {
        let client = canonical(client);
        self.allowed_clients.iter().any(|a| canonical(*a) == client)
    }
}

fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// Kind of a file system object; only what revive presents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file (VM disk, `.vmx`, lock file...).
    Regular,
    /// A directory.
    Directory,
    /// A symbolic link (optional for backends).
    Symlink,
}

/// Attributes of one file, as the backend knows them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attr {
    /// Kind of object.
    pub kind: FileKind,
    /// Permission bits (`0o644`...), without the file type bits.
    pub mode: u32,
    /// Number of names pointing at the object.
    pub nlink: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Logical size in bytes.
    pub size: u64,
    /// Bytes really allocated (sparse files report less than `size`).
    pub used: u64,
    /// Same as the [`FileId`] used to address the file.
    pub fileid: FileId,
    /// Last access.
    pub atime: SystemTime,
    /// Last data modification.
    pub mtime: SystemTime,
    /// Last attribute change; also the SETATTR guard compares against it.
    pub ctime: SystemTime,
}

/// How SETATTR (or CREATE) sets a time stamp.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SetTime {
    /// Leave it alone.
    #[default]
    DontChange,
    /// Use the server's current time.
    ServerTime,
    /// Use the time the client sent.
    ClientTime(SystemTime),
}

/// Attribute changes requested by SETATTR, CREATE, MKDIR or SYMLINK.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetAttr {
    /// New permission bits.
    pub mode: Option<u32>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
    /// New size: truncate or sparse extend.
    pub size: Option<u64>,
    /// New access time.
    pub atime: SetTime,
    /// New modification time.
    pub mtime: SetTime,
}

/// How CREATE treats an existing name (RFC 1813 `createmode3`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateMode {
    /// Create, or open if the name exists. On an existing file apply only
    /// `size` from the attributes (a truncate, as knfsd does): the rest,
    /// the owner in particular, describes a new file.
    Unchecked,
    /// Fail with [`DatastoreError::Exists`] if the name exists.
    Guarded,
    /// Exactly-once create: the backend stores the verifier with the file; a
    /// retransmitted CREATE carrying the same verifier succeeds and returns
    /// the same file, a different verifier fails with `Exists`.
    Exclusive([u8; 8]),
}

/// Result of a READ.
#[derive(Clone, Debug)]
pub struct ReadReply {
    /// The bytes read; shorter than asked at end of file. `Bytes` so a block
    /// cache can hand out its buffers without a copy.
    pub data: Bytes,
    /// True when the read reached end of file.
    pub eof: bool,
    /// Attributes after the read, if the backend has them at hand: clients
    /// use them to validate their caches, but they are optional.
    pub attr: Option<Attr>,
}

/// Result of a WRITE.
#[derive(Clone, Debug)]
pub struct WriteReply {
    /// Bytes written (all of them, for revive).
    pub count: u32,
    /// Durability reached; at least what was asked.
    pub committed: Stability,
    /// Attributes after the write, if at hand.
    pub attr: Option<Attr>,
}

/// One directory entry returned by [`FileOps::readdir`](super::FileOps::readdir).
#[derive(Clone, Debug)]
pub struct DirEntry {
    /// Entry name.
    pub name: String,
    /// Cookie that resumes the listing right after this entry. Must stay
    /// valid while the directory changes and across restarts when possible.
    pub cookie: u64,
    /// Attributes of the entry (used by READDIRPLUS and for the file id).
    pub attr: Attr,
}

/// One page of a directory listing.
#[derive(Clone, Debug)]
pub struct DirPage {
    /// Entries after the requested cookie, in cookie order. `.` and `..` are
    /// the backend's choice to include.
    pub entries: Vec<DirEntry>,
    /// True when no entry follows the last one returned.
    pub eof: bool,
}

/// Space figures for FSSTAT: the real numbers of where writes land.
pub use crate::fsutil::Space as FsStat;

/// What a datastore operation can fail with; the NFS layer maps each to one
/// `nfsstat3` in one place.
#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    /// No such file or directory.
    #[error("not found")]
    NotFound,
    /// The name already exists.
    #[error("already exists")]
    Exists,
    /// A directory was expected.
    #[error("not a directory")]
    NotDir,
    /// A non-directory was expected.
    #[error("is a directory")]
    IsDir,
    /// RMDIR (or RENAME over) a directory that has entries.
    #[error("directory not empty")]
    NotEmpty,
    /// Permission denied.
    #[error("access denied")]
    Access,
    /// The backend's storage failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// The name is not acceptable.
    #[error("invalid name")]
    InvalidName,
    /// An argument is not acceptable (e.g. bad offset).
    #[error("invalid argument")]
    Invalid,
    /// The file id no longer exists (file removed, export gone).
    #[error("stale file")]
    Stale,
    /// Out of space where writes land.
    #[error("no space left")]
    NoSpace,
    /// The object is read-only.
    #[error("read-only")]
    ReadOnly,
    /// The operation is not implemented by this backend.
    #[error("not supported")]
    NotSupported,
    /// A READDIR cookie is no longer valid.
    #[error("bad cookie")]
    BadCookie,
    /// The file would exceed the maximum file size.
    #[error("file too large")]
    TooBig,
    /// The SETATTR guard (ctime) did not match.
    #[error("attribute guard mismatch")]
    NotSync,
    /// Transient: ask the client to retry later (e.g. chunk fetch from S3 in
    /// progress and too slow).
    #[error("try again later")]
    Jukebox,
}

/// Shorthand for datastore results.
pub type DsResult<T> = Result<T, DatastoreError>;
