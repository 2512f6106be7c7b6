//! `block`: block exports. A block export is one presented file of a
//! publication (a restore point's `-flat.vmdk` or disk image) served as a
//! disk by a block protocol: NBD (`nbd/`) and iSCSI (`iscsi/`).
//!
//! - [`device`]: [`BlockDevice`], what a protocol needs of a disk.
//! - [`file`](mod@file): [`FileDevice`], the device of a presented file, over the
//!   datastore's operation surface ([`crate::datastore::FileOps`]).
//! - [`registry`]: [`BlockExports`], the exports being served, by name, with
//!   their allow-lists, protocols and counters.
//! - [`config`]: `[[block_export]]`, `[nbd]` and `[iscsi]`.
//! - [`setup`]: creating exports from the configuration or a session.
//! - [`nbd`]: the NBD server.
//! - [`iscsi`]: the iSCSI target.
//!
//! # Rules
//! - No second read path: every protocol talks to a [`BlockDevice`], and the
//!   device of a block export calls [`crate::datastore::FileOps`] (reads
//!   from the write cache, else the backup; writes into the write cache).
//!   The repository is never written.
//! - One durability rule: a flush (NBD_CMD_FLUSH, the FUA flag, SCSI
//!   SYNCHRONIZE CACHE or FUA) is the same journal sync as an NFS COMMIT.
//! - A malformed request closes only its own connection; lengths from the
//!   wire are checked before anything is allocated.
//! - Allow-lists are checked where a client names an export (NBD option
//!   negotiation, iSCSI login), by the protocol, against the registry.

pub mod config;
pub mod device;
pub mod file;
pub mod iscsi;
pub mod nbd;
pub mod registry;
pub mod setup;

pub use config::{
    BlockExportConfig, BlockProtocolConfig, IscsiExportConfig, IscsiSection, NbdSection,
};
pub use device::{BlockDevice, BlockError, BlockResult, Extent, ExtentKind, MemDevice};
pub use file::FileDevice;
pub use registry::{BlockExport, BlockExports, BlockMetrics, BlockProtocol, ExportUse};
