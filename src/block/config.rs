//! The configuration of block exports: `[[block_export]]` entries (which
//! file of which restore point or publication, for whom, over which
//! protocol) and the `[nbd]` and `[iscsi]` server sections. Each protocol adds a variant to
//! [`BlockProtocolConfig`] with its own per-export keys and its own server
//! section.

use std::net::IpAddr;

use serde::Deserialize;

use super::registry::BlockProtocol;

/// The NBD port IANA assigned.
pub const DEFAULT_NBD_PORT: u16 = 10809;

/// The iSCSI port IANA assigned.
pub const DEFAULT_ISCSI_PORT: u16 = 3260;

/// Target names of iSCSI exports without `target` are this, `:`, the export
/// name (lower case; characters an IQN cannot hold become `-`).
pub const DEFAULT_IQN_PREFIX: &str = "iqn.2024-01.dev.revive";

/// `[[block_export]]`: one presented file served as a disk.
// No `deny_unknown_fields` here: serde does not support it with `flatten`;
// the protocol's own settings struct refuses unknown keys instead.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockExportConfig {
    /// Export name clients ask for (NBD: the export name).
    pub name: String,
    /// Restore point to publish for it (id, prefix or VM@latest); it is
    /// published as folder `name` of the NFS export. Exactly one of `point`
    /// and `publication`.
    #[serde(default)]
    pub point: Option<String>,
    /// A `[[publication]]` (or session folder) already published.
    #[serde(default)]
    pub publication: Option<String>,
    /// NFS export the publication lives in (default: the first `[[export]]`).
    #[serde(default)]
    pub export: Option<String>,
    /// File of the publication to serve (default: its only disk).
    #[serde(default)]
    pub file: Option<String>,
    /// Client addresses allowed; everyone else is refused at option
    /// negotiation (or login). An empty list allows nobody.
    pub allowed_clients: Vec<IpAddr>,
    /// Refuse writes.
    #[serde(default)]
    pub read_only: bool,
    /// The protocol and its settings (`protocol = "nbd"` or `"iscsi"`).
    #[serde(flatten)]
    pub protocol: BlockProtocolConfig,
}

/// Which protocol serves a block export, with its per-export settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "protocol", rename_all = "lowercase")]
pub enum BlockProtocolConfig {
    /// NBD (`[nbd]` sets the server).
    Nbd(NbdExportConfig),
    /// iSCSI (`[iscsi]` sets the server).
    Iscsi(IscsiExportConfig),
}

impl BlockProtocolConfig {
    /// The protocol.
    pub fn protocol(&self) -> BlockProtocol {
        match self {
            BlockProtocolConfig::Nbd(_) => BlockProtocol::Nbd,
            BlockProtocolConfig::Iscsi(_) => BlockProtocol::Iscsi,
        }
    }

    /// `protocol`'s default settings (what block recovery sessions use).
    pub fn default_for(protocol: BlockProtocol) -> BlockProtocolConfig {
        match protocol {
            BlockProtocol::Nbd => BlockProtocolConfig::Nbd(NbdExportConfig::default()),
            BlockProtocol::Iscsi => BlockProtocolConfig::Iscsi(IscsiExportConfig::default()),
        }
    }
}

/// `protocol = "iscsi"`: the target and who may log in to it (on top of
/// `allowed_clients`, the initiators' addresses).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IscsiExportConfig {
    /// The target name (IQN); default `iqn.2024-01.dev.revive:<name>`.
    #[serde(default)]
    pub target: Option<String>,
    /// Initiator names (IQNs) allowed to log in; empty: any name from an
    /// allowed address.
    #[serde(default)]
    pub allowed_initiators: Vec<String>,
    /// CHAP the initiator must pass: `{ user, secret }`, with
    /// `mutual = [user, secret]` for the target's side.
    #[serde(default)]
    pub chap: Option<crate::block::iscsi::ChapConfig>,
}

impl IscsiExportConfig {
    /// The target name of the export `name`.
    pub fn iqn(&self, name: &str) -> String {
        match &self.target {
            Some(t) => t.clone(),
            None => {
                let name: String = name
                    .chars()
                    .map(|c| match c.to_ascii_lowercase() {
                        c @ ('a'..='z' | '0'..='9' | '-' | '.') => c,
                        _ => '-',
                    })
                    .collect();
                format!("{DEFAULT_IQN_PREFIX}:{name}")
            }
        }
    }
}

/// `protocol = "nbd"` takes no per-export settings yet.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdExportConfig {}

/// `[nbd]`: the NBD server of `revive serve`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NbdSection {
    /// Serve NBD even without a `[[block_export]]` using it (for block
    /// recovery sessions). It is served anyway when one does.
    pub enabled: bool,
    /// Address to listen on.
    pub bind: IpAddr,
    /// Port (10809, IANA's; 0 picks a free one).
    pub port: u16,
    /// Microseconds a connection polls for the next request of a client
    /// that answers each reply quickly (queue depth 1), instead of
    /// sleeping; it costs a CPU while such a client is busy and saves it
    /// two wake-ups per request. 0 turns polling off.
    pub poll_us: u64,
}

impl Default for NbdSection {
    fn default() -> Self {
        NbdSection {
            enabled: false,
            bind: IpAddr::from([0, 0, 0, 0]),
            port: DEFAULT_NBD_PORT,
            poll_us: super::nbd::DEFAULT_POLL.as_micros() as u64,
        }
    }
}

/// `[iscsi]`: the iSCSI target of `revive serve`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IscsiSection {
    /// Serve iSCSI even without a `[[block_export]]` using it (for block
    /// recovery sessions). It is served anyway when one does.
    pub enabled: bool,
    /// Address to listen on.
    pub bind: IpAddr,
    /// Port (3260, IANA's; 0 picks a free one).
    pub port: u16,
}

impl Default for IscsiSection {
    fn default() -> Self {
        IscsiSection {
            enabled: false,
            bind: IpAddr::from([0, 0, 0, 0]),
            port: DEFAULT_ISCSI_PORT,
        }
    }
}

impl IscsiSection {
    /// Whether `revive serve` runs the iSCSI target for these exports.
    pub fn serves(&self, exports: &[BlockExportConfig]) -> bool {
        self.enabled
            || exports
                .iter()
                .any(|e| e.protocol.protocol() == BlockProtocol::Iscsi)
    }
}

impl NbdSection {
    /// Whether `revive serve` runs the NBD server for these exports.
    pub fn serves(&self, exports: &[BlockExportConfig]) -> bool {
        self.enabled
            || exports
                .iter()
                .any(|e| e.protocol.protocol() == BlockProtocol::Nbd)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    struct Doc {
        block_export: Vec<BlockExportConfig>,
        #[serde(default)]
        nbd: NbdSection,
    }

    #[test]
    fn block_exports_name_their_protocol_and_refuse_unknown_keys() {
        let doc: Doc = toml::from_str(
            "[[block_export]]\nname = \"db\"\npoint = \"db01@latest\"\nprotocol = \"nbd\"\n\
             allowed_clients = [\"10.0.0.5\"]\n",
        )
        .unwrap();
        let e = &doc.block_export[0];
        assert_eq!(e.protocol.protocol(), BlockProtocol::Nbd);
        assert_eq!(e.point.as_deref(), Some("db01@latest"));
        assert!(!e.read_only && e.file.is_none());
        assert!(doc.nbd.serves(&doc.block_export));
        assert_eq!(doc.nbd.port, DEFAULT_NBD_PORT);
        let err = toml::from_str::<Doc>(
            "[[block_export]]\nname = \"db\"\nprotocol = \"nbd\"\nallowed_clients = []\nfiel = \"x\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("fiel"), "{err}");
        let err = toml::from_str::<Doc>(
            "[[block_export]]\nname = \"db\"\nprotocol = \"smb\"\nallowed_clients = []\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("smb"), "{err}");
        assert!(!NbdSection::default().serves(&[]));
    }

    #[test]
    fn iscsi_exports_name_their_target_initiators_and_chap() {
        let doc: Doc = toml::from_str(
            "[[block_export]]\nname = \"DB_01\"\npoint = \"db01@latest\"\nprotocol = \"iscsi\"\n\
             allowed_clients = [\"10.0.0.5\"]\n\
             allowed_initiators = [\"iqn.1991-05.com.microsoft:sql01\"]\n\
             chap = { user = \"sql01\", secret = \"0123456789ab\" }\n\
             [[block_export]]\nname = \"b\"\npoint = \"x\"\nprotocol = \"iscsi\"\n\
             allowed_clients = []\ntarget = \"iqn.2020-01.org.example:b\"\n",
        )
        .unwrap();
        let BlockProtocolConfig::Iscsi(a) = &doc.block_export[0].protocol else {
            panic!("not iscsi")
        };
        assert_eq!(a.iqn("DB_01"), "iqn.2024-01.dev.revive:db-01");
        assert_eq!(a.allowed_initiators, ["iqn.1991-05.com.microsoft:sql01"]);
        assert_eq!(a.chap.as_ref().unwrap().user, "sql01");
        let BlockProtocolConfig::Iscsi(b) = &doc.block_export[1].protocol else {
            panic!("not iscsi")
        };
        assert_eq!(b.iqn("b"), "iqn.2020-01.org.example:b");
        assert!(IscsiSection::default().serves(&doc.block_export));
        assert!(!doc.nbd.serves(&doc.block_export));
        assert_eq!(IscsiSection::default().port, DEFAULT_ISCSI_PORT);
        let err = toml::from_str::<Doc>(
            "[[block_export]]\nname = \"db\"\nprotocol = \"iscsi\"\nallowed_clients = []\niqn = \"x\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("iqn"), "{err}");
    }
}
