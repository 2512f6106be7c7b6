//! The configuration file: everything configurable in one TOML document
//! (`config/revive.toml` is the documented example). Missing keys take the
//! defaults, which work on a laptop.

use std::path::{Path, PathBuf};

use serde::Deserialize;

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
}

/// `[repository]`
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepositoryConfig {
    /// Folder of the repository; `--repo` overrides it.
    pub path: Option<PathBuf>,
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
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Config::parse("[repository]\npaht = \"x\"\n").unwrap_err();
        assert!(err.contains("paht"), "{err}");
    }
}
