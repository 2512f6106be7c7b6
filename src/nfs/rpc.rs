//! ONC RPC (RFC 5531) over TCP and UDP: call headers, credentials and
//! reply headers (record marking is `record.rs`).
//!
//! # Call header
//!
//! ```text
//! xid | msg_type=CALL(0) | rpcvers=2 | prog | vers | proc
//!     | cred (flavor, opaque<400>) | verf (flavor, opaque<400>) | args...
//! ```
//!
//! # Accepted reply header
//!
//! ```text
//! xid | msg_type=REPLY(1) | MSG_ACCEPTED(0) | verf AUTH_NONE(0, len 0) | accept_stat | results...
//! ```
use bytes::{BufMut, Bytes, BytesMut};
use nfs3_types::rpc::{accept_stat, auth_stat};

use super::record::LAST_FRAGMENT;
use super::xdr::{Garbage, XdrReader};

/// Limit of a credential or verifier body (RFC 5531 `opaque body<400>`).
const MAX_AUTH: usize = 400;

/// Credentials of a call. revive trusts AUTH_SYS as sent (ESXi mounts as
/// root and needs no root squash); access control is by client address.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Credentials {
    /// AUTH_NONE.
    #[default]
    None,
    /// AUTH_SYS (AUTH_UNIX).
    Sys {
        /// Caller's user id.
        uid: u32,
        /// Caller's primary group.
        gid: u32,
    },
}

/// A parsed call header plus its undecoded arguments.
#[derive(Debug)]
pub struct Call {
    /// Transaction id, echoed in the reply.
    pub xid: u32,
    /// Program number (100000 portmap, 100003 NFS, 100005 MOUNT).
    pub prog: u32,
    /// Program version.
    pub vers: u32,
    /// Procedure number.
    pub proc_num: u32,
    /// Who the caller claims to be.
    pub cred: Credentials,
    /// The procedure's arguments.
    pub args: XdrReader,
}

/// A call header that cannot be served; each variant says what to answer.
#[derive(Debug, PartialEq, Eq)]
pub enum CallError {
    /// Not even an xid, or a REPLY sent to us: nothing to answer, drop it.
    Ignore,
    /// RPC version other than 2: `MSG_DENIED / RPC_MISMATCH`.
    RpcMismatch(u32),
    /// Credentials we do not accept: `MSG_DENIED / AUTH_ERROR`.
    Auth(u32, auth_stat),
    /// The header is cut short or malformed: `GARBAGE_ARGS`.
    Garbage(u32),
}

impl Call {
    /// Parse the header of a received record.
    ///
    /// # Errors
    /// See [`CallError`] for what each failure is answered with.
    pub fn parse(record: Bytes) -> Result<Self, CallError> {
        let mut r = XdrReader::new(record);
        let xid = r.u32().map_err(|_| CallError::Ignore)?;
        if r.u32() != Ok(0) {
            return Err(CallError::Ignore);
        }
        let garbage = |_: Garbage| CallError::Garbage(xid);
        if r.u32().map_err(garbage)? != 2 {
            return Err(CallError::RpcMismatch(xid));
        }
        let prog = r.u32().map_err(garbage)?;
        let vers = r.u32().map_err(garbage)?;
        let proc_num = r.u32().map_err(garbage)?;
        let cred_flavor = r.u32().map_err(garbage)?;
        let cred_body = r.opaque(MAX_AUTH).map_err(garbage)?;
        let _verf_flavor = r.u32().map_err(garbage)?;
        r.skip_opaque(MAX_AUTH).map_err(garbage)?;
        let cred = match cred_flavor {
            0 => Credentials::None,
            1 => parse_auth_sys(cred_body)
                .map_err(|_| CallError::Auth(xid, auth_stat::AUTH_BADCRED))?,
            _ => return Err(CallError::Auth(xid, auth_stat::AUTH_REJECTEDCRED)),
        };
        Ok(Self {
            xid,
            prog,
            vers,
            proc_num,
            cred,
            args: r,
        })
    }
}

/// `authsys_parms`: stamp, machinename<255>, uid, gid, gids<16>.
fn parse_auth_sys(body: Bytes) -> Result<Credentials, Garbage> {
    let mut r = XdrReader::new(body);
    let _stamp = r.u32()?;
    r.skip_opaque(255)?;
    let uid = r.u32()?;
    let gid = r.u32()?;
    let ngids = r.u32()?;
    if ngids > 16 {
        return Err(Garbage);
    }
    for _ in 0..ngids {
        r.u32()?;
    }
    Ok(Credentials::Sys { uid, gid })
}

static ZEROS: [u8; 3] = [0; 3];

/// A reply being built: header and small results in `head`, bulk READ data
/// in `tail` so it is sent from the backend's buffer without a copy.
#[derive(Debug)]
pub struct Reply {
    /// Starts with 4 bytes reserved for the record mark.
    head: BytesMut,
    tail: Bytes,
}

impl Reply {
    fn header(xid: u32, capacity: usize) -> BytesMut {
        let mut head = BytesMut::with_capacity(capacity);
        head.put_u32(0); // record mark, filled in by `into_record`
        head.put_u32(xid);
        head.put_u32(1); // REPLY
        head
    }

    fn accepted(xid: u32, stat: accept_stat) -> BytesMut {
        let mut head = Self::header(xid, 256);
        head.put_u32(0); // MSG_ACCEPTED
        head.put_u32(0); // verifier: AUTH_NONE
        head.put_u32(0); // with an empty body
        head.put_u32(stat as u32);
        head
    }

    /// An accepted, successful reply; append the results with [`Self::body`].
    pub fn success(xid: u32) -> Self {
        Self {
            head: Self::accepted(xid, accept_stat::SUCCESS),
            tail: Bytes::new(),
        }
    }

    /// An accepted reply that carries only an error status
    /// (`PROG_UNAVAIL`, `PROC_UNAVAIL`, `GARBAGE_ARGS`, `SYSTEM_ERR`).
    pub fn accept_error(xid: u32, stat: accept_stat) -> Self {
        Self {
            head: Self::accepted(xid, stat),
            tail: Bytes::new(),
        }
    }

    /// `PROG_MISMATCH`: the program exists in versions `low..=high` only.
    pub fn prog_mismatch(xid: u32, low: u32, high: u32) -> Self {
        let mut head = Self::accepted(xid, accept_stat::PROG_MISMATCH);
        head.put_u32(low);
        head.put_u32(high);
        Self {
            head,
            tail: Bytes::new(),
        }
    }

    /// `MSG_DENIED / RPC_MISMATCH`: only RPC version 2 is spoken.
    pub fn rpc_mismatch(xid: u32) -> Self {
        let mut head = Self::header(xid, 32);
        head.put_u32(1); // MSG_DENIED
        head.put_u32(0); // RPC_MISMATCH
        head.put_u32(2);
        head.put_u32(2);
        Self {
            head,
            tail: Bytes::new(),
        }
    }

    /// `MSG_DENIED / AUTH_ERROR`.
    pub fn auth_error(xid: u32, stat: auth_stat) -> Self {
        let mut head = Self::header(xid, 32);
        head.put_u32(1); // MSG_DENIED
        head.put_u32(1); // AUTH_ERROR
        head.put_u32(stat as u32);
        Self {
            head,
            tail: Bytes::new(),
        }
    }

    /// The reply for a header that failed to parse, if any is due.
    pub fn for_call_error(err: &CallError) -> Option<Self> {
        match *err {
            CallError::Ignore => None,
            CallError::RpcMismatch(xid) => Some(Self::rpc_mismatch(xid)),
            CallError::Auth(xid, stat) => Some(Self::auth_error(xid, stat)),
            CallError::Garbage(xid) => Some(Self::accept_error(xid, accept_stat::GARBAGE_ARGS)),
        }
    }

    /// Where procedure results are appended.
    pub fn body(&mut self) -> &mut BytesMut {
        &mut self.head
    }

    /// Set bulk data sent after the body (already preceded in the body by
    /// its XDR length); XDR padding is added when sending.
    pub fn set_tail(&mut self, data: Bytes) {
        self.tail = data;
    }

    /// Record-marked pieces to write on a TCP stream, in order.
    pub fn into_record(mut self) -> [Bytes; 3] {
        let pad = super::xdr::pad4(self.tail.len()) - self.tail.len();
        let len = self.head.len() - 4 + self.tail.len() + pad;
        let mark = LAST_FRAGMENT | len as u32;
        self.head[..4].copy_from_slice(&mark.to_be_bytes());
        [
            self.head.freeze(),
            self.tail,
            Bytes::from_static(&ZEROS[..pad]),
        ]
    }

    /// One UDP datagram (no record mark).
    pub fn into_datagram(self) -> Vec<u8> {
        let pad = super::xdr::pad4(self.tail.len()) - self.tail.len();
        let mut out = Vec::with_capacity(self.head.len() + self.tail.len() + pad);
        out.extend_from_slice(&self.head[4..]);
        out.extend_from_slice(&self.tail);
        out.extend_from_slice(&ZEROS[..pad]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call_bytes(rpcvers: u32, cred_flavor: u32, cred: &[u8]) -> Bytes {
        let mut b = BytesMut::new();
        for v in [
            0x1234u32,
            0,
            rpcvers,
            100_003,
            3,
            1,
            cred_flavor,
            cred.len() as u32,
        ] {
            b.put_u32(v);
        }
        b.put_slice(cred);
        b.put_bytes(0, super::super::xdr::pad4(cred.len()) - cred.len());
        b.put_u32(0);
        b.put_u32(0);
        b.put_u32(0xdead_beef); // first argument
        b.freeze()
    }

    fn auth_sys(uid: u32, gids: u32) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_u32(1); // stamp
        b.put_u32(4);
        b.put_slice(b"host");
        b.put_u32(uid);
        b.put_u32(uid);
        b.put_u32(gids);
        for g in 0..gids.min(20) {
            b.put_u32(g);
        }
        b.to_vec()
    }

    #[test]
    fn parses_auth_sys_call() {
        let call = Call::parse(call_bytes(2, 1, &auth_sys(0, 2))).expect("parse");
        assert_eq!(
            (call.xid, call.prog, call.vers, call.proc_num),
            (0x1234, 100_003, 3, 1)
        );
        assert_eq!(call.cred, Credentials::Sys { uid: 0, gid: 0 });
        let mut args = call.args;
        assert_eq!(args.u32(), Ok(0xdead_beef));
    }

    #[test]
    fn header_errors_map_to_replies() {
        assert_eq!(
            Call::parse(call_bytes(3, 0, &[])).err(),
            Some(CallError::RpcMismatch(0x1234))
        );
        assert_eq!(
            Call::parse(call_bytes(2, 1, &auth_sys(0, 17))).err(),
            Some(CallError::Auth(0x1234, auth_stat::AUTH_BADCRED))
        );
        assert_eq!(
            Call::parse(call_bytes(2, 6, &[])).err(),
            Some(CallError::Auth(0x1234, auth_stat::AUTH_REJECTEDCRED))
        );
        let full = call_bytes(2, 0, &[]);
        assert_eq!(
            Call::parse(full.slice(..14)).err(),
            Some(CallError::Garbage(0x1234))
        );
        assert_eq!(Call::parse(full.slice(..2)).err(), Some(CallError::Ignore));
    }

    #[test]
    fn reply_record_mark_and_padding() {
        let mut r = Reply::success(9);
        r.body().put_u32(5);
        r.set_tail(Bytes::from_static(b"hello"));
        let [head, tail, pad] = r.into_record();
        let mark = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
        assert_eq!(mark & LAST_FRAGMENT, LAST_FRAGMENT);
        assert_eq!((mark & !LAST_FRAGMENT) as usize, head.len() - 4 + 5 + 3);
        assert_eq!(&head[4..8], &9u32.to_be_bytes());
        assert_eq!(&tail[..], b"hello");
        assert_eq!(pad.len(), 3);
    }
}
