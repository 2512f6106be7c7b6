//! Reused byte buffers handed out as [`Bytes`]: a buffer goes back to its
//! pool when the last `Bytes` over it is dropped.
//!
//! Why: a large buffer freshly allocated for every request is expensive
//! beyond the allocation. glibc serves a 1 MiB allocation from a thread's
//! arena and gives the pages back to the kernel (`madvise`) when it is
//! freed, so the next one page-faults every page in again, zero-filled,
//! and a zeroed allocation (`vec![0; n]`) then clears it once more. Copies
//! into a reused buffer also land in memory that is still in the CPU's
//! cache. Users: the NBD server receives long WRITE data into pool buffers,
//! and the write cache reads cached bytes into them.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

/// Free buffers of one user (a connection, a write cache), most recently
/// returned last.
#[derive(Debug)]
pub struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
    /// New buffers are a multiple of this long, so that buffers fit more
    /// requests than the one they were made for.
    granule: usize,
    /// Bytes of free buffers kept at most; more are freed.
    keep: usize,
}

impl BufferPool {
    /// An empty pool making buffers in multiples of `granule` bytes and
    /// keeping at most `keep` bytes of free ones.
    pub fn new(granule: usize, keep: usize) -> Arc<Self> {
        Arc::new(BufferPool {
            free: Mutex::new(Vec::new()),
            granule: granule.max(1),
            keep,
        })
    }

    /// A buffer at least `len` long, with unspecified content: the most
    /// recently returned one that is long enough (the warmest), else a new
    /// one.
    pub fn take(&self, len: usize) -> Vec<u8> {
        let mut free = self.free();
        match free.iter().rposition(|b| b.len() >= len) {
            Some(i) => free.remove(i),
            None => {
                drop(free);
                vec![0; len.next_multiple_of(self.granule)]
            }
        }
    }

    /// Takes `buf` back, unless the pool holds enough already.
    pub fn give(&self, buf: Vec<u8>) {
        let mut free = self.free();
        let held: usize = free.iter().map(Vec::len).sum();
        if held + buf.len() <= self.keep {
            free.push(buf);
        }
    }

    /// `buf[..len]` as `Bytes`; `buf` comes back to this pool when the last
    /// `Bytes` over it is dropped.
    ///
    /// # Panics
    /// If `len` exceeds `buf.len()`.
    pub fn freeze(self: &Arc<Self>, buf: Vec<u8>, len: usize) -> Bytes {
        assert!(len <= buf.len(), "pool buffer shorter than its data");
        Bytes::from_owner(Pooled {
            buf,
            len,
            pool: Arc::clone(self),
        })
    }

    /// Free buffers held now.
    pub fn free_buffers(&self) -> usize {
        self.free().len()
    }

    /// The free list; its holder cannot leave it inconsistent, so a panic
    /// elsewhere while holding it does not matter.
    fn free(&self) -> MutexGuard<'_, Vec<Vec<u8>>> {
        self.free.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The data in a pool buffer, owned by `Bytes`.
struct Pooled {
    buf: Vec<u8>,
    len: usize,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::BufferPool;

    /// A buffer comes back when the last `Bytes` (clones, slices) over it
    /// is dropped, is handed out again for a request it fits, warmest
    /// first, and the pool keeps no more than its limit.
    #[test]
    fn buffers_return_when_their_bytes_are_dropped_and_are_reused() {
        let pool = BufferPool::new(1024, 3 * 1024);
        let mut buf = pool.take(1000);
        assert_eq!(buf.len(), 1024, "rounded up to the granule");
        buf[..3].copy_from_slice(b"abc");
        let ptr = buf.as_ptr();
        let bytes = pool.freeze(buf, 3);
        assert_eq!(&bytes[..], b"abc");
        let slice = bytes.slice(1..);
        drop(bytes);
        assert_eq!(pool.free_buffers(), 0, "a slice still holds it");
        drop(slice);
        assert_eq!(pool.free_buffers(), 1);
        let again = pool.take(500);
        assert_eq!(again.as_ptr(), ptr, "reused");
        assert_eq!(pool.take(2000).len(), 2048, "too long for any free one");

        let (a, b) = (pool.take(2048), pool.take(2048));
        let a_ptr = a.as_ptr();
        pool.give(a);
        pool.give(b);
        assert_eq!(
            pool.free_buffers(),
            1,
            "over the limit: the second is freed"
        );
        let kept = pool.take(10);
        assert_eq!(kept.as_ptr(), a_ptr);
    }
}
