//! In-process tests of the iSCSI target over a [`MemDevice`], with a raw
//! client that writes PDUs by hand: login (allow-lists, CHAP), discovery,
//! the three ways write data arrives (immediate, unsolicited, R2T), the
//! CmdSN window, task management, and malformed PDUs.

use std::net::Ipv4Addr;
use std::sync::Arc;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::chap::decode_binary;
use super::pdu::{be32, op, read_pdu, OutPdu, Pdu, Stamp, RESERVED_TAG};
use super::*;
use crate::block::{BlockExports, MemDevice};

const IQN: &str = "iqn.2024-01.dev.revive:t1";
const INITIATOR: &str = "iqn.2024-01.dev.revive:host1";

fn access() -> Access {
    Access {
        allowed_clients: vec![Ipv4Addr::LOCALHOST.into()],
        allowed_initiators: vec![INITIATOR.into()],
        chap: None,
    }
}

struct Server {
    addr: std::net::SocketAddr,
    dev: Arc<MemDevice>,
    targets: Arc<ExportTargets>,
    registry: Arc<BlockExports>,
    _stop: oneshot::Sender<()>,
}

async fn server_with(access: Access) -> Server {
    let dev = Arc::new(MemDevice::new(
        "t1",
        (0..1 << 20).map(|i| (i % 251) as u8).collect(),
    ));
    let registry = BlockExports::new();
    registry.add(export_of(IQN, dev.clone(), access)).unwrap();
    let targets = ExportTargets::new(registry.clone());
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(
        IscsiServer::new(targets.clone()).serve(listener, async move {
            let _ = rx.await;
        }),
    );
    Server {
        addr,
        dev,
        targets,
        registry,
        _stop: tx,
    }
}

/// A hand-written initiator.
struct Client {
    s: TcpStream,
    itt: u32,
    cmd_sn: u32,
    /// Negotiated keys from the last login response.
    keys: Vec<(String, String)>,
}

fn pdu(opcode: u8, flags: u8, itt: u32, data: &[u8]) -> OutPdu {
    OutPdu::new(
        opcode,
        flags,
        itt,
        Bytes::copy_from_slice(data),
        Stamp::Window,
    )
}

impl Client {
    async fn connect(addr: std::net::SocketAddr) -> Client {
        Client {
            s: TcpStream::connect(addr).await.unwrap(),
            itt: 1,
            cmd_sn: 1,
            keys: Vec::new(),
        }
    }

    async fn send(&mut self, p: &OutPdu) {
        let mut buf = p.bhs.to_vec();
        buf.extend_from_slice(&p.data);
        buf.resize(buf.len() + p.padding(), 0);
        self.s.write_all(&buf).await.unwrap();
    }

    async fn recv(&mut self) -> Pdu {
        read_pdu(&mut self.s, 16 << 20).await.unwrap()
    }

    /// One login request; returns the response.
    async fn login_pdu(&mut self, flags: u8, keys: &[(&str, &str)]) -> Pdu {
        let pairs: Vec<(String, String)> = keys
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut p = pdu(op::LOGIN_REQ | 0x40, flags, 0x77, &text::encode(&pairs));
        p.bhs[8..14].copy_from_slice(&[0x80, 0, 0, 0x12, 0x34, 0x56]);
        p.set_u32(24, self.cmd_sn);
        self.send(&p).await;
        let r = self.recv().await;
        assert_eq!(r.opcode(), op::LOGIN_RESP);
        self.keys = text::parse(&r.data).unwrap();
        r
    }

    /// Logs in straight to full feature phase with `ops` operational keys.
    async fn login(&mut self, initiator: &str, target: Option<&str>, ops: &[(&str, &str)]) -> u16 {
        let mut keys = vec![("InitiatorName", initiator), ("AuthMethod", "None")];
        match target {
            Some(t) => keys.push(("TargetName", t)),
            None => keys.push(("SessionType", "Discovery")),
        }
        let r = self.login_pdu(0x80 | 0x01, &keys).await;
        let status = u16::from_be_bytes([r.bhs[36], r.bhs[37]]);
        if status != 0 {
            return status;
        }
        let r = self.login_pdu(0x80 | 0x04 | 0x03, ops).await;
        assert_eq!(r.flags() & 0x83, 0x83, "transit to full feature phase");
        assert_ne!(u16::from_be_bytes([r.bhs[14], r.bhs[15]]), 0, "TSIH");
        u16::from_be_bytes([r.bhs[36], r.bhs[37]])
    }

    fn key(&self, k: &str) -> Option<&str> {
        self.keys
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    fn next_itt(&mut self) -> u32 {
        self.itt += 1;
        self.itt
    }

    /// Sends a SCSI command; `imm` rides in the command PDU, `final_bit`
    /// clear announces unsolicited Data-Out.
    async fn command(
        &mut self,
        cdb: &[u8],
        edtl: u32,
        write: bool,
        imm: &[u8],
        final_bit: bool,
    ) -> u32 {
        let itt = self.next_itt();
        let flags = (if final_bit { 0x80 } else { 0 }) | if write { 0x20 } else { 0x40 } | 0x01;
        let mut p = pdu(op::SCSI_CMD, flags, itt, imm);
        p.set_u32(20, edtl).set_u32(24, self.cmd_sn);
        p.bhs[32..32 + cdb.len()].copy_from_slice(cdb);
        self.cmd_sn += 1;
        self.send(&p).await;
        itt
    }

    async fn data_out(
        &mut self,
        itt: u32,
        ttt: u32,
        sn: u32,
        offset: u32,
        data: &[u8],
        last: bool,
    ) {
        let mut p = pdu(op::DATA_OUT, if last { 0x80 } else { 0 }, itt, data);
        p.set_u32(20, ttt).set_u32(36, sn).set_u32(40, offset);
        self.send(&p).await;
    }

    /// Reads Data-In until the status; answers R2Ts from `out`. Returns
    /// (status, data, sense, residual flags, residual).
    async fn finish(&mut self, itt: u32, out: &[u8]) -> (u8, Vec<u8>, Vec<u8>, u8, u32) {
        let mut data = Vec::new();
        loop {
            let r = self.recv().await;
            assert_eq!(r.itt(), itt);
            match r.opcode() {
                op::DATA_IN => {
                    assert_eq!(r.u32_at(40) as usize, data.len(), "Data-In in order");
                    data.extend_from_slice(&r.data);
                    if r.flags() & 0x01 != 0 {
                        return (r.bhs[3], data, Vec::new(), r.flags() & 0x06, r.u32_at(44));
                    }
                }
                op::R2T => {
                    let (ttt, off, len) = (r.ttt(), r.u32_at(40), r.u32_at(44));
                    let chunk = &out[off as usize..(off + len) as usize];
                    // Two Data-Out PDUs per burst, to check DataSN and offsets.
                    let half = (len / 2) as usize;
                    self.data_out(itt, ttt, 0, off, &chunk[..half], false).await;
                    self.data_out(itt, ttt, 1, off + half as u32, &chunk[half..], true)
                        .await;
                }
                op::SCSI_RESP => {
                    let sense = if r.data.len() > 2 {
                        r.data[2..].to_vec()
                    } else {
                        Vec::new()
                    };
                    return (r.bhs[3], data, sense, r.flags() & 0x06, r.u32_at(44));
                }
                other => panic!("unexpected opcode {other:#x}"),
            }
        }
    }

    async fn read10(&mut self, lba: u32, blocks: u16) -> Vec<u8> {
        let mut cdb = [0u8; 10];
        cdb[0] = 0x28;
        cdb[2..6].copy_from_slice(&lba.to_be_bytes());
        cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
        let itt = self
            .command(&cdb, u32::from(blocks) * 512, false, &[], true)
            .await;
        let (status, data, ..) = self.finish(itt, &[]).await;
        assert_eq!(status, 0);
        data
    }
}

fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut cdb = [0u8; 10];
    cdb[0] = 0x2a;
    cdb[2..6].copy_from_slice(&lba.to_be_bytes());
    cdb[7..9].copy_from_slice(&blocks.to_be_bytes());
    cdb
}

/// Removing the export (a session's switchover) closes its iSCSI sessions,
/// returns once they are gone, and no new login finds the target.
#[tokio::test]
async fn removing_the_export_closes_its_sessions() {
    let s = server_with(access()).await;
    let mut c = Client::connect(s.addr).await;
    assert_eq!(c.login(INITIATOR, Some(IQN), &[]).await, 0);
    assert_eq!(c.read10(0, 1).await, s.dev.contents()[..512]);
    tokio::time::timeout(std::time::Duration::from_secs(10), s.registry.remove(IQN))
        .await
        .expect("removal waits only for the session to close");
    let mut byte = [0u8; 1];
    assert_eq!(c.s.read(&mut byte).await.unwrap_or(0), 0, "session closed");
    let mut c = Client::connect(s.addr).await;
    assert_eq!(
        c.login(INITIATOR, Some(IQN), &[]).await,
        login::status::NOT_FOUND
    );
}

#[tokio::test]
async fn login_checks_the_allow_lists_and_the_target_name() {
    let s = server_with(access()).await;
    let mut c = Client::connect(s.addr).await;
    assert_eq!(
        c.login("iqn.2024-01.dev.revive:intruder", Some(IQN), &[])
            .await,
        login::status::FORBIDDEN
    );
    let mut c = Client::connect(s.addr).await;
    assert_eq!(
        c.login(INITIATOR, Some("iqn.2024-01.dev.revive:nope"), &[])
            .await,
        login::status::NOT_FOUND
    );
    let t = s.targets.find(IQN).unwrap();
    assert_eq!(
        t.metrics()
            .refused
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // Right name, wrong address.
    let s2 = server_with(Access {
        allowed_clients: vec!["192.0.2.10".parse().unwrap()],
        ..access()
    })
    .await;
    let mut c = Client::connect(s2.addr).await;
    assert_eq!(
        c.login(INITIATOR, Some(IQN), &[]).await,
        login::status::FORBIDDEN
    );
    // Discovery shows nothing to a refused address, the target to others.
    let mut c = Client::connect(s2.addr).await;
    assert_eq!(c.login(INITIATOR, None, &[]).await, 0);
    let itt = c.next_itt();
    let mut p = pdu(op::TEXT_REQ, 0x80, itt, b"SendTargets=All\0");
    p.set_u32(20, RESERVED_TAG).set_u32(24, c.cmd_sn);
    c.send(&p).await;
    let r = c.recv().await;
    assert_eq!(r.opcode(), op::TEXT_RESP);
    assert!(r.data.is_empty(), "{:?}", String::from_utf8_lossy(&r.data));

    let mut c = Client::connect(s.addr).await;
    assert_eq!(c.login(INITIATOR, None, &[]).await, 0);
    let mut p = pdu(op::TEXT_REQ, 0x80, 9, b"SendTargets=All\0");
    p.set_u32(20, RESERVED_TAG).set_u32(24, c.cmd_sn);
    c.send(&p).await;
    let r = c.recv().await;
    let text = String::from_utf8_lossy(&r.data).to_string();
    assert!(text.contains(&format!("TargetName={IQN}")), "{text}");
    assert!(
        text.contains(&format!("TargetAddress={},1", s.addr)),
        "{text}"
    );
}

#[tokio::test]
async fn chap_refuses_a_wrong_secret_and_answers_mutual_challenges() {
    use md5::{Digest, Md5};
    let chap = ChapConfig {
        user: "host1".into(),
        secret: "initiator-secret".into(),
        mutual: Some(("target1".into(), "target-secret1".into())),
    };
    let s = server_with(Access {
        chap: Some(chap),
        ..access()
    })
    .await;
    for (secret, ok) in [("wrong-secret-0", false), ("initiator-secret", true)] {
        let mut c = Client::connect(s.addr).await;
        c.login_pdu(
            0x01,
            &[
                ("InitiatorName", INITIATOR),
                ("TargetName", IQN),
                ("AuthMethod", "None,CHAP"),
            ],
        )
        .await;
        assert_eq!(c.key("AuthMethod"), Some("CHAP"));
        let r = c.login_pdu(0x00, &[("CHAP_A", "5")]).await;
        assert_eq!(r.flags() & 0x80, 0);
        let id: u8 = c.key("CHAP_I").unwrap().parse().unwrap();
        let challenge = decode_binary(c.key("CHAP_C").unwrap()).unwrap();
        let mut h = Md5::new();
        h.update([id]);
        h.update(secret.as_bytes());
        h.update(&challenge);
        let resp = format!("0x{}", hex::encode(h.finalize()));
        let r = c
            .login_pdu(
                0x80 | 0x01,
                &[
                    ("CHAP_N", "host1"),
                    ("CHAP_R", &resp),
                    ("CHAP_I", "7"),
                    ("CHAP_C", "0x0102030405"),
                ],
            )
            .await;
        let status = u16::from_be_bytes([r.bhs[36], r.bhs[37]]);
        if !ok {
            assert_eq!(status, login::status::AUTH_FAILED);
            continue;
        }
        assert_eq!(status, 0);
        let mut h = Md5::new();
        h.update([7u8]);
        h.update(b"target-secret1");
        h.update([1u8, 2, 3, 4, 5]);
        assert_eq!(
            c.key("CHAP_R").unwrap(),
            format!("0x{}", hex::encode(h.finalize()))
        );
        assert_eq!(c.key("CHAP_N"), Some("target1"));
        let r = c.login_pdu(0x80 | 0x04 | 0x03, &[]).await;
        assert_eq!(u16::from_be_bytes([r.bhs[36], r.bhs[37]]), 0);
        assert_eq!(c.read10(0, 1).await, s.dev.contents()[..512].to_vec());
    }
}

#[tokio::test]
async fn writes_arrive_immediate_unsolicited_and_by_r2t() {
    let s = server_with(access()).await;
    // Small bursts so every path is taken: 4 KiB first burst, 8 KiB bursts.
    let mut c = Client::connect(s.addr).await;
    let ops = [
        ("InitialR2T", "No"),
        ("ImmediateData", "Yes"),
        ("FirstBurstLength", "4096"),
        ("MaxBurstLength", "8192"),
        ("MaxRecvDataSegmentLength", "2048"),
    ];
    assert_eq!(c.login(INITIATOR, Some(IQN), &ops).await, 0);
    assert_eq!(c.key("InitialR2T"), Some("No"));
    assert_eq!(c.key("MaxBurstLength"), Some("8192"));
    let mrdsl: u32 = c.key("MaxRecvDataSegmentLength").unwrap().parse().unwrap();
    assert!(mrdsl >= 2048);
    let data: Vec<u8> = (0..64 * 512).map(|i| (i * 7 % 256) as u8).collect();
    // 1 KiB immediate, 3 KiB unsolicited in two PDUs, the rest by R2T.
    let itt = c
        .command(
            &write10(8, 64),
            data.len() as u32,
            true,
            &data[..1024],
            false,
        )
        .await;
    c.data_out(itt, RESERVED_TAG, 0, 1024, &data[1024..2048], false)
        .await;
    c.data_out(itt, RESERVED_TAG, 1, 2048, &data[2048..4096], true)
        .await;
    let (status, ..) = c.finish(itt, &data).await;
    assert_eq!(status, 0);
    assert_eq!(&s.dev.contents()[8 * 512..72 * 512], &data[..]);
    // Data-In comes in PDUs of at most 2 KiB (our declared limit).
    assert_eq!(c.read10(8, 64).await, data);

    // A write whose CDB asks more than the EDTL: only EDTL is written.
    let itt = c
        .command(&write10(100, 2), 512, true, &data[..512], true)
        .await;
    let (status, _, _, flags, residual) = c.finish(itt, &data).await;
    assert_eq!((status, flags, residual), (0, 0x04, 512));

    // SYNCHRONIZE CACHE reaches the device's flush.
    let before = s.dev.flushes();
    let itt = c
        .command(&[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, false, &[], true)
        .await;
    assert_eq!(c.finish(itt, &[]).await.0, 0);
    assert_eq!(s.dev.flushes(), before + 1);
}

#[tokio::test]
async fn scsi_errors_come_back_as_sense_data() {
    let s = server_with(access()).await;
    let mut c = Client::connect(s.addr).await;
    assert_eq!(c.login(INITIATOR, Some(IQN), &[]).await, 0);
    let blocks = (1u32 << 20) / 512;
    let mut cdb = [0u8; 10];
    cdb[0] = 0x28;
    cdb[2..6].copy_from_slice(&blocks.to_be_bytes());
    cdb[8] = 1;
    let itt = c.command(&cdb, 512, false, &[], true).await;
    let (status, data, sense, flags, residual) = c.finish(itt, &[]).await;
    assert_eq!(status, 2);
    assert!(data.is_empty());
    assert_eq!((sense[2], sense[12]), (5, 0x21), "LBA out of range");
    assert_eq!((flags, residual), (0x02, 512));
    // An unknown opcode.
    let itt = c.command(&[0xc5, 0, 0, 0, 0, 0], 0, false, &[], true).await;
    let (status, _, sense, ..) = c.finish(itt, &[]).await;
    assert_eq!((status, sense[2], sense[12]), (2, 5, 0x20));
    // INQUIRY to LUN 1: no such unit.
    let itt = c.next_itt();
    let mut p = pdu(op::SCSI_CMD, 0xc1, itt, &[]);
    p.set_u32(20, 36).set_u32(24, c.cmd_sn).set_lun(1 << 48);
    p.bhs[32..38].copy_from_slice(&[0x12, 0, 0, 0, 36, 0]);
    c.cmd_sn += 1;
    c.send(&p).await;
    let (status, data, ..) = c.finish(itt, &[]).await;
    assert_eq!((status, data[0]), (0, 0x7f));
}

#[tokio::test]
async fn the_cmd_sn_window_drops_what_falls_outside() {
    let s = server_with(access()).await;
    let mut c = Client::connect(s.addr).await;
    assert_eq!(c.login(INITIATOR, Some(IQN), &[]).await, 0);
    // A TEST UNIT READY far beyond MaxCmdSN is ignored...
    let good_sn = c.cmd_sn;
    c.cmd_sn += 10_000;
    c.command(&[0; 6], 0, false, &[], true).await;
    c.cmd_sn = good_sn;
    // ...and a NOP-Out ping with the right CmdSN is answered with its data.
    let itt = c.next_itt();
    let mut p = pdu(op::NOP_OUT, 0x80, itt, b"ping");
    p.set_u32(20, RESERVED_TAG).set_u32(24, c.cmd_sn);
    c.cmd_sn += 1;
    c.send(&p).await;
    let r = c.recv().await;
    assert_eq!(
        (r.opcode(), r.itt(), &r.data[..]),
        (op::NOP_IN, itt, &b"ping"[..])
    );
    let exp = be32(&r.bhs[28..]);
    let max = be32(&r.bhs[32..]);
    assert_eq!(exp, c.cmd_sn);
    assert_eq!(max.wrapping_sub(exp), conn::QUEUE_DEPTH - 1);
    // The connection still works.
    assert_eq!(c.read10(0, 1).await, s.dev.contents()[..512].to_vec());
}

#[tokio::test]
async fn abort_task_stops_a_write_waiting_for_data() {
    let s = server_with(access()).await;
    let mut c = Client::connect(s.addr).await;
    assert_eq!(
        c.login(
            INITIATOR,
            Some(IQN),
            &[("InitialR2T", "Yes"), ("ImmediateData", "No")]
        )
        .await,
        0
    );
    let itt = c.command(&write10(0, 8), 4096, true, &[], true).await;
    let r = c.recv().await;
    assert_eq!(r.opcode(), op::R2T);
    let tmf_itt = c.next_itt();
    let mut p = pdu(op::TMF_REQ | 0x40, 0x80 | 1, tmf_itt, &[]);
    p.set_u32(20, itt).set_u32(24, c.cmd_sn);
    c.send(&p).await;
    let r = c.recv().await;
    assert_eq!((r.opcode(), r.itt(), r.bhs[2]), (op::TMF_RESP, tmf_itt, 0));
    // A second abort finds nothing.
    c.send(&p).await;
    let r = c.recv().await;
    assert_eq!(r.bhs[2], 1, "task does not exist");
    assert_eq!(c.read10(0, 1).await, s.dev.contents()[..512].to_vec());
    // Logout answers and closes.
    let mut p = pdu(op::LOGOUT_REQ | 0x40, 0x80, 99, &[]);
    p.set_u32(24, c.cmd_sn);
    c.send(&p).await;
    let r = c.recv().await;
    assert_eq!((r.opcode(), r.bhs[2]), (op::LOGOUT_RESP, 0));
    let mut rest = Vec::new();
    assert_eq!(c.s.read_to_end(&mut rest).await.unwrap(), 0);
}

#[tokio::test]
async fn malformed_pdus_close_only_their_connection() {
    let s = server_with(access()).await;
    let mut good = Client::connect(s.addr).await;
    assert_eq!(good.login(INITIATOR, Some(IQN), &[]).await, 0);
    let cases: Vec<Vec<u8>> = vec![
        // Garbage instead of a login.
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".repeat(4),
        // A login announcing a 16 MiB data segment.
        {
            let mut h = vec![0u8; 48];
            h[0] = 0x43;
            h[5..8].copy_from_slice(&[0xff, 0xff, 0xff]);
            h
        },
    ];
    for bytes in cases {
        let mut bad = TcpStream::connect(s.addr).await.unwrap();
        bad.write_all(&bytes).await.unwrap();
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            bad.read_to_end(&mut rest),
        )
        .await
        .expect("the server closes a garbage connection");
    }
    // In full feature phase: a Data-Out nobody asked for, and a data
    // segment beyond MaxRecvDataSegmentLength.
    for case in 0..2 {
        let mut bad = Client::connect(s.addr).await;
        assert_eq!(bad.login(INITIATOR, Some(IQN), &[]).await, 0);
        if case == 0 {
            bad.data_out(42, 77, 0, 0, &[1; 512], true).await;
            bad.data_out(42, 77, 0, 0, &[1; 512], true).await;
            let itt = bad.command(&write10(0, 1), 512, true, &[], true).await;
            let r = bad.recv().await;
            assert_eq!(r.opcode(), op::R2T);
            bad.data_out(itt, r.ttt(), 5, 0, &[1; 512], true).await;
        } else {
            let mut h = vec![0u8; 48];
            h[0] = op::NOP_OUT;
            h[5..8].copy_from_slice(&[0x7f, 0xff, 0xff]);
            bad.s.write_all(&h).await.unwrap();
        }
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            bad.s.read_to_end(&mut rest),
        )
        .await
        .expect("the server closes the connection");
    }
    assert_eq!(
        good.read10(1, 2).await,
        s.dev.contents()[512..1536].to_vec()
    );
}
