//! Tree restore points through the datastore: folders, files and symlinks
//! presented with the backup's modes, owners and times; writes and new
//! links in nested folders; nothing left after unpublishing.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;

use super::*;
use crate::cache::Stability;
use crate::progress::NoProgress;
use crate::repo::{backup, BackupOptions};
use crate::store::LocalStore;

const EXPORT: &str = "/revive";

/// What one entry looks like: kind, mode, owner, size, link target or
/// content hash, mtime.
type Listing = BTreeMap<String, String>;

fn set_mtime(path: &Path, secs: u64) {
    let at = UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_nanos(123_456_789);
    std::fs::File::open(path).unwrap().set_modified(at).unwrap();
}

/// A data-folder-like tree: nested 0700 folders, an empty folder, an empty
/// file, a multi-chunk file, 0600 files owned by someone else, a relative
/// symlink and a dangling one.
fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("base/16384")).unwrap();
    std::fs::create_dir(root.join("pg_wal")).unwrap();
    std::fs::create_dir(root.join("empty")).unwrap();
    std::fs::write(root.join("PG_VERSION"), "15\n").unwrap();
    std::fs::write(root.join("base/16384/empty"), "").unwrap();
    let big: Vec<u8> = (0..50_000u32)
        .flat_map(|i| i.wrapping_mul(2654435761).to_le_bytes())
        .collect();
    std::fs::write(root.join("base/16384/1259"), &big).unwrap();
    std::os::unix::fs::symlink("../pg_wal", root.join("base/wal_link")).unwrap();
    std::os::unix::fs::symlink("/nowhere/at/all", root.join("dangling")).unwrap();
    for (path, mode) in [
        ("", 0o700),
        ("base", 0o700),
        ("base/16384", 0o700),
        ("pg_wal", 0o700),
        ("base/16384/1259", 0o600),
        ("PG_VERSION", 0o600),
    ] {
        let p = root.join(path);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::os::unix::fs::chown(root.join("base/16384/1259"), Some(26), Some(27)).unwrap();
    for (i, path) in [
        "PG_VERSION",
        "base/16384/1259",
        "base/16384",
        "base",
        "empty",
        "",
    ]
    .iter()
    .enumerate()
    {
        set_mtime(&root.join(path), 1_600_000_000 + i as u64);
    }
}

fn hash(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

/// The listing of a local folder, as `find -printf '%p %y %m %U %G %s %l'` plus hashes.
fn list_local(root: &Path) -> Listing {
    let mut out = Listing::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path
                .strip_prefix(root)
                .unwrap()
                .to_string_lossy()
                .into_owned();
            let ft = meta.file_type();
            let (kind, what) = if ft.is_dir() {
                stack.push(path.clone());
                ("d", String::new())
            } else if ft.is_symlink() {
                let t = std::fs::read_link(&path).unwrap();
                ("l", t.to_string_lossy().into_owned())
            } else {
                ("f", hash(&std::fs::read(&path).unwrap()))
            };
            let size = if ft.is_dir() { 0 } else { meta.size() };
            let line = format!(
                "{kind} {:o} {}:{} {size} {what} {}",
                meta.mode() & 0o7777,
                meta.uid(),
                meta.gid(),
                if ft.is_symlink() { 0 } else { meta.mtime() },
            );
            out.insert(rel, line);
        }
    }
    out
}

/// The same listing through [`FileOps`] only.
async fn list_published(ds: &Datastore, root: FileAt) -> Listing {
    let mut out = Listing::new();
    let mut stack = vec![(root, String::new())];
    while let Some((dir, prefix)) = stack.pop() {
        let page = ds.readdir(dir, 0, 10_000).await.unwrap();
        assert!(page.eof);
        for e in page.entries {
            if e.name == "." || e.name == ".." {
                continue;
            }
            let at = FileAt::new(dir.export, e.attr.fileid);
            let rel = if prefix.is_empty() {
                e.name.clone()
            } else {
                format!("{prefix}/{}", e.name)
            };
            let a = &e.attr;
            let (kind, what) = match a.kind {
                FileKind::Directory => {
                    stack.push((at, rel.clone()));
                    ("d", String::new())
                }
                FileKind::Symlink => ("l", ds.readlink(at).await.unwrap()),
                FileKind::Regular => {
                    let r = ds
                        .read(at, 0, u32::try_from(a.size).unwrap())
                        .await
                        .unwrap();
                    ("f", hash(&r.data))
                }
            };
            let size = if a.kind == FileKind::Directory {
                0
            } else {
                a.size
            };
            let mtime = a.mtime.duration_since(UNIX_EPOCH).unwrap().as_secs();
            let line = format!(
                "{kind} {:o} {}:{} {size} {what} {}",
                a.mode,
                a.uid,
                a.gid,
                if a.kind == FileKind::Symlink {
                    0
                } else {
                    mtime
                },
            );
            out.insert(rel, line);
        }
    }
    out
}

async fn open(dir: &Path) -> Datastore {
    let repo = Repository::open_local(dir.join("repo")).await.unwrap();
    let config = DatastoreConfig {
        state_dir: dir.join("state"),
        cache_root: dir.join("cache"),
        block_cache_bytes: 1 << 20,
        readahead_chunks: 2,
        exports: vec![ExportConfig {
            path: EXPORT.into(),
            allowed_clients: vec![IpAddr::from([127, 0, 0, 1])],
        }],
    };
    Datastore::open(repo, config).await.unwrap()
}

/// `make_tree` in `dir/pgdata`, backed up as tree point `pg` and published
/// as `pg1`: the datastore and the publication's folder.
async fn published_tree(dir: &Path) -> (Datastore, FileAt) {
    let src = dir.join("pgdata");
    make_tree(&src);
    let store = Arc::new(LocalStore::open(dir.join("repo")).unwrap());
    let repo = Repository::init(store, 64 * 1024).await.unwrap();
    let options = BackupOptions {
        vm: Some("pg".into()),
        tree: true,
    };
    backup(&repo, &src, &options, &NoProgress).await.unwrap();
    drop(repo);
    let ds = open(dir).await;
    let export = ds.export_by_path(EXPORT).unwrap().id;
    let folder = ds.publish(EXPORT, "pg1", "pg@latest", None).await.unwrap();
    (ds, FileAt::new(export, folder))
}

/// The file or folder at `path` (slash-separated) under `dir`.
async fn lookup_path(ds: &Datastore, dir: FileAt, path: &str) -> FileAt {
    let mut at = dir;
    for name in path.split('/') {
        let attr = ds.lookup(&at.child(name)).await.unwrap();
        at = FileAt::new(dir.export, attr.fileid);
    }
    at
}

#[tokio::test]
async fn tree_point_is_presented_with_its_metadata_and_takes_writes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("pgdata");
    let (ds, root) = published_tree(dir.path()).await;
    let export = root.export;
    assert_eq!(list_published(&ds, root).await, list_local(&src));
    let top = ds.getattr(root).await.unwrap();
    assert_eq!(top.mode, 0o700, "the folder takes the tree root's mode");
    assert_eq!(
        top.mtime,
        UNIX_EPOCH + Duration::from_nanos(1_600_000_005_123_456_789)
    );

    // Data operations on a link are refused, as read(2) on one is.
    let link = ds.lookup(&root.child("dangling")).await.unwrap();
    let link_at = FileAt::new(export, link.fileid);
    assert!(matches!(
        ds.read(link_at, 0, 10).await,
        Err(DatastoreError::Invalid)
    ));

    // A write deep in the tree lands in the cache and reads back over the backup.
    let db_at = lookup_path(&ds, root, "base/16384").await;
    let rel_at = lookup_path(&ds, db_at, "1259").await;
    let patch = Bytes::from_static(b"written after the backup");
    ds.write(rel_at, 70_000, patch.clone(), Stability::FileSync)
        .await
        .unwrap();
    let mut expected = std::fs::read(src.join("base/16384/1259")).unwrap();
    expected[70_000..70_000 + patch.len()].copy_from_slice(&patch);
    let got = ds.read(rel_at, 0, 200_000).await.unwrap().data;
    assert_eq!(hash(&got), hash(&expected));

    // A client-made link persists across a restart.
    let made = ds
        .symlink(&db_at.child("tblspc"), "/srv/tblspc", &SetAttr::default())
        .await
        .unwrap();
    assert_eq!(made.kind, FileKind::Symlink);
    ds.flush_all().await.unwrap();
    drop(ds);
    let ds = open(dir.path()).await;
    let again = ds.lookup(&db_at.child("tblspc")).await.unwrap();
    assert_eq!(
        ds.readlink(FileAt::new(export, again.fileid))
            .await
            .unwrap(),
        "/srv/tblspc"
    );
    let got = ds.read(rel_at, 0, 200_000).await.unwrap().data;
    assert_eq!(hash(&got), hash(&expected));

    ds.unpublish(EXPORT, "pg1").await.unwrap();
    assert!(ds
        .lookup(&FileAt::new(export, ROOT_ID).child("pg1"))
        .await
        .is_err());
    assert!(!dir.path().join("cache/pg1").exists());
}

/// What the postgres driver does before each start (in place of
/// PostgreSQL's own start-up sync): unstable writes to a publication are
/// durable after `sync_publication`, where without it a crash of revive
/// drops them.
#[tokio::test]
async fn sync_publication_makes_unstable_writes_durable() {
    let dir = tempfile::tempdir().unwrap();
    let (ds, root) = published_tree(dir.path()).await;
    let version = lookup_path(&ds, root, "PG_VERSION").await;
    let rel = lookup_path(&ds, root, "base/16384/1259").await;

    let synced = Bytes::from_static(b"synced");
    ds.write(rel, 1_000, synced.clone(), Stability::Unstable)
        .await
        .unwrap();
    ds.sync_publication(EXPORT, "pg1").await.unwrap();
    let lost = Bytes::from_static(b"16\n");
    ds.write(version, 0, lost, Stability::Unstable)
        .await
        .unwrap();
    // A crash: nothing is committed or flushed on the way out.
    drop(ds);

    let ds = open(dir.path()).await;
    let got = ds.read(rel, 1_000, 6).await.unwrap().data;
    assert_eq!(got, synced);
    let got = ds.read(version, 0, 3).await.unwrap().data;
    assert_eq!(&got[..], b"15\n", "an unstable write nobody synced is gone");
    assert!(matches!(
        ds.sync_publication(EXPORT, "nope").await,
        Err(DatastoreError::NotFound)
    ));
}
