//! The target's defences with real initiators: an initiator not on the
//! allow-list is refused at login (and sees nothing in discovery), and
//! malformed PDUs close only their own connection while libiscsi's
//! `iscsi-perf` keeps reading on another.

use std::sync::Arc;
use std::time::Duration;

use revive::block::MemDevice;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::client::run_tool_for;
use crate::support::have_tool;
use crate::support::iscsi::{libiscsi_or_skip, loopback_access, InProcessTarget, TEST_INITIATORS};

const IQN: &str = "iqn.2024-01.dev.revive:wire";
const INTRUDER: &str = "iqn.2024-01.dev.revive:intruder";

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_initiator_not_on_the_list_is_refused_at_login() {
    if !libiscsi_or_skip() {
        return;
    }
    let dev = Arc::new(MemDevice::new("wire", vec![0; 8 << 20]));
    let target = InProcessTarget::start(IQN, dev, loopback_access()).await;
    let url = target.url(IQN, 0);
    let limit = Duration::from_secs(60);
    let ok = run_tool_for("iscsi-inq", &["-i", TEST_INITIATORS[0], &url], limit).await;
    assert!(ok.status.success(), "allowed initiator: {}", text(&ok));
    let refused = run_tool_for("iscsi-inq", &["-i", INTRUDER, &url], limit).await;
    assert!(
        !refused.status.success(),
        "intruder got in: {}",
        text(&refused)
    );
    assert!(
        text(&refused).to_lowercase().contains("login"),
        "{}",
        text(&refused)
    );
    let t = target.exports.all()[0].clone();
    assert_eq!(
        t.metrics.refused.load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Discovery shows the target to the allowed initiator only.
    let portal = format!("iscsi://{}", target.addr);
    let seen = text(&run_tool_for("iscsi-ls", &["-i", TEST_INITIATORS[0], &portal], limit).await);
    assert!(seen.contains(IQN), "{seen}");
    let hidden = text(&run_tool_for("iscsi-ls", &["-i", INTRUDER, &portal], limit).await);
    assert!(!hidden.contains(IQN), "{hidden}");
    target.stop().await;
}

/// A login request announcing `len` bytes of data.
fn login_header(len: u32) -> Vec<u8> {
    let mut h = vec![0u8; 48];
    h[0] = 0x43;
    h[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
    h
}

/// Sends `bytes` and waits until the server closes the connection.
async fn closed_after(addr: std::net::SocketAddr, bytes: &[u8]) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("send");
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(40), s.read_to_end(&mut sink))
        .await
        .expect("the server closes a malformed connection")
        .ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_pdus_close_only_their_connection() {
    if !libiscsi_or_skip() || !have_tool("iscsi-perf") {
        return;
    }
    let dev = Arc::new(MemDevice::new("wire", vec![7; 32 << 20]));
    let target = InProcessTarget::start(IQN, dev, loopback_access()).await;
    let url = target.url(IQN, 0);
    // A reader that runs through everything below (8 s of random reads).
    let perf = tokio::spawn({
        let url = url.clone();
        async move {
            run_tool_for(
                "iscsi-perf",
                &["-i", TEST_INITIATORS[0], "-t", "8", "-r", "-m", "16", &url],
                Duration::from_secs(60),
            )
            .await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut http = Vec::new();
    for _ in 0..8 {
        http.extend_from_slice(b"GET / HTTP/1.1\r\nHost: revive\r\n\r\n");
    }
    let mut truncated = login_header(100);
    truncated.extend_from_slice(b"InitiatorName=");
    let cases: Vec<Vec<u8>> = vec![
        http,
        // A 16 MiB data segment announced in a login.
        login_header(0xff_ffff),
        // Not key=value text.
        {
            let mut p = login_header(16);
            p.extend_from_slice(b"no equals sign\0\0");
            p
        },
        // Random bytes.
        (0..4096u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect(),
    ];
    for bytes in &cases {
        closed_after(target.addr, bytes).await;
    }
    // A login cut short: closed by the login timeout or our close; either
    // way the server goes on.
    drop(
        TcpStream::connect(target.addr)
            .await
            .expect("connect")
            .write_all(&truncated)
            .await,
    );
    let perf = perf.await.expect("iscsi-perf task");
    assert!(perf.status.success(), "iscsi-perf: {}", text(&perf));
    let again = run_tool_for(
        "iscsi-inq",
        &["-i", TEST_INITIATORS[1], &url],
        Duration::from_secs(60),
    )
    .await;
    assert!(again.status.success(), "{}", text(&again));
    target.stop().await;
}
