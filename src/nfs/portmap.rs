//! Portmapper, program 100000 version 2 (RFC 1833), over TCP and UDP.
//!
//! revive runs its own portmapper instead of registering with rpcbind, so a
//! machine needs nothing else installed and tests run unprivileged on any
//! port. It is static: it knows the ports of this server's listeners and
//! refuses SET/UNSET. QEMU's nfs driver and libnfs without explicit ports ask
//! it for NFS 100003 v3 and MOUNT 100005 v3.

use bytes::BufMut;
use nfs3_types::portmap::{mapping, IPPROTO_TCP, IPPROTO_UDP};
use nfs3_types::rpc::accept_stat;
use nfs3_types::xdr_codec::List;

use super::rpc::{Call, Reply};
use super::server::ServerState;
use super::xdr::{pack, XdrReader};

/// Portmapper program number.
pub const PROGRAM: u32 = 100_000;
/// The only portmapper version served.
pub const VERSION: u32 = 2;

/// Ports this server listens on, as the portmapper announces them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ports {
    /// NFS over TCP.
    pub nfs: u16,
    /// MOUNT over TCP.
    pub mount: u16,
    /// Portmapper over TCP, if served.
    pub portmap_tcp: Option<u16>,
    /// Portmapper over UDP, if served; MOUNT is answered there too.
    pub portmap_udp: Option<u16>,
}

impl Ports {
    /// Every (program, version, protocol, port) this server serves.
    pub fn mappings(&self) -> Vec<mapping> {
        let m = |prog, vers, prot, port: u16| mapping {
            prog,
            vers,
            prot,
            port: u32::from(port),
        };
        let mut out = vec![
            m(super::NFS_PROGRAM, 3, IPPROTO_TCP, self.nfs),
            m(super::mount::PROGRAM, 3, IPPROTO_TCP, self.mount),
        ];
        if let Some(p) = self.portmap_tcp {
            out.push(m(PROGRAM, VERSION, IPPROTO_TCP, p));
        }
        if let Some(p) = self.portmap_udp {
            out.push(m(PROGRAM, VERSION, IPPROTO_UDP, p));
            out.push(m(super::mount::PROGRAM, 3, IPPROTO_UDP, p));
        }
        out
    }

    /// GETPORT: the port of a (program, version, protocol), 0 if not served.
    pub fn getport(&self, prog: u32, vers: u32, prot: u32) -> u16 {
        self.mappings()
            .into_iter()
            .find(|m| m.prog == prog && m.vers == vers && m.prot == prot)
            .and_then(|m| u16::try_from(m.port).ok())
            .unwrap_or(0)
    }
}

/// Answer one portmapper call.
pub(crate) fn dispatch(state: &ServerState, call: Call) -> Reply {
    state.count_portmap();
    if call.vers != VERSION {
        return Reply::prog_mismatch(call.xid, VERSION, VERSION);
    }
    let mut reply = Reply::success(call.xid);
    let mut args = call.args;
    match call.proc_num {
        0 => {}
        // SET and UNSET: the table is static; answer "false".
        1 | 2 => reply.body().put_u32(0),
        3 => match getport_args(&mut args) {
            Some((prog, vers, prot)) => {
                let port = state.ports.getport(prog, vers, prot);
                tracing::debug!(prog, vers, prot, port, "portmap getport");
                reply.body().put_u32(u32::from(port));
            }
            None => {
                state.count_rejected();
                return Reply::accept_error(call.xid, accept_stat::GARBAGE_ARGS);
            }
        },
        4 => pack(reply.body(), &List(state.ports.mappings())),
        _ => {
            state.count_rejected();
            return Reply::accept_error(call.xid, accept_stat::PROC_UNAVAIL);
        }
    }
    reply
}

fn getport_args(r: &mut XdrReader) -> Option<(u32, u32, u32)> {
    let prog = r.u32().ok()?;
    let vers = r.u32().ok()?;
    let prot = r.u32().ok()?;
    let _port = r.u32().ok()?;
    Some((prog, vers, prot))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn getport_answers_configured_ports() {
        let p = Ports {
            nfs: 2049,
            mount: 20048,
            portmap_tcp: Some(111),
            portmap_udp: Some(111),
        };
        assert_eq!(p.getport(100_003, 3, IPPROTO_TCP), 2049);
        assert_eq!(p.getport(100_005, 3, IPPROTO_TCP), 20048);
        assert_eq!(p.getport(100_005, 3, IPPROTO_UDP), 111);
        assert_eq!(p.getport(100_000, 2, IPPROTO_UDP), 111);
        assert_eq!(p.getport(100_003, 4, IPPROTO_TCP), 0);
        assert_eq!(p.getport(100_003, 3, IPPROTO_UDP), 0);
        assert_eq!(p.mappings().len(), 5);
    }
}
