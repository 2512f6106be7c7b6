//! Folder trees: what a tree restore point (manifest version 2) holds, and
//! the [`Tree`] view every reader presents it from.
//!
//! A tree is a list of [`TreeEntry`]s, one per folder, file and symlink,
//! each with its metadata (mode, owner, mtime in ns). Paths are relative to
//! the backed-up folder, `/`-separated, without `.` or `..` components; the
//! root folder itself is the first entry, with the empty path `""`. Entries
//! are sorted by path (byte order), so a folder comes before everything in
//! it, the entries under a folder are one contiguous run, and a path is found
//! by binary search.
//!
//! A file's chunk ids are listed in its manifest entry when it has at most
//! [`INLINE_CHUNKS`] chunks ([`ChunkIndex::Inline`]): a PostgreSQL data
//! folder's thousand small files cost no index page object each. Larger files
//! have index pages like a VM disk ([`ChunkIndex::Pages`]). Either way chunk
//! `i` of a file is found in O(1): an array slot, or page `i / 1024`, slot
//! `i % 1024`.
//!
//! A v1 (VM) restore point is presented as a flat tree ([`Tree::of`]): the
//! root folder (0755) and its files (0600 for disks, 0644 otherwise), owned
//! by uid 0, with the point's creation time as mtime, since v1 manifests keep
//! no metadata.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::chunk::ChunkId;
use super::format::{INLINE_CHUNKS, PAGE_ENTRIES};
use super::index::{chunk_count, PageId};
use super::manifest::{PointKind, RestorePoint};

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A folder.
    Folder,
    /// A symbolic link (kept as a link, never followed).
    Symlink,
}

impl EntryKind {
    /// The word used in manifests and CLI output.
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Folder => "folder",
            EntryKind::Symlink => "symlink",
        }
    }
}

/// Where a file's chunk ids are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChunkIndex {
    /// Listed in the manifest entry (files of at most [`INLINE_CHUNKS`] chunks).
    Inline(Vec<ChunkId>),
    /// In index pages of up to [`PAGE_ENTRIES`] chunk ids each.
    Pages(Vec<PageId>),
}

impl ChunkIndex {
    /// A borrowed view.
    pub fn as_ref(&self) -> IndexRef<'_> {
        match self {
            ChunkIndex::Inline(c) => IndexRef::Inline(c),
            ChunkIndex::Pages(p) => IndexRef::Pages(p),
        }
    }
}

/// A borrowed [`ChunkIndex`]: what verify and gc walk for every file of
/// every point, v1 or tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndexRef<'a> {
    /// Chunk ids in the manifest.
    Inline(&'a [ChunkId]),
    /// Index pages.
    Pages(&'a [PageId]),
}

/// What an entry holds beyond its metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryContent {
    /// A folder: its entries are those whose path starts with its own and `/`.
    Folder,
    /// A file and its chunk index.
    File(ChunkIndex),
    /// A symlink and its target, as `readlink` returned it.
    Symlink(String),
}

/// One entry of a tree: a folder, file or symlink with its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawEntry", into = "RawEntry")]
pub struct TreeEntry {
    /// Path relative to the root, `/`-separated; `""` for the root folder.
    pub path: String,
    /// Permission bits including setuid, setgid and sticky (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Files: logical size in bytes. Symlinks: length of the target. Folders: 0.
    pub size: u64,
    /// Kind-specific content.
    pub content: EntryContent,
}

impl TreeEntry {
    /// The entry's kind.
    pub fn kind(&self) -> EntryKind {
        match self.content {
            EntryContent::Folder => EntryKind::Folder,
            EntryContent::File(_) => EntryKind::File,
            EntryContent::Symlink(_) => EntryKind::Symlink,
        }
    }

    /// Last path component (`""` for the root).
    pub fn name(&self) -> &str {
        self.path.rsplit('/').next().unwrap_or_default()
    }

    /// Path of the folder holding this entry; `None` for the root.
    pub fn parent(&self) -> Option<&str> {
        if self.path.is_empty() {
            return None;
        }
        Some(self.path.rsplit_once('/').map_or("", |(p, _)| p))
    }

    /// The chunk index of a file.
    pub fn index(&self) -> Option<&ChunkIndex> {
        match &self.content {
            EntryContent::File(index) => Some(index),
            _ => None,
        }
    }

    /// The target of a symlink.
    pub fn target(&self) -> Option<&str> {
        match &self.content {
            EntryContent::Symlink(t) => Some(t),
            _ => None,
        }
    }
}

/// The JSON shape of an entry (see `docs/formats.md`).
#[derive(Serialize, Deserialize)]
struct RawEntry {
    path: String,
    kind: EntryKind,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_ns: i64,
    #[serde(default)]
    size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    chunks: Option<Vec<ChunkId>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pages: Option<Vec<PageId>>,
}

impl TryFrom<RawEntry> for TreeEntry {
    type Error = String;

    fn try_from(raw: RawEntry) -> Result<Self, String> {
        let content = match (raw.kind, raw.target, raw.chunks, raw.pages) {
            (EntryKind::Folder, None, None, None) => EntryContent::Folder,
            (EntryKind::Symlink, Some(target), None, None) => EntryContent::Symlink(target),
            (EntryKind::File, None, Some(chunks), None) => {
                EntryContent::File(ChunkIndex::Inline(chunks))
            }
            (EntryKind::File, None, None, Some(pages)) => {
                EntryContent::File(ChunkIndex::Pages(pages))
            }
            (kind, ..) => {
                return Err(format!(
                    "entry '{}': a {} with the wrong fields (a file has chunks or pages, \
                     a symlink a target, a folder neither)",
                    raw.path,
                    kind.as_str()
                ))
            }
        };
        Ok(TreeEntry {
            path: raw.path,
            mode: raw.mode,
            uid: raw.uid,
            gid: raw.gid,
            mtime_ns: raw.mtime_ns,
            size: raw.size,
            content,
        })
    }
}

impl From<TreeEntry> for RawEntry {
    fn from(e: TreeEntry) -> RawEntry {
        let kind = e.kind();
        let (target, chunks, pages) = match e.content {
            EntryContent::Folder => (None, None, None),
            EntryContent::Symlink(t) => (Some(t), None, None),
            EntryContent::File(ChunkIndex::Inline(c)) => (None, Some(c), None),
            EntryContent::File(ChunkIndex::Pages(p)) => (None, None, Some(p)),
        };
        RawEntry {
            path: e.path,
            kind,
            mode: e.mode,
            uid: e.uid,
            gid: e.gid,
            mtime_ns: e.mtime_ns,
            size: e.size,
            target,
            chunks,
            pages,
        }
    }
}

/// True for a path a tree may hold: relative, `/`-separated, no empty, `.`
/// or `..` component, no NUL. (The root's `""` is checked separately.)
pub fn valid_path(path: &str) -> bool {
    !path.is_empty()
        && !path.contains('\0')
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

/// Checks the entries of a tree manifest, so that every reader can trust
/// them: the root first, sorted unique valid paths, every parent a folder,
/// file indexes as long as the sizes say.
pub fn check_entries(entries: &[TreeEntry], chunk_size: u32) -> Result<(), String> {
    let Some(root) = entries.first() else {
        return Err("a tree restore point has no entries".into());
    };
    if !root.path.is_empty() || root.kind() != EntryKind::Folder {
        return Err("the first entry is not the root folder (path \"\")".into());
    }
    let mut folders: HashSet<&str> = HashSet::new();
    folders.insert("");
    for pair in entries.windows(2) {
        let (prev, e) = (&pair[0], &pair[1]);
        if !valid_path(&e.path) {
            return Err(format!("entry '{}': not a valid relative path", e.path));
        }
        if e.path <= prev.path {
            return Err(format!("entry '{}': out of order or repeated", e.path));
        }
        let parent = e.parent().unwrap_or_default();
        if !folders.contains(parent) {
            return Err(format!("entry '{}': its parent is not a folder", e.path));
        }
        match &e.content {
            EntryContent::Folder => {
                folders.insert(&e.path);
            }
            EntryContent::Symlink(target) => {
                if target.is_empty() || target.contains('\0') || target.len() as u64 != e.size {
                    return Err(format!("entry '{}': bad symlink target", e.path));
                }
            }
            EntryContent::File(index) => {
                let chunks = chunk_count(e.size, chunk_size);
                let ok = match index {
                    ChunkIndex::Inline(c) => c.len() as u64 == chunks,
                    ChunkIndex::Pages(p) => p.len() as u64 == chunks.div_ceil(PAGE_ENTRIES as u64),
                };
                if !ok {
                    return Err(format!(
                        "entry '{}': chunk index does not match its size {}",
                        e.path, e.size
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Entries by kind, for listings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EntryCounts {
    /// Regular files.
    pub files: u64,
    /// Folders, the root included.
    pub folders: u64,
    /// Symlinks.
    pub symlinks: u64,
}

/// The entries of one restore point, with lookups by path. Built once per
/// point ([`Tree::of`]); every frontend (NFS, FUSE) and restore present a
/// point from it, and [`super::FileReader::new`] reads a file by its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    /// Sorted by path, the root first (checked when the manifest was loaded).
    entries: Vec<TreeEntry>,
}

impl Tree {
    /// The tree of a restore point: its entries (tree points) or the flat
    /// folder of its files (VM points; see the module doc for their metadata).
    pub fn of(point: &RestorePoint) -> Tree {
        Tree {
            entries: match point.kind {
                PointKind::Tree => point.tree_entries().to_vec(),
                PointKind::Vm => flat_entries(point),
            },
        }
    }

    /// Every entry, sorted by path, the root first.
    pub fn entries(&self) -> &[TreeEntry] {
        &self.entries
    }

    /// The root folder.
    pub fn root(&self) -> &TreeEntry {
        &self.entries[0]
    }

    /// Number of entries, the root included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Never true: a tree has at least its root.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry at `path` (`""` for the root).
    pub fn get(&self, path: &str) -> Option<&TreeEntry> {
        find(&self.entries, path)
    }

    /// The entries directly inside folder `folder`, sorted by name.
    pub fn children<'a>(&'a self, folder: &str) -> impl Iterator<Item = &'a TreeEntry> + 'a {
        let prefix = if folder.is_empty() {
            String::new()
        } else {
            format!("{folder}/")
        };
        let start = self
            .entries
            .partition_point(|e| e.path.as_str() < prefix.as_str());
        let skip = prefix.len();
        self.entries[start..]
            .iter()
            .take_while(move |e| e.path.starts_with(&prefix))
            .filter(move |e| !e.path.is_empty() && !e.path[skip..].contains('/'))
    }

    /// How many files, folders and symlinks.
    pub fn counts(&self) -> EntryCounts {
        count(&self.entries)
    }
}

/// Binary search of sorted entries.
pub(super) fn find<'a>(entries: &'a [TreeEntry], path: &str) -> Option<&'a TreeEntry> {
    entries
        .binary_search_by(|e| e.path.as_str().cmp(path))
        .ok()
        .map(|i| &entries[i])
}

/// Counts entries by kind.
pub(super) fn count(entries: &[TreeEntry]) -> EntryCounts {
    let mut c = EntryCounts::default();
    for e in entries {
        match e.kind() {
            EntryKind::File => c.files += 1,
            EntryKind::Folder => c.folders += 1,
            EntryKind::Symlink => c.symlinks += 1,
        }
    }
    c
}

/// The flat tree of a v1 point.
fn flat_entries(point: &RestorePoint) -> Vec<TreeEntry> {
    let mtime_ns = point.created.timestamp_nanos_opt().unwrap_or_default();
    let mut out = Vec::with_capacity(point.files.len() + 1);
    out.push(TreeEntry {
        path: String::new(),
        mode: 0o755,
        uid: 0,
        gid: 0,
        mtime_ns,
        size: 0,
        content: EntryContent::Folder,
    });
    let mut files: Vec<_> = point.files.iter().collect();
    files.sort_by(|a, b| a.name.cmp(&b.name));
    out.extend(files.into_iter().map(|f| TreeEntry {
        path: f.name.clone(),
        mode: if f.kind.is_disk() { 0o600 } else { 0o644 },
        uid: 0,
        gid: 0,
        mtime_ns,
        size: f.size,
        content: EntryContent::File(ChunkIndex::Pages(f.pages.clone())),
    }));
    out
}

/// Whether a file of `chunks` chunks lists them inline.
pub fn inline_fits(chunks: usize) -> bool {
    chunks <= INLINE_CHUNKS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, content: EntryContent, size: u64) -> TreeEntry {
        TreeEntry {
            path: path.into(),
            mode: 0o644,
            uid: 1,
            gid: 2,
            mtime_ns: -5,
            size,
            content,
        }
    }

    fn sample() -> Vec<TreeEntry> {
        let chunk = ChunkId::of(b"x");
        vec![
            entry("", EntryContent::Folder, 0),
            entry("a", EntryContent::Folder, 0),
            entry("a.txt", EntryContent::File(ChunkIndex::Inline(vec![])), 0),
            entry("a/b", EntryContent::Folder, 0),
            entry(
                "a/b/c",
                EntryContent::File(ChunkIndex::Inline(vec![chunk])),
                10,
            ),
            entry("a/d", EntryContent::Symlink("../a.txt".into()), 8),
            entry("z", EntryContent::Folder, 0),
        ]
    }

    #[test]
    fn entries_round_trip_through_json() {
        let entries = sample();
        let json = serde_json::to_string(&entries).unwrap();
        assert!(json.contains(r#""kind":"symlink""#), "{json}");
        assert!(json.contains(r#""target":"../a.txt""#), "{json}");
        let back: Vec<TreeEntry> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, entries);
        check_entries(&back, 65536).unwrap();
    }

    #[test]
    fn children_and_lookup() {
        let tree = Tree { entries: sample() };
        let names = |f: &str| -> Vec<String> {
            tree.children(f).map(|e| e.path.clone()).collect::<Vec<_>>()
        };
        assert_eq!(names(""), vec!["a", "a.txt", "z"]);
        assert_eq!(names("a"), vec!["a/b", "a/d"]);
        assert_eq!(names("a/b"), vec!["a/b/c"]);
        assert!(names("z").is_empty());
        assert_eq!(tree.get("a/b/c").unwrap().kind(), EntryKind::File);
        assert_eq!(tree.get("a/d").unwrap().target(), Some("../a.txt"));
        assert_eq!(tree.get("a/d").unwrap().parent(), Some("a"));
        assert_eq!(tree.get("a").unwrap().parent(), Some(""));
        assert!(tree.get("a/x").is_none());
        assert_eq!(
            tree.counts(),
            EntryCounts {
                files: 2,
                folders: 4,
                symlinks: 1
            }
        );
    }

    #[test]
    fn bad_trees_are_refused() {
        let ok = sample();
        let with = |f: &dyn Fn(&mut Vec<TreeEntry>)| {
            let mut e = ok.clone();
            f(&mut e);
            check_entries(&e, 65536)
        };
        assert!(with(&|_| {}).is_ok());
        for bad in ["../x", "a/../x", "/abs", "a//b", "a/./b", "a/"] {
            let r = with(&|e| e.push(entry(bad, EntryContent::Folder, 0)));
            assert!(r.is_err(), "{bad} accepted");
        }
        // Out of order, a child of a symlink or of a file, a missing parent.
        assert!(with(&|e| e.swap(1, 2)).is_err());
        assert!(with(&|e| e.push(entry("z/y/x", EntryContent::Folder, 0))).is_err());
        assert!(with(&|e| e.insert(6, entry("a/d/x", EntryContent::Folder, 0))).is_err());
        assert!(with(&|e| e.insert(3, entry("a.txt/x", EntryContent::Folder, 0))).is_err());
        // A file whose index does not match its size.
        assert!(with(&|e| e[4].size = 100_000).is_err());
        // No root.
        assert!(with(&|e| {
            e.remove(0);
        })
        .is_err());
    }

    #[test]
    fn wrong_fields_for_the_kind_do_not_parse() {
        let bad = r#"{"path":"x","kind":"file","mode":420,"uid":0,"gid":0,"mtime_ns":0,"size":0,"target":"y"}"#;
        let err = serde_json::from_str::<TreeEntry>(bad).unwrap_err();
        assert!(err.to_string().contains("wrong fields"), "{err}");
    }
}
