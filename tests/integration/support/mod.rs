//! Shared test support: sample VM folders, hashing, and running the `revive`
//! binary. Every helper that starts something lives here, not in a test file.

#![allow(dead_code)]

pub mod browser;
pub mod btrfs;
pub mod ceph;
pub mod client;
pub mod fuse;
pub mod iscsi;
pub mod memfs;
pub mod moto;
pub mod nbd;
pub mod postgres;
pub mod qemu;
pub mod server;
pub mod slowfs;
pub mod tree;
pub mod vcsim;
pub mod vm;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use revive::nfs::{NfsListeners, NfsMetrics, NfsServer};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The `revive` binary built for this test run, or the one `REVIVE_BIN`
/// names (to run a test against another build, e.g. to show that it fails
/// on the code before a fix).
pub fn revive_bin() -> PathBuf {
    match std::env::var_os("REVIVE_BIN") {
        Some(bin) => PathBuf::from(bin),
        None => PathBuf::from(env!("CARGO_BIN_EXE_revive")),
    }
}

/// A `revive` command with logging quiet unless the test run asks for it.
pub fn revive() -> Command {
    let mut cmd = Command::new(revive_bin());
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "revive=warn");
    }
    cmd.env_remove("REVIVE_REPO");
    cmd.env_remove("REVIVE_CONFIG");
    cmd
}

/// Runs a command and returns its output, whatever the exit code.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("run {cmd:?}: {e}"))
}

/// Runs a command that must succeed; returns stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail; returns (exit code, stdout, stderr).
pub fn run_fail(cmd: &mut Command) -> (i32, String, String) {
    let out = run(cmd);
    assert!(
        !out.status.success(),
        "{cmd:?} unexpectedly succeeded\nstdout: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> String {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

/// SHA-256 of every regular file directly in a folder, by name.
pub fn sha256_dir(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for entry in fs::read_dir(dir).expect("read dir") {
        let entry = entry.expect("entry");
        if entry.file_type().expect("type").is_file() {
            out.insert(
                entry.file_name().to_string_lossy().into_owned(),
                sha256_file(&entry.path()),
            );
        }
    }
    out
}

/// Every file under `dir` (recursively) with its SHA-256: a snapshot to prove
/// that something did not change.
pub fn snapshot_tree(dir: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).expect("read dir") {
            let entry = entry.expect("entry");
            let path = entry.path();
            if entry.file_type().expect("type").is_dir() {
                stack.push(path);
            } else {
                out.insert(path.clone(), sha256_file(&path));
            }
        }
    }
    out
}

/// A fresh repository in `dir/repo`; returns its path.
pub fn init_repo(dir: &Path, chunk_size: Option<&str>) -> PathBuf {
    let repo = dir.join("repo");
    let mut cmd = revive();
    cmd.arg("init").arg("--repo").arg(&repo);
    if let Some(cs) = chunk_size {
        cmd.args(["--chunk-size", cs]);
    }
    run_ok(&mut cmd);
    repo
}

/// `revive backup --json`, parsed.
pub fn backup_json(repo: &Path, path: &Path, name: Option<&str>) -> serde_json::Value {
    let mut cmd = revive();
    cmd.arg("backup").arg("--repo").arg(repo).arg("--json");
    if let Some(name) = name {
        cmd.args(["--name", name]);
    }
    cmd.arg(path);
    let out = run_ok(&mut cmd);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("backup --json printed {out:?}: {e}"))
}

/// `revive points --json`, parsed.
pub fn points_json(repo: &Path) -> Vec<serde_json::Value> {
    let out = run_ok(revive().arg("points").arg("--repo").arg(repo).arg("--json"));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("points --json printed {out:?}: {e}"))
}

/// Chunk object files in a local repository.
pub fn chunk_files(repo: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = snapshot_keys(&repo.join("chunks"));
    out.sort();
    out
}

fn snapshot_keys(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(snapshot_keys(&path));
        } else if !entry.file_name().to_string_lossy().starts_with(".tmp-") {
            out.push(path);
        }
    }
    out
}

/// A running NFS server on 127.0.0.1 with random ports (NFS and MOUNT on
/// separate ports, so clients must use both options), and its portmapper.
pub struct TestServer {
    pub nfs_port: u16,
    pub mount_port: u16,
    pub portmap_port: u16,
    pub write_verifier: [u8; 8],
    pub metrics: Arc<NfsMetrics>,
    stop: Option<oneshot::Sender<()>>,
    join: JoinHandle<std::io::Result<()>>,
}

async fn local_tcp() -> TcpListener {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind tcp")
}

impl TestServer {
    /// Start serving `backend` on random ports.
    pub async fn start(backend: Arc<memfs::MemFs>) -> Self {
        let nfs = local_tcp().await;
        let mount = local_tcp().await;
        // The portmapper wants the same port on TCP and UDP; retry on the
        // rare collision.
        let (pm_tcp, pm_udp) = loop {
            let tcp = local_tcp().await;
            let port = tcp.local_addr().expect("addr").port();
            if let Ok(udp) = UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).await {
                break (tcp, udp);
            }
        };
        let listeners = NfsListeners {
            nfs,
            mount: Some(mount),
            portmap_tcp: Some(pm_tcp),
            portmap_udp: Some(pm_udp),
        };
        Self::start_on(backend, listeners)
    }

    /// Start serving `backend` on the given listeners.
    pub fn start_on(backend: Arc<memfs::MemFs>, listeners: NfsListeners) -> Self {
        let ports = listeners.ports().expect("ports");
        let server = NfsServer::new(backend);
        let write_verifier = server.write_verifier();
        let metrics = server.metrics();
        let (tx, rx) = oneshot::channel::<()>();
        let join = tokio::spawn(server.serve(listeners, async move {
            let _ = rx.await;
        }));
        Self {
            nfs_port: ports.nfs,
            mount_port: ports.mount,
            portmap_port: ports.portmap_tcp.expect("portmap"),
            write_verifier,
            metrics,
            stop: Some(tx),
            join,
        }
    }

    /// `nfs://127.0.0.1<path>?nfsport=N&mountport=M` for libnfs.
    pub fn url(&self, path: &str) -> String {
        format!(
            "nfs://127.0.0.1{path}?nfsport={}&mountport={}",
            self.nfs_port, self.mount_port
        )
    }

    pub fn nfs_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.nfs_port))
    }

    /// Stop and wait until the server has returned.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let res = tokio::time::timeout(std::time::Duration::from_secs(10), &mut self.join)
            .await
            .expect("server stops within 10 s");
        res.expect("server task").expect("server result");
    }
}

/// Whether a command is on PATH.
pub fn have_tool(tool: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Reports a missing peer: a loud skip on a developer's machine, a failure
/// under CI (`CI` set), where scripts/test.sh has installed every peer and a
/// skip would hide a test that did not run.
pub fn skip_missing_peer(what: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("{what} is missing under CI: scripts/test.sh should have installed it");
    }
    eprintln!(
        "\n!!!!!!!!\n!!! SKIPPED: {what} missing; run scripts/install-test-deps.sh\n!!!!!!!!\n"
    );
}

/// Skip (return true) with a loud message when libnfs-utils is missing.
pub fn skip_without_libnfs() -> bool {
    if have_tool("nfs-ls") && have_tool("nfs-cat") && have_tool("nfs-cp") {
        return false;
    }
    skip_missing_peer("libnfs-utils (nfs-ls, nfs-cat, nfs-cp)");
    true
}

/// The fio binary with the nfs engine, or a skip (see [`skip_missing_peer`]).
pub fn fio_nfs_or_skip() -> Option<String> {
    let fio = fio_nfs();
    if fio.is_none() {
        skip_missing_peer("fio with the nfs engine (FIO_NFS=$(scripts/build-fio-nfs.sh))");
    }
    fio
}

/// True when qemu-img with the nfs driver, unshare and ip are there; else a skip.
pub fn qemu_peers_or_skip() -> bool {
    if qemu_has_nfs() && have_tool("unshare") && have_tool("ip") {
        return true;
    }
    skip_missing_peer("qemu-img with the nfs driver (qemu-block-extra), unshare or ip");
    false
}

/// fio binary built with the nfs engine (`scripts/build-fio-nfs.sh`), from
/// `FIO_NFS`.
pub fn fio_nfs() -> Option<String> {
    std::env::var("FIO_NFS")
        .ok()
        .filter(|p| std::path::Path::new(p).exists())
}

/// Whether `qemu-img` is installed with its nfs block driver.
pub fn qemu_has_nfs() -> bool {
    if !have_tool("qemu-img") {
        return false;
    }
    let Ok(out) = Command::new("qemu-img").arg("--help").output() else {
        return false;
    };
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .any(|w| w == "nfs")
}

/// Environment variable that marks a test binary re-run inside a private
/// network namespace by [`rerun_in_netns`].
pub const NETNS_INNER: &str = "REVIVE_TEST_NETNS_INNER";

/// True inside the re-run of [`rerun_in_netns`]: the test does its real work.
pub fn in_netns() -> bool {
    std::env::var_os(NETNS_INNER).is_some()
}

/// Brings the loopback interface up: the first step inside a fresh network
/// namespace, where `lo` starts down.
pub async fn loopback_up() {
    let up = tokio::process::Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .output()
        .await
        .expect("run ip");
    assert!(up.status.success(), "ip link set lo up: {up:?}");
}

/// The shape of every test that needs its own network namespace: inside the
/// re-run, bring `lo` up and do `inner`; outside, re-run (`rerun`) only when
/// `peers_ok` says the peers are here (it prints why not, and fails under CI).
pub async fn netns_test<I, R>(
    peers_ok: fn() -> bool,
    inner: impl FnOnce() -> I,
    rerun: impl FnOnce() -> R,
) where
    I: std::future::Future<Output = ()>,
    R: std::future::Future<Output = ()>,
{
    if in_netns() {
        loopback_up().await;
        return inner().await;
    }
    if peers_ok() {
        rerun().await;
    }
}

/// Re-runs test `test` (its full path) of this binary inside a private network
/// namespace (`unshare --net`), where it may bind ports 111 and 2049 without
/// touching the host, and checks that it passed and printed `done`.
pub async fn rerun_in_netns(test: &str, done: &str) {
    rerun_unshared(
        &["--net"],
        test,
        &["--nocapture", "--test-threads=1"],
        done,
        std::time::Duration::from_secs(300),
    )
    .await;
}

/// Runs `unshare UNSHARE -- <this test binary> --exact TEST TEST_ARGS` marked
/// with [`NETNS_INNER`]; checks that it passed within `timeout` and printed
/// `done`, and returns its stdout.
pub async fn rerun_unshared(
    unshare: &[&str],
    test: &str,
    test_args: &[&str],
    done: &str,
    timeout: std::time::Duration,
) -> String {
    let exe = std::env::current_exe().expect("test binary");
    let run = tokio::process::Command::new("unshare")
        .args(unshare)
        .arg("--")
        .arg(&exe)
        .args(["--exact", test])
        .args(test_args)
        .env(NETNS_INNER, "1")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(timeout, run)
        .await
        .unwrap_or_else(|_| panic!("{test} did not finish within {timeout:?}"))
        .expect("run unshare");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "inner run failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains(done) || stderr.contains(done),
        "inner run did not get to the end (unshare refused?):\n{stdout}\n{stderr}"
    );
    stdout.into_owned()
}

/// Which phase of a fio verify run.
#[derive(Clone, Copy, Debug)]
pub enum FioPhase {
    /// Random 4 KiB writes with crc32c headers, at queue depth 1: at job end
    /// fio's nfs engine cancels requests still queued in libnfs, so at a
    /// higher depth the last writes sometimes never reach the server.
    Write,
    /// Random reads at queue depth 16, verifying every block's header.
    Verify,
}

/// Runs one fio job (nfs engine) on 32 MiB of `file` under the libnfs `url`;
/// returns whether it passed and its output. Two jobs instead of one because
/// fio's verify phase starts with an fsync the nfs engine cannot issue.
pub async fn fio_verify_job(fio: &str, url: &str, file: &str, phase: FioPhase) -> (bool, String) {
    let nfs_url = format!("--nfs_url={url}");
    let filename = format!("--filename={file}");
    let (rw, do_verify, depth) = match phase {
        FioPhase::Write => ("--rw=randwrite", "--do_verify=0", "--iodepth=1"),
        FioPhase::Verify => ("--rw=randread", "--do_verify=1", "--iodepth=16"),
    };
    let args = [
        "--name=verify",
        "--ioengine=nfs",
        &nfs_url,
        &filename,
        "--size=32m",
        rw,
        "--bs=4k",
        depth,
        "--verify=crc32c",
        do_verify,
        "--verify_fatal=1",
        // No verify state file in the working directory.
        "--verify_state_save=0",
    ];
    let out = client::run_tool_for(fio, &args, std::time::Duration::from_secs(180)).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let ok = out.status.success() && stdout.contains("err= 0");
    (
        ok,
        format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr)),
    )
}
