//! revive: instant VM recovery straight out of a deduplicated backup repository.
//!
//! Layers, each depending only on those below it (see `ARCHITECTURE.md`):
//! - [`api`]: the HTTP API on localhost: sessions, restore points, hosts,
//!   metrics (Prometheus and a JSON summary), behind a token.
//! - [`controller`]: instant-recovery sessions: state machine, retries, migration.
//! - [`drivers`]: what the controller asks of a hypervisor (none, vSphere, QEMU).
//! - [`snapshots`]: storage snapshots (btrfs, Ceph RBD) as restore points:
//!   list, clone, present to hosts, destroy.
//! - [`block`]: block exports (NBD, iSCSI) of presented disk files, over a
//!   [`block::BlockDevice`].
//! - [`fuse`]: the datastore as a local file system through the kernel's
//!   FUSE (`revive mount`, PostgreSQL sessions), a thin adapter like `nfs`.
//! - [`nfs`]: NFSv3, MOUNT v3 and portmapper v2 over TCP (and UDP for the
//!   portmapper), a protocol encoding over [`datastore::FileOps`].
//! - [`web`]: the web console the API port serves: one embedded vanilla-JS
//!   page that talks to the API like any client.
//! - [`datastore`]: the namespace clients see: exports, one folder per
//!   published restore point, stable file ids, cache over backup; its
//!   [`datastore::FileOps`] is the one operation surface of every frontend,
//!   over the repository's exports and passthrough exports of live folders
//!   (snapshot clones) alike.
//! - [`cache`]: the write cache of a published file: sparse data file,
//!   persistent bitmap, write-ahead journal, group commit, crash-safe
//!   ordering.
//! - [`repo`]: backup chains of VM folders and folder trees: restore points
//!   (a [`repo::Tree`] of entries with metadata), chunk indexes, backup,
//!   restore, verify, gc, block cache.
//! - [`store`]: where the repository's bytes live (local folder, S3).
//! - [`progress`]: how long operations report progress.
//! - [`config`]: the TOML configuration file.
//! - [`fsutil`]: atomic replacement of small state files.

pub mod api;
pub mod block;
pub mod bufpool;
pub mod cache;
pub mod config;
pub mod controller;
pub mod datastore;
pub mod drivers;
pub mod fsutil;
pub mod fuse;
pub mod nfs;
pub mod progress;
pub mod repo;
pub mod snapshots;
pub mod store;
pub mod web;
