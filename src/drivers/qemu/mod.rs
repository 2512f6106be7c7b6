//! The `qemu` driver: QEMU/KVM controlled over QMP, booting the published
//! disk straight from revive's NFS export (`nfs://ADDR/EXPORT/SESSION/DISK`),
//! then moving it to production storage with a block mirror while the guest
//! runs.
//!
//! - [`qmp`]: the QMP client (greeting, capabilities, commands with ids).
//! - [`process`]: per-VM state folder, command line, daemonized QEMU, pid file.
//! - [`mirror`]: live migration (`drive-mirror`, progress, `job-complete`).
//! - [`portmap`]: QEMU's nfs driver asks the portmapper on port 111; so do we,
//!   before a session counts on it.
//!
//! The host is the machine revive runs on: QEMU runs here, detached, and
//! each VM keeps its state in `run_dir/<vm>/` so a restarted revive finds it.

pub mod mirror;
pub mod portmap;
pub mod process;
pub mod qmp;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Mutex;

use self::mirror::MigrationState;
use self::process::{DiskState, Launch, VmPaths, VmState};
use self::qmp::{Qmp, QmpError};
use super::{
    DatastoreSpec, Driver, DriverError, DriverResult, HostInfo, MigrationStatus, TaskRef, VmRef,
    VmSpec,
};
use crate::fsutil::write_atomic;

/// Memory of a VM whose backup does not say (no `.vmx` `memsize`).
pub const DEFAULT_MEMORY_MIB: u64 = 512;

/// `[[host]] driver = "qemu"` settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QemuConfig {
    /// Folder for QMP sockets, serial logs and pid files of the VMs this host runs.
    pub run_dir: PathBuf,
    /// The QEMU binary (a name on PATH or a path).
    #[serde(default = "default_binary")]
    pub binary: String,
    /// Accelerator: "kvm" on real hosts, "tcg" where /dev/kvm is missing or broken.
    #[serde(default = "default_accel")]
    pub accel: String,
    /// Memory of a VM whose backup has no `memsize`, in MiB.
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Arguments appended to every QEMU command line (e.g. `["-smp", "2"]`).
    #[serde(default)]
    pub extra_args: Vec<String>,
}

fn default_binary() -> String {
    "qemu-system-x86_64".into()
}

fn default_accel() -> String {
    "tcg".into()
}

fn default_memory() -> u64 {
    DEFAULT_MEMORY_MIB
}

/// Builds the driver of a QEMU host.
pub fn build(host: &str, config: &QemuConfig) -> DriverResult<Arc<dyn Driver>> {
    Ok(Arc::new(QemuDriver::new(host, config.clone())))
}

/// The QEMU driver of one host.
pub struct QemuDriver {
    host: String,
    config: QemuConfig,
    /// One QMP conversation at a time: QEMU serves one client per monitor,
    /// and a second connection would wait behind the first.
    lock: Mutex<()>,
}

impl QemuDriver {
    /// A driver for host `host` with `config`.
    pub fn new(host: &str, config: QemuConfig) -> QemuDriver {
        QemuDriver {
            host: host.to_string(),
            config,
            lock: Mutex::new(()),
        }
    }

    /// Where VM `name` keeps its state (spec, sockets, serial log, pid file).
    pub fn paths(&self, name: &str) -> VmPaths {
        VmPaths::new(&self.config.run_dir, name)
    }

    /// Paths of a registered VM, refusing names that would leave `run_dir`.
    fn vm_paths(&self, name: &str) -> DriverResult<VmPaths> {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(DriverError::UnsupportedVm {
                driver: "qemu",
                vm: name.to_string(),
                reason: "the name cannot be a folder name".into(),
            });
        }
        Ok(self.paths(name))
    }

    fn load_state(&self, paths: &VmPaths, name: &str) -> DriverResult<VmState> {
        let text = match std::fs::read(paths.spec()) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DriverError::NotFound {
                    kind: "registered VM",
                    name: name.to_string(),
                })
            }
            Err(source) => return Err(io_err("read VM spec", paths.spec(), source)),
        };
        serde_json::from_slice(&text).map_err(|e| DriverError::Fault {
            operation: format!("read VM spec '{}'", paths.spec().display()),
            message: e.to_string(),
        })
    }

    fn save_json(&self, path: &Path, value: &impl serde::Serialize) -> DriverResult<()> {
        let data = serde_json::to_vec_pretty(value).map_err(|e| DriverError::Fault {
            operation: format!("encode '{}'", path.display()),
            message: e.to_string(),
        })?;
        write_atomic(path, &data).map_err(|source| io_err("write", path.to_path_buf(), source))
    }

    fn load_migration(&self, paths: &VmPaths) -> DriverResult<Option<MigrationState>> {
        match std::fs::read(paths.migration()) {
            Ok(t) => serde_json::from_slice(&t)
                .map(Some)
                .map_err(|e| DriverError::Fault {
                    operation: format!("read migration state '{}'", paths.migration().display()),
                    message: e.to_string(),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(io_err("read migration state", paths.migration(), source)),
        }
    }

    /// Opens a QMP session with a running VM.
    async fn qmp(&self, paths: &VmPaths, name: &str) -> DriverResult<Qmp> {
        if process::running_pid(paths).is_none() {
            return Err(DriverError::NotFound {
                kind: "running VM",
                name: name.to_string(),
            });
        }
        Qmp::connect(&paths.qmp())
            .await
            .map_err(|e| self.qmp_err("connect", e))
    }

    fn qmp_err(&self, operation: &str, e: QmpError) -> DriverError {
        match e {
            QmpError::Timeout { .. } => DriverError::Timeout {
                host: self.host.clone(),
                operation: format!("QMP {operation}"),
                seconds: qmp::REPLY_TIMEOUT.as_secs(),
            },
            other => DriverError::Fault {
                operation: format!("QMP {operation}"),
                message: other.to_string(),
            },
        }
    }

    /// Writes the spec of a VM, unless a running QEMU uses a different one.
    fn register(&self, state: VmState) -> DriverResult<VmRef> {
        let paths = self.vm_paths(&state.name)?;
        if let Ok(existing) = self.load_state(&paths, &state.name) {
            if existing == state {
                return Ok(VmRef(state.name));
            }
            if process::running_pid(&paths).is_some() {
                return Err(DriverError::InUse {
                    what: format!("VM '{}'", state.name),
                    reason: "it runs with other disks; power it off first".into(),
                });
            }
        }
        std::fs::create_dir_all(&paths.dir)
            .map_err(|source| io_err("create VM folder", paths.dir.clone(), source))?;
        self.save_json(&paths.spec(), &state)?;
        Ok(VmRef(state.name))
    }

    fn memory_of(&self, vm: &VmSpec) -> u64 {
        vm.memory_mib.unwrap_or(self.config.memory_mib)
    }
}

fn io_err(action: &'static str, path: PathBuf, source: std::io::Error) -> DriverError {
    DriverError::Io {
        action,
        path,
        source,
    }
}

#[async_trait]
impl Driver for QemuDriver {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    async fn validate(&self, vm: &VmSpec) -> DriverResult<HostInfo> {
        let version = tokio::process::Command::new(&self.config.binary)
            .arg("--version")
            .output()
            .await;
        match version {
            Ok(out) if out.status.success() => {}
            _ => {
                return Err(DriverError::NotFound {
                    kind: "QEMU binary",
                    name: self.config.binary.clone(),
                })
            }
        }
        if vm.disks().next().is_none() {
            return Err(DriverError::UnsupportedVm {
                driver: "qemu",
                vm: vm.name.clone(),
                reason: "the backup has no disk to boot".into(),
            });
        }
        let free = process::available_memory_mib();
        let needed = self.memory_of(vm);
        if let Some(available) = free {
            if needed > available {
                return Err(DriverError::InsufficientMemory {
                    host: self.host.clone(),
                    needed_mib: needed,
                    available_mib: available,
                });
            }
        }
        Ok(HostInfo {
            free_memory_mib: free,
        })
    }

    async fn attach_datastore(&self, datastore: &DatastoreSpec) -> DriverResult<()> {
        // Nothing to mount: QEMU opens each disk by URL. But its nfs driver
        // finds the server only through the portmapper on 111, so check that
        // now rather than fail at power on.
        portmap::nfs_port(&datastore.remote_host, portmap::PORTMAP_PORT)
            .await
            .map(|_| ())
            .map_err(|e| match e {
                portmap::ProbeError::Unreachable { .. } => DriverError::Unreachable {
                    host: self.host.clone(),
                    reason: e.to_string(),
                },
                portmap::ProbeError::Refused { .. } => DriverError::Fault {
                    operation: format!("attach datastore '{}'", datastore.name),
                    message: e.to_string(),
                },
            })
    }

    async fn detach_datastore(&self, _datastore: &DatastoreSpec) -> DriverResult<()> {
        Ok(())
    }

    async fn register_vm(&self, datastore: &DatastoreSpec, vm: &VmSpec) -> DriverResult<VmRef> {
        let export = datastore.remote_path.trim_end_matches('/');
        let disks: Vec<DiskState> = vm
            .disks()
            .map(|d| DiskState {
                name: d.name.clone(),
                // A block session's disk is opened from its block export,
                // a block image (a Ceph clone) as itself.
                location: d
                    .url
                    .clone()
                    .or_else(|| d.location.clone())
                    .unwrap_or_else(|| {
                        format!(
                            "nfs://{}{}/{}/{}",
                            datastore.remote_host, export, vm.folder, d.name
                        )
                    }),
                format: process::format_for(&d.name).into(),
                size: d.size,
            })
            .collect();
        if disks.is_empty() {
            return Err(DriverError::UnsupportedVm {
                driver: "qemu",
                vm: vm.name.clone(),
                reason: "the backup has no disk to boot".into(),
            });
        }
        self.register(VmState {
            name: vm.name.clone(),
            memory_mib: self.memory_of(vm),
            disks,
            lab: vm.lab.clone(),
        })
    }

    async fn power_on(&self, vm: &VmRef) -> DriverResult<()> {
        let _guard = self.lock.lock().await;
        let paths = self.vm_paths(&vm.0)?;
        let state = self.load_state(&paths, &vm.0)?;
        if process::running_pid(&paths).is_some() {
            // Already running: resume it if it was paused (e.g. by an error).
            let mut qmp = self.qmp(&paths, &vm.0).await?;
            let status = qmp
                .execute("query-status", None)
                .await
                .map_err(|e| self.qmp_err("query-status", e))?;
            if status.get("running").and_then(Value::as_bool) == Some(false)
                && status.get("status").and_then(Value::as_str) == Some("paused")
            {
                qmp.execute("cont", None)
                    .await
                    .map_err(|e| self.qmp_err("cont", e))?;
            }
            return Ok(());
        }
        // Leftovers of an earlier QEMU would make the new one fail to bind.
        for stale in [paths.qmp(), paths.serial_socket(), paths.pid()] {
            let _ = std::fs::remove_file(stale);
        }
        let args = process::qemu_args(
            &state,
            &paths,
            &Launch {
                accel: &self.config.accel,
                extra_args: &self.config.extra_args,
            },
        );
        tracing::info!(vm = %vm.0, binary = %self.config.binary, "starting QEMU");
        tracing::debug!(vm = %vm.0, args = ?args, "QEMU command line");
        process::spawn(&self.config.binary, &args, &paths).await?;
        if process::running_pid(&paths).is_none() {
            return Err(DriverError::Fault {
                operation: format!("power on '{}'", vm.0),
                message: "QEMU started but is gone (see serial.log in its run folder)".into(),
            });
        }
        Ok(())
    }

    async fn power_off(&self, vm: &VmRef) -> DriverResult<()> {
        let _guard = self.lock.lock().await;
        let paths = self.vm_paths(&vm.0)?;
        let Some(pid) = process::running_pid(&paths) else {
            return Ok(());
        };
        match Qmp::connect(&paths.qmp()).await {
            Ok(mut qmp) => {
                // QEMU may close the socket before its reply: gone is fine.
                if let Err(e) = qmp.execute("quit", None).await {
                    tracing::debug!(vm = %vm.0, cause = %e, "quit");
                }
            }
            Err(e) => tracing::warn!(vm = %vm.0, cause = %e, "no QMP; killing QEMU"),
        }
        if !process::wait_gone(&paths, process::QUIT_TIMEOUT).await {
            tracing::warn!(vm = %vm.0, pid, "QEMU ignored quit; killing it");
            let _ = process::signal(pid, libc::SIGKILL);
            if !process::wait_gone(&paths, process::QUIT_TIMEOUT).await {
                return Err(DriverError::Timeout {
                    host: self.host.clone(),
                    operation: format!("power off '{}'", vm.0),
                    seconds: 2 * process::QUIT_TIMEOUT.as_secs(),
                });
            }
        }
        let _ = std::fs::remove_file(paths.pid());
        Ok(())
    }

    async fn unregister_vm(&self, vm: &VmRef) -> DriverResult<()> {
        let paths = self.vm_paths(&vm.0)?;
        if process::running_pid(&paths).is_some() {
            return Err(DriverError::InUse {
                what: format!("VM '{}'", vm.0),
                reason: "QEMU still runs it; power it off first".into(),
            });
        }
        match std::fs::remove_dir_all(&paths.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(io_err("remove VM folder", paths.dir.clone(), source)),
        }
    }

    async fn start_live_migration(&self, vm: &VmRef, destination: &str) -> DriverResult<TaskRef> {
        let _guard = self.lock.lock().await;
        let paths = self.vm_paths(&vm.0)?;
        let state = self.load_state(&paths, &vm.0)?;
        let destination = Path::new(destination);
        let plan = match self.load_migration(&paths)? {
            Some(m) if m.destination == destination => m,
            Some(m) if !m.completed => {
                return Err(DriverError::Duplicate {
                    kind: "live migration",
                    name: m.destination.display().to_string(),
                })
            }
            _ => {
                let plan = MigrationState::plan(&state, destination);
                std::fs::create_dir_all(destination).map_err(|source| {
                    io_err("create destination", destination.to_path_buf(), source)
                })?;
                let needed: u64 = state.disks.iter().map(|d| d.size).sum();
                let free = process::free_bytes(destination).map_err(|source| {
                    io_err("stat destination", destination.to_path_buf(), source)
                })?;
                if free < needed {
                    return Err(DriverError::Fault {
                        operation: format!("live migration of '{}'", vm.0),
                        message: format!(
                            "'{}' has {free} bytes free; the disks need {needed}",
                            destination.display()
                        ),
                    });
                }
                for job in &plan.jobs {
                    if job.target.exists() {
                        return Err(DriverError::Duplicate {
                            kind: "file",
                            name: job.target.display().to_string(),
                        });
                    }
                }
                // Persisted before acting, so a retry finds the same task.
                self.save_json(&paths.migration(), &plan)?;
                plan
            }
        };
        if !plan.completed {
            let mut qmp = self.qmp(&paths, &vm.0).await?;
            mirror::ensure_jobs(&mut qmp, &plan)
                .await
                .map_err(|e| self.qmp_err("drive-mirror", e))?;
        }
        Ok(TaskRef(plan.task))
    }

    async fn live_migration_status(
        &self,
        vm: &VmRef,
        task: &TaskRef,
    ) -> DriverResult<MigrationStatus> {
        let _guard = self.lock.lock().await;
        let paths = self.vm_paths(&vm.0)?;
        let plan = self.migration_of(&paths, task)?;
        if plan.completed {
            return Ok(MigrationStatus::Completed);
        }
        let mut qmp = match self.qmp(&paths, &vm.0).await {
            Ok(q) => q,
            Err(DriverError::NotFound { .. }) => {
                return Ok(MigrationStatus::Failed {
                    reason: "QEMU is not running".into(),
                })
            }
            Err(e) => return Err(e),
        };
        let states = mirror::observe(&mut qmp, &plan)
            .await
            .map_err(|e| self.qmp_err("query-jobs", e))?;
        let status = mirror::overall(&states);
        if status == MigrationStatus::Completed {
            self.record_pivot(&paths, &vm.0, plan)?;
        }
        Ok(status)
    }

    async fn complete_live_migration(&self, vm: &VmRef, task: &TaskRef) -> DriverResult<()> {
        let _guard = self.lock.lock().await;
        let paths = self.vm_paths(&vm.0)?;
        let plan = self.migration_of(&paths, task)?;
        if plan.completed {
            return Ok(());
        }
        let mut qmp = self.qmp(&paths, &vm.0).await?;
        let states = mirror::complete(&mut qmp, &plan)
            .await
            .map_err(|e| self.qmp_err("job-complete", e))?;
        match mirror::overall(&states) {
            MigrationStatus::Completed => self.record_pivot(&paths, &vm.0, plan),
            MigrationStatus::Failed { reason } => Err(DriverError::Fault {
                operation: format!("live migration of '{}'", vm.0),
                message: reason,
            }),
            MigrationStatus::Running { percent } => Err(DriverError::Fault {
                operation: format!("complete live migration of '{}'", vm.0),
                message: format!("the mirror is not in sync yet ({percent}%)"),
            }),
            // Pivot issued but not concluded within the wait: the next
            // status call sees it finish. (A mirror never reports Syncing.)
            MigrationStatus::Ready | MigrationStatus::Syncing { .. } => Ok(()),
        }
    }

    async fn console_output(&self, vm: &VmRef) -> DriverResult<Vec<u8>> {
        let paths = self.vm_paths(&vm.0)?;
        let log = paths.serial_log();
        match tokio::fs::read(&log).await {
            Ok(bytes) => Ok(bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(source) => Err(io_err("read serial log", log, source)),
        }
    }

    async fn screenshot(&self, vm: &VmRef) -> DriverResult<Vec<u8>> {
        let _guard = self.lock.lock().await;
        let paths = self.vm_paths(&vm.0)?;
        let file = paths.dir.join("screen.png");
        let mut qmp = self.qmp(&paths, &vm.0).await?;
        qmp.execute(
            "screendump",
            Some(serde_json::json!({
                "filename": file.to_string_lossy(),
                "format": "png",
            })),
        )
        .await
        .map_err(|e| self.qmp_err("screendump", e))?;
        let png = tokio::fs::read(&file)
            .await
            .map_err(|source| io_err("read screenshot", file.clone(), source))?;
        let _ = tokio::fs::remove_file(&file).await;
        Ok(png)
    }

    async fn start_from_copy(&self, vm: &VmSpec, folder: &Path) -> DriverResult<Option<VmRef>> {
        let mut disks = Vec::new();
        for d in vm.disks() {
            let path = folder.join(&d.name);
            if !path.is_file() {
                return Err(DriverError::NotFound {
                    kind: "copied disk",
                    name: path.display().to_string(),
                });
            }
            disks.push(DiskState {
                name: d.name.clone(),
                location: path.to_string_lossy().into_owned(),
                format: process::format_for(&d.name).into(),
                size: d.size,
            });
        }
        if disks.is_empty() {
            return Err(DriverError::UnsupportedVm {
                driver: "qemu",
                vm: vm.name.clone(),
                reason: "the copy has no disk to boot".into(),
            });
        }
        // Production runs as configured, never on a lab network.
        let vm_ref = self.register(VmState {
            name: vm.name.clone(),
            memory_mib: self.memory_of(vm),
            disks,
            lab: None,
        })?;
        self.power_on(&vm_ref).await?;
        Ok(Some(vm_ref))
    }
}

impl QemuDriver {
    fn migration_of(&self, paths: &VmPaths, task: &TaskRef) -> DriverResult<MigrationState> {
        match self.load_migration(paths)? {
            Some(m) if m.task == task.0 => Ok(m),
            _ => Err(DriverError::NotFound {
                kind: "live migration",
                name: task.0.clone(),
            }),
        }
    }

    /// Every disk runs from its copy: the spec now points at the copies (a
    /// later power on boots production storage, not the export), then the
    /// migration is marked completed.
    fn record_pivot(
        &self,
        paths: &VmPaths,
        name: &str,
        mut plan: MigrationState,
    ) -> DriverResult<()> {
        let mut state = self.load_state(paths, name)?;
        for (disk, job) in state.disks.iter_mut().zip(&plan.jobs) {
            disk.location = job.target.to_string_lossy().into_owned();
        }
        self.save_json(&paths.spec(), &state)?;
        plan.completed = true;
        self.save_json(&paths.migration(), &plan)?;
        tracing::info!(vm = %name, destination = %plan.destination.display(), "live migration completed");
        Ok(())
    }
}

#[cfg(test)]
mod tests;
