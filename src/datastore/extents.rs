//! What a file holds, range by range, and how a range is made to read as
//! zeros: the two file operations block exports need beyond READ, WRITE and
//! COMMIT (NBD_CMD_BLOCK_STATUS, NBD_CMD_WRITE_ZEROES and NBD_CMD_TRIM; SCSI
//! GET LBA STATUS, WRITE SAME and UNMAP).
//!
//! Extents come from what the datastore already knows, never from reading
//! data: blocks present in the write cache hold data; below the backup's
//! base length, a chunk the backup stored as a hole (all zeros) reads as
//! zeros and any other chunk holds data; beyond the base length (after a
//! truncate) and beyond the end of the file, everything reads as zeros.

use super::io::{cache_err, repo_err, Base};
use super::surface::FileAt;
use super::{Datastore, DsResult, FileState};
use crate::cache::NoBase;

/// One run of a file that either holds data or reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileExtent {
    /// First byte.
    pub offset: u64,
    /// Length in bytes (never 0).
    pub len: u64,
    /// The run reads as zeros and holds nothing (a hole of the backup, or
    /// beyond its end); `false`: bytes are stored (maybe zeros too).
    pub zero: bool,
}

/// Most extents one query returns. A client asks again from where the
/// answer stopped (NBD allows a shorter answer), and a bitmap of scattered
/// 4 KiB writes over a 4 GiB query would otherwise make a reply of megabytes.
const MAX_EXTENTS: usize = 16 * 1024;

/// Most backup chunks one query looks up: bounds the work of a query over
/// a huge file with small chunks; the client asks again for the rest.
const MAX_CHUNKS: u64 = 64 * 1024;

/// Consecutive extents from a start offset, adjacent runs of one kind merged.
struct Extents {
    out: Vec<FileExtent>,
    next: u64,
    chunks: u64,
}

impl Extents {
    fn new(offset: u64) -> Extents {
        Extents {
            out: Vec::new(),
            next: offset,
            chunks: 0,
        }
    }

    /// Appends `[start, end)`, which must continue the previous run.
    fn push(&mut self, start: u64, end: u64, zero: bool) {
        if start >= end {
            return;
        }
        debug_assert_eq!(start, self.next, "extents must be consecutive");
        self.next = end;
        match self.out.last_mut() {
            Some(last) if last.zero == zero => last.len += end - start,
            _ => self.out.push(FileExtent {
                offset: start,
                len: end - start,
                zero,
            }),
        }
    }

    /// Whether the answer is long enough to stop here.
    fn full(&self) -> bool {
        self.out.len() >= MAX_EXTENTS || self.chunks >= MAX_CHUNKS
    }
}

impl Datastore {
    /// What `[offset, offset + len)` of a file holds: consecutive extents
    /// starting at `offset`, covering at least its first byte and at most
    /// the whole range (a long answer stops early; ask again from its end).
    /// The range may reach beyond the end of the file: that part reads as
    /// zeros.
    ///
    /// # Errors
    /// `Stale`, `IsDir`, or a backup index page that cannot be read.
    pub(super) async fn file_extents(
        &self,
        at: FileAt,
        offset: u64,
        len: u64,
    ) -> DsResult<Vec<FileExtent>> {
        let end = offset.saturating_add(len);
        let (_, node, st) = self.regular(at.export, at.id).await?;
        let size = st.size(&node);
        let data_end = end.min(size);
        let mut ext = Extents::new(offset);
        if offset < data_end {
            let (present, base_len) = match st.cache.get() {
                Some(c) => (c.present_ranges(offset, data_end - offset), c.base_len()),
                None => (Vec::new(), st.base.as_ref().map_or(0, |b| b.size())),
            };
            let mut pos = offset;
            for range in present {
                uncached(&st, pos, range.start, base_len, &mut ext).await?;
                if ext.full() {
                    return Ok(ext.out);
                }
                ext.push(range.start, range.end, false);
                pos = range.end;
            }
            uncached(&st, pos, data_end, base_len, &mut ext).await?;
            if ext.full() {
                return Ok(ext.out);
            }
        }
        ext.push(data_end.max(offset), end, true);
        Ok(ext.out)
    }

    /// Makes `[offset, offset + len)` of a file read as zeros, freeing the
    /// write cache's space for whole blocks inside it; durable on return (a
    /// punch is always made durable, as NFS SETATTR truncates are).
    ///
    /// # Errors
    /// As WRITE.
    pub(super) async fn punch_range(&self, at: FileAt, offset: u64, len: u64) -> DsResult<()> {
        let (state, node, st) = self.regular(at.export, at.id).await?;
        let cache = self.ensure_cache(&state, &node, &st).await?;
        match &st.base {
            Some(base) => cache.punch(offset, len, &Base(base)).await,
            None => cache.punch(offset, len, &NoBase).await,
        }
        .map_err(cache_err)
    }
}

/// Appends the extents of `[from, to)`, a range the write cache does not
/// hold: backup chunks below `base_len`, zeros above it.
async fn uncached(
    st: &FileState,
    from: u64,
    to: u64,
    base_len: u64,
    ext: &mut Extents,
) -> DsResult<()> {
    if from >= to {
        return Ok(());
    }
    let split = base_len.clamp(from, to);
    if let (Some(base), true) = (&st.base, from < split) {
        let cs = base.chunk_size();
        let first = from / cs;
        let last = split
            .div_ceil(cs)
            .min(first + MAX_CHUNKS.saturating_sub(ext.chunks).max(1));
        let holes = base.holes(first..last).await.map_err(|e| repo_err(&e))?;
        ext.chunks += holes.len() as u64;
        for (i, hole) in (first..).zip(holes) {
            ext.push((i * cs).max(from), ((i + 1) * cs).min(split), hole);
        }
        if ext.next < split {
            // Stopped at the chunk budget (or an index shorter than the
            // base): the answer ends here, and the caller stops too.
            ext.chunks = ext.chunks.max(MAX_CHUNKS);
            return Ok(());
        }
    } else if from < split {
        // No backup under the file: nothing below the base length either.
        ext.push(from, split, true);
    }
    ext.push(split, to, true);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;
    use std::sync::Arc;

    use bytes::Bytes;

    use super::*;
    use crate::datastore::{DatastoreConfig, ExportConfig, FileOps, SetAttr, Stability};
    use crate::progress::NoProgress;
    use crate::repo::{backup, BackupOptions, Repository};
    use crate::store::LocalStore;

    const CHUNK: u64 = 64 * 1024;

    /// A datastore over a backed-up image of 16 chunks (less 1000 bytes)
    /// whose chunks 2, 3 and 10 are zeros; returns it with the image and the
    /// published file.
    async fn setup(dir: &std::path::Path) -> (Datastore, Vec<u8>, FileAt) {
        let size = 16 * CHUNK - 1000;
        let mut image: Vec<u8> = (0..size).map(|i| (i % 251) as u8 | 1).collect();
        for zero in [2u64, 3, 10] {
            image[(zero * CHUNK) as usize..((zero + 1) * CHUNK) as usize].fill(0);
        }
        std::fs::write(dir.join("disk.img"), &image).unwrap();
        let store = Arc::new(LocalStore::open(dir.join("repo")).unwrap());
        let repo = Repository::init(store, CHUNK as u32).await.unwrap();
        backup(
            &repo,
            &dir.join("disk.img"),
            &BackupOptions::default(),
            &NoProgress,
        )
        .await
        .unwrap();
        let config = DatastoreConfig {
            state_dir: dir.join("state"),
            cache_root: dir.join("cache"),
            block_cache_bytes: 1 << 20,
            readahead_chunks: 0,
            exports: vec![ExportConfig {
                path: "/revive".into(),
                allowed_clients: vec![IpAddr::from([127, 0, 0, 1])],
            }],
        };
        let ds = Datastore::open(repo, config).await.unwrap();
        let folder = ds
            .publish("/revive", "d", "disk@latest", None)
            .await
            .unwrap();
        let export = ds.export_by_path("/revive").unwrap().id;
        let file = ds
            .lookup(&FileAt::new(export, folder).child("disk.img"))
            .await
            .unwrap()
            .fileid;
        (ds, image, FileAt::new(export, file))
    }

    fn kinds(ext: &[FileExtent]) -> Vec<(u64, u64, bool)> {
        ext.iter().map(|e| (e.offset, e.len, e.zero)).collect()
    }

    /// Every extent said to be zeros reads as zeros, and the extents are
    /// consecutive from `offset`.
    async fn check_against_reads(ds: &Datastore, at: FileAt, ext: &[FileExtent], offset: u64) {
        let mut next = offset;
        for e in ext {
            assert_eq!(e.offset, next, "{ext:?}");
            assert!(e.len > 0);
            next += e.len;
            if e.zero {
                let data = ds.read(at, e.offset, e.len as u32).await.unwrap().data;
                assert!(data.iter().all(|b| *b == 0), "zero extent {e:?} holds data");
            }
        }
    }

    #[tokio::test]
    async fn extents_follow_backup_holes_cache_blocks_and_the_end_of_file() {
        let dir = tempfile::tempdir().unwrap();
        let (ds, image, at) = setup(dir.path()).await;
        let size = image.len() as u64;
        let ext = ds.extents(at, 0, size).await.unwrap();
        assert_eq!(
            kinds(&ext),
            vec![
                (0, 2 * CHUNK, false),
                (2 * CHUNK, 2 * CHUNK, true),
                (4 * CHUNK, 6 * CHUNK, false),
                (10 * CHUNK, CHUNK, true),
                (11 * CHUNK, size - 11 * CHUNK, false),
            ]
        );
        check_against_reads(&ds, at, &ext, 0).await;
        // Unaligned, reaching past the end of the file: zeros there.
        let ext = ds.extents(at, 2 * CHUNK + 5, size).await.unwrap();
        assert_eq!(
            ext[0],
            FileExtent {
                offset: 2 * CHUNK + 5,
                len: 2 * CHUNK - 5,
                zero: true
            }
        );
        let last = ext.last().unwrap();
        assert_eq!(
            (last.offset + last.len, last.zero),
            (2 * CHUNK + 5 + size, true)
        );

        // A write inside a zero chunk makes its cache block data.
        ds.write(
            at,
            2 * CHUNK + 4096,
            Bytes::from(vec![7u8; 100]),
            Stability::Unstable,
        )
        .await
        .unwrap();
        let ext = ds.extents(at, 2 * CHUNK, 2 * CHUNK).await.unwrap();
        assert_eq!(
            kinds(&ext),
            vec![
                (2 * CHUNK, 4096, true),
                (2 * CHUNK + 4096, 4096, false),
                (2 * CHUNK + 8192, 2 * CHUNK - 8192, true),
            ]
        );
        // A punch reads as zeros; its blocks are cache blocks (data).
        ds.punch(at, 5 * CHUNK + 100, CHUNK).await.unwrap();
        let data = ds
            .read(at, 5 * CHUNK + 100, CHUNK as u32)
            .await
            .unwrap()
            .data;
        assert!(data.iter().all(|b| *b == 0));
        assert_eq!(
            ds.read(at, 5 * CHUNK + 99, 1).await.unwrap().data[0],
            image[(5 * CHUNK + 99) as usize]
        );
        let ext = ds.extents(at, 0, size).await.unwrap();
        check_against_reads(&ds, at, &ext, 0).await;

        // A truncate hides the backup beyond the new end for good.
        let set = SetAttr {
            size: Some(3 * CHUNK),
            ..SetAttr::default()
        };
        ds.setattr(at, &set, None).await.unwrap();
        let set = SetAttr {
            size: Some(size),
            ..SetAttr::default()
        };
        ds.setattr(at, &set, None).await.unwrap();
        let ext = ds.extents(at, 0, size).await.unwrap();
        assert_eq!(ext.last().unwrap().offset, 2 * CHUNK + 8192);
        assert!(ext.last().unwrap().zero);
        check_against_reads(&ds, at, &ext, 0).await;
    }
}
