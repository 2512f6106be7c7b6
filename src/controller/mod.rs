//! `controller`: instant-recovery sessions. Each session is a state machine
//! (validate, publish, register the datastore and the VM, power on, run,
//! migrate, switch over, finalize) whose record is written to the state
//! folder before each step is acted on; a restarted daemon resumes every
//! session where it stopped.
//!
//! # Rules
//! - A step that fails for a transient cause (repository, hypervisor or
//!   destination unreachable) puts the session in `waiting` and is retried
//!   on the configured schedule, then waits for `revive retry`. Other
//!   failures put it in `failed`; `revive retry` runs the step again.
//! - Published folders stay exported whatever the session's state, until
//!   the session finalizes or is stopped: a running VM never loses its disk.
//! - Sessions on one host share one datastore registration; it is removed
//!   when the last session using it ends.
//! - Drivers are called through [`crate::drivers::Driver`] only, and every
//!   call is idempotent, so a step may be run again after a crash.
//! - A session recovered from a storage snapshot (`snap:SOURCE/SNAPSHOT`)
//!   runs from a writable clone of it, shared by every VM recovered from
//!   that snapshot and destroyed with its last user (`clones`).

mod block;
pub mod boot_signals;
pub mod clones;
mod commands;
mod copy;
mod error;
mod hosts;
mod lifecycle;
mod recover;
mod runner;
pub mod session;
mod snapshot_steps;
mod steps;
mod switchover;
pub mod verify_boot;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tracing::{info, warn};

pub use block::{BlockTarget, RecoveryKind};
pub use error::ControllerError;
pub use hosts::HostView;
pub use session::{Migration, MigrationMethod, Retries, Session, SessionState, SessionStore};
pub use verify_boot::{BootItem, BootJobView, BootPhase, VerifyBootConfig, VerifyBootRequest};

use crate::block::{BlockExports, BlockProtocol};
use crate::datastore::Datastore;
use crate::drivers::{
    self, DatastoreSpec, Driver, DriverConfig, DriverContext, HostConfig, LabNetwork, NoneConfig,
};
use crate::snapshots::{SnapshotSources, SnapshotSpec};

/// Name of the built-in publish-only host used when `recover` names none.
pub const NONE_HOST: &str = "none";

/// How the controller is set up (from `[sessions]`, `[[host]]` and `[nfs]`).
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Folder of session records (`<state>/sessions/`).
    pub state_dir: PathBuf,
    /// Export the sessions' folders are published in.
    pub export: String,
    /// Datastore name hypervisors show.
    pub datastore_name: String,
    /// Address hosts use to reach the NFS server when their config names none.
    pub default_nfs_address: String,
    /// Automatic retries of a transient failure.
    pub retries: u32,
    /// Pause between automatic retries.
    pub retry_interval: Duration,
    /// Free space a write cache location needs.
    pub min_free_cache: u64,
    /// Bytes per second a copy migration may write (0: no limit), so it does
    /// not starve the production storage it copies to.
    pub migration_bandwidth: u64,
    /// Default write cache location (`<cache_root>/<session name>`).
    pub cache_root: PathBuf,
    /// Configured hosts.
    pub hosts: Vec<HostConfig>,
    /// Verification boots (`[verify]`).
    pub verify: VerifyBootConfig,
}

/// A `recover` request: one or several VMs on one host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverRequest {
    /// VMs to recover (names as backed up).
    pub vms: Vec<String>,
    /// Restore point (id, prefix or VM@latest); only with a single VM. Default: `<vm>@latest`.
    #[serde(default)]
    pub point: Option<String>,
    /// Configured host to run on; default: the publish-only `none` host.
    #[serde(default)]
    pub host: Option<String>,
    /// Pick the only configured host with this driver when `host` is absent.
    #[serde(default)]
    pub driver: Option<String>,
    /// Write cache location; each session gets `<cache>/<name>`.
    #[serde(default)]
    pub cache: Option<PathBuf>,
    /// Session name; only with a single VM. Default: `<vm>-ir`, numbered if taken.
    #[serde(default)]
    pub name: Option<String>,
    /// Power the VMs on once registered (always, for a database host).
    #[serde(default)]
    pub power_on: bool,
    /// Port the recovered database answers on (postgres hosts; default:
    /// the host's `port`).
    #[serde(default)]
    pub port: Option<u16>,
    /// A VM folder on the NFS datastore (default) or a disk as a block export.
    #[serde(default)]
    pub kind: RecoveryKind,
    /// Disk to export (`kind` block; default: the only disk).
    #[serde(default)]
    pub disk: Option<String>,
    /// Protocol of the block export (`kind` block; default nbd).
    #[serde(default)]
    pub protocol: Option<BlockProtocol>,
    /// Boot on an isolated lab network (verification boots); single VM only.
    #[serde(default)]
    pub lab: Option<LabNetwork>,
}

/// A `migrate` request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// Destination: a folder (copy, QEMU) or a datastore name (vSphere).
    pub to: String,
    /// Live (by the hypervisor, or a PostgreSQL standby) or copy (by
    /// revive); default: live for a database, else copy.
    #[serde(default)]
    pub method: Option<MigrationMethod>,
    /// Switch over as soon as the copy is in sync. Default: yes for VMs; a
    /// database's standby streams until `revive switchover` (or this).
    #[serde(default)]
    pub switchover: Option<bool>,
}

/// A session as the API shows it: the record plus live figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionView {
    /// The persisted record.
    #[serde(flatten)]
    pub session: Session,
    /// Bytes its write cache occupies, while published.
    pub cache_bytes: Option<u64>,
}

/// Counters the controller adds to `/metrics`.
#[derive(Debug, Default)]
pub struct ControllerMetrics {
    /// Bytes written to destinations by copy migrations.
    pub migration_bytes: AtomicU64,
    /// Steps that failed and were scheduled for a retry.
    pub retries: AtomicU64,
}

/// A session at run time: its record and how its runner is woken.
struct SessionHandle {
    /// The record as last persisted: what readers see.
    record: Mutex<Session>,
    /// Serializes changes of the record (see `runner::update`).
    persist: tokio::sync::Mutex<()>,
    wake: Notify,
    /// Set by `stop`: interrupts a copy or a wait.
    cancel: AtomicBool,
}

impl SessionHandle {
    fn snapshot(&self) -> Session {
        match self.record.lock() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }
}

struct Inner {
    config: ControllerConfig,
    datastore: Arc<Datastore>,
    /// Block exports being served (block sessions add theirs).
    blocks: Arc<BlockExports>,
    store: SessionStore,
    drivers: HashMap<String, Result<Arc<dyn Driver>, String>>,
    sessions: DashMap<String, Arc<SessionHandle>>,
    /// Serializes datastore attach/detach decisions per host.
    host_locks: DashMap<String, Arc<tokio::sync::Mutex<()>>>,
    /// Serializes name choice and session creation.
    create_lock: tokio::sync::Mutex<()>,
    metrics: ControllerMetrics,
    /// Storage systems whose snapshots sessions recover from.
    snapshots: Arc<SnapshotSources>,
    /// Clones of their snapshots, with the sessions using them.
    clones: clones::CloneBook,
    /// Verification boot jobs of this server's life.
    boot_jobs: verify_boot::BootJobs,
}

/// The session controller.
#[derive(Clone)]
pub struct Controller {
    inner: Arc<Inner>,
}

impl Controller {
    /// Loads every session record and resumes the unfinished ones, without
    /// a block export server (block sessions fail validation).
    pub async fn start(
        config: ControllerConfig,
        datastore: Arc<Datastore>,
    ) -> Result<Controller, ControllerError> {
        Self::start_full(
            config,
            datastore,
            BlockExports::new(),
            Arc::new(SnapshotSources::none()),
        )
        .await
    }

    /// As [`Controller::start`], with the block exports `revive serve`
    /// serves: block sessions add theirs there, and those of sessions
    /// already exported are re-created now.
    pub async fn start_with(
        config: ControllerConfig,
        datastore: Arc<Datastore>,
        blocks: Arc<BlockExports>,
    ) -> Result<Controller, ControllerError> {
        Self::start_full(config, datastore, blocks, Arc::new(SnapshotSources::none())).await
    }

    /// As [`Controller::start`], with storage snapshot sources: clones
    /// left by a crash or by finished sessions are swept before any
    /// session resumes.
    pub async fn start_with_snapshots(
        config: ControllerConfig,
        datastore: Arc<Datastore>,
        snapshots: Arc<SnapshotSources>,
    ) -> Result<Controller, ControllerError> {
        Self::start_full(config, datastore, BlockExports::new(), snapshots).await
    }

    /// As [`Controller::start`], with both the block exports and the
    /// storage snapshot sources `revive serve` serves.
    pub async fn start_full(
        config: ControllerConfig,
        datastore: Arc<Datastore>,
        blocks: Arc<BlockExports>,
        snapshots: Arc<SnapshotSources>,
    ) -> Result<Controller, ControllerError> {
        let store = SessionStore::open(&config.state_dir)?;
        let clones = clones::CloneBook::open(&config.state_dir)?;
        let mut drivers = HashMap::new();
        drivers.insert(
            NONE_HOST.to_string(),
            Ok(Arc::new(drivers::none::NoneDriver) as Arc<dyn Driver>),
        );
        let context = DriverContext {
            datastore: datastore.clone(),
        };
        for host in &config.hosts {
            let built = drivers::build(host, &context).map_err(|e| e.to_string());
            if let Err(cause) = &built {
                warn!(host = %host.name, %cause, "host driver unavailable");
            }
            drivers.insert(host.name.clone(), built);
        }
        let inner = Arc::new(Inner {
            config,
            datastore,
            blocks,
            store,
            drivers,
            sessions: DashMap::new(),
            host_locks: DashMap::new(),
            create_lock: tokio::sync::Mutex::new(()),
            metrics: ControllerMetrics::default(),
            snapshots,
            clones,
            boot_jobs: DashMap::new(),
        });
        let controller = Controller { inner };
        let mut resumed = Vec::new();
        let mut interrupted_boots = Vec::new();
        for session in controller.inner.store.load_all()? {
            block::restore(&controller.inner, &session).await;
            let resume = !session.state.is_terminal();
            let handle = controller.adopt(session, false);
            if resume {
                if handle.snapshot().lab.is_some() {
                    interrupted_boots.push(handle.snapshot().id);
                }
                resumed.push(handle);
            }
        }
        // Every session is known now, so the sweep sees which clones are
        // still in use; none runs yet, so none races it.
        clones::sweep(&controller.inner).await?;
        for handle in resumed {
            let s = handle.snapshot();
            info!(session = %s.id, name = %s.name, state = %s.state, "resuming session");
            tokio::spawn(runner::run(controller.inner.clone(), handle));
        }
        // A verification boot cut short by a restart has nobody watching
        // it any more: clean it up rather than leave a lab VM running.
        for id in interrupted_boots {
            warn!(session = %id, "stopping a verification boot interrupted by a restart");
            if let Err(e) = controller.stop(&id).await {
                warn!(session = %id, cause = %e, "could not stop an interrupted verification boot");
            }
        }
        Ok(controller)
    }

    fn adopt(&self, session: Session, run: bool) -> Arc<SessionHandle> {
        let handle = Arc::new(SessionHandle {
            record: Mutex::new(session.clone()),
            persist: tokio::sync::Mutex::new(()),
            wake: Notify::new(),
            cancel: AtomicBool::new(false),
        });
        self.inner
            .sessions
            .insert(session.id.clone(), handle.clone());
        if run {
            tokio::spawn(runner::run(self.inner.clone(), handle.clone()));
        }
        handle
    }

    /// Counters for `/metrics`.
    pub fn metrics(&self) -> &ControllerMetrics {
        &self.inner.metrics
    }

    /// The block exports being served (for `/metrics`).
    pub fn block_exports(&self) -> &Arc<BlockExports> {
        &self.inner.blocks
    }

    /// Number of sessions in each state.
    pub fn state_counts(&self) -> Vec<(SessionState, u64)> {
        let mut counts: HashMap<SessionState, u64> = HashMap::new();
        for h in self.inner.sessions.iter() {
            *counts.entry(h.value().snapshot().state).or_default() += 1;
        }
        SessionState::ALL
            .iter()
            .map(|s| (*s, counts.get(s).copied().unwrap_or(0)))
            .collect()
    }

    fn handle(&self, id: &str) -> Result<Arc<SessionHandle>, ControllerError> {
        self.inner
            .sessions
            .get(id)
            .map(|h| h.value().clone())
            .ok_or_else(|| ControllerError::UnknownSession { id: id.to_string() })
    }

    async fn view(&self, session: Session) -> SessionView {
        let published = !matches!(
            session.state,
            SessionState::Validating | SessionState::Done | SessionState::Cancelled
        );
        let cache_bytes = if published {
            self.inner
                .datastore
                .publication_cache_bytes(&session.export, &session.name)
                .await
                .ok()
        } else {
            None
        };
        SessionView {
            session,
            cache_bytes,
        }
    }

    /// Every session, oldest first.
    pub async fn list(&self) -> Vec<SessionView> {
        let mut sessions: Vec<Session> = self
            .inner
            .sessions
            .iter()
            .map(|h| h.value().snapshot())
            .collect();
        sessions.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        let mut views = Vec::with_capacity(sessions.len());
        for s in sessions {
            views.push(self.view(s).await);
        }
        views
    }

    /// One session.
    pub async fn get(&self, id: &str) -> Result<SessionView, ControllerError> {
        let session = self.handle(id)?.snapshot();
        Ok(self.view(session).await)
    }
}

fn driver_name(config: &DriverConfig) -> &'static str {
    match config {
        DriverConfig::None(NoneConfig {}) => "none",
        DriverConfig::Vsphere(_) => "vsphere",
        DriverConfig::Qemu(_) => "qemu",
        DriverConfig::Postgres(_) => "postgres",
    }
}

/// A short random id: 12 hex digits.
fn new_id() -> String {
    format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// This machine's host name, for the default datastore name.
pub fn default_datastore_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    let safe: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    format!("revive-{safe}")
}
