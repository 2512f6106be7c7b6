//! The thin adapter: [`NfsBackend`] served by the [`Datastore`].
//!
//! Nothing is decided here; each call forwards to the datastore method of the
//! same name. The protocol layer has already checked the caller against the
//! export's allow-list and the names against escaping the export.

use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use super::backend::*;
use crate::datastore::Datastore;

#[async_trait]
impl NfsBackend for Datastore {
    fn exports(&self) -> Vec<Arc<Export>> {
        Datastore::exports(self)
    }

    fn export(&self, id: ExportId) -> Option<Arc<Export>> {
        Datastore::export(self, id)
    }

    async fn getattr(&self, export: ExportId, id: FileId) -> BackendResult<Attr> {
        Datastore::getattr(self, export, id).await
    }

    async fn setattr(
        &self,
        export: ExportId,
        id: FileId,
        set: &SetAttr,
        guard: Option<SystemTime>,
    ) -> BackendResult<Attr> {
        Datastore::setattr(self, export, id, set, guard).await
    }

    async fn lookup(&self, export: ExportId, dir: FileId, name: &str) -> BackendResult<Attr> {
        Datastore::lookup(self, export, dir, name).await
    }

    async fn read(
        &self,
        export: ExportId,
        id: FileId,
        offset: u64,
        count: u32,
    ) -> BackendResult<ReadReply> {
        Datastore::read(self, export, id, offset, count).await
    }

    async fn write(
        &self,
        export: ExportId,
        id: FileId,
        offset: u64,
        data: Bytes,
        stability: Stability,
    ) -> BackendResult<WriteReply> {
        Datastore::write(self, export, id, offset, data, stability).await
    }

    async fn commit(
        &self,
        export: ExportId,
        id: FileId,
        _offset: u64,
        _count: u32,
    ) -> BackendResult<()> {
        // The write cache commits the whole file at once: one group fsync
        // covers any range the client names.
        Datastore::commit(self, export, id).await
    }

    async fn create(
        &self,
        export: ExportId,
        dir: FileId,
        name: &str,
        mode: CreateMode,
        attrs: &SetAttr,
    ) -> BackendResult<Attr> {
        Datastore::create(self, export, dir, name, mode, attrs).await
    }

    async fn mkdir(
        &self,
        export: ExportId,
        dir: FileId,
        name: &str,
        attrs: &SetAttr,
    ) -> BackendResult<Attr> {
        Datastore::mkdir(self, export, dir, name, attrs).await
    }

    async fn remove(&self, export: ExportId, dir: FileId, name: &str) -> BackendResult<()> {
        Datastore::remove(self, export, dir, name).await
    }

    async fn rmdir(&self, export: ExportId, dir: FileId, name: &str) -> BackendResult<()> {
        Datastore::rmdir(self, export, dir, name).await
    }

    async fn rename(
        &self,
        export: ExportId,
        from_dir: FileId,
        from_name: &str,
        to_dir: FileId,
        to_name: &str,
    ) -> BackendResult<()> {
        Datastore::rename(self, export, from_dir, from_name, to_dir, to_name).await
    }

    async fn readdir(
        &self,
        export: ExportId,
        dir: FileId,
        cookie: u64,
        max_entries: usize,
    ) -> BackendResult<DirPage> {
        Datastore::readdir(self, export, dir, cookie, max_entries).await
    }

    async fn fsstat(&self, export: ExportId) -> BackendResult<FsStat> {
        Datastore::fsstat(self, export).await
    }
}
