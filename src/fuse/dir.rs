//! READDIR and READDIRPLUS: a folder's entries from the datastore, after
//! the synthetic `.` and `..`. An entry's offset is its datastore cookie
//! (the file id) shifted past those two, so a listing resumes right after
//! the last entry the kernel kept, even while the folder changes.

use std::sync::Arc;
use std::time::Duration;

use fuser::{INodeNo, ReplyDirectory, ReplyDirectoryPlus};

use super::attr;
use super::fs::Inner;
use crate::datastore::FileAt;

/// Entries asked of the datastore per page: the kernel's buffer (4 KiB for
/// READDIR, a page or more for READDIRPLUS) holds fewer; the rest of a page
/// is simply asked again at the next offset.
const DIR_PAGE: usize = 128;

/// Offsets of the synthetic `.` and `..` entries.
const DOT_OFFSET: u64 = 1;
const DOTDOT_OFFSET: u64 = 2;

/// READDIR of folder `ino` from `offset`.
pub(super) async fn readdir(fs: Arc<Inner>, ino: INodeNo, offset: u64, mut reply: ReplyDirectory) {
    let dir = fs.id(ino);
    if offset < DOT_OFFSET && reply.add(ino, DOT_OFFSET, fuser::FileType::Directory, ".") {
        return reply.ok();
    }
    if offset < DOTDOT_OFFSET {
        let parent = match fs.parent(dir).await {
            Ok(p) => p,
            Err(e) => return reply.error(fs.fail("readdir", ino, &e)),
        };
        if reply.add(parent, DOTDOT_OFFSET, fuser::FileType::Directory, "..") {
            return reply.ok();
        }
    }
    let mut cookie = offset.saturating_sub(DOTDOT_OFFSET);
    loop {
        let page = match fs
            .ds
            .readdir(FileAt::new(fs.export, dir), cookie, DIR_PAGE)
            .await
        {
            Ok(p) => p,
            Err(e) => return reply.error(fs.fail("readdir", ino, &e)),
        };
        for entry in &page.entries {
            let kind = attr::file_type(entry.attr.kind);
            let next = entry.cookie + DOTDOT_OFFSET;
            if reply.add(
                fs.view.inodes.ino(entry.attr.fileid),
                next,
                kind,
                &entry.name,
            ) {
                return reply.ok();
            }
            cookie = entry.cookie;
        }
        if page.eof || page.entries.is_empty() {
            return reply.ok();
        }
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
    let dir = fs.id(ino);
    let zero = Duration::ZERO;
    let g = fs.generation;
    if offset < DOT_OFFSET && reply.add(ino, DOT_OFFSET, ".", &zero, &attr::dir_placeholder(ino), g)
    {
        return reply.ok();
    }
    if offset < DOTDOT_OFFSET {
        let parent = match fs.parent(dir).await {
            Ok(p) => p,
            Err(e) => return reply.error(fs.fail("readdirplus", ino, &e)),
        };
        let placeholder = attr::dir_placeholder(parent);
        if reply.add(parent, DOTDOT_OFFSET, "..", &zero, &placeholder, g) {
            return reply.ok();
        }
    }
    let mut cookie = offset.saturating_sub(DOTDOT_OFFSET);
    loop {
        let page = match fs
            .ds
            .readdir(FileAt::new(fs.export, dir), cookie, DIR_PAGE)
            .await
        {
            Ok(p) => p,
            Err(e) => return reply.error(fs.fail("readdirplus", ino, &e)),
        };
        for entry in &page.entries {
            let a = fs.view.file_attr(&entry.attr);
            let next = entry.cookie + DOTDOT_OFFSET;
            if reply.add(a.ino, next, &entry.name, &fs.ttl, &a, g) {
                return reply.ok();
            }
            cookie = entry.cookie;
        }
        if page.eof || page.entries.is_empty() {
            return reply.ok();
        }
    }
}
