//! QEMU's nfs block driver against the server, with the portmapper on 111.
//!
//! QEMU cannot be told NFS or MOUNT ports: it asks the portmapper on port
//! 111. So the test re-runs itself inside a private network namespace
//! (`unshare --net`), where it may bind 111 and 2049 without touching the
//! host, and the inner run does the work. Needs root, `unshare`, and
//! QEMU's nfs driver (`qemu-block-extra` from bookworm-backports, see
//! `scripts/install-test-deps.sh`); skips loudly without them.

use std::net::IpAddr;
use std::sync::atomic::Ordering;

use revive::nfs::{NfsBind, NfsListeners};

use super::{pattern, run, sha256};
use crate::support::memfs::{MemFs, ROOT};
use crate::support::{netns_test, qemu_peers_or_skip, rerun_in_netns, TestServer};

const DONE: &str = "QEMU-NFS-CHECKS-PASSED";
const TEST: &str = "nfs_proto::qemu::qemu_img_over_nfs_with_portmapper_on_111";

/// `qemu-img convert` out of and into the datastore, and `create -f qcow2`
/// in it: reads, writes, and the flushes (COMMIT) qcow2 needs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_over_nfs_with_portmapper_on_111() {
    netns_test(qemu_peers_or_skip, inner, || rerun_in_netns(TEST, DONE)).await;
}

async fn inner() {
    let fs = MemFs::new();
    let disk = pattern(8 * 1024 * 1024 + 4096, 21);
    fs.add_file(ROOT, "disk.raw", disk.clone());
    let bind = NfsBind {
        addr: IpAddr::from([127, 0, 0, 1]),
        nfs_port: 2049,
        mount_port: 20048,
        portmap_port: Some(111),
    };
    let listeners = NfsListeners::bind(&bind)
        .await
        .expect("bind 111/2049 in the namespace");
    let s = TestServer::start_on(fs.clone(), listeners);
    let dir = tempfile::tempdir().expect("tempdir");
    let local = |name: &str| dir.path().join(name).to_str().expect("utf8").to_owned();
    let qemu_img = |args: Vec<String>| async move {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run("qemu-img", &args).await;
        assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
    };
    let v = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();

    // Out of the datastore: same bytes.
    let out_raw = local("out.raw");
    qemu_img(v(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        "nfs://127.0.0.1/export/disk.raw",
        &out_raw,
    ]))
    .await;
    assert_eq!(
        sha256(&std::fs::read(&out_raw).expect("read")),
        sha256(&disk)
    );

    // Into the datastore as qcow2 (metadata writes and flushes), and back.
    qemu_img(v(&[
        "create",
        "-f",
        "qcow2",
        "nfs://127.0.0.1/export/new.qcow2",
        "16M",
    ]))
    .await;
    qemu_img(v(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        &out_raw,
        "nfs://127.0.0.1/export/copy.qcow2",
    ]))
    .await;
    let back = local("back.raw");
    qemu_img(v(&[
        "convert",
        "-f",
        "qcow2",
        "-O",
        "raw",
        "nfs://127.0.0.1/export/copy.qcow2",
        &back,
    ]))
    .await;
    assert_eq!(sha256(&std::fs::read(&back).expect("read")), sha256(&disk));
    let commits = s
        .metrics
        .proc_stats(21)
        .expect("commit")
        .calls
        .load(Ordering::Relaxed);
    eprintln!("COMMIT calls: {commits}");
    assert!(commits > 0, "qcow2 writes must flush with COMMIT");
    s.stop().await;
    println!("{DONE}");
}
