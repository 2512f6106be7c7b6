//! `revive points --source snap:NAME`: the snapshots a storage system keeps,
//! with the VMs in them, listed beside the repository's restore points.
//! Each can be recovered with `revive recover --point snap:NAME/SNAPSHOT`.

use std::path::PathBuf;

use anyhow::Context;
use revive::snapshots::{SnapshotSources, SnapshotSpec, POINT_PREFIX};
use serde_json::json;

use super::serve::load_config;
use super::Outcome;

/// Lists the snapshots of source `source` (`snap:NAME`), those holding `vm` only if given.
pub async fn points(
    config: Option<&PathBuf>,
    source: &str,
    vm: Option<&str>,
    json: bool,
) -> anyhow::Result<Outcome> {
    let name = source
        .strip_prefix(POINT_PREFIX)
        .filter(|n| !n.is_empty() && !n.contains('/'))
        .with_context(|| {
            format!("--source '{source}': write repo (the default) or snap:NAME of a [[snapshot_source]]")
        })?;
    let config = load_config(config)?;
    let sources = SnapshotSources::build(&config.snapshot_sources, None);
    let provider = sources.get(name)?;
    let volumes = provider
        .volumes()
        .await
        .with_context(|| format!("list the snapshots of source '{name}'"))?;
    let rows: Vec<_> = volumes
        .iter()
        .flat_map(|v| v.snapshots.iter())
        .filter(|s| vm.is_none_or(|vm| s.vms.iter().any(|v| v.name == vm)))
        .collect();
    if json {
        let out: Vec<_> = rows
            .iter()
            .map(|s| {
                json!({
                    "point": SnapshotSpec { source: name.to_string(), snapshot: s.id.clone() }.to_string(),
                    "source": name,
                    "kind": provider.kind(),
                    "snapshot": s.id,
                    "volume": s.volume,
                    "created": s.created,
                    "vms": s.vms,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(Outcome::Ok);
    }
    println!("{:<40}  {:<20}  {:<20}  VMS", "POINT", "VOLUME", "CREATED");
    for s in rows {
        let point = SnapshotSpec {
            source: name.to_string(),
            snapshot: s.id.clone(),
        };
        let vms: Vec<&str> = s.vms.iter().map(|v| v.name.as_str()).collect();
        println!(
            "{:<40}  {:<20}  {:<20}  {}",
            point.to_string(),
            s.volume,
            s.created.as_deref().unwrap_or("-"),
            if vms.is_empty() {
                "-".to_string()
            } else {
                vms.join(", ")
            }
        );
    }
    Ok(Outcome::Ok)
}
