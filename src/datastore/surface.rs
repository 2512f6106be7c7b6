//! [`FileOps`]: the one operation surface every frontend calls.
//!
//! NFS, FUSE and the block exports are protocol encodings over these
//! operations; the datastore implements them once (`ops.rs` for the
//! namespace, `io.rs` for data), and a test backend may implement them in
//! memory. A frontend holds an `Arc<dyn FileOps>` and converts its own
//! handles, inodes or LUNs into [`FileAt`] and its errors from
//! [`DatastoreError`] in one place.
//!
//! Names reaching these methods have already been checked by the frontend
//! (non-empty, no `/`, no NUL, at most 255 bytes, never `.`; `..` only for
//! lookup below an export root). Implementations still refuse anything that
//! would escape an export: defence in depth.

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use super::extents::FileExtent;
use super::types::{
    Attr, CreateMode, DatastoreError, DirPage, DsResult, Export, ExportId, FileId, FsStat,
    ReadReply, SetAttr, Stability, WriteReply,
};

/// One file or folder of one export: what every operation is addressed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FileAt {
    /// The export, as returned by [`FileOps::export`].
    pub export: ExportId,
    /// The file's persisted id inside it.
    pub id: FileId,
}

impl FileAt {
    /// `id` in `export`.
    pub fn new(export: ExportId, id: FileId) -> FileAt {
        FileAt { export, id }
    }

    /// The entry `name` of this folder.
    pub fn child(self, name: &str) -> NameAt {
        NameAt {
            dir: self,
            name: name.to_string(),
        }
    }
}

/// A name in a folder: what lookup, create, remove and rename act on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NameAt {
    /// The folder.
    pub dir: FileAt,
    /// The entry's name in it.
    pub name: String,
}

/// The namespace and data operations of the exports a frontend serves.
///
/// All methods may run concurrently, from many connections. The caller has
/// already checked the client against the export's allow-list.
#[async_trait]
pub trait FileOps: Send + Sync + 'static {
    /// Every export (MOUNT's list, FUSE's roots).
    fn exports(&self) -> Vec<Arc<Export>>;

    /// One export by id, looked up on every call (keep it cheap).
    fn export(&self, id: ExportId) -> Option<Arc<Export>>;

    /// Attributes of a file.
    async fn getattr(&self, at: FileAt) -> DsResult<Attr>;

    /// Changes attributes. When `guard` is set and differs from the file's
    /// ctime, fails with [`DatastoreError::NotSync`] and changes nothing.
    async fn setattr(&self, at: FileAt, set: &SetAttr, guard: Option<SystemTime>)
        -> DsResult<Attr>;

    /// Finds a name in a folder; `..` goes up but never above the export root.
    async fn lookup(&self, at: &NameAt) -> DsResult<Attr>;

    /// Reads up to `count` bytes at `offset`.
    async fn read(&self, at: FileAt, offset: u64, count: u32) -> DsResult<ReadReply>;

    /// Writes `data` at `offset` with at least the durability `stability`.
    async fn write(
        &self,
        at: FileAt,
        offset: u64,
        data: Bytes,
        stability: Stability,
    ) -> DsResult<WriteReply>;

    /// Writes each `(offset, data)` of `writes` to one file, as `write` one
    /// after the other would, durable as `stability` asks; an implementation
    /// may hand them to its storage together (a block frontend's queue of
    /// writes costs one hand-off, not one each).
    ///
    /// # Errors
    /// `(n, error)`: the first `n` writes were done, the others were not.
    async fn write_many(
        &self,
        at: FileAt,
        writes: Vec<(u64, Bytes)>,
        stability: Stability,
    ) -> Result<(), (usize, DatastoreError)> {
        for (i, (offset, data)) in writes.into_iter().enumerate() {
            self.write(at, offset, data, stability)
                .await
                .map_err(|e| (i, e))?;
        }
        Ok(())
    }

    /// Makes every earlier write of the file durable (NFS COMMIT, fsync,
    /// NBD FLUSH, SCSI SYNCHRONIZE CACHE: one rule).
    async fn commit(&self, at: FileAt) -> DsResult<()>;

    /// Creates a regular file. `attrs.uid`/`gid` carry the caller's
    /// identity when the client did not ask for an owner.
    async fn create(&self, at: &NameAt, mode: CreateMode, attrs: &SetAttr) -> DsResult<Attr>;

    /// Creates a folder.
    async fn mkdir(&self, at: &NameAt, attrs: &SetAttr) -> DsResult<Attr>;

    /// Removes a non-folder.
    async fn remove(&self, at: &NameAt) -> DsResult<()>;

    /// Removes an empty folder.
    async fn rmdir(&self, at: &NameAt) -> DsResult<()>;

    /// Renames within one export, replacing an existing target as POSIX does.
    async fn rename(&self, from: &NameAt, to: &NameAt) -> DsResult<()>;

    /// Lists a folder after `cookie` (0 = from the start), at most
    /// `max_entries` entries.
    async fn readdir(&self, dir: FileAt, cookie: u64, max_entries: usize) -> DsResult<DirPage>;

    /// Space figures of where this export's writes land.
    async fn fsstat(&self, export: ExportId) -> DsResult<FsStat>;

    /// Target of a symbolic link.
    async fn readlink(&self, _at: FileAt) -> DsResult<String> {
        Err(DatastoreError::NotSupported)
    }

    /// Creates a symbolic link.
    async fn symlink(&self, _at: &NameAt, _target: &str, _attrs: &SetAttr) -> DsResult<Attr> {
        Err(DatastoreError::NotSupported)
    }

    /// Creates a hard link to `file` (revive's datastore has none).
    async fn link(&self, _file: FileAt, _at: &NameAt) -> DsResult<Attr> {
        Err(DatastoreError::NotSupported)
    }

    /// What `[offset, offset + len)` of a file holds (NBD BLOCK_STATUS,
    /// SCSI GET LBA STATUS): consecutive extents from `offset`, covering at
    /// least its first byte and at most the range (ask again from where a
    /// long answer stops). Beyond the end of the file reads as zeros.
    async fn extents(&self, _at: FileAt, _offset: u64, _len: u64) -> DsResult<Vec<FileExtent>> {
        Err(DatastoreError::NotSupported)
    }

    /// Makes `[offset, offset + len)` of a file read as zeros, freeing what
    /// it can (NBD TRIM and WRITE_ZEROES, SCSI UNMAP); durable on return.
    async fn punch(&self, _at: FileAt, _offset: u64, _len: u64) -> DsResult<()> {
        Err(DatastoreError::NotSupported)
    }
}
