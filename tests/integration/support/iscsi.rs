//! iSCSI peers and targets for tests: revive's target in-process over any
//! `BlockDevice`, the reference target `tgtd` (package tgt) on a plain
//! file, and libiscsi's tools (`iscsi-test-cu`, `iscsi-ls`, `iscsi-inq`,
//! `iscsi-readcapacity16`) with a time limit on every run.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use revive::block::device::check_range;
use revive::block::iscsi::{Access, IscsiServer, IscsiTarget, Targets};
use revive::block::{BlockDevice, BlockError, BlockResult, Extent, ExtentKind};
use revive::datastore::{
    Datastore, DatastoreConfig, DatastoreError, ExportConfig, FileAt, FileOps, Stability,
};
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

/// revive's iSCSI target running in this process on 127.0.0.1.
pub struct InProcessTarget {
    /// Listening address.
    pub addr: SocketAddr,
    /// The targets served (add and remove at will).
    pub targets: Arc<Targets>,
    stop: Option<oneshot::Sender<()>>,
    join: JoinHandle<std::io::Result<()>>,
}

impl InProcessTarget {
    /// Serves one target `iqn` of `device` with `access`, on a free port.
    pub async fn start(iqn: &str, device: Arc<dyn BlockDevice>, access: Access) -> InProcessTarget {
        let targets = Targets::new();
        targets
            .add(IscsiTarget::new(iqn, device, access))
            .expect("add target");
        Self::serve(targets).await
    }

    /// Serves `targets` on a free port.
    pub async fn serve(targets: Arc<Targets>) -> InProcessTarget {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = IscsiServer::new(targets.clone());
        let (tx, rx) = oneshot::channel::<()>();
        let join = tokio::spawn(server.serve(listener, async move {
            let _ = rx.await;
        }));
        InProcessTarget {
            addr,
            targets,
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

/// A published disk file as a `BlockDevice`, over the datastore's
/// `FileOps`: the test stand-in for the block layer's own device of a
/// presented file (reads from the write cache else the backup, writes into
/// the write cache, flush = COMMIT). It has no punch and no extents: zeroing
/// writes zeros, and the whole disk reports as data.
pub struct FileDisk {
    ds: Arc<dyn FileOps>,
    at: FileAt,
    name: String,
    size: u64,
    id: [u8; 16],
}

impl FileDisk {
    /// The file `at` of `ds`, named `name`.
    pub async fn open(ds: Arc<dyn FileOps>, at: FileAt, name: &str) -> FileDisk {
        let size = ds.getattr(at).await.expect("getattr disk").size;
        let instance = ds.export(at.export).expect("export").instance;
        let hash = blake3::hash(format!("{instance:016x}:{}", at.id).as_bytes());
        let mut id = [0u8; 16];
        id.copy_from_slice(&hash.as_bytes()[..16]);
        FileDisk {
            ds,
            at,
            name: name.to_string(),
            size,
            id,
        }
    }
}

fn io_err(e: DatastoreError) -> BlockError {
    match e {
        DatastoreError::NoSpace => BlockError::NoSpace,
        DatastoreError::Jukebox => BlockError::Retry,
        other => BlockError::Io(other.to_string()),
    }
}

#[async_trait]
impl BlockDevice for FileDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn stable_id(&self) -> [u8; 16] {
        self.id
    }

    async fn read(&self, offset: u64, len: u32) -> BlockResult<Bytes> {
        check_range(offset, len.into(), self.size)?;
        let r = self.ds.read(self.at, offset, len).await.map_err(io_err)?;
        if r.data.len() == len as usize {
            return Ok(r.data);
        }
        let mut data = r.data.to_vec();
        data.resize(len as usize, 0);
        Ok(Bytes::from(data))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> BlockResult<()> {
        check_range(offset, data.len() as u64, self.size)?;
        let stability = if fua {
            Stability::FileSync
        } else {
            Stability::Unstable
        };
        self.ds
            .write(self.at, offset, data, stability)
            .await
            .map_err(io_err)?;
        Ok(())
    }

    async fn flush(&self) -> BlockResult<()> {
        self.ds.commit(self.at).await.map_err(io_err)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> BlockResult<()> {
        check_range(offset, len, self.size)?;
        let zeros = Bytes::from(vec![0u8; 1 << 20]);
        let mut at = 0;
        while at < len {
            let n = (len - at).min(zeros.len() as u64) as usize;
            self.write(offset + at, zeros.slice(..n), fua).await?;
            at += n as u64;
        }
        Ok(())
    }

    async fn extents(&self, offset: u64, len: u64) -> BlockResult<Vec<Extent>> {
        check_range(offset, len, self.size)?;
        Ok(vec![Extent {
            offset,
            len,
            kind: ExtentKind::Data,
        }])
    }
}

/// A repository holding one backed-up VM, opened as a datastore in this
/// process with the VM's restore point published in `/revive`.
pub struct PublishedDisk {
    /// The datastore.
    pub ds: Arc<Datastore>,
    /// The flat disk, as a block device.
    pub disk: Arc<FileDisk>,
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
        let disk = Arc::new(FileDisk::open(ops, FileAt::new(export, attr.fileid), file).await);
        PublishedDisk { ds, disk }
    }
}
