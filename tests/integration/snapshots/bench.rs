//! `scripts/bench-snapshots.sh` runs these (ignored in the normal run):
//!
//! - clone time of a btrfs and a Ceph RBD snapshot, of a 256 MiB volume
//!   (random data) and a 20 GiB one (sparse), through revive's providers
//!   (the storage CLI call included): `BENCH-CLONE <provider> <size> <s>`;
//! - power on to the guest's marker of the tiny VM booted from a snapshot's
//!   clone (btrfs over revive's NFS; RBD opened by QEMU) vs the same disk as
//!   a local copy, alternating: `BENCH-BOOT <mode> <s>`.
//!
//! `REVIVE_BENCH_REPEATS` runs of each (default 3).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use revive::drivers::{Driver, VmRef};
use revive::snapshots::btrfs::BtrfsProvider;
use revive::snapshots::rbd::RbdProvider;
use revive::snapshots::{clone_name, BtrfsConfig, RbdConfig, SnapshotProvider};

use crate::support::btrfs::{sh, BtrfsPool};
use crate::support::ceph::{ceph_or_skip, rbd, running_conf};
use crate::support::qemu::*;
use crate::support::server::{ReviveServer, ServerSpec};
use crate::support::*;

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

fn repeats() -> usize {
    std::env::var("REVIVE_BENCH_REPEATS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3)
}

/// Times `create_clone` of `snapshot` `repeats` times (each clone destroyed after).
async fn time_clones(provider: &dyn SnapshotProvider, label: &str, snapshot: &str, size: &str) {
    for i in 0..repeats() {
        let clone = provider.plan_clone(snapshot, &clone_name(&format!("bench{i:02}")));
        let start = Instant::now();
        let made = provider.create_clone(&clone).await.expect("clone");
        let secs = start.elapsed().as_secs_f64();
        println!("BENCH-CLONE {label} {size} {secs:.4}");
        provider.destroy(&made).await.expect("destroy");
    }
}

const CLONE_DONE: &str = "SNAPSHOT-CLONE-BENCH-DONE";
const CLONE_BENCH: &str = "snapshots::bench::clone_time_of_small_and_large_snapshots";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: scripts/bench-snapshots.sh"]
async fn clone_time_of_small_and_large_snapshots() {
    if in_netns() {
        return clone_inner().await;
    }
    if !crate::support::btrfs::btrfs_or_skip() || ceph_or_skip().is_none() {
        return;
    }
    let stdout = rerun_unshared(
        &["--mount", "--pid", "--fork", "--kill-child", "--mount-proc"],
        CLONE_BENCH,
        &["--include-ignored", "--nocapture", "--test-threads=1"],
        CLONE_DONE,
        Duration::from_secs(1200),
    )
    .await;
    print!("{stdout}");
}

async fn clone_inner() {
    let tmp = tempfile::tempdir().expect("tempdir");
    // btrfs: a 256 MiB disk of random data, and a 20 GiB sparse one.
    let pool = BtrfsPool::create(&tmp.path().join("pool"), "2G");
    let small = pool.subvolume("small");
    let random = tmp.path().join("random.img");
    sh(
        "dd",
        &[
            "if=/dev/urandom",
            &format!("of={}", random.display()),
            "bs=1M",
            "count=256",
            "status=none",
        ],
    );
    std::fs::copy(&random, small.join("disk-flat.vmdk")).expect("copy");
    let big = pool.subvolume("big");
    let f = std::fs::File::create(big.join("disk-flat.vmdk")).expect("create");
    f.set_len(20 << 30).expect("sparse 20 GiB");
    drop(f);
    sh("sync", &[]);
    pool.snapshot("small", "snaps/small@1");
    pool.snapshot("big", "snaps/big@1");
    let config: BtrfsConfig =
        toml::from_str(&format!("path = {:?}", pool.mnt.to_str().expect("utf8"))).expect("config");
    let btrfs = BtrfsProvider::new("bench", &config, None);
    time_clones(&btrfs, "btrfs", "snaps/small@1", "256MiB").await;
    time_clones(&btrfs, "btrfs", "snaps/big@1", "20GiB").await;

    // RBD: the same two sizes as images of the test cluster.
    let conf = running_conf();
    let id = format!("{:08x}", rand::random::<u32>());
    let (small_img, big_img) = (format!("bench-small-{id}"), format!("bench-big-{id}"));
    rbd(
        &conf,
        &[
            "import",
            random.to_str().expect("utf8"),
            &format!("rbd/{small_img}"),
        ],
    );
    rbd(
        &conf,
        &["create", "--size", "20G", &format!("rbd/{big_img}")],
    );
    for img in [&small_img, &big_img] {
        rbd(&conf, &["snap", "create", &format!("rbd/{img}@s1")]);
    }
    let config: RbdConfig = toml::from_str(&format!(
        "pool = \"rbd\"\nceph_conf = {:?}",
        conf.to_str().expect("utf8")
    ))
    .expect("config");
    let ceph = RbdProvider::new("bench", &config);
    time_clones(&ceph, "rbd", &format!("{small_img}@s1"), "256MiB").await;
    time_clones(&ceph, "rbd", &format!("{big_img}@s1"), "20GiB").await;
    for img in [&small_img, &big_img] {
        let snap = format!("rbd/{img}@s1");
        // Unprotected by the last clone's removal already; purge is idempotent.
        let _ = std::process::Command::new("rbd")
            .arg("-c")
            .arg(&conf)
            .args(["snap", "unprotect", &snap])
            .output();
        rbd(&conf, &["snap", "purge", &format!("rbd/{img}")]);
        rbd(&conf, &["rm", &format!("rbd/{img}")]);
    }
    println!("{CLONE_DONE}");
}

/// Power on → marker of VM `name` (registered by a session), or of a local
/// copy of `vm_dir` started by the driver; the VM is powered off after.
async fn boot(
    driver: &Arc<dyn Driver>,
    run_dir: &Path,
    name: &str,
    local_copy_of: Option<&Path>,
) -> f64 {
    let start = Instant::now();
    let vm = match local_copy_of {
        None => {
            let vm = VmRef(name.to_string());
            driver.power_on(&vm).await.expect("power on");
            vm
        }
        Some(vm_dir) => {
            let spec = vm_spec(vm_dir, name, "", Some(256));
            driver
                .start_from_copy(&spec, vm_dir)
                .await
                .expect("start local copy")
                .expect("vm")
        }
    };
    let serial = Serial::in_dir(&run_dir.join(name));
    serial.wait_line(MARKER, 0, BOOT_TIMEOUT);
    let secs = start.elapsed().as_secs_f64();
    serial.wait_line("REVIVE-READY", 0, BOOT_TIMEOUT);
    driver.power_off(&vm).await.expect("power off");
    secs
}

/// Alternates boots from a session's clone of `point` and from a private
/// local copy of the tiny VM, printing `BENCH-BOOT <clone_label|local> <s>`.
async fn boot_bench(server: &ReviveServer, run_dir: &Path, point: &str, clone_label: &str) {
    let image = boot_image();
    let config: revive::drivers::qemu::QemuConfig =
        toml::from_str(&format!("run_dir = {:?}\naccel = \"tcg\"", run_dir)).expect("config");
    let driver = revive::drivers::qemu::build("kvm1", &config).expect("driver");
    let tmp = tempfile::tempdir().expect("tempdir");
    for i in 0..repeats() {
        // The clone: a session registers the VM (not powered on), then the
        // driver powers it on, timed as for the local copy.
        let name = format!("bench-clone-{i}");
        let s = server.ctl_json(&[
            "recover", "--vm", "tiny", "--point", point, "--host", "kvm1", "--name", &name,
            "--wait",
        ]);
        let id = s[0]["id"].as_str().expect("id").to_string();
        assert_eq!(s[0]["state"], "running", "{s:#}\nlog:\n{}", server.log());
        let secs = boot(&driver, run_dir, &name, None).await;
        println!("BENCH-BOOT {clone_label} {secs:.2}");
        let stopped = server.ctl_json(&["stop", &id, "--wait"]);
        assert_eq!(stopped["state"], "cancelled", "{stopped:#}");

        let local = tmp.path().join(format!("local-{i}"));
        std::fs::create_dir_all(&local).expect("mkdir");
        for f in std::fs::read_dir(&image.vm_dir).expect("read") {
            let f = f.expect("entry");
            std::fs::copy(f.path(), local.join(f.file_name())).expect("copy");
        }
        let name = format!("bench-local-{i}");
        let secs = boot(&driver, run_dir, &name, Some(&local)).await;
        println!("BENCH-BOOT local {secs:.2}");
        driver
            .unregister_vm(&VmRef(name))
            .await
            .expect("unregister");
    }
}

fn qemu_host(run_dir: &Path) -> String {
    format!(
        "[sessions]\nmin_free_cache = \"1MiB\"\n\n[[host]]\nname = \"kvm1\"\ndriver = \"qemu\"\n\
         nfs_address = \"127.0.0.1\"\nrun_dir = {:?}\naccel = \"tcg\"\n",
        run_dir.to_str().expect("utf8")
    )
}

const BTRFS_BOOT_DONE: &str = "SNAPSHOT-BTRFS-BOOT-BENCH-DONE";
const BTRFS_BOOT_BENCH: &str = "snapshots::bench::boot_from_a_btrfs_clone_vs_a_local_copy";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: scripts/bench-snapshots.sh"]
async fn boot_from_a_btrfs_clone_vs_a_local_copy() {
    if in_netns() {
        return btrfs_boot_inner().await;
    }
    if !crate::support::btrfs::btrfs_or_skip() || !qemu_vm_peers_or_skip() {
        return;
    }
    rerun_isolated(BTRFS_BOOT_BENCH, BTRFS_BOOT_DONE, Duration::from_secs(1800)).await;
}

async fn btrfs_boot_inner() {
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
    pool.snapshot("ds1", "snaps/ds1@1");
    let repo = init_repo(tmp.path(), None);
    let run_dir = tmp.path().join("run");
    let server = ReviveServer::start(
        &tmp.path().join("server"),
        ServerSpec::new(&repo)
            .fixed_ports(2049, 20048, 111)
            .with_api()
            .toml(&format!(
                "{}{}",
                qemu_host(&run_dir),
                pool.source_toml("pool1", "")
            )),
    );
    boot_bench(&server, &run_dir, "snap:pool1/snaps/ds1@1", "btrfs-nfs").await;
    println!("{BTRFS_BOOT_DONE}");
}

const RBD_BOOT_DONE: &str = "SNAPSHOT-RBD-BOOT-BENCH-DONE";
const RBD_BOOT_BENCH: &str = "snapshots::bench::boot_from_an_rbd_clone_vs_a_local_copy";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: scripts/bench-snapshots.sh"]
async fn boot_from_an_rbd_clone_vs_a_local_copy() {
    if in_netns() {
        return rbd_boot_inner().await;
    }
    if !qemu_vm_peers_or_skip() || ceph_or_skip().is_none() {
        return;
    }
    let stdout = rerun_unshared(
        &["--mount", "--pid", "--fork", "--kill-child", "--mount-proc"],
        RBD_BOOT_BENCH,
        &["--include-ignored", "--nocapture", "--test-threads=1"],
        RBD_BOOT_DONE,
        Duration::from_secs(1800),
    )
    .await;
    print!("{stdout}");
}

async fn rbd_boot_inner() {
    let conf = running_conf();
    let image = boot_image();
    let tmp = tempfile::tempdir().expect("tempdir");
    let disk = format!("bench-tiny-{:08x}", rand::random::<u32>());
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
    // The same memory as the local copy's (the tiny .vmx's memSize).
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
    let repo = init_repo(tmp.path(), None);
    let run_dir = tmp.path().join("run");
    let server = ReviveServer::start(
        &tmp.path().join("server"),
        ServerSpec::new(&repo).with_api().toml(&format!(
            "{}\n[[snapshot_source]]\nname = \"ceph\"\nprovider = \"rbd\"\npool = \"rbd\"\n\
             ceph_conf = {:?}\n",
            qemu_host(&run_dir),
            conf.to_str().expect("utf8")
        )),
    );
    boot_bench(&server, &run_dir, &format!("snap:ceph/{disk}@s1"), "rbd").await;
    rbd(&conf, &["snap", "purge", &format!("rbd/{disk}")]);
    rbd(&conf, &["rm", &format!("rbd/{disk}")]);
    println!("{RBD_BOOT_DONE}");
}
