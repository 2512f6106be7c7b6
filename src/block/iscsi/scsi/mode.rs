//! MODE SENSE 6/10 and MODE SELECT 6/10 (SPC-4 §7.5): the caching page
//! (write cache enabled: initiators must SYNCHRONIZE CACHE for durability,
//! which is true of the write cache journal), the control page (SWP and
//! D_SENSE are changeable) and the informational exceptions page, with the
//! short or long block descriptor.

use bytes::Bytes;

use super::{be16, opcode, CmdResult, LogicalUnit, ModeSettings, Sense, BLOCK_SIZE};

const CACHING: u8 = 0x08;
const CONTROL: u8 = 0x0a;
const INFO_EXCEPTIONS: u8 = 0x1c;
const ALL_PAGES: u8 = 0x3f;

/// Page control of MODE SENSE.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pc {
    Current,
    Changeable,
    Default,
}

fn page(code: u8, pc: Pc, mode: ModeSettings) -> Vec<u8> {
    match code {
        CACHING => {
            let mut p = vec![0u8; 20];
            p[0] = CACHING;
            p[1] = 0x12;
            if pc != Pc::Changeable {
                p[2] = 0x04; // WCE
            }
            p
        }
        CONTROL => {
            let mut p = vec![0u8; 12];
            p[0] = CONTROL;
            p[1] = 0x0a;
            match pc {
                Pc::Changeable => {
                    p[2] = 0x04; // D_SENSE
                    p[4] = 0x08; // SWP
                }
                Pc::Current | Pc::Default => {
                    let m = if pc == Pc::Current {
                        mode
                    } else {
                        ModeSettings::default()
                    };
                    p[2] = if m.d_sense { 0x04 } else { 0 };
                    // Queue algorithm modifier 1: unrestricted reordering.
                    p[3] = 0x10;
                    p[4] = if m.swp { 0x08 } else { 0 };
                    p[8..10].copy_from_slice(&0xffffu16.to_be_bytes());
                }
            }
            p
        }
        _ => {
            let mut p = vec![0u8; 12];
            p[0] = INFO_EXCEPTIONS;
            p[1] = 0x0a;
            p
        }
    }
}

/// MODE SENSE(6) and MODE SENSE(10).
pub fn mode_sense(lu: &LogicalUnit, cdb: &[u8]) -> CmdResult {
    let ten = cdb[0] == opcode::MODE_SENSE_10;
    let dbd = cdb[1] & 0x08 != 0;
    let llbaa = ten && cdb[1] & 0x10 != 0;
    let pc = match cdb[2] >> 6 {
        0 => Pc::Current,
        1 => Pc::Changeable,
        2 => Pc::Default,
        _ => return Err(Sense::SAVING_NOT_SUPPORTED.into()),
    };
    let code = cdb[2] & 0x3f;
    let subpage = cdb[3];
    let alloc = if ten { be16(&cdb[7..]) } else { cdb[4].into() };
    let mode = lu.mode();
    let pages: Vec<u8> = match (code, subpage) {
        (ALL_PAGES, 0x00 | 0xff) => [CACHING, CONTROL, INFO_EXCEPTIONS]
            .iter()
            .flat_map(|c| page(*c, pc, mode))
            .collect(),
        (CACHING | CONTROL | INFO_EXCEPTIONS, 0x00) => page(code, pc, mode),
        _ => return Err(Sense::INVALID_FIELD_IN_CDB.into()),
    };
    let blocks = lu.blocks();
    let descriptor: Vec<u8> = if dbd {
        Vec::new()
    } else if llbaa {
        let mut d = vec![0u8; 16];
        d[0..8].copy_from_slice(&blocks.to_be_bytes());
        d[12..16].copy_from_slice(&BLOCK_SIZE.to_be_bytes());
        d
    } else {
        let mut d = vec![0u8; 8];
        d[0..4].copy_from_slice(&(blocks.min(0xffff_ffff) as u32).to_be_bytes());
        d[5..8].copy_from_slice(&BLOCK_SIZE.to_be_bytes()[1..]);
        d
    };
    // Device-specific parameter: WP when writes are refused; DPOFUA.
    let specific = 0x10 | if lu.write_protected() { 0x80 } else { 0 };
    let mut out = if ten {
        let mut h = vec![0u8; 8];
        h[3] = specific;
        h[4] = u8::from(llbaa && !dbd);
        h[6..8].copy_from_slice(&(descriptor.len() as u16).to_be_bytes());
        h
    } else {
        vec![0, 0, specific, descriptor.len() as u8]
    };
    out.extend(descriptor);
    out.extend(pages);
    // Mode data length: the bytes after itself.
    if ten {
        let n = (out.len() - 2) as u16;
        out[0..2].copy_from_slice(&n.to_be_bytes());
    } else {
        out[0] = (out.len() - 1).min(255) as u8;
    }
    out.truncate(alloc as usize);
    Ok(Bytes::from(out))
}

/// MODE SELECT(6) and MODE SELECT(10): applies SWP and D_SENSE of a control
/// page; the caching and informational exceptions pages are accepted as
/// they are (nothing in them is changeable).
pub fn mode_select(mode: &mut ModeSettings, cdb: &[u8], data: &[u8]) -> Result<(), super::Fail> {
    let ten = cdb[0] == opcode::MODE_SELECT_10;
    if cdb[1] & 0x01 != 0 {
        // SP: saving pages is not supported.
        return Err(Sense::INVALID_FIELD_IN_CDB.into());
    }
    let declared = if ten { be16(&cdb[7..]) } else { cdb[4].into() } as usize;
    if declared == 0 {
        return Ok(());
    }
    let header = if ten { 8 } else { 4 };
    if data.len() < header || data.len() < declared {
        return Err(Sense::PARAM_LIST_LENGTH.into());
    }
    let data = &data[..declared];
    let bd_len = if ten {
        be16(&data[6..]) as usize
    } else {
        data[3] as usize
    };
    let mut at = header + bd_len;
    if at > data.len() {
        return Err(Sense::PARAM_LIST_LENGTH.into());
    }
    let mut next = *mode;
    while at < data.len() {
        if data.len() < at + 2 {
            return Err(Sense::PARAM_LIST_LENGTH.into());
        }
        let code = data[at] & 0x3f;
        if data[at] & 0xc0 != 0 {
            return Err(Sense::INVALID_FIELD_IN_PARAM.into());
        }
        let len = data[at + 1] as usize;
        let end = at + 2 + len;
        if end > data.len() {
            return Err(Sense::PARAM_LIST_LENGTH.into());
        }
        let body = &data[at..end];
        match code {
            CONTROL if len == 0x0a => {
                next.d_sense = body[2] & 0x04 != 0;
                next.swp = body[4] & 0x08 != 0;
            }
            CACHING if len == 0x12 => {}
            INFO_EXCEPTIONS if len == 0x0a => {}
            _ => return Err(Sense::INVALID_FIELD_IN_PARAM.into()),
        }
        at = end;
    }
    *mode = next;
    Ok(())
}
