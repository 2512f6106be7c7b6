//! The full feature phase of one connection: the reader loop, which checks
//! each PDU's CmdSN against the window and dispatches it (SCSI commands and
//! their Data-Out, NOP-Out, task management, text requests with
//! SendTargets, logout), until the initiator logs out, the connection
//! breaks or breaks the protocol, the target is removed or the server stops.
//!
//! CmdSN rules (RFC 7143 §4.2.2.1): a non-immediate PDU must carry the next
//! expected CmdSN; one outside the window, or a duplicate, is dropped
//! silently. Immediate PDUs (task management, NOP-Out pings) are served at
//! once and do not take a CmdSN.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncRead;
use tokio::sync::watch;

use super::command::{is_lun0, on_command, on_data_out, ProtocolError};
use super::conn::{reject, Conn, TaskEntry};
use super::pdu::{op, read_pdu, reject as reason, OutPdu, Pdu, PduError, Stamp, RESERVED_TAG};
use super::target::{IscsiTarget, TargetSet};
use super::text;
use crate::block::registry::ExportUse;

/// How long a logout waits for commands in flight.
const LOGOUT_DRAIN: Duration = Duration::from_secs(30);

/// Most text a SendTargets answer holds (one PDU or a continued sequence).
const MAX_TEXT: usize = 1 << 20;

/// Why the full feature phase ended.
#[derive(Debug)]
pub enum End {
    /// The initiator logged out.
    Logout,
    /// The connection closed or failed.
    Closed,
    /// The initiator broke the protocol.
    Protocol(String),
    /// The target was removed or the server stops.
    Stopped,
}

/// Where SendTargets gets its answer.
pub struct Discovery {
    /// Every target of the server.
    pub targets: Arc<dyn TargetSet>,
    /// The initiator's name, for the allow-lists.
    pub initiator: String,
    /// The initiator's address.
    pub peer: IpAddr,
    /// The address the initiator reached us on (TargetAddress).
    pub local: SocketAddr,
}

/// Continuation state of a long Text Response.
struct Pending {
    ttt: u32,
    rest: Bytes,
}

/// Runs the full feature phase on `r` until it ends.
pub async fn run<R: AsyncRead + Unpin>(
    r: &mut R,
    conn: Arc<Conn>,
    discovery: Discovery,
    mut stop: watch::Receiver<bool>,
) -> End {
    let mut target_closed = conn.export_use.clone();
    let mut pending: Option<Pending> = None;
    let max = conn.params.recv_data_segment_length;
    let end = loop {
        let pdu = tokio::select! {
            res = read_pdu(r, max) => res,
            _ = stop.wait_for(|s| *s) => break End::Stopped,
            _ = closed(&mut target_closed) => break End::Stopped,
        };
        let pdu = match pdu {
            Ok(p) => p,
            Err(PduError::Closed) => break End::Closed,
            Err(PduError::Io(e)) => break End::Protocol(e.to_string()),
            Err(e) => break End::Protocol(e.to_string()),
        };
        match handle(&conn, pdu, &discovery, &mut pending).await {
            Ok(None) => {}
            Ok(Some(end)) => break end,
            Err(e) => break End::Protocol(e.to_string()),
        }
    };
    if !matches!(end, End::Logout) {
        // Nobody will read answers any more: tasks still running finish
        // their device operation and send nothing.
        for t in conn.tasks().values() {
            t.aborted.store(true, Ordering::Release);
            t.wake.notify_one();
        }
    }
    if let Some(t) = &conn.target {
        t.lu.nexus_lost(&conn.nexus);
    }
    end
}

async fn closed(export_use: &mut Option<ExportUse>) {
    match export_use {
        Some(u) => u.closed().await,
        None => std::future::pending().await,
    }
}

/// Takes the PDU's CmdSN if it is not immediate; `false`: drop the PDU.
fn take_cmd_sn(conn: &Conn, pdu: &Pdu) -> Option<bool> {
    if pdu.immediate() {
        return Some(false);
    }
    if conn.window.accept(pdu.cmd_sn()) {
        Some(true)
    } else {
        tracing::debug!(
            peer = %conn.peer,
            cmd_sn = pdu.cmd_sn(),
            exp_cmd_sn = conn.window.exp_cmd_sn.load(Ordering::Relaxed),
            "iscsi: command outside the CmdSN window dropped"
        );
        None
    }
}

async fn handle(
    conn: &Arc<Conn>,
    pdu: Pdu,
    discovery: &Discovery,
    pending: &mut Option<Pending>,
) -> Result<Option<End>, ProtocolError> {
    match pdu.opcode() {
        op::SCSI_CMD => {
            if conn.target.is_none() {
                return Err(ProtocolError("SCSI command in a discovery session"));
            }
            let Some(counted) = take_cmd_sn(conn, &pdu) else {
                return Ok(None);
            };
            on_command(conn, pdu, counted)?;
        }
        op::DATA_OUT => on_data_out(conn, &pdu)?,
        op::NOP_OUT => {
            let Some(counted) = take_cmd_sn(conn, &pdu) else {
                return Ok(None);
            };
            if counted {
                conn.window.complete();
            }
            if pdu.itt() != RESERVED_TAG {
                // Echo the ping data, no longer than the initiator accepts.
                let n = pdu
                    .data
                    .len()
                    .min(conn.params.send_data_segment_length as usize);
                let mut p = OutPdu::new(
                    op::NOP_IN,
                    0x80,
                    pdu.itt(),
                    pdu.data.slice(..n),
                    Stamp::Status,
                );
                p.set_lun(pdu.lun()).set_u32(20, RESERVED_TAG);
                conn.send(p).await;
            }
        }
        op::TMF_REQ => {
            let Some(counted) = take_cmd_sn(conn, &pdu) else {
                return Ok(None);
            };
            // Waiting for aborted tasks must not stop the reader.
            let conn = conn.clone();
            tokio::spawn(async move {
                task_management(&conn, &pdu).await;
                if counted {
                    conn.window.complete();
                }
            });
        }
        op::TEXT_REQ => {
            let Some(counted) = take_cmd_sn(conn, &pdu) else {
                return Ok(None);
            };
            if counted {
                conn.window.complete();
            }
            text_request(conn, &pdu, discovery, pending).await?;
        }
        op::LOGOUT_REQ => {
            let Some(counted) = take_cmd_sn(conn, &pdu) else {
                return Ok(None);
            };
            if counted {
                conn.window.complete();
            }
            let reason_code = pdu.flags() & 0x7f;
            let response = if reason_code == 2 { 2 } else { 0 };
            drain(conn).await;
            let mut p = OutPdu::new(
                op::LOGOUT_RESP,
                0x80,
                pdu.itt(),
                Bytes::new(),
                Stamp::Status,
            );
            p.bhs[2] = response;
            conn.send(p).await;
            return Ok(Some(End::Logout));
        }
        op::SNACK => {
            conn.send(reject(reason::NOT_SUPPORTED, &pdu.bhs)).await;
        }
        op::LOGIN_REQ => return Err(ProtocolError("login request in full feature phase")),
        _ => {
            conn.send(reject(reason::NOT_SUPPORTED, &pdu.bhs)).await;
        }
    }
    Ok(None)
}

/// Waits (bounded) until every command in flight has finished.
async fn drain(conn: &Conn) {
    let deadline = tokio::time::Instant::now() + LOGOUT_DRAIN;
    loop {
        let tasks: Vec<Arc<TaskEntry>> = conn.tasks().values().cloned().collect();
        let Some(t) = tasks.into_iter().next() else {
            return;
        };
        if tokio::time::timeout_at(deadline, finished(&t))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Completes when `t` has finished.
async fn finished(t: &TaskEntry) {
    let notified = t.finished.notified();
    tokio::pin!(notified);
    notified.as_mut().enable();
    if t.done.load(Ordering::Acquire) {
        return;
    }
    notified.await;
}

/// TMF response codes (RFC 7143 §11.6.1).
mod tmf {
    pub const COMPLETE: u8 = 0;
    pub const NO_TASK: u8 = 1;
    pub const NO_LUN: u8 = 2;
    pub const NOT_SUPPORTED: u8 = 5;
}

/// Aborts the tasks `pick` selects and waits until they have finished.
async fn abort_where(conn: &Conn, pick: impl Fn(u32, &TaskEntry) -> bool) -> usize {
    let victims: Vec<Arc<TaskEntry>> = conn
        .tasks()
        .iter()
        .filter(|(itt, t)| pick(**itt, t))
        .map(|(_, t)| t.clone())
        .collect();
    for t in &victims {
        t.aborted.store(true, Ordering::Release);
        t.wake.notify_one();
    }
    for t in &victims {
        finished(t).await;
    }
    victims.len()
}

async fn task_management(conn: &Conn, pdu: &Pdu) {
    let function = pdu.flags() & 0x7f;
    let lun = pdu.lun();
    let referenced = pdu.ttt();
    let response = if conn.target.is_none() {
        tmf::NOT_SUPPORTED
    } else if !is_lun0(lun) && matches!(function, 1..=5) {
        tmf::NO_LUN
    } else {
        match function {
            // ABORT TASK.
            1 => {
                if abort_where(conn, |itt, _| itt == referenced).await > 0 {
                    tmf::COMPLETE
                } else {
                    tmf::NO_TASK
                }
            }
            // ABORT TASK SET, CLEAR TASK SET: this session's tasks.
            2 | 4 => {
                abort_where(conn, |_, _| true).await;
                tmf::COMPLETE
            }
            // CLEAR ACA: no ACA is ever established.
            3 => tmf::COMPLETE,
            // LOGICAL UNIT RESET.
            5 => {
                abort_where(conn, |_, _| true).await;
                if let Some(t) = &conn.target {
                    t.lu.reset();
                }
                tmf::COMPLETE
            }
            _ => tmf::NOT_SUPPORTED,
        }
    };
    tracing::debug!(peer = %conn.peer, function, response, "iscsi: task management");
    let mut p = OutPdu::new(op::TMF_RESP, 0x80, pdu.itt(), Bytes::new(), Stamp::Status);
    p.bhs[2] = response;
    conn.send(p).await;
}

/// `TargetName=...` and `TargetAddress=...` of the targets `initiator` may see.
pub fn send_targets(d: &Discovery, which: &str, current: Option<&Arc<IscsiTarget>>) -> Vec<u8> {
    let address = match d.local {
        SocketAddr::V4(a) => format!("{}:{},1", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("[{}]:{},1", a.ip(), a.port()),
    };
    let list: Vec<Arc<IscsiTarget>> = match (which, current) {
        ("All", None) => d
            .targets
            .targets()
            .into_iter()
            .filter(|t| t.access.allows(&d.initiator, d.peer))
            .collect(),
        ("" | "All", Some(t)) => vec![t.clone()],
        (name, _) => d
            .targets
            .find(name)
            .filter(|t| t.access.allows(&d.initiator, d.peer))
            .into_iter()
            .collect(),
    };
    let mut pairs = Vec::new();
    for t in list {
        pairs.push(("TargetName".to_string(), t.iqn.clone()));
        pairs.push(("TargetAddress".to_string(), address.clone()));
    }
    text::encode(&pairs)
}

async fn text_request(
    conn: &Conn,
    pdu: &Pdu,
    d: &Discovery,
    pending: &mut Option<Pending>,
) -> Result<(), ProtocolError> {
    let body = if pdu.ttt() != RESERVED_TAG {
        // The initiator asks for the next part of a long answer.
        match pending.take() {
            Some(p) if p.ttt == pdu.ttt() => p.rest,
            _ => {
                conn.send(reject(reason::INVALID_FIELD, &pdu.bhs)).await;
                return Ok(());
            }
        }
    } else {
        *pending = None;
        let pairs = text::parse(&pdu.data).map_err(|_| ProtocolError("malformed text request"))?;
        let mut out = Vec::new();
        for (k, v) in pairs {
            if k == "SendTargets" {
                out.extend(send_targets(d, &v, conn.target.as_ref()));
            } else {
                out.extend(text::encode(&[(k, "NotUnderstood".to_string())]));
            }
            if out.len() > MAX_TEXT {
                return Err(ProtocolError("text answer too long"));
            }
        }
        Bytes::from(out)
    };
    let max = conn.params.send_data_segment_length as usize;
    let (now, rest) = if body.len() > max {
        (body.slice(..max), Some(body.slice(max..)))
    } else {
        (body, None)
    };
    let (flags, ttt) = match rest {
        Some(rest) => {
            let ttt = conn.ttt();
            *pending = Some(Pending { ttt, rest });
            (0x40, ttt)
        }
        None => (0x80, RESERVED_TAG),
    };
    let mut p = OutPdu::new(op::TEXT_RESP, flags, pdu.itt(), now, Stamp::Status);
    p.set_lun(pdu.lun()).set_u32(20, ttt);
    conn.send(p).await;
    Ok(())
}
