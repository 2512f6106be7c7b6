//! Shared helpers of the integration tests.

pub mod memfs;

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use revive::nfs::{NfsListeners, NfsMetrics, NfsServer};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A running NFS server on 127.0.0.1 with random ports (NFS and MOUNT on
/// separate ports, so clients must use both options), and its portmapper.
pub struct TestServer {
    pub nfs_port: u16,
    pub mount_port: u16,
    pub portmap_port: u16,
    pub write_verifier: [u8; 8],
    pub metrics: Arc<NfsMetrics>,
    stop: Option<oneshot::Sender<()>>,
    join: JoinHandle<std::io::Result<()>>,
}

async fn local_tcp() -> TcpListener {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind tcp")
}

impl TestServer {
    /// Start serving `backend` on random ports.
    pub async fn start(backend: Arc<memfs::MemFs>) -> Self {
        let nfs = local_tcp().await;
        let mount = local_tcp().await;
        // The portmapper wants the same port on TCP and UDP; retry on the
        // rare collision.
        let (pm_tcp, pm_udp) = loop {
            let tcp = local_tcp().await;
            let port = tcp.local_addr().expect("addr").port();
            if let Ok(udp) = UdpSocket::bind((Ipv4Addr::LOCALHOST, port)).await {
                break (tcp, udp);
            }
        };
        let listeners = NfsListeners {
            nfs,
            mount: Some(mount),
            portmap_tcp: Some(pm_tcp),
            portmap_udp: Some(pm_udp),
        };
        Self::start_on(backend, listeners)
    }

    /// Start serving `backend` on the given listeners.
    pub fn start_on(backend: Arc<memfs::MemFs>, listeners: NfsListeners) -> Self {
        let ports = listeners.ports().expect("ports");
        let server = NfsServer::new(backend);
        let write_verifier = server.write_verifier();
        let metrics = server.metrics();
        let (tx, rx) = oneshot::channel::<()>();
        let join = tokio::spawn(server.serve(listeners, async move {
            let _ = rx.await;
        }));
        Self {
            nfs_port: ports.nfs,
            mount_port: ports.mount,
            portmap_port: ports.portmap_tcp.expect("portmap"),
            write_verifier,
            metrics,
            stop: Some(tx),
            join,
        }
    }

    /// `nfs://127.0.0.1<path>?nfsport=N&mountport=M` for libnfs.
    pub fn url(&self, path: &str) -> String {
        format!(
            "nfs://127.0.0.1{path}?nfsport={}&mountport={}",
            self.nfs_port, self.mount_port
        )
    }

    pub fn nfs_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.nfs_port))
    }

    /// Stop and wait until the server has returned.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let res = tokio::time::timeout(std::time::Duration::from_secs(10), &mut self.join)
            .await
            .expect("server stops within 10 s");
        res.expect("server task").expect("server result");
    }
}

/// Whether a command is on PATH.
pub fn have_tool(tool: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Skip (return true) with a loud message when libnfs-utils is missing.
pub fn skip_without_libnfs() -> bool {
    if have_tool("nfs-ls") && have_tool("nfs-cat") && have_tool("nfs-cp") {
        return false;
    }
    eprintln!(
        "\n!!!!!!!!\n!!! SKIPPED: libnfs-utils (nfs-ls, nfs-cat, nfs-cp) not installed; \
         run scripts/install-test-deps.sh\n!!!!!!!!\n"
    );
    true
}
