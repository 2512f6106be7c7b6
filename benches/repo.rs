//! Repository benchmarks (issue 2): backup ingest of new and of unchanged data,
//! chunk decode (hash check + decompress), and reads at the head vs the tail of
//! a chain of 50 incrementals, all through the library's own code paths.
//!
//! `cargo bench --bench repo` ; figures and machine in README.md.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use revive::progress::NoProgress;
use revive::repo::{self, chunk, BackupOptions, ChunkId, FileReader, Repository};
use revive::store::LocalStore;
use tokio::runtime::Runtime;

const MIB: usize = 1 << 20;
/// Disk size for ingest and chain benches: big enough to dwarf per-backup overhead.
const DISK: usize = 64 * MIB;
/// Incrementals in the chain bench.
const CHAIN: usize = 50;
/// Random 4 KiB writes between two incrementals: each changes about 1.5% of
/// the 64 chunks, like a day of a quiet server.
const WRITES_PER_INCREMENTAL: usize = 1;

/// A VM folder with one flat disk of half random, half compressible data.
fn make_vm(dir: &Path, seed: u64) {
    fs::create_dir_all(dir).unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut f = File::create(dir.join("bench-flat.vmdk")).unwrap();
    let mut buf = vec![0u8; MIB];
    for i in 0..DISK / MIB {
        if i % 2 == 0 {
            rng.fill_bytes(&mut buf);
        } else {
            for (j, b) in buf.iter_mut().enumerate() {
                *b = b"revive bench text "[j % 18];
            }
            buf[..8].copy_from_slice(&(i as u64).to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
    fs::write(dir.join("bench.vmx"), "displayName = \"bench\"\n").unwrap();
}

fn new_repo(rt: &Runtime, dir: &Path) -> Repository {
    let _ = fs::remove_dir_all(dir);
    let store = Arc::new(LocalStore::open(dir).unwrap());
    rt.block_on(Repository::init(store, repo::default_chunk_size()))
        .unwrap()
}

fn ingest(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let vm = tmp.path().join("vm");
    make_vm(&vm, 1);
    let mut group = c.benchmark_group("ingest");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(DISK as u64));
    group.bench_function("new_data", |b| {
        b.iter(|| {
            let repo = new_repo(&rt, &tmp.path().join("repo-new"));
            rt.block_on(repo::backup(
                &repo,
                &vm,
                &BackupOptions::default(),
                &NoProgress,
            ))
            .unwrap()
        })
    });
    let repo = new_repo(&rt, &tmp.path().join("repo-unchanged"));
    rt.block_on(repo::backup(
        &repo,
        &vm,
        &BackupOptions::default(),
        &NoProgress,
    ))
    .unwrap();
    group.bench_function("unchanged_data", |b| {
        b.iter(|| {
            rt.block_on(repo::backup(
                &repo,
                &vm,
                &BackupOptions::default(),
                &NoProgress,
            ))
            .unwrap()
        })
    });
    group.finish();
}

fn chunk_decode(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(2);
    let mut random = vec![0u8; MIB];
    rng.fill_bytes(&mut random);
    let text: Vec<u8> = (0..MIB).map(|i| b"GET /index.html 200\n"[i % 20]).collect();
    let mut group = c.benchmark_group("chunk_read");
    group.throughput(Throughput::Bytes(MIB as u64));
    for (name, data) in [("random_raw", &random), ("text_zstd", &text)] {
        let id = ChunkId::of(data);
        let object = chunk::encode(data).unwrap();
        group.bench_with_input(
            BenchmarkId::new("decode_verify", name),
            &object,
            |b, obj| b.iter(|| chunk::decode(&id, obj).unwrap()),
        );
    }
    group.finish();
}

fn chain_reads(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let vm = tmp.path().join("vm");
    make_vm(&vm, 3);
    let repo = new_repo(&rt, &tmp.path().join("repo"));
    let mut rng = StdRng::seed_from_u64(4);
    let disk = OpenOptions::new()
        .write(true)
        .open(vm.join("bench-flat.vmdk"))
        .unwrap();
    let mut points = Vec::new();
    let mut block = vec![0u8; 4096];
    for _ in 0..=CHAIN {
        points.push(
            rt.block_on(repo::backup(
                &repo,
                &vm,
                &BackupOptions::default(),
                &NoProgress,
            ))
            .unwrap(),
        );
        for _ in 0..WRITES_PER_INCREMENTAL {
            rng.fill_bytes(&mut block);
            let at = rng.random_range(0..DISK / 4096) * 4096;
            disk.write_all_at(&block, at as u64).unwrap();
        }
    }
    let offsets: Vec<u64> = (0..256)
        .map(|_| (rng.random_range(0..DISK / 4096) * 4096) as u64)
        .collect();
    let mut group = c.benchmark_group("chain_read");
    group.sample_size(20);
    group.throughput(Throughput::Bytes(4096 * offsets.len() as u64));
    let first = &points[0];
    let last = &points[CHAIN];
    assert_eq!(last.parent.as_deref(), Some(points[CHAIN - 1].id.as_str()));
    for (name, point) in [("first_point", first), ("point_50", last)] {
        let reader = FileReader::new(&repo, point, "bench-flat.vmdk").unwrap();
        group.bench_function(BenchmarkId::new("random_4k", name), |b| {
            b.iter(|| {
                rt.block_on(async {
                    for &off in &offsets {
                        reader.read_at(off, 4096).await.unwrap();
                    }
                })
            })
        });
    }
    group.finish();
}

criterion_group!(benches, ingest, chunk_decode, chain_reads);
criterion_main!(benches);
