//! What the postgres driver remembers of a session, on disk
//! (`<run_dir>/<session>/state.json`, replaced atomically before each step
//! is acted on), so a restarted revive finds the mount point, the
//! postmaster it must stop or restart, and how far a migration got.
//!
//! ```text
//! <run_dir>/<session>/state.json      this record
//! <run_dir>/<session>/data/           FUSE mount point: the published data folder
//! <run_dir>/<session>/published.log   server log of the published instance
//! <run_dir>/<session>/standby.log     server log of the standby (production logs to <data>/log/revive-start.log)
//! <run_dir>/<session>/basebackup.log  pg_basebackup's messages
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::super::{DriverError, DriverResult};
use crate::fsutil::write_atomic;

/// How far a migration to local storage got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// `pg_basebackup` copies the published instance into the destination.
    Copying,
    /// The standby runs on the destination and streams from the published instance.
    Streaming,
    /// Switching over; `SwitchStep` says how far.
    SwitchingOver,
    /// Production runs from the destination; the published instance is gone.
    Done,
}

/// Steps of a switchover, in order; each is done once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SwitchStep {
    /// Nothing done yet.
    Started,
    /// The published instance refuses writes; its clients were disconnected.
    ReadOnly,
    /// The standby replayed everything and was stopped.
    StandbyStopped,
    /// The published instance is stopped (its slot dropped first).
    PublishedStopped,
    /// The destination is configured as the production instance.
    Reconfigured,
    /// Production answers on the session's port, writable.
    ProductionStarted,
}

/// A migration to local storage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationState {
    /// The production data folder.
    pub destination: PathBuf,
    /// revive created the destination folder (so a cancelled migration may remove it).
    pub created_destination: bool,
    /// Replication slot on the published instance.
    pub slot: String,
    /// Port of the standby while it streams.
    pub standby_port: u16,
    /// How far it got.
    pub phase: Phase,
    /// How far the switchover got.
    pub switch: SwitchStep,
    /// pid of the running `pg_basebackup`, to stop one a crashed revive left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basebackup_pid: Option<u32>,
    /// When the published instance was set read-only (Unix ms): switchover
    /// write downtime starts here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only_at_ms: Option<u64>,
    /// When production first accepted a write (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub writable_at_ms: Option<u64>,
}

/// One session's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PgSession {
    /// Session name (also the folder name in the export).
    pub name: String,
    /// Export path the folder is published in.
    pub export: String,
    /// Restore point presented.
    pub point: String,
    /// Port the published instance, then production, answers on.
    pub port: u16,
    /// The published instance should be running (set at power on).
    pub started: bool,
    /// pid of the published instance's postmaster, once it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postmaster_pid: Option<u32>,
    /// Milliseconds from `pg_ctl start` to the first answered query, at the
    /// last start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_query_ms: Option<u64>,
    /// The migration, once asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationState>,
}

impl PgSession {
    /// True once production runs from the destination: nothing of the
    /// published instance may be started again.
    pub fn switched(&self) -> bool {
        self.migration
            .as_ref()
            .is_some_and(|m| m.phase == Phase::Done)
    }

    /// True once the switchover has stopped the standby: the published
    /// instance must not be restarted for clients any more.
    pub fn past_read_only(&self) -> bool {
        self.migration.as_ref().is_some_and(|m| {
            m.phase == Phase::Done
                || (m.phase == Phase::SwitchingOver && m.switch >= SwitchStep::StandbyStopped)
        })
    }
}

/// Where one session's files are.
#[derive(Debug, Clone)]
pub struct SessionPaths {
    /// `<run_dir>/<session>`.
    pub dir: PathBuf,
}

impl SessionPaths {
    /// The folder of session `name` under `run_dir`.
    pub fn new(run_dir: &Path, name: &str) -> SessionPaths {
        SessionPaths {
            dir: run_dir.join(name),
        }
    }

    /// The record.
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    /// The FUSE mount point: the published data folder.
    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Server log of the published instance.
    pub fn published_log(&self) -> PathBuf {
        self.dir.join("published.log")
    }

    /// Server log of the standby and then of production.
    pub fn standby_log(&self) -> PathBuf {
        self.dir.join("standby.log")
    }

    /// Messages of `pg_basebackup`.
    pub fn basebackup_log(&self) -> PathBuf {
        self.dir.join("basebackup.log")
    }

    /// Loads the record; `None` when there is none.
    pub fn load(&self) -> DriverResult<Option<PgSession>> {
        let path = self.state();
        match std::fs::read(&path) {
            Ok(raw) => serde_json::from_slice(&raw)
                .map(Some)
                .map_err(|e| DriverError::Fault {
                    operation: format!("read session state '{}'", path.display()),
                    message: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(DriverError::Io {
                action: "read session state",
                path,
                source,
            }),
        }
    }

    /// Replaces the record durably.
    pub fn save(&self, state: &PgSession) -> DriverResult<()> {
        let path = self.state();
        let json = serde_json::to_vec_pretty(state).map_err(|e| DriverError::Fault {
            operation: format!("encode session state '{}'", path.display()),
            message: e.to_string(),
        })?;
        write_atomic(&path, &json).map_err(|source| DriverError::Io {
            action: "write session state",
            path,
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_and_phases_order() {
        let dir = tempfile::tempdir().unwrap();
        let paths = SessionPaths::new(dir.path(), "pg-ir");
        assert_eq!(paths.load().unwrap(), None);
        let mut s = PgSession {
            name: "pg-ir".into(),
            export: "/revive".into(),
            point: "abc".into(),
            port: 5433,
            started: true,
            postmaster_pid: Some(42),
            first_query_ms: Some(700),
            migration: None,
        };
        paths.save(&s).unwrap();
        assert_eq!(paths.load().unwrap(), Some(s.clone()));
        assert!(!s.switched() && !s.past_read_only());
        s.migration = Some(MigrationState {
            destination: "/var/lib/postgresql/15/main".into(),
            created_destination: true,
            slot: "revive_pg_ir".into(),
            standby_port: 5434,
            phase: Phase::SwitchingOver,
            switch: SwitchStep::ReadOnly,
            basebackup_pid: None,
            read_only_at_ms: None,
            writable_at_ms: None,
        });
        assert!(!s.past_read_only());
        s.migration.as_mut().unwrap().switch = SwitchStep::StandbyStopped;
        assert!(s.past_read_only() && !s.switched());
    }
}
