//! Durability of the namespace on request: what a FUSE `fsyncdir` (and any
//! frontend's "make this folder's changes durable") calls.

use super::{Datastore, DsResult, ExportId};

impl Datastore {
    /// Makes every namespace change of `export` made so far durable.
    ///
    /// Today every change (create, rename, remove, mkdir, setattr) is saved
    /// before it returns, so there is nothing left to do; the call still
    /// checks the export, and is the one place to flush should changes ever
    /// be acknowledged before they are durable.
    pub async fn sync_namespace(&self, export: ExportId) -> DsResult<()> {
        self.state(export)?;
        Ok(())
    }
}
