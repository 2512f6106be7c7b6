//! Accept loops and per-connection handling (binding is `listen.rs`).
//!
//! One accept loop per TCP listener (NFS, MOUNT, portmapper; every TCP
//! listener answers all three programs, so NFS and MOUNT may share a port)
//! and one UDP loop (portmapper and MOUNT).
//!
//! Per connection, a reader task splits the stream into records and spawns
//! each call as its own task, at most [`MAX_IN_FLIGHT`] at a time; replies
//! go through an mpsc channel to a writer task in completion order (RPC
//! xids let replies overtake each other), batched into vectored writes.
//! A framing error closes that connection only; everything else is answered.
//!
//! Who may connect, how many connections each address and everyone together
//! may hold, and when idle or half-sent connections are closed is
//! [`limits`](super::limits)' business: it is applied here, at accept.

use std::collections::BTreeSet;
use std::future::Future;
use std::io::IoSlice;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes};
use nfs3_types::rpc::accept_stat;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch, Semaphore};

use super::drc::{Drc, DrcKey, Seen};
use super::limits::{canonical, ConnLimits, ConnSlot, ConnTable, OTHER_MAX_RECORD};
use super::listen::NfsListeners;
use super::metrics::NfsMetrics;
use super::portmap::Ports;
use super::record::{FrameError, RecordReader, MAX_RECORD};
use super::rpc::{Call, Reply};
use super::{mount, portmap, proc, NFS_PROGRAM, NFS_VERSION};
use crate::datastore::FileOps;

/// Calls of one connection processed at once. Bounds memory (a 1 MiB WRITE
/// each) while letting a client's whole queue (ESXi, fio qd16..64) run in
/// parallel against the backend.
pub const MAX_IN_FLIGHT: usize = 64;

/// Replies gathered into one vectored write; replies that completed while
/// the socket was busy leave together.
const MAX_BATCH: usize = 64;

/// State shared by every connection and call.
pub(crate) struct ServerState {
    pub backend: Arc<dyn FileOps>,
    pub metrics: Arc<NfsMetrics>,
    /// WRITE/COMMIT verifier: new at every start, so clients re-send
    /// unstable writes a crash may have lost.
    pub write_verifier: [u8; 8],
    pub ports: Ports,
    drc: Drc,
    mounts: Mutex<BTreeSet<(IpAddr, String)>>,
    limits: ConnLimits,
    conns: Arc<ConnTable>,
}

impl ServerState {
    pub(crate) fn count_rejected(&self) {
        self.metrics.rejected_calls.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_mount(&self) {
        self.metrics.mount_calls.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn count_portmap(&self) {
        self.metrics.portmap_calls.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn remember_mount(&self, peer: IpAddr, path: &str) {
        if let Ok(mut m) = self.mounts.lock() {
            m.insert((peer, path.to_owned()));
        }
    }
    /// UMNT (one path) or UMNTALL (`None`).
    pub(crate) fn forget_mount(&self, peer: IpAddr, path: Option<&str>) {
        if let Ok(mut m) = self.mounts.lock() {
            m.retain(|(p, dir)| !(*p == peer && path.is_none_or(|x| x == dir)));
        }
    }
    /// Whether `peer` is on some export's allow-list.
    fn allowed(&self, peer: IpAddr) -> bool {
        self.backend.exports().iter().any(|e| e.allows(peer))
    }

    pub(crate) fn mounts(&self) -> Vec<(IpAddr, String)> {
        self.mounts
            .lock()
            .map(|m| m.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// An NFSv3 + MOUNT + portmapper server over one backend.
pub struct NfsServer {
    backend: Arc<dyn FileOps>,
    metrics: Arc<NfsMetrics>,
    write_verifier: [u8; 8],
    limits: ConnLimits,
}

impl NfsServer {
    /// A server for `backend`, with a fresh write verifier.
    pub fn new(backend: Arc<dyn FileOps>) -> Self {
        // Boot time in nanoseconds: differs at every start (and between
        // servers started in one process, as tests do).
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Self {
            backend,
            metrics: Arc::new(NfsMetrics::default()),
            write_verifier: nanos.to_be_bytes(),
            limits: ConnLimits::default(),
        }
    }

    /// The same server with other connection limits.
    pub fn with_limits(mut self, limits: ConnLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Counters, shared with whoever renders them.
    pub fn metrics(&self) -> Arc<NfsMetrics> {
        self.metrics.clone()
    }

    /// The WRITE/COMMIT verifier of this run.
    pub fn write_verifier(&self) -> [u8; 8] {
        self.write_verifier
    }

    /// Serve until `shutdown` completes, then stop accepting, let calls in
    /// flight finish, and return.
    ///
    /// # Errors
    /// A listener whose address cannot be read.
    pub async fn serve(
        self,
        listeners: NfsListeners,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let ports = listeners.ports()?;
        let state = Arc::new(ServerState {
            backend: self.backend,
            metrics: self.metrics,
            write_verifier: self.write_verifier,
            ports,
            drc: Drc::default(),
            mounts: Mutex::new(BTreeSet::new()),
            limits: self.limits,
            conns: Arc::new(ConnTable::default()),
        });
        tracing::info!(?ports, limits = ?state.limits, "nfs server listening");
        let (stop_tx, stop_rx) = watch::channel(false);
        // Every task holds a clone; when all are dropped, all are done.
        let (done_tx, mut done_rx) = mpsc::channel::<()>(1);

        // Only the portmapper's port takes connections from anyone.
        let mut tcp = vec![(listeners.nfs, false)];
        tcp.extend(listeners.mount.map(|l| (l, false)));
        tcp.extend(listeners.portmap_tcp.map(|l| (l, true)));
        for (listener, portmap) in tcp {
            tokio::spawn(accept_loop(
                listener,
                portmap,
                state.clone(),
                stop_rx.clone(),
                done_tx.clone(),
            ));
        }
        if let Some(sock) = listeners.portmap_udp {
            tokio::spawn(udp_loop(
                sock,
                state.clone(),
                stop_rx.clone(),
                done_tx.clone(),
            ));
        }
        drop(done_tx);

        shutdown.await;
        tracing::info!("nfs server shutting down");
        let _ = stop_tx.send(true);
        let _ = done_rx.recv().await;
        tracing::info!("nfs server stopped");
        Ok(())
    }
}

async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Accepts connections; `portmap`: the portmapper's listener, which takes
/// addresses on no allow-list too (see `limits`).
async fn accept_loop(
    listener: TcpListener,
    portmap: bool,
    state: Arc<ServerState>,
    stop: watch::Receiver<bool>,
    done: mpsc::Sender<()>,
) {
    loop {
        tokio::select! {
            res = listener.accept() => match res {
                Ok((stream, peer)) => {
                    let ip = canonical(peer.ip());
                    let allowed = state.allowed(ip);
                    let slot = if allowed || portmap {
                        state.conns.admit(ip, allowed, &state.limits)
                    } else {
                        None
                    };
                    let Some(slot) = slot else {
                        // Closed before a byte is read.
                        tracing::debug!(peer = %peer, allowed, "connection refused");
                        state.metrics.connections_refused.fetch_add(1, Ordering::Relaxed);
                        drop(stream);
                        continue;
                    };
                    let conn = Conn { peer, allowed, _slot: slot };
                    tokio::spawn(connection(stream, conn, state.clone(), stop.clone(), done.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(cause = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            () = stopped(stop.clone()) => break,
        }
    }
}

/// An admitted connection: who, and its place in the connection table.
struct Conn {
    peer: SocketAddr,
    /// On some export's allow-list (else: the portmapper only).
    allowed: bool,
    _slot: ConnSlot,
}

#[tracing::instrument(name = "conn", skip_all, fields(peer = %conn.peer))]
async fn connection(
    stream: TcpStream,
    conn: Conn,
    state: Arc<ServerState>,
    stop: watch::Receiver<bool>,
    _done: mpsc::Sender<()>,
) {
    let (peer, allowed) = (conn.peer, conn.allowed);
    tracing::debug!("connection accepted");
    state
        .metrics
        .connections_accepted
        .fetch_add(1, Ordering::Relaxed);
    state
        .metrics
        .connections_open
        .fetch_add(1, Ordering::Relaxed);
    // Small replies must leave at once, not wait for Nagle.
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(cause = %e, "set TCP_NODELAY failed");
    }
    let (rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel::<[Bytes; 3]>(MAX_IN_FLIGHT);
    let writer = tokio::spawn(write_loop(wr, rx));
    let limit = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let max_record = if allowed {
        MAX_RECORD
    } else {
        OTHER_MAX_RECORD
    };
    let mut records = RecordReader::with_limit(rd, max_record);
    let idle = Some(state.limits.idle_timeout_for(allowed));
    let record_timeout = Some(state.limits.record_timeout);
    loop {
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = stopped(stop.clone()) => break,
        };
        let record = tokio::select! {
            r = records.next_record_within(idle, record_timeout) => r,
            () = stopped(stop.clone()) => break,
        };
        match record {
            // Alone on the connection (a queue-depth-1 client): answer here
            // rather than spawning, saving a task hand-off per call. Any
            // other call already buffered or in flight gets its own task, so
            // concurrent clients keep their parallelism.
            Ok(Some(record))
                if limit.available_permits() + 1 == MAX_IN_FLIGHT && !records.has_buffered() =>
            {
                if let Some(reply) = answer(&state, peer.ip(), allowed, record).await {
                    let _ = tx.send(reply).await;
                }
                drop(permit);
            }
            Ok(Some(record)) => {
                let state = state.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Some(reply) = answer(&state, peer.ip(), allowed, record).await {
                        // A closed writer means the connection is gone.
                        let _ = tx.send(reply).await;
                    }
                    drop(permit);
                });
            }
            Ok(None) => break,
            // Silent, but waiting for replies to calls in flight: not idle.
            Err(FrameError::Idle) if limit.available_permits() + 1 < MAX_IN_FLIGHT => {}
            Err(e @ (FrameError::Idle | FrameError::Stalled)) => {
                tracing::debug!(cause = %e, "closing connection: timed out");
                state
                    .metrics
                    .connections_timed_out
                    .fetch_add(1, Ordering::Relaxed);
                break;
            }
            // A client that resets its connection (libnfs does at exit) is
            // not a protocol problem.
            Err(FrameError::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                tracing::debug!("connection reset by client");
                break;
            }
            Err(e) => {
                tracing::info!(cause = %e, "closing connection: bad record");
                state.metrics.framing_errors.fetch_add(1, Ordering::Relaxed);
                break;
            }
        }
    }
    drop(tx);
    let _ = writer.await;
    state
        .metrics
        .connections_open
        .fetch_sub(1, Ordering::Relaxed);
    tracing::debug!("connection closed");
}

/// Parse and answer one record; `None` when nothing is to be sent back.
/// A peer on no allow-list (`allowed` false) gets the portmapper only.
async fn answer(
    state: &ServerState,
    peer: IpAddr,
    allowed: bool,
    record: Bytes,
) -> Option<[Bytes; 3]> {
    let call = match Call::parse(record) {
        Ok(call) => call,
        Err(e) => {
            tracing::debug!(error = ?e, "bad call header");
            state.count_rejected();
            return Reply::for_call_error(&e).map(Reply::into_record);
        }
    };
    if !allowed && call.prog != portmap::PROGRAM {
        state.count_rejected();
        let refused = Reply::auth_error(call.xid, nfs3_types::rpc::auth_stat::AUTH_TOOWEAK);
        return Some(refused.into_record());
    }
    let reply = match call.prog {
        NFS_PROGRAM if call.vers == NFS_VERSION => return nfs_call(state, peer, call).await,
        NFS_PROGRAM => Reply::prog_mismatch(call.xid, NFS_VERSION, NFS_VERSION),
        mount::PROGRAM => mount::dispatch(state, peer, call).await,
        portmap::PROGRAM => portmap::dispatch(state, call),
        _ => {
            state.count_rejected();
            Reply::accept_error(call.xid, accept_stat::PROG_UNAVAIL)
        }
    };
    Some(reply.into_record())
}

/// An NFS call, through the duplicate request cache when it is not
/// idempotent.
async fn nfs_call(state: &ServerState, peer: IpAddr, call: Call) -> Option<[Bytes; 3]> {
    let Some(key) = DrcKey::for_call(peer, call.xid, call.proc_num, call.args.as_bytes()) else {
        return Some(proc::dispatch(state, peer, call).await.into_record());
    };
    match state.drc.start(&key) {
        Seen::New => {}
        Seen::InProgress => {
            state.metrics.drc_hits.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Seen::Done(head) => {
            tracing::debug!(xid = call.xid, "retransmission answered from cache");
            state.metrics.drc_hits.fetch_add(1, Ordering::Relaxed);
            return Some([head, Bytes::new(), Bytes::new()]);
        }
    }
    let record = proc::dispatch(state, peer, call).await.into_record();
    // These procedures have no bulk tail: the head is the whole record.
    state.drc.finish(key, record[0].clone());
    Some(record)
}

async fn write_loop(mut wr: OwnedWriteHalf, mut rx: mpsc::Receiver<[Bytes; 3]>) {
    let mut batch: Vec<Bytes> = Vec::with_capacity(3 * MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.extend(first.into_iter().filter(|b| !b.is_empty()));
        let mut replies = 1;
        while replies < MAX_BATCH {
            match rx.try_recv() {
                Ok(more) => batch.extend(more.into_iter().filter(|b| !b.is_empty())),
                Err(_) => break,
            }
            replies += 1;
        }
        if let Err(e) = write_all(&mut wr, &mut batch).await {
            tracing::debug!(cause = %e, "writing replies failed");
            return;
        }
    }
    let _ = wr.shutdown().await;
}

/// Write every buffer with as few syscalls as the socket allows.
async fn write_all(wr: &mut OwnedWriteHalf, bufs: &mut Vec<Bytes>) -> std::io::Result<()> {
    let mut first = 0;
    while first < bufs.len() {
        let slices: Vec<IoSlice<'_>> = bufs[first..]
            .iter()
            .take(1024)
            .map(|b| IoSlice::new(b))
            .collect();
        let mut n = wr.write_vectored(&slices).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while n > 0 && first < bufs.len() {
            let len = bufs[first].len();
            if n >= len {
                n -= len;
                first += 1;
            } else {
                bufs[first].advance(n);
                n = 0;
            }
        }
    }
    bufs.clear();
    Ok(())
}

async fn udp_loop(
    sock: UdpSocket,
    state: Arc<ServerState>,
    stop: watch::Receiver<bool>,
    _done: mpsc::Sender<()>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (n, from) = tokio::select! {
            r = sock.recv_from(&mut buf) => match r {
                Ok(v) => v,
                Err(e) => {
                    tracing::debug!(cause = %e, "udp receive failed");
                    continue;
                }
            },
            () = stopped(stop.clone()) => break,
        };
        let record = Bytes::copy_from_slice(&buf[..n]);
        let reply = match Call::parse(record) {
            Ok(call) => match call.prog {
                portmap::PROGRAM => portmap::dispatch(&state, call),
                mount::PROGRAM => mount::dispatch(&state, from.ip(), call).await,
                _ => {
                    state.count_rejected();
                    Reply::accept_error(call.xid, accept_stat::PROG_UNAVAIL)
                }
            },
            Err(e) => match Reply::for_call_error(&e) {
                Some(r) => r,
                None => continue,
            },
        };
        if let Err(e) = sock.send_to(&reply.into_datagram(), from).await {
            tracing::debug!(cause = %e, peer = %from, "udp send failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn write_all_handles_partial_buffers() {
        let (client, server) = {
            let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let addr = l.local_addr().expect("addr");
            let c = TcpStream::connect(addr).await.expect("connect");
            let (s, _) = l.accept().await.expect("accept");
            (c, s)
        };
        let (_, mut wr) = server.into_split();
        let big = Bytes::from(vec![7u8; 8 << 20]);
        let mut bufs = vec![
            Bytes::from_static(b"head"),
            big.clone(),
            Bytes::from_static(b"x"),
        ];
        let reader = tokio::spawn(async move {
            let mut client = client;
            let mut all = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut client, &mut all)
                .await
                .expect("read");
            all
        });
        write_all(&mut wr, &mut bufs).await.expect("write");
        assert!(bufs.is_empty());
        drop(wr);
        let all = reader.await.expect("join");
        assert_eq!(all.len(), 4 + (8 << 20) + 1);
        assert_eq!(&all[..4], b"head");
        assert_eq!(all[all.len() - 1], b'x');
    }
}
