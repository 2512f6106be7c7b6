//! NFSv3 procedures (RFC 1813, program 100003 version 3).
//!
//! [`dispatch`] routes a call to one of the files below; each procedure
//! decodes all of its arguments first (a decoding failure becomes
//! `GARBAGE_ARGS` before anything happened), resolves and access-checks its
//! file handles, calls the backend, and appends its results to the reply.
//!
//! - `attr`: GETATTR SETATTR ACCESS FSSTAT FSINFO PATHCONF
//! - `io`: READ WRITE COMMIT
//! - `dirop`: LOOKUP CREATE MKDIR SYMLINK MKNOD REMOVE RMDIR RENAME LINK READLINK
//! - `readdir`: READDIR READDIRPLUS
//!
//! Shared here: handle resolution (the per-call allow-list check), name
//! checks, and the conversions between backend types and `nfs3_types`.

mod attr;
mod dirop;
mod io;
mod readdir;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes};
use nfs3_types::nfs3::{
    fattr3, ftype3, nfs_fh3, nfsstat3, nfstime3, post_op_attr, specdata3, wcc_data,
};
use nfs3_types::rpc::accept_stat;
use nfs3_types::xdr_codec::Opaque;

use super::error::nfsstat;
use super::handle::FileHandle;
use super::rpc::{Call, Credentials, Reply};
use super::server::ServerState;
use super::xdr::{pack, Garbage, XdrReader};
use crate::datastore::{Attr, DatastoreError, Export, FileAt, FileId, FileKind, SetAttr, SetTime};

/// Largest name accepted in a directory operation (NAME_MAX).
pub(crate) const MAX_NAME: usize = 255;

/// Largest name taken off the wire before answering NAMETOOLONG; beyond
/// it the arguments are garbage.
const MAX_NAME_WIRE: usize = 4096;

/// Largest symlink target or path (PATH_MAX).
const MAX_PATH: usize = 4096;

/// Handles are at most NFS3_FHSIZE bytes on the wire.
const MAX_FH: usize = 64;

/// Everything one NFS call needs: server state and who is calling.
pub(crate) struct Ctx<'a> {
    pub state: &'a ServerState,
    pub peer: IpAddr,
    pub cred: Credentials,
}

/// A file handle that passed every check: known export, current instance,
/// caller on the allow-list.
#[derive(Clone)]
pub(crate) struct Target {
    pub export: Arc<Export>,
    pub file: FileId,
}

impl Target {
    /// The file as the datastore addresses it.
    pub(crate) fn at(&self) -> FileAt {
        FileAt::new(self.export.id, self.file)
    }
}

/// What a procedure produced, for the counters.
pub(crate) type ProcResult = Result<nfsstat3, Garbage>;

/// Answer one NFS call.
pub(crate) async fn dispatch(state: &ServerState, peer: IpAddr, call: Call) -> Reply {
    let started = Instant::now();
    let ctx = Ctx {
        state,
        peer,
        cred: call.cred,
    };
    let xid = call.xid;
    let proc_num = call.proc_num;
    let mut args = call.args;
    let mut reply = Reply::success(xid);
    let result = match proc_num {
        0 => Ok(nfsstat3::NFS3_OK),
        1 => attr::getattr(&ctx, &mut args, &mut reply).await,
        2 => attr::setattr(&ctx, &mut args, &mut reply).await,
        3 => dirop::lookup(&ctx, &mut args, &mut reply).await,
        4 => attr::access(&ctx, &mut args, &mut reply).await,
        5 => dirop::readlink(&ctx, &mut args, &mut reply).await,
        6 => io::read(&ctx, &mut args, &mut reply).await,
        7 => io::write(&ctx, &mut args, &mut reply).await,
        8 => dirop::create(&ctx, &mut args, &mut reply).await,
        9 => dirop::mkdir(&ctx, &mut args, &mut reply).await,
        10 => dirop::symlink(&ctx, &mut args, &mut reply).await,
        11 => dirop::mknod(&ctx, &mut args, &mut reply).await,
        12 => dirop::remove(&ctx, &mut args, &mut reply).await,
        13 => dirop::rmdir(&ctx, &mut args, &mut reply).await,
        14 => dirop::rename(&ctx, &mut args, &mut reply).await,
        15 => dirop::link(&ctx, &mut args, &mut reply).await,
        16 => readdir::readdir(&ctx, &mut args, &mut reply).await,
        17 => readdir::readdirplus(&ctx, &mut args, &mut reply).await,
        18 => attr::fsstat(&ctx, &mut args, &mut reply).await,
        19 => attr::fsinfo(&ctx, &mut args, &mut reply).await,
        20 => attr::pathconf(&ctx, &mut args, &mut reply).await,
        21 => io::commit(&ctx, &mut args, &mut reply).await,
        _ => {
            state.count_rejected();
            return Reply::accept_error(xid, accept_stat::PROC_UNAVAIL);
        }
    };
    let elapsed = started.elapsed();
    match result {
        Ok(stat) => {
            tracing::debug!(xid, proc = proc_name(proc_num), status = %stat, elapsed_us = elapsed.as_micros() as u64, peer = %peer, "nfs call");
            state
                .metrics
                .record(proc_num, elapsed, stat == nfsstat3::NFS3_OK);
            reply
        }
        Err(Garbage) => {
            tracing::debug!(xid, proc = proc_name(proc_num), peer = %peer, "garbage arguments");
            state.count_rejected();
            Reply::accept_error(xid, accept_stat::GARBAGE_ARGS)
        }
    }
}

fn proc_name(proc_num: u32) -> &'static str {
    super::metrics::PROC_NAMES
        .get(proc_num as usize)
        .copied()
        .unwrap_or("?")
}

impl Ctx<'_> {
    /// Check a handle: format, export, instance, and the caller's address
    /// against the export's allow-list (every call, not only at MOUNT: a
    /// handle can be guessed or passed on).
    pub(crate) fn resolve(&self, fh: &[u8]) -> Result<Target, nfsstat3> {
        let h = FileHandle::decode(fh).map_err(|_| nfsstat3::NFS3ERR_BADHANDLE)?;
        let export = self
            .state
            .backend
            .export(h.export)
            .ok_or(nfsstat3::NFS3ERR_STALE)?;
        if export.instance != h.instance {
            return Err(nfsstat3::NFS3ERR_STALE);
        }
        if !export.allows(self.peer) {
            tracing::debug!(peer = %self.peer, export = %export.path, "client not on allow-list");
            return Err(nfsstat3::NFS3ERR_ACCES);
        }
        Ok(Target {
            export,
            file: h.file,
        })
    }

    /// New objects belong to the caller (AUTH_SYS uid/gid) unless the
    /// client asked for an owner, as a local file system would do.
    pub(crate) fn owned_by_caller(&self, mut attrs: SetAttr) -> SetAttr {
        if let Credentials::Sys { uid, gid } = self.cred {
            attrs.uid.get_or_insert(uid);
            attrs.gid.get_or_insert(gid);
        }
        attrs
    }

    /// Wire handle for `file` in `target`'s export.
    pub(crate) fn handle(&self, target: &Target, file: FileId) -> nfs_fh3 {
        fh_for(&target.export, file)
    }

    /// `fattr3` of an attribute set, with the export as `fsid`.
    pub(crate) fn fattr(&self, target: &Target, attr: &Attr) -> fattr3 {
        fattr(target.export.id, attr)
    }

    /// `post_op_attr` of optional attributes.
    pub(crate) fn post_op(&self, target: &Target, attr: Option<&Attr>) -> post_op_attr {
        match attr {
            Some(a) => post_op_attr::Some(self.fattr(target, a)),
            None => post_op_attr::None,
        }
    }

    /// `wcc_data` without pre-operation attributes (they would cost an
    /// extra backend call on every modifying operation; clients cope).
    pub(crate) fn wcc(&self, target: &Target, after: Option<&Attr>) -> wcc_data {
        wcc_data {
            before: nfs3_types::nfs3::pre_op_attr::None,
            after: self.post_op(target, after),
        }
    }
}

/// Wire handle of `file` in `export`.
pub(crate) fn fh_for(export: &Export, file: FileId) -> nfs_fh3 {
    let h = FileHandle {
        export: export.id,
        instance: export.instance,
        file,
    };
    nfs_fh3 {
        data: Opaque::owned(h.encode().to_vec()),
    }
}

/// Append a failure: the status, then `zero_words` XDR words of "no
/// attributes" (1 for a `post_op_attr`, 2 for a `wcc_data`).
pub(crate) fn fail(reply: &mut Reply, stat: nfsstat3, zero_words: usize) -> ProcResult {
    let body = reply.body();
    body.put_u32(stat as u32);
    for _ in 0..zero_words {
        body.put_u32(0);
    }
    Ok(stat)
}

/// Append `NFS3_OK` and the given result structure.
pub(crate) fn ok<T: nfs3_types::xdr_codec::Pack>(reply: &mut Reply, res: &T) -> ProcResult {
    reply.body().put_u32(nfsstat3::NFS3_OK as u32);
    pack(reply.body(), res);
    Ok(nfsstat3::NFS3_OK)
}

/// Map a backend error and append it as a failure.
pub(crate) fn backend_fail(
    reply: &mut Reply,
    err: &DatastoreError,
    zero_words: usize,
) -> ProcResult {
    fail(reply, nfsstat(err), zero_words)
}

/// Convert backend attributes to the wire form.
pub(crate) fn fattr(fsid: u32, a: &Attr) -> fattr3 {
    let type_ = match a.kind {
        FileKind::Regular => ftype3::NF3REG,
        FileKind::Directory => ftype3::NF3DIR,
        FileKind::Symlink => ftype3::NF3LNK,
    };
    fattr3 {
        type_,
        mode: a.mode & 0o7777,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        size: a.size,
        used: a.used,
        rdev: specdata3::default(),
        fsid: u64::from(fsid),
        fileid: a.fileid,
        atime: to_nfstime(a.atime),
        mtime: to_nfstime(a.mtime),
        ctime: to_nfstime(a.ctime),
    }
}

/// `SystemTime` to `nfstime3`; times before 1970 or after 2106 are clamped.
pub(crate) fn to_nfstime(t: SystemTime) -> nfstime3 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => nfstime3 {
            seconds: u32::try_from(d.as_secs()).unwrap_or(u32::MAX),
            nseconds: d.subsec_nanos(),
        },
        Err(_) => nfstime3::default(),
    }
}

/// Decode an `nfstime3`.
pub(crate) fn read_time(r: &mut XdrReader) -> Result<SystemTime, Garbage> {
    let secs = r.u32()?;
    let nanos = r.u32()?;
    if nanos >= 1_000_000_000 {
        return Err(Garbage);
    }
    Ok(UNIX_EPOCH + Duration::new(u64::from(secs), nanos))
}

/// Decode an `nfs_fh3` (the bytes; checked later by [`Ctx::resolve`]).
pub(crate) fn read_fh(r: &mut XdrReader) -> Result<Bytes, Garbage> {
    r.opaque(MAX_FH)
}

/// Decode `diropargs3`: directory handle and raw name.
pub(crate) fn read_dirop(r: &mut XdrReader) -> Result<(Bytes, Bytes), Garbage> {
    let fh = read_fh(r)?;
    let name = r.opaque(MAX_NAME_WIRE)?;
    Ok((fh, name))
}

/// Decode an `nfspath3` (symlink target).
pub(crate) fn read_path(r: &mut XdrReader) -> Result<Bytes, Garbage> {
    r.opaque(MAX_PATH)
}

/// Decode `sattr3`.
pub(crate) fn read_sattr(r: &mut XdrReader) -> Result<SetAttr, Garbage> {
    let opt_u32 = |r: &mut XdrReader| -> Result<Option<u32>, Garbage> {
        Ok(if r.bool()? { Some(r.u32()?) } else { None })
    };
    let mode = opt_u32(r)?;
    let uid = opt_u32(r)?;
    let gid = opt_u32(r)?;
    let size = if r.bool()? { Some(r.u64()?) } else { None };
    let time = |r: &mut XdrReader| -> Result<SetTime, Garbage> {
        match r.u32()? {
            0 => Ok(SetTime::DontChange),
            1 => Ok(SetTime::ServerTime),
            2 => Ok(SetTime::ClientTime(read_time(r)?)),
            _ => Err(Garbage),
        }
    };
    let atime = time(r)?;
    let mtime = time(r)?;
    Ok(SetAttr {
        mode,
        uid,
        gid,
        size,
        atime,
        mtime,
    })
}

/// How a name is used; `..` is only meaningful for LOOKUP.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum NameUse {
    Lookup,
    Modify,
}

/// Check a name before it reaches the backend.
///
/// Refused: empty or NUL-containing or non-UTF-8 (INVAL), longer than 255
/// bytes (NAMETOOLONG), containing `/` (ACCES: a path, not a name, so an
/// attempt to reach outside the directory), `.` outside LOOKUP (INVAL), and
/// `..` outside LOOKUP or at the export root (ACCES: it would escape).
pub(crate) fn check_name<'n>(
    name: &'n [u8],
    usage: NameUse,
    dir: &Target,
) -> Result<&'n str, nfsstat3> {
    if name.is_empty() || name.contains(&0) {
        return Err(nfsstat3::NFS3ERR_INVAL);
    }
    if name.len() > MAX_NAME {
        return Err(nfsstat3::NFS3ERR_NAMETOOLONG);
    }
    if name.contains(&b'/') {
        return Err(nfsstat3::NFS3ERR_ACCES);
    }
    let name = std::str::from_utf8(name).map_err(|_| nfsstat3::NFS3ERR_INVAL)?;
    match (name, usage) {
        ("..", NameUse::Lookup) if dir.file == dir.export.root => Err(nfsstat3::NFS3ERR_ACCES),
        ("..", NameUse::Modify) => Err(nfsstat3::NFS3ERR_ACCES),
        (".", NameUse::Modify) => Err(nfsstat3::NFS3ERR_INVAL),
        _ => Ok(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(file: FileId) -> Target {
        Target {
            export: Arc::new(Export {
                id: 1,
                instance: 1,
                path: "/x".into(),
                root: 1,
                allowed_clients: vec![],
            }),
            file,
        }
    }

    #[test]
    fn names_are_checked() {
        let root = target(1);
        let sub = target(2);
        assert_eq!(check_name(b"a.vmdk", NameUse::Modify, &root), Ok("a.vmdk"));
        assert_eq!(
            check_name(b"", NameUse::Lookup, &root),
            Err(nfsstat3::NFS3ERR_INVAL)
        );
        assert_eq!(
            check_name(b"a/b", NameUse::Lookup, &sub),
            Err(nfsstat3::NFS3ERR_ACCES)
        );
        assert_eq!(
            check_name(b"..", NameUse::Lookup, &root),
            Err(nfsstat3::NFS3ERR_ACCES)
        );
        assert_eq!(check_name(b"..", NameUse::Lookup, &sub), Ok(".."));
        assert_eq!(
            check_name(b"..", NameUse::Modify, &sub),
            Err(nfsstat3::NFS3ERR_ACCES)
        );
        assert_eq!(
            check_name(b".", NameUse::Modify, &sub),
            Err(nfsstat3::NFS3ERR_INVAL)
        );
        assert_eq!(
            check_name(b"a\0", NameUse::Modify, &sub),
            Err(nfsstat3::NFS3ERR_INVAL)
        );
        assert_eq!(
            check_name(&[0xff], NameUse::Modify, &sub),
            Err(nfsstat3::NFS3ERR_INVAL)
        );
        let long = vec![b'a'; 256];
        assert_eq!(
            check_name(&long, NameUse::Modify, &sub),
            Err(nfsstat3::NFS3ERR_NAMETOOLONG)
        );
    }

    #[test]
    fn sattr3_decodes() {
        use bytes::BytesMut;
        let mut b = BytesMut::new();
        for v in [1u32, 0o600, 0, 1, 7, 1] {
            b.put_u32(v);
        }
        b.put_u64(4096);
        b.put_u32(1); // atime: server
        b.put_u32(2); // mtime: client
        b.put_u32(10);
        b.put_u32(20);
        let s = read_sattr(&mut XdrReader::new(b.freeze())).expect("decode");
        assert_eq!(s.mode, Some(0o600));
        assert_eq!(s.uid, None);
        assert_eq!(s.gid, Some(7));
        assert_eq!(s.size, Some(4096));
        assert_eq!(s.atime, SetTime::ServerTime);
        assert_eq!(
            s.mtime,
            SetTime::ClientTime(UNIX_EPOCH + Duration::new(10, 20))
        );
    }
}
