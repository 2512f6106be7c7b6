//! The write-ahead journal of one write cache: what makes a stable write
//! durable with a single `fdatasync`.
//!
//! Without it, a stable write to a block not yet in the cache costs two
//! ordered syncs: the data file (which, being sparse, also commits the block
//! allocation to the file system's own journal) and then the bitmap page that
//! publishes the block. With it, the write's bytes are appended as a
//! checksummed record to `NAME.journal`, a file whose space was written once
//! (zeros) and is then reused, so its `fdatasync` flushes data only and
//! commits no allocation. The reply goes out after that one sync.
//!
//! The bytes are also written to the data file (unsynced) and the bits set in
//! memory, so reads are unchanged: the data file's page cache holds the
//! newest bytes. Later, a *checkpoint* (the old two-step flush in `commit`:
//! data file `fdatasync`, then bitmap pages and header, `fdatasync`) makes
//! the data file and bitmap cover every record, and only then is the journal
//! emptied, by writing a header with a new *epoch*: records of any other
//! epoch are dead.
//!
//! At `open`, the records of the live epoch are read in order and replayed
//! into the data file and bitmap (a checkpoint follows), stopping at the
//! first record that is torn, of another epoch, or out of sequence: that is
//! where the last append ended. Records are only ever acknowledged after the
//! sync that covers them, so everything acknowledged is in the valid prefix;
//! a replayed unacknowledged write reads as new, one not replayed as old.
//!
//! Blocking code, called from the serialized flush (`commit.rs`) and `open`.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::error::{io_err, Result};
use super::files::with_descriptors;
use super::format::{
    JournalHeader, RecordHeader, JOURNAL_GROW, JOURNAL_HEADER_SIZE, JOURNAL_RECORDS_OFFSET,
    RECORD_HEADER_SIZE,
};
use super::open::read_full_at;

/// One write waiting to be appended: the bytes written to the data file at
/// `offset` (contiguous pieces), and the logical size the write left.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    /// Byte offset of the first piece in the logical file (and data file).
    pub offset: u64,
    /// Contiguous pieces, as written to the data file.
    pub pieces: Vec<Bytes>,
    /// Logical size after the write; replay raises the size to it.
    pub logical_end: u64,
}

impl Record {
    /// Payload length in bytes.
    pub fn len(&self) -> u64 {
        self.pieces.iter().map(|p| p.len() as u64).sum()
    }

    /// Bytes the record takes in the journal.
    pub fn encoded_len(&self) -> u64 {
        RECORD_HEADER_SIZE as u64 + self.len()
    }
}

/// A record read back from the journal at `open`.
#[derive(Debug)]
pub(crate) struct Replayed {
    /// Byte offset of the payload in the logical file.
    pub offset: u64,
    /// The bytes to write there.
    pub payload: Vec<u8>,
    /// Logical size after the write.
    pub logical_end: u64,
}

/// Where the next record goes in the journal file (the file itself is
/// one of the cache's `Files`, passed to every call).
#[derive(Debug)]
pub(crate) struct Journal {
    path: PathBuf,
    /// Records of other epochs are dead.
    epoch: u64,
    /// Sequence number of the next record (from 0 in each epoch).
    next_seq: u64,
    /// Offset of the next record.
    tail: u64,
    /// Bytes `[0, allocated)` have been written (zeros or records) and
    /// synced, so overwriting them allocates nothing.
    allocated: u64,
}

/// A fresh epoch: random, so a record left from any earlier epoch (even one
/// whose header was lost) never matches by chance.
fn new_epoch(old: u64) -> u64 {
    loop {
        let e: u64 = rand::random();
        if e != old && e != 0 {
            return e;
        }
    }
}

impl Journal {
    /// Creates an empty journal at `path` (emptying a leftover one), durable
    /// once the caller syncs the folder; returns it and its open file.
    ///
    /// # Errors
    /// I/O errors.
    pub fn create(path: &Path) -> Result<(Journal, File)> {
        let file = with_descriptors(|| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
        })
        .map_err(io_err("create", path))?;
        let mut journal = Journal {
            path: path.to_path_buf(),
            epoch: 0,
            next_seq: 0,
            tail: JOURNAL_RECORDS_OFFSET,
            allocated: 0,
        };
        journal.reset(&file)?;
        Ok((journal, file))
    }

    /// Opens `path`, creating it when missing (a cache made by an older
    /// revive, or a create interrupted before its journal), and returns the
    /// records of its live epoch, in order. The caller replays them, makes
    /// them durable in the data file and bitmap, then calls `reset`.
    ///
    /// A header that is missing or damaged means no record is live: the
    /// header is only ever rewritten after a checkpoint made every record
    /// of the previous epoch redundant.
    ///
    /// # Errors
    /// I/O errors.
    pub fn open(path: &Path) -> Result<(Journal, File, Vec<Replayed>)> {
        let file = with_descriptors(|| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(path)
        })
        .map_err(io_err("open", path))?;
        let len = file.metadata().map_err(io_err("stat", path))?.len();
        let mut journal = Journal {
            path: path.to_path_buf(),
            epoch: 0,
            next_seq: 0,
            tail: JOURNAL_RECORDS_OFFSET,
            allocated: len,
        };
        let mut buf = [0u8; JOURNAL_HEADER_SIZE];
        let n = read_full_at(&file, &mut buf, 0).map_err(io_err("read", path))?;
        let Some(header) = JournalHeader::decode(&buf[..n]) else {
            return Ok((journal, file, Vec::new()));
        };
        journal.epoch = header.epoch;
        let records = journal.read_live(&file)?;
        Ok((journal, file, records))
    }

    /// Reads the records of the live epoch from the start, up to the first
    /// one that does not check out.
    fn read_live(&mut self, file: &File) -> Result<Vec<Replayed>> {
        let mut out = Vec::new();
        let mut pos = JOURNAL_RECORDS_OFFSET;
        let mut head = [0u8; RECORD_HEADER_SIZE];
        loop {
            let n = read_full_at(file, &mut head, pos).map_err(io_err("read", &self.path))?;
            let Some(rec) = RecordHeader::decode(&head[..n]) else {
                break;
            };
            if rec.epoch != self.epoch || rec.seq != self.next_seq {
                break;
            }
            let mut payload = vec![0u8; rec.len as usize];
            let n = read_full_at(file, &mut payload, pos + RECORD_HEADER_SIZE as u64)
                .map_err(io_err("read", &self.path))?;
            if n != payload.len() || !rec.checks(&head, &payload) {
                break;
            }
            out.push(Replayed {
                offset: rec.offset,
                payload,
                logical_end: rec.logical_end,
            });
            self.next_seq += 1;
            pos += RECORD_HEADER_SIZE as u64 + u64::from(rec.len);
        }
        self.tail = pos;
        Ok(out)
    }

    /// Bytes of records in the live epoch.
    pub fn live_bytes(&self) -> u64 {
        self.tail - JOURNAL_RECORDS_OFFSET
    }

    /// Appends `records` with one write and one `fdatasync`: when this
    /// returns, they survive a crash.
    ///
    /// Space past what was ever written is first filled with zeros in
    /// `JOURNAL_GROW` steps (synced by the same `fdatasync`), so that later
    /// epochs overwrite written blocks and their syncs commit no allocation.
    /// When that fails (the file system is full), nothing changed: the
    /// caller makes the records durable by a checkpoint instead.
    ///
    /// # Errors
    /// I/O errors; the journal's position is unchanged, so the records can
    /// be covered another way.
    pub fn append(&mut self, file: &File, records: &[Record]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let total: u64 = records.iter().map(Record::encoded_len).sum();
        let mut buf = Vec::with_capacity(total as usize);
        let mut seq = self.next_seq;
        for r in records {
            let header = RecordHeader {
                epoch: self.epoch,
                seq,
                offset: r.offset,
                logical_end: r.logical_end,
                len: r.len() as u32,
            };
            header.encode_into(&mut buf, &r.pieces);
            seq += 1;
        }
        let err = || io_err("write", &self.path);
        let end = self.tail + total;
        if end > self.allocated {
            let grown = end.next_multiple_of(JOURNAL_GROW);
            let zeros = vec![0u8; (grown - self.allocated) as usize];
            file.write_all_at(&zeros, self.allocated).map_err(err())?;
            self.allocated = grown;
        }
        file.write_all_at(&buf, self.tail).map_err(err())?;
        file.sync_data().map_err(io_err("sync", &self.path))?;
        self.next_seq = seq;
        self.tail = end;
        Ok(())
    }

    /// Starts a new epoch: every record written so far is dead. Called only
    /// after a checkpoint made the data file and bitmap cover them all.
    ///
    /// # Errors
    /// I/O errors; the caller then poisons the cache.
    pub fn reset(&mut self, file: &File) -> Result<()> {
        self.epoch = new_epoch(self.epoch);
        let header = JournalHeader { epoch: self.epoch };
        file.write_all_at(&header.encode(), 0)
            .map_err(io_err("write", &self.path))?;
        if self.allocated < JOURNAL_RECORDS_OFFSET {
            // A new journal: records start on their own page.
            file.set_len(JOURNAL_RECORDS_OFFSET)
                .map_err(io_err("write", &self.path))?;
            self.allocated = JOURNAL_RECORDS_OFFSET;
        }
        file.sync_data().map_err(io_err("sync", &self.path))?;
        self.next_seq = 0;
        self.tail = JOURNAL_RECORDS_OFFSET;
        Ok(())
    }
}
