//! The namespace as ESXi uses a datastore: lock files named after file ids,
//! log appends, `.vmx~` renamed over `.vmx`, removing presented files,
//! sparse truncate-extend, folders.

use nfs3_client::nfs3_types::nfs3::{self, nfsstat3, stable_how, Nfs3Result};
use nfs3_client::nfs3_types::xdr_codec::Opaque;

use super::{apply, Fixture, MIB, PUB};
use crate::support::client::*;

/// ESXi's habits on a published VM folder, each checked through listings and
/// reads, then the repository is checked untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn esxi_style_namespace_use() {
    let mut f = Fixture::new("esx01", 6 * MIB + 4096, 35);
    let (mut c, _, folder) = f.mount().await;
    let disk_fh = lookup(&mut c, &folder, &f.disk_name()).await.expect("disk");
    let disk_id = getattr(&mut c, &disk_fh).await.expect("attr").fileid;

    // .lck-<fileid>: created, written, listed, found again by name.
    let lck = format!(".lck-{disk_id:016x}");
    let lck_fh = create(&mut c, &folder, &lck).await.expect("create lock");
    write(&mut c, &lck_fh, 0, b"lock owner", stable_how::FILE_SYNC).await;
    assert_eq!(
        create(&mut c, &folder, &lck).await,
        Err(nfsstat3::NFS3ERR_EXIST)
    );
    assert_eq!(lookup(&mut c, &folder, &lck).await, Ok(lck_fh.clone()));

    // vmware.log appends at the current size.
    let log_fh = lookup(&mut c, &folder, "vmware.log").await.expect("log");
    let mut log = std::fs::read(f.vm.dir.join("vmware.log")).expect("log");
    for i in 0..5 {
        let line = format!("2026-11-23T00:00:0{i}.000Z| vmx| I005: line {i}\n");
        let size = getattr(&mut c, &log_fh).await.expect("attr").size;
        assert_eq!(size, log.len() as u64);
        write(
            &mut c,
            &log_fh,
            size,
            line.as_bytes(),
            stable_how::FILE_SYNC,
        )
        .await;
        log.extend_from_slice(line.as_bytes());
    }
    assert_eq!(read_all(&mut c, &log_fh, 0, 1 << 20).await, Ok(log));

    // .vmx~ written, then renamed over .vmx: the new content under the old
    // name, with the id of the file that was renamed.
    let vmx = "esx01.vmx";
    let tilde = "esx01.vmx~";
    let new_vmx = b".encoding = \"UTF-8\"\ndisplayName = \"esx01-restored\"\n".to_vec();
    let t_fh = create(&mut c, &folder, tilde).await.expect("create vmx~");
    write(&mut c, &t_fh, 0, &new_vmx, stable_how::FILE_SYNC).await;
    let t_id = getattr(&mut c, &t_fh).await.expect("attr").fileid;
    let old_vmx_fh = lookup(&mut c, &folder, vmx).await.expect("vmx");
    rename(&mut c, &folder, tilde, &folder, vmx)
        .await
        .expect("rename over");
    assert_eq!(
        lookup(&mut c, &folder, tilde).await,
        Err(nfsstat3::NFS3ERR_NOENT)
    );
    let vmx_fh = lookup(&mut c, &folder, vmx).await.expect("vmx after");
    assert_eq!(getattr(&mut c, &vmx_fh).await.expect("attr").fileid, t_id);
    assert_eq!(read_all(&mut c, &vmx_fh, 0, 4096).await, Ok(new_vmx));
    assert!(
        matches!(
            getattr(&mut c, &old_vmx_fh).await,
            Err(nfsstat3::NFS3ERR_STALE)
        ),
        "the replaced file's handle is stale"
    );

    // Removing a presented file that has a write cache: gone from listings,
    // and its cache files are gone from the cache folder.
    let nvram = "esx01.nvram";
    let nv_fh = lookup(&mut c, &folder, nvram).await.expect("nvram");
    let nv_id = getattr(&mut c, &nv_fh).await.expect("attr").fileid;
    write(&mut c, &nv_fh, 10, b"changed", stable_how::FILE_SYNC).await;
    let key = format!("f{nv_id:016x}");
    let cached = |files: Vec<String>| files.iter().filter(|n| n.starts_with(&key)).count();
    assert!(
        cached(f.server.cache_files(PUB)) > 0,
        "a written presented file has cache files: {:?}",
        f.server.cache_files(PUB)
    );
    remove(&mut c, &folder, nvram).await.expect("remove nvram");
    assert_eq!(
        lookup(&mut c, &folder, nvram).await,
        Err(nfsstat3::NFS3ERR_NOENT)
    );
    let names: Vec<String> = list(&mut c, &folder)
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert!(!names.contains(&nvram.to_string()), "{names:?}");
    assert_eq!(
        cached(f.server.cache_files(PUB)),
        0,
        "cache files of a removed file: {:?}",
        f.server.cache_files(PUB)
    );
    // A new file of the same name is new: empty, another id.
    let nv2 = create(&mut c, &folder, nvram).await.expect("recreate");
    let a = getattr(&mut c, &nv2).await.expect("attr");
    assert_eq!(a.size, 0);
    assert_ne!(a.fileid, nv_id);

    // Truncate-extend is sparse: the cut-off backup bytes never come back.
    let mut disk = f.disk();
    let cut = 2 * MIB + 4097;
    let full = disk.len() as u64;
    assert_eq!(set_size(&mut c, &disk_fh, cut).await, Ok(cut));
    assert_eq!(set_size(&mut c, &disk_fh, full + MIB).await, Ok(full + MIB));
    disk.truncate(cut as usize);
    disk.resize((full + MIB) as usize, 0);
    apply(&mut disk, full, b"tail");
    write(&mut c, &disk_fh, full, b"tail", stable_how::FILE_SYNC).await;
    let back = read_all(&mut c, &disk_fh, 0, full + MIB)
        .await
        .expect("read");
    assert_eq!(back.len(), disk.len());
    assert!(back == disk, "truncate-extend must read zeros past the cut");
    // A new file extended by SETATTR reads zeros and is sparse.
    let sparse = create(&mut c, &folder, "esx01-1.vswp").await.expect("vswp");
    assert_eq!(set_size(&mut c, &sparse, 64 * MIB).await, Ok(64 * MIB));
    let a = getattr(&mut c, &sparse).await.expect("attr");
    assert!(a.used < MIB, "extended file is sparse (used {})", a.used);
    let zeros = read(&mut c, &sparse, 40 * MIB + 3, 65_536)
        .await
        .expect("read");
    assert!(zeros.len() == 65_536 && zeros.iter().all(|&b| b == 0));

    // Folders: mkdir, not empty, rmdir.
    let sub = mkdir(&mut c, &folder, "snapshots").await.expect("mkdir");
    create(&mut c, &sub, "s1.vmsn")
        .await
        .expect("create in sub");
    assert_eq!(
        rmdir(&mut c, &folder, "snapshots").await,
        Err(nfsstat3::NFS3ERR_NOTEMPTY)
    );
    remove(&mut c, &sub, "s1.vmsn")
        .await
        .expect("remove in sub");
    rmdir(&mut c, &folder, "snapshots").await.expect("rmdir");
    assert_eq!(
        lookup(&mut c, &folder, "snapshots").await,
        Err(nfsstat3::NFS3ERR_NOENT)
    );
    // The publication folder itself cannot be removed by a client.
    let (_, root, _) = f.mount().await;
    assert!(rmdir(&mut c, &root, PUB).await.is_err());

    let mut names: Vec<String> = list(&mut c, &folder)
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    names.sort();
    let mut want: Vec<String> = [
        lck.as_str(),
        "esx01-1.vswp",
        "esx01-flat.vmdk",
        "esx01.nvram",
        "esx01.vmdk",
        "esx01.vmx",
        "vmware.log",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    want.sort();
    assert_eq!(names, want);
    drop(c);
    f.assert_repo_untouched();
}

/// Regression: a CREATE in a publication folder as the first call after the
/// server starts (ESXi re-taking its `.lck-*` files after a restart) hung
/// the whole export: CREATE held the namespace write lock while opening the
/// publication's write cache folder, which reads the namespace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_as_first_call_after_start_does_not_hang() {
    let mut f = Fixture::new("lck01", MIB, 40);
    for round in 0..2 {
        let (mut c, _, folder) = f.mount().await;
        let name = format!(".lck-{round:016x}");
        let fh = tokio::time::timeout(
            std::time::Duration::from_secs(20),
            create(&mut c, &folder, &name),
        )
        .await
        .expect("CREATE as first call must not hang")
        .expect("create");
        write(&mut c, &fh, 0, b"owner", stable_how::FILE_SYNC).await;
        assert_eq!(read(&mut c, &fh, 0, 100).await, Ok(b"owner".to_vec()));
        drop(c);
        f.server.restart();
    }
    f.assert_repo_untouched();
}

/// Regression: a write or size change past the limit of the write cache's
/// filesystem (ext4: 16 TiB) answered NFS3ERR_IO; it is NFS3ERR_FBIG, the
/// answer a client expects for a file too large. Filesystems without that
/// limit take the write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_past_the_cache_filesystem_limit_are_fbig_not_eio() {
    let mut f = Fixture::new("big01", MIB, 50);
    let (mut c, _, folder) = f.mount().await;
    let fh = create(&mut c, &folder, "huge-flat.vmdk")
        .await
        .expect("create");
    let offset = 60u64 << 40;
    let res = c
        .write(&nfs3::WRITE3args {
            file: fh.clone(),
            offset,
            count: 4,
            stable: stable_how::FILE_SYNC,
            data: Opaque::borrowed(b"tail"),
        })
        .await
        .expect("write rpc");
    match res {
        Nfs3Result::Ok(_) => assert_eq!(read(&mut c, &fh, offset, 4).await, Ok(b"tail".to_vec())),
        Nfs3Result::Err((stat, _)) => assert_eq!(stat, nfsstat3::NFS3ERR_FBIG),
    }
    match set_size(&mut c, &fh, 62 << 40).await {
        Ok(size) => assert_eq!(size, 62 << 40),
        Err(stat) => assert_eq!(stat, nfsstat3::NFS3ERR_FBIG),
    }
    drop(c);
    f.assert_repo_untouched();
}
