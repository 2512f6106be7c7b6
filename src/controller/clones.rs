//! Clones of storage snapshots, as the controller keeps them.
//!
//! One record per clone, `<state>/clones/<clone>.json`, replaced atomically:
//! which snapshot it was made of, where it is, and the sessions using it
//! (its reference count).
//!
//! # Rules
//! - **One clone per snapshot**, shared by every VM recovered from it; a
//!   second operation on a VM that already runs from a clone of that
//!   snapshot gets a clone of its own (two registrations of one `.vmx`
//!   would collide).
//! - **Recorded before the storage is asked**, in state `creating`, and
//!   named after the session that needs it: a `kill -9` anywhere in
//!   between leaves a record that [`sweep`] at the next start destroys
//!   (idempotently: the storage may or may not have made it), and the
//!   session, resumed at `publishing`, makes it again.
//! - **Released with its last user**: unpresented, destroyed, then the
//!   record removed (state `deleting` meanwhile, so a crash there is swept
//!   too). A clone that fails to be made is destroyed at once: bad input
//!   leaves nothing behind.
//! - Clones on the storage that no record names are reported, not
//!   destroyed: another revive may own them.
//!
//! One lock serializes every decision here; clone creation is O(1) on the
//! providers, so holding it through the storage call costs little.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{Controller, ControllerError, Inner, Session};
use crate::fsutil::write_atomic;
use crate::snapshots::{
    clone_name, CloneRef, Presentation, Snapshot, SnapshotProvider, SnapshotVm,
};

/// Test hook, never set in production: `<point>:<marker file>` makes the
/// first clone creation stop at `point` ("recorded": the record is
/// written, the storage not asked yet; "cloned": the storage made the
/// clone, the record still says creating). It writes the marker file and
/// waits until revive is killed, so a test can `kill -9` it exactly there.
pub const TEST_PAUSE_ENV: &str = "REVIVE_TEST_CLONE_PAUSE";

/// Where a clone is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CloneState {
    /// Recorded; the storage may or may not have made it yet.
    Creating,
    /// Made and in use.
    Ready,
    /// Its last user left; being unpresented and destroyed.
    Deleting,
}

/// A session using a clone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneUser {
    /// Session id.
    pub session: String,
    /// The VM it recovers (the sharing rule looks at it).
    pub vm: String,
}

/// One clone, as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneRecord {
    /// Configured snapshot source.
    pub source: String,
    /// The clone on the storage.
    pub clone: CloneRef,
    /// Where it is in its life.
    pub state: CloneState,
    /// Sessions using it: its reference count.
    pub users: Vec<CloneUser>,
    /// How hosts see it, once presented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presentation: Option<Presentation>,
    /// When it was recorded.
    pub created: DateTime<Utc>,
}

/// The folder of clone records and the lock over them.
pub(super) struct CloneBook {
    dir: PathBuf,
    lock: tokio::sync::Mutex<()>,
}

fn state_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ControllerError {
    let path = path.to_path_buf();
    move |source| ControllerError::State {
        action,
        path,
        source,
    }
}

impl CloneBook {
    /// Opens (creating) `<state>/clones`.
    pub(super) fn open(state_dir: &Path) -> Result<CloneBook, ControllerError> {
        let dir = state_dir.join("clones");
        std::fs::create_dir_all(&dir).map_err(state_err("create clone folder", &dir))?;
        Ok(CloneBook {
            dir,
            lock: tokio::sync::Mutex::new(()),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// Writes `record` durably (temp file, fsync, rename) off the async threads.
    async fn save(&self, record: &CloneRecord) -> Result<(), ControllerError> {
        let path = self.path(&record.clone.name);
        let json = serde_json::to_vec_pretty(record)
            .map_err(|e| state_err("encode clone record", &path)(std::io::Error::other(e)))?;
        blocking(&path, "write clone record", move |p| write_atomic(p, &json)).await
    }

    async fn remove(&self, name: &str) -> Result<(), ControllerError> {
        blocking(
            &self.path(name),
            "remove clone record",
            |p| match std::fs::remove_file(p) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            },
        )
        .await
    }

    /// Every record (see [`CloneBook::load_now`]), read off the async threads.
    pub(super) async fn load_all(&self) -> Result<Vec<CloneRecord>, ControllerError> {
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || Self::load_now(&dir))
            .await
            .map_err(|e| state_err("list clones", &self.dir)(std::io::Error::other(e)))?
    }

    /// Every record in `dir`; an unreadable one is logged and skipped.
    fn load_now(dir: &Path) -> Result<Vec<CloneRecord>, ControllerError> {
        let entries = std::fs::read_dir(dir).map_err(state_err("list clones", dir))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let parsed = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|raw| {
                    serde_json::from_slice::<CloneRecord>(&raw).map_err(|e| e.to_string())
                });
            match parsed {
                Ok(r) => out.push(r),
                Err(cause) => {
                    tracing::error!(path = %path.display(), %cause, "unreadable clone record skipped")
                }
            }
        }
        out.sort_by(|a, b| {
            a.created
                .cmp(&b.created)
                .then(a.clone.name.cmp(&b.clone.name))
        });
        Ok(out)
    }
}

impl Controller {
    /// Clones of storage snapshots by source, and how many sessions use them
    /// (from the clone records; a failure to read them counts none).
    pub async fn clone_counts(&self) -> Vec<(String, u64, u64)> {
        let records = match self.inner.clones.load_all().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(cause = %e, "could not read clone records for metrics");
                Vec::new()
            }
        };
        let mut by_source: std::collections::BTreeMap<String, (u64, u64)> = self
            .inner
            .snapshots
            .all()
            .into_iter()
            .map(|(name, _)| (name, (0, 0)))
            .collect();
        for r in records {
            let entry = by_source.entry(r.source).or_default();
            entry.0 += 1;
            entry.1 += r.users.len() as u64;
        }
        by_source
            .into_iter()
            .map(|(source, (clones, users))| (source, clones, users))
            .collect()
    }
}

/// Runs file I/O `f` on `path` on a blocking thread.
async fn blocking(
    path: &Path,
    action: &'static str,
    f: impl FnOnce(&Path) -> std::io::Result<()> + Send + 'static,
) -> Result<(), ControllerError> {
    let owned = path.to_path_buf();
    tokio::task::spawn_blocking(move || f(&owned))
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(state_err(action, path))
}

/// Whether session `id` is known and not finished.
fn live(inner: &Inner, id: &str) -> bool {
    inner
        .sessions
        .get(id)
        .is_some_and(|h| !h.value().snapshot().state.is_terminal())
}

fn snap_err(e: crate::snapshots::SnapshotError) -> ControllerError {
    ControllerError::Snapshot(e)
}

async fn test_pause(point: &str) {
    let Ok(value) = std::env::var(TEST_PAUSE_ENV) else {
        return;
    };
    let Some((at, marker)) = value.split_once(':') else {
        return;
    };
    if at != point || Path::new(marker).exists() {
        return;
    }
    let write = (marker.to_string(), point.to_string());
    let written = tokio::task::spawn_blocking(move || std::fs::write(&write.0, &write.1)).await;
    if let Err(e) = written.map_err(std::io::Error::other).and_then(|r| r) {
        warn!(marker, cause = %e, "test hook: cannot write marker");
        return;
    }
    warn!(
        point,
        "test hook: clone creation paused until revive is killed"
    );
    std::future::pending::<()>().await;
}

/// What [`acquire`] needs to know about the session's snapshot.
pub(super) struct Wanted<'a> {
    /// Configured source name.
    pub source: &'a str,
    /// Its provider.
    pub provider: &'a Arc<dyn SnapshotProvider>,
    /// The snapshot.
    pub snapshot: &'a Snapshot,
    /// The session's VM in it.
    pub vm: &'a SnapshotVm,
    /// Hosts allowed to see the clone.
    pub clients: &'a [IpAddr],
}

/// The clone `session` runs from, made or shared by the sharing rule, and
/// presented to `clients`. Idempotent: a resumed step finds its clone.
pub(super) async fn acquire(
    inner: &Inner,
    session: &Session,
    want: Wanted<'_>,
) -> Result<(CloneRecord, Presentation), ControllerError> {
    let book = &inner.clones;
    let _guard = book.lock.lock().await;
    let records = book.load_all().await?;
    let same_snapshot =
        |r: &CloneRecord| r.source == want.source && r.clone.snapshot == want.snapshot.id;
    let mine = records
        .iter()
        .find(|r| r.users.iter().any(|u| u.session == session.id))
        .cloned();
    let shared = records
        .iter()
        .find(|r| {
            same_snapshot(r)
                && r.state == CloneState::Ready
                && !r.users.iter().any(|u| {
                    u.vm == session.vm && u.session != session.id && live(inner, &u.session)
                })
        })
        .cloned();
    let mut record = match (mine, shared) {
        (Some(r), _) if r.state == CloneState::Ready => r,
        (None, Some(mut r)) => {
            r.users.push(CloneUser {
                session: session.id.clone(),
                vm: session.vm.clone(),
            });
            book.save(&r).await?;
            info!(session = %session.id, clone = %r.clone.name, users = r.users.len(), "sharing the snapshot's clone");
            r
        }
        (mine, _) => {
            // A record of ours still creating is a crash's leftover the
            // sweep missed: make it again under the same name.
            let mut clone = want
                .provider
                .plan_clone(&want.snapshot.id, &clone_name(&session.id));
            // revive's protection of the snapshot passes to every clone of
            // it, so whichever goes last unprotects it.
            clone.protected_snapshot = records
                .iter()
                .any(|r| same_snapshot(r) && r.clone.protected_snapshot);
            let mut record = CloneRecord {
                source: want.source.to_string(),
                clone,
                state: CloneState::Creating,
                users: vec![CloneUser {
                    session: session.id.clone(),
                    vm: session.vm.clone(),
                }],
                presentation: None,
                created: mine.map_or_else(Utc::now, |m| m.created),
            };
            book.save(&record).await?;
            test_pause("recorded").await;
            match want.provider.create_clone(&record.clone).await {
                Ok(made) => record.clone.protected_snapshot |= made.protected_snapshot,
                Err(e) => {
                    // Nothing half-made stays behind a failed creation.
                    if let Err(cleanup) = want.provider.destroy(&record.clone).await {
                        warn!(clone = %record.clone.name, cause = %cleanup, "could not remove a failed clone; the next start retries");
                        record.state = CloneState::Deleting;
                        record.users.clear();
                        book.save(&record).await?;
                    } else {
                        book.remove(&record.clone.name).await?;
                    }
                    return Err(snap_err(e));
                }
            }
            test_pause("cloned").await;
            record.state = CloneState::Ready;
            book.save(&record).await?;
            info!(session = %session.id, clone = %record.clone.name, snapshot = %record.clone.snapshot, "clone made");
            record
        }
    };
    let presentation = want
        .provider
        .present(&record.clone, want.vm, want.clients)
        .await
        .map_err(snap_err)?;
    if record.presentation.as_ref() != Some(&presentation) {
        record.presentation = Some(presentation.clone());
        book.save(&record).await?;
    }
    Ok((record, presentation))
}

/// Unpresents and destroys a clone, then forgets it.
async fn destroy(inner: &Inner, mut record: CloneRecord) -> Result<(), ControllerError> {
    let provider = inner.snapshots.get(&record.source).map_err(snap_err)?;
    if record.state != CloneState::Deleting {
        record.state = CloneState::Deleting;
        inner.clones.save(&record).await?;
    }
    provider.unpresent(&record.clone).await.map_err(snap_err)?;
    provider.destroy(&record.clone).await.map_err(snap_err)?;
    inner.clones.remove(&record.clone.name).await?;
    info!(clone = %record.clone.name, source = %record.source, "clone destroyed");
    Ok(())
}

/// Session `session` stops using its clone; the clone goes with its last user.
pub(super) async fn release(inner: &Inner, session: &Session) -> Result<(), ControllerError> {
    let _guard = inner.clones.lock.lock().await;
    for mut record in inner.clones.load_all().await? {
        if !record.users.iter().any(|u| u.session == session.id) {
            continue;
        }
        record
            .users
            .retain(|u| u.session != session.id && live(inner, &u.session));
        if record.users.is_empty() {
            destroy(inner, record).await?;
        } else {
            inner.clones.save(&record).await?;
            info!(session = %session.id, clone = %record.clone.name, users = record.users.len(), "clone kept for its other sessions");
        }
    }
    Ok(())
}

/// At start, before any session resumes: destroys clones half made or half
/// destroyed by a crash and clones no live session uses; reports clones on
/// the storage that no record names. Failures are logged and retried at
/// the next start (or when a session releases the clone).
pub(super) async fn sweep(inner: &Inner) -> Result<(), ControllerError> {
    let _guard = inner.clones.lock.lock().await;
    let records = inner.clones.load_all().await?;
    for mut record in records.clone() {
        let before = record.users.len();
        record.users.retain(|u| live(inner, &u.session));
        let name = record.clone.name.clone();
        let outcome = if record.state != CloneState::Ready || record.users.is_empty() {
            info!(clone = %name, state = ?record.state, users = record.users.len(), "sweeping clone");
            destroy(inner, record).await
        } else if record.users.len() != before {
            inner.clones.save(&record).await
        } else {
            Ok(())
        };
        if let Err(e) = outcome {
            warn!(clone = %name, cause = %e, "could not sweep clone; retried at the next start");
        }
    }
    for (source, provider) in inner.snapshots.all() {
        match provider.clones().await {
            Ok(names) => {
                let unknown: Vec<String> = names
                    .into_iter()
                    .filter(|n| {
                        !records
                            .iter()
                            .any(|r| r.source == source && &r.clone.name == n)
                    })
                    .collect();
                if !unknown.is_empty() {
                    warn!(%source, clones = ?unknown, "clones on the storage that this revive did not record; remove them by hand if no other revive uses this storage");
                }
            }
            Err(e) => warn!(%source, cause = %e, "could not list clones"),
        }
    }
    Ok(())
}
