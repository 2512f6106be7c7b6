//! An in-memory `FileOps` for protocol tests only.
//!
//! It exists to drive the NFS layer with real clients; it is not the
//! datastore (which comes later, with the write cache and the repository).
//! Everything lives in one mutex-protected map; file ids are never reused
//! and survive a server restart as long as the same `MemFs` is reused,
//! which is what the restart tests rely on.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use revive::datastore::{
    Attr, CreateMode, DatastoreError, DirEntry, DirPage, DsResult, Export, ExportId, FileAt,
    FileId, FileKind, FileOps, FsStat, NameAt, ReadReply, SetAttr, SetTime, Stability, WriteReply,
};

/// Root directory of every export.
pub const ROOT: FileId = 1;

enum Content {
    File(Vec<u8>),
    Dir(BTreeMap<String, FileId>),
    Symlink(String),
}

struct Node {
    attr: Attr,
    parent: FileId,
    content: Content,
    verifier: Option<[u8; 8]>,
}

struct State {
    nodes: HashMap<FileId, Node>,
    next_id: FileId,
}

/// The in-memory test backend. Both exports share one tree (the backend
/// may do that; the protocol layer does not care).
pub struct MemFs {
    state: Mutex<State>,
    exports: Vec<Arc<Export>>,
}

fn new_attr(kind: FileKind, id: FileId, mode: u32) -> Attr {
    let now = SystemTime::now();
    Attr {
        kind,
        mode,
        nlink: if kind == FileKind::Directory { 2 } else { 1 },
        uid: 0,
        gid: 0,
        size: 0,
        used: 0,
        fileid: id,
        atime: now,
        mtime: now,
        ctime: now,
    }
}

impl MemFs {
    /// `/export` open to 127.0.0.1 and `/locked`, open only to a TEST-NET
    /// address (so every local client is refused).
    pub fn new() -> Arc<Self> {
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node {
                attr: new_attr(FileKind::Directory, ROOT, 0o755),
                parent: ROOT,
                content: Content::Dir(BTreeMap::new()),
                verifier: None,
            },
        );
        let export = |id, path: &str, allowed: IpAddr| {
            Arc::new(Export {
                id,
                instance: 0x5eed_0000 + u64::from(id),
                path: path.into(),
                root: ROOT,
                allowed_clients: vec![allowed],
            })
        };
        Arc::new(Self {
            state: Mutex::new(State {
                nodes,
                next_id: ROOT + 1,
            }),
            exports: vec![
                export(1, "/export", IpAddr::from([127, 0, 0, 1])),
                export(2, "/locked", IpAddr::from([192, 0, 2, 1])),
            ],
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("memfs lock poisoned")
    }

    /// Make a directory under `dir` (test setup).
    pub fn add_dir(&self, dir: FileId, name: &str) -> FileId {
        self.lock()
            .insert(
                dir,
                name,
                FileKind::Directory,
                0o755,
                Content::Dir(BTreeMap::new()),
            )
            .expect("add dir")
    }

    /// Make a file with `data` under `dir` (test setup).
    pub fn add_file(&self, dir: FileId, name: &str, data: Vec<u8>) -> FileId {
        let mut st = self.lock();
        let id = st
            .insert(
                dir,
                name,
                FileKind::Regular,
                0o644,
                Content::File(Vec::new()),
            )
            .expect("add file");
        let node = st.nodes.get_mut(&id).expect("new node");
        node.attr.size = data.len() as u64;
        node.attr.used = data.len() as u64;
        node.content = Content::File(data);
        id
    }

    /// Overwrite bytes of a root-level file behind the clients' back (to
    /// prove a verifier notices).
    pub fn poke(&self, name: &str, offset: usize, data: &[u8]) {
        let mut st = self.lock();
        let id = *st.dir(ROOT).expect("root").get(name).expect("file");
        if let Content::File(content) = &mut st.node_mut(id).expect("node").content {
            content[offset..offset + data.len()].copy_from_slice(data);
        }
    }

    /// Content of a file by path from the root (test checks).
    pub fn file_data(&self, path: &[&str]) -> Option<Vec<u8>> {
        let st = self.lock();
        let mut id = ROOT;
        for name in path {
            match &st.nodes.get(&id)?.content {
                Content::Dir(d) => id = *d.get(*name)?,
                _ => return None,
            }
        }
        match &st.nodes.get(&id)?.content {
            Content::File(data) => Some(data.clone()),
            _ => None,
        }
    }
}

impl State {
    fn node(&self, id: FileId) -> DsResult<&Node> {
        self.nodes.get(&id).ok_or(DatastoreError::Stale)
    }

    fn node_mut(&mut self, id: FileId) -> DsResult<&mut Node> {
        self.nodes.get_mut(&id).ok_or(DatastoreError::Stale)
    }

    fn dir(&self, id: FileId) -> DsResult<&BTreeMap<String, FileId>> {
        match &self.node(id)?.content {
            Content::Dir(d) => Ok(d),
            _ => Err(DatastoreError::NotDir),
        }
    }

    fn dir_mut(&mut self, id: FileId) -> DsResult<&mut BTreeMap<String, FileId>> {
        match &mut self.node_mut(id)?.content {
            Content::Dir(d) => Ok(d),
            _ => Err(DatastoreError::NotDir),
        }
    }

    fn insert(
        &mut self,
        dir: FileId,
        name: &str,
        kind: FileKind,
        mode: u32,
        content: Content,
    ) -> DsResult<FileId> {
        if name.contains('/') || name == ".." || name == "." || name.is_empty() {
            return Err(DatastoreError::InvalidName);
        }
        if self.dir(dir)?.contains_key(name) {
            return Err(DatastoreError::Exists);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.nodes.insert(
            id,
            Node {
                attr: new_attr(kind, id, mode),
                parent: dir,
                content,
                verifier: None,
            },
        );
        self.dir_mut(dir)?.insert(name.to_owned(), id);
        Ok(id)
    }

    fn apply(&mut self, id: FileId, set: &SetAttr) -> DsResult<Attr> {
        let node = self.node_mut(id)?;
        let now = SystemTime::now();
        if let Some(size) = set.size {
            match &mut node.content {
                Content::File(data) => data.resize(size as usize, 0),
                Content::Dir(_) => return Err(DatastoreError::IsDir),
                Content::Symlink(_) => return Err(DatastoreError::Invalid),
            }
            node.attr.size = size;
            node.attr.used = size;
            node.attr.mtime = now;
        }
        if let Some(m) = set.mode {
            node.attr.mode = m & 0o7777;
        }
        if let Some(u) = set.uid {
            node.attr.uid = u;
        }
        if let Some(g) = set.gid {
            node.attr.gid = g;
        }
        let time = |t: SetTime, old: SystemTime| match t {
            SetTime::DontChange => old,
            SetTime::ServerTime => now,
            SetTime::ClientTime(t) => t,
        };
        node.attr.atime = time(set.atime, node.attr.atime);
        node.attr.mtime = time(set.mtime, node.attr.mtime);
        node.attr.ctime = now;
        Ok(node.attr.clone())
    }

    fn unlink(&mut self, dir: FileId, name: &str, want_dir: bool) -> DsResult<()> {
        let id = *self.dir(dir)?.get(name).ok_or(DatastoreError::NotFound)?;
        match (&self.node(id)?.content, want_dir) {
            (Content::Dir(d), true) if !d.is_empty() => return Err(DatastoreError::NotEmpty),
            (Content::Dir(_), false) => return Err(DatastoreError::IsDir),
            (Content::File(_) | Content::Symlink(_), true) => return Err(DatastoreError::NotDir),
            _ => {}
        }
        self.dir_mut(dir)?.remove(name);
        self.nodes.remove(&id);
        Ok(())
    }
}

#[async_trait]
impl FileOps for MemFs {
    fn exports(&self) -> Vec<Arc<Export>> {
        self.exports.clone()
    }

    fn export(&self, id: ExportId) -> Option<Arc<Export>> {
        self.exports.iter().find(|e| e.id == id).cloned()
    }

    async fn getattr(&self, at: FileAt) -> DsResult<Attr> {
        Ok(self.lock().node(at.id)?.attr.clone())
    }

    async fn setattr(
        &self,
        at: FileAt,
        set: &SetAttr,
        guard: Option<SystemTime>,
    ) -> DsResult<Attr> {
        let id = at.id;
        let mut st = self.lock();
        if let Some(g) = guard {
            if st.node(id)?.attr.ctime != g {
                return Err(DatastoreError::NotSync);
            }
        }
        st.apply(id, set)
    }

    async fn lookup(&self, at: &NameAt) -> DsResult<Attr> {
        let (dir, name) = (at.dir.id, at.name.as_str());
        let st = self.lock();
        let id = if name == ".." {
            st.node(dir)?.parent
        } else {
            *st.dir(dir)?.get(name).ok_or(DatastoreError::NotFound)?
        };
        Ok(st.node(id)?.attr.clone())
    }

    async fn read(&self, at: FileAt, offset: u64, count: u32) -> DsResult<ReadReply> {
        let st = self.lock();
        let node = st.node(at.id)?;
        let Content::File(data) = &node.content else {
            return Err(DatastoreError::IsDir);
        };
        let start = (offset as usize).min(data.len());
        let end = start.saturating_add(count as usize).min(data.len());
        Ok(ReadReply {
            data: Bytes::copy_from_slice(&data[start..end]),
            eof: end == data.len(),
            attr: Some(node.attr.clone()),
        })
    }

    async fn write(
        &self,
        at: FileAt,
        offset: u64,
        data: Bytes,
        _stability: Stability,
    ) -> DsResult<WriteReply> {
        let mut st = self.lock();
        let node = st.node_mut(at.id)?;
        let Content::File(content) = &mut node.content else {
            return Err(DatastoreError::IsDir);
        };
        let start = offset as usize;
        let end = start + data.len();
        if content.len() < end {
            content.resize(end, 0);
        }
        content[start..end].copy_from_slice(&data);
        node.attr.size = content.len() as u64;
        node.attr.used = node.attr.size;
        node.attr.mtime = SystemTime::now();
        Ok(WriteReply {
            count: data.len() as u32,
            // In memory there is nothing more stable to reach.
            committed: Stability::FileSync,
            attr: Some(node.attr.clone()),
        })
    }

    async fn commit(&self, at: FileAt) -> DsResult<()> {
        self.lock().node(at.id).map(drop)
    }

    async fn create(&self, at: &NameAt, mode: CreateMode, attrs: &SetAttr) -> DsResult<Attr> {
        let (dir, name) = (at.dir.id, at.name.as_str());
        let mut st = self.lock();
        if let Some(&existing) = st.dir(dir)?.get(name) {
            return match mode {
                CreateMode::Guarded => Err(DatastoreError::Exists),
                CreateMode::Exclusive(v) if st.node(existing)?.verifier == Some(v) => {
                    Ok(st.node(existing)?.attr.clone())
                }
                CreateMode::Exclusive(_) => Err(DatastoreError::Exists),
                CreateMode::Unchecked => st.apply(
                    existing,
                    &SetAttr {
                        size: attrs.size,
                        ..SetAttr::default()
                    },
                ),
            };
        }
        let id = st.insert(
            dir,
            name,
            FileKind::Regular,
            0o644,
            Content::File(Vec::new()),
        )?;
        if let CreateMode::Exclusive(v) = mode {
            st.node_mut(id)?.verifier = Some(v);
        }
        st.apply(id, attrs)
    }

    async fn mkdir(&self, at: &NameAt, attrs: &SetAttr) -> DsResult<Attr> {
        let (dir, name) = (at.dir.id, at.name.as_str());
        let mut st = self.lock();
        let id = st.insert(
            dir,
            name,
            FileKind::Directory,
            0o755,
            Content::Dir(BTreeMap::new()),
        )?;
        st.apply(id, attrs)
    }

    async fn remove(&self, at: &NameAt) -> DsResult<()> {
        self.lock().unlink(at.dir.id, &at.name, false)
    }

    async fn rmdir(&self, at: &NameAt) -> DsResult<()> {
        self.lock().unlink(at.dir.id, &at.name, true)
    }

    async fn rename(&self, from: &NameAt, to: &NameAt) -> DsResult<()> {
        let (from_dir, from_name) = (from.dir.id, from.name.as_str());
        let (to_dir, to_name) = (to.dir.id, to.name.as_str());
        let mut st = self.lock();
        let id = *st
            .dir(from_dir)?
            .get(from_name)
            .ok_or(DatastoreError::NotFound)?;
        st.dir(to_dir)?;
        if let Some(&old) = st.dir(to_dir)?.get(to_name) {
            if old == id {
                return Ok(());
            }
            let is_dir = matches!(st.node(old)?.content, Content::Dir(_));
            st.unlink(to_dir, to_name, is_dir)?;
        }
        st.dir_mut(from_dir)?.remove(from_name);
        st.dir_mut(to_dir)?.insert(to_name.to_owned(), id);
        st.node_mut(id)?.parent = to_dir;
        Ok(())
    }

    async fn readdir(&self, at: FileAt, cookie: u64, max_entries: usize) -> DsResult<DirPage> {
        let dir = at.id;
        let st = self.lock();
        // Cookie = file id: stable while the directory changes.
        let mut children: Vec<(FileId, &String)> = st
            .dir(dir)?
            .iter()
            .map(|(n, id)| (*id, n))
            .filter(|(id, _)| *id > cookie)
            .collect();
        children.sort();
        let eof = children.len() <= max_entries;
        let entries = children
            .into_iter()
            .take(max_entries)
            .map(|(id, name)| {
                Ok(DirEntry {
                    name: name.clone(),
                    cookie: id,
                    attr: st.node(id)?.attr.clone(),
                })
            })
            .collect::<DsResult<Vec<_>>>()?;
        Ok(DirPage { entries, eof })
    }

    async fn fsstat(&self, _export: ExportId) -> DsResult<FsStat> {
        Ok(FsStat {
            total_bytes: 1 << 40,
            free_bytes: 1 << 39,
            avail_bytes: 1 << 39,
            total_files: 1 << 20,
            free_files: 1 << 19,
            avail_files: 1 << 19,
        })
    }

    async fn readlink(&self, at: FileAt) -> DsResult<String> {
        match &self.lock().node(at.id)?.content {
            Content::Symlink(t) => Ok(t.clone()),
            _ => Err(DatastoreError::Invalid),
        }
    }

    async fn symlink(&self, at: &NameAt, target: &str, _attrs: &SetAttr) -> DsResult<Attr> {
        let (dir, name) = (at.dir.id, at.name.as_str());
        let mut st = self.lock();
        let id = st.insert(
            dir,
            name,
            FileKind::Symlink,
            0o777,
            Content::Symlink(target.to_owned()),
        )?;
        let node = st.node_mut(id)?;
        node.attr.size = target.len() as u64;
        Ok(node.attr.clone())
    }
}
