//! Sense data (SPC-4 §4.5): what a CHECK CONDITION tells the initiator, in
//! fixed format (0x70) or, when the control mode page's D_SENSE bit is set,
//! descriptor format (0x72). Every error of a SCSI command becomes one of
//! the [`Sense`] values below in exactly one place ([`Sense::from_block`]
//! for the device's errors).

use crate::block::BlockError;

/// Sense keys used here.
pub mod key {
    /// No error (REQUEST SENSE with nothing pending).
    pub const NO_SENSE: u8 = 0x0;
    /// The logical unit cannot serve now; retry.
    pub const NOT_READY: u8 = 0x2;
    /// Unrecovered read or write error.
    pub const MEDIUM_ERROR: u8 = 0x3;
    /// The command or its parameters are wrong.
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    /// Something changed (reset, reservations preempted).
    pub const UNIT_ATTENTION: u8 = 0x6;
    /// Writes refused.
    pub const DATA_PROTECT: u8 = 0x7;
    /// The command was aborted.
    pub const ABORTED_COMMAND: u8 = 0xb;
    /// VERIFY or COMPARE AND WRITE found different data.
    pub const MISCOMPARE: u8 = 0xe;
}

/// One sense condition: key, additional sense code and qualifier, and the
/// optional INFORMATION field (first miscompared byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    /// Sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
    /// INFORMATION field, when valid.
    pub info: Option<u64>,
}

impl Sense {
    const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense {
            key,
            asc,
            ascq,
            info: None,
        }
    }

    /// INVALID COMMAND OPERATION CODE.
    pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
    /// LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
    /// INVALID FIELD IN CDB.
    pub const INVALID_FIELD_IN_CDB: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x24, 0x00);
    /// LOGICAL UNIT NOT SUPPORTED.
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00);
    /// INVALID FIELD IN PARAMETER LIST.
    pub const INVALID_FIELD_IN_PARAM: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x00);
    /// PARAMETER LIST LENGTH ERROR.
    pub const PARAM_LIST_LENGTH: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x1a, 0x00);
    /// INVALID FIELD IN COMMAND INFORMATION UNIT (EDTL does not match the CDB).
    pub const INVALID_FIELD_IN_IU: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x0e, 0x03);
    /// SAVING PARAMETERS NOT SUPPORTED.
    pub const SAVING_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
    /// INVALID RELEASE OF PERSISTENT RESERVATION.
    pub const INVALID_RELEASE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x26, 0x04);
    /// WRITE PROTECTED.
    pub const WRITE_PROTECTED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x00);
    /// SPACE ALLOCATION FAILED WRITE PROTECT (the write cache is full).
    pub const SPACE_ALLOCATION_FAILED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x07);
    /// UNRECOVERED READ ERROR.
    pub const READ_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x11, 0x00);
    /// LOGICAL UNIT IS IN PROCESS OF BECOMING READY (the backup store is
    /// unreachable for now; initiators retry).
    pub const BECOMING_READY: Sense = Sense::new(key::NOT_READY, 0x04, 0x01);
    /// MISCOMPARE DURING VERIFY OPERATION.
    pub const MISCOMPARE: Sense = Sense::new(key::MISCOMPARE, 0x1d, 0x00);
    /// POWER ON, RESET, OR BUS DEVICE RESET OCCURRED.
    pub const RESET_OCCURRED: Sense = Sense::new(key::UNIT_ATTENTION, 0x29, 0x00);
    /// RESERVATIONS PREEMPTED.
    pub const RESERVATIONS_PREEMPTED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x03);
    /// RESERVATIONS RELEASED.
    pub const RESERVATIONS_RELEASED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x04);
    /// REGISTRATIONS PREEMPTED.
    pub const REGISTRATIONS_PREEMPTED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x05);
    /// MODE PARAMETERS CHANGED.
    pub const MODE_PARAMETERS_CHANGED: Sense = Sense::new(key::UNIT_ATTENTION, 0x2a, 0x01);

    /// The same condition with its INFORMATION field set.
    pub fn with_info(mut self, info: u64) -> Sense {
        self.info = Some(info);
        self
    }

    /// The sense of a device error: the one mapping of [`BlockError`] to SCSI.
    pub fn from_block(e: &BlockError) -> Sense {
        match e {
            BlockError::OutOfRange { .. } => Sense::LBA_OUT_OF_RANGE,
            BlockError::NoSpace => Sense::SPACE_ALLOCATION_FAILED,
            BlockError::ReadOnly => Sense::WRITE_PROTECTED,
            BlockError::Retry => Sense::BECOMING_READY,
            BlockError::Io(_) => Sense::READ_ERROR,
        }
    }

    /// The sense data bytes, descriptor format when `descriptor`.
    pub fn encode(&self, descriptor: bool) -> Vec<u8> {
        if descriptor {
            let mut s = vec![0x72, self.key & 0x0f, self.asc, self.ascq, 0, 0, 0, 0];
            if let Some(info) = self.info {
                // Information descriptor (type 0, VALID bit set).
                s.extend_from_slice(&[0x00, 0x0a, 0x80, 0x00]);
                s.extend_from_slice(&info.to_be_bytes());
            }
            s[7] = (s.len() - 8) as u8;
            s
        } else {
            let mut s = vec![0u8; 18];
            s[0] = 0x70;
            s[2] = self.key & 0x0f;
            if let Some(info) = self.info {
                s[0] |= 0x80;
                s[3..7].copy_from_slice(&(info.min(u64::from(u32::MAX)) as u32).to_be_bytes());
            }
            s[7] = 10;
            s[12] = self.asc;
            s[13] = self.ascq;
            s
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_and_descriptor_formats() {
        let f = Sense::LBA_OUT_OF_RANGE.encode(false);
        assert_eq!((f[0], f[2], f[7], f[12], f[13]), (0x70, 5, 10, 0x21, 0));
        let d = Sense::MISCOMPARE.with_info(7).encode(true);
        assert_eq!((d[0], d[1], d[2], d[7]), (0x72, 0xe, 0x1d, 12));
        assert_eq!(d[19], 7);
        let f = Sense::MISCOMPARE.with_info(7).encode(false);
        assert_eq!((f[0], f[6]), (0xf0, 7));
    }
}
