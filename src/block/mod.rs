//! `block`: block exports. A block export is one presented file of a
//! publication (a restore point's `-flat.vmdk` or disk image) served as a
//! disk by a block protocol: NBD (`nbd/`) and iSCSI (`iscsi/`).
//!
//! # Rules
//! - No second read path: every protocol talks to a [`BlockDevice`], and the
//!   device of a block export goes through the datastore's file I/O (reads
//!   from the write cache, else the backup; writes into the write cache).
//!   The repository is never written.
//! - One durability rule: a flush (NBD_CMD_FLUSH, the FUA flag, SCSI
//!   SYNCHRONIZE CACHE or FUA) is the same journal sync as an NFS COMMIT.
//! - A malformed request closes only its own connection; lengths from the
//!   wire are checked before anything is allocated.

pub mod device;
pub mod iscsi;

pub use device::{BlockDevice, BlockError, BlockResult, Extent, ExtentKind, MemDevice};
