//! Block recovery sessions through the daemon and the CLI:
//! `revive recover --kind block` serves a restore point's disk over NBD
//! (publish-only host, or a QEMU host whose TCG guest boots from it), and
//! `revive migrate --method copy` moves it to production storage while it
//! is served, then switches over.

use std::time::{Duration, Instant};

use super::repo_objects;
use crate::support::client::run_tool;
use crate::support::nbd::*;
use crate::support::qemu::*;
use crate::support::server::{ReviveServer, ServerSpec};
use crate::support::vm::SampleVm;
use crate::support::*;

const MIB: u64 = 1 << 20;
fn state(s: &serde_json::Value) -> &str {
    s["state"].as_str().unwrap_or("")
}

/// `recover --kind block` with the publish-only host: the session runs
/// with its disk on NBD (URL in the session), clients write to it, and
/// `migrate --method copy` copies it while it is served, removes the export
/// at switchover and leaves the destination equal to the backup plus every
/// write; the repository is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_session_serves_the_disk_and_migrates_by_copy() {
    if !nbd_peers_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = init_repo(tmp.path(), None);
    let vm = SampleVm::create(&tmp.path().join("src"), "pg01", 16 * MIB, 31);
    backup_json(&repo, &vm.dir, None);
    let repo_before = repo_objects(&repo);
    let server = ReviveServer::start(
        &tmp.path().join("server"),
        ServerSpec::new(&repo)
            .with_api()
            .with_nbd()
            .log_level("revive=info")
            .toml("[sessions]\nmin_free_cache = \"1MiB\"\n"),
    );
    let disk = format!("{}-flat.vmdk", vm.name);
    // --disk names a file the point lacks: refused at validation.
    let out = run(server.ctl().args([
        "recover", "--vm", "pg01", "--kind", "block", "--disk", "nope.img", "--name", "bad",
        "--wait", "--json",
    ]));
    assert_eq!(
        out.status.code(),
        Some(3),
        "--wait ends short of running: {out:?}"
    );
    let bad: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(state(&bad[0]), "failed", "{bad:#}");
    assert!(
        bad[0]["error"].as_str().unwrap_or("").contains("nope.img"),
        "{bad:#}"
    );

    let sessions = server.ctl_json(&[
        "recover", "--vm", "pg01", "--kind", "block", "--disk", &disk, "--wait",
    ]);
    let s = &sessions[0];
    assert_eq!(state(s), "running", "{s:#}\nlog:\n{}", server.log());
    let id = s["id"].as_str().expect("id").to_string();
    let name = s["name"].as_str().expect("name").to_string();
    let url = s["block"]["url"].as_str().expect("block url").to_string();
    assert_eq!(url, server.nbd_url(&name));
    assert_eq!(s["block"]["disk"], disk.as_str());

    let writes: Vec<(u64, u8)> = (0..24u64)
        .map(|i| ((i * 613 + 7) % 4096 * 4096, i as u8 + 1))
        .collect();
    let commands: Vec<String> = writes
        .iter()
        .map(|(off, fill)| format!("write -f -P {fill} {off} 4k"))
        .collect();
    qemu_io(&url, &commands).await;
    let mut expected = std::fs::read(vm.flat()).expect("read disk");
    for (off, fill) in &writes {
        expected[*off as usize..(*off + 4096) as usize].fill(*fill);
    }

    let dest = tmp.path().join("prod");
    let done = server.ctl_json(&[
        "migrate",
        &id,
        "--method",
        "copy",
        "--to",
        dest.to_str().expect("utf8"),
        "--wait",
    ]);
    assert_eq!(state(&done), "done", "{done:#}\nlog:\n{}", server.log());
    let copied = std::fs::read(dest.join(&name).join(&disk)).expect("read copy");
    assert!(
        copied == expected,
        "the copy lacks writes or differs from the backup"
    );
    // The export went with the session.
    let gone = tool("nbdinfo", &[&url]).await;
    assert!(
        !gone.status.success(),
        "export still served after switchover"
    );
    assert!(
        !server.cache_root().join(&name).exists(),
        "write cache left behind"
    );
    assert_eq!(repo_objects(&repo), repo_before, "the repository changed");
}

const BOOT_DONE: &str = "NBD-TCG-BOOT-PASSED";
const BOOT_TEST: &str = "nbd::sessions::a_tcg_guest_boots_from_nbd_with_the_qemu_driver";

/// Acceptance: `revive recover --kind block --host kvm1 --power-on` boots
/// the tiny TCG guest from `nbd://` (marker, the known file's hash read
/// from its disk, its write in the write cache); `revive stop` ends it, and
/// the repository is unchanged and verifies. Re-run in private network and
/// pid namespaces so that the daemonized QEMU dies with the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcg_guest_boots_from_nbd_with_the_qemu_driver() {
    if in_netns() {
        return boot_inner().await;
    }
    if !qemu_vm_peers_or_skip() || !nbd_peers_or_skip() {
        return;
    }
    rerun_isolated(BOOT_TEST, BOOT_DONE, Duration::from_secs(600)).await;
}

async fn boot_inner() {
    let up = run_tool("ip", &["link", "set", "lo", "up"]).await;
    assert!(up.status.success(), "ip link set lo up: {up:?}");
    let image = boot_image();
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = init_repo(tmp.path(), None);
    backup_json(&repo, &image.vm_dir, Some("tiny"));
    let repo_before = repo_objects(&repo);
    let run_dir = tmp.path().join("run");
    let mut server = ReviveServer::start(
        &tmp.path().join("server"),
        ServerSpec::new(&repo)
            .with_api()
            .with_nbd()
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
        "--kind",
        "block",
        "--host",
        "kvm1",
        "--power-on",
        "--wait",
    ]);
    let s = &sessions[0];
    assert_eq!(state(s), "running", "{s:#}\nlog:\n{}", server.log());
    let id = s["id"].as_str().expect("id").to_string();
    let name = s["name"].as_str().expect("name").to_string();
    let url = s["block"]["url"].as_str().expect("url").to_string();
    assert!(url.starts_with("nbd://127.0.0.1:"), "{url}");
    let spec = std::fs::read_to_string(run_dir.join(&name).join("spec.json")).expect("spec");
    assert!(
        spec.contains(&url),
        "QEMU does not open the disk from the export: {spec}"
    );

    let serial = Serial::in_dir(&run_dir.join(&name));
    serial.wait_line(MARKER, 0, Duration::from_secs(240));
    println!(
        "recover --kind block to marker: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(
        serial.wait_line("REVIVE-KNOWN", 0, Duration::from_secs(60)),
        format!("REVIVE-KNOWN {}", image.known_sha256),
        "the guest read other bytes than were backed up"
    );
    serial.wait_line("REVIVE-WROTE", 0, Duration::from_secs(60));
    let shown = server.ctl_json(&["session", &id]);
    assert!(
        shown["cache_bytes"].as_u64().unwrap_or(0) >= MIB,
        "the guest's write is not in the write cache: {shown:#}"
    );
    let metrics = server.metrics().await;
    assert!(
        metrics.contains(&format!(
            "revive_block_connections_open{{export=\"{name}\",protocol=\"nbd\"}} 1"
        )),
        "{metrics}"
    );
    assert_eq!(repo_objects(&repo), repo_before, "the repository changed");

    let stopped = server.ctl_json(&["stop", &id, "--wait"]);
    assert_eq!(
        state(&stopped),
        "cancelled",
        "{stopped:#}\nlog:\n{}",
        server.log()
    );
    let gone = tool("nbdinfo", &[&url]).await;
    assert!(!gone.status.success(), "export still served after stop");
    server.stop();
    assert_eq!(snapshot_tree(&repo), repo_before, "the repository changed");
    run_ok(revive().arg("verify").arg("--repo").arg(&repo));
    println!("{BOOT_DONE}");
}
