//! A real guest (the tiny VM of `scripts/build-boot-image.sh`, TCG) boots
//! under the QEMU driver from a storage snapshot's clone: a btrfs clone
//! served by revive's NFS export, and a Ceph RBD clone QEMU opens itself.
//! Its writes land in the clone, never in the snapshot; stopping the
//! session removes the clone.
//!
//! QEMU's nfs driver asks the portmapper on port 111, so the btrfs test
//! re-runs itself in private network, mount and pid namespaces. The RBD
//! test needs the host's loopback (the Ceph cluster of
//! `scripts/ceph-single-host.sh` listens there): private mount and pid
//! namespaces only.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::support::btrfs::{btrfs_or_skip, BtrfsPool};
use crate::support::ceph::{ceph_or_skip, images, rbd, running_conf};
use crate::support::qemu::*;
use crate::support::server::{ReviveServer, ServerSpec};
use crate::support::*;

/// Whole inner run, boot included (TCG on 2 shared cores is slow).
const RUN_TIMEOUT: Duration = Duration::from_secs(600);
/// From power on to the guest's "ready" line.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// One serial answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// `[sessions]` and a QEMU host `kvm1` running VMs in `run_dir`.
fn qemu_host(run_dir: &Path) -> String {
    format!(
        "[sessions]\nmin_free_cache = \"1MiB\"\n\n[[host]]\nname = \"kvm1\"\ndriver = \"qemu\"\n\
         nfs_address = \"127.0.0.1\"\nrun_dir = {:?}\naccel = \"tcg\"\n",
        run_dir.to_str().expect("utf8")
    )
}

/// `revive recover --vm tiny --point POINT --host kvm1 --power-on --wait`: the session.
fn recover(server: &ReviveServer, point: &str) -> Value {
    let sessions = server.ctl_json(&[
        "recover",
        "--vm",
        "tiny",
        "--point",
        point,
        "--host",
        "kvm1",
        "--power-on",
        "--wait",
    ]);
    let s = sessions.as_array().expect("sessions")[0].clone();
    assert_eq!(s["state"], "running", "{s:#}\nlog:\n{}", server.log());
    s
}

/// Waits for the guest's boot lines: checks the known file's hash and
/// returns the (file, hash) it wrote and fsynced.
fn guest_checks(serial: &Serial, image: &BootImage) -> (String, String) {
    serial.wait_line(MARKER, 0, BOOT_TIMEOUT);
    serial.wait_line("REVIVE-READY", 0, BOOT_TIMEOUT);
    assert_eq!(
        serial.wait_line("REVIVE-KNOWN", 0, ANSWER_TIMEOUT),
        format!("REVIVE-KNOWN {}", image.known_sha256),
        "the guest read other bytes than the snapshot holds"
    );
    wrote(&serial.wait_line("REVIVE-WROTE", 0, ANSWER_TIMEOUT))
}

fn stop(server: &ReviveServer, id: &str) {
    let s = server.ctl_json(&["stop", id, "--wait"]);
    assert_eq!(s["state"], "cancelled", "{s:#}\nlog:\n{}", server.log());
}

const BTRFS_DONE: &str = "SNAPSHOT-BTRFS-BOOT-PASSED";
const BTRFS_TEST: &str = "snapshots::boot::guest_boots_from_a_btrfs_clone_over_nfs";

/// The guest boots from a btrfs clone exported by revive's NFS server
/// (`nfs://127.0.0.1/snap/<clone>/tiny/tiny-flat.vmdk`); its write is in
/// the clone's disk and the snapshot's files hash as before; a live
/// migration moves it to a local folder while it runs, and the finished
/// session leaves no clone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_boots_from_a_btrfs_clone_over_nfs() {
    if in_netns() {
        return btrfs_inner().await;
    }
    if !btrfs_or_skip() || !qemu_vm_peers_or_skip() {
        return;
    }
    rerun_isolated(BTRFS_TEST, BTRFS_DONE, RUN_TIMEOUT).await;
}

async fn btrfs_inner() {
    let up = crate::support::client::run_tool("ip", &["link", "set", "lo", "up"]).await;
    assert!(up.status.success(), "ip link set lo up: {up:?}");
    let image = boot_image();
    let tmp = tempfile::tempdir().expect("tempdir");
    let pool = BtrfsPool::create(&tmp.path().join("pool"), "1G");
    let vm_dir = pool.subvolume("ds1").join("tiny");
    std::fs::create_dir_all(&vm_dir).expect("mkdir");
    for f in std::fs::read_dir(&image.vm_dir).expect("boot image") {
        let f = f.expect("entry");
        std::fs::copy(f.path(), vm_dir.join(f.file_name())).expect("copy");
    }
    let snap = pool.snapshot("ds1", "snaps/ds1@1");
    let before = snapshot_tree(&snap);
    let repo = init_repo(tmp.path(), None);
    let run_dir = tmp.path().join("run");
    let mut server = ReviveServer::start(
        &tmp.path().join("server"),
        ServerSpec::new(&repo)
            .fixed_ports(2049, 20048, 111)
            .with_api()
            .log_level("revive=info")
            .toml(&format!(
                "{}{}",
                qemu_host(&run_dir),
                pool.source_toml("pool1", "")
            )),
    );

    let s = recover(&server, "snap:pool1/snaps/ds1@1");
    let id = s["id"].as_str().expect("id").to_string();
    let name = s["name"].as_str().expect("name").to_string();
    let clones = pool.clones();
    assert_eq!(clones.len(), 1, "{clones:?}");
    let clone = clones[0].1.rsplit('/').next().expect("clone").to_string();
    let serial = Serial::in_dir(&run_dir.join(&name));
    let (w1, h1) = guest_checks(&serial, &image);
    assert_eq!(
        drive_file(&run_dir.join(&name).join("qmp.sock")).await,
        format!("nfs://127.0.0.1/snap/{clone}/tiny/tiny-flat.vmdk")
    );
    // The guest's write is in the clone, and only there.
    let clone_disk = pool.mnt.join(&clones[0].1).join("tiny/tiny-flat.vmdk");
    assert_eq!(fat_file_sha256(&clone_disk, &w1), h1);
    assert_eq!(snapshot_tree(&snap), before, "the snapshot changed");

    // A session from a snapshot migrates like any other: the QEMU driver
    // mirrors the disk off the clone while the guest runs, and the
    // finished session releases the clone.
    let prod = tmp.path().join("prod");
    let done = server.ctl_json(&[
        "migrate",
        &id,
        "--method",
        "live",
        "--to",
        prod.to_str().expect("utf8"),
        "--wait",
    ]);
    assert_eq!(done["state"], "done", "{done:#}\nlog:\n{}", server.log());
    let migrated = prod.join("tiny-flat.vmdk");
    assert_eq!(
        drive_file(&run_dir.join(&name).join("qmp.sock")).await,
        migrated.to_str().expect("utf8")
    );
    assert_eq!(serial.ask("ping", "pong", 0, ANSWER_TIMEOUT), "pong 1");
    assert!(pool.clones().is_empty(), "the clone is left");
    assert_eq!(snapshot_tree(&snap), before, "the snapshot changed");
    // The VM is production's now: power it off with the driver.
    let config: revive::drivers::qemu::QemuConfig =
        toml::from_str(&format!("run_dir = {:?}\naccel = \"tcg\"", run_dir)).expect("config");
    let d = revive::drivers::qemu::build("kvm1", &config).expect("driver");
    let vm = revive::drivers::VmRef(name.clone());
    d.power_off(&vm).await.expect("power off");
    assert_eq!(fat_file_sha256(&migrated, &w1), h1);
    d.unregister_vm(&vm).await.expect("unregister");
    server.stop();
    println!("{BTRFS_DONE}");
}

const RBD_DONE: &str = "SNAPSHOT-RBD-BOOT-PASSED";
const RBD_TEST: &str = "snapshots::boot::guest_boots_from_an_rbd_clone";

/// The guest boots from a Ceph RBD clone of an image snapshot (QEMU opens
/// `rbd:rbd/revive-clone-<session>`); its write is in the clone, the
/// snapshot exports the same bytes as before; stop removes the clone and
/// unprotects the snapshot revive protected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_boots_from_an_rbd_clone() {
    if in_netns() {
        return rbd_inner().await;
    }
    if !qemu_vm_peers_or_skip() {
        return;
    }
    // Started (or found) here, outside the pid namespace that dies with the test.
    if ceph_or_skip().is_none() {
        return;
    }
    let stdout = rerun_unshared(
        &["--mount", "--pid", "--fork", "--kill-child", "--mount-proc"],
        RBD_TEST,
        &["--include-ignored", "--nocapture", "--test-threads=1"],
        RBD_DONE,
        RUN_TIMEOUT,
    )
    .await;
    print!("{stdout}");
}

/// SHA-256 of an image (or snapshot) `spec`, exported to a file in `dir`.
fn rbd_sha(conf: &Path, spec: &str, dir: &Path) -> (std::path::PathBuf, String) {
    let file = dir.join(spec.replace(['/', '@'], "_"));
    let _ = std::fs::remove_file(&file);
    rbd(conf, &["export", spec, file.to_str().expect("utf8")]);
    let sha = sha256_file(&file);
    (file, sha)
}

async fn rbd_inner() {
    let conf = running_conf();
    let image = boot_image();
    let tmp = tempfile::tempdir().expect("tempdir");
    // A name of its own: the cluster outlives the test and other runs.
    let disk = format!("revive-test-tiny-{:08x}", rand::random::<u32>());
    let flat = image.vm_dir.join("tiny-flat.vmdk");
    rbd(
        &conf,
        &[
            "import",
            flat.to_str().expect("utf8"),
            &format!("rbd/{disk}"),
        ],
    );
    rbd(
        &conf,
        &[
            "image-meta",
            "set",
            &format!("rbd/{disk}"),
            "revive.vm",
            "tiny",
        ],
    );
    rbd(
        &conf,
        &[
            "image-meta",
            "set",
            &format!("rbd/{disk}"),
            "revive.memsize",
            "256",
        ],
    );
    rbd(&conf, &["snap", "create", &format!("rbd/{disk}@s1")]);
    let snapshot = format!("rbd/{disk}@s1");
    let (_, before) = rbd_sha(&conf, &snapshot, tmp.path());

    let repo = init_repo(tmp.path(), None);
    let run_dir = tmp.path().join("run");
    let mut server = ReviveServer::start(
        &tmp.path().join("server"),
        ServerSpec::new(&repo)
            .with_api()
            .log_level("revive=info")
            .toml(&format!(
                "{}\n[[snapshot_source]]\nname = \"ceph\"\nprovider = \"rbd\"\npool = \"rbd\"\n\
                 ceph_conf = {:?}\n",
                qemu_host(&run_dir),
                conf.to_str().expect("utf8")
            )),
    );
    let point = format!("snap:ceph/{disk}@s1");
    let listed = run_ok(
        revive()
            .args([
                "points",
                "--source",
                "snap:ceph",
                "--vm",
                "tiny",
                "--json",
                "--config",
            ])
            .arg(server.dir.join("revive.toml")),
    );
    assert!(listed.contains(&format!("\"{point}\"")), "{listed}");

    let s = recover(&server, &point);
    let id = s["id"].as_str().expect("id").to_string();
    let name = s["name"].as_str().expect("name").to_string();
    let clone = format!("revive-clone-{id}");
    let clones: Vec<String> = images(&conf, "rbd")
        .into_iter()
        .filter(|i| i.starts_with("revive-clone-"))
        .collect();
    assert_eq!(clones, std::slice::from_ref(&clone));
    let serial = Serial::in_dir(&run_dir.join(&name));
    let (w1, h1) = guest_checks(&serial, &image);
    let drive = drive_file(&run_dir.join(&name).join("qmp.sock")).await;
    assert!(drive.contains(&clone), "QEMU opened {drive}");
    // The guest's write is in the clone, and only there.
    let (clone_file, _) = rbd_sha(&conf, &format!("rbd/{clone}"), tmp.path());
    assert_eq!(fat_file_sha256(&clone_file, &w1), h1);
    assert_eq!(
        rbd_sha(&conf, &snapshot, tmp.path()).1,
        before,
        "the snapshot changed"
    );

    stop(&server, &id);
    assert!(!run_dir.join(&name).exists(), "the VM is still registered");
    assert!(!images(&conf, "rbd").contains(&clone), "the clone is left");
    let snaps: Value = serde_json::from_str(&rbd(
        &conf,
        &["snap", "ls", "--format", "json", &format!("rbd/{disk}")],
    ))
    .expect("snap ls");
    assert_eq!(
        snaps[0]["protected"], "false",
        "revive's protection is left: {snaps}"
    );
    assert_eq!(
        rbd_sha(&conf, &snapshot, tmp.path()).1,
        before,
        "the snapshot changed"
    );
    server.stop();
    rbd(&conf, &["snap", "rm", &snapshot]);
    rbd(&conf, &["rm", &format!("rbd/{disk}")]);
    println!("{RBD_DONE}");
}
