//! The vsphere driver and its vim25 client against vcsim (govmomi's
//! simulator), in ESX and vCenter modes, with a real `revive serve` exporting
//! the published VM folders.
//!
//! # vcsim's localPath
//! vcsim does not speak NFS: it treats a NAS datastore's `localPath` as a
//! local folder (and names the datastore after its last component), and
//! RegisterVM checks that the `.vmx`, `.nvram` and `vmware.log` exist there.
//! There is no kernel NFS client on these machines (no `nfs` in
//! /proc/filesystems), so the test copies the small files of each published
//! folder out of revive's export over NFS with libnfs' `nfs-cp` into that
//! folder, and checks they are the bytes that were backed up: what vcsim
//! reads is what revive serves. The flat disks stay in the export; vcsim
//! never reads disks.

mod cli;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use revive::drivers::vsphere::api;
use revive::drivers::vsphere::client::VimClient;
use revive::drivers::vsphere::{VsphereConfig, VsphereDriver};
use revive::drivers::{DatastoreSpec, Driver, DriverError, MigrationStatus, VmFile, VmSpec};

use crate::support::client::run_tool;
use crate::support::server::{ReviveServer, ServerSpec};
use crate::support::vcsim::{vcsim_or_skip, Inventory, Mode, Vcsim, PASSWORD, USER};
use crate::support::vm::SampleVm;
use crate::support::{backup_json, init_repo, sha256_file, skip_without_libnfs};

/// The datastore name the controller would derive for this machine.
const DS: &str = "revive-testhost";
/// The export revive serves.
const EXPORT: &str = "/revive";
/// vcsim's own local datastore: the "production" datastore of these tests.
const PROD_DS: &str = "LocalDS_0";
/// Longest wait for a Storage vMotion to finish in vcsim.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(30);

struct Fixture {
    dir: tempfile::TempDir,
    vm: SampleVm,
    server: ReviveServer,
    vcsim: Vcsim,
}

impl Fixture {
    /// A backed-up VM published twice (folders `s1` and `s2`), and vcsim.
    fn start(mode: Mode) -> Option<Fixture> {
        let binary = vcsim_or_skip()?;
        if skip_without_libnfs() {
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let vm = SampleVm::create(&dir.path().join("src"), "web01", 2 << 20, 7);
        let repo = init_repo(dir.path(), None);
        backup_json(&repo, &vm.dir, Some("web01"));
        let server = ReviveServer::start(
            &dir.path().join("server"),
            ServerSpec::new(&repo)
                .publish("s1", "web01@latest")
                .publish("s2", "web01@latest"),
        );
        let vcsim = Vcsim::start(&binary, mode, dir.path());
        Some(Fixture {
            dir,
            vm,
            server,
            vcsim,
        })
    }

    /// The folder vcsim uses as the NAS datastore (`nas_local_path`).
    fn local_path(&self) -> PathBuf {
        self.dir.path().join("vcsim-nas").join(DS)
    }

    fn config(&self) -> VsphereConfig {
        VsphereConfig {
            url: self.vcsim.url.clone(),
            user: USER.into(),
            password: Some(PASSWORD.into()),
            password_env: None,
            insecure: false,
            ca_file: Some(self.vcsim.ca_file()),
            esx_host: match self.vcsim.mode {
                Mode::Esx => None,
                Mode::Vpx => Some("DC0_H0".into()),
            },
            datacenter: None,
            redirect_datastore: None,
            task_timeout_secs: 30,
            nas_local_path: Some(self.local_path()),
        }
    }

    fn driver(&self, config: &VsphereConfig) -> VsphereDriver {
        VsphereDriver::new("esx-test", config).expect("driver")
    }

    /// A client of our own, to look at vcsim's inventory.
    fn client(&self) -> VimClient {
        client_of(&self.vcsim)
    }

    fn datastore(&self) -> DatastoreSpec {
        DatastoreSpec {
            name: DS.into(),
            remote_host: "127.0.0.1".into(),
            remote_path: EXPORT.into(),
            local_path: None,
        }
    }

    /// The VM published in `folder`, to register as `name`.
    fn vm_spec(&self, folder: &str, name: &str, memory_mib: u64) -> VmSpec {
        let file = |n: &str, disk: bool| VmFile {
            name: n.into(),
            size: std::fs::metadata(self.vm.dir.join(n)).expect("stat").len(),
            disk,
            url: None,
            location: None,
        };
        VmSpec {
            name: name.into(),
            source_vm: "web01".into(),
            folder: folder.into(),
            files: vec![
                file("web01-flat.vmdk", true),
                file("web01.nvram", false),
                file("web01.vmdk", false),
                file("web01.vmx", false),
                file("vmware.log", false),
            ],
            memory_mib: Some(memory_mib),
            ..VmSpec::default()
        }
    }

    /// Copies the small files of published folder `folder` out of revive's
    /// export (NFS, libnfs) into vcsim's datastore folder, and checks they
    /// are the backed-up bytes. vcsim looks for the NVRAM under the name the
    /// VM is registered as (`vm_name`), not the `.vmx`'s `nvram` key as ESXi
    /// does: a copy under that name too.
    async fn mirror(&self, folder: &str, vm_name: &str) {
        let target = self.local_path().join(folder);
        std::fs::create_dir_all(&target).expect("create mirror folder");
        for name in ["web01.vmx", "web01.nvram", "vmware.log", "web01.vmdk"] {
            let dest = target.join(name);
            let url = self.server.url(&format!("{EXPORT}/{folder}/{name}"));
            let out = run_tool("nfs-cp", &[&url, dest.to_str().expect("utf8")]).await;
            assert!(out.status.success(), "nfs-cp {url}: {out:?}");
            assert_eq!(
                sha256_file(&dest),
                sha256_file(&self.vm.dir.join(name)),
                "{name} read from the export differs from the backed-up file"
            );
        }
        std::fs::copy(
            target.join("web01.nvram"),
            target.join(format!("{vm_name}.nvram")),
        )
        .expect("copy nvram for vcsim");
    }
}

/// A client of our own, to look at vcsim's inventory.
fn client_of(vcsim: &Vcsim) -> VimClient {
    crate::support::vcsim::client_of(vcsim)
}

/// vcsim's NAS datastores and the VMs these tests register (`rec-*`).
async fn inventory(vcsim: &Vcsim) -> Inventory {
    crate::support::vcsim::inventory(vcsim, "rec-").await
}

async fn wait_migration(
    driver: &VsphereDriver,
    vm: &revive::drivers::VmRef,
    task: &revive::drivers::TaskRef,
) -> MigrationStatus {
    let start = Instant::now();
    loop {
        let status = driver
            .live_migration_status(vm, task)
            .await
            .expect("migration status");
        if !matches!(status, MigrationStatus::Running { .. }) || start.elapsed() > MIGRATION_TIMEOUT
        {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The whole session on one host: validate, mount (once for two sessions),
/// register, power on, Storage vMotion, stop, unmount.
async fn session_flow(mode: Mode) {
    let Some(f) = Fixture::start(mode) else {
        return;
    };
    let config = f.config();
    let driver = f.driver(&config);
    let ds = f.datastore();

    let info = driver
        .validate(&f.vm_spec("s1", "rec-web01-1", 64))
        .await
        .expect("validate");
    let free = info.free_memory_mib.expect("vcsim reports memory");
    assert!(free > 64, "free memory {free} MiB");
    let err = driver
        .validate(&f.vm_spec("s1", "rec-web01-1", free + 1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, DriverError::InsufficientMemory { needed_mib, .. } if needed_mib == free + 1),
        "{err}"
    );

    // vcsim needs the folder to exist before the mount, as ESXi needs the export.
    std::fs::create_dir_all(f.local_path()).expect("mkdir");
    driver.attach_datastore(&ds).await.expect("attach");
    driver.attach_datastore(&ds).await.expect("attach again");
    let inv = inventory(&f.vcsim).await;
    assert_eq!(
        inv.nas,
        vec![(DS.to_string(), "127.0.0.1".to_string(), EXPORT.to_string())]
    );

    f.mirror("s1", "rec-web01-1").await;
    f.mirror("s2", "rec-web01-2").await;
    let vm1 = driver
        .register_vm(&ds, &f.vm_spec("s1", "rec-web01-1", 64))
        .await
        .expect("register");
    let again = driver
        .register_vm(&ds, &f.vm_spec("s1", "rec-web01-1", 64))
        .await
        .expect("register again");
    assert_eq!(vm1, again, "a second register finds the first VM");
    // Second session on the same host: the same datastore.
    driver
        .attach_datastore(&ds)
        .await
        .expect("attach, session 2");
    let vm2 = driver
        .register_vm(&ds, &f.vm_spec("s2", "rec-web01-2", 64))
        .await
        .expect("register session 2");
    assert_ne!(vm1, vm2);
    // The same folder under another name is refused, not registered twice.
    let err = driver
        .register_vm(&ds, &f.vm_spec("s1", "rec-other", 64))
        .await
        .unwrap_err();
    assert!(matches!(err, DriverError::Duplicate { .. }), "{err}");

    driver.power_on(&vm1).await.expect("power on");
    driver.power_on(&vm1).await.expect("power on again");
    driver.power_on(&vm2).await.expect("power on 2");
    let inv = inventory(&f.vcsim).await;
    assert_eq!(inv.nas.len(), 1, "two sessions share one datastore");
    assert_eq!(
        inv.vms,
        vec![
            (
                "rec-web01-1".into(),
                "poweredOn".into(),
                vec![DS.to_string()]
            ),
            (
                "rec-web01-2".into(),
                "poweredOn".into(),
                vec![DS.to_string()]
            ),
        ]
    );

    // VMs run from the datastore: removing it is refused, and it stays.
    let err = driver.detach_datastore(&ds).await.unwrap_err();
    assert!(matches!(err, DriverError::InUse { .. }), "{err}");
    assert_eq!(inventory(&f.vcsim).await.nas.len(), 1);

    // Storage vMotion of session 1 to production.
    let err = driver
        .start_live_migration(&vm1, "no-such-ds")
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DriverError::NotFound { kind: "datastore", name } if name.contains("no-such-ds")),
        "{err}"
    );
    let task = driver
        .start_live_migration(&vm1, PROD_DS)
        .await
        .expect("start migration");
    assert_eq!(
        wait_migration(&driver, &vm1, &task).await,
        MigrationStatus::Completed
    );
    driver
        .complete_live_migration(&vm1, &task)
        .await
        .expect("complete");
    let inv = inventory(&f.vcsim).await;
    assert_eq!(
        inv.vms[0],
        (
            "rec-web01-1".into(),
            "poweredOn".into(),
            vec![PROD_DS.to_string()]
        )
    );

    // Session 2 stops: power off, unregister (twice: idempotent).
    driver.power_off(&vm2).await.expect("power off");
    driver.power_off(&vm2).await.expect("power off again");
    driver.unregister_vm(&vm2).await.expect("unregister");
    driver.unregister_vm(&vm2).await.expect("unregister again");
    let inv = inventory(&f.vcsim).await;
    assert_eq!(inv.vms.len(), 1, "{:?}", inv.vms);

    // Nothing runs from the datastore any more: it goes.
    driver.detach_datastore(&ds).await.expect("detach");
    driver.detach_datastore(&ds).await.expect("detach again");
    let inv = inventory(&f.vcsim).await;
    assert!(inv.nas.is_empty(), "{:?}", inv.nas);
    // The migrated VM runs on.
    assert_eq!(inv.vms[0].1, "poweredOn");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vsphere_session_on_esx() {
    session_flow(Mode::Esx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vsphere_session_on_vcenter() {
    session_flow(Mode::Vpx).await;
}

/// Wrong password, unknown host and datastore, untrusted certificate: clear
/// errors that name what was wrong, and nothing left registered. Then vcsim
/// stops (a transient error) and comes back (the driver logs in again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vsphere_errors_are_clear_and_leave_nothing() {
    let Some(mut f) = Fixture::start(Mode::Vpx) else {
        return;
    };
    let ds = f.datastore();
    let vm = f.vm_spec("s1", "rec-web01", 64);
    std::fs::create_dir_all(f.local_path()).expect("mkdir");

    let mut bad = f.config();
    bad.password = Some("wrong".into());
    let err = f.driver(&bad).validate(&vm).await.unwrap_err();
    assert!(
        matches!(&err, DriverError::Auth { reason, .. } if reason.contains(USER)),
        "{err}"
    );
    assert!(!err.is_transient());
    let err = f.driver(&bad).attach_datastore(&ds).await.unwrap_err();
    assert!(matches!(err, DriverError::Auth { .. }), "{err}");

    let mut bad = f.config();
    bad.esx_host = Some("esx-nope".into());
    let err = f.driver(&bad).validate(&vm).await.unwrap_err();
    assert!(
        matches!(&err, DriverError::NotFound { kind: "ESXi host", name } if name == "esx-nope"),
        "{err}"
    );
    let err = f.driver(&bad).attach_datastore(&ds).await.unwrap_err();
    assert!(err.to_string().contains("esx-nope"), "{err}");

    let mut bad = f.config();
    bad.esx_host = None;
    let err = f.driver(&bad).validate(&vm).await.unwrap_err();
    assert!(err.to_string().contains("esx_host"), "{err}");

    let mut bad = f.config();
    bad.redirect_datastore = Some("prod-nope".into());
    let err = f.driver(&bad).validate(&vm).await.unwrap_err();
    assert!(
        matches!(&err, DriverError::NotFound { kind: "datastore", name } if name.contains("prod-nope")),
        "{err}"
    );

    let mut bad = f.config();
    bad.ca_file = None;
    let err = f.driver(&bad).validate(&vm).await.unwrap_err();
    assert!(err.to_string().contains("certificate"), "{err}");
    assert!(
        !err.is_transient(),
        "an untrusted certificate is not an outage"
    );
    bad.insecure = true;
    f.driver(&bad)
        .validate(&vm)
        .await
        .expect("insecure = true skips the check");

    // A VM folder that is not on the datastore: NotFound naming the path.
    let driver = f.driver(&f.config());
    driver.attach_datastore(&ds).await.expect("attach");
    let err = driver
        .register_vm(&ds, &f.vm_spec("missing", "rec-web01", 64))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DriverError::NotFound { name, .. } if name.contains("[revive-testhost] missing/web01.vmx")),
        "{err}"
    );
    driver.detach_datastore(&ds).await.expect("detach");
    let inv = inventory(&f.vcsim).await;
    assert!(
        inv.nas.is_empty() && inv.vms.is_empty(),
        "left behind: {:?} {:?}",
        inv.nas,
        inv.vms
    );

    // vcsim goes away: transient; comes back: the driver logs in again.
    let driver = f.driver(&f.config());
    driver.validate(&vm).await.expect("validate");
    f.vcsim.stop();
    let err = driver.validate(&vm).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(matches!(err, DriverError::Unreachable { .. }), "{err}");
    f.vcsim.restart();
    driver.validate(&vm).await.expect("validate after restart");
    driver
        .attach_datastore(&ds)
        .await
        .expect("attach after restart");
    f.mirror("s1", "rec-web01").await;
    let r = driver.register_vm(&ds, &vm).await.expect("register");
    driver.power_on(&r).await.expect("power on");
    let inv = inventory(&f.vcsim).await;
    assert_eq!(
        inv.vms,
        vec![("rec-web01".into(), "poweredOn".into(), vec![DS.to_string()])]
    );
}

/// redirect_datastore: before power-on the VM's working directory is on the
/// production datastore and a snapshot there takes its writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vsphere_redirects_writes_to_production() {
    let Some(f) = Fixture::start(Mode::Esx) else {
        return;
    };
    let mut config = f.config();
    config.redirect_datastore = Some(PROD_DS.into());
    let driver = f.driver(&config);
    let ds = f.datastore();
    let spec = f.vm_spec("s1", "rec-web01", 64);
    driver.validate(&spec).await.expect("validate");
    std::fs::create_dir_all(f.local_path()).expect("mkdir");
    driver.attach_datastore(&ds).await.expect("attach");
    f.mirror("s1", "rec-web01").await;
    let vm = driver.register_vm(&ds, &spec).await.expect("register");
    // Again: no second snapshot, no second reconfigure.
    assert_eq!(driver.register_vm(&ds, &spec).await.expect("again"), vm);
    driver.power_on(&vm).await.expect("power on");

    let c = f.client();
    let moref = revive::drivers::vsphere::soap::MoRef::new("VirtualMachine", &vm.0);
    let info = api::vm_info(&c, &moref).await.expect("vm info");
    assert_eq!(
        info.snapshot_directory.as_deref(),
        Some("[LocalDS_0] rec-web01")
    );
    assert!(
        info.snapshot("revive-redirect").is_some(),
        "{:?}",
        info.snapshots
    );
    let snaps = c
        .retrieve_one(&moref, &["snapshot"])
        .await
        .expect("snapshot");
    let tree = snaps.props.get("snapshot").expect("snapshot info");
    let roots: Vec<_> = tree.children_named("rootSnapshotList").collect();
    assert_eq!(roots.len(), 1, "exactly one snapshot");
    assert_eq!(roots[0].text_at(&["name"]), Some("revive-redirect"));
    // The snapshot's files are in the VM's folder on production storage.
    let prod = vcsim_datastore_folder(&c, PROD_DS).await;
    let folder = prod.join("rec-web01");
    let files: Vec<String> = std::fs::read_dir(&folder)
        .unwrap_or_else(|e| panic!("read {}: {e}", folder.display()))
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        files.iter().any(|n| n.ends_with(".vmsn")),
        "no snapshot file in {}: {files:?}",
        folder.display()
    );
    // After the Storage vMotion the migration is Ready (the redirect
    // snapshot waits), complete consolidates it, then it is Completed.
    let task = driver
        .start_live_migration(&vm, PROD_DS)
        .await
        .expect("migrate");
    assert_eq!(
        wait_migration(&driver, &vm, &task).await,
        MigrationStatus::Ready
    );
    driver
        .complete_live_migration(&vm, &task)
        .await
        .expect("complete");
    let info = api::vm_info(&c, &moref).await.expect("vm info");
    assert!(
        info.snapshots.is_empty(),
        "snapshot consolidated: {:?}",
        info.snapshots
    );
    assert_eq!(
        driver
            .live_migration_status(&vm, &task)
            .await
            .expect("status"),
        MigrationStatus::Completed
    );
}

/// The local folder behind one of vcsim's datastores (its `summary.url`).
async fn vcsim_datastore_folder(c: &VimClient, name: &str) -> PathBuf {
    let root = c.content().await.expect("login").root_folder;
    let all = c
        .find_all(&root, "Datastore", &["name", "summary.url"])
        .await
        .expect("datastores");
    let ds = all
        .iter()
        .find(|d| d.text("name") == Some(name))
        .expect("datastore");
    Path::new(ds.text("summary.url").expect("url")).to_path_buf()
}
