//! `fuse`: the datastore as a local file system, through the kernel's FUSE.
//!
//! A third thin adapter beside `nfs/adapter.rs` (and the block exports):
//! every request becomes the datastore operation of the same meaning, on the
//! same write cache, with the same durability rule. `fsync` is the write
//! cache's journal sync (NFS COMMIT), `fsyncdir` the namespace's. Nothing is
//! decided here that the NFS frontend would decide differently.
//!
//! - [`Mount`]: one mounted folder of an export (a publication, or a whole
//!   export), served until [`Mount::unmount`] or an external `umount`.
//! - `fs`: the request handlers. fuser reads requests on
//!   [`REQUEST_THREADS`] threads (one `/dev/fuse` clone each); each thread
//!   runs the datastore's async method for its request on the tokio runtime
//!   that called [`Mount::start`] (`Handle::block_on`: its timers, I/O and
//!   blocking pool) and replies. Measured with pg_basebackup reading the
//!   mount, serving on the request thread beat spawning a task per request
//!   (one wake-up of a worker and back saved per request).
//! - `dir`: READDIR and READDIRPLUS.
//! - `attr`: inode numbers, attributes and errno, each mapped in one place.
//! - [`users`]: users and groups by name or number (whom files are shown as).
//!
//! Mounting needs root (or `CAP_SYS_ADMIN`): fuser's pure-Rust mount opens
//! `/dev/fuse` and calls `mount(2)` itself, without `fusermount3`. It works
//! inside a private mount namespace (`unshare -m`) too.
//!
//! If the process dies (`kill -9`), the kernel aborts the connection and the
//! mount point answers `ENOTCONN` until it is detached: [`lazy_unmount`]
//! cleans such a dead mount; [`is_mount_point`] finds it.

mod attr;
mod dir;
mod fs;
mod inner;
pub mod users;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::datastore::{ExportId, FileId, FileOps};

/// Requests served at once per mount (libfuse's default pool is 10).
pub const REQUEST_THREADS: usize = 8;

/// How long the kernel may cache attributes and names. Every change goes
/// through this mount, which updates the kernel's copy as it answers, so a
/// longer time only saves GETATTR round trips; one second keeps changes made
/// over NFS to the same files visible soon.
pub const DEFAULT_ATTR_TTL: Duration = Duration::from_secs(1);

/// Largest WRITE the kernel sends: 1 MiB (its limit of 256 pages), so a
/// sequential writer such as `cp` costs one request per MiB.
pub const MAX_WRITE: u32 = 1 << 20;

/// Failures of mounting and unmounting.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    /// The mount point cannot be used.
    #[error("mount point '{path}' - {reason}")]
    MountPoint { path: PathBuf, reason: String },
    /// `mount(2)` or the FUSE handshake failed.
    #[error("mount FUSE file system at '{path}' - {source}")]
    Mount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `umount(2)` failed.
    #[error("unmount '{path}' - {source}")]
    Unmount {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not called from inside a tokio runtime.
    #[error("mount '{path}' - no async runtime to serve requests on")]
    NoRuntime { path: PathBuf },
}

/// How a folder is presented.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Present every file and folder as owned by this uid and gid (a
    /// database's OS user) instead of the owners stored in the backup.
    pub owner: Option<(u32, u32)>,
    /// Let users other than the mounting one in (`allow_other`): needed when
    /// root mounts for a service that runs as its own user.
    pub allow_other: bool,
    /// Name in `/proc/self/mounts` (`fsname`), e.g. `revive:pg-prod@ab12`.
    pub fs_name: String,
    /// Attribute and name cache time of the kernel.
    pub attr_ttl: Duration,
}

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            owner: None,
            allow_other: true,
            fs_name: "revive".into(),
            attr_ttl: DEFAULT_ATTR_TTL,
        }
    }
}

/// A mounted folder of the datastore. Dropping it unmounts (lazily if busy).
pub struct Mount {
    path: PathBuf,
    unmounter: Mutex<Option<fuser::SessionUnmounter>>,
    /// True once the request loop has returned (unmounted, or the connection aborted).
    ended: watch::Receiver<bool>,
}

impl std::fmt::Debug for Mount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mount").field("path", &self.path).finish()
    }
}

impl Mount {
    /// Mounts folder `root` of export `export` at `mountpoint` (an existing
    /// empty folder) and serves it on the current tokio runtime.
    pub async fn start(
        datastore: Arc<dyn FileOps>,
        export: ExportId,
        root: FileId,
        mountpoint: &Path,
        options: MountOptions,
    ) -> Result<Mount, FuseError> {
        let path = mountpoint.to_path_buf();
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| FuseError::NoRuntime { path: path.clone() })?;
        let instance = datastore.export(export).map(|e| e.instance).unwrap_or(0);
        let filesystem = fs::ReviveFs::new(
            datastore,
            export,
            root,
            instance,
            runtime,
            options.owner,
            options.attr_ttl,
        );
        let mut config = fuser::Config::default();
        config.mount_options = vec![
            fuser::MountOption::FSName(options.fs_name.clone()),
            fuser::MountOption::Subtype("revive".into()),
            // The kernel checks modes and owners as shown (PostgreSQL
            // insists on 0700 folders owned by its user).
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::RW,
            fuser::MountOption::NoDev,
            fuser::MountOption::NoSuid,
        ];
        if options.allow_other {
            config.acl = fuser::SessionACL::All;
        }
        // Each thread serves the request it read (see `fs`), so this many
        // requests run at once; a slow one (a cold chunk from S3, an fsync
        // waiting for its flush) holds only its own thread.
        config.n_threads = Some(REQUEST_THREADS);
        config.clone_fd = true;
        let blocking_path = path.clone();
        let (session, unmounter) =
            tokio::task::spawn_blocking(move || {
                check_mount_point(&blocking_path)?;
                let mut session = fuser::Session::new(filesystem, &blocking_path, &config)
                    .map_err(|source| FuseError::Mount {
                        path: blocking_path.clone(),
                        source,
                    })?;
                let unmounter = session.unmount_callable();
                Ok((session, unmounter))
            })
            .await
            .map_err(|e| FuseError::Mount {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            })??;
        let (tx, ended) = watch::channel(false);
        let loop_path = path.clone();
        std::thread::Builder::new()
            .name("fuse-session".into())
            .spawn(move || {
                if let Err(e) = session.run() {
                    warn!(path = %loop_path.display(), cause = %e, "FUSE request loop ended with an error");
                }
                let _ = tx.send(true);
            })
            .map_err(|source| FuseError::Mount {
                path: path.clone(),
                source,
            })?;
        info!(path = %path.display(), export, root, "FUSE file system mounted");
        Ok(Mount {
            path,
            unmounter: Mutex::new(Some(unmounter)),
            ended,
        })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True while the request loop runs (not unmounted from outside).
    pub fn is_serving(&self) -> bool {
        !*self.ended.borrow()
    }

    /// Completes when the request loop has ended: `umount` from outside, or
    /// [`Mount::unmount`].
    pub async fn ended(&self) {
        let mut rx = self.ended.clone();
        let _ = rx.wait_for(|ended| *ended).await;
    }

    /// Unmounts and waits until the request loop has ended. A mount still in
    /// use (open files, a process's working folder) is detached lazily: it
    /// disappears from the namespace now and the kernel drops it when the
    /// last user lets go.
    pub async fn unmount(self) -> Result<(), FuseError> {
        let unmounter = self.take_unmounter();
        let path = self.path.clone();
        let result = tokio::task::spawn_blocking(move || unmount_now(unmounter, &path))
            .await
            .map_err(|e| FuseError::Unmount {
                path: self.path.clone(),
                source: std::io::Error::other(e.to_string()),
            })?;
        result?;
        // A lazily detached mount ends its loop when its last user leaves;
        // waiting for that could take forever, so wait briefly.
        let _ = tokio::time::timeout(Duration::from_secs(5), self.ended()).await;
        info!(path = %self.path.display(), "FUSE file system unmounted");
        Ok(())
    }

    fn take_unmounter(&self) -> Option<fuser::SessionUnmounter> {
        match self.unmounter.lock() {
            Ok(mut g) => g.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        }
    }
}

/// Unmounts through fuser, falling back to a lazy detach when busy.
fn unmount_now(unmounter: Option<fuser::SessionUnmounter>, path: &Path) -> Result<(), FuseError> {
    if let Some(mut u) = unmounter {
        match u.unmount() {
            Ok(()) => return Ok(()),
            Err(e) => {
                warn!(path = %path.display(), cause = %e, "unmount failed; detaching lazily");
            }
        }
    }
    if is_mount_point(path) {
        lazy_unmount(path).map_err(|source| FuseError::Unmount {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(())
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(unmounter) = self.take_unmounter() {
            if let Err(e) = unmount_now(Some(unmounter), &self.path) {
                warn!(cause = %e, "unmount at drop");
            }
        }
    }
}

/// Detaches whatever is mounted at `path` (`umount -l`): the way to clean
/// the dead mount a killed server leaves behind.
pub fn lazy_unmount(path: &Path) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path; umount2 reads it only.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // Not mounted (any more): nothing to clean.
        if e.raw_os_error() == Some(libc::EINVAL) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// True when something is mounted exactly at `path` in this process's mount
/// namespace (`/proc/self/mountinfo`), dead FUSE mounts included.
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    info.lines()
        .filter_map(|line| line.split(' ').nth(4))
        .any(|mp| Path::new(&unescape_mountinfo(mp)) == wanted || Path::new(mp) == path)
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 3 < bytes.len() {
            let digits = &bytes[i + 1..i + 4];
            if digits.iter().all(|d| (b'0'..=b'7').contains(d)) {
                let v = digits
                    .iter()
                    .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A mount point must be an existing empty folder: mounting over files
/// would hide them (and a data folder's files could be mistaken for the
/// backup's).
fn check_mount_point(path: &Path) -> Result<(), FuseError> {
    let refuse = |reason: String| FuseError::MountPoint {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| refuse(e.to_string()))?;
    if !meta.is_dir() {
        return Err(refuse("not a folder".into()));
    }
    let mut entries = std::fs::read_dir(path).map_err(|e| refuse(e.to_string()))?;
    if entries.next().is_some() {
        return Err(refuse("not empty".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_existing_empty_folder_is_a_mount_point() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_mount_point(dir.path()).is_ok());
        let reason = |p: &Path| match check_mount_point(p) {
            Err(FuseError::MountPoint { reason, .. }) => reason,
            other => panic!("{other:?}"),
        };
        assert!(reason(&dir.path().join("missing")).contains("No such file"));
        std::fs::write(dir.path().join("file"), "x").unwrap();
        assert_eq!(reason(&dir.path().join("file")), "not a folder");
        assert_eq!(reason(dir.path()), "not empty");
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
        assert_eq!(unescape_mountinfo("/end\\"), "/end\\");
    }

    #[test]
    fn root_is_a_mount_point_and_a_fresh_folder_is_not() {
        assert!(is_mount_point(Path::new("/")));
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_mount_point(dir.path()));
    }
}
