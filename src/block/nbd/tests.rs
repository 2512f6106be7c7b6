//! The NBD server on the wire, over an in-memory device: handshake options,
//! the allow-list, every command, structured and simple replies, and that
//! a broken client loses only its own connection.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::proto::*;
use super::NbdServer;
use crate::block::registry::{BlockExport, BlockExports, BlockProtocol};
use crate::block::MemDevice;

const SIZE: usize = 64 * 1024;

/// A server on 127.0.0.1 with export `disk` (allowed) and `secret` (only
/// for 192.0.2.1); returns its address, device and registry.
async fn server() -> (SocketAddr, Arc<MemDevice>, Arc<BlockExports>) {
    let reg = BlockExports::new();
    let mut data = vec![0u8; SIZE];
    data[8192..12288].fill(0x5a);
    let dev = Arc::new(MemDevice::new("disk", data));
    let local = vec![IpAddr::from([127, 0, 0, 1])];
    reg.add(BlockExport::new(
        "disk",
        BlockProtocol::Nbd,
        dev.clone(),
        local,
    ))
    .unwrap();
    let other = vec![IpAddr::from([192, 0, 2, 1])];
    let secret = Arc::new(MemDevice::new("secret", vec![1; 4096]));
    reg.add(BlockExport::new(
        "secret",
        BlockProtocol::Nbd,
        secret,
        other,
    ))
    .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(NbdServer::new(reg.clone()).serve(listener, std::future::pending()));
    (addr, dev, reg)
}

/// A raw client: just enough of the protocol to drive the server.
struct Client(TcpStream);

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert_eq!(s.read_u64().await.unwrap(), NBD_MAGIC);
        assert_eq!(s.read_u64().await.unwrap(), IHAVEOPT);
        let flags = s.read_u16().await.unwrap();
        assert_eq!(flags, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        s.write_u32(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            .await
            .unwrap();
        Client(s)
    }

    /// Connected and in transmission on export `disk` (old-style
    /// NBD_OPT_EXPORT_NAME; its size and flags skipped).
    async fn export_disk(addr: SocketAddr) -> Client {
        let mut c = Client::connect(addr).await;
        c.option(OPT_EXPORT_NAME, b"disk").await;
        let mut rest = [0u8; 10];
        c.0.read_exact(&mut rest).await.unwrap();
        c
    }

    async fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = BytesMut::new();
        b.put_u64(IHAVEOPT);
        b.put_u32(option);
        b.put_u32(data.len() as u32);
        b.put_slice(data);
        self.0.write_all(&b).await.unwrap();
    }

    /// One option reply: (type, data).
    async fn reply(&mut self, option: u32) -> (u32, Vec<u8>) {
        assert_eq!(self.0.read_u64().await.unwrap(), OPTION_REPLY_MAGIC);
        assert_eq!(self.0.read_u32().await.unwrap(), option);
        let kind = self.0.read_u32().await.unwrap();
        let len = self.0.read_u32().await.unwrap();
        let mut data = vec![0u8; len as usize];
        self.0.read_exact(&mut data).await.unwrap();
        (kind, data)
    }

    /// Replies until ACK or an error; returns them all.
    async fn replies(&mut self, option: u32) -> Vec<(u32, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            let r = self.reply(option).await;
            let last = r.0 == REP_ACK || r.0 & 0x8000_0000 != 0;
            out.push(r);
            if last {
                return out;
            }
        }
    }

    async fn go(&mut self, name: &str, option: u32) -> Vec<(u32, Vec<u8>)> {
        let mut b = BytesMut::new();
        b.put_u32(name.len() as u32);
        b.put_slice(name.as_bytes());
        b.put_u16(1);
        b.put_u16(INFO_BLOCK_SIZE);
        self.option(option, &b).await;
        self.replies(option).await
    }

    async fn set_meta(&mut self, name: &str, queries: &[&str]) -> Vec<(u32, Vec<u8>)> {
        let mut b = BytesMut::new();
        b.put_u32(name.len() as u32);
        b.put_slice(name.as_bytes());
        b.put_u32(queries.len() as u32);
        for q in queries {
            b.put_u32(q.len() as u32);
            b.put_slice(q.as_bytes());
        }
        self.option(OPT_SET_META_CONTEXT, &b).await;
        self.replies(OPT_SET_META_CONTEXT).await
    }

    async fn request(
        &mut self,
        kind: u16,
        flags: u16,
        handle: u64,
        offset: u64,
        len: u32,
        data: &[u8],
    ) {
        let mut b = BytesMut::new();
        put_request(&mut b, kind, flags, handle, offset, len);
        b.put_slice(data);
        self.0.write_all(&b).await.unwrap();
    }

    /// One structured chunk: (flags, type, handle, payload).
    async fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        assert_eq!(self.0.read_u32().await.unwrap(), STRUCTURED_REPLY_MAGIC);
        let flags = self.0.read_u16().await.unwrap();
        let kind = self.0.read_u16().await.unwrap();
        let handle = self.0.read_u64().await.unwrap();
        let len = self.0.read_u32().await.unwrap();
        let mut data = vec![0u8; len as usize];
        self.0.read_exact(&mut data).await.unwrap();
        (flags, kind, handle, data)
    }

    /// Whether the server closed the connection.
    async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b).await, Ok(0) | Err(_))
    }
}

/// Appends one request header to `b`.
fn put_request(b: &mut BytesMut, kind: u16, flags: u16, handle: u64, offset: u64, len: u32) {
    b.put_u32(REQUEST_MAGIC);
    b.put_u16(flags);
    b.put_u16(kind);
    b.put_u64(handle);
    b.put_u64(offset);
    b.put_u32(len);
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

#[tokio::test]
async fn options_list_and_refuse_by_allow_list() {
    let (addr, _, _) = server().await;
    let mut c = Client::connect(addr).await;
    c.option(OPT_LIST, &[]).await;
    let list = c.replies(OPT_LIST).await;
    assert_eq!(list.len(), 2, "only the allowed export is listed: {list:?}");
    assert_eq!(list[0].0, REP_SERVER);
    assert_eq!(&list[0].1[4..], b"disk");
    // Refused by policy, unknown, malformed, unsupported: the connection lives on.
    assert_eq!(
        c.go("secret", OPT_INFO).await.last().unwrap().0,
        REP_ERR_POLICY
    );
    assert_eq!(
        c.go("nope", OPT_INFO).await.last().unwrap().0,
        REP_ERR_UNKNOWN
    );
    c.option(OPT_INFO, &[0, 0, 0, 9]).await;
    assert_eq!(c.reply(OPT_INFO).await.0, REP_ERR_INVALID);
    c.option(OPT_STARTTLS, &[]).await;
    assert_eq!(c.reply(OPT_STARTTLS).await.0, REP_ERR_UNSUP);
    c.option(99, b"whatever").await;
    assert_eq!(c.reply(99).await.0, REP_ERR_UNSUP);
    // Metadata contexts need structured replies first.
    assert_eq!(
        c.set_meta("disk", &[BASE_ALLOCATION]).await[0].0,
        REP_ERR_INVALID
    );
    c.option(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(c.reply(OPT_STRUCTURED_REPLY).await.0, REP_ACK);
    assert_eq!(
        c.set_meta("secret", &[BASE_ALLOCATION]).await[0].0,
        REP_ERR_POLICY
    );
    let info = c.go("disk", OPT_INFO).await;
    let export = info
        .iter()
        .find(|r| r.0 == REP_INFO && r.1[..2] == [0, 0])
        .unwrap();
    assert_eq!(
        u64::from_be_bytes(export.1[2..10].try_into().unwrap()),
        SIZE as u64
    );
    let flags = u16::from_be_bytes([export.1[10], export.1[11]]);
    assert_ne!(flags & TFLAG_CAN_MULTI_CONN, 0);
    assert_ne!(flags & TFLAG_SEND_FUA, 0);
    let sizes = info
        .iter()
        .find(|r| r.0 == REP_INFO && r.1[..2] == [0, 3])
        .unwrap();
    assert_eq!(be32(&sizes.1[10..14]), super::MAX_REQUEST);
    c.option(OPT_ABORT, &[]).await;
    assert_eq!(c.reply(OPT_ABORT).await.0, REP_ACK);
    assert!(c.closed().await);

    // NBD_OPT_EXPORT_NAME of a refused export cannot answer: it closes.
    let mut c = Client::connect(addr).await;
    c.option(OPT_EXPORT_NAME, b"secret").await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn commands_with_structured_replies_and_block_status() {
    let (addr, dev, reg) = server().await;
    let mut c = Client::connect(addr).await;
    c.option(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(c.reply(OPT_STRUCTURED_REPLY).await.0, REP_ACK);
    let meta = c
        .set_meta("disk", &[BASE_ALLOCATION, "qemu:dirty-bitmap:x"])
        .await;
    assert_eq!(meta.len(), 2);
    assert_eq!(meta[0].0, REP_META_CONTEXT);
    assert_eq!(&meta[0].1[4..], BASE_ALLOCATION.as_bytes());
    assert_eq!(c.go("disk", OPT_GO).await.last().unwrap().0, REP_ACK);

    c.request(CMD_WRITE, CMD_FLAG_FUA, 1, 100, 4, b"abcd").await;
    assert_eq!(
        c.chunk().await,
        (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1, vec![])
    );
    c.request(CMD_READ, 0, 2, 98, 8, &[]).await;
    let (flags, kind, handle, data) = c.chunk().await;
    assert_eq!(
        (flags, kind, handle),
        (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 2)
    );
    assert_eq!(&data[..8], &98u64.to_be_bytes());
    assert_eq!(&data[8..], b"\0\0abcd\0\0");
    c.request(CMD_FLUSH, 0, 3, 0, 0, &[]).await;
    assert_eq!(c.chunk().await.1, REPLY_TYPE_NONE);
    assert_eq!(dev.flushes(), 1);
    c.request(CMD_BLOCK_STATUS, 0, 4, 0, SIZE as u32, &[]).await;
    let (_, kind, _, data) = c.chunk().await;
    assert_eq!(kind, REPLY_TYPE_BLOCK_STATUS);
    assert_eq!(be32(&data), super::handshake::BASE_ALLOCATION_ID);
    let ext: Vec<(u32, u32)> = data[4..]
        .chunks(8)
        .map(|d| (be32(d), be32(&d[4..])))
        .collect();
    assert_eq!(
        ext,
        vec![
            (4096, 0),
            (4096, STATE_HOLE | STATE_ZERO),
            (4096, 0),
            (SIZE as u32 - 12288, 3)
        ]
    );
    c.request(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 5, 0, SIZE as u32, &[])
        .await;
    assert_eq!(c.chunk().await.3.len(), 12);
    // Trim and write zeroes read back as zeros.
    c.request(CMD_WRITE_ZEROES, 0, 6, 8192, 4096, &[]).await;
    assert_eq!(c.chunk().await.1, REPLY_TYPE_NONE);
    c.request(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 7, 96, 16, &[])
        .await;
    assert_eq!(c.chunk().await.1, REPLY_TYPE_NONE);
    assert!(dev.contents().iter().all(|b| *b == 0));
    // Errors come back as error chunks; the connection goes on.
    c.request(CMD_READ, 0, 8, SIZE as u64 - 1, 2, &[]).await;
    let (_, kind, handle, data) = c.chunk().await;
    assert_eq!((kind, handle, be32(&data)), (REPLY_TYPE_ERROR, 8, EINVAL));
    c.request(CMD_WRITE, 0, 9, SIZE as u64, 1, b"x").await;
    assert_eq!(be32(&c.chunk().await.3), ENOSPC);
    c.request(CMD_READ, CMD_FLAG_NO_HOLE, 10, 0, 1, &[]).await;
    assert_eq!(be32(&c.chunk().await.3), EINVAL);
    c.request(42, 0, 11, 0, 0, &[]).await;
    assert_eq!(be32(&c.chunk().await.3), EINVAL);
    let m = &reg.get("disk", BlockProtocol::Nbd).unwrap().metrics;
    assert_eq!(
        m.bytes_written.load(std::sync::atomic::Ordering::Relaxed),
        4
    );
    // Removing the export closes the connection.
    assert!(reg.remove("disk").await);
    assert!(c.closed().await);
}

#[tokio::test]
async fn simple_replies_without_structured_negotiation() {
    let (addr, _, _) = server().await;
    let mut c = Client::connect(addr).await;
    c.option(OPT_EXPORT_NAME, b"disk").await;
    assert_eq!(c.0.read_u64().await.unwrap(), SIZE as u64);
    let flags = c.0.read_u16().await.unwrap();
    assert_eq!(flags & TFLAG_SEND_DF, 0, "DF needs structured replies");
    c.request(CMD_READ, 0, 77, 8192, 4, &[]).await;
    assert_eq!(c.0.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
    assert_eq!(c.0.read_u32().await.unwrap(), 0);
    assert_eq!(c.0.read_u64().await.unwrap(), 77);
    let mut data = [0u8; 4];
    c.0.read_exact(&mut data).await.unwrap();
    assert_eq!(data, [0x5a; 4]);
    // Block status was not negotiated: EINVAL, no payload.
    c.request(CMD_BLOCK_STATUS, 0, 78, 0, 4096, &[]).await;
    assert_eq!(c.0.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
    assert_eq!(c.0.read_u32().await.unwrap(), EINVAL);
    assert_eq!(c.0.read_u64().await.unwrap(), 78);
    c.request(CMD_DISC, 0, 79, 0, 0, &[]).await;
    assert!(c.closed().await);
}

#[tokio::test]
async fn garbage_closes_only_its_own_connection() {
    let (addr, _, _) = server().await;
    let mut good = Client::export_disk(addr).await;

    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0xff; 4096][..],
        &[0, 0, 0, 4][..],
    ] {
        let mut bad = TcpStream::connect(addr).await.unwrap();
        let mut greeting = [0u8; 18];
        bad.read_exact(&mut greeting).await.unwrap();
        let _ = bad.write_all(garbage).await;
        let mut b = [0u8; 64];
        // Closed, or answered and then closed: never kept hanging.
        loop {
            match bad.read(&mut b).await {
                Ok(0) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }
    // An option claiming 4 GiB of data is refused before any allocation.
    let mut huge = Client::connect(addr).await;
    let mut b = BytesMut::new();
    b.put_u64(IHAVEOPT);
    b.put_u32(OPT_GO);
    b.put_u32(u32::MAX);
    huge.0.write_all(&b).await.unwrap();
    assert!(huge.closed().await);
    // In transmission: a bad magic and an oversized write close that connection.
    for (magic, len) in [(0xdead_beefu32, 0u32), (REQUEST_MAGIC, u32::MAX)] {
        let mut c = Client::export_disk(addr).await;
        let mut req = BytesMut::new();
        put_request(&mut req, CMD_WRITE, 0, 1, 0, len);
        // The magic in front is the one under test.
        req[..4].copy_from_slice(&magic.to_be_bytes());
        c.0.write_all(&req).await.unwrap();
        assert!(c.closed().await);
    }
    // The first client is still served.
    good.request(CMD_READ, 0, 5, 8192, 1, &[]).await;
    assert_eq!(good.0.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
    assert_eq!(good.0.read_u32().await.unwrap(), 0);
}

#[tokio::test]
async fn requests_in_flight_run_in_parallel_and_all_get_answers() {
    let (addr, _, _) = server().await;
    let mut c = Client::export_disk(addr).await;
    // A burst of pipelined writes then reads: every handle answered once.
    let mut burst = BytesMut::new();
    for i in 0..32u64 {
        put_request(&mut burst, CMD_WRITE, 0, i, i * 1024, 1024);
        burst.put_bytes(i as u8, 1024);
    }
    c.0.write_all(&burst).await.unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..32 {
        assert_eq!(c.0.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
        assert_eq!(c.0.read_u32().await.unwrap(), 0);
        seen.insert(c.0.read_u64().await.unwrap());
    }
    assert_eq!(seen.len(), 32);
    c.request(CMD_READ, 0, 100, 31 * 1024, 1024, &[]).await;
    assert_eq!(c.0.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
    assert_eq!(c.0.read_u32().await.unwrap(), 0);
    assert_eq!(c.0.read_u64().await.unwrap(), 100);
    let mut data = vec![0u8; 1024];
    c.0.read_exact(&mut data).await.unwrap();
    assert!(data.iter().all(|b| *b == 31));
}

#[tokio::test]
async fn export_name_after_structured_replies_keeps_them() {
    let (addr, _, _) = server().await;
    let mut c = Client::connect(addr).await;
    c.option(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(c.reply(OPT_STRUCTURED_REPLY).await.0, REP_ACK);
    c.option(OPT_EXPORT_NAME, b"disk").await;
    assert_eq!(c.0.read_u64().await.unwrap(), SIZE as u64);
    let flags = c.0.read_u16().await.unwrap();
    assert_ne!(flags & TFLAG_SEND_DF, 0);
    c.request(CMD_READ, 0, 3, 8192, 2, &[]).await;
    let (_, kind, handle, data) = c.chunk().await;
    assert_eq!((kind, handle), (REPLY_TYPE_OFFSET_DATA, 3));
    assert_eq!(&data[8..], &[0x5a, 0x5a]);
}

/// Writes queued back to back go to the device together; one beyond the
/// end gets ENOSPC, and the writes before and after it are still done.
#[tokio::test]
async fn a_queue_of_writes_with_one_beyond_the_end() {
    let (addr, dev, _) = server().await;
    let mut c = Client::export_disk(addr).await;
    let mut burst = BytesMut::new();
    for i in 0..8u64 {
        let offset = if i == 3 { SIZE as u64 } else { i * 4096 };
        put_request(&mut burst, CMD_WRITE, 0, i, offset, 4096);
        burst.put_bytes(0x10 + i as u8, 4096);
    }
    c.0.write_all(&burst).await.unwrap();
    let mut errors = std::collections::BTreeMap::new();
    for _ in 0..8 {
        assert_eq!(c.0.read_u32().await.unwrap(), SIMPLE_REPLY_MAGIC);
        let error = c.0.read_u32().await.unwrap();
        errors.insert(c.0.read_u64().await.unwrap(), error);
    }
    let want: std::collections::BTreeMap<u64, u32> = (0..8)
        .map(|i| (i, if i == 3 { ENOSPC } else { 0 }))
        .collect();
    assert_eq!(errors, want);
    let data = dev.contents();
    for i in (0..8u64).filter(|i| *i != 3) {
        let block = &data[(i * 4096) as usize..((i + 1) * 4096) as usize];
        assert!(block.iter().all(|b| *b == 0x10 + i as u8), "write {i}");
    }
    assert!(data[3 * 4096..4 * 4096].iter().all(|b| *b == 0));
}

#[tokio::test]
async fn a_client_that_reads_no_replies_cannot_hold_up_the_server_stop() {
    let reg = BlockExports::new();
    let dev = Arc::new(MemDevice::new("disk", vec![7u8; SIZE]));
    let local = vec![IpAddr::from([127, 0, 0, 1])];
    reg.add(BlockExport::new("disk", BlockProtocol::Nbd, dev, local))
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server =
        NbdServer::new(reg.clone()).with_close_grace(std::time::Duration::from_millis(200));
    let serving = tokio::spawn(server.serve(listener, async {
        let _ = stop_rx.await;
    }));
    let mut c = Client::export_disk(addr).await;
    // 64 MiB of replies asked for and never read: far more than the two
    // sockets' buffers hold, so the server's workers block writing them.
    let mut burst = BytesMut::new();
    for i in 0..1024u64 {
        put_request(&mut burst, CMD_READ, 0, i, 0, SIZE as u32);
    }
    c.0.write_all(&burst).await.unwrap();
    // Until the server has filled the sockets: replies stop arriving.
    let mut seen = 0;
    while reg
        .get("disk", BlockProtocol::Nbd)
        .unwrap()
        .metrics
        .bytes_read
        .load(std::sync::atomic::Ordering::Relaxed)
        < 8 << 20
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        seen += 1;
        assert!(seen < 500, "the server never read the requests");
    }
    stop_tx.send(()).unwrap();
    // A hang here is the failure; the grace is 200 ms.
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(60), serving).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "the server did not stop");
    // The connection was dropped: what the sockets held, then the end.
    let mut sink = vec![0u8; 1 << 20];
    let drained = tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while let Ok(n) = c.0.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the connection stayed open");
}
