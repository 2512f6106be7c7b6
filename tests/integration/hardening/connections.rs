//! Item 2: connections from anyone. The allow-list used to be checked per
//! call only and connections never timed out: 1,100 idle connections from
//! a host that may not mount filled the server's descriptors and locked the
//! ESXi hosts out, and a record marker claiming 4 MiB reserved 4 MiB.

use std::net::Ipv4Addr;
use std::time::Duration;

use futures::future::join_all;
use nfs3_client::nfs3_types::nfs3;
use nfs3_client::tokio::TokioIo;
use nfs3_client::PortmapperClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use super::{connect_from, raise_own_nofile};
use crate::datastore::{Fixture, MIB};
use crate::support::client::*;

/// Idle connections each flooding address opens, per port.
const FLOOD: usize = 1100;

/// The deadline of an allowed client's calls during the floods.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);

/// An allowed client (127.0.0.1) mounts `/revive` and gets the root's
/// attributes, each call answered within [`ANSWER_WITHIN`].
async fn allowed_client_is_answered(f: &Fixture, when: &str) {
    let conn = timeout(
        ANSWER_WITHIN,
        mount_at(f.server.nfs_port, f.server.mount_port, "/revive"),
    )
    .await
    .unwrap_or_else(|_| panic!("{when}: MNT not answered within {ANSWER_WITHIN:?}"))
    .unwrap_or_else(|e| panic!("{when}: MNT failed: {e:?}"));
    let root = conn.root_nfs_fh3();
    let mut c = conn.into_nfs3_client();
    let attr = timeout(ANSWER_WITHIN, getattr(&mut c, &root))
        .await
        .unwrap_or_else(|_| panic!("{when}: GETATTR not answered within {ANSWER_WITHIN:?}"));
    assert!(attr.is_ok(), "{when}: GETATTR {attr:?}");
}

/// Opens `n` connections from `from` to `port` at once; returns those that
/// connected within two seconds (a server that stopped accepting leaves
/// them in its backlog, or refuses them).
async fn open_many(from: Ipv4Addr, port: u16, n: usize) -> Vec<TcpStream> {
    let tries = (0..n).map(|_| timeout(Duration::from_secs(2), connect_from(from, port)));
    join_all(tries)
        .await
        .into_iter()
        .filter_map(|r| r.ok().and_then(Result::ok))
        .collect()
}

/// A record marker claiming 4 MiB (last fragment), and the first bytes.
fn huge_record_start() -> Vec<u8> {
    let mut out = (0x8000_0000u32 | (4 << 20)).to_be_bytes().to_vec();
    out.extend_from_slice(&[0x5a; 100]);
    out
}

/// A NULL call to NFS v3 as one record.
fn nfs_null_call(xid: u32) -> Vec<u8> {
    let words = [xid, 0, 2, 100_003, 3, 0, 0, 0, 0, 0];
    let mut out = (0x8000_0000u32 | (words.len() as u32 * 4))
        .to_be_bytes()
        .to_vec();
    for w in words {
        out.extend_from_slice(&w.to_be_bytes());
    }
    out
}

/// Whether the server closed `s` (end of stream or reset) within `limit`,
/// without sending a byte.
async fn closed_without_reply(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 64];
    match timeout(limit, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

/// Floods from hosts that are on no allow-list, under a 1024 descriptor
/// limit the server cannot raise: 1,100 idle connections to each of the
/// NFS, MOUNT and portmapper ports, then connections that send a record
/// marker claiming 4 MiB. Throughout, the allowed client's MNT and GETATTR
/// are answered within a second; the portmapper still answers a host on no
/// allow-list; a call from such a host on the NFS port is not even read;
/// the server's descriptors stay under its limit and its memory does not
/// grow with the claimed record sizes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_from_other_hosts_never_lock_out_an_allowed_client() {
    raise_own_nofile();
    let mut f = Fixture::with("flood01", 2 * MIB, 84, |mut s| {
        s.portmap = true;
        s.nofile(1024, 1024)
    });
    let portmap = f.server.portmap_port.expect("portmapper port");
    let (nfs, mount) = (f.server.nfs_port, f.server.mount_port);
    allowed_client_is_answered(&f, "before the floods").await;
    let rss_before = f.server.proc_status("VmRSS");

    let mut held = Vec::new();
    let floods = [
        (Ipv4Addr::new(127, 0, 0, 2), nfs, "NFS"),
        (Ipv4Addr::new(127, 0, 0, 2), mount, "MOUNT"),
        (Ipv4Addr::new(127, 0, 0, 3), portmap, "portmapper"),
    ];
    for (from, port, what) in floods {
        for batch in 0..FLOOD / 100 {
            held.extend(open_many(from, port, 100).await);
            allowed_client_is_answered(&f, &format!("{what} flood, batch {batch}")).await;
        }
    }
    // Half-sent records claiming 4 MiB, on the NFS and portmapper ports.
    let from = Ipv4Addr::new(127, 0, 0, 4);
    for port in [nfs, portmap] {
        for s in open_many(from, port, 300).await {
            let mut s = s;
            // The server may have closed it already: nothing to check here.
            let _ = s.write_all(&huge_record_start()).await;
            held.push(s);
        }
        allowed_client_is_answered(&f, "4 MiB record markers").await;
    }

    // The portmapper answers a host on no allow-list.
    let stream = timeout(
        ANSWER_WITHIN,
        connect_from(Ipv4Addr::new(127, 0, 0, 5), portmap),
    )
    .await
    .expect("portmapper connect in time")
    .expect("portmapper connect");
    let mut pm = PortmapperClient::new(TokioIo::new(stream));
    let port = timeout(ANSWER_WITHIN, pm.getport(100_003, 3, 6))
        .await
        .expect("GETPORT answered in time")
        .expect("GETPORT");
    assert_eq!(port, nfs, "GETPORT of NFS v3 over TCP");

    // The NFS port does not read a byte from a host on no allow-list.
    let mut s = connect_from(Ipv4Addr::new(127, 0, 0, 6), nfs)
        .await
        .expect("connect");
    let _ = s.write_all(&nfs_null_call(7)).await;
    assert!(
        closed_without_reply(&mut s, Duration::from_secs(5)).await,
        "a NULL call from a host on no allow-list was answered"
    );

    let fds = f.server.open_fds();
    assert!(fds < 1000, "{fds} descriptors open under the floods");
    let rss = f.server.proc_status("VmRSS");
    assert!(
        rss < rss_before + 64 * 1024,
        "memory grew from {rss_before} kB to {rss} kB under the floods"
    );
    allowed_client_is_answered(&f, "after the floods").await;
    drop(held);
    f.assert_repo_untouched();
}

/// An allowed client's connection that sends nothing is closed after
/// `idle_timeout_secs`, one that stops in the middle of a record after
/// `record_timeout_secs`; a client that keeps calling keeps its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_half_sent_connections_are_closed() {
    let f = Fixture::with("idle01", MIB, 85, |s| {
        s.nfs("idle_timeout_secs = 2\nrecord_timeout_secs = 2")
    });
    let nfs = f.server.nfs_port;
    let mut idle = TcpStream::connect(("127.0.0.1", nfs))
        .await
        .expect("connect");
    let mut half = TcpStream::connect(("127.0.0.1", nfs))
        .await
        .expect("connect");
    let call = nfs_null_call(9);
    half.write_all(&call[..10]).await.expect("send half a call");
    let mut busy = client_at(nfs).await;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        busy.null().await.expect("NULL on a connection in use");
    }
    assert!(
        closed_without_reply(&mut idle, Duration::from_secs(10)).await,
        "an idle connection was not closed"
    );
    assert!(
        closed_without_reply(&mut half, Duration::from_secs(10)).await,
        "a half-sent record was not timed out"
    );
    let root = mount_at(nfs, f.server.mount_port, "/revive")
        .await
        .expect("mount")
        .root_nfs_fh3();
    let attr = busy
        .getattr(&nfs3::GETATTR3args { object: root })
        .await
        .expect("the busy connection is still open");
    assert!(matches!(attr, nfs3::Nfs3Result::Ok(_)), "{attr:?}");
}
