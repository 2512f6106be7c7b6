//! The NFS protocol layer against real clients: libnfs-utils (`nfs-ls`,
//! `nfs-cat`, `nfs-cp`) and the `nfs3_client` crate, over the in-memory
//! test backend. Also raw bytes on the wire for malformed input.

use nfs3_client::nfs3_types::mount::mountstat3;
use nfs3_client::nfs3_types::nfs3::{self, nfs_fh3, nfsstat3, stable_how, Nfs3Result};
use nfs3_client::nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::tokio::TokioIo;
use nfs3_client::Nfs3Client;
use revive::nfs::handle::FileHandle;
use tokio::net::TcpStream;

use crate::support::client::{
    client_at, dirop, lookup, mount_at, pattern, run_tool as run, sha256, Client, Conn,
};
use crate::support::memfs::{MemFs, ROOT};
use crate::support::{skip_without_libnfs, TestServer};

mod fio;
mod qemu;
mod wire;

async fn mount(s: &TestServer, path: &str) -> Result<Conn, nfs3_client::ConnectError> {
    mount_at(s.nfs_port, s.mount_port, path).await
}

async fn raw_client(s: &TestServer) -> Client {
    client_at(s.nfs_port).await
}

/// A VM folder as the datastore will present it: list, read and compare the
/// hash, write a new file and read it back, with libnfs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn libnfs_lists_reads_and_writes() {
    if skip_without_libnfs() {
        return;
    }
    let fs = MemFs::new();
    let vm = fs.add_dir(ROOT, "vm1");
    // Not a multiple of the transfer size, to exercise short reads and eof.
    let disk = pattern(3 * 1024 * 1024 + 12_345, 7);
    fs.add_file(vm, "vm1-flat.vmdk", disk.clone());
    fs.add_file(vm, "vm1.vmx", b"displayName = \"vm1\"\n".to_vec());
    let s = TestServer::start(fs.clone()).await;

    let out = run("nfs-ls", &[&s.url("/export/vm1")]).await;
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "nfs-ls failed: {out:?}");
    assert!(listing.contains("vm1-flat.vmdk"), "listing: {listing}");
    assert!(listing.contains("vm1.vmx"), "listing: {listing}");

    let out = run("nfs-cat", &[&s.url("/export/vm1/vm1-flat.vmdk")]).await;
    assert!(out.status.success(), "nfs-cat failed: {:?}", out.stderr);
    assert_eq!(out.stdout.len(), disk.len());
    assert_eq!(sha256(&out.stdout), sha256(&disk), "disk hash differs");

    let dir = tempfile::tempdir().expect("tempdir");
    let local = dir.path().join("upload.bin");
    let upload = pattern(2 * 1024 * 1024 + 3, 11);
    std::fs::write(&local, &upload).expect("write local");
    let out = run(
        "nfs-cp",
        &[
            local.to_str().expect("utf8"),
            &s.url("/export/vm1/upload.bin"),
        ],
    )
    .await;
    assert!(out.status.success(), "nfs-cp failed: {out:?}");
    assert_eq!(
        fs.file_data(&["vm1", "upload.bin"]).map(|d| sha256(&d)),
        Some(sha256(&upload)),
        "backend holds what was written"
    );
    let out = run("nfs-cat", &[&s.url("/export/vm1/upload.bin")]).await;
    assert!(out.status.success(), "nfs-cat back failed: {out:?}");
    assert_eq!(
        sha256(&out.stdout),
        sha256(&upload),
        "read-back hash differs"
    );
    s.stop().await;
}

/// A client not on the export's allow-list is refused at MOUNT (libnfs and
/// nfs3_client) and at every NFS call, even with a valid handle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_not_on_allow_list_is_refused() {
    let fs = MemFs::new();
    let s = TestServer::start(fs.clone()).await;

    match mount(&s, "/locked").await {
        Err(nfs3_client::ConnectError::Mount(nfs3_client::MountError::Denied(stat))) => {
            assert!(
                matches!(stat, mountstat3::MNT3ERR_ACCES),
                "mount error: {stat}"
            );
        }
        Err(e) => panic!("unexpected error: {e:?}"),
        Ok(_) => panic!("mount of /locked must be refused"),
    }

    // A handle of /locked, built by hand as a client could guess it.
    let locked = FileHandle {
        export: 2,
        instance: 0x5eed_0002,
        file: ROOT,
    };
    let fh = nfs_fh3 {
        data: Opaque::owned(locked.encode().to_vec()),
    };
    let mut c = raw_client(&s).await;
    let res = c
        .getattr(&nfs3::GETATTR3args { object: fh.clone() })
        .await
        .expect("rpc");
    assert!(
        matches!(res, Nfs3Result::Err((nfsstat3::NFS3ERR_ACCES, _))),
        "{res:?}"
    );
    assert_eq!(lookup(&mut c, &fh, "x").await, Err(nfsstat3::NFS3ERR_ACCES));

    // Handles of an older export instance or an unknown export are stale;
    // a handle of another size or format is bad.
    let forged = |export, instance| nfs_fh3 {
        data: Opaque::owned(
            FileHandle {
                export,
                instance,
                file: ROOT,
            }
            .encode()
            .to_vec(),
        ),
    };
    assert_eq!(
        lookup(&mut c, &forged(1, 1), "x").await,
        Err(nfsstat3::NFS3ERR_STALE)
    );
    assert_eq!(
        lookup(&mut c, &forged(9, 0x5eed_0009), "x").await,
        Err(nfsstat3::NFS3ERR_STALE)
    );
    let short = nfs_fh3 {
        data: Opaque::owned(vec![1, 0, 0, 0]),
    };
    assert_eq!(
        lookup(&mut c, &short, "x").await,
        Err(nfsstat3::NFS3ERR_BADHANDLE)
    );

    if !skip_without_libnfs() {
        let out = run("nfs-ls", &[&s.url("/locked")]).await;
        assert!(
            !out.status.success(),
            "nfs-ls of /locked must fail: {out:?}"
        );
    }
    s.stop().await;
}

/// `..` at the export root, names with `/`, and empty names never reach
/// the backend; `..` below the root works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaping_names_are_refused() {
    let fs = MemFs::new();
    let sub = fs.add_dir(ROOT, "sub");
    fs.add_file(sub, "f", b"x".to_vec());
    let s = TestServer::start(fs.clone()).await;
    let conn = mount(&s, "/export").await.expect("mount");
    let root = conn.root_nfs_fh3();
    let mut c = conn.into_nfs3_client();

    assert_eq!(
        lookup(&mut c, &root, "..").await,
        Err(nfsstat3::NFS3ERR_ACCES)
    );
    assert_eq!(
        lookup(&mut c, &root, "sub/f").await,
        Err(nfsstat3::NFS3ERR_ACCES)
    );
    assert_eq!(
        lookup(&mut c, &root, "../etc").await,
        Err(nfsstat3::NFS3ERR_ACCES)
    );
    assert_eq!(
        lookup(&mut c, &root, "").await,
        Err(nfsstat3::NFS3ERR_INVAL)
    );
    let sub_fh = lookup(&mut c, &root, "sub").await.expect("sub");
    assert_eq!(lookup(&mut c, &sub_fh, "..").await, Ok(root.clone()));

    let res = c
        .create(&nfs3::CREATE3args {
            where_: dirop(&root, ".."),
            how: nfs3::createhow3::UNCHECKED(nfs3::sattr3::default()),
        })
        .await
        .expect("rpc");
    assert!(
        matches!(res, Nfs3Result::Err((nfsstat3::NFS3ERR_ACCES, _))),
        "{res:?}"
    );
    let res = c
        .mkdir(&nfs3::MKDIR3args {
            where_: dirop(&sub_fh, "a/b"),
            attributes: nfs3::sattr3::default(),
        })
        .await
        .expect("rpc");
    assert!(
        matches!(res, Nfs3Result::Err((nfsstat3::NFS3ERR_ACCES, _))),
        "{res:?}"
    );

    // MOUNT of a path leaving the export is refused too.
    assert!(mount(&s, "/export/sub/..").await.is_err());
    if !skip_without_libnfs() {
        for url in [s.url("/export/.."), s.url("/export/sub/../..")] {
            let out = run("nfs-ls", &[&url]).await;
            assert!(!out.status.success(), "nfs-ls {url} must fail: {out:?}");
        }
    }
    s.stop().await;
}

/// A handle obtained before a restart still works after it; the write
/// verifier changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handle_survives_restart_and_verifier_changes() {
    let fs = MemFs::new();
    fs.add_file(ROOT, "disk", pattern(64 * 1024, 3));
    let s1 = TestServer::start(fs.clone()).await;
    let conn = mount(&s1, "/export").await.expect("mount");
    let root = conn.root_nfs_fh3();
    let mut c = conn.into_nfs3_client();
    let fh = lookup(&mut c, &root, "disk").await.expect("lookup");
    let write = |data: &'static [u8]| nfs3::WRITE3args {
        file: fh.clone(),
        offset: 0,
        count: data.len() as u32,
        stable: stable_how::UNSTABLE,
        data: Opaque::borrowed(data),
    };
    let verf1 = match c.write(&write(b"boot")).await.expect("rpc") {
        Nfs3Result::Ok(ok) => ok.verf,
        Nfs3Result::Err(e) => panic!("write: {e:?}"),
    };
    assert_eq!(verf1.0, s1.write_verifier);
    let commit = nfs3::COMMIT3args {
        file: fh.clone(),
        offset: 0,
        count: 0,
    };
    match c.commit(&commit).await.expect("rpc") {
        Nfs3Result::Ok(ok) => assert_eq!(ok.verf, verf1),
        Nfs3Result::Err(e) => panic!("commit: {e:?}"),
    }
    drop(c);
    s1.stop().await;

    let s2 = TestServer::start(fs.clone()).await;
    let mut c = raw_client(&s2).await;
    match c
        .getattr(&nfs3::GETATTR3args { object: fh.clone() })
        .await
        .expect("rpc")
    {
        Nfs3Result::Ok(ok) => assert_eq!(ok.obj_attributes.size, 64 * 1024),
        Nfs3Result::Err(e) => panic!("getattr after restart: {e:?}"),
    }
    let read = nfs3::READ3args {
        file: fh.clone(),
        offset: 0,
        count: 4,
    };
    match c.read(&read).await.expect("rpc") {
        Nfs3Result::Ok(ok) => assert_eq!(&ok.data[..], b"boot"),
        Nfs3Result::Err(e) => panic!("read after restart: {e:?}"),
    }
    let verf2 = match c.write(&write(b"next")).await.expect("rpc") {
        Nfs3Result::Ok(ok) => ok.verf,
        Nfs3Result::Err(e) => panic!("write after restart: {e:?}"),
    };
    assert_ne!(verf1, verf2, "write verifier must change per boot");
    s2.stop().await;
}

/// FSINFO advertises 1 MiB transfers and a 64 TiB file size; FSSTAT passes
/// the backend's figures through; PATHCONF answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fsinfo_fsstat_pathconf() {
    let fs = MemFs::new();
    let s = TestServer::start(fs.clone()).await;
    let conn = mount(&s, "/export").await.expect("mount");
    let root = conn.root_nfs_fh3();
    let mut c = conn.into_nfs3_client();
    let info = c
        .fsinfo(&nfs3::FSINFO3args {
            fsroot: root.clone(),
        })
        .await
        .expect("rpc")
        .unwrap();
    assert_eq!((info.rtmax, info.wtmax), (1 << 20, 1 << 20));
    assert_eq!(
        (info.rtpref, info.wtpref, info.dtpref),
        (1 << 20, 1 << 20, 64 << 10)
    );
    assert!(info.maxfilesize >= 64 << 40);
    assert_eq!((info.time_delta.seconds, info.time_delta.nseconds), (0, 1));
    let stat = c
        .fsstat(&nfs3::FSSTAT3args {
            fsroot: root.clone(),
        })
        .await
        .expect("rpc")
        .unwrap();
    assert_eq!(
        (stat.tbytes, stat.fbytes, stat.abytes),
        (1 << 40, 1 << 39, 1 << 39)
    );
    let pc = c
        .pathconf(&nfs3::PATHCONF3args { object: root })
        .await
        .expect("rpc")
        .unwrap();
    assert_eq!(pc.name_max, 255);
    s.stop().await;
}

/// READDIR and READDIRPLUS page through a big directory with small budgets
/// and stable cookies, losing and repeating nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readdir_pages_with_stable_cookies() {
    let fs = MemFs::new();
    let dir = fs.add_dir(ROOT, "many");
    let mut expected: Vec<String> = (0..300)
        .map(|i| format!("file-with-a-long-name-{i:04}.vmdk"))
        .collect();
    for n in &expected {
        fs.add_file(dir, n, vec![1; 10]);
    }
    expected.sort();
    let s = TestServer::start(fs.clone()).await;
    let conn = mount(&s, "/export/many").await.expect("mount subdirectory");
    let fh = conn.root_nfs_fh3();
    let mut c = conn.into_nfs3_client();

    let (mut names, mut cookie, mut calls) = (Vec::new(), 0, 0);
    loop {
        let res = c
            .readdirplus(&nfs3::READDIRPLUS3args {
                dir: fh.clone(),
                cookie,
                cookieverf: nfs3::cookieverf3::default(),
                dircount: 2048,
                maxcount: 4096,
            })
            .await
            .expect("rpc")
            .unwrap();
        calls += 1;
        for e in &res.reply.entries.0 {
            names.push(String::from_utf8(e.name.0.to_vec()).expect("utf8"));
            assert!(e.name_attributes.is_some() && e.name_handle.is_some());
            cookie = e.cookie;
        }
        if res.reply.eof {
            break;
        }
    }
    assert!(calls > 5, "small budget must page ({calls} calls)");
    names.sort();
    assert_eq!(names, expected);

    let (mut names, mut cookie) = (Vec::new(), 0);
    loop {
        let res = c
            .readdir(&nfs3::READDIR3args {
                dir: fh.clone(),
                cookie,
                cookieverf: nfs3::cookieverf3::default(),
                count: 1024,
            })
            .await
            .expect("rpc")
            .unwrap();
        for e in &res.reply.entries.0 {
            names.push(String::from_utf8(e.name.0.to_vec()).expect("utf8"));
            cookie = e.cookie;
        }
        if res.reply.eof {
            break;
        }
    }
    names.sort();
    assert_eq!(names, expected);
    s.stop().await;
}

/// Create, write, setattr (truncate), rename, remove, mkdir/rmdir through
/// nfs3_client; unsupported procedures answer NOTSUPP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_operations() {
    let fs = MemFs::new();
    let s = TestServer::start(fs.clone()).await;
    let conn = mount(&s, "/export").await.expect("mount");
    let root = conn.root_nfs_fh3();
    let mut c = conn.into_nfs3_client();

    let created = c
        .create(&nfs3::CREATE3args {
            where_: dirop(&root, "vm.vmx"),
            how: nfs3::createhow3::GUARDED(nfs3::sattr3::default()),
        })
        .await
        .expect("rpc")
        .unwrap();
    // Owned by the AUTH_SYS caller (root here) since no owner was asked.
    assert!(
        matches!(created.obj_attributes, nfs3::Nfs3Option::Some(ref a) if a.uid == 0 && a.gid == 0)
    );
    let fh = match created.obj {
        nfs3::Nfs3Option::Some(fh) => fh,
        nfs3::Nfs3Option::None => panic!("no handle"),
    };
    let again = c
        .create(&nfs3::CREATE3args {
            where_: dirop(&root, "vm.vmx"),
            how: nfs3::createhow3::GUARDED(nfs3::sattr3::default()),
        })
        .await
        .expect("rpc");
    assert!(matches!(
        again,
        Nfs3Result::Err((nfsstat3::NFS3ERR_EXIST, _))
    ));
    let w = c
        .write(&nfs3::WRITE3args {
            file: fh.clone(),
            offset: 0,
            count: 10,
            stable: stable_how::FILE_SYNC,
            data: Opaque::borrowed(b"0123456789"),
        })
        .await
        .expect("rpc")
        .unwrap();
    assert_eq!((w.count, w.committed), (10, stable_how::FILE_SYNC));
    let set = c
        .setattr(&nfs3::SETATTR3args {
            object: fh.clone(),
            new_attributes: nfs3::sattr3 {
                size: nfs3::Nfs3Option::Some(4),
                ..Default::default()
            },
            guard: nfs3::Nfs3Option::None,
        })
        .await
        .expect("rpc")
        .unwrap();
    assert!(matches!(set.obj_wcc.after, nfs3::Nfs3Option::Some(ref a) if a.size == 4));
    c.rename(&nfs3::RENAME3args {
        from: dirop(&root, "vm.vmx"),
        to: dirop(&root, "vm.vmx~"),
    })
    .await
    .expect("rpc")
    .unwrap();
    assert_eq!(fs.file_data(&["vm.vmx~"]), Some(b"0123".to_vec()));
    c.remove(&nfs3::REMOVE3args {
        object: dirop(&root, "vm.vmx~"),
    })
    .await
    .expect("rpc")
    .unwrap();
    assert_eq!(fs.file_data(&["vm.vmx~"]), None);
    c.mkdir(&nfs3::MKDIR3args {
        where_: dirop(&root, "d"),
        attributes: nfs3::sattr3::default(),
    })
    .await
    .expect("rpc")
    .unwrap();
    c.rmdir(&nfs3::RMDIR3args {
        object: dirop(&root, "d"),
    })
    .await
    .expect("rpc")
    .unwrap();
    let link = c
        .link(&nfs3::LINK3args {
            file: root.clone(),
            link: dirop(&root, "l"),
        })
        .await
        .expect("rpc");
    assert!(
        matches!(link, Nfs3Result::Err((nfsstat3::NFS3ERR_NOTSUPP, _))),
        "{link:?}"
    );

    // A non-root caller owns what it creates.
    let stream = TcpStream::connect(s.nfs_addr()).await.expect("connect");
    let user = opaque_auth::auth_unix(&auth_unix {
        stamp: 2,
        machinename: Opaque::borrowed(b"test"),
        uid: 1234,
        gid: 99,
        gids: vec![99],
    });
    let mut u = Nfs3Client::new_with_auth(TokioIo::new(stream), user, opaque_auth::default());
    let made = u
        .mkdir(&nfs3::MKDIR3args {
            where_: dirop(&root, "users-dir"),
            attributes: nfs3::sattr3::default(),
        })
        .await
        .expect("rpc")
        .unwrap();
    assert!(
        matches!(made.obj_attributes, nfs3::Nfs3Option::Some(ref a) if a.uid == 1234 && a.gid == 99),
        "{:?}",
        made.obj_attributes
    );
    s.stop().await;
}

/// MOUNT's informational procedures: DUMP lists the mount, EXPORT lists
/// every export with its allow-list, UMNT removes the mount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mount_dump_export_umnt() {
    let fs = MemFs::new();
    let s = TestServer::start(fs.clone()).await;
    let mut conn = mount(&s, "/export").await.expect("mount");
    let dump = conn.mount_client.dump().await.expect("dump");
    let dirs: Vec<String> = dump
        .0
        .iter()
        .map(|m| String::from_utf8_lossy(&m.ml_directory.0).into_owned())
        .collect();
    assert_eq!(dirs, vec!["/export".to_owned()]);
    let exports = conn.mount_client.export().await.expect("export");
    let listed: Vec<(String, Vec<String>)> = exports
        .0
        .iter()
        .map(|e| {
            (
                String::from_utf8_lossy(&e.ex_dir.0).into_owned(),
                e.ex_groups
                    .0
                    .iter()
                    .map(|g| String::from_utf8_lossy(&g.0).into_owned())
                    .collect(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![
            ("/export".to_owned(), vec!["127.0.0.1".to_owned()]),
            ("/locked".to_owned(), vec!["192.0.2.1".to_owned()]),
        ]
    );
    conn.unmount().await.expect("umnt");
    let mut again = mount(&s, "/export").await.expect("mount");
    again.mount_client.umntall().await.expect("umntall");
    assert!(again.mount_client.dump().await.expect("dump").0.is_empty());
    s.stop().await;
}
