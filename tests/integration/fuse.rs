//! Issue 12 item 2: `revive mount POINT MOUNTPOINT`, the FUSE frontend, with
//! the kernel's FUSE and real tools: `ls`, `cp`, `sha256sum`, `find
//! -printf`, `stat`, writes through the mount, `fsync` surviving `kill -9`,
//! the owner mapping, and cleanup after Ctrl-C and after an external
//! `umount`. Each test re-runs itself in private namespaces.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::fuse::*;
use crate::support::vm::SampleVm;
use crate::support::{backup_json, in_netns, init_repo, run_ok, sha256_file, snapshot_tree};

const RUN_TIMEOUT: Duration = Duration::from_secs(300);
const MIB: u64 = 1 << 20;

/// A repository with one backed-up sample VM.
struct Lab {
    tmp: tempfile::TempDir,
    repo: PathBuf,
    vm: SampleVm,
    point: String,
}

impl Lab {
    fn new() -> Lab {
        let tmp = tempfile::tempdir().expect("tempdir");
        let repo = init_repo(tmp.path(), None);
        let vm = SampleVm::create(&tmp.path().join("src"), "web01", 24 * MIB, 7);
        let point = backup_json(&repo, &vm.dir, None)["id"]
            .as_str()
            .expect("id")
            .to_string();
        Lab {
            tmp,
            repo,
            vm,
            point,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }
}

/// `sh -c SCRIPT`'s stdout.
fn sh(script: &str) -> String {
    run_ok(Command::new("sh").arg("-c").arg(script))
}

/// Work folders a `revive mount` without `--cache` keeps its state and
/// write cache in (in its TMPDIR).
fn work_folders(m: &MountProcess) -> Vec<PathBuf> {
    std::fs::read_dir(&m.tmp)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with("revive-mount-"))
                })
                .collect()
        })
        .unwrap_or_default()
}

const READ_DONE: &str = "FUSE-READ-CHECKS-PASSED";

/// Browsing and copying out: the same names, sizes and bytes as the backed
/// up folder (ls, cp, sha256sum, find -printf), the owner mapping of --uid,
/// and after Ctrl-C no mount and no work folder; the repository unchanged.
#[tokio::test]
async fn mount_shows_the_backup_and_cleans_up_after_ctrl_c() {
    if in_netns() {
        return read_inner();
    }
    if !fuse_peers_or_skip() {
        return;
    }
    rerun_isolated(
        "fuse::mount_shows_the_backup_and_cleans_up_after_ctrl_c",
        READ_DONE,
        RUN_TIMEOUT,
    )
    .await;
}

fn read_inner() {
    let lab = Lab::new();
    let repo_before = snapshot_tree(&lab.repo);
    let mnt = lab.path("mnt");
    let mut m = MountProcess::start(&lab.repo, "web01@latest", &mnt, &[]);
    assert_eq!(m.announced["point"], lab.point.as_str());
    assert!(is_mounted(&mnt));
    // Every entry once, `.` and `..` included (`ls -f`: unsorted, all).
    let listed = sh(&format!("ls -1f {}", mnt.display()));
    let mut names: Vec<&str> = listed.lines().collect();
    names.sort();
    let mut expected: Vec<String> = std::fs::read_dir(&lab.vm.dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let mut with_dots = expected.clone();
    with_dots.extend([".".to_string(), "..".to_string()]);
    with_dots.sort();
    assert_eq!(names, with_dots);
    expected.sort();
    // sha256sum through the kernel, and cp out of the mount.
    for name in &expected {
        let through = sh(&format!("sha256sum {}/{name}", mnt.display()));
        let original = sha256_file(&lab.vm.dir.join(name));
        assert!(through.starts_with(&original), "{name}: {through}");
    }
    let out = lab.path("copied");
    sh(&format!("cp -r {} {}", mnt.display(), out.display()));
    for name in &expected {
        assert_eq!(
            sha256_file(&out.join(name)),
            sha256_file(&lab.vm.dir.join(name))
        );
    }
    // Metadata as find sees it: kind, mode, size; folder first.
    let listing = sh(&format!(
        "cd {} && find . -printf '%p %y %m %s %U %G\\n' | sort",
        mnt.display()
    ));
    let disk = format!("web01-flat.vmdk f 600 {} 0 0", 24 * MIB);
    assert!(listing.starts_with(". d 755"), "{listing}");
    assert!(listing.contains(&format!("./{disk}")), "{listing}");
    assert!(listing.contains("./web01.vmx f 644"), "{listing}");
    // statfs answers with the real figures of where writes land.
    let df = sh(&format!("stat -f -c '%b %a' {}", mnt.display()));
    assert!(!df.starts_with("0 "), "{df}");
    assert_eq!(work_folders(&m).len(), 1, "a work folder while mounted");
    assert!(m.interrupt().success(), "{}", m.log_text());
    assert!(!is_mounted(&mnt), "unmounted after Ctrl-C");
    let left = work_folders(&m);
    assert!(
        left.is_empty(),
        "work folder removed: {left:?}\n{}",
        m.log_text()
    );

    // --uid / --gid: every file shown as that owner.
    let mut m = MountProcess::start(
        &lab.repo,
        &lab.point,
        &mnt,
        &["--uid", "4242", "--gid", "4343"],
    );
    let owners = sh(&format!("stat -c '%u:%g' {0} {0}/web01.vmx", mnt.display()));
    assert_eq!(owners, "4242:4343\n4242:4343\n");
    assert!(m.interrupt().success());
    assert_eq!(
        snapshot_tree(&lab.repo),
        repo_before,
        "repository untouched"
    );
    println!("{READ_DONE}");
}

const WRITE_DONE: &str = "FUSE-WRITE-CHECKS-PASSED";

/// Writes through the mount land in the write cache: create, write, mkdir,
/// rename, remove, truncate, chmod, as tools do them. With --cache they
/// survive a remount; what was fsynced survives `kill -9` of revive mount
/// (the dead mount is detached); an external `umount` ends the command
/// cleanly. The repository never changes.
#[tokio::test]
async fn writes_land_in_the_write_cache_and_fsync_survives_kill_9() {
    if in_netns() {
        return write_inner();
    }
    if !fuse_peers_or_skip() {
        return;
    }
    rerun_isolated(
        "fuse::writes_land_in_the_write_cache_and_fsync_survives_kill_9",
        WRITE_DONE,
        RUN_TIMEOUT,
    )
    .await;
}

fn write_inner() {
    let lab = Lab::new();
    let repo_before = snapshot_tree(&lab.repo);
    let mnt = lab.path("mnt");
    let cache = lab.path("kept-cache");
    let cache_arg = cache.to_string_lossy().into_owned();
    let mut m = MountProcess::start(&lab.repo, &lab.point, &mnt, &["--cache", &cache_arg]);
    assert_eq!(m.announced["cache"], cache_arg.as_str());
    let d = mnt.display();
    sh(&format!(
        "set -e; mkdir -p {d}/sub/deeper; printf hello > {d}/sub/a.txt; \
         mv {d}/sub/a.txt {d}/sub/deeper/b.txt; rm {d}/vmware.log; \
         truncate -s 1000 {d}/web01.nvram; chmod 0700 {d}/sub; \
         dd if=/dev/urandom of={d}/big bs=1M count=8 status=none conv=fsync; \
         dd if=/dev/zero of={d}/web01-flat.vmdk bs=4096 seek=100 count=3 conv=notrunc,fsync status=none; \
         sync {d}/sub/deeper/b.txt {d}/web01.nvram"
    ));
    let expect = |listing: &str| {
        assert!(listing.contains("./sub d 700"), "{listing}");
        assert!(listing.contains("./sub/deeper/b.txt f 644 5"), "{listing}");
        assert!(listing.contains("./web01.nvram f 644 1000"), "{listing}");
        assert!(
            listing.contains(&format!("./big f 644 {}", 8 * MIB)),
            "{listing}"
        );
        assert!(!listing.contains("vmware.log"), "{listing}");
        assert!(!listing.contains("a.txt"), "{listing}");
    };
    let find = format!("cd {d} && find . -printf '%p %y %m %s\\n' | sort");
    expect(&sh(&find));
    let sums = |dir: &Path| -> BTreeMap<String, String> {
        ["big", "web01-flat.vmdk", "web01.nvram", "sub/deeper/b.txt"]
            .iter()
            .map(|n| (n.to_string(), sha256_file(&dir.join(n))))
            .collect()
    };
    let written = sums(&mnt);
    assert_ne!(
        written["web01-flat.vmdk"],
        sha256_file(&lab.vm.dir.join("web01-flat.vmdk"))
    );

    // kill -9: the mount is left dead; what was fsynced is in the cache.
    m.kill9();
    let dead = std::fs::metadata(&mnt).expect_err("a dead mount answers ENOTCONN");
    assert_eq!(dead.raw_os_error(), Some(libc::ENOTCONN), "{dead}");
    revive::fuse::lazy_unmount(&mnt).expect("detach the dead mount");
    assert!(!is_mounted(&mnt));
    let mut m = MountProcess::start(&lab.repo, &lab.point, &mnt, &["--cache", &cache_arg]);
    expect(&sh(&find));
    assert_eq!(sums(&mnt), written, "fsynced writes survive kill -9");

    // An external umount ends the command cleanly; the kept cache stays.
    sh(&format!("umount {d}"));
    assert!(
        m.wait(Duration::from_secs(30)).success(),
        "{}",
        m.log_text()
    );
    assert!(cache.join("state").is_dir(), "the kept cache stays");
    let mut m = MountProcess::start(&lab.repo, &lab.point, &mnt, &["--cache", &cache_arg]);
    assert_eq!(sums(&mnt), written, "writes survive a clean remount");
    assert!(m.interrupt().success());

    // Without --cache, writes go with the mount.
    let mut m = MountProcess::start(&lab.repo, &lab.point, &mnt, &[]);
    assert!(!mnt.join("big").exists());
    assert_eq!(
        sha256_file(&mnt.join("web01-flat.vmdk")),
        sha256_file(&lab.vm.dir.join("web01-flat.vmdk"))
    );
    assert!(m.interrupt().success());
    // A cache of another point is refused with a message naming both.
    let other = SampleVm::create(&lab.path("src2"), "db01", 2 * MIB, 9);
    backup_json(&lab.repo, &other.dir, None);
    let repo_after_second_backup = snapshot_tree(&lab.repo);
    let out = crate::support::run(
        crate::support::revive()
            .arg("mount")
            .arg("--repo")
            .arg(&lab.repo)
            .arg("db01@latest")
            .arg(&mnt)
            .arg("--cache")
            .arg(&cache),
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&lab.point) && err.contains("--cache"), "{err}");
    assert!(!is_mounted(&mnt));
    // Only the second backup changed the repository; no session wrote to it.
    let mut before = repo_before;
    before.retain(|p, _| !p.to_string_lossy().contains("/pins/"));
    let mut after = repo_after_second_backup;
    after.retain(|p, _| before.contains_key(p));
    assert_eq!(after, before, "existing repository objects untouched");
    println!("{WRITE_DONE}");
}
