//! ONC RPC (RFC 5531) over TCP and UDP: record marking, call headers,
//! credentials and reply headers.
//!
//! # Record marking (TCP)
//!
//! ```text
//! +--------------------------------+----------------------+
//! | last:1 | fragment length:31    | fragment bytes ...   |  repeated until last = 1
//! +--------------------------------+----------------------+
//! ```
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

use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use nfs3_types::rpc::{accept_stat, auth_stat};
use tokio::io::{AsyncRead, AsyncReadExt};

use super::xdr::{Garbage, XdrReader};

/// Largest record accepted: a 1 MiB WRITE (wtmax) plus headers fits many
/// times over, while a garbage length cannot make us buffer gigabytes.
pub const MAX_RECORD: usize = 4 * 1024 * 1024 + 64 * 1024;

/// How much to read from the socket at a time when nothing bigger is known
/// to be coming: many small calls (4 KiB READs at queue depth 16) arrive in
/// one read.
const READ_CHUNK: usize = 64 * 1024;

/// Limit of a credential or verifier body (RFC 5531 `opaque body<400>`).
const MAX_AUTH: usize = 400;

const LAST_FRAGMENT: u32 = 0x8000_0000;

/// Why a connection's byte stream cannot go on; the connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket failed or closed in the middle of a record.
    #[error("reading record: {0}")]
    Io(#[from] std::io::Error),
    /// A record grew beyond the reader's limit ([`MAX_RECORD`] by default).
    #[error("record of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// No byte of a new record arrived within the idle timeout.
    #[error("idle")]
    Idle,
    /// A record's bytes stopped coming before it was whole.
    #[error("record not sent whole in time")]
    Stalled,
}

/// Splits a TCP byte stream into RPC records.
///
/// Memory follows what arrives, never what a record marker claims: the
/// buffer grows at most by what is already buffered (from 64 KiB), so a
/// peer that claims 4 MiB and sends a few bytes holds 64 KiB.
pub struct RecordReader<R> {
    inner: R,
    buf: BytesMut,
    /// Fragments of a record that spans several (rare: clients send one).
    partial: Option<BytesMut>,
    /// Largest record accepted.
    max_record: usize,
    /// When the first buffered byte of the record being received arrived.
    started: Option<Instant>,
}

impl<R: AsyncRead + Unpin> RecordReader<R> {
    /// True when bytes of a further record are already buffered.
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty() || self.partial.is_some()
    }

    /// Read records from `inner`, up to [`MAX_RECORD`] bytes each.
    pub fn new(inner: R) -> Self {
        Self::with_limit(inner, MAX_RECORD)
    }

    /// Read records of at most `max_record` bytes from `inner`.
    pub fn with_limit(inner: R, max_record: usize) -> Self {
        Self {
            inner,
            buf: BytesMut::new(),
            partial: None,
            max_record,
            started: None,
        }
    }

    /// The next complete record; `None` at a clean end of stream.
    ///
    /// # Errors
    /// End of stream inside a record, a socket error, or an oversized record.
    pub async fn next_record(&mut self) -> Result<Option<Bytes>, FrameError> {
        self.next_record_within(None, None).await
    }

    /// The next complete record, waiting at most `idle` for its first byte
    /// and at most `record` from its first byte to its last (no limit for
    /// `None`). Cancel-safe: bytes read stay buffered.
    ///
    /// # Errors
    /// As [`RecordReader::next_record`], plus [`FrameError::Idle`] and
    /// [`FrameError::Stalled`] when a wait runs out.
    pub async fn next_record_within(
        &mut self,
        idle: Option<Duration>,
        record: Option<Duration>,
    ) -> Result<Option<Bytes>, FrameError> {
        loop {
            let mut need = 4;
            if self.buf.len() >= 4 {
                let mark = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
                let len = (mark & !LAST_FRAGMENT) as usize;
                let so_far = self.partial.as_ref().map_or(0, BytesMut::len);
                if so_far + len > self.max_record {
                    return Err(FrameError::TooLarge(so_far + len));
                }
                need = 4 + len;
                if self.buf.len() >= need {
                    let mut frag = self.buf.split_to(need);
                    let _ = frag.split_to(4);
                    let last = mark & LAST_FRAGMENT != 0;
                    let whole = match (self.partial.take(), last) {
                        (None, true) => Some(frag.freeze()),
                        (None, false) => {
                            self.partial = Some(frag);
                            None
                        }
                        (Some(mut p), last) => {
                            p.extend_from_slice(&frag);
                            if last {
                                Some(p.freeze())
                            } else {
                                self.partial = Some(p);
                                None
                            }
                        }
                    };
                    if let Some(record) = whole {
                        // Bytes of the next record may be buffered already:
                        // its time starts now.
                        self.started = (!self.buf.is_empty()).then(Instant::now);
                        return Ok(Some(record));
                    }
                    continue;
                }
            }
            // Room for READ_CHUNK at least (many small calls arrive in one
            // read), and for a long fragment grow with what has arrived, not
            // with what its marker claims: at most double. A 1 MiB WRITE
            // still arrives in a few reads.
            let missing = need - self.buf.len();
            self.buf
                .reserve(READ_CHUNK.max(missing.min(self.buf.len())));
            let waiting = self.buf.is_empty() && self.partial.is_none();
            let deadline = if waiting {
                idle.map(|d| (Instant::now() + d, FrameError::Idle))
            } else {
                let started = *self.started.get_or_insert_with(Instant::now);
                record.map(|d| (started + d, FrameError::Stalled))
            };
            let read = self.inner.read_buf(&mut self.buf);
            let n = match deadline {
                Some((at, timed_out)) => match tokio::time::timeout_at(at.into(), read).await {
                    Ok(n) => n?,
                    Err(_) => return Err(timed_out),
                },
                None => read.await?,
            };
            if waiting && n > 0 {
                self.started = Some(Instant::now());
            }
            if n == 0 {
                if self.buf.is_empty() && self.partial.is_none() {
                    return Ok(None);
                }
                return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }
}

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

    fn record(frags: &[(&[u8], bool)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (data, last) in frags {
            let mut mark = data.len() as u32;
            if *last {
                mark |= LAST_FRAGMENT;
            }
            out.extend_from_slice(&mark.to_be_bytes());
            out.extend_from_slice(data);
        }
        out
    }

    async fn records(input: Vec<u8>) -> (Vec<Bytes>, Option<FrameError>) {
        let mut rr = RecordReader::new(&input[..]);
        let mut out = Vec::new();
        loop {
            match rr.next_record().await {
                Ok(Some(r)) => out.push(r),
                Ok(None) => return (out, None),
                Err(e) => return (out, Some(e)),
            }
        }
    }

    #[tokio::test]
    async fn single_and_multi_fragment_records() {
        let mut input = record(&[(b"abcd", true)]);
        input.extend(record(&[(b"12", false), (b"34", false), (b"56", true)]));
        input.extend(record(&[(b"", true)]));
        let (recs, err) = records(input).await;
        assert!(err.is_none());
        assert_eq!(
            recs,
            vec![Bytes::from("abcd"), Bytes::from("123456"), Bytes::new()]
        );
    }

    #[tokio::test]
    async fn truncated_record_is_an_error() {
        let mut input = record(&[(b"abcdefgh", true)]);
        input.truncate(7);
        let (recs, err) = records(input).await;
        assert!(recs.is_empty());
        assert!(matches!(err, Some(FrameError::Io(_))));
    }

    #[tokio::test]
    async fn oversized_record_is_refused_without_buffering() {
        let input = (LAST_FRAGMENT | 0x7fff_ffff).to_be_bytes().to_vec();
        let (_, err) = records(input).await;
        assert!(matches!(err, Some(FrameError::TooLarge(_))));
        // Many small fragments adding up past the limit are refused too.
        let chunk = vec![0u8; 1024 * 1024];
        let frags: Vec<(&[u8], bool)> = (0..6).map(|_| (&chunk[..], false)).collect();
        let (_, err) = records(record(&frags)).await;
        assert!(matches!(err, Some(FrameError::TooLarge(_))));
    }

    #[tokio::test]
    async fn a_claimed_length_reserves_only_what_arrives() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut rr = RecordReader::new(server);
        let mut start = (LAST_FRAGMENT | (4 << 20)).to_be_bytes().to_vec();
        start.extend_from_slice(&[7u8; 100]);
        tokio::io::AsyncWriteExt::write_all(&mut client, &start)
            .await
            .unwrap();
        let read = rr.next_record_within(None, Some(Duration::from_millis(50)));
        assert!(matches!(read.await, Err(FrameError::Stalled)));
        assert!(rr.buf.capacity() <= 2 * READ_CHUNK, "{}", rr.buf.capacity());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_and_stalled_connections_time_out() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut rr = RecordReader::new(server);
        let idle = Some(Duration::from_secs(360));
        let per_record = Some(Duration::from_secs(30));
        // Silence: idle after the idle timeout, not before.
        let wait = tokio::spawn(async move {
            let r = rr.next_record_within(idle, per_record).await;
            (rr, r)
        });
        tokio::time::sleep(Duration::from_secs(359)).await;
        assert!(!wait.is_finished());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (mut rr, r) = wait.await.unwrap();
        assert!(matches!(r, Err(FrameError::Idle)), "{r:?}");
        // Half a record: stalled after the record timeout.
        let whole = record(&[(b"abcdefgh", true)]);
        tokio::io::AsyncWriteExt::write_all(&mut client, &whole[..6])
            .await
            .unwrap();
        let r = rr.next_record_within(idle, per_record).await;
        assert!(matches!(r, Err(FrameError::Stalled)), "{r:?}");
        // The rest, late: the record is still whole (the caller decides).
        tokio::io::AsyncWriteExt::write_all(&mut client, &whole[6..])
            .await
            .unwrap();
        let r = rr.next_record_within(idle, per_record).await.unwrap();
        assert_eq!(r, Some(Bytes::from_static(b"abcdefgh")));
    }

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
