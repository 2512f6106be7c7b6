//! Datastore behaviour without a protocol in front: overlay, identity across
//! reopen, namespace rules.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::progress::NoProgress;
use crate::repo::{backup, BackupOptions};
use crate::store::LocalStore;

const EXPORT: &str = "/revive";

struct Fixture {
    dir: tempfile::TempDir,
    disk: Vec<u8>,
}

impl Fixture {
    async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let vm = dir.path().join("web01");
        std::fs::create_dir(&vm).unwrap();
        let disk: Vec<u8> = (0..(3u32 << 18))
            .flat_map(|i| i.wrapping_mul(2654435761).to_le_bytes())
            .collect();
        std::fs::write(vm.join("web01-flat.vmdk"), &disk).unwrap();
        std::fs::write(vm.join("web01.vmx"), "displayName = \"web01\"\n").unwrap();
        let store = Arc::new(LocalStore::open(dir.path().join("repo")).unwrap());
        let repo = Repository::init(store, 64 * 1024).await.unwrap();
        backup(&repo, &vm, &BackupOptions::default(), &NoProgress)
            .await
            .unwrap();
        Fixture { dir, disk }
    }

    async fn open(&self) -> Datastore {
        let repo = Repository::open_local(self.dir.path().join("repo"))
            .await
            .unwrap();
        let config = DatastoreConfig {
            state_dir: self.dir.path().join("state"),
            cache_root: self.dir.path().join("cache"),
            block_cache_bytes: 1 << 20,
            readahead_chunks: 2,
            exports: vec![ExportConfig {
                path: EXPORT.into(),
                allowed_clients: vec![IpAddr::from([127, 0, 0, 1])],
            }],
        };
        Datastore::open(repo, config).await.unwrap()
    }

    /// Publishes `web01@latest` as `name` and looks up its flat disk.
    async fn publish_disk(&self, ds: &Datastore, name: &str) -> Published {
        let export = ds.export_by_path(EXPORT).unwrap().id;
        let folder = ds
            .publish(EXPORT, name, "web01@latest", None)
            .await
            .unwrap();
        let disk = ds
            .lookup(&FileAt::new(export, folder).child("web01-flat.vmdk"))
            .await
            .unwrap();
        Published {
            export,
            folder,
            disk,
        }
    }
}

/// A published restore point and its flat disk.
struct Published {
    export: ExportId,
    folder: FileId,
    disk: Attr,
}

async fn read_all(ds: &Datastore, export: ExportId, id: FileId) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let r = ds
            .read(FileAt::new(export, id), out.len() as u64, 100_000)
            .await
            .unwrap();
        out.extend_from_slice(&r.data);
        if r.eof {
            return out;
        }
    }
}

#[tokio::test]
async fn writes_overlay_the_backup_and_survive_reopen() {
    let fx = Fixture::new().await;
    let ds = fx.open().await;
    let Published {
        export,
        folder,
        disk,
    } = fx.publish_disk(&ds, "web01-restore").await;
    assert_eq!(disk.size, fx.disk.len() as u64);
    assert_eq!(read_all(&ds, export, disk.fileid).await, fx.disk);

    // Unaligned write across a block boundary: copy-on-write of both ends.
    let patch = Bytes::from(vec![0xab; 5000]);
    ds.write(
        FileAt::new(export, disk.fileid),
        70_001,
        patch.clone(),
        Stability::FileSync,
    )
    .await
    .unwrap();
    let mut expected = fx.disk.clone();
    expected[70_001..75_001].copy_from_slice(&patch);
    assert_eq!(read_all(&ds, export, disk.fileid).await, expected);
    drop(ds);

    let ds = fx.open().await;
    let again = ds
        .lookup(&FileAt::new(export, folder).child("web01-flat.vmdk"))
        .await
        .unwrap();
    assert_eq!(again.fileid, disk.fileid, "file ids survive a reopen");
    assert_eq!(read_all(&ds, export, disk.fileid).await, expected);
}

#[tokio::test]
async fn namespace_changes_like_esxi_makes_them() {
    let fx = Fixture::new().await;
    let ds = fx.open().await;
    let export = ds.export_by_path(EXPORT).unwrap().id;
    let folder = ds
        .publish(EXPORT, "s1", "web01@latest", None)
        .await
        .unwrap();
    let set = SetAttr::default();

    // .vmx~ written then renamed over .vmx.
    let tmp = ds
        .create(
            &FileAt::new(export, folder).child("web01.vmx~"),
            CreateMode::Guarded,
            &set,
        )
        .await
        .unwrap();
    ds.write(
        FileAt::new(export, tmp.fileid),
        0,
        Bytes::from_static(b"memSize = \"1024\"\n"),
        Stability::Unstable,
    )
    .await
    .unwrap();
    ds.commit(FileAt::new(export, tmp.fileid)).await.unwrap();
    ds.rename(
        &FileAt::new(export, folder).child("web01.vmx~"),
        &FileAt::new(export, folder).child("web01.vmx"),
    )
    .await
    .unwrap();
    let vmx = ds
        .lookup(&FileAt::new(export, folder).child("web01.vmx"))
        .await
        .unwrap();
    assert_eq!(vmx.fileid, tmp.fileid);
    assert_eq!(
        read_all(&ds, export, vmx.fileid).await,
        b"memSize = \"1024\"\n"
    );

    // A lock file named after the disk's file id, then removed.
    let disk = ds
        .lookup(&FileAt::new(export, folder).child("web01-flat.vmdk"))
        .await
        .unwrap();
    let lck = format!(".lck-{:016x}", disk.fileid);
    ds.mkdir(&FileAt::new(export, folder).child(&lck), &set)
        .await
        .unwrap();
    assert!(matches!(
        ds.rmdir(&FileAt::new(export, ROOT_ID).child("s1")).await,
        Err(DatastoreError::Access)
    ));
    ds.rmdir(&FileAt::new(export, folder).child(&lck))
        .await
        .unwrap();

    // Removing a presented file hides it and frees its cache.
    ds.write(
        FileAt::new(export, disk.fileid),
        0,
        Bytes::from_static(b"x"),
        Stability::FileSync,
    )
    .await
    .unwrap();
    let cache_dir = fx.dir.path().join("cache").join("s1");
    let cached = std::fs::read_dir(&cache_dir).unwrap().count();
    ds.remove(&FileAt::new(export, folder).child("web01-flat.vmdk"))
        .await
        .unwrap();
    assert!(matches!(
        ds.lookup(&FileAt::new(export, folder).child("web01-flat.vmdk"))
            .await,
        Err(DatastoreError::NotFound)
    ));
    assert!(std::fs::read_dir(&cache_dir).unwrap().count() < cached);
    assert!(matches!(
        ds.getattr(FileAt::new(export, disk.fileid)).await,
        Err(DatastoreError::Stale)
    ));

    // Truncate-extend is sparse: the new tail reads as zeros.
    let vmx_len = vmx.size;
    let grown = SetAttr {
        size: Some(vmx_len + 10_000),
        ..SetAttr::default()
    };
    ds.setattr(FileAt::new(export, vmx.fileid), &grown, None)
        .await
        .unwrap();
    let data = read_all(&ds, export, vmx.fileid).await;
    assert_eq!(data.len() as u64, vmx_len + 10_000);
    assert!(data[vmx_len as usize..].iter().all(|&b| b == 0));

    // Nothing escapes the export.
    assert_eq!(
        ds.lookup(&FileAt::new(export, ROOT_ID).child(".."))
            .await
            .unwrap()
            .fileid,
        ROOT_ID
    );
    assert!(ds
        .create(
            &FileAt::new(export, folder).child("a/b"),
            CreateMode::Guarded,
            &set
        )
        .await
        .is_err());
    assert!(ds
        .create(
            &FileAt::new(export, folder).child(".."),
            CreateMode::Guarded,
            &set
        )
        .await
        .is_err());
}

#[tokio::test]
async fn unpublish_removes_folder_and_cache_and_fsstat_is_real() {
    let fx = Fixture::new().await;
    let ds = fx.open().await;
    let Published {
        export,
        folder,
        disk,
    } = fx.publish_disk(&ds, "s2").await;
    ds.write(
        FileAt::new(export, disk.fileid),
        0,
        Bytes::from_static(b"y"),
        Stability::FileSync,
    )
    .await
    .unwrap();
    assert!(matches!(
        ds.publish(EXPORT, "s2", "web01@latest", None).await,
        Err(DatastoreError::Exists)
    ));
    // Published points are pinned: they cannot be forgotten while in use.
    let point = ds.publications(EXPORT).await.unwrap()[0].1.clone();
    let err = ds.repo().forget(&point).await.unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
    let stat = ds.fsstat(export).await.unwrap();
    assert!(stat.total_bytes > 0 && stat.free_bytes <= stat.total_bytes);
    ds.unpublish(EXPORT, "s2").await.unwrap();
    assert!(!fx.dir.path().join("cache").join("s2").exists());
    assert!(matches!(
        ds.getattr(FileAt::new(export, folder)).await,
        Err(DatastoreError::Stale)
    ));
    assert!(ds.publications(EXPORT).await.unwrap().is_empty());
    ds.repo().forget(&point).await.unwrap();
}

#[tokio::test]
async fn used_counts_only_what_a_truncate_left_visible() {
    let fx = Fixture::new().await;
    let ds = fx.open().await;
    let Published { export, disk, .. } = fx.publish_disk(&ds, "web01-restore").await;
    let full = fx.disk.len() as u64;
    assert_eq!(
        disk.used, full,
        "an untouched presented file uses its backup"
    );

    let resize = |size| SetAttr {
        size: Some(size),
        ..SetAttr::default()
    };
    ds.setattr(FileAt::new(export, disk.fileid), &resize(4096), None)
        .await
        .unwrap();
    // Extending again is sparse: the hidden backup bytes do not come back.
    let attr = ds
        .setattr(FileAt::new(export, disk.fileid), &resize(full), None)
        .await
        .unwrap();
    assert_eq!(attr.size, full);
    assert!(
        attr.used < full / 4,
        "used {} after truncate to 4 KiB and sparse extend to {full}",
        attr.used
    );
    let data = read_all(&ds, export, disk.fileid).await;
    assert_eq!(&data[..4096], &fx.disk[..4096]);
    assert!(data[4096..].iter().all(|&b| b == 0));
}
