//! Asks a portmapper where NFS v3 listens, as QEMU's nfs driver (libnfs)
//! does before it mounts: QEMU cannot be told a port, so a datastore whose
//! portmapper does not answer on 111 cannot be booted from.
//!
//! # Wire (ONC RPC over TCP, RFC 5531 / RFC 1833)
//! ```text
//! record mark (last fragment | length)
//! CALL:  xid, 0 (CALL), 2 (rpcvers), 100000, 2, 3 (GETPORT), AUTH_NONE, AUTH_NONE,
//!        prog 100003, vers 3, prot 6 (TCP), port 0
//! REPLY: xid, 1 (REPLY), 0 (accepted), verifier, 0 (SUCCESS), port
//! ```

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where clients look for the portmapper.
pub const PORTMAP_PORT: u16 = 111;

/// Longest wait for connect plus reply.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Longest reply accepted: GETPORT's is 28 bytes plus a verifier.
const MAX_REPLY: u32 = 4096;

/// Why the portmapper probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No answer: nothing listens, or the network is down.
    #[error("portmapper at {addr} unreachable - {reason}")]
    Unreachable { addr: String, reason: String },
    /// It answered, but not with a usable NFS v3 port.
    #[error("portmapper at {addr} - {reason}")]
    Refused { addr: String, reason: String },
}

/// Returns the TCP port the portmapper at `host:port` gives for NFS v3.
pub async fn nfs_port(host: &str, port: u16) -> Result<u16, ProbeError> {
    let addr = format!("{host}:{port}");
    let unreachable = |reason: String| ProbeError::Unreachable {
        addr: addr.clone(),
        reason,
    };
    let exchange = async {
        let mut stream = TcpStream::connect(&addr).await?;
        stream.write_all(&getport_call(0x7265_7669)).await?;
        let mut mark = [0u8; 4];
        stream.read_exact(&mut mark).await?;
        let len = u32::from_be_bytes(mark) & 0x7fff_ffff;
        if len > MAX_REPLY {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("reply of {len} bytes"),
            ));
        }
        let mut body = vec![0u8; len as usize];
        stream.read_exact(&mut body).await?;
        Ok::<_, std::io::Error>(body)
    };
    let body = tokio::time::timeout(PROBE_TIMEOUT, exchange)
        .await
        .map_err(|_| unreachable(format!("no answer in {} s", PROBE_TIMEOUT.as_secs())))?
        .map_err(|e| unreachable(e.to_string()))?;
    parse_getport_reply(&body).map_err(|reason| ProbeError::Refused {
        addr: addr.clone(),
        reason,
    })
}

/// A GETPORT call for NFS v3 over TCP, with its record mark.
fn getport_call(xid: u32) -> Vec<u8> {
    let words: [u32; 14] = [
        xid, 0, 2, 100_000, 2, 3, // header: CALL, rpcvers 2, portmapper v2, GETPORT
        0, 0, 0, 0, // AUTH_NONE credential and verifier
        100_003, 3, 6, 0, // NFS v3 over TCP
    ];
    let mut out = Vec::with_capacity(4 + words.len() * 4);
    out.extend_from_slice(&(0x8000_0000u32 | (words.len() as u32 * 4)).to_be_bytes());
    for w in words {
        out.extend_from_slice(&w.to_be_bytes());
    }
    out
}

/// The port from a GETPORT reply body (after the record mark).
fn parse_getport_reply(body: &[u8]) -> Result<u16, String> {
    let word = |i: usize| -> Result<u32, String> {
        body.get(i * 4..i * 4 + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| format!("short reply ({} bytes)", body.len()))
    };
    if word(1)? != 1 {
        return Err("not an RPC reply".into());
    }
    if word(2)? != 0 {
        return Err("call denied".into());
    }
    // The verifier: flavor, then opaque body padded to 4 bytes.
    let verf_len = word(4)? as usize;
    if verf_len > 400 {
        return Err(format!("verifier of {verf_len} bytes"));
    }
    let next = 5 + verf_len.div_ceil(4);
    let stat = word(next)?;
    if stat != 0 {
        return Err(format!("GETPORT not accepted (accept_stat {stat})"));
    }
    let port = word(next + 1)?;
    match u16::try_from(port) {
        Ok(0) => Err("no NFS v3 over TCP registered".into()),
        Ok(p) => Ok(p),
        Err(_) => Err(format!("port {port} out of range")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(words: &[u32]) -> Vec<u8> {
        words.iter().flat_map(|w| w.to_be_bytes()).collect()
    }

    #[test]
    fn replies_are_parsed_and_checked() {
        assert_eq!(
            parse_getport_reply(&reply(&[7, 1, 0, 0, 0, 0, 2049])),
            Ok(2049)
        );
        // A verifier with a body is skipped.
        assert_eq!(
            parse_getport_reply(&reply(&[7, 1, 0, 1, 5, 0, 0, 0, 2049])),
            Ok(2049)
        );
        assert!(parse_getport_reply(&reply(&[7, 1, 0, 0, 0, 0, 0])).is_err());
        assert!(parse_getport_reply(&reply(&[7, 1, 1, 0, 0, 0, 2049])).is_err());
        assert!(parse_getport_reply(&reply(&[7, 1, 0, 0, 0, 1, 0])).is_err());
        assert!(parse_getport_reply(&reply(&[7, 1, 0])).is_err());
        assert_eq!(getport_call(1).len(), 4 + 56);
    }

    #[tokio::test]
    async fn nothing_listening_is_unreachable() {
        // The driver reports this as transient: revive may not be up yet.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let err = nfs_port("127.0.0.1", port).await.unwrap_err();
        assert!(matches!(err, ProbeError::Unreachable { .. }), "{err}");
    }
}
