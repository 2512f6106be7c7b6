use std::net::IpAddr;
use std::os::unix::fs::symlink;

use bytes::Bytes;

use super::*;
use crate::datastore::types::{Attr, CreateMode, FileKind, SetAttr, SetTime, Stability};
use crate::datastore::{FileAt, FileOps};

fn localhost() -> Vec<IpAddr> {
    vec![IpAddr::from([127, 0, 0, 1])]
}

/// A state folder and a served folder with `vm/disk.img` (4 KiB of 7s).
struct Fixture {
    tmp: tempfile::TempDir,
    pt: Passthrough,
    export: Arc<Export>,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let folder = tmp.path().join("clone");
        std::fs::create_dir_all(folder.join("vm")).unwrap();
        std::fs::write(folder.join("vm/disk.img"), vec![7u8; 4096]).unwrap();
        std::fs::write(tmp.path().join("secret"), b"outside the export").unwrap();
        let pt = Passthrough::open(&tmp.path().join("state")).unwrap();
        let export = pt.add_export("/snap/c1", &folder, &localhost()).unwrap();
        Fixture { tmp, pt, export }
    }

    fn folder(&self) -> PathBuf {
        self.tmp.path().join("clone")
    }

    async fn lookup_path(&self, path: &str) -> DsResult<Attr> {
        let mut dir = self.export.root;
        let mut attr = self.pt.getattr(FileAt::new(self.export.id, dir)).await?;
        for name in path.split('/') {
            attr = self
                .pt
                .lookup(&FileAt::new(self.export.id, dir).child(name))
                .await?;
            dir = attr.fileid;
        }
        Ok(attr)
    }
}

#[tokio::test]
async fn file_ids_are_inodes_and_survive_a_restart() {
    let f = Fixture::new();
    assert!(owns(f.export.id));
    let disk = f.lookup_path("vm/disk.img").await.unwrap();
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(f.folder().join("vm/disk.img"))
        .unwrap()
        .ino();
    assert_eq!(disk.fileid, ino);
    assert_eq!(disk.size, 4096);

    // A restarted revive: same export id and instance, and a handle held by
    // a client resolves without any LOOKUP first (the id map is rebuilt).
    let state = f.tmp.path().join("state");
    let again = Passthrough::open(&state).unwrap();
    let export = again.export(f.export.id).unwrap();
    assert_eq!(export.instance, f.export.instance);
    assert_eq!(export.root, f.export.root);
    let read = again
        .read(FileAt::new(export.id, disk.fileid), 0, 10)
        .await
        .unwrap();
    assert_eq!(&read.data[..], &[7u8; 10]);
    assert!(!read.eof);
    // Adding the same export again is a no-op.
    let same = again
        .add_export("/snap/c1", &f.folder(), &localhost())
        .unwrap();
    assert_eq!(same.instance, f.export.instance);
}

#[tokio::test]
async fn writes_land_in_the_folder_and_are_read_back() {
    let f = Fixture::new();
    let e = f.export.id;
    let disk = f.lookup_path("vm/disk.img").await.unwrap();
    let reply =
        f.pt.write(
            FileAt::new(e, disk.fileid),
            4090,
            Bytes::from_static(b"hello!!"),
            Stability::FileSync,
        )
        .await
        .unwrap();
    assert_eq!(reply.count, 7);
    assert_eq!(reply.attr.unwrap().size, 4097);
    f.pt.commit(FileAt::new(e, disk.fileid)).await.unwrap();
    let on_disk = std::fs::read(f.folder().join("vm/disk.img")).unwrap();
    assert_eq!(&on_disk[4090..], b"hello!!");
    let back =
        f.pt.read(FileAt::new(e, disk.fileid), 4088, 100)
            .await
            .unwrap();
    assert_eq!(&back.data[..], b"\x07\x07hello!!");
    assert!(back.eof);
}

#[tokio::test]
async fn symlinks_are_never_followed_by_the_server() {
    let f = Fixture::new();
    let e = f.export.id;
    // A link planted in the folder, pointing outside it.
    symlink(f.tmp.path().join("secret"), f.folder().join("vm/escape")).unwrap();
    symlink(f.tmp.path(), f.folder().join("up")).unwrap();
    let link = f.lookup_path("vm/escape").await.unwrap();
    assert_eq!(link.kind, FileKind::Symlink);
    assert!(f
        .pt
        .read(FileAt::new(e, link.fileid), 0, 100)
        .await
        .is_err());
    assert!(f
        .pt
        .write(
            FileAt::new(e, link.fileid),
            0,
            Bytes::from_static(b"x"),
            Stability::FileSync
        )
        .await
        .is_err());
    // A folder link: nothing below it resolves.
    let up = f.lookup_path("up").await.unwrap();
    assert_eq!(up.kind, FileKind::Symlink);
    assert!(f
        .pt
        .lookup(&FileAt::new(e, up.fileid).child("secret"))
        .await
        .is_err());
    // A link made by a client is stored as text.
    let vm = f.lookup_path("vm").await.unwrap();
    let made =
        f.pt.symlink(
            &FileAt::new(e, vm.fileid).child("l2"),
            "../../secret",
            &SetAttr::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        f.pt.readlink(FileAt::new(e, made.fileid)).await.unwrap(),
        "../../secret"
    );
    assert!(f.pt.read(FileAt::new(e, made.fileid), 0, 10).await.is_err());
    // Creating through a link name fails rather than writing outside.
    let created =
        f.pt.create(
            &FileAt::new(e, vm.fileid).child("escape"),
            CreateMode::Unchecked,
            &SetAttr::default(),
        )
        .await;
    assert!(created.is_err(), "{created:?}");
    // Names with a slash or dot-dot are refused; `..` stops at the root.
    assert!(f
        .pt
        .lookup(&FileAt::new(e, vm.fileid).child("../secret"))
        .await
        .is_err());
    let root =
        f.pt.lookup(&FileAt::new(e, f.export.root).child(".."))
            .await
            .unwrap();
    assert_eq!(root.fileid, f.export.root);
    assert_eq!(
        std::fs::read(f.tmp.path().join("secret")).unwrap(),
        b"outside the export"
    );
}

#[tokio::test]
async fn a_folder_swapped_for_a_symlink_is_not_followed() {
    let f = Fixture::new();
    let e = f.export.id;
    let disk = f.lookup_path("vm/disk.img").await.unwrap();
    // Replace `vm` by a link to a folder outside that holds a file of the
    // same name: the cached path must not lead there.
    let outside = f.tmp.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("disk.img"), b"not ours").unwrap();
    std::fs::rename(f.folder().join("vm"), f.folder().join("moved")).unwrap();
    symlink(&outside, f.folder().join("vm")).unwrap();
    // The file is found where it moved to, by its inode.
    let read = f.pt.read(FileAt::new(e, disk.fileid), 0, 4).await;
    match read {
        Ok(r) => assert_eq!(&r.data[..], &[7u8; 4]),
        Err(e) => panic!("read after move: {e}"),
    }
}

#[tokio::test]
async fn create_modes_rename_remove_and_listing() {
    let f = Fixture::new();
    let e = f.export.id;
    let vm = f.lookup_path("vm").await.unwrap();
    let attrs = SetAttr {
        mode: Some(0o600),
        ..SetAttr::default()
    };
    let a =
        f.pt.create(
            &FileAt::new(e, vm.fileid).child("a.vmx"),
            CreateMode::Guarded,
            &attrs,
        )
        .await
        .unwrap();
    assert_eq!(a.mode, 0o600);
    assert!(matches!(
        f.pt.create(
            &FileAt::new(e, vm.fileid).child("a.vmx"),
            CreateMode::Guarded,
            &attrs
        )
        .await,
        Err(DatastoreError::Exists)
    ));
    // Exclusive: a retransmission with the same verifier gets the same file.
    let v = [1, 2, 3, 4, 5, 6, 7, 8];
    let x =
        f.pt.create(
            &FileAt::new(e, vm.fileid).child("x.lck"),
            CreateMode::Exclusive(v),
            &attrs,
        )
        .await
        .unwrap();
    let again =
        f.pt.create(
            &FileAt::new(e, vm.fileid).child("x.lck"),
            CreateMode::Exclusive(v),
            &attrs,
        )
        .await
        .unwrap();
    assert_eq!(again.fileid, x.fileid);
    assert!(f
        .pt
        .create(
            &FileAt::new(e, vm.fileid).child("x.lck"),
            CreateMode::Exclusive([9; 8]),
            &attrs
        )
        .await
        .is_err());
    // SETATTR: size and times; the guard compares the ctime.
    let set = SetAttr {
        size: Some(100),
        mtime: SetTime::ClientTime(epoch_plus_1000()),
        ..SetAttr::default()
    };
    let grown =
        f.pt.setattr(FileAt::new(e, a.fileid), &set, None)
            .await
            .unwrap();
    assert_eq!(grown.size, 100);
    assert_eq!(grown.mtime, epoch_plus_1000());
    assert!(matches!(
        f.pt.setattr(FileAt::new(e, a.fileid), &set, Some(std::time::UNIX_EPOCH))
            .await,
        Err(DatastoreError::NotSync)
    ));
    // Rename keeps the id; the old name is gone.
    f.pt.rename(
        &FileAt::new(e, vm.fileid).child("a.vmx"),
        &FileAt::new(e, f.export.root).child("b.vmx"),
    )
    .await
    .unwrap();
    assert!(f.folder().join("b.vmx").exists());
    let b =
        f.pt.lookup(&FileAt::new(e, f.export.root).child("b.vmx"))
            .await
            .unwrap();
    assert_eq!(b.fileid, a.fileid);
    assert!(matches!(
        f.pt.lookup(&FileAt::new(e, vm.fileid).child("a.vmx")).await,
        Err(DatastoreError::NotFound)
    ));
    // Listing in id order, resumable by cookie.
    let page =
        f.pt.readdir(FileAt::new(e, f.export.root), 0, 1)
            .await
            .unwrap();
    assert_eq!(page.entries.len(), 1);
    assert!(!page.eof);
    let rest =
        f.pt.readdir(FileAt::new(e, f.export.root), page.entries[0].cookie, 10)
            .await
            .unwrap();
    assert!(rest.eof);
    let mut names: Vec<String> = page
        .entries
        .iter()
        .chain(rest.entries.iter())
        .map(|d| d.name.clone())
        .collect();
    names.sort();
    assert_eq!(names, ["b.vmx", "vm"]);
    // Remove and rmdir refuse the wrong kind.
    assert!(matches!(
        f.pt.remove(&FileAt::new(e, f.export.root).child("vm"))
            .await,
        Err(DatastoreError::IsDir)
    ));
    assert!(matches!(
        f.pt.rmdir(&FileAt::new(e, f.export.root).child("b.vmx"))
            .await,
        Err(DatastoreError::NotDir)
    ));
    f.pt.remove(&FileAt::new(e, f.export.root).child("b.vmx"))
        .await
        .unwrap();
    assert!(matches!(
        f.pt.getattr(FileAt::new(e, b.fileid)).await,
        Err(DatastoreError::Stale)
    ));
    let sub =
        f.pt.mkdir(
            &FileAt::new(e, f.export.root).child("sub"),
            &SetAttr::default(),
        )
        .await
        .unwrap();
    assert_eq!(sub.kind, FileKind::Directory);
    f.pt.rmdir(&FileAt::new(e, f.export.root).child("sub"))
        .await
        .unwrap();
    assert!(f.pt.fsstat(e).await.unwrap().total_bytes > 0);
}

fn epoch_plus_1000() -> std::time::SystemTime {
    std::time::UNIX_EPOCH + std::time::Duration::from_secs(1000)
}

#[tokio::test]
async fn removed_exports_are_stale_and_forgotten() {
    let f = Fixture::new();
    let other = f.tmp.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    assert!(matches!(
        f.pt.add_export("/snap/c1", &other, &localhost()),
        Err(DatastoreError::Exists)
    ));
    let second = f.pt.add_export("/snap/c2", &other, &localhost()).unwrap();
    assert_ne!(second.id, f.export.id);
    f.pt.remove_export("/snap/c1").unwrap();
    f.pt.remove_export("/snap/c1").unwrap();
    assert!(f.pt.export(f.export.id).is_none());
    assert!(matches!(
        f.pt.getattr(FileAt::new(f.export.id, f.export.root)).await,
        Err(DatastoreError::Stale)
    ));
    let again = Passthrough::open(&f.tmp.path().join("state")).unwrap();
    assert_eq!(again.export_paths(), ["/snap/c2"]);
    // Ids are never reused within one state folder.
    let c4 = again
        .add_export("/snap/c4", &f.folder(), &localhost())
        .unwrap();
    assert!(c4.id > second.id);
}
