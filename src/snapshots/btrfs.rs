//! The btrfs provider: a subvolume is a datastore of VM folders, its
//! read-only snapshots are what VMs are recovered from, and a writable
//! `btrfs subvolume snapshot` of one is the clone (O(1), copy-on-write).
//! The clone is served by revive's NFS server as a passthrough export
//! (`/snap/<clone>`), to the recovering host only.
//!
//! Names are subvolume paths below the file system's top level, as
//! `btrfs subvolume list` prints them: volume `ds1`, snapshot
//! `snaps/ds1@monday`, hence `snap:pool1/snaps/ds1@monday`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;

use super::{
    vms_in_folder, BtrfsConfig, CloneRef, Presentation, SnapResult, Snapshot, SnapshotError,
    SnapshotProvider, SnapshotVm, StorageCommand, Volume, CLONE_PREFIX, EXPORT_ROOT,
};
use crate::datastore::passthrough::Passthrough;
use crate::datastore::DatastoreError;

/// Default clone folder below the file system's top level.
pub const DEFAULT_CLONE_DIR: &str = ".revive-clones";

/// One line of `btrfs subvolume list -q -u [-s]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Subvolume {
    path: String,
    uuid: String,
    parent_uuid: Option<String>,
    otime: Option<String>,
}

/// Parses `btrfs subvolume list -q -u [-s]` output: `ID 257 gen 7 [cgen 7]
/// top level 5 [otime DATE TIME] parent_uuid U|- uuid U path P`.
fn parse_list(text: &str) -> Vec<Subvolume> {
    text.lines()
        .filter_map(|line| {
            let at = line.find(" path ")?;
            let path = line[at + " path ".len()..].to_string();
            let fields: Vec<&str> = line[..at].split_whitespace().collect();
            let after = |key: &str| {
                fields
                    .iter()
                    .position(|f| *f == key)
                    .and_then(|i| fields.get(i + 1))
                    .map(|v| v.to_string())
            };
            let otime = fields
                .iter()
                .position(|f| *f == "otime")
                .and_then(|i| Some(format!("{} {}", fields.get(i + 1)?, fields.get(i + 2)?)));
            Some(Subvolume {
                path,
                uuid: after("uuid")?,
                parent_uuid: after("parent_uuid").filter(|u| u != "-"),
                otime,
            })
        })
        .collect()
}

/// A btrfs file system as a snapshot source.
pub struct BtrfsProvider {
    name: String,
    path: PathBuf,
    clone_dir: PathBuf,
    cmd: StorageCommand,
    /// Where clones are exported; `None` in a process that only lists.
    passthrough: Option<Arc<Passthrough>>,
}

impl BtrfsProvider {
    /// The source `name` configured by `config`; clones are exported through `passthrough`.
    pub fn new(
        name: &str,
        config: &BtrfsConfig,
        passthrough: Option<Arc<Passthrough>>,
    ) -> BtrfsProvider {
        BtrfsProvider {
            name: name.to_string(),
            path: config.path.clone(),
            clone_dir: config
                .clone_dir
                .clone()
                .unwrap_or_else(|| config.path.join(DEFAULT_CLONE_DIR)),
            cmd: StorageCommand::new(name, &config.command),
            passthrough,
        }
    }

    fn path_arg(&self) -> String {
        self.path.to_string_lossy().into_owned()
    }

    /// The clone folder's path below the top level, if it is inside it:
    /// clones (writable snapshots of snapshots) are not listed as volumes.
    fn clone_prefix(&self) -> Option<String> {
        self.clone_dir
            .strip_prefix(&self.path)
            .ok()
            .map(|p| p.to_string_lossy().trim_end_matches('/').to_string())
    }

    fn is_clone(&self, sub: &Subvolume) -> bool {
        let name = sub.path.rsplit('/').next().unwrap_or(&sub.path);
        let in_dir = self
            .clone_prefix()
            .is_some_and(|p| sub.path.starts_with(&format!("{p}/")));
        in_dir || name.starts_with(CLONE_PREFIX)
    }

    /// (volumes, read-only snapshots) of the file system, clones left out.
    async fn subvolumes(&self) -> SnapResult<(Vec<Subvolume>, Vec<Subvolume>)> {
        let path = self.path_arg();
        let all = parse_list(
            &self
                .cmd
                .run(&["subvolume", "list", "-q", "-u", &path])
                .await?,
        );
        let snaps = parse_list(
            &self
                .cmd
                .run(&["subvolume", "list", "-r", "-s", "-q", "-u", &path])
                .await?,
        );
        let volumes = all
            .into_iter()
            .filter(|s| !self.is_clone(s) && !snaps.iter().any(|r| r.uuid == s.uuid))
            .collect();
        let snaps = snaps.into_iter().filter(|s| !self.is_clone(s)).collect();
        Ok((volumes, snaps))
    }

    fn volume_name(volumes: &[Subvolume], snap: &Subvolume) -> String {
        match &snap.parent_uuid {
            Some(p) => volumes
                .iter()
                .find(|v| &v.uuid == p)
                .map(|v| v.path.clone())
                .unwrap_or_else(|| format!("(deleted volume {p})")),
            None => "(no parent volume)".into(),
        }
    }

    async fn describe(&self, volumes: &[Subvolume], snap: &Subvolume) -> SnapResult<Snapshot> {
        let folder = self.path.join(&snap.path);
        let vms = tokio::task::spawn_blocking(move || vms_in_folder(&folder))
            .await
            .map_err(|e| SnapshotError::Io {
                action: "scan snapshot",
                path: self.path.join(&snap.path),
                source: std::io::Error::other(e),
            })??;
        Ok(Snapshot {
            id: snap.path.clone(),
            volume: Self::volume_name(volumes, snap),
            created: snap.otime.clone(),
            vms,
        })
    }

    /// Refuses a clone location revive did not make (defence in depth:
    /// destroy deletes subvolumes).
    fn check_ours(&self, clone: &CloneRef) -> SnapResult<PathBuf> {
        let location = PathBuf::from(&clone.location);
        let ours = location.parent() == Some(self.clone_dir.as_path())
            && location
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(CLONE_PREFIX));
        if !ours {
            return Err(SnapshotError::Present {
                clone: clone.name.clone(),
                reason: format!(
                    "'{}' is not a clone in '{}'; left alone",
                    clone.location,
                    self.clone_dir.display()
                ),
            });
        }
        Ok(location)
    }

    fn export_path(clone: &CloneRef) -> String {
        format!("{EXPORT_ROOT}/{}", clone.name)
    }

    fn passthrough(&self, clone: &CloneRef) -> SnapResult<Arc<Passthrough>> {
        self.passthrough
            .clone()
            .ok_or_else(|| SnapshotError::Present {
                clone: clone.name.clone(),
                reason: "this process runs no NFS server (only `revive serve` presents clones)"
                    .into(),
            })
    }
}

fn exists(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok()
}

#[async_trait]
impl SnapshotProvider for BtrfsProvider {
    fn kind(&self) -> &'static str {
        "btrfs"
    }

    async fn volumes(&self) -> SnapResult<Vec<Volume>> {
        let (volumes, snaps) = self.subvolumes().await?;
        let mut out: Vec<Volume> = Vec::new();
        for snap in &snaps {
            let described = self.describe(&volumes, snap).await?;
            match out.iter_mut().find(|v| v.name == described.volume) {
                Some(v) => v.snapshots.push(described),
                None => out.push(Volume {
                    name: described.volume.clone(),
                    snapshots: vec![described],
                }),
            }
        }
        for v in &volumes {
            if !out.iter().any(|o| o.name == v.path) {
                out.push(Volume {
                    name: v.path.clone(),
                    snapshots: Vec::new(),
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn snapshot(&self, id: &str) -> SnapResult<Snapshot> {
        let (volumes, snaps) = self.subvolumes().await?;
        // Only a listed snapshot path is ever joined to the mount point.
        let snap = snaps
            .iter()
            .find(|s| s.path == id.trim_matches('/'))
            .ok_or_else(|| SnapshotError::UnknownSnapshot {
                source_name: self.name.clone(),
                snapshot: id.to_string(),
            })?;
        self.describe(&volumes, snap).await
    }

    fn plan_clone(&self, snapshot: &str, name: &str) -> CloneRef {
        CloneRef {
            name: name.to_string(),
            location: self.clone_dir.join(name).to_string_lossy().into_owned(),
            snapshot: snapshot.to_string(),
            protected_snapshot: false,
        }
    }

    async fn create_clone(&self, clone: &CloneRef) -> SnapResult<CloneRef> {
        let location = self.check_ours(clone)?;
        if exists(&location) {
            return Ok(clone.clone());
        }
        std::fs::create_dir_all(&self.clone_dir).map_err(|source| SnapshotError::Io {
            action: "create clone folder",
            path: self.clone_dir.clone(),
            source,
        })?;
        let from = self.path.join(&clone.snapshot);
        self.cmd
            .run(&[
                "subvolume",
                "snapshot",
                &from.to_string_lossy(),
                &clone.location,
            ])
            .await?;
        tracing::info!(source = %self.name, snapshot = %clone.snapshot, clone = %clone.location, "btrfs clone made");
        Ok(clone.clone())
    }

    async fn present(
        &self,
        clone: &CloneRef,
        _vm: &SnapshotVm,
        clients: &[IpAddr],
    ) -> SnapResult<Presentation> {
        let folder = self.check_ours(clone)?;
        let export = Self::export_path(clone);
        let passthrough = self.passthrough(clone)?;
        // The export is persisted (fsync) before it is served: off the async threads.
        let (path, dir, allowed) = (export.clone(), folder.clone(), clients.to_vec());
        tokio::task::spawn_blocking(move || passthrough.add_export(&path, &dir, &allowed))
            .await
            .map_err(|e| DatastoreError::Io(std::io::Error::other(e)))
            .and_then(|r| r)
            .map_err(|e| SnapshotError::Present {
                clone: clone.name.clone(),
                reason: format!("export '{export}' of '{}': {e}", folder.display()),
            })?;
        Ok(Presentation::Nfs { export, folder })
    }

    async fn unpresent(&self, clone: &CloneRef) -> SnapResult<()> {
        let export = Self::export_path(clone);
        let passthrough = self.passthrough(clone)?;
        let path = export.clone();
        tokio::task::spawn_blocking(move || passthrough.remove_export(&path))
            .await
            .map_err(|e| DatastoreError::Io(std::io::Error::other(e)))
            .and_then(|r| r)
            .map_err(|e| SnapshotError::Present {
                clone: clone.name.clone(),
                reason: format!("remove export '{export}': {e}"),
            })
    }

    async fn destroy(&self, clone: &CloneRef) -> SnapResult<()> {
        let location = self.check_ours(clone)?;
        if !exists(&location) {
            return Ok(());
        }
        self.cmd
            .run(&["subvolume", "delete", "--commit-after", &clone.location])
            .await?;
        tracing::info!(source = %self.name, clone = %clone.location, "btrfs clone deleted");
        Ok(())
    }

    async fn clones(&self) -> SnapResult<Vec<String>> {
        let entries = match std::fs::read_dir(&self.clone_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => {
                return Err(SnapshotError::Io {
                    action: "list clones in",
                    path: self.clone_dir.clone(),
                    source,
                })
            }
        };
        let mut names: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
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
    fn subvolume_lists_are_parsed() {
        let all = "ID 256 gen 7 top level 5 parent_uuid -                                    uuid d3a0fabc-67eb path ds1\n\
                   ID 257 gen 7 top level 5 parent_uuid d3a0fabc-67eb uuid bbeab4d7 path snaps/ds1 @ monday\n";
        let subs = parse_list(all);
        assert_eq!(subs.len(), 2);
        assert_eq!(subs[0].path, "ds1");
        assert_eq!(subs[0].parent_uuid, None);
        assert_eq!(subs[1].path, "snaps/ds1 @ monday");
        assert_eq!(subs[1].parent_uuid.as_deref(), Some("d3a0fabc-67eb"));
        assert_eq!(subs[1].uuid, "bbeab4d7");
        let snaps = "ID 257 gen 7 cgen 7 top level 5 otime 2026-12-04 05:22:31 parent_uuid d3a0 uuid bbea path snaps/ds1@1\n";
        let s = &parse_list(snaps)[0];
        assert_eq!(s.otime.as_deref(), Some("2026-12-04 05:22:31"));
        assert_eq!(s.path, "snaps/ds1@1");
    }
}
