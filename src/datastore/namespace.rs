//! The persisted namespace of one export: folders and files with stable ids.
//!
//! ESXi keeps file handles of running VMs forever and names its lock files
//! `.lck-<fileid>`, so ids are allocated once, never reused, and durable
//! before any change is acknowledged. A change is one record appended to
//! the export's change log (`nslog.rs`: one shared `fdatasync`, not a
//! rewrite of the tree); the whole tree is written to `namespace.json` only
//! at checkpoints. Data lives elsewhere (write caches, the backup); this is
//! only the tree.
//!
//! Every mutating method records what it touched; [`Namespace::commit`]
//! turns that into one log record, so a change is applied whole or not at
//! all after a crash, and returns a [`Durable`] to wait on once the lock is
//! released.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use super::nslog::NsLog;
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
    /// A symbolic link: presented from a tree restore point or made by a
    /// client; never followed by the server.
    Symlink {
        /// The link's target, as `readlink` returns it.
        target: String,
    },
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

    /// True for regular files (presented or new): the nodes with data.
    pub fn is_file(&self) -> bool {
        matches!(self.content, Content::Presented { .. } | Content::New)
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

/// `namespace.json`: the whole tree as of a checkpoint.
#[derive(Debug, Serialize, Deserialize)]
struct Persisted {
    next_id: FileId,
    publications: Vec<Publication>,
    nodes: Vec<Node>,
    /// Last logged change this snapshot covers (0 in snapshots written
    /// before the log existed, which covered everything).
    #[serde(default)]
    seq: u64,
}

/// One logged change: every node and publication it touched, in full.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Change {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    put: Vec<Node>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    del: Vec<FileId>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    put_pub: Vec<Publication>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    del_pub: Vec<String>,
    next_id: FileId,
}

/// A change queued in the log: [`Durable::wait`] returns once it survives a
/// crash. Wait after releasing the namespace lock, so concurrent changes
/// share one sync.
#[must_use = "a change is acknowledged only once durable"]
#[derive(Debug)]
pub struct Durable {
    log: Arc<NsLog>,
    seq: u64,
}

impl Durable {
    /// Waits until the change is durable.
    ///
    /// # Errors
    /// The log could not be written; the change is then lost at the next
    /// restart, and the namespace refuses further changes until then.
    pub async fn wait(self) -> DsResult<()> {
        self.log.wait_durable(self.seq).await.map_err(|e| {
            tracing::error!(cause = %e, "namespace change not durable");
            DatastoreError::Io(e)
        })
    }
}

/// The tree of one export, in memory, with its change log.
#[derive(Debug)]
pub struct Namespace {
    path: PathBuf,
    log: Arc<NsLog>,
    next_id: FileId,
    nodes: HashMap<FileId, Node>,
    children: HashMap<FileId, BTreeMap<String, FileId>>,
    publications: BTreeMap<String, Publication>,
    /// Nodes changed (or removed) since the last `commit`.
    dirty: BTreeSet<FileId>,
    /// Publications changed (or removed) since the last `commit`.
    dirty_pubs: BTreeSet<String>,
}

fn io_err(action: &str, path: &Path, e: std::io::Error) -> DatastoreError {
    tracing::error!(path = %path.display(), cause = %e, "{action} failed");
    DatastoreError::Io(e)
}

fn corrupt(action: &str, path: &Path, e: serde_json::Error) -> DatastoreError {
    io_err(
        action,
        path,
        std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    )
}

impl Namespace {
    /// Loads the snapshot at `path` (`<dir>/namespace.json`) and replays the
    /// change log beside it (`<dir>/namespace.log`), or starts an empty tree
    /// (only a root folder). Blocking: call it off the async threads.
    ///
    /// # Errors
    /// I/O errors, or a snapshot or logged change that does not parse.
    pub fn open(path: PathBuf) -> DsResult<Namespace> {
        let snapshot: Option<Persisted> = match fs::read(&path) {
            Ok(raw) => Some(
                serde_json::from_slice(&raw).map_err(|e| corrupt("parse namespace", &path, e))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err("read namespace", &path, e)),
        };
        let log_path = path.with_file_name("namespace.log");
        if let Some(dir) = log_path.parent() {
            fs::create_dir_all(dir).map_err(|e| io_err("create", dir, e))?;
        }
        let snapshot_seq = snapshot.as_ref().map_or(0, |p| p.seq);
        let (log, changes) =
            NsLog::open(&log_path, snapshot_seq).map_err(|e| io_err("open", &log_path, e))?;
        let mut ns = Namespace {
            path,
            log: Arc::new(log),
            next_id: ROOT_ID + 1,
            nodes: HashMap::new(),
            children: HashMap::new(),
            publications: BTreeMap::new(),
            dirty: BTreeSet::new(),
            dirty_pubs: BTreeSet::new(),
        };
        let Some(p) = snapshot else {
            ns.insert_node(Node {
                id: ROOT_ID,
                parent: ROOT_ID,
                ..Node::template(Content::Dir, 0o755, None)
            });
            ns.checkpoint_blocking()?;
            return Ok(ns);
        };
        ns.next_id = p.next_id;
        ns.publications = p
            .publications
            .into_iter()
            .map(|p| (p.name.clone(), p))
            .collect();
        for node in p.nodes {
            ns.insert_node(node);
        }
        let mut replayed = 0;
        for logged in changes.into_iter().filter(|c| c.seq > snapshot_seq) {
            let change: Change = serde_json::from_slice(&logged.payload)
                .map_err(|e| corrupt("parse namespace change", &log_path, e))?;
            ns.apply(change);
            replayed += 1;
        }
        ns.dirty.clear();
        if replayed > 0 {
            tracing::info!(namespace = %ns.path.display(), changes = replayed, "replayed namespace log");
        }
        Ok(ns)
    }

    /// Applies a logged change (at open).
    fn apply(&mut self, change: Change) {
        for id in change.del {
            self.drop_node(id);
        }
        for node in change.put {
            self.drop_node(node.id);
            self.insert_node(node);
        }
        for name in change.del_pub {
            self.publications.remove(&name);
        }
        for p in change.put_pub {
            self.publications.insert(p.name.clone(), p);
        }
        self.next_id = self.next_id.max(change.next_id);
    }

    /// Forgets a node and its entry in its parent, keeping its children map
    /// (a node re-put by a rename keeps its folder's entries).
    fn drop_node(&mut self, id: FileId) {
        if let Some(old) = self.nodes.remove(&id) {
            if id != ROOT_ID {
                if let Some(siblings) = self.children.get_mut(&old.parent) {
                    if siblings.get(&old.name) == Some(&id) {
                        siblings.remove(&old.name);
                    }
                }
            }
        }
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
        self.dirty.insert(node.id);
        self.nodes.insert(node.id, node);
    }

    /// Queues every change made since the last call as one log record (a
    /// checkpoint instead when the log is due for one) and returns what to
    /// wait on. Call it before releasing the write lock.
    ///
    /// # Errors
    /// The log refuses changes after a failed write; a checkpoint failed.
    pub async fn commit(&mut self) -> DsResult<Durable> {
        let durable = self.queue()?;
        if self.log.wants_checkpoint() {
            self.checkpoint().await?;
        }
        Ok(durable)
    }

    /// Encodes and queues the pending change.
    fn queue(&mut self) -> DsResult<Durable> {
        if self.dirty.is_empty() && self.dirty_pubs.is_empty() {
            return Ok(Durable {
                log: self.log.clone(),
                seq: self.log.last_seq(),
            });
        }
        let mut change = Change {
            next_id: self.next_id,
            ..Change::default()
        };
        for id in std::mem::take(&mut self.dirty) {
            match self.nodes.get(&id) {
                Some(node) => change.put.push(node.clone()),
                None => change.del.push(id),
            }
        }
        for name in std::mem::take(&mut self.dirty_pubs) {
            match self.publications.get(&name) {
                Some(p) => change.put_pub.push(p.clone()),
                None => change.del_pub.push(name),
            }
        }
        let payload = serde_json::to_vec(&change).map_err(|e| {
            io_err(
                "encode namespace change",
                &self.path,
                std::io::Error::other(e),
            )
        })?;
        let seq = self
            .log
            .append(payload)
            .map_err(|e| io_err("log namespace change", &self.path, e))?;
        Ok(Durable {
            log: self.log.clone(),
            seq,
        })
    }

    /// The whole tree as a snapshot covering change `seq`.
    fn snapshot(&self, seq: u64) -> DsResult<Vec<u8>> {
        let mut nodes: Vec<Node> = self.nodes.values().cloned().collect();
        nodes.sort_by_key(|n| n.id);
        let persisted = Persisted {
            next_id: self.next_id,
            publications: self.publications.values().cloned().collect(),
            nodes,
            seq,
        };
        serde_json::to_vec(&persisted)
            .map_err(|e| io_err("encode namespace", &self.path, std::io::Error::other(e)))
    }

    /// Writes the whole tree to `namespace.json` and empties the log (a new
    /// epoch), off the async threads. Also what a clean stop calls, so
    /// changes never logged (WRITE's mtime updates) are kept.
    ///
    /// # Errors
    /// I/O errors; the previous snapshot and log still hold every change.
    pub async fn checkpoint(&mut self) -> DsResult<()> {
        self.queue()?.wait().await?;
        let seq = self.log.last_seq();
        let data = self.snapshot(seq)?;
        let (log, path) = (self.log.clone(), self.path.clone());
        tokio::task::spawn_blocking(move || log.checkpoint(&path, &data, seq))
            .await
            .map_err(|e| io_err("checkpoint", &self.path, std::io::Error::other(e)))?
            .map_err(|e| io_err("checkpoint", &self.path, e))
    }

    /// `checkpoint` for blocking contexts (open).
    fn checkpoint_blocking(&mut self) -> DsResult<()> {
        self.dirty.clear();
        self.dirty_pubs.clear();
        let seq = self.log.last_seq();
        let data = self.snapshot(seq)?;
        self.log
            .checkpoint(&self.path, &data, seq)
            .map_err(|e| io_err("checkpoint", &self.path, e))
    }

    /// Sets the log size past which `commit` checkpoints (default
    /// `nslog::CHECKPOINT_BYTES`): small values make checkpoints frequent,
    /// for crash tests.
    #[doc(hidden)]
    pub fn set_checkpoint_bytes(&self, bytes: u64) {
        self.log.set_checkpoint_bytes(bytes);
    }

    /// A node by id; [`DatastoreError::Stale`] if it was removed.
    pub fn get(&self, id: FileId) -> DsResult<&Node> {
        self.nodes.get(&id).ok_or(DatastoreError::Stale)
    }

    /// A node by id, for changing attributes; the change goes with the
    /// next `commit` (or checkpoint).
    pub fn get_mut(&mut self, id: FileId) -> DsResult<&mut Node> {
        let node = self.nodes.get_mut(&id).ok_or(DatastoreError::Stale)?;
        self.dirty.insert(id);
        Ok(node)
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
        self.dirty.insert(id);
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
                self.dirty.insert(child);
                self.children.remove(&child);
                removed.push(node);
            }
        }
        let node = self.nodes.remove(&id).ok_or(DatastoreError::Stale)?;
        self.dirty.insert(id);
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
            self.dirty.insert(dir);
        }
    }

    /// The published folders.
    pub fn publications(&self) -> impl Iterator<Item = &Publication> {
        self.publications.values()
    }

    /// Records a publication (its folder already added).
    pub fn add_publication(&mut self, publication: Publication) {
        self.dirty_pubs.insert(publication.name.clone());
        self.publications
            .insert(publication.name.clone(), publication);
    }

    /// Forgets a publication record.
    pub fn remove_publication(&mut self, name: &str) -> Option<Publication> {
        self.dirty_pubs.insert(name.to_string());
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

    #[tokio::test]
    async fn ids_survive_reopen_and_are_never_reused() {
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
        ns.commit().await.unwrap().wait().await.unwrap();
        drop(ns);
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

    /// The nodes of a tree as (id, parent, name, folder?), for comparisons.
    fn shape(ns: &Namespace) -> Vec<(FileId, FileId, String, bool)> {
        let mut out: Vec<_> = ns
            .subtree(ROOT_ID)
            .into_iter()
            .map(|id| {
                let n = ns.get(id).unwrap();
                (n.id, n.parent, n.name.clone(), n.is_dir())
            })
            .collect();
        out.sort();
        out
    }

    #[tokio::test]
    async fn logged_changes_replay_without_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("namespace.json");
        let mut ns = Namespace::open(path.clone()).unwrap();
        let d = ns.add(ROOT_ID, "d", Content::Dir, &template()).unwrap();
        let e = ns.add(ROOT_ID, "e", Content::Dir, &template()).unwrap();
        ns.commit().await.unwrap().wait().await.unwrap();
        let f = ns.add(d, "f", Content::New, &template()).unwrap();
        let g = ns.add(e, "g", Content::New, &template()).unwrap();
        ns.commit().await.unwrap().wait().await.unwrap();
        // A rename over an existing file, across folders: one change.
        assert_eq!(ns.rename(d, "f", e, "g").unwrap().map(|n| n.id), Some(g));
        ns.add_publication(Publication {
            name: "p".into(),
            point: "pt".into(),
            cache_dir: dir.path().join("c"),
            folder: d,
            cache_marked: true,
        });
        ns.commit().await.unwrap().wait().await.unwrap();
        let before = shape(&ns);
        drop(ns);
        let snapshot_len = std::fs::metadata(&path).unwrap().len();

        let again = Namespace::open(path.clone()).unwrap();
        assert_eq!(shape(&again), before);
        assert_eq!(again.lookup(e, "g").unwrap(), f);
        assert!(again.publication("p").is_some());
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            snapshot_len,
            "changes went to the log, not into a rewritten snapshot"
        );
    }

    #[tokio::test]
    async fn checkpoints_keep_everything_and_empty_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("namespace.json");
        let mut ns = Namespace::open(path.clone()).unwrap();
        ns.set_checkpoint_bytes(2048);
        let d = ns.add(ROOT_ID, "d", Content::Dir, &template()).unwrap();
        for i in 0..200 {
            ns.add(d, &format!("file-{i}"), Content::New, &template())
                .unwrap();
            ns.commit().await.unwrap().wait().await.unwrap();
            if i % 3 == 0 {
                ns.unlink(d, &format!("file-{i}")).unwrap();
            }
        }
        ns.commit().await.unwrap().wait().await.unwrap();
        let before = shape(&ns);
        drop(ns);
        let log = std::fs::read(dir.path().join("namespace.log")).unwrap();
        assert!(log.len() < 2 << 20, "the log was reset at checkpoints");
        let again = Namespace::open(path).unwrap();
        assert_eq!(shape(&again), before);
        assert_eq!(again.children(d).unwrap().len(), 133);
    }

    #[test]
    fn a_namespace_written_before_the_log_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("namespace.json");
        let old = r#"{"next_id":3,"publications":[],"nodes":[
            {"id":1,"parent":1,"name":"","content":{"type":"dir"},"publication":null,"mode":493,"uid":0,"gid":0,
             "atime":{"secs_since_epoch":1,"nanos_since_epoch":0},"mtime":{"secs_since_epoch":1,"nanos_since_epoch":0},"ctime":{"secs_since_epoch":1,"nanos_since_epoch":0}},
            {"id":2,"parent":1,"name":"web01","content":{"type":"dir"},"publication":null,"mode":493,"uid":0,"gid":0,
             "atime":{"secs_since_epoch":1,"nanos_since_epoch":0},"mtime":{"secs_since_epoch":1,"nanos_since_epoch":0},"ctime":{"secs_since_epoch":1,"nanos_since_epoch":0}}]}"#;
        std::fs::write(&path, old).unwrap();
        let ns = Namespace::open(path).unwrap();
        assert_eq!(ns.lookup(ROOT_ID, "web01").unwrap(), 2);
    }
}
