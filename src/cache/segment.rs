//! The overlay vocabulary between a write cache and its caller: what a read
//! returns (`Segment`s), how the cache asks for base bytes (`BaseRead`), and
//! how segments become one buffer (`assemble`).

use std::future::Future;
use std::io;

use bytes::{Bytes, BytesMut};

/// One piece of a read, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Bytes written by clients, straight from the cache.
    Cached(Bytes),
    /// Bytes the caller must read from the base (the backup) at `offset`.
    Base {
        /// Offset in the file (and in the base: same offsets).
        offset: u64,
        /// Number of bytes.
        len: u64,
    },
    /// Bytes that read as zeros: beyond the base after a truncate or an
    /// extend, or anywhere in a file without a base.
    Zero {
        /// Number of bytes.
        len: u64,
    },
}

impl Segment {
    /// Number of bytes this segment covers.
    pub fn len(&self) -> u64 {
        match self {
            Segment::Cached(b) => b.len() as u64,
            Segment::Base { len, .. } | Segment::Zero { len } => *len,
        }
    }

    /// Whether the segment covers no bytes (never produced by `read`).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The base (backup) bytes under a write cache, read asynchronously.
///
/// The cache calls it for copy-on-write of partial blocks that are not cached
/// yet, and `WriteCache::read_overlay` calls it for `Segment::Base`. It is
/// never called beyond the base length given at create (or lowered by a
/// truncate), so an implementation can treat any such call as a bug.
pub trait BaseRead: Sync {
    /// Reads exactly `len` bytes of the base at `offset`.
    fn read_base(&self, offset: u64, len: usize) -> impl Future<Output = io::Result<Bytes>> + Send;
}

/// The base of a file that has none (created by a client): never read,
/// because such a cache has a base length of zero.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoBase;

impl BaseRead for NoBase {
    async fn read_base(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        Err(io::Error::other(format!(
            "file has no base, yet {len} bytes at offset {offset} were asked of it"
        )))
    }
}

/// Concatenates segments into one buffer, reading `Base` ones from `base`.
///
/// # Errors
/// The first error of `base`.
pub async fn assemble<B: BaseRead + ?Sized>(segments: Vec<Segment>, base: &B) -> io::Result<Bytes> {
    if let [Segment::Cached(only)] = segments.as_slice() {
        return Ok(only.clone());
    }
    let total: u64 = segments.iter().map(Segment::len).sum();
    let mut out = BytesMut::with_capacity(usize::try_from(total).map_err(io::Error::other)?);
    for seg in segments {
        match seg {
            Segment::Cached(b) => out.extend_from_slice(&b),
            Segment::Zero { len } => out.resize(out.len() + len as usize, 0),
            Segment::Base { offset, len } => {
                let bytes = base.read_base(offset, len as usize).await?;
                if bytes.len() as u64 != len {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "base returned {} of {len} bytes at offset {offset}",
                            bytes.len()
                        ),
                    ));
                }
                out.extend_from_slice(&bytes);
            }
        }
    }
    Ok(out.freeze())
}
