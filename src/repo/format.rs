//! On-disk formats of the repository: every magic number and binary header.
//!
//! **Never change a layout or a magic here.** A new layout gets a new magic
//! (the version is part of the name it is derived from) and readers keep
//! accepting the old one. All integers are little-endian. The same tables are
//! in `docs/formats.md`.
//!
//! ```text
//! chunk object  (key chunks/<first 2 hex>/<64 hex BLAKE3 of the plain data>)
//!   0  magic        8   CHUNK_MAGIC_V1
//!   8  encoding     1   0 = raw, 1 = zstd
//!   9  reserved     3   zero
//!  12  plain_len    4   length of the plain data
//!  16  payload      …   raw data, or a zstd frame of it
//!
//! index page    (key pages/<first 2 hex>/<64 hex BLAKE3 of the whole object>)
//!   0  magic        8   PAGE_MAGIC_V1
//!   8  entries      4   number of entries (≤ PAGE_ENTRIES)
//!  12  reserved     4   zero
//!  16  entry[i]    32   chunk id, or 32 zero bytes for an all-zero chunk (hole)
//! ```

use super::chunk::ChunkId;
use super::RepoError;

/// First 8 bytes of BLAKE3("revive:chunk:v1").
pub const CHUNK_MAGIC_V1: [u8; 8] = [0xec, 0xd9, 0xe1, 0xce, 0xf1, 0x35, 0x09, 0xf8];
/// First 8 bytes of BLAKE3("revive:index-page:v1").
pub const PAGE_MAGIC_V1: [u8; 8] = [0x26, 0x44, 0xd3, 0x31, 0xcc, 0xbd, 0x1a, 0x4b];

/// Size of the chunk object header.
pub const CHUNK_HEADER_LEN: usize = 16;
/// Size of the index page header.
pub const PAGE_HEADER_LEN: usize = 16;

/// Chunk ids per index page. 1024 × 32 B = 32 KiB pages: one page covers 1 GiB of
/// disk at 1 MiB chunks, so a changed block rewrites 32 KiB of index, not the whole
/// disk's, while a 2 TiB disk still needs only 2048 page references in its manifest.
pub const PAGE_ENTRIES: usize = 1024;

/// Files of at most this many chunks list their chunk ids in their manifest
/// entry instead of an index page object (tree points only). A PostgreSQL
/// data folder holds a thousand files of a few KiB: one page object each would
/// double the objects a backup writes and a reader fetches. Four ids are
/// 4 × 67 bytes of JSON, while a file that large already costs 4 chunk objects;
/// above that, a page (shared by every later point while the file is
/// unchanged) is cheaper than repeating the ids in every manifest.
pub const INLINE_CHUNKS: usize = 4;

/// Version of the repository layout written in `config.json`. Tree points
/// (manifest version 2) did not change it: they add no object kind, and an
/// older revive refuses to parse their manifests (no `files`), so it can
/// neither list them nor gc the chunks they use.
pub const REPO_FORMAT_VERSION: u32 = 1;

/// Smallest chunk size accepted at `init`.
pub const MIN_CHUNK_SIZE: u32 = 64 * 1024;
/// Largest chunk size accepted at `init`.
pub const MAX_CHUNK_SIZE: u32 = 4 * 1024 * 1024;
/// Default chunk size: large enough for fast sequential reads and small indexes,
/// small enough that a changed 4 KiB block costs at most 1 MiB of new data.
pub const DEFAULT_CHUNK_SIZE: u32 = 1024 * 1024;

/// How a chunk's payload is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Encoding {
    /// The plain bytes: used when compression would not make them smaller.
    Raw = 0,
    /// One zstd frame.
    Zstd = 1,
}

/// The fixed header of a chunk object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Payload encoding.
    pub encoding: Encoding,
    /// Length of the plain (decoded) data.
    pub plain_len: u32,
}

impl ChunkHeader {
    /// Serializes the header.
    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut out = [0u8; CHUNK_HEADER_LEN];
        out[..8].copy_from_slice(&CHUNK_MAGIC_V1);
        out[8] = self.encoding as u8;
        out[12..16].copy_from_slice(&self.plain_len.to_le_bytes());
        out
    }

    /// Parses and checks a header; `id` names the chunk in errors.
    pub fn decode(id: &ChunkId, bytes: &[u8]) -> Result<Self, RepoError> {
        let corrupt = |reason: &str| RepoError::CorruptChunk {
            id: *id,
            reason: reason.to_string(),
        };
        if bytes.len() < CHUNK_HEADER_LEN {
            return Err(corrupt("shorter than its header"));
        }
        if bytes[..8] != CHUNK_MAGIC_V1 {
            return Err(corrupt("bad magic"));
        }
        let encoding = match bytes[8] {
            0 => Encoding::Raw,
            1 => Encoding::Zstd,
            _ => return Err(corrupt("unknown encoding")),
        };
        let mut len = [0u8; 4];
        len.copy_from_slice(&bytes[12..16]);
        let plain_len = u32::from_le_bytes(len);
        if plain_len > MAX_CHUNK_SIZE {
            return Err(corrupt("plain length larger than any chunk size"));
        }
        Ok(ChunkHeader {
            encoding,
            plain_len,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn magic_of(name: &str) -> [u8; 8] {
        let mut out = [0u8; 8];
        out.copy_from_slice(&blake3::hash(name.as_bytes()).as_bytes()[..8]);
        out
    }

    #[test]
    fn magics_are_derived_from_their_versioned_names() {
        assert_eq!(CHUNK_MAGIC_V1, magic_of("revive:chunk:v1"));
        assert_eq!(PAGE_MAGIC_V1, magic_of("revive:index-page:v1"));
    }

    #[test]
    fn header_round_trips() {
        let h = ChunkHeader {
            encoding: Encoding::Zstd,
            plain_len: 1 << 20,
        };
        let id = ChunkId::of(b"x");
        assert_eq!(ChunkHeader::decode(&id, &h.encode()).unwrap(), h);
    }
}
