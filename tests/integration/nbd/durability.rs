//! Acceptance: writes made durable by NBD_CMD_FLUSH or the FUA flag survive
//! `kill -9` of revive (the same journal sync as an NFS COMMIT).

use super::repo_objects;
use crate::support::nbd::*;
use crate::support::server::{ReviveServer, ServerSpec};
use crate::support::vm::SampleVm;
use crate::support::*;

const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
/// Blocks written then covered by one flush.
const FLUSHED: u64 = 96;
/// Blocks written with FUA after that flush (no flush covers them).
const FUA: u64 = 32;

/// Distinct block `i` of the test, spread over the disk (both backup data
/// and holes), and its fill byte.
fn block(i: u64, blocks: u64) -> (u64, u8) {
    ((i * 977 + 13) % blocks * BLOCK, (i % 251) as u8 + 1)
}

/// `qemu-io` writes blocks (some of them 512-byte pieces, copied on write
/// in the cache), flushes, writes more with FUA; revive is killed with
/// SIGKILL and restarted; every one of them reads back: 0 lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_and_fua_writes_survive_kill_9() {
    if !nbd_peers_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = init_repo(tmp.path(), None);
    let vm = SampleVm::create(&tmp.path().join("src"), "app01", 24 * MIB, 23);
    backup_json(&repo, &vm.dir, None);
    let repo_before = repo_objects(&repo);
    let mut server = ReviveServer::start(
        &tmp.path().join("server"),
        ServerSpec::new(&repo).block_export("app01", "app01@latest", None, &["127.0.0.1"]),
    );
    let blocks = vm.disk_size / BLOCK;
    let write = |i: u64, fua: bool| {
        let (offset, fill) = block(i, blocks);
        let flag = if fua { "-f " } else { "" };
        if i.is_multiple_of(3) {
            // Two sectors in the middle of the block: copy-on-write.
            format!("write {flag}-P {fill} {} 1k", offset + 1024)
        } else {
            format!("write {flag}-P {fill} {offset} 4k")
        }
    };
    let mut commands: Vec<String> = (0..FLUSHED).map(|i| write(i, false)).collect();
    commands.push("flush".into());
    commands.extend((FLUSHED..FLUSHED + FUA).map(|i| write(i, true)));
    qemu_io(&server.nbd_url("app01"), &commands).await;

    server.kill9();
    server.restart();
    let copy = tmp.path().join("after.img");
    tool_ok(
        "nbdcopy",
        &[&server.nbd_url("app01"), copy.to_str().expect("utf8")],
    )
    .await;
    let after = std::fs::read(&copy).expect("read copy");
    let mut expected = std::fs::read(vm.flat()).expect("read disk");
    let mut lost = Vec::new();
    for i in 0..FLUSHED + FUA {
        let (offset, fill) = block(i, blocks);
        let range = if i.is_multiple_of(3) {
            (offset + 1024) as usize..(offset + 2048) as usize
        } else {
            offset as usize..(offset + BLOCK) as usize
        };
        expected[range.clone()].fill(fill);
        if after[range.clone()].iter().any(|b| *b != fill) {
            lost.push((i, range.start));
        }
    }
    println!(
        "kill -9: {} flushed + {} FUA writes, {} lost",
        FLUSHED,
        FUA,
        lost.len()
    );
    assert!(lost.is_empty(), "writes lost after kill -9: {lost:?}");
    // Nothing else changed: copy-on-write kept the rest of every block.
    assert!(after == expected, "bytes other than the writes changed");
    assert_eq!(repo_objects(&repo), repo_before, "the repository changed");
}

/// Multi-conn, as advertised: writes answered on one connection (no FUA,
/// no flush there, the connection still open) are made durable by a flush
/// on another connection, and survive `kill -9` (without that flush they
/// are lost: checked by hand).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_on_one_connection_covers_writes_answered_on_another() {
    if !nbd_peers_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = init_repo(tmp.path(), None);
    let vm = SampleVm::create(&tmp.path().join("src"), "app02", 8 * MIB, 29);
    backup_json(&repo, &vm.dir, None);
    let mut server = ReviveServer::start(
        &tmp.path().join("server"),
        ServerSpec::new(&repo).block_export("app02", "app02@latest", None, &["127.0.0.1"]),
    );
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], server.nbd_port.expect("nbd port")));
    let mut writer = RawNbd::connect(addr, "app02").await;
    let mut flusher = RawNbd::connect(addr, "app02").await;
    let blocks: Vec<(u64, u8)> = (0..40u64)
        .map(|i| ((i * 131 + 3) % 2048 * BLOCK, i as u8 + 1))
        .collect();
    for (offset, fill) in &blocks {
        assert_eq!(writer.write(*offset, &[*fill; BLOCK as usize]).await, 0);
    }
    assert_eq!(flusher.flush().await, 0);
    server.kill9();
    drop(writer);
    server.restart();
    let copy = tmp.path().join("after.img");
    tool_ok(
        "nbdcopy",
        &[&server.nbd_url("app02"), copy.to_str().expect("utf8")],
    )
    .await;
    let after = std::fs::read(&copy).expect("read copy");
    let lost: Vec<u64> = blocks
        .iter()
        .filter(|(offset, fill)| {
            after[*offset as usize..(*offset + BLOCK) as usize]
                .iter()
                .any(|b| b != fill)
        })
        .map(|(offset, _)| *offset)
        .collect();
    assert!(
        lost.is_empty(),
        "writes of one connection lost despite another's flush: {lost:?}"
    );
}
