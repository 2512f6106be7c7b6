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

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

// The vocabulary (ids, attributes, errors) belongs to the datastore: it is
// what a namespace is, whatever protocol serves it.
pub use crate::datastore::types::{
    Attr, CreateMode, DatastoreError as BackendError, DirEntry, DirPage, Export, ExportId, FileId,
    FileKind, FsStat, ReadReply, SetAttr, SetTime, Stability, WriteReply,
};

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
