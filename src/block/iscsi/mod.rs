//! `iscsi`: an iSCSI target (RFC 7143) for block exports, on tokio, so
//! Windows hosts (SQL Server instant recovery), ESXi's software iSCSI
//! adapter and QEMU can attach a backup's disk.
//!
//! # Map
//!
//! ```text
//! mod        IscsiServer: listener, one task per connection, shutdown
//!  ├─ login    login phase: stages, AuthMethod/CHAP, allow-lists, TSIH
//!  │   ├─ chap   CHAP (MD5, optionally mutual)
//!  │   └─ text   key=value text, negotiation of the operational keys
//!  ├─ session  full feature phase: CmdSN window, NOP, task management,
//!  │           SendTargets, logout
//!  ├─ command  SCSI Command + Data-Out: immediate/unsolicited data, R2T
//!  ├─ conn     shared connection state, Data-In/status, the writer task
//!  ├─ pdu      BHS/AHS/data segment framing, lengths checked first
//!  ├─ target   IscsiTarget (an export's IQN, LUN 0, allow-lists),
//!  │           TargetSet, ExportTargets (the registry's iSCSI exports)
//!  └─ scsi/    the direct-access device: INQUIRY/VPD, MODE SENSE/SELECT,
//!              READ/WRITE/UNMAP/..., reservations, sense data
//! ```
//!
//! # What is negotiated
//!
//! One connection per session (MaxConnections=1), ErrorRecoveryLevel 0 (a
//! broken connection fails its commands; the initiator logs in again), no
//! digests, no markers, DataPDUInOrder and DataSequenceInOrder, one
//! outstanding R2T. MaxRecvDataSegmentLength, MaxBurstLength,
//! FirstBurstLength, InitialR2T and ImmediateData are negotiated within
//! [`Limits`]. Each target has one LUN, 0, with 512-byte logical blocks.
//!
//! # Access control
//!
//! A target allows initiators by address (an empty list allows nobody) and
//! by name (an empty list allows any name), and may require CHAP. Others
//! are refused at login with an authorization or authentication failure;
//! discovery sessions see only the targets they could log in to.
//!
//! # Robustness
//!
//! Lengths from the wire are checked before anything is allocated (data
//! segments against the declared MaxRecvDataSegmentLength, command data
//! against [`command::MAX_DATA_OUT`], buffers against a per-connection
//! budget); a malformed PDU closes only its own connection; a login must
//! finish within [`LOGIN_TIMEOUT`].

pub mod chap;
pub mod command;
pub mod conn;
pub mod login;
pub mod pdu;
pub mod scsi;
pub mod session;
pub mod target;
pub mod text;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::BufReader;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

pub use chap::ChapConfig;
pub use target::{export_of, Access, ExportTargets, IscsiTarget, TargetSet};
pub use text::Limits;

use login::SessionKind;
use scsi::Nexus;

/// The port IANA assigned to iSCSI.
pub const DEFAULT_PORT: u16 = 3260;

/// A connection gets this long to log in; then it closes.
pub const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The iSCSI server of one set of targets.
pub struct IscsiServer {
    targets: Arc<dyn TargetSet>,
    limits: Limits,
    next_tsih: AtomicU16,
    next_nexus: AtomicU64,
}

impl IscsiServer {
    /// A server for `targets` with the default [`Limits`].
    pub fn new(targets: Arc<dyn TargetSet>) -> Arc<IscsiServer> {
        Self::with_limits(targets, Limits::default())
    }

    /// A server for `targets` negotiating within `limits`.
    pub fn with_limits(targets: Arc<dyn TargetSet>, limits: Limits) -> Arc<IscsiServer> {
        Arc::new(IscsiServer {
            targets,
            limits,
            next_tsih: AtomicU16::new(1),
            next_nexus: AtomicU64::new(1),
        })
    }

    fn tsih(&self) -> u16 {
        loop {
            let t = self.next_tsih.fetch_add(1, Ordering::Relaxed);
            if t != 0 {
                return t;
            }
        }
    }

    /// Serves `listener` until `shutdown` completes, then closes every
    /// connection (commands in flight finish their device operation first)
    /// and returns.
    ///
    /// # Errors
    /// A listener whose address cannot be read.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "iscsi target listening");
        let (stop_tx, stop_rx) = watch::channel(false);
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);
        let accept = async {
            loop {
                match listener.accept().await {
                    Ok((stream, peer)) => {
                        let server = self.clone();
                        let stop = stop_rx.clone();
                        let done = done_tx.clone();
                        tokio::spawn(async move {
                            server.connection(stream, peer, stop).await;
                            drop(done);
                        });
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: keep serving.
                        tracing::warn!(cause = %e, "iscsi: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        };
        tokio::select! {
            _ = accept => {}
            _ = shutdown => {}
        }
        stop_tx.send_replace(true);
        drop(done_tx);
        let _ = done_rx.recv().await;
        tracing::info!(%addr, "iscsi target stopped");
        Ok(())
    }

    /// One connection from login to close.
    async fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        stop: watch::Receiver<bool>,
    ) {
        let _ = stream.set_nodelay(true);
        let local = match stream.local_addr() {
            Ok(a) => a,
            Err(_) => return,
        };
        let (rd, mut wr) = stream.into_split();
        let mut rd = BufReader::with_capacity(256 << 10, rd);
        let login = tokio::time::timeout(
            LOGIN_TIMEOUT,
            login::login(
                &mut rd,
                &mut wr,
                peer.ip(),
                &*self.targets,
                self.limits,
                self.tsih(),
            ),
        )
        .await;
        let login = match login {
            Ok(Ok(l)) => l,
            Ok(Err(e)) => {
                tracing::info!(%peer, cause = %e, "iscsi: login failed");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, "iscsi: login timed out");
                return;
            }
        };
        let target = match &login.kind {
            SessionKind::Normal(t) => Some(t.clone()),
            SessionKind::Discovery => None,
        };
        let nexus = Nexus {
            id: self.next_nexus.fetch_add(1, Ordering::Relaxed),
            initiator_port: format!("{},i,0x{}", login.initiator, hex::encode(login.isid)),
        };
        tracing::info!(
            %peer,
            initiator = %login.initiator,
            target = target.as_ref().map_or("(discovery)", |t| t.iqn.as_str()),
            "iscsi: session started"
        );
        // Held by the connection and (through it) every command in flight:
        // removing the export closes the session and waits for them.
        let export_use = match &target {
            Some(t) => match t.export.start_use() {
                Some(u) => Some(u),
                None => {
                    tracing::info!(%peer, target = %t.iqn, "iscsi: target removed during login");
                    return;
                }
            },
            None => None,
        };
        let _open = target.as_ref().map(|t| OpenGuard::new(t.clone()));
        let (tx, rx) = conn::channel();
        let c = Arc::new(conn::Conn::new(
            target,
            export_use,
            nexus,
            login.params,
            login.cmd_sn,
            tx,
            peer,
        ));
        let writer = tokio::spawn(conn::writer(wr, rx, c.window.clone(), login.stat_sn));
        let discovery = session::Discovery {
            targets: self.targets.clone(),
            initiator: login.initiator.clone(),
            peer: peer.ip(),
            local,
        };
        let end = session::run(&mut rd, c.clone(), discovery, stop).await;
        match &end {
            session::End::Protocol(cause) => {
                tracing::warn!(%peer, initiator = %login.initiator, %cause, "iscsi: connection closed on a protocol error")
            }
            other => {
                tracing::info!(%peer, initiator = %login.initiator, end = ?other, "iscsi: session ended")
            }
        }
        // The writer ends once the last task has dropped its sender; a
        // logout response is flushed before the socket closes.
        drop(c);
        if matches!(end, session::End::Logout) {
            let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
        } else {
            writer.abort();
        }
    }
}

/// Counts a session as open while it lives.
struct OpenGuard(Arc<IscsiTarget>);

impl OpenGuard {
    fn new(t: Arc<IscsiTarget>) -> OpenGuard {
        t.metrics().connections_open.fetch_add(1, Ordering::Relaxed);
        OpenGuard(t)
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0
            .metrics()
            .connections_open
            .fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests;
