//! Raw bytes on the wire: malformed input, RPC-level errors, and the
//! portmapper over TCP and UDP.

use std::time::Duration;

use nfs3_client::nfs3_types::nfs3;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::{mount, pattern};
use crate::support::client::root_cred;
use crate::support::memfs::MemFs;
use crate::support::TestServer;
use nfs3_client::tokio::TokioConnector;
use nfs3_client::Nfs3ConnectionBuilder;

fn call_record(xid: u32, prog: u32, vers: u32, proc_num: u32, args: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    for v in [xid, 0, 2, prog, vers, proc_num, 0, 0, 0, 0] {
        body.extend_from_slice(&v.to_be_bytes());
    }
    body.extend_from_slice(args);
    let mut rec = (0x8000_0000u32 | body.len() as u32).to_be_bytes().to_vec();
    rec.extend(body);
    rec
}

/// Read one reply record (without its mark).
async fn read_record(stream: &mut TcpStream) -> Vec<u8> {
    let mut mark = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut mark))
        .await
        .expect("reply in time")
        .expect("reply");
    let len = (u32::from_be_bytes(mark) & 0x7fff_ffff) as usize;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.expect("body");
    body
}

fn word(body: &[u8], i: usize) -> u32 {
    u32::from_be_bytes([
        body[4 * i],
        body[4 * i + 1],
        body[4 * i + 2],
        body[4 * i + 3],
    ])
}

/// Read one reply; returns (xid, accept_stat) of an accepted reply.
async fn read_reply(stream: &mut TcpStream) -> (u32, u32) {
    let body = read_record(stream).await;
    assert_eq!(word(&body, 1), 1, "REPLY");
    assert_eq!(word(&body, 2), 0, "MSG_ACCEPTED");
    (word(&body, 0), word(&body, 5))
}

/// Garbage on the wire is answered or closes only its own connection; the
/// server keeps serving everyone else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_input_does_not_kill_the_server() {
    let fs = MemFs::new();
    let s = TestServer::start(fs.clone()).await;
    let mut raw = TcpStream::connect(s.nfs_addr()).await.expect("connect");

    // Not a call (msg_type 7): ignored, no reply, connection stays.
    raw.write_all(&[0x80, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 7])
        .await
        .expect("send");
    // Unknown program, unknown procedure, wrong version, truncated args.
    raw.write_all(&call_record(10, 400_000, 1, 0, &[]))
        .await
        .expect("send");
    assert_eq!(read_reply(&mut raw).await, (10, 1), "PROG_UNAVAIL");
    raw.write_all(&call_record(11, 100_003, 3, 99, &[]))
        .await
        .expect("send");
    assert_eq!(read_reply(&mut raw).await, (11, 3), "PROC_UNAVAIL");
    raw.write_all(&call_record(12, 100_003, 3, 1, &[0, 0, 0, 200]))
        .await
        .expect("send");
    assert_eq!(read_reply(&mut raw).await, (12, 4), "GARBAGE_ARGS");
    raw.write_all(&call_record(13, 100_003, 2, 0, &[]))
        .await
        .expect("send");
    assert_eq!(read_reply(&mut raw).await, (13, 2), "PROG_MISMATCH");
    // A bad handle is an NFS error, not an RPC one.
    raw.write_all(&call_record(14, 100_003, 3, 1, &[0, 0, 0, 4, 1, 2, 3, 4]))
        .await
        .expect("send");
    assert_eq!(read_reply(&mut raw).await, (14, 0), "accepted");

    // A record claiming 2 GiB: the server closes this connection.
    raw.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3])
        .await
        .expect("send");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), raw.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "connection closed");

    // Pure noise on another connection, then a hang-up mid-record.
    let mut noise = TcpStream::connect(s.nfs_addr()).await.expect("connect");
    noise.write_all(&pattern(100_000, 5)).await.ok();
    drop(noise);
    let mut half = TcpStream::connect(s.nfs_addr()).await.expect("connect");
    half.write_all(&[0x80, 0, 1, 0, 1, 2]).await.expect("send");
    drop(half);

    // A real client still works.
    let conn = mount(&s, "/export").await.expect("mount after garbage");
    let root = conn.root_nfs_fh3();
    let mut c = conn.into_nfs3_client();
    c.null().await.expect("null");
    c.getattr(&nfs3::GETATTR3args { object: root })
        .await
        .expect("rpc")
        .unwrap();
    s.stop().await;
}

/// The portmapper answers GETPORT for NFS and MOUNT v3 over TCP and UDP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portmapper_over_tcp_and_udp() {
    let fs = MemFs::new();
    let s = TestServer::start(fs.clone()).await;
    // TCP, through nfs3_client's own portmapper lookup.
    let conn = Nfs3ConnectionBuilder::new(TokioConnector, "127.0.0.1", "/export")
        .portmapper_port(s.portmap_port)
        .connect_from_privileged_port(false)
        .credential(root_cred())
        .mount()
        .await
        .expect("mount via portmapper");
    assert_eq!(
        (conn.mount_port, conn.nfs3_port),
        (s.mount_port, s.nfs_port)
    );
    drop(conn);

    // UDP, raw: GETPORT(100003, 3, TCP).
    let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let mut call = call_record(77, 100_000, 2, 3, &[]);
    call.drain(..4); // no record mark over UDP
    for v in [100_003u32, 3, 6, 0] {
        call.extend_from_slice(&v.to_be_bytes());
    }
    udp.send_to(&call, ("127.0.0.1", s.portmap_port))
        .await
        .expect("send");
    let mut buf = [0u8; 256];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), udp.recv_from(&mut buf))
        .await
        .expect("udp reply in time")
        .expect("recv");
    assert_eq!(n, 28);
    assert_eq!(&buf[..4], &77u32.to_be_bytes());
    assert_eq!(&buf[24..28], &u32::from(s.nfs_port).to_be_bytes());
    s.stop().await;
}

/// Many calls written at once on one connection are all answered (in any
/// order: each reply carries its xid), and the counters see them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_calls_are_all_answered() {
    use std::sync::atomic::Ordering;

    let fs = MemFs::new();
    fs.add_file(crate::support::memfs::ROOT, "f", pattern(1 << 20, 1));
    let s = TestServer::start(fs.clone()).await;
    let conn = mount(&s, "/export").await.expect("mount");
    let root = conn.root_nfs_fh3();
    let mut c = conn.into_nfs3_client();
    let fh = super::lookup(&mut c, &root, "f").await.expect("lookup");

    let mut raw = TcpStream::connect(s.nfs_addr()).await.expect("connect");
    let mut batch = Vec::new();
    let n = 200u32;
    for xid in 1000..1000 + n {
        // READ(fh, offset, 4096) for even xids, GETATTR(fh) for odd ones.
        let mut args = Vec::new();
        args.extend_from_slice(&(fh.data.len() as u32).to_be_bytes());
        args.extend_from_slice(&fh.data);
        if xid % 2 == 0 {
            args.extend_from_slice(&(u64::from(xid) * 4096).to_be_bytes());
            args.extend_from_slice(&4096u32.to_be_bytes());
            batch.extend(call_record(xid, 100_003, 3, 6, &args));
        } else {
            batch.extend(call_record(xid, 100_003, 3, 1, &args));
        }
    }
    raw.write_all(&batch).await.expect("send");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..n {
        let (xid, stat) = read_reply(&mut raw).await;
        assert_eq!(stat, 0);
        assert!(seen.insert(xid), "xid {xid} answered twice");
    }
    assert_eq!(seen.len(), n as usize);
    assert_eq!(seen.first().copied(), Some(1000));
    let m = &s.metrics;
    let reads = m.proc_stats(6).expect("read").calls.load(Ordering::Relaxed);
    let getattrs = m
        .proc_stats(1)
        .expect("getattr")
        .calls
        .load(Ordering::Relaxed);
    assert_eq!(reads, u64::from(n / 2));
    assert!(getattrs >= u64::from(n / 2));
    assert!(m.connections_accepted.load(Ordering::Relaxed) >= 3);
    s.stop().await;
}

/// A retransmitted REMOVE (same xid, same arguments) gets the first reply
/// again, not NOENT; a new xid runs the call again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retransmitted_remove_is_answered_from_cache() {
    use std::sync::atomic::Ordering;

    let fs = MemFs::new();
    fs.add_file(crate::support::memfs::ROOT, "victim", b"x".to_vec());
    let s = TestServer::start(fs.clone()).await;
    let conn = mount(&s, "/export").await.expect("mount");
    let root = conn.root_nfs_fh3();
    drop(conn);

    let mut args = Vec::new();
    args.extend_from_slice(&(root.data.len() as u32).to_be_bytes());
    args.extend_from_slice(&root.data);
    args.extend_from_slice(&6u32.to_be_bytes());
    args.extend_from_slice(b"victim\0\0");
    let status = |body: &[u8]| word(body, 6);

    let mut raw = TcpStream::connect(s.nfs_addr()).await.expect("connect");
    raw.write_all(&call_record(500, 100_003, 3, 12, &args))
        .await
        .expect("send");
    let first = read_record(&mut raw).await;
    assert_eq!(status(&first), 0, "NFS3_OK");
    assert_eq!(fs.file_data(&["victim"]), None);
    // The client lost the reply, reconnects, retransmits.
    drop(raw);
    let mut raw = TcpStream::connect(s.nfs_addr()).await.expect("connect");
    raw.write_all(&call_record(500, 100_003, 3, 12, &args))
        .await
        .expect("send");
    let again = read_record(&mut raw).await;
    assert_eq!(again, first, "same reply as the first time");
    assert_eq!(s.metrics.drc_hits.load(Ordering::Relaxed), 1);
    raw.write_all(&call_record(501, 100_003, 3, 12, &args))
        .await
        .expect("send");
    let fresh = read_record(&mut raw).await;
    assert_eq!(status(&fresh), 2, "NFS3ERR_NOENT for a new call");
    s.stop().await;
}
