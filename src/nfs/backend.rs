//! The contract between the NFS protocol layer and the namespace behind it.
//!
//! [`NfsBackend`] is what the `datastore` layer implements: it knows files,
//! directories and exports, and nothing of RPC, XDR or file handles. Every
//! method is keyed by the export and a [`FileId`] that the backend chooses and
//! persists; the protocol layer turns those into wire file handles
//! (see [`crate::nfs::handle`]).
//!
//! Names reaching the backend have already been checked by the protocol layer
//! (non-empty, valid UTF-8, no `/`, no NUL, at most 255 bytes, never `.`;
//! `..` only for LOOKUP below the export root). The backend should still
//! refuse anything that would escape an export: defence in depth.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

/// A file's identity inside one export, chosen and persisted by the backend.
///
/// It is the NFS `fileid` clients see (ESXi names lock files `.lck-<fileid>`),
/// and it is embedded in file handles, so it must stay the same across
/// restarts and must never be reused for another file within one export
/// instance (see [`Export::instance`]).
pub type FileId = u64;

/// Identifies an export in file handles; persisted by the backend.
pub type ExportId = u32;

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
    /// Fail with [`BackendError::Exists`] if the name exists.
    Guarded,
    /// Exactly-once create: the backend stores the verifier with the file; a
    /// retransmitted CREATE carrying the same verifier succeeds and returns
    /// the same file, a different verifier fails with `Exists`.
    Exclusive([u8; 8]),
}

/// Durability a WRITE asks for, or that the backend achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stability {
    /// May sit in memory until COMMIT.
    Unstable,
    /// Data stable, metadata may follow at COMMIT.
    DataSync,
    /// Data and metadata stable before the reply.
    FileSync,
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

/// One directory entry returned by [`NfsBackend::readdir`].
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
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FsStat {
    /// Total bytes.
    pub total_bytes: u64,
    /// Free bytes.
    pub free_bytes: u64,
    /// Free bytes available to the caller.
    pub avail_bytes: u64,
    /// Total file slots.
    pub total_files: u64,
    /// Free file slots.
    pub free_files: u64,
    /// Free file slots available to the caller.
    pub avail_files: u64,
}

/// Errors a backend reports; [`crate::nfs::error::nfsstat`] maps each to one
/// `nfsstat3` in one place.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
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

/// Shorthand for backend results.
pub type BackendResult<T> = Result<T, BackendError>;

/// The namespace an NFS client sees; implemented by `datastore` (and by an
/// in-memory test backend).
///
/// All methods may run concurrently, from many connections. `export` is
/// always an id the backend returned from [`NfsBackend::export`], and the
/// caller has already checked the client's address against its allow-list.
#[async_trait]
pub trait NfsBackend: Send + Sync + 'static {
    /// Every export, for MOUNT (MNT, EXPORT).
    fn exports(&self) -> Vec<Arc<Export>>;

    /// One export by id, looked up on every NFS call (keep it cheap).
    fn export(&self, id: ExportId) -> Option<Arc<Export>>;

    /// Attributes of a file.
    async fn getattr(&self, export: ExportId, id: FileId) -> BackendResult<Attr>;

    /// Change attributes. When `guard` is set and differs from the file's
    /// ctime, fail with [`BackendError::NotSync`] and change nothing.
    async fn setattr(
        &self,
        export: ExportId,
        id: FileId,
        set: &SetAttr,
        guard: Option<SystemTime>,
    ) -> BackendResult<Attr>;

    /// Find `name` in directory `dir`. `name` may be `..` (parent) when
    /// `dir` is not the export root.
    async fn lookup(&self, export: ExportId, dir: FileId, name: &str) -> BackendResult<Attr>;

    /// Read up to `count` bytes at `offset`.
    async fn read(
        &self,
        export: ExportId,
        id: FileId,
        offset: u64,
        count: u32,
    ) -> BackendResult<ReadReply>;

    /// Write `data` at `offset` with at least the durability `stability`.
    async fn write(
        &self,
        export: ExportId,
        id: FileId,
        offset: u64,
        data: Bytes,
        stability: Stability,
    ) -> BackendResult<WriteReply>;

    /// Make every earlier unstable write in `[offset, offset + count)` stable
    /// (`count == 0` means to end of file).
    async fn commit(
        &self,
        export: ExportId,
        id: FileId,
        offset: u64,
        count: u32,
    ) -> BackendResult<()>;

    /// Create a regular file. `attrs.uid`/`gid` carry the caller's AUTH_SYS
    /// identity when the client did not ask for an owner.
    async fn create(
        &self,
        export: ExportId,
        dir: FileId,
        name: &str,
        mode: CreateMode,
        attrs: &SetAttr,
    ) -> BackendResult<Attr>;

    /// Create a directory.
    async fn mkdir(
        &self,
        export: ExportId,
        dir: FileId,
        name: &str,
        attrs: &SetAttr,
    ) -> BackendResult<Attr>;

    /// Remove a non-directory.
    async fn remove(&self, export: ExportId, dir: FileId, name: &str) -> BackendResult<()>;

    /// Remove an empty directory.
    async fn rmdir(&self, export: ExportId, dir: FileId, name: &str) -> BackendResult<()>;

    /// Rename, replacing an existing target as POSIX rename does.
    async fn rename(
        &self,
        export: ExportId,
        from_dir: FileId,
        from_name: &str,
        to_dir: FileId,
        to_name: &str,
    ) -> BackendResult<()>;

    /// List `dir` after `cookie` (0 = from the start), at most `max_entries`.
    async fn readdir(
        &self,
        export: ExportId,
        dir: FileId,
        cookie: u64,
        max_entries: usize,
    ) -> BackendResult<DirPage>;

    /// Space figures of where this export's writes land.
    async fn fsstat(&self, export: ExportId) -> BackendResult<FsStat>;

    /// Target of a symbolic link.
    async fn readlink(&self, _export: ExportId, _id: FileId) -> BackendResult<String> {
        Err(BackendError::NotSupported)
    }

    /// Create a symbolic link.
    async fn symlink(
        &self,
        _export: ExportId,
        _dir: FileId,
        _name: &str,
        _target: &str,
        _attrs: &SetAttr,
    ) -> BackendResult<Attr> {
        Err(BackendError::NotSupported)
    }

    /// Create a hard link.
    async fn link(
        &self,
        _export: ExportId,
        _id: FileId,
        _dir: FileId,
        _name: &str,
    ) -> BackendResult<Attr> {
        Err(BackendError::NotSupported)
    }
}
