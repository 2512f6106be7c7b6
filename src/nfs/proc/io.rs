//! Data procedures: READ, WRITE, COMMIT.
//!
//! The hot path. READ data goes to the socket straight from the backend's
//! `Bytes` (the reply's tail); WRITE data is a slice of the received record.
//! No pre-operation attributes are fetched, which would cost a backend call
//! per I/O.

use bytes::BufMut;
use nfs3_types::nfs3::{nfsstat3, stable_how, writeverf3, COMMIT3resok, WRITE3resok};

use super::attr::MAX_TRANSFER;
use super::{backend_fail, fail, ok, read_fh, Ctx, ProcResult};
use crate::datastore::Stability;
use crate::nfs::record::MAX_RECORD;
use crate::nfs::rpc::Reply;
use crate::nfs::xdr::{pack, Garbage, XdrReader};

/// READ: `fh, offset, count` → `post_op_attr, count, eof, data`.
pub(super) async fn read(ctx: &Ctx<'_>, r: &mut XdrReader, reply: &mut Reply) -> ProcResult {
    let fh = read_fh(r)?;
    let offset = r.u64()?;
    // Clients ask for at most rtmax; a larger ask is trimmed, not refused.
    let count = r.u32()?.min(MAX_TRANSFER);
    let t = match ctx.resolve(&fh) {
        Ok(t) => t,
        Err(stat) => return fail(reply, stat, 1),
    };
    match ctx.state.backend.read(t.at(), offset, count).await {
        Ok(res) => {
            let mut data = res.data;
            // A backend returning more than asked must not corrupt the reply.
            data.truncate(count as usize);
            ctx.state
                .metrics
                .bytes_read
                .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
            let body = reply.body();
            body.put_u32(nfsstat3::NFS3_OK as u32);
            pack(body, &ctx.post_op(&t, res.attr.as_ref()));
            body.put_u32(data.len() as u32);
            body.put_u32(u32::from(res.eof));
            body.put_u32(data.len() as u32);
            reply.set_tail(data);
            Ok(nfsstat3::NFS3_OK)
        }
        Err(e) => backend_fail(reply, &e, 1),
    }
}

fn stability(v: u32) -> Result<Stability, Garbage> {
    match v {
        0 => Ok(Stability::Unstable),
        1 => Ok(Stability::DataSync),
        2 => Ok(Stability::FileSync),
        _ => Err(Garbage),
    }
}

fn stable_how(s: Stability) -> stable_how {
    match s {
        Stability::Unstable => stable_how::UNSTABLE,
        Stability::DataSync => stable_how::DATA_SYNC,
        Stability::FileSync => stable_how::FILE_SYNC,
    }
}

/// WRITE: `fh, offset, count, stable, data` → `wcc_data, count, committed, verf`.
pub(super) async fn write(ctx: &Ctx<'_>, r: &mut XdrReader, reply: &mut Reply) -> ProcResult {
    let fh = read_fh(r)?;
    let offset = r.u64()?;
    let count = r.u32()?;
    let stable = stability(r.u32()?)?;
    let mut data = r.opaque(MAX_RECORD)?;
    let t = match ctx.resolve(&fh) {
        Ok(t) => t,
        Err(stat) => return fail(reply, stat, 2),
    };
    // RFC 1813: count and the data length should agree; trust the shorter.
    data.truncate(count as usize);
    if offset.checked_add(data.len() as u64).is_none() {
        return fail(reply, nfsstat3::NFS3ERR_FBIG, 2);
    }
    match ctx.state.backend.write(t.at(), offset, data, stable).await {
        Ok(res) => ok(
            reply,
            &WRITE3resok {
                file_wcc: {
                    ctx.state
                        .metrics
                        .bytes_written
                        .fetch_add(u64::from(res.count), std::sync::atomic::Ordering::Relaxed);
                    ctx.wcc(&t, res.attr.as_ref())
                },
                count: res.count,
                committed: stable_how(res.committed),
                verf: writeverf3(ctx.state.write_verifier),
            },
        ),
        Err(e) => backend_fail(reply, &e, 2),
    }
}

/// COMMIT: `fh, offset, count` → `wcc_data, verf`.
///
/// The verifier changes per boot: a client that sees it change re-sends the
/// unstable writes it still holds, which covers anything lost in a crash.
pub(super) async fn commit(ctx: &Ctx<'_>, r: &mut XdrReader, reply: &mut Reply) -> ProcResult {
    let fh = read_fh(r)?;
    // The write cache commits the whole file at once: one group fsync
    // covers any range the client names.
    let _offset = r.u64()?;
    let _count = r.u32()?;
    let t = match ctx.resolve(&fh) {
        Ok(t) => t,
        Err(stat) => return fail(reply, stat, 2),
    };
    match ctx.state.backend.commit(t.at()).await {
        Ok(()) => ok(
            reply,
            &COMMIT3resok {
                file_wcc: ctx.wcc(&t, None),
                verf: writeverf3(ctx.state.write_verifier),
            },
        ),
        Err(e) => backend_fail(reply, &e, 2),
    }
}
