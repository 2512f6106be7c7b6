//! What a connection may cost: who may connect at all, how many
//! connections an address and everyone together may hold, and how long a
//! connection may sit idle or in the middle of a record.
//!
//! # Rules
//!
//! - An address on no export's allow-list is refused at accept, before a
//!   byte is read, except on the portmapper's port: clients find the server
//!   through it. There it is answered for the portmapper program only, with
//!   small records and the short idle timeout.
//! - Connections per address and in total are capped; addresses on no
//!   allow-list hold at most [`OTHER_MAX_PER_CLIENT`] each and a quarter of
//!   the total together, so they can never crowd out the hosts that mount,
//!   and one of them cannot keep the portmapper from the others.
//! - A connection with nothing in flight closes after `idle_timeout`; a
//!   record must arrive whole within `record_timeout` of its first byte.
//!   NFS clients reconnect on their own (knfsd also closes idle
//!   connections, after 6 minutes).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// Limits on connections (from `[nfs]` in the configuration).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnLimits {
    /// TCP connections open at once, all addresses together.
    pub max_connections: usize,
    /// TCP connections open at once from one address.
    pub max_per_client: usize,
    /// Close a connection with no call in flight after this long silent.
    pub idle_timeout: Duration,
    /// Close a connection whose record does not arrive whole within this
    /// long of its first byte.
    pub record_timeout: Duration,
}

/// Default `max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default `max_connections_per_client`: ESXi opens one to a few
/// connections per NFS datastore (up to 16 with nConnect); a QEMU host one
/// or two per disk of every VM it runs from the export.
pub const DEFAULT_MAX_PER_CLIENT: usize = 128;
/// Default `idle_timeout_secs`: knfsd's 6 minutes.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(360);
/// Default `record_timeout_secs`: ample for a 1 MiB WRITE on a slow link.
pub const DEFAULT_RECORD_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest record accepted from an address on no allow-list: portmapper
/// calls are a few dozen bytes.
pub const OTHER_MAX_RECORD: usize = 4096;

/// Connections one address on no allow-list may hold: a portmapper client
/// asks and leaves.
pub const OTHER_MAX_PER_CLIENT: usize = 4;

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_per_client: DEFAULT_MAX_PER_CLIENT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            record_timeout: DEFAULT_RECORD_TIMEOUT,
        }
    }
}

impl ConnLimits {
    /// Connections all addresses on no allow-list may hold together.
    pub fn max_others(&self) -> usize {
        (self.max_connections / 4).max(1)
    }

    /// Idle timeout of a connection (short for addresses on no allow-list:
    /// a portmapper client asks and leaves).
    pub fn idle_timeout_for(&self, allowed: bool) -> Duration {
        if allowed {
            self.idle_timeout
        } else {
            self.idle_timeout.min(self.record_timeout)
        }
    }
}

/// An IPv4-mapped IPv6 address as IPv4, so one host counts once.
pub(crate) fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    others: usize,
    per_address: HashMap<IpAddr, usize>,
}

/// The open connections, counted per address.
#[derive(Debug, Default)]
pub(crate) struct ConnTable {
    counts: Mutex<Counts>,
}

/// One admitted connection; gives its place back when dropped.
#[derive(Debug)]
pub(crate) struct ConnSlot {
    table: Arc<ConnTable>,
    addr: IpAddr,
    allowed: bool,
}

impl ConnTable {
    /// Admits a connection from `addr` if the caps allow it.
    pub fn admit(
        self: &Arc<Self>,
        addr: IpAddr,
        allowed: bool,
        limits: &ConnLimits,
    ) -> Option<ConnSlot> {
        let addr = canonical(addr);
        let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let mine = c.per_address.get(&addr).copied().unwrap_or(0);
        let per_address = if allowed {
            limits.max_per_client
        } else {
            limits.max_per_client.min(OTHER_MAX_PER_CLIENT)
        };
        if c.total >= limits.max_connections
            || mine >= per_address
            || (!allowed && c.others >= limits.max_others())
        {
            return None;
        }
        c.total += 1;
        if !allowed {
            c.others += 1;
        }
        *c.per_address.entry(addr).or_default() += 1;
        Some(ConnSlot {
            table: Arc::clone(self),
            addr,
            allowed,
        })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut c = self
            .table
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        c.total -= 1;
        if !self.allowed {
            c.others -= 1;
        }
        if let Some(n) = c.per_address.get_mut(&self.addr) {
            *n -= 1;
            if *n == 0 {
                c.per_address.remove(&self.addr);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_per_address_in_total_and_for_others() {
        let limits = ConnLimits {
            max_connections: 8,
            max_per_client: 3,
            ..ConnLimits::default()
        };
        let table = Arc::new(ConnTable::default());
        let a = IpAddr::from([10, 0, 0, 1]);
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| table.admit(a, true, &limits)).collect();
        assert!(held.iter().all(Option::is_some));
        assert!(table.admit(mapped, true, &limits).is_none(), "one host");
        // Others: a quarter of the total, a few each.
        let other = IpAddr::from([10, 0, 0, 9]);
        let o1 = table.admit(other, false, &limits);
        let o2 = table.admit(other, false, &limits);
        let o3 = table.admit(IpAddr::from([10, 0, 0, 7]), false, &limits);
        assert!(o1.is_some() && o2.is_some() && o3.is_none());
        let fresh = Arc::new(ConnTable::default());
        let many: Vec<_> = (0..10)
            .map(|_| fresh.admit(other, false, &ConnLimits::default()))
            .collect();
        let admitted = many.iter().filter(|s| s.is_some()).count();
        assert_eq!(admitted, OTHER_MAX_PER_CLIENT, "a few per address");
        let more: Vec<_> = (2..6)
            .map(|i| table.admit(IpAddr::from([10, 0, 1, i]), true, &limits))
            .collect();
        assert_eq!(more.iter().filter(|s| s.is_some()).count(), 3, "total of 8");
        drop(held);
        assert!(table.admit(a, true, &limits).is_some(), "places come back");
    }
}
