//! [`BlockDevice`]: what a block protocol needs of a disk, and nothing of
//! files, exports or the repository. Offsets and lengths are in bytes; a
//! protocol converts its own units (NBD bytes, SCSI logical blocks).

use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Mutex;

/// What a block request can fail with; each protocol maps it to its own
/// error codes (NBD errno values, SCSI sense data) in one place.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The request reaches beyond the end of the device.
    #[error("range at {offset} of {len} bytes is beyond the end of the device ({size} bytes)")]
    OutOfRange {
        /// First byte asked for.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// Size of the device.
        size: u64,
    },
    /// The write cache has no room for the write.
    #[error("no space left in the write cache")]
    NoSpace,
    /// The device refuses writes.
    #[error("the device is read-only")]
    ReadOnly,
    /// Transient: the backup store is unreachable; the initiator should retry.
    #[error("backup store unavailable; retry later")]
    Retry,
    /// Storage failed (a corrupt chunk, a failed cache file): the data is
    /// not served, never wrong bytes. The cause was logged where it happened.
    #[error("i/o error - {0}")]
    Io(String),
}

/// Shorthand for block results.
pub type BlockResult<T> = Result<T, BlockError>;

/// What a range of the device holds, as NBD_CMD_BLOCK_STATUS (base:allocation)
/// and SCSI GET LBA STATUS report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Bytes are stored (in the write cache or in a non-zero backup chunk).
    Data,
    /// Reads as zeros and holds nothing (an all-zero backup chunk, a punched
    /// or never-written range): copy tools may skip it.
    Zero,
}

/// One run of the device of a single [`ExtentKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First byte.
    pub offset: u64,
    /// Length in bytes (never 0).
    pub len: u64,
    /// What the range holds.
    pub kind: ExtentKind,
}

/// A disk as block protocols see it. Every method may run concurrently from
/// many connections; requests on one device are not ordered with each other
/// except that a `flush` covers every write that returned before it started,
/// whichever connection sent it (so NBD may advertise multi-conn).
#[async_trait]
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes, fixed for the life of the export.
    fn size(&self) -> u64;

    /// A name for logs and metrics (the export name).
    fn name(&self) -> &str;

    /// An identifier that stays the same across restarts of revive for the
    /// same exported disk (SCSI VPD page 0x83, unit serial number).
    fn stable_id(&self) -> [u8; 16];

    /// Whether writes are refused.
    fn read_only(&self) -> bool {
        false
    }

    /// Reads `len` bytes at `offset`; the range must lie inside the device.
    async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes>;

    /// Writes `data` at `offset`; with `fua` the data is durable on return.
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BlockResult<()>;

    /// Writes each `(offset, data)` of `writes` as `write` one after the
    /// other would; a device may apply them together (a connection's queue
    /// of writes then costs one hand-off to storage, not one each).
    ///
    /// # Errors
    /// `(n, error)`: the first `n` writes were done, the others were not.
    async fn write_many(
        &self,
        writes: Vec<(u64, Bytes)>,
        fua: bool,
    ) -> Result<(), (usize, BlockError)> {
        for (i, (offset, data)) in writes.into_iter().enumerate() {
            self.write(offset, data, fua).await.map_err(|e| (i, e))?;
        }
        Ok(())
    }

    /// Makes every write that returned before this call durable.
    async fn flush(&self) -> BlockResult<()>;

    /// Makes `[offset, offset + len)` read as zeros, freeing space where it
    /// can; with `fua` durable on return.
    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> BlockResult<()>;

    /// Discards `[offset, offset + len)`: afterwards it reads as zeros here
    /// (revive never lets discarded ranges show older data).
    async fn trim(&self, offset: u64, len: u64) -> BlockResult<()> {
        self.write_zeroes(offset, len, false).await
    }

    /// What `[offset, offset + len)` holds, as consecutive extents covering
    /// at least the first byte and at most the range.
    async fn extents(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>>;
}

/// Checks that `[offset, offset + len)` lies inside a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> BlockResult<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BlockError::OutOfRange { offset, len, size }),
    }
}

/// A disk in memory, for protocol tests: zero ranges are reported as
/// [`ExtentKind::Zero`] at 4 KiB granularity, so block status can be tested.
#[derive(Debug)]
pub struct MemDevice {
    name: String,
    data: Mutex<Vec<u8>>,
    flushes: std::sync::atomic::AtomicU64,
}

/// Granularity of [`MemDevice`]'s extents.
const MEM_EXTENT: u64 = 4096;

impl MemDevice {
    /// A device holding `data`.
    pub fn new(name: &str, data: Vec<u8>) -> MemDevice {
        MemDevice {
            name: name.to_string(),
            data: Mutex::new(data),
            flushes: Default::default(),
        }
    }

    /// Number of flushes so far.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A copy of the current contents.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.lock().len() as u64
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn stable_id(&self) -> [u8; 16] {
        let mut id = [0u8; 16];
        id.copy_from_slice(&blake3::hash(self.name.as_bytes()).as_bytes()[..16]);
        id
    }

    async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        let data = self.lock();
        check_range(offset, len.into(), data.len() as u64)?;
        let start = offset as usize;
        Ok(Bytes::copy_from_slice(&data[start..start + len as usize]))
    }

    async fn write(&self, offset: u64, bytes: Bytes, _fua: bool) -> BlockResult<()> {
        let mut data = self.lock();
        check_range(offset, bytes.len() as u64, data.len() as u64)?;
        let start = offset as usize;
        data[start..start + bytes.len()].copy_from_slice(&bytes);
        Ok(())
    }

    async fn flush(&self) -> BlockResult<()> {
        self.flushes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _fua: bool) -> BlockResult<()> {
        let mut data = self.lock();
        check_range(offset, len, data.len() as u64)?;
        data[offset as usize..(offset + len) as usize].fill(0);
        Ok(())
    }

    async fn extents(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>> {
        let data = self.lock();
        check_range(offset, len, data.len() as u64)?;
        let end = offset + len;
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end {
            let next = ((pos / MEM_EXTENT + 1) * MEM_EXTENT).min(end);
            let zero = data[pos as usize..next as usize].iter().all(|b| *b == 0);
            let kind = if zero {
                ExtentKind::Zero
            } else {
                ExtentKind::Data
            };
            match out.last_mut() {
                Some(last) if last.kind == kind => last.len += next - pos,
                _ => out.push(Extent {
                    offset: pos,
                    len: next - pos,
                    kind,
                }),
            }
            pos = next;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mem_device_reports_zero_and_data_extents() {
        let mut data = vec![0u8; 4 * 4096];
        data[4096 + 7] = 1;
        let dev = MemDevice::new("t", data);
        let ext = dev.extents(0, 4 * 4096).await.unwrap();
        assert_eq!(
            ext.iter().map(|e| (e.len, e.kind)).collect::<Vec<_>>(),
            vec![
                (4096, ExtentKind::Zero),
                (4096, ExtentKind::Data),
                (8192, ExtentKind::Zero)
            ]
        );
        assert!(matches!(
            dev.read(4 * 4096 - 1, 2).await,
            Err(BlockError::OutOfRange { .. })
        ));
    }
}
