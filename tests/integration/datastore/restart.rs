//! The namespace after a restart: everything a client changed is still
//! there, under the same file ids, and nothing it removed comes back.

use nfs3_client::nfs3_types::nfs3::{nfsstat3, stable_how};

use super::{apply, Fixture, MIB};
use crate::support::client::*;

/// Changes of every kind (remove of a presented file, rename, mkdir, new
/// files, sparse truncate-extend, writes past the end) survive `kill -9` and
/// a clean restart with the same ids, sizes and bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_changes_survive_restarts() {
    let mut f = Fixture::new("ns01", 4 * MIB, 38);
    let (mut c, root, folder) = f.mount().await;
    let disk_fh = lookup(&mut c, &folder, &f.disk_name()).await.expect("disk");
    let mut disk = f.disk();

    remove(&mut c, &folder, "ns01.nvram").await.expect("remove");
    let sub = mkdir(&mut c, &folder, "sub").await.expect("mkdir");
    rename(&mut c, &folder, "ns01.vmdk", &sub, "moved.vmdk")
        .await
        .expect("rename presented file into a subfolder");
    let new = create(&mut c, &sub, "new.bin").await.expect("create");
    write(&mut c, &new, 5000, b"after a hole", stable_how::FILE_SYNC).await;
    let mut new_data = vec![0u8; 5000];
    new_data.extend_from_slice(b"after a hole");

    // Past the end of a presented disk: extends it, the gap reads zeros.
    let end = disk.len() as u64 + 3 * 4096 + 5;
    write(&mut c, &disk_fh, end, b"beyond", stable_how::FILE_SYNC).await;
    apply(&mut disk, end, b"beyond");
    // Truncate to 0 and rewrite the head of the log.
    let log = lookup(&mut c, &folder, "vmware.log").await.expect("log");
    assert_eq!(set_size(&mut c, &log, 0).await, Ok(0));
    write(&mut c, &log, 0, b"fresh log\n", stable_how::FILE_SYNC).await;
    assert_eq!(read(&mut c, &log, 100, 10).await, Ok(Vec::new()));

    let before = list(&mut c, &folder).await;
    let before_sub = list(&mut c, &sub).await;
    let descriptor = std::fs::read(f.vm.dir.join("ns01.vmdk")).expect("descriptor");
    let check = |mut c: Client, disk: Vec<u8>, new_data: Vec<u8>| {
        let descriptor = descriptor.clone();
        let (root, folder, sub, disk_fh, new, log) = (
            root.clone(),
            folder.clone(),
            sub.clone(),
            disk_fh.clone(),
            new.clone(),
            log.clone(),
        );
        let (before, before_sub) = (before.clone(), before_sub.clone());
        async move {
            assert_eq!(list(&mut c, &folder).await, before, "folder after restart");
            assert_eq!(list(&mut c, &sub).await, before_sub, "sub after restart");
            assert_eq!(
                lookup(&mut c, &folder, "ns01.nvram").await,
                Err(nfsstat3::NFS3ERR_NOENT),
                "a removed presented file stays removed"
            );
            assert_eq!(lookup(&mut c, &root, "restore").await, Ok(folder.clone()));
            let moved = lookup(&mut c, &sub, "moved.vmdk").await.expect("moved");
            assert_eq!(
                read_all(&mut c, &moved, 0, 1 << 20).await,
                Ok(descriptor),
                "renamed presented file"
            );
            assert_eq!(
                read_all(&mut c, &new, 0, 1 << 20).await,
                Ok(new_data),
                "new file"
            );
            let back = read_all(&mut c, &disk_fh, 0, disk.len() as u64 + 10)
                .await
                .expect("disk");
            assert!(back == disk, "disk after restart");
            assert_eq!(
                read_all(&mut c, &log, 0, 1 << 20).await,
                Ok(b"fresh log\n".to_vec())
            );
        }
    };
    check(c, disk.clone(), new_data.clone()).await;
    f.server.kill9();
    f.server.restart();
    let c = client_at(f.server.nfs_port).await;
    check(c, disk.clone(), new_data.clone()).await;
    f.server.restart();
    let c = client_at(f.server.nfs_port).await;
    check(c, disk, new_data).await;
    f.assert_repo_untouched();
}

/// Regression: SIGTERM right after the ports line killed `revive serve`
/// uncleanly (exit by signal), because the handlers were installed only
/// when the server first polled its shutdown future. Now it always exits 0.
#[test]
fn sigterm_right_after_the_ports_line_stops_cleanly() {
    let mut f = Fixture::new("term01", MIB, 41);
    for _ in 0..20 {
        f.server.restart(); // stops (asserting exit 0), then starts again
    }
    f.server.stop();
}

/// Regression: a clean stop (SIGTERM) dropped UNSTABLE writes that no COMMIT
/// had covered yet; libnfs-based clients (QEMU, fio) never resend them. Now
/// `revive serve` flushes every write cache before it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstable_writes_survive_a_clean_restart() {
    let mut f = Fixture::new("stop01", 2 * MIB, 44);
    let (mut c, _, folder) = f.mount().await;
    let disk_fh = lookup(&mut c, &folder, &f.disk_name()).await.expect("disk");
    let new = create(&mut c, &folder, "new.bin").await.expect("create");
    let mut disk = f.disk();
    let patch = pattern(10_000, 45);
    write(&mut c, &disk_fh, 12_345, &patch, stable_how::UNSTABLE).await;
    apply(&mut disk, 12_345, &patch);
    write(&mut c, &new, 0, &patch, stable_how::UNSTABLE).await;
    drop(c);
    f.server.restart();
    let mut c = client_at(f.server.nfs_port).await;
    let got = read_all(&mut c, &disk_fh, 0, disk.len() as u64)
        .await
        .expect("read");
    assert!(got == disk, "UNSTABLE disk write lost by a clean restart");
    assert_eq!(read_all(&mut c, &new, 0, 1 << 20).await, Ok(patch));
    drop(c);
    f.assert_repo_untouched();
}
