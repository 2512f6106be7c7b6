//! Directory listing: READDIR and READDIRPLUS.
//!
//! Cookies come from the backend and are stable, so the cookie verifier is
//! always zero and the client's is ignored (RFC 1813 allows this). Entries
//! are packed until the client's byte budget is used; whatever did not fit
//! is fetched again with the last cookie sent.

use bytes::BufMut;
use nfs3_types::nfs3::{entry3, entryplus3, filename3, nfsstat3, post_op_attr, post_op_fh3};
use nfs3_types::xdr_codec::{Opaque, Pack};

use super::{fail, read_fh, Ctx, ProcResult, Target};
use crate::datastore::DirPage;
use crate::nfs::rpc::Reply;
use crate::nfs::xdr::{pack, pad4, XdrReader};

/// Most entries asked of the backend per call, whatever the budget: keeps
/// one call's work bounded.
const MAX_ENTRIES: usize = 4096;

/// Smallest possible `entry3` on the wire (one-byte name), used to turn a
/// byte budget into an entry count for the backend.
const MIN_ENTRY: usize = 4 + 8 + 4 + 4 + 8;

/// Fixed part of a READDIR(PLUS)3resok: status, dir attributes (present),
/// cookie verifier, list terminator, eof.
const FIXED: usize = 4 + 4 + 84 + 8 + 4 + 4;

struct Args {
    target: Target,
    cookie: u64,
}

async fn list(
    ctx: &Ctx<'_>,
    args: &Args,
    budget: usize,
) -> Result<(DirPage, post_op_attr), nfsstat3> {
    let t = &args.target;
    let backend = &ctx.state.backend;
    let dir_attr = backend
        .getattr(t.at())
        .await
        .map_err(|e| crate::nfs::error::nfsstat(&e))?;
    let max_entries = (budget / MIN_ENTRY).clamp(1, MAX_ENTRIES);
    let page = backend
        .readdir(t.at(), args.cookie, max_entries)
        .await
        .map_err(|e| crate::nfs::error::nfsstat(&e))?;
    Ok((page, ctx.post_op(t, Some(&dir_attr))))
}

fn begin(reply: &mut Reply, dir_attr: &post_op_attr) {
    let body = reply.body();
    body.put_u32(nfsstat3::NFS3_OK as u32);
    pack(body, dir_attr);
    body.put_u64(0); // cookieverf3
}

/// READDIR: `dir, cookie, cookieverf, count` → names, file ids, cookies.
pub(super) async fn readdir(ctx: &Ctx<'_>, r: &mut XdrReader, reply: &mut Reply) -> ProcResult {
    let fh = read_fh(r)?;
    let cookie = r.u64()?;
    let _verf = r.fixed::<8>()?;
    let count = r.u32()? as usize;
    let target = match ctx.resolve(&fh) {
        Ok(t) => t,
        Err(stat) => return fail(reply, stat, 1),
    };
    let args = Args { target, cookie };
    let (page, dir_attr) = match list(ctx, &args, count).await {
        Ok(v) => v,
        Err(stat) => return fail(reply, stat, 1),
    };
    let mut used = FIXED;
    let mut entries = Vec::with_capacity(page.entries.len());
    for e in &page.entries {
        let size = 4 + 8 + 4 + pad4(e.name.len()) + 8;
        if used + size > count {
            break;
        }
        used += size;
        entries.push(entry3 {
            fileid: e.attr.fileid,
            name: filename3(Opaque::borrowed(e.name.as_bytes())),
            cookie: e.cookie,
        });
    }
    finish(
        reply,
        &dir_attr,
        &entries,
        page.eof && entries.len() == page.entries.len(),
    )
}

/// READDIRPLUS: like READDIR plus attributes and a handle per entry, so a
/// client lists a VM folder in one call instead of one LOOKUP per file.
pub(super) async fn readdirplus(ctx: &Ctx<'_>, r: &mut XdrReader, reply: &mut Reply) -> ProcResult {
    let fh = read_fh(r)?;
    let cookie = r.u64()?;
    let _verf = r.fixed::<8>()?;
    let dircount = r.u32()? as usize;
    let maxcount = r.u32()? as usize;
    let target = match ctx.resolve(&fh) {
        Ok(t) => t,
        Err(stat) => return fail(reply, stat, 1),
    };
    let args = Args { target, cookie };
    let (page, dir_attr) = match list(ctx, &args, maxcount).await {
        Ok(v) => v,
        Err(stat) => return fail(reply, stat, 1),
    };
    let t = &args.target;
    let (mut used, mut dir_used) = (FIXED, 0usize);
    let mut entries = Vec::with_capacity(page.entries.len());
    for e in &page.entries {
        let entry = entryplus3 {
            fileid: e.attr.fileid,
            name: filename3(Opaque::borrowed(e.name.as_bytes())),
            cookie: e.cookie,
            name_attributes: ctx.post_op(t, Some(&e.attr)),
            name_handle: post_op_fh3::Some(ctx.handle(t, e.attr.fileid)),
        };
        let size = 4 + entry.packed_size();
        let dir_size = 8 + 4 + pad4(e.name.len()) + 8;
        // dircount of 0 is sent by some clients; treat it as "no limit".
        if used + size > maxcount || (dircount > 0 && dir_used + dir_size > dircount) {
            break;
        }
        used += size;
        dir_used += dir_size;
        entries.push(entry);
    }
    finish(
        reply,
        &dir_attr,
        &entries,
        page.eof && entries.len() == page.entries.len(),
    )
}

fn finish<T: Pack>(
    reply: &mut Reply,
    dir_attr: &post_op_attr,
    entries: &[T],
    eof: bool,
) -> ProcResult {
    if entries.is_empty() && !eof {
        // Not even one entry fits in what the client allowed.
        return fail(reply, nfsstat3::NFS3ERR_TOOSMALL, 1);
    }
    begin(reply, dir_attr);
    let body = reply.body();
    for e in entries {
        body.put_u32(1);
        pack(body, e);
    }
    body.put_u32(0);
    body.put_u32(u32::from(eof));
    Ok(nfsstat3::NFS3_OK)
}
