//! `[[snapshot_source]]`: a storage system whose snapshots revive recovers
//! VMs from.

use std::path::PathBuf;

use serde::Deserialize;

/// One `[[snapshot_source]]`.
// No `deny_unknown_fields` here: serde does not support it with `flatten`;
// each provider's own settings struct refuses unknown keys instead.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SnapshotSourceConfig {
    /// Name used in `snap:NAME/SNAPSHOT` and `revive points --source snap:NAME`.
    pub name: String,
    /// The provider and its settings.
    #[serde(flatten)]
    pub provider: ProviderConfig,
}

/// Which storage system (`provider = "..."`), with its settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "provider", rename_all = "lowercase")]
pub enum ProviderConfig {
    /// A btrfs file system whose subvolumes are datastores of VM folders.
    Btrfs(BtrfsConfig),
    /// A Ceph RBD pool whose images are VM disks.
    Rbd(RbdConfig),
}

/// `provider = "btrfs"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BtrfsConfig {
    /// Where the file system's top level (subvolid 5) is mounted: volumes
    /// and snapshots are named by their path below it.
    pub path: PathBuf,
    /// Folder of revive's clones, on the same file system (default:
    /// `<path>/.revive-clones`).
    #[serde(default)]
    pub clone_dir: Option<PathBuf>,
    /// The btrfs CLI (a name on PATH or a path).
    #[serde(default = "default_btrfs")]
    pub command: String,
}

fn default_btrfs() -> String {
    "btrfs".into()
}

/// How hosts see an RBD clone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RbdPresent {
    /// QEMU opens `rbd:POOL/IMAGE` itself (its rbd driver, qemu-block-extra).
    #[default]
    Qemu,
}

/// `provider = "rbd"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RbdConfig {
    /// Pool of the VM images (clones are made in it too).
    pub pool: String,
    /// Ceph configuration file (default: the CLI's, /etc/ceph/ceph.conf).
    #[serde(default)]
    pub ceph_conf: Option<PathBuf>,
    /// Ceph client id (`--id`; default: the CLI's, admin).
    #[serde(default)]
    pub user: Option<String>,
    /// The rbd CLI (a name on PATH or a path).
    #[serde(default = "default_rbd")]
    pub command: String,
    /// How hosts see a clone. Only "qemu" today; NBD and iSCSI exports of
    /// a clone come with the block export issues.
    #[serde(default)]
    pub present: RbdPresent,
}

fn default_rbd() -> String {
    "rbd".into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Doc {
        snapshot_source: Vec<SnapshotSourceConfig>,
    }

    #[test]
    fn sources_name_their_provider_and_refuse_unknown_keys() {
        let doc: Doc = toml::from_str(
            "[[snapshot_source]]\nname = \"pool1\"\nprovider = \"btrfs\"\npath = \"/mnt/pool1\"\n\
             [[snapshot_source]]\nname = \"ceph1\"\nprovider = \"rbd\"\npool = \"vms\"\n",
        )
        .unwrap();
        assert_eq!(doc.snapshot_source[0].name, "pool1");
        let ProviderConfig::Btrfs(b) = &doc.snapshot_source[0].provider else {
            panic!("not btrfs");
        };
        assert_eq!(b.command, "btrfs");
        assert_eq!(b.clone_dir, None);
        let ProviderConfig::Rbd(r) = &doc.snapshot_source[1].provider else {
            panic!("not rbd");
        };
        assert_eq!((r.pool.as_str(), r.present), ("vms", RbdPresent::Qemu));
        let err = toml::from_str::<Doc>(
            "[[snapshot_source]]\nname = \"x\"\nprovider = \"btrfs\"\npath = \"/p\"\npaht = 1\n",
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("paht"), "{err}");
        let err = toml::from_str::<Doc>("[[snapshot_source]]\nname = \"x\"\nprovider = \"zfs\"\n")
            .err()
            .unwrap();
        assert!(err.to_string().contains("zfs"), "{err}");
    }
}
