//! The repository lock on stores without `flock` (S3): lease objects.
//!
//! ```text
//! locks/exclusive.json          gc: created put-if-absent, one holder at a time
//! locks/shared/<holder>.json    one per backup (or forget) in progress, on any server
//! ```
//!
//! A lease body is JSON `{holder, mode, expires}`; `expires` is renewed every
//! [`LeaseSettings::renew_every`] while the holder runs and lies
//! [`LeaseSettings::ttl`] ahead, so a crashed holder blocks others for at most
//! one TTL. Servers' clocks must agree to well within the TTL (NTP).
//!
//! Taking a lease is "write mine, then look for the other kind":
//! - shared: no live exclusive lease → write `shared/<holder>` → check again
//!   for a live exclusive lease (and withdraw if one appeared);
//! - exclusive: create `exclusive.json` if absent (an expired one is removed
//!   first) → fail if any live shared lease exists.
//!
//! With a strongly consistent store (S3 since 2020, Ceph, MinIO, moto) one of
//! two racing holders always sees the other's object, so gc and a backup
//! never both proceed. A holder that could not renew in time stops trusting
//! its lease ([`LockGuard::check`]): a backup checks before publishing.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::{LockGuard, LockMode, PutOutcome, Store, StoreError};

/// Key of the exclusive (gc) lease.
const EXCLUSIVE_KEY: &str = "locks/exclusive.json";
/// Folder of shared (backup) leases.
const SHARED_PREFIX: &str = "locks/shared/";

/// Timing of leases.
#[derive(Debug, Clone)]
pub struct LeaseSettings {
    /// How far ahead a lease's expiry lies when written.
    pub ttl: Duration,
    /// How often a held lease is renewed.
    pub renew_every: Duration,
}

impl Default for LeaseSettings {
    /// One minute: a crashed backup blocks gc for at most that long, and a
    /// renewal every 20 s leaves two chances before the lease runs out.
    fn default() -> Self {
        LeaseSettings {
            ttl: Duration::from_secs(60),
            renew_every: Duration::from_secs(20),
        }
    }
}

/// The body of a lease object.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LeaseBody {
    holder: String,
    mode: String,
    expires: DateTime<Utc>,
}

impl LeaseBody {
    fn live(&self) -> bool {
        self.expires > Utc::now()
    }
}

fn body(holder: &str, mode: LockMode, ttl: Duration) -> Bytes {
    let lease = LeaseBody {
        holder: holder.to_string(),
        mode: match mode {
            LockMode::Shared => "shared".into(),
            LockMode::Exclusive => "exclusive".into(),
        },
        expires: Utc::now() + chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::MAX),
    };
    // Serializing a struct of strings and a date cannot fail.
    Bytes::from(serde_json::to_vec(&lease).unwrap_or_default())
}

/// Reads a lease; a missing one is `None`, an unreadable one counts as expired
/// (a half-written lease cannot exist on S3, so it is garbage).
async fn read(store: &dyn Store, key: &str) -> Result<Option<LeaseBody>, StoreError> {
    match store.get(key).await {
        Ok(raw) => Ok(Some(serde_json::from_slice(&raw).unwrap_or(LeaseBody {
            holder: "?".into(),
            mode: "?".into(),
            expires: DateTime::<Utc>::UNIX_EPOCH,
        }))),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

async fn live_exclusive(store: &dyn Store) -> Result<Option<LeaseBody>, StoreError> {
    Ok(read(store, EXCLUSIVE_KEY).await?.filter(LeaseBody::live))
}

fn busy(store: &dyn Store, reason: String) -> StoreError {
    StoreError::Busy {
        store: store.describe(),
        reason,
    }
}

/// A name unique to this process and call: host, pid and a random suffix.
fn new_holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .collect();
    format!(
        "{}-{}-{:08x}",
        if host.is_empty() { "host" } else { &host },
        std::process::id(),
        rand::random::<u32>()
    )
}

/// Takes a lease of `mode`, failing with [`StoreError::Busy`] instead of waiting.
pub async fn acquire(
    store: Arc<dyn Store>,
    mode: LockMode,
    settings: LeaseSettings,
) -> Result<Box<dyn LockGuard>, StoreError> {
    let holder = new_holder();
    let key = match mode {
        LockMode::Shared => format!("{SHARED_PREFIX}{holder}.json"),
        LockMode::Exclusive => EXCLUSIVE_KEY.to_string(),
    };
    match mode {
        LockMode::Shared => {
            if let Some(l) = live_exclusive(&*store).await? {
                return Err(busy(
                    &*store,
                    format!("garbage collection is running ({})", l.holder),
                ));
            }
            store.put(&key, body(&holder, mode, settings.ttl)).await?;
            if let Some(l) = live_exclusive(&*store).await? {
                store.delete(&key).await?;
                return Err(busy(
                    &*store,
                    format!("garbage collection is running ({})", l.holder),
                ));
            }
        }
        LockMode::Exclusive => {
            let mut created = false;
            for _ in 0..2 {
                match store
                    .put_if_absent(&key, body(&holder, mode, settings.ttl))
                    .await?
                {
                    PutOutcome::Created => {
                        created = true;
                        break;
                    }
                    PutOutcome::AlreadyExists => match read(&*store, &key).await? {
                        Some(l) if l.live() => {
                            return Err(busy(
                                &*store,
                                format!("another garbage collection is running ({})", l.holder),
                            ))
                        }
                        // Expired (its holder crashed) or gone meanwhile: clear and retry once.
                        _ => store.delete(&key).await?,
                    },
                }
            }
            if !created {
                return Err(busy(
                    &*store,
                    "another garbage collection took the lease".into(),
                ));
            }
            for meta in store.list(SHARED_PREFIX).await? {
                match read(&*store, &meta.key).await? {
                    Some(l) if l.live() => {
                        store.delete(&key).await?;
                        return Err(busy(
                            &*store,
                            format!(
                                "a backup or another operation is using the repository ({})",
                                l.holder
                            ),
                        ));
                    }
                    // A crashed holder's lease: tidy it away.
                    Some(_) => store.delete(&meta.key).await?,
                    None => {}
                }
            }
        }
    }
    debug!(key, "lease taken");
    let renewed = Arc::new(Mutex::new(Instant::now()));
    let renewer = {
        let (store, key, holder, renewed, settings) = (
            store.clone(),
            key.clone(),
            holder.clone(),
            renewed.clone(),
            settings.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(settings.renew_every).await;
                match store.put(&key, body(&holder, mode, settings.ttl)).await {
                    Ok(()) => *renewed.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now(),
                    Err(e) => warn!(key, cause = %e, "renew repository lease"),
                }
            }
        })
    };
    Ok(Box::new(Lease {
        store,
        key,
        settings,
        renewed,
        renewer: Some(renewer),
    }))
}

/// A held lease; renewed in the background until released or dropped.
#[derive(Debug)]
struct Lease {
    store: Arc<dyn Store>,
    key: String,
    settings: LeaseSettings,
    /// When the lease object was last written.
    renewed: Arc<Mutex<Instant>>,
    renewer: Option<JoinHandle<()>>,
}

#[async_trait]
impl LockGuard for Lease {
    fn check(&self) -> Result<(), StoreError> {
        let age = self
            .renewed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed();
        // Keep one renewal interval of margin: the caller is about to act on
        // the lease, and others may treat it as expired at `ttl`.
        if age + self.settings.renew_every > self.settings.ttl {
            return Err(busy(
                &*self.store,
                format!(
                    "lease '{}' was not renewed for {:.0} s; another server may have taken over",
                    self.key,
                    age.as_secs_f64()
                ),
            ));
        }
        Ok(())
    }

    async fn release(mut self: Box<Self>) -> Result<(), StoreError> {
        if let Some(r) = self.renewer.take() {
            r.abort();
        }
        self.store.delete(&self.key).await
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(r) = self.renewer.take() {
            r.abort();
            // Not released explicitly (an error path): remove it in the
            // background; if the process exits first, the lease expires.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let (store, key) = (self.store.clone(), self.key.clone());
                rt.spawn(async move {
                    let _ = store.delete(&key).await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalStore;

    #[tokio::test]
    async fn exclusive_and_shared_exclude_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(LocalStore::open(dir.path()).unwrap());
        let s = LeaseSettings::default();
        let shared = acquire(store.clone(), LockMode::Shared, s.clone())
            .await
            .unwrap();
        let also = acquire(store.clone(), LockMode::Shared, s.clone())
            .await
            .unwrap();
        let err = acquire(store.clone(), LockMode::Exclusive, s.clone())
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Busy { .. }), "{err}");
        assert!(
            !store.exists(EXCLUSIVE_KEY).await.unwrap(),
            "a refused gc withdraws its lease"
        );
        shared.check().unwrap();
        shared.release().await.unwrap();
        also.release().await.unwrap();
        let excl = acquire(store.clone(), LockMode::Exclusive, s.clone())
            .await
            .unwrap();
        let err = acquire(store.clone(), LockMode::Shared, s.clone())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("garbage collection"), "{err}");
        assert!(store.list(SHARED_PREFIX).await.unwrap().is_empty());
        excl.release().await.unwrap();
    }

    #[tokio::test]
    async fn expired_leases_do_not_block() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(LocalStore::open(dir.path()).unwrap());
        let short = LeaseSettings {
            ttl: Duration::from_millis(1),
            renew_every: Duration::from_secs(3600),
        };
        // A crashed backup's lease, and a crashed gc's.
        let crashed = acquire(store.clone(), LockMode::Shared, short.clone())
            .await
            .unwrap();
        std::mem::forget(crashed);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let gc = acquire(store.clone(), LockMode::Exclusive, short.clone())
            .await
            .unwrap();
        assert!(
            gc.check().is_err(),
            "a lease not renewed in time is not trusted"
        );
        std::mem::forget(gc);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let again = acquire(store.clone(), LockMode::Exclusive, LeaseSettings::default())
            .await
            .unwrap();
        again.release().await.unwrap();
    }
}
