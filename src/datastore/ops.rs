//! [`FileOps`] on the datastore: the namespace operations (attributes,
//! lookup, create, remove, rename, listing, space figures) here, the data
//! operations (read, write, commit) here over `io.rs`'s file state, extents
//! and punch in `extents.rs`. Every change is saved
//! before it returns.

use std::sync::atomic::Ordering;
use std::time::SystemTime;

use super::io::{
    cache_err, cache_key, check_regular, repo_err, unix_nanos, Base, MTIME_GRANULARITY,
};
use super::namespace::{Content, Node, ROOT_ID};
use std::sync::Arc;

use crate::cache::NoBase;
use async_trait::async_trait;
use bytes::Bytes;

use super::extents::FileExtent;
use super::surface::{FileAt, FileOps, NameAt};
use super::{
    Attr, CreateMode, Datastore, DatastoreError, DirEntry, DirPage, DsResult, Export, ExportId,
    ExportState,
};
use super::{
    FileKind, FileState, FsStat, ReadReply, SetAttr, SetTime, Stability, WriteReply, MAX_FILE_SIZE,
};

/// Cookie of the `.` entry of a listing.
pub const DOT_COOKIE: u64 = 1;
/// Cookie of the `..` entry; an entry's cookie is its file id plus this.
pub const DOTDOT_COOKIE: u64 = 2;

/// Refuses a size beyond [`MAX_FILE_SIZE`] (NFS3ERR_FBIG).
fn check_size(set: &SetAttr) -> DsResult<()> {
    match set.size {
        Some(size) if size > MAX_FILE_SIZE => Err(DatastoreError::TooBig),
        _ => Ok(()),
    }
}

fn resolve_time(t: SetTime, current: SystemTime) -> SystemTime {
    match t {
        SetTime::DontChange => current,
        SetTime::ServerTime => SystemTime::now(),
        SetTime::ClientTime(at) => at,
    }
}

/// A node template for something a client creates.
fn new_node(attrs: &SetAttr, default_mode: u32) -> Node {
    let base = Node::template(Content::New, attrs.mode.unwrap_or(default_mode), None);
    Node {
        uid: attrs.uid.unwrap_or(0),
        gid: attrs.gid.unwrap_or(0),
        atime: resolve_time(attrs.atime, base.atime),
        mtime: resolve_time(attrs.mtime, base.mtime),
        ..base
    }
}

impl Datastore {
    pub(super) fn attr_of(&self, node: &Node, st: Option<&FileState>) -> Attr {
        let (kind, size, used, nlink) = match (&node.content, st) {
            (Content::Dir, _) => (FileKind::Directory, 4096, 4096, 2),
            (_, Some(st)) => (FileKind::Regular, st.size(node), st.used(node), 1),
            (Content::Presented { base_size, .. }, None) => {
                (FileKind::Regular, *base_size, *base_size, 1)
            }
            (Content::New, None) => (FileKind::Regular, 0, 0, 1),
            (Content::Symlink { target }, _) => {
                let len = target.len() as u64;
                (FileKind::Symlink, len, len, 1)
            }
        };
        Attr {
            kind,
            mode: node.mode,
            nlink,
            uid: node.uid,
            gid: node.gid,
            size,
            used,
            fileid: node.id,
            atime: node.atime,
            mtime: node.mtime,
            ctime: node.ctime,
        }
    }

    async fn attr_by_node(&self, export: &ExportState, node: &Node) -> DsResult<Attr> {
        if !node.is_file() {
            return Ok(self.attr_of(node, None));
        }
        let st = self.file_state(export, node).await?;
        self.ensure_usage(&st).await;
        Ok(self.attr_of(node, Some(&st)))
    }

    /// Stamps a written file's mtime and ctime, at most once per
    /// `MTIME_GRANULARITY` (see there).
    async fn touch_mtime(&self, state: &ExportState, st: &FileState, id: super::FileId) {
        let now = SystemTime::now();
        let (now_ns, last) = (unix_nanos(now), st.mtime_ns.load(Ordering::Relaxed));
        if now_ns.saturating_sub(last) >= MTIME_GRANULARITY.as_nanos() as u64 {
            st.mtime_ns.store(now_ns, Ordering::Relaxed);
            if let Ok(n) = state.ns.write().await.get_mut(id) {
                n.mtime = now;
                n.ctime = now;
            }
        }
    }

    /// Frees the write cache of a removed file.
    async fn drop_file(&self, state: &ExportState, node: &Node) -> DsResult<()> {
        state.files.remove(&node.id);
        if !node.is_file() {
            return Ok(());
        }
        let session = self.session(state, &node.publication).await?;
        session
            .remove(&cache_key(node.id))
            .await
            .map_err(cache_err)?;
        Ok(())
    }
}

#[async_trait]
impl FileOps for Datastore {
    fn exports(&self) -> Vec<Arc<Export>> {
        let mut v: Vec<_> = self.exports.values().map(|e| e.info.clone()).collect();
        v.sort_by_key(|e| e.id);
        v
    }

    fn export(&self, id: ExportId) -> Option<Arc<Export>> {
        self.exports.get(&id).map(|e| e.info.clone())
    }

    async fn getattr(&self, at: FileAt) -> DsResult<Attr> {
        let state = self.state(at.export)?.clone();
        let node = state.ns.read().await.get(at.id)?.clone();
        self.attr_by_node(&state, &node).await
    }

    async fn lookup(&self, at: &NameAt) -> DsResult<Attr> {
        let state = self.state(at.dir.export)?.clone();
        let node = {
            let ns = state.ns.read().await;
            let id = ns.lookup(at.dir.id, &at.name)?;
            ns.get(id)?.clone()
        };
        self.attr_by_node(&state, &node).await
    }

    async fn setattr(
        &self,
        at: FileAt,
        set: &SetAttr,
        guard: Option<SystemTime>,
    ) -> DsResult<Attr> {
        let (export, id) = (at.export, at.id);
        let state = self.state(export)?.clone();
        let node = state.ns.read().await.get(id)?.clone();
        // Every check comes before the first change: an error reply leaves
        // the file as it was.
        if guard.is_some_and(|g| g != node.ctime) {
            return Err(DatastoreError::NotSync);
        }
        check_size(set)?;
        if set.size.is_some() {
            check_regular(&node)?;
        }
        if let Some(size) = set.size {
            let st = self.file_state(&state, &node).await?;
            if size != st.size(&node) {
                let cache = self.ensure_cache(&state, &node, &st).await?;
                cache.set_len(size).await.map_err(cache_err)?;
            }
        }
        let node = {
            let mut ns = state.ns.write().await;
            let n = ns.get_mut(id)?;
            let now = SystemTime::now();
            if let Some(mode) = set.mode {
                n.mode = mode & 0o7777;
            }
            if let Some(uid) = set.uid {
                n.uid = uid;
            }
            if let Some(gid) = set.gid {
                n.gid = gid;
            }
            n.atime = resolve_time(set.atime, n.atime);
            n.mtime = resolve_time(set.mtime, if set.size.is_some() { now } else { n.mtime });
            // The next WRITE must stamp its own time over this one.
            if let Some(st) = state.files.get(&id) {
                st.mtime_ns.store(0, std::sync::atomic::Ordering::Relaxed);
            }
            n.ctime = now;
            let n = n.clone();
            let durable = ns.commit().await?;
            drop(ns);
            durable.wait().await?;
            n
        };
        self.attr_by_node(&state, &node).await
    }

    /// The new file lives wholly in the write cache.
    async fn create(&self, at: &NameAt, mode: CreateMode, attrs: &SetAttr) -> DsResult<Attr> {
        let (export, dir, name) = (at.dir.export, at.dir.id, at.name.as_str());
        let state = self.state(export)?.clone();
        check_size(attrs)?;
        let existing = {
            let ns = state.ns.read().await;
            match ns.lookup(dir, name) {
                Ok(id) => Some(ns.get(id)?.clone()),
                Err(DatastoreError::NotFound) => None,
                Err(e) => return Err(e),
            }
        };
        if let Some(node) = existing {
            return match mode {
                CreateMode::Unchecked if node.is_file() => {
                    let size_only = SetAttr {
                        size: attrs.size,
                        ..SetAttr::default()
                    };
                    if size_only.size.is_some() {
                        self.setattr(FileAt::new(export, node.id), &size_only, None)
                            .await
                    } else {
                        self.attr_by_node(&state, &node).await
                    }
                }
                CreateMode::Exclusive(v) if node.verifier == Some(v) => {
                    self.attr_by_node(&state, &node).await
                }
                _ => Err(DatastoreError::Exists),
            };
        }
        // Open the write cache folder before taking the namespace write lock:
        // opening it reads the namespace, and tokio's RwLock is not reentrant
        // (a CREATE as first call after a start hung the export). The new file
        // belongs to its folder's publication, which never changes (renames
        // across publications are refused).
        // A new file gets its write cache at its first write: until then it
        // is empty, which is what a name without a cache reads as, so a crash
        // between the two loses nothing acknowledged.
        let publication = state.ns.read().await.get(dir)?.publication.clone();
        self.session(&state, &publication).await?;
        let node = {
            let mut ns = state.ns.write().await;
            let mut template = new_node(attrs, 0o644);
            if let CreateMode::Exclusive(v) = mode {
                template.verifier = Some(v);
            }
            let id = ns.add(dir, name, Content::New, &template)?;
            let node = ns.get(id)?.clone();
            let durable = ns.commit().await?;
            drop(ns);
            durable.wait().await?;
            node
        };
        if let Some(size) = attrs.size.filter(|s| *s > 0) {
            let set = SetAttr {
                size: Some(size),
                ..SetAttr::default()
            };
            return self.setattr(FileAt::new(export, node.id), &set, None).await;
        }
        self.attr_by_node(&state, &node).await
    }

    async fn mkdir(&self, at: &NameAt, attrs: &SetAttr) -> DsResult<Attr> {
        let state = self.state(at.dir.export)?.clone();
        let mut ns = state.ns.write().await;
        let id = ns.add(at.dir.id, &at.name, Content::Dir, &new_node(attrs, 0o755))?;
        let attr = self.attr_of(ns.get(id)?, None);
        let durable = ns.commit().await?;
        drop(ns);
        durable.wait().await?;
        Ok(attr)
    }

    async fn readlink(&self, at: FileAt) -> DsResult<String> {
        let state = self.state(at.export)?;
        let ns = state.ns.read().await;
        match &ns.get(at.id)?.content {
            Content::Symlink { target } => Ok(target.clone()),
            _ => Err(DatastoreError::Invalid),
        }
    }

    /// A link is only a name and its target: it has no write cache.
    async fn symlink(&self, at: &NameAt, target: &str, attrs: &SetAttr) -> DsResult<Attr> {
        if target.is_empty() {
            return Err(DatastoreError::Invalid);
        }
        let state = self.state(at.dir.export)?.clone();
        let mut ns = state.ns.write().await;
        let content = Content::Symlink {
            target: target.to_string(),
        };
        let id = ns.add(at.dir.id, &at.name, content, &new_node(attrs, 0o777))?;
        let attr = self.attr_of(ns.get(id)?, None);
        let durable = ns.commit().await?;
        drop(ns);
        durable.wait().await?;
        Ok(attr)
    }

    /// A presented file is hidden and its cache freed.
    async fn remove(&self, at: &NameAt) -> DsResult<()> {
        let (dir, name) = (at.dir.id, at.name.as_str());
        let state = self.state(at.dir.export)?.clone();
        // The write cache folder first (outside the write lock, as CREATE):
        // while it is missing the REMOVE is refused (JUKEBOX) before the
        // name goes, not after, so the retry finds the file and frees its
        // cache once the folder is back.
        let publication = state.ns.read().await.get(dir)?.publication.clone();
        self.session(&state, &publication).await?;
        let node = {
            let mut ns = state.ns.write().await;
            let id = ns.lookup(dir, name)?;
            if ns.get(id)?.is_dir() {
                return Err(DatastoreError::IsDir);
            }
            let node = ns.unlink(dir, name)?;
            let durable = ns.commit().await?;
            drop(ns);
            durable.wait().await?;
            node
        };
        self.drop_file(&state, &node).await
    }

    /// Publication folders go only by unpublishing.
    async fn rmdir(&self, at: &NameAt) -> DsResult<()> {
        let (dir, name) = (at.dir.id, at.name.as_str());
        let state = self.state(at.dir.export)?.clone();
        let mut ns = state.ns.write().await;
        let id = ns.lookup(dir, name)?;
        if !ns.get(id)?.is_dir() {
            return Err(DatastoreError::NotDir);
        }
        if dir == ROOT_ID && ns.publication(name).is_some() {
            return Err(DatastoreError::Access);
        }
        ns.unlink(dir, name)?;
        let durable = ns.commit().await?;
        drop(ns);
        durable.wait().await
    }

    /// Files stay within their publication: their cache lives in its folder.
    async fn rename(&self, from_at: &NameAt, to_at: &NameAt) -> DsResult<()> {
        if from_at.dir.export != to_at.dir.export {
            return Err(DatastoreError::Invalid);
        }
        let (from_dir, from) = (from_at.dir.id, from_at.name.as_str());
        let (to_dir, to) = (to_at.dir.id, to_at.name.as_str());
        let state = self.state(from_at.dir.export)?.clone();
        let replaced = {
            let mut ns = state.ns.write().await;
            let id = ns.lookup(from_dir, from)?;
            let owner = ns.get(id)?.publication.clone();
            let target_owner = ns.get(to_dir)?.publication.clone();
            if from_dir == ROOT_ID && ns.publication(from).is_some() {
                return Err(DatastoreError::Access);
            }
            if owner != target_owner {
                return Err(DatastoreError::NotSupported);
            }
            let replaced = ns.rename(from_dir, from, to_dir, to)?;
            let durable = ns.commit().await?;
            drop(ns);
            durable.wait().await?;
            replaced
        };
        if let Some(node) = replaced {
            self.drop_file(&state, &node).await?;
        }
        Ok(())
    }

    /// `.` and `..` first, as Linux's and other NFS servers list them,
    /// then the entries in file id order. Cookies: [`DOT_COOKIE`] after
    /// `.`, [`DOTDOT_COOKIE`] after `..`, and the file id plus
    /// [`DOTDOT_COOKIE`] after an entry; ids are never reused, so a listing
    /// resumes correctly while the folder changes.
    async fn readdir(&self, at: FileAt, cookie: u64, max_entries: usize) -> DsResult<DirPage> {
        let dir = at.id;
        let state = self.state(at.export)?.clone();
        let (dots, nodes) = {
            let ns = state.ns.read().await;
            let nodes: Vec<Node> = ns
                .children(dir)?
                .into_iter()
                .filter(|n| n.id.saturating_add(DOTDOT_COOKIE) > cookie)
                .cloned()
                .collect();
            let this = ns.get(dir)?;
            let mut dots = Vec::new();
            if cookie < DOT_COOKIE {
                dots.push((".", this.clone(), DOT_COOKIE));
            }
            if cookie < DOTDOT_COOKIE {
                dots.push(("..", ns.get(this.parent)?.clone(), DOTDOT_COOKIE));
            }
            (dots, nodes)
        };
        let eof = dots.len() + nodes.len() <= max_entries;
        let mut entries = Vec::with_capacity((dots.len() + nodes.len()).min(max_entries));
        for (name, node, cookie) in dots.into_iter().take(max_entries) {
            entries.push(DirEntry {
                name: name.to_string(),
                cookie,
                attr: self.attr_of(&node, None),
            });
        }
        for node in nodes.into_iter().take(max_entries - entries.len()) {
            entries.push(DirEntry {
                name: node.name.clone(),
                cookie: node.id + DOTDOT_COOKIE,
                attr: self.attr_by_node(&state, &node).await?,
            });
        }
        Ok(DirPage { entries, eof })
    }

    async fn read(&self, at: FileAt, offset: u64, count: u32) -> DsResult<ReadReply> {
        let (st, size) = self.read_state(at.export, at.id).await?;
        if offset >= size {
            return Ok(ReadReply {
                data: Bytes::new(),
                eof: true,
                attr: None,
            });
        }
        let len = (count as u64).min(size - offset);
        if let Some(base) = &st.base {
            self.readahead(&st, base, offset, len).await;
        }
        let data = match (st.cache.get(), &st.base) {
            (Some(cache), Some(base)) => cache
                .read_overlay(offset, len, &Base(base))
                .await
                .map_err(cache_err)?,
            (Some(cache), None) => cache
                .read_overlay(offset, len, &NoBase)
                .await
                .map_err(cache_err)?,
            (None, Some(base)) => base
                .read_at(offset, len as usize)
                .await
                .map_err(|e| repo_err(&e))?,
            (None, None) => Bytes::from(vec![0u8; len as usize]),
        };
        Ok(ReadReply {
            eof: offset + data.len() as u64 >= size,
            data,
            attr: None,
        })
    }

    /// Into the write cache, durable as asked.
    async fn write(
        &self,
        at: FileAt,
        offset: u64,
        data: Bytes,
        stability: Stability,
    ) -> DsResult<WriteReply> {
        // Beyond the largest file clients are told of: refused before
        // anything is written.
        match offset.checked_add(data.len() as u64) {
            Some(end) if end <= MAX_FILE_SIZE => {}
            _ => return Err(DatastoreError::TooBig),
        }
        let (state, node, st) = self.regular(at.export, at.id).await?;
        let count = data.len() as u32;
        let cache = self.ensure_cache(&state, &node, &st).await?;
        match &st.base {
            Some(base) => cache.write(offset, data, stability, &Base(base)).await,
            None => cache.write(offset, data, stability, &NoBase).await,
        }
        .map_err(cache_err)?;
        self.touch_mtime(&state, &st, at.id).await;
        Ok(WriteReply {
            count,
            committed: stability,
            attr: None,
        })
    }

    /// One write cache call for the lot (one blocking hand-off), one
    /// mtime update.
    async fn write_many(
        &self,
        at: FileAt,
        mut writes: Vec<(u64, Bytes)>,
        stability: Stability,
    ) -> Result<(), (usize, DatastoreError)> {
        // Beyond the largest file clients are told of: that write and the
        // ones after it are refused, the ones before it are done.
        let too_big = writes.iter().position(|(offset, data)| {
            offset
                .checked_add(data.len() as u64)
                .is_none_or(|end| end > MAX_FILE_SIZE)
        });
        if let Some(n) = too_big {
            writes.truncate(n);
        }
        let count = writes.len();
        let (state, node, st) = self.regular(at.export, at.id).await.map_err(|e| (0, e))?;
        let cache = self
            .ensure_cache(&state, &node, &st)
            .await
            .map_err(|e| (0, e))?;
        let done = match &st.base {
            Some(base) => cache.write_many(writes, stability, &Base(base)).await,
            None => cache.write_many(writes, stability, &NoBase).await,
        };
        let failed = match done {
            Ok(()) => too_big.map(|n| (n, DatastoreError::TooBig)),
            Err((n, e)) => Some((n, cache_err(e))),
        };
        if failed.as_ref().is_none_or(|(n, _)| *n > 0) && count > 0 {
            self.touch_mtime(&state, &st, at.id).await;
        }
        match failed {
            Some(f) => Err(f),
            None => Ok(()),
        }
    }

    async fn commit(&self, at: FileAt) -> DsResult<()> {
        let (_, _, st) = self.regular(at.export, at.id).await?;
        if let Some(cache) = st.cache.get() {
            cache.commit().await.map_err(cache_err)?;
        }
        Ok(())
    }

    async fn extents(&self, at: FileAt, offset: u64, len: u64) -> DsResult<Vec<FileExtent>> {
        self.file_extents(at, offset, len).await
    }

    async fn punch(&self, at: FileAt, offset: u64, len: u64) -> DsResult<()> {
        self.punch_range(at, offset, len).await
    }

    /// The real size and free space of where this export's writes
    /// land: its publications' write cache locations (each may be on its
    /// own file system), else the default cache location. With several
    /// file systems, the one with the least space available, where
    /// clients run out first.
    async fn fsstat(&self, export: ExportId) -> DsResult<FsStat> {
        let state = self.state(export)?.clone();
        let (files, mut dirs) = {
            let ns = state.ns.read().await;
            let dirs: Vec<_> = ns.publications().map(|p| p.cache_dir.clone()).collect();
            (ns.len() as u64, dirs)
        };
        if dirs.is_empty() {
            dirs.push(self.config.cache_root.clone());
        }
        // statvfs can block (a cache on a hung mount): off the async threads.
        let st = tokio::task::spawn_blocking(move || {
            let mut least: Option<FsStat> = None;
            let mut first_err = None;
            for dir in dirs {
                // A folder not made yet is on its nearest existing ancestor.
                match crate::fsutil::space_of_nearest(&dir) {
                    Ok(st) if least.is_none_or(|l| st.avail_bytes < l.avail_bytes) => {
                        least = Some(st)
                    }
                    Ok(_) => {}
                    Err(e) => first_err = first_err.or(Some(DatastoreError::Io(e))),
                }
            }
            least.ok_or_else(|| first_err.unwrap_or(DatastoreError::Invalid))
        })
        .await
        .map_err(|e| DatastoreError::Io(std::io::Error::other(e)))??;
        Ok(FsStat {
            total_files: st.total_files.max(files),
            ..st
        })
    }
}
