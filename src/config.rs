//! The configuration file: everything configurable in one TOML document
//! (`config/revive.toml` is the documented example). Missing keys take the
//! defaults, which work on a laptop.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::controller::ControllerConfig;
use crate::datastore::{DatastoreConfig, ExportConfig, DEFAULT_READAHEAD_CHUNKS};
use crate::drivers::HostConfig;
use crate::nfs::limits::{
    DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PER_CLIENT, DEFAULT_RECORD_TIMEOUT,
};
use crate::nfs::{ConnLimits, NfsBind};
use crate::repo::block_cache::DEFAULT_BLOCK_CACHE_BYTES;
use crate::snapshots::SnapshotSourceConfig;
use crate::store::{S3Settings, StoreError, StoreLocation};

/// Environment variable naming the configuration file when `--config` is absent.
pub const CONFIG_ENV: &str = "REVIVE_CONFIG";

/// Problems reading the configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("read config file '{path}' - {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("parse config file '{path}' - {message}")]
    Parse { path: PathBuf, message: String },
}

/// The whole configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the backup repository is.
    pub repository: RepositoryConfig,
    /// State, write caches and memory of the NFS datastore.
    pub datastore: DatastoreSection,
    /// Listening addresses and ports.
    pub nfs: NfsSection,
    /// The HTTP API (metrics; sessions later).
    pub api: ApiSection,
    /// Exports (`[[export]]`); one `/revive` export for localhost when none is given.
    #[serde(rename = "export")]
    pub exports: Vec<ExportSection>,
    /// Restore points published when `revive serve` starts (`[[publication]]`).
    #[serde(rename = "publication")]
    pub publications: Vec<PublicationSection>,
    /// Instant-recovery sessions: retries, validations, the datastore name.
    pub sessions: SessionsSection,
    /// Hypervisor hosts sessions can run VMs on (`[[host]]`).
    #[serde(rename = "host")]
    pub hosts: Vec<HostConfig>,
    /// Presented files served as disks (`[[block_export]]`).
    #[serde(rename = "block_export")]
    pub block_exports: Vec<crate::block::BlockExportConfig>,
    /// The NBD server (`[nbd]`).
    pub nbd: crate::block::NbdSection,
    /// The iSCSI target (`[iscsi]`).
    pub iscsi: crate::block::IscsiSection,
    /// Storage systems whose snapshots VMs can be recovered from (`[[snapshot_source]]`).
    #[serde(rename = "snapshot_source")]
    pub snapshot_sources: Vec<SnapshotSourceConfig>,
    /// Verification boots (`revive verify --boot`).
    pub verify: crate::controller::VerifyBootConfig,
}

/// `[sessions]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsSection {
    /// Automatic retries of a step that failed for a transient cause.
    pub retries: u32,
    /// Seconds between automatic retries.
    pub retry_interval_secs: u64,
    /// Free space a write cache location needs before a session publishes there, e.g. "1GiB".
    #[serde(deserialize_with = "size")]
    pub min_free_cache: u64,
    /// Export the sessions' VM folders appear in (default: the first export).
    pub export: Option<String>,
    /// Datastore name hypervisors show (default: `revive-<this host's name>`).
    pub datastore_name: Option<String>,
    /// Bytes per second a copy migration may write, e.g. "200MiB"; 0: no limit.
    #[serde(deserialize_with = "size")]
    pub migration_bandwidth: u64,
}

impl Default for SessionsSection {
    fn default() -> Self {
        SessionsSection {
            retries: 10,
            retry_interval_secs: 300,
            min_free_cache: 1 << 30,
            export: None,
            datastore_name: None,
            migration_bandwidth: 0,
        }
    }
}

/// `[datastore]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatastoreSection {
    /// Persisted identity (file ids, export instances) and namespaces.
    pub state_dir: PathBuf,
    /// Default write cache location: one folder per publication.
    pub cache_root: PathBuf,
    /// Memory for verified backup chunks, e.g. "256MiB".
    #[serde(deserialize_with = "size")]
    pub block_cache: u64,
    /// Chunks fetched ahead of a sequential reader.
    pub readahead_chunks: u64,
}

impl Default for DatastoreSection {
    fn default() -> Self {
        DatastoreSection {
            state_dir: PathBuf::from("/var/lib/revive/state"),
            cache_root: PathBuf::from("/var/lib/revive/cache"),
            block_cache: DEFAULT_BLOCK_CACHE_BYTES as u64,
            readahead_chunks: DEFAULT_READAHEAD_CHUNKS,
        }
    }
}

/// `[nfs]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NfsSection {
    /// Address to listen on.
    pub bind: IpAddr,
    /// NFS port (2049 is what ESXi and QEMU expect).
    pub nfs_port: u16,
    /// MOUNT port; the same as `nfs_port` shares one listener.
    pub mount_port: u16,
    /// Portmapper port (111 is where clients look); 0 picks a free port.
    pub portmap_port: u16,
    /// Run without a portmapper (clients must be told both ports).
    pub portmap: bool,
    /// TCP connections open at once, all clients together.
    pub max_connections: usize,
    /// TCP connections open at once from one client address.
    pub max_connections_per_client: usize,
    /// Seconds a connection with no call in flight may stay silent.
    pub idle_timeout_secs: u64,
    /// Seconds a call's bytes may take to arrive, from its first byte.
    pub record_timeout_secs: u64,
}

impl Default for NfsSection {
    fn default() -> Self {
        let bind = NfsBind::default();
        NfsSection {
            bind: bind.addr,
            nfs_port: bind.nfs_port,
            mount_port: bind.mount_port,
            portmap_port: bind.portmap_port.unwrap_or(111),
            portmap: true,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            max_connections_per_client: DEFAULT_MAX_PER_CLIENT,
            idle_timeout_secs: DEFAULT_IDLE_TIMEOUT.as_secs(),
            record_timeout_secs: DEFAULT_RECORD_TIMEOUT.as_secs(),
        }
    }
}

/// `[api]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    /// Address of the HTTP API; keep it on localhost.
    pub bind: std::net::SocketAddr,
    /// Bearer token every request must carry; without one the API is off.
    pub token: Option<String>,
    /// Serve the web console (a page that logs in with the token) on `/`.
    pub console: bool,
}

impl Default for ApiSection {
    fn default() -> Self {
        ApiSection {
            bind: std::net::SocketAddr::from(([127, 0, 0, 1], DEFAULT_API_PORT)),
            token: None,
            console: true,
        }
    }
}

/// Default API port: unassigned by IANA, easy to remember next to 2049.
pub const DEFAULT_API_PORT: u16 = 8750;

/// `[[export]]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSection {
    /// Path clients mount.
    pub path: String,
    /// Client addresses allowed to mount (the ESXi hosts).
    pub allowed_clients: Vec<IpAddr>,
}

/// `[[publication]]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicationSection {
    /// Folder name in the export.
    pub name: String,
    /// Restore point: id, unique prefix or VM@latest.
    pub point: String,
    /// Export path (default: the first export).
    pub export: Option<String>,
    /// Write cache folder (default: `<cache_root>/<name>`).
    pub cache: Option<PathBuf>,
}

fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(n) => Ok(n),
        Size::Text(s) => parse_size::parse_size(&s).map_err(serde::de::Error::custom),
    }
}

/// `[repository]`
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepositoryConfig {
    /// Folder of the repository (or an `s3://` URL); `--repo` overrides it.
    pub path: Option<PathBuf>,
    /// `s3://bucket/prefix` of a repository on object storage; `--repo`
    /// overrides it, and it wins over `path`.
    pub url: Option<String>,
    /// Folder of the on-disk chunk cache of `revive serve` (none: no cache).
    pub chunk_cache_dir: Option<PathBuf>,
    /// Budget of the chunk cache, e.g. "20GiB".
    #[serde(deserialize_with = "size")]
    pub chunk_cache_bytes: u64,
    /// How to reach an S3 repository (`[repository.s3]`).
    pub s3: S3Settings,
}

/// Default chunk cache budget: a few booting VMs' working sets.
pub const DEFAULT_CHUNK_CACHE_BYTES: u64 = 8 << 30;

impl RepositoryConfig {
    /// Where the repository is: `cli` (from `--repo`) if given, else `url`,
    /// else `path`; `None` when nothing names one. S3 settings come from
    /// `[repository.s3]`.
    pub fn location(&self, cli: Option<&str>) -> Result<Option<StoreLocation>, StoreError> {
        let text = match (cli, &self.url, &self.path) {
            (Some(c), _, _) => c.to_string(),
            (None, Some(u), _) => u.clone(),
            (None, None, Some(p)) => p.display().to_string(),
            (None, None, None) => return Ok(None),
        };
        let mut location = StoreLocation::parse(&text)?;
        if let StoreLocation::S3(o) = &mut location {
            o.settings = self.s3.clone();
            o.settings.request_timeout = o.settings.request_timeout.max(Duration::from_secs(1));
        }
        Ok(Some(location))
    }

    /// The chunk cache folder and budget, when configured.
    pub fn chunk_cache(&self) -> Option<(PathBuf, u64)> {
        let bytes = if self.chunk_cache_bytes == 0 {
            DEFAULT_CHUNK_CACHE_BYTES
        } else {
            self.chunk_cache_bytes
        };
        self.chunk_cache_dir.clone().map(|d| (d, bytes))
    }
}

impl Config {
    /// Reads and parses a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        })
    }

    /// The exports, with the default `/revive` for localhost when none is configured.
    pub fn export_configs(&self) -> Vec<ExportConfig> {
        if self.exports.is_empty() {
            return vec![ExportConfig {
                path: "/revive".into(),
                allowed_clients: vec![IpAddr::from([127, 0, 0, 1])],
            }];
        }
        self.exports
            .iter()
            .map(|e| ExportConfig {
                path: e.path.clone(),
                allowed_clients: e.allowed_clients.clone(),
            })
            .collect()
    }

    /// What the datastore needs.
    pub fn datastore_config(&self) -> DatastoreConfig {
        DatastoreConfig {
            state_dir: self.datastore.state_dir.clone(),
            cache_root: self.datastore.cache_root.clone(),
            block_cache_bytes: self.datastore.block_cache as usize,
            readahead_chunks: self.datastore.readahead_chunks,
            exports: self.export_configs(),
        }
    }

    /// What the session controller needs.
    pub fn controller_config(&self) -> ControllerConfig {
        let export = self
            .sessions
            .export
            .clone()
            .or_else(|| self.export_configs().first().map(|e| e.path.clone()))
            .unwrap_or_else(|| "/revive".into());
        let default_nfs_address = if self.nfs.bind.is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            self.nfs.bind.to_string()
        };
        ControllerConfig {
            state_dir: self.datastore.state_dir.clone(),
            export,
            datastore_name: self
                .sessions
                .datastore_name
                .clone()
                .unwrap_or_else(crate::controller::default_datastore_name),
            default_nfs_address,
            retries: self.sessions.retries,
            retry_interval: std::time::Duration::from_secs(self.sessions.retry_interval_secs),
            min_free_cache: self.sessions.min_free_cache,
            migration_bandwidth: self.sessions.migration_bandwidth,
            cache_root: self.datastore.cache_root.clone(),
            hosts: self.hosts.clone(),
            verify: self.verify.clone(),
        }
    }

    /// Where the NFS server listens.
    pub fn nfs_bind(&self) -> NfsBind {
        NfsBind {
            addr: self.nfs.bind,
            nfs_port: self.nfs.nfs_port,
            mount_port: self.nfs.mount_port,
            portmap_port: self.nfs.portmap.then_some(self.nfs.portmap_port),
        }
    }

    /// Connection limits of the NFS server (zero values mean one, or one
    /// second: never "no limit").
    pub fn conn_limits(&self) -> ConnLimits {
        ConnLimits {
            max_connections: self.nfs.max_connections.max(1),
            max_per_client: self.nfs.max_connections_per_client.max(1),
            idle_timeout: Duration::from_secs(self.nfs.idle_timeout_secs.max(1)),
            record_timeout: Duration::from_secs(self.nfs.record_timeout_secs.max(1)),
        }
    }

    /// Parses configuration text.
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.message().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/revive.toml");
        let config = Config::load(&path).unwrap();
        assert_eq!(
            config.repository.path.as_deref(),
            Some(Path::new("/var/lib/revive/repo"))
        );
        assert_eq!(
            config,
            Config::parse(&std::fs::read_to_string(&path).unwrap()).unwrap()
        );
        assert_eq!(config.datastore.block_cache, 256 << 20);
        assert_eq!(config.nfs.nfs_port, 2049);
        assert_eq!(config.nfs.portmap_port, 111);
        assert_eq!(config.conn_limits(), ConnLimits::default());
        assert_eq!(config.export_configs()[0].path, "/revive");
        assert_eq!(config.sessions.retries, 10);
        assert_eq!(config.hosts[0].name, "local");
        assert_eq!(
            config.hosts[0].driver,
            crate::drivers::DriverConfig::None(Default::default())
        );
        assert_eq!(config.nbd, crate::block::NbdSection::default());
        assert_eq!(config.iscsi, crate::block::IscsiSection::default());
        assert!(config.block_exports.is_empty());
    }

    #[test]
    fn hosts_name_their_driver_and_refuse_unknown_keys() {
        let config =
            Config::parse("[[host]]\nname = \"kvm1\"\ndriver = \"qemu\"\nrun_dir = \"/tmp/q\"\n")
                .unwrap();
        assert!(matches!(
            config.hosts[0].driver,
            crate::drivers::DriverConfig::Qemu(_)
        ));
        let err = Config::parse("[[host]]\nname = \"x\"\ndriver = \"hyperv\"\n").unwrap_err();
        assert!(err.contains("hyperv"), "{err}");
        let err = Config::parse(
            "[[host]]\nname = \"x\"\ndriver = \"qemu\"\nrun_dir = \"/q\"\nrundir = 1\n",
        )
        .unwrap_err();
        assert!(err.contains("rundir"), "{err}");
    }

    #[test]
    fn postgres_hosts_take_their_settings_and_a_cache_location() {
        let config = Config::parse(
            "[[host]]\nname = \"pg1\"\ndriver = \"postgres\"\nsocket_dir = \"/tmp/s\"\n\
             port = 5433\ncache_dir = \"/srv/cache\"\n",
        )
        .unwrap();
        let crate::drivers::DriverConfig::Postgres(pg) = &config.hosts[0].driver else {
            panic!("not postgres");
        };
        assert_eq!((pg.port, pg.os_user.as_str()), (5433, "postgres"));
        assert_eq!(pg.socket_dir, PathBuf::from("/tmp/s"));
        assert_eq!(config.hosts[0].cache_dir, Some(PathBuf::from("/srv/cache")));
        let err = Config::parse("[[host]]\nname = \"x\"\ndriver = \"postgres\"\nbindir = 1\n")
            .unwrap_err();
        assert!(err.contains("bindir"), "{err}");
    }

    #[test]
    fn empty_file_gives_working_defaults() {
        let config = Config::parse("").unwrap();
        assert_eq!(config.datastore_config().exports.len(), 1);
        assert_eq!(config.nfs_bind(), NfsBind::default());
    }

    #[test]
    fn s3_repository_settings() {
        let config = Config::parse(
            "[repository]\nurl = \"s3://bkp/site-a\"\nchunk_cache_dir = \"/var/cache/revive\"\n\
             chunk_cache_bytes = \"1GiB\"\n[repository.s3]\nendpoint = \"http://127.0.0.1:9000\"\n\
             request_timeout = 3\n",
        )
        .unwrap();
        let Some(StoreLocation::S3(o)) = config.repository.location(None).unwrap() else {
            panic!("not s3");
        };
        assert_eq!((o.bucket.as_str(), o.prefix.as_str()), ("bkp", "site-a"));
        assert_eq!(
            o.settings.endpoint.as_deref(),
            Some("http://127.0.0.1:9000")
        );
        assert_eq!(o.settings.request_timeout, Duration::from_secs(3));
        assert!(o.settings.path_style);
        assert_eq!(
            config.repository.chunk_cache(),
            Some((PathBuf::from("/var/cache/revive"), 1 << 30))
        );
        let local = config.repository.location(Some("/srv/repo")).unwrap();
        assert_eq!(local, Some(StoreLocation::Local("/srv/repo".into())));
    }

    #[test]
    fn snapshot_sources_and_host_clients_parse() {
        let config = Config::parse(
            "[[host]]\nname = \"kvm1\"\ndriver = \"qemu\"\nrun_dir = \"/q\"\n\
             nfs_clients = [\"10.0.0.7\"]\n\
             [[snapshot_source]]\nname = \"pool1\"\nprovider = \"btrfs\"\npath = \"/mnt/pool1\"\n",
        )
        .unwrap();
        assert_eq!(config.hosts[0].nfs_clients, [IpAddr::from([10, 0, 0, 7])]);
        assert_eq!(config.snapshot_sources[0].name, "pool1");
        assert!(Config::parse("").unwrap().snapshot_sources.is_empty());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Config::parse("[repository]\npaht = \"x\"\n").unwrap_err();
        assert!(err.contains("paht"), "{err}");
    }
}
