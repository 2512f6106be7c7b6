//! The library API frontends (the datastore, FUSE) present trees from:
//! `RestorePoint::tree` (entries with metadata, lookup, children) and
//! `FileReader::new(repo, point, path)`, checked against the files on disk.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use revive::progress::NoProgress;
use revive::repo::{
    self, BackupOptions, ChunkIndex, EntryContent, EntryKind, FileReader, PointKind, RepoError,
    Repository,
};
use revive::store::LocalStore;

use crate::support::tree::SampleTree;
use crate::support::vm::SampleVm;

#[tokio::test]
async fn a_tree_point_presents_every_entry_and_reads_files_by_path() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = SampleTree::create(tmp.path(), "t", 5);
    let store = Arc::new(LocalStore::open(tmp.path().join("repo")).unwrap());
    let repo = Repository::init(store, repo::default_chunk_size())
        .await
        .unwrap();
    let point = repo::backup(&repo, &tree.dir, &BackupOptions::default(), &NoProgress)
        .await
        .unwrap();
    assert_eq!(point.kind, PointKind::Tree);
    assert!(point.files.is_empty());
    // What a reader loads from the store is what the backup returned.
    assert_eq!(repo.point(&point.id).await.unwrap(), point);

    let t = point.tree();
    assert_eq!(t.root().path, "");
    for e in t.entries() {
        let full = if e.path.is_empty() {
            tree.dir.clone()
        } else {
            tree.path(&e.path)
        };
        let meta = fs::symlink_metadata(&full).unwrap();
        let what = &e.path;
        assert_eq!(e.mode, meta.mode() & 0o7777, "{what}");
        assert_eq!((e.uid, e.gid), (meta.uid(), meta.gid()), "{what}");
        assert_eq!(
            e.mtime_ns,
            meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            "{what}"
        );
        match &e.content {
            EntryContent::Folder => assert!(meta.is_dir(), "{what}"),
            EntryContent::Symlink(target) => {
                assert_eq!(
                    fs::read_link(&full).unwrap().to_str(),
                    Some(target.as_str())
                )
            }
            EntryContent::File(index) => {
                assert_eq!(e.size, meta.len(), "{what}");
                // Small files list their chunks inline, large ones use pages.
                let inline = matches!(index, ChunkIndex::Inline(_));
                assert_eq!(inline, e.size <= 4 << 20, "{what}");
                let reader = FileReader::new(&repo, &point, &e.path).unwrap();
                let data = reader.read_at(0, e.size as usize + 10).await.unwrap();
                assert!(data[..] == fs::read(&full).unwrap()[..], "{what}");
            }
        }
    }
    // A read across a chunk boundary of the paged file.
    let reader = FileReader::new(&repo, &point, SampleTree::BIG).unwrap();
    let part = reader.read_at((1 << 20) - 5, 10).await.unwrap();
    assert_eq!(
        &part[..],
        &fs::read(tree.path(SampleTree::BIG)).unwrap()[(1 << 20) - 5..(1 << 20) + 5]
    );

    let names = |folder: &str| -> Vec<String> {
        t.children(folder).map(|e| e.name().to_string()).collect()
    };
    let mut on_disk: Vec<String> = fs::read_dir(&tree.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    on_disk.sort();
    assert_eq!(names(""), on_disk);
    assert_eq!(names("a/b"), ["c", "up-link"]);
    assert!(names("emptydir").is_empty());
    assert_eq!(t.get("dir-link").unwrap().kind(), EntryKind::Symlink);
    assert_eq!(t.get("a/b/c/d").unwrap().parent(), Some("a/b/c"));

    let err = FileReader::new(&repo, &point, "a/b").unwrap_err();
    assert!(matches!(err, RepoError::NotAFile { .. }), "{err}");
    assert!(err.to_string().contains("'a/b' is a folder"), "{err}");
    let err = FileReader::new(&repo, &point, "nope").unwrap_err();
    assert!(matches!(err, RepoError::NoSuchFile { .. }), "{err}");

    // A VM point is a flat tree; its files read by name as always.
    let vm = SampleVm::create(tmp.path(), "web09", 2 << 20, 9);
    let vp = repo::backup(&repo, &vm.dir, &BackupOptions::default(), &NoProgress)
        .await
        .unwrap();
    assert_eq!(vp.kind, PointKind::Vm);
    let flat = vp.tree();
    assert_eq!(flat.len(), 1 + vp.files.len());
    assert_eq!(flat.children("").count(), vp.files.len());
    let vmx = FileReader::new(&repo, &vp, "web09.vmx").unwrap();
    let text = vmx.read_at(0, 1 << 20).await.unwrap();
    assert!(text[..] == fs::read(vm.dir.join("web09.vmx")).unwrap()[..]);
}
