//! `revive mount POINT MOUNTPOINT`: a restore point as a local folder, for
//! browsing or copying files out of a backup. The restore point is published
//! in a private datastore of this process and served through FUSE until the
//! folder is unmounted (`umount MOUNTPOINT`) or the command is interrupted;
//! then it unmounts and removes its publication and write cache, unless
//! `--cache DIR` asked to keep them (a later `revive mount --cache DIR` of
//! the same point sees the same writes).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use revive::datastore::{Datastore, DatastoreConfig, ExportConfig};
use revive::fuse::{users, Mount, MountOptions};
use revive::repo::{OpenOptions, Repository};
use serde_json::json;
use tracing::{info, warn};

use super::{Outcome, RepoArg};

/// The one export of the private datastore.
const EXPORT: &str = "/mount";
/// The publication's folder name in it.
const PUBLICATION: &str = "mount";

/// What `revive mount` was asked.
pub struct MountArgs {
    pub repo: RepoArg,
    pub point: String,
    pub mountpoint: PathBuf,
    pub cache: Option<PathBuf>,
    pub uid: Option<String>,
    pub gid: Option<String>,
    pub json: bool,
}

/// Where the private datastore keeps its state and write cache, and whether
/// it is thrown away at the end.
struct Workdir {
    dir: PathBuf,
    keep: bool,
}

impl Workdir {
    fn new(cache: Option<PathBuf>) -> anyhow::Result<Workdir> {
        match cache {
            Some(dir) => {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("create cache folder '{}'", dir.display()))?;
                Ok(Workdir { dir, keep: true })
            }
            None => {
                let dir = std::env::temp_dir().join(format!(
                    "revive-mount-{}-{:08x}",
                    std::process::id(),
                    rand::random::<u32>()
                ));
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("create work folder '{}'", dir.display()))?;
                Ok(Workdir { dir, keep: false })
            }
        }
    }

    async fn discard(&self) {
        if self.keep {
            return;
        }
        let dir = self.dir.clone();
        let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir)).await;
        if let Ok(Err(e)) = removed {
            warn!(dir = %self.dir.display(), cause = %e, "could not remove the work folder");
        }
    }
}

/// Parses `--uid`/`--gid`: a number or a name (`postgres`). A user name
/// alone also gives its primary group.
fn owner(uid: Option<&str>, gid: Option<&str>) -> anyhow::Result<Option<(u32, u32)>> {
    let Some(user) = uid else {
        if gid.is_some() {
            bail!("--gid needs --uid");
        }
        return Ok(None);
    };
    let (u, primary) = match user.parse::<u32>() {
        Ok(n) => (n, users::user_with_id(n).map(|u| u.gid)),
        Err(_) => {
            let u = users::user_named(user)
                .with_context(|| format!("--uid: no user '{user}' on this machine"))?;
            (u.uid, Some(u.gid))
        }
    };
    let g = match gid {
        Some(text) => match text.parse::<u32>() {
            Ok(n) => n,
            Err(_) => users::group_named(text)
                .with_context(|| format!("--gid: no group '{text}' on this machine"))?,
        },
        None => primary.unwrap_or(u),
    };
    Ok(Some((u, g)))
}

/// `revive mount`.
pub async fn mount(args: MountArgs) -> anyhow::Result<Outcome> {
    let owner = owner(args.uid.as_deref(), args.gid.as_deref())?;
    let config = super::serve::load_config(args.repo.config.as_ref())?;
    let location = args.repo.resolve()?;
    let options = OpenOptions {
        chunk_cache: config.repository.chunk_cache(),
    };
    let repo = Repository::open_at(&location, &options).await?;
    let point = repo
        .resolve(&args.point)
        .await
        .with_context(|| format!("find restore point '{}'", args.point))?;
    if !args.mountpoint.is_dir() {
        bail!(
            "mount point '{}' is not an existing folder",
            args.mountpoint.display()
        );
    }
    let work = Workdir::new(args.cache.clone())?;
    let result = serve(&args, &config, repo, &point.id, &work, owner).await;
    work.discard().await;
    result
}

async fn serve(
    args: &MountArgs,
    config: &revive::config::Config,
    repo: Repository,
    point: &str,
    work: &Workdir,
    owner: Option<(u32, u32)>,
) -> anyhow::Result<Outcome> {
    let ds_config = DatastoreConfig {
        state_dir: work.dir.join("state"),
        cache_root: work.dir.clone(),
        block_cache_bytes: config.datastore.block_cache as usize,
        readahead_chunks: config.datastore.readahead_chunks,
        exports: vec![ExportConfig {
            path: EXPORT.into(),
            allowed_clients: Vec::new(),
        }],
    };
    let datastore = Arc::new(
        Datastore::open(repo, ds_config)
            .await
            .with_context(|| format!("open datastore state in '{}'", work.dir.display()))?,
    );
    let existing = datastore.publications(EXPORT).await?;
    match existing.iter().find(|(name, _)| name == PUBLICATION) {
        Some((_, p)) if p == point => info!(point, "reusing the kept write cache"),
        Some((_, p)) => bail!(
            "cache folder '{}' holds the writes of restore point {p}, not {point}; \
             pass another --cache",
            work.dir.display()
        ),
        None => {
            datastore
                .publish(EXPORT, PUBLICATION, point, None)
                .await
                .with_context(|| format!("publish restore point {point}"))?;
        }
    }
    let (export, folder) = datastore.publication_folder(EXPORT, PUBLICATION).await?;
    let options = MountOptions {
        owner,
        fs_name: format!("revive:{point}"),
        ..MountOptions::default()
    };
    let mounted = Mount::start(datastore.clone(), export, folder, &args.mountpoint, options)
        .await
        .with_context(|| format!("mount restore point {point}"))?;
    announce(args, point, work)?;
    let reason = tokio::select! {
        _ = mounted.ended() => "unmounted",
        r = interrupted() => { r?; "interrupted" }
    };
    info!(reason, "stopping");
    if mounted.is_serving() {
        mounted.unmount().await?;
    } else {
        drop(mounted);
    }
    if work.keep {
        datastore
            .flush_all()
            .await
            .context("make the kept write cache durable")?;
    } else {
        datastore
            .unpublish(EXPORT, PUBLICATION)
            .await
            .context("remove the publication")?;
    }
    Ok(Outcome::Ok)
}

/// One line on stdout once the folder is usable: scripts wait for it.
fn announce(args: &MountArgs, point: &str, work: &Workdir) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout();
    if args.json {
        writeln!(
            out,
            "{}",
            json!({
                "point": point,
                "mountpoint": args.mountpoint,
                "cache": work.keep.then_some(&work.dir),
            })
        )?;
    } else {
        writeln!(
            out,
            "mounted restore point {point} at {} (until unmounted or interrupted)",
            display(&args.mountpoint)
        )?;
    }
    out.flush()?;
    Ok(())
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

/// Completes on SIGINT or SIGTERM.
async fn interrupted() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).context("install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("install SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
