//! Namespace procedures: LOOKUP, CREATE, MKDIR, SYMLINK, MKNOD, REMOVE,
//! RMDIR, RENAME, LINK, READLINK.
//!
//! Every name passes [`check_name`] before the backend sees it.

use bytes::BufMut;
use nfs3_types::nfs3::{
    nfsstat3, post_op_fh3, CREATE3resok, LINK3resok, LOOKUP3resok, REMOVE3resok, RENAME3resok,
    RMDIR3resok,
};
use nfs3_types::xdr_codec::Opaque;

use super::{
    backend_fail, check_name, fail, ok, read_dirop, read_fh, read_path, read_sattr, Ctx, NameUse,
    ProcResult, Target,
};
use crate::datastore::{Attr, CreateMode, DsResult, SetAttr};
use crate::nfs::rpc::Reply;
use crate::nfs::xdr::{pack, Garbage, XdrReader};

/// Resolve a directory handle and check a name in it; on failure the
/// status to answer.
fn dir_and_name<'n>(
    ctx: &Ctx<'_>,
    fh: &[u8],
    name: &'n [u8],
    usage: NameUse,
) -> Result<(Target, &'n str), nfsstat3> {
    let dir = ctx.resolve(fh)?;
    let name = check_name(name, usage, &dir)?;
    Ok((dir, name))
}

/// LOOKUP: `dir, name` → `fh, post_op_attr obj, post_op_attr dir`.
pub(super) async fn lookup(ctx: &Ctx<'_>, r: &mut XdrReader, reply: &mut Reply) -> ProcResult {
    let (fh, name) = read_dirop(r)?;
    let (dir, name) = match dir_and_name(ctx, &fh, &name, NameUse::Lookup) {
        Ok(v) => v,
        Err(stat) => return fail(reply, stat, 1),
    };
    let backend = &ctx.state.backend;
    let found = if name == "." {
        backend.getattr(dir.at()).await
    } else {
        backend.lookup(&dir.at().child(name)).await
    };
    match found {
        Ok(a) => ok(
            reply,
            &LOOKUP3resok {
                object: ctx.handle(&dir, a.fileid),
                obj_attributes: ctx.post_op(&dir, Some(&a)),
                dir_attributes: ctx.post_op(&dir, None),
            },
        ),
        Err(e) => backend_fail(reply, &e, 1),
    }
}

/// Append the result of an operation that made a new object. CREATE3resok,
/// MKDIR3resok and SYMLINK3resok share one layout:
/// `post_op_fh3 obj, post_op_attr obj_attributes, wcc_data dir_wcc`.
fn created(ctx: &Ctx<'_>, dir: &Target, res: DsResult<Attr>, reply: &mut Reply) -> ProcResult {
    match res {
        Ok(a) => ok(
            reply,
            &CREATE3resok {
                obj: post_op_fh3::Some(ctx.handle(dir, a.fileid)),
                obj_attributes: ctx.post_op(dir, Some(&a)),
                dir_wcc: ctx.wcc(dir, None),
            },
        ),
        Err(e) => backend_fail(reply, &e, 2),
    }
}

/// CREATE: `dir, name, createhow3` → new file.
pub(super) async fn create(ctx: &Ctx<'_>, r: &mut XdrReader, reply: &mut Reply) -> ProcResult {
    let (fh, name) = read_dirop(r)?;
    let (mode, attrs) = match r.u32()? {
        0 => (CreateMode::Unchecked, read_sattr(r)?),
        1 => (CreateMode::Guarded, read_sattr(r)?),
        // The owner is set even for EXCLUSIVE, whose attributes otherwise
        // follow in a SETATTR.
        2 => (CreateMode::Exclusive(r.fixed::<8>()?), SetAttr::default()),
        _ => return Err(Garbage),
    };
    let (dir, name) = match dir_and_name(ctx, &fh, &name, NameUse::Modify) {
        Ok(v) => v,
        Err(stat) => return fail(reply, stat, 2),
    };
    let res = ctx
        .state
        .backend
        .create(&dir.at().child(name), mode, &ctx.owned_by_caller(attrs))
        .await;
    created(ctx, &dir, res, reply)
}

/// MKDIR: `dir, name, sattr3` → new directory.
pub(super) async fn mkdir(ctx: &Ctx<'_>, r: &mut XdrReader, reply: &mut Reply) -> ProcResult {
    let (fh, name) = read_dirop(r)?;
    let attrs = read_sattr(r)?;
    let (dir, name) = match dir_and_name(ctx, &fh, &name, NameUse::Modify) {
        Ok(v) => v,
        Err(stat) => return fail(reply, stat, 2),
    };
    let res = ctx
        .state
        .backend
        .mkdir(&dir.at().child(name), &ctx.owned_by_caller(attrs))
        .await;
    created(ctx, &dir, res, reply)
}

/// SYMLINK: `dir, name, sattr3, target` → new link (backend may refuse).
pub(super) async fn symlink(ctx: &Ctx<'_>, r: &mut XdrReader, reply: &mut Reply) -> ProcResult {
    let (fh, name) = read_dirop(r)?;
    let attrs = read_sattr(r)?;
    let target = read_path(r)?;
    let (dir, name) = match dir_and_name(ctx, &fh, &name, NameUse::Modify) {
        Ok(v) => v,
        Err(stat) => return fail(reply, stat, 2),
    };
    let Ok(target) = std::str::from_utf8(&target) else {
        return fail(reply, nfsstat3::NFS3ERR_INVAL, 2);
    };
    let res = ctx
        .state
        .backend
        .symlink(&dir.at().child(name), target, &ctx.owned_by_caller(attrs))
        .await;
    created(ctx, &dir, res, reply)
}

/// MKNOD: devices, sockets and FIFOs have no place on a VM datastore.
pub(super) async fn mknod(ctx: &Ctx<'_>, r: &mut XdrReader, reply: &mut Reply) -> ProcResult {
    // Only the directory is decoded: the answer is the same whatever follows.
    let (fh, _name) = read_dirop(r)?;
    let stat = match ctx.resolve(&fh) {
        Ok(_) => nfsstat3::NFS3ERR_NOTSUPP,
        Err(stat) => stat,
    };
    fail(reply, stat, 2)
}

/// REMOVE: `dir, name` → `wcc_data`.
pub(super) async fn remove(ctx: &Ctx<'_>, r: &mut XdrReader, reply: &mut Reply) -> ProcResult {
    let (fh, name) = read_dirop(r)?;
    let (dir, name) = match dir_and_name(ctx, &fh, &name, NameUse::Modify) {
        Ok(v) => v,
        Err(stat) => return fail(reply, stat, 2),
    };
    match ctx.state.backend.remove(&dir.at().child(name)).await {
        Ok(()) => ok(
            reply,
            &REMOVE3resok {
                dir_wcc: ctx.wcc(&dir, None),
            },
        ),
        Err(e) => backend_fail(reply, &e, 2),
    }
}

/// RMDIR: `dir, name` → `wcc_data`.
pub(super) async fn rmdir(ctx: &Ctx<'_>, r: &mut XdrReader, reply: &mut Reply) -> ProcResult {
    let (fh, name) = read_dirop(r)?;
    let (dir, name) = match dir_and_name(ctx, &fh, &name, NameUse::Modify) {
        Ok(v) => v,
        Err(stat) => return fail(reply, stat, 2),
    };
    match ctx.state.backend.rmdir(&dir.at().child(name)).await {
        Ok(()) => ok(
            reply,
            &RMDIR3resok {
                dir_wcc: ctx.wcc(&dir, None),
            },
        ),
        Err(e) => backend_fail(reply, &e, 2),
    }
}

/// RENAME: `from dir, name, to dir, name` → two `wcc_data`.
pub(super) async fn rename(ctx: &Ctx<'_>, r: &mut XdrReader, reply: &mut Reply) -> ProcResult {
    let (from_fh, from_name) = read_dirop(r)?;
    let (to_fh, to_name) = read_dirop(r)?;
    let checked = dir_and_name(ctx, &from_fh, &from_name, NameUse::Modify).and_then(|from| {
        let to = dir_and_name(ctx, &to_fh, &to_name, NameUse::Modify)?;
        if from.0.export.id != to.0.export.id {
            return Err(nfsstat3::NFS3ERR_XDEV);
        }
        Ok((from, to))
    });
    let ((from_dir, from_name), (to_dir, to_name)) = match checked {
        Ok(v) => v,
        Err(stat) => return fail(reply, stat, 4),
    };
    match ctx
        .state
        .backend
        .rename(&from_dir.at().child(from_name), &to_dir.at().child(to_name))
        .await
    {
        Ok(()) => ok(
            reply,
            &RENAME3resok {
                fromdir_wcc: ctx.wcc(&from_dir, None),
                todir_wcc: ctx.wcc(&to_dir, None),
            },
        ),
        Err(e) => backend_fail(reply, &e, 4),
    }
}

/// LINK: `file, dir, name` → `post_op_attr, wcc_data` (backend may refuse).
pub(super) async fn link(ctx: &Ctx<'_>, r: &mut XdrReader, reply: &mut Reply) -> ProcResult {
    let fh = read_fh(r)?;
    let (dir_fh, name) = read_dirop(r)?;
    let checked = ctx.resolve(&fh).and_then(|file| {
        let (dir, name) = dir_and_name(ctx, &dir_fh, &name, NameUse::Modify)?;
        if file.export.id != dir.export.id {
            return Err(nfsstat3::NFS3ERR_XDEV);
        }
        Ok((file, dir, name))
    });
    let (file, dir, name) = match checked {
        Ok(v) => v,
        Err(stat) => return fail(reply, stat, 3),
    };
    match ctx
        .state
        .backend
        .link(file.at(), &dir.at().child(name))
        .await
    {
        Ok(a) => ok(
            reply,
            &LINK3resok {
                file_attributes: ctx.post_op(&file, Some(&a)),
                linkdir_wcc: ctx.wcc(&dir, None),
            },
        ),
        Err(e) => backend_fail(reply, &e, 3),
    }
}

/// READLINK: `fh` → `post_op_attr, nfspath3`.
pub(super) async fn readlink(ctx: &Ctx<'_>, r: &mut XdrReader, reply: &mut Reply) -> ProcResult {
    let fh = read_fh(r)?;
    let t = match ctx.resolve(&fh) {
        Ok(t) => t,
        Err(stat) => return fail(reply, stat, 1),
    };
    match ctx.state.backend.readlink(t.at()).await {
        Ok(target) => {
            let body = reply.body();
            body.put_u32(nfsstat3::NFS3_OK as u32);
            pack(body, &ctx.post_op(&t, None));
            pack(body, &Opaque::borrowed(target.as_bytes()));
            Ok(nfsstat3::NFS3_OK)
        }
        Err(e) => backend_fail(reply, &e, 1),
    }
}
