//! The driver's calls that need no QEMU: config, registration, idempotent
//! stop, validation failures. Booting and mirroring a real VM is in
//! `tests/integration/qemu.rs`.

use super::*;
use crate::drivers::VmFile;

fn driver(run_dir: &Path) -> QemuDriver {
    let config: QemuConfig = toml::from_str(&format!("run_dir = {:?}", run_dir)).unwrap();
    QemuDriver::new("kvm1", config)
}

fn datastore() -> DatastoreSpec {
    DatastoreSpec {
        name: "revive-backup01".into(),
        remote_host: "127.0.0.1".into(),
        remote_path: "/revive/".into(),
        local_path: None,
    }
}

fn vm(memory: Option<u64>) -> VmSpec {
    VmSpec {
        name: "s1".into(),
        source_vm: "tiny".into(),
        folder: "s1".into(),
        files: vec![
            VmFile {
                name: "tiny.vmx".into(),
                size: 200,
                disk: false,
                url: None,
                location: None,
            },
            VmFile {
                name: "tiny.vmdk".into(),
                size: 200,
                disk: false,
                url: None,
                location: None,
            },
            VmFile {
                name: "tiny-flat.vmdk".into(),
                size: 64 << 20,
                disk: true,
                url: None,
                location: None,
            },
        ],
        memory_mib: memory,
        ..VmSpec::default()
    }
}

#[test]
fn config_has_defaults_and_refuses_unknown_keys() {
    let c: QemuConfig = toml::from_str("run_dir = \"/run/q\"").unwrap();
    assert_eq!(c.binary, "qemu-system-x86_64");
    assert_eq!(c.accel, "tcg");
    assert_eq!(c.memory_mib, DEFAULT_MEMORY_MIB);
    assert!(c.extra_args.is_empty());
    assert!(toml::from_str::<QemuConfig>("run_dir = \"/q\"\nacel = \"kvm\"").is_err());
    assert!(build("kvm1", &c).is_ok());
}

#[tokio::test]
async fn register_persists_the_nfs_urls_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = driver(dir.path());
    let r = d.register_vm(&datastore(), &vm(Some(256))).await.unwrap();
    assert_eq!(r, VmRef("s1".into()));
    let state = d.load_state(&d.paths("s1"), "s1").unwrap();
    assert_eq!(state.memory_mib, 256);
    assert_eq!(state.disks.len(), 1);
    assert_eq!(
        state.disks[0].location,
        "nfs://127.0.0.1/revive/s1/tiny-flat.vmdk"
    );
    assert_eq!(state.disks[0].format, "raw");
    // Again: the same VM, found registered.
    assert_eq!(
        d.register_vm(&datastore(), &vm(Some(256))).await.unwrap(),
        r
    );
    // No memsize in the backup: the host's default.
    let r2 = d.register_vm(&datastore(), &vm(None)).await.unwrap();
    let state = d.load_state(&d.paths(&r2.0), &r2.0).unwrap();
    assert_eq!(state.memory_mib, DEFAULT_MEMORY_MIB);
}

#[tokio::test]
async fn stopping_what_does_not_run_is_ok() {
    let dir = tempfile::tempdir().unwrap();
    let d = driver(dir.path());
    let r = VmRef("never".into());
    d.power_off(&r).await.unwrap();
    d.unregister_vm(&r).await.unwrap();
    let r = d.register_vm(&datastore(), &vm(None)).await.unwrap();
    d.power_off(&r).await.unwrap();
    d.unregister_vm(&r).await.unwrap();
    assert!(!d.paths("s1").dir.exists());
    d.unregister_vm(&r).await.unwrap();
}

#[tokio::test]
async fn calls_on_unknown_vms_and_tasks_say_not_found() {
    let dir = tempfile::tempdir().unwrap();
    let d = driver(dir.path());
    let err = d.power_on(&VmRef("ghost".into())).await.unwrap_err();
    assert!(matches!(err, DriverError::NotFound { .. }), "{err}");
    let r = d.register_vm(&datastore(), &vm(None)).await.unwrap();
    let err = d
        .live_migration_status(&r, &TaskRef("mirror:x".into()))
        .await
        .unwrap_err();
    assert!(matches!(err, DriverError::NotFound { .. }), "{err}");
    // A VM that does not run cannot be migrated live.
    let dest = dir.path().join("prod");
    let err = d
        .start_live_migration(&r, dest.to_str().unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, DriverError::NotFound { .. }), "{err}");
    assert!(!err.is_transient());
    let err = d.power_on(&VmRef("../etc".into())).await.unwrap_err();
    assert!(matches!(err, DriverError::UnsupportedVm { .. }), "{err}");
}

#[tokio::test]
async fn validation_names_a_missing_qemu_and_too_little_memory() {
    let dir = tempfile::tempdir().unwrap();
    let mut config: QemuConfig = toml::from_str(&format!("run_dir = {:?}", dir.path())).unwrap();
    config.binary = "/nonexistent/qemu-system-x86_64".into();
    let d = QemuDriver::new("kvm1", config.clone());
    let err = d.validate(&vm(None)).await.unwrap_err();
    assert!(err.to_string().contains("QEMU binary"), "{err}");

    // `true` stands in for a QEMU that answers --version.
    config.binary = "true".into();
    let d = QemuDriver::new("kvm1", config);
    let info = d.validate(&vm(Some(64))).await.unwrap();
    assert!(info.free_memory_mib.unwrap() > 0);
    let err = d.validate(&vm(Some(u64::MAX / 2))).await.unwrap_err();
    assert!(
        matches!(err, DriverError::InsufficientMemory { .. }),
        "{err}"
    );
    let mut diskless = vm(None);
    diskless.files.retain(|f| !f.disk);
    let err = d.validate(&diskless).await.unwrap_err();
    assert!(matches!(err, DriverError::UnsupportedVm { .. }), "{err}");
}

#[tokio::test]
async fn a_datastore_without_portmapper_is_a_transient_failure() {
    let dir = tempfile::tempdir().unwrap();
    let d = driver(dir.path());
    match d.attach_datastore(&datastore()).await {
        // Something on this machine serves port 111: nothing to check here.
        Ok(()) => {}
        Err(err) => assert!(err.is_transient(), "{err}"),
    }
}

#[tokio::test]
async fn start_from_copy_needs_the_copied_disks() {
    let dir = tempfile::tempdir().unwrap();
    let d = driver(dir.path());
    let err = d
        .start_from_copy(&vm(None), &dir.path().join("prod"))
        .await
        .unwrap_err();
    assert!(matches!(err, DriverError::NotFound { .. }), "{err}");
}
