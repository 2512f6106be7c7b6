//! Duplicate request cache for non-idempotent NFS procedures.
//!
//! A client that loses a reply (connection reset, timeout) retransmits the
//! call with the same xid. For CREATE, REMOVE, RENAME and the like, running
//! it again gives a wrong answer (`EXIST`, `NOENT`) for an operation that
//! succeeded, and ESXi reconnects and retransmits as a matter of course. So
//! the reply to each such call is kept, keyed by client address, xid,
//! procedure and a hash of the arguments (xids are reused eventually), and a
//! retransmission gets the same reply. Only these procedures pay for a
//! lookup; READ, WRITE, GETATTR and the rest skip the cache entirely.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::Mutex;

use bytes::Bytes;
use lru::LruCache;

/// Replies remembered. A few thousand covers every call a client can have
/// outstanding plus its retransmission window.
const CAPACITY: usize = 4096;

/// Procedures whose repetition is not harmless: SETATTR (guarded), CREATE,
/// MKDIR, SYMLINK, MKNOD, REMOVE, RMDIR, RENAME, LINK.
fn non_idempotent(proc_num: u32) -> bool {
    matches!(proc_num, 2 | 8 | 9 | 10 | 11 | 12 | 13 | 14 | 15)
}

/// Identity of one call.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DrcKey {
    peer: IpAddr,
    xid: u32,
    proc_num: u32,
    args_hash: u64,
}

impl DrcKey {
    /// Key of a call, or `None` when the procedure needs no cache.
    pub fn for_call(peer: IpAddr, xid: u32, proc_num: u32, args: &[u8]) -> Option<Self> {
        if !non_idempotent(proc_num) {
            return None;
        }
        let mut h = DefaultHasher::new();
        args.hash(&mut h);
        Some(Self {
            peer,
            xid,
            proc_num,
            args_hash: h.finish(),
        })
    }
}

/// What the cache knows of a call.
#[derive(Debug, PartialEq, Eq)]
pub enum Seen {
    /// First time: run it, then [`Drc::finish`].
    New,
    /// The original is still running: drop the retransmission, the
    /// original's reply answers both.
    InProgress,
    /// Done before: send this record (the reply as first sent).
    Done(Bytes),
}

/// The cache; one per server.
pub struct Drc {
    entries: Mutex<LruCache<DrcKey, Option<Bytes>>>,
}

impl Default for Drc {
    fn default() -> Self {
        Self {
            entries: Mutex::new(LruCache::new(
                NonZeroUsize::new(CAPACITY).unwrap_or(NonZeroUsize::MIN),
            )),
        }
    }
}

impl Drc {
    /// Look a call up, marking it in progress when new.
    pub fn start(&self, key: &DrcKey) -> Seen {
        let Ok(mut entries) = self.entries.lock() else {
            return Seen::New;
        };
        match entries.get(key) {
            Some(Some(reply)) => Seen::Done(reply.clone()),
            Some(None) => Seen::InProgress,
            None => {
                entries.put(key.clone(), None);
                Seen::New
            }
        }
    }

    /// Remember the reply record of a finished call.
    pub fn finish(&self, key: DrcKey, reply: Bytes) {
        if let Ok(mut entries) = self.entries.lock() {
            entries.put(key, Some(reply));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_non_idempotent_calls_only() {
        let peer = IpAddr::from([127, 0, 0, 1]);
        assert!(DrcKey::for_call(peer, 1, 6, b"read").is_none());
        let key = DrcKey::for_call(peer, 1, 12, b"remove").expect("remove is cached");
        let drc = Drc::default();
        assert_eq!(drc.start(&key), Seen::New);
        assert_eq!(drc.start(&key), Seen::InProgress);
        drc.finish(key.clone(), Bytes::from_static(b"reply"));
        assert_eq!(drc.start(&key), Seen::Done(Bytes::from_static(b"reply")));
        // Same xid, other arguments: another call.
        let other = DrcKey::for_call(peer, 1, 12, b"remove other").expect("key");
        assert_eq!(drc.start(&other), Seen::New);
    }
}
