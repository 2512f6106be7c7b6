//! The persisted namespace of one export: folders and files with stable ids.
//!
//! ESXi keeps file handles of running VMs forever and names its lock files
//! `.lck-<fileid>`, so ids are allocated once, never reused, and written to
//! `namespace.json` (temp file, fsync, rename, fsync folder) before any
//! change is acknowledged. Data lives elsewhere (write caches, the backup);
//! this is only the tree.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::types::{DatastoreError, DsResult, FileId};

/// File id of every export's root folder.
pub const ROOT_ID: FileId = 1;

/// What a node is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Content {
    /// A folder.
    Dir,
    /// A file of a restore point: reads fall through to the backup, writes go to the cache.
    Presented {
        /// File name inside the restore point.
        file: String,
        /// Size in the backup.
        base_size: u64,
    },
    /// A file a client created: it lives wholly in the write cache.
    New,
}

/// One file or folder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// Stable id.
    pub id: FileId,
    /// Parent folder (the root is its own parent).
    pub parent: FileId,
    /// Name in the parent.
    pub name: String,
    /// Folder, presented file or new file.
    pub content: Content,
    /// The publication whose write cache holds this node's data; `None` for
    /// nodes outside any published folder.
    pub publication: Option<String>,
    /// Permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Last access.
    pub atime: SystemTime,
    /// Last data change.
    pub mtime: SystemTime,
    /// Last attribute change.
    pub ctime: SystemTime,
    /// Verifier of an exclusive CREATE, kept so a retransmission is recognised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verifier: Option<[u8; 8]>,
}

impl Node {
    /// A node to pass to [`Namespace::add`] (which sets id, parent and name),
    /// owned by root, with all times now.
    pub fn template(content: Content, mode: u32, publication: Option<String>) -> Node {
        let now = SystemTime::now();
        Node {
            id: 0,
            parent: 0,
            name: String::new(),
            content,
            publication,
            mode,
            uid: 0,
            gid: 0,
            atime: now,
            mtime: now,
            ctime: now,
            verifier: None,
        }
    }

    /// True for folders.
    pub fn is_dir(&self) -> bool {
        self.content == Content::Dir
    }
}

/// A published restore point: a folder under the export root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    /// Folder name, unique in the export (the session name).
    pub name: String,
    /// The restore point presented.
    pub point: String,
    /// Folder of this publication's write caches.
    pub cache_dir: PathBuf,
    /// Id of the publication's folder.
    pub folder: FileId,
    /// The cache folder was made, with its marker file, when this was
    /// published (or adopted at start by a revive that knows markers):
    /// from then on a missing folder or marker means the storage is not
    /// there, and the publication is refused rather than served from an
    /// empty cache. False only in state written by an older revive.
    #[serde(default)]
    pub cache_marked: bool,
}

#[derive(Debug, Serialize, Deserialize)]
struct Persisted {
    next_id: FileId,
    publications: Vec<Publication>,
    nodes: Vec<Node>,
}

/// The tree of one export, loaded in memory and saved on every change.
#[derive(Debug)]
pub struct Namespace {
    path: PathBuf,
    next_id: FileId,
    nodes: HashMap<FileId, Node>,
    children: HashMap<FileId, BTreeMap<String, FileId>>,
    publications: BTreeMap<String, Publication>,
}

fn io_err(action: &str, path: &Path, e: std::io::Error) -> DatastoreError {
    tracing::error!(path = %path.display(), cause = %e, "{action} failed");
    DatastoreError::Io(e)
}

impl Namespace {
    /// Loads `path`, or starts an empty tree (only a root folder) if it does not exist.
    pub fn open(path: PathBuf) -> DsResult<Namespace> {
        let mut ns = Namespace {
            path,
            next_id: ROOT_ID + 1,
            nodes: HashMap::new(),
            children: HashMap::new(),
            publications: BTreeMap::new(),
        };
        match fs::read(&ns.path) {
            Ok(raw) => {
                let p: Persisted = serde_json::from_slice(&raw).map_err(|e| {
                    io_err(
                        "parse namespace",
                        &ns.path,
                        std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                    )
                })?;
                ns.next_id = p.next_id;
                ns.publications = p
                    .publications
                    .into_iter()
                    .map(|p| (p.name.clone(), p))
                    .collect();
                for node in p.nodes {
                    ns.insert_node(node);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                ns.insert_node(Node {
                    id: ROOT_ID,
                    parent: ROOT_ID,
                    ..Node::template(Content::Dir, 0o755, None)
                });
                ns.save()?;
            }
            Err(e) => return Err(io_err("read namespace", &ns.path, e)),
        }
        Ok(ns)
    }

    fn insert_node(&mut self, node: Node) {
        if node.id != ROOT_ID {
            self.children
                .entry(node.parent)
                .or_default()
                .insert(node.name.clone(), node.id);
        }
        if node.is_dir() {
            self.children.entry(node.id).or_default();
        }
        self.nodes.insert(node.id, node);
    }

    /// Writes the tree durably: temp file, fsync, rename, fsync of the folder.
    pub fn save(&self) -> DsResult<()> {
        let persisted = Persisted {
            next_id: self.next_id,
            publications: self.publications.values().cloned().collect(),
            nodes: {
                let mut v: Vec<Node> = self.nodes.values().cloned().collect();
                v.sort_by_key(|n| n.id);
                v
            },
        };
        let json = serde_json::to_vec(&persisted)
            .map_err(|e| io_err("encode namespace", &self.path, std::io::Error::other(e)))?;
        crate::fsutil::write_atomic(&self.path, &json)
            .map_err(|e| io_err("save namespace", &self.path, e))
    }

    /// A node by id; [`DatastoreError::Stale`] if it was removed.
    pub fn get(&self, id: FileId) -> DsResult<&Node> {
        self.nodes.get(&id).ok_or(DatastoreError::Stale)
    }

    /// A node by id, for changing attributes.
    pub fn get_mut(&mut self, id: FileId) -> DsResult<&mut Node> {
        self.nodes.get_mut(&id).ok_or(DatastoreError::Stale)
    }

    /// Looks `name` up in folder `dir`; `..` goes up but never above the root.
    pub fn lookup(&self, dir: FileId, name: &str) -> DsResult<FileId> {
        let node = self.get(dir)?;
        if !node.is_dir() {
            return Err(DatastoreError::NotDir);
        }
        match name {
            "." => Ok(dir),
            ".." => Ok(node.parent),
            _ => {
                check_name(name)?;
                self.children
                    .get(&dir)
                    .and_then(|c| c.get(name))
                    .copied()
                    .ok_or(DatastoreError::NotFound)
            }
        }
    }

    /// Children of `dir` in id order (stable cookies: the id of the last entry returned).
    pub fn children(&self, dir: FileId) -> DsResult<Vec<&Node>> {
        if !self.get(dir)?.is_dir() {
            return Err(DatastoreError::NotDir);
        }
        let mut out: Vec<&Node> = self
            .children
            .get(&dir)
            .map(|c| c.values().filter_map(|id| self.nodes.get(id)).collect())
            .unwrap_or_default();
        out.sort_by_key(|n| n.id);
        Ok(out)
    }

    /// Adds a node under `parent` with a fresh id; the caller saves.
    pub fn add(
        &mut self,
        parent: FileId,
        name: &str,
        content: Content,
        template: &Node,
    ) -> DsResult<FileId> {
        check_name(name)?;
        if !self.get(parent)?.is_dir() {
            return Err(DatastoreError::NotDir);
        }
        if self.lookup(parent, name).is_ok() {
            return Err(DatastoreError::Exists);
        }
        let id = self.next_id;
        self.next_id += 1;
        let publication = match self.get(parent)?.publication.clone() {
            Some(p) => Some(p),
            None => template.publication.clone(),
        };
        self.insert_node(Node {
            id,
            parent,
            name: name.to_string(),
            content,
            publication,
            ..template.clone()
        });
        self.touch_dir(parent);
        Ok(id)
    }

    /// Removes one node (a folder must be empty); returns it.
    pub fn unlink(&mut self, dir: FileId, name: &str) -> DsResult<Node> {
        let id = self.lookup(dir, name)?;
        if id == ROOT_ID || name == "." || name == ".." {
            return Err(DatastoreError::Access);
        }
        if self.children.get(&id).is_some_and(|c| !c.is_empty()) {
            return Err(DatastoreError::NotEmpty);
        }
        let node = self.nodes.remove(&id).ok_or(DatastoreError::Stale)?;
        self.children.remove(&id);
        if let Some(c) = self.children.get_mut(&dir) {
            c.remove(name);
        }
        self.touch_dir(dir);
        Ok(node)
    }

    /// Moves a node; returns a node it replaced, if any.
    pub fn rename(
        &mut self,
        from_dir: FileId,
        from: &str,
        to_dir: FileId,
        to: &str,
    ) -> DsResult<Option<Node>> {
        check_name(to)?;
        let id = self.lookup(from_dir, from)?;
        if !self.get(to_dir)?.is_dir() {
            return Err(DatastoreError::NotDir);
        }
        // A folder moved into itself or its own subtree would disconnect the tree.
        let mut up = to_dir;
        loop {
            if up == id {
                return Err(DatastoreError::Invalid);
            }
            if up == ROOT_ID {
                break;
            }
            up = self.get(up)?.parent;
        }
        let moving_dir = self.get(id)?.is_dir();
        let replaced = match self.lookup(to_dir, to) {
            Ok(existing) if existing == id => return Ok(None),
            Ok(existing) => {
                let target_dir = self.get(existing)?.is_dir();
                match (moving_dir, target_dir) {
                    (false, true) => return Err(DatastoreError::IsDir),
                    (true, false) => return Err(DatastoreError::NotDir),
                    _ => Some(self.unlink(to_dir, to)?),
                }
            }
            Err(DatastoreError::NotFound) => None,
            Err(e) => return Err(e),
        };
        if let Some(c) = self.children.get_mut(&from_dir) {
            c.remove(from);
        }
        self.children
            .entry(to_dir)
            .or_default()
            .insert(to.to_string(), id);
        let node = self.get_mut(id)?;
        node.parent = to_dir;
        node.name = to.to_string();
        node.ctime = SystemTime::now();
        self.touch_dir(from_dir);
        self.touch_dir(to_dir);
        Ok(replaced)
    }

    /// Every node below `id` (not `id` itself), deepest first.
    pub fn subtree(&self, id: FileId) -> Vec<FileId> {
        let mut out = Vec::new();
        let mut stack = vec![id];
        while let Some(d) = stack.pop() {
            if let Some(c) = self.children.get(&d) {
                for child in c.values() {
                    out.push(*child);
                    stack.push(*child);
                }
            }
        }
        out.reverse();
        out
    }

    /// Removes a folder and everything in it; returns the removed nodes.
    pub fn remove_tree(&mut self, id: FileId) -> DsResult<Vec<Node>> {
        let mut removed = Vec::new();
        for child in self.subtree(id) {
            if let Some(node) = self.nodes.remove(&child) {
                self.children.remove(&child);
                removed.push(node);
            }
        }
        let node = self.nodes.remove(&id).ok_or(DatastoreError::Stale)?;
        self.children.remove(&id);
        if let Some(c) = self.children.get_mut(&node.parent) {
            c.remove(&node.name);
        }
        self.touch_dir(node.parent);
        removed.push(node);
        Ok(removed)
    }

    fn touch_dir(&mut self, dir: FileId) {
        if let Some(d) = self.nodes.get_mut(&dir) {
            let now = SystemTime::now();
            d.mtime = now;
            d.ctime = now;
        }
    }

    /// The published folders.
    pub fn publications(&self) -> impl Iterator<Item = &Publication> {
        self.publications.values()
    }

    /// Records a publication (its folder already added).
    pub fn add_publication(&mut self, publication: Publication) {
        self.publications
            .insert(publication.name.clone(), publication);
    }

    /// Forgets a publication record.
    pub fn remove_publication(&mut self, name: &str) -> Option<Publication> {
        self.publications.remove(name)
    }

    /// A publication by name.
    pub fn publication(&self, name: &str) -> Option<&Publication> {
        self.publications.get(name)
    }

    /// Number of nodes (for FSSTAT file counts).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Never true: the root always exists.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

/// Refuses names that are empty, contain `/` or NUL, or are `.`/`..`.
pub fn check_name(name: &str) -> DsResult<()> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains('/')
        || name.contains('\0')
        || name.len() > 255
    {
        Err(DatastoreError::InvalidName)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> Node {
        Node::template(Content::New, 0o644, None)
    }

    #[test]
    fn ids_survive_reopen_and_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("namespace.json");
        let mut ns = Namespace::open(path.clone()).unwrap();
        let folder = ns
            .add(
                ROOT_ID,
                "web01",
                Content::Dir,
                &Node {
                    mode: 0o755,
                    ..template()
                },
            )
            .unwrap();
        let a = ns.add(folder, "a.lck", Content::New, &template()).unwrap();
        ns.unlink(folder, "a.lck").unwrap();
        ns.save().unwrap();
        let mut again = Namespace::open(path).unwrap();
        assert_eq!(again.lookup(ROOT_ID, "web01").unwrap(), folder);
        assert!(matches!(again.get(a), Err(DatastoreError::Stale)));
        let b = again.add(folder, "b", Content::New, &template()).unwrap();
        assert!(b > a, "ids are never reused");
    }

    #[test]
    fn names_cannot_escape() {
        let dir = tempfile::tempdir().unwrap();
        let mut ns = Namespace::open(dir.path().join("n.json")).unwrap();
        for bad in ["", ".", "..", "a/b", "a\0"] {
            assert!(
                ns.add(ROOT_ID, bad, Content::New, &template()).is_err(),
                "{bad:?}"
            );
        }
        assert_eq!(
            ns.lookup(ROOT_ID, "..").unwrap(),
            ROOT_ID,
            "no way above the root"
        );
        let d = ns.add(ROOT_ID, "d", Content::Dir, &template()).unwrap();
        let e = ns.add(d, "e", Content::Dir, &template()).unwrap();
        assert!(matches!(
            ns.rename(ROOT_ID, "d", e, "x"),
            Err(DatastoreError::Invalid)
        ));
        assert!(matches!(
            ns.unlink(ROOT_ID, "d"),
            Err(DatastoreError::NotEmpty)
        ));
    }

    #[test]
    fn rename_replaces_files_like_posix() {
        let dir = tempfile::tempdir().unwrap();
        let mut ns = Namespace::open(dir.path().join("n.json")).unwrap();
        let a = ns
            .add(ROOT_ID, "web01.vmx~", Content::New, &template())
            .unwrap();
        let b = ns
            .add(ROOT_ID, "web01.vmx", Content::New, &template())
            .unwrap();
        let replaced = ns
            .rename(ROOT_ID, "web01.vmx~", ROOT_ID, "web01.vmx")
            .unwrap();
        assert_eq!(replaced.map(|n| n.id), Some(b));
        assert_eq!(ns.lookup(ROOT_ID, "web01.vmx").unwrap(), a);
        assert!(ns.lookup(ROOT_ID, "web01.vmx~").is_err());
    }
}
