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
mod copy;
mod error;
mod hosts;
mod lifecycle;
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

    /// Starts one session per VM of the request; they share the export and
    /// the host's datastore.
    pub async fn recover(&self, req: RecoverRequest) -> Result<Vec<SessionView>, ControllerError> {
        let mut vms: Vec<String> = req
            .vms
            .iter()
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
            .collect();
        if vms.is_empty() {
            if let Some(point) = &req.point {
                vms.push(lifecycle::name_of_point(&self.inner, point).await?);
            }
        }
        if vms.is_empty() {
            return Err(ControllerError::BadRequest(
                "name at least one VM to recover".into(),
            ));
        }
        let snapshot = req
            .point
            .as_deref()
            .filter(|p| SnapshotSpec::is_snapshot(p));
        // Several VMs may come from one storage snapshot (they share its clone).
        if vms.len() > 1
            && (req.name.is_some()
                || (req.point.is_some() && snapshot.is_none())
                || req.lab.is_some())
        {
            return Err(ControllerError::BadRequest(
                "--name and --point apply to a single VM; recover several VMs from their latest points (or from one --point snap:SOURCE/SNAPSHOT) without them".into(),
            ));
        }
        if req.kind != RecoveryKind::Block && (req.disk.is_some() || req.protocol.is_some()) {
            return Err(ControllerError::BadRequest(
                "--disk and --protocol apply to --kind block".into(),
            ));
        }
        if vms.len() > 1 && req.disk.is_some() {
            return Err(ControllerError::BadRequest(
                "--disk applies to a single VM".into(),
            ));
        }
        if snapshot.is_some() && req.kind == RecoveryKind::Block {
            return Err(ControllerError::BadRequest(
                "--kind block serves a disk of a backup restore point, not of a storage snapshot"
                    .into(),
            ));
        }
        if let Some(point) = snapshot {
            let spec = SnapshotSpec::parse(point)
                .map_err(|e| ControllerError::BadRequest(e.to_string()))?;
            self.inner
                .snapshots
                .get(&spec.source)
                .map_err(|e| ControllerError::BadRequest(e.to_string()))?;
        }
        let host = self.pick_host(req.host.as_deref(), req.driver.as_deref())?;
        let driver_kind = match self.inner.drivers.get(&host) {
            Some(Ok(d)) => d.kind(),
            Some(Err(cause)) => {
                return Err(ControllerError::Validation {
                    check: "hypervisor",
                    reason: format!("host '{host}': {cause}"),
                })
            }
            None => "none",
        };
        let service = driver_kind == "postgres";
        if req.port.is_some() && !service {
            return Err(ControllerError::BadRequest(format!(
                "--port is for database sessions; host '{host}' uses the {driver_kind} driver"
            )));
        }
        if let Some(wanted) = req.driver.as_deref() {
            if req.host.is_some() && wanted != driver_kind {
                return Err(ControllerError::BadRequest(format!(
                    "host '{host}' uses the {driver_kind} driver, not {wanted}"
                )));
            }
        }
        if req.power_on && driver_kind == "none" {
            return Err(ControllerError::BadRequest(format!(
                "--power-on needs a hypervisor: host '{host}' uses the publish-only none driver (pass --host)"
            )));
        }
        let datastore = self.datastore_spec(&host);
        let _guard = self.inner.create_lock.lock().await;
        let request = new_id();
        let mut names: Vec<String> = Vec::new();
        for vm in &vms {
            let name = match &req.name {
                Some(n) => {
                    crate::datastore::namespace::check_name(n).map_err(|_| {
                        ControllerError::BadRequest(format!("'{n}' cannot be a folder name"))
                    })?;
                    if self.name_in_use(n).await? {
                        return Err(ControllerError::NameTaken {
                            name: n.clone(),
                            export: self.inner.config.export.clone(),
                        });
                    }
                    n.clone()
                }
                None => self.free_name(vm, &names).await?,
            };
            names.push(name);
        }
        let mut views = Vec::new();
        for (vm, name) in vms.iter().zip(names) {
            let host_cache = self
                .inner
                .config
                .hosts
                .iter()
                .find(|h| h.name == host)
                .and_then(|h| h.cache_dir.clone());
            let cache_dir = req
                .cache
                .clone()
                .or(host_cache)
                .unwrap_or_else(|| self.inner.config.cache_root.clone())
                .join(&name);
            let now = Utc::now();
            let block = (req.kind == RecoveryKind::Block).then(|| {
                BlockTarget::new(
                    &name,
                    req.disk.clone(),
                    req.protocol.unwrap_or(BlockProtocol::Nbd),
                )
            });
            let session = Session {
                id: new_id(),
                request: request.clone(),
                name,
                vm: vm.clone(),
                point: req.point.clone().unwrap_or_else(|| format!("{vm}@latest")),
                host: host.clone(),
                driver: driver_kind.to_string(),
                export: self.inner.config.export.clone(),
                datastore: datastore.clone(),
                cache_dir,
                // A database is recovered to answer queries: always started.
                power_on: req.power_on || service,
                port: req.port,
                ready_ms: None,
                state: SessionState::Validating,
                resume: None,
                retries: Retries {
                    attempt: 0,
                    max: self.inner.config.retries,
                    next_at: None,
                },
                error: None,
                vm_ref: None,
                vm_spec: None,
                datastore_attached: false,
                block,
                migration: None,
                lab: req.lab.clone(),
                created: now,
                updated: now,
            };
            self.inner.store.save(&session)?;
            info!(session = %session.id, name = %session.name, vm = %vm, host = %host, "session created");
            self.adopt(session.clone(), true);
            views.push(SessionView {
                session,
                cache_bytes: None,
            });
        }
        Ok(views)
    }

    fn pick_host(
        &self,
        host: Option<&str>,
        driver: Option<&str>,
    ) -> Result<String, ControllerError> {
        let known = || {
            let mut names: Vec<_> = self.inner.drivers.keys().cloned().collect();
            names.sort();
            names.join(", ")
        };
        match (host, driver) {
            (Some(h), _) => {
                if self.inner.drivers.contains_key(h) {
                    Ok(h.to_string())
                } else {
                    Err(ControllerError::UnknownHost {
                        name: h.to_string(),
                        known: known(),
                    })
                }
            }
            (None, Some("none")) | (None, None) => Ok(NONE_HOST.to_string()),
            (None, Some(kind)) => {
                let matching: Vec<&HostConfig> = self
                    .inner
                    .config
                    .hosts
                    .iter()
                    .filter(|h| driver_name(&h.driver) == kind)
                    .collect();
                match matching.as_slice() {
                    [one] => Ok(one.name.clone()),
                    [] => Err(ControllerError::UnknownHost {
                        name: format!("(any with driver {kind})"),
                        known: known(),
                    }),
                    _ => Err(ControllerError::BadRequest(format!(
                        "several hosts use the {kind} driver; pass --host"
                    ))),
                }
            }
        }
    }

    fn datastore_spec(&self, host: &str) -> DatastoreSpec {
        let remote_host = self
            .inner
            .config
            .hosts
            .iter()
            .find(|h| h.name == host)
            .and_then(|h| h.nfs_address.clone())
            .unwrap_or_else(|| self.inner.config.default_nfs_address.clone());
        DatastoreSpec {
            name: self.inner.config.datastore_name.clone(),
            remote_host,
            remote_path: self.inner.config.export.clone(),
            local_path: None,
        }
    }

    async fn name_in_use(&self, name: &str) -> Result<bool, ControllerError> {
        let by_session = self.inner.sessions.iter().any(|h| {
            let s = h.value().snapshot();
            s.name == name && !s.state.is_terminal()
        });
        Ok(by_session
            || self
                .inner
                .datastore
                .name_taken(&self.inner.config.export, name)
                .await?)
    }

    async fn free_name(&self, vm: &str, chosen: &[String]) -> Result<String, ControllerError> {
        let base = format!("{vm}-ir");
        for n in 1..10_000 {
            let name = if n == 1 {
                base.clone()
            } else {
                format!("{base}-{n}")
            };
            if !chosen.contains(&name) && !self.name_in_use(&name).await? {
                return Ok(name);
            }
        }
        Err(ControllerError::BadRequest(format!(
            "no free session name for VM '{vm}'"
        )))
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

    /// Changes a session's record under its lock, persists it, wakes its runner.
    async fn command(
        &self,
        id: &str,
        action: &'static str,
        change: impl FnOnce(&mut Session) -> Result<(), ControllerError>,
    ) -> Result<Session, ControllerError> {
        let handle = self.handle(id)?;
        let updated = runner::update(&self.inner, &handle, |s| {
            change(s).map_err(|e| match e {
                ControllerError::WrongState { .. } => ControllerError::WrongState {
                    id: s.id.clone(),
                    state: s.state.to_string(),
                    action,
                },
                other => other,
            })
        })
        .await?;
        handle.wake.notify_one();
        Ok(updated)
    }

    /// Moves a running session to production storage.
    pub async fn migrate(
        &self,
        id: &str,
        req: MigrateRequest,
    ) -> Result<SessionView, ControllerError> {
        if req.to.trim().is_empty() {
            return Err(ControllerError::BadRequest(
                "--to names the destination (a folder, or a datastore for live migration)".into(),
            ));
        }
        let database = self.handle(id)?.snapshot().driver == "postgres";
        let method = req.method.unwrap_or(if database {
            MigrationMethod::Live
        } else {
            MigrationMethod::Copy
        });
        let needs_folder = method == MigrationMethod::Copy || database;
        if needs_folder && !std::path::Path::new(&req.to).is_absolute() {
            return Err(ControllerError::BadRequest(format!(
                "destination '{}' must be an absolute folder path",
                req.to
            )));
        }
        if database && method == MigrationMethod::Copy {
            return Err(ControllerError::BadRequest(
                "a database moves by streaming replication: drop --method copy".into(),
            ));
        }
        let switchover = req.switchover.unwrap_or(!database);
        let session = self.command(id, "migrate", |s| {
            if s.state != SessionState::Running {
                return Err(ControllerError::WrongState {
                    id: String::new(),
                    state: String::new(),
                    action: "migrate",
                });
            }
            if method == MigrationMethod::Live && s.driver == "none" {
                return Err(ControllerError::BadRequest(
                    "the none driver cannot migrate live; use --method copy".into(),
                ));
            }
            // A copy migration stops the VM before it asks the driver to
            // start the copy; vSphere cannot (ESXi does not see the copy), so
            // refuse before the VM is stopped.
            if method == MigrationMethod::Copy && snapshot_steps::is_snapshot(s) {
                return Err(ControllerError::BadRequest(
                    "a session recovered from a storage snapshot runs from its clone, which copy migration cannot read yet; use --method live".into(),
                ));
            }
            if method == MigrationMethod::Copy && s.driver == "vsphere" {
                return Err(ControllerError::BadRequest(
                    "the vsphere driver cannot start a VM from a copy; use --method live --to <datastore> (Storage vMotion)".into(),
                ));
            }
            s.migration = Some(Migration {
                method,
                switchover,
                lag_bytes: None,
                in_sync: false,
                destination: req.to.clone(),
                task: None,
                percent: 0,
                files: Vec::new(),
                bytes_copied: 0,
                production_vm: None,
            });
            s.state = SessionState::Migrating;
            Ok(())
        })
        .await?;
        info!(session = %id, ?method, to = %req.to, switchover, "migration asked");
        Ok(self.view(session).await)
    }

    /// Runs a waiting or failed session's step again now.
    pub async fn retry(&self, id: &str) -> Result<SessionView, ControllerError> {
        let session = self
            .command(id, "retry", |s| {
                if !matches!(s.state, SessionState::Waiting | SessionState::Failed) {
                    return Err(ControllerError::WrongState {
                        id: String::new(),
                        state: String::new(),
                        action: "retry",
                    });
                }
                s.state = s.resume.unwrap_or(SessionState::Validating);
                s.retries.attempt = 0;
                s.retries.next_at = None;
                Ok(())
            })
            .await?;
        info!(session = %id, step = %session.state, "manual retry");
        Ok(self.view(session).await)
    }

    /// Starts a session's write cache over, empty: everything clients wrote
    /// in its folder is dropped and the VM's files read as the backup
    /// again. The one way on from a write cache that is gone for good (a
    /// missing cache is otherwise only waited for); then runs the waiting
    /// step again, as `retry` does.
    pub async fn discard_cache(&self, id: &str) -> Result<SessionView, ControllerError> {
        let session = self.handle(id)?.snapshot();
        if session.state.is_terminal() || session.state == SessionState::Validating {
            return Err(ControllerError::WrongState {
                id: session.id,
                state: session.state.to_string(),
                action: "discard-cache",
            });
        }
        self.inner
            .datastore
            .discard_cache(&session.export, &session.name)
            .await?;
        info!(session = %id, name = %session.name, "write cache discarded");
        let session = self
            .command(id, "discard-cache", |s| {
                if s.state == SessionState::Waiting {
                    s.state = s.resume.unwrap_or(SessionState::Validating);
                    s.retries.attempt = 0;
                    s.retries.next_at = None;
                }
                Ok(())
            })
            .await?;
        Ok(self.view(session).await)
    }

    /// Cancels a session: powers off and unregisters its VM, unpublishes its
    /// folder, deletes its write cache.
    pub async fn stop(&self, id: &str) -> Result<SessionView, ControllerError> {
        let handle = self.handle(id)?;
        let session = self
            .command(id, "stop", |s| {
                if s.state.is_terminal() {
                    return Err(ControllerError::WrongState {
                        id: String::new(),
                        state: String::new(),
                        action: "stop",
                    });
                }
                s.state = SessionState::Stopping;
                s.resume = None;
                s.retries.next_at = None;
                Ok(())
            })
            .await?;
        handle.cancel.store(true, Ordering::SeqCst);
        info!(session = %id, "stop asked");
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
