//! Scanning a folder tree for backup: every folder, file and symlink under
//! the root, with its metadata, symlinks not followed.
//!
//! Everything that can be refused is refused here, before the first chunk is
//! stored: an entry that is neither a folder, a regular file nor a symlink
//! (socket, fifo, device), a name or symlink target that is not UTF-8, an
//! unreadable folder or file. Each error names the path.

use std::fs::{self, File, Metadata};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::tree::EntryKind;
use super::RepoError;

/// One entry found under the root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Scanned {
    /// Path relative to the root, `/`-separated; `""` for the root.
    pub path: String,
    /// Where it is on disk.
    pub full: PathBuf,
    pub kind: EntryKind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime_ns: i64,
    /// Files: size at scan time; symlinks: target length; folders: 0.
    pub size: u64,
    /// Symlinks: the target.
    pub target: Option<String>,
}

fn source_err(path: &Path) -> impl FnOnce(std::io::Error) -> RepoError + '_ {
    move |source| RepoError::Source {
        path: path.to_path_buf(),
        source,
    }
}

fn bad(path: &Path, reason: &str) -> RepoError {
    RepoError::BadSource {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Modification time in ns since the epoch.
fn mtime_ns(meta: &Metadata) -> i64 {
    meta.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec())
}

fn scanned(path: String, full: PathBuf, kind: EntryKind, meta: &Metadata) -> Scanned {
    Scanned {
        path,
        full,
        kind,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime_ns: mtime_ns(meta),
        size: if kind == EntryKind::File {
            meta.len()
        } else {
            0
        },
        target: None,
    }
}

/// Scans the tree under `root` (followed if it is itself a symlink: it is
/// what the operator named). Entries come sorted by path, the root first.
///
/// # Errors
/// See the module doc; nothing has been stored when this fails.
pub(super) fn scan_tree(root: &Path) -> Result<Vec<Scanned>, RepoError> {
    let meta = fs::metadata(root).map_err(source_err(root))?;
    if !meta.is_dir() {
        return Err(bad(root, "not a folder"));
    }
    let mut out = vec![scanned(
        String::new(),
        root.to_path_buf(),
        EntryKind::Folder,
        &meta,
    )];
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        for entry in fs::read_dir(&dir).map_err(source_err(&dir))? {
            let entry = entry.map_err(source_err(&dir))?;
            let full = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                return Err(bad(&full, "the name is not valid UTF-8"));
            };
            let path = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            // DirEntry::metadata does not follow symlinks.
            let meta = entry.metadata().map_err(source_err(&full))?;
            let ft = meta.file_type();
            if ft.is_dir() {
                out.push(scanned(
                    path.clone(),
                    full.clone(),
                    EntryKind::Folder,
                    &meta,
                ));
                stack.push((full, path));
            } else if ft.is_symlink() {
                let target = fs::read_link(&full).map_err(source_err(&full))?;
                let Some(target) = target.to_str().map(str::to_string) else {
                    return Err(bad(&full, "the symlink target is not valid UTF-8"));
                };
                let mut e = scanned(path, full, EntryKind::Symlink, &meta);
                e.size = target.len() as u64;
                e.target = Some(target);
                out.push(e);
            } else if ft.is_file() {
                // Opened now so that an unreadable file fails the backup
                // before anything is stored.
                File::open(&full).map_err(source_err(&full))?;
                out.push(scanned(path, full, EntryKind::File, &meta));
            } else {
                let what = if ft.is_socket() {
                    "a socket"
                } else if ft.is_fifo() {
                    "a fifo"
                } else if ft.is_char_device() {
                    "a character device"
                } else if ft.is_block_device() {
                    "a block device"
                } else {
                    "of an unknown type"
                };
                return Err(bad(
                    &full,
                    &format!("is {what}; a tree backup holds only folders, files and symlinks"),
                ));
            }
        }
    }
    out.sort_unstable_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    #[test]
    fn scans_sorted_with_metadata_and_symlinks_unfollowed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::create_dir_all(d.join("a/b")).unwrap();
        fs::write(d.join("a/b/f"), b"hello").unwrap();
        fs::write(d.join("a.txt"), b"").unwrap();
        fs::set_permissions(d.join("a/b/f"), fs::Permissions::from_mode(0o600)).unwrap();
        symlink("../nowhere", d.join("a/dangling")).unwrap();
        symlink("/", d.join("root-link")).unwrap();
        let entries = scan_tree(d).unwrap();
        let paths: Vec<_> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(
            paths,
            ["", "a", "a.txt", "a/b", "a/b/f", "a/dangling", "root-link"]
        );
        let f = &entries[4];
        assert_eq!((f.kind, f.mode, f.size), (EntryKind::File, 0o600, 5));
        let link = &entries[5];
        assert_eq!(link.kind, EntryKind::Symlink);
        assert_eq!(link.target.as_deref(), Some("../nowhere"));
        assert_eq!(link.size, 10);
        assert_eq!(entries[6].target.as_deref(), Some("/"));
    }

    #[test]
    fn a_socket_is_refused_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("sub/pg.sock");
        fs::create_dir(dir.path().join("sub")).unwrap();
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let err = scan_tree(dir.path()).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("pg.sock") && msg.contains("a socket"), "{msg}");
    }
}
