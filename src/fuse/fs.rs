//! The FUSE request handlers: each forwards to the datastore operation of
//! the same meaning. fuser calls them on its request-loop threads; a handler
//! parses its arguments, spawns one task on the tokio runtime and returns at
//! once, and the task replies when the datastore has answered. So a slow
//! request (a chunk fetched from S3, a journal sync) never holds up the
//! others, and no disk work runs on the request loop.

use std::ffi::OsStr;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use fuser::{
    AccessFlags, Errno, FileHandle, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner,
    OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, TimeOrNow,
    WriteFlags,
};
use tokio::runtime::Handle;
use tracing::debug;

use super::attr::{self, new_attrs, stability, utf8, Inodes, Presentation};
pub(super) use super::inner::Inner;
use crate::datastore::{CreateMode, DatastoreError, ExportId, FileId, FileKind, FileOps, SetAttr};

/// The datastore folder served as a FUSE file system.
pub(super) struct ReviveFs {
    inner: Arc<Inner>,
}

impl ReviveFs {
    /// Serves folder `root` of `export`, answering on `runtime`.
    pub fn new(
        ds: Arc<dyn FileOps>,
        export: ExportId,
        root: FileId,
        instance: u64,
        runtime: Handle,
        owner: Option<(u32, u32)>,
        ttl: Duration,
    ) -> ReviveFs {
        ReviveFs {
            inner: Arc::new(Inner {
                ds,
                export,
                view: Presentation {
                    inodes: Inodes { root },
                    owner,
                },
                ttl,
                generation: Generation(instance),
                runtime,
            }),
        }
    }

    /// Runs one request's work to its reply on this request thread, with
    /// the runtime's timers, I/O and blocking pool: no hand-off to a worker
    /// and back, as a libfuse file system serves a request on the thread
    /// that read it.
    fn serve<F, Fut>(&self, work: F)
    where
        F: FnOnce(Arc<Inner>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let fut = work(self.inner.clone());
        // The write cache's file I/O then runs here too, as in a libfuse
        // file system.
        crate::fsutil::serve_blocking_here();
        self.inner.runtime.block_on(fut);
    }
}

impl fuser::Filesystem for ReviveFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(super::MAX_WRITE);
        let _ = config.set_max_readahead(super::MAX_WRITE);
        // Enough outstanding readahead and writeback requests to keep the
        // datastore's tasks busy.
        let _ = config.set_max_background(64);
        for wanted in [
            fuser::InitFlags::FUSE_PARALLEL_DIROPS,
            fuser::InitFlags::FUSE_DO_READDIRPLUS,
            fuser::InitFlags::FUSE_READDIRPLUS_AUTO,
        ] {
            if config.add_capabilities(wanted).is_err() {
                debug!(flag = ?wanted, "kernel lacks a FUSE capability");
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name = match utf8(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        self.serve(move |fs| async move {
            // The mount's root has no parent inside the mount.
            let dir = fs.id(parent);
            let name = if name == ".." && dir == fs.view.inodes.root {
                ".".to_string()
            } else {
                name
            };
            match fs.ds.lookup(&fs.name_at(dir, &name)).await {
                Ok(a) => reply.entry(&fs.ttl, &fs.view.file_attr(&a), fs.generation),
                Err(e) => reply.error(fs.fail("lookup", parent, &e)),
            }
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.serve(move |fs| async move {
            match fs.ds.getattr(fs.at(ino)).await {
                Ok(a) => reply.attr(&fs.ttl, &fs.view.file_attr(&a)),
                Err(e) => reply.error(fs.fail("getattr", ino, &e)),
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            mode: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size,
            atime: attr::set_time(atime),
            mtime: attr::set_time(mtime),
        };
        self.serve(move |fs| async move {
            match fs.ds.setattr(fs.at(ino), &set, None).await {
                Ok(a) => reply.attr(&fs.ttl, &fs.view.file_attr(&a)),
                Err(e) => reply.error(fs.fail("setattr", ino, &e)),
            }
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        // Tree points' links and client-made ones live in the datastore;
        // forwarding keeps FUSE a thin adapter.
        self.serve(move |fs| async move {
            match fs.ds.readlink(fs.at(ino)).await {
                Ok(target) => reply.data(target.as_bytes()),
                Err(e) => reply.error(fs.fail("readlink", ino, &e)),
            }
        });
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        // Only regular files: device nodes, fifos and sockets have no place
        // in a restore point.
        if mode & libc::S_IFMT != libc::S_IFREG {
            return reply.error(Errno::EPERM);
        }
        let name = match utf8(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let attrs = new_attrs(req, mode, umask);
        self.serve(move |fs| async move {
            let created = fs
                .ds
                .create(
                    &fs.name_at(fs.id(parent), &name),
                    CreateMode::Guarded,
                    &attrs,
                )
                .await;
            match created {
                Ok(a) => reply.entry(&fs.ttl, &fs.view.file_attr(&a), fs.generation),
                Err(e) => reply.error(fs.fail("mknod", parent, &e)),
            }
        });
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let name = match utf8(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let attrs = new_attrs(req, mode, umask);
        self.serve(move |fs| async move {
            match fs.ds.mkdir(&fs.name_at(fs.id(parent), &name), &attrs).await {
                Ok(a) => reply.entry(&fs.ttl, &fs.view.file_attr(&a), fs.generation),
                Err(e) => reply.error(fs.fail("mkdir", parent, &e)),
            }
        });
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = match utf8(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        self.serve(move |fs| async move {
            match fs.ds.remove(&fs.name_at(fs.id(parent), &name)).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(fs.fail("unlink", parent, &e)),
            }
        });
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let name = match utf8(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        self.serve(move |fs| async move {
            match fs.ds.rmdir(&fs.name_at(fs.id(parent), &name)).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(fs.fail("rmdir", parent, &e)),
            }
        });
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        // See readlink: the datastore refuses until it stores links.
        let (name, target) = match (utf8(link_name), utf8(target.as_os_str())) {
            (Ok(n), Ok(t)) => (n, t),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        let attrs = new_attrs(req, 0o777, 0);
        self.serve(move |fs| async move {
            let at = fs.name_at(fs.id(parent), &name);
            match fs.ds.symlink(&at, &target, &attrs).await {
                Ok(a) => reply.entry(&fs.ttl, &fs.view.file_attr(&a), fs.generation),
                Err(e) => reply.error(fs.fail("symlink", parent, &e)),
            }
        });
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            return reply.error(Errno::from_i32(libc::EINVAL));
        }
        let (from, to) = match (utf8(name), utf8(newname)) {
            (Ok(f), Ok(t)) => (f, t),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        let no_replace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        self.serve(move |fs| async move {
            let (from_dir, to_dir) = (fs.id(parent), fs.id(newparent));
            if no_replace {
                match fs.ds.lookup(&fs.name_at(to_dir, &to)).await {
                    Ok(_) => return reply.error(Errno::from_i32(libc::EEXIST)),
                    Err(DatastoreError::NotFound) => {}
                    Err(e) => return reply.error(fs.fail("rename", newparent, &e)),
                }
            }
            match fs
                .ds
                .rename(&fs.name_at(from_dir, &from), &fs.name_at(to_dir, &to))
                .await
            {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(fs.fail("rename", parent, &e)),
            }
        });
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // Stateless: every request names the inode. The kernel's page cache
        // stays valid across opens because every change comes through here.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.serve(move |fs| async move {
            match fs.ds.read(fs.at(ino), offset, size).await {
                Ok(r) => reply.data(&r.data),
                Err(e) => reply.error(fs.fail("read", ino, &e)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // The request buffer is reused for the next request: one copy.
        let data = Bytes::copy_from_slice(data);
        let stable = stability(flags);
        self.serve(move |fs| async move {
            match fs.ds.write(fs.at(ino), offset, data, stable).await {
                Ok(w) => reply.written(w.count),
                Err(e) => reply.error(fs.fail("write", ino, &e)),
            }
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // close(2) promises no durability; fsync does.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // The same journal sync as an NFS COMMIT: every acknowledged write
        // of the file survives a crash once this returns.
        self.serve(move |fs| async move {
            match fs.ds.commit(fs.at(ino)).await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(fs.fail("fsync", ino, &e)),
            }
        });
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        self.serve(move |fs| super::dir::readdir(fs, ino, offset, reply));
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        self.serve(move |fs| super::dir::readdirplus(fs, ino, offset, reply));
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Every namespace change (create, rename, remove, mkdir, setattr)
        // is durable in the namespace log before the datastore answers it,
        // so there is nothing left to flush: check the folder still exists.
        self.serve(move |fs| async move {
            match fs.ds.getattr(fs.at(ino)).await.map(|_| ()) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(fs.fail("fsyncdir", ino, &e)),
            }
        });
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        self.serve(move |fs| async move {
            match fs.ds.fsstat(fs.export).await {
                Ok(st) => {
                    const BS: u64 = 4096;
                    reply.statfs(
                        st.total_bytes / BS,
                        st.free_bytes / BS,
                        st.avail_bytes / BS,
                        st.total_files,
                        st.free_files,
                        BS as u32,
                        255,
                        BS as u32,
                    )
                }
                Err(e) => reply.error(fs.fail("statfs", ino, &e)),
            }
        });
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // `default_permissions`: the kernel checks modes itself.
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let name = match utf8(name) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let mut attrs = new_attrs(req, mode, umask);
        if flags & libc::O_TRUNC != 0 {
            attrs.size = Some(0);
        }
        let how = if flags & libc::O_EXCL != 0 {
            CreateMode::Guarded
        } else {
            CreateMode::Unchecked
        };
        self.serve(move |fs| async move {
            let created = fs
                .ds
                .create(&fs.name_at(fs.id(parent), &name), how, &attrs)
                .await;
            match created {
                Ok(a) if a.kind == FileKind::Regular => reply.created(
                    &fs.ttl,
                    &fs.view.file_attr(&a),
                    fs.generation,
                    FileHandle(0),
                    FopenFlags::FOPEN_KEEP_CACHE,
                ),
                Ok(_) => reply.error(Errno::from_i32(libc::EISDIR)),
                Err(e) => reply.error(fs.fail("create", parent, &e)),
            }
        });
    }

    // Extended attributes, locks, fallocate, SEEK_DATA and copy offload are
    // not part of the datastore: ENOSYS makes the kernel stop asking (and
    // fall back to its generic code) without the default handlers' warnings.

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: i64,
        _whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        _fh_in: FileHandle,
        _offset_in: u64,
        _ino_out: INodeNo,
        _fh_out: FileHandle,
        _offset_out: u64,
        _len: u64,
        _flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOSYS);
    }
}
