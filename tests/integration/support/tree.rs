//! Sample folder trees with everything a tree backup must keep (empty files
//! and folders, nesting, symlinks of every sort, modes, owners, ns mtimes, a
//! large sparse file), and the comparisons that prove a restore exact:
//! `find -printf` listings, per-file SHA-256, mtimes, allocated blocks.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{lchown, symlink, FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use super::{run_ok, sha256_file};

const MIB: u64 = 1 << 20;

/// True when the tests run as root (owners can be set and restored).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Writes `len` seeded random bytes to `path`.
pub fn random_file(path: &Path, len: usize, seed: u64) {
    let mut data = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    fs::write(path, data).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Sets a path's mtime to `ns` nanoseconds since the epoch, not following a
/// symlink.
pub fn set_mtime(path: &Path, ns: i64) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let t = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: ns.div_euclid(1_000_000_000),
            tv_nsec: ns.rem_euclid(1_000_000_000),
        },
    ];
    // SAFETY: NUL-terminated path, two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            t.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(r, 0, "utimensat {}", path.display());
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// A folder tree on disk, shaped like a small PostgreSQL data folder plus
/// every awkward case.
pub struct SampleTree {
    /// The root folder.
    pub dir: PathBuf,
}

impl SampleTree {
    /// Relative path of the 5 MiB random file the rename tests move.
    pub const BIG: &'static str = "data/big-random";
    /// Relative path of the 64 MiB sparse file.
    pub const SPARSE: &'static str = "sparse.img";

    /// Creates the tree at `parent/name`.
    pub fn create(parent: &Path, name: &str, seed: u64) -> SampleTree {
        let dir = parent.join(name);
        let p = |rel: &str| dir.join(rel);
        for d in [
            "base/1",
            "base/16384",
            "global",
            "emptydir",
            "pg_notify",
            "a/b/c/d",
            "private",
            "readonly",
            "shared",
            "tmp",
            "data",
        ] {
            fs::create_dir_all(p(d)).unwrap();
        }
        fs::write(p("PG_VERSION"), "15\n").unwrap();
        random_file(&p("base/1/1259"), 8192, seed);
        random_file(&p("base/1/1249"), 16384, seed + 1);
        random_file(&p("base/16384/2608"), 24576, seed + 2);
        // Two identical files: one chunk.
        random_file(&p("base/16384/2609"), 8192, seed);
        random_file(&p("global/pg_control"), 8192, seed + 3);
        fs::write(p("empty"), b"").unwrap();
        fs::write(p("base/1/empty_relation"), b"").unwrap();
        fs::write(p("a/b/c/d/deep.txt"), b"deep inside\n").unwrap();
        fs::write(p("private/secret"), b"s3cr3t\n").unwrap();
        fs::write(p("script.sh"), b"#!/bin/sh\necho revive\n").unwrap();
        fs::write(p("readonly/ro.txt"), b"read only\n").unwrap();
        random_file(&p(Self::BIG), 5 * MIB as usize, seed + 4);
        // Sparse: 64 MiB with data at the start, in the middle and at the end.
        let sparse = File::create(p(Self::SPARSE)).unwrap();
        sparse.set_len(64 * MIB).unwrap();
        sparse.write_all_at(b"start of the sparse file", 0).unwrap();
        sparse
            .write_all_at(&[7u8; 100_000], 31 * MIB + 12345)
            .unwrap();
        sparse.write_all_at(b"end", 64 * MIB - 3).unwrap();
        drop(sparse);
        symlink("a/b/c/d/deep.txt", p("rel-link")).unwrap();
        symlink("/etc/hostname", p("abs-link")).unwrap();
        symlink("no/such/file", p("dangling")).unwrap();
        symlink("../../private", p("a/b/up-link")).unwrap();
        symlink("a/b", p("dir-link")).unwrap();

        for (rel, mode) in [
            ("PG_VERSION", 0o600),
            ("base/1/1259", 0o600),
            ("private/secret", 0o600),
            ("script.sh", 0o755),
            ("readonly/ro.txt", 0o444),
            ("empty", 0o640),
        ] {
            chmod(&p(rel), mode);
        }
        if is_root() {
            for rel in ["base", "base/1", "base/1/1259", "base/1/1249", "PG_VERSION"] {
                std::os::unix::fs::chown(p(rel), Some(1234), Some(5678)).unwrap();
            }
            std::os::unix::fs::chown(p("private/secret"), Some(4321), Some(8765)).unwrap();
            lchown(p("rel-link"), Some(1111), Some(2222)).unwrap();
        }
        // Folders' modes last: a read-only folder refuses new entries.
        for (rel, mode) in [
            ("private", 0o700),
            ("pg_notify", 0o700),
            ("shared", 0o2775),
            ("tmp", 0o1777),
            ("readonly", 0o555),
        ] {
            chmod(&p(rel), mode);
        }
        let tree = SampleTree { dir };
        tree.set_mtimes(1_600_000_000_123_456_789);
        tree
    }

    /// Gives every entry a distinct mtime with nanoseconds (folders last,
    /// deepest first, so setting one does not disturb another).
    pub fn set_mtimes(&self, base_ns: i64) {
        let mut paths = find_paths(&self.dir);
        paths.sort();
        paths.reverse();
        for (i, rel) in paths.iter().enumerate() {
            let path = if rel.is_empty() {
                self.dir.clone()
            } else {
                self.dir.join(rel)
            };
            set_mtime(&path, base_ns + i as i64 * 1_000_000_007);
        }
    }

    /// A path in the tree.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }
}

/// Every path under `dir` relative to it (`""` for `dir`), from `find`.
fn find_paths(dir: &Path) -> Vec<String> {
    let out = run_ok(Command::new("find").arg(dir).args(["-printf", "%P\\n"]));
    out.lines().map(str::to_string).collect()
}

/// `find DIR -printf '%P %y %m %s %l %U %G'`, sorted: path, type, mode,
/// size, symlink target, owner. A folder's size is left out (`-`): it
/// depends on the file system's history, not on what the folder holds.
pub fn find_listing(dir: &Path) -> Vec<String> {
    let out = run_ok(Command::new("find").arg(dir).args([
        "(",
        "-type",
        "d",
        "-printf",
        "%P %y %m - %l %U %G\\n",
        ")",
        "-o",
        "-printf",
        "%P %y %m %s %l %U %G\\n",
    ]));
    let mut lines: Vec<String> = out.lines().map(str::to_string).collect();
    lines.sort();
    lines
}

/// Every entry's mtime with nanoseconds (`find -printf '%P %T@'`), by path.
pub fn mtimes(dir: &Path) -> BTreeMap<String, String> {
    let out = run_ok(Command::new("find").arg(dir).args(["-printf", "%P %T@\\n"]));
    out.lines()
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(p, t)| (p.to_string(), t.to_string()))
        .collect()
}

/// SHA-256 of every regular file under `dir`, by relative path.
pub fn file_hashes(dir: &Path) -> BTreeMap<String, String> {
    let out = run_ok(
        Command::new("find")
            .arg(dir)
            .args(["-type", "f", "-printf", "%P\\n"]),
    );
    out.lines()
        .map(|rel| (rel.to_string(), sha256_file(&dir.join(rel))))
        .collect()
}

/// Bytes allocated on disk for a file.
pub fn allocated(path: &Path) -> u64 {
    fs::metadata(path).unwrap().blocks() * 512
}

/// Asserts that `restored` is `source` exactly: listing, contents, mtimes,
/// and `sparse` (relative paths) no more allocated than in the source plus
/// `slack` bytes.
pub fn assert_same_tree(source: &Path, restored: &Path, sparse: &[&str], slack: u64) {
    assert_eq!(
        find_listing(restored),
        find_listing(source),
        "find listing of {} vs {}",
        restored.display(),
        source.display()
    );
    assert_eq!(file_hashes(restored), file_hashes(source), "file contents");
    assert_eq!(mtimes(restored), mtimes(source), "mtimes");
    for rel in sparse {
        let (src, dst) = (allocated(&source.join(rel)), allocated(&restored.join(rel)));
        assert!(
            dst <= src + slack,
            "{rel}: {dst} bytes allocated after restore, {src} in the source"
        );
    }
}
