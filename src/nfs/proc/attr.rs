//! Attribute and file system procedures: GETATTR, SETATTR, ACCESS, FSSTAT,
//! FSINFO, PATHCONF.

use nfs3_types::nfs3::{
    nfstime3, FSINFO3resok, FSSTAT3resok, GETATTR3resok, PATHCONF3resok, SETATTR3resok,
    FSF3_CANSETTIME, FSF3_HOMOGENEOUS, FSF3_LINK, FSF3_SYMLINK,
};

use super::{backend_fail, fail, ok, read_fh, read_sattr, read_time, Ctx, ProcResult};
use crate::nfs::rpc::Reply;
use crate::nfs::xdr::XdrReader;

/// READ and WRITE transfer size: 1 MiB, what ESXi and Linux use at most, so
/// a VM disk streams in few, large calls.
pub const MAX_TRANSFER: u32 = 1024 * 1024;

/// Preferred READDIR size.
const DTPREF: u32 = 64 * 1024;

/// Largest file: the datastore's limit (64 TiB, the VMFS/vSphere virtual
/// disk limit), which it enforces on SETATTR, WRITE and CREATE.
const MAX_FILE_SIZE: u64 = crate::datastore::types::MAX_FILE_SIZE;

/// GETATTR: `fh` → `fattr3`.
pub(super) async fn getattr(ctx: &Ctx<'_>, r: &mut XdrReader, reply: &mut Reply) -> ProcResult {
    let fh = read_fh(r)?;
    let t = match ctx.resolve(&fh) {
        Ok(t) => t,
        Err(stat) => return fail(reply, stat, 0),
    };
    match ctx.state.backend.getattr(t.at()).await {
        Ok(a) => ok(
            reply,
            &GETATTR3resok {
                obj_attributes: ctx.fattr(&t, &a),
            },
        ),
        Err(e) => backend_fail(reply, &e, 0),
    }
}

/// SETATTR: `fh, sattr3, guard` → `wcc_data`.
pub(super) async fn setattr(ctx: &Ctx<'_>, r: &mut XdrReader, reply: &mut Reply) -> ProcResult {
    let fh = read_fh(r)?;
    let set = read_sattr(r)?;
    let guard = if r.bool()? { Some(read_time(r)?) } else { None };
    let t = match ctx.resolve(&fh) {
        Ok(t) => t,
        Err(stat) => return fail(reply, stat, 2),
    };
    match ctx.state.backend.setattr(t.at(), &set, guard).await {
        Ok(a) => ok(
            reply,
            &SETATTR3resok {
                obj_wcc: ctx.wcc(&t, Some(&a)),
            },
        ),
        Err(e) => backend_fail(reply, &e, 2),
    }
}

/// ACCESS: `fh, access bits` → granted bits.
///
/// Everything asked is granted: the caller passed the address allow-list and
/// revive does not enforce per-user permissions (ESXi runs as root).
pub(super) async fn access(ctx: &Ctx<'_>, r: &mut XdrReader, reply: &mut Reply) -> ProcResult {
    let fh = read_fh(r)?;
    let asked = r.u32()?;
    let t = match ctx.resolve(&fh) {
        Ok(t) => t,
        Err(stat) => return fail(reply, stat, 1),
    };
    match ctx.state.backend.getattr(t.at()).await {
        Ok(a) => ok(
            reply,
            &nfs3_types::nfs3::ACCESS3resok {
                obj_attributes: ctx.post_op(&t, Some(&a)),
                access: asked & 0x3f,
            },
        ),
        Err(e) => backend_fail(reply, &e, 1),
    }
}

/// FSSTAT: space figures from the backend (the write cache's real size).
pub(super) async fn fsstat(ctx: &Ctx<'_>, r: &mut XdrReader, reply: &mut Reply) -> ProcResult {
    let fh = read_fh(r)?;
    let t = match ctx.resolve(&fh) {
        Ok(t) => t,
        Err(stat) => return fail(reply, stat, 1),
    };
    match ctx.state.backend.fsstat(t.export.id).await {
        Ok(s) => ok(
            reply,
            &FSSTAT3resok {
                obj_attributes: ctx.post_op(&t, None),
                tbytes: s.total_bytes,
                fbytes: s.free_bytes,
                abytes: s.avail_bytes,
                tfiles: s.total_files,
                ffiles: s.free_files,
                afiles: s.avail_files,
                invarsec: 0,
            },
        ),
        Err(e) => backend_fail(reply, &e, 1),
    }
}

/// FSINFO: transfer sizes and capabilities (constants).
pub(super) async fn fsinfo(ctx: &Ctx<'_>, r: &mut XdrReader, reply: &mut Reply) -> ProcResult {
    let fh = read_fh(r)?;
    let t = match ctx.resolve(&fh) {
        Ok(t) => t,
        Err(stat) => return fail(reply, stat, 1),
    };
    let attr = ctx.state.backend.getattr(t.at()).await.ok();
    ok(
        reply,
        &FSINFO3resok {
            obj_attributes: ctx.post_op(&t, attr.as_ref()),
            rtmax: MAX_TRANSFER,
            rtpref: MAX_TRANSFER,
            rtmult: 4096,
            wtmax: MAX_TRANSFER,
            wtpref: MAX_TRANSFER,
            wtmult: 4096,
            dtpref: DTPREF,
            maxfilesize: MAX_FILE_SIZE,
            time_delta: nfstime3 {
                seconds: 0,
                nseconds: 1,
            },
            properties: FSF3_LINK | FSF3_SYMLINK | FSF3_HOMOGENEOUS | FSF3_CANSETTIME,
        },
    )
}

/// PATHCONF: name limits (constants).
pub(super) async fn pathconf(ctx: &Ctx<'_>, r: &mut XdrReader, reply: &mut Reply) -> ProcResult {
    let fh = read_fh(r)?;
    let t = match ctx.resolve(&fh) {
        Ok(t) => t,
        Err(stat) => return fail(reply, stat, 1),
    };
    ok(
        reply,
        &PATHCONF3resok {
            obj_attributes: ctx.post_op(&t, None),
            linkmax: 1,
            name_max: super::MAX_NAME as u32,
            no_trunc: true,
            chown_restricted: true,
            case_insensitive: false,
            case_preserving: true,
        },
    )
}
