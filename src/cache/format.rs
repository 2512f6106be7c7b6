//! On-disk format of a write cache: magic numbers, the header layout and the
//! bitmap layout. Everything that decides how bytes sit on disk lives here and
//! only here; `docs/formats.md` ("Write cache") mirrors it as a table.
//!
//! # Format
//!
//! A write cache is two files side by side:
//!
//! ```text
//! NAME.data   sparse, same offsets as the logical file; a block's bytes are
//!             meaningful only when its bit is set in NAME.map
//! NAME.map    [0     .. 512 )  header slot 0
//!             [4096  .. 4608)  header slot 1
//!             [8192  .. EOF )  bitmap: bit i = block i present (LSB first:
//!                              byte i / 8, bit i % 8); sparse, may be short
//! ```
//!
//! The header is written alternately to slot 0 and slot 1 (slot = sequence % 2)
//! so that a torn header write always leaves the previous header intact; `open`
//! takes the valid slot (magic and checksum) with the highest sequence.
//!
//! Header, 512 bytes, every integer little-endian:
//!
//! ```text
//! off size field
//!   0    8 magic          MAP_MAGIC_1_0
//!   8    4 block_size     power of two, MIN_BLOCK_SIZE ..= MAX_BLOCK_SIZE
//!  12    4 flags          0 (reserved for future use; nonzero is refused)
//!  16    8 logical_size   size of the file as clients see it
//!  24    8 base_len       bytes [0, base_len) of absent blocks come from the
//!                         base (backup); beyond it absent bytes read as zero
//!  32    8 sequence       incremented on every header write
//!  40    8 bitmap_offset  BITMAP_OFFSET
//!  48  456 reserved       zero
//! 504    8 checksum       FNV-1a 64 of bytes [0, 504)
//! ```
//!
//! WARNING: never change the values or the layout below. Caches written by an
//! older revive must stay readable; a new layout needs a new magic.

use std::path::Path;

use super::error::CacheError;

/// Magic of the `.map` file, format version 1.0.
///
/// Derived as the first 8 bytes of `BLAKE3("revive write cache map v1.0")`
/// (checked by a unit test). Never change it.
pub const MAP_MAGIC_1_0: [u8; 8] = [0x6c, 0x22, 0x42, 0x11, 0xd8, 0x2a, 0x71, 0xfe];

/// Size of one header slot in bytes.
pub const HEADER_SIZE: usize = 512;

/// Offsets of the two header slots. Each sits on its own 4 KiB page so that a
/// torn page write can damage at most one of them.
pub const HEADER_SLOTS: [u64; 2] = [0, 4096];

/// Where the bitmap starts in the `.map` file.
pub const BITMAP_OFFSET: u64 = 8192;

/// Bytes per bitmap page: the unit in which the bitmap is kept in memory and
/// written to disk (one page covers `BITMAP_PAGE_BYTES * 8` blocks).
pub const BITMAP_PAGE_BYTES: usize = 4096;

/// Smallest block size: one disk sector.
pub const MIN_BLOCK_SIZE: u32 = 512;

/// Largest block size: larger blocks make copy-on-write of partial blocks
/// too costly for small guest writes.
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;

/// Default block size: the page size, and the usual guest write size.
pub const DEFAULT_BLOCK_SIZE: u32 = 4096;

/// Largest logical size a write cache accepts (1 PiB); far above NFS clients'
/// needs (ESXi: 62 TiB) while keeping offset arithmetic clear of overflow.
pub const MAX_LOGICAL_SIZE: u64 = 1 << 50;

const OFF_MAGIC: usize = 0;
const OFF_BLOCK_SIZE: usize = 8;
const OFF_FLAGS: usize = 12;
const OFF_LOGICAL_SIZE: usize = 16;
const OFF_BASE_LEN: usize = 24;
const OFF_SEQUENCE: usize = 32;
const OFF_BITMAP_OFFSET: usize = 40;
const OFF_CHECKSUM: usize = HEADER_SIZE - 8;

// The header must fit its slot and leave room for the checksum.
const _: () = assert!(OFF_BITMAP_OFFSET + 8 <= OFF_CHECKSUM);
const _: () = assert!(HEADER_SIZE == 512);
const _: () = assert!((HEADER_SIZE as u64) <= HEADER_SLOTS[1] - HEADER_SLOTS[0]);
const _: () = assert!(HEADER_SLOTS[1] + HEADER_SIZE as u64 <= BITMAP_OFFSET);
const _: () = assert!(BITMAP_OFFSET.is_multiple_of(BITMAP_PAGE_BYTES as u64));

/// The decoded header of a `.map` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Block size in bytes: the granularity of the bitmap and of copy-on-write.
    pub block_size: u32,
    /// Size of the file as clients see it.
    pub logical_size: u64,
    /// Absent blocks read from the base below this offset, as zeros above it.
    /// Never larger than `logical_size` (a truncate lowers it for good).
    pub base_len: u64,
    /// Incremented on every header write; the newer slot wins at open.
    pub sequence: u64,
}

/// Whether `block_size` is acceptable: a power of two in the allowed range.
pub fn valid_block_size(block_size: u32) -> bool {
    block_size.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
}

/// FNV-1a 64: tiny, dependency-free, enough to tell a torn header from a good one.
fn checksum(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

fn get_u32(buf: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[off..off + 4]);
    u32::from_le_bytes(b)
}

fn get_u64(buf: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[off..off + 8]);
    u64::from_le_bytes(b)
}

impl Header {
    /// The slot this header is written to.
    pub fn slot_offset(&self) -> u64 {
        HEADER_SLOTS[(self.sequence % 2) as usize]
    }

    /// Encodes the header into its 512-byte on-disk form.
    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut buf = [0u8; HEADER_SIZE];
        buf[OFF_MAGIC..OFF_MAGIC + 8].copy_from_slice(&MAP_MAGIC_1_0);
        buf[OFF_BLOCK_SIZE..OFF_BLOCK_SIZE + 4].copy_from_slice(&self.block_size.to_le_bytes());
        buf[OFF_FLAGS..OFF_FLAGS + 4].copy_from_slice(&0u32.to_le_bytes());
        buf[OFF_LOGICAL_SIZE..OFF_LOGICAL_SIZE + 8]
            .copy_from_slice(&self.logical_size.to_le_bytes());
        buf[OFF_BASE_LEN..OFF_BASE_LEN + 8].copy_from_slice(&self.base_len.to_le_bytes());
        buf[OFF_SEQUENCE..OFF_SEQUENCE + 8].copy_from_slice(&self.sequence.to_le_bytes());
        buf[OFF_BITMAP_OFFSET..OFF_BITMAP_OFFSET + 8].copy_from_slice(&BITMAP_OFFSET.to_le_bytes());
        let sum = checksum(&buf[..OFF_CHECKSUM]);
        buf[OFF_CHECKSUM..].copy_from_slice(&sum.to_le_bytes());
        buf
    }

    /// Decodes one header slot, checking magic, checksum and every field.
    ///
    /// # Errors
    /// `BadMagic` when the slot is not a write cache header of a known version,
    /// `CorruptHeader` when the checksum or a field is wrong.
    pub fn decode(buf: &[u8], path: &Path) -> Result<Header, CacheError> {
        let corrupt = |reason: &'static str| CacheError::CorruptHeader {
            path: path.to_path_buf(),
            reason,
        };
        if buf.len() < HEADER_SIZE {
            return Err(corrupt("header slot is truncated"));
        }
        let buf = &buf[..HEADER_SIZE];
        if buf[OFF_MAGIC..OFF_MAGIC + 8] != MAP_MAGIC_1_0 {
            return Err(CacheError::BadMagic {
                path: path.to_path_buf(),
            });
        }
        if get_u64(buf, OFF_CHECKSUM) != checksum(&buf[..OFF_CHECKSUM]) {
            return Err(corrupt("header checksum mismatch"));
        }
        let header = Header {
            block_size: get_u32(buf, OFF_BLOCK_SIZE),
            logical_size: get_u64(buf, OFF_LOGICAL_SIZE),
            base_len: get_u64(buf, OFF_BASE_LEN),
            sequence: get_u64(buf, OFF_SEQUENCE),
        };
        if get_u32(buf, OFF_FLAGS) != 0 {
            return Err(corrupt("unknown header flags"));
        }
        if get_u64(buf, OFF_BITMAP_OFFSET) != BITMAP_OFFSET {
            return Err(corrupt("unexpected bitmap offset"));
        }
        if !valid_block_size(header.block_size) {
            return Err(corrupt("invalid block size"));
        }
        if header.logical_size > MAX_LOGICAL_SIZE {
            return Err(corrupt("logical size beyond the maximum"));
        }
        if header.base_len > header.logical_size {
            return Err(corrupt("base length beyond the logical size"));
        }
        Ok(header)
    }
}

// ------------------------------------------------------------- journal --

/// Magic of the `.journal` header, format version 1.0.
///
/// Derived as the first 8 bytes of `BLAKE3("revive write cache journal v1.0")`
/// (checked by a unit test). Never change it.
pub const JOURNAL_MAGIC_1_0: [u8; 8] = [0x47, 0x0b, 0x2f, 0x86, 0x10, 0xd1, 0x74, 0x3e];

/// Magic that starts every journal record, format version 1.0.
///
/// Derived as the first 8 bytes of
/// `BLAKE3("revive write cache journal record v1.0")` (checked by a unit
/// test). Never change it.
pub const RECORD_MAGIC_1_0: [u8; 8] = [0xd6, 0xdd, 0x46, 0xc0, 0x63, 0x7a, 0xab, 0x3a];

/// Size of the journal header in bytes (one sector, written atomically by
/// any disk; a torn one only ever means "no live record", see `journal.rs`).
pub const JOURNAL_HEADER_SIZE: usize = 512;

/// Where the first record starts: the header has its own page.
pub const JOURNAL_RECORDS_OFFSET: u64 = 4096;

/// Size of a record header in bytes.
pub const RECORD_HEADER_SIZE: usize = 64;

/// Largest record payload. A stable write bigger than this (after
/// copy-on-write) is not journaled: writing its bytes twice costs more than
/// the second sync it saves; it takes the checkpoint path instead.
pub const MAX_RECORD_LEN: u32 = 256 << 10;

/// The journal grows by this many zero bytes at a time, written once, so
/// that records later overwrite blocks that are already allocated and its
/// `fdatasync` commits no allocation.
pub const JOURNAL_GROW: u64 = 1 << 20;

/// Default journal size that triggers a checkpoint (data file and bitmap
/// catch up, the journal starts over). Large enough that checkpoints are
/// rare under a burst of small stable writes (about 4000 4 KiB records),
/// small enough that replay at open is quick and the journal stays small.
pub const JOURNAL_CHECKPOINT_BYTES: u64 = 16 << 20;

const J_OFF_EPOCH: usize = 8;
const J_OFF_CHECKSUM: usize = JOURNAL_HEADER_SIZE - 8;
const R_OFF_EPOCH: usize = 8;
const R_OFF_SEQ: usize = 16;
const R_OFF_OFFSET: usize = 24;
const R_OFF_LOGICAL_END: usize = 32;
const R_OFF_LEN: usize = 40;
const R_OFF_RESERVED: usize = 44;
const R_OFF_CHECKSUM: usize = 48;
const _: () = assert!(R_OFF_CHECKSUM + 16 == RECORD_HEADER_SIZE);
const _: () = assert!(JOURNAL_HEADER_SIZE as u64 <= JOURNAL_RECORDS_OFFSET);
const _: () = assert!(JOURNAL_RECORDS_OFFSET.is_multiple_of(BITMAP_PAGE_BYTES as u64));

/// The decoded header of a `.journal` file.
///
/// ```text
/// off size field
///   0    8 magic     JOURNAL_MAGIC_1_0
///   8    8 epoch     only records of this epoch are live
///  16  488 reserved  zero
/// 504    8 checksum  FNV-1a 64 of bytes [0, 504)
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JournalHeader {
    /// Records carrying another epoch are dead.
    pub epoch: u64,
}

impl JournalHeader {
    /// Encodes the header into its 512-byte on-disk form.
    pub fn encode(&self) -> [u8; JOURNAL_HEADER_SIZE] {
        let mut buf = [0u8; JOURNAL_HEADER_SIZE];
        buf[..8].copy_from_slice(&JOURNAL_MAGIC_1_0);
        buf[J_OFF_EPOCH..J_OFF_EPOCH + 8].copy_from_slice(&self.epoch.to_le_bytes());
        let sum = checksum(&buf[..J_OFF_CHECKSUM]);
        buf[J_OFF_CHECKSUM..].copy_from_slice(&sum.to_le_bytes());
        buf
    }

    /// Decodes a header; `None` when it is short, of another format or
    /// damaged (which means: no live record).
    pub fn decode(buf: &[u8]) -> Option<JournalHeader> {
        let buf = buf.get(..JOURNAL_HEADER_SIZE)?;
        if buf[..8] != JOURNAL_MAGIC_1_0
            || get_u64(buf, J_OFF_CHECKSUM) != checksum(&buf[..J_OFF_CHECKSUM])
        {
            return None;
        }
        Some(JournalHeader {
            epoch: get_u64(buf, J_OFF_EPOCH),
        })
    }
}

/// The decoded header of one journal record; the payload follows it.
///
/// ```text
/// off size field
///   0    8 magic        RECORD_MAGIC_1_0
///   8    8 epoch        the journal header's epoch when written
///  16    8 seq          0, 1, 2, ... within the epoch
///  24    8 offset       where the payload goes in the logical file
///  32    8 logical_end  file size after the write (replay raises it to this)
///  40    4 len          payload bytes, at most MAX_RECORD_LEN
///  44    4 reserved     zero
///  48   16 checksum     first 16 bytes of BLAKE3(bytes [0, 48) ++ payload)
///  64  len payload
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    /// Epoch of the journal when the record was written.
    pub epoch: u64,
    /// Position of the record in its epoch.
    pub seq: u64,
    /// Where the payload goes in the logical file.
    pub offset: u64,
    /// File size after the write.
    pub logical_end: u64,
    /// Payload length.
    pub len: u32,
}

impl RecordHeader {
    fn fixed(&self) -> [u8; R_OFF_CHECKSUM] {
        let mut buf = [0u8; R_OFF_CHECKSUM];
        buf[..8].copy_from_slice(&RECORD_MAGIC_1_0);
        buf[R_OFF_EPOCH..R_OFF_EPOCH + 8].copy_from_slice(&self.epoch.to_le_bytes());
        buf[R_OFF_SEQ..R_OFF_SEQ + 8].copy_from_slice(&self.seq.to_le_bytes());
        buf[R_OFF_OFFSET..R_OFF_OFFSET + 8].copy_from_slice(&self.offset.to_le_bytes());
        buf[R_OFF_LOGICAL_END..R_OFF_LOGICAL_END + 8]
            .copy_from_slice(&self.logical_end.to_le_bytes());
        buf[R_OFF_LEN..R_OFF_LEN + 4].copy_from_slice(&self.len.to_le_bytes());
        buf
    }

    /// Appends the encoded record (header, then the pieces as one payload)
    /// to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>, pieces: &[bytes::Bytes]) {
        let fixed = self.fixed();
        let mut hasher = blake3::Hasher::new();
        hasher.update(&fixed);
        for p in pieces {
            hasher.update(p);
        }
        out.extend_from_slice(&fixed);
        out.extend_from_slice(&hasher.finalize().as_bytes()[..16]);
        for p in pieces {
            out.extend_from_slice(p);
        }
    }

    /// Decodes a record header, checking magic and field ranges (not the
    /// checksum, which needs the payload: see `checks`). `None` when it is
    /// not a plausible record: the end of the live records.
    pub fn decode(buf: &[u8]) -> Option<RecordHeader> {
        let buf = buf.get(..RECORD_HEADER_SIZE)?;
        if buf[..8] != RECORD_MAGIC_1_0 || get_u32(buf, R_OFF_RESERVED) != 0 {
            return None;
        }
        let rec = RecordHeader {
            epoch: get_u64(buf, R_OFF_EPOCH),
            seq: get_u64(buf, R_OFF_SEQ),
            offset: get_u64(buf, R_OFF_OFFSET),
            logical_end: get_u64(buf, R_OFF_LOGICAL_END),
            len: get_u32(buf, R_OFF_LEN),
        };
        let end = rec.offset.checked_add(u64::from(rec.len))?;
        let sane = rec.len <= MAX_RECORD_LEN
            && end <= MAX_LOGICAL_SIZE
            && rec.logical_end <= MAX_LOGICAL_SIZE;
        sane.then_some(rec)
    }

    /// Whether `payload` (with the encoded header `head`) matches the
    /// record's checksum.
    pub fn checks(&self, head: &[u8], payload: &[u8]) -> bool {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&head[..R_OFF_CHECKSUM]);
        hasher.update(payload);
        head.get(R_OFF_CHECKSUM..RECORD_HEADER_SIZE) == Some(&hasher.finalize().as_bytes()[..16])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_is_derived_from_its_versioned_name() {
        let hash = blake3::hash(b"revive write cache map v1.0");
        assert_eq!(&hash.as_bytes()[..8], &MAP_MAGIC_1_0);
    }

    #[test]
    fn journal_magics_are_derived_from_their_versioned_names() {
        let hash = blake3::hash(b"revive write cache journal v1.0");
        assert_eq!(&hash.as_bytes()[..8], &JOURNAL_MAGIC_1_0);
        let hash = blake3::hash(b"revive write cache journal record v1.0");
        assert_eq!(&hash.as_bytes()[..8], &RECORD_MAGIC_1_0);
    }

    #[test]
    fn journal_header_and_record_round_trip_and_detect_damage() {
        let h = JournalHeader { epoch: 42 };
        let buf = h.encode();
        assert_eq!(JournalHeader::decode(&buf), Some(h));
        let mut bad = buf;
        bad[9] ^= 1;
        assert_eq!(JournalHeader::decode(&bad), None);
        assert_eq!(JournalHeader::decode(&buf[..100]), None);

        let r = RecordHeader {
            epoch: 42,
            seq: 3,
            offset: 8192,
            logical_end: 1 << 20,
            len: 5,
        };
        let mut out = Vec::new();
        let pieces = [
            bytes::Bytes::from_static(b"he"),
            bytes::Bytes::from_static(b"llo"),
        ];
        r.encode_into(&mut out, &pieces);
        assert_eq!(out.len(), RECORD_HEADER_SIZE + 5);
        let (head, payload) = out.split_at(RECORD_HEADER_SIZE);
        assert_eq!(payload, b"hello");
        let decoded = RecordHeader::decode(head).expect("decodes");
        assert_eq!(decoded, r);
        assert!(decoded.checks(head, payload));
        assert!(!decoded.checks(head, b"hellp"));
        let mut bad = head.to_vec();
        bad[R_OFF_SEQ] ^= 1;
        let decoded = RecordHeader::decode(&bad).expect("still plausible");
        assert!(!decoded.checks(&bad, payload), "checksum covers the header");
        assert_eq!(RecordHeader::decode(&[0u8; RECORD_HEADER_SIZE]), None);
    }

    #[test]
    fn header_round_trips_and_detects_damage() {
        let path = Path::new("x.map");
        let h = Header {
            block_size: 4096,
            logical_size: 10 << 20,
            base_len: 5 << 20,
            sequence: 7,
        };
        let buf = h.encode();
        assert_eq!(Header::decode(&buf, path).ok(), Some(h));
        assert_eq!(h.slot_offset(), HEADER_SLOTS[1]);

        let mut bad = buf;
        bad[20] ^= 1;
        assert!(matches!(
            Header::decode(&bad, path),
            Err(CacheError::CorruptHeader { .. })
        ));
        let mut bad = buf;
        bad[0] ^= 1;
        assert!(matches!(
            Header::decode(&bad, path),
            Err(CacheError::BadMagic { .. })
        ));
        assert!(Header::decode(&buf[..100], path).is_err());
    }

    #[test]
    fn block_sizes() {
        assert!(valid_block_size(512));
        assert!(valid_block_size(4096));
        assert!(valid_block_size(1 << 20));
        assert!(!valid_block_size(256));
        assert!(!valid_block_size(3000));
        assert!(!valid_block_size(2 << 20));
    }
}
