//! Issue 2: the repository through the `revive` CLI, as users and scripts drive it.
//!
//! Tests whose body does not depend on the store run twice (issue 7): on a
//! local folder (`<test>::local`) and on S3 through moto (`<test>::s3`).

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::moto::{on_both_stores, TestRepo};
use crate::support::vm::SampleVm;
use crate::support::*;

const MIB: u64 = 1 << 20;

/// `revive points --json` of `repo`, parsed.
fn points_of(repo: &TestRepo) -> Vec<serde_json::Value> {
    let out = run_ok(repo.cmd("points").arg("--json"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("points --json printed {out:?}: {e}"))
}

on_both_stores!(
    backup_and_restore_256mib_vm_bit_exact,
    backup_and_restore_256mib
);
fn backup_and_restore_256mib(repo: &TestRepo, tmp: &Path) {
    let vm = SampleVm::create(tmp, "web01", 256 * MIB, 1);
    repo.init();
    let stats = repo.backup(&vm.dir, None);
    assert_eq!(stats["vm"], "web01");
    assert_eq!(stats["parent"], serde_json::Value::Null);
    assert!(
        stats["chunks_zero"].as_u64().unwrap() > 0,
        "mixed data has zero chunks: {stats}"
    );
    assert!(
        stats["chunks_reused"].as_u64().unwrap() > 0,
        "mixed data has repeated chunks: {stats}"
    );
    let id = stats["id"].as_str().unwrap().to_string();

    let dest = tmp.join("restored");
    repo.restore(&id, &dest);
    assert_eq!(sha256_dir(&dest), sha256_dir(&vm.dir));
    // Sparse where the backup had holes.
    let allocated = fs::metadata(dest.join("web01-flat.vmdk")).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        allocated.blocks() * 512 < 256 * MIB,
        "restored disk is not sparse"
    );

    let verify = run_ok(&mut repo.cmd("verify"));
    assert!(verify.contains(": ok"), "{verify}");
}

on_both_stores!(
    incremental_of_one_percent_change_stores_about_one_percent,
    incremental_of_one_percent
);
fn incremental_of_one_percent(repo: &TestRepo, tmp: &Path) {
    let vm = SampleVm::create(tmp, "db01", 256 * MIB, 2);
    repo.init();
    let full = repo.backup(&vm.dir, None);
    let first_hashes = sha256_dir(&vm.dir);

    // 1% of the disk's 1 MiB blocks, each rewritten in place.
    vm.change_blocks(MIB, 3, 20);
    let incr = repo.backup(&vm.dir, None);
    assert_eq!(incr["parent"], full["id"]);
    let stored = incr["bytes_stored"].as_u64().unwrap();
    assert!(
        stored <= 256 * MIB * 2 / 100,
        "incremental stored {stored} bytes for a 1% change: {incr}"
    );
    assert!(incr["chunks_new"].as_u64().unwrap() <= 3, "{incr}");

    for (id, expected) in [
        (&full["id"], &first_hashes),
        (&incr["id"], &sha256_dir(&vm.dir)),
    ] {
        let dest = tmp.join(format!("r-{}", id.as_str().unwrap()));
        repo.restore(id.as_str().unwrap(), &dest);
        assert_eq!(&sha256_dir(&dest), expected, "restore of {id}");
    }
}

on_both_stores!(
    identical_disk_of_another_vm_is_deduplicated,
    dedup_across_vms
);
fn dedup_across_vms(repo: &TestRepo, tmp: &Path) {
    let a = SampleVm::create(tmp, "a", 32 * MIB, 3);
    let b = SampleVm::create(&tmp.join("other"), "a", 32 * MIB, 3);
    repo.init();
    repo.backup(&a.dir, Some("vm-a"));
    let second = repo.backup(&b.dir, Some("vm-b"));
    assert_eq!(
        second["parent"],
        serde_json::Value::Null,
        "different VM, no parent"
    );
    assert_eq!(second["chunks_new"], 0, "{second}");
}

#[test]
fn corrupt_chunk_is_named_by_verify_and_stops_restore() {
    let tmp = tempfile::tempdir().unwrap();
    let vm = SampleVm::create(tmp.path(), "app01", 16 * MIB, 4);
    let repo = init_repo(tmp.path(), None);
    let p1 = backup_json(&repo, &vm.dir, None)["id"]
        .as_str()
        .unwrap()
        .to_string();
    vm.change_blocks(MIB, 1, 5);
    let p2 = backup_json(&repo, &vm.dir, None)["id"]
        .as_str()
        .unwrap()
        .to_string();

    // Damage a chunk both points use: the largest one is a random-data chunk of the disk.
    let before = chunk_files(&repo);
    let victim = before
        .iter()
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap()
        .clone();
    let f = fs::OpenOptions::new().write(true).open(&victim).unwrap();
    f.write_all_at(b"\xde\xad\xbe\xef", 100).unwrap();
    let chunk_hex = victim.file_name().unwrap().to_string_lossy().into_owned();

    let (code, stdout, _) = run_fail(revive().arg("verify").arg("--repo").arg(&repo));
    assert_eq!(code, 1, "verify exits 1 on damage");
    assert!(
        stdout.contains(&chunk_hex),
        "verify names the chunk: {stdout}"
    );
    let line = stdout.lines().find(|l| l.contains(&chunk_hex)).unwrap();
    let users: Vec<&str> = [&p1, &p2]
        .iter()
        .filter(|p| line.contains(p.as_str()))
        .map(|p| p.as_str())
        .collect();
    assert!(
        !users.is_empty(),
        "verify names the affected restore points: {line}"
    );

    let json = run(revive()
        .arg("verify")
        .arg("--repo")
        .arg(&repo)
        .arg("--json"));
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["problems"].as_array().unwrap().len(), 1, "{report}");

    let dest = tmp.path().join("out");
    let (code, _, stderr) = run_fail(
        revive()
            .arg("restore")
            .arg("--repo")
            .arg(&repo)
            .arg(users[0])
            .arg(&dest),
    );
    assert_eq!(code, 2);
    assert!(
        stderr.contains(&chunk_hex),
        "restore names the chunk: {stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one clear error line: {stderr}");
    let finished: Vec<_> = fs::read_dir(&dest)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with("-flat.vmdk"))
        .collect();
    assert!(
        finished.is_empty(),
        "no restored disk with wrong bytes may be left"
    );
}

#[test]
fn killed_backup_leaves_a_valid_repository() {
    let tmp = tempfile::tempdir().unwrap();
    let vm = SampleVm::create(tmp.path(), "big01", 256 * MIB, 6);
    let repo = init_repo(tmp.path(), None);
    let small = SampleVm::create(&tmp.path().join("s"), "small01", 4 * MIB, 7);
    backup_json(&repo, &small.dir, None);

    let mut killed_midway = false;
    for _attempt in 0..5 {
        let before = chunk_files(&repo).len();
        let mut child = revive()
            .arg("backup")
            .arg("--repo")
            .arg(&repo)
            .arg(&vm.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while chunk_files(&repo).len() < before + 8 && Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let finished = child.try_wait().unwrap().is_some();
        child.kill().ok();
        child.wait().unwrap();
        if !finished {
            killed_midway = true;
            break;
        }
        // It finished before we could kill it: start over with an empty repository.
        fs::remove_dir_all(&repo).unwrap();
        init_repo(tmp.path(), None);
        backup_json(&repo, &small.dir, None);
    }
    assert!(killed_midway, "could not kill the backup while it ran");
    let points = points_json(&repo);
    assert_eq!(
        points.len(),
        1,
        "the half-written point is not listed: {points:?}"
    );
    assert_eq!(points[0]["vm"], "small01");
    let verify = run_ok(revive().arg("verify").arg("--repo").arg(&repo));
    assert!(verify.contains(": ok"), "{verify}");

    // gc sweeps what the killed backup left; the surviving point still restores.
    let gc: serde_json::Value = serde_json::from_str(&run_ok(
        revive().arg("gc").arg("--repo").arg(&repo).arg("--json"),
    ))
    .unwrap();
    assert!(gc["chunks_removed"].as_u64().unwrap() > 0, "{gc}");
    let dest = tmp.path().join("out");
    run_ok(
        revive()
            .arg("restore")
            .arg("--repo")
            .arg(&repo)
            .arg("small01@latest")
            .arg(&dest),
    );
    assert_eq!(sha256_dir(&dest), sha256_dir(&small.dir));
}

on_both_stores!(
    concurrent_backups_do_not_corrupt_each_other,
    concurrent_backups
);
fn concurrent_backups(repo: &TestRepo, tmp: &Path) {
    let a = SampleVm::create(tmp, "a01", 48 * MIB, 8);
    let b = SampleVm::create(tmp, "b01", 48 * MIB, 9);
    repo.init();
    let spawn = |dir: &std::path::Path| {
        repo.cmd("backup")
            .arg(dir)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (ca, cb) = (spawn(&a.dir), spawn(&b.dir));
    for child in [ca, cb] {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
    }
    assert_eq!(points_of(repo).len(), 2);
    run_ok(&mut repo.cmd("verify"));
    for vm in [&a, &b] {
        let dest = tmp.join(format!("out-{}", vm.name));
        repo.restore(&format!("{}@latest", vm.name), &dest);
        assert_eq!(sha256_dir(&dest), sha256_dir(&vm.dir));
    }
}

on_both_stores!(point_specs_resolve_by_prefix_and_latest, point_specs);
fn point_specs(repo: &TestRepo, tmp: &Path) {
    let vm = SampleVm::create(tmp, "web02", 2 * MIB, 10);
    repo.init();
    let p1 = repo.backup(&vm.dir, None)["id"]
        .as_str()
        .unwrap()
        .to_string();
    vm.change_blocks(MIB, 1, 11);
    let p2 = repo.backup(&vm.dir, None)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let points = points_of(repo);
    assert_eq!(points.len(), 2);
    assert_eq!(points[1]["parent"], p1.as_str());

    let json = run_ok(repo.cmd("verify").arg("--json").arg("web02@latest"));
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(report["points"], 1);

    let prefix = &p2[..12];
    let forgotten = run_ok(repo.cmd("forget").arg(prefix));
    assert!(forgotten.contains(&p2), "{forgotten}");
    let left = points_of(repo);
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["id"], p1.as_str());
    let (_, _, err) = run_fail(repo.cmd("restore").arg("nope@latest").arg(tmp.join("x")));
    assert!(
        err.contains("no restore point matches 'nope@latest'"),
        "{err}"
    );
}

#[test]
fn forget_and_gc_free_space_and_keep_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let vm = SampleVm::create(tmp.path(), "gc01", 16 * MIB, 12);
    let repo = init_repo(tmp.path(), None);
    let p1 = backup_json(&repo, &vm.dir, None)["id"]
        .as_str()
        .unwrap()
        .to_string();
    vm.change_blocks(MIB, 4, 13);
    backup_json(&repo, &vm.dir, None);
    let before = chunk_files(&repo).len();
    run_ok(revive().arg("forget").arg("--repo").arg(&repo).arg(&p1));
    let gc: serde_json::Value = serde_json::from_str(&run_ok(
        revive().arg("gc").arg("--repo").arg(&repo).arg("--json"),
    ))
    .unwrap();
    let removed = gc["chunks_removed"].as_u64().unwrap();
    assert!(
        (1..=4).contains(&removed),
        "only chunks the forgotten point alone used go: {gc}"
    );
    assert_eq!(chunk_files(&repo).len() as u64, before as u64 - removed);
    run_ok(revive().arg("verify").arg("--repo").arg(&repo));
    let dest = tmp.path().join("out");
    run_ok(
        revive()
            .arg("restore")
            .arg("--repo")
            .arg(&repo)
            .arg("gc01@latest")
            .arg(&dest),
    );
    assert_eq!(sha256_dir(&dest), sha256_dir(&vm.dir));
}

#[test]
fn bad_input_gets_one_error_line_and_leaves_the_repository_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let repo = init_repo(tmp.path(), None);
    let vm = SampleVm::create(tmp.path(), "ok01", 2 * MIB, 14);
    backup_json(&repo, &vm.dir, None);
    let snapshot = snapshot_tree(&repo);
    let check = |args: &[&std::ffi::OsStr], expect: &str| {
        let (code, _, stderr) = run_fail(revive().args(args));
        assert_eq!(code, 2, "{args:?}");
        assert_eq!(
            stderr.trim_end().lines().count(),
            1,
            "one line for {args:?}: {stderr}"
        );
        assert!(
            stderr.contains(expect),
            "{args:?}: expected {expect:?} in {stderr}"
        );
        assert_eq!(
            snapshot_tree(&repo),
            snapshot,
            "repository changed after {args:?}"
        );
    };
    let os = |s: &str| std::ffi::OsString::from(s);
    let r = repo.as_os_str();

    check(
        &[&os("backup"), &os("--repo"), r, &os("/nonexistent/vm")],
        "/nonexistent/vm",
    );

    let broken = tmp.path().join("broken");
    fs::create_dir(&broken).unwrap();
    fs::write(broken.join("x.vmx"), "displayName = \"x\"\n").unwrap();
    fs::write(
        broken.join("x.vmdk"),
        "# Disk DescriptorFile\nRW 2048 VMFS \"x-flat.vmdk\"\n",
    )
    .unwrap();
    check(
        &[&os("backup"), &os("--repo"), r, broken.as_os_str()],
        "names extent 'x-flat.vmdk', which is missing",
    );

    let empty = tmp.path().join("empty");
    fs::create_dir(&empty).unwrap();
    check(
        &[&os("backup"), &os("--repo"), r, empty.as_os_str()],
        "holds no files",
    );

    for size in ["32KiB", "8MiB", "1000000"] {
        let fresh = tmp.path().join(format!("r-{size}"));
        let (code, _, err) = run_fail(
            revive()
                .arg("init")
                .arg("--repo")
                .arg(&fresh)
                .args(["--chunk-size", size]),
        );
        assert_eq!(code, 2);
        assert!(err.contains("chunk size"), "{err}");
        assert!(!fresh.join("config.json").exists());
    }

    check(&[&os("init"), &os("--repo"), r], "already exists");
    check(
        &[
            &os("points"),
            &os("--repo"),
            tmp.path().join("nope").as_os_str(),
        ],
        "no revive repository",
    );

    // A repository of another format version is refused, whatever the command.
    let other = tmp.path().join("other");
    init_repo(&tmp.path().join("o"), None);
    fs::rename(tmp.path().join("o").join("repo"), &other).unwrap();
    let cfg = fs::read_to_string(other.join("config.json")).unwrap();
    fs::write(
        other.join("config.json"),
        cfg.replace("\"format_version\": 1", "\"format_version\": 9"),
    )
    .unwrap();
    let (code, _, err) = run_fail(
        revive()
            .arg("backup")
            .arg("--repo")
            .arg(&other)
            .arg(&vm.dir),
    );
    assert_eq!(code, 2);
    assert!(err.contains("format version 9"), "{err}");
    assert!(
        !other.join("chunks").exists(),
        "nothing stored in a foreign repository"
    );
}

#[test]
fn unreadable_file_fails_the_backup_before_anything_is_stored() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let repo = init_repo(tmp.path(), None);
    let vm = SampleVm::create(tmp.path(), "locked01", 2 * MIB, 15);
    let secret = vm.dir.join("locked01.nvram");
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o000)).unwrap();
    let snapshot = snapshot_tree(&repo);
    // Root reads any file: drop to nobody so the permission bites, as it would
    // for an operator running revive without access to a datastore file.
    let mut cmd = if unsafe { libc::geteuid() } == 0 {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(revive_bin());
        c
    } else {
        std::process::Command::new(revive_bin())
    };
    cmd.arg("backup").arg("--repo").arg(&repo).arg(&vm.dir);
    let (code, _, stderr) = run_fail(&mut cmd);
    assert_eq!(code, 2);
    assert!(
        stderr.contains("locked01.nvram") && stderr.contains("ermission denied"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert_eq!(snapshot_tree(&repo), snapshot, "repository changed");
}
