//! Damage under a running datastore: a corrupt chunk in the repository.

use std::os::unix::fs::FileExt;

use nfs3_client::nfs3_types::nfs3::nfsstat3;

use super::{Fixture, MIB};
use crate::support::chunk_files;
use crate::support::client::*;

/// A corrupt chunk is never served: reads of its region fail with
/// NFS3ERR_IO (again and again: nothing bad is cached), the log names the
/// chunk id, and the rest of the disk and the other files still read right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_chunk_reads_fail_with_eio_and_are_logged() {
    let f = Fixture::new("file01", 12 * MIB, 34);
    let disk = f.disk();
    // A chunk of the disk that holds data and is used exactly once.
    let ids: Vec<String> = disk
        .chunks(MIB as usize)
        .map(|c| blake3::hash(c).to_hex().to_string())
        .collect();
    let chunks = chunk_files(&f.repo);
    let (victim_index, victim_id) = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            disk[*i * MIB as usize..][..MIB as usize]
                .iter()
                .any(|&b| b != 0)
        })
        .find(|(_, id)| ids.iter().filter(|x| x == id).count() == 1)
        .map(|(i, id)| (i as u64, id.clone()))
        .expect("a unique data chunk");
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
    let log = f.server.log();
    assert!(
        log.contains(&victim_id),
        "the log must name chunk {victim_id}:\n{log}"
    );

    // Every other chunk of the disk still reads right, including after a
    // sequential run that prefetched the bad one.
    for index in (0..disk.len() as u64 / MIB).filter(|i| *i != victim_index) {
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
}
