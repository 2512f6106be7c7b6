//! [`FileDevice`]: the [`BlockDevice`] of a block export, one presented file
//! of a publication served through the datastore's one operation surface,
//! [`FileOps`]: reads through `read` (write cache first, else the backup),
//! writes through `write` (FUA = FILE_SYNC stability), flush = `commit` (the
//! journal sync of an NFS COMMIT), write zeroes and trim = `punch`, extents
//! = `extents`. There is no second read path, and the repository is never
//! written.
//!
//! A flush commits the file's one write cache, which every connection to
//! the export (and NFS clients of the same file) writes into: it covers
//! every write that returned before it, whichever connection sent it, as
//! [`BlockDevice::flush`] promises (NBD may advertise multi-conn).

use std::sync::Arc;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use super::device::{check_range, BlockDevice, BlockError, BlockResult, Extent, ExtentKind};
use crate::datastore::{DatastoreError, FileAt, FileOps, Stability};

/// A presented file as a disk.
pub struct FileDevice {
    datastore: Arc<dyn FileOps>,
    at: FileAt,
    name: String,
    size: u64,
    stable_id: [u8; 16],
    read_only: bool,
}

impl FileDevice {
    /// The file `at` as a disk named `name`, of the file's current size
    /// (fixed for the life of the device).
    ///
    /// # Errors
    /// The datastore's, when the file cannot be looked up.
    pub async fn open(
        datastore: Arc<dyn FileOps>,
        at: FileAt,
        name: &str,
        read_only: bool,
    ) -> Result<FileDevice, DatastoreError> {
        let attr = datastore.getattr(at).await?;
        let instance = datastore
            .export(at.export)
            .map(|e| e.instance)
            .ok_or(DatastoreError::Stale)?;
        // Export instance and file id are persisted: the same disk keeps its
        // identity across restarts (iSCSI VPD 0x83 and serial numbers).
        let mut stable_id = [0u8; 16];
        let hash = blake3::hash(format!("revive-block:{instance:016x}:{}", at.id).as_bytes());
        stable_id.copy_from_slice(&hash.as_bytes()[..16]);
        Ok(FileDevice {
            datastore,
            at,
            name: name.to_string(),
            size: attr.size,
            stable_id,
            read_only,
        })
    }

    /// The file served.
    pub fn file(&self) -> FileAt {
        self.at
    }

    fn check_write(&self, offset: u64, len: u64) -> BlockResult<()> {
        if self.read_only {
            return Err(BlockError::ReadOnly);
        }
        check_range(offset, len, self.size)
    }
}

/// The datastore's error as a block error, in one place.
fn block_err(e: DatastoreError) -> BlockError {
    match e {
        DatastoreError::NoSpace | DatastoreError::TooBig => BlockError::NoSpace,
        DatastoreError::ReadOnly | DatastoreError::Access => BlockError::ReadOnly,
        DatastoreError::Jukebox => BlockError::Retry,
        other => BlockError::Io(other.to_string()),
    }
}

#[async_trait]
impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn stable_id(&self) -> [u8; 16] {
        self.stable_id
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        check_range(offset, len.into(), self.size)?;
        let reply = self
            .datastore
            .read(self.at, offset, len)
            .await
            .map_err(block_err)?;
        if reply.data.len() == len as usize {
            return Ok(reply.data);
        }
        // The file was truncated (over NFS) below the device's size: what
        // is gone reads as zeros, as a sparse extend would show it.
        let mut data = BytesMut::with_capacity(len as usize);
        data.extend_from_slice(&reply.data);
        data.resize(len as usize, 0);
        Ok(data.freeze())
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BlockResult<()> {
        self.check_write(offset, data.len() as u64)?;
        let stability = if fua {
            Stability::FileSync
        } else {
            Stability::Unstable
        };
        self.datastore
            .write(self.at, offset, data, stability)
            .await
            .map_err(block_err)?;
        Ok(())
    }

    async fn write_many(
        &self,
        mut writes: Vec<(u64, Bytes)>,
        fua: bool,
    ) -> Result<(), (usize, BlockError)> {
        // A write outside the device stops the batch there, as it would
        // stop a loop of single writes.
        let refused = writes.iter().enumerate().find_map(|(i, (offset, data))| {
            self.check_write(*offset, data.len() as u64)
                .err()
                .map(|e| (i, e))
        });
        if let Some((n, _)) = &refused {
            writes.truncate(*n);
        }
        if !writes.is_empty() {
            let stability = if fua {
                Stability::FileSync
            } else {
                Stability::Unstable
            };
            self.datastore
                .write_many(self.at, writes, stability)
                .await
                .map_err(|(n, e)| (n, block_err(e)))?;
        }
        match refused {
            Some(r) => Err(r),
            None => Ok(()),
        }
    }

    async fn flush(&self) -> BlockResult<()> {
        if self.read_only {
            return Ok(());
        }
        self.datastore.commit(self.at).await.map_err(block_err)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> BlockResult<()> {
        self.check_write(offset, len)?;
        // A punch is durable on return: FUA holds either way.
        self.datastore
            .punch(self.at, offset, len)
            .await
            .map_err(block_err)
    }

    async fn extents(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>> {
        check_range(offset, len, self.size)?;
        let extents = match self.datastore.extents(self.at, offset, len).await {
            Ok(extents) => extents,
            // Surfaces that cannot tell: all data, which is never wrong.
            Err(DatastoreError::NotSupported) => {
                return Ok(vec![Extent {
                    offset,
                    len,
                    kind: ExtentKind::Data,
                }])
            }
            Err(e) => return Err(block_err(e)),
        };
        Ok(extents
            .into_iter()
            .map(|e| Extent {
                offset: e.offset,
                len: e.len,
                kind: if e.zero {
                    ExtentKind::Zero
                } else {
                    ExtentKind::Data
                },
            })
            .collect())
    }
}
