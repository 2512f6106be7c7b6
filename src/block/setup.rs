//! Creating block exports: finds the presented file of a publication (its
//! only disk unless one is named), opens its [`FileDevice`] and adds it to
//! the [`BlockExports`]. Used for `[[block_export]]`s at start and on SIGHUP,
//! and by block recovery sessions.

use std::net::IpAddr;
use std::sync::Arc;

use super::config::{BlockExportConfig, BlockProtocolConfig};
use super::file::FileDevice;
use super::registry::{BlockExport, BlockExports, RegistryError};
use crate::datastore::{Datastore, DatastoreError, FileAt, FileKind, FileOps};

/// What creating a block export can fail with.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The configuration or request does not name one file to serve.
    #[error("create block export '{name}' - {reason}")]
    Invalid {
        /// Export name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// The datastore failed (publication missing, state folder, backup).
    #[error("create block export '{name}' - {action}: {source}")]
    Datastore {
        /// Export name.
        name: String,
        /// What was being done.
        action: String,
        /// The datastore's error.
        #[source]
        source: DatastoreError,
    },
    /// The name is taken.
    #[error(transparent)]
    Registry(#[from] RegistryError),
}

/// One file of a publication to export.
#[derive(Debug, Clone)]
pub struct ExportRequest<'a> {
    /// Export name.
    pub name: &'a str,
    /// NFS export path holding the publication.
    pub nfs_export: &'a str,
    /// Publication (folder) name.
    pub publication: &'a str,
    /// File to serve; `None`: the publication's only disk.
    pub file: Option<&'a str>,
    /// Client addresses allowed.
    pub allowed_clients: Vec<IpAddr>,
    /// Refuse writes.
    pub read_only: bool,
    /// Protocol serving it, with its settings for the export.
    pub protocol: BlockProtocolConfig,
}

/// The disk files (flat extents, images) of a publication's restore point.
///
/// # Errors
/// The publication or its restore point cannot be found.
pub async fn disks_of(
    ds: &Datastore,
    nfs_export: &str,
    publication: &str,
) -> Result<Vec<String>, DatastoreError> {
    let point = ds
        .publications(nfs_export)
        .await?
        .into_iter()
        .find(|(name, _)| name == publication)
        .map(|(_, point)| point)
        .ok_or(DatastoreError::NotFound)?;
    let point = ds.repo().point(&point).await.map_err(|e| {
        DatastoreError::Io(std::io::Error::other(format!(
            "read restore point '{point}': {e}"
        )))
    })?;
    Ok(point
        .files
        .iter()
        .filter(|f| f.kind.is_disk())
        .map(|f| f.name.clone())
        .collect())
}

/// Picks the file to serve: `wanted`, or the only disk among `disks`.
///
/// # Errors
/// A description of the problem, naming the disks to choose from.
pub fn choose_disk(disks: &[String], wanted: Option<&str>) -> Result<String, String> {
    match (wanted, disks) {
        (Some(w), _) => Ok(w.to_string()),
        (None, [one]) => Ok(one.clone()),
        (None, []) => Err("the restore point has no disk; name a file".into()),
        (None, many) => Err(format!(
            "the restore point has several disks ({}); name one",
            many.join(", ")
        )),
    }
}

/// Creates the block export `req` asks for.
///
/// # Errors
/// `Invalid` when the file is missing or ambiguous, `Datastore` when the
/// publication cannot be read, `Registry` when the name is taken.
pub async fn export_file(
    ds: &Arc<Datastore>,
    registry: &BlockExports,
    req: &ExportRequest<'_>,
) -> Result<Arc<BlockExport>, SetupError> {
    let ds_err = |action: &str| {
        let name = req.name.to_string();
        let action = format!("{action} of publication '{}'", req.publication);
        move |source| SetupError::Datastore {
            name,
            action,
            source,
        }
    };
    if registry.contains(req.name) {
        return Err(RegistryError::NameTaken(req.name.to_string()).into());
    }
    let file = match req.file {
        Some(f) => f.to_string(),
        None => {
            let disks = disks_of(ds, req.nfs_export, req.publication)
                .await
                .map_err(ds_err("list the disks"))?;
            choose_disk(&disks, None).map_err(|reason| SetupError::Invalid {
                name: req.name.to_string(),
                reason,
            })?
        }
    };
    let (export, folder) = ds
        .publication_folder(req.nfs_export, req.publication)
        .await
        .map_err(ds_err("find the folder"))?;
    // A name the folder cannot hold (a path, `..`) is simply not there.
    let plain = !file.is_empty() && !file.contains(['/', '\0']) && file != "." && file != "..";
    let found = if plain {
        match ds.lookup(&FileAt::new(export, folder).child(&file)).await {
            Ok(attr) if attr.kind == FileKind::Regular => Some(attr.fileid),
            Ok(_) | Err(DatastoreError::NotFound) => None,
            Err(e) => return Err(ds_err("look up the file")(e)),
        }
    } else {
        None
    };
    let Some(found) = found else {
        let files = ds
            .publication_files(req.nfs_export, req.publication)
            .await
            .map_err(ds_err("list the files"))?;
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        return Err(SetupError::Invalid {
            name: req.name.to_string(),
            reason: format!(
                "publication '{}' has no file '{file}' (it has: {})",
                req.publication,
                names.join(", ")
            ),
        });
    };
    let ops: Arc<dyn FileOps> = ds.clone();
    let device = FileDevice::open(ops, FileAt::new(export, found), req.name, req.read_only)
        .await
        .map_err(ds_err("open the file"))?;
    Ok(registry.add(
        BlockExport::new(
            req.name,
            req.protocol.protocol(),
            Arc::new(device),
            req.allowed_clients.clone(),
        )
        .with_settings(req.protocol.clone()),
    )?)
}

/// Creates the configured block exports that are not served yet, publishing
/// a `point` as folder `name` of the NFS export when it is not published.
///
/// # Errors
/// The first export that cannot be created.
pub async fn export_configured(
    ds: &Arc<Datastore>,
    registry: &BlockExports,
    configs: &[BlockExportConfig],
    default_nfs_export: &str,
) -> Result<(), SetupError> {
    for c in configs {
        if registry.contains(&c.name) {
            continue;
        }
        let nfs_export = c.export.as_deref().unwrap_or(default_nfs_export);
        let invalid = |reason: &str| SetupError::Invalid {
            name: c.name.clone(),
            reason: reason.to_string(),
        };
        let publication = match (&c.point, &c.publication) {
            (Some(point), None) => {
                let published =
                    ds.publications(nfs_export)
                        .await
                        .map_err(|source| SetupError::Datastore {
                            name: c.name.clone(),
                            action: format!("list the publications of '{nfs_export}'"),
                            source,
                        })?;
                if !published.iter().any(|(name, _)| *name == c.name) {
                    ds.publish(nfs_export, &c.name, point, None)
                        .await
                        .map_err(|source| SetupError::Datastore {
                            name: c.name.clone(),
                            action: format!("publish restore point '{point}'"),
                            source,
                        })?;
                }
                c.name.as_str()
            }
            (None, Some(publication)) => publication.as_str(),
            _ => return Err(invalid("give exactly one of point and publication")),
        };
        export_file(
            ds,
            registry,
            &ExportRequest {
                name: &c.name,
                nfs_export,
                publication,
                file: c.file.as_deref(),
                allowed_clients: c.allowed_clients.clone(),
                read_only: c.read_only,
                protocol: c.protocol.clone(),
            },
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_only_disk_is_chosen_else_one_must_be_named() {
        let one = vec!["a-flat.vmdk".to_string()];
        assert_eq!(choose_disk(&one, None).unwrap(), "a-flat.vmdk");
        assert_eq!(choose_disk(&one, Some("x.img")).unwrap(), "x.img");
        assert!(choose_disk(&[], None).unwrap_err().contains("no disk"));
        let two = vec!["a.img".to_string(), "b.img".to_string()];
        assert!(choose_disk(&two, None)
            .unwrap_err()
            .contains("a.img, b.img"));
    }
}
