//! Resizing and punching a `WriteCache`: the requests that remove data, and
//! so must order "forget the blocks" before "drop the bytes" on disk.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use bytes::Bytes;

#[cfg(test)]
use super::commit::Event;
use super::commit::{trace_io, Shared};
use super::error::{io_err, join_err, Result};
use super::segment::BaseRead;
use super::write_cache::{blocking, check_range, Stability, WriteCache};

/// Frees `[offset, offset + len)` of `file`, keeping its size; falls back to
/// writing zeros where the file system cannot punch holes.
fn punch_hole(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a descriptor we own, with plain integer arguments.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
        return Err(err);
    }
    let zeros = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64);
        file.write_all_at(&zeros[..n as usize], offset + done)?;
        done += n;
    }
    Ok(())
}

impl WriteCache {
    /// Truncates or extends the file, durably.
    ///
    /// A truncate drops the blocks beyond the new end and frees their space;
    /// the base beyond it is hidden for good, so a later extend reads zeros.
    /// An extend is sparse.
    ///
    /// A truncate persists in order: the new size first, then the cleared
    /// bits, then the data goes. A crash in between leaves the new size with
    /// stale bits beyond it, which `open` clears; never the old size with
    /// blocks already gone. The work runs in its own task, so a cancelled
    /// caller cannot leave it half done.
    ///
    /// # Errors
    /// `TooLarge`, `Poisoned`, or I/O errors.
    pub async fn set_len(&self, new_len: u64) -> Result<()> {
        check_range(0, new_len)?;
        let bs = self.shared.block_size;
        let from = new_len.min(self.len()) / bs;
        let guard = self.shared.locks.lock(from..u64::MAX).await;
        let shared = Arc::clone(&self.shared);
        let task = tokio::spawn(async move {
            let (seq, shrink) = {
                let mut inner = shared.lock();
                Shared::check_poisoned(&inner, &shared.paths)?;
                let shrink = new_len < inner.header.logical_size;
                inner.header.logical_size = new_len;
                inner.header.base_len = inner.header.base_len.min(new_len);
                inner.header_dirty = true;
                inner.mark_unjournaled();
                (inner.bump(), shrink)
            };
            shared.commit_upto(seq).await?;
            if !shrink {
                return Ok(());
            }
            let (seq, zero_tail) = {
                let mut inner = shared.lock();
                inner.clear_blocks(new_len.div_ceil(bs), u64::MAX);
                inner.mark_unjournaled();
                let zero_tail = !new_len.is_multiple_of(bs) && inner.bitmap.get(new_len / bs);
                (inner.bump(), zero_tail)
            };
            // The cleared bits are durable before any data goes away.
            shared.commit_upto(seq).await?;
            let s = Arc::clone(&shared);
            blocking(&shared.paths.data, move || {
                let data_err = || io_err("truncate", &s.paths.data);
                let files = s.files()?;
                if zero_tail {
                    let zeros = vec![0u8; (bs - new_len % bs) as usize];
                    files
                        .data
                        .write_all_at(&zeros, new_len)
                        .map_err(data_err())?;
                    // Synced by the next flush; `open` redoes it after a crash.
                    let mut inner = s.lock();
                    inner.data_dirty = true;
                    inner.mark_unjournaled();
                }
                // Only ever shorten the data file: lengthening it to a size
                // its file system cannot hold (ext4: 16 TiB) would fail a
                // shrink whose new size is already durable.
                let target = new_len.div_ceil(bs) * bs;
                let len = files.data.metadata().map_err(data_err())?.len();
                if len > target {
                    files.data.set_len(target).map_err(data_err())?;
                }
                trace_io!(s, Event::DataTruncated(new_len.div_ceil(bs)));
                Ok(())
            })
            .await?;
            drop(guard);
            Ok(())
        });
        task.await
            .map_err(|e| join_err(&self.shared.paths.data, e))?
    }

    /// Zeroes `[offset, offset + len)` (clipped to the logical size) and frees
    /// the space of the whole blocks inside it, durably. Partial blocks at the
    /// edges are zeroed through `write` (copy-on-write from `base`).
    ///
    /// # Errors
    /// As `write`.
    pub async fn punch<B: BaseRead + ?Sized>(&self, offset: u64, len: u64, base: &B) -> Result<()> {
        let end = check_range(offset, len)?.min(self.len());
        if offset >= end {
            return Ok(());
        }
        let bs = self.shared.block_size;
        let (first, last) = (offset.div_ceil(bs), end / bs);
        if first >= last {
            let zeros = Bytes::from(vec![0u8; (end - offset) as usize]);
            return self.write(offset, zeros, Stability::FileSync, base).await;
        }
        for (s, e) in [(offset, first * bs), (last * bs, end)] {
            if s < e {
                let zeros = Bytes::from(vec![0u8; (e - s) as usize]);
                self.write(s, zeros, Stability::Unstable, base).await?;
            }
        }
        let guard = self.shared.locks.lock(first..last).await;
        let shared = Arc::clone(&self.shared);
        blocking(&self.shared.paths.data, move || {
            Shared::check_poisoned(&shared.lock(), &shared.paths)?;
            let files = shared.files()?;
            punch_hole(&files.data, first * bs, (last - first) * bs)
                .map_err(io_err("punch", &shared.paths.data))?;
            trace_io!(shared, Event::DataWritten(first, last));
            let mut inner = shared.lock();
            inner.data_dirty = true;
            inner.set_blocks(first, last);
            // A hole is not a record: the punch is made durable by a checkpoint.
            inner.mark_unjournaled();
            inner.bump();
            drop(inner);
            drop(guard);
            Ok(())
        })
        .await?;
        self.commit().await
    }
}
