//! Write cache benchmarks: 4 KiB FILE_SYNC writes per second.
//!
//! - `group_commit/qdN`: N tasks doing `Stability::FileSync` writes to one
//!   `WriteCache`; concurrent writes share flushes.
//! - `serial_fsync/qd16`: the naive design for comparison: every write does
//!   its own pwrite + fdatasync, one at a time, from 16 tasks. All blocks are
//!   prefilled in both cases, so the bitmap never changes and each flush is a
//!   single fdatasync of the data file: the best case for the serial design.
//! - `fresh_blocks/qd16`: 16 tasks doing `FileSync` writes to blocks never
//!   written before, in random order over a 4 GiB sparse file: what fio's
//!   4 KiB random FILE_SYNC job does to a new write cache (every write sets a
//!   new bit and allocates a data block).
//! - `.../two_syncs` variants: the same with the journal's checkpoint size
//!   set to 0, so every flush is a checkpoint (data `fdatasync`, then bitmap
//!   `fdatasync`): the write cache as it was before the journal, measured
//!   side by side in the same run.
//!
//! Run: `cargo bench --bench cache`. Files go to a temporary folder under
//! `REVIVE_BENCH_DIR` (default `target/`), so fsync hits the real disk.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use revive::cache::{CachePaths, NoBase, Origin, Stability, WriteCache};

const BS: u64 = 4096;
/// Blocks written in turn; a bounded region keeps the files small.
const BLOCKS: u64 = 4096;

fn bench_dir() -> tempfile::TempDir {
    let root = std::env::var_os("REVIVE_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    std::fs::create_dir_all(&root).expect("bench folder");
    tempfile::tempdir_in(root).expect("temp dir")
}

/// Runs `total` writes spread over `qd` tasks; returns the elapsed time.
async fn group_commit(cache: &Arc<WriteCache>, qd: u64, total: u64) -> Duration {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..qd {
        let cache = Arc::clone(cache);
        let n = total / qd + u64::from(t < total % qd);
        tasks.push(tokio::spawn(async move {
            let data = Bytes::from(vec![t as u8 + 1; BS as usize]);
            for i in 0..n {
                let block = (i * qd + t) % BLOCKS;
                cache
                    .write(block * BS, data.clone(), Stability::FileSync, &NoBase)
                    .await
                    .expect("write");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer task");
    }
    start.elapsed()
}

/// Blocks of the sparse file used by `fresh_blocks` (4 GiB): far more than a
/// benchmark run writes, so nearly every write hits a new block.
const FRESH_BLOCKS: u64 = 1 << 20;

/// Like `group_commit`, but block numbers come from a counter scrambled by
/// an odd multiplier, so each write lands on a block never written before
/// (until the counter wraps `FRESH_BLOCKS`), scattered over the file.
async fn fresh_blocks(
    cache: &Arc<WriteCache>,
    next: &Arc<std::sync::atomic::AtomicU64>,
    qd: u64,
    total: u64,
) -> Duration {
    use std::sync::atomic::Ordering;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..qd {
        let cache = Arc::clone(cache);
        let next = Arc::clone(next);
        let n = total / qd + u64::from(t < total % qd);
        tasks.push(tokio::spawn(async move {
            let data = Bytes::from(vec![t as u8 + 1; BS as usize]);
            for _ in 0..n {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let block = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) % FRESH_BLOCKS;
                cache
                    .write(block * BS, data.clone(), Stability::FileSync, &NoBase)
                    .await
                    .expect("write");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer task");
    }
    start.elapsed()
}

/// The naive baseline: one fsync pair per write, serialized.
async fn serial_fsync(file: &Arc<Mutex<File>>, qd: u64, total: u64) -> Duration {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..qd {
        let file = Arc::clone(file);
        let n = total / qd + u64::from(t < total % qd);
        tasks.push(tokio::spawn(async move {
            for i in 0..n {
                let file = Arc::clone(&file);
                let block = (i * qd + t) % BLOCKS;
                tokio::task::spawn_blocking(move || {
                    let data = file.lock().expect("lock");
                    data.write_all_at(&[t as u8 + 1; BS as usize], block * BS)
                        .expect("pwrite");
                    data.sync_data().expect("fdatasync");
                })
                .await
                .expect("blocking");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer task");
    }
    start.elapsed()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = bench_dir();
    let mut group = c.benchmark_group("cache_sync_write_4k");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(5));

    for (qd, two_syncs) in [(1u64, false), (16, false), (16, true), (64, false)] {
        let name = match two_syncs {
            false => format!("group_commit/qd{qd}"),
            true => format!("group_commit/qd{qd}/two_syncs"),
        };
        let paths = CachePaths::in_dir(dir.path(), &name.replace('/', "-"));
        let cache = Arc::new(
            rt.block_on(WriteCache::create(
                &paths,
                BLOCKS * BS,
                BS as u32,
                Origin::New,
            ))
            .expect("create"),
        );
        // Steady state: overwrite allocated blocks, as a running VM does.
        rt.block_on(async {
            let data = Bytes::from(vec![0xEE; (BLOCKS * BS) as usize]);
            cache
                .write(0, data, Stability::FileSync, &NoBase)
                .await
                .expect("prefill");
        });
        if two_syncs {
            cache.set_checkpoint_bytes(0);
        }
        let before = cache.flush_count();
        group.bench_function(&name, |b| {
            b.iter_custom(|iters| rt.block_on(group_commit(&cache, qd, iters)))
        });
        let flushes = cache.flush_count() - before;
        println!("{name}: {flushes} flushes during the benchmark");
    }

    for two_syncs in [false, true] {
        let name = match two_syncs {
            false => "fresh_blocks/qd16",
            true => "fresh_blocks/qd16/two_syncs",
        };
        let paths = CachePaths::in_dir(dir.path(), &name.replace('/', "-"));
        let cache = Arc::new(
            rt.block_on(WriteCache::create(
                &paths,
                FRESH_BLOCKS * BS,
                BS as u32,
                Origin::New,
            ))
            .expect("create"),
        );
        if two_syncs {
            cache.set_checkpoint_bytes(0);
        }
        let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let before = cache.flush_count();
        group.bench_function(name, |b| {
            b.iter_custom(|iters| rt.block_on(fresh_blocks(&cache, &next, 16, iters)))
        });
        let flushes = cache.flush_count() - before;
        println!("{name}: {flushes} flushes during the benchmark");
    }

    let open = |name: &str| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join(name))
            .expect("open")
    };
    let data = open("serial.data");
    data.write_all_at(&vec![0xEE; (BLOCKS * BS) as usize], 0)
        .expect("prefill");
    data.sync_all().expect("sync");
    let file = Arc::new(Mutex::new(data));
    group.bench_function("serial_fsync/qd16", |b| {
        b.iter_custom(|iters| rt.block_on(serial_fsync(&file, 16, iters)))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
