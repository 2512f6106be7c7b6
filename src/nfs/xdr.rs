//! XDR decoding of call arguments, and packing of replies.
//!
//! Replies are built from `nfs3_types` structures and packed with its `Pack`
//! trait. Arguments are decoded here by hand instead of with `nfs3_types`'
//! `Unpack`, for two reasons: its opaque and array decoders allocate the
//! length read from the wire before checking it against the input (a
//! garbage length would ask for gigabytes), and they copy WRITE payloads,
//! where a slice of the received record (`Bytes`) costs nothing.

use bytes::{Buf, Bytes, BytesMut};
use nfs3_types::xdr_codec::Pack;

/// The arguments ran short or held an impossible value; answered with
/// `GARBAGE_ARGS`.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("malformed XDR arguments")]
pub struct Garbage;

/// Reads XDR items from a received record without copying.
#[derive(Debug, Clone)]
pub struct XdrReader {
    buf: Bytes,
}

impl XdrReader {
    /// Read from `buf`.
    pub fn new(buf: Bytes) -> Self {
        Self { buf }
    }

    /// The bytes not yet consumed.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Bytes not yet consumed.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Unsigned 32-bit integer.
    pub fn u32(&mut self) -> Result<u32, Garbage> {
        if self.buf.len() < 4 {
            return Err(Garbage);
        }
        Ok(self.buf.get_u32())
    }

    /// Unsigned 64-bit integer.
    pub fn u64(&mut self) -> Result<u64, Garbage> {
        if self.buf.len() < 8 {
            return Err(Garbage);
        }
        Ok(self.buf.get_u64())
    }

    /// Boolean: only 0 and 1 are valid.
    pub fn bool(&mut self) -> Result<bool, Garbage> {
        match self.u32()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(Garbage),
        }
    }

    /// Fixed-size opaque of `N` bytes (N a multiple of 4 here).
    pub fn fixed<const N: usize>(&mut self) -> Result<[u8; N], Garbage> {
        let padded = pad4(N);
        if self.buf.len() < padded {
            return Err(Garbage);
        }
        let mut out = [0u8; N];
        self.buf.copy_to_slice(&mut out);
        self.buf.advance(padded - N);
        Ok(out)
    }

    /// Variable-length opaque of at most `max` bytes, as a slice of the
    /// record. The length is checked before anything is taken.
    pub fn opaque(&mut self, max: usize) -> Result<Bytes, Garbage> {
        let len = self.u32()? as usize;
        if len > max {
            return Err(Garbage);
        }
        let padded = pad4(len);
        if self.buf.len() < padded {
            return Err(Garbage);
        }
        let data = self.buf.split_to(len);
        self.buf.advance(padded - len);
        Ok(data)
    }

    /// Skip a variable-length opaque of at most `max` bytes.
    pub fn skip_opaque(&mut self, max: usize) -> Result<(), Garbage> {
        self.opaque(max).map(drop)
    }
}

/// Length rounded up to the XDR 4-byte unit.
pub fn pad4(len: usize) -> usize {
    (len + 3) & !3
}

/// Pack an `nfs3_types` value at the end of `out`.
///
/// Packing into memory cannot fail for the sizes we build (the only error
/// the codec has is an item longer than 4 GiB); should it ever, the reply is
/// still well-formed up to that point and the error is logged.
pub fn pack<T: Pack>(out: &mut BytesMut, value: &T) {
    out.reserve(value.packed_size());
    let mut w = bytes::BufMut::writer(out);
    if let Err(e) = value.pack(&mut w) {
        tracing::error!(cause = %e, "packing reply failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nfs3_types::nfs3::{fattr3, ftype3, nfstime3, specdata3};
    use nfs3_types::xdr_codec::{Opaque, Unpack};

    #[test]
    fn reads_integers_and_opaque() {
        let mut raw = BytesMut::new();
        pack(&mut raw, &7u32);
        pack(&mut raw, &0x0102_0304_0506_0708u64);
        pack(&mut raw, &true);
        pack(&mut raw, &Opaque::borrowed(b"hello"));
        pack(&mut raw, &9u32);
        let mut r = XdrReader::new(raw.freeze());
        assert_eq!(r.u32(), Ok(7));
        assert_eq!(r.u64(), Ok(0x0102_0304_0506_0708));
        assert_eq!(r.bool(), Ok(true));
        assert_eq!(r.opaque(16).as_deref(), Ok(&b"hello"[..]));
        assert_eq!(r.u32(), Ok(9));
        assert_eq!(r.remaining(), 0);
        assert_eq!(r.u32(), Err(Garbage));
    }

    #[test]
    fn opaque_length_is_checked_before_taking() {
        // A length of 4 GiB - 1 with nothing behind it must not allocate.
        let mut r = XdrReader::new(Bytes::from_static(&[0xff, 0xff, 0xff, 0xff]));
        assert_eq!(r.opaque(usize::MAX), Err(Garbage));
        let mut r = XdrReader::new(Bytes::from_static(&[0, 0, 0, 8, 1, 2, 3, 4]));
        assert_eq!(r.opaque(64), Err(Garbage));
        let mut r = XdrReader::new(Bytes::from_static(&[0, 0, 0, 8, 1, 2, 3, 4, 5, 6, 7, 8]));
        assert_eq!(r.opaque(4), Err(Garbage));
    }

    #[test]
    fn bool_rejects_other_values() {
        let mut r = XdrReader::new(Bytes::from_static(&[0, 0, 0, 2]));
        assert_eq!(r.bool(), Err(Garbage));
    }

    #[test]
    fn fattr3_round_trips_through_nfs3_types() {
        let attr = fattr3 {
            type_: ftype3::NF3REG,
            mode: 0o644,
            nlink: 1,
            uid: 0,
            gid: 0,
            size: 1 << 40,
            used: 4096,
            rdev: specdata3::default(),
            fsid: 3,
            fileid: 42,
            atime: nfstime3 {
                seconds: 1,
                nseconds: 2,
            },
            mtime: nfstime3::default(),
            ctime: nfstime3::default(),
        };
        let mut out = BytesMut::new();
        pack(&mut out, &attr);
        assert_eq!(out.len(), 84);
        let (back, n) = fattr3::unpack(&mut std::io::Cursor::new(&out[..])).expect("unpack");
        assert_eq!(n, 84);
        assert_eq!(back.size, 1 << 40);
        assert_eq!(back.fileid, 42);
    }
}
