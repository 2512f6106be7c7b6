//! A btrfs file system made by the test: an image file, `mkfs.btrfs`,
//! mounted with `mount -o loop` inside the test's private mount namespace
//! ([`rerun_private_mounts`]), so the mount and its loop device go away with
//! the test whatever happens. Subvolumes are datastores of VM folders, their
//! read-only snapshots what VMs are recovered from.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{have_tool, skip_missing_peer};

/// True when mkfs.btrfs, btrfs, mount and unshare are there; else a skip
/// (a failure under CI).
pub fn btrfs_or_skip() -> bool {
    let ok = have_tool("mkfs.btrfs") && have_tool("btrfs") && have_tool("unshare");
    if !ok {
        skip_missing_peer(
            "btrfs-progs (mkfs.btrfs, btrfs) or unshare (scripts/install-test-deps.sh)",
        );
    }
    ok
}

/// Re-runs test `test` of this binary in private mount and pid namespaces:
/// loop mounts, revive and every peer it started die with it. Checks that
/// it passed and printed `done`.
pub async fn rerun_private_mounts(test: &str, done: &str, timeout: Duration) {
    let stdout = super::rerun_unshared(
        &["--mount", "--pid", "--fork", "--kill-child", "--mount-proc"],
        test,
        &["--include-ignored", "--nocapture", "--test-threads=1"],
        done,
        timeout,
    )
    .await;
    print!("{stdout}");
}

/// Runs a command that must succeed; returns its stdout.
pub fn sh(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A mounted btrfs file system.
pub struct BtrfsPool {
    /// Where its top level is mounted.
    pub mnt: PathBuf,
}

impl BtrfsPool {
    /// Makes a `size` (e.g. "1G") file system in `dir/pool.img` and mounts it
    /// at `dir/mnt`. Call only inside a private mount namespace.
    pub fn create(dir: &Path, size: &str) -> BtrfsPool {
        std::fs::create_dir_all(dir).expect("mkdir");
        let image = dir.join("pool.img");
        let mnt = dir.join("mnt");
        std::fs::create_dir_all(&mnt).expect("mkdir mnt");
        let image_s = image.to_str().expect("utf8");
        sh("truncate", &["-s", size, image_s]);
        sh("mkfs.btrfs", &["-q", image_s]);
        sh(
            "mount",
            &["-o", "loop", image_s, mnt.to_str().expect("utf8")],
        );
        BtrfsPool { mnt }
    }

    fn path(&self, rel: &str) -> String {
        self.mnt.join(rel).to_str().expect("utf8").to_string()
    }

    /// Creates subvolume `rel` (its parent folders too); returns its path.
    pub fn subvolume(&self, rel: &str) -> PathBuf {
        if let Some(parent) = self.mnt.join(rel).parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        sh("btrfs", &["subvolume", "create", &self.path(rel)]);
        self.mnt.join(rel)
    }

    /// Takes read-only snapshot `to` of subvolume `from`; returns its path.
    pub fn snapshot(&self, from: &str, to: &str) -> PathBuf {
        if let Some(parent) = self.mnt.join(to).parent() {
            std::fs::create_dir_all(parent).expect("mkdir");
        }
        sh(
            "btrfs",
            &[
                "subvolume",
                "snapshot",
                "-r",
                &self.path(from),
                &self.path(to),
            ],
        );
        self.mnt.join(to)
    }

    /// `(id, path)` of every subvolume, as `btrfs subvolume list` shows them.
    pub fn subvolumes(&self) -> Vec<(u64, String)> {
        sh("btrfs", &["subvolume", "list", &self.path("")])
            .lines()
            .filter_map(|l| {
                let id = l.split_whitespace().nth(1)?.parse().ok()?;
                let path = l.split(" path ").nth(1)?.to_string();
                Some((id, path))
            })
            .collect()
    }

    /// Subvolumes that are revive's clones (`.revive-clones/revive-clone-*`).
    pub fn clones(&self) -> Vec<(u64, String)> {
        self.subvolumes()
            .into_iter()
            .filter(|(_, p)| p.contains("revive-clone-"))
            .collect()
    }

    /// `[[snapshot_source]] name = NAME, provider = "btrfs"` over this pool,
    /// with `extra` lines.
    pub fn source_toml(&self, name: &str, extra: &str) -> String {
        format!(
            "\n[[snapshot_source]]\nname = {name:?}\nprovider = \"btrfs\"\npath = {:?}\n{extra}\n",
            self.mnt.to_str().expect("utf8")
        )
    }
}

impl Drop for BtrfsPool {
    fn drop(&mut self) {
        // The namespace's end would do it too; a lazy unmount frees the
        // loop device as soon as nothing uses the file system.
        let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
    }
}
