//! iSCSI PDUs on the wire (RFC 7143 §11): the 48-byte Basic Header Segment,
//! additional header segments, the data segment and its padding.
//!
//! ```text
//! byte  0      .I opcode (6 bits)       I = immediate delivery
//!       1      opcode-specific flags    F (0x80) = final
//!       2..3   opcode-specific
//!       4      TotalAHSLength (4-byte words)
//!       5..7   DataSegmentLength (bytes, 24 bits, padded to 4 on the wire)
//!       8..15  LUN or opcode-specific
//!       16..19 Initiator Task Tag
//!       20..47 opcode-specific
//! ```
//!
//! Reading checks every length before anything is allocated: the data
//! segment against the limit the caller declared (MaxRecvDataSegmentLength,
//! or the login default), the AHS against its 1020-byte maximum. Digests are
//! never negotiated (`HeaderDigest=None`, `DataDigest=None`), so none are
//! read or written.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;

/// The "no task" tag (ITT of unsolicited NOP-Ins, TTT of unsolicited data).
pub const RESERVED_TAG: u32 = 0xffff_ffff;

/// Opcodes, initiator to target and target to initiator.
pub mod op {
    /// NOP-Out (ping, or answer to a NOP-In).
    pub const NOP_OUT: u8 = 0x00;
    /// SCSI Command.
    pub const SCSI_CMD: u8 = 0x01;
    /// Task Management Function Request.
    pub const TMF_REQ: u8 = 0x02;
    /// Login Request.
    pub const LOGIN_REQ: u8 = 0x03;
    /// Text Request.
    pub const TEXT_REQ: u8 = 0x04;
    /// SCSI Data-Out.
    pub const DATA_OUT: u8 = 0x05;
    /// Logout Request.
    pub const LOGOUT_REQ: u8 = 0x06;
    /// SNACK Request (needs ErrorRecoveryLevel > 0: rejected).
    pub const SNACK: u8 = 0x10;
    /// NOP-In.
    pub const NOP_IN: u8 = 0x20;
    /// SCSI Response.
    pub const SCSI_RESP: u8 = 0x21;
    /// Task Management Function Response.
    pub const TMF_RESP: u8 = 0x22;
    /// Login Response.
    pub const LOGIN_RESP: u8 = 0x23;
    /// Text Response.
    pub const TEXT_RESP: u8 = 0x24;
    /// SCSI Data-In.
    pub const DATA_IN: u8 = 0x25;
    /// Logout Response.
    pub const LOGOUT_RESP: u8 = 0x26;
    /// Ready To Transfer.
    pub const R2T: u8 = 0x31;
    /// Reject.
    pub const REJECT: u8 = 0x3f;
}

/// Reject reasons (RFC 7143 §11.17.1).
pub mod reject {
    /// Command not supported (SNACK without error recovery).
    pub const NOT_SUPPORTED: u8 = 0x05;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u8 = 0x04;
    /// Invalid PDU field.
    pub const INVALID_FIELD: u8 = 0x09;
}

/// Longest AHS the format allows (TotalAHSLength is one byte of words).
const MAX_AHS: usize = 255 * 4;

/// What reading a PDU can fail with.
#[derive(Debug, thiserror::Error)]
pub enum PduError {
    /// The peer closed the connection between two PDUs.
    #[error("connection closed")]
    Closed,
    /// The socket failed, or closed in the middle of a PDU.
    #[error("read pdu - {0}")]
    Io(#[from] std::io::Error),
    /// A data segment longer than this side accepts.
    #[error("read pdu - data segment of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// Length announced.
        len: u32,
        /// Limit in force.
        max: u32,
    },
    /// A field that makes the PDU unusable.
    #[error("read pdu - {0}")]
    Malformed(&'static str),
}

/// One PDU received from the initiator.
#[derive(Debug, Clone)]
pub struct Pdu {
    /// The Basic Header Segment.
    pub bhs: [u8; BHS_LEN],
    /// Additional header segments (an extended CDB), usually empty.
    pub ahs: Bytes,
    /// The data segment, without padding.
    pub data: Bytes,
}

impl Pdu {
    /// The opcode.
    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3f
    }

    /// Whether the I (immediate delivery) bit is set.
    pub fn immediate(&self) -> bool {
        self.bhs[0] & 0x40 != 0
    }

    /// Byte 1: the opcode-specific flags.
    pub fn flags(&self) -> u8 {
        self.bhs[1]
    }

    /// Whether the F (final) bit is set.
    pub fn final_bit(&self) -> bool {
        self.bhs[1] & 0x80 != 0
    }

    /// The big-endian word at `at`.
    pub fn u32_at(&self, at: usize) -> u32 {
        be32(&self.bhs[at..at + 4])
    }

    /// The Initiator Task Tag.
    pub fn itt(&self) -> u32 {
        self.u32_at(16)
    }

    /// The Target Transfer Tag (NOP-Out, Data-Out, Text).
    pub fn ttt(&self) -> u32 {
        self.u32_at(20)
    }

    /// CmdSN (commands, NOP-Out, TMF, Text, Logout, Login).
    pub fn cmd_sn(&self) -> u32 {
        self.u32_at(24)
    }

    /// The LUN field as sent.
    pub fn lun(&self) -> u64 {
        u64::from_be_bytes(self.bhs[8..16].try_into().unwrap_or([0; 8]))
    }

    /// The 16-byte CDB of a SCSI Command.
    pub fn cdb(&self) -> &[u8] {
        &self.bhs[32..48]
    }
}

/// Big-endian u32 of the first four bytes of `b`.
pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Reads one PDU whose data segment may be at most `max_data` bytes.
///
/// # Errors
/// [`PduError::Closed`] at a clean end of stream, `TooLong` or `Malformed`
/// for lengths this side does not accept (the connection must then close),
/// `Io` for socket errors.
pub async fn read_pdu<R: AsyncRead + Unpin>(r: &mut R, max_data: u32) -> Result<Pdu, PduError> {
    let mut bhs = [0u8; BHS_LEN];
    // A clean close is only one that happens before the first byte.
    let n = r.read(&mut bhs).await?;
    if n == 0 {
        return Err(PduError::Closed);
    }
    r.read_exact(&mut bhs[n..]).await?;
    let ahs_len = bhs[4] as usize * 4;
    let data_len = u32::from_be_bytes([0, bhs[5], bhs[6], bhs[7]]);
    if data_len > max_data {
        return Err(PduError::TooLong {
            len: data_len,
            max: max_data,
        });
    }
    debug_assert!(ahs_len <= MAX_AHS);
    let ahs = if ahs_len > 0 {
        let mut buf = BytesMut::zeroed(ahs_len);
        r.read_exact(&mut buf).await?;
        buf.freeze()
    } else {
        Bytes::new()
    };
    let data = if data_len > 0 {
        let padded = (data_len as usize + 3) & !3;
        let mut buf = BytesMut::zeroed(padded);
        r.read_exact(&mut buf).await?;
        buf.truncate(data_len as usize);
        buf.freeze()
    } else {
        Bytes::new()
    };
    Ok(Pdu { bhs, ahs, data })
}

/// How the writer fills the sequence numbers of an outgoing PDU, which only
/// it knows at the moment the PDU goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stamp {
    /// Carries a status: takes the next StatSN (and advances it), plus
    /// ExpCmdSN and MaxCmdSN.
    Status,
    /// Shows the next StatSN without taking it (R2T, NOP-In pings,
    /// Reject), plus ExpCmdSN and MaxCmdSN.
    Peek,
    /// Data-In without status: ExpCmdSN and MaxCmdSN only.
    Window,
}

/// One PDU to send: header, data segment (padded by the writer) and how to
/// stamp its sequence numbers.
#[derive(Debug, Clone)]
pub struct OutPdu {
    /// The Basic Header Segment; bytes 24..36 are filled by the writer
    /// according to `stamp`.
    pub bhs: [u8; BHS_LEN],
    /// The data segment.
    pub data: Bytes,
    /// Sequence numbers to fill in.
    pub stamp: Stamp,
}

impl OutPdu {
    /// A PDU of `opcode` with `flags`, for task `itt`, carrying `data`.
    pub fn new(opcode: u8, flags: u8, itt: u32, data: Bytes, stamp: Stamp) -> OutPdu {
        let mut bhs = [0u8; BHS_LEN];
        bhs[0] = opcode;
        bhs[1] = flags;
        let len = data.len() as u32;
        bhs[5..8].copy_from_slice(&len.to_be_bytes()[1..]);
        bhs[16..20].copy_from_slice(&itt.to_be_bytes());
        OutPdu { bhs, data, stamp }
    }

    /// Sets the big-endian word at `at`.
    pub fn set_u32(&mut self, at: usize, v: u32) -> &mut Self {
        self.bhs[at..at + 4].copy_from_slice(&v.to_be_bytes());
        self
    }

    /// Sets the LUN field.
    pub fn set_lun(&mut self, lun: u64) -> &mut Self {
        self.bhs[8..16].copy_from_slice(&lun.to_be_bytes());
        self
    }

    /// Fills StatSN (24), ExpCmdSN (28) and MaxCmdSN (32) as `stamp` says;
    /// `stat_sn` is the next StatSN, returned advanced when taken.
    pub fn stamp(&mut self, stat_sn: u32, exp_cmd_sn: u32, max_cmd_sn: u32) -> u32 {
        let next = match self.stamp {
            Stamp::Status => {
                self.set_u32(24, stat_sn);
                stat_sn.wrapping_add(1)
            }
            Stamp::Peek => {
                self.set_u32(24, stat_sn);
                stat_sn
            }
            Stamp::Window => stat_sn,
        };
        self.set_u32(28, exp_cmd_sn);
        self.set_u32(32, max_cmd_sn);
        next
    }

    /// Bytes of padding after the data segment.
    pub fn padding(&self) -> usize {
        (4 - self.data.len() % 4) % 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(opcode: u8, ahs_words: u8, data_len: u32) -> Vec<u8> {
        let mut h = vec![0u8; BHS_LEN];
        h[0] = opcode;
        h[4] = ahs_words;
        h[5..8].copy_from_slice(&data_len.to_be_bytes()[1..]);
        h
    }

    #[tokio::test]
    async fn reads_padding_and_checks_length_before_allocating() {
        let mut wire = header(op::NOP_OUT, 1, 5);
        wire.extend_from_slice(&[9; 4]);
        wire.extend_from_slice(b"hello\0\0\0");
        wire.extend(header(op::NOP_OUT, 0, 0));
        let mut r = &wire[..];
        let p = read_pdu(&mut r, 8192).await.unwrap();
        assert_eq!(&p.data[..], b"hello");
        assert_eq!(p.ahs.len(), 4);
        let p = read_pdu(&mut r, 8192).await.unwrap();
        assert!(p.data.is_empty());
        assert!(matches!(
            read_pdu(&mut r, 8192).await,
            Err(PduError::Closed)
        ));

        // 16 MiB announced, nothing sent: refused from the header alone.
        let wire = header(op::SCSI_CMD, 0, 0xff_ffff);
        let mut r = &wire[..];
        assert!(matches!(
            read_pdu(&mut r, 262_144).await,
            Err(PduError::TooLong { .. })
        ));
        // A header cut short is an I/O error, not a clean close.
        let wire = header(op::SCSI_CMD, 0, 0);
        let mut r = &wire[..20];
        assert!(matches!(read_pdu(&mut r, 8192).await, Err(PduError::Io(_))));
    }

    #[test]
    fn stamps_take_or_peek_the_stat_sn() {
        let mut p = OutPdu::new(
            op::SCSI_RESP,
            0x80,
            7,
            Bytes::from_static(b"abc"),
            Stamp::Status,
        );
        assert_eq!(p.stamp(10, 3, 9), 11);
        assert_eq!(be32(&p.bhs[24..]), 10);
        assert_eq!(be32(&p.bhs[32..]), 9);
        assert_eq!(p.padding(), 1);
        let mut p = OutPdu::new(op::R2T, 0x80, 7, Bytes::new(), Stamp::Peek);
        assert_eq!(p.stamp(10, 3, 9), 10);
        assert_eq!(be32(&p.bhs[24..]), 10);
    }
}
