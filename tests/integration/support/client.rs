//! NFS client helpers shared by the protocol tests (`nfs_proto`) and the
//! datastore tests: the `nfs3_client` crate with explicit ports, test data,
//! and external tools run with a timeout.

use std::time::Duration;

use nfs3_client::nfs3_types::nfs3::{
    self, diropargs3, filename3, nfs_fh3, nfsstat3, stable_how, Nfs3Result,
};
use nfs3_client::nfs3_types::rpc::{auth_unix, opaque_auth};
use nfs3_client::nfs3_types::xdr_codec::Opaque;
use nfs3_client::tokio::{TokioConnector, TokioIo};
use nfs3_client::{Nfs3Client, Nfs3Connection, Nfs3ConnectionBuilder};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;

/// A mounted `nfs3_client` connection.
pub type Conn = Nfs3Connection<TokioIo<TcpStream>>;
/// An NFS client on one TCP connection, without MOUNT.
pub type Client = Nfs3Client<TokioIo<TcpStream>>;

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// SHA-256 of bytes.
pub fn sha256(data: &[u8]) -> Vec<u8> {
    Sha256::digest(data).to_vec()
}

/// AUTH_SYS root, as ESXi calls.
pub fn root_cred() -> opaque_auth<'static> {
    opaque_auth::auth_unix(&auth_unix {
        stamp: 1,
        machinename: Opaque::borrowed(b"test"),
        uid: 0,
        gid: 0,
        gids: vec![],
    })
}

/// MOUNT `path` on 127.0.0.1 with explicit NFS and MOUNT ports.
pub async fn mount_at(
    nfs_port: u16,
    mount_port: u16,
    path: &str,
) -> Result<Conn, nfs3_client::ConnectError> {
    Nfs3ConnectionBuilder::new(TokioConnector, "127.0.0.1", path)
        .mount_port(mount_port)
        .nfs3_port(nfs_port)
        .connect_from_privileged_port(false)
        .credential(root_cred())
        .mount()
        .await
}

/// An NFS client connected to 127.0.0.1:`nfs_port`, without MOUNT (a client
/// that already holds handles).
pub async fn client_at(nfs_port: u16) -> Client {
    let stream = TcpStream::connect(("127.0.0.1", nfs_port))
        .await
        .expect("connect");
    Nfs3Client::new_with_auth(TokioIo::new(stream), root_cred(), opaque_auth::default())
}

/// `diropargs3` for `name` in `dir`.
pub fn dirop(dir: &nfs_fh3, name: &str) -> diropargs3<'static> {
    diropargs3 {
        dir: dir.clone(),
        name: filename3(Opaque::owned(name.as_bytes().to_vec())),
    }
}

/// LOOKUP, as a handle or the status.
pub async fn lookup(c: &mut Client, dir: &nfs_fh3, name: &str) -> Result<nfs_fh3, nfsstat3> {
    match c
        .lookup(&nfs3::LOOKUP3args {
            what: dirop(dir, name),
        })
        .await
        .expect("lookup rpc")
    {
        Nfs3Result::Ok(ok) => Ok(ok.object),
        Nfs3Result::Err((stat, _)) => Err(stat),
    }
}

/// GETATTR, as attributes or the status.
pub async fn getattr(c: &mut Client, fh: &nfs_fh3) -> Result<nfs3::fattr3, nfsstat3> {
    match c
        .getattr(&nfs3::GETATTR3args { object: fh.clone() })
        .await
        .expect("getattr rpc")
    {
        Nfs3Result::Ok(ok) => Ok(ok.obj_attributes),
        Nfs3Result::Err((stat, _)) => Err(stat),
    }
}

/// READ of up to `count` bytes (one call), as bytes or the status.
pub async fn read(
    c: &mut Client,
    fh: &nfs_fh3,
    offset: u64,
    count: u32,
) -> Result<Vec<u8>, nfsstat3> {
    match c
        .read(&nfs3::READ3args {
            file: fh.clone(),
            offset,
            count,
        })
        .await
        .expect("read rpc")
    {
        Nfs3Result::Ok(ok) => Ok(ok.data.to_vec()),
        Nfs3Result::Err((stat, _)) => Err(stat),
    }
}

/// READ of exactly `len` bytes at `offset` in calls of at most 1 MiB
/// (shorter only at end of file).
pub async fn read_all(
    c: &mut Client,
    fh: &nfs_fh3,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, nfsstat3> {
    let mut out = Vec::with_capacity(len as usize);
    while (out.len() as u64) < len {
        let want = (len - out.len() as u64).min(1 << 20) as u32;
        let got = read(c, fh, offset + out.len() as u64, want).await?;
        if got.is_empty() {
            break;
        }
        out.extend_from_slice(&got);
    }
    Ok(out)
}

/// WRITE with the given stability; panics unless the server takes every byte
/// at least as durably as asked.
pub async fn write(c: &mut Client, fh: &nfs_fh3, offset: u64, data: &[u8], stable: stable_how) {
    let res = c
        .write(&nfs3::WRITE3args {
            file: fh.clone(),
            offset,
            count: data.len() as u32,
            stable,
            data: Opaque::borrowed(data),
        })
        .await
        .expect("write rpc");
    match res {
        Nfs3Result::Ok(ok) => {
            assert_eq!(ok.count as usize, data.len(), "short write");
            assert!(ok.committed as u32 >= stable as u32, "weaker stability");
        }
        Nfs3Result::Err((stat, _)) => panic!("write at {offset}: {stat:?}"),
    }
}

/// Every name in a folder (READDIRPLUS, all pages), with its file id and size.
pub async fn list(c: &mut Client, dir: &nfs_fh3) -> Vec<(String, u64, u64)> {
    let (mut out, mut cookie) = (Vec::new(), 0);
    loop {
        let res = c
            .readdirplus(&nfs3::READDIRPLUS3args {
                dir: dir.clone(),
                cookie,
                cookieverf: nfs3::cookieverf3::default(),
                dircount: 8192,
                maxcount: 32768,
            })
            .await
            .expect("readdirplus rpc")
            .unwrap();
        for e in &res.reply.entries.0 {
            let name = String::from_utf8(e.name.0.to_vec()).expect("utf8");
            let size = match &e.name_attributes {
                nfs3::Nfs3Option::Some(a) => a.size,
                nfs3::Nfs3Option::None => u64::MAX,
            };
            if name != "." && name != ".." {
                out.push((name, e.fileid, size));
            }
            cookie = e.cookie;
        }
        if res.reply.eof {
            break;
        }
    }
    out.sort();
    out
}

/// Runs an external tool, failing the test if it takes over a minute.
pub async fn run_tool(cmd: &str, args: &[&str]) -> std::process::Output {
    run_tool_for(cmd, args, Duration::from_secs(60)).await
}

/// Runs an external tool, failing the test if it takes over `limit`.
pub async fn run_tool_for(cmd: &str, args: &[&str], limit: Duration) -> std::process::Output {
    let fut = tokio::process::Command::new(cmd)
        .args(args)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("{cmd} {args:?} timed out"))
        .unwrap_or_else(|e| panic!("{cmd} failed to start: {e}"))
}

/// CREATE (GUARDED), as the new file's handle or the status.
pub async fn create(c: &mut Client, dir: &nfs_fh3, name: &str) -> Result<nfs_fh3, nfsstat3> {
    let res = c
        .create(&nfs3::CREATE3args {
            where_: dirop(dir, name),
            how: nfs3::createhow3::GUARDED(nfs3::sattr3::default()),
        })
        .await
        .expect("create rpc");
    match res {
        Nfs3Result::Ok(ok) => match ok.obj {
            nfs3::Nfs3Option::Some(fh) => Ok(fh),
            nfs3::Nfs3Option::None => lookup(c, dir, name).await,
        },
        Nfs3Result::Err((stat, _)) => Err(stat),
    }
}

/// MKDIR, as the new folder's handle or the status.
pub async fn mkdir(c: &mut Client, dir: &nfs_fh3, name: &str) -> Result<nfs_fh3, nfsstat3> {
    let res = c
        .mkdir(&nfs3::MKDIR3args {
            where_: dirop(dir, name),
            attributes: nfs3::sattr3::default(),
        })
        .await
        .expect("mkdir rpc");
    match res {
        Nfs3Result::Ok(ok) => match ok.obj {
            nfs3::Nfs3Option::Some(fh) => Ok(fh),
            nfs3::Nfs3Option::None => lookup(c, dir, name).await,
        },
        Nfs3Result::Err((stat, _)) => Err(stat),
    }
}

/// REMOVE, as the status.
pub async fn remove(c: &mut Client, dir: &nfs_fh3, name: &str) -> Result<(), nfsstat3> {
    match c
        .remove(&nfs3::REMOVE3args {
            object: dirop(dir, name),
        })
        .await
        .expect("remove rpc")
    {
        Nfs3Result::Ok(_) => Ok(()),
        Nfs3Result::Err((stat, _)) => Err(stat),
    }
}

/// RMDIR, as the status.
pub async fn rmdir(c: &mut Client, dir: &nfs_fh3, name: &str) -> Result<(), nfsstat3> {
    match c
        .rmdir(&nfs3::RMDIR3args {
            object: dirop(dir, name),
        })
        .await
        .expect("rmdir rpc")
    {
        Nfs3Result::Ok(_) => Ok(()),
        Nfs3Result::Err((stat, _)) => Err(stat),
    }
}

/// RENAME, as the status.
pub async fn rename(
    c: &mut Client,
    from_dir: &nfs_fh3,
    from: &str,
    to_dir: &nfs_fh3,
    to: &str,
) -> Result<(), nfsstat3> {
    match c
        .rename(&nfs3::RENAME3args {
            from: dirop(from_dir, from),
            to: dirop(to_dir, to),
        })
        .await
        .expect("rename rpc")
    {
        Nfs3Result::Ok(_) => Ok(()),
        Nfs3Result::Err((stat, _)) => Err(stat),
    }
}

/// SETATTR of the size only (truncate or extend), as the new size or the status.
pub async fn set_size(c: &mut Client, fh: &nfs_fh3, size: u64) -> Result<u64, nfsstat3> {
    match c
        .setattr(&nfs3::SETATTR3args {
            object: fh.clone(),
            new_attributes: nfs3::sattr3 {
                size: nfs3::Nfs3Option::Some(size),
                ..Default::default()
            },
            guard: nfs3::Nfs3Option::None,
        })
        .await
        .expect("setattr rpc")
    {
        Nfs3Result::Ok(ok) => match ok.obj_wcc.after {
            nfs3::Nfs3Option::Some(a) => Ok(a.size),
            nfs3::Nfs3Option::None => Ok(getattr(c, fh).await?.size),
        },
        Nfs3Result::Err((stat, _)) => Err(stat),
    }
}

/// COMMIT of the whole file; panics on failure.
pub async fn commit(c: &mut Client, fh: &nfs_fh3) {
    let res = c
        .commit(&nfs3::COMMIT3args {
            file: fh.clone(),
            offset: 0,
            count: 0,
        })
        .await
        .expect("commit rpc");
    assert!(matches!(res, Nfs3Result::Ok(_)), "commit: {res:?}");
}
