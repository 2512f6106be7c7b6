//! [`BlockExports`]: the block exports being served, by name, whatever the
//! protocol. A protocol server looks an export up when a client names it
//! (NBD option negotiation, iSCSI login), checks the allow-list there, and
//! serves its [`BlockDevice`]; whoever adds exports (the configuration, a
//! block recovery session) knows nothing of the protocol's wire.
//!
//! Removing an export closes every connection serving it and waits until
//! their requests in flight have finished, so a switchover copies the last
//! writes only once nobody can add more.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::config::BlockProtocolConfig;
use super::device::BlockDevice;

/// The block protocols revive serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BlockProtocol {
    /// Network Block Device (fixed newstyle, structured replies).
    Nbd,
    /// iSCSI (one target per export, the disk as LUN 0).
    Iscsi,
}

impl BlockProtocol {
    /// The name used in config, URLs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            BlockProtocol::Nbd => "nbd",
            BlockProtocol::Iscsi => "iscsi",
        }
    }
}

impl std::fmt::Display for BlockProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What adding an export can fail with.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Export names are unique across protocols.
    #[error("add block export '{0}' - the name is taken")]
    NameTaken(String),
}

/// Counters of one export, for `/metrics`; every protocol server counts
/// into them the same way.
#[derive(Debug, Default)]
pub struct BlockMetrics {
    /// Bytes returned to clients by reads.
    pub bytes_read: AtomicU64,
    /// Bytes clients wrote (write zeroes and trims not included).
    pub bytes_written: AtomicU64,
    /// Requests answered (any command).
    pub requests: AtomicU64,
    /// Requests answered with an error.
    pub errors: AtomicU64,
    /// Connections that entered transmission on this export.
    pub connections: AtomicU64,
    /// Connections serving it now.
    pub connections_open: AtomicU64,
    /// Clients refused by the allow-list.
    pub refused: AtomicU64,
}

impl BlockMetrics {
    /// Counts one answered request.
    pub fn request(&self, ok: bool) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One block export: a device, who may use it, and over which protocol.
pub struct BlockExport {
    /// Export name clients ask for (NBD export name, iSCSI target suffix).
    pub name: String,
    /// The protocol serving it.
    pub protocol: BlockProtocol,
    /// The protocol's settings for it (the iSCSI target name, initiators).
    pub settings: BlockProtocolConfig,
    /// The disk.
    pub device: Arc<dyn BlockDevice>,
    /// Client addresses allowed; an empty list allows nobody.
    pub allowed_clients: Vec<IpAddr>,
    /// Its counters.
    pub metrics: BlockMetrics,
    /// Set when the export is removed: connections serving it close.
    closed: watch::Sender<bool>,
    /// Cloned into every connection and request serving the export; all
    /// clones dropped means nothing touches the device any more.
    users: Mutex<Option<mpsc::Sender<()>>>,
    /// Receives nothing: closes once every user is gone.
    drained: tokio::sync::Mutex<mpsc::Receiver<()>>,
}

/// Held while a connection (and each of its requests) uses an export.
#[derive(Clone)]
pub struct ExportUse {
    _user: mpsc::Sender<()>,
    closed: watch::Receiver<bool>,
}

impl ExportUse {
    /// Completes when the export is removed.
    pub async fn closed(&mut self) {
        let _ = self.closed.wait_for(|c| *c).await;
    }

    /// Whether the export was removed.
    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }
}

impl BlockExport {
    /// An export of `device` named `name` for `allowed_clients`.
    pub fn new(
        name: &str,
        protocol: BlockProtocol,
        device: Arc<dyn BlockDevice>,
        allowed_clients: Vec<IpAddr>,
    ) -> BlockExport {
        let (users, drained) = mpsc::channel(1);
        BlockExport {
            name: name.to_string(),
            protocol,
            settings: BlockProtocolConfig::default_for(protocol),
            device,
            allowed_clients,
            metrics: BlockMetrics::default(),
            closed: watch::channel(false).0,
            users: Mutex::new(Some(users)),
            drained: tokio::sync::Mutex::new(drained),
        }
    }

    /// The export with `settings` for its protocol (which it takes).
    pub fn with_settings(mut self, settings: BlockProtocolConfig) -> BlockExport {
        self.protocol = settings.protocol();
        self.settings = settings;
        self
    }

    /// How a client at `host` reaches the export served on `port`:
    /// `nbd://HOST:PORT/NAME` or `iscsi://HOST:PORT/IQN/0` (QEMU's forms).
    pub fn url(&self, host: &str, port: u16) -> String {
        match &self.settings {
            BlockProtocolConfig::Nbd(_) => format!("nbd://{host}:{port}/{}", self.name),
            BlockProtocolConfig::Iscsi(c) => {
                format!("iscsi://{host}:{port}/{}/0", c.iqn(&self.name))
            }
        }
    }

    /// Whether `client` is on the allow-list. IPv4-mapped IPv6 addresses
    /// (from dual-stack sockets) compare equal to their IPv4 form.
    pub fn allows(&self, client: IpAddr) -> bool {
        let client = canonical(client);
        self.allowed_clients.iter().any(|a| canonical(*a) == client)
    }

    /// Starts using the export; `None` once it was removed.
    pub fn start_use(&self) -> Option<ExportUse> {
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        let user = users.as_ref()?.clone();
        Some(ExportUse {
            _user: user,
            closed: self.closed.subscribe(),
        })
    }

    /// Closes every connection and waits until every use has ended.
    async fn close(&self) {
        let users = self.users.lock().unwrap_or_else(|p| p.into_inner()).take();
        drop(users);
        self.closed.send_replace(true);
        let mut drained = self.drained.lock().await;
        while drained.recv().await.is_some() {}
    }
}

fn canonical(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr, IpAddr::V4),
        v4 => v4,
    }
}

/// Every block export being served, and where each protocol listens.
#[derive(Default)]
pub struct BlockExports {
    exports: RwLock<BTreeMap<String, Arc<BlockExport>>>,
    listening: Mutex<HashMap<BlockProtocol, SocketAddr>>,
}

impl BlockExports {
    /// An empty registry.
    pub fn new() -> Arc<BlockExports> {
        Arc::new(BlockExports::default())
    }

    /// Serves `export` from now on.
    ///
    /// # Errors
    /// `NameTaken` when an export of that name exists (any protocol).
    pub fn add(&self, export: BlockExport) -> Result<Arc<BlockExport>, RegistryError> {
        let mut map = self.exports.write().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(&export.name) {
            return Err(RegistryError::NameTaken(export.name));
        }
        let export = Arc::new(export);
        map.insert(export.name.clone(), export.clone());
        tracing::info!(export = %export.name, protocol = %export.protocol, size = export.device.size(), "block export added");
        Ok(export)
    }

    /// Stops serving `name`: closes its connections and returns once their
    /// requests in flight have finished. `false` when there was none.
    pub async fn remove(&self, name: &str) -> bool {
        let removed = self
            .exports
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        match removed {
            Some(export) => {
                export.close().await;
                tracing::info!(export = %name, "block export removed");
                true
            }
            None => false,
        }
    }

    /// The export `name` if `protocol` serves it.
    pub fn get(&self, name: &str, protocol: BlockProtocol) -> Option<Arc<BlockExport>> {
        self.exports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .filter(|e| e.protocol == protocol)
            .cloned()
    }

    /// Whether an export named `name` exists (any protocol).
    pub fn contains(&self, name: &str) -> bool {
        self.exports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(name)
    }

    /// Every export, by name.
    pub fn all(&self) -> Vec<Arc<BlockExport>> {
        self.exports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// The exports `protocol` serves, by name.
    pub fn of(&self, protocol: BlockProtocol) -> Vec<Arc<BlockExport>> {
        self.all()
            .into_iter()
            .filter(|e| e.protocol == protocol)
            .collect()
    }

    /// Records where `protocol`'s server listens (sessions build URLs from it).
    pub fn set_listening(&self, protocol: BlockProtocol, addr: SocketAddr) {
        self.listening
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(protocol, addr);
    }

    /// Where `protocol`'s server listens; `None` when it is not served.
    pub fn listening(&self, protocol: BlockProtocol) -> Option<SocketAddr> {
        self.listening
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&protocol)
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::MemDevice;

    fn export(name: &str) -> BlockExport {
        BlockExport::new(
            name,
            BlockProtocol::Nbd,
            Arc::new(MemDevice::new(name, vec![0; 4096])),
            vec![IpAddr::from([127, 0, 0, 1])],
        )
    }

    #[tokio::test]
    async fn names_are_unique_and_removal_waits_for_users() {
        let reg = BlockExports::new();
        let e = reg.add(export("a")).unwrap();
        assert!(matches!(
            reg.add(export("a")),
            Err(RegistryError::NameTaken(_))
        ));
        assert!(e.allows("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!e.allows("127.0.0.2".parse().unwrap()));
        let mut conn = e.start_use().unwrap();
        let request = conn.clone();
        let reg2 = reg.clone();
        let removal = tokio::spawn(async move { reg2.remove("a").await });
        conn.closed().await;
        assert!(reg.get("a", BlockProtocol::Nbd).is_none());
        assert!(e.start_use().is_none(), "no new use after removal");
        drop(conn);
        tokio::task::yield_now().await;
        assert!(
            !removal.is_finished(),
            "a request in flight holds the removal"
        );
        drop(request);
        assert!(removal.await.unwrap());
        assert!(!reg.remove("a").await);
    }
}
