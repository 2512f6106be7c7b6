//! The transmission phase of one connection: requests in, replies out, on
//! threads of the connection's own rather than on tokio's workers.
//!
//! Why threads: a queue-depth-1 client sends its next request only after
//! the reply, so every hand-off between threads on the way (reactor, async
//! worker, blocking pool, back) is latency it pays on every request. A
//! worker blocks in `recv`, answers the request on its own thread
//! (`Handle::block_on` over the device, with the write cache's file I/O and
//! chunk loads running in place: [`crate::fsutil::serve_blocking_here`])
//! and writes the reply, as nbdkit's threads do. A client that stops
//! reading replies blocks only its own connection's threads.
//!
//! Workers take turns at the socket: one holds the reader at a time. It
//! splits the stream into requests (a WRITE is taken only after its length
//! was checked against [`MAX_REQUEST`] and the connection's byte budget was
//! reserved; a receive may bring up to [`READ_AHEAD`] bytes of the requests
//! queued behind it, and a long WRITE's data is received into a reused
//! buffer of its own, see [`BufferPool`]). A request alone on the
//! connection (nothing else in flight, nothing buffered behind it, not a
//! large WRITE) is answered by the reader without letting the socket go.
//! Any other request is answered after the reader lets go, and a waiting
//! worker (or a new one, up to [`MAX_WORKERS`]) reads on, so a client's
//! queue runs in parallel against the device. WRITEs
//! already received whole behind a WRITE go to the device with it in one
//! [`write_many`](crate::block::BlockDevice::write_many). Replies go out in
//! completion order (handles let replies overtake each other) through a
//! queue: whichever worker finds the socket free writes everything queued
//! in one vectored write.
//!
//! A request that breaks the framing (bad magic, a WRITE longer than
//! [`MAX_REQUEST`]) closes this connection only; a request that is merely
//! invalid (range, flags, unknown command) is answered NBD_EINVAL. The
//! server closes a connection by shutting its socket down for reading:
//! workers see the end of the stream, answer what they hold, and leave.

use std::io::{IoSlice, Read, Write};
use std::mem::MaybeUninit;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use rustix::io::Errno;
use rustix::net::RecvFlags;
use tokio::runtime::Handle;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use super::handshake::{Negotiated, BASE_ALLOCATION_ID};
use super::proto::*;
use super::reply::{self, Reply};
use super::MAX_REQUEST;
use crate::block::registry::{BlockExport, ExportUse};
use crate::block::{BlockError, Extent};
use crate::bufpool::BufferPool;

/// Bytes of request and reply data one connection holds at once, in units
/// of [`UNIT`]: 128 MiB, so a client's queue of 1 MiB requests (qemu,
/// nbdcopy, fio at qd64) runs in parallel while memory stays bounded.
const BUDGET_UNITS: u32 = 2048;
/// Granularity of the byte budget.
const UNIT: u32 = 64 * 1024;

/// Threads serving one connection at most (nbdkit's default is the same):
/// a client's queue deeper than this waits in the socket.
pub const MAX_WORKERS: usize = 16;

/// Zeros for NBD_CMD_WRITE_ZEROES with NBD_CMD_FLAG_NO_HOLE, shared.
const ZERO_PIECE: usize = 1 << 20;

/// Buffers per vectored write (the kernel's IOV_MAX is 1024).
const MAX_IOV: usize = 1024;

/// Most bytes one receive into the request buffer brings: room for a
/// client's queue of small requests (sixteen 4 KiB writes) in one system
/// call. Longer WRITE data goes to a [`BufferPool`] buffer instead.
const READ_AHEAD: usize = 64 * 1024;

/// WRITE data this long is received into a [`BufferPool`] buffer.
const POOLED_PAYLOAD: usize = 64 * 1024;

/// Bytes of free payload buffers one connection keeps for reuse.
const POOL_KEEP: usize = 8 << 20;

/// A WRITE this long is stored while another worker reads on.
const BIG_WRITE: u32 = 256 * 1024;

/// Most WRITE requests handed to the device together.
const MAX_BATCH: usize = 64;

/// Threads polling a socket now, across all connections.
static POLLERS: AtomicUsize = AtomicUsize::new(0);

/// A thread's turn at polling its socket. At most all CPUs but one poll at
/// once, so polling never takes the whole machine from the work it waits
/// for.
struct PollTurn;

impl PollTurn {
    fn take() -> Option<PollTurn> {
        static MAX: OnceLock<usize> = OnceLock::new();
        let max =
            *MAX.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()) - 1);
        POLLERS
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| PollTurn)
    }
}

impl Drop for PollTurn {
    fn drop(&mut self) {
        POLLERS.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Takes a lock whose holder panicked too: the data behind these locks
/// (a buffer, a socket, a queue) stays usable.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Splits the stream into request headers and WRITE payloads.
///
/// Hybrid polling: a wake-up between CPUs costs tens of microseconds (more
/// in a VM), twice per request of a queue-depth-1 client: the request wakes
/// the server's thread, the reply the client's. While a client answers each
/// reply within `poll`, the reader waits for its next request by polling
/// the socket for up to `poll` instead of sleeping in `recv`, so the
/// request needs no wake-up. A client that pauses longer is not polled for
/// again until it answers quickly once more. Only the wait for a new
/// request polls, and only on a connection with nothing else in flight
/// (see [`PollTurn`] for the machine-wide limit).
struct RequestReader {
    socket: TcpStream,
    buf: BytesMut,
    /// Buffers for long WRITE data, reused as soon as the device is done
    /// with them: the copy out of the socket is most of a large write's
    /// cost, and it is markedly cheaper into memory still in the CPU's
    /// cache (a stream of 1 MiB writes received into ever fresh memory cost
    /// about 1.4x the CPU per MiB of one received into a reused buffer).
    pool: Arc<BufferPool>,
    /// Longest poll; zero: never poll.
    poll: Duration,
    /// Whether the next receive may poll (set by the connection: only
    /// while nothing else is in flight).
    may_poll: bool,
    /// The client sent its last request within `poll` of the wait's start.
    answers_fast: bool,
}

impl RequestReader {
    fn new(socket: TcpStream, poll: Duration) -> Self {
        RequestReader {
            socket,
            buf: BytesMut::with_capacity(READ_AHEAD),
            pool: BufferPool::new(POOLED_PAYLOAD, POOL_KEEP),
            poll,
            may_poll: false,
            answers_fast: true,
        }
    }

    /// True when bytes of a further request are already buffered.
    fn has_buffered(&self) -> bool {
        !self.buf.is_empty()
    }

    /// One receive into the buffer's free room; the bytes received.
    fn receive(&mut self) -> std::io::Result<usize> {
        // Only the wait for a new request is timed and may poll: the rest
        // of a request already begun comes at the network's pace, and
        // polling for it is CPU thrown away.
        let started = (self.buf.is_empty() && !self.poll.is_zero()).then(Instant::now);
        if let Some(started) = started.filter(|_| self.may_poll && self.answers_fast) {
            if let Some(_turn) = PollTurn::take() {
                let deadline = started + self.poll;
                loop {
                    match self.recv(RecvFlags::DONTWAIT) {
                        Ok(n) => return Ok(n),
                        Err(Errno::AGAIN | Errno::INTR) => {}
                        Err(e) => return Err(e.into()),
                    }
                    if Instant::now() >= deadline {
                        break;
                    }
                    std::hint::spin_loop();
                }
            }
        }
        let n = loop {
            match self.recv(RecvFlags::empty()) {
                Ok(n) => break n,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            }
        };
        if let Some(started) = started {
            self.answers_fast = started.elapsed() < self.poll;
        }
        Ok(n)
    }

    fn recv(&mut self, flags: RecvFlags) -> rustix::io::Result<usize> {
        let room: &mut [MaybeUninit<u8>] = self.buf.spare_capacity_mut();
        let most = room.len().min(READ_AHEAD);
        let room = &mut room[..most];
        let ((got, _), _) = rustix::net::recv(&self.socket, room, flags)?;
        let n = got.len();
        // SAFETY: `recv` initialised the first `n` bytes of the spare
        // capacity, which follow the buffer's length.
        unsafe { self.buf.set_len(self.buf.len() + n) };
        Ok(n)
    }

    /// Reads until `n` bytes are buffered; false at a clean end of stream
    /// before any byte of them.
    fn fill(&mut self, n: usize) -> std::io::Result<bool> {
        while self.buf.len() < n {
            let need = n - self.buf.len();
            // Room for what is needed and for the requests a client queued
            // behind it, so one receive can bring a batch of writes.
            if self.buf.capacity() - self.buf.len() < need.max(READ_AHEAD / 4) {
                self.buf.reserve(need.max(READ_AHEAD));
            }
            if self.receive()? == 0 {
                if self.buf.is_empty() {
                    return Ok(false);
                }
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
        Ok(true)
    }

    /// The next request header; `None` at a clean end of stream.
    fn header(&mut self) -> std::io::Result<Option<[u8; REQUEST_LEN]>> {
        if !self.fill(REQUEST_LEN)? {
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
    fn payload(&mut self, len: usize) -> std::io::Result<Bytes> {
        if len < POOLED_PAYLOAD || self.buf.len() >= len {
            if !self.fill(len)? {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            return Ok(self.buf.split_to(len).freeze());
        }
        // What came with the header, then the rest straight from the
        // socket into the pool buffer.
        let mut buf = self.pool.take(len);
        let got = self.buf.len();
        buf[..got].copy_from_slice(&self.buf);
        self.buf.clear();
        (&self.socket).read_exact(&mut buf[got..len])?;
        Ok(self.pool.freeze(buf, len))
    }
}

/// A request taken from the stream, with the budget it holds until its
/// reply is written.
type Taken = (Request, Bytes, OwnedSemaphorePermit);

/// What a worker took from the stream to answer.
enum Work {
    /// Any request.
    One(Taken),
    /// WRITEs with the same flags received back to back (two or more).
    Writes(Vec<Taken>),
}

impl Work {
    /// Whether it carries more data than a small request: the socket then
    /// goes to another worker while this one stores the data, so copying
    /// the next request in overlaps with writing this one out.
    fn is_big(&self) -> bool {
        match self {
            Work::One((req, _, _)) => req.kind == CMD_WRITE && req.len >= BIG_WRITE,
            Work::Writes(_) => true,
        }
    }
}

/// What every request of the connection needs.
struct Ctx {
    export: Arc<BlockExport>,
    structured: bool,
    block_status: bool,
    /// The runtime the device's futures run on.
    runtime: Handle,
    /// Replies waiting for the socket, each with the budget its request
    /// holds until the reply is written.
    queue: Mutex<Vec<(Reply, OwnedSemaphorePermit)>>,
    /// The socket's sending side; its holder writes the queue.
    writer: Mutex<TcpStream>,
    /// Writing failed (the client is gone): replies are dropped.
    broken: AtomicBool,
}

impl Ctx {
    /// Answers one request and sends the reply.
    fn handle(&self, (req, payload, permit): Taken) {
        let reply = self.runtime.block_on(self.answer(req, payload));
        self.send_all(vec![(reply, permit)]);
    }

    /// Answers a batch of WRITE requests with the same flags, taken from
    /// the stream back to back: the device gets them in one call. A write
    /// that fails gets its error; the ones after it are answered one by
    /// one, as if they had come alone.
    fn handle_writes(&self, batch: Vec<Taken>) {
        let fua = batch[0].0.flags & CMD_FLAG_FUA != 0;
        let writes: Vec<(u64, Bytes)> = batch
            .iter()
            .map(|(r, p, _)| (r.offset, p.clone()))
            .collect();
        let result = self
            .runtime
            .block_on(self.export.device.write_many(writes, fua));
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
        self.send_all(replies);
        for taken in rest {
            self.handle(taken);
        }
    }

    /// Queues replies, and writes the queue unless another worker is
    /// writing it. The writer looks at the queue again after letting the
    /// socket go, so a reply queued meanwhile is never left behind.
    fn send_all(&self, replies: Vec<(Reply, OwnedSemaphorePermit)>) {
        lock(&self.queue).extend(replies);
        loop {
            let mut w = match self.writer.try_lock() {
                Ok(w) => w,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return,
            };
            loop {
                let batch = std::mem::take(&mut *lock(&self.queue));
                if batch.is_empty() {
                    break;
                }
                if !self.broken.load(Ordering::Relaxed) {
                    if let Err(e) = write_batch(&mut w, &batch) {
                        tracing::debug!(cause = %e, "writing replies failed");
                        self.broken.store(true, Ordering::Relaxed);
                    }
                }
                // Written: the budget of these requests is free again.
                drop(batch);
            }
            drop(w);
            if lock(&self.queue).is_empty() {
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
fn write_batch(w: &mut TcpStream, batch: &[(Reply, OwnedSemaphorePermit)]) -> std::io::Result<()> {
    if let [(reply, _)] = batch {
        if reply.data.is_empty() {
            return w.write_all(&reply.head);
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
        let mut n = match w.write_vectored(&slices) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
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

/// One connection in transmission, shared by its workers.
struct Connection {
    ctx: Ctx,
    /// The socket's receiving side and what was received of it.
    reader: Mutex<RequestReader>,
    budget: Arc<Semaphore>,
    /// Requests being answered by workers that let the reader go.
    busy: AtomicUsize,
    /// Workers waiting for the reader.
    idle: AtomicUsize,
    /// Workers alive.
    workers: AtomicUsize,
    /// The stream ended (the client left or broke the protocol, or the
    /// server shut the socket down): no worker reads any more.
    ended: AtomicBool,
    /// Told when the last worker has left.
    finished: Mutex<Option<oneshot::Sender<()>>>,
    /// The connection's span, entered by every worker.
    span: tracing::Span,
    /// Keeps the export's device in use while a worker may touch it.
    _export_use: ExportUse,
}

impl Connection {
    /// The next request (or batch of writes) from the stream; `None` when
    /// the stream has ended, after marking it so.
    fn next(&self, requests: &mut RequestReader) -> Option<Work> {
        if self.ended.load(Ordering::SeqCst) {
            return None;
        }
        let work = self.take(requests);
        if work.is_none() {
            self.ended.store(true, Ordering::SeqCst);
        }
        work
    }

    fn take(&self, requests: &mut RequestReader) -> Option<Work> {
        let export = &self.ctx.export;
        requests.may_poll = self.busy.load(Ordering::SeqCst) == 0;
        let header = match requests.header() {
            Ok(Some(h)) => h,
            Ok(None) => return None,
            Err(e) => {
                tracing::debug!(cause = %e, "connection ended mid-request");
                return None;
            }
        };
        let Some(req) = Request::parse(&header) else {
            tracing::info!(export = %export.name, "closing nbd connection: bad request magic");
            return None;
        };
        if req.kind == CMD_DISC {
            return None;
        }
        if req.kind == CMD_WRITE && req.len > MAX_REQUEST {
            tracing::info!(export = %export.name, len = req.len, "closing nbd connection: write longer than the maximum block size");
            return None;
        }
        let need = units(&req);
        let permit = match self.budget.clone().try_acquire_many_owned(need) {
            Ok(p) => p,
            // Replies being written free it; the socket waits meanwhile.
            Err(_) => self
                .ctx
                .runtime
                .block_on(self.budget.clone().acquire_many_owned(need))
                .ok()?,
        };
        let payload = if req.kind == CMD_WRITE {
            match requests.payload(req.len as usize) {
                Ok(p) => p,
                Err(e) => {
                    tracing::debug!(cause = %e, "connection ended inside a write");
                    return None;
                }
            }
        } else {
            Bytes::new()
        };
        // WRITEs queued behind this one, already received whole, go to the
        // device with it (one hand-off to storage for all).
        let batchable =
            req.kind == CMD_WRITE && req.flags & !CMD_FLAG_FUA == 0 && !export.device.read_only();
        let mut batch = Vec::new();
        while batchable && batch.len() + 1 < MAX_BATCH {
            let Some(next) = requests.peek_write(req.flags) else {
                break;
            };
            // No budget: the request stays for the next round.
            let Ok(p) = self.budget.clone().try_acquire_many_owned(units(&next)) else {
                break;
            };
            let data = requests.take_write(&next);
            batch.push((next, data, p));
        }
        if batch.is_empty() {
            return Some(Work::One((req, payload, permit)));
        }
        batch.insert(0, (req, payload, permit));
        Some(Work::Writes(batch))
    }

    fn answer(&self, work: Work) {
        match work {
            Work::One(taken) => self.ctx.handle(taken),
            Work::Writes(batch) => self.ctx.handle_writes(batch),
        }
    }

    /// Starts another worker when none waits for the reader (the one that
    /// let it go is busy answering), up to [`MAX_WORKERS`].
    fn more_hands(self: &Arc<Self>) {
        if self.idle.load(Ordering::SeqCst) > 0 || self.ended.load(Ordering::SeqCst) {
            return;
        }
        let grown = self
            .workers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_WORKERS).then_some(n + 1)
            });
        if grown.is_ok() && !self.spawn_worker() {
            self.leave();
        }
    }

    /// Starts a worker already counted in `workers`; false when the
    /// system refused a thread.
    fn spawn_worker(self: &Arc<Self>) -> bool {
        let conn = self.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || conn.work());
        if let Err(e) = &spawned {
            tracing::warn!(cause = %e, "cannot start an nbd connection thread");
        }
        spawned.is_ok()
    }

    /// A worker: takes turns at the reader until the stream ends.
    fn work(self: Arc<Self>) {
        crate::fsutil::serve_blocking_here();
        let span = self.span.clone();
        let _entered = span.enter();
        loop {
            self.idle.fetch_add(1, Ordering::SeqCst);
            let mut requests = lock(&self.reader);
            self.idle.fetch_sub(1, Ordering::SeqCst);
            let work = loop {
                let Some(work) = self.next(&mut requests) else {
                    break None;
                };
                if self.busy.load(Ordering::SeqCst) > 0 || requests.has_buffered() || work.is_big()
                {
                    // Counted before the reader goes, so whoever reads next
                    // does not take its request to be alone.
                    self.busy.fetch_add(1, Ordering::SeqCst);
                    break Some(work);
                }
                // Alone: answered without letting the socket go.
                self.answer(work);
            };
            drop(requests);
            let Some(work) = work else {
                break;
            };
            self.more_hands();
            self.answer(work);
            self.busy.fetch_sub(1, Ordering::SeqCst);
        }
        self.leave();
    }

    /// A worker leaves; the last one closes the socket (every reply it
    /// owed is written by now) and says so.
    fn leave(&self) {
        if self.workers.fetch_sub(1, Ordering::SeqCst) != 1 {
            return;
        }
        let _ = lock(&self.ctx.writer).shutdown(Shutdown::Both);
        if let Some(tx) = lock(&self.finished).take() {
            let _ = tx.send(());
        }
    }
}

/// Ends a connection from outside: its workers see the end of the stream,
/// answer what they hold, and leave.
pub(super) struct Closer(TcpStream);

impl Closer {
    /// Stops reading requests; requests in flight still get replies.
    pub(super) fn stop_reading(&self) {
        let _ = self.0.shutdown(Shutdown::Read);
    }

    /// Drops the connection outright: a worker blocked writing to a client
    /// that reads nothing fails and leaves.
    pub(super) fn abort(&self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }
}

/// Starts serving requests on an export on threads of their own, polling
/// for a fast client's next request for up to `poll`; `done`
/// is told when the client disconnected or broke the protocol, or the
/// connection was closed through the returned [`Closer`], and every
/// request in flight was answered.
///
/// # Errors
/// The socket could not be made blocking or cloned, or no thread could be
/// started; the connection is dropped.
pub(super) fn start(
    socket: TcpStream,
    negotiated: Negotiated,
    export_use: ExportUse,
    poll: Duration,
    done: oneshot::Sender<()>,
) -> std::io::Result<Closer> {
    socket.set_nonblocking(false)?;
    let writer = socket.try_clone()?;
    let closer = Closer(socket.try_clone()?);
    let conn = Arc::new(Connection {
        ctx: Ctx {
            export: negotiated.export,
            structured: negotiated.structured,
            block_status: negotiated.block_status,
            runtime: Handle::current(),
            queue: Mutex::new(Vec::new()),
            writer: Mutex::new(writer),
            broken: AtomicBool::new(false),
        },
        reader: Mutex::new(RequestReader::new(socket, poll)),
        budget: Arc::new(Semaphore::new(BUDGET_UNITS as usize)),
        busy: AtomicUsize::new(0),
        idle: AtomicUsize::new(0),
        workers: AtomicUsize::new(1),
        ended: AtomicBool::new(false),
        finished: Mutex::new(Some(done)),
        span: tracing::Span::current(),
        _export_use: export_use,
    });
    if !conn.spawn_worker() {
        return Err(std::io::Error::other("no thread for the connection"));
    }
    Ok(closer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    #[test]
    fn the_reader_polls_only_for_a_client_that_answers_quickly() {
        let poll = Duration::from_millis(20);
        let (mut client, server) = pair();
        let mut reader = RequestReader::new(server, poll);
        reader.may_poll = true;
        // Sent before the wait: a quick client, polled for next time.
        client.write_all(&[1; REQUEST_LEN]).unwrap();
        assert_eq!(reader.header().unwrap(), Some([1; REQUEST_LEN]));
        assert!(reader.answers_fast);
        // A pause longer than the poll: the wait ends in recv, and the
        // next wait does not poll.
        let late = std::thread::spawn(move || {
            std::thread::sleep(poll * 3);
            client.write_all(&[2; REQUEST_LEN]).unwrap();
            client
        });
        assert_eq!(reader.header().unwrap(), Some([2; REQUEST_LEN]));
        assert!(!reader.answers_fast);
        let mut client = late.join().unwrap();
        // Quick again: polled for again.
        client.write_all(&[3; REQUEST_LEN]).unwrap();
        assert_eq!(reader.header().unwrap(), Some([3; REQUEST_LEN]));
        assert!(reader.answers_fast);
        // The end of the stream is seen while polling, too.
        drop(client);
        assert_eq!(reader.header().unwrap(), None);
    }

    /// A long WRITE's data, partly received with its header and partly
    /// after it, comes out whole and in order, followed by the next
    /// request; its buffer goes back to the pool when the data is dropped
    /// and serves the next long WRITE; a short payload and a stream ending
    /// inside a long one are handled as before.
    #[test]
    fn long_write_data_is_received_into_a_reused_pool_buffer() {
        let (mut client, server) = pair();
        let mut reader = RequestReader::new(server, Duration::ZERO);
        let len = 3 * POOLED_PAYLOAD + 123;
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let sender = {
            let data = data.clone();
            std::thread::spawn(move || {
                client.write_all(&[1; REQUEST_LEN]).unwrap();
                // Part of the data with the header, the rest later.
                client.write_all(&data[..1000]).unwrap();
                std::thread::sleep(Duration::from_millis(50));
                client.write_all(&data[1000..]).unwrap();
                client.write_all(&[2; REQUEST_LEN]).unwrap();
                client.write_all(&data).unwrap();
                client.write_all(&[3; 10]).unwrap();
                client.write_all(&data[..500]).unwrap();
                client
            })
        };
        assert_eq!(reader.header().unwrap(), Some([1; REQUEST_LEN]));
        let first = reader.payload(len).unwrap();
        assert_eq!(&first[..], &data[..]);
        let first_buf = first.as_ptr();
        drop(first);
        assert_eq!(reader.pool.free_buffers(), 1, "buffer back in the pool");
        assert_eq!(reader.header().unwrap(), Some([2; REQUEST_LEN]));
        let second = reader.payload(len).unwrap();
        assert_eq!(&second[..], &data[..]);
        assert_eq!(second.as_ptr(), first_buf, "the pool buffer is reused");
        let client = sender.join().unwrap();
        // A short payload comes from the request buffer.
        assert_eq!(&reader.payload(10).unwrap()[..], &[3; 10]);
        // The client leaves inside a long payload.
        drop(client);
        let cut = reader.payload(len).unwrap_err();
        assert_eq!(cut.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}
