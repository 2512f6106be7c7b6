//! NFS file handles: a fixed, versioned layout that survives restarts.
//!
//! ESXi keeps file handles of running VMs forever, so a handle must mean the
//! same file after revive restarts. It therefore holds only persisted values
//! from the backend, never anything tied to the process (start time, pointer,
//! counter).
//!
//! # Format (version 1, 24 bytes, big-endian; never change, add a version)
//!
//! ```text
//! offset size field
//!      0    1 format version (1)
//!      1    3 reserved, zero
//!      4    4 export id       (Export::id)
//!      8    8 export instance (Export::instance)
//!     16    8 file id         (FileId)
//! ```

use crate::datastore::{ExportId, FileId};

/// Current handle format version.
pub const HANDLE_VERSION: u8 = 1;

/// Encoded length of a version 1 handle.
pub const HANDLE_LEN: usize = 24;

/// A decoded file handle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FileHandle {
    /// Export the file belongs to.
    pub export: ExportId,
    /// Instance of that export the handle was issued for.
    pub instance: u64,
    /// The file.
    pub file: FileId,
}

/// Why a handle was not accepted; answered with `NFS3ERR_BADHANDLE`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed file handle")]
pub struct BadHandle;

impl FileHandle {
    /// Encode into the wire bytes.
    pub fn encode(&self) -> [u8; HANDLE_LEN] {
        let mut out = [0u8; HANDLE_LEN];
        out[0] = HANDLE_VERSION;
        out[4..8].copy_from_slice(&self.export.to_be_bytes());
        out[8..16].copy_from_slice(&self.instance.to_be_bytes());
        out[16..24].copy_from_slice(&self.file.to_be_bytes());
        out
    }

    /// Decode wire bytes; any other length, version or non-zero reserved
    /// byte is a bad handle.
    pub fn decode(bytes: &[u8]) -> Result<Self, BadHandle> {
        let b: &[u8; HANDLE_LEN] = bytes.try_into().map_err(|_| BadHandle)?;
        if b[0] != HANDLE_VERSION || b[1..4] != [0, 0, 0] {
            return Err(BadHandle);
        }
        let u32_at = |o: usize| u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| (u64::from(u32_at(o)) << 32) | u64::from(u32_at(o + 4));
        Ok(Self {
            export: u32_at(4),
            instance: u64_at(8),
            file: u64_at(16),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let h = FileHandle {
            export: 7,
            instance: 0x0102_0304_0506_0708,
            file: u64::MAX - 3,
        };
        let bytes = h.encode();
        assert_eq!(bytes[0], HANDLE_VERSION);
        assert_eq!(FileHandle::decode(&bytes), Ok(h));
    }

    #[test]
    fn rejects_wrong_length_version_and_reserved() {
        let h = FileHandle {
            export: 1,
            instance: 2,
            file: 3,
        };
        let good = h.encode();
        assert_eq!(FileHandle::decode(&good[..23]), Err(BadHandle));
        assert_eq!(FileHandle::decode(&[]), Err(BadHandle));
        let mut bad = good;
        bad[0] = 2;
        assert_eq!(FileHandle::decode(&bad), Err(BadHandle));
        let mut bad = good;
        bad[2] = 1;
        assert_eq!(FileHandle::decode(&bad), Err(BadHandle));
    }

    #[test]
    fn layout_is_fixed() {
        // Guards the on-wire format: handles already held by clients must
        // keep decoding to the same file.
        let h = FileHandle {
            export: 0x0a0b_0c0d,
            instance: 1,
            file: 2,
        };
        let expected: [u8; 24] = [
            1, 0, 0, 0, 0x0a, 0x0b, 0x0c, 0x0d, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2,
        ];
        assert_eq!(h.encode(), expected);
    }
}
