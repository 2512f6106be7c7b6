//! The configuration of block exports: `[[block_export]]` entries (which
//! file of which restore point or publication, for whom, over which
//! protocol) and the `[nbd]` server section. Each protocol adds a variant to
//! [`BlockProtocolConfig`] with its own per-export keys and its own server
//! section.

use std::net::IpAddr;

use serde::Deserialize;

use super::registry::BlockProtocol;

/// The NBD port IANA assigned.
pub const DEFAULT_NBD_PORT: u16 = 10809;

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
    /// The protocol and its settings (`protocol = "nbd"`).
    #[serde(flatten)]
    pub protocol: BlockProtocolConfig,
}

/// Which protocol serves a block export, with its per-export settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "protocol", rename_all = "lowercase")]
pub enum BlockProtocolConfig {
    /// NBD (`[nbd]` sets the server).
    Nbd(NbdExportConfig),
}

impl BlockProtocolConfig {
    /// The protocol.
    pub fn protocol(&self) -> BlockProtocol {
        match self {
            BlockProtocolConfig::Nbd(_) => BlockProtocol::Nbd,
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
}

impl Default for NbdSection {
    fn default() -> Self {
        NbdSection {
            enabled: false,
            bind: IpAddr::from([0, 0, 0, 0]),
            port: DEFAULT_NBD_PORT,
        }
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
}
