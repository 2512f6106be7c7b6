//! Command-line definitions (clap derive) and the dispatch to each command.

mod args;
mod mount;
mod progress;
mod repo_cmds;
mod serve;
mod sessions;
mod snapshot_cmds;
mod verify_boot;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use revive::store::StoreLocation;

pub use args::{KindArg, MethodArg, ProtocolArg};

/// Command-line arguments of `revive`.
#[derive(Debug, Parser)]
#[command(
    name = "revive",
    version,
    about = "Instant VM recovery from deduplicated backups"
)]
pub struct Args {
    #[command(subcommand)]
    pub command: Command,
}

/// Where the repository is: `--repo`, else `$REVIVE_REPO`, else the config file.
#[derive(Debug, Clone, clap::Args)]
pub struct RepoArg {
    /// Repository folder, or s3://BUCKET/PREFIX (endpoint and credentials from
    /// [repository.s3] of the config file or the AWS_* environment).
    #[arg(long, env = "REVIVE_REPO", value_name = "DIR|URL")]
    pub repo: Option<String>,
    /// Configuration file (default: $REVIVE_CONFIG).
    #[arg(long, env = revive::config::CONFIG_ENV, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

impl RepoArg {
    /// Resolves the repository location.
    pub fn resolve(&self) -> anyhow::Result<StoreLocation> {
        let config = match &self.config {
            Some(path) => revive::config::Config::load(path)?,
            None => revive::config::Config::default(),
        };
        match config.repository.location(self.repo.as_deref())? {
            Some(location) => Ok(location),
            None => match &self.config {
                Some(path) => anyhow::bail!(
                    "config file '{}' names no [repository] path or url; pass --repo",
                    path.display()
                ),
                None => {
                    tracing::debug!("no --repo, $REVIVE_REPO or config file");
                    anyhow::bail!(
                        "no repository given: pass --repo DIR or --repo s3://BUCKET/PREFIX \
                         (or set REVIVE_REPO, or --config FILE)"
                    )
                }
            },
        }
    }
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new, empty repository.
    Init {
        #[command(flatten)]
        repo: RepoArg,
        /// Chunk size of disk indexes: a power of two from 64KiB to 4MiB.
        #[arg(long, default_value = "1MiB", value_parser = parse_size_arg)]
        chunk_size: u64,
    },
    /// Back up a VM folder, a disk image or a folder tree as a new restore point.
    ///
    /// A folder with subfolders or symlinks (a PostgreSQL data folder, a
    /// pg_basebackup -Fp output) is backed up as a tree: every folder, file
    /// and symlink with its mode, owner and mtime, symlinks not followed.
    /// A folder with a .vmx file, a flat folder of files, or a single file is
    /// a VM, as always. --tree makes any folder a tree.
    #[command(verbatim_doc_comment)]
    Backup {
        #[command(flatten)]
        repo: RepoArg,
        /// Name of the chain (default: the .vmx name, else the folder or file name).
        #[arg(long)]
        name: Option<String>,
        /// Back the folder up as a tree even if it looks like a VM folder.
        #[arg(long)]
        tree: bool,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
        /// VM folder, image file or folder tree to back up.
        path: PathBuf,
    },
    /// List restore points (of the repository, or a storage system's snapshots).
    Points {
        #[command(flatten)]
        repo: RepoArg,
        /// Only this VM's restore points.
        #[arg(long)]
        vm: Option<String>,
        /// Print one JSON array.
        #[arg(long)]
        json: bool,
        /// Where the points are: "repo" (the repository), or snap:NAME for
        /// the snapshots of [[snapshot_source]] NAME in the config file.
        #[arg(long, default_value = "repo", value_name = "repo|snap:NAME")]
        source: String,
    },
    /// Restore a restore point's files (a tree: with folders, symlinks, modes, owners, mtimes) into a folder.
    Restore {
        #[command(flatten)]
        repo: RepoArg,
        /// Restore point: full id, unique prefix, or VM@latest.
        point: String,
        /// Destination folder (created if missing; existing files are never overwritten).
        dest: PathBuf,
    },
    /// Re-read and check every chunk (of one restore point, or of all); with
    /// --boot, prove restore points boot instead.
    ///
    /// --boot asks the running `revive serve` (its API) to boot each point on
    /// an isolated lab network of a qemu host ([verify] host), watch for its
    /// success signals (console pattern, TCP port, script), take a
    /// screenshot, clean everything up and record the verdict beside the
    /// point (`revive points` shows it). Exit status 1 if any point failed.
    #[command(verbatim_doc_comment)]
    Verify {
        #[command(flatten)]
        repo: RepoArg,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
        /// Boot the points instead of re-reading their chunks.
        #[arg(long)]
        boot: bool,
        /// With --boot: also the latest point of every VM (a nightly run).
        #[arg(long, requires = "boot")]
        all_latest: bool,
        /// With --boot: points booted at once (default: [verify] parallel).
        #[arg(long, requires = "boot")]
        parallel: Option<usize>,
        /// With --boot: the qemu host to boot on (default: [verify] host).
        #[arg(long, requires = "boot")]
        host: Option<String>,
        /// With --boot: seconds each boot may take (default: [verify] timeout_secs).
        #[arg(long, requires = "boot")]
        timeout: Option<u64>,
        /// With --boot: a regular expression a console line must match.
        #[arg(long, requires = "boot", value_name = "REGEX")]
        console: Option<String>,
        /// With --boot: a guest TCP port that must answer (e.g. 22).
        #[arg(long, requires = "boot", value_name = "PORT")]
        tcp_port: Option<u16>,
        /// With --boot: a script run against the booted guest; exit 0 is success.
        #[arg(long, requires = "boot", value_name = "FILE")]
        script: Option<PathBuf>,
        /// With --boot: API base URL (default: http://<[api] bind> of --config).
        #[arg(long, env = "REVIVE_API", value_name = "URL")]
        api: Option<String>,
        /// With --boot: API token (default: [api] token of --config).
        #[arg(long, env = "REVIVE_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Restore points: full id, unique prefix, or VM@latest (several with --boot).
        points: Vec<String>,
    },
    /// Drop a restore point (its chunks stay until gc).
    Forget {
        #[command(flatten)]
        repo: RepoArg,
        /// Restore point: full id, unique prefix, or VM@latest.
        point: String,
    },
    /// Mount a restore point as a local folder (FUSE) to browse or copy files
    /// out of it; runs until the folder is unmounted or the command interrupted.
    Mount {
        #[command(flatten)]
        repo: RepoArg,
        /// Restore point: full id, unique prefix, or NAME@latest.
        point: String,
        /// Existing empty folder to mount it on.
        mountpoint: PathBuf,
        /// Keep writes in this folder across mounts (default: a temporary
        /// write cache, deleted at unmount).
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Show every file as owned by this user (name or number), e.g. the
        /// database's OS user; default: the owners stored in the backup.
        #[arg(long, value_name = "USER")]
        uid: Option<String>,
        /// With --uid: show this group (name or number) instead of the user's own.
        #[arg(long, value_name = "GROUP")]
        gid: Option<String>,
        /// Print the "mounted" line as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Serve the NFSv3 datastore (published restore points as VM folders) and block exports (NBD).
    Serve {
        /// Configuration file (default: $REVIVE_CONFIG, else built-in defaults).
        #[arg(long, env = revive::config::CONFIG_ENV, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Repository folder or s3://BUCKET/PREFIX (default: [repository] of the config).
        #[arg(long, env = "REVIVE_REPO", value_name = "DIR|URL")]
        repo: Option<String>,
    },
    /// Start instant recovery: publish VMs from backup and (with --host) boot
    /// them, or start a PostgreSQL database on its backup (--kind postgres).
    Recover {
        #[command(flatten)]
        api: sessions::ApiArgs,
        /// VM to recover (repeat for several VMs sharing one datastore).
        #[arg(long = "vm", required_unless_present = "point")]
        vms: Vec<String>,
        /// Restore point (id, prefix, NAME@latest; single VM only), or a storage
        /// snapshot snap:SOURCE/SNAPSHOT (several VMs share its clone). Default: the latest.
        #[arg(long)]
        point: Option<String>,
        /// Port the recovered database answers on (--kind postgres; default:
        /// the host's port).
        #[arg(long)]
        port: Option<u16>,
        /// Configured [[host]] to run on (default: publish only).
        #[arg(long)]
        host: Option<String>,
        /// Use the only configured host with this driver (none, vsphere, qemu, postgres).
        #[arg(long)]
        driver: Option<String>,
        /// Write cache location (each session gets a folder in it).
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Session name: the folder and the VM's name on the host (single VM only).
        #[arg(long)]
        name: Option<String>,
        /// Power the VM on once registered.
        #[arg(long)]
        power_on: bool,
        /// vm: the VM folder on the NFS datastore; block: a disk as a block
        /// export (NBD or iSCSI); postgres: a PostgreSQL data folder started
        /// on a postgres host.
        #[arg(long, value_enum, default_value = "vm")]
        kind: KindArg,
        /// Disk file to export with --kind block (default: the only disk).
        #[arg(long, value_name = "FILE")]
        disk: Option<String>,
        /// Protocol of the block export with --kind block (default: nbd).
        #[arg(long, value_enum)]
        protocol: Option<ProtocolArg>,
        /// Wait until the sessions run (or need attention).
        #[arg(long)]
        wait: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List instant-recovery sessions.
    Sessions {
        #[command(flatten)]
        api: sessions::ApiArgs,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one session: state, progress, cache used, errors, retries.
    Session {
        #[command(flatten)]
        api: sessions::ApiArgs,
        /// Session id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Move a running session's VM (or database) to production storage.
    Migrate {
        #[command(flatten)]
        api: sessions::ApiArgs,
        /// Session id.
        id: String,
        /// Destination: a folder (copy, qemu, postgres data folder) or a
        /// datastore name (vsphere live).
        #[arg(long)]
        to: String,
        /// live: by the hypervisor (or a PostgreSQL standby); copy: by revive,
        /// then a short switchover. Default: live for a database, else copy.
        #[arg(long, value_enum)]
        method: Option<MethodArg>,
        /// Switch over as soon as the copy is in sync (a database's standby
        /// otherwise streams until `revive switchover`).
        #[arg(long)]
        switchover: bool,
        /// Wait until the migration is done, or for a database without
        /// --switchover until its standby is in sync, with progress.
        #[arg(long)]
        wait: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Switch a migrating database over to its standby: the published
    /// instance goes read-only, the standby catches up and becomes production.
    Switchover {
        #[command(flatten)]
        api: sessions::ApiArgs,
        /// Session id.
        id: String,
        /// Wait until production runs (the session is done).
        #[arg(long)]
        wait: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a waiting or failed session's step again now.
    Retry {
        #[command(flatten)]
        api: sessions::ApiArgs,
        /// Session id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Start a session's write cache over, empty, dropping everything
    /// clients wrote: the one way on when its cache folder is gone for good.
    #[command(name = "discard-cache")]
    DiscardCache {
        #[command(flatten)]
        api: sessions::ApiArgs,
        /// Session id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a session: power off, unregister, unpublish, delete its write cache.
    Stop {
        #[command(flatten)]
        api: sessions::ApiArgs,
        /// Session id.
        id: String,
        /// Wait until it is cancelled.
        #[arg(long)]
        wait: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove chunks that no restore point uses.
    Gc {
        #[command(flatten)]
        repo: RepoArg,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
        /// Keep unreferenced chunks younger than this, e.g. 15m or 0s
        /// (default: 0 for a folder, [repository.s3] gc_grace for S3).
        #[arg(long, value_parser = parse_duration_arg)]
        grace: Option<std::time::Duration>,
    },
}

impl Command {
    /// Log level when RUST_LOG is unset: quiet for one-shot commands.
    pub fn default_log_level(&self) -> &'static str {
        match self {
            Command::Serve { .. } => "info",
            _ => "warn",
        }
    }
}

/// How a successful command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything fine.
    Ok,
    /// `verify` found damaged objects.
    Damaged,
    /// `--wait` ended with a session short of its goal (failed, waiting, cancelled).
    Unfinished,
    /// `verify --boot`: a restore point did not boot.
    BootFailed,
}

impl Outcome {
    /// The process exit code.
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Ok => 0,
            Outcome::Damaged | Outcome::BootFailed => 1,
            Outcome::Unfinished => 3,
        }
    }
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size::parse_size(s).map_err(|e| format!("'{s}' is not a size like 1MiB: {e}"))
}

fn parse_duration_arg(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration like 30s, 15m or 2h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("'{s}' is not a duration like 30s, 15m or 2h")),
    };
    Ok(std::time::Duration::from_secs(secs))
}

/// Runs one command.
pub async fn run(args: Args) -> anyhow::Result<Outcome> {
    match args.command {
        Command::Init { repo, chunk_size } => repo_cmds::init(&repo.resolve()?, chunk_size).await,
        Command::Backup {
            repo,
            name,
            tree,
            json,
            path,
        } => repo_cmds::backup(&repo.resolve()?, name, tree, json, &path).await,
        Command::Points {
            repo,
            vm,
            json,
            source,
        } => {
            if source == "repo" {
                repo_cmds::points(&repo.resolve()?, vm.as_deref(), json).await
            } else {
                snapshot_cmds::points(repo.config.as_ref(), &source, vm.as_deref(), json).await
            }
        }
        Command::Restore { repo, point, dest } => {
            repo_cmds::restore(&repo.resolve()?, &point, &dest).await
        }
        Command::Verify {
            repo,
            json,
            boot: true,
            all_latest,
            parallel,
            host,
            timeout,
            console,
            tcp_port,
            script,
            api,
            token,
            points,
        } => {
            let api = sessions::ApiArgs {
                config: repo.config,
                api,
                token,
            };
            let req = revive::controller::VerifyBootRequest {
                points,
                all_latest,
                parallel,
                host,
                timeout_secs: timeout,
                signals: revive::controller::boot_signals::Signals {
                    console,
                    tcp_port,
                    script,
                },
            };
            verify_boot::run(&api, req, json).await
        }
        Command::Verify {
            repo, json, points, ..
        } => {
            if points.len() > 1 {
                anyhow::bail!("verify checks one restore point or all; --boot takes several");
            }
            repo_cmds::verify(&repo.resolve()?, points.first().map(String::as_str), json).await
        }
        Command::Forget { repo, point } => repo_cmds::forget(&repo.resolve()?, &point).await,
        Command::Mount {
            repo,
            point,
            mountpoint,
            cache,
            uid,
            gid,
            json,
        } => {
            mount::mount(mount::MountArgs {
                repo,
                point,
                mountpoint,
                cache,
                uid,
                gid,
                json,
            })
            .await
        }
        Command::Serve { config, repo } => serve::serve(config, repo).await,
        Command::Gc { repo, json, grace } => repo_cmds::gc(&repo.resolve()?, json, grace).await,
        Command::Recover {
            api,
            vms,
            point,
            port,
            host,
            driver,
            cache,
            name,
            power_on,
            kind,
            disk,
            protocol,
            wait,
            json,
        } => {
            let driver = match (kind, driver) {
                (KindArg::Postgres, None) => Some("postgres".to_string()),
                (_, driver) => driver,
            };
            let req = revive::controller::RecoverRequest {
                vms,
                point,
                host,
                driver,
                cache,
                name,
                power_on,
                port,
                kind: kind.into(),
                disk,
                protocol: protocol.map(Into::into),
                lab: None,
            };
            sessions::recover(&api, req, wait, json).await
        }
        Command::Sessions { api, json } => sessions::list(&api, json).await,
        Command::Session { api, id, json } => sessions::show(&api, &id, json).await,
        Command::Migrate {
            api,
            id,
            to,
            method,
            switchover,
            wait,
            json,
        } => {
            let req = revive::controller::MigrateRequest {
                to,
                method: method.map(Into::into),
                switchover: switchover.then_some(true),
            };
            sessions::migrate(&api, &id, req, wait, json).await
        }
        Command::Switchover {
            api,
            id,
            wait,
            json,
        } => sessions::action(&api, &id, "switchover", wait, json).await,
        Command::Retry { api, id, json } => sessions::action(&api, &id, "retry", false, json).await,
        Command::DiscardCache { api, id, json } => {
            sessions::action(&api, &id, "discard-cache", false, json).await
        }
        Command::Stop {
            api,
            id,
            wait,
            json,
        } => sessions::action(&api, &id, "stop", wait, json).await,
    }
}
