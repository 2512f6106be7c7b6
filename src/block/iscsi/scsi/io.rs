//! The data commands (SBC-3): READ, WRITE, WRITE AND VERIFY and VERIFY in
//! their 6/10/12/16-byte forms, WRITE SAME 10/16 (with UNMAP), UNMAP,
//! COMPARE AND WRITE, ORWRITE, SYNCHRONIZE CACHE, PRE-FETCH and GET LBA
//! STATUS, each mapped onto one [`BlockDevice`](crate::block::BlockDevice)
//! call: read, write (FUA: durable on return), write_zeroes, trim, flush,
//! extents.
//!
//! Protection information is not supported: a non-zero RDPROTECT,
//! WRPROTECT, VRPROTECT or ORPROTECT field is an invalid field in the CDB.

use bytes::{Bytes, BytesMut};

use super::{be16, be32, be64, lba_and_blocks, opcode, CmdResult, Fail, LogicalUnit, Sense};
use super::{BLOCK_SIZE, MAX_TRANSFER_BLOCKS};
use crate::block::ExtentKind;

/// Longest WRITE SAME in blocks (1 GiB): zeroing and unmapping are cheap,
/// a repeated pattern is written in [`PATTERN_CHUNK`] pieces.
pub const MAX_WRITE_SAME_BLOCKS: u64 = 1 << 21;

/// Most block descriptors in one UNMAP.
pub const MAX_UNMAP_DESCRIPTORS: u32 = 256;

/// Most blocks of one COMPARE AND WRITE.
pub const MAX_CAW_BLOCKS: u8 = 255;

/// Bytes written per device call by a WRITE SAME with a non-zero pattern.
const PATTERN_CHUNK: usize = 1 << 20;

/// Bytes of the device GET LBA STATUS looks at per command; the initiator
/// asks again from where the answer ends.
const LBA_STATUS_SPAN: u64 = 1 << 30;

const BS: u64 = BLOCK_SIZE as u64;

/// Checks that `[lba, lba + blocks)` lies on the unit.
fn check_range(lu: &LogicalUnit, lba: u64, blocks: u64) -> Result<(), Fail> {
    match lba.checked_add(blocks) {
        Some(end) if end <= lu.blocks() => Ok(()),
        _ => Err(Sense::LBA_OUT_OF_RANGE.into()),
    }
}

fn check_writable(lu: &LogicalUnit) -> Result<(), Fail> {
    if lu.write_protected() {
        return Err(Sense::WRITE_PROTECTED.into());
    }
    Ok(())
}

/// The protection field (bits 5-7 of byte 1) of every form but the 6-byte.
fn check_protect(cdb: &[u8]) -> Result<(), Fail> {
    if cdb[0] != opcode::READ_6 && cdb[0] != opcode::WRITE_6 && cdb[1] >> 5 != 0 {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    Ok(())
}

fn fua(cdb: &[u8]) -> bool {
    cdb[0] != opcode::WRITE_6 && cdb[1] & 0x08 != 0
}

fn dev_err(e: crate::block::BlockError) -> Fail {
    Fail::Check(Sense::from_block(&e))
}

/// READ(6/10/12/16).
pub async fn read(lu: &LogicalUnit, cdb: &[u8]) -> CmdResult {
    check_protect(cdb)?;
    let (lba, n) = lba_and_blocks(cdb);
    check_range(lu, lba, n.into())?;
    if n == 0 {
        return Ok(Bytes::new());
    }
    if n > MAX_TRANSFER_BLOCKS {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    lu.device()
        .read(lba * BS, n * BLOCK_SIZE)
        .await
        .map_err(dev_err)
}

/// WRITE(6/10/12/16) and WRITE AND VERIFY(10/12/16) (durable on return, as
/// a verify from the medium would need).
pub async fn write(lu: &LogicalUnit, cdb: &[u8], data: Bytes) -> CmdResult {
    check_protect(cdb)?;
    let (lba, n) = lba_and_blocks(cdb);
    check_range(lu, lba, n.into())?;
    if n == 0 {
        return Ok(Bytes::new());
    }
    if n > MAX_TRANSFER_BLOCKS {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    check_writable(lu)?;
    if data.len() as u64 != u64::from(n) * BS {
        return Err(Sense::INVALID_FIELD_IN_IU.into());
    }
    let verify = matches!(
        cdb[0],
        opcode::WRITE_VERIFY_10 | opcode::WRITE_VERIFY_12 | opcode::WRITE_VERIFY_16
    );
    lu.device()
        .write(lba * BS, data, fua(cdb) || verify)
        .await
        .map_err(dev_err)?;
    Ok(Bytes::new())
}

/// The offset of the first byte where `a` and `b` differ.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b.iter()).position(|(x, y)| x != y)
}

/// VERIFY(10/12/16): BYTCHK 0 checks the range; 1 compares the data sent;
/// 3 compares every block with the one block sent.
pub async fn verify(lu: &LogicalUnit, cdb: &[u8], data: Bytes) -> CmdResult {
    check_protect(cdb)?;
    let bytchk = (cdb[1] >> 1) & 0x03;
    if bytchk == 2 {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    let (lba, n) = lba_and_blocks(cdb);
    check_range(lu, lba, n.into())?;
    if n == 0 || bytchk == 0 {
        return Ok(Bytes::new());
    }
    if n > MAX_TRANSFER_BLOCKS {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    let expected: Vec<u8> = if bytchk == 1 {
        data.to_vec()
    } else {
        data.iter()
            .copied()
            .cycle()
            .take(n as usize * BLOCK_SIZE as usize)
            .collect()
    };
    if expected.len() != n as usize * BLOCK_SIZE as usize {
        return Err(Sense::INVALID_FIELD_IN_IU.into());
    }
    let medium = lu
        .device()
        .read(lba * BS, n * BLOCK_SIZE)
        .await
        .map_err(dev_err)?;
    match first_difference(&medium, &expected) {
        Some(at) => Err(Sense::MISCOMPARE.with_info(at as u64).into()),
        None => Ok(Bytes::new()),
    }
}

/// WRITE SAME(10/16): with UNMAP trims; an all-zero block (or NDOB) writes
/// zeros (freeing the range in the write cache either way); any other
/// block is repeated. A block count of 0 means "to the end".
pub async fn write_same(lu: &LogicalUnit, cdb: &[u8], data: Bytes) -> CmdResult {
    check_protect(cdb)?;
    let sixteen = cdb[0] == opcode::WRITE_SAME_16;
    let anchor = cdb[1] & 0x10 != 0;
    let unmap = cdb[1] & 0x08 != 0;
    let ndob = sixteen && cdb[1] & 0x01 != 0;
    if anchor {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    let (lba, n) = lba_and_blocks(cdb);
    let blocks = if n == 0 {
        if lba > lu.blocks() {
            return Err(Sense::LBA_OUT_OF_RANGE.into());
        }
        lu.blocks() - lba
    } else {
        check_range(lu, lba, n.into())?;
        n.into()
    };
    if blocks > MAX_WRITE_SAME_BLOCKS {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    if !ndob && data.len() != BLOCK_SIZE as usize {
        return Err(Sense::INVALID_FIELD_IN_IU.into());
    }
    check_writable(lu)?;
    if blocks == 0 {
        return Ok(Bytes::new());
    }
    let dev = lu.device();
    let (offset, len) = (lba * BS, blocks * BS);
    if unmap {
        // As LIO does and libiscsi expects: UNMAP deallocates whatever the
        // block sent (deallocated blocks read as zeros, LBPRZ).
        dev.trim(offset, len).await.map_err(dev_err)?;
        return Ok(Bytes::new());
    }
    if ndob || data.iter().all(|b| *b == 0) {
        dev.write_zeroes(offset, len, false)
            .await
            .map_err(dev_err)?;
        return Ok(Bytes::new());
    }
    let chunk_len = (len as usize).min(PATTERN_CHUNK);
    let mut chunk = BytesMut::with_capacity(chunk_len);
    while chunk.len() < chunk_len {
        chunk.extend_from_slice(&data);
    }
    let chunk = chunk.freeze();
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(chunk.len() as u64) as usize;
        dev.write(offset + at, chunk.slice(..n), false)
            .await
            .map_err(dev_err)?;
        at += n as u64;
    }
    Ok(Bytes::new())
}

/// UNMAP: trims every block descriptor's range after checking them all.
pub async fn unmap(lu: &LogicalUnit, cdb: &[u8], data: Bytes) -> CmdResult {
    if cdb[1] & 0x01 != 0 {
        // ANCHOR: anchored ranges are not supported (ANC_SUP = 0).
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    let len = be16(&cdb[7..]) as usize;
    if len == 0 {
        return Ok(Bytes::new());
    }
    if len < 8 || data.len() < len {
        return Err(Sense::PARAM_LIST_LENGTH.into());
    }
    let bd_len = be16(&data[2..]) as usize;
    if bd_len > len - 8 {
        return Err(Sense::PARAM_LIST_LENGTH.into());
    }
    let count = bd_len / 16;
    if count > MAX_UNMAP_DESCRIPTORS as usize {
        return Err(Sense::INVALID_FIELD_IN_PARAM.into());
    }
    let mut ranges = Vec::with_capacity(count);
    for i in 0..count {
        let d = &data[8 + 16 * i..8 + 16 * (i + 1)];
        let (lba, n) = (be64(d), u64::from(be32(&d[8..])));
        check_range(lu, lba, n)?;
        ranges.push((lba, n));
    }
    check_writable(lu)?;
    for (lba, n) in ranges {
        if n > 0 {
            lu.device().trim(lba * BS, n * BS).await.map_err(dev_err)?;
        }
    }
    Ok(Bytes::new())
}

/// COMPARE AND WRITE: compares the first half of the data with the medium
/// and, if equal, writes the second half, atomically with respect to other
/// COMPARE AND WRITE and ORWRITE commands.
pub async fn compare_and_write(lu: &LogicalUnit, cdb: &[u8], data: Bytes) -> CmdResult {
    check_protect(cdb)?;
    let (lba, n) = lba_and_blocks(cdb);
    if n == 0 {
        return Ok(Bytes::new());
    }
    if n > u32::from(MAX_CAW_BLOCKS) {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    check_range(lu, lba, n.into())?;
    check_writable(lu)?;
    let len = n as usize * BLOCK_SIZE as usize;
    if data.len() != 2 * len {
        return Err(Sense::INVALID_FIELD_IN_IU.into());
    }
    let _atomic = lu.atomic.lock().await;
    let medium = lu
        .device()
        .read(lba * BS, len as u32)
        .await
        .map_err(dev_err)?;
    if let Some(at) = first_difference(&medium, &data[..len]) {
        return Err(Sense::MISCOMPARE.with_info(at as u64).into());
    }
    lu.device()
        .write(lba * BS, data.slice(len..), fua(cdb))
        .await
        .map_err(dev_err)?;
    Ok(Bytes::new())
}

/// ORWRITE(16): ORs the data into the medium.
pub async fn orwrite(lu: &LogicalUnit, cdb: &[u8], data: Bytes) -> CmdResult {
    check_protect(cdb)?;
    let (lba, n) = lba_and_blocks(cdb);
    check_range(lu, lba, n.into())?;
    if n == 0 {
        return Ok(Bytes::new());
    }
    if n > MAX_TRANSFER_BLOCKS {
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    check_writable(lu)?;
    let len = n as usize * BLOCK_SIZE as usize;
    if data.len() != len {
        return Err(Sense::INVALID_FIELD_IN_IU.into());
    }
    let _atomic = lu.atomic.lock().await;
    let medium = lu
        .device()
        .read(lba * BS, len as u32)
        .await
        .map_err(dev_err)?;
    let merged: Vec<u8> = medium.iter().zip(data.iter()).map(|(a, b)| a | b).collect();
    lu.device()
        .write(lba * BS, Bytes::from(merged), fua(cdb))
        .await
        .map_err(dev_err)?;
    Ok(Bytes::new())
}

/// SYNCHRONIZE CACHE(10/16): the write cache journal's sync, the same as
/// an NFS COMMIT. The range is checked; the flush covers the whole device.
pub async fn synchronize_cache(lu: &LogicalUnit, cdb: &[u8]) -> CmdResult {
    let (lba, n) = lba_and_blocks(cdb);
    if n == 0 {
        if lba > lu.blocks() {
            return Err(Sense::LBA_OUT_OF_RANGE.into());
        }
    } else {
        check_range(lu, lba, n.into())?;
    }
    lu.device().flush().await.map_err(dev_err)?;
    Ok(Bytes::new())
}

/// PRE-FETCH(10/16): the range is checked; reads are served from the block
/// cache and readahead already.
pub fn prefetch(lu: &LogicalUnit, cdb: &[u8]) -> CmdResult {
    let (lba, n) = lba_and_blocks(cdb);
    check_range(lu, lba, n.into())?;
    Ok(Bytes::new())
}

/// GET LBA STATUS: mapped (data) and deallocated (zero) runs from the
/// starting LBA, from the device's extents.
pub async fn get_lba_status(lu: &LogicalUnit, cdb: &[u8]) -> CmdResult {
    let start = be64(&cdb[2..]);
    let alloc = be32(&cdb[10..]) as usize;
    if start >= lu.blocks() {
        return Err(Sense::LBA_OUT_OF_RANGE.into());
    }
    let max_desc = (alloc.saturating_sub(8) / 16).max(1);
    let offset = start * BS;
    let len = (lu.device().size() / BS * BS - offset).min(LBA_STATUS_SPAN);
    let extents = lu.device().extents(offset, len).await.map_err(dev_err)?;
    let mut descs: Vec<(u64, u64, u8)> = Vec::new();
    for e in extents {
        let (lba, mut blocks) = (e.offset / BS, e.len.div_ceil(BS));
        let status = match e.kind {
            ExtentKind::Data => 0u8,
            ExtentKind::Zero => 1u8,
        };
        match descs.last_mut() {
            Some(last) if last.2 == status && last.0 + last.1 == lba => last.1 += blocks,
            _ => {
                // A descriptor counts at most u32::MAX blocks.
                let mut at = lba;
                while blocks > 0 {
                    let n = blocks.min(u64::from(u32::MAX));
                    descs.push((at, n, status));
                    at += n;
                    blocks -= n;
                }
            }
        }
        if descs.len() >= max_desc {
            break;
        }
    }
    descs.truncate(max_desc);
    let mut out = vec![0u8; 8];
    out[0..4].copy_from_slice(&((4 + 16 * descs.len()) as u32).to_be_bytes());
    for (lba, n, status) in descs {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&lba.to_be_bytes());
        d[8..12].copy_from_slice(&(n.min(u64::from(u32::MAX)) as u32).to_be_bytes());
        d[12] = status;
        out.extend_from_slice(&d);
    }
    out.truncate(alloc);
    Ok(Bytes::from(out))
}
