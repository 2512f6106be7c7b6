//! Real peers on the real datastore: `qemu-img` over `nfs://` (with our
//! portmapper on 111 in a private network namespace) and fio's nfs engine.

use std::time::Duration;

use super::{Fixture, MIB, PUB};
use crate::support::client::*;
use crate::support::{
    fio_nfs_or_skip, fio_verify_job, netns_test, qemu_peers_or_skip, rerun_in_netns, sha256_file,
    FioPhase,
};

const DONE: &str = "DATASTORE-QEMU-CHECKS-PASSED";
const TEST: &str = "datastore::peers::qemu_img_converts_out_of_and_into_the_datastore";

/// `qemu-img convert` out of a published flat disk (same hash), and
/// `qemu-img create -f qcow2` + `convert -O qcow2` into the datastore
/// (writes and the flushes that need COMMIT), converted back out to the
/// source's hash. QEMU asks the portmapper on 111, so the test re-runs
/// itself in a private network namespace where the server takes 111/2049.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_converts_out_of_and_into_the_datastore() {
    netns_test(qemu_peers_or_skip, inner, || rerun_in_netns(TEST, DONE)).await;
}

async fn inner() {
    let mut f = Fixture::with("qemu01", 24 * MIB, 36, |s| s.fixed_ports(2049, 20048, 111));
    assert_eq!(f.server.portmap_port, Some(111));
    let local = |name: &str| f.tmp.path().join(name).to_str().expect("utf8").to_owned();
    let nfs = |name: &str| format!("nfs://127.0.0.1/revive/{PUB}/{name}");
    let qemu_img = |args: &[&str]| {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = run_tool_for("qemu-img", &args, Duration::from_secs(120)).await;
            assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
        }
    };
    let source_hash = sha256_file(&f.vm.flat());

    // Out of the datastore: the backed-up bytes.
    let out_raw = local("out.raw");
    let disk = nfs(&f.disk_name());
    qemu_img(&["convert", "-f", "raw", "-O", "raw", &disk, &out_raw]).await;
    assert_eq!(sha256_file(std::path::Path::new(&out_raw)), source_hash);

    // Into the datastore as qcow2 (metadata writes, flushes), and back out.
    qemu_img(&["create", "-f", "qcow2", &nfs("new.qcow2"), "16M"]).await;
    qemu_img(&["check", "-f", "qcow2", &nfs("new.qcow2")]).await;
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &disk,
        &nfs("copy.qcow2"),
    ])
    .await;
    let back = local("back.raw");
    qemu_img(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        &nfs("copy.qcow2"),
        &back,
    ])
    .await;
    assert_eq!(sha256_file(std::path::Path::new(&back)), source_hash);
    f.assert_repo_untouched();
    println!("{DONE}");
}

/// fio's own data check through its nfs engine on a published disk: random
/// 4 KiB writes carrying crc32c headers, then a read job verifies each
/// block. (Two jobs: fio's verify phase starts with an fsync the nfs engine
/// cannot issue.) The blocks really landed: every 4 KiB block now differs
/// from the backup, which is itself unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_verify_random_writes_on_a_published_disk() {
    let Some(fio) = fio_nfs_or_skip() else {
        return;
    };
    let mut f = Fixture::new("fio01", 32 * MIB, 37);
    let url = f.server.url("/revive");
    let file = format!("/{PUB}/{}", f.disk_name());
    let (ok, log) = fio_verify_job(&fio, &url, &file, FioPhase::Write).await;
    assert!(ok, "fio write failed:\n{log}");
    let (ok, log) = fio_verify_job(&fio, &url, &file, FioPhase::Verify).await;
    assert!(ok, "fio verify failed:\n{log}");

    let (mut c, _, folder) = f.mount().await;
    let fh = lookup(&mut c, &folder, &f.disk_name()).await.expect("disk");
    let now = read_all(&mut c, &fh, 0, 32 * MIB).await.expect("read disk");
    let backup = f.disk();
    let same = now
        .chunks(4096)
        .zip(backup.chunks(4096))
        .filter(|(a, b)| a == b)
        .count();
    assert_eq!(same, 0, "{same} blocks still hold backup bytes");
    drop(c);
    f.assert_repo_untouched();
}
