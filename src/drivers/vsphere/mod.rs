//! The `vsphere` driver: VMware ESXi or vCenter through the vim25 SOAP API.

use std::sync::Arc;

use serde::Deserialize;

use super::{Driver, DriverError, DriverResult};

/// `[[host]] driver = "vsphere"` settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsphereConfig {
    /// SDK endpoint, e.g. `https://esx01.example.com/sdk`.
    pub url: String,
}

/// Builds the driver of a vSphere host.
pub fn build(host: &str, _config: &VsphereConfig) -> DriverResult<Arc<dyn Driver>> {
    Err(DriverError::NotSupported {
        driver: "vsphere",
        operation: if host.is_empty() {
            "hosts"
        } else {
            "this release"
        },
    })
}
