//! The append-only change log of a namespace: what makes a CREATE, REMOVE or
//! RENAME durable with one small append instead of a rewrite of the whole
//! tree.
//!
//! A change is one record (the nodes and publications it touched, in full),
//! appended to `namespace.log` and made durable by one `fdatasync` shared by
//! every change that arrived meanwhile (group commit, as in the write cache's
//! journal). The log's space is written with zeros once and then reused, so
//! its syncs flush data only.
//!
//! A *checkpoint* writes the whole tree to `namespace.json` (temp file,
//! fsync, rename, fsync folder) with the sequence number of the last change
//! it covers, then starts a new log *epoch*, which kills every record. The
//! namespace holds its write lock across a checkpoint, so no change can slip
//! between the snapshot and the new epoch.
//!
//! At open, the records of the live epoch are read in order, stopping at the
//! first one that is torn, of another epoch or not newer than the one before:
//! that is where the last append ended. Only records newer than the
//! snapshot's sequence are applied. A change is acknowledged only after the
//! sync that covers it, so every acknowledged change is in that prefix; a
//! crash at any point leaves the snapshot plus a valid prefix of changes,
//! each applied whole.
//!
//! ```text
//! namespace.log
//!   0  magic      8   LOG_MAGIC_V1
//!   8  epoch      8   random, new at every checkpoint
//!  16  reserved   4080 zero (records start on their own page)
//! 4096 record*:
//!   0  epoch      8   the live epoch
//!   8  seq        8   sequence number of the change, increasing
//!  16  len        4   payload bytes
//!  20  check     12   first 12 bytes of BLAKE3(epoch, seq, len, payload)
//!  32  payload  len   the change (JSON)
//! ```

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::lock;
use tokio::sync::watch;

/// First 8 bytes of BLAKE3("revive:namespace-log:v1").
pub const LOG_MAGIC_V1: [u8; 8] = [0xda, 0x0f, 0xde, 0x16, 0xf4, 0x4f, 0x6b, 0x8f];
/// Where records start.
const RECORDS_OFFSET: u64 = 4096;
/// Size of a record header.
const RECORD_HEADER: usize = 32;
/// The log grows by this much zeroed space at a time.
const GROW: u64 = 1 << 20;
/// Largest change record accepted at open: a corrupt length never makes us
/// allocate more than this.
const MAX_RECORD: u32 = 64 << 20;
/// Bytes of records after which the namespace checkpoints.
pub const CHECKPOINT_BYTES: u64 = 4 << 20;

/// A record read back at open.
#[derive(Debug)]
pub struct LoggedChange {
    /// Its sequence number.
    pub seq: u64,
    /// The encoded change.
    pub payload: Vec<u8>,
}

/// The open log file and where the next record goes.
#[derive(Debug)]
struct LogFile {
    file: File,
    epoch: u64,
    tail: u64,
    /// Bytes `[0, allocated)` were written (zeros or records) and synced.
    allocated: u64,
}

/// What changes between flushes.
#[derive(Debug, Default)]
struct Pending {
    /// Encoded records not yet appended, in sequence order.
    records: Vec<(u64, Vec<u8>)>,
    /// Sequence number of the last change queued.
    last_seq: u64,
    /// Every change up to this one is durable.
    durable_seq: u64,
    /// A flush is running.
    flushing: bool,
    /// Set when an append failed: later changes are refused until restart,
    /// since memory holds a change the disk does not.
    poisoned: Option<String>,
    /// Record bytes appended since the last checkpoint.
    log_bytes: u64,
    /// Record bytes after which the namespace checkpoints.
    checkpoint_bytes: u64,
}

/// The change log of one namespace. Cheap to share.
#[derive(Debug)]
pub struct NsLog {
    path: PathBuf,
    file: Mutex<LogFile>,
    pending: Mutex<Pending>,
    flushed: watch::Sender<u64>,
}

fn check(epoch: u64, seq: u64, payload: &[u8]) -> [u8; 12] {
    let mut h = blake3::Hasher::new();
    h.update(&epoch.to_le_bytes());
    h.update(&seq.to_le_bytes());
    h.update(&(payload.len() as u32).to_le_bytes());
    h.update(payload);
    let mut out = [0u8; 12];
    out.copy_from_slice(&h.finalize().as_bytes()[..12]);
    out
}

fn new_epoch(old: u64) -> u64 {
    loop {
        let e: u64 = rand::random();
        if e != old && e != 0 {
            return e;
        }
    }
}

fn read_full_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

impl LogFile {
    /// Writes a new epoch's header: every record so far is dead.
    fn reset(&mut self) -> io::Result<()> {
        self.epoch = new_epoch(self.epoch);
        let mut header = [0u8; 16];
        header[..8].copy_from_slice(&LOG_MAGIC_V1);
        header[8..].copy_from_slice(&self.epoch.to_le_bytes());
        self.file.write_all_at(&header, 0)?;
        if self.allocated < RECORDS_OFFSET {
            self.file.set_len(RECORDS_OFFSET)?;
            self.allocated = RECORDS_OFFSET;
        }
        self.file.sync_data()?;
        self.tail = RECORDS_OFFSET;
        Ok(())
    }

    /// Appends records with one write and one `fdatasync`.
    fn append(&mut self, records: &[(u64, Vec<u8>)]) -> io::Result<u64> {
        let mut buf = Vec::new();
        for (seq, payload) in records {
            buf.extend_from_slice(&self.epoch.to_le_bytes());
            buf.extend_from_slice(&seq.to_le_bytes());
            buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            buf.extend_from_slice(&check(self.epoch, *seq, payload));
            buf.extend_from_slice(payload);
        }
        let end = self.tail + buf.len() as u64;
        if end > self.allocated {
            let grown = end.next_multiple_of(GROW);
            let zeros = vec![0u8; (grown - self.allocated) as usize];
            self.file.write_all_at(&zeros, self.allocated)?;
            self.allocated = grown;
        }
        self.file.write_all_at(&buf, self.tail)?;
        self.file.sync_data()?;
        self.tail = end;
        Ok(buf.len() as u64)
    }

    /// The records of the live epoch, up to the first that does not check out.
    fn read_live(&mut self) -> io::Result<Vec<LoggedChange>> {
        let mut out: Vec<LoggedChange> = Vec::new();
        let mut pos = RECORDS_OFFSET;
        let mut head = [0u8; RECORD_HEADER];
        loop {
            if read_full_at(&self.file, &mut head, pos)? < RECORD_HEADER {
                break;
            }
            let field = |at: usize| {
                let mut b = [0u8; 8];
                b.copy_from_slice(&head[at..at + 8]);
                u64::from_le_bytes(b)
            };
            let (epoch, seq) = (field(0), field(8));
            let len = u32::from_le_bytes([head[16], head[17], head[18], head[19]]);
            let newer = out.last().is_none_or(|last| seq > last.seq);
            if epoch != self.epoch || !newer || len > MAX_RECORD {
                break;
            }
            let mut payload = vec![0u8; len as usize];
            if read_full_at(&self.file, &mut payload, pos + RECORD_HEADER as u64)? < payload.len()
                || head[20..32] != check(epoch, seq, &payload)
            {
                break;
            }
            out.push(LoggedChange { seq, payload });
            pos += RECORD_HEADER as u64 + u64::from(len);
        }
        self.tail = pos;
        Ok(out)
    }
}

impl NsLog {
    /// Opens (creating) the log at `path` and returns the changes of its live
    /// epoch, in order. `snapshot_seq` is the last change the snapshot covers:
    /// sequence numbers continue after the larger of it and the log's last.
    ///
    /// # Errors
    /// I/O errors.
    pub fn open(path: &Path, snapshot_seq: u64) -> io::Result<(NsLog, Vec<LoggedChange>)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let allocated = file.metadata()?.len();
        let mut log = LogFile {
            file,
            epoch: 0,
            tail: RECORDS_OFFSET,
            allocated,
        };
        let mut header = [0u8; 16];
        let changes =
            if read_full_at(&log.file, &mut header, 0)? == 16 && header[..8] == LOG_MAGIC_V1 {
                let mut e = [0u8; 8];
                e.copy_from_slice(&header[8..]);
                log.epoch = u64::from_le_bytes(e);
                log.read_live()?
            } else {
                // A new log, or one whose header never became durable: no record
                // can be live.
                log.reset()?;
                Vec::new()
            };
        let last = changes.last().map_or(0, |c| c.seq).max(snapshot_seq);
        let log_bytes = log.tail - RECORDS_OFFSET;
        Ok((
            NsLog {
                path: path.to_path_buf(),
                file: Mutex::new(log),
                pending: Mutex::new(Pending {
                    last_seq: last,
                    durable_seq: last,
                    log_bytes,
                    checkpoint_bytes: CHECKPOINT_BYTES,
                    ..Pending::default()
                }),
                flushed: watch::Sender::new(0),
            },
            changes,
        ))
    }

    /// Queues an encoded change and returns its sequence number. Called under
    /// the namespace's write lock, so log order is the order of changes.
    ///
    /// # Errors
    /// An earlier append failed: the namespace in memory is ahead of the disk.
    pub fn append(&self, payload: Vec<u8>) -> io::Result<u64> {
        let mut p = lock(&self.pending);
        if let Some(reason) = &p.poisoned {
            return Err(io::Error::other(format!(
                "namespace log '{}' failed earlier ({reason}); restart revive",
                self.path.display()
            )));
        }
        p.last_seq += 1;
        let seq = p.last_seq;
        p.records.push((seq, payload));
        Ok(seq)
    }

    /// Sequence number of the last change queued.
    pub fn last_seq(&self) -> u64 {
        lock(&self.pending).last_seq
    }

    /// Whether enough was logged since the last checkpoint to take one.
    pub fn wants_checkpoint(&self) -> bool {
        let p = lock(&self.pending);
        p.log_bytes >= p.checkpoint_bytes
    }

    /// Sets the record bytes after which the namespace checkpoints.
    pub fn set_checkpoint_bytes(&self, bytes: u64) {
        lock(&self.pending).checkpoint_bytes = bytes;
    }

    /// Waits until change `seq` is durable, flushing as needed; concurrent
    /// callers share one flush.
    ///
    /// # Errors
    /// The append failed (the log is then poisoned).
    pub async fn wait_durable(self: &Arc<Self>, seq: u64) -> io::Result<()> {
        loop {
            let mut rx = self.flushed.subscribe();
            let start = {
                let mut p = lock(&self.pending);
                if p.durable_seq >= seq {
                    return Ok(());
                }
                if let Some(reason) = &p.poisoned {
                    return Err(io::Error::other(reason.clone()));
                }
                let start = !p.flushing;
                p.flushing = true;
                start
            };
            if start {
                let log = Arc::clone(self);
                // Detached: a cancelled caller must not leave `flushing` set.
                drop(tokio::task::spawn_blocking(move || log.flush()));
            }
            if rx.changed().await.is_err() {
                return Err(io::Error::other("namespace log flusher gone"));
            }
        }
    }

    /// One flush: appends every queued record, then wakes all waiters.
    fn flush(&self) {
        let batch = std::mem::take(&mut lock(&self.pending).records);
        let result = match batch.last() {
            None => Ok(0),
            Some(_) => lock(&self.file).append(&batch),
        };
        {
            let mut p = lock(&self.pending);
            p.flushing = false;
            match result {
                Ok(bytes) => {
                    p.log_bytes += bytes;
                    if let Some((seq, _)) = batch.last() {
                        p.durable_seq = p.durable_seq.max(*seq);
                    }
                }
                Err(e) => {
                    tracing::error!(log = %self.path.display(), cause = %e, "namespace log append failed");
                    p.poisoned = Some(e.to_string());
                }
            }
        }
        self.flushed.send_modify(|n| *n += 1);
    }

    /// Replaces the snapshot at `snapshot` with `data` (which covers every
    /// change up to `seq`, all durable already) and starts a new epoch.
    /// Blocking: run it in `spawn_blocking`, with the namespace locked.
    ///
    /// # Errors
    /// I/O errors; the old snapshot and log then still hold every change.
    pub fn checkpoint(&self, snapshot: &Path, data: &[u8], seq: u64) -> io::Result<()> {
        crate::fsutil::write_atomic(snapshot, data)?;
        let mut file = lock(&self.file);
        file.reset()?;
        let mut p = lock(&self.pending);
        p.log_bytes = 0;
        p.durable_seq = p.durable_seq.max(seq);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_is_derived_from_its_versioned_name() {
        assert_eq!(
            LOG_MAGIC_V1[..],
            blake3::hash(b"revive:namespace-log:v1").as_bytes()[..8]
        );
    }

    #[tokio::test]
    async fn appended_changes_come_back_in_order_and_a_torn_tail_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("namespace.log");
        let (log, old) = NsLog::open(&path, 0).unwrap();
        assert!(old.is_empty());
        let log = Arc::new(log);
        let a = log.append(b"first".to_vec()).unwrap();
        let b = log.append(b"second".to_vec()).unwrap();
        log.wait_durable(b).await.unwrap();
        assert!(a < b);
        drop(log);
        // Tear the second record's payload.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        let second_payload = RECORDS_OFFSET + RECORD_HEADER as u64 + 5 + RECORD_HEADER as u64;
        f.write_all_at(b"X", second_payload).unwrap();
        let (log, changes) = NsLog::open(&path, 0).unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].payload, b"first");
        assert_eq!(
            log.last_seq(),
            a,
            "sequence continues after the valid prefix"
        );
    }

    #[tokio::test]
    async fn a_checkpoint_kills_every_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("namespace.log");
        let (log, _) = NsLog::open(&path, 0).unwrap();
        let log = Arc::new(log);
        let s = log.append(b"x".to_vec()).unwrap();
        log.wait_durable(s).await.unwrap();
        log.checkpoint(&dir.path().join("namespace.json"), b"{}", s)
            .unwrap();
        let (log, changes) = NsLog::open(&path, s).unwrap();
        assert!(changes.is_empty());
        assert_eq!(log.last_seq(), s);
    }
}
