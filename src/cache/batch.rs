//! How a client write reaches the data file, in two halves: it is
//! *prepared* on the async side (its blocks locked, the base of partial
//! blocks fetched for copy-on-write), then *applied* in blocking code (data
//! file written, bits set, journal record queued). [`WriteCache::write`]
//! does this for one write; [`WriteCache::write_many`] prepares several and
//! applies them all in one blocking hand-off, so a block frontend holding a
//! queue of writes (NBD) pays one thread switch for the lot instead of one
//! (and its wake-ups) per write. Durability is unchanged: each write is
//! applied exactly as alone, and a stable batch returns once one group
//! commit covers its last write.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;

#[cfg(test)]
use super::commit::Event;
use super::commit::{trace_io, Shared};
use super::error::{io_err, CacheError, Result};
use super::files::Files;
use super::journal::Record;
use super::range_lock::RangeGuard;
use super::segment::BaseRead;
use super::write_cache::{blocking, check_range, Stability, WriteCache};

/// A write whose blocks are locked and whose partial blocks are merged with
/// their base: only the blocking half is left.
pub(super) struct Prepared {
    first: u64,
    last: u64,
    end: u64,
    /// Contiguous pieces in offset order: (file offset, bytes).
    pieces: Vec<(u64, Bytes)>,
    guard: RangeGuard,
}

impl WriteCache {
    /// Locks the blocks of a non-empty write at `offset` and builds its
    /// pieces, copying partial blocks not cached yet from `base`.
    pub(super) async fn prepare<B: BaseRead + ?Sized>(
        &self,
        offset: u64,
        data: Bytes,
        base: &B,
    ) -> Result<Prepared> {
        let end = check_range(offset, data.len() as u64)?;
        let bs = self.shared.block_size;
        let (first, last) = (offset / bs, (end - 1) / bs);
        let guard = self.shared.locks.lock(first..last + 1).await;
        let (head_cow, tail_cow, base_len) = {
            let inner = self.shared.lock();
            Shared::check_poisoned(&inner, &self.shared.paths)?;
            let partial = |b: u64| offset > b * bs || end < (b + 1) * bs;
            (
                partial(first) && !inner.bitmap.get(first),
                last != first && partial(last) && !inner.bitmap.get(last),
                inner.header.base_len,
            )
        };
        // Fetch the base of both partial blocks at once: each may be a
        // chunk read from the repository.
        let cow = |wanted: bool, block: u64| {
            let data = &data;
            async move {
                match wanted {
                    true => Ok(Some(
                        self.cow_block(block, base_len, offset, data, base).await?,
                    )),
                    false => Ok::<_, CacheError>(None),
                }
            }
        };
        let (head, tail) = tokio::try_join!(cow(head_cow, first), cow(tail_cow, last))?;
        let mut pieces: Vec<(u64, Bytes)> = Vec::with_capacity(3);
        let (mut lo, mut hi) = (offset, end);
        if let Some(block) = head {
            pieces.push((first * bs, block));
            lo = ((first + 1) * bs).min(end);
        }
        if let Some(block) = tail {
            pieces.push((last * bs, block));
            hi = last * bs;
        }
        if lo < hi {
            pieces.push((
                lo,
                data.slice((lo - offset) as usize..(hi - offset) as usize),
            ));
        }
        // Pieces are contiguous (head block, middle, tail block): in offset
        // order they form one journal record.
        pieces.sort_by_key(|p| p.0);
        Ok(Prepared {
            first,
            last,
            end,
            pieces,
            guard,
        })
    }

    /// Writes each `(offset, data)` of `writes` as [`WriteCache::write`]
    /// would, one after the other, with one blocking hand-off for all when
    /// they touch disjoint blocks. With a stable `stability` all are durable
    /// on return (one group commit).
    ///
    /// # Errors
    /// `(n, error)`: the first `n` writes were done (and, when stable, are
    /// durable), the others were not, `error` being why.
    pub async fn write_many<B: BaseRead + ?Sized>(
        &self,
        writes: Vec<(u64, Bytes)>,
        stability: Stability,
        base: &B,
    ) -> std::result::Result<(), (usize, CacheError)> {
        if writes.len() < 2 || !disjoint(&writes, self.shared.block_size) {
            return self.write_each(writes, stability, base).await;
        }
        // Lock in ascending block order, so two batches never wait on each
        // other. A failure here (a base read) drops every lock taken, and
        // the writes go one by one, each with its own error.
        let mut order: Vec<usize> = (0..writes.len()).collect();
        order.sort_by_key(|&i| writes[i].0);
        let mut prepared: Vec<Option<Prepared>> = (0..writes.len()).map(|_| None).collect();
        for &i in &order {
            let (offset, data) = &writes[i];
            match self.prepare(*offset, data.clone(), base).await {
                Ok(p) => prepared[i] = Some(p),
                Err(_) => {
                    drop(prepared);
                    return self.write_each(writes, stability, base).await;
                }
            }
        }
        let shared = Arc::clone(&self.shared);
        let applied = blocking(&self.shared.paths.data, move || {
            let files = shared.files()?;
            let (mut done, mut seq) = (0, 0);
            for p in prepared.into_iter().flatten() {
                match p.apply(&shared, &files) {
                    Ok(s) => (done, seq) = (done + 1, s),
                    Err(e) => return Ok((done, seq, Some(e))),
                }
            }
            Ok((done, seq, None))
        })
        .await;
        let (done, seq, failed) = applied.map_err(|e| (0, e))?;
        if done > 0 {
            self.finish(stability, Some(seq))
                .await
                .map_err(|e| (0, e))?;
        }
        #[cfg(test)]
        if stability != Stability::Unstable {
            for (offset, data) in &writes[..done] {
                self.trace_ack(*offset, offset + data.len() as u64);
            }
        }
        match failed {
            Some(e) => Err((done, e)),
            None => Ok(()),
        }
    }

    /// The writes one at a time, stopping at the first that fails.
    async fn write_each<B: BaseRead + ?Sized>(
        &self,
        writes: Vec<(u64, Bytes)>,
        stability: Stability,
        base: &B,
    ) -> std::result::Result<(), (usize, CacheError)> {
        for (i, (offset, data)) in writes.into_iter().enumerate() {
            self.write(offset, data, stability, base)
                .await
                .map_err(|e| (i, e))?;
        }
        Ok(())
    }
}

/// Whether the non-empty writes touch pairwise disjoint blocks (a write's
/// range lock would otherwise wait for another of the same batch).
fn disjoint(writes: &[(u64, Bytes)], bs: u64) -> bool {
    let mut ranges = Vec::with_capacity(writes.len());
    for (offset, data) in writes {
        let Some(end) = offset.checked_add(data.len() as u64) else {
            return false;
        };
        if data.is_empty() {
            return false;
        }
        ranges.push((offset / bs, (end - 1) / bs + 1));
    }
    ranges.sort_unstable();
    ranges.windows(2).all(|w| w[0].1 <= w[1].0)
}

impl Prepared {
    /// Writes the pieces to the data file, then publishes them (bits, size,
    /// journal record) and releases the blocks; returns the change's
    /// sequence number. Blocking.
    pub(super) fn apply(self, shared: &Shared, files: &Files) -> Result<u64> {
        let Prepared {
            first,
            last,
            end,
            pieces,
            guard,
        } = self;
        let bs = shared.block_size;
        // Space for the bitmap pages this write will publish, before any
        // byte lands: a full file system fails the write here.
        shared.reserve_map_pages(files, first, last)?;
        // Blocks not cached yet first: a full file system fails there,
        // while they are still invisible (no bit set). Cached blocks are
        // overwritten in place, needing no new space, only after that, so a
        // write refused for space changes nothing clients see.
        let runs = shared.cached_runs(first, last + 1);
        for cached in [false, true] {
            for &(start, end, _) in runs.iter().filter(|r| r.2 == cached) {
                for (off, bytes) in slices(&pieces, start * bs, end * bs) {
                    files
                        .data
                        .write_all_at(&bytes, off)
                        .map_err(io_err("write", &shared.paths.data))?;
                }
            }
        }
        trace_io!(shared, Event::DataWritten(first, last + 1));
        // Publish only after the data is in the file (see module doc).
        let mut inner = shared.lock();
        inner.data_dirty = true;
        inner.set_blocks(first, last + 1);
        if end > inner.header.logical_size {
            inner.header.logical_size = end;
            inner.header_dirty = true;
        }
        let logical_end = inner.header.logical_size;
        inner.push_record(Record {
            offset: pieces[0].0,
            pieces: pieces.into_iter().map(|p| p.1).collect(),
            logical_end,
        });
        let seq = inner.bump();
        drop(inner);
        drop(guard);
        Ok(seq)
    }
}

/// The parts of contiguous `pieces` (offset, bytes) within `[from, to)`.
fn slices(pieces: &[(u64, Bytes)], from: u64, to: u64) -> Vec<(u64, Bytes)> {
    pieces
        .iter()
        .filter_map(|(off, bytes)| {
            let lo = from.max(*off);
            let hi = to.min(off + bytes.len() as u64);
            (lo < hi).then(|| (lo, bytes.slice((lo - off) as usize..(hi - off) as usize)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use bytes::Bytes;

    use super::super::format::MAX_LOGICAL_SIZE;
    use super::super::{BaseRead, CachePaths, Origin, Stability, WriteCache};

    /// A backup of one repeated byte.
    struct Fill(u8);

    impl BaseRead for Fill {
        async fn read_base(&self, _offset: u64, len: usize) -> std::io::Result<Bytes> {
            Ok(Bytes::from(vec![self.0; len]))
        }
    }

    fn expected(writes: &[(u64, Bytes)], len: usize) -> Vec<u8> {
        let mut want = vec![0xAA; len];
        for (offset, data) in writes {
            let o = *offset as usize;
            let end = (o + data.len()).min(len);
            want[o..end].copy_from_slice(&data[..end - o]);
        }
        want
    }

    /// A stable batch (partial blocks, whole blocks, a growing write) is
    /// one flush, reads back as the writes one by one would, and survives
    /// the loss of the data file's unsynced bytes (its records are
    /// journaled); an overlapping batch and one with a failing write keep
    /// their order and report how many were done.
    #[tokio::test]
    async fn a_batch_reads_back_as_single_writes_and_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let paths = CachePaths::in_dir(dir.path(), "disk");
        let base = Fill(0xAA);
        let writes = vec![
            (20_000, Bytes::from(vec![3; 5000])),
            (100, Bytes::from(vec![1; 3000])),
            (8192, Bytes::from(vec![2; 8192])),
            (65_536, Bytes::from_static(b"grown")),
        ];
        {
            let cache = WriteCache::create(&paths, 65_536, 4096, Origin::Backup)
                .await
                .unwrap();
            let flushes = cache.flush_count();
            cache
                .write_many(writes.clone(), Stability::FileSync, &base)
                .await
                .unwrap();
            assert_eq!(cache.flush_count() - flushes, 1, "one flush for the batch");
        }
        // What a power loss may do to unsynced bytes of the data file.
        let data = std::fs::OpenOptions::new()
            .write(true)
            .open(&paths.data)
            .unwrap();
        data.write_all_at(&vec![0xEE; 70_000], 0).unwrap();
        drop(data);
        let cache = WriteCache::open(&paths).await.unwrap();
        assert_eq!(cache.len(), 65_541);
        let got = cache.read_overlay(0, 65_541, &base).await.unwrap();
        assert_eq!(&got[..], &expected(&writes, 65_541)[..]);

        // Overlapping blocks: applied in order, one after the other.
        let overlapping = vec![
            (0, Bytes::from(vec![5; 4096])),
            (2048, Bytes::from(vec![6; 4096])),
        ];
        cache
            .write_many(overlapping, Stability::Unstable, &base)
            .await
            .unwrap();
        let got = cache.read_overlay(0, 8192, &base).await.unwrap();
        assert!(got[..2048].iter().all(|b| *b == 5));
        assert!(got[2048..6144].iter().all(|b| *b == 6));

        // The second write is refused: the first is done, the third not.
        let failing = vec![
            (40_960, Bytes::from(vec![7; 4096])),
            (MAX_LOGICAL_SIZE, Bytes::from(vec![8; 10])),
            (49_152, Bytes::from(vec![9; 4096])),
        ];
        let (done, _) = cache
            .write_many(failing, Stability::Unstable, &base)
            .await
            .unwrap_err();
        assert_eq!(done, 1);
        let got = cache.read_overlay(40_960, 12_288, &base).await.unwrap();
        assert!(got[..4096].iter().all(|b| *b == 7));
        assert!(got[8192..].iter().all(|b| *b == 0xAA), "third not written");
    }
}
