//! Damage under a running datastore: a corrupt chunk in the repository.

use std::os::unix::fs::FileExt;

use nfs3_client::nfs3_types::nfs3::{self, nfsstat3, stable_how, Nfs3Result};
use nfs3_client::nfs3_types::xdr_codec::Opaque;

use super::{Fixture, MIB};
use crate::support::client::*;
use crate::support::{chunk_files, snapshot_tree};

/// A corrupt chunk is never served: reads of its region fail with
/// NFS3ERR_IO (again and again: nothing bad is cached), so does a read of a
/// chunk missing from the repository, and the log names both chunk ids. A
/// partial-block write over the damage fails (its copy-on-write base is
/// unreadable) while whole blocks may be overwritten; the rest of the disk
/// and the other files still read right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_chunk_reads_fail_with_eio_and_are_logged() {
    let mut f = Fixture::new("file01", 12 * MIB, 34);
    let disk = f.disk();
    // A chunk of the disk that holds data and is used exactly once.
    let ids: Vec<String> = disk
        .chunks(MIB as usize)
        .map(|c| blake3::hash(c).to_hex().to_string())
        .collect();
    let chunks = chunk_files(&f.repo);
    let unique: Vec<(u64, String)> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            disk[*i * MIB as usize..][..MIB as usize]
                .iter()
                .any(|&b| b != 0)
        })
        .filter(|(_, id)| ids.iter().filter(|x| x == id).count() == 1)
        .map(|(i, id)| (i as u64, id.clone()))
        .collect();
    assert!(unique.len() >= 2, "two unique data chunks");
    let (victim_index, victim_id) = unique[0].clone();
    // A second one goes missing altogether.
    let (gone_index, gone_id) = unique[unique.len() - 1].clone();
    let gone = chunks
        .iter()
        .find(|p| p.file_name().and_then(|n| n.to_str()) == Some(gone_id.as_str()))
        .expect("chunk file");
    std::fs::remove_file(gone).expect("remove chunk");
    let victim = chunks
        .iter()
        .find(|p| p.file_name().and_then(|n| n.to_str()) == Some(victim_id.as_str()))
        .unwrap_or_else(|| panic!("chunk file {victim_id} not in {chunks:?}"));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(victim)
        .expect("open chunk");
    file.write_all_at(b"\xde\xad\xbe\xef", 100)
        .expect("corrupt");
    drop(file);

    let (mut c, _, folder) = f.mount().await;
    let fh = lookup(&mut c, &folder, &f.disk_name()).await.expect("disk");
    let bad = victim_index * MIB;
    for _ in 0..2 {
        assert_eq!(
            read(&mut c, &fh, bad + 4096, 8192).await,
            Err(nfsstat3::NFS3ERR_IO),
            "read of the corrupt chunk must fail"
        );
    }
    // A read spanning into the bad chunk fails too.
    if victim_index > 0 {
        assert_eq!(
            read(&mut c, &fh, bad - 4096, 8192).await,
            Err(nfsstat3::NFS3ERR_IO)
        );
    }
    assert_eq!(
        read(&mut c, &fh, gone_index * MIB, 4096).await,
        Err(nfsstat3::NFS3ERR_IO),
        "read of a missing chunk must fail"
    );
    let log = f.server.log();
    assert!(log.contains(&gone_id), "the log must name chunk {gone_id}");
    assert!(
        log.contains(&victim_id),
        "the log must name chunk {victim_id}:\n{log}"
    );

    // Every other chunk of the disk still reads right, including after a
    // sequential run that prefetched the bad one.
    for index in (0..disk.len() as u64 / MIB).filter(|i| *i != victim_index && *i != gone_index) {
        let got = read_all(&mut c, &fh, index * MIB, MIB)
            .await
            .expect("good chunk");
        assert!(
            got[..] == disk[(index * MIB) as usize..][..MIB as usize],
            "chunk {index} differs"
        );
    }
    let vmx = lookup(&mut c, &folder, "file01.vmx").await.expect("vmx");
    let want = std::fs::read(f.vm.dir.join("file01.vmx")).expect("vmx");
    assert_eq!(read_all(&mut c, &vmx, 0, 1 << 16).await, Ok(want));

    // A partial-block write into the bad chunk needs its base bytes
    // (copy-on-write): it fails rather than filling the block with zeros,
    // and the region still reads as an error.
    let w = c
        .write(&nfs3::WRITE3args {
            file: fh.clone(),
            offset: bad + 100,
            count: 10,
            stable: stable_how::FILE_SYNC,
            data: Opaque::borrowed(b"0123456789"),
        })
        .await
        .expect("write rpc");
    assert!(
        matches!(w, Nfs3Result::Err((nfsstat3::NFS3ERR_IO, _))),
        "partial write over a corrupt base: {w:?}"
    );
    assert_eq!(
        read(&mut c, &fh, bad, 4096).await,
        Err(nfsstat3::NFS3ERR_IO)
    );
    // Whole blocks need no base: a client may overwrite the damage.
    let fresh = pattern(64 * 1024, 46);
    write(&mut c, &fh, bad + 64 * 1024, &fresh, stable_how::FILE_SYNC).await;
    assert_eq!(
        read(&mut c, &fh, bad + 64 * 1024, 64 * 1024).await,
        Ok(fresh)
    );

    // A whole-file reader gets an error, never a full copy with wrong bytes.
    if !crate::support::skip_without_libnfs() {
        let out = run_tool("nfs-cat", &[&f.file_url(&f.disk_name())]).await;
        assert!(
            !out.status.success() || out.stdout.len() < disk.len(),
            "nfs-cat of a disk with a corrupt chunk must not succeed"
        );
        assert!(
            disk.starts_with(&out.stdout[..out.stdout.len().min(bad as usize)]),
            "bytes before the bad chunk are right"
        );
        assert!(
            out.stdout.len() as u64 <= bad,
            "nothing of the bad chunk or after it was served"
        );
    }

    // The server wrote nothing to the repository: only the two damaged
    // chunk files differ from before.
    drop(c);
    f.server.stop();
    let mut want = f.repo_before.clone();
    want.remove(gone);
    let mut now = snapshot_tree(&f.repo);
    assert_ne!(now.remove(victim), want.remove(victim), "victim corrupted");
    assert_eq!(now, want, "the repository changed");
}
