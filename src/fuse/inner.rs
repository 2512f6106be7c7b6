//! What every FUSE request task shares: the datastore's operation surface,
//! the export, how inodes and attributes are presented, and how a failure
//! becomes an errno.

use std::sync::Arc;
use std::time::Duration;

use fuser::{Errno, Generation, INodeNo};
use tokio::runtime::Handle;
use tracing::{debug, warn};

use super::attr::{self, Presentation};
use crate::datastore::{DatastoreError, ExportId, FileAt, FileId, FileOps, NameAt};

/// Shared by every request task.
pub(super) struct Inner {
    /// The datastore, reached only through its operation surface.
    pub ds: Arc<dyn FileOps>,
    pub export: ExportId,
    pub view: Presentation,
    pub ttl: Duration,
    /// Generation of every inode: the export instance, so an inode number
    /// never names two files across a recreated export.
    pub generation: Generation,
    pub(super) runtime: Handle,
}

impl Inner {
    pub fn id(&self, ino: INodeNo) -> FileId {
        self.view.inodes.id(ino)
    }

    /// The datastore file behind an inode.
    pub fn at(&self, ino: INodeNo) -> FileAt {
        FileAt::new(self.export, self.id(ino))
    }

    /// The name `name` in folder `dir` of the export.
    pub fn name_at(&self, dir: FileId, name: &str) -> NameAt {
        FileAt::new(self.export, dir).child(name)
    }

    /// Logs a failure at the level it deserves and returns its errno.
    pub fn fail(&self, op: &'static str, ino: INodeNo, e: &DatastoreError) -> Errno {
        match e {
            DatastoreError::Io(_) | DatastoreError::NoSpace | DatastoreError::Jukebox => {
                warn!(op, ino = ino.0, cause = %e, "FUSE request failed")
            }
            _ => debug!(op, ino = ino.0, cause = %e, "FUSE request refused"),
        }
        attr::errno(e)
    }
}
