//! One [`FileOps`] over both kinds of export: the repository datastore's
//! (published restore points, write caches) and passthrough exports (live
//! folders such as a storage snapshot's writable clone). Each call goes to
//! the one that owns its export id ([`passthrough::owns`]); nothing else is
//! decided here, so a frontend (NFS, FUSE) serves both through one trait.

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use super::passthrough::{self, Passthrough};
use super::surface::{FileAt, FileOps, NameAt};
use super::types::{
    Attr, CreateMode, DatastoreError, DirPage, DsResult, Export, ExportId, FsStat, ReadReply,
    SetAttr, Stability, WriteReply,
};

/// The operation surface `revive serve` hands its NFS server.
pub struct Router {
    datastore: Arc<dyn FileOps>,
    passthrough: Arc<Passthrough>,
}

impl Router {
    /// Serves `datastore`'s exports and `passthrough`'s.
    pub fn new(datastore: Arc<dyn FileOps>, passthrough: Arc<Passthrough>) -> Router {
        Router {
            datastore,
            passthrough,
        }
    }

    /// Whichever side owns `export`.
    fn owner(&self, export: ExportId) -> &dyn FileOps {
        if passthrough::owns(export) {
            self.passthrough.as_ref()
        } else {
            self.datastore.as_ref()
        }
    }
}

#[async_trait]
impl FileOps for Router {
    fn exports(&self) -> Vec<Arc<Export>> {
        let mut all = self.datastore.exports();
        all.extend(self.passthrough.exports());
        all
    }

    fn export(&self, id: ExportId) -> Option<Arc<Export>> {
        self.owner(id).export(id)
    }

    async fn getattr(&self, at: FileAt) -> DsResult<Attr> {
        self.owner(at.export).getattr(at).await
    }

    async fn setattr(
        &self,
        at: FileAt,
        set: &SetAttr,
        guard: Option<SystemTime>,
    ) -> DsResult<Attr> {
        self.owner(at.export).setattr(at, set, guard).await
    }

    async fn lookup(&self, at: &NameAt) -> DsResult<Attr> {
        self.owner(at.dir.export).lookup(at).await
    }

    async fn read(&self, at: FileAt, offset: u64, count: u32) -> DsResult<ReadReply> {
        self.owner(at.export).read(at, offset, count).await
    }

    async fn write(
        &self,
        at: FileAt,
        offset: u64,
        data: Bytes,
        stability: Stability,
    ) -> DsResult<WriteReply> {
        self.owner(at.export)
            .write(at, offset, data, stability)
            .await
    }

    async fn write_many(
        &self,
        at: FileAt,
        writes: Vec<(u64, Bytes)>,
        stability: Stability,
    ) -> Result<(), (usize, DatastoreError)> {
        self.owner(at.export)
            .write_many(at, writes, stability)
            .await
    }

    async fn commit(&self, at: FileAt) -> DsResult<()> {
        self.owner(at.export).commit(at).await
    }

    async fn create(&self, at: &NameAt, mode: CreateMode, attrs: &SetAttr) -> DsResult<Attr> {
        self.owner(at.dir.export).create(at, mode, attrs).await
    }

    async fn mkdir(&self, at: &NameAt, attrs: &SetAttr) -> DsResult<Attr> {
        self.owner(at.dir.export).mkdir(at, attrs).await
    }

    async fn remove(&self, at: &NameAt) -> DsResult<()> {
        self.owner(at.dir.export).remove(at).await
    }

    async fn rmdir(&self, at: &NameAt) -> DsResult<()> {
        self.owner(at.dir.export).rmdir(at).await
    }

    /// Within one export only: nothing moves between the two kinds.
    async fn rename(&self, from: &NameAt, to: &NameAt) -> DsResult<()> {
        if from.dir.export != to.dir.export {
            return Err(DatastoreError::Invalid);
        }
        self.owner(from.dir.export).rename(from, to).await
    }

    async fn readdir(&self, dir: FileAt, cookie: u64, max_entries: usize) -> DsResult<DirPage> {
        self.owner(dir.export)
            .readdir(dir, cookie, max_entries)
            .await
    }

    async fn fsstat(&self, export: ExportId) -> DsResult<FsStat> {
        self.owner(export).fsstat(export).await
    }

    async fn readlink(&self, at: FileAt) -> DsResult<String> {
        self.owner(at.export).readlink(at).await
    }

    async fn symlink(&self, at: &NameAt, target: &str, attrs: &SetAttr) -> DsResult<Attr> {
        self.owner(at.dir.export).symlink(at, target, attrs).await
    }

    async fn link(&self, file: FileAt, at: &NameAt) -> DsResult<Attr> {
        if file.export != at.dir.export {
            return Err(DatastoreError::Invalid);
        }
        self.owner(file.export).link(file, at).await
    }
}
