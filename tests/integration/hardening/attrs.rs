//! Item 5 (attribute limits) and the smaller items of 6: a flat disk's
//! `used` bytes, and `.`/`..` in directory listings.

use nfs3_client::nfs3_types::nfs3::{self, nfs_fh3, nfsstat3, stable_how, Nfs3Option, Nfs3Result};
use nfs3_client::nfs3_types::xdr_codec::Opaque;

use crate::datastore::{Fixture, MIB};
use crate::support::client::*;

/// FSINFO's maxfilesize: 64 TiB.
const MAX_FILE: u64 = 64 << 40;
const TIB: u64 = 1 << 40;

/// SETATTR of mode and size at once, as the status.
async fn set_mode_and_size(c: &mut Client, fh: &nfs_fh3, mode: u32, size: u64) -> nfsstat3 {
    let res = c
        .setattr(&nfs3::SETATTR3args {
            object: fh.clone(),
            new_attributes: nfs3::sattr3 {
                mode: Nfs3Option::Some(mode),
                size: Nfs3Option::Some(size),
                ..Default::default()
            },
            guard: Nfs3Option::None,
        })
        .await
        .expect("setattr rpc");
    match res {
        Nfs3Result::Ok(_) => nfsstat3::NFS3_OK,
        Nfs3Result::Err((stat, _)) => stat,
    }
}

/// The server's FSINFO maxfilesize for `fh`.
async fn maxfilesize(c: &mut Client, fh: &nfs_fh3) -> u64 {
    match c
        .fsinfo(&nfs3::FSINFO3args { fsroot: fh.clone() })
        .await
        .expect("fsinfo rpc")
    {
        Nfs3Result::Ok(ok) => ok.maxfilesize,
        Nfs3Result::Err((stat, _)) => panic!("FSINFO: {stat:?}"),
    }
}

/// FSINFO advertises 64 TiB and the server holds to it: SETATTR, WRITE and
/// CREATE past it are answered NFS3ERR_FBIG and change nothing (not the
/// size, not the mode set in the same call, not the folder); a file may be
/// exactly 64 TiB; a shrink of a huge sparse file succeeds even where the
/// write cache's own file system allows less (ext4: 16 TiB), and persists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sizes_beyond_maxfilesize_are_refused_and_change_nothing() {
    let mut f = Fixture::new("big01", MIB, 91);
    let (mut c, _, folder) = f.mount().await;
    assert_eq!(maxfilesize(&mut c, &folder).await, MAX_FILE);
    let fh = create(&mut c, &folder, "big.bin").await.expect("create");
    let data = pattern(5000, 1);
    write(&mut c, &fh, 0, &data, stable_how::FILE_SYNC).await;

    for size in [1u64 << 50, MAX_FILE + 1, u64::MAX] {
        assert_eq!(
            set_size(&mut c, &fh, size).await,
            Err(nfsstat3::NFS3ERR_FBIG),
            "{size}"
        );
        assert_eq!(
            set_mode_and_size(&mut c, &fh, 0o600, size).await,
            nfsstat3::NFS3ERR_FBIG
        );
        let attr = getattr(&mut c, &fh).await.expect("getattr");
        assert_eq!(
            (attr.size, attr.mode),
            (5000, 0o644),
            "after SETATTR to {size}"
        );
    }
    let w = c
        .write(&nfs3::WRITE3args {
            file: fh.clone(),
            offset: MAX_FILE - 2,
            count: 10,
            stable: stable_how::FILE_SYNC,
            data: Opaque::borrowed(b"0123456789"),
        })
        .await
        .expect("write rpc");
    assert!(
        matches!(w, Nfs3Result::Err((nfsstat3::NFS3ERR_FBIG, _))),
        "{w:?}"
    );
    assert_eq!(getattr(&mut c, &fh).await.map(|a| a.size), Ok(5000));
    let created = c
        .create(&nfs3::CREATE3args {
            where_: dirop(&folder, "huge.bin"),
            how: nfs3::createhow3::UNCHECKED(nfs3::sattr3 {
                size: Nfs3Option::Some(1 << 50),
                ..Default::default()
            }),
        })
        .await
        .expect("create rpc");
    assert!(
        matches!(created, Nfs3Result::Err((nfsstat3::NFS3ERR_FBIG, _))),
        "{created:?}"
    );
    assert_eq!(
        lookup(&mut c, &folder, "huge.bin").await.err(),
        Some(nfsstat3::NFS3ERR_NOENT),
        "a refused CREATE leaves no name"
    );

    // The limit itself is fine, and so is shrinking from up there.
    assert_eq!(set_size(&mut c, &fh, MAX_FILE).await, Ok(MAX_FILE));
    assert_eq!(set_size(&mut c, &fh, 17 * TIB).await, Ok(17 * TIB));
    assert_eq!(read(&mut c, &fh, 0, 5000).await, Ok(data.clone()));
    drop(c);
    f.server.restart();
    let (mut c, _, folder) = f.mount().await;
    let fh = lookup(&mut c, &folder, "big.bin").await.expect("lookup");
    assert_eq!(getattr(&mut c, &fh).await.map(|a| a.size), Ok(17 * TIB));
    assert_eq!(set_size(&mut c, &fh, 5000).await, Ok(5000));
    assert_eq!(read(&mut c, &fh, 0, 8192).await, Ok(data));
    drop(c);
    f.assert_repo_untouched();
}

/// A flat disk's `used` is what is really held: the backup's non-zero
/// chunks still visible plus the write cache's blocks, not its size; a
/// sparse extension adds nothing, a truncate drops what it hides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flat_disks_used_bytes_count_nonzero_chunks_and_the_cache() {
    let mut f = Fixture::new("used01", 16 * MIB, 98);
    let disk = f.disk();
    let nonzero = |upto: usize| -> u64 {
        disk[..upto]
            .chunks(MIB as usize)
            .filter(|c| c.iter().any(|b| *b != 0))
            .map(|c| c.len() as u64)
            .sum()
    };
    let zero_chunk = disk
        .chunks(MIB as usize)
        .position(|c| c.iter().all(|b| *b == 0))
        .expect("the sample disk has an all-zero chunk") as u64;
    let all = nonzero(disk.len());
    assert!(all < disk.len() as u64);
    let (mut c, _, folder) = f.mount().await;
    let fh = lookup(&mut c, &folder, &f.disk_name()).await.expect("disk");
    let used = |a: nfs3::fattr3| (a.size, a.used);
    assert_eq!(
        getattr(&mut c, &fh).await.map(used),
        Ok((disk.len() as u64, all)),
        "a published disk holds its non-zero chunks"
    );
    // One block written into a zero chunk: held by the cache.
    write(
        &mut c,
        &fh,
        zero_chunk * MIB,
        &[7u8; 4096],
        stable_how::FILE_SYNC,
    )
    .await;
    assert_eq!(getattr(&mut c, &fh).await.map(|a| a.used), Ok(all + 4096));
    // A sparse extension holds nothing more.
    let grown = disk.len() as u64 + 100 * MIB;
    assert_eq!(set_size(&mut c, &fh, grown).await, Ok(grown));
    assert_eq!(getattr(&mut c, &fh).await.map(|a| a.used), Ok(all + 4096));
    // A truncate hides the backup beyond it, for good.
    let half = 8 * MIB;
    assert_eq!(set_size(&mut c, &fh, half).await, Ok(half));
    assert_eq!(set_size(&mut c, &fh, grown).await, Ok(grown));
    let cached = if zero_chunk * MIB < half { 4096 } else { 0 };
    assert_eq!(
        getattr(&mut c, &fh).await.map(|a| a.used),
        Ok(nonzero(half as usize) + cached)
    );
    drop(c);
    f.assert_repo_untouched();
}

/// READDIR and READDIRPLUS list `.` and `..` first, as Linux's and other
/// NFS servers do, with the folder's and its parent's ids (and handles);
/// listing in pages of a few entries returns every entry exactly once; and
/// libnfs's `nfs-ls` still shows only the files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_start_with_dot_and_dotdot() {
    let mut f = Fixture::new("dots01", MIB, 93);
    let (mut c, root, folder) = f.mount().await;
    let folder_id = getattr(&mut c, &folder).await.expect("folder").fileid;
    let root_id = getattr(&mut c, &root).await.expect("root").fileid;
    for i in 0..20 {
        create(&mut c, &folder, &format!("new{i:02}"))
            .await
            .expect("create");
    }
    // READDIR in small pages.
    let (mut names, mut cookie) = (Vec::new(), 0);
    loop {
        let res = c
            .readdir(&nfs3::READDIR3args {
                dir: folder.clone(),
                cookie,
                cookieverf: nfs3::cookieverf3::default(),
                count: 200,
            })
            .await
            .expect("readdir rpc")
            .unwrap();
        for e in &res.reply.entries.0 {
            names.push((
                String::from_utf8(e.name.0.to_vec()).expect("utf8"),
                e.fileid,
            ));
            cookie = e.cookie;
        }
        if res.reply.eof {
            break;
        }
    }
    assert_eq!(names[0], (".".to_string(), folder_id));
    assert_eq!(names[1], ("..".to_string(), root_id));
    let mut files: Vec<&str> = names[2..].iter().map(|(n, _)| n.as_str()).collect();
    let count = files.len();
    files.sort();
    files.dedup();
    assert_eq!((count, files.len()), (25, 25), "each entry once: {names:?}");

    // READDIRPLUS gives their handles.
    let res = c
        .readdirplus(&nfs3::READDIRPLUS3args {
            dir: folder.clone(),
            cookie: 0,
            cookieverf: nfs3::cookieverf3::default(),
            dircount: 8192,
            maxcount: 32768,
        })
        .await
        .expect("readdirplus rpc")
        .unwrap();
    let entries = &res.reply.entries.0;
    let handle = |i: usize| match &entries[i].name_handle {
        Nfs3Option::Some(fh) => fh.clone(),
        Nfs3Option::None => panic!("no handle for entry {i}"),
    };
    assert_eq!(&entries[0].name.0[..], b".");
    assert_eq!(handle(0), folder);
    assert_eq!(&entries[1].name.0[..], b"..");
    assert_eq!(handle(1), root);
    assert_eq!(entries.len(), 27);

    // libnfs lists the files, not the dots.
    if !crate::support::skip_without_libnfs() {
        let out = run_tool("nfs-ls", &[&f.server.url("/revive/restore")]).await;
        assert!(out.status.success(), "nfs-ls: {out:?}");
        let listing = String::from_utf8_lossy(&out.stdout).into_owned();
        let shown: Vec<&str> = listing
            .lines()
            .filter_map(|l| l.split_whitespace().last())
            .collect();
        assert_eq!(shown.len(), 25, "{listing}");
    }
    drop(c);
    f.assert_repo_untouched();
}
