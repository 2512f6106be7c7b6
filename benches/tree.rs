//! Folder-tree benchmarks (issue 12, item 1): back up and restore a tree of
//! 5000 small files (a PostgreSQL data folder's shape: 8 KiB pages, a few
//! empty and larger files, 50 folders) plus three 32 MiB files, through the
//! library's own code paths, next to `cp -a` of the same tree for scale.
//!
//! `cargo bench --bench tree` ; figures and machine in README.md.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use revive::progress::NoProgress;
use revive::repo::{self, BackupOptions, Repository};
use revive::store::LocalStore;
use tokio::runtime::Runtime;

const MIB: usize = 1 << 20;
/// Small files in the tree.
const SMALL_FILES: usize = 5000;
/// Folders the small files are spread over.
const FOLDERS: usize = 50;
/// Large files (32 MiB each).
const LARGE_FILES: usize = 3;

/// Half random, half compressible bytes, like table pages.
fn fill(rng: &mut StdRng, buf: &mut [u8]) {
    let half = buf.len() / 2;
    rng.fill_bytes(&mut buf[..half]);
    for (i, b) in buf[half..].iter_mut().enumerate() {
        *b = b"revive tree bench row "[i % 22];
    }
}

/// Builds the tree; returns its total file bytes.
fn make_tree(dir: &Path) -> u64 {
    let mut rng = StdRng::seed_from_u64(12);
    let mut total = 0u64;
    for f in 0..FOLDERS {
        fs::create_dir_all(dir.join(format!("base/{}", 16384 + f))).unwrap();
    }
    fs::create_dir_all(dir.join("pg_wal")).unwrap();
    for n in 0..SMALL_FILES {
        // Mostly one 8 KiB page, some empty, some up to 64 KiB.
        let len = match rng.random_range(0..20) {
            0 => 0,
            1..=3 => 8192 * rng.random_range(2..=8),
            _ => 8192,
        };
        let mut buf = vec![0u8; len];
        fill(&mut rng, &mut buf);
        let path = dir.join(format!("base/{}/{}", 16384 + n % FOLDERS, 1000 + n));
        fs::write(path, &buf).unwrap();
        total += len as u64;
    }
    let mut buf = vec![0u8; 32 * MIB];
    for n in 0..LARGE_FILES {
        fill(&mut rng, &mut buf);
        fs::write(dir.join(format!("pg_wal/large-{n}")), &buf).unwrap();
        total += buf.len() as u64;
    }
    std::os::unix::fs::symlink("base/16384", dir.join("link")).unwrap();
    total
}

fn new_repo(rt: &Runtime, dir: &Path) -> Repository {
    let _ = fs::remove_dir_all(dir);
    let store = Arc::new(LocalStore::open(dir).unwrap());
    rt.block_on(Repository::init(store, repo::default_chunk_size()))
        .unwrap()
}

fn tree(c: &mut Criterion) {
    let rt = Runtime::new().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let bytes = make_tree(&src);
    let options = BackupOptions {
        vm: Some("bench".into()),
        tree: true,
    };
    let mut g = c.benchmark_group("tree");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(30))
        .throughput(Throughput::Bytes(bytes));

    let fresh = tmp.path().join("fresh");
    g.bench_function("backup_new", |b| {
        b.iter_batched(
            || new_repo(&rt, &fresh),
            |repo| {
                rt.block_on(repo::backup(&repo, &src, &options, &NoProgress))
                    .unwrap()
            },
            BatchSize::PerIteration,
        )
    });

    let repo = new_repo(&rt, &tmp.path().join("repo"));
    let point = rt
        .block_on(repo::backup(&repo, &src, &options, &NoProgress))
        .unwrap();
    g.bench_function("backup_unchanged", |b| {
        b.iter(|| {
            rt.block_on(repo::backup(&repo, &src, &options, &NoProgress))
                .unwrap()
        })
    });

    let dest = tmp.path().join("restored");
    g.bench_function("restore", |b| {
        b.iter_batched(
            || {
                let _ = fs::remove_dir_all(&dest);
            },
            |()| {
                rt.block_on(repo.restore(&point, &dest, &NoProgress))
                    .unwrap()
            },
            BatchSize::PerIteration,
        )
    });

    // For scale: the same tree copied by cp -a, then synced like a restore.
    let copy = tmp.path().join("copy");
    g.bench_function("cp_a_and_sync", |b| {
        b.iter_batched(
            || {
                let _ = fs::remove_dir_all(&copy);
            },
            |()| {
                let ok = Command::new("sh")
                    .arg("-c")
                    .arg(format!(
                        "cp -a '{}' '{}' && sync -f '{}'",
                        src.display(),
                        copy.display(),
                        copy.display()
                    ))
                    .status()
                    .unwrap()
                    .success();
                assert!(ok);
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

criterion_group!(benches, tree);
criterion_main!(benches);
