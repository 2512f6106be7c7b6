//! Small file-system helpers shared by the layers that keep state on local
//! disk: atomic replacement of small files, and the space figures of a file
//! system.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

/// Replaces `path` with `data` so that a crash leaves either the old or the new
/// content, never a mix: temp file, fsync, rename, fsync of the folder.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir)?;
    let mut temp_name = path.file_name().unwrap_or_default().to_os_string();
    temp_name.push(".tmp");
    let temp = dir.join(temp_name);
    let mut f = File::create(&temp)?;
    f.write_all(data)?;
    f.sync_data()?;
    fs::rename(&temp, path)?;
    File::open(dir)?.sync_all()
}

/// Space figures of one file system, in bytes and file slots.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Space {
    /// Total bytes.
    pub total_bytes: u64,
    /// Free bytes.
    pub free_bytes: u64,
    /// Free bytes an unprivileged writer may use.
    pub avail_bytes: u64,
    /// Total file slots (inodes).
    pub total_files: u64,
    /// Free file slots.
    pub free_files: u64,
    /// Free file slots an unprivileged writer may use.
    pub avail_files: u64,
}

/// The space figures of the file system holding `path` (statvfs).
pub fn space(path: &Path) -> io::Result<Space> {
    let st = rustix::fs::statvfs(path)?;
    let frsize = st.f_frsize;
    Ok(Space {
        total_bytes: st.f_blocks.saturating_mul(frsize),
        free_bytes: st.f_bfree.saturating_mul(frsize),
        avail_bytes: st.f_bavail.saturating_mul(frsize),
        total_files: st.f_files,
        free_files: st.f_ffree,
        avail_files: st.f_favail,
    })
}

/// The space of the file system that holds `path`, or would hold it: the
/// nearest existing ancestor's (a write cache folder not created yet).
pub fn space_of_nearest(path: &Path) -> io::Result<Space> {
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    space(existing)
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_whole_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub").join("state.json");
        super::write_atomic(&p, b"first, longer").unwrap();
        super::write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(p.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn space_of_a_real_file_system() {
        let dir = tempfile::tempdir().unwrap();
        let s = super::space(dir.path()).unwrap();
        assert!(s.total_bytes > 0 && s.avail_bytes <= s.total_bytes);
        let missing = dir.path().join("not/yet");
        assert_eq!(
            super::space_of_nearest(&missing).unwrap().total_bytes,
            s.total_bytes
        );
    }
}

thread_local! {
    /// Set on threads that serve one request at a time outside the async
    /// workers (FUSE request threads, NBD connection threads): blocking file
    /// work may run on them.
    static SERVES_BLOCKING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks this thread as one that may block in file I/O (a FUSE request
/// thread, an NBD connection thread): [`blocking`] runs work on it
/// directly, sparing a hand-off to tokio's blocking pool and back on every
/// write.
pub fn serve_blocking_here() {
    SERVES_BLOCKING.with(|s| s.set(true));
}

/// True on a thread marked with [`serve_blocking_here`].
pub fn serves_blocking() -> bool {
    SERVES_BLOCKING.with(std::cell::Cell::get)
}

/// Runs blocking file work `f`: on this thread when it was marked with
/// [`serve_blocking_here`], else on tokio's blocking pool (never on an
/// async worker).
///
/// # Errors
/// The pool's `JoinError` when `f` panicked there.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, tokio::task::JoinError> {
    if serves_blocking() {
        return Ok(f());
    }
    tokio::task::spawn_blocking(f).await
}
