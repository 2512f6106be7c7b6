//! The SCSI direct-access device (SBC-3/SPC-4) a target presents as LUN 0,
//! over a [`BlockDevice`]: commands in, data and status out. Nothing here
//! knows iSCSI PDUs; the session hands over a CDB and the data-out bytes,
//! and sends back what [`LogicalUnit::execute`] answers.
//!
//! - [`sense`]: sense data, and the one mapping of device errors to SCSI.
//! - [`inquiry`]: INQUIRY (standard data, VPD 0x00 0x80 0x83 0xb0 0xb1
//!   0xb2), READ CAPACITY 10/16, REPORT LUNS, REPORT SUPPORTED OPERATION
//!   CODES.
//! - [`mode`]: MODE SENSE 6/10 and MODE SELECT 6/10 (caching, control,
//!   informational exceptions pages; SWP and D_SENSE changeable).
//! - [`io`]: READ, WRITE, WRITE AND VERIFY, VERIFY (6/10/12/16), WRITE SAME
//!   10/16, UNMAP, COMPARE AND WRITE, ORWRITE, SYNCHRONIZE CACHE, PRE-FETCH,
//!   GET LBA STATUS.
//! - [`pr`]: RESERVE/RELEASE(6) and persistent reservations (in memory, as
//!   tgtd keeps them; APTPL is refused).
//!
//! The logical block is 512 bytes (what Windows, ESXi and QEMU expect of a
//! VMDK-backed disk); the physical block 4 KiB, the write cache's block, so
//! initiators align their writes to it.

pub mod inquiry;
pub mod io;
pub mod mode;
pub mod pr;
pub mod sense;

use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

pub use sense::Sense;

use crate::block::BlockDevice;

/// Logical block size in bytes.
pub const BLOCK_SIZE: u32 = 512;

/// Longest READ or WRITE in blocks (32 MiB): advertised in the Block Limits
/// VPD page and enforced, which bounds what one command may make us buffer.
pub const MAX_TRANSFER_BLOCKS: u32 = 64 * 1024;

/// SCSI status codes.
pub mod status {
    /// GOOD.
    pub const GOOD: u8 = 0x00;
    /// CHECK CONDITION: sense data follows.
    pub const CHECK_CONDITION: u8 = 0x02;
    /// RESERVATION CONFLICT.
    pub const RESERVATION_CONFLICT: u8 = 0x18;
}

/// An I_T nexus: one initiator port (initiator name + ISID) logged in to
/// the target, which reservations are held by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nexus {
    /// Unique per session while the process runs.
    pub id: u64,
    /// `<initiator name>,i,0x<ISID>`, the initiator port's name.
    pub initiator_port: String,
}

/// What a command answers: data for the initiator and a status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// Data-In bytes (may be longer than the initiator expects: the session
    /// truncates and reports the residual).
    pub data: Bytes,
    /// GOOD, CHECK CONDITION or RESERVATION CONFLICT.
    pub status: u8,
    /// Sense data bytes, for CHECK CONDITION.
    pub sense: Option<Bytes>,
}

impl Response {
    /// GOOD with `data`.
    pub fn good(data: impl Into<Bytes>) -> Response {
        Response {
            data: data.into(),
            status: status::GOOD,
            sense: None,
        }
    }

    /// RESERVATION CONFLICT.
    pub fn conflict() -> Response {
        Response {
            data: Bytes::new(),
            status: status::RESERVATION_CONFLICT,
            sense: None,
        }
    }

    /// Whether the status is GOOD.
    pub fn ok(&self) -> bool {
        self.status == status::GOOD
    }
}

/// What a command handler returns: data, or a condition for sense data, or
/// a ready-made response (RESERVATION CONFLICT).
pub type CmdResult = Result<Bytes, Fail>;

/// A command that did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fail {
    /// CHECK CONDITION with this sense.
    Check(Sense),
    /// RESERVATION CONFLICT.
    Conflict,
}

impl From<Sense> for Fail {
    fn from(s: Sense) -> Fail {
        Fail::Check(s)
    }
}

/// Mode page settings an initiator may change (MODE SELECT).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModeSettings {
    /// Software write protect (control page): writes are refused.
    pub swp: bool,
    /// Descriptor-format sense data (control page).
    pub d_sense: bool,
}

/// The state of the logical unit shared by every session.
#[derive(Debug, Default)]
struct LuState {
    mode: ModeSettings,
    reservations: pr::Reservations,
}

/// LUN 0 of a target: the device and its SCSI state.
pub struct LogicalUnit {
    device: Arc<dyn BlockDevice>,
    /// The target's name, for the SCSI name designator of VPD page 0x83.
    target: String,
    state: Mutex<LuState>,
    /// Serializes read-modify-write commands (COMPARE AND WRITE, ORWRITE)
    /// with each other, so two initiators' atomic test-and-set (VMFS ATS)
    /// never interleave.
    atomic: tokio::sync::Mutex<()>,
}

/// The direction and length of the data a command moves, from its CDB
/// alone, before any data is read from the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    /// No data, or data to the initiator.
    None,
    /// This many bytes of data-out are expected.
    Out(u32),
}

fn be16(b: &[u8]) -> u32 {
    u32::from(u16::from_be_bytes([b[0], b[1]]))
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Opcodes.
pub mod opcode {
    #![allow(missing_docs)]
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const RESERVE_6: u8 = 0x16;
    pub const RELEASE_6: u8 = 0x17;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const PREVENT_ALLOW: u8 = 0x1e;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const WRITE_VERIFY_10: u8 = 0x2e;
    pub const VERIFY_10: u8 = 0x2f;
    pub const PREFETCH_10: u8 = 0x34;
    pub const SYNC_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const PR_IN: u8 = 0x5e;
    pub const PR_OUT: u8 = 0x5f;
    pub const READ_16: u8 = 0x88;
    pub const COMPARE_AND_WRITE: u8 = 0x89;
    pub const WRITE_16: u8 = 0x8a;
    pub const ORWRITE_16: u8 = 0x8b;
    pub const WRITE_VERIFY_16: u8 = 0x8e;
    pub const VERIFY_16: u8 = 0x8f;
    pub const PREFETCH_16: u8 = 0x90;
    pub const SYNC_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const MAINTENANCE_IN: u8 = 0xa3;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;
    pub const WRITE_VERIFY_12: u8 = 0xae;
    pub const VERIFY_12: u8 = 0xaf;
    /// Service actions of SERVICE ACTION IN(16).
    pub const SAI_READ_CAPACITY_16: u8 = 0x10;
    pub const SAI_GET_LBA_STATUS: u8 = 0x12;
    /// Service action of MAINTENANCE IN.
    pub const MI_REPORT_SUPPORTED_OPCODES: u8 = 0x0c;
}

/// Whether a CDB is a plain WRITE (whose data length must match the
/// initiator's expected transfer length exactly).
pub fn is_write(cdb: &[u8]) -> bool {
    use opcode::*;
    matches!(
        cdb[0],
        WRITE_6
            | WRITE_10
            | WRITE_12
            | WRITE_16
            | WRITE_VERIFY_10
            | WRITE_VERIFY_12
            | WRITE_VERIFY_16
    )
}

/// The data-out a CDB expects, in bytes. Commands this target does not
/// know expect none (they fail with INVALID COMMAND OPERATION CODE).
pub fn transfer(cdb: &[u8]) -> Transfer {
    use opcode::*;
    let blocks =
        |n: u64| Transfer::Out((n * u64::from(BLOCK_SIZE)).min(u64::from(u32::MAX)) as u32);
    match cdb[0] {
        WRITE_6 => blocks(if cdb[4] == 0 { 256 } else { u64::from(cdb[4]) }),
        WRITE_10 | WRITE_VERIFY_10 => blocks(be16(&cdb[7..]).into()),
        WRITE_12 | WRITE_VERIFY_12 => blocks(be32(&cdb[6..]).into()),
        WRITE_16 | WRITE_VERIFY_16 | ORWRITE_16 => blocks(be32(&cdb[10..]).into()),
        COMPARE_AND_WRITE => blocks(2 * u64::from(cdb[13])),
        WRITE_SAME_10 => blocks(1),
        WRITE_SAME_16 if cdb[1] & 0x01 != 0 => Transfer::None,
        WRITE_SAME_16 => blocks(1),
        VERIFY_10 | VERIFY_12 | VERIFY_16 => {
            let n: u64 = match cdb[0] {
                VERIFY_10 => be16(&cdb[7..]).into(),
                VERIFY_12 => be32(&cdb[6..]).into(),
                _ => be32(&cdb[10..]).into(),
            };
            match (cdb[1] >> 1) & 0x3 {
                0 => Transfer::None,
                1 => blocks(n),
                3 if n > 0 => blocks(1),
                _ => Transfer::None,
            }
        }
        UNMAP | MODE_SELECT_10 => Transfer::Out(be16(&cdb[7..])),
        MODE_SELECT_6 => Transfer::Out(cdb[4].into()),
        PR_OUT => Transfer::Out(be32(&cdb[5..])),
        _ => Transfer::None,
    }
}

impl LogicalUnit {
    /// LUN 0 of target `target` over `device`.
    pub fn new(device: Arc<dyn BlockDevice>, target: &str) -> LogicalUnit {
        LogicalUnit {
            device,
            target: target.to_string(),
            state: Mutex::new(LuState::default()),
            atomic: tokio::sync::Mutex::new(()),
        }
    }

    /// The device.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    /// The name of the target this unit belongs to.
    pub fn target_name(&self) -> &str {
        &self.target
    }

    fn state(&self) -> MutexGuard<'_, LuState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of logical blocks.
    pub fn blocks(&self) -> u64 {
        self.device.size() / u64::from(BLOCK_SIZE)
    }

    /// The current mode settings.
    pub fn mode(&self) -> ModeSettings {
        self.state().mode
    }

    /// Whether writes are refused (read-only export, or SWP set).
    pub fn write_protected(&self) -> bool {
        self.device.read_only() || self.state().mode.swp
    }

    /// Runs one command for `nexus` with its data-out bytes.
    pub async fn execute(&self, nexus: &Nexus, cdb: &[u8], data: Bytes) -> Response {
        let result = match self.check_reservation(nexus, cdb) {
            Ok(()) => self.dispatch(nexus, cdb, data).await,
            Err(fail) => Err(fail),
        };
        match result {
            Ok(data) => Response::good(data),
            Err(Fail::Conflict) => Response::conflict(),
            Err(Fail::Check(sense)) => {
                let descriptor = self.state().mode.d_sense;
                Response {
                    data: Bytes::new(),
                    status: status::CHECK_CONDITION,
                    sense: Some(Bytes::from(sense.encode(descriptor))),
                }
            }
        }
    }

    fn check_reservation(&self, nexus: &Nexus, cdb: &[u8]) -> Result<(), Fail> {
        self.state().reservations.check(nexus, cdb)
    }

    async fn dispatch(&self, nexus: &Nexus, cdb: &[u8], data: Bytes) -> CmdResult {
        use opcode::*;
        match cdb[0] {
            TEST_UNIT_READY | PREVENT_ALLOW => Ok(Bytes::new()),
            START_STOP_UNIT => Ok(Bytes::new()),
            REQUEST_SENSE => Ok(inquiry::request_sense(cdb)),
            INQUIRY => inquiry::inquiry(self, nexus, cdb),
            REPORT_LUNS => inquiry::report_luns(cdb),
            READ_CAPACITY_10 => Ok(inquiry::read_capacity_10(self)),
            MAINTENANCE_IN if cdb[1] & 0x1f == MI_REPORT_SUPPORTED_OPCODES => {
                inquiry::report_supported_opcodes(cdb)
            }
            SERVICE_ACTION_IN_16 if cdb[1] & 0x1f == SAI_READ_CAPACITY_16 => {
                Ok(inquiry::read_capacity_16(self, cdb))
            }
            SERVICE_ACTION_IN_16 if cdb[1] & 0x1f == SAI_GET_LBA_STATUS => {
                io::get_lba_status(self, cdb).await
            }
            MODE_SENSE_6 | MODE_SENSE_10 => mode::mode_sense(self, cdb),
            MODE_SELECT_6 | MODE_SELECT_10 => {
                let mut st = self.state();
                mode::mode_select(&mut st.mode, cdb, &data).map(|()| Bytes::new())
            }
            READ_6 | READ_10 | READ_12 | READ_16 => io::read(self, cdb).await,
            WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16 | WRITE_VERIFY_10 | WRITE_VERIFY_12
            | WRITE_VERIFY_16 => io::write(self, cdb, data).await,
            VERIFY_10 | VERIFY_12 | VERIFY_16 => io::verify(self, cdb, data).await,
            WRITE_SAME_10 | WRITE_SAME_16 => io::write_same(self, cdb, data).await,
            UNMAP => io::unmap(self, cdb, data).await,
            COMPARE_AND_WRITE => io::compare_and_write(self, cdb, data).await,
            ORWRITE_16 => io::orwrite(self, cdb, data).await,
            SYNC_CACHE_10 | SYNC_CACHE_16 => io::synchronize_cache(self, cdb).await,
            PREFETCH_10 | PREFETCH_16 => io::prefetch(self, cdb),
            RESERVE_6 => self.state().reservations.reserve6(nexus),
            RELEASE_6 => self.state().reservations.release6(nexus),
            PR_IN => self.state().reservations.pr_in(cdb),
            PR_OUT => self.state().reservations.pr_out(nexus, cdb, &data),
            _ => Err(Sense::INVALID_OPCODE.into()),
        }
    }

    /// A LUN RESET: releases RESERVE(6) reservations (persistent ones stay).
    pub fn reset(&self) {
        self.state().reservations.reset();
    }

    /// The nexus is gone (logout, dropped connection): its RESERVE(6)
    /// reservation is released.
    pub fn nexus_lost(&self, nexus: &Nexus) {
        self.state().reservations.nexus_lost(nexus);
    }
}

/// Sets the transfer length of a WRITE CDB (a write cut to the initiator's
/// expected transfer length).
pub fn set_blocks(cdb: &mut [u8], n: u32) {
    use opcode::*;
    match cdb[0] {
        WRITE_6 => cdb[4] = n as u8,
        WRITE_10 | WRITE_VERIFY_10 => cdb[7..9].copy_from_slice(&(n as u16).to_be_bytes()),
        WRITE_12 | WRITE_VERIFY_12 => cdb[6..10].copy_from_slice(&n.to_be_bytes()),
        WRITE_16 | WRITE_VERIFY_16 => cdb[10..14].copy_from_slice(&n.to_be_bytes()),
        _ => {}
    }
}

/// The LBA and block count of a READ/WRITE/VERIFY/PRE-FETCH/SYNC CACHE CDB.
pub fn lba_and_blocks(cdb: &[u8]) -> (u64, u32) {
    use opcode::*;
    match cdb[0] {
        READ_6 | WRITE_6 => {
            let lba = u64::from(be32(&[0, cdb[1] & 0x1f, cdb[2], cdb[3]]));
            let n = if cdb[4] == 0 { 256 } else { u32::from(cdb[4]) };
            (lba, n)
        }
        READ_12 | WRITE_12 | WRITE_VERIFY_12 | VERIFY_12 => {
            (be32(&cdb[2..]).into(), be32(&cdb[6..]))
        }
        READ_16 | WRITE_16 | WRITE_VERIFY_16 | VERIFY_16 | ORWRITE_16 | PREFETCH_16
        | SYNC_CACHE_16 | WRITE_SAME_16 => (be64(&cdb[2..]), be32(&cdb[10..])),
        COMPARE_AND_WRITE => (be64(&cdb[2..]), cdb[13].into()),
        // The 10-byte forms.
        _ => (be32(&cdb[2..]).into(), be16(&cdb[7..])),
    }
}

#[cfg(test)]
mod tests;
