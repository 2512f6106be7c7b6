//! Issue 7: the repository on S3-compatible object storage (moto on
//! loopback), shared by several `revive serve` processes.
//!
//! The repository bodies run against a local folder and against moto, so
//! both stores are held to the same behaviour.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use revive::store::{LockMode, Store};

use crate::support::client::{run_tool, sha256};
use crate::support::moto::{MotoServer, TestRepo};
use crate::support::server::{ReviveServer, ServerSpec};
use crate::support::vm::SampleVm;
use crate::support::*;

const MIB: u64 = 1 << 20;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Damages one stored chunk of `repo` (the largest: a random-data chunk);
/// returns its hex name.
fn corrupt_largest_chunk(repo: &TestRepo) -> String {
    if let Some(dir) = &repo.dir {
        use std::os::unix::fs::FileExt;
        let victim = chunk_files(dir)
            .into_iter()
            .max_by_key(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
            .expect("a chunk");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&victim)
            .expect("open chunk");
        f.write_all_at(b"\xde\xad\xbe\xef", 100).expect("damage");
        return victim.file_name().unwrap().to_string_lossy().into_owned();
    }
    let store = repo.s3_store().expect("s3 store");
    rt().block_on(async {
        let chunks = store.list("chunks/").await.expect("list");
        let victim = chunks.iter().max_by_key(|m| m.size).expect("a chunk");
        let mut data = store.get(&victim.key).await.expect("get").to_vec();
        data[100..104].copy_from_slice(b"\xde\xad\xbe\xef");
        store
            .put(&victim.key, Bytes::from(data))
            .await
            .expect("put damaged chunk");
        victim.key.rsplit('/').next().unwrap().to_string()
    })
}

fn chunk_count(repo: &TestRepo) -> usize {
    match &repo.dir {
        Some(dir) => chunk_files(dir).len(),
        None => {
            let store = repo.s3_store().expect("s3 store");
            rt().block_on(store.list("chunks/")).expect("list").len()
        }
    }
}

fn gc(repo: &TestRepo, grace: Option<&str>) -> serde_json::Value {
    let mut cmd = repo.cmd("gc");
    cmd.arg("--json");
    if let Some(g) = grace {
        cmd.args(["--grace", g]);
    }
    serde_json::from_str(&run_ok(&mut cmd)).expect("gc --json")
}

/// Backup, incremental, bit-exact restores, verify, forget + gc, and a
/// corrupt chunk named by verify and stopping restore: the same body for
/// every store. `s3_grace`: the store keeps young unreferenced chunks by
/// default (S3), so gc without `--grace` must keep them.
fn repository_lifecycle(repo: &TestRepo, tmp: &Path, s3_grace: bool) {
    let vm = SampleVm::create(&tmp.join("src"), "web01", 32 * MIB, 21);
    repo.init();
    let (_, _, err) = run_fail(&mut repo.cmd("init"));
    assert!(err.contains("already exists"), "{err}");

    let full = repo.backup(&vm.dir, None);
    assert!(full["chunks_new"].as_u64().unwrap() > 0, "{full}");
    let first = sha256_dir(&vm.dir);
    vm.change_blocks(MIB, 2, 22);
    let incr = repo.backup(&vm.dir, None);
    assert_eq!(incr["parent"], full["id"]);
    assert!(incr["chunks_new"].as_u64().unwrap() <= 2, "{incr}");
    let second = sha256_dir(&vm.dir);

    for (id, expected) in [(&full["id"], &first), (&incr["id"], &second)] {
        let dest = tmp.join(format!("r-{}", id.as_str().unwrap()));
        repo.restore(id.as_str().unwrap(), &dest);
        assert_eq!(&sha256_dir(&dest), expected, "restore of {id}");
    }
    let verify = run_ok(&mut repo.cmd("verify"));
    assert!(verify.contains(": ok"), "{verify}");

    // Forget the full backup: its two replaced chunks become garbage.
    let before = chunk_count(repo);
    run_ok(repo.cmd("forget").arg(full["id"].as_str().unwrap()));
    if s3_grace {
        let kept = gc(repo, None);
        assert_eq!(kept["chunks_removed"], 0, "young chunks stay: {kept}");
        assert!(kept["young_kept"].as_u64().unwrap() >= 1, "{kept}");
        assert_eq!(chunk_count(repo), before);
    }
    let report = gc(repo, Some("0s"));
    let removed = report["chunks_removed"].as_u64().unwrap();
    assert!((1..=2).contains(&removed), "{report}");
    assert_eq!(chunk_count(repo) as u64, before as u64 - removed);
    let dest = tmp.join("after-gc");
    repo.restore("web01@latest", &dest);
    assert_eq!(sha256_dir(&dest), second);

    // A damaged chunk: verify names it and exits 1; restore refuses.
    let hex = corrupt_largest_chunk(repo);
    let (code, stdout, _) = run_fail(&mut repo.cmd("verify"));
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains(&hex), "verify names {hex}: {stdout}");
    let (code, _, stderr) = run_fail(repo.cmd("restore").arg("web01@latest").arg(tmp.join("bad")));
    assert_eq!(code, 2);
    assert!(stderr.contains(&hex), "restore names {hex}: {stderr}");
}

#[test]
fn repository_lifecycle_local() {
    let tmp = tempfile::tempdir().unwrap();
    repository_lifecycle(&TestRepo::local(tmp.path()), tmp.path(), false);
}

#[test]
fn repository_lifecycle_s3() {
    let Some(moto) = MotoServer::start_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let repo = TestRepo::s3(&moto, "backups", "site-a/repo");
    repository_lifecycle(&repo, tmp.path(), true);
}

#[test]
fn gc_on_s3_refuses_while_a_backup_lease_is_live() {
    let Some(moto) = MotoServer::start_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let repo = TestRepo::s3(&moto, "leases", "r");
    repo.init();
    let vm = SampleVm::create(tmp.path(), "app", 4 * MIB, 23);
    repo.backup(&vm.dir, None);
    let store: Arc<dyn Store> = Arc::new(repo.s3_store().expect("store"));
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    // A backup on "another server" holds its lease.
    let lease = runtime
        .block_on(store.try_lock(LockMode::Shared))
        .expect("shared lease");
    let (code, _, err) = run_fail(repo.cmd("gc").args(["--grace", "0s"]));
    assert_eq!(code, 2);
    assert!(err.contains("busy") && err.contains("backup"), "{err}");
    runtime.block_on(lease.release()).expect("release");
    let report = gc(&repo, Some("0s"));
    assert_eq!(report["chunks_removed"], 0, "{report}");
    // And a running gc keeps backups out.
    let gc_lease = runtime
        .block_on(store.try_lock(LockMode::Exclusive))
        .expect("exclusive lease");
    let (_, _, err) = run_fail(repo.cmd("backup").arg(&vm.dir));
    assert!(err.contains("garbage collection is running"), "{err}");
    runtime.block_on(gc_lease.release()).expect("release");
    repo.backup(&vm.dir, None);
}

/// A one-connection-at-a-time HTTP proxy in front of moto that drops the
/// `If-None-Match` header: a store that accepts conditional PUTs and
/// overwrites anyway. Returns its port.
fn start_header_stripping_proxy(upstream: u16) -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind proxy");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for client in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = proxy_one(client, upstream);
            });
        }
    });
    port
}

/// Forwards one request (without `If-None-Match`) and its response; both
/// sides then close, as the forwarded request asked moto to.
fn proxy_one(client: TcpStream, upstream: u16) -> std::io::Result<()> {
    let mut reader = BufReader::new(client.try_clone()?);
    let mut client = client;
    let mut head = Vec::new();
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            content_length = v.trim().parse().unwrap_or(0);
        }
        if lower.starts_with("if-none-match:") || lower.starts_with("connection:") {
            continue;
        }
        if line == "\r\n" {
            head.extend_from_slice(b"Connection: close\r\n\r\n");
            break;
        }
        head.extend_from_slice(line.as_bytes());
    }
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body)?;
    let mut up = TcpStream::connect((Ipv4Addr::LOCALHOST, upstream))?;
    up.write_all(&head)?;
    up.write_all(&body)?;
    let mut response = Vec::new();
    up.read_to_end(&mut response)?;
    // moto answered "Connection: close": the client opens a new one.
    client.write_all(&response)
}

#[test]
fn init_refuses_a_store_that_ignores_conditional_writes() {
    let Some(moto) = MotoServer::start_or_skip() else {
        return;
    };
    moto.create_bucket("liar");
    let proxy = start_header_stripping_proxy(moto.port);
    let mut env = moto.env();
    for (k, v) in env.iter_mut() {
        if k == "AWS_ENDPOINT_URL" {
            *v = format!("http://127.0.0.1:{proxy}");
        }
    }
    let liar = TestRepo {
        location: "s3://liar/repo".into(),
        env,
        dir: None,
    };
    let (code, _, err) = run_fail(&mut liar.cmd("init"));
    assert_eq!(code, 2);
    assert!(
        err.contains("does not honour conditional writes"),
        "clear message: {err}"
    );
    // Nothing was left behind: no repository, no probe object.
    let direct = TestRepo::s3(&moto, "liar", "repo");
    let store = direct.s3_store().expect("store");
    let left = rt().block_on(store.list("config.json")).expect("list");
    assert!(left.is_empty(), "{left:?}");
    // The same bucket through moto itself is accepted.
    direct.init();
}

/// Backs up a VM into a fresh S3 repository on `moto`; returns the repo.
fn s3_repo_with_vm(moto: &MotoServer, tmp: &Path, bucket: &str, size: u64) -> (TestRepo, SampleVm) {
    let repo = TestRepo::s3(moto, bucket, "repo");
    repo.init();
    let vm = SampleVm::create(&tmp.join("src"), "vm1", size, 24);
    repo.backup(&vm.dir, None);
    (repo, vm)
}

fn s3_server(dir: &Path, repo: &TestRepo, extra: &str, s3: &str) -> ReviveServer {
    let mut spec = ServerSpec::s3(&repo.location, repo.env.clone()).publish("vm1", "vm1@latest");
    spec.repository_extra = extra.to_string();
    spec.s3_section = s3.to_string();
    ReviveServer::start(dir, spec)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_publish_from_one_s3_repository() {
    if skip_without_libnfs() {
        return;
    }
    let Some(moto) = MotoServer::start_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (repo, vm) = s3_repo_with_vm(&moto, tmp.path(), "shared", 24 * MIB);
    let expected = sha256_file(&vm.flat());
    let a = s3_server(&tmp.path().join("a"), &repo, "", "");
    let b = s3_server(&tmp.path().join("b"), &repo, "", "");
    assert_ne!(a.nfs_port, b.nfs_port);
    // Both read at once, then each again.
    let url_a = a.url("/revive/vm1/vm1-flat.vmdk");
    let url_b = b.url("/revive/vm1/vm1-flat.vmdk");
    let (args_a, args_b) = ([url_a.as_str()], [url_b.as_str()]);
    let (ra, rb) = tokio::join!(run_tool("nfs-cat", &args_a), run_tool("nfs-cat", &args_b));
    for (name, out) in [("a", ra), ("b", rb)] {
        assert!(out.status.success(), "nfs-cat via {name}: {out:?}");
        assert_eq!(hex::encode(sha256(&out.stdout)), expected, "server {name}");
    }
    // Each server pinned the point under its own holder.
    let store = repo.s3_store().expect("store");
    let pins = store.list("pins/").await.expect("list pins");
    assert_eq!(pins.len(), 2, "one pin per server: {pins:?}");
    // forget refuses a point that sessions on either server read.
    let (_, _, err) = run_fail(repo.cmd("forget").arg("vm1@latest"));
    assert!(err.contains("in use"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nfs_read_rides_out_a_frozen_store() {
    if skip_without_libnfs() {
        return;
    }
    let Some(moto) = MotoServer::start_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (repo, vm) = s3_repo_with_vm(&moto, tmp.path(), "frozen", 16 * MIB);
    let expected = sha256_file(&vm.flat());
    // No chunk cache, a small in-memory block cache, and requests that give
    // up after 2 s, so the store's retries are what carry the read.
    let mut spec = ServerSpec::s3(&repo.location, repo.env.clone()).publish("vm1", "vm1@latest");
    spec.s3_section = "request_timeout = 2\nretry_window = 60\n".into();
    // object_store logs each retry at info: the log proves the store retried.
    spec.env
        .push(("RUST_LOG".into(), "revive=warn,object_store=info".into()));
    let server = ReviveServer::start(&tmp.path().join("srv"), spec);
    moto.pause();
    let url = server.url("/revive/vm1/vm1-flat.vmdk");
    let started = Instant::now();
    let read = tokio::spawn(async move { run_tool("nfs-cat", &[&url]).await });
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(
        !read.is_finished(),
        "the read waits while the store is frozen"
    );
    moto.resume();
    let out = read.await.expect("join");
    assert!(out.status.success(), "read retried, not failed: {out:?}");
    assert_eq!(hex::encode(sha256(&out.stdout)), expected);
    assert!(started.elapsed() >= Duration::from_secs(6));
    let log = server.log();
    assert!(
        log.contains("backing off"),
        "requests to the frozen store were retried:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunk_cache_serves_hot_chunks_after_a_restart() {
    if skip_without_libnfs() {
        return;
    }
    let Some(moto) = MotoServer::start_or_skip() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (repo, vm) = s3_repo_with_vm(&moto, tmp.path(), "cached", 16 * MIB);
    let expected = sha256_file(&vm.flat());
    let cache_dir = tmp.path().join("chunk-cache");
    let extra = format!(
        "chunk_cache_dir = {:?}\nchunk_cache_bytes = \"64MiB\"\n",
        cache_dir.display().to_string()
    );
    let mut server = s3_server(&tmp.path().join("srv"), &repo, &extra, "");
    let url = server.url("/revive/vm1/vm1-flat.vmdk");
    let out = run_tool("nfs-cat", &[&url]).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(hex::encode(sha256(&out.stdout)), expected);
    server.stop();
    let cached = chunk_files(&cache_dir);
    assert!(!cached.is_empty(), "chunks were cached on disk");

    // The store loses every chunk: a restarted server still serves the disk
    // from its chunk cache, which survived the restart.
    let store = repo.s3_store().expect("store");
    for meta in store.list("chunks/").await.expect("list") {
        store.delete(&meta.key).await.expect("delete");
    }
    server.restart();
    let url = server.url("/revive/vm1/vm1-flat.vmdk");
    let out = run_tool("nfs-cat", &[&url]).await;
    assert!(out.status.success(), "{out:?}\n{}", server.log());
    assert_eq!(hex::encode(sha256(&out.stdout)), expected);
}
