//! `GET /api/v1/points`: the repository's restore points with what each
//! backup did (size, new bytes, stored bytes) and where each is published,
//! for the console's repository overview.

use std::collections::HashMap;

use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::ApiState;
use crate::datastore::FileOps;
use crate::repo::{BootRecord, RestorePoint};

/// The routes, relative to the API root.
pub(super) fn routes() -> Router<ApiState> {
    Router::new().route("/api/v1/points", get(list))
}

/// Where a restore point is presented now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publication {
    /// Export path.
    pub export: String,
    /// Folder name in the export (a session's name).
    pub name: String,
}

/// One restore point as the API lists it: the manifest without its index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointSummary {
    /// Full id.
    pub id: String,
    /// VM as backed up.
    pub vm: String,
    /// When the backup ran.
    pub created: DateTime<Utc>,
    /// The VM's previous restore point.
    pub parent: Option<String>,
    /// Sum of the files' logical sizes.
    pub size: u64,
    /// Number of files in the VM folder.
    pub files: usize,
    /// Disk bytes the backup read.
    pub bytes_read: u64,
    /// Plain bytes of chunks this backup stored for the first time.
    pub bytes_new: u64,
    /// Bytes this backup added to the store (after compression).
    pub bytes_stored: u64,
    /// How long the backup took.
    pub seconds: f64,
    /// Result of the last verification recorded for this point; `None`
    /// while the repository records none (`revive verify` reports to its
    /// caller only).
    pub verify: Option<String>,
    /// The last verification boot (`revive verify --boot`), if any.
    pub boot: Option<BootRecord>,
    /// Folders presenting this point now.
    pub published: Vec<Publication>,
}

impl PointSummary {
    fn of(p: &RestorePoint, published: Vec<Publication>) -> PointSummary {
        PointSummary {
            id: p.id.clone(),
            vm: p.vm.clone(),
            created: p.created,
            parent: p.parent.clone(),
            size: p.logical_size(),
            files: p.files.len(),
            bytes_read: p.stats.bytes_read,
            bytes_new: p.stats.bytes_new,
            bytes_stored: p.stats.bytes_stored,
            seconds: p.stats.seconds,
            verify: None,
            boot: None,
            published,
        }
    }
}

/// `?vm=NAME`: only that VM's points.
#[derive(Debug, Deserialize)]
struct Filter {
    vm: Option<String>,
}

async fn list(
    State(state): State<ApiState>,
    Query(filter): Query<Filter>,
) -> Result<Json<Vec<PointSummary>>, ApiError> {
    let points = state.datastore.repo().points().await?;
    let mut published: HashMap<String, Vec<Publication>> = HashMap::new();
    for export in state.datastore.exports() {
        // An export whose state cannot be read shows no publications rather
        // than failing the whole listing.
        for (name, point) in state
            .datastore
            .publications(&export.path)
            .await
            .unwrap_or_default()
        {
            published.entry(point).or_default().push(Publication {
                export: export.path.clone(),
                name,
            });
        }
    }
    let mut summaries = Vec::new();
    for p in points
        .iter()
        .filter(|p| filter.vm.as_ref().is_none_or(|vm| *vm == p.vm))
    {
        let mut summary = PointSummary::of(p, published.remove(&p.id).unwrap_or_default());
        summary.boot = state.datastore.repo().boot_record(&p.id).await?;
        summaries.push(summary);
    }
    Ok(Json(summaries))
}
