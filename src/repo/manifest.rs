//! Restore point manifests: what a restore point contains, stored as JSON at
//! `points/<id>.json`.
//!
//! A manifest is written last, with a conditional put, after every chunk and
//! index page it names is durable: a restore point that is listed is complete.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::index::PageId;

/// Version of the manifest layout.
pub const MANIFEST_VERSION: u32 = 1;

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

/// A restore point: one backup of one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestorePoint {
    /// Manifest layout version.
    pub format_version: u32,
    /// Unique id: 8 hex digits of creation time, 8 random.
    pub id: String,
    /// VM name.
    pub vm: String,
    /// Creation time.
    pub created: DateTime<Utc>,
    /// The previous restore point of this VM, if any.
    pub parent: Option<String>,
    /// Chunk size of every index in this point.
    pub chunk_size: u32,
    /// The files, in folder order.
    pub files: Vec<FileEntry>,
    /// What the backup did.
    pub stats: BackupStats,
}

impl RestorePoint {
    /// Store key of a manifest.
    pub fn key_of(id: &str) -> String {
        format!("points/{id}.json")
    }

    /// Sum of file sizes.
    pub fn logical_size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// Looks a file up by name.
    pub fn file(&self, name: &str) -> Option<&FileEntry> {
        self.files.iter().find(|f| f.name == name)
    }
}

/// Makes a new restore point id: sortable by time, unique by randomness.
pub fn new_point_id(now: DateTime<Utc>) -> String {
    let secs = now.timestamp().max(0) as u32;
    format!("{secs:08x}{:08x}", rand::random::<u32>())
}
