//! Issue 6: a real VM boots under QEMU (TCG) from a restore point on
//! revive's NFS export, and moves to production storage with a live block
//! mirror. The tiny VM comes from `scripts/build-boot-image.sh`; its init
//! prints a marker, the hash of a known file on its disk, and the hash of a
//! file it wrote and fsynced; then it answers `ping` and `sync-write` on its
//! serial console.
//!
//! QEMU's nfs driver asks the portmapper on port 111, so each test re-runs
//! itself in private network and pid namespaces: the server takes 111 and
//! 2049, and every process the test started (daemonized QEMU included) dies
//! with it.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use revive::drivers::qemu::{self, QemuConfig};
use revive::drivers::{DatastoreSpec, Driver, MigrationStatus, VmRef};

use crate::support::client::run_tool;
use crate::support::qemu::*;
use crate::support::server::{ReviveServer, ServerSpec};
use crate::support::*;

/// Whole inner run, boots included (TCG on 2 shared cores is slow).
const RUN_TIMEOUT: Duration = Duration::from_secs(600);
/// From power on to the guest's "ready" line.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// One serial command's answer.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// Folder of the published restore point (the session name).
const SESSION: &str = "tiny-restore";

/// A backed-up tiny VM published by `revive serve` on 2049/20048/111 in the
/// current (private) network namespace.
struct Published {
    tmp: tempfile::TempDir,
    image: BootImage,
    repo: std::path::PathBuf,
    repo_before: std::collections::BTreeMap<std::path::PathBuf, String>,
    server: ReviveServer,
}

async fn publish() -> Published {
    let image = boot_image();
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = init_repo(tmp.path(), None);
    backup_json(&repo, &image.vm_dir, Some("tiny"));
    let repo_before = repo_objects(&repo);
    let server = ReviveServer::start(
        &tmp.path().join("server"),
        ServerSpec::new(&repo)
            .fixed_ports(2049, 20048, 111)
            .publish(SESSION, "tiny@latest"),
    );
    Published {
        tmp,
        image,
        repo,
        repo_before,
        server,
    }
}

/// The repository's files except `pins/`, which a running server keeps for
/// its publications (so that gc spares their chunks).
fn repo_objects(repo: &Path) -> std::collections::BTreeMap<std::path::PathBuf, String> {
    let pins = repo.join("pins");
    snapshot_tree(repo)
        .into_iter()
        .filter(|(path, _)| !path.starts_with(&pins))
        .collect()
}

fn datastore() -> DatastoreSpec {
    DatastoreSpec {
        name: "revive-test".into(),
        remote_host: "127.0.0.1".into(),
        remote_path: "/revive".into(),
        local_path: None,
    }
}

fn driver(run_dir: &Path) -> Arc<dyn Driver> {
    let config: QemuConfig =
        toml::from_str(&format!("run_dir = {:?}\naccel = \"tcg\"", run_dir)).expect("config");
    qemu::build("kvm1", &config).expect("qemu driver")
}

const DONE: &str = "QEMU-DRIVER-CHECKS-PASSED";
const TEST: &str = "qemu::driver_boots_from_the_datastore_and_mirrors_to_production_live";

/// The driver boots the published VM from `nfs://` (marker, known file's
/// hash, its write in the write cache and not in the repository), mirrors
/// its disk to a local folder while it runs, pivots, and the guest keeps
/// answering with revive's server stopped; the migrated disk holds both
/// guest writes and the repository still verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_boots_from_the_datastore_and_mirrors_to_production_live() {
    netns_test(qemu_vm_peers_or_skip, driver_inner, || {
        rerun_isolated(TEST, DONE, RUN_TIMEOUT)
    })
    .await;
}

async fn driver_inner() {
    let mut p = publish().await;
    let run_dir = p.tmp.path().join("run");
    let d = driver(&run_dir);
    let vm = vm_spec(&p.image.vm_dir, SESSION, SESSION, Some(256));
    let ds = datastore();

    let info = d.validate(&vm).await.expect("validate");
    assert!(info.free_memory_mib.is_some());
    d.attach_datastore(&ds).await.expect("portmapper answers");
    let vm_ref = d.register_vm(&ds, &vm).await.expect("register");
    assert_eq!(vm_ref, VmRef(SESSION.into()));
    assert_eq!(d.register_vm(&ds, &vm).await.expect("again"), vm_ref);
    d.power_on(&vm_ref).await.expect("power on");
    d.power_on(&vm_ref).await.expect("power on a running VM");

    let vm_dir = run_dir.join(SESSION);
    let serial = Serial::in_dir(&vm_dir);
    serial.wait_line("REVIVE-READY", 0, BOOT_TIMEOUT);
    let log = serial.text();
    assert!(log.contains(MARKER), "{log}");
    assert_eq!(
        drive_file(&vm_dir.join("qmp.sock")).await,
        format!("nfs://127.0.0.1/revive/{SESSION}/tiny-flat.vmdk")
    );
    let known = serial.wait_line("REVIVE-KNOWN", 0, ANSWER_TIMEOUT);
    assert_eq!(
        known,
        format!("REVIVE-KNOWN {}", p.image.known_sha256),
        "the guest read other bytes than were backed up"
    );
    let (w1, h1) = wrote(&serial.wait_line("REVIVE-WROTE", 0, ANSWER_TIMEOUT));
    // The guest's write went to the write cache (whatever its file layout:
    // the bytes the cache folder holds on disk), never to the repository.
    let cache = p.server.cache_files(SESSION);
    let written: u64 = cache
        .iter()
        .map(|f| {
            use std::os::unix::fs::MetadataExt;
            let path = p.server.cache_root().join(SESSION).join(f);
            std::fs::metadata(path).expect("cache file").blocks() * 512
        })
        .sum();
    assert!(
        written >= 1 << 20,
        "the guest's 1 MiB write is not in the write cache ({written} bytes; {cache:?})"
    );
    assert_eq!(
        repo_objects(&p.repo),
        p.repo_before,
        "the repository changed"
    );

    // Live migration to production storage while the guest runs.
    let prod = p.tmp.path().join("prod");
    let task = d
        .start_live_migration(&vm_ref, prod.to_str().expect("utf8"))
        .await
        .expect("start mirror");
    // Again: the same task, no second job.
    assert_eq!(
        d.start_live_migration(&vm_ref, prod.to_str().expect("utf8"))
            .await
            .expect("start again"),
        task
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut seen = Vec::new();
    loop {
        let status = d
            .live_migration_status(&vm_ref, &task)
            .await
            .expect("status");
        seen.push(status.clone());
        match status {
            MigrationStatus::Ready => break,
            MigrationStatus::Running { .. } => {}
            other => panic!("mirror went {other:?}; seen {seen:?}"),
        }
        assert!(Instant::now() < deadline, "mirror not ready: {seen:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The guest runs during the copy: it answers before the pivot.
    assert_eq!(serial.ask("ping", "pong", 0, ANSWER_TIMEOUT), "pong 1");
    d.complete_live_migration(&vm_ref, &task)
        .await
        .expect("pivot");
    assert_eq!(
        d.live_migration_status(&vm_ref, &task)
            .await
            .expect("status"),
        MigrationStatus::Completed
    );
    d.complete_live_migration(&vm_ref, &task)
        .await
        .expect("pivot again is a no-op");
    let migrated = prod.join("tiny-flat.vmdk");
    assert_eq!(
        drive_file(&vm_dir.join("qmp.sock")).await,
        migrated.to_str().expect("utf8")
    );

    // With revive's server gone, the guest still runs, reads and writes.
    p.server.stop();
    assert_eq!(serial.ask("ping", "pong", 1, ANSWER_TIMEOUT), "pong 2");
    let (w2, h2) = wrote(&serial.ask("sync-write", "REVIVE-WROTE", 1, ANSWER_TIMEOUT));

    d.power_off(&vm_ref).await.expect("power off");
    d.power_off(&vm_ref).await.expect("power off again");
    // Both guest writes are in the migrated disk, and the known file intact.
    assert_eq!(fat_file_sha256(&migrated, &w1), h1);
    assert_eq!(fat_file_sha256(&migrated, &w2), h2);
    assert_eq!(
        fat_file_sha256(&migrated, "known.bin"),
        p.image.known_sha256
    );
    d.unregister_vm(&vm_ref).await.expect("unregister");
    assert!(!vm_dir.exists());

    // Chunks, pages, points as before (the publication, and so its pin,
    // stays configured: unpublishing is the controller's job).
    assert_eq!(
        repo_objects(&p.repo),
        p.repo_before,
        "the repository changed"
    );
    run_ok(revive().arg("verify").arg("--repo").arg(&p.repo));
    println!("{DONE}");
}

const CLI_DONE: &str = "QEMU-CLI-ACCEPTANCE-PASSED";
const CLI_TEST: &str = "qemu::recover_power_on_and_migrate_live_through_the_cli";

/// Issue 6 acceptance, through the daemon and the CLI: `revive backup`,
/// `revive recover --host kvm1 --power-on` boots the guest under TCG from
/// the export (marker, expected hash; its write in the write cache, not the
/// repository); `revive migrate ID --method live --to DIR` mirrors while the
/// guest runs, pivots, and the session finishes with its folder
/// unpublished; the guest answers after the pivot, the migrated disk holds
/// its writes, `revive verify` passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_power_on_and_migrate_live_through_the_cli() {
    netns_test(qemu_vm_peers_or_skip, cli_inner, || {
        rerun_isolated(CLI_TEST, CLI_DONE, RUN_TIMEOUT)
    })
    .await;
}

async fn cli_inner() {
    let image = boot_image();
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = init_repo(tmp.path(), None);
    backup_json(&repo, &image.vm_dir, Some("tiny"));
    let repo_before = repo_objects(&repo);
    let run_dir = tmp.path().join("run");
    let mut server = ReviveServer::start(
        &tmp.path().join("server"),
        ServerSpec::new(&repo)
            .fixed_ports(2049, 20048, 111)
            .with_api()
            .log_level("revive=info")
            .toml(&format!(
                "[sessions]\nmin_free_cache = \"1MiB\"\n\n[[host]]\nname = \"kvm1\"\n\
                 driver = \"qemu\"\nnfs_address = \"127.0.0.1\"\nrun_dir = {:?}\naccel = \"tcg\"\n",
                run_dir.to_str().expect("utf8")
            )),
    );

    let started = Instant::now();
    let sessions = server.ctl_json(&[
        "recover",
        "--vm",
        "tiny",
        "--host",
        "kvm1",
        "--name",
        SESSION,
        "--power-on",
        "--wait",
    ]);
    let s = &sessions.as_array().expect("sessions")[0];
    assert_eq!(s["state"], "running", "{s:#}\nlog:\n{}", server.log());
    assert_eq!(s["driver"], "qemu");
    let id = s["id"].as_str().expect("id").to_string();
    let vm_dir = run_dir.join(SESSION);
    let serial = Serial::in_dir(&vm_dir);
    serial.wait_line(MARKER, 0, BOOT_TIMEOUT);
    println!(
        "recover to marker: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    serial.wait_line("REVIVE-READY", 0, BOOT_TIMEOUT);
    assert_eq!(
        serial.wait_line("REVIVE-KNOWN", 0, ANSWER_TIMEOUT),
        format!("REVIVE-KNOWN {}", image.known_sha256)
    );
    let (w1, h1) = wrote(&serial.wait_line("REVIVE-WROTE", 0, ANSWER_TIMEOUT));
    let shown = server.ctl_json(&["session", &id]);
    assert!(
        shown["cache_bytes"].as_u64().unwrap_or(0) >= 1 << 20,
        "the guest's write is not in the write cache: {shown:#}"
    );
    assert_eq!(repo_objects(&repo), repo_before, "the repository changed");

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
    assert_eq!(done["migration"]["percent"], 100);
    let migrated = prod.join("tiny-flat.vmdk");
    assert_eq!(
        drive_file(&vm_dir.join("qmp.sock")).await,
        migrated.to_str().expect("utf8")
    );
    // The guest runs on from the local file: it answers and writes.
    assert_eq!(serial.ask("ping", "pong", 0, ANSWER_TIMEOUT), "pong 1");
    let (w2, h2) = wrote(&serial.ask("sync-write", "REVIVE-WROTE", 1, ANSWER_TIMEOUT));
    // The session finalized: its export folder is gone.
    let listed = run_tool("nfs-ls", &["nfs://127.0.0.1/revive"]).await;
    assert!(listed.status.success(), "nfs-ls: {listed:?}");
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains(SESSION),
        "folder still published: {listed:?}"
    );

    // The production VM is QEMU's now; power it off with the driver.
    let d = driver(&run_dir);
    let vm_ref = VmRef(SESSION.into());
    d.power_off(&vm_ref).await.expect("power off");
    assert_eq!(fat_file_sha256(&migrated, &w1), h1);
    assert_eq!(fat_file_sha256(&migrated, &w2), h2);
    assert_eq!(fat_file_sha256(&migrated, "known.bin"), image.known_sha256);
    d.unregister_vm(&vm_ref).await.expect("unregister");

    server.stop();
    // The session ended: its pin is gone, every file is as before.
    assert_eq!(snapshot_tree(&repo), repo_before, "the repository changed");
    run_ok(revive().arg("verify").arg("--repo").arg(&repo));
    println!("{CLI_DONE}");
}

const BENCH_DONE: &str = "QEMU-BOOT-BENCH-DONE";
const BENCH: &str = "qemu::boot_time_from_the_datastore_vs_a_local_file";

/// `scripts/bench-boot.sh` runs this (ignored in the normal run): time from
/// power on to the guest's marker, booted from the NFS export vs the same
/// disk as a local file, alternating, `REVIVE_BENCH_REPEATS` times each.
/// Prints `BENCH-BOOT <nfs|local> <seconds>` lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: scripts/bench-boot.sh"]
async fn boot_time_from_the_datastore_vs_a_local_file() {
    netns_test(qemu_vm_peers_or_skip, bench_inner, || {
        rerun_isolated(BENCH, BENCH_DONE, Duration::from_secs(1800))
    })
    .await;
}

async fn bench_inner() {
    let p = publish().await;
    let repeats: usize = std::env::var("REVIVE_BENCH_REPEATS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let ds = datastore();
    for i in 0..repeats {
        for mode in ["nfs", "local"] {
            // A fresh run folder per boot: no serial log from an earlier one.
            let run_dir = p.tmp.path().join(format!("run-{mode}-{i}"));
            let d = driver(&run_dir);
            let name = format!("bench-{mode}-{i}");
            let start = Instant::now();
            let vm_ref = if mode == "nfs" {
                let vm = vm_spec(&p.image.vm_dir, &name, SESSION, Some(256));
                d.validate(&vm).await.expect("validate");
                d.attach_datastore(&ds).await.expect("attach");
                let r = d.register_vm(&ds, &vm).await.expect("register");
                d.power_on(&r).await.expect("power on");
                r
            } else {
                // The same image as a local file (a private copy: the guest writes).
                let local = p.tmp.path().join(format!("local-{i}"));
                std::fs::create_dir_all(&local).expect("mkdir");
                for f in std::fs::read_dir(&p.image.vm_dir).expect("read") {
                    let f = f.expect("entry");
                    std::fs::copy(f.path(), local.join(f.file_name())).expect("copy");
                }
                let vm = vm_spec(&local, &name, "", Some(256));
                d.validate(&vm).await.expect("validate");
                d.start_from_copy(&vm, &local)
                    .await
                    .expect("start local")
                    .expect("vm")
            };
            let serial = Serial::in_dir(&run_dir.join(&name));
            serial.wait_line(MARKER, 0, BOOT_TIMEOUT);
            let secs = start.elapsed().as_secs_f64();
            println!("BENCH-BOOT {mode} {secs:.2}");
            serial.wait_line("REVIVE-READY", 0, BOOT_TIMEOUT);
            d.power_off(&vm_ref).await.expect("power off");
            d.unregister_vm(&vm_ref).await.expect("unregister");
        }
    }
    println!("{BENCH_DONE}");
}
