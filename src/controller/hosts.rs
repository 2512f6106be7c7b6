//! What a client needs to fill a recover form: the hosts sessions can run
//! on (with whether their driver could be built) and the controller's
//! settings that decide defaults (export, write cache root, retries).

use serde::{Deserialize, Serialize};

use super::{driver_name, Controller, ControllerConfig, NONE_HOST};

/// A host sessions can run on, as the API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    /// Name passed as `recover --host`.
    pub name: String,
    /// Its driver: "none", "vsphere" or "qemu".
    pub driver: String,
    /// The driver was built from the configuration; when false, `error`
    /// says why and a recover on this host is refused.
    pub available: bool,
    /// Why the driver could not be built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Only the publish-only host: it cannot power VMs on or migrate live.
    pub publish_only: bool,
}

impl Controller {
    /// Every host: the built-in publish-only `none` first, then the
    /// configured ones in configuration order.
    pub fn hosts(&self) -> Vec<HostView> {
        let mut out = vec![HostView {
            name: NONE_HOST.to_string(),
            driver: "none".into(),
            available: true,
            error: None,
            publish_only: true,
        }];
        for host in &self.inner.config.hosts {
            if host.name == NONE_HOST {
                continue;
            }
            let error = match self.inner.drivers.get(&host.name) {
                Some(Ok(_)) => None,
                Some(Err(cause)) => Some(cause.clone()),
                None => Some("not loaded".into()),
            };
            let driver = driver_name(&host.driver);
            out.push(HostView {
                name: host.name.clone(),
                driver: driver.into(),
                available: error.is_none(),
                error,
                publish_only: driver == "none",
            });
        }
        out
    }

    /// The settings the controller runs with.
    pub fn settings(&self) -> &ControllerConfig {
        &self.inner.config
    }
}
