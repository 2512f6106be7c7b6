//! The Ceph RBD provider: an image in the pool is a VM disk, its snapshots
//! are what the VM is recovered from. A clone is `rbd clone` of the
//! snapshot (protected first, as layering requires): copy-on-write, O(1).
//!
//! Which VM an image belongs to comes from its metadata (`rbd image-meta`):
//! `revive.vm` names the VM (default: the image name) and `revive.memsize`
//! its memory in MiB. Snapshot ids are `IMAGE@SNAP`, hence
//! `snap:ceph1/vm-disk@monday`.
//!
//! # Presentation
//! Today QEMU opens the clone itself (`rbd:POOL/IMAGE:conf=...:id=...`,
//! its rbd driver from qemu-block-extra): [`RbdPresent::Qemu`]. The block
//! export issues add NBD and iSCSI: a new [`RbdPresent`] value, served by
//! revive's block exports, answered in [`RbdProvider::present`] and taken
//! away in [`RbdProvider::unpresent`]; nothing else changes.

use std::collections::HashMap;
use std::net::IpAddr;

use async_trait::async_trait;
use serde::Deserialize;

use super::{
    BlockDisk, CloneRef, Presentation, RbdConfig, RbdPresent, SnapResult, Snapshot, SnapshotError,
    SnapshotFile, SnapshotProvider, SnapshotVm, StorageCommand, Volume, CLONE_PREFIX,
};

/// Image metadata key naming the VM an image is a disk of.
pub const META_VM: &str = "revive.vm";
/// Image metadata key with the VM's memory in MiB.
pub const META_MEMSIZE: &str = "revive.memsize";

/// One entry of `rbd ls -l --format json`: an image, or one of its snapshots.
#[derive(Debug, Deserialize)]
struct LsEntry {
    image: String,
    #[serde(default)]
    snapshot: Option<String>,
}

/// One entry of `rbd snap ls --format json`.
#[derive(Debug, Deserialize)]
struct SnapEntry {
    name: String,
    size: u64,
    #[serde(default)]
    protected: Option<String>,
    #[serde(default)]
    timestamp: Option<String>,
}

/// A Ceph pool as a snapshot source.
pub struct RbdProvider {
    name: String,
    pool: String,
    config: RbdConfig,
    cmd: StorageCommand,
}

/// `IMAGE@SNAP` split, refusing anything that is not one image's snapshot.
fn split_id(id: &str) -> Option<(&str, &str)> {
    let (image, snap) = id.split_once('@')?;
    let ok = |s: &str| !s.is_empty() && !s.contains('/') && !s.contains('@');
    (ok(image) && ok(snap)).then_some((image, snap))
}

impl RbdProvider {
    /// The source `name` configured by `config`.
    pub fn new(name: &str, config: &RbdConfig) -> RbdProvider {
        let mut cmd = StorageCommand::new(name, &config.command);
        if let Some(conf) = &config.ceph_conf {
            cmd.base_args
                .extend(["-c".to_string(), conf.to_string_lossy().into_owned()]);
        }
        if let Some(user) = &config.user {
            cmd.base_args.extend(["--id".to_string(), user.clone()]);
        }
        RbdProvider {
            name: name.to_string(),
            pool: config.pool.clone(),
            config: config.clone(),
            cmd,
        }
    }

    fn spec(&self, image: &str) -> String {
        format!("{}/{image}", self.pool)
    }

    async fn listing(&self) -> SnapResult<Vec<LsEntry>> {
        let entries: Option<Vec<LsEntry>> = self
            .cmd
            .json(&["ls", "-l", "--format", "json", "-p", &self.pool])
            .await?;
        Ok(entries.unwrap_or_default())
    }

    async fn image_names(&self) -> SnapResult<Vec<String>> {
        let names: Option<Vec<String>> = self
            .cmd
            .json(&["ls", "--format", "json", "-p", &self.pool])
            .await?;
        Ok(names.unwrap_or_default())
    }

    async fn snaps_of(&self, image: &str) -> SnapResult<Vec<SnapEntry>> {
        let snaps: Option<Vec<SnapEntry>> = self
            .cmd
            .json(&["snap", "ls", "--format", "json", &self.spec(image)])
            .await?;
        Ok(snaps.unwrap_or_default())
    }

    /// The VM an image is a disk of, from its metadata.
    async fn vm_of(&self, image: &str, size: u64) -> SnapResult<SnapshotVm> {
        let meta: Option<HashMap<String, String>> = self
            .cmd
            .json(&["image-meta", "list", "--format", "json", &self.spec(image)])
            .await?;
        let meta = meta.unwrap_or_default();
        Ok(SnapshotVm {
            name: meta
                .get(META_VM)
                .cloned()
                .unwrap_or_else(|| image.to_string()),
            folder: String::new(),
            files: vec![SnapshotFile {
                name: format!("{image}.raw"),
                size,
                disk: true,
            }],
            memory_mib: meta.get(META_MEMSIZE).and_then(|m| m.trim().parse().ok()),
        })
    }

    /// What QEMU opens for image `location` (`POOL/IMAGE`).
    fn qemu_url(&self, location: &str) -> String {
        let mut url = format!("rbd:{location}");
        if let Some(conf) = &self.config.ceph_conf {
            url += &format!(":conf={}", conf.display());
        }
        if let Some(user) = &self.config.user {
            url += &format!(":id={user}");
        }
        url
    }

    fn unknown(&self, id: &str) -> SnapshotError {
        SnapshotError::UnknownSnapshot {
            source_name: self.name.clone(),
            snapshot: id.to_string(),
        }
    }

    fn check_ours(&self, clone: &CloneRef) -> SnapResult<()> {
        if clone.name.starts_with(CLONE_PREFIX) && clone.location == self.spec(&clone.name) {
            return Ok(());
        }
        Err(SnapshotError::Present {
            clone: clone.name.clone(),
            reason: format!("'{}' is not a revive clone; left alone", clone.location),
        })
    }
}

#[async_trait]
impl SnapshotProvider for RbdProvider {
    fn kind(&self) -> &'static str {
        "rbd"
    }

    async fn volumes(&self) -> SnapResult<Vec<Volume>> {
        let entries = self.listing().await?;
        let mut out = Vec::new();
        for image in entries
            .iter()
            .filter(|e| e.snapshot.is_none() && !e.image.starts_with(CLONE_PREFIX))
        {
            let mut snapshots = Vec::new();
            let snaps = self.snaps_of(&image.image).await?;
            for s in snaps {
                snapshots.push(Snapshot {
                    id: format!("{}@{}", image.image, s.name),
                    volume: image.image.clone(),
                    created: s.timestamp.clone(),
                    vms: vec![self.vm_of(&image.image, s.size).await?],
                });
            }
            out.push(Volume {
                name: image.image.clone(),
                snapshots,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn snapshot(&self, id: &str) -> SnapResult<Snapshot> {
        let (image, snap) = split_id(id).ok_or_else(|| self.unknown(id))?;
        if image.starts_with(CLONE_PREFIX) || !self.image_names().await?.iter().any(|n| n == image)
        {
            return Err(self.unknown(id));
        }
        let found = self
            .snaps_of(image)
            .await?
            .into_iter()
            .find(|s| s.name == snap)
            .ok_or_else(|| self.unknown(id))?;
        Ok(Snapshot {
            id: id.to_string(),
            volume: image.to_string(),
            created: found.timestamp.clone(),
            vms: vec![self.vm_of(image, found.size).await?],
        })
    }

    fn plan_clone(&self, snapshot: &str, name: &str) -> CloneRef {
        CloneRef {
            name: name.to_string(),
            location: self.spec(name),
            snapshot: snapshot.to_string(),
            protected_snapshot: false,
        }
    }

    async fn create_clone(&self, clone: &CloneRef) -> SnapResult<CloneRef> {
        self.check_ours(clone)?;
        if self.image_names().await?.contains(&clone.name) {
            return Ok(clone.clone());
        }
        let (image, snap) =
            split_id(&clone.snapshot).ok_or_else(|| self.unknown(&clone.snapshot))?;
        let from = format!("{}@{snap}", self.spec(image));
        let entry = self
            .snaps_of(image)
            .await?
            .into_iter()
            .find(|s| s.name == snap)
            .ok_or_else(|| self.unknown(&clone.snapshot))?;
        let mut made = clone.clone();
        // Layering needs a protected snapshot; remember whether revive
        // protected it, so the last clone's removal unprotects it again.
        if entry.protected.as_deref() != Some("true") {
            self.cmd.run(&["snap", "protect", &from]).await?;
            made.protected_snapshot = true;
        }
        self.cmd.run(&["clone", &from, &clone.location]).await?;
        tracing::info!(source = %self.name, snapshot = %from, clone = %clone.location, "rbd clone made");
        Ok(made)
    }

    async fn present(
        &self,
        clone: &CloneRef,
        vm: &SnapshotVm,
        _clients: &[IpAddr],
    ) -> SnapResult<Presentation> {
        self.check_ours(clone)?;
        match self.config.present {
            RbdPresent::Qemu => Ok(Presentation::Block {
                disks: vm
                    .files
                    .iter()
                    .filter(|f| f.disk)
                    .map(|f| BlockDisk {
                        name: f.name.clone(),
                        url: self.qemu_url(&clone.location),
                    })
                    .collect(),
            }),
        }
    }

    async fn unpresent(&self, _clone: &CloneRef) -> SnapResult<()> {
        match self.config.present {
            // QEMU closed the image when it stopped: nothing is mapped.
            RbdPresent::Qemu => Ok(()),
        }
    }

    async fn destroy(&self, clone: &CloneRef) -> SnapResult<()> {
        self.check_ours(clone)?;
        if self.image_names().await?.contains(&clone.name) {
            self.cmd.run(&["rm", &clone.location]).await?;
            tracing::info!(source = %self.name, clone = %clone.location, "rbd clone deleted");
        }
        if !clone.protected_snapshot {
            return Ok(());
        }
        let Some((image, snap)) = split_id(&clone.snapshot) else {
            return Ok(());
        };
        let from = format!("{}@{snap}", self.spec(image));
        let children: Option<Vec<serde_json::Value>> = self
            .cmd
            .json(&["children", "--format", "json", &from])
            .await?;
        let protected = self
            .snaps_of(image)
            .await?
            .iter()
            .any(|s| s.name == snap && s.protected.as_deref() == Some("true"));
        if protected && children.unwrap_or_default().is_empty() {
            self.cmd.run(&["snap", "unprotect", &from]).await?;
        }
        Ok(())
    }

    async fn clones(&self) -> SnapResult<Vec<String>> {
        let mut names: Vec<String> = self
            .image_names()
            .await?
            .into_iter()
            .filter(|n| n.starts_with(CLONE_PREFIX))
            .collect();
        names.sort();
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_ids_are_one_images_snapshot() {
        assert_eq!(split_id("disk1@monday"), Some(("disk1", "monday")));
        for bad in ["disk1", "@x", "disk1@", "p/disk1@x", "a@b@c"] {
            assert_eq!(split_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn qemu_opens_the_clone_with_the_sources_settings() {
        let config: RbdConfig = toml::from_str(
            "pool = \"vms\"\nceph_conf = \"/etc/ceph/lab.conf\"\nuser = \"revive\"\n",
        )
        .unwrap();
        let p = RbdProvider::new("ceph1", &config);
        assert_eq!(
            p.qemu_url("vms/revive-clone-1"),
            "rbd:vms/revive-clone-1:conf=/etc/ceph/lab.conf:id=revive"
        );
        assert_eq!(
            p.cmd.base_args,
            ["-c", "/etc/ceph/lab.conf", "--id", "revive"]
        );
    }
}
