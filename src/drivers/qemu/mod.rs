//! The `qemu` driver: QEMU/KVM controlled over QMP, booting the published
//! disk straight from revive's NFS export (`nfs://ADDR/EXPORT/SESSION/DISK`).

use std::path::PathBuf;
use std::sync::Arc;

use serde::Deserialize;

use super::{Driver, DriverError, DriverResult};

/// `[[host]] driver = "qemu"` settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuConfig {
    /// Folder for QMP sockets, serial logs and pid files of the VMs this host runs.
    pub run_dir: PathBuf,
}

/// Builds the driver of a QEMU host.
pub fn build(host: &str, _config: &QemuConfig) -> DriverResult<Arc<dyn Driver>> {
    Err(DriverError::NotSupported {
        driver: "qemu",
        operation: if host.is_empty() {
            "hosts"
        } else {
            "this release"
        },
    })
}
