//! Unit tests of the SCSI commands against a MemDevice.

use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::block::MemDevice;

fn lu(size: usize) -> (LogicalUnit, Arc<MemDevice>) {
    let dev = Arc::new(MemDevice::new("disk", vec![0; size]));
    (
        LogicalUnit::new(dev.clone(), "iqn.2024-01.dev.revive:t"),
        dev,
    )
}

fn nexus(id: u64) -> Nexus {
    Nexus {
        id,
        initiator_port: format!("iqn.2024-01.dev.revive:h{id},i,0x00023d000001"),
    }
}

async fn run(lu: &LogicalUnit, n: &Nexus, cdb: &[u8], data: &[u8]) -> Response {
    let mut full = [0u8; 16];
    full[..cdb.len()].copy_from_slice(cdb);
    lu.execute(n, &full, Bytes::copy_from_slice(data)).await
}

fn sense_of(r: &Response) -> (u8, u8) {
    let s = r.sense.as_ref().expect("sense");
    (s[2] & 0x0f, s[12])
}

#[tokio::test]
async fn identity_is_stable_and_capacity_is_in_512_byte_blocks() {
    let (a, _) = lu(1 << 20);
    let (b, _) = lu(1 << 20);
    let n = nexus(1);
    let serial_a = run(&a, &n, &[0x12, 1, 0x80, 0, 255, 0], &[]).await;
    let serial_b = run(&b, &n, &[0x12, 1, 0x80, 0, 255, 0], &[]).await;
    assert_eq!(serial_a.data, serial_b.data, "same device, same serial");
    let id = run(&a, &n, &[0x12, 1, 0x83, 0, 255, 0], &[]).await;
    assert_eq!(id.data[4] & 0x0f, 1, "binary NAA designator first");
    assert_eq!(id.data[8] >> 4, 3, "NAA locally assigned");
    let pages = run(&a, &n, &[0x12, 1, 0, 0, 255, 0], &[]).await;
    assert_eq!(&pages.data[4..], &[0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]);
    let rc = run(&a, &n, &[0x25], &[]).await;
    assert_eq!(&rc.data[..], &[0, 0, 0x07, 0xff, 0, 0, 2, 0]);
    let rc16 = run(
        &a,
        &n,
        &[0x9e, 0x10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 32],
        &[],
    )
    .await;
    assert_eq!(rc16.data[14] & 0xc0, 0xc0, "LBPME and LBPRZ");
    let bad = run(&a, &n, &[0x12, 0, 0x80, 0, 255, 0], &[]).await;
    assert_eq!(sense_of(&bad), (5, 0x24));
}

#[tokio::test]
async fn unmap_write_same_and_lba_status() {
    let (lu, dev) = lu(1 << 20);
    let n = nexus(1);
    let mut w = [0u8; 10];
    w[0] = 0x2a;
    w[8] = 64;
    assert!(run(&lu, &n, &w, &[0xab; 64 * 512]).await.ok());
    // UNMAP blocks 8..16 (one 4 KiB physical block).
    let mut list = vec![0, 22, 0, 16, 0, 0, 0, 0];
    list.extend_from_slice(&8u64.to_be_bytes());
    list.extend_from_slice(&8u32.to_be_bytes());
    list.extend_from_slice(&[0; 4]);
    assert!(run(&lu, &n, &[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0], &list)
        .await
        .ok());
    assert!(dev.contents()[8 * 512..16 * 512].iter().all(|b| *b == 0));
    let st = run(
        &lu,
        &n,
        &[0x9e, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 64, 0, 0],
        &[],
    )
    .await;
    let descs: Vec<(u64, u32, u8)> = st.data[8..]
        .chunks(16)
        .map(|d| {
            (
                u64::from_be_bytes(d[..8].try_into().unwrap()),
                u32::from_be_bytes(d[8..12].try_into().unwrap()),
                d[12],
            )
        })
        .collect();
    assert_eq!(descs[..3], [(0, 8, 0), (8, 8, 1), (16, 48, 0)]);
    // WRITE SAME(16) of a pattern over blocks 100..110.
    let mut ws = [0u8; 16];
    ws[0] = 0x93;
    ws[9] = 100;
    ws[13] = 10;
    assert!(run(&lu, &n, &ws, &[7; 512]).await.ok());
    assert!(dev.contents()[100 * 512..110 * 512].iter().all(|b| *b == 7));
    // Beyond the end.
    ws[9] = 0;
    ws[6] = 1;
    assert_eq!(sense_of(&run(&lu, &n, &ws, &[7; 512]).await), (5, 0x21));
}

#[tokio::test]
async fn compare_and_write_and_verify_report_the_first_difference() {
    let (lu, _) = lu(1 << 20);
    let n = nexus(1);
    let mut caw = [0u8; 16];
    caw[0] = 0x89;
    caw[13] = 1;
    let mut data = vec![0u8; 512];
    data.extend(vec![5u8; 512]);
    assert!(run(&lu, &n, &caw, &data).await.ok());
    let miss = run(&lu, &n, &caw, &data).await;
    assert_eq!(sense_of(&miss), (0x0e, 0x1d));
    let s = miss.sense.unwrap();
    assert_eq!(
        (s[0] & 0x80, s[6]),
        (0x80, 0),
        "INFORMATION: byte 0 differs"
    );
    let mut v = [0u8; 10];
    v[0] = 0x2f;
    v[1] = 0x02;
    v[8] = 1;
    let mut expect = vec![5u8; 512];
    assert!(run(&lu, &n, &v, &expect).await.ok());
    expect[300] = 6;
    let r = run(&lu, &n, &v, &expect).await;
    assert_eq!(r.sense.unwrap()[6], 44, "300 = 0x12c");
}

#[tokio::test]
async fn reservations_fence_other_initiators() {
    let (lu, _) = lu(1 << 20);
    let (a, b) = (nexus(1), nexus(2));
    let read = [0x28, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    let write = [0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0];
    assert!(run(&lu, &a, &[0x16], &[]).await.ok());
    assert_eq!(
        run(&lu, &b, &read, &[]).await.status,
        status::RESERVATION_CONFLICT
    );
    assert!(
        run(&lu, &b, &[0x12, 0, 0, 0, 36, 0], &[]).await.ok(),
        "INQUIRY passes"
    );
    lu.nexus_lost(&a);
    assert!(run(&lu, &b, &read, &[]).await.ok());

    // Persistent: A registers and reserves Write Exclusive; B reads, not writes.
    let pr_out = |sa: u8, ty: u8| [0x5f, sa, ty, 0, 0, 0, 0, 0, 24, 0];
    let params = |key: u64, sa_key: u64| {
        let mut p = key.to_be_bytes().to_vec();
        p.extend_from_slice(&sa_key.to_be_bytes());
        p.extend_from_slice(&[0; 8]);
        p
    };
    assert!(run(&lu, &a, &pr_out(0, 0), &params(0, 0xaa)).await.ok());
    assert!(run(&lu, &a, &pr_out(1, 1), &params(0xaa, 0)).await.ok());
    assert!(run(&lu, &b, &read, &[]).await.ok());
    assert_eq!(
        run(&lu, &b, &write, &[0; 512]).await.status,
        status::RESERVATION_CONFLICT
    );
    assert!(run(&lu, &a, &write, &[0; 512]).await.ok());
    let keys = run(&lu, &b, &[0x5e, 0, 0, 0, 0, 0, 0, 0, 64, 0], &[]).await;
    assert_eq!(&keys.data[4..16], &[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0xaa]);
    // B registers and preempts A.
    assert!(run(&lu, &b, &pr_out(0, 0), &params(0, 0xbb)).await.ok());
    assert!(run(&lu, &b, &pr_out(4, 1), &params(0xbb, 0xaa)).await.ok());
    assert!(run(&lu, &b, &write, &[0; 512]).await.ok());
    assert_eq!(
        run(&lu, &a, &write, &[0; 512]).await.status,
        status::RESERVATION_CONFLICT
    );
}

#[tokio::test]
async fn mode_select_sets_software_write_protect() {
    let (lu, _) = lu(1 << 20);
    let n = nexus(1);
    let sense = run(&lu, &n, &[0x1a, 0x08, 0x0a, 0, 255, 0], &[]).await;
    assert_eq!(sense.data[2] & 0x80, 0, "not write protected");
    let mut page = sense.data[4..].to_vec();
    page[4] |= 0x08;
    let mut params = vec![0, 0, 0, 0];
    params.extend(page);
    assert!(
        run(&lu, &n, &[0x15, 0x10, 0, 0, params.len() as u8, 0], &params)
            .await
            .ok()
    );
    let w = run(&lu, &n, &[0x2a, 0, 0, 0, 0, 0, 0, 0, 1, 0], &[0; 512]).await;
    assert_eq!(sense_of(&w), (7, 0x27));
    let after = run(&lu, &n, &[0x1a, 0x08, 0x3f, 0, 255, 0], &[]).await;
    assert_eq!(after.data[2] & 0x80, 0x80);
    let saved = run(&lu, &n, &[0x1a, 0, 0xca, 0, 255, 0], &[]).await;
    assert_eq!(sense_of(&saved), (5, 0x39));
}
