//! A session's durable record and its state machine's states. Each record is
//! one JSON file, `<state>/sessions/<id>.json`, replaced atomically (temp
//! file + rename) before the step it names is acted on, so a restarted daemon
//! resumes every session where it stopped.

use std::fs;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::ControllerError;
use crate::drivers::{DatastoreSpec, LabNetwork, TaskRef, VmRef, VmSpec};
use crate::fsutil::write_atomic;

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    /// Checking the restore point, the cache location, the name and the host.
    Validating,
    /// Presenting the restore point as the session's folder on the export.
    Publishing,
    /// Mounting the NFS datastore on the host.
    RegisteringDatastore,
    /// Serving the disk of a block session as a block export.
    Exporting,
    /// Registering the VM from its folder.
    RegisteringVm,
    /// Starting the VM.
    PoweringOn,
    /// The VM runs from the backup; writes land in the write cache.
    Running,
    /// Moving the VM to production storage.
    Migrating,
    /// Stopping the published VM, copying the last writes, starting it from production.
    SwitchingOver,
    /// Removing the published folder, its cache and (if unused) the datastore.
    Finalizing,
    /// Migrated and cleaned up.
    Done,
    /// A step failed for a cause retrying will not fix; `revive retry` runs it again.
    Failed,
    /// A step failed for a transient cause; it is retried automatically, then by `revive retry`.
    Waiting,
    /// `revive stop` was asked: powering off, unregistering, unpublishing.
    Stopping,
    /// Stopped and cleaned up.
    Cancelled,
}

impl SessionState {
    /// No more work will happen.
    pub fn is_terminal(self) -> bool {
        matches!(self, SessionState::Done | SessionState::Cancelled)
    }

    /// All states, for metrics.
    pub const ALL: [SessionState; 15] = [
        SessionState::Validating,
        SessionState::Publishing,
        SessionState::RegisteringDatastore,
        SessionState::Exporting,
        SessionState::RegisteringVm,
        SessionState::PoweringOn,
        SessionState::Running,
        SessionState::Migrating,
        SessionState::SwitchingOver,
        SessionState::Finalizing,
        SessionState::Done,
        SessionState::Failed,
        SessionState::Waiting,
        SessionState::Stopping,
        SessionState::Cancelled,
    ];

    /// The snake_case name used in the API and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            SessionState::Validating => "validating",
            SessionState::Publishing => "publishing",
            SessionState::RegisteringDatastore => "registering_datastore",
            SessionState::Exporting => "exporting",
            SessionState::RegisteringVm => "registering_vm",
            SessionState::PoweringOn => "powering_on",
            SessionState::Running => "running",
            SessionState::Migrating => "migrating",
            SessionState::SwitchingOver => "switching_over",
            SessionState::Finalizing => "finalizing",
            SessionState::Done => "done",
            SessionState::Failed => "failed",
            SessionState::Waiting => "waiting",
            SessionState::Stopping => "stopping",
            SessionState::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for SessionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a session moves to production storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationMethod {
    /// The hypervisor moves the running VM (Storage vMotion, QEMU block mirror).
    Live,
    /// revive copies the merged files while the VM runs, then switches over.
    Copy,
}

/// Progress of one file of a `copy` migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCopy {
    /// Name in the VM folder.
    pub name: String,
    /// Size when the copy pass started.
    pub size: u64,
    /// Bytes copied so far, from the start: a restart resumes here.
    pub copied: u64,
}

/// A migration asked for with `revive migrate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Migration {
    /// Live or copy.
    pub method: MigrationMethod,
    /// Destination: a folder (copy, QEMU) or a datastore name (vSphere).
    pub destination: String,
    /// The hypervisor's job for a live migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskRef>,
    /// Percent done.
    pub percent: u8,
    /// Files of a copy migration and how far each got.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileCopy>,
    /// Bytes copied by revive (copy migrations, including the switchover pass).
    pub bytes_copied: u64,
    /// The VM the driver started from the copy, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub production_vm: Option<VmRef>,
    /// Switch over as soon as the copy is in sync (else wait for `revive switchover`).
    #[serde(default = "yes")]
    pub switchover: bool,
    /// How far a streaming copy (a database standby) is behind, in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag_bytes: Option<u64>,
    /// The copy follows the source live: a switchover can start at any time.
    #[serde(default)]
    pub in_sync: bool,
}

fn yes() -> bool {
    true
}

/// Automatic retries of a session's failed step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Retries {
    /// Attempts made after the first failure (the "n" of "retry n of N").
    pub attempt: u32,
    /// Automatic attempts allowed (the "N").
    pub max: u32,
    /// When the next automatic attempt runs; `None`: waiting for `revive retry`.
    pub next_at: Option<DateTime<Utc>>,
}

/// One instant-recovery session, as persisted and as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// Unique id.
    pub id: String,
    /// Id of the `recover` request that created it (sessions of one request share an export).
    pub request: String,
    /// Session name: the VM folder on the export and the VM's name on the host.
    pub name: String,
    /// VM as backed up.
    pub vm: String,
    /// Restore point id.
    pub point: String,
    /// Configured host name.
    pub host: String,
    /// The host's driver ("none", "vsphere", "qemu", "postgres").
    pub driver: String,
    /// Export path the folder is published in.
    pub export: String,
    /// The datastore as the host mounts it.
    pub datastore: DatastoreSpec,
    /// Write cache folder.
    pub cache_dir: PathBuf,
    /// Power the VM on after registering it.
    pub power_on: bool,
    /// Port of a recovered database (postgres sessions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Milliseconds from the recover request until the VM was powered on,
    /// for a database until it answered its first query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_ms: Option<u64>,
    /// Current state.
    pub state: SessionState,
    /// The step to run again when a Waiting or Failed session is retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<SessionState>,
    /// Automatic retries of the current failure.
    pub retries: Retries,
    /// The last error, with the step it happened in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The VM as the driver registered it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_ref: Option<VmRef>,
    /// What the driver was asked to register.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_spec: Option<VmSpec>,
    /// The datastore was mounted on the host for this session.
    pub datastore_attached: bool,
    /// The disk a block session serves (`recover --kind block`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<super::BlockTarget>,
    /// The migration, once asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Migration>,
    /// Boot on an isolated lab network (a verification boot), not as configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lab: Option<LabNetwork>,
    /// Creation time.
    pub created: DateTime<Utc>,
    /// Last change.
    pub updated: DateTime<Utc>,
}

/// The folder of session records.
#[derive(Debug, Clone)]
pub struct SessionStore {
    dir: PathBuf,
}

impl SessionStore {
    /// Opens (creating) `<state>/sessions`.
    pub fn open(state_dir: &Path) -> Result<SessionStore, ControllerError> {
        let dir = state_dir.join("sessions");
        fs::create_dir_all(&dir).map_err(|source| ControllerError::State {
            action: "create session folder",
            path: dir.clone(),
            source,
        })?;
        Ok(SessionStore { dir })
    }

    fn path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes a record atomically and durably.
    pub fn save(&self, session: &Session) -> Result<(), ControllerError> {
        let path = self.path(&session.id);
        let json = serde_json::to_vec_pretty(session).map_err(|e| ControllerError::State {
            action: "encode session",
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        write_atomic(&path, &json).map_err(|source| ControllerError::State {
            action: "write session",
            path,
            source,
        })
    }

    /// Every record, oldest first. A record that cannot be parsed is skipped
    /// with an error in the log rather than stopping the daemon.
    pub fn load_all(&self) -> Result<Vec<Session>, ControllerError> {
        let entries = fs::read_dir(&self.dir).map_err(|source| ControllerError::State {
            action: "list sessions",
            path: self.dir.clone(),
            source,
        })?;
        let mut sessions = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) != Some("json") {
                continue;
            }
            let parsed = fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|raw| serde_json::from_slice::<Session>(&raw).map_err(|e| e.to_string()));
            match parsed {
                Ok(s) => sessions.push(s),
                Err(cause) => {
                    tracing::error!(path = %path.display(), %cause, "unreadable session record skipped")
                }
            }
        }
        sessions.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        Ok(sessions)
    }
}
