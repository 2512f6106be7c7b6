//! Many clients at once: concurrent stable writers (group commit), creators
//! and sequential readers sharing the block cache, then `kill -9`.

use nfs3_client::nfs3_types::nfs3::stable_how;

use super::{apply, Fixture, MIB};
use crate::support::client::*;

const WRITERS: u64 = 4;
const WRITES: u64 = 40;

/// Four writers send FILE_SYNC writes to one disk over their own
/// connections while a fifth creates files and two readers stream the same
/// restore point from a second publication (sharing chunks in the block
/// cache, with readahead). Every read is right; after `kill -9` every
/// acknowledged write is there and the second publication is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_creators_and_readers_then_kill9() {
    let mut f = Fixture::with("cc01", 40 * MIB, 42, |s| s.publish("second", "cc01@latest"));
    let (mut c, root, folder) = f.mount().await;
    let name = f.disk_name();
    let disk_fh = lookup(&mut c, &folder, &name).await.expect("disk");
    let second = lookup(&mut c, &root, "second").await.expect("second");
    let second_fh = lookup(&mut c, &second, &name).await.expect("disk 2");
    let backup = f.disk();
    let port = f.server.nfs_port;

    let write_at = |t: u64, i: u64| {
        let offset = (t * WRITES + i) * 256 * 1024 + t * 13 + 1;
        (offset, pattern(4096 + (i as usize % 7) * 100, t * 1000 + i))
    };
    let mut tasks = Vec::new();
    for t in 0..WRITERS {
        let fh = disk_fh.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = client_at(port).await;
            for i in 0..WRITES {
                let (offset, data) = write_at(t, i);
                write(&mut c, &fh, offset, &data, stable_how::FILE_SYNC).await;
            }
        }));
    }
    let dir = folder.clone();
    tasks.push(tokio::spawn(async move {
        let mut c = client_at(port).await;
        for i in 0..20u64 {
            let fh = create(&mut c, &dir, &format!("new-{i}.log"))
                .await
                .expect("create");
            let data = pattern(3000 + i as usize, 500 + i);
            write(&mut c, &fh, 0, &data, stable_how::FILE_SYNC).await;
        }
    }));
    for r in 0..2u64 {
        let fh = second_fh.clone();
        let want = backup.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = client_at(port).await;
            // Different read sizes, so the readers are not in lockstep.
            let step = if r == 0 { 1 << 20 } else { 192 * 1024 };
            let mut offset = 0u64;
            while offset < want.len() as u64 {
                let got = read(&mut c, &fh, offset, step).await.expect("read");
                assert!(!got.is_empty(), "short read at {offset}");
                assert!(
                    got[..] == want[offset as usize..][..got.len()],
                    "reader {r}: wrong bytes at {offset}"
                );
                offset += got.len() as u64;
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    drop(c);
    f.server.kill9();
    f.server.restart();

    let mut c = client_at(f.server.nfs_port).await;
    let mut want = backup.clone();
    for t in 0..WRITERS {
        for i in 0..WRITES {
            let (offset, data) = write_at(t, i);
            apply(&mut want, offset, &data);
        }
    }
    let got = read_all(&mut c, &disk_fh, 0, want.len() as u64)
        .await
        .expect("read disk");
    assert!(got == want, "acknowledged concurrent writes lost");
    let got = read_all(&mut c, &second_fh, 0, backup.len() as u64)
        .await
        .expect("read second");
    assert!(got == backup, "the other publication changed");
    for i in 0..20u64 {
        let fh = lookup(&mut c, &folder, &format!("new-{i}.log"))
            .await
            .expect("created file after kill -9");
        let data = pattern(3000 + i as usize, 500 + i);
        assert_eq!(read_all(&mut c, &fh, 0, 1 << 20).await, Ok(data));
    }
    drop(c);
    f.assert_repo_untouched();
}

/// A block cache much smaller than the disk (8 MiB for 48 MiB): two
/// sequential readers with readahead and a random 4 KiB reader at once keep
/// evicting each other's chunks, and every byte they get is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_through_a_small_block_cache_get_right_bytes() {
    let mut f = Fixture::with("bc01", 48 * MIB, 52, |mut s| {
        s.block_cache = "8MiB".into();
        s
    });
    let (mut c, _, folder) = f.mount().await;
    let backup = std::sync::Arc::new(f.disk());
    let port = f.server.nfs_port;
    let fh = lookup(&mut c, &folder, &f.disk_name()).await.expect("disk");
    let mut tasks = Vec::new();
    for (r, step) in [(0u64, 1u32 << 20), (1, 320 * 1024)] {
        let (fh, want) = (fh.clone(), backup.clone());
        tasks.push(tokio::spawn(async move {
            let mut c = client_at(port).await;
            for pass in 0..2 {
                let mut offset = 0u64;
                while offset < want.len() as u64 {
                    let got = read(&mut c, &fh, offset, step).await.expect("read");
                    assert!(!got.is_empty(), "short read at {offset}");
                    assert!(
                        got[..] == want[offset as usize..][..got.len()],
                        "reader {r} pass {pass}: wrong bytes at {offset}"
                    );
                    offset += got.len() as u64;
                }
            }
        }));
    }
    let (fh2, want) = (fh.clone(), backup.clone());
    tasks.push(tokio::spawn(async move {
        let mut c = client_at(port).await;
        for i in 0..600u64 {
            let offset = (i * 7_919 * 4096 + i * 3) % (want.len() as u64 - 4096);
            let got = read(&mut c, &fh2, offset, 4096).await.expect("read");
            assert!(
                got[..] == want[offset as usize..][..4096],
                "random read at {offset}"
            );
        }
    }));
    for t in tasks {
        t.await.expect("task");
    }
    drop(c);
    f.assert_repo_untouched();
}
