//! Live migration of a running VM's disks to production storage: QEMU's
//! block mirror, one `drive-mirror` job per disk from the NFS export to a
//! file in the destination folder, then `job-complete` to pivot the guest
//! onto the copy (QEMU's Storage vMotion).
//!
//! The state of a migration ([`MigrationState`], `migration.json`) is written
//! before jobs are started, and everything here is derived again from QEMU
//! on each call (`query-jobs`, `query-block`), so a call repeated after a
//! failure or a restart of revive picks up where the last one stopped.
//! Jobs run with `auto-dismiss: false`: a finished job stays visible as
//! "concluded" with its error, if any, until we have read and dismissed it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::process::{drive_id, VmState};
use super::qmp::Qmp;
use crate::drivers::MigrationStatus;

/// How long `complete` waits for the pivot to conclude, so that the next
/// status call already sees `Completed`.
const PIVOT_WAIT: Duration = Duration::from_secs(30);

/// One disk's mirror.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorJob {
    /// QEMU job id.
    pub job_id: String,
    /// The `-drive` id being mirrored.
    pub drive: String,
    /// The copy on production storage.
    pub target: PathBuf,
    /// Its block format (the source's).
    pub format: String,
}

/// A live migration as persisted in `migration.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationState {
    /// The task reference handed to the controller.
    pub task: String,
    /// The destination folder.
    pub destination: PathBuf,
    /// One job per disk.
    pub jobs: Vec<MirrorJob>,
    /// Every disk pivoted; the VM spec points at the copies.
    pub completed: bool,
}

impl MigrationState {
    /// The plan for moving `vm`'s disks into `destination`.
    pub fn plan(vm: &VmState, destination: &Path) -> MigrationState {
        let jobs = vm
            .disks
            .iter()
            .enumerate()
            .map(|(i, d)| MirrorJob {
                job_id: format!("revive-mirror-{i}"),
                drive: drive_id(i),
                target: destination.join(&d.name),
                format: d.format.clone(),
            })
            .collect();
        MigrationState {
            task: format!("mirror:{}:{}", vm.name, destination.display()),
            destination: destination.to_path_buf(),
            jobs,
            completed: false,
        }
    }
}

/// What QEMU says about one disk's mirror.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Copying: bytes done and total so far.
    Running { done: u64, total: u64 },
    /// In sync, waiting for `job-complete`.
    Ready,
    /// The guest runs from the copy.
    Pivoted,
    /// The job ended and the guest still runs from the source.
    Failed(String),
    /// No job and no pivot: never started (or lost with an earlier QEMU).
    Missing,
}

/// Snapshot of jobs and block devices, from one `query-jobs` and one `query-block`.
pub struct Observed {
    jobs: Vec<Value>,
    block: Vec<Value>,
}

impl Observed {
    /// Asks QEMU.
    pub async fn query(qmp: &mut Qmp) -> Result<Observed, super::qmp::QmpError> {
        let jobs = qmp.execute("query-jobs", None).await?;
        let block = qmp.execute("query-block", None).await?;
        Ok(Observed::from_values(&jobs, &block))
    }

    /// From the replies of `query-jobs` and `query-block`.
    pub fn from_values(jobs: &Value, block: &Value) -> Observed {
        let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
        Observed {
            jobs: list(jobs),
            block: list(block),
        }
    }

    /// The file a drive currently reads and writes.
    fn drive_file(&self, drive: &str) -> Option<&str> {
        self.block
            .iter()
            .find(|b| b.get("device").and_then(Value::as_str) == Some(drive))
            .and_then(|b| b.pointer("/inserted/file"))
            .and_then(Value::as_str)
    }

    /// The state of one disk's mirror.
    pub fn state(&self, job: &MirrorJob) -> JobState {
        let pivoted = self.drive_file(&job.drive) == job.target.to_str();
        let Some(j) = self
            .jobs
            .iter()
            .find(|j| j.get("id").and_then(Value::as_str) == Some(job.job_id.as_str()))
        else {
            return if pivoted {
                JobState::Pivoted
            } else {
                JobState::Missing
            };
        };
        let num = |k: &str| j.get(k).and_then(Value::as_u64).unwrap_or(0);
        match j.get("status").and_then(Value::as_str).unwrap_or("") {
            "ready" | "standby" => JobState::Ready,
            "concluded" | "null" => {
                if let Some(err) = j.get("error").and_then(Value::as_str) {
                    JobState::Failed(err.to_string())
                } else if pivoted {
                    JobState::Pivoted
                } else {
                    JobState::Failed("the mirror ended without switching the disk over".into())
                }
            }
            "aborting" => JobState::Failed("the mirror is being aborted".into()),
            _ => JobState::Running {
                done: num("current-progress"),
                total: num("total-progress"),
            },
        }
    }

    /// True when the job exists in QEMU (in any state).
    pub fn has_job(&self, job: &MirrorJob) -> bool {
        self.jobs
            .iter()
            .any(|j| j.get("id").and_then(Value::as_str) == Some(job.job_id.as_str()))
    }
}

/// Combines the disks' states into one migration status.
pub fn overall(states: &[JobState]) -> MigrationStatus {
    if let Some(reason) = states.iter().find_map(|s| match s {
        JobState::Failed(r) => Some(r.clone()),
        JobState::Missing => Some("the mirror job is gone (QEMU restarted?)".to_string()),
        _ => None,
    }) {
        return MigrationStatus::Failed { reason };
    }
    if states.iter().all(|s| *s == JobState::Pivoted) {
        return MigrationStatus::Completed;
    }
    if states
        .iter()
        .all(|s| matches!(s, JobState::Ready | JobState::Pivoted))
    {
        return MigrationStatus::Ready;
    }
    let (done, total) = states.iter().fold((0u64, 0u64), |(d, t), s| match s {
        JobState::Running { done, total } => (d + done, t + total),
        // A ready or pivoted disk counts as fully copied; its size is unknown
        // here, so it adds nothing to either side.
        _ => (d, t),
    });
    // Nothing known yet (total 0) is 0 %; never 100 while a job still runs:
    // 100 means "ready".
    let percent = (done.min(total) * 100)
        .checked_div(total)
        .map_or(0, |p| (p as u8).min(99));
    MigrationStatus::Running { percent }
}

/// The `drive-mirror` arguments of one disk: QEMU creates the target file
/// (any format) and copies the whole disk, then keeps it in sync.
pub fn mirror_args(job: &MirrorJob) -> Value {
    json!({
        "job-id": job.job_id,
        "device": job.drive,
        "target": job.target.to_string_lossy(),
        "format": job.format,
        "sync": "full",
        "mode": "absolute-paths",
        "auto-dismiss": false,
    })
}

/// Starts the mirror of every disk that has neither a job nor a pivot yet.
pub async fn ensure_jobs(
    qmp: &mut Qmp,
    state: &MigrationState,
) -> Result<(), super::qmp::QmpError> {
    let seen = Observed::query(qmp).await?;
    for job in &state.jobs {
        if seen.has_job(job) || seen.state(job) == JobState::Pivoted {
            continue;
        }
        qmp.execute("drive-mirror", Some(mirror_args(job))).await?;
    }
    Ok(())
}

/// Pivots every ready disk, dismisses concluded jobs, and waits (bounded)
/// until no job still runs. Returns the disks' states at the end.
pub async fn complete(
    qmp: &mut Qmp,
    state: &MigrationState,
) -> Result<Vec<JobState>, super::qmp::QmpError> {
    let seen = Observed::query(qmp).await?;
    for job in &state.jobs {
        if seen.state(job) == JobState::Ready {
            qmp.execute("job-complete", Some(json!({ "id": job.job_id })))
                .await?;
        }
    }
    let deadline = Instant::now() + PIVOT_WAIT;
    loop {
        let states = observe(qmp, state).await?;
        let settled = states
            .iter()
            .all(|s| !matches!(s, JobState::Ready | JobState::Running { .. }));
        if settled || Instant::now() > deadline {
            return Ok(states);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The disks' states; concluded jobs are dismissed once read, the pivot
/// having been recorded in `query-block` by then.
pub async fn observe(
    qmp: &mut Qmp,
    state: &MigrationState,
) -> Result<Vec<JobState>, super::qmp::QmpError> {
    let seen = Observed::query(qmp).await?;
    let states: Vec<JobState> = state.jobs.iter().map(|j| seen.state(j)).collect();
    for (job, s) in state.jobs.iter().zip(&states) {
        // A failed job stays for the operator to see in QEMU; a pivoted one
        // has nothing more to say.
        if *s == JobState::Pivoted && seen.has_job(job) {
            qmp.execute("job-dismiss", Some(json!({ "id": job.job_id })))
                .await?;
        }
    }
    Ok(states)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::drivers::qemu::process::DiskState;

    fn plan() -> MigrationState {
        let vm = VmState {
            name: "s1".into(),
            memory_mib: 256,
            disks: vec![DiskState {
                name: "tiny-flat.vmdk".into(),
                location: "nfs://127.0.0.1/revive/s1/tiny-flat.vmdk".into(),
                format: "raw".into(),
                size: 64 << 20,
            }],
            lab: None,
        };
        MigrationState::plan(&vm, Path::new("/prod/s1"))
    }

    fn block(file: &str) -> Value {
        json!([{"device": "disk0", "inserted": {"file": file}}])
    }

    #[test]
    fn job_states_come_from_jobs_and_the_drive_file() {
        let p = plan();
        let job = &p.jobs[0];
        assert_eq!(job.target, Path::new("/prod/s1/tiny-flat.vmdk"));
        let nfs = block("nfs://127.0.0.1/revive/s1/tiny-flat.vmdk");
        let running = json!([{"id": "revive-mirror-0", "status": "running",
            "current-progress": 30, "total-progress": 120}]);
        assert_eq!(
            Observed::from_values(&running, &nfs).state(job),
            JobState::Running {
                done: 30,
                total: 120
            }
        );
        let ready = json!([{"id": "revive-mirror-0", "status": "ready"}]);
        assert_eq!(
            Observed::from_values(&ready, &nfs).state(job),
            JobState::Ready
        );
        let concluded = json!([{"id": "revive-mirror-0", "status": "concluded"}]);
        assert_eq!(
            Observed::from_values(&concluded, &block("/prod/s1/tiny-flat.vmdk")).state(job),
            JobState::Pivoted
        );
        assert!(matches!(
            Observed::from_values(&concluded, &nfs).state(job),
            JobState::Failed(_)
        ));
        let failed = json!([{"id": "revive-mirror-0", "status": "concluded", "error": "No space left on device"}]);
        assert_eq!(
            Observed::from_values(&failed, &nfs).state(job),
            JobState::Failed("No space left on device".into())
        );
        assert_eq!(
            Observed::from_values(&json!([]), &block("/prod/s1/tiny-flat.vmdk")).state(job),
            JobState::Pivoted
        );
        assert_eq!(
            Observed::from_values(&json!([]), &nfs).state(job),
            JobState::Missing
        );
    }

    #[test]
    fn overall_status_waits_for_every_disk() {
        use JobState::*;
        assert_eq!(
            overall(&[Running { done: 1, total: 4 }, Running { done: 1, total: 4 }]),
            MigrationStatus::Running { percent: 25 }
        );
        assert_eq!(
            overall(&[Running { done: 4, total: 4 }]),
            MigrationStatus::Running { percent: 99 }
        );
        assert_eq!(overall(&[Ready, Pivoted]), MigrationStatus::Ready);
        assert_eq!(overall(&[Pivoted, Pivoted]), MigrationStatus::Completed);
        assert!(matches!(
            overall(&[Pivoted, Failed("x".into())]),
            MigrationStatus::Failed { .. }
        ));
        assert!(matches!(
            overall(&[Missing]),
            MigrationStatus::Failed { .. }
        ));
    }

    #[test]
    fn mirror_creates_a_target_of_the_source_format() {
        let args = mirror_args(&plan().jobs[0]);
        assert_eq!(args["device"], "disk0");
        assert_eq!(args["format"], "raw");
        assert_eq!(args["sync"], "full");
        assert_eq!(args["auto-dismiss"], false);
    }
}
