//! Issue 3: the real datastore (`revive serve` over a repository) against
//! real clients: libnfs-utils, `nfs3_client`, `qemu-img` and fio. Every test
//! publishes a backed-up sample VM and works through NFS only; every test
//! that writes ends by checking that the repository still verifies and did
//! not change.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc;
use std::time::Duration;

use nfs3_client::nfs3_types::nfs3::{self, nfs_fh3, nfsstat3, stable_how};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use revive::datastore::namespace::ROOT_ID;
use revive::nfs::handle::FileHandle;
use tempfile::TempDir;

use crate::support::client::*;
use crate::support::server::{ReviveServer, ServerSpec};
use crate::support::vm::SampleVm;
use crate::support::*;

mod concurrency;
mod faults;
mod namespace;
mod peers;
mod restart;

pub(crate) const MIB: u64 = 1 << 20;
/// Folder name of the publication in every test.
pub(crate) const PUB: &str = "restore";

/// A backed-up sample VM, its repository, and `revive serve` publishing it
/// as `/revive/restore`.
pub(crate) struct Fixture {
    pub tmp: TempDir,
    pub vm: SampleVm,
    pub repo: PathBuf,
    /// The repository's files before the server ever ran.
    pub repo_before: BTreeMap<PathBuf, String>,
    pub server: ReviveServer,
    /// Dropped with the fixture; see [`watchdog`].
    _watchdog: mpsc::Sender<()>,
}

/// A test stuck on a hung server (an NFS call never answered) must fail CI,
/// not stall it: abort the test binary if the fixture lives longer than this.
const WATCHDOG: Duration = Duration::from_secs(300);

/// Aborts the process, naming the test, unless the returned sender is
/// dropped within [`WATCHDOG`].
fn watchdog() -> mpsc::Sender<()> {
    let (tx, rx) = mpsc::channel::<()>();
    let test = std::thread::current().name().unwrap_or("?").to_string();
    std::thread::spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(WATCHDOG) {
            eprintln!("\n!!! {test}: still running after {WATCHDOG:?}; aborting (hung server?)");
            std::process::abort();
        }
    });
    tx
}

impl Fixture {
    /// A VM `name` with a flat disk of `size` bytes, published in `/revive`.
    pub fn new(name: &str, size: u64, seed: u64) -> Fixture {
        Self::with(name, size, seed, |s| s)
    }

    /// As [`Fixture::new`], with the server spec adjusted by `f`.
    pub fn with(
        name: &str,
        size: u64,
        seed: u64,
        f: impl FnOnce(ServerSpec) -> ServerSpec,
    ) -> Fixture {
        let watchdog = watchdog();
        let tmp = tempfile::tempdir().expect("tempdir");
        let vm = SampleVm::create(&tmp.path().join("src"), name, size, seed);
        let repo = init_repo(tmp.path(), None);
        backup_json(&repo, &vm.dir, None);
        let spec = f(ServerSpec::new(&repo).publish(PUB, &format!("{name}@latest")));
        let server = ReviveServer::start(&tmp.path().join("server"), spec);
        // Taken once the server runs: publishing pins the restore point
        // (pins/<id>/<holder>), an operator action. From here on nothing a
        // client does may change a byte of the repository.
        let repo_before = snapshot_tree(&repo);
        assert!(
            repo_before.keys().any(|k| k.starts_with(repo.join("pins"))),
            "a published restore point is pinned"
        );
        Fixture {
            tmp,
            vm,
            repo,
            repo_before,
            server,
            _watchdog: watchdog,
        }
    }

    /// Name of the flat disk.
    pub fn disk_name(&self) -> String {
        format!("{}-flat.vmdk", self.vm.name)
    }

    /// The backed-up flat disk.
    pub fn disk(&self) -> Vec<u8> {
        std::fs::read(self.vm.flat()).expect("read flat disk")
    }

    /// libnfs URL of `file` in the publication folder.
    pub fn file_url(&self, file: &str) -> String {
        self.server.url(&format!("/revive/{PUB}/{file}"))
    }

    /// MOUNT `/revive`: a client, the export root and the publication folder.
    pub async fn mount(&self) -> (Client, nfs_fh3, nfs_fh3) {
        let conn = mount_at(self.server.nfs_port, self.server.mount_port, "/revive")
            .await
            .expect("mount /revive");
        let root = conn.root_nfs_fh3();
        let mut c = conn.into_nfs3_client();
        let folder = lookup(&mut c, &root, PUB)
            .await
            .expect("publication folder");
        (c, root, folder)
    }

    /// Stops the server; `revive verify` passes and no file of the
    /// repository changed.
    pub fn assert_repo_untouched(&mut self) {
        self.server.stop();
        let out = run_ok(revive().arg("verify").arg("--repo").arg(&self.repo));
        assert!(out.contains(": ok"), "verify: {out}");
        assert_eq!(
            snapshot_tree(&self.repo),
            self.repo_before,
            "the repository changed"
        );
    }
}

/// `data` with `patch` written over it at `offset` (extending it if needed).
pub(crate) fn apply(data: &mut Vec<u8>, offset: u64, patch: &[u8]) {
    let end = offset as usize + patch.len();
    if data.len() < end {
        data.resize(end, 0);
    }
    data[offset as usize..end].copy_from_slice(patch);
}

/// libnfs-utils on a published VM: the listing shows every file of the
/// restore point with its size, the flat disk reads back bit-exact, a new
/// file round-trips, and an unaligned FILE_SYNC write over the disk reads
/// back as backup + write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libnfs_lists_reads_and_writes_a_published_vm() {
    if skip_without_libnfs() {
        return;
    }
    // Not a multiple of the chunk or block size: a short last chunk.
    let mut f = Fixture::new("web01", 20 * MIB + 12_345, 31);

    let out = run_tool("nfs-ls", &[&f.server.url(&format!("/revive/{PUB}"))]).await;
    assert!(out.status.success(), "nfs-ls: {out:?}");
    let listing = String::from_utf8_lossy(&out.stdout).into_owned();
    let expected = sha256_dir(&f.vm.dir);
    assert_eq!(expected.len(), 5, "sample VM has five files");
    for name in expected.keys() {
        let size = std::fs::metadata(f.vm.dir.join(name)).expect("stat").len();
        let line = listing
            .lines()
            .find(|l| l.split_whitespace().last() == Some(name.as_str()))
            .unwrap_or_else(|| panic!("{name} missing from listing:\n{listing}"));
        assert!(
            line.split_whitespace().any(|w| w == size.to_string()),
            "{name}: size {size} not in {line:?}"
        );
    }
    let listed = listing.lines().filter(|l| !l.trim().is_empty()).count();
    assert_eq!(listed, expected.len(), "nothing else listed:\n{listing}");

    // Every file reads back bit-exact.
    for (name, hash) in &expected {
        let out = run_tool("nfs-cat", &[&f.file_url(name)]).await;
        assert!(out.status.success(), "nfs-cat {name}: {out:?}");
        assert_eq!(&hex::encode(sha256(&out.stdout)), hash, "{name} differs");
    }

    // A new file round-trips.
    let local = f.tmp.path().join("upload.bin");
    let upload = pattern(3 * MIB as usize + 7, 5);
    std::fs::write(&local, &upload).expect("write local");
    let out = run_tool(
        "nfs-cp",
        &[local.to_str().expect("utf8"), &f.file_url("upload.bin")],
    )
    .await;
    assert!(out.status.success(), "nfs-cp: {out:?}");
    let out = run_tool("nfs-cat", &[&f.file_url("upload.bin")]).await;
    assert!(out.status.success(), "nfs-cat upload: {out:?}");
    assert_eq!(sha256(&out.stdout), sha256(&upload), "upload differs");

    // Unaligned FILE_SYNC writes over the disk: one inside a block, one
    // across a chunk boundary, one at the short tail.
    let (mut c, _, folder) = f.mount().await;
    let disk_fh = lookup(&mut c, &folder, &f.disk_name()).await.expect("disk");
    let mut disk = f.disk();
    let size = disk.len() as u64;
    for (i, (offset, len)) in [
        (4095u64, 70_001usize),
        (5 * MIB - 1000, 3000),
        (size - 100, 100),
    ]
    .into_iter()
    .enumerate()
    {
        let patch = pattern(len, 100 + i as u64);
        write(&mut c, &disk_fh, offset, &patch, stable_how::FILE_SYNC).await;
        apply(&mut disk, offset, &patch);
    }
    let out = run_tool("nfs-cat", &[&f.file_url(&f.disk_name())]).await;
    assert!(out.status.success(), "nfs-cat disk: {out:?}");
    assert_eq!(out.stdout.len(), disk.len());
    assert_eq!(
        sha256(&out.stdout),
        sha256(&disk),
        "disk != backup + writes"
    );
    assert_ne!(sha256(&disk), sha256(&f.disk()), "the writes changed bytes");
    drop(c);
    f.assert_repo_untouched();
}

/// A client keeps its handles across restarts of `revive serve` (clean and
/// `kill -9`): GETATTR and READ with the old handles work and file ids are
/// unchanged. FILE_SYNC writes, and UNSTABLE writes covered by COMMIT,
/// acknowledged before `kill -9` are all there afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handles_and_stable_writes_survive_restart_and_kill9() {
    let mut f = Fixture::new("db01", 16 * MIB, 32);
    let (mut c, root, folder) = f.mount().await;
    let name = f.disk_name();
    let disk_fh = lookup(&mut c, &folder, &name).await.expect("disk");
    let attr = getattr(&mut c, &disk_fh).await.expect("getattr");
    let mut disk = f.disk();
    assert_eq!(attr.size, disk.len() as u64);

    // A clean restart: old handles, same ids, same bytes.
    drop(c);
    let took = f.server.restart();
    eprintln!("restart after SIGTERM: spawn to ports line {took:?}");
    let mut c = client_at(f.server.nfs_port).await;
    let again = getattr(&mut c, &disk_fh).await.expect("getattr old handle");
    assert_eq!((again.fileid, again.size), (attr.fileid, attr.size));
    let head = read(&mut c, &disk_fh, MIB - 10, 64 * 1024)
        .await
        .expect("read");
    assert_eq!(head, disk[(MIB - 10) as usize..][..64 * 1024]);
    assert_eq!(lookup(&mut c, &folder, &name).await, Ok(disk_fh.clone()));
    assert_eq!(lookup(&mut c, &root, PUB).await, Ok(folder.clone()));

    // Stable writes, then kill -9 right after the last acknowledgement.
    let journal = create(&mut c, &folder, "journal.bin")
        .await
        .expect("create");
    let journal_id = getattr(&mut c, &journal).await.expect("attr").fileid;
    let mut journal_data = Vec::new();
    for i in 0..40u64 {
        let offset = (i * 397_123 + 17) % (disk.len() as u64 - 9000);
        let patch = pattern(4096 + (i as usize * 131) % 5000, 1000 + i);
        write(&mut c, &disk_fh, offset, &patch, stable_how::FILE_SYNC).await;
        apply(&mut disk, offset, &patch);
        let jpatch = pattern(1000 + i as usize, 2000 + i);
        let joff = journal_data.len() as u64;
        write(&mut c, &journal, joff, &jpatch, stable_how::FILE_SYNC).await;
        apply(&mut journal_data, joff, &jpatch);
    }
    // UNSTABLE writes made durable by COMMIT.
    for i in 0..8u64 {
        let patch = pattern(65_536 + 3, 3000 + i);
        let offset = 9 * MIB + i * 70_000;
        write(&mut c, &disk_fh, offset, &patch, stable_how::UNSTABLE).await;
        apply(&mut disk, offset, &patch);
    }
    commit(&mut c, &disk_fh).await;
    f.server.kill9();
    drop(c);

    let took = f.server.restart();
    eprintln!("restart after kill -9: spawn to ports line {took:?}");
    let mut c = client_at(f.server.nfs_port).await;
    let after = getattr(&mut c, &disk_fh).await.expect("getattr after kill");
    assert_eq!((after.fileid, after.size), (attr.fileid, attr.size));
    let back = read_all(&mut c, &disk_fh, 0, disk.len() as u64)
        .await
        .expect("read disk");
    assert_eq!(back.len(), disk.len());
    assert!(back == disk, "acknowledged disk writes lost after kill -9");
    let jattr = getattr(&mut c, &journal).await.expect("journal after kill");
    assert_eq!(
        (jattr.fileid, jattr.size),
        (journal_id, journal_data.len() as u64)
    );
    let jback = read_all(&mut c, &journal, 0, jattr.size)
        .await
        .expect("read");
    assert!(jback == journal_data, "acknowledged journal writes lost");
    drop(c);
    f.assert_repo_untouched();
}

/// An export whose allow-list lacks 127.0.0.1 refuses MOUNT from it while
/// another export works; names with `/` or `..` escaping are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_lists_and_escaping_names_are_enforced() {
    let mut f = Fixture::with("app01", 4 * MIB, 33, |s| {
        s.export("/locked", &["192.0.2.1"])
            .publish_in("hidden", "app01@latest", Some("/locked"))
    });
    assert!(
        mount_at(f.server.nfs_port, f.server.mount_port, "/locked")
            .await
            .is_err(),
        "MOUNT of /locked from 127.0.0.1 must be refused"
    );
    if !skip_without_libnfs() {
        let out = run_tool("nfs-ls", &[&f.server.url("/locked/hidden")]).await;
        assert!(!out.status.success(), "nfs-ls /locked must fail: {out:?}");
        let out = run_tool("nfs-ls", &[&f.server.url(&format!("/revive/{PUB}"))]).await;
        assert!(out.status.success(), "nfs-ls /revive: {out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("app01.vmx"));
    }

    let (mut c, root, folder) = f.mount().await;
    let acces = Err(nfsstat3::NFS3ERR_ACCES);
    // A handle of /locked, forged from the persisted export record as a
    // client could guess it: refused on every call, not only at MOUNT.
    let records: serde_json::Value = serde_json::from_slice(
        &std::fs::read(f.server.state_dir().join("exports.json")).expect("exports.json"),
    )
    .expect("parse exports.json");
    let locked = records
        .as_array()
        .expect("records")
        .iter()
        .find(|r| r["path"] == "/locked")
        .expect("/locked record");
    let forged = |file| nfs_fh3 {
        data: Opaque::owned(
            FileHandle {
                export: locked["id"].as_u64().expect("id") as u32,
                instance: locked["instance"].as_u64().expect("instance"),
                file,
            }
            .encode()
            .to_vec(),
        ),
    };
    let locked_root = forged(ROOT_ID);
    let denied = Some(nfsstat3::NFS3ERR_ACCES);
    assert_eq!(getattr(&mut c, &locked_root).await.err(), denied);
    assert_eq!(lookup(&mut c, &locked_root, "hidden").await.err(), denied);
    assert_eq!(
        read(&mut c, &forged(ROOT_ID + 1), 0, 10).await.err(),
        denied
    );
    assert_eq!(lookup(&mut c, &root, "..").await, acces);
    assert_eq!(lookup(&mut c, &root, "../etc").await, acces);
    assert_eq!(
        lookup(&mut c, &root, &format!("{PUB}/app01.vmx")).await,
        acces
    );
    assert_eq!(lookup(&mut c, &folder, "..").await, Ok(root.clone()));
    assert!(create(&mut c, &folder, "a/b").await.is_err());
    assert!(create(&mut c, &folder, "..").await.is_err());
    assert!(mkdir(&mut c, &folder, "../x").await.is_err());
    assert!(
        rename(&mut c, &folder, "app01.vmx", &folder, "../app01.vmx")
            .await
            .is_err()
    );
    assert!(rename(&mut c, &folder, "app01.vmx", &root, "..")
        .await
        .is_err());
    assert!(remove(&mut c, &folder, "../restore").await.is_err());
    assert!(
        mount_at(
            f.server.nfs_port,
            f.server.mount_port,
            &format!("/revive/{PUB}/../..")
        )
        .await
        .is_err(),
        "MOUNT of a path leaving the export"
    );
    // Nothing was created or renamed by the refused calls.
    let names: Vec<String> = list(&mut c, &folder)
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(names.len(), 5, "{names:?}");
    assert!(names.contains(&"app01.vmx".to_string()));
    drop(c);
    f.assert_repo_untouched();
}

/// FSSTAT gives the real size of the filesystem where writes land; FSINFO
/// the limits real clients need (1 MiB transfers, files of 64 TiB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsstat_and_fsinfo_describe_the_write_cache() {
    let f = Fixture::new("fs01", MIB, 48);
    let (mut c, root, _) = f.mount().await;
    let stat = c
        .fsstat(&nfs3::FSSTAT3args {
            fsroot: root.clone(),
        })
        .await
        .expect("rpc")
        .unwrap();
    let dir = std::ffi::CString::new(f.server.dir.to_str().expect("utf8")).expect("path");
    // SAFETY: a valid NUL-terminated path and a zeroed statvfs buffer.
    let mut vfs: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(dir.as_ptr(), &mut vfs) }, 0);
    assert_eq!(stat.tbytes, vfs.f_blocks as u64 * vfs.f_frsize as u64);
    assert!(stat.abytes <= stat.fbytes && stat.fbytes <= stat.tbytes);
    let info = c
        .fsinfo(&nfs3::FSINFO3args { fsroot: root })
        .await
        .expect("rpc")
        .unwrap();
    assert_eq!((info.rtmax, info.wtmax), (1 << 20, 1 << 20));
    assert!(info.maxfilesize >= 64 << 40);
}

/// A publication of a restore point that does not exist stops `revive
/// serve` at start with one error naming it, before any port is announced.
#[test]
fn serve_refuses_a_publication_of_a_missing_restore_point() {
    let f = Fixture::new("pub01", MIB, 49);
    let spec = ServerSpec::new(&f.repo).publish("ghost", "nope@latest");
    let err = match ReviveServer::try_start(&f.tmp.path().join("server2"), spec) {
        Ok(_) => panic!("serve must refuse a missing restore point"),
        Err(e) => e,
    };
    assert!(
        err.contains("revive: publish 'ghost' (nope@latest)"),
        "{err}"
    );
}
