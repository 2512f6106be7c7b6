//! revive: instant VM recovery straight out of a deduplicated backup repository.
//!
//! Layers, each depending only on those below it (see `ARCHITECTURE.md`):
//! - [`cache`]: the write cache of a published file: sparse data file,
//!   persistent bitmap, group commit, crash-safe ordering.
//! - [`repo`]: backup chains of VM folders: restore points, chunk indexes,
//!   backup, restore, verify, gc.
//! - [`store`]: where the repository's bytes live (local folder; S3 later).
//! - [`progress`]: how long operations report progress.
//! - [`config`]: the TOML configuration file.

pub mod cache;
pub mod config;
pub mod progress;
pub mod repo;
pub mod store;
