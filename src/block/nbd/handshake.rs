//! The fixed newstyle handshake: greeting, client flags, then option
//! haggling until the client picks an export (NBD_OPT_GO or
//! NBD_OPT_EXPORT_NAME) or leaves.
//!
//! ```text
//! S: "NBDMAGIC" "IHAVEOPT" | 16 bits handshake flags
//! C: 32 bits client flags
//! C: "IHAVEOPT" | 32 bits option | 32 bits length | data      (repeated)
//! S: option reply(s)                                          (each)
//! ```
//!
//! The allow-list is enforced here: an export the client may not use is
//! answered NBD_REP_ERR_POLICY (NBD_OPT_INFO, NBD_OPT_GO, metadata context
//! options), left out of NBD_OPT_LIST, and NBD_OPT_EXPORT_NAME on it ends
//! the connection (that option cannot answer an error). Option data longer
//! than [`MAX_OPTION_LEN`] ends the connection before anything is allocated.

use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::proto::*;
use super::reply::option_reply;
use super::MAX_REQUEST;
use crate::block::registry::{BlockExport, BlockExports, BlockProtocol};

/// Longest option data accepted: names and queries are at most 4096 bytes
/// each; anything much longer is not a real client.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// The metadata context id of base:allocation on every connection.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Why a handshake ended without an export.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The socket failed or the client left mid-message.
    #[error("i/o - {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the protocol; the connection is closed.
    #[error("protocol violation - {0}")]
    Malformed(String),
}

/// What the handshake agreed on.
pub struct Negotiated {
    /// The export chosen.
    pub export: Arc<BlockExport>,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// base:allocation was selected for this export.
    pub block_status: bool,
    /// Transmission flags sent.
    pub flags: u16,
}

/// Transmission flags of `export`: flush, FUA and multi-conn always (one
/// write cache behind every connection, see [`crate::block::BlockDevice`]),
/// trim and write zeroes unless read-only, DF with structured replies.
pub fn transmission_flags(export: &BlockExport, structured: bool) -> u16 {
    let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN;
    if export.device.read_only() {
        flags |= TFLAG_READ_ONLY;
    } else {
        flags |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
    }
    if structured {
        flags |= TFLAG_SEND_DF;
    }
    flags
}

enum Lookup {
    Found(Arc<BlockExport>),
    Unknown,
    Refused,
}

/// The export `name` for `peer`; the empty name is the client's only export.
fn lookup(registry: &BlockExports, name: &str, peer: IpAddr) -> Lookup {
    if name.is_empty() {
        let mut allowed: Vec<_> = registry
            .of(BlockProtocol::Nbd)
            .into_iter()
            .filter(|e| e.allows(peer))
            .collect();
        return match (allowed.pop(), allowed.is_empty()) {
            (Some(only), true) => Lookup::Found(only),
            _ => Lookup::Unknown,
        };
    }
    match registry.get(name, BlockProtocol::Nbd) {
        None => Lookup::Unknown,
        Some(e) if e.allows(peer) => Lookup::Found(e),
        Some(e) => {
            e.metrics.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(export = %name, client = %peer, "nbd client refused: not on the export's allow-list");
            Lookup::Refused
        }
    }
}

/// A cursor over option data that fails instead of reading past its end.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn string(&mut self) -> Option<&'a str> {
        let len = self.u32()? as usize;
        std::str::from_utf8(self.take(len)?).ok()
    }
}

/// An NBD_OPT_INFO / NBD_OPT_GO request: name and information wanted.
fn parse_info(data: &[u8]) -> Option<(&str, Vec<u16>)> {
    let mut f = Fields(data);
    let name = f.string()?;
    let n = f.u16()? as usize;
    let wanted = (0..n).map(|_| f.u16()).collect::<Option<Vec<u16>>>()?;
    f.0.is_empty().then_some((name, wanted))
}

/// A metadata context request: export name and queries.
fn parse_meta(data: &[u8]) -> Option<(&str, Vec<&str>)> {
    let mut f = Fields(data);
    let name = f.string()?;
    let n = f.u32()? as usize;
    if n > data.len() / 4 {
        return None;
    }
    let queries = (0..n).map(|_| f.string()).collect::<Option<Vec<&str>>>()?;
    f.0.is_empty().then_some((name, queries))
}

/// One handshake on `stream` from `peer`. `Ok(None)`: the client left or
/// was refused an NBD_OPT_EXPORT_NAME; close the connection.
///
/// # Errors
/// Socket failures and protocol violations: close the connection.
pub async fn negotiate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    peer: IpAddr,
    registry: &BlockExports,
) -> Result<Option<Negotiated>, HandshakeError> {
    let mut greeting = BytesMut::with_capacity(18);
    greeting.put_u64(NBD_MAGIC);
    greeting.put_u64(IHAVEOPT);
    greeting.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    stream.write_all(&greeting).await?;
    let client_flags = stream.read_u32().await?;
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(HandshakeError::Malformed(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
    let mut structured = false;
    // The export name of the last NBD_OPT_SET_META_CONTEXT and whether it
    // selected base:allocation.
    let mut meta: Option<(String, bool)> = None;
    loop {
        let magic = stream.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(HandshakeError::Malformed(format!(
                "option magic {magic:#x}"
            )));
        }
        let option = stream.read_u32().await?;
        let len = stream.read_u32().await?;
        if len > MAX_OPTION_LEN {
            return Err(HandshakeError::Malformed(format!(
                "option {option} of {len} bytes"
            )));
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data).await?;
        let mut out = BytesMut::new();
        let mut reply = |kind: u32, body: &[u8]| out.put(option_reply(option, kind, body));
        let mut go = None;
        match option {
            OPT_EXPORT_NAME => {
                let Ok(name) = std::str::from_utf8(&data) else {
                    return Ok(None);
                };
                let Lookup::Found(export) = lookup(registry, name, peer) else {
                    tracing::info!(export = %name, client = %peer, "nbd export refused or unknown: closing");
                    return Ok(None);
                };
                // Structured replies and metadata contexts negotiated
                // before apply here as after NBD_OPT_GO.
                let flags = transmission_flags(&export, structured);
                let block_status = matches!(&meta, Some((n, true)) if n == name) && structured;
                let mut b = BytesMut::with_capacity(134);
                b.put_u64(export.device.size());
                b.put_u16(flags);
                if !no_zeroes {
                    b.put_bytes(0, 124);
                }
                stream.write_all(&b).await?;
                return Ok(Some(Negotiated {
                    export,
                    structured,
                    block_status,
                    flags,
                }));
            }
            OPT_ABORT => {
                reply(REP_ACK, &[]);
                stream.write_all(&out).await?;
                return Ok(None);
            }
            OPT_LIST if !data.is_empty() => reply(REP_ERR_INVALID, b"NBD_OPT_LIST takes no data"),
            OPT_LIST => {
                for e in registry.of(BlockProtocol::Nbd) {
                    if e.allows(peer) {
                        let mut b = BytesMut::with_capacity(4 + e.name.len());
                        b.put_u32(e.name.len() as u32);
                        b.put_slice(e.name.as_bytes());
                        reply(REP_SERVER, &b);
                    }
                }
                reply(REP_ACK, &[]);
            }
            OPT_STARTTLS => reply(REP_ERR_UNSUP, b"TLS is not supported by this server"),
            OPT_STRUCTURED_REPLY if !data.is_empty() => {
                reply(REP_ERR_INVALID, b"NBD_OPT_STRUCTURED_REPLY takes no data")
            }
            OPT_STRUCTURED_REPLY => {
                structured = true;
                reply(REP_ACK, &[]);
            }
            OPT_INFO | OPT_GO => match parse_info(&data) {
                None => reply(REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO"),
                Some((name, wanted)) => match lookup(registry, name, peer) {
                    Lookup::Unknown => reply(REP_ERR_UNKNOWN, b"no such export"),
                    Lookup::Refused => reply(REP_ERR_POLICY, b"this client may not use the export"),
                    Lookup::Found(export) => {
                        let flags = transmission_flags(&export, structured);
                        let mut info = BytesMut::with_capacity(12);
                        info.put_u16(INFO_EXPORT);
                        info.put_u64(export.device.size());
                        info.put_u16(flags);
                        reply(REP_INFO, &info);
                        for item in wanted {
                            let mut b = BytesMut::new();
                            b.put_u16(item);
                            match item {
                                INFO_NAME => b.put_slice(export.name.as_bytes()),
                                INFO_DESCRIPTION => b.put_slice(b"revive: a restore point's disk"),
                                INFO_BLOCK_SIZE => {
                                    b.put_u32(1);
                                    b.put_u32(4096);
                                    b.put_u32(MAX_REQUEST);
                                }
                                _ => continue,
                            }
                            reply(REP_INFO, &b);
                        }
                        reply(REP_ACK, &[]);
                        if option == OPT_GO {
                            let block_status =
                                matches!(&meta, Some((n, true)) if n == name) && structured;
                            go = Some(Negotiated {
                                export,
                                structured,
                                block_status,
                                flags,
                            });
                        }
                    }
                },
            },
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if set {
                    meta = None;
                }
                match (structured, parse_meta(&data)) {
                    (false, _) => reply(REP_ERR_INVALID, b"negotiate structured replies first"),
                    (true, None) => reply(REP_ERR_INVALID, b"malformed metadata context request"),
                    (true, Some((name, queries))) => match lookup(registry, name, peer) {
                        Lookup::Unknown => reply(REP_ERR_UNKNOWN, b"no such export"),
                        Lookup::Refused => {
                            reply(REP_ERR_POLICY, b"this client may not use the export")
                        }
                        Lookup::Found(_) => {
                            // "base:" lists every base context but selects none.
                            let wanted = if set {
                                queries.contains(&BASE_ALLOCATION)
                            } else {
                                queries.is_empty()
                                    || queries
                                        .iter()
                                        .any(|q| *q == "base:" || *q == BASE_ALLOCATION)
                            };
                            if wanted {
                                let mut b = BytesMut::new();
                                b.put_u32(if set { BASE_ALLOCATION_ID } else { 0 });
                                b.put_slice(BASE_ALLOCATION.as_bytes());
                                reply(REP_META_CONTEXT, &b);
                            }
                            reply(REP_ACK, &[]);
                            if set {
                                meta = Some((name.to_string(), wanted));
                            }
                        }
                    },
                }
            }
            _ => reply(REP_ERR_UNSUP, b"unsupported option"),
        }
        stream.write_all(&out).await?;
        if go.is_some() {
            return Ok(go);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_data_is_parsed_without_reading_past_its_end() {
        let mut go = BytesMut::new();
        go.put_u32(2);
        go.put_slice(b"db");
        go.put_u16(2);
        go.put_u16(INFO_NAME);
        go.put_u16(INFO_BLOCK_SIZE);
        assert_eq!(
            parse_info(&go),
            Some(("db", vec![INFO_NAME, INFO_BLOCK_SIZE]))
        );
        assert_eq!(parse_info(&go[..go.len() - 1]), None);
        let mut trailing = go.clone();
        trailing.put_u8(0);
        assert_eq!(parse_info(&trailing), None);
        let mut huge = BytesMut::new();
        huge.put_u32(u32::MAX);
        assert_eq!(parse_info(&huge), None);

        let mut meta = BytesMut::new();
        meta.put_u32(0);
        meta.put_u32(1);
        meta.put_u32(BASE_ALLOCATION.len() as u32);
        meta.put_slice(BASE_ALLOCATION.as_bytes());
        assert_eq!(parse_meta(&meta), Some(("", vec![BASE_ALLOCATION])));
        let mut many = BytesMut::new();
        many.put_u32(0);
        many.put_u32(u32::MAX);
        assert_eq!(parse_meta(&many), None);
    }
}
