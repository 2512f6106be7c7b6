//! Binding the NFS, MOUNT and portmapper sockets: which ports, shared or
//! not, and the ports clients are told.

use std::net::IpAddr;

use tokio::net::{TcpListener, UdpSocket};

use super::portmap::Ports;

/// Where to listen; every port configurable so tests run unprivileged and
/// in parallel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NfsBind {
    /// Address to bind.
    pub addr: IpAddr,
    /// NFS port (2049 by convention).
    pub nfs_port: u16,
    /// MOUNT port; equal to `nfs_port` to share one listener.
    pub mount_port: u16,
    /// Portmapper port (TCP and UDP; 111 by convention), or `None` to run
    /// without one (clients must then be told both ports).
    pub portmap_port: Option<u16>,
}

impl Default for NfsBind {
    fn default() -> Self {
        Self {
            addr: IpAddr::from([0, 0, 0, 0]),
            nfs_port: 2049,
            mount_port: 20048,
            portmap_port: Some(111),
        }
    }
}

/// Bound sockets handed to [`NfsServer::serve`].
#[derive(Debug)]
pub struct NfsListeners {
    /// NFS (and MOUNT when `mount` is `None`).
    pub nfs: TcpListener,
    /// A separate MOUNT listener.
    pub mount: Option<TcpListener>,
    /// Portmapper over TCP.
    pub portmap_tcp: Option<TcpListener>,
    /// Portmapper (and MOUNT) over UDP.
    pub portmap_udp: Option<UdpSocket>,
}

impl NfsListeners {
    /// Bind everything `bind` asks for.
    ///
    /// # Errors
    /// The first port that cannot be bound.
    pub async fn bind(bind: &NfsBind) -> std::io::Result<Self> {
        let nfs = TcpListener::bind((bind.addr, bind.nfs_port)).await?;
        let mount = if bind.mount_port == bind.nfs_port {
            None
        } else {
            Some(TcpListener::bind((bind.addr, bind.mount_port)).await?)
        };
        let (portmap_tcp, portmap_udp) = match bind.portmap_port {
            Some(port) => {
                let (tcp, udp) = bind_pair(bind.addr, port).await?;
                (Some(tcp), Some(udp))
            }
            None => (None, None),
        };
        Ok(Self {
            nfs,
            mount,
            portmap_tcp,
            portmap_udp,
        })
    }

    /// The ports actually bound, as the portmapper will announce them.
    ///
    /// # Errors
    /// A socket whose local address cannot be read.
    pub fn ports(&self) -> std::io::Result<Ports> {
        let nfs = self.nfs.local_addr()?.port();
        Ok(Ports {
            nfs,
            mount: match &self.mount {
                Some(l) => l.local_addr()?.port(),
                None => nfs,
            },
            portmap_tcp: self
                .portmap_tcp
                .as_ref()
                .map(|l| l.local_addr())
                .transpose()?
                .map(|a| a.port()),
            portmap_udp: self
                .portmap_udp
                .as_ref()
                .map(|s| s.local_addr())
                .transpose()?
                .map(|a| a.port()),
        })
    }
}

/// A TCP listener and a UDP socket on the same port. With port 0 the UDP
/// socket takes the port TCP got, retrying if that UDP port is taken.
async fn bind_pair(addr: IpAddr, port: u16) -> std::io::Result<(TcpListener, UdpSocket)> {
    let mut attempt = 0;
    loop {
        let tcp = TcpListener::bind((addr, port)).await?;
        let got = tcp.local_addr()?.port();
        match UdpSocket::bind((addr, got)).await {
            Ok(udp) => return Ok((tcp, udp)),
            Err(e) if port == 0 && attempt < 8 => {
                tracing::debug!(cause = %e, port = got, "udp port taken, retrying");
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bind_shares_nfs_and_mount_and_pairs_portmap_ports() {
        let bind = NfsBind {
            addr: IpAddr::from([127, 0, 0, 1]),
            nfs_port: 0,
            mount_port: 0,
            portmap_port: Some(0),
        };
        let l = NfsListeners::bind(&bind).await.expect("bind");
        assert!(l.mount.is_none(), "equal ports share one listener");
        let p = l.ports().expect("ports");
        assert_eq!(p.nfs, p.mount);
        assert_ne!(p.nfs, 0);
        assert_eq!(p.portmap_tcp, p.portmap_udp);
        let none = NfsBind {
            portmap_port: None,
            ..bind
        };
        let l = NfsListeners::bind(&none).await.expect("bind");
        assert_eq!(l.ports().expect("ports").portmap_tcp, None);
    }
}
