//! Issue 4: instant-recovery sessions through the real daemon and CLI
//! (`revive serve` with its API, `revive recover/sessions/session/migrate/
//! retry/stop`), the `none` driver, and real NFS clients (libnfs-utils,
//! `nfs3_client`) reading and writing the published VM.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nfs3_client::nfs3_types::nfs3::stable_how;
use serde_json::Value;
use tempfile::TempDir;

use crate::support::client::*;
use crate::support::server::{ReviveServer, ServerSpec};
use crate::support::vm::SampleVm;
use crate::support::*;

mod slow_destination;

const MIB: u64 = 1 << 20;
/// Longest wait for a session to reach a state.
const LIMIT: Duration = Duration::from_secs(90);

/// A repository with backed-up VMs and a `revive serve` with the API.
struct Lab {
    tmp: TempDir,
    repo: PathBuf,
    vms: Vec<SampleVm>,
    /// Repository files before any session (pins come and go with sessions).
    repo_before: std::collections::BTreeMap<PathBuf, String>,
    server: ReviveServer,
}

impl Lab {
    /// VMs `(name, disk size)` backed up, and a server with `sessions_toml`
    /// in `[sessions]`, logging at info level (tests read what an operator would).
    fn new(vms: &[(&str, u64)], sessions_toml: &str) -> Lab {
        Lab::with_env(vms, sessions_toml, &[])
    }

    /// As [`Lab::new`], with environment variables for the server process.
    fn with_env(vms: &[(&str, u64)], sessions_toml: &str, env: &[(&str, &str)]) -> Lab {
        let tmp = tempfile::tempdir().expect("tempdir");
        let repo = init_repo(tmp.path(), None);
        let vms: Vec<SampleVm> = vms
            .iter()
            .enumerate()
            .map(|(i, (name, size))| {
                let vm = SampleVm::create(&tmp.path().join("src"), name, *size, 40 + i as u64);
                backup_json(&repo, &vm.dir, None);
                vm
            })
            .collect();
        let repo_before = snapshot_tree(&repo);
        let mut spec = ServerSpec::new(&repo)
            .with_api()
            .log_level("revive=info")
            .toml(&format!(
                "[sessions]\nmin_free_cache = \"1MiB\"\n{sessions_toml}"
            ));
        for (k, v) in env {
            spec.env.push((k.to_string(), v.to_string()));
        }
        let server = ReviveServer::start(&tmp.path().join("server"), spec);
        Lab {
            tmp,
            repo,
            vms,
            repo_before,
            server,
        }
    }

    fn vm(&self, name: &str) -> &SampleVm {
        self.vms.iter().find(|v| v.name == name).expect("vm")
    }

    /// `revive recover ... --wait --json`: the sessions created.
    fn recover(&self, args: &[&str]) -> Vec<Value> {
        let mut all = vec!["recover"];
        all.extend_from_slice(args);
        let v = self.server.ctl_json(&all);
        v.as_array().expect("array of sessions").clone()
    }

    /// libnfs URL of a file in a session's folder.
    fn url(&self, session: &str, file: &str) -> String {
        self.server.url(&format!("/revive/{session}/{file}"))
    }

    /// SHA-256 (hex) of a file read with `nfs-cat`.
    async fn nfs_sha(&self, session: &str, file: &str) -> String {
        let out = run_tool("nfs-cat", &[&self.url(session, file)]).await;
        assert!(out.status.success(), "nfs-cat {session}/{file}: {out:?}");
        hex(&sha256(&out.stdout))
    }

    /// Names in the export root, as `nfs-ls` shows them.
    async fn export_names(&self) -> Vec<String> {
        let out = run_tool("nfs-ls", &[&self.server.url("/revive")]).await;
        assert!(out.status.success(), "nfs-ls: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().last().map(str::to_string))
            .filter(|n| n != "." && n != "..")
            .collect()
    }

    /// FILE_SYNC write through `nfs3_client` into a session's file.
    async fn write(&self, session: &str, file: &str, offset: u64, data: &[u8]) {
        let conn = mount_at(self.server.nfs_port, self.server.mount_port, "/revive")
            .await
            .expect("mount");
        let root = conn.root_nfs_fh3();
        let mut c = conn.into_nfs3_client();
        let folder = lookup(&mut c, &root, session).await.expect("folder");
        let fh = lookup(&mut c, &folder, file).await.expect("file");
        write(&mut c, &fh, offset, data, stable_how::FILE_SYNC).await;
    }

    /// Stops the server: the repository verifies and is byte-for-byte as before.
    fn assert_repo_untouched(&mut self) {
        self.server.stop();
        let out = run_ok(revive().arg("verify").arg("--repo").arg(&self.repo));
        assert!(out.contains(": ok"), "verify: {out}");
        assert_eq!(
            snapshot_tree(&self.repo),
            self.repo_before,
            "repository changed"
        );
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn state(s: &Value) -> &str {
    s["state"].as_str().unwrap_or("?")
}

fn id(s: &Value) -> String {
    s["id"].as_str().expect("id").to_string()
}

fn name(s: &Value) -> String {
    s["name"].as_str().expect("name").to_string()
}

/// The flat disk as backed up, with `patch` written at `offset`.
fn patched(vm: &SampleVm, offset: u64, patch: &[u8]) -> Vec<u8> {
    let mut disk = fs::read(vm.flat()).expect("read disk");
    disk[offset as usize..offset as usize + patch.len()].copy_from_slice(patch);
    disk
}

/// Every file of `dir` except `skip`, by name and SHA-256.
fn hashes_except(dir: &Path, skip: &str) -> std::collections::BTreeMap<String, String> {
    let mut all = sha256_dir(dir);
    all.remove(skip);
    all
}

/// Recover, read the disk over NFS, write to it, migrate by copy: the copy
/// is backup + writes, the session ends done, its cache and folder are gone,
/// and the repository never changed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_read_write_and_copy_migrate() {
    if skip_without_libnfs() {
        return;
    }
    let mut lab = Lab::new(&[("web01", 24 * MIB)], "");
    let sessions = lab.recover(&["--vm", "web01", "--wait"]);
    assert_eq!(sessions.len(), 1);
    let s = &sessions[0];
    assert_eq!(state(s), "running", "{s:#}");
    assert_eq!(s["export"], "/revive");
    assert_eq!(s["driver"], "none");
    let (id, session) = (id(s), name(s));
    let vm = lab.vm("web01");
    let flat = format!("{}-flat.vmdk", vm.name);

    assert_eq!(lab.nfs_sha(&session, &flat).await, sha256_file(&vm.flat()));
    let patch = pattern(300_000, 9);
    let offset = 5 * MIB + 123;
    lab.write(&session, &flat, offset, &patch).await;
    lab.write(&session, "vmware.log", 0, b"powered on from backup\n")
        .await;
    let expected = patched(vm, offset, &patch);
    assert_eq!(lab.nfs_sha(&session, &flat).await, hex(&sha256(&expected)));
    let shown = lab.server.ctl_json(&["session", &id]);
    assert!(
        shown["cache_bytes"].as_u64().unwrap_or(0) >= patch.len() as u64,
        "cache bytes: {shown:#}"
    );
    let cache_dir = PathBuf::from(shown["cache_dir"].as_str().expect("cache_dir"));
    assert!(cache_dir.is_dir());

    let dest = lab.tmp.path().join("production");
    let done = lab.server.ctl_json(&[
        "migrate",
        &id,
        "--to",
        dest.to_str().expect("utf8"),
        "--method",
        "copy",
        "--wait",
    ]);
    assert_eq!(state(&done), "done", "{done:#}");
    assert_eq!(done["migration"]["percent"], 100);
    let copied = dest.join(&session);
    assert_eq!(sha256_file(&copied.join(&flat)), hex(&sha256(&expected)));
    let mut source = hashes_except(&vm.dir, &flat);
    source.insert(
        "vmware.log".into(),
        hex(&sha256(&{
            let mut log = fs::read(vm.dir.join("vmware.log")).expect("log");
            log[..23].copy_from_slice(b"powered on from backup\n");
            log
        })),
    );
    assert_eq!(hashes_except(&copied, &flat), source, "small files");
    assert!(!cache_dir.exists(), "write cache deleted at finalize");
    assert!(
        !lab.export_names().await.contains(&session),
        "folder unpublished"
    );
    let listed = lab.server.ctl_json(&["sessions"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1));
    lab.assert_repo_untouched();
}

/// `kill -9` of the daemon in the middle of a copy migration: the restarted
/// daemon resumes the copy where it was recorded and finishes with the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_migration_resumes_after_kill9() {
    if skip_without_libnfs() {
        return;
    }
    // 48 MiB at 8 MiB/s: the copy takes about 6 s, long enough to kill it midway.
    let mut lab = Lab::new(&[("db01", 48 * MIB)], "migration_bandwidth = \"8MiB\"\n");
    let s = &lab.recover(&["--vm", "db01", "--wait"])[0];
    let (id, session) = (id(s), name(s));
    let vm = lab.vm("db01");
    let flat = format!("{}-flat.vmdk", vm.name);
    let patch = pattern(64 * 1024, 3);
    lab.write(&session, &flat, 40 * MIB, &patch).await;
    let expected = patched(vm, 40 * MIB, &patch);
    let dest = lab.tmp.path().join("prod");
    run_ok(
        lab.server
            .ctl()
            .args(["migrate", &id, "--to", dest.to_str().expect("utf8")]),
    );
    let midway = lab.server.wait_session(&id, LIMIT, "midway", |s| {
        s["migration"]["percent"].as_u64().unwrap_or(0) >= 20
    });
    assert_eq!(state(&midway), "migrating", "{midway:#}");
    lab.server.kill9();
    let record: Value = serde_json::from_slice(
        &fs::read(
            lab.server
                .state_dir()
                .join("sessions")
                .join(format!("{id}.json")),
        )
        .expect("session record"),
    )
    .expect("json");
    let copied_before: u64 = record["migration"]["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| f["copied"].as_u64().unwrap_or(0))
        .sum();
    assert!(copied_before > 0, "progress was recorded: {record:#}");
    lab.server.restart();
    let done = lab
        .server
        .wait_session(&id, LIMIT, "done", |s| state(s) == "done");
    assert_eq!(done["migration"]["percent"], 100);
    assert_eq!(
        sha256_file(&dest.join(&session).join(&flat)),
        hex(&sha256(&expected))
    );
    let log = lab.server.log();
    assert!(log.contains("resuming session"), "{log}");
    // The second bulk pass started where the record said, not at zero.
    let resumed_at: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("copy migration: bulk pass"))
        .filter_map(|l| l.split("resumed_at=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(resumed_at.len(), 2, "{log}");
    assert_eq!(resumed_at[0], 0);
    assert!(
        resumed_at[1] >= copied_before,
        "{resumed_at:?} {copied_before}"
    );
    lab.assert_repo_untouched();
}

/// The repository disappears (unmounted) during a step: the session waits and
/// retries on schedule, recovers on its own when the repository is back
/// within the retries, and after the last retry waits for `revive retry`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_repository_waits_retries_and_recovers() {
    if skip_without_libnfs() {
        return;
    }
    let mut lab = Lab::new(
        &[("app01", 4 * MIB)],
        // Long enough that the test puts the repository back before the
        // first automatic retry even on a loaded machine.
        "retries = 2\nretry_interval_secs = 3\n",
    );
    let away = lab.tmp.path().join("repo-unmounted");
    // 1. Back within the retries: the session recovers by itself.
    fs::rename(&lab.repo, &away).expect("unmount repo");
    let s = &lab.recover(&["--vm", "app01"])[0];
    let first = id(s);
    let waiting = lab.server.wait_session(&first, LIMIT, "waiting", |s| {
        state(s) == "waiting" && s["retries"]["attempt"] == 1
    });
    assert_eq!(waiting["retries"]["max"], 2);
    assert!(
        waiting["error"].as_str().unwrap_or("").contains("missing"),
        "{waiting:#}"
    );
    fs::rename(&away, &lab.repo).expect("mount repo");
    let running = lab
        .server
        .wait_session(&first, LIMIT, "running", |s| state(s) == "running");
    assert!(running["error"].is_null(), "{running:#}");
    let session = name(&running);
    let vm = lab.vm("app01");
    let flat = format!("{}-flat.vmdk", vm.name);
    assert_eq!(lab.nfs_sha(&session, &flat).await, sha256_file(&vm.flat()));

    // 2. Gone for longer: after the last retry it waits for the operator.
    fs::rename(&lab.repo, &away).expect("unmount repo");
    let s = &lab.recover(&["--vm", "app01", "--name", "app01-second"])[0];
    let second = id(s);
    let exhausted = lab
        .server
        .wait_session(&second, LIMIT, "out of retries", |s| {
            state(s) == "waiting"
                && s["retries"]["attempt"] == 2
                && s["retries"]["next_at"].is_null()
        });
    assert_eq!(exhausted["resume"], "validating", "{exhausted:#}");
    fs::rename(&away, &lab.repo).expect("mount repo");
    std::thread::sleep(Duration::from_secs(4));
    let still = lab.server.ctl_json(&["session", &second]);
    assert_eq!(
        state(&still),
        "waiting",
        "no automatic retry after the last: {still:#}"
    );
    // The running session's export stayed up the whole time.
    assert_eq!(lab.nfs_sha(&session, &flat).await, sha256_file(&vm.flat()));
    run_ok(lab.server.ctl().args(["retry", &second]));
    lab.server
        .wait_session(&second, LIMIT, "running", |s| state(s) == "running");
    assert_eq!(
        lab.nfs_sha("app01-second", &flat).await,
        sha256_file(&vm.flat())
    );
    let metrics = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{}/metrics",
            lab.server.api_port.expect("api")
        ))
        .bearer_auth(crate::support::server::API_TOKEN)
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics.contains("revive_sessions{state=\"running\"} 2"),
        "{metrics}"
    );
    let retries: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("revive_session_retries_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("retries counter");
    assert!(retries >= 3, "{metrics}");
    lab.assert_repo_untouched_after_stopping_all();
}

impl Lab {
    /// Stops every session, then checks the repository as [`Lab::assert_repo_untouched`].
    fn assert_repo_untouched_after_stopping_all(&mut self) {
        let sessions = self.server.ctl_json(&["sessions"]);
        for s in sessions.as_array().expect("array") {
            if !matches!(state(s), "cancelled" | "done") {
                run_ok(self.server.ctl().args(["stop", &id(s), "--wait"]));
            }
        }
        self.assert_repo_untouched();
    }
}

/// Two VMs in one request share one export; a second recovery of the same
/// VM gets its own folder and write cache; stopping one session leaves the
/// others intact; the CLI reports refusals clearly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_export_separate_caches_and_stop() {
    if skip_without_libnfs() {
        return;
    }
    let mut lab = Lab::new(&[("a", 4 * MIB), ("b", 4 * MIB)], "");
    let pair = lab.recover(&["--vm", "a", "--vm", "b", "--wait"]);
    assert_eq!(pair.len(), 2);
    assert_eq!(pair[0]["request"], pair[1]["request"]);
    assert_eq!(pair[0]["export"], pair[1]["export"]);
    assert_eq!(pair[0]["datastore"], pair[1]["datastore"]);
    let again = &lab.recover(&["--vm", "a", "--wait"])[0];
    assert_eq!(name(again), "a-ir-2");
    assert_ne!(again["cache_dir"], pair[0]["cache_dir"]);
    let (a1, a2, b) = (name(&pair[0]), name(again), name(&pair[1]));
    assert_eq!((a1.as_str(), b.as_str()), ("a-ir", "b-ir"));
    let mut names = lab.export_names().await;
    names.sort();
    assert_eq!(names, vec![a1.clone(), a2.clone(), b.clone()]);

    // A write in one recovery of `a` is invisible in the other.
    let flat_a = "a-flat.vmdk";
    let patch = pattern(8192, 5);
    lab.write(&a1, flat_a, 4096, &patch).await;
    let va = lab.vm("a");
    assert_eq!(
        lab.nfs_sha(&a1, flat_a).await,
        hex(&sha256(&patched(va, 4096, &patch)))
    );
    assert_eq!(lab.nfs_sha(&a2, flat_a).await, sha256_file(&va.flat()));

    // Stop the first: its folder and cache go, the others stay readable.
    let cache_a1 = PathBuf::from(pair[0]["cache_dir"].as_str().expect("cache"));
    assert!(cache_a1.is_dir());
    let stopped = lab.server.ctl_json(&["stop", &id(&pair[0]), "--wait"]);
    assert_eq!(state(&stopped), "cancelled", "{stopped:#}");
    assert!(!cache_a1.exists());
    let mut names = lab.export_names().await;
    names.sort();
    assert_eq!(names, vec![a2.clone(), b.clone()]);
    assert_eq!(
        lab.nfs_sha(&b, "b-flat.vmdk").await,
        sha256_file(&lab.vm("b").flat())
    );
    assert_eq!(lab.nfs_sha(&a2, flat_a).await, sha256_file(&va.flat()));

    // Refusals, each with a message that says what is wrong.
    let refusals: [(&[&str], &str); 6] = [
        (&["session", "nope"], "no session 'nope'"),
        (
            &["migrate", &id(&pair[0]), "--to", "/tmp/x"],
            "cancelled: migrate is not possible now",
        ),
        (
            &["recover", "--vm", "a", "--host", "esx9"],
            "no host 'esx9'",
        ),
        (&["recover", "--vm", "a", "--name", "b-ir"], "already used"),
        (&["migrate", &id(again), "--to", "relative/dir"], "absolute"),
        (
            &["migrate", &id(again), "--to", "/tmp/x", "--method", "live"],
            "use --method copy",
        ),
    ];
    for (args, expect) in refusals {
        let (code, _, err) = run_fail(lab.server.ctl().args(args));
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(expect), "{args:?}: {err}");
    }
    let (code, _, err) = run_fail(
        revive()
            .env(
                "REVIVE_API",
                format!("http://127.0.0.1:{}", lab.server.api_port.expect("api")),
            )
            .env("REVIVE_TOKEN", "wrong")
            .arg("sessions"),
    );
    assert_eq!(code, 2);
    assert!(err.contains("token"), "{err}");
    // A VM with no backup fails validation, naming the check.
    let ghost = &lab.recover(&["--vm", "ghost"])[0];
    let failed = lab
        .server
        .wait_session(&id(ghost), LIMIT, "failed", |s| state(s) == "failed");
    let error = failed["error"].as_str().unwrap_or("");
    assert!(
        error.contains("validation failed: restore point") && error.contains("ghost@latest"),
        "{error}"
    );
    lab.assert_repo_untouched_after_stopping_all();
}
