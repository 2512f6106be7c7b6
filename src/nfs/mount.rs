//! MOUNT protocol version 3 (RFC 1813 appendix I, program 100005): how a
//! client turns an export path into the root file handle.
//!
//! MNT is where the export allow-list is first applied (`MNT3ERR_ACCES`);
//! it is applied again on every NFS call, since a handle can outlive a
//! mount or be guessed. The mount list (DUMP) is informational only, as in
//! every NFS server: nothing depends on it.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::{BufMut, Bytes};
use nfs3_types::mount::{
    dirpath, export_node, fhandle3, mountbody, mountres3, mountres3_ok, mountstat3, name,
};
use nfs3_types::rpc::accept_stat;
use nfs3_types::xdr_codec::{List, Opaque};

use super::proc::fh_for;
use super::rpc::{Call, Reply};
use super::server::ServerState;
use super::xdr::{pack, Garbage, XdrReader};
use crate::datastore::{DatastoreError, Export, FileAt, FileId, FileKind};

/// MOUNT program number.
pub const PROGRAM: u32 = 100_005;
/// The only MOUNT version served.
pub const VERSION: u32 = 3;

/// Longest export path accepted (MNTPATHLEN).
const MAX_PATH: usize = 1024;

/// AUTH_SYS and AUTH_NONE, the flavors offered at MNT (AUTH_SYS first:
/// ESXi and Linux pick the first they support).
const AUTH_FLAVORS: [u32; 2] = [1, 0];

/// Answer one MOUNT call from `peer`.
pub(crate) async fn dispatch(state: &ServerState, peer: IpAddr, call: Call) -> Reply {
    state.count_mount();
    tracing::debug!(xid = call.xid, proc_num = call.proc_num, peer = %peer, "mount call");
    if call.vers != VERSION {
        return Reply::prog_mismatch(call.xid, VERSION, VERSION);
    }
    let xid = call.xid;
    let mut args = call.args;
    let mut reply = Reply::success(xid);
    let result = match call.proc_num {
        0 => Ok(()),
        1 => mnt(state, peer, &mut args, &mut reply).await,
        2 => {
            dump(state, &mut reply);
            Ok(())
        }
        3 => read_path(&mut args).map(|path| state.forget_mount(peer, Some(&path))),
        4 => {
            state.forget_mount(peer, None);
            Ok(())
        }
        5 => {
            export(state, &mut reply);
            Ok(())
        }
        _ => {
            state.count_rejected();
            return Reply::accept_error(xid, accept_stat::PROC_UNAVAIL);
        }
    };
    match result {
        Ok(()) => reply,
        Err(Garbage) => {
            state.count_rejected();
            Reply::accept_error(xid, accept_stat::GARBAGE_ARGS)
        }
    }
}

fn read_path(args: &mut XdrReader) -> Result<String, Garbage> {
    let raw: Bytes = args.opaque(MAX_PATH)?;
    String::from_utf8(raw.to_vec()).map_err(|_| Garbage)
}

/// Export paths compare without trailing slashes (`/revive/` = `/revive`).
fn normalize(path: &str) -> &str {
    let p = path.trim_end_matches('/');
    if p.is_empty() {
        "/"
    } else {
        p
    }
}

/// The export `path` names and the rest of the path below it. The longest
/// matching export wins (`/a/b` over `/a`).
fn find_export<'p>(state: &ServerState, wanted: &'p str) -> Option<(Arc<Export>, &'p str)> {
    let mut best: Option<(Arc<Export>, &str)> = None;
    for e in state.backend.exports() {
        let base = normalize(&e.path);
        let rest = if wanted == base {
            Some("")
        } else if base == "/" {
            wanted.strip_prefix('/')
        } else {
            wanted.strip_prefix(base).and_then(|r| r.strip_prefix('/'))
        };
        if let Some(rest) = rest {
            if best
                .as_ref()
                .is_none_or(|(b, _)| b.path.len() < e.path.len())
            {
                best = Some((e, rest));
            }
        }
    }
    best
}

/// Walk `rest` below the export root (`/revive/vm1`: clients such as libnfs
/// mount a file's parent directory). `.`, `..` and over-long components are
/// refused, so the walk never leaves the export.
async fn walk(state: &ServerState, export: &Export, rest: &str) -> Result<FileId, mountstat3> {
    let mut dir = export.root;
    for component in rest.split('/').filter(|c| !c.is_empty()) {
        if component == "." || component == ".." || component.len() > super::proc::MAX_NAME {
            return Err(mountstat3::MNT3ERR_INVAL);
        }
        let attr = state
            .backend
            .lookup(&FileAt::new(export.id, dir).child(component))
            .await
            .map_err(|e| match e {
                DatastoreError::NotFound => mountstat3::MNT3ERR_NOENT,
                DatastoreError::NotDir => mountstat3::MNT3ERR_NOTDIR,
                DatastoreError::Access => mountstat3::MNT3ERR_ACCES,
                _ => mountstat3::MNT3ERR_IO,
            })?;
        if attr.kind != FileKind::Directory {
            return Err(mountstat3::MNT3ERR_NOTDIR);
        }
        dir = attr.fileid;
    }
    Ok(dir)
}

async fn mnt(
    state: &ServerState,
    peer: IpAddr,
    args: &mut XdrReader,
    reply: &mut Reply,
) -> Result<(), Garbage> {
    let path = read_path(args)?;
    let res = match find_export(state, normalize(&path)) {
        None => {
            tracing::info!(peer = %peer, path = %path, "mount refused: no such export");
            mountres3::Err(mountstat3::MNT3ERR_NOENT)
        }
        // The allow-list comes first: a refused client learns nothing of
        // what lies below the export.
        Some((e, _)) if !e.allows(peer) => {
            tracing::warn!(peer = %peer, export = %e.path, "mount refused: client not on allow-list");
            mountres3::Err(mountstat3::MNT3ERR_ACCES)
        }
        Some((e, rest)) => match walk(state, &e, rest).await {
            Ok(dir) => {
                tracing::info!(peer = %peer, export = %e.path, path = %path, "mounted");
                state.remember_mount(peer, &path);
                let fh = fh_for(&e, dir);
                mountres3::Ok(mountres3_ok {
                    fhandle: fhandle3(fh.data),
                    auth_flavors: AUTH_FLAVORS.to_vec(),
                })
            }
            Err(stat) => {
                tracing::info!(peer = %peer, path = %path, status = %stat, "mount refused");
                mountres3::Err(stat)
            }
        },
    };
    pack(reply.body(), &res);
    Ok(())
}

fn dump(state: &ServerState, reply: &mut Reply) {
    let mounts = state.mounts();
    let list: List<mountbody<'_, '_>> = List(
        mounts
            .iter()
            .map(|(host, dir)| mountbody {
                ml_hostname: name(Opaque::owned(host.to_string().into_bytes())),
                ml_directory: dirpath(Opaque::borrowed(dir.as_bytes())),
            })
            .collect(),
    );
    pack(reply.body(), &list);
}

fn export(state: &ServerState, reply: &mut Reply) {
    let exports = state.backend.exports();
    let body = reply.body();
    for e in &exports {
        let node = export_node {
            ex_dir: dirpath(Opaque::borrowed(e.path.as_bytes())),
            ex_groups: List(
                e.allowed_clients
                    .iter()
                    .map(|a| name(Opaque::owned(a.to_string().into_bytes())))
                    .collect(),
            ),
        };
        body.put_u32(1);
        pack(body, &node);
    }
    body.put_u32(0);
}

#[cfg(test)]
mod tests {
    use super::normalize;

    #[test]
    fn paths_normalize() {
        assert_eq!(normalize("/revive/"), "/revive");
        assert_eq!(normalize("/revive"), "/revive");
        assert_eq!(normalize("/"), "/");
        assert_eq!(normalize(""), "/");
    }
}
