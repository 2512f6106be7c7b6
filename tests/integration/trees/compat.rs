//! Old repositories stay readable: the v1 fixture (two VM points written by
//! revive before trees existed) lists, restores, verifies and survives gc
//! next to new tree points. Bad tree input fails with one line naming the
//! path, before anything is stored.

use std::fs;
use std::path::{Path, PathBuf};

use crate::support::moto::TestRepo;
use crate::support::tree::{assert_same_tree, is_root};
use crate::support::vm::SampleVm;
use crate::support::*;

/// The fixture's points: id and the SHA-256 of each file.
const POINTS: [(&str, [(&str, &str); 5]); 2] = [
    (
        "6b12517cd360f4d1",
        [
            (
                "fix01-flat.vmdk",
                "ec0227a807312552580aa19c9d48a1e507c33f500c79a19760bad7e7836d769a",
            ),
            (
                "fix01.nvram",
                "ebe2caecedc0dbae0ef544e5b50e50b3ccea45fc66dffbef1f542a7ded964f74",
            ),
            (
                "fix01.vmdk",
                "38784dc2487bc01e5f5e72bf73a436218d44a189ddd1fa8f2c9fb3ca33b37141",
            ),
            (
                "fix01.vmx",
                "e9616c92fcb00eff9be23200aacc2a12b192fc381c9975f25905dfd2be090ae4",
            ),
            (
                "vmware.log",
                "1852c767609e7551a0feb9f865e96be4cae039a41c3b4fea24d7f46760245b82",
            ),
        ],
    ),
    (
        "6b12517c428004d4",
        [
            (
                "fix01-flat.vmdk",
                "b4e7f138b59e0e9bb63363b793a6b5501cfd2d60b0074f24c76913e02000e039",
            ),
            (
                "fix01.nvram",
                "ebe2caecedc0dbae0ef544e5b50e50b3ccea45fc66dffbef1f542a7ded964f74",
            ),
            (
                "fix01.vmdk",
                "38784dc2487bc01e5f5e72bf73a436218d44a189ddd1fa8f2c9fb3ca33b37141",
            ),
            (
                "fix01.vmx",
                "e9616c92fcb00eff9be23200aacc2a12b192fc381c9975f25905dfd2be090ae4",
            ),
            (
                "vmware.log",
                "dc764599a7010fc7394d7274baf5e49673d82d36747ac7bf8b3da1c1e54fa303",
            ),
        ],
    ),
];

/// A copy of the v1 fixture repository in `tmp/repo`.
pub fn v1_fixture(tmp: &Path) -> TestRepo {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/repo-v1");
    let repo = TestRepo::local(tmp);
    run_ok(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(&src)
            .arg(repo.dir.as_ref().unwrap()),
    );
    repo
}

fn manifests(repo: &TestRepo) -> Vec<(PathBuf, Vec<u8>)> {
    POINTS
        .iter()
        .map(|(id, _)| {
            let p = repo.dir.as_ref().unwrap().join(format!("points/{id}.json"));
            let bytes = fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

fn check_fixture_points(repo: &TestRepo, tmp: &Path, round: &str) {
    for (id, files) in POINTS {
        let dest = tmp.join(format!("{round}-{id}"));
        repo.restore(id, &dest);
        let expected: std::collections::BTreeMap<String, String> = files
            .iter()
            .map(|(n, h)| (n.to_string(), h.to_string()))
            .collect();
        assert_eq!(sha256_dir(&dest), expected, "restore of v1 point {id}");
    }
}

#[test]
fn a_v1_repository_written_before_trees_stays_readable() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = v1_fixture(tmp.path());
    let before = manifests(&repo);
    let points: Vec<serde_json::Value> =
        serde_json::from_str(&run_ok(repo.cmd("points").arg("--json"))).unwrap();
    assert_eq!(points.len(), 2, "{points:?}");
    for p in &points {
        assert_eq!(p["kind"], "vm", "{p}");
        assert_eq!(p["vm"], "fix01");
        assert_eq!(p["files"].as_array().unwrap().len(), 5, "{p}");
    }
    check_fixture_points(&repo, tmp.path(), "old");
    assert!(run_ok(&mut repo.cmd("verify")).contains(": ok"));
    let gc: serde_json::Value =
        serde_json::from_str(&run_ok(repo.cmd("gc").args(["--json", "--grace", "0s"]))).unwrap();
    assert_eq!(gc["chunks_removed"], 0, "{gc}");
    assert_eq!(gc["pages_removed"], 0, "{gc}");

    // New points beside the old ones: a tree (version 2) and a VM folder,
    // which is still written as a version 1 manifest without a `kind`.
    let tree = tmp.path().join("tree");
    fs::create_dir_all(tree.join("sub/empty")).unwrap();
    fs::write(tree.join("sub/file"), b"tree in an old repository\n").unwrap();
    let t = repo.backup(&tree, None);
    assert_eq!(t["kind"], "tree");
    let vm = SampleVm::create(&tmp.path().join("vms"), "new01", 2 << 20, 3);
    let v = repo.backup(&vm.dir, None);
    assert_eq!(v["kind"], "vm");
    let raw = fs::read_to_string(
        repo.dir
            .as_ref()
            .unwrap()
            .join(format!("points/{}.json", v["id"].as_str().unwrap())),
    )
    .unwrap();
    let manifest: serde_json::Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(manifest["format_version"], 1, "{raw}");
    assert!(manifest.get("kind").is_none(), "{raw}");
    assert!(manifest.get("entries").is_none(), "{raw}");

    assert!(run_ok(&mut repo.cmd("verify")).contains(": ok"));
    let gc: serde_json::Value =
        serde_json::from_str(&run_ok(repo.cmd("gc").args(["--json", "--grace", "0s"]))).unwrap();
    assert_eq!(gc["chunks_removed"], 0, "{gc}");
    check_fixture_points(&repo, tmp.path(), "new");
    let restored = tmp.path().join("tree-restored");
    repo.restore(t["id"].as_str().unwrap(), &restored);
    assert_same_tree(&tree, &restored, &[], 0);
    assert_eq!(manifests(&repo), before, "old manifests untouched");
}

/// Runs a failing `revive` command: exit 2, one line on stderr containing
/// `expect`, the repository unchanged.
fn refused(repo: &TestRepo, cmd: &mut std::process::Command, expect: &[&str]) {
    let snapshot = snapshot_tree(repo.dir.as_ref().unwrap());
    let (code, _, stderr) = run_fail(cmd);
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "one line: {stderr}");
    for e in expect {
        assert!(stderr.contains(e), "expected {e:?} in {stderr}");
    }
    assert_eq!(
        snapshot_tree(repo.dir.as_ref().unwrap()),
        snapshot,
        "repository changed"
    );
}

#[test]
fn bad_tree_input_is_refused_naming_the_path() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    // Readable by `nobody`, for the permission case below.
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let repo = TestRepo::local(tmp.path());
    repo.init();
    let ok = tmp.path().join("ok");
    fs::create_dir_all(ok.join("sub")).unwrap();
    fs::write(ok.join("sub/f"), b"x").unwrap();
    repo.backup(&ok, None);

    let sock_tree = tmp.path().join("with-socket");
    fs::create_dir_all(sock_tree.join("run")).unwrap();
    let sock = sock_tree.join("run/.s.PGSQL.5432");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    refused(
        &repo,
        repo.cmd("backup").arg(&sock_tree),
        &[sock.to_str().unwrap(), "is a socket"],
    );

    let fifo_tree = tmp.path().join("with-fifo");
    fs::create_dir_all(fifo_tree.join("sub")).unwrap();
    let fifo = fifo_tree.join("sub/pipe");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    refused(
        &repo,
        repo.cmd("backup").arg(&fifo_tree),
        &[fifo.to_str().unwrap(), "is a fifo"],
    );

    refused(
        &repo,
        repo.cmd("backup").arg("--tree").arg(ok.join("sub/f")),
        &["sub/f", "only a folder can be backed up as a tree"],
    );

    // An unreadable file and an unreadable folder, for a user without access
    // (root reads everything: drop to nobody).
    let locked = tmp.path().join("locked");
    fs::create_dir_all(locked.join("closed")).unwrap();
    fs::write(locked.join("secret"), b"x").unwrap();
    fs::set_permissions(locked.join("secret"), fs::Permissions::from_mode(0o000)).unwrap();
    let as_nobody = |path: &Path| {
        let mut c = if is_root() {
            let mut c = std::process::Command::new("setpriv");
            c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(revive_bin());
            c
        } else {
            std::process::Command::new(revive_bin())
        };
        c.arg("backup")
            .arg("--repo")
            .arg(repo.dir.as_ref().unwrap())
            .arg(path);
        c
    };
    // The source is scanned before the repository lock is taken, so nobody
    // fails on the source, naming it.
    refused(
        &repo,
        &mut as_nobody(&locked),
        &[locked.join("secret").to_str().unwrap(), "ermission denied"],
    );
    fs::remove_file(locked.join("secret")).unwrap();
    fs::set_permissions(locked.join("closed"), fs::Permissions::from_mode(0o000)).unwrap();
    refused(
        &repo,
        &mut as_nobody(&locked),
        &[locked.join("closed").to_str().unwrap(), "ermission denied"],
    );

    // A manifest from a newer revive, and one whose path would leave the
    // destination: refused by name, nothing written outside.
    let points = repo.dir.as_ref().unwrap().join("points");
    let base = r#""created":"2026-12-04T00:00:00Z","parent":null,"chunk_size":1048576,"stats":{"bytes_read":0,"bytes_new":0,"bytes_stored":0,"chunks_new":0,"chunks_reused":0,"chunks_zero":0,"pages_new":0,"seconds":0.0}"#;
    fs::write(
        points.join("6b000000aaaaaaaa.json"),
        format!(r#"{{"format_version":3,"id":"6b000000aaaaaaaa","vm":"future",{base}}}"#),
    )
    .unwrap();
    let (_, _, err) = run_fail(
        repo.cmd("restore")
            .arg("6b000000aaaaaaaa")
            .arg(tmp.path().join("f")),
    );
    assert!(
        err.contains("manifest version 3") && err.contains("upgrade revive"),
        "{err}"
    );
    fs::remove_file(points.join("6b000000aaaaaaaa.json")).unwrap();
    let entries = r#"[{"path":"","kind":"folder","mode":493,"uid":0,"gid":0,"mtime_ns":0,"size":0},{"path":"../escape","kind":"file","mode":420,"uid":0,"gid":0,"mtime_ns":0,"size":0,"chunks":[]}]"#;
    fs::write(
        points.join("6b000000bbbbbbbb.json"),
        format!(
            r#"{{"format_version":2,"id":"6b000000bbbbbbbb","vm":"evil","kind":"tree","entries":{entries},{base}}}"#
        ),
    )
    .unwrap();
    let dest = tmp.path().join("evil/inner");
    let (_, _, err) = run_fail(repo.cmd("restore").arg("6b000000bbbbbbbb").arg(&dest));
    assert!(
        err.contains("points/6b000000bbbbbbbb.json") && err.contains("'../escape'"),
        "{err}"
    );
    assert!(!tmp.path().join("evil").exists());
}
