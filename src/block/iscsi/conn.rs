//! [`Conn`]: the state of one connection in full feature phase shared by
//! its reader loop and its command tasks, and the writer task that owns the
//! socket's write half.
//!
//! Every outgoing PDU goes through one bounded channel to the writer, which
//! stamps its sequence numbers as it sends it: StatSN is taken in the order
//! statuses leave, ExpCmdSN and MaxCmdSN are read from the [`Window`] at
//! that moment. PDUs queued together are written with one flush.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, Notify, Semaphore};

use super::pdu::{op, OutPdu, Stamp, BHS_LEN, RESERVED_TAG};
use super::scsi::{Nexus, Response};
use super::target::IscsiTarget;
use super::text::Params;
use crate::block::registry::ExportUse;

/// Commands an initiator may have outstanding: MaxCmdSN runs this far ahead
/// of the oldest command not yet answered.
pub const QUEUE_DEPTH: u32 = 128;

/// Bytes of command data (read results, solicited write data) one
/// connection may hold at once; further commands wait for their turn.
pub const BUFFER_BUDGET: usize = 64 << 20;

/// PDUs queued to the writer before senders wait.
const WRITER_QUEUE: usize = 256;

/// The command window: ExpCmdSN advances as commands arrive, MaxCmdSN as
/// they complete, so at most [`QUEUE_DEPTH`] are in flight.
#[derive(Debug)]
pub struct Window {
    /// Next CmdSN expected.
    pub exp_cmd_sn: AtomicU32,
    /// Highest CmdSN the initiator may send.
    pub max_cmd_sn: AtomicU32,
}

impl Window {
    /// A window starting at `cmd_sn` (the login's CmdSN).
    pub fn new(cmd_sn: u32) -> Window {
        Window {
            exp_cmd_sn: AtomicU32::new(cmd_sn),
            max_cmd_sn: AtomicU32::new(cmd_sn.wrapping_add(QUEUE_DEPTH - 1)),
        }
    }

    /// Whether `sn` is the next expected CmdSN; if so takes it.
    pub fn accept(&self, sn: u32) -> bool {
        // Only the reader advances ExpCmdSN, so load + store is race-free.
        let exp = self.exp_cmd_sn.load(Ordering::Acquire);
        if sn != exp {
            return false;
        }
        self.exp_cmd_sn
            .store(exp.wrapping_add(1), Ordering::Release);
        true
    }

    /// One accepted command completed: the window slides by one.
    pub fn complete(&self) {
        self.max_cmd_sn.fetch_add(1, Ordering::AcqRel);
    }
}

/// A command in flight, as task management sees it.
pub struct TaskEntry {
    /// LUN field of the command.
    pub lun: u64,
    /// CmdSN of the command.
    pub cmd_sn: u32,
    /// Set by ABORT TASK / LUN RESET: the task sends no response.
    pub aborted: AtomicBool,
    /// Wakes the task while it waits for data, so an abort ends it there.
    pub wake: Notify,
    /// Notified when the task has finished (after any device operation).
    pub finished: Notify,
    /// Whether the task has finished.
    pub done: AtomicBool,
}

/// Where a write's data-out stands, as the reader checks each Data-Out.
#[derive(Debug)]
pub enum Phase {
    /// Unsolicited Data-Out (TTT 0xffffffff) expected up to `end`.
    Unsolicited {
        /// Offset where unsolicited data ends.
        end: u32,
        /// DataSN of the next Data-Out.
        data_sn: u32,
    },
    /// Waiting for the task to solicit (no Data-Out is valid now).
    Idle,
    /// A burst solicited by an R2T.
    Burst {
        /// Its Target Transfer Tag.
        ttt: u32,
        /// Offset where it ends.
        end: u32,
        /// DataSN of the next Data-Out.
        data_sn: u32,
    },
}

/// The data of one write being collected.
pub struct Collect {
    /// Data received so far (offsets arrive in order: DataPDUInOrder).
    pub buf: BytesMut,
    /// What the next Data-Out must be.
    pub phase: Phase,
    /// Wakes the task when a phase is complete.
    pub notify: Arc<Notify>,
}

/// One connection in full feature phase.
pub struct Conn {
    /// The target (normal sessions).
    pub target: Option<Arc<IscsiTarget>>,
    /// The use of the target's export, released when the connection and
    /// every command holding it (through `Arc<Conn>`) are gone.
    pub export_use: Option<ExportUse>,
    /// The I_T nexus.
    pub nexus: Nexus,
    /// Negotiated parameters.
    pub params: Params,
    /// The command window (shared with the writer).
    pub window: Arc<Window>,
    /// Outgoing PDUs.
    pub tx: mpsc::Sender<OutPdu>,
    /// Commands in flight by ITT.
    pub tasks: Mutex<HashMap<u32, Arc<TaskEntry>>>,
    /// Writes collecting data, by ITT.
    pub collects: Mutex<HashMap<u32, Collect>>,
    /// Bytes of buffers (KiB permits) commands may hold.
    pub budget: Semaphore,
    /// Next Target Transfer Tag.
    next_ttt: AtomicU32,
    /// The peer, for logs.
    pub peer: SocketAddr,
}

impl Conn {
    /// A connection in full feature phase.
    pub fn new(
        target: Option<Arc<IscsiTarget>>,
        export_use: Option<ExportUse>,
        nexus: Nexus,
        params: Params,
        cmd_sn: u32,
        tx: mpsc::Sender<OutPdu>,
        peer: SocketAddr,
    ) -> Conn {
        Conn {
            target,
            export_use,
            nexus,
            params,
            window: Arc::new(Window::new(cmd_sn)),
            tx,
            tasks: Mutex::new(HashMap::new()),
            collects: Mutex::new(HashMap::new()),
            budget: Semaphore::new(BUFFER_BUDGET >> 10),
            next_ttt: AtomicU32::new(1),
            peer,
        }
    }

    /// A fresh Target Transfer Tag (never the reserved one).
    pub fn ttt(&self) -> u32 {
        loop {
            let t = self.next_ttt.fetch_add(1, Ordering::Relaxed);
            if t != RESERVED_TAG {
                return t;
            }
        }
    }

    /// Queues a PDU; `false` when the connection is gone.
    pub async fn send(&self, pdu: OutPdu) -> bool {
        self.tx.send(pdu).await.is_ok()
    }

    /// The tasks table, poison-tolerant.
    pub fn tasks(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<TaskEntry>>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The collects table, poison-tolerant.
    pub fn collects(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Collect>> {
        self.collects.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends a command's answer: Data-In PDUs (status in the last one when
    /// it is GOOD), or a SCSI Response with sense data. `edtl` is what the
    /// initiator expects; more data is cut (overflow), less is reported as
    /// underflow. `data_sn` counts PDUs already sent for the task (R2Ts).
    pub async fn respond(&self, itt: u32, lun: u64, edtl: u32, resp: Response, data_sn: u32) {
        let len = resp.data.len() as u64;
        let (flags, residual) = residual(len, u64::from(edtl));
        let send = len.min(u64::from(edtl)) as usize;
        if resp.ok() && send > 0 {
            let seg = self.params.send_data_segment_length.max(512) as usize;
            let burst = self.params.max_burst_length.max(512) as usize;
            let mut at = 0usize;
            let mut sn = 0u32;
            while at < send {
                // A PDU never crosses a burst boundary: each burst is a
                // sequence ending with the F bit.
                let burst_end = (at / burst + 1) * burst;
                let end = (at + seg).min(send).min(burst_end);
                let last = end == send;
                let mut f = if end == burst_end || last { 0x80 } else { 0 };
                if last {
                    f |= 0x01 | flags;
                }
                let stamp = if last { Stamp::Status } else { Stamp::Window };
                let mut p = OutPdu::new(op::DATA_IN, f, itt, resp.data.slice(at..end), stamp);
                p.set_lun(lun)
                    .set_u32(20, RESERVED_TAG)
                    .set_u32(36, sn)
                    .set_u32(40, at as u32);
                if last {
                    p.bhs[3] = resp.status;
                    p.set_u32(44, residual);
                }
                if !self.send(p).await {
                    return;
                }
                at = end;
                sn += 1;
            }
            return;
        }
        let data = match &resp.sense {
            Some(sense) => {
                let mut d = BytesMut::with_capacity(2 + sense.len());
                d.extend_from_slice(&(sense.len() as u16).to_be_bytes());
                d.extend_from_slice(sense);
                d.freeze()
            }
            None => Bytes::new(),
        };
        let (flags, residual) = if resp.ok() {
            (flags, residual)
        } else {
            self::residual(0, u64::from(edtl))
        };
        self.send(scsi_response(
            itt,
            resp.status,
            flags,
            residual,
            data,
            data_sn,
        ))
        .await;
    }
}

/// The residual flags and count of a transfer: `have` bytes for `expected`.
pub fn residual(have: u64, expected: u64) -> (u8, u32) {
    if have > expected {
        (0x04, (have - expected).min(u64::from(u32::MAX)) as u32)
    } else if have < expected {
        (0x02, (expected - have).min(u64::from(u32::MAX)) as u32)
    } else {
        (0, 0)
    }
}

/// A SCSI Response PDU.
pub fn scsi_response(
    itt: u32,
    status: u8,
    residual_flags: u8,
    residual: u32,
    data: Bytes,
    exp_data_sn: u32,
) -> OutPdu {
    let mut p = OutPdu::new(
        op::SCSI_RESP,
        0x80 | residual_flags,
        itt,
        data,
        Stamp::Status,
    );
    p.bhs[3] = status;
    p.set_u32(20, 0)
        .set_u32(36, exp_data_sn)
        .set_u32(44, residual);
    p
}

/// A Reject of the PDU whose header is `bhs`.
pub fn reject(reason: u8, bhs: &[u8; BHS_LEN]) -> OutPdu {
    let mut p = OutPdu::new(
        op::REJECT,
        0x80,
        RESERVED_TAG,
        Bytes::copy_from_slice(bhs),
        Stamp::Status,
    );
    p.bhs[2] = reason;
    p
}

/// Writes PDUs from `rx` to `w` until the channel closes or the socket
/// fails, stamping sequence numbers from `stat_sn` and `window`.
pub async fn writer<W: AsyncWrite + Unpin>(
    w: W,
    mut rx: mpsc::Receiver<OutPdu>,
    window: Arc<Window>,
    mut stat_sn: u32,
) -> std::io::Result<()> {
    let mut w = BufWriter::with_capacity(256 << 10, w);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(mut pdu) = next {
            let exp = window.exp_cmd_sn.load(Ordering::Acquire);
            let max = window.max_cmd_sn.load(Ordering::Acquire);
            stat_sn = pdu.stamp(stat_sn, exp, max);
            w.write_all(&pdu.bhs).await?;
            if !pdu.data.is_empty() {
                w.write_all(&pdu.data).await?;
                let pad = pdu.padding();
                if pad > 0 {
                    w.write_all(&[0u8; 3][..pad]).await?;
                }
            }
            next = rx.try_recv().ok();
        }
        w.flush().await?;
    }
    w.shutdown().await.ok();
    Ok(())
}

/// The channel a connection's PDUs go through.
pub fn channel() -> (mpsc::Sender<OutPdu>, mpsc::Receiver<OutPdu>) {
    mpsc::channel(WRITER_QUEUE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn residuals_and_window() {
        assert_eq!(residual(512, 0), (0x04, 512));
        assert_eq!(residual(512, 10_000), (0x02, 9488));
        assert_eq!(residual(512, 512), (0, 0));
        let w = Window::new(u32::MAX);
        assert!(!w.accept(0));
        assert!(w.accept(u32::MAX));
        assert!(w.accept(0), "CmdSN wraps");
        assert_eq!(w.max_cmd_sn.load(Ordering::Relaxed), QUEUE_DEPTH - 2);
        w.complete();
        assert_eq!(w.max_cmd_sn.load(Ordering::Relaxed), QUEUE_DEPTH - 1);
    }
}
