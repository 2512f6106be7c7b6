//! What the logical unit says about itself: INQUIRY (standard data and the
//! VPD pages 0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2), READ CAPACITY 10/16,
//! REPORT LUNS, REQUEST SENSE and REPORT SUPPORTED OPERATION CODES.
//!
//! The unit serial number (0x80) and the NAA designator (0x83) come from
//! [`BlockDevice::stable_id`](crate::block::BlockDevice::stable_id), so the
//! same exported disk keeps its identity across restarts of revive: Windows
//! and ESXi recognize the disk (and its signature, its VMFS) by them.

use bytes::Bytes;

use super::{be16, be32, opcode, CmdResult, LogicalUnit, Nexus, Sense, BLOCK_SIZE};
use super::{io::MAX_CAW_BLOCKS, io::MAX_WRITE_SAME_BLOCKS, MAX_TRANSFER_BLOCKS};

/// Vendor identification (8 bytes, ASCII, space-padded).
const VENDOR: &[u8; 8] = b"REVIVE  ";
/// Product identification (16 bytes).
const PRODUCT: &[u8; 16] = b"INSTANT-RECOVERY";
/// Product revision (4 bytes).
const REVISION: &[u8; 4] = b"0001";

/// Logical blocks per physical block, as a power of two: 8 × 512 = 4 KiB,
/// the write cache's block.
pub const PHYSICAL_EXPONENT: u8 = 3;

/// Truncates `data` to the allocation length the CDB allows.
fn truncate(mut data: Vec<u8>, alloc: u32) -> Bytes {
    data.truncate(alloc as usize);
    Bytes::from(data)
}

/// The peripheral byte: qualifier 0 (connected), type 0 (direct access).
const DISK: u8 = 0x00;

/// INQUIRY.
pub fn inquiry(lu: &LogicalUnit, nexus: &Nexus, cdb: &[u8]) -> CmdResult {
    let evpd = cdb[1] & 0x01 != 0;
    let page = cdb[2];
    let alloc = be16(&cdb[3..]);
    if cdb[1] & 0xfe != 0 {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    if !evpd {
        if page != 0 {
            return Err(Sense::INVALID_FIELD_IN_CDB.into());
        }
        return Ok(truncate(standard(), alloc));
    }
    let body = match page {
        0x00 => vec![0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2],
        0x80 => serial(lu).into_bytes(),
        0x83 => identification(lu, nexus),
        0xb0 => block_limits(lu),
        0xb1 => {
            // Block device characteristics: non-rotating medium.
            let mut b = vec![0u8; 0x3c];
            b[1] = 0x01;
            b
        }
        0xb2 => provisioning(),
        _ => return Err(Sense::INVALID_FIELD_IN_CDB.into()),
    };
    let mut out = vec![DISK, page];
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend(body);
    Ok(truncate(out, alloc))
}

fn standard() -> Vec<u8> {
    let mut d = vec![0u8; 96];
    d[0] = DISK;
    d[2] = 0x06; // SPC-4
    d[3] = 0x12; // HISUP, response data format 2
    d[4] = (d.len() - 5) as u8;
    d[7] = 0x02; // CMDQUE
    d[8..16].copy_from_slice(VENDOR);
    d[16..32].copy_from_slice(PRODUCT);
    d[32..36].copy_from_slice(REVISION);
    // Version descriptors: SAM-5, iSCSI, SPC-4, SBC-3.
    for (i, v) in [0x00a0u16, 0x0960, 0x0460, 0x04c0].iter().enumerate() {
        d[58 + 2 * i..60 + 2 * i].copy_from_slice(&v.to_be_bytes());
    }
    d
}

/// Unit serial number: the device's stable id in hex.
fn serial(lu: &LogicalUnit) -> String {
    hex::encode(lu.device().stable_id())
}

fn designator(out: &mut Vec<u8>, proto_code: u8, piv_assoc_type: u8, value: &[u8]) {
    out.push(proto_code);
    out.push(piv_assoc_type);
    out.push(0);
    out.push(value.len() as u8);
    out.extend_from_slice(value);
}

/// Device identification: an NAA locally assigned name and a T10 vendor id
/// for the logical unit, the relative target port, and the target's SCSI
/// name.
fn identification(lu: &LogicalUnit, _nexus: &Nexus) -> Vec<u8> {
    let id = lu.device().stable_id();
    let mut out = Vec::new();
    // NAA 3 (locally assigned): 60 bits of the stable id.
    let mut naa = [0u8; 8];
    naa.copy_from_slice(&id[..8]);
    naa[0] = 0x30 | (naa[0] & 0x0f);
    designator(&mut out, 0x01, 0x03, &naa);
    // T10 vendor id: vendor + serial.
    let mut t10 = VENDOR.to_vec();
    t10.extend_from_slice(serial(lu).as_bytes());
    designator(&mut out, 0x02, 0x01, &t10);
    // Relative target port 1 (iSCSI, PIV, target port association).
    designator(&mut out, 0x51, 0x94, &[0, 0, 0, 1]);
    // Target port group 1.
    designator(&mut out, 0x51, 0x95, &[0, 0, 0, 1]);
    // SCSI name string of the target device (UTF-8, NUL-padded to 4).
    let mut name = lu.target_name().as_bytes().to_vec();
    name.push(0);
    while !name.len().is_multiple_of(4) {
        name.push(0);
    }
    name.truncate(252);
    designator(&mut out, 0x53, 0xa8, &name);
    out
}

fn block_limits(lu: &LogicalUnit) -> Vec<u8> {
    let mut b = vec![0u8; 0x3c];
    // WSNZ stays 0: a WRITE SAME of 0 blocks means "to the end".
    b[1] = MAX_CAW_BLOCKS;
    // Optimal transfer length granularity: the physical block.
    b[2..4].copy_from_slice(&(1u16 << PHYSICAL_EXPONENT).to_be_bytes());
    b[4..8].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes());
    // Optimal transfer length: 1 MiB, the repository's default chunk.
    b[8..12].copy_from_slice(&((1u32 << 20) / BLOCK_SIZE).to_be_bytes());
    b[12..16].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes());
    if !lu.device().read_only() {
        b[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        b[20..24].copy_from_slice(&super::io::MAX_UNMAP_DESCRIPTORS.to_be_bytes());
        b[24..28].copy_from_slice(&(1u32 << PHYSICAL_EXPONENT).to_be_bytes());
        // UGAVALID, alignment 0.
        b[28..32].copy_from_slice(&0x8000_0000u32.to_be_bytes());
        b[32..40].copy_from_slice(&MAX_WRITE_SAME_BLOCKS.to_be_bytes());
    }
    b
}

/// Logical block provisioning: UNMAP, WRITE SAME 16 and 10 with UNMAP,
/// unmapped blocks read as zeros (LBPRZ), thin provisioned.
fn provisioning() -> Vec<u8> {
    vec![0x00, 0xe0 | 0x04, 0x02, 0x00]
}

/// READ CAPACITY(10): the last LBA (0xffffffff when it does not fit) and
/// the block size.
pub fn read_capacity_10(lu: &LogicalUnit) -> Bytes {
    let last = lu.blocks().saturating_sub(1).min(u64::from(u32::MAX)) as u32;
    let mut d = last.to_be_bytes().to_vec();
    d.extend_from_slice(&BLOCK_SIZE.to_be_bytes());
    Bytes::from(d)
}

/// READ CAPACITY(16): the last LBA, block size, physical block exponent and
/// logical block provisioning (LBPME, LBPRZ).
pub fn read_capacity_16(lu: &LogicalUnit, cdb: &[u8]) -> Bytes {
    let alloc = be32(&cdb[10..]);
    let mut d = vec![0u8; 32];
    d[0..8].copy_from_slice(&lu.blocks().saturating_sub(1).to_be_bytes());
    d[8..12].copy_from_slice(&BLOCK_SIZE.to_be_bytes());
    d[13] = PHYSICAL_EXPONENT;
    d[14] = 0xc0;
    truncate(d, alloc)
}

/// REPORT LUNS: LUN 0 only.
pub fn report_luns(cdb: &[u8]) -> CmdResult {
    let alloc = be32(&cdb[6..]);
    if alloc < 16 || !matches!(cdb[2], 0x00..=0x02 | 0x10..=0x12) {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    let mut d = vec![0u8; 16];
    d[3] = 8;
    Ok(truncate(d, alloc))
}

/// REQUEST SENSE: no sense pending (errors are reported with their status,
/// autosense).
pub fn request_sense(cdb: &[u8]) -> Bytes {
    let descriptor = cdb[1] & 0x01 != 0;
    let none = Sense {
        key: super::sense::key::NO_SENSE,
        asc: 0,
        ascq: 0,
        info: None,
    };
    truncate(none.encode(descriptor), cdb[4].into())
}

/// One entry of REPORT SUPPORTED OPERATION CODES: opcode, service action
/// (if any) and CDB length.
struct OpInfo {
    op: u8,
    sa: Option<u8>,
    len: u16,
}

const fn op(op: u8, len: u16) -> OpInfo {
    OpInfo { op, sa: None, len }
}

const fn op_sa(op: u8, sa: u8, len: u16) -> OpInfo {
    OpInfo {
        op,
        sa: Some(sa),
        len,
    }
}

/// Every command [`LogicalUnit`] answers.
const SUPPORTED: &[OpInfo] = {
    use opcode::*;
    &[
        op(TEST_UNIT_READY, 6),
        op(REQUEST_SENSE, 6),
        op(READ_6, 6),
        op(WRITE_6, 6),
        op(INQUIRY, 6),
        op(MODE_SELECT_6, 6),
        op(RESERVE_6, 6),
        op(RELEASE_6, 6),
        op(MODE_SENSE_6, 6),
        op(START_STOP_UNIT, 6),
        op(PREVENT_ALLOW, 6),
        op(READ_CAPACITY_10, 10),
        op(READ_10, 10),
        op(WRITE_10, 10),
        op(WRITE_VERIFY_10, 10),
        op(VERIFY_10, 10),
        op(PREFETCH_10, 10),
        op(SYNC_CACHE_10, 10),
        op(WRITE_SAME_10, 10),
        op(UNMAP, 10),
        op(MODE_SELECT_10, 10),
        op(MODE_SENSE_10, 10),
        op_sa(PR_IN, 0x00, 10),
        op_sa(PR_IN, 0x01, 10),
        op_sa(PR_IN, 0x02, 10),
        op_sa(PR_IN, 0x03, 10),
        op_sa(PR_OUT, 0x00, 10),
        op_sa(PR_OUT, 0x01, 10),
        op_sa(PR_OUT, 0x02, 10),
        op_sa(PR_OUT, 0x03, 10),
        op_sa(PR_OUT, 0x04, 10),
        op_sa(PR_OUT, 0x05, 10),
        op_sa(PR_OUT, 0x06, 10),
        op(READ_16, 16),
        op(COMPARE_AND_WRITE, 16),
        op(WRITE_16, 16),
        op(ORWRITE_16, 16),
        op(WRITE_VERIFY_16, 16),
        op(VERIFY_16, 16),
        op(PREFETCH_16, 16),
        op(SYNC_CACHE_16, 16),
        op(WRITE_SAME_16, 16),
        op_sa(SERVICE_ACTION_IN_16, SAI_READ_CAPACITY_16, 16),
        op_sa(SERVICE_ACTION_IN_16, SAI_GET_LBA_STATUS, 16),
        op(REPORT_LUNS, 12),
        op_sa(MAINTENANCE_IN, MI_REPORT_SUPPORTED_OPCODES, 12),
        op(READ_12, 12),
        op(WRITE_12, 12),
        op(WRITE_VERIFY_12, 12),
        op(VERIFY_12, 12),
    ]
};

/// Whether the unit answers `opcode` at all.
pub fn is_supported(opcode: u8) -> bool {
    SUPPORTED.iter().any(|i| i.op == opcode)
}

/// The CDB usage map of one command: which bits of each CDB byte it reads.
fn usage(info: &OpInfo) -> Vec<u8> {
    let mut u = vec![0xffu8; info.len as usize];
    u[0] = info.op;
    if let Some(sa) = info.sa {
        u[1] = 0xe0 | sa;
    }
    // The CONTROL byte: only NACA and LINK are defined.
    if let Some(last) = u.last_mut() {
        *last = 0x07;
    }
    u
}

/// Command timeouts descriptor (RCTD): length 0x0a, no timeouts given.
const TIMEOUTS: [u8; 12] = [0, 0x0a, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];

/// REPORT SUPPORTED OPERATION CODES.
pub fn report_supported_opcodes(cdb: &[u8]) -> CmdResult {
    let rctd = cdb[2] & 0x80 != 0;
    let options = cdb[2] & 0x07;
    let req_op = cdb[3];
    let req_sa = be16(&cdb[4..]);
    let alloc = be32(&cdb[6..]);
    match options {
        0 => {
            let mut list = Vec::new();
            for info in SUPPORTED {
                list.push(info.op);
                list.push(0);
                list.extend_from_slice(&u16::from(info.sa.unwrap_or(0)).to_be_bytes());
                list.push(0);
                list.push(u8::from(info.sa.is_some()) | if rctd { 0x02 } else { 0 });
                list.extend_from_slice(&info.len.to_be_bytes());
                if rctd {
                    list.extend_from_slice(&TIMEOUTS);
                }
            }
            let mut out = (list.len() as u32).to_be_bytes().to_vec();
            out.extend(list);
            Ok(truncate(out, alloc))
        }
        1..=3 => {
            let has_sa = |o: u8| SUPPORTED.iter().any(|i| i.op == o && i.sa.is_some());
            let found = SUPPORTED.iter().find(|i| {
                i.op == req_op
                    && match options {
                        1 => i.sa.is_none(),
                        2 => i.sa.map(u16::from) == Some(req_sa as u16),
                        _ => i.sa.is_none() || i.sa.map(u16::from) == Some(req_sa as u16),
                    }
            });
            // Asking without a service action for a command that has one (or
            // the reverse) is an invalid field.
            if (options == 1 && has_sa(req_op))
                || (options == 2
                    && found.is_none()
                    && !has_sa(req_op)
                    && SUPPORTED.iter().any(|i| i.op == req_op))
            {
                return Err(Sense::INVALID_FIELD_IN_CDB.into());
            }
            let mut out = vec![0u8; 4];
            match found {
                Some(info) => {
                    out[1] = 0x03 | if rctd { 0x80 } else { 0 };
                    let u = usage(info);
                    out[2..4].copy_from_slice(&(u.len() as u16).to_be_bytes());
                    out.extend(u);
                    if rctd {
                        out.extend_from_slice(&TIMEOUTS);
                    }
                }
                None => out[1] = 0x01,
            }
            Ok(truncate(out, alloc))
        }
        _ => Err(Sense::INVALID_FIELD_IN_CDB.into()),
    }
}
