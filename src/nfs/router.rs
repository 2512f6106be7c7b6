//! One NFS server over both kinds of export: the repository datastore's
//! (published restore points, write caches) and passthrough exports (live
//! folders such as a storage snapshot's writable clone). Each call goes to
//! the one that owns its export id ([`passthrough::owns`]); nothing else is
//! decided here.

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use super::backend::*;
use crate::datastore::passthrough::{self, Passthrough};
use crate::datastore::Datastore;

/// The backend `revive serve` hands its NFS server.
pub struct Router {
    datastore: Arc<Datastore>,
    passthrough: Arc<Passthrough>,
}

impl Router {
    /// Serves `datastore`'s exports and `passthrough`'s.
    pub fn new(datastore: Arc<Datastore>, passthrough: Arc<Passthrough>) -> Router {
        Router {
            datastore,
            passthrough,
        }
    }
}

/// Calls `$method` on whichever backend owns `$export`.
macro_rules! route {
    ($self:ident, $export:expr, $method:ident ( $($arg:expr),* )) => {
        if passthrough::owns($export) {
            $self.passthrough.$method($export, $($arg),*).await
        } else {
            $self.datastore.$method($export, $($arg),*).await
        }
    };
}

#[async_trait]
impl NfsBackend for Router {
    fn exports(&self) -> Vec<Arc<Export>> {
        let mut all = self.datastore.exports();
        all.extend(self.passthrough.exports());
        all
    }

    fn export(&self, id: ExportId) -> Option<Arc<Export>> {
        if passthrough::owns(id) {
            self.passthrough.export(id)
        } else {
            self.datastore.export(id)
        }
    }

    async fn getattr(&self, export: ExportId, id: FileId) -> BackendResult<Attr> {
        route!(self, export, getattr(id))
    }

    async fn setattr(
        &self,
        export: ExportId,
        id: FileId,
        set: &SetAttr,
        guard: Option<SystemTime>,
    ) -> BackendResult<Attr> {
        route!(self, export, setattr(id, set, guard))
    }

    async fn lookup(&self, export: ExportId, dir: FileId, name: &str) -> BackendResult<Attr> {
        route!(self, export, lookup(dir, name))
    }

    async fn read(
        &self,
        export: ExportId,
        id: FileId,
        offset: u64,
        count: u32,
    ) -> BackendResult<ReadReply> {
        route!(self, export, read(id, offset, count))
    }

    async fn write(
        &self,
        export: ExportId,
        id: FileId,
        offset: u64,
        data: Bytes,
        stability: Stability,
    ) -> BackendResult<WriteReply> {
        route!(self, export, write(id, offset, data, stability))
    }

    async fn commit(
        &self,
        export: ExportId,
        id: FileId,
        _offset: u64,
        _count: u32,
    ) -> BackendResult<()> {
        // Both commit whole files: one fsync covers any range.
        route!(self, export, commit(id))
    }

    async fn create(
        &self,
        export: ExportId,
        dir: FileId,
        name: &str,
        mode: CreateMode,
        attrs: &SetAttr,
    ) -> BackendResult<Attr> {
        route!(self, export, create(dir, name, mode, attrs))
    }

    async fn mkdir(
        &self,
        export: ExportId,
        dir: FileId,
        name: &str,
        attrs: &SetAttr,
    ) -> BackendResult<Attr> {
        route!(self, export, mkdir(dir, name, attrs))
    }

    async fn remove(&self, export: ExportId, dir: FileId, name: &str) -> BackendResult<()> {
        route!(self, export, remove(dir, name))
    }

    async fn rmdir(&self, export: ExportId, dir: FileId, name: &str) -> BackendResult<()> {
        route!(self, export, rmdir(dir, name))
    }

    async fn rename(
        &self,
        export: ExportId,
        from_dir: FileId,
        from_name: &str,
        to_dir: FileId,
        to_name: &str,
    ) -> BackendResult<()> {
        route!(self, export, rename(from_dir, from_name, to_dir, to_name))
    }

    async fn readdir(
        &self,
        export: ExportId,
        dir: FileId,
        cookie: u64,
        max_entries: usize,
    ) -> BackendResult<DirPage> {
        route!(self, export, readdir(dir, cookie, max_entries))
    }

    async fn fsstat(&self, export: ExportId) -> BackendResult<FsStat> {
        route!(self, export, fsstat())
    }

    async fn readlink(&self, export: ExportId, id: FileId) -> BackendResult<String> {
        if passthrough::owns(export) {
            self.passthrough.readlink(export, id).await
        } else {
            Err(BackendError::NotSupported)
        }
    }

    async fn symlink(
        &self,
        export: ExportId,
        dir: FileId,
        name: &str,
        target: &str,
        attrs: &SetAttr,
    ) -> BackendResult<Attr> {
        if passthrough::owns(export) {
            self.passthrough
                .symlink(export, dir, name, target, attrs)
                .await
        } else {
            Err(BackendError::NotSupported)
        }
    }
}
