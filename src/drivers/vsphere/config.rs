//! `[[host]] driver = "vsphere"` settings.

use std::path::PathBuf;

use serde::Deserialize;

/// Default longest wait for a vSphere task (register, power on, remove
/// datastore): generous, since hostd queues tasks on a busy host.
pub const DEFAULT_TASK_TIMEOUT_SECS: u64 = 600;

fn default_task_timeout() -> u64 {
    DEFAULT_TASK_TIMEOUT_SECS
}

/// `[[host]] driver = "vsphere"` settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsphereConfig {
    /// SDK endpoint, e.g. `https://esx01.example.com/sdk`.
    pub url: String,
    /// User name, e.g. `root` or `revive@vsphere.local`.
    pub user: String,
    /// Password; prefer `password_env`.
    #[serde(default)]
    pub password: Option<String>,
    /// Environment variable holding the password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Skip certificate checks. Off by default: set `ca_file` for a
    /// self-signed host instead.
    #[serde(default)]
    pub insecure: bool,
    /// PEM file of the CA that signed the host's (or vCenter's) certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The ESXi host's name in the inventory; required with vCenter, optional
    /// on a standalone ESXi (its only host).
    #[serde(default)]
    pub esx_host: Option<String>,
    /// Datacenter to look in (vCenter with several).
    #[serde(default)]
    pub datacenter: Option<String>,
    /// Production datastore that receives the VM's writes during the
    /// session (redirect virtual disk updates). None: writes go to revive.
    #[serde(default)]
    pub redirect_datastore: Option<String>,
    /// Longest wait for one vSphere task, in seconds.
    #[serde(default = "default_task_timeout")]
    pub task_timeout_secs: u64,
    /// Simulator only (vcsim): the local folder vcsim serves as the NAS
    /// datastore, sent as `localPath`. Its last component must be the
    /// datastore name, since vcsim names the datastore after it. Real ESXi
    /// takes `localPath` as the datastore name, which is what the driver
    /// sends when this is unset. A datastore whose folder revive knows (a
    /// snapshot clone's) is sent with that folder instead.
    #[serde(default)]
    pub nas_local_path: Option<PathBuf>,
}

/// A config for `https://esx/sdk` as `root`, plus `extra` TOML lines (unit tests).
#[cfg(test)]
pub(super) fn test_config(extra: &str) -> Result<VsphereConfig, String> {
    toml::from_str(&format!(
        "url = \"https://esx/sdk\"\nuser = \"root\"\n{extra}"
    ))
    .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::test_config as config;
    use super::*;

    #[test]
    fn config_defaults_check_certificates_and_refuse_unknown_keys() {
        let c = config("password = \"x\"").unwrap();
        assert!(!c.insecure);
        assert_eq!(c.task_timeout_secs, DEFAULT_TASK_TIMEOUT_SECS);
        assert!(config("pasword = \"x\"").unwrap_err().contains("pasword"));
    }

    #[test]
    fn documented_example_parses() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/revive.toml"))
                .unwrap();
        let start = text
            .find("# [[host]]\n# name = \"esx01\"")
            .expect("vsphere example in config/revive.toml");
        let block: Vec<&str> = text[start..]
            .lines()
            .take_while(|l| l.starts_with('#'))
            .map(|l| l.trim_start_matches('#').trim_start())
            .collect();
        let config = crate::config::Config::parse(&block.join("\n")).unwrap();
        match &config.hosts[0].driver {
            crate::drivers::DriverConfig::Vsphere(v) => {
                assert_eq!(v.esx_host.as_deref(), Some("esx01.example.com"));
                assert_eq!(v.password_env.as_deref(), Some("REVIVE_ESX01_PASSWORD"));
                assert!(!v.insecure);
            }
            other => panic!("{other:?}"),
        }
    }
}
