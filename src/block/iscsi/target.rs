//! [`IscsiTarget`]: one target (IQN) serving one disk as LUN 0, with who may
//! log in to it; [`TargetSet`]: how the server finds targets when an
//! initiator names one (login) or asks for the list (SendTargets).

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;

use super::chap::ChapConfig;
use super::scsi::LogicalUnit;
use crate::block::BlockDevice;

/// Counters of one target, for `/metrics` and tests.
#[derive(Debug, Default)]
pub struct TargetMetrics {
    /// Bytes returned to initiators by reads.
    pub bytes_read: AtomicU64,
    /// Bytes initiators wrote (write same and unmap not included).
    pub bytes_written: AtomicU64,
    /// SCSI commands answered.
    pub requests: AtomicU64,
    /// SCSI commands answered with CHECK CONDITION or another error status.
    pub errors: AtomicU64,
    /// Sessions that logged in (normal sessions).
    pub connections: AtomicU64,
    /// Sessions logged in now.
    pub connections_open: AtomicU64,
    /// Logins refused by the allow-list or CHAP.
    pub refused: AtomicU64,
}

impl TargetMetrics {
    /// Counts one answered command.
    pub fn request(&self, ok: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Who may log in to a target.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// Initiator addresses allowed; an empty list allows nobody.
    pub allowed_clients: Vec<IpAddr>,
    /// Initiator names (IQNs) allowed; an empty list allows any name from
    /// an allowed address.
    pub allowed_initiators: Vec<String>,
    /// CHAP credentials the initiator must prove; `None`: no CHAP.
    pub chap: Option<ChapConfig>,
}

impl Access {
    /// Whether `initiator` from `addr` is on the allow-lists. IQNs compare
    /// case-insensitively (RFC 3722 names are normalized to lower case);
    /// IPv4-mapped IPv6 addresses compare equal to their IPv4 form.
    pub fn allows(&self, initiator: &str, addr: IpAddr) -> bool {
        let addr = canonical(addr);
        self.allowed_clients.iter().any(|a| canonical(*a) == addr)
            && (self.allowed_initiators.is_empty()
                || self
                    .allowed_initiators
                    .iter()
                    .any(|i| i.eq_ignore_ascii_case(initiator)))
    }
}

fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// One iSCSI target: an IQN, its disk as LUN 0, its access rules.
pub struct IscsiTarget {
    /// The target name initiators log in to (`iqn.2024-01.org.example:db01`).
    pub iqn: String,
    /// The disk and its SCSI state (reservations, mode pages).
    pub lu: LogicalUnit,
    /// Who may log in.
    pub access: Access,
    /// Counters.
    pub metrics: TargetMetrics,
    /// Set when the target is removed: its sessions close.
    closed: watch::Sender<bool>,
}

impl IscsiTarget {
    /// A target named `iqn` serving `device` as LUN 0.
    pub fn new(iqn: &str, device: Arc<dyn BlockDevice>, access: Access) -> IscsiTarget {
        IscsiTarget {
            iqn: iqn.to_string(),
            lu: LogicalUnit::new(device, iqn),
            access,
            metrics: TargetMetrics::default(),
            closed: watch::channel(false).0,
        }
    }

    /// Closes every session of the target (it is being removed).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Completes when the target is closed.
    pub fn closed(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }

    /// Whether the target was closed.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }
}

impl std::fmt::Debug for IscsiTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IscsiTarget")
            .field("iqn", &self.iqn)
            .field("device", &self.lu.device().name())
            .finish()
    }
}

/// The targets a server offers; looked up on every login and SendTargets.
pub trait TargetSet: Send + Sync + 'static {
    /// Every target, in a stable order.
    fn targets(&self) -> Vec<Arc<IscsiTarget>>;

    /// The target named `iqn` (case-insensitive).
    fn find(&self, iqn: &str) -> Option<Arc<IscsiTarget>> {
        self.targets()
            .into_iter()
            .find(|t| t.iqn.eq_ignore_ascii_case(iqn))
    }
}

/// A [`TargetSet`] held in memory: add and remove targets at any time.
#[derive(Default)]
pub struct Targets {
    list: RwLock<Vec<Arc<IscsiTarget>>>,
}

/// Adding a target whose name is taken.
#[derive(Debug, thiserror::Error)]
#[error("add iscsi target '{0}' - the name is taken")]
pub struct NameTaken(pub String);

impl Targets {
    /// An empty set.
    pub fn new() -> Arc<Targets> {
        Arc::new(Targets::default())
    }

    /// Adds `target`.
    ///
    /// # Errors
    /// [`NameTaken`] when a target of that IQN exists.
    pub fn add(&self, target: IscsiTarget) -> Result<Arc<IscsiTarget>, NameTaken> {
        let mut list = self.list.write().unwrap_or_else(|p| p.into_inner());
        if list.iter().any(|t| t.iqn.eq_ignore_ascii_case(&target.iqn)) {
            return Err(NameTaken(target.iqn));
        }
        let t = Arc::new(target);
        list.push(t.clone());
        Ok(t)
    }

    /// Removes the target named `iqn` and closes its sessions.
    pub fn remove(&self, iqn: &str) -> Option<Arc<IscsiTarget>> {
        let mut list = self.list.write().unwrap_or_else(|p| p.into_inner());
        let pos = list.iter().position(|t| t.iqn.eq_ignore_ascii_case(iqn))?;
        let t = list.remove(pos);
        t.close();
        Some(t)
    }
}

impl TargetSet for Targets {
    fn targets(&self) -> Vec<Arc<IscsiTarget>> {
        self.list.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemDevice;

    #[test]
    fn allow_lists_need_address_and_name() {
        let access = Access {
            allowed_clients: vec!["127.0.0.1".parse().unwrap()],
            allowed_initiators: vec!["iqn.2024-01.org.example:host1".into()],
            chap: None,
        };
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        assert!(access.allows("IQN.2024-01.org.example:HOST1", lo));
        assert!(access.allows(
            "iqn.2024-01.org.example:host1",
            "::ffff:127.0.0.1".parse().unwrap()
        ));
        assert!(!access.allows("iqn.2024-01.org.example:host2", lo));
        assert!(!access.allows(
            "iqn.2024-01.org.example:host1",
            "127.0.0.2".parse().unwrap()
        ));
        let any_name = Access {
            allowed_initiators: vec![],
            ..access.clone()
        };
        assert!(any_name.allows("iqn.x", lo));
        assert!(
            !Access::default().allows("iqn.x", lo),
            "empty allows nobody"
        );

        let set = Targets::new();
        let dev = Arc::new(MemDevice::new("d", vec![0; 4096]));
        set.add(IscsiTarget::new("iqn.a:1", dev.clone(), access.clone()))
            .unwrap();
        assert!(set.add(IscsiTarget::new("IQN.A:1", dev, access)).is_err());
        let t = set.find("iqn.A:1").unwrap();
        assert!(set.remove("iqn.a:1").is_some());
        assert!(t.is_closed() && set.find("iqn.a:1").is_none());
    }
}
