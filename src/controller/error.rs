//! Errors of the controller: of API requests (refused before a session
//! exists) and of session steps (recorded in the session, retried when transient).

use std::path::PathBuf;

use crate::datastore::DatastoreError;
use crate::drivers::DriverError;
use crate::repo::RepoError;
use crate::snapshots::SnapshotError;

/// What went wrong in the controller.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    /// The request itself is not acceptable.
    #[error("{0}")]
    BadRequest(String),
    /// No session with that id.
    #[error("no session '{id}'")]
    UnknownSession { id: String },
    /// No configured host with that name.
    #[error("no host '{name}' in the configuration (configured: {known})")]
    UnknownHost { name: String, known: String },
    /// The session is not in a state that allows the request.
    #[error("session {id} is {state}: {action} is not possible now")]
    WrongState {
        id: String,
        state: String,
        action: &'static str,
    },
    /// A session name already used on the export.
    #[error("the name '{name}' is already used on export {export}")]
    NameTaken { name: String, export: String },
    /// A validation before publishing failed.
    #[error("validation failed: {check} - {reason}")]
    Validation { check: &'static str, reason: String },
    /// The repository failed.
    #[error(transparent)]
    Repo(#[from] RepoError),
    /// The datastore failed.
    #[error("datastore: {0}")]
    Datastore(#[from] DatastoreError),
    /// The hypervisor driver failed.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// A storage snapshot, its clone or the storage's CLI failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A copy migration's destination failed.
    #[error("{action} '{path}' - {source}")]
    Destination {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The session state folder failed.
    #[error("{action} '{path}' - {source}")]
    State {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A migration the hypervisor gave up.
    #[error("migration failed - {0}")]
    Migration(String),
    /// The step was interrupted by `revive stop`.
    #[error("cancelled")]
    Cancelled,
    /// The session's write cache folder is not there (its storage not
    /// mounted): the publication is refused until it is back, or until
    /// `revive discard-cache` starts an empty one.
    #[error("{0}; the VM's files are refused until it is back (or `revive discard-cache` starts an empty one)")]
    CacheMissing(String),
}

impl ControllerError {
    /// True when waiting and retrying may succeed: the repository, the
    /// hypervisor or a storage path was unreachable.
    pub fn is_transient(&self) -> bool {
        match self {
            ControllerError::Repo(e) => e.is_transient(),
            ControllerError::Driver(e) => e.is_transient(),
            // The datastore reports a repository it could not reach as I/O,
            // and a write cache whose storage is not there as Jukebox.
            ControllerError::Datastore(DatastoreError::Io(_) | DatastoreError::Jukebox) => true,
            ControllerError::Destination { .. } => true,
            ControllerError::CacheMissing(_) => true,
            _ => false,
        }
    }
}
