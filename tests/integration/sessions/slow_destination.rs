//! Issue 19: no blocking disk work on the async threads. A copy migration
//! to a destination whose every fsync takes seconds (a FUSE file system made
//! by the test) must not stall the NFS server: a client's GETATTR and READ
//! keep being answered at once meanwhile.
//!
//! The server runs with ONE tokio worker thread (`TOKIO_WORKER_THREADS=1`),
//! so any fsync, write or folder removal done on an async thread shows as a
//! stall of the full fsync time (two seconds here), where a request
//! otherwise takes milliseconds; the bound below sits between the two.

use std::time::{Duration, Instant};

use super::*;
use crate::support::slowfs::SlowFs;

/// What every fsync of the destination costs.
const FSYNC_DELAY: Duration = Duration::from_secs(2);
/// The longest a GETATTR or READ may take while the migration syncs: far
/// below the fsync delay (a stall shows as the whole delay), far above what
/// a loaded 2-core machine adds to a loopback round trip.
const STALL: Duration = Duration::from_millis(1000);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_to_a_slow_destination_does_not_stall_nfs() {
    if skip_without_libnfs() {
        return;
    }
    if !Path::new("/dev/fuse").exists() {
        skip_missing_peer("/dev/fuse (FUSE)");
        return;
    }
    let mut lab = Lab::with_env(&[("web01", 32 * MIB)], "", &[("TOKIO_WORKER_THREADS", "1")]);
    let slow_dir = lab.tmp.path().join("slow");
    fs::create_dir_all(&slow_dir).expect("mkdir");
    let slow = SlowFs::mount(&slow_dir, FSYNC_DELAY).expect("mount the slow file system");
    let sessions = lab.recover(&["--vm", "web01", "--wait"]);
    let (id, session) = (id(&sessions[0]), name(&sessions[0]));
    let flat = "web01-flat.vmdk";

    let conn = mount_at(lab.server.nfs_port, lab.server.mount_port, "/revive")
        .await
        .expect("mount");
    let root = conn.root_nfs_fh3();
    let mut c = conn.into_nfs3_client();
    let folder = lookup(&mut c, &root, &session).await.expect("folder");
    let fh = lookup(&mut c, &folder, flat).await.expect("disk");

    let started = lab.server.ctl_json(&[
        "migrate",
        &id,
        "--to",
        slow.path().to_str().expect("utf8"),
        "--method",
        "copy",
    ]);
    assert_eq!(state(&started), "migrating", "{started:#}");

    // Probe while the migration writes and syncs: at least three fsyncs
    // must have happened (and so stalled a thread of revive for seconds)
    // during the probing for the test to mean anything.
    let probe_start = Instant::now();
    let syncs_before = slow.syncs();
    let mut worst = Duration::ZERO;
    let mut calls = 0u64;
    while slow.syncs() < syncs_before + 3 && probe_start.elapsed() < Duration::from_secs(60) {
        let t = Instant::now();
        getattr(&mut c, &fh).await.expect("getattr");
        let offset = (calls * 7919 * 4096) % (32 * MIB - 4096);
        let data = read(&mut c, &fh, offset, 4096).await.expect("read");
        assert_eq!(data.len(), 4096);
        worst = worst.max(t.elapsed());
        calls += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let syncs = slow.syncs() - syncs_before;
    eprintln!(
        "slow destination: {calls} GETATTR+READ pairs during {syncs} fsyncs of {FSYNC_DELAY:?}; worst pair {worst:?}"
    );
    assert!(
        syncs >= 3,
        "the migration did not sync its destination while probed ({syncs})"
    );
    assert!(
        worst < STALL,
        "an NFS GETATTR+READ took {worst:?} while the migration fsynced a slow destination: \
         blocking work on revive's async threads"
    );
    let done = lab
        .server
        .wait_session(&id, LIMIT, "done", |s| state(s) == "done");
    assert_eq!(state(&done), "done", "{done:#}");
    drop(c);
    drop(slow);
    lab.assert_repo_untouched();
}
