//! The repository commands: init, backup, points, restore, verify, forget, gc.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use revive::repo::{
    self, BackupOptions, GcOptions, OpenOptions, PointKind, ProblemKind, Repository, RestorePoint,
};
use revive::store::StoreLocation;
use serde_json::json;

use super::progress::Bar;
use super::Outcome;

/// Opens the repository without the chunk cache: one-shot commands (verify
/// above all) must see what the store holds.
async fn open(location: &StoreLocation) -> anyhow::Result<Repository> {
    Ok(Repository::open_at(location, &OpenOptions::default()).await?)
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Formats a byte count for people.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

pub async fn init(location: &StoreLocation, chunk_size: u64) -> anyhow::Result<Outcome> {
    let chunk_size = repo::check_chunk_size(chunk_size)?;
    if let StoreLocation::Local(dir) = location {
        if dir.join("config.json").exists() {
            bail!("a revive repository already exists at '{}'", dir.display());
        }
        if let Ok(mut entries) = std::fs::read_dir(dir) {
            if entries.next().is_some() {
                bail!(
                    "folder '{}' is not empty; a repository needs a folder of its own",
                    dir.display()
                );
            }
        }
    }
    let store = location.open()?;
    let repo = Repository::init(store, chunk_size).await?;
    println!(
        "initialized repository {} at '{}' (chunk size {})",
        repo.config().id,
        location.describe(),
        human(chunk_size as u64)
    );
    Ok(Outcome::Ok)
}

/// Files, folders and symlinks of a point, as JSON.
fn counts_json(point: &RestorePoint) -> serde_json::Value {
    let c = point.counts();
    json!({ "files": c.files, "folders": c.folders, "symlinks": c.symlinks })
}

pub async fn backup(
    location: &StoreLocation,
    name: Option<String>,
    tree: bool,
    json: bool,
    path: &Path,
) -> anyhow::Result<Outcome> {
    let repo = open(location).await?;
    let bar = Bar::bytes("backup");
    let options = BackupOptions { vm: name, tree };
    let point = repo::backup(&repo, path, &options, &bar)
        .await
        .with_context(|| format!("back up '{}'", path.display()))?;
    bar.finish();
    if json {
        let s = &point.stats;
        print_json(&json!({
            "id": point.id,
            "vm": point.vm,
            "kind": point.kind.as_str(),
            "entries": point.entry_count(),
            "counts": counts_json(&point),
            "parent": point.parent,
            "created": point.created,
            "logical_size": point.logical_size(),
            "bytes_read": s.bytes_read,
            "bytes_new": s.bytes_new,
            "bytes_stored": s.bytes_stored,
            "chunks_new": s.chunks_new,
            "chunks_reused": s.chunks_reused,
            "chunks_zero": s.chunks_zero,
            "pages_new": s.pages_new,
            "seconds": s.seconds,
        }))?;
    } else {
        println!("{}", point.id);
    }
    Ok(Outcome::Ok)
}

pub async fn points(
    location: &StoreLocation,
    vm: Option<&str>,
    json: bool,
) -> anyhow::Result<Outcome> {
    let repo = open(location).await?;
    let points: Vec<_> = repo
        .points()
        .await?
        .into_iter()
        .filter(|p| vm.is_none_or(|vm| p.vm == vm))
        .collect();
    let mut boots = Vec::with_capacity(points.len());
    for p in &points {
        boots.push(repo.boot_record(&p.id).await?);
    }
    if json {
        let rows: Vec<_> = points
            .iter()
            .zip(&boots)
            .map(|(p, boot)| {
                // A tree's entries (thousands) are not listed here: counts only.
                json!({
                    "id": p.id,
                    "vm": p.vm,
                    "kind": p.kind.as_str(),
                    "created": p.created,
                    "parent": p.parent,
                    "logical_size": p.logical_size(),
                    "bytes_new": p.stats.bytes_new,
                    "bytes_stored": p.stats.bytes_stored,
                    "entries": p.entry_count(),
                    "counts": counts_json(p),
                    "verified_boot": boot_text(boot.as_ref()),
                    "boot": boot,
                    "files": p.files.iter().map(|f| json!({
                        "name": f.name, "kind": f.kind, "size": f.size,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        print_json(&rows)?;
        return Ok(Outcome::Ok);
    }
    println!(
        "{:<16}  {:<16}  {:<4}  {:<20}  {:<16}  {:>7}  {:>10}  {:>10}  {:<6}",
        "ID", "NAME", "KIND", "CREATED", "PARENT", "ENTRIES", "SIZE", "NEW", "BOOT"
    );
    for (p, boot) in points.iter().zip(&boots) {
        println!(
            "{:<16}  {:<16}  {:<4}  {:<20}  {:<16}  {:>7}  {:>10}  {:>10}  {:<6}",
            p.id,
            p.vm,
            p.kind.as_str(),
            p.created.format("%Y-%m-%d %H:%M:%S"),
            p.parent.as_deref().unwrap_or("-"),
            p.entry_count(),
            human(p.logical_size()),
            human(p.stats.bytes_new),
            boot_text(boot.as_ref())
        );
    }
    Ok(Outcome::Ok)
}

/// The verified-boot column: ok, failed, or never.
fn boot_text(boot: Option<&revive::repo::BootRecord>) -> &'static str {
    boot.map_or("never", |b| b.verdict.as_str())
}

pub async fn restore(location: &StoreLocation, spec: &str, dest: &Path) -> anyhow::Result<Outcome> {
    let repo = open(location).await?;
    let point = repo.resolve(spec).await?;
    let bar = Bar::bytes("restore");
    repo.restore(&point, dest, &bar)
        .await
        .with_context(|| format!("restore {} to '{}'", point.id, dest.display()))?;
    bar.finish();
    let what = match point.kind {
        PointKind::Vm => format!("{} files", point.files.len()),
        PointKind::Tree => {
            let c = point.counts();
            format!(
                "{} files, {} folders, {} symlinks",
                c.files, c.folders, c.symlinks
            )
        }
    };
    println!(
        "restored {} ({what}, {}) to '{}'",
        point.id,
        human(point.logical_size()),
        dest.display()
    );
    Ok(Outcome::Ok)
}

pub async fn verify(
    location: &StoreLocation,
    spec: Option<&str>,
    json: bool,
) -> anyhow::Result<Outcome> {
    let repo = open(location).await?;
    let points = match spec {
        Some(spec) => vec![repo.resolve(spec).await?],
        None => repo.points().await?,
    };
    let bar = Bar::items("verify");
    let report = repo.verify(&points, &bar).await?;
    bar.finish();
    if json {
        print_json(&report)?;
    } else {
        for p in &report.problems {
            let what = match &p.problem {
                ProblemKind::Missing => "missing".to_string(),
                ProblemKind::Corrupt(reason) => format!("corrupt ({reason})"),
            };
            println!(
                "{what}: {} used by restore points {}",
                p.object,
                p.points.join(", ")
            );
        }
        println!(
            "verified {} restore points, {} chunks, {}: {}",
            report.points,
            report.chunks_checked,
            human(report.bytes_checked),
            if report.is_ok() {
                "ok".to_string()
            } else {
                format!("{} damaged objects", report.problems.len())
            }
        );
    }
    Ok(if report.is_ok() {
        Outcome::Ok
    } else {
        Outcome::Damaged
    })
}

pub async fn forget(location: &StoreLocation, spec: &str) -> anyhow::Result<Outcome> {
    let repo = open(location).await?;
    let point = repo.resolve(spec).await?;
    repo.forget(&point.id).await?;
    println!(
        "forgot {} ({}); run `revive gc` to free its space",
        point.id, point.vm
    );
    Ok(Outcome::Ok)
}

pub async fn gc(
    location: &StoreLocation,
    json: bool,
    grace: Option<Duration>,
) -> anyhow::Result<Outcome> {
    let repo = open(location).await?;
    let report = repo.gc_with(&GcOptions { grace }).await?;
    if json {
        print_json(&report)?;
    } else {
        println!(
            "gc: kept {} chunks, removed {} chunks and {} index pages, freed {}",
            report.chunks_kept,
            report.chunks_removed,
            report.pages_removed,
            human(report.bytes_freed)
        );
        if report.young_kept > 0 {
            println!(
                "gc: kept {} unreferenced objects younger than the grace period ({} s)",
                report.young_kept, report.grace_seconds
            );
        }
    }
    Ok(Outcome::Ok)
}
