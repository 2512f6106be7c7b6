//! SCSI Command PDUs and their data: one task per command, which collects
//! the write data (immediate, unsolicited, then solicited by R2T bursts of
//! at most MaxBurstLength, one outstanding at a time), runs the command on
//! the logical unit and sends Data-In and status.
//!
//! The reader checks every Data-Out against the phase its task is in
//! (unsolicited up to FirstBurstLength, or the burst of the last R2T):
//! Target Transfer Tag, DataSN, buffer offset (data arrives in order) and
//! length. Any mismatch is a protocol error: the connection closes, as
//! ErrorRecoveryLevel 0 prescribes.
//!
//! Memory is bounded before it is allocated: a command's data-out is at
//! most [`MAX_DATA_OUT`]; unsolicited data at most FirstBurstLength per
//! command; solicited data and read results take permits from the
//! connection's [`BUFFER_BUDGET`](super::conn::BUFFER_BUDGET) first.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::Notify;

use super::conn::{residual, scsi_response, Collect, Conn, Phase, TaskEntry, BUFFER_BUDGET};
use super::pdu::{op, OutPdu, Pdu, Stamp, RESERVED_TAG};
use super::scsi::{self, inquiry, opcode, status, Response, Sense, Transfer, BLOCK_SIZE};

/// Longest data-out of one command: the longest WRITE.
pub const MAX_DATA_OUT: u32 = scsi::MAX_TRANSFER_BLOCKS * BLOCK_SIZE;

/// A PDU that breaks the protocol: the connection closes.
#[derive(Debug, thiserror::Error)]
#[error("protocol error - {0}")]
pub struct ProtocolError(pub &'static str);

/// Whether a LUN field addresses LUN 0 (peripheral or flat addressing).
pub fn is_lun0(lun: u64) -> bool {
    let b = lun.to_be_bytes();
    b[0] >> 6 <= 1 && b[0] & 0x3f == 0 && b[1..].iter().all(|x| *x == 0)
}

fn kib(bytes: u64) -> u32 {
    bytes.div_ceil(1024).min((BUFFER_BUDGET >> 10) as u64) as u32
}

/// Ends a task however it stops (done, aborted, connection gone): removes
/// it from the tables, slides the command window, wakes task management.
struct Finish {
    conn: Arc<Conn>,
    itt: u32,
    entry: Arc<TaskEntry>,
    counted: bool,
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.conn.collects().remove(&self.itt);
        self.conn.tasks().remove(&self.itt);
        if self.counted {
            self.conn.window.complete();
        }
        self.entry.done.store(true, Ordering::Release);
        self.entry.finished.notify_waiters();
    }
}

/// What the reader learned of a command before its task runs.
struct Cmd {
    itt: u32,
    lun: u64,
    cdb: [u8; 16],
    edtl: u32,
    write: bool,
    /// Data-out bytes the command uses.
    want: u32,
    /// Residual flags and count of a GOOD write (EDTL differs from the CDB).
    write_residual: (u8, u32),
    /// Unsolicited Data-Out PDUs follow (the command's F bit is clear).
    unsolicited: bool,
    /// Fails before any data is solicited: sense, residual flags and count.
    early: Option<(Sense, u8, u32)>,
}

/// Handles a SCSI Command PDU whose CmdSN was accepted (`counted`) or that
/// is immediate.
///
/// # Errors
/// [`ProtocolError`] for a PDU the connection cannot continue after.
pub fn on_command(conn: &Arc<Conn>, pdu: Pdu, counted: bool) -> Result<(), ProtocolError> {
    let itt = pdu.itt();
    if itt == RESERVED_TAG {
        return Err(ProtocolError("command with the reserved task tag"));
    }
    let flags = pdu.flags();
    let write = flags & 0x20 != 0;
    let edtl = pdu.u32_at(20);
    let imm = pdu.data.clone();
    let p = &conn.params;
    if !imm.is_empty() && (!p.immediate_data || !write) {
        return Err(ProtocolError("immediate data not allowed"));
    }
    if imm.len() as u64 > u64::from(edtl.min(p.first_burst_length)) {
        return Err(ProtocolError(
            "immediate data beyond FirstBurstLength or EDTL",
        ));
    }
    let unsolicited = write && flags & 0x80 == 0;
    if unsolicited && p.initial_r2t {
        return Err(ProtocolError("unsolicited data with InitialR2T=Yes"));
    }
    let mut cdb = [0u8; 16];
    cdb.copy_from_slice(pdu.cdb());
    let (need, takes_data) = match scsi::transfer(&cdb) {
        Transfer::Out(n) => (n, true),
        Transfer::None => (0, false),
    };
    let sent = if write { edtl } else { 0 };
    let mut want = need;
    let mut write_residual = (0, 0);
    let early = if !pdu.ahs.is_empty() || !inquiry::is_supported(cdb[0]) {
        // Unknown commands (their data is taken and dropped), extended CDBs
        // (32-byte commands) and bidirectional commands.
        Some((Sense::INVALID_OPCODE, 0, 0))
    } else if need > MAX_DATA_OUT {
        let (f, r) = residual(0, edtl.into());
        Some((Sense::INVALID_FIELD_IN_CDB, f, r))
    } else if scsi::is_write(&cdb) && need != sent {
        // FCP-4's rule for a WRITE whose EDTL differs from its transfer
        // length: write what both allow, report the difference as residual.
        let (f, r) = residual(need.into(), sent.into());
        if sent < need && sent % BLOCK_SIZE != 0 {
            Some((Sense::INVALID_FIELD_IN_IU, f, r))
        } else {
            want = need.min(sent);
            scsi::set_blocks(&mut cdb, want / BLOCK_SIZE);
            write_residual = (f, r);
            None
        }
    } else if !takes_data && write {
        // Data-out for a command that takes none (a READ flagged as a
        // write): the data is taken and dropped, the command runs.
        want = 0;
        None
    } else if need != sent {
        let (f, r) = residual(need.into(), sent.into());
        Some((Sense::INVALID_FIELD_IN_CDB, f, r))
    } else {
        None
    };
    let entry = Arc::new(TaskEntry {
        lun: pdu.lun(),
        cmd_sn: pdu.cmd_sn(),
        aborted: false.into(),
        wake: Notify::new(),
        finished: Notify::new(),
        done: false.into(),
    });
    {
        let mut tasks = conn.tasks();
        if tasks.contains_key(&itt) {
            return Err(ProtocolError("task tag already in use"));
        }
        tasks.insert(itt, entry.clone());
    }
    let notify = Arc::new(Notify::new());
    if write {
        let end = edtl.min(p.first_burst_length);
        let mut buf = BytesMut::with_capacity(if unsolicited { end as usize } else { imm.len() });
        buf.extend_from_slice(&imm);
        let phase = if unsolicited && (buf.len() as u32) < end {
            Phase::Unsolicited { end, data_sn: 0 }
        } else {
            Phase::Idle
        };
        let waiting = matches!(phase, Phase::Unsolicited { .. });
        conn.collects().insert(
            itt,
            Collect {
                buf,
                phase,
                notify: notify.clone(),
            },
        );
        if !waiting && unsolicited {
            // Immediate data filled the unsolicited burst already.
            notify.notify_one();
        }
    }
    let cmd = Cmd {
        itt,
        lun: pdu.lun(),
        cdb,
        edtl,
        write,
        want,
        write_residual,
        unsolicited,
        early,
    };
    let finish = Finish {
        conn: conn.clone(),
        itt,
        entry: entry.clone(),
        counted,
    };
    tokio::spawn(run(conn.clone(), cmd, entry, notify, finish));
    Ok(())
}

/// Waits for `notify`, or for an abort of `entry`; false when aborted.
async fn wait(entry: &TaskEntry, notify: &Notify) -> bool {
    if entry.aborted.load(Ordering::Acquire) {
        return false;
    }
    tokio::select! {
        _ = notify.notified() => {}
        _ = entry.wake.notified() => {}
    }
    !entry.aborted.load(Ordering::Acquire)
}

async fn run(
    conn: Arc<Conn>,
    cmd: Cmd,
    entry: Arc<TaskEntry>,
    notify: Arc<Notify>,
    _finish: Finish,
) {
    if cmd.unsolicited && !wait(&entry, &notify).await {
        return;
    }
    if let Some((sense, flags, residual)) = cmd.early {
        let descriptor = conn.target.as_ref().is_some_and(|t| t.lu.mode().d_sense);
        let sense = sense.encode(descriptor);
        let mut data = (sense.len() as u16).to_be_bytes().to_vec();
        data.extend(sense);
        if let Some(t) = &conn.target {
            t.metrics().request(false);
        }
        conn.send(scsi_response(
            cmd.itt,
            status::CHECK_CONDITION,
            flags,
            residual,
            Bytes::from(data),
            0,
        ))
        .await;
        return;
    }
    let mut r2t_sn = 0u32;
    let mut _permits = None;
    let data = if cmd.write {
        let have = conn
            .collects()
            .get(&cmd.itt)
            .map_or(0, |c| c.buf.len() as u32);
        if have < cmd.want {
            let permits = tokio::select! {
                p = conn.budget.acquire_many(kib(u64::from(cmd.want - have))) => p,
                _ = entry.wake.notified() => return,
            };
            let Ok(permits) = permits else { return };
            _permits = Some(permits);
            let mut at = have;
            while at < cmd.want {
                let len = (cmd.want - at).min(conn.params.max_burst_length);
                let ttt = conn.ttt();
                match conn.collects().get_mut(&cmd.itt) {
                    Some(c) => {
                        c.phase = Phase::Burst {
                            ttt,
                            end: at + len,
                            data_sn: 0,
                        };
                        // Reserve the whole write once, not burst by burst.
                        let want = cmd.want as usize;
                        if c.buf.capacity() < want {
                            c.buf.reserve(want - c.buf.len());
                        }
                    }
                    None => return,
                }
                let mut r2t = OutPdu::new(op::R2T, 0x80, cmd.itt, Bytes::new(), Stamp::Peek);
                r2t.set_lun(cmd.lun)
                    .set_u32(20, ttt)
                    .set_u32(36, r2t_sn)
                    .set_u32(40, at)
                    .set_u32(44, len);
                if !conn.send(r2t).await || !wait(&entry, &notify).await {
                    return;
                }
                at += len;
                r2t_sn += 1;
            }
        }
        match conn.collects().remove(&cmd.itt) {
            // Unsolicited data may go beyond what a truncated write uses.
            Some(c) => c.buf.freeze().slice(..cmd.want as usize),
            None => return,
        }
    } else {
        if let Some(bytes) = read_size(&cmd.cdb) {
            let permits = tokio::select! {
                p = conn.budget.acquire_many(kib(bytes)) => p,
                _ = entry.wake.notified() => return,
            };
            let Ok(permits) = permits else { return };
            _permits = Some(permits);
        }
        Bytes::new()
    };
    if entry.aborted.load(Ordering::Acquire) {
        return;
    }
    let written = if cmd.write && scsi::is_write(&cmd.cdb) {
        data.len() as u64
    } else {
        0
    };
    let resp = match &conn.target {
        Some(t) if is_lun0(cmd.lun) => t.lu.execute(&conn.nexus, &cmd.cdb, data).await,
        Some(_) => no_lun(&cmd.cdb),
        None => no_lun(&cmd.cdb),
    };
    if let Some(t) = &conn.target {
        t.metrics().request(resp.ok());
        if resp.ok() {
            t.metrics()
                .bytes_written
                .fetch_add(written, Ordering::Relaxed);
            let read = (resp.data.len() as u64).min(cmd.edtl.into());
            t.metrics().bytes_read.fetch_add(read, Ordering::Relaxed);
        }
    }
    if entry.aborted.load(Ordering::Acquire) {
        return;
    }
    if cmd.write && resp.ok() {
        let (f, r) = cmd.write_residual;
        conn.send(scsi_response(
            cmd.itt,
            status::GOOD,
            f,
            r,
            Bytes::new(),
            r2t_sn,
        ))
        .await;
        return;
    }
    let edtl_in = if cmd.write { 0 } else { cmd.edtl };
    conn.respond(cmd.itt, cmd.lun, edtl_in, resp, r2t_sn).await;
}

/// The bytes a READ will hold, for the buffer budget.
fn read_size(cdb: &[u8]) -> Option<u64> {
    use opcode::*;
    match cdb[0] {
        READ_6 | READ_10 | READ_12 | READ_16 => {
            let (_, n) = scsi::lba_and_blocks(cdb);
            Some(u64::from(n.min(scsi::MAX_TRANSFER_BLOCKS)) * u64::from(BLOCK_SIZE))
        }
        _ => None,
    }
}

/// The answer for a LUN that does not exist: INQUIRY says so (peripheral
/// qualifier 3), REPORT LUNS works from any LUN, the rest fail.
fn no_lun(cdb: &[u8]) -> Response {
    let check = |s: Sense| Response {
        data: Bytes::new(),
        status: status::CHECK_CONDITION,
        sense: Some(Bytes::from(s.encode(false))),
    };
    match cdb[0] {
        opcode::INQUIRY => {
            let mut d = vec![0u8; 36];
            d[0] = 0x7f;
            d[3] = 0x12;
            d[4] = 31;
            let alloc = u16::from_be_bytes([cdb[3], cdb[4]]) as usize;
            d.truncate(alloc);
            Response::good(d)
        }
        opcode::REPORT_LUNS => match inquiry::report_luns(cdb) {
            Ok(d) => Response::good(d),
            Err(scsi::Fail::Check(s)) => check(s),
            Err(scsi::Fail::Conflict) => Response::conflict(),
        },
        _ => check(Sense::LUN_NOT_SUPPORTED),
    }
}

/// Checks a Data-Out against its task's phase and appends its data.
///
/// # Errors
/// [`ProtocolError`] for a Data-Out that does not fit: wrong TTT, DataSN,
/// offset or length, or data nobody asked for.
pub fn on_data_out(conn: &Conn, pdu: &Pdu) -> Result<(), ProtocolError> {
    let itt = pdu.itt();
    let ttt = pdu.ttt();
    let sn = pdu.u32_at(36);
    let offset = pdu.u32_at(40);
    let len = pdu.data.len() as u32;
    let last = pdu.final_bit();
    let mut collects = conn.collects();
    let Some(c) = collects.get_mut(&itt) else {
        // An aborted or failed task; its stragglers are dropped.
        return Ok(());
    };
    let (end, complete) = match &mut c.phase {
        Phase::Unsolicited { end, data_sn } => {
            if ttt != RESERVED_TAG {
                return Err(ProtocolError("unsolicited Data-Out with a transfer tag"));
            }
            if sn != *data_sn {
                return Err(ProtocolError("Data-Out with an unexpected DataSN"));
            }
            *data_sn += 1;
            (*end, last)
        }
        Phase::Burst {
            ttt: want,
            end,
            data_sn,
        } => {
            if ttt != *want {
                return Err(ProtocolError("Data-Out with an unknown transfer tag"));
            }
            if sn != *data_sn {
                return Err(ProtocolError("Data-Out with an unexpected DataSN"));
            }
            *data_sn += 1;
            (*end, false)
        }
        Phase::Idle => return Err(ProtocolError("Data-Out nobody asked for")),
    };
    if offset as usize != c.buf.len() {
        return Err(ProtocolError("Data-Out out of order"));
    }
    if u64::from(offset) + u64::from(len) > u64::from(end) {
        return Err(ProtocolError("Data-Out beyond its burst"));
    }
    c.buf.extend_from_slice(&pdu.data);
    let full = c.buf.len() as u32 == end;
    if matches!(c.phase, Phase::Burst { .. }) && last && !full {
        return Err(ProtocolError("burst ended early"));
    }
    if complete || full {
        c.phase = Phase::Idle;
        c.notify.notify_one();
    }
    Ok(())
}
