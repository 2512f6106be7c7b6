//! Item 1: file descriptors. Every write cache used to keep three
//! descriptors open for good, so under the usual 1024 limit the ~337th
//! CREATE failed with NFS3ERR_IO and the datastore stayed wedged (even
//! REMOVE failed) until a restart.

use nfs3_client::nfs3_types::nfs3::stable_how;

use crate::datastore::{Fixture, MIB};
use crate::support::client::*;

/// Files created, written, read and removed under a 1024 descriptor limit.
const FILES: usize = 2000;

/// Thousands of files created and written by an allowed client under a
/// 1024 soft and hard descriptor limit (so the server cannot raise it):
/// every CREATE, WRITE, READ and REMOVE is answered correctly, the disk of
/// the published VM keeps taking writes throughout, and once every file is
/// removed their write caches are gone from the cache folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_files_under_a_1024_descriptor_limit() {
    let mut f = Fixture::with("fd01", 4 * MIB, 81, |s| s.nofile(1024, 1024));
    assert_eq!(f.server.nofile_limits(), (1024, 1024));
    let (mut c, _, folder) = f.mount().await;
    let disk_name = f.disk_name();
    let disk = lookup(&mut c, &folder, &disk_name).await.expect("disk");
    let mut most_fds = 0;
    for i in 0..FILES {
        let name = format!("vm{i:05}.lck");
        let fh = create(&mut c, &folder, &name)
            .await
            .unwrap_or_else(|s| panic!("CREATE {name} (file {i}): {s:?}"));
        let data = pattern(100 + i % 4000, i as u64);
        write(&mut c, &fh, 0, &data, stable_how::UNSTABLE).await;
        if i % 100 == 99 {
            // Another file, and the VM's disk, still work.
            let back = format!("vm{:05}.lck", i / 2);
            let older = lookup(&mut c, &folder, &back).await.expect("older file");
            let want = pattern(100 + (i / 2) % 4000, (i / 2) as u64);
            assert_eq!(read(&mut c, &older, 0, 1 << 16).await, Ok(want), "{back}");
            let block = pattern(4096, 1000 + i as u64);
            write(
                &mut c,
                &disk,
                (i as u64 % 1000) * 4096,
                &block,
                stable_how::FILE_SYNC,
            )
            .await;
            most_fds = most_fds.max(f.server.open_fds());
        }
    }
    assert!(
        most_fds < 1024,
        "the server stays under its limit ({most_fds} open)"
    );
    let listed = list(&mut c, &folder).await;
    assert_eq!(listed.len(), FILES + 5, "every created file is listed");
    for i in (0..FILES).step_by(97) {
        let name = format!("vm{i:05}.lck");
        let fh = lookup(&mut c, &folder, &name).await.expect("lookup");
        let want = pattern(100 + i % 4000, i as u64);
        assert_eq!(read(&mut c, &fh, 0, 1 << 16).await, Ok(want), "{name}");
    }
    for i in 0..FILES {
        let name = format!("vm{i:05}.lck");
        remove(&mut c, &folder, &name)
            .await
            .unwrap_or_else(|s| panic!("REMOVE {name}: {s:?}"));
    }
    assert_eq!(
        list(&mut c, &folder).await.len(),
        5,
        "only the VM's files are left"
    );
    // Only the disk's write cache is left in the publication's folder.
    let caches: Vec<String> = f
        .server
        .cache_files(crate::datastore::PUB)
        .into_iter()
        .filter(|n| n.ends_with(".map"))
        .collect();
    assert_eq!(caches.len(), 1, "write caches left: {caches:?}");
    drop(c);
    f.assert_repo_untouched();
}

/// `revive serve` raises its soft descriptor limit to the hard limit at
/// start, so the usual 1024 soft limit of a login shell or a unit file
/// without `LimitNOFILE` is not what bounds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_raises_its_soft_descriptor_limit_to_the_hard_limit() {
    let f = Fixture::with("fd02", MIB, 82, |s| s.nofile(1024, 4096));
    assert_eq!(f.server.nofile_limits(), (4096, 4096));
}
