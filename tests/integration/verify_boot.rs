//! Verification boots (`revive verify --boot`) with the real QEMU driver:
//! the test VM's restore point boots ok; a copy with its boot sector zeroed,
//! backed up as a newer point, fails with the reason and a screenshot; and
//! afterwards nothing runs, nothing is published or cached, and the
//! repository holds only the result objects beyond what it held before.

use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use crate::support::client::run_tool;
use crate::support::qemu::*;
use crate::support::server::{ReviveServer, ServerSpec};
use crate::support::*;

const DONE: &str = "VERIFY-BOOT-CHECKS-PASSED";
const TEST: &str = "verify_boot::a_good_point_verifies_and_a_broken_one_fails_leaving_nothing";
/// The test guest prints this on its serial console once booted.
const MARKER: &str = "REVIVE-GUEST-BOOTED";
/// Long enough for the guest under TCG (it shows its marker in ~5 s here);
/// the broken point takes all of it.
const BOOT_TIMEOUT_SECS: &str = "60";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_point_verifies_and_a_broken_one_fails_leaving_nothing() {
    netns_test(qemu_vm_peers_or_skip, inner, || {
        rerun_isolated(TEST, DONE, Duration::from_secs(600))
    })
    .await;
}

/// `revive serve` on 111/2049 with the API and a qemu host `lab` that
/// `[verify]` boots on, watching for the test guest's marker.
fn lab_server(dir: &Path, repo: &Path) -> ReviveServer {
    ReviveServer::start(
        &dir.join("server"),
        ServerSpec::new(repo)
            .fixed_ports(2049, 20048, 111)
            .with_api()
            .log_level("revive=info")
            .toml(&format!(
                "[sessions]\nmin_free_cache = \"1MiB\"\n\n\
                 [verify]\nhost = \"lab\"\nconsole = \"{MARKER}\"\n\n\
                 [[host]]\nname = \"lab\"\ndriver = \"qemu\"\nnfs_address = \"127.0.0.1\"\n\
                 run_dir = {:?}\naccel = \"tcg\"\n",
                dir.join("run").to_str().expect("utf8")
            )),
    )
}

/// The repository's files apart from pins (a session's, gone when it ends)
/// and verification results (what a verification may add).
fn repo_objects(repo: &Path) -> std::collections::BTreeMap<std::path::PathBuf, String> {
    let (pins, checks) = (repo.join("pins"), repo.join("checks"));
    snapshot_tree(repo)
        .into_iter()
        .filter(|(path, _)| !path.starts_with(&pins) && !path.starts_with(&checks))
        .collect()
}

async fn inner() {
    let image = boot_image();
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = init_repo(tmp.path(), None);
    let good = backup_json(&repo, &image.vm_dir, Some("tiny"))["id"]
        .as_str()
        .expect("id")
        .to_string();
    // The same VM with its boot sector zeroed: the BIOS finds nothing to boot.
    let broken_dir = tmp.path().join("broken");
    std::fs::create_dir(&broken_dir).expect("mkdir");
    for entry in std::fs::read_dir(&image.vm_dir).expect("vm dir") {
        let path = entry.expect("entry").path();
        std::fs::copy(&path, broken_dir.join(path.file_name().expect("name"))).expect("copy");
    }
    let flat = broken_dir.join("tiny-flat.vmdk");
    let mut disk = std::fs::read(&flat).expect("read disk");
    disk[..512].fill(0);
    std::fs::write(&flat, &disk).expect("write disk");
    let broken = backup_json(&repo, &broken_dir, Some("tiny"))["id"]
        .as_str()
        .expect("id")
        .to_string();
    let before = repo_objects(&repo);

    let mut server = lab_server(tmp.path(), &repo);

    let out = server
        .ctl()
        .args(["verify", "--boot", "--json", "--parallel", "2", "--timeout"])
        .arg(BOOT_TIMEOUT_SECS)
        .args([&good, &broken])
        .output()
        .expect("run revive verify --boot");
    assert_eq!(
        out.status.code(),
        Some(1),
        "one point fails, so the exit status is 1: {out:?}\nlog:\n{}",
        server.log()
    );
    let job: Value = serde_json::from_slice(&out.stdout).expect("json report");
    let result = |id: &str| -> Value {
        job["items"]
            .as_array()
            .expect("items")
            .iter()
            .find(|i| i["point"] == id)
            .map(|i| i["result"].clone())
            .unwrap_or_else(|| panic!("{id} missing from {job:#}"))
    };
    let ok = result(&good);
    assert_eq!(ok["verdict"], "ok", "{job:#}\nlog:\n{}", server.log());
    assert!(
        ok["signals"][0].as_str().unwrap_or("").contains(MARKER),
        "{ok:#}"
    );
    let failed = result(&broken);
    assert_eq!(failed["verdict"], "failed", "{job:#}");
    let reason = failed["reason"].as_str().expect("reason");
    assert!(
        reason.contains(&format!("no console line matched '{MARKER}'"))
            && reason.contains(&format!("within {BOOT_TIMEOUT_SECS} s")),
        "{reason}"
    );
    assert_eq!(failed["screenshot"], true, "{failed:#}");
    println!("broken point: {reason}");

    // The screenshot of the broken boot is a PNG, served by the API.
    let shot = api_get_bytes(&server, &format!("/api/v1/points/{broken}/boot.png")).await;
    assert!(
        shot.starts_with(b"\x89PNG\r\n\x1a\n"),
        "not a PNG: {} bytes",
        shot.len()
    );
    let target_copy = Path::new(env!("CARGO_TARGET_TMPDIR")).join("verify-boot-broken.png");
    std::fs::write(&target_copy, &shot).expect("keep screenshot");

    // Nothing is left: the sessions ended, no QEMU runs (this test has its
    // own pid namespace), no folder is published, no cache remains.
    let sessions = server.ctl_json(&["sessions"]);
    for s in sessions.as_array().expect("sessions") {
        assert_eq!(s["state"], "cancelled", "{s:#}");
    }
    let qemu = live_processes("qemu-system");
    assert!(qemu.is_empty(), "QEMU still runs: {qemu:?}");
    let listed = run_tool("nfs-ls", &["nfs://127.0.0.1/revive"]).await;
    assert!(listed.status.success(), "nfs-ls: {listed:?}");
    assert!(
        !String::from_utf8_lossy(&listed.stdout).contains("verify-"),
        "a verification folder is still published: {listed:?}"
    );
    let caches = server.state_dir().join("verify-cache");
    let left: Vec<_> = std::fs::read_dir(&caches)
        .map(|d| d.map(|e| e.expect("entry").file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "write caches left: {left:?}");

    // `revive points` shows the verdicts; the repository is as before apart
    // from the result objects, and still verifies.
    server.stop();
    let points = run_ok(revive().arg("points").arg("--repo").arg(&repo));
    let line = |id: &str| {
        points
            .lines()
            .find(|l| l.starts_with(id))
            .unwrap_or_else(|| panic!("{id} not listed:\n{points}"))
            .to_string()
    };
    assert!(line(&good).trim_end().ends_with("ok"), "{points}");
    assert!(line(&broken).trim_end().ends_with("failed"), "{points}");
    assert_eq!(repo_objects(&repo), before, "the repository changed");
    assert!(repo.join("checks").join(&good).join("boot.json").exists());
    run_ok(revive().arg("verify").arg("--repo").arg(&repo));
    println!("{DONE}");
}

const BENCH: &str = "verify_boot::time_to_verify_one_vs_four_points_two_at_a_time";
const BENCH_DONE: &str = "VERIFY-BOOT-BENCH-DONE";

/// `scripts/bench-verify.sh` runs this (ignored in the normal run): the
/// wall time of `revive verify --boot` for 1 point, then for 4 points with
/// `--parallel 2`. Prints `BENCH-VERIFY <points> <seconds>` lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: scripts/bench-verify.sh"]
async fn time_to_verify_one_vs_four_points_two_at_a_time() {
    netns_test(qemu_vm_peers_or_skip, bench_inner, || {
        rerun_isolated(BENCH, BENCH_DONE, Duration::from_secs(1800))
    })
    .await;
}

async fn bench_inner() {
    let image = boot_image();
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = init_repo(tmp.path(), None);
    let points: Vec<String> = (0..4)
        .map(|_| {
            backup_json(&repo, &image.vm_dir, Some("tiny"))["id"]
                .as_str()
                .expect("id")
                .to_string()
        })
        .collect();
    let server = lab_server(tmp.path(), &repo);
    for set in [&points[..1], &points[..]] {
        let started = std::time::Instant::now();
        let out = server
            .ctl()
            .args([
                "verify",
                "--boot",
                "--json",
                "--parallel",
                "2",
                "--timeout",
                "300",
            ])
            .args(set)
            .output()
            .expect("run revive verify --boot");
        assert!(out.status.success(), "{out:?}\nlog:\n{}", server.log());
        println!(
            "BENCH-VERIFY {} {:.2}",
            set.len(),
            started.elapsed().as_secs_f64()
        );
    }
    println!("{BENCH_DONE}");
}

/// GET on the server's API with its token.
async fn api_get_bytes(server: &ReviveServer, path: &str) -> Vec<u8> {
    let resp = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{}{path}",
            server.api_port.expect("API")
        ))
        .bearer_auth(crate::support::server::API_TOKEN)
        .send()
        .await
        .expect("GET");
    assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
    resp.bytes().await.expect("body").to_vec()
}

/// Command lines of processes (not zombies: QEMU daemonizes, and in this
/// pid namespace its exit status waits for a reaper) that contain `name`.
fn live_processes(name: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let dir = entry.expect("entry").path();
        let (Ok(stat), Ok(cmdline)) = (
            std::fs::read_to_string(dir.join("stat")),
            std::fs::read(dir.join("cmdline")),
        ) else {
            continue;
        };
        // The state follows the parenthesised command name.
        let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if state != Some(Some('Z')) && cmdline.contains(name) {
            found.push(cmdline);
        }
    }
    found
}
