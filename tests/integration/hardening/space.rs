//! Item 3: a full write cache. The first write that did not fit got
//! NFS3ERR_NOSPC, but an overwrite that needed journal space failed with
//! NFS3ERR_IO, the file then refused every write until a restart (even
//! after space was freed), and the failed overwrite's bytes were visible
//! and survived `kill -9`. FSSTAT described `cache_root`'s file system,
//! not the publication's own cache location.
//!
//! The write cache lives on a small file system (tmpfs, and ext4 on a loop
//! device) mounted inside a private mount namespace: the test re-runs
//! itself under `unshare --mount` (as root), so the host never sees it.

use std::path::Path;
use std::process::Command;

use nfs3_client::nfs3_types::nfs3::{self, nfs_fh3, nfsstat3, stable_how, Nfs3Result};
use nfs3_client::nfs3_types::xdr_codec::Opaque;

use super::is_root;
use crate::datastore::{apply, Fixture, MIB};
use crate::support::client::*;
use crate::support::{in_netns, rerun_unshared, skip_missing_peer};

const DONE: &str = "FULL-WRITE-CACHE-CHECKS-PASSED";

/// The file system under the publication's write cache.
#[derive(Clone, Copy, Debug)]
enum SmallFs {
    Tmpfs,
    Ext4,
}

/// On tmpfs, space runs out at the write that needs a page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_write_cache_on_tmpfs_answers_nospc_and_recovers() {
    run_isolated(
        "hardening::space::full_write_cache_on_tmpfs_answers_nospc_and_recovers",
        SmallFs::Tmpfs,
    )
    .await;
}

/// On ext4 (delayed allocation), space runs out when a write's blocks
/// cannot be reserved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_write_cache_on_ext4_answers_nospc_and_recovers() {
    run_isolated(
        "hardening::space::full_write_cache_on_ext4_answers_nospc_and_recovers",
        SmallFs::Ext4,
    )
    .await;
}

async fn run_isolated(test: &str, fs: SmallFs) {
    if in_netns() {
        full_write_cache(fs).await;
        println!("{DONE}");
        return;
    }
    if !is_root() || !crate::support::have_tool("unshare") {
        skip_missing_peer("root and unshare (to mount a small file system for the write cache)");
        return;
    }
    let out = rerun_unshared(
        &["--mount"],
        test,
        &["--nocapture", "--test-threads=1"],
        DONE,
        std::time::Duration::from_secs(300),
    )
    .await;
    for line in out.lines().filter(|l| l.contains("filled with")) {
        eprintln!("{line}");
    }
}

fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
}

/// Mounts a small file system of `fs` kind at `dir` (in this private
/// mount namespace).
fn mount_small(fs: SmallFs, dir: &Path, image: &Path) {
    std::fs::create_dir_all(dir).expect("mount point");
    let d = dir.to_str().expect("utf8");
    match fs {
        SmallFs::Tmpfs => sh("mount", &["-t", "tmpfs", "-o", "size=24m", "tmpfs", d]),
        SmallFs::Ext4 => {
            let img = image.to_str().expect("utf8");
            sh("truncate", &["-s", "40M", img]);
            sh("mkfs.ext4", &["-q", "-F", "-m", "0", img]);
            sh("mount", &["-o", "loop", img, d]);
        }
    }
}

/// `statvfs` of `path`: (total bytes, available bytes).
fn statvfs(path: &Path) -> (u64, u64) {
    let c = std::ffi::CString::new(path.to_str().expect("utf8")).expect("cstring");
    // SAFETY: a zeroed statvfs is a valid out buffer; `c` is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0, "statvfs");
    let frsize = st.f_frsize as u64;
    (st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize)
}

/// A WRITE's status.
async fn try_write(
    c: &mut Client,
    fh: &nfs_fh3,
    offset: u64,
    data: &[u8],
    stable: stable_how,
) -> Result<(), nfsstat3> {
    let res = c
        .write(&nfs3::WRITE3args {
            file: fh.clone(),
            offset,
            count: data.len() as u32,
            stable,
            data: Opaque::borrowed(data),
        })
        .await
        .expect("write rpc");
    match res {
        Nfs3Result::Ok(ok) => {
            assert_eq!(ok.count as usize, data.len(), "short write");
            Ok(())
        }
        Nfs3Result::Err((stat, _)) => Err(stat),
    }
}

/// FSSTAT of the file system holding `fh`: (total, available) bytes.
async fn fsstat(c: &mut Client, fh: &nfs_fh3) -> (u64, u64) {
    match c
        .fsstat(&nfs3::FSSTAT3args { fsroot: fh.clone() })
        .await
        .expect("fsstat rpc")
    {
        Nfs3Result::Ok(ok) => (ok.tbytes, ok.abytes),
        Nfs3Result::Err((stat, _)) => panic!("FSSTAT: {stat:?}"),
    }
}

/// Writes `chunk`-sized pieces of `file` FILE_SYNC until the server says
/// NOSPC (any other error fails the test); returns the bytes taken.
async fn fill(c: &mut Client, file: &nfs_fh3, mut offset: u64, chunk: usize) -> u64 {
    let start = offset;
    loop {
        let data = pattern(chunk, offset + 3);
        match try_write(c, file, offset, &data, stable_how::FILE_SYNC).await {
            Ok(()) => offset += chunk as u64,
            Err(nfsstat3::NFS3ERR_NOSPC) => return offset - start,
            Err(other) => panic!("filling write at {offset}: {other:?}, not NOSPC"),
        }
        assert!(
            offset - start < 256 * MIB,
            "the small file system never filled"
        );
    }
}

async fn full_write_cache(fs: SmallFs) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let small = tmp.path().join("small");
    mount_small(fs, &small, &tmp.path().join("small.img"));
    let cache = small.join("restore");
    let mut f = Fixture::with("space01", 8 * MIB, 86, |s| s.cache_in(&cache));
    let mut expect = f.disk();
    let (mut c, _, folder) = f.mount().await;

    // FSSTAT describes the publication's own cache location.
    let (total, _) = fsstat(&mut c, &folder).await;
    assert_eq!(total, statvfs(&small).0, "FSSTAT total bytes of {fs:?}");

    let disk = lookup(&mut c, &folder, &f.disk_name()).await.expect("disk");
    let head = pattern(256 * 1024, 1);
    write(&mut c, &disk, 0, &head, stable_how::FILE_SYNC).await;
    apply(&mut expect, 0, &head);

    // Fill the file system through a file the client creates.
    let filler = create(&mut c, &folder, "filler.bin").await.expect("create");
    let big = fill(&mut c, &filler, 0, MIB as usize).await;
    let small_writes = fill(&mut c, &filler, big, 4096).await;
    assert!(big > 4 * MIB, "only {big} bytes fitted on {fs:?}");
    println!("{fs:?}: filled with {big} + {small_writes} bytes");
    let (_, avail) = fsstat(&mut c, &folder).await;
    assert!(avail < MIB, "FSSTAT still shows {avail} bytes available");

    // Overwrites of blocks the cache holds need no new space: each is
    // answered OK and durable, even once the journal cannot grow.
    for i in 0..48u64 {
        let data = pattern(64 * 1024, 100 + i);
        let offset = (i % 4) * 64 * 1024;
        let got = try_write(&mut c, &disk, offset, &data, stable_how::FILE_SYNC).await;
        assert_eq!(
            got,
            Ok(()),
            "overwrite {i} of cached blocks on a full {fs:?}"
        );
        apply(&mut expect, offset, &data);
    }
    // A write over cached and new blocks does not fit: NOSPC, and none of
    // its bytes become visible, stable or not.
    let wide = pattern(MIB as usize, 7);
    for stable in [stable_how::FILE_SYNC, stable_how::UNSTABLE] {
        let got = try_write(&mut c, &disk, 0, &wide, stable).await;
        assert_eq!(
            got,
            Err(nfsstat3::NFS3ERR_NOSPC),
            "{stable:?} write that does not fit"
        );
    }
    let got = read_all(&mut c, &disk, 0, 2 * MIB).await.expect("read");
    assert!(
        got[..] == expect[..2 * MIB as usize],
        "a refused write is visible"
    );

    // kill -9 and restart: the acknowledged overwrites are there, the
    // refused write is not.
    drop(c);
    f.server.kill9();
    f.server.restart();
    let (mut c, _, folder) = f.mount().await;
    let disk = lookup(&mut c, &folder, &f.disk_name()).await.expect("disk");
    let got = read_all(&mut c, &disk, 0, 2 * MIB).await.expect("read");
    assert!(got[..] == expect[..2 * MIB as usize], "after kill -9");

    // Once space is freed, the same file takes new blocks again.
    remove(&mut c, &folder, "filler.bin")
        .await
        .expect("remove filler");
    let (_, avail) = fsstat(&mut c, &folder).await;
    assert!(
        avail > 4 * MIB,
        "removing the filler freed only {avail} bytes"
    );
    for stable in [stable_how::FILE_SYNC, stable_how::UNSTABLE] {
        let got = try_write(&mut c, &disk, 0, &wide, stable).await;
        assert_eq!(got, Ok(()), "{stable:?} write after space was freed");
    }
    apply(&mut expect, 0, &wide);
    let tail = pattern(3 * MIB as usize, 8);
    write(&mut c, &disk, 4 * MIB, &tail, stable_how::UNSTABLE).await;
    commit(&mut c, &disk).await;
    apply(&mut expect, 4 * MIB, &tail);
    let got = read_all(&mut c, &disk, 0, expect.len() as u64)
        .await
        .expect("read");
    assert_eq!(
        sha256(&got),
        sha256(&expect),
        "the disk after space was freed"
    );
    drop(c);
    f.assert_repo_untouched();
    sh("umount", &[small.to_str().expect("utf8")]);
}
