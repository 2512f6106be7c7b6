//! Issue 18: the server as a hostile or unlucky client finds it. Each test
//! runs the real `revive serve` (through the datastore tests' `Fixture`)
//! against real clients and checks that a resource running out (file
//! descriptors, connections, write cache space, the write cache folder
//! itself, attribute limits) is answered with the right NFS status and
//! never wedges the server or loses data silently.

mod attrs;
mod connections;
mod descriptors;
mod missing_cache;
mod space;

use std::net::{Ipv4Addr, SocketAddr};

use tokio::net::{TcpSocket, TcpStream};

/// Raises this test process's soft `RLIMIT_NOFILE` to its hard limit: the
/// flood tests hold thousands of sockets of their own.
pub(crate) fn raise_own_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid rlimit buffer.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// A TCP connection to 127.0.0.1:`port` from the loopback address `from`
/// (127.0.0.2 and up are other hosts to the server: Linux routes all of
/// 127/8 to `lo`).
pub(crate) async fn connect_from(from: Ipv4Addr, port: u16) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((from, 0)))?;
    socket
        .connect(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .await
}

/// Whether the user can mount file systems (tests that mount a small file
/// system for the write cache need root).
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
