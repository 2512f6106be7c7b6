//! Issue 5 acceptance through the real daemon and CLI: `revive serve` with
//! a `[[host]] driver = "vsphere"` pointing at vcsim, `revive recover
//! --power-on`, `revive migrate --method live`, `revive stop`.
//!
//! Here vcsim itself reads the VM folder over NFS (our vcsim main's
//! `-nfs-query-file`): before RegisterVM it copies the folder's small files
//! from revive's export with `nfs-cp` into the datastore's localPath, as
//! ESXi would read them over NFS, since the controller registers the VM
//! right after it publishes the folder.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::{inventory, PROD_DS};
use crate::support::server::{ReviveServer, ServerSpec};
use crate::support::vcsim::{vcsim_or_skip, Mode, Vcsim, PASSWORD, USER};
use crate::support::vm::SampleVm;
use crate::support::{backup_json, init_repo, run, sha256_file, skip_without_libnfs};

/// Datastore name the sessions use (`[sessions] datastore_name`).
const DS: &str = "revive-cli";
/// Longest wait for a session to reach a state.
const LIMIT: Duration = Duration::from_secs(60);

struct Lab {
    tmp: tempfile::TempDir,
    vcsim: Vcsim,
    server: ReviveServer,
}

impl Lab {
    /// vcsim, then `revive serve` with hosts `esx-sim` (right), `esx-badpw`
    /// (wrong password) and `esx-nohost` (unknown ESXi host), two VMs backed up.
    fn start(mode: Mode) -> Option<Lab> {
        let binary = vcsim_or_skip()?;
        if skip_without_libnfs() {
            return None;
        }
        let tmp = tempfile::tempdir().expect("tempdir");
        let repo = init_repo(tmp.path(), None);
        for (i, name) in ["web01", "web02"].iter().enumerate() {
            let vm = SampleVm::create(&tmp.path().join("src"), name, 1 << 20, 60 + i as u64);
            backup_json(&repo, &vm.dir, None);
        }
        let query = tmp.path().join("nfs-query");
        std::fs::write(&query, "").expect("write query file");
        let vcsim = Vcsim::start_with(&binary, mode, tmp.path(), Some(&query));
        let local = tmp.path().join("vcsim-nas").join(DS);
        std::fs::create_dir_all(&local).expect("mkdir");
        let esx_host = match mode {
            Mode::Esx => String::new(),
            Mode::Vpx => "esx_host = \"DC0_H0\"\n".into(),
        };
        let host = |name: &str, password: &str, esx_host: &str| {
            format!(
                "\n[[host]]\nname = {name:?}\ndriver = \"vsphere\"\nnfs_address = \"127.0.0.1\"\n\
                 url = {:?}\nuser = {USER:?}\npassword = {password:?}\nca_file = {:?}\n\
                 nas_local_path = {:?}\ntask_timeout_secs = 30\n{esx_host}",
                vcsim.url,
                vcsim.ca_file().to_str().expect("utf8"),
                local.to_str().expect("utf8"),
            )
        };
        let toml = format!(
            "[sessions]\nmin_free_cache = \"1MiB\"\ndatastore_name = {DS:?}\nretries = 60\n\
             retry_interval_secs = 1\n{}{}{}",
            host("esx-sim", PASSWORD, &esx_host),
            host("esx-badpw", "wrong", &esx_host),
            host("esx-nohost", PASSWORD, "esx_host = \"esx-nope\"\n"),
        );
        let server = ReviveServer::start(
            &tmp.path().join("server"),
            ServerSpec::new(&repo)
                .with_api()
                .log_level("revive=info")
                .toml(&toml),
        );
        std::fs::write(
            &query,
            format!(
                "nfsport={}&mountport={}",
                server.nfs_port, server.mount_port
            ),
        )
        .expect("write query file");
        Some(Lab { tmp, vcsim, server })
    }

    /// `revive recover --vm VM --host HOST --name NAME --power-on [--wait]`:
    /// the session (whatever the exit code).
    fn recover(&self, vm: &str, host: &str, name: &str, wait: bool) -> Value {
        let mut cmd = self.server.ctl();
        cmd.args([
            "recover",
            "--vm",
            vm,
            "--host",
            host,
            "--name",
            name,
            "--power-on",
            "--json",
        ]);
        if wait {
            cmd.arg("--wait");
        }
        let out = run(&mut cmd);
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!(
                "recover printed {text:?}: {e}\nstderr: {}\nlog:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.server.log()
            )
        });
        v.as_array()
            .and_then(|a| a.first())
            .cloned()
            .expect("one session")
    }

    fn session(&self, id: &str) -> Value {
        self.server.ctl_json(&["session", id])
    }

    fn wait(&self, id: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        self.server.wait_session(id, LIMIT, what, done)
    }

    fn dir(&self) -> PathBuf {
        self.tmp.path().to_path_buf()
    }
}

fn state(s: &Value) -> &str {
    s["state"].as_str().unwrap_or("?")
}

fn id(s: &Value) -> String {
    s["id"].as_str().expect("id").to_string()
}

/// recover --power-on registers the NAS datastore and the VM, powered on;
/// two sessions share the datastore; migrate --method live runs Storage
/// vMotion to the end; the datastore goes with the last session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vsphere_cli_recover_and_live_migrate() {
    let Some(lab) = Lab::start(Mode::Esx) else {
        return;
    };
    let s1 = lab.recover("web01", "esx-sim", "rec-web01", true);
    assert_eq!(state(&s1), "running", "{s1:#}\nlog:\n{}", lab.server.log());
    assert_eq!(s1["driver"], "vsphere");
    let s2 = lab.recover("web02", "esx-sim", "rec-web02", true);
    assert_eq!(state(&s2), "running", "{s2:#}");

    // vcsim read the .vmx from revive's export over NFS: the backed-up bytes.
    let fetched = lab
        .dir()
        .join("vcsim-nas")
        .join(DS)
        .join("rec-web01")
        .join("web01.vmx");
    assert_eq!(
        sha256_file(&fetched),
        sha256_file(&lab.dir().join("src").join("web01").join("web01.vmx"))
    );

    let inv = inventory(&lab.vcsim).await;
    assert_eq!(
        inv.nas,
        vec![(
            DS.to_string(),
            "127.0.0.1".to_string(),
            "/revive".to_string()
        )],
        "one NAS datastore for both sessions, pointing at revive"
    );
    assert_eq!(
        inv.vms,
        vec![
            ("rec-web01".into(), "poweredOn".into(), vec![DS.to_string()]),
            ("rec-web02".into(), "poweredOn".into(), vec![DS.to_string()]),
        ]
    );

    // Session 2 stops: its VM goes, the datastore stays for session 1.
    let stopped = lab.server.ctl_json(&["stop", &id(&s2), "--wait"]);
    assert_eq!(state(&stopped), "cancelled", "{stopped:#}");
    let inv = inventory(&lab.vcsim).await;
    assert_eq!(inv.nas.len(), 1);
    assert_eq!(inv.vms.len(), 1, "{:?}", inv.vms);

    // Session 1 moves to production with Storage vMotion and finalizes.
    let done = lab.server.ctl_json(&[
        "migrate",
        &id(&s1),
        "--method",
        "live",
        "--to",
        PROD_DS,
        "--wait",
    ]);
    assert_eq!(state(&done), "done", "{done:#}\nlog:\n{}", lab.server.log());
    assert!(
        done["migration"]["task"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "the RelocateVM task was tracked: {done:#}"
    );
    assert_eq!(done["migration"]["percent"], 100);
    let inv = inventory(&lab.vcsim).await;
    assert_eq!(
        inv.vms,
        vec![(
            "rec-web01".into(),
            "poweredOn".into(),
            vec![PROD_DS.to_string()]
        )],
        "the VM runs on production storage"
    );
    assert!(
        inv.nas.is_empty(),
        "no session uses the datastore: it is removed, {:?}",
        inv.nas
    );
}

/// Wrong password, unknown ESXi host, unknown destination datastore: failed
/// sessions whose error names the cause, nothing registered. vcsim stopped
/// mid-session: the session waits and retries; started again: it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vsphere_cli_errors_and_outage() {
    let Some(mut lab) = Lab::start(Mode::Vpx) else {
        return;
    };
    let s = lab.recover("web01", "esx-badpw", "rec-badpw", true);
    let s = lab.wait(&id(&s), "failed", |s| state(s) == "failed");
    let err = s["error"].as_str().unwrap_or("");
    assert!(err.contains("login") && err.contains(USER), "{s:#}");

    let s = lab.recover("web01", "esx-nohost", "rec-nohost", true);
    let s = lab.wait(&id(&s), "failed", |s| state(s) == "failed");
    let err = s["error"].as_str().unwrap_or("");
    assert!(err.contains("esx-nope"), "{s:#}");

    let inv = inventory(&lab.vcsim).await;
    assert!(
        inv.nas.is_empty() && inv.vms.is_empty(),
        "left behind: {:?} {:?}",
        inv.nas,
        inv.vms
    );

    // vcsim goes away before the session starts: it waits and retries.
    lab.vcsim.stop();
    let s = lab.recover("web02", "esx-sim", "rec-web02", false);
    let sid = id(&s);
    let s = lab.wait(&sid, "retrying", |s| {
        state(s) == "waiting" || s["retries"]["attempt"].as_u64().unwrap_or(0) >= 1
    });
    assert_ne!(state(&s), "failed", "{s:#}");
    let err = s["error"].as_str().unwrap_or("");
    assert!(err.contains("unreachable"), "{s:#}");
    lab.vcsim.restart();
    let s = lab.wait(&sid, "running", |s| {
        state(s) == "running" || state(s) == "failed"
    });
    assert_eq!(state(&s), "running", "{s:#}\nlog:\n{}", lab.server.log());
    let inv = inventory(&lab.vcsim).await;
    assert_eq!(
        inv.vms,
        vec![("rec-web02".into(), "poweredOn".into(), vec![DS.to_string()])]
    );

    // A copy migration is refused up front: the VM is not stopped for it.
    let mut cmd = lab.server.ctl();
    cmd.args([
        "migrate", &sid, "--method", "copy", "--to", "/tmp/x", "--wait",
    ]);
    let out = run(&mut cmd);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--method live"), "{stderr}");
    assert_eq!(state(&lab.session(&sid)), "running");
    assert_eq!(inventory(&lab.vcsim).await.vms[0].1, "poweredOn");

    // An unknown destination: the migration fails naming it; the VM runs on.
    let mut cmd = lab.server.ctl();
    cmd.args([
        "migrate",
        &sid,
        "--method",
        "live",
        "--to",
        "no-such-ds",
        "--wait",
        "--json",
    ]);
    let out = run(&mut cmd);
    assert!(!out.status.success());
    let s = lab.session(&sid);
    let err = s["error"].as_str().unwrap_or("");
    assert!(err.contains("no-such-ds"), "{s:#}");
    let inv = inventory(&lab.vcsim).await;
    assert_eq!(inv.vms[0].1, "poweredOn");
}
