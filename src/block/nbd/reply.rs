//! Encoding of what the server sends: option replies during the handshake,
//! simple replies and structured reply chunks during transmission.
//!
//! ```text
//! option reply:  64 magic | 32 option | 32 reply type | 32 length | data
//! simple reply:  32 magic | 32 error | 64 handle | (read data)
//! chunk:         32 magic | 16 flags | 16 type | 64 handle | 32 length | payload
//! ```
//!
//! A read answers with one OFFSET_DATA chunk flagged DONE: the data is in
//! memory before the header is written, so no error can follow it.

use bytes::{BufMut, Bytes, BytesMut};

use super::proto::*;
use crate::block::{Extent, ExtentKind};

/// One reply as it goes on the wire: a header (with any small payload) and
/// the data of a read, kept apart so the data is never copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Header and small payload.
    pub head: Bytes,
    /// Read data (empty otherwise).
    pub data: Bytes,
}

impl Reply {
    fn head(head: BytesMut) -> Reply {
        Reply {
            head: head.freeze(),
            data: Bytes::new(),
        }
    }
}

/// An option reply.
pub fn option_reply(option: u32, kind: u32, data: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(20 + data.len());
    b.put_u64(OPTION_REPLY_MAGIC);
    b.put_u32(option);
    b.put_u32(kind);
    b.put_u32(data.len() as u32);
    b.put_slice(data);
    b.freeze()
}

fn simple(handle: u64, error: u32, extra: usize) -> BytesMut {
    let mut b = BytesMut::with_capacity(16 + extra);
    b.put_u32(SIMPLE_REPLY_MAGIC);
    b.put_u32(error);
    b.put_u64(handle);
    b
}

fn chunk(flags: u16, kind: u16, handle: u64, len: usize) -> BytesMut {
    let mut b = BytesMut::with_capacity(20 + len.min(1024));
    b.put_u32(STRUCTURED_REPLY_MAGIC);
    b.put_u16(flags);
    b.put_u16(kind);
    b.put_u64(handle);
    b.put_u32(len as u32);
    b
}

/// Success without data (WRITE, FLUSH, TRIM, WRITE_ZEROES).
pub fn ok(handle: u64, structured: bool) -> Reply {
    if structured {
        Reply::head(chunk(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0))
    } else {
        Reply::head(simple(handle, 0, 0))
    }
}

/// The data of a read at `offset`.
pub fn read(handle: u64, offset: u64, data: Bytes, structured: bool) -> Reply {
    if !structured {
        return Reply {
            head: simple(handle, 0, 0).freeze(),
            data,
        };
    }
    if data.is_empty() {
        // An OFFSET_DATA chunk must carry at least one byte.
        return ok(handle, true);
    }
    let mut head = chunk(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        handle,
        8 + data.len(),
    );
    head.put_u64(offset);
    Reply {
        head: head.freeze(),
        data,
    }
}

/// An error, with a message for the human when replies are structured.
pub fn error(handle: u64, errno: u32, message: &str, structured: bool) -> Reply {
    if !structured {
        return Reply::head(simple(handle, errno, 0));
    }
    // Strings are at most 4096 bytes; cut on a character boundary.
    let mut end = message.len().min(4096);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    let mut b = chunk(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, 6 + msg.len());
    b.put_u32(errno);
    b.put_u16(msg.len() as u16);
    b.put_slice(msg);
    Reply::head(b)
}

/// The base:allocation status of `extents` under metadata context `context`.
/// Each extent must be shorter than 4 GiB (requests are).
pub fn block_status(handle: u64, context: u32, extents: &[Extent]) -> Reply {
    let mut b = chunk(
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        handle,
        4 + 8 * extents.len(),
    );
    b.reserve(4 + 8 * extents.len());
    b.put_u32(context);
    for e in extents {
        b.put_u32(e.len.min(u64::from(u32::MAX)) as u32);
        b.put_u32(match e.kind {
            ExtentKind::Data => 0,
            ExtentKind::Zero => STATE_HOLE | STATE_ZERO,
        });
    }
    Reply::head(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_have_the_documented_layout() {
        let r = read(7, 4096, Bytes::from_static(b"abc"), true);
        assert_eq!(r.head.len(), 28);
        assert_eq!(&r.head[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&r.head[4..6], &REPLY_FLAG_DONE.to_be_bytes());
        assert_eq!(&r.head[6..8], &REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        assert_eq!(&r.head[8..16], &7u64.to_be_bytes());
        assert_eq!(&r.head[16..20], &11u32.to_be_bytes());
        assert_eq!(&r.head[20..28], &4096u64.to_be_bytes());
        assert_eq!(&r.data[..], b"abc");

        let s = read(9, 0, Bytes::from_static(b"xy"), false);
        assert_eq!(s.head.len(), 16);
        assert_eq!(&s.head[4..8], &[0, 0, 0, 0]);

        let e = error(1, EINVAL, "bad", true);
        assert_eq!(e.head.len(), 20 + 6 + 3);
        assert_eq!(&e.head[6..8], &REPLY_TYPE_ERROR.to_be_bytes());
        assert_eq!(&e.head[20..24], &EINVAL.to_be_bytes());
        assert_eq!(&e.head[26..], b"bad");

        let bs = block_status(
            2,
            1,
            &[
                Extent {
                    offset: 0,
                    len: 512,
                    kind: ExtentKind::Data,
                },
                Extent {
                    offset: 512,
                    len: 1024,
                    kind: ExtentKind::Zero,
                },
            ],
        );
        assert_eq!(&bs.head[16..20], &20u32.to_be_bytes());
        assert_eq!(&bs.head[20..24], &1u32.to_be_bytes());
        assert_eq!(&bs.head[24..32], &[0, 0, 2, 0, 0, 0, 0, 0]);
        assert_eq!(&bs.head[32..40], &[0, 0, 4, 0, 0, 0, 0, 3]);

        let o = option_reply(OPT_GO, REP_ACK, &[]);
        assert_eq!(o.len(), 20);
        assert_eq!(&o[..8], &OPTION_REPLY_MAGIC.to_be_bytes());
    }
}
