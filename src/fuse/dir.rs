//! READDIR and READDIRPLUS: a folder's entries as the datastore lists them,
//! `.` and `..` first. An entry's offset is its datastore cookie, so a
//! listing resumes right after the last entry the kernel kept, even while
//! the folder changes.

use std::sync::Arc;
use std::time::Duration;

use fuser::{Errno, FileAttr, INodeNo, ReplyDirectory, ReplyDirectoryPlus};

use super::attr;
use super::fs::Inner;
use crate::datastore::FileAt;

/// Entries asked of the datastore per page: the kernel's buffer (4 KiB for
/// READDIR, a page or more for READDIRPLUS) holds fewer; the rest of a page
/// is simply asked again at the next offset.
const DIR_PAGE: usize = 128;

/// One entry as the kernel gets it.
struct Entry<'a> {
    /// Offset of the next entry (the datastore's cookie).
    next: u64,
    name: &'a str,
    attr: FileAttr,
    /// `.` or `..`: attributes the kernel must not cache.
    dot: bool,
}

/// Hands folder `ino`'s entries from `offset` to `add` until it reports the
/// kernel's buffer full or the folder ends.
async fn list(
    fs: &Inner,
    ino: INodeNo,
    offset: u64,
    mut add: impl FnMut(Entry<'_>) -> bool,
) -> Result<(), Errno> {
    let dir = fs.id(ino);
    let mut cookie = offset;
    loop {
        let page = fs
            .ds
            .readdir(FileAt::new(fs.export, dir), cookie, DIR_PAGE)
            .await
            .map_err(|e| fs.fail("readdir", ino, &e))?;
        for entry in &page.entries {
            let full = match entry.name.as_str() {
                "." => add(Entry {
                    next: entry.cookie,
                    name: ".",
                    attr: attr::dir_placeholder(ino),
                    dot: true,
                }),
                // The entry names the parent; the mount's root has none
                // inside the mount.
                ".." => {
                    let parent = if dir == fs.view.inodes.root {
                        INodeNo::ROOT
                    } else {
                        fs.view.inodes.ino(entry.attr.fileid)
                    };
                    add(Entry {
                        next: entry.cookie,
                        name: "..",
                        attr: attr::dir_placeholder(parent),
                        dot: true,
                    })
                }
                name => add(Entry {
                    next: entry.cookie,
                    name,
                    attr: fs.view.file_attr(&entry.attr),
                    dot: false,
                }),
            };
            if full {
                return Ok(());
            }
            cookie = entry.cookie;
        }
        if page.eof || page.entries.is_empty() {
            return Ok(());
        }
    }
}

/// READDIR of folder `ino` from `offset`.
pub(super) async fn readdir(fs: Arc<Inner>, ino: INodeNo, offset: u64, mut reply: ReplyDirectory) {
    let listed = list(&fs, ino, offset, |e| {
        reply.add(e.attr.ino, e.next, e.attr.kind, e.name)
    })
    .await;
    match listed {
        Ok(()) => reply.ok(),
        Err(errno) => reply.error(errno),
    }
}

/// READDIRPLUS of folder `ino` from `offset`: entries with attributes, so
/// `ls -l` and `find -printf` cost one request per page, not one per file.
pub(super) async fn readdirplus(
    fs: Arc<Inner>,
    ino: INodeNo,
    offset: u64,
    mut reply: ReplyDirectoryPlus,
) {
    let (ttl, generation) = (fs.ttl, fs.generation);
    let listed = list(&fs, ino, offset, |e| {
        let ttl = if e.dot { Duration::ZERO } else { ttl };
        reply.add(e.attr.ino, e.next, e.name, &ttl, &e.attr, generation)
    })
    .await;
    match listed {
        Ok(()) => reply.ok(),
        Err(errno) => reply.error(errno),
    }
}
