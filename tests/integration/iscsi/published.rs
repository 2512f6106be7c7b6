//! A restore point's disk served over iSCSI from the real datastore: what
//! libiscsi's tools report, a `qemu-img convert` of `iscsi://` compared with
//! the backed-up disk, and a TCG guest booting from `iscsi://`. The
//! repository is never written.

use std::time::Duration;

use revive::block::iscsi::Access;

use crate::support::client::run_tool_for;
use crate::support::iscsi::{libiscsi_or_skip, InProcessTarget, PublishedDisk};
use crate::support::qemu::{
    boot_image, fat_file_sha256, qemu_vm_peers_or_skip, wrote, Serial, MARKER,
};
use crate::support::vm::SampleVm;
use crate::support::*;

const IQN: &str = "iqn.2024-01.dev.revive:db01";

/// Loopback, any initiator name (qemu's and libiscsi's tools differ).
fn anyone_local() -> Access {
    Access {
        allowed_clients: vec![std::net::Ipv4Addr::LOCALHOST.into()],
        allowed_initiators: Vec::new(),
        chap: None,
    }
}

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tools_report_the_lun_and_qemu_img_copies_the_backed_up_disk() {
    if !libiscsi_or_skip() || !qemu_has_iscsi_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let vm = SampleVm::create(&tmp.path().join("src"), "db01", 40 << 20, 14);
    let repo = init_repo(tmp.path(), None);
    backup_json(&repo, &vm.dir, None);
    let published = PublishedDisk::open(
        &repo,
        &tmp.path().join("ds"),
        "db01@latest",
        "db01",
        "db01-flat.vmdk",
    )
    .await;
    // Taken once published: publishing pins the restore point.
    let before = snapshot_tree(&repo);
    let target = InProcessTarget::start(IQN, published.disk.clone(), anyone_local()).await;
    let portal = format!("iscsi://{}", target.addr);
    let url = target.url(IQN, 0);

    let ls = run_tool_for("iscsi-ls", &["-s", &portal], Duration::from_secs(60)).await;
    let ls = text(&ls);
    assert!(
        ls.contains(&format!("Target:{IQN} Portal:{},1", target.addr)),
        "{ls}"
    );
    // iscsi-ls sizes from the last LBA: 40 MiB shows as 39M (tgtd's 64 MiB as 63M).
    assert!(
        ls.contains("Lun:0") && ls.contains("DIRECT_ACCESS (Size:39M)"),
        "{ls}"
    );

    let inq = text(&run_tool_for("iscsi-inq", &[&url], Duration::from_secs(60)).await);
    assert!(
        inq.contains("Vendor:REVIVE") && inq.contains("Peripheral Device Type:DIRECT_ACCESS"),
        "{inq}"
    );
    let serial = text(
        &run_tool_for(
            "iscsi-inq",
            &["-e", "1", "-c", "128", &url],
            Duration::from_secs(60),
        )
        .await,
    );
    assert!(
        serial.contains(&hex::encode(revive::block::BlockDevice::stable_id(
            &*published.disk
        ))),
        "{serial}"
    );

    let cap = text(&run_tool_for("iscsi-readcapacity16", &[&url], Duration::from_secs(60)).await);
    assert!(
        cap.contains(&format!("Total size:{}", 40u64 << 20)),
        "{cap}"
    );
    assert!(cap.contains("LOGICAL BLOCK LENGTH IN BYTES:512"), "{cap}");

    let copy = tmp.path().join("copy.img");
    let out = run_tool_for(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &url,
            copy.to_str().expect("utf8"),
        ],
        Duration::from_secs(300),
    )
    .await;
    assert!(out.status.success(), "qemu-img convert: {}", text(&out));
    assert_eq!(
        sha256_file(&copy),
        sha256_file(&vm.flat()),
        "iscsi:// equals the backed-up disk"
    );

    target.stop().await;
    drop(published);
    assert_eq!(snapshot_tree(&repo), before, "the repository changed");
}

/// Whether qemu-img has the iscsi block driver; else a skip.
fn qemu_has_iscsi_or_skip() -> bool {
    let ok = have_tool("qemu-img")
        && std::process::Command::new("qemu-img")
            .arg("--help")
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .any(|w| w == "iscsi")
            })
            .unwrap_or(false);
    if !ok {
        skip_missing_peer("qemu-img with the iscsi driver (qemu-block-extra)");
    }
    ok
}

/// The tiny boot image backed up, served over iSCSI from the datastore, and
/// booted by a TCG guest from `iscsi://`: the guest's init reads a known
/// file and writes one, which reads back through the target; the
/// repository is unchanged afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcg_guest_boots_from_iscsi() {
    if !qemu_vm_peers_or_skip() || !qemu_has_iscsi_or_skip() {
        return;
    }
    let image = boot_image();
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = init_repo(tmp.path(), None);
    backup_json(&repo, &image.vm_dir, Some("tiny"));
    let published = PublishedDisk::open(
        &repo,
        &tmp.path().join("ds"),
        "tiny@latest",
        "tiny",
        "tiny-flat.vmdk",
    )
    .await;
    let before = snapshot_tree(&repo);
    let target = InProcessTarget::start(IQN, published.disk.clone(), anyone_local()).await;
    let url = target.url(IQN, 0);
    let run = tmp.path().join("run");
    std::fs::create_dir_all(&run).expect("run folder");
    let serial = Serial::in_dir(&run);
    let mut qemu = tokio::process::Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg",
            "-m",
            "128",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-drive")
        .arg(format!(
            "file={url},format=raw,if=none,id=d0,cache=writeback"
        ))
        .args(["-device", "virtio-blk-pci,drive=d0,bootindex=0"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=s0,path={},server=on,wait=off,logfile={}",
            serial.socket.display(),
            serial.log.display()
        ))
        .args(["-serial", "chardev:s0"])
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn qemu");
    let wait = |prefix: &'static str, limit: u64| {
        let serial = Serial::in_dir(&run);
        tokio::task::spawn_blocking(move || serial.wait_line(prefix, 0, Duration::from_secs(limit)))
    };
    assert!(wait(MARKER, 300).await.expect("boot").starts_with(MARKER));
    let known = wait("REVIVE-KNOWN", 120).await.expect("known");
    assert_eq!(known, format!("REVIVE-KNOWN {}", image.known_sha256));
    // The guest wrote and fsynced 1 MiB through the target: it reads back
    // from the write cache, inside the FAT file system.
    let (file, hash) = wrote(&wait("REVIVE-WROTE", 120).await.expect("wrote"));
    wait("REVIVE-READY", 60).await.expect("ready");
    let _ = qemu.kill().await;
    let copy = tmp.path().join("after.img");
    let out = run_tool_for(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &url,
            copy.to_str().expect("utf8"),
        ],
        Duration::from_secs(300),
    )
    .await;
    assert!(out.status.success(), "qemu-img convert: {}", text(&out));
    assert_eq!(fat_file_sha256(&copy, &file), hash);
    assert_eq!(fat_file_sha256(&copy, "known.bin"), image.known_sha256);
    target.stop().await;
    drop(published);
    assert_eq!(snapshot_tree(&repo), before, "the repository changed");
}
