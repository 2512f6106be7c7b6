//! The write cache folder of each publication, and what happens when it is
//! not there.
//!
//! A publication's folder is made at publish time with a marker file in it
//! (`.revive-write-cache`). From then on the folder holds everything
//! clients wrote, so a folder or marker that is missing (production storage
//! not mounted yet, an empty mount point) must never be replaced by an
//! empty cache: the guest's writes would vanish and files clients created
//! would read as empty. Instead every call that needs the cache is answered
//! "try again later" (`Jukebox`, NFS3ERR_JUKEBOX), with an error in the log
//! once per outage and a gauge in `/metrics`; the session controller puts
//! the session in `waiting`. It serves again as soon as the folder is back.
//! Only [`Datastore::discard_cache`] (`revive discard-cache`) starts over
//! with an empty cache.

use std::fs;
use std::path::{Path, PathBuf};

use tracing::{error, info, warn};

use super::namespace::Publication;
use super::{Datastore, DatastoreError, DsResult, ExportState};

/// Name of the marker file in every publication's write cache folder.
pub const CACHE_MARKER: &str = ".revive-write-cache";

/// Makes `dir` and its marker (durably), keeping whatever is in it.
fn mark(dir: &Path, publication: &str) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let text = format!("write cache of revive publication '{publication}'\n");
    crate::fsutil::write_atomic(&dir.join(CACHE_MARKER), text.as_bytes())
}

/// Why a marked publication's cache cannot be used now, if it cannot.
fn missing_reason(dir: &Path) -> Option<String> {
    if !dir.is_dir() {
        return Some(format!(
            "write cache folder '{}' is missing (storage not mounted?)",
            dir.display()
        ));
    }
    if !dir.join(CACHE_MARKER).is_file() {
        return Some(format!(
            "write cache folder '{}' has no {CACHE_MARKER} marker (an empty mount point?)",
            dir.display()
        ));
    }
    None
}

/// Runs blocking folder work off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> DsResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| DatastoreError::Io(std::io::Error::other(e)))?
        .map_err(DatastoreError::Io)
}

impl Datastore {
    /// Makes a new publication's cache folder and marker; returns the
    /// folder. Called by `publish` before the publication exists.
    pub(super) async fn prepare_cache_dir(&self, dir: PathBuf, publication: &str) -> DsResult<()> {
        let name = publication.to_string();
        let d = dir.clone();
        blocking(move || mark(&d, &name)).await.map_err(|e| {
            error!(cache = %dir.display(), publication, cause = %e, "cannot make the write cache folder");
            e
        })
    }

    /// At start: adopts the cache folders of publications made by an older
    /// revive (which had no marker), and logs every publication whose cache
    /// is missing.
    pub(super) async fn check_cache_dirs(&self) -> DsResult<()> {
        for export in self.exports.values() {
            let mut ns = export.ns.write().await;
            let legacy: Vec<Publication> = ns
                .publications()
                .filter(|p| !p.cache_marked)
                .cloned()
                .collect();
            for p in &legacy {
                if !p.cache_dir.is_dir() {
                    // An older revive made it on first use: nothing tells
                    // a folder never made from one lost.
                    warn!(publication = %p.name, cache = %p.cache_dir.display(), "write cache folder of an older publication not found; starting an empty one");
                }
                let (dir, name) = (p.cache_dir.clone(), p.name.clone());
                blocking(move || mark(&dir, &name)).await?;
                let mut adopted = p.clone();
                adopted.cache_marked = true;
                ns.add_publication(adopted);
            }
            if !legacy.is_empty() {
                ns.commit().await?.wait().await?;
            }
            for p in ns.publications() {
                if let Some(reason) = missing_reason(&p.cache_dir) {
                    self.report_missing(export, &p.name, &reason);
                }
            }
        }
        Ok(())
    }

    /// Logs (once per outage) that a publication's cache is missing.
    fn report_missing(&self, export: &ExportState, publication: &str, reason: &str) {
        if export.missing.insert(publication.to_string(), ()).is_none() {
            error!(export = %export.info.path, publication, cause = reason, "write cache missing: the publication's files are refused (clients told to retry) until it is back, or `revive discard-cache` starts an empty one");
        }
    }

    /// Fails with `Jukebox` while a marked publication's cache folder is
    /// missing; logs when it comes back.
    pub(super) async fn check_cache_dir(
        &self,
        export: &ExportState,
        publication: &Publication,
    ) -> DsResult<()> {
        if !publication.cache_marked {
            return Ok(());
        }
        let dir = publication.cache_dir.clone();
        match blocking(move || Ok(missing_reason(&dir))).await? {
            Some(reason) => {
                self.report_missing(export, &publication.name, &reason);
                Err(DatastoreError::Jukebox)
            }
            None => {
                if export.missing.remove(&publication.name).is_some() {
                    info!(export = %export.info.path, publication = %publication.name, "write cache is back");
                }
                Ok(())
            }
        }
    }

    /// Why publication `name`'s write cache cannot be used now, if it
    /// cannot (for the session controller).
    pub async fn cache_missing(&self, export_path: &str, name: &str) -> DsResult<Option<String>> {
        let (export, _) = self.publication_folder(export_path, name).await?;
        let state = self.state(export)?;
        let publication = state
            .ns
            .read()
            .await
            .publication(name)
            .cloned()
            .ok_or(DatastoreError::NotFound)?;
        if !publication.cache_marked {
            return Ok(None);
        }
        let dir = publication.cache_dir.clone();
        let reason = blocking(move || Ok(missing_reason(&dir))).await?;
        if let Some(r) = &reason {
            self.report_missing(state, name, r);
        }
        Ok(reason)
    }

    /// Every publication with whether its write cache is missing, by
    /// export path (for `/metrics`).
    pub async fn cache_states(&self) -> Vec<(String, String, bool)> {
        let mut out = Vec::new();
        for state in self.exports.values() {
            let export = &state.info;
            let pubs: Vec<Publication> = state.ns.read().await.publications().cloned().collect();
            for p in pubs {
                let missing = p.cache_marked && {
                    let dir = p.cache_dir.clone();
                    blocking(move || Ok(missing_reason(&dir)))
                        .await
                        .map_or(true, |r| r.is_some())
                };
                out.push((export.path.clone(), p.name.clone(), missing));
            }
        }
        out
    }

    /// Starts publication `name` over with an empty write cache: everything
    /// clients wrote in it is dropped (files they created read as empty,
    /// presented files as the backup). The one way to serve a publication
    /// whose cache is gone for good; `revive discard-cache` asks for it.
    pub async fn discard_cache(&self, export_path: &str, name: &str) -> DsResult<()> {
        let (export, folder) = self.publication_folder(export_path, name).await?;
        let state = self.state(export)?;
        let mut ns = state.ns.write().await;
        let mut publication = ns
            .publication(name)
            .cloned()
            .ok_or(DatastoreError::NotFound)?;
        // Forget every open cache and file state of the publication.
        state.sessions.remove(&Some(name.to_string()));
        for id in ns.subtree(folder) {
            state.files.remove(&id);
        }
        let (dir, owner) = (publication.cache_dir.clone(), name.to_string());
        blocking(move || {
            mark(&dir, &owner)?;
            // Only the write cache's own files go: the folder may hold
            // anything else its owner keeps there.
            for entry in fs::read_dir(&dir)? {
                let path = entry?.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                let cache_file = [".map", ".data", ".journal", ".map.tmp"]
                    .iter()
                    .any(|ext| name.ends_with(ext));
                if cache_file {
                    fs::remove_file(&path)?;
                }
            }
            Ok(())
        })
        .await?;
        publication.cache_marked = true;
        ns.add_publication(publication.clone());
        let durable = ns.commit().await?;
        drop(ns);
        durable.wait().await?;
        state.missing.remove(name);
        warn!(export = %export_path, publication = %name, cache = %publication.cache_dir.display(), "write cache discarded: the publication starts over from its backup");
        Ok(())
    }
}
