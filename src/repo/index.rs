//! Chunk indexes: each large file of a restore point has a complete, paged list
//! of chunk ids, so any offset of any restore point maps to its chunk in O(1),
//! whatever the depth of the chain.
//!
//! Pages are content-addressed objects: an incremental whose changes touch one
//! page writes that page alone; unchanged pages hash to the same id as the
//! parent's and are not written again.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::chunk::ChunkId;
use super::format::{PAGE_ENTRIES, PAGE_HEADER_LEN, PAGE_MAGIC_V1};
use super::RepoError;

/// Content address of an index page: BLAKE3 of the whole page object.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PageId(pub [u8; 32]);

impl PageId {
    /// The store key of this page.
    pub fn key(&self) -> String {
        let hex = hex::encode(self.0);
        format!("pages/{}/{}", &hex[..2], hex)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<PageId> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(PageId(out))
    }
}

impl fmt::Display for PageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PageId({})", &hex::encode(self.0)[..16])
    }
}

impl Serialize for PageId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0))
    }
}

impl<'de> Deserialize<'de> for PageId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        PageId::from_hex(&s).ok_or_else(|| serde::de::Error::custom("page id is not 64 hex digits"))
    }
}

/// One page of a file's chunk index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexPage {
    /// Chunk ids in file order; [`ChunkId::HOLE`] for all-zero chunks.
    pub entries: Vec<ChunkId>,
}

impl IndexPage {
    /// Serializes the page and returns its id with its bytes.
    pub fn encode(&self) -> (PageId, Bytes) {
        let mut out = Vec::with_capacity(PAGE_HEADER_LEN + 32 * self.entries.len());
        out.extend_from_slice(&PAGE_MAGIC_V1);
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        out.extend_from_slice(&[0u8; 4]);
        for e in &self.entries {
            out.extend_from_slice(&e.0);
        }
        let id = PageId(*blake3::hash(&out).as_bytes());
        (id, Bytes::from(out))
    }

    /// Parses a page object and checks it against its id.
    pub fn decode(id: &PageId, bytes: &[u8]) -> Result<Self, RepoError> {
        let corrupt = |reason: &str| RepoError::CorruptObject {
            key: id.key(),
            reason: reason.to_string(),
        };
        if PageId(*blake3::hash(bytes).as_bytes()) != *id {
            return Err(corrupt("content does not match its BLAKE3 hash"));
        }
        if bytes.len() < PAGE_HEADER_LEN || bytes[..8] != PAGE_MAGIC_V1 {
            return Err(corrupt("bad page header"));
        }
        let mut n = [0u8; 4];
        n.copy_from_slice(&bytes[8..12]);
        let n = u32::from_le_bytes(n) as usize;
        if n > PAGE_ENTRIES || bytes.len() != PAGE_HEADER_LEN + 32 * n {
            return Err(corrupt("entry count does not match page length"));
        }
        let entries = bytes[PAGE_HEADER_LEN..]
            .chunks_exact(32)
            .map(|c| {
                let mut id = [0u8; 32];
                id.copy_from_slice(c);
                ChunkId(id)
            })
            .collect();
        Ok(IndexPage { entries })
    }
}

/// Where chunk number `chunk` of a file sits: which page, which entry.
pub fn locate(chunk: u64) -> (usize, usize) {
    (
        (chunk / PAGE_ENTRIES as u64) as usize,
        (chunk % PAGE_ENTRIES as u64) as usize,
    )
}

/// Number of chunks of a file of `size` bytes.
pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    size.div_ceil(chunk_size as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_round_trip_and_tamper() {
        let page = IndexPage {
            entries: vec![ChunkId::of(b"a"), ChunkId::HOLE, ChunkId::of(b"b")],
        };
        let (id, bytes) = page.encode();
        assert_eq!(IndexPage::decode(&id, &bytes).unwrap(), page);
        let mut bad = bytes.to_vec();
        bad[20] ^= 0xff;
        assert!(IndexPage::decode(&id, &bad).is_err());
    }

    #[test]
    fn locate_is_constant_time_arithmetic() {
        assert_eq!(locate(0), (0, 0));
        assert_eq!(locate(PAGE_ENTRIES as u64 + 3), (1, 3));
        assert_eq!(chunk_count(0, 1024), 0);
        assert_eq!(chunk_count(1025, 1024), 2);
    }
}
