//! Issue 12, item 1: folder trees as restore points. A tree (empty files and
//! folders, nesting, symlinks relative, absolute and dangling, modes
//! 0700/0600/0755/sticky/setgid, owners, ns mtimes, a large sparse file) is
//! backed up and restored exactly, on a folder and on S3; a renamed file
//! costs no new chunk; a tree that changed little stores little. Submodules:
//! the v1 fixture and bad input (`compat`), the library API frontends present
//! trees from (`api`), and a real PostgreSQL basebackup (`postgres`).

use std::fs;
use std::path::Path;

use crate::support::moto::{on_both_stores, TestRepo};
use crate::support::tree::{assert_same_tree, random_file, SampleTree};
use crate::support::*;

mod api;
mod compat;
mod nfs;
mod postgres;

const MIB: u64 = 1 << 20;
/// Allocation a restored sparse file may have beyond its source's: a few
/// blocks of file system metadata or preallocation, far below one chunk.
const SLACK: u64 = 64 << 10;

/// `revive points --json` of `repo`, parsed.
fn points_of(repo: &TestRepo) -> Vec<serde_json::Value> {
    let out = run_ok(repo.cmd("points").arg("--json"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("points --json printed {out:?}: {e}"))
}

on_both_stores!(tree_with_every_kind_of_entry_is_restored_exactly, exact);
fn exact(repo: &TestRepo, tmp: &Path) {
    let tree = SampleTree::create(tmp, "pgdata", 41);
    repo.init();
    let first = repo.backup(&tree.dir, Some("pg-prod"));
    assert_eq!(first["kind"], "tree", "{first}");
    assert_eq!(first["vm"], "pg-prod");
    assert_eq!(first["counts"]["symlinks"], 5, "{first}");
    assert_eq!(first["counts"]["folders"], 16, "{first}");
    // The 64 MiB sparse file's holes are holes in the index.
    assert!(first["chunks_zero"].as_u64().unwrap() >= 60, "{first}");

    let r1 = tmp.join("restored-1");
    repo.restore(first["id"].as_str().unwrap(), &r1);
    assert_same_tree(&tree.dir, &r1, &[SampleTree::SPARSE], SLACK);

    // Rename the 5 MiB file into a new folder, add one 100-byte file: the
    // second backup stores the new file's bytes and nothing else.
    fs::create_dir(tree.path("data/moved")).unwrap();
    fs::rename(
        tree.path(SampleTree::BIG),
        tree.path("data/moved/renamed-random"),
    )
    .unwrap();
    random_file(&tree.path("data/new.txt"), 100, 42);
    tree.set_mtimes(1_700_000_000_000_000_001);
    let second = repo.backup(&tree.dir, Some("pg-prod"));
    assert_eq!(second["parent"], first["id"]);
    assert_eq!(second["bytes_new"], 100, "only new.txt is new: {second}");
    assert_eq!(second["chunks_new"], 1, "{second}");
    assert_eq!(
        second["pages_new"], 0,
        "the renamed file's pages exist: {second}"
    );

    let r2 = tmp.join("restored-2");
    repo.restore("pg-prod@latest", &r2);
    assert_same_tree(&tree.dir, &r2, &[SampleTree::SPARSE], SLACK);
    assert!(!r2.join(SampleTree::BIG).exists());

    // A restore never overwrites.
    let (_, _, err) = run_fail(repo.cmd("restore").arg("pg-prod@latest").arg(&r2));
    assert!(err.contains("already exists"), "{err}");

    let points = points_of(repo);
    assert_eq!(points.len(), 2);
    assert_eq!(points[1]["kind"], "tree");
    assert_eq!(points[1]["entries"], second["entries"]);
    let table = run_ok(&mut repo.cmd("points"));
    assert!(table.contains(" tree "), "{table}");
    let verify = run_ok(&mut repo.cmd("verify"));
    assert!(verify.contains(": ok"), "{verify}");

    // Forget the first point: the second uses every chunk and page it did
    // (the renamed file's included), so gc frees nothing, and the second
    // still restores exactly.
    run_ok(repo.cmd("forget").arg(first["id"].as_str().unwrap()));
    let gc: serde_json::Value =
        serde_json::from_str(&run_ok(repo.cmd("gc").args(["--json", "--grace", "0s"]))).unwrap();
    assert_eq!(gc["chunks_removed"], 0, "{gc}");
    assert_eq!(gc["pages_removed"], 0, "{gc}");
    let r3 = tmp.join("restored-3");
    repo.restore("pg-prod@latest", &r3);
    assert_same_tree(&tree.dir, &r3, &[SampleTree::SPARSE], SLACK);
    let verify = run_ok(&mut repo.cmd("verify"));
    assert!(verify.contains(": ok"), "{verify}");
}

/// A tree of 400 small files in 20 folders and one 8 MiB file; returns its
/// total size.
fn many_files(dir: &Path) -> u64 {
    let mut total = 0;
    for folder in 0..20u64 {
        let d = dir.join(format!("base/{}", 16384 + folder));
        fs::create_dir_all(&d).unwrap();
        for file in 0..20u64 {
            let len = 8192 * (1 + (folder + file) % 4) as usize;
            random_file(
                &d.join(format!("{}", 1000 + file)),
                len,
                folder * 100 + file,
            );
            total += len as u64;
        }
    }
    random_file(&dir.join("big"), 8 * MIB as usize, 7);
    total + 8 * MIB
}

#[test]
fn a_tree_that_changed_little_stores_little() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = TestRepo::local(tmp.path());
    repo.init();
    let dir = tmp.path().join("db");
    let size = many_files(&dir);
    let first = repo.backup(&dir, None);
    assert_eq!(first["kind"], "tree");
    assert_eq!(first["vm"], "db");
    assert!(
        first["bytes_new"].as_u64().unwrap() >= size - MIB,
        "{first}"
    );
    assert_eq!(first["counts"]["files"], 401, "{first}");

    // Three small files rewritten, one 1 MiB block of the big file, one
    // file removed: four new chunks.
    for (folder, file) in [(0, 0), (7, 3), (19, 19)] {
        let path = dir.join(format!("base/{}/{}", 16384 + folder, 1000 + file));
        let len = fs::metadata(&path).unwrap().len() as usize;
        random_file(&path, len, 9000 + folder);
    }
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new()
            .write(true)
            .open(dir.join("big"))
            .unwrap();
        f.write_all_at(&[0xa5u8; 4096], 3 * MIB + 100).unwrap();
    }
    fs::remove_file(dir.join("base/16390/1005")).unwrap();
    let second = repo.backup(&dir, None);
    let new = second["bytes_new"].as_u64().unwrap();
    assert_eq!(second["chunks_new"], 4, "{second}");
    assert!(new <= 3 * 32768 + MIB, "{second}");
    assert!(new * 8 < size, "{new} new bytes of {size}");

    let restored = tmp.path().join("restored");
    repo.restore("db@latest", &restored);
    assert_same_tree(&dir, &restored, &[], 0);
}
