//! iSCSI peers and targets for tests: revive's target in-process over any
//! `BlockDevice`, the reference target `tgtd` (package tgt) on a plain
//! file, and libiscsi's tools (`iscsi-test-cu`, `iscsi-ls`, `iscsi-inq`,
//! `iscsi-readcapacity16`) with a time limit on every run.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use revive::block::iscsi::{export_of, Access, ExportTargets, IscsiServer};
use revive::block::{BlockDevice, BlockExports, FileDevice};
use revive::datastore::{Datastore, DatastoreConfig, ExportConfig, FileAt, FileOps};
use revive::repo::Repository;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::{have_tool, skip_missing_peer};

/// The initiator names iscsi-test-cu logs in with.
pub const TEST_INITIATORS: [&str; 2] = [
    "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test",
    "iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test-2",
];

/// True when libiscsi's tools are installed; else a skip (a failure under CI).
pub fn libiscsi_or_skip() -> bool {
    let ok = [
        "iscsi-test-cu",
        "iscsi-ls",
        "iscsi-inq",
        "iscsi-readcapacity16",
    ]
    .iter()
    .all(|t| have_tool(t));
    if !ok {
        skip_missing_peer(
            "libiscsi-bin (iscsi-test-cu, iscsi-ls, iscsi-inq, iscsi-readcapacity16)",
        );
    }
    ok
}

/// True when tgtd and tgtadm are installed; else a skip (a failure under CI).
pub fn tgtd_or_skip() -> bool {
    let ok = have_tool("tgtd") && have_tool("tgtadm");
    if !ok {
        skip_missing_peer("tgt (tgtd, tgtadm)");
    }
    ok
}

/// Access for libiscsi's test initiators from loopback.
pub fn loopback_access() -> Access {
    Access {
        allowed_clients: vec![Ipv4Addr::LOCALHOST.into()],
        allowed_initiators: TEST_INITIATORS.iter().map(|s| s.to_string()).collect(),
        chap: None,
    }
}

/// revive's iSCSI target running in this process on 127.0.0.1, serving
/// the iSCSI exports of a block export registry.
pub struct InProcessTarget {
    /// Listening address.
    pub addr: SocketAddr,
    /// The block exports served (add and remove at will).
    pub exports: Arc<BlockExports>,
    stop: Option<oneshot::Sender<()>>,
    join: JoinHandle<std::io::Result<()>>,
}

impl InProcessTarget {
    /// Serves one target `iqn` of `device` with `access`, on a free port.
    pub async fn start(iqn: &str, device: Arc<dyn BlockDevice>, access: Access) -> InProcessTarget {
        let exports = BlockExports::new();
        exports
            .add(export_of(iqn, device, access))
            .expect("add export");
        Self::serve(exports).await
    }

    /// Serves the iSCSI exports of `exports` on a free port.
    pub async fn serve(exports: Arc<BlockExports>) -> InProcessTarget {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = IscsiServer::new(ExportTargets::new(exports.clone()));
        let (tx, rx) = oneshot::channel::<()>();
        let join = tokio::spawn(server.serve(listener, async move {
            let _ = rx.await;
        }));
        InProcessTarget {
            addr,
            exports,
            stop: Some(tx),
            join,
        }
    }

    /// `iscsi://127.0.0.1:PORT/IQN/LUN`.
    pub fn url(&self, iqn: &str, lun: u32) -> String {
        format!("iscsi://{}/{iqn}/{lun}", self.addr)
    }

    /// Stops the server and waits for it.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.join)
            .await
            .expect("iscsi server stops")
            .expect("join")
            .expect("serve");
    }
}

/// A `tgtd` serving one file as LUN 1 of one target to any initiator, on
/// a free loopback port, with its own control port.
pub struct Tgtd {
    child: Child,
    control: u16,
    /// Listening port.
    pub port: u16,
    /// The target's IQN.
    pub iqn: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl Tgtd {
    /// Starts tgtd serving `file` as `iqn`, LUN 1; its log goes to `log`.
    pub fn start(file: &Path, iqn: &str, log: &Path) -> Tgtd {
        let port = free_port();
        // Control ports select the management socket /var/run/tgtd/socket.N.
        let control = 1000 + (port % 30000);
        std::fs::create_dir_all("/var/run/tgtd").expect("create /var/run/tgtd");
        let log = std::fs::File::create(log).expect("tgtd log");
        let child = Command::new("tgtd")
            .args(["-f", "-C", &control.to_string()])
            .arg("--iscsi")
            .arg(format!("portal=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn tgtd");
        let t = Tgtd {
            child,
            control,
            port,
            iqn: iqn.to_string(),
        };
        // tgtadm fails until the management socket exists.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !t.adm(&["--op", "show", "--mode", "target"]) {
            assert!(Instant::now() < deadline, "tgtd did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(t.adm(&["--op", "new", "--mode", "target", "--tid", "1", "-T", iqn]));
        let file = file.to_str().expect("utf8");
        assert!(t.adm(&[
            "--op",
            "new",
            "--mode",
            "logicalunit",
            "--tid",
            "1",
            "--lun",
            "1",
            "-b",
            file
        ]));
        assert!(t.adm(&["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"]));
        t
    }

    fn adm(&self, args: &[&str]) -> bool {
        Command::new("tgtadm")
            .args(["-C", &self.control.to_string(), "--lld", "iscsi"])
            .args(args)
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    }

    /// `iscsi://127.0.0.1:PORT/IQN/1`.
    pub fn url(&self) -> String {
        format!("iscsi://127.0.0.1:{}/{}/1", self.port, self.iqn)
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The outcome of one conformance test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum CuOutcome {
    /// Ran and passed.
    Pass,
    /// Passed only by skipping (the target lacks what it tests).
    Skip,
    /// Failed.
    Fail,
    /// Did not finish in time (killed).
    Timeout,
}

/// Every test of the suite (`ALL.<suite>.<test>`).
pub fn suite_tests() -> Vec<String> {
    let out = Command::new("iscsi-test-cu")
        .arg("--list")
        .output()
        .expect("iscsi-test-cu --list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("ALL.") && l.matches('.').count() == 2)
        .map(String::from)
        .collect()
}

/// Runs one test of iscsi-test-cu against `url` (dataloss allowed), killed
/// after `limit`; its output goes to `log`.
pub fn run_cu(url: &str, test: &str, limit: Duration, log: &Path) -> CuOutcome {
    let mut child = Command::new("iscsi-test-cu")
        .args(["-d", "--test", test, url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn iscsi-test-cu");
    let deadline = Instant::now() + limit;
    // Drain output on threads so a chatty test never blocks on a pipe.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = std::io::Read::read_to_end(&mut out, &mut s);
        s
    });
    let t_err = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = std::io::Read::read_to_end(&mut err, &mut s);
        s
    });
    let timed_out = loop {
        if child.try_wait().expect("wait").is_some() {
            break false;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break true;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut text = t_out.join().unwrap_or_default();
    text.extend(t_err.join().unwrap_or_default());
    let _ = std::fs::write(log, &text);
    if timed_out {
        return CuOutcome::Timeout;
    }
    let text = String::from_utf8_lossy(&text);
    // CUnit's summary row: "tests  <total> <ran> <passed> <failed> <inactive>".
    let row: Vec<u64> = text
        .lines()
        .find(|l| l.trim_start().starts_with("tests "))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|w| w.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    match row.as_slice() {
        [_, ran, passed, failed, ..] if *ran > 0 && *failed == 0 && passed == ran => {
            if text.contains("[SKIPPED]") {
                CuOutcome::Skip
            } else {
                CuOutcome::Pass
            }
        }
        _ => CuOutcome::Fail,
    }
}

/// Where a conformance run writes each test's output.
pub fn cu_log(dir: &Path, who: &str, test: &str) -> PathBuf {
    dir.join(format!("{who}-{test}.log"))
}

/// A repository holding one backed-up VM, opened as a datastore in this
/// process with the VM's restore point published in `/revive`.
pub struct PublishedDisk {
    /// The datastore.
    pub ds: Arc<Datastore>,
    /// The flat disk, as the block layer's device of a presented file.
    pub disk: Arc<FileDevice>,
}

impl PublishedDisk {
    /// Opens the datastore of `repo` with its state and write caches under
    /// `dir`, publishes `point` as `folder` and opens its file `file`.
    pub async fn open(
        repo: &Path,
        dir: &Path,
        point: &str,
        folder: &str,
        file: &str,
    ) -> PublishedDisk {
        Self::open_with_cache(repo, dir, point, folder, file, 64 << 20).await
    }

    /// As [`PublishedDisk::open`], with a block cache of `cache_bytes`.
    pub async fn open_with_cache(
        repo: &Path,
        dir: &Path,
        point: &str,
        folder: &str,
        file: &str,
        cache_bytes: usize,
    ) -> PublishedDisk {
        let repository = Repository::open_local(repo).await.expect("open repository");
        let config = DatastoreConfig {
            state_dir: dir.join("state"),
            cache_root: dir.join("cache"),
            block_cache_bytes: cache_bytes,
            readahead_chunks: 4,
            exports: vec![ExportConfig {
                path: "/revive".into(),
                allowed_clients: vec![Ipv4Addr::LOCALHOST.into()],
            }],
        };
        let ds = Arc::new(
            Datastore::open(repository, config)
                .await
                .expect("open datastore"),
        );
        let export = ds.export_by_path("/revive").expect("export").id;
        let published = ds.publications("/revive").await.expect("publications");
        let folder_id = if published.iter().any(|(n, _)| n == folder) {
            let root = ds.export(export).expect("export").root;
            ds.lookup(&FileAt::new(export, root).child(folder))
                .await
                .expect("publication folder")
                .fileid
        } else {
            ds.publish("/revive", folder, point, None)
                .await
                .expect("publish")
        };
        let attr = ds
            .lookup(&FileAt::new(export, folder_id).child(file))
            .await
            .expect("disk file");
        let ops: Arc<dyn FileOps> = ds.clone();
        let disk = FileDevice::open(ops, FileAt::new(export, attr.fileid), file, false)
            .await
            .expect("open the disk's device");
        let disk = Arc::new(disk);
        PublishedDisk { ds, disk }
    }
}
