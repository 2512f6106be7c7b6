//! The transmission phase of one connection: requests in, replies out.
//!
//! The reader splits the stream into requests (a WRITE is taken only after
//! its length was checked against [`MAX_REQUEST`] and the connection's byte
//! budget was reserved; a receive may bring up to [`READ_AHEAD`] bytes of
//! the requests queued behind it). A request alone on the connection (a
//! queue-depth-1 client) is answered in the reader task; any other gets its
//! own task, so a client's whole queue runs in parallel against the device.
//! WRITEs already received whole behind a WRITE go to the device with it in
//! one [`write_many`](crate::block::BlockDevice::write_many), so the storage
//! below pays one hand-off for the lot. Replies go out in completion order
//! (handles let replies overtake each other) through a queue: whichever task
//! finds the socket free writes everything queued in one vectored write, so
//! a client's burst of small replies costs a few system calls, and a lone
//! request's reply leaves from its own task without a hand-off.
//!
//! A request that breaks the framing (bad magic, a WRITE longer than
//! [`MAX_REQUEST`]) closes this connection only; a request that is merely
//! invalid (range, flags, unknown command) is answered NBD_EINVAL.

use std::io::IoSlice;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{watch, Mutex, OwnedSemaphorePermit, Semaphore};

use super::handshake::{Negotiated, BASE_ALLOCATION_ID};
use super::proto::*;
use super::reply::{self, Reply};
use super::MAX_REQUEST;
use crate::block::registry::{BlockExport, ExportUse};
use crate::block::{BlockError, Extent};

/// Bytes of request and reply data one connection holds at once, in units
/// of [`UNIT`]: 128 MiB, so a client's queue of 1 MiB requests (qemu,
/// nbdcopy, fio at qd64) runs in parallel while memory stays bounded.
const BUDGET_UNITS: u32 = 2048;
/// Granularity of the byte budget.
const UNIT: u32 = 64 * 1024;

/// Zeros for NBD_CMD_WRITE_ZEROES with NBD_CMD_FLAG_NO_HOLE, shared.
const ZERO_PIECE: usize = 1 << 20;

/// Buffers per vectored write (the kernel's IOV_MAX is 1024).
const MAX_IOV: usize = 1024;

/// Bytes a receive may bring beyond the request being read: a client's
/// queue of 1 MiB writes (qd4) arrives in one system call.
const READ_AHEAD: usize = 4 << 20;

/// Most WRITE requests handed to the device together.
const MAX_BATCH: usize = 64;

/// Splits the stream into request headers and WRITE payloads.
struct RequestReader<R> {
    inner: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> RequestReader<R> {
    fn new(inner: R) -> Self {
        RequestReader {
            inner,
            buf: BytesMut::with_capacity(64 * 1024),
        }
    }

    /// True when bytes of a further request are already buffered.
    fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Reads until `n` bytes are buffered; false at a clean end of stream
    /// before any byte of them.
    async fn fill(&mut self, n: usize) -> std::io::Result<bool> {
        while self.buf.len() < n {
            let need = n - self.buf.len();
            // Room for what is needed and for the requests a client queued
            // behind it, so one receive can bring a batch of writes.
            if self.buf.capacity() - self.buf.len() < need {
                self.buf.reserve(need.max(READ_AHEAD));
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                if self.buf.is_empty() {
                    return Ok(false);
                }
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(true)
    }

    /// The next request header; `None` at a clean end of stream.
    async fn header(&mut self) -> std::io::Result<Option<[u8; REQUEST_LEN]>> {
        if !self.fill(REQUEST_LEN).await? {
            return Ok(None);
        }
        let mut h = [0u8; REQUEST_LEN];
        h.copy_from_slice(&self.buf[..REQUEST_LEN]);
        self.buf.advance(REQUEST_LEN);
        Ok(Some(h))
    }

    /// The next request when it is a WRITE with `flags` whose data is
    /// already buffered whole (and not longer than [`MAX_REQUEST`]).
    fn peek_write(&self, flags: u16) -> Option<Request> {
        let header: &[u8; REQUEST_LEN] = self.buf.get(..REQUEST_LEN)?.try_into().ok()?;
        let req = Request::parse(header)?;
        let whole = self.buf.len() >= REQUEST_LEN + req.len as usize;
        (req.kind == CMD_WRITE && req.flags == flags && req.len <= MAX_REQUEST && whole)
            .then_some(req)
    }

    /// Takes the request [`Self::peek_write`] returned, and its data.
    fn take_write(&mut self, req: &Request) -> Bytes {
        self.buf.advance(REQUEST_LEN);
        self.buf.split_to(req.len as usize).freeze()
    }

    /// The `len` bytes of data after a WRITE header (`len` already checked).
    async fn payload(&mut self, len: usize) -> std::io::Result<Bytes> {
        if !self.fill(len).await? {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(self.buf.split_to(len).freeze())
    }
}

/// What every request of the connection needs.
struct Ctx {
    export: Arc<BlockExport>,
    structured: bool,
    block_status: bool,
    /// Replies waiting for the socket, each with the budget its request
    /// holds until the reply is written.
    queue: std::sync::Mutex<Vec<(Reply, OwnedSemaphorePermit)>>,
    /// The socket; its holder writes the queue.
    writer: Mutex<OwnedWriteHalf>,
    /// Writing failed (the client is gone): replies are dropped.
    broken: AtomicBool,
}

impl Ctx {
    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<(Reply, OwnedSemaphorePermit)>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers one request and sends the reply.
    async fn handle(&self, req: Request, payload: Bytes, permit: OwnedSemaphorePermit) {
        let reply = self.answer(req, payload).await;
        self.send(reply, permit).await;
    }

    /// Answers a batch of WRITE requests with the same flags, taken from
    /// the stream back to back: the device gets them in one call. A write
    /// that fails gets its error; the ones after it are answered one by
    /// one, as if they had come alone.
    async fn handle_writes(&self, batch: Vec<(Request, Bytes, OwnedSemaphorePermit)>) {
        let fua = batch[0].0.flags & CMD_FLAG_FUA != 0;
        let writes: Vec<(u64, Bytes)> = batch
            .iter()
            .map(|(r, p, _)| (r.offset, p.clone()))
            .collect();
        let result = self.export.device.write_many(writes, fua).await;
        let done = match &result {
            Ok(()) => batch.len(),
            Err((n, _)) => *n,
        };
        let m = &self.export.metrics;
        let mut replies = Vec::with_capacity(batch.len());
        let mut rest = Vec::new();
        for (i, (req, payload, permit)) in batch.into_iter().enumerate() {
            if i < done {
                m.request(true);
                m.bytes_written
                    .fetch_add(u64::from(req.len), Ordering::Relaxed);
                replies.push((reply::ok(req.handle, self.structured), permit));
            } else if let (true, Err((_, e))) = (i == done, &result) {
                m.request(false);
                let (code, message) = errno(e, true);
                tracing::debug!(export = %self.export.name, kind = req.kind, offset = req.offset, len = req.len, errno = code, %message, "nbd request failed");
                replies.push((
                    reply::error(req.handle, code, &message, self.structured),
                    permit,
                ));
            } else {
                rest.push((req, payload, permit));
            }
        }
        self.send_all(replies).await;
        for (req, payload, permit) in rest {
            self.handle(req, payload, permit).await;
        }
    }

    /// Queues a reply, and writes the queue unless another task is writing
    /// it.
    async fn send(&self, reply: Reply, permit: OwnedSemaphorePermit) {
        self.send_all(vec![(reply, permit)]).await;
    }

    /// Queues replies, and writes the queue unless another task is writing
    /// it. The writer looks at the queue again after letting the socket go,
    /// so a reply queued meanwhile is never left behind.
    async fn send_all(&self, replies: Vec<(Reply, OwnedSemaphorePermit)>) {
        self.queue().extend(replies);
        loop {
            let Ok(mut w) = self.writer.try_lock() else {
                return;
            };
            loop {
                let batch = std::mem::take(&mut *self.queue());
                if batch.is_empty() {
                    break;
                }
                if !self.broken.load(Ordering::Relaxed) {
                    if let Err(e) = write_batch(&mut w, &batch).await {
                        tracing::debug!(cause = %e, "writing replies failed");
                        self.broken.store(true, Ordering::Relaxed);
                    }
                }
                // Written: the budget of these requests is free again.
                drop(batch);
            }
            drop(w);
            if self.queue().is_empty() {
                return;
            }
        }
    }

    async fn answer(&self, req: Request, payload: Bytes) -> Reply {
        let m = &self.export.metrics;
        let result = self.run(req, payload).await;
        m.request(result.is_ok());
        match result {
            Ok(reply) => reply,
            Err((errno, message)) => {
                tracing::debug!(export = %self.export.name, kind = req.kind, offset = req.offset, len = req.len, errno, %message, "nbd request failed");
                reply::error(req.handle, errno, &message, self.structured)
            }
        }
    }

    /// The reply to `req`, or the NBD error and a message for the human.
    async fn run(&self, req: Request, payload: Bytes) -> Result<Reply, (u32, String)> {
        let dev = &self.export.device;
        let invalid = |what: &str| Err((EINVAL, what.to_string()));
        let mut allowed = CMD_FLAG_FUA;
        match req.kind {
            CMD_READ if self.structured => allowed |= CMD_FLAG_DF,
            CMD_WRITE_ZEROES => allowed |= CMD_FLAG_NO_HOLE,
            CMD_BLOCK_STATUS => allowed |= CMD_FLAG_REQ_ONE,
            _ => {}
        }
        if req.flags & !allowed != 0 {
            return invalid("command flags not valid for this command");
        }
        let writes = matches!(req.kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        if writes && dev.read_only() {
            return Err((EPERM, "the export is read-only".into()));
        }
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let (offset, len) = (req.offset, u64::from(req.len));
        let ok = reply::ok(req.handle, self.structured);
        match req.kind {
            CMD_READ => {
                if req.len > MAX_REQUEST {
                    return invalid("read longer than the maximum block size");
                }
                let data = dev
                    .read(offset, req.len)
                    .await
                    .map_err(|e| errno(&e, false))?;
                let m = &self.export.metrics;
                m.bytes_read.fetch_add(data.len() as u64, Ordering::Relaxed);
                Ok(reply::read(req.handle, offset, data, self.structured))
            }
            CMD_WRITE => {
                dev.write(offset, payload, fua)
                    .await
                    .map_err(|e| errno(&e, true))?;
                let m = &self.export.metrics;
                m.bytes_written.fetch_add(len, Ordering::Relaxed);
                Ok(ok)
            }
            CMD_FLUSH => {
                dev.flush().await.map_err(|e| errno(&e, true))?;
                Ok(ok)
            }
            CMD_TRIM => {
                crate::block::device::check_range(offset, len, dev.size())
                    .map_err(|e| errno(&e, false))?;
                if len > 0 {
                    dev.trim(offset, len).await.map_err(|e| errno(&e, true))?;
                }
                Ok(ok)
            }
            CMD_WRITE_ZEROES => {
                if req.flags & CMD_FLAG_NO_HOLE != 0 {
                    write_zeros(dev.as_ref(), offset, len, fua)
                        .await
                        .map_err(|e| errno(&e, true))?;
                } else if len > 0 {
                    dev.write_zeroes(offset, len, fua)
                        .await
                        .map_err(|e| errno(&e, true))?;
                }
                Ok(ok)
            }
            CMD_BLOCK_STATUS => {
                if !self.block_status {
                    return invalid("no metadata context was selected for this export");
                }
                if len == 0 {
                    return invalid("block status of 0 bytes");
                }
                let mut extents: Vec<Extent> = dev
                    .extents(offset, len)
                    .await
                    .map_err(|e| errno(&e, false))?;
                if extents.is_empty() {
                    return Err((EIO, "the device reported no extent".into()));
                }
                if req.flags & CMD_FLAG_REQ_ONE != 0 {
                    extents.truncate(1);
                }
                Ok(reply::block_status(
                    req.handle,
                    BASE_ALLOCATION_ID,
                    &extents,
                ))
            }
            _ => invalid("unknown command"),
        }
    }
}

/// The NBD error of a device error, in one place: a write beyond the end is
/// ENOSPC, a read beyond it EINVAL, as the protocol document asks.
fn errno(e: &BlockError, write: bool) -> (u32, String) {
    let code = match e {
        BlockError::OutOfRange { .. } if write => ENOSPC,
        BlockError::OutOfRange { .. } => EINVAL,
        BlockError::NoSpace => ENOSPC,
        BlockError::ReadOnly => EPERM,
        BlockError::Retry | BlockError::Io(_) => EIO,
    };
    (code, e.to_string())
}

/// WRITE_ZEROES with NO_HOLE: real zeros, so the range stays allocated.
async fn write_zeros(
    dev: &dyn crate::block::BlockDevice,
    offset: u64,
    len: u64,
    fua: bool,
) -> Result<(), BlockError> {
    static ZEROS: OnceLock<Bytes> = OnceLock::new();
    let zeros = ZEROS.get_or_init(|| Bytes::from(vec![0u8; ZERO_PIECE]));
    crate::block::device::check_range(offset, len, dev.size())?;
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO_PIECE as u64);
        dev.write(offset + done, zeros.slice(..n as usize), fua)
            .await?;
        done += n;
    }
    Ok(())
}

/// Writes whole replies, with as few system calls as the socket allows.
async fn write_batch(
    w: &mut OwnedWriteHalf,
    batch: &[(Reply, OwnedSemaphorePermit)],
) -> std::io::Result<()> {
    if let [(reply, _)] = batch {
        if reply.data.is_empty() {
            return w.write_all(&reply.head).await;
        }
    }
    let mut bufs: Vec<Bytes> = batch
        .iter()
        .flat_map(|(r, _)| [r.head.clone(), r.data.clone()])
        .filter(|b| !b.is_empty())
        .collect();
    let mut first = 0;
    while first < bufs.len() {
        let slices: Vec<IoSlice<'_>> = bufs[first..]
            .iter()
            .take(MAX_IOV)
            .map(|b| IoSlice::new(b))
            .collect();
        let mut n = w.write_vectored(&slices).await?;
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
    Ok(())
}

/// Budget units a request holds while in flight.
fn units(req: &Request) -> u32 {
    match req.kind {
        CMD_READ | CMD_WRITE => req.len.div_ceil(UNIT).clamp(1, BUDGET_UNITS),
        _ => 1,
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Serves requests on an export until the client disconnects, breaks the
/// protocol, the export is removed or the server stops; then lets requests
/// in flight finish and closes the connection.
pub(super) async fn serve(
    rd: OwnedReadHalf,
    wr: OwnedWriteHalf,
    negotiated: Negotiated,
    export_use: ExportUse,
    mut stop: watch::Receiver<bool>,
) {
    let ctx = Arc::new(Ctx {
        export: negotiated.export,
        structured: negotiated.structured,
        block_status: negotiated.block_status,
        queue: std::sync::Mutex::new(Vec::new()),
        writer: Mutex::new(wr),
        broken: AtomicBool::new(false),
    });
    let budget = Arc::new(Semaphore::new(BUDGET_UNITS as usize));
    let mut requests = RequestReader::new(rd);
    let mut closed = export_use.clone();
    loop {
        let header = tokio::select! {
            h = requests.header() => h,
            () = closed.closed() => break,
            () = stopped(&mut stop) => break,
        };
        let header = match header {
            Ok(Some(h)) => h,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(cause = %e, "connection ended mid-request");
                break;
            }
        };
        let Some(req) = Request::parse(&header) else {
            tracing::info!(export = %ctx.export.name, "closing nbd connection: bad request magic");
            break;
        };
        if req.kind == CMD_DISC {
            break;
        }
        if req.kind == CMD_WRITE && req.len > MAX_REQUEST {
            tracing::info!(export = %ctx.export.name, len = req.len, "closing nbd connection: write longer than the maximum block size");
            break;
        }
        let need = units(&req);
        let Ok(permit) = budget.clone().acquire_many_owned(need).await else {
            break;
        };
        let payload = if req.kind == CMD_WRITE {
            let read = tokio::select! {
                p = requests.payload(req.len as usize) => p,
                () = closed.closed() => break,
                () = stopped(&mut stop) => break,
            };
            match read {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(cause = %e, "connection ended inside a write");
                    break;
                }
            }
        } else {
            Bytes::new()
        };
        // WRITEs queued behind this one, already received whole, go to the
        // device with it (one hand-off to storage for all).
        let mut batch = Vec::new();
        let batchable = req.kind == CMD_WRITE
            && req.flags & !CMD_FLAG_FUA == 0
            && !ctx.export.device.read_only();
        let mut held = need;
        while batchable && batch.len() + 1 < MAX_BATCH {
            let Some(next) = requests.peek_write(req.flags) else {
                break;
            };
            let more = units(&next);
            // No budget: the request stays for the next round.
            let Ok(p) = budget.clone().try_acquire_many_owned(more) else {
                break;
            };
            held += more;
            let data = requests.take_write(&next);
            batch.push((next, data, p));
        }
        let alone = budget.available_permits() + held as usize == BUDGET_UNITS as usize
            && !requests.has_buffered();
        if !batch.is_empty() {
            batch.insert(0, (req, payload, permit));
            if alone {
                ctx.handle_writes(batch).await;
            } else {
                let ctx = ctx.clone();
                let user = export_use.clone();
                tokio::spawn(async move {
                    ctx.handle_writes(batch).await;
                    drop(user);
                });
            }
        } else if alone {
            ctx.handle(req, payload, permit).await;
        } else {
            let ctx = ctx.clone();
            let user = export_use.clone();
            tokio::spawn(async move {
                ctx.handle(req, payload, permit).await;
                drop(user);
            });
        }
    }
    // Every request in flight is answered (its reply written, or dropped
    // when the client is gone) before the connection closes.
    let _ = budget.acquire_many(BUDGET_UNITS).await;
    let _ = ctx.writer.lock().await.shutdown().await;
    drop(export_use);
}
