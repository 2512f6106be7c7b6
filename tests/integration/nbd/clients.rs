//! Real NBD clients against `revive serve`: what they list, map and copy,
//! and what the server refuses.

use std::net::SocketAddr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::repo_objects;
use crate::support::nbd::*;
use crate::support::server::{ReviveServer, ServerSpec};
use crate::support::vm::SampleVm;
use crate::support::*;

const MIB: u64 = 1 << 20;

/// A metric's value for export `export`, 0 when absent.
fn metric(text: &str, name: &str, export: &str) -> u64 {
    let prefix = format!("{name}{{export=\"{export}\",protocol=\"nbd\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map_or(0, |v| v.trim().parse().expect("metric value"))
}

/// Acceptance: `nbdinfo` lists the export with its size and `--map` shows
/// the backup's holes; `nbdcopy` of the export equals the backed-up disk
/// byte for byte (reading only the data: it skips the holes), and
/// `qemu-img compare` agrees. The repository is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_lists_and_maps_and_nbdcopy_copies_the_backed_up_disk() {
    if !nbd_peers_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = init_repo(tmp.path(), None);
    let vm = SampleVm::create(&tmp.path().join("src"), "web01", 40 * MIB, 17);
    backup_json(&repo, &vm.dir, None);
    let repo_before = repo_objects(&repo);
    let server = ReviveServer::start(
        &tmp.path().join("server"),
        ServerSpec::new(&repo).with_api().block_export(
            "web01",
            "web01@latest",
            None,
            &["127.0.0.1"],
        ),
    );
    let url = server.nbd_url("web01");
    let port = server.nbd_port.expect("nbd port");

    let list = tool_ok("nbdinfo", &["--list", &format!("nbd://127.0.0.1:{port}")]).await;
    assert!(list.contains("export=\"web01\""), "{list}");
    assert!(
        list.contains(&format!("export-size: {}", vm.disk_size)),
        "{list}"
    );
    let info: Value =
        serde_json::from_str(&tool_ok("nbdinfo", &["--json", &url]).await).expect("nbdinfo --json");
    let export = &info["exports"][0];
    assert_eq!(export["export-size"], vm.disk_size, "{info:#}");
    assert_eq!(export["can_multi_conn"], true, "{info:#}");
    assert_eq!(export["can_fua"], true, "{info:#}");

    let map = map(&url).await;
    assert_eq!(
        map,
        expected_map(&vm.flat(), MIB),
        "block status differs from the backup's holes"
    );
    let holes: u64 = map.iter().filter(|l| l.2 == 3).map(|l| l.1).sum();
    assert!(
        holes >= 4 * MIB,
        "the sample disk should have zero chunks: {map:?}"
    );

    let before = server.metrics().await;
    let copy = tmp.path().join("copy.img");
    tool_ok("nbdcopy", &[&url, copy.to_str().expect("utf8")]).await;
    assert_eq!(sha256_file(&copy), sha256_file(&vm.flat()));
    let after = server.metrics().await;
    let read = metric(&after, "revive_block_read_bytes_total", "web01")
        - metric(&before, "revive_block_read_bytes_total", "web01");
    assert!(
        read > 0 && read <= vm.disk_size - holes,
        "nbdcopy read {read} bytes of {} ({holes} in holes): it should skip them",
        vm.disk_size
    );
    let flat = vm.flat();
    tool_ok(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            &url,
            flat.to_str().expect("utf8"),
        ],
    )
    .await;
    assert!(
        metric(&after, "revive_block_requests_total", "web01") > 0,
        "{after}"
    );
    assert_eq!(
        metric(&after, "revive_block_errors_total", "web01"),
        0,
        "{after}"
    );
    assert_eq!(repo_objects(&repo), repo_before, "the repository changed");
}

/// A raw client from `source` (any 127/8 address is loopback): the reply
/// type of NBD_OPT_GO on `export`.
async fn go_from(source: [u8; 4], server: SocketAddr, export: &str) -> u32 {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(SocketAddr::from((source, 0)))
        .expect("bind source");
    let mut s = sock.connect(server).await.expect("connect");
    let mut greeting = [0u8; 18];
    s.read_exact(&mut greeting).await.expect("greeting");
    s.write_u32(3).await.expect("client flags");
    let mut opt = Vec::new();
    opt.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    opt.extend_from_slice(&7u32.to_be_bytes());
    opt.extend_from_slice(&(6 + export.len() as u32).to_be_bytes());
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    s.write_all(&opt).await.expect("NBD_OPT_GO");
    loop {
        let mut head = [0u8; 20];
        s.read_exact(&mut head).await.expect("option reply");
        let kind = u32::from_be_bytes(head[12..16].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(head[16..20].try_into().expect("4 bytes"));
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await.expect("reply data");
        if kind != 3 {
            return kind;
        }
    }
}

/// Acceptance: a client not on the allow-list is refused at option
/// negotiation (NBD_REP_ERR_POLICY; the export is not listed to it), one
/// on it is admitted; garbage, oversized options and idle connections on
/// the port never kill the server, which keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allow_list_refuses_at_negotiation_and_garbage_never_kills_the_server() {
    if !nbd_peers_or_skip() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let repo = init_repo(tmp.path(), None);
    let vm = SampleVm::create(&tmp.path().join("src"), "db01", 8 * MIB, 5);
    backup_json(&repo, &vm.dir, None);
    let mut server = ReviveServer::start(
        &tmp.path().join("server"),
        ServerSpec::new(&repo)
            .with_api()
            .block_export("open", "db01@latest", None, &["127.0.0.1"])
            .block_export("secret", "db01@latest", None, &["127.0.0.2"]),
    );
    let port = server.nbd_port.expect("nbd port");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));

    let refused = tool("nbdinfo", &[&server.nbd_url("secret")]).await;
    assert!(
        !refused.status.success(),
        "a client off the allow-list got in"
    );
    // Refused at option negotiation: libnbd reports NBD_REP_ERR_POLICY as
    // an error reply to NBD_OPT_GO (the raw client below checks the code).
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("opt_go") && why.contains("secret"), "{why}");
    assert!(
        server.log().contains("not on the export's allow-list"),
        "{}",
        server.log()
    );
    let list = tool_ok("nbdinfo", &["--list", &format!("nbd://127.0.0.1:{port}")]).await;
    assert!(
        list.contains("\"open\"") && !list.contains("secret"),
        "{list}"
    );
    assert_eq!(
        go_from([127, 0, 0, 2], addr, "secret").await,
        1,
        "NBD_REP_ACK expected"
    );
    assert_eq!(
        go_from([127, 0, 0, 1], addr, "secret").await,
        0x8000_0002,
        "NBD_REP_ERR_POLICY expected"
    );

    // Idle connections hold nothing up; garbage of every shape is dropped.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
    }
    let mut rng = StdRng::seed_from_u64(99);
    for round in 0..40 {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let mut junk = vec![0u8; rng.random_range(1..20_000)];
        rng.fill_bytes(&mut junk);
        if round % 4 == 1 {
            // A valid greeting, then an option claiming 4 GiB of data.
            junk = [
                &3u32.to_be_bytes()[..],
                &0x4948_4156_454f_5054u64.to_be_bytes(),
                &7u32.to_be_bytes(),
                &u32::MAX.to_be_bytes(),
            ]
            .concat();
        }
        let _ = s.write_all(&junk).await;
        let mut sink = vec![0u8; 4096];
        let drained = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                match s.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(
            drained.is_ok(),
            "garbage round {round}: connection left open"
        );
    }
    assert!(server.running(), "the server died:\n{}", server.log());
    let copy = tmp.path().join("copy.img");
    tool_ok(
        "nbdcopy",
        &[&server.nbd_url("open"), copy.to_str().expect("utf8")],
    )
    .await;
    assert_eq!(sha256_file(&copy), sha256_file(&vm.flat()));
    drop(idle);
    let metrics = server.metrics().await;
    assert!(
        metric(&metrics, "revive_block_refused_total", "secret") >= 2,
        "{metrics}"
    );
    server.stop();
}
