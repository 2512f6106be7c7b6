//! The NFS frontend: our own NFSv3 + MOUNT v3 + portmapper v2 server on
//! tokio and `bytes`, a protocol encoding over [`FileOps`].
//!
//! # Why our own RPC layer
//!
//! Issue 3 asks for COMMIT, the caller's address on every call (the export
//! allow-list), a real FSSTAT, a portmapper over TCP *and* UDP, handles that
//! survive restarts, and at least NFS-Ganesha's IOPS. `nfsserve` 0.11 has no
//! COMMIT (QEMU's flushes fail), hides the caller's address, hard-codes
//! FSSTAT, serves the portmapper over TCP only and tracks retransmissions by
//! scanning a global table on every request (2.5-3.7k 4 KiB random-read
//! IOPS at qd16 where Ganesha does 19k, see `PEERS.md`). Its fork
//! `nfs3_server` fixes COMMIT and handles but keeps the TCP-only portmapper
//! and hard-coded FSSTAT. The protocol surface is small, so we own it.
//! XDR structures for replies come from `nfs3_types` (Unlicense); arguments
//! are decoded by hand (see [`xdr`]).
//!
//! # Map
//!
//! ```text
//! server      listeners, per-connection reader / call tasks / writer
//!  ├─ limits    who may connect, connection caps, idle and record timeouts
//!  ├─ rpc       record marking, call header, credentials, reply header
//!  ├─ portmap   program 100000 v2: NULL SET UNSET GETPORT DUMP (TCP + UDP)
//!  ├─ mount     program 100005 v3: NULL MNT DUMP UMNT UMNTALL EXPORT (TCP + UDP)
//!  ├─ drc       duplicate request cache (non-idempotent NFS calls only)
//!  └─ proc/     program 100003 v3: the 22 procedures (attr, io, dirop, readdir)
//!       ├─ handle   file handle format (persistent, versioned)
//!       └─ error    DatastoreError -> nfsstat3, the only such mapping
//! xdr         argument decoding (zero-copy, bounded) and reply packing
//! metrics     per-procedure counters and latency buckets
//! ```
//!
//! # Access control
//!
//! Each export carries an allow-list of client addresses. A connection from
//! an address on no allow-list is closed at accept, before a byte is read,
//! except on the portmapper's port, where only the portmapper answers it
//! (see [`limits`]). MNT refuses clients not on the export's own list with
//! `MNT3ERR_ACCES`; every NFS call resolves its handles against the export
//! and refuses other TCP peers with `NFS3ERR_ACCES`. AUTH_SYS
//! credentials are accepted as sent, root included (ESXi needs
//! no_root_squash). Names with `/`, empty names and `..` escaping the export
//! root are refused before the backend sees them.
//!
//! # Handles and verifiers
//!
//! A handle is a versioned 24-byte record of export id, export instance and
//! file id, all persisted by the backend ([`handle`]), so handles held by
//! ESXi stay valid across restarts. The WRITE/COMMIT verifier is the server
//! start time in nanoseconds, new at every start.

pub mod drc;
pub mod error;
pub mod handle;
pub mod limits;
pub mod listen;
pub mod metrics;
pub mod mount;
pub mod portmap;
mod proc;
pub mod record;
pub mod rpc;
pub mod server;
pub mod xdr;

pub use crate::datastore::{FileAt, FileOps, NameAt};
pub use limits::ConnLimits;
pub use listen::{NfsBind, NfsListeners};
pub use metrics::NfsMetrics;
pub use portmap::Ports;
pub use server::NfsServer;

/// NFS program number.
pub const NFS_PROGRAM: u32 = 100_003;
/// The only NFS version served.
pub const NFS_VERSION: u32 = 3;
