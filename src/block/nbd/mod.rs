//! `nbd`: a Network Block Device server for block exports.
//!
//! - [`proto`]: wire constants and the request header.
//! - [`handshake`]: fixed newstyle option haggling (NBD_OPT_GO, INFO, LIST,
//!   ABORT, EXPORT_NAME, STRUCTURED_REPLY, LIST/SET_META_CONTEXT) and the
//!   allow-list.
//! - `transmission`: requests (READ, WRITE, FLUSH, TRIM, WRITE_ZEROES,
//!   BLOCK_STATUS with base:allocation, DISC; the FUA flag) and replies.
//! - [`reply`]: option replies, simple replies, structured reply chunks.
//!
//! One task accepts connections; each connection runs its handshake (at
//! most [`HANDSHAKE_TIMEOUT`]) as a task, then its transmission phase on
//! the export it chose on threads of its own, while its task waits to close
//! it when the server stops or the export goes (requests in flight get
//! [`CLOSE_GRACE`]). Exports come from the protocol-agnostic
//! [`BlockExports`]. Multi-conn is advertised: every connection to an
//! export writes into the same write cache, and a flush commits it whole.
//! TLS (NBD_OPT_STARTTLS) is not offered; it is answered NBD_REP_ERR_UNSUP.

pub mod handshake;
pub mod proto;
pub mod reply;
mod transmission;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};

use super::registry::{BlockExports, BlockProtocol};

/// Longest request (READ, WRITE) served: 32 MiB, the size the protocol
/// document says no server should treat as an attack. Advertised as the
/// maximum block size; a longer WRITE closes its connection.
pub const MAX_REQUEST: u32 = 32 << 20;

/// A client gets this long to choose an export; then its connection closes.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a connection's thread polls its socket for the next request
/// of a client that answers each reply quickly (see `transmission`).
pub const DEFAULT_POLL: Duration = Duration::from_micros(100);

/// When the server stops or the export goes, a connection's requests in
/// flight get this long to be answered; then the connection is dropped
/// (a client that reads no replies cannot hold the server up).
pub const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// The NBD server of one registry of block exports.
pub struct NbdServer {
    registry: Arc<BlockExports>,
    timing: Timing,
}

/// How a server's connections wait: for requests, and to close.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// Longest poll for a quick client's next request.
    poll: Duration,
    /// How long requests in flight may take once the connection must close.
    close_grace: Duration,
}

impl NbdServer {
    /// A server for the NBD exports of `registry`.
    pub fn new(registry: Arc<BlockExports>) -> NbdServer {
        NbdServer {
            registry,
            timing: Timing {
                poll: DEFAULT_POLL,
                close_grace: CLOSE_GRACE,
            },
        }
    }

    /// Polls for a queue-depth-1 client's next request for up to `poll`
    /// (zero: never), instead of [`DEFAULT_POLL`].
    pub fn with_poll(mut self, poll: Duration) -> NbdServer {
        self.timing.poll = poll;
        self
    }

    /// Gives requests in flight `grace` to finish when a connection must
    /// close, instead of [`CLOSE_GRACE`].
    pub fn with_close_grace(mut self, grace: Duration) -> NbdServer {
        self.timing.close_grace = grace;
        self
    }

    /// Serves `listener` until `shutdown` completes, then stops accepting,
    /// lets every connection answer its requests in flight, and returns.
    /// Records the listening address in the registry first.
    ///
    /// # Errors
    /// A listener whose address cannot be read.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let addr = listener.local_addr()?;
        self.registry.set_listening(BlockProtocol::Nbd, addr);
        tracing::info!(%addr, "nbd server listening");
        let (stop_tx, stop_rx) = watch::channel(false);
        // Every connection holds a clone; all dropped means all are done.
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        let accept = async {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        tokio::spawn(connection(
                            stream,
                            peer,
                            self.registry.clone(),
                            stop_rx.clone(),
                            self.timing,
                            done_tx.clone(),
                        ));
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(cause = %e, "nbd accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        };
        tokio::select! {
            () = accept => {}
            () = shutdown => {}
        }
        tracing::info!("nbd server shutting down");
        let _ = stop_tx.send(true);
        drop(done_tx);
        let _ = done_rx.recv().await;
        tracing::info!("nbd server stopped");
        Ok(())
    }
}

// Debug level: an enabled span is entered on every poll of the connection.
#[tracing::instrument(level = "debug", name = "nbd", skip_all, fields(peer = %peer))]
async fn connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    registry: Arc<BlockExports>,
    mut stop: watch::Receiver<bool>,
    timing: Timing,
    _done: mpsc::Sender<()>,
) {
    tracing::debug!("nbd connection accepted");
    // Small replies must leave at once, not wait for Nagle.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(cause = %e, "set TCP_NODELAY failed");
    }
    let negotiated = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake::negotiate(&mut stream, peer.ip(), &registry)) => r,
        _ = stop.wait_for(|s| *s) => return,
    };
    let negotiated = match negotiated {
        Ok(Ok(Some(n))) => n,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::info!(cause = %e, "closing nbd connection during the handshake");
            return;
        }
        Err(_) => {
            tracing::info!("closing nbd connection: no export chosen in time");
            return;
        }
    };
    // The export may have been removed since it was looked up.
    let Some(export_use) = negotiated.export.start_use() else {
        return;
    };
    let export = negotiated.export.clone();
    tracing::debug!(export = %export.name, flags = negotiated.flags, structured = negotiated.structured, block_status = negotiated.block_status, "nbd transmission");
    export.metrics.connections.fetch_add(1, Ordering::Relaxed);
    export
        .metrics
        .connections_open
        .fetch_add(1, Ordering::Relaxed);
    let (done_tx, mut done_rx) = oneshot::channel();
    let started = stream.into_std().and_then(|socket| {
        transmission::start(socket, negotiated, export_use.clone(), timing.poll, done_tx)
    });
    match started {
        Ok(closer) => {
            let mut closed = export_use;
            let wanted = tokio::select! {
                _ = &mut done_rx => false,
                () = closed.closed() => true,
                _ = stop.wait_for(|s| *s) => true,
            };
            if wanted {
                closer.stop_reading();
                if tokio::time::timeout(timing.close_grace, &mut done_rx)
                    .await
                    .is_err()
                {
                    tracing::info!("closing nbd connection: replies not taken in time");
                    closer.abort();
                    let _ = done_rx.await;
                }
            }
        }
        Err(e) => tracing::warn!(cause = %e, "cannot serve nbd connection"),
    }
    export
        .metrics
        .connections_open
        .fetch_sub(1, Ordering::Relaxed);
    tracing::debug!("nbd connection closed");
}

#[cfg(test)]
mod tests;
