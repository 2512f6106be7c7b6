//! The S3 store: objects in a bucket under a key prefix, through
//! `object_store`'s AWS backend (AWS S3, Ceph RGW, MinIO, moto).
//!
//! - Put-if-absent is `PutMode::Create` (`If-None-Match: *`); a 412 or 409 is
//!   [`PutOutcome::AlreadyExists`]. Stores that silently ignore the header
//!   are refused at `init` by the repository's probe.
//! - Short outages are retried inside `object_store` (backoff, bounded by
//!   [`S3Options::retry_window`]); what is left surfaces as
//!   [`StoreError::Unavailable`], which callers treat as transient.
//! - There is no `flock` on S3: the repository lock is a set of lease objects
//!   (see [`super::lease`]).
//! - Writes are durable when the PUT returns, so [`Store::sync`] does nothing.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload,
    RetryConfig,
};

use super::lease::{self, LeaseSettings};
use super::{validate_key, LockGuard, LockMode, ObjectMeta, PutOutcome, Store, StoreError};

/// Default time one HTTP request may take before it is abandoned and retried:
/// a 4 MiB chunk crosses even a slow link in far less, and a stalled server
/// must not hold a reader much longer than this per attempt.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Default window in which failed requests are retried before the error
/// reaches the caller: long enough to ride out a store restart or a
/// load-balancer failover, short enough that an NFS client still gets an
/// answer (JUKEBOX, then its own retry) within a minute.
pub const DEFAULT_RETRY_WINDOW: Duration = Duration::from_secs(60);
/// Grace period `gc` gives unreferenced objects on S3 by default: a backup on
/// another server whose lease was lost (paused process, partition) may still
/// publish a manifest naming objects it wrote within this time.
pub const DEFAULT_S3_GC_GRACE: Duration = Duration::from_secs(15 * 60);

/// How to reach an S3 store: `[repository.s3]` of the config file, parsed
/// as it is. Fields left `None` fall back to the usual AWS environment
/// variables (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`); times are whole seconds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Settings {
    /// Endpoint URL of a self-hosted store, e.g. `http://127.0.0.1:9000`.
    pub endpoint: Option<String>,
    /// Region (self-hosted stores accept any; AWS needs the bucket's).
    pub region: Option<String>,
    /// Access key id.
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
    /// Allow `http://` endpoints (self-hosted stores on a trusted network).
    pub allow_http: Option<bool>,
    /// Path-style addressing (`endpoint/bucket/key`): what self-hosted stores
    /// expect. Virtual-hosted style (`bucket.endpoint/key`) when false.
    pub path_style: bool,
    /// Time limit of one HTTP request before it is retried.
    #[serde(with = "seconds")]
    pub request_timeout: Duration,
    /// Time in which failed requests are retried before reads fail
    /// (transiently: NFS clients are told to retry).
    #[serde(with = "seconds")]
    pub retry_window: Duration,
    /// Grace period of `gc` for unreferenced objects (see docs/formats.md).
    #[serde(with = "seconds")]
    pub gc_grace: Duration,
}

impl Default for S3Settings {
    fn default() -> Self {
        S3Settings {
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            allow_http: None,
            path_style: true,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            retry_window: DEFAULT_RETRY_WINDOW,
            gc_grace: DEFAULT_S3_GC_GRACE,
        }
    }
}

/// Durations written as whole seconds in the config file.
mod seconds {
    use std::time::Duration;

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let secs: u64 = serde::Deserialize::deserialize(d)?;
        Ok(Duration::from_secs(secs))
    }
}

/// Where an S3 repository lives (bucket and prefix) and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Options {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix inside the bucket (no leading or trailing `/`; may be empty).
    pub prefix: String,
    /// Endpoint, credentials and timeouts.
    pub settings: S3Settings,
}

impl S3Options {
    /// Options for `s3://bucket/prefix` with everything else from the environment.
    pub fn new(bucket: &str, prefix: &str) -> S3Options {
        S3Options {
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
            settings: S3Settings::default(),
        }
    }

    /// `s3://bucket/prefix`, as users write it.
    pub fn url(&self) -> String {
        if self.prefix.is_empty() {
            format!("s3://{}", self.bucket)
        } else {
            format!("s3://{}/{}", self.bucket, self.prefix)
        }
    }
}

/// A store in an S3 bucket.
#[derive(Debug, Clone)]
pub struct S3Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    s3: AmazonS3,
    options: S3Options,
    /// `s3://bucket/prefix`, for messages.
    url: String,
    lease: LeaseSettings,
}

impl S3Store {
    /// Builds the client; nothing is sent until the first request.
    ///
    /// # Errors
    /// [`StoreError::Config`] when the options are unusable (bad endpoint URL,
    /// no region).
    pub fn open(options: S3Options) -> Result<S3Store, StoreError> {
        let url = options.url();
        // from_env: credentials, region, endpoint and allow_http from AWS_*
        // unless the configuration names them.
        let mut b = AmazonS3Builder::from_env().with_bucket_name(&options.bucket);
        if let Some(e) = &options.settings.endpoint {
            b = b.with_endpoint(e);
        }
        if let Some(r) = &options.settings.region {
            b = b.with_region(r);
        }
        if let Some(k) = &options.settings.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(s) = &options.settings.secret_access_key {
            b = b.with_secret_access_key(s);
        }
        // Our client options replace those from_env collected, so decide
        // allow_http here: configured, else AWS_ALLOW_HTTP, else an http://
        // endpoint (configured or AWS_ENDPOINT_URL) says so.
        let env = |k: &str| std::env::var(k).ok();
        let endpoint = options
            .settings
            .endpoint
            .clone()
            .or_else(|| env("AWS_ENDPOINT_URL"))
            .or_else(|| env("AWS_ENDPOINT"));
        let allow_http = options.settings.allow_http.unwrap_or_else(|| {
            env("AWS_ALLOW_HTTP").is_some_and(|v| v.eq_ignore_ascii_case("true"))
                || endpoint
                    .as_deref()
                    .is_some_and(|e| e.starts_with("http://"))
        });
        if options.settings.region.is_none()
            && env("AWS_REGION").is_none()
            && env("AWS_DEFAULT_REGION").is_none()
        {
            // Self-hosted stores accept any region; AWS needs the bucket's.
            b = b.with_region("us-east-1");
        }
        b = b
            .with_virtual_hosted_style_request(!options.settings.path_style)
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(options.settings.request_timeout)
                    .with_connect_timeout(
                        options.settings.request_timeout.min(Duration::from_secs(5)),
                    )
                    .with_allow_http(allow_http),
            )
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    // Poll a returning store often: a VM is waiting.
                    max_backoff: Duration::from_secs(2),
                    base: 2.0,
                },
                // The window, not the count, is the limit that matters.
                max_retries: 1000,
                retry_timeout: options.settings.retry_window,
            });
        let s3 = b.build().map_err(|e| StoreError::Config {
            store: url.clone(),
            reason: e.to_string(),
        })?;
        Ok(S3Store {
            inner: Arc::new(Inner {
                s3,
                options,
                url,
                lease: LeaseSettings::default(),
            }),
        })
    }

    /// The options this store was opened with.
    pub fn options(&self) -> &S3Options {
        &self.inner.options
    }

    fn path(&self, key: &str) -> Result<ObjectPath, StoreError> {
        validate_key(key)?;
        Ok(self.full_path(key))
    }

    fn full_path(&self, key: &str) -> ObjectPath {
        if self.inner.options.prefix.is_empty() {
            ObjectPath::from(key)
        } else {
            ObjectPath::from(format!("{}/{key}", self.inner.options.prefix))
        }
    }

    /// The store key of a listed object path (without the prefix).
    fn key_of(&self, path: &ObjectPath) -> Option<String> {
        let full = path.as_ref();
        let prefix = &self.inner.options.prefix;
        if prefix.is_empty() {
            Some(full.to_string())
        } else {
            full.strip_prefix(prefix.as_str())
                .and_then(|k| k.strip_prefix('/'))
                .map(str::to_string)
        }
    }

    /// Maps an `object_store` error: only reachability problems are transient.
    fn map_err(&self, key: &str, e: object_store::Error) -> StoreError {
        use object_store::Error as E;
        match e {
            E::NotFound { .. } => StoreError::NotFound {
                store: self.inner.url.clone(),
                key: key.to_string(),
            },
            E::PermissionDenied { .. } | E::Unauthenticated { .. } => StoreError::Denied {
                store: self.inner.url.clone(),
                reason: e.to_string(),
            },
            E::InvalidPath { .. } => StoreError::InvalidKey {
                key: key.to_string(),
            },
            // Generic covers HTTP errors after the retry window, timeouts and
            // connection failures: the store may come back.
            other => StoreError::Unavailable {
                store: self.inner.url.clone(),
                reason: format!("'{key}' - {other}"),
            },
        }
    }

    /// Reads a byte range of an object (a range request: only those bytes
    /// cross the network).
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        let path = self.path(key)?;
        self.inner
            .s3
            .get_range(&path, range)
            .await
            .map_err(|e| self.map_err(key, e))
    }
}

#[async_trait]
impl Store for S3Store {
    fn describe(&self) -> String {
        self.inner.url.clone()
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let path = self.path(key)?;
        let result = self
            .inner
            .s3
            .get(&path)
            .await
            .map_err(|e| self.map_err(key, e))?;
        result.bytes().await.map_err(|e| self.map_err(key, e))
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StoreError> {
        S3Store::get_range(self, key, range).await
    }

    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let path = self.path(key)?;
        self.inner
            .s3
            .put(&path, PutPayload::from(data))
            .await
            .map(|_| ())
            .map_err(|e| self.map_err(key, e))
    }

    async fn put_if_absent(&self, key: &str, data: Bytes) -> Result<PutOutcome, StoreError> {
        let path = self.path(key)?;
        let opts = PutOptions::from(PutMode::Create);
        match self
            .inner
            .s3
            .put_opts(&path, PutPayload::from(data), opts)
            .await
        {
            Ok(_) => Ok(PutOutcome::Created),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(PutOutcome::AlreadyExists),
            Err(e) => Err(self.map_err(key, e)),
        }
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let path = self.path(key)?;
        match self.inner.s3.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.map_err(key, e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        match self.inner.s3.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.map_err(key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let trimmed = prefix.trim_end_matches('/');
        let path = self.path(trimmed)?;
        let listed: Vec<object_store::ObjectMeta> = self
            .inner
            .s3
            .list(Some(&path))
            .try_collect()
            .await
            .map_err(|e| self.map_err(prefix, e))?;
        let mut out: Vec<ObjectMeta> = listed
            .into_iter()
            .filter_map(|m| {
                let key = self.key_of(&m.location)?;
                Some(ObjectMeta {
                    key,
                    size: m.size,
                    modified: Some(SystemTime::from(m.last_modified)),
                })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    async fn sync(&self) -> Result<(), StoreError> {
        // A successful PUT is durable on S3: nothing to flush.
        Ok(())
    }

    async fn try_lock(&self, mode: LockMode) -> Result<Box<dyn LockGuard>, StoreError> {
        let store: Arc<dyn Store> = Arc::new(self.clone());
        lease::acquire(store, mode, self.inner.lease.clone()).await
    }

    fn gc_grace(&self) -> Duration {
        self.inner.options.settings.gc_grace
    }
}
