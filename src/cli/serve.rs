//! `revive serve`: the NFSv3 datastore as a long-running service.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use revive::api::ApiState;
use revive::block::iscsi::{ExportTargets, IscsiServer};
use revive::block::nbd::NbdServer;
use revive::block::{BlockExports, BlockProtocol};
use revive::config::Config;
use revive::controller::Controller;
use revive::datastore::passthrough::Passthrough;
use revive::datastore::router::Router;
use revive::datastore::Datastore;
use revive::datastore::FileOps;
use revive::nfs::{ConnLimits, NfsListeners, NfsServer};
use revive::repo::{OpenOptions, Repository};
use revive::snapshots::SnapshotSources;
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

/// Raises the soft limit on open files to the hard limit: a datastore
/// holds many files and connections, and the usual soft limit of 1024 (a
/// login shell, a unit without `LimitNOFILE`) is far below what the system
/// allows. Returns the soft limit now in force.
fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a valid rlimit; no other memory.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let before = limit.rlim_cur;
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                info!(
                    from = before,
                    to = limit.rlim_max,
                    "raised the open file limit"
                );
            } else {
                limit.rlim_cur = before;
                tracing::warn!(limit = before, cause = %std::io::Error::last_os_error(), "could not raise the open file limit");
            }
        }
    }
    limit.rlim_cur
}

/// The configured connection limits, with the total kept to half the open
/// file limit: the rest is for write caches, the repository and the state.
fn connection_limits(config: &Config, open_files: u64) -> ConnLimits {
    let mut limits = config.conn_limits();
    let room = usize::try_from(open_files / 2).unwrap_or(usize::MAX).max(1);
    if limits.max_connections > room {
        tracing::warn!(
            configured = limits.max_connections,
            allowed = room,
            open_file_limit = open_files,
            "[nfs] max_connections is more than half the open file limit; lowered"
        );
        limits.max_connections = room;
    }
    limits
}

pub async fn serve(config_path: Option<PathBuf>, repo: Option<String>) -> anyhow::Result<Outcome> {
    // First, before the write caches size their share of it.
    let open_files = raise_open_file_limit();
    let config = load_config(config_path.as_ref())?;
    // Take SIGTERM/SIGINT before anything else: a signal that arrives after
    // the ports line but before the server first polls its shutdown future
    // would otherwise kill the process uncleanly.
    let shutdown = shutdown_signal().context("install signal handlers")?;
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let location = config.repository.location(repo.as_deref())?.context(
        "no repository given: pass --repo DIR|s3://BUCKET/PREFIX or set [repository] path or url",
    )?;
    let options = OpenOptions {
        chunk_cache: config.repository.chunk_cache(),
    };
    let repo = Repository::open_at(&location, &options).await?;
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
    publish_configured(&datastore, &config).await?;
    let blocks = BlockExports::new();
    // Bound (and recorded in the registry) before sessions resume: a block
    // session's steps need to know where NBD and iSCSI are served.
    let nbd_listener = if config.nbd.serves(&config.block_exports) {
        let listener = tokio::net::TcpListener::bind((config.nbd.bind, config.nbd.port))
            .await
            .with_context(|| format!("bind NBD port {}:{}", config.nbd.bind, config.nbd.port))?;
        blocks.set_listening(BlockProtocol::Nbd, listener.local_addr()?);
        Some(listener)
    } else {
        None
    };
    let iscsi_listener = if config.iscsi.serves(&config.block_exports) {
        let (bind, port) = (config.iscsi.bind, config.iscsi.port);
        let listener = tokio::net::TcpListener::bind((bind, port))
            .await
            .with_context(|| format!("bind iSCSI port {bind}:{port}"))?;
        blocks.set_listening(BlockProtocol::Iscsi, listener.local_addr()?);
        Some(listener)
    } else {
        None
    };
    export_blocks(&datastore, &blocks, &config).await?;
    let iscsi_port = blocks.listening(BlockProtocol::Iscsi).map(|a| a.port());
    let nbd_port = blocks.listening(BlockProtocol::Nbd).map(|a| a.port());
    // Snapshot clones are served beside the repository's exports.
    let passthrough = Arc::new(Passthrough::open(&config.datastore.state_dir).with_context(
        || {
            format!(
                "open passthrough exports in '{}'",
                config.datastore.state_dir.display()
            )
        },
    )?);
    let snapshots = Arc::new(SnapshotSources::build(
        &config.snapshot_sources,
        Some(passthrough.clone()),
    ));
    let controller = Controller::start_full(
        config.controller_config(),
        datastore.clone(),
        blocks.clone(),
        snapshots,
    )
    .await
    .context("start the session controller")?;
    let bind = config.nfs_bind();
    let listeners = NfsListeners::bind(&bind)
        .await
        .with_context(|| format!("bind NFS ports on {} ({:?})", bind.addr, bind))?;
    let ports = listeners.ports()?;
    let server = NfsServer::new(Arc::new(Router::new(
        datastore.clone(),
        passthrough.clone(),
    )))
    .with_limits(connection_limits(&config, open_files));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let api_port = match &config.api.token {
        Some(token) if !token.is_empty() => {
            let listener = tokio::net::TcpListener::bind(config.api.bind)
                .await
                .with_context(|| format!("bind API on {}", config.api.bind))?;
            let port = listener.local_addr()?.port();
            let state = ApiState {
                console: config.api.console,
                ..ApiState::new(
                    datastore.clone(),
                    server.metrics(),
                    Arc::from(token.as_str()),
                    controller.clone(),
                )
            };
            tokio::spawn(revive::api::serve(listener, state, stopped()));
            Some(port)
        }
        _ => {
            info!("no [api] token configured: HTTP API and metrics are off");
            None
        }
    };
    // One JSON line on stdout: scripts and tests learn the ports (port 0 = any).
    let mut out = std::io::stdout();
    writeln!(
        out,
        "{}",
        json!({
            "nfs_port": ports.nfs,
            "mount_port": ports.mount,
            "portmap_port": ports.portmap_tcp,
            "api_port": api_port,
            "exports": datastore.exports().iter().map(|e| e.path.clone()).collect::<Vec<_>>(),
            "nbd_port": nbd_port,
            "iscsi_port": iscsi_port,
            "block_exports": blocks.all().iter().map(|e| e.name.clone()).collect::<Vec<_>>(),
        })
    )?;
    out.flush()?;
    // SIGHUP re-reads the config and publishes new [[publication]]s, so a
    // restore point can be published without restarting the datastore.
    if let (Some(path), Some(mut hup)) = (config_path.clone(), hangup) {
        let datastore = datastore.clone();
        let blocks = blocks.clone();
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let result = match Config::load(&path) {
                    Ok(config) => match publish_configured(&datastore, &config).await {
                        Ok(()) => export_blocks(&datastore, &blocks, &config).await,
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e.into()),
                };
                match result {
                    Ok(()) => info!("configuration reloaded"),
                    Err(e) => tracing::error!(cause = %format!("{e:#}"), "reload configuration"),
                }
            }
        });
    }
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let nbd_poll = std::time::Duration::from_micros(config.nbd.poll_us);
    let nbd = nbd_listener.map(|listener| {
        let server = NbdServer::new(blocks.clone()).with_poll(nbd_poll);
        tokio::spawn(server.serve(listener, stopped()))
    });
    let iscsi = iscsi_listener.map(|listener| {
        let targets = ExportTargets::new(blocks.clone());
        tokio::spawn(IscsiServer::new(targets).serve(listener, stopped()))
    });
    server.serve(listeners, stopped()).await?;
    if let Some(nbd) = nbd {
        // Block clients' requests in flight are answered before the flush.
        nbd.await.context("NBD server task")??;
    }
    if let Some(iscsi) = iscsi {
        iscsi.await.context("iSCSI server task")??;
    }
    // Databases on FUSE mounts cannot outlive the process: stopped cleanly
    // now, started again when revive starts.
    controller.shutdown().await;
    // UNSTABLE writes not yet committed by a client are made durable on a
    // clean stop: libnfs clients (QEMU, fio) do not resend them.
    datastore
        .flush_all()
        .await
        .context("flush the write caches at stop")?;
    info!("revive stopped");
    Ok(Outcome::Ok)
}

/// Publishes every configured publication that is not published yet.
async fn publish_configured(datastore: &Datastore, config: &Config) -> anyhow::Result<()> {
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
    Ok(())
}

/// Creates every configured block export not served yet (SIGHUP adds new
/// ones). The protocol servers start with the process: an export added on
/// SIGHUP for a protocol not served since start waits for a restart.
async fn export_blocks(
    datastore: &Arc<Datastore>,
    blocks: &BlockExports,
    config: &Config,
) -> anyhow::Result<()> {
    let default_export = datastore
        .exports()
        .first()
        .map(|e| e.path.clone())
        .context("no export configured")?;
    revive::block::setup::export_configured(
        datastore,
        blocks,
        &config.block_exports,
        &default_export,
    )
    .await?;
    for e in &config.block_exports {
        let protocol = e.protocol.protocol();
        if blocks.listening(protocol).is_none() {
            tracing::warn!(export = %e.name, %protocol, "block export not served: its protocol's server was not started; restart revive serve");
        }
    }
    Ok(())
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
