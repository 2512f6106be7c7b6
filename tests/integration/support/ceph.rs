//! The single-host Ceph cluster of `scripts/ceph-single-host.sh` (one
//! monitor, one memory-backed OSD, pool `rbd`, on 127.0.0.1): started once
//! and reused by every test and benchmark run while it runs.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{have_tool, skip_missing_peer};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ceph-single-host.sh")
}

/// Starts (or finds running) the cluster and returns its ceph.conf; a skip
/// (a failure under CI) when the ceph packages are missing. Call it outside
/// any pid namespace a test kills: the daemons must outlive the test.
pub fn ceph_or_skip() -> Option<PathBuf> {
    if !(have_tool("ceph-mon") && have_tool("ceph-osd") && have_tool("rbd")) {
        skip_missing_peer("ceph-mon, ceph-osd, rbd (scripts/install-test-deps.sh)");
        return None;
    }
    let out = Command::new(script())
        .output()
        .expect("run ceph-single-host.sh");
    assert!(
        out.status.success(),
        "ceph-single-host.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The ceph.conf of the running cluster (in a test's inner run).
pub fn running_conf() -> PathBuf {
    let status = Command::new(script())
        .arg("status")
        .status()
        .expect("run ceph-single-host.sh status");
    assert!(status.success(), "the test Ceph cluster does not answer");
    let dir = std::env::var_os("REVIVE_CEPH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/revive-ceph"));
    dir.join("ceph.conf")
}

/// `rbd -c CONF ARGS`, which must succeed; returns stdout.
pub fn rbd(conf: &Path, args: &[&str]) -> String {
    let out = Command::new("rbd")
        .arg("-c")
        .arg(conf)
        .args(args)
        .output()
        .expect("run rbd");
    assert!(
        out.status.success(),
        "rbd {args:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Image names in pool `pool`.
pub fn images(conf: &Path, pool: &str) -> Vec<String> {
    rbd(conf, &["ls", "-p", pool])
        .lines()
        .map(str::to_string)
        .collect()
}
