//! Namespace operations: attributes, lookup, create, remove, rename, listing
//! and space figures. Every change is saved before it returns.

use std::time::SystemTime;

use super::io::{cache_err, cache_key};
use super::namespace::{Content, Node, ROOT_ID};
use super::{
    Attr, CreateMode, Datastore, DatastoreError, DirEntry, DirPage, DsResult, ExportId, ExportState,
};
use super::{FileId, FileKind, FileState, FsStat, SetAttr, SetTime, MAX_FILE_SIZE};

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
    fn attr_of(&self, node: &Node, st: Option<&FileState>) -> Attr {
        let (kind, size, used, nlink) = match (&node.content, st) {
            (Content::Dir, _) => (FileKind::Directory, 4096, 4096, 2),
            (_, Some(st)) => (FileKind::Regular, st.size(node), st.used(node), 1),
            (Content::Presented { base_size, .. }, None) => {
                (FileKind::Regular, *base_size, *base_size, 1)
            }
            (Content::New, None) => (FileKind::Regular, 0, 0, 1),
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
        if node.is_dir() {
            return Ok(self.attr_of(node, None));
        }
        let st = self.file_state(export, node).await?;
        self.ensure_usage(&st).await;
        Ok(self.attr_of(node, Some(&st)))
    }

    /// GETATTR.
    pub async fn getattr(&self, export: ExportId, id: FileId) -> DsResult<Attr> {
        let state = self.state(export)?.clone();
        let node = state.ns.read().await.get(id)?.clone();
        self.attr_by_node(&state, &node).await
    }

    /// LOOKUP of `name` in `dir` (`..` never leaves the export).
    pub async fn lookup(&self, export: ExportId, dir: FileId, name: &str) -> DsResult<Attr> {
        let state = self.state(export)?.clone();
        let node = {
            let ns = state.ns.read().await;
            let id = ns.lookup(dir, name)?;
            ns.get(id)?.clone()
        };
        self.attr_by_node(&state, &node).await
    }

    /// SETATTR: size (truncate or sparse extend), mode, owner, times.
    pub async fn setattr(
        &self,
        export: ExportId,
        id: FileId,
        set: &SetAttr,
        guard: Option<SystemTime>,
    ) -> DsResult<Attr> {
        let state = self.state(export)?.clone();
        let node = state.ns.read().await.get(id)?.clone();
        // Every check comes before the first change: an error reply leaves
        // the file as it was.
        if guard.is_some_and(|g| g != node.ctime) {
            return Err(DatastoreError::NotSync);
        }
        check_size(set)?;
        if set.size.is_some() && node.is_dir() {
            return Err(DatastoreError::IsDir);
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
            ns.save()?;
            n
        };
        self.attr_by_node(&state, &node).await
    }

    /// CREATE a regular file; the file lives wholly in the write cache.
    pub async fn create(
        &self,
        export: ExportId,
        dir: FileId,
        name: &str,
        mode: CreateMode,
        attrs: &SetAttr,
    ) -> DsResult<Attr> {
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
                CreateMode::Unchecked if !node.is_dir() => {
                    let size_only = SetAttr {
                        size: attrs.size,
                        ..SetAttr::default()
                    };
                    if size_only.size.is_some() {
                        self.setattr(export, node.id, &size_only, None).await
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
        let publication = state.ns.read().await.get(dir)?.publication.clone();
        let session = self.session(&state, &publication).await?;
        let node = {
            let mut ns = state.ns.write().await;
            let mut template = new_node(attrs, 0o644);
            if let CreateMode::Exclusive(v) = mode {
                template.verifier = Some(v);
            }
            let id = ns.add(dir, name, Content::New, &template)?;
            let node = ns.get(id)?.clone();
            // The cache file exists before the name is durable: a crash in
            // between leaves an orphan cache, never a name without data.
            session
                .get_or_create(
                    &cache_key(id),
                    0,
                    crate::cache::DEFAULT_BLOCK_SIZE,
                    crate::cache::Origin::New,
                )
                .await
                .map_err(cache_err)?;
            ns.save()?;
            node
        };
        if let Some(size) = attrs.size.filter(|s| *s > 0) {
            let set = SetAttr {
                size: Some(size),
                ..SetAttr::default()
            };
            return self.setattr(export, node.id, &set, None).await;
        }
        self.attr_by_node(&state, &node).await
    }

    /// MKDIR.
    pub async fn mkdir(
        &self,
        export: ExportId,
        dir: FileId,
        name: &str,
        attrs: &SetAttr,
    ) -> DsResult<Attr> {
        let state = self.state(export)?.clone();
        let mut ns = state.ns.write().await;
        let id = ns.add(dir, name, Content::Dir, &new_node(attrs, 0o755))?;
        ns.save()?;
        Ok(self.attr_of(ns.get(id)?, None))
    }

    /// REMOVE a file: a presented file is hidden and its cache freed.
    pub async fn remove(&self, export: ExportId, dir: FileId, name: &str) -> DsResult<()> {
        let state = self.state(export)?.clone();
        let node = {
            let mut ns = state.ns.write().await;
            let id = ns.lookup(dir, name)?;
            if ns.get(id)?.is_dir() {
                return Err(DatastoreError::IsDir);
            }
            let node = ns.unlink(dir, name)?;
            ns.save()?;
            node
        };
        self.drop_file(&state, &node).await
    }

    /// Frees the write cache of a removed file.
    async fn drop_file(&self, state: &ExportState, node: &Node) -> DsResult<()> {
        state.files.remove(&node.id);
        if node.is_dir() {
            return Ok(());
        }
        let session = self.session(state, &node.publication).await?;
        session
            .remove(&cache_key(node.id))
            .await
            .map_err(cache_err)?;
        Ok(())
    }

    /// RMDIR of an empty folder; publication folders go only by unpublishing.
    pub async fn rmdir(&self, export: ExportId, dir: FileId, name: &str) -> DsResult<()> {
        let state = self.state(export)?.clone();
        let mut ns = state.ns.write().await;
        let id = ns.lookup(dir, name)?;
        if !ns.get(id)?.is_dir() {
            return Err(DatastoreError::NotDir);
        }
        if dir == ROOT_ID && ns.publication(name).is_some() {
            return Err(DatastoreError::Access);
        }
        ns.unlink(dir, name)?;
        ns.save()
    }

    /// RENAME, replacing a target as POSIX does. Files stay within their
    /// publication: their cache lives in its folder.
    pub async fn rename(
        &self,
        export: ExportId,
        from_dir: FileId,
        from: &str,
        to_dir: FileId,
        to: &str,
    ) -> DsResult<()> {
        let state = self.state(export)?.clone();
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
            ns.save()?;
            replaced
        };
        if let Some(node) = replaced {
            self.drop_file(&state, &node).await?;
        }
        Ok(())
    }

    /// READDIR(PLUS): `.` and `..` first, as Linux's and other NFS servers
    /// list them, then the entries in file id order. Cookies: [`DOT_COOKIE`]
    /// after `.`, [`DOTDOT_COOKIE`] after `..`, and the file id plus
    /// [`DOTDOT_COOKIE`] after an entry; ids are never reused, so a listing
    /// resumes correctly while the folder changes.
    pub async fn readdir(
        &self,
        export: ExportId,
        dir: FileId,
        cookie: u64,
        max_entries: usize,
    ) -> DsResult<DirPage> {
        let state = self.state(export)?.clone();
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

    /// FSSTAT: the real size and free space of where this export's writes
    /// land: its publications' write cache locations (each may be on its
    /// own file system), else the default cache location. With several
    /// file systems, the one with the least space available, where
    /// clients run out first.
    pub async fn fsstat(&self, export: ExportId) -> DsResult<FsStat> {
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
                let path = dir
                    .ancestors()
                    .find(|p| p.exists())
                    .unwrap_or(std::path::Path::new("/"))
                    .to_path_buf();
                match statvfs(&path) {
                    Ok(st) if least.is_none_or(|l| st.avail_bytes < l.avail_bytes) => {
                        least = Some(st)
                    }
                    Ok(_) => {}
                    Err(e) => first_err = first_err.or(Some(e)),
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

fn statvfs(path: &std::path::Path) -> DsResult<FsStat> {
    use std::os::unix::ffi::OsStrExt;
    let c =
        std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|_| DatastoreError::Invalid)?;
    let mut out: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `out` a valid statvfs buffer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut out) } != 0 {
        return Err(DatastoreError::Io(std::io::Error::last_os_error()));
    }
    let frsize = out.f_frsize as u64;
    Ok(FsStat {
        total_bytes: out.f_blocks as u64 * frsize,
        free_bytes: out.f_bfree as u64 * frsize,
        avail_bytes: out.f_bavail as u64 * frsize,
        total_files: out.f_files as u64,
        free_files: out.f_ffree as u64,
        avail_files: out.f_favail as u64,
    })
}
