//! Restore point manifests: what a restore point contains, stored as JSON at
//! `points/<id>.json`.
//!
//! A manifest is written last, with a conditional put, after every chunk and
//! index page it names is durable: a restore point that is listed is complete.
//!
//! # Versions
//! - **1, VM points** (`kind` absent): a flat VM folder, `files` with a name,
//!   a role ([`FileKind`]) and index pages each. A VM folder or disk image is
//!   still written in this version, byte for byte as before trees existed, so
//!   a VM point stays readable by an older revive sharing the repository.
//! - **2, tree points** (`"kind": "tree"`): a folder tree, `entries` with
//!   path, kind, mode, owner, mtime, size, symlink target and chunk index each
//!   (see [`super::tree`]). No `files` field: an older revive fails to parse
//!   the manifest instead of taking the point for an empty one (its gc would
//!   otherwise free the point's chunks).
//!
//! A reader accepts versions 1 to [`MANIFEST_VERSION`] and refuses newer ones
//! by name. [`RestorePoint::check`] validates a loaded manifest (paths, order,
//! index lengths), so every reader may trust it.

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::index::PageId;
use super::tree::{self, EntryCounts, IndexRef, Tree, TreeEntry};
use super::RepoError;

/// Newest manifest version this code reads (and writes, for tree points).
pub const MANIFEST_VERSION: u32 = 2;
/// Manifest version of VM points (flat `files`), unchanged since the first release.
pub const MANIFEST_VERSION_VM: u32 = 1;
/// Manifest version of tree points (`entries`).
pub const MANIFEST_VERSION_TREE: u32 = 2;

/// What a restore point holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PointKind {
    /// A flat VM folder or a disk image (`files`, manifest version 1).
    #[default]
    Vm,
    /// A folder tree with metadata (`entries`, manifest version 2).
    Tree,
}

impl PointKind {
    /// True for VM points (the default, not written to manifests).
    pub fn is_vm(&self) -> bool {
        *self == PointKind::Vm
    }

    /// `vm` or `tree`, as listings print it.
    pub fn as_str(self) -> &'static str {
        match self {
            PointKind::Vm => "vm",
            PointKind::Tree => "tree",
        }
    }
}

/// What role a file plays in a VM folder; decides how it is presented and migrated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    /// VM configuration (`.vmx`).
    Vmx,
    /// VMDK text descriptor naming its extents.
    Descriptor,
    /// A VMDK flat extent (`-flat.vmdk`): the disk's data.
    FlatDisk,
    /// A raw disk image given on its own (`.img`, `.raw`, …).
    DiskImage,
    /// BIOS/EFI variables (`.nvram`).
    Nvram,
    /// A log file.
    Log,
    /// Anything else in the folder.
    Other,
}

impl FileKind {
    /// True for files that hold a disk's blocks.
    pub fn is_disk(self) -> bool {
        matches!(self, FileKind::FlatDisk | FileKind::DiskImage)
    }
}

/// One file of a restore point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// File name inside the VM folder (no path separators).
    pub name: String,
    /// The file's role.
    pub kind: FileKind,
    /// Logical size in bytes.
    pub size: u64,
    /// The chunk index, page by page.
    pub pages: Vec<PageId>,
}

/// What a backup did, for the operator and the `--json` output.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BackupStats {
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Plain bytes of chunks this backup stored for the first time.
    pub bytes_new: u64,
    /// Bytes written to the store for new chunks and index pages (after compression).
    pub bytes_stored: u64,
    /// Chunks stored for the first time.
    pub chunks_new: u64,
    /// Chunks already in the repository (from the parent or any other backup).
    pub chunks_reused: u64,
    /// All-zero chunks, stored as holes.
    pub chunks_zero: u64,
    /// Index pages written (unchanged pages are shared with the parent).
    pub pages_new: u64,
    /// Wall-clock duration of the backup.
    pub seconds: f64,
}

/// A restore point: one backup of one VM folder or folder tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestorePoint {
    /// Manifest layout version ([`MANIFEST_VERSION_VM`] or [`MANIFEST_VERSION_TREE`]).
    pub format_version: u32,
    /// Unique id: 8 hex digits of creation time, 8 random.
    pub id: String,
    /// Name of the chain: the VM's name, or the name a tree was backed up as
    /// (`--name`); `NAME@latest` resolves by it.
    pub vm: String,
    /// Creation time.
    pub created: DateTime<Utc>,
    /// The previous restore point of this name, if any.
    pub parent: Option<String>,
    /// Chunk size of every index in this point.
    pub chunk_size: u32,
    /// VM folder or tree; absent in version 1 manifests.
    #[serde(default, skip_serializing_if = "PointKind::is_vm")]
    pub kind: PointKind,
    /// VM points: the files, in folder order. Empty for tree points (use
    /// [`RestorePoint::tree`] or [`RestorePoint::entries`] for any point).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileEntry>,
    /// Tree points: every entry, sorted by path, the root first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) entries: Vec<TreeEntry>,
    /// What the backup did.
    pub stats: BackupStats,
}

impl RestorePoint {
    /// Store key of a manifest.
    pub fn key_of(id: &str) -> String {
        format!("points/{id}.json")
    }

    /// Parses and checks a manifest read from the store at `key`.
    ///
    /// # Errors
    /// [`RepoError::ManifestVersion`] for a manifest of a newer revive,
    /// [`RepoError::CorruptObject`] for one that does not parse or check.
    pub fn parse(id: &str, key: &str, raw: &[u8]) -> Result<RestorePoint, RepoError> {
        // The version first: a newer manifest may not parse as this one.
        #[derive(Deserialize)]
        struct Version {
            format_version: u32,
        }
        let corrupt = |reason: String| RepoError::CorruptObject {
            key: key.to_string(),
            reason,
        };
        let version: Version = serde_json::from_slice(raw).map_err(|e| corrupt(e.to_string()))?;
        if version.format_version > MANIFEST_VERSION {
            return Err(RepoError::ManifestVersion {
                point: id.to_string(),
                found: version.format_version,
                supported: MANIFEST_VERSION,
            });
        }
        let point: RestorePoint =
            serde_json::from_slice(raw).map_err(|e| corrupt(e.to_string()))?;
        point.check().map_err(corrupt)?;
        Ok(point)
    }

    /// Sum of file sizes.
    pub fn logical_size(&self) -> u64 {
        match self.kind {
            PointKind::Vm => self.files.iter().map(|f| f.size).sum(),
            PointKind::Tree => self
                .entries
                .iter()
                .filter(|e| e.index().is_some())
                .map(|e| e.size)
                .sum(),
        }
    }

    /// Looks a file of a VM point up by name.
    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }

    /// The point as a tree, with lookups by path: the entries of a tree
    /// point, the flat folder of a VM point.
    pub fn tree(&self) -> Tree {
        Tree::of(self)
    }

    /// Every entry, sorted by path, the root first: borrowed for tree
    /// points, built for VM points (see [`super::tree`] for their metadata).
    pub fn entries(&self) -> Cow<'_, [TreeEntry]> {
        match self.kind {
            PointKind::Tree => Cow::Borrowed(&self.entries),
            PointKind::Vm => Cow::Owned(Tree::of(self).entries().to_vec()),
        }
    }

    /// The entry at `path` of a tree point (`None` for VM points).
    pub fn entry(&self, path: &str) -> Option<&TreeEntry> {
        tree::find(&self.entries, path)
    }

    /// The stored entries of a tree point (empty for VM points).
    pub(super) fn tree_entries(&self) -> &[TreeEntry] {
        &self.entries
    }

    /// Number of entries: the files of a VM point, every entry of a tree
    /// point (its root folder included).
    pub fn entry_count(&self) -> usize {
        match self.kind {
            PointKind::Vm => self.files.len(),
            PointKind::Tree => self.entries.len(),
        }
    }

    /// Files, folders and symlinks (a VM point: its files and one folder).
    pub fn counts(&self) -> EntryCounts {
        match self.kind {
            PointKind::Vm => EntryCounts {
                files: self.files.len() as u64,
                folders: 1,
                symlinks: 0,
            },
            PointKind::Tree => tree::count(&self.entries),
        }
    }

    /// Every file's path (VM points: name) and chunk index: what verify and
    /// gc walk.
    pub fn file_indexes(&self) -> Vec<(&str, IndexRef<'_>)> {
        match self.kind {
            PointKind::Vm => self
                .files
                .iter()
                .map(|f| (f.name.as_str(), IndexRef::Pages(&f.pages)))
                .collect(),
            PointKind::Tree => self
                .entries
                .iter()
                .filter_map(|e| e.index().map(|i| (e.path.as_str(), i.as_ref())))
                .collect(),
        }
    }

    /// Checks a manifest read from the store: a known version that matches
    /// its kind, file names that stay inside the folder, a valid tree.
    pub fn check(&self) -> Result<(), String> {
        let expected = match self.kind {
            PointKind::Vm => MANIFEST_VERSION_VM,
            PointKind::Tree => MANIFEST_VERSION_TREE,
        };
        if self.format_version > MANIFEST_VERSION {
            return Err(format!(
                "manifest version {} is newer than this revive reads ({MANIFEST_VERSION}); \
                 upgrade revive",
                self.format_version
            ));
        }
        if super::check_chunk_size(self.chunk_size as u64).is_err() {
            return Err(format!("chunk size {} is not a valid one", self.chunk_size));
        }
        if self.format_version != expected {
            return Err(format!(
                "manifest version {} does not hold a {} point",
                self.format_version,
                self.kind.as_str()
            ));
        }
        match self.kind {
            PointKind::Vm => {
                if !self.entries.is_empty() {
                    return Err("a VM point with tree entries".into());
                }
                let plain = |name: &str| tree::valid_path(name) && !name.contains('/');
                if let Some(f) = self.files.iter().find(|f| !plain(&f.name)) {
                    return Err(format!("file name '{}' is not a plain name", f.name));
                }
                Ok(())
            }
            PointKind::Tree => {
                if !self.files.is_empty() {
                    return Err("a tree point with VM files".into());
                }
                tree::check_entries(&self.entries, self.chunk_size)
            }
        }
    }
}

/// Resolves a point spec among already loaded points.
pub fn resolve_in<'a>(
    points: &'a [RestorePoint],
    spec: &str,
) -> Result<&'a RestorePoint, RepoError> {
    pick(points, spec, |p| (&p.id, &p.vm, p.created))
}

/// The fields of a manifest that resolving a spec needs. Parsing only these
/// skips building a tree point's entries (serde skips unknown fields
/// without allocating).
#[derive(Debug, Clone, Deserialize)]
pub(super) struct PointSummary {
    pub id: String,
    pub vm: String,
    pub created: DateTime<Utc>,
}

impl PointSummary {
    /// Parses the summary of the manifest stored at `key`.
    pub(super) fn parse(key: &str, raw: &[u8]) -> Result<PointSummary, RepoError> {
        serde_json::from_slice(raw).map_err(|e| RepoError::CorruptObject {
            key: key.to_string(),
            reason: e.to_string(),
        })
    }
}

/// Picks the item a spec names: `NAME@latest` (newest by creation time,
/// then id), a full id, or a unique id prefix. `fields` gives an item's id,
/// name and creation time.
pub(super) fn pick<'a, T>(
    items: &'a [T],
    spec: &str,
    fields: impl Fn(&T) -> (&str, &str, DateTime<Utc>),
) -> Result<&'a T, RepoError> {
    let id = |t: &T| fields(t).0.to_string();
    if let Some(name) = spec.strip_suffix("@latest") {
        return items
            .iter()
            .filter(|t| fields(t).1 == name)
            .max_by(|a, b| {
                let (a, b) = (fields(a), fields(b));
                a.2.cmp(&b.2).then(a.0.cmp(b.0))
            })
            .ok_or_else(|| RepoError::PointNotFound { spec: spec.into() });
    }
    if let Some(t) = items.iter().find(|t| fields(t).0 == spec) {
        return Ok(t);
    }
    let matches: Vec<&T> = items
        .iter()
        .filter(|t| !spec.is_empty() && fields(t).0.starts_with(spec))
        .collect();
    match matches.as_slice() {
        [] => Err(RepoError::PointNotFound { spec: spec.into() }),
        [one] => Ok(one),
        many => Err(RepoError::AmbiguousPoint {
            spec: spec.into(),
            candidates: many.iter().map(|t| id(t)).collect::<Vec<_>>().join(", "),
        }),
    }
}

/// Makes a new restore point id: sortable by time, unique by randomness.
pub fn new_point_id(now: DateTime<Utc>) -> String {
    let secs = now.timestamp().max(0) as u32;
    format!("{secs:08x}{:08x}", rand::random::<u32>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::repo::tree::{EntryContent, EntryKind};

    /// A manifest as revive wrote it before trees existed (from the v1
    /// fixture repository, tests/fixtures/repo-v1).
    const V1: &str = r#"{
  "format_version": 1,
  "id": "6b12517c428004d4",
  "vm": "fix01",
  "created": "2026-12-04T05:37:00.886642194Z",
  "parent": "6b12517cd360f4d1",
  "chunk_size": 65536,
  "files": [
    { "name": "fix01.vmx", "kind": "vmx", "size": 37,
      "pages": ["0d1ea0862cef46092f1191124ee8a63f57c90626b297f43668a9fd3690f82507"] },
    { "name": "fix01-flat.vmdk", "kind": "flat_disk", "size": 498752,
      "pages": ["e1e556bf7ccf9b2d670e4e4be8c9655e7114ad0bc6d347b799c802bf3ac215c6"] }
  ],
  "stats": { "bytes_read": 1, "bytes_new": 2, "bytes_stored": 3, "chunks_new": 4,
             "chunks_reused": 5, "chunks_zero": 6, "pages_new": 7, "seconds": 0.5 }
}"#;

    #[test]
    fn v1_manifests_read_as_flat_vm_points_and_write_back_unchanged() {
        let point: RestorePoint = serde_json::from_str(V1).unwrap();
        point.check().unwrap();
        assert_eq!(point.kind, PointKind::Vm);
        assert_eq!(point.files.len(), 2);
        assert_eq!(point.logical_size(), 37 + 498752);
        let tree = point.tree();
        assert_eq!(tree.len(), 3);
        assert_eq!(tree.root().kind(), EntryKind::Folder);
        // Sorted by path, disks 0600.
        let flat = &tree.entries()[1];
        assert_eq!((flat.path.as_str(), flat.mode), ("fix01-flat.vmdk", 0o600));
        assert!(matches!(flat.content, EntryContent::File(_)));
        assert_eq!(tree.get("fix01.vmx").unwrap().mode, 0o644);
        assert_eq!(point.file_indexes().len(), 2);
        // Written back, a v1 point has no new field.
        let json = serde_json::to_value(&point).unwrap();
        let original: serde_json::Value = serde_json::from_str(V1).unwrap();
        assert_eq!(json, original);
    }

    #[test]
    fn bad_manifests_are_refused_by_check() {
        let mut point: RestorePoint = serde_json::from_str(V1).unwrap();
        point.files[0].name = "../escape".into();
        assert!(point.check().is_err());
        let mut point: RestorePoint = serde_json::from_str(V1).unwrap();
        point.format_version = 2;
        assert!(point
            .check()
            .unwrap_err()
            .contains("does not hold a vm point"));
        point.format_version = 3;
        assert!(point.check().unwrap_err().contains("upgrade revive"));
        let mut point: RestorePoint = serde_json::from_str(V1).unwrap();
        point.chunk_size = 0;
        assert!(point.check().is_err());
    }

    #[test]
    fn a_tree_manifest_has_no_files_field() {
        let mut point: RestorePoint = serde_json::from_str(V1).unwrap();
        point.files.clear();
        point.kind = PointKind::Tree;
        point.format_version = MANIFEST_VERSION_TREE;
        point.entries = vec![TreeEntry {
            path: String::new(),
            mode: 0o700,
            uid: 1,
            gid: 1,
            mtime_ns: 1,
            size: 0,
            content: EntryContent::Folder,
        }];
        point.check().unwrap();
        let json = serde_json::to_value(&point).unwrap();
        assert!(json.get("files").is_none(), "{json}");
        assert_eq!(json["kind"], "tree");
        let back: RestorePoint = serde_json::from_value(json).unwrap();
        assert_eq!(back, point);
    }
}
