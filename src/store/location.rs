//! Where a store is: a local folder or `s3://bucket/prefix`.

use std::path::PathBuf;
use std::sync::Arc;

use super::{LocalStore, S3Options, S3Store, Store, StoreError};

/// A store's location, parsed from `--repo` or the configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// A folder on this machine.
    Local(PathBuf),
    /// A bucket and prefix on an S3-compatible object store.
    S3(S3Options),
}

impl StoreLocation {
    /// Parses `s3://bucket[/prefix]` or a folder path; S3 settings other than
    /// bucket and prefix start from their defaults (see [`S3Options::new`]).
    ///
    /// # Errors
    /// [`StoreError::Config`] for an `s3://` URL without a bucket.
    pub fn parse(text: &str) -> Result<StoreLocation, StoreError> {
        let Some(rest) = text.strip_prefix("s3://") else {
            return Ok(StoreLocation::Local(PathBuf::from(text)));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(StoreError::Config {
                store: text.to_string(),
                reason: "the URL names no bucket (expected s3://BUCKET/PREFIX)".into(),
            });
        }
        Ok(StoreLocation::S3(S3Options::new(bucket, prefix)))
    }

    /// The location as users write it.
    pub fn describe(&self) -> String {
        match self {
            StoreLocation::Local(p) => p.display().to_string(),
            StoreLocation::S3(o) => o.url(),
        }
    }

    /// Opens the store (a local folder is created if missing; S3 sends
    /// nothing until the first request).
    pub fn open(&self) -> Result<Arc<dyn Store>, StoreError> {
        Ok(match self {
            StoreLocation::Local(p) => Arc::new(LocalStore::open(p.clone())?),
            StoreLocation::S3(o) => Arc::new(S3Store::open(o.clone())?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_paths() {
        assert_eq!(
            StoreLocation::parse("/srv/repo").unwrap(),
            StoreLocation::Local("/srv/repo".into())
        );
        let StoreLocation::S3(o) = StoreLocation::parse("s3://b/some/prefix/").unwrap() else {
            panic!("not s3");
        };
        assert_eq!((o.bucket.as_str(), o.prefix.as_str()), ("b", "some/prefix"));
        assert_eq!(o.url(), "s3://b/some/prefix");
        let StoreLocation::S3(o) = StoreLocation::parse("s3://b").unwrap() else {
            panic!("not s3");
        };
        assert_eq!(o.prefix, "");
        assert!(StoreLocation::parse("s3:///x").is_err());
    }
}
