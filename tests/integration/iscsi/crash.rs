//! SYNCHRONIZE CACHE is the write cache journal's sync: writes QEMU's iscsi
//! driver flushed survive `kill -9` of the server. The server is this test
//! binary re-run as a child (`serve_child`): the datastore of a published
//! restore point and the iSCSI target over its disk, in one process, as
//! `revive serve` runs them.

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use revive::block::iscsi::Access;

use crate::support::client::run_tool_for;
use crate::support::iscsi::{InProcessTarget, PublishedDisk};
use crate::support::vm::SampleVm;
use crate::support::*;

const IQN: &str = "iqn.2024-01.dev.revive:crash";
/// Tells the child where the repository and the datastore state are.
const CHILD: &str = "REVIVE_ISCSI_CRASH_CHILD";
/// Writes of 64 KiB, each at its own MiB, each with its own pattern.
const WRITES: u64 = 64;

/// The server side, run only as the child of the test below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the server of flushed_writes_survive_kill_9, run as its child"]
async fn serve_child() {
    let Ok(spec) = std::env::var(CHILD) else {
        return;
    };
    let (repo, dir) = spec.split_once('\n').expect("repo and dir");
    let published = PublishedDisk::open(
        Path::new(repo),
        Path::new(dir),
        "db01@latest",
        "db01",
        "db01-flat.vmdk",
    )
    .await;
    let access = Access {
        allowed_clients: vec![std::net::Ipv4Addr::LOCALHOST.into()],
        allowed_initiators: Vec::new(),
        chap: None,
    };
    let target = InProcessTarget::start(IQN, published.disk.clone(), access).await;
    println!("ISCSI-PORT {}", target.addr.port());
    std::future::pending::<()>().await;
}

/// Starts the child server; returns it and its port.
fn start_child(repo: &Path, dir: &Path) -> (Child, u16) {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary"));
    cmd.args([
        "--exact",
        "iscsi::crash::serve_child",
        "--ignored",
        "--nocapture",
    ])
    .env(CHILD, format!("{}\n{}", repo.display(), dir.display()))
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    // SAFETY: prctl is async-signal-safe; nothing else runs in pre_exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("spawn server child");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let port = loop {
        let line = lines
            .next()
            .expect("the child printed its port")
            .expect("read child");
        if let Some(p) = line.split("ISCSI-PORT ").nth(1) {
            break p.trim().parse().expect("port");
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, port)
}

fn pattern(i: u64) -> u8 {
    (i % 250) as u8 + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_writes_survive_kill_9() {
    if !have_tool("qemu-io") {
        skip_missing_peer("qemu-io (qemu-utils)");
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let vm = SampleVm::create(&tmp.path().join("src"), "db01", (WRITES + 2) << 20, 9);
    let repo = init_repo(tmp.path(), None);
    backup_json(&repo, &vm.dir, None);
    let ds = tmp.path().join("ds");
    let (mut child, port) = start_child(&repo, &ds);
    let url = format!("iscsi://127.0.0.1:{port}/{IQN}/0");
    // Each write is flushed (SYNCHRONIZE CACHE) before the next is sent.
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for i in 0..WRITES {
        args.push("-c".into());
        args.push(format!("write -P {} {} 64k", pattern(i), (i << 20) + 4096));
        args.push("-c".into());
        args.push("flush".into());
    }
    args.push(url);
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_tool_for("qemu-io", &argv, Duration::from_secs(300)).await;
    assert!(
        out.status.success(),
        "qemu-io: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // kill -9 the moment the last flush is answered.
    child.kill().expect("kill -9");
    child.wait().expect("wait");

    let (mut child, port) = start_child(&repo, &ds);
    let url = format!("iscsi://127.0.0.1:{port}/{IQN}/0");
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
    assert!(
        out.status.success(),
        "qemu-img: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = child.kill();
    let _ = child.wait();
    let after = std::fs::read(&copy).expect("read copy");
    let before = std::fs::read(vm.flat()).expect("read disk");
    let mut lost = 0;
    for i in 0..WRITES {
        let at = ((i << 20) + 4096) as usize;
        if after[at..at + 65536].iter().any(|b| *b != pattern(i)) {
            lost += 1;
        }
        // What no write touched is still the backup.
        assert_eq!(
            after[(i << 20) as usize..at],
            before[(i << 20) as usize..at]
        );
    }
    println!("iscsi kill -9: {WRITES} flushed writes, {lost} lost");
    assert_eq!(lost, 0, "flushed writes lost after kill -9");
}
