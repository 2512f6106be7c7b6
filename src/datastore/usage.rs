//! What a presented file really holds, for the `used` attribute: the
//! backup's chunks that hold data (all-zero chunks are holes in the
//! repository and hold nothing), up to what the file still shows of its
//! backup, plus the write cache's blocks. A flat disk that is half zeros
//! reports half its size, as on a thin-provisioned datastore.

use super::{Datastore, FileState};
use crate::repo::{FileReader, RepoError};

/// Which chunks of a backed-up file hold data: one bit per chunk.
#[derive(Debug)]
pub(crate) struct BackupUsage {
    chunk_size: u64,
    size: u64,
    /// Bit `i` set: chunk `i` holds data (is not a hole).
    data: Vec<u64>,
    /// Bytes of all the chunks that hold data.
    total: u64,
}

impl BackupUsage {
    /// Bytes of the chunks holding data within `[0, limit)` of the file.
    pub fn data_bytes_below(&self, limit: u64) -> u64 {
        if limit >= self.size {
            return self.total;
        }
        let chunks = limit.div_ceil(self.chunk_size);
        let mut bytes = 0;
        for index in 0..chunks {
            if self.data[(index / 64) as usize] & (1 << (index % 64)) != 0 {
                let start = index * self.chunk_size;
                bytes += (start + self.chunk_size).min(limit) - start;
            }
        }
        bytes
    }
}

impl Datastore {
    /// Reads (once per file) which chunks of `base` hold data.
    async fn load_usage(&self, base: &FileReader) -> Result<BackupUsage, RepoError> {
        let count = base.chunk_count();
        let chunk_size = base.chunk_size();
        let size = base.size();
        let mut data = vec![0u64; count.div_ceil(64) as usize];
        let mut total = 0;
        for (index, hole) in base.holes(0..count).await?.into_iter().enumerate() {
            let index = index as u64;
            if !hole {
                data[(index / 64) as usize] |= 1 << (index % 64);
                total += chunk_size.min(size - index * chunk_size);
            }
        }
        Ok(BackupUsage {
            chunk_size,
            size,
            data,
            total,
        })
    }

    /// Makes sure `st.usage` is known for a presented file. On a
    /// repository error, `used` falls back to the visible backup length
    /// and the next GETATTR tries again.
    pub(super) async fn ensure_usage(&self, st: &FileState) {
        let Some(base) = &st.base else { return };
        if st.usage.initialized() {
            return;
        }
        let loaded = st.usage.get_or_try_init(|| self.load_usage(base)).await;
        if let Err(e) = loaded {
            tracing::debug!(cause = %e, "chunk usage of a presented file unknown for now");
        }
    }
}
