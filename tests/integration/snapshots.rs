//! Issue 13: instant recovery from storage snapshots, through the real
//! daemon and CLI. A btrfs file system made by the test (loop device, in a
//! private mount namespace) holds a subvolume of VM folders and a read-only
//! snapshot of it; `revive recover --point snap:pool1/snaps/ds1@1` runs the
//! VMs from a writable clone that revive makes, shares, presents and
//! destroys.
//!
//! - vSphere through vcsim: one clone for three VMs, a second clone for a
//!   second operation on one of them, and nothing left after stop.
//! - kill -9 during clone creation, bad input (`none` driver).
//! - A TCG guest boots from a btrfs clone over revive's NFS and from a Ceph
//!   RBD clone under the QEMU driver (`snapshots/boot.rs`).
//!
//! vcsim reads a NAS datastore's `localPath` as a folder: the controller
//! gives it the clone's folder, which is what the export serves. vcsim
//! wants `<registered name>.nvram` beside the `.vmx` (ESXi reads the
//! `.vmx`'s `nvram` key): the sample VM folders carry copies under the
//! session names the test uses.

mod bench;
mod boot;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::btrfs::{btrfs_or_skip, rerun_private_mounts, BtrfsPool};
use crate::support::client::run_tool;
use crate::support::server::{ReviveServer, ServerSpec};
use crate::support::vcsim::{inventory, vcsim_or_skip, Mode, Vcsim, PASSWORD, USER};
use crate::support::vm::SampleVm;
use crate::support::*;

/// Longest wait for a session to reach a state.
const LIMIT: Duration = Duration::from_secs(90);
/// Whole inner run of a test.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// The snapshot every test recovers from.
const SNAP: &str = "snap:pool1/snaps/ds1@1";

/// A btrfs pool with `ds1` holding sample VMs, its snapshot `snaps/ds1@1`,
/// and `revive serve` (API on) with source `pool1` and `toml(pool mount)` appended.
struct Lab {
    /// Fields drop in this order: the server stops, the pool is unmounted,
    /// then the folder holding both goes.
    server: ReviveServer,
    pool: BtrfsPool,
    /// Every file of the snapshot with its hash, before any session.
    snapshot_before: std::collections::BTreeMap<PathBuf, String>,
    _tmp: tempfile::TempDir,
}

impl Lab {
    /// `vms` of 1 MiB each, with NVRAM copies named after `sessions` (for vcsim).
    fn start(
        vms: &[&str],
        sessions: &[&str],
        toml: impl FnOnce(&Path) -> String,
        env: &[(&str, String)],
    ) -> Lab {
        let tmp = tempfile::tempdir().expect("tempdir");
        let pool = BtrfsPool::create(&tmp.path().join("pool"), "1G");
        let ds1 = pool.subvolume("ds1");
        for (i, name) in vms.iter().enumerate() {
            let vm = SampleVm::create(&ds1, name, 1 << 20, 130 + i as u64);
            for s in sessions.iter().filter(|s| s.starts_with(name)) {
                std::fs::copy(
                    vm.dir.join(format!("{name}.nvram")),
                    vm.dir.join(format!("{s}.nvram")),
                )
                .expect("nvram copy for vcsim");
            }
        }
        let snap = pool.snapshot("ds1", "snaps/ds1@1");
        let snapshot_before = snapshot_tree(&snap);
        let repo = init_repo(tmp.path(), None);
        let mut spec = ServerSpec::new(&repo)
            .with_api()
            .log_level("revive=info")
            .toml(&format!(
                "[sessions]\nmin_free_cache = \"1MiB\"\n{}\n{}",
                toml(&pool.mnt),
                pool.source_toml("pool1", "")
            ));
        spec.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let server = ReviveServer::start(&tmp.path().join("server"), spec);
        Lab {
            server,
            pool,
            snapshot_before,
            _tmp: tmp,
        }
    }

    fn config(&self) -> PathBuf {
        self.server.dir.join("revive.toml")
    }

    /// `revive recover ARGS --json` (whatever the exit code): the sessions,
    /// or the error printed.
    fn recover(&self, args: &[&str]) -> Result<Vec<Value>, String> {
        let out = run(self.server.ctl().arg("recover").args(args).arg("--json"));
        let text = String::from_utf8_lossy(&out.stdout);
        match serde_json::from_str::<Value>(&text) {
            Ok(v) => Ok(v.as_array().expect("sessions").clone()),
            Err(_) => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
        }
    }

    fn wait_state(&self, id: &str, state: &str) -> Value {
        self.server
            .wait_session(id, LIMIT, state, |s| s["state"] == state)
    }

    fn stop(&self, id: &str) {
        let s = self.server.ctl_json(&["stop", id, "--wait"]);
        assert_eq!(
            s["state"],
            "cancelled",
            "{s:#}\nlog:\n{}",
            self.server.log()
        );
    }

    fn sessions(&self) -> Vec<Value> {
        self.server
            .ctl_json(&["sessions"])
            .as_array()
            .expect("sessions")
            .clone()
    }

    /// The clone gauges of `/metrics`: (clones, sessions using them) of source pool1.
    async fn clone_gauges(&self) -> (String, String) {
        let text = reqwest::Client::new()
            .get(format!(
                "http://127.0.0.1:{}/metrics",
                self.server.api_port.expect("api")
            ))
            .bearer_auth(crate::support::server::API_TOKEN)
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text");
        let gauge = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}{{source=\"pool1\"}} ")))
                .unwrap_or_else(|| panic!("no {name} of pool1 in:\n{text}"))
                .to_string()
        };
        (
            gauge("revive_snapshot_clones"),
            gauge("revive_snapshot_clone_users"),
        )
    }

    /// Exports of snapshot clones, as revive persisted them.
    fn clone_exports(&self) -> Vec<String> {
        let path = self.server.state_dir().join("passthrough.json");
        let Ok(raw) = std::fs::read(&path) else {
            return Vec::new();
        };
        let v: Value = serde_json::from_slice(&raw).expect("passthrough.json");
        v["exports"]
            .as_array()
            .expect("exports")
            .iter()
            .map(|e| e["path"].as_str().expect("path").to_string())
            .collect()
    }

    /// Clone records of the controller.
    fn clone_records(&self) -> Vec<String> {
        let dir = self.server.state_dir().join("clones");
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    /// Nothing of any clone is left, and the snapshot is as it was.
    fn assert_clean(&self) {
        assert_eq!(
            self.pool.clones(),
            Vec::<(u64, String)>::new(),
            "clones left"
        );
        assert_eq!(self.clone_exports(), Vec::<String>::new(), "exports left");
        assert_eq!(self.clone_records(), Vec::<String>::new(), "records left");
        assert_eq!(
            snapshot_tree(&self.pool.mnt.join("snaps/ds1@1")),
            self.snapshot_before,
            "the snapshot changed"
        );
    }
}

fn id(s: &Value) -> String {
    s["id"].as_str().expect("id").to_string()
}

const SHARE_DONE: &str = "SNAPSHOT-SHARING-PASSED";
const SHARE_TEST: &str = "snapshots::btrfs_clones_are_shared_per_snapshot_and_gone_after_stop";

/// Three VMs from one btrfs snapshot on a vSphere host (vcsim) run from
/// exactly one clone, mounted as one datastore; a second operation on one
/// of them gets a second clone; the clone export admits only the host's
/// address; a restart keeps the clones in use; after stopping everything
/// no clone, export, datastore or VM is left and the snapshot's files hash
/// as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn btrfs_clones_are_shared_per_snapshot_and_gone_after_stop() {
    if in_netns() {
        return share_inner().await;
    }
    if !btrfs_or_skip() || vcsim_or_skip().is_none() || skip_without_libnfs() {
        return;
    }
    rerun_private_mounts(SHARE_TEST, SHARE_DONE, RUN_TIMEOUT).await;
}

async fn share_inner() {
    let binary = vcsim_or_skip().expect("vcsim");
    let scratch = tempfile::tempdir().expect("tempdir");
    let vcsim = Vcsim::start(&binary, Mode::Esx, scratch.path());
    let unused_nas = scratch.path().join("vcsim-nas/unused");
    let host = format!(
        "[[host]]\nname = \"esx-sim\"\ndriver = \"vsphere\"\nnfs_address = \"127.0.0.1\"\n\
         nfs_clients = [\"127.0.0.9\"]\nurl = {:?}\nuser = {USER:?}\npassword = {PASSWORD:?}\n\
         ca_file = {:?}\nnas_local_path = {:?}\ntask_timeout_secs = 30\n",
        vcsim.url,
        vcsim.ca_file().to_str().expect("utf8"),
        unused_nas.to_str().expect("utf8"),
    );
    let mut lab = Lab::start(
        &["web01", "web02", "web03"],
        &["web01-ir", "web02-ir", "web03-ir", "web01-second"],
        |_| host.clone(),
        &[],
    );

    // The snapshot is listed beside the repository's points, with its VMs.
    let listed = run_ok(
        revive()
            .args(["points", "--source", "snap:pool1", "--json", "--config"])
            .arg(lab.config()),
    );
    let listed: Value = serde_json::from_str(&listed).expect("points json");
    let point = &listed.as_array().expect("points")[0];
    assert_eq!(point["point"], SNAP, "{listed:#}");
    let vms: Vec<&str> = point["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .map(|v| v["name"].as_str().expect("name"))
        .collect();
    assert_eq!(vms, ["web01", "web02", "web03"]);

    // Three VMs, one snapshot: one clone, one datastore.
    let started = lab
        .recover(&[
            "--vm",
            "web01",
            "--vm",
            "web02",
            "--vm",
            "web03",
            "--point",
            SNAP,
            "--host",
            "esx-sim",
            "--power-on",
            "--wait",
        ])
        .unwrap_or_else(|e| panic!("recover: {e}\nlog:\n{}", lab.server.log()));
    assert_eq!(started.len(), 3);
    for s in &started {
        assert_eq!(s["state"], "running", "{s:#}\nlog:\n{}", lab.server.log());
    }
    let clones = lab.pool.clones();
    assert_eq!(clones.len(), 1, "{clones:?}");
    let clone = clones[0].1.rsplit('/').next().expect("name").to_string();
    assert_eq!(lab.clone_gauges().await, ("1".into(), "3".into()));
    assert!(
        started
            .iter()
            .any(|s| clone == format!("revive-clone-{}", id(s))),
        "clone {clone} is not named after a session"
    );
    let inv = inventory(&vcsim, "web").await;
    assert_eq!(
        inv.nas,
        [(
            clone.clone(),
            "127.0.0.1".to_string(),
            format!("/snap/{clone}")
        )]
    );
    let names: Vec<(&str, &str)> = inv
        .vms
        .iter()
        .map(|(n, p, _)| (n.as_str(), p.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("web01-ir", "poweredOn"),
            ("web02-ir", "poweredOn"),
            ("web03-ir", "poweredOn")
        ]
    );
    assert!(inv
        .vms
        .iter()
        .all(|(_, _, ds)| ds == std::slice::from_ref(&clone)));
    // The clone's export admits the host's address only (127.0.0.9 here),
    // not this test's 127.0.0.1, which the sessions' export does admit.
    let refused = run_tool("nfs-ls", &[&lab.server.url(&format!("/snap/{clone}"))]).await;
    assert!(!refused.status.success(), "clone export open to 127.0.0.1");
    let allowed = run_tool("nfs-ls", &[&lab.server.url("/revive")]).await;
    assert!(allowed.status.success(), "{allowed:?}");

    // A restart keeps the clone in use and its export.
    lab.server.restart();
    for s in &started {
        assert_eq!(lab.wait_state(&id(s), "running")["state"], "running");
    }
    assert_eq!(lab.pool.clones(), clones, "the restart touched the clone");
    assert_eq!(lab.clone_exports(), [format!("/snap/{clone}")]);

    // A second operation on web01: a clone of its own.
    let second = lab
        .recover(&[
            "--vm",
            "web01",
            "--point",
            SNAP,
            "--host",
            "esx-sim",
            "--name",
            "web01-second",
            "--power-on",
            "--wait",
        ])
        .unwrap_or_else(|e| panic!("recover: {e}\nlog:\n{}", lab.server.log()));
    assert_eq!(second[0]["state"], "running", "{:#}", second[0]);
    assert_eq!(lab.pool.clones().len(), 2);
    assert_eq!(lab.clone_gauges().await, ("2".into(), "4".into()));
    assert_eq!(inventory(&vcsim, "web").await.nas.len(), 2);
    assert_eq!(inventory(&vcsim, "web").await.vms.len(), 4);

    // Stopping the first session keeps the shared clone for the others.
    lab.stop(&id(&started[0]));
    assert_eq!(lab.pool.clones().len(), 2);
    for s in started.iter().skip(1).chain(second.iter()) {
        lab.stop(&id(s));
    }
    lab.assert_clean();
    assert_eq!(lab.clone_gauges().await, ("0".into(), "0".into()));
    let inv = inventory(&vcsim, "web").await;
    assert_eq!(inv.nas, Vec::<(String, String, String)>::new());
    assert_eq!(inv.vms.len(), 0, "{:?}", inv.vms);
    lab.server.stop();
    println!("{SHARE_DONE}");
}

const KILL_DONE: &str = "SNAPSHOT-KILL-PASSED";
const KILL_TEST: &str = "snapshots::kill_during_clone_creation_leaves_no_stray_clone";

/// revive killed (-9) while it creates a clone, after recording it and
/// before or after the storage made it: the restart sweeps what was made,
/// the session makes its clone again and runs, no clone is left over, and
/// stopping it leaves none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_during_clone_creation_leaves_no_stray_clone() {
    if in_netns() {
        return kill_inner().await;
    }
    if !btrfs_or_skip() {
        return;
    }
    rerun_private_mounts(KILL_TEST, KILL_DONE, RUN_TIMEOUT).await;
}

async fn kill_inner() {
    for point in ["recorded", "cloned"] {
        let marker_dir = tempfile::tempdir().expect("tempdir");
        let marker = marker_dir.path().join("paused");
        let mut lab = Lab::start(
            &["web01"],
            &[],
            |_| String::new(),
            &[(
                revive::controller::clones::TEST_PAUSE_ENV,
                format!("{point}:{}", marker.display()),
            )],
        );
        let out = run(lab
            .server
            .ctl()
            .args(["recover", "--vm", "web01", "--point", SNAP, "--json"]));
        let sessions: Value = serde_json::from_slice(&out.stdout).expect("recover json");
        let session = id(&sessions[0]);
        let deadline = Instant::now() + LIMIT;
        while !marker.exists() {
            assert!(
                Instant::now() < deadline,
                "never paused at {point}\nlog:\n{}",
                lab.server.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let made = lab.pool.clones();
        assert_eq!(made.len(), usize::from(point == "cloned"), "{made:?}");
        assert_eq!(
            lab.clone_records().len(),
            1,
            "not recorded before the storage call"
        );
        lab.server.kill9();

        lab.server.restart();
        let s = lab.wait_state(&session, "running");
        assert_eq!(s["state"], "running");
        let clones = lab.pool.clones();
        assert_eq!(clones.len(), 1, "{point}: {clones:?}");
        assert!(clones[0].1.ends_with(&format!("revive-clone-{session}")));
        if let Some((old_id, _)) = made.first() {
            // The half-made clone was swept and made again.
            assert_ne!(
                clones[0].0, *old_id,
                "the clone made before the kill was reused"
            );
            assert!(lab.server.log().contains("sweeping clone"));
        }
        lab.stop(&session);
        lab.assert_clean();
        lab.server.stop();
    }
    println!("{KILL_DONE}");
}

const BAD_DONE: &str = "SNAPSHOT-BAD-INPUT-PASSED";
const BAD_TEST: &str = "snapshots::bad_snapshot_input_is_refused_and_leaves_nothing";

/// Unknown source or snapshot, a snapshot without the VM, a storage CLI
/// that is missing or fails: each ends with an error naming it, and no
/// clone, export or record is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_snapshot_input_is_refused_and_leaves_nothing() {
    if in_netns() {
        return bad_inner().await;
    }
    if !btrfs_or_skip() {
        return;
    }
    rerun_private_mounts(BAD_TEST, BAD_DONE, RUN_TIMEOUT).await;
}

async fn bad_inner() {
    let elsewhere = tempfile::tempdir().expect("tempdir");
    let other_fs = elsewhere.path().join("clones");
    let lab_toml = |pool: &Path| -> String {
        format!(
            "\n[[snapshot_source]]\nname = \"nocli\"\nprovider = \"btrfs\"\npath = {p:?}\n\
             command = \"/nonexistent/btrfs\"\n\
             \n[[snapshot_source]]\nname = \"xdev\"\nprovider = \"btrfs\"\npath = {p:?}\n\
             clone_dir = {o:?}\n",
            p = pool.to_str().expect("utf8"),
            o = other_fs.to_str().expect("utf8"),
        )
    };
    let mut lab = Lab::start(&["web01", "web02"], &[], lab_toml, &[]);

    // Refused at once: no session is made.
    for (point, expected) in [
        ("snap:nope/snaps/ds1@1", "no snapshot source 'nope'"),
        ("snap:pool1", "snap:SOURCE/SNAPSHOT"),
    ] {
        let err = lab
            .recover(&["--vm", "web01", "--point", point])
            .expect_err(point);
        assert!(err.contains(expected), "{point}: {err}");
    }
    assert!(lab.sessions().is_empty());
    let (_, _, err) = run_fail(
        revive()
            .args(["points", "--source", "snap:nope", "--config"])
            .arg(lab.config()),
    );
    assert!(
        err.contains("no snapshot source 'nope'") && err.contains("pool1"),
        "{err}"
    );

    // Refused by the session's checks or the storage: the session fails
    // with the reason, and leaves nothing.
    let cases = [
        (
            "web01",
            "snap:pool1/snaps/missing",
            "snapshot 'snaps/missing' not found in source 'pool1'",
        ),
        (
            "ghost",
            SNAP,
            "holds no VM 'ghost' (it holds: web01, web02)",
        ),
        (
            "web01",
            "snap:nocli/snaps/ds1@1",
            "storage command '/nonexistent/btrfs' of snapshot source 'nocli' not found",
        ),
        (
            "web01",
            "snap:xdev/snaps/ds1@1",
            "storage command 'btrfs subvolume snapshot",
        ),
    ];
    for (vm, point, expected) in cases {
        let sessions = lab
            .recover(&["--vm", vm, "--point", point, "--wait"])
            .unwrap_or_else(|e| panic!("{point}: {e}"));
        let s = &sessions[0];
        assert_eq!(s["state"], "failed", "{point}: {s:#}");
        let error = s["error"].as_str().unwrap_or_default();
        assert!(error.contains(expected), "{point}: {error}");
        assert!(lab.pool.clones().is_empty(), "{point}: a clone was left");
        assert!(lab.clone_records().is_empty(), "{point}: a record was left");
        assert!(
            lab.clone_exports().is_empty(),
            "{point}: an export was left"
        );
        lab.stop(&id(s));
    }
    // The failing CLI left nothing in the other file system either.
    let left: Vec<_> = std::fs::read_dir(&other_fs)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
    lab.assert_clean();
    lab.server.stop();
    println!("{BAD_DONE}");
}
