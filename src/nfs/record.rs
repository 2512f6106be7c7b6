//! ONC RPC record marking (RFC 5531 section 11) over TCP: splits a byte
//! stream into records, with memory bounded by what arrives.
//!
//! ```text
//! +--------------------------------+----------------------+
//! | last:1 | fragment length:31    | fragment bytes ...   |  repeated until last = 1
//! +--------------------------------+----------------------+
//! ```

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest record accepted: a 1 MiB WRITE (wtmax) plus headers fits many
/// times over, while a garbage length cannot make us buffer gigabytes.
pub const MAX_RECORD: usize = 4 * 1024 * 1024 + 64 * 1024;

/// How much to read from the socket at a time when nothing bigger is known
/// to be coming: many small calls (4 KiB READs at queue depth 16) arrive in
/// one read.
const READ_CHUNK: usize = 64 * 1024;

/// Set in the record mark of a record's last fragment.
pub(super) const LAST_FRAGMENT: u32 = 0x8000_0000;

/// Why a connection's byte stream cannot go on; the connection is closed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The socket failed or closed in the middle of a record.
    #[error("reading record: {0}")]
    Io(#[from] std::io::Error),
    /// A record grew beyond the reader's limit ([`MAX_RECORD`] by default).
    #[error("record of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// No byte of a new record arrived within the idle timeout.
    #[error("idle")]
    Idle,
    /// A record's bytes stopped coming before it was whole.
    #[error("record not sent whole in time")]
    Stalled,
}

/// Splits a TCP byte stream into RPC records.
///
/// Memory follows what arrives, never what a record marker claims: the
/// buffer grows at most by what is already buffered (from 64 KiB), so a
/// peer that claims 4 MiB and sends a few bytes holds 64 KiB.
pub struct RecordReader<R> {
    inner: R,
    buf: BytesMut,
    /// Fragments of a record that spans several (rare: clients send one).
    partial: Option<BytesMut>,
    /// Largest record accepted.
    max_record: usize,
    /// When the first buffered byte of the record being received arrived.
    started: Option<Instant>,
}

impl<R: AsyncRead + Unpin> RecordReader<R> {
    /// True when bytes of a further record are already buffered.
    pub fn has_buffered(&self) -> bool {
        !self.buf.is_empty() || self.partial.is_some()
    }

    /// Read records from `inner`, up to [`MAX_RECORD`] bytes each.
    pub fn new(inner: R) -> Self {
        Self::with_limit(inner, MAX_RECORD)
    }

    /// Read records of at most `max_record` bytes from `inner`.
    pub fn with_limit(inner: R, max_record: usize) -> Self {
        Self {
            inner,
            buf: BytesMut::new(),
            partial: None,
            max_record,
            started: None,
        }
    }

    /// The next complete record; `None` at a clean end of stream.
    ///
    /// # Errors
    /// End of stream inside a record, a socket error, or an oversized record.
    pub async fn next_record(&mut self) -> Result<Option<Bytes>, FrameError> {
        self.next_record_within(None, None).await
    }

    /// The next complete record, waiting at most `idle` for its first byte
    /// and at most `record` from its first byte to its last (no limit for
    /// `None`). Cancel-safe: bytes read stay buffered.
    ///
    /// # Errors
    /// As [`RecordReader::next_record`], plus [`FrameError::Idle`] and
    /// [`FrameError::Stalled`] when a wait runs out.
    pub async fn next_record_within(
        &mut self,
        idle: Option<Duration>,
        record: Option<Duration>,
    ) -> Result<Option<Bytes>, FrameError> {
        loop {
            let mut need = 4;
            if self.buf.len() >= 4 {
                let mark = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
                let len = (mark & !LAST_FRAGMENT) as usize;
                let so_far = self.partial.as_ref().map_or(0, BytesMut::len);
                if so_far + len > self.max_record {
                    return Err(FrameError::TooLarge(so_far + len));
                }
                need = 4 + len;
                if self.buf.len() >= need {
                    let mut frag = self.buf.split_to(need);
                    let _ = frag.split_to(4);
                    let last = mark & LAST_FRAGMENT != 0;
                    let whole = match (self.partial.take(), last) {
                        (None, true) => Some(frag.freeze()),
                        (None, false) => {
                            self.partial = Some(frag);
                            None
                        }
                        (Some(mut p), last) => {
                            p.extend_from_slice(&frag);
                            if last {
                                Some(p.freeze())
                            } else {
                                self.partial = Some(p);
                                None
                            }
                        }
                    };
                    if let Some(record) = whole {
                        // Bytes of the next record may be buffered already:
                        // its time starts now.
                        self.started = (!self.buf.is_empty()).then(Instant::now);
                        return Ok(Some(record));
                    }
                    continue;
                }
            }
            // Room for READ_CHUNK at least (many small calls arrive in one
            // read), and for a long fragment grow with what has arrived, not
            // with what its marker claims: at most double. A 1 MiB WRITE
            // still arrives in a few reads.
            let missing = need - self.buf.len();
            self.buf
                .reserve(READ_CHUNK.max(missing.min(self.buf.len())));
            let waiting = self.buf.is_empty() && self.partial.is_none();
            let deadline = if waiting {
                idle.map(|d| (Instant::now() + d, FrameError::Idle))
            } else {
                let started = *self.started.get_or_insert_with(Instant::now);
                record.map(|d| (started + d, FrameError::Stalled))
            };
            let read = self.inner.read_buf(&mut self.buf);
            let n = match deadline {
                Some((at, timed_out)) => match tokio::time::timeout_at(at.into(), read).await {
                    Ok(n) => n?,
                    Err(_) => return Err(timed_out),
                },
                None => read.await?,
            };
            if waiting && n > 0 {
                self.started = Some(Instant::now());
            }
            if n == 0 {
                if self.buf.is_empty() && self.partial.is_none() {
                    return Ok(None);
                }
                return Err(FrameError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(frags: &[(&[u8], bool)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (data, last) in frags {
            let mut mark = data.len() as u32;
            if *last {
                mark |= LAST_FRAGMENT;
            }
            out.extend_from_slice(&mark.to_be_bytes());
            out.extend_from_slice(data);
        }
        out
    }

    async fn records(input: Vec<u8>) -> (Vec<Bytes>, Option<FrameError>) {
        let mut rr = RecordReader::new(&input[..]);
        let mut out = Vec::new();
        loop {
            match rr.next_record().await {
                Ok(Some(r)) => out.push(r),
                Ok(None) => return (out, None),
                Err(e) => return (out, Some(e)),
            }
        }
    }

    #[tokio::test]
    async fn single_and_multi_fragment_records() {
        let mut input = record(&[(b"abcd", true)]);
        input.extend(record(&[(b"12", false), (b"34", false), (b"56", true)]));
        input.extend(record(&[(b"", true)]));
        let (recs, err) = records(input).await;
        assert!(err.is_none());
        assert_eq!(
            recs,
            vec![Bytes::from("abcd"), Bytes::from("123456"), Bytes::new()]
        );
    }

    #[tokio::test]
    async fn truncated_record_is_an_error() {
        let mut input = record(&[(b"abcdefgh", true)]);
        input.truncate(7);
        let (recs, err) = records(input).await;
        assert!(recs.is_empty());
        assert!(matches!(err, Some(FrameError::Io(_))));
    }

    #[tokio::test]
    async fn oversized_record_is_refused_without_buffering() {
        let input = (LAST_FRAGMENT | 0x7fff_ffff).to_be_bytes().to_vec();
        let (_, err) = records(input).await;
        assert!(matches!(err, Some(FrameError::TooLarge(_))));
        // Many small fragments adding up past the limit are refused too.
        let chunk = vec![0u8; 1024 * 1024];
        let frags: Vec<(&[u8], bool)> = (0..6).map(|_| (&chunk[..], false)).collect();
        let (_, err) = records(record(&frags)).await;
        assert!(matches!(err, Some(FrameError::TooLarge(_))));
    }

    #[tokio::test]
    async fn a_claimed_length_reserves_only_what_arrives() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut rr = RecordReader::new(server);
        let mut start = (LAST_FRAGMENT | (4 << 20)).to_be_bytes().to_vec();
        start.extend_from_slice(&[7u8; 100]);
        tokio::io::AsyncWriteExt::write_all(&mut client, &start)
            .await
            .unwrap();
        let read = rr.next_record_within(None, Some(Duration::from_millis(50)));
        assert!(matches!(read.await, Err(FrameError::Stalled)));
        assert!(rr.buf.capacity() <= 2 * READ_CHUNK, "{}", rr.buf.capacity());
    }

    #[tokio::test(start_paused = true)]
    async fn idle_and_stalled_connections_time_out() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let mut rr = RecordReader::new(server);
        let idle = Some(Duration::from_secs(360));
        let per_record = Some(Duration::from_secs(30));
        // Silence: idle after the idle timeout, not before.
        let wait = tokio::spawn(async move {
            let r = rr.next_record_within(idle, per_record).await;
            (rr, r)
        });
        tokio::time::sleep(Duration::from_secs(359)).await;
        assert!(!wait.is_finished());
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (mut rr, r) = wait.await.unwrap();
        assert!(matches!(r, Err(FrameError::Idle)), "{r:?}");
        // Half a record: stalled after the record timeout.
        let whole = record(&[(b"abcdefgh", true)]);
        tokio::io::AsyncWriteExt::write_all(&mut client, &whole[..6])
            .await
            .unwrap();
        let r = rr.next_record_within(idle, per_record).await;
        assert!(matches!(r, Err(FrameError::Stalled)), "{r:?}");
        // The rest, late: the record is still whole (the caller decides).
        tokio::io::AsyncWriteExt::write_all(&mut client, &whole[6..])
            .await
            .unwrap();
        let r = rr.next_record_within(idle, per_record).await.unwrap();
        assert_eq!(r, Some(Bytes::from_static(b"abcdefgh")));
    }
}
