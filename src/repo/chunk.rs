//! Chunks: content addresses, encoding (zstd or raw) and verified decoding.
//!
//! A chunk's id is the BLAKE3 hash of its plain bytes, so decoding checks the
//! hash: a chunk that decodes is exactly the chunk that was backed up. All-zero
//! chunks are never stored; the index records them as holes.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::format::{ChunkHeader, Encoding, CHUNK_HEADER_LEN};
use super::RepoError;

/// zstd level for new chunks: level 1 keeps backup ingest CPU-cheap on two cores
/// while still halving typical OS and application data.
pub const ZSTD_LEVEL: i32 = 1;

/// The content address of a chunk: BLAKE3 of its plain bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    /// The reserved id recorded in indexes for an all-zero chunk.
    pub const HOLE: ChunkId = ChunkId([0u8; 32]);

    /// Hashes plain bytes.
    pub fn of(data: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(data).as_bytes())
    }

    /// True for the hole marker.
    pub fn is_hole(&self) -> bool {
        *self == ChunkId::HOLE
    }

    /// The store key of this chunk's object.
    pub fn key(&self) -> String {
        let hex = self.to_hex();
        format!("chunks/{}/{}", &hex[..2], hex)
    }

    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<ChunkId> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(ChunkId(out))
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

/// Chunk ids are 64 lower-case hex digits in JSON (tree manifests list the
/// chunks of small files inline).
impl Serialize for ChunkId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ChunkId::from_hex(&s)
            .ok_or_else(|| serde::de::Error::custom("chunk id is not 64 hex digits"))
    }
}

/// True when every byte is zero.
pub fn is_zero(data: &[u8]) -> bool {
    // Compare in 8-byte words: this runs over every byte a backup reads.
    // SAFETY: every bit pattern is a valid u64, and `align_to` puts in
    // `words` only the aligned middle of `data`, leaving the unaligned ends
    // in `head` and `tail`.
    let (head, words, tail) = unsafe { data.align_to::<u64>() };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Builds the stored object for plain chunk data: header plus zstd or raw payload.
pub fn encode(data: &[u8]) -> Result<Bytes, RepoError> {
    let compressed = zstd::bulk::compress(data, ZSTD_LEVEL).map_err(RepoError::Compress)?;
    let (encoding, payload): (Encoding, &[u8]) = if compressed.len() < data.len() {
        (Encoding::Zstd, &compressed)
    } else {
        (Encoding::Raw, data)
    };
    let header = ChunkHeader {
        encoding,
        plain_len: data.len() as u32,
    };
    let mut out = Vec::with_capacity(CHUNK_HEADER_LEN + payload.len());
    out.extend_from_slice(&header.encode());
    out.extend_from_slice(payload);
    Ok(Bytes::from(out))
}

/// Decodes a stored chunk object and checks that it hashes to `id`.
///
/// # Errors
/// [`RepoError::CorruptChunk`] naming the chunk when the header, the payload or
/// the hash is wrong: the caller never sees wrong bytes.
pub fn decode(id: &ChunkId, object: &[u8]) -> Result<Bytes, RepoError> {
    let header = ChunkHeader::decode(id, object)?;
    let payload = &object[CHUNK_HEADER_LEN..];
    let plain: Bytes = match header.encoding {
        Encoding::Raw => Bytes::copy_from_slice(payload),
        Encoding::Zstd => zstd::bulk::decompress(payload, header.plain_len as usize)
            .map_err(|e| RepoError::CorruptChunk {
                id: *id,
                reason: format!("zstd payload does not decode: {e}"),
            })?
            .into(),
    };
    if plain.len() != header.plain_len as usize {
        return Err(RepoError::CorruptChunk {
            id: *id,
            reason: format!(
                "{} bytes decoded, header says {}",
                plain.len(),
                header.plain_len
            ),
        });
    }
    if ChunkId::of(&plain) != *id {
        return Err(RepoError::CorruptChunk {
            id: *id,
            reason: "content does not match its BLAKE3 hash".to_string(),
        });
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_compressible_and_random() {
        let text = b"revive ".repeat(10_000);
        let random: Vec<u8> = (0..65536u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for data in [&text[..], &random[..]] {
            let id = ChunkId::of(data);
            let obj = encode(data).unwrap();
            assert_eq!(&decode(&id, &obj).unwrap()[..], data);
        }
        assert!(encode(&text).unwrap().len() < text.len() / 10);
    }

    #[test]
    fn flipped_bit_is_detected() {
        let data = b"revive ".repeat(1000);
        let id = ChunkId::of(&data);
        let mut obj = encode(&data).unwrap().to_vec();
        let last = obj.len() - 1;
        obj[last] ^= 1;
        let err = decode(&id, &obj).unwrap_err();
        assert!(matches!(err, RepoError::CorruptChunk { .. }), "{err}");
        assert!(err.to_string().contains(&id.to_hex()));
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4099]));
        let mut v = vec![0u8; 4099];
        v[4098] = 1;
        assert!(!is_zero(&v));
        v[4098] = 0;
        v[1] = 1;
        assert!(!is_zero(&v));
    }
}
