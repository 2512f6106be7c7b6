//! Benchmark (ignored; `scripts/bench-iscsi.sh` runs it in a release
//! build): fio through QEMU's iscsi driver against revive's target serving
//! a restore point's disk from the datastore, and against tgtd serving the
//! same disk as a plain file, side by side in one run.
//!
//! fio has no iSCSI engine in Debian, so each target is opened by
//! `qemu-storage-daemon` with QEMU's iscsi block driver (libiscsi) and
//! exported on a unix socket to fio's nbd engine: the same initiator and the
//! same path for both targets, only the target differs.

use std::process::Stdio;
use std::time::Duration;

use crate::support::client::run_tool_for;
use crate::support::iscsi::{loopback_access, tgtd_or_skip, InProcessTarget, PublishedDisk, Tgtd};
use crate::support::vm::SampleVm;
use crate::support::*;

const IQN: &str = "iqn.2024-01.dev.revive:bench";
/// Disk size: large enough that the lines are not all cache hits in fio,
/// small enough to fit the block cache (both targets are measured warm).
const DISK: u64 = 256 << 20;

/// One fio line: name and arguments.
const LINES: &[(&str, &[&str])] = &[
    (
        "4k-randread-qd16",
        &["--rw=randread", "--bs=4k", "--iodepth=16"],
    ),
    ("1m-seqread-qd4", &["--rw=read", "--bs=1m", "--iodepth=4"]),
];

/// qemu-storage-daemon exporting `iscsi_url`'s LUN on a unix socket.
struct Qsd {
    child: tokio::process::Child,
    uri: String,
}

async fn qsd(dir: &std::path::Path, name: &str, portal: &str, target: &str, lun: u32) -> Qsd {
    let sock = dir.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&sock);
    let child = tokio::process::Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!(
            "driver=iscsi,transport=tcp,portal={portal},target={target},lun={lun},\
             initiator-name=iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-test,\
             node-name=disk,cache.direct=on"
        ))
        .arg("--nbd-server")
        .arg(format!("addr.type=unix,addr.path={}", sock.display()))
        .arg("--export")
        .arg("type=nbd,id=e0,node-name=disk,name=disk")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn qemu-storage-daemon");
    for _ in 0..200 {
        if sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        sock.exists(),
        "qemu-storage-daemon did not start for {name}"
    );
    Qsd {
        child,
        uri: format!("nbd+unix:///disk?socket={}", sock.display()),
    }
}

/// Runs one fio line; returns (IOPS, MiB/s).
async fn fio(uri: &str, args: &[&str], runtime: u64) -> (f64, f64) {
    let uri = format!("--uri={uri}");
    let runtime = format!("--runtime={runtime}");
    let mut all = vec![
        "--name=bench",
        "--ioengine=nbd",
        &uri,
        "--time_based",
        &runtime,
        "--output-format=json",
        "--size=256m",
    ];
    all.extend_from_slice(args);
    let out = run_tool_for("fio", &all, Duration::from_secs(300)).await;
    assert!(
        out.status.success(),
        "fio: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio json");
    let read = &v["jobs"][0]["read"];
    (
        read["iops"].as_f64().unwrap_or(0.0),
        read["bw_bytes"].as_f64().unwrap_or(0.0) / f64::from(1 << 20),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: scripts/bench-iscsi.sh"]
async fn fio_through_qemu_revive_vs_tgtd() {
    if !tgtd_or_skip() || !have_tool("qemu-storage-daemon") || !have_tool("fio") {
        skip_missing_peer("tgt, qemu-storage-daemon or fio");
        return;
    }
    let runtime: u64 = std::env::var("BENCH_RUNTIME")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let repeat: usize = std::env::var("BENCH_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let tmp =
        tempfile::tempdir_in(std::env::var("BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()))
            .expect("tempdir");
    let vm = SampleVm::create(&tmp.path().join("src"), "bench", DISK, 21);
    let repo = init_repo(tmp.path(), None);
    backup_json(&repo, &vm.dir, None);
    let published = PublishedDisk::open_with_cache(
        &repo,
        &tmp.path().join("ds"),
        "bench@latest",
        "bench",
        "bench-flat.vmdk",
        (DISK + (64 << 20)) as usize,
    )
    .await;
    let revive = InProcessTarget::start(IQN, published.disk.clone(), loopback_access()).await;
    let tgtd = Tgtd::start(
        &vm.flat(),
        "iqn.2024-01.dev.revive:bench-tgtd",
        &tmp.path().join("tgtd.log"),
    );
    let mut a = qsd(tmp.path(), "revive", &revive.addr.to_string(), IQN, 0).await;
    let mut b = qsd(
        tmp.path(),
        "tgtd",
        &format!("127.0.0.1:{}", tgtd.port),
        &tgtd.iqn,
        1,
    )
    .await;
    // Warm both: revive's block cache, tgtd's page cache.
    for q in [&a, &b] {
        fio(&q.uri, &["--rw=read", "--bs=1m", "--iodepth=4"], 3).await;
    }
    for (line, args) in LINES {
        for round in 0..repeat {
            for (who, q) in [("revive", &a), ("tgtd", &b)] {
                let (iops, mibs) = fio(&q.uri, args, runtime).await;
                println!("BENCH-ISCSI {line} {who} {round} {iops:.0} {mibs:.1}");
            }
        }
    }
    let _ = a.child.kill().await;
    let _ = b.child.kill().await;
    drop(tgtd);
    revive.stop().await;
}
