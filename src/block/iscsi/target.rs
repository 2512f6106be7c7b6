//! [`IscsiTarget`]: the iSCSI view of one block export: its target name
//! (IQN), its disk as LUN 0, who may log in to it; [`TargetSet`]: how the
//! server finds targets when an initiator names one (login) or asks for the
//! list (SendTargets). [`ExportTargets`] is the set of `revive serve`: the
//! iSCSI exports of the block export registry, so exports come and go with
//! the configuration and block recovery sessions like NBD's.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use super::chap::ChapConfig;
use super::scsi::LogicalUnit;
use crate::block::config::IscsiExportConfig;
use crate::block::registry::{BlockExport, BlockExports, BlockMetrics, BlockProtocol};
use crate::block::{BlockDevice, BlockProtocolConfig};

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

/// One iSCSI target: an IQN, its export's disk as LUN 0, its access rules.
pub struct IscsiTarget {
    /// The target name initiators log in to (`iqn.2024-01.org.example:db01`).
    pub iqn: String,
    /// The disk and its SCSI state (reservations, mode pages).
    pub lu: LogicalUnit,
    /// Who may log in.
    pub access: Access,
    /// The block export served: its device, counters and removal.
    pub export: Arc<BlockExport>,
}

impl IscsiTarget {
    /// The target of `export` (an iSCSI export of the registry).
    pub fn of_export(export: Arc<BlockExport>) -> IscsiTarget {
        let settings = match &export.settings {
            BlockProtocolConfig::Iscsi(c) => c.clone(),
            _ => IscsiExportConfig::default(),
        };
        let iqn = settings.iqn(&export.name);
        IscsiTarget {
            lu: LogicalUnit::new(export.device.clone(), &iqn),
            access: Access {
                allowed_clients: export.allowed_clients.clone(),
                allowed_initiators: settings.allowed_initiators,
                chap: settings.chap,
            },
            iqn,
            export,
        }
    }

    /// A target named `iqn` serving `device` as LUN 0 with `access`, as an
    /// export of its own (outside any registry: protocol tests).
    pub fn new(iqn: &str, device: Arc<dyn BlockDevice>, access: Access) -> IscsiTarget {
        IscsiTarget::of_export(Arc::new(export_of(iqn, device, access)))
    }

    /// Whether the export was removed (no new session may start).
    pub fn is_closed(&self) -> bool {
        self.export.start_use().is_none_or(|u| u.is_closed())
    }

    /// Its counters (the export's).
    pub fn metrics(&self) -> &BlockMetrics {
        &self.export.metrics
    }
}

/// The block export that serves `device` as the target `iqn` with `access`
/// (named after the IQN).
pub fn export_of(iqn: &str, device: Arc<dyn BlockDevice>, access: Access) -> BlockExport {
    BlockExport::new(iqn, BlockProtocol::Iscsi, device, access.allowed_clients).with_settings(
        BlockProtocolConfig::Iscsi(IscsiExportConfig {
            target: Some(iqn.to_string()),
            allowed_initiators: access.allowed_initiators,
            chap: access.chap,
        }),
    )
}

impl std::fmt::Debug for IscsiTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IscsiTarget")
            .field("iqn", &self.iqn)
            .field("export", &self.export.name)
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

/// The iSCSI exports of a [`BlockExports`] registry as targets. A target
/// keeps its SCSI state (reservations, mode pages) as long as its export
/// is the same; a removed export's target disappears (its sessions were
/// closed by the removal).
pub struct ExportTargets {
    exports: Arc<BlockExports>,
    /// Targets by export name, with the export they were made for.
    made: Mutex<HashMap<String, Arc<IscsiTarget>>>,
}

impl ExportTargets {
    /// The targets of `exports`.
    pub fn new(exports: Arc<BlockExports>) -> Arc<ExportTargets> {
        Arc::new(ExportTargets {
            exports,
            made: Mutex::new(HashMap::new()),
        })
    }
}

impl TargetSet for ExportTargets {
    fn targets(&self) -> Vec<Arc<IscsiTarget>> {
        let exports = self.exports.of(BlockProtocol::Iscsi);
        let mut made = self.made.lock().unwrap_or_else(|p| p.into_inner());
        made.retain(|name, t| {
            exports
                .iter()
                .any(|e| e.name == *name && Arc::ptr_eq(e, &t.export))
        });
        exports
            .into_iter()
            .map(|e| {
                made.entry(e.name.clone())
                    .or_insert_with(|| Arc::new(IscsiTarget::of_export(e)))
                    .clone()
            })
            .collect()
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
    }

    #[tokio::test]
    async fn targets_follow_the_registry() {
        let reg = BlockExports::new();
        let set = ExportTargets::new(reg.clone());
        let dev = Arc::new(MemDevice::new("d", vec![0; 4096]));
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        reg.add(BlockExport::new(
            "DB 01",
            BlockProtocol::Iscsi,
            dev.clone(),
            vec![lo],
        ))
        .unwrap();
        reg.add(BlockExport::new(
            "n",
            BlockProtocol::Nbd,
            dev.clone(),
            vec![lo],
        ))
        .unwrap();
        let access = Access {
            allowed_clients: vec![lo],
            ..Access::default()
        };
        reg.add(export_of("iqn.a:1", dev, access)).unwrap();
        let names: Vec<String> = set.targets().iter().map(|t| t.iqn.clone()).collect();
        assert_eq!(names, ["iqn.2024-01.dev.revive:db-01", "iqn.a:1"]);
        let t = set.find("IQN.A:1").unwrap();
        assert!(Arc::ptr_eq(&t, &set.find("iqn.a:1").unwrap()), "kept");
        assert!(t.access.allows("iqn.x", lo));
        assert!(reg.remove("iqn.a:1").await);
        assert!(set.find("iqn.a:1").is_none());
        assert!(t.export.start_use().is_none(), "removed: no new session");
    }
}
