//! Acceptance: a database host without NFS attaches a restore point's disk
//! as a file with `nbdfuse` and loop-mounts the ext4 file system on it; a
//! file inside reads back with its original hash.

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use super::repo_objects;
use crate::support::client::run_tool_for;
use crate::support::nbd::*;
use crate::support::server::{ReviveServer, ServerSpec};
use crate::support::*;

/// Mounts the export with nbdfuse, loop-mounts it read-only, prints the
/// hash of `known.bin` and the listing, unmounts. Runs in private mount and
/// pid namespaces (`unshare`): the host never sees the mounts, and nothing
/// outlives the script.
const SCRIPT: &str = r#"
set -eu
M=$1
URL=$2
mkdir -p "$M/fuse" "$M/mnt"
nbdfuse -P "$M/pid" "$M/fuse" "$URL" &
i=0
while [ ! -s "$M/pid" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
[ -s "$M/pid" ] || { echo "nbdfuse did not start" >&2; exit 1; }
mount -o loop,ro "$M/fuse/nbd" "$M/mnt"
echo "HASH $(sha256sum "$M/mnt/known.bin" | cut -d' ' -f1)"
ls "$M/mnt"
umount "$M/mnt"
fusermount3 -u "$M/fuse" 2>/dev/null || umount "$M/fuse"
wait
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdfuse_and_a_loop_mount_read_a_file_of_a_backed_up_ext4_image() {
    if !nbd_peers_or_skip() {
        return;
    }
    if !have_tool("mkfs.ext4") || !have_tool("unshare") || !have_tool("fusermount3") {
        skip_missing_peer("e2fsprogs (mkfs.ext4), util-linux (unshare) or fuse3 (fusermount3)");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let content = tmp.path().join("content");
    std::fs::create_dir(&content).expect("mkdir");
    let mut known = vec![0u8; 5 << 20];
    StdRng::seed_from_u64(3).fill_bytes(&mut known);
    std::fs::write(content.join("known.bin"), &known).expect("write known");
    std::fs::write(content.join("PG_VERSION"), "15\n").expect("write");
    let image = tmp.path().join("db01.img");
    let made = tool(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-b",
            "4096",
            "-d",
            content.to_str().expect("utf8"),
            image.to_str().expect("utf8"),
            "64M",
        ],
    )
    .await;
    assert!(made.status.success(), "mkfs.ext4: {made:?}");
    let repo = init_repo(tmp.path(), None);
    backup_json(&repo, &image, Some("db01"));
    let repo_before = repo_objects(&repo);
    let server = ReviveServer::start(
        &tmp.path().join("server"),
        ServerSpec::new(&repo).block_export("db01", "db01@latest", None, &["127.0.0.1"]),
    );
    let work = tmp.path().join("work");
    let out = run_tool_for(
        "unshare",
        &[
            "--mount",
            "--propagation",
            "private",
            "--pid",
            "--fork",
            "--kill-child",
            "sh",
            "-c",
            SCRIPT,
            "sh",
            work.to_str().expect("utf8"),
            &server.nbd_url("db01"),
        ],
        std::time::Duration::from_secs(180),
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "nbdfuse + loop mount failed:\n{stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    let expected = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&known));
    assert!(stdout.contains(&format!("HASH {expected}")), "{stdout}");
    assert!(stdout.contains("PG_VERSION"), "{stdout}");
    assert_eq!(repo_objects(&repo), repo_before, "the repository changed");
}
