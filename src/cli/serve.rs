//! `revive serve`: the NFSv3 datastore as a long-running service.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use revive::config::Config;
use revive::datastore::Datastore;
use revive::nfs::{NfsListeners, NfsServer};
use revive::repo::Repository;
use serde_json::json;
use tracing::info;

use super::Outcome;

/// Loads the configuration named by `--config`/`$REVIVE_CONFIG`, or the defaults.
pub fn load_config(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Ok(Config::load(p)?),
        None => {
            tracing::debug!("no config file given: using defaults");
            Ok(Config::default())
        }
    }
}

pub async fn serve(config_path: Option<PathBuf>, repo: Option<PathBuf>) -> anyhow::Result<Outcome> {
    let config = load_config(config_path.as_ref())?;
    // Take SIGTERM/SIGINT before anything else: a signal that arrives after
    // the ports line but before the server first polls its shutdown future
    // would otherwise kill the process uncleanly.
    let shutdown = shutdown_signal().context("install signal handlers")?;
    let repo_dir = repo
        .or_else(|| config.repository.path.clone())
        .context("no repository given: pass --repo DIR or set [repository] path")?;
    let repo = Repository::open_local(&repo_dir).await?;
    let datastore = Arc::new(
        Datastore::open(repo, config.datastore_config())
            .await
            .with_context(|| {
                format!(
                    "open datastore state '{}'",
                    config.datastore.state_dir.display()
                )
            })?,
    );
    let default_export = datastore
        .exports()
        .first()
        .map(|e| e.path.clone())
        .context("no export configured")?;
    for p in &config.publications {
        let export = p.export.clone().unwrap_or_else(|| default_export.clone());
        let existing = datastore.publications(&export).await?;
        if existing.iter().any(|(name, _)| name == &p.name) {
            continue;
        }
        datastore
            .publish(&export, &p.name, &p.point, p.cache.clone())
            .await
            .with_context(|| format!("publish '{}' ({}) in export '{export}'", p.name, p.point))?;
    }
    let bind = config.nfs_bind();
    let listeners = NfsListeners::bind(&bind)
        .await
        .with_context(|| format!("bind NFS ports on {} ({:?})", bind.addr, bind))?;
    let ports = listeners.ports()?;
    // One JSON line on stdout: scripts and tests learn the ports (port 0 = any).
    let mut out = std::io::stdout();
    writeln!(
        out,
        "{}",
        json!({
            "nfs_port": ports.nfs,
            "mount_port": ports.mount,
            "portmap_port": ports.portmap_tcp,
            "exports": datastore.exports().iter().map(|e| e.path.clone()).collect::<Vec<_>>(),
        })
    )?;
    out.flush()?;
    let server = NfsServer::new(datastore.clone());
    server.serve(listeners, shutdown).await?;
    datastore
        .flush_all()
        .await
        .context("flush the write caches at stop")?;
    info!("revive stopped");
    Ok(Outcome::Ok)
}

/// Installs the SIGINT and SIGTERM handlers now; the future completes on either.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        info!("shutdown requested");
    })
}
