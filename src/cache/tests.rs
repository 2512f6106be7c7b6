//! Unit tests of the write cache through its public API: copy-on-write,
//! read overlay, resize, reopen, damaged headers, group commit, sessions,
//! journal replay.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::format::{Header, HEADER_SLOTS};
use super::*;

/// A base (backup) in memory that records what it was asked for.
struct MemBase {
    bytes: Vec<u8>,
    calls: Mutex<Vec<(u64, usize)>>,
}

impl MemBase {
    fn new(len: usize) -> MemBase {
        MemBase {
            bytes: (0..len).map(|i| (i * 7 % 251) as u8 + 1).collect(),
            calls: Mutex::new(Vec::new()),
        }
    }

    fn calls(&self) -> Vec<(u64, usize)> {
        std::mem::take(&mut *self.calls.lock().unwrap())
    }
}

impl BaseRead for MemBase {
    async fn read_base(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        self.calls.lock().unwrap().push((offset, len));
        let start = offset as usize;
        Ok(Bytes::copy_from_slice(&self.bytes[start..start + len]))
    }
}

const BS: u32 = 4096;

fn paths(dir: &tempfile::TempDir) -> CachePaths {
    CachePaths::in_dir(dir.path(), "disk")
}

async fn backup_cache(dir: &tempfile::TempDir, len: u64) -> WriteCache {
    WriteCache::create(&paths(dir), len, BS, Origin::Backup)
        .await
        .unwrap()
}

#[test]
fn write_cache_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<WriteCache>();
    check::<SessionCache>();
}

/// Compiles only if the request futures can be spawned on a tokio runtime.
#[allow(dead_code)]
fn request_futures_are_send<'a>(cache: &'a WriteCache, base: &'a MemBase) -> impl Send + 'a {
    async move {
        let _ = cache.read(0, 1).await;
        let _ = cache.read_overlay(0, 1, base).await;
        let _ = cache
            .write(0, Bytes::new(), Stability::Unstable, base)
            .await;
        let _ = cache.punch(0, 1, base).await;
        let _ = cache.set_len(0).await;
        let _ = cache.commit().await;
    }
}

#[tokio::test]
async fn partial_blocks_are_copied_on_write_only_at_head_and_tail() {
    let dir = tempfile::tempdir().unwrap();
    let base = MemBase::new(8 * BS as usize);
    let cache = backup_cache(&dir, 8 * u64::from(BS)).await;

    // Head block 0 and tail block 3 are partial; 1 and 2 are whole.
    let data = Bytes::from(vec![0xAB; 12388 - 4000]);
    cache
        .write(4000, data.clone(), Stability::FileSync, &base)
        .await
        .unwrap();
    assert_eq!(base.calls(), vec![(0, 4096), (12288, 4096)]);
    for b in 0..4 {
        assert!(cache.is_cached(b));
    }
    assert!(!cache.is_cached(4));

    let mut expect = base.bytes.clone();
    expect[4000..12388].fill(0xAB);
    let got = cache
        .read_overlay(0, expect.len() as u64, &base)
        .await
        .unwrap();
    assert_eq!(&got[..], &expect[..]);

    // Now cached: a partial write to block 0 needs no base.
    base.calls();
    cache
        .write(10, Bytes::from_static(b"xyz"), Stability::Unstable, &base)
        .await
        .unwrap();
    assert!(base.calls().is_empty());
    expect[10..13].copy_from_slice(b"xyz");
    let got = cache.read_overlay(0, 8192, &base).await.unwrap();
    assert_eq!(&got[..], &expect[..8192]);
}

#[tokio::test]
async fn read_returns_segments_and_stops_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    let base = MemBase::new(4 * BS as usize);
    let cache = backup_cache(&dir, 4 * u64::from(BS)).await;
    let block = Bytes::from(vec![9u8; BS as usize]);
    cache
        .write(4096, block.clone(), Stability::Unstable, &base)
        .await
        .unwrap();

    let segs = cache.read(0, 1 << 20).await.unwrap();
    assert_eq!(
        segs,
        vec![
            Segment::Base {
                offset: 0,
                len: 4096
            },
            Segment::Cached(block.clone()),
            Segment::Base {
                offset: 8192,
                len: 8192
            },
        ]
    );
    assert_eq!(
        cache.read(16000, 1000).await.unwrap(),
        vec![Segment::Base {
            offset: 16000,
            len: 384
        }]
    );
    assert!(cache.read(20000, 10).await.unwrap().is_empty());
    assert_eq!(
        cache.read(5000, 10).await.unwrap(),
        vec![Segment::Cached(block.slice(904..914))]
    );
    assert!(matches!(
        cache.read(u64::MAX - 1, 10).await,
        Err(CacheError::TooLarge { .. })
    ));
}

/// A long read of cached bytes comes in a reused buffer, and bytes the
/// data file no longer has (its end cut under the cache, as a concurrent
/// truncate would) read as zeros, never as an earlier read's bytes.
#[tokio::test]
async fn long_cached_reads_reuse_buffers_and_never_show_stale_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let len = 32 * u64::from(BS);
    let base = MemBase::new(len as usize);
    let cache = backup_cache(&dir, len).await;
    cache
        .write(
            0,
            Bytes::from(vec![0x5A; len as usize]),
            Stability::Unstable,
            &base,
        )
        .await
        .unwrap();
    let first = match cache.read(0, len).await.unwrap().as_slice() {
        [Segment::Cached(b)] => b.clone(),
        other => panic!("expected one cached segment, got {other:?}"),
    };
    assert!(first.iter().all(|&b| b == 0x5A));
    let ptr = first.as_ptr();
    drop(first);

    let half = len / 2;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&paths(&dir).data)
        .unwrap()
        .set_len(half)
        .unwrap();
    let second = match cache.read(0, len).await.unwrap().as_slice() {
        [Segment::Cached(b)] => b.clone(),
        other => panic!("expected one cached segment, got {other:?}"),
    };
    assert_eq!(second.as_ptr(), ptr, "the first read's buffer is reused");
    assert!(second[..half as usize].iter().all(|&b| b == 0x5A));
    assert!(
        second[half as usize..].iter().all(|&b| b == 0),
        "bytes past the cut read as zeros"
    );
}

#[tokio::test]
async fn truncate_then_extend_reads_zeros_beyond_the_cut() {
    let dir = tempfile::tempdir().unwrap();
    let base = MemBase::new(4 * BS as usize);
    let cache = backup_cache(&dir, 4 * u64::from(BS)).await;
    cache
        .write(
            4096,
            Bytes::from(vec![5u8; 4096]),
            Stability::FileSync,
            &base,
        )
        .await
        .unwrap();
    cache
        .write(
            12288,
            Bytes::from(vec![6u8; 4096]),
            Stability::FileSync,
            &base,
        )
        .await
        .unwrap();
    assert_eq!(cache.bytes_used(), 8192);

    cache.set_len(5000).await.unwrap();
    assert_eq!(cache.len(), 5000);
    assert_eq!(cache.base_len(), 5000);
    assert!(!cache.is_cached(3));
    assert_eq!(cache.bytes_used(), 4096);

    cache.set_len(16384).await.unwrap();
    let got = cache.read_overlay(0, 16384, &base).await.unwrap();
    let mut expect = base.bytes.clone();
    expect[4096..5000].fill(5);
    expect[5000..].fill(0);
    assert_eq!(&got[..], &expect[..]);
    assert_eq!(
        cache.read(8192, 8192).await.unwrap(),
        vec![Segment::Zero { len: 8192 }]
    );

    // Truncate inside an uncached block: base bytes up to the cut only.
    cache.set_len(1000).await.unwrap();
    cache.set_len(4096).await.unwrap();
    assert_eq!(
        cache.read(0, 4096).await.unwrap(),
        vec![
            Segment::Base {
                offset: 0,
                len: 1000
            },
            Segment::Zero { len: 3096 }
        ]
    );
    // A COW after that takes only the base bytes below the cut.
    base.calls();
    cache
        .write(2000, Bytes::from_static(b"q"), Stability::FileSync, &base)
        .await
        .unwrap();
    assert_eq!(base.calls(), vec![(0, 1000)]);
    let got = cache.read_overlay(0, 4096, &base).await.unwrap();
    let mut expect = base.bytes[..4096].to_vec();
    expect[1000..].fill(0);
    expect[2000] = b'q';
    assert_eq!(&got[..], &expect[..]);
}

#[tokio::test]
async fn writes_beyond_the_end_extend_a_new_file_with_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let cache = WriteCache::create(&paths(&dir), 0, 512, Origin::New)
        .await
        .unwrap();
    cache
        .write(
            10_000,
            Bytes::from_static(b"abc"),
            Stability::FileSync,
            &NoBase,
        )
        .await
        .unwrap();
    assert_eq!(cache.len(), 10_003);
    let got = cache.read_overlay(0, 20_000, &NoBase).await.unwrap();
    assert_eq!(got.len(), 10_003);
    assert!(got[..10_000].iter().all(|b| *b == 0));
    assert_eq!(&got[10_000..], b"abc");
}

#[tokio::test]
async fn reopen_keeps_stable_and_committed_writes() {
    let dir = tempfile::tempdir().unwrap();
    let base = MemBase::new(64 * 1024);
    {
        let cache = backup_cache(&dir, 64 * 1024).await;
        cache
            .write(
                100,
                Bytes::from_static(b"stable"),
                Stability::FileSync,
                &base,
            )
            .await
            .unwrap();
        cache
            .write(
                70_000,
                Bytes::from_static(b"grown"),
                Stability::Unstable,
                &base,
            )
            .await
            .unwrap();
        cache.commit().await.unwrap();
    }
    let cache = WriteCache::open(&paths(&dir)).await.unwrap();
    assert_eq!(cache.len(), 70_005);
    assert_eq!(cache.base_len(), 64 * 1024);
    assert_eq!(cache.block_size(), BS);
    let got = cache.read_overlay(100, 6, &base).await.unwrap();
    assert_eq!(&got[..], b"stable");
    let got = cache.read_overlay(70_000, 100, &base).await.unwrap();
    assert_eq!(&got[..], b"grown");
    // Only blocks 0 and 17 were written.
    assert_eq!(cache.bytes_used(), 2 * u64::from(BS));
}

#[tokio::test]
async fn damaged_headers_are_refused_and_a_torn_slot_is_survived() {
    let dir = tempfile::tempdir().unwrap();
    drop(backup_cache(&dir, 8192).await);
    let p = paths(&dir);
    let map = std::fs::OpenOptions::new()
        .write(true)
        .open(&p.map)
        .unwrap();

    // One torn slot: the other one still opens.
    map.write_all_at(&[0xFF; 64], HEADER_SLOTS[1] + 16).unwrap();
    drop(WriteCache::open(&p).await.unwrap());

    // Both checksums wrong.
    map.write_all_at(&[0xFF; 8], HEADER_SLOTS[0] + 16).unwrap();
    assert!(matches!(
        WriteCache::open(&p).await,
        Err(CacheError::CorruptHeader { .. })
    ));
    // Not a write cache at all.
    for slot in HEADER_SLOTS {
        map.write_all_at(b"NOTACACHE", slot).unwrap();
    }
    assert!(matches!(
        WriteCache::open(&p).await,
        Err(CacheError::BadMagic { .. })
    ));
    // Too short to hold its headers.
    map.set_len(100).unwrap();
    assert!(matches!(
        WriteCache::open(&p).await,
        Err(CacheError::CorruptHeader { .. })
    ));
    // A valid checksum over a nonsense field.
    let bad = Header {
        block_size: 3000,
        logical_size: 0,
        base_len: 0,
        sequence: 9,
    };
    map.set_len(8192).unwrap();
    map.write_all_at(&bad.encode(), HEADER_SLOTS[1]).unwrap();
    assert!(matches!(
        WriteCache::open(&p).await,
        Err(CacheError::CorruptHeader { .. })
    ));
}

#[tokio::test]
async fn create_checks_its_arguments_and_locks_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let p = paths(&dir);
    assert!(matches!(
        WriteCache::create(&p, 0, 1000, Origin::New).await,
        Err(CacheError::InvalidBlockSize(1000))
    ));
    let cache = WriteCache::create(&p, 0, BS, Origin::New).await.unwrap();
    assert!(matches!(
        WriteCache::create(&p, 0, BS, Origin::New).await,
        Err(CacheError::Exists(_))
    ));
    // A second open of a cache in use is refused.
    assert!(WriteCache::open(&p).await.is_err());
    cache.delete().await.unwrap();
    assert!(!p.map.exists() && !p.data.exists());
}

#[tokio::test]
async fn open_repairs_bits_and_bytes_beyond_the_logical_size() {
    let dir = tempfile::tempdir().unwrap();
    let p = paths(&dir);
    {
        let cache = WriteCache::create(&p, 0, BS, Origin::New).await.unwrap();
        // Checkpoint at once: the bitmap must reach the map file.
        cache.set_checkpoint_bytes(0);
        let data = Bytes::from(vec![7u8; 3 * BS as usize]);
        cache
            .write(0, data, Stability::FileSync, &NoBase)
            .await
            .unwrap();
    }
    // Simulate a crash that persisted the bitmap but not the grown header.
    let short = Header {
        block_size: BS,
        logical_size: 5000,
        base_len: 0,
        sequence: 100,
    };
    let map = std::fs::OpenOptions::new()
        .write(true)
        .open(&p.map)
        .unwrap();
    map.write_all_at(&short.encode(), short.slot_offset())
        .unwrap();
    drop(map);

    let cache = WriteCache::open(&p).await.unwrap();
    assert_eq!(cache.len(), 5000);
    assert!(cache.is_cached(1) && !cache.is_cached(2));
    cache.set_len(3 * u64::from(BS)).await.unwrap();
    let got = cache
        .read_overlay(0, 3 * u64::from(BS), &NoBase)
        .await
        .unwrap();
    assert!(got[..5000].iter().all(|b| *b == 7));
    assert!(got[5000..].iter().all(|b| *b == 0));
}

#[tokio::test]
async fn punch_zeroes_the_range_and_keeps_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let base = MemBase::new(4 * BS as usize);
    let cache = backup_cache(&dir, 4 * u64::from(BS)).await;
    cache
        .write(0, Bytes::from(vec![3u8; 8192]), Stability::FileSync, &base)
        .await
        .unwrap();
    cache.punch(100, 12_000, &base).await.unwrap();
    let got = cache.read_overlay(0, 16384, &base).await.unwrap();
    let mut expect = base.bytes.clone();
    expect[..8192].fill(3);
    expect[100..12_100].fill(0);
    assert_eq!(&got[..], &expect[..]);
    assert_eq!(cache.len(), 16384);
}

#[tokio::test]
async fn one_commit_flushes_many_unstable_writes() {
    let dir = tempfile::tempdir().unwrap();
    let cache = WriteCache::create(&paths(&dir), 0, BS, Origin::New)
        .await
        .unwrap();
    for i in 0..8u64 {
        let data = Bytes::from(vec![i as u8; BS as usize]);
        cache
            .write(i * 4096, data, Stability::Unstable, &NoBase)
            .await
            .unwrap();
    }
    assert_eq!(cache.flush_count(), 0);
    cache.commit().await.unwrap();
    assert_eq!(cache.flush_count(), 1);
    cache.commit().await.unwrap(); // nothing new: no flush
    assert_eq!(cache.flush_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_sync_writes_share_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(
        WriteCache::create(&paths(&dir), 0, BS, Origin::New)
            .await
            .unwrap(),
    );
    let writers = 32u64;
    let rounds = 8u64;
    let mut tasks = Vec::new();
    for t in 0..writers {
        let cache = Arc::clone(&cache);
        tasks.push(tokio::spawn(async move {
            for r in 0..rounds {
                let data = Bytes::from(vec![(t + r) as u8; BS as usize]);
                let off = (r * writers + t) * u64::from(BS);
                cache
                    .write(off, data, Stability::FileSync, &NoBase)
                    .await
                    .unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let flushes = cache.flush_count();
    println!(
        "{} FILE_SYNC writes from {writers} tasks took {flushes} flushes",
        writers * rounds
    );
    assert!(flushes <= writers * rounds);
    for r in 0..rounds {
        for t in 0..writers {
            let off = (r * writers + t) * u64::from(BS);
            let got = cache.read_overlay(off, 1, &NoBase).await.unwrap();
            assert_eq!(got[0], (t + r) as u8);
        }
    }
}

#[tokio::test]
async fn session_cache_finds_sums_and_removes_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("sessions").join("vm1");
    {
        let session = SessionCache::open(&folder).await.unwrap();
        let a = session
            .get_or_create("disk-flat.vmdk", 1 << 20, BS, Origin::Backup)
            .await
            .unwrap();
        let b = session
            .get_or_create("vmware.log", 0, BS, Origin::New)
            .await
            .unwrap();
        let again = session
            .get_or_create("vmware.log", 0, BS, Origin::New)
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&b, &again));
        let base = MemBase::new(1 << 20);
        a.write(0, Bytes::from(vec![1u8; 8192]), Stability::FileSync, &base)
            .await
            .unwrap();
        b.write(0, Bytes::from_static(b"log"), Stability::Unstable, &NoBase)
            .await
            .unwrap();
        session.commit_all().await.unwrap();
        assert_eq!(session.bytes_used().await, 3 * u64::from(BS));
        for bad in ["", ".", "..", "a/b", "nul\0"] {
            assert!(matches!(
                session.get_or_create(bad, 0, BS, Origin::New).await,
                Err(CacheError::InvalidName(_))
            ));
        }
    }
    let session = SessionCache::open(&folder).await.unwrap();
    assert_eq!(session.names().await, vec!["disk-flat.vmdk", "vmware.log"]);
    assert_eq!(session.bytes_used().await, 3 * u64::from(BS));
    assert!(session.remove("vmware.log").await.unwrap());
    assert!(!session.remove("vmware.log").await.unwrap());
    assert!(session.get("vmware.log").await.is_none());
    assert_eq!(session.bytes_used().await, 2 * u64::from(BS));
    session.delete().await.unwrap();
    assert!(!folder.exists());
}

#[tokio::test]
async fn resizes_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let base = MemBase::new(4 * BS as usize);
    {
        let cache = backup_cache(&dir, 4 * u64::from(BS)).await;
        cache
            .write(
                4096,
                Bytes::from(vec![5u8; 4096]),
                Stability::FileSync,
                &base,
            )
            .await
            .unwrap();
        cache.set_len(6000).await.unwrap();
        cache.set_len(10_000).await.unwrap();
    }
    let cache = WriteCache::open(&paths(&dir)).await.unwrap();
    assert_eq!((cache.len(), cache.base_len()), (10_000, 6000));
    let got = cache.read_overlay(0, 10_000, &base).await.unwrap();
    let mut expect = base.bytes[..10_000].to_vec();
    expect[4096..6000].fill(5);
    expect[6000..].fill(0);
    assert_eq!(&got[..], &expect[..]);
    // The data file keeps no bytes beyond the truncated block.
    let data_len = std::fs::metadata(&paths(&dir).data).unwrap().len();
    assert!(
        data_len <= 2 * u64::from(BS),
        "data file is {data_len} bytes"
    );
}

/// Overwrites `len` bytes at `offset` of `path` with `byte`.
fn scribble(path: &std::path::Path, offset: u64, len: usize, byte: u8) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&vec![byte; len], offset).unwrap();
    f.sync_all().unwrap();
}

/// Stable writes are durable in the journal alone: with the data file's
/// unsynced bytes lost (as a power loss could) and no bit on disk, reopen
/// replays them, and a second reopen finds them checkpointed.
#[tokio::test]
async fn stable_writes_are_replayed_from_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let base = MemBase::new(64 * 1024);
    {
        let cache = backup_cache(&dir, 64 * 1024).await;
        for i in 0..4u64 {
            let data = Bytes::from(vec![0x10 + i as u8; 3000]);
            cache
                .write(i * 8192 + 100, data, Stability::FileSync, &base)
                .await
                .unwrap();
        }
        // Grows the file through a record: the size comes back by replay.
        cache
            .write(
                70_000,
                Bytes::from_static(b"grown"),
                Stability::FileSync,
                &base,
            )
            .await
            .unwrap();
        assert_eq!(cache.flush_count(), 5, "one journal sync per write");
    }
    let p = paths(&dir);
    scribble(&p.data, 0, 80 * 1024, 0xEE);
    for _ in 0..2 {
        let cache = WriteCache::open(&p).await.unwrap();
        assert_eq!(cache.len(), 70_005);
        for i in 0..4u64 {
            let got = cache.read_overlay(i * 8192, 8192, &base).await.unwrap();
            let mut want = base.bytes[(i * 8192) as usize..((i + 1) * 8192) as usize].to_vec();
            want[100..3100].fill(0x10 + i as u8);
            assert_eq!(&got[..], &want[..], "write {i}");
        }
        let got = cache.read_overlay(70_000, 100, &base).await.unwrap();
        assert_eq!(&got[..], b"grown");
        assert_eq!(cache.bytes_used(), 5 * u64::from(BS));
    }
}

/// A torn last record (a crash in the middle of an append) is ignored with
/// everything after it; the records before it are replayed.
#[tokio::test]
async fn a_torn_last_record_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let base = MemBase::new(64 * 1024);
    let p = paths(&dir);
    {
        let cache = backup_cache(&dir, 64 * 1024).await;
        for i in 0..3u64 {
            let data = Bytes::from(vec![0x20 + i as u8; BS as usize]);
            cache
                .write(i * 4096, data, Stability::FileSync, &base)
                .await
                .unwrap();
        }
    }
    // Records are 64 + 4096 bytes from offset 4096: damage the third's payload.
    let third = format::JOURNAL_RECORDS_OFFSET + 2 * (64 + 4096);
    scribble(&p.journal, third + 64 + 1000, 10, 0);
    let cache = WriteCache::open(&p).await.unwrap();
    for i in 0..2u64 {
        let got = cache.read_overlay(i * 4096, 4096, &base).await.unwrap();
        assert!(got.iter().all(|b| *b == 0x20 + i as u8), "record {i}");
    }
    assert!(!cache.is_cached(2), "the torn record was replayed");
    let got = cache.read_overlay(2 * 4096, 4096, &base).await.unwrap();
    assert_eq!(&got[..], &base.bytes[2 * 4096..3 * 4096]);
}

/// After a checkpoint, the old records are dead: a stale record is never
/// replayed over newer data that reached the data file another way.
#[tokio::test]
async fn checkpointed_records_are_never_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let base = MemBase::new(1 << 20);
    {
        let cache = backup_cache(&dir, 1 << 20).await;
        let old = Bytes::from(vec![0x31; BS as usize]);
        cache
            .write(0, old, Stability::FileSync, &base)
            .await
            .unwrap();
        // Larger than a record: a checkpoint makes it durable.
        let new = Bytes::from(vec![0x32; 512 << 10]);
        cache
            .write(0, new, Stability::FileSync, &base)
            .await
            .unwrap();
        assert_eq!(cache.flush_count(), 2);
    }
    let cache = WriteCache::open(&paths(&dir)).await.unwrap();
    let got = cache.read_overlay(0, 4096, &base).await.unwrap();
    assert!(got.iter().all(|b| *b == 0x32));
}

/// Unstable writes are journaled too: COMMIT is one journal sync, and the
/// committed writes come back from the journal.
#[tokio::test]
async fn commit_of_unstable_writes_is_one_journal_sync() {
    let dir = tempfile::tempdir().unwrap();
    let p = paths(&dir);
    {
        let cache = WriteCache::create(&p, 0, BS, Origin::New).await.unwrap();
        for i in 0..8u64 {
            let data = Bytes::from(vec![i as u8 + 1; BS as usize]);
            cache
                .write(i * 4096, data, Stability::Unstable, &NoBase)
                .await
                .unwrap();
        }
        cache.commit().await.unwrap();
        assert_eq!(cache.flush_count(), 1);
    }
    let map_len = std::fs::metadata(&p.map).unwrap().len();
    assert_eq!(map_len, format::BITMAP_OFFSET, "no bitmap page was written");
    let cache = WriteCache::open(&p).await.unwrap();
    assert_eq!(cache.len(), 8 * 4096);
    for i in 0..8u64 {
        let got = cache.read_overlay(i * 4096, 4096, &NoBase).await.unwrap();
        assert!(got.iter().all(|b| *b == i as u8 + 1));
    }
}
