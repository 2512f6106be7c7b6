//! Issue 17: block exports over NBD, with real clients only: libnbd's
//! `nbdinfo`, `nbdcopy` and `nbdfuse`, QEMU's `qemu-io`, `qemu-img` and
//! `qemu-system-x86_64` (a TCG guest booting from `nbd://`).
//!
//! - [`clients`]: listing, block status map, byte-exact copies, the
//!   allow-list, garbage on the port.
//! - [`durability`]: flushed and FUA writes survive `kill -9`.
//! - [`fuse`]: an ext4 image served by revive, loop-mounted through nbdfuse.
//! - [`sessions`]: `revive recover --kind block`, copy migration and a
//!   guest booting from the export.

mod clients;
mod durability;
mod fuse;
mod sessions;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::support::snapshot_tree;

/// The repository's files except `pins/`, which a running server keeps for
/// its publications.
pub(crate) fn repo_objects(repo: &Path) -> BTreeMap<PathBuf, String> {
    let pins = repo.join("pins");
    snapshot_tree(repo)
        .into_iter()
        .filter(|(path, _)| !path.starts_with(&pins))
        .collect()
}
